//! H.264 without encoding: Annex-B parsing, passthrough with SPS/PPS and GOP caches, level choice, encoder backend choice.

pub(crate) mod annexb;
pub(crate) mod backend;
pub(crate) mod gop;
pub(crate) mod level;
