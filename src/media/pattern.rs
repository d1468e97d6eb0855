//! Synthetic test-pattern frames with machine-readable frame number and timestamp (docs/protocol.md §5.1).

use super::frame::I420Buffer;

/// Cells per stamp row: 32 value bits and 8 CRC bits.
pub const STAMP_BITS: usize = 40;
const WHITE: u8 = 235;
const BLACK: u8 = 16;

/// 75 % colour bars, BT.601 limited range (Y, U, V).
pub const BARS: [(u8, u8, u8); 8] = [
    (180, 128, 128),
    (162, 44, 142),
    (131, 156, 44),
    (112, 72, 58),
    (84, 184, 198),
    (65, 100, 212),
    (35, 212, 114),
    (16, 128, 128),
];
/// The moving box's colour.
pub const BOX_YUV: (u8, u8, u8) = (128, 128, 128);

/// CRC-8, polynomial 0x07, init 0, no reflection, no final xor, over big-endian bytes.
pub fn crc8(value: u32) -> u8 {
    let mut crc = 0u8;
    for byte in value.to_be_bytes() {
        crc ^= byte;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x07
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Cell size `b` in pixels for a frame width.
pub fn cell_size(width: usize) -> usize {
    2 * (width / 80)
}

/// Geometry of the moving box for frame `seq`: (left, top, size).
pub fn box_geometry(width: usize, height: usize, seq: u32) -> (usize, usize, usize) {
    let b = cell_size(width);
    let size = (4 * b).min(height / 2) & !1;
    let travel = width.saturating_sub(size).max(1);
    let left = ((u64::from(seq) * b as u64 / 4) % travel as u64) as usize;
    (left, height / 2, size)
}

/// Rows of the optional noise band (`capture.test_pattern_noise`): one cell tall, one cell
/// below the box, clear of the stamp rows, of the bars' measuring area and of the box.
pub fn noise_rows(width: usize, height: usize) -> std::ops::Range<usize> {
    let (_, top, size) = box_geometry(width, height, 0);
    let b = cell_size(width);
    let start = (top + size + b).min(height);
    start..(start + b).min(height)
}

/// Fills `luma` with fresh pseudo-random values in [96, 159], different for every `seed`.
/// Medium-amplitude noise no encoder can predict: cheap to code coarsely, dear to code finely,
/// so the encoder's rate control spends the bitrate it is given without having to skip frames,
/// from about 100 kbit/s up to what one band can take (openh264, 30 fps, three temporal
/// layers: about 1.6 Mbit/s at 640x480, where more makes no difference).
pub fn fill_noise(luma: &mut [u8], seed: u64) {
    // xorshift64*: fast, and good enough to defeat motion search and entropy coding.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in luma.chunks_mut(8) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let bytes = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        for (p, r) in chunk.iter_mut().zip(bytes) {
            *p = 96 + (r >> 2);
        }
    }
}

/// Renders test-pattern frames into a reused buffer.
pub struct PatternGenerator {
    background: I420Buffer,
}

impl PatternGenerator {
    /// `width` must be at least 160 (so cells are at least 4 px) and both sizes even.
    pub fn new(width: usize, height: usize) -> Self {
        let mut background = I420Buffer::new(width, height);
        let cw = background.chroma_width();
        let (y, u, v) = background.planes_mut();
        let bar_of = |x: usize| BARS[(x * BARS.len() / width).min(BARS.len() - 1)];
        for row in y.chunks_exact_mut(width) {
            for (x, p) in row.iter_mut().enumerate() {
                *p = bar_of(x).0;
            }
        }
        for (urow, vrow) in u.chunks_exact_mut(cw).zip(v.chunks_exact_mut(cw)) {
            for x in 0..cw {
                let (_, bu, bv) = bar_of(x * 2);
                urow[x] = bu;
                vrow[x] = bv;
            }
        }
        Self { background }
    }

    pub fn width(&self) -> usize {
        self.background.width
    }

    pub fn height(&self) -> usize {
        self.background.height
    }

    /// Draws frame `seq` captured at `ts_ms` (Unix ms mod 2^32) into `out`.
    pub fn render(&self, seq: u32, ts_ms: u32, out: &mut I420Buffer) {
        let (w, h) = (self.width(), self.height());
        if out.width != w || out.height != h {
            out.resize(w, h);
        }
        out.data.copy_from_slice(&self.background.data);
        let cw = out.chroma_width();
        let b = cell_size(w);
        let (y, u, v) = out.planes_mut();
        // Stamp rows: neutral chroma so only luma carries the bits.
        for (row, value) in [(0usize, seq), (1, ts_ms)] {
            let bits = (u64::from(value) << 8) | u64::from(crc8(value));
            for line in row * b..(row + 1) * b {
                let yl = &mut y[line * w..(line + 1) * w];
                for i in 0..STAMP_BITS {
                    let on = (bits >> (STAMP_BITS - 1 - i)) & 1 == 1;
                    yl[i * b..(i + 1) * b].fill(if on { WHITE } else { BLACK });
                }
                yl[STAMP_BITS * b..].fill(BLACK);
            }
            for line in row * b / 2..(row + 1) * b / 2 {
                u[line * cw..(line + 1) * cw].fill(128);
                v[line * cw..(line + 1) * cw].fill(128);
            }
        }
        let (left, top, size) = box_geometry(w, h, seq);
        for line in top..(top + size).min(h) {
            y[line * w + left..line * w + left + size].fill(BOX_YUV.0);
        }
        for line in top / 2..((top + size) / 2).min(h / 2) {
            u[line * cw + left / 2..line * cw + (left + size) / 2].fill(BOX_YUV.1);
            v[line * cw + left / 2..line * cw + (left + size) / 2].fill(BOX_YUV.2);
        }
    }
}

