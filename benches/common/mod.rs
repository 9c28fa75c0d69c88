//! Shared by the benchmarks: scratch databases, set-based seeding, the two baselines
//! (row-at-a-time polling and the bare set-based floor), and small statistics helpers.
//!
//! The fleet layout, for `n` bots and `n` slots where bot `g` and slot `g` belong together:
//!
//! | `g % 100` | healthy fleet                        | after [`break_fleet`]                  |
//! |-----------|--------------------------------------|----------------------------------------|
//! | 0         | bot DONE, slot idle                  | bot DEPLOYING, slot `error` holding it |
//! | 25        | bot IN_CALL, fresh heartbeat, busy   | unchanged (examined, not acted on)     |
//! | 50        | bot DONE, slot idle                  | bot IN_CALL silent 1 h, slot busy      |
//! | other     | bot DONE, slot idle                  | unchanged                              |
//!
//! So 1% of slots fail and 1% of bots go stale.

#![allow(dead_code)] // Each bench binary uses its own subset.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use milo_workers::config::Settings;
use milo_workers::platform::{Platform, SimulatedPlatform};
use milo_workers::{daemon, db};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

pub const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const WATCHED: [&str; 4] = ["JOINING_CALL", "IN_WAITING_ROOM", "IN_CALL", "LEAVING"];
/// The statuses the worker may mark FATAL from (`BotStatus::fatal_allowed_from`).
pub const FATAL_FROM: [&str; 8] = [
    "READY_TO_DEPLOY",
    "QUEUED",
    "DEPLOYING",
    "JOINING_CALL",
    "IN_WAITING_ROOM",
    "IN_CALL",
    "LEAVING",
    "CALL_ENDED",
];

pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER.to_owned())
}

/// `MILO_BENCH_SHORT=1`: the reduced set that runs in a few minutes.
pub fn short() -> bool {
    std::env::var("MILO_BENCH_SHORT").is_ok_and(|v| !v.is_empty() && v != "0")
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
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

/// A database of the benchmark's own, with the worker's migrations applied; dropped with
/// `WITH (FORCE)` when this value is dropped.
pub struct BenchDb {
    pub name: String,
    pub url: String,
}

impl BenchDb {
    pub async fn create(label: &str) -> Self {
        let name = format!("mw_bench_{label}_{}", std::process::id());
        let admin = connect(&server_url()).await;
        // One statement per call: neither may run inside a transaction block.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .expect("drop leftover database");
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

impl Drop for BenchDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let admin = connect(&server_url()).await;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => eprintln!("dropped database {}", self.name),
            _ => eprintln!("could not drop database {}", self.name),
        }
    }
}

