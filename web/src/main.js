// The viewer page's controller: settings from the URL/form, device list, one session per chosen
// device with automatic recovery (broker or device restarts), stats, the control panel, and
// signed mode (docs/protocol.md §9): the viewer key, the credential, the pinned device keys.
import { credentialClaims, describeCredential, importPublicKey, importViewerKey, store, viewerKey } from "./auth.js";
import { BrokerLink } from "./broker.js";
import { Session } from "./session.js";
import { StatsSampler, formatBitrate } from "./stats.js";

const $ = (id) => document.getElementById(id);
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 15000;

const app = {
  link: null,
  prefix: "rtcam",
  device: null,
  session: null,
  lastStatus: null,
  retryTimer: null,
  retryDelay: RETRY_MIN_MS,
  sampler: new StatsSampler(),
  snapshotUrl: null,
  stats: {},
  // Signed mode: this browser's key {privateKey (non-extractable), publicB64}, the credential
  // (pasted or from the URL fragment; kept in this browser only), and an authorization
  // problem that stops retries until the user changes something.
  viewer: null,
  credential: "",
  authProblem: null,
};
// For debugging from the console (and the browser tests); holds no secret.
window.rtcam = app;

function log(text) {
  const line = `${new Date().toISOString().slice(11, 23)} ${text}`;
  console.log(`[rtcam] ${line}`);
  const el = $("log");
  el.textContent = `${line}\n${el.textContent}`.split("\n").slice(0, 200).join("\n");
}

function badge(id, state, text) {
  const el = $(id);
  el.dataset.state = state;
  el.textContent = text;
}

// ---- settings ----------------------------------------------------------------------------

function defaultBroker() {
  const host = location.hostname || "127.0.0.1";
  return `${location.protocol === "https:" ? "wss" : "ws"}://${host.includes(":") ? `[${host}]` : host}:8083`;
}

/**
 * Signed mode's start: the viewer key from IndexedDB (made on first use), the credential, and
 * what the URL fragment hands over: `#cred=<credential>`, optionally `&dk=<device key to pin>`
 * and, for the demo only, `&vk=<the viewer key the credential is for, PKCS#8 base64url>`. A
 * fragment never reaches a server; it is removed from the address bar once read.
 */
async function initAuth() {
  const frag = new URLSearchParams(location.hash.slice(1));
  const q = new URLSearchParams(location.search);
  try {
    if (frag.get("vk") && frag.get("cred")) {
      const x = credentialClaims(frag.get("cred")).cnf?.jwk?.x;
      app.viewer = await importViewerKey(frag.get("vk"), x);
      await store.put("viewer-key", app.viewer);
    } else {
      app.viewer = await viewerKey();
    }
    if (frag.get("cred")) await store.put("credential", frag.get("cred").trim());
    if (frag.get("dk") && q.get("device")) await store.put(`pin:${q.get("device")}`, frag.get("dk"));
    app.credential = (await store.get("credential")) || "";
  } catch (e) {
    authStatus("error", `signed mode unavailable: ${e.message}`);
  }
  if (location.hash) history.replaceState(null, "", `${location.pathname}${location.search}`);
  $("credential").value = app.credential;
  $("viewer-key").textContent = app.viewer?.publicB64 || "–";
}

function authStatus(state, text) {
  badge("auth-status", state, text);
  if (state === "error") log(text);
}

/** Takes the credential from the form (a new one clears an authorization problem). */
async function readCredential() {
  const cred = $("credential").value.trim();
  app.authProblem = null;
  if (cred === app.credential) return;
  app.credential = cred;
  if (cred) await store.put("credential", cred);
  else await store.delete("credential");
}

/**
 * What a session with `device` signs with, or null for a device in open mode. Pins the
 * device key on first use (or at enrolment, from the URL); a changed key is refused.
 * Throws with the reason when this browser cannot be authorized.
 */
