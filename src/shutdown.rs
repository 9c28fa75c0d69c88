//! The stop signal: SIGTERM or Ctrl-C asks for a graceful stop; a second one ends the
//! process at once.

use tracing::{error, warn};

/// Resolves on the first SIGTERM or Ctrl-C, and arranges for the second to exit immediately.
pub async fn signal() {
    wait_for_one().await;
    warn!("stop requested; send the signal again to stop at once");
    tokio::spawn(async {
        wait_for_one().await;
        error!("second stop signal; exiting without waiting");
        std::process::exit(130);
    });
}

#[cfg(unix)]
async fn wait_for_one() {
    use tokio::signal::unix::{signal, SignalKind};
    // Installing a handler only fails when signals are unavailable at all; fall back to Ctrl-C.
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_one() {
    let _ = tokio::signal::ctrl_c().await;
}
