//! What the capture thread reports: a `PipelineStatus` value behind a watch, and private hot counters.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::source::{CaptureParams, SourceInfo};

/// The capture thread's state as everyone else sees it. Only the capture thread writes it
/// (through a `tokio::sync::watch`), so readers never see half an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PipelineStatus {
    /// Frames are being captured and encoded for viewers or a snapshot (not while the camera
    /// is only opened briefly to read its controls).
    pub capturing: bool,
    /// Viewers receiving frames.
    pub viewers: u32,
    /// What capture is set to (or, once running, what the source delivers).
    pub params: CaptureParams,
    /// `encoder.bitrate` (set by `set-bitrate`): the encoder's rate, or with the rate policy on
    /// its ceiling, bits per second.
    pub bitrate: u32,
    /// The encoder's target now, bits per second.
    pub encoder_bitrate: u32,
    /// What the open (or last opened) source delivers: format, size, stride.
    pub source: Option<SourceInfo>,
    /// Last known control values.
    pub controls: BTreeMap<String, i64>,
    /// Why the camera could not be opened or failed last; cleared once frames flow again.
    pub camera_error: Option<String>,
    /// The H.264 encoder in use (once capture ran).
    pub encoder: Option<super::video_encoder::EncoderStatus>,
    /// The H.264 stream viewers get (profile and level, from its SPS once it flowed; until
    /// then what the encoder will make). None while the camera's own H.264 has not been read.
    pub h264: Option<crate::protocol::sdp::SentStream>,
}

/// Counters the capture thread bumps every frame. Private atomics: readers take a
/// [`CounterSnapshot`].
#[derive(Debug, Default)]
pub(crate) struct PipelineCounters {
    frames_encoded: AtomicU64,
    frames_dropped: AtomicU64,
    bytes_copied_last: AtomicU64,
    source_errors: AtomicU64,
    frames_corrupt: AtomicU64,
    /// Milliseconds since `epoch` when the capture thread last made progress (a frame, or an
    /// attempt to open the camera). The watchdog reads it.
    last_progress_ms: AtomicU64,
    /// True while the capture thread waits for work with the camera closed (idle by design).
    idle: AtomicBool,
    epoch: OnceLock<Instant>,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CounterSnapshot {
    /// Frames the encoder produced (skipped pictures not counted), since the start.
    pub frames_encoded: u64,
    /// Frames not delivered to some viewer (full queue, or waiting for a keyframe).
    pub frames_dropped: u64,
    /// Pixel bytes copied for the last frame before encoding (0: zero copy).
    pub bytes_copied_per_frame: u64,
    /// Camera failures (open or capture) since the start.
    pub source_errors: u64,
    /// Camera frames that could not be used: flagged as errors by the driver, corrupt or
    /// truncated, or (passthrough) referring to a frame the driver lost.
    pub frames_corrupt: u64,
}

impl PipelineCounters {
    fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    pub(super) fn progressed(&self) {
        self.last_progress_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    pub(super) fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Relaxed);
    }

    pub(super) fn frame_encoded(&self, bytes_copied: u64) {
        self.frames_encoded.fetch_add(1, Ordering::Relaxed);
        self.bytes_copied_last
            .store(bytes_copied, Ordering::Relaxed);
        self.progressed();
    }

    pub(super) fn frames_dropped(&self, n: u64) {
        if n > 0 {
            self.frames_dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(super) fn source_error(&self) {
        self.source_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn frame_corrupt(&self) {
        self.frames_corrupt.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            frames_encoded: self.frames_encoded.load(Ordering::Relaxed),
            frames_dropped: self.frames_dropped.load(Ordering::Relaxed),
            bytes_copied_per_frame: self.bytes_copied_last.load(Ordering::Relaxed),
            source_errors: self.source_errors.load(Ordering::Relaxed),
            frames_corrupt: self.frames_corrupt.load(Ordering::Relaxed),
        }
    }

    /// The watchdog's question: is the capture thread alive? Yes while it is idle by design
    /// (camera closed, waiting for a viewer) or made progress (a frame, a retry of the camera)
    /// within `window`; no when it is stuck, e.g. in a driver call that never returns.
    pub fn capture_is_healthy(&self, window: Duration) -> bool {
        self.idle.load(Ordering::Relaxed)
            || self
                .now_ms()
                .saturating_sub(self.last_progress_ms.load(Ordering::Relaxed))
                <= window.as_millis() as u64
    }

    #[cfg(test)]
    pub(super) fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }
}
