//! Reads `server.tls`'s two PEM files into the listener's identity: the
//! certificate chain and the private key, checked to match.
//!
//! Runs on every load, so a reload reads the files again and a bad pair is
//! refused with the rest of the config. Messages name the file and the
//! reason; nothing read from the key file ever reaches one (PEM errors are
//! told in words of our own, as some of the parser's quote the line).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Which of the two files is wrong, and why; `Display` names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("server.tls.cert: cannot read `{path}`: {reason}")]
    CertUnreadable { path: String, reason: String },
    #[error("server.tls.key: cannot read `{path}`: {reason}")]
    KeyUnreadable { path: String, reason: String },
    #[error("server.tls.cert: `{path}` is not a PEM certificate chain: {reason}")]
    CertNotPem { path: String, reason: String },
    #[error("server.tls.key: `{path}` is not a PEM private key: {reason}")]
    KeyNotPem { path: String, reason: String },
    #[error("server.tls.key: `{path}` is not a key rustls can use (RSA, ECDSA P-256/P-384 or Ed25519, as PKCS#8, PKCS#1 or SEC1)")]
    KeyUnsupported { path: String },
    #[error("server.tls.cert: the first certificate in `{path}` cannot be parsed: {reason}")]
    CertInvalid { path: String, reason: String },
    #[error("server.tls.key: `{key}` does not match the certificate in `{cert}` (the chain's first certificate must be the one this key signs for)")]
    Mismatch { cert: String, key: String },
}

/// Reads and checks the pair; the chain's first certificate is the
/// listener's own, the rest are sent with it as they are.
pub fn read(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsFileError> {
    let (cert_name, key_name) = (cert.display().to_string(), key.display().to_string());
    let cert_pem = std::fs::read(cert).map_err(|e| TlsFileError::CertUnreadable {
        path: cert_name.clone(),
        reason: e.to_string(),
    })?;
    let key_pem = std::fs::read(key).map_err(|e| TlsFileError::KeyUnreadable {
        path: key_name.clone(),
        reason: e.to_string(),
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError::CertNotPem {
            path: cert_name.clone(),
            reason: pem_reason(&e),
        })?;
    if chain.is_empty() {
        return Err(TlsFileError::CertNotPem {
            path: cert_name,
            reason: "it holds no `-----BEGIN CERTIFICATE-----` section".into(),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsFileError::KeyNotPem {
            path: key_name.clone(),
            reason: "it holds no `-----BEGIN ... PRIVATE KEY-----` section".into(),
        },
        e => TlsFileError::KeyNotPem {
            path: key_name.clone(),
            reason: pem_reason(&e),
        },
    })?;
    let provider = rustls::crypto::ring::default_provider();
    match CertifiedKey::from_der(chain, private, &provider) {
        Ok(identity) => Ok(Arc::new(identity)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsFileError::Mismatch {
            cert: cert_name,
            key: key_name,
        }),
        Err(rustls::Error::General(_)) => Err(TlsFileError::KeyUnsupported { path: key_name }),
        Err(e) => Err(TlsFileError::CertInvalid {
            path: cert_name,
            reason: e.to_string(),
        }),
    }
}

/// A PEM error in words that quote nothing from the file.
fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a section has no `-----END` line".into(),
        pem::Error::IllegalSectionStart { .. } => "a `-----BEGIN` line is malformed".into(),
        pem::Error::Base64Decode(_) => "a section is not valid base64".into(),
        pem::Error::NoItemsFound => "it holds no PEM section".into(),
        pem::Error::SectionTooLarge => "a section is too large".into(),
        pem::Error::Io(e) => e.to_string(),
        _ => "it cannot be read as PEM".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_and_non_pem_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let e = read(&cert, &key).unwrap_err().to_string();
        assert!(e.starts_with("server.tls.cert: cannot read `"), "{e}");
        assert!(e.contains("c.pem"), "{e}");
        std::fs::write(&cert, "not pem at all\n").unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nsecret-ish\n").unwrap();
        let e = read(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("holds no `-----BEGIN CERTIFICATE-----`"), "{e}");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = read(&cert, &key).unwrap_err().to_string();
        assert!(e.starts_with("server.tls.key: `"), "{e}");
        assert!(e.contains("k.pem"), "{e}");
        assert!(!e.contains("secret-ish"), "{e}");
    }
}
