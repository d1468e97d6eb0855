//! A V4L2 stateful memory-to-memory encoder driven by the pure `Machine`: formats on both queues, controls, DMABUF or MMAP input, drain, restart on a new size.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::machine::{
    CaptureOutcome, EpipePlan, Failure, FramePlan, Limits, Machine, Phase, WaitStatus,
};
use super::probe::CodecNode;
use crate::media::frame::I420View;
use crate::media::vdev::{
    BufType, ControlDesc, Dequeued, Device, Event, FourCc, Mapping, Memory, PixFormat, QueueArgs,
    consts,
};

/// Why the encoder cannot go on. Callers fall back to software encoding on all but
/// `Unavailable`, which only refuses one request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum M2mError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The node cannot do what is asked (format, size, memory type).
    #[error("{path}: {what}")]
    Unsupported { path: PathBuf, what: String },
    /// Timeouts and corrupt output, as the state machine decided.
    #[error("{path}: {failure}")]
    Failed { path: PathBuf, failure: Failure },
    /// One request the driver has no control for (e.g. forced keyframes).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// What the encoder is asked to produce.
#[derive(Debug, Clone)]
pub(crate) struct EncoderSettings {
    /// Coded format on the CAPTURE queue (H264, or FWHT for vicodec).
    pub coded: FourCc,
    /// Raw format on the OUTPUT queue (YU12).
    pub raw: FourCc,
    pub fps: u32,
    pub bitrate: Option<u32>,
    /// Frames from one keyframe to the next.
    pub gop: Option<u32>,
    /// V4L2_CID_MPEG_VIDEO_H264_PROFILE / _LEVEL menu values (H.264 only).
    pub h264_profile: Option<i64>,
    pub h264_level: Option<i64>,
    /// Import camera buffers (DMABUF) where their layout fits the encoder's OUTPUT format;
    /// otherwise, and for plain pictures, copy into `output_buffers` MMAP buffers.
    pub prefer_dmabuf: bool,
    pub output_buffers: u32,
    pub capture_buffers: u32,
    pub limits: Limits,
}

/// What became of one requested control.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ControlOutcome {
    Applied(i64),
    /// The driver has no such control.
    Unsupported,
    /// The driver refused the value.
    Refused(String),
}

/// One encoded unit (an access unit for H.264, a frame for FWHT).
#[derive(Debug, Clone)]
pub(crate) struct EncodedUnit {
    pub data: Vec<u8>,
    /// The driver flagged it as a keyframe (V4L2_BUF_FLAG_KEYFRAME).
    pub keyframe: bool,
    /// The timestamp of the frame it encodes (see `Machine`).
    pub timestamp_us: i64,
}

/// A raw picture for `encode`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawInput<'a> {
    /// A picture in memory: copied into a free MMAP OUTPUT buffer.
    Picture(&'a I420View<'a>),
    /// Camera buffer `index` of `buffers`, exported as a DMABUF of `length` bytes and mapped
    /// as `view` (single-plane YU12). Imported by reference when its layout fits the
    /// encoder (OUTPUT buffer i is then camera buffer i), else copied from `view`.
    Camera {
        index: u32,
        buffers: u32,
        fd: BorrowedFd<'a>,
        length: u32,
        view: &'a I420View<'a>,
    },
}

/// Whether the encoder can read a camera's single-plane YU12 buffer in place: the same
/// line length, the chroma planes where the encoder expects them (after `height` lines), and
/// the whole OUTPUT image inside the buffer.
pub(crate) fn dmabuf_fit(
    camera_stride: usize,
    camera_height: usize,
    camera_length: usize,
    encoder: &PixFormat,
) -> Result<(), String> {
    if encoder.bytesperline as usize != camera_stride {
        return Err(format!(
            "the encoder wants {}-byte lines, the camera gives {camera_stride}",
            encoder.bytesperline
        ));
    }
    if encoder.height as usize != camera_height {
        return Err(format!(
            "the encoder's buffers are {} lines high (its alignment), the camera's {camera_height}",
            encoder.height
        ));
    }
    if (encoder.sizeimage as usize) > camera_length {
        return Err(format!(
            "the encoder reads {} bytes, the camera buffer holds {camera_length}",
            encoder.sizeimage
        ));
    }
    Ok(())
}

