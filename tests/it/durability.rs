//! "250 queued" only after fsync: traced with strace on the real binary. For each message,
//! a completed fsync/fdatasync must lie between the read that delivered the final ".CRLF"
//! and the write of the 250 reply.

use crate::harness::*;
use std::time::{Duration, Instant};
use tokio::process::Command;

const MESSAGES: usize = 3;

/// Whether strace exists and may trace here (ptrace can be forbidden in containers).
fn strace_usable() -> bool {
    std::process::Command::new("strace")
        .args(["-f", "-o", "/dev/null", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_read(line: &str) -> bool {
    [
        " read(",
        " recvfrom(",
        "<... read resumed>",
        "<... recvfrom resumed>",
    ]
    .iter()
    .any(|p| line.contains(p))
}

/// The line on which a write of the 250 starts (its data is printed at entry).
fn is_write(line: &str) -> bool {
    line.contains(" write(") || line.contains(" sendto(")
}

/// A completed, successful fsync or fdatasync.
fn is_sync_done(line: &str) -> bool {
    let ok = line.trim_end().ends_with("= 0");
    let entry =
        (line.contains(" fsync(") || line.contains(" fdatasync(")) && !line.contains("<unfinished");
    let resumed = line.contains("<... fsync resumed>") || line.contains("<... fdatasync resumed>");
    ok && (entry || resumed)
}

/// The pid of strace's traced child (tern).
async fn traced_child(strace_pid: u32) -> u32 {
    let path = format!("/proc/{strace_pid}/task/{strace_pid}/children");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Some(pid) = text.split_whitespace().next() {
                return pid.parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "strace started no child");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks the ordering for every message; `Err` describes the first violation.
fn check_trace(trace: &str, ids: &[String]) -> Result<(), String> {
    let lines: Vec<&str> = trace.lines().collect();
    let mut after = 0;
    for (i, id) in ids.iter().enumerate() {
        // strace shows CR LF as the two-character escapes \r \n.
        let end_of_data = format!(r"body dur{i}\r\n.\r\n");
        let read = after
            + lines[after..]
                .iter()
                .position(|l| is_read(l) && l.contains(&end_of_data))
                .ok_or_else(|| format!("message {i}: no read of the final .CRLF in the trace"))?;
        let ack_text = format!("250 2.0.0 Ok: queued as {id}");
        let ack = read
            + lines[read..]
                .iter()
                .position(|l| is_write(l) && l.contains(&ack_text))
                .ok_or_else(|| format!("message {i}: no write of {ack_text:?} after the data"))?;
        let synced = lines[read + 1..ack].iter().any(|l| is_sync_done(l));
        if !synced {
            return Err(format!(
                "message {i}: no completed fsync/fdatasync between the end of data (trace line {}) \
                 and the 250 (trace line {}):\n{}",
                read + 1,
                ack + 1,
                lines[read..=ack].join("\n")
            ));
        }
        after = ack + 1;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_reply_is_written_only_after_fsync() {
    if !strace_usable() {
        eprintln!(
            "NOTICE: strace missing or ptrace not permitted; skipping the fsync ordering test"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let opts = Options {
        log_level: "warn".to_string(),
        ..Options::default()
    };
    let config = write_bin_config(dir.path(), port, &opts);
    let trace_path = dir.path().join("trace.txt");
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-e",
        "trace=read,recvfrom,write,sendto,fsync,fdatasync",
        "-s",
        "80",
        "-o",
    ])
    .arg(&trace_path)
    .arg(tern_bin())
    .args(["serve", "--config"])
    .arg(&config);
    let mut tern = TernProc::spawn_command(cmd, port, &dir.path().join("tern.log"));
    let strace_pid = tern.pid();
    let mut c = tern.wait_ready(Duration::from_secs(60)).await;
    c.ehlo().await;
    let mut ids = Vec::new();
    for i in 0..MESSAGES {
        c.expect(&format!("MAIL FROM:<dur{i}@client.test>"), 250, "2.1.0")
            .await;
        c.expect("RCPT TO:<r@sink.test>", 250, "2.1.5").await;
        c.expect("DATA", 354, "").await;
        // Short enough for strace's 80-character strings to show the whole read.
        let content = format!("Subject: dur{i}\r\n\r\nbody dur{i}\r\n.\r\n");
        assert!(content.len() < 60);
        c.send(&content).await;
        ids.push(c.reply().await.queued_id().to_string());
    }
    c.expect("QUIT", 221, "2.0.0").await;
    let tern_pid = traced_child(strace_pid).await;
    send_signal(tern_pid, "TERM");
    let status = tern.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "tern under strace exits 0 on SIGTERM: {status:?}\n{}",
        tern.log_text()
    );
    let trace = std::fs::read_to_string(&trace_path).unwrap();
    assert!(trace.lines().count() > 10, "empty trace:\n{trace}");
    if let Err(e) = check_trace(&trace, &ids) {
        panic!("{e}");
    }
}

#[test]
fn trace_checker_rejects_a_reply_before_fsync() {
    // The checker itself must be able to fail: a 250 written before the fsync completed.
    let good = "\
10 recvfrom(9, \"Subject: dur0\\r\\n\\r\\nbody dur0\\r\\n.\\r\\n\", 16384, 0, NULL, NULL) = 32
11 fdatasync(7 <unfinished ...>
11 <... fdatasync resumed>) = 0
10 sendto(9, \"250 2.0.0 Ok: queued as 00062AA1B2C3D400\\r\\n\", 42, MSG_NOSIGNAL, NULL, 0) = 42
";
    let id = ["00062AA1B2C3D400".to_string()];
    assert_eq!(check_trace(good, &id), Ok(()));
    let bad = "\
10 recvfrom(9, \"Subject: dur0\\r\\n\\r\\nbody dur0\\r\\n.\\r\\n\", 16384, 0, NULL, NULL) = 32
11 fdatasync(7 <unfinished ...>
10 sendto(9, \"250 2.0.0 Ok: queued as 00062AA1B2C3D400\\r\\n\", 42, MSG_NOSIGNAL, NULL, 0) = 42
11 <... fdatasync resumed>) = 0
";
    let failed = check_trace(bad, &id);
    assert!(
        failed
            .as_ref()
            .is_err_and(|e| e.contains("no completed fsync")),
        "a 250 before the fsync completed must fail the check: {failed:?}"
    );
    // And a trace without the data read or without the reply fails too.
    assert!(check_trace("", &id).is_err());
}
