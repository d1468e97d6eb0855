//! Retained state that heals: what rtcam last published on its retained topics, and a republish when another client overwrites one.
//!
//! The device subscribes to its own `status`, `state` and discovery topics. Its own messages
//! come back as echoes; anything else there was published by someone else (a forged
//! `offline`, a stale state, a deleted discovery) and is overwritten again within
//! [`HEAL_MIN_INTERVAL`], however often it is repeated.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::log_limit::LogLimiter;
use crate::outbound::{Publish, PublishError};

/// How long rtcam waits for the echo of its own publish before counting it lost.
const ECHO_WAIT: Duration = Duration::from_secs(10);
/// Own publishes remembered per topic while their echo is due.
const MAX_IN_FLIGHT: usize = 16;
/// A topic is republished at most this often, so a flood of forgeries costs bounded traffic
/// and the last one is still corrected well within a second.
pub(crate) const HEAL_MIN_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
struct Guarded {
    /// What rtcam last published there (None: nothing yet, nothing to defend).
    expected: Option<Vec<u8>>,
    /// rtcam's own publishes whose echo has not come back yet, oldest first.
    in_flight: VecDeque<(Instant, Vec<u8>)>,
    /// When the topic must be republished.
    heal_at: Option<Instant>,
    last_heal: Option<Instant>,
}

/// The guarded topics and what rtcam published on them; pure, with explicit time.
#[derive(Debug)]
pub(crate) struct RetainedBook {
    topics: HashMap<String, Guarded>,
}

impl RetainedBook {
    pub fn new(topics: impl IntoIterator<Item = String>) -> Self {
        Self {
            topics: topics
                .into_iter()
                .map(|t| (t, Guarded::default()))
                .collect(),
        }
    }

    pub fn is_guarded(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// rtcam publishes `payload`, retained, on `topic`.
    pub fn published(&mut self, topic: &str, payload: &[u8], now: Instant) {
        let Some(g) = self.topics.get_mut(topic) else {
            return;
        };
        g.expected = Some(payload.to_vec());
        if g.in_flight.len() == MAX_IN_FLIGHT {
            g.in_flight.pop_front();
        }
        g.in_flight.push_back((now, payload.to_vec()));
    }

    /// A message arrived on `topic`. True when it is not rtcam's and a republish became due.
    pub fn observed(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        let Some(g) = self.topics.get_mut(topic) else {
            return false;
        };
        while g
            .in_flight
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > ECHO_WAIT)
        {
            g.in_flight.pop_front();
        }
        if let Some(i) = g.in_flight.iter().position(|(_, p)| p == payload) {
            // Our own echo; earlier ones still missing were overtaken or lost.
            g.in_flight.drain(..=i);
            return false;
        }
        match &g.expected {
            // Nothing published yet (e.g. the retained message of an earlier run, delivered
            // on subscribe): rtcam's first publish overwrites it anyway.
            None => false,
            // Someone repeated rtcam's current value: the retained message is right.
            Some(e) if e == payload => false,
            Some(_) => {
                if g.heal_at.is_none() {
                    let earliest = g.last_heal.map_or(now, |t| t + HEAL_MIN_INTERVAL);
                    g.heal_at = Some(earliest.max(now));
                }
                true
            }
        }
    }

    /// The republishes due at `now`, as (topic, payload); they count as published.
    pub fn take_due(&mut self, now: Instant) -> Vec<(String, Vec<u8>)> {
        let mut due = Vec::new();
        for (topic, g) in &mut self.topics {
            if g.heal_at.is_some_and(|at| at <= now) {
                g.heal_at = None;
                if let Some(payload) = g.expected.clone() {
                    g.last_heal = Some(now);
                    due.push((topic.clone(), payload));
                }
            }
        }
        for (topic, payload) in &due {
            self.published(topic, payload, now);
        }
        due
    }

    /// When the next republish is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.topics.values().filter_map(|g| g.heal_at).min()
    }
}

/// The book, shared by the publishing side, the inbound dispatcher and the healer task.
#[derive(Clone)]
pub(crate) struct RetainedGuard {
    book: Arc<Mutex<RetainedBook>>,
    wake: Arc<Notify>,
}

