"""Self-tests of the harness (no rtcam involved): pattern decoder, loopback ICE, broker.

If these fail, the rtcam tests that follow cannot be trusted.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import pytest
from aiortc import RTCPeerConnection, VideoStreamTrack
from aiortc.rtcrtpsender import RTCRtpSender

import pattern
from conftest import HOST
from viewer import MqttLink, rtc_configuration


def crc8_bytes(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def test_crc8_reference():
    assert crc8_bytes(b"123456789") == 0xF4  # CRC-8 (poly 7, init 0) check value
    for value in (0, 1, 0x12345678, 0xFFFFFFFF, 4_000_000_000):
        assert pattern.crc8(value) == crc8_bytes(value.to_bytes(4, "big"))


@pytest.mark.parametrize(
    "width,height", [(640, 480), (1280, 720), (320, 240), (1920, 1080), (250, 120)]
)
def test_pattern_round_trip(width, height):
    for seq, ts in [(0, 0), (1, 2), (123_456, 4_000_000_000), (0xFFFFFFFF, 7)]:
        r = pattern.decode_frame(pattern.render_frame(seq, ts, width, height), width, height)
        assert (r.seq, r.ts) == (seq, ts), r
        assert r.pattern_ok, r.problems


def test_pattern_geometry_follows_the_doc():
    # 640 wide: b = 16, box 64 px, moving 4 px per frame, wrapping at 640 - 64.
    assert pattern.cell_size(640) == 16 and pattern.box_size(640, 480) == 64
    assert [pattern.box_left(s, 640, 480) for s in (0, 1, 10, 144, 145)] == [0, 4, 40, 0, 4]
    # Small/odd frames: box limited by height/2 and kept even; bars by floor(8x/width).
    assert pattern.cell_size(250) == 6 and pattern.box_size(250, 100) == 24
    assert pattern.box_size(1920, 120) == 60 and pattern.box_left(7, 250, 100) == 10
    assert [pattern.bar_columns(k, 250)[0] for k in range(8)] == [0, 32, 63, 94, 125, 157, 188, 219]
    y = pattern.render_frame(10, 0)[:480]
    assert y[0, 0] == pattern.BLACK  # seq 10 -> top bit 0
    assert y[240 + 1, 41] == 128 and y[479, 639] == 16 and y[479, 0] == 180


def test_pattern_detects_corruption():
    f = pattern.render_frame(77, 99)
    f[0:16, 0:16] = 255 - f[0:16, 0:16]  # flip seq bit 39
    r = pattern.decode_frame(f, 640, 480)
    assert not r.crc_ok and not r.pattern_ok
    # Box in the wrong place for the seq: stamp fine, box check fails.
    g = pattern.render_frame(30, 99)
    g[: 2 * 16] = pattern.render_frame(20, 99)[: 2 * 16]  # stamp says 20, box drawn for 30
    r = pattern.decode_frame(g, 640, 480)
    assert r.crc_ok and r.seq == 20 and not r.box_ok, r
    # Wrong bar colours.
    h = pattern.render_frame(5, 5)
    h[480:600] = 128  # the whole U plane (320x240 = rows 480..600 of the packed array)
    assert not pattern.decode_frame(h, 640, 480).bars_ok


def test_pattern_survives_h264():
    """Encode synthetic frames with libx264 at 1 Mbit/s, decode, read them back."""
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = 640, 480, "yuv420p"
    enc.time_base = fractions.Fraction(1, 30)
    enc.bit_rate = 1_000_000
    enc.options = {"preset": "veryfast", "tune": "zerolatency"}
    dec = av.CodecContext.create("h264", "r")
    readings = []
    for seq in range(60):
        frame = av.VideoFrame.from_ndarray(
            pattern.render_frame(seq, 1000 + 33 * seq), format="yuv420p"
        )
        frame.pts = seq
        for packet in enc.encode(frame):
            for out in dec.decode(packet):
                readings.append(pattern.decode_frame(out.to_ndarray(format="yuv420p"), 640, 480))
    assert len(readings) >= 55
    bad = [r for r in readings if not r.pattern_ok]
    assert not bad, [(r.seq, r.problems) for r in bad[:5]]
    assert [r.seq for r in readings] == list(range(len(readings)))


def test_mosquitto_fixture(broker):
    async def body():
        loop = asyncio.get_running_loop()
        got = loop.create_future()
        link = MqttLink(HOST, broker.port, "e2e-selftest", loop)
        await link.connect()
        await link.subscribe("selftest/x", lambda t, p: got.done() or got.set_result(p))
        await link.publish("selftest/x", b"hello")
        try:
            return await asyncio.wait_for(got, 5)
        finally:
            link.close()

    assert asyncio.run(body()) == b"hello"


class PatternTrack(VideoStreamTrack):
    def __init__(self):
        super().__init__()
        self.seq = 0

    async def recv(self):
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(
            pattern.render_frame(self.seq, int(time.time() * 1000) % (1 << 32)), format="yuv420p"
        )
        frame.pts, frame.time_base = pts, time_base
        self.seq += 1
        return frame


def test_aiortc_loopback_h264():
    """Two aiortc peers over 127.0.0.1 (the aioice patch), H.264, pattern decoded."""

    async def body():
        a = RTCPeerConnection(rtc_configuration())
        b = RTCPeerConnection(rtc_configuration())
        t = a.addTransceiver(PatternTrack(), direction="sendonly")
        t.setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/H264"]
        )
        readings = []

        @b.on("track")
        def on_track(track):
            async def pump():
                while True:
                    f = await track.recv()
                    readings.append(
                        pattern.decode_frame(f.to_ndarray(format="yuv420p"), f.width, f.height)
                    )

            asyncio.ensure_future(pump())

        await a.setLocalDescription(await a.createOffer())
        cands = [ln for ln in a.localDescription.sdp.splitlines() if ln.startswith("a=candidate")]
        await b.setRemoteDescription(a.localDescription)
        await b.setLocalDescription(await b.createAnswer())
        await a.setRemoteDescription(b.localDescription)
        await asyncio.sleep(4)
        await a.close()
        await b.close()
        return cands, readings

    cands, readings = asyncio.run(body())
    assert cands and all(" 127.0.0.1 " in c for c in cands), cands
    assert len(readings) >= 60, f"only {len(readings)} frames over loopback in 4 s"
    assert sum(r.pattern_ok for r in readings) >= 0.95 * len(readings)
    seqs = [r.seq for r in readings if r.crc_ok]
    assert all(b > a for a, b in zip(seqs, seqs[1:]))
