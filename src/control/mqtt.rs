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
use crate::protocol::command::{
    Command, CommandError, CommandErrorCode, RequestId, Transport, parse_request, reply,
};
use crate::protocol::topics::Topics;

/// Commands accepted but not yet run, at most; more get `busy`.
const QUEUE: usize = 64;

/// An admitted command waiting to run.
struct Job {
    id: RequestId,
    command: Command,
    reply_to: String,
}

/// Takes payloads from the command topic (called by the inbound dispatcher, never blocks).
pub(crate) struct MqttCommands {
    controller: Controller,
    publish: Arc<dyn Publish>,
    topics: Topics,
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
            jobs,
            log: LogLimiter::new(Duration::from_secs(10), 5),
        }
    }

    /// One payload from `<base>/command`: answered now (refused, rate-limited, busy) or queued.
    pub fn submit(&mut self, payload: &[u8], now: Instant) {
        let request = parse_request(payload, Transport::Mqtt);
        // A bad reply_to (or none) sends the reply to the documented default topic.
        let reply_to = request
            .reply_to
            .clone()
            .unwrap_or_else(|| self.topics.command_reply());
        // Every message counts against the limits, malformed ones too: each costs a reply.
        let refused = match (
            self.controller.admit(&mut self.limiter, now),
            request.command,
        ) {
            (Err(e), _) | (Ok(()), Err(e)) => Some(e),
            (Ok(()), Ok(command)) => {
                let job = Job {
                    id: request.id.clone(),
                    command,
                    reply_to: reply_to.clone(),
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
            let text = reply(&request.id, &Err(e));
            let _ = self.publish.publish(reply_to, text.into_bytes(), false);
        }
    }
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
        let outcome = match controller.run(&Origin::Mqtt, &job.id, job.command).await {
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

    /// Submits `n` snapshot commands at once and waits for their replies on `dash/r`.
    async fn burst(rate: (u32, u32), n: usize) -> BTreeMap<String, usize> {
        let rig = Rig::new(rate, &[]);
        let mut intake = MqttCommands::spawn(
            rig.controller.clone(),
            rig.publish.clone(),
            rig.topics.clone(),
            &rig.tracker,
            rig.cancel.clone(),
        );
        let now = Instant::now();
        for i in 0..n {
            let cmd =
                json!({"id": i, "cmd": "snapshot", "args": {"quality": 10}, "reply_to": "dash/r"});
            intake.submit(cmd.to_string().as_bytes(), now);
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
            &rig.tracker,
            rig.cancel.clone(),
        );
        let now = Instant::now();
        intake.submit(br#"{"id":1,"cmd":"nope","reply_to":"dash/r"}"#, now);
        intake.submit(br#"{"id":2,"cmd":"ping","reply_to":"a/#"}"#, now);
        intake.submit(b"not json", now);
        intake.submit(br#"{"id":3,"cmd":"ping"}"#, now);
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
}
