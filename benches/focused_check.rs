//! Table 3 (criterion): the cost of reacting to one changed row among a million (100,000 in
//! short mode), end to end and in parts, against the bare statements and against what the
//! polling design must do to find the same row (a sweep of the whole table).
//!
//! Each iteration prepares its row untimed (a slot put in `error`, a bot made stale) with a
//! different row every time, then times only the reaction. Without the daemon:
//! - `worker/...`: `SlotRecovery` / `BotHealth` `run(&Batch::ids(Trigger::Notify, [id]))`;
//! - `floor/...`: the same writes as one bare set-based statement for that id;
//! - `row_at_a_time/...`: the polling sweep that finds and fixes that one row.
//!
//! With the daemon (`daemon::start`, tick off): `end_to_end/notify_to_idle`, from just before
//! the failing UPDATE is sent to the worker's `<id>:idle` notification arriving.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use criterion::Criterion;
use milo_workers::config::Settings;
use milo_workers::daemon::{self, Options};
use milo_workers::pipeline::Batch;
use milo_workers::platform::SimulatedPlatform;
use milo_workers::store::Trigger;
use milo_workers::workers::{BotHealth, SlotRecovery, Worker};
use tokio::sync::Mutex;
use tokio_postgres::Client;

struct Fixture {
    url: String,
    client: Mutex<Client>,
    slot_recovery: SlotRecovery,
    bot_health: BotHealth,
    platform: SimulatedPlatform,
    next: AtomicUsize,
    n: i32,
}

impl Fixture {
    /// A different id each call: `g % 100 == residue`, cycling.
    fn id(&self, residue: i32) -> i32 {
        let k = self.next.fetch_add(1, Ordering::Relaxed) as i32 % (self.n / 100);
        k * 100 + residue + if residue == 0 { 100 } else { 0 }
    }
}

fn main() {
    let rt = runtime();
    let n = if short() { 100_000 } else { 1_000_000 };
    let db = rt.block_on(BenchDb::create("focused"));
    let fixture = rt.block_on(async {
        let client = db.client().await;
        seed(&client, n).await;
        let mut settings = Settings::default();
        // Judge bots on current evidence at once, as a daemon running for a while does
        // (a fresh process waits one heartbeat timeout, its outage grace).
        settings.bots.outage_grace = false;
        let pool = daemon::pool(&db.url, &settings).expect("pool");
        let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
        let context = daemon::context(pool, &settings, Arc::new(platform.clone()));
        Arc::new(Fixture {
            url: db.url.clone(),
            client: Mutex::new(client),
            slot_recovery: SlotRecovery::new(context.clone(), settings.slots.clone()),
            bot_health: BotHealth::new(context, settings.bots.clone()),
            platform,
            next: AtomicUsize::new(0),
            n,
        })
    });

    let (measure, warm) = if short() {
        (Duration::from_secs(1), Duration::from_millis(300))
    } else {
        (Duration::from_secs(4), Duration::from_secs(1))
    };
    let mut criterion = Criterion::default()
        .sample_size(10)
        .measurement_time(measure)
        .warm_up_time(warm)
        .configure_from_args();
    direct(&mut criterion, &rt, &fixture);
    end_to_end(&mut criterion, &rt, &fixture);
    criterion.final_summary();
    drop(fixture);
    drop(db);
}

/// A slot `error` holding a DEPLOYING bot (both id `id`), as a failed deployment leaves it.
async fn fail_slot(client: &Client, id: i32) {
    client
        .batch_execute(&format!(
            "UPDATE bots SET status = 'DEPLOYING', last_heartbeat = NULL,
                 deployment_error = NULL WHERE id = {id};
             UPDATE bot_pool_slots SET status = 'error', assigned_bot_id = id,
                 error_message = 'container exited' WHERE id = {id};"
        ))
        .await
        .expect("fail slot");
}

/// A bot IN_CALL silent for an hour, holding its busy slot.
async fn stale_bot(client: &Client, id: i32) {
    client
        .batch_execute(&format!(
            "UPDATE bots SET status = 'IN_CALL', deployment_error = NULL,
                 last_heartbeat = timezone('UTC', now()) - interval '1 hour' WHERE id = {id};
             UPDATE bot_pool_slots SET status = 'busy', assigned_bot_id = id WHERE id = {id};"
        ))
        .await
        .expect("stale bot");
}

