//! Fuzz-style robustness with fixed seeds: thousands of random SMTP-ish inputs against a
//! session over an in-memory duplex stream, and random chunkings of DATA streams against
//! the decoder.

use crate::harness::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tern::auth::Credentials;
use tern::config::Config;
use tern::dkim::DkimSigners;
use tern::enqueue::Enqueue;
use tern::events::Events;
use tern::feedback::Feedback;
use tern::intake::Intake;
use tern::maillog::DeliveryLog;
use tern::message::Stage;
use tern::policy::Policy;
use tern::rfc5321::proto::{ContentCheck, DataDecoder};
use tern::sendtime::SendTime;
use tern::shaping::pools::Pools;
use tern::smtp::session::{Session, SessionConfig, Shared};
use tern::suppression::Suppressions;
use tern::telemetry::Metrics;
use tern::tls::TlsInfo;
use tern_queue::Spool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const CASES: usize = 2000;
const PARALLEL: usize = 8;

fn pick<'a, T: ?Sized>(rng: &mut StdRng, items: &[&'a T]) -> &'a T {
    items[rng.gen_range(0..items.len())]
}

fn address(rng: &mut StdRng) -> String {
    pick(
        rng,
        &[
            "a@sink.test",
            "b@other.test",
            "",
            "x@y",
            "no-domain",
            "a@b@c.test",
            "\u{fc}ser@sink.test",
            "\"quoted local\"@sink.test",
            "a@[127.0.0.1]",
            "@sink.test",
            "a@",
            "very.long.local.part.very.long.local.part@sink.test",
        ],
    )
    .to_string()
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..=max);
    (0..n).map(|_| rng.gen()).collect()
}

fn xtext(rng: &mut StdRng) -> String {
    pick(
        rng,
        &[
            "abc",
            "abc+2Bdef",
            "bad+2",
            "+",
            "a+ZZ",
            "x+40y",
            "caf+C3+A9",
            "",
        ],
    )
    .to_string()
}

/// One SMTP-flavoured fragment.
fn fragment(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..34) {
        0 | 1 => format!(
            "EHLO {}\r\n",
            pick(rng, &["client.test", "", "x y", "[127.0.0.1]", "h\u{e9}"])
        )
        .into_bytes(),
        2 => format!("HELO {}\r\n", pick(rng, &["client.test", ""])).into_bytes(),
        3..=5 => {
            let mut s = format!("MAIL FROM:<{}>", address(rng));
            for _ in 0..rng.gen_range(0..4) {
                let p = match rng.gen_range(0..11) {
                    0 => format!(
                        "SIZE={}",
                        pick(
                            rng,
                            &["0", "100", "999999999", "-1", "abc", "18446744073709551616"]
                        )
                    ),
                    1 => "BODY=8BITMIME".into(),
                    2 => "BODY=7BIT".into(),
                    3 => "BODY=BINARYMIME".into(),
                    4 => "SMTPUTF8".into(),
                    5 => "RET=FULL".into(),
                    6 => "RET=HDRS".into(),
                    7 => format!("ENVID={}", xtext(rng)),
                    8 => "AUTH=<>".into(),
                    9 => "FOO=bar".into(),
                    _ => "RET=".into(),
                };
                s.push(' ');
                s.push_str(&p);
            }
            s.push_str("\r\n");
            s.into_bytes()
        }
        6..=8 => {
            let mut s = format!("RCPT TO:<{}>", address(rng));
            for _ in 0..rng.gen_range(0..3) {
                let p = match rng.gen_range(0..6) {
                    0 => "NOTIFY=SUCCESS,FAILURE".to_string(),
                    1 => "NOTIFY=NEVER".into(),
                    2 => "NOTIFY=NEVER,DELAY".into(),
                    3 => format!("ORCPT=rfc822;{}", xtext(rng)),
                    4 => "ORCPT=x-unknown;a".into(),
                    _ => "NOTIFY=BOGUS".into(),
                };
                s.push(' ');
                s.push_str(&p);
            }
            s.push_str("\r\n");
            s.into_bytes()
        }
        9 | 10 => b"DATA\r\n".to_vec(),
        11 | 12 => {
            let size = pick(
                rng,
                &["0", "1", "5", "17", "100", "3000", "99999", "-1", "x", ""],
            )
            .to_string();
            let last = if rng.gen_bool(0.4) { " LAST" } else { "" };
            let mut out = format!("BDAT {size}{last}\r\n").into_bytes();
            let n: usize = size.parse().unwrap_or(0).min(4000);
            // Sometimes fewer bytes than announced: the rest of the input is the chunk.
            let n = if rng.gen_bool(0.8) {
                n
            } else {
                rng.gen_range(0..=n)
            };
            for _ in 0..n {
                out.push(*pick(rng, &[&b'a', &b'\r', &b'\n', &b'.', &b'\0', &b'Z']));
            }
            out
        }
        13 => format!(
            "AUTH PLAIN {}\r\n",
            pick(
                rng,
                &["", "AGFwcABzZWNyZXQ=", "AGFwcAB3cm9uZw==", "!!!", "=", "*"]
            )
        )
        .into_bytes(),
        14 => format!("AUTH LOGIN {}\r\n", pick(rng, &["", "YXBw", "!"])).into_bytes(),
        15 => format!("AUTH {}\r\n", pick(rng, &["CRAM-MD5", "XOAUTH2 abc", ""])).into_bytes(),
        16 => b"STARTTLS\r\n".to_vec(),
        17 => b".\r\n".to_vec(),
        18 => b"\r\n.\r\n".to_vec(),
        19 => b"\r".to_vec(),
        20 => b"\n".to_vec(),
        21 => b"\0".to_vec(),
        22 | 23 => random_bytes(rng, 64),
        24 => {
            let len = rng.gen_range(3000..12000);
            let mut line = vec![b'A'; len];
            if rng.gen_bool(0.7) {
                line.extend_from_slice(b"\r\n");
            }
            line
        }
        25 => pick(
            rng,
            &[
                "RSET\r\n",
                "NOOP\r\n",
                "NOOP x\r\n",
                "VRFY a\r\n",
                "HELP\r\n",
                "EXPN list\r\n",
                "ETRN x\r\n",
            ],
        )
        .as_bytes()
        .to_vec(),
        26 => {
            if rng.gen_bool(0.15) {
                b"QUIT\r\n".to_vec()
            } else {
                b"NOOP\r\n".to_vec()
            }
        }
        27 => b"Subject: fuzz\r\n\r\nbody line\r\n".to_vec(),
        28 => b"..stuffed\r\n".to_vec(),
        29 => b"YXBw\r\nc2VjcmV0\r\n".to_vec(),
        30 => b"*\r\n".to_vec(),
        31 => b"\r\n".to_vec(),
        32 => "mail from:<a@sink.test>\r\nrcpt to:<b@sink.test>\r\ndata\r\nx\r\n.\r\n"
            .as_bytes()
            .to_vec(),
        _ => format!(
            "{}\r\n",
            pick(
                rng,
                &[
                    "DATA x",
                    "BDAT",
                    "MAIL",
                    "RCPT",
                    "MAIL FROM:",
                    "RCPT TO:<>",
                    "LHLO x"
                ]
            )
        )
        .into_bytes(),
    }
}

