//! Loading the `[tls]` certificate and key into a rustls `ServerConfig`.
//!
//! `check_files` and `tls_server_config` share one code path, so `check-config` accepts exactly
//! what startup accepts. Errors name the config key (`tls.cert`, `tls.key`) and the file.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{InconsistentKeys, ServerConfig};

use super::{describe_io, Config, ConfigErrors};

impl Config {
    /// Checks the files the config names (TLS certificate and key): they exist, parse, and the
    /// key is usable by rustls and belongs to the certificate. Run by `check-config` and at startup.
    /// Every secret file's mode is checked too ([`Config::check_secret_files`]); all errors
    /// are reported together.
    pub fn check_files(&self) -> Result<(), ConfigErrors> {
        let mut errors = self
            .check_secret_files()
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        if let Err(e) = self.tls_server_config() {
            errors.extend(e.0);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The rustls server config (aws-lc-rs, TLS 1.2 and 1.3) for STARTTLS and `smtps`
    /// listeners, or `None` without a `[tls]` section.
    pub fn tls_server_config(&self) -> Result<Option<Arc<ServerConfig>>, ConfigErrors> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let (cert, key) = (&tls.cert_path, &tls.key_path);
        let fail = |key_name: &str, file: &Path, msg: String| {
            ConfigErrors(vec![format!("{key_name}: {}: {msg}", file.display())])
        };

        // Both files are read before either error is returned, so both get reported.
        let certs = read_certs(cert).map_err(|e| fail("tls.cert", cert, e));
        let private_key = read_key(key).map_err(|e| fail("tls.key", key, e));
        let (certs, private_key) = match (certs, private_key) {
            (Ok(c), Ok(k)) => (c, k),
            (c, k) => {
                let errors = [c.err(), k.err()]
                    .into_iter()
                    .flatten()
                    .flat_map(|e| e.0)
                    .collect();
                return Err(ConfigErrors(errors));
            }
        };

        let provider = Arc::new(aws_lc_rs::default_provider());
        let signing_key = provider
            .key_provider
            .load_private_key(private_key)
            .map_err(|e| fail("tls.key", key, format!("unusable private key: {e}")))?;
        let certified = CertifiedKey::new(certs, signing_key);
        match certified.keys_match() {
            // Unknown: the key type cannot report its public key; rustls accepts that too.
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                let msg = format!(
                    "private key does not belong to the certificate in {}",
                    cert.display()
                );
                return Err(fail("tls.key", key, msg));
            }
            Err(e) => return Err(fail("tls.cert", cert, format!("invalid certificate: {e}"))),
        }

        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ConfigErrors(vec![format!("tls: {e}")]))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        Ok(Some(Arc::new(config)))
    }
}

fn open(path: &Path) -> Result<BufReader<File>, String> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| describe_io(&e))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks)".to_owned());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|e| format!("invalid PEM: {e}"))?
        .ok_or_else(|| "no private key found (expected a PEM PRIVATE KEY block)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `content` readable by the owner only (as a key file must be; the certificate
    /// too, as tests swap the two).
    fn write_private(path: &Path, content: &str) {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .unwrap();
        f.write_all(content.as_bytes()).unwrap();
    }

    fn config_with_tls(cert: &Path, key: &Path) -> Config {
        let text = format!(
            "server.hostname = \"mx.test\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string(),
        );
        Config::parse(&text).unwrap()
    }

    #[test]
    fn no_tls_section() {
        let config = Config::parse(
            "server.hostname = \"mx.test\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n",
        )
        .unwrap();
        assert!(config.check_files().is_ok());
        assert!(config.tls_server_config().unwrap().is_none());
    }

    #[test]
    fn missing_files_are_named_by_key() {
        let config = config_with_tls(
            Path::new("/nonexistent/cert.pem"),
            Path::new("/nonexistent/key.pem"),
        );
        let errors = config.check_files().unwrap_err();
        assert_eq!(
            errors.0,
            [
                "tls.cert: /nonexistent/cert.pem: no such file",
                "tls.key: /nonexistent/key.pem: no such file"
            ]
        );
    }

    #[test]
    fn generated_certificate_loads() {
        let dir = tempfile::tempdir().unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["mx.test".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        write_private(&cert, &generated.cert.pem());
        write_private(&key, &generated.key_pair.serialize_pem());

        let config = config_with_tls(&cert, &key);
        config.check_files().unwrap();
        assert!(config.tls_server_config().unwrap().is_some());

        // Each file in the other's place: neither contains what it should.
        let errors = config_with_tls(&key, &cert).check_files().unwrap_err();
        assert_eq!(errors.0.len(), 2, "{errors}");
        assert!(
            errors.0[0].starts_with("tls.cert: ")
                && errors.0[0]
                    .ends_with("no certificate found (expected PEM \"BEGIN CERTIFICATE\" blocks)")
        );
        assert!(
            errors.0[1].starts_with("tls.key: ") && errors.0[1].contains("no private key found")
        );

        let other = rcgen::generate_simple_self_signed(vec!["other.test".to_owned()]).unwrap();
        let other_key = dir.path().join("other-key.pem");
        write_private(&other_key, &other.key_pair.serialize_pem());
        let errors = config_with_tls(&cert, &other_key)
            .check_files()
            .unwrap_err();
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert!(
            errors.0[0].contains("private key does not belong to the certificate"),
            "{errors}"
        );
    }
}
