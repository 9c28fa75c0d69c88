//! `milo-workers demo`: a scratch database, a simulated fleet that breaks in the usual ways,
//! and the workers repairing it, printed as it happens.
//!
//! A stand-in for milo deploys bots into slots, heartbeats the live ones every second, and
//! now and then finishes a call, breaks a slot (`status = 'error'`, as milo does when a
//! container dies) or lets a bot crash silently (its heartbeats stop). The daemon runs with
//! short timeouts so that everything happens within the demo's run time.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use milo_workers::config::{BotHealthSettings, Settings, SlotRecoverySettings};
use milo_workers::daemon::{self, Options};
use milo_workers::db;
use milo_workers::platform::SimulatedPlatform;
use rand::seq::SliceRandom;
use rand::Rng;
use tokio_postgres::Client;

const DEMO_DATABASE: &str = "milo_workers_demo";

#[derive(Args)]
pub struct DemoArgs {
    /// How long the demo runs.
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Slots in the pool.
    #[arg(long, default_value_t = 24)]
    slots: u32,
    /// Simulated platform failure rate, 0 to 1: failed recoveries are retried, and a slot
    /// that fails three times is deleted.
    #[arg(long, default_value_t = 0.15)]
    failure_rate: f64,
    /// Serve /metrics, /healthz and /readyz here while the demo runs; empty turns it off.
    #[arg(long, default_value = "127.0.0.1:9187")]
    http_listen: String,
}

pub async fn run(server_url: &str, args: DemoArgs) -> anyhow::Result<()> {
    let url = db::with_database(server_url, DEMO_DATABASE);
    recreate_database(server_url).await?;

    // The production tick (five minutes): everything below happens through notifications
    // and deadlines, within seconds, long before any tick.
    let settings = Settings {
        sweep_interval: Duration::from_secs(300),
        slots: SlotRecoverySettings {
            deploy_timeout: Duration::from_secs(6),
            heartbeat_freshness: Duration::from_secs(3),
            max_recovery_attempts: 3,
            retry_backoff: vec![Duration::from_millis(500), Duration::from_secs(1)],
        },
        bots: BotHealthSettings {
            heartbeat_timeout: Duration::from_secs(3),
            ..BotHealthSettings::default()
        },
        platform_timeout: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(5),
        ..Settings::default()
    };
    let platform = SimulatedPlatform::new(Duration::from_millis(20), args.failure_rate);
    let mut options = Options::new(&url, settings, std::sync::Arc::new(platform));
    options.http_listen = match args.http_listen.trim() {
        "" => None,
        addr => Some(
            addr.parse()
                .context("--http-listen: expected IP:PORT or empty")?,
        ),
    };
    let daemon = daemon::start(options)
        .await
        .context("starting the daemon on the demo database")?;
    if let Some(addr) = daemon.http_addr() {
        println!("demo: metrics on http://{addr}/metrics, readiness on http://{addr}/readyz");
    }

    let milo = connect(&url).await?;
    seed(&milo, args.slots).await?;
    println!(
        "demo: {} slots on database {DEMO_DATABASE}; heartbeat timeout 3s, deploy timeout 6s, \
         tick 5m, platform failure rate {:.0}%",
        args.slots,
        args.failure_rate * 100.0
    );
    println!(
        "{:>10}  {:<22} {:<9} {:>5} {:>5}  reason",
        "latency", "action", "trigger", "slot", "bot"
    );

    let watcher = connect(&url).await?;
    let fleet = tokio::spawn(simulate_fleet(milo));
    let deadline = tokio::time::sleep(args.duration);
    tokio::pin!(deadline);
    let mut last_seen = 0i64;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = ticker.tick() => last_seen = print_new_actions(&watcher, last_seen).await?,
        }
    }
    fleet.abort();
    daemon.stop().await;
    print_new_actions(&watcher, last_seen).await?;
    print_summary(&watcher).await
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = db::connect_config(url, "milo-workers-demo")?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", db::redact_url(url)))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn recreate_database(server_url: &str) -> anyhow::Result<()> {
    let admin = connect(server_url).await?;
    // Two statements: DROP DATABASE cannot share a (implicit) transaction with anything.
    for statement in [
        format!("DROP DATABASE IF EXISTS {DEMO_DATABASE} WITH (FORCE)"),
        format!("CREATE DATABASE {DEMO_DATABASE}"),
    ] {
        admin
            .batch_execute(&statement)
            .await
            .context("recreating the demo database")?;
    }
    Ok(())
}

/// milo's tables exist once the daemon migrated; the pool starts idle.
async fn seed(milo: &Client, slots: u32) -> anyhow::Result<()> {
    milo.execute(
        "INSERT INTO bot_pool_slots (coolify_service_uuid, slot_name)
         SELECT 'app-' || n, 'slot-' || n FROM generate_series(1, $1::int) n",
        &[&(slots as i32)],
    )
    .await?;
    Ok(())
}

