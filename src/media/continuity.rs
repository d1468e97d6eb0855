//! Which frames a receiver can still decode after some were skipped: continuity per temporal layer.
//!
//! openh264 builds every reference list from earlier pictures of the same or a lower temporal
//! layer, and the top layer is never referenced. So skipping a picture of layer `t` makes the
//! pictures of layers `>= t` undecodable until a picture of a layer `< t` has been sent (it is
//! the newest reference they can use), and skipping a layer-0 picture leaves only the next
//! keyframe. `src/media/encoder.rs` tests that assumption bit-exactly against openh264.

use super::frame::EncodedFrame;

/// What a viewer's decoder has: a keyframe yet, and which layers it lost the thread of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Continuity {
    /// A keyframe was sent: the decoder can start.
    started: bool,
    /// The lowest layer a skipped picture belonged to since the last picture below it.
    broken_from: Option<u8>,
}

impl Continuity {
    /// True when `frame` would decode if sent now.
    pub fn decodable(&self, frame: &EncodedFrame) -> bool {
        if frame.keyframe {
            return true;
        }
        self.started && self.broken_from.is_none_or(|b| frame.temporal_id < b)
    }

    /// True until the first keyframe was sent.
    pub fn waiting_for_first_keyframe(&self) -> bool {
        !self.started
    }

    /// `frame` was sent.
    pub fn sent(&mut self, frame: &EncodedFrame) {
        if frame.keyframe {
            self.started = true;
            self.broken_from = None;
        } else if self.broken_from.is_some_and(|b| frame.temporal_id < b) {
            // The newest reference of every layer >= its own is now a picture the decoder has.
            self.broken_from = None;
        }
    }

    /// `frame` was not sent (on purpose or for lack of room).
    pub fn skipped(&mut self, frame: &EncodedFrame) {
        let layer = if frame.keyframe { 0 } else { frame.temporal_id };
        self.broken_from = Some(self.broken_from.map_or(layer, |b| b.min(layer)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::{Duration, Instant};

    fn frame(keyframe: bool, temporal_id: u8) -> EncodedFrame {
        EncodedFrame {
            data: Bytes::new(),
            keyframe,
            seq: 0,
            captured_at: Instant::now(),
            duration: Duration::from_millis(33),
            temporal_id,
            target_bps: 1_000_000,
            preroll: None,
        }
    }

    #[test]
    fn nothing_before_the_first_keyframe() {
        let mut c = Continuity::default();
        assert!(c.waiting_for_first_keyframe());
        assert!(!c.decodable(&frame(false, 0)));
        assert!(c.decodable(&frame(true, 0)));
        c.sent(&frame(true, 0));
        assert!(!c.waiting_for_first_keyframe());
        assert!(c.decodable(&frame(false, 2)));
    }

    #[test]
    fn a_skipped_upper_layer_picture_waits_for_the_next_lower_one() {
        let mut c = Continuity::default();
        c.sent(&frame(true, 0));
        // Pattern 0 2 1 2 0: the layer-1 picture is skipped.
        c.sent(&frame(false, 2));
        c.skipped(&frame(false, 1));
        assert!(
            !c.decodable(&frame(false, 2)),
            "it may reference the lost picture"
        );
        assert!(!c.decodable(&frame(false, 1)));
        assert!(c.decodable(&frame(false, 0)));
        assert!(c.decodable(&frame(false, 0)), "layer 0 is intact");
        c.sent(&frame(false, 0));
        assert!(c.decodable(&frame(false, 2)) && c.decodable(&frame(false, 1)));
    }

    #[test]
    fn skipping_the_top_layers_on_purpose_keeps_the_lower_ones_flowing() {
        let mut c = Continuity::default();
        c.sent(&frame(true, 0));
        for _ in 0..3 {
            for tid in [2u8, 1, 2, 0] {
                let f = frame(false, tid);
                if tid <= 1 {
                    assert!(c.decodable(&f), "layer {tid}");
                    c.sent(&f);
                } else {
                    c.skipped(&f);
                }
            }
        }
        assert!(c.decodable(&frame(false, 1)));
    }

    #[test]
    fn a_skipped_layer_0_picture_or_keyframe_needs_the_next_keyframe() {
        let mut c = Continuity::default();
        c.sent(&frame(true, 0));
        c.skipped(&frame(false, 0));
        assert!(!c.decodable(&frame(false, 0)));
        assert!(!c.decodable(&frame(false, 2)));
        c.sent(&frame(true, 0));
        assert!(c.decodable(&frame(false, 0)));

        let mut c = Continuity::default();
        c.sent(&frame(true, 0));
        c.skipped(&frame(true, 0));
        assert!(!c.decodable(&frame(false, 0)) && !c.waiting_for_first_keyframe());
    }
}
