//! A message on its way in (floor 1): what every intake path hands on and every pre-enqueue
//! stage transforms. It owns the values, not the work: [`Submission`] (one SMTP transaction or
//! HTTP injection), the campaign request and report of the sidecar, the send-time request and
//! window, the [`Stage`] trait the pre-enqueue stages implement, the RFC 5322 date and the
//! RFC 5321 address comparison. Imports only leaves (the spool crate, [`crate::tls`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};
use tern_queue::{BodyType, Recipient, Ret, Source};

/// One accepted SMTP transaction or HTTP injection, ready for the spool.
#[derive(Debug, Clone)]
pub struct Submission {
    /// Reverse-path; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub env_id: Option<String>,
    pub ret: Option<Ret>,
    pub body_type: BodyType,
    pub smtputf8: bool,
    pub source: Source,
    pub tls: Option<crate::tls::TlsInfo>,
    /// The message as received: headers and body, CRLF line ends, no dot-stuffing.
    pub content: Vec<u8>,
    /// The sidecar request of an HTTP injection (SMTP asks with `X-Tern-*` headers).
    pub sidecar: Option<CampaignRequest>,
    /// The source-IP pool an HTTP injection asked for (checked against the configured pools
    /// by the API); it wins over `X-Tern-Pool` and the sender domain.
    pub pool: Option<String>,
    /// Whether it comes from a client tern serves (a relay network, an authenticated
    /// session, the inject API, tern's own DSNs) rather than from anyone on the internet (mail
    /// to the bounce domains). Only trusted submissions go through the pre-enqueue stages.
    pub trusted: bool,
    /// One-click unsubscribe asked for (the inject API's `unsubscribe`, `X-Tern-Unsubscribe`
    /// or the campaign's setting); the unsubscribe stage acts on it.
    pub unsubscribe: Option<OneClick>,
}

/// A request for one-click unsubscribe headers (RFC 8058): `one-click` or
/// `one-click; list=NAME`. The list names the sender identity an unsubscribe applies to
/// (a newsletter, a stream); without one, the campaign's name or the sender's domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OneClick {
    pub list: Option<String>,
}

impl OneClick {
    /// Parses `one-click[; list=NAME]` (case-insensitive keyword; a list name is 1-64
    /// characters of letters, digits, `.`, `_` and `-`).
    pub fn parse(value: &str) -> Result<OneClick, String> {
        let mut parts = value.split(';').map(str::trim);
        if !parts
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case("one-click"))
        {
            return Err(format!(
                "expected \"one-click\" or \"one-click; list=NAME\", got {value:?}"
            ));
        }
        let mut list = None;
        for param in parts.filter(|p| !p.is_empty()) {
            match param.split_once('=') {
                Some((k, v)) if k.trim().eq_ignore_ascii_case("list") => {
                    let v = v.trim();
                    if v.is_empty()
                        || v.len() > 64
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                    {
                        return Err(format!(
                            "list name {v:?}: 1-64 letters, digits, '.', '_' or '-'"
                        ));
                    }
                    list = Some(v.to_ascii_lowercase());
                }
                _ => return Err(format!("unknown parameter {param:?} (only list=NAME)")),
            }
        }
        Ok(OneClick { list })
    }
}

/// The sidecar part of an HTTP injection (`"sidecar": {...}`).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignRequest {
    pub campaign: Option<String>,
    /// `now`, `optimize` or `optimize; window=12h`.
    pub send_time: Option<String>,
    /// Template data for every recipient.
    #[serde(default)]
    pub data: Map<String, Value>,
    /// Template data per recipient address (merged over `data`).
    #[serde(default)]
    pub recipients: HashMap<String, Map<String, Value>>,
}

/// When the message should be sent: the typed request of `X-Tern-Send-Time` or the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendAt {
    /// Enqueue for delivery now (the default).
    Now,
    /// Pick a time inside `window` from now, avoiding local `quiet_hours` `[start, end)`.
    Optimize {
        window: Duration,
        quiet_hours: Option<(u8, u8)>,
    },
}

