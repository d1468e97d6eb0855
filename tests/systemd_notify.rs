//! The rtcam binary speaks systemd's notify protocol: READY=1 only once the camera was probed and MQTT is up, STATUS= while waiting, watchdog pings, STOPPING=1 on SIGTERM.
#![allow(unsafe_code)] // libc::kill to send SIGTERM to the child.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::free_port;

/// A fake service manager: the notify socket and the rtcam child that reports to it.
struct Manager {
    socket: UnixDatagram,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Manager {
    fn start(env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rtcam"));
        cmd.arg("run")
            .env_clear()
            .env("NOTIFY_SOCKET", &path)
            .env("RTCAM__LOG__TARGET", "stderr")
            .env("RTCAM__LOG__LEVEL", "warn")
            .env("RTCAM__WEBRTC__BIND_ADDRESSES", "127.0.0.1")
            .env("RTCAM__MQTT__HOST", "127.0.0.1")
            .env(
                "RTCAM__WEBRTC__CERTIFICATE_PATH",
                dir.path().join("dtls.pem"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("rtcam binary runs");
        Manager {
            socket,
            child,
            _dir: dir,
        }
    }

    /// Every notify line received within `window`.
    fn collect(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut lines = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                lines.extend(text.lines().map(str::to_owned));
            }
        }
        lines
    }

    /// Collects lines until one satisfies `pred` (panics after `limit`).
    fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut lines = Vec::new();
        while Instant::now() < deadline {
            lines.extend(self.collect(Duration::from_millis(100)));
            if lines.iter().any(|l| pred(l)) {
                return lines;
            }
        }
        panic!("no {what} within {limit:?}; got {lines:?}");
    }

    fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut lines = Vec::new();
        loop {
            lines.extend(self.collect(Duration::from_millis(100)));
            if let Some(status) = self.child.try_wait().unwrap() {
                lines.extend(self.collect(Duration::from_millis(100)));
                return (status, lines);
            }
            assert!(Instant::now() < deadline, "rtcam did not stop on SIGTERM");
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn embedded_broker(mqtt: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RTCAM__MQTT__PORT", mqtt.to_string()),
        ("RTCAM__BROKER__ENABLED", "true".into()),
        ("RTCAM__BROKER__LISTEN", format!("127.0.0.1:{mqtt}")),
        (
            "RTCAM__BROKER__WS_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
    ]
}

#[test]
fn ready_after_camera_and_mqtt_then_watchdog_pings_then_stopping_on_sigterm() {
    let mut env = embedded_broker(free_port());
    env.push(("RTCAM__CAPTURE__SOURCE", "test-pattern".into()));
    env.push(("WATCHDOG_USEC", "400000".into()));
    let m = Manager::start(&env);
    let lines = m.wait_for("READY=1", Duration::from_secs(20), |l| l == "READY=1");
    assert!(
        lines.iter().any(|l| l == "STATUS=opening the camera"),
        "{lines:?}"
    );
    let after = m.collect(Duration::from_millis(1500));
    let pings = after.iter().filter(|l| *l == "WATCHDOG=1").count();
    assert!(
        pings >= 3,
        "watchdog pings every 200 ms while idle by design: {after:?}"
    );
    let (status, lines) = m.terminate();
    assert!(status.success(), "{status:?}");
    assert!(lines.iter().any(|l| l == "STOPPING=1"), "{lines:?}");
}

#[test]
fn not_ready_while_the_camera_is_missing() {
    let mut env = embedded_broker(free_port());
    env.push(("RTCAM__CAPTURE__SOURCE", "v4l2".into()));
    env.push((
        "RTCAM__CAPTURE__DEVICE",
        "/dev/video-rtcam-test-absent".into(),
    ));
    let m = Manager::start(&env);
    let lines = m.wait_for("a camera STATUS", Duration::from_secs(20), |l| {
        l.starts_with("STATUS=waiting for the camera")
    });
    let lines = [lines, m.collect(Duration::from_secs(2))].concat();
    assert!(!lines.iter().any(|l| l == "READY=1"), "{lines:?}");
    let status = lines
        .iter()
        .find(|l| l.starts_with("STATUS=waiting for the camera"))
        .unwrap();
    assert!(
        status.contains("/dev/video-rtcam-test-absent"),
        "names the device: {status}"
    );
    let (status, _) = m.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn not_ready_while_the_broker_is_unreachable() {
    let port = free_port(); // nothing listens there
    let env = vec![
        ("RTCAM__CAPTURE__SOURCE", "test-pattern".to_string()),
        ("RTCAM__MQTT__PORT", port.to_string()),
    ];
    let m = Manager::start(&env);
    // The broker is named with its connection mode.
    let want =
        format!("STATUS=waiting for the MQTT broker at 127.0.0.1:{port} (plain TCP, anonymous)");
    let lines = m.wait_for("a broker STATUS", Duration::from_secs(20), |l| l == want);
    let lines = [lines, m.collect(Duration::from_secs(1))].concat();
    assert!(!lines.iter().any(|l| l == "READY=1"), "{lines:?}");
    let (status, _) = m.terminate();
    assert!(status.success(), "{status:?}");
}
