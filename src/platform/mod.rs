//! The platform that runs the slots' containers. Workers call it to stop or delete an
//! application; everything else about a slot lives in the database.
//!
//! [`Platform`] is the adapter a deployment plugs in: [`coolify`] for Coolify's HTTP API, and
//! [`simulated`] (in memory) for the demo and the tests. [`PlatformClient`] wraps any adapter with
//! what every call needs regardless of the adapter: a timeout and a concurrency limit.

pub mod coolify;
pub mod simulated;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};
use tokio::sync::Semaphore;
use tracing::{debug, info_span, warn, Instrument};

pub use coolify::{CoolifyPlatform, CoolifySettings};
pub use simulated::SimulatedPlatform;

/// What the workers ask of the platform. Both act on an application by its
/// `coolify_service_uuid`; an application that does not exist counts as already done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Stop,
    Delete,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stop => "stop",
            Self::Delete => "delete",
        })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PlatformError {
    #[error("{operation} of {uuid} timed out after {after:?}")]
    TimedOut {
        operation: Operation,
        uuid: String,
        after: Duration,
    },
    #[error("{operation} of {uuid} failed: {message}")]
    Failed {
        operation: Operation,
        uuid: String,
        message: String,
    },
}

/// An adapter for the platform. Implementations return `Ok` when the application is stopped
/// or deleted, including when it did not exist; they need not enforce timeouts or limits.
pub trait Platform: Send + Sync + 'static {
    fn stop<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>>;
    fn delete<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>>;
}

/// A platform adapter with a per-call timeout and a limit on calls in flight, shared by both
/// workers. Whether two calls for one slot can overlap is decided by the workers' row claims,
/// not here.
#[derive(Clone)]
pub struct PlatformClient {
    adapter: Arc<dyn Platform>,
    timeout: Duration,
    permits: Arc<Semaphore>,
}

impl PlatformClient {
    pub fn new(adapter: Arc<dyn Platform>, timeout: Duration, concurrency: usize) -> Self {
        Self {
            adapter,
            timeout,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    pub async fn call(&self, operation: Operation, uuid: &str) -> Result<(), PlatformError> {
        // The semaphore is never closed, so acquiring cannot fail.
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("platform semaphore is never closed");
        let started = Instant::now();
        let call = match operation {
            Operation::Stop => self.adapter.stop(uuid),
            Operation::Delete => self.adapter.delete(uuid),
        };
        let outcome = match tokio::time::timeout(self.timeout, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(PlatformError::TimedOut {
                operation,
                uuid: uuid.to_owned(),
                after: self.timeout,
            }),
        };
        crate::metrics::platform_call(operation, started.elapsed(), &outcome);
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match &outcome {
            Ok(()) => debug!(%operation, uuid, elapsed_ms, "platform call succeeded"),
            Err(error) => warn!(%operation, uuid, elapsed_ms, %error, "platform call failed"),
        }
        outcome
    }

    /// Makes one call per slot, up to `concurrency` at once, and returns each slot's outcome.
    /// Calls not yet started when `budget` has passed are not made (`None`): their slots are
    /// left for a later batch rather than holding their claims past the lease.
    pub async fn call_each(
        &self,
        calls: Vec<SlotCall>,
        concurrency: usize,
        budget: Duration,
    ) -> HashMap<i32, Option<Result<(), PlatformError>>> {
        let deadline = Instant::now() + budget;
        let futures = calls.into_iter().map(|call| {
            let span = info_span!("slot", slot_id = call.slot_id, operation = %call.operation);
            let client = self.clone();
            async move {
                if Instant::now() >= deadline {
                    return (call.slot_id, None);
                }
                (
                    call.slot_id,
                    Some(client.call(call.operation, &call.uuid).await),
                )
            }
            .instrument(span)
        });
        let futures: Vec<_> = futures.collect();
        stream::iter(futures)
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await
    }
}

/// One platform call a batch wants to make for a slot.
#[derive(Debug, Clone)]
pub struct SlotCall {
    pub slot_id: i32,
    pub operation: Operation,
    pub uuid: String,
}
