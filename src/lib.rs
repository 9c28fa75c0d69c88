//! milo-workers keeps milo's fleet of meeting bots healthy: it recovers broken container
//! slots and marks silent bots FATAL, reacting to status changes as they are committed
//! instead of polling.
//!
//! Modules, in the order data flows through them:
//!
//! - [`schema`]: the worker's own schema and its triggers on milo's tables (`sql/`).
//! - [`listener`]: LISTEN connection; trigger notifications become events.
//! - [`pipeline`]: merges events with the safety tick, coalesces and debounces per worker.
//! - [`workers`]: SlotRecovery and BotHealth, and their start/stop/run-now lifecycle.
//! - [`store`]: every SQL statement the workers run, and the audit log.
//! - [`platform`]: the container platform's stop and delete calls.
//! - [`daemon`]: wires the above together; [`shutdown`]: the stop signal.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`; [`metrics`] names every metric, and
//!   [`health`] decides readiness.
//!
//! Shared vocabulary: [`status`] (bot and slot statuses and allowed moves), [`config`]
//! (tuning), [`db`] (connections). [`fleet`] reports the fleet's state for `status`.

pub mod config;
pub mod daemon;
pub mod db;
pub mod fleet;
pub mod health;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod pipeline;
pub mod platform;
pub mod schema;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod util;
pub mod workers;
