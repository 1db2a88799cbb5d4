//! `tern dkim ...`: `keygen`, a new signing key written to a file of its own (never over an
//! existing one) and the DNS TXT record that publishes it; `check`, whether DNS publishes
//! each configured key (through the configured resolver, `delivery.nameservers`).

use super::EX_USAGE;
use crate::dkim::{generate_key, zone_record, KeyAlgorithm, KeyError, Published, Rotation};
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
    /// Look up each configured key's DNS record (`SELECTOR._domainkey.DOMAIN`) and compare it
    /// with the private key; exits 1 when a pending or active key is missing or differs (or
    /// a retired one's selector publishes another key).
    Check {
        /// Only the keys of this domain.
        #[arg(long)]
        domain: Option<String>,
        /// The daemon's config file. Default: $TERN_CONFIG, /etc/tern/tern.toml, then
        /// ./config/tern.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
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
        DkimCommand::Check { domain, config } => check(config.as_deref(), domain.as_deref()),
    }
}

/// `tern dkim check`: one line per key, `DOMAIN SELECTOR ROTATION RESULT`.
fn check(path: Option<&std::path::Path>, domain: Option<&str>) -> ExitCode {
    let config = match super::check_config::load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let keys: Vec<_> = config
        .dkim
        .iter()
        .filter(|k| domain.is_none_or(|d| k.domain.eq_ignore_ascii_case(d.trim_end_matches('.'))))
        .cloned()
        .collect();
    if keys.is_empty() {
        eprintln!(
            "tern: no [[dkim]] keys{}",
            domain.map(|d| format!(" for {d}")).unwrap_or_default()
        );
        return ExitCode::from(EX_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tern: {err}");
            return ExitCode::FAILURE;
        }
    };
    let checks = runtime.block_on(async {
        let resolver = crate::routing::dns::HickoryResolver::new(&config.delivery.nameservers)
            .map_err(|e| format!("delivery.nameservers: {e}"))?;
        let now = crate::clock::now_ms() / 1000;
        Ok::<_, String>(
            crate::dkim::check_published(&keys, now, |name| {
                let resolver = &resolver;
                async move { resolver.txt_records(&name).await }
            })
            .await,
        )
    });
    let checks = match checks {
        Ok(checks) => checks,
        Err(err) => {
            eprintln!("tern: {err}");
            return ExitCode::FAILURE;
        }
    };
    let width = checks
        .iter()
        .map(|c| c.domain.len() + c.selector.len() + 1)
        .max()
        .unwrap_or(0);
    for c in &checks {
        let rotation = match c.rotation {
            Rotation::Pending => "pending",
            Rotation::Active => "active",
            Rotation::Retired => "retired",
        };
        let result = match &c.published {
            Published::Matches => "published".to_owned(),
            Published::Differs => "MISMATCH: DNS publishes another key".to_owned(),
            Published::Missing if c.rotation == Rotation::Retired => {
                "not published (fine: retired)".to_owned()
            }
            Published::Missing => "MISSING: no DKIM record".to_owned(),
            Published::Unknown(why) => format!("UNKNOWN: {why}"),
        };
        let name = format!("{}/{}", c.domain, c.selector);
        println!("{name:<width$}  {rotation:<7}  {result}");
    }
    if checks.iter().all(|c| c.ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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