/// Counters for logs, state and `rtcam record`'s summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct EncoderStats {
    pub frames_in: u64,
    pub units_out: u64,
    pub keyframes_out: u64,
    /// Raw picture bytes copied into the encoder for the last frame (0: DMABUF).
    pub bytes_copied_last: u64,
    /// How pictures reach the encoder at the current size ("dmabuf" or "mmap").
    pub input: &'static str,
    /// Why camera buffers are copied rather than imported (when they are).
    pub dmabuf_refused: Option<String>,
    /// Initialization sequences run (1 + restarts for new sizes).
    pub initializations: u64,
    pub drains: u64,
    /// CAPTURE buffers flagged V4L2_BUF_FLAG_LAST, and V4L2_EVENT_EOS events, seen.
    pub last_buffers: u64,
    pub eos_events: u64,
    pub corrupt_units: u64,
    /// CAPTURE queue resets, to resume after a drain (see `FramePlan::Resume`).
    pub capture_resets: u64,
}

/// A stateful M2M encoder node in use.
pub(crate) struct M2mEncoder {
    // Mappings are released (Drop) before the device closes.
    capture_maps: Vec<Mapping>,
    output_maps: Vec<Mapping>,
    device: Device,
    node: CodecNode,
    out_q: BufType,
    cap_q: BufType,
    settings: EncoderSettings,
    machine: Machine,
    controls: Vec<ControlDesc>,
    applied: Vec<(&'static str, ControlOutcome)>,
    output_format: Option<PixFormat>,
    /// OUTPUT memory at the current size.
    memory: Memory,
    streaming: bool,
    stats: EncoderStats,
}

impl M2mEncoder {
    /// Opens the node (nothing is configured until the first frame gives the size).
    pub(crate) fn open(node: &CodecNode, settings: EncoderSettings) -> Result<Self, M2mError> {
        let path = node.path.clone();
        let device = Device::open(&path).map_err(|source| M2mError::Io {
            path: path.clone(),
            op: "open",
            source,
        })?;
        if !node.encodes(settings.raw, settings.coded) {
            return Err(M2mError::Unsupported {
                path,
                what: format!(
                    "does not encode {} to {} (takes {:?}, gives {:?})",
                    settings.raw, settings.coded, node.input_formats, node.output_formats
                ),
            });
        }
        let (out_q, cap_q) = node.queues();
        let controls = device.query_controls().unwrap_or_default();
        // Deprecated, but the way some drivers report the end of a drain; the LAST flag is
        // what counts.
        let _ = device.subscribe_event(consts::EVENT_EOS);
        let limits = settings.limits;
        Ok(Self {
            capture_maps: Vec::new(),
            output_maps: Vec::new(),
            device,
            node: node.clone(),
            out_q,
            cap_q,
            machine: Machine::new(limits),
            settings,
            controls,
            applied: Vec::new(),
            output_format: None,
            memory: Memory::Mmap,
            streaming: false,
            stats: EncoderStats::default(),
        })
    }

    pub(crate) fn node(&self) -> &CodecNode {
        &self.node
    }

    pub(crate) fn stats(&self) -> &EncoderStats {
        &self.stats
    }

    pub(crate) fn phase(&self) -> Phase {
        self.machine.phase()
    }

