// WHEP in Chromium with a third-party client library: medooze's `whip-whep` (npm, pinned in
// package-lock.json) against rtcam's [whep] endpoint (docs/whep.md), in signed mode with a
// Bearer credential, CORS from a page on another origin, trickle ICE by PATCH, DELETE on stop.
// Run inside a private network namespace (every socket is on 127.0.0.1):
//
//   unshare -n -- bash -c 'ip link set lo up && exec node tests/web/whep.mjs'
//
// Needs $RTCAM_BIN or target/release/rtcam and /usr/bin/chromium; no broker (WHEP needs none).
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { accessSync, constants, mkdtempSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { createServer as netServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const HERE = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(HERE, "../..");
const HOST = "127.0.0.1";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const RTCAM_BIN = resolve(REPO, process.env.RTCAM_BIN || "target/release/rtcam");
const LIBRARY = join(HERE, "node_modules/whip-whep/whep.js");
const WORK = mkdtempSync(join(tmpdir(), "rtcam-whep-"));
const WIDTH = 640;
const HEIGHT = 480;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

for (const [path, what, fix] of [
  [CHROMIUM, "Chromium", "apt-get install chromium (or set CHROMIUM)"],
  [RTCAM_BIN, "the rtcam binary", "cargo build --release (or set RTCAM_BIN)"],
  [LIBRARY, "the whip-whep library", "cd tests/web && npm ci"],
]) {
  try {
    accessSync(path, constants.R_OK);
  } catch {
    console.error(`WHEP browser test: ${what} not found at ${path}: ${fix}`);
    process.exit(1);
  }
}

function freePort() {
  return new Promise((res, rej) => {
    const s = netServer();
    s.once("error", rej);
    s.listen(0, HOST, () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

function cli(args) {
  const r = spawnSync(RTCAM_BIN, args, { cwd: WORK, encoding: "utf8" });
  assert.equal(r.status, 0, `rtcam ${args.join(" ")}: ${r.stderr}`);
  return r.stdout.trim();
}

/** A viewer credential for `device`, issued the way the README says. */
function credential(owner, device, name) {
  const key = join(WORK, `${name}.key`);
  cli(["token", "keygen", "--out", key]);
  const pub = cli(["token", "public", "--key", key]);
  return cli(["token", "issue", "--key", owner, "--viewer-key", pub, "--device", device, "--allow", "view", "--expires", "1h", "--name", name]);
}

let rtcam;
let browser;
let pageServer;
const log = join(WORK, "rtcam.log");

async function main() {
  const owner = join(WORK, "owner.key");
  const ownerPublic = cli(["token", "keygen", "--out", owner]);
  const device = "whepcam";
  const [whepPort, pagePort, mqttPort] = [await freePort(), await freePort(), await freePort()];
  const origin = `http://${HOST}:${pagePort}`;
  const config = join(WORK, "rtcam.toml");
  writeFileSync(
    config,
    [
      "[device]",
      `id = "${device}"`,
      "[capture]",
      'source = "test-pattern"',
      `width = ${WIDTH}`,
      `height = ${HEIGHT}`,
      "fps = 30",
      "[webrtc]",
      `bind_addresses = ["${HOST}"]`,
      "max_viewers = 1",
      "[mqtt]",
      // No broker: WHEP needs none (rtcam keeps retrying MQTT in the background).
      `host = "${HOST}"`,
      `port = ${mqttPort}`,
      "[auth]",
      `owner_keys = ["${ownerPublic}"]`,
      "[whep]",
      "enabled = true",
      `listen = "${HOST}:${whepPort}"`,
      `allowed_origins = ["${origin}"]`,
      "[log]",
      'target = "stderr"',
      "",
    ].join("\n"),
  );
  rtcam = spawn(RTCAM_BIN, ["--config", config], { cwd: WORK, stdio: ["ignore", openSync(log, "a"), openSync(log, "a")] });
  const token = credential(owner, device, "browser");
  const otherDevice = credential(owner, "another-cam", "stranger");

  // The page: another origin than the endpoint (CORS), loading the library as published.
  pageServer = createServer((req, res) => {
    if (req.url === "/whep.js") {
      res.writeHead(200, { "Content-Type": "text/javascript" });
      res.end(readFileSync(LIBRARY));
    } else {
      res.writeHead(200, { "Content-Type": "text/html" });
      res.end(`<!doctype html><video id="video" autoplay muted playsinline></video>
<script type="module">
import { WHEPClient } from "/whep.js";
window.view = async (url, token) => {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (e) => { document.getElementById("video").srcObject = e.streams[0] || new MediaStream([e.track]); };
  const client = new WHEPClient();
  window.whep = { pc, client };
  try { await client.view(pc, url, token); return "ok"; } catch (e) { return String(e.message || e); }
};
window.framesDecoded = async () => {
  let n = 0;
  (await window.whep.pc.getStats()).forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "video") n = s.framesDecoded || 0; });
  return n;
};
window.ready = true;
</script>`);
    }
  });
  await new Promise((r) => pageServer.listen(pagePort, HOST, r));

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
      "--allow-loopback-in-peer-connection",
      "--use-fake-ui-for-media-stream",
      "--disable-features=WebRtcHideLocalIpsWithMdns",
      "--autoplay-policy=no-user-gesture-required",
    ],
  });
  const page = await browser.newPage();
  const responses = [];
  page.on("response", (r) => responses.push(`${r.request().method()} ${r.status()} ${r.url()}`));
  await page.goto(`${origin}/`);
  await page.waitForFunction(() => window.ready === true);
  const endpoint = `http://${HOST}:${whepPort}/whep`;

  // rtcam starts in well under a second; poll its endpoint until it answers.
  for (let i = 0; ; i++) {
    const r = await fetch(endpoint, { method: "OPTIONS" }).catch(() => null);
    if (r && r.status === 204) break;
    assert.ok(i < 100, `rtcam's WHEP endpoint did not come up:\n${readFileSync(log, "utf8")}`);
    await sleep(100);
  }

  // Refused: no credential (401), another device's (403).
  assert.match(await page.evaluate((u) => window.view(u, undefined), endpoint), /status 401/);
  await page.evaluate(() => window.whep.pc.close());
  assert.match(await page.evaluate(([u, t]) => window.view(u, t), [endpoint, otherDevice]), /status 403/);
  await page.evaluate(() => window.whep.pc.close());

  const t0 = Date.now();
  assert.equal(await page.evaluate(([u, t]) => window.view(u, t), [endpoint, token]), "ok");
  await page.waitForFunction(
    ([w, h]) => {
      const v = document.getElementById("video");
      return v.videoWidth === w && v.videoHeight === h && v.currentTime > 0;
    },
    [WIDTH, HEIGHT],
    { timeout: 30000, polling: 100 },
  );
  const firstFrameMs = Date.now() - t0;
  const a = await page.evaluate(() => window.framesDecoded());
  const ta = await page.evaluate(() => document.getElementById("video").currentTime);
  await sleep(2000);
  const b = await page.evaluate(() => window.framesDecoded());
  const tb = await page.evaluate(() => document.getElementById("video").currentTime);
  assert.ok(b > a + 20, `framesDecoded did not rise: ${a} -> ${b}`);
  assert.ok(tb > ta, `currentTime did not advance: ${ta} -> ${tb}`);
  const patched = responses.filter((r) => r.startsWith("PATCH 204 "));
  assert.ok(patched.length > 0, `the library trickled no candidate (responses: ${responses.join("; ")})`);

  // stop(): the library sends DELETE; the one viewer slot is then free for a new viewer.
  await page.evaluate(() => window.whep.client.stop());
  await sleep(200);
  assert.ok(responses.some((r) => r.startsWith("DELETE 200 ")), `no DELETE 200 (responses: ${responses.join("; ")})`);
  let again = "";
  for (let i = 0; i < 20; i++) {
    again = await page.evaluate(([u, t]) => window.view(u, t), [endpoint, token]);
    if (again === "ok") break;
    await page.evaluate(() => window.whep.pc.close());
    await sleep(250);
  }
  assert.equal(again, "ok", "a new viewer after DELETE");
  await page.waitForFunction(() => document.getElementById("video").currentTime > 0, null, { timeout: 30000 });
  await page.evaluate(() => window.whep.client.stop());
  console.log(`WHEP browser test passed: whip-whep in Chromium, ${b - a} frames decoded in 2 s, POST -> playing ${firstFrameMs} ms`);
  console.log(`METRIC whep.chromium.post_to_playing_ms = ${firstFrameMs}`);
}

let failed = false;
try {
  await main();
} catch (e) {
  failed = true;
  console.error(`WHEP browser test FAILED: ${e.stack || e}`);
  try {
    console.error(`--- rtcam log ---\n${readFileSync(log, "utf8").split("\n").slice(-60).join("\n")}`);
  } catch {}
} finally {
  await browser?.close().catch(() => {});
  pageServer?.close();
  if (rtcam && rtcam.exitCode === null) {
    rtcam.kill("SIGTERM");
    await Promise.race([new Promise((r) => rtcam.once("exit", r)), sleep(10000)]);
  }
}
process.exit(failed ? 1 : 0);
