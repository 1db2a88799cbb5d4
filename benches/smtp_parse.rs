//! Command parsing and DATA decoding throughput: the per-byte work of every inbound session.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use tern::rfc5321::proto::{find_line, DataDecoder, Line};

/// A typical pipelined submission's command lines.
const COMMANDS: &[u8] = b"EHLO client.example.com\r\n\
MAIL FROM:<sender@example.com> SIZE=5120 BODY=8BITMIME RET=HDRS ENVID=abc123\r\n\
RCPT TO:<rcpt@sink.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;rcpt@sink.test\r\n\
RCPT TO:<other@sink.test>\r\n\
DATA\r\n";

fn message(size: usize) -> Vec<u8> {
    let mut msg = b"From: a@example.com\r\nTo: b@sink.test\r\nSubject: bench\r\n\r\n".to_vec();
    let line = b"The quick brown fox jumps over the lazy dog, again and again and.\r\n";
    while msg.len() < size {
        msg.extend_from_slice(line);
    }
    // A stuffed line, so the unstuffing path is exercised.
    msg.extend_from_slice(b"..a line that started with a dot\r\n.\r\n");
    msg
}

fn parse_commands(c: &mut Criterion) {
    let mut group = c.benchmark_group("smtp_commands");
    group.throughput(Throughput::Elements(5));
    group.bench_function("pipelined_submission", |b| {
        b.iter(|| {
            let mut buf = black_box(COMMANDS);
            let mut parsed = 0;
            while let Line::Complete(len) = find_line(buf) {
                let request = smtp_proto::Request::parse(&mut buf[..len].iter()).expect("valid");
                black_box(request);
                buf = &buf[len..];
                parsed += 1;
            }
            assert_eq!(parsed, 5);
        })
    });
    group.finish();
}

fn decode_data(c: &mut Criterion) {
    let mut group = c.benchmark_group("smtp_data");
    for size in [5 * 1024, 100 * 1024] {
        let input = message(size);
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_function(format!("decode_{}k", size / 1024), |b| {
            b.iter_batched_ref(
                || Vec::with_capacity(input.len()),
                |out| {
                    let mut decoder = DataDecoder::new(1 << 24);
                    let (used, end) = decoder.feed(black_box(&input), out);
                    assert_eq!(used, input.len());
                    assert!(end.is_some_and(|e| e.flags.is_clean()));
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, parse_commands, decode_data);
criterion_main!(benches);
