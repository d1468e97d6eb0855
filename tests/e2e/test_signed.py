"""End-to-end tests of signed mode (docs/protocol.md §9, docs/security.md): what a client on
the shared broker can no longer do, with real mosquitto, real rtcam and aiortc viewers.

Every viewer here signs with rtcam_auth.py (Python `cryptography` + PyJWT), not rtcam's code.
The attackers are ordinary MQTT clients on the same broker, with or without credentials of
their own. Each test fails against a device without signed mode (issue 11).
"""

from __future__ import annotations

import asyncio
import json
import time

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import HOST, PREFIX, device_message, record_metric, tail, viewer_auth
from rtcam_auth import seal
from viewer import MqttLink, Viewer, ViewerError, now_ms, summarize

FPS = 30


def run(coro, timeout: float):
    async def bounded():
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError as e:
            raise AssertionError(f"test body timed out after {timeout} s: {e}") from e

    return asyncio.run(bounded())


async def stop(*viewers: Viewer) -> None:
    for v in viewers:
        try:
            await v.close(send_bye=True)
        except Exception:
            pass


async def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s")
        await asyncio.sleep(0.05)


async def link(port: int, name: str) -> MqttLink:
    m = MqttLink(HOST, port, f"{name}-{now_ms():.0f}", asyncio.get_running_loop())
    await m.connect()
    return m


async def out_recorder(port: int, device: str, session: str, name: str):
    """A client recording what arrives on a session's `out` topic, opened as the device's."""
    got: list[dict] = []
    m = await link(port, name)
    topic = f"{PREFIX}/{device}/session/{session}/out"
    await m.subscribe(topic, lambda t, p: got.append(device_message(t, p)))
    return m, got


def fps_over(frames, t0: float, t1: float) -> float:
    n = sum(1 for f in frames if t0 <= f.arrival_ms <= t1 and f.crc_ok)
    return n / ((t1 - t0) / 1000)


# ---- who may watch --------------------------------------------------------------------------


def test_offers_without_a_valid_credential_are_refused(cam):
    """No credential, an expired one, one for another device, one from an unknown owner, one
    bound to another viewer's key: each offer is refused with `unauthorized`, signed by the
    device, and no session starts."""
    stranger = Ed25519PrivateKey.generate()
    someone_else = viewer_auth(cam.device, "view")
    cases = {
        # name: the viewer's auth (None: an unsigned offer, as before signed mode)
        "unsigned": None,
        "expired": viewer_auth(cam.device, "view", exp=int(time.time()) - 5),
        "wrong-device": viewer_auth("some-other-cam", "view"),
        "unknown-owner": viewer_auth(cam.device, "view", owner=stranger),
        "someone-elses-credential": type(someone_else)(
            stranger, someone_else.credential, cam.device_key
        ),
    }

    async def body():
        results = {}
        for name, auth in cases.items():
            v = Viewer(HOST, cam.broker_port, cam.device, auth=auth)
            rec, got = await out_recorder(cam.broker_port, cam.device, v.session, f"rec-{name}")
            try:
                # The unsigned viewer cannot read the device's signed reply: it times out.
                await v.start(timeout=3)
                outcome = "connected"
            except ViewerError as e:
                outcome = f"refused {e.code}"
            except TimeoutError:
                outcome = "no answer"
            await asyncio.sleep(0.3)
            results[name] = (outcome, list(got))
            rec.close()
            await v.close()
        return results

    results = run(body(), 90)
    problems = []
    for name, (outcome, seen) in results.items():
        if outcome == "connected":
            problems.append(f"{name}: connected")
        codes = [m.get("code") for m in seen]
        if codes != ["unauthorized"]:
            problems.append(f"{name}: expected one signed unauthorized error, got {seen}")
    assert not problems, "\n".join(problems)
    state = cam.state()
    assert state["viewers"] == 0 and state["connecting"] == 0, state


