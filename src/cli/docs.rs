//! `tern completions SHELL` and `tern man DIR`: shell completion scripts (clap_complete) and
//! man pages (clap_mangen), both generated from [`Cli`], so they never disagree with the
//! arguments. The Debian package ships both (`scripts/package.sh`).

use super::{Cli, EX_CANTCREAT};
use clap::CommandFactory as _;
use std::path::Path;
use std::process::ExitCode;

pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "tern", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// Writes `tern.1` and one page per subcommand (`tern-queue-summary.1`, ...).
pub fn man(dir: &Path) -> ExitCode {
    let written =
        std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(Cli::command(), dir));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tern: cannot write man pages to {}: {err}", dir.display());
            ExitCode::from(EX_CANTCREAT)
        }
    }
}
