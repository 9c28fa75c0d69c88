//! Connections to PostgreSQL: the pool every query goes through, and the settings of the
//! listener's dedicated connection.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

pub mod tls;

pub use tls::{RootCerts, SslMode, TlsConfigError, TlsParams};

/// `application_name` of pooled connections, so operators can tell them apart in
/// `pg_stat_activity`.
pub const POOL_APPLICATION_NAME: &str = "milo-workers";
/// `application_name` of the LISTEN connection; tests find its backend by this name.
pub const LISTENER_APPLICATION_NAME: &str = "milo-workers-listener";

/// A silent network loss must be noticed in seconds: the kernel default keepalive idle time is
/// two hours. Keepalives catch a dead peer while the socket is idle, the user timeout catches
/// one while data is unacknowledged.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database url")]
    InvalidUrl(#[source] tokio_postgres::Error),
    #[error("invalid TLS settings in the database url")]
    InvalidTls(#[source] TlsConfigError),
    #[error("could not build the connection pool")]
    PoolBuildFailed(#[source] deadpool_postgres::BuildError),
}

/// How to open a connection: tokio-postgres's settings, and the TLS connector that goes with
/// the URL's `sslmode` and `sslrootcert` (see [`tls`]).
#[derive(Clone)]
pub struct ConnectSettings {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
    pub ssl_mode: SslMode,
}

/// The connection half of a [`ConnectSettings::connect`], to be polled or spawned.
pub type TlsConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

impl ConnectSettings {
    /// Opens one connection; the caller polls (or spawns) the connection half.
    pub async fn connect(
        &self,
    ) -> Result<(tokio_postgres::Client, TlsConnection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }
}

/// Parses a libpq-style URL or key=value string, with its TLS parameters, and applies the
/// settings every connection of ours shares.
pub fn connect_config(url: &str, application_name: &str) -> Result<ConnectSettings, DbError> {
    let (rest, params) = tls::take_tls_params(url).map_err(DbError::InvalidTls)?;
    let tls = tls::connector(&params).map_err(DbError::InvalidTls)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(DbError::InvalidUrl)?;
    config
        .ssl_mode(params.mode.negotiation())
        .application_name(application_name)
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES)
        .tcp_user_timeout(TCP_USER_TIMEOUT);
    Ok(ConnectSettings {
        config,
        tls,
        ssl_mode: params.mode,
    })
}

/// Builds the pool. Sessions get server-side limits so that nothing waits forever:
/// `idle_in_transaction_session_timeout` is the lease on claimed rows. A worker holds its
/// claims in an open transaction while platform calls run; if the process freezes or the
/// network splits, the server ends the session after `lease` and another replica takes over.
pub fn pool(url: &str, size: usize, lease: Duration) -> Result<Pool, DbError> {
    let ConnectSettings {
        mut config, tls, ..
    } = connect_config(url, POOL_APPLICATION_NAME)?;
    config.options(format!(
        "-c statement_timeout=60000 -c lock_timeout=10000 \
         -c idle_in_transaction_session_timeout={}",
        lease.as_millis()
    ));
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(CONNECT_TIMEOUT * 2))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(DbError::PoolBuildFailed)
}

/// The same connection string pointing at another database on the same server.
pub fn with_database(url: &str, database: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let query_start = rest.find('?').unwrap_or(rest.len());
        let authority_end = rest[..query_start].find('/').unwrap_or(query_start);
        return format!(
            "{}{}/{}{}",
            &url[..scheme_end + 3],
            &rest[..authority_end],
            database,
            &rest[query_start..]
        );
    }
    // key=value form: a later key overrides an earlier one.
    format!("{url} dbname={database}")
}

/// The URL with any password replaced, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &rest[..colon],
                    &rest[at..]
                );
            }
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::{redact_url, with_database};

    #[test]
    fn another_database_on_the_same_server() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "scratch"),
            "postgres://u:p@h:5432/scratch?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h", "scratch"),
            "postgres://h/scratch"
        );
        assert_eq!(
            with_database("host=h dbname=a", "b"),
            "host=h dbname=a dbname=b"
        );
    }

    #[test]
    fn passwords_are_redacted_from_urls_and_key_value_strings() {
        assert_eq!(
            redact_url("postgres://milo:s3cret@db:5432/milo"),
            "postgres://milo:***@db:5432/milo"
        );
        assert_eq!(
            redact_url("postgres://milo@db/milo"),
            "postgres://milo@db/milo"
        );
        assert_eq!(
            redact_url("host=db user=milo password=s3cret"),
            "host=db user=milo password=***"
        );
    }
}
