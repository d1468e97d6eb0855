"""A NAT lab from network namespaces: an "internet" with the broker and coturn, a device behind
one NAT, viewers behind another NAT or on the device's LAN.

    test ns (pytest) 198.51.100.254 ──┐
                                      br0 in `pub`: 198.51.100.1 (mosquitto :1883, coturn :3478)
    `rdev` wan 198.51.100.2 ──────────┤          `rview` wan 198.51.100.3 ──┘
       │ NAT (nftables masquerade)                 │ NAT (cone or symmetric)
    lan 10.0.1.1/24 (bridge)                     lan 10.0.2.1/24 (bridge)
       ├── `dev`    10.0.1.2  rtcam                └── `view` 10.0.2.2  viewers
       └── `lanview` 10.0.1.3  a viewer on the device's LAN

Every address lives inside these namespaces; 198.51.100.0/24 is TEST-NET-2 (RFC 5737) and
10.0.0.0/8 private, and nothing routes anywhere else. The namespaces are made with
`ip netns`, so the lab insists on running inside a private network and mount namespace
(tests/run.sh runs pytest under `unshare -n -m`): it refuses to touch a network namespace that
has interfaces other than `lo`.

NAT behaviour (Linux conntrack + nftables):
- "cone": `masquerade` keeps the source port where it can (endpoint-independent mapping) and
  lets in only replies to what went out (address- and port-dependent filtering): a
  port-restricted cone NAT. Server-reflexive candidates work across two of these by hole
  punching.
- "symmetric": `masquerade fully-random` picks a new random port for every destination
  (endpoint-dependent mapping), with the same filtering. The port a STUN server saw is useless
  to anyone else, so host and server-reflexive candidates cannot work across it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PUBLIC_NET = "198.51.100"
BROKER_IP = f"{PUBLIC_NET}.1"
TEST_IP = f"{PUBLIC_NET}.254"
ROUTERS = {
    # router: (wan address, lan prefix)
    "rdev": (f"{PUBLIC_NET}.2", "10.0.1"),
    "rview": (f"{PUBLIC_NET}.3", "10.0.2"),
}
HOSTS = {
    # host: (router, last octet)
    "dev": ("rdev", 2),
    "lanview": ("rdev", 3),
    "view": ("rview", 2),
}
NAT_KINDS = ("cone", "symmetric")


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}", f"/usr/bin/{tool}") if os.path.exists(p)),
        None,
    )
    if path is None:
        pytest.fail(
            f"{tool} is not installed (apt-get install {package}); the NAT lab needs it",
            pytrace=False,
        )
    return path


class NatLab:
    def __init__(self, tag: str):
        self.ip = _require("ip", "iproute2")
        self.nft = _require("nft", "nftables")
        self.tag = tag
        self.names = {n: f"rtcam{tag}-{n}" for n in ["pub", *ROUTERS, *HOSTS]}
        self.nat: dict[str, str] = {}
        self.created: list[str] = []
        self.test_link: str | None = None

    # ---- helpers -----------------------------------------------------------------------

    def ns(self, name: str) -> str:
        return self.names[name]

    def sh(self, *argv: str) -> None:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")

    def in_ns(self, name: str, *argv: str) -> None:
        self.sh(self.ip, "netns", "exec", self.ns(name), *argv)

    def exec_prefix(self, name: str) -> list[str]:
        """argv prefix that runs a command in namespace `name`."""
        return [self.ip, "netns", "exec", self.ns(name)]

    # ---- set-up ------------------------------------------------------------------------

    @staticmethod
    def check_private_namespace() -> None:
        links = subprocess.run(
            ["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
        names = [line.split(":")[1].strip().split("@")[0] for line in links if ":" in line]
        if names != ["lo"]:
            pytest.fail(
                "the NAT lab creates interfaces and namespaces; run it inside a private network "
                "and mount namespace (`unshare -n -m`, as tests/run.sh does), not where "
                f"these interfaces exist: {names}",
                pytrace=False,
            )

    def up(self) -> None:
        self.check_private_namespace()
        for name in self.names:
            self.sh(self.ip, "netns", "add", self.ns(name))
            self.created.append(name)
            self.in_ns(name, "ip", "link", "set", "lo", "up")
        # The "internet": a bridge in `pub` holding the servers' address.
        self.in_ns("pub", "ip", "link", "add", "br0", "type", "bridge")
        self.in_ns("pub", "ip", "addr", "add", f"{BROKER_IP}/24", "dev", "br0")
        self.in_ns("pub", "ip", "link", "set", "br0", "up")
        for router, (wan, lan) in ROUTERS.items():
            self._link("pub", f"to-{router}", router, "wan", bridge_a="br0")
            self.in_ns(router, "ip", "addr", "add", f"{wan}/24", "dev", "wan")
            self.in_ns(router, "ip", "link", "set", "wan", "up")
            self.in_ns(router, "ip", "link", "add", "lan", "type", "bridge")
            self.in_ns(router, "ip", "addr", "add", f"{lan}.1/24", "dev", "lan")
            self.in_ns(router, "ip", "link", "set", "lan", "up")
            self.in_ns(router, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
            self.set_nat(router, "cone")
        for host, (router, octet) in HOSTS.items():
            lan = ROUTERS[router][1]
            self._link(router, f"to-{host}", host, "eth0", bridge_a="lan")
            self.in_ns(host, "ip", "addr", "add", f"{lan}.{octet}/24", "dev", "eth0")
            self.in_ns(host, "ip", "link", "set", "eth0", "up")
            self.in_ns(host, "ip", "route", "add", "default", "via", f"{lan}.1")
        # The test process itself joins the internet (it watches the broker and can act as a
        # viewer without NAT).
        self.test_link = f"rtcam{self.tag}-t"
        self.sh(self.ip, "link", "add", self.test_link, "type", "veth", "peer", "name", "to-test")
        self.sh(self.ip, "link", "set", "to-test", "netns", self.ns("pub"))
        self.in_ns("pub", "ip", "link", "set", "to-test", "master", "br0")
        self.in_ns("pub", "ip", "link", "set", "to-test", "up")
        self.sh(self.ip, "addr", "add", f"{TEST_IP}/24", "dev", self.test_link)
        self.sh(self.ip, "link", "set", self.test_link, "up")

    def _link(self, a: str, a_if: str, b: str, b_if: str, bridge_a: str) -> None:
        tmp = f"rtcam{self.tag}-x"
        self.in_ns(a, "ip", "link", "add", a_if, "type", "veth", "peer", "name", tmp)
        self.in_ns(a, "ip", "link", "set", tmp, "netns", self.ns(b))
        self.in_ns(b, "ip", "link", "set", tmp, "name", b_if)
        self.in_ns(a, "ip", "link", "set", a_if, "master", bridge_a)
        self.in_ns(a, "ip", "link", "set", a_if, "up")

    def set_nat(self, router: str, kind: str) -> None:
        """Replace `router`'s NAT with a cone or a symmetric one (new flows only: existing
        conntrack entries keep their mapping)."""
        if kind not in NAT_KINDS:
            raise ValueError(kind)
        flags = " fully-random" if kind == "symmetric" else ""
        rules = f"""flush ruleset
table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade{flags}
    }}
}}
table inet filter {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }}
}}
"""
        r = subprocess.run(
            [*self.exec_prefix(router), self.nft, "-f", "-"],
            input=rules,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            raise RuntimeError(f"nft in {router}: {r.stderr.strip()}")
        self.nat[router] = kind

    def down(self) -> None:
        if self.test_link:
            subprocess.run([self.ip, "link", "del", self.test_link], capture_output=True)
        for name in reversed(self.created):
            subprocess.run([self.ip, "netns", "del", self.ns(name)], capture_output=True)
        self.created.clear()
