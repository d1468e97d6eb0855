"""A small network emulator for the end-to-end tests: namespaces, veths, a userspace delay/loss forwarder, tbf for rate.

This machine's kernel has no netem qdisc, so delay, jitter and loss are done by a forwarder
process (this file, `python netem.py forward ...`) that bridges two veths in a router
namespace with AF_PACKET sockets; the kernel's tbf qdisc on the router's viewer-side veth
limits the rate (its queue is the bottleneck buffer).

    device namespace (the tests: mosquitto, rtcam)
      d<i> 10.77.<i>.1 ── r<i>a ┐ router namespace: forwarder   ┌ r<i>b ── v<i> 10.77.<i>.2
                                └ (delay, jitter, loss each way) ┘ tbf       viewer namespace
      c<i> 10.78.<i>.1 ───────────────────────────────────────────────────── w<i> 10.78.<i>.2

Media (ICE binds only to 10.77.*) crosses the emulated path; MQTT signaling takes the direct
10.78.* pair, so TCP segmentation offload never meets the forwarder. Namespaces are held by
`unshare -n sleep` processes and reached with `nsenter -t <pid> -n`: nothing is named
globally, and everything disappears with those processes. Needs root (tests/run.sh runs the
tests as root inside `unshare -n`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")


class Netns:
    """A network namespace held by a sleeping process."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sleep", "infinity"], stdin=subprocess.DEVNULL
        )
        # Wait until the holder is in its own namespace.
        own = os.readlink("/proc/self/ns/net")
        for _ in range(200):
            try:
                if os.readlink(f"/proc/{self.holder.pid}/ns/net") != own:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        else:
            raise RuntimeError("unshare -n did not create a network namespace")
        self.pid = self.holder.pid
        self.run("ip", "link", "set", "lo", "up")

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", *argv]

    def run(self, *argv: str) -> None:
        run(*self.argv(*argv))

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(5)


