//! Table 2 and the picture: error-slot recovery latency, from the commit of
//! `status = 'error'` to the slot being `idle` again.
//!
//! Fleet: 10,000 bots and slots (healthy, 1% busy). A failure is a slot `deploying` with its
//! bot `DEPLOYING`, set to `error` by one autocommitted UPDATE.
//!
//! - Notification path, measured: the real daemon (`milo_workers::daemon::start`, tick
//!   disabled, no start-up sweep, default debounce 100 ms and concurrency 8). A LISTEN
//!   connection of the bench's own sees the worker's commit as the trigger's `<id>:idle`
//!   notification. Latency = that notification's arrival − the instant just before the
//!   failing UPDATE was sent, so it is an upper bound (it includes the UPDATE itself and the
//!   notification's delivery). Isolated failures are spaced more than the debounce apart.
//! - Polling, simulated: a failure waits for the next sweep, a uniform phase in the interval,
//!   and then for the row-at-a-time sweep to reach and handle it. The handling part is
//!   measured on this database with `common::poll_slots` (single failures: one real sweep per
//!   sample, with the platform latency for real; a burst: one real sweep over 1,000 failed
//!   slots at 0 ms, plus k × 200 ms for the k-th slot's sequential platform call at 200 ms).
//!   Samples are drawn by Monte Carlo with a fixed seed.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use milo_workers::config::Settings;
use milo_workers::daemon::{self, Options};
use milo_workers::platform::SimulatedPlatform;
use plotters::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::Client;

const FLEET: i32 = 10_000;
const WAIT: Duration = Duration::from_secs(120);

fn main() {
    runtime().block_on(run());
}

struct Series {
    scenario: String,
    latency: &'static str,
    path: String,
    /// Latencies in ms, sorted.
    samples: Vec<f64>,
    how: &'static str,
}

impl Series {
    fn new(scenario: &str, latency: &'static str, path: &str, how: &'static str) -> Self {
        Self {
            scenario: scenario.into(),
            latency,
            path: path.into(),
            samples: Vec::new(),
            how,
        }
    }

    fn with(mut self, mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        self.samples = samples;
        self
    }
}