/// Where and when a send may go: `[now, now + window)`, never starting in a quiet hour
/// (local hour of day `from..to`, wrapping past midnight when `from > to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWindow {
    pub len_ms: u64,
    pub quiet: Option<(u8, u8)>,
}

/// One message on its way through the pre-enqueue stages, and what they decided for it.
#[derive(Debug)]
pub struct Prepared {
    pub submission: Submission,
    /// What a stage decided about the send time; `None` until one did.
    pub send_at: Option<SendAt>,
    /// The window the send time of each recipient is planned in (`None`: at once); the
    /// send-time stage sets it.
    pub window: Option<SendWindow>,
    /// What the campaign did for each recipient; empty when no campaign applied.
    pub reports: Vec<CampaignReport>,
    /// The campaign and variant the message was rendered for (stored in its envelopes).
    pub campaign: Option<tern_queue::CampaignTag>,
    /// Spool it held (not attempted until released): its campaign is paused.
    pub hold: bool,
}

/// What the stage did for one recipient (in the inject answer, the log and metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CampaignReport {
    pub recipient: String,
    pub campaign: String,
    /// The bandit's choice (`holdout` for the holdout share); `None` without variants.
    pub variant: Option<String>,
    /// `model`, `cache` or `default`.
    pub content: &'static str,
    /// Why the defaults rendered (a failure code of the model client), or `guardrail` when the guardrails
    /// removed something from a generated slot (an emptied slot renders its default).
    pub reason: Option<&'static str>,
}

/// A boxed future, for the object-safe [`Stage`] trait.
pub type StageFuture<'a> = Pin<Box<dyn Future<Output = Vec<Prepared>> + Send + 'a>>;

/// One pre-enqueue stage (the sidecar, send time). The intake runs its stages in order, each
/// on every message the one before produced; a stage passes on what it does not want
/// unchanged. A stage never fails a message: whatever goes wrong falls back and says why.
pub trait Stage: Send + Sync {
    fn apply(&self, message: Prepared) -> StageFuture<'_>;
}

impl Prepared {
    /// A submission no stage has looked at yet.
    pub fn new(submission: Submission) -> Prepared {
        Prepared {
            submission,
            send_at: None,
            window: None,
            reports: Vec::new(),
            campaign: None,
            hold: false,
        }
    }
}

/// Local parts are compared exactly, domains case-insensitively (RFC 5321 2.4).
pub fn same_address(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.eq_ignore_ascii_case(db),
        _ => a == b,
    }
}

/// What the header section of a message measures: its length in bytes (up to and including
/// the empty line that ends it, or all of `content` without one) and how many `Received`
/// fields it has. One pass, linear in the header section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderStats {
    pub len: usize,
    pub received: usize,
}

/// Measures the header section of `content` (CRLF or LF line ends).
pub fn header_stats(content: &[u8]) -> HeaderStats {
    let mut pos = 0;
    let mut received = 0;
    while pos < content.len() {
        let end = memchr::memchr(b'\n', &content[pos..]).map_or(content.len(), |i| pos + i + 1);
        let line = &content[pos..end];
        if line == b"\r\n" || line == b"\n" {
            return HeaderStats { len: end, received };
        }
        const NAME: &[u8] = b"received:";
        if line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME) {
            received += 1;
        }
        pos = end;
    }
    HeaderStats {
        len: content.len(),
        received,
    }
}

