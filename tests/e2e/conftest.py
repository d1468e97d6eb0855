"""Fixtures for rtcam end-to-end tests: a private mosquitto, rtcam instances, a state monitor.

Everything listens on 127.0.0.1 only. tests/run.sh runs pytest inside `unshare -n`, so the
ports chosen here cannot collide with anything on the host.

Signed mode (docs/protocol.md §9) is on, as by default: the run has one owner key
(OWNER), every rtcam instance trusts it, and every test viewer signs with a fresh viewer key
and a credential minted here (rtcam_auth.py: PyJWT + cryptography), pinning the device key
from the instance's status. `mint()` and `viewer_auth()` make other credentials.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent))
import viewer as viewer_module  # noqa: E402
from rtcam_auth import AuthError, issue_credential, open_device_message, public_b64  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PREFIX = "rtcam"
HOST = "127.0.0.1"

# Collected by tests, printed at the end of the run (see pytest_terminal_summary).
METRICS: dict[str, Any] = {}


# --------------------------------------------------------------------------------------
# Signed mode: the run's owner key, credentials, the devices' pinned keys
# --------------------------------------------------------------------------------------

OWNER = Ed25519PrivateKey.generate()
OWNER_PUBLIC = public_b64(OWNER)
# device id -> its public key, from its retained status (pinned by the test viewers)
DEVICE_KEYS: dict[str, str] = {}
# What the default test viewer may do: everything, as the tests before signed mode did.
DEFAULT_SCOPE = "view control admin"


def mint(
    viewer_public: str,
    device: str | list[str],
    scope: str = DEFAULT_SCOPE,
    lifetime_s: int = 3600,
    *,
    owner: Ed25519PrivateKey | None = None,
    ns: list[str] | None = None,
    jti: str | None = None,
    iat: int | None = None,
    exp: int | None = None,
) -> str:
    """A credential from the run's owner key (or `owner`) for `device` (or a list, or "*")."""
    now = int(time.time())
    return issue_credential(
        owner or OWNER,
        audience=device if isinstance(device, list) else [device],
        viewer_public=viewer_public,
        scope=scope,
        iat=now if iat is None else iat,
        exp=(now + lifetime_s) if exp is None else exp,
        jti=jti or f"e2e-{os.urandom(6).hex()}",
        ns=ns,
        sub="e2e-viewer",
    )


def viewer_auth(device: str, scope: str = DEFAULT_SCOPE, **mint_args: Any) -> viewer_module.ViewerAuth:
    """A fresh viewer key with a credential for `device`, pinning the device's key."""
    key = Ed25519PrivateKey.generate()
    cred = mint(public_b64(key), device, scope, **mint_args)
    return viewer_module.ViewerAuth(key, cred, DEVICE_KEYS.get(device))


viewer_module.default_auth = viewer_auth


def device_message(topic: str, payload: bytes) -> Any:
    """A message rtcam published on a session's `out` topic, opened with the device's pinned
    key (signed mode) or read as it is (open mode). Anything not signed by the device comes
    back as {"_rejected": code, "_raw": ...}; non-JSON as {"_raw": ...}."""
    parts = topic.split("/")
    key = DEVICE_KEYS.get(parts[-4]) if len(parts) >= 4 else None
    text: bytes | str = payload
    if key is not None:
        try:
            text = open_device_message(payload, topic, key, int(time.time() * 1000))
        except AuthError as e:
            return {"_rejected": e.code, "_raw": payload[:200]}
    try:
        msg = json.loads(text)
    except ValueError:
        return {"_raw": payload[:200]}
    return msg if isinstance(msg, dict) else {"_raw": msg}


def record_metric(name: str, value: Any) -> None:
    METRICS[name] = value
    print(f"METRIC {name} = {json.dumps(value)}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_tcp(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def tail(path: Path, start: int = 0, max_lines: int = 150) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read().decode(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    lines = data.splitlines()
    cut = len(lines) - max_lines
    text = "\n".join(lines[-max_lines:])
    return (f"... ({cut} earlier lines omitted)\n" if cut > 0 else "") + text


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------

RUNNING: list[Proc] = []  # alive now
ALL_PROCS: list[Proc] = []  # ever started (their logs go into failure reports)


class Proc:
    """A child process in its own process group, with stderr+stdout in a log file."""

    name = "proc"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self.popen: subprocess.Popen | None = None

    def spawn(self, argv: list[str]) -> None:
        self.log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            argv,
            env={**os.environ, "NO_COLOR": "1"},  # plain log files
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,
        )
        self.spawned_at = time.time()
        RUNNING.append(self)
        ALL_PROCS.append(self)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group: no shutdown code runs."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout. Returns the exit code (None if killed)."""
        if self.popen is None:
            return None
        rc = self.popen.poll()
        killed = False
        if rc is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                rc = self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                killed = True
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        if self in RUNNING:
            RUNNING.remove(self)
        self.log.close()
        return None if killed else rc


