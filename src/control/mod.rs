//! The control plane: a transport-agnostic `Controller` runs a parsed command and returns a typed result.
//!
//! The data channel (`viewer::datachannel`) and the MQTT command topic ([`mqtt`]) are thin
//! adapters around it; forwarding to other services and rate limits live here too.

pub(crate) mod forwarding;
pub(crate) mod mqtt;
pub(crate) mod ratelimit;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};

use crate::media::controls::ControlError;
use crate::media::pipeline::{PipelineError, PipelineHandle};
use crate::media::snapshot::encode_jpeg;
use crate::media::source::CaptureChange;
use crate::outbound::Publish;
use crate::protocol::auth::permissions::Access;
use crate::protocol::command::{Command, CommandError, CommandErrorCode, RequestId};
use crate::protocol::topics::{SessionId, Topics};
use crate::state::StateReader;
use forwarding::RouterHandle;
use ratelimit::TokenBucket;

/// Who sent a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    Viewer(SessionId),
    Mqtt,
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CommandOutput {
    /// The reply's `result`.
    Done(Value),
    /// A JPEG and the reply's `result`; the adapter delivers the image its own way
    /// (data-channel chunks, or the retained MQTT snapshot topic) and completes the result.
    Snapshot { jpeg: Vec<u8>, result: Value },
    /// Forwarded to another service: its reply arrives later through the router.
    Forwarded,
}

/// Control-plane settings.
#[derive(Debug, Clone)]
pub(crate) struct ControlSettings {
    pub forward_namespaces: Vec<String>,
    /// Commands per second and burst, per viewer session and for the MQTT command topic.
    pub source_rate: (u32, u32),
    /// The same for all sources together.
    pub global_rate: (u32, u32),
}

struct Inner {
    pipeline: PipelineHandle,
    topics: Topics,
    publish: Arc<dyn Publish>,
    router: RouterHandle,
    settings: ControlSettings,
    state: StateReader,
    /// Shared by every source; checked under a short lock.
    global: Mutex<TokenBucket>,
}

/// Runs commands; cloneable, shared by every viewer and the MQTT command topic.
#[derive(Clone)]
pub(crate) struct Controller {
    inner: Arc<Inner>,
}

fn control_error(e: ControlError) -> CommandError {
    let code = match e {
        ControlError::Unknown(_) => CommandErrorCode::BadArgs,
        ControlError::OutOfRange(_) => CommandErrorCode::OutOfRange,
        ControlError::Failed(_) => CommandErrorCode::Unavailable,
    };
    CommandError::new(code, e.to_string())
}

