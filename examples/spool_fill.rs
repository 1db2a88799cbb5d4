//! Fills a spool with deferred messages, for start-up and memory benchmarks at scale
//! (see benches/spool_scale.sh).
//!
//! cargo run --release --example spool_fill -- <spool dir> <count> [body_size] [writers] [due_in_s]
//!
//! Writes `count` messages (default body 5120 bytes, 256 concurrent writers) through the
//! public `Spool` API, so each one is a durable group commit exactly as ingest makes it.
//! Every message looks like a deferred one: one recipient out of 1000 domains, a sender,
//! a source, one failed attempt with its 4xx reply, and `next_due_ms` `due_in_s` (default
//! 3600) plus up to 10 minutes in the future, so nothing is due when tern starts.
//! An existing spool is added to. Prints progress every 5 s and the rate at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tern_queue::{
    BodyType, Envelope, MessageId, Notify, Recipient, RecipientState, Ret, Source, Spool,
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn envelope(id: MessageId, n: u64, due_in_ms: u64) -> Envelope {
    let now = now_ms();
    let domain = format!("customer{}.example", n % 1000);
    Envelope {
        id,
        queue_id: id,
        sender: format!("bounces+{n}@mailer.example.com"),
        destination: domain.clone(),
        recipients: vec![Recipient {
            address: format!("user{n}@{domain}"),
            orcpt: Some(format!("rfc822;user{n}@{domain}")),
            notify: Notify::default_rfc3461(),
            state: RecipientState::Pending,
            last_reply: Some(
                "451 4.7.1 <user@customer.example>: Recipient address rejected: \
                 greylisted, try again later"
                    .into(),
            ),
            attempts: 1,
        }],
        env_id: Some(format!("campaign-42-{n}")),
        ret: Some(Ret::Headers),
        body_type: BodyType::EightBitMime,
        smtputf8: false,
        size: 0, // set by the spool
        created_ms: now,
        expires_ms: now + 5 * 86_400_000,
        next_due_ms: now + due_in_ms + n % 600_000,
        attempts: 1,
        source: Source {
            client_ip: format!("198.51.100.{}", n % 250 + 1),
            helo: "app-server-3.mailer.example.com".into(),
            auth_user: Some("campaigns".into()),
            protocol: "ESMTPSA".into(),
        },
        held: false,
        delay_notified: false,
        parked: false,
        pool: None,
        not_before_ms: 0,
        body_id: None,
        campaign: None,
        send_time_planned: false,
    }
}

/// Header block like ingest's output, then text lines up to `size` bytes.
fn body(id: MessageId, n: u64, size: usize) -> Vec<u8> {
    let mut b = format!(
        "Received: from app-server-3.mailer.example.com (198.51.100.{ip})\r\n\
         \tby tern.localhost with ESMTPSA id {id}; Mon, 6 Jan 2025 10:00:00 +0000\r\n\
         From: Newsletter <news@mailer.example.com>\r\n\
         To: <user{n}@customer{d}.example>\r\n\
         Subject: Your weekly digest #{n}\r\n\
         Message-ID: <{id}.{n}@mailer.example.com>\r\n\
         Date: Mon, 6 Jan 2025 10:00:00 +0000\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n",
        ip = n % 250 + 1,
        d = n % 1000,
    )
    .into_bytes();
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\r\n";
    while b.len() < size {
        let take = line.len().min(size - b.len());
        b.extend_from_slice(&line[..take]);
    }
    b.truncate(size);
    b
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: spool_fill <spool dir> <count> [body_size] [writers] [due_in_s]";
    let dir = PathBuf::from(args.first().expect(usage));
    let count: u64 = args.get(1).expect(usage).parse().expect("count");
    let size: usize = args.get(2).map_or(5120, |s| s.parse().expect("body_size"));
    let writers: u64 = args.get(3).map_or(256, |s| s.parse().expect("writers"));
    let due_in_ms = args
        .get(4)
        .map_or(3600, |s| s.parse::<u64>().expect("due_in_s"))
        * 1000;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let opened = Instant::now();
    let spool = Spool::open(&dir).expect("open spool");
    let before = spool.stats();
    println!(
        "spool_fill: opened {} in {:.2}s ({} messages already); writing {count} x {size} bytes \
         with {writers} writers",
        dir.display(),
        opened.elapsed().as_secs_f64(),
        before.messages
    );
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    runtime.block_on(async {
        let progress = {
            let done = done.clone();
            tokio::spawn(async move {
                let mut last = 0;
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let now = done.load(Ordering::Relaxed);
                    println!(
                        "spool_fill: {now}/{count} ({:.0}/s over the last 5 s, {:.0}/s overall)",
                        (now - last) as f64 / 5.0,
                        now as f64 / started.elapsed().as_secs_f64()
                    );
                    last = now;
                }
            })
        };
        let tasks: Vec<_> = (0..writers)
            .map(|_| {
                let (spool, next, done) = (spool.clone(), next.clone(), done.clone());
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= count {
                            break;
                        }
                        let id = spool.next_id();
                        let parts = vec![(envelope(id, n, due_in_ms), body(id, n, size))];
                        spool.commit(parts).await.expect("spool commit failed");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("writer task panicked");
        }
        progress.abort();
    });
    let elapsed = started.elapsed().as_secs_f64();
    let stats = spool.commit_stats();
    println!(
        "spool_fill: wrote {count} messages in {elapsed:.1}s: {:.0} msg/s, {:.1} MB/s of bodies; \
         {} sync rounds (avg {:.1} writes/round); spool now {} messages, {} body bytes",
        count as f64 / elapsed,
        (count as f64 * size as f64) / elapsed / 1e6,
        stats.syncs,
        stats.writes as f64 / stats.syncs.max(1) as f64,
        spool.stats().messages,
        spool.stats().bytes,
    );
    let closing = Instant::now();
    drop(spool);
    println!(
        "spool_fill: closed in {:.1}s",
        closing.elapsed().as_secs_f64()
    );
}
