#!/usr/bin/env python3
"""Boots Debian's kernel with vivid under qemu (TCG, no network), runs rtcam record in the
guest for each case, and checks the clips on the host (frames, size, colour bars, controls,
camera loss). Run by tests/vm/run.sh, which provides the packages and kernel .debs."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# vivid's default test pattern is 75% colour bars in 8 equal vertical bands. Expected Y'CbCr
# (BT.601, limited range) of 75% white, yellow, cyan, green, magenta, red, blue, black.
BARS = [
    ("white", 180, 128, 128),
    ("yellow", 162, 44, 142),
    ("cyan", 131, 156, 44),
    ("green", 112, 72, 58),
    ("magenta", 84, 184, 198),
    ("red", 65, 100, 212),
    ("blue", 35, 212, 114),
    ("black", 16, 128, 128),
]
Y_TOLERANCE = 8
C_TOLERANCE = 10
# The default-brightness clip the brightness cases are compared with (same format and size).
BRIGHTNESS_BASE = "yu12-640x360"


@dataclass
class Arch:
    name: str  # x86_64 / aarch64
    deb_arch: str  # amd64 / arm64
    qemu: list[str]
    console: str
    readelf: str
    strip: str
    lib_dirs: list[str]
    busybox_deb_glob: str | None  # None: the host's /bin/busybox (busybox-static)
    frames: int
    fault_frames: int


ARCHES = {
    "x86_64": Arch(
        name="x86_64",
        deb_arch="amd64",
        qemu=["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "1024"],
        console="ttyS0",
        readelf="readelf",
        strip="strip",
        lib_dirs=["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64"],
        busybox_deb_glob=None,
        frames=60,
        fault_frames=150,
    ),
    "aarch64": Arch(
        name="aarch64",
        deb_arch="arm64",
        # A Raspberry Pi 4 class core (Cortex-A72) on the generic virt board.
        qemu=["qemu-system-aarch64", "-machine", "virt,accel=tcg", "-cpu", "cortex-a72", "-smp", "2", "-m", "1024"],
        console="ttyAMA0",
        readelf="aarch64-linux-gnu-readelf",
        strip="aarch64-linux-gnu-strip",
        lib_dirs=["/usr/aarch64-linux-gnu/lib"],
        busybox_deb_glob="busybox-static_*_arm64.deb",
        frames=60,
        fault_frames=150,
    ),
}

# The M2M cases: one segment per size (vicodec needs at least 640x360; the second size
# restarts the encoder), frames per segment, and the keyframe interval set through the GOP
# control.
M2M_SIZES = [(640, 480), (640, 360)]
M2M_FRAMES = 20
M2M_GOP = 5
VIVID_ARGS = "n_devs=1 node_types=0x1 num_inputs=1 input_types=0x0 vid_cap_nr=0 no_error_inj=1"
# Modules the guest loads, in this order (each after its dependencies), with their arguments.
# vivid comes first so that its capture node is /dev/video0. vimc, vicodec and v4l2loopback
# are not in Debian's kernel package: tests/vm/build-modules.sh builds them for it.
GUEST_MODULES = [
    ("vivid", VIVID_ARGS),
    ("vimc", ""),
    ("vicodec", ""),
    ("v4l2loopback", "devices=1 card_label=rtcam-loopback"),
    ("virtio_pci", ""),
    ("virtio_blk", ""),
]
# H.264 passthrough (v4l2loopback): clips made on the host with libx264 (PyAV), fed into the
# loopback device one access unit per buffer by the hidden `rtcam feed-h264` in the guest, and
# read by `rtcam record` with capture.format = "H264". Per clip: frames, IDR interval, profile,
# SPS/PPS with every IDR (x264's default) or only in the first access unit (rtcam must put
# them in front of the later IDRs), and every how many access units the feeder adds a garbage
# buffer.
CLIP_SIZE = (640, 360)
# Fed at 15 fps: v4l2loopback (0.12) hands a reader that falls more than two buffers behind
# only the newest, so a stall of rtcam's capture thread under TCG longer than ~130 ms (at 30
# fps: ~70 ms) would lose frames. rtcam handles that (the checks below allow it where it is
# explained by a gap), but the test should not depend on it.
FEED_FPS = 15
CLIPS = {
    "high-gop30": dict(frames=90, keyint=30, profile="high", every_idr=True, garbage_every=25),
    "main-sps-once": dict(frames=60, keyint=20, profile="main", every_idr=False, garbage_every=0),
}
LOOPBACK = "/dev/by-name/rtcam-loopback"
# What each test driver must create in the guest: V4L2 node names (/sys/class/video4linux/*/
# name: video nodes and sub-devices) and media-controller models (/sys/bus/media/devices/*/model).
EXPECTED_NODES = {
    "vivid": (["vivid-000-vid-cap"], []),
    "vimc": (["Raw Capture 0", "Raw Capture 1", "RGB/YUV Capture", "Sensor A", "Debayer A", "Scaler"], ["VIMC MDEV"]),
    "vicodec": (["stateful-encoder", "stateful-decoder", "stateless-decoder"], ["vicodec"]),
    "v4l2loopback": (["rtcam-loopback"], []),
}


@dataclass
class Case:
    name: str
    fmt: str | None
    width: int
    height: int
    frames: int
    stride_align: int = 0
    controls: dict[str, int] = field(default_factory=dict)
    kind: str = "plain"  # plain | fault | refused
    expect_rc: int = 0
    device: str = "/dev/video0"  # vivid
    # Runs rtcam through this (e.g. libcamerify, which preloads libcamera's v4l2-compat.so).
    wrapper: str = ""
    # vivid's controls (see command()); other drivers do not have them.
    vivid: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    # M2M cases: reload vicodec with multiplanar=1 first.
    mplane: bool = False
    # Loopback cases: the clip fed (CLIPS) and after how many frames a second subscriber joins.
    clip: str = ""
    join_at: int = 0

    def feeder(self) -> str:
        """The guest's background feeder for a loopback case."""
        c = CLIPS[self.clip]
        return (f"/rtcam feed-h264 --device {LOOPBACK} --clip /clips/{self.clip}.h264 "
                f"--size {CLIP_SIZE[0]}x{CLIP_SIZE[1]} --fps {FEED_FPS} --garbage-every {c['garbage_every']} --seconds 90")

    def env(self) -> str:
        if self.kind == "m2m":
            return "RTCAM__LOG__LEVEL=info"
        if self.kind == "probe":
            return f"RTCAM__CAPTURE__DEVICE={self.device} RTCAM__CAPTURE__WIDTH={self.width} RTCAM__CAPTURE__HEIGHT={self.height}"
        e = {
            **self.extra_env,
            "RTCAM__CAPTURE__SOURCE": "v4l2",
            "RTCAM__CAPTURE__DEVICE": self.device,
            "RTCAM__CAPTURE__FORMAT": self.fmt or "auto",
            "RTCAM__CAPTURE__WIDTH": self.width,
            "RTCAM__CAPTURE__HEIGHT": self.height,
            "RTCAM__CAPTURE__FPS": 30,
            "RTCAM__CAPTURE__STRIDE_ALIGN": self.stride_align,
            "RTCAM__LOG__LEVEL": "info",
        }
        return " ".join(f"{k}={v}" for k, v in e.items())

    def command(self) -> str:
        if self.kind == "probe":
            return "/rtcam probe"
        if self.kind == "m2m":
            sizes = " ".join(f"--size {w}x{h}" for w, h in M2M_SIZES)
            return (f"/rtcam m2m-check --camera {self.device} {sizes} --frames {self.frames} --gop {M2M_GOP} "
                    f"--input {self.fmt} --output-dir /out/{self.name}")
        timeout = 240 if self.kind == "fault" else 120
        a = f"{self.wrapper} /rtcam record --frames {self.frames} --output /out/{self.name}.h264 --timeout {timeout}"
        if self.join_at:
            a += f" --join-at {self.join_at} --join-output /out/{self.name}.join.h264"
        # vivid draws status text over the top of the picture (several 16-line rows, most of a
        # 180-line frame); its "OSD Text Mode" menu control, set through rtcam's control path
        # like any other, switches that off so the colour bars are all there is.
        vivid = {"osd_text_mode": 2} if self.vivid else {}
        for k, v in {**vivid, **self.controls}.items():
            a += f" --control {k}={v}"
        return a


