//! Embedded MQTT broker (rumqttd) for the demo: TCP and WebSocket listeners on the configured addresses.

use anyhow::{Context, Result};
use serde_json::json;

use crate::config::BrokerConfig;

/// Starts the broker on its own threads; it lives as long as the process.
pub fn start(config: &BrokerConfig) -> Result<()> {
    let connections = json!({
        "connection_timeout_ms": 60000,
        "max_payload_size": 1 << 20,
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
        "v4": {"1": {"name": "v4-1", "listen": config.listen.to_string(),
                      "next_connection_delay_ms": 1, "connections": connections}},
        "ws": {"1": {"name": "ws-1", "listen": config.ws_listen.to_string(),
                      "next_connection_delay_ms": 1, "connections": connections}}
    });
    let broker_config: rumqttd::Config =
        serde_json::from_value(value).context("embedded broker configuration")?;
    // Fail early and clearly if the ports are taken, instead of inside rumqttd's threads.
    for addr in [config.listen, config.ws_listen] {
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("embedded broker cannot listen on {addr}"))?;
    }
    std::thread::Builder::new()
        .name("rtcam-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(broker_config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .context("spawning the embedded broker thread")?;
    tracing::info!(tcp = %config.listen, ws = %config.ws_listen, "embedded MQTT broker started");
    Ok(())
}
