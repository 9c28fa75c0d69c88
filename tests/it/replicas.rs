//! Several daemons on one database: every repair happens exactly once whichever replica makes
//! it, no application ever has two platform calls in flight, and a replica that dies midway
//! leaves nothing half-done.
//!
//! The daemons run in one process, so each is given its own replica name
//! (`daemon::Options::replica`) to tell their audit rows apart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use milo_workers::config::Settings;
use milo_workers::daemon::{self, Daemon, Options};
use milo_workers::platform::{Operation, Platform, PlatformError, SimulatedPlatform};
use tokio_postgres::Client;

use crate::common::{self, eventually, TestDb};

const BURST: i64 = 1000;

/// The simulated platform, counting calls as they start (its own log records them as they
/// end), so a test knows when a call is in flight.
#[derive(Clone)]
struct Counted {
    inner: SimulatedPlatform,
    started: Arc<AtomicUsize>,
}

impl Counted {
    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
}

impl Platform for Counted {
    fn stop<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.inner.stop(uuid)
    }

    fn delete<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.inner.delete(uuid)
    }
}

/// Starts a daemon named `replica` and waits until its listener has subscribed.
async fn start_named(
    db: &TestDb,
    settings: Settings,
    platform: Arc<dyn Platform>,
    replica: &str,
) -> Daemon {
    let mut options = Options::new(&db.url, settings, platform);
    options.migrate = false;
    options.replica = replica.to_owned();
    let daemon = daemon::start(options).await.expect("daemon starts");
    let listener = daemon.listener.clone();
    eventually("the listener subscribes", || {
        let listener = listener.clone();
        async move { listener.is_connected() }
    })
    .await;
    daemon
}

fn settings() -> Settings {
    let mut settings = common::settings();
    settings.bots.heartbeat_timeout = Duration::from_secs(60);
    // The burst is far beyond any real fleet's; the cap is tested elsewhere.
    settings.bots.max_fatal_per_run = 10_000;
    settings
}

/// `BURST` bots with a busy slot each; the slots' applications are `app-<prefix>-<bot id>`.
/// The bots are in `status` and last heartbeated `heartbeat_age_secs` ago.
async fn insert_fleet(milo: &Client, prefix: &str, status: &str, heartbeat_age_secs: f64) {
    milo.execute(
        "WITH b AS (
             INSERT INTO bots (status, last_heartbeat)
             SELECT $2, timezone('UTC', now()) - make_interval(secs => $3)
             FROM generate_series(1, $4::int8)
             RETURNING id
         )
         INSERT INTO bot_pool_slots
             (coolify_service_uuid, slot_name, status, assigned_bot_id, last_used_at)
         SELECT 'app-' || $1 || '-' || id, $1 || '-' || id, 'busy', id, timezone('UTC', now())
         FROM b",
        &[&prefix, &status, &heartbeat_age_secs, &BURST],
    )
    .await
    .expect("insert fleet");
}

