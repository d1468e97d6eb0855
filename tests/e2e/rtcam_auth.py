"""rtcam signed mode (docs/protocol.md §9), written from the document alone.

A second, independent implementation for the tests: Ed25519 from `cryptography`, credentials
(EdDSA JWTs) from PyJWT. It plays both roles: a viewer (signs its messages, checks the
device's) and a device (checks credentials and viewer envelopes, with a replay cache).

    viewer = ViewerSigner(viewer_key, credential, topic_in)
    payload = viewer.seal({"v": 1, "type": "offer", "sdp": sdp}, now_ms())   # carries cred
    msg = open_device_message(payload, topic_out, device_public_b64, now_ms())
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

SIGNING_DOMAIN = b"rtcam-sig-v1"
MAX_TS_MS = (1 << 53) - 1
JWT_TYP = "rtcam-viewer+jwt"
MAX_CREDENTIAL_BYTES = 4096
DEFAULT_MAX_SKEW_MS = 60_000
CLAIMS = {"aud", "cnf", "exp", "iat", "nbf", "jti", "scope", "ns", "sub", "iss"}
PERMISSIONS = ["view", "control", "admin"]
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NS_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*$")


class AuthError(Exception):
    """A refusal with its wire code (docs/protocol.md §9.9)."""

    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


def now_ms() -> int:
    return int(time.time() * 1000)


# ---- encodings (§9.1) ----------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict: no padding, only the base64url alphabet, no non-zero unused bits."""
    if not B64URL_RE.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url without padding")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url (stray bits)")
    return data


def public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return b64url_encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def public_key(b64: str) -> Ed25519PublicKey:
    raw = b64url_decode(b64)
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_from_seed(seed_hex: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))


