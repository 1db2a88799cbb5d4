//! Delivery status notifications (RFC 3464), as `multipart/report` messages (RFC 6522).
//!
//! This module owns the bytes of a DSN, not the decision that one is due (the caller knows
//! which recipients failed, are late or were delivered) nor how it is queued.
//!
//! Invariants:
//! - no DSN goes to the null sender: a DSN is never answered by a DSN (RFC 3461 §6.2);
//! - a recipient is reported only if its NOTIFY asks for its action; if none is left, there
//!   is no DSN at all;
//! - every line this module writes goes through [`Writer::wrap`], which turns control
//!   characters (CR, LF, TAB, NUL, ...) into spaces, so text from outside (remote replies,
//!   addresses, ENVID) can neither end a field nor start a header; it folds at spaces and cuts
//!   words at [`MAX_WORD`] bytes, so no line comes near the 998-octet limit (RFC 5322 §2.1.1);
//! - the MIME boundary occurs in none of the parts, the included original message included;
//! - CRLF line ends throughout. The DSN is 7-bit unless the original message or an address
//!   is 8-bit: then it must be submitted with BODY=8BITMIME (and SMTPUTF8 for UTF-8 addresses).
//!
//! Choices:
//! - RET=FULL returns the whole message; RET=HDRS and no RET return only its header section
//!   (RFC 3461 §4.3 leaves the default to the MTA; headers identify the message without
//!   reflecting large or unwanted content back). A DSN that only reports delays always returns
//!   headers only: the message is still being delivered.
//! - A DSN may report several actions at once; its Subject names the most severe one.
//! - UTF-8 addresses (SMTPUTF8) are reported with the RFC 6533 `message/global-*` types;
//!   otherwise non-ASCII text (from a remote reply) is shown as `?`.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use memchr::memmem;
use tern_queue::{Envelope, Notify, Ret};

use crate::message::rfc5322_date;

/// Lines are folded before this many columns where a space allows (RFC 5322 §2.1.1's SHOULD).
const WRAP: usize = 78;
/// Longest word written; a longer one is cut. With the longest field name or indent in front
/// it stays far below the 998-octet line limit.
const MAX_WORD: usize = 900;

/// What happened to a recipient, as reported in the `Action` field. Ordered by severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Delivered,
    Delayed,
    Failed,
}

impl From<Action> for crate::telemetry::DsnAction {
    fn from(action: Action) -> Self {
        match action {
            Action::Delivered => crate::telemetry::DsnAction::Delivered,
            Action::Delayed => crate::telemetry::DsnAction::Delayed,
            Action::Failed => crate::telemetry::DsnAction::Failed,
        }
    }
}

impl Action {
    fn keyword(self) -> &'static str {
        match self {
            Action::Delivered => "delivered",
            Action::Delayed => "delayed",
            Action::Failed => "failed",
        }
    }

    fn wanted_by(self, notify: &Notify) -> bool {
        !notify.never
            && match self {
                Action::Delivered => notify.success,
                Action::Delayed => notify.delay,
                Action::Failed => notify.failure,
            }
    }

    /// The status class (RFC 3463) this action may carry. An expiry after temporary failures
    /// is a `failed` action with a 4.x.x status, so failures accept both.
    fn allows_class(self, class: u8) -> bool {
        match self {
            Action::Delivered => class == b'2',
            Action::Delayed => class == b'4',
            Action::Failed => class == b'4' || class == b'5',
        }
    }

    fn default_status(self) -> &'static str {
        match self {
            Action::Delivered => "2.0.0",
            Action::Delayed => "4.0.0",
            Action::Failed => "5.0.0",
        }
    }
}

/// One recipient to report.
#[derive(Debug, Clone)]
pub struct DsnRecipient<'a> {
    pub address: &'a str,
    /// The ORCPT parameter as stored, e.g. `rfc822;user@example.org`.
    pub orcpt: Option<&'a str>,
    pub action: Action,
    /// Enhanced status code, e.g. `5.1.1`; one that is malformed or does not fit the action
    /// is replaced by the action's generic code (`5.0.0`, `4.0.0`, `2.0.0`).
    pub status: String,
    /// Host name of the remote MTA that gave `diagnostic`.
    pub remote_mta: Option<&'a str>,
    /// The remote SMTP reply (e.g. `550 5.1.1 no such user`), or a local error text.
    pub diagnostic: Option<&'a str>,
    pub last_attempt_ms: Option<u64>,
    /// For `Delayed`: when delivery attempts stop.
    pub will_retry_until_ms: Option<u64>,
}

