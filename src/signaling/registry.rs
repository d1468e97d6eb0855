//! Pure session registry: which sessions exist, their slots against the limits, and what each inbound message does.

use std::collections::HashMap;
use std::time::Instant;

use crate::protocol::limits::MAX_CANDIDATES_PER_SESSION;
use crate::protocol::sdp::{CheckedOffer, SentStream, check_offer};
use crate::protocol::signal::{
    ErrorCode, IceCandidate, Limits, Rejection, ViewerMessage, parse_viewer_message,
};
use crate::protocol::topics::SessionId;
use crate::state::SessionCounts;
use crate::viewer::SessionKey;

/// How many sessions of each kind may exist.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    /// Sessions whose peer connection is connected (viewers receiving video).
    pub max_viewers: usize,
    /// Sessions between their offer and `connected`. Separate from `max_viewers`, so offers
    /// that never connect cannot lock real viewers out.
    pub max_pending: usize,
}

/// What the caller must do with one inbound message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Send this error on the session's `out` topic; nothing else changes.
    Reject(Rejection),
    /// Start a new viewer session with this offer. When `evict` is set, the oldest pending
    /// session had to make room: end it with a `busy` error.
    Start {
        key: SessionKey,
        offer: CheckedOffer,
        evict: Option<(SessionId, SessionKey)>,
    },
    /// Give a remote candidate (None: end of candidates) to the live session.
    Candidate {
        key: SessionKey,
        candidate: Option<IceCandidate>,
    },
    /// The viewer said bye: end the session. Its slot stays taken until it reports closed.
    End { key: SessionKey },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Offer accepted, not connected yet (since when).
    Pending(Instant),
    Connected,
    /// Ending (bye received, evicted or refused); waits for the session to report closed.
    Closing,
}

#[derive(Debug)]
struct Entry {
    key: SessionKey,
    phase: Phase,
    /// Candidate messages received (end-of-candidates included).
    candidates: u32,
}

/// Every session the device has, by id, until it reports closed.
#[derive(Debug)]
pub(crate) struct Registry {
    sessions: HashMap<SessionId, Entry>,
    limits: SessionLimits,
    parse_limits: Limits,
    next_key: SessionKey,
}

impl Registry {
    pub fn new(limits: SessionLimits, parse_limits: Limits) -> Self {
        Self {
            sessions: HashMap::new(),
            limits,
            parse_limits,
            next_key: 1,
        }
    }

    pub fn counts(&self) -> SessionCounts {
        let mut c = SessionCounts::default();
        for e in self.sessions.values() {
            match e.phase {
                Phase::Pending(_) => c.pending += 1,
                Phase::Connected => c.connected += 1,
                Phase::Closing => c.closing += 1,
            }
        }
        c
    }

    /// Sessions that exist in any phase.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Handles a payload that arrived on `<base>/session/<id>/in`. `stream`: the H.264 stream
    /// rtcam sends (offers are checked against it), `None` while it is not known yet (the
    /// camera's own H.264 before rtcam has read its SPS).
    pub fn on_message(
        &mut self,
        id: &SessionId,
        payload: &[u8],
        stream: Option<SentStream>,
        now: Instant,
    ) -> Decision {
        let message = match parse_viewer_message(payload, self.parse_limits) {
            Ok(m) => m,
            Err(r) => return Decision::Reject(r),
        };
        match message {
            ViewerMessage::Offer { sdp } => self.on_offer(id, sdp, stream, now),
            ViewerMessage::Candidate(candidate) => {
                let Some(entry) = self
                    .sessions
                    .get_mut(id)
                    .filter(|e| e.phase != Phase::Closing)
                else {
                    return unknown(id);
                };
                if entry.candidates >= MAX_CANDIDATES_PER_SESSION {
                    return Decision::Reject(Rejection::new(
                        ErrorCode::TooManyCandidates,
                        format!(
                            "session {id} already sent {MAX_CANDIDATES_PER_SESSION} candidates; more are refused"
                        ),
                    ));
                }
                entry.candidates += 1;
                Decision::Candidate {
                    key: entry.key,
                    candidate,
                }
            }
            ViewerMessage::Bye => {
                let Some(entry) = self
                    .sessions
                    .get_mut(id)
                    .filter(|e| e.phase != Phase::Closing)
                else {
                    return unknown(id);
                };
                entry.phase = Phase::Closing;
                Decision::End { key: entry.key }
            }
        }
    }

