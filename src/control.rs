//! Executes validated commands (from a viewer's data channel or MQTT), forwards namespaced ones, and builds replies.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};

use crate::forwarding::{RouterHandle, RouterMsg};
use crate::media::controls::ControlError;
use crate::media::pipeline::{CaptureParams, PipelineHandle};
use crate::media::snapshot::encode_jpeg;
use crate::protocol::command::{
    CHUNK_BYTES, Command, CommandError, CommandErrorCode, Transport, parse_request, reply,
};
use crate::protocol::topics::{SessionId, Topics};
use crate::ratelimit::TokenBucket;
use crate::state::{StateInfo, snapshot};

fn control_error(e: ControlError) -> CommandError {
    let code = match e {
        ControlError::Unknown(_) => CommandErrorCode::BadArgs,
        ControlError::OutOfRange(_) => CommandErrorCode::OutOfRange,
        ControlError::Failed(_) => CommandErrorCode::Unavailable,
    };
    CommandError::new(code, e.to_string())
}

/// Publishes to MQTT without waiting (implemented by the MQTT handle).
pub trait Publisher: Send + Sync + 'static {
    fn publish(&self, topic: String, payload: Vec<u8>, retain: bool);
}

/// Who sent a command.
#[derive(Debug, Clone)]
pub enum Origin {
    Viewer(SessionId),
    Mqtt,
}

/// What became of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Send this reply now (to the data channel, or to `reply_to` for MQTT).
    Reply {
        text: String,
        reply_to: Option<String>,
        /// Binary data that goes with the reply (a snapshot).
        attachment: Option<Vec<u8>>,
    },
    /// Forwarded to another service; its reply arrives later through the router.
    Forwarded,
}

/// Control-plane settings.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub forward_namespaces: Vec<String>,
    pub global_rate: u32,
    pub global_burst: u32,
}

/// Applies commands; cloneable, shared by every viewer and the MQTT command topic.
#[derive(Clone)]
pub struct Controller {
    pipeline: PipelineHandle,
    topics: Topics,
    publisher: Arc<dyn Publisher>,
    router: RouterHandle,
    settings: Arc<ControlSettings>,
    state_info: Arc<StateInfo>,
    started: Instant,
    global: Arc<Mutex<TokenBucket>>,
}

impl Controller {
    pub fn new(
        pipeline: PipelineHandle,
        topics: Topics,
        publisher: Arc<dyn Publisher>,
        router: RouterHandle,
        settings: ControlSettings,
        state_info: StateInfo,
    ) -> Self {
        let now = Instant::now();
        Self {
            global: Arc::new(Mutex::new(TokenBucket::new(
                settings.global_rate,
                settings.global_burst,
                now,
            ))),
            pipeline,
            topics,
            publisher,
            router,
            settings: Arc::new(settings),
            state_info: Arc::new(state_info),
            started: now,
        }
    }

    pub fn router(&self) -> &RouterHandle {
        &self.router
    }

