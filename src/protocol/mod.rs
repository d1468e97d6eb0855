//! Pure wire-protocol logic (topics, signaling messages, offer rules, commands, limits): no I/O, no clocks.

/// Public for `benches/auth.rs`.
pub mod auth;
pub(crate) mod command;
pub(crate) mod limits;
pub(crate) mod nomination;
pub(crate) mod sdp;
pub(crate) mod signal;
pub(crate) mod topics;
pub(crate) mod turn;

#[cfg(test)]
mod robustness;

/// The protocol version every message carries as `"v"` (docs/protocol.md).
pub(crate) const PROTOCOL_VERSION: u32 = 1;
