//! The command line: one flag per setting, each also read from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use milo_workers::config::{BotHealthSettings, Settings, SlotRecoverySettings};
use milo_workers::daemon::{self, Options};
use milo_workers::pipeline::Batch;
use milo_workers::platform::coolify::{self, CoolifyConfigError};
use milo_workers::platform::{CoolifyPlatform, CoolifySettings, Platform, SimulatedPlatform};
use milo_workers::store::Trigger;
use milo_workers::workers::{BotHealth, SlotRecovery, Worker};
use milo_workers::{db, fleet, shutdown};
use serde_json::json;

use crate::demo;

#[derive(Parser)]
#[command(
    name = "milo-workers",
    version,
    about = "Recovers milo's bot pool slots and silent bots"
)]
pub struct Cli {
    /// PostgreSQL connection string of milo's database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        global = true,
        hide_env_values = true
    )]
    database_url: String,

    /// Log format: `text` (the default on a terminal) or `json`, one object per line (the
    /// default otherwise).
    #[arg(long, env = "MILO_WORKERS_LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the worker's migrations (its schema and triggers); safe to repeat.
    Migrate,
    /// Run the daemon until SIGTERM or Ctrl-C.
    Run(RunArgs),
    /// Run one full sweep of both workers, print the counts as JSON, exit.
    Sweep(SweepArgs),
    /// Show the fleet at a glance: statuses, what the workers would act on now and why, the
    /// last actions, and whether a daemon is listening.
    Status(StatusArgs),
    /// Show the workers at work on a scratch database `milo_workers_demo`.
    Demo(demo::DemoArgs),
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    workers: WorkerArgs,
    /// Skip the sweep that normally follows the first subscription.
    #[arg(long, env = "MILO_WORKERS_NO_SWEEP_ON_START")]
    no_sweep_on_start: bool,
    /// Do not apply migrations at start.
    #[arg(long, env = "MILO_WORKERS_NO_MIGRATE")]
    no_migrate: bool,
    /// Serve /metrics, /healthz and /readyz on this address; empty disables.
    #[arg(long, env = "MILO_WORKERS_HTTP_LISTEN", default_value = "127.0.0.1:9187",
          value_parser = listen_address)]
    http_listen: ListenAddress,
}

/// `--http-listen`: an address, or nothing.
#[derive(Clone, Copy)]
struct ListenAddress(Option<SocketAddr>);

