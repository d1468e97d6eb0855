//! Which frames one viewer is sent: the temporal layers its bandwidth estimate allows, nothing its decoder could not use, nothing into a pacer already too far behind.
//!
//! Each layer's rate is what its frames measured over the last seconds, or, when less, its
//! share of those bytes times the encoder's current target (so a lower target counts at once;
//! an encoder short of content stays below its target, and then the measured rate counts).
//! The viewer gets the most layers whose
//! rate fits [`VIDEO_SHARE`] of its estimate: fewer at once when it no longer fits, one more
//! after the next one has fitted for [`UP_AFTER`]. Going up needs no keyframe: a frame of a
//! lower layer is a switch point ([`Continuity`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::bandwidth::VIDEO_SHARE;
use crate::media::continuity::Continuity;
use crate::media::encoder::MAX_TEMPORAL_LAYERS;
use crate::media::frame::EncodedFrame;

/// Bytes per layer are measured over this long (a keyframe interval or so).
const SHARE_WINDOW: Duration = Duration::from_secs(3);
/// A layer stays while its rate is within this factor of the usable rate (shares measured over
/// partial patterns wobble; the pacer's headroom absorbs the difference).
const DOWN_SLACK: f64 = 1.1;
/// Layers are chosen once frames over this long were seen.
const MIN_SEEN: Duration = Duration::from_millis(500);
/// A further layer must have fitted this long before it is sent.
pub(crate) const UP_AFTER: Duration = Duration::from_secs(1);
/// With this much queued in the pacer only layer 0 is sent...
const BACKLOG_BASE_ONLY: Duration = Duration::from_millis(150);
/// ...and with this much, nothing: the viewer waits for a lower layer or the next keyframe.
const BACKLOG_NOTHING: Duration = Duration::from_millis(400);

/// Why a frame was not sent (for counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    /// Above the layers the estimate allows.
    Layer,
    /// The pacer is too far behind.
    Backlog,
    /// It references a frame this viewer did not get.
    Undecodable,
}

/// One viewer's frame selection.
#[derive(Debug)]
pub(crate) struct LayerSelector {
    recent: VecDeque<(Instant, u8, usize)>,
    bytes: [u64; MAX_TEMPORAL_LAYERS as usize],
    /// Highest layer seen.
    top: u8,
    /// Highest layer sent.
    limit: u8,
    up_since: Option<Instant>,
    continuity: Continuity,
}

impl Default for LayerSelector {
    fn default() -> Self {
        Self {
            recent: VecDeque::new(),
            bytes: [0; MAX_TEMPORAL_LAYERS as usize],
            top: 0,
            limit: MAX_TEMPORAL_LAYERS - 1,
            up_since: None,
            continuity: Continuity::default(),
        }
    }
}

impl LayerSelector {
    /// Highest layer this viewer is sent, and the number of layers there are.
    pub fn layers(&self) -> (u8, u8) {
        (self.limit.min(self.top), self.top + 1)
    }

    /// Rate of layers `0..=layer`, bits per second: measured, or their share of the encoder's
    /// `target` when that is less.
    fn rate(&self, layer: u8, target: u32, now: Instant) -> f64 {
        let all: u64 = self.bytes.iter().sum();
        if all == 0 {
            return f64::from(target);
        }
        let below: u64 = self.bytes[..=usize::from(layer)].iter().sum();
        let span = self
            .recent
            .front()
            .map_or(SHARE_WINDOW, |(t, _, _)| now.saturating_duration_since(*t))
            .max(MIN_SEEN);
        let measured = below as f64 * 8.0 / span.as_secs_f64();
        measured.min(f64::from(target) * below as f64 / all as f64)
    }

    fn observe(&mut self, now: Instant, frame: &EncodedFrame) {
        let layer = frame.temporal_id.min(MAX_TEMPORAL_LAYERS - 1);
        self.top = self.top.max(layer);
        self.recent.push_back((now, layer, frame.data.len()));
        self.bytes[usize::from(layer)] += frame.data.len() as u64;
        while let Some(&(t, l, n)) = self.recent.front() {
            if now.saturating_duration_since(t) <= SHARE_WINDOW {
                break;
            }
            self.bytes[usize::from(l)] -= n as u64;
            self.recent.pop_front();
        }
    }

