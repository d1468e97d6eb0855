// MQTT-over-WebSocket link to the broker (mqtt.js): reconnect with backoff, per-topic handlers,
// promise-returning subscribe/publish, and the device list from the retained status/state topics.
import mqtt from "mqtt";

const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 30000;

/** True when an MQTT topic filter (with + and #) matches a topic. */
export function topicMatches(filter, topic) {
  const f = filter.split("/");
  const t = topic.split("/");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === "#") return true;
    if (i >= t.length) return false;
    if (f[i] !== "+" && f[i] !== t[i]) return false;
  }
  return f.length === t.length;
}

function parseJson(payload) {
  try {
    const text = new TextDecoder().decode(payload);
    const value = JSON.parse(text);
    return value !== null && typeof value === "object" && !Array.isArray(value) ? value : null;
  } catch {
    return null;
  }
}

/**
 * One broker connection. Events (callbacks): onConnection(state, detail) with state
 * "connecting" | "connected" | "offline" | "error"; onDevices(Map id -> {status, state}).
 */
export class BrokerLink {
  constructor({ url, username, password, prefix, onConnection, onDevices, log }) {
    this.prefix = prefix;
    this.onConnection = onConnection;
    this.onDevices = onDevices;
    this.log = log;
    this.devices = new Map();
    this.handlers = new Map(); // filter -> handler(topic, payload bytes)
    this.connected = false;
    this.backoff = BACKOFF_MIN_MS;
    this.retryTimer = null;
    // Reconnection is ours (reconnectPeriod: 0): mqtt.js retries at a fixed interval, this
    // doubles the delay up to BACKOFF_MAX_MS and re-subscribes every filter on each connect.
    this.client = mqtt.connect(url, {
      protocolVersion: 4,
      clientId: `rtcam-web-${randomHex(8)}`,
      username: username || undefined,
      password: password || undefined,
      clean: true,
      keepalive: 30,
      connectTimeout: 10000,
      reconnectPeriod: 0,
      resubscribe: false,
    });
    this.onConnection("connecting", url);
    this.client.on("connect", () => {
      this.connected = true;
      this.backoff = BACKOFF_MIN_MS;
      for (const filter of this.handlers.keys()) this.sendSubscribe(filter).catch(() => {});
      this.onConnection("connected", url);
    });
    this.client.on("close", () => {
      if (this.connected) this.log?.("broker connection lost");
      this.connected = false;
      if (this.closed || this.retryTimer) return;
      const delay = this.backoff;
      this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX_MS);
      this.onConnection("offline", `retrying in ${delay / 1000} s`);
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        if (!this.closed) this.client.reconnect();
      }, delay);
    });
    this.client.on("error", (e) => {
      this.log?.(`broker: ${e.message}`);
      this.onConnection("error", e.message);
    });
    this.client.on("message", (topic, payload) => this.dispatch(topic, payload));
    // Devices announce themselves on retained topics (protocol §3); subscribed on connect.
    this.handlers.set(`${prefix}/+/status`, (topic, payload) =>
      this.updateDevice(topic, "status", parseJson(payload)),
    );
    this.handlers.set(`${prefix}/+/state`, (topic, payload) =>
      this.updateDevice(topic, "state", parseJson(payload)),
    );
  }

  updateDevice(topic, key, msg) {
    if (!msg || msg.v !== 1) return;
    const id = topic.slice(this.prefix.length + 1).split("/")[0];
    const entry = this.devices.get(id) || { status: null, state: null, auth: null, key: null };
    entry[key] = key === "status" ? msg.status : msg;
    if (key === "status") {
      // Signed mode (docs/protocol.md §9.6): the mode and the device key, for pinning; a
      // device in open mode announces neither.
      entry.auth = msg.auth || "open";
      entry.key = typeof msg.key === "string" ? msg.key : null;
    }
    this.devices.set(id, entry);
    this.onDevices(this.devices, id, key);
  }

  dispatch(topic, payload) {
    for (const [filter, handler] of this.handlers) {
      if (topicMatches(filter, topic)) {
        try {
          handler(topic, payload);
        } catch (e) {
          this.log?.(`handler for ${topic}: ${e.message}`);
        }
      }
    }
  }

  /** Subscribes (QoS 1) and resolves once the broker acknowledged it; kept across reconnects. */
  subscribe(filter, handler) {
    this.handlers.set(filter, handler);
    if (!this.connected) return Promise.reject(new Error("broker not connected"));
    return this.sendSubscribe(filter);
  }

  sendSubscribe(filter) {
    return new Promise((resolve, reject) => {
      this.client.subscribe(filter, { qos: 1 }, (err, granted) => {
        if (err) reject(err);
        else if (granted?.some((g) => g.qos === 128)) reject(new Error(`subscribe ${filter} refused`));
        else resolve();
      });
    });
  }

  unsubscribe(filter) {
    this.handlers.delete(filter);
    if (this.connected) this.client.unsubscribe(filter);
  }

  /** Publishes JSON (an object) or bytes at QoS 1; resolves when the broker acknowledged it. */
  publish(topic, message) {
    const payload = typeof message === "string" ? message : JSON.stringify(message);
    return new Promise((resolve, reject) => {
      this.client.publish(topic, payload, { qos: 1 }, (err) => (err ? reject(err) : resolve()));
    });
  }

  close() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    this.client.end(true);
  }
}

export function randomHex(bytes) {
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a);
  return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}
