//! Deadline-driven checks: a silent bot, a slot stuck deploying and a failed recovery are each
//! handled at the moment they become actionable, not at the next tick (five minutes here).
//!
//! No test asserts an upper bound on time: "at its deadline" is shown by the audit trigger
//! being `deadline` while the tick is five minutes away, and "never early" by the lower bound.
//! The measured delays are in BENCHMARKS.md.

use std::time::Duration;

use milo_workers::config::Settings;
use milo_workers::platform::SimulatedPlatform;
use tokio_postgres::Client;

use crate::common::{self, eventually};

fn settings() -> Settings {
    let mut settings = common::settings();
    settings.sweep_interval = Duration::from_secs(300);
    settings.bots.heartbeat_timeout = Duration::from_secs(3);
    settings
}

async fn heartbeat(milo: &Client, bot: i32) {
    milo.execute(
        "UPDATE bots SET last_heartbeat = timezone('UTC', now()) WHERE id = $1",
        &[&bot],
    )
    .await
    .unwrap();
}

/// `(trigger, seconds from status_since to at)` of the bot's FATAL entry, if any.
async fn fatal_entry(milo: &Client, bot: i32) -> Option<(String, f64)> {
    milo.query_opt(
        "SELECT trigger,
                extract(epoch FROM at - (status_since AT TIME ZONE 'UTC'))::float8
         FROM milo_workers.audit_log WHERE bot_id = $1 AND action = 'bot_marked_fatal'",
        &[&bot],
    )
    .await
    .unwrap()
    .map(|row| (row.get(0), row.get(1)))
}

#[tokio::test]
async fn a_bot_whose_heartbeats_stop_is_marked_fatal_at_its_deadline_not_at_the_tick() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let daemon = common::start(&db, settings(), &platform).await;

    let bot = common::insert_bot(&milo, "IN_CALL", Some(0.0)).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        heartbeat(&milo, bot).await;
    }

    eventually("the silent bot is FATAL", || async {
        common::bot_status(&milo, bot).await == "FATAL"
    })
    .await;
    let (trigger, silent_for) = fatal_entry(&milo, bot).await.expect("audited");
    assert_eq!(trigger, "deadline");
    assert!(
        silent_for >= 3.0,
        "judged silent after only {silent_for:.3} s"
    );
    eprintln!("detected {silent_for:.3} s after the last heartbeat (timeout 3 s)");
    daemon.stop().await;
}

#[tokio::test]
async fn a_heartbeat_just_before_the_deadline_keeps_the_bot_alive() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let daemon = common::start(&db, settings(), &platform).await;

    let bot = common::insert_bot(&milo, "IN_CALL", Some(0.0)).await;
    // Each heartbeat lands shortly before the 3 s deadline the previous one set.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(common::bot_status(&milo, bot).await, "IN_CALL");
        heartbeat(&milo, bot).await;
    }
    assert_eq!(fatal_entry(&milo, bot).await, None);

    eventually("the bot is FATAL once it stops", || async {
        common::bot_status(&milo, bot).await == "FATAL"
    })
    .await;
    assert_eq!(
        fatal_entry(&milo, bot)
            .await
            .map(|entry| entry.0)
            .as_deref(),
        Some("deadline")
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_slot_stuck_deploying_is_recovered_at_its_deadline() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let mut settings = settings();
    settings.slots.deploy_timeout = Duration::from_secs(2);
    let daemon = common::start(&db, settings, &platform).await;

    let bot = common::insert_bot(&milo, "DEPLOYING", None).await;
    let slot = common::insert_slot(&milo, "stuck", "deploying", Some(bot), 0.0).await;

    eventually("the stuck slot is idle", || async {
        common::slot_status(&milo, slot).await.as_deref() == Some("idle")
    })
    .await;
    let audit = common::slot_audit(&milo, slot).await;
    assert!(
        audit.contains(&("slot_recovered".into(), "deadline".into())),
        "{audit:?}"
    );
    let waited: f64 = milo
        .query_one(
            "SELECT extract(epoch FROM at - (status_since AT TIME ZONE 'UTC'))::float8
             FROM milo_workers.audit_log WHERE slot_id = $1 AND action = 'slot_recovered'",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        waited >= 2.0,
        "recovered after only {waited:.3} s of deploying"
    );
    assert_eq!(common::bot_status(&milo, bot).await, "FATAL");
    daemon.stop().await;
}

#[tokio::test]
async fn a_failed_recovery_is_retried_on_its_backoff_schedule_across_a_restart() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let mut settings = settings();
    settings.slots.retry_backoff = vec![Duration::from_secs(3)];
    let slot = common::insert_slot(&milo, "flaky", "busy", None, 0.0).await;
    platform.fail("app-flaky");

    let first = common::start(&db, settings.clone(), &platform).await;
    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();
    eventually("the first attempt failed", || async {
        common::slot_audit(&milo, slot).await.len() == 1
    })
    .await;
    first.stop().await;
    platform.heal("app-flaky");
    let not_before: std::time::SystemTime = milo
        .query_one(
            "SELECT not_before FROM milo_workers.slot_retry WHERE slot_id = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);

    // A new daemon, as after a restart; its start-up sweep must respect the stored schedule.
    settings.sweep_on_start = true;
    let second = common::start(&db, settings, &platform).await;
    eventually("the retry recovered the slot", || async {
        common::slot_status(&milo, slot).await.as_deref() == Some("idle")
    })
    .await;

    let audit = common::slot_audit(&milo, slot).await;
    assert_eq!(
        audit,
        [
            ("slot_recovery_failed".to_owned(), "notify".to_owned()),
            ("slot_recovered".to_owned(), "deadline".to_owned())
        ]
    );
    let retried_at: std::time::SystemTime = milo
        .query_one(
            "SELECT at AT TIME ZONE 'UTC' FROM milo_workers.audit_log
             WHERE slot_id = $1 AND action = 'slot_recovered'",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        retried_at >= not_before,
        "retried before its backoff had passed"
    );
    second.stop().await;
}