fn direct(criterion: &mut Criterion, rt: &tokio::runtime::Runtime, fixture: &Arc<Fixture>) {
    let mut group = criterion.benchmark_group(format!("focused_check_1_of_{}", fixture.n));

    let fx = fixture.clone();
    group.bench_function("worker/slot_recovery_error_slot", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let fx = fx.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let id = fx.id(0);
                    fail_slot(&*fx.client.lock().await, id).await;
                    let started = Instant::now();
                    let report = fx
                        .slot_recovery
                        .run(&Batch::ids(Trigger::Notify, vec![id]))
                        .await
                        .expect("run");
                    total += started.elapsed();
                    assert_eq!(report.recovered, 1);
                }
                total
            }
        })
    });

    let fx = fixture.clone();
    group.bench_function("floor/slot_recovery_error_slot", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let fx = fx.clone();
            async move {
                let mut total = Duration::ZERO;
                let mut client = fx.client.lock().await;
                for _ in 0..iters {
                    let id = fx.id(0);
                    fail_slot(&client, id).await;
                    let started = Instant::now();
                    let recovered = floor_slots_ids(&mut client, &[id]).await;
                    total += started.elapsed();
                    assert_eq!(recovered, 1);
                }
                total
            }
        })
    });

    let fx = fixture.clone();
    group.bench_function("row_at_a_time/slot_recovery_error_slot", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let fx = fx.clone();
            async move {
                let mut total = Duration::ZERO;
                let client = fx.client.lock().await;
                for _ in 0..iters {
                    let id = fx.id(0);
                    fail_slot(&client, id).await;
                    let started = Instant::now();
                    let polled = poll_slots(&client, &fx.platform).await;
                    total += started.elapsed();
                    assert_eq!(polled.done.len(), 1);
                }
                total
            }
        })
    });

    let fx = fixture.clone();
    group.bench_function("worker/bot_health_stale_bot", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let fx = fx.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let id = fx.id(50);
                    stale_bot(&*fx.client.lock().await, id).await;
                    let started = Instant::now();
                    let report = fx
                        .bot_health
                        .run(&Batch::ids(Trigger::Notify, vec![id]))
                        .await
                        .expect("run");
                    total += started.elapsed();
                    assert_eq!((report.marked_fatal, report.resources_released), (1, 1));
                }
                total
            }
        })
    });

    let fx = fixture.clone();
    group.bench_function("floor/bot_health_stale_bot", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let fx = fx.clone();
            async move {
                let mut total = Duration::ZERO;
                let mut client = fx.client.lock().await;
                for _ in 0..iters {
                    let id = fx.id(50);
                    stale_bot(&client, id).await;
                    let started = Instant::now();
                    let marked = floor_bots_ids(&mut client, &[id]).await;
                    total += started.elapsed();
                    assert_eq!(marked, 1);
                }
                total
            }
        })
    });

    let fx = fixture.clone();
    group.bench_function("row_at_a_time/bot_health_stale_bot", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let fx = fx.clone();
            async move {
                let mut total = Duration::ZERO;
                let client = fx.client.lock().await;
                for _ in 0..iters {
                    let id = fx.id(50);
                    stale_bot(&client, id).await;
                    let started = Instant::now();
                    let polled = poll_bots(&client, &fx.platform).await;
                    total += started.elapsed();
                    assert_eq!(polled.done.len(), 1);
                }
                total
            }
        })
    });

    let fx = fixture.clone();
    group.bench_function("worker/bot_health_nothing_to_do", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let fx = fx.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // A fresh IN_CALL bot: the commonest notification, a live bot's change.
                    let id = fx.id(25);
                    let started = Instant::now();
                    let report = fx
                        .bot_health
                        .run(&Batch::ids(Trigger::Notify, vec![id]))
                        .await
                        .expect("run");
                    total += started.elapsed();
                    assert_eq!((report.checked, report.marked_fatal), (1, 0));
                }
                total
            }
        })
    });
    group.finish();
}

fn end_to_end(criterion: &mut Criterion, rt: &tokio::runtime::Runtime, fixture: &Arc<Fixture>) {
    let (daemon, observer) = rt.block_on(async {
        let settings = Settings {
            sweep_interval: Duration::ZERO,
            sweep_on_start: false,
            ..Settings::default()
        };
        let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
        let mut options = Options::new(&fixture.url, settings, Arc::new(platform));
        options.migrate = false;
        let daemon = daemon::start(options).await.expect("daemon starts");
        while !daemon.listener.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (daemon, observe(&fixture.url, "milo_workers_slots").await)
    });
    let (_observer_client, arrivals) = observer;
    let arrivals = Arc::new(Mutex::new(arrivals));

    let mut group = criterion.benchmark_group(format!("focused_check_1_of_{}", fixture.n));
    if short() {
        group.measurement_time(Duration::from_millis(400));
        group.warm_up_time(Duration::from_millis(100));
    } else {
        group.measurement_time(Duration::from_secs(1));
        group.warm_up_time(Duration::from_millis(300));
    }
    let fx = fixture.clone();
    group.bench_function("end_to_end/notify_to_idle_daemon", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let fx = fx.clone();
            let arrivals = arrivals.clone();
            async move {
                let mut total = Duration::ZERO;
                let client = fx.client.lock().await;
                let mut arrivals = arrivals.lock().await;
                for _ in 0..iters {
                    let id = fx.id(0);
                    client
                        .execute(
                            "UPDATE bots SET status = 'DEPLOYING', last_heartbeat = NULL
                             WHERE id = $1",
                            &[&id],
                        )
                        .await
                        .expect("bot deploying");
                    client
                        .execute(
                            "UPDATE bot_pool_slots SET status = 'deploying',
                                 assigned_bot_id = id, last_used_at = timezone('UTC', now())
                             WHERE id = $1",
                            &[&id],
                        )
                        .await
                        .expect("slot deploying");
                    // Isolated from the runs the preparation caused (debounce 100 ms).
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    while arrivals.try_recv().is_ok() {}
                    let want = format!("{id}:idle");
                    let started = Instant::now();
                    client
                        .execute(
                            "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
                            &[&id],
                        )
                        .await
                        .expect("fail");
                    let done = within(Duration::from_secs(60), "slot idle", async {
                        loop {
                            let arrival = arrivals.recv().await.expect("observer");
                            if arrival.payload == want {
                                return arrival.at;
                            }
                        }
                    })
                    .await;
                    total += done - started;
                }
                total
            }
        })
    });
    group.finish();
    rt.block_on(daemon.stop());
}
