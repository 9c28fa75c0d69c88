//! BotHealth: a bot that should be heartbeating but has been silent for longer than the
//! heartbeat timeout is marked FATAL, and its slot is stopped and freed. A bot that never
//! heartbeated is timed from when it entered its status, never from the epoch.

use milo_workers::pipeline::Batch;
use milo_workers::platform::{Operation, SimulatedPlatform};
use milo_workers::store::Trigger;
use milo_workers::workers::{BotHealth, BotHealthReport, Worker};

use crate::common::{self, eventually, TestDb};

/// Well past the default heartbeat timeout of 10 minutes.
const SILENT_SECS: f64 = 11.0 * 60.0;

const WATCHED: [&str; 4] = ["IN_CALL", "JOINING_CALL", "IN_WAITING_ROOM", "LEAVING"];

fn simulated() -> SimulatedPlatform {
    SimulatedPlatform::new(std::time::Duration::ZERO, 0.0)
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

async fn sweep(worker: &BotHealth) -> BotHealthReport {
    worker
        .run(&Batch::sweep(Trigger::Manual))
        .await
        .expect("run")
}

async fn check(worker: &BotHealth, bots: Vec<i32>) -> BotHealthReport {
    worker
        .run(&Batch::ids(Trigger::Notify, bots))
        .await
        .expect("run")
}

#[tokio::test]
async fn silent_bots_in_every_watched_status_are_marked_fatal_and_their_slots_freed() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let mut silent = Vec::new();
    for (n, status) in WATCHED.iter().enumerate() {
        let bot = common::insert_bot(&milo, status, Some(SILENT_SECS)).await;
        let slot = common::insert_slot(&milo, &format!("s{n}"), "busy", Some(bot), 60.0).await;
        silent.push((bot, slot));
    }
    let platform = simulated();
    let worker = common::bot_health(&db, &common::settings(), &platform);

    let report = sweep(&worker).await;

    let expected = BotHealthReport {
        checked: 4,
        marked_fatal: 4,
        resources_released: 4,
        capped: false,
    };
    assert_eq!(report, expected);
    for (n, (bot, slot)) in silent.into_iter().enumerate() {
        assert_eq!(
            common::bot_status(&milo, bot).await,
            "FATAL",
            "{}",
            WATCHED[n]
        );
        let error = common::bot_deployment_error(&milo, bot).await.unwrap();
        assert!(error.contains("no heartbeat for more than 10m"), "{error}");
        assert!(error.contains(WATCHED[n]), "{error}");
        assert_eq!(
            common::slot_state(&milo, slot).await,
            Some(("idle".into(), 0, None))
        );
        assert_eq!(
            common::bot_audit(&milo, bot).await,
            pairs(&[
                ("bot_marked_fatal", "manual"),
                ("resources_released", "manual")
            ])
        );
        assert_eq!(
            common::slot_audit(&milo, slot).await,
            pairs(&[("resources_released", "manual")])
        );
    }
    let calls = platform.calls();
    assert!(calls
        .iter()
        .all(|c| c.operation == Operation::Stop && c.succeeded));
    let mut stopped: Vec<String> = calls.into_iter().map(|c| c.uuid).collect();
    stopped.sort();
    assert_eq!(stopped, ["app-s0", "app-s1", "app-s2", "app-s3"]);
}

#[tokio::test]
async fn a_silent_bot_is_marked_fatal_by_the_daemon_when_its_status_changes() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_WAITING_ROOM", Some(SILENT_SECS)).await;
    let slot = common::insert_slot(&milo, "s1", "busy", Some(bot), 60.0).await;
    let platform = simulated();
    let daemon = common::start(&db, common::settings(), &platform).await;

    milo.execute("UPDATE bots SET status = 'IN_CALL' WHERE id = $1", &[&bot])
        .await
        .unwrap();

    eventually("the slot of the silent bot is freed", || async {
        common::slot_status(&milo, slot).await.as_deref() == Some("idle")
    })
    .await;
    assert_eq!(common::bot_status(&milo, bot).await, "FATAL");
    assert_eq!(
        common::bot_audit(&milo, bot).await,
        pairs(&[
            ("bot_marked_fatal", "notify"),
            ("resources_released", "notify")
        ])
    );
    assert!(daemon.stop().await);
}

#[tokio::test]
async fn a_failed_release_leaves_the_slot_in_error_with_the_reason() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(SILENT_SECS)).await;
    let slot = common::insert_slot(&milo, "s1", "busy", Some(bot), 60.0).await;
    let platform = simulated();
    platform.fail("app-s1");
    let worker = common::bot_health(&db, &common::settings(), &platform);

    let report = check(&worker, vec![bot]).await;

    let expected = BotHealthReport {
        checked: 1,
        marked_fatal: 1,
        resources_released: 0,
        capped: false,
    };
    assert_eq!(report, expected);
    assert_eq!(common::bot_status(&milo, bot).await, "FATAL");
    let (status, attempts, message) = common::slot_state(&milo, slot).await.unwrap();
    assert_eq!((status.as_str(), attempts), ("error", 0));
    let message = message.expect("an error message");
    assert!(
        message.contains("releasing the slot of a FATAL bot failed"),
        "{message}"
    );
    assert!(message.contains("simulated platform failure"), "{message}");
    assert_eq!(
        common::slot_audit(&milo, slot).await,
        pairs(&[("release_failed", "notify")])
    );
}

