//! The daemon behind a proxy that breaks its connections: cut, silently blackholed, and a
//! full outage. The test's own client connects directly, so it changes the database while
//! the daemon cannot see it.

use std::sync::Arc;
use std::time::Duration;

use milo_workers::daemon::Daemon;
use milo_workers::platform::SimulatedPlatform;
use milo_workers::workers::RunError;
use tokio_postgres::Client;

use crate::common::{self, eventually, eventually_within, Logs, TestDb};
use crate::proxy::Proxy;

/// A silent loss is noticed by the ping: up to one interval until it is sent, and one more
/// until it counts as lost (5 s each), plus the reconnect's connect timeout (5 s).
const PING_NOTICES: Duration = Duration::from_secs(40);

struct Setup {
    _db: TestDb,
    milo: Client,
    proxy: Proxy,
    daemon: Daemon,
    /// A bot in a call, on `slot`.
    bot: i32,
    /// A busy slot, for the test to break.
    slot: i32,
}

/// The rows exist before the daemon starts, so that no notification of theirs is still on
/// its way (and no run for it in flight) when the test injects its fault.
async fn setup() -> Setup {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "s1", "busy", Some(bot), 60.0).await;
    let proxy = Proxy::start(&common::server_url()).await;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let daemon = common::start_on(
        &proxy.url_for(&db.url),
        common::settings(),
        Arc::new(platform),
        |_| {},
    )
    .await;
    // A run, so that the pool holds a connection through the proxy too.
    daemon
        .run_slot_recovery_now()
        .await
        .expect("a sweep through the proxy");
    assert!(
        proxy.open() >= 2,
        "listener and pool both go through the proxy"
    );
    Setup {
        _db: db,
        milo,
        proxy,
        daemon,
        bot,
        slot,
    }
}

async fn break_slot(milo: &Client, slot: i32) {
    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();
}

async fn wait_disconnected(daemon: &Daemon, bound: Duration) {
    let listener = daemon.listener.clone();
    eventually_within(bound, "the listener knows its connection is gone", || {
        let listener = listener.clone();
        async move { !listener.is_connected() }
    })
    .await;
}

async fn wait_recovered(milo: &Client, slot: i32) {
    eventually("the slot is idle again", || async {
        common::slot_status(milo, slot).await.as_deref() == Some("idle")
    })
    .await;
}

/// After a fault healed: a further break goes the notification path again.
async fn assert_notifications_flow(s: &Setup, name: &str) {
    let slot = common::insert_slot(&s.milo, name, "busy", None, 60.0).await;
    break_slot(&s.milo, slot).await;
    eventually(
        "a slot broken after the fault is recovered by its notification",
        || async {
            common::slot_audit(&s.milo, slot).await
                == [("slot_recovered".to_owned(), "notify".to_owned())]
        },
    )
    .await;
}

#[tokio::test]
async fn after_every_connection_is_cut_the_daemon_reconnects_and_converges() {
    let (logs, _guard) = Logs::capture("milo_workers=info");
    let s = setup().await;
    let slot = s.slot;
    let accepted = s.proxy.accepted();

    s.proxy.cut();
    wait_disconnected(&s.daemon, common::EVENTUALLY).await;
    break_slot(&s.milo, slot).await;

    wait_recovered(&s.milo, slot).await;
    assert_eq!(s.daemon.listener.connections(), 2);
    assert!(
        s.proxy.accepted() > accepted,
        "new connections replaced the cut ones"
    );
    assert_notifications_flow(&s, "s2").await;
    eprintln!(
        "after a cut: listener downtime_ms={:?}",
        logs.field("listener reconnected", "downtime_ms")
    );
    assert!(s.daemon.stop().await);
}

#[tokio::test]
async fn a_silent_network_loss_is_noticed_by_the_ping_and_the_daemon_converges() {
    let (logs, _guard) = Logs::capture("milo_workers=info");
    let s = setup().await;
    let slot = s.slot;

    let blackholed = std::time::Instant::now();
    s.proxy.blackhole();
    wait_disconnected(&s.daemon, PING_NOTICES).await;
    let noticed_after = blackholed.elapsed();
    let lost = logs.lines_with("listener connection lost");
    assert_eq!(lost.len(), 1, "{lost:#?}");
    assert!(
        lost[0].contains("ping got no answer"),
        "the ping noticed: {}",
        lost[0]
    );
    // Its notification goes into the blackhole, or to nobody: only the resync can see it.
    break_slot(&s.milo, slot).await;
    s.proxy.heal();

    wait_recovered(&s.milo, slot).await;
    assert_eq!(
        common::slot_audit(&s.milo, slot).await,
        [
            ("bot_marked_fatal".to_owned(), "resync".to_owned()),
            ("slot_recovered".to_owned(), "resync".to_owned())
        ]
    );
    assert_eq!(s.daemon.listener.connections(), 2);
    assert_notifications_flow(&s, "s2").await;
    eprintln!(
        "after a blackhole: noticed after {noticed_after:?}, listener downtime_ms={:?}",
        logs.field("listener reconnected", "downtime_ms")
    );
    assert!(s.daemon.stop().await);
}

#[tokio::test]
async fn during_a_database_outage_runs_fail_cleanly_and_the_first_run_after_it_sweeps() {
    let (logs, _guard) = Logs::capture("milo_workers=info");
    let s = setup().await;
    let (bot, slot) = (s.bot, s.slot);

    s.proxy.refuse();
    s.proxy.cut();
    wait_disconnected(&s.daemon, common::EVENTUALLY).await;
    break_slot(&s.milo, slot).await;

    // A run now fails: promptly, with an error (not a hang, and not a dead worker task).
    let outcome = tokio::time::timeout(common::EVENTUALLY, s.daemon.run_slot_recovery_now())
        .await
        .expect("a run during the outage ends");
    match outcome {
        Err(RunError::Store(_)) => {}
        other => panic!("expected a database error, got {other:?}"),
    }
    let failed = logs.lines_with("run failed; will retry as a full sweep");
    assert!(
        !failed.is_empty() && failed[0].contains("ERROR"),
        "{failed:#?}"
    );
    assert_eq!(
        common::slot_status(&s.milo, slot).await.as_deref(),
        Some("error")
    );
    assert!(s.proxy.refused() > 0);

    s.proxy.heal();
    wait_recovered(&s.milo, slot).await;
    // The broken slot's notification reached nobody; a sweep found it.
    assert_eq!(
        common::slot_audit(&s.milo, slot).await,
        [
            ("bot_marked_fatal".to_owned(), "resync".to_owned()),
            ("slot_recovered".to_owned(), "resync".to_owned())
        ]
    );
    assert_eq!(common::bot_status(&s.milo, bot).await, "FATAL");
    eventually("the log says runs resumed", || async {
        !logs.lines_with("runs resumed").is_empty()
    })
    .await;
    assert_eq!(s.daemon.listener.connections(), 2);
    assert_notifications_flow(&s, "s2").await;
    eprintln!(
        "after an outage: listener downtime_ms={:?}",
        logs.field("listener reconnected", "downtime_ms")
    );
    assert!(s.daemon.stop().await);
}