    fn on_offer(
        &mut self,
        id: &SessionId,
        sdp: String,
        stream: Option<SentStream>,
        now: Instant,
    ) -> Decision {
        if let Some(e) = self.sessions.get(id) {
            let why = if e.phase == Phase::Closing {
                format!("session {id} is still closing; pick a new session id for a new offer")
            } else {
                format!("session {id} is already live; pick a new session id for a new offer")
            };
            return Decision::Reject(Rejection::new(ErrorCode::SessionExists, why));
        }
        let Some(stream) = stream else {
            return Decision::Reject(Rejection::new(
                ErrorCode::Busy,
                "the camera's H.264 profile is not known yet (rtcam reads it from the camera's first SPS); retry in a moment",
            ));
        };
        let offer = match check_offer(&sdp, &stream) {
            Ok(o) => o,
            Err(r) => return Decision::Reject(r),
        };
        let counts = self.counts();
        if counts.connected as usize >= self.limits.max_viewers {
            return Decision::Reject(Rejection::new(
                ErrorCode::MaxViewers,
                format!(
                    "{} viewers already connected (webrtc.max_viewers = {})",
                    counts.connected, self.limits.max_viewers
                ),
            ));
        }
        let mut evict = None;
        if counts.pending as usize >= self.limits.max_pending {
            // The oldest offer still waiting to connect makes room: a real viewer connects
            // within a second, so only offers that never connect are ever this old.
            let oldest = self
                .sessions
                .iter()
                .filter_map(|(sid, e)| match e.phase {
                    Phase::Pending(since) => Some((since, e.key, sid)),
                    _ => None,
                })
                .min()
                .map(|(_, key, sid)| (sid.clone(), key));
            if let Some((sid, key)) = oldest {
                if let Some(e) = self.sessions.get_mut(&sid) {
                    e.phase = Phase::Closing;
                }
                evict = Some((sid, key));
            }
        }
        let key = self.next_key;
        self.next_key += 1;
        self.sessions.insert(
            id.clone(),
            Entry {
                key,
                phase: Phase::Pending(now),
                candidates: 0,
            },
        );
        Decision::Start { key, offer, evict }
    }

    /// The session's peer connection connected: it becomes a viewer if a slot is free, else
    /// it must end with the returned `max-viewers` error (it is then closing).
    pub fn on_connected(&mut self, id: &SessionId, key: SessionKey) -> Result<(), Rejection> {
        let connected = self.counts().connected as usize;
        let Some(e) = self.sessions.get_mut(id).filter(|e| e.key == key) else {
            return Err(Rejection::new(
                ErrorCode::Internal,
                format!("session {id} is not registered"),
            ));
        };
        match e.phase {
            Phase::Connected => Ok(()),
            Phase::Closing => Err(Rejection::new(
                ErrorCode::Internal,
                format!("session {id} is closing"),
            )),
            Phase::Pending(_) if connected >= self.limits.max_viewers => {
                e.phase = Phase::Closing;
                Err(Rejection::new(
                    ErrorCode::MaxViewers,
                    format!(
                        "{connected} viewers connected first (webrtc.max_viewers = {})",
                        self.limits.max_viewers
                    ),
                ))
            }
            Phase::Pending(_) => {
                e.phase = Phase::Connected;
                Ok(())
            }
        }
    }

    /// The session ended on its own (timeout, ICE failure, error): no more input for it.
    pub fn on_ending(&mut self, id: &SessionId, key: SessionKey) {
        if let Some(e) = self.sessions.get_mut(id).filter(|e| e.key == key) {
            e.phase = Phase::Closing;
        }
    }

    /// The session's peer connection is closed and its resources are freed: its slot is
    /// free again. Ignores stale keys, so a late notice about an old session never removes
    /// a newer one with the same id. True when a session was removed.
    pub fn on_closed(&mut self, id: &SessionId, key: SessionKey) -> bool {
        if self.sessions.get(id).is_some_and(|e| e.key == key) {
            self.sessions.remove(id);
            true
        } else {
            false
        }
    }

    /// Marks every session closing, for shutdown; returns how many there are.
    pub fn close_all(&mut self) -> usize {
        for e in self.sessions.values_mut() {
            e.phase = Phase::Closing;
        }
        self.sessions.len()
    }
}