fn listen_address(text: &str) -> Result<ListenAddress, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(ListenAddress(None));
    }
    text.parse()
        .map(|addr| ListenAddress(Some(addr)))
        .map_err(|_| "expected IP:PORT, like 127.0.0.1:9187 or [::]:9187, or empty".into())
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    thresholds: ThresholdArgs,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SweepArgs {
    #[command(flatten)]
    workers: WorkerArgs,
    /// Do not apply migrations first.
    #[arg(long, env = "MILO_WORKERS_NO_MIGRATE")]
    no_migrate: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PlatformKind {
    /// In memory, with `--simulated-latency` and `--simulated-failure-rate`.
    Simulated,
    /// Coolify's HTTP API: `--coolify-api-url` and a token (see `--coolify-api-token-file`).
    Coolify,
}

/// Platform and tuning, shared by `run` and `sweep`.
#[derive(Args, Clone)]
pub struct WorkerArgs {
    /// Where slots' applications run. Required: there is no silent default.
    #[arg(long, env = "MILO_WORKERS_PLATFORM", value_enum)]
    pub platform: PlatformKind,
    /// Full sweep period; 0 disables the tick.
    #[arg(long, env = "MILO_WORKERS_SWEEP_INTERVAL", default_value = "5m", value_parser = duration)]
    pub sweep_interval: Duration,
    /// Changes within this window after a run are coalesced into the next one.
    #[arg(long, env = "MILO_WORKERS_DEBOUNCE", default_value = "100ms", value_parser = duration)]
    pub debounce: Duration,
    /// Longest a change waits for its run.
    #[arg(long, env = "MILO_WORKERS_MAX_WAIT", default_value = "1s", value_parser = duration)]
    pub max_wait: Duration,
    #[command(flatten)]
    pub thresholds: ThresholdArgs,
    /// Waits before the 1st, 2nd, ... retry of a failed recovery; the last one repeats.
    #[arg(long, env = "MILO_WORKERS_RETRY_BACKOFF", default_value = "30s,2m,5m",
          value_delimiter = ',', value_parser = duration)]
    pub retry_backoff: Vec<Duration>,
    /// Most bots one run may mark FATAL; reaching it is logged as an error.
    #[arg(long, env = "MILO_WORKERS_MAX_FATAL_PER_RUN", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_fatal_per_run: u32,
    /// Timeout of one platform call.
    #[arg(long, env = "MILO_WORKERS_PLATFORM_TIMEOUT", default_value = "30s",
          value_parser = positive_duration)]
    pub platform_timeout: Duration,
    /// Platform calls in flight at once.
    #[arg(long, env = "MILO_WORKERS_PLATFORM_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub platform_concurrency: u16,
    /// How long a stop waits for runs in flight.
    #[arg(long, env = "MILO_WORKERS_SHUTDOWN_GRACE", default_value = "30s",
          value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Simulated platform: latency of every call.
    #[arg(long, env = "MILO_WORKERS_SIMULATED_LATENCY", default_value = "0ms",
          value_parser = duration)]
    pub simulated_latency: Duration,
    /// Simulated platform: probability that a call fails, 0 to 1.
    #[arg(long, env = "MILO_WORKERS_SIMULATED_FAILURE_RATE", default_value_t = 0.0,
          value_parser = probability)]
    pub simulated_failure_rate: f64,
    /// Coolify: base URL of the API, e.g. https://coolify.example.com/api/v1.
    #[arg(long, env = "MILO_WORKERS_COOLIFY_API_URL")]
    pub coolify_api_url: Option<String>,
    /// Coolify: the API token. Prefer the environment variable or a token file: a value given
    /// as a flag shows in the process list.
    #[arg(long, env = "MILO_WORKERS_COOLIFY_API_TOKEN", hide_env_values = true)]
    pub coolify_api_token: Option<String>,
    /// Coolify: a file holding the API token (surrounding whitespace is ignored).
    #[arg(long, env = "MILO_WORKERS_COOLIFY_API_TOKEN_FILE")]
    pub coolify_api_token_file: Option<PathBuf>,
}

/// When a row needs a worker; shared by `run`, `sweep` and `status`.
#[derive(Args, Clone)]
pub struct ThresholdArgs {
    /// An active bot silent for longer is marked FATAL.
    #[arg(long, env = "MILO_WORKERS_HEARTBEAT_TIMEOUT", default_value = "10m",
          value_parser = positive_duration)]
    pub heartbeat_timeout: Duration,
    /// A slot deploying for longer is recovered.
    #[arg(long, env = "MILO_WORKERS_DEPLOY_TIMEOUT", default_value = "15m",
          value_parser = positive_duration)]
    pub deploy_timeout: Duration,
    /// A bot that heartbeated within this window keeps its deploying slot.
    #[arg(long, env = "MILO_WORKERS_HEARTBEAT_FRESHNESS", default_value = "5m",
          value_parser = positive_duration)]
    pub heartbeat_freshness: Duration,
    /// Failed recoveries before a slot is deleted.
    #[arg(long, env = "MILO_WORKERS_MAX_RECOVERY_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub max_recovery_attempts: i32,
}

impl ThresholdArgs {
    pub fn slots(&self) -> SlotRecoverySettings {
        SlotRecoverySettings {
            deploy_timeout: self.deploy_timeout,
            heartbeat_freshness: self.heartbeat_freshness,
            max_recovery_attempts: self.max_recovery_attempts,
            ..SlotRecoverySettings::default()
        }
    }

    pub fn bots(&self) -> BotHealthSettings {
        BotHealthSettings {
            heartbeat_timeout: self.heartbeat_timeout,
            ..BotHealthSettings::default()
        }
    }
}

/// A duration with units; `0` alone means zero (for the settings where zero turns a thing
/// off or down to nothing: the tick, debouncing, waits).
fn duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text).map_err(|e| format!("{e} (use a duration like 100ms, 30s, 5m)"))
}

