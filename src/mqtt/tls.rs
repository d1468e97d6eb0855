//! TLS to the broker: the rustls client configuration from PEM files (CA bundle, optional client certificate).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS set-up for the broker connection is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("{0}: no usable PEM certificate in it")]
    NoCertificates(&'static str),
    #[error("{what}: not valid PEM: {message}")]
    Pem { what: &'static str, message: String },
    #[error("TLS set-up refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls client configuration for the broker: trust the CAs in `ca_pem` and, for
/// mutual TLS, present `client` = (certificate chain PEM, private key PEM).
pub(crate) fn tls_client_config(
    ca_pem: &[u8],
    client: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, TlsError> {
    let pem_error = |what| {
        move |e: rustls::pki_types::pem::Error| TlsError::Pem {
            what,
            message: e.to_string(),
        }
    };
    let cas = CertificateDer::pem_slice_iter(ca_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error("mqtt.ca_file"))?;
    let mut roots = rustls::RootCertStore::empty();
    // A system bundle may hold a certificate rustls cannot parse; skip it, keep the rest.
    let (added, skipped) = roots.add_parsable_certificates(cas);
    if added == 0 {
        return Err(TlsError::NoCertificates("mqtt.ca_file"));
    }
    if skipped > 0 {
        tracing::warn!(skipped, "mqtt.ca_file: some certificates could not be used");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_error("mqtt.client_cert_file"))?;
            if chain.is_empty() {
                return Err(TlsError::NoCertificates("mqtt.client_cert_file"));
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(pem_error("mqtt.client_key_file"))?;
            builder.with_client_auth_cert(chain, key)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (CA PEM, client certificate PEM, client key PEM), freshly made.
    fn pki() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["rtcam".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca.pem(), cert.pem(), key.serialize_pem())
    }

    #[test]
    fn tls_config_from_pem_files() {
        let (ca, cert, key) = pki();
        let c = tls_client_config(ca.as_bytes(), None).unwrap();
        assert!(!c.client_auth_cert_resolver.has_certs());
        let c = tls_client_config(ca.as_bytes(), Some((cert.as_bytes(), key.as_bytes()))).unwrap();
        assert!(c.client_auth_cert_resolver.has_certs());
        // A bundle: the CA after another certificate still counts.
        let bundle = format!("{cert}{ca}");
        assert!(tls_client_config(bundle.as_bytes(), None).is_ok());
    }

    #[test]
    fn bad_tls_files_are_named_errors() {
        let (ca, cert, key) = pki();
        let e = tls_client_config(b"", None).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificates("mqtt.ca_file")), "{e}");
        let e = tls_client_config(key.as_bytes(), None).unwrap_err();
        assert!(e.to_string().contains("mqtt.ca_file"), "{e}");
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let e = tls_client_config(broken.as_bytes(), None).unwrap_err();
        assert!(e.to_string().contains("mqtt.ca_file"), "{e}");
        let e = tls_client_config(ca.as_bytes(), Some((b"", key.as_bytes()))).unwrap_err();
        assert!(e.to_string().contains("mqtt.client_cert_file"), "{e}");
        let e = tls_client_config(ca.as_bytes(), Some((cert.as_bytes(), b"nope"))).unwrap_err();
        assert!(e.to_string().contains("mqtt.client_key_file"), "{e}");
        // A key that does not match the certificate is refused up front.
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(
            tls_client_config(ca.as_bytes(), Some((cert.as_bytes(), other.as_bytes()))).is_err()
        );
    }
}