    /// The controls asked for at the last initialisation and what the driver made of them.
    pub(crate) fn applied_controls(&self) -> &[(&'static str, ControlOutcome)] {
        &self.applied
    }

    fn control(&self, id: u32) -> Option<&ControlDesc> {
        self.controls.iter().find(|c| c.id == id)
    }

    /// Whether a keyframe can be forced (V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME), and if not why.
    pub(crate) fn keyframe_support(&self) -> Result<(), M2mError> {
        match self.control(consts::CID_FORCE_KEY_FRAME) {
            Some(_) => Ok(()),
            None => Err(M2mError::Unavailable(format!(
                "{} ({}) has no V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME control",
                self.node.path.display(),
                self.node.card
            ))),
        }
    }

    /// Changes the bitrate while encoding.
    pub(crate) fn set_bitrate(&mut self, bps: u32) -> Result<u32, M2mError> {
        if self.control(consts::CID_BITRATE).is_none() {
            return Err(M2mError::Unavailable(format!(
                "{} has no V4L2_CID_MPEG_VIDEO_BITRATE control",
                self.node.path.display()
            )));
        }
        let applied = self
            .device
            .set_control(consts::CID_BITRATE, i64::from(bps), false)
            .map_err(|source| self.io("VIDIOC_S_EXT_CTRLS bitrate", source))?;
        self.settings.bitrate = Some(bps);
        Ok(u32::try_from(applied).unwrap_or(bps))
    }

    fn io(&self, op: &'static str, source: io::Error) -> M2mError {
        M2mError::Io {
            path: self.node.path.clone(),
            op,
            source,
        }
    }

    /// An ioctl failed while frames were in the encoder: it cannot be trusted any more.
    fn broken(&mut self, op: &'static str, source: io::Error) -> M2mError {
        self.machine
            .fail(Failure::Failed(format!("{op}: {source}")));
        self.io(op, source)
    }

    fn failed(&self, failure: Failure) -> M2mError {
        M2mError::Failed {
            path: self.node.path.clone(),
            failure,
        }
    }

    /// Encodes one picture of `width` x `height` and appends what the encoder produced (with
    /// one frame in flight: this frame) to `out`. A new size drains and re-initialises the
    /// encoder first; `keyframe` asks for an IDR (see `keyframe_support`).
    pub(crate) fn encode(
        &mut self,
        input: RawInput<'_>,
        width: u32,
        height: u32,
        keyframe: bool,
        out: &mut Vec<EncodedUnit>,
    ) -> Result<(), M2mError> {
        loop {
            // Imported camera buffers dictate the OUTPUT buffer.
            let index_hint = match input {
                RawInput::Camera { index, .. } if self.memory == Memory::DmaBuf => Some(index),
                _ => None,
            };
            match self
                .machine
                .offer_frame(width, height, keyframe, index_hint, Instant::now())
            {
                FramePlan::Initialize { width, height } => {
                    self.initialize(width, height, &input)?
                }
                FramePlan::Drain => self.drain(out)?,
                FramePlan::Resume => {
                    self.reset_capture()?;
                    self.machine.resumed();
                }
                FramePlan::WaitForBuffer { deadline } => self.pump(deadline, out)?,
                FramePlan::Fail(f) => return Err(self.failed(f)),
                FramePlan::Queue {
                    index,
                    timestamp_us,
                    keyframe,
                } => {
                    if keyframe && self.control(consts::CID_FORCE_KEY_FRAME).is_some() {
                        self.device
                            .set_control(consts::CID_FORCE_KEY_FRAME, 1, false)
                            .map_err(|e| self.broken("VIDIOC_S_EXT_CTRLS force keyframe", e))?;
                    }
                    self.queue_input(index, timestamp_us, &input)?;
                    break;
                }
            }
        }
        self.stats.frames_in += 1;
        self.pump_until_done(out)
    }

    /// Drains the encoder (V4L2_ENC_CMD_STOP): every queued frame comes out, up to the buffer
    /// flagged LAST. Encoding resumes with the next `encode` (a new stream: keyframe first).
    pub(crate) fn drain(&mut self, out: &mut Vec<EncodedUnit>) -> Result<(), M2mError> {
        if self.machine.begin_drain(Instant::now()) {
            self.stats.drains += 1;
            self.device
                .encoder_cmd(consts::ENC_CMD_STOP)
                .map_err(|e| self.broken("VIDIOC_ENCODER_CMD STOP", e))?;
        }
        self.pump_until_done(out)
    }

    fn pump_until_done(&mut self, out: &mut Vec<EncodedUnit>) -> Result<(), M2mError> {
        loop {
            match self.machine.wait_status(Instant::now()) {
                WaitStatus::Done => return Ok(()),
                WaitStatus::Wait { deadline } => self.pump(deadline, out)?,
                WaitStatus::Fail(f) => return Err(self.failed(f)),
            }
        }
    }

    /// Waits until the device reports something or `deadline` passes, then takes every
    /// returned buffer and event.
    fn pump(&mut self, deadline: Instant, out: &mut Vec<EncodedUnit>) -> Result<(), M2mError> {
        let wait = deadline.saturating_duration_since(Instant::now());
        // Poll in short slices: some drivers signal an M2M node's OUTPUT side only via POLLOUT
        // and a stale POLLERR must not turn into a busy loop.
        self.device
            .poll(wait.min(Duration::from_millis(100)))
            .map_err(|e| self.broken("poll", e))?;
        while let Some(d) = self
            .device
            .dqbuf(self.out_q, self.memory)
            .map_err(|e| self.broken("VIDIOC_DQBUF (OUTPUT)", e))?
        {
            self.machine.output_done(d.index);
        }
        loop {
            let d = match self.device.dqbuf(self.cap_q, Memory::Mmap) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                // The LAST buffer was already dequeued.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    match self.machine.capture_epipe() {
                        EpipePlan::Ignore => break,
                        EpipePlan::Fail(f) => return Err(self.failed(f)),
                    }
                }
                Err(e) => return Err(self.broken("VIDIOC_DQBUF (CAPTURE)", e)),
            };
            self.take_capture(d, out)?;
        }
        while let Ok(Some(ev)) = self.device.dqevent() {
            if ev == Event::Eos {
                self.stats.eos_events += 1;
            }
        }
        Ok(())
    }

    fn take_capture(&mut self, d: Dequeued, out: &mut Vec<EncodedUnit>) -> Result<(), M2mError> {
        if d.is_last() {
            self.stats.last_buffers += 1;
        }
        match self.machine.capture_done(
            d.bytesused,
            d.is_last(),
            d.is_error(),
            d.is_keyframe(),
            d.timestamp_us,
        ) {
            CaptureOutcome::Emit {
                len,
                keyframe,
                timestamp_us,
            } => {
                let map = self.capture_maps.get(d.index as usize).ok_or_else(|| {
                    self.failed(Failure::Failed(format!(
                        "CAPTURE buffer {} unknown",
                        d.index
                    )))
                })?;
                let len = (len as usize).min(map.len());
                out.push(EncodedUnit {
                    data: map.as_slice()[..len].to_vec(),
                    keyframe,
                    timestamp_us,
                });
                self.stats.units_out += 1;
                self.stats.keyframes_out += u64::from(keyframe);
            }
            CaptureOutcome::Skip => {
                if d.is_error() {
                    self.stats.corrupt_units += 1;
                }
            }
            CaptureOutcome::Fail(f) => {
                self.stats.corrupt_units += 1;
                return Err(self.failed(f));
            }
        }
        // Back to the encoder; after LAST it is used once encoding resumes.
        self.device
            .qbuf(self.cap_q, Memory::Mmap, d.index, &QueueArgs::default())
            .map_err(|e| self.broken("VIDIOC_QBUF (CAPTURE)", e))
    }

    /// Restarts the CAPTURE queue with all its buffers (the encoder interface's Reset), to
    /// resume after a drain.
    fn reset_capture(&mut self) -> Result<(), M2mError> {
        self.stats.capture_resets += 1;
        self.device
            .streamoff(self.cap_q)
            .map_err(|e| self.broken("VIDIOC_STREAMOFF (CAPTURE)", e))?;
        for i in 0..self.capture_maps.len() as u32 {
            self.device
                .qbuf(self.cap_q, Memory::Mmap, i, &QueueArgs::default())
                .map_err(|e| self.broken("VIDIOC_QBUF (CAPTURE)", e))?;
        }
        self.device
            .streamon(self.cap_q)
            .map_err(|e| self.broken("VIDIOC_STREAMON (CAPTURE)", e))
    }

    fn queue_input(
        &mut self,
        index: u32,
        timestamp_us: i64,
        input: &RawInput<'_>,
    ) -> Result<(), M2mError> {
        let format = self.output_format.ok_or_else(|| {
            self.failed(Failure::Failed(
                "no OUTPUT format after initialisation".into(),
            ))
        })?;
        let args = match (*input, self.memory) {
            (RawInput::Camera { fd, length, .. }, Memory::DmaBuf) => {
                self.stats.bytes_copied_last = 0;
                QueueArgs {
                    bytesused: format.sizeimage,
                    dmabuf: Some((fd.as_raw_fd(), length)),
                    timestamp_us,
                }
            }
            (RawInput::Camera { view, .. } | RawInput::Picture(view), Memory::Mmap) => {
                let map =
                    self.output_maps
                        .get_mut(index as usize)
                        .ok_or_else(|| M2mError::Failed {
                            path: self.node.path.clone(),
                            failure: Failure::Failed(format!("OUTPUT buffer {index} unknown")),
                        })?;
                let copied = copy_i420(view, &format, map.as_mut_slice()).map_err(|what| {
                    M2mError::Unsupported {
                        path: self.node.path.clone(),
                        what,
                    }
                })?;
                self.stats.bytes_copied_last = copied as u64;
                QueueArgs {
                    bytesused: format.sizeimage,
                    dmabuf: None,
                    timestamp_us,
                }
            }
            (RawInput::Picture(_), Memory::DmaBuf) => {
                return Err(M2mError::Unsupported {
                    path: self.node.path.clone(),
                    what: "a plain picture while the encoder imports camera buffers".into(),
                });
            }
        };
        self.device
            .qbuf(self.out_q, self.memory, index, &args)
            .map_err(|e| self.broken("VIDIOC_QBUF (OUTPUT)", e))
    }

    /// Stops both queues and frees every buffer (Reset, then back to Initialization).
    fn teardown(&mut self) {
        if self.streaming {
            let _ = self.device.streamoff(self.out_q);
            let _ = self.device.streamoff(self.cap_q);
            self.streaming = false;
        }
        self.capture_maps.clear();
        self.output_maps.clear();
        let _ = self.device.reqbufs(self.cap_q, Memory::Mmap, 0);
        let _ = self.device.reqbufs(self.out_q, self.memory, 0);
    }

    /// The Initialization sequence: CAPTURE format first (it governs OUTPUT's), then OUTPUT,
    /// crop, frame interval, controls, buffers, streaming.
    fn initialize(
        &mut self,
        width: u32,
        height: u32,
        input: &RawInput<'_>,
    ) -> Result<(), M2mError> {
        self.teardown();
        let path = self.node.path.clone();
        let unsupported = |what: String| M2mError::Unsupported {
            path: path.clone(),
            what,
        };
        let coded = self
            .device
            .s_fmt(
                self.cap_q,
                &PixFormat {
                    width,
                    height,
                    fourcc: self.settings.coded,
                    bytesperline: 0,
                    sizeimage: 0,
                },
            )
            .map_err(|e| self.io("VIDIOC_S_FMT (CAPTURE)", e))?;
        if coded.fourcc != self.settings.coded {
            return Err(unsupported(format!(
                "CAPTURE format {} instead of {}",
                coded.fourcc, self.settings.coded
            )));
        }
        let raw = self
            .device
            .s_fmt(
                self.out_q,
                &PixFormat {
                    width,
                    height,
                    fourcc: self.settings.raw,
                    bytesperline: 0,
                    sizeimage: 0,
                },
            )
            .map_err(|e| self.io("VIDIOC_S_FMT (OUTPUT)", e))?;
        if raw.fourcc != self.settings.raw || raw.width < width || raw.height < height {
            return Err(unsupported(format!(
                "OUTPUT format {}x{} {} instead of {width}x{height} {}",
                raw.width, raw.height, raw.fourcc, self.settings.raw
            )));
        }
        if (raw.width, raw.height) != (width, height) {
            // Aligned buffers (e.g. 1920x1088): encode only the picture.
            if let Err(e) = self.device.s_crop(self.out_q, width, height) {
                tracing::info!(encoder = %path.display(), "VIDIOC_S_SELECTION crop {width}x{height}: {e}");
            }
        }
        if let Err(e) = self.device.s_parm_fps(self.out_q, self.settings.fps) {
            tracing::debug!(encoder = %path.display(), "VIDIOC_S_PARM (OUTPUT): {e}");
        }
        self.apply_controls();
        let n = self
            .device
            .reqbufs(self.cap_q, Memory::Mmap, self.settings.capture_buffers)
            .map_err(|e| self.io("VIDIOC_REQBUFS (CAPTURE)", e))?;
        for i in 0..n {
            let map = self
                .device
                .map(self.cap_q, i)
                .map_err(|e| self.io("mmap (CAPTURE)", e))?;
            self.capture_maps.push(map);
            self.device
                .qbuf(self.cap_q, Memory::Mmap, i, &QueueArgs::default())
                .map_err(|e| self.io("VIDIOC_QBUF (CAPTURE)", e))?;
        }
        // DMABUF where the camera's buffers fit the encoder's layout, else MMAP and one copy.
        let mut memory = Memory::Mmap;
        self.stats.dmabuf_refused = None;
        if let RawInput::Camera {
            buffers,
            length,
            view,
            ..
        } = *input
            && self.settings.prefer_dmabuf
        {
            match dmabuf_fit(view.y_stride, view.height, length as usize, &raw) {
                Ok(()) => match self.device.reqbufs(self.out_q, Memory::DmaBuf, buffers) {
                    Ok(n) if n >= buffers => memory = Memory::DmaBuf,
                    Ok(n) => {
                        self.stats.dmabuf_refused = Some(format!(
                            "{n} DMABUF OUTPUT buffers for {buffers} camera buffers"
                        ));
                        let _ = self.device.reqbufs(self.out_q, Memory::DmaBuf, 0);
                    }
                    Err(e) => {
                        self.stats.dmabuf_refused =
                            Some(format!("no DMABUF import on the OUTPUT queue: {e}"))
                    }
                },
                Err(why) => self.stats.dmabuf_refused = Some(why),
            }
        }
        if let Some(why) = &self.stats.dmabuf_refused {
            tracing::info!(encoder = %path.display(), "copying pictures into the encoder: {why}");
        }
        let outputs = match memory {
            Memory::DmaBuf => match *input {
                RawInput::Camera { buffers, .. } => buffers,
                RawInput::Picture(_) => 0,
            },
            Memory::Mmap => {
                let n = self
                    .device
                    .reqbufs(self.out_q, Memory::Mmap, self.settings.output_buffers)
                    .map_err(|e| self.io("VIDIOC_REQBUFS (OUTPUT)", e))?;
                for i in 0..n {
                    let map = self
                        .device
                        .map(self.out_q, i)
                        .map_err(|e| self.io("mmap (OUTPUT)", e))?;
                    self.output_maps.push(map);
                }
                n
            }
        };
        self.memory = memory;
        self.stats.input = if memory == Memory::DmaBuf {
            "dmabuf"
        } else {
            "mmap"
        };
        self.device
            .streamon(self.out_q)
            .map_err(|e| self.io("VIDIOC_STREAMON (OUTPUT)", e))?;
        self.device
            .streamon(self.cap_q)
            .map_err(|e| self.io("VIDIOC_STREAMON (CAPTURE)", e))?;
        self.streaming = true;
        self.output_format = Some(raw);
        self.stats.initializations += 1;
        self.machine
            .started(width, height, outputs, memory == Memory::DmaBuf);
        tracing::info!(
            encoder = %path.display(),
            card = %self.node.card,
            coded = %self.settings.coded,
            raw = %raw.fourcc,
            width,
            height,
            bytesperline = raw.bytesperline,
            input = ?memory,
            "hardware encoder streaming"
        );
        Ok(())
    }

    /// Bitrate, GOP, profile and level, each where the driver has the control.
    fn apply_controls(&mut self) {
        let s = &self.settings;
        let h264 = s.coded == FourCc::new(b"H264");
        let mut wanted: Vec<(&'static str, u32, Option<i64>)> = vec![
            ("bitrate", consts::CID_BITRATE, s.bitrate.map(i64::from)),
            ("gop_size", consts::CID_GOP_SIZE, s.gop.map(i64::from)),
        ];
        if h264 {
            wanted.extend([
                (
                    "h264_i_period",
                    consts::CID_H264_I_PERIOD,
                    s.gop.map(i64::from),
                ),
                ("h264_profile", consts::CID_H264_PROFILE, s.h264_profile),
                ("h264_level", consts::CID_H264_LEVEL, s.h264_level),
                // SPS/PPS with every IDR, so a viewer can start at any keyframe.
                (
                    "repeat_sequence_header",
                    consts::CID_REPEAT_SEQ_HEADER,
                    Some(1),
                ),
            ]);
        }
        let mut applied = Vec::new();
        for (name, id, value) in wanted {
            let Some(value) = value else { continue };
            let outcome = match self.control(id) {
                None => ControlOutcome::Unsupported,
                Some(desc) => match self.device.set_control(
                    id,
                    value,
                    desc.kind == ControlDesc::TYPE_INTEGER64,
                ) {
                    Ok(v) => ControlOutcome::Applied(v),
                    Err(e) => ControlOutcome::Refused(e.to_string()),
                },
            };
            if let ControlOutcome::Refused(e) = &outcome {
                tracing::warn!(encoder = %self.node.path.display(), control = name, value, "refused: {e}");
            }
            applied.push((name, outcome));
        }
        self.applied = applied;
    }
}