async function sessionAuth(device, entry) {
  if (entry.auth !== "signed") {
    authStatus("idle", `${device} runs without signatures (auth.mode = "open")`);
    return null;
  }
  if (!app.viewer) throw new Error("signed mode needs WebCrypto Ed25519 (a current browser)");
  if (!app.credential) {
    throw new Error(`${device} needs a credential: ask its owner for one for your viewer key ${app.viewer.publicB64} and paste it above`);
  }
  let described;
  try {
    described = describeCredential(app.credential, app.viewer.publicB64, device);
  } catch (e) {
    throw new Error(`the credential is unreadable: ${e.message}`);
  }
  if (described.problem) throw new Error(`this credential cannot work: ${described.problem}`);
  let pinned = await store.get(`pin:${device}`);
  if (!pinned && entry.key) {
    pinned = entry.key;
    await store.put(`pin:${device}`, pinned);
    log(`${device}: device key ${pinned} pinned on first use`);
  }
  if (!pinned) throw new Error(`${device} announces no device key`);
  if (entry.key && entry.key !== pinned) {
    throw new Error(`${device} now announces device key ${entry.key}, but ${pinned} is pinned: not connecting. If the device was really replaced, use "Forget pinned key"`);
  }
  $("device-key").textContent = pinned;
  authStatus("ok", `signed: ${described.text}`);
  return { privateKey: app.viewer.privateKey, credential: app.credential, deviceKey: await importPublicKey(pinned) };
}

/** Fills the form from the URL (?broker=&device=&username=&prefix=). Never a password. */
function readUrl() {
  const q = new URLSearchParams(location.search);
  $("broker").value = q.get("broker") || defaultBroker();
  $("username").value = q.get("username") || "";
  $("prefix").value = q.get("prefix") || "rtcam";
  $("device").value = q.get("device") || "";
  return q.has("broker") || q.has("device");
}

function writeUrl() {
  const q = new URLSearchParams();
  q.set("broker", $("broker").value.trim());
  if ($("device").value.trim()) q.set("device", $("device").value.trim());
  if ($("username").value.trim()) q.set("username", $("username").value.trim());
  if ($("prefix").value.trim() !== "rtcam") q.set("prefix", $("prefix").value.trim());
  history.replaceState(null, "", `${location.pathname}?${q}`);
}

// ---- broker and devices --------------------------------------------------------------------

async function connect() {
  await readCredential();
  disconnect();
  const url = $("broker").value.trim();
  if (!/^wss?:\/\//.test(url)) {
    badge("conn-status", "error", "broker URL must start with ws:// or wss://");
    return;
  }
  app.prefix = $("prefix").value.trim() || "rtcam";
  app.device = $("device").value.trim() || null;
  app.lastStatus = null;
  writeUrl();
  app.link = new BrokerLink({
    url,
    username: $("username").value.trim(),
    // The password lives only in the form field and the MQTT client's memory.
    password: $("password").value,
    prefix: app.prefix,
    log,
    onConnection: (state, detail) => {
      const text = { connecting: "connecting", connected: "broker connected", offline: "broker offline", error: "broker error" }[state];
      badge("conn-status", state === "connected" ? "ok" : state === "error" ? "error" : "wait", `${text}: ${detail}`);
      if (state === "offline") log(`broker offline, ${detail}`);
      if (state === "connected") reconcile();
    },
    onDevices: onDevices,
  });
  renderDevices();
  updateSessionBadge();
}

function disconnect() {
  endSession("disconnected");
  app.link?.close();
  app.link = null;
  badge("conn-status", "idle", "not connected");
  renderDevices();
}

function onDevices(devices, id, key) {
  renderDevices();
  if (id !== app.device) return;
  const entry = devices.get(id);
  if (key === "state") {
    showDeviceState(entry.state);
    return;
  }
  const prev = app.lastStatus;
  app.lastStatus = entry.status;
  if (entry.status === "offline") {
    endSession("device offline");
  } else if (entry.status === "online" && prev === "offline") {
    // The device restarted: whatever session we had (or were retrying) is gone; start afresh.
    endSession("device restarted");
    app.retryDelay = RETRY_MIN_MS;
  }
  reconcile();
}

function renderDevices() {
  const ul = $("devices");
  ul.replaceChildren();
  const devices = app.link?.devices;
  if (!devices || devices.size === 0) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = app.link ? "no devices seen yet" : "connect to a broker";
    ul.append(li);
    return;
  }
  for (const [id, entry] of [...devices].sort(([a], [b]) => a.localeCompare(b))) {
    const li = document.createElement("li");
    li.dataset.device = id;
    li.dataset.status = entry.status || "unknown";
    li.dataset.selected = String(id === app.device);
    const b = document.createElement("button");
    b.type = "button";
    const s = entry.state;
    const detail = s ? `, ${s.width}x${s.height}@${s.fps}, ${s.viewers} viewer(s)` : "";
    b.textContent = `${id} — ${entry.status || "?"}${detail}`;
    b.onclick = () => selectDevice(id);
    li.append(b);
    ul.append(li);
  }
}

