//! The signed envelope (docs/protocol.md §9.2–9.3): parsing, the signing input, sealing and signature checks.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::AuthError;
use super::keys::{PublicKey, SIGNATURE_LEN, SigningKey, b64url_encode, decode_signature};
use crate::protocol::PROTOCOL_VERSION;
use crate::protocol::limits::MAX_TS_MS;

/// The first line of every signing input: the scheme's name and version.
pub const SIGNING_DOMAIN: &str = "rtcam-sig-v1";
/// The envelope's `type`.
const ENVELOPE_TYPE: &str = "signed";

/// A parsed, not yet verified, signed envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The sender's clock when it signed, Unix milliseconds.
    pub ts_ms: u64,
    /// The wrapped message's exact JSON text.
    pub msg: String,
    /// The viewer's credential (JWT), on messages that open something.
    pub cred: Option<String>,
    pub sig: [u8; SIGNATURE_LEN],
    /// `sig` as it was written, echoed as the `ref` of an error about this envelope.
    pub sig_text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    #[serde(rename = "v")]
    _v: Value,
    #[serde(rename = "type")]
    _type: Value,
    ts: u64,
    msg: String,
    #[serde(default)]
    cred: Option<String>,
    sig: String,
}

#[derive(Serialize)]
struct WireOut<'a> {
    v: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    ts: u64,
    msg: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cred: Option<&'a str>,
    sig: String,
}

/// The signature text of `payload` if it is a JSON object with a string `sig`, whatever else is
/// wrong with it: the `ref` of the error that refuses it.
pub fn sig_reference(payload: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    let sig = value.get("sig")?.as_str()?;
    // Only a well-formed signature is echoed (bounded size, nothing odd in the reply).
    decode_signature(sig).ok().map(|_| sig.to_owned())
}

/// Parses an envelope, or says why it is not one (docs/protocol.md §9.4 step 1).
pub fn parse(payload: &[u8]) -> Result<Envelope, AuthError> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| AuthError::BadJson(e.to_string()))?;
    let Some(obj) = value.as_object() else {
        return Err(AuthError::NotObject);
    };
    match obj.get("v") {
        Some(v) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(v) => return Err(AuthError::UnsupportedVersion(v.to_string())),
        None => {
            return Err(AuthError::BadSchema(
                "missing field `v` (protocol version, 1)".into(),
            ));
        }
    }
    if obj.get("type").and_then(Value::as_str) != Some(ENVELOPE_TYPE) {
        return Err(AuthError::NotSigned);
    }
    if obj.get("cred").is_some_and(|c| !c.is_string()) {
        return Err(AuthError::BadSchema(
            "`cred` must be a string (a credential), or absent".into(),
        ));
    }
    // Parsed again from the bytes (not from `value`) so a duplicated field is refused
    // instead of silently taking its last value.
    let wire: Wire =
        serde_json::from_slice(payload).map_err(|e| AuthError::BadSchema(e.to_string()))?;
    if wire.ts > MAX_TS_MS {
        return Err(AuthError::BadSchema(format!(
            "`ts` must be at most {MAX_TS_MS} (Unix milliseconds)"
        )));
    }
    let sig = decode_signature(&wire.sig).map_err(|e| {
        AuthError::BadSchema(format!("`sig` must be a b64url Ed25519 signature: {e}"))
    })?;
    Ok(Envelope {
        ts_ms: wire.ts,
        msg: wire.msg,
        cred: wire.cred,
        sig,
        sig_text: wire.sig,
    })
}

/// `"rtcam-sig-v1" LF topic LF ts LF msg` (docs/protocol.md §9.3).
pub fn signing_input(topic: &str, ts_ms: u64, msg: &str) -> Result<Vec<u8>, AuthError> {
    if topic.contains('\n') {
        return Err(AuthError::TopicHasNewline);
    }
    let ts = ts_ms.to_string();
    let mut input =
        Vec::with_capacity(SIGNING_DOMAIN.len() + topic.len() + ts.len() + msg.len() + 3);
    for (i, part) in [SIGNING_DOMAIN, topic, &ts, msg].into_iter().enumerate() {
        if i > 0 {
            input.push(b'\n');
        }
        input.extend_from_slice(part.as_bytes());
    }
    Ok(input)
}

