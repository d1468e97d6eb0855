"""A GStreamer webrtcbin viewer, driven over stdin/stdout: the media half of test_gstreamer.py.

Runs under Debian's own Python (`/usr/bin/python3`) with PyGObject, because GStreamer's
bindings come from Debian (python3-gi, gir1.2-gst-plugins-bad-1.0), not from PyPI. The
signaling (MQTT, signing) stays in the test's Python; this process only does WebRTC:

* stdout, one JSON object per line:
  ``{"event": "offer", "sdp": ...}``, ``{"event": "candidate", "candidate": {...}}``,
  ``{"event": "frame", "index": N, "width": W, "height": H, "t_ms": unix_ms}`` (the frame's
  I420 bytes are appended to ``--frames``, so frame N starts at ``N * W * H * 3 / 2``),
  ``{"event": "dc-open"}``, ``{"event": "dc-message", "text": ...}``,
  ``{"event": "state", "ice": ..., "connection": ...}``, ``{"event": "error", "message": ...}``.
* stdin, one JSON object per line:
  ``{"cmd": "answer", "sdp": ...}``, ``{"cmd": "candidate", "candidate": {...} | null}``,
  ``{"cmd": "dc-send", "text": ...}``, ``{"cmd": "stop"}``.

The offer is what webrtcbin makes by itself for one receive-only H.264 transceiver and one
data channel labelled ``control`` (docs/protocol.md §4), with ``--bundle-policy`` as given:
``max-bundle`` is what the protocol requires, ``none`` is webrtcbin's default.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("Nice", "0.1")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC, Nice  # noqa: E402

H264_CAPS = (
    "application/x-rtp,media=video,encoding-name=H264,payload=96,clock-rate=90000,"
    "packetization-mode=(string)1,profile-level-id=(string)42e01f"
)
BUNDLE = {
    "max-bundle": GstWebRTC.WebRTCBundlePolicy.MAX_BUNDLE,
    "none": GstWebRTC.WebRTCBundlePolicy.NONE,
}

_out_lock = threading.Lock()


def emit(event: str, **data) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
        sys.stdout.flush()


class Peer:
    def __init__(self, bundle_policy: str, frames_path: str, local_addresses: list[str]):
        self.loop = GLib.MainLoop()
        self.frames = open(frames_path, "wb")
        self.frame_index = 0
        self.pipeline = Gst.Pipeline.new("viewer")
        self.webrtc = Gst.ElementFactory.make("webrtcbin", "webrtc")
        if self.webrtc is None:
            raise SystemExit("GStreamer element webrtcbin missing: install gstreamer1.0-plugins-bad")
        self.webrtc.set_property("bundle-policy", BUNDLE[bundle_policy])
        # libnice leaves loopback out when it gathers, and the tests run in a namespace that
        # has nothing else: hand it the address to gather on, as a multi-homed host would.
        # (Both objects are kept for the peer's life: PyGObject drops a reference it does not
        # own when its wrapper of webrtcbin's ICE object is collected.)
        self.ice = self.webrtc.get_property("ice-agent")
        self.nice_agent = self.ice.get_property("agent")
        for address in local_addresses:
            nice_address = Nice.Address()
            if not nice_address.set_from_string(address):
                raise SystemExit(f"not an IP address: {address}")
            self.nice_agent.add_local_address(nice_address)
        self.pipeline.add(self.webrtc)
        self.webrtc.connect("on-ice-candidate", self._on_ice_candidate)
        self.webrtc.connect("pad-added", self._on_pad_added)
        self.webrtc.connect("notify::ice-connection-state", self._on_state)
        self.webrtc.connect("notify::connection-state", self._on_state)
        self.webrtc.emit(
            "add-transceiver",
            GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY,
            Gst.Caps.from_string(H264_CAPS),
        )
        self.channel = None
        bus = self.pipeline.get_bus()
        bus.add_signal_watch()
        bus.connect("message::error", self._on_bus_error)

    # ---- negotiation ------------------------------------------------------------------

    def start(self, data_channel: bool) -> None:
        self.pipeline.set_state(Gst.State.PLAYING)
        if data_channel:
            # webrtcbin makes data channels only once it is running.
            self.channel = self.webrtc.emit("create-data-channel", "control", None)
            if self.channel is None:
                raise SystemExit("webrtcbin made no data channel: GStreamer's sctp plugin missing?")
            self.channel.connect("on-open", lambda _ch: emit("dc-open"))
            self.channel.connect(
                "on-message-string", lambda _ch, text: emit("dc-message", text=text)
            )
            self.channel.connect(
                "on-error", lambda _ch, err: emit("error", message=f"data channel: {err}")
            )
        # One offer, made once the transceiver and the channel exist. (webrtcbin's
        # on-negotiation-needed fires once per addition, which would make two offers.)
        promise = Gst.Promise.new_with_change_func(self._on_offer_created, None)
        self.webrtc.emit("create-offer", None, promise)

    def _on_offer_created(self, promise, _data) -> None:
        promise.wait()
        reply = promise.get_reply()
        offer = reply.get_value("offer")
        self.webrtc.emit("set-local-description", offer, Gst.Promise.new())
        emit("offer", sdp=offer.sdp.as_text())

    def _on_ice_candidate(self, _element, mline_index: int, candidate: str) -> None:
        emit(
            "candidate",
            candidate={"candidate": candidate, "sdpMid": None, "sdpMLineIndex": mline_index},
        )

    def set_answer(self, sdp: str) -> None:
        ok, message = GstSdp.SDPMessage.new_from_text(sdp)
        if ok != GstSdp.SDPResult.OK:
            emit("error", message=f"answer does not parse as SDP: {ok}")
            return
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        self.webrtc.emit("set-remote-description", answer, Gst.Promise.new())

    def add_candidate(self, cand: dict | None) -> None:
        if not cand or not cand.get("candidate"):
            return  # end of candidates: webrtcbin needs no marker
        line = cand["candidate"]
        if not line.startswith("candidate:"):
            line = "candidate:" + line
        self.webrtc.emit("add-ice-candidate", int(cand.get("sdpMLineIndex") or 0), line)

    def _on_state(self, *_args) -> None:
        ice = self.webrtc.get_property("ice-connection-state").value_nick
        conn = self.webrtc.get_property("connection-state").value_nick
        emit("state", ice=ice, connection=conn)

    # ---- media ------------------------------------------------------------------------

    def _on_pad_added(self, _element, pad) -> None:
        if pad.direction != Gst.PadDirection.SRC:
            return
        chain = Gst.parse_bin_from_description(
            "rtph264depay ! h264parse ! avdec_h264 ! videoconvert ! "
            "video/x-raw,format=I420 ! appsink name=sink emit-signals=true sync=false",
            True,
        )
        self.pipeline.add(chain)
        sink = chain.get_by_name("sink")
        sink.connect("new-sample", self._on_sample)
        chain.sync_state_with_parent()
        pad.link(chain.get_static_pad("sink"))

    def _on_sample(self, sink) -> Gst.FlowReturn:
        sample = sink.emit("pull-sample")
        structure = sample.get_caps().get_structure(0)
        width, height = structure.get_value("width"), structure.get_value("height")
        buf = sample.get_buffer()
        ok, info = buf.map(Gst.MapFlags.READ)
        if not ok:
            emit("error", message="could not map a decoded frame")
            return Gst.FlowReturn.ERROR
        try:
            # videoconvert hands out I420 with GStreamer's default strides (4-byte aligned
            # rows): for the sizes the tests use (multiples of 16) that is tightly packed.
            self.frames.write(bytes(info.data[: width * height * 3 // 2]))
            self.frames.flush()
        finally:
            buf.unmap(info)
        emit(
            "frame",
            index=self.frame_index,
            width=width,
            height=height,
            t_ms=time.time() * 1000.0,
        )
        self.frame_index += 1
        return Gst.FlowReturn.OK

    def _on_bus_error(self, _bus, message) -> None:
        err, debug = message.parse_error()
        emit("error", message=f"{err.message} ({debug})")

    # ---- commands ---------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        cmd = json.loads(line)
        kind = cmd.get("cmd")
        if kind == "answer":
            self.set_answer(cmd["sdp"])
        elif kind == "candidate":
            self.add_candidate(cmd.get("candidate"))
        elif kind == "dc-send" and self.channel is not None:
            self.channel.emit("send-string", cmd["text"])
        elif kind == "stop":
            self.stop()
            return False
        else:
            emit("error", message=f"unknown command {kind!r}")
        return False

    def stop(self) -> None:
        self.pipeline.set_state(Gst.State.NULL)
        self.frames.close()
        self.loop.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle-policy", choices=sorted(BUNDLE), default="max-bundle")
    parser.add_argument("--frames", required=True, help="file the decoded I420 frames go to")
    parser.add_argument("--no-data-channel", action="store_true", help="offer video only")
    parser.add_argument(
        "--local-address", action="append", default=[], help="an address ICE gathers on"
    )
    args = parser.parse_args()
    Gst.init(None)
    peer = Peer(args.bundle_policy, args.frames, args.local_address)

    def read_commands() -> None:
        for line in sys.stdin:
            if line.strip():
                GLib.idle_add(peer.handle, line)
        GLib.idle_add(lambda: peer.stop() or False)

    threading.Thread(target=read_commands, daemon=True).start()
    peer.start(data_channel=not args.no_data_channel)
    peer.loop.run()


if __name__ == "__main__":
    main()