fn session_config(spool: Spool) -> Arc<SessionConfig> {
    let text = format!(
        r#"
[server]
hostname = "{HOST}"
[[listeners]]
address = "127.0.0.1:0"
[relay]
networks = ["127.0.0.0/8"]
[[auth.users]]
name = "{USER}"
password_hash = "{}"
[limits]
max_message_size = 3000
max_recipients = 3
command_timeout = "5s"
data_timeout = "5s"
max_errors = 20
"#,
        cheap_hash()
    );
    let config = Config::parse(&text).unwrap();
    let metrics = Arc::new(Metrics::new());
    let (intake, feedback) = intake(spool, &config, &metrics);
    Arc::new(SessionConfig {
        hostname: HOST.to_string(),
        limits: config.limits,
        policy: Policy::from_config(&config),
        credentials: Some(Arc::new(Credentials::from_config(&config.auth))),
        starttls: false,
        intake,
        feedback,
        shared: Shared::new(metrics.clone(), 2),
        metrics,
    })
}

/// The enqueue path the daemon builds, from real parts on `spool`, with no DKIM keys, no
/// bounce domains, no webhooks and the send-time stage as the only pre-enqueue stage;
/// committed mail is announced on a channel nobody reads.
fn intake(spool: Spool, config: &Config, metrics: &Arc<Metrics>) -> (Intake, Feedback) {
    let suppressions =
        Suppressions::new(spool.clone(), config.suppression.clone(), metrics.clone());
    let events = Events::new(
        spool.clone(),
        0,
        DeliveryLog::disabled(),
        metrics.clone(),
        TaskTracker::new(),
    );
    let feedback = Feedback::new(suppressions.clone(), events, Vec::new(), metrics.clone());
    let send_time = SendTime::new(
        spool.clone(),
        config.sendtime.clone(),
        suppressions,
        TaskTracker::new(),
        None,
    );
    let (scheduler, _) = tokio::sync::mpsc::unbounded_channel();
    let enqueue = Enqueue::new(
        spool,
        HOST.to_string(),
        config.spool.max_age,
        DkimSigners::none(metrics.clone()),
        Arc::new(Pools::new(&config.pools, &config.routes)),
        feedback.clone(),
        scheduler,
        Arc::new(send_time.clone()),
    );
    let stages: Vec<Arc<dyn Stage>> = vec![Arc::new(send_time)];
    (Intake::new(stages, enqueue), feedback)
}

