//! `tern spool backup DIR` and `tern spool restore DIR`: consistent copies of a node's spool.
//!
//! `backup` asks the running daemon (POST /api/v1/spool/backup, `admin` scope), which copies
//! its spool between two commit rounds while writes wait; with the daemon stopped it copies
//! the spool itself. `restore` copies a backup into the spool directory of a stopped daemon,
//! which must be empty (move the old one aside first). See docs/OPERATIONS.md for the cost.

use super::check_config::load;
use super::client::{AdminClient, CallError};
use super::{EX_DATAERR, EX_TEMPFAIL};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tern_queue::{Spool, SpoolError};

#[derive(Subcommand)]
pub enum SpoolCommand {
    /// Copy the spool, consistently, into DIR (new or empty), from the running daemon or
    /// from the spool of a stopped one.
    Backup {
        /// Where the copy goes: a new or empty directory.
        dir: PathBuf,
        #[arg(long, short, value_name = "FILE", help = super::CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Copy a backup into the (empty or absent) spool directory of the stopped daemon.
    Restore {
        /// A directory `tern spool backup` wrote.
        dir: PathBuf,
        #[arg(long, short, value_name = "FILE", help = super::CONFIG_HELP)]
        config: Option<PathBuf>,
    },
}

pub fn run(command: SpoolCommand) -> ExitCode {
    match command {
        SpoolCommand::Backup { dir, config } => backup(&dir, config.as_deref()),
        SpoolCommand::Restore { dir, config } => restore(&dir, config.as_deref()),
    }
}

fn absolute(dir: &Path) -> PathBuf {
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

fn backup(dir: &Path, config: Option<&Path>) -> ExitCode {
    let config = match load(config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let dir = absolute(dir);
    let body = serde_json::json!({ "dir": dir });
    match AdminClient::new(&config).call("POST", "/spool/backup", Some(&body)) {
        Ok(answer) => {
            println!(
                "backed up {} keys ({} bytes) to {} in {:.1}s",
                answer["keys"],
                answer["bytes"],
                dir.display(),
                answer["seconds"].as_f64().unwrap_or(0.0)
            );
            ExitCode::SUCCESS
        }
        Err(CallError::Unreachable(_)) => {
            // The daemon is not running: copy its spool here.
            let started = std::time::Instant::now();
            let result = Spool::open(&config.spool.path).and_then(|spool| spool.backup(&dir));
            report(result, "backed up", &dir, started)
        }
        Err(e @ CallError::Api { status, .. }) => {
            eprintln!("tern: {e}");
            ExitCode::from(if (400..500).contains(&status) {
                EX_DATAERR
            } else {
                1
            })
        }
        Err(e) => {
            eprintln!("tern: {e}");
            ExitCode::FAILURE
        }
    }
}

fn restore(dir: &Path, config: Option<&Path>) -> ExitCode {
    let config = match load(config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let started = std::time::Instant::now();
    let result = tern_queue::restore(dir, &config.spool.path);
    report(result, "restored", &config.spool.path, started)
}

fn report(
    result: Result<tern_queue::Copied, SpoolError>,
    what: &str,
    dir: &Path,
    started: std::time::Instant,
) -> ExitCode {
    match result {
        Ok(copied) => {
            println!(
                "{what} {} keys ({} bytes) to {} in {:.1}s",
                copied.keys,
                copied.bytes,
                dir.display(),
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(err @ SpoolError::InUse { .. }) => {
            eprintln!("tern: {err}: stop the daemon first");
            ExitCode::from(EX_TEMPFAIL)
        }
        Err(err) => {
            eprintln!("tern: {err}");
            ExitCode::FAILURE
        }
    }
}