#[tokio::test]
async fn a_bot_that_never_heartbeated_is_timed_from_when_it_entered_its_status() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "JOINING_CALL", None).await;
    milo.execute("UPDATE bots SET status = 'IN_CALL' WHERE id = $1", &[&bot])
        .await
        .unwrap();
    let platform = simulated();
    let worker = common::bot_health(&db, &common::settings(), &platform);

    let report = check(&worker, vec![bot]).await;

    assert_eq!(
        report,
        BotHealthReport {
            checked: 1,
            ..Default::default()
        }
    );
    assert_eq!(common::bot_status(&milo, bot).await, "IN_CALL");

    // Entered IN_CALL longer ago than the timeout, and still no heartbeat: dead.
    milo.execute(
        "UPDATE milo_workers.bot_status_since SET since = since - interval '11 minutes'
         WHERE bot_id = $1",
        &[&bot],
    )
    .await
    .unwrap();
    let report = check(&worker, vec![bot]).await;

    assert_eq!(report.marked_fatal, 1);
    assert_eq!(common::bot_status(&milo, bot).await, "FATAL");
    let error = common::bot_deployment_error(&milo, bot).await.unwrap();
    assert!(
        error.contains("no heartbeat within 10m of entering IN_CALL"),
        "{error}"
    );
}

#[tokio::test]
async fn deploying_bots_belong_to_slot_recovery_and_are_never_judged_by_heartbeat() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let ancient = common::insert_bot(&milo, "DEPLOYING", Some(30.0 * 24.0 * 3600.0)).await;
    let never = common::insert_bot(&milo, "DEPLOYING", None).await;
    milo.execute(
        "UPDATE milo_workers.bot_status_since SET since = since - interval '30 days'",
        &[],
    )
    .await
    .unwrap();
    let slot = common::insert_slot(&milo, "s1", "deploying", Some(ancient), 60.0).await;
    let platform = simulated();
    let worker = common::bot_health(&db, &common::settings(), &platform);

    assert_eq!(sweep(&worker).await, BotHealthReport::default());
    assert_eq!(
        check(&worker, vec![ancient, never]).await,
        BotHealthReport::default()
    );

    assert_eq!(common::bot_status(&milo, ancient).await, "DEPLOYING");
    assert_eq!(common::bot_status(&milo, never).await, "DEPLOYING");
    assert_eq!(
        common::slot_status(&milo, slot).await.as_deref(),
        Some("deploying")
    );
    assert_eq!(platform.calls(), []);
}

#[tokio::test]
async fn bots_that_heartbeat_within_the_timeout_are_left_alone() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let mut fresh = Vec::new();
    for (n, status) in WATCHED.iter().enumerate() {
        let bot = common::insert_bot(&milo, status, Some(9.0 * 60.0)).await;
        let slot = common::insert_slot(&milo, &format!("s{n}"), "busy", Some(bot), 60.0).await;
        fresh.push((bot, slot));
    }
    // Entered long ago: only the heartbeat keeps them alive.
    milo.execute(
        "UPDATE milo_workers.bot_status_since SET since = since - interval '1 day'",
        &[],
    )
    .await
    .unwrap();
    let platform = simulated();
    let worker = common::bot_health(&db, &common::settings(), &platform);

    let report = sweep(&worker).await;

    assert_eq!(
        report,
        BotHealthReport {
            checked: 4,
            ..Default::default()
        }
    );
    for (n, (bot, slot)) in fresh.into_iter().enumerate() {
        assert_eq!(common::bot_status(&milo, bot).await, WATCHED[n]);
        assert_eq!(
            common::slot_status(&milo, slot).await.as_deref(),
            Some("busy")
        );
    }
    assert_eq!(platform.calls(), []);
}

#[tokio::test]
async fn silence_is_judged_in_utc_whatever_the_time_zone_of_the_workers_sessions() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let fresh = common::insert_bot(&milo, "IN_CALL", Some(60.0)).await;
    let silent = common::insert_bot(&milo, "IN_CALL", Some(SILENT_SECS)).await;
    let platform = simulated();

    // Far ahead of UTC: a fresh heartbeat read as local time would look half a day old.
    let set_zone = |zone: &str| format!("ALTER DATABASE {} SET timezone = '{zone}'", db.name);
    milo.batch_execute(&set_zone("Pacific/Kiritimati"))
        .await
        .unwrap();
    let worker = common::bot_health(&db, &common::settings(), &platform);
    assert_eq!(check(&worker, vec![fresh]).await.marked_fatal, 0);
    assert_eq!(common::bot_status(&milo, fresh).await, "IN_CALL");

    // Behind UTC: a silent bot's heartbeat read as local time would lie in the future.
    milo.batch_execute(&set_zone("America/Los_Angeles"))
        .await
        .unwrap();
    let worker = common::bot_health(&db, &common::settings(), &platform);
    assert_eq!(check(&worker, vec![fresh, silent]).await.marked_fatal, 1);
    assert_eq!(common::bot_status(&milo, fresh).await, "IN_CALL");
    assert_eq!(common::bot_status(&milo, silent).await, "FATAL");
}
