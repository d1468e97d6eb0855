//! MQTT connection: one task owns the rumqttc event loop; everyone else publishes through a non-blocking handle.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration,
    Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::protocol::signal::{DeviceMessage, status_payload};
use crate::protocol::topics::{SessionId, Topics};
use crate::viewer::SignalTransport;

/// Largest packet the client accepts from the broker. Bigger ones would make rumqttc drop
/// the connection; the application rejects anything above `mqtt.max_payload_bytes` itself.
const MAX_INCOMING_PACKET: usize = 16 << 20;

/// Connection settings, resolved from the config (secrets already read from their files).
#[derive(Clone)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub keep_alive: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub topics: Topics,
    pub device_id: String,
    /// TLS to the broker (None: plain TCP).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Home Assistant discovery: (config topic, payload; empty payload removes it, and
    /// Home Assistant's status topic to watch for `online`, when enabled).
    pub discovery: Option<Discovery>,
}

/// What to publish for Home Assistant after each connect.
#[derive(Clone, Debug)]
pub struct Discovery {
    pub config_topic: String,
    /// The current payload (it gains the camera's controls once they are known). Empty:
    /// remove an earlier discovery (integration disabled).
    pub payload: watch::Receiver<Vec<u8>>,
    /// Set when enabled: `online` here triggers a republish.
    pub ha_status_topic: Option<String>,
}

/// An inbound publish.
#[derive(Debug)]
pub struct Inbound {
    pub topic: String,
    pub payload: bytes::Bytes,
}

/// Cloneable publishing handle. Publishing never waits for the broker: while it is away,
/// messages beyond the client's queue are dropped with a warning instead of stalling callers.
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    topics: Topics,
}

impl MqttHandle {
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    pub fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        if let Err(e) = self
            .client
            .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
        {
            tracing::warn!(%topic, error = %e, "MQTT publish dropped");
        }
    }

    /// Publishes `offline` and disconnects cleanly (used at shutdown).
    pub async fn go_offline(&self, device_id: &str) {
        let _ = self
            .client
            .publish(
                self.topics.status(),
                QoS::AtLeastOnce,
                true,
                status_payload(device_id, false),
            )
            .await;
        let _ = self.client.disconnect().await;
    }
}

impl crate::control::Publisher for MqttHandle {
    fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) {
        MqttHandle::publish(self, topic, payload, retain);
    }
}

impl SignalTransport for MqttHandle {
    fn send(&self, id: &SessionId, message: &DeviceMessage) {
        self.publish(self.topics.session_out(id), message.to_json(), false);
    }
}

/// Why a TLS set-up for the broker connection is refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: no usable PEM certificate in it")]
    NoCertificates(&'static str),
    #[error("{what}: not valid PEM: {message}")]
    Pem { what: &'static str, message: String },
    #[error("TLS set-up refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls client configuration for the broker: trust the CAs in `ca_pem` and, for
/// mutual TLS, present `client` = (certificate chain PEM, private key PEM).
pub fn tls_client_config(
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, TlsError> {
    let pem_error = |what| {
        move |e: rustls::pki_types::pem::Error| TlsError::Pem {
            what,
            message: e.to_string(),
        }
    };
    let cas = CertificateDer::pem_slice_iter(ca_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error("mqtt.ca_file"))?;
    let mut roots = rustls::RootCertStore::empty();
    // A system bundle may hold a certificate rustls cannot parse; skip it, keep the rest.
    let (added, skipped) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(TlsError::NoCertificates("mqtt.ca_file"));
    }
    if skipped > 0 {
        tracing::warn!(skipped, "mqtt.ca_file: some certificates could not be used");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_error("mqtt.client_cert_file"))?;
            if chain.is_empty() {
                return Err(TlsError::NoCertificates("mqtt.client_cert_file"));
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(pem_error("mqtt.client_key_file"))?;
            builder.with_client_auth_cert(chain, key)?
        }
    })
}

/// Builds the client handle and the event loop the connection task will own.
pub fn connect(settings: &MqttSettings) -> (MqttHandle, EventLoop) {
    let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
    options
        .set_keep_alive(settings.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_INCOMING_PACKET)
        .set_last_will(LastWill::new(
            settings.topics.status(),
            status_payload(&settings.device_id, false),
            QoS::AtLeastOnce,
            true,
        ));
    if !settings.username.is_empty() {
        options.set_credentials(&settings.username, &settings.password);
    }
    if let Some(tls) = &settings.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    let (client, eventloop) = AsyncClient::new(options, 256);
    (
        MqttHandle {
            client,
            topics: settings.topics.clone(),
        },
        eventloop,
    )
}

