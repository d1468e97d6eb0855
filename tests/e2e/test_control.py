"""End-to-end tests of the control plane (docs/protocol.md §6-7): MQTT commands with reply
correlation, live resolution changes, forwarding to other services, events, and abuse."""

from __future__ import annotations

import asyncio
import json

from conftest import HOST, PREFIX, record_metric
from viewer import MqttLink, Viewer

from test_stream import run, stop


def test_mqtt_commands_reply_where_asked(cam):
    async def body():
        loop = asyncio.get_running_loop()
        dash = MqttLink(HOST, cam.broker_port, "e2e-dashboard", loop)
        got: list[tuple[str, dict]] = []

        def on_reply(topic, payload):
            got.append((topic, json.loads(payload)))

        await dash.connect()
        await dash.subscribe("dash/replies", on_reply)
        await dash.subscribe(f"{PREFIX}/{cam.device}/command/reply", on_reply)
        cmd_topic = f"{PREFIX}/{cam.device}/command"
        await dash.publish(cmd_topic, json.dumps({"id": "s1", "cmd": "get-state", "reply_to": "dash/replies"}))
        await dash.publish(cmd_topic, json.dumps({"id": 2, "cmd": "set-bitrate", "args": {"bps": 800000}}))
        await dash.publish(cmd_topic, json.dumps({"id": 3, "cmd": "set-bitrate", "args": {"bps": 1}, "reply_to": "dash/replies"}))
        await dash.publish(cmd_topic, b"{broken")
        await dash.publish(cmd_topic, json.dumps({"id": 4, "cmd": "ptz.move", "reply_to": "dash/replies"}))
        for _ in range(100):
            if len(got) >= 5:
                break
            await asyncio.sleep(0.05)
        # Restore the default for later tests.
        await dash.publish(cmd_topic, json.dumps({"id": 5, "cmd": "set-bitrate", "args": {"bps": 1000000}}))
        await asyncio.sleep(0.3)
        dash.close()
        return got

    got = run(body(), 30)
    by_id = {json.dumps(m.get("id")): (t, m) for t, m in got}
    topic, state = by_id['"s1"']
    assert topic == "dash/replies", got
    assert state["ok"] is True and state["result"]["viewers"] == 0, state
    assert state["result"]["width"] == 640 and state["result"]["max_viewers"] == 4, state
    topic, m = by_id["2"]
    assert topic == f"{PREFIX}/{cam.device}/command/reply" and m["result"] == {"bps": 800000}, m
    topic, m = by_id["3"]
    assert topic == "dash/replies" and m["error"]["code"] == "out-of-range", m
    topic, m = by_id["null"]
    assert m["error"]["code"] == "bad-json", m
    topic, m = by_id["4"]
    assert m["ok"] is False and m["error"]["code"] == "not-allowed", m


def test_set_resolution_and_fps_keep_the_peer_connection(cam):
    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start(timeout=20)
            await v.wait_frames(10, 10)
            r1 = await v.command("set-resolution", {"width": 320, "height": 240}, timeout=10)
            n = len(v.frames)
            await v.wait_frames(n + 20, 10)
            small = [f for f in v.frames[n:] if f.width == 320 and f.height == 240]
            r2 = await v.command("set-fps", {"fps": 15}, timeout=10)
            r3 = await v.command("set-resolution", {"width": 100000, "height": 240})
            r4 = await v.command("set-resolution", {"width": 640, "height": 480}, timeout=10)
            r5 = await v.command("set-fps", {"fps": 30}, timeout=10)
            n = len(v.frames)
            await v.wait_frames(n + 20, 10)
            big = [f for f in v.frames[n:] if f.width == 640 and f.height == 480]
            return r1, r2, r3, r4, r5, small, big, v.connection_states[-1]
        finally:
            await stop(v)

    r1, r2, r3, r4, r5, small, big, state = run(body(), 60)
    assert r1 == {"id": r1["id"], "ok": True, "result": {"width": 320, "height": 240}}, r1
    assert r2["ok"] and r2["result"] == {"fps": 15}, r2
    assert r3["ok"] is False and r3["error"]["code"] == "out-of-range", r3
    assert r4["ok"] and r5["ok"], (r4, r5)
    assert len(small) >= 15, f"frames at 320x240 after the change: {len(small)}"
    assert all(f.crc_ok for f in small), "pattern readable at the new size"
    assert len(big) >= 15, f"frames at 640x480 after changing back: {len(big)}"
    assert state == "connected", state