impl Drop for M2mEncoder {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Copies an I420 picture into an encoder's single-plane YU12 buffer laid out as `format`
/// says (luma lines of `bytesperline`, chroma of half that, planes after `height` lines).
/// Returns the bytes copied.
fn copy_i420(view: &I420View<'_>, format: &PixFormat, dst: &mut [u8]) -> Result<usize, String> {
    let (w, h) = (view.width, view.height);
    let bpl = format.bytesperline as usize;
    let rows = format.height as usize;
    let (cw, ch, cbpl) = (w.div_ceil(2), h.div_ceil(2), bpl / 2);
    let y_size = bpl * rows;
    let c_size = cbpl * rows.div_ceil(2);
    if bpl < w || (format.width as usize) < w || rows < h || dst.len() < y_size + 2 * c_size {
        return Err(format!(
            "a {w}x{h} picture does not fit the encoder's {}x{} buffer ({} bytes per line, {} bytes)",
            format.width,
            format.height,
            bpl,
            dst.len()
        ));
    }
    for r in 0..h {
        dst[r * bpl..r * bpl + w]
            .copy_from_slice(&view.y[r * view.y_stride..r * view.y_stride + w]);
    }
    for (plane, base) in [(view.u, y_size), (view.v, y_size + c_size)] {
        for r in 0..ch {
            let d = base + r * cbpl;
            dst[d..d + cw].copy_from_slice(&plane[r * view.uv_stride..r * view.uv_stride + cw]);
        }
    }
    Ok(w * h + 2 * cw * ch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camera_buffers_are_imported_only_when_the_layout_fits() {
        let enc = |bpl, height, sizeimage| PixFormat {
            width: 640,
            height,
            fourcc: FourCc::new(b"YU12"),
            bytesperline: bpl,
            sizeimage,
        };
        assert_eq!(
            dmabuf_fit(640, 480, 460_800, &enc(640, 480, 460_800)),
            Ok(())
        );
        // vicodec aligns 640x360 to 368 lines: the chroma planes would be read 8 lines late.
        let e = dmabuf_fit(640, 360, 345_600, &enc(640, 368, 353_280)).unwrap_err();
        assert!(e.contains("368"), "{e}");
        // An encoder wanting 64-byte aligned lines from a camera with 640 + padding.
        assert!(dmabuf_fit(704, 480, 506_880, &enc(640, 480, 460_800)).is_err());
        assert!(
            dmabuf_fit(640, 480, 460_000, &enc(640, 480, 460_800)).is_err(),
            "buffer too small"
        );
    }

    #[test]
    fn pictures_are_copied_into_the_encoders_layout() {
        // A 4x2 picture with 6-byte luma lines into an 8-byte-per-line, 4-line buffer.
        let y = [1, 2, 3, 4, 0, 0, 5, 6, 7, 8, 0, 0];
        let (u, v) = ([10, 11, 0], [20, 21, 0]);
        let view = I420View {
            width: 4,
            height: 2,
            y: &y,
            u: &u,
            v: &v,
            y_stride: 6,
            uv_stride: 3,
        };
        let format = PixFormat {
            width: 8,
            height: 4,
            fourcc: FourCc::new(b"YU12"),
            bytesperline: 8,
            sizeimage: 48,
        };
        let mut dst = vec![0u8; 48];
        assert_eq!(copy_i420(&view, &format, &mut dst), Ok(12));
        assert_eq!(&dst[..4], &[1, 2, 3, 4]);
        assert_eq!(&dst[8..12], &[5, 6, 7, 8]);
        assert_eq!(&dst[32..34], &[10, 11], "U after 4 luma lines");
        assert_eq!(&dst[40..42], &[20, 21], "V after U's 2 lines of 4");
        let small = PixFormat {
            bytesperline: 2,
            ..format
        };
        assert!(copy_i420(&view, &small, &mut dst).is_err());
        assert!(copy_i420(&view, &format, &mut dst[..40]).is_err());
    }
}
