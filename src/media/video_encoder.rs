//! The pipeline's H.264 encoder: a V4L2 memory-to-memory encoder when selected and working, else openh264; a failing hardware encoder hands over to openh264 for the same picture.
#![allow(unsafe_code)] // borrowing the camera's exported DMABUF descriptor for the encoder.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use serde::Serialize;

use super::encoder::{EncodeError, EncoderSettings, H264Encoder};
use super::frame::I420View;
use super::h264::backend::{
    Backend, BackendSetting, Decision, EncodeRequest, M2mNode, NoV4l2Encoder, choose,
};
use super::h264::level::StreamDemand;
use super::m2m::encoder::{
    EncodedUnit, EncoderSettings as M2mSettings, M2mEncoder, M2mError, RawInput,
};
use super::m2m::machine::Limits;
use super::m2m::probe::{self, CodecNode};
use super::source::{CapturedFrame, DmaBufRef, SourceInfo};
use super::vdev::FourCc;
use crate::config::EncoderBackend;

/// What the encoder is and how it gets its pictures (published in the device state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct EncoderStatus {
    /// "openh264" or "v4l2".
    pub backend: &'static str,
    /// The V4L2 encoder node and its card name.
    pub device: Option<String>,
    /// V4L2: "dmabuf" (the camera's buffers imported) or "mmap" (copied in); openh264:
    /// "memory" (it reads the picture where it is).
    pub input: &'static str,
    /// Why this backend: the selection of `encoder.backend`.
    pub reason: String,
    /// Why openh264 runs although a hardware encoder was chosen (it failed, or none was found).
    pub fallback: Option<String>,
    /// Why a keyframe cannot be forced (a V4L2 encoder without the control); new viewers then
    /// wait for the next periodic keyframe.
    pub keyframes_unavailable: Option<String>,
}

/// What one encoded picture came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EncodeOutcome {
    pub keyframe: bool,
    /// Temporal layer (openh264's `encoder.temporal_layers`; a hardware encoder makes one
    /// layer, 0).
    pub temporal_id: u8,
    /// Pixel bytes copied for this picture: the source's conversion plus any copy into the
    /// encoder's buffers (0: the encoder read the camera's buffer).
    pub bytes_copied: u64,
}

/// A hardware H.264 encoder as the pipeline uses it (a seam for tests).
pub(crate) trait HwEncode: Send {
    /// (device, card) for the status.
    fn describe(&self) -> (String, String);
    /// Encodes one picture into `out` (cleared first, Annex-B). `dmabuf`: the camera buffer
    /// holding `view`, when it has one.
    fn encode(
        &mut self,
        view: &I420View<'_>,
        dmabuf: Option<DmaBufRef>,
        keyframe: bool,
        out: &mut Vec<u8>,
    ) -> Result<HwEncoded, String>;
    /// Changes the bitrate while encoding: `Err(Ok(reason))` when the driver has no such
    /// control (nothing broke), `Err(Err(reason))` when it failed.
    fn set_bitrate(&mut self, bps: u32) -> Result<u32, Result<String, String>>;
    /// Why keyframes cannot be forced, if they cannot.
    fn keyframes_unavailable(&self) -> Option<String>;
}

/// One picture through a hardware encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HwEncoded {
    pub keyframe: bool,
    pub bytes_copied: u64,
    pub input: &'static str,
}

/// What looking for a hardware encoder gave.
pub(crate) enum HardwareChoice {
    /// Software by choice (`encoder.backend = "openh264"`, or `auto` with no node).
    NotWanted { reason: String },
    /// A hardware encoder was wanted but cannot be used: openh264 takes over (logged).
    Unavailable { reason: String },
    Opened {
        encoder: Box<dyn HwEncode>,
        reason: String,
    },
}

/// What `HardwareOpener` calls.
pub(crate) type OpenHardware =
    dyn Fn(&SourceInfo, &EncoderSettings) -> HardwareChoice + Send + Sync;

/// Finds and opens the hardware encoder for a source; called whenever capture starts.
#[derive(Clone)]
pub(crate) struct HardwareOpener(pub Arc<OpenHardware>);

impl std::fmt::Debug for HardwareOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HardwareOpener")
    }
}

pub(crate) const H264: FourCc = FourCc::new(b"H264");
pub(crate) const YU12: FourCc = FourCc::new(b"YU12");

