//! Wires the parts together: pool, workers, listener, pipeline. [`start`] returns one
//! [`Daemon`] handle whose [`Daemon::stop`] ends them all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::Settings;
use crate::db::{self, DbError};
use crate::health::{Health, Readiness};
use crate::http;
use crate::listener::{self, ListenerSettings, ListenerStatus};
use crate::metrics::{self, Instrumented};
use crate::pipeline::{self, Sinks, Timing};
use crate::platform::{Platform, PlatformClient};
use crate::schema::{self, SchemaError};
use crate::workers::{self, BotHealth, BotHealthReport, Context, RunError, SlotRecovery};
use crate::workers::{SlotRecoveryReport, Worker, WorkerHandle};

/// Events buffered between the listener and the router. The router only inserts into sets,
/// so this fills only if it is starved of CPU; then the listener waits briefly, which is
/// the only backpressure the socket ever sees.
const EVENT_BUFFER: usize = 4096;

/// How often gauges that need a query (`pg_notification_queue_usage()`) are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("could not connect to apply migrations")]
    ConnectFailed(#[source] deadpool_postgres::PoolError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("could not listen for HTTP on {addr}")]
    HttpBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Everything [`start`] needs.
#[derive(Clone)]
pub struct Options {
    pub database_url: String,
    pub settings: Settings,
    pub platform: Arc<dyn Platform>,
    /// Apply pending migrations before starting.
    pub migrate: bool,
    pub listener: ListenerSettings,
    /// Names this daemon in the audit log's `replica` column. Defaults to
    /// [`workers::replica_name`] (`host:pid`); set it when several daemons share a process
    /// (tests, embedding) or a host name, so that their actions can be told apart.
    pub replica: String,
    /// Serve `/metrics`, `/healthz` and `/readyz` here; `None` serves nothing. Port 0 picks a
    /// free port ([`Daemon::http_addr`] tells which).
    pub http_listen: Option<SocketAddr>,
}

impl Options {
    pub fn new(database_url: &str, settings: Settings, platform: Arc<dyn Platform>) -> Self {
        let mut listener = ListenerSettings::new(database_url);
        listener.sweep_on_start = settings.sweep_on_start;
        Self {
            database_url: database_url.to_owned(),
            settings,
            platform,
            migrate: true,
            listener,
            replica: workers::replica_name(),
            http_listen: None,
        }
    }
}

/// The running daemon.
pub struct Daemon {
    pub slot_recovery: WorkerHandle<SlotRecoveryReport>,
    pub bot_health: WorkerHandle<BotHealthReport>,
    pub listener: Arc<ListenerStatus>,
    health: Arc<Health>,
    http_addr: Option<SocketAddr>,
    pool: deadpool_postgres::Pool,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
}

/// The workers' shared context, built from settings. Also used by one-shot sweeps.
pub fn context(
    pool: deadpool_postgres::Pool,
    settings: &Settings,
    platform: Arc<dyn Platform>,
) -> Context {
    let platform = PlatformClient::new(
        platform,
        settings.platform_timeout,
        settings.platform_concurrency,
    );
    Context {
        pool,
        platform,
        replica: workers::replica_name().into(),
        batch_size: settings.batch_size,
        concurrency: settings.platform_concurrency,
        platform_budget: settings.platform_budget(),
        batch_timeout: settings.claim_lease() + Duration::from_secs(10),
    }
}

/// Builds the pool the way the daemon does.
pub fn pool(database_url: &str, settings: &Settings) -> Result<deadpool_postgres::Pool, DbError> {
    db::pool(database_url, settings.pool_size, settings.claim_lease())
}

/// Applies migrations through the given pool.
pub async fn migrate(pool: &deadpool_postgres::Pool) -> Result<usize, StartError> {
    let mut client = pool.get().await.map_err(StartError::ConnectFailed)?;
    Ok(schema::migrate(&mut client).await?)
}

/// Starts workers, listener and pipeline.
pub async fn start(options: Options) -> Result<Daemon, StartError> {
    let settings = &options.settings;
    let pool = pool(&options.database_url, settings)?;
    let http_listener = match options.http_listen {
        Some(addr) => Some(
            http::bind(addr)
                .await
                .map_err(|source| StartError::HttpBind { addr, source })?,
        ),
        None => None,
    };
    if options.migrate {
        migrate(&pool).await?;
    }

    let status = Arc::new(ListenerStatus::default());
    let health = Arc::new(Health::new(
        &[<SlotRecovery as Worker>::NAME, <BotHealth as Worker>::NAME],
        settings.sweep_interval,
        options.listener.sweep_on_start,
        status.clone(),
    ));

    let mut context = context(pool.clone(), settings, options.platform.clone());
    context.replica = options.replica.as_str().into();
    let timing = Timing {
        debounce: settings.debounce,
        max_wait: settings.max_wait,
    };
    let slot_recovery = workers::start(
        Instrumented::new(
            SlotRecovery::new(context.clone(), settings.slots.clone()),
            health.clone(),
        ),
        timing,
    );
    let bot_health = workers::start(
        Instrumented::new(
            BotHealth::new(context, settings.bots.clone()),
            health.clone(),
        ),
        timing,
    );

    let cancel = CancellationToken::new();
    let (events, received) = mpsc::channel(EVENT_BUFFER);
    let listener_task = listener::spawn(
        options.listener.clone(),
        events,
        status.clone(),
        cancel.clone(),
    );
    let sinks = Sinks {
        slots: slot_recovery.inbox().clone(),
        bots: bot_health.inbox().clone(),
    };
    let pipeline_task = tokio::spawn(pipeline::run(
        received,
        pipeline::ticks(settings.sweep_interval),
        sinks,
        cancel.clone(),
    ));

    let mut tasks = vec![listener_task, pipeline_task];
    let mut http_addr = None;
    if let Some(http_listener) = http_listener {
        http_addr = http_listener.local_addr().ok();
        let handle = metrics::install();
        let refresh: http::Refresh = {
            let listener = status.clone();
            let slots = slot_recovery.inbox().clone();
            let bots = bot_health.inbox().clone();
            Arc::new(move || {
                metrics::listener(
                    listener.is_connected(),
                    listener.connections(),
                    listener.notifications(),
                    listener.ignored_payloads(),
                );
                metrics::pending_ids(slot_recovery_name(), slots.pending_ids());
                metrics::pending_ids(bot_health_name(), bots.pending_ids());
            })
        };
        tasks.push(tokio::spawn(sample(
            pool.clone(),
            handle.clone(),
            refresh.clone(),
            cancel.clone(),
        )));
        tasks.push(http::spawn(
            http_listener,
            handle,
            health.clone(),
            refresh,
            cancel.clone(),
        ));
    }

    info!(
        database = %db::redact_url(&options.database_url),
        sweep_interval = ?settings.sweep_interval,
        debounce = ?settings.debounce,
        max_wait = ?settings.max_wait,
        "milo-workers started"
    );
    Ok(Daemon {
        slot_recovery,
        bot_health,
        listener: status,
        health,
        http_addr,
        pool,
        cancel,
        tasks,
        grace: settings.shutdown_grace,
    })
}

fn slot_recovery_name() -> &'static str {
    <SlotRecovery as Worker>::NAME
}