def test_an_offer_copied_off_the_broker_is_useless(cam):
    """A client that reads `session/+/in` copies a real viewer's signed offer (with its
    credential): replaying it on the same topic, publishing it on its own session, or signing
    its own offer with the copied credential is refused; the real viewer keeps watching."""

    async def body():
        real = Viewer(HOST, cam.broker_port, cam.device)
        spy = await link(cam.broker_port, "spy")
        copied: list[tuple[str, bytes]] = []
        await spy.subscribe(
            f"{PREFIX}/{cam.device}/session/+/in", lambda t, p: copied.append((t, bytes(p)))
        )
        try:
            await real.start(timeout=20)
            await real.wait_frames(10, 10)
            await wait_until(lambda: copied, 5, "the offer seen by the spy")
            topic, offer = copied[0]
            envelope = json.loads(offer)
            assert "cred" in envelope, envelope
            mine = "spy" + real.session[3:]
            rec, got = await out_recorder(cam.broker_port, cam.device, mine, "spy-out")
            rec_real, got_real = await out_recorder(cam.broker_port, cam.device, real.session, "real-out")
            # 1. The same bytes again on the same topic (the session is live).
            await spy.publish(topic, offer)
            # 2. The same bytes on a session of its own.
            await spy.publish(f"{PREFIX}/{cam.device}/session/{mine}/in", offer)
            # 3. Its own offer, signed with its own key, carrying the copied credential.
            thief = Ed25519PrivateKey.generate()
            own = seal(
                thief,
                f"{PREFIX}/{cam.device}/session/{mine}2/in",
                int(time.time() * 1000),
                envelope["msg"],
                envelope["cred"],
            )
            rec2, got2 = await out_recorder(cam.broker_port, cam.device, f"{mine}2", "spy-out2")
            await spy.publish(f"{PREFIX}/{cam.device}/session/{mine}2/in", own)
            await wait_until(lambda: got and got2 and got_real, 5, "three refusals")
            await asyncio.sleep(0.5)
            t0 = now_ms()
            await real.wait_frames(3 * FPS, 10)
            t1 = now_ms()
            for m in (spy, rec, rec2, rec_real):
                m.close()
            return real, got, got2, got_real, t0, t1
        finally:
            await stop(real)

    real, got, got2, got_real, t0, t1 = run(body(), 60)
    assert [m.get("code") for m in got] == ["unauthorized"], got
    assert [m.get("code") for m in got2] == ["unauthorized"], got2
    # The replay on the live session is answered on that session, with a `ref` the real
    # viewer does not know: it ignores it (docs/protocol.md §9.6).
    assert [m.get("code") for m in got_real if m.get("type") == "error"] == ["replayed"], got_real
    assert real.foreign_errors and not real.errors, (real.foreign_errors, real.errors)
    assert not real.byes, real.byes
    assert fps_over(real.frames, t0, t1) >= 0.8 * FPS
    state = cam.state()
    assert state["viewers"] == 1 and state["connecting"] == 0, state


# ---- nobody else speaks in a session ----------------------------------------------------------