/// What rtcam hands a hardware encoder today: I420 (YU12), the camera's buffer or rtcam's
/// conversion of it (feeding a node YUYV or NV12 straight from the camera is not done).
const FED_FORMAT: &str = "YU12";

/// `encoder.backend`'s choice among the probed nodes, through the pure selection in
/// `h264::backend` (H.264 on the CAPTURE queue, YU12 taken, the size within the node's, a
/// level for the size, rate and bitrate within the driver's known limits).
pub(crate) fn decide(
    backend: EncoderBackend,
    nodes: &[CodecNode],
    width: u32,
    height: u32,
    fps: u32,
    bitrate: u32,
) -> Result<Decision, NoV4l2Encoder> {
    let setting = match backend {
        EncoderBackend::Auto => BackendSetting::Auto,
        EncoderBackend::OpenH264 => BackendSetting::Openh264,
        EncoderBackend::V4l2 => BackendSetting::V4l2,
    };
    let m2m: Vec<M2mNode> = nodes
        .iter()
        .map(|n| M2mNode {
            path: n.path.display().to_string(),
            driver: n.driver.clone(),
            m2m: true,
            coded_formats: n.output_formats.iter().map(ToString::to_string).collect(),
            raw_formats: n.input_formats.iter().map(ToString::to_string).collect(),
            max_size: n.max_size,
        })
        .collect();
    let request = EncodeRequest {
        demand: StreamDemand {
            width,
            height,
            fps,
            bitrate_bps: bitrate,
        },
        camera_format: FED_FORMAT.into(),
    };
    choose(setting, &m2m, &request)
}

/// V4L2's H.264 profile menu: Constrained Baseline, what rtcam's SDP announces.
const H264_PROFILE_CONSTRAINED_BASELINE: i64 = 1;

/// The production opener: probes /dev, selects by `backend`, opens the node.
pub(crate) fn v4l2_opener(backend: EncoderBackend) -> HardwareOpener {
    HardwareOpener(Arc::new(
        move |info: &SourceInfo, settings: &EncoderSettings| open_hardware(backend, info, settings),
    ))
}

fn open_hardware(
    backend: EncoderBackend,
    info: &SourceInfo,
    settings: &EncoderSettings,
) -> HardwareChoice {
    if backend == EncoderBackend::OpenH264 {
        return HardwareChoice::NotWanted {
            reason: "encoder.backend = \"openh264\"".into(),
        };
    }
    let nodes = probe::probe_all(std::path::Path::new("/dev"));
    let decision = match decide(
        backend,
        &nodes,
        info.width,
        info.height,
        info.fps,
        settings.bitrate,
    ) {
        Ok(d) => d,
        Err(missing) => {
            return HardwareChoice::Unavailable {
                reason: missing.to_string(),
            };
        }
    };
    let reason = decision.reason;
    let Backend::V4l2 {
        path,
        input_format,
        level_menu,
    } = decision.backend
    else {
        return HardwareChoice::NotWanted { reason };
    };
    let Some(node) = nodes
        .into_iter()
        .find(|n| n.path.display().to_string() == path)
    else {
        return HardwareChoice::Unavailable {
            reason: format!("{reason}: {path} is gone"),
        };
    };
    if input_format != FED_FORMAT {
        return HardwareChoice::Unavailable {
            reason: format!("{reason}: rtcam feeds encoders {FED_FORMAT} only"),
        };
    }
    let m2m = M2mSettings {
        coded: H264,
        raw: YU12,
        fps: info.fps,
        bitrate: Some(settings.bitrate),
        gop: Some(settings.keyframe_interval),
        h264_profile: Some(H264_PROFILE_CONSTRAINED_BASELINE),
        // From size, rate and bitrate (H.264 Table A-1, bcm2835-codec's limits).
        h264_level: Some(i64::from(level_menu)),
        prefer_dmabuf: true,
        output_buffers: 2,
        capture_buffers: 4,
        limits: Limits::default(),
    };
    match M2mEncoder::open(&node, m2m) {
        Ok(encoder) => HardwareChoice::Opened {
            encoder: Box::new(M2mH264 {
                encoder,
                units: Vec::new(),
            }),
            reason,
        },
        Err(e) => HardwareChoice::Unavailable {
            reason: format!("{reason}: {e}"),
        },
    }
}