def test_forwarding_reaches_the_service_and_only_the_asker(make_rtcam):
    cam = make_rtcam("fwdcam", control__forward_namespaces=["ptz"], control__forward_timeout_ms=1500)

    async def body():
        loop = asyncio.get_running_loop()
        service = MqttLink(HOST, cam.broker_port, "e2e-ptz-service", loop)
        received: list[dict] = []

        def on_forward(topic, payload):
            msg = json.loads(payload)
            received.append(msg)
            if msg["cmd"] == "ptz.move":
                reply = {"session": msg["session"], "id": msg["id"], "ok": True, "result": {"pan": msg["args"]["pan"]}}
                loop.create_task(service.publish(msg["reply_to"], json.dumps(reply)))

        await service.connect()
        await service.subscribe(f"{PREFIX}/{cam.device}/forward/ptz", on_forward)
        a = Viewer(HOST, cam.broker_port, cam.device)
        b = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await a.start(timeout=20)
            await b.start(timeout=20)
            moved = await a.command("ptz.move", {"pan": 15}, id="mv-1", timeout=5)
            refused = await a.command("light.on", id="l-1")
            silent = await a.command("ptz.home", id="h-1", timeout=5)  # service never answers
            await service.publish(f"{PREFIX}/{cam.device}/events", json.dumps({"door": "open"}))
            # A forged reply for a command nobody sent must not reach anyone.
            await service.publish(
                f"{PREFIX}/{cam.device}/forward/reply",
                json.dumps({"session": b.session, "id": "forged", "ok": True}),
            )
            await asyncio.sleep(1.0)
            n = len(a.frames)
            await a.wait_frames(n + 10, 5)
            return received, moved, refused, silent, a.session, list(a.unmatched_replies), list(b.unmatched_replies)
        finally:
            await stop(a, b)
            service.close()

    received, moved, refused, silent, a_session, a_extra, b_extra = run(body(), 60)
    move = [m for m in received if m["cmd"] == "ptz.move"]
    assert len(move) == 1, received
    assert move[0]["session"] == a_session and move[0]["id"] == "mv-1" and move[0]["args"] == {"pan": 15}
    assert moved == {"id": "mv-1", "ok": True, "result": {"pan": 15}}, moved
    assert refused["ok"] is False and refused["error"]["code"] == "not-allowed", refused
    assert not any(m["cmd"].startswith("light") for m in received), "refused commands are never forwarded"
    assert silent["ok"] is False and silent["error"]["code"] == "timeout", silent
    assert {"event": {"door": "open"}} in a_extra, a_extra
    assert {"event": {"door": "open"}} in b_extra, b_extra
    assert not any(m.get("id") == "forged" for m in b_extra), b_extra
    assert not any(m.get("id") == "mv-1" for m in b_extra), "B never sees A's reply"


def test_command_flood_is_refused_and_video_keeps_flowing(cam):
    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start(timeout=20)
            await v.wait_frames(10, 10)
            n0 = len(v.frames)
            kinds = [
                "not json at all",
                json.dumps({"id": "x", "cmd": "set-bitrate", "args": {"bps": -1}}),
                json.dumps({"id": "x", "cmd": "set-fps", "args": {"fps": 1000}}),
                json.dumps({"id": "x", "cmd": "nope"}),
                json.dumps([1, 2, 3]),
            ]
            for i in range(1000):
                v.dc.send(kinds[i % len(kinds)])
                if i % 100 == 0:
                    await asyncio.sleep(0)
            for _ in range(100):
                if len(v.unmatched_replies) >= 1000:
                    break
                await asyncio.sleep(0.1)
            await v.wait_frames(n0 + 60, 10)
            ping = await v.command("ping", id="after", timeout=10)
            return list(v.unmatched_replies), len(v.frames) - n0, ping
        finally:
            await stop(v)

    replies, frames, ping = run(body(), 60)
    assert len(replies) == 1000, f"every message answered: {len(replies)}"
    assert all(r.get("ok") is False for r in replies), [r for r in replies if r.get("ok")][:3]
    codes = {r["error"]["code"] for r in replies}
    assert codes <= {"bad-json", "bad-args", "out-of-range", "unknown-command", "rate-limited"}, codes
    assert "rate-limited" in codes, "1000 commands at once exceed the per-session limit"
    assert frames >= 60, f"video kept flowing: {frames} frames"
    assert ping["ok"] is True, ping


