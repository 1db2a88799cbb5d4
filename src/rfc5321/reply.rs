//! SMTP replies as plain values.
//!
//! A rejection is never an error type: policy and session code return a [`Reply`], and the
//! session writes it. Every reply except the greeting and EHLO carries an RFC 3463 enhanced
//! status code, because ENHANCEDSTATUSCODES is always advertised.

use std::borrow::Cow;

/// One SMTP reply: a three-digit code, an optional enhanced status code and one or more lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: Option<&'static str>,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, status: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: Some(status),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced status code (greeting, EHLO), possibly multi-line.
    pub fn plain(code: u16, lines: Vec<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: None,
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form (CRLF line ends, `-` continuation) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        if self.lines.is_empty() {
            self.write_line(out, "", true);
        }
        for (i, line) in self.lines.iter().enumerate() {
            self.write_line(out, line, i == last);
        }
    }

    fn write_line(&self, out: &mut Vec<u8>, text: &str, last: bool) {
        out.extend_from_slice(self.code.to_string().as_bytes());
        out.push(if last { b' ' } else { b'-' });
        if let Some(status) = self.status {
            out.extend_from_slice(status.as_bytes());
            out.push(b' ');
        }
        // A reply line must never contain CR or LF of its own: that would let text that
        // echoes client input forge extra reply lines.
        out.extend(
            text.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        out.extend_from_slice(b"\r\n");
    }

    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.write_to(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_status() {
        let r = Reply::new(250, "2.1.0", "Ok");
        assert_eq!(r.to_wire(), b"250 2.1.0 Ok\r\n");
    }

    #[test]
    fn multi_line_without_status() {
        let r = Reply::plain(250, vec!["host".into(), "PIPELINING".into(), "DSN".into()]);
        assert_eq!(r.to_wire(), b"250-host\r\n250-PIPELINING\r\n250 DSN\r\n");
    }

    #[test]
    fn line_breaks_in_text_cannot_forge_lines() {
        let r = Reply::new(501, "5.5.4", "bad\r\n250 ok".to_string());
        assert_eq!(r.to_wire(), b"501 5.5.4 bad  250 ok\r\n");
    }
}
