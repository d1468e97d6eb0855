//! Publishes the retained device state topic on change, throttled.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::media::pipeline::PipelineStats;
use crate::mqtt::MqttHandle;
use crate::protocol::PROTOCOL_VERSION;

/// `<prefix>/<device>/state` payload (docs/protocol.md §3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceState {
    pub v: u32,
    pub viewers: u32,
    pub max_viewers: u32,
    pub capturing: bool,
    pub source: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub bitrate: u32,
    pub frames_encoded: u64,
    pub frames_dropped: u64,
    pub bytes_copied_per_frame: u64,
    /// Last known control values (filled once controls were listed or set).
    pub controls: std::collections::BTreeMap<String, i64>,
    pub uptime_s: u64,
}

/// Static facts the state carries.
#[derive(Debug, Clone)]
pub struct StateInfo {
    pub max_viewers: u32,
    pub source: String,
}

/// Reads the live counters into a state message.
pub fn snapshot(stats: &PipelineStats, info: &StateInfo, uptime: Duration) -> DeviceState {
    DeviceState {
        v: PROTOCOL_VERSION,
        viewers: stats.viewers.load(Ordering::Relaxed),
        max_viewers: info.max_viewers,
        capturing: stats.capturing.load(Ordering::Relaxed),
        source: info.source.clone(),
        width: stats.width.load(Ordering::Relaxed),
        height: stats.height.load(Ordering::Relaxed),
        fps: stats.fps.load(Ordering::Relaxed),
        bitrate: stats.bitrate.load(Ordering::Relaxed),
        frames_encoded: stats.frames_encoded.load(Ordering::Relaxed),
        frames_dropped: stats.frames_dropped.load(Ordering::Relaxed),
        bytes_copied_per_frame: stats.bytes_copied_last.load(Ordering::Relaxed),
        controls: stats.control_values(),
        uptime_s: uptime.as_secs(),
    }
}

/// Publishes whenever something but the uptime changed, at most once per `min_interval`,
/// and again after every MQTT reconnect (a broker restart loses retained messages).
pub async fn run_state_publisher(
    stats: Arc<PipelineStats>,
    info: StateInfo,
    mqtt: MqttHandle,
    min_interval: Duration,
    mut connected: watch::Receiver<u64>,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let poll = min_interval.max(Duration::from_millis(100));
    let mut last: Option<DeviceState> = None;
    let mut last_generation = u64::MAX;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(poll) => {}
            changed = connected.changed() => {
                if changed.is_err() { break; }
                last = None; // force a republish
            }
        }
        if *connected.borrow() == 0 {
            continue;
        }
        let mut state = snapshot(&stats, &info, started.elapsed());
        let generation = stats.generation.load(Ordering::Relaxed);
        let same = last.as_ref().is_some_and(|l| {
            state.uptime_s = l.uptime_s;
            *l == state
        }) && generation == last_generation;
        if same {
            continue;
        }
        state.uptime_s = started.elapsed().as_secs();
        // Plain struct of numbers and strings: serialization cannot fail.
        let payload = serde_json::to_vec(&state).expect("state serializes");
        mqtt.publish(mqtt.topics().state(), payload, true);
        last = Some(state);
        last_generation = generation;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_counters() {
        let stats = PipelineStats::default();
        stats.viewers.store(2, Ordering::Relaxed);
        stats.capturing.store(true, Ordering::Relaxed);
        stats.frames_encoded.store(42, Ordering::Relaxed);
        let s = snapshot(
            &stats,
            &StateInfo {
                max_viewers: 4,
                source: "test-pattern".into(),
            },
            Duration::from_secs(9),
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["viewers"], 2);
        assert_eq!(v["capturing"], true);
        assert_eq!(v["frames_encoded"], 42);
        assert_eq!(v["max_viewers"], 4);
        assert_eq!(v["uptime_s"], 9);
        assert_eq!(v["v"], 1);
    }
}
