//! Finding memory-to-memory codec nodes: which /dev/video* node encodes (or decodes) which format, from VIDIOC_QUERYCAP and VIDIOC_ENUM_FMT.

use std::path::{Path, PathBuf};

use crate::media::vdev::{BufType, Device, FourCc, FrameSize, consts};

/// One M2M node as probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CodecNode {
    pub path: PathBuf,
    pub driver: String,
    pub card: String,
    /// Multi-planar API (e.g. bcm2835-codec) rather than single-planar (e.g. vicodec's default).
    pub mplane: bool,
    /// Formats the node takes in (its OUTPUT queue).
    pub input_formats: Vec<FourCc>,
    /// Formats it produces (its CAPTURE queue).
    pub output_formats: Vec<FourCc>,
    /// The largest picture it lists for its first produced format (VIDIOC_ENUM_FRAMESIZES).
    pub max_size: Option<(u32, u32)>,
}

impl CodecNode {
    /// Turns `raw` pictures into `coded` ones.
    pub(crate) fn encodes(&self, raw: FourCc, coded: FourCc) -> bool {
        self.input_formats.contains(&raw) && self.output_formats.contains(&coded)
    }

    /// Turns `coded` data into `raw` pictures.
    pub(crate) fn decodes(&self, coded: FourCc, raw: FourCc) -> bool {
        self.input_formats.contains(&coded) && self.output_formats.contains(&raw)
    }

    /// (OUTPUT, CAPTURE) queue types of this node.
    pub(crate) fn queues(&self) -> (BufType, BufType) {
        if self.mplane {
            (BufType::VideoOutputMplane, BufType::VideoCaptureMplane)
        } else {
            (BufType::VideoOutput, BufType::VideoCapture)
        }
    }
}

/// The first node (in path order) that encodes `raw` to `coded`.
pub(crate) fn find_encoder(nodes: &[CodecNode], raw: FourCc, coded: FourCc) -> Option<&CodecNode> {
    nodes.iter().find(|n| n.encodes(raw, coded))
}

/// The first node (in path order) that decodes `coded` to `raw`.
pub(crate) fn find_decoder(nodes: &[CodecNode], coded: FourCc, raw: FourCc) -> Option<&CodecNode> {
    nodes.iter().find(|n| n.decodes(coded, raw))
}

/// Probes one node; `None` when it is not a streaming M2M device (or cannot be opened).
pub(crate) fn probe_node(path: &Path) -> Option<CodecNode> {
    let device = Device::open(path).ok()?;
    let caps = device.querycap().ok()?;
    let mplane = caps.has(consts::CAP_VIDEO_M2M_MPLANE);
    if !(mplane || caps.has(consts::CAP_VIDEO_M2M)) || !caps.has(consts::CAP_STREAMING) {
        return None;
    }
    let (out_q, cap_q) = if mplane {
        (BufType::VideoOutputMplane, BufType::VideoCaptureMplane)
    } else {
        (BufType::VideoOutput, BufType::VideoCapture)
    };
    let formats = |q| {
        device
            .enum_formats(q)
            .map(|f| f.into_iter().map(|d| d.fourcc).collect())
            .unwrap_or_default()
    };
    let output_formats: Vec<FourCc> = formats(cap_q);
    let max_size = output_formats.first().and_then(|f| {
        device
            .enum_framesizes(*f)
            .ok()?
            .iter()
            .map(|s| match *s {
                FrameSize::Discrete { width, height } => (width, height),
                FrameSize::Stepwise { max, .. } => max,
            })
            .max_by_key(|(w, h)| u64::from(*w) * u64::from(*h))
    });
    Some(CodecNode {
        path: path.to_owned(),
        driver: caps.driver,
        card: caps.card,
        mplane,
        input_formats: formats(out_q),
        output_formats,
        max_size,
    })
}

/// Every M2M node under `dev` (e.g. /dev), in numeric order of /dev/videoN.
pub(crate) fn probe_all(dev: &Path) -> Vec<CodecNode> {
    let mut paths: Vec<(u32, PathBuf)> = std::fs::read_dir(dev)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    let n = name.strip_prefix("video")?.parse().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths.iter().filter_map(|(_, p)| probe_node(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(path: &str, input: &[&[u8; 4]], output: &[&[u8; 4]]) -> CodecNode {
        CodecNode {
            path: path.into(),
            driver: "test".into(),
            card: path.into(),
            mplane: false,
            input_formats: input.iter().map(|f| FourCc::new(f)).collect(),
            output_formats: output.iter().map(|f| FourCc::new(f)).collect(),
            max_size: None,
        }
    }

    #[test]
    fn encoders_and_decoders_are_told_apart_by_their_queues() {
        let yu12 = FourCc::new(b"YU12");
        let fwht = FourCc::new(b"FWHT");
        let h264 = FourCc::new(b"H264");
        let nodes = vec![
            node("/dev/video4", &[b"YU12", b"NV12"], &[b"FWHT"]),
            node("/dev/video5", &[b"FWHT"], &[b"YU12", b"NV12"]),
            node("/dev/video11", &[b"YU12"], &[b"H264"]),
        ];
        assert_eq!(
            find_encoder(&nodes, yu12, fwht).unwrap().path,
            Path::new("/dev/video4")
        );
        assert_eq!(
            find_decoder(&nodes, fwht, yu12).unwrap().path,
            Path::new("/dev/video5")
        );
        assert_eq!(
            find_encoder(&nodes, yu12, h264).unwrap().path,
            Path::new("/dev/video11")
        );
        assert!(find_decoder(&nodes, h264, yu12).is_none());
        assert!(find_encoder(&nodes, FourCc::new(b"YUYV"), fwht).is_none());
    }

    #[test]
    fn queue_types_follow_the_api() {
        let mut n = node("/dev/video11", &[b"YU12"], &[b"H264"]);
        assert_eq!(n.queues(), (BufType::VideoOutput, BufType::VideoCapture));
        n.mplane = true;
        assert_eq!(
            n.queues(),
            (BufType::VideoOutputMplane, BufType::VideoCaptureMplane)
        );
    }
}
