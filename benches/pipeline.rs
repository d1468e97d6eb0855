//! Prints pipeline vs bare-openh264 CPU cost per frame, fps, bytes copied and the conversion's own cost, for I420, YUYV and MJPEG input, and for a camera's own H.264 passed through.
//!
//! Run: `cargo bench --bench pipeline` (add `-- --frames 300` for longer runs).
//! H264 rows: the camera's access units (openh264's encoding of the same frames) through
//! rtcam's passthrough stage and RTP packetization, no encoder; "copied B/f" is the access unit
//! copied out of the camera's buffer, "convert ms/f" the passthrough stage alone.
#![allow(unsafe_code)] // libc::clock_gettime for CPU time.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::rtp::packetizer::{Packetizer, new_packetizer};
use rtc::rtp::sequence::new_random_sequencer;
use rtcam::media::convert::Converter;
use rtcam::media::encoder::{EncoderSettings, H264Encoder};
use rtcam::media::frame::{I420Buffer, I420View};
use rtcam::media::mjpeg::MjpegDecoder;
use rtcam::media::passthrough::PassthroughStage;
use rtcam::media::pattern::PatternGenerator;

/// CPU time this process has used (all threads).
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Packs an I420 picture into YUYV, as a camera would deliver it.
fn to_yuyv(src: &I420Buffer) -> Vec<u8> {
    let (w, h, cw) = (src.width, src.height, src.chroma_width());
    let v = src.view();
    let mut out = vec![0u8; w * h * 2];
    for row in 0..h {
        for x in (0..w).step_by(2) {
            let o = row * w * 2 + x * 2;
            let c = (row / 2) * cw + x / 2;
            out[o..o + 4].copy_from_slice(&[
                v.y[row * w + x],
                v.u[c],
                v.y[row * w + x + 1],
                v.v[c],
            ]);
        }
    }
    out
}

/// Compresses an I420 picture as a USB camera's MJPEG (4:2:2, quality 85).
fn to_mjpeg(src: &I420Buffer) -> Vec<u8> {
    let (w, h, cw) = (src.width, src.height, src.chroma_width());
    let v = src.view();
    let mut ycc = Vec::with_capacity(w * h * 3);
    for row in 0..h {
        for x in 0..w {
            let c = (row / 2) * cw + x / 2;
            ycc.extend_from_slice(&[v.y[row * w + x], v.u[c], v.v[c]]);
        }
    }
    let mut out = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut out, 85);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_1);
    enc.encode(&ycc, w as u16, h as u16, jpeg_encoder::ColorType::Ycbcr)
        .expect("jpeg");
    out
}

/// What the camera hands over.
#[derive(Clone, Copy, PartialEq)]
enum Input {
    I420,
    Yuyv,
    Mjpg,
    /// The camera's own H.264 (one access unit per buffer), passed through: no encoder.
    H264,
}

struct Result {
    cpu_per_frame_ms: f64,
    fps: f64,
    bytes_copied: usize,
    encoded_bytes: usize,
}

/// The frames as a camera that encodes H.264 itself would deliver them: one access unit per
/// buffer (openh264's, at the same settings; SPS/PPS with each IDR; the frames its rate
/// control skips make no buffer).
fn camera_h264(frames: &[I420Buffer]) -> Vec<Vec<u8>> {
    let mut enc = H264Encoder::new(settings(frames[0].width)).expect("encoder");
    frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut out = Vec::new();
            enc.encode(&f.view(), i as u64 * 33, &mut out)
                .expect("encode");
            out
        })
        .filter(|out| !out.is_empty())
        .collect()
}

fn settings(w: usize) -> EncoderSettings {
    EncoderSettings {
        bitrate: if w <= 640 {
            1_000_000
        } else if w <= 1280 {
            2_500_000
        } else {
            4_000_000
        },
        fps: 30,
        keyframe_interval: 60,
        temporal_layers: 3,
    }
}

