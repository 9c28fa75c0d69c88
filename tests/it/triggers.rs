//! The triggers on milo's tables: every status change, and every insert, notifies exactly
//! once with `<id>:<status>`; heartbeat writes and same-status updates notify nothing; the
//! time a row entered its status is recorded in UTC whatever the session's TimeZone.
//!
//! "Nothing else was sent" is proven without waiting: after the writes under test, the
//! writer sends a fence notification, and since notifications of different transactions
//! arrive in commit order, whatever arrived before the fence is all the writes produced.

use futures::StreamExt;
use milo_workers::listener::{BOTS_CHANNEL, SLOTS_CHANNEL};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::common::{self, TestDb, EVENTUALLY};

const FENCE_CHANNEL: &str = "mw_test_fence";

/// A plain connection listening on both channels and the fence channel.
struct Listener {
    _client: Client,
    received: mpsc::UnboundedReceiver<(String, String)>,
}

impl Listener {
    async fn new(db: &TestDb) -> Self {
        let config: tokio_postgres::Config = db.url.parse().expect("valid url");
        let (client, mut connection) = config.connect(NoTls).await.expect("connect");
        let (sender, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message.expect("listening connection") {
                    AsyncMessage::Notification(n) => {
                        let _ = sender.send((n.channel().to_owned(), n.payload().to_owned()));
                    }
                    _ => continue,
                }
            }
        });
        for channel in [SLOTS_CHANNEL, BOTS_CHANNEL, FENCE_CHANNEL] {
            client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .expect("listen");
        }
        Self {
            _client: client,
            received,
        }
    }

    /// Everything that was notified before a fence the `writer` sends now.
    async fn until_fence(&mut self, writer: &Client) -> Vec<(String, String)> {
        let token = rand::random::<u64>().to_string();
        writer
            .execute("SELECT pg_notify($1, $2)", &[&FENCE_CHANNEL, &token])
            .await
            .expect("fence");
        let mut before = Vec::new();
        loop {
            let next = tokio::time::timeout(EVENTUALLY, self.received.recv()).await;
            let (channel, payload) = next.expect("the fence arrives").expect("the listener runs");
            if channel == FENCE_CHANNEL && payload == token {
                return before;
            }
            before.push((channel, payload));
        }
    }
}

fn note(channel: &str, id: i32, status: &str) -> (String, String) {
    (channel.to_owned(), format!("{id}:{status}"))
}

#[tokio::test]
async fn inserts_notify_once_with_id_and_status() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let mut listener = Listener::new(&db).await;

    let bot = common::insert_bot(&milo, "DEPLOYING", None).await;
    let slot = common::insert_slot(&milo, "s1", "deploying", Some(bot), 0.0).await;

    assert_eq!(
        listener.until_fence(&milo).await,
        [
            note(BOTS_CHANNEL, bot, "DEPLOYING"),
            note(SLOTS_CHANNEL, slot, "deploying")
        ]
    );
}

#[tokio::test]
async fn a_status_change_notifies_exactly_once_per_row() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let first = common::insert_slot(&milo, "s1", "busy", Some(bot), 0.0).await;
    let second = common::insert_slot(&milo, "s2", "idle", None, 0.0).await;
    let mut listener = Listener::new(&db).await;

    milo.execute("UPDATE bots SET status = 'DONE' WHERE id = $1", &[&bot])
        .await
        .unwrap();
    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id IN ($1, $2)",
        &[&first, &second],
    )
    .await
    .unwrap();

    let mut received = listener.until_fence(&milo).await;
    received.sort();
    let mut expected = vec![
        note(BOTS_CHANNEL, bot, "DONE"),
        note(SLOTS_CHANNEL, first, "error"),
        note(SLOTS_CHANNEL, second, "error"),
    ];
    expected.sort();
    assert_eq!(received, expected);
}

