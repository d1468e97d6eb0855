"""Viewers beyond the LAN (issue 14): sessions through NATs, through coturn's relay, and the
clear end of a session that has no path, in the NAT lab of natlab.py.

The device runs with coturn's REST scheme (webrtc.turn_rest): it mints its own relay
credentials and hands viewers theirs in the `ice-servers` reply (docs/protocol.md §4.9);
the viewers have no ICE configuration of their own. Candidate types are read from the
viewer's nominated pair (aioice) and from the device's log line for the connected viewer.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    Monitor,
    Proc,
    Rtcam,
    record_metric,
    tail,
    wait_tcp,
)
from natlab import BROKER_IP, NatLab

sys.path.insert(0, str(Path(__file__).resolve().parent))

VIEWER = str(Path(__file__).resolve().parent / "viewer.py")
TURN_PORT = 3478
BROKER_PORT = 1883
FPS = 30


# --------------------------------------------------------------------------------------
# Processes inside the lab's namespaces
# --------------------------------------------------------------------------------------


class LabMosquitto(Proc):
    name = "lab-mosquitto"

    def __init__(self, workdir: Path, lab: NatLab):
        super().__init__(workdir)
        self.lab = lab

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(exe):
            pytest.fail("mosquitto is not installed (apt-get install mosquitto)", pytrace=False)
        conf = self.workdir / "lab-mosquitto.conf"
        conf.write_text(
            f"listener {BROKER_PORT} {BROKER_IP}\nallow_anonymous true\npersistence false\n"
            "user root\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
        )
        self.spawn([*self.lab.exec_prefix("pub"), exe, "-c", str(conf)])
        if not wait_tcp_at(BROKER_IP, BROKER_PORT, 10):
            pytest.fail(f"lab mosquitto did not listen:\n{tail(self.log_path)}", pytrace=False)


class Coturn(Proc):
    """Debian's coturn in `pub`, with the REST scheme (use-auth-secret)."""

    name = "coturn"

    def __init__(self, workdir: Path, lab: NatLab):
        super().__init__(workdir)
        self.lab = lab
        self.secret = secrets.token_hex(24)
        self.secret_file = workdir / "turn-secret"

    def start(self) -> None:
        exe = shutil.which("turnserver") or "/usr/bin/turnserver"
        if not os.path.exists(exe):
            pytest.fail(
                "coturn is not installed (apt-get install coturn): the NAT lab's relay",
                pytrace=False,
            )
        self.secret_file.write_text(self.secret + "\n")
        self.secret_file.chmod(0o600)
        conf = self.workdir / "turnserver.conf"
        # The documented starting point (docs/turn.md), narrowed to the lab's one address.
        conf.write_text(
            f"listening-ip={BROKER_IP}\nrelay-ip={BROKER_IP}\nlistening-port={TURN_PORT}\n"
            "min-port=49160\nmax-port=49999\nfingerprint\nuse-auth-secret\n"
            f"static-auth-secret={self.secret}\nrealm=rtcam.test\nno-cli\nno-tls\nno-dtls\n"
            "no-multicast-peers\nno-software-attribute\n"
            f"pidfile={self.workdir / 'turnserver.pid'}\n"
            "log-file=stdout\nsimple-log\nverbose\n"
        )
        self.spawn([*self.lab.exec_prefix("pub"), exe, "-c", str(conf)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self.alive():
                break
            if b"Total General servers" in self.log_path.read_bytes() or _udp_bound(
                self.popen.pid, TURN_PORT
            ):
                return
            time.sleep(0.1)
        pytest.fail(f"coturn did not start:\n{tail(self.log_path)}", pytrace=False)


def _udp_bound(pid: int, port: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/net/udp").read_text()
    except OSError:
        return False
    return f":{port:04X} " in text


def wait_tcp_at(host: str, port: int, timeout: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class LabRtcam(Rtcam):
    """rtcam in the `dev` namespace, talking to the lab's broker and coturn."""

    def __init__(self, workdir: Path, lab: NatLab, device: str, monitor: Monitor, **overrides):
        super().__init__(workdir, device, BROKER_PORT, monitor, **overrides)
        self.lab = lab
        self.settings["mqtt"]["host"] = BROKER_IP
        self.settings["webrtc"]["bind_addresses"] = ["0.0.0.0"]

    def spawn(self, argv: list[str]) -> None:
        super().spawn([*self.lab.exec_prefix("dev"), *argv])


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab():
    nat = NatLab(tag=str(os.getpid() % 100000))
    try:
        nat.up()
    except Exception:
        nat.down()
        raise
    yield nat
    nat.down()


@pytest.fixture(scope="module")
def lab_broker(workdir, lab):
    m = LabMosquitto(workdir, lab)
    m.start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def coturn(workdir, lab):
    t = Coturn(workdir, lab)
    t.start()
    yield t
    t.stop()


@pytest.fixture(scope="module")
def lab_monitor(lab_broker):
    mon = Monitor(BROKER_PORT, host=BROKER_IP)
    yield mon
    mon.close()


STUN = f"stun:{BROKER_IP}:{TURN_PORT}"
TURN_URLS = [f"turn:{BROKER_IP}:{TURN_PORT}", f"turn:{BROKER_IP}:{TURN_PORT}?transport=tcp"]


@pytest.fixture(scope="module")
def cam_turn(workdir, lab, lab_monitor, coturn):
    """A device with STUN and coturn's REST TURN."""
    r = LabRtcam(
        workdir,
        lab,
        "natcam",
        lab_monitor,
        webrtc__stun_servers=[STUN],
        webrtc__connect_timeout_ms=8000,
    )
    r.settings["webrtc.turn_rest"] = {
        "urls": TURN_URLS,
        "secret_file": str(coturn.secret_file),
        "ttl_s": 600,
    }
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def cam_stun(workdir, lab, lab_monitor):
    """A device with STUN only: no relay for anyone."""
    r = LabRtcam(
        workdir,
        lab,
        "natcam-stun",
        lab_monitor,
        webrtc__stun_servers=[STUN],
        webrtc__connect_timeout_ms=6000,
    )
    r.start()
    yield r
    r.stop()


# --------------------------------------------------------------------------------------
# A viewer process in a namespace
# --------------------------------------------------------------------------------------


def run_viewer(
    lab: NatLab, where: str, device: str, *extra: str, timeout: float = 60.0
) -> list[dict]:
    """Runs viewer.py in namespace `where` to the end; returns its JSON events."""
    import subprocess

    argv = [
        *lab.exec_prefix(where),
        sys.executable,
        VIEWER,
        "--host",
        BROKER_IP,
        "--port",
        str(BROKER_PORT),
        "--device",
        device,
        "--real-interfaces",
        *extra,
    ]
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    events = []
    for line in r.stdout.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    if not events:
        raise AssertionError(f"viewer in {where} printed nothing (exit {r.returncode}):\n{r.stderr[-3000:]}")
    events[-1].setdefault("_stderr", r.stderr[-3000:])
    return events


def event(events: list[dict], name: str) -> dict:
    for e in events:
        if e.get("event") == name:
            return e
    raise AssertionError(
        f"no {name!r} event; got {[e.get('event') for e in events]}: "
        f"{json.dumps(events)[-2000:]}"
    )


def path_line(cam: Rtcam, since: int) -> str:
    """The device's `viewer connected` log line written since byte `since`."""
    text = cam.log_path.read_bytes()[since:].decode(errors="replace")
    lines = [line for line in text.splitlines() if "viewer connected" in line]
    assert lines, f"no 'viewer connected' line in the device log:\n{text[-3000:]}"
    return lines[-1]


def assert_video(events: list[dict], seconds: float, who: str) -> dict:
    done = event(events, "done")
    assert done["crc_ok"] >= FPS * seconds * 0.7, f"{who}: too few frames: {done}"
    assert done["pattern_ok"] >= 0.95 * done["frames"], f"{who}: damaged frames: {done}"
    return done


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_relay_when_the_viewer_is_behind_a_symmetric_nat(lab, cam_turn, coturn):
    """Symmetric NAT on the viewer's side, a cone NAT on the device's: host and srflx pairs
    fail; the session connects through coturn, video flows and commands round-trip."""
    lab.set_nat("rview", "symmetric")
    mark = cam_turn.log_path.stat().st_size
    events = run_viewer(
        lab, "view", cam_turn.device, "--ask-ice-servers", "--ping", "--duration", "4"
    )
    servers = event(events, "ice-servers")["servers"]
    urls = [u for s in servers for u in s["urls"]]
    assert f"stun:{BROKER_IP}:{TURN_PORT}" in urls and f"turn:{BROKER_IP}:{TURN_PORT}" in urls, servers
    turn = next(s for s in servers if any(u.startswith("turn:") for u in s["urls"]))
    expiry, name = turn["username"].split(":", 1)
    assert name == f"{cam_turn.device}-viewer" and int(expiry) > time.time(), turn
    connected = event(events, "connected")
    pair = connected["pair"]
    assert "relay" in (pair["local"], pair["remote"]), f"not relayed: {pair}"
    succeeded = [c for c in pair["checks"] if c["state"] == "succeeded"]
    assert succeeded and all("relay" in (c["local"], c["remote"]) for c in succeeded), (
        f"a pair without a relay worked through a symmetric NAT: {pair['checks']}"
    )
    ping = event(events, "ping")
    assert ping["reply"].get("ok") is True, ping
    assert_video(events, 4, "relayed viewer")
    line = path_line(cam_turn, mark)
    assert "relay" in line, f"the device does not report the relayed path: {line}"
    record_metric("natlab.relay.offer_to_first_frame_ms", event(events, "first-frame")["ms_from_offer"])
    record_metric("natlab.relay.pair", f"{pair['local']}->{pair['remote']}")
    record_metric("natlab.relay.ice_servers_ms", event(events, "ice-servers")["ms"])


def test_srflx_when_both_nats_are_cones(lab, cam_turn):
    """Two port-restricted cone NATs: hole punching works, so the session goes direct through
    both NATs (server-reflexive or peer-reflexive), not through the relay."""
    lab.set_nat("rview", "cone")
    mark = cam_turn.log_path.stat().st_size
    events = run_viewer(lab, "view", cam_turn.device, "--ask-ice-servers", "--duration", "3")
    pair = event(events, "connected")["pair"]
    assert "relay" not in (pair["local"], pair["remote"]), f"relayed although punchable: {pair}"
    assert pair["remote"] in ("srflx", "prflx"), pair
    assert not pair["remote_address"].startswith("10."), pair
    assert_video(events, 3, "srflx viewer")
    line = path_line(cam_turn, mark)
    assert "relay" not in line, line
    record_metric("natlab.srflx.offer_to_first_frame_ms", event(events, "first-frame")["ms_from_offer"])
    record_metric("natlab.srflx.pair", f"{pair['local']}->{pair['remote']}")


def test_direct_on_the_devices_lan(lab, cam_turn):
    """A viewer on the device's own LAN, with no ICE servers: host candidates meet."""
    events = run_viewer(lab, "lanview", cam_turn.device, "--duration", "3")
    pair = event(events, "connected")["pair"]
    assert (pair["local"], pair["remote"]) == ("host", "host"), pair
    assert pair["remote_address"].startswith("10.0.1."), pair
    assert_video(events, 3, "LAN viewer")
    record_metric("natlab.direct.offer_to_first_frame_ms", event(events, "first-frame")["ms_from_offer"])


def test_no_path_ends_with_a_clear_bye(lab, cam_stun, lab_monitor):
    """A device without a relay and a viewer behind a symmetric NAT: nothing connects; the
    device ends the session with a bye (ice-failed or timeout) and frees its slot."""
    lab.set_nat("rview", "symmetric")
    t0 = time.monotonic()
    events = run_viewer(
        lab,
        "view",
        cam_stun.device,
        "--ask-ice-servers",
        "--timeout",
        "12",
        "--wait-device-end",
        "10",
    )
    err = event(events, "error")
    ended = event(events, "device-ended")["message"]
    assert ended.get("type") == "bye" and ended.get("reason") in ("ice-failed", "timeout"), (
        f"device ended the session with {ended}; viewer error {err}"
    )
    servers = event(events, "ice-servers")["servers"]
    assert all(not u.startswith("turn") for s in servers for u in s["urls"]), servers
    cam_stun.wait_state(
        lambda s: s.get("viewers") == 0 and s.get("connecting") == 0, 15, "no session left"
    )
    record_metric("natlab.no_path.bye_reason", ended.get("reason"))
    record_metric("natlab.no_path.seconds_to_bye", round(time.monotonic() - t0, 1))


def test_cpu_of_a_relayed_viewer(lab, cam_turn, coturn):
    """What one relayed viewer costs the device and the relay, next to one direct viewer
    (figures, printed; the assertions only check the sessions were what they claim)."""
    seconds = 10

    def measure(where: str, *extra: str) -> tuple[dict, float, float]:
        import subprocess

        cam_turn.wait_idle(25)
        argv = [
            *lab.exec_prefix(where),
            sys.executable,
            VIEWER,
            "--host",
            BROKER_IP,
            "--port",
            str(BROKER_PORT),
            "--device",
            cam_turn.device,
            "--real-interfaces",
            "--duration",
            str(seconds + 4),
            *extra,
        ]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Skip the set-up: measure a steady window of `seconds` after the first frame.
        first = None
        lines = []
        while first is None:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if '"first-frame"' in line:
                first = time.monotonic()
        assert first is not None, f"no first frame from {where}: {lines} {p.stderr.read()[-2000:]}"
        time.sleep(1.0)
        c0, t0 = cpu_ticks(cam_turn.popen.pid), cpu_ticks(coturn.popen.pid)
        w0 = time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_ticks(cam_turn.popen.pid), cpu_ticks(coturn.popen.pid)
        wall = time.monotonic() - w0
        out, err = p.communicate(timeout=30)
        events = [json.loads(x) for x in (lines + out.splitlines()) if x.strip().startswith("{")]
        device_pct = 100.0 * (c1 - c0) / TICKS / wall
        relay_pct = 100.0 * (t1 - t0) / TICKS / wall
        return event(events, "connected")["pair"], round(device_pct, 1), round(relay_pct, 1)

    lab.set_nat("rview", "symmetric")
    relay_pair, relay_dev, relay_turn = measure("view", "--ask-ice-servers")
    direct_pair, direct_dev, direct_turn = measure("lanview")
    assert "relay" in (relay_pair["local"], relay_pair["remote"]), relay_pair
    assert (direct_pair["local"], direct_pair["remote"]) == ("host", "host"), direct_pair
    record_metric("natlab.cpu.device_pct.relayed_viewer", relay_dev)
    record_metric("natlab.cpu.device_pct.direct_viewer", direct_dev)
    record_metric("natlab.cpu.coturn_pct.relayed_viewer", relay_turn)
    record_metric("natlab.cpu.coturn_pct.direct_viewer", direct_turn)
    # The relay carries the video only for the relayed viewer.
    assert relay_turn > direct_turn, (relay_turn, direct_turn)
