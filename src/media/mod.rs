//! Media path: frame sources (V4L2, test pattern), pixel conversion, H.264 encoding or a camera's own H.264 passed through, fan-out, the capture thread.

pub(crate) mod continuity;
pub(crate) mod controls;
pub mod convert;
pub mod encoder;
pub(crate) mod fanout;
pub mod frame;
pub(crate) mod h264;
pub(crate) mod m2m;
pub mod mjpeg;
pub mod passthrough;
pub mod pattern;
pub(crate) mod pipeline;
pub(crate) mod policy;
pub(crate) mod range;
pub(crate) mod rgb;
pub(crate) mod snapshot;
pub(crate) mod source;
pub(crate) mod status;
pub(crate) mod test_pattern;
pub(crate) mod v4l2;
pub(crate) mod vdev;
pub(crate) mod video_encoder;
