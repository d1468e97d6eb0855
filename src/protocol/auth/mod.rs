//! Signed mode (docs/protocol.md §9): envelopes, credentials, permissions and replay checks, as pure functions of their inputs and `now`.
//!
//! The device side in one call: [`Verifier::open_inbound`] takes a payload from a session's
//! `in` topic (or the command topic), the session's [`Grant`] if it has one, the clock and the
//! [`ReplayCache`], and returns the wrapped message or a [`Refusal`] with its wire code.
//! [`seal_device_message`] signs what the device sends; [`open_device_message`] is the
//! viewer's check of it. Nothing here reads a clock, a file or a socket.

pub mod credential;
pub mod envelope;
pub mod keys;
pub mod permissions;
pub mod replay;

#[cfg(test)]
mod vectors;

use credential::{Credential, CredentialError, Trust};
use keys::{PublicKey, SigningKey};
use permissions::Rights;
pub use replay::ReplayCache;

/// Why a signed message is refused. [`AuthError::code`] is its wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("not JSON: {0}")]
    BadJson(String),
    #[error("payload must be a JSON object")]
    NotObject,
    #[error("protocol version {0} is not supported; this device speaks v=1")]
    UnsupportedVersion(String),
    #[error("{0}")]
    BadSchema(String),
    #[error(
        "not a signed envelope: this device runs auth.mode = \"signed\" (docs/protocol.md §9.2)"
    )]
    NotSigned,
    #[error("no credential (`cred`): a message that opens a session or a signed command needs one")]
    MissingCredential,
    #[error(
        "`cred` is only sent with the offer, and this session already has one (its messages must be signed by its own viewer key)"
    )]
    UnexpectedCredential,
    #[error("credential refused: {0}")]
    Credential(#[from] CredentialError),
    #[error("the signature does not verify with the credential's viewer key")]
    BadSignature,
    #[error("not signed by this session's viewer key")]
    NotSessionKey,
    #[error("the session's credential expired at {expires_at_s} (Unix seconds)")]
    SessionExpired { expires_at_s: u64 },
    #[error(
        "timestamp {ts_ms} is more than {max_skew_ms} ms from the device's clock ({now_ms} Unix ms): check both clocks"
    )]
    Stale {
        ts_ms: u64,
        now_ms: u64,
        max_skew_ms: u64,
    },
    #[error("this signed message was already accepted (replay)")]
    Replayed,
    #[error("too many signed messages in the last minutes (replay cache full); retry later")]
    ReplayCacheFull,
    #[error("the topic contains a line feed; it cannot be signed")]
    TopicHasNewline,
}

/// Wire error codes of refused signed messages (docs/protocol.md §4.5, §9.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    BadJson,
    BadSchema,
    UnsupportedVersion,
    Unauthorized,
    Stale,
    Replayed,
    Busy,
}

impl RefusalCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad-json",
            Self::BadSchema => "bad-schema",
            Self::UnsupportedVersion => "unsupported-version",
            Self::Unauthorized => "unauthorized",
            Self::Stale => "stale",
            Self::Replayed => "replayed",
            Self::Busy => "busy",
        }
    }
}

impl AuthError {
    pub fn code(&self) -> RefusalCode {
        match self {
            Self::BadJson(_) | Self::NotObject => RefusalCode::BadJson,
            Self::UnsupportedVersion(_) => RefusalCode::UnsupportedVersion,
            Self::BadSchema(_) => RefusalCode::BadSchema,
            Self::NotSigned
            | Self::MissingCredential
            | Self::UnexpectedCredential
            | Self::Credential(_)
            | Self::BadSignature
            | Self::NotSessionKey
            | Self::SessionExpired { .. }
            | Self::TopicHasNewline => RefusalCode::Unauthorized,
            Self::Stale { .. } => RefusalCode::Stale,
            Self::Replayed => RefusalCode::Replayed,
            Self::ReplayCacheFull => RefusalCode::Busy,
        }
    }
}

/// A refused inbound message: why, and the `ref` for the error reply (the refused
/// envelope's `sig`, when it had a well-formed one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct Refusal {
    pub error: AuthError,
    pub reference: Option<String>,
}

impl Refusal {
    pub fn code(&self) -> RefusalCode {
        self.error.code()
    }
}

