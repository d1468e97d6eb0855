//! The session registry's owner task: every session's lifecycle and slot, fed by `session/<id>/in`, by WHEP requests and by the sessions themselves.

pub(crate) mod registry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::Controller;
use crate::media::pipeline::PipelineHandle;
use crate::viewer::peer::WebrtcSettings;

use crate::log_limit::LogLimiter;
use crate::outbound::SignalOut;
use crate::protocol::signal::{DeviceMessage, ErrorCode, IceCandidate, Rejection, ViewerMessage};
use crate::protocol::topics::SessionId;
use crate::state::SessionCounts;
use crate::viewer::{EndRequest, Lifecycle, SessionDeps, SessionHandle, SessionKey, spawn_session};
use registry::{Decision, Registry, SessionLimits, SignedInbound};

/// Inbound signaling messages queued for the registry at most; more get `busy`.
const INBOUND_QUEUE: usize = 256;
/// WHEP requests queued for the registry at most (the HTTP server serves fewer at once).
const WHEP_QUEUE: usize = 64;
/// How long shutdown waits for every session to say bye and close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The inbound queue was full: the message was not taken.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the device is busy: {INBOUND_QUEUE} signaling messages are waiting; retry later")]
pub(crate) struct SignalingBusy;

/// Feeds the registry; cheap to clone, never blocks.
#[derive(Clone)]
pub(crate) struct SignalingHandle {
    inbound: mpsc::Sender<(SessionId, Bytes)>,
    whep: mpsc::Sender<WhepCall>,
}

impl SignalingHandle {
    /// A payload from `<base>/session/<id>/in`.
    pub fn submit(&self, id: SessionId, payload: Bytes) -> Result<(), SignalingBusy> {
        self.inbound
            .try_send((id, payload))
            .map_err(|_| SignalingBusy)
    }

    /// A WHEP request (docs/whep.md), the second signaling transport into the same registry.
    pub fn whep(&self, call: WhepCall) -> Result<(), SignalingBusy> {
        self.whep.try_send(call).map_err(|_| SignalingBusy)
    }
}

/// What a WHEP request asks of the registry. `reply` gets `Ok` when it was accepted (for an
/// offer: the session started and its answer and candidates will arrive on `out`), or the
/// rejection.
#[derive(Debug)]
pub(crate) struct WhepCall {
    pub id: SessionId,
    /// The `Authorization: Bearer` credential, if any.
    pub bearer: Option<String>,
    pub action: WhepAction,
    pub reply: oneshot::Sender<Result<(), Rejection>>,
}

#[derive(Debug)]
pub(crate) enum WhepAction {
    /// POST: a new session for this offer; its device messages go to `out`.
    Offer {
        sdp: String,
        out: mpsc::Sender<DeviceMessage>,
    },
    /// PATCH: trickled candidates (None: end of candidates).
    Candidates(Vec<Option<IceCandidate>>),
    /// DELETE.
    End,
}

/// Everything the registry owner needs, injected.
pub(crate) struct SignalingParts {
    pub limits: SessionLimits,
    pub parse_limits: crate::protocol::signal::Limits,
    /// Signed mode's policy and replay cache; `None` in open mode.
    pub signed: Option<SignedInbound>,
    pub signal: SignalOut,
    pub webrtc: WebrtcSettings,
    pub pipeline: PipelineHandle,
    pub controller: Controller,
    /// Where the registry publishes its session counts.
    pub counts: watch::Sender<SessionCounts>,
}

