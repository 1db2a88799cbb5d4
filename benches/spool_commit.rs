//! Durable spool commits of one 5 KB message: by a single writer, and by 16
//! and 64 concurrent writers that share group-commit fsync rounds. Each
//! benchmark uses a fresh spool in its own temporary directory.
//! Throughput is in messages.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tern_queue::{BodyType, Envelope, MessageId, Recipient, Source, Spool};

const BODY_LEN: usize = 5 * 1024;

fn envelope(id: MessageId) -> Envelope {
    let now_ms = id.created_ms();
    Envelope {
        id,
        queue_id: id,
        sender: "sender@example.com".into(),
        destination: "example.org".into(),
        recipients: vec![Recipient::new("rcpt@example.org".into())],
        env_id: None,
        ret: None,
        body_type: BodyType::SevenBit,
        smtputf8: false,
        size: BODY_LEN as u64,
        created_ms: now_ms,
        expires_ms: now_ms + 5 * 86_400_000,
        next_due_ms: now_ms,
        attempts: 0,
        source: Source {
            client_ip: "192.0.2.1".into(),
            helo: "client.example.com".into(),
            auth_user: None,
            protocol: "ESMTPS".into(),
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

/// A body that looks like mail (line-structured text) rather than zeros.
fn body() -> Vec<u8> {
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\r\n";
    line.iter().copied().cycle().take(BODY_LEN).collect()
}

async fn commit_one(spool: &Spool, body: &[u8]) {
    let id = spool.next_id();
    spool
        .commit(vec![(envelope(id), body.to_vec())])
        .await
        .expect("spool commit failed");
}

fn spool_commit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let body = body();
    let mut group = c.benchmark_group("spool_commit_5k");
    for writers in [1usize, 16, 64] {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path()).expect("open spool");
        group.throughput(Throughput::Elements(writers as u64));
        group.bench_function(BenchmarkId::new("writers", writers), |b| {
            b.to_async(&rt).iter(|| async {
                let tasks: Vec<_> = (0..writers)
                    .map(|_| {
                        let spool = spool.clone();
                        let body = body.clone();
                        tokio::spawn(async move { commit_one(&spool, &body).await })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("writer task panicked");
                }
            })
        });
        // close the spool (final sync, lock released) before its directory goes
        drop(spool);
    }
    group.finish();
}

criterion_group!(benches, spool_commit);
criterion_main!(benches);
