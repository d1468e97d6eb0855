//! MJPEG camera frames to I420: decode with zune-jpeg (standard Huffman tables when a UVC frame omits them), then one pass into a reused I420 buffer.

use zune_jpeg::JpegDecoder;
use zune_jpeg::zune_core::bytestream::ZCursor;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

use super::frame::{I420Buffer, I420View};
use super::range::RangeLuts;

/// Why one MJPEG frame could not be used (the next one may be fine).
#[derive(Debug, thiserror::Error)]
pub enum MjpegError {
    #[error("corrupt JPEG frame: {0}")]
    Corrupt(String),
    #[error("JPEG frame is {got_w}x{got_h}, the camera was set to {want_w}x{want_h}")]
    Size {
        got_w: usize,
        got_h: usize,
        want_w: usize,
        want_h: usize,
    },
}

/// Decodes MJPEG frames of one size into reused output buffers (zune-jpeg still keeps its
/// own per-frame working memory).
pub struct MjpegDecoder {
    /// Interleaved full-resolution Y, Cb, Cr as the decoder writes it.
    ycc: Vec<u8>,
    /// A frame without Huffman tables, re-marked as Motion-JPEG (see `needs_avi1_marker`).
    marked: Vec<u8>,
    i420: I420Buffer,
    luts: RangeLuts,
}

impl Default for MjpegDecoder {
    fn default() -> Self {
        Self {
            ycc: Vec::new(),
            marked: Vec::new(),
            i420: I420Buffer::default(),
            luts: RangeLuts::full_to_limited(),
        }
    }
}

impl MjpegDecoder {
    /// Decodes `jpeg`, which must be `width` x `height`, into video-range I420. Returns the
    /// picture and the number of bytes written after decoding.
    pub fn decode(
        &mut self,
        jpeg: &[u8],
        width: usize,
        height: usize,
    ) -> Result<(I420View<'_>, usize), MjpegError> {
        if !ends_with_eoi(jpeg) {
            // USB bandwidth trouble cuts frames short; a decoder would fill the rest grey.
            return Err(MjpegError::Corrupt(
                "truncated frame (no end-of-image marker)".into(),
            ));
        }
        let jpeg = if needs_avi1_marker(jpeg) {
            self.marked.clear();
            self.marked.extend_from_slice(&jpeg[..2]);
            self.marked.extend_from_slice(&AVI1_APP0);
            self.marked.extend_from_slice(&jpeg[2..]);
            &self.marked[..]
        } else {
            jpeg
        };
        let options = DecoderOptions::default()
            .jpeg_set_out_colorspace(ColorSpace::YCbCr)
            // A corrupt header cannot make the decoder allocate beyond the camera's size.
            .set_max_width(width)
            .set_max_height(height);
        let mut decoder = JpegDecoder::new_with_options(ZCursor::new(jpeg), options);
        decoder
            .decode_headers()
            .map_err(|e| MjpegError::Corrupt(format!("{e:?}")))?;
        let (got_w, got_h) = decoder
            .dimensions()
            .ok_or_else(|| MjpegError::Corrupt("no frame header".into()))?;
        if (got_w, got_h) != (width, height) {
            return Err(MjpegError::Size {
                got_w,
                got_h,
                want_w: width,
                want_h: height,
            });
        }
        if decoder.output_colorspace() != Some(ColorSpace::YCbCr) {
            return Err(MjpegError::Corrupt(format!(
                "not a YCbCr JPEG ({:?})",
                decoder.input_colorspace()
            )));
        }
        self.ycc.resize(width * height * 3, 0);
        decoder
            .decode_into(&mut self.ycc)
            .map_err(|e| MjpegError::Corrupt(format!("{e:?}")))?;
        self.i420.resize(width, height);
        ycc444_to_i420(&self.ycc, width, height, &self.luts, &mut self.i420);
        let written = self.i420.data.len();
        Ok((self.i420.view(), written))
    }
}