/// What a verified credential grants a session; kept by the session for its later messages
/// and its data-channel commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Every later message of the session must be signed by this key.
    pub viewer_key: PublicKey,
    pub rights: Rights,
    /// The session ends at this time (Unix seconds): the credential's `exp`.
    pub expires_at_s: u64,
    /// The credential's `jti`, for logs and `auth.revoked`.
    pub credential_id: String,
    /// The credential's `sub`, for logs.
    pub subject: Option<String>,
    /// Key id of the owner key that signed the credential.
    pub owner_kid: String,
}

impl Grant {
    /// The session deadline as Unix milliseconds, for a session state machine's timers.
    pub fn expires_at_ms(&self) -> u64 {
        self.expires_at_s.saturating_mul(1000)
    }
}

/// A verified inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The wrapped message's JSON text, to parse as in open mode (docs/protocol.md §4, §6).
    pub msg: String,
    /// `Some` when a credential was verified (a new session, or a signed command).
    pub grant: Option<Grant>,
    /// The envelope's `sig`, the `ref` of any error about the wrapped message.
    pub reference: String,
}

/// The device's signed-mode policy, built once from the config.
#[derive(Debug, Clone)]
pub struct Verifier {
    trust: Trust,
    control_namespaces: Vec<String>,
    max_skew_ms: u64,
}

impl Verifier {
    /// `device_id`: `device.id`; `owner_keys`: `auth.owner_keys`; `revoked`: `auth.revoked`;
    /// `control_namespaces`: `auth.control_namespaces`; `max_skew_ms`: `auth.max_clock_skew_ms`.
    pub fn new(
        device_id: &str,
        owner_keys: impl IntoIterator<Item = PublicKey>,
        revoked: impl IntoIterator<Item = String>,
        control_namespaces: Vec<String>,
        max_skew_ms: u64,
    ) -> Self {
        Self {
            trust: Trust::new(device_id, owner_keys, revoked),
            control_namespaces,
            max_skew_ms,
        }
    }

    pub fn max_skew_ms(&self) -> u64 {
        self.max_skew_ms
    }

    /// Verifies a credential at `now_ms` and returns what it grants.
    pub fn grant(&self, token: &str, now_ms: u64) -> Result<Grant, CredentialError> {
        let Credential { claims, owner } = self.trust.verify(token, now_ms / 1000)?;
        Ok(Grant {
            viewer_key: claims.viewer_key,
            rights: Rights::new(
                claims.permission,
                &claims.namespaces,
                &self.control_namespaces,
            ),
            expires_at_s: claims.expires_at_s,
            credential_id: claims.id,
            subject: claims.subject,
            owner_kid: owner.thumbprint(),
        })
    }

    /// Checks one payload that arrived on `topic` (docs/protocol.md §9.4 steps 1–5).
    ///
    /// `session`: the grant of the live session this topic belongs to, or `None` when there is
    /// none (then the envelope must carry a credential). The replay cache is only written
    /// for messages that pass every other check.
    pub fn open_inbound(
        &self,
        payload: &[u8],
        topic: &str,
        session: Option<&Grant>,
        now_ms: u64,
        replay: &mut ReplayCache,
    ) -> Result<Opened, Refusal> {
        let verified = self.verify_inbound(payload, topic, session, now_ms, replay)?;
        verified.remember(replay, now_ms)?;
        Ok(verified.opened)
    }

