//! `rtcam probe`: the cameras, media-controller pipelines and encoders rtcam finds here, and what the configuration makes it choose, through the service's own selection code.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::{Config, SourceKind};
use crate::media::h264::backend::Backend;
use crate::media::m2m::probe::{self as codecs, CodecNode};
use crate::media::v4l2::{FormatChoice, choose_format, describe_size, takes};
use crate::media::vdev::{BufType, Device, consts};
use crate::media::video_encoder;

/// A capture node.
struct CameraNode {
    path: PathBuf,
    /// The node's name (sysfs), e.g. "RGB/YUV Capture".
    name: String,
    driver: String,
    card: String,
    /// Formats rtcam takes, with their sizes.
    usable: Vec<(String, String)>,
    /// The other formats offered.
    others: Vec<String>,
}

/// /dev/videoN paths in numeric order.
fn video_nodes(dev: &Path) -> Vec<PathBuf> {
    let mut nodes: Vec<(u32, PathBuf)> = std::fs::read_dir(dev)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let n = e
                        .file_name()
                        .to_str()?
                        .strip_prefix("video")?
                        .parse()
                        .ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes.into_iter().map(|(_, p)| p).collect()
}

fn camera(path: &Path) -> Option<CameraNode> {
    let device = Device::open(path).ok()?;
    let caps = device.querycap().ok()?;
    if !caps.has(consts::CAP_VIDEO_CAPTURE) || caps.has(consts::CAP_VIDEO_M2M) {
        return None;
    }
    let (mut usable, mut others) = (Vec::new(), Vec::new());
    for f in device
        .enum_formats(BufType::VideoCapture)
        .unwrap_or_default()
    {
        if !takes(f.fourcc) {
            others.push(f.fourcc.to_string());
            continue;
        }
        let sizes = device.enum_framesizes(f.fourcc).unwrap_or_default();
        let text = match sizes.as_slice() {
            [] => "sizes not listed".to_owned(),
            [one] => describe_size(one),
            [first, .., last] => format!(
                "{} sizes, {} .. {}",
                sizes.len(),
                describe_size(first),
                describe_size(last)
            ),
        };
        usable.push((f.fourcc.to_string(), text));
    }
    let name = path
        .file_name()
        .and_then(|n| {
            std::fs::read_to_string(Path::new("/sys/class/video4linux").join(n).join("name")).ok()
        })
        .map(|n| n.trim().to_owned())
        .unwrap_or_default();
    Some(CameraNode {
        path: path.to_owned(),
        name,
        driver: caps.driver,
        card: caps.card,
        usable,
        others,
    })
}

