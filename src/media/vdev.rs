//! Thin V4L2 device layer: every ioctl, mmap and open goes through the C library, so LD_PRELOAD shims (libcamera's v4l2-compat.so) see it.
#![allow(unsafe_code)] // V4L2 FFI: ioctl, mmap and poll through libc, and the bindings' C unions.
//!
//! The `v4l` crate issues its ioctls as raw `syscall(SYS_ioctl)`, which an LD_PRELOAD shim
//! cannot intercept: under `libcamerify` the shim hands out an eventfd for the camera and the
//! kernel answers the bypassing ioctls with ENOTTY. This layer keeps the crate's struct
//! bindings (v4l2-sys-mit, re-exported as `v4l::v4l_sys`) and request numbers, and adds what
//! capture and the memory-to-memory codecs need: both single- and multi-planar queues, MMAP and
//! DMABUF memory, buffer export, events, encoder/decoder commands and extended controls.
//! No policy lives here: callers decide what to do with each answer.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::Duration;

use v4l::v4l_sys as sys;
use v4l::v4l2::vidioc;

/// Request numbers the `v4l` crate does not define (same encoding as linux/videodev2.h).
mod request {
    use super::sys;
    use std::mem::size_of;

    const fn iowr(nr: u32, size: usize) -> super::vidioc::_IOC_TYPE {
        // _IOC(_IOC_READ | _IOC_WRITE, 'V', nr, size)
        ((3u32 << 30) | ((b'V' as u32) << 8) | nr | ((size as u32) << 16)) as _
    }
    const fn ior(nr: u32, size: usize) -> super::vidioc::_IOC_TYPE {
        ((2u32 << 30) | ((b'V' as u32) << 8) | nr | ((size as u32) << 16)) as _
    }
    const fn iow(nr: u32, size: usize) -> super::vidioc::_IOC_TYPE {
        ((1u32 << 30) | ((b'V' as u32) << 8) | nr | ((size as u32) << 16)) as _
    }
    pub const VIDIOC_DQEVENT: super::vidioc::_IOC_TYPE = ior(89, size_of::<sys::v4l2_event>());
    pub const VIDIOC_SUBSCRIBE_EVENT: super::vidioc::_IOC_TYPE =
        iow(90, size_of::<sys::v4l2_event_subscription>());
    pub const VIDIOC_DECODER_CMD: super::vidioc::_IOC_TYPE =
        iowr(96, size_of::<sys::v4l2_decoder_cmd>());
    pub const VIDIOC_S_SELECTION: super::vidioc::_IOC_TYPE =
        iowr(95, size_of::<sys::v4l2_selection>());
}

/// A four-character code as V4L2 packs it (little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FourCc(pub [u8; 4]);

impl FourCc {
    pub(crate) const fn new(code: &[u8; 4]) -> Self {
        Self(*code)
    }
    fn raw(self) -> u32 {
        u32::from_le_bytes(self.0)
    }
    fn from_raw(v: u32) -> Self {
        Self(v.to_le_bytes())
    }
}

impl std::fmt::Display for FourCc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            f.write_str(&String::from_utf8_lossy(&self.0))
        } else {
            write!(f, "{:#010x}", self.raw())
        }
    }
}

impl std::fmt::Debug for FourCc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A buffer queue of a device: capture (device → memory) or output (memory → device), in the
/// single-planar or the multi-planar API (one plane used: rtcam's formats are contiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // V4L2's own names
pub(crate) enum BufType {
    VideoCapture,
    VideoOutput,
    VideoCaptureMplane,
    VideoOutputMplane,
}

impl BufType {
    fn raw(self) -> u32 {
        match self {
            Self::VideoCapture => sys::v4l2_buf_type_V4L2_BUF_TYPE_VIDEO_CAPTURE,
            Self::VideoOutput => sys::v4l2_buf_type_V4L2_BUF_TYPE_VIDEO_OUTPUT,
            Self::VideoCaptureMplane => sys::v4l2_buf_type_V4L2_BUF_TYPE_VIDEO_CAPTURE_MPLANE,
            Self::VideoOutputMplane => sys::v4l2_buf_type_V4L2_BUF_TYPE_VIDEO_OUTPUT_MPLANE,
        }
    }
    pub(crate) fn is_mplane(self) -> bool {
        matches!(self, Self::VideoCaptureMplane | Self::VideoOutputMplane)
    }
}

