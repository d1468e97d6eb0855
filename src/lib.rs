//! rtcam: camera appliance firmware — V4L2 capture, openh264 encoding, WebRTC viewers signaled over MQTT.
//!
//! The library's public surface is what the `rtcam` binary, the benchmark and the integration
//! tests use; everything else is crate-private.

pub mod app;
#[cfg(feature = "embedded-broker")]
mod broker;
mod certificate;
pub mod config;
mod control;
pub mod feed_h264;
mod homeassistant;
mod identity;
mod log_limit;
pub mod logging;
pub mod m2m_check;
pub mod media;
mod mqtt;
mod outbound;
mod ports;
pub mod preflight;
pub mod probe;
pub mod protocol;
pub mod record;
mod signaling;
mod state;
mod systemd;
pub mod token;
pub mod viewer;
mod web;
mod whep;
