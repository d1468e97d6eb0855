//! The device state (docs/protocol.md §3.2): built from the capture and session owners, published retained on change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::media::pipeline::PipelineHandle;
use crate::outbound::Publish;
use crate::protocol::PROTOCOL_VERSION;

/// `<prefix>/<device>/state` payload (docs/protocol.md §3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct DeviceState {
    pub v: u32,
    /// Sessions whose peer connection is connected: viewers receiving video.
    pub viewers: u32,
    pub max_viewers: u32,
    /// Sessions between their offer and `connected` (not counted in `viewers`).
    pub connecting: u32,
    pub capturing: bool,
    pub source: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// `encoder.bitrate`: the ceiling of the encoder's target (`set-bitrate`).
    pub bitrate: u32,
    /// The encoder's target now (below `bitrate` when the viewers' links need it).
    pub encoder_bitrate: u32,
    pub frames_encoded: u64,
    pub frames_dropped: u64,
    pub bytes_copied_per_frame: u64,
    /// Camera frames that could not be used (flagged by the driver, corrupt, truncated, or
    /// in passthrough referring to a frame the driver lost), since the start.
    pub frames_corrupt: u64,
    /// Last known control values (filled once controls were listed or set).
    pub controls: BTreeMap<String, i64>,
    /// Why the camera cannot be used right now; `null` while it works (or was not needed yet).
    pub camera_error: Option<String>,
    /// The H.264 encoder (backend, device, input, why, fallback); `null` until capture ran.
    pub encoder: Option<crate::media::video_encoder::EncoderStatus>,
    /// Each streaming viewer's link, by anonymized session id (with `webrtc.adaptation`).
    pub links: Vec<ViewerLink>,
    /// The stream's H.264 profile and level as an SDP `profile-level-id` (e.g. `42c01f`);
    /// `null` while the camera's own H.264 has not been read yet.
    pub profile_level_id: Option<String>,
    /// Of `viewers`, those connected over WHEP (docs/whep.md).
    pub whep_viewers: u32,
    /// The WHEP endpoint's URL (`whep.public_url`), `null` when WHEP is off or the URL is not
    /// known.
    pub whep_url: Option<String>,
    pub uptime_s: u64,
}

/// One viewer's link as the state shows it (docs/protocol.md §3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ViewerLink {
    /// The session id, anonymized: a keyed hash that is stable while the device runs and
    /// says nothing about the session's topic.
    pub viewer: String,
    /// Bandwidth estimate, bits per second.
    pub estimate_bps: u32,
    /// Where the estimate comes from: "twcc", "remb" or "loss" (receiver reports only).
    pub feedback: &'static str,
    /// Highest temporal layer this viewer is sent, of `layers` (0-based).
    pub layer: u8,
    pub layers: u8,
    /// Frames sent to this viewer over the last second.
    pub fps: u32,
    pub rtt_ms: Option<u32>,
    /// Recent loss the viewer reported, per mille.
    pub loss_permille: Option<u32>,
    pub retransmitted: u64,
    /// Retransmissions not sent: too late to help or over the viewer's budget.
    pub retransmissions_dropped: u64,
    /// Keyframe requests (PLI/FIR) not passed to the encoder because this viewer could not
    /// keep up or asked too often.
    pub keyframe_requests_ignored: u64,
}

/// The viewers' links, written by their sessions and read by the state: a cheap handle.
#[derive(Clone)]
pub(crate) struct LinkBoard {
    links: Arc<watch::Sender<BTreeMap<u64, ViewerLink>>>,
}

impl Default for LinkBoard {
    fn default() -> Self {
        Self {
            links: Arc::new(watch::channel(BTreeMap::new()).0),
        }
    }
}

impl LinkBoard {
    /// Sets (or replaces) the entry of session `key`.
    pub fn set(&self, key: u64, link: ViewerLink) {
        self.links
            .send_if_modified(|m| m.insert(key, link.clone()).as_ref() != Some(&link));
    }

    pub fn remove(&self, key: u64) {
        self.links.send_if_modified(|m| m.remove(&key).is_some());
    }

    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<u64, ViewerLink>> {
        self.links.subscribe()
    }
}

/// How many sessions are in each phase (the session registry publishes it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SessionCounts {
    pub connected: u32,
    pub pending: u32,
    /// Ending: their resources are being freed.
    pub closing: u32,
    /// Of `connected`, the sessions opened over WHEP (docs/whep.md).
    pub whep: u32,
}

/// Static facts the state carries.
#[derive(Debug, Clone)]
pub(crate) struct StateInfo {
    pub max_viewers: u32,
    pub source: String,
    pub whep_url: Option<String>,
}

/// Reads the current state from its owners; cheap to clone.
#[derive(Clone)]
pub(crate) struct StateReader {
    pipeline: PipelineHandle,
    sessions: watch::Receiver<SessionCounts>,
    links: watch::Receiver<BTreeMap<u64, ViewerLink>>,
    info: Arc<StateInfo>,
    started: Instant,
}

impl StateReader {
    pub fn new(
        pipeline: PipelineHandle,
        sessions: watch::Receiver<SessionCounts>,
        links: &LinkBoard,
        info: StateInfo,
    ) -> Self {
        Self {
            pipeline,
            sessions,
            links: links.subscribe(),
            info: Arc::new(info),
            started: Instant::now(),
        }
    }

