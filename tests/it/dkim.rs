//! DKIM: `tern dkim keygen` (the real binary) and signatures checked by an independent
//! verifier, Python's dkimpy, against the DNS record keygen printed.

use crate::harness::{describe, tern_bin};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tern::config::{DkimConfig, DEFAULT_DKIM_HEADERS, DEFAULT_DKIM_OVERSIGN};
use tern::dkim::DkimSigners;

/// Verifies the first DKIM signature of the message in file argv[2] with dkimpy, answering
/// the key lookup from the zone line in argv[1] (its quoted strings concatenated, as DNS
/// resolvers do). Prints True or False.
const VERIFY: &str = r#"
import re, sys
import dkim
owner, rdata = sys.argv[1].split(" IN TXT ", 1)
txt = "".join(re.findall(r'"([^"]*)"', rdata)).encode()
def dnsfunc(name, timeout=5):
    return txt if name == owner.encode() else None
with open(sys.argv[2], "rb") as f:
    message = f.read()
print(dkim.verify(message, dnsfunc=dnsfunc, minkey=2048))
"#;

const MESSAGE: &str = concat!(
    "From: Alice <alice@example.com>\r\n",
    "To: Bob <bob@dest.test>, carol@dest.test\r\n",
    "Subject: DKIM interop\r\n",
    "Date: Tue, 01 Jul 2025 10:00:00 +0000\r\n",
    "Message-ID: <interop-1@example.com>\r\n",
    "MIME-Version: 1.0\r\n",
    "Content-Type: text/plain; charset=utf-8\r\n",
    "\r\n",
    "Hello Bob,\r\n",
    "\r\n",
    "trailing  spaces and\ttabs   \r\n",
    ".a leading dot\r\n",
    "\r\n",
    "\r\n",
);

fn run(cwd: &Path, args: &[&str]) -> Output {
    Command::new(tern_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run tern")
}

/// `tern dkim keygen` into `dir`; returns the key file and the printed zone line.
pub(crate) fn keygen(dir: &Path, selector: &str, algorithm_args: &[&str]) -> (PathBuf, String) {
    let path = dir.join(format!("{selector}.pem"));
    let mut args = vec![
        "dkim",
        "keygen",
        "--domain",
        "example.com",
        "--selector",
        selector,
        "--out",
        path.to_str().unwrap(),
    ];
    args.extend_from_slice(algorithm_args);
    let out = run(dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the record on stdout: {stdout:?}");
    (path, lines[0].to_owned())
}

pub(crate) fn dkimpy_available() -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import dkim, nacl"])
        .stdin(Stdio::null())
        .output();
    if probe.is_ok_and(|o| o.status.success()) {
        return true;
    }
    eprintln!(
        "NOTICE: python3 with dkimpy and pynacl not found (pip install dkimpy pynacl); \
         skipping the DKIM interoperability test"
    );
    false
}

/// dkimpy's verdict on `message`.
pub(crate) fn dkimpy_verifies(dir: &Path, zone_line: &str, message: &[u8]) -> bool {
    let path = dir.join("message.eml");
    std::fs::write(&path, message).unwrap();
    let out = Command::new("python3")
        .args(["-c", VERIFY, zone_line, path.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", describe(&out));
    match String::from_utf8_lossy(&out.stdout).trim() {
        "True" => true,
        "False" => false,
        other => panic!("unexpected dkimpy output {other:?}: {}", describe(&out)),
    }
}

#[test]
fn keygen_writes_a_private_key_file_once() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "dkim",
        "keygen",
        "--domain",
        "Example.COM",
        "--selector",
        "s1",
        "--algorithm",
        "ed25519",
    ];
    let out = run(dir.path(), &args);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("s1._domainkey.example.com. IN TXT \"v=DKIM1; k=ed25519; p="),
        "{}",
        describe(&out)
    );
    let path = dir.path().join("example.com.s1.pem");
    let pem = std::fs::read_to_string(&path).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let again = run(dir.path(), &args);
    assert_eq!(again.status.code(), Some(1), "{}", describe(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists, not overwritten"),
        "{}",
        describe(&again)
    );
    assert!(again.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), pem, "untouched");

    for bad in [
        &["--selector", "s2", "--algorithm", "rsa", "--bits", "1024"][..],
        &["--selector", "../s3", "--algorithm", "ed25519"][..],
    ] {
        let args: Vec<&str> = ["dkim", "keygen", "--domain", "example.com"]
            .iter()
            .chain(bad)
            .copied()
            .collect();
        let out = run(dir.path(), &args);
        assert_eq!(out.status.code(), Some(64), "EX_USAGE: {}", describe(&out));
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no other file"
    );
}

