//! Preflight: the files and addresses a loaded configuration points at, checked the same way by `check-config` and `run`.
//!
//! [`Config::load`](crate::config::Config::load) checks every value on its own; this checks
//! what those values lead to: that the secret and certificate files can be read and parsed,
//! that the viewer's directory exists when it is served, and that host names are host names.
//! `rtcam check-config --no-files` skips the file checks, for image builders who validate a
//! configuration before its files exist. Each error names the key and the file.

use std::net::IpAddr;
use std::path::Path;

use crate::config::{AuthMode, Config, ConfigError};

/// Whether [`check`] reads the files the configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    Check,
    /// `check-config --no-files`: the files are installed later (image builds).
    Skip,
}

/// Everything `run` needs from a loaded configuration beyond its values: the addresses, and
/// unless `files` is [`Files::Skip`], the files ([`check_files`]).
pub fn check(config: &Config, files: Files) -> Result<(), ConfigError> {
    check_addresses(config)?;
    if files == Files::Check {
        check_files(config)?;
    }
    Ok(())
}

/// Host names that must resolve later: a name or an IP literal, no scheme, port or path.
pub fn check_addresses(config: &Config) -> Result<(), ConfigError> {
    if !is_host(&config.mqtt.host) {
        return Err(invalid(
            "mqtt.host",
            format!(
                "{:?} is not a host name or IP address (no scheme, port or path: the port is mqtt.port), e.g. \"broker.lan\"",
                config.mqtt.host
            ),
        ));
    }
    Ok(())
}

/// The files `run` reads at start: the MQTT password, CA, client certificate and key (with
/// TLS), each TURN credential, coturn's REST secret, and the viewer's directory when `[web]` is enabled. Files are
/// read as `run` reads them, so permissions count: run it as the service's user
/// (`sudo -u rtcam rtcam check-config`). `webrtc.certificate_path` is not checked: a missing or
/// unreadable cache is replaced at start (in the unit's StateDirectory=).
pub fn check_files(config: &Config) -> Result<(), ConfigError> {
    let m = &config.mqtt;
    if !m.password_file.as_os_str().is_empty() {
        read("mqtt.password_file", &m.password_file)?;
    }
    if m.tls {
        let ca = read("mqtt.ca_file", &m.ca_file)?;
        let client = if m.client_cert_file.as_os_str().is_empty() {
            None
        } else {
            Some((
                read("mqtt.client_cert_file", &m.client_cert_file)?,
                read("mqtt.client_key_file", &m.client_key_file)?,
            ))
        };
        // The very parse `run` does: the CA bundle has a usable certificate, the client's
        // certificate and key are PEM and belong together.
        crate::mqtt::tls::tls_client_config(
            &ca,
            client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        )
        .map_err(|e| {
            let files = match &client {
                None => m.ca_file.display().to_string(),
                Some(_) => format!(
                    "{}, {}, {}",
                    m.ca_file.display(),
                    m.client_cert_file.display(),
                    m.client_key_file.display()
                ),
            };
            invalid("mqtt.tls", format!("{e} ({files})"))
        })?;
    }
    for (i, turn) in config.webrtc.turn_servers.iter().enumerate() {
        read("webrtc.turn_servers.credential_file", &turn.credential_file).map_err(|e| {
            invalid(
                "webrtc.turn_servers.credential_file",
                format!("turn_servers[{i}] ({}): {}", turn.url, message(e)),
            )
        })?;
    }
    let rest = &config.webrtc.turn_rest;
    if !rest.urls.is_empty() {
        let key = "webrtc.turn_rest.secret_file";
        let secret = crate::config::read_secret(key, &rest.secret_file)?;
        if secret.is_empty() {
            return Err(invalid(
                key,
                format!(
                    "{}: the first line is empty; it must hold coturn's static-auth-secret",
                    rest.secret_file.display()
                ),
            ));
        }
    }
    if config.web.enabled {
        crate::web::check_root(&config.web.root)
            .map_err(|e| invalid("web.root", format!("{e:#}")))?;
    }
    let h = &config.whep;
    if h.enabled && h.tls() {
        let cert = read("whep.tls_cert_file", &h.tls_cert_file)?;
        let key = read("whep.tls_key_file", &h.tls_key_file)?;
        // The very parse `run` does: PEM, and the key belongs to the certificate.
        crate::whep::server::tls_server_config(&cert, &key).map_err(|e| {
            invalid(
                "whep.tls_cert_file",
                format!(
                    "{e} ({}, {})",
                    h.tls_cert_file.display(),
                    h.tls_key_file.display()
                ),
            )
        })?;
    }
    check_identity(config)
}

