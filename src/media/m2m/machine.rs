//! The stateful encoder interface's decisions as pure code: given what the device reported and `now`, what to do next (no ioctls, no clocks).
//!
//! States follow the kernel's "Memory-to-Memory Stateful Video Encoder Interface": nothing
//! configured (Initialization), Encoding, Drain (after V4L2_ENC_CMD_STOP until the CAPTURE
//! buffer flagged LAST), Stopped (left by a Reset of the CAPTURE queue, see
//! `FramePlan::Resume`), and Failed. A frame of a
//! new size drains the encoder, then re-runs Initialization (the CAPTURE format may not change
//! while buffers are allocated). Frames are tagged with a timestamp the driver copies from the
//! OUTPUT to the CAPTURE buffer, so encoded units are matched to the frames they came from.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long to wait, and how much to tolerate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The longest the encoder may take for one frame, a free buffer or a drain.
    pub timeout: Duration,
    /// Frames queued but not yet encoded before `encode` waits (1: one frame in, one out).
    pub max_in_flight: usize,
    /// Corrupt CAPTURE buffers (V4L2_BUF_FLAG_ERROR) in a row before the encoder counts as broken.
    pub max_consecutive_errors: u32,
    /// DMABUF input: the frame's memory belongs to the camera, so `encode` returns only once
    /// the encoder has released it (its OUTPUT buffer came back). Set by `started`.
    pub hold_input: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            max_in_flight: 1,
            max_consecutive_errors: 3,
            hold_input: false,
        }
    }
}

/// Where the encoder interface is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Initialization,
    Encoding,
    Draining,
    Stopped,
    Failed,
}

/// Why the machine gave up (the driver turns this into its error type).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Failure {
    #[error("the encoder produced nothing for {what} within {waited:?}")]
    Timeout {
        what: &'static str,
        waited: Duration,
    },
    #[error("{count} corrupt encoded frames in a row (V4L2_BUF_FLAG_ERROR)")]
    Corrupt { count: u32 },
    #[error("the encoder failed earlier: {0}")]
    Failed(String),
}

/// What to do with a frame that wants to be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FramePlan {
    /// Run the Initialization sequence for this size (tearing down what runs), then report
    /// `started` and offer the frame again.
    Initialize { width: u32, height: u32 },
    /// Frames are in flight at the old size: send V4L2_ENC_CMD_STOP and pump until done, then
    /// offer the frame again (it will be `Initialize`).
    Drain,
    /// After a completed drain at this size: restart the CAPTURE queue (the interface's
    /// Reset: VIDIOC_STREAMOFF + STREAMON on CAPTURE, its buffers queued again), report
    /// `resumed`, offer again. (Not V4L2_ENC_CMD_START: vicodec in Linux 6.1 keeps vb2's
    /// last-buffer state after it, so every later CAPTURE dequeue fails with EPIPE. The Reset
    /// works with every driver; the next frame starts a new stream, e.g. an IDR with SPS/PPS.)
    Resume,
    /// Fill OUTPUT buffer `index` (ask for a keyframe first if `keyframe`) and queue it with
    /// this timestamp; then pump until `wait_status` says done.
    Queue {
        index: u32,
        timestamp_us: i64,
        keyframe: bool,
    },
    /// No OUTPUT buffer is free: pump (wait for the device) until `deadline`, then offer again.
    WaitForBuffer { deadline: Instant },
    /// The encoder is broken.
    Fail(Failure),
}

/// What a dequeued CAPTURE buffer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CaptureOutcome {
    /// Encoded data for the frame with this timestamp: hand out `len` bytes, requeue.
    Emit {
        len: u32,
        keyframe: bool,
        timestamp_us: i64,
    },
    /// Nothing to hand out (an empty LAST buffer, a corrupt frame): requeue unless `last`.
    Skip,
    /// Too many corrupt buffers in a row.
    Fail(Failure),
}

/// What a VIDIOC_DQBUF(CAPTURE) answer of EPIPE ("the LAST buffer was already dequeued") means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EpipePlan {
    /// Expected: the encoder is drained (or draining) and holds nothing more.
    Ignore,
    /// While encoding the encoder must not be in its drained state: it is broken.
    Fail(Failure),
}

