//! HTTPS and WSS: the server's certificate chain and private key (PEM files) loaded into a
//! rustls server configuration on the `ring` provider, as the rest of the workspace uses.
//! `lib.rs::serve` runs the handshake on each accepted connection before HTTP.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The PEM files a server serves TLS with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (`--tls-cert`).
    pub cert: PathBuf,
    /// The private key of the leaf certificate: PKCS#8, PKCS#1 (RSA) or SEC1 (EC)
    /// (`--tls-key`).
    pub key: PathBuf,
}

/// Why the TLS files could not be used; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("TLS {what} {path}: {source}")]
    Read {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file was read but holds no usable PEM item of its kind.
    #[error("TLS {what} {path}: {message}")]
    Invalid {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The key does not belong to the certificate, or rustls refused the pair.
    #[error("TLS key {key} does not fit certificate {cert}: {message}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        message: String,
    },
}

impl TlsFiles {
    /// Reads both files and builds the server configuration (HTTP/1.1 over TLS 1.2 or 1.3).
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let chain = read_certs(&self.cert)?;
        let key = read_key(&self.key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                message: error.to_string(),
            })?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|error| TlsError::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                message: error.to_string(),
            })?;
        // The server speaks HTTP/1.1 only (WebSocket upgrades need it).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read("certificate", path)?;
    let invalid = |message: String| TlsError::Invalid {
        what: "certificate",
        path: path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(format!("not valid PEM: {error}")))?;
    if chain.is_empty() {
        return Err(invalid(
            "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| TlsError::Invalid {
        what: "key",
        path: path.to_owned(),
        message: match error {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key in it (expected -----BEGIN PRIVATE KEY-----, \
                 RSA PRIVATE KEY or EC PRIVATE KEY)"
                    .into()
            }
            error => format!("not valid PEM: {error}"),
        },
    })
}
