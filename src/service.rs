//! Wires the service together (broker, web viewer, pipeline, MQTT, signaling, state, watchdog) and shuts it down in order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use webrtc::peer_connection::RTCIceServer;

use crate::config::{CaptureConfig, Config, SourceKind, read_secret};
use crate::control::{ControlSettings, Controller};
use crate::forwarding::spawn_router;
use crate::homeassistant;
use crate::media::encoder::EncoderSettings;
use crate::media::pipeline::{
    self, CaptureParams, FrameSource, PipelineConfig, SourceOpener, TestPattern,
};
use crate::media::v4l2::Camera;
use crate::mqtt::{self, Discovery, MqttSettings};
use crate::ports::PortPool;
use crate::protocol::signal::Limits;
use crate::protocol::topics::Topics;
use crate::sessions::Registry;
use crate::state::{StateInfo, run_state_publisher};
use crate::viewer::{SessionContext, WebrtcSettings};

/// Opens the configured source each time capture starts (never falls back to another).
pub fn source_opener(config: &Config) -> SourceOpener {
    let base = config.capture.clone();
    // The test pattern's controls outlive each open, like a camera driver's do.
    let brightness = Arc::new(std::sync::atomic::AtomicI64::new(0));
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
            SourceKind::V4l2 => Box::new(Camera::open(&c)?),
        })
    })
}

/// The capture/encode thread's settings from the configuration (service and `rtcam record`).
pub fn pipeline_config(config: &Config) -> PipelineConfig {
    PipelineConfig {
        encoder: EncoderSettings {
            bitrate: config.encoder.bitrate,
            fps: config.capture.fps,
            keyframe_interval: config.encoder.keyframe_interval,
        },
        capture: CaptureParams {
            width: config.capture.width,
            height: config.capture.height,
            fps: config.capture.fps,
        },
        // A camera that went away is looked for again every second: it resumes within about
        // a second of coming back.
        reopen_delay: Duration::from_millis(1000),
    }
}

fn ice_servers(config: &Config) -> Result<Vec<RTCIceServer>> {
    let mut servers = Vec::new();
    if !config.webrtc.stun_servers.is_empty() {
        servers.push(RTCIceServer {
            urls: config.webrtc.stun_servers.clone(),
            ..Default::default()
        });
    }
    for turn in &config.webrtc.turn_servers {
        servers.push(RTCIceServer {
            urls: vec![turn.url.clone()],
            username: turn.username.clone(),
            credential: read_secret("webrtc.turn_servers.credential_file", &turn.credential_file)?,
        });
    }
    Ok(servers)
}

/// The Home Assistant discovery payload before the camera's controls are known (empty when
/// the integration is disabled: that removes an earlier discovery).
fn initial_discovery(config: &Config) -> Vec<u8> {
    if !config.homeassistant.enabled {
        return Vec::new();
    }
    let topics = Topics::new(&config.mqtt.prefix, &config.device.id);
    homeassistant::discovery_payload(&topics, &config.device.id, &[])
        .to_string()
        .into_bytes()
}

fn mqtt_settings(config: &Config, discovery: watch::Receiver<Vec<u8>>) -> Result<MqttSettings> {
    let m = &config.mqtt;
    let ha = &config.homeassistant;
    let topics = Topics::new(&m.prefix, &config.device.id);
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
        let config = mqtt::tls_client_config(
            &ca,
            client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        )?;
        Some(Arc::new(config))
    } else {
        None
    };
    Ok(MqttSettings {
        host: m.host.clone(),
        tls,
        port: m.port,
        client_id: format!("rtcam-{}", config.device.id),
        username: m.username.clone(),
        password,
        keep_alive: Duration::from_secs(m.keep_alive_s),
        reconnect_min: Duration::from_millis(m.reconnect_min_ms),
        reconnect_max: Duration::from_millis(m.reconnect_max_ms),
        topics: topics.clone(),
        device_id: config.device.id.clone(),
        discovery: Some(Discovery {
            config_topic: homeassistant::config_topic(&ha.discovery_prefix, &config.device.id),
            payload: discovery,
            ha_status_topic: ha
                .enabled
                .then(|| homeassistant::status_topic(&ha.discovery_prefix)),
        }),
    })
}

