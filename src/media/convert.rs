//! Pixel conversion into I420 for the encoder: one pass into a reused buffer (YUYV with SSE2/AVX2/NEON kernels bit-exact with the scalar one, NV12's chroma).
#![allow(unsafe_code)] // SIMD intrinsics: x86 SSE2/AVX2 and aarch64 NEON loads and stores.

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
    yuyv_kernel: YuyvKernel,
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
        yuyv_to_i420(self.yuyv_kernel, src, stride, &mut self.i420);
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
/// over each line pair (4:2:0 siting between the lines) as `(a + b + 1) >> 1`, which is what
/// SSE2's `pavgb` and NEON's `urhadd` compute, so every kernel gives the same bytes. Handles
/// padded lines (`stride` > 2 * `width`).
/// `out` is already sized to the picture.
fn yuyv_to_i420(kernel: YuyvKernel, src: &[u8], stride: usize, out: &mut I420Buffer) {
    let (width, height, cw) = (out.width, out.height, out.chroma_width());
    let (y, u, v) = out.planes_mut();
    let pairs = width / 2;
    for crow in 0..height.div_ceil(2) {
        let r0 = 2 * crow;
        let a = &src[r0 * stride..r0 * stride + pairs * 4];
        let (y0, rest) = y[r0 * width..].split_at_mut(width);
        let uo = &mut u[crow * cw..crow * cw + pairs];
        let vo = &mut v[crow * cw..crow * cw + pairs];
        if r0 + 1 < height {
            let r1 = r0 + 1;
            let b = &src[r1 * stride..r1 * stride + pairs * 4];
            let y1 = &mut rest[..width];
            let done = kernel.line_pair(a, b, y0, y1, uo, vo);
            yuyv_line_pair_scalar(
                &a[done * 4..],
                &b[done * 4..],
                &mut y0[done * 2..],
                Some(&mut y1[done * 2..]),
                &mut uo[done..],
                &mut vo[done..],
            );
        } else {
            // An odd last line pairs with itself: one line, scalar is enough.
            yuyv_line_pair_scalar(a, a, y0, None, uo, vo);
        }
    }
}

/// Two YUYV lines `a` and `b` (`pairs` * 4 bytes) to their luma lines and one averaged
/// chroma line each for U and V; `y1` is None when `b` is `a` repeated (odd last line).
fn yuyv_line_pair_scalar(
    a: &[u8],
    b: &[u8],
    y0: &mut [u8],
    y1: Option<&mut [u8]>,
    u: &mut [u8],
    v: &mut [u8],
) {
    for (i, (qa, qb)) in a.chunks_exact(4).zip(b.chunks_exact(4)).enumerate() {
        y0[2 * i] = qa[0];
        y0[2 * i + 1] = qa[2];
        u[i] = ((u16::from(qa[1]) + u16::from(qb[1]) + 1) >> 1) as u8;
        v[i] = ((u16::from(qa[3]) + u16::from(qb[3]) + 1) >> 1) as u8;
    }
    if let Some(y1) = y1 {
        for (i, qb) in b.chunks_exact(4).enumerate() {
            y1[2 * i] = qb[0];
            y1[2 * i + 1] = qb[2];
        }
    }
}

/// The vector code a [`Converter`] uses for YUYV, chosen once from what the CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum YuyvKernel {
    /// Plain Rust: other architectures, and the reference the tests compare against.
    #[cfg_attr(
        any(target_arch = "x86_64", target_arch = "aarch64"),
        allow(dead_code, reason = "only the tests choose it where SIMD exists")
    )]
    Scalar,
    /// Baseline on x86_64: 32 pixels of two lines per step.
    #[cfg(target_arch = "x86_64")]
    Sse2,
    /// x86_64 with AVX2 (runtime-detected): 64 pixels of two lines per step.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Baseline on aarch64: 32 pixels of two lines per step.
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Default for YuyvKernel {
    fn default() -> Self {
        Self::detect()
    }
}