def thumbprint(pub_b64: str) -> str:
    """RFC 7638 JWK thumbprint of an Ed25519 key: the credential's `kid`."""
    canonical = '{"crv":"Ed25519","kty":"OKP","x":"%s"}' % pub_b64
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def load_private_key_pem(data: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


# ---- envelope (§9.2, §9.3) -------------------------------------------------------------


def signing_input(topic: str, ts_ms: int, msg: str) -> bytes:
    if "\n" in topic:
        raise AuthError("unauthorized", "topic contains LF")
    return b"\n".join(
        [SIGNING_DOMAIN, topic.encode("utf-8"), str(ts_ms).encode("ascii"), msg.encode("utf-8")]
    )


def seal(key: Ed25519PrivateKey, topic: str, ts_ms: int, msg: str | dict, cred: str | None = None) -> str:
    """The envelope's JSON text; `msg` is signed as the exact string (dicts are dumped compactly)."""
    if not isinstance(msg, str):
        msg = json.dumps(msg, separators=(",", ":"), ensure_ascii=False)
    if not (isinstance(ts_ms, int) and 0 <= ts_ms <= MAX_TS_MS):
        raise ValueError("ts out of range")
    envelope: dict[str, Any] = {"v": 1, "type": "signed", "ts": ts_ms, "msg": msg}
    if cred is not None:
        envelope["cred"] = cred
    envelope["sig"] = b64url_encode(key.sign(signing_input(topic, ts_ms, msg)))
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Envelope:
    ts: int
    msg: str
    cred: str | None
    sig: bytes
    sig_text: str


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise AuthError("bad-schema", f"duplicate field {k!r}")
        obj[k] = v
    return obj


def parse_envelope(payload: bytes | str) -> Envelope:
    try:
        obj = json.loads(payload, object_pairs_hook=_no_duplicates)
    except AuthError:
        raise
    except ValueError as e:
        raise AuthError("bad-json", f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise AuthError("bad-json", "payload must be a JSON object")
    if "v" not in obj:
        raise AuthError("bad-schema", "missing field `v`")
    if obj["v"] != 1 or isinstance(obj["v"], bool):
        raise AuthError("unsupported-version", f"v = {obj['v']!r}")
    if obj.get("type") != "signed":
        raise AuthError("unauthorized", "not a signed envelope")
    extra = set(obj) - {"v", "type", "ts", "msg", "cred", "sig"}
    if extra:
        raise AuthError("bad-schema", f"unknown fields {sorted(extra)}")
    ts, msg, sig_text = obj.get("ts"), obj.get("msg"), obj.get("sig")
    if not (type(ts) is int and 0 <= ts <= MAX_TS_MS):
        raise AuthError("bad-schema", "`ts` must be an integer 0..2^53-1")
    if not isinstance(msg, str):
        raise AuthError("bad-schema", "`msg` must be a string")
    try:
        msg.encode("utf-8")
    except UnicodeEncodeError:
        raise AuthError("bad-json", "`msg` is not valid UTF-8 (lone surrogate)") from None
    if "cred" in obj and not isinstance(obj["cred"], str):
        raise AuthError("bad-schema", "`cred` must be a string or absent")
    if not isinstance(sig_text, str):
        raise AuthError("bad-schema", "`sig` must be a string")
    try:
        sig = b64url_decode(sig_text)
    except (ValueError, binascii.Error):
        raise AuthError("bad-schema", "`sig` is not base64url") from None
    if len(sig) != 64:
        raise AuthError("bad-schema", "`sig` must be 64 bytes")
    return Envelope(ts, msg, obj.get("cred"), sig, sig_text)


def verify_envelope(env: Envelope, topic: str, key: Ed25519PublicKey) -> bool:
    try:
        key.verify(env.sig, signing_input(topic, env.ts, env.msg))
        return True
    except InvalidSignature:
        return False


def check_fresh(ts: int, now: int, max_skew_ms: int = DEFAULT_MAX_SKEW_MS) -> None:
    if abs(now - ts) > max_skew_ms:
        raise AuthError("stale", f"ts {ts} is more than {max_skew_ms} ms from {now}")


# ---- credentials (§9.5) ----------------------------------------------------------------


def issue_credential(
    owner: Ed25519PrivateKey,
    *,
    audience: list[str],
    viewer_public: str,
    scope: str,
    iat: int,
    exp: int,
    jti: str,
    ns: list[str] | None = None,
    sub: str | None = None,
) -> str:
    """An owner's credential, with PyJWT. Claims in alphabetical order, like rtcam."""
    claims: dict[str, Any] = {
        "aud": audience,
        "cnf": {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": viewer_public}},
        "exp": exp,
        "iat": iat,
        "jti": jti,
    }
    if ns:
        claims["ns"] = ns
    claims["scope"] = scope
    if sub is not None:
        claims["sub"] = sub
    return jwt.encode(
        claims,
        owner,
        algorithm="EdDSA",
        headers={"kid": thumbprint(public_b64(owner)), "typ": JWT_TYP},
    )


@dataclass
class Grant:
    viewer_key: str
    permission: str
    namespaces: list[str]
    exp: int
    jti: str
    sub: str | None


def verify_credential(
    token: str,
    owner_keys: Iterable[str],
    device_id: str,
    now_s: int,
    revoked: Iterable[str] = (),
) -> Grant:
    """The device's check of a credential (§9.5), with PyJWT doing the JWS part."""
    def refuse(reason: str):
        raise AuthError("unauthorized", f"credential refused: {reason}")

    if len(token) > MAX_CREDENTIAL_BYTES:
        refuse("too large")
    parts = token.split(".")
    if len(parts) != 3:
        refuse("not three parts")
    try:
        header = json.loads(b64url_decode(parts[0]), object_pairs_hook=_no_duplicates)
    except (ValueError, AuthError) as e:
        refuse(f"header: {e}")
    if not isinstance(header, dict) or set(header) != {"alg", "typ", "kid"}:
        refuse(f"header must be exactly alg/typ/kid: {header!r}")
    if header["alg"] != "EdDSA" or header["typ"] != JWT_TYP:
        refuse(f"header alg/typ: {header!r}")
    owners = {thumbprint(k): k for k in owner_keys}
    if header["kid"] not in owners:
        refuse(f"unknown owner key {header['kid']!r}")
    try:
        claims = jwt.decode(
            token,
            key=public_key(owners[header["kid"]]),
            algorithms=["EdDSA"],
            # Times and audience are checked below with the explicit `now` and rtcam's `*`.
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False},
        )
    except jwt.InvalidSignatureError:
        refuse("bad signature")
    except jwt.PyJWTError as e:
        refuse(str(e))
    try:
        payload = json.loads(b64url_decode(parts[1]), object_pairs_hook=_no_duplicates)
    except (ValueError, AuthError) as e:
        refuse(f"claims: {e}")
    if payload != claims:
        refuse("claims differ from PyJWT's reading")
    unknown = set(claims) - CLAIMS
    if unknown:
        refuse(f"unknown claims {sorted(unknown)}")
    for name in ("aud", "cnf", "exp", "iat", "jti", "scope"):
        if name not in claims:
            refuse(f"missing claim {name}")
    aud = claims["aud"]
    aud = [aud] if isinstance(aud, str) else aud
    if not (isinstance(aud, list) and 1 <= len(aud) <= 16 and all(isinstance(a, str) for a in aud)):
        refuse("aud")
    if any(a != "*" and not ID_RE.match(a) for a in aud):
        refuse("aud entries must be device ids or *")
    for t in ("exp", "iat", "nbf"):
        if t in claims and not (type(claims[t]) is int and claims[t] >= 0):
            refuse(f"{t} must be a non-negative integer")
    cnf = claims["cnf"]
    if not (isinstance(cnf, dict) and set(cnf) == {"jwk"} and isinstance(cnf["jwk"], dict)):
        refuse("cnf must be {jwk: ...}")
    jwk_ = cnf["jwk"]
    if "d" in jwk_ or jwk_.get("kty") != "OKP" or jwk_.get("crv") != "Ed25519":
        refuse("cnf.jwk must be a public Ed25519 OKP key")
    try:
        public_key(jwk_["x"])
    except (KeyError, ValueError, TypeError):
        refuse("cnf.jwk.x")
    if not (isinstance(claims["jti"], str) and ID_RE.match(claims["jti"])):
        refuse("jti")
    words = claims["scope"].split(" ") if isinstance(claims["scope"], str) else [None]
    words = [w for w in words if w != ""]
    if not words or any(w not in PERMISSIONS for w in words):
        refuse(f"scope {claims['scope']!r}")
    ns = claims.get("ns", [])
    if not (isinstance(ns, list) and len(ns) <= 32 and all(isinstance(n, str) and NS_RE.match(n) for n in ns)):
        refuse("ns")
    sub = claims.get("sub")
    if sub is not None and not (isinstance(sub, str) and 1 <= len(sub) <= 64 and sub.isprintable()):
        refuse("sub")
    if "iss" in claims and not isinstance(claims["iss"], str):
        refuse("iss")
    if device_id not in aud and "*" not in aud:
        refuse(f"not for device {device_id} (aud {aud})")
    if now_s >= claims["exp"]:
        refuse(f"expired at {claims['exp']}")
    if "nbf" in claims and now_s < claims["nbf"]:
        refuse(f"not valid before {claims['nbf']}")
    if claims["jti"] in set(revoked):
        refuse(f"revoked {claims['jti']}")
    permission = max(words, key=PERMISSIONS.index)
    return Grant(jwk_["x"], permission, ns, claims["exp"], claims["jti"], sub)


# ---- roles --------------------------------------------------------------------------------


@dataclass
class ReplayCache:
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS
    capacity: int = 2048
    seen: dict[bytes, int] = field(default_factory=dict)  # digest -> forget after

    def check_and_insert(self, digest: bytes, ts: int, now: int) -> None:
        self.seen = {d: t for d, t in self.seen.items() if t > now}
        if digest in self.seen:
            raise AuthError("replayed", "already accepted")
        if len(self.seen) >= self.capacity:
            raise AuthError("busy", "replay cache full")
        self.seen[digest] = ts + 2 * self.max_skew_ms


@dataclass
class Device:
    """The device's checks of §9.4 (for the tests' own cross-checks)."""

    device_id: str
    owner_keys: list[str]
    revoked: list[str] = field(default_factory=list)
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS
    replay: ReplayCache = field(default_factory=ReplayCache)

    def open_inbound(self, payload, topic: str, session: Grant | None, now: int) -> tuple[str, Grant | None]:
        env = parse_envelope(payload)
        digest = hashlib.sha256(signing_input(topic, env.ts, env.msg)).digest()
        if self.replay.seen.get(digest, 0) > now:
            raise AuthError("replayed", "a copy of a message already accepted")
        new = None
        if session is None:
            if env.cred is None:
                raise AuthError("unauthorized", "no credential")
            new = verify_credential(env.cred, self.owner_keys, self.device_id, now // 1000, self.revoked)
            key = new.viewer_key
        else:
            if env.cred is not None:
                raise AuthError("unauthorized", "cred on a live session")
            key = session.viewer_key
        if not verify_envelope(env, topic, public_key(key)):
            raise AuthError("unauthorized", "signature does not verify")
        if session is not None and now // 1000 >= session.exp:
            raise AuthError("unauthorized", "session credential expired")
        check_fresh(env.ts, now, self.max_skew_ms)
        self.replay.check_and_insert(digest, env.ts, now)
        return env.msg, new


@dataclass
class ViewerSigner:
    """A viewer's side of one session: signs on `in`, the offer with the credential."""

    key: Ed25519PrivateKey
    credential: str
    topic_in: str
    sent_sigs: list[str] = field(default_factory=list)
    _offered: bool = False

    def seal(
        self, msg: dict | str, ts: int | None = None, topic: str | None = None, cred: bool | None = None
    ) -> str:
        """The envelope of `msg` (any text, JSON or not) for `topic` (default: this session's
        `in`). The first offer carries the credential, unless `cred` says otherwise."""
        text = msg if isinstance(msg, str) else json.dumps(msg, separators=(",", ":"))
        if cred is None:
            try:
                is_offer = json.loads(text).get("type") == "offer"
            except (ValueError, AttributeError):
                is_offer = False
            cred = is_offer and not self._offered
            self._offered = self._offered or is_offer
        envelope = seal(
            self.key,
            topic or self.topic_in,
            now_ms() if ts is None else ts,
            text,
            self.credential if cred else None,
        )
        self.sent_sigs.append(json.loads(envelope)["sig"])
        return envelope


def open_device_message(
    payload, topic: str, device_public: str, now: int, max_skew_ms: int = DEFAULT_MAX_SKEW_MS
) -> str:
    """The viewer's check of a device message (§9.6); returns the wrapped message text."""
    env = parse_envelope(payload)
    if env.cred is not None:
        raise AuthError("bad-schema", "device messages carry no cred")
    if not verify_envelope(env, topic, public_key(device_public)):
        raise AuthError("unauthorized", "not signed by the pinned device key")
    check_fresh(env.ts, now, max_skew_ms)
    return env.msg
