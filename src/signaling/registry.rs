//! Pure session registry: which sessions exist, their slots against the limits, and what each inbound message does.

use std::collections::HashMap;
use std::time::Instant;

use crate::protocol::auth::credential::CredentialError;
use crate::protocol::auth::{Grant, ReplayCache, Verifier};
use crate::protocol::limits::MAX_CANDIDATES_PER_SESSION;
use crate::protocol::sdp::{CheckedOffer, SentStream, check_offer_for};
use crate::protocol::signal::{
    ErrorCode, IceCandidate, Limits, Ref, Rejection, ViewerMessage, parse_viewer_message,
};
use crate::protocol::topics::{SessionId, Topics};
use crate::state::SessionCounts;
use crate::viewer::{Admission, SessionKey};

/// Signed mode (docs/protocol.md §9.4): the policy, the replay cache it owns and the topic
/// names the signatures cover.
#[derive(Debug)]
pub(crate) struct SignedInbound {
    pub verifier: Verifier,
    pub replay: ReplayCache,
    pub topics: Topics,
}

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
        admission: Admission,
    },
    /// Give a remote candidate (None: end of candidates) to the live session.
    Candidate {
        key: SessionKey,
        candidate: Option<IceCandidate>,
    },
    /// The viewer said bye: end the session. Its slot stays taken until it reports closed.
    End { key: SessionKey },
    /// The viewer asked for the ICE servers (before its offer): answer with them.
    IceServers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Offer accepted, not connected yet (since when).
    Pending(Instant),
    Connected,
    /// Ending (bye received, evicted or refused); waits for the session to report closed.
    Closing,
}

/// How a session is signaled: MQTT session topics, or WHEP over HTTP (docs/whep.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Mqtt,
    Whep,
}

#[derive(Debug)]
struct Entry {
    key: SessionKey,
    transport: Transport,
    /// WHEP in signed mode: SHA-256 of the bearer credential that opened the session; its
    /// PATCH and DELETE must carry the same one.
    bearer: Option<[u8; 32]>,
    phase: Phase,
    /// Candidate messages received (end-of-candidates included).
    candidates: u32,
    /// Signed mode: the offer's credential; every later message must be signed by its key.
    grant: Option<Grant>,
}

/// Every session the device has, by id, until it reports closed.
#[derive(Debug)]
pub(crate) struct Registry {
    sessions: HashMap<SessionId, Entry>,
    limits: SessionLimits,
    parse_limits: Limits,
    /// `None`: open mode (docs/protocol.md §4 as is).
    signed: Option<SignedInbound>,
    next_key: SessionKey,
}

impl Registry {
    pub fn new(limits: SessionLimits, parse_limits: Limits, signed: Option<SignedInbound>) -> Self {
        Self {
            sessions: HashMap::new(),
            limits,
            parse_limits,
            signed,
            next_key: 1,
        }
    }

    pub fn counts(&self) -> SessionCounts {
        let mut c = SessionCounts::default();
        for e in self.sessions.values() {
            match e.phase {
                Phase::Pending(_) => c.pending += 1,
                Phase::Connected => {
                    c.connected += 1;
                    if e.transport == Transport::Whep {
                        c.whep += 1;
                    }
                }
                Phase::Closing => c.closing += 1,
            }
        }
        c
    }

    /// Sessions that exist in any phase.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Handles a payload that arrived on `<base>/session/<id>/in` at `now` (`now_ms`: the
    /// wall clock, Unix milliseconds, for signed mode's freshness and expiry checks).
    /// `stream`: the H.264 stream rtcam sends (offers are checked against it), `None` while
    /// it is not known yet (the camera's own H.264 before rtcam has read its SPS).
    pub fn on_message(
        &mut self,
        id: &SessionId,
        payload: &[u8],
        stream: Option<SentStream>,
        now: Instant,
        now_ms: u64,
    ) -> Decision {
        let (message, grant, reference) = match self.open(id, payload, now_ms) {
            Ok(opened) => opened,
            Err(r) => return Decision::Reject(r),
        };
        match (
            self.handle(id, message, grant, stream, now, now_ms),
            reference,
        ) {
            // An error about a verified message names it, so its sender knows it is theirs.
            (Decision::Reject(r), Some(sig)) => Decision::Reject(r.about(Ref::Sig(sig))),
            (d, _) => d,
        }
    }