fn unknown(id: &SessionId) -> Decision {
    Decision::Reject(Rejection::new(
        ErrorCode::UnknownSession,
        format!("no live session {id}; send an offer first"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn reg(max_viewers: usize, max_pending: usize) -> Registry {
        Registry::new(
            SessionLimits {
                max_viewers,
                max_pending,
            },
            Limits {
                max_payload_bytes: 4096,
                max_sdp_bytes: 1024,
            },
        )
    }

    fn sid(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    fn msg(v: serde_json::Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    const SDP: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 100\r\na=mid:0\r\na=recvonly\r\na=rtpmap:100 H264/90000\r\na=fmtp:100 packetization-mode=1;profile-level-id=42e01f\r\n";

    fn offer() -> Vec<u8> {
        msg(json!({"v":1,"type":"offer","sdp":SDP}))
    }

    /// What openh264 sends at 720p30.
    const CB: Option<SentStream> = Some(SentStream::constrained_baseline(0x1f));

    #[test]
    fn offers_wait_until_the_stream_is_known_and_are_checked_against_it() {
        let mut r = reg(4, 8);
        let t = Instant::now();
        assert_eq!(
            rejected(r.on_message(&sid("a"), &offer(), None, t)),
            ErrorCode::Busy,
            "the camera's own H.264 before its SPS was read"
        );
        assert_eq!(r.len(), 0);
        // The offer names Constrained Baseline only: a High camera is refused with bad-sdp.
        let high = Some(SentStream {
            profile_idc: 0x64,
            constraints: 0,
            level_idc: 0x28,
        });
        assert_eq!(
            rejected(r.on_message(&sid("a"), &offer(), high, t)),
            ErrorCode::BadSdp
        );
        assert!(matches!(
            r.on_message(&sid("a"), &offer(), CB, t),
            Decision::Start { .. }
        ));
    }

    fn cand() -> Vec<u8> {
        msg(json!({"v":1,"type":"candidate","candidate":null}))
    }

    fn bye() -> Vec<u8> {
        msg(json!({"v":1,"type":"bye"}))
    }

    fn rejected(d: Decision) -> ErrorCode {
        match d {
            Decision::Reject(r) => r.code,
            other => panic!("expected rejection, got {other:?}"),
        }
    }

    fn start(
        r: &mut Registry,
        id: &str,
        now: Instant,
    ) -> (SessionKey, Option<(SessionId, SessionKey)>) {
        match r.on_message(&sid(id), &offer(), CB, now) {
            Decision::Start { key, evict, .. } => (key, evict),
            other => panic!("expected start, got {other:?}"),
        }
    }

    #[test]
    fn offer_starts_a_session_and_candidates_reach_it() {
        let t = Instant::now();
        let mut r = reg(2, 2);
        let (key, evict) = start(&mut r, "a", t);
        assert_eq!(evict, None);
        assert_eq!(
            r.on_message(&sid("a"), &cand(), CB, t),
            Decision::Candidate {
                key,
                candidate: None
            }
        );
        assert_eq!(
            r.counts(),
            SessionCounts {
                connected: 0,
                pending: 1,
                closing: 0
            }
        );
    }

    #[test]
    fn second_offer_for_live_or_closing_session_is_refused() {
        let t = Instant::now();
        let mut r = reg(2, 2);
        let (key, _) = start(&mut r, "a", t);
        assert_eq!(
            rejected(r.on_message(&sid("a"), &offer(), CB, t)),
            ErrorCode::SessionExists
        );
        assert_eq!(
            r.on_message(&sid("a"), &bye(), CB, t),
            Decision::End { key }
        );
        assert_eq!(
            rejected(r.on_message(&sid("a"), &offer(), CB, t)),
            ErrorCode::SessionExists
        );
        assert!(r.on_closed(&sid("a"), key));
        start(&mut r, "a", t);
    }

    #[test]
    fn bye_keeps_the_slot_until_the_session_is_closed() {
        let t = Instant::now();
        let mut r = reg(1, 4);
        let (a, _) = start(&mut r, "a", t);
        r.on_connected(&sid("a"), a).unwrap();
        assert_eq!(
            r.on_message(&sid("a"), &bye(), CB, t),
            Decision::End { key: a }
        );
        // A second bye, or candidates, for a closing session: unknown.
        assert_eq!(
            rejected(r.on_message(&sid("a"), &bye(), CB, t)),
            ErrorCode::UnknownSession
        );
        assert_eq!(
            rejected(r.on_message(&sid("a"), &cand(), CB, t)),
            ErrorCode::UnknownSession
        );
        // Another viewer may negotiate, but cannot become a viewer before "a" is closed...
        let (b, _) = start(&mut r, "b", t);
        assert_eq!(r.counts().closing, 1);
        assert!(r.on_closed(&sid("a"), a));
        // ... and can once it is.
        assert_eq!(r.on_connected(&sid("b"), b), Ok(()));
        assert_eq!(r.counts().connected, 1);
    }

    #[test]
    fn max_viewers_refuses_offers_and_late_connections() {
        let t = Instant::now();
        let mut r = reg(1, 4);
        let (a, _) = start(&mut r, "a", t);
        let (b, _) = start(&mut r, "b", t);
        assert_eq!(r.on_connected(&sid("a"), a), Ok(()));
        assert_eq!(
            rejected(r.on_message(&sid("c"), &offer(), CB, t)),
            ErrorCode::MaxViewers
        );
        // "b" negotiated in parallel and connects second: refused, closing.
        assert_eq!(
            r.on_connected(&sid("b"), b).unwrap_err().code,
            ErrorCode::MaxViewers
        );
        assert_eq!(
            r.counts(),
            SessionCounts {
                connected: 1,
                pending: 0,
                closing: 1
            }
        );
        assert!(r.on_closed(&sid("b"), b));
        assert!(r.on_closed(&sid("a"), a));
        start(&mut r, "c", t);
    }

    #[test]
    fn pending_offers_are_capped_and_the_oldest_makes_room() {
        let t = Instant::now();
        let mut r = reg(4, 3);
        let keys: Vec<_> = (0..3)
            .map(|i| start(&mut r, &format!("junk{i}"), t + Duration::from_millis(i)).0)
            .collect();
        let (real, evict) = start(&mut r, "real", t + Duration::from_secs(1));
        assert_eq!(evict, Some((sid("junk0"), keys[0])));
        assert_eq!(
            r.counts(),
            SessionCounts {
                connected: 0,
                pending: 3,
                closing: 1
            }
        );
        assert_eq!(r.on_connected(&sid("real"), real), Ok(()));
        // An evicted session connecting late is not a viewer.
        assert!(r.on_connected(&sid("junk0"), keys[0]).is_err());
    }

    #[test]
    fn candidates_are_bounded_per_session_and_bye_still_works() {
        let t = Instant::now();
        let mut r = reg(2, 2);
        let (key, _) = start(&mut r, "a", t);
        for _ in 0..MAX_CANDIDATES_PER_SESSION {
            assert!(matches!(
                r.on_message(&sid("a"), &cand(), CB, t),
                Decision::Candidate { .. }
            ));
        }
        for _ in 0..1000 {
            assert_eq!(
                rejected(r.on_message(&sid("a"), &cand(), CB, t)),
                ErrorCode::TooManyCandidates
            );
        }
        assert_eq!(
            r.on_message(&sid("a"), &bye(), CB, t),
            Decision::End { key }
        );
    }

    #[test]
    fn unknown_sessions_get_errors() {
        let t = Instant::now();
        let mut r = reg(1, 1);
        assert_eq!(
            rejected(r.on_message(&sid("x"), &cand(), CB, t)),
            ErrorCode::UnknownSession
        );
        assert_eq!(
            rejected(r.on_message(&sid("x"), &bye(), CB, t)),
            ErrorCode::UnknownSession
        );
    }

    #[test]
    fn malformed_messages_never_touch_sessions() {
        let t = Instant::now();
        let mut r = reg(4, 4);
        let (key, _) = start(&mut r, "a", t);
        for bad in [
            b"garbage".to_vec(),
            msg(json!({"v":2,"type":"offer","sdp":"x"})),
            msg(json!({"v":1,"type":"offer","sdp":"x".repeat(2000)})),
            msg(json!({"v":1,"type":"dance"})),
            msg(json!({"v":1,"type":"offer","sdp":"v=0\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\n"})),
        ] {
            assert!(matches!(
                r.on_message(&sid("a"), &bad, CB, t),
                Decision::Reject(_)
            ));
            assert!(matches!(
                r.on_message(&sid("b"), &bad, CB, t),
                Decision::Reject(_)
            ));
        }
        assert_eq!(r.len(), 1);
        assert!(r.on_closed(&sid("a"), key));
    }

    #[test]
    fn stale_notices_are_ignored() {
        let t = Instant::now();
        let mut r = reg(2, 2);
        let (old, _) = start(&mut r, "a", t);
        r.on_message(&sid("a"), &bye(), CB, t);
        assert!(r.on_closed(&sid("a"), old));
        let (new, _) = start(&mut r, "a", t);
        assert_ne!(old, new);
        assert!(!r.on_closed(&sid("a"), old));
        r.on_ending(&sid("a"), old);
        assert!(r.on_connected(&sid("a"), old).is_err());
        assert_eq!(r.counts().pending, 1);
        assert_eq!(r.close_all(), 1);
        assert_eq!(r.counts().closing, 1);
    }
}