/// Runs until `cancel` fires, then shuts down: viewers get a bye, status goes `offline`,
/// the camera is released.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<()> {
    if config.broker.enabled {
        start_broker(&config)?;
    }
    // Signed mode's identity key is loaded (created on first start) before anything starts;
    // using it for signaling is issue 11's phase 2.
    let _identity = crate::identity::load_for_start(&config.auth)?;
    if config.capture.source == SourceKind::TestPattern {
        tracing::warn!(
            "capture.source = \"test-pattern\": streaming synthetic frames, not a camera"
        );
    }
    let (discovery_tx, discovery_rx) = watch::channel(initial_discovery(&config));
    let mqtt_settings = mqtt_settings(&config, discovery_rx)?;
    let ice_servers = ice_servers(&config)?;
    // Bound before anything else starts, so a bad web.root or a taken port fails the start.
    let web_task = if config.web.enabled {
        let server = crate::web::WebServer::bind(&config.web).await?;
        tracing::info!(
            addr = %server.local_addr().context("web server address")?,
            "serving the browser viewer (static files)"
        );
        Some(tokio::spawn(server.run(cancel.clone())))
    } else {
        None
    };

    let (pipeline, capture_thread) = pipeline::spawn(
        pipeline_config(&config),
        source_opener(&config),
        cancel.clone(),
    )
    .context("starting the capture thread")?;

    // The MQTT loop outlives the root token briefly so the goodbyes can still go out.
    let mqtt_stop = CancellationToken::new();
    let (mqtt, eventloop) = mqtt::connect(&mqtt_settings);
    let (inbound_tx, inbound_rx) = mpsc::channel(256);
    let (connected_tx, connected_rx) = watch::channel(0u64);
    let mqtt_task = tokio::spawn(mqtt::run_event_loop(
        eventloop,
        mqtt.clone(),
        mqtt_settings.clone(),
        inbound_tx,
        connected_tx,
        mqtt_stop.clone(),
    ));

    let (ended_tx, ended_rx) = mpsc::channel(64);
    let w = &config.webrtc;
    let state_info = StateInfo {
        max_viewers: w.max_viewers,
        source: match config.capture.source {
            SourceKind::TestPattern => "test-pattern".into(),
            SourceKind::V4l2 => config.capture.device.display().to_string(),
        },
    };
    let k = &config.control;
    let router = spawn_router(Duration::from_millis(k.forward_timeout_ms), cancel.clone());
    let controller = Controller::new(
        pipeline.clone(),
        mqtt_settings.topics.clone(),
        Arc::new(mqtt.clone()),
        router,
        ControlSettings {
            forward_namespaces: k.forward_namespaces.clone(),
            global_rate: k.global_rate,
            global_burst: k.global_burst,
        },
        state_info.clone(),
    );
    let ctx = Arc::new(SessionContext {
        settings: WebrtcSettings {
            ice_servers,
            certificate: crate::certificate::load_or_create(&w.certificate_path)?,
            bind_addresses: w.bind_addresses.clone(),
            ports: PortPool::new(w.udp_port_min, w.udp_port_max),
            connect_timeout: Duration::from_millis(w.connect_timeout_ms),
            disconnect_timeout: Duration::from_millis(w.disconnect_timeout_ms),
            queue_frames: w.viewer_queue_frames,
        },
        pipeline: pipeline.clone(),
        controller,
        command_rate: (k.session_rate, k.session_burst),
        signal: Arc::new(mqtt.clone()),
        publisher: Arc::new(mqtt.clone()),
        ended: ended_tx,
    });
    let registry = Registry::new(
        w.max_viewers as usize,
        Limits {
            max_payload_bytes: config.mqtt.max_payload_bytes,
            max_sdp_bytes: w.max_sdp_bytes,
        },
    );
    let signaling = tokio::spawn(crate::signaling::run_signaling(
        mqtt_settings.topics.clone(),
        registry,
        ctx,
        inbound_rx,
        ended_rx,
        cancel.clone(),
    ));
    let state_task = tokio::spawn(run_state_publisher(
        pipeline.stats().clone(),
        state_info,
        mqtt.clone(),
        Duration::from_millis(config.mqtt.state_min_interval_ms),
        connected_rx.clone(),
        cancel.clone(),
    ));
    let stats = pipeline.stats().clone();
    let watchdog = tokio::spawn(crate::systemd::run_watchdog(
        move || stats.capture_is_healthy(Duration::from_secs(10)),
        cancel.clone(),
    ));
    tokio::spawn(announce_ready(
        Readiness {
            pipeline: pipeline.clone(),
            connected: connected_rx,
            broker: format!("{}:{}", mqtt_settings.host, mqtt_settings.port),
            discovery: config.homeassistant.enabled.then(|| DiscoveryUpdate {
                payload: discovery_tx,
                // Same topic the event loop republishes on (set up in `mqtt_settings`).
                config_topic: mqtt_settings
                    .discovery
                    .as_ref()
                    .map(|d| d.config_topic.clone())
                    .unwrap_or_default(),
                topics: mqtt_settings.topics.clone(),
                device: config.device.id.clone(),
                mqtt: mqtt.clone(),
            }),
        },
        cancel.clone(),
    ));

    cancel.cancelled().await;
    crate::systemd::notify_stopping();
    tracing::info!("shutting down");
    let _ = signaling.await;
    let _ = state_task.await;
    let _ = watchdog.await;
    if let Some(web) = web_task {
        let _ = web.await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), mqtt.go_offline(&config.device.id)).await;
    // Give the event loop a moment to flush the offline status and the DISCONNECT.
    tokio::time::sleep(Duration::from_millis(200)).await;
    mqtt_stop.cancel();
    let _ = mqtt_task.await;
    let joined = tokio::task::spawn_blocking(move || capture_thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        tracing::error!("capture thread ended abnormally");
    }
    tracing::info!("stopped");
    Ok(())
}

