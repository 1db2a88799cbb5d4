//! The `X-Tern-Send-Time` control header, read and removed by the send-time stage when the
//! sidecar did not already take it. The header never leaves tern: it is removed before DKIM
//! signing and delivery whatever its value.

/// Removes every `X-Tern-Send-Time` header (with its folded lines) from the header block of
/// `content` and says whether one asked for `optimize`.
pub fn take_send_time_header(content: &mut Vec<u8>) -> bool {
    const NAME: &[u8] = b"x-tern-send-time:";
    let mut optimize = false;
    let mut out = Vec::with_capacity(content.len());
    let mut pos = 0;
    let mut skipping = false;
    while pos < content.len() {
        let end = memchr::memchr(b'\n', &content[pos..]).map_or(content.len(), |i| pos + i + 1);
        let line = &content[pos..end];
        if line == b"\r\n" || line == b"\n" {
            // End of the header block: the body is copied as it is.
            out.extend_from_slice(&content[pos..]);
            break;
        }
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            skipping = line.len() >= NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME);
            if skipping {
                let value = String::from_utf8_lossy(&line[NAME.len()..]);
                optimize |= value.trim().eq_ignore_ascii_case("optimize");
            }
        }
        if !skipping {
            out.extend_from_slice(line);
        }
        pos = end;
    }
    if out.len() != content.len() {
        *content = out;
    }
    optimize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_the_header_and_keeps_the_rest() {
        let mut m =
            b"Subject: a\r\nX-Tern-Send-Time: optimize\r\nTo: b\r\n\r\nX-Tern-Send-Time: body\r\n"
                .to_vec();
        assert!(take_send_time_header(&mut m));
        assert_eq!(m, b"Subject: a\r\nTo: b\r\n\r\nX-Tern-Send-Time: body\r\n");
        let mut folded = b"x-tern-send-time:\r\n  now\r\nSubject: a\r\n\r\nb\r\n".to_vec();
        assert!(!take_send_time_header(&mut folded));
        assert_eq!(folded, b"Subject: a\r\n\r\nb\r\n");
        let mut plain = b"Subject: a\r\n\r\nb\r\n".to_vec();
        assert!(!take_send_time_header(&mut plain));
        assert_eq!(plain, b"Subject: a\r\n\r\nb\r\n");
    }
}
