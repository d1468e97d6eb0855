//! The MQTT command topic: parse, rate-limit and queue each command, run it, publish exactly one reply.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ratelimit::TokenBucket;
use super::{CommandOutput, Controller, Origin};
use crate::log_limit::LogLimiter;
use crate::outbound::Publish;
use crate::protocol::auth::permissions::Access;
use crate::protocol::auth::{Refusal, RefusalCode, ReplayCache, Verifier};
use crate::protocol::command::{
    Command, CommandError, CommandErrorCode, RequestId, Transport, parse_request, reply,
};
use crate::protocol::limits::MAX_SIGNED_COMMAND_BYTES;
use crate::protocol::topics::Topics;

/// Commands accepted but not yet run, at most; more get `busy`.
const QUEUE: usize = 64;

/// An admitted command waiting to run.
struct Job {
    id: RequestId,
    command: Command,
    /// What the sender may do: open for plain commands, its credential's for signed ones.
    access: Access,
    reply_to: String,
}

/// Who may use the command topic, and where replies may go.
pub(crate) struct CommandPolicy {
    /// `control.mqtt_commands`: plain, unsigned commands are run (they rely on broker ACLs).
    pub plain: bool,
    /// `control.reply_to_allowed`: filters `reply_to` may match besides `<base>/command/reply/#`.
    pub reply_to_allowed: Vec<String>,
    /// Signed mode: the policy and replay cache for signed commands (docs/protocol.md §9.8);
    /// `None` in open mode.
    pub signed: Option<(Verifier, ReplayCache)>,
}

/// A command as far as it was understood: its id, where its reply goes, and the command with
/// what its sender may do, or why it is refused.
struct Checked {
    id: RequestId,
    reply_to: String,
    command: Result<(Command, Access), CommandError>,
}

/// Takes payloads from the command topic (called by the inbound dispatcher, never blocks).
pub(crate) struct MqttCommands {
    controller: Controller,
    publish: Arc<dyn Publish>,
    topics: Topics,
    policy: CommandPolicy,
    limiter: TokenBucket,
    jobs: mpsc::Sender<Job>,
    log: LogLimiter,
}

impl MqttCommands {
    /// Starts the task that runs admitted commands one at a time (tracked, ends on `cancel`).
    pub fn spawn(
        controller: Controller,
        publish: Arc<dyn Publish>,
        topics: Topics,
        policy: CommandPolicy,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        tracker.spawn(run_jobs(
            rx,
            controller.clone(),
            publish.clone(),
            topics.clone(),
            cancel,
        ));
        Self {
            limiter: controller.source_limiter(Instant::now()),
            controller,
            publish,
            topics,
            policy,
            jobs,
            log: LogLimiter::new(Duration::from_secs(10), 5),
        }
    }

    /// One payload from `<base>/command` at `now` (`now_ms`: the wall clock, for signed
    /// commands): answered now (refused, rate-limited, busy) or queued.
    pub fn submit(&mut self, payload: &[u8], now: Instant, now_ms: u64) {
        // Every message counts against the limits, malformed ones too: each costs a reply.
        let admitted = self.controller.admit(&mut self.limiter, now);
        let checked = self.check(payload, now_ms);
        let refused = match (admitted, checked.command) {
            (Err(e), _) | (Ok(()), Err(e)) => Some(e),
            (Ok(()), Ok((command, access))) => {
                let job = Job {
                    id: checked.id.clone(),
                    command,
                    access,
                    reply_to: checked.reply_to.clone(),
                };
                self.jobs.try_send(job).err().map(|_| {
                    CommandError::new(
                        CommandErrorCode::Busy,
                        format!("{QUEUE} MQTT commands are already waiting; retry later"),
                    )
                })
            }
        };
        if let Some(e) = refused {
            if let Some(suppressed) = self.log.allow(now) {
                tracing::debug!(code = ?e.code, message = %e.message, suppressed, "MQTT command refused");
            }
            let text = reply(&checked.id, &Err(e));
            let _ = self
                .publish
                .publish(checked.reply_to, text.into_bytes(), false);
        }
    }