/// Starts the registry owner; it runs until `cancel`, then ends every session and waits (up
/// to a bound) for them to say bye and close. Await the returned task for that.
pub(crate) fn spawn(
    parts: SignalingParts,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> (SignalingHandle, JoinHandle<()>) {
    let (inbound, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let (whep, whep_rx) = mpsc::channel(WHEP_QUEUE);
    // Every live session reports at most three times (connected, ending, closed).
    let sessions_max = parts.limits.max_viewers + parts.limits.max_pending;
    let (lifecycle, lifecycle_rx) = mpsc::channel(3 * sessions_max + 8);
    let deps = Arc::new(SessionDeps {
        settings: parts.webrtc,
        pipeline: parts.pipeline,
        controller: parts.controller,
        lifecycle,
        tracker: tracker.clone(),
    });
    let owner = Owner {
        registry: Registry::new(parts.limits, parts.parse_limits, parts.signed),
        sessions: HashMap::new(),
        deps,
        signal: parts.signal,
        counts: parts.counts,
        cancel: cancel.clone(),
        log: LogLimiter::new(Duration::from_secs(10), 10),
    };
    let task = tracker.spawn(owner.run(inbound_rx, whep_rx, lifecycle_rx));
    (SignalingHandle { inbound, whep }, task)
}

struct Owner {
    registry: Registry,
    sessions: HashMap<SessionKey, SessionHandle>,
    deps: Arc<SessionDeps>,
    signal: SignalOut,
    counts: watch::Sender<SessionCounts>,
    cancel: CancellationToken,
    /// Rejections are remote input: a few lines, then a summary.
    log: LogLimiter,
}

impl Owner {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<(SessionId, Bytes)>,
        mut whep: mpsc::Receiver<WhepCall>,
        mut lifecycle: mpsc::Receiver<Lifecycle>,
    ) {
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                Some(event) = lifecycle.recv() => self.on_lifecycle(event),
                Some(call) = whep.recv() => self.on_whep(call),
                msg = inbound.recv() => match msg {
                    Some((id, payload)) => self.on_message(&id, &payload),
                    None => break,
                },
            }
            self.publish_counts();
        }
        // Shutdown: every session sees the cancellation, says bye and closes; its slot is
        // freed when it reports closed.
        let live = self.registry.close_all();
        self.publish_counts();
        tracing::info!(live, "ending viewer sessions");
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while self.registry.len() > 0 {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(remaining = self.registry.len(), "sessions still closing at shutdown");
                    break;
                }
                event = lifecycle.recv() => match event {
                    Some(event) => self.on_lifecycle(event),
                    None => break,
                },
            }
        }
        self.publish_counts();
    }

    fn publish_counts(&self) {
        let counts = self.registry.counts();
        self.counts.send_if_modified(|c| {
            let changed = *c != counts;
            *c = counts;
            changed
        });
    }

    fn reject(&mut self, id: &SessionId, r: &Rejection) {
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            tracing::info!(session = %id, code = %r.code, reason = %r.reason, suppressed, "signaling message rejected");
        }
        self.signal.send(id, &DeviceMessage::error(r));
    }

    fn on_message(&mut self, id: &SessionId, payload: &[u8]) {
        let now_ms = crate::outbound::unix_ms();
        let stream = self.deps.pipeline.status().borrow().h264;
        match self
            .registry
            .on_message(id, payload, stream, Instant::now(), now_ms)
        {
            Decision::Reject(r) => self.reject(id, &r),
            decision => self.apply(id, decision, self.signal.clone()),
        }
    }

    /// A WHEP request: the same registry decisions as an MQTT message; rejections go back to
    /// the HTTP request instead of a session topic.
    fn on_whep(&mut self, call: WhepCall) {
        let now = Instant::now();
        let now_ms = crate::outbound::unix_ms();
        let WhepCall {
            id,
            bearer,
            action,
            reply,
        } = call;
        let bearer = bearer.as_deref();
        let result = match action {
            WhepAction::Offer { sdp, out } => {
                let stream = self.deps.pipeline.status().borrow().h264;
                match self
                    .registry
                    .on_whep_offer(&id, sdp, bearer, stream, now, now_ms)
                {
                    Decision::Reject(r) => Err(r),
                    d => {
                        self.apply(&id, d, SignalOut::http(out));
                        Ok(())
                    }
                }
            }
            WhepAction::Candidates(candidates) => {
                let mut result = Ok(());
                for c in candidates {
                    let msg = ViewerMessage::Candidate(c);
                    match self.registry.on_whep_message(&id, msg, bearer, now, now_ms) {
                        Decision::Reject(r) => {
                            result = Err(r);
                            break;
                        }
                        d => self.apply(&id, d, self.signal.clone()),
                    }
                }
                result
            }
            WhepAction::End => {
                match self
                    .registry
                    .on_whep_message(&id, ViewerMessage::Bye, bearer, now, now_ms)
                {
                    Decision::Reject(r) => Err(r),
                    d => {
                        self.apply(&id, d, self.signal.clone());
                        Ok(())
                    }
                }
            }
        };
        if let Err(r) = &result
            && let Some(suppressed) = self.log.allow(now)
        {
            tracing::info!(session = %id, code = %r.code, reason = %r.reason, suppressed, "WHEP request rejected");
        }
        let _ = reply.send(result);
    }

    /// Carries out an accepted decision; a new session's messages go out through `signal`.
    fn apply(&mut self, id: &SessionId, decision: Decision, signal: SignalOut) {
        match decision {
            Decision::Reject(r) => self.reject(id, &r),
            Decision::Start {
                key,
                offer,
                evict,
                admission,
            } => {
                if let Some((old_id, old_key)) = evict {
                    tracing::debug!(session = %old_id, "oldest pending session evicted");
                    if let Some(h) = self.sessions.get(&old_key) {
                        h.end(EndRequest::Evicted);
                    }
                }
                let handle = spawn_session(
                    self.deps.clone(),
                    signal,
                    id.clone(),
                    key,
                    offer,
                    admission,
                    self.cancel.child_token(),
                );
                self.sessions.insert(key, handle);
            }
            Decision::Candidate { key, candidate } => {
                let delivered = self
                    .sessions
                    .get(&key)
                    .is_some_and(|h| h.candidate(candidate).is_ok());
                if !delivered {
                    // Cannot happen while the registry caps candidates below the queue size;
                    // should it anyway, the viewer hears about it.
                    let r = Rejection::new(
                        ErrorCode::Busy,
                        "the session cannot take more candidates now",
                    );
                    self.reject(id, &r);
                }
            }
            Decision::End { key } => {
                if let Some(h) = self.sessions.get(&key) {
                    h.end(EndRequest::ViewerBye);
                }
            }
            Decision::IceServers => {
                let now_s = crate::outbound::unix_ms() / 1000;
                let servers = self.deps.settings.ice_servers.for_viewers(now_s);
                tracing::debug!(session = %id, servers = servers.servers.len(), "ICE servers sent");
                signal.send(id, &DeviceMessage::ice_servers(servers));
            }
        }
    }

    fn on_lifecycle(&mut self, event: Lifecycle) {
        match event {
            Lifecycle::Connected { id, key, reply } => {
                let verdict = self.registry.on_connected(&id, key);
                let _ = reply.send(verdict);
            }
            Lifecycle::Ending { id, key } => self.registry.on_ending(&id, key),
            Lifecycle::Closed { id, key } => {
                self.registry.on_closed(&id, key);
                self.sessions.remove(&key);
                tracing::debug!(session = %id, live = self.registry.len(), "session freed");
            }
        }
    }
}
