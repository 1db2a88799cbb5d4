//! Bounce parsing throughput over the test corpus (tests/bounces/*.eml): every sample parsed
//! and classified once per iteration, so the figure is messages per second for the corpus's
//! mix of DSNs, text bounces, complaints, auto-replies and ordinary mail.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use tern::bounce::classify::Classifier;

fn corpus() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bounces");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .expect("tests/bounces")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).expect("sample"))
        .collect()
}

fn parse_corpus(c: &mut Criterion) {
    let corpus = corpus();
    let classifier = Classifier::defaults();
    let mut group = c.benchmark_group("bounce_parse");
    group.throughput(Throughput::Elements(corpus.len() as u64));
    group.bench_function("corpus", |b| {
        b.iter(|| {
            for raw in &corpus {
                black_box(tern::bounce::parse(black_box(raw), &classifier));
            }
        })
    });
    group.finish();

    let mut group = c.benchmark_group("bounce_classify");
    group.throughput(Throughput::Elements(1));
    group.bench_function("smtp_reply", |b| {
        b.iter(|| {
            black_box(classifier.classify_reply(
                550,
                Some("5.7.1"),
                black_box(
                    "Service unavailable; Client host [203.0.113.9] blocked using zen.spamhaus.org",
                ),
            ))
        })
    });
    group.finish();
}

/// Hostile shapes at growing sizes: if parsing is linear in the input, the time per byte
/// (criterion's throughput in bytes) stays the same from 256 KiB to 4 MiB. A quadratic scan
/// would take 16 times longer per byte at the largest size.
fn hostile(kind: &str, size: usize) -> Vec<u8> {
    let head = "From: MAILER-DAEMON@mx.test\r\nTo: bounces@bounce.test\r\nSubject: Undelivered Mail Returned to Sender\r\n";
    let mut out = Vec::with_capacity(size + 4096);
    match kind {
        // A text bounce naming a new recipient on every line.
        "recipients" => {
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(b"\r\nThis is the mail system at host mx.test.\r\n\r\n");
            let mut i = 0;
            while out.len() < size {
                out.extend_from_slice(
                    format!("<user{i}@example.com>: host mx.example.com said: 550 5.1.1 <user{i}@example.com>: Recipient address rejected: User unknown\r\n").as_bytes(),
                );
                i += 1;
            }
        }
        // A multipart report whose body is boundary-like lines, over and over.
        "boundaries" => {
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n");
            while out.len() < size {
                out.extend_from_slice(b"--b\r\nContent-Type: message/delivery-status\r\n\r\nFinal-Recipient: rfc822; a@b.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n");
            }
            out.extend_from_slice(b"--b--\r\n");
        }
        // One line without an end.
        _ => {
            out.extend_from_slice(head.as_bytes());
            out.extend_from_slice(b"\r\n");
            out.resize(size, b'a');
        }
    }
    out
}

fn parse_hostile(c: &mut Criterion) {
    let classifier = Classifier::defaults();
    for kind in ["recipients", "boundaries", "long_line"] {
        let mut group = c.benchmark_group(format!("bounce_parse_hostile_{kind}"));
        group.sample_size(10);
        for size in [256 << 10, 1 << 20, 4 << 20] {
            let raw = hostile(kind, size);
            group.throughput(Throughput::Bytes(raw.len() as u64));
            group.bench_function(format!("{}KiB", size >> 10), |b| {
                b.iter(|| black_box(tern::bounce::parse(black_box(&raw), &classifier)))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, parse_corpus, parse_hostile);
criterion_main!(benches);