def test_injected_bye_candidate_and_offer_are_refused_and_the_stream_keeps_30_fps(cam):
    async def body():
        victim = Viewer(HOST, cam.broker_port, cam.device)
        attacker = await link(cam.broker_port, "attacker")
        seen_in: list[bytes] = []
        await attacker.subscribe(
            f"{PREFIX}/{cam.device}/session/+/in", lambda t, p: seen_in.append(bytes(p))
        )
        try:
            await victim.start(timeout=20)
            await victim.wait_frames(2 * FPS, 10)
            topic = victim.topic_in
            own = viewer_auth(cam.device)  # a credential of its own, for another key
            bye = {"v": 1, "type": "bye"}
            cand = {
                "v": 1,
                "type": "candidate",
                "candidate": {
                    "candidate": "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",
                    "sdpMid": "0",
                    "sdpMLineIndex": 0,
                },
            }
            t = int(time.time() * 1000)
            injections = [
                json.dumps(bye),  # plain
                json.dumps(cand),
                json.dumps({"v": 1, "type": "offer", "sdp": victim.offer_sdp}),
                seal(own.key, topic, t, json.dumps(bye)),  # signed by another key
                seal(own.key, topic, t + 1, json.dumps(cand)),
                seal(own.key, topic, t + 2, json.dumps(bye), own.credential),  # with a credential
                seal(
                    own.key,
                    topic,
                    t + 3,
                    json.dumps({"v": 1, "type": "offer", "sdp": victim.offer_sdp}),
                    own.credential,
                ),
            ]
            t0 = now_ms()
            for payload in injections:
                await attacker.publish(topic, payload)
            # The victim's own earlier message, replayed by the attacker.
            await attacker.publish(topic, seen_in[0])
            await wait_until(
                lambda: len(victim.foreign_errors) >= len(injections) + 1, 10, "every refusal"
            )
            await asyncio.sleep(5)
            t1 = now_ms()
            ping, _ = await victim.ping()
            attacker.close()
            return victim, t0, t1, ping, len(injections) + 1, victim.pc.connectionState
        finally:
            await stop(victim)

    victim, t0, t1, ping, n, pc_state = run(body(), 60)
    codes = [e["code"] for e in victim.foreign_errors]
    assert codes == ["unauthorized"] * (n - 1) + ["replayed"], victim.foreign_errors
    # Each names the refused envelope: its sig, or null for the unsigned ones.
    refs = [e["ref"] for e in victim.foreign_errors]
    assert refs[:3] == [None] * 3 and all(refs[3:]), victim.foreign_errors
    assert not victim.errors and not victim.byes, (victim.errors, victim.byes)
    fps = fps_over(victim.frames, t0, t1)
    record_metric("signed.injected.fps", round(fps, 2))
    assert fps >= 29, f"{fps:.1f} fps while being attacked: {summarize(victim.frames)}"
    assert ping["ok"] is True, ping
    assert pc_state == "connected"


def test_a_forged_device_answer_is_rejected_by_the_viewer(cam):
    """A client answers every offer in the device's name, with its own DTLS fingerprint,
    unsigned and signed with its own key: the viewer drops both and connects to the device."""

    async def body():
        victim = Viewer(HOST, cam.broker_port, cam.device)
        forger = await link(cam.broker_port, "forger")
        forger_key = Ed25519PrivateKey.generate()
        loop = asyncio.get_running_loop()
        forged_fp = "sha-256 " + ":".join(["AB"] * 32)

        def on_offer(topic, payload):
            out = topic[: -len("/in")] + "/out"
            try:
                offer = json.loads(json.loads(payload)["msg"])
            except (ValueError, KeyError):
                return
            if offer.get("type") != "offer":
                return
            sdp = offer["sdp"].replace("a=setup:actpass", "a=setup:active")
            lines = [
                f"a=fingerprint:{forged_fp}" if line.startswith("a=fingerprint:") else line
                for line in sdp.split("\r\n")
            ]
            answer = {"v": 1, "type": "answer", "sdp": "\r\n".join(lines)}
            plain = json.dumps(answer)
            signed = seal(forger_key, out, int(time.time() * 1000), plain)
            loop.create_task(forger.publish(out, plain))
            loop.create_task(forger.publish(out, signed))

        await forger.subscribe(f"{PREFIX}/{cam.device}/session/+/in", on_offer)
        try:
            await victim.start(timeout=20)
            await victim.wait_frames(FPS, 10)
            await asyncio.sleep(0.5)
            forger.close()
            return victim, forged_fp
        finally:
            await stop(victim)

    victim, forged_fp = run(body(), 60)
    codes = sorted(code for code, _ in victim.rejected)
    assert codes == ["unauthorized", "unauthorized"], victim.rejected
    assert forged_fp not in victim.answer_sdp, "the viewer applied the forged answer"
    assert len(victim.frames) >= FPS


# ---- permissions ------------------------------------------------------------------------------


