//! Viewer credentials (docs/protocol.md §9.5): EdDSA JWTs from an owner key, bound to a viewer key; issuing and verifying.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::keys::{PublicKey, SigningKey, b64url_decode, b64url_encode, decode_signature};
use super::permissions::Permission;
use crate::protocol::limits::{MAX_AUDIENCE, MAX_CREDENTIAL_BYTES, MAX_CREDENTIAL_NAMESPACES};
use crate::protocol::topics::is_valid_id;

/// The JOSE `alg` of credentials.
pub const ALG: &str = "EdDSA";
/// The JOSE `typ` of credentials (explicit typing, RFC 8725 §3.11).
pub const TYP: &str = "rtcam-viewer+jwt";
/// `aud` value that means every device trusting the owner key.
pub const ANY_DEVICE: &str = "*";

/// Why a credential is refused; every variant is `unauthorized` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("credential is {0} bytes; at most {MAX_CREDENTIAL_BYTES}")]
    TooLarge(usize),
    #[error("not a JWT (three b64url parts separated by '.'): {0}")]
    Malformed(String),
    #[error("bad JOSE header: {0}")]
    BadHeader(String),
    #[error("signed by an owner key this device does not trust (kid {0})")]
    UnknownOwner(String),
    #[error("the owner's signature does not verify")]
    BadSignature,
    #[error("bad claims: {0}")]
    BadClaims(String),
    #[error("not valid for device {device:?} (aud {audience:?})")]
    WrongDevice {
        device: String,
        audience: Vec<String>,
    },
    #[error("expired at {exp} (Unix seconds); the device's time is {now}")]
    Expired { exp: u64, now: u64 },
    #[error("not valid before {nbf} (Unix seconds); the device's time is {now}")]
    NotYetValid { nbf: u64, now: u64 },
    #[error("credential {0:?} is revoked (auth.revoked)")]
    Revoked(String),
}

/// What an owner grants a viewer: the content of a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Device ids, or [`ANY_DEVICE`].
    pub audience: Vec<String>,
    /// The viewer's own public key (`cnf.jwk`).
    pub viewer_key: PublicKey,
    pub permission: Permission,
    /// Forwarded namespaces granted by this credential (`ns`).
    pub namespaces: Vec<String>,
    pub issued_at_s: u64,
    pub expires_at_s: u64,
    pub not_before_s: Option<u64>,
    /// `jti`.
    pub id: String,
    /// `sub`: a name for logs.
    pub subject: Option<String>,
}

/// A credential that verified: its claims and the owner key that signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub claims: Claims,
    pub owner: PublicKey,
}

/// The device's side: which owner keys it trusts, who it is, what is revoked.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    owners: HashMap<String, PublicKey>,
    device_id: String,
    revoked: HashSet<String>,
}

impl Trust {
    pub fn new(
        device_id: &str,
        owner_keys: impl IntoIterator<Item = PublicKey>,
        revoked: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            owners: owner_keys
                .into_iter()
                .map(|k| (k.thumbprint(), k))
                .collect(),
            device_id: device_id.to_owned(),
            revoked: revoked.into_iter().collect(),
        }
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Verifies `token` at `now_s` (Unix seconds): docs/protocol.md §9.5 steps 1–4.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Credential, CredentialError> {
        if token.len() > MAX_CREDENTIAL_BYTES {
            return Err(CredentialError::TooLarge(token.len()));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CredentialError::Malformed(
                "expected exactly two '.' separators".into(),
            ));
        };
        let header_json = b64url_decode(header_b64)
            .map_err(|e| CredentialError::Malformed(format!("header: {e}")))?;
        let header: WireHeader = serde_json::from_slice(&header_json)
            .map_err(|e| CredentialError::BadHeader(e.to_string()))?;
        if header.alg != ALG {
            return Err(CredentialError::BadHeader(format!(
                "alg {:?}; only {ALG:?} is accepted",
                header.alg
            )));
        }
        if header.typ != TYP {
            return Err(CredentialError::BadHeader(format!(
                "typ {:?}; expected {TYP:?}",
                header.typ
            )));
        }
        let Some(owner) = self.owners.get(&header.kid) else {
            return Err(CredentialError::UnknownOwner(truncate(&header.kid)));
        };
        let sig = decode_signature(sig_b64)
            .map_err(|e| CredentialError::Malformed(format!("signature: {e}")))?;
        let signed_len = header_b64.len() + 1 + payload_b64.len();
        if !owner.verify(&token.as_bytes()[..signed_len], &sig) {
            return Err(CredentialError::BadSignature);
        }
        let payload_json = b64url_decode(payload_b64)
            .map_err(|e| CredentialError::Malformed(format!("payload: {e}")))?;
        let claims = parse_claims(&payload_json)?;
        if !claims
            .audience
            .iter()
            .any(|a| a == ANY_DEVICE || *a == self.device_id)
        {
            return Err(CredentialError::WrongDevice {
                device: self.device_id.clone(),
                audience: claims.audience,
            });
        }
        if now_s >= claims.expires_at_s {
            return Err(CredentialError::Expired {
                exp: claims.expires_at_s,
                now: now_s,
            });
        }
        if let Some(nbf) = claims.not_before_s
            && now_s < nbf
        {
            return Err(CredentialError::NotYetValid { nbf, now: now_s });
        }
        if self.revoked.contains(&claims.id) {
            return Err(CredentialError::Revoked(claims.id));
        }
        Ok(Credential {
            claims,
            owner: *owner,
        })
    }
}