/// A duration that must be more than zero: a zero timeout would, say, mark every bot FATAL
/// at once, which is never what `0` was meant to say.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        zero if zero.is_zero() => Err("must be more than zero".into()),
        positive => Ok(positive),
    }
}

fn probability(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("must be a number from 0 to 1".into()),
    }
}

impl WorkerArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            sweep_interval: self.sweep_interval,
            debounce: self.debounce,
            max_wait: self.max_wait,
            slots: SlotRecoverySettings {
                retry_backoff: self.retry_backoff.clone(),
                ..self.thresholds.slots()
            },
            bots: BotHealthSettings {
                max_fatal_per_run: self.max_fatal_per_run as usize,
                ..self.thresholds.bots()
            },
            platform_timeout: self.platform_timeout,
            platform_concurrency: self.platform_concurrency.into(),
            shutdown_grace: self.shutdown_grace,
            ..Settings::default()
        }
    }

    /// The chosen adapter, with its settings checked: a missing or invalid one is an error
    /// that names it, before anything else starts.
    pub fn platform(&self) -> anyhow::Result<Arc<dyn Platform>> {
        Ok(match self.platform {
            PlatformKind::Simulated => Arc::new(SimulatedPlatform::new(
                self.simulated_latency,
                self.simulated_failure_rate,
            )),
            PlatformKind::Coolify => Arc::new(self.coolify().context("--platform coolify")?),
        })
    }

    fn coolify(&self) -> Result<CoolifyPlatform, CoolifyConfigError> {
        let url = self.coolify_api_url.as_deref().unwrap_or_default();
        if url.trim().is_empty() {
            return Err(CoolifyConfigError::MissingUrl);
        }
        let token = coolify::resolve_token(
            self.coolify_api_token.as_deref(),
            self.coolify_api_token_file.as_deref(),
        )?;
        CoolifyPlatform::new(CoolifySettings::new(url, token, self.platform_timeout))
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let url = cli.database_url;
    match cli.command {
        Command::Migrate => {
            let pool = daemon::pool(&url, &Settings::default())?;
            let applied = daemon::migrate(&pool)
                .await
                .with_context(|| format!("migrating {}", db::redact_url(&url)))?;
            tracing::info!(applied, "schema is current");
            Ok(())
        }
        Command::Run(args) => {
            let platform = args.workers.platform()?;
            let mut settings = args.workers.settings();
            settings.sweep_on_start = !args.no_sweep_on_start;
            let mut options = Options::new(&url, settings, platform);
            options.migrate = !args.no_migrate;
            options.http_listen = args.http_listen.0;
            let daemon = daemon::start(options)
                .await
                .with_context(|| format!("starting against {}", db::redact_url(&url)))?;
            shutdown::signal().await;
            daemon.stop().await;
            Ok(())
        }
        Command::Sweep(args) => sweep(&url, args).await,
        Command::Status(args) => status(&url, args).await,
        Command::Demo(args) => demo::run(&url, args).await,
    }
}

async fn sweep(url: &str, args: SweepArgs) -> anyhow::Result<()> {
    let platform = args.workers.platform()?;
    let mut settings = args.workers.settings();
    // An operator asking for a sweep wants the current verdict; the outage grace guards the
    // daemon's automatic runs (see `BotHealth`).
    settings.bots.outage_grace = false;
    let pool = daemon::pool(url, &settings)?;
    if !args.no_migrate {
        daemon::migrate(&pool).await.context("migrating")?;
    }
    let context = daemon::context(pool, &settings, platform);
    let batch = Batch::sweep(Trigger::Manual);
    let slots = SlotRecovery::new(context.clone(), settings.slots.clone())
        .run(&batch)
        .await?;
    let bots = BotHealth::new(context, settings.bots.clone())
        .run(&batch)
        .await?;
    println!("{}", json!({ "slot_recovery": slots, "bot_health": bots }));
    Ok(())
}

async fn status(url: &str, args: StatusArgs) -> anyhow::Result<()> {
    let pool = daemon::pool(url, &Settings::default())?;
    let client = pool
        .get()
        .await
        .with_context(|| format!("connecting to {}", db::redact_url(url)))?;
    let report = fleet::report(&client, &args.thresholds.slots(), &args.thresholds.bots())
        .await
        .context("reading the fleet (has `migrate` been run?)")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
