//! Human-readable bounces: the text part of non-RFC 3464 bounces (qmail, Exim, Sendmail,
//! Exchange, Gmail, Yahoo, Domino, Courier, GroupWise, SendGrid-style) and the human part of
//! DSNs whose status part lacks a diagnostic.
//!
//! How: find the first marker phrase (the section starts at its line), stop at the first
//! "copy of the message" line after it, then split the section into blocks, one per address
//! that stands on a line of its own (`<a@b>:`, `a@b`, `a@b: text`, `a@b (a@b)`); blocks for
//! the same address are merged (Exchange names each address twice). With no such line, the
//! addresses named in a "delivered to" sentence share the whole section (Gmail, Outlook.com).
//! Each block's diagnostic is its quoted server reply if it has one, else its first lines.
//!
//! Bounded: at most [`MAX_SCAN`] bytes of text, [`MAX_RECIPIENTS`] addresses, and
//! [`MAX_DIAGNOSTIC`] bytes per diagnostic; every step is linear in the text.

use super::classify::truncate;

/// Bytes of body text searched; markers and recipients sit near the top of a bounce.
pub const MAX_SCAN: usize = 64 * 1024;
pub const MAX_RECIPIENTS: usize = 500;
pub const MAX_DIAGNOSTIC: usize = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Marker {
    /// Says a bounce follows, not whether it is final.
    Neutral,
    Failed,
    Delayed,
}

/// Lowercase phrases that mark a bounce, with what they say about it.
const MARKERS: &[(&str, Marker)] = &[
    // Exim, qmail, Postfix, Courier, generic preambles.
    (
        "this message was created automatically by mail delivery software",
        Marker::Neutral,
    ),
    ("this is the qmail-send program", Marker::Neutral),
    // Postfix before it wrote DSNs: "<a@b>: host ... said: 550 ..." paragraphs follow.
    ("this is the postfix program at host", Marker::Neutral),
    ("this is the mail system at host", Marker::Neutral),
    ("this is a delivery status notification", Marker::Neutral),
    (
        "this is an automatically generated delivery status notification",
        Marker::Neutral,
    ),
    ("the original message was received at", Marker::Neutral),
    // Failures.
    (
        "could not be delivered to one or more of its",
        Marker::Failed,
    ),
    ("i wasn't able to deliver your message", Marker::Failed),
    (
        "the following addresses had permanent fatal errors",
        Marker::Failed,
    ),
    (
        "delivery has failed to these recipients or groups",
        Marker::Failed,
    ),
    (
        "the following recipient(s) could not be reached",
        Marker::Failed,
    ),
    (
        "the following recipient(s) cannot be reached",
        Marker::Failed,
    ),
    (
        "did not reach some or all of the intended recipients",
        Marker::Failed,
    ),
    ("your message wasn't delivered", Marker::Failed),
    ("your message couldn't be delivered", Marker::Failed),
    ("couldn't be delivered", Marker::Failed),
    (
        "there was a problem delivering your message",
        Marker::Failed,
    ),
    (
        "sorry, we were unable to deliver your message",
        Marker::Failed,
    ),
    (
        "delivery to the following recipient failed permanently",
        Marker::Failed,
    ),
    (
        "delivery to the following recipients failed",
        Marker::Failed,
    ),
    (
        "your message to the following recipients cannot be delivered",
        Marker::Failed,
    ),
    ("had the following undeliverable recipient", Marker::Failed),
    ("was not delivered to:", Marker::Failed),
    ("your message could not be delivered", Marker::Failed),
    (
        "i'm sorry to have to inform you that your message could not",
        Marker::Failed,
    ),
    ("your message was not able to be delivered", Marker::Failed),
    ("message could not be delivered to", Marker::Failed),
    ("undeliverable mail", Marker::Failed),
    // Amazon SES and WorkMail.
    (
        "an error occurred while trying to deliver the mail to the following recipients",
        Marker::Failed,
    ),
    // Exim variants ("A message that you sent could not be delivered to all of its
    // recipients", "The following address(es) failed:").
    ("that you sent could not be delivered", Marker::Failed),
    ("the following address(es) failed", Marker::Failed),
    // Exchange 5.5/2000/2003: "Your message ... did not reach the following recipient(s):".
    ("did not reach the following recipient", Marker::Failed),
    // OpenSMTPD.
    (
        "an error has occurred while attempting to deliver a message",
        Marker::Failed,
    ),
    // Lotus Notes / Domino SMTP MTA: "------- Failure Reasons --------".
    ("------- failure reasons", Marker::Failed),
    // Delays.
    ("has not yet been delivered", Marker::Delayed),
    (
        "the following addresses had transient non-fatal errors",
        Marker::Delayed,
    ),
    (
        "delivery is delayed to these recipients or groups",
        Marker::Delayed,
    ),
    (
        "delivery to the following recipient has been delayed",
        Marker::Delayed,
    ),
    ("delivery has been delayed", Marker::Delayed),
    ("this is a warning only", Marker::Delayed),
    ("hasn't been delivered yet", Marker::Delayed),
];

/// Lowercase phrases of the line where the bounce's own text ends and the returned message
/// begins.
const END_MARKERS: &[&str] = &[
    "below this line is a copy of the message",
    "this is a copy of the message",
    "original message headers",
    "----- original message -----",
    "original message follows",
    "--- original message",
    "message headers follow",
    "the header of the original message",
    "undelivered message attached",
    "below is a copy of the original message",
    "------- returned message",
    "unsent message follows",
    "message headers follow",
    "-------original message",
    "--- original message follows",
    "headers of the original message",
    "the original message was:",
    "original message header",
];