fn bot_health_name() -> &'static str {
    <BotHealth as Worker>::NAME
}

/// Samples the gauges that are not updated as things happen, and keeps the recorder's
/// histograms tidy, every [`SAMPLE_INTERVAL`] until `cancel`.
async fn sample(
    pool: deadpool_postgres::Pool,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    refresh: http::Refresh,
    cancel: CancellationToken,
) {
    let mut every = tokio::time::interval(SAMPLE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        refresh();
        handle.run_upkeep();
        let usage = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            let row = client
                .query_one("SELECT pg_notification_queue_usage()", &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<f64, String>(row.get(0))
        };
        let sampled = tokio::select! {
            _ = cancel.cancelled() => return,
            sampled = usage => sampled,
        };
        match sampled {
            Ok(usage) => metrics::notification_queue_usage(usage),
            // The workers report a database outage; the next sample tries again.
            Err(error) => debug!(%error, "could not sample the notification queue usage"),
        }
    }
}

impl Daemon {
    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.pool
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// What `/readyz` would answer now.
    pub fn readiness(&self) -> Readiness {
        self.health.readiness()
    }

    pub async fn run_slot_recovery_now(&self) -> Result<SlotRecoveryReport, RunError> {
        self.slot_recovery.run_now().await
    }

    pub async fn run_bot_health_now(&self) -> Result<BotHealthReport, RunError> {
        self.bot_health.run_now().await
    }

    /// Stops taking input, lets both workers finish their runs in flight within the grace
    /// period, then cancels them. Returns false if anything had to be cancelled.
    pub async fn stop(self) -> bool {
        info!(grace = ?self.grace, "stopping");
        self.cancel.cancel();
        for task in self.tasks {
            // Both tasks end at once on cancel; an error here is a panic already logged.
            let _ = task.await;
        }
        let (slots, bots) = tokio::join!(
            self.slot_recovery.stop(self.grace),
            self.bot_health.stop(self.grace)
        );
        self.pool.close();
        info!("stopped");
        slots && bots
    }
}
