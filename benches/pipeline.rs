//! Prints pipeline vs bare-openh264 CPU cost per frame, fps, bytes copied and the conversion's own cost, for I420, YUYV and MJPEG input, and for a camera's own H.264 passed through.
//!
//! Run: `cargo bench --bench pipeline` (add `-- --frames 300` for longer runs, `-- --rounds 9`
//! for more alternating bare/pipeline rounds; the machine's load moves single rounds by
//! several percent, so read the ratio's minimum and median, and quote `uptime`).
//! "input B/f" is what the camera hands over per frame (the JPEG's size for MJPEG). The stage
//! table at the end splits MJPEG's decode into libjpeg-turbo's own work and rtcam's pass to
//! video-range I420, and times the YUYV conversion from cold buffers (each frame its own, as
//! the pipeline rows do) and from one buffer that stays in cache.
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

/// Median of a non-empty list.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Where the MJPEG and YUYV stages spend their time, CPU ms per frame: libjpeg-turbo's own
/// decode to YCbCr planes (the calls `MjpegDecoder` makes) against the whole decode to I420,
/// and the YUYV conversion from cold buffers (each frame its own, as from a camera) against
/// one buffer that stays in cache.
fn stages(
    frames: &[I420Buffer],
    jpegs: &[Vec<u8>],
    yuyv: &[Vec<u8>],
    w: usize,
    h: usize,
) -> String {
    let per_frame =
        |start: Duration| (cpu_time() - start).as_secs_f64() * 1000.0 / jpegs.len() as f64;
    let mut decompressor = turbojpeg::Decompressor::new().expect("turbojpeg");
    let header = decompressor.read_header(&jpegs[0]).expect("header");
    let mut planes =
        vec![0u8; turbojpeg::yuv_pixels_len(w, 1, h, header.subsamp).expect("plane size")];
    let start = cpu_time();
    for jpeg in jpegs {
        let header = decompressor.read_header(jpeg).expect("header");
        let image = turbojpeg::YuvImage {
            pixels: &mut planes[..],
            width: w,
            align: 1,
            height: h,
            subsamp: header.subsamp,
        };
        decompressor.decompress_to_yuv(jpeg, image).expect("decode");
    }
    let libjpeg = per_frame(start);
    let mut mjpeg = MjpegDecoder::default();
    let start = cpu_time();
    for jpeg in jpegs {
        std::hint::black_box(mjpeg.decode(jpeg, w, h).expect("mjpeg").0.y[w / 2]);
    }
    let to_i420 = per_frame(start);
    let mut converter = Converter::default();
    let start = cpu_time();
    for buf in yuyv {
        std::hint::black_box(converter.yuyv(buf, w, h, w * 2).expect("yuyv").0.y[w / 2]);
    }
    let yuyv_cold = per_frame(start);
    let start = cpu_time();
    for _ in yuyv {
        std::hint::black_box(converter.yuyv(&yuyv[0], w, h, w * 2).expect("yuyv").0.y[w / 2]);
    }
    let yuyv_hot = per_frame(start);
    let encode = bare(frames).cpu_per_frame_ms;
    format!(
        "{:<10} {:>12.3} {:>12.3} {:>12.3} {:>12.3} {:>12.3} {:>12}",
        format!("{w}x{h}"),
        libjpeg,
        to_i420 - libjpeg,
        yuyv_cold,
        yuyv_hot,
        encode,
        jpegs.iter().map(Vec::len).sum::<usize>() / jpegs.len(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let frames_n = arg("--frames", 120);
    // Bare and pipeline runs alternate round by round, so load from other processes and
    // frequency drift reach both; the ratio is taken per round.
    let rounds = arg("--rounds", 5).max(1);
    println!(
        "{rounds} rounds of {frames_n} frames; ratio = pipeline / bare openh264 CPU time per frame, per round"
    );
    println!(
        "{:<10} {:<5} {:>9} {:>15} {:>15} {:>9} {:>9} {:>13} {:>11} {:>12} {:>12}",
        "size",
        "input",
        "fps",
        "pipeline ms/f",
        "openh264 ms/f",
        "ratio min",
        "ratio med",
        "copied B/f",
        "input B/f",
        "encoded B/f",
        "convert ms/f"
    );
    let mut stage_lines = Vec::new();
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
        let (mut jpegs, mut yuyv) = (Vec::new(), Vec::new());
        for input in [Input::I420, Input::Yuyv, Input::Mjpg, Input::H264] {
            let buffers: Vec<Vec<u8>> = match input {
                Input::Yuyv => frames.iter().map(to_yuyv).collect(),
                Input::Mjpg => frames.iter().map(to_mjpeg).collect(),
                Input::I420 => frames.iter().map(|f| f.data.clone()).collect(),
                Input::H264 => camera_h264(&frames),
            };
            let (mut bare_ms, mut pipe_ms, mut ratios, mut fps) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut last = None;
            for _ in 0..rounds {
                let b = bare(&frames);
                let p = pipeline(&buffers, w, h, input);
                ratios.push(p.cpu_per_frame_ms / b.cpu_per_frame_ms);
                bare_ms.push(b.cpu_per_frame_ms);
                pipe_ms.push(p.cpu_per_frame_ms);
                fps.push(p.fps);
                last = Some(p);
            }
            let p = last.expect("at least one round");
            let convert_ms = conversion_only(&buffers, w, h, input);
            println!(
                "{:<10} {:<5} {:>9.1} {:>15.3} {:>15.3} {:>9.3} {:>9.3} {:>13} {:>11} {:>12} {:>12.3}",
                format!("{w}x{h}"),
                match input {
                    Input::I420 => "I420",
                    Input::Yuyv => "YUYV",
                    Input::Mjpg => "MJPG",
                    Input::H264 => "H264",
                },
                median(fps),
                median(pipe_ms),
                median(bare_ms),
                ratios.iter().copied().fold(f64::INFINITY, f64::min),
                median(ratios),
                p.bytes_copied,
                buffers.iter().map(Vec::len).sum::<usize>() / buffers.len(),
                p.encoded_bytes,
                convert_ms,
            );
            match input {
                Input::Mjpg => jpegs = buffers,
                Input::Yuyv => yuyv = buffers,
                _ => {}
            }
        }
        stage_lines.push(stages(&frames, &jpegs, &yuyv, w, h));
    }
    println!();
    println!("Stages, CPU ms per frame (MJPEG: 4:2:2, quality 85, as to_mjpeg makes it)");
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "size", "libjpeg ms/f", "to I420 ms/f", "YUYV cold", "YUYV hot", "encode ms/f", "JPEG B/f"
    );
    for line in stage_lines {
        println!("{line}");
    }
}
