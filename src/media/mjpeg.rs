//! MJPEG camera frames to I420: libjpeg-turbo decodes straight to planar YCbCr (no colour conversion, no chroma upsampling), then one in-place pass to video range.

use turbojpeg::{Colorspace, Decompressor, Subsamp, YuvImage};

use super::frame::I420View;

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
    #[error("unsupported JPEG frame: {0}")]
    Unsupported(String),
    #[error("JPEG decoder could not start: {0}")]
    Decoder(String),
}

/// Decodes MJPEG frames of one size into reused buffers: after the first frame nothing is
/// allocated (libjpeg-turbo keeps its working memory in its handle).
#[derive(Default)]
pub struct MjpegDecoder {
    /// Created on the first frame, so a camera that never sends MJPEG costs nothing.
    decompressor: Option<Decompressor>,
    /// The decoder's planes, tightly packed: Y (then turned to video range in place), Cb, Cr
    /// at the frame's own chroma subsampling.
    planes: Vec<u8>,
    /// 4:2:0 video-range chroma handed to the encoder.
    u: Vec<u8>,
    v: Vec<u8>,
}

impl MjpegDecoder {
    /// Decodes `jpeg`, which must be `width` x `height`, into video-range I420. Returns the
    /// picture and the number of bytes written after decoding (luma mapped in place, 4:2:0
    /// chroma).
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
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            none => {
                none.insert(Decompressor::new().map_err(|e| MjpegError::Decoder(e.to_string()))?)
            }
        };
        let result = decode_planes(decompressor, jpeg, width, height, &mut self.planes);
        if matches!(result, Err(MjpegError::Corrupt(_))) {
            // libjpeg keeps state between images (tables, a half-read stream): a corrupt
            // frame could spoil the next good one, so the next frame gets a fresh handle.
            self.decompressor = None;
        }
        let geometry = result?;
        let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
        self.u.resize(cw * ch, 0);
        self.v.resize(cw * ch, 0);
        let (y, chroma) = self.planes.split_at_mut(geometry.luma);
        luma_to_video_range(&mut y[..geometry.y_stride * height]);
        if geometry.chroma == 0 {
            // Greyscale: neutral chroma.
            self.u.fill(128);
            self.v.fill(128);
        } else {
            let (cb, cr) = chroma.split_at(geometry.chroma);
            chroma_to_i420(cb, &geometry, &mut self.u);
            chroma_to_i420(&cr[..geometry.chroma], &geometry, &mut self.v);
        }
        let view = I420View {
            width,
            height,
            y: &self.planes[..geometry.y_stride * height],
            u: &self.u,
            v: &self.v,
            y_stride: geometry.y_stride,
            uv_stride: cw,
        };
        Ok((view, width * height + 2 * cw * ch))
    }
}

/// Decodes one frame's planes into `planes` (resized) and returns their layout.
fn decode_planes(
    decompressor: &mut Decompressor,
    jpeg: &[u8],
    width: usize,
    height: usize,
    planes: &mut Vec<u8>,
) -> Result<PlaneGeometry, MjpegError> {
    // Frames without Huffman tables (many UVC cameras leave out the standard ones) decode
    // as they are: libjpeg-turbo then uses ISO 10918-1 K.3.3's tables.
    let header = decompressor
        .read_header(jpeg)
        .map_err(|e| MjpegError::Corrupt(e.to_string()))?;
    if (header.width, header.height) != (width, height) {
        return Err(MjpegError::Size {
            got_w: header.width,
            got_h: header.height,
            want_w: width,
            want_h: height,
        });
    }
    if !matches!(header.colorspace, Colorspace::YCbCr | Colorspace::Gray) {
        return Err(MjpegError::Unsupported(format!(
            "{:?} colour space",
            header.colorspace
        )));
    }
    let (sx, sy) = subsampling(header.subsamp)?;
    let geometry = PlaneGeometry::new(width, height, sx, sy);
    let needed = turbojpeg::yuv_pixels_len(width, 1, height, header.subsamp)
        .map_err(|e| MjpegError::Unsupported(e.to_string()))?;
    if needed != geometry.total() {
        return Err(MjpegError::Unsupported(format!(
            "plane layout {geometry:?} does not match TurboJPEG's {needed} bytes"
        )));
    }
    planes.resize(needed, 0);
    let image = YuvImage {
        pixels: &mut planes[..],
        width,
        align: 1,
        height,
        subsamp: header.subsamp,
    };
    // A warning (corrupt entropy data, premature end of a segment) is an error too:
    // TurboJPEG reports it as a failure after filling the picture with guesses.
    decompressor
        .decompress_to_yuv(jpeg, image)
        .map_err(|e| MjpegError::Corrupt(e.to_string()))?;
    Ok(geometry)
}