impl RetainedGuard {
    pub fn new(topics: impl IntoIterator<Item = String>) -> Self {
        Self {
            book: Arc::new(Mutex::new(RetainedBook::new(topics))),
            wake: Arc::new(Notify::new()),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, RetainedBook> {
        // A poisoned book is still a valid book.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message on `topic` from the broker. True when the topic is guarded (the dispatcher
    /// is done with it).
    pub fn observe(&self, topic: &str, payload: &[u8], now: Instant) -> bool {
        let mut book = self.book();
        if !book.is_guarded(topic) {
            return false;
        }
        if book.observed(topic, payload, now) {
            self.wake.notify_one();
        }
        true
    }

    /// Wraps a publisher so rtcam's own retained publishes on guarded topics are remembered.
    pub fn recording(&self, inner: Arc<dyn Publish>) -> Arc<dyn Publish> {
        Arc::new(RecordingRetained {
            inner,
            guard: self.clone(),
        })
    }

    /// Republishes overwritten topics through `publish` until `cancel` (shutdown: the final
    /// `offline` must stand).
    pub async fn run_healer(self, publish: Arc<dyn Publish>, cancel: CancellationToken) {
        let mut log = LogLimiter::new(Duration::from_secs(60), 3);
        loop {
            let now = Instant::now();
            let due = self.book().take_due(now);
            for (topic, payload) in due {
                if let Some(suppressed) = log.allow(now) {
                    tracing::warn!(%topic, suppressed, "another client overwrote a retained topic of this device; republished");
                }
                let _ = publish.publish(topic, payload, true);
            }
            let next = self.book().next_due();
            tokio::select! {
                _ = cancel.cancelled() => break,
                () = self.wake.notified() => {}
                () = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }
}

/// A publisher that notes retained publishes on guarded topics before passing them on.
struct RecordingRetained {
    inner: Arc<dyn Publish>,
    guard: RetainedGuard,
}

impl Publish for RecordingRetained {
    fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), PublishError> {
        if retain {
            // Noted first: the echo can only come after the publish.
            self.guard
                .book()
                .published(&topic, &payload, Instant::now());
        }
        self.inner.publish(topic, payload, retain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "rtcam/cam1/status";

    fn book() -> RetainedBook {
        RetainedBook::new([STATUS.to_string(), "rtcam/cam1/state".to_string()])
    }

    #[test]
    fn own_echoes_are_not_overwrites() {
        let t = Instant::now();
        let mut b = book();
        b.published(STATUS, b"online", t);
        assert!(!b.observed(STATUS, b"online", t));
        // Two quick publishes: the older echo arrives after the newer value was noted.
        b.published("rtcam/cam1/state", b"s1", t);
        b.published("rtcam/cam1/state", b"s2", t);
        assert!(!b.observed("rtcam/cam1/state", b"s1", t));
        assert!(!b.observed("rtcam/cam1/state", b"s2", t));
        assert_eq!(b.next_due(), None);
        assert!(!b.observed("rtcam/cam1/other", b"x", t), "not guarded");
    }

    #[test]
    fn a_forged_value_is_republished_at_once_then_at_most_every_interval() {
        let t = Instant::now();
        let mut b = book();
        b.published(STATUS, b"online", t);
        b.observed(STATUS, b"online", t);
        assert!(b.observed(STATUS, b"offline", t));
        assert_eq!(b.next_due(), Some(t));
        assert_eq!(
            b.take_due(t),
            vec![(STATUS.to_string(), b"online".to_vec())]
        );
        // Its echo is ours; a flood of forgeries waits for the interval.
        assert!(!b.observed(STATUS, b"online", t));
        let t1 = t + Duration::from_millis(10);
        assert!(b.observed(STATUS, b"offline", t1));
        assert!(b.observed(STATUS, b"", t1), "a deletion too");
        assert_eq!(b.next_due(), Some(t + HEAL_MIN_INTERVAL));
        assert!(b.take_due(t1).is_empty());
        assert_eq!(b.take_due(t + HEAL_MIN_INTERVAL).len(), 1);
        assert_eq!(b.next_due(), None);
    }

    #[test]
    fn an_old_value_of_ours_replayed_after_its_echo_is_a_forgery() {
        let t = Instant::now();
        let mut b = book();
        b.published("rtcam/cam1/state", b"s1", t);
        b.observed("rtcam/cam1/state", b"s1", t);
        b.published("rtcam/cam1/state", b"s2", t);
        b.observed("rtcam/cam1/state", b"s2", t);
        assert!(b.observed("rtcam/cam1/state", b"s1", t));
        assert_eq!(
            b.take_due(t),
            vec![("rtcam/cam1/state".to_string(), b"s2".to_vec())]
        );
    }

    #[test]
    fn nothing_to_defend_before_the_first_publish_and_lost_echoes_expire() {
        let t = Instant::now();
        let mut b = book();
        assert!(
            !b.observed(STATUS, b"offline", t),
            "retained from an earlier run"
        );
        b.published(STATUS, b"online", t);
        // The echo never came (e.g. a reconnect); much later the old value is a forgery.
        let later = t + ECHO_WAIT + Duration::from_secs(1);
        b.published(STATUS, b"online2", later);
        assert!(b.observed(STATUS, b"online", later + Duration::from_secs(11)));
        // A copy of the current value is harmless.
        let mut b = book();
        b.published(STATUS, b"online", t);
        b.observed(STATUS, b"online", t);
        assert!(!b.observed(STATUS, b"online", t));
    }
}
