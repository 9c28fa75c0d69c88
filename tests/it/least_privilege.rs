//! The daemon as a least-privilege role: migrations applied by the owner (the harness), the
//! grants of `scripts/grant-worker-role.sql`, and the daemon with migrations off doing all of
//! its work (recover, mark FATAL, fail and schedule a retry, delete) as that role, which can
//! neither alter milo's tables nor create anything.

use std::sync::Arc;
use std::time::Duration;

use milo_workers::daemon::{self, Options};
use milo_workers::fleet;
use milo_workers::platform::SimulatedPlatform;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::common::{self, eventually, TestDb};

/// A login role of its own for one test (roles are cluster-wide), dropped with everything it
/// was granted when the test ends.
struct Role {
    name: String,
    database_url: String,
}

impl Role {
    async fn create(db: &TestDb) -> Self {
        let name = format!("mw_lp_{}_{}", std::process::id(), rand::random::<u32>());
        let admin = common::connect(&common::server_url()).await;
        admin
            .batch_execute(&format!("CREATE ROLE {name} LOGIN"))
            .await
            .expect("create role");
        Self {
            name,
            database_url: db.url.clone(),
        }
    }

    /// Applies the documented script, as `psql -v role=...` would.
    async fn grant(&self, owner: &Client) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/grant-worker-role.sql");
        let script = std::fs::read_to_string(path).expect("grant script");
        assert!(
            !script
                .lines()
                .any(|line| line.trim_start().starts_with('\\')),
            "the script must stay plain SQL plus :\"role\""
        );
        let sql = script.replace(":\"role\"", &format!("\"{}\"", self.name));
        owner.batch_execute(&sql).await.expect("the grants apply");
    }

    /// The database's URL, logging in as this role.
    fn url(&self) -> String {
        common::with_param(&self.database_url, "user", &self.name)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let (name, url) = (self.name.clone(), self.database_url.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let admin = common::connect(&common::server_url()).await;
                admin
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE usename = $1",
                        &[&name],
                    )
                    .await?;
                let owner = common::connect(&url).await;
                owner
                    .batch_execute(&format!(
                        "REASSIGN OWNED BY {name} TO CURRENT_USER; DROP OWNED BY {name};"
                    ))
                    .await?;
                admin
                    .batch_execute(&format!("DROP ROLE IF EXISTS {name}"))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test role {}: {dropped:?}", self.name);
        }
    }
}

/// The SQLSTATE of a statement's failure; panics if it succeeded.
async fn refused(client: &Client, statement: &str) -> SqlState {
    match client.batch_execute(statement).await {
        Ok(()) => panic!("the worker role could run `{statement}`"),
        Err(error) => error.code().cloned().unwrap_or_else(|| panic!("{error}")),
    }
}