def _jpeg_luma(jpeg: bytes):
    import io

    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(jpeg))
    img.load()
    # PIL's YCbCr is full range; the pattern reader expects limited-range luma.
    y = np.asarray(img.convert("YCbCr"))[:, :, 0].astype(np.float32)
    return img.format, img.size, (y * 219.0 / 255.0 + 16.0).round().astype(np.uint8)


def test_snapshot_over_data_channel_and_mqtt(cam):
    from pattern import _read_row, cell_size, crc8

    def read_stamp(y):
        b = cell_size(y.shape[1])
        seq, seq_crc = _read_row(y, 0, b)
        ts, ts_crc = _read_row(y, 1, b)
        return (seq, ts) if crc8(seq) == seq_crc and crc8(ts) == ts_crc else None

    async def body():
        loop = asyncio.get_running_loop()
        dash = MqttLink(HOST, cam.broker_port, "e2e-snapshot-dash", loop)
        images: list[bytes] = []
        replies: list[dict] = []
        await dash.connect()
        await dash.subscribe(f"{PREFIX}/{cam.device}/snapshot", lambda t, p: images.append(p))
        await dash.subscribe("dash/snap", lambda t, p: replies.append(json.loads(p)))
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start(timeout=20)
            await v.wait_frames(10, 10)
            header = await v.command("snapshot", id="snap-1", timeout=10)
            for _ in range(100):
                chunks = [m["_raw"] for m in v.unmatched_replies if isinstance(m.get("_raw"), bytes)]
                if header.get("ok") and len(chunks) >= header["result"]["chunks"]:
                    break
                await asyncio.sleep(0.05)
            last_seq = v.frames[-1].seq
            await dash.publish(
                f"{PREFIX}/{cam.device}/command",
                json.dumps({"id": "m-snap", "cmd": "snapshot", "args": {"quality": 60}, "reply_to": "dash/snap"}),
            )
            for _ in range(100):
                if replies and images:
                    break
                await asyncio.sleep(0.05)
            return header, b"".join(chunks), last_seq, replies, images
        finally:
            await stop(v)
            dash.close()

    header, jpeg, last_seq, replies, images = run(body(), 60)
    assert header["ok"] is True, header
    res = header["result"]
    assert res["type"] == "image/jpeg" and res["size"] == len(jpeg), (res, len(jpeg))
    fmt, size, luma = _jpeg_luma(jpeg)
    assert fmt == "JPEG" and size == (640, 480), (fmt, size)
    stamp = read_stamp(luma)
    assert stamp is not None, "the snapshot carries a readable frame stamp"
    assert abs(stamp[0] - last_seq) <= 30, f"snapshot seq {stamp[0]} is the current frame (viewer at {last_seq})"
    assert replies and replies[0]["ok"] is True, replies
    assert replies[0]["result"]["topic"] == f"{PREFIX}/{cam.device}/snapshot", replies
    fmt, size, _ = _jpeg_luma(images[-1])
    assert fmt == "JPEG" and size == (640, 480)