    /// Parses, validates and runs one message. `limiter` is the caller's own bucket (per
    /// viewer, or the MQTT command topic's); the global bucket is checked too.
    pub async fn handle_message(
        &self,
        origin: &Origin,
        message: &[u8],
        limiter: &mut TokenBucket,
    ) -> Outcome {
        let transport = match origin {
            Origin::Viewer(_) => Transport::DataChannel,
            Origin::Mqtt => Transport::Mqtt,
        };
        let request = parse_request(message, transport);
        let now = Instant::now();
        let limited = !limiter.try_take(now)
            || !self
                .global
                .lock()
                // A poisoned token bucket is still a valid token bucket.
                .unwrap_or_else(|p| p.into_inner())
                .try_take(now);
        let mut attachment = None;
        let outcome = if limited {
            Err(CommandError::new(
                CommandErrorCode::RateLimited,
                format!(
                    "too many commands; retry in {} ms",
                    limiter.retry_after().as_millis().max(1)
                ),
            ))
        } else {
            match request.command {
                Ok(Command::Forward {
                    namespace,
                    name,
                    args,
                }) => match self.forward(origin, &request.id, &namespace, &name, args) {
                    Ok(()) => return Outcome::Forwarded,
                    Err(e) => Err(e),
                },
                Ok(Command::Snapshot { quality }) => match self.snapshot(quality).await {
                    Ok((jpeg, mut result)) => {
                        if matches!(origin, Origin::Mqtt) {
                            // MQTT gets the image as a retained binary payload of its own.
                            let topic = self.topics.snapshot();
                            result["topic"] = json!(topic);
                            self.publisher.publish(topic, jpeg, true);
                        } else {
                            result["chunks"] = json!(jpeg.len().div_ceil(CHUNK_BYTES));
                            result["chunk_size"] = json!(CHUNK_BYTES);
                            attachment = Some(jpeg);
                        }
                        Ok(result)
                    }
                    Err(e) => Err(e),
                },
                Ok(command) => self.execute(command).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = &outcome {
            tracing::debug!(code = ?e.code, message = %e.message, "command refused");
        }
        Outcome::Reply {
            text: reply(&request.id, &outcome),
            reply_to: request.reply_to,
            attachment,
        }
    }

    /// Takes the next picture and encodes it off the async threads.
    async fn snapshot(&self, quality: u8) -> Result<(Vec<u8>, Value), CommandError> {
        let unavailable = |e: String| CommandError::new(CommandErrorCode::Unavailable, e);
        let frame = self.pipeline.snapshot().await.map_err(unavailable)?;
        let (width, height) = (frame.width, frame.height);
        let jpeg = tokio::task::spawn_blocking(move || encode_jpeg(&frame, quality))
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .map_err(|e| unavailable(format!("JPEG encoding: {e}")))?;
        tracing::info!(bytes = jpeg.len(), width, height, "snapshot taken");
        let result =
            json!({"type": "image/jpeg", "size": jpeg.len(), "width": width, "height": height});
        Ok((jpeg, result))
    }

    fn forward(
        &self,
        origin: &Origin,
        id: &Value,
        namespace: &str,
        name: &str,
        args: serde_json::Map<String, Value>,
    ) -> Result<(), CommandError> {
        if !self
            .settings
            .forward_namespaces
            .iter()
            .any(|n| n == namespace)
        {
            return Err(CommandError::new(
                CommandErrorCode::NotAllowed,
                format!("namespace `{namespace}` is not in control.forward_namespaces"),
            ));
        }
        let Origin::Viewer(session) = origin else {
            return Err(CommandError::new(
                CommandErrorCode::BadRequest,
                format!(
                    "`{namespace}.{name}` is forwarded for viewers only; MQTT clients publish to {} directly",
                    self.topics.forward(namespace)
                ),
            ));
        };
        let payload = json!({
            "v": crate::protocol::PROTOCOL_VERSION,
            "session": session.as_str(),
            "id": id,
            "cmd": format!("{namespace}.{name}"),
            "args": args,
            "reply_to": self.topics.forward_reply(),
        });
        self.router.send(RouterMsg::Forwarded {
            session: session.as_str().to_owned(),
            id: id.clone(),
        });
        self.publisher.publish(
            self.topics.forward(namespace),
            payload.to_string().into_bytes(),
            false,
        );
        tracing::info!(%namespace, %name, "command forwarded");
        Ok(())
    }

    async fn execute(&self, command: Command) -> Result<Value, CommandError> {
        let unavailable = |e: String| CommandError::new(CommandErrorCode::Unavailable, e);
        match command {
            Command::Ping { t } => Ok(json!({"pong": true, "t": t})),
            Command::Keyframe => {
                self.pipeline.request_keyframe();
                Ok(json!({}))
            }
            Command::SetBitrate { bps } => {
                let applied = self.pipeline.set_bitrate(bps).await.map_err(unavailable)?;
                tracing::info!(bps = applied, "bitrate changed");
                Ok(json!({"bps": applied}))
            }
            Command::SetFps { fps } => {
                let p = self.pipeline.params();
                let applied = self
                    .pipeline
                    .reconfigure(CaptureParams { fps, ..p })
                    .await
                    .map_err(unavailable)?;
                tracing::info!(fps = applied.fps, "frame rate changed");
                Ok(json!({"fps": applied.fps}))
            }
            Command::SetResolution { width, height } => {
                let p = self.pipeline.params();
                let applied = self
                    .pipeline
                    .reconfigure(CaptureParams { width, height, ..p })
                    .await
                    .map_err(unavailable)?;
                tracing::info!(
                    width = applied.width,
                    height = applied.height,
                    "resolution changed"
                );
                Ok(json!({"width": applied.width, "height": applied.height}))
            }
            Command::ListControls => {
                let list = self.pipeline.list_controls().await.map_err(control_error)?;
                Ok(json!({"controls": list}))
            }
            Command::GetControl { name } => {
                let list = self.pipeline.list_controls().await.map_err(control_error)?;
                let c = list
                    .into_iter()
                    .find(|c| c.name == name)
                    .ok_or_else(|| control_error(ControlError::Unknown(name)))?;
                Ok(json!({"name": c.name, "value": c.value}))
            }
            Command::SetControl { name, value } => {
                let applied = self
                    .pipeline
                    .set_control(name.clone(), value)
                    .await
                    .map_err(control_error)?;
                tracing::info!(%name, value = applied, "control set");
                Ok(json!({"name": name, "value": applied}))
            }
            Command::GetState => {
                let state = snapshot(
                    self.pipeline.stats(),
                    &self.state_info,
                    self.started.elapsed(),
                );
                serde_json::to_value(state).map_err(|e| unavailable(e.to_string()))
            }
            Command::Forward { .. } | Command::Snapshot { .. } => Err(CommandError::new(
                CommandErrorCode::BadRequest,
                "handled before execution",
            )),
        }
    }
}