@dataclass
class Shape:
    """One direction of a path."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0


class Link:
    """An emulated path between the device namespace (this process) and a viewer namespace."""

    def __init__(
        self,
        index: int,
        workdir: Path,
        down: Shape,
        up: Shape,
        rate_kbit: int | None = None,
        queue_ms: int = 100,
    ) -> None:
        self.index = index
        self.device_ip = f"10.77.{index}.1"
        self.viewer_ip = f"10.77.{index}.2"
        self.control_device_ip = f"10.78.{index}.1"
        self.control_viewer_ip = f"10.78.{index}.2"
        self.queue_ms = queue_ms
        self.rate_kbit = rate_kbit
        self.router = Netns()
        self.viewer = Netns()
        self.forwarder: subprocess.Popen | None = None
        self.stats_path = workdir / f"forwarder-{index}.json"
        i = index
        try:
            # Media path: device <-> router <-> viewer.
            run("ip", "link", "add", f"d{i}", "type", "veth", "peer", "name", f"r{i}a")
            run("ip", "link", "add", f"v{i}", "type", "veth", "peer", "name", f"r{i}b")
            run("ip", "link", "set", f"r{i}a", "netns", str(self.router.pid))
            run("ip", "link", "set", f"r{i}b", "netns", str(self.router.pid))
            run("ip", "link", "set", f"v{i}", "netns", str(self.viewer.pid))
            run("ip", "addr", "add", f"{self.device_ip}/24", "dev", f"d{i}")
            run("ip", "link", "set", f"d{i}", "up")
            for dev in (f"r{i}a", f"r{i}b"):
                self.router.run("ip", "link", "set", dev, "promisc", "on", "up")
            self.viewer.run("ip", "addr", "add", f"{self.viewer_ip}/24", "dev", f"v{i}")
            self.viewer.run("ip", "link", "set", f"v{i}", "up")
            # Control path: a plain veth pair.
            run("ip", "link", "add", f"c{i}", "type", "veth", "peer", "name", f"w{i}")
            run("ip", "link", "set", f"w{i}", "netns", str(self.viewer.pid))
            run("ip", "addr", "add", f"{self.control_device_ip}/24", "dev", f"c{i}")
            run("ip", "link", "set", f"c{i}", "up")
            self.viewer.run("ip", "addr", "add", f"{self.control_viewer_ip}/24", "dev", f"w{i}")
            self.viewer.run("ip", "link", "set", f"w{i}", "up")
            if rate_kbit is not None:
                self.router.run(*self._tbf("add", rate_kbit))
            self.forwarder = subprocess.Popen(
                self.router.argv(
                    sys.executable,
                    os.path.abspath(__file__),
                    "forward",
                    f"r{i}a",
                    f"r{i}b",
                    "--down",
                    json.dumps(down.__dict__),
                    "--up",
                    json.dumps(up.__dict__),
                    "--stats",
                    str(self.stats_path),
                    "--seed",
                    str(1000 + index),
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=open(workdir / f"forwarder-{index}.log", "wb"),
            )
            # Its sockets are bound once it says so: nothing sent before is lost to it (a
            # lost first ARP request would stall the path for the ARP retry second).
            ready, _, _ = select.select([self.forwarder.stdout], [], [], 10)
            if not ready or self.forwarder.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the forwarder of link {index} did not start")
        except Exception:
            self.close()
            raise

    def _tbf(self, verb: str, rate_kbit: int) -> list[str]:
        # Bucket: two full packets (so a rate, not a burst, is what passes); queue: queue_ms
        # at the rate, the path's buffer.
        return [
            "tc", "qdisc", verb, "dev", f"r{self.index}b", "root", "tbf",
            "rate", f"{rate_kbit}kbit", "burst", "3000", "latency", f"{self.queue_ms}ms",
        ]  # fmt: skip

    def set_rate(self, rate_kbit: int) -> None:
        """Changes the viewer-bound rate limit at once."""
        verb = "change" if self.rate_kbit is not None else "add"
        self.router.run(*self._tbf(verb, rate_kbit))
        self.rate_kbit = rate_kbit

    def viewer_argv(self, *argv: str) -> list[str]:
        return self.viewer.argv(*argv)

    def forwarder_stats(self) -> dict:
        """What the forwarder did (written when it stops)."""
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def close(self) -> None:
        if self.forwarder is not None and self.forwarder.poll() is None:
            self.forwarder.send_signal(signal.SIGTERM)
            try:
                self.forwarder.wait(5)
            except subprocess.TimeoutExpired:
                self.forwarder.kill()
                self.forwarder.wait(5)
        self.viewer.close()
        self.router.close()
        for dev in (f"d{self.index}", f"c{self.index}"):
            subprocess.run(["ip", "link", "del", dev], capture_output=True)


# --------------------------------------------------------------------------------------
# The forwarder (runs in the router namespace)
# --------------------------------------------------------------------------------------


def clear_udp_checksum(frame: bytes) -> bytes:
    """veths leave the UDP checksum to "hardware" (it is not computed on the way out), and a
    frame captured and re-sent raw arrives with a wrong one and is dropped. For IPv4 a zero
    UDP checksum means "none": the forwarder clears it."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return frame
    ihl = (frame[14] & 0x0F) * 4
    at = 14 + ihl + 6
    if len(frame) < at + 2:
        return frame
    return frame[:at] + b"\0\0" + frame[at + 2 :]