def test_home_assistant_discovery_and_rediscovery(make_rtcam):
    cam = make_rtcam("hacam", homeassistant__enabled=True)

    async def body():
        loop = asyncio.get_running_loop()
        ha = MqttLink(HOST, cam.broker_port, "e2e-home-assistant", loop)
        configs: list[dict] = []
        replies: list[dict] = []
        await ha.connect()
        await ha.subscribe("homeassistant/device/hacam/config", lambda t, p: configs.append(json.loads(p)))
        await ha.subscribe(f"{PREFIX}/hacam/command/reply", lambda t, p: replies.append(json.loads(p)))
        for _ in range(100):
            if configs:
                break
            await asyncio.sleep(0.05)
        first = len(configs)
        await ha.publish("homeassistant/status", "online")
        for _ in range(100):
            if len(configs) > first:
                break
            await asyncio.sleep(0.05)
        # Press the keyframe button and move the bitrate number the way HA would.
        d = configs[0]["cmps"]
        await ha.publish(d["keyframe"]["command_topic"], d["keyframe"]["payload_press"])
        bitrate_cmd = d["bitrate"]["command_template"].replace("{{ value | int }}", "700000")
        await ha.publish(d["bitrate"]["command_topic"], bitrate_cmd)
        for _ in range(100):
            if len(replies) >= 2:
                break
            await asyncio.sleep(0.05)
        await ha.publish(d["bitrate"]["command_topic"], d["bitrate"]["command_template"].replace("{{ value | int }}", "1000000"))
        # Once rtcam has probed its source, discovery carries a number per integer control.
        for _ in range(100):
            if any("control_brightness" in c["cmps"] for c in configs):
                break
            await asyncio.sleep(0.05)
        with_controls = [c for c in configs if "control_brightness" in c["cmps"]]
        if with_controls:
            b = with_controls[-1]["cmps"]["control_brightness"]
            await ha.publish(b["command_topic"], b["command_template"].replace("{{ value | int }}", "-12"))
            cam.wait_state(lambda s: s.get("controls", {}).get("brightness") == -12, 5, "brightness -12 in state")
            await ha.publish(b["command_topic"], b["command_template"].replace("{{ value | int }}", "0"))
        await asyncio.sleep(0.2)
        ha.close()
        return configs, first, replies, with_controls

    configs, first, replies, with_controls = run(body(), 30)
    assert first >= 1, "retained discovery message present"
    assert len(configs) > first, "republished when homeassistant/status went online"
    d = configs[0]
    assert d["dev"]["ids"] == ["rtcam_hacam"] and d["dev"]["mf"] == "rtcam", d["dev"]
    av = d["availability"][0]
    assert av["topic"] == f"{PREFIX}/hacam/status" and av["payload_available"] == "online", av
    c = d["cmps"]
    assert c["snapshot_image"]["p"] == "image" and c["snapshot_image"]["image_topic"] == f"{PREFIX}/hacam/snapshot"
    assert c["snapshot"]["p"] == "button" and c["keyframe"]["p"] == "button"
    for name, lo, hi in [("bitrate", 100000, 20000000), ("fps", 1, 60)]:
        assert c[name]["p"] == "number" and (c[name]["min"], c[name]["max"]) == (lo, hi), c[name]
        assert c[name]["state_topic"] == f"{PREFIX}/hacam/state", c[name]
    assert c["resolution"]["p"] == "select" and "640x480" in c["resolution"]["options"]
    for s in ("viewers", "fps_sensor", "bitrate_sensor"):
        assert c[s]["p"] == "sensor" and c[s]["value_template"].startswith("{{ value_json."), c[s]
    ids = [v["unique_id"] for v in c.values()]
    assert len(ids) == len(set(ids)), ids
    assert {"id": "ha-keyframe", "ok": True, "result": {}} in replies, replies
    assert {"id": "ha-set-bitrate", "ok": True, "result": {"bps": 700000}} in replies, replies
    assert with_controls, "discovery gained the source's controls after the startup probe"
    b = with_controls[-1]["cmps"]["control_brightness"]
    assert b["p"] == "number" and (b["min"], b["max"], b["step"]) == (-64, 64, 1), b
    assert b["state_topic"] == f"{PREFIX}/hacam/state", b
    assert b["value_template"] == "{{ value_json.controls['brightness'] }}", b
    assert {"id": "ha-set-control", "ok": True, "result": {"name": "brightness", "value": -12}} in replies, replies


