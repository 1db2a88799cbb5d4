//! DSN parsing for tests: a delivery status notification received by a sink, split into its
//! parts and its per-message and per-recipient status fields (RFC 3464).

#![allow(dead_code)]

use mail_parser::{MessageParser, MimeHeaders, PartType};

use crate::sink::ReceivedMessage;

/// A DSN as received: the per-message and per-recipient fields of its status part.
#[derive(Debug)]
pub struct Dsn {
    pub subject: String,
    pub report_type: String,
    /// The type of the second (status) part, e.g. "message/delivery-status".
    pub status_type: String,
    pub message_fields: Vec<(String, String)>,
    pub recipients: Vec<Vec<(String, String)>>,
    pub text: String,
    /// The third part: its type and raw content.
    pub original_type: String,
    pub original: Vec<u8>,
}

impl Dsn {
    pub fn field(&self, name: &str) -> Option<&str> {
        get(&self.message_fields, name)
    }

    /// A field of the only recipient group.
    #[track_caller]
    pub fn rcpt(&self, name: &str) -> Option<&str> {
        assert_eq!(self.recipients.len(), 1, "one recipient group: {self:#?}");
        get(&self.recipients[0], name)
    }
}

fn get<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
    group
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Parses a DSN received by a sink (asserting it is a `<>`-sender `multipart/report`).
#[track_caller]
pub fn parse_dsn(m: &ReceivedMessage) -> Dsn {
    assert_eq!(m.mail_from, "", "a DSN's envelope sender is <>: {m:#?}");
    let msg = MessageParser::default()
        .parse(&m.data[..])
        .expect("DSN parses");
    let ct = msg.content_type().expect("DSN has a Content-Type");
    assert_eq!(
        (ct.ctype(), ct.subtype()),
        ("multipart", Some("report")),
        "{}",
        String::from_utf8_lossy(&m.data)
    );
    let report_type = ct.attribute("report-type").unwrap_or_default().to_string();
    let PartType::Multipart(ids) = &msg.parts[0].body else {
        panic!("DSN is not multipart")
    };
    assert_eq!(ids.len(), 3, "three parts");
    let part = |i: usize| &msg.parts[ids[i] as usize];
    let status_ct = part(1).content_type().expect("status part type");
    let status_type = format!(
        "{}/{}",
        status_ct.ctype(),
        status_ct.subtype().unwrap_or_default()
    );
    let status = match &part(1).body {
        PartType::Message(inner) => inner.raw_message().to_vec(),
        _ => part(1).contents().to_vec(),
    };
    let text = String::from_utf8(status)
        .expect("status part is UTF-8")
        .replace("\r\n ", " ");
    let mut groups: Vec<Vec<(String, String)>> = text
        .split("\r\n\r\n")
        .filter(|g| !g.trim().is_empty())
        .map(|g| {
            g.split("\r\n")
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l
                        .split_once(':')
                        .unwrap_or_else(|| panic!("not a field: {l:?}"));
                    (k.to_owned(), v.trim().to_owned())
                })
                .collect()
        })
        .collect();
    assert!(groups.len() >= 2, "message and recipient groups: {text}");
    let message_fields = groups.remove(0);
    let original_ct = part(2).content_type().expect("third part type");
    let original_type = format!(
        "{}/{}",
        original_ct.ctype(),
        original_ct.subtype().unwrap_or_default()
    );
    let original = match &part(2).body {
        PartType::Message(inner) => inner.raw_message().to_vec(),
        _ => part(2).contents().to_vec(),
    };
    Dsn {
        subject: msg.subject().unwrap_or_default().to_string(),
        report_type,
        status_type,
        message_fields,
        recipients: groups,
        text: part(0).text_contents().unwrap_or_default().to_string(),
        original_type,
        original,
    }
}