/// Whether the caller can return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WaitStatus {
    Done,
    /// Wait for the device until `deadline` (then report what came, or `tick`).
    Wait {
        deadline: Instant,
    },
    Fail(Failure),
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    timestamp_us: i64,
    queued_at: Instant,
}

/// The encoder interface's state.
#[derive(Debug)]
pub(crate) struct Machine {
    limits: Limits,
    phase: Phase,
    size: Option<(u32, u32)>,
    free_outputs: Vec<u32>,
    outputs_queued: usize,
    in_flight: VecDeque<InFlight>,
    /// When the newest frame was queued (the input-release deadline once it is encoded).
    last_queued_at: Option<Instant>,
    next_timestamp_us: i64,
    /// When the current drain (or the wait for a free buffer) gives up.
    deadline: Option<Instant>,
    /// The LAST buffer of the current drain was seen.
    last_seen: bool,
    consecutive_errors: u32,
    failure: Option<Failure>,
}

impl Machine {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            phase: Phase::Initialization,
            size: None,
            free_outputs: Vec::new(),
            outputs_queued: 0,
            in_flight: VecDeque::new(),
            last_queued_at: None,
            next_timestamp_us: 1,
            deadline: None,
            last_seen: false,
            consecutive_errors: 0,
            failure: None,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    #[cfg(test)]
    pub(crate) fn size(&self) -> Option<(u32, u32)> {
        self.size
    }

    /// Frames queued whose encoded output has not come back.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A frame of `width` x `height` wants in. `index`: DMABUF input dictates the OUTPUT
    /// buffer (the camera buffer's index); `None` lets the machine pick a free one.
    pub(crate) fn offer_frame(
        &mut self,
        width: u32,
        height: u32,
        keyframe: bool,
        index: Option<u32>,
        now: Instant,
    ) -> FramePlan {
        match self.phase {
            Phase::Failed => return FramePlan::Fail(self.failed()),
            Phase::Initialization => return FramePlan::Initialize { width, height },
            Phase::Draining => return FramePlan::Drain,
            Phase::Stopped => {
                return if self.size == Some((width, height)) {
                    FramePlan::Resume
                } else {
                    FramePlan::Initialize { width, height }
                };
            }
            Phase::Encoding => {}
        }
        if self.size != Some((width, height)) {
            // The CAPTURE format cannot change while buffers exist: drain what is in flight
            // (so no frame of the old size is lost), then initialise again.
            return if self.outputs_queued == 0 && self.in_flight.is_empty() {
                FramePlan::Initialize { width, height }
            } else {
                FramePlan::Drain
            };
        }
        let slot = match index {
            Some(i) => self.free_outputs.iter().position(|f| *f == i),
            None => self.free_outputs.len().checked_sub(1),
        };
        let Some(slot) = slot else {
            let deadline = *self.deadline.get_or_insert(now + self.limits.timeout);
            if now >= deadline {
                return FramePlan::Fail(self.fail(Failure::Timeout {
                    what: "a free input buffer",
                    waited: self.limits.timeout,
                }));
            }
            return FramePlan::WaitForBuffer { deadline };
        };
        self.deadline = None;
        let index = self.free_outputs.swap_remove(slot);
        self.outputs_queued += 1;
        let timestamp_us = self.next_timestamp_us;
        self.next_timestamp_us += 1;
        self.in_flight.push_back(InFlight {
            timestamp_us,
            queued_at: now,
        });
        self.last_queued_at = Some(now);
        FramePlan::Queue {
            index,
            timestamp_us,
            keyframe,
        }
    }

    /// The Initialization sequence finished: both queues stream at this size with
    /// `output_buffers` OUTPUT buffers (indices 0..n), all free. `hold_input`: they are
    /// imported camera buffers (see `Limits::hold_input`).
    pub(crate) fn started(
        &mut self,
        width: u32,
        height: u32,
        output_buffers: u32,
        hold_input: bool,
    ) {
        self.limits.hold_input = hold_input;
        self.phase = Phase::Encoding;
        self.size = Some((width, height));
        self.free_outputs = (0..output_buffers).rev().collect();
        self.outputs_queued = 0;
        self.in_flight.clear();
        self.deadline = None;
        self.last_seen = false;
    }