/// What the text of a bounce says.
#[derive(Debug, Default)]
pub struct TextBounce {
    /// Only delay markers were found: the message is still being retried.
    pub delayed: bool,
    /// `(address with lowercase domain, diagnostic)` in order of first mention.
    pub recipients: Vec<(String, Option<String>)>,
    /// The diagnostic of the whole section, for a bounce about one recipient whose own block
    /// says nothing (Exim's bare local part or file path, Lotus's reason line above the
    /// address).
    pub diagnostic: Option<String>,
}

/// Whether `body` contains a bounce marker at all (cheap; for the "is this a bounce" gate).
pub fn has_marker(body: &str) -> bool {
    let flat = flatten(truncate(body, MAX_SCAN));
    MARKERS.iter().any(|(m, _)| flat.contains(m))
}

/// ASCII-lowercased with line breaks as spaces, so a phrase wrapped over two lines is found;
/// byte offsets stay those of `body`.
fn flatten(body: &str) -> String {
    body.to_ascii_lowercase().replace('\n', " ")
}

/// The bounce `body` describes, or `None` without a marker.
pub fn parse(body: &str) -> Option<TextBounce> {
    parse_with(body, &Exclude::default(), false)
}

/// Addresses that are never recipients of a notice: `always` (the bounce's From, Return-Path,
/// Sender and list addresses) and `weak` (its To and Cc), which an address line of its own
/// (`<a@b>:`) may still name (anonymised samples give sender and recipient one address).
#[derive(Default)]
pub struct Exclude<'a> {
    pub always: &'a [String],
    pub weak: &'a [String],
}

impl Exclude<'_> {
    fn strong(&self, address: &str) -> bool {
        self.always.iter().any(|e| e.eq_ignore_ascii_case(address))
    }

    pub fn any(&self, address: &str) -> bool {
        self.strong(address) || self.weak.iter().any(|e| e.eq_ignore_ascii_case(address))
    }
}

/// Like [`parse`], but addresses in `exclude` (the bounce's own From, To, Return-Path and
/// list addresses) are never recipients, and with `unmarked` a notice without a marker
/// phrase is read too: its region is the whole text up to the returned message, and only
/// addresses next to a failure cue count (see [`sentence_recipients`]).
pub fn parse_with(body: &str, exclude: &Exclude<'_>, unmarked: bool) -> Option<TextBounce> {
    let body = truncate(body, MAX_SCAN);
    let flat = flatten(body);
    let found: Vec<(usize, Marker)> = MARKERS
        .iter()
        .filter_map(|(m, kind)| flat.find(m).map(|p| (p, *kind)))
        .collect();
    let start = match found.iter().map(|(p, _)| *p).min() {
        Some(start) => start,
        None if unmarked => 0,
        None => return None,
    };
    let start = body[..start].rfind('\n').map_or(0, |p| p + 1);
    let delayed = found.iter().any(|(_, k)| *k == Marker::Delayed)
        && !found.iter().any(|(_, k)| *k == Marker::Failed);
    let first_line_end = body[start..].find('\n').map_or(body.len(), |p| start + p);
    let end = region_end(body, &flat, start, first_line_end);
    let section = &body[start..end];
    // The section diagnostic reads what follows the last marker phrase (the preamble says
    // nothing about the failure).
    let flat_section = &flat[start..end];
    let after_markers = MARKERS
        .iter()
        .filter_map(|(m, _)| flat_section.rfind(m).map(|p| p + m.len()))
        .max()
        .unwrap_or(0);
    let after_markers = section[after_markers..]
        .find('\n')
        .map_or(section.len(), |p| after_markers + p);
    let tail: Vec<&str> = section[after_markers..].split('\n').collect();
    let recipients = recipients(section, found.is_empty(), exclude);
    Some(TextBounce {
        delayed,
        recipients,
        diagnostic: section_diagnostic(&tail),
    })
}

/// Where the failure report region ends: at the first end marker ("copy of the message",
/// "original message follows", ...) after its first line, or at the first line of a
/// returned header block (`Received:` or `Return-Path:` at the start of a line), whichever
/// comes first.
fn region_end(body: &str, flat: &str, start: usize, first_line_end: usize) -> usize {
    let marker = END_MARKERS
        .iter()
        .filter_map(|m| flat[first_line_end..].find(m).map(|p| first_line_end + p))
        .min()
        .map(|p| body[..p].rfind('\n').map_or(p, |l| l.max(start)));
    let headers = ["\nReceived: ", "\nReturn-Path: ", "\nReceived:\t"]
        .iter()
        .filter_map(|h| body[first_line_end..].find(h).map(|p| first_line_end + p))
        .min();
    match (marker, headers) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(body.len()),
    }
}

/// The diagnostic the text gives for `address`, for DSNs whose status part has none.
pub fn diagnostic_for(body: &str, address: &str) -> Option<String> {
    parse(body)?
        .recipients
        .into_iter()
        .find(|(a, _)| a.eq_ignore_ascii_case(address))
        .and_then(|(_, d)| d)
}

struct Block<'a> {
    address: String,
    lines: Vec<&'a str>,
}

