//! `tern queue ...`: the human renderings of the admin API's queue answers (summary, message
//! list, one message, suspensions).

use crate::clock::now_ms;
use serde_json::Value;
use std::fmt::Write as _;

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
}