/// Bare openh264 on pre-made I420 frames.
fn bare(frames: &[I420Buffer]) -> Result {
    let mut enc = H264Encoder::new(settings(frames[0].width)).expect("encoder");
    let mut out = Vec::new();
    let (mut encoded, start_cpu, start) = (0, cpu_time(), Instant::now());
    for (i, f) in frames.iter().enumerate() {
        enc.encode(&f.view(), i as u64 * 33, &mut out)
            .expect("encode");
        encoded += out.len();
    }
    finish(frames.len(), start_cpu, start, 0, encoded)
}

/// What rtcam does per frame: view or convert the camera buffer, encode, hand off as
/// `Bytes`, packetize into RTP.
fn pipeline(buffers: &[Vec<u8>], w: usize, h: usize, input: Input) -> Result {
    let mut enc = H264Encoder::new(settings(w)).expect("encoder");
    let mut converter = Converter::default();
    let mut mjpeg = MjpegDecoder::default();
    let codec = rtcam::viewer::h264_codec();
    let mut packetizer = new_packetizer(
        Instant::now(),
        1200,
        102,
        0x1234,
        codec.payloader().expect("payloader"),
        Box::new(new_random_sequencer()),
        90_000,
    );
    let mut out = Vec::new();
    let mut passthrough = PassthroughStage::new(4 << 20, Duration::from_millis(33));
    let (mut copied, mut encoded, mut packets) = (0, 0, 0);
    let (start_cpu, start) = (cpu_time(), Instant::now());
    for (i, buf) in buffers.iter().enumerate() {
        if input == Input::H264 {
            let Some(data) = passthrough.push(buf, i as u64) else {
                panic!(
                    "access unit {i} of {} ({} bytes) not passed on",
                    buffers.len(),
                    buf.len()
                );
            };
            copied += data.len();
            encoded += data.len();
            packets += packetizer
                .packetize(Instant::now(), &data, 3000)
                .expect("packetize")
                .len();
            continue;
        }
        let (view, bytes_copied): (I420View<'_>, usize) = match input {
            Input::Yuyv => converter.yuyv(buf, w, h, w * 2).expect("yuyv"),
            Input::Mjpg => mjpeg.decode(buf, w, h).expect("mjpeg"),
            Input::I420 => (I420View::from_contiguous(buf, w, h, w).expect("i420"), 0),
            Input::H264 => unreachable!("passed through above"),
        };
        copied += bytes_copied;
        enc.encode(&view, i as u64 * 33, &mut out).expect("encode");
        encoded += out.len();
        let data = Bytes::from(std::mem::take(&mut out));
        packets += packetizer
            .packetize(Instant::now(), &data, 3000)
            .expect("packetize")
            .len();
    }
    assert!(packets >= buffers.len(), "every frame packetized");
    finish(
        buffers.len(),
        start_cpu,
        start,
        copied / buffers.len(),
        encoded,
    )
}

/// The conversion or decode step alone (no encoder), CPU ms per frame: where the pipeline's
/// extra time over bare openh264 goes.
fn conversion_only(buffers: &[Vec<u8>], w: usize, h: usize, input: Input) -> f64 {
    let mut converter = Converter::default();
    let mut mjpeg = MjpegDecoder::default();
    let mut checksum = 0u64;
    let mut passthrough = PassthroughStage::new(4 << 20, Duration::from_millis(33));
    let start_cpu = cpu_time();
    for (i, buf) in buffers.iter().enumerate() {
        if input == Input::H264 {
            checksum += passthrough.push(buf, i as u64).map_or(0, |d| d.len()) as u64;
            continue;
        }
        let (view, _) = match input {
            Input::Yuyv => converter.yuyv(buf, w, h, w * 2).expect("yuyv"),
            Input::Mjpg => mjpeg.decode(buf, w, h).expect("mjpeg"),
            Input::I420 => (I420View::from_contiguous(buf, w, h, w).expect("i420"), 0),
            Input::H264 => unreachable!("passed through above"),
        };
        // Read one byte per plane so the work cannot be optimised away.
        checksum += u64::from(view.y[w / 2]) + u64::from(view.u[0]) + u64::from(view.v[0]);
    }
    let cpu = cpu_time() - start_cpu;
    std::hint::black_box(checksum);
    cpu.as_secs_f64() * 1000.0 / buffers.len() as f64
}

