//! The DTLS certificate: generated once, cached on disk (PEM, mode 0600) so the device's fingerprint is stable.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rtc::crypto::SignatureScheme;
use rtc::peer_connection::certificate::{CertificateParams, RTCCertificate};

/// Regenerate a cached certificate this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(7 * 24 * 3600);

fn generate() -> Result<RTCCertificate> {
    let provider = rtc::crypto::default_provider().map_err(|e| anyhow::anyhow!("{e}"))?;
    let params = CertificateParams::new(vec!["rtcam".to_owned()])
        .map_err(|e| anyhow::anyhow!("certificate parameters: {e}"))?;
    RTCCertificate::generate(provider.crypto(), SignatureScheme::EcdsaP256Sha256, params)
        .map_err(|e| anyhow::anyhow!("generating the DTLS certificate: {e}"))
}

/// Loads the cached certificate at `path`, or generates one and caches it there.
/// An empty path means "generate one for this process only".
pub fn load_or_create(path: &Path) -> Result<RTCCertificate> {
    if path.as_os_str().is_empty() {
        return generate();
    }
    if let Ok(pem) = std::fs::read_to_string(path) {
        let provider = rtc::crypto::default_provider().map_err(|e| anyhow::anyhow!("{e}"))?;
        match RTCCertificate::from_pem(&pem, provider.crypto()) {
            Ok(cert) if cert.expires > SystemTime::now() + RENEW_BEFORE => {
                tracing::info!(path = %path.display(), "using cached DTLS certificate");
                return Ok(cert);
            }
            Ok(_) => {
                tracing::info!(path = %path.display(), "cached DTLS certificate expires soon; renewing")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cached DTLS certificate unreadable; replacing")
            }
        }
    }
    let cert = generate()?;
    let pem = cert
        .serialize_pem()
        .map_err(|e| anyhow::anyhow!("serializing the DTLS certificate: {e}"))?;
    write_private_file(path, pem.as_bytes()).context("webrtc.certificate_path")?;
    tracing::info!(path = %path.display(), "generated and cached a new DTLS certificate");
    Ok(cert)
}

/// Writes a private key file (mode 0600) beside `path` and renames it into place, so a
/// power cut never leaves half a key. Used for the DTLS certificate and the identity key.
pub(crate) fn write_private_file(path: &Path, contents: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn certificate_is_cached_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dtls.pem");
        let first = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "private key must not be world-readable"
        );
        let second = load_or_create(&path).unwrap();
        assert_eq!(first, second, "same certificate after a restart");
    }

    #[test]
    fn corrupt_cache_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dtls.pem");
        std::fs::write(&path, "not a pem").unwrap();
        let cert = load_or_create(&path).unwrap();
        assert_eq!(load_or_create(&path).unwrap(), cert);
    }

    #[test]
    fn unwritable_location_is_a_clear_error() {
        let e = load_or_create(Path::new("/nonexistent-dir/dtls.pem")).unwrap_err();
        assert!(
            format!("{e:#}").contains("webrtc.certificate_path"),
            "{e:#}"
        );
    }
}
