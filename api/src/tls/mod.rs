//! Mutual TLS for every connection (controller → agent, agent ↔ agent): each
//! side presents a certificate signed by a CA the other trusts, and the
//! server reads the client's DNS names from it. When a handshake fails on a
//! certificate, [`tls_failure`] and [`diagnose`] say which side refused and why.
//! The material may change while a process runs ([`live`]); connections use
//! it through [`transport`].

pub mod live;
pub mod transport;

use std::{fs, io, path::Path, sync::Arc};

pub use live::{CertSummary, LiveTls, TlsError};
use tonic::transport::Channel;
pub use transport::{ChannelError, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, channel, incoming};

/// An agent's certificate, key and the CA it trusts, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl TlsMaterial {
    /// Reads `tls.crt`, `tls.key` and `ca.crt` from a directory (a mounted
    /// Secret), without checking them ([`LiveTls::new`] does).
    pub fn from_dir(dir: &Path) -> io::Result<Self> {
        let read = |f: &str| {
            fs::read_to_string(dir.join(f))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(f).display())))
        };
        Ok(Self { cert_pem: read("tls.crt")?, key_pem: read("tls.key")?, ca_pem: read("ca.crt")? })
    }
}

/// The key stays out of logs.
impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").field("cert_bytes", &self.cert_pem.len()).finish_non_exhaustive()
    }
}

/// The DNS names (subjectAltName dNSName entries) of a DER certificate, lower case.
pub fn dns_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Which side of a TLS handshake refused the other's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The server refused the certificate this agent presented.
    TheyRefusedUs,
    /// This agent refused the server's certificate.
    WeRefusedThem,
}

/// What went wrong in a TLS handshake, when a certificate was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFailure {
    pub refusal: Refusal,
    /// rustls's name for it (`UnknownCA`, `UnknownIssuer`, `CertificateExpired`, ...).
    pub reason: String,
}

impl TlsFailure {
    /// What an operator reads: which side refused, why, and what to change.
    pub fn explain(&self, server: &str) -> String {
        match self.refusal {
            Refusal::TheyRefusedUs => format!(
                "TLS: the server {server} refused this agent's certificate ({}): it does not trust the CA \
                 that signed it, or the certificate is expired or not for client use; give that site this \
                 site's CA (its ca.crt) or issue this agent's certificate from a CA it trusts",
                self.reason
            ),
            Refusal::WeRefusedThem => format!(
                "TLS: this agent refused the certificate of {server} ({}): it is not signed by the CA in this \
                 agent's ca.crt, is expired, or does not name {server}; add that site's CA to ca.crt or fix \
                 the server name",
                self.reason
            ),
        }
    }
}

/// Finds a certificate refusal in an error's chain of sources: an alert the
/// server sent (it refused us) or a certificate error of ours.
pub fn tls_failure(err: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let rustls_err = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref())
        });
        if let Some(r) = rustls_err {
            return classify(r);
        }
        next = e.source();
    }
    None
}

fn classify(e: &rustls::Error) -> Option<TlsFailure> {
    use rustls::Error as E;
    let (refusal, reason) = match e {
        E::AlertReceived(a) => (Refusal::TheyRefusedUs, format!("{a:?}")),
        E::InvalidCertificate(c) => (Refusal::WeRefusedThem, format!("{c:?}")),
        E::NoCertificatesPresented => (Refusal::WeRefusedThem, "no certificate presented".into()),
        _ => return None,
    };
    Some(TlsFailure { refusal, reason })
}

/// After a connection to `addr` broke for no reason the RPC layer could see:
/// a handshake made by hand, and one read, which in TLS 1.3 is where a
/// server's refusal of the client certificate arrives. `None` when the
/// handshake and the read go through (the failure was something else).
pub async fn diagnose(addr: &str, server_name: &str, tls: &LiveTls) -> Option<TlsFailure> {
    use tokio::io::AsyncReadExt;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).ok()?;
    let connector = tokio_rustls::TlsConnector::from(tls.client_config());
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut stream = match connector.connect(name, tcp).await {
            Ok(s) => s,
            Err(e) => return tls_failure(&e),
        };
        let mut b = [0u8; 1];
        match tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut b)).await {
            Ok(Err(e)) => tls_failure(&e),
            _ => None,
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), attempt).await.ok().flatten()
}

/// Where a channel leads, kept for telling a refused certificate from a
/// broken connection when a call fails ([`diagnose`]).
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: String,
    pub server_name: String,
    pub tls: Arc<LiveTls>,
}

impl Peer {
    /// A lazily connecting channel to this peer: a connection of its own.
    /// Give each disk's shipper its own: a replica that makes a stream wait
    /// for a transfer slot stops reading it, and on a shared HTTP/2
    /// connection the unread data would fill the connection's flow-control
    /// window and stall the stream holding the slot (a deadlock seen with
    /// maxActiveTransfers 1 and a three-disk VM).
    pub fn channel(&self) -> Result<Channel, ChannelError> {
        channel(&self.addr, &self.server_name, &self.tls)
    }
}
