//! Every SQL statement the workers run, in one place. Each state change is a guarded
//! statement: it re-checks, on the locked row, the state the decision was made from, so a row
//! that moved on in between is left alone.
//!
//! Time is always the database's: `timezone('UTC', now())` is the current UTC wall-clock time
//! whatever the server's or session's TimeZone, which is how milo writes `last_heartbeat`.

pub mod audit;
pub mod bots;
pub mod locks;
pub mod slots;

use std::time::Duration;

pub use audit::{Action, AuditEntry, Trigger};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("could not get a database connection")]
    ConnectionFailed(#[source] deadpool_postgres::PoolError),
    #[error("database query failed")]
    QueryFailed(#[source] tokio_postgres::Error),
}

impl StoreError {
    /// A table or function the worker needs does not exist (SQLSTATE 42P01 or 42883): the
    /// schema was never migrated on this database, or milo's tables are missing.
    pub fn is_missing_schema(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            Self::QueryFailed(error) => matches!(
                error.code(),
                Some(code) if *code == SqlState::UNDEFINED_TABLE
                    || *code == SqlState::UNDEFINED_FUNCTION
            ),
            Self::ConnectionFailed(_) => false,
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        Self::ConnectionFailed(error)
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::QueryFailed(error)
    }
}

/// Seconds as the `float8` that `make_interval(secs => ...)` takes.
pub(crate) fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Cuts a reason to fit `deployment_error varchar(1024)` on a character boundary.
pub(crate) fn fit(reason: &str, max_chars: usize) -> String {
    reason.chars().take(max_chars).collect()
}