fn recipients(
    section: &str,
    unmarked: bool,
    exclude: &Exclude<'_>,
) -> Vec<(String, Option<String>)> {
    let mut blocks: Vec<Block<'_>> = Vec::new();
    let mut current: Option<usize> = None;
    // Inside a folded server reply (Postfix indents its continuation lines, which may start
    // with "<address>:"): lines indented deeper than the block's address line continue the
    // reply, they name no new recipient. Exim indents every address line by two spaces.
    let mut in_reply = false;
    let mut address_indent = 0;
    // Postfix folds "<final@b> (expanded from" / "    <alias@a>): reply": the address the
    // sender used is the alias, and it is the one reported.
    let mut expanded = false;
    for line in section.split('\n') {
        let indent = line.len() - line.trim_start().len();
        if std::mem::take(&mut expanded) && indent > 0 {
            if let (Some(i), Some((original, rest))) = (current, address_line(line)) {
                if !blocks.iter().any(|b| b.address == original) {
                    blocks[i].address = original;
                }
                let rest = rest.trim_start_matches([')', ':']).trim();
                if !rest.is_empty() {
                    blocks[i].lines.push(rest);
                }
                in_reply = reply_in(rest).is_some();
                continue;
            }
        }
        // "a@b" then "    (expanded from: <alias@a>)" on a line of its own (Sendmail).
        if let (Some(i), Some((original, _))) = (current, expanded_from(line.trim())) {
            if !blocks.iter().any(|b| b.address == original) {
                blocks[i].address = original;
            }
            continue;
        }
        let continues = in_reply
            && indent > address_indent
            && line.starts_with([' ', '\t'])
            && !line.trim().is_empty();
        in_reply = continues || (current.is_some() && reply_in(line).is_some());
        if continues {
            if let Some(i) = current {
                blocks[i].lines.push(line);
            }
            continue;
        }
        if let Some((address, rest)) = address_line(line).filter(|(a, _)| !exclude.strong(a)) {
            let (address, rest) = match expanded_from(rest) {
                Some((original, after)) => (original, after),
                None => (address, rest),
            };
            expanded = rest.to_ascii_lowercase().ends_with("(expanded from");
            in_reply = reply_in(rest).is_some();
            address_indent = indent;
            let i = match blocks.iter().position(|b| b.address == address) {
                Some(i) => i,
                None if blocks.len() < MAX_RECIPIENTS => {
                    blocks.push(Block {
                        address,
                        lines: Vec::new(),
                    });
                    blocks.len() - 1
                }
                None => continue,
            };
            if !rest.is_empty() {
                blocks[i].lines.push(rest);
            }
            current = Some(i);
        } else if let Some(i) = current {
            blocks[i].lines.push(line);
        }
    }
    if blocks.is_empty() {
        let mut out = sentence_recipients(section, unmarked);
        out.retain(|(a, _)| !exclude.any(a));
        return out;
    }
    blocks
        .into_iter()
        .map(|b| {
            let diagnostic = diagnostic(&b.lines);
            (b.address, diagnostic)
        })
        .collect()
}

/// Lowercase words that say a delivery failed, near an address that is then a recipient.
const FAILURE_CUES: &[&str] = &[
    "unknown",
    "not exist",
    "no such",
    "invalid",
    "not a valid",
    "not found",
    "rejected",
    "refused",
    "denied",
    "full",
    "quota",
    "exceeds",
    "failed",
    "failure",
    "unable",
    "could not",
    "couldn't",
    "cannot",
    "can't",
    "undeliverable",
    "not deliver",
    "error",
    "disabled",
    "not allowed",
    "rcpt to",
    "not reach",
    "bounce",
];

/// Whether the failure report region of `body` says something failed (a cue word or an
/// SMTP reply), for notices that name no recipient.
pub fn has_failure_cue(body: &str) -> bool {
    let body = truncate(body, MAX_SCAN);
    let flat = flatten(body);
    let first_line_end = body.find('\n').unwrap_or(body.len());
    let region = &body[..region_end(body, &flat, 0, first_line_end)];
    let lower = &flat[..region.len()];
    FAILURE_CUES.iter().any(|c| lower.contains(c))
        || region.split('\n').any(|l| reply_in(l).is_some())
}

/// The addresses of the first `To:` line of the header block quoted after the failure
/// report region (the returned message's headers, when it is not attached as a part).
pub fn returned_to(body: &str) -> Vec<String> {
    let body = truncate(body, MAX_SCAN);
    let flat = flatten(body);
    let first_line_end = body.find('\n').unwrap_or(body.len());
    let end = region_end(body, &flat, 0, first_line_end);
    let Some(line) = body[end..]
        .split('\n')
        .find(|l| l.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("to:")))
    else {
        return Vec::new();
    };
    line[3..]
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | '<' | '>'))
        .map(|t| t.trim_matches('"'))
        .filter(|t| is_address(t))
        .map(normalize)
        .collect()
}

