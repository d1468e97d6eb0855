"""The broker ACL template (packaging/mosquitto/rtcam.acl + rtcam.conf) loaded into a real
mosquitto: each role can publish and read what it needs and nothing else, anonymous clients
are refused, and an oversized publish is dropped while its sender stays connected.

Refusals are checked twice: the MQTT 5 PUBACK reason code, and a privileged observer
subscribed to `#` that must not receive the message (MQTT 3.1.1 brokers drop an
unauthorized publish silently). Each publisher ends with a sentinel message it may send, so
"nothing arrived" is decided when the sentinel arrives, not after a sleep.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import HOST, REPO, Proc, free_port, tail, wait_tcp

PACKAGING = REPO / "packaging" / "mosquitto"
DEV = "rtcam/camera-01"
NOT_AUTHORIZED = 0x87
PASSWORD = "e2e-password"
ROLES = ["rtcam-camera-01", "rtcam-viewer", "homeassistant", "rtcam-service"]
# Test-only accounts appended to the template: an observer that reads everything, a writer
# that writes everything, and an unrelated client (a Zigbee bridge) with rights on its own
# topics only.
EXTRA_ACL = """
user e2e-observer
topic read #

user zigbee2mqtt
topic readwrite zigbee2mqtt/#

user e2e-writer
topic write #
"""

# (user, topic, allowed) for publishing.
PUBLISH_CASES = [
    # The device: its own topics only; no viewer-side topics, no other device, no deputy.
    ("rtcam-camera-01", f"{DEV}/status", True),
    ("rtcam-camera-01", f"{DEV}/state", True),
    ("rtcam-camera-01", f"{DEV}/snapshot", True),
    ("rtcam-camera-01", f"{DEV}/session/s1/out", True),
    ("rtcam-camera-01", f"{DEV}/command/reply", True),
    ("rtcam-camera-01", f"{DEV}/command/reply/dash1", True),
    ("rtcam-camera-01", f"{DEV}/forward/ptz", True),
    ("rtcam-camera-01", "homeassistant/device/camera-01/config", True),
    ("rtcam-camera-01", f"{DEV}/session/s1/in", False),
    ("rtcam-camera-01", f"{DEV}/command", False),
    ("rtcam-camera-01", f"{DEV}/forward/light", False),
    ("rtcam-camera-01", f"{DEV}/forward/reply", False),
    ("rtcam-camera-01", f"{DEV}/events", False),
    ("rtcam-camera-01", "rtcam/camera-02/status", False),
    ("rtcam-camera-01", "zigbee2mqtt/bulb/set", False),
    ("rtcam-camera-01", "homeassistant/device/other/config", False),
    # A forged reply_to: replies only under command/reply/# (and what the admin adds).
    ("rtcam-camera-01", "dash/kitchen/replies", False),
    ("rtcam-camera-01", f"{DEV}/command/replyx", False),
    # Viewers: only the inbound session topics of this device.
    ("rtcam-viewer", f"{DEV}/session/s1/in", True),
    ("rtcam-viewer", f"{DEV}/session/s1/out", False),  # a forged device answer
    ("rtcam-viewer", f"{DEV}/status", False),  # a forged retained offline
    ("rtcam-viewer", f"{DEV}/state", False),
    ("rtcam-viewer", f"{DEV}/command", False),
    ("rtcam-viewer", f"{DEV}/command/reply", False),
    ("rtcam-viewer", f"{DEV}/events", False),
    ("rtcam-viewer", f"{DEV}/forward/reply", False),
    ("rtcam-viewer", "rtcam/camera-02/session/s1/in", False),  # another device
    ("rtcam-viewer", "homeassistant/device/camera-01/config", False),
    # Home Assistant: commands and its birth message.
    ("homeassistant", f"{DEV}/command", True),
    ("homeassistant", "homeassistant/status", True),
    ("homeassistant", f"{DEV}/status", False),
    ("homeassistant", f"{DEV}/command/reply", False),
    ("homeassistant", f"{DEV}/session/s1/in", False),
    ("homeassistant", f"{DEV}/session/s1/out", False),
    ("homeassistant", f"{DEV}/forward/ptz", False),
    ("homeassistant", f"{DEV}/events", False),
    ("homeassistant", f"{DEV}/snapshot", False),
    # Local services: replies and events, never the device's or viewers' voice.
    ("rtcam-service", f"{DEV}/forward/reply", True),
    ("rtcam-service", f"{DEV}/events", True),
    ("rtcam-service", f"{DEV}/session/s1/out", False),
    ("rtcam-service", f"{DEV}/session/s1/in", False),
    ("rtcam-service", f"{DEV}/status", False),
    ("rtcam-service", f"{DEV}/command", False),
    ("rtcam-service", f"{DEV}/command/reply", False),
    ("rtcam-service", f"{DEV}/forward/ptz", False),
    # Any other client on the shared broker.
    ("zigbee2mqtt", "zigbee2mqtt/bulb/set", True),
    ("zigbee2mqtt", f"{DEV}/session/s1/in", False),
    ("zigbee2mqtt", f"{DEV}/session/s1/out", False),
    ("zigbee2mqtt", f"{DEV}/command", False),
    ("zigbee2mqtt", f"{DEV}/status", False),
    ("zigbee2mqtt", f"{DEV}/events", False),
    ("zigbee2mqtt", f"{DEV}/forward/reply", False),
]

# What each role receives when subscribed to everything of the device (and HA's topics).
READ_TOPICS = [
    f"{DEV}/status",
    f"{DEV}/state",
    "homeassistant/device/camera-01/config",
    f"{DEV}/session/s1/in",
    f"{DEV}/session/s1/out",
    f"{DEV}/command",
    f"{DEV}/command/reply",
    f"{DEV}/forward/ptz",
    f"{DEV}/forward/reply",
    f"{DEV}/events",
    f"{DEV}/snapshot",
]
READABLE = {
    # The device reads its own retained topics back, to repair them when overwritten.
    "rtcam-camera-01": {
        f"{DEV}/status", f"{DEV}/state", "homeassistant/device/camera-01/config",
        f"{DEV}/session/s1/in", f"{DEV}/command", f"{DEV}/forward/reply", f"{DEV}/events",
    },
    "rtcam-viewer": {f"{DEV}/status", f"{DEV}/state", f"{DEV}/session/s1/out"},
    "homeassistant": {
        f"{DEV}/status", f"{DEV}/state", "homeassistant/device/camera-01/config",
        f"{DEV}/command/reply", f"{DEV}/snapshot",
    },
    "rtcam-service": {f"{DEV}/forward/ptz"},
    "zigbee2mqtt": set(),
}

# A topic each reader may read, for its sentinel.
SENTINEL_TOPIC = {
    "rtcam-camera-01": f"{DEV}/command",
    "rtcam-viewer": f"{DEV}/session/s1/out",
    "homeassistant": f"{DEV}/command/reply",
    "rtcam-service": f"{DEV}/forward/ptz",
    "zigbee2mqtt": "zigbee2mqtt/sentinel",
}


class AclBroker(Proc):
    name = "mosquitto-acl"

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        passwd_tool = shutil.which("mosquitto_passwd")
        if not os.path.exists(exe) or passwd_tool is None:
            pytest.fail("mosquitto and mosquitto_passwd are needed (apt-get install mosquitto)", pytrace=False)
        acl = self.workdir / "rtcam.acl"
        acl.write_text((PACKAGING / "rtcam.acl").read_text() + EXTRA_ACL)
        passwd = self.workdir / "rtcam.passwd"
        passwd.write_text("")
        for user in ROLES + ["e2e-observer", "e2e-writer", "zigbee2mqtt"]:
            subprocess.run([passwd_tool, "-b", str(passwd), user, PASSWORD], check=True, capture_output=True)
        snippet = (PACKAGING / "rtcam.conf").read_text()
        for line in ("password_file /etc/mosquitto/rtcam.passwd", "acl_file /etc/mosquitto/rtcam.acl"):
            assert line in snippet, f"rtcam.conf no longer has {line!r}; update this test"
        snippet = snippet.replace("/etc/mosquitto/rtcam.passwd", str(passwd))
        snippet = snippet.replace("/etc/mosquitto/rtcam.acl", str(acl))
        self.port = free_port()
        conf = self.workdir / "mosquitto-acl.conf"
        conf.write_text(
            f"listener {self.port} {HOST}\npersistence false\nuser root\nlog_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n" + snippet
        )
        self.spawn([exe, "-c", str(conf)])
        if not wait_tcp(self.port, 10):
            self.stop()
            pytest.fail(f"mosquitto did not start:\n{tail(self.log_path)}", pytrace=False)


class Client:
    """A paho client whose connect, subscribe and publish results can be awaited."""

    def __init__(self, port: int, user: str | None, protocol=mqtt.MQTTv5, password=PASSWORD):
        self.user = user
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"acl-{user}-{uuid.uuid4().hex[:6]}",
            protocol=protocol,
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        self.cond = threading.Condition()
        self.connack = None
        self.acks: dict[int, int] = {}  # mid -> reason code value
        self.subacked = False
        self.received: list[tuple[str, bytes]] = []
        self.disconnected = False
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()

    def _notify(self, fn):
        with self.cond:
            fn()
            self.cond.notify_all()

    def _on_connect(self, c, u, flags, rc, props):
        self._notify(lambda: setattr(self, "connack", rc))

    def _on_publish(self, c, u, mid, rc, props):
        self._notify(lambda: self.acks.__setitem__(mid, rc.value))

    def _on_subscribe(self, c, u, mid, rcs, props):
        self._notify(lambda: setattr(self, "subacked", True))

    def _on_message(self, c, u, msg):
        self._notify(lambda: self.received.append((msg.topic, msg.payload)))

    def _on_disconnect(self, c, u, flags, rc, props):
        self._notify(lambda: setattr(self, "disconnected", True))

    def wait(self, predicate, timeout: float = 10.0, what: str = ""):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.user}: timed out waiting for {what}")
                self.cond.wait(left)

    def connected(self) -> int:
        self.wait(lambda: self.connack is not None, what="CONNACK")
        return self.connack.value

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        self.wait(lambda: self.subacked, what=f"SUBACK {topic}")

    def publish(self, topic: str, payload: bytes) -> int:
        """Publishes at QoS 1 and returns the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1)
        self.wait(lambda: info.mid in self.acks, what=f"PUBACK {topic}")
        return self.acks[info.mid]

    def payloads(self) -> set[bytes]:
        with self.cond:
            return {p for _, p in self.received}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def acl_broker(tmp_path):
    broker = AclBroker(tmp_path)
    broker.start()
    clients: list[Client] = []

    def connect(user: str | None, protocol=mqtt.MQTTv5) -> Client:
        c = Client(broker.port, user, protocol)
        clients.append(c)
        return c

    yield broker, connect
    for c in clients:
        c.close()
    broker.stop()


