//! `rtcam identity` and `rtcam token ...`: the device's public key, owner keys and viewer credentials (docs/protocol.md §9).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};

use crate::config::Config;
use crate::identity;
use crate::protocol::auth::Verifier;
use crate::protocol::auth::credential::{ANY_DEVICE, Claims, is_valid_namespace, issue};
use crate::protocol::auth::keys::{PublicKey, b64url_encode};
use crate::protocol::auth::permissions::{Namespaces, Permission};
use crate::protocol::limits::MAX_CREDENTIAL_LIFETIME_S;
use crate::protocol::topics::is_valid_id;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an owner key file (Ed25519, PKCS#8 PEM, mode 0600) and print its public key,
    /// the line to add to the device's `auth.owner_keys`. Viewers without a key of their own
    /// can use it to make one too.
    Keygen {
        /// Where to write the private key; an existing file is never replaced.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key of a key file.
    Public {
        #[arg(long)]
        key: PathBuf,
    },
    /// Print a viewer credential (an EdDSA JWT) signed by an owner key.
    Issue(IssueArgs),
    /// Check a credential against this configuration (device.id, auth.owner_keys,
    /// auth.revoked) and the current time, and print what it grants.
    Verify {
        /// The credential (JWT).
        credential: String,
    },
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The owner key file (from `rtcam token keygen`).
    #[arg(long)]
    pub key: PathBuf,
    /// The viewer's public key: 43 base64url characters, or a JWK
    /// `{"kty":"OKP","crv":"Ed25519","x":"..."}`. One key in 64 starts with `-`: taken as
    /// the value, not as an option.
    #[arg(long, allow_hyphen_values = true)]
    pub viewer_key: String,
    /// Device id the credential is for, or `*` for every device trusting the owner key
    /// (repeatable, or comma-separated).
    #[arg(long = "device", required = true, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Permissions: view, control, admin (each includes the ones before it).
    #[arg(long, value_delimiter = ',', default_value = "view")]
    pub allow: Vec<String>,
    /// Lifetime: a number with s, m, h, d or w, e.g. 30d.
    #[arg(long)]
    pub expires: String,
    /// Forwarded namespaces this viewer may use (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub ns: Vec<String>,
    /// A name for the device's logs (the `sub` claim), e.g. alice-phone.
    #[arg(long)]
    pub name: Option<String>,
    /// The credential id (`jti`) to put in auth.revoked to withdraw it; random by default.
    #[arg(long)]
    pub id: Option<String>,
}

/// What a command prints: the result on stdout, notes for a person on stderr.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
}

fn now_unix_ms() -> Result<u64> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| anyhow!("the system clock is before 1970"))?;
    u64::try_from(since.as_millis()).context("the system clock is out of range")
}

/// `30d`, `12h`, `90m`, `3600s`, `2w` as seconds.
pub fn parse_lifetime(text: &str) -> Result<u64> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => bail!("--expires {text:?}: a number with s, m, h, d or w, e.g. 30d"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| anyhow!("--expires {text:?}: a number with s, m, h, d or w, e.g. 30d"))?;
    let seconds = n.saturating_mul(scale);
    if seconds == 0 || seconds > MAX_CREDENTIAL_LIFETIME_S {
        bail!("--expires {text:?}: from 1s to 3650d");
    }
    Ok(seconds)
}

/// A viewer key given as b64url or as an Ed25519 JWK.
pub fn parse_viewer_key(text: &str) -> Result<PublicKey> {
    let text = text.trim();
    if text.starts_with('{') {
        let jwk: serde_json::Value =
            serde_json::from_str(text).context("--viewer-key: not JSON")?;
        if jwk.get("d").is_some() {
            bail!(
                "--viewer-key: this JWK contains the private key (`d`); give the public key only"
            );
        }
        if jwk.get("kty").and_then(|v| v.as_str()) != Some("OKP")
            || jwk.get("crv").and_then(|v| v.as_str()) != Some("Ed25519")
        {
            bail!("--viewer-key: the JWK must be an Ed25519 key (kty OKP, crv Ed25519)");
        }
        let x = jwk
            .get("x")
            .and_then(|v| v.as_str())
            .ok_or_else(|| anyhow!("--viewer-key: the JWK has no `x`"))?;
        return PublicKey::from_b64url(x).map_err(|e| anyhow!("--viewer-key: {e}"));
    }
    PublicKey::from_b64url(text).map_err(|e| anyhow!("--viewer-key: {e}"))
}

