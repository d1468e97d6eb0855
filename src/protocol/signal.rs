//! Signaling messages on the per-session topics (docs/protocol.md §3–4): parsing with error codes, and building.

use serde::{Deserialize, Serialize};
use std::fmt;

use super::PROTOCOL_VERSION;
use super::auth::keys::PublicKey;
use super::auth::{Refusal, RefusalCode};
use super::turn::{IceServer, ViewerIceServers};

/// Error codes of `{"type":"error"}` replies; the strings are part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ErrorCode {
    PayloadTooLarge,
    BadJson,
    BadSchema,
    UnsupportedVersion,
    SdpTooLarge,
    BadSdp,
    BadCandidate,
    UnknownSession,
    SessionExists,
    MaxViewers,
    TooManyCandidates,
    Busy,
    Internal,
    /// Signed mode: not signed, no or a bad credential, or not the session's key (§9.9).
    Unauthorized,
    /// Signed mode: the timestamp is outside the device's freshness window.
    Stale,
    /// WHEP in signed mode: a valid credential that does not allow this (another device's,
    /// or another session's). Never sent on MQTT (docs/whep.md).
    Forbidden,
    /// Signed mode: this signed message was already accepted.
    Replayed,
}

impl ErrorCode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::PayloadTooLarge => "payload-too-large",
            Self::BadJson => "bad-json",
            Self::BadSchema => "bad-schema",
            Self::UnsupportedVersion => "unsupported-version",
            Self::SdpTooLarge => "sdp-too-large",
            Self::BadSdp => "bad-sdp",
            Self::BadCandidate => "bad-candidate",
            Self::UnknownSession => "unknown-session",
            Self::SessionExists => "session-exists",
            Self::MaxViewers => "max-viewers",
            Self::TooManyCandidates => "too-many-candidates",
            Self::Busy => "busy",
            Self::Internal => "internal",
            Self::Unauthorized => "unauthorized",
            Self::Stale => "stale",
            Self::Forbidden => "forbidden",
            Self::Replayed => "replayed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected inbound message: the code and a human-readable reason for the error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub(crate) struct Rejection {
    pub code: ErrorCode,
    pub reason: String,
    /// What the error is about: the reply's `ref` (signed mode).
    pub reference: Ref,
}

/// The `ref` of an error (docs/protocol.md §9.6): what it is about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Ref {
    /// The session itself (no `ref`), e.g. `max-viewers` after the answer; always in open mode.
    #[default]
    Session,
    /// A refused message without a usable signature (`"ref": null`): not the viewer's own.
    Unsigned,
    /// The envelope with this `sig`.
    Sig(String),
}

impl Ref {
    /// The `ref` of an error about an inbound envelope whose `sig` may be unknown.
    pub(crate) fn message(sig: Option<String>) -> Self {
        sig.map_or(Self::Unsigned, Self::Sig)
    }

    fn is_session(&self) -> bool {
        *self == Self::Session
    }
}

impl Serialize for Ref {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Session | Self::Unsigned => s.serialize_none(),
            Self::Sig(sig) => s.serialize_str(sig),
        }
    }
}

impl Rejection {
    pub(crate) fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            reference: Ref::Session,
        }
    }

    /// The same rejection, about `reference`.
    pub(crate) fn about(mut self, reference: Ref) -> Self {
        self.reference = reference;
        self
    }
}

impl From<Refusal> for Rejection {
    /// A signed message the device refused (docs/protocol.md §9.4), as its error reply.
    fn from(r: Refusal) -> Self {
        let code = match r.code() {
            RefusalCode::BadJson => ErrorCode::BadJson,
            RefusalCode::BadSchema => ErrorCode::BadSchema,
            RefusalCode::UnsupportedVersion => ErrorCode::UnsupportedVersion,
            RefusalCode::Unauthorized => ErrorCode::Unauthorized,
            RefusalCode::Stale => ErrorCode::Stale,
            RefusalCode::Replayed => ErrorCode::Replayed,
            RefusalCode::Busy => ErrorCode::Busy,
        };
        Rejection::new(code, r.error.to_string()).about(Ref::message(r.reference))
    }
}

