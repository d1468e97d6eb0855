//! The ports the core publishes through (implemented by the MQTT client), so nothing above the transport imports it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::protocol::auth::keys::SigningKey;
use crate::protocol::auth::seal_device_message;
use crate::protocol::signal::DeviceMessage;
use crate::protocol::topics::{SessionId, Topics};

/// The wall clock as Unix milliseconds (0 before 1970): the time signed mode signs and checks.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

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

/// A session's outbound signaling: device messages on `<base>/session/<id>/out`, signed
/// with the device key in signed mode (docs/protocol.md §9.6), or, for a WHEP session, to
/// the HTTP request that opened it (docs/whep.md).
#[derive(Clone)]
pub(crate) struct SignalOut {
    route: Route,
}

#[derive(Clone)]
enum Route {
    Mqtt {
        publish: Arc<dyn Publish>,
        topics: Topics,
        /// The device identity key; `None` in open mode (plain messages).
        device_key: Option<Arc<SigningKey>>,
    },
    /// A WHEP session: its answer and candidates go back in the POST's response. Once that
    /// is sent nobody listens, and later messages (a bye) are dropped: WHEP has no channel
    /// from the device to the client besides the media connection itself.
    Http(tokio::sync::mpsc::Sender<DeviceMessage>),
}

impl SignalOut {
    pub fn new(
        publish: Arc<dyn Publish>,
        topics: Topics,
        device_key: Option<Arc<SigningKey>>,
    ) -> Self {
        Self {
            route: Route::Mqtt {
                publish,
                topics,
                device_key,
            },
        }
    }

    /// A WHEP session's messages, to the HTTP request waiting for its answer.
    pub fn http(sink: tokio::sync::mpsc::Sender<DeviceMessage>) -> Self {
        Self {
            route: Route::Http(sink),
        }
    }

    pub fn send(&self, id: &SessionId, message: &DeviceMessage) {
        let (publish, topics, device_key) = match &self.route {
            Route::Mqtt {
                publish,
                topics,
                device_key,
            } => (publish, topics, device_key),
            Route::Http(sink) => {
                if sink.try_send(message.clone()).is_err() {
                    tracing::debug!(session = %id, "WHEP: message after the response dropped");
                }
                return;
            }
        };
        let topic = topics.session_out(id);
        let json = message.to_json();
        let payload = match device_key {
            None => json,
            Some(key) => {
                // `to_json` writes UTF-8 JSON and topics never contain LF (ids are checked),
                // so sealing cannot fail; should it anyway, nothing unsigned goes out.
                let text = String::from_utf8(json).unwrap_or_default();
                match seal_device_message(key, &topic, unix_ms(), &text) {
                    Ok(sealed) => sealed.into_bytes(),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot sign a device message");
                        return;
                    }
                }
            }
        };
        // A refused publish is counted and logged by the publisher; the session's own state
        // does not depend on it.
        let _ = publish.publish(topic, payload, false);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::auth::open_device_message;
    use crate::protocol::signal::{ByeReason, ErrorCode, Ref, Rejection};

    #[test]
    fn signed_mode_seals_every_device_message_for_its_session_topic() {
        let key = Arc::new(SigningKey::from_seed(&[5; 32]));
        let publisher = Arc::new(RecordingPublisher::default());
        let topics = Topics::new("rtcam", "cam1");
        let out = SignalOut::new(publisher.clone(), topics.clone(), Some(key.clone()));
        let id = SessionId::parse("abc").unwrap();
        out.send(&id, &DeviceMessage::bye(ByeReason::Expired));
        let refused = Rejection::new(ErrorCode::Unauthorized, "no").about(Ref::Sig("c2ln".into()));
        out.send(&id, &DeviceMessage::error(&refused));
        let published = publisher.published.lock().unwrap().clone();
        assert_eq!(published.len(), 2);
        let topic = topics.session_out(&id);
        let msgs: Vec<serde_json::Value> = published
            .iter()
            .map(|(t, p, retain)| {
                assert_eq!(t, &topic);
                assert!(!retain);
                let msg = open_device_message(&key.public_key(), p, t, unix_ms(), 60_000)
                    .expect("signed by the device key");
                serde_json::from_str(&msg).unwrap()
            })
            .collect();
        assert_eq!(
            msgs[0],
            serde_json::json!({"v":1,"type":"bye","reason":"expired"})
        );
        assert_eq!(msgs[1]["ref"], "c2ln");
        // Open mode: the plain message.
        let plain = Arc::new(RecordingPublisher::default());
        SignalOut::new(plain.clone(), topics.clone(), None)
            .send(&id, &DeviceMessage::bye(ByeReason::Shutdown));
        assert_eq!(
            plain.json_on(&topic),
            vec![serde_json::json!({"v":1,"type":"bye","reason":"shutdown"})]
        );
    }
}