def test_each_role_publishes_only_what_it_needs(acl_broker):
    broker, connect = acl_broker
    observer = connect("e2e-observer", mqtt.MQTTv311)
    assert observer.connected() == 0
    observer.subscribe("#")
    outcome = {}  # (user, topic) -> (reason code, payload)
    for user in ROLES + ["zigbee2mqtt"]:
        client = connect(user)
        assert client.connected() == 0, f"{user} could not log in"
        for u, topic, _allowed in PUBLISH_CASES:
            if u == user:
                payload = f"{user} {topic} {uuid.uuid4().hex}".encode()
                outcome[(u, topic)] = (client.publish(topic, payload), payload)
        # The last allowed publish doubles as this client's sentinel: everything it sent
        # before has been delivered (or dropped) once the observer has it.
        sentinel = [outcome[(u, t)][1] for u, t, ok in PUBLISH_CASES if u == user and ok][-1]
        observer.wait(lambda: sentinel in observer.payloads(), what=f"{user}'s sentinel")
        assert not client.disconnected, f"{user} was disconnected"
    seen = observer.payloads()
    wrong = []
    for user, topic, allowed in PUBLISH_CASES:
        rc, payload = outcome[(user, topic)]
        delivered = payload in seen
        if allowed and (rc != 0 or not delivered):
            wrong.append(f"{user} -> {topic}: should be allowed (reason {rc:#x}, delivered {delivered})")
        if not allowed and (rc != NOT_AUTHORIZED or delivered):
            wrong.append(f"{user} -> {topic}: should be refused (reason {rc:#x}, delivered {delivered})")
    assert not wrong, "\n".join(wrong) + f"\n--- mosquitto log ---\n{tail(broker.log_path)}"


