//! Builds and parses rtcam's MQTT topic names (docs/protocol.md §2).

use std::fmt;

use super::limits::{MAX_ID_LEN, MAX_REPLY_TOPIC};

/// True when `id` is 1..=64 characters of `[A-Za-z0-9_-]`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// True for an MQTT topic filter rtcam accepts in its config: 1..=256 bytes, no NUL, no
/// empty first level or leading `$`, `+` only as a whole level, `#` only as the whole last level.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_REPLY_TOPIC || filter.contains('\0') {
        return false;
    }
    if filter.starts_with('$') || filter.starts_with('/') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "+" => true,
        "#" => i == levels.len() - 1,
        l => !l.contains(['+', '#']),
    })
}

/// MQTT topic matching: `+` matches one level, `#` the remaining levels including none (so
/// `a/#` matches `a`); a wildcard in the first level never matches a topic starting with `$`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match (level, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (l, Some(t)) if l == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Home Assistant's discovery topic for `device`: `<discovery_prefix>/device/<device>/config`.
pub fn ha_config_topic(discovery_prefix: &str, device: &str) -> String {
    format!(
        "{}/device/{device}/config",
        discovery_prefix.trim_end_matches('/')
    )
}

/// Home Assistant's birth topic: `online` there means "rediscover everything".
pub fn ha_status_topic(discovery_prefix: &str) -> String {
    format!("{}/status", discovery_prefix.trim_end_matches('/'))
}

