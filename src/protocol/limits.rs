//! Every protocol limit in one place: value ranges, sizes and reserved names, read by config, commands and discovery.

use std::ops::RangeInclusive;

/// Longest session or device id.
pub const MAX_ID_LEN: usize = 64;

/// Picture width `capture.width` and `set-resolution` accept (even values only).
pub const WIDTH: RangeInclusive<u32> = 160..=3840;
/// Picture height `capture.height` and `set-resolution` accept (even values only).
pub const HEIGHT: RangeInclusive<u32> = 96..=2160;
/// Frame rate `capture.fps` and `set-fps` accept.
pub const FPS: RangeInclusive<u32> = 1..=60;
/// Bitrate `encoder.bitrate` and `set-bitrate` accept, bits per second.
pub const BITRATE: RangeInclusive<u32> = 100_000..=20_000_000;
/// Step Home Assistant's bitrate number uses.
pub const BITRATE_STEP: u32 = 100_000;
/// Frames between forced keyframes (`encoder.keyframe_interval`).
pub const KEYFRAME_INTERVAL: RangeInclusive<u32> = 1..=3600;
/// Temporal layers of the stream (`encoder.temporal_layers`; openh264 does up to 4).
pub const TEMPORAL_LAYERS: RangeInclusive<u32> = 1..=4;
/// Bytes of the camera's H.264 kept for new viewers (`capture.gop_cache_bytes`; 0: none).
pub const GOP_CACHE_BYTES: RangeInclusive<u32> = 0..=64 << 20;
/// `snapshot` JPEG quality, and its default.
pub const JPEG_QUALITY: RangeInclusive<u32> = 1..=100;
pub const DEFAULT_JPEG_QUALITY: u8 = 85;

/// Largest command message (data channel text message or MQTT payload), bytes.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// Largest binary data-channel message (snapshot chunks), bytes.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// Largest signed command envelope on the MQTT command topic (docs/protocol.md §9.8): room
/// for a command whose JSON text is escaped inside `msg`, and a credential.
pub const MAX_SIGNED_COMMAND_BYTES: usize = 2 * MAX_COMMAND_BYTES + MAX_CREDENTIAL_BYTES;
/// Longest `reply_to` topic, bytes.
pub const MAX_REPLY_TOPIC: usize = 256;
/// Longest URL the device announces (`whep.public_url`): it is the state of Home Assistant's
/// "WHEP URL" sensor, and Home Assistant keeps at most 255 characters of a sensor's state.
pub const MAX_ANNOUNCED_URL: usize = 255;
/// Longest control name.
pub const MAX_CONTROL_NAME: usize = 64;
/// Longest namespace or action of a forwarded `namespace.action` command.
pub const MAX_NAMESPACE_LEN: usize = 64;
/// Largest service reply or event relayed to viewers (the data channel's message limit).
pub const MAX_RELAY_BYTES: usize = 16 * 1024;

/// Candidates (including the end-of-candidates `null`) a viewer may send in one session;
/// more get `too-many-candidates`.
pub const MAX_CANDIDATES_PER_SESSION: u32 = 64;

/// Signed mode (docs/protocol.md §9): largest credential (JWT), bytes.
pub const MAX_CREDENTIAL_BYTES: usize = 4096;
/// Device ids one credential's `aud` may list.
pub const MAX_AUDIENCE: usize = 16;
/// Forwarded namespaces one credential's `ns` may list.
pub const MAX_CREDENTIAL_NAMESPACES: usize = 32;
/// Largest envelope `ts` (2^53 - 1, the largest integer every JSON parser keeps exact).
pub const MAX_TS_MS: u64 = (1 << 53) - 1;
/// `auth.max_clock_skew_ms`: the freshness window a device may be configured with.
pub const CLOCK_SKEW_MS: RangeInclusive<u64> = 1000..=600_000;
/// `auth.replay_cache_entries`: the replay cache's bound.
pub const REPLAY_CACHE_ENTRIES: RangeInclusive<usize> = 64..=1 << 20;
/// Longest credential lifetime `rtcam token issue --expires` accepts, seconds.
pub const MAX_CREDENTIAL_LIFETIME_S: u64 = 3650 * 86_400;

/// Namespaces that cannot be forwarded because their topic is taken:
/// `<prefix>/<device>/forward/reply` is where services answer.
pub const RESERVED_NAMESPACES: &[&str] = &["reply"];

/// True for a namespace or action name: 1..=64 of `a-z 0-9 _ -`.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAMESPACE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Why a namespace cannot be forwarded, or `None` when it can.
pub fn namespace_problem(ns: &str) -> Option<String> {
    if !is_valid_name(ns) {
        Some(format!(
            "{ns:?}: namespaces are 1-{MAX_NAMESPACE_LEN} characters from a-z 0-9 _ -"
        ))
    } else if RESERVED_NAMESPACES.contains(&ns) {
        Some(format!(
            "{ns:?} is reserved: <prefix>/<device>/forward/{ns} is where services reply"
        ))
    } else {
        None
    }
}

/// "between A and B" for error messages.
pub fn describe(range: &RangeInclusive<u32>) -> String {
    format!("between {} and {}", range.start(), range.end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_and_malformed_namespaces_are_refused() {
        assert!(namespace_problem("ptz").is_none());
        assert!(namespace_problem("reply").unwrap().contains("reserved"));
        assert!(namespace_problem("PTZ").is_some());
        assert!(namespace_problem("").is_some());
        assert!(namespace_problem(&"a".repeat(65)).is_some());
    }

    #[test]
    fn ranges_are_consistent() {
        assert!(WIDTH.start().is_multiple_of(2) && HEIGHT.start().is_multiple_of(2));
        assert!(FPS.contains(&30) && BITRATE.contains(&1_000_000));
        assert!(BITRATE.start().is_multiple_of(BITRATE_STEP));
        assert!(JPEG_QUALITY.contains(&u32::from(DEFAULT_JPEG_QUALITY)));
    }
}
