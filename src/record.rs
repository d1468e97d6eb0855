//! `rtcam record`: encodes N frames from the configured source to an Annex-B H.264 file through the service's own capture pipeline.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::settings::{pipeline_config, source_opener};
use crate::config::Config;
use crate::media::frame::EncodedFrame;
use crate::media::pipeline;
use crate::media::source::unix_ms;

/// What to record.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// Encoded frames to write.
    pub frames: u64,
    pub output: PathBuf,
    /// Controls set (and validated against the driver) before the first frame.
    pub controls: Vec<(String, i64)>,
    /// Give up when `frames` have not arrived within this long.
    pub timeout: Duration,
    /// A second subscriber that joins the running pipeline, as a new viewer does.
    pub join: Option<JoinOptions>,
}

/// A second subscriber that joins after `after_frames` frames were written and records to
/// `output` until the main recording ends (the VM tests check that it starts with an IDR
/// from the GOP cache).
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub after_frames: u64,
    pub output: PathBuf,
}

/// What the second subscriber got.
#[derive(Debug, Clone, Serialize, Default)]
pub struct JoinSummary {
    pub output: PathBuf,
    /// `seq` of the last frame the main recording had when the subscriber joined.
    pub joined_after_seq: u64,
    /// Frames written (its preroll included) and their bytes.
    pub frames: u64,
    pub bytes_written: u64,
    /// Its first frame: `seq`, and whether it is a keyframe.
    pub first_seq: Option<u64>,
    pub first_keyframe: bool,
    /// Frames that came at once as its start (the cached GOP).
    pub preroll_frames: u64,
}

/// Frames stopped arriving and came back (the camera failed and was reopened).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Interruption {
    /// Wall-clock milliseconds since the Unix epoch of the last frame before the gap.
    pub last_frame_unix_ms: u64,
    /// ... and of the first frame after it.
    pub resumed_unix_ms: u64,
    pub gap_ms: u64,
}

/// The one-line JSON report `rtcam record` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub output: PathBuf,
    /// Encoded frames written.
    pub frames: u64,
    pub complete: bool,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub pixel_format: String,
    /// Bytes per line of the (first) plane the camera delivers.
    pub stride: u32,
    /// Pixel bytes copied or converted per frame before encoding (0: zero copy).
    pub bytes_copied_per_frame: u64,
    pub bytes_written: u64,
    pub keyframes: u64,
    /// Controls as applied by the driver.
    pub controls: std::collections::BTreeMap<String, i64>,
    /// Camera failures seen (each was reported in the log, and capture was retried).
    pub source_errors: u64,
    /// Camera frames that could not be used (flagged, corrupt, truncated, or in passthrough
    /// referring to a frame the driver lost).
    pub frames_corrupt: u64,
    /// This process's CPU time (all threads: capture, encoding, writing the file) per frame
    /// once frames flow (from the first frame written to the last), milliseconds: opening the
    /// camera, and in passthrough waiting for the first IDR, are not in it.
    pub cpu_ms_per_frame: f64,
    /// The stream's H.264 profile and level (`profile-level-id`).
    pub profile_level_id: Option<String>,
    /// The second subscriber (`--join-at`), if one joined.
    pub join: Option<JoinSummary>,
    pub interruptions: Vec<Interruption>,
    /// The H.264 encoder that ran (backend, device, input, why, fallback).
    pub(crate) encoder: Option<crate::media::video_encoder::EncoderStatus>,
    pub first_frame_unix_ms: u64,
    pub last_frame_unix_ms: u64,
    pub duration_ms: u64,
}

/// A gap between frames longer than this (and than 4 frame periods) counts as an interruption.
const GAP_THRESHOLD: Duration = Duration::from_millis(500);

/// CPU time this process has used, all threads.
#[allow(unsafe_code)] // libc::clock_gettime: the C library's process CPU clock.
fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Writes a frame, its preroll (a new subscriber's start from the GOP cache) first; returns
/// (frames, bytes) written.
fn write_frame(out: &mut impl Write, frame: &EncodedFrame) -> std::io::Result<(u64, u64)> {
    let mut written = (0, 0);
    for f in frame.preroll.iter().flat_map(|p| p.iter()).chain([frame]) {
        out.write_all(&f.data)?;
        written.0 += 1;
        written.1 += f.data.len() as u64;
    }
    Ok(written)
}

/// The second subscriber's file and tally.
struct Joined {
    out: std::io::BufWriter<std::fs::File>,
    rx: mpsc::Receiver<EncodedFrame>,
    summary: JoinSummary,
}

impl Joined {
    fn take(&mut self, frame: &EncodedFrame) -> Result<()> {
        let s = &mut self.summary;
        if s.first_seq.is_none() {
            let first = frame
                .preroll
                .as_ref()
                .and_then(|p| p.first())
                .unwrap_or(frame);
            s.first_seq = Some(first.seq);
            s.first_keyframe = first.keyframe;
            s.preroll_frames = frame.preroll.as_ref().map_or(0, |p| p.len() as u64);
        }
        let (frames, bytes) = write_frame(&mut self.out, frame)
            .with_context(|| format!("writing {}", s.output.display()))?;
        s.frames += frames;
        s.bytes_written += bytes;
        Ok(())
    }
}

/// Parses `name=value` for `--control`.
pub fn parse_control(s: &str) -> Result<(String, i64), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=VALUE, e.g. brightness=200"))?;
    let value = value
        .trim()
        .parse::<i64>()
        .map_err(|e| format!("{s:?}: the value must be an integer: {e}"))?;
    if name.trim().is_empty() {
        return Err(format!("{s:?}: the control name is empty"));
    }
    Ok((name.trim().to_owned(), value))
}

