//! TLS material that may change while the process runs: a certificate
//! renewed in a mounted Secret (cert-manager rewrites the files) or pushed by
//! the controller (a ReplicationServer's `tlsSecretName`). Every connection
//! made or accepted uses the material current when its handshake starts;
//! connections already open keep theirs (TLS authenticates once per
//! connection), so a renewal needs no restart and breaks no transfer.
//!
//! ```text
//!  files (watch_dir) ─┐
//!  ConfigureSite ─────┴─▶ LiveTls::replace ── checked: PEM parses, key matches cert, CA usable
//!                              │ Arc<Loaded> { rustls server config, client config, summary }
//!          transport::incoming ◀┤ (acceptor per connection)
//!          transport::channel  ◀┘ (connector per connection)
//! ```
//! Material that fails the check is refused with the reason and the old
//! material stays in force.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
};

use super::TlsMaterial;

/// Why TLS material was refused. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Read(std::io::Error),
    #[error("{file}: no PEM certificate in it")]
    NoCertificate { file: &'static str },
    #[error("{file}: not valid PEM: {reason}")]
    Pem { file: &'static str, reason: String },
    #[error("tls.key: no PEM private key in it ({reason})")]
    NoKey { reason: String },
    #[error("tls.key does not belong to tls.crt, or is a key type rustls cannot use: {0}")]
    KeyMismatch(rustls::Error),
    #[error("ca.crt: a certificate rustls cannot use as a trust anchor: {0}")]
    BadCa(rustls::Error),
    #[error("ca.crt: {0}")]
    Verifier(String),
}

/// What a certificate in use is, for status and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertSummary {
    /// Serial number, hex.
    pub serial: String,
    /// End of validity, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// DNS names of the subjectAltName.
    pub dns_names: Vec<String>,
}

/// Checked material with the rustls configurations built from it.
struct Loaded {
    material: TlsMaterial,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    summary: CertSummary,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(file: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { file, reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { file });
    }
    Ok(certs)
}

fn summary(der: &[u8]) -> CertSummary {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return CertSummary::default() };
    CertSummary {
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_after_unix: cert.validity().not_after.timestamp(),
        dns_names: super::dns_names(der),
    }
}

impl Loaded {
    fn check(material: TlsMaterial) -> Result<Self, TlsError> {
        let provider = provider();
        let chain = certs("tls.crt", &material.cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes())
            .map_err(|e| TlsError::NoKey { reason: e.to_string() })?;
        let certified = CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
            .map_err(TlsError::KeyMismatch)?;
        let mut roots = RootCertStore::empty();
        for ca in certs("ca.crt", &material.ca_pem)? {
            roots.add(ca).map_err(TlsError::BadCa)?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let h2 = vec![b"h2".to_vec()];
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::KeyMismatch)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        server.alpn_protocols = h2.clone();
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::KeyMismatch)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain.clone(), key)
            .map_err(TlsError::KeyMismatch)?;
        client.alpn_protocols = h2;
        Ok(Self {
            summary: summary(chain[0].as_ref()),
            material,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// A process's current TLS material (see the module doc).
pub struct LiveTls {
    loaded: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls").field("certificate", &self.summary()).finish()
    }
}

impl LiveTls {
    /// Checks `material` and makes it current.
    pub fn new(material: TlsMaterial) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self { loaded: RwLock::new(Arc::new(Loaded::check(material)?)) }))
    }

    /// Reads `tls.crt`, `tls.key` and `ca.crt` from `dir` and checks them.
    pub fn from_dir(dir: &Path) -> Result<Arc<Self>, TlsError> {
        Self::new(read_dir(dir)?)
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes `material` current if it checks out; whether it differed from
    /// what was current. Refused material leaves the current one in force.
    pub fn replace(&self, material: TlsMaterial) -> Result<bool, TlsError> {
        if self.current().material == material {
            return Ok(false);
        }
        let next = Arc::new(Loaded::check(material)?);
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(true)
    }

    /// The PEM material in use.
    pub fn material(&self) -> TlsMaterial {
        self.current().material.clone()
    }

    /// The certificate in use.
    pub fn summary(&self) -> CertSummary {
        self.current().summary.clone()
    }

    /// The server configuration for a connection accepted now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// The client configuration for a connection made now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// Re-reads `dir` every `every` and makes what it holds current when it
    /// changed (a renewed Secret). A half-written or broken set is logged and
    /// ignored until the next look; the material in force stays. `also` is
    /// called with every material made current.
    pub fn watch_dir(
        self: &Arc<Self>,
        dir: PathBuf,
        every: Duration,
        also: impl Fn(&TlsMaterial) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let live = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(live) = live.upgrade() else { return };
                let read = read_dir(&dir);
                match read.and_then(|m| live.replace(m.clone()).map(|changed| (changed, m))) {
                    Ok((false, _)) => {}
                    Ok((true, m)) => {
                        let s = live.summary();
                        tracing::info!(dir = %dir.display(), serial = %s.serial, not_after = s.not_after_unix,
                            "TLS certificate reloaded");
                        also(&m);
                    }
                    Err(e) => tracing::warn!(dir = %dir.display(), error = %e,
                        "the TLS files changed but cannot be used; keeping the certificate in force"),
                }
            }
        })
    }
}

fn read_dir(dir: &Path) -> Result<TlsMaterial, TlsError> {
    TlsMaterial::from_dir(dir).map_err(TlsError::Read)
}
