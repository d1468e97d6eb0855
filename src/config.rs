//! Layered configuration (built-in defaults, /etc file, --config file, RTCAM__ env) and its validation.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::auth::keys::PublicKey;
use crate::protocol::limits;
use crate::protocol::topics::{
    SessionId, Topics, filter_matches, ha_config_topic, ha_status_topic, is_valid_filter,
    is_valid_id,
};

/// The compiled-in defaults; every key rtcam knows is in this file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// System-wide config file, read when present.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/rtcam/rtcam.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub device: DeviceConfig,
    pub capture: CaptureConfig,
    pub encoder: EncoderConfig,
    pub webrtc: WebrtcConfig,
    pub mqtt: MqttConfig,
    pub control: ControlConfig,
    pub homeassistant: HomeAssistantConfig,
    pub broker: BrokerConfig,
    pub web: WebConfig,
    pub whep: WhepConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistantConfig {
    pub enabled: bool,
    pub discovery_prefix: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Plain (unsigned) commands on `<prefix>/<device>/command`; they rely on broker ACLs.
    pub mqtt_commands: bool,
    /// Topic filters a command's `reply_to` may name besides `<prefix>/<device>/command/reply/#`.
    pub reply_to_allowed: Vec<String>,
    pub forward_namespaces: Vec<String>,
    pub forward_timeout_ms: u64,
    pub session_rate: u32,
    pub session_burst: u32,
    pub global_rate: u32,
    pub global_burst: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub id: String,
}

/// Defines a config enum whose parse error lists every allowed spelling.
macro_rules! config_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "&'static str")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALLOWED: &'static [&'static str] = &[$($text),+];
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.as_str() {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(format!(
                        "{s:?} is not allowed; use one of {}",
                        Self::ALLOWED.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
                    )),
                }
            }
        }

        impl From<$name> for &'static str {
            fn from(v: $name) -> &'static str {
                match v { $($name::$variant => $text),+ }
            }
        }
    };
}

config_enum!(
    /// Where pictures come from.
    SourceKind { V4l2 = "v4l2", TestPattern = "test-pattern" }
);

config_enum!(
    /// Pixel format asked of a V4L2 camera.
    PixelFormatChoice {
        Auto = "auto", Yu12 = "YU12", Nv12 = "NV12", Yuyv = "YUYV", Mjpg = "MJPG", Rgb3 = "RGB3",
        Bgr3 = "BGR3", H264 = "H264"
    }
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    pub source: SourceKind,
    pub device: PathBuf,
    pub format: PixelFormatChoice,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub buffers: u32,
    pub test_pattern_noise: bool,
    /// Round the line length asked of the driver up to a multiple of this many bytes
    /// (0: the driver's own choice).
    pub stride_align: u32,
    /// With `format = "auto"`, take the camera's own H.264 first when it offers it at the
    /// configured size and rate (passthrough).
    pub prefer_camera_h264: bool,
    /// Passthrough: the last IDR and what followed, up to this many bytes, for new viewers
    /// (0: none; they wait for the camera's next IDR).
    pub gop_cache_bytes: u32,
}

impl CaptureConfig {
    /// Whether the camera may deliver H.264 itself rather than pictures.
    pub fn may_pass_h264_through(&self) -> bool {
        self.source == SourceKind::V4l2
            && (self.format == PixelFormatChoice::H264
                || (self.format == PixelFormatChoice::Auto && self.prefer_camera_h264))
    }
}

config_enum!(
    /// Which H.264 encoder runs.
    EncoderBackend { Auto = "auto", OpenH264 = "openh264", V4l2 = "v4l2" }
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    pub backend: EncoderBackend,
    pub bitrate: u32,
    pub keyframe_interval: u32,
    pub temporal_layers: u32,
    /// Lowest target the adaptation may give the encoder (docs/protocol.md §5.3).
    pub min_bitrate: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnServer {
    pub url: String,
    pub username: String,
    /// File whose first line is the TURN credential (kept out of the config and the logs).
    pub credential_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebrtcConfig {
    pub max_viewers: u32,
    pub max_pending_sessions: u32,
    pub bind_addresses: Vec<IpAddr>,
    pub udp_port_min: u16,
    pub udp_port_max: u16,
    pub stun_servers: Vec<String>,
    pub turn_servers: Vec<TurnServer>,
    pub max_sdp_bytes: usize,
    pub connect_timeout_ms: u64,
    pub disconnect_timeout_ms: u64,
    pub viewer_queue_frames: usize,
    pub certificate_path: PathBuf,
    /// Per-viewer bandwidth estimation, layer selection, pacing and the encoder target policy
    /// (docs/protocol.md §5.3); false: every viewer gets every frame at the configured rate.
    pub adaptation: bool,
    pub turn_rest: TurnRestConfig,
}

/// `[webrtc.turn_rest]`: TURN servers sharing coturn's REST secret (`use-auth-secret`); rtcam
/// mints time-limited credentials for itself and its viewers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnRestConfig {
    /// `turn:`/`turns:` URLs; empty: off.
    pub urls: Vec<String>,
    /// File whose first line is coturn's `static-auth-secret` (kept out of the config and logs).
    pub secret_file: PathBuf,
    /// Lifetime of each minted credential, seconds.
    pub ttl_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub prefix: String,
    pub username: String,
    pub password_file: PathBuf,
    /// TLS to the broker (rustls); the broker's certificate is checked against `ca_file`.
    pub tls: bool,
    pub ca_file: PathBuf,
    /// Mutual TLS: PEM client certificate chain and private key, both or neither.
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub keep_alive_s: u64,
    pub max_payload_bytes: usize,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub state_min_interval_ms: u64,
}

/// Largest packet the embedded broker accepts from a client; nothing larger can reach rtcam
/// through it (rumqttd does not honour a client's Maximum Packet Size itself).
pub const EMBEDDED_BROKER_MAX_PAYLOAD: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub ws_listen: SocketAddr,
}

