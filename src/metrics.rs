//! Every metric the daemon exports, named in one place, and the Prometheus recorder behind the
//! `metrics` facade. The HTTP server ([`crate::http`]) renders them at `/metrics`.
//!
//! Recording goes through the facade: with no recorder installed (the `sweep` command, a
//! daemon without `--http-listen`, most tests) every call here is a no-op.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use metrics::Unit;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::time::Instant;

use crate::health::Health;
use crate::pipeline::{Batch, Scope};
use crate::platform::{Operation, PlatformError};
use crate::store::{Action, AuditEntry, Trigger};
use crate::util::ErrorChain;
use crate::workers::{RunError, Worker};

/// Runs per worker, trigger and outcome (`ok`, `failed`).
pub const RUNS: &str = "milo_workers_runs_total";
/// Duration of one run, per worker and trigger.
pub const RUN_DURATION: &str = "milo_workers_run_duration_seconds";
/// Actions written to the audit log, per worker, action (the audit word) and outcome
/// (`done`, `failed`).
pub const ACTIONS: &str = "milo_workers_actions_total";
/// From the moment a row entered the status an action was decided from (the audit log's
/// `status_since`) to the action, per worker and action.
pub const CHANGE_TO_ACTION: &str = "milo_workers_change_to_action_seconds";
/// 1 while the LISTEN connection is subscribed, else 0.
pub const LISTENER_CONNECTED: &str = "milo_workers_listener_connected";
/// Times the listener subscribed again after losing its connection.
pub const LISTENER_RECONNECTS: &str = "milo_workers_listener_reconnects_total";
/// Notifications received by the listener.
pub const NOTIFICATIONS: &str = "milo_workers_notifications_total";
/// Notification payloads that could not be parsed and were ignored.
pub const IGNORED_PAYLOADS: &str = "milo_workers_ignored_payloads_total";
/// Changed row ids waiting for a worker's next run, per worker.
pub const PENDING_IDS: &str = "milo_workers_pending_ids";
/// Duration of one platform call, per operation and outcome (`ok`, `failed`, `timed_out`).
pub const PLATFORM_CALL_DURATION: &str = "milo_workers_platform_call_duration_seconds";
/// Failed platform calls, per operation and kind (`failed`, `timed_out`).
pub const PLATFORM_CALL_ERRORS: &str = "milo_workers_platform_call_errors_total";
/// `pg_notification_queue_usage()`: the fraction of the server's NOTIFY queue in use. Near 1,
/// notifying transactions start to fail.
pub const NOTIFICATION_QUEUE_USAGE: &str = "milo_workers_notification_queue_usage_ratio";
/// Unix time of each worker's last successful full sweep.
pub const LAST_SUCCESSFUL_SWEEP: &str = "milo_workers_last_successful_sweep_timestamp_seconds";

/// Every name above, for documentation and tests.
pub const ALL: [&str; 13] = [
    RUNS,
    RUN_DURATION,
    ACTIONS,
    CHANGE_TO_ACTION,
    LISTENER_CONNECTED,
    LISTENER_RECONNECTS,
    NOTIFICATIONS,
    IGNORED_PAYLOADS,
    PENDING_IDS,
    PLATFORM_CALL_DURATION,
    PLATFORM_CALL_ERRORS,
    NOTIFICATION_QUEUE_USAGE,
    LAST_SUCCESSFUL_SWEEP,
];

const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const LATENCY_BUCKETS: [f64; 16] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0,
    3600.0,
];

/// Installs the Prometheus recorder as the process's metrics recorder, once, and returns the
/// handle that renders it. Later calls return the same handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(RUN_DURATION.into()), &DURATION_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(PLATFORM_CALL_DURATION.into()),
                        &DURATION_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(CHANGE_TO_ACTION.into()),
                        &LATENCY_BUCKETS,
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics stays empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(RUNS, "Worker runs by worker, trigger and outcome");
    describe_histogram!(RUN_DURATION, Unit::Seconds, "Duration of one worker run");
    describe_counter!(ACTIONS, "Actions written to the audit log");
    describe_histogram!(
        CHANGE_TO_ACTION,
        Unit::Seconds,
        "From a row's status change (audit status_since) to the action on it"
    );
    describe_gauge!(
        LISTENER_CONNECTED,
        "1 while the LISTEN connection is subscribed"
    );
    describe_counter!(
        LISTENER_RECONNECTS,
        "Listener resubscriptions after a lost connection"
    );
    describe_counter!(NOTIFICATIONS, "Notifications received");
    describe_counter!(
        IGNORED_PAYLOADS,
        "Notification payloads ignored as unparseable"
    );
    describe_gauge!(PENDING_IDS, "Changed ids waiting for the worker's next run");
    describe_histogram!(
        PLATFORM_CALL_DURATION,
        Unit::Seconds,
        "Duration of one platform call"
    );
    describe_counter!(PLATFORM_CALL_ERRORS, "Failed platform calls");
    describe_gauge!(NOTIFICATION_QUEUE_USAGE, "pg_notification_queue_usage()");
    describe_gauge!(
        LAST_SUCCESSFUL_SWEEP,
        "Unix time of the last successful full sweep"
    );
}

