//! SMTP accept-latency load generator, for benchmarks beside ../shared/bench/relay-bench
//! (smtp-source reports no latency). Loopback targets only.
//!
//! cargo run --release --example smtp_load -- 127.0.0.1:2525 [messages] [sessions] [size] [keep]
//!
//! Each session connects, sends EHLO/MAIL/RCPT/DATA and the message, and measures the time
//! from writing the final `.` to reading the 250 (the durable-accept latency) and the whole
//! transaction from connect. With `keep` a session reuses its connection (RSET-free: one
//! MAIL transaction after another), otherwise it QUITs after each message like smtp-source.
//!
//! Recipients: `rcpt@sink.test` by default; with `RCPT_DOMAIN=single.bench.test` all go to
//! `uN@single.bench.test`, and with `RCPT_DOMAINS=10000` each message goes to `uN@dK.bench.test`
//! for a random K below that count (benches/many_domains.sh).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Conn {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Conn {
    async fn open(target: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let mut conn = Conn {
            reader: BufReader::new(r),
            writer: w,
            line: String::new(),
        };
        conn.expect(220).await?;
        conn.send(b"EHLO load.test\r\n", 250).await?;
        Ok(conn)
    }

    /// Reads one (possibly multi-line) reply and checks its code.
    async fn expect(&mut self, code: u16) -> std::io::Result<()> {
        loop {
            self.line.clear();
            if self.reader.read_line(&mut self.line).await? == 0 {
                return Err(std::io::Error::other("connection closed"));
            }
            if self.line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        if !self.line.starts_with(&code.to_string()) {
            return Err(std::io::Error::other(format!(
                "expected {code}, got {}",
                self.line.trim_end()
            )));
        }
        Ok(())
    }

    async fn send(&mut self, bytes: &[u8], code: u16) -> std::io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.expect(code).await
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target: SocketAddr = args
        .first()
        .map(String::as_str)
        .unwrap_or("127.0.0.1:2525")
        .parse()
        .expect("HOST:PORT");
    assert!(target.ip().is_loopback(), "load tests target loopback only");
    let total: usize = args.get(1).map_or(20_000, |s| s.parse().expect("messages"));
    let sessions: usize = args.get(2).map_or(20, |s| s.parse().expect("sessions"));
    let size: usize = args.get(3).map_or(5120, |s| s.parse().expect("size"));
    let keep = args.get(4).is_some_and(|s| s == "keep");
    let spread: Option<usize> = std::env::var("RCPT_DOMAINS")
        .ok()
        .map(|s| s.parse().expect("RCPT_DOMAINS: a number"));
    let single = std::env::var("RCPT_DOMAIN").ok();
    let recipient = Arc::new(move |n: usize| -> String {
        match (spread, &single) {
            (Some(domains), _) => {
                let k = rand::Rng::gen_range(&mut rand::thread_rng(), 0..domains);
                format!("RCPT TO:<u{n}@d{k}.bench.test>\r\n")
            }
            (None, Some(domain)) => format!("RCPT TO:<u{n}@{domain}>\r\n"),
            (None, None) => "RCPT TO:<rcpt@sink.test>\r\n".to_owned(),
        }
    });

    let mut body = b"From: load@bench.test\r\nTo: rcpt@sink.test\r\nSubject: load\r\n\r\n".to_vec();
    while body.len() < size {
        body.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n",
        );
    }
    body.extend_from_slice(b".\r\n");
    let body = Arc::new(body);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (body, next, recipient) = (body.clone(), next.clone(), recipient.clone());
        tasks.push(tokio::spawn(async move {
            let mut accept = Vec::new();
            let mut whole = Vec::new();
            let mut conn: Option<Conn> = None;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let t0 = Instant::now();
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => Conn::open(target).await?,
                };
                c.send(b"MAIL FROM:<load@bench.test>\r\n", 250).await?;
                c.send(recipient(n).as_bytes(), 250).await?;
                c.send(b"DATA\r\n", 354).await?;
                let t_data = Instant::now();
                c.send(&body, 250).await?;
                let done = Instant::now();
                accept.push(done - t_data);
                whole.push(done - t0);
                if keep {
                    conn = Some(c);
                } else {
                    c.send(b"QUIT\r\n", 221).await?;
                }
            }
            Ok::<_, std::io::Error>((accept, whole))
        }));
    }
    let mut accept = Vec::new();
    let mut whole = Vec::new();
    for task in tasks {
        let (a, w) = task.await.expect("task")?;
        accept.extend(a);
        whole.extend(w);
    }
    let elapsed = started.elapsed();
    accept.sort();
    whole.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "smtp_load: target={target} n={} sessions={sessions} size={size} keep={keep} msgs_per_s={:.1} \
         accept_ms_p50={:.2} p90={:.2} p99={:.2} max={:.2} txn_ms_p50={:.2} p99={:.2}",
        accept.len(),
        accept.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&accept, 0.5)),
        ms(percentile(&accept, 0.9)),
        ms(percentile(&accept, 0.99)),
        ms(percentile(&accept, 1.0)),
        ms(percentile(&whole, 0.5)),
        ms(percentile(&whole, 0.99)),
    );
    Ok(())
}