impl YuyvKernel {
    /// The fastest kernel this CPU runs.
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
            Self::Sse2
        }
        #[cfg(target_arch = "aarch64")]
        {
            Self::Neon
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Self::Scalar
        }
    }

    /// Every kernel this CPU runs, scalar first (for the tests and the benchmark).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut all = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            all.push(Self::Sse2);
            if std::arch::is_x86_feature_detected!("avx2") {
                all.push(Self::Avx2);
            }
        }
        #[cfg(target_arch = "aarch64")]
        all.push(Self::Neon);
        all
    }

    /// Converts the leading whole vector steps of a line pair (see
    /// [`yuyv_line_pair_scalar`]) and returns how many pixel pairs it did; the caller
    /// finishes the tail with the scalar code.
    fn line_pair(
        self,
        a: &[u8],
        b: &[u8],
        y0: &mut [u8],
        y1: &mut [u8],
        u: &mut [u8],
        v: &mut [u8],
    ) -> usize {
        match self {
            Self::Scalar => 0,
            // SAFETY: SSE2 is part of the x86_64 baseline: every x86_64 CPU has it.
            #[cfg(target_arch = "x86_64")]
            Self::Sse2 => unsafe { simd_x86::line_pair_sse2(a, b, y0, y1, u, v) },
            // SAFETY: `Avx2` is only chosen after `is_x86_feature_detected!("avx2")`.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { simd_x86::line_pair_avx2(a, b, y0, y1, u, v) },
            // SAFETY: NEON (Advanced SIMD) is part of the aarch64 baseline.
            #[cfg(target_arch = "aarch64")]
            Self::Neon => unsafe { simd_neon::line_pair_neon(a, b, y0, y1, u, v) },
        }
    }
}

/// SSE2 (x86_64 baseline) and AVX2 line-pair kernels. In a 16-bit lane of YUYV data the low
/// byte is luma and the high byte chroma (U or V, alternating lane by lane), so luma is
/// `lane & 0xFF` and chroma `lane >> 8`, each narrowed with `packus`.
#[cfg(target_arch = "x86_64")]
mod simd_x86 {
    use std::arch::x86_64::*;

    /// 32 pixels (64 bytes of each line) per step.
    #[target_feature(enable = "sse2")]
    pub(super) fn line_pair_sse2(
        a: &[u8],
        b: &[u8],
        y0: &mut [u8],
        y1: &mut [u8],
        u: &mut [u8],
        v: &mut [u8],
    ) -> usize {
        let lo = _mm_set1_epi16(0x00FF);
        let mut steps = 0;
        for (((((qa, qb), ya), yb), uo), vo) in a
            .chunks_exact(64)
            .zip(b.chunks_exact(64))
            .zip(y0.chunks_exact_mut(32))
            .zip(y1.chunks_exact_mut(32))
            .zip(u.chunks_exact_mut(16))
            .zip(v.chunks_exact_mut(16))
        {
            let la = load4(qa);
            let lb = load4(qb);
            let luma = |x: [__m128i; 4]| {
                [
                    _mm_packus_epi16(_mm_and_si128(x[0], lo), _mm_and_si128(x[1], lo)),
                    _mm_packus_epi16(_mm_and_si128(x[2], lo), _mm_and_si128(x[3], lo)),
                ]
            };
            store(ya, &luma(la));
            store(yb, &luma(lb));
            // Averaging whole lanes also averages luma, which is then dropped; chroma is
            // the high byte, rounded up like the scalar `(a + b + 1) >> 1`.
            let c: [__m128i; 4] =
                std::array::from_fn(|i| _mm_srli_epi16(_mm_avg_epu8(la[i], lb[i]), 8));
            // U0 V0 U1 V1 ... as bytes; as 16-bit lanes U is low, V high.
            let uv01 = _mm_packus_epi16(c[0], c[1]);
            let uv23 = _mm_packus_epi16(c[2], c[3]);
            let uu = _mm_packus_epi16(_mm_and_si128(uv01, lo), _mm_and_si128(uv23, lo));
            let vv = _mm_packus_epi16(_mm_srli_epi16(uv01, 8), _mm_srli_epi16(uv23, 8));
            store(uo, &[uu]);
            store(vo, &[vv]);
            steps += 1;
        }
        steps * 16
    }