/// Seeds a healthy fleet of `n` bots and `n` slots with set-based SQL, in chunks of 100,000
/// rows with progress on stderr. The worker's triggers are disabled during the load (they
/// would send one NOTIFY and write one `*_status_since` row per inserted row); the
/// `*_status_since` tables are then backfilled set-based and the triggers re-enabled.
pub async fn seed(client: &Client, n: i32) {
    let started = Instant::now();
    client
        .batch_execute(
            "ALTER TABLE bots DISABLE TRIGGER USER;
             ALTER TABLE bot_pool_slots DISABLE TRIGGER USER;",
        )
        .await
        .expect("disable triggers");
    let chunk = 100_000;
    for (table, sql) in [
        (
            "bots",
            "INSERT INTO bots (id, status, last_heartbeat, created_at)
             SELECT g,
                    CASE WHEN g % 100 = 25 THEN 'IN_CALL' ELSE 'DONE' END,
                    CASE WHEN g % 100 = 25 THEN timezone('UTC', now()) - interval '5 seconds'
                         ELSE timezone('UTC', now()) - interval '1 day' END,
                    timezone('UTC', now()) - interval '1 day'
             FROM generate_series($1::int4, $2::int4) AS g",
        ),
        (
            "bot_pool_slots",
            "INSERT INTO bot_pool_slots
                 (id, coolify_service_uuid, slot_name, status, assigned_bot_id, last_used_at)
             SELECT g, 'app-' || g, 'slot-' || g,
                    CASE WHEN g % 100 = 25 THEN 'busy' ELSE 'idle' END,
                    CASE WHEN g % 100 = 25 THEN g END,
                    timezone('UTC', now()) - interval '1 day'
             FROM generate_series($1::int4, $2::int4) AS g",
        ),
    ] {
        let statement = client.prepare(sql).await.expect("prepare seed");
        let mut from = 1;
        while from <= n {
            let to = (from + chunk - 1).min(n);
            client
                .execute(&statement, &[&from, &to])
                .await
                .expect("seed chunk");
            eprintln!(
                "  seeding {table}: {to}/{n} rows ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            from = to + 1;
        }
    }
    client
        .batch_execute(
            "INSERT INTO milo_workers.bot_status_since (bot_id, status, since)
             SELECT id, status, timezone('UTC', now()) - interval '1 day' FROM bots
             ON CONFLICT (bot_id) DO NOTHING;
             INSERT INTO milo_workers.slot_status_since (slot_id, status, since)
             SELECT id, status, timezone('UTC', now()) - interval '1 day' FROM bot_pool_slots
             ON CONFLICT (slot_id) DO NOTHING;
             SELECT setval(pg_get_serial_sequence('bots', 'id'), (SELECT max(id) FROM bots));
             SELECT setval(pg_get_serial_sequence('bot_pool_slots', 'id'),
                           (SELECT max(id) FROM bot_pool_slots));
             ALTER TABLE bots ENABLE TRIGGER USER;
             ALTER TABLE bot_pool_slots ENABLE TRIGGER USER;",
        )
        .await
        .expect("backfill status_since");
    eprintln!(
        "  backfilled status_since, triggers re-enabled ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    vacuum(client).await;
    eprintln!(
        "  seeded {n} bots and {n} slots in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// VACUUM ANALYZE of every table the workers touch, so each measured run starts from the
/// same physical state.
pub async fn vacuum(client: &Client) {
    client
        .batch_execute(
            "VACUUM ANALYZE bots, bot_pool_slots, milo_workers.bot_status_since,
                 milo_workers.slot_status_since, milo_workers.audit_log",
        )
        .await
        .expect("vacuum");
}

/// Breaks 1% of the slots and makes 1% of the bots stale (see the module docs), through the
/// triggers like any status change. Also empties the audit log.
pub async fn break_fleet(client: &Client) {
    client
        .batch_execute(
            "UPDATE bots
             SET status = CASE WHEN id % 100 = 0 THEN 'DEPLOYING' ELSE 'IN_CALL' END,
                 last_heartbeat = CASE WHEN id % 100 = 0 THEN NULL
                                       ELSE timezone('UTC', now()) - interval '1 hour' END,
                 deployment_error = NULL
             WHERE id % 100 IN (0, 50);
             UPDATE bot_pool_slots
             SET status = CASE WHEN id % 100 = 0 THEN 'error' ELSE 'busy' END,
                 assigned_bot_id = id,
                 error_message = CASE WHEN id % 100 = 0 THEN 'container exited' END,
                 recovery_attempts = 0,
                 last_used_at = timezone('UTC', now()) - interval '1 hour'
             WHERE id % 100 IN (0, 50);
             TRUNCATE milo_workers.audit_log;",
        )
        .await
        .expect("break fleet");
}

/// Checks (not timing: correctness) that a sweep repaired everything [`break_fleet`] broke
/// and nothing else.
pub async fn assert_repaired(client: &Client, n: i32) {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM bot_pool_slots WHERE status = 'error'),
                    (SELECT count(*) FROM bot_pool_slots WHERE status = 'busy'),
                    (SELECT count(*) FROM bots WHERE status = 'FATAL'),
                    (SELECT count(*) FROM bots WHERE status = 'IN_CALL')",
            &[],
        )
        .await
        .expect("check");
    let (error, busy, fatal, in_call): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let one = i64::from(n / 100);
    assert_eq!(
        (error, busy, fatal, in_call),
        (0, one, 2 * one, one),
        "after a sweep: slots in error, busy slots, FATAL bots, IN_CALL bots"
    );
}

/// What a row-at-a-time sweep did: the candidate query's duration, and for each row handled,
/// its id and when it was done, counted from the start of the sweep.
#[derive(Default)]
pub struct Polled {
    pub select: Duration,
    pub done: Vec<(i32, Duration)>,
}

/// Baseline (a): milo's TypeScript SlotRecovery, one row at a time. Candidates are selected,
/// then each is handled with one autocommitted statement per write and a platform call in
/// sequence: `UPDATE bots SET status = 'FATAL' WHERE id = $1`, stop, `UPDATE bot_pool_slots
/// SET status = 'idle' ... WHERE id = $1`. No audit rows (the TypeScript workers only log).
pub async fn poll_slots(client: &Client, platform: &SimulatedPlatform) -> Polled {
    let started = Instant::now();
    let rows = client
        .query(
            "SELECT id, coolify_service_uuid, assigned_bot_id FROM bot_pool_slots
             WHERE status = 'error'
                OR (status = 'deploying'
                    AND last_used_at < timezone('UTC', now()) - interval '15 minutes')
             ORDER BY id",
            &[],
        )
        .await
        .expect("poll slots");
    let select = started.elapsed();
    let fatal = client
        .prepare("UPDATE bots SET status = 'FATAL', deployment_error = $2 WHERE id = $1")
        .await
        .expect("prepare");
    let idle = client
        .prepare(
            "UPDATE bot_pool_slots
             SET status = 'idle', assigned_bot_id = NULL, error_message = NULL,
                 recovery_attempts = 0, last_used_at = timezone('UTC', now())
             WHERE id = $1",
        )
        .await
        .expect("prepare");
    let mut done = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i32 = row.get(0);
        let uuid: String = row.get(1);
        let bot: Option<i32> = row.get(2);
        if let Some(bot) = bot {
            let reason = format!("slot {id} in error");
            client
                .execute(&fatal, &[&bot, &reason])
                .await
                .expect("fatal");
        }
        platform.stop(&uuid).await.expect("simulated stop");
        client.execute(&idle, &[&id]).await.expect("idle");
        done.push((id, started.elapsed()));
    }
    Polled { select, done }
}

/// Baseline (a) for BotHealth: stale bots with their slots in one query, then per bot
/// `UPDATE bots SET status = 'FATAL' WHERE id = $1`, stop, `UPDATE bot_pool_slots SET status =
/// 'idle' WHERE id = $1`, in sequence.
pub async fn poll_bots(client: &Client, platform: &SimulatedPlatform) -> Polled {
    let started = Instant::now();
    let rows = client
        .query(
            "SELECT b.id, s.id, s.coolify_service_uuid
             FROM bots b
             LEFT JOIN bot_pool_slots s
                    ON s.assigned_bot_id = b.id AND s.status IN ('busy', 'deploying')
             WHERE b.status = ANY($1)
               AND b.last_heartbeat < timezone('UTC', now()) - interval '10 minutes'
             ORDER BY b.id",
            &[&WATCHED.to_vec()],
        )
        .await
        .expect("poll bots");
    let select = started.elapsed();
    let fatal = client
        .prepare("UPDATE bots SET status = 'FATAL', deployment_error = $2 WHERE id = $1")
        .await
        .expect("prepare");
    let idle = client
        .prepare(
            "UPDATE bot_pool_slots
             SET status = 'idle', assigned_bot_id = NULL, error_message = NULL,
                 recovery_attempts = 0, last_used_at = timezone('UTC', now())
             WHERE id = $1",
        )
        .await
        .expect("prepare");
    let mut done = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i32 = row.get(0);
        let slot: Option<i32> = row.get(1);
        let reason = "no heartbeat for more than 10m";
        client
            .execute(&fatal, &[&id, &reason])
            .await
            .expect("fatal");
        if let Some(slot) = slot {
            let uuid: String = row.get(2);
            platform.stop(&uuid).await.expect("simulated stop");
            client.execute(&idle, &[&slot]).await.expect("idle");
        }
        done.push((id, started.elapsed()));
    }
    Polled { select, done }
}

