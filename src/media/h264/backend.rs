//! Which H.264 encoder to use: `encoder.backend = "auto" | "openh264" | "v4l2"` against the V4L2 memory-to-memory nodes that were probed, with the reason `rtcam probe` prints.

use serde::Deserialize;

use super::level::{StreamDemand, known_limits, select_for};

/// The configured choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendSetting {
    /// A suitable V4L2 H.264 encoder when there is one, else openh264.
    #[default]
    Auto,
    /// Always software (openh264).
    Openh264,
    /// A V4L2 H.264 encoder; none suitable is a configuration error.
    V4l2,
}

/// What probing one V4L2 memory-to-memory node found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct M2mNode {
    /// `/dev/videoN`.
    pub path: String,
    /// `VIDIOC_QUERYCAP` driver name (e.g. "bcm2835-codec", "vicodec").
    pub driver: String,
    /// Whether the node reports `V4L2_CAP_VIDEO_M2M` or `V4L2_CAP_VIDEO_M2M_MPLANE` with
    /// streaming I/O.
    pub m2m: bool,
    /// Fourccs on the CAPTURE queue (what it produces, e.g. "H264").
    pub coded_formats: Vec<String>,
    /// Fourccs on the OUTPUT queue (what it takes, e.g. "YU12", "NV12").
    pub raw_formats: Vec<String>,
    /// Largest frame size it lists (`VIDIOC_ENUM_FRAMESIZES`), when it lists one.
    pub max_size: Option<(u32, u32)>,
}

/// What the capture side will hand the encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeRequest {
    pub demand: StreamDemand,
    /// The camera's fourcc ("YUYV", "MJPG", "YU12", "NV12"...): the encoder node is fed
    /// this directly when it takes it, else I420 ("YU12") or NV12 after rtcam's conversion.
    pub camera_format: String,
}

/// The encoder to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Openh264,
    V4l2 {
        path: String,
        /// The OUTPUT-queue fourcc to feed it.
        input_format: String,
        /// `V4L2_CID_MPEG_VIDEO_H264_LEVEL` menu index to set.
        level_menu: u32,
    },
}

/// The choice with its reasons, as `rtcam probe` prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub backend: Backend,
    /// One line: why this backend.
    pub reason: String,
    /// Each node not taken, with why.
    pub rejected: Vec<(String, String)>,
}

/// `encoder.backend = "v4l2"` with no node that fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("encoder.backend = \"v4l2\" but no V4L2 H.264 encoder fits: {}", describe(.rejected))]
pub struct NoV4l2Encoder {
    pub rejected: Vec<(String, String)>,
}

