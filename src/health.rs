//! Readiness: whether this daemon is doing its job right now. `/readyz` reports it.
//!
//! Ready means: the listener is subscribed, and for each worker the last full sweep succeeded
//! within two sweep intervals. Before a worker's first sweep, the daemon's start counts as one
//! unless a sweep on start is expected, which then has to succeed first. With the tick
//! disabled (interval zero), only the last sweep's outcome counts, not its age.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::listener::ListenerStatus;

/// The answer of `/readyz`; `reasons` says what is wrong when not ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub reasons: Vec<String>,
}

#[derive(Debug, Default, Clone)]
struct SweepRecord {
    last_success: Option<Instant>,
    last_failure: Option<(Instant, String)>,
}

#[derive(Debug)]
pub struct Health {
    started: Instant,
    sweep_interval: Duration,
    expect_first_sweep: bool,
    listener: Arc<ListenerStatus>,
    sweeps: Mutex<BTreeMap<&'static str, SweepRecord>>,
}

impl Health {
    /// `workers` are the names whose sweeps readiness watches.
    pub fn new(
        workers: &[&'static str],
        sweep_interval: Duration,
        expect_first_sweep: bool,
        listener: Arc<ListenerStatus>,
    ) -> Self {
        let sweeps = workers
            .iter()
            .map(|name| (*name, SweepRecord::default()))
            .collect();
        Self {
            started: Instant::now(),
            sweep_interval,
            expect_first_sweep,
            listener,
            sweeps: Mutex::new(sweeps),
        }
    }

    /// A full sweep of `worker` ended; `Err` carries why it failed.
    pub fn sweep_finished(&self, worker: &'static str, outcome: Result<(), String>) {
        let mut sweeps = self.lock();
        let record = sweeps.entry(worker).or_default();
        match outcome {
            Ok(()) => record.last_success = Some(Instant::now()),
            Err(error) => record.last_failure = Some((Instant::now(), error)),
        }
    }

    pub fn readiness(&self) -> Readiness {
        let mut reasons = Vec::new();
        if !self.listener.is_connected() {
            reasons.push("the listener is not connected to PostgreSQL".to_owned());
        }
        let limit = self.sweep_interval * 2;
        for (worker, record) in self.lock().iter() {
            let failed_last = match (&record.last_failure, record.last_success) {
                (Some((failed, _)), Some(succeeded)) => *failed > succeeded,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if let (true, Some((at, error))) = (failed_last, &record.last_failure) {
                reasons.push(format!(
                    "the last sweep of {worker} failed {}s ago: {error}",
                    at.elapsed().as_secs()
                ));
                continue;
            }
            let since = match record.last_success {
                Some(at) => at,
                None if self.expect_first_sweep => {
                    reasons.push(format!("{worker} has not finished its first sweep"));
                    continue;
                }
                None => self.started,
            };
            if !limit.is_zero() && since.elapsed() > limit {
                reasons.push(format!(
                    "no successful sweep of {worker} for {}s, more than twice the sweep \
                     interval ({:?})",
                    since.elapsed().as_secs(),
                    self.sweep_interval
                ));
            }
        }
        Readiness {
            ready: reasons.is_empty(),
            reasons,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, SweepRecord>> {
        // The map is valid after any panic elsewhere; keep serving health checks.
        self.sweeps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(interval: u64, expect_first: bool) -> (Health, Arc<ListenerStatus>) {
        let listener = Arc::new(ListenerStatus::default());
        listener.set_connected_for_tests(true);
        let health = Health::new(
            &["slot_recovery", "bot_health"],
            Duration::from_secs(interval),
            expect_first,
            listener.clone(),
        );
        (health, listener)
    }

    #[tokio::test(start_paused = true)]
    async fn ready_after_the_first_sweeps_while_the_listener_is_connected() {
        let (health, listener) = health(300, true);
        assert_eq!(health.readiness().reasons.len(), 2);
        health.sweep_finished("slot_recovery", Ok(()));
        health.sweep_finished("bot_health", Ok(()));
        assert!(health.readiness().ready);
        listener.set_connected_for_tests(false);
        let readiness = health.readiness();
        assert_eq!(
            readiness.reasons,
            ["the listener is not connected to PostgreSQL"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_sweep_makes_it_unready_until_one_succeeds() {
        let (health, _) = health(300, false);
        assert!(health.readiness().ready);
        health.sweep_finished("bot_health", Err("database query failed".into()));
        let readiness = health.readiness();
        assert!(!readiness.ready);
        assert!(readiness.reasons[0].contains("database query failed"));
        tokio::time::advance(Duration::from_secs(1)).await;
        health.sweep_finished("bot_health", Ok(()));
        assert!(health.readiness().ready);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_older_than_two_intervals_makes_it_unready() {
        let (health, _) = health(60, false);
        health.sweep_finished("slot_recovery", Ok(()));
        health.sweep_finished("bot_health", Ok(()));
        tokio::time::advance(Duration::from_secs(119)).await;
        assert!(health.readiness().ready);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(health.readiness().reasons.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_tick_off_age_does_not_matter() {
        let (health, _) = health(0, false);
        tokio::time::advance(Duration::from_secs(100_000)).await;
        assert!(health.readiness().ready);
    }
}
