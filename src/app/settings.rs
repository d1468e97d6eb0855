//! Configuration turned into each component's settings, shared by `run` and `record`.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::{CaptureConfig, Config, EMBEDDED_BROKER_MAX_PAYLOAD, SourceKind, read_secret};
use crate::homeassistant;
use crate::media::encoder::EncoderSettings;
use crate::media::pipeline::PipelineConfig;
use crate::media::source::{CaptureParams, FrameSource, SourceOpener};
use crate::media::test_pattern::TestPattern;
use crate::media::v4l2::{Camera, CodedSettings};
use crate::mqtt::{MqttSettings, PACKET_HEADROOM};
use crate::protocol::auth::keys::PublicKey;
use crate::protocol::auth::{ReplayCache, Verifier};
use crate::protocol::limits::MAX_SIGNED_COMMAND_BYTES;
use crate::protocol::signal::status_payload;
use crate::protocol::topics::Topics;
use crate::protocol::turn::{IceServerSet, RestTurn, Secret, StaticTurn};

/// Opens the configured source each time capture starts (never falls back to another).
pub(crate) fn source_opener(config: &Config) -> SourceOpener {
    let base = config.capture.clone();
    // A camera's own H.264 starts at these; set-bitrate changes it later.
    let coded = CodedSettings {
        bitrate: config.encoder.bitrate,
        gop: config.encoder.keyframe_interval,
    };
    // The test pattern's controls outlive each open, like a camera driver's do.
    let brightness = Arc::new(AtomicI64::new(0));
    Box::new(move |p: CaptureParams| {
        let c = CaptureConfig {
            width: p.width,
            height: p.height,
            fps: p.fps,
            ..base.clone()
        };
        Ok(match c.source {
            SourceKind::TestPattern => Box::new(
                TestPattern::new(c.width, c.height, c.fps, true)
                    .with_brightness(brightness.clone())
                    .with_noise(c.test_pattern_noise),
            ) as Box<dyn FrameSource>,
            SourceKind::V4l2 => Box::new(Camera::open(&c, &coded)?),
        })
    })
}

/// The capture/encode thread's settings.
pub(crate) fn pipeline_config(config: &Config) -> PipelineConfig {
    PipelineConfig {
        encoder: EncoderSettings {
            bitrate: config.encoder.bitrate,
            fps: config.capture.fps,
            keyframe_interval: config.encoder.keyframe_interval,
            temporal_layers: config.encoder.temporal_layers as u8,
        },
        capture: CaptureParams {
            width: config.capture.width,
            height: config.capture.height,
            fps: config.capture.fps,
        },
        // A camera that went away is looked for again every second: it resumes within about
        // a second of coming back.
        reopen_delay: Duration::from_millis(1000),
        rate_policy: config.webrtc.adaptation,
        min_bitrate: config.encoder.min_bitrate,
        hardware: Some(crate::media::video_encoder::v4l2_opener(
            config.encoder.backend,
        )),
        camera_h264: config.capture.may_pass_h264_through(),
        gop_cache_bytes: config.capture.gop_cache_bytes as usize,
    }
}

/// STUN and TURN servers for the device and its viewers (TURN credentials and coturn's REST
/// secret read from their files).
pub(crate) fn ice_servers(config: &Config) -> Result<IceServerSet> {
    let w = &config.webrtc;
    let mut static_turn = Vec::new();
    for turn in &w.turn_servers {
        static_turn.push(StaticTurn {
            url: turn.url.clone(),
            username: turn.username.clone(),
            credential: Secret::new(read_secret(
                "webrtc.turn_servers.credential_file",
                &turn.credential_file,
            )?),
        });
    }
    let r = &w.turn_rest;
    let rest = if r.urls.is_empty() {
        None
    } else {
        Some(RestTurn {
            urls: r.urls.clone(),
            secret: Secret::new(read_secret("webrtc.turn_rest.secret_file", &r.secret_file)?),
            ttl_s: r.ttl_s,
        })
    };
    Ok(IceServerSet {
        stun: w.stun_servers.clone(),
        static_turn,
        rest,
        name: config.device.id.clone(),
    })
}

/// The ICE servers a WHEP answer's `Link` headers announce at `now_ms` (Unix ms): the
/// configured STUN servers and TURN with credentials minted now (static TURN passwords are
/// never handed out, as over MQTT: docs/turn.md).
pub(crate) fn whep_ice_servers(
    configured: &IceServerSet,
    now_ms: u64,
) -> Vec<webrtc::peer_connection::RTCIceServer> {
    configured
        .for_viewers(now_ms / 1000)
        .servers
        .into_iter()
        .map(crate::viewer::peer::rtc_ice_server)
        .collect()
}

/// The device's topics.
pub(crate) fn topics(config: &Config) -> Topics {
    Topics::new(&config.mqtt.prefix, &config.device.id)
}