/// Runs one session over a duplex pipe: writes `input` in `chunks`, closes the write half,
/// returns everything the server wrote.
async fn run_case(
    config: Arc<SessionConfig>,
    input: Vec<u8>,
    chunks: Vec<usize>,
    tls: bool,
    case: usize,
) -> Vec<u8> {
    let (client, server) = tokio::io::duplex(4096);
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let tls = tls.then(|| TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
    });
    let session = tokio::spawn(async move {
        let mut s = Session::new(server, config, CancellationToken::new(), peer, tls);
        s.greet().await?;
        s.run().await
    });
    let (mut rd, mut wr) = tokio::io::split(client);
    let writer = tokio::spawn(async move {
        let mut pos = 0;
        for n in chunks {
            let end = (pos + n).min(input.len());
            if wr.write_all(&input[pos..end]).await.is_err() {
                return; // the session ended first
            }
            pos = end;
        }
        let _ = wr.shutdown().await;
    });
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "case {case}: session did not finish (output so far {:?})",
        String::from_utf8_lossy(&out)
    );
    let ended = tokio::time::timeout(Duration::from_secs(20), session)
        .await
        .expect("session task ends");
    match ended {
        Err(e) if e.is_panic() => panic!("case {case}: session panicked: {e}"),
        Err(e) => panic!("case {case}: {e}"),
        // I/O errors (e.g. EOF inside an AUTH exchange) are a legitimate way to end.
        Ok(_) => {}
    }
    writer.await.unwrap();
    out
}

