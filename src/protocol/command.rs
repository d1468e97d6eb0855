//! Control commands over the data channel (docs/protocol.md §6): framing, validation and replies.

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::limits::{
    BITRATE, DEFAULT_JPEG_QUALITY, FPS, HEIGHT, JPEG_QUALITY, MAX_COMMAND_BYTES, MAX_CONTROL_NAME,
    MAX_REPLY_TOPIC, WIDTH, is_valid_name,
};

/// A validated command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Ping {
        t: Value,
    },
    Keyframe,
    SetBitrate {
        bps: u32,
    },
    SetFps {
        fps: u32,
    },
    SetResolution {
        width: u32,
        height: u32,
    },
    GetState,
    /// A JPEG of the current picture.
    Snapshot {
        quality: u8,
    },
    ListControls,
    GetControl {
        name: String,
    },
    SetControl {
        name: String,
        value: i64,
    },
    /// `namespace.action` for another service on the device; rtcam only forwards it.
    Forward {
        namespace: String,
        name: String,
        args: Map<String, Value>,
    },
}

/// Where a command came from: the framing differs only in `reply_to` (MQTT only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    DataChannel,
    Mqtt,
}

/// Error codes of command replies; the strings are part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommandErrorCode {
    BadJson,
    BadRequest,
    UnknownCommand,
    BadArgs,
    OutOfRange,
    TooLarge,
    Unavailable,
    /// A namespaced command whose namespace is not in `forward.namespaces`.
    NotAllowed,
    RateLimited,
    /// A forwarded command got no reply in time.
    Timeout,
    /// The device is overloaded (a queue is full): retry later.
    Busy,
    /// Signed mode: the command is outside the sender's permissions (docs/protocol.md §9.7),
    /// or plain commands are off on the MQTT topic (`control.mqtt_commands = false`).
    Forbidden,
    /// Signed mode: a signed command whose envelope or credential was refused (§9.8).
    Unauthorized,
}

/// A failed command: code and message for the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub code: CommandErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: CommandErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A request's id as the caller gave it (string or number), or `null` when unusable.
pub type RequestId = Value;

/// One parsed request: its id (always known, possibly `null`) and the command or the error.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: RequestId,
    pub command: Result<Command, CommandError>,
    /// MQTT only: the topic the caller wants the reply on.
    pub reply_to: Option<String>,
}

/// Parses one command message. Never fails: problems become the request's error.
pub fn parse_request(message: &[u8], transport: Transport) -> Request {
    let fail = |id: Value, code, msg: String| Request {
        id,
        command: Err(CommandError::new(code, msg)),
        reply_to: None,
    };
    if message.len() > MAX_COMMAND_BYTES {
        // Still answer where the caller listens, when its id and reply_to can be read.
        let (id, reply_to) = salvage_id_and_reply_to(message, transport);
        return Request {
            id,
            command: Err(CommandError::new(
                CommandErrorCode::TooLarge,
                format!(
                    "message is {} bytes; the limit is {MAX_COMMAND_BYTES}",
                    message.len()
                ),
            )),
            reply_to,
        };
    }
    let value: Value = match serde_json::from_slice(message) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                Value::Null,
                CommandErrorCode::BadJson,
                format!("not JSON: {e}"),
            );
        }
    };
    let Value::Object(mut obj) = value else {
        return fail(
            Value::Null,
            CommandErrorCode::BadJson,
            "a command must be a JSON object".into(),
        );
    };
    let id = match obj.remove("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id,
        Some(_) => {
            return fail(
                Value::Null,
                CommandErrorCode::BadRequest,
                "`id` must be a string or a number".into(),
            );
        }
        None => {
            return fail(
                Value::Null,
                CommandErrorCode::BadRequest,
                "missing field `id`".into(),
            );
        }
    };
    let reply_to = match (transport, obj.remove("reply_to")) {
        (_, None) => None,
        (Transport::Mqtt, Some(Value::String(t))) if is_valid_reply_topic(&t) => Some(t),
        (Transport::Mqtt, Some(_)) => {
            return fail(
                id,
                CommandErrorCode::BadRequest,
                format!(
                    "`reply_to` must be a topic name without wildcards, at most {MAX_REPLY_TOPIC} bytes"
                ),
            );
        }
        (Transport::DataChannel, Some(_)) => {
            return fail(
                id,
                CommandErrorCode::BadRequest,
                "`reply_to` is only for MQTT commands; data-channel replies come back on the channel".into(),
            );
        }
    };
    let command = parse_command(obj);
    Request {
        id,
        command,
        reply_to,
    }
}

