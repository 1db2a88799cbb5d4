//! systemd integration with the real binary: the sd_notify conversation (READY, watchdog
//! pings, RELOADING/READY around SIGHUP, STOPPING on SIGTERM) over a unix datagram socket the
//! test binds, and `systemd-analyze verify` on the shipped unit pointed at the built binary.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::process::Command;

use crate::delivery::{wait_for, T};
use crate::harness::*;

/// Every datagram received on the notify socket, in order.
fn listen(socket: UnixDatagram) -> Arc<Mutex<Vec<String>>> {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf).await {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            sink.lock().unwrap().push(text);
        }
    });
    received
}

fn count(received: &Mutex<Vec<String>>, what: &str) -> usize {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.as_str() == what)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_watchdog_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let received = listen(UnixDatagram::bind(&socket_path).unwrap());
    let port = free_port();
    let config = write_bin_config(dir.path(), port, &Options::default());
    let log = dir.path().join("tern.log");
    let mut cmd = Command::new(tern_bin());
    cmd.args(["serve", "--config"]).arg(&config);
    cmd.env("NOTIFY_SOCKET", &socket_path)
        // Pings every 100 ms.
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID");
    let mut tern = TernProc::spawn_command(cmd, port, &log);
    tern.wait_ready(T).await;

    wait_for("READY=1", T, || count(&received, "READY=1") == 1).await;
    wait_for("three watchdog pings", T, || {
        count(&received, "WATCHDOG=1") >= 3
    })
    .await;

    send_signal(tern.pid(), "HUP");
    wait_for("READY=1 after the reload", T, || {
        count(&received, "READY=1") == 2
    })
    .await;
    {
        let messages = received.lock().unwrap();
        let reloading = messages
            .iter()
            .position(|m| m.starts_with("RELOADING=1\n"))
            .unwrap_or_else(|| panic!("no RELOADING=1 in {messages:?}"));
        let usec: u64 = messages[reloading]
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("MONOTONIC_USEC missing: {:?}", messages[reloading]));
        assert!(usec > 0);
        let second_ready = messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.as_str() == "READY=1")
            .nth(1)
            .unwrap()
            .0;
        assert!(reloading < second_ready, "{messages:?}");
    }
    let pings = count(&received, "WATCHDOG=1");
    wait_for("pings go on after the reload", T, || {
        count(&received, "WATCHDOG=1") >= pings + 2
    })
    .await;

    send_signal(tern.pid(), "TERM");
    let status = tern.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}\n{}", tern.log_text());
    assert_eq!(count(&received, "STOPPING=1"), 1, "{:?}", received.lock());
}

/// No pings unless systemd asks this process for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_watchdog_pings_for_another_pid() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let received = listen(UnixDatagram::bind(&socket_path).unwrap());
    let port = free_port();
    let config = write_bin_config(dir.path(), port, &Options::default());
    let mut cmd = Command::new(tern_bin());
    cmd.args(["serve", "--config"]).arg(&config);
    cmd.env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "100000")
        .env("WATCHDOG_PID", "1");
    let mut tern = TernProc::spawn_command(cmd, port, &dir.path().join("tern.log"));
    tern.wait_ready(T).await;
    wait_for("READY=1", T, || count(&received, "READY=1") == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&received, "WATCHDOG=1"), 0, "{:?}", received.lock());
    send_signal(tern.pid(), "TERM");
    assert!(tern.wait_exit(Duration::from_secs(20)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_file_verifies_against_the_built_binary() {
    let unit = std::fs::read_to_string(manifest_dir().join("systemd/tern.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=tern",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE\n",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}");
    }
    let Ok(status) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    else {
        panic!("systemd-analyze is missing: install the `systemd` package (.ci/run does)");
    };
    assert!(status.success());

    // systemd-analyze checks that the executables exist: point them at the built binary.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.service");
    let bin = tern_bin();
    std::fs::write(&path, unit.replace("/usr/bin/tern", bin)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("tern.service"),
        "systemd-analyze warns about the unit:\n{stderr}"
    );
}
