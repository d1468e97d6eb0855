//! Permissions (docs/protocol.md §9.7): what a session's credential allows on the data channel.

use std::fmt;

use crate::protocol::command::Command;

/// A permission level; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    /// Watch; `ping`, `get-state`, `list-controls`, `get-control`.
    View,
    /// Also the camera commands.
    Control,
    /// Also every forwarded namespace and device administration.
    Admin,
}

impl Permission {
    pub const ALL: [Permission; 3] = [Self::View, Self::Control, Self::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::View => "view",
            Self::Control => "control",
            Self::Admin => "admin",
        }
    }

    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == word)
    }

    /// The highest permission in a space-separated `scope`; unknown words are an error.
    pub fn from_scope(scope: &str) -> Result<Self, String> {
        let mut best = None;
        for word in scope.split(' ').filter(|w| !w.is_empty()) {
            let p = Self::parse(word).ok_or_else(|| {
                format!(
                    "scope: unknown permission {:?} (view, control, admin)",
                    word.chars().take(32).collect::<String>()
                )
            })?;
            best = best.max(Some(p));
        }
        best.ok_or_else(|| "scope names no permission".to_owned())
    }

    /// The `scope` written for this level: it and every level below, e.g. `"view control"`.
    pub fn scope(self) -> String {
        Self::ALL
            .into_iter()
            .filter(|p| *p <= self)
            .map(Self::as_str)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement<'a> {
    Permission(Permission),
    /// A forwarded command: its namespace must be granted.
    Namespace(&'a str),
}

/// What `command` needs (docs/protocol.md §9.7).
pub fn required(command: &Command) -> Requirement<'_> {
    match command {
        Command::Ping { .. }
        | Command::GetState
        | Command::ListControls
        | Command::GetControl { .. } => Requirement::Permission(Permission::View),
        Command::Keyframe
        | Command::SetBitrate { .. }
        | Command::SetFps { .. }
        | Command::SetResolution { .. }
        | Command::Snapshot { .. }
        | Command::SetControl { .. } => Requirement::Permission(Permission::Control),
        Command::Forward { namespace, .. } => Requirement::Namespace(namespace),
    }
}

/// A command outside the session's permissions: the reply's `forbidden` error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Forbidden(pub String);

/// Forwarded namespaces a session may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    /// Every namespace the device forwards (`admin`).
    All,
    Listed(Vec<String>),
}

impl Namespaces {
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Listed(list) => list.iter().any(|n| n == namespace),
        }
    }
}

/// What one session may do: the permission and namespaces of its credential and the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    pub permission: Permission,
    pub namespaces: Namespaces,
}

impl Rights {
    /// The rights of a credential: its own `ns`, plus `control_namespaces` (config
    /// `auth.control_namespaces`) with `control`, or every namespace with `admin`.
    pub fn new(
        permission: Permission,
        credential_namespaces: &[String],
        control_namespaces: &[String],
    ) -> Self {
        let namespaces = match permission {
            Permission::Admin => Namespaces::All,
            Permission::Control => {
                let mut list = credential_namespaces.to_vec();
                for ns in control_namespaces {
                    if !list.contains(ns) {
                        list.push(ns.clone());
                    }
                }
                Namespaces::Listed(list)
            }
            Permission::View => Namespaces::Listed(credential_namespaces.to_vec()),
        };
        Self {
            permission,
            namespaces,
        }
    }

    /// `Ok` when this session may run `command`.
    pub fn allows(&self, command: &Command) -> Result<(), Forbidden> {
        match required(command) {
            Requirement::Permission(p) if self.permission >= p => Ok(()),
            Requirement::Permission(p) => Err(Forbidden(format!(
                "this command needs the `{p}` permission; the session's credential has `{}`",
                self.permission
            ))),
            Requirement::Namespace(ns) if self.namespaces.contains(ns) => Ok(()),
            Requirement::Namespace(ns) => Err(Forbidden(format!(
                "the session's credential does not grant the forwarded namespace `{ns}`"
            ))),
        }
    }
}

