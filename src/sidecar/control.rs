//! Control headers: how an SMTP client asks for the sidecar, and their removal.
//!
//! `X-Tern-Campaign: NAME`, `X-Tern-Send-Time: now | optimize[; window=12h]`,
//! `X-Tern-Data: {json object}` (data for every recipient of the message) and
//! `X-Tern-Unsubscribe: one-click[; list=NAME]` (one-click unsubscribe headers). Every header whose
//! name starts with `X-Tern-` is removed, known or not, so no control header (or a typo of
//! one) ever reaches DKIM signing or a receiver. Only the header section is looked at.

use std::time::Duration;

use crate::message::SendAt;

/// The control headers' values, unfolded; `None` where absent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Control {
    pub campaign: Option<String>,
    pub send_time: Option<String>,
    pub data: Option<String>,
    pub unsubscribe: Option<String>,
}

/// The prefix every control header has (compared without case).
const PREFIX: &[u8] = b"x-tern-";

/// Whether the header section has any `X-Tern-*` header: the plain path's only cost.
pub fn has_control_headers(content: &[u8]) -> bool {
    header_lines(content).any(|(line, _)| starts_with_prefix(line))
}

/// Removes every `X-Tern-*` header (with its folded continuation lines) and returns the
/// known ones' values.
pub fn strip(content: &[u8]) -> (Control, Vec<u8>) {
    scan(content, true)
}

/// The known control headers' values, without copying the message.
pub fn read(content: &[u8]) -> Control {
    scan(content, false).0
}

/// [`strip`], building the stripped copy only when `copy`.
fn scan(content: &[u8], copy: bool) -> (Control, Vec<u8>) {
    // campaign, send-time, data, unsubscribe
    let mut values: [Option<String>; 4] = [None, None, None, None];
    let mut out = Vec::with_capacity(if copy { content.len() } else { 0 });
    let mut end = 0;
    let mut dropping = false;
    // Which of `values` a folded continuation line belongs to.
    let mut current: Option<usize> = None;
    for (line, next) in header_lines(content) {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            dropping = starts_with_prefix(line);
            current = None;
            if dropping {
                let (name, value) = split_header(line);
                current = match name.to_ascii_lowercase().as_str() {
                    "x-tern-campaign" => Some(0),
                    "x-tern-send-time" => Some(1),
                    "x-tern-data" => Some(2),
                    "x-tern-unsubscribe" => Some(3),
                    _ => None,
                };
                if let Some(i) = current {
                    values[i] = Some(value);
                }
            }
        } else if let Some(v) = current.and_then(|i| values[i].as_mut()) {
            v.push(' ');
            v.push_str(String::from_utf8_lossy(line.trim_ascii()).as_ref());
        }
        if copy && !dropping {
            out.extend_from_slice(&content[end..next]);
        }
        end = next;
    }
    if copy {
        out.extend_from_slice(&content[end..]);
    }
    let [campaign, send_time, data, unsubscribe] = values;
    (
        Control {
            campaign,
            send_time,
            data,
            unsubscribe,
        },
        out,
    )
}

/// Each header line (without its line end) and the offset just past its line end, up to and
/// excluding the empty line that ends the header section.
fn header_lines(content: &[u8]) -> impl Iterator<Item = (&[u8], usize)> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= content.len() {
            return None;
        }
        let rest = &content[at..];
        let len = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let raw = &rest[..len];
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            at = content.len();
            return None;
        }
        at += len;
        Some((line, at))
    })
}

fn starts_with_prefix(line: &[u8]) -> bool {
    line.len() > PREFIX.len() && line[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
}

fn split_header(line: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(line);
    match text.split_once(':') {
        Some((name, value)) => (name.trim().to_owned(), value.trim().to_owned()),
        None => (text.trim().to_owned(), String::new()),
    }
}

/// Parses `now`, `optimize` or `optimize; window=12h` (the header and the API share it);
/// `default_window` and `quiet_hours` come from the campaign.
pub fn parse_send_time(
    text: &str,
    default_window: Duration,
    quiet_hours: Option<(u8, u8)>,
) -> Result<SendAt, String> {
    let mut parts = text.split(';').map(str::trim);
    match parts.next().map(str::to_ascii_lowercase).as_deref() {
        Some("now") if parts.next().is_none() => Ok(SendAt::Now),
        Some("optimize") => {
            let mut window = default_window;
            for p in parts {
                match p.split_once('=') {
                    Some((k, v)) if k.trim().eq_ignore_ascii_case("window") => {
                        window = parse_hours(v.trim())?;
                    }
                    _ => return Err(format!("unknown send-time option {p:?}")),
                }
            }
            Ok(SendAt::Optimize {
                window,
                quiet_hours,
            })
        }
        _ => Err(format!(
            "{text:?}: expected \"now\" or \"optimize[; window=<hours>h]\""
        )),
    }
}

/// `12h` (1 to 168 hours: a week is as far as a send is held).
fn parse_hours(v: &str) -> Result<Duration, String> {
    let hours: u64 = v
        .strip_suffix('h')
        .and_then(|n| n.parse().ok())
        .filter(|h| (1..=168).contains(h))
        .ok_or_else(|| format!("window {v:?}: expected 1h to 168h"))?;
    Ok(Duration::from_secs(hours * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_every_control_header_and_keeps_the_rest() {
        let msg = b"From: a@b\r\nX-Tern-Campaign: winback\r\nx-tern-data: {\"first_name\":\r\n \"Ann\"}\r\nX-Tern-Typo: 1\r\nSubject: hi\r\n\r\nX-Tern-Campaign: body\r\n";
        assert!(has_control_headers(msg));
        let (control, out) = strip(msg);
        assert_eq!(control.campaign.as_deref(), Some("winback"));
        assert_eq!(control.data.as_deref(), Some("{\"first_name\": \"Ann\"}"));
        assert_eq!(
            out,
            b"From: a@b\r\nSubject: hi\r\n\r\nX-Tern-Campaign: body\r\n".to_vec()
        );
        assert!(!has_control_headers(&out));
    }

    #[test]
    fn body_lines_are_not_headers() {
        assert!(!has_control_headers(
            b"Subject: x\r\n\r\nX-Tern-Campaign: a\r\n"
        ));
    }

    #[test]
    fn send_time_forms() {
        let day = Duration::from_secs(86_400);
        assert_eq!(parse_send_time("now", day, None), Ok(SendAt::Now));
        assert_eq!(
            parse_send_time("Optimize; window=12h", day, Some((22, 7))),
            Ok(SendAt::Optimize {
                window: Duration::from_secs(12 * 3600),
                quiet_hours: Some((22, 7))
            })
        );
        assert!(parse_send_time("later", day, None).is_err());
        assert!(parse_send_time("optimize; window=999h", day, None).is_err());
    }
}
