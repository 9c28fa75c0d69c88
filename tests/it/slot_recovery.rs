//! SlotRecovery: slots in error, or deploying past the deploy timeout, are stopped and go back
//! to idle with their bot FATAL; a live bot keeps its deploying slot; failures count attempts,
//! and a slot out of attempts is deleted.
//!
//! Most tests call the worker directly, as the `sweep` command does; those where the path
//! from the database matters go through the daemon.

use milo_workers::pipeline::Batch;
use milo_workers::platform::{Operation, SimulatedPlatform};
use milo_workers::store::Trigger;
use milo_workers::workers::{SlotRecovery, SlotRecoveryReport, Worker};
use tokio_postgres::Client;

use crate::common::{self, eventually, TestDb};

/// Well past the default deploy timeout of 15 minutes.
const STUCK_SECS: f64 = 20.0 * 60.0;

fn simulated() -> SimulatedPlatform {
    SimulatedPlatform::new(std::time::Duration::ZERO, 0.0)
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

async fn sweep(worker: &SlotRecovery) -> SlotRecoveryReport {
    worker
        .run(&Batch::sweep(Trigger::Manual))
        .await
        .expect("run")
}

async fn check(worker: &SlotRecovery, slot: i32) -> SlotRecoveryReport {
    worker
        .run(&Batch::ids(Trigger::Notify, vec![slot]))
        .await
        .expect("run")
}

fn operations(platform: &SimulatedPlatform) -> Vec<(Operation, String, bool)> {
    platform
        .calls()
        .into_iter()
        .map(|c| (c.operation, c.uuid, c.succeeded))
        .collect()
}

async fn set_attempts(milo: &Client, slot: i32, attempts: i32) {
    milo.execute(
        "UPDATE bot_pool_slots SET recovery_attempts = $2 WHERE id = $1",
        &[&slot, &attempts],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_slot_in_error_is_stopped_and_freed_and_its_bot_marked_fatal_with_the_reason() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "s1", "busy", Some(bot), 60.0).await;
    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error', error_message = 'container crashed',
                                   recovery_attempts = 2
         WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();
    let platform = simulated();
    let worker = common::slot_recovery(&db, &common::settings(), &platform);

    let report = check(&worker, slot).await;

    assert_eq!(
        report,
        SlotRecoveryReport {
            recovered: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        common::slot_state(&milo, slot).await,
        Some(("idle".into(), 0, None))
    );
    let assigned: Option<i32> = milo
        .query_one(
            "SELECT assigned_bot_id FROM bot_pool_slots WHERE id = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(assigned, None);
    assert_eq!(common::bot_status(&milo, bot).await, "FATAL");
    let error = common::bot_deployment_error(&milo, bot)
        .await
        .expect("a deployment error");
    assert!(error.contains("container crashed"), "{error}");
    assert_eq!(
        operations(&platform),
        [(Operation::Stop, "app-s1".into(), true)]
    );
    assert_eq!(
        common::slot_audit(&milo, slot).await,
        pairs(&[("bot_marked_fatal", "notify"), ("slot_recovered", "notify")])
    );
}

#[tokio::test]
async fn a_slot_deploying_past_the_timeout_is_recovered_and_a_recent_one_is_not() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let stuck_bot = common::insert_bot(&milo, "DEPLOYING", None).await;
    let stuck_slot = Some(stuck_bot);
    let stuck = common::insert_slot(&milo, "stuck", "deploying", stuck_slot, STUCK_SECS).await;
    let recent_bot = common::insert_bot(&milo, "DEPLOYING", None).await;
    let recent = common::insert_slot(&milo, "recent", "deploying", Some(recent_bot), 60.0).await;
    let platform = simulated();
    let worker = common::slot_recovery(&db, &common::settings(), &platform);

    let report = sweep(&worker).await;

    assert_eq!(
        report,
        SlotRecoveryReport {
            recovered: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        common::slot_status(&milo, stuck).await.as_deref(),
        Some("idle")
    );
    assert_eq!(common::bot_status(&milo, stuck_bot).await, "FATAL");
    let error = common::bot_deployment_error(&milo, stuck_bot)
        .await
        .unwrap();
    assert!(error.contains("stuck deploying"), "{error}");
    assert_eq!(
        common::slot_status(&milo, recent).await.as_deref(),
        Some("deploying")
    );
    assert_eq!(common::bot_status(&milo, recent_bot).await, "DEPLOYING");
    assert_eq!(
        operations(&platform),
        [(Operation::Stop, "app-stuck".into(), true)]
    );
}

#[tokio::test]
async fn a_slot_inserted_already_stuck_deploying_is_recovered_by_the_daemon_on_its_insert() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let platform = simulated();
    let daemon = common::start(&db, common::settings(), &platform).await;

    let slot = common::insert_slot(&milo, "s1", "deploying", None, STUCK_SECS).await;

    eventually("the stuck slot is idle", || async {
        common::slot_status(&milo, slot).await.as_deref() == Some("idle")
    })
    .await;
    assert_eq!(
        common::slot_audit(&milo, slot).await,
        pairs(&[("slot_recovered", "notify")])
    );
    assert!(daemon.stop().await);
}

#[tokio::test]
async fn a_deploying_slot_whose_fresh_bot_is_in_the_call_is_corrected_to_busy() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(5.0)).await;
    let slot = common::insert_slot(&milo, "s1", "deploying", Some(bot), STUCK_SECS).await;
    set_attempts(&milo, slot, 1).await;
    let platform = simulated();
    let worker = common::slot_recovery(&db, &common::settings(), &platform);

    let report = check(&worker, slot).await;

    assert_eq!(
        report,
        SlotRecoveryReport {
            skipped: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        common::slot_state(&milo, slot).await,
        Some(("busy".into(), 1, None))
    );
    assert_eq!(common::bot_status(&milo, bot).await, "IN_CALL");
    assert_eq!(
        common::slot_audit(&milo, slot).await,
        pairs(&[("slot_marked_busy", "notify")])
    );
    assert_eq!(operations(&platform), []);
}

#[tokio::test]
async fn a_deploying_slot_whose_fresh_bot_is_still_deploying_is_left_alone() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "DEPLOYING", Some(5.0)).await;
    let slot = common::insert_slot(&milo, "s1", "deploying", Some(bot), STUCK_SECS).await;
    let platform = simulated();
    let worker = common::slot_recovery(&db, &common::settings(), &platform);

    let report = sweep(&worker).await;

    assert_eq!(
        report,
        SlotRecoveryReport {
            skipped: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        common::slot_state(&milo, slot).await,
        Some(("deploying".into(), 0, None))
    );
    assert_eq!(common::bot_status(&milo, bot).await, "DEPLOYING");
    assert_eq!(common::slot_audit(&milo, slot).await, []);
    assert_eq!(operations(&platform), []);

    // The same slot whose bot went silent is recovered: the heartbeat is what kept it.
    milo.execute(
        "UPDATE bots SET last_heartbeat = timezone('UTC', now()) - interval '1 hour'
         WHERE id = $1",
        &[&bot],
    )
    .await
    .unwrap();
    assert_eq!(sweep(&worker).await.recovered, 1);
}