async fn run() {
    let short = short();
    let singles = if short { 40 } else { 200 };
    let singles_slow = if short { 12 } else { 60 };
    let polled_singles = if short { 10 } else { 30 };
    let burst = 1000;

    let db = BenchDb::create("latency").await;
    let client = db.client().await;
    seed(&client, FLEET).await;
    let mut ids = (1..=FLEET).filter(|g| g % 100 != 25);
    let mut take = |count: usize| -> Vec<i32> { ids.by_ref().take(count).collect() };

    // Polling: the handling part, measured row at a time with no daemon running.
    eprintln!("recovery_latency: row-at-a-time handling");
    let poll_single_0 = poll_singles(&client, &take(polled_singles), Duration::ZERO).await;
    let poll_single_200 =
        poll_singles(&client, &take(polled_singles), Duration::from_millis(200)).await;
    let burst_offsets = poll_burst(&client, &take(burst)).await;

    // Notification path, measured.
    let mut measured = Vec::new();
    for (latency, label, count) in [
        (Duration::ZERO, "0 ms", singles),
        (Duration::from_millis(200), "200 ms", singles_slow),
    ] {
        eprintln!("recovery_latency: daemon, platform {label}");
        let platform = SimulatedPlatform::new(latency, 0.0);
        let daemon = start_daemon(&db.url, &platform).await;
        let (_observer, mut arrivals) = observe(&db.url, "milo_workers_slots").await;
        let single = notify_singles(&client, &mut arrivals, &take(count)).await;
        // Let the last run's debounce window close.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let all = notify_burst(&client, &mut arrivals, &take(burst)).await;
        eprintln!(
            "  burst of {burst} done in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        assert!(daemon.stop().await, "daemon stops within its grace");
        measured.push((label, single, all));
    }

    // Polling, simulated.
    let mut rng = StdRng::seed_from_u64(20);
    let mut rows: Vec<Series> = Vec::new();
    for (label, single, all) in measured {
        let slow = label == "200 ms";
        let handling = if slow {
            &poll_single_200
        } else {
            &poll_single_0
        };
        let offsets: Vec<f64> = burst_offsets
            .iter()
            .enumerate()
            .map(|(k, offset)| offset + if slow { 200.0 * (k + 1) as f64 } else { 0.0 })
            .collect();
        let how_notify = "measured";
        rows.push(Series::new("isolated failure", label, "notification", how_notify).with(single));
        for minutes in [1.0, 5.0] {
            let interval = minutes * 60_000.0;
            let samples = (0..20_000)
                .map(|_| rng.gen::<f64>() * interval + handling[rng.gen_range(0..handling.len())])
                .collect();
            rows.push(
                Series::new(
                    "isolated failure",
                    label,
                    &format!("polling every {minutes} min"),
                    "simulated",
                )
                .with(samples),
            );
        }
        rows.push(
            Series::new("burst of 1,000", label, "notification", how_notify).with(all.clone()),
        );
        for minutes in [1.0, 5.0] {
            let interval = minutes * 60_000.0;
            let mut samples = Vec::with_capacity(200 * offsets.len());
            for _ in 0..200 {
                let phase = rng.gen::<f64>() * interval;
                samples.extend(offsets.iter().map(|offset| phase + offset));
            }
            rows.push(
                Series::new(
                    "burst of 1,000",
                    label,
                    &format!("polling every {minutes} min"),
                    "simulated",
                )
                .with(samples),
            );
        }
    }

    print_header("Table 2: error-slot recovery latency (commit of 'error' → slot idle)");
    println!(
        "Fleet {} bots and slots. Polling handling measured row at a time: isolated \
         failure p50 {} at 0 ms, {} at 200 ms; burst of 1,000 at 0 ms: last slot after {}.\n",
        thousands(f64::from(FLEET)),
        human_ms(median(&poll_single_0)),
        human_ms(median(&poll_single_200)),
        human_ms(burst_offsets.last().copied().unwrap_or(f64::NAN)),
    );
    println!(
        "| failure | platform | path | how | samples | p50 | p99 | max | p99 ÷ notification |"
    );
    println!("|---|---|---|---|---:|---:|---:|---:|---:|");
    let mut notify_p99 = HashMap::new();
    for row in &rows {
        let p99 = percentile(&row.samples, 0.99);
        if row.path == "notification" {
            notify_p99.insert((row.scenario.clone(), row.latency), p99);
        }
        let reference = notify_p99[&(row.scenario.clone(), row.latency)];
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.latency,
            if row.path == "notification" {
                "**notification**".to_owned()
            } else {
                row.path.clone()
            },
            row.how,
            thousands(row.samples.len() as f64),
            human_ms(percentile(&row.samples, 0.5)),
            human_ms(p99),
            human_ms(*row.samples.last().unwrap()),
            if row.path == "notification" {
                "1".to_owned()
            } else {
                format!("{}×", thousands(p99 / reference))
            }
        );
    }
    let path = svg_path();
    draw(&rows, &path);
    println!("\nPicture: {}", path.display());
    drop(client);
    drop(db);
}

