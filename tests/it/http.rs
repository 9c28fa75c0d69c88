//! The HTTP endpoint of a running daemon: `/metrics` shows every metric after some work,
//! `/healthz` answers, and `/readyz` turns 503 (saying why) while the listener is cut off and
//! 200 again once it has resubscribed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use milo_workers::daemon::{self, Options};
use milo_workers::metrics;
use milo_workers::platform::SimulatedPlatform;

use crate::common::{self, eventually};

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test]
async fn metrics_health_and_readiness_are_served() {
    let db = common::TestDb::new().await;
    let milo = db.client().await;
    let bot = common::insert_bot(&milo, "IN_CALL", Some(1.0)).await;
    let slot = common::insert_slot(&milo, "s1", "busy", Some(bot), 60.0).await;

    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let mut settings = common::settings();
    settings.sweep_on_start = true;
    let mut options = Options::new(&db.url, settings, Arc::new(platform));
    options.migrate = false;
    options.http_listen = Some("127.0.0.1:0".parse().unwrap());
    // A slow reconnect keeps the listener away long enough to see /readyz say so.
    options.listener.backoff_first = Duration::from_secs(3);
    options.listener.backoff_max = Duration::from_secs(3);
    let daemon = daemon::start(options).await.expect("daemon starts");
    let addr = daemon.http_addr().expect("http is on");

    assert_eq!(get(addr, "/healthz").await.0, 200);
    eventually("/readyz says ready after the first sweeps", || async {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    let (_, body) = get(addr, "/readyz").await;
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["ready"], true);

    milo.execute(
        "UPDATE bot_pool_slots SET status = 'error' WHERE id = $1",
        &[&slot],
    )
    .await
    .unwrap();
    eventually("the slot is recovered", || async {
        common::slot_status(&milo, slot).await.as_deref() == Some("idle")
    })
    .await;

    // Everything shows up: counted as it happens, or sampled at start and at each scrape.
    eventually("/metrics lists every metric", || async {
        let (status, text) = get(addr, "/metrics").await;
        status == 200
            && metrics::ALL
                .iter()
                .filter(|name| **name != metrics::PLATFORM_CALL_ERRORS)
                .all(|name| text.contains(name))
    })
    .await;
    let (_, text) = get(addr, "/metrics").await;
    assert!(text.contains("action=\"slot_recovered\""), "{text}");
    assert!(text.contains("milo_workers_listener_connected 1"), "{text}");

    // Cut the listener off: not ready, and the body says why; back to ready once it is back.
    let cut = milo
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'milo-workers-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(cut, 1);
    eventually("/readyz says the listener is down", || async {
        let (status, body) = get(addr, "/readyz").await;
        status == 503 && body.contains("listener is not connected")
    })
    .await;
    eventually("/readyz is ready again", || async {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    assert!(daemon.readiness().ready);
    assert!(daemon.stop().await);
}

#[tokio::test]
async fn a_taken_port_fails_the_start() {
    let db = common::TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let platform = SimulatedPlatform::new(Duration::ZERO, 0.0);
    let mut options = Options::new(&db.url, common::settings(), Arc::new(platform));
    options.migrate = false;
    options.http_listen = Some(taken.local_addr().unwrap());
    let error = daemon::start(options).await.err().expect("start fails");
    assert!(
        error.to_string().contains("could not listen for HTTP"),
        "{error}"
    );
}
