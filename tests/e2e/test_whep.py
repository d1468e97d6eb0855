"""WHEP (docs/whep.md): aiortc viewers over HTTP (urllib, no MQTT) against a real rtcam.

Each test starts its own rtcam with `[whep]` enabled. Signed mode (the default) needs an
`Authorization: Bearer` viewer credential; open mode is tested on its own instance. WHEP and
MQTT viewers share `webrtc.max_viewers` because both go through the one session registry.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import threading
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from conftest import HOST, PREFIX, free_port, mint, record_metric
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pattern import decode_frame
from rtcam_auth import public_b64
from viewer import Viewer, ViewerError, rtc_configuration, strip_candidates


def run(coro, timeout: float):
    async def bounded():
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError as e:
            raise AssertionError(f"test body timed out after {timeout} s: {e}") from e

    return asyncio.run(bounded())


@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


# HTTPS tests set this: the CA file the client trusts.
TLS_CONTEXT: list[ssl.SSLContext] = []


def http(method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Reply:
    """One HTTP request; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=body if method in ("POST", "PATCH") else None, method=method)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    context = TLS_CONTEXT[-1] if url.startswith("https:") and TLS_CONTEXT else None
    try:
        with urllib.request.urlopen(req, timeout=20, context=context) as resp:
            status, hdrs, data = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        status, hdrs, data = e.code, e.headers, e.read()
    out: dict[str, list[str]] = {}
    for k, v in hdrs.items():
        out.setdefault(k.lower(), []).append(v)
    return Reply(status, out, data)


async def ahttp(*args, **kwargs) -> Reply:
    return await asyncio.get_running_loop().run_in_executor(None, lambda: http(*args, **kwargs))


def credential(device: str) -> str:
    return mint(public_b64(Ed25519PrivateKey.generate()), device, "view")


