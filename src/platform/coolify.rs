//! The Coolify adapter: stops and deletes a slot's application through Coolify's HTTP API.
//!
//! - stop: `GET {api}/applications/{uuid}/stop`
//! - delete: `DELETE {api}/applications/{uuid}?delete_configurations=true&delete_volumes=true
//!   &docker_cleanup=true`
//!
//! Both send `Authorization: Bearer <token>`. A 404 means the application is already gone,
//! which for both calls is the outcome asked for, so it counts as success.
//!
//! Transient failures are retried a bounded number of times: connection failures, 429 (after
//! its `Retry-After`), 502, 503 and 504. A connection dropped after the request went out is
//! retried only for idempotent methods, which both calls are. Retries stay inside the call's
//! time budget: a retry that could not finish in time is not started, so the error names the
//! real failure rather than a timeout. [`super::PlatformClient`] still enforces the budget.
//!
//! The token never reaches a log line or an error: [`fmt::Debug`] redacts it, and the header
//! that carries it is marked sensitive.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use futures::future::BoxFuture;
use rand::Rng;
use reqwest::header::{HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode, Url};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Operation, Platform, PlatformError};
use crate::util::{cut_short, ErrorChain};

/// How much of an error response's body an error message shows.
const BODY_SHOWN: usize = 200;
/// How much of an error response's body is read at all.
const BODY_READ_LIMIT: usize = 4096;
/// Upper bound on establishing a connection, within the call budget.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the API is, how to authenticate, and how hard to retry.
#[derive(Clone)]
pub struct CoolifySettings {
    /// Base URL of the API, including its version: `https://coolify.example.com/api/v1`.
    pub api_url: String,
    /// The API token (Coolify: Keys & Tokens → API tokens), sent as a bearer token.
    pub token: String,
    /// Time one call may take, retries included; the same as the platform call timeout.
    pub budget: Duration,
    /// Attempts per call, the first one included.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles per retry (with jitter) unless the server says
    /// how long to wait with `Retry-After`.
    pub retry_first: Duration,
}

impl CoolifySettings {
    pub fn new(api_url: impl Into<String>, token: impl Into<String>, budget: Duration) -> Self {
        Self {
            api_url: api_url.into(),
            token: token.into(),
            budget,
            max_attempts: 4,
            retry_first: Duration::from_millis(250),
        }
    }
}

impl fmt::Debug for CoolifySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoolifySettings")
            .field("api_url", &self.api_url)
            .field("token", &"<redacted>")
            .field("budget", &self.budget)
            .field("max_attempts", &self.max_attempts)
            .field("retry_first", &self.retry_first)
            .finish()
    }
}

/// Why the adapter could not be set up. Each names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum CoolifyConfigError {
    #[error(
        "the Coolify API URL is not set (--coolify-api-url or MILO_WORKERS_COOLIFY_API_URL, \
         e.g. https://coolify.example.com/api/v1)"
    )]
    MissingUrl,
    #[error("the Coolify API URL {0:?} is not a valid http(s) URL")]
    InvalidUrl(String),
    #[error(
        "the Coolify API token is not set (MILO_WORKERS_COOLIFY_API_TOKEN, or a file named \
         by --coolify-api-token-file)"
    )]
    MissingToken,
    #[error(
        "the Coolify API token is set twice (MILO_WORKERS_COOLIFY_API_TOKEN or \
         --coolify-api-token, and --coolify-api-token-file); set one"
    )]
    TokenSetTwice,
    #[error("could not read the Coolify API token file {path}")]
    TokenFileUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the Coolify API token contains characters not allowed in an HTTP header")]
    InvalidToken,
    #[error("could not build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// The token from exactly one of its sources: the value (flag or environment) or a file
/// whose content, less surrounding whitespace, is the token.
pub fn resolve_token(
    value: Option<&str>,
    file: Option<&Path>,
) -> Result<String, CoolifyConfigError> {
    let token = match (value, file) {
        (Some(_), Some(_)) => return Err(CoolifyConfigError::TokenSetTwice),
        (Some(value), None) => value.trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|source| CoolifyConfigError::TokenFileUnreadable {
                path: path.display().to_string(),
                source,
            })?
            .trim()
            .to_owned(),
        (None, None) => return Err(CoolifyConfigError::MissingToken),
    };
    if token.is_empty() {
        return Err(CoolifyConfigError::MissingToken);
    }
    Ok(token)
}

