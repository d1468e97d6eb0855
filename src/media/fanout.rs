//! Encode-once fan-out: each viewer's bounded queue; a full queue skips that viewer's frames until they decode again; a new viewer may start from a cached GOP.

use std::sync::Arc;

use super::continuity::Continuity;
use super::frame::EncodedFrame;

/// Result of offering a frame to one viewer's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkResult {
    Sent,
    Full,
    Closed,
}

/// A viewer's queue, as the fan-out sees it.
pub trait FrameSink {
    fn offer(&self, frame: &EncodedFrame) -> SinkResult;
}

impl FrameSink for tokio::sync::mpsc::Sender<EncodedFrame> {
    fn offer(&self, frame: &EncodedFrame) -> SinkResult {
        match self.try_send(frame.clone()) {
            Ok(()) => SinkResult::Sent,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => SinkResult::Full,
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => SinkResult::Closed,
        }
    }
}

/// Identifies a subscriber (the viewer session's numeric id).
pub type SubscriberId = u64;

struct Subscriber<S> {
    id: SubscriberId,
    sink: S,
    /// What this viewer can decode: nothing before its first keyframe; after an overflow,
    /// nothing of the overflowed frame's layer and above until a lower layer (or, for layer 0,
    /// the next keyframe) comes by.
    continuity: Continuity,
}

/// What one delivery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    pub sent: usize,
    /// Frames not delivered to a viewer because its queue was full or it could not decode it.
    pub dropped: usize,
    /// Some viewer waits for its first keyframe: the encoder should produce one soon. A viewer
    /// whose queue overflowed does not count: it waits for the next periodic keyframe rather
    /// than forcing one on every viewer.
    pub keyframe_needed: bool,
    /// Subscribers removed because their queue was closed.
    pub closed: usize,
}

/// All current subscribers.
pub struct Fanout<S> {
    subscribers: Vec<Subscriber<S>>,
}

impl<S> Default for Fanout<S> {
    fn default() -> Self {
        Self {
            subscribers: Vec::new(),
        }
    }
}

impl<S: FrameSink> Fanout<S> {
    /// Adds a viewer; it receives frames from the next keyframe on.
    pub fn subscribe(&mut self, id: SubscriberId, sink: S) {
        self.subscribers.retain(|s| s.id != id);
        self.subscribers.push(Subscriber {
            id,
            sink,
            continuity: Continuity::default(),
        });
    }

    pub fn unsubscribe(&mut self, id: SubscriberId) {
        self.subscribers.retain(|s| s.id != id);
    }

    pub fn contains(&self, id: SubscriberId) -> bool {
        self.subscribers.iter().any(|s| s.id == id)
    }

    pub fn len(&self) -> usize {
        self.subscribers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }

    /// True when some subscriber waits for its first keyframe.
    pub fn wants_keyframe(&self) -> bool {
        self.subscribers
            .iter()
            .any(|s| s.continuity.waiting_for_first_keyframe())
    }

    /// Offers `frame` to every subscriber that could decode it.
    pub fn deliver(&mut self, frame: &EncodedFrame) -> Delivery {
        self.deliver_after(frame, &[])
    }