def test_a_view_only_viewer_is_forbidden_to_change_settings(cam):
    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device, auth=viewer_auth(cam.device, "view"))
        try:
            await v.start(timeout=20)
            await v.wait_frames(10, 10)
            r = {
                "resolution": await v.command("set-resolution", {"width": 320, "height": 240}),
                "fps": await v.command("set-fps", {"fps": 5}),
                "bitrate": await v.command("set-bitrate", {"bps": 200000}),
                "state": await v.command("get-state"),
                "ping": await v.command("ping"),
            }
            await v.wait_frames(FPS, 5)
            return v, r
        finally:
            await stop(v)

    v, r = run(body(), 60)
    for name in ("resolution", "fps", "bitrate"):
        assert r[name]["ok"] is False and r[name]["error"]["code"] == "forbidden", r[name]
    assert r["state"]["ok"] is True and r["ping"]["ok"] is True, r
    sizes = {(f.width, f.height) for f in v.frames}
    assert sizes == {(640, 480)}, f"the forbidden command changed the picture: {sizes}"
    assert r["state"]["result"]["fps"] == FPS, r["state"]


def test_the_session_ends_with_bye_expired_when_its_credential_expires(make_rtcam):
    cam = make_rtcam("testcam-expiry")

    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device, auth=viewer_auth(cam.device, "view", lifetime_s=6))
        exp_s = json.loads(
            __import__("base64").urlsafe_b64decode(v.auth.credential.split(".")[1] + "==")
        )["exp"]
        try:
            await v.start(timeout=20)
            await v.wait_frames(10, 10)
            await v.wait_message(lambda m: m.get("type") == "bye", 15)
            t_bye = time.time()
            return v, exp_s, t_bye
        finally:
            await stop(v)

    v, exp_s, t_bye = run(body(), 60)
    assert v.byes == [{"v": 1, "type": "bye", "reason": "expired"}], v.byes
    record_metric("signed.expiry_to_bye_ms", round((t_bye - exp_s) * 1000))
    assert exp_s - 0.5 <= t_bye <= exp_s + 2, f"bye at {t_bye}, credential expired at {exp_s}"
    cam.wait_idle(15)


# ---- the MQTT command topic ---------------------------------------------------------------------


def test_reply_to_a_foreign_topic_is_refused_and_nothing_is_published_there(cam):
    foreign = [
        "zigbee2mqtt/plug/set",
        f"{PREFIX}/other-cam/command",
        "homeassistant/switch/x/config",
        f"{PREFIX}/{cam.device}/command/replyx",
    ]

    async def body():
        dash = await link(cam.broker_port, "dash")
        got: dict[str, list] = {}
        for t in [*foreign, f"{PREFIX}/{cam.device}/command/reply", f"{PREFIX}/{cam.device}/command/reply/dash"]:
            await dash.subscribe(t, lambda tp, p: got.setdefault(tp, []).append(json.loads(p)))
        bitrate = cam.state()["bitrate"]
        for i, t in enumerate(foreign):
            await dash.publish(
                f"{PREFIX}/{cam.device}/command",
                json.dumps({"id": f"f{i}", "cmd": "set-bitrate", "args": {"bps": 300000 + i}, "reply_to": t}),
            )
        await dash.publish(
            f"{PREFIX}/{cam.device}/command",
            json.dumps({"id": "ok", "cmd": "ping", "reply_to": f"{PREFIX}/{cam.device}/command/reply/dash"}),
        )
        await asyncio.sleep(2)
        dash.close()
        return got, bitrate

    got, bitrate = run(body(), 30)
    for t in foreign:
        assert t not in got, f"rtcam published on {t}: {got[t]}"
    refused = got.get(f"{PREFIX}/{cam.device}/command/reply", [])
    assert sorted(r["id"] for r in refused) == [f"f{i}" for i in range(len(foreign))], refused
    assert all(r["error"]["code"] == "bad-request" for r in refused), refused
    assert got[f"{PREFIX}/{cam.device}/command/reply/dash"][0]["ok"] is True
    assert cam.state()["bitrate"] == bitrate, "a refused command changed the bitrate"