fn finish(
    n: usize,
    start_cpu: Duration,
    start: Instant,
    bytes_copied: usize,
    encoded: usize,
) -> Result {
    let cpu = cpu_time() - start_cpu;
    Result {
        cpu_per_frame_ms: cpu.as_secs_f64() * 1000.0 / n as f64,
        fps: n as f64 / start.elapsed().as_secs_f64(),
        bytes_copied,
        encoded_bytes: encoded / n,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let frames_n = args
        .iter()
        .position(|a| a == "--frames")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(120usize);
    println!(
        "{:<10} {:<5} {:>9} {:>15} {:>15} {:>7} {:>13} {:>12} {:>12}",
        "size",
        "input",
        "fps",
        "pipeline ms/f",
        "openh264 ms/f",
        "ratio",
        "copied B/f",
        "encoded B/f",
        "convert ms/f"
    );
    for (w, h) in [(640, 480), (1280, 720), (1920, 1080)] {
        let pattern = PatternGenerator::new(w, h);
        // Camera-like content: the test pattern with a panning texture over its lower third,
        // so the encoder has real motion to code (a static pattern costs it almost nothing).
        let texture: Vec<u8> = (0..(w + 4096) * h)
            .map(|i| {
                let (x, y) = (i % (w + 4096), i / (w + 4096));
                ((x * 7 + y * 13 + (x * y) % 31) % 200 + 28) as u8
            })
            .collect();
        let frames: Vec<I420Buffer> = (0..frames_n as u32)
            .map(|seq| {
                let mut b = I420Buffer::default();
                pattern.render(seq, seq * 33, &mut b);
                let shift = (seq as usize * 5) % 4096;
                for row in h * 2 / 3..h {
                    let src = &texture[row * (w + 4096) + shift..row * (w + 4096) + shift + w];
                    b.data[row * w..(row + 1) * w].copy_from_slice(src);
                }
                b
            })
            .collect();
        for input in [Input::I420, Input::Yuyv, Input::Mjpg, Input::H264] {
            let buffers: Vec<Vec<u8>> = match input {
                Input::Yuyv => frames.iter().map(to_yuyv).collect(),
                Input::Mjpg => frames.iter().map(to_mjpeg).collect(),
                Input::I420 => frames.iter().map(|f| f.data.clone()).collect(),
                Input::H264 => camera_h264(&frames),
            };
            // Alternate to spread any frequency drift over both measurements.
            let b1 = bare(&frames);
            let p1 = pipeline(&buffers, w, h, input);
            let b2 = bare(&frames);
            let p2 = pipeline(&buffers, w, h, input);
            let convert_ms = conversion_only(&buffers, w, h, input);
            let bare_ms = (b1.cpu_per_frame_ms + b2.cpu_per_frame_ms) / 2.0;
            let pipe_ms = (p1.cpu_per_frame_ms + p2.cpu_per_frame_ms) / 2.0;
            println!(
                "{:<10} {:<5} {:>9.1} {:>15.3} {:>15.3} {:>7.3} {:>13} {:>12} {:>12.3}",
                format!("{w}x{h}"),
                match input {
                    Input::I420 => "I420",
                    Input::Yuyv => "YUYV",
                    Input::Mjpg => "MJPG",
                    Input::H264 => "H264",
                },
                (p1.fps + p2.fps) / 2.0,
                pipe_ms,
                bare_ms,
                pipe_ms / bare_ms,
                p1.bytes_copied,
                p1.encoded_bytes,
                convert_ms,
            );
            let _ = b1.encoded_bytes;
        }
    }
}
