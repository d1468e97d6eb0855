// One viewer session with a device (docs/protocol.md §4–§6): MQTT signaling as the offerer,
// the recvonly H.264 video, and commands over the `control` data channel (snapshot chunks too).
// In signed mode (§9) every message it publishes is signed with the viewer's key, the offer
// carries the credential, and only messages signed by the pinned device key are acted on.
import { openDeviceMessage, seal } from "./auth.js";
import { randomHex } from "./broker.js";

const START_TIMEOUT_MS = 20000;
const COMMAND_TIMEOUT_MS = 15000;
const DISCONNECTED_GRACE_MS = 5000;

export class SessionError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

/**
 * Callbacks: onTrack(MediaStream), onClose(reason), onEvent(value) for `{"event": ...}`
 * messages, log(text). `auth`: null for a device in open mode, else {privateKey, credential,
 * deviceKey} (the viewer's signing key, its credential, the pinned device key).
 */
export class Session {
  constructor({ link, prefix, device, iceServers = [], auth = null, onTrack, onClose, onEvent, log }) {
    this.link = link;
    this.device = device;
    this.id = randomHex(8);
    const base = `${prefix}/${device}/session/${this.id}`;
    this.topicIn = `${base}/in`;
    this.topicOut = `${base}/out`;
    this.iceServers = iceServers;
    this.onTrack = onTrack;
    this.onClose = onClose;
    this.onEvent = onEvent;
    this.log = log || (() => {});
    this.closed = false;
    this.pending = new Map(); // command id -> {resolve, reject, timer, cmd}
    this.snapshot = null; // {reply, need, parts, resolve, reject}
    this.nextId = 1;
    this.remoteCandidates = [];
    this.offerSent = false;
    this.localCandidates = [];
    this.auth = auth;
    this.sentSigs = new Set(); // signatures of what this session sent, to recognise its errors
    this.credentialSent = false;
    this.rejected = 0; // device messages dropped because the pinned key did not sign them
    // Signing and verifying are asynchronous: queues keep messages in order both ways.
    this.outQueue = Promise.resolve();
    this.inQueue = Promise.resolve();
  }

  /** Publishes a signaling message on `in`, signed in signed mode, in order. */
  send(msg) {
    const text = JSON.stringify(msg);
    const sent = this.outQueue.then(async () => {
      let payload = text;
      if (this.auth) {
        const withCred = msg.type === "offer" && !this.credentialSent;
        this.credentialSent ||= withCred;
        payload = await seal(this.auth.privateKey, this.topicIn, Date.now(), text, withCred ? this.auth.credential : undefined);
        this.sentSigs.add(JSON.parse(payload).sig);
      }
      await this.link.publish(this.topicIn, payload);
    });
    this.outQueue = sent.catch(() => {});
    return sent;
  }

