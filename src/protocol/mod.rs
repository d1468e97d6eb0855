//! Pure wire-protocol logic (topics, signaling messages, commands): no I/O, no clocks.

pub mod auth;
pub mod command;
pub mod signal;
pub mod topics;

#[cfg(test)]
mod robustness;

/// The protocol version every message carries as `"v"` (docs/protocol.md).
pub const PROTOCOL_VERSION: u32 = 1;