/// `[web]`: the built browser viewer served as static files (signaling stays on MQTT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Directory holding the built viewer (index.html); relative paths are from the working directory.
    pub root: PathBuf,
}

/// `[whep]`: the WHEP endpoint (docs/whep.md), viewers over HTTP signaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhepConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// The endpoint's path; sessions are `<path>/<id>`.
    pub path: String,
    /// Browser origins CORS allows (`*`: any); requests from other origins get 403.
    pub allowed_origins: Vec<String>,
    /// The endpoint URL as clients reach it, for the state and HA discovery; empty: built
    /// from `listen` when it is a specific address.
    pub public_url: String,
    /// How long an answer waits for the device's ICE candidates, milliseconds.
    pub gather_timeout_ms: u64,
    /// HTTPS: certificate chain and private key (PEM); both empty: plain HTTP.
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
}

impl WhepConfig {
    /// The URL the state and discovery announce, if there is one.
    pub fn announced_url(&self) -> Option<String> {
        if !self.enabled {
            return None;
        }
        if !self.public_url.is_empty() {
            return Some(self.public_url.clone());
        }
        let scheme = if self.tls() { "https" } else { "http" };
        (!self.listen.ip().is_unspecified())
            .then(|| format!("{scheme}://{}{}", self.listen, self.path))
    }

    /// True when the endpoint serves HTTPS.
    pub fn tls(&self) -> bool {
        !self.tls_cert_file.as_os_str().is_empty()
    }
}

/// `whep.path`: `/` and then segments of `A-Z a-z 0-9 _ -`, no trailing `/`.
fn is_valid_whep_path(path: &str) -> bool {
    path.len() <= 64
        && path.strip_prefix('/').is_some_and(|rest| {
            !rest.is_empty()
                && rest.split('/').all(|seg| {
                    !seg.is_empty()
                        && seg
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                })
        })
}

config_enum!(
    /// Where logs go.
    LogTarget { Auto = "auto", Journald = "journald", Stderr = "stderr" }
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub target: LogTarget,
}

config_enum!(
    /// Who may use the session topics (docs/protocol.md §9).
    AuthMode { Signed = "signed", Open = "open" }
);

/// `[auth]`: signed mode (docs/protocol.md §9, docs/security.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// The device identity key (Ed25519, PKCS#8 PEM, 0600); empty: a new key each start.
    pub identity_key_path: PathBuf,
    /// Trusted owner public keys (b64url, 43 characters).
    pub owner_keys: Vec<String>,
    /// Credential ids (`jti`) refused before they expire.
    pub revoked: Vec<String>,
    /// Forwarded namespaces every credential with `control` may use.
    pub control_namespaces: Vec<String>,
    pub max_clock_skew_ms: u64,
    pub replay_cache_entries: usize,
}

impl AuthConfig {
    /// The parsed `owner_keys` (valid once [`validate_auth`] passed).
    pub fn owner_public_keys(&self) -> Vec<PublicKey> {
        self.owner_keys
            .iter()
            .filter_map(|k| PublicKey::from_b64url(k.trim()).ok())
            .collect()
    }
}

/// Checks `[auth]`; `forward_namespaces` is `control.forward_namespaces`.
pub fn validate_auth(auth: &AuthConfig, forward_namespaces: &[String]) -> Result<(), ConfigError> {
    for key in &auth.owner_keys {
        if let Err(e) = PublicKey::from_b64url(key.trim()) {
            return Err(invalid(
                "auth.owner_keys",
                format!(
                    "{key:?}: {e}; each entry is an owner's Ed25519 public key as printed by \
                     `rtcam token keygen` (43 base64url characters)"
                ),
            ));
        }
    }
    if let Some(id) = auth.revoked.iter().find(|id| !is_valid_id(id)) {
        return Err(invalid(
            "auth.revoked",
            format!("{id:?}: credential ids (jti) are 1 to 64 characters from A-Z a-z 0-9 _ -"),
        ));
    }
    if let Some(ns) = auth
        .control_namespaces
        .iter()
        .find(|ns| !forward_namespaces.contains(ns))
    {
        return Err(invalid(
            "auth.control_namespaces",
            format!("{ns:?} is not in control.forward_namespaces"),
        ));
    }
    if !limits::CLOCK_SKEW_MS.contains(&auth.max_clock_skew_ms) {
        let r = &limits::CLOCK_SKEW_MS;
        return Err(invalid(
            "auth.max_clock_skew_ms",
            format!("between {} and {} ms", r.start(), r.end()),
        ));
    }
    if !limits::REPLAY_CACHE_ENTRIES.contains(&auth.replay_cache_entries) {
        let r = &limits::REPLAY_CACHE_ENTRIES;
        return Err(invalid(
            "auth.replay_cache_entries",
            format!("between {} and {}", r.start(), r.end()),
        ));
    }
    Ok(())
}

