// Signed mode for the viewer (docs/protocol.md §9), with WebCrypto only: the viewer's Ed25519
// key (created here, kept non-extractable in IndexedDB), envelopes it signs, the device's
// envelopes it verifies with the pinned device key, and the credential's claims.
//
// Nothing here sends anything anywhere: the credential and keys never leave the page except
// inside the signed offer the device asks for.

const DOMAIN = "rtcam-sig-v1";
const ED25519 = { name: "Ed25519" };
/** Accepted difference between a device message's timestamp and this browser's clock. */
export const MAX_SKEW_MS = 60000;
/** RFC 8410 PKCS#8 prefix of an Ed25519 private key; the 32-byte seed follows. */
const PKCS8_PREFIX = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

export class AuthError extends Error {
  constructor(message, code = "unauthorized") {
    super(message);
    this.code = code;
  }
}

// ---- encodings (§9.1) ------------------------------------------------------------------

export function b64urlEncode(bytes) {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** Strict: the base64url alphabet, no padding, no stray bits (re-encoding must round-trip). */
export function b64urlDecode(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) {
    throw new AuthError("not base64url without padding", "bad-schema");
  }
  const bin = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
  const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  if (b64urlEncode(bytes) !== text) throw new AuthError("non-canonical base64url", "bad-schema");
  return bytes;
}

/** `"rtcam-sig-v1" LF topic LF ts LF msg` as UTF-8 (§9.3). */
export function signingInput(topic, ts, msg) {
  if (topic.includes("\n")) throw new AuthError("topic contains a line feed");
  return new TextEncoder().encode(`${DOMAIN}\n${topic}\n${ts}\n${msg}`);
}

// ---- keys ----------------------------------------------------------------------------------

/** A new viewer key pair; the private half can sign but never be exported. */
export async function generateViewerKey() {
  const pair = await crypto.subtle.generateKey(ED25519, false, ["sign", "verify"]);
  const publicB64 = b64urlEncode(await crypto.subtle.exportKey("raw", pair.publicKey));
  return { privateKey: pair.privateKey, publicB64 };
}

/** A viewer key handed over with a credential (the demo's URL): PKCS#8 DER in b64url,
 * imported non-extractable. `publicB64` is the key the credential binds (`cnf.jwk.x`). */
export async function importViewerKey(pkcs8B64url, publicB64) {
  const der = b64urlDecode(pkcs8B64url);
  const privateKey = await crypto.subtle.importKey("pkcs8", der, ED25519, false, ["sign"]);
  return { privateKey, publicB64 };
}

/** A viewer key from a 32-byte seed (tests, the documented vectors). */
export function importSeed(seed, publicB64) {
  const der = new Uint8Array([...PKCS8_PREFIX, ...seed]);
  return importViewerKey(b64urlEncode(der), publicB64);
}

/** A public key (device or viewer) from its b64url form, for verifying. */
export async function importPublicKey(b64) {
  const raw = b64urlDecode(b64);
  if (raw.length !== 32) throw new AuthError(`a public key is 32 bytes, not ${raw.length}`, "bad-schema");
  return crypto.subtle.importKey("raw", raw, ED25519, true, ["verify"]);
}

// ---- envelopes (§9.2, §9.4, §9.6) -------------------------------------------------------------

/** The envelope's JSON text: `msg` (a string: the exact JSON text) signed for `topic`. */
export async function seal(privateKey, topic, ts, msg, cred) {
  const sig = new Uint8Array(await crypto.subtle.sign(ED25519, privateKey, signingInput(topic, ts, msg)));
  const envelope = { v: 1, type: "signed", ts, msg };
  if (cred) envelope.cred = cred;
  envelope.sig = b64urlEncode(sig);
  return JSON.stringify(envelope);
}

