"""End-to-end tests: real mosquitto + real rtcam + aiortc viewers, all on loopback.

Every expectation below comes from docs/protocol.md (the device/viewer contract).
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from aiortc import RTCPeerConnection

from conftest import HOST, PREFIX, device_message, file_size, record_metric
from viewer import (
    MqttLink,
    Viewer,
    ViewerError,
    ViewerProcess,
    latency_ms,
    now_ms,
    rtc_configuration,
    strip_candidates,
    summarize,
)

FPS = 30
WIDTH, HEIGHT = 640, 480


def run(coro, timeout: float):
    """Run one test body in a fresh event loop, bounded in time."""

    async def bounded():
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError as e:
            raise AssertionError(f"test body timed out after {timeout} s: {e}") from e

    return asyncio.run(bounded())


async def athread(fn, *args):
    """Run a blocking call (e.g. waiting on the state monitor) without stalling aiortc."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def window(frames, t0: float, t1: float):
    return [f for f in frames if t0 <= f.arrival_ms <= t1]


def describe_problems(frames, limit: int = 5) -> str:
    bad = [f for f in frames if not f.pattern_ok][:limit]
    return "; ".join(f"seq={f.seq} ts={f.ts}: {f.problems or 'not decodable'}" for f in bad)


def max_gap_ms(frames) -> float:
    t = [f.arrival_ms for f in frames]
    return max((b - a for a, b in zip(t, t[1:])), default=0.0)


async def stop(*viewers: Viewer) -> None:
    for v in viewers:
        try:
            await v.close(send_bye=True)
        except Exception:
            pass


def assert_stream(frames, seconds: float, min_ratio: float, who: str) -> dict:
    """Frames received in a window of `seconds`: enough, in order, intact."""
    s = summarize(frames)
    expected = FPS * seconds
    decoded = s["crc_ok"]
    assert s["frames"] > 0, f"{who}: no video frame at all in {seconds} s"
    assert decoded >= min_ratio * expected, (
        f"{who}: {decoded} frames with a valid stamp in {seconds} s, expected >= "
        f"{min_ratio:.0%} of {expected:.0f} ({s}); bad frames: {describe_problems(frames)}"
    )
    # The device really produced ~FPS frames per second: seq range and capture clock agree.
    assert s["seq_span"] <= expected * 1.15 + 5, f"{who}: seq advanced too fast: {s}"
    assert decoded >= min_ratio * s["seq_span"], (
        f"{who}: received {decoded} of {s['seq_span']} frames sent (seq {s['seq_first']}.."
        f"{s['seq_last']}), less than {min_ratio:.0%}"
    )
    ms_per_frame = s["ts_span_ms"] / max(1, s["seq_span"] - 1)
    assert 1000 / FPS * 0.8 <= ms_per_frame <= 1000 / FPS * 1.25, (
        f"{who}: stamps say {ms_per_frame:.1f} ms per frame, expected {1000 / FPS:.1f}: {s}"
    )
    assert s["non_increasing"] == 0, (
        f"{who}: sequence numbers not strictly increasing ({s['non_increasing']} times): "
        f"{[f.seq for f in frames if f.crc_ok][:60]}"
    )
    assert decoded >= 0.95 * s["frames"], (
        f"{who}: only {decoded}/{s['frames']} decoded frames have a valid CRC: "
        f"{describe_problems(frames)}"
    )
    assert s["pattern_ok"] >= 0.95 * s["frames"], (
        f"{who}: only {s['pattern_ok']}/{s['frames']} frames have intact bars/box: "
        f"{describe_problems(frames)}"
    )
    sizes = {(f.width, f.height) for f in frames}
    assert sizes == {(WIDTH, HEIGHT)}, f"{who}: frame sizes {sizes}, expected {WIDTH}x{HEIGHT}"
    return s


# --------------------------------------------------------------------------------------