/// RFC 5322 date-time in UTC, e.g. `Fri, 27 Nov 2026 20:13:09 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Proleptic Gregorian (year, month, day) for a count of days since 1970-01-01
/// (the well-known era-based conversion).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_click_requests_parse_and_bad_ones_say_why() {
        assert_eq!(OneClick::parse("one-click"), Ok(OneClick { list: None }));
        assert_eq!(
            OneClick::parse(" One-Click ; list=News_Letter "),
            Ok(OneClick {
                list: Some("news_letter".into())
            })
        );
        assert!(OneClick::parse("yes").unwrap_err().contains("one-click"));
        assert!(OneClick::parse("one-click; list=")
            .unwrap_err()
            .contains("list name"));
        assert!(OneClick::parse("one-click; list=a b")
            .unwrap_err()
            .contains("list name"));
        assert!(OneClick::parse("one-click; scope=x")
            .unwrap_err()
            .contains("unknown parameter"));
    }

    #[test]
    fn dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_810_389); // 2026-11-27 20:13:09 UTC
        assert_eq!(rfc5322_date(t), "Fri, 27 Nov 2026 20:13:09 +0000");
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn header_stats_measure_only_the_header_section() {
        let msg =
            b"Received: a\r\nRECEIVED: b\r\n\tfolded\r\nSubject: x\r\n\r\nReceived: in body\r\n";
        let stats = header_stats(msg);
        assert_eq!(stats.received, 2);
        assert_eq!(
            &msg[..stats.len],
            &msg[..msg.len() - "Received: in body\r\n".len()]
        );
        assert_eq!(header_stats(b"Subject: no body").len, 16);
    }

    #[test]
    fn same_address_compares_domains_without_case() {
        assert!(same_address("a@X.test", "a@x.TEST"));
        assert!(!same_address("A@x.test", "a@x.test"));
    }
}

/// The trace header a tern node adds when it hands its queued mail to another (`tern queue
/// drain`): the envelope's life so far, which the receiving tern keeps instead of starting
/// the message anew. Honoured only from a trusted client (a relay network or AUTH), and
/// always removed before anything else sees the message.
pub const RELAY_HEADER: &str = "X-Tern-Relayed";

/// What [`RELAY_HEADER`] carries: `created=MS; expires=MS; attempts=N; due=MS;
/// not-before=MS` (unix ms), and `planned=1` when the send time was planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayTrace {
    pub created_ms: u64,
    pub expires_ms: u64,
    pub attempts: u32,
    /// When the next attempt was due on the sending node.
    pub due_ms: u64,
    pub not_before_ms: u64,
    /// The sending node planned the send time (`Envelope::send_time_planned`): the receiving
    /// node's delivery then records the awaited send in the recipient's profile. Absent (a
    /// node from before it) reads as false. Written only when true, and an older receiver
    /// ignores the field.
    pub send_time_planned: bool,
}

impl RelayTrace {
    /// The header line, CRLF-terminated.
    pub fn header(&self) -> String {
        format!(
            "{RELAY_HEADER}: created={}; expires={}; attempts={}; due={}; not-before={}{}\r\n",
            self.created_ms,
            self.expires_ms,
            self.attempts,
            self.due_ms,
            self.not_before_ms,
            if self.send_time_planned {
                "; planned=1"
            } else {
                ""
            }
        )
    }

    /// Parses a header value; `None` unless every field is there and makes sense.
    pub fn parse(value: &str) -> Option<RelayTrace> {
        let mut fields = std::collections::HashMap::new();
        for part in value.split(';') {
            let (k, v) = part.split_once('=')?;
            fields.insert(k.trim().to_ascii_lowercase(), v.trim().parse::<u64>().ok()?);
        }
        let trace = RelayTrace {
            created_ms: *fields.get("created")?,
            expires_ms: *fields.get("expires")?,
            attempts: u32::try_from(*fields.get("attempts")?).ok()?,
            due_ms: *fields.get("due")?,
            not_before_ms: *fields.get("not-before")?,
            send_time_planned: match fields.get("planned") {
                None | Some(0) => false,
                Some(1) => true,
                Some(_) => return None,
            },
        };
        (trace.created_ms <= trace.expires_ms).then_some(trace)
    }
}