    /// The CAPTURE queue was restarted after a completed drain.
    pub(crate) fn resumed(&mut self) {
        if self.phase == Phase::Stopped {
            self.phase = Phase::Encoding;
            self.last_seen = false;
        }
    }

    /// The caller wants everything queued out (shutdown, flush, a new size). Returns whether
    /// V4L2_ENC_CMD_STOP must be sent; then pump until `wait_status` is done.
    pub(crate) fn begin_drain(&mut self, now: Instant) -> bool {
        if self.phase != Phase::Encoding {
            return false;
        }
        self.phase = Phase::Draining;
        self.last_seen = false;
        self.deadline = Some(now + self.limits.timeout);
        true
    }

    /// An OUTPUT buffer came back: the encoder is done reading it.
    pub(crate) fn output_done(&mut self, index: u32) {
        if !self.free_outputs.contains(&index) {
            self.free_outputs.push(index);
            self.outputs_queued = self.outputs_queued.saturating_sub(1);
        }
    }

    /// A CAPTURE buffer came back.
    pub(crate) fn capture_done(
        &mut self,
        bytesused: u32,
        last: bool,
        error: bool,
        keyframe: bool,
        timestamp_us: i64,
    ) -> CaptureOutcome {
        if last {
            self.last_seen = true;
            if self.phase == Phase::Draining {
                self.phase = Phase::Stopped;
                self.deadline = None;
            }
        }
        if bytesused == 0 && !error {
            // The empty LAST buffer of a drain carries no frame.
            return CaptureOutcome::Skip;
        }
        // The frame this buffer belongs to: the one with its timestamp, else the oldest
        // (drivers that do not copy timestamps).
        let frame = match self
            .in_flight
            .iter()
            .position(|f| f.timestamp_us == timestamp_us)
        {
            Some(i) => self.in_flight.remove(i),
            None => self.in_flight.pop_front(),
        };
        let timestamp_us = frame.map_or(timestamp_us, |f| f.timestamp_us);
        if error {
            self.consecutive_errors += 1;
            if self.consecutive_errors >= self.limits.max_consecutive_errors {
                let f = self.fail(Failure::Corrupt {
                    count: self.consecutive_errors,
                });
                return CaptureOutcome::Fail(f);
            }
            return CaptureOutcome::Skip;
        }
        self.consecutive_errors = 0;
        CaptureOutcome::Emit {
            len: bytesused,
            keyframe,
            timestamp_us,
        }
    }

    /// VIDIOC_DQBUF(CAPTURE) failed with EPIPE.
    pub(crate) fn capture_epipe(&mut self) -> EpipePlan {
        match self.phase {
            Phase::Encoding => EpipePlan::Fail(self.fail(Failure::Failed(
                "the CAPTURE queue reports its LAST buffer while encoding".into(),
            ))),
            _ => EpipePlan::Ignore,
        }
    }

    /// Whether the caller may return now, or must wait for the device (and until when).
    pub(crate) fn wait_status(&mut self, now: Instant) -> WaitStatus {
        match self.phase {
            Phase::Failed => WaitStatus::Fail(self.failed()),
            Phase::Initialization | Phase::Stopped => WaitStatus::Done,
            Phase::Draining => {
                let deadline = *self.deadline.get_or_insert(now + self.limits.timeout);
                if now >= deadline {
                    WaitStatus::Fail(self.fail(Failure::Timeout {
                        what: "the drain (no buffer flagged LAST)",
                        waited: self.limits.timeout,
                    }))
                } else {
                    WaitStatus::Wait { deadline }
                }
            }
            Phase::Encoding => {
                let frames_busy = self.in_flight.len() >= self.limits.max_in_flight.max(1);
                let input_busy = self.limits.hold_input && self.outputs_queued > 0;
                if !frames_busy && !input_busy {
                    return WaitStatus::Done;
                }
                let since = self
                    .in_flight
                    .front()
                    .map(|f| f.queued_at)
                    .or(self.last_queued_at)
                    .unwrap_or(now);
                let deadline = since + self.limits.timeout;
                if now >= deadline {
                    WaitStatus::Fail(self.fail(Failure::Timeout {
                        what: if frames_busy {
                            "a queued frame"
                        } else {
                            "the release of an input buffer"
                        },
                        waited: self.limits.timeout,
                    }))
                } else {
                    WaitStatus::Wait { deadline }
                }
            }
        }
    }