def test_status_and_idle_state(cam, monitor):
    status = monitor.latest(cam.topic_status)
    # Signed mode (the default): the status names the mode and carries the device key.
    assert status == {
        "v": 1,
        "status": "online",
        "device": cam.device,
        "protocol": 1,
        "auth": "signed",
        "key": cam.device_key,
    }, status
    assert isinstance(cam.device_key, str) and len(cam.device_key) == 43, status
    state = cam.state()
    want = {
        "v": 1,
        "viewers": 0,
        "max_viewers": 4,
        "capturing": False,
        "source": "test-pattern",
        "fps": FPS,
    }
    got = {k: state.get(k) for k in want}
    assert got == want, f"idle state {state}"
    # Section 3.2 does not say what width/height are while the camera is released; rtcam
    # reports 0x0 then. While capturing they must be the stream's size (test_one_viewer_10s).
    assert (state.get("width"), state.get("height")) in ((0, 0), (WIDTH, HEIGHT)), state
    for key in (
        "bitrate",
        "frames_encoded",
        "frames_dropped",
        "bytes_copied_per_frame",
        "uptime_s",
    ):
        assert isinstance(state.get(key), int), f"state.{key} missing or not an integer: {state}"


def test_one_viewer_10s(cam, monitor):
    seconds = 10

    log_start = file_size(cam.log_path)

    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start(timeout=20)
            await v.wait_frames(1, 10)
            await athread(
                cam.wait_state,
                lambda s: s["viewers"] == 1 and s["capturing"] is True,
                5,
                "viewers == 1 and capturing",
            )
            streaming_state = cam.state()
            fe0 = streaming_state["frames_encoded"]
            t0 = now_ms()
            await asyncio.sleep(seconds)
            t1 = now_ms()
            fe1 = cam.state()["frames_encoded"]
            return v, t0, t1, fe0, fe1, streaming_state
        finally:
            await stop(v)

    v, t0, t1, fe0, fe1, streaming_state = run(body(), 60)
    # A normal session logs no WARN or ERROR, with the plain `log.level = "info"` these tests
    # set (logging.rs keeps the webrtc stack's non-actionable warnings out of it).
    with open(cam.log_path, "rb") as log:
        log.seek(log_start)
        lines = log.read().decode(errors="replace").splitlines()
    noisy = [ln for ln in lines if " WARN " in ln or " ERROR " in ln]
    assert not noisy, "a normal session logged:\n" + "\n".join(noisy[:10])
    assert (streaming_state["width"], streaming_state["height"]) == (WIDTH, HEIGHT), (
        f"state while capturing: {streaming_state}"
    )
    frames = window(v.frames, t0, t1)
    s = assert_stream(frames, seconds, 0.90, "viewer")
    all_s = summarize(v.frames)
    assert all_s["non_increasing"] == 0, f"seq not strictly increasing over the session: {all_s}"
    first = next(f for f in v.frames if f.crc_ok)
    record_metric("one_viewer.offer_to_first_frame_ms", round(v.t_first_frame_ms - v.t_offer_ms))
    record_metric("one_viewer.offer_to_answer_ms", round(v.t_answer_ms - v.t_offer_ms))
    record_metric("one_viewer.offer_to_connected_ms", round(v.t_connected_ms - v.t_offer_ms))
    record_metric("one_viewer.window", s)
    record_metric("one_viewer.first_seq", first.seq)
    record_metric("one_viewer.state_frames_encoded_delta", fe1 - fe0)
    lat = [latency_ms(f) for f in frames if f.crc_ok]
    assert min(lat) >= -5, (
        f"capture timestamps are in the future (min latency {min(lat)} ms): ts is not Unix ms"
    )
    assert s["latency_ms"]["p95"] < 1000, f"latency p95 {s['latency_ms']} ms"
    assert v.t_first_frame_ms - v.t_offer_ms < 10000, "offer -> first frame took over 10 s"
    # The camera started for this viewer: seq starts at 0 when capture starts (5.1).
    assert first.seq < FPS * 10, f"first frame seq {first.seq}: capture did not start at 0?"
    if fe1 != fe0:  # the state topic reported progress during the window: must agree
        assert abs((fe1 - fe0) - s["seq_span"]) <= 0.25 * s["seq_span"] + 35, (
            f"state frames_encoded advanced {fe1 - fe0}, video seq advanced {s['seq_span']}"
        )


