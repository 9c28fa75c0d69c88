//! An in-memory platform for the demo, the tests and the benchmarks: configurable latency and
//! failure rate, plus per-application faults and a log of every call so tests can prove what
//! was (and was not) called.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rand::Rng;

use super::{Operation, Platform, PlatformError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub operation: Operation,
    pub uuid: String,
    pub succeeded: bool,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    failing: HashSet<String>,
    hanging: HashSet<String>,
    in_flight: HashMap<String, usize>,
    /// Times a call started while another call for the same application was in flight.
    overlaps: usize,
}

#[derive(Clone)]
pub struct SimulatedPlatform {
    latency: Duration,
    failure_rate: f64,
    state: Arc<Mutex<State>>,
}

impl SimulatedPlatform {
    /// `failure_rate` is the probability in `[0, 1]` that a call fails.
    pub fn new(latency: Duration, failure_rate: f64) -> Self {
        Self {
            latency,
            failure_rate: failure_rate.clamp(0.0, 1.0),
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// Every later call for `uuid` fails until [`Self::heal`].
    pub fn fail(&self, uuid: &str) {
        self.lock().failing.insert(uuid.to_owned());
    }

    /// Every later call for `uuid` never returns until [`Self::heal`].
    pub fn hang(&self, uuid: &str) {
        self.lock().hanging.insert(uuid.to_owned());
    }

    pub fn heal(&self, uuid: &str) {
        let mut state = self.lock();
        state.failing.remove(uuid);
        state.hanging.remove(uuid);
    }

    /// Every call that has returned so far, in the order they returned. A call still in
    /// flight (or hanging) is not listed yet.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// How often two calls for one application were in flight at once; should be zero.
    pub fn overlapping_calls(&self) -> usize {
        self.lock().overlaps
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock can only come from a bug in this file; the state
        // is still usable for reporting, so recover it rather than poisoning every test.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn call(&self, operation: Operation, uuid: &str) -> Result<(), PlatformError> {
        let (hang, fail) = {
            let mut state = self.lock();
            let in_flight = state.in_flight.entry(uuid.to_owned()).or_default();
            *in_flight += 1;
            if *in_flight > 1 {
                state.overlaps += 1;
            }
            let fail = state.failing.contains(uuid)
                || (self.failure_rate > 0.0 && rand::thread_rng().gen_bool(self.failure_rate));
            (state.hanging.contains(uuid), fail)
        };
        let _in_flight = InFlight {
            platform: self,
            uuid,
        };

        if hang {
            std::future::pending::<()>().await;
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }

        self.lock().calls.push(Call {
            operation,
            uuid: uuid.to_owned(),
            succeeded: !fail,
        });
        if fail {
            return Err(PlatformError::Failed {
                operation,
                uuid: uuid.to_owned(),
                message: "simulated platform failure".into(),
            });
        }
        Ok(())
    }
}

/// Decrements the in-flight count even when the call is cancelled by a timeout.
struct InFlight<'a> {
    platform: &'a SimulatedPlatform,
    uuid: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.platform.lock();
        if let Some(count) = state.in_flight.get_mut(self.uuid) {
            *count -= 1;
        }
    }
}

impl Platform for SimulatedPlatform {
    fn stop<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>> {
        Box::pin(self.call(Operation::Stop, uuid))
    }

    fn delete<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>> {
        Box::pin(self.call(Operation::Delete, uuid))
    }
}
