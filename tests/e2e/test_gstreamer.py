"""End-to-end tests with GStreamer's webrtcbin as the viewer: a WebRTC stack that is neither
rtcam's nor aiortc's, on the same MQTT signaling (docs/protocol.md §4).

The media half runs in gst_peer.py under Debian's Python (GStreamer's bindings come from
Debian); signaling and signing stay here, in the `Viewer` of viewer.py. The offer is the one
webrtcbin makes by itself (one receive-only H.264 transceiver, the `control` data channel),
its candidates trickle after it (webrtcbin gathers after the offer), and video is checked
frame by frame against the test pattern's stamps, as for aiortc.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import HOST
from pattern import decode_frame
from test_stream import assert_stream, athread, run, stop, window
from viewer import FrameRecord, Viewer, ViewerError, now_ms

SYSTEM_PYTHON = "/usr/bin/python3"
PEER = Path(__file__).with_name("gst_peer.py")
GST_PACKAGES = (
    "python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0 "
    "gir1.2-nice-0.1 gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
    "gstreamer1.0-plugins-bad gstreamer1.0-nice gstreamer1.0-libav"
)


def require_gstreamer() -> None:
    """Fail (never skip) naming what is missing: tests/run.sh installs all of it."""
    if shutil.which(SYSTEM_PYTHON) is None:
        pytest.fail(f"{SYSTEM_PYTHON} missing (Debian's python3)", pytrace=False)
    probe = (
        "import gi\n"
        "for ns in ('Gst', 'GstSdp', 'GstWebRTC'): gi.require_version(ns, '1.0')\n"
        "gi.require_version('Nice', '0.1')\n"
        "from gi.repository import Gst, Nice\n"
        "Gst.init(None)\n"
        "need = ['webrtcbin', 'nicesrc', 'sctpenc', 'rtph264depay', 'h264parse', "
        "'avdec_h264', 'videoconvert', 'appsink']\n"
        "print(' '.join(e for e in need if Gst.ElementFactory.find(e) is None))\n"
    )
    r = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    missing = r.stdout.strip()
    if r.returncode != 0 or missing:
        pytest.fail(
            f"GStreamer for the webrtcbin viewer is missing ({missing or r.stderr.strip()[-300:]});"
            f" install: apt-get install --no-install-recommends {GST_PACKAGES}",
            pytrace=False,
        )


class GstViewer(Viewer):
    """A `Viewer` whose peer connection is webrtcbin in a gst_peer.py process."""

    def __init__(
        self,
        *args,
        workdir: Path,
        bundle_policy: str = "max-bundle",
        data_channel: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.bundle_policy = bundle_policy
        self.data_channel = data_channel
        self.frames_path = workdir / f"gst-{self.session}.yuv"
        self.proc: asyncio.subprocess.Process | None = None
        self.peer_errors: list[str] = []
        self.states: list[tuple[str, str]] = []
        self.local_candidates: list[dict] = []
        self.answered = False
        self._connected = asyncio.Event()
        self._offer: asyncio.Future | None = None
        self._frames_file = None

    # ---- the child process ----------------------------------------------------------

    async def _tell(self, cmd: str, **data) -> None:
        self.proc.stdin.write((json.dumps({"cmd": cmd, **data}) + "\n").encode())
        await self.proc.stdin.drain()

    async def _read_events(self) -> None:
        offered = False
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                return
            event = json.loads(line)
            kind = event.pop("event")
            if kind == "offer":
                self.offer_sdp = event["sdp"]
                self.t_offer_ms = now_ms()
                assert not offered, "webrtcbin made a second offer"
                await self.send({"v": 1, "type": "offer", "sdp": self.offer_sdp})
                offered = True
                self._offer.set_result(self.offer_sdp)
            elif kind == "candidate":
                # webrtcbin gathers after its offer is made, so this comes after it; the
                # mid is the offer's first m-line's (BUNDLE: one transport).
                cand = event["candidate"]
                cand["sdpMid"] = self._mid(cand["sdpMLineIndex"])
                self.local_candidates.append(cand)
                assert offered, "webrtcbin gave a candidate before its offer"
                await self.send({"v": 1, "type": "candidate", "candidate": cand})
            elif kind == "frame":
                self._on_frame(event)
            elif kind == "dc-open":
                self._dc_open.set()
            elif kind == "dc-message":
                self._on_dc_message(event["text"])
            elif kind == "state":
                self.states.append((event["ice"], event["connection"]))
                if event["connection"] == "connected":
                    if self.t_connected_ms is None:
                        self.t_connected_ms = now_ms()
                    self._connected.set()
            elif kind == "error" and not self.closed:
                # (Tearing the pipeline down may fail the SCTP association: not the session's.)
                self.peer_errors.append(event["message"])

    def _mid(self, mline_index: int) -> str | None:
        mids = [ln[6:] for ln in (self.offer_sdp or "").split("\r\n") if ln.startswith("a=mid:")]
        return mids[mline_index] if mline_index < len(mids) else None

    def _on_frame(self, event: dict) -> None:
        width, height = event["width"], event["height"]
        size = width * height * 3 // 2
        if self._frames_file is None:
            self._frames_file = open(self.frames_path, "rb")
        self._frames_file.seek(event["index"] * size)
        raw = self._frames_file.read(size)
        arrival = event["t_ms"]
        if self.t_first_frame_ms is None:
            self.t_first_frame_ms = arrival
        if len(raw) < size:
            rec = FrameRecord(None, None, arrival, False, False, width, height, ["short frame"])
        else:
            yuv = np.frombuffer(raw, dtype=np.uint8).reshape(height * 3 // 2, width)
            r = decode_frame(yuv, width, height)
            rec = FrameRecord(r.seq, r.ts, arrival, r.crc_ok, r.pattern_ok, width, height, r.problems)
        self.frames.append(rec)
        self._frame_event.set()

    # ---- Viewer's hooks ---------------------------------------------------------------

    def _remote_candidate(self, cand: dict | None) -> None:
        if self.answered:
            self._tasks.append(asyncio.ensure_future(self._tell("candidate", candidate=cand)))
        else:
            self._pending_candidates.append(cand)

    async def start(self, timeout: float = 20.0, wait_connected: bool = True, **_ignored) -> None:
        await self._connect_signaling(timeout)
        self._offer = asyncio.get_running_loop().create_future()
        self.proc = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON,
            str(PEER),
            "--bundle-policy",
            self.bundle_policy,
            "--frames",
            str(self.frames_path),
            "--local-address",
            HOST,
            *([] if self.data_channel else ["--no-data-channel"]),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._tasks.append(asyncio.ensure_future(self._read_events()))
        await asyncio.wait_for(self._offer, timeout)
        answer = await asyncio.wait_for(self._answer, timeout)
        await self._tell("answer", sdp=answer["sdp"])
        self.answered = True
        pending, self._pending_candidates = self._pending_candidates, []
        for cand in pending:
            await self._tell("candidate", candidate=cand)
        if wait_connected:
            left = max(1.0, timeout - (now_ms() - self.t_offer_ms) / 1000)
            try:
                await asyncio.wait_for(self._connected.wait(), left)
            except TimeoutError:
                raise AssertionError(
                    f"webrtcbin not connected within {left:.0f} s: states {self.states}, "
                    f"errors {self.peer_errors}"
                ) from None

    async def command_raw(self, text: str, reply_id=None, timeout: float = 5.0) -> dict:
        await asyncio.wait_for(self._dc_open.wait(), timeout)
        fut = asyncio.get_running_loop().create_future()
        self._replies[json.dumps(reply_id)] = fut
        await self._tell("dc-send", text=text)
        return await asyncio.wait_for(fut, timeout)

    async def close(self, send_bye: bool = False) -> None:
        if self.closed:
            return
        # Viewer's own: the bye, the reader and other tasks, MQTT (there is no aiortc pc).
        await super().close(send_bye)
        if self.proc is not None and self.proc.returncode is None:
            try:
                await self._tell("stop")
                self.proc.stdin.close()
                await asyncio.wait_for(self.proc.wait(), 10)
            except (TimeoutError, ConnectionError):
                self.proc.kill()
                await self.proc.wait()
        if self._frames_file is not None:
            self._frames_file.close()
        self.frames_path.unlink(missing_ok=True)


def test_webrtcbin_plays_the_stream_and_talks_on_the_data_channel(cam, workdir):
    """webrtcbin with `max-bundle` (what §4 requires): video with valid stamps, a data-channel
    command round trip through GStreamer's SCTP, and a bye that frees the session."""
    require_gstreamer()
    seconds = 5

    async def body():
        v = GstViewer(HOST, cam.broker_port, cam.device, workdir=workdir)
        try:
            await v.start(timeout=30)
            await v.wait_frames(1, 15)
            t0 = now_ms()
            await asyncio.sleep(seconds)
            t1 = now_ms()
            reply, rtt = await v.ping(t=7)
            await athread(cam.wait_state, lambda s: s["viewers"] == 1, 5, "viewers == 1")
            await v.bye()
            await athread(cam.wait_state, lambda s: s["viewers"] == 0, 10, "viewers == 0 after bye")
            return v, t0, t1, reply, rtt
        finally:
            await stop(v)

    v, t0, t1, reply, rtt = run(body(), 90)
    assert not v.peer_errors, f"webrtcbin reported errors: {v.peer_errors}"
    assert v.local_candidates, "webrtcbin trickled no candidate"
    frames = window(v.frames, t0, t1)
    s = assert_stream(frames, seconds, 0.80, "webrtcbin viewer")
    assert reply == {"id": "1", "ok": True, "result": {"pong": True, "t": 7}}, reply
    print(
        f"webrtcbin: offer -> first frame {v.t_first_frame_ms - v.t_offer_ms:.0f} ms, "
        f"{s['crc_ok']} stamped frames in {seconds} s, latency {s.get('latency_ms')}, "
        f"data-channel ping {rtt:.1f} ms"
    )