    /// The viewer message in `payload`, the grant of the credential it carried (signed mode,
    /// a message without a live session), and its envelope's `sig`. Open mode: the payload
    /// is the message.
    fn open(
        &mut self,
        id: &SessionId,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<(ViewerMessage, Option<Grant>, Option<String>), Rejection> {
        let Some(signed) = self.signed.as_mut() else {
            return parse_viewer_message(payload, self.parse_limits).map(|m| (m, None, None));
        };
        if payload.len() > self.parse_limits.max_payload_bytes {
            // Refused unread, so its signature is unknown: not the session's own message.
            return parse_viewer_message(payload, self.parse_limits)
                .map_err(|r| r.about(Ref::Unsigned))
                .map(|m| (m, None, None));
        }
        let entry = self.sessions.get(id);
        let topic = signed.topics.session_in(id);
        let verified = signed
            .verifier
            .verify_inbound(
                payload,
                &topic,
                entry.and_then(|e| e.grant.as_ref()),
                now_ms,
                &signed.replay,
            )
            .map_err(Rejection::from)?;
        let reference = verified.opened.reference.clone();
        let message = parse_viewer_message(verified.opened.msg.as_bytes(), self.parse_limits)
            .map_err(|r| r.about(Ref::Sig(reference.clone())))?;
        // A candidate over the session's limit is refused whatever it is: it takes no room
        // in the replay cache, so one session cannot fill it for everyone.
        let over_limit = matches!(message, ViewerMessage::Candidate(_))
            && entry.is_some_and(|e| e.candidates >= MAX_CANDIDATES_PER_SESSION);
        if !over_limit {
            verified
                .remember(&mut signed.replay, now_ms)
                .map_err(Rejection::from)?;
        }
        Ok((message, verified.opened.grant, Some(reference)))
    }

    fn handle(
        &mut self,
        id: &SessionId,
        message: ViewerMessage,
        grant: Option<Grant>,
        stream: Option<SentStream>,
        now: Instant,
        now_ms: u64,
    ) -> Decision {
        match message {
            ViewerMessage::Offer { sdp } => {
                self.on_offer(id, sdp, grant, stream, Transport::Mqtt, now, now_ms)
            }
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
            ViewerMessage::IceServers => Decision::IceServers,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_offer(
        &mut self,
        id: &SessionId,
        sdp: String,
        grant: Option<Grant>,
        stream: Option<SentStream>,
        transport: Transport,
        now: Instant,
        now_ms: u64,
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
        let offer = match check_offer_for(&sdp, &stream, transport == Transport::Whep) {
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
        let admission = match &grant {
            Some(g) => Admission::granted(g, now, now_ms),
            // Signed mode never gets here without a grant: an offer without a live session
            // needs a credential.
            None => Admission::open(),
        };
        let key = self.next_key;
        self.next_key += 1;
        self.sessions.insert(
            id.clone(),
            Entry {
                key,
                transport,
                bearer: None,
                phase: Phase::Pending(now),
                candidates: 0,
                grant,
            },
        );
        Decision::Start {
            key,
            offer,
            evict,
            admission,
        }
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

    /// A WHEP offer (docs/whep.md §2): `bearer` is the `Authorization: Bearer` credential.
    /// Open mode ignores it; signed mode verifies it as the offer's credential (no envelope:
    /// the HTTP request is the channel, so there is no per-message signature or replay check).
    pub fn on_whep_offer(
        &mut self,
        id: &SessionId,
        sdp: String,
        bearer: Option<&str>,
        stream: Option<SentStream>,
        now: Instant,
        now_ms: u64,
    ) -> Decision {
        let grant = match self.whep_grant(bearer, now_ms) {
            Ok(g) => g,
            Err(r) => return Decision::Reject(r),
        };
        let decision = self.on_offer(id, sdp, grant, stream, Transport::Whep, now, now_ms);
        if matches!(decision, Decision::Start { .. })
            && let Some(e) = self.sessions.get_mut(id)
        {
            e.bearer = self
                .signed
                .is_some()
                .then(|| bearer.map(bearer_digest))
                .flatten();
        }
        decision
    }

    /// A WHEP PATCH's candidate or a DELETE's `Bye` for a live WHEP session. Signed mode: the
    /// request must carry the credential that opened the session.
    pub fn on_whep_message(
        &mut self,
        id: &SessionId,
        message: ViewerMessage,
        bearer: Option<&str>,
        now: Instant,
        now_ms: u64,
    ) -> Decision {
        let Some(entry) = self
            .sessions
            .get(id)
            .filter(|e| e.transport == Transport::Whep)
        else {
            return unknown(id);
        };
        if let Some(expected) = entry.bearer {
            let Some(token) = bearer else {
                return Decision::Reject(Rejection::new(
                    ErrorCode::Unauthorized,
                    "this session needs the Authorization: Bearer credential that opened it",
                ));
            };
            if bearer_digest(token) != expected {
                return Decision::Reject(match self.whep_grant(Some(token), now_ms) {
                    Ok(_) => Rejection::new(
                        ErrorCode::Forbidden,
                        "this session was opened with another credential",
                    ),
                    Err(r) => r,
                });
            }
        }
        if matches!(message, ViewerMessage::Offer { .. }) {
            return Decision::Reject(Rejection::new(
                ErrorCode::SessionExists,
                format!("session {id} is already live"),
            ));
        }
        self.handle(id, message, None, None, now, now_ms)
    }

    /// The grant of a WHEP request's bearer credential: `None` in open mode.
    fn whep_grant(&self, bearer: Option<&str>, now_ms: u64) -> Result<Option<Grant>, Rejection> {
        let Some(signed) = self.signed.as_ref() else {
            return Ok(None);
        };
        let Some(token) = bearer else {
            return Err(Rejection::new(
                ErrorCode::Unauthorized,
                "this device runs auth.mode = \"signed\": send Authorization: Bearer <credential>",
            ));
        };
        match signed.verifier.grant(token, now_ms) {
            Ok(g) => Ok(Some(g)),
            Err(e @ CredentialError::WrongDevice { .. }) => Err(Rejection::new(
                ErrorCode::Forbidden,
                format!("credential refused: {e}"),
            )),
            Err(e) => Err(Rejection::new(
                ErrorCode::Unauthorized,
                format!("credential refused: {e}"),
            )),
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

fn bearer_digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
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
            None,
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
            rejected(r.on_message(&sid("a"), &offer(), None, t, 0)),
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
            rejected(r.on_message(&sid("a"), &offer(), high, t, 0)),
            ErrorCode::BadSdp
        );
        assert!(matches!(
            r.on_message(&sid("a"), &offer(), CB, t, 0),
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
        match r.on_message(&sid(id), &offer(), CB, now, 0) {
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
            r.on_message(&sid("a"), &cand(), CB, t, 0),
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
                closing: 0,
                whep: 0
            }
        );
    }

    #[test]
    fn second_offer_for_live_or_closing_session_is_refused() {
        let t = Instant::now();
        let mut r = reg(2, 2);
        let (key, _) = start(&mut r, "a", t);
        assert_eq!(
            rejected(r.on_message(&sid("a"), &offer(), CB, t, 0)),
            ErrorCode::SessionExists
        );
        assert_eq!(
            r.on_message(&sid("a"), &bye(), CB, t, 0),
            Decision::End { key }
        );
        assert_eq!(
            rejected(r.on_message(&sid("a"), &offer(), CB, t, 0)),
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
            r.on_message(&sid("a"), &bye(), CB, t, 0),
            Decision::End { key: a }
        );
        // A second bye, or candidates, for a closing session: unknown.
        assert_eq!(
            rejected(r.on_message(&sid("a"), &bye(), CB, t, 0)),
            ErrorCode::UnknownSession
        );
        assert_eq!(
            rejected(r.on_message(&sid("a"), &cand(), CB, t, 0)),
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
            rejected(r.on_message(&sid("c"), &offer(), CB, t, 0)),
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
                closing: 1,
                whep: 0
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
                closing: 1,
                whep: 0
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
                r.on_message(&sid("a"), &cand(), CB, t, 0),
                Decision::Candidate { .. }
            ));
        }
        for _ in 0..1000 {
            assert_eq!(
                rejected(r.on_message(&sid("a"), &cand(), CB, t, 0)),
                ErrorCode::TooManyCandidates
            );
        }
        assert_eq!(
            r.on_message(&sid("a"), &bye(), CB, t, 0),
            Decision::End { key }
        );
    }

    #[test]
    fn ice_server_requests_open_no_session() {
        let t = Instant::now();
        let mut r = reg(1, 1);
        let ask = msg(json!({"v":1,"type":"ice-servers"}));
        assert_eq!(
            r.on_message(&sid("x"), &ask, CB, t, 0),
            Decision::IceServers
        );
        assert_eq!(r.len(), 0);
        let (key, _) = start(&mut r, "x", t);
        // A live session may ask again (e.g. before an ICE restart); it stays as it is.
        assert_eq!(
            r.on_message(&sid("x"), &ask, CB, t, 0),
            Decision::IceServers
        );
        assert_eq!(
            r.on_message(&sid("x"), &bye(), CB, t, 0),
            Decision::End { key }
        );
    }

    #[test]
    fn unknown_sessions_get_errors() {
        let t = Instant::now();
        let mut r = reg(1, 1);
        assert_eq!(
            rejected(r.on_message(&sid("x"), &cand(), CB, t, 0)),
            ErrorCode::UnknownSession
        );
        assert_eq!(
            rejected(r.on_message(&sid("x"), &bye(), CB, t, 0)),
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
                r.on_message(&sid("a"), &bad, CB, t, 0),
                Decision::Reject(_)
            ));
            assert!(matches!(
                r.on_message(&sid("b"), &bad, CB, t, 0),
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
        r.on_message(&sid("a"), &bye(), CB, t, 0);
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

    #[test]
    fn whep_sessions_share_the_limits_and_stay_apart_from_mqtt_ones() {
        let t = Instant::now();
        let mut r = reg(1, 2);
        let w = sid("whep-a");
        // Open mode: a bearer is ignored.
        let Decision::Start { key, admission, .. } =
            r.on_whep_offer(&w, SDP.into(), Some("anything"), CB, t, 0)
        else {
            panic!("start")
        };
        assert_eq!(admission, Admission::open());
        r.on_connected(&w, key).unwrap();
        assert_eq!(
            r.counts(),
            SessionCounts {
                connected: 1,
                pending: 0,
                closing: 0,
                whep: 1
            }
        );
        // The one viewer slot is taken by WHEP: an MQTT offer is refused, and so is another
        // WHEP offer.
        let m = r.on_message(&sid("m1"), &offer(), CB, t, 0);
        assert!(matches!(m, Decision::Reject(ref x) if x.code == ErrorCode::MaxViewers));
        let w2 = r.on_whep_offer(&sid("whep-b"), SDP.into(), None, CB, t, 0);
        assert!(matches!(w2, Decision::Reject(ref x) if x.code == ErrorCode::MaxViewers));
        // Bad SDP and an unknown profile are refused before a slot is taken.
        let bad = r.on_whep_offer(&sid("whep-c"), "v=0\r\n".into(), None, CB, t, 0);
        assert!(matches!(bad, Decision::Reject(ref x) if x.code == ErrorCode::BadSdp));
        let early = r.on_whep_offer(&sid("whep-c"), SDP.into(), None, None, t, 0);
        assert!(matches!(early, Decision::Reject(ref x) if x.code == ErrorCode::Busy));
        let u = r.on_whep_message(&sid("nope"), ViewerMessage::Bye, None, t, 0);
        assert!(matches!(u, Decision::Reject(ref x) if x.code == ErrorCode::UnknownSession));
        // DELETE ends it; the slot frees when it reports closed.
        assert_eq!(
            r.on_whep_message(&w, ViewerMessage::Bye, None, t, 0),
            Decision::End { key }
        );
        let again = r.on_whep_message(&w, ViewerMessage::Bye, None, t, 0);
        assert!(matches!(again, Decision::Reject(ref x) if x.code == ErrorCode::UnknownSession));
        assert!(r.on_closed(&w, key));
        assert!(matches!(
            r.on_message(&sid("m2"), &offer(), CB, t, 0),
            Decision::Start { .. }
        ));
        // A WHEP request cannot address an MQTT session.
        let x = r.on_whep_message(&sid("m2"), ViewerMessage::Bye, None, t, 0);
        assert!(matches!(x, Decision::Reject(ref e) if e.code == ErrorCode::UnknownSession));
        assert_eq!(r.counts().pending, 1);
    }

    mod signed {
        use super::*;
        use crate::protocol::auth::credential::{Claims, issue};
        use crate::protocol::auth::envelope::seal;
        use crate::protocol::auth::keys::SigningKey;
        use crate::protocol::auth::permissions::{Access, Permission, Rights};

        const NOW_MS: u64 = 1_767_225_600_000;

        fn owner() -> SigningKey {
            SigningKey::from_seed(&[1; 32])
        }
        fn viewer() -> SigningKey {
            SigningKey::from_seed(&[2; 32])
        }
        fn intruder() -> SigningKey {
            SigningKey::from_seed(&[3; 32])
        }

        fn topics() -> Topics {
            Topics::new("rtcam", "cam1")
        }

        fn reg() -> Registry {
            Registry::new(
                SessionLimits {
                    max_viewers: 4,
                    max_pending: 4,
                },
                Limits {
                    max_payload_bytes: 16384,
                    max_sdp_bytes: 4096,
                },
                Some(SignedInbound {
                    verifier: Verifier::new("cam1", [owner().public_key()], [], vec![], 60_000),
                    replay: ReplayCache::new(64, 60_000),
                    topics: topics(),
                }),
            )
        }

        fn credential(key: &SigningKey, device: &str, expires_at_s: u64) -> String {
            let claims = Claims {
                audience: vec![device.into()],
                viewer_key: key.public_key(),
                permission: Permission::View,
                namespaces: vec![],
                issued_at_s: NOW_MS / 1000 - 10,
                expires_at_s,
                not_before_s: None,
                id: "c1".into(),
                subject: Some("alice".into()),
            };
            issue(&owner(), &claims).unwrap()
        }

        fn good_credential(key: &SigningKey) -> String {
            credential(key, "cam1", NOW_MS / 1000 + 3600)
        }

        /// `msg` signed by `key` for session `id` at `ts`, with `cred` if given.
        fn signed(key: &SigningKey, id: &str, ts: u64, msg: &[u8], cred: Option<&str>) -> Vec<u8> {
            let topic = topics().session_in(&sid(id));
            let msg = std::str::from_utf8(msg).unwrap();
            seal(key, &topic, ts, msg, cred).unwrap().into_bytes()
        }

        fn signed_offer(key: &SigningKey, id: &str, ts: u64) -> Vec<u8> {
            signed(key, id, ts, &offer(), Some(&good_credential(key)))
        }

        fn refused(d: Decision) -> Rejection {
            match d {
                Decision::Reject(r) => r,
                other => panic!("expected rejection, got {other:?}"),
            }
        }

        #[test]
        fn an_offer_needs_a_signed_envelope_and_a_credential() {
            let t = Instant::now();
            let mut r = reg();
            let plain = refused(r.on_message(&sid("a"), &offer(), CB, t, NOW_MS));
            assert_eq!(plain.code, ErrorCode::Unauthorized);
            assert_eq!(
                plain.reference,
                Ref::Unsigned,
                "not the viewer's own message"
            );
            let no_cred = signed(&viewer(), "a", NOW_MS, &offer(), None);
            assert_eq!(
                refused(r.on_message(&sid("a"), &no_cred, CB, t, NOW_MS)).code,
                ErrorCode::Unauthorized
            );
            let expired = credential(&viewer(), "cam1", NOW_MS / 1000 - 1);
            let m = signed(&viewer(), "a", NOW_MS, &offer(), Some(&expired));
            assert_eq!(
                refused(r.on_message(&sid("a"), &m, CB, t, NOW_MS)).code,
                ErrorCode::Unauthorized
            );
            let other_device = credential(&viewer(), "cam2", NOW_MS / 1000 + 3600);
            let m = signed(&viewer(), "a", NOW_MS, &offer(), Some(&other_device));
            let e = refused(r.on_message(&sid("a"), &m, CB, t, NOW_MS));
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(
                matches!(e.reference, Ref::Sig(_)),
                "names the refused envelope"
            );
            // Someone else's credential, copied off the broker, signed with another key.
            let m = signed(
                &intruder(),
                "a",
                NOW_MS,
                &offer(),
                Some(&good_credential(&viewer())),
            );
            assert_eq!(
                refused(r.on_message(&sid("a"), &m, CB, t, NOW_MS)).code,
                ErrorCode::Unauthorized
            );
            assert_eq!(r.len(), 0, "no session was created");
        }

        #[test]
        fn ice_servers_go_only_to_holders_of_a_credential() {
            let t = Instant::now();
            let mut r = reg();
            let ask = msg(json!({"v":1,"type":"ice-servers"}));
            let plain = refused(r.on_message(&sid("a"), &ask, CB, t, NOW_MS));
            assert_eq!(plain.code, ErrorCode::Unauthorized);
            let no_cred = signed(&viewer(), "a", NOW_MS, &ask, None);
            assert_eq!(
                refused(r.on_message(&sid("a"), &no_cred, CB, t, NOW_MS)).code,
                ErrorCode::Unauthorized
            );
            let stolen = signed(
                &intruder(),
                "a",
                NOW_MS,
                &ask,
                Some(&good_credential(&viewer())),
            );
            assert_eq!(
                refused(r.on_message(&sid("a"), &stolen, CB, t, NOW_MS)).code,
                ErrorCode::Unauthorized
            );
            let good = signed(
                &viewer(),
                "a",
                NOW_MS,
                &ask,
                Some(&good_credential(&viewer())),
            );
            assert_eq!(
                r.on_message(&sid("a"), &good, CB, t, NOW_MS),
                Decision::IceServers
            );
            assert_eq!(r.len(), 0, "the request opens no session");
            assert_eq!(
                refused(r.on_message(&sid("a"), &good, CB, t, NOW_MS)).code,
                ErrorCode::Replayed
            );
            // The offer that follows carries the credential again, as any first message does.
            assert!(matches!(
                r.on_message(
                    &sid("a"),
                    &signed_offer(&viewer(), "a", NOW_MS + 1),
                    CB,
                    t,
                    NOW_MS + 1
                ),
                Decision::Start { .. }
            ));
        }

        #[test]
        fn an_accepted_offer_binds_the_credential_to_the_session() {
            let t = Instant::now();
            let mut r = reg();
            let Decision::Start { admission, .. } = r.on_message(
                &sid("a"),
                &signed_offer(&viewer(), "a", NOW_MS),
                CB,
                t,
                NOW_MS + 500,
            ) else {
                panic!("offer refused")
            };
            assert_eq!(
                admission.access,
                Access::Granted(Rights::new(Permission::View, &[], &[]))
            );
            assert_eq!(
                admission.expires_at,
                Some(t + Duration::from_millis(3_600_000 - 500))
            );
            assert_eq!(admission.viewer.as_deref(), Some("alice (c1)"));
        }

        #[test]
        fn only_the_session_key_reaches_a_live_session() {
            let t = Instant::now();
            let mut r = reg();
            let offer_msg = signed_offer(&viewer(), "a", NOW_MS);
            let Decision::Start { key, .. } = r.on_message(&sid("a"), &offer_msg, CB, t, NOW_MS)
            else {
                panic!("offer refused")
            };
            // Injected bye, candidate and offer from another key: refused, with their ref.
            let bye_x = signed(&intruder(), "a", NOW_MS + 1, &bye(), None);
            let e = refused(r.on_message(&sid("a"), &bye_x, CB, t, NOW_MS + 2));
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert_eq!(
                e.reference,
                Ref::message(crate::protocol::auth::envelope::sig_reference(&bye_x))
            );
            let cand_x = signed(&intruder(), "a", NOW_MS + 1, &cand(), None);
            assert_eq!(
                refused(r.on_message(&sid("a"), &cand_x, CB, t, NOW_MS + 2)).code,
                ErrorCode::Unauthorized
            );
            let offer_x = signed_offer(&intruder(), "a", NOW_MS + 1);
            assert_eq!(
                refused(r.on_message(&sid("a"), &offer_x, CB, t, NOW_MS + 2)).code,
                ErrorCode::Unauthorized
            );
            let plain_bye = refused(r.on_message(&sid("a"), &bye(), CB, t, NOW_MS + 2));
            assert_eq!(plain_bye.code, ErrorCode::Unauthorized);
            assert_eq!(r.counts().pending, 1, "the session is untouched");
            // The copied offer itself, replayed: refused as a replay (not an error about the
            // viewer's session, which its viewer would have to act on).
            assert_eq!(
                refused(r.on_message(&sid("a"), &offer_msg, CB, t, NOW_MS + 2)).code,
                ErrorCode::Replayed
            );
            // The viewer's own messages go through.
            let c = signed(&viewer(), "a", NOW_MS + 3, &cand(), None);
            assert!(matches!(
                r.on_message(&sid("a"), &c, CB, t, NOW_MS + 4),
                Decision::Candidate { .. }
            ));
            // Its own second offer (no credential): an error naming it, as in open mode.
            let again = signed(&viewer(), "a", NOW_MS + 5, &offer(), None);
            let e = refused(r.on_message(&sid("a"), &again, CB, t, NOW_MS + 5));
            assert_eq!(e.code, ErrorCode::SessionExists);
            assert_eq!(
                e.reference,
                Ref::message(crate::protocol::auth::envelope::sig_reference(&again))
            );
            let b = signed(&viewer(), "a", NOW_MS + 6, &bye(), None);
            assert_eq!(
                r.on_message(&sid("a"), &b, CB, t, NOW_MS + 7),
                Decision::End { key }
            );
            // Replaying the viewer's bye later: the same signed message again.
            assert_eq!(
                refused(r.on_message(&sid("a"), &b, CB, t, NOW_MS + 8)).code,
                ErrorCode::Replayed
            );
        }

        #[test]
        fn a_copied_offer_is_refused_after_the_session_and_elsewhere() {
            let t = Instant::now();
            let mut r = reg();
            let offer_msg = signed_offer(&viewer(), "a", NOW_MS);
            let Decision::Start { key, .. } = r.on_message(&sid("a"), &offer_msg, CB, t, NOW_MS)
            else {
                panic!("offer refused")
            };
            assert!(r.on_closed(&sid("a"), key));
            assert_eq!(
                refused(r.on_message(&sid("a"), &offer_msg, CB, t, NOW_MS + 1000)).code,
                ErrorCode::Replayed
            );
            // On another session's topic the signature does not verify.
            assert_eq!(
                refused(r.on_message(&sid("b"), &offer_msg, CB, t, NOW_MS + 1000)).code,
                ErrorCode::Unauthorized
            );
            // Much later (forgotten by the replay cache) it is stale.
            assert_eq!(
                refused(r.on_message(&sid("a"), &offer_msg, CB, t, NOW_MS + 121_000)).code,
                ErrorCode::Stale
            );
            assert_eq!(r.len(), 0);
        }

        #[test]
        fn errors_about_a_verified_message_name_it() {
            let t = Instant::now();
            let mut r = reg();
            let junk = signed(
                &viewer(),
                "a",
                NOW_MS,
                b"garbage",
                Some(&good_credential(&viewer())),
            );
            let e = refused(r.on_message(&sid("a"), &junk, CB, t, NOW_MS));
            assert_eq!(e.code, ErrorCode::BadJson);
            assert_eq!(
                e.reference,
                Ref::message(crate::protocol::auth::envelope::sig_reference(&junk))
            );
            let stray = signed(
                &viewer(),
                "b",
                NOW_MS,
                &cand(),
                Some(&good_credential(&viewer())),
            );
            let e = refused(r.on_message(&sid("b"), &stray, CB, t, NOW_MS));
            assert_eq!(e.code, ErrorCode::UnknownSession);
            assert!(matches!(e.reference, Ref::Sig(_)));
            // Oversized: refused before anything is parsed.
            let huge = vec![b' '; 16385];
            let e = refused(r.on_message(&sid("a"), &huge, CB, t, NOW_MS));
            assert_eq!(e.code, ErrorCode::PayloadTooLarge);
            assert_eq!(e.reference, Ref::Unsigned);
        }

        #[test]
        fn candidates_over_the_limit_take_no_room_in_the_replay_cache() {
            let t = Instant::now();
            let mut r = reg();
            r.signed.as_mut().unwrap().replay = ReplayCache::new(80, 60_000);
            let Decision::Start { key, .. } = r.on_message(
                &sid("a"),
                &signed_offer(&viewer(), "a", NOW_MS),
                CB,
                t,
                NOW_MS,
            ) else {
                panic!("offer refused")
            };
            for i in 0..u64::from(MAX_CANDIDATES_PER_SESSION) + 500 {
                let c = signed(&viewer(), "a", NOW_MS + 1 + i, &cand(), None);
                let d = r.on_message(&sid("a"), &c, CB, t, NOW_MS + 1 + i);
                if i < u64::from(MAX_CANDIDATES_PER_SESSION) {
                    assert!(matches!(d, Decision::Candidate { .. }), "{i}: {d:?}");
                } else {
                    assert_eq!(refused(d).code, ErrorCode::TooManyCandidates, "{i}");
                }
            }
            let cached = r.signed.as_ref().unwrap().replay.len();
            assert_eq!(cached, 1 + MAX_CANDIDATES_PER_SESSION as usize);
            let b = signed(&viewer(), "a", NOW_MS + 1000, &bye(), None);
            assert_eq!(
                r.on_message(&sid("a"), &b, CB, t, NOW_MS + 1000),
                Decision::End { key }
            );
        }

        #[test]
        fn whep_needs_a_bearer_credential_and_keeps_to_it() {
            let t = Instant::now();
            let mut r = reg();
            let id = sid("whep-1");
            // No bearer, a garbage one, an expired one: unauthorized; another device's: forbidden.
            let no = refused(r.on_whep_offer(&id, SDP.into(), None, CB, t, NOW_MS));
            assert_eq!(no.code, ErrorCode::Unauthorized);
            let bad = refused(r.on_whep_offer(&id, SDP.into(), Some("x.y.z"), CB, t, NOW_MS));
            assert_eq!(bad.code, ErrorCode::Unauthorized);
            let expired = credential(&viewer(), "cam1", NOW_MS / 1000 - 1);
            let e = refused(r.on_whep_offer(&id, SDP.into(), Some(&expired), CB, t, NOW_MS));
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(e.reason.contains("expired"), "{}", e.reason);
            let other = credential(&viewer(), "cam2", NOW_MS / 1000 + 60);
            let f = refused(r.on_whep_offer(&id, SDP.into(), Some(&other), CB, t, NOW_MS));
            assert_eq!(f.code, ErrorCode::Forbidden);
            assert_eq!(r.len(), 0);
            // A valid credential opens the session with its grant.
            let cred = good_credential(&viewer());
            let Decision::Start { key, admission, .. } =
                r.on_whep_offer(&id, SDP.into(), Some(&cred), CB, t, NOW_MS)
            else {
                panic!("start")
            };
            assert_eq!(
                admission.access,
                Access::Granted(Rights::new(Permission::View, &[], &[]))
            );
            // Its PATCH and DELETE need the same credential.
            let c = || ViewerMessage::Candidate(None);
            let u = refused(r.on_whep_message(&id, c(), None, t, NOW_MS));
            assert_eq!(u.code, ErrorCode::Unauthorized);
            let other_cred = good_credential(&intruder());
            let f = refused(r.on_whep_message(&id, c(), Some(&other_cred), t, NOW_MS));
            assert_eq!(f.code, ErrorCode::Forbidden);
            let g = refused(r.on_whep_message(&id, c(), Some("junk"), t, NOW_MS));
            assert_eq!(g.code, ErrorCode::Unauthorized);
            assert_eq!(
                r.on_whep_message(&id, c(), Some(&cred), t, NOW_MS),
                Decision::Candidate {
                    key,
                    candidate: None
                }
            );
            assert_eq!(
                r.on_whep_message(&id, ViewerMessage::Bye, Some(&cred), t, NOW_MS),
                Decision::End { key }
            );
        }
    }
}