    fn choose(&mut self, now: Instant, target: u32, estimate: u32) {
        let seen = self.recent.front().map_or(Duration::ZERO, |(t, _, _)| {
            now.saturating_duration_since(*t)
        });
        if seen < MIN_SEEN {
            return; // too few frames to know the layers' shares
        }
        let usable = VIDEO_SHARE * f64::from(estimate);
        let fits = |l: u8, slack: f64| self.rate(l, target, now) <= usable * slack;
        // The limit may exceed the layers seen so far (it starts at "all").
        let limit = self.limit.min(self.top);
        if !fits(limit, DOWN_SLACK) {
            // Down at once, as far as needed (layer 0 stays: the backlog rules guard it).
            self.limit = (0..limit).rev().find(|&l| fits(l, 1.0)).unwrap_or(0);
            self.up_since = None;
        } else if limit < self.top && fits(limit + 1, 1.0) {
            let since = *self.up_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= UP_AFTER {
                self.limit = limit + 1;
                self.up_since = Some(now);
            }
        } else {
            self.up_since = None;
        }
    }

    /// Decides whether `frame` goes to this viewer, given its estimate and what its pacer
    /// holds; `Err` says why not.
    pub fn offer(
        &mut self,
        now: Instant,
        frame: &EncodedFrame,
        estimate: u32,
        backlog: Duration,
    ) -> Result<(), Skip> {
        self.observe(now, frame);
        self.choose(now, frame.target_bps, estimate);
        let layer = if frame.keyframe { 0 } else { frame.temporal_id };
        let verdict = if backlog > BACKLOG_NOTHING || (backlog > BACKLOG_BASE_ONLY && layer > 0) {
            Err(Skip::Backlog)
        } else if layer > self.limit {
            Err(Skip::Layer)
        } else if !self.continuity.decodable(frame) {
            Err(Skip::Undecodable)
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => self.continuity.sent(frame),
            Err(_) => self.continuity.skipped(frame),
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const TARGET: u32 = 2_000_000;

    /// The openh264 3-layer pattern 0 2 1 2 at 30 fps, sized 40/30/15/15 % of the target,
    /// with a keyframe every 60 frames.
    struct Stream {
        t0: Instant,
        n: u64,
    }

    impl Stream {
        fn new() -> Self {
            Self {
                t0: Instant::now(),
                n: 0,
            }
        }

        fn next(&mut self) -> (Instant, EncodedFrame) {
            let tid = [0u8, 2, 1, 2][(self.n % 4) as usize];
            let per_gop = f64::from(TARGET) / 8.0 / 7.5;
            let share = [0.4, 0.3, 0.15][usize::from(tid)];
            let now = self.t0 + Duration::from_millis(self.n * 1000 / 30);
            let frame = EncodedFrame {
                data: Bytes::from(vec![0; (per_gop * share) as usize]),
                keyframe: self.n.is_multiple_of(60),
                seq: self.n,
                captured_at: now,
                duration: Duration::from_millis(33),
                temporal_id: tid,
                target_bps: TARGET,
                preroll: None,
            };
            self.n += 1;
            (now, frame)
        }
    }

    /// Offers `seconds` of the stream; returns the layers of the frames sent.
    fn run(
        s: &mut LayerSelector,
        stream: &mut Stream,
        seconds: u64,
        estimate: u32,
        backlog: Duration,
    ) -> Vec<u8> {
        (0..seconds * 30)
            .filter_map(|_| {
                let (now, f) = stream.next();
                s.offer(now, &f, estimate, backlog)
                    .ok()
                    .map(|()| f.temporal_id)
            })
            .collect()
    }

    fn fps(layers: &[u8], seconds: impl Into<f64>) -> f64 {
        layers.len() as f64 / seconds.into()
    }

    #[test]
    fn an_encoder_short_of_content_is_measured_not_assumed_at_its_target() {
        // The stream uses a tenth of its 2 Mbit/s target: a 500 kbit/s viewer takes it all.
        let mut s = LayerSelector::default();
        let mut stream = Stream::new();
        for _ in 0..150 {
            let (now, mut f) = stream.next();
            f.data = f.data.slice(..f.data.len() / 10);
            assert_eq!(s.offer(now, &f, 500_000, Duration::ZERO), Ok(()));
        }
        assert_eq!(s.layers(), (2, 3));
    }

    #[test]
    fn a_viewer_that_can_take_the_stream_gets_every_frame() {
        let mut s = LayerSelector::default();
        let sent = run(&mut s, &mut Stream::new(), 5, 3_000_000, Duration::ZERO);
        assert_eq!(sent.len(), 150);
        assert_eq!(s.layers(), (2, 3));
    }

    #[test]
    fn a_slower_viewer_gets_the_base_layers_at_once() {
        // 85 % of 1.8 Mbit/s is 77 % of the stream: layers 0-1 (70 %), 15 fps.
        let mut s = LayerSelector::default();
        let mut stream = Stream::new();
        let sent = run(&mut s, &mut stream, 4, 1_800_000, Duration::ZERO);
        assert_eq!(s.layers(), (1, 3));
        assert!(sent[16..].iter().all(|&l| l <= 1), "{sent:?}");
        assert!(
            (fps(&sent[16..], 3.5) - 15.0).abs() < 1.0,
            "{}",
            fps(&sent[16..], 3.5)
        );
        // 85 % of 1 Mbit/s is 42 %: layer 0, 7.5 fps.
        let sent = run(&mut s, &mut stream, 4, 1_000_000, Duration::ZERO);
        assert!(sent.iter().all(|&l| l == 0));
        assert!((fps(&sent, 4) - 7.5).abs() < 0.5, "{}", fps(&sent, 4));
        // Below even layer 0 it still gets layer 0 (the pacer and its backlog decide).
        let sent = run(&mut s, &mut stream, 2, 300_000, Duration::ZERO);
        assert!((fps(&sent, 2) - 7.5).abs() < 0.6);
    }

    #[test]
    fn going_up_waits_and_climbs_one_layer_a_second() {
        let mut s = LayerSelector::default();
        let mut stream = Stream::new();
        run(&mut s, &mut stream, 3, 1_000_000, Duration::ZERO);
        assert_eq!(s.layers().0, 0);
        let mut limits = Vec::new();
        for _ in 0..90 {
            let (now, f) = stream.next();
            let _ = s.offer(now, &f, 5_000_000, Duration::ZERO);
            limits.push(s.layers().0);
        }
        let first_1 = limits.iter().position(|&l| l == 1).unwrap();
        let first_2 = limits.iter().position(|&l| l == 2).unwrap();
        assert!((29..=31).contains(&first_1), "{limits:?}");
        assert!((59..=61).contains(&first_2), "{limits:?}");
    }

    #[test]
    fn every_frame_sent_is_decodable_when_layers_change() {
        let mut s = LayerSelector::default();
        let mut stream = Stream::new();
        let mut decoder = Continuity::default();
        for i in 0..600u64 {
            let (now, f) = stream.next();
            let estimate = if (i / 45) % 2 == 0 {
                5_000_000
            } else {
                900_000
            };
            match s.offer(now, &f, estimate, Duration::ZERO) {
                Ok(()) => {
                    assert!(decoder.decodable(&f), "frame {i} (layer {})", f.temporal_id);
                    decoder.sent(&f);
                }
                Err(_) => decoder.skipped(&f),
            }
        }
    }

    #[test]
    fn a_pacer_behind_gets_layer_0_then_nothing() {
        let mut s = LayerSelector::default();
        let mut stream = Stream::new();
        run(&mut s, &mut stream, 1, 5_000_000, Duration::ZERO);
        let sent = run(
            &mut s,
            &mut stream,
            2,
            5_000_000,
            Duration::from_millis(200),
        );
        assert!(sent.iter().all(|&l| l == 0) && !sent.is_empty());
        let sent = run(
            &mut s,
            &mut stream,
            2,
            5_000_000,
            Duration::from_millis(500),
        );
        assert!(sent.is_empty());
        // Back to normal: layer 0 waits for the keyframe (its predecessors were skipped).
        let (now, f) = loop {
            let (now, f) = stream.next();
            if f.temporal_id == 0 {
                break (now, f);
            }
            let _ = s.offer(now, &f, 5_000_000, Duration::ZERO);
        };
        assert_eq!(
            s.offer(now, &f, 5_000_000, Duration::ZERO),
            Err(Skip::Undecodable)
        );
    }
}
