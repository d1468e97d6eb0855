// The viewer's signed mode (src/auth.js, WebCrypto) against the test vectors of
// docs/protocol.md §9.10: a second implementation of the documented signing, not rtcam's code.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import {
  b64urlDecode,
  b64urlEncode,
  describeCredential,
  importPublicKey,
  importSeed,
  openDeviceMessage,
  parseEnvelope,
  seal,
  signingInput,
} from "../src/auth.js";

const doc = readFileSync(new URL("../../docs/protocol.md", import.meta.url), "utf8");
const block = doc.split("### 9.10 Test vectors")[1].split("```text\n")[1].split("\n```")[0];
const V = Object.fromEntries(block.split("\n").map((l) => [l.slice(0, l.indexOf(" = ")), l.slice(l.indexOf(" = ") + 3)]));
const NOW = Number(V.now_ms);
const hex = (h) => Uint8Array.from(h.match(/../g), (b) => parseInt(b, 16));

test("signing inputs and viewer signatures match the documented vectors", async () => {
  const viewer = await importSeed(hex(V["viewer.seed_hex"]), V["viewer.public"]);
  for (const name of ["offer", "bye"]) {
    const input = signingInput(V[`${name}.topic`], Number(V[`${name}.ts`]), V[`${name}.msg`]);
    assert.equal(Buffer.from(input).toString("hex"), V[`${name}.signing_input_hex`], name);
    const cred = name === "offer" ? V.credential : undefined;
    const envelope = await seal(viewer.privateKey, V[`${name}.topic`], Number(V[`${name}.ts`]), V[`${name}.msg`], cred);
    assert.equal(envelope, V[`${name}.envelope`], name);
  }
});

test("the device's documented answer opens with the pinned device key, and nothing else does", async () => {
  const device = await importPublicKey(V["device.public"]);
  const msg = await openDeviceMessage(device, V["answer.topic"], V["answer.envelope"], NOW);
  assert.equal(msg, V["answer.msg"]);
  // Another session's topic, another key, a forged (unsigned) answer, a stale one.
  await assert.rejects(openDeviceMessage(device, V["offer.topic"], V["answer.envelope"], NOW), /pinned device key/);
  const viewerPublic = await importPublicKey(V["viewer.public"]);
  await assert.rejects(openDeviceMessage(viewerPublic, V["answer.topic"], V["answer.envelope"], NOW), /pinned device key/);
  await assert.rejects(openDeviceMessage(device, V["answer.topic"], V["answer.msg"], NOW), /not a signed envelope/);
  await assert.rejects(openDeviceMessage(device, V["answer.topic"], V["answer.envelope"], NOW + 61000), (e) => e.code === "stale");
  const forger = await importSeed(new Uint8Array(32).fill(7), "x");
  const forged = await seal(forger.privateKey, V["answer.topic"], NOW, V["answer.msg"]);
  await assert.rejects(openDeviceMessage(device, V["answer.topic"], forged, NOW), /pinned device key/);
});

test("envelopes and base64url are parsed strictly", () => {
  assert.equal(b64urlEncode(b64urlDecode(V["offer.sig"])), V["offer.sig"]);
  assert.throws(() => b64urlDecode("ab="), /base64url/);
  assert.throws(() => b64urlDecode("ab+/"), /base64url/);
  assert.throws(() => parseEnvelope("{"), (e) => e.code === "bad-json");
  assert.throws(() => parseEnvelope('{"v":1,"type":"offer"}'), (e) => e.code === "unauthorized");
  assert.throws(() => parseEnvelope(V["bye.envelope"].replace('"ts"', '"x":1,"ts"')), (e) => e.code === "bad-schema");
  assert.equal(parseEnvelope(V["offer.envelope"]).cred, V.credential);
});

test("a credential is described, and one for another key or device is recognised", () => {
  const now = NOW / 1000;
  const ok = describeCredential(V.credential, V["viewer.public"], "cam1", now);
  assert.equal(ok.problem, null);
  assert.match(ok.text, /^view control for cam1 \(alice\), until 2027-01-01/);
  assert.match(describeCredential(V.credential, V["device.public"], "cam1", now).problem, /another viewer key/);
  assert.match(describeCredential(V.credential, V["viewer.public"], "cam2", now).problem, /not for device cam2/);
  assert.match(describeCredential(V.credential, V["viewer.public"], "cam1", 1798761600).problem, /expired/);
  assert.throws(() => describeCredential("not-a-jwt", "x", "cam1"), /three base64url parts/);
});