def test_controls_are_validated_and_reflected_in_state(cam, monitor):
    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start(timeout=20)
            await v.wait_frames(5, 10)
            listed = await v.command("list-controls", timeout=10)
            bad = await v.command("set-control", {"name": "brightness", "value": 500}, timeout=10)
            unknown = await v.command("set-control", {"name": "warp_drive", "value": 1}, timeout=10)
            after_bad = await v.command("get-control", {"name": "brightness"}, timeout=10)
            good = await v.command("set-control", {"name": "brightness", "value": -30}, timeout=10)
            state = cam.wait_state(lambda s: s.get("controls", {}).get("brightness") == -30, 5, "brightness in state")
            reset = await v.command("set-control", {"name": "brightness", "value": 0}, timeout=10)
            return listed, bad, unknown, after_bad, good, state, reset
        finally:
            await stop(v)

    listed, bad, unknown, after_bad, good, state, reset = run(body(), 40)
    controls = {c["name"]: c for c in listed["result"]["controls"]}
    b = controls["brightness"]
    assert (b["kind"], b["min"], b["max"], b["step"]) == ("integer", -64, 64, 1), b
    assert bad["ok"] is False and bad["error"]["code"] == "out-of-range", bad
    assert unknown["ok"] is False and unknown["error"]["code"] == "bad-args", unknown
    assert after_bad["result"] == {"name": "brightness", "value": 0}, "refused value changed nothing"
    assert good["result"] == {"name": "brightness", "value": -30}, good
    assert state["controls"]["brightness"] == -30, state
    assert reset["ok"] is True


async def measured_bps(v: Viewer, settle: float, window: float) -> float:
    """Bits per second arriving at the viewer over `window` seconds, after `settle` seconds."""
    await asyncio.sleep(settle)
    b0, t0 = v.video_payload_bytes(), asyncio.get_running_loop().time()
    await asyncio.sleep(window)
    b1, t1 = v.video_payload_bytes(), asyncio.get_running_loop().time()
    return (b1 - b0) * 8 / (t1 - t0)


def test_received_bitrate_follows_set_bitrate(make_rtcam):
    # Fresh noise under the box: content that needs every bit it is given up to about
    # 1.6 Mbit/s at 640x480, like a busy scene.
    # Without webrtc.adaptation: this checks that the encoder obeys set-bitrate. With it, the
    # encoder follows the viewer's bandwidth estimate below that ceiling, which starts at
    # 1 Mbit/s and climbs over seconds after the ceiling rises (tests/e2e/test_network.py and
    # the README's performance section measure that).
    cam = make_rtcam(
        "ratecam",
        capture__test_pattern_noise=True,
        encoder__bitrate=1500000,
        webrtc__adaptation=False,
    )

    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start()
            await v.wait_frames(10, 10)
            high1 = await measured_bps(v, 1.0, 4.0)
            low_reply = await v.command("set-bitrate", {"bps": 300000}, timeout=10)
            low = await measured_bps(v, 2.0, 4.0)
            high_reply = await v.command("set-bitrate", {"bps": 1500000}, timeout=10)
            high2 = await measured_bps(v, 2.0, 4.0)
            return high1, low, high2, low_reply, high_reply
        finally:
            await stop(v)

    high1, low, high2, low_reply, high_reply = run(body(), 60)
    record_metric("bitrate_follow.kbps", {"1500k": round(high1 / 1000), "300k": round(low / 1000), "1500k again": round(high2 / 1000)})
    assert low_reply["ok"] and high_reply["ok"], (low_reply, high_reply)
    # RTP headers add a little; openh264's rate control lands within tens of percent.
    assert 0.6 * 1500000 <= high1 <= 1.4 * 1500000, high1
    assert 0.5 * 300000 <= low <= 1.4 * 300000, low
    assert 0.6 * 1500000 <= high2 <= 1.4 * 1500000, high2
    assert high1 > 3 * low and high2 > 3 * low, (high1, low, high2)