/// Horizontal and vertical chroma subsampling factors of a JPEG (0 for greyscale).
fn subsampling(subsamp: Subsamp) -> Result<(usize, usize), MjpegError> {
    match subsamp {
        Subsamp::None => Ok((1, 1)),
        Subsamp::Sub2x1 => Ok((2, 1)),
        Subsamp::Sub2x2 => Ok((2, 2)),
        Subsamp::Sub1x2 => Ok((1, 2)),
        Subsamp::Gray => Ok((0, 0)),
        other => Err(MjpegError::Unsupported(format!(
            "{other:?} chroma subsampling"
        ))),
    }
}

/// Layout of the packed planes TurboJPEG writes with `align` 1 (its `tjPlaneWidth` and
/// `tjPlaneHeight`): the luma plane is padded to a whole number of chroma samples (161x121
/// at 4:2:0 is stored as 162x122), chroma is that divided by the subsampling factors.
#[derive(Debug)]
struct PlaneGeometry {
    width: usize,
    height: usize,
    sx: usize,
    sy: usize,
    /// Luma line length and plane size.
    y_stride: usize,
    luma: usize,
    /// Chroma plane width and height, and size (0 for greyscale).
    cw: usize,
    ch: usize,
    chroma: usize,
}

impl PlaneGeometry {
    fn new(width: usize, height: usize, sx: usize, sy: usize) -> Self {
        let (lw, lh) = (
            width.next_multiple_of(sx.max(1)),
            height.next_multiple_of(sy.max(1)),
        );
        let cw = lw.checked_div(sx).unwrap_or(0);
        let ch = if cw == 0 { 0 } else { lh / sy };
        Self {
            width,
            height,
            sx,
            sy,
            y_stride: lw,
            luma: lw * lh,
            cw,
            ch,
            chroma: cw * ch,
        }
    }

    fn total(&self) -> usize {
        self.luma + 2 * self.chroma
    }
}

/// Full-range (JFIF) luma to video range in place: `round(16 + y * 219 / 255)`, written as
/// integer arithmetic the compiler vectorises (no rounding ties: `y * 219` is never an odd
/// multiple of 127.5).
fn luma_to_video_range(y: &mut [u8]) {
    for p in y {
        *p = ((u16::from(*p) * 219 + 16 * 255 + 127) / 255) as u8;
    }
}

/// Full-range chroma sample to video range: `round(128 + (c - 128) * 224 / 255)`, i.e.
/// `(c * 224 + 128 * 31 + 127) / 255` (no ties either).
fn chroma_to_video_range(c: u16) -> u8 {
    ((c * 224 + 128 * 31 + 127) / 255) as u8
}

/// One full-range chroma plane at the JPEG's subsampling to a video-range 4:2:0 plane
/// (`out`: ceil(w/2) x ceil(h/2)). 4:2:0 is mapped as it is; 4:2:2 (what UVC cameras send)
/// averages each vertical pair, `(a + b + 1) >> 1`; other layouts average the samples that
/// cover each 2x2 block of luma.
fn chroma_to_i420(src: &[u8], g: &PlaneGeometry, out: &mut [u8]) {
    let (ow, oh) = (g.width.div_ceil(2), g.height.div_ceil(2));
    match (g.sx, g.sy) {
        (2, 2) => {
            for (o, &c) in out.iter_mut().zip(src) {
                *o = chroma_to_video_range(u16::from(c));
            }
        }
        (2, 1) => {
            for (row, line) in out.chunks_exact_mut(ow).enumerate() {
                let a = &src[(2 * row) * g.cw..][..ow];
                // An odd last line pairs with itself.
                let b = &src[(2 * row + 1).min(g.ch - 1) * g.cw..][..ow];
                for ((o, &p), &q) in line.iter_mut().zip(a).zip(b) {
                    *o = chroma_to_video_range((u16::from(p) + u16::from(q) + 1) >> 1);
                }
            }
        }
        (sx, sy) => {
            // 4:4:4 and 4:4:0: the chroma samples under luma (2x, 2y)..(2x+1, 2y+1).
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = 0u16;
                    let mut n = 0u16;
                    for ly in [2 * oy, (2 * oy + 1).min(g.height - 1)] {
                        for lx in [2 * ox, (2 * ox + 1).min(g.width - 1)] {
                            sum += u16::from(src[(ly / sy) * g.cw + lx / sx]);
                            n += 1;
                        }
                    }
                    out[oy * ow + ox] = chroma_to_video_range((sum + n / 2) / n);
                }
            }
        }
    }
}

