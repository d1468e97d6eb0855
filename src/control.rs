//! Executes validated control commands against the pipeline and builds their replies.

use serde_json::{Value, json};

use crate::media::pipeline::PipelineHandle;
use crate::protocol::command::{Command, CommandError, CommandErrorCode, parse_request, reply};

/// Applies commands; cloneable, one per viewer data channel or MQTT command source.
#[derive(Clone)]
pub struct Controller {
    pipeline: PipelineHandle,
}

impl Controller {
    pub fn new(pipeline: PipelineHandle) -> Self {
        Self { pipeline }
    }

    /// Parses, validates and runs one message; always returns exactly one reply.
    pub async fn handle_message(&self, message: &[u8]) -> String {
        let request = parse_request(message);
        let outcome = match request.command {
            Ok(command) => self.execute(command).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &outcome {
            tracing::debug!(code = ?e.code, message = %e.message, "command refused");
        }
        reply(&request.id, &outcome)
    }

    async fn execute(&self, command: Command) -> Result<Value, CommandError> {
        match command {
            Command::Ping { t } => Ok(json!({"pong": true, "t": t})),
            Command::Keyframe => {
                self.pipeline.request_keyframe();
                Ok(json!({}))
            }
            Command::SetBitrate { bps } => {
                let applied = self
                    .pipeline
                    .set_bitrate(bps)
                    .await
                    .map_err(|e| CommandError::new(CommandErrorCode::Unavailable, e))?;
                tracing::info!(bps = applied, "bitrate changed");
                Ok(json!({"bps": applied}))
            }
        }
    }
}
