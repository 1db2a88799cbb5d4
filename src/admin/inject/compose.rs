//! The structured form of an injection (`"message": {...}`): turned into an RFC 5322 MIME
//! message with mail-builder (multipart/alternative for text + HTML, multipart/mixed with
//! attachments, RFC 2047 encoded words for non-ASCII header text).
//!
//! Invariants: every error names the JSON field it is about (`message.to[1]`,
//! `message.attachments[0].content_base64`), and caller-supplied header fields can neither
//! inject lines (CR/LF refused) nor duplicate the fields the builder writes itself.

use crate::rfc5321::address::check_mailbox;
use base64::Engine as _;
use mail_builder::headers::address::Address;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::MessageBuilder;
use serde::Deserialize;
use serde_json::Value;

/// The `message` object of an injection request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Structured {
    /// From header; default: the envelope sender.
    #[serde(default)]
    pub from: Option<String>,
    /// An address or a list of addresses, each `a@b` or `Name <a@b>`.
    #[serde(default)]
    pub to: Option<Value>,
    #[serde(default)]
    pub cc: Option<Value>,
    #[serde(default)]
    pub reply_to: Option<Value>,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    /// `{"Name": "value", ...}` or `[{"name": "Name", "value": "value"}, ...]` (the list form
    /// allows a field more than once).
    #[serde(default)]
    pub headers: Option<Value>,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub filename: String,
    /// `type/subtype`; default `application/octet-stream`.
    #[serde(default)]
    pub content_type: Option<String>,
    pub content_base64: String,
}

/// Header fields the builder owns: set through their own JSON fields instead.
const OWNED_FIELDS: [(&str, &str); 8] = [
    ("from", "message.from"),
    ("to", "message.to"),
    ("cc", "message.cc"),
    ("reply-to", "message.reply_to"),
    ("subject", "message.subject"),
    ("mime-version", "the builder"),
    (
        "content-type",
        "message.text, message.html and message.attachments",
    ),
    ("content-transfer-encoding", "the builder"),
];

/// Builds the message. `envelope_from` is the From header's default; `hostname` is the
/// right-hand side of a generated Message-ID. Errors are `"<field>: <what is wrong>"`.
pub fn build(msg: Structured, envelope_from: &str, hostname: &str) -> Result<Vec<u8>, String> {
    let from = match msg.from.as_deref() {
        Some(from) => mailbox("message.from", from)?,
        None if !envelope_from.is_empty() => mailbox("from", envelope_from)?,
        None => return Err("message.from: required when from is the null sender".into()),
    };
    if msg.text.is_none() && msg.html.is_none() && msg.attachments.is_empty() {
        return Err("message: needs text, html or attachments".into());
    }
    let mut builder = MessageBuilder::new().from(from);
    for (field, value) in [
        ("to", &msg.to),
        ("cc", &msg.cc),
        ("reply_to", &msg.reply_to),
    ] {
        let Some(value) = value else { continue };
        let list = address_list(&format!("message.{field}"), value)?;
        if list.is_empty() {
            continue;
        }
        let list = Address::new_list(list);
        builder = match field {
            "to" => builder.to(list),
            "cc" => builder.cc(list),
            _ => builder.reply_to(list),
        };
    }
    if let Some(subject) = msg.subject {
        builder = builder.subject(subject);
    }
    let mut has_message_id = false;
    for (i, (name, value)) in header_fields(msg.headers)?.into_iter().enumerate() {
        let field = format!("message.headers[{i}]");
        let name = header_name(&field, &name)?;
        if value.contains(['\r', '\n', '\0']) {
            return Err(format!("{field}: value of {name} contains CR, LF or NUL"));
        }
        has_message_id |= name == "Message-ID";
        builder = builder.header(name, Text::new(value));
    }
    if !has_message_id {
        // mail-builder would use the machine's name; ours is server.hostname.
        let unique: u64 = rand::random();
        builder = builder.header(
            "Message-ID",
            Raw::new(format!("<{unique:016x}.api@{hostname}>")),
        );
    }
    if let Some(text) = msg.text {
        builder = builder.text_body(text);
    }
    if let Some(html) = msg.html {
        builder = builder.html_body(html);
    }
    for (i, attachment) in msg.attachments.into_iter().enumerate() {
        let field = format!("message.attachments[{i}]");
        if attachment.filename.is_empty() || attachment.filename.chars().any(char::is_control) {
            return Err(format!(
                "{field}.filename: must be non-empty, without control characters"
            ));
        }
        let content_type = attachment
            .content_type
            .unwrap_or_else(|| "application/octet-stream".into());
        if !is_mime_type(&content_type) {
            return Err(format!(
                "{field}.content_type: {content_type:?} is not a type/subtype"
            ));
        }
        let compact: Vec<u8> = attachment
            .content_base64
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|e| format!("{field}.content_base64: invalid base64: {e}"))?;
        builder = builder.attachment(content_type, attachment.filename, bytes);
    }
    builder
        .write_to_vec()
        .map_err(|e| format!("message: cannot build: {e}"))
}

/// `a@b` or `Name <a@b>` (the name may be quoted).
fn mailbox(field: &str, text: &str) -> Result<Address<'static>, String> {
    let text = text.trim();
    let (name, address) = match text.strip_suffix('>').and_then(|t| t.rsplit_once('<')) {
        Some((name, address)) => {
            let name = name.trim();
            let name = name
                .strip_prefix('"')
                .and_then(|n| n.strip_suffix('"'))
                .unwrap_or(name);
            (Some(name.to_string()).filter(|n| !n.is_empty()), address)
        }
        None => (None, text),
    };
    check_mailbox(address).map_err(|why| format!("{field}: {why} ({address:?})"))?;
    if name
        .as_deref()
        .is_some_and(|n| n.chars().any(char::is_control))
    {
        return Err(format!("{field}: display name contains control characters"));
    }
    Ok(Address::new_address(name, address.to_string()))
}