#[tokio::test]
async fn a_failed_stop_counts_an_attempt_and_leaves_the_slot_in_error_with_the_reason() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let slot = common::insert_slot(&milo, "s1", "error", None, 60.0).await;
    let platform = simulated();
    platform.fail("app-s1");
    let worker = common::slot_recovery(&db, &common::settings(), &platform);

    let report = check(&worker, slot).await;

    assert_eq!(
        report,
        SlotRecoveryReport {
            failed: 1,
            ..Default::default()
        }
    );
    let (status, attempts, message) = common::slot_state(&milo, slot).await.unwrap();
    assert_eq!((status.as_str(), attempts), ("error", 1));
    let message = message.expect("an error message");
    assert!(message.contains("recovery attempt 1 failed"), "{message}");
    assert!(message.contains("simulated platform failure"), "{message}");
    assert_eq!(
        common::slot_audit(&milo, slot).await,
        pairs(&[("slot_recovery_failed", "notify")])
    );
    assert_eq!(
        operations(&platform),
        [(Operation::Stop, "app-s1".into(), false)]
    );
}

#[tokio::test]
async fn after_three_failed_recoveries_the_application_and_the_slot_row_are_deleted() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "s1", "error", Some(bot), 60.0).await;
    let platform = simulated();
    platform.fail("app-s1");
    let mut settings = common::settings();
    settings.slots.max_recovery_attempts = 3;
    let worker = common::slot_recovery(&db, &settings, &platform);

    for attempt in 1..=3 {
        let report = sweep(&worker).await;
        assert_eq!(
            report,
            SlotRecoveryReport {
                failed: 1,
                ..Default::default()
            }
        );
        let (status, attempts, _) = common::slot_state(&milo, slot).await.unwrap();
        assert_eq!((status.as_str(), attempts), ("error", attempt));
    }
    platform.heal("app-s1");
    let report = sweep(&worker).await;

    assert_eq!(
        report,
        SlotRecoveryReport {
            deleted: 1,
            ..Default::default()
        }
    );
    assert_eq!(common::slot_state(&milo, slot).await, None);
    let recorded: i64 = milo
        .query_one(
            "SELECT count(*) FROM milo_workers.slot_status_since WHERE slot_id = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 0, "the deleted slot's status record goes with it");
    let stop = (Operation::Stop, "app-s1".to_owned(), false);
    assert_eq!(
        operations(&platform),
        [
            stop.clone(),
            stop.clone(),
            stop,
            (Operation::Delete, "app-s1".into(), true)
        ]
    );
    assert_eq!(common::bot_status(&milo, bot).await, "FATAL");
    let audit = common::slot_audit(&milo, slot).await;
    let actions: Vec<&str> = audit.iter().map(|(action, _)| action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "bot_marked_fatal",
            "slot_recovery_failed",
            "slot_recovery_failed",
            "slot_recovery_failed",
            "slot_deleted"
        ]
    );
}

