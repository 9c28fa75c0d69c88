//! A storm of status changes: 50,000 slots inserted and then broken in five transactions of
//! 10,000, so 100,000 notifications (and 50,000 more as the slots come back to idle) over
//! 50,000 distinct rows.
//!
//! What this can show about memory: the per-worker inbox is a set of row ids, so what waits
//! is bounded by the number of distinct rows (50,000) however many notifications arrive (a
//! queue of messages would reach 100,000 and more here); between listener and router sits a
//! bounded channel (4,096 events). The test samples `pending_ids` throughout the storm. It does
//! not measure the process's memory: tests share the process, so that figure would be noise.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use milo_workers::platform::SimulatedPlatform;

use crate::common::{self, eventually_within, Logs};

const SLOTS: i32 = 50_000;
const TRANSACTIONS: i32 = 5;
/// A loaded two-core machine needs a while for 50,000 recoveries in a debug build.
const STORM_BOUND: Duration = Duration::from_secs(300);

#[tokio::test]
async fn a_storm_of_changes_is_coalesced_into_few_runs_and_every_slot_is_recovered() {
    let (_logs, _guard) = Logs::capture("milo_workers=warn");
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let daemon = common::start(&db, common::settings(), &platform).await;
    let inbox = daemon.slot_recovery.inbox().clone();

    let most_pending = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let (inbox, most_pending, sampling) =
            (inbox.clone(), most_pending.clone(), sampling.clone());
        async move {
            while sampling.load(Ordering::Relaxed) {
                most_pending.fetch_max(inbox.pending_ids(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });

    let started = std::time::Instant::now();
    let runs_before = daemon.slot_recovery.runs();
    let ids = milo
        .query_one(
            "WITH inserted AS (
                 INSERT INTO bot_pool_slots (coolify_service_uuid, slot_name)
                 SELECT 'app-storm-' || i, 'storm-' || i FROM generate_series(1, $1) i
                 RETURNING id)
             SELECT min(id), max(id) FROM inserted",
            &[&SLOTS],
        )
        .await
        .unwrap();
    let (first, last): (i32, i32) = (ids.get(0), ids.get(1));
    assert_eq!(last - first + 1, SLOTS);
    let per_transaction = SLOTS / TRANSACTIONS;
    for n in 0..TRANSACTIONS {
        let from = first + n * per_transaction;
        let broken = milo
            .execute(
                "UPDATE bot_pool_slots SET status = 'error' WHERE id BETWEEN $1 AND $2",
                &[&from, &(from + per_transaction - 1)],
            )
            .await
            .unwrap();
        assert_eq!(broken, per_transaction as u64);
    }

    eventually_within(STORM_BOUND, "every slot is recovered", || async {
        let row = milo
            .query_one(
                "SELECT count(*) FILTER (WHERE status <> 'idle'),
                        (SELECT count(*) FROM milo_workers.audit_log
                         WHERE action = 'slot_recovered')
                 FROM bot_pool_slots",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 0 && row.get::<_, i64>(1) == i64::from(SLOTS)
    })
    .await;
    let recovered_after = started.elapsed();
    // The recoveries' own notifications (error → idle) are checked too; let them drain.
    eventually_within(STORM_BOUND, "the inbox drains", || {
        let inbox = inbox.clone();
        async move { inbox.pending_ids() == 0 }
    })
    .await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();

    let runs = daemon.slot_recovery.runs() - runs_before;
    let most_pending = most_pending.load(Ordering::Relaxed);
    eprintln!(
        "storm: {} changes, {runs} slot recovery runs, at most {most_pending} ids pending, \
         all recovered after {recovered_after:?}",
        2 * SLOTS
    );

    // Each slot exactly once, and never two calls for one slot at a time.
    let distinct: i64 = milo
        .query_one(
            "SELECT count(DISTINCT slot_id) FROM milo_workers.audit_log
             WHERE action = 'slot_recovered'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, i64::from(SLOTS));
    assert_eq!(platform.calls().len(), SLOTS as usize);
    assert_eq!(platform.overlapping_calls(), 0);
    // Coalesced: each run took a whole set of changed ids, not one message. 100,000 changes
    // (150,000 notifications with the recoveries' own) in at most a thousand runs.
    assert!(runs > 0 && runs <= 1_000, "{runs} runs");
    assert!(most_pending > 0, "the sampler saw the storm");
    assert!(most_pending <= SLOTS as usize, "{most_pending} ids pending");
    assert_eq!(daemon.listener.ignored_payloads(), 0);
    assert!(daemon.stop().await);
}
