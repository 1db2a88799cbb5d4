//! The `tern` binary: the top-level clap `Command` enum (each subcommand group's own arguments
//! live in `tern::cli`, with its code), logging setup, the global allocator, and the dispatch
//! to `tern::cli`. Exit codes: see `tern::cli`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
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
        #[arg(long, short, value_name = "FILE", help = tern::cli::CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file without binding ports or opening the spool.
    CheckConfig {
        #[arg(long, short, value_name = "FILE", help = tern::cli::CONFIG_HELP)]
        config: Option<PathBuf>,
        /// The config file to check (the same as --config).
        #[arg(value_name = "FILE", conflicts_with = "config")]
        file: Option<PathBuf>,
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
        command: tern::cli::dkim::DkimCommand,
    },
    /// Bounces, complaints and auto-replies.
    Bounce {
        #[command(subcommand)]
        command: tern::cli::bounce::BounceCommand,
    },
    /// The suppression list of a running daemon (over the admin API).
    Suppression {
        #[command(subcommand)]
        command: tern::cli::suppression::SuppressionCommand,
    },
    /// Scoped admin API tokens (`[[admin.tokens]]`).
    Token {
        #[command(subcommand)]
        command: tern::cli::token::TokenCommand,
    },
    /// The pre-enqueue sidecar.
    Sidecar {
        #[command(subcommand)]
        command: tern::cli::sidecar::SidecarCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => tern::cli::serve::run(config.as_deref(), init_logging),
        Command::CheckConfig { config, file } => {
            tern::cli::check_config::run(config.or(file).as_deref())
        }
        Command::Queue { command } => tern::cli::queue::run(command),
        Command::Inject(args) => tern::cli::inject::run(args),
        Command::HashPassword => tern::cli::hash_password::run(),
        Command::Dkim { command } => tern::cli::dkim::run(command),
        Command::Bounce { command } => tern::cli::bounce::run(command),
        Command::Suppression { command } => tern::cli::suppression::run(command),
        Command::Sidecar { command } => tern::cli::sidecar::run(command),
        Command::Token { command } => tern::cli::token::run(command),
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
