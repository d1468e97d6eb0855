//! `rtcam feed-h264` (hidden, for the VM tests): writes an H.264 clip into a V4L2 output device (v4l2loopback), one access unit per buffer, paced, in a loop, so rtcam can read it as a camera that encodes H.264 itself.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::media::h264::annexb::{self, PictureKind};
use crate::media::vdev::{BufType, Device, FourCc, PixFormat};

/// What to feed.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// The loopback device (its output side).
    pub device: PathBuf,
    /// A raw Annex-B H.264 file.
    pub clip: PathBuf,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// After every this many access units, one extra buffer of garbage (0: none): a camera
    /// that delivers a corrupt buffer now and then.
    pub garbage_every: u32,
    /// Stop after this long.
    pub duration: Duration,
}

/// What the feeder prints before it starts writing (one JSON line).
#[derive(Debug, Serialize)]
pub struct FeedPlan {
    pub device: PathBuf,
    /// Access units in the clip, as rtcam splits it, and which are IDRs.
    pub access_units: usize,
    pub idr: Vec<usize>,
    pub bytes: usize,
    pub fps: u32,
    /// The format the device took.
    pub width: u32,
    pub height: u32,
    pub sizeimage: u32,
}

/// The garbage buffer: a NAL unit header with forbidden_zero_bit set.
const GARBAGE: &[u8] = b"\x00\x00\x00\x01\x85rtcam feed-h264: not H.264";

/// Sets the device's output format, prints the plan to stdout, then writes the clip's access
/// units at `fps` until `duration` has passed.
pub fn run(o: &FeedOptions) -> Result<()> {
    let clip = std::fs::read(&o.clip).with_context(|| format!("reading {}", o.clip.display()))?;
    let units = annexb::access_units(&clip)
        .map_err(|e| anyhow::anyhow!("{}: not Annex-B H.264: {e}", o.clip.display()))?;
    let idr: Vec<usize> = units
        .iter()
        .enumerate()
        .filter(|(_, u)| {
            annexb::parse_access_unit(u).is_ok_and(|a| a.picture == Some(PictureKind::Idr))
        })
        .map(|(i, _)| i)
        .collect();
    if idr.first() != Some(&0) {
        bail!("{}: the clip must start with an IDR", o.clip.display());
    }
    let device =
        Device::open(&o.device).with_context(|| format!("opening {}", o.device.display()))?;
    let format = device
        .s_fmt(
            BufType::VideoOutput,
            &PixFormat {
                width: o.width,
                height: o.height,
                fourcc: FourCc::new(b"H264"),
                bytesperline: 0,
                sizeimage: 0,
            },
        )
        .with_context(|| format!("VIDIOC_S_FMT (output, H264) on {}", o.device.display()))?;
    if format.fourcc != FourCc::new(b"H264") {
        bail!(
            "{} took {} instead of H264",
            o.device.display(),
            format.fourcc
        );
    }
    if let Some(big) = units.iter().find(|u| u.len() > format.sizeimage as usize) {
        bail!(
            "an access unit of {} bytes does not fit the device's {}-byte buffers",
            big.len(),
            format.sizeimage
        );
    }
    device
        .s_parm_fps(BufType::VideoOutput, o.fps)
        .with_context(|| format!("VIDIOC_S_PARM (output) on {}", o.device.display()))?;
    let plan = FeedPlan {
        device: o.device.clone(),
        access_units: units.len(),
        idr,
        bytes: clip.len(),
        fps: o.fps,
        width: format.width,
        height: format.height,
        sizeimage: format.sizeimage,
    };
    println!("{}", serde_json::to_string(&plan)?);
    std::io::stdout().flush()?;
    // write(): each call is one buffer, with `bytesused` = its length.
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .open(&o.device)
        .with_context(|| format!("opening {} for writing", o.device.display()))?;
    let period = Duration::from_secs(1) / o.fps.max(1);
    let end = Instant::now() + o.duration;
    let (mut written, mut garbage) = (0u64, 0u64);
    let mut due = Instant::now();
    // Each buffer (an access unit, or garbage in a slot of its own) waits for its turn.
    let mut paced_write = |data: &[u8]| -> Result<bool> {
        if due > end {
            return Ok(false);
        }
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        // Late (a loaded machine): no burst to catch up. v4l2loopback hands a reader more
        // than two buffers behind only the newest, so a burst would lose frames.
        due = due.max(Instant::now()) + period;
        write_buffer(&mut out, data)?;
        Ok(true)
    };
    for (n, unit) in units.iter().cycle().enumerate() {
        if !paced_write(unit).context("writing an access unit")? {
            break;
        }
        written += 1;
        if o.garbage_every > 0 && (n + 1) % o.garbage_every as usize == 0 {
            if !paced_write(GARBAGE).context("writing garbage")? {
                break;
            }
            garbage += 1;
        }
    }
    eprintln!("rtcam feed-h264: wrote {written} access units and {garbage} garbage buffers");
    Ok(())
}

/// One write() is one buffer: it must take the whole unit.
fn write_buffer(out: &mut std::fs::File, data: &[u8]) -> Result<()> {
    let n = out.write(data)?;
    if n != data.len() {
        bail!("the device took {n} of {} bytes", data.len());
    }
    Ok(())
}
