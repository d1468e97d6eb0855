"""A NAT lab from network namespaces: an "internet" with the broker and coturn, a device behind
one NAT, viewers behind another NAT or on the device's LAN.

    the tests' own namespace 198.51.100.254 ──┐
                                              br0 in `pub`: 198.51.100.1 (mosquitto, coturn)
    `rdev` wan 198.51.100.2 ──────────────────┤    `rview` wan 198.51.100.3 ──┘
       │ NAT (nftables masquerade)                   │ NAT (cone or symmetric)
    lan 10.0.1.1/24 (bridge)                       lan 10.0.2.1/24 (bridge)
       ├── `dev`     10.0.1.2  rtcam                 └── `view` 10.0.2.2  a viewer
       └── `lanview` 10.0.1.3  a viewer on the device's LAN

Every address lives inside these namespaces: 198.51.100.0/24 is TEST-NET-2 (RFC 5737), 10/8
private, and nothing routes anywhere else. Each namespace is held by an `unshare -n sleep`
process (netem.Netns) and reached with `nsenter -t <pid> -n`, so nothing is named globally
(no `ip netns`, no /run/netns mounts): the lab works inside tests/run.sh's `unshare -n` and
vanishes with its holder processes. The tests' namespace joins the internet through one veth
(the test watches the broker from there); it must hold nothing but `lo` before.

NAT behaviour (Linux conntrack + nftables, in each router):
- "cone": `masquerade` keeps the source port where it can (endpoint-independent mapping) and
  lets in only replies to what went out (address- and port-dependent filtering): a
  port-restricted cone NAT. Server-reflexive candidates work across two of these by hole
  punching.
- "symmetric": `masquerade fully-random` picks a random port for every new flow, i.e. for
  every destination (endpoint-dependent mapping), with the same filtering. The port a STUN
  server saw is useless to anyone else, so host and server-reflexive candidates cannot work
  across it; a TURN relay can (its permissions are per IP address, RFC 8656 §9).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from netem import Netns, run

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
TEST_LINK = "natlab0"


def require_tools() -> None:
    for tool, package in (
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
        ("nft", "nftables"),
    ):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (apt-get install {package}): the NAT lab needs it")


def check_private_namespace() -> None:
    """The lab adds a veth to the tests' own namespace: refuse anything but a private one."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    if names != ["lo"]:
        pytest.fail(
            "the NAT lab must run in a private network namespace holding only lo "
            f"(tests/run.sh runs pytest under `unshare -n`); this one has {names}"
        )


