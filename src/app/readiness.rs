//! Readiness: probes the camera, refreshes Home Assistant discovery with its controls, then tells systemd READY=1 once MQTT is up.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::homeassistant;
use crate::media::pipeline::PipelineHandle;
use crate::outbound::Publish;
use crate::protocol::topics::Topics;
use crate::systemd;

/// What `announce_ready` watches and updates.
pub(crate) struct Readiness {
    pub pipeline: PipelineHandle,
    pub connected: watch::Receiver<u64>,
    /// "host:port (mode)" for the status line.
    pub broker: String,
    pub discovery: Option<DiscoveryUpdate>,
}

/// Home Assistant discovery to refresh once the camera's controls are known.
pub(crate) struct DiscoveryUpdate {
    pub payload: watch::Sender<Vec<u8>>,
    pub config_topic: String,
    pub topics: Topics,
    pub device: String,
    /// The WHEP endpoint has a URL to announce (a sensor shows it).
    pub whep: bool,
    pub publish: Arc<dyn Publish>,
}

/// Tells systemd READY=1 once capture works (the camera was opened, its format negotiated and
/// its controls listed, then released) and MQTT is connected; until then STATUS= says what
/// rtcam waits for. With the camera's controls known, Home Assistant discovery gains a number
/// entity per integer control.
pub(crate) async fn announce_ready(mut r: Readiness, cancel: CancellationToken) {
    const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
    let mut retry_in = Duration::from_secs(1);
    let controls = loop {
        systemd::notify_status("opening the camera");
        let why = tokio::select! {
            _ = cancel.cancelled() => return,
            probe = tokio::time::timeout(PROBE_TIMEOUT, r.pipeline.list_controls()) => match probe {
                Ok(Ok(Ok(controls))) => break controls,
                Ok(Ok(Err(e))) => e.to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer from the capture thread in {PROBE_TIMEOUT:?}"),
            },
        };
        // The capture thread logged the camera error; this says when the next try is.
        tracing::info!(retry_in = ?retry_in, "camera probe failed; trying again");
        systemd::notify_status(&format!("waiting for the camera: {why}"));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(retry_in) => {}
        }
        retry_in = (retry_in * 2).min(Duration::from_secs(30));
    };
    tracing::info!(controls = controls.len(), "camera probed");
    if let Some(d) = r.discovery {
        let payload = homeassistant::discovery_payload(&d.topics, &d.device, &controls, d.whep)
            .to_string()
            .into_bytes();
        // The dispatcher republishes the newest payload after every (re)connect; publish here
        // only when already connected.
        d.payload.send_replace(payload.clone());
        if *r.connected.borrow() > 0 {
            let _ = d.publish.publish(d.config_topic, payload, true);
        }
    }
    if *r.connected.borrow() == 0 {
        systemd::notify_status(&format!("waiting for the MQTT broker at {}", r.broker));
    }
    tokio::select! {
        _ = cancel.cancelled() => {}
        up = r.connected.wait_for(|n| *n > 0) => if up.is_ok() {
            systemd::notify_ready();
            systemd::notify_status("ready");
            tracing::info!("rtcam ready");
        }
    }
}