    pub fn current(&self) -> DeviceState {
        let status = self.pipeline.status().borrow().clone();
        let counters = self.pipeline.counters();
        let sessions = *self.sessions.borrow();
        DeviceState {
            v: PROTOCOL_VERSION,
            viewers: sessions.connected,
            max_viewers: self.info.max_viewers,
            connecting: sessions.pending,
            capturing: status.capturing,
            source: self.info.source.clone(),
            width: status.params.width,
            height: status.params.height,
            fps: status.params.fps,
            bitrate: status.bitrate,
            encoder_bitrate: status.encoder_bitrate,
            frames_encoded: counters.frames_encoded,
            frames_dropped: counters.frames_dropped,
            bytes_copied_per_frame: counters.bytes_copied_per_frame,
            frames_corrupt: counters.frames_corrupt,
            controls: status.controls,
            camera_error: status.camera_error,
            encoder: status.encoder,
            links: self.links.borrow().values().cloned().collect(),
            profile_level_id: status.h264.map(|h| h.profile_level_id()),
            whep_viewers: sessions.whep,
            whep_url: self.info.whep_url.clone(),
            uptime_s: self.started.elapsed().as_secs(),
        }
    }
}

/// True when two states differ in more than their uptime.
fn differs(a: &DeviceState, b: &DeviceState) -> bool {
    DeviceState {
        uptime_s: 0,
        ..a.clone()
    } != DeviceState {
        uptime_s: 0,
        ..b.clone()
    }
}

/// Publishes the retained state whenever something but the uptime changed, at most once per
/// `min_interval`, and again after every MQTT (re)connect (a broker restart loses retained
/// messages). Runs until `cancel`.
pub(crate) async fn run_state_publisher(
    reader: StateReader,
    publish: Arc<dyn Publish>,
    topic: String,
    min_interval: Duration,
    mut connected: watch::Receiver<u64>,
    cancel: CancellationToken,
) {
    let mut status = reader.pipeline.status();
    let mut sessions = reader.sessions.clone();
    // Counters change every frame; they are looked at on this tick.
    let mut tick = tokio::time::interval(min_interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<DeviceState> = None;
    let mut last_sent = tokio::time::Instant::now() - min_interval;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
            r = status.changed() => if r.is_err() { break },
            r = sessions.changed() => if r.is_err() { break },
            r = connected.changed() => {
                if r.is_err() { break }
                last = None; // force a republish
            }
        }
        if *connected.borrow() == 0 {
            continue;
        }
        let state = reader.current();
        if last.as_ref().is_some_and(|l| !differs(l, &state)) {
            continue;
        }
        // Throttle: wait out the rest of the interval, then publish what is current then.
        let next_allowed = last_sent + min_interval;
        if tokio::time::Instant::now() < next_allowed {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(next_allowed) => {}
            }
        }
        let state = reader.current();
        // Plain struct of numbers, strings and a string map: serialization cannot fail.
        let payload = serde_json::to_vec(&state).expect("state serializes");
        if publish.publish(topic.clone(), payload, true).is_ok() {
            last = Some(state);
            last_sent = tokio::time::Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> DeviceState {
        DeviceState {
            v: 1,
            viewers: 2,
            max_viewers: 4,
            connecting: 1,
            capturing: true,
            source: "test-pattern".into(),
            width: 640,
            height: 480,
            fps: 30,
            bitrate: 1_000_000,
            encoder_bitrate: 800_000,
            frames_encoded: 42,
            frames_dropped: 0,
            bytes_copied_per_frame: 0,
            frames_corrupt: 0,
            controls: BTreeMap::from([("brightness".to_string(), 3)]),
            camera_error: None,
            encoder: None,
            links: vec![ViewerLink {
                viewer: "9f3a61c2".into(),
                estimate_bps: 940_000,
                feedback: "twcc",
                layer: 1,
                layers: 3,
                fps: 15,
                rtt_ms: Some(41),
                loss_permille: Some(3),
                retransmitted: 12,
                retransmissions_dropped: 0,
                keyframe_requests_ignored: 1,
            }],
            profile_level_id: Some("42c01f".into()),
            whep_viewers: 0,
            whep_url: None,
            uptime_s: 9,
        }
    }

    #[test]
    fn state_json_has_every_documented_field() {
        let v = serde_json::to_value(state()).unwrap();
        for key in [
            "v",
            "viewers",
            "max_viewers",
            "connecting",
            "capturing",
            "source",
            "width",
            "height",
            "fps",
            "bitrate",
            "encoder_bitrate",
            "frames_encoded",
            "frames_dropped",
            "bytes_copied_per_frame",
            "frames_corrupt",
            "controls",
            "camera_error",
            "encoder",
            "links",
            "whep_viewers",
            "whep_url",
            "profile_level_id",
            "uptime_s",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert_eq!(v["camera_error"], serde_json::Value::Null);
        assert_eq!(v["controls"]["brightness"], 3);
        assert_eq!(v["profile_level_id"], "42c01f");
        assert_eq!(v.as_object().unwrap().len(), 23, "no undocumented fields");
        let link = &v["links"][0];
        for key in [
            "viewer",
            "estimate_bps",
            "feedback",
            "layer",
            "layers",
            "fps",
            "rtt_ms",
            "loss_permille",
            "retransmitted",
            "retransmissions_dropped",
            "keyframe_requests_ignored",
        ] {
            assert!(link.get(key).is_some(), "links[].{key}");
        }
        assert_eq!(
            link.as_object().unwrap().len(),
            11,
            "no undocumented link fields"
        );
    }

    #[test]
    fn only_uptime_changes_are_not_changes() {
        let a = state();
        let b = DeviceState {
            uptime_s: 99,
            ..a.clone()
        };
        assert!(!differs(&a, &b));
        let c = DeviceState {
            viewers: 3,
            ..a.clone()
        };
        assert!(differs(&a, &c));
        let d = DeviceState {
            camera_error: Some("gone".into()),
            ..a.clone()
        };
        assert!(differs(&a, &d));
    }
}
