//! H.264 encoding with openh264 (built from its bundled source): temporal layers, live bitrate, forced IDR.
#![allow(unsafe_code)] // openh264 FFI: live option changes through the raw API.

use openh264::OpenH264API;
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, Profile,
    RateControlMode, UsageType,
};
use openh264::formats::YUVSource;
use openh264_sys2::{
    ENCODER_OPTION_BITRATE, ENCODER_OPTION_MAX_BITRATE, ENCODER_OPTION_SVC_ENCODE_PARAM_EXT,
    SBitrateInfo, SEncParamExt, SPATIAL_LAYER_0, SPATIAL_LAYER_ALL, VIDEO_CODING_LAYER,
};

/// Most temporal layers rtcam asks openh264 for (its limit is 4).
pub const MAX_TEMPORAL_LAYERS: u8 = 4;

/// Encoder settings that can change while streaming.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderSettings {
    pub bitrate: u32,
    pub fps: u32,
    pub keyframe_interval: u32,
    /// Temporal layers (1..=4): with n layers, layer 0 alone has 1/2^(n-1) of the frame rate
    /// and each further layer doubles it, so a viewer can be sent a lower frame rate of the
    /// one stream by skipping the upper layers.
    pub temporal_layers: u8,
}

impl EncoderSettings {
    /// Frames in one temporal pattern: every this many frames a layer-0 frame.
    pub fn gop_size(&self) -> u32 {
        1 << (self.temporal_layers.clamp(1, MAX_TEMPORAL_LAYERS) - 1)
    }

    /// The keyframe interval openh264 is given: a multiple of the temporal pattern, as it
    /// requires, rounded up.
    pub fn effective_keyframe_interval(&self) -> u32 {
        self.keyframe_interval.div_ceil(self.gop_size()) * self.gop_size()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("openh264: {0}")]
    OpenH264(#[from] openh264::Error),
    #[error("openh264 rejected option {option} (code {code})")]
    Option { option: &'static str, code: i32 },
}

/// What [`H264Encoder::encode`] produced.
pub struct Encoded {
    pub keyframe: bool,
    /// Temporal layer of the picture: 0 for keyframes and the base rate. A picture of layer
    /// `t` references only earlier pictures of layers `<= t` (openh264 builds its reference
    /// lists that way), so dropping every picture above some layer leaves a decodable stream.
    pub temporal_id: u8,
}

/// openh264 encoder producing Constrained Baseline Annex-B access units.
pub struct H264Encoder {
    inner: Encoder,
    settings: EncoderSettings,
    force_idr: bool,
    /// True once the first picture went in: the encoder initializes lazily on it.
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
                settings.effective_keyframe_interval(),
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

    /// The current target bitrate, bits per second.
    pub fn bitrate(&self) -> u32 {
        self.settings.bitrate
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
        let temporal_id = (0..stream.num_layers())
            .filter_map(|i| stream.layer(i))
            .filter(|l| l.raw_info().uiLayerType == VIDEO_CODING_LAYER as u8)
            .map(|l| l.raw_info().uiTemporalId)
            .max()
            .unwrap_or(0);
        if !self.started {
            // The first frame after initialization is always an IDR. openh264 sized its
            // buffers from the constructor's bitrate; nothing to re-apply.
            self.started = true;
            if self.settings.temporal_layers > 1 {
                // The openh264 crate initializes with one temporal layer; the layers are
                // set on the initialized encoder (a re-initialization: the next picture is
                // an IDR again).
                self.apply_temporal_layers()?;
            }
        }
        if keyframe {
            self.force_idr = false;
        }
        Ok(Encoded {
            keyframe,
            temporal_id,
        })
    }

    fn apply_temporal_layers(&mut self) -> Result<(), EncodeError> {
        let mut params = SEncParamExt::default();
        // SAFETY: the encoder is initialized (a picture went in); GET copies the current
        // SEncParamExt into `params` and SET reads one back, both through a pointer that
        // lives for the duration of the call.
        let code = unsafe {
            self.inner.raw_api().get_option(
                ENCODER_OPTION_SVC_ENCODE_PARAM_EXT,
                (&raw mut params).cast(),
            )
        };
        check(code, "GET SVC_ENCODE_PARAM_EXT")?;
        params.iTemporalLayerNum =
            i32::from(self.settings.temporal_layers.min(MAX_TEMPORAL_LAYERS));
        params.uiIntraPeriod = self.settings.effective_keyframe_interval();
        // SAFETY: as above.
        let code = unsafe {
            self.inner.raw_api().set_option(
                ENCODER_OPTION_SVC_ENCODE_PARAM_EXT,
                (&raw mut params).cast(),
            )
        };
        check(code, "SVC_ENCODE_PARAM_EXT (temporal layers)")
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
            temporal_layers: 1,
        }
    }

    /// NAL unit types of an Annex-B access unit.
    fn nal_types(au: &[u8]) -> Vec<u8> {
        let mut types = Vec::new();
        let mut i = 0;
        while i + 3 < au.len() {
            if au[i..i + 3] == [0, 0, 1] {
                types.push(au[i + 3] & 0x1f);
                i += 3;
            } else {
                i += 1;
            }
        }
        types
    }

    /// Encodes `n` pattern pictures with 3 temporal layers: (seq, temporal id, keyframe, bytes).
    fn layered_stream(n: u32) -> Vec<(u32, u8, bool, Vec<u8>)> {
        let (w, h) = (320, 240);
        let pattern = PatternGenerator::new(w, h);
        let mut frame = I420Buffer::default();
        let mut enc = H264Encoder::new(EncoderSettings {
            temporal_layers: 3,
            keyframe_interval: 30, // rounded up to 32, a multiple of the 4-frame pattern
            ..settings()
        })
        .unwrap();
        let mut out = Vec::new();
        (0..n)
            .map(|seq| {
                pattern.render(seq, 1000 + seq, &mut frame);
                let e = enc
                    .encode(&frame.view(), u64::from(seq) * 33, &mut out)
                    .unwrap();
                (seq, e.temporal_id, e.keyframe, out.clone())
            })
            .collect()
    }

    /// Decodes the access units in order; returns each picture's seq stamp and a hash of its
    /// luma plane.
    fn decode_all<'a>(aus: impl Iterator<Item = &'a [u8]>) -> Vec<(u32, u64)> {
        use std::hash::{Hash, Hasher};
        let mut dec = Decoder::new().unwrap();
        let mut pictures = Vec::new();
        for au in aus {
            let Some(p) = dec.decode(au).expect("decodes without error") else {
                continue;
            };
            let (ys, _, _) = p.strides();
            let (w, h) = p.dimensions();
            let (seq, _) = read_stamp(p.y(), ys, w).expect("stamp intact");
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            for row in 0..h {
                p.y()[row * ys..row * ys + w].hash(&mut hasher);
            }
            pictures.push((seq, hasher.finish()));
        }
        pictures
    }