class Mosquitto(Proc):
    name = "mosquitto"
    # More mosquitto.conf lines (e.g. a TLS listener), appended after the plain listener.
    extra_conf = ""

    def start(self) -> None:
        exe = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
        )
        if exe is None:
            pytest.fail(
                "mosquitto is not installed (apt-get install mosquitto); the e2e tests need a "
                "real MQTT broker",
                pytrace=False,
            )
        self.port = free_port()
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "user root\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n" + self.extra_conf
        )
        self.spawn([exe, "-c", str(conf)])
        if not wait_tcp(self.port, 10):
            self.stop()
            pytest.fail(
                f"mosquitto did not listen on {HOST}:{self.port} within 10 s:\n{tail(self.log_path)}",
                pytrace=False,
            )


def rtcam_binary() -> Path:
    p = Path(os.environ.get("RTCAM_BIN", REPO / "target" / "release" / "rtcam"))
    if not p.is_absolute():
        p = REPO / p
    return p


class Rtcam(Proc):
    name = "rtcam"

    def __init__(
        self, workdir: Path, device: str, broker_port: int, monitor: Monitor, **overrides: Any
    ):
        self.name = f"rtcam-{device}"
        super().__init__(workdir)
        self.device, self.broker_port, self.monitor = device, broker_port, monitor
        self.settings: dict[str, dict[str, Any]] = {
            "device": {"id": device},
            "capture": {"source": "test-pattern", "width": 640, "height": 480, "fps": 30},
            "webrtc": {
                "bind_addresses": [HOST],
                "disconnect_timeout_ms": 3000,
                "max_viewers": 4,
            },
            "mqtt": {"host": HOST, "port": broker_port},
            "log": {"target": "stderr", "level": "info"},
            "auth": {"owner_keys": [OWNER_PUBLIC]},
            # The tests' dashboards reply on dash/<name> (control.reply_to_allowed).
            "control": {"reply_to_allowed": ["dash/+"]},
        }
        for key, value in overrides.items():  # e.g. webrtc__max_viewers=1
            section, name = key.split("__", 1)
            self.settings.setdefault(section, {})[name] = value
        self.config_path = workdir / f"rtcam-{device}.toml"
        self.topic_status = f"{PREFIX}/{device}/status"
        self.topic_state = f"{PREFIX}/{device}/state"

    def write_config(self) -> None:
        lines = []
        for section, values in self.settings.items():
            lines.append(f"[{section}]")
            for k, v in values.items():
                lines.append(f"{k} = {json.dumps(v)}")  # JSON scalars/arrays are valid TOML
            lines.append("")
        self.config_path.write_text("\n".join(lines))

    def start(self, timeout: float = 20.0) -> None:
        exe = rtcam_binary()
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            pytest.fail(
                f"rtcam binary not found at {exe}: run `cargo build --release` or set RTCAM_BIN",
                pytrace=False,
            )
        self.write_config()
        check = subprocess.run(
            [str(exe), "check-config", "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            pytest.fail(
                f"`rtcam check-config` rejected the test config (exit {check.returncode}):\n"
                f"{self.config_path.read_text()}\nstdout: {check.stdout}\nstderr: {check.stderr}",
                pytrace=False,
            )
        t0 = time.monotonic()
        self.monitor.forget(self.topic_status)  # a new identity key each start: wait for it
        self.spawn([str(exe), "--config", str(self.config_path)])
        try:
            status = self.monitor.wait_for(
                self.topic_status,
                lambda m: m.get("status") == "online",
                timeout,
                alive=self.alive,
            )
            self.device_key = status.get("key")
            if self.device_key:
                DEVICE_KEYS[self.device] = self.device_key
            else:
                DEVICE_KEYS.pop(self.device, None)
            self.monitor.wait_for(self.topic_state, lambda m: True, timeout, alive=self.alive)
        except AssertionError as e:
            rc = self.popen.poll()
            self.stop()
            pytest.fail(
                f"rtcam ({exe}) did not come online: {e}; exit code {rc}\n"
                f"--- rtcam log ---\n{tail(self.log_path)}",
                pytrace=False,
            )
        record_metric(f"{self.device}.startup_to_online_ms", round((time.monotonic() - t0) * 1000))

    def state(self) -> dict | None:
        return self.monitor.latest(self.topic_state)

    def wait_state(self, predicate: Callable[[dict], bool], timeout: float, what: str = "") -> dict:
        return self.monitor.wait_for(
            self.topic_state, predicate, timeout, what=what, alive=self.alive
        )

    def wait_idle(self, timeout: float = 25.0) -> dict:
        return self.wait_state(
            lambda s: s.get("viewers") == 0 and s.get("capturing") is False,
            timeout,
            "viewers == 0 and capturing == false",
        )


# --------------------------------------------------------------------------------------
# Monitor of retained status/state topics
# --------------------------------------------------------------------------------------


class Monitor:
    """Background paho client recording every status/state message."""

    def __init__(self, port: int, login: tuple[str, str] | None = None, host: str = HOST):
        self.cond = threading.Condition()
        self.history: list[tuple[float, str, Any]] = []
        self._latest: dict[str, Any] = {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-monitor-{os.getpid()}-{port}"
        )
        if login is not None:
            self.client.username_pw_set(*login)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError(f"monitor could not subscribe on broker port {port}")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe([(f"{PREFIX}/+/status", 1), (f"{PREFIX}/+/state", 1)])

    def _on_message(self, client, userdata, msg):
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = {"_invalid_json": msg.payload.decode(errors="replace")}
        with self.cond:
            self.history.append((time.time() * 1000, msg.topic, payload))
            self._latest[msg.topic] = payload
            self.cond.notify_all()

    def latest(self, topic: str) -> Any:
        with self.cond:
            return self._latest.get(topic)

    def messages(self, topic: str, since_ms: float = 0) -> list[tuple[float, Any]]:
        with self.cond:
            return [(t, p) for t, tp, p in self.history if tp == topic and t >= since_ms]

    def forget(self, topic: str) -> None:
        with self.cond:
            self._latest.pop(topic, None)

    def wait_for(
        self,
        topic: str,
        predicate,
        timeout: float,
        what: str = "",
        alive: Callable[[], bool] | None = None,
    ) -> Any:
        """Wait until the latest message on topic satisfies predicate; AssertionError if not."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                cur = self._latest.get(topic)
                if cur is not None and predicate(cur):
                    return cur
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{topic}: not {what or 'as expected'} within {timeout:.0f} s; "
                        f"latest = {json.dumps(cur)}"
                    )
                if alive is not None and not alive():
                    raise AssertionError(f"{topic}: process exited while waiting for {what}")
                self.cond.wait(min(left, 0.2))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def broker(workdir):
    m = Mosquitto(workdir)
    m.start()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def monitor(broker):
    mon = Monitor(broker.port)
    yield mon
    mon.close()


@pytest.fixture(scope="session")
def rtcam(workdir, broker, monitor):
    r = Rtcam(workdir, "testcam", broker.port, monitor)
    r.start()
    yield r
    r.stop()


@pytest.fixture
def cam(rtcam):
    """The shared rtcam instance, checked idle (no sessions left over) before the test."""
    if not rtcam.alive():
        pytest.fail(
            f"rtcam exited (code {rtcam.popen.poll()}):\n{tail(rtcam.log_path)}", pytrace=False
        )
    rtcam.wait_idle(25)
    return rtcam


@pytest.fixture
def make_rtcam(workdir, broker, monitor):
    """Factory for extra rtcam instances (own device id and overrides), stopped at teardown."""
    started: list[Rtcam] = []

    def make(device: str, **overrides: Any) -> Rtcam:
        r = Rtcam(workdir, device, broker.port, monitor, **overrides)
        r.start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def _stop_all() -> None:
    for p in RUNNING:
        try:
            p.stop(5)
        except Exception:
            pass


def pytest_configure(config):
    # `timeout` in tests/run.sh sends SIGTERM: turn it into KeyboardInterrupt so pytest
    # tears fixtures down (stops mosquitto/rtcam) instead of leaving them running.
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    atexit.register(_stop_all)


# --------------------------------------------------------------------------------------
# Reporting: attach rtcam/mosquitto logs to failures, print metrics at the end
# --------------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item._log_marks = {}
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item._t_start = time.time()
    for p in RUNNING:
        item._log_marks[p.log_path] = file_size(p.log_path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        marks = getattr(item, "_log_marks", {})
        for p in ALL_PROCS:
            if p.log_path in marks:
                start = marks[p.log_path]  # running when the test began: its part of the log
            elif p.spawned_at >= getattr(item, "_t_start", 0):
                start = 0  # started by this test
            else:
                continue
            report.sections.append(
                (f"{p.name} log during {item.name} ({p.log_path})", tail(p.log_path, start, 200))
            )


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not METRICS:
        return
    terminalreporter.section("rtcam e2e metrics")
    for k, v in METRICS.items():
        terminalreporter.write_line(f"{k}: {json.dumps(v)}")