@dataclass
class WhepViewer:
    """A WHEP client: aiortc, recvonly video, no data channel (as go2rtc and players do)."""

    endpoint: str
    token: str | None = None
    trickle: bool = False
    # go2rtc's WHEP client offers audio too (recvonly); rtcam declines it in the answer.
    audio: bool = False
    pc: RTCPeerConnection | None = None
    location: str | None = None
    etag: str | None = None
    links: list[str] = field(default_factory=list)
    frames: list = field(default_factory=list)
    good_frames: int = 0
    t_post: float = 0.0
    t_first_frame: float | None = None
    reply: Reply | None = None
    candidates: list[dict] = field(default_factory=list)
    ufrag: str | None = None
    _tasks: list = field(default_factory=list)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def start(self, expect: int = 201, apply: bool = True) -> Reply:
        self.pc = RTCPeerConnection(rtc_configuration())
        self.pc.addTransceiver("video", direction="recvonly")
        if self.audio:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.on("track", lambda t: self._tasks.append(asyncio.ensure_future(self._recv(t))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = self.pc.localDescription.sdp
        if self.trickle:
            sdp, self.candidates = strip_candidates(sdp)
        for line in sdp.splitlines():
            if line.startswith("a=ice-ufrag:"):
                self.ufrag = line.split(":", 1)[1]
        self.t_post = time.monotonic()
        r = await ahttp(
            "POST",
            self.endpoint,
            sdp.encode(),
            {"Content-Type": "application/sdp", **self.auth_headers()},
        )
        self.reply = r
        assert r.status == expect, f"POST: {r.status} {r.body!r}"
        if r.status != 201:
            return r
        assert r.header("Content-Type") == "application/sdp", r.headers
        self.location, self.etag = r.header("Location"), r.header("ETag")
        assert self.location and self.etag, r.headers
        self.links = r.headers.get("link", [])
        answer = r.body.decode()
        assert "a=candidate:" in answer, answer
        if apply:
            await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        return r

    def session_url(self) -> str:
        base = self.endpoint.split("/", 3)
        return f"{base[0]}//{base[2]}{self.location}"

    async def patch_candidates(self, if_match: str | None = None, expect: int = 204) -> Reply:
        lines = [f"a=ice-ufrag:{self.ufrag}", "m=video 9 UDP/TLS/RTP/SAVPF 0", "a=mid:0"]
        lines += [f"a={c['candidate']}" for c in self.candidates]
        lines.append("a=end-of-candidates")
        headers = {"Content-Type": "application/trickle-ice-sdpfrag", **self.auth_headers()}
        headers["If-Match"] = if_match or self.etag
        r = await ahttp("PATCH", self.session_url(), ("\r\n".join(lines) + "\r\n").encode(), headers)
        assert r.status == expect, f"PATCH: {r.status} {r.body!r}"
        return r

    async def delete(self, expect: int = 200, token: str | None = "same") -> Reply:
        headers = self.auth_headers() if token == "same" else (
            {"Authorization": f"Bearer {token}"} if token else {}
        )
        r = await ahttp("DELETE", self.session_url(), b"", headers)
        assert r.status == expect, f"DELETE: {r.status} {r.body!r}"
        return r

    async def _recv(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if self.t_first_frame is None:
                self.t_first_frame = time.monotonic()
            self.frames.append(frame)
            r = decode_frame(frame.to_ndarray(format="yuv420p"), frame.width, frame.height)
            if r.pattern_ok:
                self.good_frames += 1

    async def wait_frames(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.good_frames < n:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.good_frames} good frames of {len(self.frames)}, wanted {n} "
                    f"in {timeout} s (connection {self.pc.connectionState if self.pc else None})"
                )
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.pc:
            await self.pc.close()


def whep_cam(make_rtcam, name: str, **overrides):
    port = free_port()
    cam = make_rtcam(
        name,
        whep__enabled=True,
        whep__listen=f"{HOST}:{port}",
        whep__allowed_origins=["http://page.example"],
        **overrides,
    )
    return cam, f"http://{HOST}:{port}/whep"


def test_whep_open_mode_streams_and_delete_frees_the_slot(make_rtcam):
    cam, url = whep_cam(make_rtcam, "whep-open", auth__mode="open", webrtc__max_viewers=1)
    state = cam.wait_state(lambda s: "whep_url" in s, 10, "whep_url in state")
    assert state["whep_url"] == url, state

    async def body():
        # go2rtc's WHEP client offers recvonly audio too: the answer declines it (port 0).
        # (aiortc itself refuses such answers, so this viewer only checks the answer.)
        a = WhepViewer(url, audio=True)
        await a.start(expect=201, apply=False)
        assert "\r\nm=audio 0 " in a.reply.body.decode(), a.reply.body
        await a.delete()
        await a.close()
        v = WhepViewer(url)  # open mode: no credential at all
        try:
            await v.start()
            await v.wait_frames(30, 15)
            setup_ms = (v.t_first_frame - v.t_post) * 1000
            record_metric("whep.open.post_to_first_frame_ms", round(setup_ms))
            s = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: cam.wait_state(
                    lambda s: s["viewers"] == 1 and s["whep_viewers"] == 1, 10, "one WHEP viewer"
                ),
            )
            assert s["whep_viewers"] == 1
            # The one slot is taken: the next WHEP offer gets 503 with Retry-After.
            w = WhepViewer(url)
            r = await w.start(expect=503)
            assert r.header("Retry-After") == "10", r.headers
            assert b"max-viewers" in r.body, r.body
            await w.close()
            await v.delete()
            # Unknown now.
            await v.delete(expect=404)
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: cam.wait_state(lambda s: s["viewers"] == 0, 15, "slot freed")
            )
            # The freed slot takes a new viewer.
            v2 = WhepViewer(url)
            await v2.start()
            await v2.wait_frames(10, 15)
            await v2.delete()
            await v2.close()
        finally:
            await v.close()

    run(body(), 90)


