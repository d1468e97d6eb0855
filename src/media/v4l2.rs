//! V4L2 camera capture with MMAP buffers: format negotiation, zero-copy YU12, one-pass YUYV/NV12/RGB, MJPEG decode, and a camera's own H.264 with its codec controls.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use super::controls::{ControlError, ControlInfo, ControlKind, normalize_name};
use super::convert::{ConvertError, Converter};
use super::frame::I420View;
use super::h264::annexb::{self, NalKind};
use super::mjpeg::MjpegDecoder;
use super::rgb::{RgbConverter, RgbOrder};
use super::source::{
    CapturedFrame, CodedMeta, CodedSource, DmaBufRef, FrameSource, SourceError, SourceInfo,
};
use super::vdev::{
    BufType, ControlDesc, Dequeued, Device, FourCc, FrameSize, Mapping, Memory, PixFormat,
    QueueArgs, consts,
};
use crate::config::{CaptureConfig, PixelFormatChoice};

/// Pixel formats rtcam can encode, in order of preference for `format = "auto"` (least work
/// per frame first; MJPEG needs a JPEG decode, but is what USB cameras give at 720p30+;
/// packed RGB is what libcamera offers for cameras without a YUV-capable ISP, e.g. vimc),
/// and the camera's own H.264 (passed through; `auto` takes it only with
/// `capture.prefer_camera_h264`, then first).
const SUPPORTED: [(PixelFormatChoice, &[u8; 4]); 8] = [
    (PixelFormatChoice::Yu12, b"YU12"),
    (PixelFormatChoice::Nv12, b"NV12"),
    (PixelFormatChoice::Yuyv, b"YUYV"),
    (PixelFormatChoice::Mjpg, b"MJPG"),
    (PixelFormatChoice::Mjpg, b"JPEG"),
    (PixelFormatChoice::Bgr3, b"BGR3"),
    (PixelFormatChoice::Rgb3, b"RGB3"),
    (PixelFormatChoice::H264, b"H264"),
];

/// Whether rtcam can capture in this pixel format.
pub(crate) fn takes(fourcc: FourCc) -> bool {
    SUPPORTED.iter().any(|(_, f)| FourCc::new(f) == fourcc)
}

/// How long a dequeue may wait before the camera counts as stalled.
const DEQUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long opening a camera's H.264 may wait for its first SPS and PPS (the stream's profile,
/// which offers are checked against): a GOP or two of a camera that cannot be asked for an IDR.
const PARAMETER_SETS_TIMEOUT: Duration = Duration::from_secs(5);

/// Access units kept while waiting for the PPS that follows an SPS; more is not H.264 as
/// cameras send it.
const MAX_PENDING_ACCESS_UNITS: usize = 64;

/// What a camera's own H.264 is set to at open, through its controls where it has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CodedSettings {
    pub bitrate: u32,
    /// Frames between IDRs.
    pub gop: u32,
}

const QUEUE: BufType = BufType::VideoCapture;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Yu12,
    Nv12,
    Yuyv,
    Mjpeg,
    Rgb(RgbOrder),
    /// The camera's own H.264, passed through.
    H264,
}