def test_each_role_reads_only_what_it_needs(acl_broker):
    _broker, connect = acl_broker
    readers = {}
    for user in READABLE:
        c = connect(user, mqtt.MQTTv311)
        assert c.connected() == 0
        c.subscribe("#")  # the broker delivers only what the ACL lets each one read
        readers[user] = c
    writer = connect("e2e-writer", mqtt.MQTTv311)
    assert writer.connected() == 0
    sent = {}
    for topic in READ_TOPICS:
        payload = f"read {topic} {uuid.uuid4().hex}".encode()
        assert writer.publish(topic, payload) == 0, topic
        sent[topic] = payload
    # Then one message per reader on a topic it may read: once it has arrived, everything
    # the same writer published before has been delivered to that reader, or never will be.
    for user, c in readers.items():
        topic = SENTINEL_TOPIC[user]
        marker = f"sentinel {user} {uuid.uuid4().hex}".encode()
        assert writer.publish(topic, marker) == 0
        c.wait(lambda: marker in c.payloads(), what=f"the sentinel on {topic}")
    wrong = []
    for user, c in readers.items():
        got = {t for t, p in sent.items() if p in c.payloads()}
        if got != READABLE[user]:
            wrong.append(f"{user}: read {sorted(got)}, expected {sorted(READABLE[user])}")
    assert not wrong, "\n".join(wrong)


