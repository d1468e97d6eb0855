//! The signaling task: owns the session registry, routes inbound messages, spawns and reaps viewer sessions.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::{Origin, Outcome};
use crate::forwarding::RouterMsg;
use crate::mqtt::Inbound;
use crate::protocol::signal::DeviceMessage;
use crate::protocol::topics::{InboundTopic, SessionId, Topics};
use crate::ratelimit::TokenBucket;
use crate::sessions::{Decision, Registry, SessionKey};
use crate::viewer::{SessionContext, SessionEnded, SessionHandle, SessionInput, spawn_session};

/// Runs until cancelled; then ends every session and waits for them to finish.
pub async fn run_signaling(
    topics: Topics,
    mut registry: Registry,
    ctx: Arc<SessionContext>,
    mut inbound: mpsc::Receiver<Inbound>,
    mut ended: mpsc::Receiver<SessionEnded>,
    cancel: CancellationToken,
) {
    let mut handles: HashMap<SessionKey, SessionHandle> = HashMap::new();
    let sessions_cancel = cancel.child_token();
    let commands = spawn_mqtt_commands(ctx.clone(), topics.clone(), cancel.clone());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(e) = ended.recv() => {
                handles.remove(&e.key);
                registry.on_ended(&e.id, e.key);
                tracing::debug!(session = %e.id, live = registry.len(), "session reaped");
            }
            msg = inbound.recv() => {
                let Some(msg) = msg else { break };
                let id = match topics.parse_inbound(&msg.topic) {
                    InboundTopic::SessionIn(id) => id,
                    InboundTopic::Command => {
                        if commands.try_send(msg.payload).is_err() {
                            tracing::warn!("MQTT command queue full; command dropped");
                        }
                        continue;
                    }
                    InboundTopic::ForwardReply => {
                        ctx.controller.router().send(RouterMsg::ServiceReply(msg.payload));
                        continue;
                    }
                    InboundTopic::Events => {
                        ctx.controller.router().send(RouterMsg::Event(msg.payload));
                        continue;
                    }
                    InboundTopic::BadSessionId(id) => {
                        // No trustworthy reply topic exists for an invalid id.
                        tracing::warn!(id = %id.escape_debug(), "message with invalid session id ignored");
                        continue;
                    }
                    InboundTopic::Other => continue,
                };
                dispatch(&mut registry, &mut handles, &ctx, &id, &msg.payload, &sessions_cancel).await;
            }
        }
    }
    // Shutdown: every session says bye and frees its resources.
    sessions_cancel.cancel();
    let live = registry.drain().len();
    tracing::info!(live, "ending viewer sessions");
    drop(handles);
    let deadline = tokio::time::sleep(std::time::Duration::from_secs(5));
    tokio::pin!(deadline);
    let mut remaining = live;
    while remaining > 0 {
        tokio::select! {
            _ = &mut deadline => { tracing::warn!(remaining, "sessions still closing at shutdown"); break; }
            e = ended.recv() => match e { Some(_) => remaining -= 1, None => break },
        }
    }
}

/// Runs MQTT commands one at a time under their own rate limit; replies go to the
/// command's `reply_to`, else to `<base>/command/reply`.
fn spawn_mqtt_commands(
    ctx: Arc<SessionContext>,
    topics: Topics,
    cancel: CancellationToken,
) -> mpsc::Sender<bytes::Bytes> {
    let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(64);
    tokio::spawn(async move {
        let (rate, burst) = ctx.command_rate;
        let mut limiter = TokenBucket::new(rate, burst, std::time::Instant::now());
        loop {
            let payload = tokio::select! {
                _ = cancel.cancelled() => break,
                p = rx.recv() => match p { Some(p) => p, None => break },
            };
            let outcome = ctx
                .controller
                .handle_message(&Origin::Mqtt, &payload, &mut limiter)
                .await;
            if let Outcome::Reply { text, reply_to, .. } = outcome {
                let topic = reply_to.unwrap_or_else(|| topics.command_reply());
                ctx.publisher.publish(topic, text.into_bytes(), false);
            }
        }
    });
    tx
}

async fn dispatch(
    registry: &mut Registry,
    handles: &mut HashMap<SessionKey, SessionHandle>,
    ctx: &Arc<SessionContext>,
    id: &SessionId,
    payload: &[u8],
    cancel: &CancellationToken,
) {
    match registry.on_message(id, payload) {
        Decision::Reject(r) => {
            tracing::info!(session = %id, code = %r.code, reason = %r.reason, "signaling message rejected");
            ctx.signal.send(id, &DeviceMessage::error(&r));
        }
        Decision::Start { key, sdp } => {
            let handle = spawn_session(ctx.clone(), id.clone(), key, sdp, cancel.clone());
            handles.insert(key, handle);
        }
        Decision::Candidate { key, candidate } => {
            if let Some(h) = handles.get(&key)
                && h.inputs
                    .try_send(SessionInput::Candidate(candidate))
                    .is_err()
            {
                tracing::warn!(session = %id, "session input queue full; candidate dropped");
            }
        }
        Decision::End { key } => {
            if let Some(h) = handles.get(&key) {
                let _ = h.inputs.try_send(SessionInput::Bye);
            }
        }
    }
}
