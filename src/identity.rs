//! Ed25519 key files: the device identity key (created on first start) and owner keys, as PKCS#8 PEM written 0600.

use std::path::Path;

use anyhow::{Context, Result, bail};
use ring::rand::SecureRandom;

use crate::config::{AuthConfig, AuthMode};
use crate::protocol::auth::keys::{KEY_LEN, SigningKey, pkcs8_pem_from_seed};

/// `len` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| anyhow::anyhow!("the operating system's random source failed"))?;
    Ok(out)
}

/// A fresh key (not written anywhere).
pub fn generate() -> Result<SigningKey> {
    Ok(SigningKey::from_seed(&random_bytes::<KEY_LEN>()?))
}

/// Reads a PKCS#8 PEM Ed25519 private key.
pub fn load(path: &Path) -> Result<SigningKey> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    SigningKey::from_pkcs8_pem(&pem).with_context(|| format!("{}", path.display()))
}

/// Creates a new key at `path` (mode 0600); refuses to replace an existing file.
pub fn create(path: &Path) -> Result<SigningKey> {
    if path.exists() {
        bail!(
            "{} already exists; refusing to replace a key (move it away first)",
            path.display()
        );
    }
    let seed = random_bytes::<KEY_LEN>()?;
    let pem = pkcs8_pem_from_seed(&seed);
    crate::certificate::write_private_file(path, pem.as_bytes())?;
    Ok(SigningKey::from_seed(&seed))
}

/// The device identity key at `path`, created there when missing. An unreadable or corrupt
/// file is an error, never silently replaced: viewers pin this key.
pub fn load_or_create(path: &Path) -> Result<SigningKey> {
    if path.exists() {
        return load(path).context(
            "auth.identity_key_path: the device identity key is unreadable; fix or remove it \
             (removing it gives the device a new identity that every viewer must pin again)",
        );
    }
    let key = create(path).context("auth.identity_key_path: cannot create the identity key")?;
    tracing::info!(path = %path.display(), key = %key.public_key(), "created the device identity key");
    Ok(key)
}

/// The key the service signs with: from `auth.identity_key_path` (created on first start), or
/// a new one for this process when the path is empty. `None` in open mode.
pub fn load_for_start(auth: &AuthConfig) -> Result<Option<SigningKey>> {
    if auth.mode == AuthMode::Open {
        tracing::warn!(
            "auth.mode = \"open\": anyone who can publish on the broker can watch and control \
             this camera (labs only; docs/security.md)"
        );
        return Ok(None);
    }
    let key = if auth.identity_key_path.as_os_str().is_empty() {
        let key = generate()?;
        tracing::info!(key = %key.public_key(), "auth.identity_key_path is empty: a new device identity key for this run");
        key
    } else {
        let key = load_or_create(&auth.identity_key_path)?;
        tracing::info!(key = %key.public_key(), "device identity key");
        key
    };
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_is_created_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.pem");
        let first = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "private key must not be readable by others"
        );
        let second = load_or_create(&path).unwrap();
        assert_eq!(
            first.public_key(),
            second.public_key(),
            "same identity after a restart"
        );
        assert!(!dir.path().join("identity.pem.tmp").exists());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
    }

    #[test]
    fn a_corrupt_identity_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.pem");
        std::fs::write(&path, "garbage").unwrap();
        let e = load_or_create(&path).unwrap_err();
        assert!(format!("{e:#}").contains("auth.identity_key_path"), "{e:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage");
    }

    #[test]
    fn create_never_replaces_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owner.key");
        let key = create(&path).unwrap();
        let e = create(&path).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(load(&path).unwrap().public_key(), key.public_key());
    }

    #[test]
    fn unwritable_location_names_the_setting() {
        let e = load_or_create(Path::new("/nonexistent-dir/identity.pem")).unwrap_err();
        assert!(format!("{e:#}").contains("auth.identity_key_path"), "{e:#}");
    }

    #[test]
    fn keys_are_random() {
        assert_ne!(
            generate().unwrap().public_key(),
            generate().unwrap().public_key()
        );
    }
}