fn describe(rejected: &[(String, String)]) -> String {
    if rejected.is_empty() {
        return "no memory-to-memory video device found".into();
    }
    rejected
        .iter()
        .map(|(path, why)| format!("{path}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Raw formats rtcam can produce for an encoder from any camera format (after its own
/// conversion), best first.
const CONVERTED_INPUTS: [&str; 2] = ["YU12", "NV12"];

/// Checks one node; Ok(input format, level menu index) or the reason it does not fit.
fn suitability(node: &M2mNode, req: &EncodeRequest) -> Result<(String, u32), String> {
    if !node.m2m {
        return Err("not a memory-to-memory device".into());
    }
    if !node.coded_formats.iter().any(|f| f == "H264") {
        return Err(if node.coded_formats.is_empty() {
            "produces nothing on its capture queue".into()
        } else {
            format!(
                "not an H.264 encoder (produces {})",
                node.coded_formats.join(", ")
            )
        });
    }
    let direct = node.raw_formats.contains(&req.camera_format);
    let input = if direct {
        req.camera_format.clone()
    } else {
        CONVERTED_INPUTS
            .iter()
            .find(|c| node.raw_formats.iter().any(|f| f == *c))
            .map(|c| (*c).to_string())
            .ok_or_else(|| {
                format!(
                    "takes none of {}, YU12, NV12 (takes {})",
                    req.camera_format,
                    node.raw_formats.join(", ")
                )
            })?
    };
    let d = &req.demand;
    if let Some((w, h)) = node.max_size
        && (d.width > w || d.height > h)
    {
        return Err(format!("{}x{} is above its {w}x{h}", d.width, d.height));
    }
    let level = match known_limits(&node.driver) {
        Some(limits) => select_for(limits, *d),
        None => super::level::select(*d),
    }
    .map_err(|e| e.to_string())?;
    Ok((input, level.v4l2_menu))
}

/// Chooses the encoder. Pure: takes what probing found. Among fitting nodes the first
/// (in the order given, i.e. by path) that takes the camera's format directly wins, else
/// the first that fits.
pub fn choose(
    setting: BackendSetting,
    nodes: &[M2mNode],
    req: &EncodeRequest,
) -> Result<Decision, NoV4l2Encoder> {
    if setting == BackendSetting::Openh264 {
        return Ok(Decision {
            backend: Backend::Openh264,
            reason: "encoder.backend = \"openh264\"".into(),
            rejected: Vec::new(),
        });
    }
    let mut fitting = Vec::new();
    let mut rejected = Vec::new();
    for node in nodes {
        match suitability(node, req) {
            Ok((input, level_menu)) => fitting.push((node, input, level_menu)),
            Err(why) => rejected.push((node.path.clone(), why)),
        }
    }
    let best = fitting
        .iter()
        .position(|(_, input, _)| *input == req.camera_format)
        .or(if fitting.is_empty() { None } else { Some(0) });
    match best {
        Some(i) => {
            let (node, input, level_menu) = fitting.swap_remove(i);
            let feed = if *input == req.camera_format {
                format!("fed {input} from the camera directly")
            } else {
                format!("fed {input} after conversion from {}", req.camera_format)
            };
            // Fitting nodes not taken are listed too, so probe output explains the pick.
            rejected.extend(
                fitting
                    .iter()
                    .map(|(n, _, _)| (n.path.clone(), "fits; an earlier node was taken".into())),
            );
            Ok(Decision {
                backend: Backend::V4l2 {
                    path: node.path.clone(),
                    input_format: input,
                    level_menu,
                },
                reason: format!(
                    "{} ({}): V4L2 H.264 encoder, {feed}",
                    node.path, node.driver
                ),
                rejected,
            })
        }
        None if setting == BackendSetting::V4l2 => Err(NoV4l2Encoder { rejected }),
        None => Ok(Decision {
            backend: Backend::Openh264,
            reason: format!(
                "auto: openh264, since no V4L2 H.264 encoder fits ({})",
                describe(&rejected)
            ),
            rejected,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(path: &str, driver: &str, coded: &[&str], raw: &[&str]) -> M2mNode {
        M2mNode {
            path: path.into(),
            driver: driver.into(),
            m2m: true,
            coded_formats: coded.iter().map(|s| s.to_string()).collect(),
            raw_formats: raw.iter().map(|s| s.to_string()).collect(),
            max_size: Some((1920, 1920)),
        }
    }

    /// What a Raspberry Pi 4 shows: bcm2835-codec's decoder, encoder and ISP nodes.
    fn pi4() -> Vec<M2mNode> {
        vec![
            node(
                "/dev/video10",
                "bcm2835-codec",
                &["YU12", "NV12"],
                &["H264", "MJPG"],
            ),
            node(
                "/dev/video11",
                "bcm2835-codec",
                &["H264"],
                &["YU12", "NV12", "YUYV", "RGB3"],
            ),
            node(
                "/dev/video12",
                "bcm2835-codec",
                &["YU12", "RGB3"],
                &["YU12", "YUYV"],
            ),
        ]
    }

    fn request(w: u32, h: u32, fps: u32, bps: u32, camera: &str) -> EncodeRequest {
        EncodeRequest {
            demand: StreamDemand {
                width: w,
                height: h,
                fps,
                bitrate_bps: bps,
            },
            camera_format: camera.into(),
        }
    }

    #[test]
    fn auto_takes_the_pi_encoder_and_says_why() {
        let d = choose(
            BackendSetting::Auto,
            &pi4(),
            &request(1280, 720, 30, 2_500_000, "YUYV"),
        )
        .unwrap();
        assert_eq!(
            d.backend,
            Backend::V4l2 {
                path: "/dev/video11".into(),
                input_format: "YUYV".into(),
                level_menu: 9, // 3.1
            }
        );
        assert!(
            d.reason.contains("/dev/video11 (bcm2835-codec)"),
            "{}",
            d.reason
        );
        assert!(d.reason.contains("fed YUYV from the camera directly"));
        assert_eq!(d.rejected.len(), 2);
        assert!(
            d.rejected[0]
                .1
                .contains("not an H.264 encoder (produces YU12, NV12)")
        );
        // MJPEG cameras: the picture is decoded to I420 first.
        let d = choose(
            BackendSetting::Auto,
            &pi4(),
            &request(1920, 1080, 30, 8_000_000, "MJPG"),
        )
        .unwrap();
        assert!(
            matches!(&d.backend, Backend::V4l2 { input_format, level_menu: 11, .. } if input_format == "YU12")
        );
        assert!(d.reason.contains("after conversion from MJPG"));
    }

    #[test]
    fn auto_falls_back_to_openh264_with_each_reason() {
        // Pi 5: no encoder at all.
        let d = choose(
            BackendSetting::Auto,
            &[],
            &request(1280, 720, 30, 2_500_000, "YUYV"),
        )
        .unwrap();
        assert_eq!(d.backend, Backend::Openh264);
        assert!(
            d.reason.contains("no memory-to-memory video device found"),
            "{}",
            d.reason
        );
        // The Pi encoder asked for more than it can do.
        for (req, why) in [
            (
                request(2560, 1440, 30, 8_000_000, "YUYV"),
                "2560x1440 is above its 1920x1920",
            ),
            (
                request(1920, 1080, 30, 25_000_000, "YUYV"),
                "25000000 bit/s is above",
            ),
        ] {
            let d = choose(BackendSetting::Auto, &pi4(), &req).unwrap();
            assert_eq!(d.backend, Backend::Openh264);
            assert!(d.reason.contains(why), "{why}: {}", d.reason);
        }
        // vicodec encodes FWHT, not H.264.
        let vicodec = node("/dev/video2", "vicodec", &["FWHT"], &["YU12"]);
        let d = choose(
            BackendSetting::Auto,
            &[vicodec],
            &request(640, 480, 30, 1_000_000, "YUYV"),
        )
        .unwrap();
        assert!(d.reason.contains("produces FWHT"), "{}", d.reason);
        // Not a memory-to-memory device, or no raw format rtcam can feed.
        let mut capture_only = node("/dev/video0", "uvcvideo", &["H264"], &["YU12"]);
        capture_only.m2m = false;
        let odd = node("/dev/video3", "x", &["H264"], &["RGB3"]);
        let d = choose(
            BackendSetting::Auto,
            &[capture_only, odd],
            &request(640, 480, 30, 1_000_000, "YUYV"),
        )
        .unwrap();
        assert_eq!(d.backend, Backend::Openh264);
        assert!(
            d.reason
                .contains("/dev/video0: not a memory-to-memory device")
        );
        assert!(
            d.reason
                .contains("takes none of YUYV, YU12, NV12 (takes RGB3)")
        );
    }

    #[test]
    fn explicit_settings() {
        let req = request(1280, 720, 30, 2_500_000, "YUYV");
        let d = choose(BackendSetting::Openh264, &pi4(), &req).unwrap();
        assert_eq!(d.backend, Backend::Openh264);
        assert!(d.rejected.is_empty());
        assert!(matches!(
            choose(BackendSetting::V4l2, &pi4(), &req).unwrap().backend,
            Backend::V4l2 { .. }
        ));
        let e = choose(BackendSetting::V4l2, &[], &req).unwrap_err();
        assert!(
            e.to_string()
                .contains("no memory-to-memory video device found"),
            "{e}"
        );
        let e = choose(BackendSetting::V4l2, &pi4()[..1], &req).unwrap_err();
        assert!(
            e.to_string().contains("/dev/video10: not an H.264 encoder"),
            "{e}"
        );
    }

    #[test]
    fn prefers_a_node_that_takes_the_camera_format() {
        let a = node("/dev/video20", "enc-a", &["H264"], &["NV12"]);
        let b = node("/dev/video21", "enc-b", &["H264"], &["YUYV", "NV12"]);
        let req = request(640, 480, 30, 1_000_000, "YUYV");
        let d = choose(BackendSetting::Auto, &[a.clone(), b], &req).unwrap();
        assert!(matches!(&d.backend, Backend::V4l2 { path, .. } if path == "/dev/video21"));
        assert_eq!(
            d.rejected,
            vec![(
                "/dev/video20".to_string(),
                "fits; an earlier node was taken".to_string()
            )]
        );
        let d = choose(BackendSetting::Auto, &[a], &req).unwrap();
        assert!(matches!(&d.backend, Backend::V4l2 { input_format, .. } if input_format == "NV12"));
        // Config spelling.
        #[derive(Deserialize)]
        struct C {
            backend: BackendSetting,
        }
        for (text, want) in [
            ("auto", BackendSetting::Auto),
            ("openh264", BackendSetting::Openh264),
            ("v4l2", BackendSetting::V4l2),
        ] {
            let c: C = toml::from_str(&format!("backend = \"{text}\"")).unwrap();
            assert_eq!(c.backend, want);
        }
        assert!(toml::from_str::<C>("backend = \"vaapi\"").is_err());
    }
}
