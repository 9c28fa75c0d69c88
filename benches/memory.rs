//! Table 5: peak resident memory of the release binary (`target/release/milo-workers`, built
//! by `cargo bench` itself), read as `VmHWM` from `/proc/<pid>/status` every 5 ms until the
//! process exits.
//!
//! - `sweep --platform simulated` against a broken fleet (1% failed slots, 1% stale bots) of
//!   10,000, 100,000 and 1,000,000 bots and slots: memory must not grow with the table, as
//!   the workers page 500 rows per transaction.
//! - `run --platform simulated`: the daemon idle (no start-up sweep) for 5 s, and the daemon
//!   through its start-up sweep of the largest broken fleet.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::Client;

const BIN: &str = env!("CARGO_BIN_EXE_milo-workers");

fn main() {
    runtime().block_on(run());
}

/// A value in kB from `/proc/<pid>/status`, e.g. `VmHWM`.
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(key))?;
    line[key.len() + 1..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn spawn(url: &str, args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        // The default cap of 1,000 FATAL per run would cut the 1,000,000-row sweep short.
        .env("MILO_WORKERS_MAX_FATAL_PER_RUN", "1000000")
        // No fixed port for the metrics endpoint: other daemons may run on this machine.
        .env("MILO_WORKERS_HTTP_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start milo-workers")
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

async fn run() {
    let sizes: Vec<i32> = if short() {
        vec![10_000, 100_000]
    } else {
        vec![10_000, 100_000, 1_000_000]
    };
    let largest = *sizes.last().unwrap();
    let mut lines = Vec::new();
    let mut sweep_peaks = Vec::new();
    for &n in &sizes {
        eprintln!("memory: {n} bots and slots");
        let db = BenchDb::create(&format!("memory_{n}")).await;
        let client = db.client().await;
        seed(&client, n).await;
        break_fleet(&client).await;
        vacuum(&client).await;

        let started = Instant::now();
        let mut child = spawn(
            &db.url,
            &["sweep", "--platform", "simulated", "--no-migrate"],
        );
        let pid = child.id();
        let mut peak = 0;
        while child.try_wait().expect("wait").is_none() {
            if let Some(kb) = status_kb(pid, "VmHWM") {
                peak = peak.max(kb);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        let output = child.wait_with_output().expect("sweep output");
        assert!(output.status.success(), "sweep failed");
        assert_repaired(&client, n).await;
        let counts = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        eprintln!("  sweep: {counts}");
        sweep_peaks.push(peak);
        lines.push(format!(
            "| `sweep`, {} bots + {} slots, 2% acted on | {} | {:.2} s |",
            thousands(f64::from(n)),
            thousands(f64::from(n)),
            mib(peak),
            elapsed.as_secs_f64()
        ));

        if n == sizes[0] {
            let (peak, rss) = idle_daemon(&db.url).await;
            lines.insert(
                0,
                format!(
                    "| daemon idle 5 s ({} rows; no start-up sweep) | {} (RSS now {}) | — |",
                    thousands(f64::from(n)),
                    mib(peak),
                    mib(rss)
                ),
            );
        }
        if n == largest {
            break_fleet(&client).await;
            vacuum(&client).await;
            let (peak, rss, took) = sweeping_daemon(&db.url, &client).await;
            lines.push(format!(
                "| daemon: start-up sweep of {} + {} (broken; slots repaired, bots only \
                 examined), then 10 s | {} (RSS after {}) | slots repaired in {:.2} s |",
                thousands(f64::from(n)),
                thousands(f64::from(n)),
                mib(peak),
                mib(rss),
                took.as_secs_f64()
            ));
        }
        drop(client);
        drop(db);
    }

    print_header("Table 5: peak resident memory (VmHWM) of target/release/milo-workers");
    println!("| process | peak RSS (VmHWM) | duration |");
    println!("|---|---:|---:|");
    for line in lines {
        println!("{line}");
    }
    println!(
        "\nsweep peak, largest ÷ smallest table: {:.2}× for {}× the rows",
        *sweep_peaks.last().unwrap() as f64 / sweep_peaks[0] as f64,
        largest / sizes[0]
    );
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(40);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
}

async fn idle_daemon(url: &str) -> (u64, u64) {
    let child = spawn(
        url,
        &[
            "run",
            "--platform",
            "simulated",
            "--no-migrate",
            "--no-sweep-on-start",
        ],
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = child.id();
    let peak = status_kb(pid, "VmHWM").expect("daemon alive");
    let rss = status_kb(pid, "VmRSS").expect("daemon alive");
    stop(child);
    (peak, rss)
}

/// The daemon started on a broken fleet: its start-up (resync) sweep repairs the failed
/// slots. Its BotHealth sweep pages through every watched bot too, but marks none: for one
/// heartbeat timeout after it starts, a daemon judges no bot (its outage grace).
async fn sweeping_daemon(url: &str, client: &Client) -> (u64, u64, Duration) {
    let started = Instant::now();
    let child = spawn(url, &["run", "--platform", "simulated", "--no-migrate"]);
    let pid = child.id();
    within(Duration::from_secs(600), "the start-up sweep", async {
        loop {
            let row = client
                .query_one(
                    "SELECT count(*) FROM bot_pool_slots WHERE status = 'error'",
                    &[],
                )
                .await
                .expect("progress");
            if row.get::<_, i64>(0) == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let took = started.elapsed();
    // The BotHealth sweep follows; 10 s covers it (a full sweep of both takes less, table 1).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let peak = status_kb(pid, "VmHWM").expect("daemon alive");
    let rss = status_kb(pid, "VmRSS").expect("daemon alive");
    stop(child);
    (peak, rss, took)
}