    /// 64 pixels (128 bytes of each line) per step. AVX2's `packus` works within each
    /// 128-bit half, so every narrowing is followed by a `permute4x64` back into order.
    #[target_feature(enable = "avx2")]
    pub(super) fn line_pair_avx2(
        a: &[u8],
        b: &[u8],
        y0: &mut [u8],
        y1: &mut [u8],
        u: &mut [u8],
        v: &mut [u8],
    ) -> usize {
        let lo = _mm256_set1_epi16(0x00FF);
        let pack = |x: __m256i, y: __m256i| {
            _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(x, y))
        };
        let mut steps = 0;
        for (((((qa, qb), ya), yb), uo), vo) in a
            .chunks_exact(128)
            .zip(b.chunks_exact(128))
            .zip(y0.chunks_exact_mut(64))
            .zip(y1.chunks_exact_mut(64))
            .zip(u.chunks_exact_mut(32))
            .zip(v.chunks_exact_mut(32))
        {
            let la = load4_256(qa);
            let lb = load4_256(qb);
            let luma = |x: [__m256i; 4]| {
                [
                    pack(_mm256_and_si256(x[0], lo), _mm256_and_si256(x[1], lo)),
                    pack(_mm256_and_si256(x[2], lo), _mm256_and_si256(x[3], lo)),
                ]
            };
            store_256(ya, &luma(la));
            store_256(yb, &luma(lb));
            let c: [__m256i; 4] =
                std::array::from_fn(|i| _mm256_srli_epi16(_mm256_avg_epu8(la[i], lb[i]), 8));
            let uv01 = pack(c[0], c[1]);
            let uv23 = pack(c[2], c[3]);
            let uu = pack(_mm256_and_si256(uv01, lo), _mm256_and_si256(uv23, lo));
            let vv = pack(_mm256_srli_epi16(uv01, 8), _mm256_srli_epi16(uv23, 8));
            store_256(uo, &[uu]);
            store_256(vo, &[vv]);
            steps += 1;
        }
        steps * 32
    }

    /// Four unaligned 16-byte loads from a 64-byte chunk.
    #[target_feature(enable = "sse2")]
    fn load4(src: &[u8]) -> [__m128i; 4] {
        assert!(src.len() >= 64);
        // SAFETY: the four 16-byte reads end at byte 64, inside `src` (asserted above);
        // `loadu` has no alignment requirement.
        std::array::from_fn(|i| unsafe { _mm_loadu_si128(src.as_ptr().add(16 * i).cast()) })
    }

    /// Unaligned 16-byte stores of `regs` into `dst`, one after another.
    #[target_feature(enable = "sse2")]
    fn store(dst: &mut [u8], regs: &[__m128i]) {
        assert!(dst.len() >= 16 * regs.len());
        for (i, r) in regs.iter().enumerate() {
            // SAFETY: store `i` writes bytes 16*i..16*(i+1) of `dst`, inside it (asserted).
            unsafe { _mm_storeu_si128(dst.as_mut_ptr().add(16 * i).cast(), *r) };
        }
    }

    #[target_feature(enable = "avx2")]
    fn load4_256(src: &[u8]) -> [__m256i; 4] {
        assert!(src.len() >= 128);
        // SAFETY: the four 32-byte reads end at byte 128, inside `src` (asserted above).
        std::array::from_fn(|i| unsafe { _mm256_loadu_si256(src.as_ptr().add(32 * i).cast()) })
    }

    #[target_feature(enable = "avx2")]
    fn store_256(dst: &mut [u8], regs: &[__m256i]) {
        assert!(dst.len() >= 32 * regs.len());
        for (i, r) in regs.iter().enumerate() {
            // SAFETY: store `i` writes bytes 32*i..32*(i+1) of `dst`, inside it (asserted).
            unsafe { _mm256_storeu_si256(dst.as_mut_ptr().add(32 * i).cast(), *r) };
        }
    }
}

/// NEON (aarch64 baseline) line-pair kernel: `ld4` splits 32 YUYV pixels into even luma, U,
/// odd luma and V; `st2` re-interleaves the luma; `urhadd` is `(a + b + 1) >> 1`.
#[cfg(target_arch = "aarch64")]
mod simd_neon {
    use std::arch::aarch64::*;

