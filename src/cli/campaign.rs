//! `tern campaign list|show|pause|resume`: the sidecar's campaigns on a running daemon, over
//! the admin API (`/api/v1/campaigns`; list and show need the read scope, pause and resume
//! the campaigns scope).

use super::check_config::load;
use super::client::{query_value, AdminClient, CallError};
use super::table::{
    Align::{Left, Right},
    Table,
};
use super::Common;
use clap::Subcommand;
use serde_json::Value;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum CampaignCommand {
    /// Every campaign (config file and API): origin, state, version, variants.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// One campaign's definition (the JSON `PUT /api/v1/campaigns/NAME` takes) and state.
    Show {
        /// The campaign's name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Pause a campaign: its mail is still accepted, but spooled held until it resumes.
    Pause {
        /// The campaign's name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Resume a paused campaign and release its held mail.
    Resume {
        /// The campaign's name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// One `tern campaign` command: its admin API request, the answer as text (or its JSON).
pub fn run(command: CampaignCommand) -> ExitCode {
    use CampaignCommand as C;
    let common = match &command {
        C::List { common }
        | C::Show { common, .. }
        | C::Pause { common, .. }
        | C::Resume { common, .. } => common,
    };
    let config = match load(common.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let client = AdminClient::new(&config);
    let json = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    let path = |name: &str, action: &str| format!("/campaigns/{}{action}", query_value(name));
    let result: Result<String, CallError> = match &command {
        C::List { .. } => client.call("GET", "/campaigns", None).map(|v| {
            if common.json {
                json(&v)
            } else {
                render_list(&v)
            }
        }),
        C::Show { name, .. } => client.call("GET", &path(name, ""), None).map(|v| json(&v)),
        C::Pause { name, .. } => client.call("POST", &path(name, "/pause"), None).map(|v| {
            if common.json {
                json(&v)
            } else {
                format!("paused {name}: its mail is held until it resumes\n")
            }
        }),
        C::Resume { name, .. } => client.call("POST", &path(name, "/resume"), None).map(|v| {
            if common.json {
                json(&v)
            } else {
                format!(
                    "resumed {name}: {} held message(s) released\n",
                    v["released"]
                )
            }
        }),
    };
    super::client::print_answer(result)
}

/// `tern campaign list`: one line per campaign.
fn render_list(v: &Value) -> String {
    let mut table = Table::new(&[
        ("NAME", Left),
        ("ORIGIN", Left),
        ("STATE", Left),
        ("VERSION", Right),
        ("VARIANTS", Left),
    ]);
    for c in v["campaigns"].as_array().into_iter().flatten() {
        let variants: Vec<&str> = c["variants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["id"].as_str())
            .collect();
        table.row([
            c["name"].as_str().unwrap_or(""),
            c["origin"].as_str().unwrap_or(""),
            c["state"].as_str().unwrap_or(""),
            &c["version"].to_string(),
            &if variants.is_empty() {
                "-".to_owned()
            } else {
                variants.join(",")
            },
        ]);
    }
    if table.is_empty() {
        return "no campaigns\n".to_owned();
    }
    table.render()
}