class NatLab:
    def __init__(self) -> None:
        self.ns: dict[str, Netns] = {}
        self.nat: dict[str, str] = {}
        # router -> [(tcp port, host)]: port forwards (DNAT) on the router's wan address
        self.forwards: dict[str, list[tuple[int, str]]] = {}
        self._veths = 0

    def argv(self, where: str, *argv: str) -> list[str]:
        """argv that runs a command in namespace `where` (nsenter execs it: same pid)."""
        return self.ns[where].argv(*argv)

    def run_in(self, where: str, *argv: str) -> None:
        self.ns[where].run(*argv)

    def up(self) -> None:
        require_tools()
        check_private_namespace()
        for name in ["pub", *ROUTERS, *HOSTS]:
            self.ns[name] = Netns()
        self.run_in("pub", "ip", "link", "add", "br0", "type", "bridge")
        self.run_in("pub", "ip", "addr", "add", f"{BROKER_IP}/24", "dev", "br0")
        self.run_in("pub", "ip", "link", "set", "br0", "up")
        # The rest of the internet: a default route out of a veth whose other end (in `pub`
        # too, no address) drops what arrives, through a gateway with a fixed MAC address, so
        # packets vanish without an error. Without it coturn's relay gets ENETUNREACH sending
        # to a private address a viewer offered (10.0.x), and then relays nothing more for that
        # allocation.
        self.run_in("pub", "ip", "link", "add", "elsewhere", "type", "veth", "peer", "name", "void")
        for link in ("elsewhere", "void"):
            self.run_in("pub", "ip", "link", "set", link, "up")
        self.run_in(
            "pub", "ip", "neigh", "add", "192.0.2.1", "lladdr", "02:00:00:00:00:01",
            "dev", "elsewhere", "nud", "permanent",
        )
        self.run_in(
            "pub", "ip", "route", "add", "default", "via", "192.0.2.1", "dev", "elsewhere", "onlink"
        )
        for router, (wan, lan) in ROUTERS.items():
            self._veth("pub", f"to-{router}", router, "wan", bridge="br0")
            self.run_in(router, "ip", "addr", "add", f"{wan}/24", "dev", "wan")
            self.run_in(router, "ip", "link", "set", "wan", "up")
            self.run_in(router, "ip", "route", "add", "default", "via", BROKER_IP)
            self.run_in(router, "ip", "link", "add", "lan", "type", "bridge")
            self.run_in(router, "ip", "addr", "add", f"{lan}.1/24", "dev", "lan")
            self.run_in(router, "ip", "link", "set", "lan", "up")
            self.run_in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.set_nat(router, "cone")
        for host, (router, octet) in HOSTS.items():
            lan = ROUTERS[router][1]
            self._veth(router, f"to-{host}", host, "eth0", bridge="lan")
            self.run_in(host, "ip", "addr", "add", f"{lan}.{octet}/24", "dev", "eth0")
            self.run_in(host, "ip", "link", "set", "eth0", "up")
            self.run_in(host, "ip", "route", "add", "default", "via", f"{lan}.1")
        # The tests' own namespace joins the internet (no route beyond it: it reaches the
        # broker and coturn, never a host behind a NAT).
        run("ip", "link", "add", TEST_LINK, "type", "veth", "peer", "name", "natlab-pub")
        run("ip", "link", "set", "natlab-pub", "netns", str(self.ns["pub"].pid))
        self.run_in("pub", "ip", "link", "set", "natlab-pub", "master", "br0")
        self.run_in("pub", "ip", "link", "set", "natlab-pub", "up")
        run("ip", "addr", "add", f"{TEST_IP}/24", "dev", TEST_LINK)
        run("ip", "link", "set", TEST_LINK, "up")

    def _veth(self, a: str, a_if: str, b: str, b_if: str, bridge: str) -> None:
        """A veth from `a` (enslaved to `bridge` there) to `b`; made here, then moved."""
        self._veths += 1
        x, y = f"nl{self._veths}a", f"nl{self._veths}b"
        run("ip", "link", "add", x, "type", "veth", "peer", "name", y)
        run("ip", "link", "set", x, "netns", str(self.ns[a].pid))
        run("ip", "link", "set", y, "netns", str(self.ns[b].pid))
        self.run_in(a, "ip", "link", "set", x, "name", a_if)
        self.run_in(b, "ip", "link", "set", y, "name", b_if)
        self.run_in(a, "ip", "link", "set", a_if, "master", bridge)
        self.run_in(a, "ip", "link", "set", a_if, "up")

    def forward_port(self, router: str, port: int, host: str) -> None:
        """A home router's port forward: TCP `port` on `router`'s wan address goes to `host`
        (same port), kept across set_nat."""
        if HOSTS[host][0] != router:
            raise ValueError(f"{host} is not behind {router}")
        self.forwards.setdefault(router, [])
        if (port, host) not in self.forwards[router]:
            self.forwards[router].append((port, host))
        self.set_nat(router, self.nat[router])

    def set_nat(self, router: str, kind: str) -> None:
        """Make `router` a cone or a symmetric NAT. Flows it already tracks keep their
        mapping; every viewer run binds new local ports, so its flows are new ones."""
        if kind not in NAT_KINDS:
            raise ValueError(kind)
        flags = " fully-random" if kind == "symmetric" else ""
        lan = ROUTERS[router][1]
        dnat = "".join(
            f'        iifname "wan" tcp dport {port} dnat to {lan}.{HOSTS[host][1]}:{port}\n'
            for port, host in self.forwards.get(router, [])
        )
        rules = f"""flush ruleset
table ip nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
{dnat}    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade{flags}
    }}
}}
table inet filter {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" ct status dnat accept
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
            self.argv(router, "nft", "-f", "-"), input=rules, capture_output=True, text=True
        )
        if r.returncode != 0:
            raise RuntimeError(f"nft in {router}: {r.stderr.strip()}")
        self.nat[router] = kind

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", TEST_LINK], capture_output=True)
        for ns in self.ns.values():
            ns.close()
        self.ns.clear()
