//! Table 4: what the worker's triggers cost milo's own writes, measured with pgbench on a
//! fleet of 100,000 bots and slots, with the triggers enabled vs disabled
//! (`ALTER TABLE ... DISABLE TRIGGER USER`, the same tables and rows, toggled between runs).
//!
//! - heartbeat: `UPDATE bots SET last_heartbeat = ... WHERE id = :id`, the commonest write.
//!   The trigger is `AFTER UPDATE OF status`, so it must not even fire: a LISTEN connection
//!   counts the notifications during the triggers-on runs, and must see none.
//! - status change: `UPDATE bots SET status = <the other of IN_CALL/IN_WAITING_ROOM>`, which
//!   fires the trigger: an upsert into `bot_status_since` and a NOTIFY, whose commit takes
//!   the cluster-wide notify lock.
//!
//! Runs alternate on/off in each round; the ratio is the median of per-round ratios.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use tokio_postgres::Client;

const FLEET: i32 = 100_000;
const CLIENTS: u32 = 4;

fn main() {
    runtime().block_on(run());
}

fn pgbench() -> PathBuf {
    let packaged = Path::new("/usr/lib/postgresql/15/bin/pgbench");
    if packaged.exists() {
        packaged.into()
    } else {
        "pgbench".into()
    }
}

async fn run() {
    let (rounds, seconds) = if short() { (2, 4) } else { (3, 10) };
    let db = BenchDb::create("triggers").await;
    let client = db.client().await;
    seed(&client, FLEET).await;
    let dir = std::env::temp_dir().join(format!("mw_bench_pgbench_{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scripts dir");
    let scripts = [
        (
            "heartbeat update",
            "\\set id random(1, 100000)\n\
             UPDATE bots SET last_heartbeat = timezone('UTC', now()) WHERE id = :id;\n",
        ),
        (
            "status change",
            "\\set id random(1, 100000)\n\
             UPDATE bots SET status = CASE WHEN status = 'IN_CALL' THEN 'IN_WAITING_ROOM' \
             ELSE 'IN_CALL' END WHERE id = :id;\n",
        ),
    ];
    let (_observer, mut arrivals) = observe(&db.url, "milo_workers_bots").await;
    let mut lines = Vec::new();
    for (name, script) in scripts {
        let file = dir.join(format!("{}.sql", name.replace(' ', "_")));
        std::fs::write(&file, script).expect("write script");
        let mut on = Vec::new();
        let mut off = Vec::new();
        let mut notified = 0usize;
        for round in 0..rounds {
            // Alternate which goes first, so a drift in machine load hits both alike.
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for triggers in order {
                set_triggers(&client, triggers).await;
                vacuum(&client).await;
                while arrivals.try_recv().is_ok() {}
                let tps = bench(&db.name, &file, seconds);
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut count = 0;
                while arrivals.try_recv().is_ok() {
                    count += 1;
                }
                eprintln!(
                    "  {name}, triggers {}: {tps:.0} tps, {count} notifications",
                    if triggers { "on" } else { "off" }
                );
                if triggers {
                    on.push(tps);
                    notified += count;
                } else {
                    off.push(tps);
                    assert_eq!(count, 0, "no trigger, no notification");
                }
            }
        }
        set_triggers(&client, true).await;
        let ratios: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
        let cost = (1.0 - median(&ratios)) * 100.0;
        lines.push(format!(
            "| {name} | {} | {} | {:.3} | {cost:+.1}% | {} |",
            thousands(median(&off)),
            thousands(median(&on)),
            median(&ratios),
            thousands(notified as f64)
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);

    print_header("Table 4: trigger cost on milo's writes (pgbench)");
    println!(
        "`pgbench -n -M prepared -c {CLIENTS} -j 2 -T {seconds}`, {rounds} rounds, random bot \
         among {}; tps are medians, the ratio is the median of per-round ratios.\n",
        thousands(f64::from(FLEET))
    );
    println!("| write | tps, no triggers | tps, triggers | ratio | cost | notifications seen |");
    println!("|---|---:|---:|---:|---:|---:|");
    for line in lines {
        println!("{line}");
    }
    drop(client);
    drop(db);
}

async fn set_triggers(client: &Client, enabled: bool) {
    let verb = if enabled { "ENABLE" } else { "DISABLE" };
    client
        .batch_execute(&format!(
            "ALTER TABLE bots {verb} TRIGGER USER; ALTER TABLE bot_pool_slots {verb} TRIGGER USER;"
        ))
        .await
        .expect("toggle triggers");
}

/// Runs pgbench; returns its tps (without initial connection time).
fn bench(database: &str, script: &Path, seconds: u32) -> f64 {
    let server: tokio_postgres::Config = server_url().parse().expect("valid url");
    let host = match server.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = server.get_ports().first().copied().unwrap_or(5432);
    let user = server.get_user().unwrap_or("postgres").to_owned();
    let output = Command::new(pgbench())
        .args(["-n", "-M", "prepared", "-j", "2"])
        .arg(format!("-c{CLIENTS}"))
        .arg(format!("-T{seconds}"))
        .arg("-f")
        .arg(script)
        .args(["-h", &host, "-p", &port.to_string(), "-U", &user, database])
        .output()
        .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgbench failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find(|line| line.starts_with("tps = "))
        .and_then(|line| line["tps = ".len()..].split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output: {stdout}"))
}
