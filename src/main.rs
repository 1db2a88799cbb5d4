//! The `tern` binary: logging setup, the global allocator, and the dispatch of the command
//! line (`tern::cli::Cli`) to `tern::cli`. Exit codes: see `tern::cli`.

use clap::Parser;
use std::process::ExitCode;
use tern::cli::{Cli, Command};
use tern::config::{LogConfig, LogFormat};

// glibc's malloc was about 7% of the daemon's CPU end to end (perf, relay-bench): every
// message allocates buffers and small objects on several threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        Command::Spool { command } => tern::cli::spool::run(command),
        Command::Sidecar { command } => tern::cli::sidecar::run(command),
        Command::Campaign { command } => tern::cli::campaign::run(command),
        Command::Token { command } => tern::cli::token::run(command),
        Command::Completions { shell } => tern::cli::docs::completions(shell),
        Command::Man { dir } => tern::cli::docs::man(&dir),
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
