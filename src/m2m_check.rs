//! `rtcam m2m-check` (hidden, diagnostic): camera → (DMABUF) → stateful M2M encoder → decoder, written to files for the VM tests (vivid → vicodec FWHT).
//!
//! It exercises the encoder interface the way the service will use it with a hardware H.264
//! encoder, on a codec any kernel can load: the camera's MMAP buffers are exported
//! (VIDIOC_EXPBUF) and imported by the encoder (V4L2_MEMORY_DMABUF), or copied into the
//! encoder's own buffers; the GOP control is set; a keyframe is requested; the encoder is
//! drained mid-stream and resumed, restarted for a second picture size, and drained at the end.
//! Each size's encoded stream is then decoded by the decoder node (stateful decoder interface)
//! and the pictures written raw, so the host can check vivid's colour bars.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::media::frame::I420View;
use crate::media::m2m::encoder::{
    ControlOutcome, EncodedUnit, EncoderSettings, EncoderStats, M2mEncoder, RawInput,
};
use crate::media::m2m::machine::Limits;
use crate::media::m2m::probe::{self, CodecNode};
use crate::media::vdev::{
    BufType, Device, Event, FourCc, Mapping, Memory, PixFormat, QueueArgs, consts,
};

const YU12: FourCc = FourCc::new(b"YU12");
const FWHT: FourCc = FourCc::new(b"FWHT");
const CAMERA_BUFFERS: u32 = 4;

/// What to run.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The camera (vivid's capture node).
    pub camera: PathBuf,
    /// Picture sizes, one segment each; a new size restarts the encoder.
    pub sizes: Vec<(u32, u32)>,
    /// Frames per segment.
    pub frames: u32,
    /// Keyframe interval set through V4L2_CID_MPEG_VIDEO_GOP_SIZE.
    pub gop: u32,
    /// Import the camera's buffers (DMABUF) rather than copy into the encoder's (MMAP).
    pub dmabuf: bool,
    /// Where the encoded streams and decoded pictures go.
    pub output_dir: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct NodeSummary {
    pub(crate) path: PathBuf,
    pub(crate) driver: String,
    pub(crate) card: String,
    pub(crate) mplane: bool,
}

impl From<&CodecNode> for NodeSummary {
    fn from(n: &CodecNode) -> Self {
        Self {
            path: n.path.clone(),
            driver: n.driver.clone(),
            card: n.card.clone(),
            mplane: n.mplane,
        }
    }
}

/// One picture size's worth of frames.
#[derive(Debug, Serialize)]
pub struct SegmentSummary {
    pub(crate) width: u32,
    pub(crate) height: u32,
    /// "dmabuf" (the camera's buffers imported) or "mmap" (copied in), and why not DMABUF.
    pub(crate) input: &'static str,
    pub(crate) dmabuf_refused: Option<String>,
    /// The most any frame of the segment copied (0 with DMABUF).
    pub(crate) bytes_copied_per_frame: u64,
    /// Frames captured and handed to the encoder.
    pub(crate) frames_in: u32,
    /// Encoded frames that came out for them (the FWHT headers' size matches).
    pub(crate) units: u32,
    pub(crate) coded_bytes: u64,
    /// Units the driver flagged V4L2_BUF_FLAG_KEYFRAME (vicodec's encoder flags none).
    pub(crate) driver_keyframes: u32,
    /// Frame numbers (within the segment) whose FWHT header says I-frame.
    pub(crate) iframes: Vec<u32>,
    /// Pictures the decoder node produced from the segment's stream.
    pub(crate) decoded: u32,
    /// Raw YU12 pictures, `width * height * 3 / 2` bytes each.
    pub(crate) decoded_file: PathBuf,
    pub(crate) coded_file: PathBuf,
}

/// The mid-stream drain: frames out after V4L2_ENC_CMD_STOP, and the state reached.
#[derive(Debug, Serialize)]
pub struct DrainSummary {
    pub(crate) at_frame: u32,
    pub(crate) units: usize,
    pub(crate) phase: String,
}

