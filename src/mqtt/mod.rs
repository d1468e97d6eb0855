//! MQTT transport (MQTT 5): one task owns the rumqttc event loop; everyone else publishes through a non-blocking handle.
//!
//! MQTT 5 because of one property: the client announces a Maximum Packet Size, and the broker
//! then drops any larger message for this client instead of sending it. With MQTT 3.1.1 a
//! single oversized publish on a subscribed topic would break the connection (rumqttc cannot
//! skip a packet) and fire the last will (docs/security.md, "Oversized publishes").

pub(crate) mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ClientError, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::log_limit::LogLimiter;
use crate::outbound::{Publish, PublishError};

/// Room for the topic, properties and header of a packet besides its payload.
pub(crate) const PACKET_HEADROOM: usize = 4096;
/// Publishes and subscribes queued for the event loop at most; beyond that publishing is
/// refused (counted and logged) instead of blocking the caller.
const REQUEST_QUEUE: usize = 1024;
/// QoS 1 publishes in flight at once. rumqttc's v5 client allocates a slot per possible
/// packet id up front and defaults to all 65,535 (about 14 MB of heap before the first
/// message); rtcam's QoS 1 traffic is its retained status, state and discovery, so the
/// v4 client's default of 100 is plenty.
const OUTGOING_INFLIGHT: u16 = 100;

/// Connection settings, resolved from the config (secrets already read from their files).
#[derive(Clone)]
pub(crate) struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub keep_alive: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// TLS to the broker (None: plain TCP).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The last will: (topic, payload), retained.
    pub last_will: (String, Vec<u8>),
    /// Topic filters subscribed after every (re)connect.
    pub subscriptions: Vec<String>,
    /// The Maximum Packet Size announced to the broker: it drops larger messages for this
    /// client (MQTT 5 §3.1.2.11.4), so they never reach it.
    pub max_incoming_packet: usize,
}

impl MqttSettings {
    /// "host:port (TLS, user rtcam)" for log lines and status messages.
    pub fn describe(&self) -> String {
        let tls = if self.tls.is_some() {
            "TLS"
        } else {
            "plain TCP"
        };
        let user = if self.username.is_empty() {
            "anonymous".to_string()
        } else {
            format!("user {}", self.username)
        };
        format!("{}:{} ({tls}, {user})", self.host, self.port)
    }
}

/// What the connection task reports to the inbound dispatcher.
pub(crate) enum MqttEvent {
    /// Connected (again): subscriptions are queued; announce yourself.
    Connected,
    /// A publish on a subscribed topic.
    Message { topic: String, payload: Bytes },
}

/// Cloneable publishing handle. Publishing never waits for the broker: while it is away,
/// messages beyond the client's queue are refused, counted and logged instead of stalling
/// callers.
#[derive(Clone)]
pub(crate) struct MqttHandle {
    client: AsyncClient,
    refused: Arc<RefusalLog>,
    /// Publishes handed to the client so far (all QoS 1).
    requested: Arc<AtomicU64>,
    /// Set at shutdown: disconnect once this many publishes have been sent and acknowledged.
    goodbye: Arc<watch::Sender<Option<u64>>>,
}

/// Counts refused publishes; logs them at most once a minute.
struct RefusalLog {
    count: AtomicU64,
    log: std::sync::Mutex<LogLimiter>,
}

impl Publish for MqttHandle {
    fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), PublishError> {
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => {
                self.requested.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let total = self.refused.count.fetch_add(1, Ordering::Relaxed) + 1;
                let allowed = self
                    .refused
                    .log
                    .lock()
                    // A poisoned limiter is still a valid limiter.
                    .unwrap_or_else(|p| p.into_inner())
                    .allow(Instant::now());
                if let Some(suppressed) = allowed {
                    tracing::warn!(error = %e, total, suppressed, "MQTT publish refused: the outgoing queue is full");
                }
                Err(match e {
                    ClientError::TryRequest(_) | ClientError::Request(_) => PublishError::Full,
                })
            }
        }
    }
}

impl MqttHandle {
    /// Publishes `payload` on `topic` (retained), then disconnects cleanly once the broker
    /// has acknowledged every publish queued until then (the last byes, `offline`): the
    /// connection task ends when the DISCONNECT is written. Closing the connection with
    /// acknowledgements still due makes mosquitto before 2.0.22 treat it as an error (it logs
    /// "out of memory"), drop what it had not read yet and send the last will. Used at
    /// shutdown; the caller bounds the wait.
    pub fn say_goodbye(&self, topic: String, payload: Vec<u8>) {
        let _ = self.publish(topic, payload, true);
        self.goodbye
            .send_replace(Some(self.requested.load(Ordering::Relaxed)));
    }
}

/// Builds the client handle and the event loop the connection task will own.
pub(crate) fn connect(settings: &MqttSettings) -> (MqttHandle, EventLoop) {
    let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
    let (will_topic, will_payload) = settings.last_will.clone();
    options
        .set_keep_alive(settings.keep_alive)
        .set_clean_start(true)
        .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT)
        .set_max_packet_size(Some(
            u32::try_from(settings.max_incoming_packet).unwrap_or(u32::MAX),
        ))
        .set_last_will(LastWill::new(
            will_topic,
            will_payload,
            QoS::AtLeastOnce,
            true,
            None,
        ));
    if !settings.username.is_empty() {
        options.set_credentials(&settings.username, &settings.password);
    }
    if let Some(tls) = &settings.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    (
        MqttHandle {
            client,
            refused: Arc::new(RefusalLog {
                count: AtomicU64::new(0),
                log: std::sync::Mutex::new(LogLimiter::new(Duration::from_secs(60), 1)),
            }),
            requested: Arc::new(AtomicU64::new(0)),
            goodbye: Arc::new(watch::channel(None).0),
        },
        eventloop,
    )
}