/// The Home Assistant discovery topic and status topic, when the integration is enabled.
pub(crate) fn ha_status_topic(config: &Config) -> Option<String> {
    let ha = &config.homeassistant;
    ha.enabled
        .then(|| homeassistant::status_topic(&ha.discovery_prefix))
}

/// Signed mode's policy for inbound messages (docs/protocol.md §9.4), from `[auth]`.
pub(crate) fn verifier(config: &Config) -> Verifier {
    let a = &config.auth;
    Verifier::new(
        &config.device.id,
        a.owner_public_keys(),
        a.revoked.clone(),
        a.control_namespaces.clone(),
        a.max_clock_skew_ms,
    )
}

/// A replay cache as `[auth]` sizes it; each owner of signed input has its own.
pub(crate) fn replay_cache(config: &Config) -> ReplayCache {
    ReplayCache::new(
        config.auth.replay_cache_entries,
        config.auth.max_clock_skew_ms,
    )
}

/// MQTT connection settings; secrets and TLS files are read here. `device_key`: the device's
/// public key in signed mode, for the status in the last will.
pub(crate) fn mqtt_settings(
    config: &Config,
    device_key: Option<&PublicKey>,
) -> Result<MqttSettings> {
    let m = &config.mqtt;
    let topics = topics(config);
    let password = if m.password_file.as_os_str().is_empty() {
        String::new()
    } else {
        read_secret("mqtt.password_file", &m.password_file)?
    };
    let tls = if m.tls {
        let read = |key: &'static str, path: &std::path::Path| {
            std::fs::read(path).with_context(|| format!("{key}: cannot read {}", path.display()))
        };
        let ca = read("mqtt.ca_file", &m.ca_file)?;
        let client = if m.client_cert_file.as_os_str().is_empty() {
            None
        } else {
            Some((
                read("mqtt.client_cert_file", &m.client_cert_file)?,
                read("mqtt.client_key_file", &m.client_key_file)?,
            ))
        };
        let tls = crate::mqtt::tls::tls_client_config(
            &ca,
            client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        )?;
        Some(Arc::new(tls))
    } else {
        None
    };
    let mut subscriptions = topics.subscriptions();
    subscriptions.extend(ha_status_topic(config));
    // The device's own retained topics, to notice when someone else overwrites them.
    let ha = &config.homeassistant;
    subscriptions.extend([
        topics.status(),
        topics.state(),
        homeassistant::config_topic(&ha.discovery_prefix, &config.device.id),
    ]);
    // The broker drops anything larger for rtcam. Commands and signaling are refused above
    // their own limits anyway; through the embedded broker nothing is larger than it accepts.
    let mut max_incoming_packet =
        m.max_payload_bytes.max(MAX_SIGNED_COMMAND_BYTES) + PACKET_HEADROOM;
    if config.broker.enabled {
        max_incoming_packet =
            max_incoming_packet.max(EMBEDDED_BROKER_MAX_PAYLOAD + PACKET_HEADROOM);
    }
    Ok(MqttSettings {
        max_incoming_packet,
        host: m.host.clone(),
        port: m.port,
        client_id: format!("rtcam-{}", config.device.id),
        username: m.username.clone(),
        password,
        keep_alive: Duration::from_secs(m.keep_alive_s),
        reconnect_min: Duration::from_millis(m.reconnect_min_ms),
        reconnect_max: Duration::from_millis(m.reconnect_max_ms),
        tls,
        last_will: (
            topics.status(),
            status_payload(&config.device.id, false, device_key),
        ),
        subscriptions,
    })
}

#[cfg(test)]
mod whep_link_tests {
    use super::*;

    #[test]
    fn whep_ice_servers_mint_rest_credentials_and_withhold_static_ones() {
        let set = IceServerSet {
            stun: vec!["stun:stun.example:3478".into()],
            static_turn: vec![StaticTurn {
                url: "turn:static.example:3478".into(),
                username: "u".into(),
                credential: Secret::new(String::from("static-password")),
            }],
            rest: Some(RestTurn {
                urls: vec!["turn:relay.example:3478".into()],
                secret: Secret::new(String::from("north")),
                ttl_s: 600,
            }),
            name: "cam1".into(),
        };
        let servers = whep_ice_servers(&set, 1_699_999_400_000);
        assert!(servers.iter().any(|s| s.urls == ["stun:stun.example:3478"]));
        let relay = servers
            .iter()
            .find(|s| s.urls.iter().any(|u| u.contains("relay.example")))
            .expect("the REST TURN server is announced");
        assert_eq!(relay.username, "1700000000:cam1-viewer");
        // base64(HMAC-SHA1("north", username)), computed with Python's hmac.
        assert_eq!(relay.credential, "igenMGQc6o/bQEnkFY9OwnfA5xU=");
        assert!(
            servers.iter().all(|s| s.credential != "static-password"),
            "a static TURN password is never handed out"
        );
    }
}