/// Signed mode's device identity key: an existing file must be a key `run` can load (it is
/// never replaced: viewers pin it); a missing one is created at start, in a directory that
/// must exist.
fn check_identity(config: &Config) -> Result<(), ConfigError> {
    let a = &config.auth;
    let path = &a.identity_key_path;
    if a.mode == AuthMode::Open || path.as_os_str().is_empty() {
        return Ok(());
    }
    if path.exists() {
        return crate::identity::load(path)
            .map(drop)
            .map_err(|e| invalid("auth.identity_key_path", format!("{e:#}")));
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(invalid(
            "auth.identity_key_path",
            format!(
                "{} does not exist, and the key is created there on first start",
                dir.display()
            ),
        )),
        _ => Ok(()),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

fn message(e: ConfigError) -> String {
    match e {
        ConfigError::Invalid { message, .. } => message,
        other => other.to_string(),
    }
}

/// A DNS name (RFC 1123 labels; `_` tolerated, as resolvers accept it) or an IP literal.
fn is_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sources;
    use std::io::Write;
    use std::path::PathBuf;

    /// The defaults with `toml` layered over them.
    fn config(toml: &str) -> Config {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(toml.as_bytes()).unwrap();
        Config::load(&Sources {
            explicit_file: Some(f.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap()
    }

    fn file_error(toml: &str) -> String {
        check(&config(toml), Files::Check)
            .expect_err("should fail")
            .to_string()
    }

    /// A certificate and key for `localhost` as PEM files in `dir`.
    fn pem_files(dir: &Path) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn defaults_pass() {
        check(&config(""), Files::Check).unwrap();
    }

    #[test]
    fn missing_password_file_names_key_and_file() {
        let e = file_error("[mqtt]\npassword_file = \"/nonexistent/mqtt-password\"\n");
        assert!(
            e.contains("mqtt.password_file") && e.contains("/nonexistent/mqtt-password"),
            "{e}"
        );
    }

    #[test]
    fn no_files_skips_the_files_but_not_the_addresses() {
        let c = config("[mqtt]\npassword_file = \"/nonexistent/mqtt-password\"\n");
        check(&c, Files::Skip).unwrap();
        let c = config("[mqtt]\nhost = \"broker.lan:1883\"\n");
        let e = check(&c, Files::Skip).unwrap_err().to_string();
        assert!(
            e.contains("mqtt.host") && e.contains("broker.lan:1883"),
            "{e}"
        );
    }

    #[test]
    fn readable_password_file_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "secret\n").unwrap();
        let toml = format!("[mqtt]\npassword_file = {:?}\n", path.display().to_string());
        check(&config(&toml), Files::Check).unwrap();
    }

    #[test]
    fn missing_ca_file_names_key_and_file() {
        let e = file_error("[mqtt]\ntls = true\nca_file = \"/nonexistent/ca.pem\"\n");
        assert!(
            e.contains("mqtt.ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let toml = format!(
            "[mqtt]\ntls = true\nca_file = {:?}\n",
            ca.display().to_string()
        );
        let e = file_error(&toml);
        assert!(
            e.contains("mqtt.ca_file") && e.contains(&ca.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn missing_client_cert_and_key_name_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pem_files(dir.path());
        let with = |c: &Path, k: &Path| {
            format!(
                "[mqtt]\ntls = true\nca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}\n",
                cert.display().to_string(),
                c.display().to_string(),
                k.display().to_string()
            )
        };
        check(&config(&with(&cert, &key)), Files::Check).unwrap();
        let e = file_error(&with(Path::new("/nonexistent/c.pem"), &key));
        assert!(
            e.contains("mqtt.client_cert_file") && e.contains("/nonexistent/c.pem"),
            "{e}"
        );
        let e = file_error(&with(&cert, Path::new("/nonexistent/k.pem")));
        assert!(
            e.contains("mqtt.client_key_file") && e.contains("/nonexistent/k.pem"),
            "{e}"
        );
        // A certificate given as the key: read fine, refused by the TLS parse.
        let e = file_error(&with(&cert, &cert));
        assert!(
            e.contains("mqtt.client_key_file") && e.contains(&cert.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn missing_turn_credential_names_key_server_and_file() {
        let e = file_error(
            "[[webrtc.turn_servers]]\nurl = \"turn:turn.lan:3478\"\nusername = \"u\"\n\
             credential_file = \"/nonexistent/turn\"\n",
        );
        assert!(
            e.contains("webrtc.turn_servers.credential_file")
                && e.contains("turn:turn.lan:3478")
                && e.contains("/nonexistent/turn"),
            "{e}"
        );
    }

    #[test]
    fn turn_rest_secret_must_be_readable_and_not_empty() {
        let e = file_error(
            "[webrtc.turn_rest]\nurls = [\"turn:turn.lan:3478\"]\nsecret_file = \"/nonexistent/turn-secret\"\n",
        );
        assert!(
            e.contains("webrtc.turn_rest.secret_file") && e.contains("/nonexistent/turn-secret"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "\nsecond line\n").unwrap();
        let toml = format!(
            "[webrtc.turn_rest]\nurls = [\"turn:turn.lan:3478\"]\nsecret_file = {:?}\n",
            path.display().to_string()
        );
        let e = file_error(&toml);
        assert!(
            e.contains("webrtc.turn_rest.secret_file") && e.contains("empty"),
            "{e}"
        );
        std::fs::write(&path, "the-shared-secret\n").unwrap();
        check(&config(&toml), Files::Check).unwrap();
        // Not configured: the file is not looked at.
        check(
            &config("[webrtc.turn_rest]\nsecret_file = \"/nonexistent/turn-secret\"\n"),
            Files::Check,
        )
        .unwrap();
    }

    #[test]
    fn web_root_is_checked_only_when_enabled() {
        check(
            &config("[web]\nenabled = false\nroot = \"/nonexistent/web\"\n"),
            Files::Check,
        )
        .unwrap();
        let e = file_error("[web]\nenabled = true\nroot = \"/nonexistent/web\"\n");
        assert!(
            e.contains("web.root") && e.contains("/nonexistent/web"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[web]\nenabled = true\nroot = {:?}\n",
            dir.path().display().to_string()
        );
        let e = file_error(&toml);
        assert!(e.contains("web.root") && e.contains("index.html"), "{e}");
        std::fs::write(dir.path().join("index.html"), "<!doctype html>").unwrap();
        check(&config(&toml), Files::Check).unwrap();
    }

    #[test]
    fn host_names_and_addresses() {
        for ok in [
            "localhost",
            "broker.lan",
            "broker.lan.",
            "10.0.0.1",
            "::1",
            "my_broker",
            "a-b.c",
        ] {
            assert!(is_host(ok), "{ok}");
        }
        for bad in [
            "mqtt://broker.lan",
            "broker.lan:1883",
            "broker lan",
            "broker/lan",
            "-broker",
            "a..b",
            "[::1]",
            ".",
        ] {
            assert!(!is_host(bad), "{bad}");
        }
    }

    #[test]
    fn the_identity_key_must_load_or_have_a_directory_to_be_made_in() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("identity.pem");
        let toml = format!(
            "[auth]\nidentity_key_path = {:?}\n",
            key.display().to_string()
        );
        check(&config(&toml), Files::Check).unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let e = file_error(&toml);
        assert!(
            e.contains("auth.identity_key_path") && e.contains("identity.pem"),
            "{e}"
        );
        crate::identity::create(&dir.path().join("good.pem")).unwrap();
        let good = format!(
            "[auth]\nidentity_key_path = {:?}\n",
            dir.path().join("good.pem").display().to_string()
        );
        check(&config(&good), Files::Check).unwrap();
        let e = file_error("[auth]\nidentity_key_path = \"/nonexistent-dir/identity.pem\"\n");
        assert!(e.contains("/nonexistent-dir"), "{e}");
        // Open mode has no identity key.
        check(
            &config("[auth]\nmode = \"open\"\nidentity_key_path = \"/nonexistent-dir/k.pem\"\n"),
            Files::Check,
        )
        .unwrap();
    }

    #[test]
    fn whep_tls_files_are_read_and_must_match() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["cam.lan".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.path().join("whep.crt");
        let key_path = dir.path().join("whep.key");
        let other_path = dir.path().join("other.key");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::write(
            &other_path,
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let whep = |cert: &Path, key: &Path| {
            format!(
                "[whep]\nenabled = true\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
                cert.display().to_string(),
                key.display().to_string()
            )
        };
        check(&config(&whep(&cert_path, &key_path)), Files::Check).unwrap();
        let e = file_error(&whep(&cert_path, &other_path));
        assert!(e.contains("whep.tls_cert_file"), "{e}");
        let e = file_error(&whep(&dir.path().join("missing.crt"), &key_path));
        assert!(e.contains("whep.tls_cert_file"), "{e}");
    }
}
