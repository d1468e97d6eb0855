//! systemd integration: READY=1 once up, STOPPING=1 on shutdown, watchdog pings while healthy.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Tells systemd the service is ready (no-op outside systemd).
pub fn notify_ready() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// A one-line status shown by `systemctl status` (what rtcam is waiting for).
pub fn notify_status(status: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(status)]);
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Pings the watchdog at half its period while `healthy()` holds; a stuck capture thread
/// makes `healthy()` false, the pings stop, and systemd restarts the service.
pub async fn run_watchdog(healthy: impl Fn() -> bool, cancel: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let interval = period / 2;
    tracing::info!(?period, "systemd watchdog enabled");
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(interval.max(Duration::from_millis(100))) => {}
        }
        if healthy() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::error!("capture looks stuck; withholding the watchdog ping");
        }
    }
}