    #[target_feature(enable = "neon")]
    pub(super) fn line_pair_neon(
        a: &[u8],
        b: &[u8],
        y0: &mut [u8],
        y1: &mut [u8],
        u: &mut [u8],
        v: &mut [u8],
    ) -> usize {
        let mut steps = 0;
        for (((((qa, qb), ya), yb), uo), vo) in a
            .chunks_exact(64)
            .zip(b.chunks_exact(64))
            .zip(y0.chunks_exact_mut(32))
            .zip(y1.chunks_exact_mut(32))
            .zip(u.chunks_exact_mut(16))
            .zip(v.chunks_exact_mut(16))
        {
            // SAFETY: `qa`, `qb` are 64-byte chunks: `ld4q` reads exactly 64 bytes. `ya`,
            // `yb` are 32-byte chunks: `st2q` writes exactly 32. `uo`, `vo` are 16-byte
            // chunks: `st1q` writes exactly 16. NEON is part of the aarch64 baseline.
            unsafe {
                let la = vld4q_u8(qa.as_ptr());
                let lb = vld4q_u8(qb.as_ptr());
                vst2q_u8(ya.as_mut_ptr(), uint8x16x2_t(la.0, la.2));
                vst2q_u8(yb.as_mut_ptr(), uint8x16x2_t(lb.0, lb.2));
                vst1q_u8(uo.as_mut_ptr(), vrhaddq_u8(la.1, lb.1));
                vst1q_u8(vo.as_mut_ptr(), vrhaddq_u8(la.3, lb.3));
            }
            steps += 1;
        }
        steps * 16
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

    /// Deterministic pseudo-random bytes (xorshift64*), so a failure reproduces.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn every_simd_kernel_matches_scalar_bit_exactly() {
        let kernels = YuyvKernel::available();
        #[cfg(target_arch = "x86_64")]
        assert!(kernels.contains(&YuyvKernel::Sse2));
        #[cfg(target_arch = "aarch64")]
        assert!(kernels.contains(&YuyvKernel::Neon));
        assert!(kernels.contains(&YuyvKernel::detect()));
        let mut compared = 0;
        // Widths around the 16- and 32-pair steps (and odd ones), heights with an odd last
        // line, strides tight, lightly and heavily padded.
        for w in [
            2usize, 4, 6, 30, 31, 32, 34, 62, 64, 66, 94, 126, 128, 130, 190, 256, 258, 642, 1282,
        ] {
            for h in [1, 2, 3, 4, 7] {
                for stride in [w * 2, w * 2 + 2, w * 2 + 62, (w * 2).next_multiple_of(64)] {
                    let src = noise(stride * h, (w * 1000 + h * 10 + stride) as u64);
                    let mut reference = Converter {
                        yuyv_kernel: YuyvKernel::Scalar,
                        ..Default::default()
                    };
                    let (want, _) = reference.yuyv(&src, w, h, stride).unwrap();
                    for &k in &kernels[1..] {
                        let mut c = Converter {
                            yuyv_kernel: k,
                            ..Default::default()
                        };
                        let (got, n) = c.yuyv(&src, w, h, stride).unwrap();
                        assert_eq!(n, w * h + 2 * w.div_ceil(2) * h.div_ceil(2));
                        assert_eq!(got.y, want.y, "{k:?} luma {w}x{h} stride {stride}");
                        assert_eq!(got.u, want.u, "{k:?} U {w}x{h} stride {stride}");
                        assert_eq!(got.v, want.v, "{k:?} V {w}x{h} stride {stride}");
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared >= 19 * 5 * 4 * (kernels.len() - 1));
    }

    #[test]
    fn simd_chroma_rounds_half_up_like_scalar() {
        // Extremes: 255+254 and 0+1 are where truncating and rounding averages differ.
        let (w, h) = (64, 2);
        let mut src = vec![0u8; w * 2 * h];
        for (i, q) in src[..w * 2].chunks_exact_mut(4).enumerate() {
            q.copy_from_slice(&[1, if i % 2 == 0 { 255 } else { 0 }, 2, 1]);
        }
        for q in src[w * 2..].chunks_exact_mut(4) {
            q.copy_from_slice(&[3, 254, 4, 0]);
        }
        let mut c = Converter::default();
        let (view, _) = c.yuyv(&src, w, h, w * 2).unwrap();
        for (i, &u) in view.u.iter().enumerate() {
            // (255 + 254 + 1) / 2 = 255; (0 + 254 + 1) / 2 = 127.
            assert_eq!(u, if i % 2 == 0 { 255 } else { 127 }, "U {i}");
        }
        assert!(view.v.iter().all(|&v| v == 1), "(1 + 0 + 1) / 2 = 1");
        assert_eq!(&view.y[..4], &[1, 2, 1, 2]);
        assert_eq!(&view.y[w..w + 4], &[3, 4, 3, 4]);
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