/// Everything a DSN is built from.
#[derive(Debug, Clone)]
pub struct DsnRequest<'a> {
    /// Our host name.
    pub reporting_mta: &'a str,
    pub envelope: &'a Envelope,
    /// The stored message, headers and body.
    pub original: &'a [u8],
    pub recipients: Vec<DsnRecipient<'a>>,
    pub now: SystemTime,
}

/// The complete DSN message (headers and body, CRLF line ends) from
/// `MAILER-DAEMON@reporting_mta` to the envelope sender, or `None` when none must be sent:
/// the sender is null, or no recipient's NOTIFY asks for its action.
pub fn build(req: &DsnRequest<'_>) -> Option<Vec<u8>> {
    let env = req.envelope;
    if env.sender.is_empty() {
        return None;
    }
    let reported: Vec<&DsnRecipient<'_>> = req
        .recipients
        .iter()
        .filter(|r| r.action.wanted_by(&notify_of(env, r.address)))
        .collect();
    let worst = reported.iter().map(|r| r.action).max()?;
    let utf8 = !env.sender.is_ascii() || reported.iter().any(|r| !r.address.is_ascii());
    let original = Original::select(env.ret, worst, req.original);
    let human = human_part(req, &reported, &original, utf8);
    let status = status_part(req, &reported, utf8);
    let boundary = pick_boundary(
        &[human.as_bytes(), status.as_bytes(), original.bytes],
        std::iter::repeat_with(|| format!("=_tern_{:032x}", rand::random::<u128>())),
    );
    let host = req.reporting_mta;
    let report_type = if utf8 {
        "global-delivery-status"
    } else {
        "delivery-status"
    };

    let mut head = Writer::new(utf8);
    head.field(
        "From",
        &format!("Mail Delivery System <MAILER-DAEMON@{host}>"),
    );
    head.field("To", &format!("<{}>", env.sender));
    head.field(
        "Subject",
        match worst {
            Action::Failed => "Undelivered Mail Returned to Sender",
            Action::Delayed => "Delayed Mail (still being retried)",
            Action::Delivered => "Successful Mail Delivery Report",
        },
    );
    head.field("Date", &rfc5322_date(req.now));
    head.field(
        "Message-ID",
        &format!(
            "<{}.{}.{:016x}@{host}>",
            env.queue_id,
            unix_ms(req.now),
            rand::random::<u64>()
        ),
    );
    head.field("Auto-Submitted", "auto-replied");
    head.field("MIME-Version", "1.0");
    head.field(
        "Content-Type",
        &format!("multipart/report; report-type={report_type}; boundary=\"{boundary}\""),
    );

    let charset = if utf8 { "utf-8" } else { "us-ascii" };
    let mut msg = head.out.into_bytes();
    msg.extend_from_slice(b"\r\nThis is a MIME-encapsulated message.\r\n");
    let mut part = |content_type: &str, description: &str, body: &[u8]| {
        let mut h = Writer::new(utf8);
        h.field("Content-Description", description);
        h.field("Content-Type", content_type);
        h.field("Content-Transfer-Encoding", transfer_encoding(body));
        msg.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        msg.extend_from_slice(h.out.as_bytes());
        msg.extend_from_slice(b"\r\n");
        msg.extend_from_slice(body);
    };
    part(
        &format!("text/plain; charset={charset}"),
        "Notification",
        human.as_bytes(),
    );
    part(
        &format!("message/{report_type}"),
        "Delivery report",
        status.as_bytes(),
    );
    part(
        original.content_type,
        if original.full {
            "Original message"
        } else {
            "Original message headers"
        },
        original.bytes,
    );
    msg.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Some(msg)
}

/// Whether `address`'s NOTIFY asks for a DSN reporting `action`: the filter [`build`]
/// applies, for callers that plan DSNs before building them.
pub fn wanted(env: &Envelope, address: &str, action: Action) -> bool {
    action.wanted_by(&notify_of(env, address))
}

