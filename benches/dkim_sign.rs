//! DKIM signing cost per message (5 KB), Ed25519 and RSA-2048: the CPU that signing adds to
//! every accepted message for a signing domain.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use tern::config::{DkimConfig, DEFAULT_DKIM_HEADERS, DEFAULT_DKIM_OVERSIGN};
use tern::dkim::{generate_key, DkimSigners, KeyAlgorithm};

fn message() -> Vec<u8> {
    let mut msg = b"From: Sender <sender@bench.test>\r\nTo: rcpt@sink.test\r\n\
Subject: bench\r\nDate: Fri, 27 Nov 2026 20:00:00 +0000\r\nMessage-ID: <1@bench.test>\r\n\r\n"
        .to_vec();
    while msg.len() < 5 * 1024 {
        msg.extend_from_slice(b"The quick brown fox jumps over the lazy dog, again and again.\r\n");
    }
    msg
}

fn signers(algorithm: KeyAlgorithm, dir: &std::path::Path) -> DkimSigners {
    let key = generate_key(algorithm).expect("key");
    let path = dir.join("key.pem");
    // Owner-only, as tern requires of a key file it is configured with.
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(key.private_key_pem.as_bytes()))
        .expect("write key");
    DkimSigners::load(
        &[DkimConfig {
            domain: "bench.test".into(),
            selector: "s1".into(),
            key_path: path,
            headers: DEFAULT_DKIM_HEADERS.iter().map(|h| h.to_string()).collect(),
            oversign: DEFAULT_DKIM_OVERSIGN
                .iter()
                .map(|h| h.to_string())
                .collect(),
            active_from: None,
            retire_after: None,
        }],
        std::sync::Arc::new(tern::telemetry::Metrics::new()),
    )
    .expect("load")
}

fn sign(c: &mut Criterion) {
    let msg = message();
    let mut group = c.benchmark_group("dkim_sign_5k");
    group.throughput(Throughput::Elements(1));
    for (name, algorithm) in [
        ("ed25519", KeyAlgorithm::Ed25519),
        ("rsa2048", KeyAlgorithm::Rsa { bits: 2048 }),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let signers = signers(algorithm, dir.path());
        group.bench_function(name, |b| {
            b.iter(|| {
                let header = signers.sign(black_box(&msg)).expect("signed");
                assert!(header.starts_with("DKIM-Signature:"));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, sign);
criterion_main!(benches);