function selectDevice(id) {
  if (id === app.device) return;
  endSession("switched device");
  app.authProblem = null;
  app.device = id;
  $("device").value = id;
  writeUrl();
  const entry = app.link?.devices.get(id);
  app.lastStatus = entry?.status ?? null;
  app.retryDelay = RETRY_MIN_MS;
  if (entry?.state) showDeviceState(entry.state);
  renderDevices();
  reconcile();
}

// ---- sessions --------------------------------------------------------------------------------

function updateSessionBadge(text) {
  if (app.session && !app.session.closed && app.session.ready) {
    badge("session-status", "ok", `watching ${app.device} (session ${app.session.id})`);
  } else if (!app.device) {
    badge("session-status", "idle", "pick a device");
  } else {
    badge("session-status", "wait", text || "waiting");
  }
}

/** Starts a session when the broker is up, the device online and none is live or pending. */
function reconcile() {
  if (!app.link || !app.device || app.session || app.retryTimer || app.authProblem) return;
  if (!app.link.connected) {
    updateSessionBadge("waiting for the broker");
    return;
  }
  const entry = app.link.devices.get(app.device);
  if (entry?.status !== "online") {
    updateSessionBadge(entry ? `${app.device} is offline` : `${app.device} not seen yet`);
    return;
  }
  startSession();
}

async function startSession() {
  const entry = app.link.devices.get(app.device);
  // Claimed synchronously, so reconcile() does not start a second one meanwhile.
  const claim = { closed: false, ready: false, pending: true };
  app.session = claim;
  let auth;
  try {
    auth = await sessionAuth(app.device, entry);
  } catch (e) {
    if (app.session === claim) app.session = null;
    blockOnAuth(e.message);
    return;
  }
  if (app.session !== claim) return; // ended meanwhile
  const s = new Session({
    link: app.link,
    prefix: app.prefix,
    device: app.device,
    auth,
    log,
    onTrack: (stream) => {
      const v = $("video");
      v.srcObject = stream;
      v.play().catch(() => {});
    },
    onClose: (reason, code) => onSessionClosed(s, reason, code),
    onEvent: (value) => log(`event: ${JSON.stringify(value)}`),
  });
  app.session = s;
  app.sampler = new StatsSampler();
  app.stats = {};
  updateSessionBadge(`connecting to ${app.device}…`);
  log(`session ${s.id}: offering to ${app.device}`);
  try {
    await s.start();
  } catch (e) {
    log(`session ${s.id}: ${e.message}`);
    return; // onClose schedules the retry, or says why not
  }
  if (app.session !== s) return;
  s.ready = true;
  app.retryDelay = RETRY_MIN_MS;
  updateSessionBadge();
  setPanelEnabled(true);
  loadControls(s);
  s.command("get-state").then((r) => r.ok && showDeviceState(r.result), () => {});
}

/** Refusals a new offer with the same credential would get again: no retry. */
const AUTH_REFUSALS = ["unauthorized", "stale"];

function onSessionClosed(s, reason, code) {
  if (app.session !== s) return;
  app.session = null;
  setPanelEnabled(false);
  if (AUTH_REFUSALS.includes(code)) blockOnAuth(reason.replace(/^device refused: /, ""));
  if (app.authProblem) return; // no retry until the credential or the pin changes
  updateSessionBadge(`${reason}; retrying`);
  scheduleRetry();
}

/** Not authorized: says why, and why not retrying, until the user changes something. */
function blockOnAuth(reason) {
  app.authProblem = reason;
  authStatus("error", `not authorized: ${reason}`);
  badge("session-status", "error", `not authorized to watch ${app.device}`);
}

function scheduleRetry() {
  clearTimeout(app.retryTimer);
  const delay = app.retryDelay;
  app.retryDelay = Math.min(app.retryDelay * 2, RETRY_MAX_MS);
  log(`new session in ${delay / 1000} s`);
  app.retryTimer = setTimeout(() => {
    app.retryTimer = null;
    reconcile();
  }, delay);
}

