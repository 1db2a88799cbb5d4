//! `tern queue drain --to HOST:PORT [--destination D] [--auth-file F]`: hands this node's
//! queue to another tern node over SMTP (the relaying itself is `scheduler::drain`).
//!
//! With the daemon stopped it opens the spool itself. With the daemon running (the spool is
//! in use) it asks the daemon (`POST /api/v1/queue/drain`, `admin` scope), which claims each
//! message from its scheduler before relaying it, so nothing is delivered twice.
//!
//! Credentials come from the file `--auth-file` names (user name, then password, one per
//! line), never from the command line (where `ps` would show them).

use super::check_config::load;
use super::client::{AdminClient, CallError};
use super::{EX_DATAERR, EX_TEMPFAIL};
use crate::scheduler::drain::{drain, read_credentials, Drained, Local, Peer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use tern_queue::{Spool, SpoolError};

/// The command's arguments.
pub struct Args<'a> {
    pub to: &'a str,
    pub destination: Option<&'a str>,
    pub connections: usize,
    pub auth_file: Option<&'a Path>,
    pub peer_name: Option<&'a str>,
    pub ca_file: Option<&'a Path>,
    pub loopback_unverified: bool,
}

pub fn run(config: Option<&Path>, args: &Args<'_>) -> ExitCode {
    let config = match load(config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Ok(addr) = args.to.parse::<SocketAddr>() else {
        eprintln!(
            "tern: --to: {:?} is not HOST:PORT with an IP address",
            args.to
        );
        return ExitCode::from(EX_DATAERR);
    };
    let mut peer = Peer::new(addr);
    if let Some(name) = args.peer_name {
        peer.name = name.to_owned();
    }
    peer.ca_file = args.ca_file.map(absolute);
    peer.loopback_unverified = args.loopback_unverified;
    if peer.loopback_unverified && !addr.ip().is_loopback() {
        eprintln!("tern: --loopback-unverified: {addr} is not a loopback address");
        return ExitCode::from(EX_DATAERR);
    }
    if let Some(file) = args.auth_file {
        match read_credentials(file) {
            Ok(credentials) => peer.auth = Some(credentials),
            Err(e) => {
                eprintln!("tern: --auth-file: {e}");
                return ExitCode::from(EX_DATAERR);
            }
        }
    }
    let destination = args.destination.map(str::to_ascii_lowercase);
    let connections = args.connections.max(1);
    let spool = match Spool::open(&config.spool.path) {
        Ok(spool) => spool,
        Err(SpoolError::InUse { .. }) => {
            return live(&config, args, destination.as_deref(), connections);
        }
        Err(err) => {
            eprintln!("tern: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let result = runtime.block_on(drain(
        &Local::of(&config),
        spool.clone(),
        &peer,
        destination,
        connections,
        None,
    ));
    if let Err(e) = runtime.block_on(spool.flush()) {
        eprintln!("tern: spool flush: {e}");
    }
    report(result, addr, started.elapsed().as_secs_f64())
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The running daemon drains itself: the same arguments through its admin API (file names,
/// never their contents).
fn live(
    config: &crate::config::Config,
    args: &Args<'_>,
    destination: Option<&str>,
    connections: usize,
) -> ExitCode {
    let body = serde_json::json!({
        "to": args.to,
        "destination": destination,
        "connections": connections,
        "auth_file": args.auth_file.map(absolute),
        "peer_name": args.peer_name,
        "ca_file": args.ca_file.map(absolute),
        "loopback_unverified": args.loopback_unverified,
    });
    match AdminClient::new(config).call("POST", "/queue/drain", Some(&body)) {
        Ok(answer) => {
            println!(
                "the running daemon drained {} messages ({} recipients) to {} in {:.1}s; {} recipients refused and kept, {} held messages left",
                answer["messages"],
                answer["recipients"],
                args.to,
                answer["seconds"].as_f64().unwrap_or(0.0),
                answer["refused"],
                answer["held"],
            );
            if answer["refused"].as_u64().unwrap_or(0) > 0 {
                ExitCode::from(EX_TEMPFAIL)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(CallError::Unreachable(why)) => {
            eprintln!("tern: the spool is in use but the daemon does not answer: {why}");
            ExitCode::from(EX_TEMPFAIL)
        }
        Err(e @ CallError::Api { status, .. }) => {
            eprintln!("tern: {e}");
            ExitCode::from(if (400..500).contains(&status) {
                EX_DATAERR
            } else {
                EX_TEMPFAIL
            })
        }
        Err(e) => {
            eprintln!("tern: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report(result: Result<Drained, (Drained, String)>, peer: SocketAddr, secs: f64) -> ExitCode {
    match result {
        Ok(d) => {
            println!(
                "drained {} messages ({} recipients) to {peer} in {secs:.1}s ({:.0} messages/s); {} recipients refused and kept, {} held messages left",
                d.messages,
                d.recipients,
                d.messages as f64 / secs.max(1e-9),
                d.refused,
                d.held,
            );
            if d.refused > 0 {
                ExitCode::from(EX_TEMPFAIL)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err((d, e)) => {
            eprintln!(
                "tern: drain stopped after {} messages: {e}; the rest is still queued, run it again",
                d.messages
            );
            ExitCode::from(EX_TEMPFAIL)
        }
    }
}
