//! The LISTEN connection: a dedicated tokio-postgres connection (a pooled one would drop
//! notifications between checkouts) that turns the triggers' NOTIFYs into pipeline events.
//!
//! Notifications are a hint: the server discards every one sent while nobody listens. So on
//! every (re)connect the listener subscribes first and then asks for a resync sweep, in that
//! order, so that no change can fall between the sweep and the subscription. A ping every few
//! seconds, with TCP keepalives and a user timeout on the socket, notices a dead connection in
//! seconds; reconnects back off exponentially with jitter.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::db;
use crate::pipeline::Event;
use crate::status::{BotStatus, SlotStatus};
use crate::util::{cut_short, ErrorChain};

/// Channels the triggers in `sql/` notify on. Payload: `<row id>:<new status>`.
pub const SLOTS_CHANNEL: &str = "milo_workers_slots";
pub const BOTS_CHANNEL: &str = "milo_workers_bots";

/// How much of a bad payload a warning shows.
const PAYLOAD_SHOWN: usize = 80;

#[derive(Debug, Clone)]
pub struct ListenerSettings {
    pub database_url: String,
    /// Ask for a resync sweep after the first subscription too (reconnects always do).
    pub sweep_on_start: bool,
    /// A `SELECT 1` on the connection this often; no answer within the same time is a loss.
    pub ping_interval: Duration,
    pub backoff_first: Duration,
    pub backoff_max: Duration,
    /// A connection that lived this long resets the backoff.
    pub healthy_after: Duration,
}

impl ListenerSettings {
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            sweep_on_start: true,
            ping_interval: Duration::from_secs(5),
            backoff_first: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
        }
    }
}

/// What the listener has seen, for health checks, tests and the log.
#[derive(Debug, Default)]
pub struct ListenerStatus {
    connected: AtomicBool,
    connections: AtomicU64,
    ignored_payloads: AtomicU64,
    notifications: AtomicU64,
}

impl ListenerStatus {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Successful subscriptions so far; more than one means it reconnected.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn ignored_payloads(&self) -> u64 {
        self.ignored_payloads.load(Ordering::Relaxed)
    }