/// The recipient's NOTIFY. One the envelope does not list gets the RFC 3461 default, so that
/// a caller's mistake errs towards telling the sender.
fn notify_of(env: &Envelope, address: &str) -> Notify {
    env.recipients
        .iter()
        .find(|r| r.address == address)
        .map_or_else(Notify::default_rfc3461, |r| r.notify)
}

/// The third part: what of the original message is returned, and as what.
struct Original<'a> {
    /// The whole message rather than its header section.
    full: bool,
    content_type: &'static str,
    bytes: &'a [u8],
}

impl<'a> Original<'a> {
    fn select(ret: Option<Ret>, worst: Action, message: &'a [u8]) -> Original<'a> {
        let headers = header_section(message);
        // RFC 6533 §3: a message or header section with UTF-8 headers has its own types.
        let utf8_headers = !headers.is_ascii();
        if ret == Some(Ret::Full) && worst != Action::Delayed {
            Original {
                full: true,
                content_type: if utf8_headers {
                    "message/global"
                } else {
                    "message/rfc822"
                },
                bytes: message,
            }
        } else {
            Original {
                full: false,
                content_type: if utf8_headers {
                    "message/global-headers"
                } else {
                    "text/rfc822-headers"
                },
                bytes: headers,
            }
        }
    }
}

/// The header section with its final CRLF, without the empty line; all of `message` if it
/// has no body.
fn header_section(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &[];
    }
    memmem::find(message, b"\r\n\r\n").map_or(message, |end| &message[..end + 2])
}

/// The first candidate found in none of `parts`. Random 128-bit candidates practically
/// never collide, but a message could quote a boundary it has seen, so each one is checked.
fn pick_boundary(parts: &[&[u8]], candidates: impl IntoIterator<Item = String>) -> String {
    candidates
        .into_iter()
        .find(|b| {
            parts
                .iter()
                .all(|p| memmem::find(p, b.as_bytes()).is_none())
        })
        .expect("boundary candidates are endless")
}

fn transfer_encoding(body: &[u8]) -> &'static str {
    if body.is_ascii() {
        "7bit"
    } else {
        "8bit"
    }
}

/// The human-readable first part.
fn human_part(
    req: &DsnRequest<'_>,
    reported: &[&DsnRecipient<'_>],
    original: &Original<'_>,
    utf8: bool,
) -> String {
    let env = req.envelope;
    let mut w = Writer::new(utf8);
    w.wrap(
        "",
        "",
        &format!("This is the mail system at host {}.", req.reporting_mta),
    );
    for action in [Action::Failed, Action::Delayed, Action::Delivered] {
        let group: Vec<_> = reported.iter().filter(|r| r.action == action).collect();
        if group.is_empty() {
            continue;
        }
        w.blank();
        w.wrap(
            "",
            "",
            match action {
                Action::Failed => {
                    "Your message could not be delivered to the following recipients; \
                     delivery has been given up:"
                }
                Action::Delayed => {
                    "Your message has not been delivered yet to the following recipients. \
                     Delivery will be retried; there is no need to send it again:"
                }
                Action::Delivered => "Your message was delivered to the following recipients:",
            },
        );
        for r in group {
            w.blank();
            w.wrap("  ", "  ", &format!("<{}>", r.address));
            if let Some(diagnostic) = r.diagnostic {
                let said = match r.remote_mta {
                    Some(host) => format!("{host} said: {diagnostic}"),
                    None => diagnostic.to_owned(),
                };
                w.wrap("    ", "    ", &said);
            }
            if let (Action::Delayed, Some(until)) = (action, r.will_retry_until_ms) {
                w.wrap(
                    "    ",
                    "    ",
                    &format!("Delivery will be attempted until {}.", date(until)),
                );
            }
        }
    }
    w.blank();
    w.wrap(
        "",
        "",
        &format!(
            "The message arrived on {} and has queue ID {}. {}",
            date(env.created_ms),
            env.queue_id,
            if original.full {
                "It is attached below."
            } else {
                "Its header section is attached below."
            }
        ),
    );
    w.out
}

/// The machine-readable second part (RFC 3464 §2.2, §2.3).
fn status_part(req: &DsnRequest<'_>, reported: &[&DsnRecipient<'_>], utf8: bool) -> String {
    let env = req.envelope;
    let mut w = Writer::new(utf8);
    w.field("Reporting-MTA", &format!("dns; {}", req.reporting_mta));
    if let Some(id) = &env.env_id {
        w.field("Original-Envelope-Id", id);
    }
    w.field("Arrival-Date", &date(env.created_ms));
    for r in reported {
        w.blank();
        if let Some(orcpt) = r.orcpt {
            w.field("Original-Recipient", orcpt);
        }
        // RFC 6533 §3.2.2: a UTF-8 address has its own address type.
        let address_type = if r.address.is_ascii() {
            "rfc822"
        } else {
            "utf-8"
        };
        w.field("Final-Recipient", &format!("{address_type}; {}", r.address));
        w.field("Action", r.action.keyword());
        w.field("Status", status_code(r.action, &r.status));
        if let Some(host) = r.remote_mta {
            w.field("Remote-MTA", &format!("dns; {host}"));
        }
        if let Some(diagnostic) = r.diagnostic {
            w.field("Diagnostic-Code", &diagnostic_code(diagnostic));
        }
        if let Some(ms) = r.last_attempt_ms {
            w.field("Last-Attempt-Date", &date(ms));
        }
        if let (Action::Delayed, Some(ms)) = (r.action, r.will_retry_until_ms) {
            w.field("Will-Retry-Until", &date(ms));
        }
    }
    w.out
}

