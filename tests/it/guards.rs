//! Guards: a row that moves on between a worker's check and its write is left alone.
//!
//! milo's write is made in a transaction of the test's that locks the row first, as milo's
//! own UPDATE would. The worker runs while that lock is held; it may skip the locked row and
//! end, or wait for the lock. Either way the test then commits milo's write, and only then
//! looks at the outcome. A worker that decided on the old row and wrote without re-checking
//! would wait for the lock and then overwrite milo's write, and these tests would fail.

use std::future::Future;

use milo_workers::pipeline::Batch;
use milo_workers::platform::{Operation, SimulatedPlatform};
use milo_workers::store::Trigger;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::common::{self, eventually, TestDb};

const SILENT_SECS: f64 = 11.0 * 60.0;
const STUCK_SECS: f64 = 20.0 * 60.0;

fn simulated() -> SimulatedPlatform {
    SimulatedPlatform::new(std::time::Duration::ZERO, 0.0)
}

/// Starts the run, and returns once it has ended or waits for a lock.
async fn start_run<T, F>(observer: &Client, run: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let run = tokio::spawn(run);
    eventually("the run ends or waits for the locked row", || async {
        run.is_finished() || common::worker_waits_for_lock(observer).await
    })
    .await;
    run
}

/// Runs BotHealth on `bot` (and an unlocked, silent `control` bot) while a transaction
/// holds `bot` locked and then commits `write` on it.
async fn bot_health_races(write: &str) {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(SILENT_SECS)).await;
    let control = common::insert_bot(&milo, "IN_CALL", Some(SILENT_SECS)).await;
    let worker = common::bot_health(&db, &common::settings(), &simulated());

    let mut holder = db.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.query_one("SELECT id FROM bots WHERE id = $1 FOR UPDATE", &[&bot])
        .await
        .unwrap();
    let run = start_run(&milo, async move {
        use milo_workers::workers::Worker;
        worker
            .run(&Batch::ids(Trigger::Notify, vec![bot, control]))
            .await
    })
    .await;
    tx.execute(write, &[&bot]).await.unwrap();
    tx.commit().await.unwrap();
    let report = run.await.unwrap().expect("run");

    assert_eq!(
        report.marked_fatal, 1,
        "the control bot, silent and unlocked, is marked"
    );
    assert_eq!(common::bot_status(&milo, control).await, "FATAL");
    assert_ne!(common::bot_status(&milo, bot).await, "FATAL");
    assert_eq!(common::bot_audit(&milo, bot).await, []);
}

#[tokio::test]
async fn a_bot_that_heartbeats_while_bot_health_checks_it_is_not_marked_fatal() {
    let heartbeat = "UPDATE bots SET last_heartbeat = timezone('UTC', now()) WHERE id = $1";
    bot_health_races(heartbeat).await;
}

#[tokio::test]
async fn a_bot_that_finishes_while_bot_health_checks_it_stays_done() {
    bot_health_races("UPDATE bots SET status = 'DONE' WHERE id = $1").await;
}

#[tokio::test]
async fn a_bot_that_heartbeats_while_its_stuck_slot_is_checked_keeps_the_slot() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "DEPLOYING", Some(SILENT_SECS)).await;
    let slot = common::insert_slot(&milo, "s1", "deploying", Some(bot), STUCK_SECS).await;
    let platform = simulated();
    let worker = common::slot_recovery(&db, &common::settings(), &platform);

    let mut holder = db.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.query_one("SELECT id FROM bots WHERE id = $1 FOR UPDATE", &[&bot])
        .await
        .unwrap();
    let run = start_run(&milo, async move {
        use milo_workers::workers::Worker;
        worker.run(&Batch::ids(Trigger::Notify, vec![slot])).await
    })
    .await;
    tx.execute(
        "UPDATE bots SET last_heartbeat = timezone('UTC', now()) WHERE id = $1",
        &[&bot],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let report = run.await.unwrap().expect("run");

    assert_eq!((report.recovered, report.skipped), (0, 1));
    assert_eq!(
        common::slot_status(&milo, slot).await.as_deref(),
        Some("deploying")
    );
    assert_eq!(common::bot_status(&milo, bot).await, "DEPLOYING");
    assert_eq!(platform.calls(), []);
}

#[tokio::test]
async fn a_bot_that_finishes_while_its_broken_slot_is_recovered_stays_done() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "s1", "error", Some(bot), 60.0).await;
    let platform = simulated();
    let worker = common::slot_recovery(&db, &common::settings(), &platform);

    let mut holder = db.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.query_one("SELECT id FROM bots WHERE id = $1 FOR UPDATE", &[&bot])
        .await
        .unwrap();
    let run = start_run(&milo, async move {
        use milo_workers::workers::Worker;
        worker.run(&Batch::ids(Trigger::Notify, vec![slot])).await
    })
    .await;
    tx.execute("UPDATE bots SET status = 'DONE' WHERE id = $1", &[&bot])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    run.await.unwrap().expect("run");

    assert_eq!(common::bot_status(&milo, bot).await, "DONE");
    assert_eq!(common::bot_deployment_error(&milo, bot).await, None);
    assert_eq!(
        common::bot_audit(&milo, bot).await,
        [("slot_recovered".into(), "notify".into())]
    );
    assert_eq!(
        common::slot_status(&milo, slot).await.as_deref(),
        Some("idle")
    );
}

#[tokio::test]
async fn a_broken_slot_that_milo_reassigns_during_recovery_is_left_to_milo() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let slot = common::insert_slot(&milo, "s1", "error", None, 60.0).await;
    let bot = common::insert_bot(&milo, "DEPLOYING", Some(1.0)).await;
    let platform = simulated();
    let worker = common::slot_recovery(&db, &common::settings(), &platform);

    let mut holder = db.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.query_one(
        "SELECT id FROM bot_pool_slots WHERE id = $1 FOR UPDATE",
        &[&slot],
    )
    .await
    .unwrap();
    let run = start_run(&milo, async move {
        use milo_workers::workers::Worker;
        worker.run(&Batch::ids(Trigger::Notify, vec![slot])).await
    })
    .await;
    tx.execute(
        "UPDATE bot_pool_slots
         SET status = 'deploying', assigned_bot_id = $2, last_used_at = timezone('UTC', now())
         WHERE id = $1",
        &[&slot, &bot],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let report = run.await.unwrap().expect("run");

    assert_eq!(report, Default::default());
    let assigned: (String, Option<i32>) = milo
        .query_one(
            "SELECT status, assigned_bot_id FROM bot_pool_slots WHERE id = $1",
            &[&slot],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert_eq!(assigned, ("deploying".to_owned(), Some(bot)));
    assert_eq!(common::bot_status(&milo, bot).await, "DEPLOYING");
    assert!(!platform
        .calls()
        .iter()
        .any(|c| c.operation == Operation::Stop));
    assert_eq!(common::slot_audit(&milo, slot).await, []);
}