/// True when the frame ends with EOI (0xFFD9), ignoring the zero padding some drivers add.
fn ends_with_eoi(jpeg: &[u8]) -> bool {
    let end = jpeg.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    jpeg[..end].ends_with(&[0xFF, 0xD9])
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
        let without: Vec<u8> = [view.y, view.u, view.v].concat();
        // The same picture as with the tables, on a fresh decoder and after a full frame.
        let mut fresh = MjpegDecoder::default();
        let (view, _) = fresh.decode(&data, 160, 120).unwrap();
        let with: Vec<u8> = [view.y, view.u, view.v].concat();
        assert_eq!(without, with);
        let (view, _) = fresh.decode(&stripped, 160, 120).unwrap();
        assert_eq!([view.y, view.u, view.v].concat(), with);
    }

    #[test]
    fn range_arithmetic_equals_the_lookup_tables() {
        let luts = crate::media::range::RangeLuts::full_to_limited();
        let mut all: Vec<u8> = (0..=255).collect();
        luma_to_video_range(&mut all);
        assert_eq!(all[..], luts.luma[..]);
        for c in 0..=255u8 {
            assert_eq!(
                chroma_to_video_range(u16::from(c)),
                luts.chroma[usize::from(c)]
            );
        }
    }

    #[test]
    fn other_samplings_and_odd_sizes_decode() {
        // 4:4:4 and 4:2:0 at an odd size: chroma is averaged over each 2x2 block of luma.
        for sampling in [
            SamplingFactor::F_1_1,
            SamplingFactor::F_2_2,
            SamplingFactor::F_2_1,
        ] {
            let (w, h) = (161, 121);
            let mut dec = MjpegDecoder::default();
            let (view, written) = dec.decode(&jpeg(w, h, sampling), w, h).unwrap();
            assert_eq!(written, w * h + 2 * 81 * 61);
            assert_eq!(
                (view.u.len(), view.v.len(), view.uv_stride),
                (81 * 61, 81 * 61, 81)
            );
            let limited = |v: u8| (128.0 + (f32::from(v) - 128.0) * 224.0 / 255.0).round() as u8;
            // Bottom-right quadrant (200, 200), including the odd last row and column.
            for (cx, cy) in [(60, 45), (80, 60)] {
                let u = view.u[cy * 81 + cx];
                assert!(
                    u.abs_diff(limited(200)) <= 3,
                    "{sampling:?} u {u} at {cx},{cy}"
                );
            }
        }
    }

    #[test]
    fn greyscale_frames_get_neutral_chroma() {
        let (w, h) = (64, 48);
        let grey: Vec<u8> = (0..w * h).map(|i| (i % w * 4) as u8).collect();
        let mut out = Vec::new();
        Encoder::new(&mut out, 90)
            .encode(&grey, w as u16, h as u16, ColorType::Luma)
            .unwrap();
        let mut dec = MjpegDecoder::default();
        let (view, _) = dec.decode(&out, w, h).unwrap();
        assert!(view.u.iter().chain(view.v).all(|&c| c == 128));
        assert!(view.y[w - 1].abs_diff(16 + (252 * 219 / 255) as u8) <= 3);
    }

    #[test]
    fn corrupted_entropy_data_never_panics() {
        // Deterministic mutations of a good frame: flipped bytes and cut-and-patched tails.
        // Each is an error or a picture, never a panic, and the decoder stays usable.
        let good = jpeg(160, 120, SamplingFactor::F_2_1);
        let mut dec = MjpegDecoder::default();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut errors = 0;
        for round in 0..200 {
            let mut bad = good.clone();
            for _ in 0..1 + round % 8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = 2 + (x as usize) % (bad.len() - 4);
                bad[at] ^= (x >> 32) as u8 | 1;
            }
            if round % 5 == 0 {
                let cut = 2 + (x as usize >> 8) % (bad.len() - 4);
                bad.truncate(cut);
                bad.extend_from_slice(&[0xFF, 0xD9]);
            }
            if dec.decode(&bad, 160, 120).is_err() {
                errors += 1;
            }
        }
        assert!(errors > 100, "most corrupt frames are reported: {errors}");
        if let Err(e) = dec.decode(&good, 160, 120) {
            panic!("good frame after corrupt ones: {e}");
        }
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