/// What `announce_ready` watches and updates.
struct Readiness {
    pipeline: pipeline::PipelineHandle,
    connected: watch::Receiver<u64>,
    broker: String,
    discovery: Option<DiscoveryUpdate>,
}

/// Home Assistant discovery to refresh once the camera's controls are known.
struct DiscoveryUpdate {
    payload: watch::Sender<Vec<u8>>,
    config_topic: String,
    topics: Topics,
    device: String,
    mqtt: mqtt::MqttHandle,
}

/// Tells systemd READY=1 once capture works (the camera was opened, its format negotiated and
/// its controls listed, then released) and MQTT is connected; until then STATUS= says what
/// rtcam waits for. With the camera's controls known, Home Assistant discovery gains a number
/// entity per integer control.
async fn announce_ready(mut r: Readiness, cancel: CancellationToken) {
    const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
    let mut retry_in = Duration::from_secs(1);
    let controls = loop {
        crate::systemd::notify_status("opening the camera");
        let why = tokio::select! {
            _ = cancel.cancelled() => return,
            probe = tokio::time::timeout(PROBE_TIMEOUT, r.pipeline.list_controls()) => match probe {
                Ok(Ok(controls)) => break controls,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer from the capture thread in {PROBE_TIMEOUT:?}"),
            },
        };
        crate::systemd::notify_status(&format!("waiting for the camera: {why}"));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(retry_in) => {}
        }
        retry_in = (retry_in * 2).min(Duration::from_secs(30));
    };
    tracing::info!(controls = controls.len(), "camera probed");
    if let Some(d) = r.discovery {
        let payload = homeassistant::discovery_payload(&d.topics, &d.device, &controls)
            .to_string()
            .into_bytes();
        // The event loop republishes the newest payload after every (re)connect; publish
        // here only when already connected.
        d.payload.send_replace(payload.clone());
        if *r.connected.borrow() > 0 {
            d.mqtt.publish(d.config_topic, payload, true);
        }
    }
    if *r.connected.borrow() == 0 {
        crate::systemd::notify_status(&format!("waiting for the MQTT broker at {}", r.broker));
    }
    tokio::select! {
        _ = cancel.cancelled() => {}
        up = r.connected.wait_for(|n| *n > 0) => if up.is_ok() {
            crate::systemd::notify_ready();
            crate::systemd::notify_status("ready");
            tracing::info!("rtcam ready");
        }
    }
}

#[cfg(feature = "embedded-broker")]
fn start_broker(config: &Config) -> Result<()> {
    crate::broker::start(&config.broker)
}

#[cfg(not(feature = "embedded-broker"))]
fn start_broker(_config: &Config) -> Result<()> {
    anyhow::bail!(
        "broker.enabled = true, but this build has no embedded broker (feature \"embedded-broker\"); use an external broker"
    )
}
