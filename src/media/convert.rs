//! Pixel conversion into I420 for the encoder: one pass into a reused buffer (YUYV, NV12's chroma).

use super::frame::{I420Buffer, I420View, ShortBuffer};

/// Why a camera buffer could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Short(#[from] ShortBuffer),
    #[error("YUYV conversion failed: {0}")]
    Yuyv(String),
}

/// Reused conversion buffers; after warm-up no frame allocates.
#[derive(Debug, Default)]
pub struct Converter {
    i420: I420Buffer,
    u: Vec<u8>,
    v: Vec<u8>,
}

fn short(len: usize, needed: usize, width: usize, height: usize, stride: usize) -> ShortBuffer {
    ShortBuffer {
        len,
        needed,
        width,
        height,
        stride,
    }
}

impl Converter {
    /// Converts packed YUYV (4:2:2, `stride` bytes per line) to I420 with one pass.
    /// (Not yuvutils-rs: its SIMD and scalar paths take chroma from different lines, and it
    /// rejects padded lines, which drivers produce for some widths.)
    /// Returns the view and the number of bytes written.
    pub fn yuyv(
        &mut self,
        src: &[u8],
        width: usize,
        height: usize,
        stride: usize,
    ) -> Result<(I420View<'_>, usize), ConvertError> {
        let needed = stride * height;
        if src.len() < needed || stride < width * 2 {
            return Err(short(src.len(), needed, width, height, stride).into());
        }
        self.i420.resize(width, height);
        let (cw, ch) = (self.i420.chroma_width(), self.i420.chroma_height());
        let (y, u, v) = self.i420.planes_mut();
        yuyv_to_i420(src, width, height, stride, y, u, v);
        let written = width * height + 2 * cw * ch;
        Ok((self.i420.view(), written))
    }

    /// NV12: the Y plane is used in place (zero copy); only the interleaved chroma is split
    /// into the reused U and V planes. Returns the view and the number of bytes written.
    pub fn nv12<'a>(
        &'a mut self,
        src: &'a [u8],
        width: usize,
        height: usize,
        stride: usize,
    ) -> Result<(I420View<'a>, usize), ConvertError> {
        let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
        let y_len = stride * height;
        let needed = y_len + stride * (ch - 1) + cw * 2;
        if src.len() < needed || stride < width {
            return Err(short(src.len(), needed, width, height, stride).into());
        }
        self.u.resize(cw * ch, 0);
        self.v.resize(cw * ch, 0);
        let uv = &src[y_len..];
        for row in 0..ch {
            let line = &uv[row * stride..row * stride + cw * 2];
            let (ur, vr) = (
                &mut self.u[row * cw..(row + 1) * cw],
                &mut self.v[row * cw..(row + 1) * cw],
            );
            for ((pair, up), vp) in line.chunks_exact(2).zip(ur).zip(vr) {
                *up = pair[0];
                *vp = pair[1];
            }
        }
        let view = I420View {
            width,
            height,
            y: &src[..y_len],
            u: &self.u,
            v: &self.v,
            y_stride: stride,
            uv_stride: cw,
        };
        Ok((view, 2 * cw * ch))
    }
}