fn pipeline_error(e: PipelineError) -> CommandError {
    let code = match e {
        PipelineError::Busy => CommandErrorCode::Busy,
        PipelineError::Gone => CommandErrorCode::Unavailable,
    };
    CommandError::new(code, e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> CommandError {
    CommandError::new(CommandErrorCode::Unavailable, e.to_string())
}

impl Controller {
    pub fn new(
        pipeline: PipelineHandle,
        topics: Topics,
        publish: Arc<dyn Publish>,
        router: RouterHandle,
        settings: ControlSettings,
        state: StateReader,
    ) -> Self {
        let (rate, burst) = settings.global_rate;
        Self {
            inner: Arc::new(Inner {
                global: Mutex::new(TokenBucket::new(rate, burst, Instant::now())),
                pipeline,
                topics,
                publish,
                router,
                settings,
                state,
            }),
        }
    }

    pub fn router(&self) -> &RouterHandle {
        &self.inner.router
    }

    /// A fresh bucket for one source (a viewer session, or the MQTT command topic).
    pub fn source_limiter(&self, now: Instant) -> TokenBucket {
        let (rate, burst) = self.inner.settings.source_rate;
        TokenBucket::new(rate, burst, now)
    }

    /// Takes a token from the source's own bucket and from the global one, or says
    /// `rate-limited`.
    pub fn admit(&self, own: &mut TokenBucket, now: Instant) -> Result<(), CommandError> {
        let global_ok = || {
            self.inner
                .global
                .lock()
                // A poisoned token bucket is still a valid token bucket.
                .unwrap_or_else(|p| p.into_inner())
                .try_take(now)
        };
        if own.try_take(now) && global_ok() {
            Ok(())
        } else {
            Err(CommandError::new(
                CommandErrorCode::RateLimited,
                format!(
                    "too many commands; retry in {} ms",
                    own.retry_after().as_millis().max(1)
                ),
            ))
        }
    }

    /// True when commands of `namespace` are forwarded (`control.forward_namespaces`).
    fn forwards(&self, namespace: &str) -> bool {
        self.inner
            .settings
            .forward_namespaces
            .iter()
            .any(|n| n == namespace)
    }

    /// Runs one validated command for `origin`, if `access` (the sender's credential, or
    /// open) allows it: otherwise `forbidden` (docs/protocol.md §9.7). A namespace that is
    /// not forwarded at all is `not-allowed` for everyone, as in open mode.
    pub async fn run(
        &self,
        origin: &Origin,
        access: &Access,
        id: &RequestId,
        command: Command,
    ) -> Result<CommandOutput, CommandError> {
        let unforwarded =
            matches!(&command, Command::Forward { namespace, .. } if !self.forwards(namespace));
        if !unforwarded {
            access
                .allows(&command)
                .map_err(|f| CommandError::new(CommandErrorCode::Forbidden, f.0))?;
        }
        let pipeline = &self.inner.pipeline;
        let done = |v: Value| Ok(CommandOutput::Done(v));
        match command {
            Command::Ping { t } => done(json!({"pong": true, "t": t})),
            Command::Keyframe => {
                // A camera or hardware encoder without the control: say so, do not pretend.
                let unavailable_why = pipeline
                    .status()
                    .borrow()
                    .encoder
                    .as_ref()
                    .and_then(|e| e.keyframes_unavailable.clone());
                if let Some(why) = unavailable_why {
                    return Err(unavailable(why));
                }
                pipeline.request_keyframe();
                done(json!({}))
            }
            Command::SetBitrate { bps } => {
                let applied = pipeline
                    .set_bitrate(bps)
                    .await
                    .map_err(pipeline_error)?
                    .map_err(unavailable)?;
                tracing::info!(bps = applied, "bitrate changed");
                done(json!({"bps": applied}))
            }
            Command::SetFps { fps } => {
                let change = CaptureChange {
                    fps: Some(fps),
                    ..Default::default()
                };
                let applied = self.reconfigure(change).await?;
                tracing::info!(fps = applied.fps, "frame rate changed");
                done(json!({"fps": applied.fps}))
            }
            Command::SetResolution { width, height } => {
                let change = CaptureChange {
                    width: Some(width),
                    height: Some(height),
                    fps: None,
                };
                let applied = self.reconfigure(change).await?;
                tracing::info!(
                    width = applied.width,
                    height = applied.height,
                    "resolution changed"
                );
                done(json!({"width": applied.width, "height": applied.height}))
            }
            Command::ListControls => {
                let list = self.controls().await?;
                let mut result = json!({"controls": list});
                // Forcing a keyframe is not a control, but its absence is said here too.
                if let Some(why) = pipeline
                    .status()
                    .borrow()
                    .encoder
                    .as_ref()
                    .and_then(|e| e.keyframes_unavailable.clone())
                {
                    result["keyframes_unavailable"] = Value::String(why);
                }
                done(result)
            }
            Command::GetControl { name } => {
                let c = self
                    .controls()
                    .await?
                    .into_iter()
                    .find(|c| c.name == name)
                    .ok_or_else(|| control_error(ControlError::Unknown(name)))?;
                done(json!({"name": c.name, "value": c.value}))
            }
            Command::SetControl { name, value } => {
                let applied = pipeline
                    .set_control(name.clone(), value)
                    .await
                    .map_err(pipeline_error)?
                    .map_err(control_error)?;
                tracing::info!(%name, value = applied, "control set");
                done(json!({"name": name, "value": applied}))
            }
            Command::GetState => serde_json::to_value(self.inner.state.current())
                .map_err(unavailable)
                .map(CommandOutput::Done),
            Command::Snapshot { quality } => {
                let (jpeg, result) = self.snapshot(quality).await?;
                Ok(CommandOutput::Snapshot { jpeg, result })
            }
            Command::Forward {
                namespace,
                name,
                args,
            } => {
                self.forward(origin, id, &namespace, &name, args)?;
                Ok(CommandOutput::Forwarded)
            }
        }
    }

    async fn reconfigure(
        &self,
        change: CaptureChange,
    ) -> Result<crate::media::source::CaptureParams, CommandError> {
        self.inner
            .pipeline
            .reconfigure(change)
            .await
            .map_err(pipeline_error)?
            .map_err(unavailable)
    }

    async fn controls(&self) -> Result<Vec<crate::media::controls::ControlInfo>, CommandError> {
        self.inner
            .pipeline
            .list_controls()
            .await
            .map_err(pipeline_error)?
            .map_err(control_error)
    }

    /// Takes the next picture and encodes it off the async threads.
    async fn snapshot(&self, quality: u8) -> Result<(Vec<u8>, Value), CommandError> {
        let frame = self
            .inner
            .pipeline
            .snapshot()
            .await
            .map_err(pipeline_error)?
            .map_err(unavailable)?;
        let (width, height) = (frame.width, frame.height);
        let jpeg = tokio::task::spawn_blocking(move || encode_jpeg(&frame, quality))
            .await
            .map_err(unavailable)?
            .map_err(|e| unavailable(format!("JPEG encoding: {e}")))?;
        tracing::info!(bytes = jpeg.len(), width, height, "snapshot taken");
        let result =
            json!({"type": "image/jpeg", "size": jpeg.len(), "width": width, "height": height});
        Ok((jpeg, result))
    }

    fn forward(
        &self,
        origin: &Origin,
        id: &RequestId,
        namespace: &str,
        name: &str,
        args: serde_json::Map<String, Value>,
    ) -> Result<(), CommandError> {
        let inner = &self.inner;
        if !self.forwards(namespace) {
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
                    inner.topics.forward(namespace)
                ),
            ));
        };
        inner.router.expect_reply(session, id)?;
        let payload = json!({
            "v": crate::protocol::PROTOCOL_VERSION,
            "session": session.as_str(),
            "id": id,
            "cmd": format!("{namespace}.{name}"),
            "args": args,
            "reply_to": inner.topics.forward_reply(),
        });
        if let Err(e) = inner.publish.publish(
            inner.topics.forward(namespace),
            payload.to_string().into_bytes(),
            false,
        ) {
            inner.router.forget(session, id);
            return Err(CommandError::new(CommandErrorCode::Busy, e.to_string()));
        }
        tracing::info!(%namespace, %name, "command forwarded");
        Ok(())
    }
}

