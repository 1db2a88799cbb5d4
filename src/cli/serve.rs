//! `tern serve`: the daemon in the foreground, from the config check to the exit code.

use super::check_config::{load_file, locate};
use crate::config::LogConfig;
use crate::daemon::LogLevelReloader;
use std::path::Path;
use std::process::ExitCode;

/// `tern serve`: finds ([`locate`]), loads and checks the config, then starts logging with
/// `init_logging` (the binary's: it installs the process-wide subscriber; its guard lives until
/// the daemon has stopped, so the last lines are written), then runs the daemon on a
/// multi-thread runtime until it stops.
pub fn run<G>(
    explicit: Option<&Path>,
    init_logging: impl FnOnce(&LogConfig) -> (G, Option<LogLevelReloader>),
) -> ExitCode {
    let path = match locate(explicit) {
        Ok(path) => path,
        Err(code) => return code,
    };
    let config = match load_file(&path) {
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
    match runtime.block_on(crate::daemon::serve(config, &path, log_level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("tern: {err:#}");
            ExitCode::FAILURE
        }
    }
}
