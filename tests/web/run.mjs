// Browser tests of the rtcam viewer: a real mosquitto (TCP + WebSocket), the rtcam binary serving
// web/dist, and Debian's Chromium driven by playwright-core. Run inside a private network
// namespace (tests/run.sh does: `unshare -n`); every socket is on 127.0.0.1.
//
//   node tests/web/run.mjs          (needs $RTCAM_BIN or target/release/rtcam, web/dist built)
//   node tests/web/run.mjs demo     the README's demo as a new user meets it: rtcam with
//                                   config/demo.toml unchanged, the URL scripts/demo.sh prints,
//                                   an ordinary Chromium (no loopback/mDNS flags). Needs a
//                                   non-loopback interface in the namespace (tests/run.sh adds
//                                   a veth pair that leads nowhere).
//
// Signed mode (docs/protocol.md §9) is on, as by default: the test makes an owner key with
// `rtcam token keygen`, and the page is enrolled the way a person would do it: it shows its own
// viewer key, the owner issues a credential for it with `rtcam token issue`, and it is pasted.
//
// Writes target/web-screenshot.png (video playing), target/web-snapshot.jpg (the downloaded
// snapshot) and, on failure, target/web-failure.png plus the tails of every process log.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readFileSync, writeFileSync, accessSync, constants } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const TARGET = join(REPO, "target");
const HOST = "127.0.0.1";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const RTCAM_BIN = resolve(REPO, process.env.RTCAM_BIN || "target/release/rtcam");
const WEB_ROOT = resolve(REPO, process.env.RTCAM_WEB_ROOT || "web/dist");
const WORK = mkdtempSync(join(tmpdir(), "rtcam-web-"));
const WIDTH = 640;
const HEIGHT = 480;

const procs = [];
const t0 = Date.now();
const elapsed = () => `${((Date.now() - t0) / 1000).toFixed(1)}s`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- prerequisites: missing ones fail loudly ----------------------------------------------

function requireFile(path, what, fix) {
  try {
    accessSync(path, constants.R_OK);
  } catch {
    console.error(`browser tests: ${what} not found at ${path}: ${fix}`);
    process.exit(1);
  }
}
requireFile(CHROMIUM, "Chromium", "apt-get install chromium (or set CHROMIUM)");
requireFile(RTCAM_BIN, "the rtcam binary", "cargo build --release (or set RTCAM_BIN)");
requireFile(join(WEB_ROOT, "index.html"), "the built viewer", "cd web && npm ci && npm run build");
requireFile(join(WEB_ROOT, "app.js"), "the built viewer", "cd web && npm ci && npm run build");
const MOSQUITTO = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].find((p) => existsSync(p));
const MOSQUITTO_PASSWD = ["/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd"].find((p) => existsSync(p));
if (!MOSQUITTO || !MOSQUITTO_PASSWD) {
  console.error("browser tests: mosquitto or mosquitto_passwd not found: apt-get install mosquitto");
  process.exit(1);
}

