//! One WebRTC viewer session: the async driver that moves inputs and actions between the pure `session` and webrtc-rs.

pub(crate) mod bandwidth;
pub(crate) mod datachannel;
pub(crate) mod feedback_trace;
pub(crate) mod ice_socket;
pub(crate) mod layers;
pub(crate) mod link;
#[cfg(test)]
pub(crate) mod linksim;
pub(crate) mod media;
pub(crate) mod peer;
pub(crate) mod probe;
pub(crate) mod session;

pub use peer::h264_codec;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use webrtc::peer_connection::{
    PeerConnection, RTCIceCandidateInit, RTCPeerConnectionState, RTCSessionDescription,
};

use crate::control::Controller;
use crate::media::pipeline::PipelineHandle;
use crate::outbound::SignalOut;
use crate::protocol::auth::Grant;
use crate::protocol::auth::permissions::Access;
use crate::protocol::limits::MAX_CANDIDATES_PER_SESSION;
use crate::protocol::sdp::{CheckedOffer, answer_carries_probes, answer_for_viewer, check_answer};
use crate::protocol::signal::{ErrorCode, IceCandidate, Rejection};
use crate::protocol::topics::SessionId;
use link::Link;
use media::{Adaptive, VideoSender};
use peer::{PcEvent, WebrtcSettings};
use session::{Action, End, Input, PeerState, Session};

/// What an accepted offer's credential grants the new session.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Admission {
    /// What the session may do on its data channel.
    pub access: Access,
    /// When the credential expires: the session ends then (None in open mode).
    pub expires_at: Option<Instant>,
    /// Who, for logs: the credential's `sub` and `jti`.
    pub viewer: Option<String>,
}

impl Admission {
    /// Open mode: anyone, for as long as they like.
    pub fn open() -> Self {
        Self {
            access: Access::Open,
            expires_at: None,
            viewer: None,
        }
    }

    /// A verified credential's grant, received at `now` (`now_ms` on the wall clock).
    pub fn granted(grant: &Grant, now: Instant, now_ms: u64) -> Self {
        let left = grant.expires_at_ms().saturating_sub(now_ms);
        Self {
            access: Access::Granted(grant.rights.clone()),
            expires_at: Some(now + Duration::from_millis(left)),
            viewer: Some(match &grant.subject {
                Some(sub) => format!("{sub} ({})", grant.credential_id),
                None => grant.credential_id.clone(),
            }),
        }
    }
}

/// Numeric identity of one session instance (a reused session id gets a new one).
pub(crate) type SessionKey = u64;

/// A closing peer connection gets this long before the session lets go of it anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a session tells the registry about itself.
#[derive(Debug)]
pub(crate) enum Lifecycle {
    /// The peer connection connected: may the session become a viewer?
    Connected {
        id: SessionId,
        key: SessionKey,
        reply: oneshot::Sender<Result<(), Rejection>>,
    },
    /// The session is ending on its own: it takes no more input.
    Ending { id: SessionId, key: SessionKey },
    /// The peer connection is closed and everything is freed: the slot is free.
    Closed { id: SessionId, key: SessionKey },
}

/// Why the registry ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndRequest {
    ViewerBye,
    Evicted,
}

/// Everything a session needs, injected.
pub(crate) struct SessionDeps {
    pub settings: WebrtcSettings,
    pub pipeline: PipelineHandle,
    pub controller: Controller,
    pub lifecycle: mpsc::Sender<Lifecycle>,
    pub tracker: TaskTracker,
}

/// The registry's handle to a running session.
pub(crate) struct SessionHandle {
    /// Viewer candidates. Room for every candidate a session may send, so a send that the
    /// registry allowed never finds it full.
    candidates: mpsc::Sender<Option<IceCandidate>>,
    /// Ending takes its own path: it cannot be dropped or overtaken by queued candidates.
    end: watch::Sender<Option<EndRequest>>,
}

/// The candidate queue was full or the session has gone.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NotDelivered;

impl SessionHandle {
    pub fn candidate(&self, c: Option<IceCandidate>) -> Result<(), NotDelivered> {
        self.candidates.try_send(c).map_err(|_| NotDelivered)
    }

    pub fn end(&self, why: EndRequest) {
        self.end.send_replace(Some(why));
    }
}

