//! Media path: frame sources (V4L2, test pattern), pixel conversion, H.264 encoding, fan-out.

pub mod controls;
pub mod convert;
pub mod encoder;
pub mod fanout;
pub mod frame;
pub mod h264;
pub mod mjpeg;
pub mod pattern;
pub mod pipeline;
pub mod range;
pub mod snapshot;
pub mod v4l2;
