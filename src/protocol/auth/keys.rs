//! Ed25519 keys for signed mode (docs/protocol.md §9.1): b64url, public keys, JWK thumbprints, PKCS#8 PEM.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject as _;

/// Length of an Ed25519 signature, bytes.
pub const SIGNATURE_LEN: usize = 64;
/// Length of an Ed25519 public key or secret seed, bytes.
pub const KEY_LEN: usize = 32;

/// RFC 8410 PKCS#8 v1 prefix for an Ed25519 private key; the 32-byte seed follows.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A key or signature that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not base64url without padding")]
    NotB64url,
    #[error("{what} must be {want} bytes, not {got}")]
    WrongLength {
        what: &'static str,
        want: usize,
        got: usize,
    },
    #[error("not an Ed25519 private key in PKCS#8 PEM (\"-----BEGIN PRIVATE KEY-----\")")]
    NotPkcs8Ed25519,
}

/// Strict base64url without padding (RFC 4648 §5): no `=`, no other alphabet, no stray bits.
pub fn b64url_decode(text: &str) -> Result<Vec<u8>, KeyError> {
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| KeyError::NotB64url)
}

/// base64url without padding.
pub fn b64url_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_fixed<const N: usize>(text: &str, what: &'static str) -> Result<[u8; N], KeyError> {
    let bytes = b64url_decode(text)?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::WrongLength {
            what,
            want: N,
            got: bytes.len(),
        })
}

/// Decodes a b64url Ed25519 signature.
pub fn decode_signature(text: &str) -> Result<[u8; SIGNATURE_LEN], KeyError> {
    decode_fixed(text, "a signature")
}

/// An Ed25519 public key (device, owner or viewer).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Parses the b64url of the 32 raw bytes (43 characters).
    pub fn from_b64url(text: &str) -> Result<Self, KeyError> {
        decode_fixed(text, "a public key").map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn to_b64url(&self) -> String {
        b64url_encode(&self.0)
    }

    /// The RFC 7638 JWK thumbprint, used as the `kid` of credentials this key signs.
    pub fn thumbprint(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
            self.to_b64url()
        );
        b64url_encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
    }

    /// True when `signature` is this key's Ed25519 signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8; SIGNATURE_LEN]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_b64url())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_b64url())
    }
}

/// An Ed25519 private key. Signing is deterministic: no randomness is needed after creation.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// The key whose RFC 8032 secret key ("seed") is `seed`.
    pub fn from_seed(seed: &[u8; KEY_LEN]) -> Self {
        // A 32-byte seed is always a valid Ed25519 secret key; ring only checks the length.
        Self(Ed25519KeyPair::from_seed_unchecked(seed).expect("32-byte Ed25519 seed"))
    }

    /// Parses PKCS#8 DER, v1 (RFC 8410, as `openssl genpkey` writes) or v2 (with public key).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(Self)
            .map_err(|_| KeyError::NotPkcs8Ed25519)
    }

    /// Parses a `-----BEGIN PRIVATE KEY-----` PEM document.
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|_| KeyError::NotPkcs8Ed25519)?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    pub fn public_key(&self) -> PublicKey {
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(bytes)
    }

    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.0.sign(message).as_ref());
        out
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print private material.
        write!(f, "SigningKey(public {})", self.public_key())
    }
}

/// The RFC 8410 PKCS#8 v1 DER of the private key with this seed.
pub fn pkcs8_der_from_seed(seed: &[u8; KEY_LEN]) -> Vec<u8> {
    let mut der = Vec::with_capacity(PKCS8_V1_PREFIX.len() + KEY_LEN);
    der.extend_from_slice(&PKCS8_V1_PREFIX);
    der.extend_from_slice(seed);
    der
}

/// The `-----BEGIN PRIVATE KEY-----` PEM document of the private key with this seed.
pub fn pkcs8_pem_from_seed(seed: &[u8; KEY_LEN]) -> String {
    let body = STANDARD.encode(pkcs8_der_from_seed(seed));
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        // base64 output is ASCII, so every 64-byte chunk is valid UTF-8.
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn seed(s: &str) -> [u8; 32] {
        hex(s).try_into().unwrap()
    }

    /// RFC 8032 §7.1 TEST 1 (empty message) and TEST 2 (one byte 0x72).
    #[test]
    fn ed25519_matches_rfc8032() {
        let k1 = SigningKey::from_seed(&seed(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        ));
        assert_eq!(
            k1.public_key().as_bytes().to_vec(),
            hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        );
        let sig = k1.sign(b"");
        assert_eq!(
            sig.to_vec(),
            hex(concat!(
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155",
                "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
            ))
        );
        assert!(k1.public_key().verify(b"", &sig));
        let k2 = SigningKey::from_seed(&seed(
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        ));
        let sig2 = k2.sign(&[0x72]);
        assert_eq!(
            sig2.to_vec(),
            hex(concat!(
                "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da",
                "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
            ))
        );
        assert!(k2.public_key().verify(&[0x72], &sig2));
        assert!(!k2.public_key().verify(&[0x73], &sig2), "other message");
        assert!(!k1.public_key().verify(&[0x72], &sig2), "other key");
    }

    /// RFC 8037 §A.3: the thumbprint of RFC 8032 TEST 1's public key.
    #[test]
    fn thumbprint_matches_rfc8037() {
        let k = PublicKey::from_b64url("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo").unwrap();
        assert_eq!(
            k.thumbprint(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn b64url_is_strict() {
        assert_eq!(b64url_decode("AQID").unwrap(), vec![1, 2, 3]);
        for bad in ["AQ==", "AQ=", "A+/_", "AQ I", "AR", "A"] {
            assert_eq!(b64url_decode(bad), Err(KeyError::NotB64url), "{bad}");
        }
        assert_eq!(b64url_decode("AQ").unwrap(), vec![1]);
        assert_eq!(
            PublicKey::from_b64url("AQID"),
            Err(KeyError::WrongLength {
                what: "a public key",
                want: 32,
                got: 3
            })
        );
        assert!(decode_signature(&b64url_encode(&[0; 63])).is_err());
        assert!(decode_signature(&b64url_encode(&[0; 64])).is_ok());
    }

    #[test]
    fn pkcs8_round_trips_and_reads_openssl_and_ring_forms() {
        let s = seed("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let pem = pkcs8_pem_from_seed(&s);
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI"));
        let k = SigningKey::from_pkcs8_pem(pem.as_bytes()).unwrap();
        assert_eq!(
            k.public_key().to_b64url(),
            "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        );
        // ring's own PKCS#8 v2 (with the public key) is read too.
        let rng = ring::rand::SystemRandom::new();
        let v2 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let from_v2 = SigningKey::from_pkcs8_der(v2.as_ref()).unwrap();
        assert_eq!(
            from_v2.public_key().as_bytes().as_slice(),
            Ed25519KeyPair::from_pkcs8(v2.as_ref())
                .unwrap()
                .public_key()
                .as_ref()
        );
        assert_eq!(
            SigningKey::from_pkcs8_pem(b"not pem").unwrap_err(),
            KeyError::NotPkcs8Ed25519
        );
        let ec = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
        assert!(SigningKey::from_pkcs8_pem(ec.as_bytes()).is_err());
    }

    #[test]
    fn debug_never_shows_private_material() {
        let k = SigningKey::from_seed(&[7; 32]);
        let text = format!("{k:?}");
        assert!(text.starts_with("SigningKey(public "), "{text}");
        assert!(!text.contains(&b64url_encode(&[7; 32])));
    }
}