def test_whep_signed_mode_bearer_trickle_and_refusals(make_rtcam):
    cam, url = whep_cam(make_rtcam, "whep-signed")

    async def body():
        # No credential: 401 with a Bearer challenge.
        anon = WhepViewer(url)
        r = await anon.start(expect=401)
        assert r.header("WWW-Authenticate", ).startswith("Bearer"), r.headers
        await anon.close()
        bad = WhepViewer(url, token="not.a.jwt")
        r = await bad.start(expect=401)
        assert "invalid_token" in r.header("WWW-Authenticate"), r.headers
        await bad.close()
        # Valid, but for another device: 403.
        other = WhepViewer(url, token=credential("some-other-cam"))
        r = await other.start(expect=403)
        assert b"forbidden" in r.body, r.body
        await other.close()

        token = credential(cam.device)
        v = WhepViewer(url, token=token, trickle=True)
        try:
            await v.start()
            # The viewer's candidates were stripped from the offer: only the PATCH lets ICE
            # find a path, so frames prove the trickle worked.
            await v.patch_candidates(if_match='"wrong"', expect=412)
            await v.patch_candidates(if_match="*", expect=422)
            await v.patch_candidates()
            await v.wait_frames(30, 15)
            record_metric("whep.signed.post_to_first_frame_ms", round((v.t_first_frame - v.t_post) * 1000))
            # The session's URL with no or another credential: 401 / 403, session untouched.
            await v.delete(expect=401, token=None)
            await v.delete(expect=403, token=credential(cam.device))
            n = v.good_frames
            await v.wait_frames(n + 10, 10)
            await v.delete()
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: cam.wait_state(lambda s: s["viewers"] == 0, 15, "slot freed")
            )
        finally:
            await v.close()

    run(body(), 90)


def test_whep_http_errors(make_rtcam):
    cam, url = whep_cam(make_rtcam, "whep-errors")
    token = credential(cam.device)
    auth = {"Authorization": f"Bearer {token}"}
    r = http("POST", url, b"v=0\r\n", {"Content-Type": "text/plain", **auth})
    assert r.status == 415 and r.header("Accept-Post") == "application/sdp", r
    r = http("POST", url, b"v" * 20000, {"Content-Type": "application/sdp", **auth})
    assert r.status == 413, r
    r = http("POST", url, b"v=0\r\nm=audio 9 RTP/AVP 0\r\n", {"Content-Type": "application/sdp", **auth})
    assert r.status == 400 and b"bad-sdp" in r.body, r
    r = http("GET", url)
    assert r.status == 405 and r.header("Allow") == "POST, OPTIONS", r
    r = http("DELETE", url + "/whep-0000", b"", auth)
    assert r.status == 404, r
    frag = {"Content-Type": "application/trickle-ice-sdpfrag", **auth}
    r = http("PATCH", url + "/whep-0000", b"a=end-of-candidates\r\n", frag)
    assert r.status == 404, r
    r = http("GET", url.replace("/whep", "/other"))
    assert r.status == 404, r
    # CORS: a preflight from an allowed page, and a refused origin.
    r = http(
        "OPTIONS",
        url,
        b"",
        {
            "Origin": "http://page.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert r.status == 204, r
    assert r.header("Access-Control-Allow-Origin") == "http://page.example", r
    assert "Authorization" in r.header("Access-Control-Allow-Headers"), r
    r = http("POST", url, b"v=0", {"Content-Type": "application/sdp", "Origin": "http://evil.example"})
    assert r.status == 403, r
    assert cam.alive(), "rtcam survived every bad request"


def test_whep_and_mqtt_viewers_share_max_viewers(make_rtcam, broker):
    cam, url = whep_cam(make_rtcam, "whep-mixed", webrtc__max_viewers=2)

    async def body():
        w = WhepViewer(url, token=credential(cam.device))
        m = Viewer(HOST, broker.port, cam.device)
        m2 = Viewer(HOST, broker.port, cam.device)
        try:
            await w.start()
            await w.wait_frames(10, 15)
            await m.start()
            await m.wait_frames(10, 15)
            s = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: cam.wait_state(
                    lambda s: s["viewers"] == 2 and s["whep_viewers"] == 1, 10, "1 WHEP + 1 MQTT"
                ),
            )
            assert s["max_viewers"] == 2
            # Full: an MQTT viewer and a WHEP viewer are both refused.
            with pytest.raises(ViewerError) as e:
                await m2.start(timeout=10)
            assert e.value.code == "max-viewers", e.value
            w2 = WhepViewer(url, token=credential(cam.device))
            await w2.start(expect=503)
            await w2.close()
            # DELETE frees a slot the MQTT viewer can take.
            await w.delete()
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: cam.wait_state(lambda s: s["viewers"] == 1, 15, "WHEP slot freed")
            )
            m3 = Viewer(HOST, broker.port, cam.device)
            await m3.start()
            await m3.wait_frames(10, 15)
            await m3.close()
        finally:
            await w.close()
            await m.close()
            await m2.close()

    run(body(), 120)


