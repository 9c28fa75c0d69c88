//! A TCP proxy in front of the PostgreSQL server whose faults the test controls: it can cut
//! every connection, silently drop every byte while keeping the sockets open (a network loss
//! that no FIN or RST announces), refuse new connections, and heal.
//!
//! Only the daemon under test connects through it; the test's own client connects directly,
//! so it can keep changing the database during an outage.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Faults {
    /// Bytes read from either side are dropped.
    blackhole: bool,
    /// New connections are closed as soon as they are accepted.
    refuse: bool,
}

struct Shared {
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    /// Cancelled by [`Proxy::cut`]; every connection holds the token current when it opened.
    cut: Mutex<CancellationToken>,
    accepted: AtomicU64,
    refused: AtomicU64,
    open: AtomicU64,
}

pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to the server of `server_url`.
    pub async fn start(server_url: &str) -> Self {
        let upstream = upstream_of(server_url);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream,
            faults: watch::Sender::new(Faults::default()),
            cut: Mutex::new(CancellationToken::new()),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            open: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept(listener, shared.clone()));
        Self {
            addr,
            shared,
            accept_task,
        }
    }

    /// `url` (a `postgres://` URL) with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let scheme_end = url.find("://").expect("a postgres:// url") + 3;
        let rest = &url[scheme_end..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        let user = authority.rfind('@').map_or("", |at| &authority[..=at]);
        format!(
            "{}{user}{}{}",
            &url[..scheme_end],
            self.addr,
            &rest[authority_end..]
        )
    }

    /// Closes every connection open now (both sides), as a server restart or a reset would.
    pub fn cut(&self) {
        let mut cut = self.shared.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    /// From now on, every byte either side sends is dropped; nothing is closed. Connections
    /// that lose a byte this way are closed on [`Self::heal`], since their streams are broken.
    pub fn blackhole(&self) {
        self.shared.faults.send_modify(|f| f.blackhole = true);
    }

    /// New connections are accepted and closed at once, before any byte is forwarded.
    pub fn refuse(&self) {
        self.shared.faults.send_modify(|f| f.refuse = true);
    }

    /// Ends the blackhole and the refusal.
    pub fn heal(&self) {
        self.shared.faults.send_replace(Faults::default());
    }

    /// Connections accepted and forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed at once because of [`Self::refuse`].
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Forwarded connections not closed yet.
    pub fn open(&self) -> u64 {
        self.shared.open.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.shared.cut.lock().unwrap().cancel();
    }
}

fn upstream_of(server_url: &str) -> SocketAddr {
    let config: tokio_postgres::Config = server_url.parse().expect("valid server url");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        other => panic!("the proxy needs a TCP server, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let host = if host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        host
    };
    format!("{host}:{port}")
        .parse()
        .expect("the server's host is an IP address")
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if shared.faults.borrow().refuse {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let cut = shared.cut.lock().unwrap().clone();
        tokio::spawn(forward(client, shared.clone(), cut));
    }
}

/// Forwards one connection until either side closes, the proxy cuts it, or it lost bytes to
/// a blackhole that has since healed.
async fn forward(client: TcpStream, shared: Arc<Shared>, cut: CancellationToken) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    shared.open.fetch_add(1, Ordering::Relaxed);
    let lost_bytes = AtomicBool::new(false);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut faults = shared.faults.subscribe();
    tokio::select! {
        _ = cut.cancelled() => {}
        _ = pump(client_read, server_write, shared.faults.subscribe(), &lost_bytes) => {}
        _ = pump(server_read, client_write, shared.faults.subscribe(), &lost_bytes) => {}
        _ = async {
            while faults.changed().await.is_ok() {
                if lost_bytes.load(Ordering::Relaxed) && !faults.borrow().blackhole {
                    return;
                }
            }
        } => {}
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
    // Dropping the halves closes both sockets.
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    faults: watch::Receiver<Faults>,
    lost_bytes: &AtomicBool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if faults.borrow().blackhole {
            lost_bytes.store(true, Ordering::Relaxed);
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
