//! Wires the service together under one cancellation root and one task tracker, and shuts it down in order.

pub(crate) mod inbound;
pub(crate) mod readiness;
pub(crate) mod retained;
pub(crate) mod settings;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, SourceKind};
use crate::control::forwarding::spawn_router;
use crate::control::mqtt::{CommandPolicy, MqttCommands};
use crate::control::{ControlSettings, Controller};
use crate::homeassistant;
use crate::media::pipeline;
use crate::outbound::{Publish, SignalOut};
use crate::ports::PortPool;
use crate::protocol::signal::{Limits, status_payload};
use crate::signaling::registry::{SessionLimits, SignedInbound};
use crate::signaling::{self, SignalingParts};
use crate::state::{LinkBoard, SessionCounts, StateInfo, StateReader, run_state_publisher};
use crate::viewer::peer::{Adaptation, WebrtcSettings};
use crate::viewer::session::Timeouts;
use inbound::{Discovery, Dispatcher};
use readiness::{DiscoveryUpdate, Readiness, announce_ready};
use retained::RetainedGuard;

/// How long the MQTT connection gets to deliver the byes, `offline` and a clean DISCONNECT.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long shutdown waits for the remaining tasks.
const TASKS_TIMEOUT: Duration = Duration::from_secs(5);

/// The Home Assistant discovery payload before the camera's controls are known (empty when
/// the integration is disabled: that removes an earlier discovery).
fn initial_discovery(config: &Config) -> Vec<u8> {
    if !config.homeassistant.enabled {
        return Vec::new();
    }
    homeassistant::discovery_payload(
        &settings::topics(config),
        &config.device.id,
        &[],
        config.whep.announced_url().is_some(),
    )
    .to_string()
    .into_bytes()
}

/// Runs until `cancel` fires, then shuts down in order: viewers get their bye, status goes
/// `offline` with a clean MQTT disconnect, the embedded broker stops, the camera is released,
/// and every task is joined.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<()> {
    let tracker = TaskTracker::new();
    // The MQTT connection and the embedded broker outlive the root token until the
    // goodbyes are out.
    let transport_stop = CancellationToken::new();
    let result = run_tracked(&config, &tracker, &cancel, &transport_stop).await;
    // However `run_tracked` ended (a start-up error included), nothing is left running.
    cancel.cancel();
    transport_stop.cancel();
    tracker.close();
    if tokio::time::timeout(TASKS_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(remaining = tracker.len(), "tasks still running at shutdown");
    }
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}

