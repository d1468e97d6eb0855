//! H.264 encoding with openh264 (built from its bundled source): live bitrate/fps, forced IDR.
#![allow(unsafe_code)] // openh264 FFI: live option changes through the raw API.

use openh264::OpenH264API;
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, Profile,
    RateControlMode, UsageType,
};
use openh264::formats::YUVSource;
use openh264_sys2::{
    ENCODER_OPTION_BITRATE, ENCODER_OPTION_MAX_BITRATE, SBitrateInfo, SPATIAL_LAYER_0,
    SPATIAL_LAYER_ALL,
};

/// Encoder settings that can change while streaming.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderSettings {
    pub bitrate: u32,
    pub fps: u32,
    pub keyframe_interval: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("openh264: {0}")]
    OpenH264(#[from] openh264::Error),
    #[error("openh264 rejected option {option} (code {code})")]
    Option { option: &'static str, code: i32 },
}

/// One encoded picture, borrowed from the encoder's internal buffer until the next call.
pub struct Encoded {
    pub keyframe: bool,
}

/// openh264 encoder producing Constrained Baseline Annex-B access units.
pub struct H264Encoder {
    inner: Encoder,
    settings: EncoderSettings,
    force_idr: bool,
    /// True until the first picture went in: the encoder initializes lazily on it.
    started: bool,
}

impl H264Encoder {
    pub fn new(settings: EncoderSettings) -> Result<Self, EncodeError> {
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(settings.bitrate))
            .max_frame_rate(FrameRate::from_hz(settings.fps as f32))
            .rate_control_mode(RateControlMode::Bitrate)
            .usage_type(UsageType::CameraVideoRealTime)
            .profile(Profile::Baseline)
            .skip_frames(true)
            .intra_frame_period(IntraFramePeriod::from_num_frames(
                settings.keyframe_interval,
            ))
            .num_threads(1);
        let inner = Encoder::with_api_config(OpenH264API::from_source(), config)?;
        Ok(Self {
            inner,
            settings,
            force_idr: true,
            started: false,
        })
    }

    /// The next picture will be an IDR with SPS/PPS.
    pub fn request_keyframe(&mut self) {
        self.force_idr = true;
    }

    /// Changes the target bitrate without restarting the stream.
    pub fn set_bitrate(&mut self, bps: u32) -> Result<(), EncodeError> {
        let previous = self.settings.bitrate;
        self.settings.bitrate = bps;
        if self.started {
            self.apply_bitrate(previous)?;
        }
        Ok(())
    }

    fn apply_bitrate(&mut self, previous: u32) -> Result<(), EncodeError> {
        let bps = i32::try_from(self.settings.bitrate).unwrap_or(i32::MAX);
        // openh264 verifies target <= max after each call: raise the max before the target,
        // lower it after.
        let max = [
            (ENCODER_OPTION_MAX_BITRATE, SPATIAL_LAYER_ALL, "MAX_BITRATE"),
            (
                ENCODER_OPTION_MAX_BITRATE,
                SPATIAL_LAYER_0,
                "MAX_BITRATE(0)",
            ),
        ];
        let target = [(ENCODER_OPTION_BITRATE, SPATIAL_LAYER_ALL, "BITRATE")];
        let steps: Vec<_> = if self.settings.bitrate >= previous {
            max.iter().chain(target.iter()).collect()
        } else {
            target.iter().chain(max.iter()).collect()
        };
        for &(option, layer, name) in steps {
            let mut info = SBitrateInfo {
                iLayer: layer,
                iBitrate: bps,
            };
            // SAFETY: the encoder is initialized (`started`); both options read one
            // SBitrateInfo through the pointer, which lives for the duration of the call.
            let code = unsafe {
                self.inner
                    .raw_api()
                    .set_option(option, (&raw mut info).cast())
            };
            check(code, name)?;
        }
        Ok(())
    }

    /// Encodes one picture, appending its Annex-B bytes to `out` (cleared first).
    pub fn encode<S: YUVSource>(
        &mut self,
        picture: &S,
        timestamp_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<Encoded, EncodeError> {
        if self.force_idr && self.started {
            self.inner.force_intra_frame();
        }
        let stream = self
            .inner
            .encode_at(picture, openh264::Timestamp::from_millis(timestamp_ms))?;
        out.clear();
        stream.write_vec(out);
        let keyframe = matches!(stream.frame_type(), FrameType::IDR | FrameType::I);
        if !self.started {
            // The first frame after initialization is always an IDR.
            self.started = true;
            // openh264 sized its buffers from the constructor's bitrate; nothing to re-apply.
        }
        if keyframe {
            self.force_idr = false;
        }
        Ok(Encoded { keyframe })
    }
}

fn check(code: i32, option: &'static str) -> Result<(), EncodeError> {
    if code == 0 {
        Ok(())
    } else {
        Err(EncodeError::Option { option, code })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::frame::I420Buffer;
    use crate::media::pattern::{PatternGenerator, read_stamp};
    use openh264::decoder::Decoder;

    fn settings() -> EncoderSettings {
        EncoderSettings {
            bitrate: 1_000_000,
            fps: 30,
            keyframe_interval: 30,
        }
    }

    #[test]
    fn pattern_survives_encode_decode_with_keyframes_where_asked() {
        let (w, h) = (320, 240);
        let pattern = PatternGenerator::new(w, h);
        let mut frame = I420Buffer::default();
        let mut enc = H264Encoder::new(settings()).unwrap();
        let mut dec = Decoder::new().unwrap();
        let mut out = Vec::new();
        let mut keyframes = Vec::new();
        for seq in 0..50u32 {
            if seq == 10 {
                enc.request_keyframe();
            }
            pattern.render(seq, 1000 + seq, &mut frame);
            let e = enc
                .encode(&frame.view(), u64::from(seq) * 33, &mut out)
                .unwrap();
            assert!(out.starts_with(&[0, 0, 0, 1]), "Annex-B start code");
            if e.keyframe {
                keyframes.push(seq);
            }
            let decoded = dec
                .decode(&out)
                .unwrap()
                .expect("one picture per access unit");
            let (ys, _, _) = decoded.strides();
            assert_eq!(read_stamp(decoded.y(), ys, w), Some((seq, 1000 + seq)));
        }
        // The periodic counter restarts at every IDR: 10 + 30 = 40.
        assert_eq!(keyframes, vec![0, 10, 40], "first, requested, periodic");
    }

    #[test]
    fn live_bitrate_change_changes_output_size() {
        let (w, h) = (320, 240);
        // Random 8x8 blocks, new every frame: bitrate-bound rather than content-bound.
        let mut frame = I420Buffer::new(w, h);
        let mut seed = 0x1234_5678u32;
        let mut enc = H264Encoder::new(EncoderSettings {
            keyframe_interval: 1000,
            ..settings()
        })
        .unwrap();
        let mut out = Vec::new();
        let mut run = |enc: &mut H264Encoder, from: u32| -> usize {
            (from..from + 60)
                .map(|seq| {
                    for (i, p) in frame.data.iter_mut().enumerate() {
                        if i % 8 == 0 {
                            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        }
                        *p = (seed >> 24) as u8;
                    }
                    enc.encode(&frame.view(), u64::from(seq) * 33, &mut out)
                        .unwrap();
                    out.len()
                })
                .skip(30)
                .sum()
        };
        enc.set_bitrate(2_000_000).unwrap();
        let high = run(&mut enc, 0);
        enc.set_bitrate(200_000).unwrap();
        let low = run(&mut enc, 60);
        assert!(low * 2 < high, "low {low} vs high {high}");
    }
}
