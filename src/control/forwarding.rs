//! Forwarded commands: which viewer asked what (pure table, clock passed in) and the routing task.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::log_limit::LogLimiter;
use crate::protocol::command::{CommandError, CommandErrorCode, reply};
use crate::protocol::limits::MAX_RELAY_BYTES;
use crate::protocol::topics::SessionId;

/// Forwarded commands still waiting for their service's reply, keyed by (session, id).
#[derive(Debug, Default)]
pub(crate) struct PendingTable {
    pending: HashMap<(String, String), Instant>,
}

/// Canonical text of a request id (string ids and numbers never collide: `"1"` vs `1`).
pub(crate) fn id_key(id: &Value) -> String {
    id.to_string()
}

impl PendingTable {
    pub fn insert(&mut self, session: &str, id: &Value, deadline: Instant) {
        self.pending
            .insert((session.to_owned(), id_key(id)), deadline);
    }

    /// True (and forgotten) when this reply answers a pending command.
    pub fn take(&mut self, session: &str, id: &Value) -> bool {
        self.pending
            .remove(&(session.to_owned(), id_key(id)))
            .is_some()
    }

    /// Removes and returns the commands whose deadline passed.
    pub fn expire(&mut self, now: Instant) -> Vec<(String, String)> {
        let expired: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            self.pending.remove(k);
        }
        expired
    }

    /// Forgets everything a closed session was waiting for.
    pub fn drop_session(&mut self, session: &str) {
        self.pending.retain(|(s, _), _| s != session);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// A reply a service publishes on `<base>/forward/reply`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceReply {
    pub session: String,
    pub id: Value,
    pub ok: bool,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<ServiceError>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceError {
    pub code: String,
    pub message: String,
}

impl ServiceReply {
    /// The data-channel reply for the viewer, in rtcam's reply format.
    pub fn to_viewer_json(&self) -> String {
        let v = if self.ok {
            serde_json::json!({"id": self.id, "ok": true, "result": self.result.clone().unwrap_or(Value::Object(Default::default()))})
        } else {
            let (code, message) = self
                .error
                .as_ref()
                .map(|e| (e.code.clone(), e.message.clone()))
                .unwrap_or_else(|| {
                    (
                        "service-error".into(),
                        "the service reported a failure".into(),
                    )
                });
            serde_json::json!({"id": self.id, "ok": false, "error": {"code": code, "message": message}})
        };
        v.to_string()
    }
}

/// Requests to the router task.
enum RouterMsg {
    /// A viewer's data channel opened: replies and events for it go to `tx`.
    Register {
        session: String,
        tx: mpsc::Sender<String>,
    },
    Unregister {
        session: String,
    },
    /// A command was forwarded; expect a reply by the deadline.
    Forwarded {
        session: String,
        id: Value,
    },
    /// The forwarded command could not be published after all.
    Forget {
        session: String,
        id: Value,
    },
    /// A payload on `<base>/forward/reply`.
    ServiceReply(bytes::Bytes),
    /// A payload on `<base>/events`.
    Event(bytes::Bytes),
}

/// Messages queued for the router at most; beyond that senders hear `busy`.
const ROUTER_QUEUE: usize = 256;
/// Each viewer's queue of relayed replies and events.
pub(crate) const RELAY_QUEUE: usize = 64;
/// Events are relayed only while a viewer's queue has more room than this, which stays
/// reserved for replies to its own forwarded commands.
const RESERVED_FOR_REPLIES: usize = 16;

/// The router's queue is full: the message was not taken.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the forwarding router is busy ({ROUTER_QUEUE} messages queued)")]
pub(crate) struct RouterBusy;

/// Cloneable, non-blocking handle to the router task.
#[derive(Clone)]
pub(crate) struct RouterHandle {
    tx: mpsc::Sender<RouterMsg>,
}

impl RouterHandle {
    fn try_send(&self, msg: RouterMsg) -> Result<(), RouterBusy> {
        self.tx.try_send(msg).map_err(|_| RouterBusy)
    }

    /// Replies and events for `session` go to `tx` from now on.
    pub async fn register(&self, session: &SessionId, tx: mpsc::Sender<String>) {
        let msg = RouterMsg::Register {
            session: session.as_str().to_owned(),
            tx,
        };
        // The router never blocks, so waiting for room is short; it only fails at shutdown.
        let _ = self.tx.send(msg).await;
    }

    pub async fn unregister(&self, session: &SessionId) {
        let msg = RouterMsg::Unregister {
            session: session.as_str().to_owned(),
        };
        let _ = self.tx.send(msg).await;
    }

    /// Notes that a reply to (`session`, `id`) is due; `busy` when the router cannot take it.
    pub fn expect_reply(&self, session: &SessionId, id: &Value) -> Result<(), CommandError> {
        self.try_send(RouterMsg::Forwarded {
            session: session.as_str().to_owned(),
            id: id.clone(),
        })
        .map_err(|e| CommandError::new(CommandErrorCode::Busy, e.to_string()))
    }

    /// Withdraws an `expect_reply` whose command never went out.
    pub fn forget(&self, session: &SessionId, id: &Value) {
        let _ = self.try_send(RouterMsg::Forget {
            session: session.as_str().to_owned(),
            id: id.clone(),
        });
    }

    /// A payload from `<base>/forward/reply`.
    pub fn service_reply(&self, payload: bytes::Bytes) -> Result<(), RouterBusy> {
        self.try_send(RouterMsg::ServiceReply(payload))
    }

    /// A payload from `<base>/events`.
    pub fn event(&self, payload: bytes::Bytes) -> Result<(), RouterBusy> {
        self.try_send(RouterMsg::Event(payload))
    }
}

/// Owns the viewer map and the pending table; routes service replies to exactly the viewer
/// that asked, events to every viewer, and times out unanswered commands. Runs until `cancel`.
pub(crate) fn spawn_router(
    timeout: Duration,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> RouterHandle {
    let (tx, rx) = mpsc::channel::<RouterMsg>(ROUTER_QUEUE);
    tracker.spawn(run_router(rx, timeout, cancel));
    RouterHandle { tx }
}

async fn run_router(
    mut rx: mpsc::Receiver<RouterMsg>,
    timeout: Duration,
    cancel: CancellationToken,
) {
    let mut viewers: HashMap<String, mpsc::Sender<String>> = HashMap::new();
    let mut pending = PendingTable::default();
    let mut log = LogLimiter::new(Duration::from_secs(10), 5);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                for (session, id) in pending.expire(Instant::now()) {
                    if let Some(v) = viewers.get(&session) {
                        let id: Value = serde_json::from_str(&id).unwrap_or(Value::Null);
                        let text = reply(&id, &Err(CommandError::new(
                            CommandErrorCode::Timeout,
                            format!("no reply from the service within {} ms", timeout.as_millis()),
                        )));
                        relay(v, text, &mut log);
                    }
                }
                continue;
            }
            m = rx.recv() => match m { Some(m) => m, None => break },
        };
        match msg {
            RouterMsg::Register { session, tx } => {
                viewers.insert(session, tx);
            }
            RouterMsg::Unregister { session } => {
                viewers.remove(&session);
                pending.drop_session(&session);
            }
            RouterMsg::Forwarded { session, id } => {
                pending.insert(&session, &id, Instant::now() + timeout);
            }
            RouterMsg::Forget { session, id } => {
                pending.take(&session, &id);
            }
            RouterMsg::ServiceReply(payload) => {
                let reply = match parse_service_reply(&payload) {
                    Ok(r) => r,
                    Err(why) => {
                        if let Some(suppressed) = log.allow(Instant::now()) {
                            tracing::warn!(%why, suppressed, "service reply dropped");
                        }
                        continue;
                    }
                };
                if !pending.take(&reply.session, &reply.id) {
                    if let Some(suppressed) = log.allow(Instant::now()) {
                        tracing::info!(session = %reply.session.escape_debug(), suppressed, "unsolicited or late service reply dropped");
                    }
                    continue;
                }
                if let Some(v) = viewers.get(&reply.session) {
                    relay(v, reply.to_viewer_json(), &mut log);
                }
            }
            RouterMsg::Event(payload) => {
                if payload.len() > MAX_RELAY_BYTES {
                    if let Some(suppressed) = log.allow(Instant::now()) {
                        tracing::warn!(
                            bytes = payload.len(),
                            suppressed,
                            "oversized event dropped"
                        );
                    }
                    continue;
                }
                let Ok(event) = serde_json::from_slice::<Value>(&payload) else {
                    if let Some(suppressed) = log.allow(Instant::now()) {
                        tracing::warn!(suppressed, "non-JSON event dropped");
                    }
                    continue;
                };
                let text = serde_json::json!({"event": event}).to_string();
                for v in viewers.values() {
                    // Events are best effort: a viewer that does not keep up misses some,
                    // and the room left is kept for replies to its own commands.
                    if v.capacity() > RESERVED_FOR_REPLIES {
                        let _ = v.try_send(text.clone());
                    }
                }
            }
        }
    }
}

