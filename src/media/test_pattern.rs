//! The test-pattern source: synthetic frames paced at the configured rate, stamped with frame number and time.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use super::controls::{ControlError, ControlInfo, ControlKind};
use super::frame::{I420Buffer, I420View};
use super::pattern::{self, PatternGenerator};
use super::source::{CapturedFrame, FrameSource, SourceError, SourceInfo, unix_ms};

/// Synthetic frames paced at the configured rate, stamped with frame number and time.
pub(crate) struct TestPattern {
    generator: PatternGenerator,
    buffer: I420Buffer,
    info: SourceInfo,
    seq: u64,
    next_due: Option<Instant>,
    paced: bool,
    /// Luma offset of the picture below the stamp rows; shared so it outlives reopening.
    brightness: Arc<AtomicI64>,
    /// Fresh noise in the bottom band of every frame (`capture.test_pattern_noise`).
    noise: bool,
}

impl TestPattern {
    /// `paced = false` produces frames as fast as asked (benchmarks).
    pub fn new(width: u32, height: u32, fps: u32, paced: bool) -> Self {
        Self {
            generator: PatternGenerator::new(width as usize, height as usize),
            buffer: I420Buffer::default(),
            info: SourceInfo {
                width,
                height,
                fps,
                pixel_format: "test-pattern".into(),
                stride: width,
            },
            seq: 0,
            next_due: None,
            paced,
            brightness: Arc::default(),
            noise: false,
        }
    }

    /// Adds a band of fresh noise under the box to every frame, so the stream needs all the
    /// bitrate it is given (docs/protocol.md §5.1).
    pub fn with_noise(mut self, noise: bool) -> Self {
        self.noise = noise;
        self
    }

    /// Uses (and keeps) this brightness setting across reopenings.
    pub fn with_brightness(mut self, brightness: Arc<AtomicI64>) -> Self {
        self.brightness = brightness;
        self
    }

    fn brightness_info(&self) -> ControlInfo {
        ControlInfo {
            name: "brightness".into(),
            kind: ControlKind::Integer,
            min: -64,
            max: 64,
            step: 1,
            default: 0,
            value: self.brightness.load(Ordering::Relaxed),
            menu: Vec::new(),
        }
    }

    /// Sleeps until the next frame is due, keeping the cadence.
    fn pace(&mut self) {
        let period = Duration::from_secs(1) / self.info.fps.max(1);
        let now = Instant::now();
        let due = self.next_due.unwrap_or(now);
        if due > now {
            std::thread::sleep(due - now);
        }
        // After a long stall, restart the cadence rather than bursting to catch up.
        let next = due + period;
        let now = Instant::now();
        self.next_due = Some(if next < now { now } else { next });
    }
}

impl FrameSource for TestPattern {
    fn info(&self) -> SourceInfo {
        self.info.clone()
    }

    fn next_frame(
        &mut self,
        consume: &mut dyn FnMut(&I420View<'_>, CapturedFrame),
    ) -> Result<(), SourceError> {
        if self.paced {
            self.pace();
        }
        let captured_at = Instant::now();
        self.generator
            .render(self.seq as u32, unix_ms() as u32, &mut self.buffer);
        let offset = self.brightness.load(Ordering::Relaxed);
        if offset != 0 {
            // Below the two stamp rows only, so the frame number stays readable.
            let (w, b) = (self.buffer.width, pattern::cell_size(self.buffer.width));
            let (y, _, _) = self.buffer.planes_mut();
            for p in &mut y[2 * b * w..] {
                *p = (i64::from(*p) + offset).clamp(16, 235) as u8;
            }
        }
        if self.noise {
            let (w, h) = (self.buffer.width, self.buffer.height);
            let rows = pattern::noise_rows(w, h);
            let (y, _, _) = self.buffer.planes_mut();
            pattern::fill_noise(&mut y[rows.start * w..rows.end * w], self.seq);
        }
        consume(
            &self.buffer.view(),
            CapturedFrame {
                seq: self.seq,
                captured_at,
                bytes_copied: 0,
                dmabuf: None,
            },
        );
        self.seq += 1;
        Ok(())
    }

    fn controls(&mut self) -> Result<Vec<ControlInfo>, ControlError> {
        Ok(vec![self.brightness_info()])
    }

    fn set_control(&mut self, info: &ControlInfo, value: i64) -> Result<i64, ControlError> {
        if info.name != "brightness" {
            return Err(ControlError::Unknown(info.name.clone()));
        }
        self.brightness.store(value, Ordering::Relaxed);
        Ok(value)
    }
}