fn highest_permission(words: &[String]) -> Result<Permission> {
    let mut best = None;
    for w in words {
        let p = Permission::parse(w.trim())
            .ok_or_else(|| anyhow!("--allow {w:?}: one of view, control, admin"))?;
        best = best.max(Some(p));
    }
    best.ok_or_else(|| anyhow!("--allow: name at least one permission"))
}

/// The claims of `rtcam token issue` at `now_s`; `random_id` is the default `jti`.
pub fn issue_claims(args: &IssueArgs, now_s: u64, random_id: String) -> Result<Claims> {
    for d in &args.devices {
        if d != ANY_DEVICE && !is_valid_id(d) {
            bail!("--device {d:?}: a device id (A-Z a-z 0-9 _ -, 1 to 64) or *");
        }
    }
    for ns in &args.ns {
        if !is_valid_namespace(ns) {
            bail!("--ns {ns:?}: namespaces are 1-64 characters from a-z 0-9 _ -");
        }
    }
    let id = args.id.clone().unwrap_or(random_id);
    if !is_valid_id(&id) {
        bail!("--id {id:?}: 1 to 64 characters from A-Z a-z 0-9 _ -");
    }
    Ok(Claims {
        audience: args.devices.clone(),
        viewer_key: parse_viewer_key(&args.viewer_key)?,
        permission: highest_permission(&args.allow)?,
        namespaces: args.ns.clone(),
        issued_at_s: now_s,
        expires_at_s: now_s + parse_lifetime(&args.expires)?,
        not_before_s: None,
        id,
        subject: args.name.clone(),
    })
}

/// `rtcam token ...`.
pub fn run(config: &Config, command: &TokenCommand) -> Result<Outcome> {
    match command {
        TokenCommand::Keygen { out } => {
            let key = identity::create(out)?;
            Ok(Outcome {
                stdout: format!("{}\n", key.public_key()),
                stderr: format!(
                    "wrote {} (mode 0600): keep it private and off the device.\n\
                     Add the public key above to the device's auth.owner_keys.\n",
                    out.display()
                ),
            })
        }
        TokenCommand::Public { key } => Ok(Outcome {
            stdout: format!("{}\n", identity::load(key)?.public_key()),
            stderr: String::new(),
        }),
        TokenCommand::Issue(args) => {
            let owner = identity::load(&args.key).context("--key")?;
            let now_s = now_unix_ms()? / 1000;
            let claims =
                issue_claims(args, now_s, b64url_encode(&identity::random_bytes::<12>()?))?;
            let token = issue(&owner, &claims).map_err(|e| anyhow!("{e}"))?;
            Ok(Outcome {
                stdout: format!("{token}\n"),
                stderr: format!(
                    "credential {} for {} ({}), expires at {} (Unix seconds)\n",
                    claims.id,
                    claims.audience.join(","),
                    claims.permission.scope(),
                    claims.expires_at_s
                ),
            })
        }
        TokenCommand::Verify { credential } => {
            let auth = &config.auth;
            let verifier = Verifier::new(
                &config.device.id,
                auth.owner_public_keys(),
                auth.revoked.iter().cloned(),
                auth.control_namespaces.clone(),
                auth.max_clock_skew_ms,
            );
            let grant = verifier
                .grant(credential.trim(), now_unix_ms()?)
                .map_err(|e| anyhow!("refused for device {:?}: {e}", config.device.id))?;
            let namespaces = match &grant.rights.namespaces {
                Namespaces::All => serde_json::json!("*"),
                Namespaces::Listed(list) => serde_json::json!(list),
            };
            let summary = serde_json::json!({
                "device": config.device.id,
                "credential_id": grant.credential_id,
                "subject": grant.subject,
                "permission": grant.rights.permission.as_str(),
                "namespaces": namespaces,
                "expires_at": grant.expires_at_s,
                "viewer_key": grant.viewer_key.to_b64url(),
                "owner_kid": grant.owner_kid,
            });
            Ok(Outcome {
                stdout: format!("{summary}\n"),
                stderr: String::new(),
            })
        }
    }
}