def test_mqtt_commands_off_runs_only_signed_commands(make_rtcam):
    cam = make_rtcam("testcam-nocmd", control__mqtt_commands=False)
    topic = f"{PREFIX}/{cam.device}/command"

    async def body():
        dash = await link(cam.broker_port, "dash-nocmd")
        got: list[dict] = []
        await dash.subscribe(f"{topic}/reply", lambda t, p: got.append(json.loads(p)))
        await dash.publish(topic, json.dumps({"id": "plain", "cmd": "set-bitrate", "args": {"bps": 300000}}))
        auth = viewer_auth(cam.device, "view control")
        signed = seal(
            auth.key,
            topic,
            int(time.time() * 1000),
            json.dumps({"id": "signed", "cmd": "set-bitrate", "args": {"bps": 400000}}),
            auth.credential,
        )
        await dash.publish(topic, signed)
        view = viewer_auth(cam.device, "view")
        for i, cmd in enumerate(({"id": "view", "cmd": "set-fps", "args": {"fps": 10}}, {"id": "vping", "cmd": "ping"})):
            await dash.publish(topic, seal(view.key, topic, int(time.time() * 1000) + i, json.dumps(cmd), view.credential))
        await dash.publish(topic, signed)  # replayed
        await wait_until(lambda: len(got) >= 5, 10, "five replies")
        dash.close()
        return got

    got = run(body(), 30)
    by_id = {r["id"]: r for r in got if r["id"] is not None}
    assert by_id["plain"]["error"]["code"] == "forbidden", got
    assert by_id["signed"] == {"id": "signed", "ok": True, "result": {"bps": 400000}}, got
    assert by_id["view"]["error"]["code"] == "forbidden", got
    assert by_id["vping"]["ok"] is True, got
    replayed = [r for r in got if r["id"] is None]
    assert [r["error"]["code"] for r in replayed] == ["unauthorized"], got
    cam.wait_state(lambda s: s["bitrate"] == 400000, 5, "the signed command's bitrate")


# ---- availability ---------------------------------------------------------------------------------


def test_a_forged_retained_offline_is_corrected_within_a_second(cam, monitor):
    async def body():
        forger = await link(cam.broker_port, "forger-status")
        results = []
        for topic, forged in (
            (cam.topic_status, {"v": 1, "status": "offline", "device": cam.device, "protocol": 1}),
            (cam.topic_state, {"v": 1, "viewers": 99}),
        ):
            t0 = time.time() * 1000
            forger.client.publish(topic, json.dumps(forged), qos=1, retain=True)

            def healed():
                """(when the monitor saw the forgery, the first message after it)"""
                msgs = monitor.messages(topic, since_ms=t0)
                seen = [i for i, (_, m) in enumerate(msgs) if m == forged]
                after = msgs[seen[-1] + 1 :] if seen else []
                return (msgs[seen[-1]][0], after[0]) if after else None

            await wait_until(healed, 5, f"{topic} healed")
            t_forged, (t_healed, msg) = healed()
            results.append((topic, (t_healed - t_forged) / 1000, msg))
        # What a newcomer reads now: the device's own retained messages.
        fresh = await link(cam.broker_port, "newcomer")
        retained: dict[str, dict] = {}
        await fresh.subscribe(cam.topic_status, lambda t, p: retained.setdefault(t, json.loads(p)))
        await wait_until(lambda: retained, 5, "the retained status")
        forger.close()
        fresh.close()
        return results, retained

    results, retained = run(body(), 30)
    for topic, seconds, healed in results:
        record_metric(f"signed.heal_ms.{topic.rsplit('/', 1)[1]}", round(seconds * 1000))
        assert seconds < 1.0, f"{topic} healed after {seconds:.2f} s"
    assert results[0][2]["status"] == "online" and results[0][2]["key"] == cam.device_key
    assert results[1][2].get("max_viewers") == 4, results[1][2]
    assert retained[cam.topic_status]["status"] == "online", retained