/// Plays milo: deploys, heartbeats, finishes and breaks things.
async fn simulate_fleet(milo: Client) -> anyhow::Result<()> {
    let mut crashed: HashSet<i32> = HashSet::new();
    let mut step = tokio::time::interval(Duration::from_millis(250));
    let mut round = 0u64;
    loop {
        step.tick().await;
        round += 1;

        // Deploy a new bot into an idle slot; it reaches the call a moment later.
        milo.batch_execute(
            "WITH slot AS (SELECT id FROM bot_pool_slots WHERE status = 'idle'
                           ORDER BY random() LIMIT 1),
                  bot AS (INSERT INTO bots (status, created_at)
                          SELECT 'DEPLOYING', timezone('UTC', now()) FROM slot RETURNING id)
             UPDATE bot_pool_slots s SET status = 'deploying', assigned_bot_id = bot.id,
                    last_used_at = timezone('UTC', now())
             FROM slot, bot WHERE s.id = slot.id;
             WITH ready AS (SELECT b.id FROM bots b
                            JOIN bot_pool_slots s ON s.assigned_bot_id = b.id
                            WHERE b.status = 'DEPLOYING' AND s.status = 'deploying'
                              AND s.last_used_at < timezone('UTC', now()) - interval '1 second')
             UPDATE bots SET status = 'IN_CALL', last_heartbeat = timezone('UTC', now())
             WHERE id IN (SELECT id FROM ready);
             UPDATE bot_pool_slots s SET status = 'busy' FROM bots b
             WHERE s.assigned_bot_id = b.id AND s.status = 'deploying' AND b.status = 'IN_CALL';",
        )
        .await?;

        // Heartbeats of every live bot, once a second.
        if round % 4 == 0 {
            let crashed_ids: Vec<i32> = crashed.iter().copied().collect();
            milo.execute(
                "UPDATE bots SET last_heartbeat = timezone('UTC', now())
                 WHERE status IN ('JOINING_CALL', 'IN_WAITING_ROOM', 'IN_CALL', 'LEAVING')
                   AND NOT (id = ANY($1))",
                &[&crashed_ids],
            )
            .await?;
        }

        let busy: Vec<(i32, i32)> = milo
            .query(
                "SELECT id, assigned_bot_id FROM bot_pool_slots
                 WHERE status = 'busy' AND assigned_bot_id IS NOT NULL",
                &[],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let (pick, dice) = {
            let mut rng = rand::thread_rng();
            (busy.choose(&mut rng).copied(), rng.gen_range(0..12))
        };
        let Some((slot, bot)) = pick else { continue };
        match dice {
            // The container dies: milo marks the slot failed.
            0 => {
                milo.execute(
                    "UPDATE bot_pool_slots SET status = 'error',
                            error_message = 'container exited with code 137'
                     WHERE id = $1",
                    &[&slot],
                )
                .await?;
            }
            // The bot hangs: its heartbeats stop, nobody announces anything.
            1 => {
                crashed.insert(bot);
            }
            // The call ends normally.
            2 | 3 => {
                milo.batch_execute(&format!(
                    "UPDATE bots SET status = 'DONE' WHERE id = {bot};
                     UPDATE bot_pool_slots SET status = 'idle', assigned_bot_id = NULL
                     WHERE id = {slot};"
                ))
                .await?;
            }
            _ => {}
        }
    }
}

async fn print_new_actions(watcher: &Client, after: i64) -> anyhow::Result<i64> {
    let rows = watcher
        .query(
            "SELECT id, action, trigger, slot_id, bot_id, reason,
                    (extract(epoch FROM at - (status_since AT TIME ZONE 'UTC')) * 1000)::float8
             FROM milo_workers.audit_log WHERE id > $1 ORDER BY id",
            &[&after],
        )
        .await?;
    let mut last = after;
    for row in &rows {
        last = row.get(0);
        let action: &str = row.get(1);
        let latency = match row.get::<_, Option<f64>>(6) {
            Some(ms) if ms < 1000.0 => format!("{ms:.1} ms"),
            Some(ms) => format!("{:.2} s", ms / 1000.0),
            None => "-".into(),
        };
        let id = |i: usize| {
            row.get::<_, Option<i32>>(i)
                .map_or("-".into(), |v| v.to_string())
        };
        let reason: &str = row.get(5);
        println!(
            "{latency:>10}  {action:<22} {:<9} {:>5} {:>5}  {reason}",
            row.get::<_, &str>(2),
            id(3),
            id(4)
        );
    }
    Ok(last)
}

async fn print_summary(watcher: &Client) -> anyhow::Result<()> {
    let rows = watcher
        .query(
            "SELECT action, trigger, count(*),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY
                        extract(epoch FROM at - (status_since AT TIME ZONE 'UTC')) * 1000)::float8,
                    max(extract(epoch FROM at - (status_since AT TIME ZONE 'UTC')) * 1000)::float8
             FROM milo_workers.audit_log GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?;
    println!("\nsummary (latency: from the status change, or for a silent bot its last heartbeat)");
    println!(
        "{:<22} {:<9} {:>6} {:>12} {:>12}",
        "action", "trigger", "count", "p50", "max"
    );
    for row in &rows {
        let ms = |i: usize| {
            row.get::<_, Option<f64>>(i)
                .map_or("-".into(), |v| format!("{v:.1} ms"))
        };
        println!(
            "{:<22} {:<9} {:>6} {:>12} {:>12}",
            row.get::<_, &str>(0),
            row.get::<_, &str>(1),
            row.get::<_, i64>(2),
            ms(3),
            ms(4)
        );
    }
    Ok(())
}