def test_answer_sdp(cam):
    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start(timeout=20)
            await v.wait_frames(1, 10)
            return v
        finally:
            await stop(v)

    v = run(body(), 40)
    sdp = v.answer_sdp.replace("\r\n", "\n")
    sections = re.split(r"\n(?=m=)", sdp)
    video = [s for s in sections if s.startswith("m=video")]
    assert len(video) == 1, f"answer has {len(video)} video sections:\n{v.answer_sdp}"
    video = video[0]
    assert "a=sendonly" in video, f"video section not sendonly:\n{video}"
    pts = re.findall(r"a=rtpmap:(\d+) H264/90000", video)
    assert pts, f"no H264/90000 in answer:\n{video}"
    fmtp = " ".join(re.findall(rf"a=fmtp:{pts[0]} (.*)", video))
    assert "packetization-mode=1" in fmtp, f"fmtp {fmtp!r}"
    assert "profile-level-id=42e01f" in fmtp.lower(), f"fmtp {fmtp!r}"
    assert any(s.startswith("m=application") for s in sections), "no data channel in answer"
    # Trickled candidates (4.2) are RTCIceCandidateInit: sdpMid must name an m-section of
    # the answer (a browser rejects an sdpMid that matches no mid, e.g. ""), and
    # sdpMLineIndex must be that section's index.
    mids = [
        m.group(1) if (m := re.search(r"^a=mid:(\S+)", sec, re.MULTILINE)) else None
        for sec in sections
        if sec.startswith("m=")
    ]
    problems = []
    for c in v.remote_candidates:
        if c is None:
            continue
        if not str(c.get("candidate", "")).startswith("candidate:"):
            problems.append(f"candidate line does not start with 'candidate:': {c}")
        if c.get("sdpMid") not in mids:
            problems.append(f"sdpMid {c.get('sdpMid')!r} is not a mid of the answer {mids}: {c}")
        elif c.get("sdpMLineIndex") is not None and mids[c["sdpMLineIndex"]] != c["sdpMid"]:
            problems.append(f"sdpMLineIndex does not match sdpMid {mids}: {c}")
    inline = "a=candidate:" in v.answer_sdp
    assert inline or [c for c in v.remote_candidates if c], "device gave no ICE candidate at all"
    assert not problems, "\n".join(problems)


def test_control_ping_and_unknown_command(cam):
    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start(timeout=20)
            out = {}
            out["ping"] = await v.command("ping", id="p-1")
            out["ping_t"] = await v.command("ping", {"t": {"n": [1, 2, 3]}}, id=77)
            out["unknown"] = await v.command("self-destruct", id="u-1")
            rtts = []
            for _ in range(20):
                reply, rtt = await v.ping()
                assert reply.get("ok") is True, reply
                rtts.append(rtt)
            out["rtts"] = sorted(rtts)
            out["frames"] = len(v.frames)
            return out
        finally:
            await stop(v)

    out = run(body(), 40)
    assert out["ping"] == {"id": "p-1", "ok": True, "result": {"pong": True, "t": None}}, out[
        "ping"
    ]
    assert out["ping_t"] == {
        "id": 77,
        "ok": True,
        "result": {"pong": True, "t": {"n": [1, 2, 3]}},
    }, out["ping_t"]
    u = out["unknown"]
    assert u.get("id") == "u-1" and u.get("ok") is False, u
    assert u.get("error", {}).get("code") == "unknown-command", u
    assert isinstance(u["error"].get("message"), str), u
    record_metric(
        "control.ping_rtt_ms", {"p50": round(out["rtts"][10], 2), "max": round(out["rtts"][-1], 2)}
    )


