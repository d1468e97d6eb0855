//! Pure session registry: decides what each inbound signaling message does (start, forward, reject).

use std::collections::HashMap;

use crate::protocol::signal::{
    ErrorCode, IceCandidate, Limits, Rejection, ViewerMessage, parse_viewer_message,
};
use crate::protocol::topics::SessionId;

/// Numeric identity of one session instance (a reused session id gets a new one).
pub type SessionKey = u64;

/// What the caller must do with one inbound message.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send this error on the session's `out` topic; nothing else changes.
    Reject(Rejection),
    /// Start a new viewer session with this offer.
    Start { key: SessionKey, sdp: String },
    /// Give a remote candidate (None: end of candidates) to the live session.
    Candidate {
        key: SessionKey,
        candidate: Option<IceCandidate>,
    },
    /// The viewer said bye: end the live session.
    End { key: SessionKey },
}

/// Live sessions by id, bounded by `max_viewers`.
#[derive(Debug)]
pub struct Registry {
    live: HashMap<SessionId, SessionKey>,
    max_viewers: usize,
    limits: Limits,
    next_key: SessionKey,
}

impl Registry {
    pub fn new(max_viewers: usize, limits: Limits) -> Self {
        Self {
            live: HashMap::new(),
            max_viewers,
            limits,
            next_key: 1,
        }
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Handles a payload that arrived on `<base>/session/<id>/in`.
    pub fn on_message(&mut self, id: &SessionId, payload: &[u8]) -> Decision {
        let message = match parse_viewer_message(payload, self.limits) {
            Ok(m) => m,
            Err(r) => return Decision::Reject(r),
        };
        let live = self.live.get(id).copied();
        match (message, live) {
            (ViewerMessage::Offer { .. }, Some(_)) => Decision::Reject(Rejection::new(
                ErrorCode::SessionExists,
                format!("session {id} is already live; pick a new session id for a new offer"),
            )),
            (ViewerMessage::Offer { sdp }, None) => {
                if self.live.len() >= self.max_viewers {
                    return Decision::Reject(Rejection::new(
                        ErrorCode::MaxViewers,
                        format!(
                            "{} viewers already connected (webrtc.max_viewers = {})",
                            self.live.len(),
                            self.max_viewers
                        ),
                    ));
                }
                let key = self.next_key;
                self.next_key += 1;
                self.live.insert(id.clone(), key);
                Decision::Start { key, sdp }
            }
            (ViewerMessage::Candidate(candidate), Some(key)) => {
                Decision::Candidate { key, candidate }
            }
            (ViewerMessage::Bye, Some(key)) => {
                self.live.remove(id);
                Decision::End { key }
            }
            (ViewerMessage::Candidate(_) | ViewerMessage::Bye, None) => {
                Decision::Reject(Rejection::new(
                    ErrorCode::UnknownSession,
                    format!("no live session {id}; send an offer first"),
                ))
            }
        }
    }

    /// A session ended on its own (ICE failure, timeout, error). Ignores stale keys, so a
    /// late notice about an old session never removes a newer one with the same id.
    pub fn on_ended(&mut self, id: &SessionId, key: SessionKey) -> bool {
        if self.live.get(id) == Some(&key) {
            self.live.remove(id);
            true
        } else {
            false
        }
    }

    /// Every live session, for shutdown.
    pub fn drain(&mut self) -> Vec<(SessionId, SessionKey)> {
        self.live.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reg(max: usize) -> Registry {
        Registry::new(
            max,
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

    fn offer() -> Vec<u8> {
        msg(json!({"v":1,"type":"offer","sdp":"v=0"}))
    }

    fn rejected(d: Decision) -> ErrorCode {
        match d {
            Decision::Reject(r) => r.code,
            other => panic!("expected rejection, got {other:?}"),
        }
    }

    #[test]
    fn offer_starts_a_session_and_candidates_reach_it() {
        let mut r = reg(2);
        let Decision::Start { key, sdp } = r.on_message(&sid("a"), &offer()) else {
            panic!()
        };
        assert_eq!(sdp, "v=0");
        let d = r.on_message(
            &sid("a"),
            &msg(json!({"v":1,"type":"candidate","candidate":null})),
        );
        assert_eq!(
            d,
            Decision::Candidate {
                key,
                candidate: None
            }
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn second_offer_for_live_session_is_rejected_and_session_survives() {
        let mut r = reg(2);
        let Decision::Start { key, .. } = r.on_message(&sid("a"), &offer()) else {
            panic!()
        };
        assert_eq!(
            rejected(r.on_message(&sid("a"), &offer())),
            ErrorCode::SessionExists
        );
        assert_eq!(
            r.on_message(&sid("a"), &msg(json!({"v":1,"type":"bye"}))),
            Decision::End { key }
        );
        assert!(r.is_empty());
    }

    #[test]
    fn max_viewers_is_enforced_and_frees_up() {
        let mut r = reg(1);
        let Decision::Start { key, .. } = r.on_message(&sid("a"), &offer()) else {
            panic!()
        };
        assert_eq!(
            rejected(r.on_message(&sid("b"), &offer())),
            ErrorCode::MaxViewers
        );
        assert!(r.on_ended(&sid("a"), key));
        assert!(matches!(
            r.on_message(&sid("b"), &offer()),
            Decision::Start { .. }
        ));
    }

    #[test]
    fn unknown_sessions_get_errors() {
        let mut r = reg(1);
        let cand = msg(json!({"v":1,"type":"candidate","candidate":null}));
        assert_eq!(
            rejected(r.on_message(&sid("x"), &cand)),
            ErrorCode::UnknownSession
        );
        let bye = msg(json!({"v":1,"type":"bye"}));
        assert_eq!(
            rejected(r.on_message(&sid("x"), &bye)),
            ErrorCode::UnknownSession
        );
    }

    #[test]
    fn malformed_messages_never_touch_live_sessions() {
        let mut r = reg(4);
        let Decision::Start { key, .. } = r.on_message(&sid("a"), &offer()) else {
            panic!()
        };
        for bad in [
            b"garbage".to_vec(),
            msg(json!({"v":2,"type":"offer","sdp":"x"})),
            msg(json!({"v":1,"type":"offer","sdp":"x".repeat(2000)})),
            msg(json!({"v":1,"type":"dance"})),
        ] {
            assert!(matches!(r.on_message(&sid("a"), &bad), Decision::Reject(_)));
            assert!(matches!(r.on_message(&sid("b"), &bad), Decision::Reject(_)));
        }
        assert_eq!(r.len(), 1);
        assert!(r.on_ended(&sid("a"), key));
    }

    #[test]
    fn stale_end_notices_are_ignored() {
        let mut r = reg(2);
        let Decision::Start { key: old, .. } = r.on_message(&sid("a"), &offer()) else {
            panic!()
        };
        r.on_message(&sid("a"), &msg(json!({"v":1,"type":"bye"})));
        let Decision::Start { key: new, .. } = r.on_message(&sid("a"), &offer()) else {
            panic!()
        };
        assert_ne!(old, new);
        assert!(!r.on_ended(&sid("a"), old));
        assert_eq!(r.len(), 1);
        assert_eq!(r.drain(), vec![(sid("a"), new)]);
    }
}
