//! The coalescing set between the event sources and one worker.
//!
//! Sources only ever insert into it (a set insert under a short lock, never an await), so the
//! listener keeps draining its socket however slow a worker is. Ids are deduplicated: a storm
//! of changes to the same rows costs memory per distinct row, not per message.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::store::Trigger;

/// What a worker is asked to look at in one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every row the worker watches.
    Sweep,
    /// Just these rows, because they changed.
    Ids(Vec<i32>),
    /// The rows whose deadline has passed: the worker finds them with its deadline query.
    Due,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub trigger: Trigger,
    pub scope: Scope,
}

impl Batch {
    pub fn sweep(trigger: Trigger) -> Self {
        Self {
            trigger,
            scope: Scope::Sweep,
        }
    }

    pub fn ids(trigger: Trigger, ids: Vec<i32>) -> Self {
        Self {
            trigger,
            scope: Scope::Ids(ids),
        }
    }
}

/// How changes are grouped into runs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Changes arriving during a run, or within this window after it, share the next run,
    /// which starts when the window closes.
    pub debounce: Duration,
    /// No change waits longer than this for its run, however steady the churn.
    pub max_wait: Duration,
}

/// A reply owed to a caller of "run now".
pub type Waiter<R, E> = oneshot::Sender<Result<R, E>>;

struct Pending<R, E> {
    ids: HashSet<i32>,
    ids_trigger: Trigger,
    sweep: Option<Trigger>,
    waiters: Vec<Waiter<R, E>>,
    /// When the oldest pending request arrived.
    first_at: Option<Instant>,
    /// After a failed run: nothing runs before this.
    not_before: Option<Instant>,
    /// When the worker's earliest watched row can next become actionable.
    deadline: Option<Instant>,
}

impl<R, E> Pending<R, E> {
    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.sweep.is_none()
    }

    fn arrived(&mut self, now: Instant) {
        self.first_at.get_or_insert(now);
    }
}

pub struct Inbox<R, E> {
    pending: Mutex<Pending<R, E>>,
    wake: Notify,
}

impl<R, E> Default for Inbox<R, E> {
    fn default() -> Self {
        Self {
            pending: Mutex::new(Pending {
                ids: HashSet::new(),
                ids_trigger: Trigger::Notify,
                sweep: None,
                waiters: Vec::new(),
                first_at: None,
                not_before: None,
                deadline: None,
            }),
            wake: Notify::new(),
        }
    }
}

impl<R, E> Inbox<R, E> {
    /// Rows that changed. They join whatever is pending; the first trigger names the batch.
    pub fn add_ids(&self, ids: impl IntoIterator<Item = i32>, trigger: Trigger) {
        let mut pending = self.lock();
        if pending.ids.is_empty() {
            pending.ids_trigger = trigger;
        }
        let before = pending.ids.len();
        pending.ids.extend(ids);
        if pending.ids.len() > before {
            pending.arrived(Instant::now());
            drop(pending);
            self.wake.notify_one();
        }
    }

    /// A full sweep, run without debouncing. A manual or resync request outranks a tick in
    /// naming the batch.
    pub fn request_sweep(&self, trigger: Trigger) {
        let mut pending = self.lock();
        pending.sweep = Some(match pending.sweep {
            Some(Trigger::Manual) => Trigger::Manual,
            Some(Trigger::Resync) if trigger != Trigger::Manual => Trigger::Resync,
            _ => trigger,
        });
        pending.arrived(Instant::now());
        drop(pending);
        self.wake.notify_one();
    }

    /// A full sweep whose result is sent back once it ran.
    pub fn request_manual(&self) -> oneshot::Receiver<Result<R, E>> {
        let (reply, receiver) = oneshot::channel();
        self.lock().waiters.push(reply);
        self.request_sweep(Trigger::Manual);
        receiver
    }

