//! Measures the bounce parser against a labelled corpus of real-world bounces (one kept
//! outside the repository, e.g. sisimai's `set-of-emails`; see docs/BOUNCES.md "Accuracy").
//!
//! ```sh
//! cargo run --example bounce_accuracy -- DIR [--failures]
//! ```
//!
//! DIR holds `NAME.eml` and `NAME.expect.json` pairs:
//! `{"kind": "dsn|arf|autoreply|none", "recipients": N, "statuses": ["5.1.1", ...],
//!   "reasons": ["userunknown", ...], "addresses": ["bob@example.net", ...]}` (`statuses` and
//! `reasons` one per expected recipient, empty strings for complaints and auto-replies;
//! `reasons` (sisimai's reason names) and `addresses` optional; unknown keys are ignored).
//!
//! Scoring, per message: with `addresses`, a reported recipient is a true positive when it
//! matches an expected address (case-insensitively, each expected address used once), else a
//! false positive; without them, the first `recipients` reported count as true positives.
//! Expected recipients not matched are false negatives. A matched recipient's status is right
//! when it equals the expected one; an expected pseudo-code (sisimai invents `x.0.9xx`,
//! `x.9.xxx` when a message has no code, and `x.0.0` says only the class) is scored on the
//! class digit alone (files holding several messages, like mbox files, are stored one message
//! per file as `NAME-28a`, `NAME-28b`). So `status` is "exact where the answer is a real
//! RFC 3463 code, the class where it is a placeholder"; `strict` compares strings, so a
//! placeholder can never match (tern does not emit codes RFC 3463 does not define); a last
//! line gives the exact share over the real codes alone. Columns: `prec`/`recall` of recipients, `status`
//! (class-aware as above) and `strict` (equal strings) over the recipients found, `reason`
//! agreement with the expected reasons, `kind` right, `fp` false positives. The summary lines
//! give the totals with their counts: recipients expected, reported right, wrong and missed,
//! and status right over every expected recipient that has one. The family of
//! `lhost-postfix-07` is `postfix` (prefixes `lhost-`, `email-` and the number dropped).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Deserialize;
use tern::bounce::{self, classify::Classifier};

#[derive(Deserialize)]
struct Expect {
    kind: String,
    recipients: usize,
    #[serde(default)]
    statuses: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    /// sisimai's reason per expected recipient (optional).
    #[serde(default)]
    reasons: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct Tally {
    messages: usize,
    kind_right: usize,
    tp: usize,
    fp: usize,
    fn_: usize,
    status_scored: usize,
    status_exact: usize,
    status_right: usize,
    /// Found recipients whose expected status is a real RFC 3463 code (not a placeholder),
    /// and those of them given exactly that code.
    status_real: usize,
    status_real_exact: usize,
    /// Expected recipients with a status, found or not.
    status_expected: usize,
    reason_scored: usize,
    reason_right: usize,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.messages += o.messages;
        self.kind_right += o.kind_right;
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
        self.status_scored += o.status_scored;
        self.status_exact += o.status_exact;
        self.status_right += o.status_right;
        self.status_real += o.status_real;
        self.status_real_exact += o.status_real_exact;
        self.status_expected += o.status_expected;
        self.reason_scored += o.reason_scored;
        self.reason_right += o.reason_right;
    }

    fn ratio(a: usize, b: usize) -> String {
        if b == 0 {
            "-".into()
        } else {
            format!("{:.3}", a as f64 / b as f64)
        }
    }

    fn row(&self, name: &str) -> String {
        format!(
            "{name:<22} {:>4} {:>6} {:>6} {:>6} {:>7} {:>6} {:>7} {:>6}",
            self.messages,
            Self::ratio(self.tp, self.tp + self.fp),
            Self::ratio(self.tp, self.tp + self.fn_),
            Self::ratio(self.status_right, self.status_scored),
            Self::ratio(self.status_exact, self.status_scored),
            Self::ratio(self.reason_right, self.reason_scored),
            Self::ratio(self.kind_right, self.messages),
            self.fp,
        )
    }
}

/// sisimai's invented codes: `x.0.9xx`, `x.9.xxx` (no code in the message), and `x.0.0`.
fn pseudo(status: &str) -> bool {
    let parts: Vec<&str> = status.split('.').collect();
    match parts.as_slice() {
        [_, subject, detail] => {
            let s: u32 = subject.parse().unwrap_or(0);
            let d: u32 = detail.parse().unwrap_or(0);
            s >= 8 || d >= 900 || (s == 0 && d == 0)
        }
        _ => true,
    }
}