/// rtcam's M2M encoder as the pipeline's hardware encoder.
struct M2mH264 {
    encoder: M2mEncoder,
    units: Vec<EncodedUnit>,
}

/// Whether Annex-B data holds an IDR slice (NAL type 5): drivers do not all flag keyframes.
fn has_idr(data: &[u8]) -> bool {
    data.windows(4)
        .any(|w| w[..3] == [0, 0, 1] && w[3] & 0x1f == 5)
}

impl HwEncode for M2mH264 {
    fn describe(&self) -> (String, String) {
        let n = self.encoder.node();
        (n.path.display().to_string(), n.card.clone())
    }

    fn encode(
        &mut self,
        view: &I420View<'_>,
        dmabuf: Option<DmaBufRef>,
        keyframe: bool,
        out: &mut Vec<u8>,
    ) -> Result<HwEncoded, String> {
        // SAFETY: the camera owns the exported descriptor and keeps it open while the
        // picture is borrowed, i.e. for the whole call (see `DmaBufRef`).
        let fd = dmabuf.map(|d| (d, unsafe { BorrowedFd::borrow_raw(d.fd) }));
        let input = match &fd {
            Some((d, fd)) => RawInput::Camera {
                index: d.index,
                buffers: d.buffers,
                fd: *fd,
                length: d.length,
                view,
            },
            None => RawInput::Picture(view),
        };
        let (w, h) = (view.width as u32, view.height as u32);
        self.units.clear();
        let keyframe_now = keyframe && self.encoder.keyframe_support().is_ok();
        self.encoder
            .encode(input, w, h, keyframe_now, &mut self.units)
            .map_err(|e| e.to_string())?;
        out.clear();
        let mut key = false;
        for u in &self.units {
            out.extend_from_slice(&u.data);
            key |= u.keyframe || has_idr(&u.data);
        }
        let stats = self.encoder.stats();
        Ok(HwEncoded {
            keyframe: key,
            bytes_copied: stats.bytes_copied_last,
            input: stats.input,
        })
    }

    fn set_bitrate(&mut self, bps: u32) -> Result<u32, Result<String, String>> {
        self.encoder.set_bitrate(bps).map_err(|e| match e {
            M2mError::Unavailable(r) => Ok(r),
            e => Err(e.to_string()),
        })
    }

    fn keyframes_unavailable(&self) -> Option<String> {
        self.encoder.keyframe_support().err().map(|e| e.to_string())
    }
}

enum Inner {
    Software(Box<H264Encoder>),
    Hardware(Box<dyn HwEncode>),
}

/// The encoder the pipeline runs.
pub(crate) struct VideoEncoder {
    inner: Inner,
    settings: EncoderSettings,
    status: EncoderStatus,
    force_keyframe: bool,
}

impl VideoEncoder {
    /// openh264; `fallback`: why not the hardware encoder that was wanted.
    pub fn software(
        settings: EncoderSettings,
        reason: String,
        fallback: Option<String>,
    ) -> Result<Self, EncodeError> {
        Ok(Self {
            inner: Inner::Software(Box::new(H264Encoder::new(settings)?)),
            settings,
            status: EncoderStatus {
                backend: "openh264",
                device: None,
                input: "memory",
                reason,
                fallback,
                keyframes_unavailable: None,
            },
            force_keyframe: true,
        })
    }

    pub fn hardware(settings: EncoderSettings, hw: Box<dyn HwEncode>, reason: String) -> Self {
        let (device, card) = hw.describe();
        let keyframes_unavailable = hw.keyframes_unavailable();
        Self {
            status: EncoderStatus {
                backend: "v4l2",
                device: Some(format!("{device} ({card})")),
                input: "mmap",
                reason,
                fallback: None,
                keyframes_unavailable,
            },
            inner: Inner::Hardware(hw),
            settings,
            force_keyframe: true,
        }
    }

    pub fn status(&self) -> &EncoderStatus {
        &self.status
    }

    pub fn request_keyframe(&mut self) {
        self.force_keyframe = true;
    }

    /// The target bitrate, bits per second.
    pub fn bitrate(&self) -> u32 {
        self.settings.bitrate
    }

