//! Guardrails on generated text: what a model writes may only be plain words in its slot.
//!
//! Invariants of [`clean`]'s output: no control characters (CR, LF, NUL, tabs and the rest
//! of Cc), no HTML tags or `<`/`>`, no URLs (scheme links, `www.` hosts, bare domain names,
//! e-mail addresses), whitespace collapsed, at most `max_chars` characters, cut at a word
//! boundary when one is near. Links come only from the template.

use std::sync::LazyLock;

use regex::Regex;

/// Tags, scheme links, `www.` hosts, e-mail addresses and bare domain names (a dotted name
/// ending in letters, optionally with a path).
static UNSAFE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?xi)
        <[^>]*>?
      | \b[a-z][a-z0-9+.-]*://\S*
      | \bwww\.\S*
      | \S+@\S+
      | \b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b(?:/\S*)?",
    )
    .expect("valid regex")
});

/// Makes model output safe for its slot; `None` if nothing usable is left.
pub fn clean(text: &str, max_chars: usize) -> Option<String> {
    let no_controls: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let no_links = UNSAFE.replace_all(&no_controls, " ");
    let words: Vec<&str> = no_links
        .split_whitespace()
        .map(|w| w.trim_matches(|c| c == '<' || c == '>'))
        .filter(|w| !w.is_empty())
        .collect();
    let joined = words.join(" ");
    let capped = cap(&joined, max_chars);
    let capped = capped.trim_end_matches([',', ';', ':', '-', ' ']);
    (!capped.is_empty()).then(|| capped.to_owned())
}

/// The first `max_chars` characters, cut back to the last space if one is in the last fifth.
fn cap(text: &str, max_chars: usize) -> &str {
    let Some((end, _)) = text.char_indices().nth(max_chars) else {
        return text;
    };
    let head = &text[..end];
    match head.rfind(' ') {
        Some(space) if space * 5 >= end * 4 => &head[..space],
        _ => head,
    }
}

/// Strips control characters from operator-supplied text bound for a header (the rendered
/// Subject): recipient data must not fold or inject headers either.
pub fn header_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_controls_links_and_html() {
        let got = clean(
            "Hi\r\nBcc: victim@x.test\0 <b>now</b> visit https://evil.test/x or www.evil.test, evil.com/path!",
            200,
        )
        .unwrap();
        assert!(!got.contains(['\r', '\n', '\0', '<', '>']), "{got}");
        assert!(!got.contains("evil"), "{got}");
        assert!(!got.contains('@'), "{got}");
        assert!(got.starts_with("Hi Bcc:"), "{got}");
    }

    #[test]
    fn caps_length_at_a_word() {
        let got = clean("one two three four five six seven", 16).unwrap();
        assert_eq!(got, "one two three");
        assert_eq!(clean("ééééé", 3).unwrap(), "ééé");
        assert_eq!(clean(" \r\n<p></p> ", 10), None);
    }

    #[test]
    fn header_text_is_one_line() {
        assert_eq!(header_text("a\r\nB: c\td"), "a B: c d");
    }
}