def test_control_other_commands(cam):
    """The remaining documented commands and data-channel error codes (section 6)."""

    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start(timeout=20)
            r = {}
            r["keyframe"] = await v.command("keyframe", id="k")
            r["bitrate"] = await v.command("set-bitrate", {"bps": 500000}, id="b")
            r["low"] = await v.command("set-bitrate", {"bps": 50}, id="lo")
            r["badargs"] = await v.command("set-bitrate", {"bitrate": 500000}, id="ba")
            r["notjson"] = await v.command_raw("this is not json", reply_id=None)
            r["noid"] = await v.command_raw(json.dumps({"cmd": "ping"}), reply_id=None)
            n0 = len(v.frames)
            await v.wait_frames(30, 5)  # video still flows after all that
            r["frames_after"] = len(v.frames) - n0
            return r
        finally:
            await stop(v)

    r = run(body(), 40)
    problems = []

    def expect(name, ok, code=None, result=None):
        got = r[name]
        if got.get("ok") is not ok:
            problems.append(f"{name}: ok != {ok}: {got}")
        elif code and got.get("error", {}).get("code") != code:
            problems.append(f"{name}: error.code != {code}: {got}")
        elif result is not None and got.get("result") != result:
            problems.append(f"{name}: result != {result}: {got}")

    expect("keyframe", True, result={})
    expect("bitrate", True, result={"bps": 500000})
    expect("low", False, "out-of-range")
    expect("badargs", False, "bad-args")
    expect("notjson", False, "bad-json")
    expect("noid", False, "bad-request")
    assert not problems, "\n".join(problems)


def test_trickled_viewer_candidates(cam):
    """Offer without candidates; they follow as `candidate` messages before the answer (4.2)."""

    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start(timeout=20, trickle=True)
            await v.wait_frames(FPS, 10)
            return v
        finally:
            await stop(v)

    v = run(body(), 40)
    assert "a=candidate" not in v.offer_sdp
    assert not v.errors, f"device rejected trickled candidates: {v.errors}"
    s = summarize(v.frames)
    assert s["crc_ok"] >= 0.95 * s["frames"], s


def test_two_concurrent_viewers(cam):
    seconds = 5

    async def body():
        a = Viewer(HOST, cam.broker_port, cam.device)
        b = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await asyncio.gather(a.start(timeout=25), b.start(timeout=25))
            await asyncio.gather(a.wait_frames(1, 10), b.wait_frames(1, 10))
            await athread(cam.wait_state, lambda s: s["viewers"] == 2, 5, "viewers == 2")
            t0 = now_ms()
            await asyncio.sleep(seconds)
            return a, b, t0, now_ms()
        finally:
            await stop(a, b)

    a, b, t0, t1 = run(body(), 60)
    sa = assert_stream(window(a.frames, t0, t1), seconds, 0.80, "viewer A")
    sb = assert_stream(window(b.frames, t0, t1), seconds, 0.80, "viewer B")
    record_metric("two_viewers", {"A": sa, "B": sb})
    # Same camera: both see the same frame numbers during the window.
    seqs_a = {f.seq for f in window(a.frames, t0, t1) if f.crc_ok}
    seqs_b = {f.seq for f in window(b.frames, t0, t1) if f.crc_ok}
    assert len(seqs_a & seqs_b) >= 0.7 * FPS * seconds, (
        f"viewers see different frame numbers: A {min(seqs_a)}..{max(seqs_a)}, "
        f"B {min(seqs_b)}..{max(seqs_b)}"
    )


def _offer_sdp_stub() -> str:
    return (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=recvonly\r\n"
        "a=rtpmap:102 H264/90000\r\n"
    )