    /// Steps 1–5 of [`Verifier::open_inbound`] without writing the replay cache: the caller
    /// remembers the message with [`Verified::remember`] before acting on it. A message that
    /// is refused anyway (e.g. a candidate over the session's limit) need not take room in
    /// the cache.
    pub fn verify_inbound(
        &self,
        payload: &[u8],
        topic: &str,
        session: Option<&Grant>,
        now_ms: u64,
        replay: &ReplayCache,
    ) -> Result<Verified, Refusal> {
        let envelope = envelope::parse(payload).map_err(|error| Refusal {
            error,
            reference: envelope::sig_reference(payload),
        })?;
        let refuse = |error: AuthError| Refusal {
            error,
            reference: Some(envelope.sig_text.clone()),
        };
        // A copy of a message that was accepted is `replayed`, whatever else is true of it
        // now: its sender (who may be the viewer, through a duplicate delivery) learns that
        // the original went through, and no viewer ends its session over it (§9.6).
        let digest = envelope::digest(topic, &envelope).map_err(refuse)?;
        if replay.contains(&digest, now_ms) {
            return Err(refuse(AuthError::Replayed));
        }
        let new_grant = match (session, &envelope.cred) {
            (None, None) => return Err(refuse(AuthError::MissingCredential)),
            (None, Some(token)) => {
                let grant = self
                    .grant(token, now_ms)
                    .map_err(|e| refuse(AuthError::Credential(e)))?;
                envelope::verify(&envelope, topic, &grant.viewer_key).map_err(refuse)?;
                Some(grant)
            }
            (Some(_), Some(_)) => return Err(refuse(AuthError::UnexpectedCredential)),
            (Some(grant), None) => {
                envelope::verify(&envelope, topic, &grant.viewer_key).map_err(|e| {
                    refuse(match e {
                        AuthError::BadSignature => AuthError::NotSessionKey,
                        other => other,
                    })
                })?;
                if now_ms / 1000 >= grant.expires_at_s {
                    return Err(refuse(AuthError::SessionExpired {
                        expires_at_s: grant.expires_at_s,
                    }));
                }
                None
            }
        };
        envelope::check_fresh(envelope.ts_ms, now_ms, self.max_skew_ms).map_err(refuse)?;
        Ok(Verified {
            digest,
            ts_ms: envelope.ts_ms,
            opened: Opened {
                msg: envelope.msg,
                grant: new_grant,
                reference: envelope.sig_text,
            },
        })
    }
}

/// A message whose envelope, credential or key, signature and freshness were checked; not
/// yet checked against the replay cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    digest: [u8; 32],
    ts_ms: u64,
    pub opened: Opened,
}

impl Verified {
    /// Step 5: refuses a replay (or answers `busy` when the cache is full), otherwise
    /// remembers the message so it is accepted once.
    pub fn remember(&self, replay: &mut ReplayCache, now_ms: u64) -> Result<(), Refusal> {
        replay
            .check_and_insert(self.digest, self.ts_ms, now_ms)
            .map_err(|error| Refusal {
                error,
                reference: Some(self.opened.reference.clone()),
            })
    }
}

/// The signed envelope of a message the device sends on `topic` (docs/protocol.md §9.6).
pub fn seal_device_message(
    device_key: &SigningKey,
    topic: &str,
    now_ms: u64,
    msg: &str,
) -> Result<String, AuthError> {
    envelope::seal(device_key, topic, now_ms, msg, None)
}

/// The viewer's check of a device message on its `out` topic (docs/protocol.md §9.6):
/// signed by the pinned device key, no credential, fresh. Returns the wrapped message.
pub fn open_device_message(
    device_key: &PublicKey,
    payload: &[u8],
    topic: &str,
    now_ms: u64,
    max_skew_ms: u64,
) -> Result<String, AuthError> {
    let envelope = envelope::parse(payload)?;
    if envelope.cred.is_some() {
        return Err(AuthError::UnexpectedCredential);
    }
    envelope::verify(&envelope, topic, device_key)?;
    envelope::check_fresh(envelope.ts_ms, now_ms, max_skew_ms)?;
    Ok(envelope.msg)
}

#[cfg(test)]
mod tests {
    use super::credential::{Claims, issue};
    use super::permissions::Permission;
    use super::*;

    const NOW_MS: u64 = 1_767_225_600_000;
    /// `auth.max_clock_skew_ms` of config/default.toml.
    const DEFAULT_MAX_CLOCK_SKEW_MS: u64 = 60_000;
    const TOPIC: &str = "rtcam/cam1/session/0123456789abcdef/in";

    fn owner() -> SigningKey {
        SigningKey::from_seed(&[1; 32])
    }
    fn viewer() -> SigningKey {
        SigningKey::from_seed(&[2; 32])
    }
    fn intruder() -> SigningKey {
        SigningKey::from_seed(&[3; 32])
    }

    fn verifier() -> Verifier {
        Verifier::new(
            "cam1",
            [owner().public_key()],
            ["revoked-1".to_string()],
            vec!["ptz".into()],
            DEFAULT_MAX_CLOCK_SKEW_MS,
        )
    }

    fn claims_for(key: &SigningKey) -> Claims {
        Claims {
            audience: vec!["cam1".into()],
            viewer_key: key.public_key(),
            permission: Permission::View,
            namespaces: vec![],
            issued_at_s: NOW_MS / 1000,
            expires_at_s: NOW_MS / 1000 + 3600,
            not_before_s: None,
            id: "cred-1".into(),
            subject: Some("alice".into()),
        }
    }