#[test]
fn dkimpy_verifies_rsa_and_ed25519_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa_path, rsa_record) = keygen(dir.path(), "rsa", &["--algorithm", "rsa"]);
    let (ed_path, ed_record) = keygen(dir.path(), "ed", &["--algorithm", "ed25519"]);
    assert!(
        rsa_record.starts_with("rsa._domainkey.example.com. IN TXT \"v=DKIM1; k=rsa; p=MII"),
        "{rsa_record}"
    );
    // An RSA-2048 record is longer than one DNS character-string.
    assert_eq!(rsa_record.matches('"').count(), 4, "{rsa_record}");

    let config = |selector: &str, key_path: PathBuf| DkimConfig {
        domain: "example.com".into(),
        selector: selector.into(),
        key_path,
        headers: DEFAULT_DKIM_HEADERS.iter().map(|h| h.to_string()).collect(),
        oversign: DEFAULT_DKIM_OVERSIGN
            .iter()
            .map(|h| h.to_string())
            .collect(),
        active_from: None,
        retire_after: None,
    };
    // Each key on its own, because dkimpy's `verify` checks only the topmost signature.
    for (selector, path, record) in [("rsa", rsa_path, rsa_record), ("ed", ed_path, ed_record)] {
        let signers = DkimSigners::load(
            &[config(selector, path)],
            std::sync::Arc::new(tern::telemetry::Metrics::new()),
        )
        .expect("generated key loads");
        let header = signers.sign(MESSAGE.as_bytes()).expect("signed");
        let signed = format!("{header}{MESSAGE}");
        if !dkimpy_available() {
            return;
        }
        assert!(
            dkimpy_verifies(dir.path(), &record, signed.as_bytes()),
            "{selector}: {signed}"
        );
        let tampered = signed.replace("tabs", "Tabs");
        assert!(
            !dkimpy_verifies(dir.path(), &record, tampered.as_bytes()),
            "{selector}: body change detected"
        );
        // Subject is over-signed: a second one added in transit breaks the signature even at
        // the top, where a verifier (taking instances bottom-up) would otherwise not look;
        // a header that is not signed may still be added.
        let extra_subject = format!("Subject: urgent\r\n{signed}");
        assert!(
            !dkimpy_verifies(dir.path(), &record, extra_subject.as_bytes()),
            "{selector}: added Subject detected"
        );
        let extra_unsigned = signed.replace("\r\n\r\nHello", "\r\nX-Relay: yes\r\n\r\nHello");
        assert!(
            dkimpy_verifies(dir.path(), &record, extra_unsigned.as_bytes()),
            "{selector}: unsigned header added"
        );
    }
}