    /// Offers `frame` to every subscriber. One that waits for a keyframe while `start` holds
    /// the frames since the last IDR (a GOP cache) starts at once: it gets `frame` with
    /// `start` as its preroll, all in one queue slot.
    pub fn deliver_after(&mut self, frame: &EncodedFrame, start: &[EncodedFrame]) -> Delivery {
        let mut d = Delivery::default();
        let mut with_start: Option<EncodedFrame> = None;
        self.subscribers.retain_mut(|s| {
            let mut offered = frame;
            if !s.continuity.decodable(frame) {
                if start.is_empty() {
                    s.continuity.skipped(frame);
                    d.dropped += 1;
                    return true;
                }
                // A GOP cache (passthrough): start over from its IDR at once, in one queue slot.
                offered = with_start.get_or_insert_with(|| EncodedFrame {
                    preroll: Some(Arc::from(start)),
                    ..frame.clone()
                });
            }
            match s.sink.offer(offered) {
                SinkResult::Sent => {
                    for f in offered.preroll.iter().flat_map(|p| p.iter()) {
                        s.continuity.sent(f);
                    }
                    s.continuity.sent(frame);
                    d.sent += 1;
                    true
                }
                SinkResult::Full => {
                    s.continuity.skipped(frame);
                    d.dropped += 1;
                    true
                }
                SinkResult::Closed => {
                    d.closed += 1;
                    false
                }
            }
        });
        d.keyframe_needed = self.wants_keyframe();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::{Duration, Instant};

    /// A queue of fixed capacity that the test drains by hand.
    #[derive(Clone)]
    struct FakeSink {
        queue: Rc<RefCell<Vec<u64>>>,
        capacity: usize,
        closed: Rc<RefCell<bool>>,
    }

    impl FakeSink {
        fn new(capacity: usize) -> Self {
            Self {
                queue: Rc::default(),
                capacity,
                closed: Rc::default(),
            }
        }
        fn drain(&self) -> Vec<u64> {
            std::mem::take(&mut self.queue.borrow_mut())
        }
    }

    impl FrameSink for FakeSink {
        fn offer(&self, frame: &EncodedFrame) -> SinkResult {
            if *self.closed.borrow() {
                return SinkResult::Closed;
            }
            let mut q = self.queue.borrow_mut();
            if q.len() >= self.capacity {
                return SinkResult::Full;
            }
            q.push(frame.seq);
            SinkResult::Sent
        }
    }

    fn frame(seq: u64, keyframe: bool) -> EncodedFrame {
        layered(seq, keyframe, 0)
    }

    fn layered(seq: u64, keyframe: bool, temporal_id: u8) -> EncodedFrame {
        EncodedFrame {
            data: Bytes::from_static(b"\0\0\0\x01"),
            keyframe,
            seq,
            captured_at: Instant::now(),
            duration: Duration::from_millis(33),
            temporal_id,
            target_bps: 1_000_000,
            preroll: None,
        }
    }

    /// A sink that keeps whole frames (with their preroll).
    #[derive(Clone, Default)]
    struct Keeper(Rc<RefCell<Vec<EncodedFrame>>>);

    impl FrameSink for Keeper {
        fn offer(&self, frame: &EncodedFrame) -> SinkResult {
            self.0.borrow_mut().push(frame.clone());
            SinkResult::Sent
        }
    }

    #[test]
    fn a_new_viewer_starts_from_the_cached_gop_in_one_slot() {
        let mut f = Fanout::default();
        let early = Keeper::default();
        f.subscribe(1, early.clone());
        let gop = [frame(10, true), frame(11, false), frame(12, false)];
        for g in &gop {
            f.deliver(g);
        }
        let late = Keeper::default();
        f.subscribe(2, late.clone());
        let d = f.deliver_after(&frame(13, false), &gop);
        assert_eq!((d.sent, d.dropped, d.keyframe_needed), (2, 0, false));
        let got = late.0.borrow().clone();
        assert_eq!(got.len(), 1, "one queue slot");
        let preroll: Vec<u64> = got[0]
            .preroll
            .as_ref()
            .unwrap()
            .iter()
            .map(|f| f.seq)
            .collect();
        assert_eq!((preroll, got[0].seq), (vec![10, 11, 12], 13));
        assert!(got[0].preroll.as_ref().unwrap()[0].keyframe);
        // Viewers already watching get the frame alone.
        assert!(early.0.borrow().iter().all(|f| f.preroll.is_none()));
        // Later frames come without a preroll; a keyframe never carries one.
        f.subscribe(3, Keeper::default());
        f.deliver_after(&frame(14, false), &gop);
        assert!(late.0.borrow()[1].preroll.is_none());
        let next = Keeper::default();
        f.subscribe(4, next.clone());
        f.deliver_after(&frame(20, true), &gop);
        assert!(next.0.borrow()[0].preroll.is_none());
        // Without a cache a new viewer waits for a keyframe, as before.
        let waiting = Keeper::default();
        f.subscribe(5, waiting.clone());
        let d = f.deliver_after(&frame(21, false), &[]);
        assert_eq!((d.dropped, d.keyframe_needed), (1, true));
        assert!(waiting.0.borrow().is_empty());
    }

    #[test]
    fn new_viewer_starts_at_a_keyframe() {
        let mut f = Fanout::default();
        let a = FakeSink::new(10);
        f.subscribe(1, a.clone());
        assert!(f.wants_keyframe());
        let d = f.deliver(&frame(0, false));
        assert_eq!((d.sent, d.dropped, d.keyframe_needed), (0, 1, true));
        let d = f.deliver(&frame(1, true));
        assert_eq!((d.sent, d.keyframe_needed), (1, false));
        f.deliver(&frame(2, false));
        assert_eq!(a.drain(), vec![1, 2]);
    }

    #[test]
    fn slow_viewer_skips_to_next_keyframe_without_holding_up_others() {
        let mut f = Fanout::default();
        let fast = FakeSink::new(100);
        let slow = FakeSink::new(2);
        f.subscribe(1, fast.clone());
        f.subscribe(2, slow.clone());
        f.deliver(&frame(0, true));
        f.deliver(&frame(1, false));
        let d = f.deliver(&frame(2, false)); // slow is full now
        assert_eq!((d.sent, d.dropped), (1, 1));
        assert!(
            !d.keyframe_needed,
            "a slow viewer waits for the next periodic keyframe: none is forced on everyone"
        );
        assert!(!f.wants_keyframe());
        assert_eq!(slow.drain(), vec![0, 1]);
        // Room again, but a P-frame would reference the lost frame 2: skip it.
        let d = f.deliver(&frame(3, false));
        assert_eq!((d.sent, d.dropped), (1, 1));
        f.deliver(&frame(4, true));
        f.deliver(&frame(5, false));
        assert_eq!(slow.drain(), vec![4, 5]);
        assert_eq!(fast.drain(), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn overflow_on_an_upper_layer_resumes_at_the_next_lower_layer_frame() {
        let mut f = Fanout::default();
        let slow = FakeSink::new(2);
        f.subscribe(1, slow.clone());
        f.deliver(&layered(0, true, 0));
        f.deliver(&layered(1, false, 2));
        f.deliver(&layered(2, false, 1)); // full: layer 1 lost
        assert_eq!(slow.drain(), vec![0, 1]);
        f.deliver(&layered(3, false, 2)); // may reference 2: skipped
        f.deliver(&layered(4, false, 0)); // layer 0 intact
        f.deliver(&layered(5, false, 2));
        assert_eq!(slow.drain(), vec![4, 5]);
        assert!(!f.wants_keyframe());
    }

    #[test]
    fn closed_viewers_are_removed() {
        let mut f = Fanout::default();
        let a = FakeSink::new(10);
        f.subscribe(1, a.clone());
        *a.closed.borrow_mut() = true;
        let d = f.deliver(&frame(0, true));
        assert_eq!(d.closed, 1);
        assert!(f.is_empty());
    }

    #[test]
    fn unsubscribe_and_resubscribe() {
        let mut f = Fanout::default();
        f.subscribe(1, FakeSink::new(1));
        f.subscribe(1, FakeSink::new(1));
        assert_eq!(f.len(), 1);
        f.unsubscribe(1);
        assert!(f.is_empty());
        assert!(!f.wants_keyframe());
    }

    #[test]
    fn real_channel_sink_reports_full_and_closed() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        assert_eq!(tx.offer(&frame(0, true)), SinkResult::Sent);
        assert_eq!(tx.offer(&frame(1, true)), SinkResult::Full);
        drop(rx);
        assert_eq!(tx.offer(&frame(2, true)), SinkResult::Closed);
    }
}
