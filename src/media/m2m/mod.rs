//! V4L2 memory-to-memory codecs: the stateful encoder interface (pure state machine + driver) and finding codec nodes.

pub(crate) mod encoder;
pub(crate) mod machine;
pub(crate) mod probe;