    pub fn notifications(&self) -> u64 {
        self.notifications.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn set_connected_for_tests(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error(transparent)]
    Config(db::DbError),
    #[error("connecting failed")]
    ConnectFailed(#[source] tokio_postgres::Error),
    #[error("subscribing failed")]
    SubscribeFailed(#[source] tokio_postgres::Error),
    #[error("connection failed")]
    ConnectionFailed(#[source] tokio_postgres::Error),
    #[error("server closed the connection")]
    Closed,
    #[error("ping got no answer within {0:?}")]
    PingTimedOut(Duration),
    #[error("ping failed")]
    PingFailed(#[source] tokio_postgres::Error),
    #[error("the pipeline is gone")]
    PipelineGone,
}

/// Why a notification payload was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("unknown channel")]
    UnknownChannel,
    #[error("expected `<id>:<status>`")]
    Malformed,
    #[error("row id is not a positive 32-bit integer")]
    BadId,
}

/// Parses one notification into an event. An unknown status is not an error: the row id is
/// what matters, and the worker reads the row's real state from the database.
pub fn parse(channel: &str, payload: &str) -> Result<(Event, Option<String>), PayloadError> {
    let (id, status) = payload.split_once(':').ok_or(PayloadError::Malformed)?;
    let id: i32 = id.trim().parse().map_err(|_| PayloadError::BadId)?;
    if id <= 0 {
        return Err(PayloadError::BadId);
    }
    if status.is_empty() {
        return Err(PayloadError::Malformed);
    }
    let (event, unknown) = match channel {
        SLOTS_CHANNEL => (
            Event::SlotChanged(id),
            matches!(SlotStatus::parse(status), SlotStatus::Unknown(_)),
        ),
        BOTS_CHANNEL => (
            Event::BotChanged(id),
            matches!(BotStatus::parse(status), BotStatus::Unknown(_)),
        ),
        _ => return Err(PayloadError::UnknownChannel),
    };
    Ok((event, unknown.then(|| status.to_owned())))
}

/// Starts the listener task. It runs until `cancel`, reconnecting as needed.
pub fn spawn(
    settings: ListenerSettings,
    events: mpsc::Sender<Event>,
    status: Arc<ListenerStatus>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(run(settings, events, status, cancel))
}

async fn run(
    settings: ListenerSettings,
    events: mpsc::Sender<Event>,
    status: Arc<ListenerStatus>,
    cancel: CancellationToken,
) {
    let mut failures: u32 = 0;
    let mut lost_at: Option<Instant> = None;

    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            attempt = connect(&settings, &events, &status) => attempt,
        };
        match attempt {
            Ok((client, connection)) => {
                let subscribed_at = Instant::now();
                status.connected.store(true, Ordering::Relaxed);
                let first = status.connections.fetch_add(1, Ordering::Relaxed) == 0;
                match lost_at.take() {
                    Some(lost) => info!(
                        downtime_ms = lost.elapsed().as_millis() as u64,
                        "listener reconnected"
                    ),
                    None => info!("listener subscribed"),
                }
                // Subscribed first, sweep second: nothing falls in between.
                if !first || settings.sweep_on_start {
                    info!(first, "requesting resync sweep");
                    if events.send(Event::Resync).await.is_err() {
                        return;
                    }
                }

                let ended = serve(&settings, &client, connection, &cancel).await;
                status.connected.store(false, Ordering::Relaxed);
                let Some(error) = ended else { return };
                if matches!(error, ListenError::PipelineGone) {
                    return;
                }
                warn!(error = %ErrorChain(&error), "listener connection lost");
                lost_at = Some(Instant::now());
                if subscribed_at.elapsed() >= settings.healthy_after {
                    failures = 0;
                }
            }
            Err(error) => {
                if matches!(error, ListenError::PipelineGone) {
                    return;
                }
                // Once per outage at warn; each further retry only at debug.
                if failures == 0 {
                    warn!(error = %ErrorChain(&error), "listener cannot connect; retrying");
                } else {
                    debug!(error = %ErrorChain(&error), failures, "listener still cannot connect");
                }
                lost_at.get_or_insert_with(Instant::now);
            }
        }

        let delay = backoff(&settings, failures);
        failures = failures.saturating_add(1);
        debug!(?delay, "listener reconnecting after delay");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Exponential backoff with full jitter in the upper half, so replicas that lost the server
/// together do not reconnect in lockstep.
fn backoff(settings: &ListenerSettings, failures: u32) -> Duration {
    let ceiling = settings
        .backoff_first
        .saturating_mul(1u32 << failures.min(16))
        .min(settings.backoff_max);
    let jitter = rand::thread_rng().gen_range(0.5..=1.0);
    ceiling.mul_f64(jitter)
}

/// Connects, starts draining the connection, and subscribes to both channels.
async fn connect(
    settings: &ListenerSettings,
    events: &mpsc::Sender<Event>,
    status: &Arc<ListenerStatus>,
) -> Result<(Client, JoinHandle<Result<(), ListenError>>), ListenError> {
    let config = db::connect_config(&settings.database_url, db::LISTENER_APPLICATION_NAME)
        .map_err(ListenError::Config)?;
    let (client, mut connection) = config.connect().await.map_err(ListenError::ConnectFailed)?;

    // The connection must be polled for the client's queries to progress, and polling it is
    // what reads notifications off the socket: this task does both, and forwards each
    // notification without waiting on any worker.
    let events = events.clone();
    let status = status.clone();
    let drain = tokio::spawn(async move {
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    status.notifications.fetch_add(1, Ordering::Relaxed);
                    match parse(n.channel(), n.payload()) {
                        Ok((event, unknown_status)) => {
                            if let Some(unknown) = unknown_status {
                                let id = match event {
                                    Event::SlotChanged(id) | Event::BotChanged(id) => id,
                                    Event::Tick | Event::Resync => 0,
                                };
                                warn!(
                                    channel = n.channel(),
                                    id,
                                    status = %cut_short(&unknown, PAYLOAD_SHOWN),
                                    "notification names an unknown status; checking the row anyway"
                                );
                            }
                            events
                                .send(event)
                                .await
                                .map_err(|_| ListenError::PipelineGone)?;
                        }
                        Err(error) => {
                            status.ignored_payloads.fetch_add(1, Ordering::Relaxed);
                            warn!(
                                channel = n.channel(),
                                payload = %cut_short(n.payload(), PAYLOAD_SHOWN),
                                %error,
                                "ignoring notification payload"
                            );
                        }
                    }
                }
                Ok(AsyncMessage::Notice(notice)) => {
                    debug!(notice = %notice.message(), "server notice on listener");
                }
                Ok(_) => {}
                Err(error) => return Err(ListenError::ConnectionFailed(error)),
            }
        }
        Err(ListenError::Closed)
    });

    let subscribe = format!("LISTEN {SLOTS_CHANNEL}; LISTEN {BOTS_CHANNEL};");
    if let Err(error) = client.batch_execute(&subscribe).await {
        drain.abort();
        return Err(ListenError::SubscribeFailed(error));
    }
    Ok((client, drain))
}

/// Pings until the connection fails or `cancel`; returns the failure, or `None` if cancelled.
async fn serve(
    settings: &ListenerSettings,
    client: &Client,
    mut drain: JoinHandle<Result<(), ListenError>>,
    cancel: &CancellationToken,
) -> Option<ListenError> {
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                drain.abort();
                return None;
            }
            ended = &mut drain => {
                return Some(match ended {
                    Ok(Err(error)) => error,
                    Ok(Ok(())) | Err(_) => ListenError::Closed,
                });
            }
            _ = ping.tick() => {
                let ping_query = client.simple_query("SELECT 1");
                let pinged = tokio::time::timeout(settings.ping_interval, ping_query).await;
                let failure = match pinged {
                    Ok(Ok(_)) => continue,
                    Ok(Err(error)) => ListenError::PingFailed(error),
                    Err(_) => ListenError::PingTimedOut(settings.ping_interval),
                };
                drain.abort();
                return Some(failure);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_of_the_triggers_parse() {
        assert_eq!(
            parse(SLOTS_CHANNEL, "42:error"),
            Ok((Event::SlotChanged(42), None))
        );
        assert_eq!(
            parse(BOTS_CHANNEL, "7:IN_CALL"),
            Ok((Event::BotChanged(7), None))
        );
    }

    #[test]
    fn an_unknown_status_still_routes_the_row() {
        assert_eq!(
            parse(BOTS_CHANNEL, "7:HIBERNATING"),
            Ok((Event::BotChanged(7), Some("HIBERNATING".into())))
        );
    }

    #[test]
    fn garbage_payloads_are_rejected() {
        assert_eq!(parse(SLOTS_CHANNEL, ""), Err(PayloadError::Malformed));
        assert_eq!(parse(SLOTS_CHANNEL, "hello"), Err(PayloadError::Malformed));
        assert_eq!(parse(SLOTS_CHANNEL, "x:error"), Err(PayloadError::BadId));
        assert_eq!(parse(SLOTS_CHANNEL, "-3:error"), Err(PayloadError::BadId));
        assert_eq!(
            parse(SLOTS_CHANNEL, "99999999999:error"),
            Err(PayloadError::BadId)
        );
        assert_eq!(parse(SLOTS_CHANNEL, "5:"), Err(PayloadError::Malformed));
        assert_eq!(parse("other", "5:error"), Err(PayloadError::UnknownChannel));
        assert_eq!(
            parse(SLOTS_CHANNEL, &"9".repeat(8000)),
            Err(PayloadError::Malformed)
        );
        let huge_id = format!("{}:error", "9".repeat(8000));
        assert_eq!(parse(SLOTS_CHANNEL, &huge_id), Err(PayloadError::BadId));
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_with_jitter() {
        let settings = ListenerSettings::new("postgres://x");
        for failures in 0..20 {
            let ceiling = (Duration::from_millis(500) * 2u32.pow(failures.min(16)))
                .min(Duration::from_secs(30));
            let delay = backoff(&settings, failures);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{failures}: {delay:?}"
            );
        }
    }
}
