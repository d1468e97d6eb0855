//! H.264 without encoding: Annex-B parsing, passthrough with SPS/PPS and GOP caches, level choice, encoder backend choice.

pub mod annexb;
pub mod backend;
pub mod gop;
pub mod level;