/// The browser's `RTCIceCandidateInit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IceCandidate {
    pub candidate: String,
    #[serde(rename = "sdpMid", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(
        rename = "sdpMLineIndex",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sdp_mline_index: Option<u16>,
    #[serde(
        rename = "usernameFragment",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub username_fragment: Option<String>,
}

/// A message a viewer sends on `.../session/<id>/in`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ViewerMessage {
    Offer {
        sdp: String,
    },
    /// `None` is end-of-candidates.
    Candidate(Option<IceCandidate>),
    Bye,
    /// A request for the ICE servers to gather with (docs/protocol.md §4.9): sent before the
    /// offer, it opens no session.
    IceServers,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
enum InboundWire {
    // `v` was already checked; it stays in the schema so deny_unknown_fields accepts it.
    Offer {
        #[serde(rename = "v")]
        _v: u32,
        sdp: String,
    },
    Candidate {
        #[serde(rename = "v")]
        _v: u32,
        candidate: Option<IceCandidate>,
    },
    Bye {
        #[serde(rename = "v")]
        _v: u32,
        #[serde(default)]
        #[allow(dead_code)] // accepted for symmetry with the device's bye; not acted on
        reason: Option<String>,
    },
    IceServers {
        #[serde(rename = "v")]
        _v: u32,
    },
}

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_payload_bytes: usize,
    pub max_sdp_bytes: usize,
}

/// Parses one inbound payload, or says exactly why not.
pub(crate) fn parse_viewer_message(
    payload: &[u8],
    limits: Limits,
) -> Result<ViewerMessage, Rejection> {
    if payload.len() > limits.max_payload_bytes {
        return Err(Rejection::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "payload is {} bytes; mqtt.max_payload_bytes is {}",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| Rejection::new(ErrorCode::BadJson, format!("not JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(Rejection::new(
            ErrorCode::BadJson,
            "payload must be a JSON object",
        ));
    };
    // The version is checked before the schema so a future v2 message gets the right code.
    match obj.get("v") {
        Some(v) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(v) => {
            return Err(Rejection::new(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {v} is not supported; this device speaks v=1"),
            ));
        }
        None => {
            return Err(Rejection::new(
                ErrorCode::BadSchema,
                "missing field `v` (protocol version, 1)",
            ));
        }
    }
    // serde treats a missing Option as null; the protocol requires `candidate` to be present.
    if obj.get("type").and_then(|t| t.as_str()) == Some("candidate")
        && !obj.contains_key("candidate")
    {
        return Err(Rejection::new(
            ErrorCode::BadSchema,
            "missing field `candidate` (an RTCIceCandidateInit, or null for end of candidates)",
        ));
    }
    let wire: InboundWire = serde_json::from_value(value)
        .map_err(|e| Rejection::new(ErrorCode::BadSchema, e.to_string()))?;
    Ok(match wire {
        InboundWire::Offer { sdp, .. } => {
            if sdp.len() > limits.max_sdp_bytes {
                return Err(Rejection::new(
                    ErrorCode::SdpTooLarge,
                    format!(
                        "offer SDP is {} bytes; webrtc.max_sdp_bytes is {}",
                        sdp.len(),
                        limits.max_sdp_bytes
                    ),
                ));
            }
            ViewerMessage::Offer { sdp }
        }
        InboundWire::Candidate { candidate, .. } => ViewerMessage::Candidate(candidate),
        InboundWire::Bye { .. } => ViewerMessage::Bye,
        InboundWire::IceServers { .. } => ViewerMessage::IceServers,
    })
}

/// Why the device ends a session (the `reason` of its bye).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ByeReason {
    Shutdown,
    Timeout,
    IceFailed,
    Closed,
    /// Signed mode: the session's credential expired.
    Expired,
}