async fn run_tracked(
    config: &Config,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    transport_stop: &CancellationToken,
) -> Result<()> {
    // Everything `check-config` checks, first: a bad file fails the start naming its key.
    crate::preflight::check(config, crate::preflight::Files::Check)?;
    let topics = settings::topics(config);
    // Signed mode's identity key is loaded (created on first start) before anything starts.
    let device_key = crate::identity::load_for_start(&config.auth)?.map(Arc::new);
    let public_key = device_key.as_ref().map(|k| k.public_key());
    let mqtt_settings = settings::mqtt_settings(config, public_key.as_ref())?;
    let ice_servers = settings::ice_servers(config)?;
    let w = &config.webrtc;
    let certificate = crate::certificate::load_or_create(&w.certificate_path)?;
    if config.capture.source == SourceKind::TestPattern {
        tracing::info!(
            "capture.source = \"test-pattern\": streaming synthetic frames, not a camera"
        );
    }
    if config.broker.enabled {
        start_broker(config, tracker, transport_stop.clone()).await?;
    }
    // Bound before anything else starts, so a bad web.root or a taken port fails the start.
    if config.web.enabled {
        let server = crate::web::WebServer::bind(&config.web).await?;
        tracing::info!(
            addr = %server.local_addr().context("web server address")?,
            "serving the browser viewer (static files)"
        );
        tracker.spawn(server.run(cancel.clone()));
    }

    let mdns = crate::viewer::peer::multicast_available();
    if !mdns {
        tracing::info!(
            "no multicast route: mDNS is off, so viewers' .local candidates will not resolve (other candidates still connect)"
        );
    }
    let (pipeline, capture_thread) = pipeline::spawn(
        settings::pipeline_config(config),
        settings::source_opener(config),
        cancel.clone(),
    )
    .context("starting the capture thread")?;

    let (mqtt, eventloop) = crate::mqtt::connect(&mqtt_settings);
    let ha = &config.homeassistant;
    let config_topic = homeassistant::config_topic(&ha.discovery_prefix, &config.device.id);
    // Retained topics that heal: rtcam republishes them when another client overwrites them.
    let retained = RetainedGuard::new([topics.status(), topics.state(), config_topic.clone()]);
    let transport: Arc<dyn Publish> = Arc::new(mqtt.clone());
    let publish = retained.recording(transport.clone());
    let signal = SignalOut::new(publish.clone(), topics.clone(), device_key.clone());
    let (connected_tx, connected_rx) = watch::channel(0u64);
    let (counts_tx, counts_rx) = watch::channel(SessionCounts::default());
    let links = LinkBoard::default();
    let state = StateReader::new(
        pipeline.clone(),
        counts_rx,
        &links,
        StateInfo {
            max_viewers: w.max_viewers,
            source: match config.capture.source {
                SourceKind::TestPattern => "test-pattern".into(),
                SourceKind::V4l2 => config.capture.device.display().to_string(),
            },
            whep_url: config.whep.announced_url(),
        },
    );
    let k = &config.control;
    let router = spawn_router(
        Duration::from_millis(k.forward_timeout_ms),
        tracker,
        cancel.clone(),
    );
    let controller = Controller::new(
        pipeline.clone(),
        topics.clone(),
        publish.clone(),
        router.clone(),
        ControlSettings {
            forward_namespaces: k.forward_namespaces.clone(),
            source_rate: (k.session_rate, k.session_burst),
            global_rate: (k.global_rate, k.global_burst),
        },
        state.clone(),
    );
    let (signaling, signaling_task) = signaling::spawn(
        SignalingParts {
            limits: SessionLimits {
                max_viewers: w.max_viewers as usize,
                max_pending: w.max_pending_sessions as usize,
            },
            parse_limits: Limits {
                max_payload_bytes: config.mqtt.max_payload_bytes,
                max_sdp_bytes: w.max_sdp_bytes,
            },
            signed: device_key.is_some().then(|| SignedInbound {
                verifier: settings::verifier(config),
                replay: settings::replay_cache(config),
                topics: topics.clone(),
            }),
            signal: signal.clone(),
            webrtc: WebrtcSettings {
                ice_servers: ice_servers.clone(),
                certificate,
                bind_addresses: w.bind_addresses.clone(),
                ports: PortPool::new(w.udp_port_min, w.udp_port_max),
                timeouts: Timeouts {
                    connect: Duration::from_millis(w.connect_timeout_ms),
                    disconnect: Duration::from_millis(w.disconnect_timeout_ms),
                },
                queue_frames: w.viewer_queue_frames,
                mdns_unavailable: AtomicBool::new(!mdns),
                adaptation: w.adaptation.then(|| Adaptation {
                    min_bitrate: config.encoder.min_bitrate,
                    links: links.clone(),
                }),
            },
            pipeline: pipeline.clone(),
            controller: controller.clone(),
            counts: counts_tx,
        },
        tracker,
        cancel.clone(),
    );
    // WHEP: the second signaling transport into the same registry (docs/whep.md).
    if config.whep.enabled {
        let h = &config.whep;
        let static_servers = ice_servers.clone();
        let server = crate::whep::server::WhepServer::bind(crate::whep::server::WhepParts {
            listen: h.listen,
            policy: crate::whep::Policy {
                path: h.path.clone(),
                allowed_origins: h.allowed_origins.clone(),
                max_sdp_bytes: w.max_sdp_bytes,
            },
            signaling: signaling.clone(),
            ice_servers: Arc::new(move |now_ms| {
                settings::whep_ice_servers(&static_servers, now_ms)
            }),
            gather_timeout: Duration::from_millis(h.gather_timeout_ms),
            tls: if h.tls() {
                let cert = std::fs::read(&h.tls_cert_file)
                    .with_context(|| format!("whep.tls_cert_file {:?}", h.tls_cert_file))?;
                let key = std::fs::read(&h.tls_key_file)
                    .with_context(|| format!("whep.tls_key_file {:?}", h.tls_key_file))?;
                let tls = crate::whep::server::tls_server_config(&cert, &key)
                    .map_err(|e| anyhow::anyhow!("whep.tls_cert_file: {e}"))?;
                Some(Arc::new(tls))
            } else {
                None
            },
        })
        .await?;
        tracing::info!(
            addr = %server.local_addr().context("WHEP server address")?,
            path = %h.path,
            https = h.tls(),
            "serving WHEP"
        );
        tracker.spawn(server.run(cancel.clone()));
    }
    let commands = MqttCommands::spawn(
        controller,
        publish.clone(),
        topics.clone(),
        CommandPolicy {
            plain: k.mqtt_commands,
            reply_to_allowed: k.reply_to_allowed.clone(),
            signed: device_key
                .is_some()
                .then(|| (settings::verifier(config), settings::replay_cache(config))),
        },
        tracker,
        cancel.clone(),
    );
    let (discovery_tx, discovery_rx) = watch::channel(initial_discovery(config));
    let mut dispatcher = Dispatcher::new(
        topics.clone(),
        signaling,
        signal,
        commands,
        router,
        publish.clone(),
        status_payload(&config.device.id, true, public_key.as_ref()),
        Discovery {
            config_topic: config_topic.clone(),
            payload: discovery_rx,
            ha_status_topic: settings::ha_status_topic(config),
        },
        retained.clone(),
    );
    // Through the plain transport: the book notes its republishes itself.
    tracker.spawn(retained.run_healer(transport, cancel.clone()));
    let mut mqtt_task = tracker.spawn(crate::mqtt::run_event_loop(
        eventloop,
        mqtt.clone(),
        mqtt_settings.clone(),
        move |event| dispatcher.on_event(event),
        connected_tx,
        transport_stop.clone(),
    ));
    tracker.spawn(run_state_publisher(
        state,
        publish.clone(),
        topics.state(),
        Duration::from_millis(config.mqtt.state_min_interval_ms),
        connected_rx.clone(),
        cancel.clone(),
    ));
    let watched = pipeline.clone();
    tracker.spawn(crate::systemd::run_watchdog(
        move || watched.capture_is_healthy(Duration::from_secs(10)),
        cancel.clone(),
    ));
    tracker.spawn(announce_ready(
        Readiness {
            pipeline,
            connected: connected_rx,
            broker: mqtt_settings.describe(),
            discovery: ha.enabled.then(|| DiscoveryUpdate {
                payload: discovery_tx,
                config_topic,
                topics: topics.clone(),
                device: config.device.id.clone(),
                whep: config.whep.announced_url().is_some(),
                publish: publish.clone(),
            }),
        },
        cancel.clone(),
    ));

    cancel.cancelled().await;
    crate::systemd::notify_stopping();
    tracing::info!("shutting down");
    // 1. Every session says bye and closes (bounded inside the registry owner).
    let _ = signaling_task.await;
    // 2. `offline`, then a clean DISCONNECT; the connection task ends once it is written.
    mqtt.say_goodbye(
        topics.status(),
        status_payload(&config.device.id, false, public_key.as_ref()),
    );
    if tokio::time::timeout(GOODBYE_TIMEOUT, &mut mqtt_task)
        .await
        .is_err()
    {
        tracing::warn!(broker = %mqtt_settings.describe(), "MQTT goodbye not delivered within {GOODBYE_TIMEOUT:?} (broker unreachable?); its last will says offline once it notices");
    }
    // 3. The embedded broker (after our own client left it) and the MQTT task, if stuck.
    transport_stop.cancel();
    // 4. The camera.
    let joined = tokio::task::spawn_blocking(move || capture_thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        tracing::error!("capture thread ended abnormally");
    }
    Ok(())
}

#[cfg(feature = "embedded-broker")]
async fn start_broker(
    config: &Config,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Result<()> {
    crate::broker::start(&config.broker, tracker, stop).await
}

#[cfg(not(feature = "embedded-broker"))]
async fn start_broker(
    _config: &Config,
    _tracker: &TaskTracker,
    _stop: CancellationToken,
) -> Result<()> {
    anyhow::bail!(
        "broker.enabled = true, but this build has no embedded broker (feature \"embedded-broker\"); use an external broker"
    )
}