/// The SMTP command the failing reply answered, as the failure report region tells: the
/// first of Postfix's "(in reply to ... command)", Exim's "after RCPT TO:" / "after MAIL
/// FROM:" / "after end of data", or an "SMTP command" heading and the command under it.
pub fn smtp_phase(body: &str) -> Option<super::reason::Phase> {
    use super::reason::Phase;
    let body = truncate(body, MAX_SCAN);
    let flat = flatten(body);
    let first_line_end = body.find('\n').unwrap_or(body.len());
    let end = region_end(body, &flat, 0, first_line_end);
    // Folded lines ("in reply to end of\n    DATA command") read as one run of words.
    let flat = flat[..end].split_whitespace().collect::<Vec<_>>().join(" ");
    const SAID: &[(&str, Phase)] = &[
        ("in reply to end of data", Phase::Data),
        ("in reply to data", Phase::Data),
        ("after end of data", Phase::Data),
        ("after data", Phase::Data),
        ("in reply to rcpt to", Phase::Rcpt),
        ("after rcpt to", Phase::Rcpt),
        ("in reply to mail from", Phase::Mail),
        ("after mail from", Phase::Mail),
        // GMX/Exim variants: "SMTP error from remote server after RCPT command".
        ("after rcpt command", Phase::Rcpt),
        ("after mail command", Phase::Mail),
        // DragonFly: "mx.example [192.0.2.1] did not like our RCPT TO:".
        ("did not like our rcpt", Phase::Rcpt),
        ("did not like our mail", Phase::Mail),
        ("did not like our data", Phase::Data),
        // Yahoo's tag under the reply, X3's "SMTP:RCPT host 192.0.2.1: 553 ...".
        ("[rcpt_to]", Phase::Rcpt),
        ("smtp:rcpt", Phase::Rcpt),
        ("smtp:mail", Phase::Mail),
        ("smtp:data", Phase::Data),
        // 163.com: "SMTP error, RCPT TO: Host x(192.0.2.1) RCPT TO said 550 ...".
        ("rcpt to said", Phase::Rcpt),
        ("mail from said", Phase::Mail),
        ("data said", Phase::Data),
        // qmail: "192.0.2.1 does not like recipient.", "most progress was RCPT TO response".
        ("does not like recipient", Phase::Rcpt),
        ("rcpt to response", Phase::Rcpt),
        ("in reply to helo", Phase::Helo),
        ("in reply to ehlo", Phase::Helo),
        ("after helo", Phase::Helo),
        ("after ehlo", Phase::Helo),
    ];
    if let Some((_, phase)) = SAID
        .iter()
        .filter_map(|(p, phase)| flat.find(p).map(|at| (at, *phase)))
        .min_by_key(|(at, _)| *at)
    {
        return Some(phase);
    }
    let lines: Vec<&str> = body[..end].split('\n').collect();
    // A transcript's `>>> DATA` answered by a failure: the message was refused after the
    // recipients were accepted. With pipelining, RCPT replies come after `>>> DATA` too,
    // then followed by DATA's own "503 Need RCPT": those are RCPT-phase replies.
    if let Some(at) = lines
        .iter()
        .position(|l| l.trim().eq_ignore_ascii_case(">>> data"))
    {
        let after = &lines[at + 1..lines.len().min(at + 8)];
        let answered = after.first().is_some_and(|l| {
            let t = l.trim();
            t.starts_with("<<< 4") || t.starts_with("<<< 5")
        });
        let need_rcpt = after.iter().any(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("need rcpt")
                || l.contains("no valid recipients")
                || l.trim().starts_with("<<< 503")
        });
        if answered {
            return Some(if need_rcpt { Phase::Rcpt } else { Phase::Data });
        }
    }
    // Otherwise the command a transcript sent last before its first failure reply.
    let failure = lines.iter().position(|l| {
        let t = l.trim();
        t.starts_with("<<< 4") || t.starts_with("<<< 5")
    });
    if let Some(failure) = failure {
        let command = lines[..failure]
            .iter()
            .rev()
            .find_map(|l| l.trim().strip_prefix(">>> "))
            .map(str::to_ascii_lowercase);
        let phase = command.as_deref().and_then(|c| {
            if c.starts_with("rcpt") {
                Some(Phase::Rcpt)
            } else if c.starts_with("mail") {
                Some(Phase::Mail)
            } else if c.starts_with("helo") || c.starts_with("ehlo") {
                Some(Phase::Helo)
            } else if c.starts_with("data") {
                Some(Phase::Data)
            } else {
                None
            }
        });
        if phase.is_some() {
            return phase;
        }
    }
    // m-FILTER and others: a "SMTP command" heading and the command on the next line.
    let heading = lines
        .iter()
        .position(|l| l.to_ascii_lowercase().trim_matches('-').trim() == "smtp command")?;
    let command = lines[heading + 1..]
        .iter()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())?
        .to_ascii_lowercase();
    if command == "data" {
        Some(Phase::Data)
    } else if command.starts_with("rcpt to") {
        Some(Phase::Rcpt)
    } else if command.starts_with("mail from") {
        Some(Phase::Mail)
    } else {
        None
    }
}

/// The notice before the returned message: the text from its start to the first end
/// marker or returned header block (what [`smtp_phase`] reads).
pub fn notice(body: &str) -> &str {
    let body = truncate(body, MAX_SCAN);
    let flat = flatten(body);
    let first_line_end = body.find('\n').unwrap_or(body.len());
    &body[..region_end(body, &flat, 0, first_line_end)]
}

/// The addresses (lowercase) a transcript shows refused at their own RCPT TO: a
/// `>>> RCPT To:<a@b>` line answered by a `<<< 4xx/5xx` reply. Each such recipient's
/// failure answered RCPT, whatever command the transcript's first failure answered (old
/// Sendmail writes one transcript per host, in one notice). Read once per message.
pub fn refused_at_rcpt(body: &str) -> Vec<String> {
    let body = truncate(body, MAX_SCAN);
    let mut refused = Vec::new();
    let mut lines = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .peekable();
    while let Some(line) = lines.next() {
        let Some(command) = line.strip_prefix(">>> ") else {
            continue;
        };
        let Some(argument) = command
            .get(..7)
            .filter(|c| c.eq_ignore_ascii_case("rcpt to"))
            .map(|_| &command[7..])
        else {
            continue;
        };
        let answered = lines
            .peek()
            .is_some_and(|next| next.starts_with("<<< 4") || next.starts_with("<<< 5"));
        if answered && refused.len() < MAX_RECIPIENTS {
            let address = argument
                .trim_start_matches([':', ' '])
                .trim_start_matches('<')
                .split(['>', ' '])
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            if address.contains('@') {
                refused.push(address);
            }
        }
    }
    refused
}