/// A configuration that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// A value out of its allowed set; names the key and what is allowed.
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Where configuration comes from, lowest priority first.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Read when it exists (normally [`SYSTEM_CONFIG_PATH`]).
    pub system_file: Option<PathBuf>,
    /// `--config PATH`: must exist.
    pub explicit_file: Option<PathBuf>,
    /// Environment variables to apply (normally `std::env::vars()`); only `RTCAM__*` are used.
    pub env: Vec<(String, String)>,
}

impl Config {
    /// Loads defaults, then each source in order, then validates.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = &sources.system_file {
            builder = builder.add_source(toml_file(path).required(false));
        }
        if let Some(path) = &sources.explicit_file {
            builder = builder.add_source(toml_file(path).required(true));
        }
        let env: config::Map<String, String> = sources
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("RTCAM__"))
            .cloned()
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("RTCAM")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("webrtc.bind_addresses")
                .with_list_parse_key("webrtc.stun_servers")
                .with_list_parse_key("webrtc.turn_rest.urls")
                .with_list_parse_key("control.forward_namespaces")
                .with_list_parse_key("control.reply_to_allowed")
                .with_list_parse_key("auth.owner_keys")
                .with_list_parse_key("auth.revoked")
                .with_list_parse_key("auth.control_namespaces")
                .source(Some(env)),
        );
        let config: Config = builder.build()?.try_deserialize()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value against its allowed range; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_valid_id(&self.device.id) {
            return Err(invalid(
                "device.id",
                "1 to 64 characters from A-Z a-z 0-9 _ -",
            ));
        }
        let c = &self.capture;
        if !limits::WIDTH.contains(&c.width) || !c.width.is_multiple_of(2) {
            return Err(invalid(
                "capture.width",
                format!("an even number {}", limits::describe(&limits::WIDTH)),
            ));
        }
        if !limits::HEIGHT.contains(&c.height) || !c.height.is_multiple_of(2) {
            return Err(invalid(
                "capture.height",
                format!("an even number {}", limits::describe(&limits::HEIGHT)),
            ));
        }
        if !limits::FPS.contains(&c.fps) {
            return Err(invalid("capture.fps", limits::describe(&limits::FPS)));
        }
        if !(2..=32).contains(&c.buffers) {
            return Err(invalid("capture.buffers", "2 to 32"));
        }
        if c.stride_align != 0 && !(c.stride_align.is_power_of_two() && c.stride_align <= 4096) {
            return Err(invalid(
                "capture.stride_align",
                "0 (the driver's choice) or a power of two up to 4096",
            ));
        }
        if !limits::GOP_CACHE_BYTES.contains(&c.gop_cache_bytes) {
            return Err(invalid(
                "capture.gop_cache_bytes",
                format!("{} bytes", limits::describe(&limits::GOP_CACHE_BYTES)),
            ));
        }
        if !limits::BITRATE.contains(&self.encoder.bitrate) {
            return Err(invalid(
                "encoder.bitrate",
                format!("{} bits per second", limits::describe(&limits::BITRATE)),
            ));
        }
        if !limits::KEYFRAME_INTERVAL.contains(&self.encoder.keyframe_interval) {
            return Err(invalid(
                "encoder.keyframe_interval",
                format!("{} frames", limits::describe(&limits::KEYFRAME_INTERVAL)),
            ));
        }
        if !limits::TEMPORAL_LAYERS.contains(&self.encoder.temporal_layers) {
            return Err(invalid(
                "encoder.temporal_layers",
                limits::describe(&limits::TEMPORAL_LAYERS),
            ));
        }
        if !limits::BITRATE.contains(&self.encoder.min_bitrate) {
            return Err(invalid(
                "encoder.min_bitrate",
                format!("{} bits per second", limits::describe(&limits::BITRATE)),
            ));
        }
        let w = &self.webrtc;
        if !(1..=64).contains(&w.max_viewers) {
            return Err(invalid("webrtc.max_viewers", "1 to 64"));
        }
        if !(1..=64).contains(&w.max_pending_sessions) {
            return Err(invalid("webrtc.max_pending_sessions", "1 to 64"));
        }
        if w.bind_addresses.is_empty() {
            return Err(invalid(
                "webrtc.bind_addresses",
                "at least one IP address, e.g. [\"0.0.0.0\"]",
            ));
        }
        if (w.udp_port_min == 0) != (w.udp_port_max == 0) || w.udp_port_min > w.udp_port_max {
            return Err(invalid(
                "webrtc.udp_port_min",
                "both 0 (any port), or 1..=65535 with udp_port_min <= udp_port_max",
            ));
        }
        for url in &w.stun_servers {
            if !(url.starts_with("stun:") || url.starts_with("stuns:")) {
                return Err(invalid(
                    "webrtc.stun_servers",
                    format!("{url:?} is not a stun: or stuns: URL"),
                ));
            }
        }
        for t in &w.turn_servers {
            if !(t.url.starts_with("turn:") || t.url.starts_with("turns:")) {
                return Err(invalid(
                    "webrtc.turn_servers",
                    format!("{:?} is not a turn: or turns: URL", t.url),
                ));
            }
        }
        let r = &w.turn_rest;
        for url in &r.urls {
            if !(url.starts_with("turn:") || url.starts_with("turns:")) {
                return Err(invalid(
                    "webrtc.turn_rest.urls",
                    format!("{url:?} is not a turn: or turns: URL"),
                ));
            }
        }
        if !r.urls.is_empty() && r.secret_file.as_os_str().is_empty() {
            return Err(invalid(
                "webrtc.turn_rest.secret_file",
                "the file holding coturn's static-auth-secret, required when webrtc.turn_rest.urls is set",
            ));
        }
        if !crate::protocol::turn::REST_TTL_S.contains(&r.ttl_s) {
            return Err(invalid(
                "webrtc.turn_rest.ttl_s",
                format!(
                    "{} to {} seconds",
                    crate::protocol::turn::REST_TTL_S.start(),
                    crate::protocol::turn::REST_TTL_S.end()
                ),
            ));
        }
        if !(1024..=1 << 20).contains(&w.max_sdp_bytes) {
            return Err(invalid("webrtc.max_sdp_bytes", "1024 to 1048576"));
        }
        if !(1000..=600_000).contains(&w.connect_timeout_ms) {
            return Err(invalid("webrtc.connect_timeout_ms", "1000 to 600000"));
        }
        if !(500..=600_000).contains(&w.disconnect_timeout_ms) {
            return Err(invalid("webrtc.disconnect_timeout_ms", "500 to 600000"));
        }
        if !(2..=120).contains(&w.viewer_queue_frames) {
            return Err(invalid("webrtc.viewer_queue_frames", "2 to 120"));
        }
        let k = &self.control;
        for ns in &k.forward_namespaces {
            if let Some(problem) = limits::namespace_problem(ns) {
                return Err(invalid("control.forward_namespaces", problem));
            }
        }
        self.validate_reply_to_allowed()?;
        if !(100..=600_000).contains(&k.forward_timeout_ms) {
            return Err(invalid("control.forward_timeout_ms", "100 to 600000"));
        }
        for (key, v) in [
            ("control.session_rate", k.session_rate),
            ("control.session_burst", k.session_burst),
            ("control.global_rate", k.global_rate),
            ("control.global_burst", k.global_burst),
        ] {
            if !(1..=100_000).contains(&v) {
                return Err(ConfigError::Invalid {
                    key,
                    message: "1 to 100000".into(),
                });
            }
        }
        let ha = self.homeassistant.discovery_prefix.trim_end_matches('/');
        if ha.is_empty() || ha.contains(['+', '#']) || ha.split('/').any(str::is_empty) {
            return Err(invalid(
                "homeassistant.discovery_prefix",
                "a topic prefix without wildcards or empty levels, normally \"homeassistant\"",
            ));
        }
        let m = &self.mqtt;
        if m.host.is_empty() {
            return Err(invalid("mqtt.host", "a host name or IP address"));
        }
        if m.port == 0 {
            return Err(invalid("mqtt.port", "1 to 65535"));
        }
        let prefix = m.prefix.trim_end_matches('/');
        if prefix.is_empty() || prefix.contains(['+', '#']) || prefix.split('/').any(str::is_empty)
        {
            return Err(invalid(
                "mqtt.prefix",
                "a topic prefix without wildcards (+ #), empty levels or a leading /",
            ));
        }
        if m.tls && m.ca_file.as_os_str().is_empty() {
            return Err(invalid(
                "mqtt.ca_file",
                "a PEM file of trusted CAs when mqtt.tls = true, e.g. \"/etc/ssl/certs/ca-certificates.crt\"",
            ));
        }
        if m.client_cert_file.as_os_str().is_empty() != m.client_key_file.as_os_str().is_empty() {
            return Err(invalid(
                "mqtt.client_cert_file",
                "set together with mqtt.client_key_file (mutual TLS), or both empty",
            ));
        }
        if !m.tls && !m.client_cert_file.as_os_str().is_empty() {
            return Err(invalid(
                "mqtt.client_cert_file",
                "only used with mqtt.tls = true; set mqtt.tls = true or leave it empty",
            ));
        }
        if !(5..=3600).contains(&m.keep_alive_s) {
            return Err(invalid("mqtt.keep_alive_s", "5 to 3600"));
        }
        if !(1024..=16 << 20).contains(&m.max_payload_bytes) {
            return Err(invalid("mqtt.max_payload_bytes", "1024 to 16777216"));
        }
        if m.reconnect_min_ms == 0 || m.reconnect_min_ms > m.reconnect_max_ms {
            return Err(invalid(
                "mqtt.reconnect_min_ms",
                "at least 1 and not above mqtt.reconnect_max_ms",
            ));
        }
        if m.state_min_interval_ms > 60_000 {
            return Err(invalid("mqtt.state_min_interval_ms", "0 to 60000"));
        }
        if self.web.enabled && self.web.root.as_os_str().is_empty() {
            return Err(invalid(
                "web.root",
                "the directory of the built viewer (web/dist), required when web.enabled = true",
            ));
        }
        let h = &self.whep;
        if !is_valid_whep_path(&h.path) {
            return Err(invalid(
                "whep.path",
                "a path like \"/whep\": segments of A-Z a-z 0-9 _ -, no trailing /",
            ));
        }
        if h.allowed_origins.iter().any(|o| {
            (o != "*" && !(o.starts_with("http://") || o.starts_with("https://")))
                || o.contains([' ', ',', '\r', '\n'])
        }) {
            return Err(invalid(
                "whep.allowed_origins",
                "\"*\" or origins like \"https://ha.example:8123\"",
            ));
        }
        // The URL goes into state and Home Assistant's "WHEP URL" sensor: no credential in it
        // (a query like ?access_token= or user info), and no longer than a sensor's state.
        let url_ok = |u: &str| {
            if u.len() > limits::MAX_ANNOUNCED_URL {
                return false;
            }
            let rest = u
                .strip_prefix("http://")
                .or_else(|| u.strip_prefix("https://"));
            rest.is_some_and(|r| {
                let authority = r.split('/').next().unwrap_or("");
                !r.contains(['?', '#']) && !authority.contains('@')
            })
        };
        if !(h.public_url.is_empty() || url_ok(&h.public_url)) {
            return Err(invalid(
                "whep.public_url",
                "empty or an http(s):// URL without query or user info, at most 255 bytes",
            ));
        }
        if !(100..=10_000).contains(&h.gather_timeout_ms) {
            return Err(invalid("whep.gather_timeout_ms", "100 to 10000"));
        }
        if h.tls_cert_file.as_os_str().is_empty() != h.tls_key_file.as_os_str().is_empty() {
            return Err(invalid(
                "whep.tls_key_file",
                "set whep.tls_cert_file and whep.tls_key_file together (both empty: plain HTTP)",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                "a tracing filter such as \"info\" or \"rtcam=debug,warn\"",
            ));
        }
        validate_auth(&self.auth, &self.control.forward_namespaces)
    }

    /// `control.reply_to_allowed`: valid filters that match none of the device's own topics
    /// (a reply there would speak, or answer itself, in the device's name).
    fn validate_reply_to_allowed(&self) -> Result<(), ConfigError> {
        let topics = Topics::new(self.mqtt.prefix.trim_end_matches('/'), &self.device.id);
        let any = SessionId::parse("any").expect("a valid session id");
        let mut own = vec![
            topics.status(),
            topics.state(),
            topics.command(),
            topics.snapshot(),
            topics.forward_reply(),
            topics.events(),
            topics.session_in(&any),
            topics.session_out(&any),
            topics.forward("any"),
        ];
        let ha = &self.homeassistant.discovery_prefix;
        own.push(ha_config_topic(ha, &self.device.id));
        own.push(ha_status_topic(ha));
        for filter in &self.control.reply_to_allowed {
            if !is_valid_filter(filter) {
                return Err(invalid(
                    "control.reply_to_allowed",
                    format!(
                        "{filter:?} is not an MQTT topic filter (levels split by /, + or # as whole levels, # last, no leading / or $)"
                    ),
                ));
            }
            if let Some(topic) = own.iter().find(|t| filter_matches(filter, t)) {
                return Err(invalid(
                    "control.reply_to_allowed",
                    format!(
                        "{filter:?} matches the device's own topic {topic}; allow only your dashboards' reply topics, e.g. \"dash/+/replies\""
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML (secrets live in files, so nothing is masked).
    pub fn to_toml(&self) -> String {
        // Every field is a plain TOML value; serialization cannot fail.
        toml::to_string(self).expect("config serializes to TOML")
    }
}

fn toml_file(path: &Path) -> config::File<config::FileSourceFile, config::FileFormat> {
    config::File::from(path).format(config::FileFormat::Toml)
}

/// Reads the first line of a secret file, trimmed.
pub fn read_secret(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    Ok(text.lines().next().unwrap_or("").trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_with(file: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let tmp = file.map(|text| {
            let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
            f.write_all(text.as_bytes()).unwrap();
            f
        });
        Config::load(&Sources {
            system_file: None,
            explicit_file: tmp.as_ref().map(|f| f.path().to_path_buf()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn err(file: Option<&str>, env: &[(&str, &str)]) -> String {
        load_with(file, env).expect_err("should fail").to_string()
    }

    #[test]
    fn whep_keys_are_checked_and_its_url_announced() {
        let c = load_with(None, &[]).unwrap();
        assert!(!c.whep.enabled, "WHEP is off by default");
        assert_eq!(c.whep.announced_url(), None);
        for (toml, key) in [
            ("[whep]\npath = \"whep\"\n", "whep.path"),
            ("[whep]\npath = \"/whep/\"\n", "whep.path"),
            ("[whep]\npath = \"/a b\"\n", "whep.path"),
            (
                "[whep]\nallowed_origins = [\"ha.example\"]\n",
                "whep.allowed_origins",
            ),
            (
                "[whep]\nallowed_origins = [\"https://a, https://b\"]\n",
                "whep.allowed_origins",
            ),
            (
                "[whep]\npublic_url = \"cam:8889/whep\"\n",
                "whep.public_url",
            ),
            (
                "[whep]\npublic_url = \"https://cam.lan/whep?access_token=x\"\n",
                "whep.public_url",
            ),
            (
                "[whep]\npublic_url = \"https://user:pw@cam.lan/whep\"\n",
                "whep.public_url",
            ),
            (
                format!(
                    "[whep]\npublic_url = \"https://cam.lan/{}\"\n",
                    "w".repeat(250)
                )
                .as_str(),
                "whep.public_url",
            ),
            ("[whep]\ngather_timeout_ms = 50\n", "whep.gather_timeout_ms"),
            ("[whep]\ntls_cert_file = \"/x.pem\"\n", "whep.tls_key_file"),
        ] {
            let e = err(Some(toml), &[]);
            assert!(e.contains(key), "{toml}: {e}");
        }
        let c = load_with(
            Some("[whep]\nenabled = true\npath = \"/cam/whep\"\nallowed_origins = [\"*\", \"https://ha.example:8123\"]\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.whep.announced_url().as_deref(),
            Some("http://127.0.0.1:8889/cam/whep")
        );
        let c = load_with(
            Some("[whep]\nenabled = true\nlisten = \"0.0.0.0:8889\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.whep.announced_url(), None, "a wildcard address is no URL");
        let c = load_with(
            Some("[whep]\nenabled = true\nlisten = \"0.0.0.0:8889\"\npublic_url = \"https://cam.lan/whep\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.whep.announced_url().as_deref(),
            Some("https://cam.lan/whep")
        );
    }

    #[test]
    fn defaults_load_and_validate() {
        let c = load_with(None, &[]).unwrap();
        assert_eq!(c.device.id, "rtcam");
        assert_eq!(c.capture.source, SourceKind::V4l2);
        assert_eq!(c.capture.format, PixelFormatChoice::Auto);
        assert_eq!(c.webrtc.max_viewers, 4);
        assert!(!c.broker.enabled);
        assert!(!c.web.enabled, "the web viewer is off by default");
    }

    #[test]
    fn shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let c = Config::load(&Sources {
                explicit_file: Some(path.clone()),
                ..Default::default()
            });
            assert!(c.is_ok(), "{}: {:?}", path.display(), c.err());
            // Signed mode is never off in a shipped config (rtcam.toml is what the Debian
            // package and the Yocto recipe install).
            assert_eq!(
                c.unwrap().auth.mode,
                AuthMode::Signed,
                "{} runs open mode",
                path.display()
            );
            checked += 1;
        }
        assert!(
            checked >= 3,
            "default.toml, rtcam.toml and demo.toml at least"
        );
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let c = load_with(
            Some("[capture]\nsource = \"test-pattern\"\nwidth = 1280\n"),
            &[
                ("RTCAM__CAPTURE__WIDTH", "320"),
                ("RTCAM__MQTT__HOST", "broker.lan"),
            ],
        )
        .unwrap();
        assert_eq!(c.capture.source, SourceKind::TestPattern);
        assert_eq!(c.capture.width, 320);
        assert_eq!(c.capture.height, 480);
        assert_eq!(c.mqtt.host, "broker.lan");
    }

    #[test]
    fn env_lists_and_numbers_parse() {
        let c = load_with(
            None,
            &[
                ("RTCAM__WEBRTC__BIND_ADDRESSES", "127.0.0.1,::1"),
                ("RTCAM__WEBRTC__MAX_VIEWERS", "2"),
                ("RTCAM__BROKER__ENABLED", "true"),
                ("OTHER__WEBRTC__MAX_VIEWERS", "9"),
            ],
        )
        .unwrap();
        assert_eq!(c.webrtc.bind_addresses.len(), 2);
        assert_eq!(c.webrtc.max_viewers, 2);
        assert!(c.broker.enabled);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err(Some("[capture]\nwidht = 5\n"), &[]);
        assert!(e.contains("widht"), "{e}");
        let e = err(Some("[camera]\nx = 1\n"), &[]);
        assert!(e.contains("camera"), "{e}");
        let e = err(None, &[("RTCAM__MQTT__HOTS", "x")]);
        assert!(e.contains("hots"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_allowed_values() {
        let e = err(Some("[capture]\nsource = \"webcam\"\n"), &[]);
        assert!(e.contains("webcam") && e.contains("test-pattern"), "{e}");
        let e = err(Some("[capture]\nformat = \"RGB4\"\n"), &[]);
        assert!(e.contains("RGB4") && e.contains("YUYV"), "{e}");
        let e = err(Some("[capture]\nwidth = 641\n"), &[]);
        assert!(e.contains("capture.width") && e.contains("even"), "{e}");
        let e = err(Some("[webrtc]\nmax_viewers = 0\n"), &[]);
        assert!(
            e.contains("webrtc.max_viewers") && e.contains("1 to 64"),
            "{e}"
        );
        let e = err(Some("[device]\nid = \"a/b\"\n"), &[]);
        assert!(e.contains("device.id"), "{e}");
        let e = err(Some("[encoder]\nbitrate = 5\n"), &[]);
        assert!(e.contains("encoder.bitrate"), "{e}");
        let e = err(Some("[webrtc]\nudp_port_min = 5000\n"), &[]);
        assert!(e.contains("webrtc.udp_port_min"), "{e}");
        let e = err(Some("[webrtc]\nstun_servers = [\"http://x\"]\n"), &[]);
        assert!(e.contains("webrtc.stun_servers"), "{e}");
        let e = err(Some("[mqtt]\nprefix = \"a/#\"\n"), &[]);
        assert!(e.contains("mqtt.prefix"), "{e}");
        let e = err(Some("[log]\ntarget = \"syslog\"\n"), &[]);
        assert!(e.contains("syslog") && e.contains("journald"), "{e}");
        let e = err(Some("[webrtc]\nbind_addresses = [\"nope\"]\n"), &[]);
        assert!(e.contains("nope") || e.contains("bind_addresses"), "{e}");
        let e = err(Some("[web]\nenabled = true\nroot = \"\"\n"), &[]);
        assert!(e.contains("web.root"), "{e}");
        let e = err(Some("[web]\nlisten = \"localhost\"\n"), &[]);
        assert!(e.contains("listen") || e.contains("localhost"), "{e}");
        let e = err(None, &[("RTCAM__CAPTURE__FPS", "fast")]);
        assert!(e.contains("fps") || e.contains("fast"), "{e}");
        let e = err(Some("[mqtt]\ntls = true\nca_file = \"\"\n"), &[]);
        assert!(e.contains("mqtt.ca_file") && e.contains("PEM"), "{e}");
        let e = err(
            Some("[mqtt]\ntls = true\nclient_cert_file = \"/c.pem\"\n"),
            &[],
        );
        assert!(
            e.contains("mqtt.client_cert_file") && e.contains("client_key_file"),
            "{e}"
        );
        let e = err(
            Some("[mqtt]\nclient_cert_file = \"/c.pem\"\nclient_key_file = \"/k.pem\"\n"),
            &[],
        );
        assert!(
            e.contains("mqtt.client_cert_file") && e.contains("mqtt.tls = true"),
            "{e}"
        );
        let c = load_with(None, &[("RTCAM__MQTT__TLS", "true")]).unwrap();
        assert!(c.mqtt.tls);
        let e = err(
            Some("[webrtc.turn_rest]\nurls = [\"turn:t.lan:3478\"]\n"),
            &[],
        );
        assert!(e.contains("webrtc.turn_rest.secret_file"), "{e}");
        let e = err(
            Some("[webrtc.turn_rest]\nurls = [\"stun:t.lan\"]\nsecret_file = \"/s\"\n"),
            &[],
        );
        assert!(
            e.contains("webrtc.turn_rest.urls") && e.contains("stun:t.lan"),
            "{e}"
        );
        let e = err(Some("[webrtc.turn_rest]\nttl_s = 5\n"), &[]);
        assert!(
            e.contains("webrtc.turn_rest.ttl_s") && e.contains("60"),
            "{e}"
        );
        let c = load_with(
            None,
            &[
                ("RTCAM__WEBRTC__TURN_REST__URLS", "turn:a:3478,turns:a:5349"),
                ("RTCAM__WEBRTC__TURN_REST__SECRET_FILE", "/run/secret"),
            ],
        )
        .unwrap();
        assert_eq!(c.webrtc.turn_rest.urls, ["turn:a:3478", "turns:a:5349"]);
        let e = err(Some("[capture]\ngop_cache_bytes = 100000000\n"), &[]);
        assert!(e.contains("capture.gop_cache_bytes"), "{e}");
    }

    #[test]
    fn camera_h264_is_chosen_explicitly_or_by_auto_when_preferred() {
        let c = load_with(None, &[]).unwrap();
        assert!(
            !c.capture.may_pass_h264_through(),
            "auto alone never passes H.264 through"
        );
        let c = load_with(Some("[capture]\nformat = \"H264\"\n"), &[]).unwrap();
        assert!(c.capture.may_pass_h264_through());
        let c = load_with(None, &[("RTCAM__CAPTURE__PREFER_CAMERA_H264", "true")]).unwrap();
        assert!(c.capture.may_pass_h264_through());
        let c = load_with(
            Some("[capture]\nformat = \"YU12\"\nprefer_camera_h264 = true\n"),
            &[],
        )
        .unwrap();
        assert!(
            !c.capture.may_pass_h264_through(),
            "an explicit pixel format wins"
        );
    }

    #[test]
    fn auth_section() {
        let c = load_with(None, &[]).unwrap();
        assert_eq!(
            c.auth.mode,
            AuthMode::Signed,
            "signed is the built-in default"
        );
        assert!(c.auth.owner_keys.is_empty());
        let owner = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
        let c = load_with(
            Some(&format!(
                "[control]\nforward_namespaces = [\"ptz\"]\n[auth]\nmode = \"open\"\nowner_keys = [\"{owner}\"]\ncontrol_namespaces = [\"ptz\"]\n"
            )),
            &[("RTCAM__AUTH__REVOKED", "a,b-2")],
        )
        .unwrap();
        assert_eq!(c.auth.mode, AuthMode::Open);
        assert_eq!(c.auth.owner_public_keys()[0].to_b64url(), owner);
        assert_eq!(c.auth.revoked, ["a", "b-2"]);
        let e = err(Some("[auth]\nmode = \"none\"\n"), &[]);
        assert!(e.contains("none") && e.contains("signed"), "{e}");
        let e = err(Some("[auth]\nowner_keys = [\"abc\"]\n"), &[]);
        assert!(
            e.contains("auth.owner_keys") && e.contains("token keygen"),
            "{e}"
        );
        let e = err(Some("[auth]\nrevoked = [\"a b\"]\n"), &[]);
        assert!(e.contains("auth.revoked"), "{e}");
        let e = err(Some("[auth]\ncontrol_namespaces = [\"ptz\"]\n"), &[]);
        assert!(
            e.contains("auth.control_namespaces") && e.contains("forward_namespaces"),
            "{e}"
        );
        let e = err(Some("[auth]\nmax_clock_skew_ms = 10\n"), &[]);
        assert!(e.contains("auth.max_clock_skew_ms"), "{e}");
        let e = err(Some("[auth]\nreplay_cache_entries = 1\n"), &[]);
        assert!(e.contains("auth.replay_cache_entries"), "{e}");
        let e = err(Some("[auth]\nowner_key = []\n"), &[]);
        assert!(e.contains("owner_key"), "{e}");
    }

    #[test]
    fn explicit_file_must_exist() {
        let e = Config::load(&Sources {
            explicit_file: Some("/nonexistent/rtcam.toml".into()),
            ..Default::default()
        })
        .expect_err("missing file");
        assert!(e.to_string().contains("/nonexistent/rtcam.toml"), "{e}");
    }

    #[test]
    fn effective_config_round_trips_through_toml() {
        let c = load_with(Some("[device]\nid = \"cam-7\"\n"), &[]).unwrap();
        let text = c.to_toml();
        let again = load_with(Some(&text), &[]).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn command_topic_settings() {
        let c = load_with(None, &[]).unwrap();
        assert!(c.control.mqtt_commands);
        assert!(c.control.reply_to_allowed.is_empty());
        let c = load_with(
            Some("[control]\nmqtt_commands = false\nreply_to_allowed = [\"dash/+/replies\", \"nodered/#\"]\n"),
            &[],
        )
        .unwrap();
        assert!(!c.control.mqtt_commands);
        assert_eq!(c.control.reply_to_allowed, ["dash/+/replies", "nodered/#"]);
        let c = load_with(None, &[("RTCAM__CONTROL__REPLY_TO_ALLOWED", "a/+,b/#")]).unwrap();
        assert_eq!(c.control.reply_to_allowed, ["a/+", "b/#"]);
        for bad in ["a/#/b", "", "$SYS/#"] {
            let e = err(
                Some(&format!("[control]\nreply_to_allowed = [\"{bad}\"]\n")),
                &[],
            );
            assert!(
                e.contains("control.reply_to_allowed") && e.contains("filter"),
                "{e}"
            );
        }
        // Filters that cover the device's own topics would let a sender speak in its name.
        for own in [
            "#",
            "rtcam/#",
            "rtcam/+/status",
            "rtcam/rtcam/session/+/out",
            "homeassistant/#",
        ] {
            let e = err(
                Some(&format!("[control]\nreply_to_allowed = [\"{own}\"]\n")),
                &[],
            );
            assert!(e.contains("the device's own topic"), "{own}: {e}");
        }
    }
}
