//! `tern bounce ...`: `parse`, one raw message (bounce, ARF complaint, auto-reply, anything)
//! read with the bounce parser and printed per recipient; no daemon, no spool.

use super::check_config::load_file;
use super::table::{Align::Left, Table};
use super::{EX_CONFIG, EX_NOINPUT};
use crate::bounce::classify::Classifier;
use clap::Subcommand;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum BounceCommand {
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

pub fn run(command: BounceCommand) -> ExitCode {
    match command {
        BounceCommand::Parse { file, json, config } => parse(&file, json, config.as_deref()),
    }
}

/// `tern bounce parse`: the report as one JSON line, or a table of recipients.
fn parse(file: &Path, json: bool, config: Option<&Path>) -> ExitCode {
    let classifier = match config {
        None => Classifier::defaults(),
        Some(path) => match load_file(path).and_then(|c| {
            // load() has already checked the rule file; this cannot fail but for a race.
            Classifier::load(&c).map_err(|errors| {
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
    let report = crate::bounce::parse(&raw, &classifier);
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
    let mut table = Table::new(&[
        ("RECIPIENT", Left),
        ("ACTION", Left),
        ("STATUS", Left),
        ("CATEGORY", Left),
        ("REASON", Left),
        ("HARD", Left),
        ("DIAGNOSTIC", Left),
    ]);
    for r in &report.recipients {
        table.row([
            r.address.as_str(),
            r.action.as_str(),
            r.status.as_deref().unwrap_or("-"),
            r.category.as_str(),
            r.reason.as_str(),
            if r.hard { "yes" } else { "no" },
            r.diagnostic.as_deref().unwrap_or(""),
        ]);
    }
    let _ = write!(out, "{}", table.render());
    ExitCode::SUCCESS
}
