"""aiortc viewer for rtcam, speaking only docs/protocol.md (v1).

Library use (inside an asyncio loop)::

    v = Viewer("127.0.0.1", 1883, "testcam")
    await v.start()                    # MQTT connect, offer, answer, ICE
    await v.wait_frames(30)
    reply = await v.command("ping")    # data channel `control`
    await v.bye()                      # or: v.die() in a subprocess, see ViewerProcess

CLI (one JSON object per line on stdout)::

    python viewer.py --port 1883 --device testcam --duration 10 [--no-bye] [--die-after S] \
        [--auth auth.json]

Signed mode (docs/protocol.md §9): with a `ViewerAuth` (viewer key, credential, the device
key to pin) the viewer signs every message it publishes (rtcam_auth.py, Python
`cryptography` + PyJWT, not rtcam's code), opens only device messages signed by the pinned
key, and ignores errors whose `ref` names an envelope it did not send. The tests' conftest
sets `default_auth`, so every Viewer signs unless told otherwise (`auth=None`: open mode).

Only loopback is ever used: aioice's host-address discovery is patched to return
127.0.0.1 (aioice skips 127.0.0.1 otherwise, so nothing would connect inside a
network namespace holding only `lo`), and no STUN/TURN server is configured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import secrets
import signal
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aioice.ice
import aiortc.codecs
import paho.mqtt.client as mqtt
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpHeaderExtensionParameters
from aiortc.sdp import candidate_from_sdp

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pattern import decode_frame
from rtcam_auth import (
    AuthError,
    ViewerSigner,
    load_private_key_pem,
    open_device_message,
    public_b64,
)

log = logging.getLogger("viewer")

# --------------------------------------------------------------------------------------
# Loopback-only ICE
# --------------------------------------------------------------------------------------

_ORIGINAL_GET_HOST_ADDRESSES = aioice.ice.get_host_addresses

# The one address ICE gathers: loopback, or the viewer's interface in a network emulation
# test (`--ice-address`, see tests/e2e/netem.py).
ICE_ADDRESS = "127.0.0.1"


def _loopback_host_addresses(use_ipv4: bool = True, use_ipv6: bool = False) -> list[str]:
    return [ICE_ADDRESS] if use_ipv4 else []


def patch_aioice_loopback() -> None:
    """Make aioice gather exactly one host candidate, on 127.0.0.1.

    aioice.Connection.gather_candidates() calls the module-global
    ``aioice.ice.get_host_addresses(use_ipv4=..., use_ipv6=...)``, so replacing the module
    attribute is enough. Fail loudly if a different aioice changed that contract.
    """
    params = list(inspect.signature(_ORIGINAL_GET_HOST_ADDRESSES).parameters)
    if params != ["use_ipv4", "use_ipv6"]:
        raise RuntimeError(
            f"aioice.ice.get_host_addresses has signature {params}; the loopback patch in "
            "tests/e2e/viewer.py needs updating for this aioice version"
        )
    aioice.ice.get_host_addresses = _loopback_host_addresses


patch_aioice_loopback()

# --------------------------------------------------------------------------------------
# Received RTP byte counting (aiortc's inbound-rtp stats have no bytesReceived)
# --------------------------------------------------------------------------------------

_ORIGINAL_HANDLE_RTP = RTCRtpReceiver._handle_rtp_packet


async def _counting_handle_rtp(self, packet, arrival_time_ms):
    self.rtcam_payload_bytes = getattr(self, "rtcam_payload_bytes", 0) + len(packet.payload)
    twcc = getattr(self, "rtcam_twcc", None)
    if twcc is not None and packet.extensions.transport_sequence_number is not None:
        twcc.on_packet(packet.ssrc, packet.extensions.transport_sequence_number, arrival_time_ms)
    return await _ORIGINAL_HANDLE_RTP(self, packet, arrival_time_ms)


def patch_rtp_byte_counter() -> None:
    """Count every RTP payload byte each receiver is handed, for bitrate measurements, and
    record transport-wide sequence numbers for the TWCC feedback (see TwccFeedback)."""
    params = list(inspect.signature(_ORIGINAL_HANDLE_RTP).parameters)
    if params != ["self", "packet", "arrival_time_ms"]:
        raise RuntimeError(
            f"RTCRtpReceiver._handle_rtp_packet has signature {params}; the byte counter in "
            "tests/e2e/viewer.py needs updating for this aiortc version"
        )
    RTCRtpReceiver._handle_rtp_packet = _counting_handle_rtp


patch_rtp_byte_counter()


# --------------------------------------------------------------------------------------
# Congestion feedback: what the viewer offers and sends back
# --------------------------------------------------------------------------------------

TWCC_URI = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
FEEDBACK_MODES = ("remb", "twcc", "none")


@contextlib.contextmanager
def offered_feedback(mode: str):
    """aiortc's video codecs and header extensions as a viewer of this `mode` offers them.

    "remb": aiortc as it is (abs-send-time, goog-remb: aiortc's receive-side estimator sends
    REMB). "twcc": like a browser (transport-wide-cc extension and feedback, which TwccFeedback
    sends; no REMB). "none": neither (the device has only receiver reports). aiortc reads these
    module globals in createOffer and setRemoteDescription, so both run inside this block.
    """
    if mode not in FEEDBACK_MODES:
        raise ValueError(f"feedback mode {mode!r} is not one of {FEEDBACK_MODES}")
    exts = aiortc.codecs.HEADER_EXTENSIONS["video"]
    codecs = aiortc.codecs.CODECS["video"]
    saved = (exts[:], [c.rtcpFeedback[:] for c in codecs])
    try:
        if mode != "remb":
            exts[:] = [e for e in exts if e.uri != ABS_SEND_TIME_URI]
            for c in codecs:
                c.rtcpFeedback = [f for f in c.rtcpFeedback if f.type != "goog-remb"]
        if mode == "twcc":
            exts.append(RTCRtpHeaderExtensionParameters(id=5, uri=TWCC_URI))
            for c in codecs:
                if not c.mimeType.endswith("/rtx"):
                    c.rtcpFeedback.append(RTCRtcpFeedback(type="transport-cc"))
        yield
    finally:
        exts[:] = saved[0]
        for c, fb in zip(codecs, saved[1]):
            c.rtcpFeedback = fb


class TwccPacket:
    """A transport-wide congestion control feedback packet (RTPFB FMT 15), as bytes."""

    def __init__(self, data: bytes):
        self.data = data

    def __bytes__(self) -> bytes:
        return self.data

    def __repr__(self) -> str:
        return f"TwccPacket({len(self.data)} bytes)"


class TwccFeedback:
    """Records arrivals by transport-wide sequence number and builds the feedback a browser
    sends (draft-holmer-rmcat-transport-wide-cc-extensions-01): every packet from the one after
    the last reported to the newest arrival, received or not, with arrival deltas in 250 us
    units against a reference time in 64 ms units."""

    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}  # unwrapped sequence number -> arrival ms
        self.last_seq: int | None = None  # newest, unwrapped
        self.next_seq: int | None = None  # first not yet reported
        self.media_ssrc = 0
        self.count = 0
        self.sent = 0

    def on_packet(self, ssrc: int, seq: int, arrival_ms: float) -> None:
        self.media_ssrc = ssrc
        if self.last_seq is None:
            unwrapped = seq
        else:
            delta = (seq - self.last_seq) & 0xFFFF
            unwrapped = self.last_seq + (delta if delta < 0x8000 else delta - 0x10000)
        self.last_seq = unwrapped if self.last_seq is None else max(self.last_seq, unwrapped)
        if self.next_seq is not None and unwrapped < self.next_seq:
            return  # already reported as lost
        self.arrivals.setdefault(unwrapped, arrival_ms)

    def build(self, sender_ssrc: int) -> bytes | None:
        if not self.arrivals:
            return None
        start = self.next_seq if self.next_seq is not None else min(self.arrivals)
        end = min(max(self.arrivals), start + 0xFFFF - 1)
        seqs = range(start, end + 1)
        arrivals = [self.arrivals.pop(s, None) for s in seqs]
        self.next_seq = end + 1
        first = next(a for a in arrivals if a is not None)
        reference = int(first // 64)  # 64 ms units
        previous = reference * 64.0
        symbols, deltas = [], b""
        for a in arrivals:
            if a is None:
                symbols.append(0)
                continue
            ticks = round((a - previous) * 4)  # 250 us units
            previous += ticks / 4
            if 0 <= ticks <= 255:
                symbols.append(1)
                deltas += struct.pack("!B", ticks)
            else:
                ticks = max(-32768, min(32767, ticks))
                symbols.append(2)
                deltas += struct.pack("!h", ticks)
        chunks = b""
        i = 0
        while i < len(symbols):  # run-length chunks: 0 | symbol (2 bits) | run (13 bits)
            run = 1
            while i + run < len(symbols) and symbols[i + run] == symbols[i] and run < 0x1FFF:
                run += 1
            chunks += struct.pack("!H", (symbols[i] << 13) | run)
            i += run
        body = struct.pack(
            "!IIHHI",
            sender_ssrc,
            self.media_ssrc,
            start & 0xFFFF,
            len(seqs),
            ((reference & 0xFFFFFF) << 8) | (self.count & 0xFF),
        )
        body += chunks + deltas
        body += b"\0" * (-len(body) % 4)
        self.count += 1
        self.sent += 1
        header = struct.pack("!BBH", 0x80 | 15, 205, len(body) // 4)
        return header + body


# A missing packet is waited for this long, then given up.
HOLE_GIVE_UP_MS = 400


def starts_keyframe(payload: bytes) -> bool:
    """True for an H.264 RTP payload (RFC 6184) that begins a keyframe: SPS, an IDR slice, or
    an aggregate or first fragment holding one (rtcam sends SPS and PPS before every IDR)."""
    if not payload:
        return False
    nal = payload[0] & 0x1F
    if nal in (5, 7):
        return True
    if nal == 24:  # STAP-A: 2-byte sizes, then NAL units
        i = 1
        while i + 2 < len(payload):
            size = int.from_bytes(payload[i : i + 2], "big")
            if payload[i + 2] & 0x1F in (5, 7):
                return True
            i += 2 + size
        return False
    if nal == 28 and len(payload) > 1:  # FU-A: start bit and the fragmented NAL's type
        return bool(payload[1] & 0x80) and payload[1] & 0x1F == 5
    return False


class BrowserLikeJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, giving up on a missing packet as a browser does.

    aiortc's own waits for a missing packet until 512 packets queue behind it and then keeps
    that backlog: one packet a path loses for good costs seconds of latency for the rest of
    the session (and the decoder, fed what follows the hole, falls further behind). Browsers
    wait a few hundred milliseconds for a retransmission, then stop decoding, ask for a
    keyframe and resume with it. This does the same: after HOLE_GIVE_UP_MS it empties the
    buffer, asks for a keyframe (PLI, and again every second) and takes packets again from the
    first one that starts a keyframe; the picture is frozen in between. On a path that loses
    nothing (loopback) it behaves exactly like aiortc's.
    """

    def __init__(self) -> None:
        super().__init__(capacity=512, is_video=True)
        self._hole_since: float | None = None
        self._waiting_since: float | None = None
        self._last_pli = 0.0
        self.holes_skipped = 0

    def _after_hole(self) -> int | None:
        """Offset of the first packet after the first missing one, if any waits there."""
        cap = self._capacity
        slots = [self._packets[(self._origin + i) % cap] is not None for i in range(cap)]
        if False not in slots:
            return None
        hole = slots.index(False)
        return next((i for i in range(hole, cap) if slots[i]), None)

    def add(self, packet):
        now = time.monotonic()
        if self._waiting_since is not None:
            if not starts_keyframe(packet.payload):
                pli = now - self._last_pli > 1.0
                if pli:
                    self._last_pli = now
                return pli, None
            self._waiting_since = None
            self._origin = None  # start over at this packet
        pli, frame = super().add(packet)
        after = None if frame is not None or self._origin is None else self._after_hole()
        if after is None:
            self._hole_since = None
            return pli, frame
        if self._hole_since is None:
            self._hole_since = now
        if (now - self._hole_since) * 1000 < HOLE_GIVE_UP_MS:
            return pli, frame
        self.remove(self._capacity)
        self._origin = None
        self._hole_since = None
        self._waiting_since = now
        self._last_pli = now
        self.holes_skipped += 1
        return True, None


