//! SlotRecovery repairs inconsistent (slot, bot) pairs wherever it finds them: a busy slot
//! held by no bot, or by a bot that finished, for longer than the grace (the heartbeat
//! freshness window) is stopped and freed; within the grace it is left to milo.

use std::time::Duration;

use milo_workers::pipeline::Batch;
use milo_workers::platform::{Operation, SimulatedPlatform};
use milo_workers::store::Trigger;
use milo_workers::workers::Worker;
use tokio_postgres::Client;

use crate::common;

/// Moves the moment the slot (and its bot, if any) entered its status an hour back.
async fn age(milo: &Client, slot: i32, bot: Option<i32>) {
    milo.execute(
        "UPDATE milo_workers.slot_status_since SET since = since - interval '1 hour'
         WHERE slot_id = $1",
        &[&slot],
    )
    .await
    .unwrap();
    milo.execute(
        "UPDATE milo_workers.bot_status_since SET since = since - interval '1 hour'
         WHERE bot_id = $1",
        &[&bot],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_busy_slot_held_by_a_long_finished_bot_is_released_by_a_sweep() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let done = common::insert_bot(&milo, "DONE", Some(3600.0)).await;
    let held = common::insert_slot(&milo, "held", "busy", Some(done), 3600.0).await;
    let orphan = common::insert_slot(&milo, "orphan", "busy", None, 3600.0).await;
    age(&milo, held, Some(done)).await;
    age(&milo, orphan, None).await;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let settings = common::settings();
    let worker = common::slot_recovery(&db, &settings, &platform);

    let report = worker.run(&Batch::sweep(Trigger::Tick)).await.unwrap();

    assert_eq!(report.released, 2);
    for slot in [held, orphan] {
        assert_eq!(
            common::slot_status(&milo, slot).await.as_deref(),
            Some("idle")
        );
        assert_eq!(
            common::slot_audit(&milo, slot).await,
            [("resources_released".to_owned(), "tick".to_owned())]
        );
    }
    assert_eq!(
        common::bot_status(&milo, done).await,
        "DONE",
        "a finished bot stays DONE"
    );
    let mut stopped: Vec<(Operation, String)> = platform
        .calls()
        .into_iter()
        .map(|call| (call.operation, call.uuid))
        .collect();
    stopped.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        stopped,
        [
            (Operation::Stop, "app-held".to_owned()),
            (Operation::Stop, "app-orphan".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_slot_whose_bot_just_finished_is_left_to_milo() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "s", "busy", Some(bot), 3600.0).await;
    age(&milo, slot, None).await;
    milo.execute("UPDATE bots SET status = 'DONE' WHERE id = $1", &[&bot])
        .await
        .unwrap();
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let settings = common::settings();
    let worker = common::slot_recovery(&db, &settings, &platform);

    let report = worker.run(&Batch::sweep(Trigger::Tick)).await.unwrap();

    assert_eq!(report.released, 0);
    assert_eq!(
        common::slot_status(&milo, slot).await.as_deref(),
        Some("busy")
    );
    assert!(platform.calls().is_empty());
}

#[tokio::test]
async fn a_busy_slot_of_a_running_bot_is_never_released() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "s", "busy", Some(bot), 3600.0).await;
    age(&milo, slot, Some(bot)).await;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let settings = common::settings();
    let worker = common::slot_recovery(&db, &settings, &platform);

    worker.run(&Batch::sweep(Trigger::Tick)).await.unwrap();

    assert_eq!(
        common::slot_status(&milo, slot).await.as_deref(),
        Some("busy")
    );
    assert!(platform.calls().is_empty());
}