/// `tern dkim check` against a loopback DNS server: a key published as configured passes; a
/// selector publishing another key, and a pending key not yet published, fail the check (exit
/// 1, each named); a retired key that is gone is fine.
// Two workers: the DNS server answers while this thread waits for the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_check_compares_each_key_with_its_dns_record() {
    use crate::dns_server::{DnsServer, Zone};
    let dir = tempfile::tempdir().unwrap();
    let ed = ["--algorithm", "ed25519"];
    let keys: Vec<PathBuf> = ["s1", "s2", "s3", "s4", "other"]
        .iter()
        .map(|s| keygen(dir.path(), s, &ed).0)
        .collect();
    let value = |p: &Path| tern::dkim::txt_value(&std::fs::read(p).unwrap()).unwrap();
    let dns = DnsServer::start(
        Zone::new()
            .txt("s1._domainkey.example.com", &value(&keys[0]))
            .txt("s2._domainkey.example.com", &value(&keys[4])),
    )
    .await;
    let entry = |i: usize, extra: &str| {
        format!(
            "[[dkim]]\ndomain = \"example.com\"\nselector = \"s{}\"\nkey = {:?}\n{extra}\n",
            i + 1,
            keys[i].display().to_string()
        )
    };
    let base = format!(
        "[[listeners]]\naddress = \"127.0.0.1:2525\"\n[spool]\npath = {:?}\n\
         [delivery]\nnameservers = [\"{}\"]\n",
        dir.path().join("spool").display().to_string(),
        dns.addr
    );
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let good = write("good.toml", format!("{base}{}", entry(0, "")));
    let out = run(
        dir.path(),
        &["dkim", "check", "--config", good.to_str().unwrap()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout.contains("example.com/s1  active   published"),
        "{stdout}"
    );

    let mixed = write(
        "mixed.toml",
        format!(
            "{base}{}{}{}{}",
            entry(0, ""),
            entry(1, ""),
            entry(2, "retire_after = 2020-01-01T00:00:00Z"),
            entry(3, "active_from = \"2999-01-01T00:00:00Z\""),
        ),
    );
    let out = run(
        dir.path(),
        &["dkim", "check", "--config", mixed.to_str().unwrap()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let line = |selector: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("example.com/{selector} ")))
            .unwrap_or_else(|| panic!("no line for {selector}: {stdout}"))
            .to_owned()
    };
    assert!(line("s1").ends_with("published"), "{stdout}");
    assert!(line("s2").contains("MISMATCH"), "{stdout}");
    assert!(
        line("s3").contains("retired") && line("s3").contains("fine"),
        "{stdout}"
    );
    assert!(
        line("s4").contains("pending") && line("s4").contains("MISSING"),
        "{stdout}"
    );

    let out = run(
        dir.path(),
        &[
            "dkim",
            "check",
            "--domain",
            "other.test",
            "--config",
            mixed.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(64), "{}", describe(&out));
}

/// The daemon checks its keys' records at start: `tern_dkim_key_published` is 1 for a key
/// DNS publishes and 0 for one whose selector publishes another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reports_which_dkim_keys_dns_publishes() {
    use crate::dns_server::{DnsServer, Zone};
    let dir = tempfile::tempdir().unwrap();
    let ed = ["--algorithm", "ed25519"];
    let (good, _) = keygen(dir.path(), "s1", &ed);
    let (bad, _) = keygen(dir.path(), "s2", &ed);
    let (other, _) = keygen(dir.path(), "other", &ed);
    let value = |p: &Path| tern::dkim::txt_value(&std::fs::read(p).unwrap()).unwrap();
    let dns = DnsServer::start(
        Zone::new()
            .txt("s1._domainkey.example.com", &value(&good))
            .txt("s2._domainkey.example.com", &value(&other)),
    )
    .await;
    let entry = |selector: &str, key: &Path| {
        format!(
            "domain = \"example.com\"\nselector = \"{selector}\"\nkey = {:?}",
            key.display().to_string()
        )
    };
    use crate::harness::{Options, TestServer};
    let server = TestServer::start(
        Options::default()
            .delivery("check_dkim_records", true)
            .delivery("nameservers", format!("[\"{}\"]", dns.addr))
            .dkim(entry("s1", &good))
            .dkim(entry("s2", &bad)),
    )
    .await;
    let name =
        |s: &str| format!("tern_dkim_key_published{{domain=\"example.com\",selector=\"{s}\"}}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let metrics = loop {
        let metrics = crate::metrics::scrape(server.admin()).await;
        if metrics.contains_key(&name("s1")) && metrics.contains_key(&name("s2")) {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no check: {metrics:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(metrics[&name("s1")], 1.0);
    assert_eq!(metrics[&name("s2")], 0.0);
    server.stop().await;
}