/// Starts the session task for an accepted offer; it is tracked by `deps.tracker` and ends
/// with `cancel` (shutdown) at the latest. Its messages go out through `signal` (MQTT, or
/// the WHEP request that opened it).
pub(crate) fn spawn_session(
    deps: Arc<SessionDeps>,
    signal: SignalOut,
    id: SessionId,
    key: SessionKey,
    offer: CheckedOffer,
    admission: Admission,
    cancel: CancellationToken,
) -> SessionHandle {
    let (candidates, candidates_rx) = mpsc::channel(MAX_CANDIDATES_PER_SESSION as usize + 1);
    let (end, end_rx) = watch::channel(None);
    let span = match &admission.viewer {
        Some(viewer) => {
            tracing::info_span!("session", id = %id, key, viewer = %viewer.escape_debug())
        }
        None => tracing::info_span!("session", id = %id, key),
    };
    let tracker = deps.tracker.clone();
    tracker.spawn(
        async move {
            let driver = Driver {
                id,
                signal,
                key,
                offer,
                admission,
                deps,
                cancel,
                session_cancel: CancellationToken::new(),
                offered_at: Instant::now(),
                connected: false,
            };
            driver.run(candidates_rx, end_rx).await;
        }
        .instrument(span),
    );
    SessionHandle { candidates, end }
}

struct Driver {
    id: SessionId,
    signal: SignalOut,
    key: SessionKey,
    offer: CheckedOffer,
    /// What the session's credential allows, and until when.
    admission: Admission,
    deps: Arc<SessionDeps>,
    /// Shutdown of the whole device.
    cancel: CancellationToken,
    /// This session's helper tasks (writer, RTCP, data channel).
    session_cancel: CancellationToken,
    offered_at: Instant,
    connected: bool,
}

/// Maps webrtc-rs's connection state to what the session cares about.
fn peer_state(s: RTCPeerConnectionState) -> Option<PeerState> {
    match s {
        RTCPeerConnectionState::Connecting => Some(PeerState::Connecting),
        RTCPeerConnectionState::Connected => Some(PeerState::Connected),
        RTCPeerConnectionState::Disconnected => Some(PeerState::Disconnected),
        RTCPeerConnectionState::Failed => Some(PeerState::Failed),
        RTCPeerConnectionState::Closed => Some(PeerState::Closed),
        _ => None,
    }
}

/// The session id as the device state shows it: a hash keyed per run, stable while the device
/// runs, that does not reveal the id (which names the session's topics).
fn anonymized(id: &SessionId) -> String {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let hash = KEY
        .get_or_init(std::collections::hash_map::RandomState::new)
        .hash_one(id.to_string());
    format!("{:08x}", hash as u32)
}

fn internal(why: impl std::fmt::Display) -> Rejection {
    Rejection::new(ErrorCode::Internal, why.to_string())
}

fn bad_sdp(why: impl std::fmt::Display) -> Rejection {
    Rejection::new(ErrorCode::BadSdp, why.to_string())
}

