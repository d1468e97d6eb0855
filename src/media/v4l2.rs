//! V4L2 camera capture with MMAP buffers: format negotiation, zero-copy YU12, one-pass YUYV/NV12, MJPEG decode.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use v4l::buffer::Type;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::prelude::*;
use v4l::video::Capture;
use v4l::{Format, FourCC};

use super::controls::{ControlError, ControlInfo, ControlKind, normalize_name};
use super::convert::{ConvertError, Converter};
use super::frame::I420View;
use super::mjpeg::MjpegDecoder;
use super::source::{CapturedFrame, FrameSource, SourceError, SourceInfo};
use crate::config::{CaptureConfig, PixelFormatChoice};

/// Pixel formats rtcam can encode, in order of preference for `format = "auto"` (least work
/// per frame first; MJPEG needs a JPEG decode, but is what USB cameras give at 720p30+).
const SUPPORTED: [(PixelFormatChoice, &[u8; 4]); 5] = [
    (PixelFormatChoice::Yu12, b"YU12"),
    (PixelFormatChoice::Nv12, b"NV12"),
    (PixelFormatChoice::Yuyv, b"YUYV"),
    (PixelFormatChoice::Mjpg, b"MJPG"),
    (PixelFormatChoice::Mjpg, b"JPEG"),
];

/// How long a dequeue may block before the camera counts as stalled.
const DEQUEUE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Yu12,
    Nv12,
    Yuyv,
    Mjpeg,
}