fn family(name: &str) -> String {
    let base = name
        .strip_prefix("lhost-")
        .or_else(|| name.strip_prefix("email-"))
        .unwrap_or(name);
    // `-07`, or `-28a` / `-28b` for the messages of one mbox file stored one per file.
    let numbered = |n: &str| {
        let digits = n.trim_end_matches(|c: char| c.is_ascii_lowercase());
        !digits.is_empty()
            && digits.len() + 1 >= n.len()
            && digits.chars().all(|c| c.is_ascii_digit())
    };
    match base.rsplit_once('-') {
        Some((f, n)) if numbered(n) => f.to_string(),
        _ => base.to_string(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.iter().find(|a| !a.starts_with("--")) else {
        eprintln!("usage: bounce_accuracy DIR [--failures]");
        return ExitCode::from(64);
    };
    let show_failures = args.iter().any(|a| a == "--failures");
    let show_confusion = args.iter().any(|a| a == "--confusion");
    let mut confusion: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut names: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect(),
        Err(e) => {
            eprintln!("{dir}: {e}");
            return ExitCode::from(66);
        }
    };
    names.sort();
    let classifier = Classifier::defaults();
    let mut families: BTreeMap<String, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    for eml in &names {
        let name = eml
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let expect_path = eml.with_file_name(format!("{name}.expect.json"));
        let expect: Expect = match read_expect(&expect_path) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("{}: {e}", expect_path.display());
                return ExitCode::from(65);
            }
        };
        let raw = match std::fs::read(eml) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{}: {e}", eml.display());
                return ExitCode::from(66);
            }
        };
        let report = bounce::parse(&raw, &classifier);
        let (tally, problems) = score(&expect, &report, &mut confusion);
        families.entry(family(&name)).or_default().add(&tally);
        if !problems.is_empty() {
            failures.push(format!("{name}: {}", problems.join("; ")));
        }
    }
    let mut total = Tally::default();
    println!(
        "{:<22} {:>4} {:>6} {:>6} {:>6} {:>7} {:>6} {:>7} {:>6}",
        "family", "msgs", "prec", "recall", "status", "strict", "reason", "kind", "fp"
    );
    for (name, t) in &families {
        println!("{}", t.row(name));
        total.add(t);
    }
    println!("{}", total.row("TOTAL"));
    println!(
        "TOTAL: {} messages, precision {}, recall {}, status {} ({}/{} found recipients), \
         strict status {}, reason {} ({}/{})",
        total.messages,
        Tally::ratio(total.tp, total.tp + total.fp),
        Tally::ratio(total.tp, total.tp + total.fn_),
        Tally::ratio(total.status_right, total.status_scored),
        total.status_right,
        total.status_scored,
        Tally::ratio(total.status_exact, total.status_scored),
        Tally::ratio(total.reason_right, total.reason_scored),
        total.reason_right,
        total.reason_scored,
    );
    println!(
        "recipients: {} expected, {} reported right, {} wrong, {} missed; status right {}/{} \
         found ({} exact), {}/{} of all expected recipients with a status",
        total.tp + total.fn_,
        total.tp,
        total.fp,
        total.fn_,
        total.status_right,
        total.status_scored,
        total.status_exact,
        total.status_right,
        total.status_expected,
    );
    println!(
        "status where the expected one is a real RFC 3463 code: {}/{} exact ({})",
        total.status_real_exact,
        total.status_real,
        Tally::ratio(total.status_real_exact, total.status_real),
    );
    if show_confusion {
        println!("\nreason confusion (expected -> tern: count), disagreements only:");
        let mut rows: Vec<_> = confusion.iter().filter(|((w, g), _)| w != g).collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for ((want, got), n) in rows {
            println!("  {want:<16} -> {got:<16} {n}");
        }
    }
    if show_failures {
        println!("\nfailures ({}):", failures.len());
        for f in &failures {
            println!("  {f}");
        }
    }
    ExitCode::SUCCESS
}

fn read_expect(path: &Path) -> Result<Expect, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

fn score(
    expect: &Expect,
    report: &bounce::Report,
    confusion: &mut BTreeMap<(String, String), usize>,
) -> (Tally, Vec<String>) {
    let mut t = Tally {
        messages: 1,
        kind_right: usize::from(report.kind.as_str() == expect.kind),
        ..Tally::default()
    };
    let mut problems = Vec::new();
    if t.kind_right == 0 {
        problems.push(format!(
            "kind {} (want {})",
            report.kind.as_str(),
            expect.kind
        ));
    }
    // Each reported recipient paired with the index of the expected one it matches.
    let mut used = vec![false; expect.recipients];
    let mut pairs = Vec::new();
    for r in &report.recipients {
        let index = if expect.addresses.is_empty() {
            (0..expect.recipients).find(|&i| !used[i])
        } else {
            (0..expect.addresses.len().min(expect.recipients))
                .find(|&i| !used[i] && expect.addresses[i].eq_ignore_ascii_case(&r.address))
        };
        match index {
            Some(i) => {
                used[i] = true;
                t.tp += 1;
                pairs.push((i, r));
            }
            None => {
                t.fp += 1;
                problems.push(format!("wrong recipient {}", r.address));
            }
        }
    }
    t.fn_ = used.iter().filter(|u| !**u).count();
    t.status_expected = expect
        .statuses
        .iter()
        .take(expect.recipients)
        .filter(|s| !s.is_empty())
        .count();
    for (i, _) in used.iter().enumerate().filter(|(_, u)| !**u) {
        let what = expect.addresses.get(i).map(String::as_str).unwrap_or("?");
        problems.push(format!("missed {what}"));
    }
    let pairs_for_reason = pairs.clone();
    for (i, r) in pairs {
        let want = expect.statuses.get(i).map(String::as_str).unwrap_or("");
        if want.is_empty() {
            continue;
        }
        let got = r.status.as_deref().unwrap_or("");
        t.status_scored += 1;
        let exact = got == want;
        let right = exact || (pseudo(want) && got.get(..1) == want.get(..1));
        t.status_exact += usize::from(exact);
        if !pseudo(want) {
            t.status_real += 1;
            t.status_real_exact += usize::from(exact);
        }
        t.status_right += usize::from(right);
        if !right {
            problems.push(format!("{} status {got} (want {want})", r.address));
        }
    }
    for (i, r) in &pairs_for_reason {
        let Some(want) = expect.reasons.get(*i).filter(|w| !w.is_empty()) else {
            continue;
        };
        t.reason_scored += 1;
        *confusion
            .entry((want.clone(), r.reason.as_str().to_owned()))
            .or_default() += 1;
        if r.reason.as_str() == want {
            t.reason_right += 1;
        } else {
            problems.push(format!(
                "{} reason {} (want {want}; {} {})",
                r.address,
                r.reason.as_str(),
                r.category.as_str(),
                r.diagnostic.as_deref().unwrap_or("-")
            ));
        }
    }
    (t, problems)
}