/// The one JSON line `rtcam m2m-check` prints.
#[derive(Debug, Serialize)]
pub struct CheckSummary {
    pub(crate) encoder: NodeSummary,
    pub(crate) decoder: NodeSummary,
    /// Camera buffers offered for import ("dmabuf") or always copied ("mmap").
    pub(crate) input: &'static str,
    pub(crate) controls: Vec<(String, ControlOutcome)>,
    /// What asking for a keyframe gave (vicodec has no V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME).
    pub(crate) keyframe_request: String,
    /// What changing the bitrate while encoding gave (vicodec has no bitrate control).
    pub(crate) bitrate_change: String,
    pub(crate) mid_drain: Option<DrainSummary>,
    pub(crate) final_drain_units: usize,
    pub(crate) phase_at_end: String,
    pub(crate) stats: EncoderStats,
    pub(crate) segments: Vec<SegmentSummary>,
    /// Capturing and encoding every segment, then decoding and writing them.
    pub(crate) encode_ms: u64,
    pub(crate) duration_ms: u64,
}

/// vivid (or any single-planar YU12 camera) with exported buffers.
struct TestCamera {
    maps: Vec<Mapping>,
    dmabufs: Vec<OwnedFd>,
    device: Device,
    format: PixFormat,
}

impl TestCamera {
    fn open(path: &Path, width: u32, height: u32) -> Result<Self> {
        let device = Device::open(path).with_context(|| format!("opening {}", path.display()))?;
        let q = BufType::VideoCapture;
        let format = device
            .s_fmt(
                q,
                &PixFormat {
                    width,
                    height,
                    fourcc: YU12,
                    bytesperline: 0,
                    sizeimage: 0,
                },
            )
            .context("VIDIOC_S_FMT on the camera")?;
        if (format.width, format.height, format.fourcc) != (width, height, YU12) {
            bail!(
                "the camera gives {}x{} {}, not {width}x{height} YU12",
                format.width,
                format.height,
                format.fourcc
            );
        }
        // vivid's status text (over the top rows) on: its changing counters give the encoder
        // something to predict from, where vivid's flat colour bars alone are coded as
        // I-frames throughout (observed with vicodec at 640x480). The control outlives each
        // open, so it is set whatever an earlier user left.
        if let Some(osd) = device
            .query_controls()
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.name == "OSD Text Mode")
        {
            device
                .set_control(osd.id, 0, false)
                .context("vivid OSD Text Mode")?;
        }
        let n = device
            .reqbufs(q, Memory::Mmap, CAMERA_BUFFERS)
            .context("camera VIDIOC_REQBUFS")?;
        let mut camera = Self {
            maps: Vec::new(),
            dmabufs: Vec::new(),
            device,
            format,
        };
        for i in 0..n {
            camera
                .maps
                .push(camera.device.map(q, i).context("camera mmap")?);
            camera
                .dmabufs
                .push(camera.device.expbuf(q, i).context("camera VIDIOC_EXPBUF")?);
            camera
                .device
                .qbuf(q, Memory::Mmap, i, &QueueArgs::default())
                .context("camera VIDIOC_QBUF")?;
        }
        camera
            .device
            .streamon(q)
            .context("camera VIDIOC_STREAMON")?;
        Ok(camera)
    }

    /// The next filled buffer: (index, bytes used).
    fn next(&self) -> Result<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(d) = self.device.dqbuf(BufType::VideoCapture, Memory::Mmap)? {
                return Ok((d.index, d.bytesused));
            }
            if Instant::now() >= deadline {
                bail!("the camera delivered no frame for 5 s");
            }
            self.device.poll(Duration::from_millis(200))?;
        }
    }

    fn requeue(&self, index: u32) -> Result<()> {
        Ok(self.device.qbuf(
            BufType::VideoCapture,
            Memory::Mmap,
            index,
            &QueueArgs::default(),
        )?)
    }
}

impl Drop for TestCamera {
    fn drop(&mut self) {
        let _ = self.device.streamoff(BufType::VideoCapture);
    }
}

/// The fields of an FWHT frame header rtcam checks (linux/media/.../codec-fwht.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FwhtHeader {
    width: u32,
    height: u32,
    iframe: bool,
}

fn fwht_header(unit: &[u8]) -> Option<FwhtHeader> {
    const MAGIC: [u8; 8] = [0x4f, 0x4f, 0x4f, 0x4f, 0xff, 0xff, 0xff, 0xff];
    let be = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(unit.get(at..at + 4)?.try_into().ok()?))
    };
    if unit.get(..8)? != MAGIC {
        return None;
    }
    const FL_I_FRAME: u32 = 1 << 10;
    Some(FwhtHeader {
        width: be(12)?,
        height: be(16)?,
        iframe: be(20)? & FL_I_FRAME != 0,
    })
}