/// The [`FAILURE_CUES`] that say what failed, not only that something did.
const SPECIFIC_CUES: &[&str] = &[
    "unknown",
    "not exist",
    "no such",
    "invalid",
    "not a valid",
    "not found",
    "rejected",
    "refused",
    "denied",
    "full",
    "quota",
    "exceeds",
    "disabled",
    "not allowed",
];

/// Lowercase words of a line that names an address to write to, not one that failed.
const CONTACT_CUES: &[&str] = &[
    "contact",
    "please send",
    "send a message to",
    "write to",
    "postmaster for",
    "report this",
    "mailto:postmaster",
    "envelope-from",
    "return-path",
    "from:",
    "sender",
];

/// Recipients of a section without address lines: each address in a line that talks about
/// a delivery ("Your message wasn't delivered to a@b because ...") or has a failure cue
/// ("Unknown user: a@b", "a@b ... user unknown"), or is followed by an SMTP reply within two
/// lines (a quoted transcript: "RCPT TO:<a@b>" then "550 5.1.1 ..."). Its diagnostic is the
/// nearest reply on that line or the next three, else the section's. Without a marker phrase
/// (`unmarked`) a line about delivery needs a failure cue as well.
fn sentence_recipients(section: &str, unmarked: bool) -> Vec<(String, Option<String>)> {
    let lines: Vec<&str> = section.split('\n').collect();
    let whole = diagnostic(&lines);
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.contains('@') {
            continue;
        }
        let lower = line.to_ascii_lowercase();
        if CONTACT_CUES.iter().any(|c| lower.contains(c)) && !lower.contains("rcpt to") {
            continue;
        }
        // A header's continuation (`\tfor <a@b>; date` of a Received field).
        let trimmed = lower.trim_start();
        if ["for ", "by ", "received:", "(envelope-from", "id "]
            .iter()
            .any(|p| trimmed.starts_with(p))
        {
            continue;
        }
        let near = &lines[i + 1..lines.len().min(i + 3)];
        let cue = FAILURE_CUES.iter().any(|c| lower.contains(c));
        let reply_near = reply_in(line).is_some() || near.iter().any(|l| reply_in(l).is_some());
        let talks = lower.contains("deliver") && (!unmarked || cue || reply_near);
        if !(talks || cue || reply_near) {
            continue;
        }
        // The nearest reply; else this line if it says what failed ("Unknown user: a@b"),
        // else the prose under it ("There was an error delivering your mail to <a@b>." and
        // the cause on the next lines).
        let specific = SPECIFIC_CUES.iter().any(|c| lower.contains(c));
        let own = lines[i..lines.len().min(i + 4)]
            .iter()
            .position(|l| reply_in(l).is_some())
            .or_else(|| transcript_failure(&lines[i + 1..]).map(|k| k + 1))
            .and_then(|k| diagnostic(&lines[i + k..lines.len().min(i + k + 4)]))
            .or_else(|| {
                if specific {
                    return Some(tidy(line));
                }
                // A rule of asterisks or equals signs frames the notice; it says nothing.
                let below: Vec<&str> = lines[i + 1..lines.len().min(i + 5)]
                    .iter()
                    .map(|l| l.trim())
                    .skip_while(|l| l.is_empty())
                    .take_while(|l| !l.is_empty() && !is_rule(l))
                    .collect();
                (!below.is_empty()).then(|| tidy(&below.join(" ")))
            });
        for token in line.split(|c: char| c.is_whitespace() || c == ',') {
            let token = token.trim_matches(|c: char| {
                matches!(
                    c,
                    '<' | '>' | '(' | ')' | '.' | ':' | '"' | '\'' | '[' | ']'
                )
            });
            // "RCPT TO:<a@b>" splits as one token.
            let token = token
                .rsplit_once(":<")
                .map_or(token, |(_, a)| a)
                .trim_start_matches("TO:")
                .trim_start_matches("to:");
            let token = token.strip_prefix("mailto:").unwrap_or(token);
            // A file path that ends in an address is no recipient.
            let plain = !token.contains('/') && !token.starts_with('|');
            if plain && is_address(token) && !out.iter().any(|(a, _)| a == &normalize(token)) {
                out.push((normalize(token), own.clone().or_else(|| whole.clone())));
            }
            if out.len() == MAX_RECIPIENTS {
                return out;
            }
        }
    }
    out
}

/// `(expanded from <alias@a>): rest` -> the alias and the rest.
fn expanded_from(rest: &str) -> Option<(String, &str)> {
    let inner = rest
        .strip_prefix("(expanded from <")
        .or_else(|| rest.strip_prefix("(expanded from: <"))?;
    let (address, after) = inner.split_once(">)")?;
    let after = after.trim_start();
    let after = after.strip_prefix(':').unwrap_or(after).trim();
    is_address(address).then(|| (normalize(address), after))
}

/// An address that stands on a line of its own, and the rest of the line after `:`.
fn address_line(line: &str) -> Option<(String, &str)> {
    let t = line.trim();
    // Active!Hunter and some Sendmail builds: ">>> a@b <a@b>" under the failure heading.
    let t = t.strip_prefix(">>> ").unwrap_or(t);
    if let Some(inner) = t.strip_prefix('<') {
        let end = inner.find('>')?;
        let address = &inner[..end];
        let rest = inner[end + 1..].trim_start();
        let rest = rest.strip_prefix(':').unwrap_or(rest).trim();
        return is_address(address).then(|| (normalize(address), rest));
    }
    let (first, rest) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
    if let Some(address) = first.strip_suffix(':') {
        // GMX and 1&1 quote it: `"a@b":`.
        let address = address
            .strip_prefix('"')
            .and_then(|a| a.strip_suffix('"'))
            .unwrap_or(address);
        return is_address(address).then(|| (normalize(address), rest.trim()));
    }
    // "a@b<mailto:a@b>", "a@b (a@b)", "a@b <a@b>" and "a@b on 11/27/2026 10:00 AM"
    // (Exchange): nothing else may follow.
    let (address, tail) = first.split_once('<').unwrap_or((first, ""));
    let rest = rest.trim();
    let plain = rest.is_empty()
        || (rest.starts_with('(') && rest.ends_with(')'))
        || (rest.starts_with('<') && rest.ends_with('>') && !rest[1..].contains('<'))
        || rest.starts_with("on ");
    (plain && (tail.is_empty() || tail.starts_with("mailto:")) && is_address(address))
        .then(|| (normalize(address), ""))
}

