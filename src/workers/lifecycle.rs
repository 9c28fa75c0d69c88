//! Starting, stopping and running a worker on demand.
//!
//! One task per worker takes batches from its [`Inbox`] and runs them one at a time, so a
//! worker never runs twice at once. Requests that arrive during a run wait in the inbox and
//! make the next batch: nothing is dropped, unlike a "skip if already running" guard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use super::{RunError, RunReport, Worker};
use crate::pipeline::{Inbox, Scope, Timing};
use crate::util::ErrorChain;

/// Retry delay after a failed run: doubles from the first to the last, then stays.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Earliest re-check of a deadline that has already passed.
const DUE_AGAIN: Duration = Duration::from_secs(1);

pub type WorkerInbox<W> = Inbox<<W as Worker>::Report, RunError>;

/// A running worker.
pub struct WorkerHandle<R: RunReport> {
    name: &'static str,
    inbox: Arc<Inbox<R, RunError>>,
    runs: Arc<AtomicU64>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Starts the worker's task. It waits for requests in its inbox; nothing runs until one comes.
pub fn start<W: Worker>(worker: W, timing: Timing) -> WorkerHandle<W::Report> {
    let inbox: Arc<WorkerInbox<W>> = Arc::default();
    let cancel = CancellationToken::new();
    let runs = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(drive(
        worker,
        inbox.clone(),
        timing,
        runs.clone(),
        cancel.clone(),
    ));
    WorkerHandle {
        name: W::NAME,
        inbox,
        runs,
        cancel,
        task,
    }
}

impl<R: RunReport> WorkerHandle<R> {
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Where events for this worker go.
    pub fn inbox(&self) -> &Arc<Inbox<R, RunError>> {
        &self.inbox
    }

    /// Runs finished so far, failed ones included (a cancelled run is not counted). With
    /// [`Inbox::pending_ids`] it shows how well changes are coalesced: many changes, few runs.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Runs a full sweep as soon as the run in flight, if any, has finished, and returns its
    /// counts.
    pub async fn run_now(&self) -> Result<R, RunError> {
        self.inbox
            .request_manual()
            .await
            .unwrap_or(Err(RunError::Stopped))
    }

