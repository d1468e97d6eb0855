//! Forwarded commands: which viewer asked what (pure table, clock passed in) and the routing task.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::command::{CommandError, CommandErrorCode, reply};

/// Forwarded commands still waiting for their service's reply, keyed by (session, id).
#[derive(Debug, Default)]
pub struct PendingTable {
    pending: HashMap<(String, String), Instant>,
}

/// Canonical text of a request id (string ids and numbers never collide: `"1"` vs `1`).
pub fn id_key(id: &Value) -> String {
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

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// A reply a service publishes on `<base>/forward/reply`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceReply {
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
pub struct ServiceError {
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
pub enum RouterMsg {
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
    /// A payload on `<base>/forward/reply`.
    ServiceReply(bytes::Bytes),
    /// A payload on `<base>/events`.
    Event(bytes::Bytes),
}

/// Cloneable, non-blocking handle to the router task.
#[derive(Clone)]
pub struct RouterHandle {
    tx: mpsc::Sender<RouterMsg>,
}

impl RouterHandle {
    pub fn send(&self, msg: RouterMsg) {
        if self.tx.try_send(msg).is_err() {
            tracing::warn!("forwarding router busy; message dropped");
        }
    }
}

/// Largest event or service reply relayed to viewers (the data channel's message limit).
const MAX_RELAY_BYTES: usize = 16 * 1024;

/// Owns the viewer map and the pending table; routes service replies to exactly the viewer
/// that asked, events to every viewer, and times out unanswered commands.
pub fn spawn_router(timeout: Duration, cancel: CancellationToken) -> RouterHandle {
    let (tx, mut rx) = mpsc::channel::<RouterMsg>(256);
    tokio::spawn(async move {
        let mut viewers: HashMap<String, mpsc::Sender<String>> = HashMap::new();
        let mut pending = PendingTable::default();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    for (session, id) in pending.expire(Instant::now()) {
                        if let Some(v) = viewers.get(&session) {
                            let id: Value = serde_json::from_str(&id).unwrap_or(Value::Null);
                            let text = reply(&id, &Err(CommandError::new(
                                CommandErrorCode::Timeout,
                                format!("no reply from the service within {} s", timeout.as_secs()),
                            )));
                            let _ = v.try_send(text);
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
                RouterMsg::ServiceReply(payload) => {
                    if payload.len() > MAX_RELAY_BYTES {
                        tracing::warn!(bytes = payload.len(), "oversized service reply dropped");
                        continue;
                    }
                    let reply: ServiceReply = match serde_json::from_slice(&payload) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(error = %e, "malformed service reply dropped");
                            continue;
                        }
                    };
                    if !pending.take(&reply.session, &reply.id) {
                        tracing::info!(session = %reply.session, "unsolicited or late service reply dropped");
                        continue;
                    }
                    if let Some(v) = viewers.get(&reply.session) {
                        let _ = v.try_send(reply.to_viewer_json());
                    }
                }
                RouterMsg::Event(payload) => {
                    if payload.len() > MAX_RELAY_BYTES {
                        tracing::warn!(bytes = payload.len(), "oversized event dropped");
                        continue;
                    }
                    let Ok(event) = serde_json::from_slice::<Value>(&payload) else {
                        tracing::warn!("non-JSON event dropped");
                        continue;
                    };
                    let text = serde_json::json!({"event": event}).to_string();
                    for v in viewers.values() {
                        let _ = v.try_send(text.clone());
                    }
                }
            }
        }
    });
    RouterHandle { tx }
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

    #[tokio::test]
    async fn router_routes_replies_to_the_asker_only_and_times_out() {
        let cancel = CancellationToken::new();
        let router = spawn_router(Duration::from_millis(300), cancel.clone());
        let (atx, mut arx) = mpsc::channel(8);
        let (btx, mut brx) = mpsc::channel(8);
        router.send(RouterMsg::Register {
            session: "a".into(),
            tx: atx,
        });
        router.send(RouterMsg::Register {
            session: "b".into(),
            tx: btx,
        });
        router.send(RouterMsg::Forwarded {
            session: "a".into(),
            id: json!(1),
        });
        router.send(RouterMsg::Forwarded {
            session: "a".into(),
            id: json!(2),
        });
        router.send(RouterMsg::ServiceReply(
            json!({"session":"a","id":1,"ok":true,"result":{}})
                .to_string()
                .into(),
        ));
        // Unsolicited: never delivered.
        router.send(RouterMsg::ServiceReply(
            json!({"session":"b","id":9,"ok":true}).to_string().into(),
        ));
        router.send(RouterMsg::Event(json!({"door":"open"}).to_string().into()));
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
        cancel.cancel();
    }
}