/// A plausible mailbox: `local@domain.tld`, no spaces or brackets, a dot in the domain.
pub fn is_address(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    s.len() <= 254
        && !local.is_empty()
        && local
            .chars()
            .all(|c| !c.is_control() && !c.is_whitespace() && !"<>()[],;:\"\\".contains(c))
        && domain.len() >= 3
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '.')
}

/// Local part as given, domain lowercased.
pub fn normalize(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_lowercase()),
        None => address.to_owned(),
    }
}

/// The block's diagnostic: the server's reply if quoted, else its first lines of prose.
fn diagnostic(lines: &[&str]) -> Option<String> {
    // Gmail: "The response from the remote server was:" and the reply on the next lines.
    if let Some(i) = lines.iter().position(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("the response from the remote server was:") || l.contains("the response was:")
    }) {
        let reply: Vec<&str> = lines[i + 1..]
            .iter()
            .map(|l| l.trim())
            .skip_while(|l| l.is_empty())
            .take_while(|l| !l.is_empty())
            .collect();
        if !reply.is_empty() {
            return Some(tidy(&join_reply_lines(&reply.join(" "))));
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let Some((text, closer)) = reply_in(line) else {
            continue;
        };
        let mut text = text.to_owned();
        // Folded replies (Postfix) and multi-line replies (Exim) continue indented.
        for next in &lines[i + 1..] {
            if next.trim().is_empty()
                || !next.starts_with([' ', '\t'])
                || text.len() > MAX_DIAGNOSTIC
                || is_transcript_step(next)
            {
                break;
            }
            text.push(' ');
            text.push_str(next.trim());
        }
        let mut text = join_reply_lines(&text);
        if let Some(closer) = closer {
            let trimmed = text.trim_end().trim_end_matches(closer).trim_end();
            text = trimmed.to_owned();
        }
        return Some(tidy(&text));
    }
    // GMX: the reply without its basic code, "5.1.1 <a@b>... User Unknown".
    if let Some(line) = lines.iter().map(|l| l.trim()).find(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(super::classify::is_enhanced)
    }) {
        return Some(tidy(line));
    }
    let prose: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !is_label(l) && !is_rule(l))
        .take(2)
        .collect();
    (!prose.is_empty()).then(|| tidy(&prose.join(" ")))
}

/// What the lines after the marker phrases say: the quoted reply if there is one, else their
/// first lines of prose (a Lotus reason line, Exim's "mailbox is full" after a file path).
fn section_diagnostic(lines: &[&str]) -> Option<String> {
    if lines.iter().any(|l| reply_in(l).is_some()) {
        return diagnostic(lines);
    }
    let prose: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !is_label(l) && !is_rule(l))
        .take(4)
        .collect();
    (!prose.is_empty()).then(|| tidy(&prose.join(" ")))
}

/// In a transcript that goes on after a recipient's line (Postfix's " In: RCPT TO:<a@b>",
/// " Out: 250 2.1.5 Ok", " In: DATA", " Out: 354 ...", " Out: 451 4.3.0 ..."), the index of
/// the first failure reply, as long as only transcript lines come before it: the accepted
/// steps (`250`, `354`) are no diagnostic.
fn transcript_failure(lines: &[&str]) -> Option<usize> {
    for (k, line) in lines.iter().take(16).enumerate() {
        if reply_in(line).is_some() {
            return Some(k);
        }
        let folded = line.starts_with([' ', '\t']) && !line.trim().is_empty() && k > 0;
        // A folded command argument continues indented.
        if !(is_transcript_step(line) || folded) {
            return None;
        }
    }
    None
}

/// A line of a transcript: Postfix's ` In: ` / ` Out: `, Sendmail's `>>>` / `<<<`.
fn is_transcript_step(line: &str) -> bool {
    let t = line.trim_start();
    ["in:", "out:", ">>>", "<<<"]
        .iter()
        .any(|p| t.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p)))
}

/// A line that only draws a rule (`*****`, `=====`, `----- End of message -----` is not
/// one: it has words).
fn is_rule(line: &str) -> bool {
    !line.is_empty() && line.chars().all(|c| c.is_ascii_punctuation() || c == ' ')
}

/// Lines that frame a diagnostic rather than say anything.
fn is_label(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    ["because:", "diagnostic information for administrators:"].contains(&l.as_str())
        || [
            "generating server:",
            "subject:",
            "date:",
            "sent:",
            "to:",
            "from:",
            ">>>",
            "<<<",
            "---",
            "===",
        ]
        .iter()
        .any(|p| l.starts_with(p))
}

