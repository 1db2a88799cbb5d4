//! The operator's side of the admin API: [`AdminClient`] (one blocking HTTP/1.1 request per
//! call over a std `TcpStream`, bearer token from `admin.token_file`) and the human renderings
//! of its answers that `tern queue ...` prints.
//!
//! Invariants: a daemon that cannot be reached is [`CallError::Unreachable`], distinct from an
//! error the API answered, so the CLI can fall back to reading a stopped daemon's spool; the
//! API's own error message is what the operator sees for the latter.

use crate::clock::now_ms;
use crate::config::Config;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
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
    address: SocketAddr,
    token_file: Option<PathBuf>,
}

impl AdminClient {
    pub fn new(config: &Config) -> AdminClient {
        AdminClient {
            address: config.admin.address,
            token_file: config.admin.token_file.clone(),
        }
    }

    /// One request; `body` is sent as JSON. Returns the answer's JSON.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
        let mut stream =
            TcpStream::connect_timeout(&self.address, CONNECT_TIMEOUT).map_err(|e| {
                CallError::Unreachable(format!(
                    "cannot reach the daemon's admin API at {} (admin.address): {e}",
                    self.address
                ))
            })?;
        let token_file = self.token_file.as_ref().ok_or_else(|| {
            CallError::Other(
                "admin.token_file is not set in the configuration: the admin API is disabled"
                    .into(),
            )
        })?;
        let token = std::fs::read_to_string(token_file).map_err(|e| {
            CallError::Other(format!(
                "admin.token_file: cannot read {}: {e}",
                token_file.display()
            ))
        })?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} /api/v1{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.address,
            token.trim(),
            body.len()
        );
        let broken = |e: std::io::Error| CallError::Other(format!("admin API: {e}"));
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(broken)?;
        stream.write_all(request.as_bytes()).map_err(broken)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).map_err(broken)?;
        let (status, body) = parse_response(&response)
            .ok_or_else(|| CallError::Other("admin API: malformed HTTP answer".into()))?;
        let json: Value = serde_json::from_slice(&body).map_err(|e| {
            CallError::Other(format!("admin API answered {status} without JSON: {e}"))
        })?;
        if (200..300).contains(&status) {
            Ok(json)
        } else {
            let message = json["error"]
                .as_str()
                .map_or_else(|| json.to_string(), str::to_string);
            Err(CallError::Api { status, message })
        }
    }
}

/// Status code and body (de-chunked if need be) of an HTTP/1.1 answer.
fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let mut body = &raw[end + 4..];
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some((status, body.to_vec()));
    }
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..line_end]).ok()?.trim(), 16).ok()?;
        if size == 0 {
            return Some((status, out));
        }
        let chunk = body.get(line_end + 2..line_end + 2 + size)?;
        out.extend_from_slice(chunk);
        body = body.get(line_end + 4 + size..)?;
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

    #[test]
    fn chunked_answers_are_joined() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw), Some((200, b"{\"a\":1}".to_vec())));
        let plain = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain), Some((404, b"{}".to_vec())));
    }
}