/// One worker run ended.
pub fn run_finished(worker: &'static str, trigger: Trigger, elapsed: Duration, ok: bool) {
    let trigger = trigger.as_str();
    let outcome = if ok { "ok" } else { "failed" };
    counter!(RUNS, "worker" => worker, "trigger" => trigger, "outcome" => outcome).increment(1);
    histogram!(RUN_DURATION, "worker" => worker, "trigger" => trigger).record(elapsed);
}

/// Actions were written to the audit log (by [`crate::store::audit::record`]). They count
/// when written: a batch whose commit then fails is rare, and is retried and counted again.
pub fn actions_recorded(worker: &str, entries: &[AuditEntry]) {
    let now = SystemTime::now();
    for entry in entries {
        let action = entry.action.as_str();
        let outcome = match entry.action {
            Action::SlotRecoveryFailed | Action::ReleaseFailed => "failed",
            _ => "done",
        };
        let worker = worker.to_owned();
        counter!(ACTIONS, "worker" => worker.clone(), "action" => action, "outcome" => outcome)
            .increment(1);
        // status_since is the database's UTC clock; this host's clock is assumed close to it.
        // A negative difference (clock skew) is recorded as zero.
        if let Some(since) = entry.status_since {
            let latency = now.duration_since(since).unwrap_or_default();
            histogram!(CHANGE_TO_ACTION, "worker" => worker, "action" => action).record(latency);
        }
    }
}

/// One platform call ended.
pub fn platform_call(operation: Operation, elapsed: Duration, result: &Result<(), PlatformError>) {
    let operation = match operation {
        Operation::Stop => "stop",
        Operation::Delete => "delete",
    };
    let outcome = match result {
        Ok(()) => "ok",
        Err(PlatformError::Failed { .. }) => "failed",
        Err(PlatformError::TimedOut { .. }) => "timed_out",
    };
    histogram!(PLATFORM_CALL_DURATION, "operation" => operation, "outcome" => outcome)
        .record(elapsed);
    if outcome != "ok" {
        counter!(PLATFORM_CALL_ERRORS, "operation" => operation, "kind" => outcome).increment(1);
    }
}

/// What the listener has seen so far, as absolute values.
pub fn listener(connected: bool, connections: u64, notifications: u64, ignored: u64) {
    gauge!(LISTENER_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    counter!(LISTENER_RECONNECTS).absolute(connections.saturating_sub(1));
    counter!(NOTIFICATIONS).absolute(notifications);
    counter!(IGNORED_PAYLOADS).absolute(ignored);
}

pub fn pending_ids(worker: &'static str, pending: usize) {
    gauge!(PENDING_IDS, "worker" => worker).set(pending as f64);
}

pub fn notification_queue_usage(usage: f64) {
    gauge!(NOTIFICATION_QUEUE_USAGE).set(usage);
}

/// A worker wrapped so that every run is counted and timed, and every full sweep's outcome
/// reaches the readiness check. It runs exactly as the worker it wraps.
pub struct Instrumented<W> {
    inner: W,
    health: Arc<Health>,
}

impl<W: Worker> Instrumented<W> {
    pub fn new(inner: W, health: Arc<Health>) -> Self {
        Self { inner, health }
    }
}

impl<W: Worker> Worker for Instrumented<W> {
    type Report = W::Report;
    const NAME: &'static str = W::NAME;

    fn run(&self, batch: &Batch) -> impl Future<Output = Result<Self::Report, RunError>> + Send {
        let trigger = batch.trigger;
        let sweep = batch.scope == Scope::Sweep;
        let run = self.inner.run(batch);
        async move {
            let started = Instant::now();
            let outcome = run.await;
            run_finished(W::NAME, trigger, started.elapsed(), outcome.is_ok());
            if sweep {
                let result = outcome
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| ErrorChain(e).to_string());
                if result.is_ok() {
                    let unix = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    gauge!(LAST_SUCCESSFUL_SWEEP, "worker" => W::NAME).set(unix.as_secs_f64());
                }
                self.health.sweep_finished(W::NAME, result);
            }
            outcome
        }
    }

    fn next_deadline(&self) -> impl Future<Output = Result<Option<f64>, RunError>> + Send {
        self.inner.next_deadline()
    }
}
