//! The `tern` command line: `serve`, `check-config`, `queue list|show` (offline, while the
//! daemon is stopped), `hash-password`, `dkim keygen`, `bounce parse`.
//!
//! Exit codes follow sysexits.h: 0 ok, 1 runtime failure, 64 usage, 65 bad input,
//! 66 unreadable input file, 75 temporary (spool in use), 78 configuration error.

use clap::{Parser, Subcommand};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tern::config::{Config, ConfigErrors, LogConfig, LogFormat};
use tern_queue::{MessageId, Spool, SpoolError};

const EX_DATAERR: u8 = 65;
const EX_NOINPUT: u8 = 66;
const EX_TEMPFAIL: u8 = 75;
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "tern mail transfer and delivery engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        #[arg(long, short, default_value = "config/tern.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file without binding ports or opening the spool.
    CheckConfig {
        #[arg(long, short, default_value = "config/tern.toml")]
        config: PathBuf,
    },
    /// Inspect the spool of a stopped daemon.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Read a password from standard input and print its argon2id hash for `auth.users`.
    HashPassword,
    /// DKIM signing keys.
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
    },
    /// Bounces, complaints and auto-replies.
    Bounce {
        #[command(subcommand)]
        command: BounceCommand,
    },
}

#[derive(Subcommand)]
enum BounceCommand {
    /// Parse one raw message (a bounce, an ARF complaint, an auto-reply or anything else)
    /// and print what it says per recipient. Needs no daemon and no spool.
    Parse {
        /// The message file, or `-` for standard input.
        file: PathBuf,
        /// One line of JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Use the `bounce.rules` of this config (before the shipped rules). Default: the
        /// shipped rules only.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Generate a signing key (PKCS#8 PEM, mode 0600; an existing file is never overwritten)
    /// and print the DNS TXT record that publishes it.
    Keygen {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
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
enum DkimKeyAlgorithm {
    Ed25519,
    Rsa,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List queued messages.
    List {
        #[arg(long, short, default_value = "config/tern.toml")]
        config: PathBuf,
        /// One JSON array of envelopes instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one message: its envelope and its headers (or, with --body, all of it).
    Show {
        id: String,
        #[arg(long, short, default_value = "config/tern.toml")]
        config: PathBuf,
        #[arg(long)]
        body: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::CheckConfig { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Queue { command } => queue(command),
        Command::HashPassword => hash_password(),
        Command::Dkim {
            command:
                DkimCommand::Keygen {
                    domain,
                    selector,
                    algorithm,
                    bits,
                    out,
                },
        } => dkim_keygen(&domain, &selector, algorithm, bits, out),
        Command::Bounce {
            command: BounceCommand::Parse { file, json, config },
        } => bounce_parse(&file, json, config.as_deref()),
    }
}

/// Loads and fully checks a config (including TLS and DKIM key files); prints every error.
fn load(path: &Path) -> Result<Config, ExitCode> {
    let config = Config::load(path).and_then(|c| {
        let mut errors = c.check_files().err().map(|e| e.0).unwrap_or_default();
        if let Err(e) = tern::delivery::dkim::DkimSigners::load(&c.dkim) {
            errors.extend(e.0);
        }
        if let Err(e) = tern::bounce::classify::Classifier::load(&c.bounce) {
            errors.extend(e.0);
        }
        if errors.is_empty() {
            Ok(c)
        } else {
            Err(ConfigErrors(errors))
        }
    });
    config.map_err(|errors| {
        eprintln!("{}: configuration errors:\n{errors}", path.display());
        ExitCode::from(EX_CONFIG)
    })
}

/// Logs go to standard error through a writer thread, so a session never waits on the
/// terminal or journal. The writer blocks rather than drops when it falls behind: a lost log
/// line is worse than a slower accept. The returned guard flushes the rest when dropped.
fn init_logging(log: &LogConfig) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

fn serve(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let _log_guard = init_logging(&config.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("tern: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tern::daemon::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("tern: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn open_spool(config: &Path) -> Result<Spool, ExitCode> {
    let config = load(config)?;
    Spool::open(&config.spool.path).map_err(|err| {
        eprintln!("tern: {err}");
        match err {
            SpoolError::InUse { .. } => {
                eprintln!("tern: stop the daemon first; `tern queue` reads the spool directly");
                ExitCode::from(EX_TEMPFAIL)
            }
            _ => ExitCode::FAILURE,
        }
    })
}

fn queue(command: QueueCommand) -> ExitCode {
    match command {
        QueueCommand::List { config, json } => {
            let spool = match open_spool(&config) {
                Ok(spool) => spool,
                Err(code) => return code,
            };
            let envelopes = match spool.list() {
                Ok(envelopes) => envelopes,
                Err(err) => {
                    eprintln!("tern: {err}");
                    return ExitCode::FAILURE;
                }
            };
            let mut out = std::io::stdout().lock();
            if json {
                let _ = serde_json::to_writer_pretty(&mut out, &envelopes);
                let _ = writeln!(out);
            } else {
                let _ = writeln!(
                    out,
                    "{:<16}  {:>9}  {:<24}  {:<30}  {:>5}  {:>8}  SENDER",
                    "ID", "SIZE", "DESTINATION", "CREATED", "RCPTS", "ATTEMPTS"
                );
                for env in &envelopes {
                    let created = tern::ingest::rfc5322_date(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(env.created_ms),
                    );
                    let sender = if env.sender.is_empty() {
                        "<>"
                    } else {
                        &env.sender
                    };
                    let _ = writeln!(
                        out,
                        "{:<16}  {:>9}  {:<24}  {:<30}  {:>5}  {:>8}  {}",
                        env.id.to_string(),
                        env.size,
                        env.destination,
                        created,
                        env.recipients.len(),
                        env.attempts,
                        sender
                    );
                }
                let stats = spool.stats();
                let _ = writeln!(out, "-- {} messages, {} bytes", stats.messages, stats.bytes);
            }
            ExitCode::SUCCESS
        }
        QueueCommand::Show { id, config, body } => {
            let Ok(id) = id.parse::<MessageId>() else {
                eprintln!("tern: {id:?} is not a message id (16 hex digits)");
                return ExitCode::from(EX_DATAERR);
            };
            let spool = match open_spool(&config) {
                Ok(spool) => spool,
                Err(code) => return code,
            };
            let (envelope, content) = match (spool.envelope(id), spool.body(id)) {
                (Ok(Some(env)), Ok(Some(content))) => (env, content),
                (Ok(None), _) | (_, Ok(None)) => {
                    eprintln!("tern: no message {id} in the spool");
                    return ExitCode::from(EX_DATAERR);
                }
                (Err(err), _) | (_, Err(err)) => {
                    eprintln!("tern: {err}");
                    return ExitCode::FAILURE;
                }
            };
            let mut out = std::io::stdout().lock();
            let _ = serde_json::to_writer_pretty(&mut out, &envelope);
            let _ = writeln!(out);
            let _ = writeln!(out);
            let shown = if body {
                &content[..]
            } else {
                let end =
                    memchr::memmem::find(&content, b"\r\n\r\n").map_or(content.len(), |p| p + 2);
                &content[..end]
            };
            let _ = out.write_all(shown);
            ExitCode::SUCCESS
        }
    }
}

fn hash_password() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        eprintln!("tern: cannot read the password from standard input");
        return ExitCode::from(EX_DATAERR);
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("tern: empty password");
        return ExitCode::from(EX_DATAERR);
    }
    println!("{}", tern::auth::hash_password(password));
    ExitCode::SUCCESS
}

/// `tern dkim keygen`: the key goes to a new file readable only by its owner, the record to
/// stdout (so it can be piped), everything else to stderr.
fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: DkimKeyAlgorithm,
    bits: usize,
    out: Option<PathBuf>,
) -> ExitCode {
    use std::os::unix::fs::OpenOptionsExt;
    use tern::delivery::dkim::{generate_key, zone_record, KeyAlgorithm, KeyError};
    const EX_USAGE: u8 = 64;

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

/// `tern bounce parse`: the report as one JSON line, or a table of recipients.
fn bounce_parse(file: &Path, json: bool, config: Option<&Path>) -> ExitCode {
    use std::io::Read;
    use tern::bounce::classify::Classifier;

    let classifier = match config {
        None => Classifier::defaults(),
        Some(path) => match load(path).and_then(|c| {
            // load() has already checked the rule file; this cannot fail but for a race.
            Classifier::load(&c.bounce).map_err(|errors| {
                eprintln!("{}: configuration errors:\n{errors}", path.display());
                ExitCode::from(EX_CONFIG)
            })
        }) {
            Ok(classifier) => classifier,
            Err(code) => return code,
        },
    };
    let mut raw = Vec::new();
    let read = if file == Path::new("-") {
        std::io::stdin().lock().read_to_end(&mut raw)
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_end(&mut raw))
    };
    if let Err(err) = read {
        eprintln!("tern: cannot read {}: {err}", file.display());
        return ExitCode::from(EX_NOINPUT);
    }
    let report = tern::bounce::parse(&raw, &classifier);
    let mut out = std::io::stdout().lock();
    if json {
        let _ = serde_json::to_writer(&mut out, &report);
        let _ = writeln!(out);
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(out, "kind: {}", report.kind.as_str());
    if report.recipients.is_empty() {
        return ExitCode::SUCCESS;
    }
    let _ = writeln!(
        out,
        "{:<40}  {:<9}  {:<7}  {:<17}  {:<4}  DIAGNOSTIC",
        "RECIPIENT", "ACTION", "STATUS", "CATEGORY", "HARD"
    );
    for r in &report.recipients {
        let _ = writeln!(
            out,
            "{:<40}  {:<9}  {:<7}  {:<17}  {:<4}  {}",
            r.address,
            r.action.as_str(),
            r.status.as_deref().unwrap_or("-"),
            r.category.as_str(),
            if r.hard { "yes" } else { "no" },
            r.diagnostic.as_deref().unwrap_or("")
        );
    }
    ExitCode::SUCCESS
}
