//! Home Assistant MQTT discovery: one device message describing rtcam's entities (pure JSON building).

use serde_json::{Value, json};

use crate::protocol::topics::Topics;

/// Resolutions offered by the Home Assistant select entity.
pub const RESOLUTIONS: [&str; 4] = ["320x240", "640x480", "1280x720", "1920x1080"];

/// `<discovery_prefix>/device/<device>/config`.
pub fn config_topic(discovery_prefix: &str, device: &str) -> String {
    format!(
        "{}/device/{device}/config",
        discovery_prefix.trim_end_matches('/')
    )
}

/// Home Assistant's birth topic: `online` there means "rediscover everything".
pub fn status_topic(discovery_prefix: &str) -> String {
    format!("{}/status", discovery_prefix.trim_end_matches('/'))
}

/// The device discovery payload: camera image, buttons, numbers, a select and sensors, all
/// bound to rtcam's retained status topic for availability.
pub fn discovery_payload(topics: &Topics, device: &str) -> Value {
    let uid = |what: &str| format!("rtcam_{device}_{what}");
    let cmd = topics.command();
    let state = topics.state();
    let command = |name: &str, args: &str| {
        format!(
            r#"{{"id":"ha-{name}","cmd":"{name}"{args},"reply_to":"{}"}}"#,
            topics.command_reply()
        )
    };
    let components = json!({
        "snapshot_image": {
            "p": "image", "unique_id": uid("snapshot_image"), "name": "Snapshot",
            "image_topic": topics.snapshot(), "content_type": "image/jpeg",
        },
        "snapshot": {
            "p": "button", "unique_id": uid("snapshot"), "name": "Take snapshot",
            "command_topic": cmd, "payload_press": command("snapshot", ""),
        },
        "keyframe": {
            "p": "button", "unique_id": uid("keyframe"), "name": "Force keyframe",
            "command_topic": cmd, "payload_press": command("keyframe", ""),
            "entity_category": "diagnostic",
        },
        "bitrate": {
            "p": "number", "unique_id": uid("bitrate"), "name": "Bitrate",
            "command_topic": cmd,
            "command_template": command("set-bitrate", r#","args":{"bps":{{ value | int }}}"#),
            "state_topic": state, "value_template": "{{ value_json.bitrate }}",
            "min": 100000, "max": 20000000, "step": 100000, "unit_of_measurement": "bit/s",
            "mode": "box",
        },
        "fps": {
            "p": "number", "unique_id": uid("fps"), "name": "Frame rate",
            "command_topic": cmd,
            "command_template": command("set-fps", r#","args":{"fps":{{ value | int }}}"#),
            "state_topic": state, "value_template": "{{ value_json.fps }}",
            "min": 1, "max": 60, "step": 1, "unit_of_measurement": "fps",
        },
        "resolution": {
            "p": "select", "unique_id": uid("resolution"), "name": "Resolution",
            "command_topic": cmd,
            "command_template": command(
                "set-resolution",
                r#","args":{"width":{{ value.split('x')[0] | int }},"height":{{ value.split('x')[1] | int }}}"#,
            ),
            "state_topic": state,
            "value_template": "{{ value_json.width }}x{{ value_json.height }}",
            "options": RESOLUTIONS,
        },
        "viewers": {
            "p": "sensor", "unique_id": uid("viewers"), "name": "Viewers",
            "state_topic": state, "value_template": "{{ value_json.viewers }}",
            "state_class": "measurement",
        },
        "fps_sensor": {
            "p": "sensor", "unique_id": uid("fps_sensor"), "name": "Streaming frame rate",
            "state_topic": state, "value_template": "{{ value_json.fps }}",
            "unit_of_measurement": "fps", "state_class": "measurement",
        },
        "bitrate_sensor": {
            "p": "sensor", "unique_id": uid("bitrate_sensor"), "name": "Streaming bitrate",
            "state_topic": state, "value_template": "{{ value_json.bitrate }}",
            "unit_of_measurement": "bit/s", "state_class": "measurement",
        },
    });
    json!({
        "dev": {
            "ids": [format!("rtcam_{device}")],
            "name": format!("rtcam {device}"),
            "mf": "rtcam",
            "mdl": "rtcam camera",
            "sw": env!("CARGO_PKG_VERSION"),
        },
        "o": {"name": "rtcam", "sw": env!("CARGO_PKG_VERSION")},
        "availability": [{
            "topic": topics.status(),
            "value_template": "{{ value_json.status }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        }],
        "qos": 1,
        "cmps": components,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_has_every_entity_bound_to_rtcam_topics() {
        let t = Topics::new("rtcam", "cam1");
        let d = discovery_payload(&t, "cam1");
        assert_eq!(
            config_topic("homeassistant", "cam1"),
            "homeassistant/device/cam1/config"
        );
        assert_eq!(d["dev"]["ids"][0], "rtcam_cam1");
        assert_eq!(d["availability"][0]["topic"], "rtcam/cam1/status");
        let c = &d["cmps"];
        let platforms: Vec<&str> = c
            .as_object()
            .unwrap()
            .values()
            .map(|v| v["p"].as_str().unwrap())
            .collect();
        for p in ["image", "button", "number", "select", "sensor"] {
            assert!(platforms.contains(&p), "{p}");
        }
        assert_eq!(c["snapshot_image"]["image_topic"], "rtcam/cam1/snapshot");
        assert_eq!(c["bitrate"]["command_topic"], "rtcam/cam1/command");
        assert_eq!(c["bitrate"]["min"], 100000);
        let press: Value =
            serde_json::from_str(c["snapshot"]["payload_press"].as_str().unwrap()).unwrap();
        assert_eq!(press["cmd"], "snapshot");
        assert_eq!(press["reply_to"], "rtcam/cam1/command/reply");
        // Unique ids are unique.
        let mut ids: Vec<&str> = c
            .as_object()
            .unwrap()
            .values()
            .map(|v| v["unique_id"].as_str().unwrap())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), c.as_object().unwrap().len());
    }

    #[test]
    fn command_templates_render_to_valid_commands() {
        // Render the Jinja the way Home Assistant would for one value, by hand.
        let t = Topics::new("rtcam", "cam1");
        let d = discovery_payload(&t, "cam1");
        let tpl = d["cmps"]["bitrate"]["command_template"].as_str().unwrap();
        let rendered = tpl.replace("{{ value | int }}", "500000");
        let v: Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(v["args"]["bps"], 500000);
        let tpl = d["cmps"]["resolution"]["command_template"]
            .as_str()
            .unwrap();
        let rendered = tpl
            .replace("{{ value.split('x')[0] | int }}", "1280")
            .replace("{{ value.split('x')[1] | int }}", "720");
        let v: Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(
            (v["args"]["width"].as_u64(), v["args"]["height"].as_u64()),
            (Some(1280), Some(720))
        );
    }
}