/// A camera's own H.264: what was learned and set at open.
#[derive(Debug)]
struct Coded {
    /// Access units read at open while waiting for the SPS and PPS, delivered first.
    pending: VecDeque<(Vec<u8>, Instant)>,
    /// (profile_idc, constraint flags, level_idc) from the SPS.
    profile_level: (u8, u8, u8),
    /// V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME exists.
    force_key_frame: bool,
    /// V4L2_CID_MPEG_VIDEO_BITRATE exists (and is 64-bit).
    bitrate: Option<bool>,
    /// The controls set at open, for the status.
    applied: String,
    /// The driver's sequence number of the last buffer.
    last_sequence: Option<u32>,
}
pub struct Camera {
    /// The mapped capture buffers, by index; unmapped (in Drop) before the buffers are freed.
    buffers: Vec<Mapping>,
    /// The same buffers exported as DMABUFs (YU12 only: the pictures a hardware encoder can
    /// read in place); empty when the driver cannot export.
    dmabufs: Vec<std::os::fd::OwnedFd>,
    device: Device,
    layout: Layout,
    info: SourceInfo,
    stride: usize,
    converter: Converter,
    rgb: RgbConverter,
    mjpeg: MjpegDecoder,
    seq: u64,
    /// Control name → (V4L2 id, 64-bit), from the last `controls()`.
    control_ids: HashMap<String, (u32, bool)>,
    /// Set for `Layout::H264`.
    coded: Option<Coded>,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> SourceError {
    SourceError::Device(format!("{what} on {}: {e}", path.display()))
}

/// The driver (or a shim such as libcamera's v4l2-compat) does not implement the request.
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL))
}

impl Camera {
    /// Opens the device and negotiates format, size and frame rate with the driver. A camera's
    /// own H.264 gets `coded` through its controls where it has them, and is read until its
    /// first SPS and PPS (the stream's profile) before this returns.
    pub fn open(req: &CaptureConfig, coded: &CodedSettings) -> Result<Self, SourceError> {
        let path = &req.device;
        let device = Device::open(path).map_err(|e| io_err("open", path, e))?;
        let fourcc = choose_format(&device, req)?.fourcc;
        let layout = match &fourcc.0 {
            b"YU12" => Layout::Yu12,
            b"NV12" => Layout::Nv12,
            b"YUYV" => Layout::Yuyv,
            b"RGB3" => Layout::Rgb(RgbOrder::Rgb),
            b"BGR3" => Layout::Rgb(RgbOrder::Bgr),
            b"H264" => Layout::H264,
            _ => Layout::Mjpeg,
        };
        // Bytes per pixel of the first plane (0: compressed).
        let pixel_bytes = match layout {
            Layout::Yu12 | Layout::Nv12 => 1,
            Layout::Yuyv => 2,
            Layout::Rgb(_) => 3,
            Layout::Mjpeg | Layout::H264 => 0,
        };
        let mut wanted_format = PixFormat {
            width: req.width,
            height: req.height,
            fourcc,
            bytesperline: 0,
            sizeimage: 0,
        };
        if req.stride_align > 1 && pixel_bytes > 0 {
            // Padded lines: the first plane's line rounded up; 0 lets the driver choose.
            wanted_format.bytesperline =
                (req.width * pixel_bytes).next_multiple_of(req.stride_align);
        }
        let got = device
            .s_fmt(QUEUE, &wanted_format)
            .map_err(|e| io_err("VIDIOC_S_FMT", path, e))?;
        if got.fourcc != fourcc {
            return Err(SourceError::Unsupported(format!(
                "{} switched the format to {} instead of {fourcc}",
                path.display(),
                got.fourcc,
            )));
        }
        if (got.width, got.height) != (req.width, req.height) {
            let sizes = device
                .enum_framesizes(fourcc)
                .map(|s| s.iter().map(describe_size).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            tracing::warn!(
                requested = %format!("{}x{}", req.width, req.height),
                actual = %format!("{}x{}", got.width, got.height),
                offered = %sizes,
                "camera chose a different size; streaming what it delivers"
            );
        }
        if got.width % 2 != 0 || got.height % 2 != 0 {
            return Err(SourceError::Unsupported(format!(
                "{}x{} from {} is odd-sized; H.264 4:2:0 needs even dimensions",
                got.width,
                got.height,
                path.display()
            )));
        }
        let fps = match device.s_parm_fps(QUEUE, req.fps) {
            Ok(0) => req.fps,
            Ok(fps) => fps,
            // libcamera's V4L2 compatibility layer (0.0.3) has no VIDIOC_S_PARM: the camera
            // runs at its default rate.
            Err(e) if unsupported(&e) => {
                tracing::info!(device = %path.display(), "the driver takes no frame rate (VIDIOC_S_PARM: {e}); using its own");
                req.fps
            }
            Err(e) => return Err(io_err("VIDIOC_S_PARM", path, e)),
        };
        let stride = (got.bytesperline.max(got.width * pixel_bytes)) as usize;
        let count = device
            .reqbufs(QUEUE, Memory::Mmap, req.buffers)
            .map_err(|e| io_err("VIDIOC_REQBUFS", path, e))?;
        if count == 0 {
            return Err(SourceError::Device(format!(
                "{} allocated no capture buffers",
                path.display()
            )));
        }
        let mut camera = Self {
            buffers: Vec::with_capacity(count as usize),
            dmabufs: Vec::new(),
            device,
            layout,
            info: SourceInfo {
                width: got.width,
                height: got.height,
                fps,
                pixel_format: fourcc.to_string(),
                stride: stride as u32,
            },
            stride,
            converter: Converter::default(),
            rgb: RgbConverter::default(),
            mjpeg: MjpegDecoder::default(),
            seq: 0,
            control_ids: HashMap::new(),
            coded: None,
        };
        // From here on Drop releases what was set up.
        for index in 0..count {
            let map = camera
                .device
                .map(QUEUE, index)
                .map_err(|e| io_err("mmap", path, e))?;
            camera.buffers.push(map);
            camera
                .device
                .qbuf(QUEUE, Memory::Mmap, index, &QueueArgs::default())
                .map_err(|e| io_err("VIDIOC_QBUF", path, e))?;
        }
        if layout == Layout::Yu12 {
            match (0..count)
                .map(|i| camera.device.expbuf(QUEUE, i))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(fds) => camera.dmabufs = fds,
                Err(e) => {
                    tracing::debug!(device = %path.display(), "VIDIOC_EXPBUF: {e}; no DMABUF for encoders")
                }
            }
        }
        if layout == Layout::H264 {
            camera.coded = Some(camera.set_codec_controls(coded));
        }
        camera
            .device
            .streamon(QUEUE)
            .map_err(|e| io_err("VIDIOC_STREAMON", path, e))?;
        if layout == Layout::H264 {
            camera.await_parameter_sets()?;
        }
        tracing::info!(
            device = %path.display(),
            format = %camera.info.pixel_format,
            width = camera.info.width,
            height = camera.info.height,
            fps,
            stride,
            buffers = count,
            "camera streaming"
        );
        Ok(camera)
    }
}

