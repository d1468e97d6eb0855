//! Packed 24-bit RGB (V4L2 RGB3/BGR3, what libcamera's vimc and software-ISP cameras give) to video-range BT.601 I420 in one pass.

use super::frame::{I420Buffer, I420View, ShortBuffer};

/// Byte order of a packed 24-bit pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RgbOrder {
    /// V4L2_PIX_FMT_RGB24 ("RGB3"; libcamera's BGR888): R, G, B in memory.
    Rgb,
    /// V4L2_PIX_FMT_BGR24 ("BGR3"; libcamera's RGB888): B, G, R in memory.
    Bgr,
}

/// Converts into a reused I420 buffer; after warm-up no frame allocates.
#[derive(Debug, Default)]
pub(crate) struct RgbConverter {
    i420: I420Buffer,
}

// BT.601 video range, 8-bit fixed point (the coefficients ×256): what H.264 decoders assume
// for an SD/HD stream without colour description, and what the other converters produce.
fn luma(r: i32, g: i32, b: i32) -> u8 {
    (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8
}

fn chroma(r: i32, g: i32, b: i32) -> (u8, u8) {
    let u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
    let v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
    (u.clamp(0, 255) as u8, v.clamp(0, 255) as u8)
}

impl RgbConverter {
    /// Converts `height` lines of `stride` bytes (`width` pixels of 3 bytes each) to I420; chroma
    /// is the average of each 2x2 block (edge pixels repeat for odd sizes). Returns the view
    /// and the number of bytes written.
    pub(crate) fn convert(
        &mut self,
        src: &[u8],
        order: RgbOrder,
        width: usize,
        height: usize,
        stride: usize,
    ) -> Result<(I420View<'_>, usize), ShortBuffer> {
        let needed = stride * height.saturating_sub(1) + width * 3;
        if width == 0 || height == 0 || stride < width * 3 || src.len() < needed {
            return Err(ShortBuffer {
                len: src.len(),
                needed,
                width,
                height,
                stride,
            });
        }
        self.i420.resize(width, height);
        let (cw, ch) = (self.i420.chroma_width(), self.i420.chroma_height());
        let (y, u, v) = self.i420.planes_mut();
        let (ri, bi) = match order {
            RgbOrder::Rgb => (0, 2),
            RgbOrder::Bgr => (2, 0),
        };
        let px = |row: usize, col: usize| {
            let o = row * stride + col * 3;
            (
                i32::from(src[o + ri]),
                i32::from(src[o + 1]),
                i32::from(src[o + bi]),
            )
        };
        for row in 0..height {
            let line = &src[row * stride..row * stride + width * 3];
            for (out, p) in y[row * width..(row + 1) * width]
                .iter_mut()
                .zip(line.chunks_exact(3))
            {
                *out = luma(i32::from(p[ri]), i32::from(p[1]), i32::from(p[bi]));
            }
        }
        for crow in 0..ch {
            let (r0, r1) = (crow * 2, (crow * 2 + 1).min(height - 1));
            for ccol in 0..cw {
                let (c0, c1) = (ccol * 2, (ccol * 2 + 1).min(width - 1));
                let (mut r, mut g, mut b) = (0, 0, 0);
                for (pr, pc) in [(r0, c0), (r0, c1), (r1, c0), (r1, c1)] {
                    let (pr_, pg, pb) = px(pr, pc);
                    r += pr_;
                    g += pg;
                    b += pb;
                }
                let (cu, cv) = chroma((r + 2) / 4, (g + 2) / 4, (b + 2) / 4);
                u[crow * cw + ccol] = cu;
                v[crow * cw + ccol] = cv;
            }
        }
        let written = width * height + 2 * cw * ch;
        Ok((self.i420.view(), written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 75% colour bars in RGB and their BT.601 video-range Y'CbCr (the table the VM test's
    /// picture checks use).
    const BARS: [([u8; 3], (u8, u8, u8)); 8] = [
        ([191, 191, 191], (180, 128, 128)),
        ([191, 191, 0], (162, 44, 142)),
        ([0, 191, 191], (131, 156, 44)),
        ([0, 191, 0], (112, 72, 58)),
        ([191, 0, 191], (84, 184, 198)),
        ([191, 0, 0], (65, 100, 212)),
        ([0, 0, 191], (35, 212, 114)),
        ([0, 0, 0], (16, 128, 128)),
    ];

    fn picture(order: RgbOrder, width: usize, height: usize, stride: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; stride * height];
        for row in 0..height {
            for col in 0..width {
                let [r, g, b] = BARS[col * 8 / width].0;
                let p = match order {
                    RgbOrder::Rgb => [r, g, b],
                    RgbOrder::Bgr => [b, g, r],
                };
                buf[row * stride + col * 3..][..3].copy_from_slice(&p);
            }
        }
        buf
    }

    #[test]
    fn colour_bars_in_both_orders_with_padded_lines() {
        for order in [RgbOrder::Rgb, RgbOrder::Bgr] {
            let (w, h, stride) = (64, 6, 64 * 3 + 8);
            let src = picture(order, w, h, stride);
            let mut c = RgbConverter::default();
            let (view, written) = c.convert(&src, order, w, h, stride).unwrap();
            assert_eq!(written, w * h + 2 * (w / 2) * (h / 2));
            for (i, (_, (ey, eu, ev))) in BARS.iter().enumerate() {
                let x = i * 8 + 4;
                let (y, u, v) = (view.y[w + x], view.u[x / 2], view.v[x / 2]);
                // Within 1 of the reference (rounding of the 8-bit coefficients).
                assert!(y.abs_diff(*ey) <= 1, "{order:?} bar {i}: Y {y} vs {ey}");
                assert!(u.abs_diff(*eu) <= 1, "{order:?} bar {i}: Cb {u} vs {eu}");
                assert!(v.abs_diff(*ev) <= 1, "{order:?} bar {i}: Cr {v} vs {ev}");
            }
        }
    }

    #[test]
    fn odd_sizes_and_short_buffers() {
        let (w, h) = (5, 3);
        let src = vec![255u8; w * 3 * h];
        let mut c = RgbConverter::default();
        let (view, _) = c.convert(&src, RgbOrder::Rgb, w, h, w * 3).unwrap();
        assert_eq!((view.width, view.height, view.u.len()), (5, 3, 3 * 2));
        assert!(view.y.iter().all(|y| *y == 235), "white is Y 235");
        assert!(view.u.iter().chain(view.v).all(|c| *c == 128));
        let short = c.convert(&src[..src.len() - 1], RgbOrder::Rgb, w, h, w * 3);
        assert!(short.is_err());
        assert!(
            c.convert(&src, RgbOrder::Rgb, w, h, w * 3 - 1).is_err(),
            "stride < width"
        );
    }
}
