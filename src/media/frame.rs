//! Frame types shared by sources, the encoder and the viewers.

use bytes::Bytes;
use openh264::formats::YUVSource;

/// A borrowed I420 picture: three planes with their strides, e.g. straight out of an mmap'd
/// V4L2 buffer (zero copy) or out of the reused conversion buffer.
#[derive(Debug, Clone, Copy)]
pub struct I420View<'a> {
    pub width: usize,
    pub height: usize,
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
    pub y_stride: usize,
    pub uv_stride: usize,
}

/// Why a buffer cannot be viewed as I420 of the given geometry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "buffer of {len} bytes is too short for {width}x{height} I420 with stride {stride} (needs {needed})"
)]
pub struct ShortBuffer {
    pub len: usize,
    pub needed: usize,
    pub width: usize,
    pub height: usize,
    pub stride: usize,
}

impl<'a> I420View<'a> {
    /// Views a contiguous planar YU12 buffer as the V4L2 single-planar layout defines it: the
    /// Y plane with `stride` bytes per line, then U and V with `stride / 2`.
    pub fn from_contiguous(
        buf: &'a [u8],
        width: usize,
        height: usize,
        stride: usize,
    ) -> Result<Self, ShortBuffer> {
        let uv_stride = stride / 2;
        let (ch, y_len) = (height.div_ceil(2), stride * height);
        let uv_len = uv_stride * ch;
        let needed = y_len + 2 * uv_len;
        if buf.len() < needed || stride < width || width == 0 || height == 0 {
            return Err(ShortBuffer {
                len: buf.len(),
                needed,
                width,
                height,
                stride,
            });
        }
        Ok(Self {
            width,
            height,
            y: &buf[..y_len],
            u: &buf[y_len..y_len + uv_len],
            v: &buf[y_len + uv_len..needed],
            y_stride: stride,
            uv_stride,
        })
    }
}

impl YUVSource for I420View<'_> {
    fn dimensions(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn strides(&self) -> (usize, usize, usize) {
        (self.y_stride, self.uv_stride, self.uv_stride)
    }

    fn y(&self) -> &[u8] {
        self.y
    }

    fn u(&self) -> &[u8] {
        self.u
    }

    fn v(&self) -> &[u8] {
        self.v
    }
}

/// An owned, reusable I420 buffer with tight strides (conversion target, test pattern).
#[derive(Debug, Clone, Default)]
pub struct I420Buffer {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl I420Buffer {
    pub fn new(width: usize, height: usize) -> Self {
        let mut b = Self::default();
        b.resize(width, height);
        b
    }

    /// Resizes in place, reusing the allocation when it is large enough.
    pub fn resize(&mut self, width: usize, height: usize) {
        self.width = width;
        self.height = height;
        let len = width * height + 2 * width.div_ceil(2) * height.div_ceil(2);
        self.data.resize(len, 0);
    }

    pub fn chroma_width(&self) -> usize {
        self.width.div_ceil(2)
    }

    pub fn chroma_height(&self) -> usize {
        self.height.div_ceil(2)
    }

    /// Mutable Y, U and V planes.
    pub fn planes_mut(&mut self) -> (&mut [u8], &mut [u8], &mut [u8]) {
        let y_len = self.width * self.height;
        let c_len = self.chroma_width() * self.chroma_height();
        let (y, rest) = self.data.split_at_mut(y_len);
        let (u, v) = rest.split_at_mut(c_len);
        (y, u, &mut v[..c_len])
    }

    /// Copies any I420 view (whatever its strides) into this buffer, tightly packed.
    pub fn copy_from(&mut self, v: &I420View<'_>) {
        self.resize(v.width, v.height);
        let (w, cw, ch) = (v.width, self.chroma_width(), self.chroma_height());
        let (y, u, vv) = self.planes_mut();
        for row in 0..v.height {
            y[row * w..(row + 1) * w].copy_from_slice(&v.y[row * v.y_stride..row * v.y_stride + w]);
        }
        for row in 0..ch {
            let s = row * v.uv_stride;
            u[row * cw..(row + 1) * cw].copy_from_slice(&v.u[s..s + cw]);
            vv[row * cw..(row + 1) * cw].copy_from_slice(&v.v[s..s + cw]);
        }
    }

    pub fn view(&self) -> I420View<'_> {
        let y_len = self.width * self.height;
        let c_len = self.chroma_width() * self.chroma_height();
        I420View {
            width: self.width,
            height: self.height,
            y: &self.data[..y_len],
            u: &self.data[y_len..y_len + c_len],
            v: &self.data[y_len + c_len..y_len + 2 * c_len],
            y_stride: self.width,
            uv_stride: self.chroma_width(),
        }
    }
}

/// One encoded access unit (Annex-B H.264), shared by every viewer without copying.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    pub data: Bytes,
    pub keyframe: bool,
    /// Source frame number since capture started.
    pub seq: u64,
    /// When the source produced the picture.
    pub captured_at: std::time::Instant,
    /// Nominal frame duration, used for RTP timestamps.
    pub duration: std::time::Duration,
    /// Temporal layer (0: keyframes and the base rate); see [`super::continuity`].
    pub temporal_id: u8,
    /// The encoder's target bitrate when it made this frame, bits per second.
    pub target_bps: u32,
    /// For a viewer's first frame only: the frames it needs before this one (the last IDR and
    /// what followed, from the GOP cache), to be sent first, at once.
    pub preroll: Option<std::sync::Arc<[EncodedFrame]>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_view_uses_driver_stride() {
        let (w, h, stride) = (6, 4, 8);
        let buf: Vec<u8> = (0..(stride * h + 2 * (stride / 2) * (h / 2)) as u32)
            .map(|i| i as u8)
            .collect();
        let v = I420View::from_contiguous(&buf, w, h, stride).unwrap();
        assert_eq!(v.strides(), (8, 4, 4));
        assert_eq!(v.y.len(), 32);
        assert_eq!(v.u[0], 32);
        assert_eq!(v.v[0], 40);
        assert_eq!(v.dimensions(), (6, 4));
    }

    #[test]
    fn copy_from_strided_view_packs_tightly() {
        let (w, h, stride) = (4, 2, 8);
        let buf: Vec<u8> = (0..(stride * h + 2 * (stride / 2) * (h / 2)) as u32)
            .map(|i| i as u8)
            .collect();
        let v = I420View::from_contiguous(&buf, w, h, stride).unwrap();
        let mut b = I420Buffer::default();
        b.copy_from(&v);
        assert_eq!(&b.data[..8], &[0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(&b.data[8..10], &[16, 17]);
        assert_eq!(&b.data[10..12], &[20, 21]);
    }

    #[test]
    fn short_buffers_are_rejected() {
        let buf = vec![0u8; 10];
        let e = I420View::from_contiguous(&buf, 4, 4, 4).unwrap_err();
        assert_eq!(e.needed, 24);
        assert!(I420View::from_contiguous(&[0u8; 24], 4, 4, 2).is_err());
    }

    #[test]
    fn owned_buffer_planes_are_disjoint_and_sized() {
        let mut b = I420Buffer::new(5, 3);
        assert_eq!(b.data.len(), 15 + 2 * 3 * 2);
        let (y, u, v) = b.planes_mut();
        assert_eq!((y.len(), u.len(), v.len()), (15, 6, 6));
        y.fill(1);
        u.fill(2);
        v.fill(3);
        let view = b.view();
        assert!(view.y.iter().all(|&p| p == 1));
        assert!(view.u.iter().all(|&p| p == 2));
        assert!(view.v.iter().all(|&p| p == 3));
    }
}