def test_a_17_mib_publish_causes_no_disconnect_and_no_offline(make_rtcam, monitor, broker):
    cam = make_rtcam("testcam-huge")
    t_start = time.time() * 1000
    log_mark = broker.log_path.stat().st_size

    def publish_huge():
        # MQTT 3.1.1 sender: mosquitto answers an oversized MQTT 5 QoS 1 publish with PUBACK
        # 0x95 and paho then drops its own connection.
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="e2e-huge", protocol=mqtt.MQTTv311)
        c.connect(HOST, cam.broker_port)
        c.loop_start()
        huge = b"x" * (17 * 1024 * 1024)
        infos = [
            c.publish(f"{PREFIX}/{cam.device}/session/huge/in", huge, qos=1),
            c.publish(f"{PREFIX}/{cam.device}/command", huge, qos=1),
            c.publish(f"{PREFIX}/{cam.device}/events", huge, qos=0),
        ]
        for info in infos:
            info.wait_for_publish(30)
        c.disconnect()
        c.loop_stop()

    async def body():
        await asyncio.get_running_loop().run_in_executor(None, publish_huge)
        await asyncio.sleep(2)
        # Still connected and answering: a command, and a viewer.
        dash = await link(cam.broker_port, "after-huge")
        got: list[dict] = []
        await dash.subscribe(f"{PREFIX}/{cam.device}/command/reply", lambda t, p: got.append(json.loads(p)))
        await dash.publish(f"{PREFIX}/{cam.device}/command", json.dumps({"id": "alive", "cmd": "ping"}))
        await wait_until(lambda: got, 5, "a reply after the huge publishes")
        dash.close()
        v = Viewer(HOST, cam.broker_port, cam.device)
        try:
            await v.start(timeout=20)
            await v.wait_frames(10, 10)
        finally:
            await stop(v)
        return got

    got = run(body(), 120)
    assert got[0]["ok"] is True, got
    statuses = [m.get("status") for _, m in monitor.messages(cam.topic_status, since_ms=t_start)]
    assert "offline" not in statuses, f"status went offline: {statuses}"
    log = tail(broker.log_path, log_mark, 400)
    client_lines = [line for line in log.splitlines() if f"rtcam-{cam.device}" in line]
    assert not any("disconnect" in line.lower() or "closed" in line.lower() for line in client_lines), (
        "mosquitto saw rtcam's connection end:\n" + "\n".join(client_lines)
    )
    assert cam.alive()
    rtcam_log = tail(cam.log_path, 0, 400)
    assert "MQTT connected" in rtcam_log and rtcam_log.count("MQTT connected") == 1, rtcam_log


# ---- open mode ------------------------------------------------------------------------------------


def test_open_mode_keeps_the_unsigned_protocol_and_warns(make_rtcam, monitor):
    """auth.mode = "open" (labs only): the wire format of the unsigned protocol, and a warning
    at start."""
    cam = make_rtcam("testcam-open", auth__mode="open")

    async def body():
        v = Viewer(HOST, cam.broker_port, cam.device, auth=None)
        try:
            await v.start(timeout=20)
            await v.wait_frames(10, 10)
            reply = await v.command("set-fps", {"fps": 30})
            return v, reply
        finally:
            await stop(v)

    v, reply = run(body(), 60)
    status = monitor.latest(cam.topic_status)
    assert status == {"v": 1, "status": "online", "device": cam.device, "protocol": 1}, status
    assert v.answer_sdp and not v.rejected
    assert all(raw.startswith(b'{"') and b'"signed"' not in raw for _, _, raw in v.messages), v.messages
    assert reply["ok"] is True, reply
    log = tail(cam.log_path, 0, 400)
    assert "WARN" in log and 'auth.mode = "open"' in log, log