/// Runs the check; the summary says what happened, errors say what could not be done.
pub fn run(opts: &CheckOptions) -> Result<CheckSummary> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.output_dir)
        .with_context(|| format!("creating {}", opts.output_dir.display()))?;
    let nodes = probe::probe_all(Path::new("/dev"));
    let encoder_node = probe::find_encoder(&nodes, YU12, FWHT)
        .ok_or_else(|| anyhow!("MISSING: no V4L2 M2M node encodes YU12 to FWHT (is vicodec loaded?); found {nodes:?}"))?
        .clone();
    let decoder_node = probe::find_decoder(&nodes, FWHT, YU12)
        .ok_or_else(|| anyhow!("MISSING: no V4L2 M2M node decodes FWHT to YU12; found {nodes:?}"))?
        .clone();
    let settings = EncoderSettings {
        coded: FWHT,
        raw: YU12,
        fps: 30,
        bitrate: Some(1_000_000),
        gop: Some(opts.gop),
        h264_profile: None,
        h264_level: None,
        prefer_dmabuf: opts.dmabuf,
        output_buffers: 2,
        capture_buffers: 2,
        limits: Limits::default(),
    };
    let mut encoder = M2mEncoder::open(&encoder_node, settings).context("opening the encoder")?;
    let keyframe_request = match encoder.keyframe_support() {
        Ok(()) => "supported".to_owned(),
        Err(e) => e.to_string(),
    };
    let bitrate_change = match encoder.set_bitrate(500_000) {
        Ok(bps) => format!("applied {bps}"),
        Err(e) => e.to_string(),
    };
    // Frame k (0-based, over all segments) is the machine's timestamp k + 1.
    let mut units: Vec<EncodedUnit> = Vec::new();
    let mut segment_of_frame: Vec<usize> = Vec::new();
    let mut mid_drain = None;
    // Per segment: the OUTPUT memory used and why not DMABUF; per frame: bytes copied.
    let mut inputs: Vec<(&'static str, Option<String>)> = Vec::new();
    let mut copied: Vec<u64> = Vec::new();
    for (s, &(width, height)) in opts.sizes.iter().enumerate() {
        let camera = TestCamera::open(&opts.camera, width, height)?;
        for f in 0..opts.frames {
            let (index, used) = camera.next()?;
            let map = &camera.maps[index as usize];
            let view = I420View::from_contiguous(
                &map.as_slice()[..used as usize],
                width as usize,
                height as usize,
                camera.format.bytesperline as usize,
            )?;
            // "mmap": a plain picture, always copied; "dmabuf": the camera buffer, imported
            // where the layouts fit.
            let input = if opts.dmabuf {
                RawInput::Camera {
                    index,
                    buffers: camera.maps.len() as u32,
                    fd: camera.dmabufs[index as usize].as_fd(),
                    length: map.len() as u32,
                    view: &view,
                }
            } else {
                RawInput::Picture(&view)
            };
            encoder
                .encode(input, width, height, false, &mut units)
                .with_context(|| format!("encoding frame {f} of {width}x{height}"))?;
            segment_of_frame.push(s);
            if f == 0 {
                inputs.push((
                    encoder.stats().input,
                    encoder.stats().dmabuf_refused.clone(),
                ));
            }
            copied.push(encoder.stats().bytes_copied_last);
            // The encoder has released the buffer (DMABUF input is held until it has).
            camera.requeue(index)?;
            if s == 0 && f == opts.frames / 2 {
                let before = units.len();
                encoder.drain(&mut units).context("draining mid-stream")?;
                mid_drain = Some(DrainSummary {
                    at_frame: f,
                    units: units.len() - before,
                    phase: format!("{:?}", encoder.phase()),
                });
            }
        }
    }
    let before = units.len();
    encoder.drain(&mut units).context("draining at the end")?;
    let final_drain_units = units.len() - before;
    let encode_ms = started.elapsed().as_millis() as u64;

    let mut segments = Vec::new();
    for (s, &(width, height)) in opts.sizes.iter().enumerate() {
        let mine: Vec<&EncodedUnit> = units
            .iter()
            .filter(|u| {
                usize::try_from(u.timestamp_us - 1)
                    .ok()
                    .and_then(|k| segment_of_frame.get(k))
                    == Some(&s)
            })
            .collect();
        let first_frame = segment_of_frame.iter().position(|x| *x == s).unwrap_or(0) as i64;
        let mut iframes = Vec::new();
        for u in &mine {
            let h = fwht_header(&u.data)
                .ok_or_else(|| anyhow!("segment {s}: an encoded unit without an FWHT header"))?;
            if (h.width, h.height) != (width, height) {
                bail!(
                    "segment {s}: FWHT header says {}x{}, the segment is {width}x{height}",
                    h.width,
                    h.height
                );
            }
            if h.iframe {
                iframes.push((u.timestamp_us - 1 - first_frame) as u32);
            }
        }
        let coded_file = opts
            .output_dir
            .join(format!("segment{s}-{width}x{height}.fwht"));
        let mut f = std::fs::File::create(&coded_file)?;
        for u in &mine {
            f.write_all(&u.data)?;
        }
        let decoded_file = opts
            .output_dir
            .join(format!("segment{s}-{width}x{height}.yu12"));
        let coded: Vec<&[u8]> = mine.iter().map(|u| u.data.as_slice()).collect();
        let decoded =
            decode(&decoder_node, &coded, width, height, &decoded_file).with_context(|| {
                format!("decoding segment {s} with {}", decoder_node.path.display())
            })?;
        let copies: Vec<u64> = copied
            .iter()
            .zip(&segment_of_frame)
            .filter(|(_, seg)| **seg == s)
            .map(|(c, _)| *c)
            .collect();
        let (input, dmabuf_refused) = inputs.get(s).cloned().unwrap_or(("none", None));
        segments.push(SegmentSummary {
            width,
            height,
            input,
            dmabuf_refused,
            bytes_copied_per_frame: copies.iter().copied().max().unwrap_or(0),
            frames_in: segment_of_frame.iter().filter(|x| **x == s).count() as u32,
            units: mine.len() as u32,
            coded_bytes: mine.iter().map(|u| u.data.len() as u64).sum(),
            driver_keyframes: mine.iter().filter(|u| u.keyframe).count() as u32,
            iframes,
            decoded,
            decoded_file,
            coded_file,
        });
    }
    Ok(CheckSummary {
        encoder: (&encoder_node).into(),
        decoder: (&decoder_node).into(),
        input: if opts.dmabuf { "dmabuf" } else { "mmap" },
        controls: encoder
            .applied_controls()
            .iter()
            .map(|(n, o)| ((*n).to_owned(), o.clone()))
            .collect(),
        keyframe_request,
        bitrate_change,
        mid_drain,
        final_drain_units,
        phase_at_end: format!("{:?}", encoder.phase()),
        stats: encoder.stats().clone(),
        segments,
        encode_ms,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Decodes `units` (one coded frame each) with a stateful decoder node and writes the pictures
/// as tightly packed YU12 to `out`; returns how many came out.
fn decode(node: &CodecNode, units: &[&[u8]], width: u32, height: u32, out: &Path) -> Result<u32> {
    let dev = Device::open(&node.path)?;
    let (out_q, cap_q) = node.queues();
    dev.subscribe_event(consts::EVENT_SOURCE_CHANGE)
        .context("VIDIOC_SUBSCRIBE_EVENT source change")?;
    let _ = dev.subscribe_event(consts::EVENT_EOS);
    let coded = dev
        .s_fmt(
            out_q,
            &PixFormat {
                width,
                height,
                fourcc: FWHT,
                bytesperline: 0,
                sizeimage: 0,
            },
        )
        .context("VIDIOC_S_FMT (OUTPUT)")?;
    let n_out = dev
        .reqbufs(out_q, Memory::Mmap, 2)
        .context("VIDIOC_REQBUFS (OUTPUT)")?;
    let mut out_maps = (0..n_out)
        .map(|i| dev.map(out_q, i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut free: Vec<u32> = (0..n_out).rev().collect();
    dev.streamon(out_q).context("VIDIOC_STREAMON (OUTPUT)")?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut cap_maps: Vec<Mapping> = Vec::new();
    let mut cap_format: Option<PixFormat> = None;
    let (mut next, mut decoded, mut stop_sent) = (0usize, 0u32, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        while let (Some(&i), Some(unit)) = (free.last(), units.get(next)) {
            let map = &mut out_maps[i as usize];
            if unit.len() > map.len() {
                bail!(
                    "coded frame of {} bytes > the decoder's {}-byte buffers (sizeimage {})",
                    unit.len(),
                    map.len(),
                    coded.sizeimage
                );
            }
            map.as_mut_slice()[..unit.len()].copy_from_slice(unit);
            dev.qbuf(
                out_q,
                Memory::Mmap,
                i,
                &QueueArgs {
                    bytesused: unit.len() as u32,
                    dmabuf: None,
                    timestamp_us: next as i64 + 1,
                },
            )
            .context("VIDIOC_QBUF (OUTPUT)")?;
            free.pop();
            next += 1;
        }
        if next == units.len() && cap_format.is_some() && !stop_sent {
            dev.decoder_cmd(consts::DEC_CMD_STOP)
                .context("VIDIOC_DECODER_CMD STOP")?;
            stop_sent = true;
        }
        if Instant::now() >= deadline {
            bail!(
                "decoded {decoded} of {} frames before giving up after 30 s",
                units.len()
            );
        }
        dev.poll(Duration::from_millis(100))?;
        while let Some(d) = dev.dqbuf(out_q, Memory::Mmap)? {
            free.push(d.index);
        }
        while let Some(ev) = dev.dqevent()? {
            if let Event::SourceChange(_) = ev {
                if cap_format.is_some() {
                    bail!("a second source change within one segment");
                }
                // Capture Setup: the stream's format, then buffers for it.
                let f = dev.g_fmt(cap_q).context("VIDIOC_G_FMT (CAPTURE)")?;
                let f = if f.fourcc == YU12 {
                    f
                } else {
                    dev.s_fmt(cap_q, &PixFormat { fourcc: YU12, ..f })
                        .context("VIDIOC_S_FMT (CAPTURE) YU12")?
                };
                let n = dev
                    .reqbufs(cap_q, Memory::Mmap, 4)
                    .context("VIDIOC_REQBUFS (CAPTURE)")?;
                for i in 0..n {
                    cap_maps.push(dev.map(cap_q, i)?);
                    dev.qbuf(cap_q, Memory::Mmap, i, &QueueArgs::default())?;
                }
                dev.streamon(cap_q).context("VIDIOC_STREAMON (CAPTURE)")?;
                cap_format = Some(f);
            }
        }
        let Some(f) = cap_format else { continue };
        loop {
            let d = match dev.dqbuf(cap_q, Memory::Mmap) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => return Ok(decoded),
                Err(e) => return Err(e).context("VIDIOC_DQBUF (CAPTURE)"),
            };
            if d.bytesused > 0 && !d.is_error() {
                let data = &cap_maps[d.index as usize].as_slice()[..d.bytesused as usize];
                let view = I420View::from_contiguous(
                    data,
                    width as usize,
                    height as usize,
                    f.bytesperline as usize,
                )
                .map_err(|e| anyhow!("decoded picture: {e}"))?;
                for r in 0..height as usize {
                    file.write_all(&view.y[r * view.y_stride..][..width as usize])?;
                }
                for plane in [view.u, view.v] {
                    for r in 0..(height as usize).div_ceil(2) {
                        file.write_all(
                            &plane[r * view.uv_stride..][..(width as usize).div_ceil(2)],
                        )?;
                    }
                }
                decoded += 1;
            }
            if d.is_last() {
                file.flush()?;
                return Ok(decoded);
            }
            dev.qbuf(cap_q, Memory::Mmap, d.index, &QueueArgs::default())?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fwht_headers_are_read_and_garbage_is_not() {
        let mut h = vec![0x4f, 0x4f, 0x4f, 0x4f, 0xff, 0xff, 0xff, 0xff];
        for v in [3u32, 640, 360, (1 << 10) | 7, 0, 0, 0, 0, 1234] {
            h.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(
            fwht_header(&h),
            Some(FwhtHeader {
                width: 640,
                height: 360,
                iframe: true
            })
        );
        h[22] = 0; // flags without the I-frame bit
        assert!(!fwht_header(&h).unwrap().iframe);
        assert_eq!(fwht_header(&h[..20]), None, "truncated");
        h[0] = 0;
        assert_eq!(fwht_header(&h), None, "bad magic");
        assert_eq!(fwht_header(&[]), None);
    }
}
