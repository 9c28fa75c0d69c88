//! Detection delay of silent bots: how long after its deadline (last heartbeat + heartbeat
//! timeout) a bot whose heartbeats stop is marked FATAL.
//!
//! Two identical fleets in two databases, in the same run, with the same random heartbeat
//! stops: one watched by the daemon (deadlines, tick at five minutes), one by the polling
//! design, a full BotHealth sweep on a fixed tick and nothing else (at 10 s, so that the run
//! ends in about a minute; the five-minute tick's delay follows from its phase, uniform over
//! the interval, and is given analytically beside it).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use milo_workers::config::Settings;
use milo_workers::daemon::{self, Options};
use milo_workers::pipeline::Batch;
use milo_workers::platform::SimulatedPlatform;
use milo_workers::store::Trigger;
use milo_workers::workers::{BotHealth, Worker};
use rand::Rng;
use tokio_postgres::Client;

const TIMEOUT: Duration = Duration::from_secs(3);
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
const POLL_EVERY: Duration = Duration::from_secs(10);

fn main() {
    runtime().block_on(run());
}

async fn run() {
    print_header("Detection delay of silent bots");
    let bots: i32 = if short() { 100 } else { 400 };
    let last_stop = Duration::from_secs(if short() { 10 } else { 20 });

    let watched = BenchDb::create("detect_deadline").await;
    let polled = BenchDb::create("detect_tick").await;
    let (watched_client, polled_client) = (watched.client().await, polled.client().await);
    for client in [&watched_client, &polled_client] {
        client
            .execute(
                "INSERT INTO bots (status, last_heartbeat)
                 SELECT 'IN_CALL', timezone('UTC', now()) FROM generate_series(1, $1::int)",
                &[&bots],
            )
            .await
            .expect("seed bots");
    }

    let mut settings = Settings {
        sweep_interval: Duration::from_secs(300),
        ..Settings::default()
    };
    settings.bots.heartbeat_timeout = TIMEOUT;
    let platform = Arc::new(SimulatedPlatform::new(Duration::ZERO, 0.0));
    let mut options = Options::new(&watched.url, settings.clone(), platform.clone());
    options.migrate = false;
    let daemon = daemon::start(options).await.expect("daemon starts");

    let pool = daemon::pool(&polled.url, &settings).expect("pool");
    let poller = BotHealth::new(
        daemon::context(pool, &settings, platform),
        settings.bots.clone(),
    );
    let polling = tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_EVERY);
        loop {
            tick.tick().await;
            poller
                .run(&Batch::sweep(Trigger::Tick))
                .await
                .expect("poll sweep");
        }
    });

    // Each bot stops at a random moment; until then both fleets heartbeat together.
    let mut rng = rand::thread_rng();
    let stops: Vec<Duration> = (0..bots)
        .map(|_| last_stop.mul_f64(rng.gen_range(0.05..1.0)))
        .collect();
    let started = tokio::time::Instant::now();
    loop {
        let elapsed = started.elapsed();
        let live: Vec<i32> = (0..bots)
            .filter(|&i| stops[i as usize] > elapsed)
            .map(|i| i + 1)
            .collect();
        if live.is_empty() {
            break;
        }
        for client in [&watched_client, &polled_client] {
            client
                .execute(
                    "UPDATE bots SET last_heartbeat = timezone('UTC', now()) WHERE id = ANY($1)",
                    &[&live],
                )
                .await
                .expect("heartbeat");
        }
        tokio::time::sleep(HEARTBEAT_EVERY).await;
    }
    eprintln!(
        "all heartbeats stopped after {:.1} s; waiting for detection",
        ms(started.elapsed()) / 1000.0
    );

    let limit = TIMEOUT + POLL_EVERY * 2 + Duration::from_secs(10);
    within(limit, "every silent bot to be marked FATAL", async {
        while fatal(&watched_client).await < bots as i64
            || fatal(&polled_client).await < bots as i64
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    polling.abort();
    daemon.stop().await;

    let deadline_path = delays(&watched_client).await;
    let tick_path = delays(&polled_client).await;
    println!(
        "{bots} bots, heartbeat every {HEARTBEAT_EVERY:?}, timeout {TIMEOUT:?}, \
         stops uniform over {last_stop:?}"
    );
    println!("delay = moment marked FATAL (audit `at`) - (last heartbeat + timeout)\n");
    println!("| detection | p50 | p99 | max | early (< 0) |");
    println!("|---|---|---|---|---|");
    row("deadlines (daemon, tick 5 min)", &deadline_path);
    row(
        &format!("tick only, every {POLL_EVERY:?} (measured)"),
        &tick_path,
    );
    println!(
        "| tick only, every 5 min (phase uniform: analytic) | {} | {} | {} | 0 |",
        human_ms(150_000.0),
        human_ms(297_000.0),
        human_ms(300_000.0)
    );
    let ratio = percentile(&tick_path, 0.5) / percentile(&deadline_path, 0.5).max(0.001);
    println!("\np50 ratio, measured tick ({POLL_EVERY:?}) / deadlines: {ratio:.0}x");
}

async fn fatal(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM bots WHERE status = 'FATAL'", &[])
        .await
        .expect("count")
        .get(0)
}

/// Detection delays in ms, sorted.
async fn delays(client: &Client) -> Vec<f64> {
    let rows = client
        .query(
            "SELECT (extract(epoch FROM a.at - (b.last_heartbeat AT TIME ZONE 'UTC')) * 1000
                     - $1::float8)::float8
             FROM milo_workers.audit_log a JOIN bots b ON b.id = a.bot_id
             WHERE a.action = 'bot_marked_fatal'",
            &[&(ms(TIMEOUT))],
        )
        .await
        .expect("delays");
    let mut delays: Vec<f64> = rows.iter().map(|row| row.get(0)).collect();
    delays.sort_by(f64::total_cmp);
    delays
}

fn row(label: &str, sorted: &[f64]) {
    let early = sorted.iter().filter(|&&d| d < 0.0).count();
    println!(
        "| {label} | {} | {} | {} | {early} |",
        human_ms(percentile(sorted, 0.5)),
        human_ms(percentile(sorted, 0.99)),
        human_ms(*sorted.last().unwrap_or(&f64::NAN))
    );
}
