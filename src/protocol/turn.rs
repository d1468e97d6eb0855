//! ICE servers for the device and its viewers, with TURN credentials minted by coturn's REST scheme (`use-auth-secret`) as a pure function of the secret and `now`.
//!
//! coturn's TURN REST API (README.turnserver, "TURN REST API"; `get_user_key` in
//! src/apps/relay/userdb.c): the username is `"<expiry, Unix seconds>:<name>"` and the password
//! `base64(HMAC-SHA1(shared secret, username))`. coturn refuses a username whose timestamp is
//! in the past when an allocation is made; an allocation it accepted is refreshed with the key
//! it cached, so a session outlives the credential that opened it.

use std::fmt;

use base64::Engine;
use serde::Serialize;

/// Shortest and longest lifetime of a minted credential, seconds (`webrtc.turn_rest.ttl_s`).
pub const REST_TTL_S: std::ops::RangeInclusive<u64> = 60..=7 * 86_400;

/// A secret (a TURN password or coturn's shared secret): never printed, not even by `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A username and password for coturn's REST scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestCredential {
    pub username: String,
    pub password: Secret,
}

/// coturn's REST credential for `name`, valid until `expires_at_s` (Unix seconds):
/// username `"<expires_at_s>:<name>"`, password `base64(HMAC-SHA1(secret, username))`.
pub fn rest_credential(secret: &Secret, name: &str, expires_at_s: u64) -> RestCredential {
    let username = format!("{expires_at_s}:{name}");
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        secret.expose().as_bytes(),
    );
    let tag = ring::hmac::sign(&key, username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    RestCredential {
        username,
        password: Secret(password),
    }
}

/// One ICE server as W3C `RTCIceServer` JSON (`urls`, `username`, `credential`): what viewers
/// are given, and what the device's own peer connections use.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "expose")]
    pub credential: Option<Secret>,
}

fn expose<S: serde::Serializer>(c: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match c {
        Some(secret) => s.serialize_str(secret.expose()),
        None => s.serialize_none(),
    }
}

impl fmt::Debug for IceServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IceServer")
            .field("urls", &self.urls)
            .field("username", &self.username)
            .field("credential", &self.credential.as_ref().map(|_| ".."))
            .finish()
    }
}

/// A TURN server with a fixed username and password (`[[webrtc.turn_servers]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticTurn {
    pub url: String,
    pub username: String,
    pub credential: Secret,
}

/// TURN servers sharing coturn's REST secret (`[webrtc.turn_rest]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestTurn {
    pub urls: Vec<String>,
    pub secret: Secret,
    pub ttl_s: u64,
}

/// The ICE servers viewers are given, and until when their TURN credentials are valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewerIceServers {
    pub servers: Vec<IceServer>,
    /// Unix seconds; `None` when no credential was minted (STUN only, or nothing).
    pub expires_at_s: Option<u64>,
}

/// Every ICE server rtcam knows: STUN, TURN with static credentials, TURN with the REST secret.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IceServerSet {
    pub stun: Vec<String>,
    pub static_turn: Vec<StaticTurn>,
    pub rest: Option<RestTurn>,
    /// The `<name>` of minted usernames: the device id (`<id>` for the device's own
    /// allocations, `<id>-viewer` for its viewers'), so coturn's logs and quotas tell them apart.
    pub name: String,
}

/// True for a TURN URL webrtc-rs can allocate on: `turn:` over UDP (webrtc-rs 0.21 skips
/// `turns:` and `?transport=tcp`, with a warning per peer connection).
pub fn device_can_use(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("turn:") else {
        return false;
    };
    match rest.split_once('?') {
        None => true,
        Some((_, query)) => query
            .split('&')
            .filter_map(|kv| kv.strip_prefix("transport="))
            .all(|t| t.eq_ignore_ascii_case("udp")),
    }
}

impl IceServerSet {
    /// The servers the device's own peer connection uses at `now_s` (Unix seconds): every
    /// STUN server, and the TURN URLs it can allocate on, with a credential minted now.
    pub fn for_device(&self, now_s: u64) -> Vec<IceServer> {
        let mut out = Vec::new();
        if !self.stun.is_empty() {
            out.push(IceServer {
                urls: self.stun.clone(),
                username: None,
                credential: None,
            });
        }
        for t in &self.static_turn {
            if device_can_use(&t.url) {
                out.push(IceServer {
                    urls: vec![t.url.clone()],
                    username: Some(t.username.clone()),
                    credential: Some(t.credential.clone()),
                });
            }
        }
        if let Some(rest) = &self.rest {
            let urls: Vec<String> = rest
                .urls
                .iter()
                .filter(|u| device_can_use(u))
                .cloned()
                .collect();
            if !urls.is_empty() {
                let c = rest_credential(&rest.secret, &self.name, now_s + rest.ttl_s);
                out.push(IceServer {
                    urls,
                    username: Some(c.username),
                    credential: Some(c.password),
                });
            }
        }
        out
    }

