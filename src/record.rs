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
    pub interruptions: Vec<Interruption>,
    /// The H.264 encoder that ran (backend, device, input, why, fallback).
    pub(crate) encoder: Option<crate::media::video_encoder::EncoderStatus>,
    pub first_frame_unix_ms: u64,
    pub last_frame_unix_ms: u64,
    pub duration_ms: u64,
}

/// A gap between frames longer than this (and than 4 frame periods) counts as an interruption.
const GAP_THRESHOLD: Duration = Duration::from_millis(500);

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
            interruptions: Vec::new(),
            encoder: None,
            first_frame_unix_ms: 0,
            last_frame_unix_ms: 0,
            duration_ms: 0,
        };
        let mut last_arrival: Option<Instant> = None;
        while summary.frames < options.frames {
            let frame = tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => f,
                    None => bail!("the capture pipeline stopped"),
                },
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
            out.write_all(&frame.data)
                .with_context(|| format!("writing {}", options.output.display()))?;
            summary.frames += 1;
            summary.keyframes += u64::from(frame.keyframe);
            summary.bytes_written += frame.data.len() as u64;
        }
        summary.complete = summary.frames >= options.frames;
        summary.duration_ms = started.elapsed().as_millis() as u64;
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
    let counters = handle.counters();
    summary.bytes_copied_per_frame = counters.bytes_copied_per_frame;
    summary.source_errors = counters.source_errors;
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