/// Reads `(seq, ts_ms)` back from a decoded luma plane; `None` when a CRC does not match.
pub fn read_stamp(y: &[u8], stride: usize, width: usize) -> Option<(u32, u32)> {
    let b = cell_size(width);
    let mut out = [0u32; 2];
    for (row, slot) in out.iter_mut().enumerate() {
        let mut bits = 0u64;
        for i in 0..STAMP_BITS {
            let (x0, y0) = (i * b + b / 4, row * b + b / 4);
            let mut sum = 0u32;
            let mut n = 0u32;
            for yy in y0..y0 + (b / 2).max(1) {
                for xx in x0..x0 + (b / 2).max(1) {
                    sum += u32::from(*y.get(yy * stride + xx)?);
                    n += 1;
                }
            }
            bits = (bits << 1) | u64::from(sum / n > 128);
        }
        let value = (bits >> 8) as u32;
        if crc8(value) != (bits & 0xff) as u8 {
            return None;
        }
        *slot = value;
    }
    Some((out[0], out[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc8_matches_reference_vectors() {
        // CRC-8/SMBUS of "123456789" is 0xF4; of 0x00000000 is 0.
        let mut crc = 0u8;
        for &byte in b"123456789" {
            crc ^= byte;
            for _ in 0..8 {
                crc = if crc & 0x80 != 0 {
                    (crc << 1) ^ 7
                } else {
                    crc << 1
                };
            }
        }
        assert_eq!(crc, 0xF4);
        assert_eq!(crc8(0), 0);
        assert_ne!(crc8(1), crc8(2));
    }

    #[test]
    fn stamp_round_trips_at_several_sizes() {
        for (w, h) in [
            (160, 120),
            (640, 480),
            (1280, 720),
            (1920, 1080),
            (250, 100),
        ] {
            let g = PatternGenerator::new(w, h);
            let mut out = I420Buffer::default();
            for (seq, ts) in [(0, 0), (1, 2), (123_456, 4_000_000_000), (u32::MAX, 7)] {
                g.render(seq, ts, &mut out);
                assert_eq!(read_stamp(&out.data, w, w), Some((seq, ts)), "{w}x{h}");
            }
        }
    }

    #[test]
    fn corrupted_stamp_is_detected() {
        let g = PatternGenerator::new(640, 480);
        let mut out = I420Buffer::default();
        g.render(77, 99, &mut out);
        // Flip the first cell of row 0 (the seq's top bit).
        for line in 0..16 {
            for x in 0..16 {
                out.data[line * 640 + x] = 255 - out.data[line * 640 + x];
            }
        }
        assert_eq!(read_stamp(&out.data, 640, 640), None);
    }

    #[test]
    fn box_moves_and_bars_stay() {
        let g = PatternGenerator::new(640, 480);
        let mut a = I420Buffer::default();
        let mut b = I420Buffer::default();
        g.render(0, 0, &mut a);
        g.render(10, 0, &mut b);
        assert_ne!(a.data, b.data);
        let (left, top, size) = box_geometry(640, 480, 10);
        assert_eq!((left, top, size), (40, 240, 64));
        assert_eq!(b.data[(top + 1) * 640 + left + 1], BOX_YUV.0);
        // Bar 7 (black) at the bottom right, bar 0 (white) at the bottom left.
        assert_eq!(b.data[479 * 640 + 639], BARS[7].0);
        assert_eq!(b.data[479 * 640], BARS[0].0);
        let u0 = 640 * 480;
        assert_eq!(b.data[u0 + 239 * 320 + 100], BARS[2].1);
    }

    #[test]
    fn box_wraps_within_the_frame() {
        for seq in [0, 1, 1000, u32::MAX] {
            let (left, top, size) = box_geometry(640, 480, seq);
            assert!(left + size <= 640 && top + size <= 480, "{seq}");
        }
    }

    #[test]
    fn noise_band_stays_below_the_box_and_in_range() {
        let rows = noise_rows(640, 480);
        let (_, top, size) = box_geometry(640, 480, 0);
        assert!(rows.start >= top + size, "{rows:?}");
        assert_eq!(rows, 320..336);
        assert!(noise_rows(160, 120).end <= 120);
        let (mut a, mut b) = (vec![0u8; 1003], vec![0u8; 1003]);
        fill_noise(&mut a, 1);
        fill_noise(&mut b, 2);
        assert!(a.iter().all(|&p| (96..=159).contains(&p)));
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(differing > 900, "frames differ: {differing}");
        let distinct: std::collections::BTreeSet<u8> = a.iter().copied().collect();
        assert!(
            distinct.len() == 64,
            "spread over the whole range: {}",
            distinct.len()
        );
    }
}