/// How many audit rows of `action` each id in `column` has.
async fn audit_counts(milo: &Client, action: &str, column: &str) -> HashMap<i32, i64> {
    let sql = format!(
        "SELECT {column}, count(*) FROM milo_workers.audit_log
         WHERE action = $1 GROUP BY {column}"
    );
    milo.query(&sql, &[&action])
        .await
        .expect("audit counts")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn count(milo: &Client, sql: &str) -> i64 {
    milo.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_repair_a_burst_exactly_once() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    // One platform shared by all replicas, slow enough that their claims overlap in time.
    let platform = SimulatedPlatform::new(Duration::from_millis(10), 0.0);

    // Slots that will fail under heartbeating bots, and bots that went silent an hour ago
    // (still DEPLOYING, which BotHealth does not watch, until the burst).
    insert_fleet(&milo, "failing", "IN_CALL", 0.0).await;
    insert_fleet(&milo, "silent", "DEPLOYING", 3600.0).await;

    let mut replicas = Vec::new();
    for name in ["replica-a", "replica-b", "replica-c"] {
        let adapter: Arc<dyn Platform> = Arc::new(platform.clone());
        replicas.push(start_named(&db, settings(), adapter, name).await);
    }

    // The burst: every replica is told about every change.
    milo.batch_execute(
        "UPDATE bot_pool_slots SET status = 'error', error_message = 'container crashed'
             WHERE slot_name LIKE 'failing-%';
         UPDATE bots SET status = 'IN_CALL' WHERE status = 'DEPLOYING';",
    )
    .await
    .unwrap();

    eventually("every bot is FATAL and every slot idle", || async {
        count(&milo, "SELECT count(*) FROM bots WHERE status <> 'FATAL'").await == 0
            && count(
                &milo,
                "SELECT count(*) FROM bot_pool_slots WHERE status <> 'idle'",
            )
            .await
                == 0
    })
    .await;
    for replica in replicas {
        assert!(replica.stop().await, "a replica had to be cancelled");
    }

    // Every failing slot recovered exactly once, by one stop of its application.
    let recovered = audit_counts(&milo, "slot_recovered", "slot_id").await;
    assert_eq!(recovered.len() as i64, BURST, "slots recovered");
    assert!(
        recovered.values().all(|&n| n == 1),
        "a slot recovered twice"
    );
    // Every silent bot's slot released exactly once.
    let released = audit_counts(&milo, "resources_released", "slot_id").await;
    assert_eq!(released.len() as i64, BURST, "slots released");
    assert!(released.values().all(|&n| n == 1), "a slot released twice");
    // Every bot, failing slot's or silent, marked FATAL exactly once.
    let fatal = audit_counts(&milo, "bot_marked_fatal", "bot_id").await;
    assert_eq!(fatal.len() as i64, 2 * BURST, "bots marked FATAL");
    assert!(fatal.values().all(|&n| n == 1), "a bot marked FATAL twice");
    let other = count(
        &milo,
        "SELECT count(*) FROM milo_workers.audit_log
         WHERE action NOT IN ('slot_recovered', 'resources_released', 'bot_marked_fatal')",
    )
    .await;
    assert_eq!(
        other, 0,
        "unexpected actions (failures, deletions, busy marks)"
    );

    // The platform saw exactly one stop per application, never two at once.
    let mut stops: HashMap<String, usize> = HashMap::new();
    for call in platform.calls() {
        assert_eq!(call.operation, Operation::Stop, "{call:?}");
        assert!(call.succeeded, "{call:?}");
        *stops.entry(call.uuid).or_default() += 1;
    }
    assert_eq!(stops.len() as i64, 2 * BURST, "applications stopped");
    assert!(
        stops.values().all(|&n| n == 1),
        "an application stopped twice"
    );
    assert_eq!(platform.overlapping_calls(), 0);

    // Nothing stuck, and every slot back in the pool unassigned.
    let stuck = count(
        &milo,
        "SELECT count(*) FROM bot_pool_slots s LEFT JOIN bots b ON b.id = s.assigned_bot_id
         WHERE s.status IN ('error', 'deploying')
            OR (s.status = 'busy' AND b.status = 'FATAL')
            OR s.assigned_bot_id IS NOT NULL",
    )
    .await;
    assert_eq!(stuck, 0, "slots left stuck");

    // The work was shared: more than one replica acted.
    let acting: Vec<(String, i64)> = milo
        .query(
            "SELECT replica, count(*) FROM milo_workers.audit_log GROUP BY replica ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    eprintln!("audit rows per replica: {acting:?}");
    assert!(acting.len() > 1, "only one replica acted: {acting:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_dying_mid_recovery_leaves_the_slot_to_another() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(0.0)).await;
    let slot = common::insert_slot(&milo, "x", "busy", Some(bot), 0.0).await;

    // Replica A's stop of app-x never returns.
    let hanging = SimulatedPlatform::new(Duration::ZERO, 0.0);
    hanging.hang("app-x");
    let counted = Counted {
        inner: hanging.clone(),
        started: Arc::default(),
    };
    let mut settings_a = settings();
    settings_a.platform_timeout = Duration::from_secs(600);
    settings_a.shutdown_grace = Duration::from_millis(200);
    let a = start_named(&db, settings_a, Arc::new(counted.clone()), "replica-a").await;

    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();
    eventually("replica A is stopping app-x", || async {
        counted.started() == 1
    })
    .await;
    assert!(!a.stop().await, "the hung run should have been cancelled");
    assert!(hanging.calls().is_empty(), "the hung call never finished");

    // Replica B, with a healthy platform, finds the slot as A found it.
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let b = start_named(&db, settings(), Arc::new(platform.clone()), "replica-b").await;
    eventually("replica B recovers the slot", || async {
        b.run_slot_recovery_now().await.expect("sweep");
        common::slot_status(&milo, slot).await.as_deref() == Some("idle")
    })
    .await;
    b.stop().await;

    let audit: Vec<(String, String)> = milo
        .query(
            "SELECT action, replica FROM milo_workers.audit_log ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let b_did = |action: &str| (action.to_owned(), "replica-b".to_owned());
    assert_eq!(
        audit,
        [b_did("bot_marked_fatal"), b_did("slot_recovered")],
        "A's work rolled back whole; B did it once"
    );
    assert_eq!(common::bot_status(&milo, bot).await, "FATAL");
    let calls = platform.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        (calls[0].operation, calls[0].uuid.as_str()),
        (Operation::Stop, "app-x")
    );
}
