"""rtcam's Debian package under a real systemd, checked from the host (tests/vm/systemd/run.sh).

Boots the cached Debian 12 guest image (a qcow2 overlay, so every run starts clean) in
qemu-system-x86_64 under TCG with one user-mode NIC whose hostfwd ports, on 127.0.0.1 only,
carry ssh, MQTT and rtcam's one UDP port. run.sh starts this inside a network namespace that
holds only `lo`, so the guest reaches nothing beyond this test. (qemu's `restrict=on` would
isolate the guest too, but it also drops the guest's UDP replies to a forwarded port, so ICE
never completes.) Then, with the guest's own apt and tools over ssh:

  install    apt-get installs the .deb and mosquitto from the guest's cache, offline
  start      systemctl start rtcam (Type=notify: returns once rtcam sent READY=1); the
             hardened unit lets it open /dev/video0, reach the broker and write its DTLS
             certificate into StateDirectory=
  viewer     an aiortc viewer on the host, through the guest's mosquitto, receives vivid's
             colour bars (the device's ICE candidate is rewritten to the forwarded port on
             127.0.0.1; the device then sees the host as a peer-reflexive candidate)
  journald   journalctl -o json has the viewer's events with their span (SPAN_NAME) and the
             session id in a span field (F_ID=<id>)
  security   systemd-analyze security rtcam: overall exposure <= 2.0
  watchdog   kill -STOP the main process: systemd's watchdog aborts it and Restart= starts a
             new one, active again, with the cached DTLS certificate
  stop       systemctl stop: a retained `offline` on the status topic, clean exit

Prints a table of the timings. Any failure exits non-zero naming the check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "tests/e2e"))
sys.path.insert(0, str(REPO / "tests/vm"))
import paho.mqtt.client as mqtt  # noqa: E402
from vmtest import BARS, C_TOLERANCE, Y_TOLERANCE, bar_samples  # noqa: E402
from viewer import FrameRecord, Viewer, ViewerAuth, now_ms  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from rtcam_auth import issue_credential, public_b64  # noqa: E402

DEVICE = "vmtest"
GUEST_UDP_PORT = 50000
# Signed mode, as shipped: this run's owner key is the one the device trusts; the viewer gets
# a credential from it and learns the device key from the retained status (first use).
OWNER = Ed25519PrivateKey.generate()
# The service's configuration in the guest: vivid's webcam input, the guest's mosquitto, one
# fixed UDP port for ICE (forwarded from the host), the DTLS certificate in StateDirectory=.
CONFIG = f"""\
[device]
id = "{DEVICE}"

[capture]
source = "v4l2"
device = "/dev/video0"
format = "YU12"
width = 320
height = 180
fps = 30

[encoder]
bitrate = 300000

[webrtc]
bind_addresses = ["0.0.0.0"]
udp_port_min = {GUEST_UDP_PORT}
udp_port_max = {GUEST_UDP_PORT}
certificate_path = "/var/lib/rtcam/dtls.pem"

[mqtt]
host = "127.0.0.1"
port = 1883