def test_anonymous_and_wrong_password_are_refused(acl_broker):
    broker, connect = acl_broker
    anonymous = connect(None)
    assert anonymous.connected() == NOT_AUTHORIZED, "anonymous login must be refused"
    wrong = Client(broker.port, "rtcam-viewer", password="not-the-password")
    try:
        assert wrong.connected() != 0, "a wrong password must be refused"
    finally:
        wrong.close()


def test_an_oversized_publish_is_dropped_and_the_sender_stays_connected(acl_broker):
    _broker, connect = acl_broker
    device = connect("rtcam-camera-01", mqtt.MQTTv311)
    assert device.connected() == 0
    device.subscribe(f"{DEV}/session/+/in")
    # MQTT 3.1.1, like rtcam: mosquitto 2.0.11 answers an oversized MQTT 5 QoS 1 publish
    # with PUBACK reason 0x95, which MQTT 5 does not allow in a PUBACK, and paho then drops
    # its own connection ("protocol error"). A 3.1.1 sender gets a plain PUBACK.
    viewer = connect("rtcam-viewer", mqtt.MQTTv311)
    assert viewer.connected() == 0
    big = b"x" * (4 * 1024 * 1024 + 1)  # one byte over message_size_limit
    assert viewer.publish(f"{DEV}/session/big/in", big) == 0
    small = f"after {uuid.uuid4().hex}".encode()
    assert viewer.publish(f"{DEV}/session/small/in", small) == 0
    device.wait(lambda: small in device.payloads(), what="the message after the big one")
    assert all(len(p) < len(big) for p in device.payloads()), "the big publish was forwarded"
    assert not viewer.disconnected and not device.disconnected
    at_limit = b"y" * (4 * 1024 * 1024)
    assert viewer.publish(f"{DEV}/session/limit/in", at_limit) == 0
    device.wait(lambda: at_limit in device.payloads(), what="a payload at the limit")


def test_rtcam_works_under_the_template_and_heals_through_it(acl_broker, workdir):
    """rtcam itself as `rtcam-camera-01` behind the template: every subscription granted (it
    logs a refused one), a viewer on the viewer account streams, and a forged retained
    status from an account that may write it is repaired through the device's read right."""
    import asyncio
    import json

    import viewer as viewer_module
    from conftest import Monitor, Rtcam

    broker, connect = acl_broker
    password_file = workdir / "acl-rtcam.password"
    password_file.write_text(PASSWORD + "\n")
    observer_mon = Monitor(broker.port, login=("e2e-observer", PASSWORD))
    cam = Rtcam(
        workdir,
        "camera-01",
        broker.port,
        observer_mon,
        mqtt__username="rtcam-camera-01",
        mqtt__password_file=str(password_file),
        homeassistant__enabled=True,
    )
    cam.start()
    try:
        async def stream():
            viewer_module.broker_login = ("rtcam-viewer", PASSWORD)
            v = viewer_module.Viewer(HOST, broker.port, cam.device)
            try:
                await v.start(timeout=20)
                await v.wait_frames(30, 10)
                return len(v.frames)
            finally:
                viewer_module.broker_login = None
                await v.close(send_bye=True)

        frames = asyncio.run(asyncio.wait_for(stream(), 60))
        assert frames >= 30
        # Only accounts the template lets write the status can forge it; the writer stands in
        # for a compromised one. rtcam reads its status back and repairs it.
        writer = connect("e2e-writer", mqtt.MQTTv311)
        assert writer.connected() == 0
        forged = {"v": 1, "status": "offline", "device": cam.device, "protocol": 1}
        t0 = time.time() * 1000
        info = writer.client.publish(f"{DEV}/status", json.dumps(forged), qos=1, retain=True)
        info.wait_for_publish(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen = [m for _, m in observer_mon.messages(f"{DEV}/status", since_ms=t0)]
            if forged in seen and seen[-1].get("status") == "online":
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the forged status was not repaired: {seen}")
        log = tail(cam.log_path, 0, 400)
        assert "refused a subscription" not in log, log
    finally:
        cam.stop()
        observer_mon.close()