    /// Distinct row ids waiting for the next run.
    pub fn pending_ids(&self) -> usize {
        self.lock().ids.len()
    }

    /// Resolves once something was added since the last call's registration. Register with
    /// [`tokio::sync::futures::Notified::enable`] before checking [`Self::ready_at`].
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// Sets (or clears) the moment the worker next has a deadline to check.
    pub fn set_deadline(&self, deadline: Option<Instant>) {
        self.lock().deadline = deadline;
        self.wake.notify_one();
    }

    /// When the next batch should start, given when the last run ended; `None` when idle.
    pub fn ready_at(&self, last_run_end: Option<Instant>, timing: Timing) -> Option<Instant> {
        let pending = self.lock();
        let work = Self::work_ready_at(&pending, last_run_end, timing);
        match (work, pending.deadline) {
            (Some(work), Some(deadline)) => Some(work.min(deadline)),
            (work, deadline) => work.or(deadline),
        }
    }

    fn work_ready_at(
        pending: &Pending<R, E>,
        last_run_end: Option<Instant>,
        timing: Timing,
    ) -> Option<Instant> {
        if pending.is_empty() {
            return None;
        }
        let first = pending.first_at?;
        let at = if pending.sweep.is_some() {
            first
        } else {
            match last_run_end {
                // An isolated change, after a quiet period: dispatch it at once.
                None => first,
                Some(end) if first >= end + timing.debounce => first,
                // Part of a burst: wait for the window after the last run to close, but never
                // past the cap (which only binds after a long run).
                Some(end) => (end + timing.debounce).min(first + timing.max_wait),
            }
        };
        Some(
            pending
                .not_before
                .map_or(at, |not_before| at.max(not_before)),
        )
    }

    /// Takes everything pending as one batch. A pending sweep covers the pending ids and any
    /// deadline too; a deadline that has passed goes before pending ids, which then follow.
    pub fn take(&self) -> Option<(Batch, Vec<Waiter<R, E>>)> {
        let mut pending = self.lock();
        let deadline_passed = pending.deadline.is_some_and(|at| at <= Instant::now());
        if pending.sweep.is_none() && deadline_passed {
            pending.deadline = None;
            return Some((
                Batch {
                    trigger: Trigger::Deadline,
                    scope: Scope::Due,
                },
                Vec::new(),
            ));
        }
        if pending.is_empty() {
            return None;
        }
        pending.first_at = None;
        pending.not_before = None;
        let waiters = std::mem::take(&mut pending.waiters);
        let batch = match pending.sweep.take() {
            Some(trigger) => {
                pending.ids.clear();
                pending.deadline = None;
                Batch::sweep(trigger)
            }
            None => {
                let mut ids: Vec<i32> = pending.ids.drain().collect();
                ids.sort_unstable();
                Batch::ids(pending.ids_trigger, ids)
            }
        };
        Some((batch, waiters))
    }

