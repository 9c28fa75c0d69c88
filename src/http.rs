//! The operator's HTTP endpoint (`--http-listen`):
//!
//! - `GET /metrics`: every metric of [`crate::metrics`], in Prometheus' text format.
//! - `GET /healthz`: 200 while the process serves requests at all (liveness).
//! - `GET /readyz`: 200 when [`Health`] says ready, else 503; both with a JSON body
//!   `{"ready": bool, "reasons": [...]}`.
//!
//! It serves nothing else and takes no input, so it is safe to expose to a scraper; it binds
//! to loopback by default.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::health::Health;

/// Refreshes gauges read from live state (listener, pending ids) right before a scrape.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    refresh: Refresh,
}

/// Binds the address, so a taken port fails the start rather than a background task.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `cancel`.
pub fn spawn(
    listener: TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    refresh: Refresh,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    let state = AppState {
        metrics,
        health,
        refresh,
    };
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    let addr = listener.local_addr().ok();
    tokio::spawn(async move {
        info!(?addr, "serving /metrics, /healthz and /readyz");
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(error) = served {
            warn!(%error, "the HTTP endpoint stopped");
        }
    })
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (state.refresh)();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let readiness = state.health.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness))
}
