//! The ports the core publishes through (implemented by the MQTT client), so nothing above the transport imports it.

use std::sync::Arc;

use crate::protocol::signal::DeviceMessage;
use crate::protocol::topics::{SessionId, Topics};

/// Why a publish did not go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PublishError {
    #[error("the MQTT client's outgoing queue is full")]
    Full,
}

/// Publishing to MQTT without waiting: a publish is queued for the connection task, or
/// refused at once (the implementation counts and logs refusals).
pub(crate) trait Publish: Send + Sync + 'static {
    fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), PublishError>;
}

/// A session's outbound signaling: device messages on `<base>/session/<id>/out`.
#[derive(Clone)]
pub(crate) struct SignalOut {
    publish: Arc<dyn Publish>,
    topics: Topics,
}

impl SignalOut {
    pub fn new(publish: Arc<dyn Publish>, topics: Topics) -> Self {
        Self { publish, topics }
    }

    pub fn send(&self, id: &SessionId, message: &DeviceMessage) {
        // A refused publish is counted and logged by the publisher; the session's own state
        // does not depend on it.
        let _ = self
            .publish
            .publish(self.topics.session_out(id), message.to_json(), false);
    }
}

/// Records what was published, for tests.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct RecordingPublisher {
    pub published: std::sync::Mutex<Vec<(String, Vec<u8>, bool)>>,
}

#[cfg(test)]
impl Publish for RecordingPublisher {
    fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), PublishError> {
        self.published
            .lock()
            .expect("test lock")
            .push((topic, payload, retain));
        Ok(())
    }
}

#[cfg(test)]
impl RecordingPublisher {
    /// Every payload published on `topic`, parsed as JSON.
    pub fn json_on(&self, topic: &str) -> Vec<serde_json::Value> {
        self.published
            .lock()
            .expect("test lock")
            .iter()
            .filter(|(t, _, _)| t == topic)
            .filter_map(|(_, p, _)| serde_json::from_slice(p).ok())
            .collect()
    }
}