/** Parses an envelope: returns {ts, msg, cred, sig} or throws AuthError with the wire code. */
export function parseEnvelope(text) {
  let obj;
  try {
    obj = JSON.parse(text);
  } catch (e) {
    throw new AuthError(`not JSON: ${e.message}`, "bad-json");
  }
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) throw new AuthError("not a JSON object", "bad-json");
  if (obj.v !== 1) throw new AuthError(`v = ${JSON.stringify(obj.v)}`, "unsupported-version");
  if (obj.type !== "signed") throw new AuthError("not a signed envelope");
  const extra = Object.keys(obj).filter((k) => !["v", "type", "ts", "msg", "cred", "sig"].includes(k));
  if (extra.length) throw new AuthError(`unknown fields ${extra.join(", ")}`, "bad-schema");
  if (!Number.isSafeInteger(obj.ts) || obj.ts < 0) throw new AuthError("`ts` must be an integer", "bad-schema");
  if (typeof obj.msg !== "string" || typeof obj.sig !== "string") throw new AuthError("`msg` and `sig` must be strings", "bad-schema");
  if ("cred" in obj && typeof obj.cred !== "string") throw new AuthError("`cred` must be a string", "bad-schema");
  const sig = b64urlDecode(obj.sig);
  if (sig.length !== 64) throw new AuthError("`sig` must be 64 bytes", "bad-schema");
  return { ts: obj.ts, msg: obj.msg, cred: obj.cred, sig, sigText: obj.sig };
}

/** The viewer's check of a device message on its `out` topic (§9.6): signed by the pinned
 * device key, over this topic, no credential, fresh. Returns the wrapped message text. */
export async function openDeviceMessage(deviceKey, topic, text, nowMs = Date.now()) {
  const env = parseEnvelope(text);
  if (env.cred !== undefined) throw new AuthError("device messages carry no credential", "bad-schema");
  const ok = await crypto.subtle.verify(ED25519, deviceKey, env.sig, signingInput(topic, env.ts, env.msg));
  if (!ok) throw new AuthError("not signed by the pinned device key");
  if (Math.abs(nowMs - env.ts) > MAX_SKEW_MS) {
    throw new AuthError(`timestamp ${env.ts} is more than ${MAX_SKEW_MS} ms from this browser's clock (${nowMs}): check both clocks`, "stale");
  }
  return env.msg;
}

// ---- credentials (§9.5) --------------------------------------------------------------------

/** The claims of a credential, unverified (the device verifies it): for showing what it
 * grants, and to check that it is bound to this viewer's key before offering it. */
export function credentialClaims(token) {
  const parts = typeof token === "string" ? token.trim().split(".") : [];
  if (parts.length !== 3) throw new AuthError("a credential is three base64url parts separated by '.' (a JWT)", "bad-schema");
  let claims;
  try {
    claims = JSON.parse(new TextDecoder().decode(b64urlDecode(parts[1])));
  } catch (e) {
    throw new AuthError(`the credential's claims are unreadable: ${e.message}`, "bad-schema");
  }
  if (!claims || typeof claims !== "object") throw new AuthError("the credential's claims are not an object", "bad-schema");
  return claims;
}

/** What a credential says, in words, and why it cannot work for `viewerPublic` (or null). */
export function describeCredential(token, viewerPublic, device, nowS = Date.now() / 1000) {
  const c = credentialClaims(token);
  const aud = Array.isArray(c.aud) ? c.aud : [c.aud];
  const problems = [];
  if (c.cnf?.jwk?.x !== viewerPublic) problems.push("it is bound to another viewer key");
  if (device && !aud.includes(device) && !aud.includes("*")) problems.push(`it is not for device ${device} (${aud.join(", ")})`);
  if (typeof c.exp === "number" && nowS >= c.exp) problems.push(`it expired ${new Date(c.exp * 1000).toISOString()}`);
  const text = `${c.scope || "?"} for ${aud.join(", ")}${c.sub ? ` (${c.sub})` : ""}, until ${typeof c.exp === "number" ? new Date(c.exp * 1000).toISOString() : "?"}`;
  return { text, problem: problems.length ? problems.join("; ") : null, claims: c };
}

// ---- storage: the viewer key and pinned device keys, in IndexedDB ----------------------------

const DB_NAME = "rtcam-viewer";
const STORE = "auth";

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function dbOp(mode, fn) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const req = fn(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(req?.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

export const store = {
  get: (key) => dbOp("readonly", (s) => s.get(key)),
  put: (key, value) => dbOp("readwrite", (s) => s.put(value, key)),
  delete: (key) => dbOp("readwrite", (s) => s.delete(key)),
};

/** This browser's viewer key: created (non-extractable) on first use and kept in IndexedDB. */
export async function viewerKey() {
  const saved = await store.get("viewer-key");
  if (saved?.privateKey && saved.publicB64) return saved;
  const key = await generateViewerKey();
  await store.put("viewer-key", key);
  return key;
}