/// A validated session id chosen by a viewer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    /// Validates `id` against the session id rules.
    pub fn parse(id: &str) -> Option<Self> {
        is_valid_id(id).then(|| Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Topic names of one device: `<prefix>/<device>/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

/// What an inbound topic addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundTopic {
    /// `<base>/session/<id>/in` with a valid id.
    SessionIn(SessionId),
    /// `<base>/session/<id>/in` whose id breaks the rules (no reply topic can be trusted).
    BadSessionId(String),
    /// `<base>/command`: a command from a dashboard.
    Command,
    /// `<base>/forward/reply`: another service answering a forwarded command.
    ForwardReply,
    /// `<base>/events`: another service's event for every viewer.
    Events,
    /// Anything else.
    Other,
}

impl Topics {
    /// `prefix` may contain `/` levels but no wildcards; `device` must be a valid id.
    pub fn new(prefix: &str, device: &str) -> Self {
        Self {
            base: format!("{}/{}", prefix.trim_end_matches('/'), device),
        }
    }

    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    pub fn state(&self) -> String {
        format!("{}/state", self.base)
    }

    /// Filter the device subscribes to for every session's inbound messages.
    pub fn session_in_filter(&self) -> String {
        format!("{}/session/+/in", self.base)
    }

    /// Commands from dashboards (docs/protocol.md §6).
    pub fn command(&self) -> String {
        format!("{}/command", self.base)
    }

    /// Where command replies go when the command names no `reply_to`.
    pub fn command_reply(&self) -> String {
        format!("{}/command/reply", self.base)
    }

    /// True when a command's `reply_to` may be used: `<base>/command/reply` and any topic
    /// below it, or a topic matching one of `allowed` (`control.reply_to_allowed`). Anything
    /// else would make the device publish, under its own name, wherever a sender asks.
    pub fn reply_topic_allowed(&self, topic: &str, allowed: &[String]) -> bool {
        let own = self.command_reply();
        topic == own
            || topic
                .strip_prefix(own.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
            || allowed.iter().any(|f| filter_matches(f, topic))
    }

    /// Where commands of `namespace` are forwarded.
    pub fn forward(&self, namespace: &str) -> String {
        format!("{}/forward/{namespace}", self.base)
    }

    /// The latest snapshot JPEG (binary, retained).
    pub fn snapshot(&self) -> String {
        format!("{}/snapshot", self.base)
    }

    /// Where services reply to forwarded commands.
    pub fn forward_reply(&self) -> String {
        format!("{}/forward/reply", self.base)
    }

    /// Where services publish events for every viewer.
    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }

    /// Every filter the device subscribes to.
    pub fn subscriptions(&self) -> Vec<String> {
        vec![
            self.session_in_filter(),
            self.command(),
            self.forward_reply(),
            self.events(),
        ]
    }

    pub fn session_in(&self, id: &SessionId) -> String {
        format!("{}/session/{}/in", self.base, id)
    }

    pub fn session_out(&self, id: &SessionId) -> String {
        format!("{}/session/{}/out", self.base, id)
    }

    /// Classifies a topic a message arrived on.
    pub fn parse_inbound(&self, topic: &str) -> InboundTopic {
        if let Some(rest) = topic.strip_prefix(self.base.as_str()) {
            match rest {
                "/command" => return InboundTopic::Command,
                "/forward/reply" => return InboundTopic::ForwardReply,
                "/events" => return InboundTopic::Events,
                _ => {}
            }
        }
        let Some(rest) = topic
            .strip_prefix(self.base.as_str())
            .and_then(|r| r.strip_prefix("/session/"))
        else {
            return InboundTopic::Other;
        };
        let Some(id) = rest.strip_suffix("/in") else {
            return InboundTopic::Other;
        };
        match SessionId::parse(id) {
            Some(id) => InboundTopic::SessionIn(id),
            None => InboundTopic::BadSessionId(id.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::new("rtcam", "cam1")
    }

    #[test]
    fn builds_documented_topics() {
        let t = topics();
        let sid = SessionId::parse("a1b2c3").unwrap();
        assert_eq!(t.status(), "rtcam/cam1/status");
        assert_eq!(t.state(), "rtcam/cam1/state");
        assert_eq!(t.session_in_filter(), "rtcam/cam1/session/+/in");
        assert_eq!(t.session_in(&sid), "rtcam/cam1/session/a1b2c3/in");
        assert_eq!(t.session_out(&sid), "rtcam/cam1/session/a1b2c3/out");
    }

    #[test]
    fn trailing_slash_in_prefix_is_ignored() {
        assert_eq!(
            Topics::new("home/cams/", "x").status(),
            "home/cams/x/status"
        );
    }

    #[test]
    fn parses_session_in() {
        let t = topics();
        assert_eq!(
            t.parse_inbound("rtcam/cam1/session/abc_-9/in"),
            InboundTopic::SessionIn(SessionId::parse("abc_-9").unwrap())
        );
    }

    #[test]
    fn rejects_bad_session_ids() {
        let t = topics();
        let long = "x".repeat(65);
        for bad in ["", "a b", "a.b", "é", long.as_str()] {
            assert_eq!(
                t.parse_inbound(&format!("rtcam/cam1/session/{bad}/in")),
                InboundTopic::BadSessionId(bad.to_owned()),
                "{bad:?}"
            );
        }
        assert!(SessionId::parse(&"x".repeat(64)).is_some());
    }

    #[test]
    fn control_topics() {
        let t = topics();
        assert_eq!(t.parse_inbound("rtcam/cam1/command"), InboundTopic::Command);
        assert_eq!(
            t.parse_inbound("rtcam/cam1/forward/reply"),
            InboundTopic::ForwardReply
        );
        assert_eq!(t.parse_inbound("rtcam/cam1/events"), InboundTopic::Events);
        assert_eq!(
            t.parse_inbound("rtcam/cam1/forward/ptz"),
            InboundTopic::Other
        );
        assert_eq!(
            t.parse_inbound("rtcam/cam1/command/reply"),
            InboundTopic::Other
        );
        assert_eq!(t.forward("ptz"), "rtcam/cam1/forward/ptz");
        assert_eq!(t.subscriptions().len(), 4);
    }

    #[test]
    fn other_topics_are_other() {
        let t = topics();
        for other in [
            "rtcam/cam1/status",
            "rtcam/cam2/session/a/in",
            "rtcam/cam1/session/a/out",
            "rtcam/cam1/session/a/in/extra",
            "rtcam/cam1/session/",
            "rtcam/cam1",
            "",
        ] {
            assert_eq!(t.parse_inbound(other), InboundTopic::Other, "{other}");
        }
    }

    #[test]
    fn filters_match_like_mqtt() {
        for (filter, topic, want) in [
            ("dash/+/replies", "dash/a/replies", true),
            ("dash/+/replies", "dash/a/b/replies", false),
            ("dash/+/replies", "dash//replies", true),
            ("dash/#", "dash", true),
            ("dash/#", "dash/a/b", true),
            ("dash/#", "dashboard/a", false),
            ("#", "anything/at/all", true),
            ("#", "$SYS/broker", false),
            ("+/x", "$SYS/x", false),
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
        ] {
            assert_eq!(filter_matches(filter, topic), want, "{filter} vs {topic}");
        }
        for good in ["dash/+/replies", "dash/#", "a", "+", "#", "a/+/#"] {
            assert!(is_valid_filter(good), "{good}");
        }
        let long = "a".repeat(257);
        for bad in [
            "",
            "a/#/b",
            "a+/b",
            "a/b#",
            "$SYS/#",
            "/a",
            long.as_str(),
            "a\0b",
        ] {
            assert!(!is_valid_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn replies_go_under_the_reply_topic_or_an_allowed_filter() {
        let t = topics();
        let allowed = vec!["dash/+/replies".to_string()];
        for ok in [
            "rtcam/cam1/command/reply",
            "rtcam/cam1/command/reply/ha",
            "rtcam/cam1/command/reply/a/b",
            "dash/kitchen/replies",
        ] {
            assert!(t.reply_topic_allowed(ok, &allowed), "{ok}");
        }
        for foreign in [
            "rtcam/cam2/command",
            "rtcam/cam1/command/replyx",
            "rtcam/cam1/status",
            "homeassistant/device/x/config",
            "zigbee2mqtt/plug/set",
            "dash/kitchen/replies/x",
        ] {
            assert!(!t.reply_topic_allowed(foreign, &allowed), "{foreign}");
        }
        assert!(!t.reply_topic_allowed("dash/kitchen/replies", &[]));
    }
}
