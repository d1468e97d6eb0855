"""rtcam test pattern (docs/protocol.md section 5.1): independent Python reference.

Written from the protocol document only, not from rtcam's source:

* ``b = 2 * floor(width / 80)``.
* Row 0 (``y`` in ``[0, b)``): 40 cells ``b`` px wide from ``x = 0``; cell ``i`` is white
  (luma 235) when bit ``39 - i`` of ``seq40`` is 1, black (luma 16) otherwise.
* Row 1 (``y`` in ``[b, 2b)``): the same for ``ts40``.
* ``x40 = x << 8 | crc8(x)``; CRC-8 poly 0x07, init 0, no reflection, no final xor, over
  the four big-endian bytes of the value.
* A bit is read by averaging the luma of the middle half of its cell: ``> 128`` is 1.
* Below row 1: eight vertical 75 % colour bars over the full width; bar ``k`` covers the
  columns ``x`` with ``floor(8x / width) = k``.
* A grey box (Y = U = V = 128) of side ``box = min(4b, height/2)`` rounded down to even,
  top edge at ``y = height / 2``, left edge at ``x = floor(seq * b / 4) mod (width - box)``.

``decode_frame`` takes a yuv420p frame as produced by PyAV's
``VideoFrame.to_ndarray(format="yuv420p")`` (shape ``(h * 3 // 2, w)``) and returns a
``PatternReading``. ``render_frame`` builds a synthetic frame the same way, used to test
the decoder itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STAMP_BITS = 40
WHITE = 235
BLACK = 16
# (Y, U, V) of the eight bars, left to right: white, yellow, cyan, green, magenta, red,
# blue, black at 75 % intensity, BT.601 limited range.
BARS = [
    (180, 128, 128),
    (162, 44, 142),
    (131, 156, 44),
    (112, 72, 58),
    (84, 184, 198),
    (65, 100, 212),
    (35, 212, 114),
    (16, 128, 128),
]
BAR_NAMES = ["white", "yellow", "cyan", "green", "magenta", "red", "blue", "black"]
BOX_YUV = (128, 128, 128)

# Tolerances for content checks after H.264 coding.
COLOUR_TOLERANCE = 20
BOX_POSITION_TOLERANCE_PX = 4


def crc8(value: int) -> int:
    """CRC-8 (poly 0x07, init 0, no reflection, no final xor) over 4 big-endian bytes."""
    crc = 0
    for byte in (value & 0xFFFFFFFF).to_bytes(4, "big"):
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def cell_size(width: int) -> int:
    return 2 * (width // 80)


def box_size(width: int, height: int) -> int:
    return min(4 * cell_size(width), height // 2) & ~1


def box_left(seq: int, width: int, height: int) -> int:
    return (seq * cell_size(width) // 4) % (width - box_size(width, height))


def bar_columns(k: int, width: int) -> tuple[int, int]:
    """[x0, x1) of bar k: the columns x with floor(8x / width) == k."""
    return -(-k * width // 8), -(-(k + 1) * width // 8)


def stamp40(value: int) -> int:
    value &= 0xFFFFFFFF
    return (value << 8) | crc8(value)


def split_planes(yuv: np.ndarray, width: int, height: int):
    """Split a packed yuv420p array (h*3/2 rows of w) into Y, U, V planes."""
    y = yuv[:height, :]
    chroma = yuv[height:, :].reshape(-1)
    cw, ch = width // 2, height // 2
    u = chroma[: cw * ch].reshape(ch, cw)
    v = chroma[cw * ch : 2 * cw * ch].reshape(ch, cw)
    return y, u, v


def render_frame(seq: int, ts: int, width: int = 640, height: int = 480) -> np.ndarray:
    """Synthetic frame per section 5.1, packed yuv420p like PyAV's to_ndarray output."""
    b = cell_size(width)
    y = np.zeros((height, width), np.uint8)
    u = np.zeros((height // 2, width // 2), np.uint8)
    v = np.zeros((height // 2, width // 2), np.uint8)
    bar_of_x = (8 * np.arange(width)) // width
    y[:, :] = np.array([c[0] for c in BARS], np.uint8)[bar_of_x]
    u[:, :] = np.array([c[1] for c in BARS], np.uint8)[bar_of_x[::2]]
    v[:, :] = np.array([c[2] for c in BARS], np.uint8)[bar_of_x[::2]]
    for row, value in ((0, seq), (1, ts)):
        bits = stamp40(value)
        y[row * b : (row + 1) * b, :] = BLACK
        u[row * b // 2 : (row + 1) * b // 2, :] = 128
        v[row * b // 2 : (row + 1) * b // 2, :] = 128
        for i in range(STAMP_BITS):
            if (bits >> (STAMP_BITS - 1 - i)) & 1:
                y[row * b : (row + 1) * b, i * b : (i + 1) * b] = WHITE
    size, left, top = box_size(width, height), box_left(seq, width, height), height // 2
    y[top : top + size, left : left + size] = BOX_YUV[0]
    u[top // 2 : (top + size) // 2, left // 2 : (left + size) // 2] = BOX_YUV[1]
    v[top // 2 : (top + size) // 2, left // 2 : (left + size) // 2] = BOX_YUV[2]
    return np.concatenate([y, u.reshape(-1, width), v.reshape(-1, width)], axis=0)


def _read_row(y: np.ndarray, row: int, b: int) -> tuple[int, int]:
    """Return (value, crc_read) of stamp row ``row``."""
    q = b // 4
    half = max(b // 2, 1)
    top = row * b + q
    band = y[top : top + half, : STAMP_BITS * b].astype(np.float32)
    # Middle half of each cell, horizontally: columns [i*b + b/4, i*b + b/4 + b/2).
    cells = band.reshape(band.shape[0], STAMP_BITS, b)[:, :, q : q + half]
    means = cells.mean(axis=(0, 2))
    bits = 0
    for m in means:
        bits = (bits << 1) | (1 if m > 128 else 0)
    return bits >> 8, bits & 0xFF


@dataclass
class PatternReading:
    seq: int | None = None
    ts: int | None = None
    crc_ok: bool = False
    bars_ok: bool = False
    box_ok: bool = False
    box_left_seen: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def pattern_ok(self) -> bool:
        return self.crc_ok and self.bars_ok and self.box_ok


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else float("nan")


def check_bars(y, u, v, width: int, height: int, problems: list[str]) -> bool:
    """Mean Y/U/V in the middle of every bar, between the stamp rows and the box."""
    b = cell_size(width)
    y0, y1 = 2 * b + 8, height // 2 - 8  # clear of the stamp rows and of the box
    ok = True
    for i, (ey, eu, ev) in enumerate(BARS):
        x0, x1 = bar_columns(i, width)
        w = x1 - x0
        mx0, mx1 = x0 + w // 4, x1 - w // 4
        got = (
            _mean(y[y0:y1, mx0:mx1]),
            _mean(u[y0 // 2 : y1 // 2, mx0 // 2 : mx1 // 2]),
            _mean(v[y0 // 2 : y1 // 2, mx0 // 2 : mx1 // 2]),
        )
        if any(abs(g - e) > COLOUR_TOLERANCE for g, e in zip(got, (ey, eu, ev))):
            ok = False
            problems.append(
                f"bar {i} ({BAR_NAMES[i]}) YUV=({got[0]:.0f},{got[1]:.0f},{got[2]:.0f}) "
                f"expected ({ey},{eu},{ev})"
            )
    return ok


def find_box(y, u, v, width: int, height: int) -> int | None:
    """Left edge of the longest run of grey (Y, U, V all near 128) in the box's middle row."""
    size = box_size(width, height)
    row = height // 2 + size // 2
    ys = y[row, :].astype(np.int16)
    us = np.repeat(u[row // 2, :], 2)[:width].astype(np.int16)
    vs = np.repeat(v[row // 2, :], 2)[:width].astype(np.int16)
    t = COLOUR_TOLERANCE
    grey = (np.abs(ys - 128) <= t) & (np.abs(us - 128) <= t) & (np.abs(vs - 128) <= t)
    best_len, best_start, run_start = 0, None, None
    for x, g in enumerate(np.append(grey, False)):
        if g and run_start is None:
            run_start = x
        elif not g and run_start is not None:
            if x - run_start > best_len:
                best_len, best_start = x - run_start, run_start
            run_start = None
    if best_start is None or best_len < size // 2:
        return None
    return best_start


def check_box(y, u, v, seq: int, width: int, height: int, reading: PatternReading) -> bool:
    size = box_size(width, height)
    left, top = box_left(seq, width, height), height // 2
    m = max(size // 8, 2)
    got = (
        _mean(y[top + m : top + size - m, left + m : left + size - m]),
        _mean(u[(top + m) // 2 : (top + size - m) // 2, (left + m) // 2 : (left + size - m) // 2]),
        _mean(v[(top + m) // 2 : (top + size - m) // 2, (left + m) // 2 : (left + size - m) // 2]),
    )
    ok = True
    if any(abs(g - 128) > COLOUR_TOLERANCE for g in got):
        ok = False
        reading.problems.append(
            f"box interior at x={left} YUV=({got[0]:.0f},{got[1]:.0f},{got[2]:.0f}) "
            "expected (128,128,128)"
        )
    seen = find_box(y, u, v, width, height)
    reading.box_left_seen = seen
    if seen is None:
        ok = False
        reading.problems.append(f"no grey box found in row {top + size // 2}")
    elif abs(seen - left) > BOX_POSITION_TOLERANCE_PX:
        ok = False
        reading.problems.append(f"grey box left edge at x={seen}, expected {left} for seq {seq}")
    return ok


def decode_frame(yuv: np.ndarray, width: int, height: int) -> PatternReading:
    """Read seq/ts and check CRC, colour bars and box of one decoded yuv420p frame."""
    r = PatternReading()
    if width < 160 or height < 120:
        r.problems.append(f"frame {width}x{height} too small for the pattern")
        return r
    y, u, v = split_planes(yuv, width, height)
    b = cell_size(width)
    seq, seq_crc = _read_row(y, 0, b)
    ts, ts_crc = _read_row(y, 1, b)
    r.seq, r.ts = seq, ts
    r.crc_ok = crc8(seq) == seq_crc and crc8(ts) == ts_crc
    if not r.crc_ok:
        r.problems.append(
            f"crc mismatch: seq={seq} crc {seq_crc:#04x} (want {crc8(seq):#04x}), "
            f"ts={ts} crc {ts_crc:#04x} (want {crc8(ts):#04x})"
        )
    r.bars_ok = check_bars(y, u, v, width, height, r.problems)
    r.box_ok = check_box(y, u, v, seq, width, height, r) if r.crc_ok else False
    return r