    /// An error the driver cannot recover from (EIO, a vanished device): every later call fails.
    pub(crate) fn fail(&mut self, failure: Failure) -> Failure {
        self.phase = Phase::Failed;
        self.failure = Some(failure.clone());
        failure
    }

    fn failed(&self) -> Failure {
        Failure::Failed(
            self.failure
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), ToString::to_string),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs a machine to Encoding at 640x480 with `outputs` buffers.
    fn encoding(limits: Limits, outputs: u32) -> Machine {
        let mut m = Machine::new(limits);
        assert_eq!(
            m.offer_frame(640, 480, false, None, t0()),
            FramePlan::Initialize {
                width: 640,
                height: 480
            }
        );
        m.started(640, 480, outputs, m.limits.hold_input);
        m
    }

    fn queue(m: &mut Machine, now: Instant) -> (u32, i64) {
        match m.offer_frame(640, 480, false, None, now) {
            FramePlan::Queue {
                index,
                timestamp_us,
                ..
            } => (index, timestamp_us),
            other => panic!("expected Queue, got {other:?}"),
        }
    }

    #[test]
    fn one_frame_in_one_out() {
        let now = t0();
        let mut m = encoding(Limits::default(), 2);
        let (index, ts) = queue(&mut m, now);
        assert_eq!(
            m.wait_status(now),
            WaitStatus::Wait {
                deadline: now + ms(2000)
            }
        );
        m.output_done(index);
        assert_eq!(
            m.capture_done(1234, false, false, true, ts),
            CaptureOutcome::Emit {
                len: 1234,
                keyframe: true,
                timestamp_us: ts
            }
        );
        assert_eq!(m.wait_status(now), WaitStatus::Done);
        // Timestamps are unique per frame.
        let (_, ts2) = queue(&mut m, now);
        assert_ne!(ts, ts2);
    }

    #[test]
    fn deeper_pipelines_return_before_the_output_arrives() {
        let now = t0();
        let limits = Limits {
            max_in_flight: 2,
            ..Limits::default()
        };
        let mut m = encoding(limits, 4);
        queue(&mut m, now);
        assert_eq!(
            m.wait_status(now),
            WaitStatus::Done,
            "one in flight of two allowed"
        );
        queue(&mut m, now + ms(33));
        assert_eq!(
            m.wait_status(now + ms(33)),
            WaitStatus::Wait {
                deadline: now + ms(2000)
            },
            "deadline of the oldest"
        );
    }

    #[test]
    fn dmabuf_input_is_held_until_the_encoder_releases_it() {
        let now = t0();
        let limits = Limits {
            max_in_flight: 4,
            hold_input: true,
            ..Limits::default()
        };
        let mut m = encoding(limits, 4);
        // The camera's buffer 2 must go into OUTPUT buffer 2.
        let plan = m.offer_frame(640, 480, false, Some(2), now);
        let FramePlan::Queue {
            index: 2,
            timestamp_us,
            ..
        } = plan
        else {
            panic!("{plan:?}")
        };
        m.capture_done(100, false, false, false, timestamp_us);
        assert!(
            matches!(m.wait_status(now), WaitStatus::Wait { .. }),
            "encoded, but buffer 2 not yet released"
        );
        m.output_done(2);
        assert_eq!(m.wait_status(now), WaitStatus::Done);
        // Buffer 2 is queued again, so the camera cannot hand it in twice.
        assert!(matches!(
            m.offer_frame(640, 480, false, Some(2), now),
            FramePlan::Queue { index: 2, .. }
        ));
        assert!(matches!(
            m.offer_frame(640, 480, false, Some(2), now),
            FramePlan::WaitForBuffer { .. }
        ));
    }

