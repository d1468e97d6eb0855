"""A WHEP client process (aiortc over urllib) for the NAT lab: run in a viewer's namespace, it
watches one WHEP session and prints JSON events, one a line.

It takes its ICE servers from the 201's `Link: <...>; rel="ice-server"` headers only (RFC 9725
§4.6), the way whip-whep does in a browser: the offer is POSTed before gathering, then the
servers from the answer are applied, candidates are gathered with them and sent by PATCH
(trickle, application/trickle-ice-sdpfrag). aiortc has no setConfiguration(): the servers are
set on the transport's aioice Connection (its public stun_server/turn_* attributes), reached
through the gatherer, before gathering starts.

Events: posted (status, links), ice-servers, local-candidates (types), patched, connected (the nominated pair), first-frame (ms from the POST),
done (frames, good: pattern stamps decoded), deleted (status), error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request

from aiortc import RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcicetransport import connection_kwargs

import viewer
from pattern import decode_frame


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def http(method: str, url: str, body: bytes, headers: dict[str, str]):
    req = urllib.request.Request(url, data=body or None, method=method)
    for k, v in headers.items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        out, escaped = [], False
        for ch in value[1:-1]:
            if escaped or ch != "\\":
                out.append(ch)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return value


def _split_params(text: str) -> list[str]:
    """`; `-separated link parameters, not splitting inside quoted strings."""
    parts, cur, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def ice_servers_from_links(links: list[str]) -> list[dict]:
    """RFC 9725 §4.6 ice-server links as W3C RTCIceServer dicts (one Link header each)."""
    servers = []
    for link in links:
        head, _, rest = link.partition(">")
        url = head.strip().lstrip("<")
        params = {}
        for p in _split_params(rest):
            k, sep, v = p.partition("=")
            if sep:
                params[k.strip().lower()] = _unquote(v)
        if params.get("rel") != "ice-server":
            continue
        servers.append(
            {"urls": [url], "username": params.get("username"), "credential": params.get("credential")}
        )
    return servers


def use_ice_servers(pc: RTCPeerConnection, servers: list[dict]) -> None:
    """What RTCPeerConnection.setConfiguration({iceServers}) does in a browser, before
    gathering: aiortc keeps its servers in each transport's aioice Connection."""
    kwargs = connection_kwargs(
        [RTCIceServer(urls=s["urls"], username=s["username"], credential=s["credential"]) for s in servers]
    )
    for t in pc.getTransceivers():
        conn = t.receiver.transport.transport.iceGatherer._connection
        for key, value in kwargs.items():
            setattr(conn, key, value)


async def watch(a: argparse.Namespace) -> int:
    token = open(a.token_file).read().strip() if a.token_file else None
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    loop = asyncio.get_running_loop()
    pc = RTCPeerConnection(viewer.rtc_configuration([]))
    pc.addTransceiver("video", direction="recvonly")
    frames = {"n": 0, "good": 0, "first": None}
    tasks = []

    async def recv(track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if frames["first"] is None:
                frames["first"] = time.monotonic()
            frames["n"] += 1
            if decode_frame(frame.to_ndarray(format="yuv420p"), frame.width, frame.height).pattern_ok:
                frames["good"] += 1

    pc.on("track", lambda t: tasks.append(asyncio.ensure_future(recv(t))))
    try:
        offer = await pc.createOffer()  # no candidates yet: they follow by PATCH
        t_post = time.monotonic()
        status, headers, body = await loop.run_in_executor(
            None,
            lambda: http("POST", a.url, offer.sdp.encode(), {"Content-Type": "application/sdp", **auth}),
        )
        links = headers.get_all("Link") or []
        ms = lambda: round((time.monotonic() - t_post) * 1000)  # noqa: E731
        emit("posted", status=status, links=[l.split(";", 1)[0] for l in links], ms_from_post=ms())
        if status != 201:
            emit("error", message=f"POST {status}: {body[:300]!r}")
            return 1
        servers = ice_servers_from_links(links)
        emit("ice-servers", servers=[{"urls": s["urls"], "username": s["username"]} for s in servers])
        use_ice_servers(pc, servers)
        location = headers.get("Location")
        etag = headers.get("ETag") or "*"
        base = a.url.split("/", 3)
        session_url = location if "://" in location else f"{base[0]}//{base[2]}{location}"
        await pc.setLocalDescription(offer)  # gathers, with the servers of the Link headers
        sdp = pc.localDescription.sdp
        frag = [line for line in sdp.splitlines() if line.startswith("a=ice-ufrag:")][:1]
        frag += ["m=video 9 UDP/TLS/RTP/SAVPF 0", "a=mid:0"]
        cands = [line for line in sdp.splitlines() if line.startswith("a=candidate:")]
        frag += cands + ["a=end-of-candidates"]
        emit("local-candidates", types=sorted({c.split()[7] for c in cands}), ms_from_post=ms())
        await pc.setRemoteDescription(RTCSessionDescription(body.decode(), "answer"))
        status, _, reply = await loop.run_in_executor(
            None,
            lambda: http(
                "PATCH",
                session_url,
                ("\r\n".join(frag) + "\r\n").encode(),
                {"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": etag, **auth},
            ),
        )
        if status != 204:
            emit("error", message=f"PATCH {status}: {reply[:300]!r}")
            return 1
        emit("patched", ms_from_post=ms())
        deadline = time.monotonic() + a.timeout
        while frames["good"] < a.frames:
            if time.monotonic() > deadline:
                emit(
                    "error",
                    message=f"{frames['good']} good frames of {frames['n']} in {a.timeout} s "
                    f"(connection {pc.connectionState})",
                    pair=viewer.selected_pair(pc),
                )
                return 1
            await asyncio.sleep(0.05)
        emit("connected", pair=viewer.selected_pair(pc))
        emit("first-frame", ms_from_post=round((frames["first"] - t_post) * 1000))
        emit("done", frames=frames["n"], good=frames["good"])
        status, _, reply = await loop.run_in_executor(
            None, lambda: http("DELETE", session_url, b"", auth)
        )
        emit("deleted", status=status)
        return 0 if status == 200 else 1
    finally:
        for t in tasks:
            t.cancel()
        await pc.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the WHEP endpoint")
    p.add_argument("--token-file", help="file holding the Bearer viewer credential")
    p.add_argument("--ice-address", required=True, help="the one local address ICE uses")
    p.add_argument("--frames", type=int, default=60, help="good frames to wait for")
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args()
    viewer.ICE_ADDRESS = a.ice_address
    try:
        return asyncio.run(watch(a))
    except Exception as e:  # noqa: BLE001 - reported as an event, the test shows it
        emit("error", message=f"{type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
