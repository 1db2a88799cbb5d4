//! Certificate checking for DANE (RFC 7672 3, RFC 7671): a rustls verifier that accepts a
//! server only if its certificate chain matches one of the host's usable TLSA records.
//!
//! - DANE-EE(3): the end-entity certificate (selector 0) or its SubjectPublicKeyInfo
//!   (selector 1), exactly (matching 0) or by SHA-256/SHA-512 (1/2), matches the record.
//!   Names, validity dates and issuers are not checked (RFC 7672 3.1.1).
//! - DANE-TA(2): a certificate the server presented (an issuer, not the end entity) matches
//!   the record; the chain must then validate from that certificate as the only trust
//!   anchor, and the end-entity certificate must be valid for the host name the session is
//!   for (the TLSA base domain, RFC 7672 3.2.2).
//!
//! Invariant: the handshake's signatures are always checked (with the same provider as every
//! other TLS client of tern); only what makes a certificate acceptable differs.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::routing::dane::{TlsaRecord, TlsaSet};

/// What the error of a certificate that matches no record says; the worker maps it to
/// TLS-RPT's `tlsa-invalid`.
pub const NO_MATCH: &str = "certificate matches no TLSA record";

/// A TLS client for one DANE host: its certificate must match `tlsa`.
pub fn connector(tlsa: Arc<TlsaSet>) -> TlsConnector {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DaneVerifier { tlsa, provider }))
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[derive(Debug)]
struct DaneVerifier {
    tlsa: Arc<TlsaSet>,
    provider: Arc<CryptoProvider>,
}

/// [`NO_MATCH`] as a rustls certificate error.
struct NoMatch;

impl fmt::Debug for NoMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NO_MATCH)
    }
}

impl fmt::Display for NoMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NO_MATCH)
    }
}

impl std::error::Error for NoMatch {}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let records = &self.tlsa.usable;
        if records
            .iter()
            .any(|r| r.usage == 3 && matches(r, end_entity))
        {
            return Ok(ServerCertVerified::assertion());
        }
        let mut last_error = None;
        for anchor in intermediates {
            if !records.iter().any(|r| r.usage == 2 && matches(r, anchor)) {
                continue;
            }
            let mut roots = RootCertStore::empty();
            if roots.add(anchor.clone()).is_err() {
                continue;
            }
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            match verifier.verify_server_cert(end_entity, intermediates, server_name, &[], now) {
                Ok(verified) => return Ok(verified),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                NoMatch,
            ))))
        }))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether `cert` matches `record` (selector and matching type as RFC 6698 2.1.2/2.1.3).
pub fn matches(record: &TlsaRecord, cert: &CertificateDer<'_>) -> bool {
    let spki;
    let selected: &[u8] = match record.selector {
        0 => cert.as_ref(),
        1 => match webpki::anchor_from_trusted_cert(cert) {
            Ok(anchor) => {
                spki = webpki::spki_for_anchor(&anchor);
                spki.as_ref()
            }
            Err(_) => return false,
        },
        _ => return false,
    };
    match record.matching {
        0 => selected == record.data.as_slice(),
        1 => {
            ::aws_lc_rs::digest::digest(&::aws_lc_rs::digest::SHA256, selected).as_ref()
                == record.data.as_slice()
        }
        2 => {
            ::aws_lc_rs::digest::digest(&::aws_lc_rs::digest::SHA512, selected).as_ref()
                == record.data.as_slice()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(selector: u8, matching: u8, data: Vec<u8>) -> TlsaRecord {
        TlsaRecord {
            usage: 3,
            selector,
            matching,
            data,
        }
    }

    #[test]
    fn records_match_by_selector_and_matching_type_only() {
        let made = rcgen::generate_simple_self_signed(vec!["mx.test".to_owned()]).unwrap();
        let cert = made.cert.der().clone();
        // rcgen's own encoding of the public key, not webpki's parse of the certificate.
        let spki = made.key_pair.public_key_der();
        let sha256 = |d: &[u8]| {
            ::aws_lc_rs::digest::digest(&::aws_lc_rs::digest::SHA256, d)
                .as_ref()
                .to_vec()
        };
        let sha512 = |d: &[u8]| {
            ::aws_lc_rs::digest::digest(&::aws_lc_rs::digest::SHA512, d)
                .as_ref()
                .to_vec()
        };
        assert!(matches(&record(0, 0, cert.to_vec()), &cert));
        assert!(matches(&record(0, 1, sha256(&cert)), &cert));
        assert!(matches(&record(1, 0, spki.clone()), &cert));
        assert!(matches(&record(1, 1, sha256(&spki)), &cert));
        assert!(matches(&record(1, 2, sha512(&spki)), &cert));
        // The right digest under the wrong selector or type, or one byte off: no match.
        assert!(!matches(&record(0, 1, sha256(&spki)), &cert));
        assert!(!matches(&record(1, 2, sha256(&spki)), &cert));
        let mut off = sha256(&spki);
        off[31] ^= 1;
        assert!(!matches(&record(1, 1, off), &cert));
        assert!(
            !matches(&record(2, 1, sha256(&spki)), &cert),
            "unknown selector"
        );
        assert!(
            !matches(&record(1, 3, sha256(&spki)), &cert),
            "unknown matching type"
        );
        // Not a certificate: nothing matches its "public key".
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(!matches(&record(1, 0, Vec::new()), &junk));
    }
}
