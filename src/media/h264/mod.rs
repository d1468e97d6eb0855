//! H.264 without encoding: Annex-B parsing, passthrough with SPS/PPS and GOP caches, level choice, encoder backend choice.
// Built and unit-tested ahead of their callers: the H.264 passthrough source and the V4L2
// memory-to-memory encoder (issue 13) wire them in. Until then nothing outside the tests
// calls them; remove this allowance with that wiring.
#![allow(dead_code)]

pub(crate) mod annexb;
pub(crate) mod backend;
pub(crate) mod gop;
pub(crate) mod level;
