//! `tern queue ...`: the commands' arguments, the admin API request of each, and the tables
//! its answers print as; `list` and `show` fall back to reading the spool of a stopped daemon.

use super::check_config::load;
use super::client::{query_value, AdminClient, CallError};
use super::table::{Align, Align::Left, Align::Right, Table};
use super::{Common, EX_DATAERR, EX_TEMPFAIL};
use crate::clock::now_ms;
use clap::Subcommand;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tern_queue::{MessageId, Spool, SpoolError};

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Per-destination totals and suspensions (running daemon).
    Summary {
        #[command(flatten)]
        common: Common,
    },
    /// List queued messages: from the running daemon, or from the spool of a stopped one
    /// (then as a table or a JSON array of spool envelopes, without paging).
    List {
        #[command(flatten)]
        common: Common,
        /// Only this destination (recipient domain).
        #[arg(long)]
        destination: Option<String>,
        /// Only this sender (exact, any case; "" for the null sender).
        #[arg(long)]
        sender: Option<String>,
        /// Only held messages.
        #[arg(long)]
        held: bool,
        /// Messages per page (daemon only; the API's default 100, at most 1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Start after this id (the cursor a previous page printed).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one message: its envelope and its headers (or, with --body, all of it); from the
    /// running daemon, or from the spool of a stopped one.
    Show {
        /// The message id (as `tern queue list` prints it).
        id: String,
        #[command(flatten)]
        common: Common,
        /// Print the whole message, not only its envelope and headers.
        #[arg(long)]
        body: bool,
    },
    /// Suspend delivery to DESTINATION (a recipient domain), or all delivery without one.
    Suspend {
        /// The recipient domain; without it, all delivery.
        destination: Option<String>,
        /// How long, e.g. "30m", "2h"; default until resumed.
        #[arg(long)]
        duration: Option<String>,
        /// Why, shown by `tern queue summary` and `suspensions`.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Resume delivery to DESTINATION, or all delivery without one.
    Resume {
        /// The recipient domain; without it, all delivery.
        destination: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// List the suspensions in force.
    Suspensions {
        #[command(flatten)]
        common: Common,
    },
    /// Relay the queue of this (stopped) node to another tern node over SMTP, keeping each
    /// message's envelope, DSN parameters, attempts and expiry; a message is removed here
    /// only after the peer accepted it. For decommissioning a node (docs/OPERATIONS.md).
    Drain {
        /// The peer's SMTP listener, IP:PORT; its relay networks (or AUTH) must allow us.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// Only mail for this destination (recipient domain).
        #[arg(long)]
        destination: Option<String>,
        /// SMTP connections used at once.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// AUTH to the peer with the user name (first line) and password (second line) in
        /// FILE; always after STARTTLS with a certificate that verifies for --peer-name.
        #[arg(long, value_name = "FILE")]
        auth_file: Option<PathBuf>,
        /// The name the peer's certificate must be valid for (default: its address).
        #[arg(long, value_name = "NAME")]
        peer_name: Option<String>,
        /// More CAs (PEM) the peer's certificate may chain to (besides the system's and
        /// delivery.ca_file).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Loopback peer only: AUTH over TLS even if its certificate does not verify.
        #[arg(long)]
        loopback_unverified: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Retry the selected deferred messages now.
    Flush {
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        common: Common,
    },
    /// Hold the selected messages: kept, never attempted, never expired while held.
    Hold {
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        common: Common,
    },
    /// Release held messages; they are due at once.
    Release {
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        common: Common,
    },
    /// Remove the selected messages without a DSN.
    Delete {
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        common: Common,
    },
    /// Fail every pending recipient of the selected messages and send the DSN.
    Bounce {
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        common: Common,
    },
}

/// Which messages a management command acts on; criteria combine.
#[derive(clap::Args)]
pub struct Select {
    /// Message ids.
    ids: Vec<String>,
    /// Messages to this destination (recipient domain).
    #[arg(long)]
    destination: Option<String>,
    /// Exact sender address, any case; "" for the null sender.
    #[arg(long)]
    sender: Option<String>,
    /// Every message (flush, hold and release only).
    #[arg(long)]
    all: bool,
}

impl Select {
    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({});
        if !self.ids.is_empty() {
            v["ids"] = serde_json::json!(self.ids);
        }
        if let Some(d) = &self.destination {
            v["destination"] = serde_json::json!(d);
        }
        if let Some(s) = &self.sender {
            v["sender"] = serde_json::json!(s);
        }
        if self.all {
            v["all"] = serde_json::json!(true);
        }
        v
    }
}

/// One `tern queue` command: its admin API request, the answer as a table (or its JSON); `list`
/// and `show` read the spool instead when the daemon is not running.
pub fn run(command: QueueCommand) -> ExitCode {
    use QueueCommand as Q;

    let (common, request, render): (&Common, Request, Render) = match &command {
        Q::Summary { common } => (common, Request::get("/queue/summary"), render_summary),
        Q::List {
            common,
            destination,
            sender,
            held,
            limit,
            after,
        } => {
            let mut query = Vec::new();
            for (key, value) in [
                ("destination", destination),
                ("sender", sender),
                ("after", after),
            ] {
                if let Some(v) = value {
                    query.push(format!("{key}={}", query_value(v)));
                }
            }
            if *held {
                query.push("held=true".into());
            }
            if let Some(limit) = limit {
                query.push(format!("limit={limit}"));
            }
            let path = format!("/queue/messages?{}", query.join("&"));
            (common, Request::get(&path), render_list)
        }
        Q::Show { id, common, body } => {
            let path = format!("/queue/messages/{}?body={body}", query_value(id));
            (common, Request::get(&path), render_message)
        }
        Q::Suspend {
            destination,
            duration,
            reason,
            common,
        } => {
            let body = serde_json::json!({
                "destination": destination, "duration": duration, "reason": reason,
            });
            (common, Request::post("/queue/suspend", body), render_done)
        }
        Q::Resume {
            destination,
            common,
        } => {
            let body = serde_json::json!({ "destination": destination });
            (common, Request::post("/queue/resume", body), render_done)
        }
        Q::Suspensions { common } => (
            common,
            Request::get("/queue/suspensions"),
            render_suspensions,
        ),
        // Not an API call: it reads the spool of the stopped daemon.
        Q::Drain {
            to,
            destination,
            connections,
            auth_file,
            peer_name,
            ca_file,
            loopback_unverified,
            common,
        } => {
            let args = super::drain::Args {
                to,
                destination: destination.as_deref(),
                connections: *connections,
                auth_file: auth_file.as_deref(),
                peer_name: peer_name.as_deref(),
                ca_file: ca_file.as_deref(),
                loopback_unverified: *loopback_unverified,
            };
            return super::drain::run(common.config.as_deref(), &args);
        }
        Q::Flush { select, common } => (
            common,
            Request::post("/queue/retry", select.to_json()),
            render_done,
        ),
        Q::Hold { select, common } => (
            common,
            Request::post("/queue/hold", select.to_json()),
            render_done,
        ),
        Q::Release { select, common } => (
            common,
            Request::post("/queue/release", select.to_json()),
            render_done,
        ),
        Q::Delete { select, common } => (
            common,
            Request::post("/queue/delete", select.to_json()),
            render_done,
        ),
        Q::Bounce { select, common } => (
            common,
            Request::post("/queue/bounce", select.to_json()),
            render_done,
        ),
    };
    let config = match load(common.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let client = AdminClient::new(&config);
    match client.call(request.method, &request.path, request.body.as_ref()) {
        Ok(answer) => {
            if common.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&answer).unwrap_or_default()
                );
            } else {
                print!("{}", render(&answer));
            }
            ExitCode::SUCCESS
        }
        Err(CallError::Unreachable(why)) => match command {
            Q::List {
                common,
                destination,
                sender,
                held,
                ..
            } => offline_list(
                common.config.as_deref(),
                common.json,
                destination,
                sender,
                held,
            ),
            Q::Show { id, common, body } => offline_show(common.config.as_deref(), id, body),
            _ => {
                eprintln!("tern: {why}");
                eprintln!("tern: this command needs the running daemon");
                ExitCode::from(EX_TEMPFAIL)
            }
        },
        Err(err @ CallError::Api { status, .. }) => {
            eprintln!("tern: {err}");
            if status == 401 || status == 403 {
                ExitCode::from(super::EX_NOPERM)
            } else if (400..500).contains(&status) {
                ExitCode::from(EX_DATAERR)
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("tern: {err}");
            ExitCode::FAILURE
        }
    }
}

/// One admin API request of a `tern queue` command.
struct Request {
    method: &'static str,
    path: String,
    body: Option<serde_json::Value>,
}

impl Request {
    fn get(path: &str) -> Request {
        Request {
            method: "GET",
            path: path.to_string(),
            body: None,
        }
    }

    fn post(path: &str, body: serde_json::Value) -> Request {
        Request {
            method: "POST",
            path: path.to_string(),
            body: Some(body),
        }
    }
}

type Render = fn(&serde_json::Value) -> String;

/// Answers of the management commands: what changed.
fn render_done(v: &serde_json::Value) -> String {
    if let Some(affected) = v["affected"].as_u64() {
        format!(
            "{affected} of {} matching messages affected\n",
            v["matched"]
        )
    } else if let Some(s) = v.get("suspended") {
        let what = s["destination"].as_str().unwrap_or("all delivery");
        match s["until_ms"].as_u64() {
            Some(until) => format!(
                "suspended {what} until {}\n",
                crate::message::rfc5322_date(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(until),
                )
            ),
            None => format!("suspended {what} until resumed\n"),
        }
    } else {
        let what = v["destination"].as_str().unwrap_or("all delivery");
        if v["resumed"] == true {
            format!("resumed {what}\n")
        } else {
            format!("{what} was not suspended\n")
        }
    }
}

/// `tern queue list` on the spool of a stopped daemon.
fn offline_list(
    config: Option<&Path>,
    json: bool,
    destination: Option<String>,
    sender: Option<String>,
    held: bool,
) -> ExitCode {
    let spool = match open_spool(config) {
        Ok(spool) => spool,
        Err(code) => return code,
    };
    let envelopes = match spool.list() {
        Ok(mut envelopes) => {
            let destination = destination.map(|d| d.to_ascii_lowercase());
            envelopes.retain(|env| {
                destination.as_ref().is_none_or(|d| env.destination == *d)
                    && sender
                        .as_ref()
                        .is_none_or(|s| env.sender.eq_ignore_ascii_case(s))
                    && (!held || env.held)
            });
            envelopes
        }
        Err(err) => {
            eprintln!("tern: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        let _ = serde_json::to_writer_pretty(&mut out, &envelopes);
        let _ = writeln!(out);
    } else {
        let mut table = Table::new(&[
            ("ID", Left),
            ("SIZE", Right),
            ("DESTINATION", Left),
            ("CREATED", Left),
            ("RCPTS", Right),
            ("ATTEMPTS", Right),
            ("SENDER", Left),
        ]);
        for env in &envelopes {
            let created = crate::message::rfc5322_date(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(env.created_ms),
            );
            let sender = if env.sender.is_empty() {
                "<>"
            } else {
                &env.sender
            };
            table.row([
                env.id.to_string(),
                env.size.to_string(),
                env.destination.clone(),
                created,
                env.recipients.len().to_string(),
                env.attempts.to_string(),
                sender.to_owned(),
            ]);
        }
        let _ = write!(out, "{}", table.render());
        let stats = spool.stats();
        let _ = writeln!(out, "-- {} messages, {} bytes", stats.messages, stats.bytes);
    }
    ExitCode::SUCCESS
}

/// `tern queue show` on the spool of a stopped daemon.
fn offline_show(config: Option<&Path>, id: String, body: bool) -> ExitCode {
    let Ok(id) = id.parse::<MessageId>() else {
        eprintln!("tern: {id:?} is not a message id (16 hex digits)");
        return ExitCode::from(EX_DATAERR);
    };
    let spool = match open_spool(config) {
        Ok(spool) => spool,
        Err(code) => return code,
    };
    let (envelope, content) = match (spool.envelope(id), spool.body(id)) {
        (Ok(Some(env)), Ok(Some(content))) => (env, content),
        (Ok(None), _) | (_, Ok(None)) => {
            eprintln!("tern: no message {id} in the spool");
            return ExitCode::from(EX_DATAERR);
        }
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("tern: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, &envelope);
    let _ = writeln!(out);
    let _ = writeln!(out);
    let shown = if body {
        &content[..]
    } else {
        let end = memchr::memmem::find(&content, b"\r\n\r\n").map_or(content.len(), |p| p + 2);
        &content[..end]
    };
    let _ = out.write_all(shown);
    ExitCode::SUCCESS
}

fn open_spool(config: Option<&Path>) -> Result<Spool, ExitCode> {
    let config = load(config)?;
    Spool::open(&config.spool.path).map_err(|err| {
        eprintln!("tern: {err}");
        match err {
            SpoolError::InUse { .. } => {
                eprintln!("tern: stop the daemon first; `tern queue` reads the spool directly");
                ExitCode::from(EX_TEMPFAIL)
            }
            _ => ExitCode::FAILURE,
        }
    })
}

/// "3d4h", "2h5m", "42s": the two largest units.
fn age(seconds: u64) -> String {
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut out = String::new();
    let mut rest = seconds;
    let mut shown = 0;
    for (size, name) in units {
        if rest >= size || (size == 1 && out.is_empty()) {
            let _ = write!(out, "{}{name}", rest / size);
            rest %= size;
            shown += 1;
            if shown == 2 {
                break;
            }
        } else if shown > 0 {
            break;
        }
    }
    out
}

fn suspension_text(s: &Value) -> String {
    if s.is_null() {
        return "-".into();
    }
    let until = match s["until_ms"].as_u64() {
        Some(until) => format!("for {}", age(until.saturating_sub(now_ms()) / 1000)),
        None => "until resumed".into(),
    };
    match s["reason"].as_str().filter(|r| !r.is_empty()) {
        Some(reason) => format!("{until} ({reason})"),
        None => until,
    }
}

fn sender_text(v: &Value) -> &str {
    match v.as_str() {
        Some("") | None => "<>",
        Some(s) => s,
    }
}

/// `GET /queue/summary` as a table, then the age histogram (messages per destination by age
/// in minutes, like Postfix's qshape: `T` the total, each column up to its bound, the last
/// one older).
fn render_summary(v: &Value) -> String {
    let mut out = String::new();
    if !v["suspended_all"].is_null() {
        let _ = writeln!(
            out,
            "ALL DELIVERY SUSPENDED {}",
            suspension_text(&v["suspended_all"])
        );
    }
    let mut table = Table::new(&[
        ("DESTINATION", Left),
        ("MESSAGES", Right),
        ("RCPTS", Right),
        ("BYTES", Right),
        ("OLDEST", Right),
        ("HELD", Right),
        ("SUSPENDED", Left),
    ]);
    let destinations = v["destinations"].as_array().map_or(&[][..], Vec::as_slice);
    for d in destinations {
        table.row([
            d["destination"].as_str().unwrap_or("").to_owned(),
            d["messages"].to_string(),
            d["pending_recipients"].to_string(),
            d["bytes"].to_string(),
            d["oldest_age_s"].as_u64().map_or("-".into(), age),
            d["held"].to_string(),
            suspension_text(&d["suspended"]),
        ]);
    }
    out.push_str(&table.render());
    let t = &v["totals"];
    let _ = writeln!(
        out,
        "-- {} messages, {} pending recipients, {} bytes, {} held",
        t["messages"], t["pending_recipients"], t["bytes"], t["held"]
    );
    let Some(bounds) = v["age_buckets_minutes"].as_array() else {
        return out;
    };
    // Header: "T 5 10 ... 1280 1280+" minutes.
    let mut columns: Vec<String> = vec!["AGE (minutes)".into(), "T".into()];
    columns.extend(bounds.iter().map(Value::to_string));
    if let Some(last) = bounds.last() {
        columns.push(format!("{last}+"));
    }
    let spec: Vec<(&str, Align)> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), if i == 0 { Left } else { Right }))
        .collect();
    let mut histogram = Table::new(&spec);
    let row = |name: &str, counts: &Value| -> Vec<String> {
        let counts: Vec<u64> = counts
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect();
        let mut cells = vec![name.to_owned(), counts.iter().sum::<u64>().to_string()];
        cells.extend(counts.iter().map(u64::to_string));
        cells
    };
    histogram.row(row("TOTAL", &t["age_histogram"]));
    for d in destinations {
        histogram.row(row(
            d["destination"].as_str().unwrap_or(""),
            &d["age_histogram"],
        ));
    }
    out.push('\n');
    out.push_str(&histogram.render());
    out
}

/// `GET /queue/messages` as a table.
fn render_list(v: &Value) -> String {
    let mut table = Table::new(&[
        ("ID", Left),
        ("SIZE", Right),
        ("DESTINATION", Left),
        ("AGE", Right),
        ("RCPTS", Right),
        ("ATTEMPTS", Right),
        ("STATE", Left),
        ("SENDER", Left),
    ]);
    let messages = v["messages"].as_array().map_or(&[][..], Vec::as_slice);
    for m in messages {
        table.row([
            m["id"].as_str().unwrap_or("").to_owned(),
            m["size"].to_string(),
            m["destination"].as_str().unwrap_or("").to_owned(),
            age(m["age_s"].as_u64().unwrap_or(0)),
            m["recipients"].as_array().map_or(0, Vec::len).to_string(),
            m["attempts"].to_string(),
            message_state(m).to_owned(),
            sender_text(&m["sender"]).to_owned(),
        ]);
    }
    let mut out = table.render();
    let _ = write!(out, "-- {} messages", messages.len());
    match v["next"].as_str() {
        Some(next) => {
            let _ = writeln!(out, "; more with --after {next}");
        }
        None => out.push('\n'),
    }
    out
}

fn message_state(m: &Value) -> &'static str {
    if m["held"] == true {
        "held"
    } else if m["parked"] == true {
        "suspended"
    } else if m["next_due_ms"].as_u64().is_some_and(|due| due > now_ms()) {
        "deferred"
    } else {
        "due"
    }
}

/// `GET /queue/messages/{id}`: the envelope, then (with `?body=true`) the message.
fn render_message(m: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "id:          {}", m["id"].as_str().unwrap_or(""));
    let _ = writeln!(out, "queue id:    {}", m["queue_id"].as_str().unwrap_or(""));
    let _ = writeln!(out, "sender:      {}", sender_text(&m["sender"]));
    let _ = writeln!(
        out,
        "destination: {}",
        m["destination"].as_str().unwrap_or("")
    );
    let _ = writeln!(out, "size:        {}", m["size"]);
    let _ = writeln!(
        out,
        "age:         {}",
        age(m["age_s"].as_u64().unwrap_or(0))
    );
    let _ = writeln!(out, "attempts:    {}", m["attempts"]);
    let _ = writeln!(out, "state:       {}", message_state(m));
    for r in m["recipients"].as_array().into_iter().flatten() {
        let _ = write!(
            out,
            "recipient:   {} {} (attempts {})",
            r["address"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            r["attempts"]
        );
        if let Some(reply) = r["last_reply"].as_str() {
            let _ = write!(out, ": {reply}");
        }
        out.push('\n');
    }
    if let Some(body) = m["body"].as_str() {
        out.push('\n');
        out.push_str(body);
    } else if let Some(b64) = m["body_base64"].as_str() {
        let _ = write!(out, "\n(8-bit content, base64)\n{b64}\n");
    }
    out
}

/// `GET /queue/suspensions` as lines.
fn render_suspensions(v: &Value) -> String {
    let list = v["suspensions"].as_array().map_or(&[][..], Vec::as_slice);
    if list.is_empty() {
        return "no suspensions\n".into();
    }
    let mut table = Table::new(&[("DESTINATION", Left), ("SUSPENDED", Left)]);
    for s in list {
        table.row([
            s["destination"]
                .as_str()
                .unwrap_or("(all delivery)")
                .to_owned(),
            suspension_text(s),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_show_two_units() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(42), "42s");
        assert_eq!(age(3_600 + 120 + 5), "1h2m");
        assert_eq!(age(2 * 86_400 + 5), "2d");
        assert_eq!(age(86_400 + 3_600), "1d1h");
    }
}
