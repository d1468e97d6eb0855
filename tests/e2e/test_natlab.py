"""Viewers beyond the LAN (issue 14): sessions through NATs, through coturn's relay, and the
clear end of a session that has no path, in the NAT lab of natlab.py.

The device runs with coturn's REST scheme (webrtc.turn_rest) and in signed mode: it mints its
own relay credentials and hands each authorized viewer theirs in the `ice-servers` reply
(docs/protocol.md §4.9); the viewers have no ICE configuration of their own. Candidate types
are read from the viewer's nominated pair (aioice) and from the device's log line for the
connected viewer. Figures (offer to first frame per path, CPU of a relayed viewer) are
printed with record_metric; nothing asserts a time except the no-path case's bound of
connect_timeout plus 3 s for the bye to arrive.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import paho.mqtt.client as mqtt
from conftest import (
    PREFIX,
    mint,
    Monitor,
    Proc,
    Rtcam,
    record_metric,
    device_message,
    tail,
    viewer_auth,
)
from natlab import BROKER_IP, HOSTS, ROUTERS, NatLab
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rtcam_auth import public_b64


VIEWER = str(Path(__file__).resolve().parent / "viewer.py")
WHEP_CLIENT = str(Path(__file__).resolve().parent / "whep_client.py")
WHEP_PORT = 8889
TURN_PORT = 3478
STATIC_TURN_PORT = 3479
BROKER_PORT = 1883
FPS = 30
NO_PATH_CONNECT_TIMEOUT_MS = 6000


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
        self.spawn(self.lab.argv("pub", exe, "-c", str(conf)))
        if not wait_tcp_at(BROKER_IP, BROKER_PORT, 10):
            pytest.fail(f"lab mosquitto did not listen:\n{tail(self.log_path)}", pytrace=False)


class Coturn(Proc):
    """Debian's coturn in `pub`: with the REST scheme (use-auth-secret), or, given a static
    user, with long-term credentials (lt-cred-mech) for rtcam's `[[webrtc.turn_servers]]`."""

    def __init__(
        self,
        workdir: Path,
        lab: NatLab,
        port: int = TURN_PORT,
        relay_ports: tuple[int, int] = (49160, 49599),
        static_user: tuple[str, str] | None = None,
    ):
        self.name = f"coturn-{port}"
        super().__init__(workdir)
        self.lab, self.port, self.relay_ports, self.static_user = lab, port, relay_ports, static_user
        self.secret = secrets.token_hex(24)
        self.secret_file = workdir / f"turn-secret-{port}"

    def start(self) -> None:
        exe = shutil.which("turnserver") or "/usr/bin/turnserver"
        if not os.path.exists(exe):
            pytest.fail(
                "coturn is not installed (apt-get install coturn): the NAT lab's relay",
                pytrace=False,
            )
        if self.static_user is None:
            self.secret_file.write_text(self.secret + "\n")
            auth = f"use-auth-secret\nstatic-auth-secret={self.secret}\n"
        else:
            self.secret_file.write_text(self.static_user[1] + "\n")
            auth = f"lt-cred-mech\nuser={self.static_user[0]}:{self.static_user[1]}\n"
        self.secret_file.chmod(0o600)
        conf = self.workdir / f"turnserver-{self.port}.conf"
        # The documented starting point (docs/turn.md), narrowed to the lab's one address, with
        # a database of its own (not /var/lib/turn's).
        conf.write_text(
            f"listening-ip={BROKER_IP}\nrelay-ip={BROKER_IP}\nlistening-port={self.port}\n"
            f"min-port={self.relay_ports[0]}\nmax-port={self.relay_ports[1]}\nfingerprint\n"
            f"{auth}realm=rtcam.test\nno-cli\nno-tls\nno-dtls\nno-tcp-relay\n"
            "no-multicast-peers\nno-software-attribute\n"
            f"userdb={self.workdir / f'turndb-{self.port}'}\n"
            f"pidfile={self.workdir / f'turnserver-{self.port}.pid'}\n"
            "log-file=stdout\nsimple-log\nverbose\n"
        )
        self.spawn(self.lab.argv("pub", exe, "-c", str(conf)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not self.alive():
                break
            if b"Total General servers" in self.log_path.read_bytes() or _udp_bound(
                self.popen.pid, self.port
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
        self.settings["webrtc"]["bind_addresses"] = [host_ip("dev")]

    extra_toml = ""  # appended to the config as it is (e.g. [[webrtc.turn_servers]] tables)

    def write_config(self) -> None:
        super().write_config()
        if self.extra_toml:
            with open(self.config_path, "a") as f:
                f.write("\n" + self.extra_toml)

    def spawn(self, argv: list[str]) -> None:
        super().spawn(self.lab.argv("dev", *argv))


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
    nat = NatLab()
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


WHEP_PUBLIC_URL = f"http://{ROUTERS['rdev'][0]}:{WHEP_PORT}/whep"


@pytest.fixture(scope="module")
def cam_turn(workdir, lab, lab_monitor, coturn):
    """A device with STUN and coturn's REST TURN, and WHEP behind its router's port forward
    (announced at the forwarded address, whep.public_url)."""
    lab.forward_port("rdev", WHEP_PORT, "dev")
    r = LabRtcam(
        workdir,
        lab,
        "natcam",
        lab_monitor,
        webrtc__stun_servers=[STUN],
        webrtc__connect_timeout_ms=8000,
        whep__enabled=True,
        whep__listen=f"{host_ip('dev')}:{WHEP_PORT}",
        whep__public_url=WHEP_PUBLIC_URL,
    )
    r.settings["webrtc.turn_rest"] = {
        "urls": TURN_URLS,
        "secret_file": str(coturn.secret_file),
        "ttl_s": 600,
    }
    if os.environ.get("NATLAB_VERBOSE"):
        r.settings["log"]["level"] = os.environ["NATLAB_VERBOSE"]
    r.start()
    yield r
    r.stop()


@pytest.fixture
def cam_static_turn(workdir, lab, lab_monitor, coturn):
    """A device whose only relay is a TURN server with a static user (no REST secret); the
    REST coturn (`coturn`) is only the STUN server here."""
    turn = Coturn(workdir, lab, port=STATIC_TURN_PORT, relay_ports=(49600, 49999),
                  static_user=("rtcam-static", secrets.token_hex(12)))
    turn.start()
    r = LabRtcam(
        workdir,
        lab,
        "natcam-static",
        lab_monitor,
        webrtc__stun_servers=[STUN],
    )
    r.extra_toml = (
        "[[webrtc.turn_servers]]\n"
        f'url = "turn:{BROKER_IP}:{STATIC_TURN_PORT}"\n'
        'username = "rtcam-static"\n'
        f"credential_file = {json.dumps(str(turn.secret_file))}\n"
    )
    r.start()
    yield r
    r.stop()
    turn.stop()


@pytest.fixture
def cam_stun(workdir, lab, lab_monitor, coturn):
    """A device with STUN only: no relay for anyone."""
    r = LabRtcam(
        workdir,
        lab,
        "natcam-stun",
        lab_monitor,
        webrtc__stun_servers=[STUN],
        webrtc__connect_timeout_ms=NO_PATH_CONNECT_TIMEOUT_MS,
    )
    r.start()
    yield r
    r.stop()


# A viewer process in a namespace
# --------------------------------------------------------------------------------------


def host_ip(host: str) -> str:
    router, octet = HOSTS[host]
    return f"{ROUTERS[router][1]}.{octet}"


def viewer_argv(lab: NatLab, workdir: Path, where: str, device: str, *extra: str) -> list[str]:
    """viewer.py in namespace `where`, gathering on its one address, signed with a fresh
    credential for `device` (the device's default mode, auth.mode = "signed")."""
    auth_file = workdir / f"natlab-auth-{secrets.token_hex(4)}.json"
    auth_file.write_text(viewer_auth(device).to_json())
    auth_file.chmod(0o600)
    return lab.argv(
        where,
        sys.executable,
        VIEWER,
        "--host",
        BROKER_IP,
        "--port",
        str(BROKER_PORT),
        "--device",
        device,
        "--ice-address",
        host_ip(where),
        "--auth",
        str(auth_file),
        "--quiet",
        *(["-v"] if os.environ.get("NATLAB_VERBOSE") else []),
        *extra,
    )


def parse_events(text: str) -> list[dict]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def run_viewer(
    lab: NatLab, workdir: Path, where: str, device: str, *extra: str, timeout: float = 90.0
) -> list[dict]:
    """Runs viewer.py in namespace `where` to the end; returns its JSON events."""
    r = subprocess.run(
        viewer_argv(lab, workdir, where, device, *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    events = parse_events(r.stdout)
    if not events:
        raise AssertionError(
            f"viewer in {where} printed nothing (exit {r.returncode}):\n{r.stderr[-3000:]}"
        )
    events.append({"event": "_exit", "code": r.returncode, "stderr": r.stderr[-3000:]})
    return events


def event(events: list[dict], name: str) -> dict:
    for e in events:
        if e.get("event") == name:
            return e
    raise AssertionError(
        f"no {name!r} event; got {[e.get('event') for e in events]}: "
        f"{json.dumps(events)[-3000:]}"
    )


def path_line(cam: Rtcam, since: int) -> str:
    """The device's `viewer connected` log line written since byte `since`."""
    deadline = time.monotonic() + 10
    while True:
        text = cam.log_path.read_bytes()[since:].decode(errors="replace")
        lines = [line for line in text.splitlines() if "viewer connected" in line]
        if lines:
            return lines[-1]
        assert time.monotonic() < deadline, (
            f"no 'viewer connected' line in the device log:\n{text[-3000:]}"
        )
        time.sleep(0.1)


def assert_video(events: list[dict], who: str) -> dict:
    """Frames counted and intact: more than one second's worth (no rate asserted: the two
    cores are shared), each one the test pattern it should be."""
    done = event(events, "done")
    assert done["frames"] >= FPS, f"{who}: too few frames: {done}"
    assert done["crc_ok"] >= 0.95 * done["frames"], f"{who}: damaged frames: {done}"
    return done


def is_relay(pair: dict) -> bool:
    return "relay" in (pair["local"], pair["remote"])


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_relay_when_the_viewer_is_behind_a_symmetric_nat(lab, workdir, cam_turn, coturn):
    """Symmetric NAT on the viewer's side, a cone NAT on the device's: no host or srflx pair
    can work; the session connects through coturn with the credentials the device minted,
    video flows and a command round-trips over the data channel."""
    lab.set_nat("rview", "symmetric")
    mark = cam_turn.log_path.stat().st_size
    events = run_viewer(
        lab, workdir, "view", cam_turn.device, "--ask-ice-servers", "--ping", "--duration", "4"
    )
    servers = event(events, "ice-servers")["servers"]
    urls = [u for s in servers for u in s["urls"]]
    assert STUN in urls and TURN_URLS[0] in urls, servers
    turn = next(s for s in servers if TURN_URLS[0] in s["urls"])
    expiry, name = turn["username"].split(":", 1)
    assert name == f"{cam_turn.device}-viewer", turn
    assert 0 < int(expiry) - time.time() <= 600, f"not the configured ttl_s = 600: {turn}"
    pair = event(events, "connected")["pair"]
    assert is_relay(pair), f"not relayed: {pair}"
    worked = [c for c in pair["checks"] if c["state"] == "succeeded"]
    assert worked and all(is_relay(c) for c in worked), (
        f"a pair without a relay worked through a symmetric NAT: {pair['checks']}"
    )
    ping = event(events, "ping")
    assert ping["reply"].get("ok") is True and ping["reply"]["result"] == {"pong": True, "t": "cli"}, ping
    assert_video(events, "relayed viewer")
    line = path_line(cam_turn, mark)
    assert "relay" in line, f"the device does not report the relayed path: {line}"
    # Neither the shared secret nor the password minted for this viewer is in rtcam's log.
    minted = base64.b64encode(
        hmac.new(coturn.secret.encode(), turn["username"].encode(), hashlib.sha1).digest()
    ).decode()
    if not os.environ.get("NATLAB_VERBOSE"):  # webrtc-rs's own trace logs are not rtcam's
        text = cam_turn.log_path.read_text(errors="replace")
        assert coturn.secret not in text and minted not in text, "a TURN secret was logged"
    record_metric(
        "natlab.relay.offer_to_first_frame_ms", event(events, "first-frame")["ms_from_offer"]
    )
    record_metric("natlab.relay.pair", f"{pair['local']}->{pair['remote']}")


def test_the_devices_own_relay_when_the_viewer_has_none(lab, workdir, cam_turn):
    """The same symmetric NAT, a viewer that uses only the STUN server of the reply: the
    device's own relay (credentials it minted for itself) carries the session."""
    lab.set_nat("rview", "symmetric")
    mark = cam_turn.log_path.stat().st_size
    events = run_viewer(
        lab,
        workdir,
        "view",
        cam_turn.device,
        "--ask-ice-servers",
        "--without-turn",
        "--ping",
        "--duration",
        "3",
    )
    pair = event(events, "connected")["pair"]
    assert pair["remote"] == "relay" and pair["local"] != "relay", pair
    assert pair["remote_address"].startswith(BROKER_IP + ":"), pair
    assert event(events, "ping")["reply"].get("ok") is True, events
    assert_video(events, "viewer through the device's relay")
    line = path_line(cam_turn, mark)
    assert "relay ->" in line, f"the device does not report its own relay: {line}"
    record_metric(
        "natlab.device_relay.offer_to_first_frame_ms",
        event(events, "first-frame")["ms_from_offer"],
    )
    record_metric("natlab.device_relay.pair", f"{pair['local']}->{pair['remote']}")


def test_static_turn_credentials_still_work(lab, workdir, cam_static_turn):
    """`[[webrtc.turn_servers]]` with a static user: the device's relay carries a viewer
    behind a symmetric NAT, and the `ice-servers` reply does not hand the password out."""
    lab.set_nat("rview", "symmetric")
    events = run_viewer(
        lab, workdir, "view", cam_static_turn.device, "--ask-ice-servers", "--duration", "2"
    )
    servers = event(events, "ice-servers")["servers"]
    assert servers == [{"urls": [STUN], "username": None}], servers
    pair = event(events, "connected")["pair"]
    assert pair["remote"] == "relay" and pair["remote_address"].startswith(BROKER_IP + ":"), pair
    assert_video(events, "viewer through the device's static-credential relay")


def test_ice_servers_need_a_credential(cam_turn):
    """Signed mode: an `ice-servers` request without a credential gets `unauthorized` and no
    TURN credential (docs/protocol.md §4.9)."""
    session = secrets.token_hex(8)
    base = f"{PREFIX}/{cam_turn.device}/session/{session}"
    got: list[dict] = []
    done = threading.Event()

    def on_message(client, userdata, msg):
        got.append(device_message(msg.topic, msg.payload))
        done.set()

    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"natlab-{session}")
    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect(BROKER_IP, BROKER_PORT)
    c.loop_start()
    try:
        c.subscribe(f"{base}/out", qos=1)
        assert subscribed.wait(10), "could not subscribe to the session's out topic"
        c.publish(f"{base}/in", json.dumps({"v": 1, "type": "ice-servers"}), qos=1)
        assert done.wait(15), "no reply to an unsigned ice-servers request"
    finally:
        c.loop_stop()
        c.disconnect()
    assert got[0].get("type") == "error" and got[0].get("code") == "unauthorized", got
    assert "ice_servers" not in json.dumps(got), got


def test_srflx_when_both_nats_are_cones(lab, workdir, cam_turn):
    """Two port-restricted cone NATs: hole punching works, so the session goes through both
    NATs on reflexive addresses (srflx or prflx), not through the relay it also has."""
    lab.set_nat("rview", "cone")
    mark = cam_turn.log_path.stat().st_size
    events = run_viewer(
        lab, workdir, "view", cam_turn.device, "--ask-ice-servers", "--duration", "3"
    )
    pair = event(events, "connected")["pair"]
    assert not is_relay(pair), f"relayed although the NATs can be punched: {pair}"
    assert pair["remote"] in ("srflx", "prflx"), pair
    assert pair["remote_address"].startswith(ROUTERS["rdev"][0] + ":"), (
        f"not the device's NAT address: {pair}"
    )
    assert_video(events, "srflx viewer")
    line = path_line(cam_turn, mark)
    assert "relay" not in line, line
    record_metric(
        "natlab.srflx.offer_to_first_frame_ms", event(events, "first-frame")["ms_from_offer"]
    )
    record_metric("natlab.srflx.pair", f"{pair['local']}->{pair['remote']}")


def test_direct_on_the_devices_lan(lab, workdir, cam_turn):
    """A viewer on the device's own LAN, without ICE servers: host candidates meet."""
    events = run_viewer(lab, workdir, "lanview", cam_turn.device, "--duration", "3")
    pair = event(events, "connected")["pair"]
    assert (pair["local"], pair["remote"]) == ("host", "host"), pair
    assert pair["remote_address"] == f"{host_ip('dev')}:" + pair["remote_address"].split(":")[1]
    assert_video(events, "LAN viewer")
    record_metric(
        "natlab.direct.offer_to_first_frame_ms", event(events, "first-frame")["ms_from_offer"]
    )


def test_cpu_of_a_relayed_viewer(lab, workdir, cam_turn, coturn):
    """What one relayed viewer costs the device (and coturn), next to one direct viewer:
    figures from /proc/<pid>/stat over a steady window; the assertions only check that the
    sessions took the paths they are named after."""
    seconds = 8

    def measure(where: str, *extra: str) -> tuple[dict, float, float]:
        cam_turn.wait_idle(25)
        p = subprocess.Popen(
            viewer_argv(lab, workdir, where, cam_turn.device, "--duration", str(seconds + 3), *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = []
        while not any('"first-frame"' in x for x in lines):
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
        if not any('"first-frame"' in x for x in lines):
            p.wait(30)
            raise AssertionError(f"no first frame from {where}: {lines} {p.stderr.read()[-2000:]}")
        time.sleep(1.0)  # past the set-up: a steady window
        c0, t0, w0 = cpu_ticks(cam_turn.popen.pid), cpu_ticks(coturn.popen.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_ticks(cam_turn.popen.pid), cpu_ticks(coturn.popen.pid)
        wall = time.monotonic() - w0
        out, _ = p.communicate(timeout=60)
        events = parse_events("".join(lines) + out)
        assert_video(events, where)
        pct = lambda ticks: round(100.0 * ticks / TICKS / wall, 1)  # noqa: E731
        return event(events, "connected")["pair"], pct(c1 - c0), pct(t1 - t0)

    lab.set_nat("rview", "symmetric")
    # Through the device's own relay: rtcam wraps every packet for coturn (ChannelData).
    relay_pair, relay_dev, relay_turn = measure("view", "--ask-ice-servers", "--without-turn")
    direct_pair, direct_dev, direct_turn = measure("lanview")
    assert relay_pair["remote"] == "relay", relay_pair
    assert (direct_pair["local"], direct_pair["remote"]) == ("host", "host"), direct_pair
    record_metric("natlab.cpu.rtcam_pct.viewer_via_device_relay", relay_dev)
    record_metric("natlab.cpu.rtcam_pct.direct_viewer", direct_dev)
    record_metric("natlab.cpu.coturn_pct.viewer_via_device_relay", relay_turn)
    record_metric("natlab.cpu.coturn_pct.direct_viewer", direct_turn)


def test_no_path_ends_with_a_bye_within_connect_timeout(lab, workdir, cam_stun):
    """A device without a relay, a viewer behind a symmetric NAT: nothing can connect. The
    device ends the session with `bye` (`timeout` or `ice-failed`, docs/protocol.md §4.3)
    within webrtc.connect_timeout_ms of the offer, and frees its slot."""
    lab.set_nat("rview", "symmetric")
    events = run_viewer(
        lab,
        workdir,
        "view",
        cam_stun.device,
        "--ask-ice-servers",
        "--timeout",
        str(NO_PATH_CONNECT_TIMEOUT_MS / 1000 + 6),
        "--wait-device-end",
        "10",
    )
    servers = event(events, "ice-servers")["servers"]
    assert all(not u.startswith("turn") for s in servers for u in s["urls"]), servers
    err = event(events, "error")
    ended = event(events, "device-ended")
    msg = ended["message"]
    assert msg.get("type") == "bye" and msg.get("reason") in ("ice-failed", "timeout"), (
        f"the device ended the session with {msg}; the viewer's error: {err}"
    )
    # Within connect_timeout of the offer (measured from the viewer's offer to the bye's
    # arrival; the margin is the signaling's way back, not a timing assertion).
    assert ended["ms_from_offer"] <= NO_PATH_CONNECT_TIMEOUT_MS + 3000, ended
    cam_stun.wait_state(
        lambda s: s.get("viewers") == 0 and s.get("connecting") == 0, 15, "no session left"
    )
    record_metric("natlab.no_path.bye_reason", msg.get("reason"))
    record_metric("natlab.no_path.offer_to_bye_ms", ended["ms_from_offer"])


# --------------------------------------------------------------------------------------
# WHEP through the lab (a non-browser client: aiortc over HTTP, whep_client.py)
# --------------------------------------------------------------------------------------


def run_whep_client(lab: NatLab, workdir: Path, where: str, url: str, device: str) -> list[dict]:
    token_file = workdir / f"natlab-whep-{secrets.token_hex(4)}.jwt"
    token_file.write_text(mint(public_b64(Ed25519PrivateKey.generate()), device, "view"))
    token_file.chmod(0o600)
    argv = lab.argv(
        where, sys.executable, WHEP_CLIENT, "--url", url, "--token-file", str(token_file),
        "--ice-address", host_ip(where), "--frames", str(FPS), "--timeout", "40",
    )
    r = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    events = parse_events(r.stdout)
    if r.returncode != 0 or not events:
        raise AssertionError(
            f"WHEP client in {where} failed (exit {r.returncode}): {events}\n{r.stderr[-3000:]}"
        )
    return events


def test_whep_through_the_relay_from_behind_a_symmetric_nat(lab, workdir, cam_turn, coturn):
    """A WHEP viewer on the internet side, behind a symmetric NAT, watching the device behind
    its home router. HTTP reaches the device the way a remote home user's client does: through
    a port forward (DNAT) on the device's router, at the URL the device announces
    (whep.public_url); routing the viewer into the device's LAN would skip the NAT under test.
    The client has no ICE configuration: it uses the STUN and TURN servers of the 201's Link
    headers, with the TURN REST credential the device minted. Only the relay can work; frames
    carry the test pattern's stamps; DELETE ends the session in the device's state."""
    lab.set_nat("rview", "symmetric")
    state = cam_turn.wait_state(lambda s: "whep_url" in s, 10, "whep_url in state")
    assert state["whep_url"] == WHEP_PUBLIC_URL, state
    events = run_whep_client(lab, workdir, "view", WHEP_PUBLIC_URL, cam_turn.device)
    assert event(events, "posted")["status"] == 201, events
    servers = event(events, "ice-servers")["servers"]
    urls = [u for s in servers for u in s["urls"]]
    assert STUN in urls and TURN_URLS[0] in urls, servers
    turn = next(s for s in servers if TURN_URLS[0] in s["urls"])
    expiry, name = turn["username"].split(":", 1)
    assert name == f"{cam_turn.device}-viewer" and 0 < int(expiry) - time.time() <= 600, turn
    # The client's relay candidate exists only if coturn accepted the minted credential.
    assert "relay" in event(events, "local-candidates")["types"], events
    pair = event(events, "connected")["pair"]
    assert pair["local"] == "relay", f"not relayed by the viewer's TURN allocation: {pair}"
    worked = [c for c in pair["checks"] if c["state"] == "succeeded"]
    assert worked and all(is_relay(c) for c in worked), (
        f"a pair without a relay worked through a symmetric NAT: {pair['checks']}"
    )
    assert_whep_played_and_ended(events, cam_turn, "whep_relay")
    record_metric("natlab.whep_relay.pair", f"{pair['local']}->{pair['remote']}")


def assert_whep_played_and_ended(events: list[dict], cam, metric: str) -> None:
    """Enough stamped frames, DELETE answered 200, the session gone from the state; the
    timings recorded as natlab.<metric>.*."""
    done = event(events, "done")
    assert done["good"] >= FPS and done["good"] >= 0.95 * done["frames"], done
    assert event(events, "deleted")["status"] == 200, events
    cam.wait_state(
        lambda s: s.get("whep_viewers") == 0 and s.get("viewers") == 0, 15, "the WHEP session gone"
    )
    for name, kind in (("first_frame", "first-frame"), ("answer", "posted"), ("patch", "patched")):
        record_metric(f"natlab.{metric}.post_to_{name}_ms", event(events, kind)["ms_from_post"])


def test_whep_direct_on_the_devices_lan(lab, workdir, cam_turn):
    """The same client on the device's LAN, at the listener's own address: host candidates
    meet (the relay-only case's counterpart for offer -> first frame)."""
    url = f"http://{host_ip('dev')}:{WHEP_PORT}/whep"
    events = run_whep_client(lab, workdir, "lanview", url, cam_turn.device)
    pair = event(events, "connected")["pair"]
    assert (pair["local"], pair["remote"]) == ("host", "host"), pair
    assert_whep_played_and_ended(events, cam_turn, "whep_direct")
