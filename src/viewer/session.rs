//! One viewer session's lifecycle as a pure state machine (docs/protocol.md §4.6): inputs and `now` in, actions and a deadline out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::protocol::signal::{ByeReason, DeviceMessage, ErrorCode, IceCandidate, Rejection};

/// The two session timers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// From the offer to `connected`.
    pub connect: Duration,
    /// How long a connected session may stay `disconnected`.
    pub disconnect: Duration,
}

/// The peer connection's state, as far as the session cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerState {
    Connecting,
    Connected,
    Disconnected,
    Failed,
    Closed,
}

/// What happened, in the order the driver learns it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input {
    /// The offer was applied; this answer SDP goes to the viewer.
    Answered(String),
    /// The offer could not be applied.
    NegotiationFailed(Rejection),
    /// A candidate from the viewer (`None`: end of its candidates).
    RemoteCandidate(Option<IceCandidate>),
    /// The peer connection refused a remote candidate, saying why.
    RemoteCandidateRefused(String),
    /// A candidate of the device's own, to trickle to the viewer.
    LocalCandidate(IceCandidate),
    /// The device has no more candidates.
    GatheringComplete,
    Peer(PeerState),
    /// The registry made this session a viewer (after `ClaimSlot`).
    SlotGranted,
    /// The registry could not (every viewer slot is taken).
    SlotRefused(Rejection),
    /// Media could not start.
    MediaFailed(String),
    /// The viewer said bye.
    ViewerBye,
    /// The registry needed this session's pending slot for a newer offer.
    Evicted,
    /// The device is shutting down.
    Shutdown,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Apply the offer and create the answer; report `Answered` or `NegotiationFailed`.
    ApplyOffer,
    /// Give this viewer candidate to the peer connection.
    AddRemoteCandidate(IceCandidate),
    /// Publish this on the session's `out` topic.
    Send(DeviceMessage),
    /// Ask the registry for a viewer slot; report `SlotGranted` or `SlotRefused`.
    ClaimSlot,
    /// Start sending video.
    StartMedia,
    /// Close the peer connection, free everything, tell the registry. Always the last action.
    Close,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum End {
    /// The viewer said bye: nothing is sent back.
    ViewerBye,
    /// The device ended it and sent `bye` with this reason.
    Bye(ByeReason),
    /// The device refused or failed it and sent this `error`.
    Error(Rejection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the offer to be applied.
    Negotiating,
    /// Answer sent; waiting for `connected`.
    Connecting,
    /// Connected; waiting for the registry's slot.
    Claiming,
    /// Video flows.
    Streaming,
    Ended,
}

/// The lifecycle of one session.
#[derive(Debug)]
pub(crate) struct Session {
    phase: Phase,
    timeouts: Timeouts,
    connect_deadline: Instant,
    /// Signed mode: when the session's credential expires (the session ends then).
    expires_at: Option<Instant>,
    /// Since when a connected session has been `disconnected`.
    disconnected_since: Option<Instant>,
    /// Viewer candidates that arrived before the offer was applied.
    early_remote: Vec<IceCandidate>,
    /// Device candidates found before the answer went out (the answer goes first).
    early_local: Vec<Option<IceCandidate>>,
    actions: VecDeque<Action>,
    end: Option<End>,
    /// The answer went out.
    answered: bool,
}

impl Session {
    /// A session for an offer received at `now`; its first action is `ApplyOffer`. It ends
    /// with `bye` `expired` at `expires_at` (signed mode: its credential's expiry).
    pub fn new(now: Instant, timeouts: Timeouts, expires_at: Option<Instant>) -> Self {
        Self {
            phase: Phase::Negotiating,
            timeouts,
            connect_deadline: now + timeouts.connect,
            expires_at,
            disconnected_since: None,
            early_remote: Vec::new(),
            early_local: Vec::new(),
            actions: VecDeque::from([Action::ApplyOffer]),
            end: None,
            answered: false,
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When `handle_timeout` must run next (None once ended).
    pub fn next_deadline(&self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Negotiating | Phase::Connecting | Phase::Claiming => Some(self.connect_deadline),
            Phase::Streaming => self
                .disconnected_since
                .map(|s| s + self.timeouts.disconnect),
            Phase::Ended => return None,
        };
        match (phase, self.expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How the session ended, once it has.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// True once the viewer has been given its answer (for logs: how far it got).
    pub fn answered(&self) -> bool {
        self.answered
    }

    fn finish(&mut self, end: End) {
        if self.phase == Phase::Ended {
            return;
        }
        match &end {
            End::ViewerBye => {}
            End::Bye(reason) => self
                .actions
                .push_back(Action::Send(DeviceMessage::bye(*reason))),
            End::Error(r) => self
                .actions
                .push_back(Action::Send(DeviceMessage::error(r))),
        }
        self.actions.push_back(Action::Close);
        self.phase = Phase::Ended;
        self.end = Some(end);
        self.early_remote.clear();
        self.early_local.clear();
    }

    /// Runs the timers: the credential's expiry, the connect deadline and the disconnect grace.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase != Phase::Ended && self.expires_at.is_some_and(|at| now >= at) {
            self.finish(End::Bye(ByeReason::Expired));
            return;
        }
        match self.phase {
            Phase::Negotiating | Phase::Connecting | Phase::Claiming
                if now >= self.connect_deadline =>
            {
                self.finish(End::Bye(ByeReason::Timeout));
            }
            Phase::Streaming
                if self
                    .disconnected_since
                    .is_some_and(|s| now >= s + self.timeouts.disconnect) =>
            {
                self.finish(End::Bye(ByeReason::Timeout));
            }
            _ => {}
        }
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        if self.phase == Phase::Ended {
            return; // nothing changes a session that has ended
        }
        // A timer that has expired wins over whatever arrived with it.
        self.handle_timeout(now);
        if self.phase == Phase::Ended {
            return;
        }
        match input {
            Input::Answered(sdp) => {
                if self.phase != Phase::Negotiating {
                    return;
                }
                self.phase = Phase::Connecting;
                self.actions
                    .push_back(Action::Send(DeviceMessage::answer(sdp)));
                for c in std::mem::take(&mut self.early_local) {
                    self.actions
                        .push_back(Action::Send(DeviceMessage::candidate(c)));
                }
                for c in std::mem::take(&mut self.early_remote) {
                    self.actions.push_back(Action::AddRemoteCandidate(c));
                }
            }
            Input::NegotiationFailed(r) => self.finish(End::Error(r)),
            Input::RemoteCandidate(None) => {} // end of the viewer's candidates: nothing to do
            Input::RemoteCandidate(Some(c)) => {
                if self.phase == Phase::Negotiating {
                    self.early_remote.push(c);
                } else {
                    self.actions.push_back(Action::AddRemoteCandidate(c));
                }
            }
            Input::RemoteCandidateRefused(why) => {
                // The session goes on: other candidates may work (docs §4.5, §4.7).
                self.actions
                    .push_back(Action::Send(DeviceMessage::error(&Rejection::new(
                        ErrorCode::BadCandidate,
                        why,
                    ))));
            }
            Input::LocalCandidate(c) => self.local_candidate(Some(c)),
            Input::GatheringComplete => self.local_candidate(None),
            Input::Peer(state) => self.peer(state, now),
            Input::SlotGranted => {
                if self.phase == Phase::Claiming {
                    self.phase = Phase::Streaming;
                    self.actions.push_back(Action::StartMedia);
                }
            }
            Input::SlotRefused(r) => self.finish(End::Error(r)),
            Input::MediaFailed(why) => {
                self.finish(End::Error(Rejection::new(ErrorCode::Internal, why)));
            }
            Input::ViewerBye => self.finish(End::ViewerBye),
            Input::Evicted => self.finish(End::Error(Rejection::new(
                ErrorCode::Busy,
                "too many offers are waiting to connect and this one is the oldest; retry later",
            ))),
            Input::Shutdown => self.finish(End::Bye(ByeReason::Shutdown)),
        }
    }

    fn local_candidate(&mut self, c: Option<IceCandidate>) {
        if self.phase == Phase::Negotiating {
            self.early_local.push(c);
        } else {
            self.actions
                .push_back(Action::Send(DeviceMessage::candidate(c)));
        }
    }

    fn peer(&mut self, state: PeerState, now: Instant) {
        match state {
            PeerState::Connected => {
                self.disconnected_since = None;
                if self.phase == Phase::Connecting {
                    self.phase = Phase::Claiming;
                    self.actions.push_back(Action::ClaimSlot);
                }
            }
            PeerState::Disconnected => {
                if self.phase == Phase::Streaming {
                    self.disconnected_since.get_or_insert(now);
                }
            }
            PeerState::Failed => self.finish(End::Bye(ByeReason::IceFailed)),
            PeerState::Closed => self.finish(End::Bye(ByeReason::Closed)),
            PeerState::Connecting => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        connect: Duration::from_secs(15),
        disconnect: Duration::from_secs(5),
    };

    fn cand(n: u32) -> IceCandidate {
        IceCandidate {
            candidate: format!("candidate:{n} 1 udp 1 127.0.0.1 {n} typ host"),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
            username_fragment: None,
        }
    }

    fn drain(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn sent(actions: &[Action]) -> Vec<serde_json::Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(m) => Some(serde_json::from_slice(&m.to_json()).unwrap()),
                _ => None,
            })
            .collect()
    }

    /// A session driven to Streaming at `t0` (+1 s to connect).
    fn streaming(t0: Instant) -> Session {
        let mut s = Session::new(t0, TIMEOUTS, None);
        assert_eq!(drain(&mut s), vec![Action::ApplyOffer]);
        s.handle(Input::Answered("v=0".into()), t0);
        s.handle(
            Input::Peer(PeerState::Connected),
            t0 + Duration::from_secs(1),
        );
        s.handle(Input::SlotGranted, t0 + Duration::from_secs(1));
        let a = drain(&mut s);
        assert_eq!(a.last(), Some(&Action::StartMedia));
        assert!(a.contains(&Action::ClaimSlot));
        s
    }

    fn ended_with(s: &mut Session) -> (Vec<Action>, End) {
        let a = drain(s);
        assert_eq!(a.last(), Some(&Action::Close), "{a:?}");
        assert_eq!(a.iter().filter(|x| **x == Action::Close).count(), 1);
        assert!(s.is_ended() && s.next_deadline().is_none());
        (a, s.end().cloned().unwrap())
    }

    #[test]
    fn happy_path_answer_then_candidates_then_media() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, TIMEOUTS, None);
        assert_eq!(s.next_deadline(), Some(t0 + TIMEOUTS.connect));
        assert_eq!(drain(&mut s), vec![Action::ApplyOffer]);
        // Device candidates found while the answer was made wait for it.
        s.handle(Input::LocalCandidate(cand(1)), t0);
        assert!(drain(&mut s).is_empty());
        s.handle(Input::Answered("v=0 answer".into()), t0);
        s.handle(Input::GatheringComplete, t0);
        let a = drain(&mut s);
        let msgs = sent(&a);
        assert_eq!(msgs[0]["type"], "answer");
        assert_eq!(msgs[1]["candidate"]["candidate"], cand(1).candidate);
        assert_eq!(msgs[2]["candidate"], serde_json::Value::Null);
        s.handle(Input::Peer(PeerState::Connecting), t0);
        s.handle(
            Input::Peer(PeerState::Connected),
            t0 + Duration::from_millis(200),
        );
        assert_eq!(drain(&mut s), vec![Action::ClaimSlot]);
        s.handle(Input::SlotGranted, t0 + Duration::from_millis(200));
        assert_eq!(drain(&mut s), vec![Action::StartMedia]);
        assert_eq!(s.next_deadline(), None, "no timer while streaming");
    }

    #[test]
    fn candidates_before_the_answer_are_held_then_applied_in_order() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, TIMEOUTS, None);
        drain(&mut s);
        s.handle(Input::RemoteCandidate(Some(cand(1))), t0);
        s.handle(Input::RemoteCandidate(None), t0);
        s.handle(Input::RemoteCandidate(Some(cand(2))), t0);
        assert!(drain(&mut s).is_empty());
        s.handle(Input::Answered("a".into()), t0);
        let a = drain(&mut s);
        assert!(matches!(a[0], Action::Send(DeviceMessage::Answer { .. })));
        assert_eq!(
            &a[1..],
            &[
                Action::AddRemoteCandidate(cand(1)),
                Action::AddRemoteCandidate(cand(2))
            ]
        );
        // After the answer, straight through.
        s.handle(Input::RemoteCandidate(Some(cand(3))), t0);
        assert_eq!(drain(&mut s), vec![Action::AddRemoteCandidate(cand(3))]);
    }

    #[test]
    fn refused_candidate_is_reported_and_the_session_goes_on() {
        let t0 = Instant::now();
        let mut s = streaming(t0);
        s.handle(Input::RemoteCandidateRefused("bad address".into()), t0);
        let msgs = sent(&drain(&mut s));
        assert_eq!(msgs[0]["code"], "bad-candidate");
        assert!(!s.is_ended());
    }

    #[test]
    fn viewer_bye_closes_without_a_reply() {
        let t0 = Instant::now();
        let mut s = streaming(t0);
        s.handle(Input::ViewerBye, t0);
        let (a, end) = ended_with(&mut s);
        assert_eq!(a, vec![Action::Close]);
        assert_eq!(end, End::ViewerBye);
    }

    #[test]
    fn bye_racing_the_offer_sends_no_answer() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, TIMEOUTS, None);
        drain(&mut s);
        s.handle(Input::ViewerBye, t0);
        s.handle(Input::Answered("late".into()), t0);
        s.handle(Input::LocalCandidate(cand(1)), t0);
        let (a, _) = ended_with(&mut s);
        assert!(sent(&a).is_empty(), "{a:?}");
        assert!(!s.answered());
    }

    #[test]
    fn bye_after_many_candidates_still_ends_the_session() {
        let t0 = Instant::now();
        let mut s = streaming(t0);
        for n in 0..200 {
            s.handle(Input::RemoteCandidate(Some(cand(n))), t0);
        }
        s.handle(Input::ViewerBye, t0);
        let a = drain(&mut s);
        assert_eq!(
            a.iter()
                .filter(|x| matches!(x, Action::AddRemoteCandidate(_)))
                .count(),
            200
        );
        assert_eq!(a.last(), Some(&Action::Close));
        assert_eq!(s.end(), Some(&End::ViewerBye));
    }

    #[test]
    fn connect_deadline_sends_bye_timeout() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, TIMEOUTS, None);
        drain(&mut s);
        s.handle(Input::Answered("a".into()), t0);
        drain(&mut s);
        s.handle_timeout(t0 + TIMEOUTS.connect - Duration::from_millis(1));
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(t0 + TIMEOUTS.connect);
        let (a, end) = ended_with(&mut s);
        assert_eq!(
            sent(&a)[0],
            serde_json::json!({"v":1,"type":"bye","reason":"timeout"})
        );
        assert_eq!(end, End::Bye(ByeReason::Timeout));
    }

    #[test]
    fn connect_deadline_also_covers_a_stuck_negotiation_and_slot_claim() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, TIMEOUTS, None);
        drain(&mut s);
        s.handle_timeout(t0 + TIMEOUTS.connect);
        assert_eq!(ended_with(&mut s).1, End::Bye(ByeReason::Timeout));

        let mut s = Session::new(t0, TIMEOUTS, None);
        s.handle(Input::Answered("a".into()), t0);
        s.handle(Input::Peer(PeerState::Connected), t0);
        drain(&mut s);
        // The input that arrives after the deadline does not count: the timer wins.
        s.handle(Input::SlotGranted, t0 + TIMEOUTS.connect);
        assert_eq!(ended_with(&mut s).1, End::Bye(ByeReason::Timeout));
    }

    #[test]
    fn disconnect_grace_then_timeout_or_recovery() {
        let t0 = Instant::now();
        let mut s = streaming(t0);
        let t1 = t0 + Duration::from_secs(10);
        s.handle(Input::Peer(PeerState::Disconnected), t1);
        assert_eq!(s.next_deadline(), Some(t1 + TIMEOUTS.disconnect));
        // Back within the grace: the timer stops, and no second ClaimSlot/StartMedia.
        s.handle(
            Input::Peer(PeerState::Connected),
            t1 + Duration::from_secs(2),
        );
        assert_eq!(s.next_deadline(), None);
        assert!(drain(&mut s).is_empty());
        let t2 = t1 + Duration::from_secs(20);
        s.handle(Input::Peer(PeerState::Disconnected), t2);
        s.handle(
            Input::Peer(PeerState::Disconnected),
            t2 + Duration::from_secs(3),
        );
        s.handle_timeout(t2 + TIMEOUTS.disconnect);
        let (a, end) = ended_with(&mut s);
        assert_eq!(sent(&a)[0]["reason"], "timeout");
        assert_eq!(end, End::Bye(ByeReason::Timeout));
    }

    #[test]
    fn ice_failure_and_close_have_their_bye_reasons() {
        for (state, reason) in [
            (PeerState::Failed, "ice-failed"),
            (PeerState::Closed, "closed"),
        ] {
            let t0 = Instant::now();
            let mut s = streaming(t0);
            s.handle(Input::Peer(state), t0);
            let (a, _) = ended_with(&mut s);
            assert_eq!(sent(&a)[0]["reason"], reason);
            // Failing before connecting is the same.
            let mut s = Session::new(t0, TIMEOUTS, None);
            s.handle(Input::Answered("a".into()), t0);
            drain(&mut s);
            s.handle(Input::Peer(state), t0);
            assert_eq!(sent(&ended_with(&mut s).0)[0]["reason"], reason);
        }
    }

    #[test]
    fn shutdown_sends_bye_shutdown_in_every_phase() {
        let t0 = Instant::now();
        let mut phases = vec![Session::new(t0, TIMEOUTS, None), streaming(t0)];
        let mut connecting = Session::new(t0, TIMEOUTS, None);
        connecting.handle(Input::Answered("a".into()), t0);
        phases.push(connecting);
        for mut s in phases {
            drain(&mut s);
            s.handle(Input::Shutdown, t0);
            let (a, end) = ended_with(&mut s);
            assert_eq!(
                sent(&a),
                vec![serde_json::json!({"v":1,"type":"bye","reason":"shutdown"})]
            );
            assert_eq!(end, End::Bye(ByeReason::Shutdown));
        }
    }

    #[test]
    fn negotiation_failure_slot_refusal_eviction_and_media_failure_send_errors() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, TIMEOUTS, None);
        drain(&mut s);
        s.handle(
            Input::NegotiationFailed(Rejection::new(ErrorCode::BadSdp, "no H.264")),
            t0,
        );
        assert_eq!(sent(&ended_with(&mut s).0)[0]["code"], "bad-sdp");

        let mut s = Session::new(t0, TIMEOUTS, None);
        s.handle(Input::Answered("a".into()), t0);
        s.handle(Input::Peer(PeerState::Connected), t0);
        drain(&mut s);
        s.handle(
            Input::SlotRefused(Rejection::new(ErrorCode::MaxViewers, "full")),
            t0,
        );
        assert_eq!(sent(&ended_with(&mut s).0)[0]["code"], "max-viewers");

        let mut s = Session::new(t0, TIMEOUTS, None);
        drain(&mut s);
        s.handle(Input::Evicted, t0);
        assert_eq!(sent(&ended_with(&mut s).0)[0]["code"], "busy");

        let mut s = streaming(t0);
        s.handle(Input::MediaFailed("pipeline gone".into()), t0);
        assert_eq!(sent(&ended_with(&mut s).0)[0]["code"], "internal");
    }

    #[test]
    fn nothing_happens_after_the_end() {
        let t0 = Instant::now();
        let mut s = streaming(t0);
        s.handle(Input::ViewerBye, t0);
        drain(&mut s);
        for input in [
            Input::Shutdown,
            Input::Peer(PeerState::Failed),
            Input::RemoteCandidate(Some(cand(1))),
            Input::LocalCandidate(cand(2)),
            Input::SlotGranted,
            Input::ViewerBye,
        ] {
            s.handle(input, t0);
        }
        s.handle_timeout(t0 + Duration::from_secs(3600));
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.end(), Some(&End::ViewerBye));
    }

    #[test]
    fn out_of_order_inputs_are_ignored() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, TIMEOUTS, None);
        drain(&mut s);
        // Connected or a slot before the answer: not acted on.
        s.handle(Input::Peer(PeerState::Connected), t0);
        s.handle(Input::SlotGranted, t0);
        assert!(drain(&mut s).is_empty());
        s.handle(Input::Answered("a".into()), t0);
        s.handle(Input::Answered("twice".into()), t0);
        assert_eq!(sent(&drain(&mut s)).len(), 1);
    }

    #[test]
    fn the_credential_expiry_ends_the_session_with_bye_expired() {
        let t0 = Instant::now();
        let expiry = t0 + Duration::from_secs(60);
        let mut s = Session::new(t0, TIMEOUTS, Some(expiry));
        s.handle(Input::Answered("a".into()), t0);
        s.handle(Input::Peer(PeerState::Connected), t0);
        s.handle(Input::SlotGranted, t0);
        drain(&mut s);
        assert_eq!(
            s.next_deadline(),
            Some(expiry),
            "streaming: only the expiry is left"
        );
        s.handle_timeout(expiry - Duration::from_millis(1));
        assert!(drain(&mut s).is_empty());
        // A disconnect grace that would end later does not postpone it.
        s.handle(
            Input::Peer(PeerState::Disconnected),
            expiry - Duration::from_secs(1),
        );
        assert_eq!(s.next_deadline(), Some(expiry));
        s.handle_timeout(expiry);
        let (a, end) = ended_with(&mut s);
        assert_eq!(
            sent(&a),
            vec![serde_json::json!({"v":1,"type":"bye","reason":"expired"})]
        );
        assert_eq!(end, End::Bye(ByeReason::Expired));
    }

    #[test]
    fn an_expiry_before_the_connect_deadline_wins_and_inputs_after_it_do_not_count() {
        let t0 = Instant::now();
        let expiry = t0 + Duration::from_secs(2);
        let mut s = Session::new(t0, TIMEOUTS, Some(expiry));
        assert_eq!(s.next_deadline(), Some(expiry));
        drain(&mut s);
        s.handle(Input::Answered("a".into()), expiry);
        let (a, end) = ended_with(&mut s);
        assert_eq!(
            sent(&a)[0]["reason"],
            "expired",
            "no answer after the expiry"
        );
        assert_eq!(end, End::Bye(ByeReason::Expired));
    }
}
