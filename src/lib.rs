//! rtcam: camera appliance firmware — V4L2 capture, openh264 encoding, WebRTC viewers signaled over MQTT.

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod certificate;
pub mod config;
pub mod control;
pub mod forwarding;
pub mod homeassistant;
pub mod identity;
pub mod logging;
pub mod media;
pub mod mqtt;
pub mod ports;
pub mod protocol;
pub mod ratelimit;
pub mod record;
pub mod service;
pub mod sessions;
pub mod signaling;
pub mod state;
pub mod systemd;
pub mod token;
pub mod viewer;
pub mod web;