/// Where a queue's buffer memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Memory {
    /// Allocated by the driver, mapped into this process.
    Mmap,
    /// Imported from another device as a DMABUF file descriptor (no copy).
    DmaBuf,
}

impl Memory {
    fn raw(self) -> u32 {
        match self {
            Self::Mmap => sys::v4l2_memory_V4L2_MEMORY_MMAP,
            Self::DmaBuf => sys::v4l2_memory_V4L2_MEMORY_DMABUF,
        }
    }
}

/// VIDIOC_QUERYCAP's answer.
#[derive(Debug, Clone)]
pub(crate) struct Capabilities {
    pub driver: String,
    pub card: String,
    /// The node's own capabilities (V4L2_CAP_*).
    pub device_caps: u32,
}

impl Capabilities {
    pub(crate) fn has(&self, cap: u32) -> bool {
        self.device_caps & cap != 0
    }
}

/// One entry of VIDIOC_ENUM_FMT.
#[derive(Debug, Clone)]
pub(crate) struct FormatDesc {
    pub fourcc: FourCc,
}

/// One entry of VIDIOC_ENUM_FRAMESIZES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameSize {
    Discrete {
        width: u32,
        height: u32,
    },
    Stepwise {
        min: (u32, u32),
        max: (u32, u32),
        step: (u32, u32),
    },
}

/// One entry of VIDIOC_ENUM_FRAMEINTERVALS, as frames per second (the highest rate for a range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameRate {
    pub max_fps: u32,
}

/// A single-plane picture format (`fmt.pix`, or plane 0 of `fmt.pix_mp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PixFormat {
    pub width: u32,
    pub height: u32,
    pub fourcc: FourCc,
    /// Bytes per line of the (first) plane; 0 asks the driver to choose.
    pub bytesperline: u32,
    /// Bytes a buffer must hold; 0 asks the driver to choose (coded formats: a maximum).
    pub sizeimage: u32,
}

/// What VIDIOC_DQBUF returned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dequeued {
    pub index: u32,
    pub bytesused: u32,
    pub flags: u32,
    /// The buffer's timestamp (OUTPUT timestamps are copied to the CAPTURE buffer they produce).
    pub timestamp_us: i64,
    /// The driver's frame counter: a jump means frames were lost before this one.
    pub sequence: u32,
}

impl Dequeued {
    pub(crate) fn is_last(&self) -> bool {
        self.flags & sys::V4L2_BUF_FLAG_LAST != 0
    }
    pub(crate) fn is_error(&self) -> bool {
        self.flags & sys::V4L2_BUF_FLAG_ERROR != 0
    }
    pub(crate) fn is_keyframe(&self) -> bool {
        self.flags & sys::V4L2_BUF_FLAG_KEYFRAME != 0
    }
}

/// What a buffer given to VIDIOC_QBUF holds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct QueueArgs {
    /// Bytes of payload (OUTPUT queues; 0 for CAPTURE).
    pub bytesused: u32,
    /// DMABUF memory: the exported buffer and its size.
    pub dmabuf: Option<(RawFd, u32)>,
    pub timestamp_us: i64,
}

/// A dequeued event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Eos,
    /// V4L2_EVENT_SOURCE_CHANGE with its `changes` bits.
    SourceChange(u32),
    Other(u32),
}

/// Which of the device's conditions poll() reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Readiness {
    /// A CAPTURE buffer can be dequeued (or, for M2M devices, the capture queue is done).
    pub readable: bool,
    /// An OUTPUT buffer can be dequeued.
    pub writable: bool,
    /// An event is pending.
    pub event: bool,
    /// POLLERR: e.g. a queue is not streaming, or the device is gone.
    pub error: bool,
}

/// One control as VIDIOC_QUERY_EXT_CTRL describes it.
#[derive(Debug, Clone)]
pub(crate) struct ControlDesc {
    pub id: u32,
    pub name: String,
    pub kind: u32,
    pub minimum: i64,
    pub maximum: i64,
    pub step: u64,
    pub default: i64,
    pub flags: u32,
}