/// The campaign and variant a drained message was rendered for, beside [`RELAY_HEADER`]:
/// `campaign=NAME[; variant=ID]`. A header of its own because a node from before it drops a
/// trace with a field that is not a number (this one is not); such a node removes it with
/// every other `X-Tern-*` header, so the mail is delivered there without its tag. Honoured
/// and removed with a valid trace from a trusted client; any other trusted message loses it
/// with every `X-Tern-*` header in the sidecar stage (untrusted mail is only ever inbound).
pub const RELAY_CAMPAIGN_HEADER: &str = "X-Tern-Relayed-Campaign";

/// The [`RELAY_CAMPAIGN_HEADER`] line of `tag`, CRLF-terminated.
pub fn relay_campaign_header(tag: &tern_queue::CampaignTag) -> String {
    match &tag.variant {
        Some(v) => format!(
            "{RELAY_CAMPAIGN_HEADER}: campaign={}; variant={v}\r\n",
            tag.campaign
        ),
        None => format!("{RELAY_CAMPAIGN_HEADER}: campaign={}\r\n", tag.campaign),
    }
}

/// Parses a [`RELAY_CAMPAIGN_HEADER`] value; `None` unless the campaign (and the variant,
/// when there is one) are names as a campaign's config takes them, each field once, and no
/// other field: a trusted peer's header still never makes up a label of unbounded length
/// or charset.
pub fn parse_relay_campaign(value: &str) -> Option<tern_queue::CampaignTag> {
    let mut campaign = None;
    let mut variant = None;
    for part in value.split(';') {
        let (k, v) = part.split_once('=')?;
        let v = v.trim();
        let slot = match k.trim().to_ascii_lowercase().as_str() {
            "campaign" if crate::feedback_id::is_campaign_name(v) => &mut campaign,
            "variant" if crate::feedback_id::is_variant_id(v) => &mut variant,
            _ => return None,
        };
        if slot.replace(v.to_owned()).is_some() {
            return None;
        }
    }
    Some(tern_queue::CampaignTag {
        campaign: campaign?,
        variant,
    })
}

/// Removes every `name` header field (with its continuation lines) from the header section
/// of `content`; returns the first one's value, unfolded.
pub fn take_header(content: &mut Vec<u8>, name: &str) -> Option<String> {
    remove_header(content, name, true)
}

/// As [`take_header`], but the value is the first field's first line only (its continuation
/// lines are removed and not read): for fields whose value is one token.
pub fn take_header_first_line(content: &mut Vec<u8>, name: &str) -> Option<String> {
    remove_header(content, name, false)
}

fn remove_header(content: &mut Vec<u8>, name: &str, unfold: bool) -> Option<String> {
    let header_end = memchr::memmem::find(content, b"\r\n\r\n").map(|i| i + 2);
    let limit = header_end.unwrap_or(content.len());
    let mut value: Option<String> = None;
    let mut found = false;
    let mut out = Vec::with_capacity(content.len());
    let mut pos = 0;
    let mut skipping = false;
    while pos < limit {
        let end = memchr::memmem::find(&content[pos..limit], b"\r\n")
            .map(|i| pos + i + 2)
            .unwrap_or(limit);
        let line = &content[pos..end];
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if continuation && skipping {
            if let Some(v) = value.as_mut().filter(|_| found && unfold) {
                v.push(' ');
                v.push_str(String::from_utf8_lossy(line).trim());
            }
        } else {
            skipping = false;
            found = false;
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                if line[..colon]
                    .trim_ascii()
                    .eq_ignore_ascii_case(name.as_bytes())
                {
                    skipping = true;
                    if value.is_none() {
                        found = true;
                        value = Some(
                            String::from_utf8_lossy(&line[colon + 1..])
                                .trim()
                                .to_owned(),
                        );
                    }
                }
            }
        }
        if !skipping {
            out.extend_from_slice(line);
        }
        pos = end;
    }
    if value.is_some() {
        out.extend_from_slice(&content[limit..]);
        *content = out;
    }
    value
}