def rtc_configuration(ice_servers: list[dict] | None = None) -> RTCConfiguration:
    """ice_servers: W3C RTCIceServer dicts (urls, username, credential), e.g. the device's
    `ice-servers` reply. None or []: none at all (aiortc otherwise adds stun.l.google.com,
    i.e. traffic that must not leave the test's namespaces). aiortc uses the first STUN and
    the first TURN URL it is given."""
    servers = [
        RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
        for s in ice_servers or []
    ]
    return RTCConfiguration(iceServers=servers)


def selected_pair(pc: RTCPeerConnection) -> dict | None:
    """The nominated ICE candidate pair of the video transport, as candidate types and
    addresses (aiortc keeps it in aioice's Connection; no public API exposes it)."""
    for t in pc.getTransceivers():
        ice = t.receiver.transport.transport if t.receiver.transport else None
        conn = getattr(ice, "_connection", None)
        nominated = getattr(conn, "_nominated", None)
        if not nominated:
            continue
        pair = nominated.get(1)
        if pair is None:
            continue
        lc, rc = pair.local_candidate, pair.remote_candidate
        return {
            "local": lc.type,
            "remote": rc.type,
            "local_address": f"{lc.host}:{lc.port}",
            "remote_address": f"{rc.host}:{rc.port}",
            # Every pair ICE tried so far, as "local type/remote type": state.
            "checks": [
                {
                    "local": p.local_candidate.type,
                    "remote": p.remote_candidate.type,
                    "state": p.state.name.lower(),
                }
                for p in getattr(conn, "_check_list", [])
            ],
        }
    return None