/// YUYV (4:2:2) to I420 in one pass over two lines at a time: luma copied, chroma averaged
/// over each line pair (4:2:0 siting between the lines). Handles padded lines.
fn yuyv_to_i420(
    src: &[u8],
    width: usize,
    height: usize,
    stride: usize,
    y: &mut [u8],
    u: &mut [u8],
    v: &mut [u8],
) {
    let cw = width.div_ceil(2);
    let pairs = width / 2;
    for crow in 0..height.div_ceil(2) {
        let r0 = 2 * crow;
        // An odd last line pairs with itself.
        let r1 = (r0 + 1).min(height - 1);
        let a = &src[r0 * stride..r0 * stride + pairs * 4];
        let b = &src[r1 * stride..r1 * stride + pairs * 4];
        let (y0, rest) = y[r0 * width..].split_at_mut(width);
        let uo = &mut u[crow * cw..crow * cw + pairs];
        let vo = &mut v[crow * cw..crow * cw + pairs];
        for (i, (qa, qb)) in a.chunks_exact(4).zip(b.chunks_exact(4)).enumerate() {
            y0[2 * i] = qa[0];
            y0[2 * i + 1] = qa[2];
            uo[i] = ((u16::from(qa[1]) + u16::from(qb[1]) + 1) >> 1) as u8;
            vo[i] = ((u16::from(qa[3]) + u16::from(qb[3]) + 1) >> 1) as u8;
        }
        if r1 != r0 {
            let y1 = &mut rest[..width];
            for (i, qb) in b.chunks_exact(4).enumerate() {
                y1[2 * i] = qb[0];
                y1[2 * i + 1] = qb[2];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_converts_luma_exactly_and_averages_chroma() {
        let (w, h, stride) = (4, 2, 10); // 2 bytes of padding per line
        let mut src = vec![0u8; stride * h];
        for row in 0..h {
            for px in 0..w / 2 {
                let o = row * stride + px * 4;
                let base = (row * 10 + px * 2) as u8;
                src[o..o + 4].copy_from_slice(&[base, 100 + row as u8 * 10, base + 1, 200]);
            }
        }
        let mut c = Converter::default();
        let (view, written) = c.yuyv(&src, w, h, stride).unwrap();
        assert_eq!(written, 8 + 2 + 2);
        assert_eq!(view.y, &[0, 1, 2, 3, 10, 11, 12, 13]);
        // U of rows 0 and 1 (100, 110) averages to 105; V is 200 everywhere.
        assert_eq!(view.u, &[105, 105]);
        assert!(view.v.iter().all(|&v| v == 200));
    }

    #[test]
    fn padded_and_tight_yuyv_agree_at_every_width() {
        for (w, h) in [(8, 2), (64, 8), (130, 5)] {
            let tight: Vec<u8> = (0..w * 2 * h).map(|i| (i * 7 % 251) as u8).collect();
            let stride = w * 2 + 16;
            let mut padded = vec![0u8; stride * h];
            for row in 0..h {
                padded[row * stride..row * stride + w * 2]
                    .copy_from_slice(&tight[row * w * 2..(row + 1) * w * 2]);
            }
            let mut c1 = Converter::default();
            let mut c2 = Converter::default();
            let (a, _) = c1.yuyv(&tight, w, h, w * 2).unwrap();
            let (b, _) = c2.yuyv(&padded, w, h, stride).unwrap();
            assert_eq!((a.y, a.u, a.v), (b.y, b.u, b.v));
            // Chroma is the rounded mean of lines 0 and 1; an odd last line pairs with itself.
            let mean = |p: u8, q: u8| (u16::from(p) + u16::from(q)).div_ceil(2) as u8;
            assert_eq!(a.u[0], mean(tight[1], tight[w * 2 + 1]));
            assert_eq!(a.v[0], mean(tight[3], tight[w * 2 + 3]));
            if h % 2 == 1 {
                let last = (h - 1) * w * 2;
                assert_eq!(a.u[(h / 2) * (w / 2)], tight[last + 1]);
            }
        }
    }

    #[test]
    fn nv12_borrows_luma_and_splits_chroma() {
        let (w, h, stride) = (4, 2, 6);
        let mut src = vec![0u8; stride * h + stride];
        for (i, p) in src[..stride * h].iter_mut().enumerate() {
            *p = i as u8;
        }
        src[stride * h..stride * h + 4].copy_from_slice(&[1, 2, 3, 4]);
        let mut c = Converter::default();
        let (view, written) = c.nv12(&src, w, h, stride).unwrap();
        assert_eq!(written, 4);
        assert_eq!(view.y_stride, 6);
        assert_eq!(view.y.as_ptr(), src.as_ptr(), "luma must not be copied");
        assert_eq!(view.u, &[1, 3]);
        assert_eq!(view.v, &[2, 4]);
    }

    #[test]
    fn short_buffers_are_errors_not_panics() {
        let mut c = Converter::default();
        assert!(c.yuyv(&[0; 7], 2, 2, 4).is_err());
        assert!(c.yuyv(&[0; 8], 2, 2, 4).is_ok());
        assert!(c.yuyv(&[0; 16], 4, 2, 4).is_err(), "stride below 2*width");
        assert!(c.nv12(&[0; 5], 2, 2, 2).is_err());
    }
}