/// An APP0 segment with the "AVI1" identifier: it marks a frame as Motion-JPEG, whose missing
/// Huffman tables are the standard ones of ISO 10918-1 K.3.3 (USB Video Class MJPEG payload
/// spec). zune-jpeg then fills in those tables.
const AVI1_APP0: [u8; 9] = [0xFF, 0xE0, 0x00, 0x07, b'A', b'V', b'I', b'1', 0x00];

/// True when the frame ends with EOI (0xFFD9), ignoring the zero padding some drivers add.
fn ends_with_eoi(jpeg: &[u8]) -> bool {
    let end = jpeg.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    jpeg[..end].ends_with(&[0xFF, 0xD9])
}

/// True when a frame defines no Huffman table before its first scan and does not already say
/// it is Motion-JPEG: many UVC cameras leave the (standard) tables out to save bandwidth.
fn needs_avi1_marker(jpeg: &[u8]) -> bool {
    if !jpeg.starts_with(&[0xFF, 0xD8]) {
        return false; // not a JPEG; let the decoder say so
    }
    let mut i = 2;
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            return false; // not at a marker: malformed, the decoder reports it
        }
        let marker = jpeg[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        let len = usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]));
        match marker {
            0xC4 => return false,
            0xDA => return true,
            0xE0 if jpeg[i + 4..].starts_with(b"AVI1") => return false,
            _ => {}
        }
        i += 2 + len;
    }
    false
}