    /// After a failed run, nothing is dropped: the next run is a full sweep (it covers the
    /// failed batch and whatever went unseen meanwhile), not before `not_before`.
    pub fn retry_sweep_after(&self, not_before: Instant) {
        let mut pending = self.lock();
        pending.sweep = Some(pending.sweep.unwrap_or(Trigger::Resync));
        pending.arrived(Instant::now());
        pending.not_before = Some(not_before);
        drop(pending);
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending<R, E>> {
        // Every critical section here is a few set operations that cannot panic midway.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestInbox = Inbox<(), ()>;

    const TIMING: Timing = Timing {
        debounce: Duration::from_millis(100),
        max_wait: Duration::from_secs(1),
    };

    #[tokio::test(start_paused = true)]
    async fn an_isolated_change_is_ready_at_once() {
        let inbox = TestInbox::default();
        let last_run_end = Instant::now();
        tokio::time::advance(Duration::from_secs(5)).await;

        inbox.add_ids([7], Trigger::Notify);

        assert_eq!(
            inbox.ready_at(Some(last_run_end), TIMING),
            Some(Instant::now())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn changes_right_after_a_run_wait_for_the_window() {
        let inbox = TestInbox::default();
        let last_run_end = Instant::now();
        tokio::time::advance(Duration::from_millis(30)).await;

        inbox.add_ids([1], Trigger::Notify);
        tokio::time::advance(Duration::from_millis(50)).await;
        inbox.add_ids([2], Trigger::Notify);

        assert_eq!(
            inbox.ready_at(Some(last_run_end), TIMING),
            Some(last_run_end + TIMING.debounce)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_never_waits_past_max_wait() {
        let inbox = TestInbox::default();
        // The change arrives early in a long run.
        inbox.add_ids([0], Trigger::Notify);
        let first = Instant::now();
        for id in 1..20 {
            tokio::time::advance(Duration::from_millis(50)).await;
            inbox.add_ids([id], Trigger::Notify);
        }
        let last_run_end = Instant::now();

        assert_eq!(
            inbox.ready_at(Some(last_run_end), TIMING),
            Some(first + TIMING.max_wait)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_ids_are_coalesced_into_one_batch() {
        let inbox = TestInbox::default();
        for _ in 0..1000 {
            inbox.add_ids([3, 1, 2], Trigger::Notify);
        }

        assert_eq!(inbox.pending_ids(), 3);
        let (batch, _) = inbox.take().unwrap();
        assert_eq!(batch, Batch::ids(Trigger::Notify, vec![1, 2, 3]));
        assert!(inbox.take().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_covers_pending_ids_and_is_not_debounced() {
        let inbox = TestInbox::default();
        let last_run_end = Instant::now();
        inbox.add_ids([1, 2], Trigger::Notify);
        inbox.request_sweep(Trigger::Tick);

        assert_eq!(
            inbox.ready_at(Some(last_run_end), TIMING),
            Some(Instant::now())
        );
        let (batch, _) = inbox.take().unwrap();
        assert_eq!(batch, Batch::sweep(Trigger::Tick));
        assert_eq!(inbox.pending_ids(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_run_becomes_a_sweep_after_the_backoff() {
        let inbox = TestInbox::default();
        let retry_at = Instant::now() + Duration::from_secs(2);

        inbox.retry_sweep_after(retry_at);
        inbox.add_ids([9], Trigger::Notify);

        assert_eq!(inbox.ready_at(None, TIMING), Some(retry_at));
        assert_eq!(inbox.take().unwrap().0, Batch::sweep(Trigger::Resync));
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_deadline_becomes_a_due_check_before_pending_ids() {
        let inbox = TestInbox::default();
        let deadline = Instant::now() + Duration::from_secs(3);
        inbox.set_deadline(Some(deadline));
        assert_eq!(inbox.ready_at(None, TIMING), Some(deadline));
        assert!(inbox.take().is_none(), "nothing is due before the deadline");

        tokio::time::advance(Duration::from_secs(3)).await;
        inbox.add_ids([5], Trigger::Notify);

        let (first, _) = inbox.take().unwrap();
        assert_eq!(
            first,
            Batch {
                trigger: Trigger::Deadline,
                scope: Scope::Due
            }
        );
        assert_eq!(
            inbox.take().unwrap().0,
            Batch::ids(Trigger::Notify, vec![5])
        );
        assert_eq!(inbox.ready_at(None, TIMING), None);
    }

    #[tokio::test(start_paused = true)]
    async fn manual_outranks_tick_in_naming_a_sweep() {
        let inbox = TestInbox::default();
        inbox.request_sweep(Trigger::Tick);
        let _reply = inbox.request_manual();
        inbox.request_sweep(Trigger::Tick);

        let (batch, waiters) = inbox.take().unwrap();
        assert_eq!(batch, Batch::sweep(Trigger::Manual));
        assert_eq!(waiters.len(), 1);
    }
}