def test_malformed_signaling_is_rejected_and_isolated(cam):
    cand = {
        "candidate": "candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
        "sdpMid": "0",
        "sdpMLineIndex": 0,
    }
    big_sdp = _offer_sdp_stub() + "a=x-padding:" + "x" * 17000 + "\r\n"
    cases = [
        # (name, payload, expected error code)
        ("not-json", b"this is { not json", "bad-json"),
        ("json-array", b"[1, 2, 3]", "bad-json"),
        ("missing-sdp", {"v": 1, "type": "offer"}, "bad-schema"),
        ("sdp-not-string", {"v": 1, "type": "offer", "sdp": 42}, "bad-schema"),
        ("unknown-type", {"v": 1, "type": "hello"}, "bad-schema"),
        (
            "extra-field",
            {"v": 1, "type": "offer", "sdp": _offer_sdp_stub(), "colour": "red"},
            "bad-schema",
        ),
        # "missing field" (bad-schema) or "v is not 1" (unsupported-version): both readings
        # of section 4.5 are accepted.
        (
            "missing-v",
            {"type": "offer", "sdp": _offer_sdp_stub()},
            ("bad-schema", "unsupported-version"),
        ),
        ("v2", {"v": 2, "type": "offer", "sdp": _offer_sdp_stub()}, "unsupported-version"),
        ("sdp-too-large", {"v": 1, "type": "offer", "sdp": big_sdp}, "sdp-too-large"),
        (
            "payload-too-large",
            # Over mqtt.max_payload_bytes (65536) once signed, under the MQTT 5 Maximum Packet
            # Size rtcam announces (max_payload_bytes + 4 KiB): larger ones the broker drops.
            json.dumps({"v": 1, "type": "offer", "sdp": "x" * 65600}).encode(),
            "payload-too-large",
        ),
        ("garbage-sdp", {"v": 1, "type": "offer", "sdp": "this is not SDP"}, "bad-sdp"),
        ("candidate-unknown", {"v": 1, "type": "candidate", "candidate": cand}, "unknown-session"),
        ("bye-unknown", {"v": 1, "type": "bye"}, "unknown-session"),
    ]
    # Signed mode: each payload above is sent as the `msg` of an envelope signed by a viewer
    # with a valid credential, so the device's message checks (§4.5) are what answer it. These
    # are sent as they are, unsigned (§9.4):
    unsigned = [
        ("unsigned-offer", {"v": 1, "type": "offer", "sdp": _offer_sdp_stub()}, "unauthorized"),
        ("unsigned-junk", b"this is { not json", "bad-json"),
        ("unsigned-v2", {"v": 2, "type": "signed"}, "unsupported-version"),
        ("unsigned-bye", {"v": 1, "type": "bye"}, "unauthorized"),
    ]
    all_cases = cases + unsigned

    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        signer = Viewer(HOST, cam.broker_port, cam.device)  # another viewer's key and credential
        loop = asyncio.get_running_loop()
        probe = MqttLink(HOST, cam.broker_port, f"e2e-probe-{v.session}", loop)
        replies: dict[str, list] = {}
        sigs: dict[str, str] = {}

        def on_out(topic, payload):
            replies.setdefault(topic.split("/")[-2], []).append(device_message(topic, payload))

        try:
            await v.start(timeout=20)
            await v.wait_frames(10, 10)
            await probe.connect()
            await probe.subscribe(f"{PREFIX}/{cam.device}/session/+/out", on_out)
            n_before = len(v.frames)
            t_begin = now_ms()
            sids = {}
            for name, payload, _code in all_cases:
                sid = f"bad-{name}-{v.session[:6]}"
                sids[name] = sid
                topic = f"{PREFIX}/{cam.device}/session/{sid}/in"
                body_ = payload if isinstance(payload, bytes) else json.dumps(payload)
                if not name.startswith("unsigned-"):
                    body_ = signer.seal(body_, topic, cred=True)
                    sigs[name] = json.loads(body_)["sig"]
                await probe.publish(topic, body_)
            # On the live session of the first viewer: a second offer, a broken candidate.
            await v.send({"v": 1, "type": "offer", "sdp": v.offer_sdp})
            await v.send(
                {
                    "v": 1,
                    "type": "candidate",
                    "candidate": {
                        "candidate": "candidate:garbage",
                        "sdpMid": "0",
                        "sdpMLineIndex": 0,
                    },
                }
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if all(replies.get(s) for s in sids.values()) and len(v.errors) >= 2:
                    break
                await asyncio.sleep(0.1)
            # bad-sdp removes the session: a candidate for it is now unknown.
            topic = f"{PREFIX}/{cam.device}/session/{sids['garbage-sdp']}/in"
            await probe.publish(
                topic,
                signer.seal({"v": 1, "type": "candidate", "candidate": cand}, topic, cred=True),
            )
            await asyncio.sleep(1.0)
            t_end = now_ms()
            n_during = len(v.frames) - n_before
            await v.wait_frames(2 * FPS, 5)  # and it keeps flowing afterwards
            state = cam.state()
            return v, replies, sids, sigs, t_begin, t_end, n_during, state
        finally:
            probe.close()
            await stop(v)

    v, replies, sids, sigs, t_begin, t_end, n_during, state = run(body(), 60)
    problems = []
    for name, _payload, code in all_cases:
        got = replies.get(sids[name], [])
        if name == "garbage-sdp":
            want = [code, "unknown-session"]
            codes = [m.get("code") for m in got]
            if codes != want:
                problems.append(f"{name}: expected error codes {want}, got {got}")
            continue
        if len(got) != 1:
            problems.append(f"{name}: expected exactly one reply with code {code!r}, got {got}")
            continue
        m = got[0]
        codes = code if isinstance(code, tuple) else (code,)
        if not (
            m.get("v") == 1
            and m.get("type") == "error"
            and m.get("code") in codes
            and isinstance(m.get("reason"), str)
        ):
            problems.append(
                f"{name}: expected {{v:1,type:error,code:{code!r},reason:str}}, got {m}"
            )
        # Signed mode: an error names the envelope it is about (`ref`, §9.6): its sig, or
        # null for one without a signature; payload-too-large is refused unread.
        want_ref = sigs.get(name) if name != "payload-too-large" else None
        if m.get("ref", "absent") != want_ref:
            problems.append(f"{name}: expected ref {want_ref!r}, got {m}")
    live = [e.get("code") for e in v.errors]
    if live != ["session-exists", "bad-candidate"]:
        problems.append(
            "second offer, then a broken candidate, on the live session: expected "
            f"[session-exists, bad-candidate], got {v.errors}"
        )
    assert not problems, "malformed signaling:\n" + "\n".join(problems)
    assert n_during >= FPS * (t_end - t_begin) / 1000 * 0.8, (
        f"first viewer got only {n_during} frames in {(t_end - t_begin) / 1000:.1f} s of bad messages"
    )
    assert max_gap_ms(window(v.frames, t_begin, t_end + 2000)) < 500, (
        "video stalled during bad messages"
    )
    assert summarize(v.frames)["non_increasing"] == 0
    assert state["viewers"] == 1, f"bad offers changed the viewer count: {state}"


def test_max_viewers(make_rtcam):
    cam1 = make_rtcam("testcam-max1", webrtc__max_viewers=1)

    async def body():
        a = Viewer(HOST, cam1.broker_port, cam1.device)
        b = Viewer(HOST, cam1.broker_port, cam1.device)
        c = Viewer(HOST, cam1.broker_port, cam1.device)
        try:
            await a.start(timeout=20)
            await a.wait_frames(10, 10)
            with pytest.raises(ViewerError) as refused:
                await b.start(timeout=10)
            n0 = len(a.frames)
            await a.wait_frames(FPS, 5)
            flowing = len(a.frames) - n0
            st = cam1.state()
            await a.bye()
            await athread(cam1.wait_idle, 10)
            await c.start(timeout=20)  # the slot is free again
            await c.wait_frames(10, 10)
            return refused.value, flowing, st
        finally:
            await stop(a, b, c)

    refused, flowing, st = run(body(), 90)
    assert refused.code == "max-viewers", f"second offer: {refused} {refused.reply}"
    assert isinstance(refused.reply.get("reason"), str)
    assert flowing >= FPS, "first viewer stalled after the refused offer"
    assert st["max_viewers"] == 1 and st["viewers"] == 1, st


def test_killed_viewer_is_freed(cam, monitor):
    async def body():
        vp = ViewerProcess(HOST, cam.broker_port, cam.device, "--duration", "120")
        loop = asyncio.get_running_loop()
        probe = MqttLink(HOST, cam.broker_port, f"e2e-probe-{vp.session}", loop)
        device_msgs: list[dict] = []
        await probe.connect()
        await probe.subscribe(
            f"{PREFIX}/{cam.device}/session/{vp.session}/out",
            lambda t, p: device_msgs.append(device_message(t, p)),
        )
        try:
            await vp.start()
            first = await vp.wait_event("first-frame", 30)
            await asyncio.sleep(2)
            await athread(
                cam.wait_state,
                lambda s: s["viewers"] == 1 and s["capturing"] is True,
                5,
                "viewers == 1 while the viewer process streams",
            )
            t_kill = time.monotonic()
            vp.kill()
            await vp.wait()
            await athread(cam.wait_idle, 20)
            freed_s = time.monotonic() - t_kill
            await asyncio.sleep(1)
            return first, freed_s, device_msgs
        finally:
            vp.kill()
            probe.close()

    first, freed_s, msgs = run(body(), 90)
    record_metric("killed_viewer.freed_after_s", round(freed_s, 2))
    assert first["frame"]["crc_ok"], first
    byes = [m for m in msgs if m.get("type") == "bye"]
    assert byes and byes[-1].get("reason") in ("timeout", "ice-failed", "closed"), (
        f"device should send bye with reason timeout/ice-failed/closed after a vanished viewer; "
        f"got on out: {[m for m in msgs if m.get('type') != 'candidate']}"
    )


def test_bye_frees_session_promptly(cam, monitor):
    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        loop = asyncio.get_running_loop()
        probe = MqttLink(HOST, cam.broker_port, f"e2e-probe-{v.session}", loop)
        after_bye: list[dict] = []
        await probe.connect()
        try:
            await v.start(timeout=20)
            await v.wait_frames(10, 10)
            await athread(cam.wait_state, lambda s: s["viewers"] == 1, 5, "viewers == 1")
            await probe.subscribe(v.topic_out, lambda t, p: after_bye.append(device_message(t, p)))
            t_bye = time.monotonic()
            await v.send({"v": 1, "type": "bye"})
            await athread(cam.wait_idle, 5)
            freed_s = time.monotonic() - t_bye
            await v.close()
            # The session is gone: a candidate for it is an unknown session now (signed by
            # the viewer, with its credential: without a session its key is not bound).
            await probe.publish(
                v.topic_in, v.seal({"v": 1, "type": "candidate", "candidate": None}, cred=True)
            )
            await asyncio.sleep(1.5)
            return freed_s, after_bye
        finally:
            probe.close()
            await stop(v)

    freed_s, after_bye = run(body(), 60)
    record_metric("bye.freed_after_s", round(freed_s, 2))
    assert freed_s <= 3.0, f"session freed {freed_s:.1f} s after bye"
    assert not [m for m in after_bye if m.get("type") == "bye"], (
        f"device must not answer a viewer's bye with bye (4.6): {after_bye}"
    )
    assert [m.get("code") for m in after_bye if m.get("type") == "error"] == ["unknown-session"], (
        f"candidate after bye: expected unknown-session, got {after_bye}"
    )


def test_shutdown_sends_bye_and_offline(make_rtcam, monitor):
    cam2 = make_rtcam("testcam-shutdown")

    async def body():
        v = Viewer(HOST, cam2.broker_port, cam2.device)
        try:
            await v.start(timeout=20)
            await v.wait_frames(10, 10)
            t0 = time.monotonic()
            rc = await athread(cam2.stop, 10.0)
            stop_s = time.monotonic() - t0
            await asyncio.sleep(1)
            return v, rc, stop_s
        finally:
            await stop(v)

    v, rc, stop_s = run(body(), 60)
    assert rc == 0, f"rtcam exit code after SIGTERM: {rc} (None = had to SIGKILL after 10 s)"
    record_metric("shutdown.stop_s", round(stop_s, 2))
    status = monitor.latest(cam2.topic_status)
    assert status == {
        "v": 1,
        "status": "offline",
        "device": cam2.device,
        "protocol": 1,
        "auth": "signed",
        "key": cam2.device_key,
    }, status
    assert [b.get("reason") for b in v.byes] == ["shutdown"], f"viewer got byes {v.byes}"


def test_unconnected_session_times_out(make_rtcam, monitor):
    """An offer whose ICE never completes is dropped after connect_timeout_ms with bye (4.6)."""
    cam3 = make_rtcam("testcam-timeout", webrtc__connect_timeout_ms=3000)

    async def body():
        loop = asyncio.get_running_loop()
        pc = RTCPeerConnection(rtc_configuration())
        pc.addTransceiver("video", direction="recvonly")
        pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        sdp, _cands = strip_candidates(pc.localDescription.sdp)
        await pc.close()  # the device gets no candidate and nobody answers its checks
        sid = "never-connects"
        got: list[tuple[float, dict]] = []
        probe = MqttLink(HOST, cam3.broker_port, "e2e-probe-timeout", loop)
        await probe.connect()
        try:
            await probe.subscribe(
                f"{PREFIX}/{cam3.device}/session/{sid}/out",
                lambda t, p: got.append((time.monotonic(), device_message(t, p))),
            )
            t0 = time.monotonic()
            topic = f"{PREFIX}/{cam3.device}/session/{sid}/in"
            signer = Viewer(HOST, cam3.broker_port, cam3.device)
            await probe.publish(
                topic, signer.seal({"v": 1, "type": "offer", "sdp": sdp}, topic, cred=True)
            )
            deadline = t0 + 15
            while time.monotonic() < deadline and not any(m.get("type") == "bye" for _, m in got):
                await asyncio.sleep(0.1)
            await athread(cam3.wait_idle, 5)
            return t0, got
        finally:
            probe.close()

    t0, got = run(body(), 40)
    kinds = [m.get("type") for _, m in got]
    assert "answer" in kinds, f"no answer to a valid offer: {got}"
    byes = [(t, m) for t, m in got if m.get("type") == "bye"]
    assert byes, f"no bye within 15 s for a session that never connected: {kinds}"
    t_bye, bye = byes[0]
    record_metric("connect_timeout.bye_after_s", round(t_bye - t0, 2))
    assert bye.get("reason") in ("timeout", "ice-failed"), bye
    assert 2.5 <= t_bye - t0 <= 8, f"bye {t_bye - t0:.1f} s after the offer; connect_timeout is 3 s"


def test_last_will_offline(make_rtcam, monitor):
    """A device that vanishes (SIGKILL) is reported offline by the broker's last will (3.1)."""
    cam4 = make_rtcam("testcam-lwt")
    cam4.kill()
    status = monitor.wait_for(
        cam4.topic_status, lambda m: m.get("status") == "offline", 10, "offline (last will)"
    )
    assert status == {
        "v": 1,
        "status": "offline",
        "device": cam4.device,
        "protocol": 1,
        "auth": "signed",
        "key": cam4.device_key,
    }, status
