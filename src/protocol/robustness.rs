//! Deterministic mutation tests: every parser of external input answers garbage with an error, never a panic.

use super::command::{Transport, parse_request, reply};
use super::signal::{Limits, parse_viewer_message};
use super::topics::Topics;

/// xorshift64*: reproducible pseudo-random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Valid and near-valid messages to start mutating from.
const SEEDS: &[&str] = &[
    r#"{"v":1,"type":"offer","sdp":"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\n"}"#,
    r#"{"v":1,"type":"candidate","candidate":{"candidate":"candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}}"#,
    r#"{"v":1,"type":"candidate","candidate":null}"#,
    r#"{"v":1,"type":"bye","reason":"closed"}"#,
    r#"{"id":1,"cmd":"set-bitrate","args":{"bps":500000}}"#,
    r#"{"id":"x","cmd":"set-resolution","args":{"width":640,"height":480}}"#,
    r#"{"id":2,"cmd":"set-control","args":{"name":"brightness","value":-5},"reply_to":"a/b"}"#,
    r#"{"id":3,"cmd":"ptz.move","args":{"pan":1.5,"tilt":[1,2,{"z":null}]}}"#,
    r#"{"id":4,"cmd":"snapshot"}"#,
];

/// One random edit: flip, insert, delete, duplicate a span, or splice in a JSON token.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[
        b"null",
        b"true",
        b"-1",
        b"1e999",
        b"18446744073709551616",
        b"\"\"",
        b"[]",
        b"{}",
        b"\"\\u0000\"",
        b"\"\\ud800\"",
        b"\xff\xfe",
        b"\"v\":2",
        b",",
        b":",
        b"{",
        b"}",
        b"[",
        b"]",
    ];
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(5) {
            0 if !out.is_empty() => {
                let i = at.min(out.len() - 1);
                out[i] ^= 1 << rng.below(8);
            }
            1 => out.insert(at, rng.next() as u8),
            2 if at < out.len() => {
                let end = (at + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            3 => {
                let end = (at + rng.below(64)).min(out.len());
                let span = out[at..end].to_vec();
                out.splice(at..at, span);
            }
            _ => {
                let t = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, t.iter().copied());
            }
        }
    }
    out
}

#[test]
fn mutated_messages_are_answered_never_panicked_on() {
    let limits = Limits {
        max_payload_bytes: 4096,
        max_sdp_bytes: 2048,
    };
    let topics = Topics::new("rtcam", "cam1");
    let mut rng = Rng(0x005E_ED0F_57C4);
    let (mut accepted, mut refused) = (0usize, 0usize);
    for round in 0..20_000 {
        let seed = SEEDS[round % SEEDS.len()].as_bytes();
        let msg = mutate(&mut rng, seed);
        match parse_viewer_message(&msg, limits) {
            Ok(_) => accepted += 1,
            Err(rejection) => {
                refused += 1;
                assert!(!rejection.reason.is_empty(), "a reason for {msg:?}");
            }
        }
        for transport in [Transport::DataChannel, Transport::Mqtt] {
            let request = parse_request(&msg, transport);
            // Every request, good or bad, has exactly one well-formed JSON reply.
            let outcome = request
                .command
                .as_ref()
                .map(|_| serde_json::Value::Null)
                .map_err(Clone::clone);
            let text = reply(&request.id, &outcome);
            let parsed: serde_json::Value =
                serde_json::from_str(&text).expect("replies are valid JSON");
            assert!(parsed.get("ok").is_some(), "{text}");
        }
        let topic = String::from_utf8_lossy(&msg[..msg.len().min(200)]).into_owned();
        let _ = topics.parse_inbound(&topic);
    }
    // The mutations must exercise both paths, or the test proves little.
    assert!(
        accepted > 100 && refused > 10_000,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn mutated_signed_envelopes_and_credentials_are_refused_never_panicked_on() {
    use super::auth::credential::{Claims, issue};
    use super::auth::envelope::seal;
    use super::auth::keys::SigningKey;
    use super::auth::permissions::Permission;
    use super::auth::{ReplayCache, Verifier};
    use super::topics::{filter_matches, is_valid_filter};

    const NOW_MS: u64 = 1_767_225_600_000;
    let owner = SigningKey::from_seed(&[1; 32]);
    let viewer = SigningKey::from_seed(&[2; 32]);
    let claims = Claims {
        audience: vec!["cam1".into()],
        viewer_key: viewer.public_key(),
        permission: Permission::Control,
        namespaces: vec!["ptz".into()],
        issued_at_s: NOW_MS / 1000,
        expires_at_s: NOW_MS / 1000 + 3600,
        not_before_s: None,
        id: "c1".into(),
        subject: Some("alice".into()),
    };
    let cred = issue(&owner, &claims).unwrap();
    let topic = "rtcam/cam1/session/0123456789abcdef/in";
    let verifier = Verifier::new("cam1", [owner.public_key()], [], vec![], 60_000);
    let seeds: Vec<Vec<u8>> = SEEDS[..4]
        .iter()
        .map(|m| {
            seal(&viewer, topic, NOW_MS, m, Some(&cred))
                .unwrap()
                .into_bytes()
        })
        .collect();
    let mut rng = Rng(0x00A1_17E5_5EED);
    let (mut accepted, mut refused) = (0usize, 0usize);
    for round in 0..5_000 {
        // A fresh cache each round: replays are not what this test is about.
        let mut replay = ReplayCache::new(64, 60_000);
        let msg = mutate(&mut rng, &seeds[round % seeds.len()]);
        match verifier.open_inbound(&msg, topic, None, NOW_MS, &mut replay) {
            Ok(opened) => {
                accepted += 1;
                // Whatever passed was signed by the viewer: its text is one of the seeds'.
                assert!(SEEDS.contains(&opened.msg.as_str()), "{:?}", opened.msg);
            }
            Err(refusal) => {
                refused += 1;
                assert!(!refusal.error.to_string().is_empty());
            }
        }
        let text = String::from_utf8_lossy(&msg[..msg.len().min(80)]).into_owned();
        let _ = is_valid_filter(&text) && filter_matches(&text, topic);
    }
    // Mutations that only re-encode the envelope (e.g. JSON whitespace) still verify.
    assert!(refused > 4_000, "{accepted} accepted, {refused} refused");
}
