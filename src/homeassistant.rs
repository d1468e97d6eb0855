//! Home Assistant MQTT discovery: one device message describing rtcam's entities (pure JSON building).

use serde_json::{Value, json};

use crate::media::controls::{ControlInfo, ControlKind};
use crate::protocol::limits;
use crate::protocol::topics::Topics;

/// Resolutions offered by the Home Assistant select entity.
pub(crate) const RESOLUTIONS: [&str; 4] = ["320x240", "640x480", "1280x720", "1920x1080"];

// The topic names live with rtcam's others (config validation needs them too).
pub(crate) use crate::protocol::topics::{
    ha_config_topic as config_topic, ha_status_topic as status_topic,
};

/// The device discovery payload: camera image, buttons, numbers (bitrate, fps and each
/// integer camera control with the driver's range), a select and sensors, all bound to
/// rtcam's retained status topic for availability. `controls` is empty until the camera has
/// been opened once. With `whep` (the WHEP endpoint is on and has a URL to announce), a
/// diagnostic sensor shows that URL from the state's `whep_url`: the URL alone, never a
/// credential (whep.public_url refuses query strings and user info).
pub(crate) fn discovery_payload(
    topics: &Topics,
    device: &str,
    controls: &[ControlInfo],
    whep: bool,
) -> Value {
    let uid = |what: &str| format!("rtcam_{device}_{what}");
    let cmd = topics.command();
    let state = topics.state();
    let command = |name: &str, args: &str| {
        format!(
            r#"{{"id":"ha-{name}","cmd":"{name}"{args},"reply_to":"{}"}}"#,
            topics.command_reply()
        )
    };
    let mut components = json!({
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
            "min": limits::BITRATE.start(), "max": limits::BITRATE.end(),
            "step": limits::BITRATE_STEP, "unit_of_measurement": "bit/s",
            "mode": "box",
        },
        "fps": {
            "p": "number", "unique_id": uid("fps"), "name": "Frame rate",
            "command_topic": cmd,
            "command_template": command("set-fps", r#","args":{"fps":{{ value | int }}}"#),
            "state_topic": state, "value_template": "{{ value_json.fps }}",
            "min": limits::FPS.start(), "max": limits::FPS.end(), "step": 1,
            "unit_of_measurement": "fps",
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
    if let Some(map) = components.as_object_mut() {
        if whep {
            map.insert(
                "whep_url".into(),
                json!({
                    "p": "sensor", "unique_id": uid("whep_url"), "name": "WHEP URL",
                    "state_topic": state, "value_template": "{{ value_json.whep_url }}",
                    "entity_category": "diagnostic", "icon": "mdi:video-wireless",
                }),
            );
        }
        for c in controls.iter().filter(|c| c.kind == ControlKind::Integer) {
            let name = &c.name;
            map.insert(
                format!("control_{name}"),
                json!({
                    "p": "number", "unique_id": uid(&format!("control_{name}")),
                    "name": control_label(name),
                    "command_topic": cmd,
                    "command_template": command(
                        "set-control",
                        &format!(r#","args":{{"name":"{name}","value":{{{{ value | int }}}}}}"#),
                    ),
                    "state_topic": state,
                    "value_template": format!("{{{{ value_json.controls['{name}'] }}}}"),
                    "min": c.min, "max": c.max, "step": c.step.max(1),
                    "mode": "slider", "entity_category": "config",
                }),
            );
        }
    }
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

/// "white_balance_temperature" → "White balance temperature".
fn control_label(name: &str) -> String {
    let spaced = name.replace('_', " ");
    let mut chars = spaced.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => spaced,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_has_every_entity_bound_to_rtcam_topics() {
        let t = Topics::new("rtcam", "cam1");
        let d = discovery_payload(&t, "cam1", &[], false);
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
        let d = discovery_payload(&t, "cam1", &[], false);
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

    fn control(name: &str, kind: ControlKind, min: i64, max: i64, step: i64) -> ControlInfo {
        ControlInfo {
            name: name.into(),
            kind,
            min,
            max,
            step,
            default: min,
            value: min,
            menu: Vec::new(),
        }
    }

    #[test]
    fn each_integer_control_is_a_number_with_the_drivers_range() {
        let t = Topics::new("rtcam", "cam1");
        let controls = [
            control("brightness", ControlKind::Integer, -64, 64, 1),
            control("exposure_time_absolute", ControlKind::Integer, 3, 2047, 0),
            control("power_line_frequency", ControlKind::Menu, 0, 2, 1),
            control("white_balance_automatic", ControlKind::Boolean, 0, 1, 1),
        ];
        let d = discovery_payload(&t, "cam1", &controls, false);
        let c = &d["cmps"];
        let b = &c["control_brightness"];
        assert_eq!(b["p"], "number");
        assert_eq!(
            (b["min"].as_i64(), b["max"].as_i64()),
            (Some(-64), Some(64))
        );
        assert_eq!(b["step"], 1);
        assert_eq!(b["name"], "Brightness");
        assert_eq!(b["command_topic"], "rtcam/cam1/command");
        assert_eq!(b["state_topic"], "rtcam/cam1/state");
        assert_eq!(
            b["value_template"],
            "{{ value_json.controls['brightness'] }}"
        );
        let rendered = b["command_template"]
            .as_str()
            .unwrap()
            .replace("{{ value | int }}", "-7");
        let v: Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(v["cmd"], "set-control");
        assert_eq!(v["args"]["name"], "brightness");
        assert_eq!(v["args"]["value"], -7);
        // A driver reporting step 0 still gives Home Assistant a usable step.
        assert_eq!(c["control_exposure_time_absolute"]["step"], 1);
        assert_eq!(
            c["control_exposure_time_absolute"]["name"],
            "Exposure time absolute"
        );
        // Only integer controls become numbers.
        assert!(c.get("control_power_line_frequency").is_none());
        assert!(c.get("control_white_balance_automatic").is_none());
    }

    #[test]
    fn whep_url_is_a_diagnostic_sensor_read_from_state_only_when_whep_is_on() {
        let t = Topics::new("rtcam", "cam1");
        let off = discovery_payload(&t, "cam1", &[], false);
        assert!(off["cmps"].get("whep_url").is_none());
        let on = discovery_payload(&t, "cam1", &[], true);
        let w = &on["cmps"]["whep_url"];
        assert_eq!(w["p"], "sensor");
        assert_eq!(w["unique_id"], "rtcam_cam1_whep_url");
        assert_eq!(w["entity_category"], "diagnostic");
        assert_eq!(w["state_topic"], "rtcam/cam1/state");
        assert_eq!(w["value_template"], "{{ value_json.whep_url }}");
        // The payload names where the URL is, it carries no URL and so no token.
        let text = on.to_string();
        assert!(
            !text.contains("access_token") && !text.contains("Bearer"),
            "{text}"
        );
        // Rendered the way Home Assistant would against a state message.
        let state = serde_json::json!({"whep_url": "https://cam.lan:8889/whep"});
        let field = w["value_template"]
            .as_str()
            .unwrap()
            .trim_start_matches("{{ value_json.")
            .trim_end_matches(" }}");
        assert_eq!(state[field], "https://cam.lan:8889/whep");
    }
}