/// `status` if it is a well-formed enhanced status code (RFC 3463: class.subject.detail,
/// 1-3 digits each) of a class the action allows, else the action's generic code.
fn status_code(action: Action, status: &str) -> &str {
    let digits = |p: &str| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    let mut parts = status.split('.');
    let valid = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(class), Some(subject), Some(detail), None) => {
            class.len() == 1
                && action.allows_class(class.as_bytes()[0])
                && digits(subject)
                && digits(detail)
        }
        _ => false,
    };
    if valid {
        status
    } else {
        action.default_status()
    }
}

/// `smtp; <reply>` for an SMTP reply (three digits, then space, dash or nothing); anything
/// else is a local error text and gets our own diagnostic type (RFC 3464 §2.3.6 allows
/// `X-` types).
fn diagnostic_code(text: &str) -> String {
    let text = text.trim_start();
    let b = text.as_bytes();
    let is_reply = b.len() >= 3
        && b[..3].iter().all(u8::is_ascii_digit)
        && matches!(b.get(3), None | Some(b' ' | b'-' | b'\r' | b'\n'));
    format!("{}; {text}", if is_reply { "smtp" } else { "X-tern" })
}

fn date(unix_ms: u64) -> String {
    rfc5322_date(UNIX_EPOCH + Duration::from_millis(unix_ms))
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// Writes text that may come from outside as safe, folded lines.
struct Writer {
    out: String,
    /// Whether non-ASCII text may be written as is; otherwise it becomes `?`.
    utf8: bool,
}

impl Writer {
    fn new(utf8: bool) -> Writer {
        Writer {
            out: String::new(),
            utf8,
        }
    }

    /// A header-style field, folded with a leading space on continuation lines.
    fn field(&mut self, name: &str, value: &str) {
        self.wrap(&format!("{name}: "), " ", value);
    }

    fn blank(&mut self) {
        self.out.push_str("\r\n");
    }

    /// Appends `first`, then the words of `text` separated by single spaces, and a CRLF.
    /// Whitespace and control characters only separate words, so they never reach the
    /// output; lines break before [`WRAP`] columns where there is a word boundary and go on
    /// with `indent`.
    fn wrap(&mut self, first: &str, indent: &str, text: &str) {
        self.out.push_str(first);
        let mut column = first.len();
        let mut line_has_word = false;
        let words = text
            .split(|c: char| c.is_whitespace() || c.is_control())
            .filter(|w| !w.is_empty());
        for word in words {
            let word = self.safe_word(word);
            if line_has_word && column + 1 + word.len() > WRAP {
                self.out.push_str("\r\n");
                self.out.push_str(indent);
                column = indent.len();
            } else if line_has_word {
                self.out.push(' ');
                column += 1;
            }
            self.out.push_str(&word);
            column += word.len();
            line_has_word = true;
        }
        self.out.push_str("\r\n");
    }

    fn safe_word<'w>(&self, word: &'w str) -> Cow<'w, str> {
        let mut end = word.len().min(MAX_WORD);
        while !word.is_char_boundary(end) {
            end -= 1;
        }
        let word = &word[..end];
        if self.utf8 || word.is_ascii() {
            Cow::Borrowed(word)
        } else {
            Cow::Owned(
                word.chars()
                    .map(|c| if c.is_ascii() { c } else { '?' })
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::{MessageParser, MimeHeaders, PartType};
    use tern_queue::{BodyType, Recipient, Source};

    const ORIGINAL: &[u8] = b"Received: from a ([192.0.2.1])\r\n\tby mx.test\r\n\
        From: s@example.org\r\nSubject: hello\r\nMessage-ID: <m1@example.org>\r\n\r\n\
        Body line one.\r\nBody line two.\r\n";
    // 2026-11-27 20:13:09 UTC
    const CREATED_MS: u64 = 1_795_810_389_000;

    fn envelope(ret: Option<Ret>, recipients: Vec<Recipient>) -> Envelope {
        Envelope {
            id: "0006123ABCDEF012".parse().unwrap(),
            queue_id: "0006123ABCDEF012".parse().unwrap(),
            sender: "s@example.org".into(),
            destination: "example.net".into(),
            recipients,
            env_id: Some("env-42".into()),
            ret,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            size: ORIGINAL.len() as u64,
            created_ms: CREATED_MS,
            expires_ms: CREATED_MS + 5 * 86_400_000,
            next_due_ms: CREATED_MS,
            attempts: 1,
            source: Source {
                client_ip: "192.0.2.1".into(),
                helo: "h".into(),
                auth_user: None,
                protocol: "ESMTP".into(),
            },
            held: false,
            delay_notified: false,
            parked: false,
            pool: None,
            not_before_ms: 0,
            body_id: None,
            campaign: None,
            send_time_planned: false,
        }
    }

    fn rcpt(address: &str, notify: Notify) -> Recipient {
        Recipient {
            notify,
            ..Recipient::new(address.into())
        }
    }

    fn notify(success: bool, failure: bool, delay: bool) -> Notify {
        Notify {
            success,
            failure,
            delay,
            never: false,
        }
    }

    fn failed<'a>(address: &'a str, diagnostic: &'a str) -> DsnRecipient<'a> {
        DsnRecipient {
            address,
            orcpt: Some("rfc822;orig@example.net"),
            action: Action::Failed,
            status: "5.1.1".into(),
            remote_mta: Some("mx.example.net"),
            diagnostic: Some(diagnostic),
            last_attempt_ms: Some(CREATED_MS + 60_000),
            will_retry_until_ms: None,
        }
    }

    fn request<'a>(env: &'a Envelope, recipients: Vec<DsnRecipient<'a>>) -> DsnRequest<'a> {
        DsnRequest {
            reporting_mta: "mta.tern.test",
            envelope: env,
            original: ORIGINAL,
            recipients,
            now: UNIX_EPOCH + Duration::from_millis(CREATED_MS + 120_000),
        }
    }

    /// The fields of a message/delivery-status body: one group per paragraph, continuation
    /// lines unfolded.
    fn status_groups(body: &[u8]) -> Vec<Vec<(String, String)>> {
        let text = std::str::from_utf8(body).unwrap().replace("\r\n ", " ");
        text.split("\r\n\r\n")
            .filter(|g| !g.trim().is_empty())
            .map(|g| {
                g.split("\r\n")
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once(':').expect("field line");
                        (k.to_owned(), v.trim().to_owned())
                    })
                    .collect()
            })
            .collect()
    }

    fn get<'g>(group: &'g [(String, String)], name: &str) -> Option<&'g str> {
        group
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    struct Parsed {
        subject: String,
        to: String,
        text: String,
        status: Vec<Vec<(String, String)>>,
        third_type: String,
        third: Vec<u8>,
    }

    fn parse(dsn: &[u8]) -> Parsed {
        assert!(dsn.ends_with(b"\r\n"));
        for (i, &b) in dsn.iter().enumerate() {
            match b {
                b'\r' => assert_eq!(dsn.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
                b'\n' => assert_eq!(dsn[i - 1], b'\r', "bare LF at {i}"),
                _ => {}
            }
        }
        assert!(dsn.split(|&b| b == b'\n').all(|l| l.len() < 998));
        let msg = MessageParser::default().parse(dsn).expect("parses");
        let ct = msg.content_type().unwrap();
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(
            msg.header_raw("Auto-Submitted").map(str::trim),
            Some("auto-replied")
        );
        let from = msg.from().unwrap().first().unwrap();
        assert_eq!(from.address(), Some("MAILER-DAEMON@mta.tern.test"));
        assert!(msg.message_id().unwrap().ends_with("@mta.tern.test"));
        assert!(msg.date().is_some());

        let PartType::Multipart(ids) = &msg.parts[0].body else {
            panic!("not multipart")
        };
        assert_eq!(ids.len(), 3);
        let part = |i: usize| &msg.parts[ids[i] as usize];
        assert!(part(0).is_content_type("text", "plain"));
        assert!(part(1).is_content_type("message", "delivery-status"));
        let third_ct = part(2).content_type().unwrap();
        let third = match &part(2).body {
            PartType::Message(m) => m.raw_message().to_vec(),
            _ => part(2).contents().to_vec(),
        };
        Parsed {
            subject: msg.subject().unwrap().to_owned(),
            to: msg
                .to()
                .unwrap()
                .first()
                .unwrap()
                .address()
                .unwrap()
                .to_owned(),
            text: part(0).text_contents().unwrap().to_owned(),
            status: status_groups(part(1).contents()),
            third_type: format!("{}/{}", third_ct.ctype(), third_ct.subtype().unwrap()),
            third,
        }
    }

    #[test]
    fn failed_dsn_with_full_message() {
        let env = envelope(
            Some(Ret::Full),
            vec![Recipient::new("u@example.net".into())],
        );
        let req = request(
            &env,
            vec![failed("u@example.net", "550 5.1.1 no such user")],
        );
        let p = parse(&build(&req).unwrap());
        assert_eq!(p.subject, "Undelivered Mail Returned to Sender");
        assert_eq!(p.to, "s@example.org");
        assert!(p.text.contains("<u@example.net>"));
        assert!(p
            .text
            .contains("mx.example.net said: 550 5.1.1 no such user"));

        let [message, recipient] = &p.status[..] else {
            panic!("{:?}", p.status)
        };
        assert_eq!(get(message, "Reporting-MTA"), Some("dns; mta.tern.test"));
        assert_eq!(get(message, "Original-Envelope-Id"), Some("env-42"));
        assert_eq!(
            get(message, "Arrival-Date"),
            Some("Fri, 27 Nov 2026 20:13:09 +0000")
        );
        assert_eq!(
            get(recipient, "Original-Recipient"),
            Some("rfc822;orig@example.net")
        );
        assert_eq!(
            get(recipient, "Final-Recipient"),
            Some("rfc822; u@example.net")
        );
        assert_eq!(get(recipient, "Action"), Some("failed"));
        assert_eq!(get(recipient, "Status"), Some("5.1.1"));
        assert_eq!(get(recipient, "Remote-MTA"), Some("dns; mx.example.net"));
        assert_eq!(
            get(recipient, "Diagnostic-Code"),
            Some("smtp; 550 5.1.1 no such user")
        );
        assert_eq!(
            get(recipient, "Last-Attempt-Date"),
            Some("Fri, 27 Nov 2026 20:14:09 +0000")
        );
        assert_eq!(get(recipient, "Will-Retry-Until"), None);

        assert_eq!(p.third_type, "message/rfc822");
        assert_eq!(p.third, ORIGINAL);
    }

    #[test]
    fn failed_dsn_returns_headers_unless_ret_full() {
        for ret in [None, Some(Ret::Headers)] {
            let env = envelope(ret, vec![Recipient::new("u@example.net".into())]);
            let req = request(&env, vec![failed("u@example.net", "550 nope")]);
            let p = parse(&build(&req).unwrap());
            assert_eq!(p.third_type, "text/rfc822-headers");
            let headers_end = memmem::find(ORIGINAL, b"\r\n\r\n").unwrap() + 2;
            assert_eq!(p.third, &ORIGINAL[..headers_end]);
            assert!(p.text.contains("header section is attached"));
        }
    }

    #[test]
    fn delayed_dsn() {
        let env = envelope(
            Some(Ret::Full),
            vec![Recipient::new("u@example.net".into())],
        );
        let until = CREATED_MS + 5 * 86_400_000;
        let req = request(
            &env,
            vec![DsnRecipient {
                address: "u@example.net",
                orcpt: None,
                action: Action::Delayed,
                status: "4.4.1".into(),
                remote_mta: None,
                diagnostic: Some("connect to mx.example.net[192.0.2.9]:25: Connection refused"),
                last_attempt_ms: Some(CREATED_MS),
                will_retry_until_ms: Some(until),
            }],
        );
        let p = parse(&build(&req).unwrap());
        assert_eq!(p.subject, "Delayed Mail (still being retried)");
        let recipient = &p.status[1];
        assert_eq!(get(recipient, "Action"), Some("delayed"));
        assert_eq!(get(recipient, "Status"), Some("4.4.1"));
        assert_eq!(get(recipient, "Original-Recipient"), None);
        assert_eq!(get(recipient, "Remote-MTA"), None);
        assert_eq!(
            get(recipient, "Diagnostic-Code"),
            Some("X-tern; connect to mx.example.net[192.0.2.9]:25: Connection refused")
        );
        assert_eq!(
            get(recipient, "Will-Retry-Until"),
            Some("Wed, 2 Dec 2026 20:13:09 +0000")
        );
        // RET=FULL notwithstanding: a delay report carries headers only
        assert_eq!(p.third_type, "text/rfc822-headers");
    }

    #[test]
    fn delivered_dsn_only_for_notify_success() {
        let success = DsnRecipient {
            address: "u@example.net",
            orcpt: None,
            action: Action::Delivered,
            status: "2.0.0".into(),
            remote_mta: Some("mx.example.net"),
            diagnostic: Some("250 2.0.0 Ok: queued as 123"),
            last_attempt_ms: Some(CREATED_MS),
            will_retry_until_ms: None,
        };
        let env = envelope(None, vec![rcpt("u@example.net", notify(true, true, false))]);
        let p = parse(&build(&request(&env, vec![success.clone()])).unwrap());
        assert_eq!(p.subject, "Successful Mail Delivery Report");
        assert_eq!(get(&p.status[1], "Action"), Some("delivered"));
        assert_eq!(get(&p.status[1], "Status"), Some("2.0.0"));
        assert_eq!(
            get(&p.status[1], "Diagnostic-Code"),
            Some("smtp; 250 2.0.0 Ok: queued as 123")
        );

        // default NOTIFY (failure, delay) does not ask for success
        let env = envelope(None, vec![Recipient::new("u@example.net".into())]);
        assert_eq!(build(&request(&env, vec![success])), None);
    }

    #[test]
    fn no_dsn_for_null_sender() {
        let mut env = envelope(None, vec![Recipient::new("u@example.net".into())]);
        env.sender.clear();
        let req = request(&env, vec![failed("u@example.net", "550 nope")]);
        assert_eq!(build(&req), None);
    }

    #[test]
    fn notify_filters_recipients() {
        let never = Notify {
            never: true,
            ..notify(false, false, false)
        };
        let env = envelope(
            None,
            vec![
                rcpt("never@example.net", never),
                rcpt("delay-only@example.net", notify(false, false, true)),
                rcpt("fail@example.net", notify(false, true, false)),
            ],
        );
        let dsn = |addresses: &[&'static str]| {
            let rcpts = addresses.iter().map(|a| failed(a, "550 nope")).collect();
            build(&request(&env, rcpts))
        };
        assert_eq!(dsn(&["never@example.net"]), None);
        assert_eq!(dsn(&["delay-only@example.net"]), None);
        let p = parse(
            &dsn(&[
                "never@example.net",
                "fail@example.net",
                "delay-only@example.net",
            ])
            .unwrap(),
        );
        let finals: Vec<_> = p.status[1..]
            .iter()
            .map(|g| get(g, "Final-Recipient").unwrap())
            .collect();
        assert_eq!(finals, ["rfc822; fail@example.net"]);
        assert!(!p.text.contains("never@") && !p.text.contains("delay-only@"));
    }

    #[test]
    fn remote_text_cannot_inject_headers() {
        let env = envelope(None, vec![Recipient::new("u@example.net".into())]);
        let evil = "550 no\r\nBcc: victim@example.com\r\n\r\nX-Evil: 1\nFinal-Recipient: rfc822; x@y\r\n.\r\n";
        let mut r = failed("u@example.net", evil);
        r.remote_mta = Some("mx.example.net\r\nX-Host-Evil: 1");
        let dsn = build(&request(&env, vec![r])).unwrap();
        for line in dsn.split(|&b| b == b'\n') {
            for name in [&b"Bcc:"[..], b"X-Evil:", b"X-Host-Evil:", b"."] {
                assert!(
                    !line.starts_with(name),
                    "{:?}",
                    String::from_utf8_lossy(line)
                );
            }
        }
        let msg = MessageParser::default().parse(&dsn).unwrap();
        assert!(msg.header_raw("Bcc").is_none());
        let p = parse(&dsn);
        assert_eq!(p.status.len(), 2, "no extra recipient group");
        let rg = &p.status[1];
        assert_eq!(
            get(rg, "Diagnostic-Code"),
            Some("smtp; 550 no Bcc: victim@example.com X-Evil: 1 Final-Recipient: rfc822; x@y .")
        );
        assert_eq!(
            get(rg, "Remote-MTA"),
            Some("dns; mx.example.net X-Host-Evil: 1")
        );
        let finals = rg.iter().filter(|(k, _)| k == "Final-Recipient").count();
        assert_eq!(finals, 1);
    }

    #[test]
    fn long_diagnostics_are_folded_and_cut() {
        let env = envelope(None, vec![Recipient::new("u@example.net".into())]);
        let long = format!(
            "550-5.7.1 {} {}",
            "words and more words ".repeat(200),
            "x".repeat(5000)
        );
        let dsn = build(&request(&env, vec![failed("u@example.net", &long)])).unwrap();
        // parse() checks every line is below 998 octets
        let p = parse(&dsn);
        let diag = get(&p.status[1], "Diagnostic-Code").unwrap();
        assert!(diag.starts_with("smtp; 550-5.7.1 words and more words words"));
        assert!(diag.ends_with(&format!(" {}", "x".repeat(MAX_WORD))));
    }

    #[test]
    fn malformed_or_mismatched_status_is_replaced() {
        assert_eq!(status_code(Action::Failed, "5.1.1"), "5.1.1");
        assert_eq!(status_code(Action::Failed, "4.4.7"), "4.4.7");
        assert_eq!(status_code(Action::Failed, "2.0.0"), "5.0.0");
        assert_eq!(status_code(Action::Delayed, "5.1.1"), "4.0.0");
        assert_eq!(status_code(Action::Delivered, "2.1.5"), "2.1.5");
        for bad in [
            "", "5", "5.1", "5.1.1.1", "55.1.1", "5.1234.1", "5.a.1", "5.1.1 x",
        ] {
            assert_eq!(status_code(Action::Failed, bad), "5.0.0", "{bad:?}");
        }
    }

    #[test]
    fn boundary_avoids_the_content() {
        let parts: [&[u8]; 2] = [b"text --=_a here", b"=_b"];
        let chosen = pick_boundary(&parts, ["=_a", "=_b", "=_c"].map(String::from));
        assert_eq!(chosen, "=_c");
    }

    #[test]
    fn header_section_edges() {
        assert_eq!(header_section(b"A: 1\r\n\r\nbody"), b"A: 1\r\n");
        assert_eq!(header_section(b"A: 1\r\nB: 2\r\n"), b"A: 1\r\nB: 2\r\n");
        assert_eq!(header_section(b"\r\nbody only"), b"");
    }

    #[test]
    fn utf8_addresses_use_global_types() {
        let env = envelope(
            Some(Ret::Headers),
            vec![Recipient::new("jürgen@example.net".into())],
        );
        let dsn = build(&request(
            &env,
            vec![failed("jürgen@example.net", "550 nope")],
        ))
        .unwrap();
        let msg = MessageParser::default().parse(&dsn).unwrap();
        let ct = msg.content_type().unwrap();
        assert_eq!(ct.attribute("report-type"), Some("global-delivery-status"));
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("Content-Type: message/global-delivery-status\r\n"));
        assert!(text.contains("Final-Recipient: utf-8; jürgen@example.net\r\n"));
        assert!(text.contains("Content-Transfer-Encoding: 8bit\r\n"));
    }

    #[test]
    fn non_ascii_remote_text_is_masked_in_ascii_dsns() {
        let env = envelope(None, vec![Recipient::new("u@example.net".into())]);
        let dsn = build(&request(&env, vec![failed("u@example.net", "550 nö")])).unwrap();
        assert!(dsn.is_ascii());
        let p = parse(&dsn);
        assert_eq!(get(&p.status[1], "Diagnostic-Code"), Some("smtp; 550 n?"));
    }
}