async fn start_daemon(url: &str, platform: &SimulatedPlatform) -> daemon::Daemon {
    let settings = Settings {
        sweep_interval: Duration::ZERO,
        sweep_on_start: false,
        ..Settings::default()
    };
    let mut options = Options::new(url, settings, Arc::new(platform.clone()));
    options.migrate = false;
    let daemon = daemon::start(options).await.expect("daemon starts");
    let listener = daemon.listener.clone();
    within(WAIT, "the listener subscribes", async {
        while !listener.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    daemon
}

/// Puts slots (and their bots) in a deploying state that is not yet a candidate.
async fn prepare(client: &Client, ids: &[i32]) {
    client
        .execute(
            "UPDATE bots SET status = 'DEPLOYING', last_heartbeat = NULL,
                 deployment_error = NULL
             WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("prepare bots");
    client
        .execute(
            "UPDATE bot_pool_slots
             SET status = 'deploying', assigned_bot_id = id,
                 last_used_at = timezone('UTC', now())
             WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("prepare slots");
}

async fn fail(client: &Client, ids: &[i32]) {
    let failed = client
        .execute(
            "UPDATE bot_pool_slots SET status = 'error', error_message = 'container exited'
             WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("fail slots");
    assert_eq!(failed as usize, ids.len());
}

/// Row-at-a-time handling of one failure per sweep: ms from sweep start to the slot idle.
async fn poll_singles(client: &Client, ids: &[i32], latency: Duration) -> Vec<f64> {
    let platform = SimulatedPlatform::new(latency, 0.0);
    let mut handling = Vec::new();
    for &id in ids {
        prepare(client, &[id]).await;
        fail(client, &[id]).await;
        let polled = poll_slots(client, &platform).await;
        assert_eq!(polled.done.len(), 1);
        handling.push(ms(polled.done[0].1));
    }
    handling
}

/// Row-at-a-time handling of a burst at 0 ms: ms from sweep start to each slot idle, in the
/// order handled.
async fn poll_burst(client: &Client, ids: &[i32]) -> Vec<f64> {
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    prepare(client, ids).await;
    fail(client, ids).await;
    let polled = poll_slots(client, &platform).await;
    assert_eq!(polled.done.len(), ids.len());
    polled.done.iter().map(|(_, at)| ms(*at)).collect()
}

async fn drain(arrivals: &mut UnboundedReceiver<Arrival>) {
    while arrivals.try_recv().is_ok() {}
}

/// Waits until every id reported idle; returns the arrival instants by id.
async fn wait_idle(
    arrivals: &mut UnboundedReceiver<Arrival>,
    ids: &[i32],
) -> HashMap<i32, Instant> {
    let mut waiting: HashMap<String, i32> =
        ids.iter().map(|id| (format!("{id}:idle"), *id)).collect();
    let mut done = HashMap::new();
    within(WAIT, "slots to be idle again", async {
        while !waiting.is_empty() {
            let arrival = arrivals.recv().await.expect("observer alive");
            if let Some(id) = waiting.remove(&arrival.payload) {
                done.insert(id, arrival.at);
            }
        }
    })
    .await;
    done
}

async fn notify_singles(
    client: &Client,
    arrivals: &mut UnboundedReceiver<Arrival>,
    ids: &[i32],
) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut latencies = Vec::new();
    for &id in ids {
        prepare(client, &[id]).await;
        // Isolated: well past the debounce window of the runs the preparation caused.
        let gap = 250 + rng.gen_range(0..50);
        tokio::time::sleep(Duration::from_millis(gap)).await;
        drain(arrivals).await;
        let sent = Instant::now();
        fail(client, &[id]).await;
        let done = wait_idle(arrivals, &[id]).await;
        latencies.push(ms(done[&id] - sent));
    }
    latencies
}

async fn notify_burst(
    client: &Client,
    arrivals: &mut UnboundedReceiver<Arrival>,
    ids: &[i32],
) -> Vec<f64> {
    prepare(client, ids).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drain(arrivals).await;
    let sent = Instant::now();
    fail(client, ids).await;
    let done = wait_idle(arrivals, ids).await;
    done.values().map(|at| ms(*at - sent)).collect()
}

fn svg_path() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if short() {
        root.join("target").join("recovery-latency-short.svg")
    } else {
        root.join("BENCHMARKS-recovery-latency.svg")
    }
}

/// Cumulative distributions of the latencies, log-scale time axis.
fn draw(rows: &[Series], path: &PathBuf) {
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(23, 190, 207),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    let picked: Vec<&Series> = [
        ("isolated failure", "0 ms", "notification"),
        ("isolated failure", "200 ms", "notification"),
        ("burst of 1,000", "200 ms", "notification"),
        ("isolated failure", "0 ms", "polling every 1 min"),
        ("isolated failure", "0 ms", "polling every 5 min"),
        ("burst of 1,000", "200 ms", "polling every 5 min"),
    ]
    .iter()
    .filter_map(|(s, l, p)| {
        rows.iter()
            .find(|r| r.scenario == *s && r.latency == *l && r.path == *p)
    })
    .collect();

    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).expect("fill");
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Error-slot recovery latency: commit of 'error' to slot idle (CDF)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((0.5f64..1.0e6f64).log_scale(), 0f64..1f64)
        .expect("chart");
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("fraction of failed slots idle again")
        .x_label_formatter(&|v| {
            if *v >= 1000.0 {
                format!("{}s", v / 1000.0)
            } else {
                format!("{v}")
            }
        })
        .draw()
        .expect("mesh");
    for (series, color) in picked.iter().zip(palette) {
        let n = series.samples.len();
        let step = (n / 600).max(1);
        let mut points: Vec<(f64, f64)> = Vec::new();
        for i in (0..n).step_by(step).chain(std::iter::once(n - 1)) {
            let x = series.samples[i].max(0.5);
            if let Some(&(_, last_y)) = points.last() {
                points.push((x, last_y));
            }
            points.push((x, (i + 1) as f64 / n as f64));
        }
        let label = format!(
            "{}, {}, platform {} ({})",
            series.path, series.scenario, series.latency, series.how
        );
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .expect("series")
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .expect("legend");
    root.present().expect("write svg");
}