/// Baseline (b), the physical floor for SlotRecovery: the worker's writes (bots FATAL, slots
/// idle, audit rows) as one set-based statement over the whole table in one transaction, with
/// no paging, no row claims round trip and no platform calls. Returns slots recovered.
pub async fn floor_slots(client: &mut Client) -> u64 {
    floor_slots_where(client, "true", &[]).await
}

/// [`floor_slots`] restricted to these slot ids (a focused check, bare).
pub async fn floor_slots_ids(client: &mut Client, ids: &[i32]) -> u64 {
    floor_slots_where(client, "id = ANY($2)", &[&ids]).await
}

async fn floor_slots_where(
    client: &mut Client,
    filter: &str,
    extra: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> u64 {
    let fatal_from = FATAL_FROM.to_vec();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&fatal_from];
    params.extend_from_slice(extra);
    let tx = client.transaction().await.expect("begin");
    let sql = format!(
        "WITH c AS (
                 SELECT id, assigned_bot_id FROM bot_pool_slots
                 WHERE {filter} AND (status = 'error'
                    OR (status = 'deploying'
                        AND last_used_at < timezone('UTC', now()) - interval '15 minutes'))
                 FOR UPDATE
             ), f AS (
                 UPDATE bots b SET status = 'FATAL', deployment_error = 'slot recovery'
                 FROM c WHERE b.id = c.assigned_bot_id AND b.status = ANY($1)
                 RETURNING b.id, c.id AS slot_id
             ), r AS (
                 UPDATE bot_pool_slots s
                 SET status = 'idle', assigned_bot_id = NULL, error_message = NULL,
                     recovery_attempts = 0, last_used_at = timezone('UTC', now())
                 FROM c WHERE s.id = c.id
                 RETURNING s.id, c.assigned_bot_id
             ), a AS (
                 INSERT INTO milo_workers.audit_log
                     (worker, trigger, action, slot_id, bot_id, reason, replica)
                 SELECT 'floor', 'manual', 'slot_recovered', id, assigned_bot_id, 'x', 'floor'
                 FROM r
                 UNION ALL
                 SELECT 'floor', 'manual', 'bot_marked_fatal', slot_id, id, 'x', 'floor'
                 FROM f
             )
             SELECT count(*) FROM r"
    );
    let row = tx.query_one(&sql, &params).await.expect("floor slots");
    tx.commit().await.expect("commit");
    row.get::<_, i64>(0) as u64
}