#[tokio::test]
async fn the_daemon_retries_a_failing_slot_until_out_of_attempts_it_is_deleted() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let slot = common::insert_slot(&milo, "s1", "busy", None, 60.0).await;
    let platform = simulated();
    platform.fail("app-s1");
    let mut settings = common::settings();
    settings.slots.max_recovery_attempts = 3;
    settings.slots.retry_backoff = vec![std::time::Duration::from_millis(100)];
    let daemon = common::start(&db, settings, &platform).await;

    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();
    eventually(
        "the platform is asked to delete the slot's application",
        || async {
            platform
                .calls()
                .iter()
                .any(|call| call.operation == Operation::Delete)
        },
    )
    .await;
    assert_eq!(
        common::slot_state(&milo, slot)
            .await
            .map(|(_, attempts, _)| attempts),
        Some(3)
    );
    platform.heal("app-s1");
    eventually("the slot row is deleted", || async {
        common::slot_state(&milo, slot).await.is_none()
    })
    .await;

    let calls = operations(&platform);
    let stops: Vec<_> = calls
        .iter()
        .take_while(|(op, _, _)| *op == Operation::Stop)
        .collect();
    assert_eq!(stops.len(), 3, "three stops before giving up: {calls:?}");
    assert!(stops.iter().all(|(_, _, succeeded)| !succeeded));
    assert!(calls[3..].iter().all(|(op, _, _)| *op == Operation::Delete));
    assert_eq!(
        calls.last(),
        Some(&(Operation::Delete, "app-s1".to_owned(), true))
    );
    let audit = common::slot_audit(&milo, slot).await;
    assert_eq!(
        audit.last(),
        Some(&("slot_deleted".to_owned(), "deadline".to_owned()))
    );
    assert!(daemon.stop().await);
}

#[tokio::test]
async fn a_slot_out_of_attempts_whose_delete_fails_is_kept_with_the_reason() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let slot = common::insert_slot(&milo, "s1", "error", None, 60.0).await;
    set_attempts(&milo, slot, 3).await;
    let platform = simulated();
    platform.fail("app-s1");
    let mut settings = common::settings();
    settings.slots.max_recovery_attempts = 3;
    let worker = common::slot_recovery(&db, &settings, &platform);

    let report = check(&worker, slot).await;

    assert_eq!(
        report,
        SlotRecoveryReport {
            failed: 1,
            ..Default::default()
        }
    );
    let (status, attempts, message) = common::slot_state(&milo, slot).await.expect("kept");
    assert_eq!((status.as_str(), attempts), ("error", 3));
    let message = message.expect("an error message");
    assert!(message.contains("delete failed"), "{message}");
    assert_eq!(
        operations(&platform),
        [(Operation::Delete, "app-s1".into(), false)]
    );
    assert_eq!(
        common::slot_audit(&milo, slot).await,
        pairs(&[("slot_recovery_failed", "notify")])
    );

    // Once the platform answers again, the next run deletes it.
    platform.heal("app-s1");
    assert_eq!(check(&worker, slot).await.deleted, 1);
    assert_eq!(common::slot_state(&milo, slot).await, None);
}

#[tokio::test]
async fn a_bot_that_already_finished_is_not_moved_to_fatal() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let done = common::insert_bot(&milo, "DONE", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "s1", "error", Some(done), 60.0).await;
    let platform = simulated();
    let worker = common::slot_recovery(&db, &common::settings(), &platform);

    let report = check(&worker, slot).await;

    assert_eq!(report.recovered, 1);
    assert_eq!(
        common::slot_status(&milo, slot).await.as_deref(),
        Some("idle")
    );
    assert_eq!(common::bot_status(&milo, done).await, "DONE");
    assert_eq!(common::bot_deployment_error(&milo, done).await, None);
    assert_eq!(
        common::slot_audit(&milo, slot).await,
        pairs(&[("slot_recovered", "notify")])
    );
}