# --------------------------------------------------------------------------------------
# MQTT (paho v2 API, network thread bridged into asyncio)
# --------------------------------------------------------------------------------------


class MqttLink:
    """A paho client whose acks and messages are delivered to an asyncio loop."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        loop: asyncio.AbstractEventLoop,
        login: tuple[str, str] | None = None,
    ):
        self.host, self.port, self.loop = host, port, loop
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        if login is not None:
            self.client.username_pw_set(*login)
        self._lock = threading.Lock()
        self._acks: dict[tuple[str, int], asyncio.Future] = {}
        self._early: set[tuple[str, int]] = set()
        self._connected: asyncio.Future = loop.create_future()
        self.handlers: dict[str, Any] = {}  # topic -> callable(payload bytes), run in loop
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    # paho thread -> loop
    def _resolve(self, fut: asyncio.Future, value: Any) -> None:
        if not fut.done():
            fut.set_result(value)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.loop.call_soon_threadsafe(self._resolve, self._connected, reason_code)

    def _ack(self, kind: str, mid: int, value: Any) -> None:
        with self._lock:
            fut = self._acks.pop((kind, mid), None)
            if fut is None:
                self._early.add((kind, mid))
                return
        self.loop.call_soon_threadsafe(self._resolve, fut, value)

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        self._ack("sub", mid, reason_code_list)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._ack("pub", mid, reason_code)

    def _on_message(self, client, userdata, msg):
        handler = self.handlers.get(msg.topic)
        if handler is None:
            for pattern, h in self.handlers.items():
                if mqtt.topic_matches_sub(pattern, msg.topic):
                    handler = h
                    break
        if handler is not None:
            self.loop.call_soon_threadsafe(handler, msg.topic, msg.payload)

    async def _wait_ack(self, kind: str, mid: int, timeout: float) -> Any:
        with self._lock:
            if (kind, mid) in self._early:
                self._early.discard((kind, mid))
                return None
            fut = self.loop.create_future()
            self._acks[(kind, mid)] = fut
        return await asyncio.wait_for(fut, timeout)

    async def connect(self, timeout: float = 10.0) -> None:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        rc = await asyncio.wait_for(self._connected, timeout)
        if rc != 0 and getattr(rc, "is_failure", False):
            raise ConnectionError(f"MQTT connect to {self.host}:{self.port} refused: {rc}")

    async def subscribe(self, topic: str, handler, qos: int = 1, timeout: float = 10.0) -> None:
        self.handlers[topic] = handler
        rc, mid = self.client.subscribe(topic, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"MQTT subscribe {topic}: {mqtt.error_string(rc)}")
        await self._wait_ack("sub", mid, timeout)

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 10.0):
        info = self.client.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"MQTT publish {topic}: {mqtt.error_string(info.rc)}")
        if qos > 0:
            await self._wait_ack("pub", info.mid, timeout)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


# --------------------------------------------------------------------------------------
# Viewer
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Signed mode
# --------------------------------------------------------------------------------------


@dataclass
class ViewerAuth:
    """What a viewer signs with: its own key, an owner's credential bound to that key, and
    the device key it pins (None: learn it from the retained status, trust on first use)."""

    key: Ed25519PrivateKey
    credential: str
    device_key: str | None = None

    def to_json(self) -> str:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return json.dumps(
            {"key_pem": pem, "credential": self.credential, "device_key": self.device_key}
        )

    @staticmethod
    def from_json(text: str) -> ViewerAuth:
        d = json.loads(text)
        return ViewerAuth(
            load_private_key_pem(d["key_pem"].encode()), d["credential"], d.get("device_key")
        )

    @property
    def public(self) -> str:
        return public_b64(self.key)


# Set by the tests' conftest: device id -> the auth a Viewer uses when given none.
default_auth: Callable[[str], ViewerAuth | None] | None = None
# The broker login viewers use ((username, password), None: anonymous), for ACL tests.
broker_login: tuple[str, str] | None = None


class ViewerError(Exception):
    def __init__(self, message: str, code: str | None = None, reply: dict | None = None):
        super().__init__(message)
        self.code, self.reply = code, reply


@dataclass
class FrameRecord:
    seq: int | None
    ts: int | None
    arrival_ms: float
    crc_ok: bool
    pattern_ok: bool
    width: int
    height: int
    problems: list[str] = field(default_factory=list)


def strip_candidates(sdp: str) -> tuple[str, list[dict]]:
    """Turn a complete offer into a trickle-ICE one.

    Removes the candidate lines (returned as RTCIceCandidateInit dicts in order) and
    end-of-candidates, and sets ports/addresses to the `9` / `0.0.0.0` placeholders a
    browser uses before gathering.
    """
    lines, found, mids = [], [], []
    mline = -1
    for line in sdp.splitlines():
        if line.startswith("m="):
            mline += 1
            mids.append(None)
            parts = line.split(" ")
            parts[1] = "9"
            line = " ".join(parts)
        elif line.startswith("a=mid:") and mline >= 0:
            mids[mline] = line[len("a=mid:") :]
        elif line.startswith("c=IN IP4 ") and mline >= 0:
            line = "c=IN IP4 0.0.0.0"
        if line.startswith("a=candidate:"):
            found.append((mline, line[2:]))
            continue
        if line == "a=end-of-candidates":
            continue
        lines.append(line)
    cands = [{"candidate": c, "sdpMid": mids[i], "sdpMLineIndex": i} for i, c in found]
    return "\r\n".join(lines) + "\r\n", cands


def now_ms() -> float:
    return time.time() * 1000.0


def new_session_id() -> str:
    return secrets.token_hex(8)


class Viewer:
    def __init__(
        self,
        host: str,
        port: int,
        device: str,
        prefix: str = "rtcam",
        session: str | None = None,
        decode: bool = True,
        keep_problems: int = 20,
        feedback: str = "remb",
        auth: ViewerAuth | None | str = "default",
    ):
        """auth: "default" takes `default_auth(device)`; None is open mode (unsigned)."""
        if feedback not in FEEDBACK_MODES:
            raise ValueError(f"feedback {feedback!r} is not one of {FEEDBACK_MODES}")
        self.feedback = feedback
        self.twcc: TwccFeedback | None = None
        self.jitter_buffer: BrowserLikeJitterBuffer | None = None
        self.host, self.port, self.device, self.prefix = host, port, device, prefix
        if auth == "default":
            auth = default_auth(device) if default_auth is not None else None
        self.auth: ViewerAuth | None = auth
        self.session = session or new_session_id()
        self.decode = decode
        self.keep_problems = keep_problems
        base = f"{prefix}/{device}/session/{self.session}"
        self.topic_in, self.topic_out = f"{base}/in", f"{base}/out"
        self.topic_status = f"{prefix}/{device}/status"
        self.signer = (
            ViewerSigner(self.auth.key, self.auth.credential, self.topic_in) if self.auth else None
        )
        self.device_key: str | None = self.auth.device_key if self.auth else None
        # Signed mode: device messages that failed the check (code, raw payload), and errors
        # whose `ref` names someone else's envelope (ignored, as docs/protocol.md §9.6 says).
        self.rejected: list[tuple[str, bytes]] = []
        self.foreign_errors: list[dict] = []
        self.frames: list[FrameRecord] = []
        self.decode_failures = 0
        self.messages: list[tuple[float, dict | None, bytes]] = []  # everything on `out`
        self.errors: list[dict] = []
        self.byes: list[dict] = []
        self.remote_candidates: list[dict | None] = []
        self.answer_sdp: str | None = None
        self.offer_sdp: str | None = None
        self.t_offer_ms: float | None = None
        self.t_answer_ms: float | None = None
        self.t_connected_ms: float | None = None
        self.t_first_frame_ms: float | None = None
        self.t_ice_servers_ms: float | None = None
        self.ice_servers: list[dict] | None = None  # as the device sent them
        self.connection_states: list[str] = []
        self.pc: RTCPeerConnection | None = None
        self.dc = None
        self.mqtt: MqttLink | None = None
        self._answer: asyncio.Future | None = None
        self._dc_open: asyncio.Event | None = None
        self._frame_event: asyncio.Event | None = None
        self._msg_event: asyncio.Event | None = None
        self._replies: dict[str, asyncio.Future] = {}
        self.unmatched_replies: list[dict] = []
        self._pending_candidates: list[dict | None] = []
        self._tasks: list[asyncio.Task] = []
        self._next_id = 1
        self.closed = False

    # ---- signaling ------------------------------------------------------------------

    def _on_out(self, topic: str, payload: bytes) -> None:
        text: bytes | str = payload
        if self.auth is not None:
            try:
                text = open_device_message(payload, topic, self.device_key, int(now_ms()))
            except AuthError as e:
                # Not from the device (a forged answer, someone else's junk): dropped.
                self.rejected.append((e.code, payload[:300]))
                log.info("%s: device message rejected: %s", self.session, e)
                return
        try:
            msg = json.loads(text)
        except ValueError:
            msg = None
        self.messages.append((now_ms(), msg, payload))
        self._msg_event.set()
        if not isinstance(msg, dict):
            log.warning("%s: non-JSON message on out: %r", self.session, payload[:200])
            return
        kind = msg.get("type")
        if (
            kind == "error"
            and self.signer is not None
            and "ref" in msg
            and (msg["ref"] not in self.signer.sent_sigs or msg.get("code") == "replayed")
        ):
            # An error about someone else's message on our topic (another envelope's sig, or
            # null for an unsigned one), or about a copy of one of ours that went through
            # already (`replayed`): not a problem of this session, carry on (§9.6). No
            # `ref`: about the session itself.
            self.foreign_errors.append(msg)
            return
        if kind == "answer":
            self.t_answer_ms = now_ms()
            self.answer_sdp = msg.get("sdp")
            if not self._answer.done():
                self._answer.set_result(msg)
        elif kind == "candidate":
            cand = msg.get("candidate")
            self.remote_candidates.append(cand)
            self._remote_candidate(cand)
        elif kind == "error":
            self.errors.append(msg)
            if self._answer is not None and not self._answer.done():
                self._answer.set_exception(
                    ViewerError(
                        f"device refused offer: {msg.get('code')}: {msg.get('reason')}",
                        code=msg.get("code"),
                        reply=msg,
                    )
                )
        elif kind == "bye":
            self.byes.append(msg)
            if self._answer is not None and not self._answer.done():
                self._answer.set_exception(ViewerError(f"device sent bye: {msg}", reply=msg))

    def _remote_candidate(self, cand: dict | None) -> None:
        """A device candidate: to the peer connection once it has the answer, else held."""
        if self.pc is not None and self.pc.remoteDescription is not None:
            self._tasks.append(asyncio.ensure_future(self._add_candidate(cand)))
        else:
            self._pending_candidates.append(cand)

    async def _add_candidate(self, cand: dict | None) -> None:
        if cand is None:
            await self.pc.addIceCandidate(None)
            return
        line = cand.get("candidate") or ""
        if not line:  # empty string: end-of-candidates in browser form
            return
        line = line.removeprefix("candidate:")
        c = candidate_from_sdp(line)
        c.sdpMid = cand.get("sdpMid")
        c.sdpMLineIndex = cand.get("sdpMLineIndex")
        await self.pc.addIceCandidate(c)

    def seal(self, msg: dict | str | bytes, topic: str | None = None, cred: bool | None = None) -> str:
        """The signed envelope of `msg` (any text) for `topic` (default: this session's `in`)."""
        text = msg.decode() if isinstance(msg, bytes) else msg
        return self.signer.seal(text, topic=topic or self.topic_in, cred=cred)

    async def send(
        self, msg: dict | str | bytes, topic: str | None = None, signed: bool | None = None
    ) -> None:
        """Publish `msg` on `topic` (default: `in`); signed when the viewer has auth (the
        first offer carries the credential), unless `signed=False`."""
        if signed is None:
            signed = self.signer is not None
        if signed:
            payload: str | bytes = self.seal(msg, topic)
        else:
            payload = msg if isinstance(msg, (str, bytes)) else json.dumps(msg)
        await self.mqtt.publish(topic or self.topic_in, payload)

    async def _learn_device_key(self, timeout: float) -> None:
        """Trust on first use: the key in the device's retained status (docs/protocol.md §9.6)."""
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_status(topic, payload):
            try:
                status = json.loads(payload)
            except ValueError:
                return
            if isinstance(status, dict) and status.get("key") and not got.done():
                got.set_result(status["key"])

        await self.mqtt.subscribe(self.topic_status, on_status)
        self.device_key = await asyncio.wait_for(got, timeout)

    async def wait_message(self, predicate, timeout: float) -> dict:
        """Wait for a message on `out` (already received or future) matching predicate."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for _, msg, _raw in self.messages[seen:]:
                if isinstance(msg, dict) and predicate(msg):
                    return msg
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            self._msg_event.clear()
            try:
                await asyncio.wait_for(self._msg_event.wait(), left)
            except TimeoutError:
                pass

    # ---- lifecycle --------------------------------------------------------------------

    async def start(
        self,
        timeout: float = 20.0,
        wait_connected: bool = True,
        trickle: bool = False,
        ask_ice_servers: bool = False,
        without_turn: bool = False,
    ) -> None:
        """Offer, apply the answer, wait for ICE/DTLS and the data channel.

        trickle=False: the offer carries all candidates (aiortc gathers before offering).
        trickle=True: the offer carries none; they follow as `candidate` messages, then
        `null`, sent right after the offer (before the answer arrives).
        ask_ice_servers=True: first ask the device for its ICE servers (docs/protocol.md
        §4.9) and gather with them; otherwise gather host candidates only.
        without_turn=True: gather with the reply's STUN servers only (a viewer that cannot
        use TURN: only the device's own relay can help it).
        """
        await self._connect_signaling(timeout)

        if ask_ice_servers:
            t0 = now_ms()
            ask = {"v": 1, "type": "ice-servers"}
            if self.signer is not None:
                # No session yet: like the offer, the request carries the credential (§9.4).
                await self.mqtt.publish(self.topic_in, self.seal(ask, cred=True))
            else:
                await self.send(ask)
            try:
                reply = await self.wait_message(
                    lambda m: m.get("type") in ("ice-servers", "error"), timeout
                )
            except TimeoutError:
                raise TimeoutError(f"no ice-servers reply within {timeout} s") from None
            if reply.get("type") == "error":
                raise ViewerError(f"ice-servers refused: {reply}", reply.get("code"), reply)
            self.t_ice_servers_ms = now_ms() - t0
            self.ice_servers = reply["ice_servers"]
            if without_turn:
                self.ice_servers = [
                    s for s in self.ice_servers if not any(u.startswith("turn") for u in s["urls"])
                ]
        self.pc = RTCPeerConnection(rtc_configuration(self.ice_servers))
        transceiver = self.pc.addTransceiver("video", direction="recvonly")
        self.jitter_buffer = BrowserLikeJitterBuffer()
        transceiver.receiver._RTCRtpReceiver__jitter_buffer = self.jitter_buffer
        if self.feedback == "twcc":
            self.twcc = TwccFeedback()
            transceiver.receiver.rtcam_twcc = self.twcc
            self._tasks.append(asyncio.ensure_future(self._send_twcc(transceiver.receiver)))
        self.dc = self.pc.createDataChannel("control")
        self.dc.on("open", self._dc_open.set)
        self.dc.on("message", self._on_dc_message)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

        with offered_feedback(self.feedback):
            offer = await self.pc.createOffer()
        await self.pc.setLocalDescription(offer)  # aiortc: gathering completes here
        self.offer_sdp = self.pc.localDescription.sdp
        local_candidates: list[dict] = []
        if trickle:
            self.offer_sdp, local_candidates = strip_candidates(self.offer_sdp)
        self.t_offer_ms = now_ms()
        await self.send({"v": 1, "type": "offer", "sdp": self.offer_sdp})
        if trickle:
            for cand in local_candidates:
                await self.send({"v": 1, "type": "candidate", "candidate": cand})
            await self.send({"v": 1, "type": "candidate", "candidate": None})

        answer = await asyncio.wait_for(self._answer, timeout)
        with offered_feedback(self.feedback):
            await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        pending, self._pending_candidates = self._pending_candidates, []
        for cand in pending:
            await self._add_candidate(cand)
        if wait_connected:
            left = max(1.0, timeout - (now_ms() - self.t_offer_ms) / 1000)
            await self.wait_connected(left)

    async def _connect_signaling(self, timeout: float) -> None:
        """MQTT up, the device's key learnt (signed mode), `out` subscribed: ready to offer."""
        loop = asyncio.get_running_loop()
        self._answer = loop.create_future()
        self._dc_open = asyncio.Event()
        self._frame_event = asyncio.Event()
        self._msg_event = asyncio.Event()
        self.mqtt = MqttLink(self.host, self.port, f"viewer-{self.session}", loop, broker_login)
        await self.mqtt.connect()
        if self.auth is not None and self.device_key is None:
            await self._learn_device_key(timeout)
        # Protocol 2: subscribe to `out` before publishing the offer.
        await self.mqtt.subscribe(self.topic_out, self._on_out)

    async def _send_twcc(self, receiver) -> None:
        """Transport-wide feedback every 100 ms, as browsers send it."""
        while True:
            await asyncio.sleep(0.1)
            ssrc = getattr(receiver, "_RTCRtpReceiver__rtcp_ssrc", None)
            if ssrc is None or self.twcc is None:
                continue
            data = self.twcc.build(ssrc)
            if data is not None:
                await receiver._send_rtcp(TwccPacket(data))

    def _on_state(self) -> None:
        state = self.pc.connectionState
        self.connection_states.append(state)
        if state == "connected" and self.t_connected_ms is None:
            self.t_connected_ms = now_ms()
        log.info("%s: connection state %s", self.session, state)

    async def wait_connected(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pc.connectionState != "connected":
            if self.pc.connectionState in ("failed", "closed"):
                raise ViewerError(f"peer connection {self.pc.connectionState}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"peer connection still {self.pc.connectionState} after {timeout}s "
                    f"(remote candidates: {self.remote_candidates})"
                )
            await asyncio.sleep(0.05)
        await asyncio.wait_for(self._dc_open.wait(), max(0.5, deadline - time.monotonic()))

    def _on_track(self, track) -> None:
        if track.kind == "video":
            self._tasks.append(asyncio.ensure_future(self._recv_video(track)))

    async def _recv_video(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            arrival = now_ms()
            if self.t_first_frame_ms is None:
                self.t_first_frame_ms = arrival
            if not self.decode:
                rec = FrameRecord(None, None, arrival, False, False, frame.width, frame.height)
            else:
                try:
                    yuv = frame.to_ndarray(format="yuv420p")
                    r = decode_frame(yuv, frame.width, frame.height)
                    probs = r.problems if self.decode_failures < self.keep_problems else []
                    if r.problems:
                        self.decode_failures += 1
                    rec = FrameRecord(
                        r.seq,
                        r.ts,
                        arrival,
                        r.crc_ok,
                        r.pattern_ok,
                        frame.width,
                        frame.height,
                        probs,
                    )
                except Exception as e:  # keep receiving; record the failure
                    self.decode_failures += 1
                    rec = FrameRecord(
                        None, None, arrival, False, False, frame.width, frame.height, [repr(e)]
                    )
            self.frames.append(rec)
            self._frame_event.set()

    async def wait_frames(self, n: int, timeout: float) -> None:
        """Wait until at least n more frames than now have arrived."""
        target = len(self.frames) + n
        deadline = time.monotonic() + timeout
        while len(self.frames) < target:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{self.session}: {len(self.frames)} frames, wanted {target} within {timeout}s"
                )
            self._frame_event.clear()
            try:
                await asyncio.wait_for(self._frame_event.wait(), left)
            except TimeoutError:
                pass

    # ---- data channel ---------------------------------------------------------------

    def _on_dc_message(self, message) -> None:
        try:
            reply = json.loads(message)
        except ValueError:
            self.unmatched_replies.append({"_raw": message})
            return
        key = json.dumps(reply.get("id")) if isinstance(reply, dict) else None
        fut = self._replies.pop(key, None) if key is not None else None
        if fut is not None and not fut.done():
            fut.set_result(reply)
        else:
            self.unmatched_replies.append(reply)

    async def command(
        self, cmd: str, args: dict | None = None, id: Any = None, timeout: float = 5.0
    ) -> dict:
        """Send one data-channel command, return its reply (matched by id)."""
        if id is None:
            id = str(self._next_id)
            self._next_id += 1
        msg: dict[str, Any] = {"id": id, "cmd": cmd}
        if args is not None:
            msg["args"] = args
        return await self.command_raw(json.dumps(msg), reply_id=id, timeout=timeout)

    async def command_raw(self, text: str, reply_id: Any = None, timeout: float = 5.0) -> dict:
        """Send text as-is; wait for the reply whose id equals reply_id (None: id null)."""
        fut = asyncio.get_running_loop().create_future()
        self._replies[json.dumps(reply_id)] = fut
        self.dc.send(text)
        return await asyncio.wait_for(fut, timeout)

    async def ping(self, t: Any = None, timeout: float = 5.0) -> tuple[dict, float]:
        """Ping over the data channel; returns (reply, round trip ms)."""
        t0 = now_ms()
        reply = await self.command("ping", None if t is None else {"t": t}, timeout=timeout)
        return reply, now_ms() - t0

    # ---- teardown ---------------------------------------------------------------------

    async def bye(self, reason: str | None = None) -> None:
        """Send bye, then close the peer connection and MQTT."""
        msg: dict[str, Any] = {"v": 1, "type": "bye"}
        if reason:
            msg["reason"] = reason
        await self.send(msg)
        await self.close(send_bye=False)

    async def close(self, send_bye: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if send_bye and self.mqtt is not None:
            try:
                await self.send({"v": 1, "type": "bye"})
            except Exception:
                pass
        if self.pc is not None:
            await self.pc.close()
        for t in self._tasks:
            t.cancel()
        if self.mqtt is not None:
            self.mqtt.close()

    def die(self) -> None:
        """Vanish without bye, close or DTLS alert: SIGKILL this very process."""
        os.kill(os.getpid(), signal.SIGKILL)

    # ---- stats ----------------------------------------------------------------------

    def video_payload_bytes(self) -> int:
        """RTP payload bytes received for video so far (H.264 as sent, before decoding)."""
        if self.pc is None:
            return 0
        return sum(
            getattr(r, "rtcam_payload_bytes", 0)
            for r in self.pc.getReceivers()
            if r.track is not None and r.track.kind == "video"
        )

    def stats(self, since_ms: float | None = None, until_ms: float | None = None) -> dict:
        frames = [
            f
            for f in self.frames
            if (since_ms is None or f.arrival_ms >= since_ms)
            and (until_ms is None or f.arrival_ms <= until_ms)
        ]
        s = summarize(frames)
        if self.t_offer_ms is not None and self.t_first_frame_ms is not None:
            s["offer_to_first_frame_ms"] = round(self.t_first_frame_ms - self.t_offer_ms, 1)
        return s


def latency_ms(f: FrameRecord) -> float:
    """arrival - capture timestamp, both Unix ms mod 2^32, as a signed difference."""
    d = (int(f.arrival_ms) - f.ts) % (1 << 32)
    return float(d - (1 << 32) if d >= (1 << 31) else d)


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summarize(frames: list[FrameRecord]) -> dict:
    good = [f for f in frames if f.crc_ok]
    out: dict[str, Any] = {
        "frames": len(frames),
        "crc_ok": len(good),
        "pattern_ok": sum(1 for f in frames if f.pattern_ok),
    }
    if good:
        seqs = [f.seq for f in good]
        out["seq_first"], out["seq_last"] = seqs[0], seqs[-1]
        out["seq_span"] = seqs[-1] - seqs[0] + 1
        out["unique_seqs"] = len(set(seqs))
        out["non_increasing"] = sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a)
        out["ts_span_ms"] = (good[-1].ts - good[0].ts) % (1 << 32)
        lat = [latency_ms(f) for f in good]
        out["latency_ms"] = {
            "min": round(min(lat), 1),
            "p50": round(statistics.median(lat), 1),
            "p95": round(percentile(lat, 95), 1),
            "max": round(max(lat), 1),
        }
    return out


# --------------------------------------------------------------------------------------
# Subprocess wrapper (for "viewer dies without bye")
# --------------------------------------------------------------------------------------


class ViewerProcess:
    """Runs this file as a CLI viewer in a child process; lines of JSON events on stdout."""

    def __init__(
        self,
        host: str,
        port: int,
        device: str,
        *extra: str,
        prefix: str = "rtcam",
        auth: ViewerAuth | None | str = "default",
    ):
        self.session = new_session_id()
        if auth == "default":
            auth = default_auth(device) if default_auth is not None else None
        auth_args: list[str] = []
        if auth is not None:
            import tempfile

            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                f.write(auth.to_json())
            os.chmod(f.name, 0o600)
            auth_args = ["--auth", f.name]
        self.args = [
            sys.executable,
            os.path.abspath(__file__),
            "--host",
            host,
            "--port",
            str(port),
            "--device",
            device,
            "--prefix",
            prefix,
            "--session",
            self.session,
            *auth_args,
            *extra,
        ]
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )

    async def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("event") == name:
                return ev
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"viewer process: no {name!r} event in {timeout}s")
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            if not line:
                err = (await self.proc.stderr.read()).decode(errors="replace")
                raise ViewerError(
                    f"viewer process exited ({await self.proc.wait()}) before {name!r}; "
                    f"events {self.events}; stderr:\n{err[-3000:]}"
                )
            ev = json.loads(line)
            self.events.append(ev)
            if ev.get("event") == name:
                return ev
            if ev.get("event") == "error":
                raise ViewerError(f"viewer process failed: {ev}")

    def kill(self) -> None:
        """SIGKILL: no bye, no DTLS close_notify, no SCTP abort, no MQTT DISCONNECT."""
        if self.proc and self.proc.returncode is None:
            self.proc.kill()

    async def wait(self, timeout: float = 10.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _emit(event: str, **data: Any) -> None:
    print(json.dumps({"event": event, **data}), flush=True)


def _record(v: Viewer, path: str, byte_samples: list) -> None:
    """Writes what a network test measures from: every frame's stamp and arrival, and the
    received payload bytes over time."""
    data = {
        "session": v.session,
        "t_offer_ms": v.t_offer_ms,
        "t_first_frame_ms": v.t_first_frame_ms,
        # When recording stopped: the end of every measuring window (frames after it are not
        # recorded, so a window reaching past it would count a freeze that never happened).
        "t_end_ms": now_ms(),
        "frames": [[f.seq, f.ts, round(f.arrival_ms, 1), f.crc_ok] for f in v.frames],
        "bytes": byte_samples,
        "decode_failures": v.decode_failures,
        "holes_skipped": v.jitter_buffer.holes_skipped if v.jitter_buffer else 0,
        "twcc_feedback_sent": v.twcc.sent if v.twcc else 0,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


async def _cli(a: argparse.Namespace) -> int:
    global ICE_ADDRESS
    if a.ice_address:
        ICE_ADDRESS = a.ice_address
    auth = None
    if a.auth:
        with open(a.auth) as f:
            auth = ViewerAuth.from_json(f.read())
    v = Viewer(
        a.host,
        a.port,
        a.device,
        prefix=a.prefix,
        session=a.session,
        feedback=a.feedback,
        auth=auth,
    )
    byte_samples: list[list[float]] = []

    async def sample_bytes() -> None:
        while True:
            byte_samples.append([round(now_ms(), 1), v.video_payload_bytes()])
            await asyncio.sleep(0.25)

    sampler = asyncio.ensure_future(sample_bytes()) if a.record else None
    def emit_ice_servers() -> None:
        if v.ice_servers is not None:
            # URLs and user names only: the credentials stay out of logs.
            _emit(
                "ice-servers",
                ms=round(v.t_ice_servers_ms, 1),
                servers=[{"urls": s["urls"], "username": s.get("username")} for s in v.ice_servers],
            )

    try:
        await v.start(
            timeout=a.timeout, ask_ice_servers=a.ask_ice_servers, without_turn=a.without_turn
        )
    except (ViewerError, TimeoutError) as e:
        emit_ice_servers()
        kind = "timeout: " if isinstance(e, TimeoutError) else ""
        _emit("error", message=f"{kind}{e}", code=getattr(e, "code", None))
        if a.wait_device_end > 0:
            # What the device says about the session it could not connect (bye or error).
            try:
                msg = await v.wait_message(
                    lambda m: m.get("type") in ("bye", "error"), a.wait_device_end
                )
                # When it arrived (it may have come while start() still waited).
                at = next(t for t, m, _ in v.messages if m is msg)
                since = at - v.t_offer_ms if v.t_offer_ms is not None else None
                _emit(
                    "device-ended",
                    message=msg,
                    ms_from_offer=None if since is None else round(since, 1),
                )
            except TimeoutError:
                _emit("device-silent", seconds=a.wait_device_end)
        return 2
    emit_ice_servers()
    _emit(
        "connected",
        session=v.session,
        ms_from_offer=round(v.t_connected_ms - v.t_offer_ms, 1),
        pair=selected_pair(v.pc),
    )
    if not a.video_optional:
        await v.wait_frames(1, a.timeout)
    if v.frames:
        _emit(
            "first-frame",
            session=v.session,
            ms_from_offer=round(v.t_first_frame_ms - v.t_offer_ms, 1),
            frame=asdict(v.frames[0]),
        )
    if a.ping:
        reply, rtt = await v.ping(t="cli")
        _emit("ping", reply=reply, rtt_ms=round(rtt, 2))
    end = time.monotonic() + a.duration
    die_at = time.monotonic() + a.die_after if a.die_after is not None else None
    while time.monotonic() < end:
        await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
        if die_at is not None and time.monotonic() >= die_at:
            _emit("dying", frames=len(v.frames))
            v.die()
        if not a.quiet:
            _emit("stats", **v.stats())
    if sampler is not None:
        sampler.cancel()
        _record(v, a.record, byte_samples)
    if a.no_bye:
        _emit("done", bye=False, **v.stats())
        v.die()
    await v.bye()
    _emit("done", bye=True, **v.stats())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--device", default="rtcam")
    p.add_argument("--prefix", default="rtcam")
    p.add_argument("--session", default=None)
    p.add_argument("--auth", default=None, help="signed mode: JSON file from ViewerAuth.to_json")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of video to receive")
    p.add_argument("--timeout", type=float, default=20.0, help="connect/first frame timeout")
    p.add_argument("--ping", action="store_true", help="ping over the data channel once")
    p.add_argument("--no-bye", action="store_true", help="at the end, die instead of bye")
    p.add_argument("--die-after", type=float, default=None, help="SIGKILL self after S seconds")
    p.add_argument(
        "--feedback",
        choices=FEEDBACK_MODES,
        default="remb",
        help="congestion feedback offered and sent: remb (aiortc's own), twcc (like a "
        "browser), none (receiver reports only)",
    )
    p.add_argument("--ice-address", default=None, help="the one local address ICE uses")
    p.add_argument("--record", default=None, help="write frames and received bytes (JSON) here")
    p.add_argument("--quiet", action="store_true", help="no per-second stats lines")
    p.add_argument(
        "--video-optional",
        action="store_true",
        help="once connected, receive for --duration seconds even if no frame arrives "
        "(a network test measuring a path that may carry no picture at all)",
    )
    p.add_argument(
        "--ask-ice-servers",
        action="store_true",
        help="ask the device for its ICE servers before offering (protocol §4.9)",
    )
    p.add_argument(
        "--without-turn",
        action="store_true",
        help="with --ask-ice-servers: gather with the STUN servers only (no relay of its own)",
    )
    p.add_argument(
        "--wait-device-end",
        type=float,
        default=0.0,
        help="when the session fails, wait this long for the device's bye or error",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, stream=sys.stderr)
    return asyncio.run(_cli(a))


if __name__ == "__main__":
    sys.exit(main())
