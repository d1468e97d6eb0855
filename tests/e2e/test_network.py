"""Adaptive streaming through emulated networks (issue 15; docs/protocol.md §5.3).

Each scenario runs twice in the same test, with `webrtc.adaptation` on and then off, against a
fresh rtcam streaming the noisy test pattern at `encoder.bitrate` = 2 Mbit/s, 640x480,
30 fps (openh264 spends up to about 1.6 Mbit/s on it there: what the fast viewers receive). Viewers are tests/e2e/viewer.py processes in
their own network namespaces behind tests/e2e/netem.py paths, offering and sending TWCC like a
browser. Everything is measured from the pattern's frame stamps (fps, freezes = gaps over
200 ms, capture-to-decode latency) and the RTP payload bytes received; the device's own encoded
frame rate (from its state) is the reference for frame rates, so a machine too loaded to encode
30 fps does not fail a viewer for frames that were never made.

Scenarios (durations chosen to fit CI: about seven minutes for all fourteen runs):
  (a) one viewer behind 600 kbit/s, 40 ms RTT: 25 s
  (b0) the unconstrained viewer of (b) alone, the reference for its bytes: 20 s
  (b0-720p) the same at 1280x720, for the CPU of adaptation against a camera-sized pipeline
    and the reference for (b-720p): 20 s
  (b) (a) plus a viewer on an unconstrained path: 25 s
  (b-720p) (b) at 1280x720, where the encoder fills encoder.bitrate, with four temporal
    layers: 25 s
  (c) 3 Mbit/s, then 500 kbit/s for 20 s, then 3 Mbit/s again: 8 + 20 + 12 s
  (d) 2 % random loss each way on a 3 Mbit/s, 40 ms RTT path: 20 s
  (d-720p) (d) at 1280x720, for the CPU of adaptation with retransmissions: 20 s
rtcam's CPU time is sampled per thread, so the capture/encode thread (the pipeline) and the
rest (network, SRTP, and with adaptation the estimator, pacer and layer choice) show apart.
The table of figures goes to the test output (`METRIC network.*`) and to
target/network-table.txt when the tests run from the repository (`scripts/network-table.sh`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import (
    HOST,
    REPO,
    Mosquitto,
    Monitor,
    Rtcam,
    free_port,
    record_metric,
    tail,
    viewer_auth,
)
from netem import Link, Shape
from viewer import latency_ms, percentile

CEILING = 2_000_000
FREEZE_MS = 200
WARMUP_S = 5.0
VIEWER_PY = str(Path(__file__).resolve().parent / "viewer.py")
TABLE: list[dict] = []
#: One entry per run: rtcam's CPU seconds, in all and in its capture/encode thread.
CPU: list[dict] = []


def require_root_netns() -> None:
    if os.geteuid() != 0:
        pytest.fail("the network emulation tests need root (tests/run.sh runs them as root)")
    for tool in ("unshare", "nsenter", "ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.fail(f"{tool} is missing: the network emulation tests need it")


class OpenMosquitto(Mosquitto):
    """The test broker, plus a listener on every address (the viewers' control paths)."""

    name = "mosquitto-net"

    def start(self) -> None:
        self.open_port = free_port()
        self.extra_conf = f"listener {self.open_port}\n"
        super().start()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    require_root_netns()
    workdir = tmp_path_factory.mktemp("net")
    broker = OpenMosquitto(workdir)
    broker.start()
    monitor = Monitor(broker.port)
    yield workdir, broker, monitor
    monitor.close()
    broker.stop()
    if TABLE:
        text = format_table(TABLE) + "\n\n" + format_cpu(CPU)
        print("\n" + text)
        out = REPO / "target"
        if out.is_dir():
            (out / "network-table.txt").write_text(text + "\n")


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


@dataclass
class Record:
    """One viewer's frames (seq, capture ts, arrival ms, crc ok) and byte samples."""

    name: str
    frames: list = field(default_factory=list)
    bytes: list = field(default_factory=list)
    twcc_feedback_sent: int = 0
    #: When the viewer stopped recording (Unix ms): no window may reach past it.
    end_ms: float = float("inf")

    def window(self, t0: float, t1: float) -> dict:
        t1 = min(t1, self.end_ms)
        good = [f for f in self.frames if f[3] and t0 <= f[2] <= t1]
        seconds = max(0.001, (t1 - t0) / 1000)
        arrivals = [t0] + [f[2] for f in good] + [t1]
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        freezes = [g for g in gaps if g > FREEZE_MS]
        lat = [latency_ms_of(f) for f in good]
        return {
            "fps": len(good) / seconds,
            "freezes": len(freezes),
            "freezes_per_min": len(freezes) / seconds * 60,
            "longest_freeze_ms": max(gaps) if gaps else (t1 - t0),
            "latency_p50_ms": percentile(lat, 50) if lat else None,
            "latency_p95_ms": percentile(lat, 95) if lat else None,
            "kbps": self.bytes_between(t0, t1) * 8 / seconds / 1000,
        }

    def bytes_at(self, t: float) -> float:
        samples = self.bytes
        if not samples:
            return 0.0
        if t <= samples[0][0]:
            return samples[0][1]
        for (ta, ba), (tb, bb) in zip(samples, samples[1:]):
            if ta <= t <= tb:
                return ba + (bb - ba) * (t - ta) / max(1e-9, tb - ta)
        return samples[-1][1]

    def bytes_between(self, t0: float, t1: float) -> float:
        return self.bytes_at(t1) - self.bytes_at(t0)

    def first_frame_ms(self) -> float | None:
        good = [f[2] for f in self.frames if f[3]]
        return good[0] if good else None


def latency_ms_of(f) -> float:
    class F:  # viewer.latency_ms takes a FrameRecord-like object
        arrival_ms, ts = f[2], f[1]

    return latency_ms(F)


def produced_fps(monitor: Monitor, topic: str, t0: float, t1: float) -> float:
    """Frames the device encoded per second between t0 and t1 (Unix ms), from its state."""
    states = [(t, s) for t, s in monitor.messages(topic, t0 - 2000) if "frames_encoded" in s]
    inside = [(t, s) for t, s in states if t0 - 1500 <= t <= t1 + 1500]
    if len(inside) < 2:
        return float("nan")
    (ta, a), (tb, b) = inside[0], inside[-1]
    return (b["frames_encoded"] - a["frames_encoded"]) / max(0.001, (tb - ta) / 1000)


def recovery_s(rec: Record, t_up: float, t_end: float, ok, hold_s: float = 5.0) -> float | None:
    """Seconds from t_up to the end of the last 1 s window (250 ms steps) failing ok(window)
    before ok holds for hold_s seconds on end (or to t_end, if that is at least 3 s): back,
    and staying back. A later, unrelated dip shows in the row's fps and freezes, not here."""
    step = 250.0
    t_end = min(t_end, rec.end_ms)
    since, t = t_up, t_up
    while t + 1000 <= t_end:
        if not ok(rec.window(t, t + 1000)):
            since = t + 1000
        elif t + 1000 - since >= hold_s * 1000:
            break
        t += step
    if t_end - since < min(hold_s, 3.0) * 1000:
        return None
    return (since - t_up) / 1000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ThreadCpu:
    """Samples the CPU time of each of a process's threads every 200 ms while a run lasts (a
    thread's figures vanish from /proc when it ends, and rtcam's capture thread ends when its
    last viewer goes)."""

    PIPELINE = "rtcam-capture"

    def __init__(self, pid: int):
        self.pid = pid
        self.last: dict[int, tuple[str, float]] = {}
        self.first: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        for tid in tids:
            try:
                comm = Path(f"/proc/{self.pid}/task/{tid}/comm").read_text().strip()
                # schedstat's first field: nanoseconds on a CPU (stat's utime/stime count in
                # 10 ms ticks, too coarse for the few ms a second adaptation costs).
                ns = int(Path(f"/proc/{self.pid}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            cpu = ns / 1e9
            self.first.setdefault(int(tid), cpu)
            self.last[int(tid)] = (comm, cpu)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.2)

    def stop(self) -> None:
        if not self._stop.is_set():
            self._sample()
            self._stop.set()
            self._thread.join()

    def pipeline_s(self) -> float:
        return sum(
            cpu - self.first[tid] for tid, (comm, cpu) in self.last.items() if comm == self.PIPELINE
        )

    def rest_s(self) -> float:
        """Every other thread (network, SRTP, signalling; with adaptation the estimator, pacer
        and layer choice)."""
        return sum(
            cpu - self.first[tid] for tid, (comm, cpu) in self.last.items() if comm != self.PIPELINE
        )


def fmt(v, digits=0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    cols = [
        ("scenario", "scenario", 0),
        ("adapt", "adapt", 0),
        ("viewer", "viewer", 0),
        ("window", "window", 0),
        ("produced", "produced fps", 1),
        ("fps", "fps", 1),
        ("freezes", "freezes", 0),
        ("freezes_per_min", "/min", 1),
        ("longest_freeze_ms", "longest ms", 0),
        ("latency_p50_ms", "p50 ms", 0),
        ("latency_p95_ms", "p95 ms", 0),
        ("kbps", "kbit/s", 0),
        ("extra", "notes", 0),
    ]
    cells = [[h for _, h, _ in cols]] + [
        [fmt(r.get(k), d) if k != "extra" else r.get("extra", "") for k, _, d in cols]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(cols))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    load = Path("/proc/loadavg").read_text().split()[:3]
    return "\n".join(lines) + f"\nload average at the end: {' '.join(load)}"


def format_cpu(runs: list[dict]) -> str:
    """rtcam's CPU per run, split into the capture/encode thread (the pipeline) and the rest
    (network, SRTP, and with adaptation the estimator, pacer and layer choice), and what
    adaptation adds to the rest relative to the pipeline. Only a scenario whose viewers get
    the same bytes on and off (b0, b0-720p, d, d-720p) compares like with like; in the others
    adaptation sends less and the difference is mostly that. A scenario run in several rounds
    (`RTCAM_NET_CPU_ROUNDS`) pairs each round's on and off runs and shows their mean too."""
    lines = [
        "CPU seconds over each run (rtcam: all threads / capture+encode thread / the rest):",
    ]
    for r in runs:
        rest = r["rest"]
        lines.append(
            f"  {r['scenario']:<7} {r['adapt']:<3} {r['total']:6.2f} / {r['pipeline']:6.2f} / "
            f"{rest:5.2f}  ({100 * r['total'] / max(0.001, r['seconds']):.1f} % of a core over {r['seconds']:.0f} s)"
        )
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        ons = [r for r in runs if r["scenario"] == scenario and r["adapt"] == "on"]
        offs = [r for r in runs if r["scenario"] == scenario and r["adapt"] == "off"]
        pairs = [(on, off) for on, off in zip(ons, offs) if on["pipeline"] > 0]
        if not pairs:
            continue
        extras = [(on["rest"] - off["rest"], on["pipeline"]) for on, off in pairs]
        if len(pairs) == 1:
            extra, pipeline = extras[0]
            lines.append(
                f"  {scenario}: adaptation on minus off, outside the pipeline: {extra:+.2f} s = "
                f"{100 * extra / pipeline:+.1f} % of the pipeline's CPU"
            )
            continue
        shares = [100 * extra / pipeline for extra, pipeline in extras]
        # The mean of the seconds over the mean pipeline: one noisy round weighs by its size.
        mean = 100 * sum(e for e, _ in extras) / sum(p for _, p in extras)
        lines.append(
            f"  {scenario}: adaptation on minus off, outside the pipeline, {len(pairs)} rounds: "
            + ", ".join(f"{x:+.1f}" for x in shares)
            + f" % of the pipeline's CPU; over all rounds {mean:+.1f} % "
            f"({sum(e for e, _ in extras) / len(extras):+.3f} s a round)"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Running a scenario
# --------------------------------------------------------------------------------------


@dataclass
class ViewerSpec:
    name: str
    down: Shape
    up: Shape
    rate_kbit: int | None


@dataclass
class Run:
    adaptation: bool
    t_start: float
    t_end: float
    records: dict
    produced: float
    cpu_s: float
    #: CPU seconds of the capture/encode thread (the pipeline) over the run.
    pipeline_cpu_s: float
    links: dict
    cam_log: Path
    #: (Unix ms, state) as the device published it.
    states: list


def run_scenario(
    net,
    name: str,
    adaptation: bool,
    viewers: list[ViewerSpec],
    seconds: float,
    events=(),
    size: tuple[int, int] = (640, 480),
    **config,
) -> Run:
    """Starts rtcam (with `config` as extra settings) and the viewers behind their links,
    applies `events` ((seconds, viewer, rate_kbit)) on time, and collects what the viewers
    recorded."""
    workdir, broker, monitor = net
    tag = f"{name}-{'on' if adaptation else 'off'}"
    links: dict[str, Link] = {}
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    cam = None
    threads = None
    try:
        for i, spec in enumerate(viewers, start=1):
            links[spec.name] = Link(i, workdir, spec.down, spec.up, spec.rate_kbit)
        cam = Rtcam(
            workdir,
            f"net-{tag}",
            broker.port,
            monitor,
            capture__test_pattern_noise=True,
            capture__width=size[0],
            capture__height=size[1],
            encoder__bitrate=CEILING,
            webrtc__adaptation=adaptation,
            webrtc__bind_addresses=[link.device_ip for link in links.values()],
            mqtt__state_min_interval_ms=500,
            **config,
        )
        cam.start()
        cpu0 = cpu_seconds(cam.popen.pid)
        threads = ThreadCpu(cam.popen.pid)
        t_start = time.time() * 1000
        for spec in viewers:
            link = links[spec.name]
            out = workdir / f"{tag}-{spec.name}.json"
            # Signed mode (the default): the viewer's credential and the device's pinned key.
            auth_file = workdir / f"{tag}-{spec.name}-auth.json"
            auth = viewer_auth(cam.device)
            auth_args = []
            if auth is not None:
                auth_file.write_text(auth.to_json())
                os.chmod(auth_file, 0o600)
                auth_args = ["--auth", str(auth_file)]
            argv = link.viewer_argv(
                sys.executable,
                VIEWER_PY,
                "--host", link.control_device_ip,
                "--port", str(broker.open_port),
                "--device", cam.device,
                "--ice-address", link.viewer_ip,
                "--feedback", "twcc",
                "--duration", str(seconds),
                "--timeout", "30",
                "--record", str(out),
                "--quiet",
                "--video-optional",  # without adaptation a slow path may show no picture at all
                *auth_args,
            )  # fmt: skip
            log = open(workdir / f"{tag}-{spec.name}.log", "wb")
            procs.append((spec.name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), out))
        for at, who, rate in sorted(events):
            delay = t_start / 1000 + at - time.time()
            if delay > 0:
                time.sleep(delay)
            links[who].set_rate(rate)
        for who, p, _ in procs:
            try:
                p.wait(seconds + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                pytest.fail(f"{tag}: viewer {who} did not finish", pytrace=False)
        t_end = time.time() * 1000
        cpu = cpu_seconds(cam.popen.pid) - cpu0
        threads.stop()
        records = {}
        for who, p, out in procs:
            if p.returncode != 0 or not out.exists():
                pytest.fail(
                    f"{tag}: viewer {who} failed (exit {p.returncode}):\n"
                    f"{tail(workdir / f'{tag}-{who}.log')}\n--- rtcam ---\n{tail(cam.log_path)}",
                    pytrace=False,
                )
            data = json.loads(out.read_text())
            # Windows end at the last byte sample (bytes after it were not counted).
            end = min([data["t_end_ms"]] + [t for t, _ in data["bytes"][-1:]])
            records[who] = Record(
                who, data["frames"], data["bytes"], data["twcc_feedback_sent"], end
            )
        first = min((r.first_frame_ms() or t_start) for r in records.values())
        produced = produced_fps(monitor, cam.topic_state, first + WARMUP_S * 1000, t_end)
        states = list(monitor.messages(cam.topic_state, t_start))
        CPU.append({"scenario": name, "adapt": "on" if adaptation else "off", "total": cpu, "pipeline": threads.pipeline_s(), "rest": threads.rest_s(), "seconds": (t_end - t_start) / 1000})  # fmt: skip
        return Run(
            adaptation, t_start, t_end, records, produced, cpu, threads.pipeline_s(), links,
            cam.log_path, states,
        )  # fmt: skip
    finally:
        if threads is not None:
            threads.stop()
        if cam is not None:
            cam.stop()
        for _, p, _ in procs:
            if p.poll() is None:
                p.kill()
        for link in links.values():
            link.close()


def row(scenario: str, run: Run, who: str, t0: float, t1: float, window: str, **extra) -> dict:
    w = run.records[who].window(t0, t1)
    r = {
        "scenario": scenario,
        "adapt": "on" if run.adaptation else "off",
        "viewer": who,
        "window": window,
        "produced": run.produced,
        **w,
        "extra": " ".join(f"{k}={v}" for k, v in extra.items()),
    }
    TABLE.append(r)
    record_metric(f"network.{scenario}.{r['adapt']}.{who}.{window}", {k: v for k, v in r.items() if k not in ("scenario", "adapt", "viewer", "window")})
    return r


def steady(run: Run, who: str) -> tuple[float, float]:
    """The window after the warm-up: from 5 s after the first frame to the end."""
    first = run.records[who].first_frame_ms() or run.t_start
    return first + WARMUP_S * 1000, run.t_end - 500


def encoder_target_kbps(run: Run, t0: float, t1: float) -> float | None:
    """The encoder's median target between t0 and t1 (Unix ms), from the device's state (the
    median: one overuse on a loaded machine lowers it for a second or two, not the policy)."""
    values = [s["encoder_bitrate"] for t, s in run.states if t0 <= t <= t1 and "encoder_bitrate" in s]
    return percentile(values, 50) / 1000 if values else None


def last_links(run: Run) -> list:
    for _, s in reversed(run.states):
        if s.get("links"):
            return s["links"]
    return []


def constrained(rate_kbit: int | None, loss: float = 0.0) -> tuple[Shape, Shape, int | None]:
    return Shape(delay_ms=20, loss=loss), Shape(delay_ms=20, loss=loss), rate_kbit


# --------------------------------------------------------------------------------------
# The emulator itself
# --------------------------------------------------------------------------------------

NETEM_PY = str(Path(__file__).resolve().parent / "netem.py")


def udp_echo(ip: str, stop: threading.Event) -> int:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 0))
    s.settimeout(0.1)

    def serve():
        while not stop.is_set():
            try:
                data, addr = s.recvfrom(2048)
            except TimeoutError:
                continue
            s.sendto(data, addr)
        s.close()

    threading.Thread(target=serve, daemon=True).start()
    return s.getsockname()[1]


def in_viewer_ns(link: Link, *args: str, timeout: float = 30) -> dict:
    """Runs `netem.py <args>` in the link's viewer namespace; returns its JSON."""
    r = subprocess.run(
        link.viewer_argv(sys.executable, NETEM_PY, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, f"netem.py {args[0]} failed: {r.stderr}"
    return json.loads(r.stdout)


def test_emulator_gives_the_delay_loss_and_rate_it_is_set_to(net):
    workdir, _, _ = net
    stop = threading.Event()
    links = []
    try:
        # 20 ms each way, no loss: the round trip is 40 ms (plus the forwarder's own time).
        delay = Link(1, workdir, Shape(delay_ms=20), Shape(delay_ms=20))
        links.append(delay)
        port = udp_echo(delay.device_ip, stop)
        in_viewer_ns(delay, "probe", f"{delay.device_ip}:{port}", "--count", "3")  # ARP
        p = in_viewer_ns(delay, "probe", f"{delay.device_ip}:{port}", "--count", "100")
        rtts = sorted(p["rtts_ms"])
        median = rtts[len(rtts) // 2]
        record_metric("network.emulator.rtt_ms", {"set": 40, "median": round(median, 1), "p95": round(percentile(rtts, 95), 1), "answered": p["answered"]})
        assert p["answered"] == 100, p
        assert 39 <= median <= 48, f"round trip median {median:.1f} ms, set to 40 ms"
        # 10 % loss each way: 19 % of round trips lost.
        lossy = Link(2, workdir, Shape(delay_ms=5, loss=0.1), Shape(delay_ms=5, loss=0.1))
        links.append(lossy)
        port = udp_echo(lossy.device_ip, stop)
        in_viewer_ns(lossy, "probe", f"{lossy.device_ip}:{port}", "--count", "3")  # ARP
        p = in_viewer_ns(lossy, "probe", f"{lossy.device_ip}:{port}", "--count", "600", "--interval-ms", "3")
        lost = 1 - p["answered"] / p["sent"]
        record_metric("network.emulator.round_trip_loss", {"set": 0.19, "measured": round(lost, 3)})
        assert 0.14 <= lost <= 0.24, f"round trip loss {lost:.3f}, set to 0.19"
        # tbf at 600 kbit/s: 1.2 Mbit/s offered, 600 kbit/s through.
        rated = Link(3, workdir, Shape(), Shape(), rate_kbit=600)
        links.append(rated)
        sink = subprocess.Popen(
            rated.viewer_argv(sys.executable, NETEM_PY, "sink", f"{rated.viewer_ip}:5000", "--seconds", "3"),
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
        import socket

        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        payload = b"r" * 1000
        t_end = time.monotonic() + 4
        next_send = time.monotonic()
        while time.monotonic() < t_end:
            s.sendto(payload, (rated.viewer_ip, 5000))
            next_send += 1028 * 8 / 1_200_000
            time.sleep(max(0.0, next_send - time.monotonic()))
        out, _ = sink.communicate(timeout=20)
        got = json.loads(out)
        kbps = got["bytes"] * 8 / got["seconds"] / 1000
        record_metric("network.emulator.rate_kbit", {"set": 600, "measured_udp_payload": round(kbps)})
        # UDP payload: 1000 of every 1042 bytes on the wire (Ethernet + IP + UDP headers).
        assert 0.85 * 600 * 1000 / 1042 <= kbps <= 1.1 * 600, f"{kbps:.0f} kbit/s through a 600 kbit/s tbf"
    finally:
        stop.set()
        for link in links:
            link.close()


# --------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------


def test_a_viewer_behind_600k_gets_a_steady_picture(net):
    down, up, rate = constrained(600)
    spec = [ViewerSpec("600k", down, up, rate)]
    results = {}
    for adaptation in (True, False):
        run = run_scenario(net, "a", adaptation, spec, 25)
        t0, t1 = steady(run, "600k")
        results[adaptation] = row("a", run, "600k", t0, t1, "after 5 s", cpu_s=round(run.cpu_s, 2))
        row("a", run, "600k", run.t_start, run.t_end, "whole run")
    on, off = results[True], results[False]
    assert on["fps"] >= 14 / 30 * on["produced"], on
    # "At most one freeze a minute": a 20 s window cannot tell one a minute from three, so it
    # may hold one (the table gives the rate; none was seen in five runs).
    assert on["freezes"] <= 1, on
    assert on["latency_p95_ms"] is not None and on["latency_p95_ms"] <= 400, on
    assert off["freezes"] >= 1 or off["fps"] < 14 / 30 * off["produced"], (
        f"without adaptation the 600 kbit/s viewer should freeze: {off}"
    )


#: The unconstrained viewer alone (b0), per adaptation setting: the reference for (b).
ALONE: dict[bool, dict] = {}
#: The same at 1280x720 (b0-720p), the reference for (b-720p).
ALONE_720P: dict[bool, dict] = {}


def test_b0_an_unconstrained_viewer_alone_gets_what_the_encoder_makes(net):
    """The reference for (b): the fast viewer with no slow one next to it. Without adaptation
    the encoder runs at encoder.bitrate all along, so what this viewer receives is what
    openh264 makes of the test pattern at that setting; with adaptation the policy must give
    the one unconstrained viewer the ceiling, and the viewer the same bytes."""
    specs = [ViewerSpec("fast", Shape(delay_ms=1), Shape(delay_ms=1), None)]
    for adaptation in (True, False):
        run = run_scenario(net, "b0", adaptation, specs, 20)
        t0, t1 = steady(run, "fast")
        target = encoder_target_kbps(run, t0, t1)
        r = row(
            "b0", run, "fast", t0, t1, "after 5 s",
            encoder_target_kbps=fmt(target), cpu_s=round(run.cpu_s, 2),
        )  # fmt: skip
        r["encoder_target_kbps"] = target
        ALONE[adaptation] = r
    on, off = ALONE[True], ALONE[False]
    assert on["fps"] >= 29 / 30 * on["produced"], on
    assert on["encoder_target_kbps"] is not None and on["encoder_target_kbps"] >= 0.95 * CEILING / 1000, on
    # The same bytes (1518-1535 kbit/s on and off in five runs); 15 % of margin for a one-off
    # overuse on a loaded machine.
    assert on["kbps"] >= 0.85 * off["kbps"], (on, off)


def cpu_rounds() -> int:
    """`RTCAM_NET_CPU_ROUNDS` (default 1): how many times the CPU scenarios run, on and off in
    turn, for a figure that one noisy run does not decide."""
    text = os.environ.get("RTCAM_NET_CPU_ROUNDS", "1")
    if not text.isdigit() or int(text) < 1:
        pytest.fail(f"RTCAM_NET_CPU_ROUNDS must be a whole number of at least 1, not {text!r}")
    return int(text)


def test_cpu_of_adaptation_next_to_a_720p_pipeline(net):
    """What adaptation costs against a pipeline of a camera's usual size: b0's viewer (same
    bitrate, so the same packets, feedback and pacing) at 1280x720, and (d)'s 2 % loss at
    1280x720 (retransmissions within their budget), adaptation on and off, in
    `RTCAM_NET_CPU_ROUNDS` rounds whose order of on and off alternates. The figures are the
    CPU table's `b0-720p` and `d-720p` rows; what is asserted is that the viewer got the stream
    every time (a benchmark prints the cost, a test does not time it)."""
    clear = [ViewerSpec("fast", Shape(delay_ms=1), Shape(delay_ms=1), None)]
    lossy = [ViewerSpec("2%", *constrained(3000, loss=0.02))]
    for i in range(cpu_rounds()):
        order = (True, False) if i % 2 == 0 else (False, True)
        for name, specs in (("b0-720p", clear), ("d-720p", lossy)):
            who = specs[0].name
            for adaptation in order:
                run = run_scenario(net, name, adaptation, specs, 20, size=(1280, 720))
                t0, t1 = steady(run, who)
                r = row(name, run, who, t0, t1, "after 5 s", cpu_s=round(run.cpu_s, 2))
                if name == "b0-720p":
                    ALONE_720P[adaptation] = r
                assert r["fps"] >= 25 / 30 * r["produced"], r
                assert r["kbps"] >= 0.5 * CEILING / 1000, r


def run_b(net, name: str, size: tuple[int, int], alone: dict[bool, dict], **config) -> dict:
    """(b) at `size` (and `config`): the 600 kbit/s viewer of (a) beside an unconstrained one,
    adaptation on and off; rows per viewer, the fast one's bytes against encoder.bitrate and against
    `alone` (the same viewer by itself, when that test ran). Returns the rows by (adaptation,
    viewer)."""
    down, up, rate = constrained(600)
    specs = [
        ViewerSpec("600k", down, up, rate),
        ViewerSpec("fast", Shape(delay_ms=1), Shape(delay_ms=1), None),
    ]
    results = {}
    for adaptation in (True, False):
        run = run_scenario(net, name, adaptation, specs, 25, size=size, **config)
        links = {l["viewer"]: l for l in last_links(run)}
        for who in ("600k", "fast"):
            t0, t1 = steady(run, who)
            w = run.records[who].window(t0, t1)
            notes = {"encoder_target_kbps": fmt(encoder_target_kbps(run, t0, t1))}
            if who == "fast":
                # The honest ratios: against encoder.bitrate, and against the same viewer
                # alone with the same adaptation setting (b0, when it ran).
                notes["of_configured"] = f"{w['kbps'] * 1000 / CEILING:.2f}"
                reference = alone.get(adaptation)
                if reference is not None:
                    notes["of_alone"] = f"{w['kbps'] / reference['kbps']:.2f}"
            results[(adaptation, who)] = row(
                name, run, who, t0, t1, "after 5 s", **notes, cpu_s=round(run.cpu_s, 2)
            )
        record_metric(f"network.{name}.{'on' if adaptation else 'off'}.links", list(links.values()))
    return results


def test_b_a_slow_viewer_does_not_hold_back_a_fast_one(net):
    results = run_b(net, "b", (640, 480), ALONE)
    fast, slow = results[(True, "fast")], results[(True, "600k")]
    fast_off, slow_off = results[(False, "fast")], results[(False, "600k")]
    # The fast viewer is not held back: every frame, and the bytes the encoder makes at its
    # ceiling. The reference for the bytes is the same viewer without adaptation (the encoder
    # at encoder.bitrate all along): openh264 on the test pattern makes about 1.5 Mbit/s of
    # payload at a 2 Mbit/s setting at this size, so "90 % of the configured bitrate" is
    # measured here against what the encoder delivers at that setting, and literally by
    # (b-720p), whose picture fills the setting (the table shows both figures).
    assert fast["fps"] >= 29 / 30 * fast["produced"], fast
    assert fast["kbps"] >= 0.9 * fast_off["kbps"], (fast, fast_off)
    # The slow one gets a moving picture from the same stream (its base layers), where without
    # adaptation it gets next to nothing. Its figures (about 6-7 fps, with freezes while it
    # tries the next layer) are in the table; what is asserted is the solid part.
    assert slow["fps"] >= 3 / 30 * slow["produced"], slow
    assert slow_off["fps"] < slow["fps"], (slow, slow_off)


def test_b_720p_the_fast_viewer_keeps_90_percent_of_the_configured_bitrate(net):
    """(b) at 1280x720, where openh264 spends all of encoder.bitrate on the noisy pattern
    (b0-720p's viewer receives about 2.0 Mbit/s): the target's "90 % of the configured
    bitrate" taken literally, with the 600 kbit/s viewer beside.

    With four temporal layers, the setting docs/hardware.md gives for viewers this far apart:
    with the default three, the base layer alone (7.5 fps of a 2 Mbit/s 720p stream, about
    0.8 Mbit/s) does not fit the slow viewer's 600 kbit/s, and it got 0.6-2.1 fps at about
    2 s latency (the README's figures); with four, its base layer is 3.75 fps of about a fifth
    of the stream. The policy is the same either way (with two viewers the better one sets
    the rate)."""
    results = run_b(net, "b-720p", (1280, 720), ALONE_720P, encoder__temporal_layers=4)
    fast, slow = results[(True, "fast")], results[(True, "600k")]
    slow_off = results[(False, "600k")]
    assert fast["fps"] >= 29 / 30 * fast["produced"], fast
    assert fast["kbps"] >= 0.9 * CEILING / 1000, fast
    # The slow one: most of its 3.75 fps base layer, where without adaptation it gets none.
    assert slow["fps"] >= 2 / 30 * slow["produced"], slow
    assert slow_off["fps"] < slow["fps"], (slow, slow_off)


def test_c_a_dip_to_500k_is_followed_and_the_frame_rate_back_within_5_s(net):
    down, up, _ = constrained(None)
    spec = [ViewerSpec("dip", down, up, 3000)]
    before, dip = 8.0, 20.0
    after = 12.0
    results, dips = {}, {}
    for adaptation in (True, False):
        run = run_scenario(
            net,
            "c",
            adaptation,
            spec,
            before + dip + after,
            events=[(before, "dip", 500), (before + dip, "dip", 3000)],
        )
        rec = run.records["dip"]
        t_down = run.t_start + before * 1000
        t_up = t_down + dip * 1000
        first = rec.first_frame_ms() or t_down
        pre = rec.window(first + 3000, t_down)
        full_fps = lambda w: w["fps"] >= 0.9 * run.produced  # noqa: E731
        full_rate = lambda w: w["fps"] >= 0.9 * run.produced and w["kbps"] >= 0.9 * pre["kbps"]  # noqa: E731
        fps_back = recovery_s(rec, t_up, run.t_end, full_fps)
        rate_back = recovery_s(rec, t_up, run.t_end, full_rate)
        # Where the time goes: the device's own estimate for the viewer (its state, every
        # 0.5-1 s) reaching the most the ceiling can use, apart from the encoder's response
        # and the viewer's windows.
        estimate_top = next(
            (
                (t - t_up) / 1000
                for t, s in run.states
                if t >= t_up
                and any(l["estimate_bps"] >= 0.95 * CEILING / 0.85 for l in s.get("links") or [])
            ),
            None,
        )
        tag = "on" if adaptation else "off"
        row("c", run, "dip", first + 3000, t_down, "3 Mbit/s before")
        dips[adaptation] = row("c", run, "dip", t_down, t_up, "500 kbit/s")
        r = row(
            "c",
            run,
            "dip",
            t_up,
            run.t_end,
            "3 Mbit/s after",
            fps_back_s=fmt(fps_back, 1),
            rate_back_s=fmt(rate_back, 1),
            estimate_top_s=fmt(estimate_top, 1),
            cpu_s=round(run.cpu_s, 2),
        )
        results[adaptation] = (r, fps_back, rate_back, pre)
    r, fps_back, rate_back, pre = results[True]
    during_on, during_off = dips[True], dips[False]
    # During the dip the picture keeps moving with adaptation and stops without it.
    assert during_on["fps"] >= 7 / 30 * during_on["produced"], during_on
    assert during_off["fps"] < during_on["fps"], (during_on, during_off)
    # Full frame rate within 5 s of the recovery.
    assert fps_back is not None and fps_back <= 5, f"full frame rate {fps_back} s after: {r}"
    # Full bit rate: the estimate climbs back by its ramp (2.2-4.5 s measured over six runs
    # on a loaded 2-core machine, within the 5 s target: see the README's performance
    # section); asserted is that it gets back within the 12 s after the dip, as a 5 s bound
    # this close to the measured worst would fail spuriously under load.
    assert rate_back is not None, (
        f"not back to the rate before the dip ({pre['kbps']:.0f} kbit/s) within "
        f"{after - 2:.0f} s of the recovery: {r}"
    )


def test_d_two_percent_loss_costs_no_long_freeze(net):
    down, up, rate = constrained(3000, loss=0.02)
    spec = [ViewerSpec("2%", down, up, rate)]
    results = {}
    for adaptation in (True, False):
        run = run_scenario(net, "d", adaptation, spec, 20)
        record_metric(f"network.d.{'on' if adaptation else 'off'}.links", last_links(run))
        t0, t1 = steady(run, "2%")
        results[adaptation] = row("d", run, "2%", t0, t1, "after 5 s", cpu_s=round(run.cpu_s, 2))
    on = results[True]
    assert on["longest_freeze_ms"] <= 1000, on
