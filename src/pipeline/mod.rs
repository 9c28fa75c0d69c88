//! The event pipeline: notifications from the listener and the safety tick are merged into one
//! stream and routed, without ever waiting on a worker, into each worker's [`Inbox`], where
//! they are coalesced and debounced into batches.
//!
//! ```text
//! listener ──notify ids, resync──┐
//!                                ├─ merge ─ route ─┬─ Inbox ─ SlotRecovery
//! tick (IntervalStream) ─────────┘                 └─ Inbox ─ BotHealth
//! ```

pub mod inbox;

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::{IntervalStream, ReceiverStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::store::Trigger;
pub use inbox::{Batch, Inbox, Scope, Timing};

/// Something that happened which a worker may need to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A slot's status changed (or it was inserted).
    SlotChanged(i32),
    /// A bot's status changed (or it was inserted).
    BotChanged(i32),
    /// The safety tick: a full sweep of both workers.
    Tick,
    /// The listener (re)subscribed: sweep both, for what changed while nobody listened.
    Resync,
}

/// Where routed events land; implemented by every worker's inbox.
pub trait Sink: Send + Sync {
    fn add_ids(&self, ids: &[i32], trigger: Trigger);
    fn request_sweep(&self, trigger: Trigger);
}

impl<R: Send, E: Send> Sink for Inbox<R, E> {
    fn add_ids(&self, ids: &[i32], trigger: Trigger) {
        Inbox::add_ids(self, ids.iter().copied(), trigger);
    }

    fn request_sweep(&self, trigger: Trigger) {
        Inbox::request_sweep(self, trigger);
    }
}

/// The two destinations.
#[derive(Clone)]
pub struct Sinks {
    pub slots: Arc<dyn Sink>,
    pub bots: Arc<dyn Sink>,
}

impl Sinks {
    fn route(&self, event: Event) {
        match event {
            Event::SlotChanged(id) => self.slots.add_ids(&[id], Trigger::Notify),
            Event::BotChanged(id) => self.bots.add_ids(&[id], Trigger::Notify),
            Event::Tick => {
                self.slots.request_sweep(Trigger::Tick);
                self.bots.request_sweep(Trigger::Tick);
            }
            Event::Resync => {
                self.slots.request_sweep(Trigger::Resync);
                self.bots.request_sweep(Trigger::Resync);
            }
        }
    }
}

/// The safety tick, or nothing when `period` is zero. The first tick comes one period after
/// start (the start-up sweep is the listener's resync). A tick that comes late is delayed,
/// never fired in a burst to catch up.
pub fn ticks(period: Duration) -> BoxStream<'static, Event> {
    if period.is_zero() {
        return stream::pending().boxed();
    }
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    IntervalStream::new(interval).map(|_| Event::Tick).boxed()
}

/// Merges the listener's events with the tick and routes them until cancelled or until every
/// source has ended.
pub async fn run(
    listener: mpsc::Receiver<Event>,
    ticks: BoxStream<'static, Event>,
    sinks: Sinks,
    cancel: CancellationToken,
) {
    let events = tokio_stream::StreamExt::merge(ReceiverStream::new(listener), ticks);
    tokio::pin!(events);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            event = events.next() => match event {
                Some(event) => {
                    debug!(?event, "routing event");
                    sinks.route(event);
                }
                None => break,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Sink for Recorder {
        fn add_ids(&self, ids: &[i32], trigger: Trigger) {
            self.0.lock().unwrap().push(format!("{trigger} {ids:?}"));
        }
        fn request_sweep(&self, trigger: Trigger) {
            self.0.lock().unwrap().push(format!("sweep {trigger}"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn notifications_go_to_their_worker_and_ticks_to_both() {
        let slots = Arc::new(Recorder::default());
        let bots = Arc::new(Recorder::default());
        let sinks = Sinks {
            slots: slots.clone(),
            bots: bots.clone(),
        };
        let (tx, rx) = mpsc::channel(8);
        let cancel = CancellationToken::new();
        let pipeline = tokio::spawn(run(
            rx,
            ticks(Duration::from_secs(300)),
            sinks,
            cancel.clone(),
        ));

        tx.send(Event::SlotChanged(4)).await.unwrap();
        tx.send(Event::BotChanged(9)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(301)).await;
        cancel.cancel();
        pipeline.await.unwrap();

        assert_eq!(*slots.0.lock().unwrap(), ["notify [4]", "sweep tick"]);
        assert_eq!(*bots.0.lock().unwrap(), ["notify [9]", "sweep tick"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_tick_is_delayed_not_repeated() {
        let mut ticks = ticks(Duration::from_secs(10));
        // Nobody polls for 35 s, as when the runtime is starved.
        tokio::time::advance(Duration::from_secs(35)).await;
        assert_eq!(ticks.next().await, Some(Event::Tick));
        let before = Instant::now();
        assert_eq!(ticks.next().await, Some(Event::Tick));
        assert_eq!(before.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_period_never_ticks() {
        let mut ticks = ticks(Duration::ZERO);
        let next = tokio::time::timeout(Duration::from_secs(3600), ticks.next()).await;
        assert!(next.is_err());
    }
}
