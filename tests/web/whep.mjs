// WHEP in Chromium with a third-party client library: medooze's `whip-whep` (npm, pinned in
// package-lock.json) against rtcam's [whep] endpoint (docs/whep.md), in signed mode with a
// Bearer credential, CORS from a page on another origin, trickle ICE by PATCH, DELETE on stop.
// A second case forces the browser onto a TURN relay: a coturn on loopback with the REST scheme
// (use-auth-secret), rtcam minting the credential it puts in the 201's Link headers, and
// whip-whep applying those (pc.setConfiguration) to a peer connection made with
// iceTransportPolicy "relay"; getStats shows the selected pair's local candidate is a relay.
// Run inside a private network namespace (every socket is on 127.0.0.1):
//
//   unshare -n -- bash -c 'ip link set lo up && exec node tests/web/whep.mjs'
//
// Needs $RTCAM_BIN or target/release/rtcam, /usr/bin/chromium and coturn's /usr/bin/turnserver
// ($TURNSERVER); no broker (WHEP needs none).
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { accessSync, constants, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
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
const TURNSERVER = process.env.TURNSERVER || "/usr/bin/turnserver";
const WORK = mkdtempSync(join(tmpdir(), "rtcam-whep-"));
const WIDTH = 640;
const HEIGHT = 480;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

for (const [path, what, fix] of [
  [CHROMIUM, "Chromium", "apt-get install chromium (or set CHROMIUM)"],
  [RTCAM_BIN, "the rtcam binary", "cargo build --release (or set RTCAM_BIN)"],
  [LIBRARY, "the whip-whep library", "cd tests/web && npm ci"],
  [TURNSERVER, "coturn (turnserver)", "apt-get install coturn (or set TURNSERVER)"],
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
  return cli(["token", "issue", "--key", owner, `--viewer-key=${pub}`, "--device", device, "--allow", "view", "--expires", "1h", "--name", name]);
}

const rtcams = [];
let coturn;
let browser;
let pageServer;
const logs = [];

/** Starts rtcam for `device` with WHEP on `whepPort`; `extra`: more TOML lines. */
async function startRtcam(device, ownerPublic, whepPort, origin, extra = []) {
  const mqttPort = await freePort();
  const config = join(WORK, `${device}.toml`);
  const log = join(WORK, `${device}.log`);
  logs.push(log);
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
      ...extra,
      "",
    ].join("\n"),
  );
  rtcams.push(spawn(RTCAM_BIN, ["--config", config], { cwd: WORK, stdio: ["ignore", openSync(log, "a"), openSync(log, "a")] }));
  const endpoint = `http://${HOST}:${whepPort}/whep`;
  // rtcam starts in well under a second; poll its endpoint until it answers.
  for (let i = 0; ; i++) {
    const r = await fetch(endpoint, { method: "OPTIONS" }).catch(() => null);
    if (r && r.status === 204) break;
    assert.ok(i < 100, `rtcam's WHEP endpoint did not come up:\n${readFileSync(log, "utf8")}`);
    await sleep(100);
  }
  return endpoint;
}

/** coturn on loopback with the REST scheme (docs/turn.md), its own config in WORK. */
async function startCoturn(port, secret) {
  const conf = join(WORK, "turnserver.conf");
  const log = join(WORK, "coturn.log");
  logs.push(log);
  writeFileSync(
    conf,
    [
      `listening-ip=${HOST}`,
      `relay-ip=${HOST}`,
      `listening-port=${port}`,
      "min-port=49160",
      "max-port=49299",
      "fingerprint",
      "use-auth-secret",
      `static-auth-secret=${secret}`,
      "realm=rtcam.test",
      // rtcam's host candidates are on 127.0.0.1 here.
      "allow-loopback-peers",
      "no-cli",
      "no-tls",
      "no-dtls",
      "no-tcp-relay",
      "no-software-attribute",
      `userdb=${join(WORK, "turndb")}`,
      `pidfile=${join(WORK, "turnserver.pid")}`,
      "log-file=stdout",
      "simple-log",
      "",
    ].join("\n"),
  );
  coturn = spawn(TURNSERVER, ["-c", conf], { cwd: WORK, stdio: ["ignore", openSync(log, "a"), openSync(log, "a")] });
  const hexPort = `:${port.toString(16).toUpperCase().padStart(4, "0")} `;
  for (let i = 0; ; i++) {
    assert.ok(coturn.exitCode === null, `coturn (${TURNSERVER}) exited:\n${readFileSync(log, "utf8")}`);
    let udp = "";
    try {
      udp = readFileSync(`/proc/${coturn.pid}/net/udp`, "utf8");
    } catch {}
    if (udp.includes(hexPort)) break;
    assert.ok(i < 100, `coturn (${TURNSERVER}) did not listen on ${HOST}:${port}:\n${readFileSync(log, "utf8")}`);
    await sleep(100);
  }
}

/** Waits until the page's <video> plays the stream at the test's size. */
function playing(page) {
  return page.waitForFunction(
    ([w, h]) => {
      const v = document.getElementById("video");
      return v.videoWidth === w && v.videoHeight === h && v.currentTime > 0;
    },
    [WIDTH, HEIGHT],
    { timeout: 30000, polling: 100 },
  );
}

