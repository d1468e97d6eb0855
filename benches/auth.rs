//! Prints the CPU cost of signed mode (docs/protocol.md §9): signing, verifying and a whole session's signaling.
//!
//! Run: `cargo bench --bench auth` (add `-- --iterations 20000` for longer runs).
#![allow(unsafe_code)] // libc::clock_gettime for CPU time.

use std::time::{Duration, Instant};

use rtcam::protocol::auth::credential::{Claims, issue};
use rtcam::protocol::auth::envelope::seal;
use rtcam::protocol::auth::keys::SigningKey;
use rtcam::protocol::auth::permissions::Permission;
use rtcam::protocol::auth::{ReplayCache, Verifier, open_device_message, seal_device_message};

const NOW_MS: u64 = 1_767_225_600_000;
const TOPIC_IN: &str = "rtcam/cam1/session/0123456789abcdef/in";
const TOPIC_OUT: &str = "rtcam/cam1/session/0123456789abcdef/out";
/// Candidates each side trickles in a typical session.
const CANDIDATES: u64 = 4;

/// CPU time this process has used (all threads).
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `f` `n` times and prints the CPU time per call.
fn measure(name: &str, n: u64, mut f: impl FnMut(u64)) -> Duration {
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    for i in 0..n {
        f(i);
    }
    let per = (cpu_time() - cpu0) / n as u32;
    let wall = wall0.elapsed() / n as u32;
    println!(
        "{name:<48} {:>9.1} µs CPU/op {:>9.1} µs wall/op",
        per.as_secs_f64() * 1e6,
        wall.as_secs_f64() * 1e6
    );
    per
}

/// A realistic offer: an SDP of about 3 KB with candidates.
fn offer_json() -> String {
    let mut sdp =
        String::from("v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n");
    for i in 0..40 {
        sdp.push_str(&format!(
            "a=candidate:{i} 1 udp 2122260223 192.168.1.{i} 5{i:04} typ host generation 0\r\n"
        ));
    }
    serde_json::json!({"v":1,"type":"offer","sdp":sdp}).to_string()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--iterations N"))
        .unwrap_or(5000);
    let owner = SigningKey::from_seed(&[1; 32]);
    let viewer = SigningKey::from_seed(&[2; 32]);
    let device = SigningKey::from_seed(&[3; 32]);
    let claims = Claims {
        audience: vec!["cam1".into()],
        viewer_key: viewer.public_key(),
        permission: Permission::Control,
        namespaces: vec!["ptz".into()],
        issued_at_s: NOW_MS / 1000,
        expires_at_s: NOW_MS / 1000 + 30 * 86_400,
        not_before_s: None,
        id: "bench".into(),
        subject: Some("bench".into()),
    };
    let cred = issue(&owner, &claims).unwrap();
    let verifier = Verifier::new("cam1", [owner.public_key()], [], vec![], 60_000);
    let offer = offer_json();
    let candidate = r#"{"v":1,"type":"candidate","candidate":{"candidate":"candidate:1 1 udp 2122260223 192.168.1.20 50000 typ host","sdpMid":"0","sdpMLineIndex":0}}"#;
    println!(
        "signed mode, {n} iterations each; offer SDP {} bytes, credential {} bytes",
        offer.len(),
        cred.len()
    );

    let sign = measure("Ed25519 sign (8-byte message)", n, |i| {
        std::hint::black_box(device.sign(&i.to_le_bytes()));
    });
    let sig = device.sign(b"message");
    let pk = device.public_key();
    let verify = measure("Ed25519 verify (7-byte message)", n, |_| {
        assert!(pk.verify(b"message", &sig));
    });
    measure("credential: issue (owner)", n, |_| {
        std::hint::black_box(issue(&owner, &claims).unwrap());
    });
    measure("credential: verify (device)", n, |_| {
        std::hint::black_box(verifier.grant(&cred, NOW_MS).unwrap());
    });
    let offers: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            seal(&viewer, TOPIC_IN, NOW_MS + i, &offer, Some(&cred))
                .unwrap()
                .into_bytes()
        })
        .collect();
    measure("viewer: seal the offer with its credential", n, |i| {
        std::hint::black_box(seal(&viewer, TOPIC_IN, NOW_MS + i, &offer, Some(&cred)).unwrap());
    });
    let mut replay = ReplayCache::new(1 << 20, 60_000);
    let open_offer = measure("device: open the offer (parse, JWT, sig, replay)", n, |i| {
        let opened = verifier
            .open_inbound(&offers[i as usize], TOPIC_IN, None, NOW_MS + i, &mut replay)
            .unwrap();
        std::hint::black_box(opened);
    });
    let grant = verifier.grant(&cred, NOW_MS).unwrap();
    let candidates: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            seal(&viewer, TOPIC_IN, NOW_MS + i, candidate, None)
                .unwrap()
                .into_bytes()
        })
        .collect();
    let mut replay = ReplayCache::new(1 << 20, 60_000);
    let open_later = measure("device: open a later message (candidate)", n, |i| {
        let opened = verifier
            .open_inbound(
                &candidates[i as usize],
                TOPIC_IN,
                Some(&grant),
                NOW_MS + i,
                &mut replay,
            )
            .unwrap();
        std::hint::black_box(opened);
    });
    let answer = offer.replace("\"offer\"", "\"answer\"");
    let seal_answer = measure("device: seal the answer", n, |i| {
        std::hint::black_box(seal_device_message(&device, TOPIC_OUT, NOW_MS + i, &answer).unwrap());
    });
    let seal_small = measure("device: seal a candidate", n, |i| {
        std::hint::black_box(
            seal_device_message(&device, TOPIC_OUT, NOW_MS + i, candidate).unwrap(),
        );
    });
    let sealed_answer = seal_device_message(&device, TOPIC_OUT, NOW_MS, &answer).unwrap();
    measure("viewer: open the device's answer", n, |_| {
        std::hint::black_box(
            open_device_message(&pk, sealed_answer.as_bytes(), TOPIC_OUT, NOW_MS, 60_000).unwrap(),
        );
    });
    // One session on the device: the offer, CANDIDATES candidates and a bye in; the answer,
    // CANDIDATES candidates and a bye out.
    let per_session = open_offer
        + open_later * (CANDIDATES as u32 + 1)
        + seal_answer
        + seal_small * (CANDIDATES as u32 + 1);
    println!(
        "device CPU per session (offer + {CANDIDATES} candidates + bye each way): {:.2} ms; \
         raw Ed25519 sign {:.1} µs, verify {:.1} µs",
        per_session.as_secs_f64() * 1e3,
        sign.as_secs_f64() * 1e6,
        verify.as_secs_f64() * 1e6
    );
}