/// Owns the event loop: polls it, re-subscribes after every (re)connect, backs off between
/// failed attempts, and hands every event to `on_event` without awaiting anything else.
/// `connected` counts successful connections (0 = never connected). Ends when the clean
/// DISCONNECT has been written, or on `stop`.
pub(crate) async fn run_event_loop(
    mut eventloop: EventLoop,
    handle: MqttHandle,
    settings: MqttSettings,
    mut on_event: impl FnMut(MqttEvent) + Send,
    connected: watch::Sender<u64>,
    stop: CancellationToken,
) {
    let mut backoff = settings.reconnect_min;
    let mut failures = 0u64;
    // Subscriptions queued, then sent (their packet ids), to name a refused one in the log.
    let mut queued_subscriptions = std::collections::VecDeque::new();
    let mut sent_subscriptions = std::collections::HashMap::new();
    // Publishes written to the broker, and those not acknowledged yet on this connection.
    let mut published = 0u64;
    let mut unacked = 0u64;
    let mut goodbye = handle.goodbye.subscribe();
    let mut disconnect_queued = false;
    loop {
        if !disconnect_queued
            && let Some(target) = *goodbye.borrow_and_update()
            && published >= target
            && unacked == 0
        {
            disconnect_queued = true;
            if let Err(e) = handle.client.try_disconnect() {
                tracing::debug!(error = %e, "MQTT disconnect could not be queued");
            }
        }
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            _ = goodbye.changed(), if !disconnect_queued => continue,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                published += 1;
                unacked += 1;
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => unacked = unacked.saturating_sub(1),
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                // A clean start: what was in flight is sent again and counted again.
                unacked = 0;
                tracing::info!(broker = %settings.describe(), code = ?ack.code, "MQTT connected");
                if failures > 0 {
                    tracing::info!(failures, "MQTT broker reachable again");
                }
                failures = 0;
                backoff = settings.reconnect_min;
                // try_* only queue the request; awaiting here would deadlock this very loop.
                queued_subscriptions.clear();
                sent_subscriptions.clear();
                for filter in &settings.subscriptions {
                    match handle.client.try_subscribe(filter, QoS::AtLeastOnce) {
                        Ok(()) => queued_subscriptions.push_back(filter.clone()),
                        Err(e) => {
                            tracing::error!(%filter, error = %e, "cannot queue MQTT subscribe")
                        }
                    }
                }
                on_event(MqttEvent::Connected);
                connected.send_modify(|n| *n += 1);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match String::from_utf8(p.topic.to_vec()) {
                Ok(topic) => on_event(MqttEvent::Message {
                    topic,
                    payload: p.payload,
                }),
                // Brokers check topic names; should one not, the message addresses nobody.
                Err(_) => tracing::debug!("message with a non-UTF-8 topic ignored"),
            },
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!(broker = %settings.describe(), reason = ?d.reason_code, "the MQTT broker disconnected rtcam");
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                if let Some(filter) = queued_subscriptions.pop_front() {
                    sent_subscriptions.insert(pkid, filter);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let filter = sent_subscriptions.remove(&ack.pkid).unwrap_or_default();
                for code in &ack.return_codes {
                    if !matches!(code, SubscribeReasonCode::Success(_)) {
                        // Usually the broker's ACL: rtcam will not hear what is sent there.
                        tracing::warn!(broker = %settings.describe(), %filter, reason = ?code, "the MQTT broker refused a subscription");
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                tracing::debug!("MQTT disconnected cleanly");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                // The first failure and then every tenth: the backoff keeps this rare anyway.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(broker = %settings.describe(), error = %e, failures, retry_in = ?backoff, "MQTT connection failed");
                } else {
                    tracing::debug!(broker = %settings.describe(), error = %e, failures, retry_in = ?backoff, "MQTT connection failed");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(settings.reconnect_max);
            }
        }
    }
    tracing::debug!("MQTT event loop finished");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(port: u16) -> MqttSettings {
        MqttSettings {
            host: "127.0.0.1".into(),
            port,
            client_id: "rtcam-test".into(),
            username: String::new(),
            password: String::new(),
            keep_alive: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(80),
            tls: None,
            last_will: ("rtcam/t/status".into(), b"{}".to_vec()),
            subscriptions: vec!["rtcam/t/command".into()],
            max_incoming_packet: 65536,
        }
    }

    #[test]
    fn description_names_the_broker_and_the_mode() {
        let mut s = settings(8883);
        assert_eq!(s.describe(), "127.0.0.1:8883 (plain TCP, anonymous)");
        s.username = "cam".into();
        assert_eq!(s.describe(), "127.0.0.1:8883 (plain TCP, user cam)");
    }

    #[tokio::test]
    async fn unreachable_broker_backs_off_and_shuts_down_cleanly() {
        // Bind then drop: nothing listens on this port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = settings(port);
        let (handle, eventloop) = connect(&s);
        let (ctx, crx) = watch::channel(0);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_event_loop(
            eventloop,
            handle.clone(),
            s,
            |_| {},
            ctx,
            stop.clone(),
        ));
        // Publishing while disconnected must not block; beyond the queue it is refused.
        let refused = (0..REQUEST_QUEUE + 10)
            .filter(|_| handle.publish("x".into(), vec![1], false).is_err())
            .count();
        assert!(refused >= 10, "{refused}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(*crx.borrow(), 0);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("event loop stops on cancel")
            .unwrap();
    }
}