  /** Signals, then resolves when the peer connection is connected and the channel open. */
  async start() {
    let settle;
    const ready = new Promise((resolve, reject) => (settle = { resolve, reject }));
    this.failStart = (e) => settle.reject(e);
    const timer = setTimeout(
      () => settle.reject(new SessionError("no connection within 20 s", "timeout")),
      START_TIMEOUT_MS,
    );
    try {
      // §2: subscribe to `out` before publishing the offer.
      await this.link.subscribe(this.topicOut, (_t, payload) => {
        this.inQueue = this.inQueue.then(() => this.onSignal(payload)).catch(() => {});
      });
      const pc = new RTCPeerConnection({ iceServers: this.iceServers });
      this.pc = pc;
      pc.addTransceiver("video", { direction: "recvonly" });
      this.dc = pc.createDataChannel("control");
      this.dc.binaryType = "arraybuffer";
      this.dc.onmessage = (e) => this.onChannelMessage(e.data);
      this.dc.onclose = () => this.close("data channel closed", false);
      pc.ontrack = (e) => this.onTrack?.(e.streams[0] || new MediaStream([e.track]));
      pc.onicecandidate = (e) => this.sendCandidate(e.candidate);
      let connected = false;
      let dcOpen = false;
      const check = () => connected && dcOpen && settle.resolve();
      this.dc.onopen = () => {
        dcOpen = true;
        check();
      };
      pc.onconnectionstatechange = () => {
        const s = pc.connectionState;
        this.log(`session ${this.id}: ${s}`);
        clearTimeout(this.graceTimer);
        if (s === "connected") {
          connected = true;
          check();
        } else if (s === "failed" || s === "closed") {
          this.close(`peer connection ${s}`, true);
        } else if (s === "disconnected") {
          this.graceTimer = setTimeout(
            () => this.close("peer connection disconnected", true),
            DISCONNECTED_GRACE_MS,
          );
        }
      };
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      await this.send({ v: 1, type: "offer", sdp: pc.localDescription.sdp });
      this.offerSent = true;
      // §4.2: candidates only after the offer; flush those gathered meanwhile.
      for (const c of this.localCandidates.splice(0)) this.publishCandidate(c);
      await ready;
    } catch (e) {
      this.close(e.message, true);
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  sendCandidate(candidate) {
    // `null` is end-of-candidates; Chrome may also report an empty candidate string.
    const c = candidate && candidate.candidate ? candidate.toJSON() : candidate ? undefined : null;
    if (c === undefined || this.closed) return;
    if (this.offerSent) this.publishCandidate(c);
    else this.localCandidates.push(c);
  }

  publishCandidate(c) {
    const candidate =
      c === null
        ? null
        : {
            candidate: c.candidate,
            sdpMid: c.sdpMid ?? null,
            sdpMLineIndex: c.sdpMLineIndex ?? null,
            ...(c.usernameFragment ? { usernameFragment: c.usernameFragment } : {}),
          };
    this.send({ v: 1, type: "candidate", candidate }).catch(() => {});
  }

  async onSignal(payload) {
    let text = new TextDecoder().decode(payload);
    if (this.auth) {
      try {
        text = await openDeviceMessage(this.auth.deviceKey, this.topicOut, text);
      } catch (e) {
        // A forged answer, someone else's junk: never acted on (§9.6).
        this.rejected++;
        this.log(`session ${this.id}: dropped a message the device did not sign: ${e.message}`);
        return;
      }
    }
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      this.log(`session ${this.id}: non-JSON signaling message ignored`);
      return;
    }
    if (this.closed || !msg || msg.v !== 1) return;
    if (msg.type === "error" && this.auth && "ref" in msg && (!this.sentSigs.has(msg.ref) || msg.code === "replayed")) {
      // About someone else's message on this topic, or a copy of one of ours that already
      // went through: not this session's problem (§9.6).
      this.log(`session ${this.id}: ignored an error about another message: ${msg.code}: ${msg.reason}`);
      return;
    }
    try {
      switch (msg.type) {
        case "answer":
          await this.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
          for (const c of this.remoteCandidates.splice(0)) await this.pc.addIceCandidate(c);
          break;
        case "candidate":
          if (msg.candidate === null) break; // end of the device's candidates
          if (this.pc.remoteDescription) await this.pc.addIceCandidate(msg.candidate);
          else this.remoteCandidates.push(msg.candidate);
          break;
        case "error":
          this.log(`session ${this.id}: device error ${msg.code}: ${msg.reason}`);
          // bad-candidate (e.g. an mDNS name the device cannot resolve) leaves the session as it was.
          if (msg.code !== "bad-candidate") {
            const e = new SessionError(`device refused: ${msg.code}: ${msg.reason}`, msg.code);
            this.failStart?.(e);
            this.close(e.message, false, msg.code);
          }
          break;
        case "bye":
          this.failStart?.(new SessionError(`device said bye (${msg.reason || "no reason"})`, "bye"));
          this.close(`device said bye (${msg.reason || "no reason"})`, false);
          break;
        default:
          break;
      }
    } catch (e) {
      this.log(`session ${this.id}: ${e.message}`);
    }
  }

  onChannelMessage(data) {
    if (typeof data !== "string") {
      const s = this.snapshot;
      if (!s) return;
      s.parts.push(new Uint8Array(data));
      if (s.parts.length === s.need) {
        this.snapshot = null;
        clearTimeout(s.timer);
        s.resolve({ ...s.reply, jpeg: new Blob(s.parts, { type: "image/jpeg" }) });
      }
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg && "event" in msg && !("id" in msg)) {
      this.onEvent?.(msg.event);
      return;
    }
    const p = this.pending.get(msg?.id);
    if (!p) {
      this.log(`unmatched reply: ${data.slice(0, 200)}`);
      return;
    }
    this.pending.delete(msg.id);
    clearTimeout(p.timer);
    const chunks = msg.ok && p.cmd === "snapshot" ? msg.result?.chunks : 0;
    if (chunks > 0) {
      // §6.1: the reply is followed by `chunks` binary messages forming the JPEG.
      const timer = setTimeout(() => {
        this.snapshot = null;
        p.reject(new SessionError("snapshot: chunks did not arrive", "timeout"));
      }, COMMAND_TIMEOUT_MS);
      this.snapshot = { reply: msg, need: chunks, parts: [], resolve: p.resolve, reject: p.reject, timer };
    } else {
      p.resolve(msg);
    }
  }

  /** Sends a command on the data channel; resolves with the reply object (ok or not). */
  command(cmd, args) {
    if (this.closed || this.dc?.readyState !== "open") {
      return Promise.reject(new SessionError("no open session", "closed"));
    }
    const id = `w${this.nextId++}`;
    const msg = args === undefined ? { id, cmd } : { id, cmd, args };
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new SessionError(`${cmd}: no reply within ${COMMAND_TIMEOUT_MS / 1000} s`, "timeout"));
      }, COMMAND_TIMEOUT_MS);
      this.pending.set(id, { resolve, reject, timer, cmd });
      this.dc.send(JSON.stringify(msg));
    });
  }

  /** Inbound video statistics (see stats.js). */
  getStats() {
    return this.pc ? this.pc.getStats() : Promise.resolve(new Map());
  }

  /** Ends the session; `sendBye` tells the device (§4.3). Calls onClose(reason, code) once;
   * `code` is the device's error code when it refused the session. */
  close(reason, sendBye = true, code = null) {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.graceTimer);
    this.failStart?.(new SessionError(`session closed: ${reason}`, "closed"));
    if (sendBye && this.offerSent) {
      this.send({ v: 1, type: "bye" }).catch(() => {});
    }
    this.link.unsubscribe(this.topicOut);
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(new SessionError(`session closed: ${reason}`, "closed"));
    }
    this.pending.clear();
    if (this.snapshot) {
      clearTimeout(this.snapshot.timer);
      this.snapshot.reject(new SessionError(`session closed: ${reason}`, "closed"));
      this.snapshot = null;
    }
    try {
      this.pc?.close();
    } catch {
      /* already closed */
    }
    this.log(`session ${this.id} closed: ${reason}`);
    this.onClose?.(reason, code);
  }
}