    pub fn set_bitrate(&mut self, bps: u32) -> Result<(), String> {
        match &mut self.inner {
            Inner::Software(e) => e.set_bitrate(bps).map_err(|e| e.to_string())?,
            Inner::Hardware(h) => match h.set_bitrate(bps) {
                Ok(_) => {}
                Err(Ok(unavailable)) => return Err(format!("unavailable: {unavailable}")),
                Err(Err(failure)) => {
                    self.fall_back(format!("setting the bitrate failed: {failure}"))
                        .map_err(|e| e.to_string())?;
                    return self.set_bitrate(bps);
                }
            },
        }
        self.settings.bitrate = bps;
        Ok(())
    }

    /// Replaces a failed hardware encoder by openh264 (the next picture is an IDR).
    fn fall_back(&mut self, why: String) -> Result<(), EncodeError> {
        tracing::warn!(reason = %why, "hardware encoder failed; encoding with openh264 from now on");
        self.inner = Inner::Software(Box::new(H264Encoder::new(self.settings)?));
        self.status = EncoderStatus {
            backend: "openh264",
            device: None,
            input: "memory",
            reason: self.status.reason.clone(),
            fallback: Some(why),
            keyframes_unavailable: None,
        };
        self.force_keyframe = true;
        Ok(())
    }