/// Interleaved full-range YCbCr 4:4:4 to video-range I420: luma through the range table,
/// chroma averaged over each 2x2 block, then through the range table.
fn ycc444_to_i420(ycc: &[u8], width: usize, height: usize, luts: &RangeLuts, out: &mut I420Buffer) {
    let cw = out.chroma_width();
    let (y, u, v) = out.planes_mut();
    for (row, line) in ycc.chunks_exact(width * 3).enumerate().take(height) {
        for (dst, px) in y[row * width..(row + 1) * width]
            .iter_mut()
            .zip(line.chunks_exact(3))
        {
            *dst = luts.luma[usize::from(px[0])];
        }
    }
    for crow in 0..height.div_ceil(2) {
        let r0 = 2 * crow;
        // An odd last line (or column) pairs with itself.
        let r1 = (r0 + 1).min(height - 1);
        let a = &ycc[r0 * width * 3..(r0 + 1) * width * 3];
        let b = &ycc[r1 * width * 3..(r1 + 1) * width * 3];
        for cx in 0..cw {
            let x0 = 2 * cx;
            let x1 = (x0 + 1).min(width - 1);
            let sum = |k: usize| {
                u32::from(a[x0 * 3 + k])
                    + u32::from(a[x1 * 3 + k])
                    + u32::from(b[x0 * 3 + k])
                    + u32::from(b[x1 * 3 + k])
            };
            u[crow * cw + cx] = luts.chroma[((sum(1) + 2) / 4) as usize];
            v[crow * cw + cx] = luts.chroma[((sum(2) + 2) / 4) as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jpeg_encoder::{ColorType, Encoder, SamplingFactor};

    /// A full-range YCbCr test picture: luma ramp left to right, chroma in four quadrants.
    fn picture(width: usize, height: usize) -> Vec<u8> {
        let mut ycc = Vec::with_capacity(width * height * 3);
        for row in 0..height {
            for x in 0..width {
                let luma = (x * 255 / (width - 1)) as u8;
                let (cb, cr) = match (x < width / 2, row < height / 2) {
                    (true, true) => (64, 192),
                    (false, true) => (192, 64),
                    (true, false) => (128, 128),
                    (false, false) => (200, 200),
                };
                ycc.extend_from_slice(&[luma, cb, cr]);
            }
        }
        ycc
    }

    fn jpeg(width: usize, height: usize, sampling: SamplingFactor) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out, 95);
        enc.set_sampling_factor(sampling);
        enc.encode(
            &picture(width, height),
            width as u16,
            height as u16,
            ColorType::Ycbcr,
        )
        .unwrap();
        out
    }

    #[test]
    fn decodes_camera_sampling_to_video_range_i420() {
        // UVC MJPEG is 4:2:2; some cameras send 4:2:0.
        for sampling in [SamplingFactor::F_2_1, SamplingFactor::F_2_2] {
            let (w, h) = (320, 240);
            let mut dec = MjpegDecoder::default();
            let data = jpeg(w, h, sampling);
            let (view, written) = dec.decode(&data, w, h).unwrap();
            assert_eq!(written, w * h * 3 / 2);
            assert_eq!((view.width, view.height), (w, h));
            // Luma: full-range ramp 0..255 becomes 16..235.
            let left = view.y[120 * view.y_stride + 2];
            let right = view.y[120 * view.y_stride + w - 3];
            assert!(left.abs_diff(16) <= 4, "{left}");
            assert!(right.abs_diff(235) <= 4, "{right}");
            let mid = view.y[120 * view.y_stride + w / 2];
            assert!(mid.abs_diff(16 + 219 / 2) <= 4, "{mid}");
            // Chroma quadrants, centre of each, scaled to video range.
            let c = |plane: &[u8], cx: usize, cy: usize| plane[cy * view.uv_stride + cx];
            let limited = |v: u8| (128.0 + (f32::from(v) - 128.0) * 224.0 / 255.0).round() as u8;
            for (cx, cy, cb, cr) in [
                (40, 30, 64, 192),
                (120, 30, 192, 64),
                (40, 90, 128, 128),
                (120, 90, 200, 200),
            ] {
                assert!(
                    c(view.u, cx, cy).abs_diff(limited(cb)) <= 3,
                    "{sampling:?} u at {cx},{cy}"
                );
                assert!(
                    c(view.v, cx, cy).abs_diff(limited(cr)) <= 3,
                    "{sampling:?} v at {cx},{cy}"
                );
            }
        }
    }

    #[test]
    fn missing_huffman_tables_use_the_standard_ones() {
        // UVC cameras may leave out DHT; the decoder must then use ISO 10918-1 K.3.3's tables.
        // jpeg-encoder writes exactly those standard tables, so dropping its DHT segments
        // gives the frame such a camera sends.
        let data = jpeg(160, 120, SamplingFactor::F_2_1);
        let mut stripped = Vec::with_capacity(data.len());
        let mut i = 0;
        let mut dropped = 0;
        while i + 4 <= data.len() {
            if data[i] == 0xFF && data[i + 1] == 0xC4 {
                let len = usize::from(u16::from_be_bytes([data[i + 2], data[i + 3]]));
                i += 2 + len;
                dropped += 1;
                continue;
            }
            if data[i] == 0xFF && data[i + 1] == 0xDA {
                stripped.extend_from_slice(&data[i..]);
                break;
            }
            stripped.push(data[i]);
            i += 1;
        }
        assert!(dropped > 0, "the test picture had Huffman tables to drop");
        let mut dec = MjpegDecoder::default();
        let (view, _) = dec.decode(&stripped, 160, 120).unwrap();
        assert!(view.y[60 * view.y_stride + 157].abs_diff(235) <= 4);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let mut dec = MjpegDecoder::default();
        let good = jpeg(160, 120, SamplingFactor::F_2_1);
        assert!(matches!(
            dec.decode(&good, 320, 240),
            Err(MjpegError::Size { got_w: 160, .. })
        ));
        for bad in [
            &b""[..],
            b"\xFF\xD8",
            b"not a jpeg at all",
            &good[..good.len() / 3],
        ] {
            assert!(dec.decode(bad, 160, 120).is_err());
        }
        // Still fine afterwards, also with the zero padding some drivers leave after EOI.
        assert!(dec.decode(&good, 160, 120).is_ok());
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 100]);
        assert!(dec.decode(&padded, 160, 120).is_ok());
    }
}