/// True for a topic a reply may be published on: no wildcards, at most [`MAX_REPLY_TOPIC`] bytes.
fn is_valid_reply_topic(t: &str) -> bool {
    !t.is_empty() && t.len() <= MAX_REPLY_TOPIC && !t.contains(['+', '#', '\0'])
}

/// The id and (MQTT) reply topic of a message that is too large to run, when it is still a
/// JSON object that names them validly.
fn salvage_id_and_reply_to(message: &[u8], transport: Transport) -> (RequestId, Option<String>) {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(message) else {
        return (Value::Null, None);
    };
    let id = match obj.get("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        _ => Value::Null,
    };
    let reply_to = match (transport, obj.get("reply_to")) {
        (Transport::Mqtt, Some(Value::String(t))) if is_valid_reply_topic(t) => Some(t.clone()),
        _ => None,
    };
    (id, reply_to)
}

/// True for `namespace.action` names: lowercase letters, digits, `_` and `-`, one dot.
fn split_namespaced(cmd: &str) -> Option<(&str, &str)> {
    let (ns, name) = cmd.split_once('.')?;
    (is_valid_name(ns) && is_valid_name(name)).then_some((ns, name))
}

fn parse_command(mut obj: Map<String, Value>) -> Result<Command, CommandError> {
    let cmd = match obj.remove("cmd") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad_request("`cmd` must be a string")),
        None => return Err(bad_request("missing field `cmd`")),
    };
    let mut args = match obj.remove("args") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => return Err(bad_request("`args` must be an object")),
    };
    if let Some(extra) = obj.keys().next() {
        return Err(bad_request(format!(
            "unknown field `{extra}`; a command has `id`, `cmd` and `args`"
        )));
    }
    if let Some((namespace, name)) = split_namespaced(&cmd) {
        return Ok(Command::Forward {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            args,
        });
    }
    let command = match cmd.as_str() {
        "ping" => Command::Ping {
            t: args.remove("t").unwrap_or(Value::Null),
        },
        "keyframe" => Command::Keyframe,
        "set-bitrate" => {
            let bps = take_u32(&mut args, "bps", BITRATE)?;
            Command::SetBitrate { bps }
        }
        "set-fps" => Command::SetFps {
            fps: take_u32(&mut args, "fps", FPS)?,
        },
        "set-resolution" => {
            let width = take_u32(&mut args, "width", WIDTH)?;
            let height = take_u32(&mut args, "height", HEIGHT)?;
            if width % 2 != 0 || height % 2 != 0 {
                return Err(CommandError::new(
                    CommandErrorCode::OutOfRange,
                    "args.width and args.height must be even",
                ));
            }
            Command::SetResolution { width, height }
        }
        "get-state" => Command::GetState,
        "list-controls" => Command::ListControls,
        "get-control" => Command::GetControl {
            name: take_name(&mut args)?,
        },
        "set-control" => {
            let name = take_name(&mut args)?;
            let value = match args.remove("value") {
                Some(Value::Bool(b)) => i64::from(b),
                Some(v) => v.as_i64().ok_or_else(|| {
                    CommandError::new(
                        CommandErrorCode::BadArgs,
                        "`args.value` must be an integer or a boolean",
                    )
                })?,
                None => {
                    return Err(CommandError::new(
                        CommandErrorCode::BadArgs,
                        "missing argument `args.value`",
                    ));
                }
            };
            Command::SetControl { name, value }
        }
        "snapshot" => Command::Snapshot {
            quality: if args.contains_key("quality") {
                take_u32(&mut args, "quality", JPEG_QUALITY)? as u8
            } else {
                DEFAULT_JPEG_QUALITY
            },
        },
        other => {
            return Err(CommandError::new(
                CommandErrorCode::UnknownCommand,
                format!(
                    "unknown command `{other}`; known: ping, keyframe, set-bitrate, set-fps, \
                     set-resolution, get-state, snapshot, list-controls, get-control, set-control, \
                     or namespace.action for forwarding"
                ),
            ));
        }
    };
    if let Some(extra) = args.keys().next() {
        return Err(CommandError::new(
            CommandErrorCode::BadArgs,
            format!("`{cmd}` takes no argument `{extra}`"),
        ));
    }
    Ok(command)
}