/// Records until `options.frames` encoded frames are written, the timeout passes or `cancel`
/// fires. Camera failures on the way are logged and retried, as in the service. The returned
/// summary says whether the recording is complete.
pub async fn record(
    config: &Config,
    options: &RecordOptions,
    cancel: CancellationToken,
) -> Result<Summary> {
    let file = std::fs::File::create(&options.output)
        .with_context(|| format!("creating {}", options.output.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let pipeline_cancel = cancel.child_token();
    let (handle, thread) = pipeline::spawn(
        pipeline_config(config),
        source_opener(config),
        pipeline_cancel.clone(),
    )
    .context("starting the capture thread")?;
    let status = handle.status();

    let result = async {
        let mut controls = std::collections::BTreeMap::new();
        for (name, value) in &options.controls {
            // The same path (and range validation) as the `set-control` command.
            let applied = handle
                .set_control(name.clone(), *value)
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r.map_err(anyhow::Error::from))
                .with_context(|| format!("setting control {name} = {value}"))?;
            tracing::info!(control = %name, requested = value, applied, "control set");
            controls.insert(name.clone(), applied);
        }

        let (tx, mut rx) = mpsc::channel(64);
        handle.subscribe(1, tx, None).context("subscribing to the pipeline")?;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + options.timeout;
        let mut summary = Summary {
            output: options.output.clone(),
            frames: 0,
            complete: false,
            width: 0,
            height: 0,
            fps: 0,
            pixel_format: String::new(),
            stride: 0,
            bytes_copied_per_frame: 0,
            bytes_written: 0,
            keyframes: 0,
            controls,
            source_errors: 0,
            frames_corrupt: 0,
            cpu_ms_per_frame: 0.0,
            profile_level_id: None,
            join: None,
            interruptions: Vec::new(),
            encoder: None,
            first_frame_unix_ms: 0,
            last_frame_unix_ms: 0,
            duration_ms: 0,
        };
        let mut last_arrival: Option<Instant> = None;
        let mut joined: Option<Joined> = None;
        let mut last_seq = 0;
        // CPU time and frames written when the first frame was written.
        let mut cpu_from: Option<(Duration, u64)> = None;
        while summary.frames < options.frames {
            if joined.is_none()
                && let Some(j) = options.join.as_ref().filter(|j| summary.frames >= j.after_frames)
            {
                let file = std::fs::File::create(&j.output)
                    .with_context(|| format!("creating {}", j.output.display()))?;
                let (tx, rx) = mpsc::channel(64);
                handle
                    .subscribe(2, tx, None)
                    .context("subscribing the second viewer")?;
                tracing::info!(after_seq = last_seq, "a second subscriber joins");
                joined = Some(Joined {
                    out: std::io::BufWriter::new(file),
                    rx,
                    summary: JoinSummary {
                        output: j.output.clone(),
                        joined_after_seq: last_seq,
                        ..Default::default()
                    },
                });
            }
            let second = async {
                match joined.as_mut() {
                    Some(j) => j.rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let frame = tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => f,
                    None => bail!("the capture pipeline stopped"),
                },
                Some(f) = second => {
                    if let Some(j) = joined.as_mut() {
                        j.take(&f)?;
                    }
                    continue;
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::error!(frames = summary.frames, wanted = options.frames, timeout = ?options.timeout, "recording timed out");
                    break;
                }
                () = cancel.cancelled() => {
                    tracing::warn!(frames = summary.frames, "recording interrupted");
                    break;
                }
            };
            let now = Instant::now();
            let now_ms = unix_ms();
            if let Some(last) = last_arrival {
                let gap = now.duration_since(last);
                if gap > GAP_THRESHOLD.max(frame.duration * 4) {
                    let gap_ms = gap.as_millis() as u64;
                    tracing::warn!(gap_ms, "frames resumed after an interruption");
                    summary.interruptions.push(Interruption {
                        last_frame_unix_ms: summary.last_frame_unix_ms,
                        resumed_unix_ms: now_ms,
                        gap_ms,
                    });
                }
            }
            last_arrival = Some(now);
            if summary.frames == 0 {
                summary.first_frame_unix_ms = now_ms;
            }
            summary.last_frame_unix_ms = now_ms;
            let (frames, bytes) = write_frame(&mut out, &frame)
                .with_context(|| format!("writing {}", options.output.display()))?;
            summary.frames += frames;
            summary.keyframes += frame
                .preroll
                .iter()
                .flat_map(|p| p.iter())
                .chain([&frame])
                .filter(|f| f.keyframe)
                .count() as u64;
            summary.bytes_written += bytes;
            last_seq = frame.seq;
            match cpu_from {
                None => cpu_from = Some((process_cpu_time(), summary.frames)),
                Some((cpu, frames)) => {
                    let cpu = process_cpu_time().saturating_sub(cpu);
                    let n = (summary.frames - frames).max(1);
                    summary.cpu_ms_per_frame = cpu.as_secs_f64() * 1000.0 / n as f64;
                }
            }
        }
        summary.complete = summary.frames >= options.frames;
        summary.duration_ms = started.elapsed().as_millis() as u64;
        if let Some(mut j) = joined {
            // What reached the second subscriber's queue by now is its share.
            while let Ok(f) = j.rx.try_recv() {
                j.take(&f)?;
            }
            j.out
                .flush()
                .with_context(|| format!("writing {}", j.summary.output.display()))?;
            summary.join = Some(j.summary);
        }
        Ok(summary)
    }
    .await;

    pipeline_cancel.cancel();
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("joining the capture thread")?
        .map_err(|_| anyhow::anyhow!("the capture thread panicked"))?;
    out.flush()
        .with_context(|| format!("writing {}", options.output.display()))?;
    let mut summary = result?;
    if let Some(info) = status.borrow().source.clone() {
        summary.width = info.width;
        summary.height = info.height;
        summary.fps = info.fps;
        summary.pixel_format = info.pixel_format;
        summary.stride = info.stride;
    }
    summary.encoder = status.borrow().encoder.clone();
    summary.profile_level_id = status.borrow().h264.map(|h| h.profile_level_id());
    let counters = handle.counters();
    summary.bytes_copied_per_frame = counters.bytes_copied_per_frame;
    summary.source_errors = counters.source_errors;
    summary.frames_corrupt = counters.frames_corrupt;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sources;

    #[test]
    fn control_arguments() {
        assert_eq!(
            parse_control("brightness=200"),
            Ok(("brightness".into(), 200))
        );
        assert_eq!(parse_control("contrast = -3"), Ok(("contrast".into(), -3)));
        assert!(parse_control("brightness").is_err());
        assert!(parse_control("=3").is_err());
        assert!(parse_control("brightness=high").is_err());
    }

    #[tokio::test]
    async fn records_the_test_pattern_with_a_control() {
        let dir = std::env::temp_dir().join(format!("rtcam-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let env = [
            ("RTCAM__CAPTURE__SOURCE", "test-pattern"),
            ("RTCAM__CAPTURE__WIDTH", "320"),
            ("RTCAM__CAPTURE__HEIGHT", "240"),
        ];
        let config = Config::load(&Sources {
            system_file: None,
            explicit_file: None,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
        .unwrap();
        let options = RecordOptions {
            frames: 5,
            output: dir.join("clip.h264"),
            controls: vec![("brightness".into(), -10)],
            timeout: Duration::from_secs(20),
            join: Some(JoinOptions {
                after_frames: 1,
                output: dir.join("joined.h264"),
            }),
        };
        let summary = record(&config, &options, CancellationToken::new())
            .await
            .unwrap();
        assert!(summary.complete);
        assert_eq!(summary.frames, 5);
        assert_eq!((summary.width, summary.height), (320, 240));
        assert_eq!(summary.stride, 320);
        assert_eq!(summary.bytes_copied_per_frame, 0);
        let encoder = summary.encoder.as_ref().expect("the encoder that ran");
        assert_eq!(encoder.backend, "openh264");
        assert_eq!(summary.controls.get("brightness"), Some(&-10));
        assert!(summary.keyframes >= 1);
        assert_eq!(
            summary.profile_level_id.as_deref().map(|p| &p[..4]),
            Some("42c0")
        );
        assert!(summary.cpu_ms_per_frame > 0.0);
        assert_eq!(summary.frames_corrupt, 0);
        // The second subscriber joined a running encoder: it starts at a (forced) keyframe.
        let join = summary.join.as_ref().expect("the second subscriber");
        assert!(join.first_keyframe && join.first_seq > Some(join.joined_after_seq));
        assert_eq!(join.preroll_frames, 0, "no GOP cache without passthrough");
        let joined = std::fs::read(dir.join("joined.h264")).unwrap();
        assert_eq!(joined.len() as u64, join.bytes_written);
        let data = std::fs::read(&options.output).unwrap();
        assert_eq!(data.len() as u64, summary.bytes_written);
        assert!(data.starts_with(&[0, 0, 0, 1]), "Annex-B start code");

        let bad = RecordOptions {
            controls: vec![("brightness".into(), 1000)],
            ..options.clone()
        };
        let e = record(&config, &bad, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("between"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
