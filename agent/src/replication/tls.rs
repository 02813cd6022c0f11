//! Mutual TLS for agent↔agent traffic: every connection presents a certificate
//! signed by the site CA, and the replica reads the primary's DNS names from it.

use std::{fs, io, path::Path};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// An agent's certificate, key and the CA it trusts, PEM.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl TlsMaterial {
    /// Reads `tls.crt`, `tls.key` and `ca.crt` from a directory (a mounted Secret).
    pub fn from_dir(dir: &Path) -> io::Result<Self> {
        let read = |f: &str| {
            fs::read_to_string(dir.join(f))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(f).display())))
        };
        Ok(Self { cert_pem: read("tls.crt")?, key_pem: read("tls.key")?, ca_pem: read("ca.crt")? })
    }

    /// Server side: requires a client certificate signed by the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
    }

    /// Client side: verifies the server as `server_name` and presents our certificate.
    pub fn client(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(server_name)
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
