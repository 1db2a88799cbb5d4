//! `tern check-config`, and `load`: the full check of a config file (its keys, the TLS and
//! DKIM key files, the bounce rules) that every command reading a config runs first.

use super::EX_CONFIG;
use crate::bounce::classify::Classifier;
use crate::config::{Config, ConfigErrors};
use crate::dkim::DkimSigners;
use std::path::Path;
use std::process::ExitCode;

/// `tern check-config`: "PATH: ok", or every error and 78.
pub fn run(path: &Path) -> ExitCode {
    match load(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Loads and fully checks a config (including TLS and DKIM key files); prints every error.
pub(super) fn load(path: &Path) -> Result<Config, ExitCode> {
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
