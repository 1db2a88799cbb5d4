//! The `tern` command line: every subcommand's arguments and body. The binary (`src/main.rs`)
//! keeps only the top-level `Command` enum, logging setup, the allocator and the dispatch to
//! the `run` function of each module here; the clap argument types of a subcommand (group)
//! live in its module, help texts included, next to the code that reads them, so nothing is
//! declared twice. The admin server ([`crate::admin`]) never uses this module; this module
//! uses anything below it.
//!
//! - [`bounce`]: `tern bounce parse`, what one raw message says per recipient.
//! - [`check_config`]: `tern check-config`, and the config check every command runs first.
//! - [`client`]: the blocking HTTP client of the admin API (also for examples and tests).
//! - [`dkim`]: `tern dkim keygen`, a signing key and its DNS record.
//! - [`hash_password`]: `tern hash-password`, an `auth.users` hash.
//! - [`inject`]: `tern inject`, one message through a running daemon's admin API.
//! - [`queue`]: `tern queue ...`, the queue of a running daemon or the spool of a stopped one.
//! - [`serve`]: `tern serve`, the daemon (logging set up by the binary).
//! - [`sidecar`]: `tern sidecar simulate`, send-time policies on a simulated audience.
//! - [`suppression`]: `tern suppression ...`, the suppression list of a running daemon.
//! - [`token`]: `tern token new`, a scoped admin API token and its config entry.
//!
//! Exit codes follow sysexits.h: 0 ok, 1 runtime failure, 64 usage, 65 bad input,
//! 66 unreadable input file, 69 service unavailable (daemon not reachable), 75 temporary
//! (spool in use, 5xx answer), 77 permission denied (wrong token, or a token
//! without the call's scope), 78 configuration error.
//! Usage errors clap finds itself exit with 2.

pub mod bounce;
pub mod check_config;
pub mod client;
pub mod dkim;
pub mod hash_password;
pub mod inject;
pub mod queue;
pub mod serve;
pub mod sidecar;
pub mod suppression;
pub mod token;

use std::path::PathBuf;

// sysexits.h
const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_NOINPUT: u8 = 66;
const EX_UNAVAILABLE: u8 = 69;
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
