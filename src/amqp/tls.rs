//! TLS settings of broker connections, turned into a rustls client configuration once per
//! agent (reading certificate files is start-up work, never per connection).
//!
//! rustls with the `ring` provider (docs/decisions/0015-one-amqp-client-with-tls.md): pure
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
    #[error(
        "{path} is an X.509 version 1 certificate (one without extensions, what a bare `openssl x509 -req` makes): \
rustls, tunbus's TLS library, takes version 3 only (RabbitMQ would take it). Sign the request again with \
extensions: printf 'basicConstraints=CA:FALSE\\nkeyUsage=digitalSignature\\nextendedKeyUsage=clientAuth\\n' > client.ext; \
openssl x509 -req -in CLIENT.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 -out CLIENT.pem -extfile client.ext \
(or -extensions SECTION with -extfile openssl.cnf)"
    )]
    Version1 { path: PathBuf },
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
    /// The client certificate's subject common name: the broker user an EXTERNAL login
    /// becomes under RabbitMQ's `ssl_cert_login_from = common_name`.
    pub common_name: Option<String>,
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
    let mut common = None;
    let mut config = match (&cert, &key) {
        (Some(c), Some(k)) => {
            let chain = certificates(c)?;
            if chain.first().and_then(|der| x509_version(der)) == Some(1) {
                return Err(TlsError::Version1 { path: c.clone() });
            }
            common = chain.first().and_then(|der| common_name(der));
            builder.with_client_auth_cert(chain, private_key(k)?).map_err(|e| TlsError::Bad { path: c.clone(), reason: e.to_string() })?
        }
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
    Ok(TlsClient { config: Arc::new(config), server_name, has_client_cert: cert.is_some(), common_name: common })
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

/// One DER TLV: (tag, contents, rest); `None` when a length runs past the end.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (usize::from(first), b)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        (b[..n].iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x)), &b[n..])
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// The X.509 version of a DER certificate (1, 2 or 3); `None` when the bytes are not a
/// certificate. Version 1 has no `[0]` version field: its `tbsCertificate` starts with the
/// serial number.
pub fn x509_version(der: &[u8]) -> Option<u8> {
    let (0x30, cert, _) = tlv(der)? else { return None };
    let (0x30, tbs, _) = tlv(cert)? else { return None };
    match tlv(tbs)? {
        (0xa0, explicit, _) => match tlv(explicit)? {
            (0x02, [v], _) if *v < 3 => Some(v + 1),
            _ => None,
        },
        (0x02, _, _) => Some(1),
        _ => None,
    }
}

/// The X.509 version of the first certificate of a PEM file (`None`: not readable).
pub fn pem_file_version(path: &Path) -> Option<u8> {
    certificates(path).ok()?.first().and_then(|der| x509_version(der))
}

/// The subject common name of a DER certificate (`None` when it has none or the bytes are
/// not a certificate). A walk over the few DER structures on the way; every length is
/// checked.
fn common_name(der: &[u8]) -> Option<String> {
    let (0x30, cert, _) = tlv(der)? else { return None };
    let (0x30, mut tbs, _) = tlv(cert)? else { return None };
    let mut fields = Vec::with_capacity(6);
    while let Some((tag, body, rest)) = tlv(tbs) {
        fields.push((tag, body));
        tbs = rest;
    }
    // [0] version (optional), serial, signature, issuer, validity, subject.
    let skip = usize::from(fields.first()?.0 == 0xa0);
    let &(0x30, mut subject) = fields.get(skip + 4)? else { return None };
    while let Some((0x31, mut set, rest)) = tlv(subject) {
        while let Some((0x30, atv, more)) = tlv(set) {
            if let Some((0x06, oid, value)) = tlv(atv) {
                if oid == [0x55, 0x04, 0x03] {
                    let (_, text, _) = tlv(value)?;
                    return String::from_utf8(text.to_vec()).ok();
                }
            }
            set = more;
        }
        subject = rest;
    }
    None
}

/// Accepts any server certificate (still checking the handshake's signatures, so the
/// session keys belong to whoever holds that certificate's key).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
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
    fn the_common_name_comes_out_of_a_certificate() {
        // openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/O=tunbus/CN=lab.h1" -days 1
        let pem = "-----BEGIN CERTIFICATE-----
MIIBmDCCAT+gAwIBAgIUTnN/fWgLSiMhThnOyAqCLsrXy54wCgYIKoZIzj0EAwIw
IjEPMA0GA1UECgwGdHVuYnVzMQ8wDQYDVQQDDAZsYWIuaDEwHhcNMjYxMjAyMTUy
ODE5WhcNMjYxMjAzMTUyODE5WjAiMQ8wDQYDVQQKDAZ0dW5idXMxDzANBgNVBAMM
BmxhYi5oMTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABEiKzjEHANLQxrd+bKnZ
XWOIUBQ8E9i6McPUjXho5VsuXMRQd065f5JZvx0in2KrMNZ3u/HveZ7TIER9uMck
6NyjUzBRMB0GA1UdDgQWBBQVMZDuDD29d7OhbcBHoTmVjK1jhzAfBgNVHSMEGDAW
gBQVMZDuDD29d7OhbcBHoTmVjK1jhzAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49
BAMCA0cAMEQCIDsNDbbM7GjC3zlKE/KcfXy4Uvu81+b5ZQmv+4ZLZWkGAiB32/sL
zzUBTvtOU4fbwYIdzD108YMgVReCRKeybQA2fA==
-----END CERTIFICATE-----
";
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(common_name(&der).as_deref(), Some("lab.h1"));
        assert_eq!(x509_version(&der), Some(3));
        for cut in 0..der.len() {
            let _ = common_name(&der[..cut]); // never panics on a truncated certificate
        }
        assert_eq!(common_name(b"not a certificate"), None);
    }

    /// What `openssl x509 -req` makes without `-extfile`: version 1, which rustls refuses
    /// with `UnsupportedCertVersion`; the error says how to make a version 3 one.
    #[test]
    fn a_version_1_client_certificate_is_named_with_the_fix() {
        let v1 = "-----BEGIN CERTIFICATE-----
MIIBFDCBuwIUEuDwSgogW3ITeeKv6rlyAj3wN38wCgYIKoZIzj0EAwIwDTELMAkG
A1UEAwwCY2EwHhcNMjYxMjA3MDUyNDMzWhcNMjYxMjA5MDUyNDMzWjANMQswCQYD
VQQDDAJoMTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABB8Tde7htcaaX695s9j1
0o65yBRdifGrQRzktgR5s0aTdeNIozeXUkshQBYP/icqFw7m7nxxoNU74hBDXKV6
M3gwCgYIKoZIzj0EAwIDSAAwRQIgOI3N4BlFSY1Kx8cDGQKKlEiAeOBuW/SXaPzx
JL0UxbECIQDpi9m0GXf10ZCUkn7WU/I00GjWEKY/rvtSpdX7qKs/6g==
-----END CERTIFICATE-----
";
        let der = CertificateDer::from_pem_slice(v1.as_bytes()).unwrap();
        assert_eq!(x509_version(&der), Some(1));
        assert_eq!(common_name(&der).as_deref(), Some("h1"));
        for cut in 0..der.len() {
            let _ = x509_version(&der[..cut]);
        }
        let dir = std::env::temp_dir().join(format!("tunbus-tls-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("h1.pem"), dir.join("h1.key"));
        std::fs::write(&cert, v1).unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n").unwrap();
        let url: BrokerUrl = "amqps://b/".parse().unwrap();
        let e = client_for(&url, &TlsOptions { cert: Some(cert), key: Some(key), insecure: true, ..TlsOptions::default() }).unwrap_err().to_string();
        assert!(e.contains("version 1") && e.contains("-extfile client.ext") && e.contains("h1.pem"), "{e}");
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
