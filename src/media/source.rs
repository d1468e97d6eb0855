//! What a picture source is: the `FrameSource` trait, its facts, errors and the opener the pipeline calls.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::controls::{ControlError, ControlInfo};
use super::frame::I420View;

/// What a source delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceInfo {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub pixel_format: String,
    /// Bytes per line of the (first) plane as the source delivers it.
    pub stride: u32,
}

/// Per-frame facts from the source.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CapturedFrame {
    pub seq: u64,
    pub captured_at: Instant,
    /// Pixel bytes copied or converted before the encoder could read the picture.
    pub bytes_copied: usize,
    /// The camera buffer the picture is in, exported as a DMABUF, when the picture is that
    /// buffer (zero-copy YU12): a hardware encoder can read it in place.
    pub dmabuf: Option<DmaBufRef>,
}

/// A camera buffer exported as a DMABUF (VIDIOC_EXPBUF). The descriptor is the camera's and
/// valid only while the picture is borrowed (inside `next_frame`'s callback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DmaBufRef {
    /// The buffer's index, and how many buffers the camera has.
    pub index: u32,
    pub buffers: u32,
    pub fd: std::os::fd::RawFd,
    /// The whole buffer's size in bytes.
    pub length: u32,
}

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SourceError {
    /// The device failed (gone, I/O error): close it and reopen later.
    #[error("camera error: {0}")]
    Device(String),
    /// The device works but cannot give what is configured: reopening will not help soon.
    #[error("camera unsupported: {0}")]
    Unsupported(String),
    #[error("camera delivered no frame for {0:?}")]
    Stalled(Duration),
    /// One unusable frame; the next may be fine.
    #[error("bad frame: {0}")]
    BadFrame(String),
}

/// A picture source: a camera or the test pattern.
pub(crate) trait FrameSource: Send {
    fn info(&self) -> SourceInfo;
    /// Blocks until the next picture and hands it to `consume`, borrowed.
    fn next_frame(
        &mut self,
        consume: &mut dyn FnMut(&I420View<'_>, CapturedFrame),
    ) -> Result<(), SourceError>;
    /// The source's controls with their current values.
    fn controls(&mut self) -> Result<Vec<ControlInfo>, ControlError> {
        Ok(Vec::new())
    }
    /// Sets a control (already validated against `controls()`); returns the applied value.
    fn set_control(&mut self, info: &ControlInfo, value: i64) -> Result<i64, ControlError> {
        let _ = value;
        Err(ControlError::Unknown(info.name.clone()))
    }
    /// A camera that delivers H.264 itself (`capture.format = "H264"`): read it through this
    /// instead of `next_frame`.
    fn coded(&mut self) -> Option<&mut dyn CodedSource> {
        None
    }
}

/// Per-access-unit facts from a camera that encodes H.264 itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CodedMeta {
    pub seq: u64,
    pub captured_at: Instant,
    /// Frames the driver's sequence numbers say were lost just before this one: the pictures
    /// after a loss may refer to a picture that never arrived.
    pub lost_before: u32,
}

/// A camera's own H.264 (passthrough): access units, and the codec controls it has.
pub(crate) trait CodedSource {
    /// Blocks until the next buffer and hands its bytes (borrowed from the camera's buffer)
    /// to `consume`. A buffer the driver flagged as an error is `Err(BadFrame)`.
    fn next_access_unit(
        &mut self,
        consume: &mut dyn FnMut(&[u8], CodedMeta),
    ) -> Result<(), SourceError>;
    /// Asks the camera for an IDR now (V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME).
    fn force_keyframe(&mut self) -> Result<(), String>;
    /// Why keyframes cannot be forced, if they cannot.
    fn keyframes_unavailable(&self) -> Option<String>;
    /// Changes the camera's bitrate (V4L2_CID_MPEG_VIDEO_BITRATE); the error says why not.
    fn set_bitrate(&mut self, bps: u32) -> Result<u32, String>;
    /// The stream's (profile_idc, constraint flags, level_idc) from the SPS read at open.
    fn profile_level(&self) -> (u8, u8, u8);
    /// What was set through the camera's controls at open, for the status.
    fn applied(&self) -> String;
}

/// Picture geometry and rate asked of a source; the source reports what it really delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CaptureParams {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
}

/// A change of some capture parameters; the pipeline applies it to what is current, so two
/// changes at once (say `set-fps` and `set-resolution`) never undo each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CaptureChange {
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub fps: Option<u32>,
}

impl CaptureChange {
    /// `params` with this change applied.
    pub fn apply(self, params: CaptureParams) -> CaptureParams {
        CaptureParams {
            width: self.width.unwrap_or(params.width),
            height: self.height.unwrap_or(params.height),
            fps: self.fps.unwrap_or(params.fps),
        }
    }
}

/// Opens the configured source each time capture starts.
pub(crate) type SourceOpener =
    Box<dyn FnMut(CaptureParams) -> Result<Box<dyn FrameSource>, SourceError> + Send>;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_touches_only_what_it_names() {
        let p = CaptureParams {
            width: 640,
            height: 480,
            fps: 30,
        };
        let fps = CaptureChange {
            fps: Some(15),
            ..Default::default()
        };
        let size = CaptureChange {
            width: Some(1280),
            height: Some(720),
            fps: None,
        };
        // Either order gives both changes.
        let expected = CaptureParams {
            width: 1280,
            height: 720,
            fps: 15,
        };
        assert_eq!(size.apply(fps.apply(p)), expected);
        assert_eq!(fps.apply(size.apply(p)), expected);
        assert_eq!(CaptureChange::default().apply(p), p);
    }
}