function endSession(reason) {
  clearTimeout(app.retryTimer);
  app.retryTimer = null;
  const s = app.session;
  app.session = null;
  if (s && !s.pending) s.close(reason, true);
  setPanelEnabled(false);
  updateSessionBadge(reason);
}

// ---- stats -----------------------------------------------------------------------------------

async function refreshStats() {
  const s = app.session;
  if (!s?.ready) return;
  let st;
  try {
    st = app.sampler.sample(await s.getStats());
  } catch {
    return;
  }
  const v = $("video");
  app.stats = { ...st, session: s.id, videoWidth: v.videoWidth, videoHeight: v.videoHeight };
  $("stat-resolution").textContent = st.width ? `${st.width}x${st.height}` : "–";
  $("stat-fps").textContent = st.fps != null ? String(Math.round(st.fps)) : "–";
  $("stat-bitrate").textContent = formatBitrate(st.bitrate);
  $("stat-bitrate").dataset.bps = st.bitrate != null ? String(Math.round(st.bitrate)) : "";
  $("stat-rtt").textContent = st.rttMs != null ? `${st.rttMs.toFixed(1)} ms` : "–";
  $("stat-lost").textContent = st.packetsLost != null ? String(st.packetsLost) : "–";
  $("stat-frames").textContent = st.framesDecoded != null ? String(st.framesDecoded) : "–";
  // Chrome reveals decoderImplementation only to pages with camera permission: often codec only.
  $("stat-decoder").textContent = [st.codec, st.decoder].filter(Boolean).join(", ") || "–";
}

function showDeviceState(state) {
  if (!state) return;
  if (state.bitrate != null) {
    const target = $("stat-target-bitrate");
    target.textContent = formatBitrate(state.bitrate);
    target.dataset.bps = String(state.bitrate);
    setIfIdle($("bitrate-kbps"), Math.round(state.bitrate / 1000));
  }
  if (state.viewers != null) $("stat-viewers").textContent = `${state.viewers} / ${state.max_viewers}`;
  setIfIdle($("fps"), state.fps);
  const sel = $("resolution");
  if (state.width && state.height && document.activeElement !== sel) {
    const res = `${state.width}x${state.height}`;
    if (![...sel.options].some((o) => o.value === res)) sel.add(new Option(res));
    sel.value = res;
  }
  for (const [name, value] of Object.entries(state.controls || {})) showControlValue(name, value);
}

function setIfIdle(input, value) {
  if (document.activeElement !== input && value != null) input.value = String(value);
}

// ---- commands --------------------------------------------------------------------------------

function setPanelEnabled(on) {
  for (const el of document.querySelectorAll("#camera button, #camera input, #camera select, #send, #controls input, #controls select")) {
    el.disabled = !on;
  }
}

async function run(cmd, args) {
  const s = app.session;
  if (!s?.ready) {
    log(`${cmd}: no session`);
    return null;
  }
  try {
    const reply = await s.command(cmd, args);
    if (!reply.ok) log(`${cmd}: ${reply.error?.code}: ${reply.error?.message}`);
    return reply;
  } catch (e) {
    log(`${cmd}: ${e.message}`);
    return null;
  }
}

async function snapshot() {
  const reply = await run("snapshot");
  if (!reply?.ok || !reply.jpeg) return;
  const r = reply.result;
  if (app.snapshotUrl) URL.revokeObjectURL(app.snapshotUrl);
  app.snapshotUrl = URL.createObjectURL(reply.jpeg);
  const name = `rtcam-${app.device}-${new Date().toISOString().replace(/[:.]/g, "-")}.jpg`;
  $("snapshot-img").src = app.snapshotUrl;
  const a = $("snapshot-link");
  a.href = app.snapshotUrl;
  a.download = name;
  $("snapshot-info").textContent = `${r.width}x${r.height}, ${r.size} bytes`;
  $("snapshot-figure").hidden = false;
  a.click(); // download it
  log(`snapshot ${r.width}x${r.height} (${r.size} bytes) saved as ${name}`);
}

async function loadControls(s) {
  const box = $("controls");
  const reply = await run("list-controls");
  if (app.session !== s || !reply?.ok) return;
  box.replaceChildren();
  const controls = reply.result.controls || [];
  if (controls.length === 0) box.textContent = "this camera has no controls";
  for (const c of controls) box.append(renderControl(c));
}