async function main() {
  const owner = join(WORK, "owner.key");
  const ownerPublic = cli(["token", "keygen", "--out", owner]);
  const device = "whepcam";
  const [whepPort, pagePort] = [await freePort(), await freePort()];
  const origin = `http://${HOST}:${pagePort}`;
  const endpoint = await startRtcam(device, ownerPublic, whepPort, origin);
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
window.view = async (url, token, policy = "all") => {
  // whip-whep keeps this configuration and adds the Link headers' iceServers to it.
  const pc = new RTCPeerConnection({ iceTransportPolicy: policy });
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
window.selectedPair = async () => {
  const stats = await window.whep.pc.getStats();
  let pair;
  stats.forEach((s) => { if (s.type === "transport" && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId); });
  if (!pair) return null;
  const local = stats.get(pair.localCandidateId);
  const remote = stats.get(pair.remoteCandidateId);
  return { local: local.candidateType, remote: remote.candidateType, relayProtocol: local.relayProtocol || null, localAddress: local.address + ":" + local.port };
};
window.iceServers = () => window.whep.pc.getConfiguration().iceServers.map((s) => ({ urls: s.urls, username: s.username || null }));
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

  // Refused: no credential (401), another device's (403).
  assert.match(await page.evaluate((u) => window.view(u, undefined), endpoint), /status 401/);
  await page.evaluate(() => window.whep.pc.close());
  assert.match(await page.evaluate(([u, t]) => window.view(u, t), [endpoint, otherDevice]), /status 403/);
  await page.evaluate(() => window.whep.pc.close());

  const t0 = Date.now();
  assert.equal(await page.evaluate(([u, t]) => window.view(u, t), [endpoint, token]), "ok");
  await playing(page);
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

  await relayCase(page, owner, ownerPublic, origin);
}

/** Chromium forced onto coturn's relay with the credential rtcam minted for the Link header. */
async function relayCase(page, owner, ownerPublic, origin) {
  const device = "whepcam-relay";
  const [turnPort, whepPort] = [await freePort(), await freePort()];
  const secret = randomBytes(24).toString("hex");
  const secretFile = join(WORK, "turn-secret");
  writeFileSync(secretFile, `${secret}\n`, { mode: 0o600 });
  await startCoturn(turnPort, secret);
  const turnUrl = `turn:${HOST}:${turnPort}`;
  const endpoint = await startRtcam(device, ownerPublic, whepPort, origin, [
    "[webrtc.turn_rest]",
    `urls = ["${turnUrl}"]`,
    `secret_file = "${secretFile}"`,
    "ttl_s = 600",
  ]);
  const token = credential(owner, device, "relay-browser");
  const t0 = Date.now();
  assert.equal(await page.evaluate(([u, t]) => window.view(u, t, "relay"), [endpoint, token]), "ok");
  const servers = await page.evaluate(() => window.iceServers());
  const turn = servers.find((s) => [].concat(s.urls).includes(turnUrl));
  assert.ok(turn, `whip-whep did not apply the Link header's TURN server: ${JSON.stringify(servers)}`);
  const [expiry, name] = turn.username.split(":");
  assert.equal(name, `${device}-viewer`, `not a REST credential minted for viewers: ${turn.username}`);
  assert.ok(Number(expiry) * 1000 > Date.now(), `expired credential: ${turn.username}`);
  try {
    await playing(page);
  } catch (e) {
    const ice = await page.evaluate(() => window.whep.pc.iceConnectionState);
    throw new Error(`no video through the relay (ICE ${ice}; did coturn refuse the minted credential? see coturn.log): ${e.message}`);
  }
  const firstFrameMs = Date.now() - t0;
  const pair = await page.evaluate(() => window.selectedPair());
  assert.ok(pair, "no selected candidate pair in getStats");
  assert.equal(pair.local, "relay", `the browser's selected pair is not relayed: ${JSON.stringify(pair)}`);
  const a = await page.evaluate(() => window.framesDecoded());
  await sleep(2000);
  const b = await page.evaluate(() => window.framesDecoded());
  assert.ok(b > a + 20, `framesDecoded did not rise through the relay: ${a} -> ${b}`);
  await page.evaluate(() => window.whep.client.stop());
  console.log(`WHEP browser relay test passed: ${b - a} frames decoded in 2 s through coturn (pair ${pair.local}/${pair.relayProtocol} -> ${pair.remote}), POST -> playing ${firstFrameMs} ms`);
  console.log(`METRIC whep.chromium.relay.post_to_playing_ms = ${firstFrameMs}`);
}

let failed = false;
try {
  await main();
} catch (e) {
  failed = true;
  console.error(`WHEP browser test FAILED: ${e.stack || e}`);
  for (const log of logs) {
    try {
      console.error(`--- ${log} ---\n${readFileSync(log, "utf8").split("\n").slice(-60).join("\n")}`);
    } catch {}
  }
} finally {
  await browser?.close().catch(() => {});
  pageServer?.close();
  for (const p of [...rtcams, coturn]) {
    if (p && p.exitCode === null) {
      p.kill("SIGTERM");
      await Promise.race([new Promise((r) => p.once("exit", r)), sleep(10000)]);
    }
  }
}
// Keys, configs and logs stay for a failed run (the logs' tails are printed above).
if (!failed) rmSync(WORK, { recursive: true, force: true });
process.exit(failed ? 1 : 0);
