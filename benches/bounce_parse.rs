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

criterion_group!(benches, parse_corpus);
criterion_main!(benches);