    /// Encodes one picture into `out` (Annex-B). A hardware failure is logged, recorded in
    /// the status, and the same picture goes through openh264: the stream does not stop.
    pub fn encode(
        &mut self,
        view: &I420View<'_>,
        frame: &CapturedFrame,
        timestamp_ms: u64,
        out: &mut Vec<u8>,
    ) -> Result<EncodeOutcome, String> {
        let keyframe = std::mem::take(&mut self.force_keyframe);
        if let Inner::Hardware(hw) = &mut self.inner {
            match hw.encode(view, frame.dmabuf, keyframe, out) {
                Ok(e) => {
                    self.status.input = e.input;
                    return Ok(EncodeOutcome {
                        keyframe: e.keyframe,
                        temporal_id: 0,
                        bytes_copied: frame.bytes_copied as u64 + e.bytes_copied,
                    });
                }
                Err(why) => self.fall_back(why).map_err(|e| e.to_string())?,
            }
        }
        let Inner::Software(sw) = &mut self.inner else {
            unreachable!("fall_back installs openh264");
        };
        if keyframe || std::mem::take(&mut self.force_keyframe) {
            sw.request_keyframe();
        }
        let e = sw
            .encode(view, timestamp_ms, out)
            .map_err(|e| e.to_string())?;
        Ok(EncodeOutcome {
            keyframe: e.keyframe,
            temporal_id: e.temporal_id,
            bytes_copied: frame.bytes_copied as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::frame::I420Buffer;
    use std::path::PathBuf;
    use std::time::Instant;

    fn node(path: &str, output: &[u8; 4]) -> CodecNode {
        CodecNode {
            path: PathBuf::from(path),
            driver: "drv".into(),
            card: "card".into(),
            mplane: true,
            input_formats: vec![YU12],
            output_formats: vec![FourCc::new(output)],
            max_size: None,
        }
    }

    #[test]
    fn backend_choice_goes_through_the_h264_selection() {
        let bcm = node("/dev/video11", b"H264");
        let fwht = node("/dev/video4", b"FWHT");
        let both = vec![fwht.clone(), bcm.clone()];
        let d = decide(EncoderBackend::Auto, &both, 1280, 720, 30, 2_000_000).unwrap();
        assert!(
            matches!(&d.backend, Backend::V4l2 { path, input_format, .. } if path == "/dev/video11" && input_format == "YU12"),
            "{d:?}"
        );
        assert!(
            d.rejected
                .iter()
                .any(|(p, why)| p == "/dev/video4" && why.contains("FWHT")),
            "{d:?}"
        );
        let d = decide(EncoderBackend::OpenH264, &both, 1280, 720, 30, 2_000_000).unwrap();
        assert_eq!(d.backend, Backend::Openh264);
        let none = vec![fwht];
        let d = decide(EncoderBackend::Auto, &none, 640, 480, 30, 1_000_000).unwrap();
        assert_eq!(d.backend, Backend::Openh264);
        assert!(
            d.reason.contains("no V4L2 H.264 encoder fits"),
            "{}",
            d.reason
        );
        let e = decide(EncoderBackend::V4l2, &none, 640, 480, 30, 1_000_000).unwrap_err();
        assert!(
            e.to_string().contains("/dev/video4: not an H.264 encoder"),
            "{e}"
        );
        // Above the node's largest size: not taken.
        let mut small = bcm;
        small.max_size = Some((1920, 1080));
        let d = decide(EncoderBackend::Auto, &[small], 3840, 2160, 30, 8_000_000).unwrap();
        assert_eq!(d.backend, Backend::Openh264);
    }

    #[test]
    fn idr_slices_are_found_in_annex_b() {
        assert!(has_idr(&[
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 1, 0x65, 9
        ]));
        assert!(!has_idr(&[0, 0, 0, 1, 0x41, 1, 2, 3]), "non-IDR slice");
        assert!(!has_idr(&[0x65, 0, 0]), "no start code");
    }

    /// A hardware encoder that works for `ok_frames` pictures, then fails.
    struct Flaky {
        ok_frames: u32,
        calls: u32,
    }

    impl HwEncode for Flaky {
        fn describe(&self) -> (String, String) {
            ("/dev/video11".into(), "flaky".into())
        }
        fn encode(
            &mut self,
            _view: &I420View<'_>,
            dmabuf: Option<DmaBufRef>,
            keyframe: bool,
            out: &mut Vec<u8>,
        ) -> Result<HwEncoded, String> {
            self.calls += 1;
            if self.calls > self.ok_frames {
                return Err(
                    "/dev/video11: the encoder produced nothing for a queued frame within 2s"
                        .into(),
                );
            }
            out.clear();
            out.extend_from_slice(&[0, 0, 0, 1, if keyframe { 0x65 } else { 0x41 }, 0x88]);
            Ok(HwEncoded {
                keyframe,
                bytes_copied: if dmabuf.is_some() { 0 } else { 100 },
                input: if dmabuf.is_some() { "dmabuf" } else { "mmap" },
            })
        }
        fn set_bitrate(&mut self, _bps: u32) -> Result<u32, Result<String, String>> {
            Err(Ok("no V4L2_CID_MPEG_VIDEO_BITRATE".into()))
        }
        fn keyframes_unavailable(&self) -> Option<String> {
            None
        }
    }

    fn settings() -> EncoderSettings {
        EncoderSettings {
            bitrate: 500_000,
            fps: 30,
            keyframe_interval: 30,
            temporal_layers: 1,
        }
    }

    #[test]
    fn a_failing_hardware_encoder_hands_the_same_picture_to_openh264() {
        let mut enc = VideoEncoder::hardware(
            settings(),
            Box::new(Flaky {
                ok_frames: 2,
                calls: 0,
            }),
            "auto: test".into(),
        );
        assert_eq!(enc.status().backend, "v4l2");
        let picture = I420Buffer::new(64, 48);
        let frame = CapturedFrame {
            seq: 0,
            captured_at: Instant::now(),
            bytes_copied: 0,
            dmabuf: None,
        };
        let mut out = Vec::new();
        let first = enc.encode(&picture.view(), &frame, 0, &mut out).unwrap();
        assert!(first.keyframe, "the first picture is a keyframe");
        assert_eq!(
            first.bytes_copied, 100,
            "no camera buffer: copied into the encoder"
        );
        assert_eq!(enc.status().input, "mmap");
        assert!(
            !enc.encode(&picture.view(), &frame, 33, &mut out)
                .unwrap()
                .keyframe
        );
        assert_eq!(
            enc.set_bitrate(1_000_000),
            Err("unavailable: no V4L2_CID_MPEG_VIDEO_BITRATE".into()),
            "a missing control refuses, it does not fall back"
        );
        assert_eq!(enc.status().backend, "v4l2");
        // The third picture fails in hardware and comes out of openh264, as an IDR.
        out.clear();
        let third = enc.encode(&picture.view(), &frame, 66, &mut out).unwrap();
        assert!(third.keyframe, "openh264 starts with an IDR");
        assert!(
            out.starts_with(&[0, 0, 0, 1]) && out.len() > 10,
            "a real openh264 access unit"
        );
        let s = enc.status();
        assert_eq!((s.backend, s.input), ("openh264", "memory"));
        assert!(
            s.fallback.as_deref().unwrap().contains("produced nothing"),
            "{s:?}"
        );
        assert_eq!(s.reason, "auto: test");
        // And it stays on openh264.
        enc.encode(&picture.view(), &frame, 99, &mut out).unwrap();
        assert_eq!(enc.status().backend, "openh264");
        enc.set_bitrate(800_000).unwrap();
    }
}
