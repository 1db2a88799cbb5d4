//! Daemon logs with the real binary: `log.format = "json"` writes one JSON object per line
//! on stderr (nothing else), and `log.level` changes on SIGHUP.

use std::time::Duration;

use serde_json::Value;

use crate::delivery::{wait_for, T};
use crate::harness::*;

fn json_config(dir: &std::path::Path, port: u16, level: &str) -> std::path::PathBuf {
    let path = write_bin_config(dir, port, &Options::default());
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("format = \"text\"", "format = \"json\"")
        .replace("level = \"info\"", &format!("level = \"{level}\""));
    assert!(text.contains("format = \"json\""), "{text}");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_json_lines_and_the_level_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = json_config(dir.path(), port, "warn");
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("tern.log"));
    let mut c = tern.wait_ready(T).await;
    c.ehlo().await;
    json_config(dir.path(), port, "info");
    send_signal(tern.pid(), "HUP");
    wait_for("the reload logged at info", T, || {
        tern.log_text().contains("config reloaded")
    })
    .await;
    send_signal(tern.pid(), "TERM");
    let status = tern.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}\n{}", tern.log_text());

    let text = tern.log_text();
    let lines: Vec<Value> = text
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect();
    assert!(lines.len() >= 2, "{text}");
    let mut messages = Vec::new();
    for line in &lines {
        for key in ["timestamp", "level", "target"] {
            assert!(line[key].is_string(), "no {key} in {line}");
        }
        let message = line["fields"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fields.message in {line}"));
        messages.push(message.to_string());
    }
    // At "warn" the start-up info lines were filtered; after the reload, info lines appear.
    assert!(!messages.iter().any(|m| m == "listening"), "{messages:?}");
    assert!(
        messages.iter().any(|m| m == "config reloaded"),
        "{messages:?}"
    );
    assert!(messages.iter().any(|m| m == "stopped"), "{messages:?}");
}
