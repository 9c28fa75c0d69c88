//! Wires the parts together: pool, workers, listener, pipeline. [`start`] returns one
//! [`Daemon`] handle whose [`Daemon::stop`] ends them all.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Settings;
use crate::db::{self, DbError};
use crate::listener::{self, ListenerSettings, ListenerStatus};
use crate::pipeline::{self, Sinks, Timing};
use crate::platform::{Platform, PlatformClient};
use crate::schema::{self, SchemaError};
use crate::workers::{self, BotHealth, BotHealthReport, Context, RunError, SlotRecovery};
use crate::workers::{SlotRecoveryReport, WorkerHandle};

/// Events buffered between the listener and the router. The router only inserts into sets,
/// so this fills only if it is starved of CPU; then the listener waits briefly, which is
/// the only backpressure the socket ever sees.
const EVENT_BUFFER: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("could not connect to apply migrations")]
    ConnectFailed(#[source] deadpool_postgres::PoolError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
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
        }
    }
}

/// The running daemon.
pub struct Daemon {
    pub slot_recovery: WorkerHandle<SlotRecoveryReport>,
    pub bot_health: WorkerHandle<BotHealthReport>,
    pub listener: Arc<ListenerStatus>,
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
    if options.migrate {
        migrate(&pool).await?;
    }

    let mut context = context(pool.clone(), settings, options.platform.clone());
    context.replica = options.replica.as_str().into();
    let timing = Timing {
        debounce: settings.debounce,
        max_wait: settings.max_wait,
    };
    let slot_recovery = workers::start(
        SlotRecovery::new(context.clone(), settings.slots.clone()),
        timing,
    );
    let bot_health = workers::start(BotHealth::new(context, settings.bots.clone()), timing);

    let cancel = CancellationToken::new();
    let (events, received) = mpsc::channel(EVENT_BUFFER);
    let status = Arc::new(ListenerStatus::default());
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
        pool,
        cancel,
        tasks: vec![listener_task, pipeline_task],
        grace: settings.shutdown_grace,
    })
}

impl Daemon {
    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.pool
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