/// Baseline (b) for BotHealth: silent bots FATAL, their slots idle, audit rows, as one
/// set-based statement. Returns bots marked FATAL.
pub async fn floor_bots(client: &mut Client) -> u64 {
    floor_bots_where(client, "true", &[]).await
}

/// [`floor_bots`] restricted to these bot ids (a focused check, bare).
pub async fn floor_bots_ids(client: &mut Client, ids: &[i32]) -> u64 {
    floor_bots_where(client, "b.id = ANY($2)", &[&ids]).await
}

async fn floor_bots_where(
    client: &mut Client,
    filter: &str,
    extra: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> u64 {
    let watched = WATCHED.to_vec();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&watched];
    params.extend_from_slice(extra);
    let tx = client.transaction().await.expect("begin");
    let sql = format!(
        "WITH s AS (
                 SELECT b.id FROM bots b
                 LEFT JOIN milo_workers.bot_status_since ss ON ss.bot_id = b.id
                 WHERE {filter} AND b.status = ANY($1)
                   AND coalesce(b.last_heartbeat, ss.since, timezone('UTC', now()))
                       < timezone('UTC', now()) - interval '10 minutes'
                 FOR UPDATE OF b
             ), f AS (
                 UPDATE bots b SET status = 'FATAL', deployment_error = 'no heartbeat'
                 FROM s WHERE b.id = s.id
                 RETURNING b.id
             ), r AS (
                 UPDATE bot_pool_slots sl
                 SET status = 'idle', assigned_bot_id = NULL, error_message = NULL,
                     recovery_attempts = 0, last_used_at = timezone('UTC', now())
                 FROM f WHERE sl.assigned_bot_id = f.id AND sl.status IN ('busy', 'deploying')
                 RETURNING sl.id, f.id AS bot_id
             ), a AS (
                 INSERT INTO milo_workers.audit_log
                     (worker, trigger, action, slot_id, bot_id, reason, replica)
                 SELECT 'floor', 'manual', 'bot_marked_fatal', NULL, id, 'x', 'floor' FROM f
                 UNION ALL
                 SELECT 'floor', 'manual', 'resources_released', id, bot_id, 'x', 'floor'
                 FROM r
             )
             SELECT count(*) FROM f"
    );
    let row = tx.query_one(&sql, &params).await.expect("floor bots");
    tx.commit().await.expect("commit");
    row.get::<_, i64>(0) as u64
}

/// A connection that LISTENs on `channel` and forwards every payload with the instant it
/// arrived.
pub async fn observe(url: &str, channel: &str) -> (Client, mpsc::UnboundedReceiver<Arrival>) {
    let (client, mut connection) = url
        .parse::<tokio_postgres::Config>()
        .expect("valid url")
        .connect(NoTls)
        .await
        .expect("observer connects");
    let (sender, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let arrival = Arrival {
                        at: Instant::now(),
                        payload: n.payload().to_owned(),
                    };
                    if sender.send(arrival).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .expect("listen");
    (client, received)
}

#[derive(Debug)]
pub struct Arrival {
    pub at: Instant,
    pub payload: String,
}

/// Waits for `what` with a generous limit (a hang is a bug, not a slow figure).
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Nearest-rank percentile of sorted values; `q` in `[0, 1]`.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 0.5)
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A duration in milliseconds, readably: `0.84 ms`, `12.3 ms`, `4.1 s`, `5.2 min`.
pub fn human_ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2} ms")
    } else if value < 1000.0 {
        format!("{value:.1} ms")
    } else if value < 120_000.0 {
        format!("{:.2} s", value / 1000.0)
    } else {
        format!("{:.2} min", value / 60_000.0)
    }
}

/// Integer with thousands separators.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints what a reader of BENCHMARKS.md needs to reproduce the figure.
pub fn print_header(bench: &str) {
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!(
        "\n## {bench} ({}; {date}; {} cores)\n",
        if short() { "short mode" } else { "full mode" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