/// Signs `msg` for `topic` at `ts_ms` and returns the envelope's JSON text.
pub fn seal(
    key: &SigningKey,
    topic: &str,
    ts_ms: u64,
    msg: &str,
    cred: Option<&str>,
) -> Result<String, AuthError> {
    if ts_ms > MAX_TS_MS {
        return Err(AuthError::BadSchema(format!(
            "`ts` must be at most {MAX_TS_MS}"
        )));
    }
    let sig = key.sign(&signing_input(topic, ts_ms, msg)?);
    let out = WireOut {
        v: PROTOCOL_VERSION,
        kind: ENVELOPE_TYPE,
        ts: ts_ms,
        msg,
        cred,
        sig: b64url_encode(&sig),
    };
    // Strings and integers only: serialization cannot fail.
    Ok(serde_json::to_string(&out).expect("envelope serializes"))
}

/// Checks `envelope.sig` against `key` for the topic the envelope arrived on.
pub fn verify(envelope: &Envelope, topic: &str, key: &PublicKey) -> Result<(), AuthError> {
    let input = signing_input(topic, envelope.ts_ms, &envelope.msg)?;
    if key.verify(&input, &envelope.sig) {
        Ok(())
    } else {
        Err(AuthError::BadSignature)
    }
}

/// `|now - ts| <= max_skew_ms`, or [`AuthError::Stale`].
pub fn check_fresh(ts_ms: u64, now_ms: u64, max_skew_ms: u64) -> Result<(), AuthError> {
    if ts_ms.abs_diff(now_ms) <= max_skew_ms {
        Ok(())
    } else {
        Err(AuthError::Stale {
            ts_ms,
            now_ms,
            max_skew_ms,
        })
    }
}