    /// Opens a signed command or takes a plain one, and checks where its reply may go.
    fn check(&mut self, payload: &[u8], now_ms: u64) -> Checked {
        let default_reply = self.topics.command_reply();
        let opened = match self.policy.signed.as_mut() {
            Some((verifier, replay)) if is_envelope(payload) => {
                match verifier.open_inbound(payload, &self.topics.command(), None, now_ms, replay) {
                    Ok(opened) => {
                        let access = opened
                            .grant
                            .map_or(Access::Open, |g| Access::Granted(g.rights));
                        Ok((
                            parse_request(opened.msg.as_bytes(), Transport::Mqtt),
                            access,
                        ))
                    }
                    Err(refusal) => Err(signed_refusal(&refusal)),
                }
            }
            _ => {
                let request = parse_request(payload, Transport::Mqtt);
                Ok((request, Access::Open))
            }
        };
        let (request, access) = match opened {
            Ok(o) => o,
            // Nothing of an unverified envelope is trusted, its reply_to included.
            Err(e) => {
                return Checked {
                    id: RequestId::Null,
                    reply_to: default_reply,
                    command: Err(e),
                };
            }
        };
        let signed = !matches!(access, Access::Open);
        let (reply_to, command) = match request.reply_to {
            Some(t)
                if !self
                    .topics
                    .reply_topic_allowed(&t, &self.policy.reply_to_allowed) =>
            {
                (
                    default_reply,
                    Err(CommandError::new(
                        CommandErrorCode::BadRequest,
                        format!(
                            "`reply_to` {:?} is not allowed: replies go to {}/... or to a topic matching control.reply_to_allowed",
                            t.chars().take(64).collect::<String>(),
                            self.topics.command_reply(),
                        ),
                    )),
                )
            }
            reply_to => (
                reply_to.unwrap_or(default_reply),
                request.command.and_then(|c| {
                    if signed || self.policy.plain {
                        Ok((c, access))
                    } else {
                        Err(CommandError::new(
                            CommandErrorCode::Forbidden,
                            "plain commands are off on this topic (control.mqtt_commands = false); \
                             send a signed command (docs/protocol.md §9.8)",
                        ))
                    }
                }),
            ),
        };
        Checked {
            id: request.id,
            reply_to,
            command,
        }
    }
}

/// True when `payload` is a signed envelope (a JSON object whose `type` is `signed`), small
/// enough to be one.
fn is_envelope(payload: &[u8]) -> bool {
    payload.len() <= MAX_SIGNED_COMMAND_BYTES
        && serde_json::from_slice::<serde_json::Value>(payload)
            .is_ok_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("signed"))
}

/// The command error for a refused signed command.
fn signed_refusal(refusal: &Refusal) -> CommandError {
    let code = match refusal.code() {
        RefusalCode::Busy => CommandErrorCode::Busy,
        RefusalCode::BadJson | RefusalCode::BadSchema | RefusalCode::UnsupportedVersion => {
            CommandErrorCode::BadRequest
        }
        RefusalCode::Unauthorized | RefusalCode::Stale | RefusalCode::Replayed => {
            CommandErrorCode::Unauthorized
        }
    };
    CommandError::new(
        code,
        format!("{}: {}", refusal.code().as_str(), refusal.error),
    )
}