#[tokio::test]
async fn the_daemon_does_all_its_work_as_the_least_privilege_role() {
    let db = TestDb::new().await;
    let owner = db.client().await;
    let role = Role::create(&db).await;
    role.grant(&owner).await;

    // Broken rows, planted by milo (the owner) before the daemon starts.
    let silent = common::insert_bot(&owner, "IN_CALL", Some(3600.0)).await;
    let held = common::insert_slot(&owner, "held", "busy", Some(silent), 60.0).await;
    let gone = common::insert_slot(&owner, "gone", "error", None, 60.0).await;
    owner
        .execute(
            "UPDATE bot_pool_slots SET recovery_attempts = 3 WHERE id = $1",
            &[&gone],
        )
        .await
        .unwrap();
    let failing = common::insert_slot(&owner, "failing", "error", None, 60.0).await;
    let running = common::insert_bot(&owner, "IN_CALL", Some(1.0)).await;
    let broken = common::insert_slot(&owner, "broken", "busy", Some(running), 60.0).await;

    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    platform.fail("app-failing");
    let mut settings = common::settings();
    settings.sweep_on_start = true;
    settings.slots.retry_backoff = vec![Duration::from_secs(3600)];
    let mut options = Options::new(&role.url(), settings, Arc::new(platform.clone()));
    options.migrate = false;
    let daemon = daemon::start(options).await.expect("daemon starts");

    // The sweep after subscribing handles the planted rows.
    eventually("the planted rows are handled", || async {
        common::bot_status(&owner, silent).await == "FATAL"
            && common::slot_status(&owner, held).await.as_deref() == Some("idle")
            && common::slot_status(&owner, gone).await.is_none()
            && common::slot_state(&owner, failing).await.map(|s| s.1) == Some(1)
    })
    .await;
    // A change through the notification path.
    owner
        .execute(
            "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
            &[&broken],
        )
        .await
        .unwrap();
    eventually("the broken slot is recovered", || async {
        common::slot_status(&owner, broken).await.as_deref() == Some("idle")
    })
    .await;
    assert_eq!(common::bot_status(&owner, running).await, "FATAL");

    let audit = |kind: &'static str, id: i32| {
        let owner = &owner;
        async move {
            let actions = match kind {
                "slot" => common::slot_audit(owner, id).await,
                _ => common::bot_audit(owner, id).await,
            };
            actions
                .into_iter()
                .map(|(action, _)| action)
                .collect::<Vec<_>>()
        }
    };
    assert!(audit("bot", silent)
        .await
        .contains(&"bot_marked_fatal".into()));
    assert_eq!(audit("slot", held).await, ["resources_released"]);
    assert_eq!(audit("slot", gone).await, ["slot_deleted"]);
    assert_eq!(audit("slot", failing).await, ["slot_recovery_failed"]);
    assert_eq!(
        audit("slot", broken).await,
        ["bot_marked_fatal", "slot_recovered"]
    );
    let retry: i64 = owner
        .query_one(
            "SELECT count(*) FROM milo_workers.slot_retry WHERE slot_id = $1",
            &[&failing],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(retry, 1, "the failed recovery's retry is scheduled");

    // Full sweeps (advisory locks, deadline queries) and the status report work too.
    daemon.run_slot_recovery_now().await.expect("slot sweep");
    daemon.run_bot_health_now().await.expect("bot sweep");
    let worker = common::connect(&role.url()).await;
    let settings = common::settings();
    fleet::report(&worker, &settings.slots, &settings.bots)
        .await
        .expect("status report as the worker role");
    assert!(daemon.stop().await);

    // What the role must not do.
    let current: String = worker
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, role.name);
    let denied = SqlState::INSUFFICIENT_PRIVILEGE;
    for statement in [
        "ALTER TABLE bots ADD COLUMN sneaky integer",
        "ALTER TABLE bot_pool_slots DISABLE TRIGGER USER",
        "DROP TRIGGER milo_workers_bot_status_changed ON bots",
        "CREATE TABLE public.sneaky (id integer)",
        "CREATE TABLE milo_workers.sneaky (id integer)",
        "CREATE SCHEMA sneaky",
        "INSERT INTO bots (status) VALUES ('IN_CALL')",
        "UPDATE bots SET last_heartbeat = now()",
        "UPDATE bot_pool_slots SET slot_name = 'renamed'",
        "DELETE FROM bots",
        "INSERT INTO milo_workers.bot_status_since VALUES (1, 'x', now())",
        "UPDATE milo_workers.audit_log SET reason = 'rewritten'",
        "DELETE FROM milo_workers.audit_log",
        "SELECT * FROM milo_workers.refinery_schema_history",
    ] {
        assert_eq!(refused(&worker, statement).await, denied, "{statement}");
    }
    let owned: i64 = worker
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relowner = current_user::regrole",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owned, 0, "the role owns nothing");
    // Which is why migrations are a separate step, run by an owner.
    let pool = daemon::pool(&role.url(), &common::settings()).expect("pool");
    assert!(daemon::migrate(&pool).await.is_err());
    pool.close();
}
