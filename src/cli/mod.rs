//! The operator's side of the admin API: [`AdminClient`] (one blocking call per command over
//! [`ApiClient`], bearer token from `admin.token_file`) and the human renderings of its
//! answers that `tern queue ...` prints.
//!
//! Invariants: a daemon that cannot be reached is [`CallError::Unreachable`], distinct from an
//! error the API answered, so the CLI can fall back to reading a stopped daemon's spool; the
//! API's own error message is what the operator sees for the latter.

pub mod client;

use crate::clock::now_ms;
use crate::config::{AdminConfig, Config};
use client::{address_of, ApiClient};
use serde_json::Value;
use std::fmt::Write as _;
use std::net::TcpStream;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bouncing or deleting many messages takes a while: one fsync round per message.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub enum CallError {
    /// Nothing listens on `admin.address`: the daemon is not running (or elsewhere).
    Unreachable(String),
    /// The API answered with an error status and message.
    Api { status: u16, message: String },
    /// Anything else: no token file, a broken answer.
    Other(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(m) | CallError::Other(m) => f.write_str(m),
            CallError::Api { status, message } => write!(f, "{message} (HTTP {status})"),
        }
    }
}

pub struct AdminClient {
    admin: AdminConfig,
}

impl AdminClient {
    pub fn new(config: &Config) -> AdminClient {
        AdminClient {
            admin: config.admin.clone(),
        }
    }

    /// One request to `/api/v1{path}` with a raw body (CSV import); returns the raw answer
    /// (CSV export), or the API's error.
    pub fn call_raw(&self, method: &str, path: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        let address = address_of(&self.admin);
        let mut client = ApiClient::from_config(&self.admin)
            .map_err(CallError::Other)?
            .with_timeout(ANSWER_TIMEOUT);
        client.connect().map_err(|e| {
            CallError::Unreachable(format!(
                "cannot reach the daemon's admin API at {address} (admin.address): {e}"
            ))
        })?;
        let (status, answer) = client
            .call_raw(method, &format!("/api/v1{path}"), body)
            .map_err(|e| CallError::Other(format!("admin API: {e}")))?;
        if (200..300).contains(&status) {
            Ok(answer)
        } else {
            let message = serde_json::from_slice::<Value>(&answer)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
            Err(CallError::Api { status, message })
        }
    }

    /// One request to `/api/v1{path}`; `body` is sent as JSON. Returns the answer's JSON.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
        let address = address_of(&self.admin);
        let unreachable = |e: std::io::Error| {
            CallError::Unreachable(format!(
                "cannot reach the daemon's admin API at {address} (admin.address): {e}"
            ))
        };
        let mut client = match ApiClient::from_config(&self.admin) {
            Ok(client) => client.with_timeout(ANSWER_TIMEOUT),
            // Without a token no call can succeed; but a daemon that is not running is still
            // worth telling apart, for the commands that can read its spool instead.
            Err(why) => {
                return Err(
                    match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
                        Ok(_) => CallError::Other(why),
                        Err(e) => unreachable(e),
                    },
                )
            }
        };
        client.connect().map_err(unreachable)?;
        let answer = client
            .call(method, &format!("/api/v1{path}"), body)
            .map_err(|e| CallError::Other(format!("admin API: {e}")))?;
        if (200..300).contains(&answer.status) {
            Ok(answer.body)
        } else {
            Err(CallError::Api {
                status: answer.status,
                message: answer.error(),
            })
        }
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
pub fn query_value(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
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

/// `GET /queue/summary` as a table.
pub fn render_summary(v: &Value) -> String {
    let mut out = String::new();
    if !v["suspended_all"].is_null() {
        let _ = writeln!(
            out,
            "ALL DELIVERY SUSPENDED {}",
            suspension_text(&v["suspended_all"])
        );
    }
    let _ = writeln!(
        out,
        "{:<30}  {:>8}  {:>8}  {:>12}  {:>8}  {:>5}  SUSPENDED",
        "DESTINATION", "MESSAGES", "RCPTS", "BYTES", "OLDEST", "HELD"
    );
    for d in v["destinations"].as_array().into_iter().flatten() {
        let oldest = d["oldest_age_s"].as_u64().map_or("-".into(), age);
        let _ = writeln!(
            out,
            "{:<30}  {:>8}  {:>8}  {:>12}  {:>8}  {:>5}  {}",
            d["destination"].as_str().unwrap_or(""),
            d["messages"],
            d["pending_recipients"],
            d["bytes"],
            oldest,
            d["held"],
            suspension_text(&d["suspended"])
        );
    }
    let t = &v["totals"];
    let _ = writeln!(
        out,
        "-- {} messages, {} pending recipients, {} bytes, {} held",
        t["messages"], t["pending_recipients"], t["bytes"], t["held"]
    );
    out
}

/// `GET /queue/messages` as a table.
pub fn render_list(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16}  {:>9}  {:<24}  {:>8}  {:>5}  {:>8}  {:<10}  SENDER",
        "ID", "SIZE", "DESTINATION", "AGE", "RCPTS", "ATTEMPTS", "STATE"
    );
    let messages = v["messages"].as_array().map_or(&[][..], Vec::as_slice);
    for m in messages {
        let _ = writeln!(
            out,
            "{:<16}  {:>9}  {:<24}  {:>8}  {:>5}  {:>8}  {:<10}  {}",
            m["id"].as_str().unwrap_or(""),
            m["size"],
            m["destination"].as_str().unwrap_or(""),
            age(m["age_s"].as_u64().unwrap_or(0)),
            m["recipients"].as_array().map_or(0, Vec::len),
            m["attempts"],
            message_state(m),
            sender_text(&m["sender"])
        );
    }
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
pub fn render_message(m: &Value) -> String {
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
pub fn render_suspensions(v: &Value) -> String {
    let list = v["suspensions"].as_array().map_or(&[][..], Vec::as_slice);
    if list.is_empty() {
        return "no suspensions\n".into();
    }
    let mut out = String::new();
    for s in list {
        let _ = writeln!(
            out,
            "{:<30}  {}",
            s["destination"].as_str().unwrap_or("(all delivery)"),
            suspension_text(s)
        );
    }
    out
}

/// `tern suppression list`: one line per entry, then the cursor of the next page if any.
pub fn render_suppressions(v: &Value) -> String {
    let mut out = format!(
        "{:<40} {:<18} {:<24} {}\n",
        "ADDRESS", "REASON", "EXPIRES", "SOURCE"
    );
    for e in v["entries"].as_array().into_iter().flatten() {
        let expires = e["expires_ms"]
            .as_u64()
            .map(|t| {
                crate::message::rfc5322_date(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(t),
                )
            })
            .unwrap_or_else(|| "never".into());
        out.push_str(&format!(
            "{:<40} {:<18} {:<24} {}\n",
            e["address"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or(""),
            expires,
            e["source"].as_str().unwrap_or("-"),
        ));
    }
    if let Some(next) = v["next"].as_str() {
        out.push_str(&format!("more: --after {next}\n"));
    }
    out
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

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(query_value("a+b@x.test"), "a%2Bb%40x.test");
        assert_eq!(query_value(""), "");
    }
}