/// A controller over a real test-pattern pipeline, for tests of the adapters.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::media::encoder::EncoderSettings;
    use crate::media::pipeline::{self, PipelineConfig};
    use crate::media::source::{CaptureParams, FrameSource};
    use crate::media::test_pattern::TestPattern;
    use crate::outbound::RecordingPublisher;
    use crate::state::{SessionCounts, StateInfo};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    pub(crate) struct Rig {
        pub controller: Controller,
        pub publish: Arc<RecordingPublisher>,
        pub topics: Topics,
        pub tracker: TaskTracker,
        pub cancel: CancellationToken,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Rig {
        /// `rate`: per-source (per second, burst); the global limit is far above it.
        pub fn new(rate: (u32, u32), forward_namespaces: &[&str]) -> Self {
            Self::with_source(
                rate,
                forward_namespaces,
                Box::new(|p: CaptureParams| {
                    Ok(Box::new(TestPattern::new(p.width, p.height, p.fps, true))
                        as Box<dyn FrameSource>)
                }),
                false,
            )
        }

        /// With another source; `camera_h264`: it may send H.264 itself.
        pub fn with_source(
            rate: (u32, u32),
            forward_namespaces: &[&str],
            opener: crate::media::source::SourceOpener,
            camera_h264: bool,
        ) -> Self {
            let cancel = CancellationToken::new();
            let tracker = TaskTracker::new();
            let (handle, thread) = pipeline::spawn(
                PipelineConfig {
                    encoder: EncoderSettings {
                        bitrate: 500_000,
                        fps: 30,
                        keyframe_interval: 30,
                        temporal_layers: 1,
                    },
                    capture: CaptureParams {
                        width: 320,
                        height: 240,
                        fps: 30,
                    },
                    reopen_delay: std::time::Duration::from_millis(50),
                    rate_policy: false,
                    min_bitrate: 150_000,
                    hardware: None,
                    camera_h264,
                    gop_cache_bytes: 0,
                },
                opener,
                cancel.clone(),
            )
            .expect("capture thread");
            let (_counts_tx, counts) = tokio::sync::watch::channel(SessionCounts::default());
            let topics = Topics::new("rtcam", "t");
            let publish = Arc::new(RecordingPublisher::default());
            let router = forwarding::spawn_router(
                std::time::Duration::from_millis(300),
                &tracker,
                cancel.clone(),
            );
            let controller = Controller::new(
                handle.clone(),
                topics.clone(),
                publish.clone(),
                router,
                ControlSettings {
                    forward_namespaces: forward_namespaces.iter().map(|s| s.to_string()).collect(),
                    source_rate: rate,
                    global_rate: (100_000, 100_000),
                },
                StateReader::new(
                    handle,
                    counts,
                    &crate::state::LinkBoard::default(),
                    StateInfo {
                        max_viewers: 4,
                        source: "test-pattern".into(),
                        whep_url: None,
                    },
                ),
            );
            Self {
                controller,
                publish,
                topics,
                tracker,
                cancel,
                thread: Some(thread),
            }
        }

        pub async fn stop(mut self) {
            self.cancel.cancel();
            self.tracker.close();
            self.tracker.wait().await;
            if let Some(t) = self.thread.take() {
                tokio::task::spawn_blocking(move || t.join().expect("capture thread"))
                    .await
                    .expect("join");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Rig;
    use super::*;

    fn sid(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn keyframe_and_bitrate_are_unavailable_with_the_reason_for_a_camera_without_the_controls()
     {
        let units = std::sync::Arc::new(crate::media::h264::annexb::tests::encoded_stream(4, 60));
        let rig = Rig::with_source(
            (100, 100),
            &[],
            crate::media::passthrough::tests::H264Camera::opener(units),
            true,
        );
        let c = &rig.controller;
        let mqtt = Origin::Mqtt;
        let id = json!(1);
        // Listing the controls opens the camera: it passes H.264 through and says keyframes
        // cannot be forced.
        let Ok(CommandOutput::Done(listed)) = c
            .run(&mqtt, &Access::Open, &id, Command::ListControls)
            .await
        else {
            panic!("list-controls failed");
        };
        let why = listed["keyframes_unavailable"].as_str().unwrap().to_owned();
        assert!(why.contains("FORCE_KEY_FRAME"), "{why}");
        let e = c
            .run(&mqtt, &Access::Open, &id, Command::Keyframe)
            .await
            .unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (CommandErrorCode::Unavailable, why.as_str())
        );
        let e = c
            .run(
                &mqtt,
                &Access::Open,
                &id,
                Command::SetBitrate { bps: 500_000 },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, CommandErrorCode::Unavailable);
        assert!(e.message.contains("BITRATE"), "{}", e.message);
        let state = c.inner.state.current();
        assert_eq!(state.encoder.unwrap().backend, "camera");
        assert_eq!(state.profile_level_id.as_deref(), Some("42c00c"));
        rig.stop().await;
    }

    #[tokio::test]
    async fn commands_run_and_errors_are_typed() {
        let rig = Rig::new((100, 100), &["ptz"]);
        let c = &rig.controller;
        let viewer = Origin::Viewer(sid("v1"));
        let id = json!(1);
        assert_eq!(
            c.run(&viewer, &Access::Open, &id, Command::Ping { t: json!(7) })
                .await,
            Ok(CommandOutput::Done(json!({"pong": true, "t": 7})))
        );
        assert_eq!(
            c.run(
                &viewer,
                &Access::Open,
                &id,
                Command::SetBitrate { bps: 300_000 }
            )
            .await,
            Ok(CommandOutput::Done(json!({"bps": 300_000})))
        );
        let e = c
            .run(
                &viewer,
                &Access::Open,
                &id,
                Command::SetControl {
                    name: "zoom".into(),
                    value: 1,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, CommandErrorCode::BadArgs);
        let Ok(CommandOutput::Done(state)) =
            c.run(&viewer, &Access::Open, &id, Command::GetState).await
        else {
            panic!()
        };
        assert_eq!(state["bitrate"], 300_000);
        let Ok(CommandOutput::Snapshot { jpeg, result }) = c
            .run(
                &Origin::Mqtt,
                &Access::Open,
                &id,
                Command::Snapshot { quality: 50 },
            )
            .await
        else {
            panic!()
        };
        assert!(jpeg.starts_with(&[0xff, 0xd8]));
        assert_eq!(result["size"], jpeg.len());
        // Forwarding: allowed namespaces from viewers only.
        let fwd = |ns: &str| Command::Forward {
            namespace: ns.into(),
            name: "move".into(),
            args: Default::default(),
        };
        assert_eq!(
            c.run(&viewer, &Access::Open, &id, fwd("ptz")).await,
            Ok(CommandOutput::Forwarded)
        );
        assert_eq!(
            rig.publish.json_on("rtcam/t/forward/ptz")[0]["session"],
            "v1"
        );
        assert_eq!(
            c.run(&viewer, &Access::Open, &id, fwd("light"))
                .await
                .unwrap_err()
                .code,
            CommandErrorCode::NotAllowed
        );
        assert_eq!(
            c.run(&Origin::Mqtt, &Access::Open, &id, fwd("ptz"))
                .await
                .unwrap_err()
                .code,
            CommandErrorCode::BadRequest
        );
        rig.stop().await;
    }

    #[tokio::test]
    async fn admission_takes_from_the_source_and_the_global_bucket() {
        let rig = Rig::new((10, 3), &[]);
        let now = Instant::now();
        let mut a = rig.controller.source_limiter(now);
        let mut b = rig.controller.source_limiter(now);
        assert_eq!(
            (0..5)
                .filter(|_| rig.controller.admit(&mut a, now).is_ok())
                .count(),
            3
        );
        let e = rig.controller.admit(&mut a, now).unwrap_err();
        assert_eq!(e.code, CommandErrorCode::RateLimited);
        assert!(
            rig.controller.admit(&mut b, now).is_ok(),
            "another source has its own bucket"
        );
        rig.stop().await;
    }
}
