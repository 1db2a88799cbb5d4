//! `tern dkim ...`: `keygen`, a new signing key written to a file of its own (never over an
//! existing one) and the DNS TXT record that publishes it.

use super::EX_USAGE;
use crate::dkim::{generate_key, zone_record, KeyAlgorithm, KeyError};
use clap::Subcommand;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum DkimCommand {
    /// Generate a signing key (PKCS#8 PEM, mode 0600; an existing file is never overwritten)
    /// and print the DNS TXT record that publishes it.
    Keygen {
        /// The signing domain (d=), e.g. example.com.
        #[arg(long)]
        domain: String,
        /// The selector (s=): the key's DNS name is SELECTOR._domainkey.DOMAIN.
        #[arg(long)]
        selector: String,
        /// ed25519 (small, fast; not every verifier has it) or rsa.
        #[arg(long, value_enum)]
        algorithm: DkimKeyAlgorithm,
        /// RSA key size: 2048, 3072, 4096 or 8192 (ignored for Ed25519).
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Where to write the private key. Default `./DOMAIN.SELECTOR.pem`.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DkimKeyAlgorithm {
    Ed25519,
    Rsa,
}

pub fn run(command: DkimCommand) -> ExitCode {
    match command {
        DkimCommand::Keygen {
            domain,
            selector,
            algorithm,
            bits,
            out,
        } => keygen(&domain, &selector, algorithm, bits, out),
    }
}

/// `tern dkim keygen`: the key goes to a new file readable only by its owner, the record to
/// stdout (so it can be piped), everything else to stderr.
fn keygen(
    domain: &str,
    selector: &str,
    algorithm: DkimKeyAlgorithm,
    bits: usize,
    out: Option<PathBuf>,
) -> ExitCode {
    // Both names end up in a DNS name and in the default file name.
    let dns_name = |name: &str| {
        name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
    };
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    for (what, name) in [("domain", domain.as_str()), ("selector", selector)] {
        if !dns_name(name) {
            eprintln!("tern: invalid {what} {name:?}: letters, digits, '-' and '.' only");
            return ExitCode::from(EX_USAGE);
        }
    }
    let algorithm = match algorithm {
        DkimKeyAlgorithm::Ed25519 => KeyAlgorithm::Ed25519,
        DkimKeyAlgorithm::Rsa => KeyAlgorithm::Rsa { bits },
    };
    let key = match generate_key(algorithm) {
        Ok(key) => key,
        Err(err) => {
            eprintln!("tern: {err}");
            return match err {
                KeyError::RsaKeySize(_) => ExitCode::from(EX_USAGE),
                _ => ExitCode::FAILURE,
            };
        }
    };
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{domain}.{selector}.pem")));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| {
            file.write_all(key.private_key_pem.as_bytes())
                .and_then(|()| file.sync_all())
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&path);
                })
        });
    if let Err(err) = written {
        let why = match err.kind() {
            std::io::ErrorKind::AlreadyExists => "already exists, not overwritten".to_owned(),
            _ => err.to_string(),
        };
        eprintln!("tern: {}: {why}", path.display());
        return ExitCode::FAILURE;
    }
    eprintln!(
        "tern: private key written to {} (mode 0600); publish this DNS record:",
        path.display()
    );
    println!("{}", zone_record(&domain, selector, &key.txt_value));
    ExitCode::SUCCESS
}
