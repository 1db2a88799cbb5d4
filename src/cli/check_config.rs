//! `tern check-config`, and `load`: the full check of a config file (its keys, the TLS and
//! DKIM key files, the bounce rules) that every command reading a config runs first.

use super::EX_CONFIG;
use crate::bounce::classify::Classifier;
use crate::config::{Config, ConfigErrors};
use crate::dkim::DkimSigners;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `tern check-config`: "PATH: ok", or every error and 78.
pub fn run(explicit: Option<&Path>) -> ExitCode {
    let path = match locate(explicit) {
        Ok(path) => path,
        Err(code) => return code,
    };
    match load_file(&path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// The config file a command reads: `explicit` (`--config`), else `TERN_CONFIG`, else the
/// conventional places ([`crate::config::paths`]); when there is none, the error (naming
/// every place tried) is printed and the exit code is 78.
pub(super) fn locate(explicit: Option<&Path>) -> Result<PathBuf, ExitCode> {
    crate::config::paths::locate_from_env(explicit).map_err(|err| {
        eprintln!("tern: {err}");
        ExitCode::from(EX_CONFIG)
    })
}

/// [`locate`], then [`load_file`].
pub(super) fn load(explicit: Option<&Path>) -> Result<Config, ExitCode> {
    load_file(&locate(explicit)?)
}

/// Loads and fully checks a config (including TLS and DKIM key files); prints every error.
pub(super) fn load_file(path: &Path) -> Result<Config, ExitCode> {
    let config = Config::load(path).and_then(|c| {
        let mut errors = c.check_files().err().map(|e| e.0).unwrap_or_default();
        // Only the keys are checked here; nothing is signed, so nothing is counted.
        let unused = std::sync::Arc::new(crate::telemetry::Metrics::new());
        if let Err(e) = DkimSigners::load(&c.dkim, unused) {
            errors.extend(e.0);
        }
        if let Err(e) = Classifier::load(&c) {
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
