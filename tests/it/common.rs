//! Shared by every integration test: a fresh database per test on the server given by
//! `DATABASE_URL` (default: the local one), with the worker's migrations applied, dropped
//! again when the test ends. Tests therefore run in parallel without seeing each other.

#![allow(dead_code)] // Each test module uses a different subset of these helpers.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use milo_workers::config::Settings;
use milo_workers::daemon::{self, Daemon, Options};
use milo_workers::db;
use milo_workers::platform::{Platform, PlatformError, SimulatedPlatform};
use milo_workers::workers::{BotHealth, Context, SlotRecovery};
use tokio_postgres::{Client, NoTls};

pub const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Generous bound for "eventually" checks: long enough for a loaded CI machine, and only
/// reached when the behaviour under test is broken. Not a timing assertion.
pub const EVENTUALLY: Duration = Duration::from_secs(20);

pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER.to_owned())
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = url
        .parse::<tokio_postgres::Config>()
        .expect("valid url")
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", db::redact_url(url)));
    tokio::spawn(connection);
    client
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates the database and applies the migrations (which also create milo's tables).
    pub async fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "mw_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let admin = connect(&server_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = db::with_database(&server_url(), &name);

        let pool = daemon::pool(&url, &Settings::default()).expect("pool");
        daemon::migrate(&pool).await.expect("migrations apply");
        pool.close();
        Self { name, url }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async context; a short-lived runtime on its own thread does it.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            runtime.expect("runtime").block_on(async move {
                let admin = connect(&server_url()).await;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// Settings for tests: the tick off (so that only the path under test acts), quick timeouts,
/// and failed recoveries retried without delay (tests of the backoff set their own).
pub fn settings() -> Settings {
    let mut settings = Settings {
        sweep_interval: Duration::ZERO,
        sweep_on_start: false,
        platform_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(5),
        ..Settings::default()
    };
    settings.slots.retry_backoff = vec![Duration::ZERO];
    // Tests plant silent bots before the daemon starts; the outage grace (tested on its own)
    // would rightly spare them.
    settings.bots.outage_grace = false;
    settings
}

/// Starts the daemon on `db` and waits until its listener has subscribed.
pub async fn start(db: &TestDb, settings: Settings, platform: &SimulatedPlatform) -> Daemon {
    start_with(db, settings, Arc::new(platform.clone())).await
}

/// [`start`] with any platform adapter, such as a [`GatedPlatform`].
pub async fn start_with(db: &TestDb, settings: Settings, platform: Arc<dyn Platform>) -> Daemon {
    let mut options = Options::new(&db.url, settings, platform);
    options.migrate = false;
    let daemon = daemon::start(options).await.expect("daemon starts");
    let listener = daemon.listener.clone();
    eventually("the listener subscribes", || {
        let listener = listener.clone();
        async move { listener.is_connected() }
    })
    .await;
    daemon
}

/// Polls `check` until it holds, panicking with `what` after [`EVENTUALLY`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Inserts a bot; `heartbeat_age_secs` None leaves `last_heartbeat` NULL.
pub async fn insert_bot(client: &Client, status: &str, heartbeat_age_secs: Option<f64>) -> i32 {
    client
        .query_one(
            "INSERT INTO bots (status, last_heartbeat)
             VALUES ($1, timezone('UTC', now()) - make_interval(secs => $2))
             RETURNING id",
            &[&status, &heartbeat_age_secs],
        )
        .await
        .expect("insert bot")
        .get(0)
}

/// Inserts a slot with application `app-<name>`; `used_age_secs` sets `last_used_at` that far
/// in the past.
pub async fn insert_slot(
    client: &Client,
    name: &str,
    status: &str,
    bot: Option<i32>,
    used_age_secs: f64,
) -> i32 {
    client
        .query_one(
            "INSERT INTO bot_pool_slots
                 (coolify_service_uuid, slot_name, status, assigned_bot_id, last_used_at)
             VALUES ('app-' || $1, $1, $2, $3,
                     timezone('UTC', now()) - make_interval(secs => $4))
             RETURNING id",
            &[&name, &status, &bot, &used_age_secs],
        )
        .await
        .expect("insert slot")
        .get(0)
}

pub async fn slot_status(client: &Client, id: i32) -> Option<String> {
    client
        .query_opt("SELECT status FROM bot_pool_slots WHERE id = $1", &[&id])
        .await
        .expect("query slot")
        .map(|row| row.get(0))
}

pub async fn bot_status(client: &Client, id: i32) -> String {
    client
        .query_one("SELECT status FROM bots WHERE id = $1", &[&id])
        .await
        .expect("bot")
        .get(0)
}

/// `(action, trigger)` of every audit entry about this slot, oldest first.
pub async fn slot_audit(client: &Client, slot: i32) -> Vec<(String, String)> {
    client
        .query(
            "SELECT action, trigger FROM milo_workers.audit_log WHERE slot_id = $1 ORDER BY id",
            &[&slot],
        )
        .await
        .expect("audit")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// The workers' context on `db`, built the way the daemon builds it, for calling a worker's
/// `run` directly (as the `sweep` command does) without listener or pipeline.
pub fn context(db: &TestDb, settings: &Settings, platform: Arc<dyn Platform>) -> Context {
    let pool = daemon::pool(&db.url, settings).expect("pool");
    daemon::context(pool, settings, platform)
}

/// A SlotRecovery worker on `db`, to be run directly.
pub fn slot_recovery(
    db: &TestDb,
    settings: &Settings,
    platform: &SimulatedPlatform,
) -> SlotRecovery {
    let context = context(db, settings, Arc::new(platform.clone()));
    SlotRecovery::new(context, settings.slots.clone())
}

/// A BotHealth worker on `db`, to be run directly.
pub fn bot_health(db: &TestDb, settings: &Settings, platform: &SimulatedPlatform) -> BotHealth {
    let context = context(db, settings, Arc::new(platform.clone()));
    BotHealth::new(context, settings.bots.clone())
}

/// `(status, recovery_attempts, error_message)` of a slot, or None once it is deleted.
pub async fn slot_state(client: &Client, id: i32) -> Option<(String, i32, Option<String>)> {
    client
        .query_opt(
            "SELECT status, recovery_attempts, error_message FROM bot_pool_slots WHERE id = $1",
            &[&id],
        )
        .await
        .expect("query slot")
        .map(|row| (row.get(0), row.get(1), row.get(2)))
}

pub async fn bot_deployment_error(client: &Client, id: i32) -> Option<String> {
    client
        .query_one("SELECT deployment_error FROM bots WHERE id = $1", &[&id])
        .await
        .expect("bot")
        .get(0)
}

/// `(action, trigger)` of every audit entry about this bot, oldest first.
pub async fn bot_audit(client: &Client, bot: i32) -> Vec<(String, String)> {
    client
        .query(
            "SELECT action, trigger FROM milo_workers.audit_log WHERE bot_id = $1 ORDER BY id",
            &[&bot],
        )
        .await
        .expect("audit")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// How many transactions wrote audit rows. A worker writes a batch's audit rows in the batch's
/// own transaction, so with a batch size above the number of rows this counts the runs that
/// acted.
pub async fn audit_transactions(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(DISTINCT xmin::text) FROM milo_workers.audit_log",
            &[],
        )
        .await
        .expect("audit transactions")
        .get(0)
}

/// Whether a pooled worker session of this database is waiting for a lock right now.
pub async fn worker_waits_for_lock(client: &Client) -> bool {
    client
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1
               AND wait_event_type = 'Lock'",
            &[&db::POOL_APPLICATION_NAME],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Wraps the simulated platform: counts calls as they start, and holds each call at a gate
/// until the test opens it, so a test knows a run is in flight and can keep it there.
#[derive(Clone)]
pub struct GatedPlatform {
    pub inner: SimulatedPlatform,
    started: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::watch::Sender<bool>>,
}

impl GatedPlatform {
    /// Calls wait at the gate until [`Self::open`].
    pub fn closed(inner: SimulatedPlatform) -> Self {
        Self {
            inner,
            started: Arc::default(),
            gate: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Calls pass straight through; only counted.
    pub fn open(inner: SimulatedPlatform) -> Self {
        let platform = Self::closed(inner);
        platform.open_gate();
        platform
    }

    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// Calls started so far, including those waiting at the gate.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    async fn pass(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
        let mut gate = self.gate.subscribe();
        // The sender lives as long as self, so this only ends when the gate opens.
        let _ = gate.wait_for(|open| *open).await;
    }
}

impl Platform for GatedPlatform {
    fn stop<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>> {
        Box::pin(async move {
            self.pass().await;
            self.inner.stop(uuid).await
        })
    }

    fn delete<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>> {
        Box::pin(async move {
            self.pass().await;
            self.inner.delete(uuid).await
        })
    }
}

/// Polls `check` until it holds, panicking with `what` after `bound`: for checks that a
/// fault makes legitimately slow (a 5 s ping must first miss), never as a timing assertion.
pub async fn eventually_within<F, Fut>(bound: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {bound:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a daemon on `url` (the test database's, or a proxy's in front of it) with any
/// platform, after `adjust` changed its options, and waits until its listener subscribed.
pub async fn start_on(
    url: &str,
    settings: Settings,
    platform: Arc<dyn Platform>,
    adjust: impl FnOnce(&mut Options),
) -> Daemon {
    let mut options = Options::new(url, settings, platform);
    options.migrate = false;
    adjust(&mut options);
    let daemon = daemon::start(options).await.expect("daemon starts");
    let listener = daemon.listener.clone();
    eventually("the listener subscribes", || {
        let listener = listener.clone();
        async move { listener.is_connected() }
    })
    .await;
    daemon
}

/// Backend pids of the daemon's LISTEN connections to this test's database only.
pub async fn listener_backends(client: &Client, db: &TestDb) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = $2",
            &[&db::LISTENER_APPLICATION_NAME, &db.name],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The log lines of the calling test, captured. `tokio::test` runs every task the test
/// spawns (the whole daemon) on the test's own thread, so a thread-local subscriber sees
/// exactly this test's daemon, even while other tests run in parallel.
#[derive(Default)]
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    /// Captures until the guard is dropped; `filter` is an `EnvFilter` directive.
    pub fn capture(filter: &str) -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(LogSink(logs.0.clone()))
            .with_ansi(false)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The lines containing `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// The value of `field=` in the first line containing `needle`, for reporting.
    pub fn field(&self, needle: &str, field: &str) -> Option<String> {
        let line = self.lines_with(needle).into_iter().next()?;
        let start = line.find(&format!("{field}="))? + field.len() + 1;
        Some(line[start..].split_whitespace().next()?.to_owned())
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        // A failing test shows what its daemon logged (the harness prints captured output).
        if std::thread::panicking() {
            eprintln!("---- captured daemon log ----\n{}", self.text());
        }
    }
}

/// Where the subscriber writes a captured test's lines.
pub struct LogSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        Self(self.0.clone())
    }
}

/// `url` with one more connection parameter, in the URL's own form; it overrides an earlier
/// one of the same name.
pub fn with_param(url: &str, key: &str, value: &str) -> String {
    if url.contains("://") {
        let encoded: String = value
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}{key}={encoded}")
    } else {
        let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
        format!("{url} {key}='{quoted}'")
    }
}
