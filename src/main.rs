//! The `tern` command line: `serve`, `check-config`, `queue ...` (over the running daemon's
//! admin API, see `tern::cli`; `list` and `show` read the spool directly when the daemon is
//! stopped), `inject` (through the admin API), `hash-password`, `dkim keygen`, `bounce parse`,
//! `sidecar simulate`. Exit codes: see `tern::cli`.

use clap::{Parser, Subcommand};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tern::cli::check_config::load;
use tern::cli::{EX_CONFIG, EX_DATAERR, EX_NOINPUT};
use tern::config::{LogConfig, LogFormat};

// glibc's malloc was about 7% of the daemon's CPU end to end (perf, relay-bench): every
// message allocates buffers and small objects on several threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Inspect and manage the queue (running daemon; list and show also on a stopped one).
    Queue {
        #[command(subcommand)]
        command: tern::cli::queue::QueueCommand,
    },
    /// Submit a message through a running daemon's admin API (POST /api/v1/inject): a raw
    /// message from FILE or standard input, or one built from --subject/--text/--html/--attach.
    /// Prints the queue id (or, with --json, the API's answer).
    Inject(tern::cli::inject::InjectArgs),
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
    /// The suppression list of a running daemon (over the admin API).
    Suppression {
        #[command(subcommand)]
        command: tern::cli::suppression::SuppressionCommand,
    },
    /// The pre-enqueue sidecar.
    Sidecar {
        #[command(subcommand)]
        command: SidecarCommand,
    },
}

#[derive(Subcommand)]
enum SidecarCommand {
    /// Evaluate send-time policies on a seeded simulated audience and print the expected
    /// human open rate of each, per history bucket. Needs no daemon and no spool.
    Simulate {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
        users: u64,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::CheckConfig { config } => tern::cli::check_config::run(&config),
        Command::Queue { command } => tern::cli::queue::run(command),
        Command::Inject(args) => tern::cli::inject::run(args),
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
        Command::Suppression { command } => tern::cli::suppression::run(command),
        Command::Sidecar {
            command: SidecarCommand::Simulate { seed, users },
        } => {
            print!("{}", tern::sendtime::simulate::run(seed, users as usize));
            ExitCode::SUCCESS
        }
    }
}

/// Logs go to standard error through a writer thread, so a session never waits on the
/// terminal or journal. The writer blocks rather than drops when it falls behind: a lost log
/// line is worse than a slower accept. The returned guard flushes the rest when dropped; the
/// reloader applies a new `log.level` on SIGHUP (unless RUST_LOG overrides the config).
fn init_logging(
    log: &LogConfig,
) -> (
    tracing_appender::non_blocking::WorkerGuard,
    Option<tern::daemon::LogLevelReloader>,
) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, reload, EnvFilter};

    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let from_env = EnvFilter::try_from_default_env().ok();
    let overridden = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&log.level));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let layer = fmt::layer().with_writer(writer).with_ansi(false);
    match log.format {
        LogFormat::Json => registry.with(layer.json()).init(),
        LogFormat::Text => registry.with(layer).init(),
    }
    let reloader: Option<tern::daemon::LogLevelReloader> = (!overridden).then(|| {
        Box::new(move |level: &str| {
            handle
                .reload(EnvFilter::new(level))
                .map_err(|e| e.to_string())
        }) as tern::daemon::LogLevelReloader
    });
    (guard, reloader)
}

fn serve(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let (_log_guard, log_level) = init_logging(&config.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("tern: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tern::daemon::serve(config, path, log_level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("tern: {err:#}");
            ExitCode::FAILURE
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
    use tern::cli::EX_USAGE;
    use tern::dkim::{generate_key, zone_record, KeyAlgorithm, KeyError};

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