/// Who is behind a session or command: anyone (`auth.mode = "open"`) or a verified credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Open mode: everything is allowed, as before signed mode existed.
    Open,
    Granted(Rights),
}

impl Access {
    pub fn allows(&self, command: &Command) -> Result<(), Forbidden> {
        match self {
            Self::Open => Ok(()),
            Self::Granted(rights) => rights.allows(command),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};

    fn every_command() -> Vec<Command> {
        vec![
            Command::Ping { t: Value::Null },
            Command::GetState,
            Command::ListControls,
            Command::GetControl { name: "x".into() },
            Command::Keyframe,
            Command::SetBitrate { bps: 100_000 },
            Command::SetFps { fps: 5 },
            Command::SetResolution {
                width: 320,
                height: 240,
            },
            Command::Snapshot { quality: 80 },
            Command::SetControl {
                name: "x".into(),
                value: 1,
            },
            forward("ptz"),
        ]
    }

    fn forward(ns: &str) -> Command {
        Command::Forward {
            namespace: ns.into(),
            name: format!("{ns}.move"),
            args: Map::new(),
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn scopes_parse_to_their_highest_permission() {
        assert_eq!(Permission::from_scope("view"), Ok(Permission::View));
        assert_eq!(
            Permission::from_scope("view control"),
            Ok(Permission::Control)
        );
        assert_eq!(Permission::from_scope("control"), Ok(Permission::Control));
        assert_eq!(Permission::from_scope("admin view"), Ok(Permission::Admin));
        assert_eq!(Permission::from_scope(" view  "), Ok(Permission::View));
        assert!(Permission::from_scope("").is_err());
        assert!(Permission::from_scope("view record").is_err());
        assert!(Permission::from_scope("View").is_err());
        assert_eq!(Permission::Admin.scope(), "view control admin");
        assert_eq!(Permission::View.scope(), "view");
    }

    #[test]
    fn view_allows_reads_only() {
        let r = Rights::new(Permission::View, &[], &names(&["ptz"]));
        let allowed: Vec<bool> = every_command()
            .iter()
            .map(|c| r.allows(c).is_ok())
            .collect();
        assert_eq!(
            allowed,
            [
                true, true, true, true, false, false, false, false, false, false, false
            ]
        );
        let e = r
            .allows(&Command::SetResolution {
                width: 320,
                height: 240,
            })
            .unwrap_err();
        assert!(e.0.contains("`control`"), "{e}");
    }

    #[test]
    fn control_allows_camera_commands_and_control_namespaces() {
        let r = Rights::new(Permission::Control, &names(&["light"]), &names(&["ptz"]));
        for c in every_command() {
            assert!(r.allows(&c).is_ok(), "{c:?}");
        }
        assert!(r.allows(&forward("light")).is_ok());
        let e = r.allows(&forward("door")).unwrap_err();
        assert!(e.0.contains("`door`"), "{e}");
    }

    #[test]
    fn credential_namespaces_need_only_view() {
        let r = Rights::new(Permission::View, &names(&["ptz"]), &[]);
        assert!(r.allows(&forward("ptz")).is_ok());
        assert!(r.allows(&forward("light")).is_err());
        assert!(r.allows(&Command::Keyframe).is_err());
        let none = Rights::new(Permission::Control, &[], &[]);
        assert!(none.allows(&forward("ptz")).is_err());
    }

    #[test]
    fn admin_allows_everything() {
        let r = Rights::new(Permission::Admin, &[], &[]);
        for c in every_command() {
            assert!(r.allows(&c).is_ok(), "{c:?}");
        }
        assert!(r.allows(&forward("anything")).is_ok());
    }

    #[test]
    fn open_access_allows_everything() {
        for c in every_command() {
            assert!(Access::Open.allows(&c).is_ok());
        }
        let view = Access::Granted(Rights::new(Permission::View, &[], &[]));
        assert!(view.allows(&Command::Keyframe).is_err());
    }
}