    fn cred_for(key: &SigningKey) -> String {
        issue(&owner(), &claims_for(key)).unwrap()
    }

    const OFFER: &str = r#"{"v":1,"type":"offer","sdp":"v=0\r\n"}"#;
    const BYE: &str = r#"{"v":1,"type":"bye"}"#;

    fn sealed(key: &SigningKey, ts: u64, msg: &str, cred: Option<&str>) -> Vec<u8> {
        envelope::seal(key, TOPIC, ts, msg, cred)
            .unwrap()
            .into_bytes()
    }

    fn cache() -> ReplayCache {
        ReplayCache::new(64, DEFAULT_MAX_CLOCK_SKEW_MS)
    }

    /// Opens the viewer's offer and returns the session's grant.
    fn session(replay: &mut ReplayCache) -> Grant {
        let offer = sealed(&viewer(), NOW_MS, OFFER, Some(&cred_for(&viewer())));
        verifier()
            .open_inbound(&offer, TOPIC, None, NOW_MS, replay)
            .unwrap()
            .grant
            .unwrap()
    }

    fn refusal(r: Result<Opened, Refusal>) -> AuthError {
        r.expect_err("should be refused").error
    }

    #[test]
    fn an_offer_with_a_valid_credential_opens_a_session() {
        let mut replay = cache();
        let cred = cred_for(&viewer());
        let offer = sealed(&viewer(), NOW_MS - 59_000, OFFER, Some(&cred));
        let opened = verifier()
            .open_inbound(&offer, TOPIC, None, NOW_MS, &mut replay)
            .unwrap();
        assert_eq!(opened.msg, OFFER);
        let grant = opened.grant.unwrap();
        assert_eq!(grant.viewer_key, viewer().public_key());
        assert_eq!(grant.credential_id, "cred-1");
        assert_eq!(grant.subject.as_deref(), Some("alice"));
        assert_eq!(grant.owner_kid, owner().public_key().thumbprint());
        assert_eq!(grant.expires_at_ms(), NOW_MS + 3_600_000);
        assert_eq!(grant.rights.permission, Permission::View);
        assert_eq!(replay.len(), 1);
    }

    #[test]
    fn later_messages_must_come_from_the_session_key() {
        let mut replay = cache();
        let grant = session(&mut replay);
        let v = verifier();
        let bye = sealed(&viewer(), NOW_MS + 1, BYE, None);
        let opened = v
            .open_inbound(&bye, TOPIC, Some(&grant), NOW_MS + 5, &mut replay)
            .unwrap();
        assert_eq!(opened.msg, BYE);
        assert_eq!(opened.grant, None);
        // Someone else's bye, even with their own valid credential, is refused with a ref.
        let injected = sealed(&intruder(), NOW_MS + 2, BYE, None);
        let r = v
            .open_inbound(&injected, TOPIC, Some(&grant), NOW_MS + 5, &mut replay)
            .unwrap_err();
        assert_eq!(r.error, AuthError::NotSessionKey);
        assert_eq!(r.code(), RefusalCode::Unauthorized);
        assert_eq!(
            r.reference,
            envelope::sig_reference(&injected),
            "the error names the refused envelope"
        );
        assert!(r.reference.is_some());
        let with_cred = sealed(&intruder(), NOW_MS + 3, BYE, Some(&cred_for(&intruder())));
        assert_eq!(
            refusal(v.open_inbound(&with_cred, TOPIC, Some(&grant), NOW_MS + 5, &mut replay)),
            AuthError::UnexpectedCredential
        );
        let second_offer = sealed(&intruder(), NOW_MS + 3, OFFER, Some(&cred_for(&intruder())));
        assert_eq!(
            refusal(v.open_inbound(&second_offer, TOPIC, Some(&grant), NOW_MS + 5, &mut replay))
                .code(),
            RefusalCode::Unauthorized
        );
        assert_eq!(replay.len(), 2, "refused messages are not remembered");
    }

