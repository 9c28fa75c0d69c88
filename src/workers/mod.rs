//! The two workers and their lifecycle.
//!
//! - [`SlotRecovery`] repairs slots: in `error`, or stuck `deploying`.
//! - [`BotHealth`] marks silent bots FATAL and releases their slots.
//!
//! Both run either a focused check of the rows that changed, or a full sweep; both work in
//! batches of at most `batch_size` rows per transaction, so memory and lock time stay bounded
//! whatever the table size. [`lifecycle`] starts, stops and runs a worker on demand.

pub mod bot_health;
pub mod lifecycle;
pub mod slot_recovery;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde::Serialize;

use crate::pipeline::Batch;
use crate::platform::PlatformClient;
use crate::store::{StoreError, Trigger};

pub use bot_health::{BotHealth, BotHealthReport};
pub use lifecycle::{start, WorkerHandle};
pub use slot_recovery::{SlotRecovery, SlotRecoveryReport};

/// Why a run failed. Cloneable so that every caller waiting on one run gets the same answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(Arc<StoreError>),
    #[error("the worker is stopped")]
    Stopped,
    /// A batch outlived its lease: the database or the network stopped answering in a way no
    /// socket timeout caught (a middlebox still acknowledging, say).
    #[error("a batch took longer than {0:?}; its transaction was abandoned")]
    TimedOut(Duration),
}

impl From<StoreError> for RunError {
    fn from(error: StoreError) -> Self {
        Self::Store(Arc::new(error))
    }
}

impl From<deadpool_postgres::PoolError> for RunError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        StoreError::from(error).into()
    }
}

impl From<tokio_postgres::Error> for RunError {
    fn from(error: tokio_postgres::Error) -> Self {
        StoreError::from(error).into()
    }
}

/// What a run did, in counts.
pub trait RunReport: Clone + Default + Debug + Serialize + Send + Sync + 'static {
    /// The one log line per run.
    fn log(&self, worker: &str, trigger: Trigger, elapsed: Duration);
}

pub trait Worker: Send + Sync + 'static {
    type Report: RunReport;

    /// Stable name, used in logs and in the audit log's `worker` column.
    const NAME: &'static str;

    fn run(&self, batch: &Batch) -> impl Future<Output = Result<Self::Report, RunError>> + Send;

    /// How long from now until the earliest watched row can next become actionable: one cheap
    /// indexed query, asked after every run. `None` when nothing is watched; zero or less when
    /// something is due already.
    fn next_deadline(&self) -> impl Future<Output = Result<Option<f64>, RunError>> + Send;
}

/// What both workers share.
#[derive(Clone)]
pub struct Context {
    pub pool: Pool,
    pub platform: PlatformClient,
    /// Identifies this daemon in the audit log: host name and process id.
    pub replica: Arc<str>,
    /// Rows per transaction (see [`crate::config::Settings::batch_size`]).
    pub batch_size: usize,
    /// Platform calls one batch may have in flight.
    pub concurrency: usize,
    /// How long one batch keeps starting platform calls (see
    /// [`crate::config::Settings::platform_budget`]).
    pub platform_budget: Duration,
    /// The longest one batch (one transaction) may take: the claim lease plus a margin. Past
    /// it the server has ended the session anyway, so waiting longer only hangs the worker.
    pub batch_timeout: Duration,
}

impl Context {
    /// Runs one batch under [`Context::batch_timeout`].
    pub(crate) async fn bounded<T>(
        &self,
        batch: impl Future<Output = Result<T, RunError>>,
    ) -> Result<T, RunError> {
        tokio::time::timeout(self.batch_timeout, batch)
            .await
            .unwrap_or(Err(RunError::TimedOut(self.batch_timeout)))
    }
}

/// `host:pid`, naming this process in the audit log.
pub fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{}:{}", host.trim(), std::process::id())
}
