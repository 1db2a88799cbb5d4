//! The `tern` command line: [`Cli`], every subcommand's arguments and body. The binary
//! (`src/main.rs`) keeps only logging setup, the allocator and the dispatch to the `run`
//! function of each module here; the clap argument types of a subcommand (group)
//! live in its module, help texts included, next to the code that reads them, so nothing is
//! declared twice. The admin server ([`crate::admin`]) never uses this module; this module
//! uses anything below it.
//!
//! - [`bounce`]: `tern bounce parse`, what one raw message says per recipient.
//! - [`campaign`]: `tern campaign list|show|pause|resume`, the sidecar's campaigns.
//! - [`check_config`]: `tern check-config`, and the config check every command runs first.
//! - [`client`]: the blocking HTTP client of the admin API (also for examples and tests).
//! - [`dkim`]: `tern dkim keygen`, a signing key and its DNS record.
//! - [`docs`]: `tern completions SHELL` and `tern man DIR`, generated from [`Cli`].
//! - [`hash_password`]: `tern hash-password`, an `auth.users` hash.
//! - [`inject`]: `tern inject`, one message through a running daemon's admin API.
//! - [`queue`]: `tern queue ...`, the queue of a running daemon or the spool of a stopped one.
//! - [`serve`]: `tern serve`, the daemon (logging set up by the binary).
//! - [`sidecar`]: `tern sidecar simulate`, send-time policies on a simulated audience.
//! - [`suppression`]: `tern suppression ...`, the suppression list of a running daemon.
//! - [`table`]: the aligned tables every command prints.
//! - [`token`]: `tern token new`, a scoped admin API token and its config entry.
//!
//! Exit codes follow sysexits.h: 0 ok, 1 runtime failure, 64 usage, 65 bad input,
//! 66 unreadable input file, 73 cannot create an output file, 69 service unavailable (daemon not reachable), 75 temporary
//! (spool in use, 5xx answer), 77 permission denied (wrong token, or a token
//! without the call's scope), 78 configuration error.
//! Usage errors clap finds itself exit with 2.

pub mod bounce;
pub mod campaign;
pub mod check_config;
pub mod client;
pub mod dkim;
pub mod docs;
pub mod drain;
pub mod hash_password;
pub mod inject;
pub mod queue;
pub mod serve;
pub mod sidecar;
pub mod spool;
pub mod suppression;
pub mod table;
pub mod token;

use std::path::PathBuf;

/// The whole command line (the binary parses it; completions, man pages and tests read it).
#[derive(clap::Parser)]
#[command(
    name = "tern",
    version,
    about = "tern mail transfer and delivery engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        #[arg(long, short, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file without binding ports or opening the spool.
    CheckConfig {
        #[arg(long, short, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// The config file to check (the same as --config).
        #[arg(value_name = "FILE", conflicts_with = "config")]
        file: Option<PathBuf>,
    },
    /// Inspect and manage the queue (running daemon; list and show also on a stopped one).
    Queue {
        #[command(subcommand)]
        command: crate::cli::queue::QueueCommand,
    },
    /// Submit a message through a running daemon's admin API (POST /api/v1/inject): a raw
    /// message from FILE or standard input, or one built from --subject/--text/--html/--attach.
    /// Prints the queue id (or, with --json, the API's answer).
    Inject(crate::cli::inject::InjectArgs),
    /// Read a password from standard input and print its argon2id hash for `auth.users`.
    HashPassword,
    /// DKIM signing keys.
    Dkim {
        #[command(subcommand)]
        command: crate::cli::dkim::DkimCommand,
    },
    /// Bounces, complaints and auto-replies.
    Bounce {
        #[command(subcommand)]
        command: crate::cli::bounce::BounceCommand,
    },
    /// Consistent copies of the spool: backup (running or stopped daemon) and restore.
    Spool {
        #[command(subcommand)]
        command: crate::cli::spool::SpoolCommand,
    },
    /// The suppression list of a running daemon (over the admin API).
    Suppression {
        #[command(subcommand)]
        command: crate::cli::suppression::SuppressionCommand,
    },
    /// Scoped admin API tokens (`[[admin.tokens]]`).
    Token {
        #[command(subcommand)]
        command: crate::cli::token::TokenCommand,
    },
    /// Print a shell completion script for SHELL to standard output (e.g. `tern completions
    /// bash > /etc/bash_completion.d/tern`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (tern.1, tern-queue.1, tern-queue-summary.1, ...) into DIR.
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// The sidecar's campaigns on a running daemon (over the admin API).
    Campaign {
        #[command(subcommand)]
        command: crate::cli::campaign::CampaignCommand,
    },
    /// The pre-enqueue sidecar.
    Sidecar {
        #[command(subcommand)]
        command: crate::cli::sidecar::SidecarCommand,
    },
}

// sysexits.h
const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_NOINPUT: u8 = 66;
const EX_UNAVAILABLE: u8 = 69;
const EX_CANTCREAT: u8 = 73;
const EX_TEMPFAIL: u8 = 75;
const EX_NOPERM: u8 = 77;
const EX_CONFIG: u8 = 78;

/// Help text of every `--config` option.
pub const CONFIG_HELP: &str = "Config file [default: $TERN_CONFIG, else /etc/tern/tern.toml, \
else ./config/tern.toml]; relative paths in it resolve against its directory";

// The options of the queue and suppression commands: the daemon's config and --json.
#[derive(clap::Args)]
pub struct Common {
    #[arg(long, short, value_name = "FILE", help = CONFIG_HELP)]
    config: Option<PathBuf>,
    /// Print the admin API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory as _;

    /// Every (sub)command and every argument of it, by path, that has no help text.
    fn missing_help(command: &clap::Command, path: &str, out: &mut Vec<String>) {
        if command.get_about().is_none() && path != "tern" {
            out.push(path.to_owned());
        }
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" && arg.get_help().is_none() {
                out.push(format!("{path} {id}"));
            }
        }
        for sub in command.get_subcommands() {
            missing_help(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_command_and_argument_has_help_text() {
        let command = Cli::command();
        command.clone().debug_assert();
        let mut missing = Vec::new();
        missing_help(&command, "tern", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        // The walk saw the whole tree.
        assert!(command.get_subcommands().count() >= 12);
    }
}