    /// The servers a new viewer session is given at `now_s` (Unix seconds): every STUN server
    /// and every REST TURN URL with a credential minted now. The one source of viewers' ICE
    /// servers: the `ice-servers` reply (docs/protocol.md §4.9), and any other way a session
    /// is set up (e.g. WHEP's `Link` headers). Static TURN credentials are never handed out:
    /// they do not expire, so whoever saw one could use the relay for good.
    pub fn for_viewers(&self, now_s: u64) -> ViewerIceServers {
        let mut servers = Vec::new();
        if !self.stun.is_empty() {
            servers.push(IceServer {
                urls: self.stun.clone(),
                username: None,
                credential: None,
            });
        }
        let mut expires_at_s = None;
        if let Some(rest) = &self.rest {
            let expires = now_s + rest.ttl_s;
            let c = rest_credential(&rest.secret, &format!("{}-viewer", self.name), expires);
            servers.push(IceServer {
                urls: rest.urls.clone(),
                username: Some(c.username),
                credential: Some(c.password),
            });
            expires_at_s = Some(expires);
        }
        ViewerIceServers {
            servers,
            expires_at_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test vectors computed independently with Python's standard library:
    /// `base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest())`.
    #[test]
    fn rest_credentials_match_independent_vectors() {
        for (secret, name, exp, username, password) in [
            (
                "north",
                "cam1",
                1_700_000_000,
                "1700000000:cam1",
                "h1Xyr2nrMRO/pzKAGLSYHQwCa0E=",
            ),
            (
                "s3cr3t-with-a-longer-value-for-coturn",
                "rtcam.viewer",
                4_102_444_800,
                "4102444800:rtcam.viewer",
                "rTV16BowwYl0aTSyE4h0OvRiU0s=",
            ),
            ("", "x", 0, "0:x", "gT4DOD4JZ/CCaiekEJvCWY/SIT8="),
            ("ünïcödé", "a", 1, "1:a", "HZ7iNnLCOLbvscbmB5ei4uRQHeA="),
        ] {
            let c = rest_credential(&Secret::new(secret), name, exp);
            assert_eq!(c.username, username);
            assert_eq!(c.password.expose(), password, "{secret:?} {username}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let set = IceServerSet {
            stun: vec!["stun:s.example:3478".into()],
            static_turn: vec![StaticTurn {
                url: "turn:t.example:3478".into(),
                username: "u".into(),
                credential: Secret::new("static-password"),
            }],
            rest: Some(RestTurn {
                urls: vec!["turn:t.example:3478".into()],
                secret: Secret::new("shared-secret"),
                ttl_s: 600,
            }),
            name: "cam".into(),
        };
        let text = format!("{set:?} {:?} {:?}", set.for_device(5), set.for_viewers(5));
        for secret in ["static-password", "shared-secret"] {
            assert!(!text.contains(secret), "{text}");
        }
        let minted = rest_credential(&Secret::new("shared-secret"), "cam", 605);
        assert!(!text.contains(minted.password.expose()), "{text}");
    }

    #[test]
    fn device_servers_keep_udp_turn_only_and_mint_now_plus_ttl() {
        let set = IceServerSet {
            stun: vec!["stun:s.example:3478".into()],
            static_turn: vec![
                StaticTurn {
                    url: "turns:t.example:5349".into(),
                    username: "u".into(),
                    credential: Secret::new("p"),
                },
                StaticTurn {
                    url: "turn:t.example:3478?transport=udp".into(),
                    username: "u".into(),
                    credential: Secret::new("p"),
                },
            ],
            rest: Some(RestTurn {
                urls: vec![
                    "turn:r.example:3478".into(),
                    "turn:r.example:3478?transport=tcp".into(),
                    "turns:r.example:5349?transport=tcp".into(),
                ],
                secret: Secret::new("north"),
                ttl_s: 3600,
            }),
            name: "cam1".into(),
        };
        let d = set.for_device(1_699_996_400);
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].urls, ["stun:s.example:3478"]);
        assert_eq!(d[1].urls, ["turn:t.example:3478?transport=udp"]);
        assert_eq!(d[2].urls, ["turn:r.example:3478"]);
        assert_eq!(d[2].username.as_deref(), Some("1700000000:cam1"));
        assert_eq!(
            d[2].credential.as_ref().map(Secret::expose),
            Some("h1Xyr2nrMRO/pzKAGLSYHQwCa0E=")
        );

        let v = set.for_viewers(1_699_996_400);
        assert_eq!(v.expires_at_s, Some(1_700_000_000));
        assert_eq!(v.servers.len(), 2, "static TURN is never handed out");
        assert_eq!(v.servers[1].urls.len(), 3, "viewers get every REST URL");
        assert_eq!(
            v.servers[1].username.as_deref(),
            Some("1700000000:cam1-viewer")
        );
        let json = serde_json::to_value(&v.servers).unwrap();
        assert_eq!(json[0], serde_json::json!({"urls":["stun:s.example:3478"]}));
        assert_eq!(
            json[1]["credential"],
            rest_credential(&Secret::new("north"), "cam1-viewer", 1_700_000_000)
                .password
                .expose()
        );
    }

    #[test]
    fn nothing_configured_gives_nothing() {
        let set = IceServerSet::default();
        assert!(set.for_device(1).is_empty());
        assert_eq!(
            set.for_viewers(1),
            ViewerIceServers {
                servers: vec![],
                expires_at_s: None
            }
        );
    }

    #[test]
    fn udp_turn_urls_are_recognised() {
        for (url, ok) in [
            ("turn:a:3478", true),
            ("turn:a:3478?transport=udp", true),
            ("turn:a:3478?transport=UDP", true),
            ("turn:a:3478?transport=tcp", false),
            ("turns:a:5349", false),
            ("stun:a:3478", false),
        ] {
            assert_eq!(device_can_use(url), ok, "{url}");
        }
    }
}