impl ControlDesc {
    pub(crate) const TYPE_INTEGER: u32 = sys::v4l2_ctrl_type_V4L2_CTRL_TYPE_INTEGER;
    pub(crate) const TYPE_BOOLEAN: u32 = sys::v4l2_ctrl_type_V4L2_CTRL_TYPE_BOOLEAN;
    pub(crate) const TYPE_MENU: u32 = sys::v4l2_ctrl_type_V4L2_CTRL_TYPE_MENU;
    pub(crate) const TYPE_INTEGER_MENU: u32 = sys::v4l2_ctrl_type_V4L2_CTRL_TYPE_INTEGER_MENU;
    pub(crate) const TYPE_INTEGER64: u32 = sys::v4l2_ctrl_type_V4L2_CTRL_TYPE_INTEGER64;

    pub(crate) fn is_disabled_or_read_only(&self) -> bool {
        self.flags & (sys::V4L2_CTRL_FLAG_DISABLED | sys::V4L2_CTRL_FLAG_READ_ONLY) != 0
    }
}

/// An open V4L2 device node (non-blocking; waits go through `poll`).
#[derive(Debug)]
pub(crate) struct Device {
    fd: OwnedFd,
    path: PathBuf,
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn timestamp_us(tv: &sys::timeval) -> i64 {
    tv.tv_sec * 1_000_000 + tv.tv_usec
}

impl Device {
    /// Opens `path` read-write, non-blocking, close-on-exec (std's open goes through the C
    /// library, so a shim sees it).
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Self {
            fd: OwnedFd::from(file),
            path: path.to_owned(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// One ioctl through the C library; EINTR is retried.
    fn ioctl<T>(&self, request: vidioc::_IOC_TYPE, arg: &mut T) -> io::Result<()> {
        loop {
            // SAFETY: `arg` is a live, exclusively borrowed value of exactly the struct type
            // `request` encodes (every caller below pairs a VIDIOC_* number with its struct),
            // and `self.fd` is an open descriptor for the lifetime of `self`.
            let r = unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    request as _,
                    (arg as *mut T).cast::<c_void>(),
                )
            };
            if r != -1 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub(crate) fn querycap(&self) -> io::Result<Capabilities> {
        // SAFETY: v4l2_capability is plain old data; all-zero is a valid value.
        let mut cap: sys::v4l2_capability = unsafe { std::mem::zeroed() };
        self.ioctl(vidioc::VIDIOC_QUERYCAP, &mut cap)?;
        let device_caps = if cap.capabilities & sys::V4L2_CAP_DEVICE_CAPS != 0 {
            cap.device_caps
        } else {
            cap.capabilities
        };
        Ok(Capabilities {
            driver: c_string(&cap.driver),
            card: c_string(&cap.card),
            device_caps,
        })
    }

    pub(crate) fn enum_formats(&self, queue: BufType) -> io::Result<Vec<FormatDesc>> {
        let mut out = Vec::new();
        for index in 0.. {
            // SAFETY: plain old data; all-zero is valid.
            let mut d: sys::v4l2_fmtdesc = unsafe { std::mem::zeroed() };
            d.index = index;
            d.type_ = queue.raw();
            match self.ioctl(vidioc::VIDIOC_ENUM_FMT, &mut d) {
                Ok(()) => out.push(FormatDesc {
                    fourcc: FourCc::from_raw(d.pixelformat),
                }),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub(crate) fn enum_framesizes(&self, fourcc: FourCc) -> io::Result<Vec<FrameSize>> {
        let mut out = Vec::new();
        for index in 0.. {
            // SAFETY: plain old data; all-zero is valid.
            let mut s: sys::v4l2_frmsizeenum = unsafe { std::mem::zeroed() };
            s.index = index;
            s.pixel_format = fourcc.raw();
            match self.ioctl(vidioc::VIDIOC_ENUM_FRAMESIZES, &mut s) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => return Err(e),
            }
            if s.type_ == sys::v4l2_frmsizetypes_V4L2_FRMSIZE_TYPE_DISCRETE {
                // SAFETY: the driver filled the `discrete` member, as `type_` says.
                let d = unsafe { s.__bindgen_anon_1.discrete };
                out.push(FrameSize::Discrete {
                    width: d.width,
                    height: d.height,
                });
            } else {
                // SAFETY: for the stepwise and continuous types the `stepwise` member is filled.
                let w = unsafe { s.__bindgen_anon_1.stepwise };
                out.push(FrameSize::Stepwise {
                    min: (w.min_width, w.min_height),
                    max: (w.max_width, w.max_height),
                    step: (w.step_width.max(1), w.step_height.max(1)),
                });
                break; // a range is the only entry
            }
        }
        Ok(out)
    }

    pub(crate) fn enum_frameintervals(
        &self,
        fourcc: FourCc,
        width: u32,
        height: u32,
    ) -> io::Result<Vec<FrameRate>> {
        let mut out = Vec::new();
        for index in 0.. {
            // SAFETY: plain old data; all-zero is valid.
            let mut f: sys::v4l2_frmivalenum = unsafe { std::mem::zeroed() };
            f.index = index;
            f.pixel_format = fourcc.raw();
            f.width = width;
            f.height = height;
            match self.ioctl(vidioc::VIDIOC_ENUM_FRAMEINTERVALS, &mut f) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => return Err(e),
            }
            let fract = if f.type_ == sys::v4l2_frmivaltypes_V4L2_FRMIVAL_TYPE_DISCRETE {
                // SAFETY: the driver filled `discrete`, as `type_` says.
                unsafe { f.__bindgen_anon_1.discrete }
            } else {
                // SAFETY: for ranges the `stepwise` member is filled; its minimum interval
                // is the highest rate.
                unsafe { f.__bindgen_anon_1.stepwise.min }
            };
            out.push(FrameRate {
                max_fps: fract.denominator.checked_div(fract.numerator).unwrap_or(0),
            });
            if f.type_ != sys::v4l2_frmivaltypes_V4L2_FRMIVAL_TYPE_DISCRETE {
                break;
            }
        }
        Ok(out)
    }

    fn format_struct(queue: BufType, f: &PixFormat) -> sys::v4l2_format {
        // SAFETY: plain old data; all-zero is valid.
        let mut raw: sys::v4l2_format = unsafe { std::mem::zeroed() };
        raw.type_ = queue.raw();
        if queue.is_mplane() {
            // SAFETY: writing plain integers into the union member this queue type uses.
            let mp = unsafe { &mut raw.fmt.pix_mp };
            mp.width = f.width;
            mp.height = f.height;
            mp.pixelformat = f.fourcc.raw();
            mp.field = sys::v4l2_field_V4L2_FIELD_NONE;
            mp.num_planes = 1;
            mp.plane_fmt[0].bytesperline = f.bytesperline;
            mp.plane_fmt[0].sizeimage = f.sizeimage;
        } else {
            // SAFETY: as above, for the single-planar member.
            let pix = unsafe { &mut raw.fmt.pix };
            pix.width = f.width;
            pix.height = f.height;
            pix.pixelformat = f.fourcc.raw();
            pix.field = sys::v4l2_field_V4L2_FIELD_NONE;
            pix.bytesperline = f.bytesperline;
            pix.sizeimage = f.sizeimage;
        }
        raw
    }

    fn format_from(queue: BufType, raw: &sys::v4l2_format) -> PixFormat {
        if queue.is_mplane() {
            // SAFETY: the driver filled the multi-planar member for a multi-planar type.
            let mp = unsafe { &raw.fmt.pix_mp };
            PixFormat {
                width: mp.width,
                height: mp.height,
                fourcc: FourCc::from_raw(mp.pixelformat),
                bytesperline: mp.plane_fmt[0].bytesperline,
                sizeimage: mp.plane_fmt[0].sizeimage,
            }
        } else {
            // SAFETY: the driver filled the single-planar member for a single-planar type.
            let pix = unsafe { &raw.fmt.pix };
            PixFormat {
                width: pix.width,
                height: pix.height,
                fourcc: FourCc::from_raw(pix.pixelformat),
                bytesperline: pix.bytesperline,
                sizeimage: pix.sizeimage,
            }
        }
    }

    pub(crate) fn g_fmt(&self, queue: BufType) -> io::Result<PixFormat> {
        // SAFETY: plain old data; all-zero is valid.
        let mut raw: sys::v4l2_format = unsafe { std::mem::zeroed() };
        raw.type_ = queue.raw();
        self.ioctl(vidioc::VIDIOC_G_FMT, &mut raw)?;
        Ok(Self::format_from(queue, &raw))
    }

    /// VIDIOC_S_FMT; returns what the driver made of the request.
    pub(crate) fn s_fmt(&self, queue: BufType, f: &PixFormat) -> io::Result<PixFormat> {
        let mut raw = Self::format_struct(queue, f);
        self.ioctl(vidioc::VIDIOC_S_FMT, &mut raw)?;
        Ok(Self::format_from(queue, &raw))
    }

    /// Asks for `fps` frames per second (VIDIOC_S_PARM); returns the rate the driver set (0:
    /// it did not say).
    pub(crate) fn s_parm_fps(&self, queue: BufType, fps: u32) -> io::Result<u32> {
        // SAFETY: plain old data; all-zero is valid.
        let mut p: sys::v4l2_streamparm = unsafe { std::mem::zeroed() };
        p.type_ = queue.raw();
        let per_frame = sys::v4l2_fract {
            numerator: 1,
            denominator: fps,
        };
        let capture = matches!(queue, BufType::VideoCapture | BufType::VideoCaptureMplane);
        if capture {
            p.parm.capture.timeperframe = per_frame;
        } else {
            p.parm.output.timeperframe = per_frame;
        }
        self.ioctl(vidioc::VIDIOC_S_PARM, &mut p)?;
        // SAFETY: the driver filled the member matching the queue's direction.
        let got = unsafe {
            if capture {
                p.parm.capture.timeperframe
            } else {
                p.parm.output.timeperframe
            }
        };
        Ok(got.denominator.checked_div(got.numerator).unwrap_or(0))
    }

    /// VIDIOC_REQBUFS; returns the number of buffers the driver allocated (0 frees them).
    pub(crate) fn reqbufs(&self, queue: BufType, memory: Memory, count: u32) -> io::Result<u32> {
        // SAFETY: plain old data; all-zero is valid.
        let mut r: sys::v4l2_requestbuffers = unsafe { std::mem::zeroed() };
        r.count = count;
        r.type_ = queue.raw();
        r.memory = memory.raw();
        self.ioctl(vidioc::VIDIOC_REQBUFS, &mut r)?;
        Ok(r.count)
    }

    /// Fills a v4l2_buffer (and its one plane for multi-planar queues) and runs `request` on
    /// it. `plane` must outlive the call: the struct points at it.
    fn buffer_ioctl(
        &self,
        request: vidioc::_IOC_TYPE,
        queue: BufType,
        memory: Memory,
        index: u32,
        args: &QueueArgs,
    ) -> io::Result<(sys::v4l2_buffer, sys::v4l2_plane)> {
        // SAFETY: plain old data; all-zero is valid.
        let mut b: sys::v4l2_buffer = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut plane: sys::v4l2_plane = unsafe { std::mem::zeroed() };
        b.index = index;
        b.type_ = queue.raw();
        b.memory = memory.raw();
        b.field = sys::v4l2_field_V4L2_FIELD_NONE;
        b.timestamp = sys::timeval {
            tv_sec: args.timestamp_us.div_euclid(1_000_000),
            tv_usec: args.timestamp_us.rem_euclid(1_000_000),
        };
        if queue.is_mplane() {
            plane.bytesused = args.bytesused;
            if let Some((fd, len)) = args.dmabuf {
                plane.m.fd = fd;
                plane.length = len;
            }
            b.length = 1;
            b.m.planes = &mut plane;
        } else {
            b.bytesused = args.bytesused;
            if let Some((fd, len)) = args.dmabuf {
                b.m.fd = fd;
                b.length = len;
            }
        }
        self.ioctl(request, &mut b)?;
        Ok((b, plane))
    }

    /// MMAP buffer `index`: (offset to mmap, length).
    pub(crate) fn querybuf(&self, queue: BufType, index: u32) -> io::Result<(u32, u32)> {
        let (b, plane) = self.buffer_ioctl(
            vidioc::VIDIOC_QUERYBUF,
            queue,
            Memory::Mmap,
            index,
            &QueueArgs::default(),
        )?;
        Ok(if queue.is_mplane() {
            // SAFETY: for MMAP planes the driver filled `mem_offset`.
            (unsafe { plane.m.mem_offset }, plane.length)
        } else {
            // SAFETY: for MMAP buffers the driver filled `offset`.
            (unsafe { b.m.offset }, b.length)
        })
    }

    /// Maps MMAP buffer `index` into memory (shared, read-write).
    pub(crate) fn map(&self, queue: BufType, index: u32) -> io::Result<Mapping> {
        let (offset, length) = self.querybuf(queue, index)?;
        Mapping::new(self.fd.as_raw_fd(), offset, length as usize)
    }

    /// Exports MMAP buffer `index` as a DMABUF file descriptor (VIDIOC_EXPBUF).
    pub(crate) fn expbuf(&self, queue: BufType, index: u32) -> io::Result<OwnedFd> {
        // SAFETY: plain old data; all-zero is valid.
        let mut e: sys::v4l2_exportbuffer = unsafe { std::mem::zeroed() };
        e.type_ = queue.raw();
        e.index = index;
        e.flags = (libc::O_CLOEXEC | libc::O_RDWR) as u32;
        self.ioctl(vidioc::VIDIOC_EXPBUF, &mut e)?;
        // SAFETY: on success the kernel returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(e.fd) })
    }

    pub(crate) fn qbuf(
        &self,
        queue: BufType,
        memory: Memory,
        index: u32,
        args: &QueueArgs,
    ) -> io::Result<()> {
        self.buffer_ioctl(vidioc::VIDIOC_QBUF, queue, memory, index, args)
            .map(drop)
    }

    /// VIDIOC_DQBUF without blocking: `None` when no buffer is ready (EAGAIN). EPIPE (the
    /// last buffer was already dequeued) comes back as the error.
    pub(crate) fn dqbuf(&self, queue: BufType, memory: Memory) -> io::Result<Option<Dequeued>> {
        match self.buffer_ioctl(
            vidioc::VIDIOC_DQBUF,
            queue,
            memory,
            0,
            &QueueArgs::default(),
        ) {
            Ok((b, plane)) => Ok(Some(Dequeued {
                index: b.index,
                bytesused: if queue.is_mplane() {
                    plane.bytesused.saturating_sub(plane.data_offset)
                } else {
                    b.bytesused
                },
                flags: b.flags,
                timestamp_us: timestamp_us(&b.timestamp),
                sequence: b.sequence,
            })),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn streamon(&self, queue: BufType) -> io::Result<()> {
        let mut t = queue.raw() as libc::c_int;
        self.ioctl(vidioc::VIDIOC_STREAMON, &mut t)
    }

    pub(crate) fn streamoff(&self, queue: BufType) -> io::Result<()> {
        let mut t = queue.raw() as libc::c_int;
        self.ioctl(vidioc::VIDIOC_STREAMOFF, &mut t)
    }

    /// Waits up to `timeout` for a buffer or an event.
    pub(crate) fn poll(&self, timeout: Duration) -> io::Result<Readiness> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN | libc::POLLOUT | libc::POLLPRI,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        loop {
            // SAFETY: one valid pollfd, living on this stack frame for the duration of the call.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(Readiness {
            readable: p.revents & libc::POLLIN != 0,
            writable: p.revents & libc::POLLOUT != 0,
            event: p.revents & libc::POLLPRI != 0,
            error: p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0,
        })
    }

    pub(crate) fn subscribe_event(&self, kind: u32) -> io::Result<()> {
        // SAFETY: plain old data; all-zero is valid.
        let mut s: sys::v4l2_event_subscription = unsafe { std::mem::zeroed() };
        s.type_ = kind;
        self.ioctl(request::VIDIOC_SUBSCRIBE_EVENT, &mut s)
    }

    /// A pending event, or `None` (ENOENT: none pending).
    pub(crate) fn dqevent(&self) -> io::Result<Option<Event>> {
        // SAFETY: plain old data; all-zero is valid.
        let mut e: sys::v4l2_event = unsafe { std::mem::zeroed() };
        match self.ioctl(request::VIDIOC_DQEVENT, &mut e) {
            Ok(()) => Ok(Some(match e.type_ {
                sys::V4L2_EVENT_EOS => Event::Eos,
                // SAFETY: the `src_change` member is the one filled for this event type.
                sys::V4L2_EVENT_SOURCE_CHANGE => {
                    Event::SourceChange(unsafe { e.u.src_change.changes })
                }
                other => Event::Other(other),
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// VIDIOC_ENCODER_CMD (e.g. V4L2_ENC_CMD_STOP).
    pub(crate) fn encoder_cmd(&self, cmd: u32) -> io::Result<()> {
        // SAFETY: plain old data; all-zero is valid.
        let mut c: sys::v4l2_encoder_cmd = unsafe { std::mem::zeroed() };
        c.cmd = cmd;
        self.ioctl(vidioc::VIDIOC_ENCODER_CMD, &mut c)
    }

    /// VIDIOC_DECODER_CMD (e.g. V4L2_DEC_CMD_STOP).
    pub(crate) fn decoder_cmd(&self, cmd: u32) -> io::Result<()> {
        // SAFETY: plain old data; all-zero is valid.
        let mut c: sys::v4l2_decoder_cmd = unsafe { std::mem::zeroed() };
        c.cmd = cmd;
        self.ioctl(request::VIDIOC_DECODER_CMD, &mut c)
    }

    /// Sets the visible rectangle of an OUTPUT queue (VIDIOC_S_SELECTION, V4L2_SEL_TGT_CROP).
    pub(crate) fn s_crop(&self, queue: BufType, width: u32, height: u32) -> io::Result<()> {
        // SAFETY: plain old data; all-zero is valid.
        let mut s: sys::v4l2_selection = unsafe { std::mem::zeroed() };
        // The selection API takes the single-planar type for both APIs.
        s.type_ = match queue {
            BufType::VideoOutputMplane => BufType::VideoOutput.raw(),
            BufType::VideoCaptureMplane => BufType::VideoCapture.raw(),
            q => q.raw(),
        };
        s.target = sys::V4L2_SEL_TGT_CROP;
        s.r.width = width;
        s.r.height = height;
        self.ioctl(request::VIDIOC_S_SELECTION, &mut s)
    }

    /// Every control the device has (VIDIOC_QUERY_EXT_CTRL with V4L2_CTRL_FLAG_NEXT_CTRL).
    pub(crate) fn query_controls(&self) -> io::Result<Vec<ControlDesc>> {
        let mut out = Vec::new();
        let mut id = 0u32;
        loop {
            // SAFETY: plain old data; all-zero is valid.
            let mut q: sys::v4l2_query_ext_ctrl = unsafe { std::mem::zeroed() };
            q.id = id | sys::V4L2_CTRL_FLAG_NEXT_CTRL | sys::V4L2_CTRL_FLAG_NEXT_COMPOUND;
            match self.ioctl(vidioc::VIDIOC_QUERY_EXT_CTRL, &mut q) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => return Err(e),
            }
            id = q.id;
            if q.type_ == sys::v4l2_ctrl_type_V4L2_CTRL_TYPE_CTRL_CLASS {
                continue;
            }
            let name_bytes: Vec<u8> = q.name.iter().map(|c| *c as u8).collect();
            let name = c_string(&name_bytes);
            out.push(ControlDesc {
                id: q.id,
                name,
                kind: q.type_,
                minimum: q.minimum,
                maximum: q.maximum,
                step: q.step,
                default: q.default_value,
                flags: q.flags,
            });
        }
        Ok(out)
    }

    /// A menu control's item label (or its integer for integer menus); `None` when the driver
    /// skips that index.
    pub(crate) fn menu_item(&self, id: u32, index: u32, integer: bool) -> Option<String> {
        // SAFETY: plain old data; all-zero is valid.
        let mut m: sys::v4l2_querymenu = unsafe { std::mem::zeroed() };
        m.id = id;
        m.index = index;
        self.ioctl(vidioc::VIDIOC_QUERYMENU, &mut m).ok()?;
        // SAFETY: the driver filled `value` for integer menus and `name` otherwise; both are
        // copied out by value (the struct is packed, so no references into it).
        Some(if integer {
            let value: i64 = unsafe { m.__bindgen_anon_1.value };
            value.to_string()
        } else {
            let name: [u8; 32] = unsafe { m.__bindgen_anon_1.name };
            c_string(&name)
        })
    }

    /// A control's current value (VIDIOC_G_EXT_CTRLS, so codec-class controls work too).
    /// `wide`: a 64-bit control (V4L2_CTRL_TYPE_INTEGER64).
    pub(crate) fn get_control(&self, id: u32, wide: bool) -> io::Result<i64> {
        let mut c = Self::ext_control(id, 0, wide);
        self.ext_controls(vidioc::VIDIOC_G_EXT_CTRLS, &mut c)?;
        Ok(Self::ext_value(&c, wide))
    }

    /// Sets a control (VIDIOC_S_EXT_CTRLS); returns the value the driver applied.
    pub(crate) fn set_control(&self, id: u32, value: i64, wide: bool) -> io::Result<i64> {
        if !wide && i32::try_from(value).is_err() {
            return Err(io::Error::from_raw_os_error(libc::ERANGE));
        }
        let mut c = Self::ext_control(id, value, wide);
        self.ext_controls(vidioc::VIDIOC_S_EXT_CTRLS, &mut c)?;
        Ok(Self::ext_value(&c, wide))
    }

    fn ext_control(id: u32, value: i64, wide: bool) -> sys::v4l2_ext_control {
        // SAFETY: plain old data; all-zero is valid.
        let mut c: sys::v4l2_ext_control = unsafe { std::mem::zeroed() };
        c.id = id;
        if wide {
            c.__bindgen_anon_1.value64 = value;
        } else {
            c.__bindgen_anon_1.value = value as i32; // range checked by the caller
        }
        c
    }

    fn ext_value(c: &sys::v4l2_ext_control, wide: bool) -> i64 {
        // SAFETY: the kernel reads and writes `value64` for 64-bit controls and `value` for
        // the others; we read the member the control's type uses.
        unsafe {
            if wide {
                c.__bindgen_anon_1.value64
            } else {
                i64::from(c.__bindgen_anon_1.value)
            }
        }
    }

    fn ext_controls(
        &self,
        request: vidioc::_IOC_TYPE,
        control: &mut sys::v4l2_ext_control,
    ) -> io::Result<()> {
        // SAFETY: plain old data; all-zero is valid.
        let mut cs: sys::v4l2_ext_controls = unsafe { std::mem::zeroed() };
        cs.__bindgen_anon_1.which = sys::V4L2_CTRL_WHICH_CUR_VAL;
        cs.count = 1;
        cs.controls = control;
        self.ioctl(request, &mut cs)
    }
}

/// A driver buffer mapped into this process; unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; moving it to another thread
// moves the only handle that unmaps it.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(fd: RawFd, offset: u32, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of `len` bytes at the driver's offset; the kernel
        // checks both against the buffer, and the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                libc::off_t::from(offset),
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The buffer's bytes. Callers read a buffer only while they own it (dequeued, not queued),
    /// so the device does not write it meanwhile.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Writable bytes, for OUTPUT buffers filled before they are queued.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` maps `len` writable bytes for as long as `self` lives, and `&mut self`
        // makes this the only slice.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region `new` mapped; no slice outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// V4L2 constants the rest of rtcam needs, by name.
pub(crate) mod consts {
    use super::sys;
    pub(crate) const CAP_VIDEO_CAPTURE: u32 = sys::V4L2_CAP_VIDEO_CAPTURE;
    pub(crate) const CAP_VIDEO_M2M: u32 = sys::V4L2_CAP_VIDEO_M2M;
    pub(crate) const CAP_VIDEO_M2M_MPLANE: u32 = sys::V4L2_CAP_VIDEO_M2M_MPLANE;
    pub(crate) const CAP_STREAMING: u32 = sys::V4L2_CAP_STREAMING;
    pub(crate) const ENC_CMD_STOP: u32 = sys::V4L2_ENC_CMD_STOP;
    pub(crate) const DEC_CMD_STOP: u32 = sys::V4L2_DEC_CMD_STOP;
    pub(crate) const EVENT_EOS: u32 = sys::V4L2_EVENT_EOS;
    pub(crate) const EVENT_SOURCE_CHANGE: u32 = sys::V4L2_EVENT_SOURCE_CHANGE;
    pub(crate) const CID_BITRATE: u32 = sys::V4L2_CID_MPEG_VIDEO_BITRATE;
    pub(crate) const CID_GOP_SIZE: u32 = sys::V4L2_CID_MPEG_VIDEO_GOP_SIZE;
    pub(crate) const CID_H264_I_PERIOD: u32 = sys::V4L2_CID_MPEG_VIDEO_H264_I_PERIOD;
    pub(crate) const CID_H264_PROFILE: u32 = sys::V4L2_CID_MPEG_VIDEO_H264_PROFILE;
    pub(crate) const CID_H264_LEVEL: u32 = sys::V4L2_CID_MPEG_VIDEO_H264_LEVEL;
    pub(crate) const CID_FORCE_KEY_FRAME: u32 = sys::V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME;
    pub(crate) const CID_REPEAT_SEQ_HEADER: u32 = sys::V4L2_CID_MPEG_VIDEO_REPEAT_SEQ_HEADER;
}