/// A message the device sends on `.../session/<id>/out`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub(crate) enum DeviceMessage {
    Answer {
        v: u32,
        sdp: String,
    },
    Candidate {
        v: u32,
        candidate: Option<IceCandidate>,
    },
    Error {
        v: u32,
        code: ErrorCode,
        reason: String,
        /// Signed mode: the `sig` of the refused envelope, or null when it had none
        /// (docs/protocol.md §9.6); absent for errors about the session itself.
        #[serde(rename = "ref", skip_serializing_if = "Ref::is_session")]
        reference: Ref,
    },
    Bye {
        v: u32,
        reason: ByeReason,
    },
    /// The ICE servers a viewer may gather with, TURN credentials included (§4.9).
    IceServers {
        v: u32,
        ice_servers: Vec<IceServer>,
        /// When the TURN credentials expire (Unix seconds); absent without any.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires: Option<u64>,
    },
}

impl DeviceMessage {
    pub(crate) fn answer(sdp: String) -> Self {
        Self::Answer {
            v: PROTOCOL_VERSION,
            sdp,
        }
    }

    pub(crate) fn candidate(candidate: Option<IceCandidate>) -> Self {
        Self::Candidate {
            v: PROTOCOL_VERSION,
            candidate,
        }
    }

    pub(crate) fn error(rejection: &Rejection) -> Self {
        Self::Error {
            v: PROTOCOL_VERSION,
            code: rejection.code,
            reason: rejection.reason.clone(),
            reference: rejection.reference.clone(),
        }
    }

    pub(crate) fn bye(reason: ByeReason) -> Self {
        Self::Bye {
            v: PROTOCOL_VERSION,
            reason,
        }
    }