fn check_output(case: usize, out: &[u8]) {
    assert!(
        out.starts_with(format!("220 {HOST} ").as_bytes()),
        "case {case}: no greeting: {:?}",
        String::from_utf8_lossy(out)
    );
    assert!(
        out.ends_with(b"\r\n"),
        "case {case}: output ends mid-line: {:?}",
        String::from_utf8_lossy(out)
    );
    for line in out[..out.len() - 1].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or_else(|| {
            panic!(
                "case {case}: reply line without CR: {:?}",
                String::from_utf8_lossy(line)
            )
        });
        let ok = line.len() >= 4
            && (b'2'..=b'5').contains(&line[0])
            && line[1].is_ascii_digit()
            && line[2].is_ascii_digit()
            && (line[3] == b' ' || line[3] == b'-')
            && !line.contains(&b'\r');
        assert!(
            ok,
            "case {case}: malformed reply line {:?}",
            String::from_utf8_lossy(line)
        );
    }
    // Every reply parses, in order, to the end.
    let mut rest = out;
    while !rest.is_empty() {
        match parse_reply(rest) {
            Ok(Some((_, used))) => rest = &rest[used..],
            other => panic!(
                "case {case}: reply stream does not parse: {other:?} at {:?}",
                String::from_utf8_lossy(rest)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_smtp_inputs_never_break_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let config = session_config(spool.clone());
    let mut rng = StdRng::seed_from_u64(0x7e_2024);
    let mut pending = tokio::task::JoinSet::new();
    let mut done = 0;
    for case in 0..CASES {
        let mut input = Vec::new();
        for _ in 0..rng.gen_range(1..40) {
            input.extend(fragment(&mut rng));
        }
        let mut chunks = Vec::new();
        let mut left = input.len();
        while left > 0 {
            let n = if rng.gen_bool(0.3) {
                rng.gen_range(1..8)
            } else {
                rng.gen_range(1..3000)
            }
            .min(left);
            chunks.push(n);
            left -= n;
        }
        let tls = rng.gen_bool(0.5);
        let cfg = config.clone();
        pending.spawn(async move {
            let out = run_case(cfg, input, chunks, tls, case).await;
            check_output(case, &out);
        });
        if pending.len() >= PARALLEL {
            pending.join_next().await.unwrap().unwrap();
            done += 1;
        }
    }
    while let Some(r) = pending.join_next().await {
        r.unwrap();
        done += 1;
    }
    assert_eq!(done, CASES);

    // Whatever was accepted is a clean message with a trace header.
    let envs = spool.list().unwrap();
    for env in &envs {
        let body = spool
            .body(env.id)
            .unwrap()
            .expect("body of a listed envelope")
            .to_vec();
        assert!(body.starts_with(b"Received: from "), "{env:?}");
        let mut check = ContentCheck::default();
        check.scan(&body);
        assert!(
            check.finish().is_clean(),
            "accepted message with bare CR/LF/NUL: {:?}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            !env.recipients.is_empty() && env.recipients.len() <= 3,
            "{env:?}"
        );
    }
    eprintln!("fuzz: {CASES} sessions, {} envelopes accepted", envs.len());
}

/// A decoder's end verdict as plain values: (size, bare CR, bare LF, NUL).
type End = (usize, bool, bool, bool);

/// Feeds `input` in the given chunk sizes; returns (output, bytes consumed, end).
fn decode_chunked(input: &[u8], max: usize, chunks: &[usize]) -> (Vec<u8>, usize, Option<End>) {
    let mut dec = DataDecoder::new(max);
    let mut out = Vec::new();
    let mut pos = 0;
    for &n in chunks {
        let end = (pos + n).min(input.len());
        let (used, done) = dec.feed(&input[pos..end], &mut out);
        assert!(used <= end - pos);
        if let Some(e) = done {
            return (
                out,
                pos + used,
                Some((e.size, e.flags.bare_cr, e.flags.bare_lf, e.flags.nul)),
            );
        }
        assert_eq!(used, end - pos, "without an end every byte is consumed");
        pos = end;
        if pos == input.len() {
            break;
        }
    }
    (out, pos, None)
}

#[test]
fn data_decoder_output_does_not_depend_on_chunking() {
    let mut rng = StdRng::seed_from_u64(51764);
    let alphabet: [&[u8]; 10] = [
        b".",
        b"\r",
        b"\n",
        b"\0",
        b"a",
        b"\r\n",
        b".\r\n",
        b"\r\n.\r\n",
        b"..",
        b"xyz",
    ];
    let mut ends = 0;
    for case in 0..CASES {
        let mut input = Vec::new();
        for _ in 0..rng.gen_range(0..80) {
            if rng.gen_bool(0.05) {
                input.push(rng.gen());
            } else {
                input.extend_from_slice(alphabet[rng.gen_range(0..alphabet.len())]);
            }
        }
        let max = *pick(&mut rng, &[&3usize, &20, &1_000_000]);
        let whole = decode_chunked(&input, max, &[input.len().max(1)]);
        let bytewise = decode_chunked(&input, max, &vec![1; input.len().max(1)]);
        let mut chunks = Vec::new();
        let mut left = input.len();
        while left > 0 {
            let n = rng.gen_range(1..=left.min(13));
            chunks.push(n);
            left -= n;
        }
        if chunks.is_empty() {
            chunks.push(1);
        }
        let random = decode_chunked(&input, max, &chunks);
        assert_eq!(
            whole, bytewise,
            "case {case}: bytewise differs for {input:?}"
        );
        assert_eq!(
            whole, random,
            "case {case}: chunks {chunks:?} differ for {input:?}"
        );
        let (out, used, end) = &whole;
        assert!(out.len() <= max, "case {case}: stored beyond max");
        if let Some((size, ..)) = end {
            ends += 1;
            assert!(
                input[..*used].ends_with(b".\r\n"),
                "case {case}: ended without .CRLF"
            );
            assert!(
                *used == 3 || input[..*used].ends_with(b"\r\n.\r\n"),
                "case {case}: the end must be CRLF.CRLF or the very first line: {input:?}"
            );
            assert!(*size >= out.len());
        }
    }
    assert!(
        ends > CASES / 10,
        "the generator must produce terminated inputs too ({ends})"
    );
}

#[test]
fn clean_content_round_trips_through_dot_stuffing() {
    let mut rng = StdRng::seed_from_u64(3030);
    for case in 0..CASES {
        let mut content = Vec::new();
        for _ in 0..rng.gen_range(0..20) {
            for _ in 0..rng.gen_range(0..6) {
                content.extend_from_slice(pick(
                    &mut rng,
                    &[
                        &b"."[..],
                        &b".."[..],
                        &b"a"[..],
                        &b"Subject: x"[..],
                        &b" "[..],
                        &b"\xc3\xa9"[..],
                    ],
                ));
            }
            content.extend_from_slice(b"\r\n");
        }
        let wire = dot_stuff(&content);
        let mut chunks = Vec::new();
        let mut left = wire.len();
        while left > 0 {
            let n = rng.gen_range(1..=left.min(9));
            chunks.push(n);
            left -= n;
        }
        let (out, used, end) = decode_chunked(&wire, 1 << 20, &chunks);
        assert_eq!(out, content, "case {case}");
        assert_eq!(used, wire.len(), "case {case}");
        let (size, cr, lf, nul) = end.expect("terminated");
        assert_eq!(size, content.len());
        assert!(!cr && !lf && !nul, "case {case}: clean content flagged");
        // ContentCheck agrees, whatever the chunking.
        let mut check = ContentCheck::default();
        for piece in content.chunks(rng.gen_range(1..5)) {
            check.scan(piece);
        }
        assert!(check.finish().is_clean(), "case {case}");
    }
}