def cases(arch: Arch, libcamera: bool) -> list[Case]:
    out = []
    n = arch.frames
    # 320x180 and 640x360 are sizes of vivid's webcam input. At 640x360 the driver picks the
    # line length (YU12/NV12: the width; YUYV: twice the width). At 320x180 rtcam asks for
    # lines padded to 256 bytes (capture.stride_align, as some ISPs need) and vivid honours
    # it: 512-byte luma lines for a 320-pixel picture (YUYV: 768 instead of 640), so for every
    # format the stride differs from the natural line and every plane offset depends on it.
    for fmt in ("YUYV", "YU12", "NV12"):
        out.append(Case(f"{fmt.lower()}-320x180-pad256", fmt, 320, 180, n, stride_align=256))
        out.append(Case(f"{fmt.lower()}-640x360", fmt, 640, 360, n))
    out.append(Case("brightness-64", "YU12", 640, 360, 10, controls={"brightness": 64}))
    out.append(Case("brightness-192", "YU12", 640, 360, 10, controls={"brightness": 192}))
    out.append(Case("brightness-300", "YU12", 640, 360, 5, controls={"brightness": 300}, kind="refused", expect_rc=1))
    out.append(Case("fault", "YU12", 320, 180, arch.fault_frames, kind="fault"))
    # What rtcam finds in the guest and would choose (the service's own selection code).
    out.append(Case("probe", None, 640, 360, 0, kind="probe"))
    # encoder.backend = "v4l2" where no V4L2 node encodes H.264 (vicodec's are FWHT): rtcam
    # says why and encodes with openh264; the recording is complete.
    out.append(Case("encoder-v4l2-missing", "YU12", 640, 360, 30, extra_env={"RTCAM__ENCODER__BACKEND": "v4l2"}))
    # vivid -> vicodec's stateful encoder (FWHT) -> vicodec's decoder, through rtcam's M2M
    # encoder: the camera's buffers imported as DMABUF where vicodec's layout matches (640x480),
    # copied into MMAP buffers where it does not (640x360: vicodec wants 368-line buffers);
    # then again with vicodec reloaded in its multi-planar mode (the API bcm2835-codec uses).
    # vicodec's FWHT encoder takes ~0.2 s per 640x480 frame under TCG: 20 frames per size.
    # H.264 passthrough: v4l2loopback fed a libx264 clip by `rtcam feed-h264` (started first,
    # so rtcam joins mid-stream); a second subscriber joins mid-GOP and must start at once
    # from the cached IDR. High profile with SPS/PPS on every IDR and a garbage buffer every
    # 25 access units; Main with SPS/PPS only in the clip's first access unit.
    w, h = CLIP_SIZE
    out.append(Case("h264-loopback", "H264", w, h, 60, kind="loopback", device=LOOPBACK, vivid=False,
                    clip="high-gop30", join_at=40))
    out.append(Case("h264-loopback-sps-once", "H264", w, h, 50, kind="loopback", device=LOOPBACK, vivid=False,
                    clip="main-sps-once", join_at=30))
    out.append(Case("m2m-dmabuf", "dmabuf", 0, 0, M2M_FRAMES, kind="m2m"))
    out.append(Case("m2m-mplane-dmabuf", "dmabuf", 0, 0, M2M_FRAMES, kind="m2m", mplane=True))
    if libcamera:
        # vimc through libcamera (sensor -> debayer -> scaler -> capture, configured by
        # libcamera's vimc pipeline handler), read through the V4L2 compatibility layer that
        # libcamerify preloads (-d: its log names the camera it maps the node to). libcamera
        # 0.0.3 offers packed RGB only, in both byte orders; its vimc handler scales by 3, so
        # the width is a multiple of 6 (640 would come out as 636).
        for fmt in ("BGR3", "RGB3"):
            out.append(Case(f"libcamera-vimc-{fmt.lower()}", fmt, 720, 480, 30, device="/dev/by-name/RGB-YUV-Capture",
                            wrapper="/usr/bin/libcamerify -d", vivid=False, kind="libcamera"))
    return out


