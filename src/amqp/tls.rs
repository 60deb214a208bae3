//! TLS settings of broker connections, turned into a rustls client configuration once per
//! agent (reading certificate files is start-up work, never per connection).
//!
//! rustls with the `ring` provider (docs/decisions/0015-tls-with-rustls-and-ring.md): pure
//! Rust above a small, audited C/assembly core that builds with nothing but a C compiler,
//! AES-GCM with AES-NI, and no OpenSSL to match across machines. The server certificate is
//! verified by default against `--tls-ca` (or the URL's `cacertfile`), else the system's
//! roots (`SSL_CERT_FILE`, or Debian's bundle). `--tls-cert`/`--tls-key` present a client
//! certificate (RabbitMQ's EXTERNAL login). Turning verification off takes an explicit
//! `--tls-insecure` or `verify=verify_none` and warns once per process.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::url::{BrokerUrl, ServerNameIndication, Verify};

/// Where Debian and its relatives keep the system's trusted roots.
const SYSTEM_BUNDLES: [&str; 3] = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// TLS options from the command line; a URL's query parameters override them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Skip verification of the server's certificate.
    pub insecure: bool,
}

/// What is wrong with the TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} holds no {what} in PEM form")]
    Empty { what: &'static str, path: PathBuf },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("a client certificate needs its key: give --tls-key (or keyfile=) with --tls-cert (or certfile=)")]
    CertWithoutKey,
    #[error("no trusted roots: give --tls-ca FILE (the CA that signed the broker's certificate)")]
    NoRoots,
    #[error("{0:?} is not a valid TLS server name")]
    BadServerName(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Everything a TLS connection to one URL needs.
#[derive(Clone, Debug)]
pub struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    /// A client certificate is presented (the login may be EXTERNAL).
    pub has_client_cert: bool,
}

static INSECURE_WARNED: AtomicBool = AtomicBool::new(false);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS client for `url` (which must be `amqps://`) with `options` under its query.
pub fn client_for(url: &BrokerUrl, options: &TlsOptions) -> Result<TlsClient, TlsError> {
    let q = &url.query;
    let ca = q.cacertfile.clone().or_else(|| options.ca.clone());
    let cert = q.certfile.clone().or_else(|| options.cert.clone());
    let key = q.keyfile.clone().or_else(|| options.key.clone());
    let verify = q.verify.unwrap_or(if options.insecure { Verify::None } else { Verify::Peer });
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match verify {
        Verify::Peer => builder.with_root_certificates(roots(ca.as_deref())?),
        Verify::None => {
            if !INSECURE_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(broker = %url.authority(), "TLS certificate verification is OFF (--tls-insecure / verify=verify_none): anyone on the path can pose as the broker");
            }
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
        }
    };
    let mut config = match (&cert, &key) {
        (Some(c), Some(k)) => builder.with_client_auth_cert(certificates(c)?, private_key(k)?).map_err(|e| TlsError::Bad { path: c.clone(), reason: e.to_string() })?,
        (Some(_), None) => return Err(TlsError::CertWithoutKey),
        (None, _) => builder.with_no_client_auth(),
    };
    let name = match &q.server_name_indication {
        Some(ServerNameIndication::Name(n)) => n.clone(),
        Some(ServerNameIndication::Disable) => {
            config.enable_sni = false;
            url.host.clone()
        }
        None => url.host.clone(),
    };
    let server_name = ServerName::try_from(name.clone()).map_err(|_| TlsError::BadServerName(name))?;
    Ok(TlsClient { config: Arc::new(config), server_name, has_client_cert: cert.is_some() })
}

fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let path = match ca {
        Some(p) => p.to_owned(),
        None => match std::env::var_os("SSL_CERT_FILE") {
            Some(p) => PathBuf::from(p),
            None => SYSTEM_BUNDLES.iter().map(PathBuf::from).find(|p| p.exists()).ok_or(TlsError::NoRoots)?,
        },
    };
    let (added, _ignored) = store.add_parsable_certificates(certificates(&path)?);
    if added == 0 {
        return Err(TlsError::Empty { what: "usable CA certificate", path });
    }
    Ok(store)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |e: rustls::pki_types::pem::Error| match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Read { what: "certificate file", path: path.to_owned(), source },
        other => TlsError::Bad { path: path.to_owned(), reason: other.to_string() },
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path).map_err(read_err)?.collect::<Result<_, _>>().map_err(read_err)?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what: "certificate", path: path.to_owned() });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Read { what: "key file", path: path.to_owned(), source },
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty { what: "private key", path: path.to_owned() },
        other => TlsError::Bad { path: path.to_owned(), reason: other.to_string() },
    })
}

/// Accepts any server certificate (still checking the handshake's signatures, so the
/// session keys belong to whoever holds that certificate's key).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let url: BrokerUrl = "amqps://b/".parse().unwrap();
        let opts = TlsOptions { ca: Some("/nonexistent/ca.pem".into()), ..TlsOptions::default() };
        let e = client_for(&url, &opts).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("tunbus-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client_for(&url, &TlsOptions { ca: Some(empty.clone()), ..TlsOptions::default() }).unwrap_err().to_string();
        assert!(e.contains("empty.pem") && e.contains("no certificate"), "{e}");
        let e = client_for(&url, &TlsOptions { cert: Some(empty), insecure: true, ..TlsOptions::default() }).unwrap_err();
        assert!(matches!(e, TlsError::CertWithoutKey), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn insecure_needs_no_roots_and_sni_can_be_named() {
        let url: BrokerUrl = "amqps://10.0.0.1/?server_name_indication=broker.example".parse().unwrap();
        let c = client_for(&url, &TlsOptions { insecure: true, ..TlsOptions::default() }).unwrap();
        assert_eq!(c.server_name, ServerName::try_from("broker.example").unwrap());
        assert!(!c.has_client_cert);
        let url: BrokerUrl = "amqps://127.0.0.1/?verify=verify_none".parse().unwrap();
        assert!(client_for(&url, &TlsOptions::default()).is_ok());
    }
}