// ---- processes -----------------------------------------------------------------------------

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once("error", rej);
    s.listen(0, HOST, () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

function waitTcp(port, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  return new Promise((res, rej) => {
    const attempt = () => {
      const sock = tcpConnect(port, HOST);
      sock.once("connect", () => {
        sock.destroy();
        res();
      });
      sock.once("error", () => {
        sock.destroy();
        if (Date.now() > deadline) rej(new Error(`nothing listens on ${HOST}:${port}`));
        else setTimeout(attempt, 50);
      });
    };
    attempt();
  });
}

class Proc {
  constructor(name, argv, env = {}) {
    this.name = name;
    this.log = join(WORK, `${name}.log`);
    const fd = openSync(this.log, "a");
    this.child = spawn(argv[0], argv.slice(1), { cwd: REPO, stdio: ["ignore", fd, fd], env: { ...process.env, NO_COLOR: "1", ...env } });
    this.exited = new Promise((r) => this.child.once("exit", (code, sig) => r(code ?? sig)));
    procs.push(this);
  }

  alive() {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  async stop(signal = "SIGTERM", timeoutMs = 10000) {
    if (!this.alive()) return this.exited;
    this.child.kill(signal);
    const r = await Promise.race([this.exited, sleep(timeoutMs).then(() => "timeout")]);
    if (r === "timeout") {
      this.child.kill("SIGKILL");
      throw new Error(`${this.name} did not stop within ${timeoutMs} ms of ${signal}`);
    }
    return r;
  }

  tail(lines = 60) {
    try {
      return readFileSync(this.log, "utf8").split("\n").slice(-lines).join("\n");
    } catch {
      return "<no log>";
    }
  }
}

// The page logs in as this user over WebSocket; rtcam uses the anonymous TCP listener.
const VIEWER_USER = "viewer";
const VIEWER_PASSWORD = "s3cret-pw";

async function startMosquitto() {
  const tcp = await freePort();
  const ws = await freePort();
  const conf = join(WORK, "mosquitto.conf");
  const passwords = join(WORK, "mosquitto.passwd");
  const made = spawnSync(MOSQUITTO_PASSWD, ["-b", "-c", passwords, VIEWER_USER, VIEWER_PASSWORD], { encoding: "utf8" });
  assert.equal(made.status, 0, `mosquitto_passwd: ${made.stderr}`);
  writeFileSync(
    conf,
    [
      "per_listener_settings true",
      `listener ${tcp} ${HOST}`,
      "allow_anonymous true",
      `listener ${ws} ${HOST}`,
      "protocol websockets",
      "allow_anonymous false",
      `password_file ${passwords}`,
      "persistence false",
      "user root",
      "log_dest stderr",
      "log_type error",
      "log_type warning",
      "log_type notice",
      "connection_messages true",
      "",
    ].join("\n"),
  );
  const p = new Proc("mosquitto", [MOSQUITTO, "-c", conf]);
  await waitTcp(tcp, 10000);
  await waitTcp(ws, 10000);
  return { proc: p, tcp, ws, conf };
}

/** Runs `rtcam <args>` and returns its stdout (a key, a credential); fails loudly. */
function rtcamCli(args) {
  const r = spawnSync(RTCAM_BIN, args, { cwd: WORK, encoding: "utf8" });
  assert.equal(r.status, 0, `rtcam ${args.join(" ")}: ${r.stderr}`);
  return r.stdout.trim();
}

// The owner of the test devices: its public key is in every test rtcam's auth.owner_keys.
const OWNER_KEY = join(WORK, "owner.key");
const OWNER_PUBLIC = rtcamCli(["token", "keygen", "--out", OWNER_KEY]);

/** A credential from `owner` for `viewerKey` (a public key), as its owner would issue it. */
function issue(viewerKey, devices, allow = "view,control", owner = OWNER_KEY) {
  const args = ["token", "issue", "--key", owner, "--viewer-key", viewerKey, "--allow", allow, "--expires", "1d", "--name", "browser-test"];
  for (const d of devices) args.push("--device", d);
  return rtcamCli(args);
}

function rtcamConfig({ device, mqttPort, webPort, broker }) {
  const lines = [
    "[device]",
    `id = "${device}"`,
    "[capture]",
    `source = "test-pattern"`,
    `width = ${WIDTH}`,
    `height = ${HEIGHT}`,
    "fps = 30",
    // Fresh noise under the moving box: the stream needs the bitrate it is given, so the
    // received bitrate can follow set-bitrate (docs/protocol.md §5.1).
    "test_pattern_noise = true",
    "[webrtc]",
    `bind_addresses = ["${HOST}"]`,
    "disconnect_timeout_ms = 3000",
    "[mqtt]",
    `host = "${HOST}"`,
    `port = ${mqttPort}`,
    "reconnect_max_ms = 2000",
    "[web]",
    "enabled = true",
    `listen = "${HOST}:${webPort}"`,
    `root = ${JSON.stringify(WEB_ROOT)}`,
    "[log]",
    `target = "stderr"`,
    `level = "info,rtcam=info,rumqttd=warn,rtc=warn,webrtc=warn"`,
    // A stable identity across the restarts below: the page pinned its key.
    "[auth]",
    `owner_keys = ["${OWNER_PUBLIC}"]`,
    `identity_key_path = ${JSON.stringify(join(WORK, `identity-${device}.pem`))}`,
  ];
  if (broker) {
    lines.push("[broker]", "enabled = true", `listen = "${HOST}:${mqttPort}"`, `ws_listen = "${HOST}:${broker.ws}"`);
  }
  const path = join(WORK, `rtcam-${device}.toml`);
  writeFileSync(path, lines.join("\n") + "\n");
  return path;
}

async function startRtcam(name, config, webPort) {
  const p = new Proc(name, [RTCAM_BIN, "--config", config]);
  await waitTcp(webPort, 20000).catch((e) => {
    throw new Error(`${name} did not serve the viewer: ${e.message}\n${p.tail()}`);
  });
  return p;
}

// ---- page helpers --------------------------------------------------------------------------

async function videoInfo(page) {
  return page.evaluate(() => {
    const v = document.getElementById("video");
    const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : null;
    return {
      videoWidth: v.videoWidth,
      videoHeight: v.videoHeight,
      currentTime: v.currentTime,
      paused: v.paused,
      totalVideoFrames: q ? q.totalVideoFrames : null,
      session: window.rtcam.session?.id ?? null,
      ready: !!window.rtcam.session?.ready,
      stats: window.rtcam.stats,
      shown: {
        resolution: document.getElementById("stat-resolution").textContent,
        frames: document.getElementById("stat-frames").textContent,
        decoder: document.getElementById("stat-decoder").textContent,
        bitrate: document.getElementById("stat-bitrate").textContent,
        target: document.getElementById("stat-target-bitrate").textContent,
      },
    };
  });
}

/** Waits until the page plays video at the stream's size with framesDecoded rising. */
async function expectVideoPlaying(page, what, timeoutMs = 30000) {
  await page.waitForFunction(
    ([w, h]) => {
      const v = document.getElementById("video");
      const s = window.rtcam.session;
      const st = window.rtcam.stats;
      return v.videoWidth === w && v.videoHeight === h && s?.ready && st?.session === s.id && st.framesDecoded > 0;
    },
    [WIDTH, HEIGHT],
    { timeout: timeoutMs, polling: 200 },
  );
  const a = await videoInfo(page);
  await sleep(2000);
  const b = await videoInfo(page);
  assert.equal(b.videoWidth, WIDTH, `${what}: videoWidth`);
  assert.equal(b.videoHeight, HEIGHT, `${what}: videoHeight`);
  assert.equal(b.session, a.session, `${what}: the session changed while sampling`);
  assert.ok(b.stats.framesDecoded > a.stats.framesDecoded + 20, `${what}: framesDecoded did not rise: ${a.stats.framesDecoded} -> ${b.stats.framesDecoded}`);
  assert.equal(b.shown.resolution, `${WIDTH}x${HEIGHT}`, `${what}: the page shows resolution ${b.shown.resolution}`);
  assert.equal(Number(b.shown.frames), b.stats.framesDecoded, `${what}: the page shows frames decoded`);
  assert.ok(b.currentTime > a.currentTime, `${what}: video currentTime did not advance`);
  return b;
}

/** The received bitrate the page shows, averaged over six readings half a second apart. */
async function receivedBps(page) {
  let sum = 0;
  for (let i = 0; i < 6; i++) {
    sum += Number(await page.getAttribute("#stat-bitrate", "data-bps")) || 0;
    await sleep(500);
  }
  return sum / 6;
}

/** Mean of the green channel over the video frame (the test pattern's brightness moves it). */
function meanGreen(page) {
  return page.evaluate(() => {
    const v = document.getElementById("video");
    const c = document.createElement("canvas");
    c.width = v.videoWidth;
    c.height = v.videoHeight;
    const g = c.getContext("2d", { willReadFrequently: true });
    g.drawImage(v, 0, 0);
    // The colour bars: below the two rows of bit cells (b = 16 px at 640 wide), above the
    // moving box and the noise band (which brightness does not move).
    const d = g.getImageData(0, 64, c.width, c.height / 2 - 72).data;
    let sum = 0;
    for (let i = 1; i < d.length; i += 4) sum += d[i];
    return sum / (d.length / 4);
  });
}

/** SOI/EOI and the SOF dimensions of a baseline/progressive JPEG. */
function jpegInfo(buf) {
  assert.ok(buf.length > 1000, `JPEG too small: ${buf.length} bytes`);
  assert.ok(buf[0] === 0xff && buf[1] === 0xd8, "JPEG: no SOI marker");
  assert.ok(buf[buf.length - 2] === 0xff && buf[buf.length - 1] === 0xd9, "JPEG: no EOI marker");
  let i = 2;
  while (i + 4 < buf.length) {
    assert.equal(buf[i], 0xff, `JPEG: bad marker at ${i}`);
    const marker = buf[i + 1];
    const len = buf.readUInt16BE(i + 2);
    if (marker >= 0xc0 && marker <= 0xc3) {
      return { height: buf.readUInt16BE(i + 5), width: buf.readUInt16BE(i + 7), components: buf[i + 9] };
    }
    i += 2 + len;
  }
  throw new Error("JPEG: no SOF marker");
}

// ---- the tests -----------------------------------------------------------------------------

const steps = [];
async function step(name, fn) {
  const start = Date.now();
  process.stdout.write(`[${elapsed()}] ${name} ... `);
  await fn();
  const ms = Date.now() - start;
  steps.push({ name, ms });
  console.log(`ok (${ms} ms)`);
}

let browser;
let page;
const consoleLines = [];
const httpRequests = [];

async function main() {
  const broker = await startMosquitto();
  const webPort = await freePort();
  const device = "webcam";
  const config = rtcamConfig({ device, mqttPort: broker.tcp, webPort });
  let rtcam = await startRtcam("rtcam", config, webPort);

  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      // WebRTC over loopback only (the namespace has nothing else): gather 127.0.0.1, and
      // show real addresses instead of mDNS names (as a page with media permission would).
      "--allow-loopback-in-peer-connection",
      "--use-fake-ui-for-media-stream",
      "--use-fake-device-for-media-stream",
      "--disable-features=WebRtcHideLocalIpsWithMdns",
      "--autoplay-policy=no-user-gesture-required",
    ],
  });
  const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
  page.on("request", (r) => httpRequests.push(r.url()));

  const url = `http://${HOST}:${webPort}/?broker=ws://${HOST}:${broker.ws}&device=${device}&username=${VIEWER_USER}`;
  await step(`page from rtcam's web server logs in to mosquitto's WebSocket listener (${url})`, async () => {
    const resp = await page.goto(url);
    assert.equal(resp.status(), 200);
    assert.match(resp.headers()["content-type"], /^text\/html/);
    // Settings from the URL; without the password the broker refuses the page.
    assert.equal(await page.inputValue("#username"), VIEWER_USER);
    await page.waitForFunction(() => /not authori[sz]ed/i.test(document.getElementById("log").textContent), null, { timeout: 15000 });
    // The password comes from the form.
    await page.fill("#password", VIEWER_PASSWORD);
    await page.click("#connect");
    await page.waitForSelector('#conn-status[data-state="ok"]', { timeout: 15000 });
    await page.waitForSelector(`#devices li[data-device="${device}"][data-status="online"]`, { timeout: 15000 });
  });

  let viewerKey;
  await step("without a credential the page says what it needs, and shows its own viewer key", async () => {
    await page.waitForSelector('#auth-status[data-state="error"]', { timeout: 15000 });
    const text = await page.textContent("#auth-status");
    viewerKey = (await page.textContent("#viewer-key")).trim();
    assert.match(viewerKey, /^[A-Za-z0-9_-]{43}$/, "the page's viewer key");
    assert.match(text, /needs a credential/, text);
    assert.ok(text.includes(viewerKey), `the error names the viewer key to send the owner: ${text}`);
    assert.equal(await page.evaluate(() => window.rtcam.session), null, "no session was attempted");
  });

  await step("a wrong credential shows an error: bound to another key, or from an owner the device does not trust", async () => {
    const otherViewer = rtcamCli(["token", "keygen", "--out", join(WORK, "other-viewer.key")]);
    await page.fill("#credential", issue(otherViewer, [device]));
    await page.click("#connect");
    await page.waitForFunction(() => /another viewer key/.test(document.getElementById("auth-status").textContent), null, { timeout: 15000 });
    assert.equal(await page.getAttribute("#auth-status", "data-state"), "error");
    // Right key, but an owner the device does not know: the device itself refuses the offer.
    const stranger = join(WORK, "stranger-owner.key");
    rtcamCli(["token", "keygen", "--out", stranger]);
    await page.fill("#credential", issue(viewerKey, [device], "view,control", stranger));
    await page.click("#connect");
    await page.waitForFunction(
      () => /not authorized: unauthorized: credential refused/.test(document.getElementById("auth-status").textContent),
      null,
      { timeout: 20000 },
    );
    const shown = await page.textContent("#auth-status");
    console.log(`\n    shown: ${shown}`);
    assert.match(await page.textContent("#session-status"), /not authorized/);
    assert.equal(await page.evaluate(() => document.getElementById("video").videoWidth), 0, "no video");
  });

  await step("the right credential, pasted: the page pins the device key and video plays", async () => {
    await page.fill("#credential", issue(viewerKey, [device, "demo"]));
    await page.click("#connect");
    await page.waitForSelector('#auth-status[data-state="ok"]', { timeout: 20000 });
    const status = await page.evaluate((d) => window.rtcam.link.devices.get(d), device);
    assert.equal(status.auth, "signed");
    assert.equal((await page.textContent("#device-key")).trim(), status.key, "the announced device key is pinned");
  });

  await step("video plays at the stream's size, framesDecoded rising, stats shown", async () => {
    const info = await expectVideoPlaying(page, "first session");
    assert.notEqual(info.shown.decoder, "–", "decoder shown");
    await page.waitForFunction(() => document.getElementById("stat-rtt").textContent !== "–", null, { timeout: 10000 });
    console.log(`\n    stats: ${JSON.stringify(info.shown)}`);
  });

  await step("screenshot of the page with video playing -> target/web-screenshot.png", async () => {
    await sleep(1500); // let the received bitrate settle on screen
    await page.screenshot({ path: join(TARGET, "web-screenshot.png"), fullPage: true });
  });

  await step("snapshot downloads a valid JPEG of the stream's size", async () => {
    const [download] = await Promise.all([page.waitForEvent("download", { timeout: 15000 }), page.click("#snapshot")]);
    assert.match(download.suggestedFilename(), /^rtcam-webcam-.*\.jpg$/);
    const out = join(TARGET, "web-snapshot.jpg");
    await download.saveAs(out);
    const info = jpegInfo(readFileSync(out));
    assert.deepEqual([info.width, info.height], [WIDTH, HEIGHT], "JPEG dimensions");
    assert.equal(info.components, 3, "JPEG colour components");
    const shown = await page.textContent("#snapshot-info");
    assert.match(shown, new RegExp(`^${WIDTH}x${HEIGHT}, \\d+ bytes$`));
  });

  await step("set-bitrate from the page is reflected in the stats", async () => {
    const receivedBefore = await receivedBps(page);
    const before = await videoInfo(page);
    assert.equal(before.shown.target, "1.00 Mbit/s", "initial device target bitrate");
    await page.fill("#bitrate-kbps", "300");
    await page.click("#bitrate-apply");
    await page.waitForFunction(() => document.getElementById("stat-target-bitrate").dataset.bps === "300000", null, { timeout: 10000 });
    assert.equal(await page.textContent("#stat-target-bitrate"), "300 kbit/s");
    // The device's own retained state carries it too (not only the command's reply).
    await page.waitForFunction(
      () => window.rtcam.link.devices.get("webcam")?.state?.bitrate === 300000,
      null,
      { timeout: 10000 },
    );
    // The received bitrate the page shows follows the target (the noise band needs every bit).
    await sleep(2500); // the encoder's rate control and the page's 1 s stats window settle
    const receivedAfter = await receivedBps(page);
    const after = await videoInfo(page);
    assert.match(after.shown.bitrate, /^\d+ kbit\/s$|Mbit\/s$/, "received bitrate shown");
    console.log(`\n    received bitrate at 1 Mbit/s ${Math.round(receivedBefore / 1000)} kbit/s -> at 300 kbit/s ${Math.round(receivedAfter / 1000)} kbit/s`);
    assert.ok(receivedBefore > 600000, `received ${receivedBefore} bit/s at a 1 Mbit/s target`);
    assert.ok(receivedAfter > 120000 && receivedAfter < 450000, `received ${receivedAfter} bit/s at a 300 kbit/s target`);
    assert.ok(receivedBefore > 2 * receivedAfter, "the received bitrate followed the target down");
  });

  await step("resolution, fps and keyframe from the page: the video follows without a new session", async () => {
    const before = await videoInfo(page);
    await page.selectOption("#resolution", "320x240");
    await page.click("#resolution-apply");
    await page.waitForFunction(() => {
      const v = document.getElementById("video");
      return v.videoWidth === 320 && v.videoHeight === 240 && document.getElementById("stat-resolution").textContent === "320x240";
    }, null, { timeout: 15000 });
    await page.fill("#fps", "15");
    await page.click("#fps-apply");
    await page.waitForFunction(() => window.rtcam.link.devices.get("webcam")?.state?.fps === 15, null, { timeout: 10000 });
    await page.click("#keyframe");
    await page.waitForFunction(() => document.getElementById("log").textContent.includes("keyframe requested"), null, { timeout: 10000 });
    await page.selectOption("#resolution", `${WIDTH}x${HEIGHT}`);
    await page.click("#resolution-apply");
    await page.fill("#fps", "30");
    await page.click("#fps-apply");
    const after = await expectVideoPlaying(page, "back at 640x480");
    assert.equal(after.session, before.session, "set-resolution replaced the session");
  });

  await step("the test pattern's brightness control round-trips through the rendered control", async () => {
    const row = page.locator('.control[data-control="brightness"]');
    await row.waitFor({ timeout: 10000 });
    const num = row.locator('input[type="number"]');
    const range = row.locator('input[type="range"]');
    // Rendered from list-controls with the device's range.
    assert.equal(await num.getAttribute("min"), "-64");
    assert.equal(await num.getAttribute("max"), "64");
    assert.equal(await range.getAttribute("min"), "-64");
    assert.equal(await row.getAttribute("data-value"), "0");
    const greenBefore = await meanGreen(page);
    await num.fill("-40");
    await num.press("Enter");
    await page.waitForFunction(() => document.querySelector('.control[data-control="brightness"]').dataset.value === "-40", null, { timeout: 10000 });
    assert.equal(await row.locator("output").textContent(), "-40");
    assert.equal(await range.inputValue(), "-40");
    // Ask the device itself through the page's free-form command box.
    await page.fill("#cmd", "get-control");
    await page.fill("#args", '{"name": "brightness"}');
    await page.click("#send");
    await page.waitForFunction(() => document.getElementById("reply").textContent.includes('"ok": true'), null, { timeout: 10000 });
    const reply = JSON.parse(await page.textContent("#reply"));
    assert.deepEqual(reply.result, { name: "brightness", value: -40 });
    // And the device's state topic, and the picture itself.
    await page.waitForFunction(() => window.rtcam.link.devices.get("webcam")?.state?.controls?.brightness === -40, null, { timeout: 10000 });
    await sleep(1000);
    const greenAfter = await meanGreen(page);
    console.log(`\n    mean green ${greenBefore.toFixed(1)} -> ${greenAfter.toFixed(1)}`);
    assert.ok(greenAfter < greenBefore - 15, `the picture did not get darker: ${greenBefore} -> ${greenAfter}`);
    // A value outside the range is refused by the device and the control shows the old value.
    await num.fill("500");
    await num.press("Enter");
    await page.waitForFunction(() => document.getElementById("log").textContent.includes("out-of-range"), null, { timeout: 10000 });
    assert.equal(await row.getAttribute("data-value"), "-40");
  });

  await step("free-form command box: an unlisted namespace is refused by the device", async () => {
    await page.fill("#cmd", "ptz.move");
    await page.fill("#args", '{"pan": 5}');
    await page.click("#send");
    await page.waitForFunction(() => document.getElementById("reply").textContent.includes("not-allowed"), null, { timeout: 10000 });
  });

  await step("the password is not kept in localStorage/sessionStorage, cookies or the URL", async () => {
    const pw = VIEWER_PASSWORD;
    const r = await page.evaluate(() => ({ local: localStorage.length, session: sessionStorage.length, url: location.href, cookie: document.cookie }));
    assert.deepEqual([r.local, r.session, r.cookie], [0, 0, ""]);
    assert.ok(!r.url.includes(pw) && !/password/i.test(r.url), r.url);
    assert.ok(r.url.includes(`username=${VIEWER_USER}`), r.url);
  });

  await step("the viewer key is non-extractable in IndexedDB; the credential never went to a web server", async () => {
    const r = await page.evaluate(async () => {
      const db = await new Promise((res, rej) => {
        const q = indexedDB.open("rtcam-viewer");
        q.onsuccess = () => res(q.result);
        q.onerror = () => rej(q.error);
      });
      const key = await new Promise((res) => {
        const q = db.transaction("auth").objectStore("auth").get("viewer-key");
        q.onsuccess = () => res(q.result);
      });
      db.close();
      let exported = "refused";
      try {
        await crypto.subtle.exportKey("pkcs8", key.privateKey);
        exported = "exported";
      } catch {
        /* non-extractable: as intended */
      }
      return { type: key.privateKey.type, extractable: key.privateKey.extractable, exported, url: location.href };
    });
    assert.deepEqual([r.type, r.extractable, r.exported], ["private", false, "refused"]);
    const cred = await page.inputValue("#credential");
    assert.ok(!r.url.includes(cred.slice(0, 40)), "the credential is not in the URL");
    const leaked = httpRequests.filter((u) => u.includes(cred.slice(0, 40)) || u.includes(cred.slice(-40)));
    assert.deepEqual(leaked, [], "an HTTP request carried the credential");
    assert.ok(httpRequests.length > 0, "requests were recorded");
  });

  await step("rtcam restarts (SIGTERM, start again): the page recovers video without a reload", async () => {
    await page.evaluate(() => (window.__noReload = true));
    const before = await videoInfo(page);
    const code = await rtcam.stop("SIGTERM");
    assert.equal(code, 0, `rtcam exit code\n${rtcam.tail()}`);
    await page.waitForFunction(() => !window.rtcam.session?.ready, null, { timeout: 10000 });
    rtcam = await startRtcam("rtcam-2", config, webPort);
    await page.waitForFunction((old) => window.rtcam.session?.ready && window.rtcam.session.id !== old, before.session, { timeout: 30000 });
    const after = await expectVideoPlaying(page, "after the rtcam restart");
    assert.ok(await page.evaluate(() => window.__noReload === true), "the page was reloaded");
    console.log(`\n    session ${before.session} -> ${after.session}`);
  });

  await step("rtcam is killed (SIGKILL, last will) and started again: video recovers", async () => {
    const before = await videoInfo(page);
    await rtcam.stop("SIGKILL");
    rtcam = await startRtcam("rtcam-3", config, webPort);
    await page.waitForFunction((old) => window.rtcam.session?.ready && window.rtcam.session.id !== old, before.session, { timeout: 40000 });
    await expectVideoPlaying(page, "after SIGKILL and restart");
    assert.ok(await page.evaluate(() => window.__noReload === true), "the page was reloaded");
  });

  await step("mosquitto restarts: the page reconnects to the broker, the session lives on", async () => {
    const before = await videoInfo(page);
    await broker.proc.stop("SIGTERM");
    await page.waitForSelector('#conn-status:not([data-state="ok"])', { timeout: 15000 });
    // Down long enough for two failed attempts: the page backs off 1 s, 2 s, 4 s...
    await page.waitForFunction(() => document.getElementById("log").textContent.includes("retrying in 2 s"), null, { timeout: 10000 });
    broker.proc = new Proc("mosquitto-2", [MOSQUITTO, "-c", broker.conf]);
    await waitTcp(broker.ws, 10000);
    await page.waitForSelector('#conn-status[data-state="ok"]', { timeout: 30000 });
    await page.waitForFunction(() => window.rtcam.session?.ready, null, { timeout: 30000 });
    const after = await expectVideoPlaying(page, "after the broker restart");
    // Media and the data channel are peer to peer (docs/protocol.md §4.8): same session.
    assert.equal(after.session, before.session, "the session was replaced");
    const r = await page.evaluate(() => window.rtcam.session.command("ping", { t: 7 }));
    assert.deepEqual(r.result, { pong: true, t: 7 });
    assert.ok(await page.evaluate(() => window.__noReload === true), "the page was reloaded");
  });

  await step("clean shutdown: rtcam stops with the page connected", async () => {
    assert.equal(await rtcam.stop("SIGTERM"), 0, rtcam.tail());
    await broker.proc.stop("SIGTERM");
  });

  await step("the demo setup: rtcam's embedded broker (rumqttd) WebSocket listener works with mqtt.js", async () => {
    const mqttPort = await freePort();
    const ws = await freePort();
    const port = await freePort();
    const demoConfig = rtcamConfig({ device: "demo", mqttPort, webPort: port, broker: { ws } });
    const demo = await startRtcam("rtcam-demo", demoConfig, port);
    // No device in the URL: the user picks it from the list. Another origin: another
    // IndexedDB, so another viewer key, enrolled like the first.
    await page.goto(`http://${HOST}:${port}/?broker=ws://${HOST}:${ws}`);
    await page.waitForSelector('#conn-status[data-state="ok"]', { timeout: 15000 });
    await page.click('#devices li[data-device="demo"][data-status="online"] button', { timeout: 15000 });
    await page.waitForFunction(() => /needs a credential/.test(document.getElementById("auth-status").textContent), null, { timeout: 15000 });
    const key = (await page.textContent("#viewer-key")).trim();
    await page.fill("#credential", issue(key, ["demo"], "view"));
    await page.click("#connect");
    await page.click('#devices li[data-device="demo"][data-status="online"] button', { timeout: 15000 }).catch(() => {});
    await expectVideoPlaying(page, "embedded broker");
    assert.match(page.url(), /[?&]device=demo(&|$)/, "the chosen device is in the URL");
    assert.equal(await demo.stop("SIGTERM"), 0, demo.tail());
  });
}