def die(msg: str) -> None:
    print(f"vmtest: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


# --- kernel modules ------------------------------------------------------------------------


def modinfo(path: Path) -> dict[str, str]:
    """The .modinfo section of a kernel module (ELF64 little-endian), first value per key."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        die(f"{path} is not an ELF64 little-endian module")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    info: dict[str, str] = {}
    for s in sections:
        name = data[names_at + s[0] : data.index(b"\0", names_at + s[0])]
        if name == b".modinfo":
            for item in data[s[4] : s[4] + s[5]].split(b"\0"):
                key, _, value = item.decode(errors="replace").partition("=")
                if key:
                    info.setdefault(key, value)
    return info


def resolve_modules(moddirs: list[Path], wanted: list[str]) -> list[Path]:
    """`wanted` and everything they depend on, dependencies first (as modules.dep would).
    Modules are looked up in the kernel's tree and the extra directories, in that order; a
    wanted module that is neither there nor built into the kernel (modules.builtin) is missing."""
    by_name: dict[str, Path] = {}
    for d in moddirs:
        for p in d.rglob("*.ko"):
            by_name.setdefault(p.stem.replace("-", "_"), p)
    builtin_file = moddirs[0] / "modules.builtin"
    builtin = {
        Path(line.strip()).stem.replace("-", "_")
        for line in (builtin_file.read_text().splitlines() if builtin_file.exists() else [])
    }
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        path = by_name.get(name)
        if path is None:
            return  # built into this kernel
        for dep in filter(None, modinfo(path).get("depends", "").split(",")):
            visit(dep)
        order.append(path)

    for w in wanted:
        key = w.replace("-", "_")
        if key not in by_name and key not in builtin:
            die(f"MISSING: kernel module {w}: not in {', '.join(map(str, moddirs))} and not built in "
                "(tests/vm/build-modules.sh builds vimc, vicodec and v4l2loopback)")
        visit(w)
    return order


# --- initramfs (cpio newc, uncompressed) ---------------------------------------------------


class Cpio:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        )
        self.ino += 1
        blob = header.encode() + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4)
        blob += data + b"\0" * (-len(data) % 4)
        self.parts.append(blob)

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755, b"")

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        if "/" in path:
            self.mkdir(path.rsplit("/", 1)[0])
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        if "/" in path:
            self.mkdir(path.rsplit("/", 1)[0])
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def write(self, out: Path) -> None:
        self._entry("TRAILER!!!", 0, b"")
        with out.open("wb") as f:
            for p in self.parts:
                f.write(p)


def elf_needs(arch: Arch, path: Path) -> tuple[list[str], str | None]:
    out = subprocess.run([arch.readelf, "-d", "-l", "-W", str(path)], check=True, capture_output=True, text=True).stdout
    needed, interp = [], None
    for line in out.splitlines():
        if "(NEEDED)" in line and "[" in line:
            needed.append(line.split("[", 1)[1].split("]", 1)[0])
        if "Requesting program interpreter:" in line:
            interp = line.split(":", 1)[1].strip().rstrip("]")
    return needed, interp


def add_libraries(arch: Arch, cpio: Cpio, binaries: list[Path], extra_dirs: list[Path] = ()) -> list[str]:
    """Copies the shared libraries `binaries` link (recursively) into /lib, found in
    `extra_dirs` first (unpacked packages), then the host's library directories; returns
    their names."""
    added: list[str] = []
    todo = list(binaries)
    interp_path = None
    dirs = [Path(d) for d in extra_dirs] + [Path(d) for d in arch.lib_dirs]
    while todo:
        binary = todo.pop()
        needed, interp = elf_needs(arch, binary)
        if interp and interp_path is None:
            interp_path = interp
        for lib in needed:
            if lib in added:
                continue
            found = next((d / lib for d in dirs if (d / lib).exists()), None)
            if found is None:
                die(f"MISSING: {lib}, which {binary.name} needs, is not in {', '.join(map(str, dirs))}")
            cpio.file(f"/lib/{lib}", found.resolve().read_bytes(), 0o755)
            added.append(lib)
            todo.append(found.resolve())
    if interp_path is None:
        die(f"{binaries[0]} has no program interpreter (not a dynamic executable?)")
    base = Path(interp_path).name
    if interp_path.strip("/") != f"lib/{base}":
        cpio.symlink(interp_path, f"/lib/{base}")
    return added


def add_libcamera(arch: Arch, cpio: Cpio, root: Path) -> list[Path]:
    """Debian's libcamera, unpacked by run.sh into `root`, at its installed paths (it finds
    its IPA modules, their proxies and data there): the library, the V4L2 compatibility layer
    (v4l2-compat.so, what libcamerify preloads) and the vimc IPA. Returns the ELF files whose
    libraries the guest needs."""
    libdir = f"usr/lib/{arch.name}-linux-gnu"
    files = [
        f"{libdir}/v4l2-compat.so",
        "usr/bin/libcamerify",
        f"{libdir}/libcamera/ipa_vimc.so",
        f"{libdir}/libcamera/ipa_vimc.so.sign",
        f"{libdir}/libcamera/vimc_ipa_proxy",
        "usr/share/libcamera/ipa/vimc/vimc.conf",
    ]
    elves = []
    for f in files:
        src = root / f
        if not src.exists():
            die(f"MISSING: {f} in the unpacked libcamera packages ({root})")
        cpio.file(f"/{f}", src.read_bytes(), 0o755)
        if not f.endswith((".sign", ".conf", "libcamerify")):
            elves.append(src)
    return elves


def busybox_binary(arch: Arch, cache: Path) -> Path:
    if arch.busybox_deb_glob is None:
        p = Path("/bin/busybox")
        out = subprocess.run(["file", "-L", str(p)], capture_output=True, text=True).stdout
        if "statically linked" not in out and "static-pie" not in out:
            die("/bin/busybox is not the static busybox (install busybox-static)")
        return p
    debs = sorted((cache / "debs").glob(arch.busybox_deb_glob))
    if not debs:
        die(f"no {arch.busybox_deb_glob} in {cache / 'debs'} (tests/vm/run.sh downloads it)")
    dest = cache / arch.deb_arch / "busybox"
    if not (dest / "bin/busybox").exists():
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(dest)], check=True)
    return dest / "bin/busybox"


def kernel_tree(arch: Arch, cache: Path) -> tuple[Path, Path]:
    """(vmlinuz, /lib/modules/<version>) extracted from the linux-image .deb in the cache."""
    debs = sorted((cache / "debs").glob(f"linux-image-*-{arch.deb_arch}_*_{arch.deb_arch}.deb"))
    if not debs:
        die(f"no linux-image-*-{arch.deb_arch} .deb in {cache / 'debs'} (tests/vm/run.sh downloads it)")
    root = cache / arch.deb_arch / "kernel"
    stamp = root / ".from"
    if not stamp.exists() or stamp.read_text() != debs[-1].name:
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
        stamp.write_text(debs[-1].name)
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    mods = sorted((root / "lib/modules").iterdir())
    if not vmlinuz or not mods:
        die(f"{debs[-1].name} holds no vmlinuz or modules")
    return vmlinuz[-1], mods[-1]


def build_initramfs(
    arch: Arch, cache: Path, rtcam: Path, case_list: list[Case], work: Path, extra_modules: Path,
    libcamera: Path | None,
) -> tuple[Path, Path]:
    """(kernel, initramfs): busybox, /init, the test drivers and virtio-blk modules, rtcam and its libraries."""
    vmlinuz, moddir = kernel_tree(arch, cache)
    if not extra_modules.is_dir():
        die(f"MISSING: the test driver modules directory {extra_modules} (tests/vm/build-modules.sh)")
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "out", "lib", "modules"):
        cpio.mkdir(d)
    cpio.file("/bin/busybox", busybox_binary(arch, cache).read_bytes(), 0o755)
    cpio.file("/init", (HERE / "guest-init.sh").read_bytes(), 0o755)
    order = []
    args = {name.replace("-", "_"): a for name, a in GUEST_MODULES}
    modules = resolve_modules([moddir, extra_modules], [name for name, _ in GUEST_MODULES])
    for p in modules:
        cpio.file(f"/modules/{p.name}", p.read_bytes())
        order.append(f"{p.name} {args.get(p.stem.replace('-', '_'), '')}".rstrip())
    cpio.file("/modules/order", ("\n".join(order) + "\n").encode())
    stripped = work / "rtcam"
    subprocess.run([arch.strip, "-o", str(stripped), str(rtcam)], check=True)
    cpio.file("/rtcam", stripped.read_bytes(), 0o755)
    binaries, lib_dirs = [rtcam], []
    if libcamera is not None:
        binaries += add_libcamera(arch, cpio, libcamera)
        lib_dirs = [libcamera / f"usr/lib/{arch.name}-linux-gnu", libcamera / f"lib/{arch.name}-linux-gnu"]
    libs = add_libraries(arch, cpio, binaries, lib_dirs)
    def guest_kind(c: Case) -> str:
        if c.kind == "loopback":
            return f"feed {c.feeder()}"
        return "fault" if c.kind == "fault" else "mplane" if c.mplane else "plain"

    for name in sorted({c.clip for c in case_list if c.kind == "loopback"}):
        cpio.file(f"/clips/{name}.h264", b"".join(clip_units(name)))

    lines = [f"{c.name}|{c.env()}|{c.command()}|{guest_kind(c)}" for c in case_list]
    cpio.file("/cases", ("\n".join(lines) + "\n").encode())
    out = work / "initramfs.cpio"
    cpio.write(out)
    print(
        f"vmtest: {arch.name}: initramfs {out.stat().st_size // 1024} KiB: kernel {vmlinuz.name}, "
        f"modules {' '.join(p.stem for p in modules)}, libs {' '.join(libs)}",
        flush=True,
    )
    return vmlinuz, out


def boot(arch: Arch, vmlinuz: Path, initramfs: Path, work: Path, timeout_s: int) -> Path:
    """Runs the VM to its poweroff; returns the directory holding what the guest wrote."""
    disk = work / "results.img"
    disk.unlink(missing_ok=True)
    with disk.open("wb") as f:
        f.truncate(256 * 1024 * 1024)
    console = work / "console.log"
    cmd = arch.qemu + [
        "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(vmlinuz), "-initrd", str(initramfs),
        "-append", f"console={arch.console} rdinit=/init panic=-1 quiet loglevel=4",
        "-drive", f"if=none,id=out,format=raw,file={disk}",
        "-device", "virtio-blk-pci,drive=out",
    ]
    print(f"vmtest: {arch.name}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    with console.open("w") as log:
        proc = subprocess.Popen(
            ["timeout", "--kill-after=10", str(timeout_s)] + cmd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            line = "".join(ch for ch in line if ch.isprintable() or ch == "\n")
            if "vmtest:" in line or "Kernel panic" in line or "BUG" in line or "rtcam" in line.lower():
                print(f"  [{arch.name} {time.monotonic() - start:6.1f}s] {line.rstrip()}", flush=True)
        rc = proc.wait()
    print(f"vmtest: {arch.name}: qemu exited {rc} after {time.monotonic() - start:.1f} s", flush=True)
    tail = "".join(console.read_text(errors="replace").splitlines(keepends=True)[-40:])
    if rc == 124:
        die(f"{arch.name}: the VM did not finish within {timeout_s} s; console log {console} ends:\n{tail}")
    if rc != 0:
        die(f"{arch.name}: qemu failed (exit {rc}); console log {console} ends:\n{tail}")
    if "vmtest: results written" not in console.read_text(errors="replace"):
        die(f"{arch.name}: the guest did not finish its cases; console log {console} ends:\n{tail}")
    results = work / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir()
    try:
        with tarfile.open(disk) as t:
            # The guest's own files; the "data" filter where this Python has it (3.11.4+).
            if hasattr(tarfile, "data_filter"):
                t.extractall(results, filter="data")
            else:
                t.extractall(results)
    except tarfile.TarError as e:
        die(f"{arch.name}: no results on the disk ({e}); console log: {console}")
    return results


# --- H.264 clips ----------------------------------------------------------------------------

_CLIP_CACHE: dict[str, list[bytes]] = {}


def nal_units(data: bytes) -> list[tuple[int, int, int]]:
    """(start code start, NAL start, NAL end) of each NAL unit in Annex-B data; trailing zero
    bytes are not part of a NAL unit."""
    starts = []
    i = data.find(b"\x00\x00\x01")
    while i != -1:
        starts.append(i)
        i = data.find(b"\x00\x00\x01", i + 3)
    out = []
    for k, st in enumerate(starts):
        code = st - 1 if st > 0 and data[st - 1] == 0 else st
        end = starts[k + 1] if k + 1 < len(starts) else len(data)
        end = len(data[st + 3:end].rstrip(b"\x00")) + st + 3
        out.append((code, st + 3, end))
    return out


def clip_units(name: str) -> list[bytes]:
    """The clip's access units as libx264 made them (one packet each); for a clip with SPS/PPS
    only at the start, those are taken out of every access unit but the first."""
    if name in _CLIP_CACHE:
        return _CLIP_CACHE[name]
    import av  # from target/e2e-venv (tests/e2e/requirements.txt)
    import fractions
    import numpy as np

    c, (w, h) = CLIPS[name], CLIP_SIZE
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
    enc.time_base, enc.framerate = fractions.Fraction(1, 30), fractions.Fraction(30, 1)
    enc.options = {
        "profile": c["profile"], "preset": "veryfast", "tune": "zerolatency", "threads": "1",
        "x264-params": f"keyint={c['keyint']}:min-keyint={c['keyint']}:scenecut=0:bframes=0:aud=1:threads=1",
    }
    units: list[bytes] = []
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(c["frames"]):
        y = ((xx * 255 // w + i * 4) % 256).astype(np.uint8)
        x0 = (i * 7) % (w - 60)
        y[h // 3 : h // 3 + 60, x0 : x0 + 60] = 235
        # A band of fresh noise: P pictures of a realistic size.
        y[2 * h // 3 : 2 * h // 3 + 48, :] = np.random.default_rng(i).integers(60, 200, (48, w), dtype=np.uint8)
        frame = av.VideoFrame(w, h, "yuv420p")
        frame.planes[0].update(np.ascontiguousarray(y))
        frame.planes[1].update(np.full((h // 2, w // 2), 128 + i % 32, np.uint8))
        frame.planes[2].update(np.full((h // 2, w // 2), 100, np.uint8))
        frame.pts = i
        units += [bytes(p) for p in enc.encode(frame)]
    units += [bytes(p) for p in enc.encode(None)]
    if len(units) != c["frames"]:
        die(f"libx264 made {len(units)} access units for {c['frames']} frames")
    if not c["every_idr"]:
        units = [units[0]] + [
            b"".join(u[a:e] for a, n, e in nal_units(u) if u[n] & 0x1F not in (7, 8)) for u in units[1:]
        ]
    _CLIP_CACHE[name] = units
    return units


def nal_types(au: bytes) -> list[int]:
    return [au[n] & 0x1F for _, n, _ in nal_units(au)]


def as_passed_through(units: list[bytes]) -> list[bytes]:
    """Each access unit as rtcam sends it: IDRs without SPS/PPS get the last ones before them
    (4-byte start codes) after the leading delimiter; everything else unchanged."""
    out, sps, pps = [], None, None
    for u in units:
        nals = nal_units(u)
        types = [u[n] & 0x1F for _, n, _ in nals]
        for (a, n, e), t in zip(nals, types):
            if t == 7:
                sps = u[n:e]
            if t == 8:
                pps = u[n:e]
        if 5 in types and not (7 in types and 8 in types) and sps and pps:
            cut = nals[1][0] if types[0] == 9 else 0
            u = u[:cut] + b"\x00\x00\x00\x01" + sps + b"\x00\x00\x00\x01" + pps + u[cut:]
        out.append(u)
    return out


def walk(data: bytes, forms: list[bytes]) -> tuple[list[int], int | None]:
    """Which of the clip's access units (as passed through) `data` is made of, in order: the
    successor of the previous one first, any other after a gap. (indices, byte offset where
    nothing matches or None)."""
    out, at, n = [], 0, len(forms)
    while at < len(data):
        order = ([(out[-1] + 1) % n] if out else []) + list(range(n))
        hit = next((i for i in order if data.startswith(forms[i], at)), None)
        if hit is None:
            return out, at
        out.append(hit)
        at += len(forms[hit])
    return out, None


# --- checks --------------------------------------------------------------------------------


def decode(path: Path):
    import av  # from target/e2e-venv (tests/e2e/requirements.txt)

    planes = []
    with av.open(str(path), format="h264") as c:
        for frame in c.decode(video=0):
            planes.append(frame.to_ndarray(format="yuv420p"))
    return planes


def bar_samples(yuv, w: int, h: int):
    """Mean Y, Cb, Cr at the centre of each of the 8 bands, rows 55-80% down (below vivid's
    text overlay)."""
    import numpy as np

    y = yuv[:h].astype(np.float64)
    u = yuv[h : h + h // 4].reshape(h // 2, w // 2).astype(np.float64)
    v = yuv[h + h // 4 :].reshape(h // 2, w // 2).astype(np.float64)
    r0, r1 = int(h * 0.55), int(h * 0.80)
    out = []
    for i in range(8):
        cx = int((i + 0.5) * w / 8)
        half = max(2, w // 64)
        out.append(
            (
                y[r0:r1, cx - half : cx + half].mean(),
                u[r0 // 2 : r1 // 2, (cx - half) // 2 : (cx + half) // 2].mean(),
                v[r0 // 2 : r1 // 2, (cx - half) // 2 : (cx + half) // 2].mean(),
            )
        )
    return out


class Checker:
    def __init__(self, arch: Arch, results: Path) -> None:
        self.arch = arch
        self.results = results
        self.failures: list[str] = []
        self.rows: list[dict] = []

    def fail(self, case: Case, msg: str) -> None:
        self.failures.append(f"{self.arch.name} {case.name}: {msg}")

    def load(self, case: Case):
        rc_file = self.results / f"{case.name}.rc"
        if not rc_file.exists():
            self.fail(case, "the guest produced no result (see the console log)")
            return None, None, ""
        rc = int(rc_file.read_text().strip() or -1)
        log = (self.results / f"{case.name}.log").read_text(errors="replace")
        lines = [l for l in (self.results / f"{case.name}.json").read_text().splitlines() if l.startswith("{")]
        summary = json.loads(lines[-1]) if lines else None
        return rc, summary, log

    def check_m2m(self, case: Case) -> None:
        """rtcam's M2M encoder against vicodec: every frame through, drain, restart, controls,
        and the decoded pictures are vivid's colour bars."""
        import numpy as np

        rc, s, log = self.load(case)
        if rc is None:
            return
        if rc != 0 or s is None:
            self.fail(case, f"rtcam m2m-check exited {rc}; log tail:\n{log[-1500:]}")
            return
        st = s["stats"]
        controls = {name: outcome for name, outcome in s["controls"]}
        print(f"vmtest: {self.arch.name} {case.name}: encoder {s['encoder']['path']} ({s['encoder']['card']}, "
              f"{'multi' if s['encoder']['mplane'] else 'single'}-planar), decoder {s['decoder']['path']}; camera "
              f"buffers {'offered for import' if s['input'] == 'dmabuf' else 'copied'}; controls {controls}; "
              f"keyframe request: {s['keyframe_request']}")
        for seg in s["segments"]:
            print(f"vmtest: {self.arch.name} {case.name}: {seg['width']}x{seg['height']}: {seg['input']}, "
                  f"{seg['bytes_copied_per_frame']} bytes copied per frame"
                  + (f" ({seg['dmabuf_refused']})" if seg["dmabuf_refused"] else ""))
        print(f"vmtest: {self.arch.name} {case.name}: mid-stream drain {s['mid_drain']}, final drain "
              f"{s['final_drain_units']} units, {st['initializations']} initialisations, {st['drains']} drains, "
              f"{st['last_buffers']} LAST buffers, {st['eos_events']} EOS events, {st['corrupt_units']} corrupt; "
              f"{s['encode_ms']} ms capture+encode, {s['duration_ms']} ms in all")
        if s["input"] != case.fmt:
            self.fail(case, f"input {s['input']}, asked {case.fmt}")
        if s["encoder"]["mplane"] != case.mplane or s["decoder"]["mplane"] != case.mplane:
            self.fail(case, f"expected {'multi' if case.mplane else 'single'}-planar codec nodes: {s['encoder']}")
        if controls.get("gop_size") != {"applied": M2M_GOP}:
            self.fail(case, f"the GOP control was not applied: {controls}")
        if controls.get("bitrate") != "unsupported":
            self.fail(case, f"vicodec has no bitrate control, yet: {controls.get('bitrate')}")
        if not s["keyframe_request"].startswith("unavailable") or "FORCE_KEY_FRAME" not in s["keyframe_request"]:
            self.fail(case, f"forced keyframes on vicodec must be reported unavailable: {s['keyframe_request']!r}")
        if not s["mid_drain"] or s["mid_drain"]["phase"] != "Stopped":
            self.fail(case, f"the mid-stream drain did not end in Stopped: {s['mid_drain']}")
        if st["last_buffers"] < 2 or st["drains"] < 2:
            self.fail(case, f"expected two drains ending in LAST buffers: {st}")
        if st["initializations"] != len(M2M_SIZES):
            self.fail(case, f"{st['initializations']} initialisations for {len(M2M_SIZES)} sizes")
        if st["corrupt_units"]:
            self.fail(case, f"{st['corrupt_units']} corrupt units")
        if s["phase_at_end"] != "Stopped":
            self.fail(case, f"phase after the final drain: {s['phase_at_end']}")
        for seg, (w, h) in zip(s["segments"], M2M_SIZES):
            row = {
                "arch": self.arch.name, "case": f"{case.name} {w}x{h}", "format": f"YU12>FWHT {seg['input']}",
                "size": f"{seg['width']}x{seg['height']}", "stride": w, "captured": seg["frames_in"],
                "decoded": seg["decoded"], "copied/frame": seg["bytes_copied_per_frame"], "encoder": "vicodec",
                "bars": "-",
            }
            self.rows.append(row)
            # DMABUF where the layouts match: vivid's 640x480 YU12 buffers are what vicodec
            # reads; at 640x360 vicodec wants 368-line buffers, so that size is copied.
            want_input = "dmabuf" if case.fmt == "dmabuf" and h % 16 == 0 else "mmap"
            want_copied = 0 if want_input == "dmabuf" else w * h * 3 // 2
            if seg["input"] != want_input or seg["bytes_copied_per_frame"] != want_copied:
                self.fail(case, f"{w}x{h}: input {seg['input']} copying {seg['bytes_copied_per_frame']} bytes per "
                          f"frame ({seg['dmabuf_refused']}); expected {want_input}, {want_copied}")
            if (seg["width"], seg["height"]) != (w, h):
                self.fail(case, f"segment {seg['width']}x{seg['height']}, asked {w}x{h}")
            if not (seg["frames_in"] == seg["units"] == seg["decoded"] == case.frames):
                self.fail(case, f"{w}x{h}: {seg['frames_in']} frames in, {seg['units']} encoded, {seg['decoded']} "
                          f"decoded; expected {case.frames} each")
            # A stream starts at each (re)start: the first frame, and in the first segment the
            # frame after the mid-stream drain (resumed by restarting the CAPTURE queue). From
            # each start, a keyframe every M2M_GOP frames and none between (vivid's changing
            # status text makes prediction pay, so vicodec codes P-frames).
            starts = [0]
            if seg is s["segments"][0] and s["mid_drain"]:
                starts.append(s["mid_drain"]["at_frame"] + 1)
            want_i = set()
            for a, b in zip(starts, starts[1:] + [case.frames]):
                want_i |= set(range(a, b, M2M_GOP))
            if seg["iframes"] != sorted(want_i):
                self.fail(case, f"{w}x{h}: I-frames at {seg['iframes']}, expected {sorted(want_i)} "
                          "(GOP control; a keyframe first after every restart)")
            path = self.results / case.name / Path(seg["decoded_file"]).name
            frame_len = w * h * 3 // 2
            data = np.fromfile(path, dtype=np.uint8) if path.exists() else np.zeros(0, np.uint8)
            if data.size != frame_len * seg["decoded"]:
                self.fail(case, f"{path.name}: {data.size} bytes for {seg['decoded']} pictures of {w}x{h}")
                continue
            frames = data.reshape(-1, frame_len)
            bad, dy, dc = [], 0.0, 0.0
            for f in (frames[0], frames[len(frames) // 2], frames[-1]):
                for (name, ey, eu, ev), (y, u, v) in zip(BARS, bar_samples(f.reshape(h * 3 // 2, w), w, h)):
                    dy, dc = max(dy, abs(y - ey)), max(dc, abs(u - eu), abs(v - ev))
                    if abs(y - ey) > Y_TOLERANCE or abs(u - eu) > C_TOLERANCE or abs(v - ev) > C_TOLERANCE:
                        bad.append(f"{name}: got Y{y:.0f} Cb{u:.0f} Cr{v:.0f}, want Y{ey} Cb{eu} Cr{ev}")
            row["bars"] = f"{'ok' if not bad else 'BAD'} (max |dY| {dy:.0f}, |dC| {dc:.0f}), I@{seg['iframes']}"
            if bad:
                self.fail(case, f"{w}x{h}: decoded colour bars wrong: " + "; ".join(bad))

    def check_probe(self, case: Case) -> None:
        rc, _, log = self.load(case)
        if rc is None:
            return
        text = (self.results / f"{case.name}.json").read_text(errors="replace")
        print(f"vmtest: {self.arch.name} rtcam probe:")
        for line in text.splitlines():
            print(f"    {line}")
        expected = [
            '/dev/video0  "vivid-000-vid-cap"  vivid (driver vivid)',
            "YU12: 6 sizes, 320x180 .. 3840x2160",
            '/dev/video3  "RGB/YUV Capture"  vimc (driver vimc)',
            "VIMC MDEV: sub-devices:",
            "Sensor A",
            "vicodec (vicodec, single-planar): takes YU12",
            "-> gives FWHT",
            "openh264 (software, built in)",
            "camera: /dev/video0 in YU12 at 640x360 30 fps: format = auto: the first rtcam takes that does",
            "encoder: openh264: auto: openh264, since no V4L2 H.264 encoder fits (/dev/video4: not an H.264 "
            "encoder (produces FWHT)",
        ]
        missing = [e for e in expected if e not in text]
        if rc != 0 or missing:
            self.fail(case, f"rtcam probe (exit {rc}) lacks {missing}; stderr: {log[-500:]}")

    def check_loopback(self, case: Case) -> dict | None:
        """H.264 passthrough: bit-exact recording of the fed clip from an IDR, the late
        subscriber's start from the GOP cache, parameter sets put in front, garbage counted."""
        rc, s, log = self.load(case)
        if rc is None:
            return None
        feed_log = (self.results / f"{case.name}.feed.log").read_text(errors="replace")
        plan_lines = [l for l in (self.results / f"{case.name}.feed.json").read_text().splitlines() if l.startswith("{")]
        if rc != 0 or s is None or not plan_lines:
            self.fail(case, f"rtcam record exited {rc}; feeder: {feed_log[-400:]!r}; log tail:\n{log[-1500:]}")
            return None
        plan = json.loads(plan_lines[-1])
        units = clip_units(case.clip)
        forms = as_passed_through(units)
        idr = [i for i, u in enumerate(units) if 5 in nal_types(u)]
        if plan["access_units"] != len(units) or plan["idr"] != idr:
            self.fail(case, f"rtcam feed-h264 split the clip into {plan['access_units']} access units (IDRs "
                      f"{plan['idr']}); libx264 made {len(units)} (IDRs {idr})")
        rec = (self.results / f"{case.name}.h264").read_bytes()
        seq, bad_at = walk(rec, forms)
        frames = decode(self.results / f"{case.name}.h264")
        w, h = s["width"], s["height"]
        row = {
            "arch": self.arch.name, "case": case.name, "format": s["pixel_format"], "size": f"{w}x{h}",
            "stride": s["stride"], "captured": s["frames"], "decoded": len(frames),
            "copied/frame": s["bytes_copied_per_frame"], "encoder": (s.get("encoder") or {}).get("backend", "?"),
            "cpu ms/frame": f"{s['cpu_ms_per_frame']:.3f}", "bars": "-",
        }
        self.rows.append(row)
        if bad_at is not None:
            self.fail(case, f"the recording is not the clip: no access unit of it matches at byte {bad_at} "
                      f"(after {len(seq)} that did)")
            return row
        gaps = [k for k in range(1, len(seq)) if seq[k] != (seq[k - 1] + 1) % len(units)]
        prepended = sum(1 for i in seq if forms[i] != units[i])
        sps = next(u[n + 1 : n + 4].hex() for u in units for _, n, _ in nal_units(u) if u[n] & 0x1F == 7)
        enc = s.get("encoder") or {}
        problems = []
        if len(seq) != s["frames"] or s["frames"] != case.frames or len(frames) != len(seq):
            problems.append(f"{s['frames']} frames recorded, {len(seq)} access units found, {len(frames)} decoded; "
                            f"asked {case.frames}")
        if not seq or seq[0] not in idr:
            problems.append(f"the recording starts at access unit {seq[:1]}, not an IDR ({idr})")
        for k in gaps:
            # A frame the driver lost: rtcam must drop what follows until an IDR.
            if seq[k] not in idr:
                problems.append(f"after a gap the recording goes on at access unit {seq[k]}, not an IDR")
        if (s["pixel_format"], w, h) != ("H264", *CLIP_SIZE):
            problems.append(f"summary says {s['pixel_format']} {w}x{h}")
        if (enc.get("backend"), enc.get("input")) != ("camera", "passthrough"):
            problems.append(f"encoder {enc}, expected the camera's own H.264 passed through")
        if "FORCE_KEY_FRAME" not in (enc.get("keyframes_unavailable") or ""):
            problems.append(f"v4l2loopback has no force-keyframe control, yet: {enc}")
        if s.get("profile_level_id") != sps:
            problems.append(f"profile_level_id {s.get('profile_level_id')}, the clip's SPS says {sps}")
        if s["bytes_copied_per_frame"] <= 0:
            problems.append("no bytes copied out of the camera's buffer?")
        garbage = CLIPS[case.clip]["garbage_every"]
        if garbage and s["frames_corrupt"] < 1:
            problems.append(f"the feeder wrote a garbage buffer every {garbage} access units; frames_corrupt is 0")
        # Without garbage only frames the driver lost make corrupt ones: those after each loss
        # until an IDR (a gap in the recording; one more loss may fall before it started).
        keyint = CLIPS[case.clip]["keyint"]
        if not garbage and s["frames_corrupt"] > (len(gaps) + 1) * keyint:
            problems.append(f"frames_corrupt {s['frames_corrupt']} without garbage, with {len(gaps)} gaps")
        if not CLIPS[case.clip]["every_idr"] and prepended < 1:
            problems.append("no IDR needed SPS/PPS put in front: the case does not test that")
        # The second subscriber: its first frame is an IDR from the cache, from before it
        # joined, and what it got is the main recording from that IDR on.
        j = s.get("join") or {}
        jrec = (self.results / f"{case.name}.join.h264").read_bytes() if j else b""
        jseq, jbad = walk(jrec, forms)
        jframes = decode(self.results / f"{case.name}.join.h264") if jrec else []
        if not j or jbad is not None or not jseq:
            problems.append(f"the second subscriber's recording is not the clip ({j}, no match at {jbad})")
        else:
            starts = [k for k in range(len(seq)) if seq[k : k + len(jseq)] == jseq[: len(seq) - k] and len(seq) - k > j["preroll_frames"]]
            if jseq[0] not in idr or not j["first_keyframe"]:
                problems.append(f"the second subscriber starts at access unit {jseq[0]}, not an IDR")
            # Only a loss just before the join (the cache is reset, and what follows waits for
            # an IDR) leaves nothing cached: then the recording has a gap between the join
            # and where the second subscriber starts, at an IDR.
            k0 = starts[0] if starts else -1
            reset_by_loss = any(case.join_at <= g <= k0 for g in gaps) and seq[k0] in idr
            if reset_by_loss and j["preroll_frames"] == 0:
                print(f"vmtest: {self.arch.name} {case.name}: the driver lost frames just before the "
                      f"second subscriber joined (gaps at {gaps}): it started live at the next IDR")
            elif j["preroll_frames"] < 1 or j["first_seq"] > j["joined_after_seq"]:
                problems.append(f"the second subscriber did not start from the cached GOP: {j}")
            if not starts:
                problems.append(f"the second subscriber's frames {jseq[:5]}... are not the main recording's")
            if len(jframes) != len(jseq):
                problems.append(f"second subscriber: {len(jseq)} access units, {len(jframes)} decoded")
            row["bars"] = (f"bit-exact, {len(gaps) + 1} run(s), {prepended} IDR(s) given SPS/PPS, "
                           f"{s['frames_corrupt']} corrupt dropped; join: IDR {jseq[0]} + {max(j['preroll_frames'] - 1, 0)} "
                           f"cached{' (none: a loss reset the cache)' if not j['preroll_frames'] else ''}, then live "
                           f"({len(jseq)} frames)")
        print(f"vmtest: {self.arch.name} {case.name}: clip {case.clip} ({len(units)} access units, IDRs {idr}, "
              f"SPS {sps}); recorded {seq[:3]}..{seq[-1:]} ({len(seq)}), gaps at {gaps}; join {j}; "
              f"encoder {enc}; {s['cpu_ms_per_frame']:.3f} ms CPU per frame")
        for p in problems:
            self.fail(case, p)
        return row

    def check(self, case: Case) -> dict | None:
        if case.kind == "probe":
            self.check_probe(case)
            return None
        if case.kind == "loopback":
            return self.check_loopback(case)
        if case.kind == "m2m":
            self.check_m2m(case)
            return None
        rc, s, log = self.load(case)
        if rc is None:
            return None
        if case.kind == "refused":
            if rc == 0 or "between 0 and 255" not in log:
                self.fail(case, f"out-of-range brightness was not refused (exit {rc}): {log[-300:]}")
            else:
                print(f"vmtest: {self.arch.name} {case.name}: refused as expected: "
                      f"{[l for l in log.splitlines() if 'between' in l][-1].strip()}")
            return None
        if rc != case.expect_rc or s is None:
            self.fail(case, f"rtcam record exited {rc}; log tail:\n{log[-1500:]}")
            return None
        frames = decode(self.results / f"{case.name}.h264")
        w, h = s["width"], s["height"]
        row = {
            "arch": self.arch.name, "case": case.name, "format": s["pixel_format"],
            "size": f"{w}x{h}", "stride": s["stride"], "captured": s["frames"],
            "decoded": len(frames), "copied/frame": s["bytes_copied_per_frame"], "bars": "-",
            "s": s, "frames": frames, "cpu ms/frame": f"{s.get('cpu_ms_per_frame', 0):.3f}",
        }
        if s["frames"] != case.frames or len(frames) != case.frames:
            self.fail(case, f"asked {case.frames} frames: rtcam wrote {s['frames']}, decoded {len(frames)}")
        if (w, h) != (case.width, case.height):
            self.fail(case, f"summary says {w}x{h}, asked {case.width}x{case.height}")
        for i, f in enumerate(frames):
            if f.shape != (h * 3 // 2, w):
                self.fail(case, f"decoded frame {i} is {f.shape[1]}x{f.shape[0] * 2 // 3}, not {w}x{h}")
                break
        enc = s.get("encoder") or {}
        row["encoder"] = enc.get("backend", "?")
        if case.kind in ("plain", "libcamera", "fault"):
            wanted_v4l2 = case.extra_env.get("RTCAM__ENCODER__BACKEND") == "v4l2"
            fallback = enc.get("fallback") or ""
            if enc.get("backend") != "openh264":
                self.fail(case, f"expected openh264 (no H.264 M2M node in the guest): {enc}")
            elif wanted_v4l2 and "no V4L2 H.264 encoder fits" not in fallback:
                self.fail(case, f"encoder.backend = v4l2 without such a node must say why openh264 runs: {enc}")
            elif not wanted_v4l2 and (fallback or "auto: openh264, since no V4L2 H.264 encoder fits" not in enc.get("reason", "")):
                self.fail(case, f"auto must choose openh264 with its reason and no fallback: {enc}")
            elif wanted_v4l2:
                print(f"vmtest: {self.arch.name} {case.name}: encoder {enc}")
        if case.fmt and s["pixel_format"] != case.fmt:
            self.fail(case, f"pixel format {s['pixel_format']}, asked {case.fmt}")
        natural = w * {"YUYV": 2, "RGB3": 3, "BGR3": 3}.get(s["pixel_format"], 1)
        if case.stride_align:
            want = -(-natural // case.stride_align) * case.stride_align
            if s["stride"] != want or s["stride"] == w:
                self.fail(case, f"stride {s['stride']}: expected {want} (padded, != width {w})")
        elif s["stride"] != natural:
            self.fail(case, f"stride {s['stride']}: expected the driver's {natural}")
        copied = s["bytes_copied_per_frame"]
        if s["pixel_format"] == "YU12" and copied != 0:
            self.fail(case, f"YU12 must be zero-copy, but {copied} bytes were copied per frame")
        if s["pixel_format"] != "YU12" and copied <= 0:
            self.fail(case, f"{s['pixel_format']} is converted, yet bytes copied is {copied}")
        if case.kind == "libcamera":
            mapped = [l for l in log.splitlines() if "V4L2Compat" in l and f"Opened {case.device} -> fd" in l]
            version = [l for l in log.splitlines() if "libcamera v" in l]
            if not mapped or not version:
                self.fail(case, f"libcamera's V4L2 compatibility layer did not map {case.device} to a camera "
                          f"(no 'Opened {case.device} -> fd' in the log): rtcam did not read through libcamera")
            else:
                row["case"] += f" ({version[0].split('libcamera ', 1)[1].strip()})"
        if frames and case.kind in ("plain", "libcamera") and "brightness" not in case.controls:
            bad = []
            dy = dc = 0.0
            # First, middle and last frame: the picture is right throughout, not only once.
            for f in (frames[0], frames[len(frames) // 2], frames[-1]):
                for (name, ey, eu, ev), (y, u, v) in zip(BARS, bar_samples(f, w, h)):
                    dy, dc = max(dy, abs(y - ey)), max(dc, abs(u - eu), abs(v - ev))
                    if abs(y - ey) > Y_TOLERANCE or abs(u - eu) > C_TOLERANCE or abs(v - ev) > C_TOLERANCE:
                        bad.append(f"{name}: got Y{y:.0f} Cb{u:.0f} Cr{v:.0f}, want Y{ey} Cb{eu} Cr{ev}")
            row["bars"] = f"{'ok' if not bad else 'BAD'} (max |dY| {dy:.0f}, |dC| {dc:.0f})"
            if bad:
                self.fail(case, "colour bars wrong: " + "; ".join(bad))
        self.rows.append(row)
        return row


def check_drivers(checker: Checker) -> None:
    """Every guest module loaded and each test driver created its nodes (fails by name)."""
    arch = checker.arch.name
    mods_file, nodes_file = checker.results / "modules.txt", checker.results / "nodes.txt"
    if not mods_file.exists() or not nodes_file.exists():
        checker.failures.append(f"{arch}: the guest wrote no modules.txt/nodes.txt (see the console log)")
        return
    loaded = dict(line.split() for line in mods_file.read_text().splitlines() if line.strip())
    for name, rc in loaded.items():
        if rc != "0":
            log = (checker.results / "insmod.log").read_text(errors="replace").strip()
            checker.failures.append(f"{arch}: MISSING: kernel module {name} did not load (insmod exit {rc}): {log[-300:]}")
    v4l2, media = {}, {}
    for line in nodes_file.read_text().splitlines():
        kind, node, name = (line.split(" ", 2) + ["", ""])[:3]
        (v4l2 if kind == "v4l2" else media)[name] = node
    for driver, (names, models) in EXPECTED_NODES.items():
        found = [f"{v4l2[n]} {n!r}" for n in names if n in v4l2] + [f"{media[m]} {m!r}" for m in models if m in media]
        missing = [n for n in names if n not in v4l2] + [m for m in models if m not in media]
        print(f"vmtest: {arch}: {driver}: {', '.join(found) or 'no nodes'}")
        if missing:
            checker.failures.append(f"{arch}: MISSING: {driver} did not create {', '.join(map(repr, missing))} "
                                    f"(module loaded: {loaded.get(driver, 'not in the guest')})")


def run_arch(
    arch: Arch, rtcam: Path, cache: Path, timeout_s: int, extra_modules: Path, libcamera: Path | None,
    only: str | None = None,
) -> tuple[list[dict], list[str], float, int]:
    if not rtcam.is_file():
        die(f"{arch.name}: rtcam binary not found at {rtcam}")
    kind = subprocess.run(["file", "-L", str(rtcam)], capture_output=True, text=True).stdout
    want = "x86-64" if arch.name == "x86_64" else "aarch64"
    if want not in kind:
        die(f"{rtcam} is not a {arch.name} executable: {kind.strip()}")
    work = cache / arch.deb_arch / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    case_list = cases(arch, libcamera is not None)
    if only:
        case_list = [c for c in case_list if re.search(only, c.name)]
        print(f"vmtest: {arch.name}: PARTIAL RUN (--only {only!r}): {', '.join(c.name for c in case_list)}")
    start = time.monotonic()
    vmlinuz, initramfs = build_initramfs(arch, cache, rtcam, case_list, work, extra_modules, libcamera)
    results = boot(arch, vmlinuz, initramfs, work, timeout_s)
    elapsed = time.monotonic() - start
    checker = Checker(arch, results)
    check_drivers(checker)
    by_name = {}
    for c in case_list:
        row = checker.check(c)
        if row:
            by_name[c.name] = row
    names = {c.name for c in case_list}
    if {"brightness-64", "brightness-192", BRIGHTNESS_BASE} <= names:
        check_brightness(checker, case_list, by_name)
    if "fault" in names:
        check_fault(checker, case_list, by_name)
    if not only and not {"brightness-64", "fault"} <= names:
        checker.failures.append(f"{arch.name}: the brightness and fault cases are missing")
    return checker.rows, checker.failures, elapsed, len(case_list)


def mean_luma(row: dict) -> float:
    """Mean luma of the bars (rows 55-80% down) in the last frame of a clip."""
    h = row["s"]["height"]
    return float(row["frames"][-1][int(h * 0.55) : int(h * 0.8), :].mean())


def check_brightness(checker: Checker, case_list: list[Case], rows: dict) -> None:
    base, dark, bright = rows.get(BRIGHTNESS_BASE), rows.get("brightness-64"), rows.get("brightness-192")
    case = next(c for c in case_list if c.name == "brightness-64")
    if not (base and dark and bright):
        checker.fail(case, "brightness cases missing")
        return
    lum = {r["case"]: mean_luma(r) for r in (base, dark, bright)}
    applied = (dark["s"]["controls"].get("brightness"), bright["s"]["controls"].get("brightness"))
    ok = applied == (64, 192) and lum["brightness-64"] + 20 < lum[BRIGHTNESS_BASE] < lum["brightness-192"] - 20
    verdict = "ok" if ok else "BAD"
    for r in (dark, bright):
        r["bars"] = f"luma {lum[r['case']]:.0f} vs {lum[BRIGHTNESS_BASE]:.0f} at 128 ({verdict})"
    print(
        f"vmtest: {checker.arch.name}: brightness via rtcam's control path: applied {applied}; mean luma "
        f"64 -> {lum['brightness-64']:.1f}, default 128 -> {lum[BRIGHTNESS_BASE]:.1f}, "
        f"192 -> {lum['brightness-192']:.1f}: {verdict}"
    )
    if not ok:
        checker.fail(case, f"luma does not follow brightness: {lum}, applied {applied}")


def check_fault(checker: Checker, case_list: list[Case], rows: dict) -> None:
    case = next(c for c in case_list if c.kind == "fault")
    row = rows.get(case.name)
    if not row:
        checker.fail(case, "fault case produced no clip")
        return
    s = row["s"]
    back_file = checker.results / f"{case.name}.back_ms"
    gone_file = checker.results / f"{case.name}.gone_ms"
    back_ms, gone_ms = int(back_file.read_text()), int(gone_file.read_text())
    log = (checker.results / f"{case.name}.log").read_text(errors="replace")
    errors = [
        l for l in log.splitlines()
        if (" ERROR " in l or " WARN " in l)
        and any(m in l for m in ("capture failed", "cannot start capture", "cannot open the camera"))
    ]
    after = [i for i in s["interruptions"] if i["resumed_unix_ms"] > back_ms - 1000]
    resume = (after[0]["resumed_unix_ms"] - back_ms) / 1000 if after else None
    row["bars"] = f"resumed {resume:.2f}s after return" if resume is not None else "NO RESUME"
    print(f"vmtest: {checker.arch.name}: fault: vivid.0 unbound at {gone_ms}, bound again at {back_ms} (unix ms); "
          f"rtcam: {s['source_errors']} camera errors, interruptions {s['interruptions']}")
    for l in errors[:3]:
        print(f"    rtcam log: {l.strip()[:220]}")
    if s["source_errors"] < 1 or not errors:
        checker.fail(case, "rtcam did not report the camera error")
    if not s["interruptions"] or not s["interruptions"][0]["last_frame_unix_ms"] <= gone_ms + 500:
        checker.fail(case, f"no interruption around the unbind: {s['interruptions']}")
    if resume is None or resume > 3.0:
        checker.fail(case, f"capture resumed {resume} s after the device returned (limit 3 s)")


def print_table(rows: list[dict]) -> None:
    cols = ["arch", "case", "format", "size", "stride", "captured", "decoded", "copied/frame", "encoder",
            "cpu ms/frame", "bars"]
    widths = {c: max([len(c)] + [len(str(r.get(c, "-"))) for r in rows]) for c in cols}
    print()
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "-")).ljust(widths[c]) for c in cols))
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", action="append", choices=sorted(ARCHES), required=True)
    ap.add_argument("--rtcam", action="append", required=True, help="rtcam binary per --arch, in order")
    ap.add_argument("--modules", action="append", required=True, type=Path,
                    help="test driver modules (tests/vm/build-modules.sh) per --arch, in order")
    ap.add_argument("--libcamera", action="append", required=True,
                    help="unpacked Debian libcamera packages per --arch, in order ('none': no libcamera cases)")
    ap.add_argument("--cache", type=Path, default=REPO / "target/vm")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per VM")
    ap.add_argument("--only", help="development: run only the cases whose name matches this regex (a partial run)")
    a = ap.parse_args()
    if not len(a.arch) == len(a.rtcam) == len(a.modules) == len(a.libcamera):
        die("give one --rtcam, --modules and --libcamera per --arch")
    all_rows, all_failures = [], []
    for name, binary, modules, libcamera in zip(a.arch, a.rtcam, a.modules, a.libcamera):
        libcamera_root = None if libcamera == "none" else Path(libcamera)
        rows, failures, elapsed, n_cases = run_arch(
            ARCHES[name], Path(binary), a.cache, a.timeout, modules, libcamera_root, a.only
        )
        print(f"vmtest: {name}: initramfs + boot + {n_cases} cases: {elapsed:.1f} s", flush=True)
        all_rows += rows
        all_failures += failures
    print_table(all_rows)
    if all_failures:
        for f in all_failures:
            print(f"FAIL: {f}")
        sys.exit(1)
    partial = f" (PARTIAL RUN: --only {a.only!r})" if a.only else ""
    print(f"vmtest: all checks passed ({len(all_rows)} clips){partial}")


if __name__ == "__main__":
    main()
