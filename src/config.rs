//! Tuning shared by the pipeline and both workers. Every default here is what the README's
//! configuration table documents; the command line maps one flag onto each field.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Full sweep of both workers on this period; zero disables the tick. Notifications do the
    /// real work, the tick is the safety net for anything that was never announced.
    pub sweep_interval: Duration,
    /// Changes that arrive within this window after a run are coalesced into the next one.
    pub debounce: Duration,
    /// A pending change never waits longer than this, however steady the churn.
    pub max_wait: Duration,
    /// Run one sweep of both workers right after the listener first subscribes.
    pub sweep_on_start: bool,
    pub slots: SlotRecoverySettings,
    pub bots: BotHealthSettings,
    /// Timeout of one platform call; a call that exceeds it counts as a failed attempt.
    pub platform_timeout: Duration,
    /// Platform calls in flight at once, across both workers.
    pub platform_concurrency: usize,
    /// How long `stop` lets a run in flight finish before cancelling it.
    pub shutdown_grace: Duration,
    /// Rows handled per transaction. Bounds memory during a sweep of any table size, and how
    /// long a batch of claimed rows stays locked.
    pub batch_size: usize,
    /// Pooled connections. Each worker holds one per batch, plus one while releasing.
    pub pool_size: usize,
}

impl Settings {
    /// How long a claim on a row may last: the pooled sessions'
    /// `idle_in_transaction_session_timeout`. A frozen or cut-off replica's claims end after
    /// this, and another replica finishes the work.
    pub fn claim_lease(&self) -> Duration {
        (self.platform_timeout * 2).max(Duration::from_secs(60)) + Duration::from_secs(30)
    }

    /// How long one batch keeps starting platform calls. A call started within it ends (at
    /// the latest by its timeout) well inside the lease; claimed slots not reached in time
    /// are released untouched and handled by the next batch.
    pub fn platform_budget(&self) -> Duration {
        self.claim_lease()
            .saturating_sub(self.platform_timeout + Duration::from_secs(10))
    }
}

#[derive(Debug, Clone)]
pub struct SlotRecoverySettings {
    /// A slot deploying for longer than this (by `last_used_at`) is stuck.
    pub deploy_timeout: Duration,
    /// A bot that heartbeated within this window is alive, so its deploying slot is left alone.
    pub heartbeat_freshness: Duration,
    /// After this many failed recoveries the slot's application and row are deleted.
    pub max_recovery_attempts: i32,
    /// Wait before the n-th retry of a failed recovery; the last entry repeats (it also spaces
    /// retries of a failed delete).
    pub retry_backoff: Vec<Duration>,
}

impl SlotRecoverySettings {
    /// The wait before retrying a slot that has failed `attempts` times.
    pub fn retry_delay(&self, attempts: i32) -> Duration {
        let index = usize::try_from(attempts.max(1) - 1).unwrap_or(0);
        self.retry_backoff
            .get(index)
            .or(self.retry_backoff.last())
            .copied()
            .unwrap_or(Duration::ZERO)
    }
}

#[derive(Debug, Clone)]
pub struct BotHealthSettings {
    /// An active bot silent for longer than this is dead.
    pub heartbeat_timeout: Duration,
    /// Most bots one run may mark FATAL. Hitting it is logged as an error: a fleet-wide
    /// silence is likelier a broken heartbeat path than that many simultaneous crashes.
    pub max_fatal_per_run: usize,
    /// Judge no bot on evidence older than this process's own uninterrupted view of the
    /// database (see `BotHealth`). Off only where an operator asks for a one-off sweep.
    pub outage_grace: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            sweep_interval: Duration::from_secs(300),
            debounce: Duration::from_millis(100),
            max_wait: Duration::from_secs(1),
            sweep_on_start: true,
            slots: SlotRecoverySettings::default(),
            bots: BotHealthSettings::default(),
            platform_timeout: Duration::from_secs(30),
            platform_concurrency: 8,
            shutdown_grace: Duration::from_secs(30),
            batch_size: 500,
            pool_size: 8,
        }
    }
}

impl Default for SlotRecoverySettings {
    fn default() -> Self {
        Self {
            deploy_timeout: Duration::from_secs(15 * 60),
            heartbeat_freshness: Duration::from_secs(5 * 60),
            max_recovery_attempts: 3,
            retry_backoff: vec![
                Duration::from_secs(30),
                Duration::from_secs(120),
                Duration::from_secs(300),
            ],
        }
    }
}

impl Default for BotHealthSettings {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(10 * 60),
            max_fatal_per_run: 1000,
            outage_grace: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_along_the_schedule_and_repeat_its_last_step() {
        let slots = SlotRecoverySettings::default();
        let delays: Vec<u64> = (1..=5).map(|n| slots.retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [30, 120, 300, 300, 300]);
        let none = SlotRecoverySettings {
            retry_backoff: vec![],
            ..slots
        };
        assert_eq!(none.retry_delay(2), Duration::ZERO);
    }
}
