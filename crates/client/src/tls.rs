//! [`Tls`]: which servers a [`Client`](crate::Client) trusts over `https://` and `wss://`.
//!
//! The platform's root certificates (as `reqwest` uses them, through
//! `rustls-platform-verifier`), plus the CA certificates of a PEM file for a server whose
//! certificate is self-signed or signed by a private CA. REST calls (reqwest) and
//! subscriptions (tungstenite) verify with the same roots.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::{Error, Result};

/// The environment variables [`Tls::from_env`] reads, in order: a PEM file of CA
/// certificates to trust besides the platform's.
pub const CA_CERT_VARS: [&str; 2] = ["DROVER_CA_CERT", "CATTLE_CA_CERT"];

/// Which servers a client trusts: the platform's roots, plus extra CA certificates.
/// Cheap to clone.
#[derive(Clone, Default)]
pub struct Tls {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Extra trusted CA certificates.
    ca: Vec<CertificateDer<'static>>,
    /// The file they came from, for messages.
    source: Option<PathBuf>,
    /// The WebSocket connector's configuration, made on the first `wss://` subscription.
    websocket: OnceLock<std::result::Result<Arc<rustls::ClientConfig>, String>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("extra_cas", &self.inner.ca.len())
            .field("source", &self.inner.source)
            .finish()
    }
}

impl Tls {
    /// The platform's roots only.
    pub fn system() -> Tls {
        Tls::default()
    }

    /// The platform's roots and the CA certificates in the PEM file at `path` (a
    /// self-signed server certificate works too: it is its own CA).
    pub fn with_ca_file(path: impl AsRef<Path>) -> Result<Tls> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|error| {
            Error::Invalid(format!("CA certificate file {}: {error}", path.display()))
        })?;
        let mut tls = Tls::parse(&bytes, &path.display().to_string())?;
        Arc::get_mut(&mut tls.inner).expect("not shared yet").source = Some(path.to_owned());
        Ok(tls)
    }

    /// The platform's roots and the CA certificates in `pem`.
    pub fn with_ca_pem(pem: &[u8]) -> Result<Tls> {
        Tls::parse(pem, "CA certificate PEM")
    }

    fn parse(pem: &[u8], what: &str) -> Result<Tls> {
        let ca = CertificateDer::pem_slice_iter(pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|error| Error::Invalid(format!("{what}: not valid PEM: {error}")))?;
        if ca.is_empty() {
            return Err(Error::Invalid(format!(
                "{what}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)"
            )));
        }
        // Each must be usable as a trust anchor; say so now rather than at the first call.
        let mut roots = rustls::RootCertStore::empty();
        for cert in &ca {
            roots.add(cert.clone()).map_err(|error| {
                Error::Invalid(format!("{what}: a certificate cannot be trusted: {error}"))
            })?;
        }
        Ok(Tls {
            inner: Arc::new(Inner {
                ca,
                ..Inner::default()
            }),
        })
    }

    /// The file named by `DROVER_CA_CERT` (else `CATTLE_CA_CERT`) if one is set, else the
    /// platform's roots only.
    pub fn from_env() -> Result<Tls> {
        for var in CA_CERT_VARS {
            if let Ok(path) = std::env::var(var)
                && !path.trim().is_empty()
            {
                return Tls::with_ca_file(path.trim())
                    .map_err(|error| Error::Invalid(format!("{var}: {error}")));
            }
        }
        Ok(Tls::system())
    }

    /// Whether extra CA certificates are trusted.
    pub fn has_extra_ca(&self) -> bool {
        !self.inner.ca.is_empty()
    }

    /// The HTTP client that trusts these roots.
    pub(crate) fn http_client(&self) -> Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(60));
        if self.has_extra_ca() {
            let certs = self
                .inner
                .ca
                .iter()
                .map(|cert| reqwest::Certificate::from_der(cert))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            builder = builder.tls_certs_merge(certs);
        }
        Ok(builder.build()?)
    }

    /// The rustls configuration of `wss://` connections: the same roots as REST calls.
    pub fn websocket_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        self.inner
            .websocket
            .get_or_init(|| {
                let provider = rustls::crypto::CryptoProvider::get_default()
                    .cloned()
                    .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
                let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
                    self.inner.ca.iter().cloned(),
                    provider.clone(),
                )
                .map_err(|error| format!("TLS roots: {error}"))?;
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|error| error.to_string())?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth();
                Ok(Arc::new(config))
            })
            .clone()
            .map_err(Error::Invalid)
    }
}

/// The TLS failure inside an error, if there is one: the rustls error somewhere in its chain
/// of sources (also inside an `io::Error`, where tokio-rustls puts it).
pub(crate) fn rustls_cause<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    let mut depth = 0;
    while let Some(error) = next
        && depth < 16
    {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        // An `io::Error`'s `source` skips the error it wraps: look inside it instead (it may
        // wrap another `io::Error`, as reqwest's connector does).
        next = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as _),
            None => error.source(),
        };
        depth += 1;
    }
    None
}

/// A one-line message for a failed TLS handshake with `server`, saying what to do.
pub(crate) fn describe(server: &str, error: &rustls::Error) -> String {
    use rustls::CertificateError as Cert;
    match error {
        rustls::Error::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        ) => {
            format!(
                "{server}: the server's certificate is not valid for this host name ({error}); \
                 use a URL with a name the certificate lists"
            )
        }
        // webpki's, inside `Other`: a self-signed certificate made as a CA (`openssl req -x509`
        // adds `CA:TRUE` unless told otherwise) cannot be a server's own.
        rustls::Error::InvalidCertificate(Cert::Other(other))
            if other.to_string().contains("CaUsedAsEndEntity") =>
        {
            format!(
                "{server}: the server's certificate is a CA certificate ({error}), which TLS \
                 clients refuse as a server's own; make it with basicConstraints CA:FALSE (for \
                 openssl req -x509: -addext basicConstraints=critical,CA:FALSE), or sign it \
                 with a CA and trust that CA"
            )
        }
        rustls::Error::InvalidCertificate(
            Cert::Expired
            | Cert::ExpiredContext { .. }
            | Cert::NotValidYet
            | Cert::NotValidYetContext { .. },
        ) => format!(
            "{server}: the server's certificate is expired or not yet valid ({error}); check \
             the server's certificate and this machine's clock"
        ),
        // Whatever else went wrong building a path to a trusted root (an unknown issuer, or
        // a root of the platform that only looks like the issuer): not trusted.
        rustls::Error::InvalidCertificate(_) => format!(
            "{server}: the server's certificate is not trusted ({error}); trust the CA that \
             signed it (or a self-signed certificate itself) with --ca-cert FILE or \
             DROVER_CA_CERT=FILE"
        ),
        rustls::Error::InvalidMessage(_) => format!(
            "{server}: TLS handshake failed ({error}); is the server serving plain http? then \
             use an http:// URL"
        ),
        _ => format!("{server}: TLS handshake failed: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_files_are_refused_with_the_file_named() {
        let missing = Tls::with_ca_file("/nonexistent/ca.pem").unwrap_err();
        assert!(
            matches!(&missing, Error::Invalid(message) if message.contains("/nonexistent/ca.pem")),
            "{missing}"
        );
        let junk = Tls::with_ca_pem(b"not a certificate\n").unwrap_err();
        assert!(
            matches!(&junk, Error::Invalid(message) if message.contains("no PEM certificate")),
            "{junk}"
        );
        assert!(!Tls::system().has_extra_ca());
    }
}
