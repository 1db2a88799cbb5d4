//! HTTP injection load generator: N clients, each on its own keep-alive connection, POST
//! /api/v1/inject as fast as the daemon answers. Reports messages/s, recipients/s and the
//! latency of each call (a 200 means spooled and fsync'd). Loopback targets only.
//!
//! cargo run --release --example inject_load -- ADMIN_ADDR TOKEN_FILE [messages] [clients] [rcpts] [size]
//!
//! Defaults: 20000 messages, 20 clients, 1 recipient per call, 5000-byte messages. Recipients
//! are `r<i>@sink.test` (one domain, so one spool part per call). Run the daemon with
//! `delivery.suspended = true` to measure ingest alone (see docs/ARCHITECTURE.md, "HTTP
//! injection").
//!
//! With `INJECT_CAMPAIGN=<name>` in the environment every call asks the sidecar stage for that
//! campaign (with `{"first_name": "Ann", "segment": "s<call % 4>"}` as data), to compare with
//! the plain path; the line then also counts the recipients by the sidecar's `content`
//! (shared/model/cache = generated text, default = the slots' defaults).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern::cli::client::ApiClient;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: inject_load ADMIN_ADDR TOKEN_FILE [messages] [clients] [rcpts] [size]");
        std::process::exit(64);
    }
    let target: SocketAddr = args[0].parse().expect("ADMIN_ADDR is ip:port");
    assert!(target.ip().is_loopback(), "loopback targets only");
    let token = std::fs::read_to_string(&args[1]).expect("read TOKEN_FILE");
    let number = |i: usize, default: usize| {
        args.get(i)
            .map(|a| a.parse().expect("a number"))
            .unwrap_or(default)
    };
    let (messages, clients, rcpts, size) = (
        number(2, 20000),
        number(3, 20),
        number(4, 1),
        number(5, 5000),
    );

    let campaign = std::env::var("INJECT_CAMPAIGN")
        .ok()
        .filter(|c| !c.is_empty());
    let next = Arc::new(AtomicUsize::new(0));
    let contents = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(messages)));
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let contents = contents.clone();
            let (next, latencies, token, campaign) = (
                next.clone(),
                latencies.clone(),
                token.trim().to_string(),
                campaign.clone(),
            );
            std::thread::spawn(move || {
                let mut client = ApiClient::new(target, token);
                let mut mine = Vec::new();
                let filler = "0123456789abcdefghijklmnopqrstuvwxyz ".repeat(size / 37 + 1);
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= messages {
                        break;
                    }
                    let to: Vec<String> = (0..rcpts).map(|r| format!("r{r}@sink.test")).collect();
                    let head = format!(
                        "From: <load@client.test>\nTo: <r0@sink.test>\nSubject: load {c}-{n}\n\n"
                    );
                    let mut raw = head;
                    for line in filler.as_bytes().chunks(76) {
                        if raw.len() >= size {
                            break;
                        }
                        raw.push_str(std::str::from_utf8(line).unwrap());
                        raw.push('\n');
                    }
                    let mut body =
                        serde_json::json!({"from": "load@client.test", "to": to, "raw": raw});
                    if let Some(campaign) = &campaign {
                        body["sidecar"] = serde_json::json!({
                            "campaign": campaign,
                            "data": {"first_name": "Ann", "segment": format!("s{}", n % 4)},
                        });
                    }
                    let body = body.to_string();
                    let t = Instant::now();
                    let (status, answer) = client
                        .call_raw("POST", "/api/v1/inject", body.as_bytes())
                        .expect("an answer");
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
                    mine.push(t.elapsed());
                    if campaign.is_some() {
                        let answer: serde_json::Value =
                            serde_json::from_slice(&answer).expect("JSON answer");
                        let mut contents = contents.lock().unwrap();
                        for r in answer["sidecar"].as_array().into_iter().flatten() {
                            let c = r["content"].as_str().unwrap_or("?").to_owned();
                            *contents.entry(c).or_insert(0usize) += 1;
                        }
                    }
                }
                latencies.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let took = started.elapsed();
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    let pct = |p: f64| -> Duration {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)]
    };
    let per_s = messages as f64 / took.as_secs_f64();
    println!(
        "inject_load: {messages} calls x {rcpts} rcpt, {size} B, {clients} clients: {:.2} s, \
         {per_s:.0} messages/s, {:.0} recipients/s, latency p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms max {:.1} ms",
        took.as_secs_f64(),
        per_s * rcpts as f64,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.90).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
    if campaign.is_some() {
        println!("sidecar content: {:?}", contents.lock().unwrap());
    }
}