def forward(a: str, b: str, down: Shape, up: Shape, stats_path: str | None, seed: int) -> None:
    """Bridges interfaces `a` (device side) and `b` (viewer side): frames from a go to b after
    `down`'s delay, jitter and loss, frames from b go to a after `up`'s. Jitter never reorders
    (a frame never leaves before the one ahead of it). Runs until SIGTERM."""
    rng = random.Random(seed)
    socks = {}
    for name in (a, b):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((name, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
        socks[name] = s
    route = {a: (socks[b], down, "down"), b: (socks[a], up, "up")}
    stats = {d: {"frames": 0, "lost": 0, "sent": 0, "send_errors": 0} for d in ("down", "up")}
    last_due = {"down": 0.0, "up": 0.0}
    heap: list[tuple[float, int, str, bytes]] = []
    n = 0
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    by_fd = {s.fileno(): name for name, s in socks.items()}
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        timeout = max(0.0, heap[0][0] - now) if heap else 0.2
        try:
            readable, _, _ = select.select(list(socks.values()), [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for s in readable:
            name = by_fd[s.fileno()]
            dst, shape, direction = route[name]
            while True:
                try:
                    frame, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue  # our own transmission on this interface
                st = stats[direction]
                st["frames"] += 1
                if shape.loss and rng.random() < shape.loss:
                    st["lost"] += 1
                    continue
                jitter = rng.uniform(-shape.jitter_ms, shape.jitter_ms) if shape.jitter_ms else 0
                due = max(now + (shape.delay_ms + jitter) / 1000.0, last_due[direction])
                last_due[direction] = due
                n += 1
                heapq.heappush(heap, (due, n, direction, clear_udp_checksum(frame)))
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, direction, frame = heapq.heappop(heap)
            dst = route[a if direction == "down" else b][0]
            try:
                dst.send(frame)
                stats[direction]["sent"] += 1
            except OSError:
                # ENOBUFS: the tbf queue (the bottleneck buffer) is full: a drop, as on a link.
                stats[direction]["send_errors"] += 1
    if stats_path:
        Path(stats_path).write_text(json.dumps(stats))


def probe(to: str, count: int, interval_ms: float) -> dict:
    """UDP echo probes to `to` (host:port): round trips of those answered, and how many were."""
    host, port = to.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, int(port)))
    sent: dict[int, float] = {}
    rtts = []
    deadline = time.monotonic() + count * interval_ms / 1000 + 2.0
    n = 0
    next_send = time.monotonic()
    while time.monotonic() < deadline:
        now = time.monotonic()
        if n < count and now >= next_send:
            sent[n] = now
            s.send(n.to_bytes(4, "big") + b"x" * 96)
            n += 1
            next_send += interval_ms / 1000
        readable, _, _ = select.select([s], [], [], 0.001)
        if readable:
            data = s.recv(2048)
            i = int.from_bytes(data[:4], "big")
            if i in sent:
                rtts.append((time.monotonic() - sent.pop(i)) * 1000)
    return {"sent": count, "answered": len(rtts), "rtts_ms": rtts}


def sink(bind: str, seconds: float) -> dict:
    """Counts UDP bytes arriving at `bind` (host:port) for `seconds` after the first one."""
    host, port = bind.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    s.settimeout(10)
    total, first, last = 0, None, None
    while True:
        try:
            data = s.recv(65535)
        except TimeoutError:
            break
        now = time.monotonic()
        if first is None:
            first = now
            s.settimeout(1)
        if now - first > seconds:
            break
        total += len(data)
        last = now
    span = (last - first) if first and last else 0.0
    return {"bytes": total, "seconds": span}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("forward", help="bridge two interfaces with delay, jitter and loss")
    f.add_argument("a", help="device-side interface")
    f.add_argument("b", help="viewer-side interface")
    f.add_argument("--down", default="{}", help='JSON: {"delay_ms":..,"jitter_ms":..,"loss":..}')
    f.add_argument("--up", default="{}")
    f.add_argument("--stats", default=None, help="write counters here on exit")
    f.add_argument("--seed", type=int, default=1)
    pr = sub.add_parser("probe", help="UDP echo probes; prints JSON")
    pr.add_argument("to")
    pr.add_argument("--count", type=int, default=100)
    pr.add_argument("--interval-ms", type=float, default=10)
    sk = sub.add_parser("sink", help="count UDP bytes; prints JSON")
    sk.add_argument("bind")
    sk.add_argument("--seconds", type=float, default=3)
    a = p.parse_args(argv)
    if a.cmd == "forward":
        forward(a.a, a.b, Shape(**json.loads(a.down)), Shape(**json.loads(a.up)), a.stats, a.seed)
    elif a.cmd == "probe":
        print(json.dumps(probe(a.to, a.count, a.interval_ms)))
    else:
        print(json.dumps(sink(a.bind, a.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