/// At most 64 characters of an untrusted string, for error messages.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireHeader {
    alg: String,
    kid: String,
    typ: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cnf {
    jwk: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireClaims {
    aud: Audience,
    cnf: Cnf,
    exp: u64,
    iat: u64,
    #[serde(default)]
    nbf: Option<u64>,
    jti: String,
    scope: String,
    #[serde(default)]
    ns: Option<Vec<String>>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // informative only (docs/protocol.md §9.5)
    iss: Option<String>,
}

#[derive(Serialize)]
struct WireJwk<'a> {
    kty: &'static str,
    crv: &'static str,
    x: &'a str,
}

#[derive(Serialize)]
struct WireCnf<'a> {
    jwk: WireJwk<'a>,
}

/// Claims in alphabetical order, as `rtcam token issue` writes them.
#[derive(Serialize)]
struct WireClaimsOut<'a> {
    aud: &'a [String],
    cnf: WireCnf<'a>,
    exp: u64,
    iat: u64,
    jti: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    ns: &'a [String],
    scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
}

/// True for forwarded-namespace names: 1–64 of `[a-z0-9_-]` (docs/protocol.md §6.3).
pub fn is_valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 64
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The viewer key of a `cnf.jwk`: an Ed25519 OKP key without private members.
fn jwk_public_key(jwk: &Map<String, Value>) -> Result<PublicKey, String> {
    if jwk.contains_key("d") {
        return Err("cnf.jwk contains a private key (`d`)".into());
    }
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
        return Err("cnf.jwk must be {\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":...}".into());
    }
    let x = field("x").ok_or("cnf.jwk has no `x`")?;
    PublicKey::from_b64url(x).map_err(|e| format!("cnf.jwk.x: {e}"))
}

fn bad(msg: impl Into<String>) -> CredentialError {
    CredentialError::BadClaims(msg.into())
}

/// Checks the shape of every claim (not the device, times or revocation).
fn validate(claims: &Claims) -> Result<(), CredentialError> {
    if claims.audience.is_empty() || claims.audience.len() > MAX_AUDIENCE {
        return Err(bad(format!("aud must name 1 to {MAX_AUDIENCE} devices")));
    }
    if let Some(a) = claims
        .audience
        .iter()
        .find(|a| *a != ANY_DEVICE && !is_valid_id(a))
    {
        return Err(bad(format!(
            "aud {:?} is neither a device id nor \"*\"",
            truncate(a)
        )));
    }
    if !is_valid_id(&claims.id) {
        return Err(bad("jti must be 1 to 64 characters from [A-Za-z0-9_-]"));
    }
    if claims.namespaces.len() > MAX_CREDENTIAL_NAMESPACES {
        return Err(bad(format!(
            "ns may list at most {MAX_CREDENTIAL_NAMESPACES} namespaces"
        )));
    }
    if let Some(ns) = claims.namespaces.iter().find(|n| !is_valid_namespace(n)) {
        return Err(bad(format!(
            "ns {:?}: namespaces are 1-64 characters from [a-z0-9_-]",
            truncate(ns)
        )));
    }
    if let Some(sub) = &claims.subject
        && (sub.is_empty() || sub.chars().count() > 64 || sub.chars().any(char::is_control))
    {
        return Err(bad("sub must be 1 to 64 characters, no control characters"));
    }
    Ok(())
}