#[tokio::test]
async fn heartbeats_and_updates_that_keep_the_status_notify_nothing() {
    let db = TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(30.0)).await;
    let slot = common::insert_slot(&milo, "s1", "busy", Some(bot), 0.0).await;
    let mut listener = Listener::new(&db).await;

    for _ in 0..3 {
        milo.execute(
            "UPDATE bots SET last_heartbeat = timezone('UTC', now()) WHERE id = $1",
            &[&bot],
        )
        .await
        .unwrap();
    }
    milo.execute("UPDATE bots SET status = 'IN_CALL' WHERE id = $1", &[&bot])
        .await
        .unwrap();
    milo.execute(
        "UPDATE bot_pool_slots SET status = 'busy', last_used_at = timezone('UTC', now())
         WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();
    // Writes to other columns do not fire the trigger either.
    milo.execute(
        "UPDATE bot_pool_slots SET error_message = 'x', recovery_attempts = 1 WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();

    assert_eq!(listener.until_fence(&milo).await, []);
}

#[tokio::test]
async fn the_time_a_bot_entered_its_status_is_recorded_and_moves_only_with_the_status() {
    let db = TestDb::new().await;
    let mut milo = db.client().await;

    let tx = milo.transaction().await.unwrap();
    let bot: i32 = tx
        .query_one(
            "INSERT INTO bots (status) VALUES ('JOINING_CALL') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let recorded = tx
        .query_one(
            "SELECT status, since = timezone('UTC', now())
             FROM milo_workers.bot_status_since WHERE bot_id = $1",
            &[&bot],
        )
        .await
        .unwrap();
    assert_eq!(recorded.get::<_, String>(0), "JOINING_CALL");
    assert!(
        recorded.get::<_, bool>(1),
        "since is the inserting transaction's UTC time"
    );
    tx.commit().await.unwrap();

    // Moved into the past, it stays there through heartbeats and same-status writes.
    milo.execute(
        "UPDATE milo_workers.bot_status_since SET since = since - interval '1 hour'
         WHERE bot_id = $1",
        &[&bot],
    )
    .await
    .unwrap();
    milo.execute(
        "UPDATE bots SET last_heartbeat = timezone('UTC', now()), status = 'JOINING_CALL'
         WHERE id = $1",
        &[&bot],
    )
    .await
    .unwrap();
    let kept: bool = milo
        .query_one(
            "SELECT since < timezone('UTC', now()) - interval '59 minutes'
             FROM milo_workers.bot_status_since WHERE bot_id = $1",
            &[&bot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        kept,
        "a write that keeps the status does not restart the clock"
    );

    let tx = milo.transaction().await.unwrap();
    tx.execute("UPDATE bots SET status = 'IN_CALL' WHERE id = $1", &[&bot])
        .await
        .unwrap();
    let moved = tx
        .query_one(
            "SELECT status, since = timezone('UTC', now())
             FROM milo_workers.bot_status_since WHERE bot_id = $1",
            &[&bot],
        )
        .await
        .unwrap();
    assert_eq!(moved.get::<_, String>(0), "IN_CALL");
    assert!(moved.get::<_, bool>(1), "a new status restarts the clock");
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn the_triggers_record_utc_and_notify_whatever_the_session_time_zone() {
    let db = TestDb::new().await;
    let mut milo = db.client().await;
    let mut listener = Listener::new(&db).await;

    for zone in ["America/New_York", "Asia/Tokyo"] {
        milo.batch_execute(&format!("SET TIME ZONE '{zone}'"))
            .await
            .unwrap();
        let tx = milo.transaction().await.unwrap();
        let local_differs: bool = tx
            .query_one("SELECT localtimestamp <> timezone('UTC', now())", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            local_differs,
            "{zone} is not UTC, so the test means something"
        );

        let bot: i32 = tx
            .query_one(
                "INSERT INTO bots (status) VALUES ('IN_CALL') RETURNING id",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        tx.execute("UPDATE bots SET status = 'LEAVING' WHERE id = $1", &[&bot])
            .await
            .unwrap();
        let utc: bool = tx
            .query_one(
                "SELECT since = timezone('UTC', now())
                 FROM milo_workers.bot_status_since WHERE bot_id = $1",
                &[&bot],
            )
            .await
            .unwrap()
            .get(0);
        assert!(utc, "in {zone}, since is UTC wall-clock time");
        tx.commit().await.unwrap();

        assert_eq!(
            listener.until_fence(&milo).await,
            [
                note(BOTS_CHANNEL, bot, "IN_CALL"),
                note(BOTS_CHANNEL, bot, "LEAVING")
            ]
        );
    }
}