/// `rtcam identity`: the device's public key, from `auth.identity_key_path`.
pub fn identity(config: &Config, create: bool) -> Result<Outcome> {
    let path = &config.auth.identity_key_path;
    if path.as_os_str().is_empty() {
        bail!(
            "auth.identity_key_path is empty: the device makes a new identity key each start; \
             set it (e.g. \"/var/lib/rtcam/identity.pem\") to give the device a stable identity"
        );
    }
    let mut stderr = String::new();
    let key = if path.exists() {
        identity::load(path)?
    } else if create {
        stderr = format!(
            "created {} (mode 0600); the service must run as this file's owner to read it\n",
            path.display()
        );
        identity::create(path)?
    } else {
        bail!(
            "no identity key at {} yet: the service creates it when it first starts (or run \
             `rtcam identity --create` as the service's user, e.g. `sudo -u rtcam rtcam identity --create`)",
            path.display()
        );
    };
    Ok(Outcome {
        stdout: format!("{}\n", key.public_key()),
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sources;
    use crate::protocol::auth::keys::SigningKey;

    #[test]
    fn a_viewer_key_starting_with_a_hyphen_is_a_value() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            issue: IssueArgs,
        }
        let key = "-LopAlSO0pJh9u9XQpOsWqis-ruDcfUy-DdZ6mjqSyc";
        let cli = <Cli as clap::Parser>::try_parse_from([
            "issue",
            "--key",
            "owner.key",
            "--viewer-key",
            key,
            "--device",
            "cam1",
            "--expires",
            "1h",
        ])
        .unwrap();
        assert_eq!(cli.issue.viewer_key, key);
    }

    fn args(viewer: &str) -> IssueArgs {
        IssueArgs {
            key: PathBuf::new(),
            viewer_key: viewer.into(),
            devices: vec!["cam1".into()],
            allow: vec!["view".into(), "control".into()],
            expires: "30d".into(),
            ns: vec!["ptz".into()],
            name: Some("alice".into()),
            id: None,
        }
    }

    fn config_with(toml: &str) -> Config {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, toml.as_bytes()).unwrap();
        Config::load(&Sources {
            explicit_file: Some(f.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_lifetime("12h").unwrap(), 12 * 3600);
        assert_eq!(parse_lifetime("90m").unwrap(), 5400);
        assert_eq!(parse_lifetime("1s").unwrap(), 1);
        assert_eq!(parse_lifetime("2w").unwrap(), 14 * 86_400);
        for bad in [
            "",
            "d",
            "30",
            "0d",
            "-1d",
            "1.5d",
            "3651d",
            "30 d",
            "99999999999999999999d",
        ] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn viewer_keys_as_b64url_or_jwk() {
        let pk = SigningKey::from_seed(&[4; 32]).public_key();
        let b64 = pk.to_b64url();
        assert_eq!(parse_viewer_key(&b64).unwrap(), pk);
        let jwk = format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{b64}","ext":true}}"#);
        assert_eq!(parse_viewer_key(&jwk).unwrap(), pk);
        let private = format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{b64}","d":"{b64}"}}"#);
        assert!(
            parse_viewer_key(&private)
                .unwrap_err()
                .to_string()
                .contains("private")
        );
        assert!(parse_viewer_key(r#"{"kty":"EC"}"#).is_err());
        assert!(parse_viewer_key("short").is_err());
    }

    #[test]
    fn issue_arguments_become_claims() {
        let pk = SigningKey::from_seed(&[4; 32]).public_key();
        let c = issue_claims(&args(&pk.to_b64url()), 1000, "rnd".into()).unwrap();
        assert_eq!(c.audience, ["cam1"]);
        assert_eq!(c.permission, Permission::Control);
        assert_eq!(c.expires_at_s, 1000 + 30 * 86_400);
        assert_eq!(c.id, "rnd");
        assert_eq!(c.namespaces, ["ptz"]);
        assert_eq!(c.subject.as_deref(), Some("alice"));
        let mut a = args(&pk.to_b64url());
        a.allow = vec!["contol".into()];
        assert!(issue_claims(&a, 1000, "r".into()).is_err());
        let mut a = args(&pk.to_b64url());
        a.devices = vec!["a/b".into()];
        assert!(issue_claims(&a, 1000, "r".into()).is_err());
        let mut a = args(&pk.to_b64url());
        a.devices = vec!["*".into()];
        assert!(issue_claims(&a, 1000, "r".into()).is_ok());
        let mut a = args(&pk.to_b64url());
        a.ns = vec!["PTZ".into()];
        assert!(issue_claims(&a, 1000, "r".into()).is_err());
        let mut a = args(&pk.to_b64url());
        a.id = Some("has space".into());
        assert!(issue_claims(&a, 1000, "r".into()).is_err());
    }

    #[test]
    fn keygen_issue_verify() {
        let dir = tempfile::tempdir().unwrap();
        let owner_file = dir.path().join("owner.key");
        let empty = config_with("");
        let out = run(
            &empty,
            &TokenCommand::Keygen {
                out: owner_file.clone(),
            },
        )
        .unwrap();
        let owner_pub = out.stdout.trim().to_owned();
        assert_eq!(owner_pub.len(), 43);
        let again = run(
            &empty,
            &TokenCommand::Public {
                key: owner_file.clone(),
            },
        )
        .unwrap();
        assert_eq!(again.stdout.trim(), owner_pub);
        let viewer = SigningKey::from_seed(&[4; 32]).public_key();
        let mut a = args(&viewer.to_b64url());
        a.key = owner_file.clone();
        let token = run(&empty, &TokenCommand::Issue(a)).unwrap().stdout;
        let cam1 = config_with(&format!(
            "[device]\nid = \"cam1\"\n[auth]\nowner_keys = [\"{owner_pub}\"]\n"
        ));
        let verified = run(
            &cam1,
            &TokenCommand::Verify {
                credential: token.clone(),
            },
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&verified.stdout).unwrap();
        assert_eq!(v["permission"], "control");
        assert_eq!(v["viewer_key"], viewer.to_b64url());
        assert_eq!(v["namespaces"], serde_json::json!(["ptz"]));
        let cam2 = config_with(&format!(
            "[device]\nid = \"cam2\"\n[auth]\nowner_keys = [\"{owner_pub}\"]\n"
        ));
        let e = run(
            &cam2,
            &TokenCommand::Verify {
                credential: token.clone(),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("cam2"), "{e}");
        let e = run(&empty, &TokenCommand::Verify { credential: token }).unwrap_err();
        assert!(e.to_string().contains("does not trust"), "{e}");
    }

    #[test]
    fn identity_reads_or_creates_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.pem");
        let config = config_with(&format!(
            "[auth]\nidentity_key_path = \"{}\"\n",
            path.display()
        ));
        let e = identity(&config, false).unwrap_err();
        assert!(e.to_string().contains("--create"), "{e}");
        assert!(!path.exists());
        let created = identity(&config, true).unwrap();
        assert!(created.stderr.contains("created"));
        let read = identity(&config, false).unwrap();
        assert_eq!(read.stdout, created.stdout);
        assert_eq!(
            read.stdout.trim(),
            identity::load(&path).unwrap().public_key().to_b64url()
        );
        let e = identity(&config_with(""), false).unwrap_err();
        assert!(
            e.to_string().contains("auth.identity_key_path is empty"),
            "{e}"
        );
    }
}