    #[test]
    fn three_temporal_layers_follow_the_four_frame_pattern() {
        let stream = layered_stream(72);
        for (seq, tid, keyframe, au) in &stream {
            let types = nal_types(au);
            assert!(
                types.iter().all(|t| [1, 5, 7, 8].contains(t)),
                "seq {seq}: plain AVC NAL units only (no SVC prefix NALs): {types:?}"
            );
            if *keyframe {
                assert_eq!(*tid, 0, "keyframes are layer 0");
            }
        }
        // The first picture initializes the encoder with one layer; the layers start with the
        // IDR after it.
        assert!(stream[0].2 && stream[1].2, "two IDRs at the start");
        let tids: Vec<u8> = stream[1..13].iter().map(|f| f.1).collect();
        assert_eq!(tids, vec![0, 2, 1, 2, 0, 2, 1, 2, 0, 2, 1, 2]);
        let keyframes: Vec<u32> = stream.iter().filter(|f| f.2).map(|f| f.0).collect();
        assert_eq!(
            keyframes,
            vec![0, 1, 33, 65],
            "periodic IDR every 32 frames"
        );
    }

    #[test]
    fn dropping_upper_temporal_layers_leaves_the_lower_ones_bit_exact() {
        let stream = layered_stream(72);
        let full = decode_all(stream.iter().map(|f| f.3.as_slice()));
        assert_eq!(full.len(), 72);
        let full: std::collections::HashMap<u32, u64> = full.into_iter().collect();
        for max_layer in [0u8, 1] {
            let kept: Vec<_> = stream.iter().filter(|f| f.1 <= max_layer).collect();
            let decoded = decode_all(kept.iter().map(|f| f.3.as_slice()));
            assert_eq!(decoded.len(), kept.len(), "every kept picture decodes");
            for (seq, hash) in decoded {
                assert_eq!(
                    full[&seq], hash,
                    "picture {seq} with layers <= {max_layer} differs from the full stream"
                );
            }
        }
        // Losing one layer-1 picture: the pictures of layers >= 1 wait for the next layer-0
        // picture, layer 0 goes on; everything still decodes exactly.
        let lost = stream.iter().find(|f| f.1 == 1 && f.0 > 10).unwrap().0;
        let mut broken = false;
        let kept: Vec<_> = stream
            .iter()
            .filter(|f| {
                if f.0 == lost {
                    broken = true;
                    return false;
                }
                if f.1 == 0 {
                    broken = false;
                }
                !(broken && f.1 >= 1)
            })
            .collect();
        let decoded = decode_all(kept.iter().map(|f| f.3.as_slice()));
        assert_eq!(decoded.len(), kept.len());
        assert!(decoded.iter().all(|(seq, hash)| full[seq] == *hash));
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