fn take_name(args: &mut Map<String, Value>) -> Result<String, CommandError> {
    match args.remove("name") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_CONTROL_NAME => Ok(s),
        _ => Err(CommandError::new(
            CommandErrorCode::BadArgs,
            "`args.name` must be a control name from list-controls",
        )),
    }
}

fn bad_request(msg: impl Into<String>) -> CommandError {
    CommandError::new(CommandErrorCode::BadRequest, msg)
}

fn take_u32(
    args: &mut Map<String, Value>,
    key: &str,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, CommandError> {
    let value = args.remove(key).ok_or_else(|| {
        CommandError::new(
            CommandErrorCode::BadArgs,
            format!("missing argument `args.{key}`"),
        )
    })?;
    let Some(n) = value.as_u64().or_else(|| {
        // Accept 5e5-style floats only when they are whole numbers.
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64)
    }) else {
        return Err(CommandError::new(
            CommandErrorCode::BadArgs,
            format!("`args.{key}` must be a non-negative integer"),
        ));
    };
    match u32::try_from(n) {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(CommandError::new(
            CommandErrorCode::OutOfRange,
            format!(
                "args.{key} must be between {} and {}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// The reply JSON for a request.
pub fn reply(id: &RequestId, outcome: &Result<Value, CommandError>) -> String {
    let v = match outcome {
        Ok(result) => json!({"id": id, "ok": true, "result": result}),
        Err(e) => json!({"id": id, "ok": false, "error": {"code": e.code, "message": e.message}}),
    };
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> Request {
        parse_request(v.to_string().as_bytes(), Transport::DataChannel)
    }

    fn mqtt(v: Value) -> Request {
        parse_request(v.to_string().as_bytes(), Transport::Mqtt)
    }

    fn err_code(r: &Request) -> CommandErrorCode {
        r.command.as_ref().expect_err("should fail").code
    }

    #[test]
    fn parses_known_commands() {
        assert_eq!(
            req(json!({"id":1,"cmd":"ping"})),
            Request {
                id: json!(1),
                command: Ok(Command::Ping { t: Value::Null }),
                reply_to: None,
            }
        );
        assert_eq!(
            req(json!({"id":"a","cmd":"ping","args":{"t":{"x":[1]}}})).command,
            Ok(Command::Ping {
                t: json!({"x":[1]})
            })
        );
        assert_eq!(
            req(json!({"id":"k","cmd":"keyframe","args":{}})).command,
            Ok(Command::Keyframe)
        );
        assert_eq!(
            req(json!({"id":2,"cmd":"set-bitrate","args":{"bps":500000}})).command,
            Ok(Command::SetBitrate { bps: 500_000 })
        );
        assert_eq!(
            req(json!({"id":2,"cmd":"set-bitrate","args":{"bps":5e5}})).command,
            Ok(Command::SetBitrate { bps: 500_000 })
        );
    }

    #[test]
    fn unknown_command_keeps_the_id() {
        let r = req(json!({"id":"x7","cmd":"self-destruct"}));
        assert_eq!(r.id, json!("x7"));
        assert_eq!(err_code(&r), CommandErrorCode::UnknownCommand);
    }

    #[test]
    fn rejects_bad_framing() {
        let r = parse_request(b"{not json", Transport::DataChannel);
        assert_eq!(
            (r.id.clone(), err_code(&r)),
            (Value::Null, CommandErrorCode::BadJson)
        );
        assert_eq!(err_code(&req(json!([1]))), CommandErrorCode::BadJson);
        for bad in [
            json!({"cmd":"ping"}),
            json!({"id":null,"cmd":"ping"}),
            json!({"id":[1],"cmd":"ping"}),
        ] {
            let r = req(bad.clone());
            assert_eq!(r.id, Value::Null, "{bad}");
            assert_eq!(err_code(&r), CommandErrorCode::BadRequest, "{bad}");
        }
        for bad in [
            json!({"id":1}),
            json!({"id":1,"cmd":5}),
            json!({"id":1,"cmd":"ping","args":[1]}),
            json!({"id":1,"cmd":"ping","extra":1}),
        ] {
            let r = req(bad.clone());
            assert_eq!(r.id, json!(1), "{bad}");
            assert_eq!(err_code(&r), CommandErrorCode::BadRequest, "{bad}");
        }
    }

    #[test]
    fn validates_bitrate_arguments() {
        let code = |args: Value| err_code(&req(json!({"id":1,"cmd":"set-bitrate","args":args})));
        assert_eq!(code(json!({})), CommandErrorCode::BadArgs);
        assert_eq!(code(json!({"bps":"fast"})), CommandErrorCode::BadArgs);
        assert_eq!(code(json!({"bps":-5})), CommandErrorCode::BadArgs);
        assert_eq!(code(json!({"bps":1.5})), CommandErrorCode::BadArgs);
        assert_eq!(code(json!({"bps":99_999})), CommandErrorCode::OutOfRange);
        assert_eq!(
            code(json!({"bps":20_000_001})),
            CommandErrorCode::OutOfRange
        );
        assert_eq!(code(json!({"bps":1e30})), CommandErrorCode::OutOfRange);
        assert_eq!(code(json!({"bps":500000,"x":1})), CommandErrorCode::BadArgs);
        assert_eq!(
            req(json!({"id":1,"cmd":"set-bitrate","args":{"bps":20_000_000}})).command,
            Ok(Command::SetBitrate { bps: 20_000_000 })
        );
        assert_eq!(
            err_code(&req(json!({"id":1,"cmd":"keyframe","args":{"now":true}}))),
            CommandErrorCode::BadArgs
        );
    }

    #[test]
    fn parses_fps_resolution_and_state() {
        assert_eq!(
            req(json!({"id":1,"cmd":"set-fps","args":{"fps":15}})).command,
            Ok(Command::SetFps { fps: 15 })
        );
        assert_eq!(
            err_code(&req(json!({"id":1,"cmd":"set-fps","args":{"fps":0}}))),
            CommandErrorCode::OutOfRange
        );
        assert_eq!(
            req(json!({"id":1,"cmd":"set-resolution","args":{"width":1280,"height":720}})).command,
            Ok(Command::SetResolution {
                width: 1280,
                height: 720
            })
        );
        assert_eq!(
            err_code(&req(
                json!({"id":1,"cmd":"set-resolution","args":{"width":641,"height":480}})
            )),
            CommandErrorCode::OutOfRange
        );
        assert_eq!(
            err_code(&req(
                json!({"id":1,"cmd":"set-resolution","args":{"width":640}})
            )),
            CommandErrorCode::BadArgs
        );
        assert_eq!(
            req(json!({"id":1,"cmd":"get-state"})).command,
            Ok(Command::GetState)
        );
        assert_eq!(
            req(json!({"id":1,"cmd":"snapshot"})).command,
            Ok(Command::Snapshot {
                quality: DEFAULT_JPEG_QUALITY
            })
        );
        assert_eq!(
            req(json!({"id":1,"cmd":"snapshot","args":{"quality":50}})).command,
            Ok(Command::Snapshot { quality: 50 })
        );
        assert_eq!(
            err_code(&req(json!({"id":1,"cmd":"snapshot","args":{"quality":0}}))),
            CommandErrorCode::OutOfRange
        );
    }

    #[test]
    fn control_commands() {
        assert_eq!(
            req(json!({"id":1,"cmd":"list-controls"})).command,
            Ok(Command::ListControls)
        );
        assert_eq!(
            req(json!({"id":1,"cmd":"get-control","args":{"name":"brightness"}})).command,
            Ok(Command::GetControl {
                name: "brightness".into()
            })
        );
        assert_eq!(
            req(json!({"id":1,"cmd":"set-control","args":{"name":"brightness","value":-5}}))
                .command,
            Ok(Command::SetControl {
                name: "brightness".into(),
                value: -5
            })
        );
        assert_eq!(
            req(json!({"id":1,"cmd":"set-control","args":{"name":"x","value":true}})).command,
            Ok(Command::SetControl {
                name: "x".into(),
                value: 1
            })
        );
        for bad in [
            json!({"name":"b"}),
            json!({"name":"b","value":"high"}),
            json!({"name":"b","value":1.5}),
            json!({"value":1}),
            json!({"name":5,"value":1}),
        ] {
            assert_eq!(
                err_code(&req(json!({"id":1,"cmd":"set-control","args":bad}))),
                CommandErrorCode::BadArgs,
                "{bad}"
            );
        }
    }

    #[test]
    fn namespaced_commands_are_forward_requests() {
        let r = req(json!({"id":"m1","cmd":"ptz.move","args":{"pan":-10}}));
        let Ok(Command::Forward {
            namespace,
            name,
            args,
        }) = r.command
        else {
            panic!("{r:?}")
        };
        assert_eq!((namespace.as_str(), name.as_str()), ("ptz", "move"));
        assert_eq!(args["pan"], json!(-10));
        for bad in ["ptz.", ".move", "PTZ.move", "a.b.c", "ptz move"] {
            assert_eq!(
                err_code(&req(json!({"id":1,"cmd":bad}))),
                CommandErrorCode::UnknownCommand,
                "{bad}"
            );
        }
    }

    #[test]
    fn reply_to_only_over_mqtt() {
        let r = mqtt(json!({"id":1,"cmd":"ping","reply_to":"dash/replies"}));
        assert_eq!(r.reply_to.as_deref(), Some("dash/replies"));
        assert!(r.command.is_ok());
        for bad in [json!("a/+"), json!("a/#"), json!(""), json!(5)] {
            let r = mqtt(json!({"id":1,"cmd":"ping","reply_to":bad}));
            assert_eq!(err_code(&r), CommandErrorCode::BadRequest, "{bad}");
            assert_eq!(r.id, json!(1));
        }
        let r = req(json!({"id":1,"cmd":"ping","reply_to":"x"}));
        assert_eq!(err_code(&r), CommandErrorCode::BadRequest);
    }

    #[test]
    fn rejects_oversized_messages() {
        let big = format!(
            r#"{{"id":1,"cmd":"ping","args":{{"t":"{}"}}}}"#,
            "x".repeat(MAX_COMMAND_BYTES)
        );
        let r = parse_request(big.as_bytes(), Transport::Mqtt);
        assert_eq!(err_code(&r), CommandErrorCode::TooLarge);
        assert_eq!((r.id, r.reply_to), (json!(1), None));
        // Answered where the caller listens when the message still says where.
        let big = format!(
            r#"{{"id":"b","cmd":"ping","reply_to":"dash/r","args":{{"t":"{}"}}}}"#,
            "x".repeat(MAX_COMMAND_BYTES)
        );
        let r = parse_request(big.as_bytes(), Transport::Mqtt);
        assert_eq!(err_code(&r), CommandErrorCode::TooLarge);
        assert_eq!((r.id, r.reply_to.as_deref()), (json!("b"), Some("dash/r")));
        let r = parse_request(big.as_bytes(), Transport::DataChannel);
        assert_eq!(r.reply_to, None, "no reply_to on the data channel");
        let r = parse_request(&vec![b'x'; MAX_COMMAND_BYTES + 1], Transport::Mqtt);
        assert_eq!(
            (err_code(&r), r.id),
            (CommandErrorCode::TooLarge, Value::Null)
        );
    }

    #[test]
    fn replies_have_the_documented_shape() {
        let ok: Value = serde_json::from_str(&reply(&json!(3), &Ok(json!({"pong":true})))).unwrap();
        assert_eq!(ok, json!({"id":3,"ok":true,"result":{"pong":true}}));
        let err: Value = serde_json::from_str(&reply(
            &Value::Null,
            &Err(CommandError::new(CommandErrorCode::UnknownCommand, "nope")),
        ))
        .unwrap();
        assert_eq!(
            err,
            json!({"id":null,"ok":false,"error":{"code":"unknown-command","message":"nope"}})
        );
    }
}
