//! The `control` data channel: a thin adapter that runs each message through the `Controller` and sends one reply.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use webrtc::data_channel::{DataChannel, DataChannelEvent};

use crate::control::forwarding::RELAY_QUEUE;
use crate::control::{CommandOutput, Controller, Origin};
use crate::protocol::auth::permissions::Access;
use crate::protocol::command::{Transport, parse_request, reply};
use crate::protocol::limits::CHUNK_BYTES;
use crate::protocol::topics::SessionId;

/// Label of the control data channel.
pub(crate) const CONTROL_LABEL: &str = "control";

/// Answers every command on the `control` channel, one reply per message, and relays the
/// replies of forwarded commands and service events, until the channel closes or `cancel`.
/// Commands outside `access` (the session's credential) are answered `forbidden`.
pub(crate) async fn serve(
    dc: Arc<dyn DataChannel>,
    id: SessionId,
    controller: Controller,
    access: Access,
    cancel: CancellationToken,
) {
    let label = dc.label().await.unwrap_or_default();
    if label != CONTROL_LABEL {
        tracing::debug!(label = %label.escape_debug(), "ignoring data channel with unknown label");
        return;
    }
    let (relay_tx, mut relay) = mpsc::channel::<String>(RELAY_QUEUE);
    controller.router().register(&id, relay_tx).await;
    let origin = Origin::Viewer(id.clone());
    let mut limiter = controller.source_limiter(Instant::now());
    loop {
        let (text, attachment) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = relay.recv() => match r { Some(t) => (t, None), None => break },
            e = dc.poll() => match e {
                Some(DataChannelEvent::OnMessage(message)) => {
                    match run_one(&controller, &origin, &access, &message.data, &mut limiter).await {
                        Some(reply) => reply,
                        None => continue, // forwarded: the reply comes through the relay
                    }
                }
                Some(DataChannelEvent::OnClose) | None => break,
                Some(_) => continue,
            },
        };
        if let Err(e) = dc.send_text(&text).await {
            tracing::debug!(error = %e, "data channel send failed");
            break;
        }
        // Binary data follows its reply header as CHUNK_BYTES-sized binary messages.
        if let Some(data) = attachment {
            for chunk in data.chunks(CHUNK_BYTES) {
                if let Err(e) = dc.send(bytes::BytesMut::from(chunk)).await {
                    tracing::debug!(error = %e, "data channel send failed");
                    break;
                }
            }
        }
    }
    controller.router().unregister(&id).await;
}

/// One message: the reply text and any binary attachment, or `None` when forwarded.
async fn run_one(
    controller: &Controller,
    origin: &Origin,
    access: &Access,
    message: &[u8],
    limiter: &mut crate::control::ratelimit::TokenBucket,
) -> Option<(String, Option<Vec<u8>>)> {
    let request = parse_request(message, Transport::DataChannel);
    // Every message counts against the limits, malformed ones too: each costs a reply.
    let outcome = match (controller.admit(limiter, Instant::now()), request.command) {
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(command)) => controller.run(origin, access, &request.id, command).await,
    };
    let (result, attachment) = match outcome {
        Ok(CommandOutput::Forwarded) => return None,
        Ok(CommandOutput::Done(v)) => (Ok(v), None),
        Ok(CommandOutput::Snapshot { jpeg, mut result }) => {
            result["chunks"] = json!(jpeg.len().div_ceil(CHUNK_BYTES));
            result["chunk_size"] = json!(CHUNK_BYTES);
            (Ok(result), Some(jpeg))
        }
        Err(e) => {
            tracing::debug!(code = ?e.code, message = %e.message, "command refused");
            (Err(e), None)
        }
    };
    Some((reply(&request.id, &result), attachment))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testing::Rig;
    use crate::protocol::auth::permissions::{Permission, Rights};

    async fn reply_to(rig: &Rig, access: &Access, message: serde_json::Value) -> serde_json::Value {
        let origin = Origin::Viewer(SessionId::parse("s1").unwrap());
        let mut limiter = rig.controller.source_limiter(Instant::now());
        let (text, _) = run_one(
            &rig.controller,
            &origin,
            access,
            message.to_string().as_bytes(),
            &mut limiter,
        )
        .await
        .expect("a reply");
        serde_json::from_str(&text).unwrap()
    }

    #[tokio::test]
    async fn commands_outside_the_sessions_permissions_are_forbidden() {
        let rig = Rig::new((100, 100), &["ptz"]);
        let view = Access::Granted(Rights::new(Permission::View, &[], &[]));
        let resize = json!({"id":1,"cmd":"set-resolution","args":{"width":320,"height":240}});
        let r = reply_to(&rig, &view, resize.clone()).await;
        assert_eq!(r["error"]["code"], "forbidden", "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("control"));
        let r = reply_to(&rig, &view, json!({"id":2,"cmd":"get-state"})).await;
        assert_eq!(r["ok"], true, "{r}");
        let r = reply_to(&rig, &view, json!({"id":3,"cmd":"ptz.move"})).await;
        assert_eq!(r["error"]["code"], "forbidden", "{r}");
        // A namespace that is not forwarded at all: not-allowed, whoever asks.
        let r = reply_to(&rig, &view, json!({"id":5,"cmd":"light.on"})).await;
        assert_eq!(r["error"]["code"], "not-allowed", "{r}");
        // The same command with `control`, and in open mode, runs.
        let control = Access::Granted(Rights::new(Permission::Control, &[], &[]));
        let r = reply_to(&rig, &control, resize.clone()).await;
        assert_eq!(r["result"], json!({"width":320,"height":240}), "{r}");
        let r = reply_to(&rig, &Access::Open, json!({"id":4,"cmd":"keyframe"})).await;
        assert_eq!(r["ok"], true, "{r}");
        rig.stop().await;
    }
}