/// Where an SMTP reply starts in `line` (`550 ...`, `said: 550-5.1.1 ...`, `'550 ...'`,
/// `#550 ...`, `(reason: 550 ...)`) and the closing character to strip if it was quoted.
fn reply_in(line: &str) -> Option<(&str, Option<char>)> {
    let t = line.trim();
    // Sendmail's "(reason: 550 ...)": the parentheses are not part of the reply.
    let t = t
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or(t);
    let b = t.as_bytes();
    (0..b.len().saturating_sub(2)).find_map(|i| {
        let code = &b[i..i + 3];
        let is_code = matches!(code[0], b'4' | b'5')
            && code[1..].iter().all(u8::is_ascii_digit)
            && b.get(i + 3).is_none_or(|c| matches!(c, b' ' | b'-' | b':'));
        if !is_code {
            return None;
        }
        let before = t[..i].trim_end();
        let opener = before.chars().last();
        let ok = match opener {
            None => true,
            // A transcript's "Received >>> 550 ...": the arrow is no part of the reply.
            Some('>') => before.ends_with(">>>"),
            // `;`: a DSN field quoted in the text, "Diagnostic-Code: smtp; 550 ...".
            Some(c) => matches!(c, ':' | ';' | '\'' | '"' | '#' | '(' | '<'),
        };
        if !ok {
            return None;
        }
        let closer = match opener {
            Some('\'') => Some('\''),
            Some('"') => Some('"'),
            Some('#') => Some('#'),
            Some('(') => Some(')'),
            _ => None,
        };
        Some((&t[i..], closer))
    })
}

/// `550-5.1.1 a 550-5.1.1 b 550 5.1.1 c` -> `550 5.1.1 a b c`: the repeated code prefixes of
/// a multi-line reply dropped.
pub fn join_reply_lines(text: &str) -> String {
    let b = text.as_bytes();
    let is_code = b.len() >= 4
        && matches!(b[0], b'4' | b'5')
        && b[1..3].iter().all(u8::is_ascii_digit)
        && matches!(b[3], b' ' | b'-');
    if !is_code {
        return text.to_owned();
    }
    let basic = &text[..3];
    let rest = &text[4..];
    let enhanced = rest
        .split_whitespace()
        .next()
        .filter(|w| super::classify::is_enhanced(w));
    let mut out = String::with_capacity(text.len());
    out.push_str(basic);
    out.push(' ');
    let mut words = rest.split_whitespace().peekable();
    let mut first = true;
    while let Some(word) = words.next() {
        if !first {
            // A continuation line's own "550-5.1.1" / "550 5.1.1" prefix.
            let code_word =
                word.len() == 4 && word.starts_with(basic) && matches!(word.as_bytes()[3], b'-')
                    || word == basic;
            if code_word {
                if enhanced.is_some() && words.peek() == enhanced.as_ref() {
                    words.next();
                }
                continue;
            }
            let glued = word.strip_prefix(basic).and_then(|w| w.strip_prefix('-'));
            if let (Some(tail), Some(e)) = (glued, enhanced) {
                if tail == e {
                    continue;
                }
            }
            out.push(' ');
        }
        out.push_str(word);
        first = false;
    }
    out
}

