//! Starting, stopping and running a worker on demand.
//!
//! One task per worker takes batches from its [`Inbox`] and runs them one at a time, so a
//! worker never runs twice at once. Requests that arrive during a run wait in the inbox and
//! make the next batch: nothing is dropped, unlike a "skip if already running" guard.

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
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Starts the worker's task. It waits for requests in its inbox; nothing runs until one comes.
pub fn start<W: Worker>(worker: W, timing: Timing) -> WorkerHandle<W::Report> {
    let inbox: Arc<WorkerInbox<W>> = Arc::default();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(drive(worker, inbox.clone(), timing, cancel.clone()));
    WorkerHandle {
        name: W::NAME,
        inbox,
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
