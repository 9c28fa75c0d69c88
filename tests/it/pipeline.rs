//! The pipeline, through the daemon: a burst of changes is coalesced into a few runs; changes
//! that arrive during a run are handled right after it; stopping waits for the run in flight.
//!
//! Runs are counted by the transactions that wrote audit rows: a batch writes its audit rows
//! in its own transaction, and with a batch size above the burst one run is one transaction.

use std::sync::Arc;
use std::time::Duration;

use milo_workers::config::Settings;
use milo_workers::platform::SimulatedPlatform;
use tokio_postgres::Client;

use crate::common::{self, eventually, GatedPlatform, TestDb};

const BURST: i64 = 1000;

fn burst_settings() -> Settings {
    Settings {
        batch_size: 2 * BURST as usize,
        platform_concurrency: 32,
        // The gate below may hold a call for a while; only a hung call may time out.
        platform_timeout: Duration::from_secs(30),
        ..common::settings()
    }
}

/// `BURST` busy slots, inserted before the daemon starts so their inserts are not seen.
async fn insert_busy_slots(milo: &Client) {
    milo.execute(
        "INSERT INTO bot_pool_slots (coolify_service_uuid, slot_name, status)
         SELECT 'app-b' || g, 'b' || g, 'busy' FROM generate_series(1, $1::int8) g",
        &[&BURST],
    )
    .await
    .unwrap();
}

async fn count_idle(milo: &Client) -> i64 {
    milo.query_one(
        "SELECT count(*) FROM bot_pool_slots WHERE status = 'idle'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Asserts every slot was recovered once, on notifications, and returns the number of runs.
async fn all_recovered_once(milo: &Client, platform: &GatedPlatform) -> i64 {
    eventually("every slot of the burst is idle again", || async {
        count_idle(milo).await == BURST
    })
    .await;
    assert_eq!(
        platform.inner.calls().len() as i64,
        BURST,
        "one stop per slot"
    );
    assert_eq!(platform.inner.overlapping_calls(), 0);
    let audit: Vec<(String, String, i64)> = milo
        .query(
            "SELECT action, trigger, count(*) FROM milo_workers.audit_log
             GROUP BY action, trigger",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        audit,
        [("slot_recovered".to_owned(), "notify".to_owned(), BURST)]
    );
    common::audit_transactions(milo).await
}

#[tokio::test]
async fn a_thousand_changes_in_one_update_are_coalesced_into_a_few_runs() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    insert_busy_slots(&milo).await;
    let platform = GatedPlatform::open(SimulatedPlatform::new(Duration::from_millis(20), 0.0));
    let daemon = common::start_with(&db, burst_settings(), Arc::new(platform.clone())).await;

    milo.execute("UPDATE bot_pool_slots SET status = 'error'", &[])
        .await
        .unwrap();

    let runs = all_recovered_once(&milo, &platform).await;
    // Typically two: the first change at once, the rest together after it.
    assert!(runs <= 10, "{BURST} changes took {runs} runs");
    assert!(daemon.stop().await);
}

#[tokio::test]
async fn a_thousand_changes_in_separate_transactions_are_coalesced_into_far_fewer_runs() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    insert_busy_slots(&milo).await;
    let ids: Vec<i32> = milo
        .query("SELECT id FROM bot_pool_slots ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let platform = GatedPlatform::open(SimulatedPlatform::new(Duration::from_millis(20), 0.0));
    let daemon = common::start_with(&db, burst_settings(), Arc::new(platform.clone())).await;

    // One autocommit UPDATE per slot, pipelined on one connection; without waiting for each
    // commit to be flushed they come as fast as the server takes them.
    milo.batch_execute("SET synchronous_commit = off")
        .await
        .unwrap();
    let statement = milo
        .prepare("UPDATE bot_pool_slots SET status = 'error' WHERE id = $1")
        .await
        .unwrap();
    let updates = ids.iter().map(|id| {
        let statement = &statement;
        let milo = &milo;
        async move { milo.execute(statement, &[id]).await }
    });
    for updated in futures::future::join_all(updates).await {
        assert_eq!(updated.unwrap(), 1);
    }

    let runs = all_recovered_once(&milo, &platform).await;
    // Runs are at least the debounce window apart, however fast the changes come.
    assert!(runs <= 50, "{BURST} changes took {runs} runs");
    assert!(daemon.stop().await);
}

#[tokio::test]
async fn a_change_that_arrives_during_a_run_is_handled_right_after_it() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let first = common::insert_slot(&milo, "a", "busy", None, 60.0).await;
    let second = common::insert_slot(&milo, "b", "busy", None, 60.0).await;
    let platform = GatedPlatform::closed(SimulatedPlatform::new(Duration::from_millis(300), 0.0));
    let settings = Settings {
        platform_timeout: Duration::from_secs(30),
        ..common::settings()
    };
    let daemon = common::start_with(&db, settings, Arc::new(platform.clone())).await;

    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&first],
    )
    .await
    .unwrap();
    eventually("the first slot's stop is in flight", || async {
        platform.started() == 1
    })
    .await;
    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&second],
    )
    .await
    .unwrap();
    let inbox = daemon.slot_recovery.inbox().clone();
    eventually("the second slot waits for the next run", || async {
        inbox.pending_ids() == 1
    })
    .await;
    assert_eq!(
        common::slot_status(&milo, first).await.as_deref(),
        Some("error")
    );
    platform.open_gate();

    eventually("both slots are idle", || async {
        common::slot_status(&milo, first).await.as_deref() == Some("idle")
            && common::slot_status(&milo, second).await.as_deref() == Some("idle")
    })
    .await;
    let recovered = [("slot_recovered".to_owned(), "notify".to_owned())];
    assert_eq!(common::slot_audit(&milo, first).await, recovered);
    assert_eq!(common::slot_audit(&milo, second).await, recovered);
    assert_eq!(
        common::audit_transactions(&milo).await,
        2,
        "two runs, one after the other"
    );
    assert!(daemon.stop().await);
}

#[tokio::test]
async fn stop_waits_for_the_run_in_flight_to_finish() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let slot = common::insert_slot(&milo, "s1", "busy", None, 60.0).await;
    let platform = GatedPlatform::open(SimulatedPlatform::new(Duration::from_secs(1), 0.0));
    let daemon = common::start_with(&db, common::settings(), Arc::new(platform.clone())).await;

    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();
    eventually("the stop is in flight", || async {
        platform.started() == 1
    })
    .await;

    assert!(
        daemon.stop().await,
        "the run finished within the grace period"
    );
    assert_eq!(
        common::slot_status(&milo, slot).await.as_deref(),
        Some("idle")
    );
    assert_eq!(
        common::slot_audit(&milo, slot).await,
        [("slot_recovered".to_owned(), "notify".to_owned())]
    );
}

#[tokio::test]
async fn stop_cancels_a_run_that_outlasts_the_grace_period_and_rolls_it_back() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let slot = common::insert_slot(&milo, "s1", "busy", None, 60.0).await;
    let platform = GatedPlatform::closed(SimulatedPlatform::new(Duration::ZERO, 0.0));
    let settings = Settings {
        platform_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_millis(200),
        ..common::settings()
    };
    let daemon = common::start_with(&db, settings, Arc::new(platform.clone())).await;

    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();
    eventually("the stop is in flight", || async {
        platform.started() == 1
    })
    .await;

    assert!(!daemon.stop().await, "the run had to be cancelled");
    assert_eq!(
        common::slot_status(&milo, slot).await.as_deref(),
        Some("error")
    );
    assert_eq!(common::slot_audit(&milo, slot).await, []);
}