/// Media-controller devices (what libcamera builds cameras from) and their sub-devices, by
/// model, from sysfs.
fn media_devices(sys: &Path) -> Vec<(String, String, Vec<String>)> {
    let dir = sys.join("bus/media/devices");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    let mut media: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    media.sort();
    for m in media {
        let model = std::fs::read_to_string(m.join("model")).unwrap_or_default();
        // A media device and its sub-devices hang off the same parent device:
        // .../vimc.0/media1 and .../vimc.0/video4linux/v4l-subdev0.
        let parent = std::fs::canonicalize(&m)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let mut subdevs: Vec<String> = std::fs::read_dir(sys.join("class/video4linux"))
            .map(|e| {
                e.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("v4l-subdev"))
                    .filter(|e| {
                        let p = std::fs::canonicalize(e.path()).ok();
                        p.as_deref()
                            .and_then(Path::parent)
                            .and_then(Path::parent)
                            .map(Path::to_path_buf)
                            == parent
                    })
                    .filter_map(|e| std::fs::read_to_string(e.path().join("name")).ok())
                    .map(|n| n.trim().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        subdevs.sort();
        let name = m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((format!("/dev/{name}"), model.trim().to_owned(), subdevs));
    }
    out
}

fn encoder_line(n: &CodecNode) -> String {
    let list = |v: &[crate::media::vdev::FourCc]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "  {}  {} ({}, {}-planar): takes {} -> gives {}",
        n.path.display(),
        n.card,
        n.driver,
        if n.mplane { "multi" } else { "single" },
        list(&n.input_formats),
        list(&n.output_formats)
    )
}

/// The report `rtcam probe` prints.
pub fn report(config: &Config) -> String {
    let dev = Path::new("/dev");
    let mut out = String::new();
    let cameras: Vec<CameraNode> = video_nodes(dev).iter().filter_map(|p| camera(p)).collect();
    let _ = writeln!(
        out,
        "cameras (V4L2 capture nodes, with the formats rtcam takes):"
    );
    if cameras.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for c in &cameras {
        let _ = writeln!(
            out,
            "  {}  {:?}  {} (driver {})",
            c.path.display(),
            c.name,
            c.card,
            c.driver
        );
        for (fourcc, sizes) in &c.usable {
            let _ = writeln!(out, "      {fourcc}: {sizes}");
        }
        if c.usable.is_empty() {
            let _ = writeln!(out, "      no format rtcam takes");
        }
        if !c.others.is_empty() {
            let _ = writeln!(out, "      and {} other formats", c.others.len());
        }
    }
    let media = media_devices(Path::new("/sys"));
    let _ = writeln!(
        out,
        "media controllers (cameras libcamera builds from sensors; run rtcam under libcamerify to use them):"
    );
    if media.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (node, model, subdevs) in &media {
        let subdevs = if subdevs.is_empty() {
            "no sub-devices".to_owned()
        } else {
            format!("sub-devices: {}", subdevs.join(", "))
        };
        let _ = writeln!(out, "  {node}  {model}: {subdevs}");
    }
    let nodes = codecs::probe_all(dev);
    let _ = writeln!(out, "encoders:");
    for n in &nodes {
        let _ = writeln!(out, "{}", encoder_line(n));
    }
    let _ = writeln!(
        out,
        "  openh264 (software, built in): YU12 -> H264 Constrained Baseline"
    );
    let _ = writeln!(out, "with this configuration rtcam would use:");
    let mut passthrough = false;
    let camera_choice = match config.capture.source {
        SourceKind::TestPattern => {
            "the test pattern (capture.source = \"test-pattern\")".to_owned()
        }
        SourceKind::V4l2 => match Device::open(&config.capture.device) {
            Err(e) => format!("{}: cannot open it: {e}", config.capture.device.display()),
            Ok(device) => match choose_format(&device, &config.capture) {
                Ok(FormatChoice { fourcc, why }) => {
                    passthrough = fourcc.0 == *b"H264";
                    format!(
                        "{} in {fourcc} at {}x{} {} fps: {why}",
                        config.capture.device.display(),
                        config.capture.width,
                        config.capture.height,
                        config.capture.fps
                    )
                }
                Err(e) => format!("{}: {e}", config.capture.device.display()),
            },
        },
    };
    let _ = writeln!(out, "  camera: {camera_choice}");
    if passthrough {
        let _ = writeln!(
            out,
            "  encoder: none: the camera's own H.264 is passed through without re-encoding (bitrate, GOP and forced keyframes through its V4L2 controls where it has them)"
        );
        return out;
    }
    let c = &config.capture;
    let encoder = match video_encoder::decide(
        config.encoder.backend,
        &nodes,
        c.width,
        c.height,
        c.fps,
        config.encoder.bitrate,
    ) {
        Ok(d) => {
            let which = match &d.backend {
                Backend::Openh264 => "openh264".to_owned(),
                Backend::V4l2 {
                    path, level_menu, ..
                } => format!("V4L2 {path} (H.264 level menu index {level_menu})"),
            };
            let mut text = format!("{which}: {}", d.reason);
            // openh264's reason already names every node and why it does not fit.
            if d.backend != Backend::Openh264 {
                for (path, why) in &d.rejected {
                    let _ = write!(text, "\n      not {path}: {why}");
                }
            }
            text
        }
        Err(e) => format!("openh264, as a fallback: {e}"),
    };
    let _ = writeln!(out, "  encoder: {encoder}");
    out
}