    #[test]
    fn no_free_buffer_waits_then_times_out() {
        let now = t0();
        let mut m = encoding(Limits::default(), 1);
        queue(&mut m, now);
        assert_eq!(
            m.offer_frame(640, 480, false, None, now),
            FramePlan::WaitForBuffer {
                deadline: now + ms(2000)
            }
        );
        // The deadline holds across offers.
        assert_eq!(
            m.offer_frame(640, 480, false, None, now + ms(500)),
            FramePlan::WaitForBuffer {
                deadline: now + ms(2000)
            }
        );
        let plan = m.offer_frame(640, 480, false, None, now + ms(2000));
        assert!(
            matches!(
                plan,
                FramePlan::Fail(Failure::Timeout {
                    what: "a free input buffer",
                    ..
                })
            ),
            "{plan:?}"
        );
        assert_eq!(m.phase(), Phase::Failed);
        assert!(matches!(
            m.offer_frame(640, 480, false, None, now),
            FramePlan::Fail(Failure::Failed(_))
        ));
    }

    #[test]
    fn a_frame_that_never_comes_back_times_out() {
        let now = t0();
        let mut m = encoding(Limits::default(), 2);
        queue(&mut m, now);
        assert!(matches!(
            m.wait_status(now + ms(1999)),
            WaitStatus::Wait { .. }
        ));
        let s = m.wait_status(now + ms(2000));
        assert!(
            matches!(
                s,
                WaitStatus::Fail(Failure::Timeout {
                    what: "a queued frame",
                    ..
                })
            ),
            "{s:?}"
        );
    }

    #[test]
    fn drain_ends_at_the_last_buffer_and_resumes() {
        let now = t0();
        let mut m = encoding(Limits::default(), 2);
        let (i, ts) = queue(&mut m, now);
        assert!(m.begin_drain(now));
        assert_eq!(m.phase(), Phase::Draining);
        assert!(!m.begin_drain(now), "no second STOP while draining");
        assert!(matches!(m.wait_status(now), WaitStatus::Wait { .. }));
        m.output_done(i);
        // The frame's data, then an empty LAST buffer.
        assert!(matches!(
            m.capture_done(500, false, false, true, ts),
            CaptureOutcome::Emit { .. }
        ));
        assert_eq!(m.phase(), Phase::Draining);
        assert_eq!(
            m.capture_done(0, true, false, false, 0),
            CaptureOutcome::Skip
        );
        assert_eq!(m.phase(), Phase::Stopped);
        assert_eq!(m.wait_status(now), WaitStatus::Done);
        // The same size again: the CAPTURE queue restarts, then frames flow.
        assert_eq!(m.offer_frame(640, 480, false, None, now), FramePlan::Resume);
        m.resumed();
        queue(&mut m, now);
    }

    #[test]
    fn epipe_is_expected_only_once_drained() {
        let now = t0();
        let mut m = encoding(Limits::default(), 2);
        m.begin_drain(now);
        assert_eq!(m.capture_epipe(), EpipePlan::Ignore, "draining");
        m.capture_done(0, true, false, false, 0);
        assert_eq!(m.capture_epipe(), EpipePlan::Ignore, "stopped");
        assert_eq!(m.offer_frame(640, 480, false, None, now), FramePlan::Resume);
        m.resumed();
        assert!(
            matches!(m.capture_epipe(), EpipePlan::Fail(_)),
            "encoding again"
        );
        assert_eq!(m.phase(), Phase::Failed);
    }

    #[test]
    fn the_last_buffer_may_carry_the_final_frame() {
        let now = t0();
        let mut m = encoding(Limits::default(), 2);
        let (_, ts) = queue(&mut m, now);
        m.begin_drain(now);
        assert!(matches!(
            m.capture_done(77, true, false, false, ts),
            CaptureOutcome::Emit { len: 77, .. }
        ));
        assert_eq!(m.phase(), Phase::Stopped);
    }