fn parse_claims(json: &[u8]) -> Result<Claims, CredentialError> {
    let wire: WireClaims = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let audience = match wire.aud {
        Audience::One(a) => vec![a],
        Audience::Many(list) => list,
    };
    let claims = Claims {
        audience,
        viewer_key: jwk_public_key(&wire.cnf.jwk).map_err(bad)?,
        permission: Permission::from_scope(&wire.scope).map_err(bad)?,
        namespaces: wire.ns.unwrap_or_default(),
        issued_at_s: wire.iat,
        expires_at_s: wire.exp,
        not_before_s: wire.nbf,
        id: wire.jti,
        subject: wire.sub,
    };
    validate(&claims)?;
    Ok(claims)
}

/// Signs `claims` with the owner key: the credential `rtcam token issue` prints.
pub fn issue(owner: &SigningKey, claims: &Claims) -> Result<String, CredentialError> {
    validate(claims)?;
    if claims.expires_at_s <= claims.issued_at_s {
        return Err(bad("exp must be after iat"));
    }
    let header = WireHeader {
        alg: ALG.into(),
        kid: owner.public_key().thumbprint(),
        typ: TYP.into(),
    };
    let x = claims.viewer_key.to_b64url();
    let payload = WireClaimsOut {
        aud: &claims.audience,
        cnf: WireCnf {
            jwk: WireJwk {
                kty: "OKP",
                crv: "Ed25519",
                x: &x,
            },
        },
        exp: claims.expires_at_s,
        iat: claims.issued_at_s,
        jti: &claims.id,
        nbf: claims.not_before_s,
        ns: &claims.namespaces,
        scope: claims.permission.scope(),
        sub: claims.subject.as_deref(),
    };
    // Strings, integers and arrays of strings: serialization cannot fail.
    let header = serde_json::to_vec(&header).expect("header serializes");
    let payload = serde_json::to_vec(&payload).expect("claims serialize");
    let signing_input = format!("{}.{}", b64url_encode(&header), b64url_encode(&payload));
    let sig = owner.sign(signing_input.as_bytes());
    let token = format!("{signing_input}.{}", b64url_encode(&sig));
    if token.len() > MAX_CREDENTIAL_BYTES {
        return Err(CredentialError::TooLarge(token.len()));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_767_225_600;

    fn owner() -> SigningKey {
        SigningKey::from_seed(&[1; 32])
    }

    fn viewer() -> PublicKey {
        SigningKey::from_seed(&[2; 32]).public_key()
    }

    fn claims() -> Claims {
        Claims {
            audience: vec!["cam1".into()],
            viewer_key: viewer(),
            permission: Permission::Control,
            namespaces: vec!["ptz".into()],
            issued_at_s: NOW,
            expires_at_s: NOW + 3600,
            not_before_s: None,
            id: "c-1".into(),
            subject: Some("alice".into()),
        }
    }

    fn trust() -> Trust {
        Trust::new("cam1", [owner().public_key()], [])
    }

    /// A token with this header and payload JSON, signed by `key`.
    fn forge(key: &SigningKey, header: &Value, payload: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64url_encode(header.to_string().as_bytes()),
            b64url_encode(payload.to_string().as_bytes())
        );
        format!("{input}.{}", b64url_encode(&key.sign(input.as_bytes())))
    }

    fn header() -> Value {
        serde_json::json!({"alg": ALG, "typ": TYP, "kid": owner().public_key().thumbprint()})
    }

    fn payload() -> Value {
        let token = issue(&owner(), &claims()).unwrap();
        let part = token.split('.').nth(1).unwrap();
        serde_json::from_slice(&b64url_decode(part).unwrap()).unwrap()
    }

    fn verify_payload(p: &Value) -> Result<Credential, CredentialError> {
        trust().verify(&forge(&owner(), &header(), p), NOW)
    }

    #[test]
    fn issued_credentials_verify() {
        let token = issue(&owner(), &claims()).unwrap();
        let cred = trust().verify(&token, NOW).unwrap();
        assert_eq!(cred.claims, claims());
        assert_eq!(cred.owner, owner().public_key());
        let p = payload();
        assert_eq!(p["scope"], "view control");
        assert_eq!(p["aud"], serde_json::json!(["cam1"]));
        assert_eq!(p["cnf"]["jwk"]["x"], viewer().to_b64url());
    }

    #[test]
    fn times_are_checked_without_leeway() {
        let token = issue(&owner(), &claims()).unwrap();
        assert!(trust().verify(&token, NOW + 3599).is_ok());
        assert_eq!(
            trust().verify(&token, NOW + 3600),
            Err(CredentialError::Expired {
                exp: NOW + 3600,
                now: NOW + 3600
            })
        );
        let mut c = claims();
        c.not_before_s = Some(NOW + 10);
        let token = issue(&owner(), &c).unwrap();
        assert_eq!(
            trust().verify(&token, NOW + 9),
            Err(CredentialError::NotYetValid {
                nbf: NOW + 10,
                now: NOW + 9
            })
        );
        assert!(trust().verify(&token, NOW + 10).is_ok());
    }

    #[test]
    fn audience_device_list_and_wildcard() {
        let mut c = claims();
        c.audience = vec!["cam2".into()];
        let token = issue(&owner(), &c).unwrap();
        assert!(matches!(
            trust().verify(&token, NOW),
            Err(CredentialError::WrongDevice { .. })
        ));
        assert!(
            Trust::new("cam2", [owner().public_key()], [])
                .verify(&token, NOW)
                .is_ok()
        );
        c.audience = vec!["cam9".into(), ANY_DEVICE.into()];
        assert!(trust().verify(&issue(&owner(), &c).unwrap(), NOW).is_ok());
        // `aud` may be a plain string too.
        let mut p = payload();
        p["aud"] = "cam1".into();
        assert!(verify_payload(&p).is_ok());
        p["aud"] = "cam2".into();
        assert!(matches!(
            verify_payload(&p),
            Err(CredentialError::WrongDevice { .. })
        ));
    }

    #[test]
    fn revoked_credentials_are_refused() {
        let token = issue(&owner(), &claims()).unwrap();
        let t = Trust::new("cam1", [owner().public_key()], ["c-1".to_string()]);
        assert_eq!(
            t.verify(&token, NOW),
            Err(CredentialError::Revoked("c-1".into()))
        );
    }

    #[test]
    fn only_trusted_owners_sign() {
        let stranger = SigningKey::from_seed(&[3; 32]);
        let token = issue(&stranger, &claims()).unwrap();
        assert!(matches!(
            trust().verify(&token, NOW),
            Err(CredentialError::UnknownOwner(_))
        ));
        // A stranger claiming the trusted owner's kid fails the signature.
        let forged = forge(&stranger, &header(), &payload());
        assert_eq!(
            trust().verify(&forged, NOW),
            Err(CredentialError::BadSignature)
        );
        // Changing any claim after signing breaks the signature.
        let token = issue(&owner(), &claims()).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut p = payload();
        p["scope"] = "view control admin".into();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64url_encode(p.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(
            trust().verify(&tampered, NOW),
            Err(CredentialError::BadSignature)
        );
        assert!(matches!(
            Trust::new("cam1", [], []).verify(&token, NOW),
            Err(CredentialError::UnknownOwner(_))
        ));
    }

    #[test]
    fn malformed_tokens() {
        let token = issue(&owner(), &claims()).unwrap();
        for bad in [
            String::new(),
            "a.b".into(),
            "a.b.c.d".into(),
            format!("{token}."),
            format!("{token}=="),
            token.replace('.', "+"),
            "!!.!!.!!".into(),
        ] {
            let e = trust().verify(&bad, NOW).unwrap_err();
            assert!(
                matches!(
                    e,
                    CredentialError::Malformed(_) | CredentialError::BadHeader(_)
                ),
                "{bad}: {e:?}"
            );
        }
        assert_eq!(
            trust().verify(&"a".repeat(MAX_CREDENTIAL_BYTES + 1), NOW),
            Err(CredentialError::TooLarge(MAX_CREDENTIAL_BYTES + 1))
        );
    }

    #[test]
    fn header_must_be_exact() {
        let kid = owner().public_key().thumbprint();
        for h in [
            serde_json::json!({"alg":"none","typ":TYP,"kid":kid}),
            serde_json::json!({"alg":"HS256","typ":TYP,"kid":kid}),
            serde_json::json!({"alg":"ES256","typ":TYP,"kid":kid}),
            serde_json::json!({"alg":ALG,"typ":"JWT","kid":kid}),
            serde_json::json!({"alg":ALG,"kid":kid}),
            serde_json::json!({"alg":ALG,"typ":TYP}),
            serde_json::json!({"alg":ALG,"typ":TYP,"kid":kid,"crit":["exp"]}),
            serde_json::json!({"alg":ALG,"typ":TYP,"kid":kid,"jwk":{}}),
            serde_json::json!(["alg"]),
        ] {
            let e = trust()
                .verify(&forge(&owner(), &h, &payload()), NOW)
                .unwrap_err();
            assert!(matches!(e, CredentialError::BadHeader(_)), "{h}: {e:?}");
        }
    }

    #[test]
    fn claims_must_be_well_formed() {
        let set = |k: &str, v: Value| {
            let mut p = payload();
            p[k] = v;
            p
        };
        let drop = |k: &str| {
            let mut p = payload();
            p.as_object_mut().unwrap().remove(k);
            p
        };
        let x = viewer().to_b64url();
        for (what, p) in [
            ("unknown claim", set("ip", "10.0.0.1".into())),
            ("no aud", drop("aud")),
            ("no cnf", drop("cnf")),
            ("no exp", drop("exp")),
            ("no iat", drop("iat")),
            ("no jti", drop("jti")),
            ("no scope", drop("scope")),
            ("float exp", set("exp", serde_json::json!(1.9e9))),
            ("string exp", set("exp", "1900000000".into())),
            ("negative nbf", set("nbf", serde_json::json!(-1))),
            ("empty aud", set("aud", serde_json::json!([]))),
            ("aud not ids", set("aud", serde_json::json!(["a/b"]))),
            ("aud too long", set("aud", serde_json::json!(vec!["c"; 17]))),
            ("bad jti", set("jti", "a b".into())),
            ("empty scope", set("scope", "".into())),
            ("unknown permission", set("scope", "view contol".into())),
            ("bad ns", set("ns", serde_json::json!(["PTZ"]))),
            ("ns not a list", set("ns", "ptz".into())),
            ("empty sub", set("sub", "".into())),
            ("control char sub", set("sub", "a\u{7}".into())),
            (
                "private jwk",
                set(
                    "cnf",
                    serde_json::json!({"jwk":{"kty":"OKP","crv":"Ed25519","x":x,"d":x}}),
                ),
            ),
            (
                "EC jwk",
                set(
                    "cnf",
                    serde_json::json!({"jwk":{"kty":"EC","crv":"P-256","x":x,"y":x}}),
                ),
            ),
            (
                "short x",
                set(
                    "cnf",
                    serde_json::json!({"jwk":{"kty":"OKP","crv":"Ed25519","x":"AAAA"}}),
                ),
            ),
            (
                "extra cnf member",
                set(
                    "cnf",
                    serde_json::json!({"jwk":{"kty":"OKP","crv":"Ed25519","x":x},"jkt":"x"}),
                ),
            ),
        ] {
            let e = verify_payload(&p).unwrap_err();
            assert!(matches!(e, CredentialError::BadClaims(_)), "{what}: {e:?}");
        }
        // Extra public JWK members (as WebCrypto exports them) and `iss` are fine.
        let p = set(
            "cnf",
            serde_json::json!({"jwk":{"kty":"OKP","crv":"Ed25519","x":x,"ext":true,"key_ops":["verify"]}}),
        );
        assert!(verify_payload(&p).is_ok());
        assert!(verify_payload(&set("iss", "owner".into())).is_ok());
        // Duplicate claims are refused, not last-wins.
        let json = payload().to_string();
        let dup = json.replacen('{', r#"{"scope":"view control admin","#, 1);
        let input = format!(
            "{}.{}",
            b64url_encode(header().to_string().as_bytes()),
            b64url_encode(dup.as_bytes())
        );
        let token = format!("{input}.{}", b64url_encode(&owner().sign(input.as_bytes())));
        assert!(matches!(
            trust().verify(&token, NOW),
            Err(CredentialError::BadClaims(_))
        ));
    }

    #[test]
    fn issue_validates_its_input() {
        let mut c = claims();
        c.expires_at_s = c.issued_at_s;
        assert!(issue(&owner(), &c).is_err());
        let mut c = claims();
        c.audience.clear();
        assert!(issue(&owner(), &c).is_err());
        let mut c = claims();
        c.namespaces = vec!["Bad".into()];
        assert!(issue(&owner(), &c).is_err());
    }
}
