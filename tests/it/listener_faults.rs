//! Faults on the LISTEN connection: its backend killed by the server, and notifications with
//! payloads the triggers never send.

use std::sync::Arc;
use std::time::Duration;

use milo_workers::listener::SLOTS_CHANNEL;
use milo_workers::platform::SimulatedPlatform;

use crate::common::{self, eventually, Logs};

fn pair(action: &str, trigger: &str) -> (String, String) {
    (action.to_owned(), trigger.to_owned())
}

#[tokio::test]
async fn a_slot_broken_while_the_listener_is_killed_is_recovered_by_the_resync_sweep() {
    let (logs, _guard) = Logs::capture("milo_workers=info");
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "s1", "busy", Some(bot), 60.0).await;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    // The reconnect waits at least half its first backoff. Two seconds instead of the default
    // half second leave the killing statement a full second to commit while nobody listens,
    // however loaded the machine: the notification is then lost for certain, and only the
    // resync sweep can find the broken slot.
    let daemon = common::start_on(
        &db.url,
        common::settings(),
        Arc::new(platform.clone()),
        |o| {
            o.listener.backoff_first = Duration::from_secs(2);
        },
    )
    .await;
    assert_eq!(common::listener_backends(&milo, &db).await.len(), 1);

    // One statement, so one transaction: the backend is gone (the call waits for it to exit)
    // before the UPDATE commits, and its NOTIFY goes out at that commit, to nobody.
    let row = milo
        .query_one(
            "WITH killed AS (
                 SELECT pg_terminate_backend(pid, 10000) AS gone FROM pg_stat_activity
                 WHERE application_name = 'milo-workers-listener' AND datname = $1),
             broken AS (
                 UPDATE bot_pool_slots SET status = 'error' WHERE id = $2 RETURNING id)
             SELECT (SELECT count(*) FROM killed WHERE gone), (SELECT count(*) FROM broken)",
            &[&db.name, &slot],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1, 1));

    eventually("the slot is idle again", || async {
        common::slot_status(&milo, slot).await.as_deref() == Some("idle")
    })
    .await;
    assert_eq!(
        common::slot_audit(&milo, slot).await,
        [
            pair("bot_marked_fatal", "resync"),
            pair("slot_recovered", "resync")
        ]
    );
    assert_eq!(daemon.listener.connections(), 2);
    assert_eq!(common::listener_backends(&milo, &db).await.len(), 1);
    assert_eq!(logs.lines_with("listener connection lost").len(), 1);
    let downtime = logs.field("listener reconnected", "downtime_ms");
    eprintln!("listener reconnected after a terminated backend: downtime_ms={downtime:?}");
    assert!(
        downtime.is_some(),
        "the reconnect is logged with its downtime"
    );

    // The new subscription carries notifications again.
    let again = common::insert_slot(&milo, "s2", "busy", None, 60.0).await;
    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&again],
    )
    .await
    .unwrap();
    eventually("the next broken slot is recovered", || async {
        common::slot_audit(&milo, again).await == [pair("slot_recovered", "notify")]
    })
    .await;
    assert!(daemon.stop().await);
}

#[tokio::test]
async fn garbage_payloads_are_counted_and_ignored_and_the_listener_keeps_working() {
    let (logs, _guard) = Logs::capture("milo_workers=info");
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let slot = common::insert_slot(&milo, "s1", "busy", None, 60.0).await;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let daemon = common::start(&db, common::settings(), &platform).await;

    // Postgres accepts payloads shorter than 8000 bytes.
    let unparsable = [
        String::new(),
        "hello".into(),
        "x:error".into(),
        "-1:error".into(),
        "z".repeat(7_990),
        // Multi-byte characters, so cutting it short for the log must respect char boundaries.
        format!("{}:error", "ü".repeat(3_990)),
    ];
    // Well formed, but about rows that do not exist: routed, and the check finds nothing.
    let foreign = [
        "999999:error".to_owned(),
        format!("7:{}", "é".repeat(3_950)),
    ];
    for payload in unparsable.iter().chain(&foreign) {
        assert!(payload.len() < 8000);
        milo.execute("SELECT pg_notify($1, $2)", &[&SLOTS_CHANNEL, payload])
            .await
            .unwrap();
    }
    let listener = daemon.listener.clone();
    eventually("every payload has been read", || {
        let listener = listener.clone();
        async move { listener.notifications() >= 8 }
    })
    .await;
    // A real break, right after.
    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();

    eventually("the broken slot is recovered", || async {
        common::slot_audit(&milo, slot).await == [pair("slot_recovered", "notify")]
    })
    .await;
    assert_eq!(daemon.listener.ignored_payloads(), unparsable.len() as u64);
    assert_eq!(
        daemon.listener.connections(),
        1,
        "garbage must not cost the connection"
    );
    let calls = platform.calls();
    assert_eq!(
        calls.len(),
        1,
        "only the real slot reached the platform: {calls:?}"
    );
    assert_eq!(calls[0].uuid, "app-s1");
    let audited: i64 = milo
        .query_one("SELECT count(*) FROM milo_workers.audit_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 1);

    let ignored = logs.lines_with("ignoring notification payload");
    assert_eq!(ignored.len(), unparsable.len(), "{ignored:#?}");
    for line in ignored.iter().chain(&logs.lines_with("unknown status")) {
        assert!(line.len() < 1_000, "a payload is logged cut short: {line}");
    }
    assert!(daemon.stop().await);
}
