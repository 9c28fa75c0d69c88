//! The Coolify adapter against a fake Coolify written here: a raw HTTP/1.1 server on
//! 127.0.0.1 that records every request and answers each from a script per application
//! (success by default), so the tests can see exactly what was sent and how failures are
//! handled. The last tests run the `milo-workers` binary with `--platform coolify` against it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use milo_workers::platform::{
    CoolifyPlatform, CoolifySettings, Operation, PlatformClient, PlatformError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{self, EVENTUALLY};

const TOKEN: &str = "test-token-0123";

/// How the fake answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Ok,
    Status(u16, &'static str),
    /// 429 with `Retry-After: <seconds>`.
    RateLimited(u64),
    /// Never answers.
    Slow,
    /// Closes the connection without a response.
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct FakeState {
    requests: Vec<Recorded>,
    /// Replies per application uuid, used up in order; then every request succeeds.
    script: HashMap<String, VecDeque<Reply>>,
}

#[derive(Clone)]
pub struct FakeCoolify {
    pub addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
}

impl FakeCoolify {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let fake = Self {
            addr,
            state: Arc::default(),
        };
        let serving = fake.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serving.clone().serve(stream));
            }
        });
        fake
    }

    pub fn api_url(&self) -> String {
        format!("http://{}/api/v1", self.addr)
    }

    pub fn script(&self, uuid: &str, replies: &[Reply]) {
        let mut state = self.state.lock().unwrap();
        state
            .script
            .entry(uuid.to_owned())
            .or_default()
            .extend(replies.iter().cloned());
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    async fn serve(self, mut stream: TcpStream) {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
            if buffer.len() > 64 * 1024 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_owned();
        let target = request_line.next().unwrap_or_default();
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
            None => (target.to_owned(), None),
        };
        let authorization = lines.find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("authorization")
                .then(|| value.trim().to_owned())
        });
        let uuid = path
            .split('/')
            .skip_while(|s| *s != "applications")
            .nth(1)
            .unwrap_or_default()
            .to_owned();

        let reply = {
            let mut state = self.state.lock().unwrap();
            state.requests.push(Recorded {
                method,
                path,
                query,
                authorization,
            });
            state
                .script
                .get_mut(&uuid)
                .and_then(VecDeque::pop_front)
                .unwrap_or(Reply::Ok)
        };
        let (status, extra, body) = match reply {
            Reply::Ok => (200, String::new(), r#"{"message":"done"}"#),
            Reply::Status(status, body) => (status, String::new(), body),
            Reply::RateLimited(secs) => (429, format!("retry-after: {secs}\r\n"), "slow down"),
            Reply::Slow => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            Reply::Drop => return,
        };
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

fn client_for(url: &str, timeout: Duration) -> PlatformClient {
    let mut settings = CoolifySettings::new(url, TOKEN, timeout);
    settings.retry_first = Duration::from_millis(10);
    let platform = CoolifyPlatform::new(settings).expect("valid settings");
    PlatformClient::new(Arc::new(platform), timeout, 4)
}

fn client(fake: &FakeCoolify) -> PlatformClient {
    client_for(&fake.api_url(), Duration::from_secs(5))
}

fn request(method: &str, path: &str, query: Option<&str>) -> Recorded {
    Recorded {
        method: method.into(),
        path: path.into(),
        query: query.map(Into::into),
        authorization: Some(format!("Bearer {TOKEN}")),
    }
}

const DELETE_QUERY: &str = "delete_configurations=true&delete_volumes=true&docker_cleanup=true";

#[tokio::test]
async fn stop_and_delete_send_exactly_the_documented_requests() {
    let fake = FakeCoolify::start().await;
    let client = client(&fake);
    client.call(Operation::Stop, "app-1").await.unwrap();
    client.call(Operation::Delete, "app-2").await.unwrap();
    assert_eq!(
        fake.requests(),
        [
            request("GET", "/api/v1/applications/app-1/stop", None),
            request("DELETE", "/api/v1/applications/app-2", Some(DELETE_QUERY)),
        ]
    );
}

#[tokio::test]
async fn not_found_means_already_stopped_or_deleted() {
    let fake = FakeCoolify::start().await;
    fake.script(
        "gone",
        &[Reply::Status(404, "{}"), Reply::Status(404, "{}")],
    );
    let client = client(&fake);
    client.call(Operation::Stop, "gone").await.unwrap();
    client.call(Operation::Delete, "gone").await.unwrap();
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn a_server_error_fails_at_once_with_its_status_and_body() {
    let fake = FakeCoolify::start().await;
    fake.script(
        "app-1",
        &[Reply::Status(500, r#"{"message":"boom in coolify"}"#)],
    );
    let error = client(&fake)
        .call(Operation::Stop, "app-1")
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, PlatformError::Failed { .. }), "{message}");
    assert!(message.contains("500"), "{message}");
    assert!(message.contains("boom in coolify"), "{message}");
    assert!(
        message.contains("/api/v1/applications/app-1/stop"),
        "{message}"
    );
    assert!(!message.contains(TOKEN), "{message}");
    assert_eq!(fake.requests().len(), 1, "a 500 is not retried");
}

#[tokio::test]
async fn a_long_error_body_is_cut_short() {
    let fake = FakeCoolify::start().await;
    let body: &'static str = "x".repeat(5000).leak();
    fake.script("app-1", &[Reply::Status(400, body)]);
    let message = client(&fake)
        .call(Operation::Stop, "app-1")
        .await
        .unwrap_err()
        .to_string();
    assert!(message.contains("400") && message.len() < 600, "{message}");
}

#[tokio::test]
async fn rate_limiting_is_retried_after_the_time_the_server_asks_for() {
    let fake = FakeCoolify::start().await;
    fake.script("app-1", &[Reply::RateLimited(1), Reply::Ok]);
    client(&fake).call(Operation::Stop, "app-1").await.unwrap();
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn a_retry_after_beyond_the_call_timeout_fails_with_the_429_instead_of_waiting() {
    let fake = FakeCoolify::start().await;
    fake.script("app-1", &[Reply::RateLimited(600)]);
    let message = client(&fake)
        .call(Operation::Stop, "app-1")
        .await
        .unwrap_err()
        .to_string();
    assert!(message.contains("429"), "{message}");
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn gateway_errors_are_retried() {
    let fake = FakeCoolify::start().await;
    fake.script(
        "app-1",
        &[
            Reply::Status(502, ""),
            Reply::Status(503, ""),
            Reply::Status(504, ""),
        ],
    );
    client(&fake)
        .call(Operation::Delete, "app-1")
        .await
        .unwrap();
    assert_eq!(fake.requests().len(), 4);
}

#[tokio::test]
async fn a_dropped_connection_is_retried_and_bounded() {
    let fake = FakeCoolify::start().await;
    fake.script("flaky", &[Reply::Drop]);
    client(&fake).call(Operation::Stop, "flaky").await.unwrap();
    assert_eq!(fake.requests().len(), 2);

    fake.script(
        "dead",
        &[Reply::Drop, Reply::Drop, Reply::Drop, Reply::Drop],
    );
    let message = client(&fake)
        .call(Operation::Stop, "dead")
        .await
        .unwrap_err()
        .to_string();
    assert!(message.contains("gave up after 4 attempts"), "{message}");
    assert_eq!(fake.requests().len(), 6);
}

#[tokio::test]
async fn a_refused_connection_fails_after_bounded_attempts() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/api/v1", closed.local_addr().unwrap());
    drop(closed);
    let client = client_for(&url, Duration::from_secs(5));
    let message = client
        .call(Operation::Stop, "app-1")
        .await
        .unwrap_err()
        .to_string();
    assert!(message.contains("gave up after 4 attempts"), "{message}");
}

#[tokio::test]
async fn a_call_that_hangs_times_out() {
    let fake = FakeCoolify::start().await;
    fake.script("app-1", &[Reply::Slow]);
    let client = client_for(&fake.api_url(), Duration::from_millis(300));
    let error = client.call(Operation::Stop, "app-1").await.unwrap_err();
    assert!(matches!(error, PlatformError::TimedOut { .. }), "{error}");
}

/// Runs the binary against `db` with `--platform coolify`; its log goes to a file.
struct Binary {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Binary {
    fn start(db: &common::TestDb, api_url: &str, extra: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", db.name));
        let child = Command::new(env!("CARGO_BIN_EXE_milo-workers"))
            .args(["run", "--platform", "coolify", "--coolify-api-url", api_url])
            .args([
                "--no-migrate",
                "--sweep-interval",
                "0",
                "--platform-timeout",
                "5s",
                // Any free port: the default 9187 may be taken by another daemon or test.
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("DATABASE_URL", &db.url)
            .env("MILO_WORKERS_COOLIFY_API_TOKEN", TOKEN)
            .env_remove("MILO_WORKERS_COOLIFY_API_TOKEN_FILE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("the binary starts");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        let status = self.child.wait().expect("wait");
        let _ = std::fs::remove_file(&self.log);
        status
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        // Only reached with the child still running when a test failed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls until `check` holds; on timeout panics with the binary's log.
async fn until<F, Fut>(binary: &Binary, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while !check().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting until {what}; log:\n{}", binary.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_daemon_recovers_and_deletes_slots_through_coolify() {
    let fake = FakeCoolify::start().await;
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    // Out of attempts before the daemon starts: its start-up sweep deletes it.
    let doomed = common::insert_slot(&milo, "doomed", "error", None, 60.0).await;
    milo.execute(
        "UPDATE bot_pool_slots SET recovery_attempts = 3 WHERE id = $1",
        &[&doomed],
    )
    .await
    .unwrap();
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let broken = common::insert_slot(&milo, "broken", "busy", Some(bot), 60.0).await;

    let binary = Binary::start(&db, &fake.api_url(), &[]);
    until(&binary, "the doomed slot is deleted", || async {
        common::slot_status(&milo, doomed).await.is_none()
    })
    .await;

    // Broken while the daemon runs: the notification path recovers it.
    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&broken],
    )
    .await
    .unwrap();
    until(&binary, "the broken slot is idle again", || async {
        common::slot_status(&milo, broken).await.as_deref() == Some("idle")
    })
    .await;
    assert_eq!(common::bot_status(&milo, bot).await, "FATAL");

    let requests = fake.requests();
    assert!(
        requests.contains(&request(
            "DELETE",
            "/api/v1/applications/app-doomed",
            Some(DELETE_QUERY)
        )),
        "{requests:?}"
    );
    assert!(
        requests.contains(&request(
            "GET",
            "/api/v1/applications/app-broken/stop",
            None
        )),
        "{requests:?}"
    );
    let log = binary.log();
    assert!(
        !log.contains(TOKEN),
        "the token leaked into the log:\n{log}"
    );
    assert!(binary.stop().success());
}

#[test]
fn coolify_without_a_url_or_token_refuses_to_start_and_names_the_setting() {
    let run = |args: &[&str], token: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_milo-workers"));
        command
            .args(["run", "--platform", "coolify", "--no-migrate"])
            .args(args)
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env_remove("MILO_WORKERS_COOLIFY_API_URL")
            .env_remove("MILO_WORKERS_COOLIFY_API_TOKEN")
            .env_remove("MILO_WORKERS_COOLIFY_API_TOKEN_FILE")
            .stdin(Stdio::null());
        if let Some(token) = token {
            command.env("MILO_WORKERS_COOLIFY_API_TOKEN", token);
        }
        let output = command.output().expect("the binary runs");
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let no_url = run(&[], Some(TOKEN));
    assert!(no_url.contains("MILO_WORKERS_COOLIFY_API_URL"), "{no_url}");
    let no_token = run(&["--coolify-api-url", "https://c.example/api/v1"], None);
    assert!(
        no_token.contains("MILO_WORKERS_COOLIFY_API_TOKEN"),
        "{no_token}"
    );
    assert!(no_token.contains("--coolify-api-token-file"), "{no_token}");
}