def test_whep_link_headers_list_the_ice_servers(make_rtcam):
    """The 201's Link headers carry webrtc.stun_servers (RFC 9725 §4.6). The server is on
    loopback, where nothing answers: the answer then waits whep.gather_timeout_ms for
    gathering and still carries the host candidates. (TURN entries with username and
    credential: unit tests, src/whep/mod.rs; the test config writer cannot express
    [[webrtc.turn_servers]] tables.)"""
    cam, url = whep_cam(
        make_rtcam,
        "whep-links",
        webrtc__stun_servers=["stun:127.0.0.1:3478"],
        whep__gather_timeout_ms=500,
    )

    async def body():
        v = WhepViewer(url, token=credential(cam.device))
        try:
            await v.start()
            assert v.links == ['<stun:127.0.0.1:3478>; rel="ice-server"'], v.links
            await v.wait_frames(10, 15)
            await v.delete()
        finally:
            await v.close()

    run(body(), 60)


def self_signed(workdir) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, PEM files (Python cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rtcam-whep-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "whep-cert.pem", workdir / "whep-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_whep_over_https(make_rtcam, workdir):
    """whep.tls_cert_file/tls_key_file: the endpoint speaks HTTPS (rustls) and the client
    verifies the certificate."""
    cert, key = self_signed(workdir)
    port = free_port()
    cam = make_rtcam(
        "whep-https",
        whep__enabled=True,
        whep__listen=f"{HOST}:{port}",
        whep__tls_cert_file=cert,
        whep__tls_key_file=key,
    )
    url = f"https://{HOST}:{port}/whep"
    state = cam.wait_state(lambda s: "whep_url" in s, 10, "whep_url in state")
    assert state["whep_url"] == url, state
    TLS_CONTEXT.append(ssl.create_default_context(cafile=cert))
    try:

        async def body():
            v = WhepViewer(url, token=credential(cam.device))
            try:
                await v.start()
                await v.wait_frames(30, 15)
                record_metric(
                    "whep.https.post_to_first_frame_ms", round((v.t_first_frame - v.t_post) * 1000)
                )
                await v.delete()
            finally:
                await v.close()

        run(body(), 60)
        # A client that does not trust the certificate refuses the connection.
        with pytest.raises(urllib.error.URLError) as e:
            urllib.request.urlopen(f"https://{HOST}:{port}/whep", timeout=5)
        assert "CERTIFICATE_VERIFY_FAILED" in str(e.value), e.value
    finally:
        TLS_CONTEXT.pop()


def test_home_assistant_discovery_shows_the_whep_url(make_rtcam):
    """With [whep] and Home Assistant discovery on, the device's discovery has a diagnostic
    "WHEP URL" sensor whose template, applied to the retained state, gives the endpoint URL;
    neither carries a credential."""
    public = "https://cam.lan:8889/whep"
    port = free_port()
    cam = make_rtcam(
        "whep-ha",
        homeassistant__enabled=True,
        whep__enabled=True,
        whep__listen=f"{HOST}:{port}",
        whep__public_url=public,
    )
    state = cam.wait_state(lambda s: "whep_url" in s, 10, "whep_url in state")
    got: dict[str, bytes] = {}
    ready = threading.Event()
    topic = f"homeassistant/device/{cam.device}/config"

    def on_message(client, userdata, msg):
        if msg.payload:
            got[msg.topic] = msg.payload
            ready.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="e2e-ha-whep")
    c.on_message = on_message
    c.connect(HOST, cam.broker_port)
    c.loop_start()
    try:
        c.subscribe(topic, qos=1)
        assert ready.wait(10), f"no retained discovery on {topic}"
    finally:
        c.loop_stop()
        c.disconnect()
    text = got[topic].decode()
    sensor = json.loads(text)["cmps"]["whep_url"]
    assert sensor["p"] == "sensor" and sensor["entity_category"] == "diagnostic", sensor
    assert sensor["state_topic"] == f"{PREFIX}/{cam.device}/state", sensor
    # HA renders "{{ value_json.whep_url }}" against the state message.
    field = sensor["value_template"].removeprefix("{{ value_json.").removesuffix(" }}")
    assert state[field] == public, (sensor, state)
    assert "access_token" not in text and "Bearer" not in text, text