#[cfg(test)]
mod relay_tests {
    use super::*;

    #[test]
    fn the_relay_trace_round_trips_and_is_taken_out() {
        let trace = RelayTrace {
            created_ms: 1_700_000_000_000,
            expires_ms: 1_700_432_000_000,
            attempts: 3,
            due_ms: 1_700_000_600_000,
            not_before_ms: 0,
            send_time_planned: false,
        };
        let mut content = format!(
            "Received: x\r\n{}Subject: s\r\nx-tern-relayed: created=1; expires=2;\r\n attempts=1; due=1; not-before=0\r\n\r\nX-Tern-Relayed: body\r\n",
            trace.header()
        )
        .into_bytes();
        let value = take_header(&mut content, RELAY_HEADER).unwrap();
        assert_eq!(RelayTrace::parse(&value), Some(trace));
        assert_eq!(
            content, b"Received: x\r\nSubject: s\r\n\r\nX-Tern-Relayed: body\r\n",
            "every field removed, the body untouched"
        );
        // A planned send time travels as `planned=1`; without it (older nodes), not planned.
        let planned = RelayTrace {
            send_time_planned: true,
            not_before_ms: 1_700_000_900_000,
            ..trace
        };
        let line = planned.header();
        assert!(line.ends_with("; planned=1\r\n"), "{line}");
        let value = line.split_once(':').unwrap().1.trim();
        assert_eq!(RelayTrace::parse(value), Some(planned));
        assert!(!trace.header().contains("planned"));
        assert_eq!(
            RelayTrace::parse("created=1; expires=2; attempts=1; due=1; not-before=5")
                .map(|t| t.send_time_planned),
            Some(false)
        );
        for bad in [
            "created=1; expires=2; attempts=1; due=1; not-before=0; planned=2",
            "created=1; expires=2; attempts=1; due=1",
            "created=3; expires=2; attempts=1; due=1; not-before=0",
            "created=x; expires=2; attempts=1; due=1; not-before=0",
            "created=1; expires=2; attempts=99999999999; due=1; not-before=0",
            "",
        ] {
            assert_eq!(RelayTrace::parse(bad), None, "{bad}");
        }
        let mut plain = b"Subject: s\r\n\r\nbody\r\n".to_vec();
        assert_eq!(take_header(&mut plain, RELAY_HEADER), None);
        assert_eq!(plain, b"Subject: s\r\n\r\nbody\r\n");
    }

    #[test]
    fn the_relayed_campaign_round_trips_and_bad_values_are_refused() {
        for tag in [
            tern_queue::CampaignTag {
                campaign: "spring-2026.b_x".into(),
                variant: Some("a_1".into()),
            },
            tern_queue::CampaignTag {
                campaign: "winback".into(),
                variant: None,
            },
        ] {
            let mut content = format!(
                "Received: x\r\n{}Subject: s\r\n\r\nbody\r\n",
                relay_campaign_header(&tag)
            )
            .into_bytes();
            let value = take_header(&mut content, RELAY_CAMPAIGN_HEADER).unwrap();
            assert_eq!(parse_relay_campaign(&value), Some(tag));
            assert_eq!(content, b"Received: x\r\nSubject: s\r\n\r\nbody\r\n");
        }
        let long = format!("campaign={}", "c".repeat(65));
        let long_variant = format!("campaign=c; variant={}", "v".repeat(33));
        for bad in [
            "",
            "variant=a",
            "campaign=",
            "campaign=a b",
            "campaign=a\u{e9}",
            "campaign=a; variant=b-c",
            "campaign=a; campaign=b",
            "campaign=a; variant=b; variant=c",
            "campaign=a; planned=1",
            "campaign",
            long.as_str(),
            long_variant.as_str(),
        ] {
            assert_eq!(parse_relay_campaign(bad), None, "{bad}");
        }
    }
}