/// The pixel format capture will use, and why (what `rtcam probe` prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FormatChoice {
    pub fourcc: FourCc,
    pub why: String,
}

/// Picks the pixel format for `req` among what the device offers. With `format = "auto"`, the
/// first supported format (in `SUPPORTED` order) that can do the configured size and rate
/// wins (a USB camera's YUYV often stops at 10 fps where its MJPEG does 30), else the first
/// that can do the size, else the first offered.
pub(crate) fn choose_format(
    device: &Device,
    req: &CaptureConfig,
) -> Result<FormatChoice, SourceError> {
    let path = device.path();
    let offered = device
        .enum_formats(QUEUE)
        .map_err(|e| io_err("VIDIOC_ENUM_FMT", path, e))?;
    let offered_names: Vec<String> = offered.iter().map(|d| d.fourcc.to_string()).collect();
    let wanted: Vec<&[u8; 4]> = match req.format {
        // The camera's own H.264 only when preferred, and then first.
        PixelFormatChoice::Auto => req
            .prefer_camera_h264
            .then_some(b"H264")
            .into_iter()
            .chain(
                SUPPORTED
                    .iter()
                    .filter(|(c, _)| *c != PixelFormatChoice::H264)
                    .map(|(_, f)| *f),
            )
            .collect(),
        choice => SUPPORTED
            .iter()
            .filter(|(c, _)| *c == choice)
            .map(|(_, f)| *f)
            .collect(),
    };
    let candidates: Vec<FourCc> = wanted
        .iter()
        .map(|f| FourCc::new(f))
        .filter(|f| offered.iter().any(|d| d.fourcc == *f))
        .collect();
    let fit = |f: &FourCc| mode_support(device, *f, req.width, req.height, req.fps);
    let mode = format!("{}x{} at {} fps", req.width, req.height, req.fps);
    let choice = if let Some(f) = candidates.iter().find(|f| fit(f) == (true, true)) {
        Some((*f, format!("the first rtcam takes that does {mode}")))
    } else if let Some(f) = candidates.iter().find(|f| fit(f).0) {
        Some((
            *f,
            format!("no format does {mode}; the first that does the size"),
        ))
    } else {
        candidates.first().map(|f| {
            (
                *f,
                format!(
                    "none lists {}x{}; the first rtcam takes",
                    req.width, req.height
                ),
            )
        })
    };
    let Some((fourcc, why)) = choice else {
        return Err(SourceError::Unsupported(format!(
            "{} offers {}; capture.format = {:?} needs one of {}",
            path.display(),
            offered_names.join(", "),
            req.format,
            wanted
                .iter()
                .map(|f| String::from_utf8_lossy(*f).into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let usable: Vec<&str> = offered_names
        .iter()
        .map(String::as_str)
        .filter(|n| SUPPORTED.iter().any(|(_, f)| f.as_slice() == n.as_bytes()))
        .collect();
    let why = match req.format {
        PixelFormatChoice::Auto => format!(
            "format = auto: {why} (of {} formats offered, rtcam takes {})",
            offered_names.len(),
            usable.join(", ")
        ),
        _ => format!("capture.format = \"{fourcc}\""),
    };
    Ok(FormatChoice { fourcc, why })
}

pub(crate) fn describe_size(s: &FrameSize) -> String {
    match s {
        FrameSize::Discrete { width, height } => format!("{width}x{height}"),
        FrameSize::Stepwise { min, max, step } => format!(
            "{}x{}-{}x{} step {}x{}",
            min.0, min.1, max.0, max.1, step.0, step.1
        ),
    }
}

impl FrameSource for Camera {
    fn info(&self) -> SourceInfo {
        self.info.clone()
    }

    fn controls(&mut self) -> Result<Vec<ControlInfo>, ControlError> {
        let descriptions = self
            .device
            .query_controls()
            .map_err(|e| ControlError::Failed(format!("VIDIOC_QUERY_EXT_CTRL: {e}")))?;
        let mut ids = HashMap::new();
        let mut out = Vec::new();
        for d in descriptions {
            if let Some(info) = self.describe(&d) {
                ids.insert(
                    info.name.clone(),
                    (d.id, d.kind == ControlDesc::TYPE_INTEGER64),
                );
                out.push(info);
            }
        }
        self.control_ids = ids;
        Ok(out)
    }

    fn set_control(&mut self, info: &ControlInfo, value: i64) -> Result<i64, ControlError> {
        let (id, wide) = *self
            .control_ids
            .get(&info.name)
            .ok_or_else(|| ControlError::Unknown(info.name.clone()))?;
        let value = match info.kind {
            ControlKind::Boolean => i64::from(value != 0),
            _ => value,
        };
        self.device
            .set_control(id, value, wide)
            .map_err(|e| ControlError::Failed(format!("VIDIOC_S_EXT_CTRLS {}: {e}", info.name)))
    }

    fn coded(&mut self) -> Option<&mut dyn CodedSource> {
        if self.coded.is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn next_frame(
        &mut self,
        consume: &mut dyn FnMut(&I420View<'_>, CapturedFrame),
    ) -> Result<(), SourceError> {
        if self.layout == Layout::H264 {
            return Err(SourceError::Unsupported(
                "the camera sends H.264, not pictures (read it as access units)".into(),
            ));
        }
        let path = self.device.path().to_owned();
        let dequeued = self.dequeue()?;
        let captured_at = Instant::now();
        let index = dequeued.index as usize;
        let Some(buf) = self.buffers.get(index) else {
            return Err(SourceError::Device(format!(
                "{} returned buffer {index} of {}",
                path.display(),
                self.buffers.len()
            )));
        };
        // The driver says how much of the buffer holds this frame; never read past it.
        let used = (dequeued.bytesused as usize).min(buf.len());
        let data = &buf.as_slice()[..used];
        let (w, h) = (self.info.width as usize, self.info.height as usize);
        let seq = self.seq;
        let frame = |bytes_copied| CapturedFrame {
            seq,
            captured_at,
            bytes_copied,
            dmabuf: None,
        };
        let result = if dequeued.is_error() {
            Err("the driver flagged the buffer as corrupt (V4L2_BUF_FLAG_ERROR)".to_owned())
        } else {
            match self.layout {
                Layout::Yu12 => {
                    let dmabuf = self.dmabufs.get(index).map(|fd| DmaBufRef {
                        index: dequeued.index,
                        buffers: self.buffers.len() as u32,
                        fd: fd.as_raw_fd(),
                        length: buf.len() as u32,
                    });
                    I420View::from_contiguous(data, w, h, self.stride)
                        .map_err(|e| ConvertError::from(e).to_string())
                        .map(|view| consume(&view, CapturedFrame { dmabuf, ..frame(0) }))
                }
                Layout::Nv12 => self
                    .converter
                    .nv12(data, w, h, self.stride)
                    .map_err(|e| e.to_string())
                    .map(|(view, copied)| consume(&view, frame(copied))),
                Layout::Yuyv => self
                    .converter
                    .yuyv(data, w, h, self.stride)
                    .map_err(|e| e.to_string())
                    .map(|(view, copied)| consume(&view, frame(copied))),
                Layout::Rgb(order) => self
                    .rgb
                    .convert(data, order, w, h, self.stride)
                    .map_err(|e| e.to_string())
                    .map(|(view, written)| consume(&view, frame(written))),
                // The decoded picture counts as copied: it is written once, then encoded.
                Layout::Mjpeg => self
                    .mjpeg
                    .decode(data, w, h)
                    .map_err(|e| e.to_string())
                    .map(|(view, written)| consume(&view, frame(written))),
                Layout::H264 => Err("H.264 is read as access units".to_owned()),
            }
        };
        self.seq += 1;
        // The buffer goes back to the driver whatever became of its picture.
        self.device
            .qbuf(QUEUE, Memory::Mmap, dequeued.index, &QueueArgs::default())
            .map_err(|e| io_err("VIDIOC_QBUF", &path, e))?;
        // A short or corrupt buffer is one bad frame, not a dead camera.
        result.map_err(SourceError::BadFrame)
    }
}

impl CodedSource for Camera {
    fn next_access_unit(
        &mut self,
        consume: &mut dyn FnMut(&[u8], CodedMeta),
    ) -> Result<(), SourceError> {
        let seq = self.seq;
        let Some(coded) = self.coded.as_mut() else {
            return Err(SourceError::Unsupported(
                "the camera does not send H.264".into(),
            ));
        };
        if let Some((au, captured_at)) = coded.pending.pop_front() {
            self.seq += 1;
            consume(
                &au,
                CodedMeta {
                    seq,
                    captured_at,
                    lost_before: 0,
                },
            );
            return Ok(());
        }
        let dequeued = self.dequeue()?;
        let captured_at = Instant::now();
        let lost_before = self.sequence_gap(&dequeued);
        self.seq += 1;
        let path = self.device.path().to_owned();
        let index = dequeued.index as usize;
        let Some(buf) = self.buffers.get(index) else {
            return Err(SourceError::Device(format!(
                "{} returned buffer {index} of {}",
                path.display(),
                self.buffers.len()
            )));
        };
        let flagged = dequeued.is_error();
        if !flagged {
            let used = (dequeued.bytesused as usize).min(buf.len());
            consume(
                &buf.as_slice()[..used],
                CodedMeta {
                    seq,
                    captured_at,
                    lost_before,
                },
            );
        }
        // The buffer goes back to the driver whatever became of it.
        self.device
            .qbuf(QUEUE, Memory::Mmap, dequeued.index, &QueueArgs::default())
            .map_err(|e| io_err("VIDIOC_QBUF", &path, e))?;
        if flagged {
            return Err(SourceError::BadFrame(
                "the driver flagged the buffer as corrupt (V4L2_BUF_FLAG_ERROR)".into(),
            ));
        }
        Ok(())
    }

    fn force_keyframe(&mut self) -> Result<(), String> {
        if let Some(why) = self.keyframes_unavailable() {
            return Err(why);
        }
        self.device
            .set_control(consts::CID_FORCE_KEY_FRAME, 1, false)
            .map(drop)
            .map_err(|e| format!("VIDIOC_S_EXT_CTRLS force_key_frame: {e}"))
    }

    fn keyframes_unavailable(&self) -> Option<String> {
        match &self.coded {
            Some(c) if c.force_key_frame => None,
            _ => Some(format!(
                "{} ({}) has no V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME control: new viewers start from the cached GOP or the camera's next IDR",
                self.device.path().display(),
                self.info.pixel_format
            )),
        }
    }

    fn set_bitrate(&mut self, bps: u32) -> Result<u32, String> {
        let Some(wide) = self.coded.as_ref().and_then(|c| c.bitrate) else {
            return Err(format!(
                "{} has no V4L2_CID_MPEG_VIDEO_BITRATE control: the camera's H.264 bitrate cannot be changed",
                self.device.path().display()
            ));
        };
        self.device
            .set_control(consts::CID_BITRATE, i64::from(bps), wide)
            .map(|v| u32::try_from(v).unwrap_or(bps))
            .map_err(|e| format!("VIDIOC_S_EXT_CTRLS video_bitrate: {e}"))
    }

    fn profile_level(&self) -> (u8, u8, u8) {
        self.coded.as_ref().map_or((0, 0, 0), |c| c.profile_level)
    }

    fn applied(&self) -> String {
        self.coded
            .as_ref()
            .map_or_else(String::new, |c| c.applied.clone())
    }
}

impl Camera {
    /// Waits for the next filled buffer, at most [`DEQUEUE_TIMEOUT`].
    fn dequeue(&mut self) -> Result<Dequeued, SourceError> {
        let path = self.device.path().to_owned();
        let deadline = Instant::now() + DEQUEUE_TIMEOUT;
        loop {
            match self.device.dqbuf(QUEUE, Memory::Mmap) {
                Ok(Some(d)) => return Ok(d),
                Ok(None) => {}
                Err(e) => return Err(io_err("VIDIOC_DQBUF", &path, e)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SourceError::Stalled(DEQUEUE_TIMEOUT));
            }
            let ready = self
                .device
                .poll(left)
                .map_err(|e| io_err("poll", &path, e))?;
            if ready.error && !ready.readable {
                // The device is gone or stopped streaming: DQBUF says which.
                return match self.device.dqbuf(QUEUE, Memory::Mmap) {
                    Ok(Some(d)) => Ok(d),
                    Ok(None) => Err(SourceError::Device(format!(
                        "{}: poll error",
                        path.display()
                    ))),
                    Err(e) => Err(io_err("VIDIOC_DQBUF", &path, e)),
                };
            }
        }
    }

    /// Frames lost before `d` by the driver's sequence numbers (0 for drivers that do not
    /// count, or after a wrap).
    fn sequence_gap(&mut self, d: &Dequeued) -> u32 {
        let Some(coded) = self.coded.as_mut() else {
            return 0;
        };
        let gap = match coded.last_sequence {
            Some(last) if d.sequence > last => d.sequence - last - 1,
            _ => 0,
        };
        coded.last_sequence = Some(d.sequence);
        gap
    }

    /// Sets the camera's bitrate, GOP and repeated SPS/PPS where it has those controls, and
    /// notes whether it can be asked for an IDR.
    fn set_codec_controls(&self, wanted: &CodedSettings) -> Coded {
        let path = self.device.path().display().to_string();
        let controls = self.device.query_controls().unwrap_or_default();
        let find = |id: u32| controls.iter().find(|c| c.id == id);
        let mut applied = Vec::new();
        for (name, id, value) in [
            (
                "video_bitrate",
                consts::CID_BITRATE,
                i64::from(wanted.bitrate),
            ),
            (
                "video_gop_size",
                consts::CID_GOP_SIZE,
                i64::from(wanted.gop),
            ),
            (
                "h264_i_frame_period",
                consts::CID_H264_I_PERIOD,
                i64::from(wanted.gop),
            ),
            // SPS/PPS with every IDR; rtcam puts them in front of IDRs that lack them anyway.
            ("repeat_sequence_header", consts::CID_REPEAT_SEQ_HEADER, 1),
        ] {
            let Some(desc) = find(id) else { continue };
            let value = value.clamp(desc.minimum, desc.maximum);
            match self
                .device
                .set_control(id, value, desc.kind == ControlDesc::TYPE_INTEGER64)
            {
                Ok(v) => applied.push(format!("{name} {v}")),
                Err(e) => {
                    tracing::info!(device = %path, control = name, value, "the camera refused: {e}");
                    applied.push(format!("{name} refused ({e})"));
                }
            }
        }
        let applied = if applied.is_empty() {
            "the camera has no bitrate or GOP control".to_owned()
        } else {
            format!("set through the camera's controls: {}", applied.join(", "))
        };
        Coded {
            pending: VecDeque::new(),
            profile_level: (0, 0, 0),
            force_key_frame: find(consts::CID_FORCE_KEY_FRAME).is_some(),
            bitrate: find(consts::CID_BITRATE).map(|d| d.kind == ControlDesc::TYPE_INTEGER64),
            applied,
            last_sequence: None,
        }
    }

    /// Reads the camera's H.264 until its first SPS and PPS, keeping the access units from
    /// the SPS on (they are delivered first): the stream's profile must be known before any
    /// viewer's offer can be answered. Asks for an IDR first where the camera can.
    fn await_parameter_sets(&mut self) -> Result<(), SourceError> {
        let path = self.device.path().to_owned();
        if self.keyframes_unavailable().is_none()
            && let Err(e) = self.force_keyframe()
        {
            tracing::debug!(device = %path.display(), "asking for an IDR at open: {e}");
        }
        let deadline = Instant::now() + PARAMETER_SETS_TIMEOUT;
        let (mut sps, mut pps) = (None, false);
        while sps.is_none() || !pps {
            if Instant::now() >= deadline {
                return Err(SourceError::Unsupported(format!(
                    "{} sent no H.264 SPS and PPS within {PARAMETER_SETS_TIMEOUT:?} (is it Annex-B H.264 with parameter sets?)",
                    path.display()
                )));
            }
            let dequeued = self.dequeue()?;
            let captured_at = Instant::now();
            self.sequence_gap(&dequeued);
            let data = self
                .buffers
                .get(dequeued.index as usize)
                .filter(|_| !dequeued.is_error())
                .map(|b| b.as_slice()[..(dequeued.bytesused as usize).min(b.len())].to_vec());
            self.device
                .qbuf(QUEUE, Memory::Mmap, dequeued.index, &QueueArgs::default())
                .map_err(|e| io_err("VIDIOC_QBUF", &path, e))?;
            let Some(data) = data else { continue };
            let Ok(au) = annexb::parse_access_unit(&data) else {
                continue; // corrupt: the pipeline counts what it refuses later, not this
            };
            if sps.is_none() {
                sps = annexb::profile_level(&data);
                if sps.is_none() {
                    continue; // before the first SPS: nothing a viewer could start from
                }
            }
            pps |= au.has(NalKind::Pps);
            let Some(coded) = self.coded.as_mut() else {
                break;
            };
            if coded.pending.len() >= MAX_PENDING_ACCESS_UNITS {
                return Err(SourceError::Unsupported(format!(
                    "{} sent an SPS but no PPS in {MAX_PENDING_ACCESS_UNITS} access units",
                    path.display()
                )));
            }
            coded.pending.push_back((data, captured_at));
            if let Some(pl) = sps {
                coded.profile_level = pl;
            }
        }
        let (profile_idc, constraints, level_idc) = self.profile_level();
        tracing::info!(
            device = %path.display(),
            profile_level_id = %format!("{profile_idc:02x}{constraints:02x}{level_idc:02x}"),
            "the camera's H.264 stream"
        );
        Ok(())
    }
}

/// Whether the driver lists (`width` x `height`, `fps`) for `fourcc`: (size ok, rate ok).
/// A driver that cannot enumerate sizes or intervals is taken at its word (true).
fn mode_support(
    device: &Device,
    fourcc: FourCc,
    width: u32,
    height: u32,
    fps: u32,
) -> (bool, bool) {
    let size_ok = match device.enum_framesizes(fourcc) {
        Ok(sizes) if !sizes.is_empty() => sizes.iter().any(|s| match *s {
            FrameSize::Discrete {
                width: w,
                height: h,
            } => (w, h) == (width, height),
            FrameSize::Stepwise { min, max, .. } => {
                (min.0..=max.0).contains(&width) && (min.1..=max.1).contains(&height)
            }
        }),
        _ => true,
    };
    if !size_ok {
        return (false, false);
    }
    let fps_ok = match device.enum_frameintervals(fourcc, width, height) {
        Ok(rates) if !rates.is_empty() => rates.iter().any(|r| r.max_fps >= fps),
        _ => true,
    };
    (true, fps_ok)
}

impl Camera {
    fn describe(&self, d: &ControlDesc) -> Option<ControlInfo> {
        if d.is_disabled_or_read_only() {
            return None;
        }
        let kind = match d.kind {
            ControlDesc::TYPE_INTEGER | ControlDesc::TYPE_INTEGER64 => ControlKind::Integer,
            ControlDesc::TYPE_BOOLEAN => ControlKind::Boolean,
            ControlDesc::TYPE_MENU | ControlDesc::TYPE_INTEGER_MENU => ControlKind::Menu,
            _ => return None,
        };
        let value = self
            .device
            .get_control(d.id, d.kind == ControlDesc::TYPE_INTEGER64)
            .ok()?;
        let menu = if kind == ControlKind::Menu {
            let integer = d.kind == ControlDesc::TYPE_INTEGER_MENU;
            (d.minimum..=d.maximum)
                .filter_map(|i| {
                    let index = u32::try_from(i).ok()?;
                    Some((i, self.device.menu_item(d.id, index, integer)?))
                })
                .collect()
        } else {
            Vec::new()
        };
        Some(ControlInfo {
            name: normalize_name(&d.name),
            kind,
            min: d.minimum,
            max: d.maximum,
            step: i64::try_from(d.step).unwrap_or(1).max(1),
            default: d.default,
            value,
            menu,
        })
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        // Stop, unmap, then free the buffers (REQBUFS 0 fails while they are mapped). A camera
        // that is gone answers ENODEV to all of it; nothing here can be retried.
        if let Err(e) = self.device.streamoff(QUEUE)
            && e.raw_os_error() != Some(libc::ENODEV)
        {
            tracing::info!(device = %self.device.path().display(), "VIDIOC_STREAMOFF while releasing the camera: {e}");
        }
        self.buffers.clear();
        self.dmabufs.clear();
        let _ = self.device.reqbufs(QUEUE, Memory::Mmap, 0);
    }
}
