"""Signed mode (docs/protocol.md §9) checked by a second implementation (rtcam_auth.py:
Python `cryptography` + PyJWT): the documented test vectors, and keys and credentials made
by the rtcam binary (`rtcam token ...`, `rtcam identity`) verified in Python, and the other
way round. No broker or camera needed.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import REPO, rtcam_binary
from rtcam_auth import (
    AuthError,
    Device,
    ViewerSigner,
    b64url_decode,
    b64url_encode,
    issue_credential,
    key_from_seed,
    load_private_key_pem,
    open_device_message,
    parse_envelope,
    public_b64,
    seal,
    signing_input,
    thumbprint,
    verify_credential,
)


def documented_vectors() -> dict[str, str]:
    """The `name = value` lines of docs/protocol.md §9.10."""
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = text.split("### 9.10 Test vectors", 1)[1]
    block = section.split("```text\n", 1)[1].split("\n```", 1)[0]
    return dict(line.split(" = ", 1) for line in block.splitlines())


V = documented_vectors()
NOW_MS = int(V["now_ms"])


def role(name: str) -> Ed25519PrivateKey:
    key = key_from_seed(V[f"{name}.seed_hex"])
    assert public_b64(key) == V[f"{name}.public"], name
    return key


# ---- documented vectors ---------------------------------------------------------------------


def test_vector_keys_and_kid():
    owner = role("owner")
    role("viewer")
    role("device")
    assert thumbprint(V["owner.public"]) == V["owner.kid"]
    der = owner.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert base64.b64encode(der).decode() == V["owner.pkcs8_pem_body"]


def test_vector_credential_is_reproduced_by_pyjwt_and_verifies():
    owner = role("owner")
    viewer = role("viewer")
    claims = json.loads(V["credential.claims"])
    # PyJWT signs the same header and claims to the same token (Ed25519 is deterministic).
    token = jwt.encode(
        claims,
        owner,
        algorithm="EdDSA",
        headers={"kid": V["owner.kid"], "typ": "rtcam-viewer+jwt"},
    )
    assert token == V["credential"]
    header_b64, claims_b64, _ = token.split(".")
    assert b64url_decode(header_b64).decode() == V["credential.header"]
    assert b64url_decode(claims_b64).decode() == V["credential.claims"]
    grant = verify_credential(token, [V["owner.public"]], V["device_id"], NOW_MS // 1000)
    assert (grant.viewer_key, grant.permission, grant.namespaces, grant.jti, grant.sub) == (
        public_b64(viewer), "control", ["ptz"], "vector-1", "alice",
    )
    with pytest.raises(AuthError, match="not for device cam2"):
        verify_credential(token, [V["owner.public"]], "cam2", NOW_MS // 1000)
    with pytest.raises(AuthError, match="expired"):
        verify_credential(token, [V["owner.public"]], "cam1", 1798761600)
    with pytest.raises(AuthError, match="unknown owner"):
        verify_credential(token, [V["viewer.public"]], "cam1", NOW_MS // 1000)
    with pytest.raises(AuthError, match="revoked"):
        verify_credential(token, [V["owner.public"]], "cam1", NOW_MS // 1000, ["vector-1"])


@pytest.mark.parametrize("name,signer", [("offer", "viewer"), ("bye", "viewer"), ("answer", "device")])
def test_vector_envelopes(name, signer):
    key = role(signer)
    topic, ts, msg = V[f"{name}.topic"], int(V[f"{name}.ts"]), V[f"{name}.msg"]
    data = signing_input(topic, ts, msg)
    assert data.hex() == V[f"{name}.signing_input_hex"]
    assert b64url_encode(key.sign(data)) == V[f"{name}.sig"]
    cred = V["credential"] if name == "offer" else None
    assert seal(key, topic, ts, msg, cred) == V[f"{name}.envelope"]
    env = parse_envelope(V[f"{name}.envelope"])
    assert (env.msg, env.ts, env.sig_text, env.cred) == (msg, ts, V[f"{name}.sig"], cred)


def test_vector_session_as_the_device_and_the_viewer_see_it():
    device = Device(V["device_id"], [V["owner.public"]])
    msg, grant = device.open_inbound(V["offer.envelope"], V["offer.topic"], None, NOW_MS)
    assert msg == V["offer.msg"] and grant.permission == "control"
    msg, none = device.open_inbound(V["bye.envelope"], V["bye.topic"], grant, NOW_MS + 1500)
    assert msg == V["bye.msg"] and none is None
    with pytest.raises(AuthError) as e:
        device.open_inbound(V["offer.envelope"], V["offer.topic"], None, NOW_MS + 2000)
    assert e.value.code == "replayed"
    answer = open_device_message(V["answer.envelope"], V["answer.topic"], V["device.public"], NOW_MS)
    assert answer == V["answer.msg"]


def test_refusals_of_the_reference_device():
    """The refusal paths of §9.4 in this implementation, so it is a real second checker."""
    owner, viewer = role("owner"), role("viewer")
    intruder = Ed25519PrivateKey.generate()
    topic = V["offer.topic"]
    device = Device(V["device_id"], [V["owner.public"]])

    def code(payload, session=None, now=NOW_MS, topic=topic):
        with pytest.raises(AuthError) as e:
            device.open_inbound(payload, topic, session, now)
        return e.value.code

    offer = {"v": 1, "type": "offer", "sdp": "v=0\r\n"}
    assert code(json.dumps(offer)) == "unauthorized"  # today's unsigned offer
    assert code(seal(viewer, topic, NOW_MS, offer)) == "unauthorized"  # no credential
    stolen = seal(intruder, topic, NOW_MS, offer, V["credential"])
    assert code(stolen) == "unauthorized"  # a credential copied off the broker
    assert code(V["offer.envelope"], topic="rtcam/cam1/session/ffff/in") == "unauthorized"
    assert code(V["offer.envelope"], now=NOW_MS + 60_001) == "stale"
    assert code("{") == "bad-json"
    assert code('{"v":2,"type":"signed"}') == "unsupported-version"
    assert code(V["bye.envelope"].replace('"ts"', '"extra":1,"ts"')) == "bad-schema"
    _, grant = device.open_inbound(V["offer.envelope"], topic, None, NOW_MS)
    injected = seal(intruder, topic, NOW_MS, {"v": 1, "type": "bye"})
    assert code(injected, session=grant) == "unauthorized"
    again = seal(viewer, topic, NOW_MS + 5, offer, V["credential"])
    assert code(again, session=grant) == "unauthorized"  # cred on a live session
    assert code(V["offer.envelope"], session=grant) == "replayed"  # a copy of the offer
    expired = issue_credential(
        owner, audience=["cam1"], viewer_public=public_b64(viewer), scope="view",
        iat=NOW_MS // 1000 - 100, exp=NOW_MS // 1000 - 1, jti="old",
    )
    assert code(seal(viewer, topic, NOW_MS + 1, offer, expired)) == "unauthorized"
    # A forged device answer is rejected by the viewer.
    forged = seal(intruder, V["answer.topic"], NOW_MS, V["answer.msg"])
    with pytest.raises(AuthError):
        open_device_message(forged, V["answer.topic"], V["device.public"], NOW_MS)


# ---- the binary's keys and credentials ----------------------------------------------------


def rtcam(*args: str, config: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    exe = rtcam_binary()
    if not exe.is_file():
        pytest.fail(f"rtcam binary not found at {exe}: build it or set RTCAM_BIN", pytrace=False)
    argv = [str(exe)] + (["--config", str(config)] if config else []) + list(args)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        pytest.fail(f"{argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}", pytrace=False)
    return p


def write_config(path: Path, device: str, owner_public: str, extra: str = "") -> Path:
    path.write_text(
        f'[device]\nid = "{device}"\n[auth]\nowner_keys = ["{owner_public}"]\n{extra}'
    )
    return path


def test_credential_issued_by_rtcam_verifies_in_python(tmp_path):
    owner_file = tmp_path / "owner.key"
    owner_public = rtcam("token", "keygen", "--out", str(owner_file)).stdout.strip()
    assert owner_file.stat().st_mode & 0o777 == 0o600
    owner = load_private_key_pem(owner_file.read_bytes())  # the file is standard PKCS#8 PEM
    assert public_b64(owner) == owner_public
    viewer = Ed25519PrivateKey.generate()
    t0 = int(time.time())
    token = rtcam(
        "token", "issue", "--key", str(owner_file), "--viewer-key", public_b64(viewer),
        "--device", "cam1", "--allow", "view,control", "--expires", "30d",
        "--ns", "ptz", "--name", "alice-phone",
    ).stdout.strip()
    # An ordinary JWT library verifies it with the owner's public key alone.
    claims = jwt.decode(
        token, key=owner.public_key(), algorithms=["EdDSA"], audience="cam1",
    )
    assert claims["cnf"]["jwk"] == {"kty": "OKP", "crv": "Ed25519", "x": public_b64(viewer)}
    assert claims["scope"] == "view control" and claims["ns"] == ["ptz"]
    assert claims["sub"] == "alice-phone"
    assert abs(claims["iat"] - t0) <= 5 and claims["exp"] - claims["iat"] == 30 * 86400
    assert jwt.get_unverified_header(token) == {
        "alg": "EdDSA", "kid": thumbprint(owner_public), "typ": "rtcam-viewer+jwt",
    }
    grant = verify_credential(token, [owner_public], "cam1", int(time.time()))
    assert grant.permission == "control"
    with pytest.raises(AuthError, match="not for device"):
        verify_credential(token, [owner_public], "cam2", int(time.time()))
    # The whole offer path with it: the viewer signs with its own key, the device accepts.
    topic = "rtcam/cam1/session/0123456789abcdef/in"
    signer = ViewerSigner(viewer, token, topic)
    device = Device("cam1", [owner_public])
    now = int(time.time() * 1000)
    msg, g = device.open_inbound(signer.seal({"v": 1, "type": "offer", "sdp": "v=0"}, now), topic, None, now)
    assert json.loads(msg)["type"] == "offer" and g.viewer_key == public_b64(viewer)
    bye = signer.seal({"v": 1, "type": "bye"}, now + 1)
    assert "cred" not in json.loads(bye)
    device.open_inbound(bye, topic, g, now + 2)
    # rtcam's own verifier agrees, and refuses it for another device.
    out = rtcam("token", "verify", token, config=write_config(tmp_path / "c1.toml", "cam1", owner_public))
    summary = json.loads(out.stdout)
    assert (summary["permission"], summary["viewer_key"], summary["namespaces"]) == (
        "control", public_b64(viewer), ["ptz"],
    )
    refused = rtcam(
        "token", "verify", token,
        config=write_config(tmp_path / "c2.toml", "cam2", owner_public), check=False,
    )
    assert refused.returncode == 1 and "cam2" in refused.stderr


def test_credential_issued_by_python_verifies_in_rtcam(tmp_path):
    owner = Ed25519PrivateKey.generate()
    viewer = Ed25519PrivateKey.generate()
    now = int(time.time())
    config = write_config(tmp_path / "c.toml", "cam1", public_b64(owner), "revoked = [\"gone\"]\n")

    def verify(**overrides):
        args = dict(
            audience=["*"], viewer_public=public_b64(viewer), scope="view admin",
            iat=now, exp=now + 600, jti="py-1",
        )
        args.update(overrides)
        return rtcam("token", "verify", issue_credential(owner, **args), config=config, check=False)

    ok = verify()
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["permission"] == "admin" and summary["namespaces"] == "*"
    assert summary["owner_kid"] == thumbprint(public_b64(owner))
    for overrides, why in [
        ({"exp": now - 1}, "expired"),
        ({"audience": ["cam2"]}, "cam2"),
        ({"jti": "gone"}, "revoked"),
        ({"scope": "view record"}, "record"),
    ]:
        p = verify(**overrides)
        assert p.returncode == 1 and why in p.stderr, (overrides, p.stderr)


def test_identity_key_file(tmp_path):
    path = tmp_path / "identity.pem"
    config = tmp_path / "c.toml"
    config.write_text(f'[auth]\nidentity_key_path = "{path}"\n')
    missing = rtcam("identity", config=config, check=False)
    assert missing.returncode == 1 and "--create" in missing.stderr
    created = rtcam("identity", "--create", config=config).stdout.strip()
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_b64(load_private_key_pem(path.read_bytes())) == created
    assert rtcam("identity", config=config).stdout.strip() == created
