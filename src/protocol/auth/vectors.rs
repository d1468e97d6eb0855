//! The test vectors of docs/protocol.md §9.10, read from the document itself, checked against this implementation.

use std::collections::HashMap;

use super::credential::{Claims, issue};
use super::envelope::{parse, seal, signing_input};
use super::keys::{PublicKey, SigningKey, b64url_decode, b64url_encode, pkcs8_pem_from_seed};
use super::permissions::{Namespaces, Permission};
use super::{AuthError, ReplayCache, Verifier, open_device_message};

const PROTOCOL_MD: &str = include_str!("../../../docs/protocol.md");

/// The `name = value` lines of the fenced block in §9.10.
fn vectors() -> HashMap<&'static str, &'static str> {
    let section = PROTOCOL_MD
        .split_once("### 9.10 Test vectors")
        .expect("docs/protocol.md has §9.10")
        .1;
    let block = section
        .split_once("```text\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("§9.10 has a ```text block")
        .0;
    block
        .lines()
        .map(|line| line.split_once(" = ").expect("name = value"))
        .collect()
}

fn hex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2));
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn key(v: &HashMap<&str, &str>, role: &str) -> SigningKey {
    let seed: [u8; 32] = hex(v[format!("{role}.seed_hex").as_str()])
        .try_into()
        .unwrap();
    let key = SigningKey::from_seed(&seed);
    assert_eq!(
        key.public_key().to_b64url(),
        v[format!("{role}.public").as_str()],
        "{role}.public"
    );
    key
}

#[test]
fn keys_and_key_ids() {
    let v = vectors();
    let owner = key(&v, "owner");
    key(&v, "viewer");
    key(&v, "device");
    assert_eq!(owner.public_key().thumbprint(), v["owner.kid"]);
    let seed: [u8; 32] = hex(v["owner.seed_hex"]).try_into().unwrap();
    let pem = pkcs8_pem_from_seed(&seed);
    assert_eq!(
        pem,
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            v["owner.pkcs8_pem_body"]
        )
    );
    assert_eq!(
        SigningKey::from_pkcs8_pem(pem.as_bytes())
            .unwrap()
            .public_key(),
        owner.public_key()
    );
}

#[test]
fn credential() {
    let v = vectors();
    let owner = key(&v, "owner");
    let viewer = key(&v, "viewer");
    let token = v["credential"];
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(
        b64url_decode(parts[0]).unwrap(),
        v["credential.header"].as_bytes()
    );
    assert_eq!(
        b64url_decode(parts[1]).unwrap(),
        v["credential.claims"].as_bytes()
    );
    // Issuing the same claims gives the same token byte for byte.
    let claims = Claims {
        audience: vec!["cam1".into()],
        viewer_key: viewer.public_key(),
        permission: Permission::Control,
        namespaces: vec!["ptz".into()],
        issued_at_s: 1_767_225_600,
        expires_at_s: 1_798_761_600,
        not_before_s: None,
        id: "vector-1".into(),
        subject: Some("alice".into()),
    };
    assert_eq!(issue(&owner, &claims).unwrap(), token);
    let now_ms: u64 = v["now_ms"].parse().unwrap();
    let verifier = |device: &str| Verifier::new(device, [owner.public_key()], [], vec![], 60_000);
    let grant = verifier(v["device_id"]).grant(token, now_ms).unwrap();
    assert_eq!(grant.viewer_key, viewer.public_key());
    assert_eq!(grant.rights.permission, Permission::Control);
    assert_eq!(
        grant.rights.namespaces,
        Namespaces::Listed(vec!["ptz".into()])
    );
    assert!(verifier("cam2").grant(token, now_ms).is_err());
    assert!(verifier("cam1").grant(token, 1_798_761_600_000).is_err());
}

#[test]
fn envelopes() {
    let v = vectors();
    let viewer = key(&v, "viewer");
    let device = key(&v, "device");
    for (name, signer) in [("offer", &viewer), ("bye", &viewer), ("answer", &device)] {
        let get = |field: &str| v[format!("{name}.{field}").as_str()];
        let ts: u64 = get("ts").parse().unwrap();
        let input = signing_input(get("topic"), ts, get("msg")).unwrap();
        assert_eq!(input, hex(get("signing_input_hex")), "{name}");
        assert_eq!(b64url_encode(&signer.sign(&input)), get("sig"), "{name}");
        let cred = (name == "offer").then(|| v["credential"]);
        assert_eq!(
            seal(signer, get("topic"), ts, get("msg"), cred).unwrap(),
            get("envelope"),
            "{name}"
        );
        let env = parse(get("envelope").as_bytes()).unwrap();
        assert_eq!(env.msg, get("msg"));
        assert_eq!(env.sig_text, get("sig"));
    }
}

#[test]
fn the_device_accepts_the_offer_then_the_bye_and_refuses_a_replay() {
    let v = vectors();
    let owner = key(&v, "owner");
    let now_ms: u64 = v["now_ms"].parse().unwrap();
    let verifier = Verifier::new(v["device_id"], [owner.public_key()], [], vec![], 60_000);
    let mut replay = ReplayCache::new(16, 60_000);
    let opened = verifier
        .open_inbound(
            v["offer.envelope"].as_bytes(),
            v["offer.topic"],
            None,
            now_ms,
            &mut replay,
        )
        .unwrap();
    assert_eq!(opened.msg, v["offer.msg"]);
    let grant = opened.grant.unwrap();
    let bye = verifier
        .open_inbound(
            v["bye.envelope"].as_bytes(),
            v["bye.topic"],
            Some(&grant),
            now_ms + 1500,
            &mut replay,
        )
        .unwrap();
    assert_eq!(bye.msg, v["bye.msg"]);
    let again = verifier
        .open_inbound(
            v["offer.envelope"].as_bytes(),
            v["offer.topic"],
            None,
            now_ms + 2000,
            &mut replay,
        )
        .unwrap_err();
    assert_eq!(again.error, AuthError::Replayed);
}

#[test]
fn the_viewer_accepts_the_answer() {
    let v = vectors();
    let device = PublicKey::from_b64url(v["device.public"]).unwrap();
    let now_ms: u64 = v["now_ms"].parse().unwrap();
    let msg = open_device_message(
        &device,
        v["answer.envelope"].as_bytes(),
        v["answer.topic"],
        now_ms,
        60_000,
    )
    .unwrap();
    assert_eq!(msg, v["answer.msg"]);
}