/** One control row, rendered from the device's own range, step or menu (list-controls). */
function renderControl(c) {
  const row = document.createElement("div");
  row.className = "control";
  row.dataset.control = c.name;
  const label = document.createElement("label");
  label.textContent = c.name;
  label.title = `${c.kind}, default ${c.default}`;
  const out = document.createElement("output");
  let inputs;
  const send = async (value) => {
    const reply = await run("set-control", { name: c.name, value });
    if (reply?.ok) {
      showControlValue(c.name, reply.result.value);
      log(`${c.name} = ${reply.result.value}`);
    } else {
      showControlValue(c.name, row.dataset.value); // refused: nothing changed
    }
  };
  if (c.kind === "boolean") {
    const box = document.createElement("input");
    box.type = "checkbox";
    box.onchange = () => send(box.checked);
    inputs = [box];
  } else if (c.kind === "menu") {
    const sel = document.createElement("select");
    for (const [value, text] of c.menu || []) sel.add(new Option(`${text}`, String(value)));
    sel.onchange = () => send(Number(sel.value));
    inputs = [sel];
  } else {
    const range = document.createElement("input");
    range.type = "range";
    const num = document.createElement("input");
    num.type = "number";
    for (const el of [range, num]) {
      el.min = String(c.min);
      el.max = String(c.max);
      el.step = String(c.step || 1);
      el.onchange = () => send(Number(el.value));
    }
    range.oninput = () => (num.value = range.value);
    num.className = "control-value";
    const wrap = document.createElement("span");
    wrap.className = "row";
    wrap.append(range, num);
    inputs = [wrap];
  }
  row.append(label, ...inputs, out);
  showControlValue(c.name, c.value, row);
  return row;
}

function showControlValue(name, value, row = document.querySelector(`.control[data-control="${CSS.escape(name)}"]`)) {
  if (!row || value === undefined) return;
  row.dataset.value = String(value);
  row.querySelector("output").textContent = String(value === true ? 1 : value === false ? 0 : value);
  for (const el of row.querySelectorAll("input, select")) {
    if (document.activeElement === el) continue;
    if (el.type === "checkbox") el.checked = value === true || Number(value) === 1;
    else el.value = String(Number(value));
  }
}

async function freeForm(ev) {
  ev.preventDefault();
  const cmd = $("cmd").value.trim();
  let args;
  const text = $("args").value.trim();
  if (text) {
    try {
      args = JSON.parse(text);
    } catch (e) {
      $("reply").textContent = `args is not JSON: ${e.message}`;
      return;
    }
  }
  const reply = await run(cmd, args);
  $("reply").textContent = reply ? JSON.stringify(reply, null, 1) : "no reply (see log)";
}

// ---- wiring ----------------------------------------------------------------------------------

$("connect-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  connect();
});
$("forget-pin").onclick = async () => {
  if (!app.device) return;
  await store.delete(`pin:${app.device}`);
  log(`${app.device}: pinned device key forgotten; the next session pins the key the device announces`);
  $("device-key").textContent = "–";
  app.authProblem = null;
  reconcile();
};
$("disconnect").onclick = disconnect;
$("snapshot").onclick = snapshot;
$("keyframe").onclick = async () => {
  const reply = await run("keyframe");
  if (reply?.ok) log("keyframe requested");
};
$("bitrate-apply").onclick = async () => {
  const reply = await run("set-bitrate", { bps: Math.round(Number($("bitrate-kbps").value) * 1000) });
  if (reply?.ok) {
    log(`bitrate set to ${reply.result.bps} bit/s`);
    showDeviceState({ ...(app.link?.devices.get(app.device)?.state || {}), bitrate: reply.result.bps });
  }
};
$("fps-apply").onclick = async () => {
  const reply = await run("set-fps", { fps: Number($("fps").value) });
  if (reply?.ok) log(`fps: ${reply.result.fps}`);
};
$("resolution-apply").onclick = async () => {
  const [width, height] = $("resolution").value.split("x").map(Number);
  const reply = await run("set-resolution", { width, height });
  if (reply?.ok) log(`resolution: ${reply.result.width}x${reply.result.height}`);
};
$("command-form").addEventListener("submit", freeForm);
setPanelEnabled(false);
setInterval(refreshStats, 1000);
const fromUrl = readUrl();
initAuth().then(() => {
  if (fromUrl) connect();
  else updateSessionBadge();
});