    #[test]
    fn unsigned_and_malformed_messages_are_refused() {
        let v = verifier();
        let mut replay = cache();
        let mut open = |p: &[u8]| v.open_inbound(p, TOPIC, None, NOW_MS, &mut replay);
        assert_eq!(
            refusal(open(OFFER.as_bytes())),
            AuthError::NotSigned,
            "today's unsigned offer"
        );
        assert_eq!(refusal(open(b"{")).code(), RefusalCode::BadJson);
        assert_eq!(
            refusal(open(br#"{"v":2,"type":"signed"}"#)).code(),
            RefusalCode::UnsupportedVersion
        );
        let r = open(br#"{"v":1,"type":"signed","sig":5}"#).unwrap_err();
        assert_eq!(r.code(), RefusalCode::BadSchema);
        assert_eq!(r.reference, None);
        assert_eq!(
            refusal(open(&sealed(&viewer(), NOW_MS, OFFER, None))),
            AuthError::MissingCredential
        );
    }

    #[test]
    fn credential_refusals_are_unauthorized() {
        let v = verifier();
        let mut replay = cache();
        let mut check = |cred: &str| {
            let offer = sealed(&viewer(), NOW_MS, OFFER, Some(cred));
            v.open_inbound(&offer, TOPIC, None, NOW_MS, &mut replay)
                .unwrap_err()
        };
        let variant = |f: &dyn Fn(&mut Claims)| {
            let mut c = claims_for(&viewer());
            f(&mut c);
            issue(&owner(), &c).unwrap()
        };
        let cases: Vec<(&str, String)> = vec![
            (
                "expired",
                variant(&|c| {
                    c.issued_at_s -= 7200;
                    c.expires_at_s = NOW_MS / 1000;
                }),
            ),
            (
                "wrong device",
                variant(&|c| c.audience = vec!["cam2".into()]),
            ),
            ("revoked", variant(&|c| c.id = "revoked-1".into())),
            (
                "unknown owner",
                issue(&intruder(), &claims_for(&viewer())).unwrap(),
            ),
            ("garbage", "x.y.z".into()),
        ];
        for (what, cred) in cases {
            let r = check(&cred);
            assert!(matches!(r.error, AuthError::Credential(_)), "{what}: {r:?}");
            assert_eq!(r.code(), RefusalCode::Unauthorized, "{what}");
            assert!(r.reference.is_some(), "{what}");
        }
    }

    #[test]
    fn a_credential_copied_off_the_broker_is_useless() {
        // The intruder takes the viewer's credential from an offer it saw and signs its own.
        let v = verifier();
        let mut replay = cache();
        let stolen = sealed(&intruder(), NOW_MS, OFFER, Some(&cred_for(&viewer())));
        assert_eq!(
            refusal(v.open_inbound(&stolen, TOPIC, None, NOW_MS, &mut replay)),
            AuthError::BadSignature
        );
    }

    #[test]
    fn a_copied_signed_offer_is_refused_as_a_replay_or_on_another_topic() {
        let v = verifier();
        let mut replay = cache();
        let offer = sealed(&viewer(), NOW_MS, OFFER, Some(&cred_for(&viewer())));
        v.open_inbound(&offer, TOPIC, None, NOW_MS, &mut replay)
            .unwrap();
        // Same topic after the session ended (no session): replay.
        assert_eq!(
            refusal(v.open_inbound(&offer, TOPIC, None, NOW_MS + 1000, &mut replay)),
            AuthError::Replayed
        );
        // Another session id, another device: the signature covers the topic.
        for topic in [
            "rtcam/cam1/session/ffffffffffffffff/in",
            "rtcam/cam2/session/0123456789abcdef/in",
            "other/cam1/session/0123456789abcdef/in",
        ] {
            assert_eq!(
                refusal(v.open_inbound(&offer, topic, None, NOW_MS, &mut replay)),
                AuthError::BadSignature,
                "{topic}"
            );
        }
        // Remembered for two windows: a replay as long as it is remembered, then stale.
        assert_eq!(
            refusal(v.open_inbound(&offer, TOPIC, None, NOW_MS + 60_001, &mut replay)),
            AuthError::Replayed
        );
        assert!(matches!(
            refusal(v.open_inbound(&offer, TOPIC, None, NOW_MS + 120_001, &mut replay)),
            AuthError::Stale { .. }
        ));
    }

    #[test]
    fn stale_messages_name_both_times() {
        let v = verifier();
        let mut replay = cache();
        let offer = sealed(
            &viewer(),
            NOW_MS + 60_001,
            OFFER,
            Some(&cred_for(&viewer())),
        );
        let e = refusal(v.open_inbound(&offer, TOPIC, None, NOW_MS, &mut replay));
        assert_eq!(e.code(), RefusalCode::Stale);
        let text = e.to_string();
        assert!(
            text.contains(&NOW_MS.to_string()) && text.contains("60000"),
            "{text}"
        );
    }

    #[test]
    fn the_session_ends_with_its_credential() {
        let mut replay = cache();
        let grant = session(&mut replay);
        let at = grant.expires_at_ms();
        let bye = sealed(&viewer(), at, BYE, None);
        assert_eq!(
            refusal(verifier().open_inbound(&bye, TOPIC, Some(&grant), at, &mut replay)),
            AuthError::SessionExpired {
                expires_at_s: grant.expires_at_s
            }
        );
    }

    #[test]
    fn a_full_replay_cache_answers_busy() {
        let v = verifier();
        let mut replay = ReplayCache::new(1, DEFAULT_MAX_CLOCK_SKEW_MS);
        let grant = session(&mut replay);
        let bye = sealed(&viewer(), NOW_MS + 1, BYE, None);
        let r = v
            .open_inbound(&bye, TOPIC, Some(&grant), NOW_MS + 1, &mut replay)
            .unwrap_err();
        assert_eq!(r.error, AuthError::ReplayCacheFull);
        assert_eq!(r.code(), RefusalCode::Busy);
    }

    #[test]
    fn control_namespaces_from_config_reach_the_grant() {
        let mut c = claims_for(&viewer());
        c.permission = Permission::Control;
        let token = issue(&owner(), &c).unwrap();
        let grant = verifier().grant(&token, NOW_MS).unwrap();
        assert!(grant.rights.namespaces.contains("ptz"));
        assert!(!grant.rights.namespaces.contains("light"));
    }

    #[test]
    fn the_viewer_checks_device_messages() {
        let device = SigningKey::from_seed(&[5; 32]);
        let out = "rtcam/cam1/session/0123456789abcdef/out";
        let answer = r#"{"v":1,"type":"answer","sdp":"v=0\r\n"}"#;
        let sealed = seal_device_message(&device, out, NOW_MS, answer).unwrap();
        let pk = device.public_key();
        let open = |p: &[u8], topic: &str, key: &PublicKey| {
            open_device_message(key, p, topic, NOW_MS + 10, DEFAULT_MAX_CLOCK_SKEW_MS)
        };
        assert_eq!(open(sealed.as_bytes(), out, &pk).as_deref(), Ok(answer));
        // A forged answer from a broker client with its own key.
        let forged = seal_device_message(&intruder(), out, NOW_MS, answer).unwrap();
        assert_eq!(
            open(forged.as_bytes(), out, &pk),
            Err(AuthError::BadSignature)
        );
        // The device's message for another session, or reflected to `in`.
        assert_eq!(
            open(
                sealed.as_bytes(),
                "rtcam/cam1/session/ffffffffffffffff/out",
                &pk
            ),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            open(sealed.as_bytes(), TOPIC, &pk),
            Err(AuthError::BadSignature)
        );
        assert_eq!(open(answer.as_bytes(), out, &pk), Err(AuthError::NotSigned));
        let with_cred = envelope::seal(&device, out, NOW_MS, answer, Some("a.b.c")).unwrap();
        assert_eq!(
            open(with_cred.as_bytes(), out, &pk),
            Err(AuthError::UnexpectedCredential)
        );
        let old = seal_device_message(&device, out, NOW_MS - 120_000, answer).unwrap();
        assert!(matches!(
            open(old.as_bytes(), out, &pk),
            Err(AuthError::Stale { .. })
        ));
    }

    #[test]
    fn refusal_codes_are_the_documented_strings() {
        let all = [
            (RefusalCode::BadJson, "bad-json"),
            (RefusalCode::BadSchema, "bad-schema"),
            (RefusalCode::UnsupportedVersion, "unsupported-version"),
            (RefusalCode::Unauthorized, "unauthorized"),
            (RefusalCode::Stale, "stale"),
            (RefusalCode::Replayed, "replayed"),
            (RefusalCode::Busy, "busy"),
        ];
        for (code, text) in all {
            assert_eq!(code.as_str(), text);
        }
    }
}
