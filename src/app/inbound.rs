//! The one inbound MQTT dispatcher: routes each topic to its owner without waiting, and announces the device on every connect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::control::forwarding::RouterHandle;
use crate::control::mqtt::MqttCommands;
use crate::log_limit::LogLimiter;
use crate::mqtt::MqttEvent;
use crate::outbound::{Publish, SignalOut};
use crate::protocol::signal::{DeviceMessage, ErrorCode, Rejection};
use crate::protocol::topics::{InboundTopic, Topics};
use crate::signaling::SignalingHandle;

use super::retained::RetainedGuard;

/// Home Assistant discovery: the retained config message and HA's birth topic.
pub(crate) struct Discovery {
    pub config_topic: String,
    /// The current payload (it gains the camera's controls once they are known). Empty:
    /// remove an earlier discovery (integration disabled).
    pub payload: watch::Receiver<Vec<u8>>,
    /// Set when enabled: `online` here (HA's plain-text birth message) triggers a republish.
    pub ha_status_topic: Option<String>,
}

/// Routes inbound MQTT messages; owned by the MQTT connection task, so it never blocks.
pub(crate) struct Dispatcher {
    pub topics: Topics,
    pub signaling: SignalingHandle,
    pub signal: SignalOut,
    pub commands: MqttCommands,
    pub router: RouterHandle,
    pub publish: Arc<dyn Publish>,
    /// The retained `online` status payload.
    pub online: Vec<u8>,
    pub discovery: Discovery,
    /// The device's own retained topics: overwrites by others are repaired.
    pub retained: RetainedGuard,
    log: LogLimiter,
}

impl Dispatcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topics: Topics,
        signaling: SignalingHandle,
        signal: SignalOut,
        commands: MqttCommands,
        router: RouterHandle,
        publish: Arc<dyn Publish>,
        online: Vec<u8>,
        discovery: Discovery,
        retained: RetainedGuard,
    ) -> Self {
        Self {
            topics,
            signaling,
            signal,
            commands,
            router,
            publish,
            online,
            discovery,
            retained,
            log: LogLimiter::new(Duration::from_secs(10), 5),
        }
    }

    pub fn on_event(&mut self, event: MqttEvent) {
        match event {
            MqttEvent::Connected => self.announce(),
            MqttEvent::Message { topic, payload } => self.route(&topic, payload),
        }
    }

    /// Retained status and discovery after every (re)connect: a broker restart loses them.
    fn announce(&self) {
        let _ = self
            .publish
            .publish(self.topics.status(), self.online.clone(), true);
        self.publish_discovery();
    }

    fn publish_discovery(&self) {
        let payload = self.discovery.payload.borrow().clone();
        let _ = self
            .publish
            .publish(self.discovery.config_topic.clone(), payload, true);
    }

    fn route(&mut self, topic: &str, payload: bytes::Bytes) {
        let now = Instant::now();
        if self.retained.observe(topic, &payload, now) {
            return;
        }
        if self.discovery.ha_status_topic.as_deref() == Some(topic) {
            if payload.as_ref() == b"online" {
                tracing::info!("Home Assistant came online; republishing discovery");
                self.publish_discovery();
            }
            return;
        }
        match self.topics.parse_inbound(topic) {
            InboundTopic::SessionIn(id) => {
                if let Err(e) = self.signaling.submit(id.clone(), payload) {
                    let busy = Rejection::new(ErrorCode::Busy, e.to_string());
                    self.signal.send(&id, &DeviceMessage::error(&busy));
                    if let Some(suppressed) = self.log.allow(now) {
                        tracing::warn!(session = %id, suppressed, "signaling queue full; answered busy");
                    }
                }
            }
            InboundTopic::Command => {
                self.commands
                    .submit(&payload, now, crate::outbound::unix_ms())
            }
            InboundTopic::ForwardReply => {
                if let Err(e) = self.router.service_reply(payload)
                    && let Some(suppressed) = self.log.allow(now)
                {
                    tracing::warn!(error = %e, suppressed, "service reply dropped");
                }
            }
            InboundTopic::Events => {
                if let Err(e) = self.router.event(payload)
                    && let Some(suppressed) = self.log.allow(now)
                {
                    tracing::warn!(error = %e, suppressed, "service event dropped");
                }
            }
            InboundTopic::BadSessionId(id) => {
                // No reply topic can be trusted for an invalid id.
                if let Some(suppressed) = self.log.allow(now) {
                    tracing::info!(id = %id.escape_debug(), suppressed, "message with an invalid session id ignored");
                }
            }
            InboundTopic::Other => {
                tracing::debug!(topic = %topic.escape_debug(), "message on an unexpected topic ignored")
            }
        }
    }
}
