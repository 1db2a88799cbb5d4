//! Header-style field groups as RFC 3464 delivery-status and RFC 5965 feedback-report bodies
//! hold them: `Name: value` lines, folded continuation lines joined with one space, groups
//! separated by blank lines. Input is already LF-only (see [`super::normalize`]).

/// One group: `(lowercase name, unfolded value)` in order; names may repeat.
pub type Group = Vec<(String, String)>;

/// At most this many groups are read, bounding the work for a hostile report.
const MAX_GROUPS: usize = 1000;

/// Splits `body` into field groups; lines that are not fields are skipped.
pub fn groups(body: &str) -> Vec<Group> {
    let mut out = Vec::new();
    let mut group: Group = Vec::new();
    for line in body.split('\n') {
        if line.trim().is_empty() {
            if !group.is_empty() {
                out.push(std::mem::take(&mut group));
                if out.len() == MAX_GROUPS {
                    return out;
                }
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = group.last_mut() {
                if !value.is_empty() {
                    value.push(' ');
                }
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if !name.is_empty() && !name.contains(' ') {
                group.push((name.to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
    }
    if !group.is_empty() {
        out.push(group);
    }
    out
}

/// The first value of field `name` (lowercase) in `group`.
pub fn get<'a>(group: &'a Group, name: &str) -> Option<&'a str> {
    group
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// Every value of field `name` in `group`.
pub fn all<'a>(group: &'a Group, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    group
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_values_and_groups() {
        let g = groups(
            "Reporting-MTA: dns; mx.example\n\nFinal-Recipient: rfc822; a@b.example\n\
             Diagnostic-Code: smtp; 550 5.1.1 user\n  unknown\n\n\nAction: failed\nnot a field\n",
        );
        assert_eq!(g.len(), 3);
        assert_eq!(
            get(&g[1], "diagnostic-code"),
            Some("smtp; 550 5.1.1 user unknown")
        );
        assert_eq!(get(&g[2], "action"), Some("failed"));
        assert_eq!(get(&g[2], "missing"), None);
    }
}