/// Whitespace runs collapsed to one space, at most [`MAX_DIAGNOSTIC`] bytes.
pub fn tidy(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    truncate(&joined, MAX_DIAGNOSTIC).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_replies_are_joined() {
        assert_eq!(
            join_reply_lines("550-5.1.1 The account 550-5.1.1 does not 550 5.1.1 exist."),
            "550 5.1.1 The account does not exist."
        );
        assert_eq!(join_reply_lines("421 try later"), "421 try later");
        assert_eq!(join_reply_lines("no code"), "no code");
    }

    #[test]
    fn address_lines() {
        assert_eq!(
            address_line("<Bob@Example.NET>:").unwrap().0,
            "Bob@example.net"
        );
        assert_eq!(
            address_line("  bob@example.net").unwrap().0,
            "bob@example.net"
        );
        assert_eq!(
            address_line("bob@example.net: 550 no").unwrap(),
            ("bob@example.net".to_owned(), "550 no")
        );
        assert!(address_line("bob@example.net<mailto:bob@example.net>").is_some());
        assert_eq!(
            address_line("\"bob@example.net\":").unwrap().0,
            "bob@example.net"
        );
        assert!(address_line("Please contact postmaster@example.net").is_none());
        assert_eq!(
            address_line(">>> bob@example.net <bob@example.net>")
                .unwrap()
                .0,
            "bob@example.net"
        );
        assert!(address_line(">>> RCPT TO:<bob@example.net>").is_none());
        assert!(address_line("<<< 550 5.1.1 <bob@example.net>... User unknown").is_none());
    }

    #[test]
    fn quoted_replies() {
        assert_eq!(
            diagnostic(&[
                "Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'"
            ]),
            Some("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found".to_owned())
        );
        assert_eq!(
            diagnostic(&["#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##"]),
            Some("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found".to_owned())
        );
        assert_eq!(
            diagnostic(&["    (reason: 550 5.1.1 <bob@example.net>... User unknown)"]),
            Some("550 5.1.1 <bob@example.net>... User unknown".to_owned())
        );
        assert_eq!(
            diagnostic(&["192.0.2.1 does not like recipient.", "Giving up."]).as_deref(),
            Some("192.0.2.1 does not like recipient. Giving up.")
        );
    }

    #[test]
    fn sentence_recipients_need_a_cue_and_skip_contact_lines() {
        let section = "Unknown user: rosa@prairie.example\n\
                       Please contact postmaster@prairie.example for help.\n\
                       We wrote to dora@prairie.example yesterday.\n\
                       \tfor <hugo@prairie.example>; Wed, 4 Mar 2026\n\
                       Failed to read /home/x/.cat/eve@prairie.example: no such file\n";
        let found = sentence_recipients(section, true);
        assert_eq!(
            found,
            vec![(
                "rosa@prairie.example".to_owned(),
                Some("Unknown user: rosa@prairie.example".to_owned())
            )]
        );
        // A transcript: the reply under the RCPT line is the diagnostic.
        let found = sentence_recipients(
            "Sent <<< RCPT TO:<kenji@gate.example>\nReceived >>> 550 5.1.1 unknown\n",
            true,
        );
        assert_eq!(found[0].0, "kenji@gate.example");
        assert_eq!(found[0].1.as_deref(), Some("550 5.1.1 unknown"));
    }

    #[test]
    fn the_region_ends_at_the_returned_headers_and_excluded_addresses_are_dropped() {
        let body = "There was an error delivering your mail to <a@x.example>.\n\nReceived: from \
                    y\nTo: <b@x.example>\n";
        let own = ["a@x.example".to_owned()];
        let exclude = Exclude {
            always: &own,
            weak: &[],
        };
        let parsed = parse_with(body, &exclude, true).unwrap();
        assert!(parsed.recipients.is_empty(), "{:?}", parsed.recipients);
        assert_eq!(returned_to(body), vec!["b@x.example".to_owned()]);
        assert!(has_failure_cue(body));
        assert!(!has_failure_cue("Hello, see you at noon.\n"));
    }

    #[test]
    fn a_recipient_refused_at_its_own_rcpt_in_a_transcript() {
        let body = "While talking to a.example:\n>>> DATA\n<<< 550 go away\n\
                    While talking to b.example:\n>>> RCPT To:<Bob@B.example>\n\
                    <<< 550 No such user here\n>>> RCPT To:<carol@b.example>\n<<< 250 ok\n";
        assert_eq!(refused_at_rcpt(body), vec!["bob@b.example".to_owned()]);
        assert!(refused_at_rcpt(">>> RCPT To:<a@b.example>\n").is_empty());
    }

    #[test]
    fn rules_are_not_diagnostics() {
        assert!(is_rule("*******") && is_rule("=== ===") && !is_rule("-- End of message --"));
        assert!(!is_rule(""));
    }

    #[test]
    fn smtp_phase_from_postfix_exim_and_transcripts() {
        use crate::bounce::reason::Phase;
        assert_eq!(
            smtp_phase("<a@b.example>: host x said: 550 no (in reply to end of\n    DATA command)"),
            Some(Phase::Data)
        );
        assert_eq!(
            smtp_phase("SMTP error from remote mail server after RCPT TO:<a@b.example>:\n550 no"),
            Some(Phase::Rcpt)
        );
        assert_eq!(
            smtp_phase(">>> DATA\n<<< 550 Unknown user a@b.example\n554 5.0.0 Service unavailable"),
            Some(Phase::Data)
        );
        // Pipelined RCPT replies after DATA, then DATA's own 503.
        assert_eq!(
            smtp_phase(
                ">>> DATA\n<<< 550 5.1.1 <a@b.example>... User Unknown\n<<< 503 5.0.0 Need RCPT"
            ),
            Some(Phase::Rcpt)
        );
        assert_eq!(
            smtp_phase("-------server message\n550 unknown user\n\n-------SMTP command\nDATA\n"),
            Some(Phase::Data)
        );
        assert_eq!(smtp_phase("550 unknown user\n"), None);
        for (text, want) in [
            (
                "mx.b.example [192.0.2.1] did not like our RCPT TO:\n550 no",
                Phase::Rcpt,
            ),
            (
                "SMTP error from remote server after RCPT command:\n5.2.1 no",
                Phase::Rcpt,
            ),
            (
                "<a@b.example>:\nRemote host said:\n550 no\n[RCPT_TO]\n",
                Phase::Rcpt,
            ),
            ("SMTP:RCPT host 192.0.2.1: 553 5.3.0 no\n", Phase::Rcpt),
            (
                "SMTP error, RCPT TO: Host b.example RCPT TO said 550 no\n",
                Phase::Rcpt,
            ),
        ] {
            assert_eq!(smtp_phase(text), Some(want), "{text}");
        }
        // Sendmail after DATA: the RCPT reply, then "no valid recipients" for DATA.
        assert_eq!(
            smtp_phase(">>> DATA\n<<< 550 Unknown user a@b.example\n<<< 554 5.5.1 Error: no valid recipients"),
            Some(Phase::Rcpt)
        );
        // The command before the first failure reply of a transcript.
        assert_eq!(
            smtp_phase(
                ">>> MAIL From:<s@x.example>\n<<< 250 ok\n>>> RCPT To:<a@b.example>\n<<< 550 no"
            ),
            Some(Phase::Rcpt)
        );
        assert_eq!(
            smtp_phase(">>> EHLO x.example\n<<< 554 go away"),
            Some(Phase::Helo)
        );
        // qmail's own wording.
        assert_eq!(
            smtp_phase(
                "<a@b.example>:\n192.0.2.1 does not like recipient.\nRemote host said: 550 no"
            ),
            Some(Phase::Rcpt)
        );
    }

    #[test]
    fn postfix_expanded_from_reports_the_alias() {
        let section = "<final@relay.example> (expanded from\n    <alias@harbor.example>): host x \
                       said:\n    552 5.2.2 Mailbox full\n";
        let found = recipients(section, false, &Exclude::default());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, "alias@harbor.example");
        assert_eq!(found[0].1.as_deref(), Some("552 5.2.2 Mailbox full"));
        assert_eq!(
            expanded_from("(expanded from <a@b.example>): 550 no"),
            Some(("a@b.example".to_owned(), "550 no"))
        );
    }
}