    #[test]
    fn a_drain_without_last_buffer_times_out() {
        let now = t0();
        let mut m = encoding(Limits::default(), 2);
        m.begin_drain(now);
        let s = m.wait_status(now + ms(2000));
        assert!(
            matches!(s, WaitStatus::Fail(Failure::Timeout { what, .. }) if what.contains("LAST")),
            "{s:?}"
        );
    }

    #[test]
    fn a_new_size_drains_then_initializes_again() {
        let now = t0();
        let mut m = encoding(Limits::default(), 2);
        let (i, ts) = queue(&mut m, now);
        // A 640x360 frame arrives while a 640x480 one is in flight.
        assert_eq!(m.offer_frame(640, 360, false, None, now), FramePlan::Drain);
        assert!(m.begin_drain(now));
        assert_eq!(
            m.offer_frame(640, 360, false, None, now),
            FramePlan::Drain,
            "still draining"
        );
        m.output_done(i);
        m.capture_done(10, true, false, true, ts);
        assert_eq!(
            m.offer_frame(640, 360, false, None, now),
            FramePlan::Initialize {
                width: 640,
                height: 360
            }
        );
        m.started(640, 360, 2, m.limits.hold_input);
        assert_eq!(m.size(), Some((640, 360)));
        assert!(matches!(
            m.offer_frame(640, 360, true, None, now),
            FramePlan::Queue { keyframe: true, .. }
        ));
    }

    #[test]
    fn a_new_size_with_nothing_in_flight_initializes_at_once() {
        let now = t0();
        let mut m = encoding(Limits::default(), 2);
        let (i, ts) = queue(&mut m, now);
        m.output_done(i);
        m.capture_done(10, false, false, true, ts);
        assert_eq!(
            m.offer_frame(320, 240, false, None, now),
            FramePlan::Initialize {
                width: 320,
                height: 240
            }
        );
    }

    #[test]
    fn corrupt_frames_are_skipped_until_too_many_in_a_row() {
        let now = t0();
        let mut m = encoding(Limits::default(), 4);
        for round in 0..2 {
            let (i, ts) = queue(&mut m, now);
            m.output_done(i);
            assert_eq!(
                m.capture_done(100, false, true, false, ts),
                CaptureOutcome::Skip,
                "round {round}"
            );
        }
        // A good frame resets the count.
        let (i, ts) = queue(&mut m, now);
        m.output_done(i);
        assert!(matches!(
            m.capture_done(100, false, false, false, ts),
            CaptureOutcome::Emit { .. }
        ));
        for _ in 0..2 {
            let (i, ts) = queue(&mut m, now);
            m.output_done(i);
            m.capture_done(100, false, true, false, ts);
        }
        let (i, ts) = queue(&mut m, now);
        m.output_done(i);
        assert_eq!(
            m.capture_done(100, false, true, false, ts),
            CaptureOutcome::Fail(Failure::Corrupt { count: 3 })
        );
        assert_eq!(m.phase(), Phase::Failed);
    }

    #[test]
    fn output_without_timestamps_matches_the_oldest_frame() {
        let now = t0();
        let limits = Limits {
            max_in_flight: 3,
            ..Limits::default()
        };
        let mut m = encoding(limits, 3);
        let (_, first) = queue(&mut m, now);
        queue(&mut m, now);
        assert_eq!(
            m.capture_done(9, false, false, false, 0),
            CaptureOutcome::Emit {
                len: 9,
                keyframe: false,
                timestamp_us: first
            }
        );
        assert_eq!(m.in_flight(), 1);
    }

    #[test]
    fn a_returned_buffer_is_free_once() {
        let now = t0();
        let mut m = encoding(Limits::default(), 1);
        let (i, _) = queue(&mut m, now);
        m.output_done(i);
        m.output_done(i);
        queue(&mut m, now);
        assert!(matches!(
            m.offer_frame(640, 480, false, None, now),
            FramePlan::WaitForBuffer { .. }
        ));
    }
}
