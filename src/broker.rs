//! Embedded MQTT broker (rumqttd) for the demo: an MQTT 5 TCP and an MQTT 3.1.1 WebSocket listener that start before rtcam connects and stop at shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{LinkType, Router, Server, ServerSettings};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerConfig, EMBEDDED_BROKER_MAX_PAYLOAD};

/// How long `start` waits for the listeners to accept connections.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// rumqttd's configuration for rtcam's two listeners.
fn broker_config(config: &BrokerConfig) -> Result<rumqttd::Config> {
    let connections = json!({
        "connection_timeout_ms": 60000,
        "max_payload_size": EMBEDDED_BROKER_MAX_PAYLOAD,
        "max_inflight_count": 200,
        "dynamic_filters": true
    });
    let value = json!({
        "id": 0,
        "router": {
            "id": 0,
            "max_connections": 64,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 16 << 20,
            "max_segment_count": 4
        },
        // TCP speaks MQTT 5 (rtcam's own client); WebSocket 3.1.1 (browsers, mqtt.js).
        "v5": {"1": {"name": "v5-1", "listen": config.listen.to_string(),
                      "next_connection_delay_ms": 1, "connections": connections}},
        "ws": {"1": {"name": "ws-1", "listen": config.ws_listen.to_string(),
                      "next_connection_delay_ms": 1, "connections": connections}}
    });
    serde_json::from_value(value).context("embedded broker configuration")
}

fn listener(
    servers: &Option<std::collections::HashMap<String, ServerSettings>>,
) -> Result<ServerSettings> {
    servers
        .as_ref()
        .and_then(|m| m.values().next().cloned())
        .context("embedded broker configuration has no listener")
}

/// Starts the broker's router and both listeners as tasks that end with `cancel`, and
/// returns once both listeners accept connections (so rtcam's own client finds it up).
pub(crate) async fn start(
    config: &BrokerConfig,
    tracker: &tokio_util::task::TaskTracker,
    cancel: CancellationToken,
) -> Result<()> {
    let broker = broker_config(config)?;
    // Fail early and clearly if the ports are taken, instead of inside rumqttd's tasks.
    for addr in [config.listen, config.ws_listen] {
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("embedded broker cannot listen on {addr}"))?;
    }
    // The router runs on a thread of its own; it lives as long as the process.
    let router_tx = Router::new(broker.id, broker.router.clone()).spawn();
    let mut tcp = Server::new(listener(&broker.v5)?, router_tx.clone(), V5);
    let mut ws = Server::new(listener(&broker.ws)?, router_tx, V4);
    for serve in [
        Box::pin(async move { tcp.start(LinkType::Remote).await })
            as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
        Box::pin(async move { ws.start(LinkType::Websocket).await }),
    ] {
        let cancel = cancel.clone();
        tracker.spawn(async move {
            // Cancelling drops the listener: the port is free again.
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = serve => if let Err(e) = r {
                    tracing::error!(error = %e, "embedded MQTT broker listener stopped");
                },
            }
        });
    }
    wait_until_serving(config.listen).await?;
    tracing::info!(tcp = %config.listen, ws = %config.ws_listen, "embedded MQTT broker started");
    Ok(())
}

/// Connects an MQTT client to `addr` until the broker answers (up to [`LISTEN_TIMEOUT`]),
/// then disconnects cleanly: a bare TCP probe would make the broker log a broken connection.
async fn wait_until_serving(addr: SocketAddr) -> Result<()> {
    use rumqttc::Outgoing;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let deadline = tokio::time::Instant::now() + LISTEN_TIMEOUT;
    let host = addr.ip().to_string();
    loop {
        let (client, mut eventloop) = AsyncClient::new(
            MqttOptions::new("rtcam-broker-probe", &host, addr.port()),
            4,
        );
        let attempt = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_disconnect();
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(true) => return Ok(()),
            Ok(false) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ => anyhow::bail!("embedded broker is not serving on {addr} after {LISTEN_TIMEOUT:?}"),
        }
    }
}