/** The demo exactly as documented: config/demo.toml and the URL that scripts/demo.sh prints. */
async function demoMain() {
  const script = readFileSync(join(REPO, "scripts/demo.sh"), "utf8");
  const m = script.match(/^url="(http:[^"]+)"$/m);
  assert.ok(m, "scripts/demo.sh has no url=\"http://...\" line");
  // The demo's keys and credential fragment, as scripts/demo.sh makes them.
  const keys = spawnSync(join(REPO, "scripts/demo-keys.sh"), [], { cwd: REPO, encoding: "utf8", env: { ...process.env, RTCAM_BIN } });
  assert.equal(keys.status, 0, `scripts/demo-keys.sh: ${keys.stderr}`);
  const [owner, fragment] = keys.stdout.trim().split("\n");
  assert.match(fragment, /^cred=[^&]+&vk=[^&]+&dk=[A-Za-z0-9_-]{43}$/, "demo-keys.sh fragment");
  assert.match(script, /RTCAM__AUTH__OWNER_KEYS="\$owner"/, "demo.sh passes the demo owner key");
  assert.match(script, /"\$url#\$fragment"/, "demo.sh prints the URL with the credential fragment");
  const url = `${m[1]}#${fragment}`;
  const webPort = Number(new URL(url).port);
  const p = new Proc("rtcam-demo-toml", [RTCAM_BIN, "--config", join(REPO, "config/demo.toml")], { RTCAM__AUTH__OWNER_KEYS: owner });
  // Proc starts it in the repository, where demo.toml's web.root = "web/dist" points.
  await waitTcp(webPort, 20000);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // What any desktop Chromium does: no loopback candidates, mDNS-obfuscated host candidates.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  page = await browser.newPage();
  page.on("console", (msg) => consoleLines.push(`${msg.type()}: ${msg.text()}`));
  await step(`an ordinary browser opens the demo URL ${m[1]}#cred=… and plays video`, async () => {
    await page.goto(url);
    await expectVideoPlaying(page, "demo");
    assert.ok(!page.url().includes("#"), "the fragment with the credential is cleared from the address bar");
    assert.equal(await page.getAttribute("#auth-status", "data-state"), "ok");
    await page.screenshot({ path: join(TARGET, "web-demo-screenshot.png"), fullPage: true });
  });
  await step("the demo stops cleanly", async () => {
    assert.equal(await p.stop("SIGTERM"), 0, p.tail());
  });
  await step("a normal demo session (start, one browser viewer, stop) logged no WARN or ERROR", async () => {
    const lines = readFileSync(p.log, "utf8").split("\n");
    const bad = lines.filter((l) => / (WARN|ERROR) /.test(l));
    assert.ok(lines.some((l) => l.includes("viewer connected")), `the viewer never connected:\n${p.tail()}`);
    assert.deepEqual(bad, [], `rtcam logged warnings or errors in a normal session:\n${bad.join("\n")}`);
  });
}

let failed = false;
try {
  if (process.argv[2] === "demo") await demoMain();
  else await main();
} catch (e) {
  failed = true;
  console.log("FAILED");
  console.error(`\nbrowser tests failed: ${e.stack || e}`);
  if (page) {
    await page.screenshot({ path: join(TARGET, "web-failure.png"), fullPage: true }).catch(() => {});
    const logText = await page.textContent("#log").catch(() => "");
    console.error(`\n--- page log ---\n${logText}`);
  }
  console.error(`\n--- browser console ---\n${consoleLines.slice(-80).join("\n")}`);
  for (const p of procs) console.error(`\n--- ${p.name} log (${p.log}) ---\n${p.tail()}`);
} finally {
  await browser?.close().catch(() => {});
  for (const p of procs) if (p.alive()) p.child.kill("SIGKILL");
}
console.log(`\nbrowser tests: ${failed ? "FAILED" : "passed"} in ${elapsed()}; ${steps.length} steps passed`);
process.exit(failed ? 1 : 0);
