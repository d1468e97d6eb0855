//! JPEG snapshots straight from I420 (YCbCr in, YCbCr out: no RGB detour).

use jpeg_encoder::{Encoder, EncodingError, ImageBuffer, JpegColorType, SamplingFactor};

use super::frame::I420Buffer;
use super::range::RangeLuts;

struct I420Image<'a> {
    frame: &'a I420Buffer,
    luts: RangeLuts,
}

impl ImageBuffer for I420Image<'_> {
    fn get_jpeg_color_type(&self) -> JpegColorType {
        JpegColorType::Ycbcr
    }

    fn width(&self) -> u16 {
        self.frame.width as u16
    }

    fn height(&self) -> u16 {
        self.frame.height as u16
    }

    fn fill_buffers(&self, y: u16, buffers: &mut [Vec<u8>; 4]) {
        let v = self.frame.view();
        let row = usize::from(y);
        let luma = &v.y[row * v.y_stride..row * v.y_stride + v.width];
        let crow = row / 2;
        let cb = &v.u[crow * v.uv_stride..];
        let cr = &v.v[crow * v.uv_stride..];
        for (x, &l) in luma.iter().enumerate() {
            buffers[0].push(self.luts.luma[usize::from(l)]);
            buffers[1].push(self.luts.chroma[usize::from(cb[x / 2])]);
            buffers[2].push(self.luts.chroma[usize::from(cr[x / 2])]);
        }
    }
}

/// Encodes one I420 picture as a 4:2:0 baseline JPEG.
pub fn encode_jpeg(frame: &I420Buffer, quality: u8) -> Result<Vec<u8>, EncodingError> {
    if frame.width > usize::from(u16::MAX) || frame.height > usize::from(u16::MAX) {
        return Err(EncodingError::BadImageData {
            length: frame.data.len(),
            required: 0,
        });
    }
    let mut out = Vec::with_capacity(frame.width * frame.height / 4);
    let mut encoder = Encoder::new(&mut out, quality);
    encoder.set_sampling_factor(SamplingFactor::F_2_2);
    encoder.encode_image(I420Image {
        frame,
        luts: RangeLuts::limited_to_full(),
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::pattern::{PatternGenerator, read_stamp};

    #[test]
    fn snapshot_decodes_with_the_stream_size_and_pattern() {
        let (w, h) = (640, 480);
        let mut frame = I420Buffer::default();
        PatternGenerator::new(w, h).render(4242, 99, &mut frame);
        let jpeg = encode_jpeg(&frame, 85).unwrap();
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8], "JPEG SOI marker");
        let mut decoder = jpeg_decoder::Decoder::new(&jpeg[..]);
        let rgb = decoder.decode().unwrap();
        let info = decoder.info().unwrap();
        assert_eq!((info.width as usize, info.height as usize), (w, h));
        // Back to limited-range luma, then read the stamp like a viewer would.
        let luma: Vec<u8> = rgb
            .chunks_exact(3)
            .map(|p| {
                let y = 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]);
                (y * 219.0 / 255.0 + 16.0).round() as u8
            })
            .collect();
        assert_eq!(read_stamp(&luma, w, w), Some((4242, 99)));
    }
}
