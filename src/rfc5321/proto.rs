//! Sans-IO SMTP framing: command lines, DATA decoding and the message content check.
//!
//! Invariants:
//! - Only `<CRLF>.<CRLF>` ends DATA. A `.` only counts at the start of a line, and a line
//!   only starts after CRLF, so `\n.\n`, `\r.\r`, `\r\n.\r` and `\n.\r\n` are data, never an
//!   end (SMTP smuggling, CVE-2023-51764).
//! - Message content with a bare CR, a bare LF or a NUL is flagged by [`ContentCheck`], for
//!   DATA and BDAT alike, so the session can refuse it instead of guessing: a message we
//!   accepted with bare line ends could smuggle commands past the next hop.
//! - Nothing here allocates per byte or blocks; callers feed whatever bytes they have.

use memchr::{memchr, memchr3};

/// Longest command line accepted, CRLF included. RFC 5321 4.5.3.1.4 sets 512 as the
/// minimum, extensions (AUTH initial responses, DSN parameters) need more.
pub const MAX_COMMAND_LINE: usize = 4096;

/// Result of looking for one command line at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line of `len` bytes (terminator included).
    Complete(usize),
    /// No line end yet; keep reading.
    Incomplete,
    /// No line end within [`MAX_COMMAND_LINE`] bytes.
    TooLong,
}

/// Finds the end of the first line in `buf`.
pub fn find_line(buf: &[u8]) -> Line {
    match memchr(b'\n', buf) {
        Some(pos) if pos < MAX_COMMAND_LINE => Line::Complete(pos + 1),
        Some(_) => Line::TooLong,
        None if buf.len() >= MAX_COMMAND_LINE => Line::TooLong,
        None => Line::Incomplete,
    }
}

/// Strips the line terminator (CRLF or LF) from a command line.
pub fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What made message content unacceptable.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ContentFlags {
    pub bare_cr: bool,
    pub bare_lf: bool,
    pub nul: bool,
}

impl ContentFlags {
    pub fn is_clean(&self) -> bool {
        !(self.bare_cr || self.bare_lf || self.nul)
    }
}

/// Scans message content chunk by chunk for bare CR, bare LF and NUL. A CR at the end of
/// one chunk followed by LF at the start of the next is a proper CRLF.
#[derive(Debug, Default, Clone)]
pub struct ContentCheck {
    pending_cr: bool,
    pub flags: ContentFlags,
}

impl ContentCheck {
    pub fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.pending_cr {
                self.pending_cr = false;
                if bytes[0] == b'\n' {
                    bytes = &bytes[1..];
                    continue;
                }
                self.flags.bare_cr = true;
            }
            let Some(pos) = memchr3(b'\r', b'\n', 0, bytes) else {
                return;
            };
            match bytes[pos] {
                b'\r' => self.pending_cr = true,
                b'\n' => self.flags.bare_lf = true,
                _ => self.flags.nul = true,
            }
            bytes = &bytes[pos + 1..];
        }
    }

    /// Call once all content is seen: a CR at the very end is bare.
    pub fn finish(&mut self) -> ContentFlags {
        if std::mem::take(&mut self.pending_cr) {
            self.flags.bare_cr = true;
        }
        self.flags
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataState {
    /// After CRLF (or at the very start): a `.` here is special.
    LineStart,
    /// Inside a line.
    Mid,
    /// Inside a line, just after a CR whose LF has not been seen yet.
    MidCr,
    /// A `.` at line start.
    Dot,
    /// `.` then CR at line start: LF ends the data.
    DotCr,
}

/// Decodes a DATA stream: removes dot-stuffing, finds `<CRLF>.<CRLF>`, and records content
/// flags and size. Content beyond `max_size` is counted but not stored, so an oversize
/// message can be read to its end and refused without holding it in memory.
#[derive(Debug)]
pub struct DataDecoder {
    state: DataState,
    max_size: usize,
    size: usize,
    flags: ContentFlags,
}

/// The decoder's verdict once the terminating dot has been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataEnd {
    /// Content size in bytes (after unstuffing), including any part not stored.
    pub size: usize,
    pub flags: ContentFlags,
}