    /// Takes no new batch, lets the run in flight finish within `grace`, then cancels it.
    /// A cancelled run's open transaction is rolled back. Returns false if it was cancelled.
    pub async fn stop(self, grace: Duration) -> bool {
        self.cancel.cancel();
        let mut task = self.task;
        match tokio::time::timeout(grace, &mut task).await {
            Ok(_) => {
                info!(worker = self.name, "worker stopped");
                true
            }
            Err(_) => {
                task.abort();
                warn!(
                    worker = self.name,
                    ?grace,
                    "run still in flight after the grace period; cancelled"
                );
                false
            }
        }
    }
}

async fn drive<W: Worker>(
    worker: W,
    inbox: Arc<WorkerInbox<W>>,
    timing: Timing,
    runs: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let mut last_run_end: Option<Instant> = None;
    let mut failures: u32 = 0;

    loop {
        if !wait_until_ready(&inbox, last_run_end, timing, &cancel).await {
            return;
        }
        let Some((batch, waiters)) = inbox.take() else {
            continue;
        };

        let ids = match &batch.scope {
            Scope::Sweep | Scope::Due => None,
            Scope::Ids(ids) => Some(ids.len()),
        };
        let span = info_span!("run", worker = W::NAME, trigger = %batch.trigger, ids);
        let started = Instant::now();
        let outcome = worker.run(&batch).instrument(span.clone()).await;
        last_run_end = Some(Instant::now());
        runs.fetch_add(1, Ordering::Relaxed);

        let _entered = span.enter();
        match &outcome {
            Ok(report) => {
                if failures > 0 {
                    info!(failed_runs = failures, "runs resumed");
                    failures = 0;
                }
                report.log(W::NAME, batch.trigger, started.elapsed());
                schedule_deadline(&worker, &inbox).await;
            }
            Err(e) => {
                failures += 1;
                let retry_in = RETRY_FIRST
                    .saturating_mul(1 << (failures - 1).min(5))
                    .min(RETRY_MAX);
                // Once per outage, not once per retry: later failures are debug.
                if failures == 1 {
                    let error = ErrorChain(e);
                    error!(%error, ?retry_in, "run failed; will retry as a full sweep");
                    if matches!(e, RunError::Store(store) if store.is_missing_schema()) {
                        error!(
                            "a table is missing: has `milo-workers migrate` run on this database?"
                        );
                    }
                } else {
                    let error = ErrorChain(e);
                    tracing::debug!(%error, failures, ?retry_in, "run failed again");
                }
                inbox.set_deadline(None);
                inbox.retry_sweep_after(Instant::now() + retry_in);
            }
        }
        for waiter in waiters {
            // The caller may have given up waiting; that is fine.
            let _ = waiter.send(outcome.clone());
        }
    }
}

/// Asks the worker when its next deadline is, and arms the inbox for it. A deadline that has
/// already passed (a due row the last run could not act on, say because another replica held
/// it) is retried after [`DUE_AGAIN`] rather than at once, so it cannot spin.
async fn schedule_deadline<W: Worker>(worker: &W, inbox: &WorkerInbox<W>) {
    match worker.next_deadline().await {
        Ok(Some(seconds)) => {
            let wait = if seconds > 0.0 {
                Duration::from_secs_f64(seconds)
            } else {
                DUE_AGAIN
            };
            tracing::debug!(?wait, "next deadline");
            inbox.set_deadline(Some(Instant::now() + wait));
        }
        Ok(None) => inbox.set_deadline(None),
        Err(e) => {
            // The tick still covers everything; the next successful run sets a deadline again.
            warn!(error = %ErrorChain(&e), "could not compute the next deadline");
            inbox.set_deadline(None);
        }
    }
}

/// Waits until the inbox has a batch ready to start; false when cancelled first.
async fn wait_until_ready<R, E>(
    inbox: &Inbox<R, E>,
    last_run_end: Option<Instant>,
    timing: Timing,
    cancel: &CancellationToken,
) -> bool {
    loop {
        let changed = inbox.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();

        match inbox.ready_at(last_run_end, timing) {
            Some(at) if at <= Instant::now() => return true,
            Some(at) => tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep_until(at) => return true,
                _ = &mut changed => {}
            },
            None => tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = &mut changed => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    //! The runner alone, on paused time, with a fake worker and no database: every instant
    //! below is exact because the clock only moves when every task waits.

    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use serde::Serialize;

    use super::*;
    use crate::pipeline::Batch;
    use crate::store::Trigger;

    const TIMING: Timing = Timing {
        debounce: Duration::from_millis(100),
        max_wait: Duration::from_secs(1),
    };

    #[derive(Debug, Clone, Default, Serialize)]
    struct Counts;

    impl RunReport for Counts {
        fn log(&self, _: &str, _: Trigger, _: Duration) {}
    }

    #[derive(Debug, Clone)]
    struct Run {
        batch: Batch,
        started: Instant,
        ended: Instant,
    }

    /// Takes `duration` per run; fails its first `failures` runs.
    #[derive(Clone)]
    struct Fake {
        duration: Duration,
        failures: Arc<AtomicUsize>,
        in_flight: Arc<AtomicUsize>,
        overlaps: Arc<AtomicUsize>,
        runs: Arc<Mutex<Vec<Run>>>,
    }

    impl Fake {
        fn new(duration: Duration, failures: usize) -> Self {
            Self {
                duration,
                failures: Arc::new(AtomicUsize::new(failures)),
                in_flight: Arc::default(),
                overlaps: Arc::default(),
                runs: Arc::default(),
            }
        }

        fn runs(&self) -> Vec<Run> {
            self.runs.lock().unwrap().clone()
        }
    }

    impl Worker for Fake {
        type Report = Counts;
        const NAME: &'static str = "fake";

        async fn run(&self, batch: &Batch) -> Result<Counts, RunError> {
            if self.in_flight.fetch_add(1, Ordering::SeqCst) > 0 {
                self.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            let started = Instant::now();
            tokio::time::sleep(self.duration).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.runs.lock().unwrap().push(Run {
                batch: batch.clone(),
                started,
                ended: Instant::now(),
            });
            let failing = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(RunError::Stopped);
            }
            Ok(Counts)
        }

        async fn next_deadline(&self) -> Result<Option<f64>, RunError> {
            Ok(None)
        }
    }

    /// Lets the runner react to what was just added, without moving the clock.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ids_arriving_during_a_run_make_one_run_right_after_it_never_overlapping() {
        let fake = Fake::new(Duration::from_secs(1), 0);
        let handle = start(fake.clone(), TIMING);
        let t0 = Instant::now();

        handle.inbox().add_ids([1], Trigger::Notify);
        tokio::time::sleep(Duration::from_millis(300)).await;
        handle.inbox().add_ids([2], Trigger::Notify);
        tokio::time::sleep(Duration::from_millis(300)).await;
        handle.inbox().add_ids([3, 2], Trigger::Notify);
        tokio::time::sleep(Duration::from_secs(5)).await;

        let runs = fake.runs();
        assert_eq!(runs.len(), 2, "{runs:?}");
        // An isolated change runs at once.
        assert_eq!(runs[0].batch, Batch::ids(Trigger::Notify, vec![1]));
        assert_eq!(runs[0].started, t0);
        // What arrived during it shares the next run, when the debounce window closes.
        assert_eq!(runs[1].batch, Batch::ids(Trigger::Notify, vec![2, 3]));
        assert_eq!(runs[1].started, runs[0].ended + TIMING.debounce);
        assert_eq!(fake.overlaps.load(Ordering::SeqCst), 0);
        assert_eq!(handle.runs(), 2);
        assert!(handle.stop(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn the_debounce_window_groups_changes_right_after_a_run_and_not_later_ones() {
        let fake = Fake::new(Duration::from_millis(10), 0);
        let handle = start(fake.clone(), TIMING);

        handle.inbox().add_ids([1], Trigger::Notify);
        tokio::time::sleep(Duration::from_millis(30)).await; // the run ended at +10 ms
        handle.inbox().add_ids([2], Trigger::Notify);
        tokio::time::sleep(Duration::from_millis(40)).await;
        handle.inbox().add_ids([3], Trigger::Notify);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let quiet_from = Instant::now();
        handle.inbox().add_ids([4], Trigger::Notify);
        settle().await;
        tokio::time::sleep(Duration::from_secs(1)).await;

        let runs = fake.runs();
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert_eq!(runs[1].batch, Batch::ids(Trigger::Notify, vec![2, 3]));
        assert_eq!(runs[1].started, runs[0].ended + TIMING.debounce);
        // Long after the last run: an isolated change is not delayed by the window.
        assert_eq!(runs[2].batch, Batch::ids(Trigger::Notify, vec![4]));
        assert_eq!(runs[2].started, quiet_from);
        assert!(handle.stop(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_long_run_the_max_wait_cap_skips_the_debounce_window() {
        let fake = Fake::new(Duration::from_secs(3), 0);
        let handle = start(fake.clone(), TIMING);

        handle.inbox().add_ids([1], Trigger::Notify);
        tokio::time::sleep(Duration::from_millis(100)).await;
        handle.inbox().add_ids([2], Trigger::Notify);
        tokio::time::sleep(Duration::from_secs(10)).await;

        let runs = fake.runs();
        assert_eq!(runs.len(), 2, "{runs:?}");
        // Id 2 has waited 2.9 s > max_wait when the first run ends: it goes at once.
        assert_eq!(runs[1].batch, Batch::ids(Trigger::Notify, vec![2]));
        assert_eq!(runs[1].started, runs[0].ended);
        assert!(handle.stop(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cap_shorter_than_the_window_bounds_the_wait_after_a_run() {
        let timing = Timing {
            debounce: Duration::from_secs(2),
            max_wait: Duration::from_millis(500),
        };
        let fake = Fake::new(Duration::from_millis(100), 0);
        let handle = start(fake.clone(), timing);

        handle.inbox().add_ids([1], Trigger::Notify);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let arrived = Instant::now();
        handle.inbox().add_ids([2], Trigger::Notify);
        tokio::time::sleep(Duration::from_secs(5)).await;

        let runs = fake.runs();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!(runs[1].started, arrived + timing.max_wait);
        assert!(handle.stop(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_run_is_retried_as_a_sweep_after_a_growing_backoff() {
        let fake = Fake::new(Duration::from_millis(10), 2);
        let handle = start(fake.clone(), TIMING);

        handle.inbox().add_ids([5], Trigger::Notify);
        tokio::time::sleep(Duration::from_secs(60)).await;

        let runs = fake.runs();
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert_eq!(runs[0].batch, Batch::ids(Trigger::Notify, vec![5]));
        // The failed ids are not dropped: the retry is a full sweep, after 1 s, then 2 s.
        assert_eq!(runs[1].batch, Batch::sweep(Trigger::Resync));
        assert_eq!(runs[1].started, runs[0].ended + RETRY_FIRST);
        assert_eq!(runs[2].batch, Batch::sweep(Trigger::Resync));
        assert_eq!(runs[2].started, runs[1].ended + RETRY_FIRST * 2);
        assert_eq!(handle.runs(), 3);
        assert!(handle.stop(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_does_not_jump_its_backoff_when_new_ids_arrive() {
        let fake = Fake::new(Duration::from_millis(10), 1);
        let handle = start(fake.clone(), TIMING);

        handle.inbox().add_ids([5], Trigger::Notify);
        tokio::time::sleep(Duration::from_millis(300)).await;
        handle.inbox().add_ids([6], Trigger::Notify);
        tokio::time::sleep(Duration::from_secs(10)).await;

        let runs = fake.runs();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!(runs[1].batch, Batch::sweep(Trigger::Resync));
        assert_eq!(runs[1].started, runs[0].ended + RETRY_FIRST);
        assert!(handle.stop(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn run_now_waits_for_the_run_in_flight_and_then_sweeps() {
        let fake = Fake::new(Duration::from_secs(1), 0);
        let handle = start(fake.clone(), TIMING);

        handle.inbox().add_ids([1], Trigger::Notify);
        settle().await;
        assert!(handle.run_now().await.is_ok());

        let runs = fake.runs();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!(runs[1].batch, Batch::sweep(Trigger::Manual));
        assert_eq!(runs[1].started, runs[0].ended);
        assert_eq!(fake.overlaps.load(Ordering::SeqCst), 0);
        assert!(handle.stop(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_cancels_a_run_that_outlasts_the_grace_period() {
        let fake = Fake::new(Duration::from_secs(60), 0);
        let handle = start(fake.clone(), TIMING);
        handle.inbox().add_ids([1], Trigger::Notify);
        settle().await;
        assert_eq!(fake.in_flight.load(Ordering::SeqCst), 1);

        assert!(!handle.stop(Duration::from_secs(1)).await);
        assert!(
            fake.runs().is_empty(),
            "the run was cancelled, not finished"
        );
    }
}