impl Driver {
    async fn run(
        mut self,
        mut candidates: mpsc::Receiver<Option<IceCandidate>>,
        mut end: watch::Receiver<Option<EndRequest>>,
    ) {
        tracing::debug!("offer accepted");
        let mut session = Session::new(
            self.offered_at,
            self.deps.settings.timeouts,
            self.admission.expires_at,
        );
        let (ev_tx, mut events) = mpsc::channel(64);
        // The port lease lives as long as this task: dropped after the peer connection closed.
        let lease = self
            .deps
            .settings
            .ports
            .lease(&self.deps.settings.bind_addresses);
        // With adaptation, the viewer's congestion state lives from here (its interceptors
        // hold it) to the end of the session.
        let link = self.deps.settings.adaptation.as_ref().map(|a| {
            let ceiling = self.deps.pipeline.status().borrow().bitrate;
            Link::new(a.min_bitrate, ceiling)
        });
        let pc = match lease {
            Ok(ref l) => peer::build(&self.deps.settings, l.port, &ev_tx, link.as_ref())
                .await
                .map_err(|e| internal(format!("peer connection: {e}"))),
            Err(ref e) => Err(internal(e)),
        };
        drop(ev_tx);
        let (pc, video) = match pc {
            Ok(pc) => match VideoSender::add_to(&pc).await {
                Ok(v) => (Some(pc), Some(v)),
                Err(e) => {
                    session.handle(Input::NegotiationFailed(internal(e)), Instant::now());
                    (Some(pc), None)
                }
            },
            Err(r) => {
                session.handle(Input::NegotiationFailed(r), Instant::now());
                (None, None)
            }
        };
        let mut payload_type = 0u8;
        loop {
            while let Some(action) = session.poll_action() {
                let Some(pc) = pc.as_ref() else {
                    // Without a peer connection only messages and the close remain.
                    if let Action::Send(m) = action {
                        self.signal.send(&self.id, &m);
                    }
                    continue;
                };
                let now = Instant::now;
                match action {
                    Action::ApplyOffer => match self.apply_offer(pc, link.as_ref()).await {
                        Ok((answer, pt)) => {
                            payload_type = pt;
                            session.handle(Input::Answered(answer), now());
                        }
                        Err(r) => session.handle(Input::NegotiationFailed(r), now()),
                    },
                    Action::AddRemoteCandidate(c) => {
                        let init = RTCIceCandidateInit {
                            candidate: c.candidate,
                            sdp_mid: c.sdp_mid,
                            sdp_mline_index: c.sdp_mline_index,
                            username_fragment: c.username_fragment,
                            url: None,
                        };
                        if let Err(e) = pc.add_ice_candidate(init).await {
                            tracing::debug!(error = %e, "remote candidate refused");
                            session.handle(Input::RemoteCandidateRefused(e.to_string()), now());
                        }
                    }
                    Action::Send(m) => self.signal.send(&self.id, &m),
                    Action::ClaimSlot => {
                        let verdict = self.claim_slot().await;
                        let input = match verdict {
                            Ok(()) => Input::SlotGranted,
                            Err(r) => Input::SlotRefused(r),
                        };
                        session.handle(input, now());
                    }
                    Action::StartMedia => {
                        self.connected = true;
                        let path = peer::selected_path(pc).await;
                        tracing::info!(
                            setup_ms = self.offered_at.elapsed().as_millis() as u64,
                            path = path.as_deref().unwrap_or("unknown"),
                            "viewer connected"
                        );
                        let adaptive = self
                            .deps
                            .settings
                            .adaptation
                            .as_ref()
                            .zip(link.clone())
                            .map(|(a, link)| Adaptive {
                                link,
                                min_bitrate: a.min_bitrate,
                                links: a.links.clone(),
                                viewer: anonymized(&self.id),
                            });
                        if let Some(note) = &self.offer.level_note {
                            tracing::info!(%note, "streaming above the viewer's declared H.264 level");
                        }
                        let started = video
                            .as_ref()
                            .ok_or(())
                            .map_err(|()| "no video track".to_string())
                            .and_then(|v| {
                                v.start(
                                    &self.deps.pipeline,
                                    self.key,
                                    payload_type,
                                    self.deps.settings.queue_frames,
                                    adaptive,
                                    &self.deps.tracker,
                                    &self.session_cancel,
                                )
                                .map_err(|e| e.to_string())
                            });
                        if let Err(e) = started {
                            session.handle(Input::MediaFailed(e), now());
                        }
                    }
                    Action::Close => {}
                }
            }
            if session.is_ended() {
                break;
            }
            let deadline = session.next_deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Shutdown and the registry's end requests first: they must not wait behind
                // queued candidates.
                biased;
                _ = self.cancel.cancelled() => session.handle(Input::Shutdown, Instant::now()),
                changed = end.changed() => {
                    let input = match (changed, *end.borrow_and_update()) {
                        (Ok(()), Some(EndRequest::ViewerBye)) => Input::ViewerBye,
                        (Ok(()), Some(EndRequest::Evicted)) => Input::Evicted,
                        (Ok(()), None) => continue,
                        // The registry is gone: the device is shutting down.
                        (Err(_), _) => Input::Shutdown,
                    };
                    session.handle(input, Instant::now());
                }
                () = sleep => session.handle_timeout(Instant::now()),
                c = candidates.recv() => match c {
                    Some(c) => session.handle(Input::RemoteCandidate(c), Instant::now()),
                    None => session.handle(Input::Shutdown, Instant::now()),
                },
                ev = events.recv() => match ev {
                    None => session.handle(Input::Peer(PeerState::Closed), Instant::now()),
                    Some(ev) => self.on_event(ev, &mut session),
                },
            }
        }
        self.finish(&session, pc).await;
        drop(lease);
        let closed = Lifecycle::Closed {
            id: self.id.clone(),
            key: self.key,
        };
        let _ = self.deps.lifecycle.send(closed).await;
    }

    fn on_event(&self, ev: PcEvent, session: &mut Session) {
        let now = Instant::now();
        match ev {
            PcEvent::Candidate(ev) => match ev.candidate.to_json() {
                // webrtc-rs leaves the mid empty; browsers need it. Everything is bundled on
                // the video section, so that is where every candidate belongs.
                Ok(init) => session.handle(
                    Input::LocalCandidate(IceCandidate {
                        candidate: init.candidate,
                        sdp_mid: Some(self.offer.video_mid.clone()),
                        sdp_mline_index: Some(0),
                        username_fragment: init.username_fragment,
                    }),
                    now,
                ),
                Err(e) => tracing::debug!(error = %e, "cannot serialize local candidate"),
            },
            PcEvent::GatheringComplete => session.handle(Input::GatheringComplete, now),
            PcEvent::State(state) => {
                tracing::debug!(%state, "connection state");
                if let Some(s) = peer_state(state) {
                    session.handle(Input::Peer(s), now);
                }
            }
            PcEvent::DataChannel(dc) => {
                self.deps.tracker.spawn(
                    datachannel::serve(
                        dc,
                        self.id.clone(),
                        self.deps.controller.clone(),
                        self.admission.access.clone(),
                        self.session_cancel.clone(),
                    )
                    .in_current_span(),
                );
            }
        }
    }

    /// Applies the narrowed offer and makes the answer; returns it with the payload type.
    /// Answers the offer; with a `link`, tells it whether probes can find the viewer's path.
    async fn apply_offer(
        &self,
        pc: &Arc<dyn PeerConnection>,
        link: Option<&Link>,
    ) -> Result<(String, u8), Rejection> {
        let offer = RTCSessionDescription::offer(self.offer.sdp.clone()).map_err(bad_sdp)?;
        pc.set_remote_description(offer).await.map_err(bad_sdp)?;
        let answer = pc.create_answer(None).await.map_err(bad_sdp)?;
        let sdp = answer.sdp.clone();
        pc.set_local_description(answer).await.map_err(bad_sdp)?;
        let pt = check_answer(&sdp, &self.offer)?;
        let probes = answer_carries_probes(&sdp, pt);
        if let Some(link) = link
            && probes
        {
            link.expect_probes();
        }
        let sdp = answer_for_viewer(&sdp, &self.offer);
        tracing::debug!(%sdp, probes, "answer");
        Ok((sdp, pt))
    }

    async fn claim_slot(&self) -> Result<(), Rejection> {
        let (reply, verdict) = oneshot::channel();
        let msg = Lifecycle::Connected {
            id: self.id.clone(),
            key: self.key,
            reply,
        };
        if self.deps.lifecycle.send(msg).await.is_err() {
            return Err(internal("the session registry is gone"));
        }
        verdict
            .await
            .unwrap_or_else(|_| Err(internal("the session registry is gone")))
    }

    /// Logs the end, stops the helpers, stops the frames and closes the connection.
    async fn finish(&self, session: &Session, pc: Option<Arc<dyn PeerConnection>>) {
        let ending = Lifecycle::Ending {
            id: self.id.clone(),
            key: self.key,
        };
        let _ = self.deps.lifecycle.send(ending).await;
        // Sessions that never connected are remote input anyone can cause: debug only.
        match (session.end(), self.connected) {
            (Some(End::ViewerBye), true) => tracing::info!("viewer said bye"),
            (Some(End::Bye(reason)), true) => tracing::info!(?reason, "session closed"),
            (Some(End::Error(r)), true) => {
                tracing::info!(code = %r.code, reason = %r.reason, "session failed")
            }
            (end, false) => tracing::debug!(
                ?end,
                answered = session.answered(),
                "session ended before connecting"
            ),
            (None, true) => {}
        }
        self.session_cancel.cancel();
        if self.connected {
            self.deps.pipeline.unsubscribe(self.key);
        }
        if let Some(pc) = pc
            && tokio::time::timeout(CLOSE_TIMEOUT, pc.close())
                .await
                .is_err()
        {
            tracing::warn!("peer connection close timed out");
        }
    }
}