impl DataDecoder {
    pub fn new(max_size: usize) -> DataDecoder {
        DataDecoder {
            state: DataState::LineStart,
            max_size,
            size: 0,
            flags: ContentFlags::default(),
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        let room = self.max_size.saturating_sub(out.len());
        out.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.size += bytes.len();
    }

    /// Consumes bytes from `input`, appending content to `out`. Returns how many bytes were
    /// consumed and, if the end was reached, the verdict; bytes after the end (pipelined
    /// commands) are left unconsumed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Option<DataEnd>) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                DataState::Mid => {
                    // Fast path: copy the run up to the next special byte in one go.
                    let rest = &input[i..];
                    let run = memchr3(b'\r', b'\n', 0, rest).unwrap_or(rest.len());
                    self.emit(out, &rest[..run]);
                    i += run;
                    if i == input.len() {
                        break;
                    }
                    let b = input[i];
                    i += 1;
                    self.mid_special(b, out);
                }
                DataState::LineStart => {
                    if input[i] == b'.' {
                        i += 1;
                        self.state = DataState::Dot;
                    } else {
                        self.state = DataState::Mid;
                    }
                }
                DataState::MidCr => {
                    let b = input[i];
                    i += 1;
                    if b == b'\n' {
                        self.emit(out, b"\r\n");
                        self.state = DataState::LineStart;
                    } else {
                        self.flags.bare_cr = true;
                        self.emit(out, b"\r");
                        self.state = DataState::Mid;
                        self.mid_byte(b, out);
                    }
                }
                DataState::Dot => {
                    let b = input[i];
                    i += 1;
                    if b == b'\r' {
                        self.state = DataState::DotCr;
                    } else {
                        // A stuffed line: the leading dot is removed (RFC 5321 4.5.2).
                        self.state = DataState::Mid;
                        self.mid_byte(b, out);
                    }
                }
                DataState::DotCr => {
                    let b = input[i];
                    i += 1;
                    if b == b'\n' {
                        let end = DataEnd {
                            size: self.size,
                            flags: self.flags,
                        };
                        self.state = DataState::LineStart;
                        return (i, Some(end));
                    }
                    // ".\r" not followed by LF: the dot was stuffing, the CR is bare.
                    self.flags.bare_cr = true;
                    self.emit(out, b"\r");
                    self.state = DataState::Mid;
                    self.mid_byte(b, out);
                }
            }
        }
        (i, None)
    }

    /// Handles one byte in the middle of a line.
    fn mid_byte(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\r' | b'\n' | 0 => self.mid_special(b, out),
            _ => self.emit(out, &[b]),
        }
    }

    fn mid_special(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\r' => self.state = DataState::MidCr,
            b'\n' => {
                // A bare LF does not start a line: a following "." is plain data.
                self.flags.bare_lf = true;
                self.emit(out, b"\n");
            }
            _ => {
                self.flags.nul = true;
                self.emit(out, &[b]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> (Vec<u8>, usize, Option<DataEnd>) {
        let mut dec = DataDecoder::new(1 << 20);
        let mut out = Vec::new();
        let (used, end) = dec.feed(input, &mut out);
        (out, used, end)
    }

    /// Feeds the input one byte at a time, to prove state carries across reads.
    fn decode_bytewise(input: &[u8]) -> (Vec<u8>, usize, Option<DataEnd>) {
        let mut dec = DataDecoder::new(1 << 20);
        let mut out = Vec::new();
        for (i, b) in input.iter().enumerate() {
            let (used, end) = dec.feed(std::slice::from_ref(b), &mut out);
            assert_eq!(used, 1);
            if end.is_some() {
                return (out, i + 1, end);
            }
        }
        (out, input.len(), None)
    }

    #[test]
    fn plain_message_and_pipelined_tail() {
        let input = b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n";
        for (out, used, end) in [decode(input), decode_bytewise(input)] {
            assert_eq!(out, b"Subject: x\r\n\r\nhello\r\n");
            assert_eq!(&input[used..], b"QUIT\r\n");
            let end = end.expect("end found");
            assert!(end.flags.is_clean());
            assert_eq!(end.size, out.len());
        }
    }

    #[test]
    fn empty_message_ends_immediately() {
        let (out, used, end) = decode(b".\r\n");
        assert!(out.is_empty());
        assert_eq!(used, 3);
        assert!(end.is_some());
    }

    #[test]
    fn dot_stuffing_is_removed() {
        let (out, _, end) = decode(b"..leading\r\n...\r\n.x\r\n.\r\n");
        assert_eq!(out, b".leading\r\n..\r\nx\r\n");
        assert!(end.unwrap().flags.is_clean());
    }

    #[test]
    fn smuggling_variants_do_not_end_data_and_are_flagged() {
        // Each variant embeds a fake end followed by a smuggled command; only the real
        // CRLF.CRLF at the end may terminate.
        let variants: [&[u8]; 5] = [
            b"a\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r.\rMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\0b\r\n",
        ];
        for v in variants {
            let mut input = v.to_vec();
            input.extend_from_slice(b".\r\n");
            for (_, used, end) in [decode(&input), decode_bytewise(&input)] {
                assert_eq!(used, input.len(), "variant {:?} ended early", v);
                let end = end.expect("real end found");
                assert!(!end.flags.is_clean(), "variant {:?} not flagged", v);
            }
        }
    }

    #[test]
    fn oversize_content_is_counted_not_stored() {
        let mut dec = DataDecoder::new(10);
        let mut out = Vec::new();
        let (_, end) = dec.feed(b"0123456789abcdef\r\n.\r\n", &mut out);
        assert_eq!(out.len(), 10);
        assert_eq!(end.unwrap().size, 18);
    }

    #[test]
    fn content_check_handles_split_crlf() {
        let mut c = ContentCheck::default();
        c.scan(b"abc\r");
        c.scan(b"\ndef\r\n");
        assert!(c.finish().is_clean());

        for bad in [&b"a\nb"[..], b"a\rb", b"a\0b", b"abc\r"] {
            let mut c = ContentCheck::default();
            c.scan(bad);
            assert!(!c.finish().is_clean(), "{:?}", bad);
        }
    }

    #[test]
    fn lines() {
        assert_eq!(find_line(b"NOOP\r\nQUIT"), Line::Complete(6));
        assert_eq!(find_line(b"NOOP"), Line::Incomplete);
        assert_eq!(find_line(&[b'a'; MAX_COMMAND_LINE]), Line::TooLong);
        assert_eq!(trim_line_end(b"NOOP\r\n"), b"NOOP");
        assert_eq!(trim_line_end(b"NOOP\n"), b"NOOP");
    }
}