def test_webrtcbin_default_bundle_policy_is_refused_naming_bundle(cam, workdir):
    """webrtcbin left at its default `bundle-policy` (none) offers one transport per m-line:
    §4 says the device refuses that with `bad-sdp`, and the reason names BUNDLE."""
    require_gstreamer()

    async def body():
        v = GstViewer(HOST, cam.broker_port, cam.device, workdir=workdir, bundle_policy="none")
        try:
            with pytest.raises(ViewerError) as refused:
                await v.start(timeout=20)
            return v, refused.value
        finally:
            await stop(v)

    v, err = run(body(), 60)
    assert "a=group:BUNDLE" not in (v.offer_sdp or ""), "webrtcbin bundled anyway"
    assert err.code == "bad-sdp", err.reply
    assert "BUNDLE" in (err.reply or {}).get("reason", ""), err.reply


def test_webrtcbin_video_only_offer_without_bundle_group_plays(cam, workdir):
    """webrtcbin at its default `bundle-policy` with no data channel offers the video section
    alone and no BUNDLE group: valid (§4 asks for a group only with more than one section),
    so it plays, and the answer bundles nothing the offer did not."""
    require_gstreamer()

    async def body():
        v = GstViewer(
            HOST,
            cam.broker_port,
            cam.device,
            workdir=workdir,
            data_channel=False,
            bundle_policy="none",
        )
        try:
            await v.start(timeout=30)
            await v.wait_frames(30, 15)
            return v
        finally:
            await stop(v)

    v = run(body(), 60)
    assert "m=application" not in v.offer_sdp, v.offer_sdp
    assert "a=group:BUNDLE" not in v.offer_sdp, v.offer_sdp
    assert "a=group:BUNDLE" not in v.answer_sdp, v.answer_sdp
    assert not v.peer_errors, f"webrtcbin reported errors: {v.peer_errors}"
    assert sum(1 for f in v.frames if f.crc_ok) >= 25, f"frames: {len(v.frames)}"
