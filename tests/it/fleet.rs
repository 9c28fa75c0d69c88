//! `milo-workers status` on a seeded database: counts, the rows the workers would act on and
//! why, the last actions, and the listener's session.

use milo_workers::config::{BotHealthSettings, SlotRecoverySettings};
use milo_workers::fleet;
use tokio_postgres::NoTls;

use crate::common;

#[tokio::test]
async fn the_report_shows_what_the_workers_would_do_and_why() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let minutes = |m: f64| m * 60.0;

    common::insert_slot(&milo, "idle", "idle", None, 0.0).await;
    let in_call = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let broken = common::insert_slot(&milo, "broken", "error", Some(in_call), 0.0).await;
    let doomed = common::insert_slot(&milo, "doomed", "error", None, 0.0).await;
    milo.execute(
        "UPDATE bot_pool_slots SET recovery_attempts = 3 WHERE id = $1",
        &[&doomed],
    )
    .await
    .unwrap();
    let waiting = common::insert_slot(&milo, "waiting", "error", None, 0.0).await;
    milo.execute(
        "UPDATE bot_pool_slots SET recovery_attempts = 1 WHERE id = $1;",
        &[&waiting],
    )
    .await
    .unwrap();
    milo.execute(
        "INSERT INTO milo_workers.slot_retry (slot_id, not_before)
         VALUES ($1, timezone('UTC', now()) + interval '10 minutes')",
        &[&waiting],
    )
    .await
    .unwrap();
    let stuck_bot = common::insert_bot(&milo, "DEPLOYING", None).await;
    let stuck =
        common::insert_slot(&milo, "stuck", "deploying", Some(stuck_bot), minutes(20.0)).await;
    let alive_bot = common::insert_bot(&milo, "DEPLOYING", Some(10.0)).await;
    common::insert_slot(&milo, "alive", "deploying", Some(alive_bot), minutes(20.0)).await;
    common::insert_slot(&milo, "young", "deploying", None, minutes(1.0)).await;
    let silent = common::insert_bot(&milo, "IN_CALL", Some(minutes(15.0))).await;
    // Orphans: busy with no bot, and deploying for a bot that is long DONE.
    let done_bot = common::insert_bot(&milo, "DONE", None).await;
    let orphan_busy = common::insert_slot(&milo, "orphan-busy", "busy", None, 0.0).await;
    let orphan_deploying =
        common::insert_slot(&milo, "orphan-deploying", "deploying", Some(done_bot), 0.0).await;
    let recently_freed = common::insert_slot(&milo, "recent", "busy", None, 0.0).await;
    milo.execute(
        "UPDATE milo_workers.slot_status_since SET since = since - interval '10 minutes'
         WHERE slot_id = ANY($1);
        ",
        &[&vec![orphan_busy, orphan_deploying]],
    )
    .await
    .unwrap();
    milo.execute(
        "UPDATE milo_workers.bot_status_since SET since = since - interval '10 minutes'
         WHERE bot_id = $1",
        &[&done_bot],
    )
    .await
    .unwrap();

    for n in 1..=12 {
        milo.execute(
            "INSERT INTO milo_workers.audit_log
                 (worker, trigger, action, slot_id, reason, replica)
             VALUES ('slot_recovery', 'tick', 'slot_recovered', $1, $2, 'test')",
            &[&n, &format!("entry {n}")],
        )
        .await
        .unwrap();
    }

    let slots = SlotRecoverySettings::default();
    let bots = BotHealthSettings::default();
    let report = fleet::report(&milo, &slots, &bots).await.expect("report");

    let count = |pairs: &[(String, i64)], status: &str| {
        pairs.iter().find(|(s, _)| s == status).map(|(_, n)| *n)
    };
    assert_eq!(count(&report.slots_by_status, "error"), Some(3));
    assert_eq!(count(&report.slots_by_status, "deploying"), Some(4));
    assert_eq!(count(&report.slots_by_status, "busy"), Some(2));
    assert_eq!(count(&report.slots_by_status, "idle"), Some(1));
    assert_eq!(count(&report.bots_by_status, "IN_CALL"), Some(2));

    let acted: Vec<(&str, i32, &str)> = report
        .actionable
        .iter()
        .map(|a| (a.kind, a.id, a.action))
        .collect();
    assert_eq!(
        acted,
        [
            ("slot", broken, "stop, free the slot, mark its bot FATAL"),
            ("slot", doomed, "delete the application and the slot"),
            ("slot", waiting, "nothing yet: waiting for the retry"),
            ("slot", stuck, "stop, free the slot, mark its bot FATAL"),
            ("slot", orphan_busy, "stop and free the orphaned slot"),
            ("slot", orphan_deploying, "stop and free the slot"),
            ("bot", silent, "mark the bot FATAL, stop and free its slot"),
        ]
    );
    // Slot and bot ids can be equal: look a row up by both.
    let why = |kind: &str, id: i32| {
        report
            .actionable
            .iter()
            .find(|a| a.kind == kind && a.id == id)
            .map(|a| a.why.clone())
            .unwrap()
    };
    assert!(
        why("slot", doomed).contains("3 failed recoveries (limit 3)"),
        "{}",
        why("slot", doomed)
    );
    assert!(
        why("slot", stuck).starts_with("deploying for 20m"),
        "{}",
        why("slot", stuck)
    );
    assert!(
        why("bot", silent).starts_with("no heartbeat for 15m"),
        "{}",
        why("bot", silent)
    );

    assert!(
        why("slot", orphan_deploying).starts_with(&format!("deploying for bot {done_bot}, DONE")),
        "{}",
        why("slot", orphan_deploying)
    );
    assert!(!report
        .actionable
        .iter()
        .any(|a| a.kind == "slot" && a.id == recently_freed));

    assert_eq!(report.recent_actions.len(), 10);
    assert_eq!(report.recent_actions[0].reason, "entry 12");
    assert!(report.listeners.is_empty());
    let text = report.to_string();
    assert!(text.contains("LISTENER: none connected"), "{text}");

    // A daemon's listener session, as pg_stat_activity shows it.
    let mut config: tokio_postgres::Config = db.url.parse().unwrap();
    config.application_name("milo-workers-listener");
    let (listener, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    let report = fleet::report(&milo, &slots, &bots).await.expect("report");
    assert_eq!(report.listeners.len(), 1);
    let text = report.to_string();
    for heading in [
        "SLOTS",
        "BOTS",
        "WOULD ACT ON NOW",
        "LAST 10 ACTIONS",
        "LISTENER: 1",
    ] {
        assert!(text.contains(heading), "{heading} missing:\n{text}");
    }
    assert!(text.contains("broken (error)"), "{text}");
    drop(listener);
}