    pub(crate) fn ice_servers(set: ViewerIceServers) -> Self {
        Self::IceServers {
            v: PROTOCOL_VERSION,
            ice_servers: set.servers,
            expires: set.expires_at_s,
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        // Serializing these plain structs cannot fail: no maps with non-string keys, no floats.
        serde_json::to_vec(self).expect("device message serializes")
    }
}

/// `<prefix>/<device>/status` payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Status<'a> {
    pub v: u32,
    pub status: &'a str,
    pub device: &'a str,
    pub protocol: u32,
    /// Signed mode: `signed` (docs/protocol.md §9.6); absent in open mode, whose status is
    /// exactly the unsigned protocol's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<&'a str>,
    /// Signed mode: the device's public key (b64url), for viewers that pin it on first use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The retained status payload, `online` or `offline`; `device_key` is the device's public
/// key in signed mode, `None` in open mode.
pub(crate) fn status_payload(
    device: &str,
    online: bool,
    device_key: Option<&PublicKey>,
) -> Vec<u8> {
    let status = Status {
        v: PROTOCOL_VERSION,
        status: if online { "online" } else { "offline" },
        device,
        protocol: PROTOCOL_VERSION,
        auth: device_key.is_some().then_some("signed"),
        key: device_key.map(PublicKey::to_b64url),
    };
    // Plain struct of strings and integers: serialization cannot fail.
    serde_json::to_vec(&status).expect("status serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits {
        max_payload_bytes: 1024,
        max_sdp_bytes: 100,
    };

    fn parse(v: serde_json::Value) -> Result<ViewerMessage, Rejection> {
        parse_viewer_message(v.to_string().as_bytes(), LIMITS)
    }

    fn code(r: Result<ViewerMessage, Rejection>) -> ErrorCode {
        r.expect_err("should be rejected").code
    }

    #[test]
    fn parses_offer() {
        assert_eq!(
            parse(json!({"v":1,"type":"offer","sdp":"v=0"})),
            Ok(ViewerMessage::Offer { sdp: "v=0".into() })
        );
    }

    #[test]
    fn parses_candidates_and_end_of_candidates() {
        let m = parse(json!({"v":1,"type":"candidate","candidate":{
            "candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}}))
        .unwrap();
        let ViewerMessage::Candidate(Some(c)) = m else {
            panic!("{m:?}")
        };
        assert_eq!(c.sdp_mid.as_deref(), Some("0"));
        assert_eq!(c.sdp_mline_index, Some(0));
        assert_eq!(
            parse(json!({"v":1,"type":"candidate","candidate":null})),
            Ok(ViewerMessage::Candidate(None))
        );
    }

    #[test]
    fn parses_bye_with_or_without_reason() {
        assert_eq!(parse(json!({"v":1,"type":"bye"})), Ok(ViewerMessage::Bye));
        assert_eq!(
            parse(json!({"v":1,"type":"bye","reason":"closed"})),
            Ok(ViewerMessage::Bye)
        );
    }

    #[test]
    fn parses_the_ice_servers_request() {
        assert_eq!(
            parse(json!({"v":1,"type":"ice-servers"})),
            Ok(ViewerMessage::IceServers)
        );
        assert_eq!(
            code(parse(json!({"v":1,"type":"ice-servers","urls":[]}))),
            ErrorCode::BadSchema
        );
    }

    #[test]
    fn rejects_non_json_and_non_objects() {
        assert_eq!(
            code(parse_viewer_message(b"hello", LIMITS)),
            ErrorCode::BadJson
        );
        assert_eq!(code(parse_viewer_message(b"", LIMITS)), ErrorCode::BadJson);
        assert_eq!(code(parse(json!([1, 2]))), ErrorCode::BadJson);
        assert_eq!(code(parse(json!("offer"))), ErrorCode::BadJson);
        assert_eq!(
            code(parse_viewer_message(&[0xff, 0xfe], LIMITS)),
            ErrorCode::BadJson
        );
    }

    #[test]
    fn rejects_wrong_versions() {
        assert_eq!(
            code(parse(json!({"v":2,"type":"offer","sdp":"x"}))),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            code(parse(json!({"v":"1","type":"offer","sdp":"x"}))),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            code(parse(json!({"type":"offer","sdp":"x"}))),
            ErrorCode::BadSchema
        );
    }

    #[test]
    fn rejects_schema_violations() {
        for bad in [
            json!({"v":1}),
            json!({"v":1,"type":"answer","sdp":"x"}),
            json!({"v":1,"type":"offer"}),
            json!({"v":1,"type":"offer","sdp":5}),
            json!({"v":1,"type":"offer","sdp":"x","extra":true}),
            json!({"v":1,"type":"candidate"}),
            json!({"v":1,"type":"candidate","candidate":{"sdpMid":"0"}}),
            json!({"v":1,"type":"candidate","candidate":{"candidate":"c","sdpMLineIndex":-1}}),
            json!({"v":1,"type":"candidate","candidate":{"candidate":"c","bogus":1}}),
        ] {
            assert_eq!(code(parse(bad.clone())), ErrorCode::BadSchema, "{bad}");
        }
    }

    #[test]
    fn enforces_size_limits() {
        let big_sdp = "a".repeat(101);
        assert_eq!(
            code(parse(json!({"v":1,"type":"offer","sdp":big_sdp}))),
            ErrorCode::SdpTooLarge
        );
        let huge = vec![b' '; 1025];
        assert_eq!(
            code(parse_viewer_message(&huge, LIMITS)),
            ErrorCode::PayloadTooLarge
        );
    }

    #[test]
    fn device_messages_match_the_documented_json() {
        let v =
            |m: DeviceMessage| serde_json::from_slice::<serde_json::Value>(&m.to_json()).unwrap();
        assert_eq!(
            v(DeviceMessage::answer("s".into())),
            json!({"v":1,"type":"answer","sdp":"s"})
        );
        assert_eq!(
            v(DeviceMessage::candidate(None)),
            json!({"v":1,"type":"candidate","candidate":null})
        );
        assert_eq!(
            v(DeviceMessage::error(&Rejection::new(
                ErrorCode::MaxViewers,
                "full"
            ))),
            json!({"v":1,"type":"error","code":"max-viewers","reason":"full"})
        );
        assert_eq!(
            v(DeviceMessage::error(
                &Rejection::new(ErrorCode::Unauthorized, "no").about(Ref::Sig("c2ln".into()))
            )),
            json!({"v":1,"type":"error","code":"unauthorized","reason":"no","ref":"c2ln"})
        );
        assert_eq!(
            v(DeviceMessage::error(
                &Rejection::new(ErrorCode::Unauthorized, "no").about(Ref::Unsigned)
            )),
            json!({"v":1,"type":"error","code":"unauthorized","reason":"no","ref":null})
        );
        assert_eq!(
            v(DeviceMessage::bye(ByeReason::Expired)),
            json!({"v":1,"type":"bye","reason":"expired"})
        );
        assert_eq!(
            v(DeviceMessage::bye(ByeReason::IceFailed)),
            json!({"v":1,"type":"bye","reason":"ice-failed"})
        );
        let c = IceCandidate {
            candidate: "candidate:x".into(),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
            username_fragment: None,
        };
        assert_eq!(
            v(DeviceMessage::candidate(Some(c))),
            json!({"v":1,"type":"candidate","candidate":{"candidate":"candidate:x","sdpMid":"0","sdpMLineIndex":0}})
        );
        let servers = ViewerIceServers {
            servers: vec![
                IceServer {
                    urls: vec!["stun:s:3478".into()],
                    username: None,
                    credential: None,
                },
                IceServer {
                    urls: vec!["turn:t:3478".into()],
                    username: Some("1700000000:cam-viewer".into()),
                    credential: Some(crate::protocol::turn::Secret::new("pw")),
                },
            ],
            expires_at_s: Some(1_700_000_000),
        };
        assert_eq!(
            v(DeviceMessage::ice_servers(servers)),
            json!({"v":1,"type":"ice-servers","expires":1_700_000_000u64,"ice_servers":[
                {"urls":["stun:s:3478"]},
                {"urls":["turn:t:3478"],"username":"1700000000:cam-viewer","credential":"pw"}]})
        );
        assert_eq!(
            v(DeviceMessage::ice_servers(ViewerIceServers {
                servers: vec![],
                expires_at_s: None
            })),
            json!({"v":1,"type":"ice-servers","ice_servers":[]})
        );
    }

    #[test]
    fn error_code_strings_are_stable() {
        for code in [
            ErrorCode::PayloadTooLarge,
            ErrorCode::BadJson,
            ErrorCode::BadSchema,
            ErrorCode::UnsupportedVersion,
            ErrorCode::SdpTooLarge,
            ErrorCode::BadSdp,
            ErrorCode::BadCandidate,
            ErrorCode::UnknownSession,
            ErrorCode::SessionExists,
            ErrorCode::MaxViewers,
            ErrorCode::TooManyCandidates,
            ErrorCode::Busy,
            ErrorCode::Internal,
            ErrorCode::Unauthorized,
            ErrorCode::Stale,
            ErrorCode::Replayed,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        }
    }

    #[test]
    fn status_payloads() {
        let on: serde_json::Value =
            serde_json::from_slice(&status_payload("cam1", true, None)).unwrap();
        assert_eq!(
            on,
            json!({"v":1,"status":"online","device":"cam1","protocol":1})
        );
        let key = crate::protocol::auth::keys::SigningKey::from_seed(&[7; 32]).public_key();
        let off: serde_json::Value =
            serde_json::from_slice(&status_payload("cam1", false, Some(&key))).unwrap();
        assert_eq!(
            off,
            json!({"v":1,"status":"offline","device":"cam1","protocol":1,"auth":"signed","key":key.to_b64url()})
        );
    }
}
