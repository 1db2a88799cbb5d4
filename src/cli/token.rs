//! `tern token new NAME --scope S...`: a fresh secret for a scoped admin API token and the
//! `[[admin.tokens]]` entry that lets it in (only the secret's SHA-256 goes into the config).

use super::EX_USAGE;
use crate::admin::auth::{random_token, Token};
use crate::config::Scope;
use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Print a new random secret (first line: give it to the client, e.g. as TERN_TOKEN) and
    /// the `[[admin.tokens]]` entry to add to the config (then reload).
    New {
        /// The token's name, written to the audit log with every call it makes.
        #[arg(value_name = "NAME")]
        name: String,
        /// A right the token has: read, inject, queue, suppression, campaigns or admin
        /// (every right). Repeat for several.
        #[arg(long = "scope", short, value_name = "SCOPE", required = true, value_parser = parse_scope)]
        scopes: Vec<Scope>,
    },
}

fn parse_scope(name: &str) -> Result<Scope, String> {
    Scope::parse(name).ok_or_else(|| {
        let known: Vec<_> = Scope::ALL.iter().map(|s| s.name()).collect();
        format!("unknown scope (one of {})", known.join(", "))
    })
}

pub fn run(command: TokenCommand) -> ExitCode {
    match command {
        TokenCommand::New { name, mut scopes } => {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                eprintln!("tern: NAME: 1 to 64 characters of letters, digits, '-', '_' and '.'");
                return ExitCode::from(EX_USAGE);
            }
            scopes.dedup();
            let secret = random_token();
            let scopes: Vec<String> = scopes.iter().map(|s| format!("{:?}", s.name())).collect();
            println!("{secret}");
            println!();
            println!("[[admin.tokens]]");
            println!("name = {name:?}");
            println!("secret_sha256 = {:?}", Token::sha256_hex(&secret));
            println!("scopes = [{}]", scopes.join(", "));
            ExitCode::SUCCESS
        }
    }
}