/// One address, or a list of them.
fn address_list(field: &str, value: &Value) -> Result<Vec<Address<'static>>, String> {
    match value {
        Value::String(one) => Ok(vec![mailbox(field, one)?]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(one) => mailbox(&format!("{field}[{i}]"), one),
                _ => Err(format!("{field}[{i}]: expected an address string")),
            })
            .collect(),
        _ => Err(format!(
            "{field}: expected an address or a list of addresses"
        )),
    }
}

/// The `headers` value as (name, value) pairs in order.
fn header_fields(headers: Option<Value>) -> Result<Vec<(String, String)>, String> {
    let string = |field: String, v: Value| match v {
        Value::String(s) => Ok(s),
        _ => Err(format!("{field}: expected a string")),
    };
    match headers {
        None => Ok(Vec::new()),
        Some(Value::Object(map)) => map
            .into_iter()
            .map(|(name, value)| {
                let value = string(format!("message.headers.{name}"), value)?;
                Ok((name, value))
            })
            .collect(),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let field = format!("message.headers[{i}]");
                let Value::Object(mut item) = item else {
                    return Err(format!(
                        "{field}: expected {{\"name\": ..., \"value\": ...}}"
                    ));
                };
                let name = string(
                    format!("{field}.name"),
                    item.remove("name").unwrap_or_default(),
                )?;
                let value = string(
                    format!("{field}.value"),
                    item.remove("value").unwrap_or_default(),
                )?;
                Ok((name, value))
            })
            .collect(),
        Some(_) => Err("message.headers: expected an object or a list of {name, value}".into()),
    }
}

/// A valid field name (RFC 5322 ftext) the builder does not own; Date and Message-ID get the
/// spelling mail-builder looks for, so it does not add its own.
fn header_name(field: &str, name: &str) -> Result<String, String> {
    if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return Err(format!("{field}: invalid header field name {name:?}"));
    }
    let lower = name.to_ascii_lowercase();
    if let Some((_, instead)) = OWNED_FIELDS.iter().find(|(owned, _)| *owned == lower) {
        return Err(format!("{field}: {name} is set by {instead}"));
    }
    Ok(match lower.as_str() {
        "date" => "Date".into(),
        "message-id" => "Message-ID".into(),
        _ => name.into(),
    })
}

fn is_mime_type(text: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    text.split_once('/')
        .is_some_and(|(kind, sub)| token(kind) && token(sub))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::{MessageParser, MimeHeaders};

    fn structured(json: Value) -> Structured {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn builds_parseable_mime() {
        let msg = structured(serde_json::json!({
            "to": ["Bob <bob@a.test>", "carol@b.test"],
            "subject": "Grüße",
            "text": "plain\nbody",
            "html": "<p>html</p>",
            "headers": {"X-Campaign": "c1", "date": "Tue, 01 Jul 2025 10:00:00 +0000"},
            "attachments": [{"filename": "a.bin", "content_base64": "AAEC/w=="}],
        }));
        let bytes = build(msg, "alice@x.test", "tern.test").unwrap();
        let parsed = MessageParser::default().parse(&bytes).unwrap();
        assert_eq!(parsed.subject(), Some("Grüße"));
        assert_eq!(
            parsed.from().unwrap().first().unwrap().address(),
            Some("alice@x.test")
        );
        assert_eq!(parsed.to().unwrap().iter().count(), 2);
        // mail-builder writes text with CRLF line ends.
        assert_eq!(parsed.body_text(0).as_deref(), Some("plain\r\nbody"));
        assert_eq!(parsed.attachment(0).unwrap().contents(), [0, 1, 2, 255]);
        assert_eq!(
            parsed.attachment(0).unwrap().attachment_name(),
            Some("a.bin")
        );
        assert_eq!(parsed.header_raw("X-Campaign").map(str::trim), Some("c1"));
        assert_eq!(parsed.date().unwrap().year, 2025);
        assert!(parsed.message_id().unwrap().ends_with(".api@tern.test"));
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(
            text.matches("\nDate:").count() + usize::from(text.starts_with("Date:")),
            1
        );
    }

    #[test]
    fn errors_name_the_field() {
        let err = |json: Value, from: &str| build(structured(json), from, "h").unwrap_err();
        assert!(err(serde_json::json!({"text": "x"}), "").starts_with("message.from:"));
        assert!(err(
            serde_json::json!({"to": ["a@b.test", "bad"], "text": "x"}),
            "a@b.test"
        )
        .starts_with("message.to[1]:"));
        assert!(err(
            serde_json::json!({"headers": {"Subject": "x"}, "text": "x"}),
            "a@b.test"
        )
        .contains("message.subject"));
        assert!(err(
            serde_json::json!({"headers": [{"name": "X-A", "value": "a\r\nBcc: x@y"}], "text": "x"}),
            "a@b.test"
        )
        .starts_with("message.headers[0]:"));
        assert!(err(
            serde_json::json!({"attachments": [{"filename": "f", "content_base64": "!!"}]}),
            "a@b.test"
        )
        .starts_with("message.attachments[0].content_base64:"));
        assert!(err(serde_json::json!({"subject": "no body"}), "a@b.test").starts_with("message:"));
    }
}