/// The adapter. Cheap to clone: the HTTP client is shared.
#[derive(Clone)]
pub struct CoolifyPlatform {
    http: reqwest::Client,
    base: Url,
    authorization: HeaderValue,
    budget: Duration,
    max_attempts: u32,
    retry_first: Duration,
}

impl fmt::Debug for CoolifyPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoolifyPlatform")
            .field("base", &self.base.as_str())
            .field("authorization", &"Bearer <redacted>")
            .field("budget", &self.budget)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

/// What one attempt came to.
enum Attempt {
    Done,
    /// Worth another attempt, after `retry_after` if the server named a delay.
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    Fatal(String),
}

impl CoolifyPlatform {
    pub fn new(settings: CoolifySettings) -> Result<Self, CoolifyConfigError> {
        let url = settings.api_url.trim();
        if url.is_empty() {
            return Err(CoolifyConfigError::MissingUrl);
        }
        let invalid = || CoolifyConfigError::InvalidUrl(url.to_owned());
        let base = Url::parse(url).map_err(|_| invalid())?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(invalid());
        }
        if base.host_str().is_none() || base.query().is_some() {
            return Err(invalid());
        }
        if base.scheme() == "http" && !is_loopback(&base) {
            warn!(
                api_url = %base,
                "the Coolify API URL is plain http: the token travels unencrypted"
            );
        }
        let token = settings.token.trim();
        if token.is_empty() {
            return Err(CoolifyConfigError::MissingToken);
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| CoolifyConfigError::InvalidToken)?;
        authorization.set_sensitive(true);
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(settings.budget.max(Duration::from_millis(1))))
            .user_agent(concat!("milo-workers/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(CoolifyConfigError::Client)?;
        Ok(Self {
            http,
            base,
            authorization,
            budget: settings.budget,
            max_attempts: settings.max_attempts.max(1),
            retry_first: settings.retry_first,
        })
    }

    /// `{api}/applications/{uuid}` plus `tail`, the uuid escaped as one path segment.
    fn application_url(&self, uuid: &str, tail: Option<&str>) -> Result<Url, String> {
        if uuid.trim().is_empty() {
            return Err("the slot has no application uuid".into());
        }
        let mut url = self.base.clone();
        {
            let mut segments = url
                .path_segments_mut()
                .map_err(|()| format!("cannot extend the API URL {}", self.base))?;
            segments.pop_if_empty().push("applications").push(uuid);
            if let Some(tail) = tail {
                segments.push(tail);
            }
        }
        Ok(url)
    }

    async fn request(
        &self,
        operation: Operation,
        uuid: &str,
        method: Method,
        url: Result<Url, String>,
    ) -> Result<(), PlatformError> {
        let failed = |message: String| PlatformError::Failed {
            operation,
            uuid: uuid.to_owned(),
            message,
        };
        let url = url.map_err(failed)?;
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let (message, retry_after) = match self.attempt(&method, &url).await {
                Attempt::Done => return Ok(()),
                Attempt::Fatal(message) => return Err(failed(message)),
                Attempt::Transient {
                    message,
                    retry_after,
                } => (message, retry_after),
            };
            if attempt >= self.max_attempts {
                return Err(failed(format!(
                    "{message} (gave up after {attempt} attempts)"
                )));
            }
            let delay = retry_after.unwrap_or_else(|| self.backoff(attempt));
            if started.elapsed() + delay >= self.budget {
                return Err(failed(format!(
                    "{message} (attempt {attempt}; a retry in {delay:?} would not finish \
                     within the {:?} call timeout)",
                    self.budget
                )));
            }
            debug!(%operation, uuid, attempt, ?delay, error = %message, "retrying Coolify call");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    async fn attempt(&self, method: &Method, url: &Url) -> Attempt {
        let what = format!("{method} {}", url.path());
        let sent = self
            .http
            .request(method.clone(), url.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                let message = format!("{what}: {}", ErrorChain(&error));
                // Nothing reached the server if the connection never opened; otherwise the
                // request may have been acted on, and only an idempotent one may be repeated.
                return if error.is_connect() || is_idempotent(method) {
                    Attempt::Transient {
                        message,
                        retry_after: None,
                    }
                } else {
                    Attempt::Fatal(message)
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Done;
        }
        if status == StatusCode::NOT_FOUND {
            debug!(request = %what, "application not found: already gone");
            return Attempt::Done;
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = read_some(response).await;
        let message = format!(
            "HTTP {status} from {what}: {}",
            cut_short(&body, BODY_SHOWN)
        );
        match status {
            StatusCode::TOO_MANY_REQUESTS => Attempt::Transient {
                message,
                retry_after,
            },
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
                if is_idempotent(method) =>
            {
                Attempt::Transient {
                    message,
                    retry_after,
                }
            }
            _ => Attempt::Fatal(message),
        }
    }

    /// Doubling from `retry_first`, jittered into the upper half so replicas spread out.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .retry_first
            .saturating_mul(1u32 << (attempt - 1).min(10));
        ceiling.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }
}

impl Platform for CoolifyPlatform {
    fn stop<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>> {
        let url = self.application_url(uuid, Some("stop"));
        Box::pin(self.request(Operation::Stop, uuid, Method::GET, url))
    }

    fn delete<'a>(&'a self, uuid: &'a str) -> BoxFuture<'a, Result<(), PlatformError>> {
        let url = self.application_url(uuid, None).map(|mut url| {
            url.query_pairs_mut()
                .append_pair("delete_configurations", "true")
                .append_pair("delete_volumes", "true")
                .append_pair("docker_cleanup", "true");
            url
        });
        Box::pin(self.request(Operation::Delete, uuid, Method::DELETE, url))
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

fn is_loopback(url: &Url) -> bool {
    match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// The start of an error response's body, for the error message; never fails.
async fn read_some(mut response: Response) -> String {
    let mut body = Vec::new();
    while body.len() < BODY_READ_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    body.truncate(BODY_READ_LIMIT);
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(url: &str) -> CoolifyPlatform {
        let settings = CoolifySettings::new(url, "s3cret-token", Duration::from_secs(5));
        CoolifyPlatform::new(settings).expect("valid settings")
    }

    #[test]
    fn urls_are_built_under_the_api_base() {
        for base in ["https://c.example/api/v1", "https://c.example/api/v1/"] {
            let p = platform(base);
            assert_eq!(
                p.application_url("abc", Some("stop")).unwrap().as_str(),
                "https://c.example/api/v1/applications/abc/stop"
            );
        }
        let p = platform("https://c.example/api/v1");
        assert_eq!(
            p.application_url("a/b?c", None).unwrap().as_str(),
            "https://c.example/api/v1/applications/a%2Fb%3Fc"
        );
        assert!(p.application_url(" ", None).is_err());
    }

    #[test]
    fn bad_settings_name_what_to_fix() {
        let new = |url: &str, token: &str| {
            CoolifyPlatform::new(CoolifySettings::new(url, token, Duration::from_secs(1)))
        };
        assert!(matches!(new("", "t"), Err(CoolifyConfigError::MissingUrl)));
        assert!(matches!(
            new("coolify", "t"),
            Err(CoolifyConfigError::InvalidUrl(_))
        ));
        assert!(matches!(
            new("ftp://h/api", "t"),
            Err(CoolifyConfigError::InvalidUrl(_))
        ));
        assert!(matches!(
            new("https://h/api", " "),
            Err(CoolifyConfigError::MissingToken)
        ));
        assert!(matches!(
            new("https://h/api", "a\nb"),
            Err(CoolifyConfigError::InvalidToken)
        ));
        let message = CoolifyConfigError::MissingUrl.to_string();
        assert!(
            message.contains("MILO_WORKERS_COOLIFY_API_URL"),
            "{message}"
        );
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let p = platform("https://c.example/api/v1");
        let shown = format!("{p:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        let settings = CoolifySettings::new("https://c", "s3cret-token", Duration::ZERO);
        assert!(!format!("{settings:?}").contains("s3cret"));
    }

    #[test]
    fn the_token_comes_from_exactly_one_source() {
        let dir = std::env::temp_dir().join(format!("mw-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        assert_eq!(resolve_token(None, Some(&file)).unwrap(), "from-file");
        assert_eq!(resolve_token(Some("from-env"), None).unwrap(), "from-env");
        assert!(matches!(
            resolve_token(Some("x"), Some(&file)),
            Err(CoolifyConfigError::TokenSetTwice)
        ));
        assert!(matches!(
            resolve_token(None, None),
            Err(CoolifyConfigError::MissingToken)
        ));
        assert!(matches!(
            resolve_token(None, Some(&dir.join("absent"))),
            Err(CoolifyConfigError::TokenFileUnreadable { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
