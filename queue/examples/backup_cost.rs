//! What `Spool::backup` costs: fills a spool with `count` deferred messages (default 100,000
//! of 5 KiB), then backs it up while writers keep committing, and reports the copy's time
//! and rate and how long the writers' commits waited (the write stall a backup causes).
//!
//! cargo run -p tern-queue --release --example backup_cost -- [count] [body_size]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_queue::{Envelope, Recipient, Source, Spool};

fn envelope(spool: &Spool, n: u64, size: usize) -> (Envelope, Vec<u8>) {
    let id = spool.next_id();
    let mut body = format!("Subject: {n}\r\n\r\n").into_bytes();
    body.resize(size, b'x');
    body.extend_from_slice(b"\r\n");
    let env = Envelope {
        id,
        queue_id: id,
        sender: format!("bounces+{n}@mailer.example.com"),
        destination: format!("customer{}.example", n % 1000),
        recipients: vec![Recipient::new(format!(
            "user{n}@customer{}.example",
            n % 1000
        ))],
        env_id: None,
        ret: None,
        body_type: Default::default(),
        smtputf8: false,
        size: body.len() as u64,
        created_ms: 1,
        expires_ms: u64::MAX,
        next_due_ms: u64::MAX - 1,
        attempts: 1,
        source: Source {
            client_ip: "192.0.2.1".into(),
            helo: "client.example".into(),
            auth_user: None,
            protocol: "ESMTP".into(),
        },
        held: false,
        delay_notified: false,
        parked: false,
        pool: None,
        not_before_ms: 0,
        body_id: None,
        campaign: None,
        send_time_planned: false,
    };
    (env, body)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5120);
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let started = Instant::now();
    for chunk in 0..count.div_ceil(500) {
        let parts = (chunk * 500..((chunk + 1) * 500).min(count))
            .map(|n| envelope(&spool, n, size))
            .collect();
        spool.commit(parts).await.unwrap();
    }
    spool.flush().await.unwrap();
    println!(
        "filled {count} messages of {size} bytes in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // Writers commit one message at a time during the backup; the longest wait is the stall.
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let (spool, stop, worst) = (spool.clone(), stop.clone(), worst.clone());
        writers.push(tokio::spawn(async move {
            let mut n = count + w * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                spool.commit(vec![envelope(&spool, n, size)]).await.unwrap();
                worst.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let target = dir.path().join("backup");
    let t = Instant::now();
    let copied = {
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || spool.backup(&target))
            .await
            .unwrap()
            .unwrap()
    };
    let took = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    println!(
        "backup: {} keys, {:.0} MiB in {took:.2}s ({:.0} MiB/s, {:.0} messages/s); longest commit wait during it {:.2}s",
        copied.keys,
        copied.bytes as f64 / 1048576.0,
        copied.bytes as f64 / 1048576.0 / took,
        count as f64 / took,
        worst.load(Ordering::Relaxed) as f64 / 1e6,
    );
}