async fn run_jobs(
    mut rx: mpsc::Receiver<Job>,
    controller: Controller,
    publish: Arc<dyn Publish>,
    topics: Topics,
    cancel: CancellationToken,
) {
    loop {
        let job = tokio::select! {
            _ = cancel.cancelled() => break,
            j = rx.recv() => match j { Some(j) => j, None => break },
        };
        let outcome = match controller
            .run(&Origin::Mqtt, &job.access, &job.id, job.command)
            .await
        {
            Ok(CommandOutput::Done(result)) => Ok(result),
            Ok(CommandOutput::Snapshot { jpeg, mut result }) => {
                // MQTT gets the image as a retained binary payload of its own, before the reply.
                let topic = topics.snapshot();
                result["topic"] = json!(topic);
                match publish.publish(topic, jpeg, true) {
                    Ok(()) => Ok(result),
                    Err(e) => Err(CommandError::new(CommandErrorCode::Busy, e.to_string())),
                }
            }
            // Only viewers forward (the controller refuses MQTT); nothing to wait for.
            Ok(CommandOutput::Forwarded) => Ok(json!({})),
            Err(e) => Err(e),
        };
        let text = reply(&job.id, &outcome);
        let _ = publish.publish(job.reply_to, text.into_bytes(), false);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Rig;
    use super::*;
    use std::collections::BTreeMap;

    fn open_policy() -> CommandPolicy {
        CommandPolicy {
            plain: true,
            reply_to_allowed: vec!["dash/+".into()],
            signed: None,
        }
    }

    /// Submits `n` snapshot commands at once and waits for their replies on `dash/r`.
    async fn burst(rate: (u32, u32), n: usize) -> BTreeMap<String, usize> {
        let rig = Rig::new(rate, &[]);
        let mut intake = MqttCommands::spawn(
            rig.controller.clone(),
            rig.publish.clone(),
            rig.topics.clone(),
            open_policy(),
            &rig.tracker,
            rig.cancel.clone(),
        );
        let now = Instant::now();
        for i in 0..n {
            let cmd =
                json!({"id": i, "cmd": "snapshot", "args": {"quality": 10}, "reply_to": "dash/r"});
            intake.submit(cmd.to_string().as_bytes(), now, 0);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while rig.publish.json_on("dash/r").len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let replies = rig.publish.json_on("dash/r");
        assert_eq!(replies.len(), n, "one reply per command");
        let mut ids: Vec<u64> = replies.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        ids.sort_unstable();
        assert_eq!(
            ids,
            (0..n as u64).collect::<Vec<_>>(),
            "every id exactly once"
        );
        let mut outcomes = BTreeMap::new();
        for r in &replies {
            let key = if r["ok"] == true {
                "ok".to_string()
            } else {
                r["error"]["code"].as_str().unwrap().to_string()
            };
            *outcomes.entry(key).or_default() += 1;
        }
        rig.stop().await;
        outcomes
    }

    #[tokio::test]
    async fn a_burst_gets_one_reply_per_command_rate_limited_beyond_the_burst() {
        let outcomes = burst((20, 40), 300).await;
        assert_eq!(outcomes.get("ok"), Some(&40), "{outcomes:?}");
        assert_eq!(outcomes.get("rate-limited"), Some(&260), "{outcomes:?}");
    }

    #[tokio::test]
    async fn a_burst_beyond_the_queue_is_answered_busy() {
        let outcomes = burst((1000, 1000), 300).await;
        let ok = outcomes.get("ok").copied().unwrap_or(0);
        let busy = outcomes.get("busy").copied().unwrap_or(0);
        assert!(ok >= QUEUE, "{outcomes:?}");
        assert!(busy > 0, "{outcomes:?}");
        assert_eq!(ok + busy, 300, "{outcomes:?}");
    }

    #[tokio::test]
    async fn refusals_go_where_the_caller_listens() {
        let rig = Rig::new((10, 10), &[]);
        let mut intake = MqttCommands::spawn(
            rig.controller.clone(),
            rig.publish.clone(),
            rig.topics.clone(),
            open_policy(),
            &rig.tracker,
            rig.cancel.clone(),
        );
        let now = Instant::now();
        intake.submit(br#"{"id":1,"cmd":"nope","reply_to":"dash/r"}"#, now, 0);
        intake.submit(br#"{"id":2,"cmd":"ping","reply_to":"a/#"}"#, now, 0);
        intake.submit(b"not json", now, 0);
        intake.submit(br#"{"id":3,"cmd":"ping"}"#, now, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while rig.publish.json_on("rtcam/t/command/reply").len() < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mine = rig.publish.json_on("dash/r");
        assert_eq!(mine[0]["error"]["code"], "unknown-command");
        let default = rig.publish.json_on("rtcam/t/command/reply");
        let codes: Vec<_> = default
            .iter()
            .map(|r| (r["id"].clone(), r["ok"].clone()))
            .collect();
        assert_eq!(
            codes,
            vec![
                (json!(2), json!(false)),
                (json!(null), json!(false)),
                (json!(3), json!(true))
            ],
            "a bad reply_to and unparseable messages answer on the default topic"
        );
        rig.stop().await;
    }

    /// Waits until `n` replies are on `topic`, then returns them all.
    async fn replies_on(rig: &Rig, topic: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while rig.publish.json_on(topic).len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rig.publish.json_on(topic)
    }

    #[tokio::test]
    async fn reply_to_outside_the_allowed_topics_is_refused_on_the_default_topic() {
        let rig = Rig::new((10, 10), &[]);
        let mut intake = MqttCommands::spawn(
            rig.controller.clone(),
            rig.publish.clone(),
            rig.topics.clone(),
            open_policy(),
            &rig.tracker,
            rig.cancel.clone(),
        );
        let now = Instant::now();
        for foreign in [
            "zigbee2mqtt/plug/set",
            "rtcam/other/command",
            "homeassistant/device/x/config",
            "dash/a/b",
        ] {
            let cmd = json!({"id": foreign, "cmd": "set-bitrate", "args": {"bps": 300000}, "reply_to": foreign});
            intake.submit(cmd.to_string().as_bytes(), now, 0);
        }
        intake.submit(br#"{"id":"ok1","cmd":"ping","reply_to":"dash/a"}"#, now, 0);
        intake.submit(
            br#"{"id":"ok2","cmd":"ping","reply_to":"rtcam/t/command/reply/ha"}"#,
            now,
            0,
        );
        let refused = replies_on(&rig, "rtcam/t/command/reply", 4).await;
        assert_eq!(refused.len(), 4, "{refused:?}");
        for r in &refused {
            assert_eq!(r["error"]["code"], "bad-request", "{r}");
            assert!(r["error"]["message"].as_str().unwrap().contains("reply_to"));
        }
        assert_eq!(replies_on(&rig, "dash/a", 1).await[0]["ok"], true);
        assert_eq!(
            replies_on(&rig, "rtcam/t/command/reply/ha", 1).await[0]["ok"],
            true
        );
        let published: Vec<String> = rig
            .publish
            .published
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _, _)| t.clone())
            .collect();
        for foreign in [
            "zigbee2mqtt/plug/set",
            "rtcam/other/command",
            "homeassistant/device/x/config",
            "dash/a/b",
        ] {
            assert!(
                !published.iter().any(|t| t == foreign),
                "published on {foreign}"
            );
        }
        rig.stop().await;
    }

    mod signed {
        use super::*;
        use crate::outbound::unix_ms;
        use crate::protocol::auth::credential::{Claims, issue};
        use crate::protocol::auth::envelope::seal;
        use crate::protocol::auth::keys::SigningKey;
        use crate::protocol::auth::permissions::Permission;

        fn owner() -> SigningKey {
            SigningKey::from_seed(&[1; 32])
        }

        fn viewer() -> SigningKey {
            SigningKey::from_seed(&[2; 32])
        }

        fn policy(plain: bool) -> CommandPolicy {
            CommandPolicy {
                plain,
                reply_to_allowed: vec![],
                signed: Some((
                    Verifier::new("t", [owner().public_key()], [], vec![], 60_000),
                    ReplayCache::new(64, 60_000),
                )),
            }
        }

        fn signed_command(
            permission: Permission,
            command: serde_json::Value,
            now_ms: u64,
        ) -> Vec<u8> {
            let claims = Claims {
                audience: vec!["t".into()],
                viewer_key: viewer().public_key(),
                permission,
                namespaces: vec![],
                issued_at_s: now_ms / 1000,
                expires_at_s: now_ms / 1000 + 600,
                not_before_s: None,
                id: "c1".into(),
                subject: None,
            };
            let cred = issue(&owner(), &claims).unwrap();
            seal(
                &viewer(),
                "rtcam/t/command",
                now_ms,
                &command.to_string(),
                Some(&cred),
            )
            .unwrap()
            .into_bytes()
        }

        #[tokio::test]
        async fn signed_commands_are_checked_against_their_credential() {
            let rig = Rig::new((100, 100), &[]);
            let mut intake = MqttCommands::spawn(
                rig.controller.clone(),
                rig.publish.clone(),
                rig.topics.clone(),
                policy(false),
                &rig.tracker,
                rig.cancel.clone(),
            );
            let now = Instant::now();
            let t = unix_ms();
            let reply = "rtcam/t/command/reply";
            // Plain commands are off.
            intake.submit(br#"{"id":"p","cmd":"ping"}"#, now, t);
            let control =
                signed_command(Permission::Control, json!({"id":"c","cmd":"keyframe"}), t);
            intake.submit(&control, now, t);
            let view = signed_command(
                Permission::View,
                json!({"id":"v","cmd":"set-fps","args":{"fps":10}}),
                t + 1,
            );
            intake.submit(&view, now, t + 1);
            let view_ok = signed_command(Permission::View, json!({"id":"g","cmd":"ping"}), t + 2);
            intake.submit(&view_ok, now, t + 2);
            // The same signed command again, and one with a forged signature.
            intake.submit(&control, now, t + 3);
            let mut forged: serde_json::Value = serde_json::from_slice(&control).unwrap();
            forged["msg"] = json!(
                json!({"id":"f","cmd":"set-fps","args":{"fps":60},"reply_to":"zigbee2mqtt/x"})
                    .to_string()
            );
            intake.submit(forged.to_string().as_bytes(), now, t + 4);
            let got = replies_on(&rig, reply, 6).await;
            let by_id = |id: serde_json::Value| -> Vec<serde_json::Value> {
                got.iter().filter(|r| r["id"] == id).cloned().collect()
            };
            assert_eq!(by_id(json!("p"))[0]["error"]["code"], "forbidden");
            assert_eq!(by_id(json!("c"))[0]["ok"], true);
            assert_eq!(by_id(json!("v"))[0]["error"]["code"], "forbidden");
            assert_eq!(by_id(json!("g"))[0]["ok"], true);
            let unverified = by_id(serde_json::Value::Null);
            let codes: Vec<_> = unverified
                .iter()
                .map(|r| r["error"]["code"].clone())
                .collect();
            assert_eq!(
                codes,
                vec![json!("unauthorized"), json!("unauthorized")],
                "{got:?}"
            );
            assert!(
                unverified[0]["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("replayed")
            );
            assert!(rig.publish.json_on("zigbee2mqtt/x").is_empty());
            rig.stop().await;
        }

        #[tokio::test]
        async fn plain_commands_still_run_when_allowed() {
            let rig = Rig::new((100, 100), &[]);
            let mut intake = MqttCommands::spawn(
                rig.controller.clone(),
                rig.publish.clone(),
                rig.topics.clone(),
                policy(true),
                &rig.tracker,
                rig.cancel.clone(),
            );
            intake.submit(br#"{"id":"p","cmd":"ping"}"#, Instant::now(), unix_ms());
            assert_eq!(
                replies_on(&rig, "rtcam/t/command/reply", 1).await[0]["ok"],
                true
            );
            rig.stop().await;
        }
    }
}