/// Queues a reply for a viewer's data channel.
fn relay(viewer: &mpsc::Sender<String>, text: String, log: &mut LogLimiter) {
    if viewer.try_send(text).is_err()
        && let Some(suppressed) = log.allow(Instant::now())
    {
        tracing::warn!(
            suppressed,
            "a viewer's relay queue is full or closed; reply dropped"
        );
    }
}

/// A service reply, checked.
fn parse_service_reply(payload: &[u8]) -> Result<ServiceReply, String> {
    if payload.len() > MAX_RELAY_BYTES {
        return Err(format!(
            "{} bytes; the limit is {MAX_RELAY_BYTES}",
            payload.len()
        ));
    }
    serde_json::from_slice(payload).map_err(|e| format!("malformed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_match_only_what_was_asked() {
        let now = Instant::now();
        let mut t = PendingTable::default();
        t.insert("a", &json!(1), now + Duration::from_secs(5));
        t.insert("a", &json!("1"), now + Duration::from_secs(5));
        assert!(!t.take("b", &json!(1)), "other session");
        assert!(t.take("a", &json!(1)));
        assert!(!t.take("a", &json!(1)), "only once");
        assert!(
            t.take("a", &json!("1")),
            "string id is distinct from number id"
        );
        assert!(t.is_empty());
    }

    #[test]
    fn expiry_and_session_close() {
        let now = Instant::now();
        let mut t = PendingTable::default();
        t.insert("a", &json!(1), now + Duration::from_secs(1));
        t.insert("a", &json!(2), now + Duration::from_secs(10));
        t.insert("b", &json!(3), now + Duration::from_secs(10));
        assert_eq!(
            t.expire(now + Duration::from_secs(2)),
            vec![("a".into(), "1".into())]
        );
        t.drop_session("a");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn service_reply_becomes_viewer_reply() {
        let r: ServiceReply =
            serde_json::from_value(json!({"session":"s","id":7,"ok":true,"result":{"pos":3}}))
                .unwrap();
        let v: Value = serde_json::from_str(&r.to_viewer_json()).unwrap();
        assert_eq!(v, json!({"id":7,"ok":true,"result":{"pos":3}}));
        let r: ServiceReply = serde_json::from_value(
            json!({"session":"s","id":"x","ok":false,"error":{"code":"busy","message":"motor busy"}}),
        )
        .unwrap();
        let v: Value = serde_json::from_str(&r.to_viewer_json()).unwrap();
        assert_eq!(v["error"]["code"], "busy");
        assert!(serde_json::from_value::<ServiceReply>(json!({"session":"s","id":1})).is_err());
    }

    fn sid(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn router_routes_replies_to_the_asker_only_and_times_out() {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let router = spawn_router(Duration::from_millis(300), &tracker, cancel.clone());
        let (atx, mut arx) = mpsc::channel(RELAY_QUEUE);
        let (btx, mut brx) = mpsc::channel(RELAY_QUEUE);
        router.register(&sid("a"), atx).await;
        router.register(&sid("b"), btx).await;
        router.expect_reply(&sid("a"), &json!(1)).unwrap();
        router.expect_reply(&sid("a"), &json!(2)).unwrap();
        router.expect_reply(&sid("a"), &json!(3)).unwrap();
        router.forget(&sid("a"), &json!(3));
        router
            .service_reply(
                json!({"session":"a","id":1,"ok":true,"result":{}})
                    .to_string()
                    .into(),
            )
            .unwrap();
        // Unsolicited or withdrawn: never delivered.
        router
            .service_reply(json!({"session":"b","id":9,"ok":true}).to_string().into())
            .unwrap();
        router
            .service_reply(json!({"session":"a","id":3,"ok":true}).to_string().into())
            .unwrap();
        router
            .event(json!({"door":"open"}).to_string().into())
            .unwrap();
        let first: Value = serde_json::from_str(&arx.recv().await.unwrap()).unwrap();
        assert_eq!(first["id"], 1);
        let ev_a: Value = serde_json::from_str(&arx.recv().await.unwrap()).unwrap();
        let ev_b: Value = serde_json::from_str(&brx.recv().await.unwrap()).unwrap();
        assert_eq!(ev_a, json!({"event":{"door":"open"}}));
        assert_eq!(ev_a, ev_b);
        let timeout: Value = serde_json::from_str(&arx.recv().await.unwrap()).unwrap();
        assert_eq!(timeout["id"], 2);
        assert_eq!(timeout["error"]["code"], "timeout");
        assert!(brx.try_recv().is_err(), "b got nothing but the event");
        assert!(arx.try_recv().is_err(), "the withdrawn id 3 got nothing");
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn events_leave_room_for_replies() {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let router = spawn_router(Duration::from_secs(30), &tracker, cancel.clone());
        let (tx, mut rx) = mpsc::channel(RELAY_QUEUE);
        router.register(&sid("a"), tx).await;
        for i in 0..200 {
            router.event(json!({"n": i}).to_string().into()).unwrap();
            tokio::task::yield_now().await;
        }
        for id in 0..RESERVED_FOR_REPLIES as i64 {
            router.expect_reply(&sid("a"), &json!(id)).unwrap();
            router
                .service_reply(json!({"session":"a","id":id,"ok":true}).to_string().into())
                .unwrap();
        }
        let mut replies = 0;
        let mut events = 0;
        while let Ok(Some(text)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await
        {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v.get("event").is_some() {
                events += 1;
            } else {
                replies += 1;
            }
        }
        assert_eq!(replies, RESERVED_FOR_REPLIES, "every reply arrives");
        assert_eq!(
            events,
            RELAY_QUEUE - RESERVED_FOR_REPLIES,
            "events fill the rest"
        );
        cancel.cancel();
    }
}
