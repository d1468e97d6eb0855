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
    pub bitrate: u32,
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
    /// The stream's H.264 profile and level as an SDP `profile-level-id` (e.g. `42c01f`);
    /// `null` while the camera's own H.264 has not been read yet.
    pub profile_level_id: Option<String>,
    pub uptime_s: u64,
}

/// How many sessions are in each phase (the session registry publishes it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SessionCounts {
    pub connected: u32,
    pub pending: u32,
    /// Ending: their resources are being freed.
    pub closing: u32,
}

/// Static facts the state carries.
#[derive(Debug, Clone)]
pub(crate) struct StateInfo {
    pub max_viewers: u32,
    pub source: String,
}

/// Reads the current state from its owners; cheap to clone.
#[derive(Clone)]
pub(crate) struct StateReader {
    pipeline: PipelineHandle,
    sessions: watch::Receiver<SessionCounts>,
    info: Arc<StateInfo>,
    started: Instant,
}

impl StateReader {
    pub fn new(
        pipeline: PipelineHandle,
        sessions: watch::Receiver<SessionCounts>,
        info: StateInfo,
    ) -> Self {
        Self {
            pipeline,
            sessions,
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
            frames_encoded: counters.frames_encoded,
            frames_dropped: counters.frames_dropped,
            bytes_copied_per_frame: counters.bytes_copied_per_frame,
            frames_corrupt: counters.frames_corrupt,
            controls: status.controls,
            camera_error: status.camera_error,
            encoder: status.encoder,
            profile_level_id: status.h264.map(|h| h.profile_level_id()),
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
            frames_encoded: 42,
            frames_dropped: 0,
            bytes_copied_per_frame: 0,
            frames_corrupt: 0,
            controls: BTreeMap::from([("brightness".to_string(), 3)]),
            camera_error: None,
            encoder: None,
            profile_level_id: Some("42c01f".into()),
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
            "frames_encoded",
            "frames_dropped",
            "bytes_copied_per_frame",
            "frames_corrupt",
            "controls",
            "camera_error",
            "encoder",
            "profile_level_id",
            "uptime_s",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert_eq!(v["camera_error"], serde_json::Value::Null);
        assert_eq!(v["controls"]["brightness"], 3);
        assert_eq!(v["profile_level_id"], "42c01f");
        assert_eq!(v.as_object().unwrap().len(), 19, "no undocumented fields");
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