/// Owns the event loop: polls it, re-subscribes and re-announces after every (re)connect,
/// backs off between failed attempts, and forwards inbound publishes without ever blocking.
/// `connected` counts successful connections (0 = never connected).
pub async fn run_event_loop(
    mut eventloop: EventLoop,
    handle: MqttHandle,
    settings: MqttSettings,
    inbound: mpsc::Sender<Inbound>,
    connected: watch::Sender<u64>,
    cancel: CancellationToken,
) {
    let mut backoff = settings.reconnect_min;
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(host = %settings.host, port = settings.port, code = ?ack.code, "MQTT connected");
                backoff = settings.reconnect_min;
                // try_* only queue the request; awaiting here would deadlock this very loop.
                for filter in settings.topics.subscriptions() {
                    if let Err(e) = handle.client.try_subscribe(&filter, QoS::AtLeastOnce) {
                        tracing::error!(%filter, error = %e, "cannot queue MQTT subscribe");
                    }
                }
                handle.publish(
                    settings.topics.status(),
                    status_payload(&settings.device_id, true),
                    true,
                );
                if let Some(d) = &settings.discovery {
                    if let Some(t) = &d.ha_status_topic
                        && let Err(e) = handle.client.try_subscribe(t, QoS::AtLeastOnce)
                    {
                        tracing::error!(error = %e, "cannot queue Home Assistant status subscribe");
                    }
                    handle.publish(d.config_topic.clone(), d.payload.borrow().clone(), true);
                }
                connected.send_modify(|n| *n += 1);
            }
            Ok(Event::Incoming(Packet::Publish(p)))
                if settings
                    .discovery
                    .as_ref()
                    .and_then(|d| d.ha_status_topic.as_deref())
                    == Some(p.topic.as_str()) =>
            {
                if let Some(d) = &settings.discovery
                    && p.payload.as_ref() == b"online"
                {
                    tracing::info!("Home Assistant came online; republishing discovery");
                    handle.publish(d.config_topic.clone(), d.payload.borrow().clone(), true);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = p.topic.clone();
                if inbound
                    .try_send(Inbound {
                        topic,
                        payload: p.payload,
                    })
                    .is_err()
                {
                    tracing::warn!("signaling queue full; inbound MQTT message dropped");
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                tracing::debug!("MQTT disconnected cleanly");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "MQTT connection error");
                tokio::select! {
                    _ = cancel.cancelled() => break,
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

    /// (CA PEM, client certificate PEM, client key PEM), freshly made.
    fn pki() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["rtcam".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca.pem(), cert.pem(), key.serialize_pem())
    }

    #[test]
    fn tls_config_from_pem_files() {
        let (ca, cert, key) = pki();
        let c = tls_client_config(ca.as_bytes(), None).unwrap();
        assert!(!c.client_auth_cert_resolver.has_certs());
        let c = tls_client_config(ca.as_bytes(), Some((cert.as_bytes(), key.as_bytes()))).unwrap();
        assert!(c.client_auth_cert_resolver.has_certs());
        // A bundle: the CA after another certificate still counts.
        let bundle = format!("{cert}{ca}");
        assert!(tls_client_config(bundle.as_bytes(), None).is_ok());
    }

    #[test]
    fn bad_tls_files_are_named_errors() {
        let (ca, cert, key) = pki();
        let e = tls_client_config(b"", None).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificates("mqtt.ca_file")), "{e}");
        let e = tls_client_config(key.as_bytes(), None).unwrap_err();
        assert!(e.to_string().contains("mqtt.ca_file"), "{e}");
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let e = tls_client_config(broken.as_bytes(), None).unwrap_err();
        assert!(e.to_string().contains("mqtt.ca_file"), "{e}");
        let e = tls_client_config(ca.as_bytes(), Some((b"", key.as_bytes()))).unwrap_err();
        assert!(e.to_string().contains("mqtt.client_cert_file"), "{e}");
        let e = tls_client_config(ca.as_bytes(), Some((cert.as_bytes(), b"nope"))).unwrap_err();
        assert!(e.to_string().contains("mqtt.client_key_file"), "{e}");
        // A key that does not match the certificate is refused up front.
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(
            tls_client_config(ca.as_bytes(), Some((cert.as_bytes(), other.as_bytes()))).is_err()
        );
    }

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
            topics: Topics::new("rtcam", "t"),
            device_id: "t".into(),
            tls: None,
            discovery: None,
        }
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
        let (tx, _rx) = mpsc::channel(4);
        let (ctx, crx) = watch::channel(0);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_event_loop(
            eventloop,
            handle.clone(),
            s,
            tx,
            ctx,
            cancel.clone(),
        ));
        // Publishing while disconnected must not block.
        for _ in 0..1000 {
            handle.publish("x".into(), vec![1], false);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(*crx.borrow(), 0);
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("event loop stops on cancel")
            .unwrap();
    }
}
