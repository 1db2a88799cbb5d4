//! `tern suppression ...`: the commands' arguments, the admin API request of each (CSV import
//! and export as raw bodies) and the table a page of the list prints as.

use super::check_config::load;
use super::client::{query_value, AdminClient, CallError};
use super::table::{Align::Left, Table};
use super::{Common, EX_NOINPUT};
use clap::Subcommand;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum SuppressionCommand {
    /// List suppressed addresses (a page at a time).
    List {
        #[command(flatten)]
        common: Common,
        /// Only entries with this reason (a bounce category or "manual").
        #[arg(long)]
        reason: Option<String>,
        /// Only addresses containing this text.
        #[arg(long)]
        contains: Option<String>,
        /// Entries per page (default 100, at most 10000).
        #[arg(long)]
        limit: Option<usize>,
        /// Start after this address (the cursor a previous page printed).
        #[arg(long)]
        after: Option<String>,
    },
    /// Suppress an address.
    Add {
        /// The address to suppress.
        address: String,
        /// A bounce category or "manual" (the default).
        #[arg(long)]
        reason: Option<String>,
        /// Lifts itself after this long ("7d"); default: until removed.
        #[arg(long)]
        expires_in: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Stop suppressing an address.
    Remove {
        /// The address to stop suppressing.
        address: String,
        #[command(flatten)]
        common: Common,
    },
    /// Add the entries of a CSV file (address[,reason,created_ms,expires_ms,source,scope]); "-" is
    /// standard input.
    // The help text's brackets are not a rustdoc link.
    #[allow(rustdoc::broken_intra_doc_links)]
    Import {
        /// The CSV file, or "-" for standard input.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Print every active entry as CSV.
    Export {
        #[command(flatten)]
        common: Common,
    },
}

/// One `tern suppression` command: its admin API request, the answer as text (or its JSON).
pub fn run(command: SuppressionCommand) -> ExitCode {
    use SuppressionCommand as S;
    let common = match &command {
        S::List { common, .. }
        | S::Add { common, .. }
        | S::Remove { common, .. }
        | S::Import { common, .. }
        | S::Export { common } => common,
    };
    let config = match load(common.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let client = AdminClient::new(&config);
    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let result: Result<String, CallError> = match &command {
        S::List {
            reason,
            contains,
            limit,
            after,
            ..
        } => {
            let mut query = Vec::new();
            for (key, value) in [("reason", reason), ("contains", contains), ("after", after)] {
                if let Some(v) = value {
                    query.push(format!("{key}={}", query_value(v)));
                }
            }
            if let Some(limit) = limit {
                query.push(format!("limit={limit}"));
            }
            client
                .call("GET", &format!("/suppressions?{}", query.join("&")), None)
                .map(|v| {
                    if common.json {
                        json(&v) + "\n"
                    } else {
                        render_suppressions(&v)
                    }
                })
        }
        S::Add {
            address,
            reason,
            expires_in,
            ..
        } => {
            let body =
                serde_json::json!({"address": address, "reason": reason, "expires_in": expires_in});
            client.call("POST", "/suppressions", Some(&body)).map(|v| {
                if common.json {
                    json(&v) + "\n"
                } else {
                    format!("suppressed {}\n", v["address"].as_str().unwrap_or(""))
                }
            })
        }
        S::Remove { address, .. } => client
            .call(
                "DELETE",
                &format!("/suppressions/{}", query_value(address)),
                None,
            )
            .map(|v| {
                if common.json {
                    json(&v) + "\n"
                } else {
                    format!("removed {address}\n")
                }
            }),
        S::Import { file, .. } => {
            let text = if file.as_os_str() == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map(|_| buf)
            } else {
                std::fs::read(file)
            };
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("tern: {}: {e}", file.display());
                    return ExitCode::from(EX_NOINPUT);
                }
            };
            client
                .call_raw("POST", "/suppressions/import", &text)
                .map(|answer| {
                    let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
                    if common.json {
                        json(&v) + "\n"
                    } else {
                        format!("imported {}\n", v["imported"])
                    }
                })
        }
        S::Export { .. } => client
            .call_raw("GET", "/suppressions/export", b"")
            .map(|csv| String::from_utf8_lossy(&csv).into_owned()),
    };
    super::client::print_answer(result)
}

/// `tern suppression list`: one line per entry, then the cursor of the next page if any.
fn render_suppressions(v: &Value) -> String {
    let mut table = Table::new(&[
        ("ADDRESS", Left),
        ("REASON", Left),
        ("EXPIRES", Left),
        ("SOURCE", Left),
    ]);
    for e in v["entries"].as_array().into_iter().flatten() {
        let expires = e["expires_ms"]
            .as_u64()
            .map(|t| {
                crate::message::rfc5322_date(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(t),
                )
            })
            .unwrap_or_else(|| "never".into());
        table.row([
            e["address"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or(""),
            &expires,
            e["source"].as_str().unwrap_or("-"),
        ]);
    }
    let mut out = table.render();
    if let Some(next) = v["next"].as_str() {
        out.push_str(&format!("more: --after {next}\n"));
    }
    out
}