/// The replay-cache key of a verified envelope: SHA-256 of its signing input. Independent of
/// the signature's encoding, so a re-encoded or malleated signature is still the same message.
pub fn digest(topic: &str, envelope: &Envelope) -> Result<[u8; 32], AuthError> {
    let input = signing_input(topic, envelope.ts_ms, &envelope.msg)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &input).as_ref());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOPIC: &str = "rtcam/cam1/session/abcdef0123456789/in";

    fn key() -> SigningKey {
        SigningKey::from_seed(&[9; 32])
    }

    fn sealed(msg: &str, cred: Option<&str>) -> String {
        seal(&key(), TOPIC, 1_000, msg, cred).unwrap()
    }

    #[test]
    fn signing_input_is_the_documented_concatenation() {
        assert_eq!(
            signing_input("a/b", 0, "{}").unwrap(),
            b"rtcam-sig-v1\na/b\n0\n{}".to_vec()
        );
        assert_eq!(
            signing_input("t", 1767225600000, "x\ny").unwrap(),
            b"rtcam-sig-v1\nt\n1767225600000\nx\ny".to_vec()
        );
        assert_eq!(
            signing_input("a\nb", 0, "{}"),
            Err(AuthError::TopicHasNewline)
        );
    }

    #[test]
    fn seal_parse_verify_round_trip() {
        let text = sealed(r#"{"v":1,"type":"bye"}"#, Some("a.b.c"));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "signed");
        assert_eq!(v["msg"], r#"{"v":1,"type":"bye"}"#);
        let env = parse(text.as_bytes()).unwrap();
        assert_eq!(env.ts_ms, 1_000);
        assert_eq!(env.cred.as_deref(), Some("a.b.c"));
        assert_eq!(env.sig_text, v["sig"].as_str().unwrap());
        verify(&env, TOPIC, &key().public_key()).unwrap();
        assert_eq!(sig_reference(text.as_bytes()), Some(env.sig_text.clone()));
    }

    #[test]
    fn signature_binds_topic_time_message_and_key() {
        let env = parse(sealed(r#"{"v":1,"type":"bye"}"#, None).as_bytes()).unwrap();
        let pk = key().public_key();
        assert_eq!(
            verify(&env, "rtcam/cam1/session/other/in", &pk),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(&env, "rtcam/cam1/session/abcdef0123456789/out", &pk),
            Err(AuthError::BadSignature)
        );
        let mut later = env.clone();
        later.ts_ms += 1;
        assert_eq!(verify(&later, TOPIC, &pk), Err(AuthError::BadSignature));
        let mut other = env.clone();
        other.msg = r#"{"v":1,"type":"bye" }"#.into();
        assert_eq!(verify(&other, TOPIC, &pk), Err(AuthError::BadSignature));
        let stranger = SigningKey::from_seed(&[8; 32]).public_key();
        assert_eq!(verify(&env, TOPIC, &stranger), Err(AuthError::BadSignature));
    }

    #[test]
    fn the_envelope_may_be_reserialized_but_not_the_message() {
        // \u escapes in the envelope change nothing: the msg string is what is signed.
        let text = sealed(r#"{"v":1,"type":"bye","reason":"é"}"#, None);
        let reencoded = text.replace('é', "\\u00e9");
        assert_ne!(text, reencoded);
        let env = parse(reencoded.as_bytes()).unwrap();
        verify(&env, TOPIC, &key().public_key()).unwrap();
    }

    #[test]
    fn parse_refusals() {
        let good: Value = serde_json::from_str(&sealed("{}", None)).unwrap();
        let with = |k: &str, v: Value| {
            let mut o = good.clone();
            o[k] = v;
            parse(o.to_string().as_bytes())
        };
        let without = |k: &str| {
            let mut o = good.clone();
            o.as_object_mut().unwrap().remove(k);
            parse(o.to_string().as_bytes())
        };
        assert!(matches!(parse(b"nope"), Err(AuthError::BadJson(_))));
        assert!(matches!(
            parse(br#"{"v":1,"type":"signed","msg":"\ud800"}"#),
            Err(AuthError::BadJson(_))
        ));
        assert_eq!(parse(b"[1]"), Err(AuthError::NotObject));
        assert!(matches!(
            with("v", json!(2)),
            Err(AuthError::UnsupportedVersion(_))
        ));
        assert!(matches!(without("v"), Err(AuthError::BadSchema(_))));
        assert_eq!(
            parse(br#"{"v":1,"type":"offer","sdp":"v=0"}"#),
            Err(AuthError::NotSigned)
        );
        assert_eq!(without("type"), Err(AuthError::NotSigned));
        for (k, v) in [
            ("ts", json!(-1)),
            ("ts", json!(1.5)),
            ("ts", json!("1")),
            ("ts", json!(MAX_TS_MS + 1)),
            ("msg", json!({"v":1})),
            ("cred", json!(null)),
            ("cred", json!(5)),
            ("sig", json!("AAAA")),
            ("sig", json!("not base64!")),
            ("extra", json!(true)),
        ] {
            assert!(
                matches!(with(k, v.clone()), Err(AuthError::BadSchema(_))),
                "{k}={v}"
            );
        }
        for k in ["ts", "msg", "sig"] {
            assert!(matches!(without(k), Err(AuthError::BadSchema(_))), "{k}");
        }
        assert!(
            matches!(
                parse(br#"{"v":1,"type":"signed","type":"signed","ts":1,"msg":"","sig":""}"#),
                Err(AuthError::BadSchema(_))
            ),
            "duplicate fields are refused"
        );
    }

    #[test]
    fn sig_reference_only_echoes_well_formed_signatures() {
        assert_eq!(sig_reference(b"junk"), None);
        assert_eq!(sig_reference(br#"{"sig":"AAAA"}"#), None);
        assert_eq!(sig_reference(br#"{"sig":5}"#), None);
        let s = b64url_encode(&[1; 64]);
        assert_eq!(
            sig_reference(format!(r#"{{"sig":"{s}"}}"#).as_bytes()),
            Some(s)
        );
    }

    #[test]
    fn freshness_window_is_inclusive_both_ways() {
        assert!(check_fresh(1_000, 61_000, 60_000).is_ok());
        assert!(check_fresh(121_000, 61_000, 60_000).is_ok());
        assert!(matches!(
            check_fresh(999, 61_000, 60_000),
            Err(AuthError::Stale { .. })
        ));
        assert!(matches!(
            check_fresh(121_001, 61_000, 60_000),
            Err(AuthError::Stale { .. })
        ));
    }

    #[test]
    fn digest_ignores_the_signature_encoding() {
        let env = parse(sealed("{}", None).as_bytes()).unwrap();
        let mut other = env.clone();
        other.sig = [0; 64];
        assert_eq!(digest(TOPIC, &env), digest(TOPIC, &other));
        assert_ne!(digest(TOPIC, &env), digest("x", &env));
    }
}