/// An open, streaming V4L2 camera.
pub struct Camera {
    // Field order matters: the stream (mmap'd buffers) is dropped before the device handle.
    // `None` only inside Drop.
    stream: Option<Stream<'static>>,
    device: Device,
    layout: Layout,
    info: SourceInfo,
    stride: usize,
    converter: Converter,
    mjpeg: MjpegDecoder,
    seq: u64,
    /// Control name → V4L2 id, from the last `controls()`.
    control_ids: std::collections::HashMap<String, u32>,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> SourceError {
    SourceError::Device(format!("{what} on {}: {e}", path.display()))
}

fn fourcc_str(f: FourCC) -> String {
    f.str()
        .map(str::to_owned)
        .unwrap_or_else(|_| format!("{:?}", f.repr))
}

impl Camera {
    /// Opens the device and negotiates format, size and frame rate with the driver.
    pub fn open(req: &CaptureConfig) -> Result<Self, SourceError> {
        let path = &req.device;
        let device = Device::with_path(path).map_err(|e| io_err("open", path, e))?;
        let offered = device
            .enum_formats()
            .map_err(|e| io_err("VIDIOC_ENUM_FMT", path, e))?;
        let offered_names: Vec<String> = offered.iter().map(|d| fourcc_str(d.fourcc)).collect();
        let wanted: Vec<&[u8; 4]> = match req.format {
            PixelFormatChoice::Auto => SUPPORTED.iter().map(|(_, f)| *f).collect(),
            choice => SUPPORTED
                .iter()
                .filter(|(c, _)| *c == choice)
                .map(|(_, f)| *f)
                .collect(),
        };
        let candidates: Vec<FourCC> = wanted
            .iter()
            .map(|f| FourCC::new(f))
            .filter(|f| offered.iter().any(|d| d.fourcc == *f))
            .collect();
        // With "auto", the first format that can do the configured size and rate wins (a USB
        // camera's YUYV often stops at 10 fps where its MJPEG does 30), else the first that
        // can do the size, else the first offered.
        let fit = |f: &FourCC| mode_support(&device, *f, req.width, req.height, req.fps);
        let Some(fourcc) = candidates
            .iter()
            .find(|f| fit(f) == (true, true))
            .or_else(|| candidates.iter().find(|f| fit(f).0))
            .or(candidates.first())
            .copied()
        else {
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
        let mut wanted_format = Format::new(req.width, req.height, fourcc);
        let compressed = matches!(&fourcc.repr, b"MJPG" | b"JPEG");
        if req.stride_align > 1 && !compressed {
            // Padded lines: the luma (or packed YUYV) line rounded up; 0 lets the driver choose.
            let natural = if &fourcc.repr == b"YUYV" {
                req.width * 2
            } else {
                req.width
            };
            wanted_format.stride = natural.next_multiple_of(req.stride_align);
        }
        let got = device
            .set_format(&wanted_format)
            .map_err(|e| io_err("VIDIOC_S_FMT", path, e))?;
        if got.fourcc != fourcc {
            return Err(SourceError::Unsupported(format!(
                "{} switched the format to {} instead of {}; it offers {}",
                path.display(),
                fourcc_str(got.fourcc),
                fourcc_str(fourcc),
                offered_names.join(", ")
            )));
        }
        if (got.width, got.height) != (req.width, req.height) {
            let sizes = device
                .enum_framesizes(fourcc)
                .map(|s| {
                    s.into_iter()
                        .map(|fs| match fs.size {
                            v4l::framesize::FrameSizeEnum::Discrete(d) => d.to_string(),
                            v4l::framesize::FrameSizeEnum::Stepwise(s) => s.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
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
        let params = device
            .set_params(&v4l::video::capture::Parameters::with_fps(req.fps))
            .map_err(|e| io_err("VIDIOC_S_PARM", path, e))?;
        let fps = params
            .interval
            .denominator
            .checked_div(params.interval.numerator)
            .map_or(req.fps, |f| f.max(1));
        let layout = match &fourcc.repr {
            b"YU12" => Layout::Yu12,
            b"NV12" => Layout::Nv12,
            b"YUYV" => Layout::Yuyv,
            _ => Layout::Mjpeg,
        };
        let min_stride = match layout {
            Layout::Yuyv => got.width * 2,
            _ => got.width,
        };
        let stride = got.stride.max(min_stride) as usize;
        let mut stream = Stream::with_buffers(&device, Type::VideoCapture, req.buffers)
            .map_err(|e| io_err("VIDIOC_REQBUFS/mmap", path, e))?;
        stream.set_timeout(DEQUEUE_TIMEOUT);
        let info = SourceInfo {
            width: got.width,
            height: got.height,
            fps,
            pixel_format: fourcc_str(fourcc),
            stride: stride as u32,
        };
        tracing::info!(
            device = %path.display(),
            format = %info.pixel_format,
            width = info.width,
            height = info.height,
            fps,
            stride,
            "camera streaming"
        );
        Ok(Self {
            stream: Some(stream),
            device,
            layout,
            info,
            stride,
            converter: Converter::default(),
            mjpeg: MjpegDecoder::default(),
            seq: 0,
            control_ids: Default::default(),
        })
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
        let mut ids = Vec::new();
        let mut out = Vec::new();
        for d in descriptions {
            let id = d.id;
            if let Some(info) = self.describe(d) {
                ids.push(id);
                out.push(info);
            }
        }
        self.control_ids = out.iter().map(|c| c.name.clone()).zip(ids).collect();
        Ok(out)
    }

    fn set_control(&mut self, info: &ControlInfo, value: i64) -> Result<i64, ControlError> {
        let id = *self
            .control_ids
            .get(&info.name)
            .ok_or_else(|| ControlError::Unknown(info.name.clone()))?;
        let v = match info.kind {
            ControlKind::Boolean => v4l::control::Value::Boolean(value != 0),
            _ => v4l::control::Value::Integer(value),
        };
        self.device
            .set_control(v4l::control::Control { id, value: v })
            .map_err(|e| ControlError::Failed(format!("VIDIOC_S_CTRL {}: {e}", info.name)))?;
        Ok(value)
    }

    fn next_frame(
        &mut self,
        consume: &mut dyn FnMut(&I420View<'_>, CapturedFrame),
    ) -> Result<(), SourceError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(SourceError::Device("camera already released".into()));
        };
        let (buf, meta) = match CaptureStream::next(stream) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(SourceError::Stalled(DEQUEUE_TIMEOUT));
            }
            Err(e) => return Err(SourceError::Device(format!("VIDIOC_DQBUF: {e}"))),
        };
        let captured_at = Instant::now();
        // The driver says how much of the buffer holds this frame; never read past it.
        let used = (meta.bytesused as usize).min(buf.len());
        let data = &buf[..used];
        let (w, h) = (self.info.width as usize, self.info.height as usize);
        let frame = |bytes_copied| CapturedFrame {
            seq: self.seq,
            captured_at,
            bytes_copied,
        };
        let result = match self.layout {
            Layout::Yu12 => I420View::from_contiguous(data, w, h, self.stride)
                .map_err(|e| ConvertError::from(e).to_string())
                .map(|view| consume(&view, frame(0))),
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
            // The decoded picture counts as copied: it is written once, then encoded.
            Layout::Mjpeg => self
                .mjpeg
                .decode(data, w, h)
                .map_err(|e| e.to_string())
                .map(|(view, written)| consume(&view, frame(written))),
        };
        self.seq += 1;
        // A short or corrupt buffer is one bad frame, not a dead camera.
        result.map_err(SourceError::BadFrame)
    }
}

/// Whether the driver lists (`width` x `height`, `fps`) for `fourcc`: (size ok, rate ok).
/// A driver that cannot enumerate sizes or intervals is taken at its word (true).
fn mode_support(
    device: &Device,
    fourcc: FourCC,
    width: u32,
    height: u32,
    fps: u32,
) -> (bool, bool) {
    use v4l::framesize::FrameSizeEnum;
    let size_ok = match device.enum_framesizes(fourcc) {
        Ok(sizes) if !sizes.is_empty() => sizes.iter().any(|s| match &s.size {
            FrameSizeEnum::Discrete(d) => (d.width, d.height) == (width, height),
            FrameSizeEnum::Stepwise(s) => {
                (s.min_width..=s.max_width).contains(&width)
                    && (s.min_height..=s.max_height).contains(&height)
            }
        }),
        _ => true,
    };
    if !size_ok {
        return (false, false);
    }
    let fps_ok = match device.enum_frameintervals(fourcc, width, height) {
        Ok(intervals) if !intervals.is_empty() => intervals.iter().any(|i| match &i.interval {
            v4l::frameinterval::FrameIntervalEnum::Discrete(f) => {
                f.numerator > 0 && f.denominator / f.numerator >= fps
            }
            v4l::frameinterval::FrameIntervalEnum::Stepwise(s) => {
                // The shortest interval is the highest rate.
                s.min.numerator > 0 && s.min.denominator / s.min.numerator >= fps
            }
        }),
        _ => true,
    };
    (true, fps_ok)
}

impl Camera {
    fn describe(&self, d: v4l::control::Description) -> Option<ControlInfo> {
        use v4l::control::{Flags, MenuItem, Type};
        if d.flags.intersects(Flags::DISABLED | Flags::READ_ONLY) {
            return None;
        }
        let kind = match d.typ {
            Type::Integer => ControlKind::Integer,
            Type::Boolean => ControlKind::Boolean,
            Type::Menu | Type::IntegerMenu => ControlKind::Menu,
            _ => return None,
        };
        let value = match self.device.control(d.id).ok()?.value {
            v4l::control::Value::Integer(v) => v,
            v4l::control::Value::Boolean(b) => i64::from(b),
            _ => return None,
        };
        let menu = d
            .items
            .unwrap_or_default()
            .into_iter()
            .map(|(i, item)| {
                let label = match item {
                    MenuItem::Name(n) => n,
                    MenuItem::Value(v) => v.to_string(),
                };
                (i64::from(i), label)
            })
            .collect();
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
        // v4l's Stream panics in its Drop when STREAMOFF fails with anything but ENODEV (a
        // camera in a bad state); contain that so releasing a broken camera is logged, not fatal.
        if let Some(stream) = self.stream.take() {
            let released = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(stream)));
            if released.is_err() {
                tracing::warn!("VIDIOC_STREAMOFF failed while releasing the camera");
            }
        }
    }
}
