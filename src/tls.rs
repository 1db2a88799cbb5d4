//! TLS facts shared by the inbound and outbound sides (floor 1): what a connection negotiated
//! ([`TlsInfo`], for Received headers and the delivery log) and the trusted CA roots
//! ([`load_roots`]) of verified outbound TLS and https:// webhooks.

use std::io;
use std::path::Path;

use rustls::RootCertStore;

/// The usual system bundle of trusted CAs (Debian/Ubuntu/Alpine path), for [`load_roots`].
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// TLS parameters of a connection, for Received headers and the delivery log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

impl TlsInfo {
    /// The negotiated version (e.g. `TLSv1.3`) and cipher suite of an inbound or outbound
    /// rustls connection.
    pub fn of<D>(conn: &rustls::ConnectionCommon<D>) -> TlsInfo {
        TlsInfo {
            version: conn
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("TLS")
                .replace('_', "."),
            cipher: conn
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .unwrap_or("unknown")
                .to_string(),
        }
    }
}

/// Loads a PEM bundle of trusted CAs (e.g. [`SYSTEM_ROOTS`]) for `TlsPolicy::Required`.
pub fn load_roots(path: &Path) -> io::Result<RootCertStore> {
    let pem = std::fs::read(path)?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        // A bundle may hold certificates webpki cannot use; one bad entry must not cost the
        // others.
        let _ = roots.add(cert?);
    }
    if roots.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no usable CA certificate in {}", path.display()),
        ));
    }
    Ok(roots)
}
