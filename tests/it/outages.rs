//! BotHealth after an outage: no bot is judged on evidence older than the worker's own
//! uninterrupted view of the database, and one run marks at most a capped number of bots.

use std::time::{Duration, SystemTime};

use milo_workers::pipeline::Batch;
use milo_workers::platform::SimulatedPlatform;
use milo_workers::store::Trigger;
use milo_workers::workers::Worker;

use crate::common::{self, eventually};

#[tokio::test]
async fn a_starting_daemon_does_not_mass_mark_bots_whose_heartbeats_could_not_be_written() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    // As after an outage: every bot's last heartbeat is an hour old.
    let mut bots = Vec::new();
    for _ in 0..5 {
        bots.push(common::insert_bot(&milo, "IN_CALL", Some(3600.0)).await);
    }
    let mut settings = common::settings();
    settings.bots.outage_grace = true;
    settings.bots.heartbeat_timeout = Duration::from_secs(2);
    settings.sweep_interval = Duration::from_secs(300);
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let started: SystemTime = milo
        .query_one("SELECT timezone('UTC', now())", &[])
        .await
        .unwrap()
        .get(0);
    let daemon = common::start(&db, settings, &platform).await;

    let first = daemon.run_bot_health_now().await.unwrap();
    assert_eq!(
        (first.checked, first.marked_fatal),
        (5, 0),
        "judged on pre-start evidence"
    );
    for &bot in &bots {
        assert_eq!(common::bot_status(&milo, bot).await, "IN_CALL");
    }

    // Still silent a full timeout into the worker's own view: now they are dead.
    eventually("the silent bots are FATAL", || async {
        let fatal: i64 = milo
            .query_one("SELECT count(*) FROM bots WHERE status = 'FATAL'", &[])
            .await
            .unwrap()
            .get(0);
        fatal == 5
    })
    .await;
    let earliest: SystemTime = milo
        .query_one(
            "SELECT min(at) AT TIME ZONE 'UTC' FROM milo_workers.audit_log",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        earliest >= started + Duration::from_secs(2),
        "marked before the grace ran out"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn one_run_marks_at_most_the_cap_and_says_so() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    for _ in 0..12 {
        common::insert_bot(&milo, "IN_CALL", Some(3600.0)).await;
    }
    let mut settings = common::settings();
    settings.bots.max_fatal_per_run = 5;
    settings.batch_size = 4;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let worker = common::bot_health(&db, &settings, &platform);

    let first = worker.run(&Batch::sweep(Trigger::Tick)).await.unwrap();
    let second = worker.run(&Batch::sweep(Trigger::Tick)).await.unwrap();
    let third = worker.run(&Batch::sweep(Trigger::Tick)).await.unwrap();

    assert_eq!((first.marked_fatal, first.capped), (5, true));
    assert_eq!((second.marked_fatal, second.capped), (5, true));
    assert_eq!((third.marked_fatal, third.capped), (2, false));
    let audited: i64 = milo
        .query_one(
            "SELECT count(*) FROM milo_workers.audit_log WHERE action = 'bot_marked_fatal'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 12);
}