[auth]
mode = "signed"
identity_key_path = "/var/lib/rtcam/identity.pem"
owner_keys = ["{public_b64(OWNER)}"]
"""
MOSQUITTO_CONF = "listener 1883 0.0.0.0\nallow_anonymous true\n"


def die(msg: str) -> None:
    print(f"systemd_vm: FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    """The VM: qemu, its console log, and ssh into it."""

    def __init__(self, cache: Path, work: Path, timeout_s: int) -> None:
        self.cache, self.work, self.timeout_s = cache, work, timeout_s
        self.ssh_port = free_port(socket.SOCK_STREAM)
        self.mqtt_port = free_port(socket.SOCK_STREAM)
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.console = work / "console.log"
        self.proc: subprocess.Popen | None = None

    def boot(self) -> None:
        overlay = self.work / "disk.qcow2"
        overlay.unlink(missing_ok=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.cache / "base.img"), str(overlay)],
            check=True,
        )
        fwd = (
            f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,"
            f"hostfwd=tcp:127.0.0.1:{self.mqtt_port}-:1883,"
            f"hostfwd=udp:127.0.0.1:{self.udp_port}-:{GUEST_UDP_PORT}"
        )
        cmd = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
            "-smp", "2", "-m", "1024", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.console}", "-monitor", "none",
            "-kernel", str(self.cache / "vmlinuz"), "-initrd", str(self.cache / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 quiet panic=-1",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-nic", f"user,model=virtio-net-pci,{fwd}",
        ]
        print("systemd_vm: " + " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(
            ["timeout", "--kill-after=10", str(self.timeout_s)] + cmd,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )

    def ssh_args(self) -> list[str]:
        return [
            "ssh", "-q", "-p", str(self.ssh_port), "-i", str(self.cache / "id_ed25519"),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=10", "root@127.0.0.1",
        ]

    def run(self, command: str, check: bool = True, timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess:
        if self.proc is not None and self.proc.poll() is not None:
            die(f"qemu exited ({self.proc.returncode}) before `{command}`; console: {self.console_tail()}")
        r = subprocess.run(self.ssh_args() + [command], input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            die(f"guest: `{command}` exited {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def wait_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                die(f"qemu exited ({self.proc.returncode}) during boot; console: {self.console_tail()}")
            r = subprocess.run(self.ssh_args() + ["true"], capture_output=True, timeout=30)
            if r.returncode == 0:
                return
            time.sleep(2)
        die(f"no ssh into the guest within {timeout:.0f} s; console: {self.console_tail()}")

    def put(self, local: Path, remote: str) -> None:
        with local.open("rb") as f:
            r = subprocess.run(self.ssh_args() + [f"cat > {remote}"], stdin=f, capture_output=True, timeout=120)
        if r.returncode != 0:
            die(f"copying {local} to the guest failed: {r.stderr.decode(errors='replace')}")

    def show(self, *props: str) -> dict[str, str]:
        out = self.run(f"systemctl show rtcam -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def console_tail(self) -> str:
        try:
            return "\n" + "".join(self.console.read_text(errors="replace").splitlines(keepends=True)[-30:])
        except OSError:
            return "(no console log)"

    def shutdown(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run(self.ssh_args() + ["systemctl poweroff"], capture_output=True, timeout=30)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ForwardedViewer(Viewer):
    """Viewer whose idea of the device's address is the hostfwd port on 127.0.0.1, and which
    keeps the last decoded picture (vivid's colour bars, not rtcam's test pattern)."""

    def __init__(self, *a, udp_port: int, **kw) -> None:
        super().__init__(*a, decode=False, **kw)
        self.udp_port = udp_port
        self.last_yuv = None
        self.rewritten: list[str] = []

    def _rewrite(self, line: str) -> str:
        # candidate:<foundation> <component> udp <priority> <address> <port> typ host ...
        parts = line.split()
        if len(parts) > 7 and parts[2].lower() == "udp" and parts[5] == str(GUEST_UDP_PORT):
            self.rewritten.append(f"{parts[4]}:{parts[5]} -> 127.0.0.1:{self.udp_port}")
            parts[4], parts[5] = "127.0.0.1", str(self.udp_port)
        return " ".join(parts)

    async def _add_candidate(self, cand: dict | None) -> None:
        # Trickled candidates, after the signed envelope was opened and checked (signed
        # mode); the unsigned form is rewritten in `_on_out` below.
        if cand is not None and cand.get("candidate") and not cand.get("_rewritten"):
            line = cand["candidate"]
            cand = {
                **cand,
                "candidate": ("candidate:" if line.startswith("candidate:") else "")
                + self._rewrite(line.removeprefix("candidate:")),
                "_rewritten": True,
            }
        await super()._add_candidate(cand)

    def _on_out(self, topic: str, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
        except ValueError:
            msg = None
        if isinstance(msg, dict) and msg.get("type") == "candidate" and isinstance(msg.get("candidate"), dict):
            c = msg["candidate"]
            if c.get("candidate"):
                c["candidate"] = ("candidate:" if c["candidate"].startswith("candidate:") else "") + self._rewrite(
                    c["candidate"].removeprefix("candidate:")
                )
            payload = json.dumps(msg).encode()
        elif isinstance(msg, dict) and msg.get("type") == "answer" and isinstance(msg.get("sdp"), str):
            msg["sdp"] = "\r\n".join(
                "a=candidate:" + self._rewrite(l[len("a=candidate:"):]) if l.startswith("a=candidate:") else l
                for l in msg["sdp"].split("\r\n")
            )
            payload = json.dumps(msg).encode()
        super()._on_out(topic, payload)

    async def _recv_video(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            arrival = now_ms()
            if self.t_first_frame_ms is None:
                self.t_first_frame_ms = arrival
            self.last_yuv = (frame.to_ndarray(format="yuv420p"), frame.width, frame.height)
            self.frames.append(FrameRecord(None, None, arrival, False, False, frame.width, frame.height))
            self._frame_event.set()


class StatusWatch:
    """Host-side MQTT subscriber of the device's retained status topic."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"systemd-vm-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"rtcam/{DEVICE}/status", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            with self.lock:
                self.messages.append((time.monotonic(), json.loads(msg.payload)))
        except ValueError:
            pass

    def wait_for(self, status: str, since: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for t, m in self.messages:
                    if t >= since and m.get("status") == status:
                        return t
            time.sleep(0.1)
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def watch_vivid(guest: Guest, timings: dict, results: dict) -> str:
    viewer_key = Ed25519PrivateKey.generate()
    now = int(time.time())
    credential = issue_credential(
        OWNER,
        audience=[DEVICE],
        viewer_public=public_b64(viewer_key),
        scope="view control admin",
        iat=now,
        exp=now + 3600,
        jti=f"vm-{os.urandom(6).hex()}",
        ns=None,
        sub="systemd-vm-viewer",
    )
    v = ForwardedViewer(
        "127.0.0.1",
        guest.mqtt_port,
        DEVICE,
        udp_port=guest.udp_port,
        auth=ViewerAuth(viewer_key, credential),
    )
    t0 = time.monotonic()
    try:
        await v.start(timeout=60)
    except Exception as e:  # noqa: BLE001 -- report and fail with the context
        die(f"viewer: no connection through the forwarded ports: {e!r}; rewritten candidates {v.rewritten}, "
            f"states {v.connection_states}, errors {v.errors}")
    timings["viewer connected (offer to DTLS + data channel)"] = time.monotonic() - t0
    results["ICE candidate"] = ", ".join(v.rewritten) or "none rewritten"
    # vivid writes status text over the top of its picture; its OSD control turns it off,
    # through rtcam's own control path (the data channel).
    reply = await v.command("set-control", {"name": "osd_text_mode", "value": 2}, timeout=15)
    if reply.get("ok") is not True:
        die(f"set-control osd_text_mode: {reply}")
    await v.wait_frames(60, timeout=90)
    timings["60 frames received"] = time.monotonic() - t0
    yuv, w, h = v.last_yuv
    bad, worst_y, worst_c = [], 0.0, 0.0
    for (name, ey, eu, ev), (y, u, vv) in zip(BARS, bar_samples(yuv, w, h)):
        worst_y = max(worst_y, abs(y - ey))
        worst_c = max(worst_c, abs(u - eu), abs(vv - ev))
        if abs(y - ey) > Y_TOLERANCE * 2 or abs(u - eu) > C_TOLERANCE * 2 or abs(vv - ev) > C_TOLERANCE * 2:
            bad.append(f"{name}: Y'CbCr {y:.0f},{u:.0f},{vv:.0f} != {ey},{eu},{ev}")
    if bad:
        die("the viewer's picture is not vivid's colour bars: " + "; ".join(bad))
    # wait_frames(60) may return with exactly 60: the rate over the intervals there are.
    n = min(60, len(v.frames) - 1)
    span = (v.frames[-1].arrival_ms - v.frames[-1 - n].arrival_ms) / 1000
    if n < 1 or span <= 0:
        die(f"viewer: {len(v.frames)} frames, no interval to measure a frame rate over")
    results["viewer"] = (f"{len(v.frames)} frames {w}x{h}, {n / span:.1f} fps over the last {n}, "
                         f"colour bars ok (max |dY| {worst_y:.0f}, |dC| {worst_c:.0f}; tolerance doubled for H.264 at 300 kbit/s)")
    session = v.session
    await v.bye()
    return session


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--deb", type=Path, required=True)
    p.add_argument("--timeout", type=int, default=900)
    a = p.parse_args()
    work = a.cache / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timings: dict[str, float] = {}
    results: dict[str, str] = {}
    guest = Guest(a.cache, work, a.timeout)
    t_all = time.monotonic()
    try:
        t = time.monotonic()
        guest.boot()
        guest.wait_ssh(300)
        timings["boot to ssh (TCG)"] = time.monotonic() - t
        r = guest.run("ps -p 1 -o comm=; uname -r; systemctl is-system-running --wait || true", timeout=180)
        pid1, kernel, system_state = (r.stdout.split("\n") + ["", "", ""])[:3]
        if pid1.strip() != "systemd":
            die(f"PID 1 is {pid1!r}, not systemd")
        results["guest"] = f"Debian 12, kernel {kernel}, PID 1 {pid1}, system {system_state}"
        guest.run("test -c /dev/video0 && modinfo -F description vivid")

        t = time.monotonic()
        guest.put(a.deb, f"/root/{a.deb.name}")
        r = guest.run("DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                      f"/root/{a.deb.name} mosquitto 2>&1", timeout=300)
        print("  guest apt: " + "\n  guest apt: ".join(r.stdout.strip().splitlines()[-4:]), flush=True)
        guest.run(f"cat > /etc/mosquitto/conf.d/rtcam-vm-test.conf <<'EOF'\n{MOSQUITTO_CONF}EOF\nsystemctl restart mosquitto")
        enabled = guest.run("systemctl is-enabled rtcam", check=False).stdout.strip()
        active = guest.run("systemctl is-active rtcam", check=False).stdout.strip()
        if enabled != "enabled" or active != "inactive":
            die(f"after install rtcam.service is {enabled}/{active}, expected enabled/inactive (not started until configured)")
        timings["apt-get install (offline) + mosquitto listener"] = time.monotonic() - t
        results["install"] = f"{a.deb.name} + mosquitto by the guest's apt; rtcam.service enabled, not started"

        guest.run(f"cat > /etc/rtcam/rtcam.toml <<'EOF'\n{CONFIG}EOF")
        guest.run("rtcam check-config --config /etc/rtcam/rtcam.toml >/dev/null")
        watch = StatusWatch(guest.mqtt_port)
        t = time.monotonic()
        guest.run("systemctl start rtcam", timeout=180)
        timings["systemctl start -> READY=1 (active)"] = time.monotonic() - t
        s = guest.show("ActiveState", "SubState", "StatusText", "MainPID", "NRestarts", "WatchdogUSec", "Type")
        if s.get("ActiveState") != "active" or s.get("Type") != "notify":
            die(f"rtcam.service after start: {s}")
        if watch.wait_for("online", 0, 30) is None:
            die("no retained `online` on the status topic after start")
        results["ready"] = f"is-active: active ({s['SubState']}), Type=notify, StatusText={s.get('StatusText')!r}, WatchdogUSec={s.get('WatchdogUSec')}"
        results["dev"] = guest.run("ls -l /dev/video0; id rtcam").stdout.strip().replace("\n", "; ")
        cert = guest.run("stat -c '%U %a %s' /var/lib/rtcam/dtls.pem", check=False).stdout.strip()
        if not cert.startswith("rtcam 600 "):
            die(f"StateDirectory: /var/lib/rtcam/dtls.pem is {cert or 'missing'}, expected owned by rtcam, mode 600")
        results["state"] = f"/var/lib/rtcam/dtls.pem: owner, mode, bytes = {cert}"

        session = asyncio.run(watch_vivid(guest, timings, results))

        r = guest.run("journalctl -u rtcam -o json --no-pager")
        entries = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
        # tracing-journald gives each event its spans' names (SPAN_NAME) and fields (F_<NAME>):
        # the viewer's events carry its session span and, in one of its fields, the session id.
        def span_field(e: dict) -> str | None:
            return next((k for k, v in e.items() if k.startswith("F_") and v == session), None)

        ours = [e for e in entries if e.get("SPAN_NAME") and span_field(e)]
        if not ours:
            fields = sorted({k for e in entries for k in e if not k.startswith("_")})
            die(f"journald: no rtcam entry in a span with the session id {session} among {len(entries)} (fields seen: {fields})")
        sample = ours[0]
        results["journald"] = (f"{len(ours)} entries of session {session} with SPAN_NAME={sample['SPAN_NAME']}, "
                               f"{span_field(sample)}={session}; e.g. PRIORITY={sample.get('PRIORITY')} "
                               f"TARGET={sample.get('TARGET')} MESSAGE={sample.get('MESSAGE')!r}")
        # A normal session (start, one viewer, bye) logs nothing at WARN (4) or worse.
        loud = sorted({e.get("MESSAGE", "")[:90] for e in entries if e.get("_COMM") == "rtcam" and int(e.get("PRIORITY", 6)) <= 4})
        if loud:
            die(f"rtcam logged {len(loud)} distinct WARN/ERROR lines in a normal session: " + " | ".join(loud))
        results["WARN/ERROR lines"] = "none"

        r = guest.run("systemd-analyze security rtcam --no-pager")
        m = re.search(r"Overall exposure level for rtcam\.service: ([0-9.]+) (\S+)", r.stdout)
        if not m:
            die(f"systemd-analyze security: no overall level in:\n{r.stdout[-2000:]}")
        if float(m.group(1)) > 2.0:
            die(f"systemd-analyze security rtcam: {m.group(1)} {m.group(2)} > 2.0:\n{r.stdout}")
        results["security"] = f"systemd-analyze security: {m.group(1)} {m.group(2)}"

        before = guest.show("MainPID", "NRestarts", "WatchdogUSec")
        old_pid = before["MainPID"]
        t = time.monotonic()
        guest.run(f"kill -STOP {old_pid}")
        new_pid = None
        while time.monotonic() - t < 150:
            s = guest.show("MainPID", "ActiveState", "SubState", "NRestarts")
            if s["MainPID"] not in ("0", old_pid) and s["ActiveState"] == "active" and s["SubState"] == "running":
                new_pid = s["MainPID"]
                break
            time.sleep(1)
        if new_pid is None:
            die(f"watchdog: rtcam (pid {old_pid}, SIGSTOPped) was not replaced within 150 s: {s}")
        timings["kill -STOP -> restarted and READY again"] = time.monotonic() - t
        log = guest.run(f"journalctl -u rtcam --no-pager -o cat --since=-5min | grep -iE 'watchdog|abort|killing|scheduled restart' || true").stdout
        if "watchdog timeout" not in log.lower():
            die(f"watchdog: the journal does not show a watchdog timeout:\n{log}")
        results["watchdog"] = (f"pid {old_pid} stopped -> pid {new_pid}, NRestarts {before['NRestarts']} -> {s['NRestarts']}; "
                               + " | ".join(l.strip() for l in log.splitlines()[:3]))
        cached = guest.run(f"journalctl _PID={new_pid} --no-pager -o cat | grep -c 'using cached DTLS certificate' || true").stdout.strip()
        if cached in ("", "0"):
            die("after the restart rtcam did not reuse its cached DTLS certificate (StateDirectory=)")

        t = time.monotonic()
        guest.run("systemctl stop rtcam", timeout=60)
        timings["systemctl stop"] = time.monotonic() - t
        if watch.wait_for("offline", t, 20) is None:
            die("no `offline` on the status topic after systemctl stop")
        s = guest.show("ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
        if s.get("Result") != "success":
            die(f"systemctl stop: the service did not exit cleanly: {s}")
        results["stop"] = f"retained offline published; Result={s['Result']}, ExecMainStatus={s['ExecMainStatus']}"
        watch.close()
        retained = StatusWatch(guest.mqtt_port)
        if retained.wait_for("offline", 0, 10) is None:
            die("the retained status after stop is not offline")
        retained.close()
    finally:
        try:
            if guest.proc is not None and guest.proc.poll() is None:
                journal = subprocess.run(guest.ssh_args() + ["journalctl -b --no-pager -o short-monotonic"],
                                         capture_output=True, text=True, timeout=60)
                (work / "journal.txt").write_text(journal.stdout)
        except Exception:  # noqa: BLE001 -- diagnostics only
            pass
        guest.shutdown()
    timings["total"] = time.monotonic() - t_all
    print("\nsystemd_vm: results")
    for k, v in results.items():
        print(f"  {k:22} {v}")
    print("systemd_vm: timings")
    for k, v in timings.items():
        print(f"  {k:48} {v:7.1f} s")
    print(f"systemd_vm: journal of the guest: {work / 'journal.txt'}, console: {guest.console}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
