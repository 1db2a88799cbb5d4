//! The suppression check on the RCPT path (`Suppressions::check`) against a list of 200,000
//! entries: alone, and as a fleet node (`[cluster]`, a `redis-server` this bench starts on
//! loopback; skipped, saying so, when there is none) while the node's follower applies a
//! steady stream of other nodes' changes to its copy. Criterion's mean, then p50/p99/p999
//! of 200,000 single timed checks (hits and misses alternating), printed.

use criterion::{criterion_group, criterion_main, Criterion};
use std::sync::Arc;
use std::time::Instant;
use tern::config::{ClusterConfig, SuppressionConfig};
use tern::suppression::{Entry, Suppressions};
use tern::telemetry::Metrics;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const ENTRIES: usize = 200_000;

fn entry(i: usize) -> Entry {
    Entry {
        address: format!("user{i}@d{}.test", i % 1000),
        reason: "invalid_recipient".into(),
        created_ms: 1,
        expires_ms: None,
        source: None,
        scope: None,
    }
}

async fn fill(list: &Suppressions) {
    for chunk in (0..ENTRIES).collect::<Vec<_>>().chunks(10_000) {
        list.add(chunk.iter().map(|&i| entry(i)).collect())
            .await
            .unwrap();
    }
}

/// p50, p99, p999 in microseconds of single checks.
fn percentiles(list: &Suppressions) -> (f64, f64, f64) {
    let mut samples = Vec::with_capacity(200_000);
    for n in 0..200_000usize {
        let address = if n.is_multiple_of(2) {
            format!("user{}@d{}.test", n % ENTRIES, (n % ENTRIES) % 1000)
        } else {
            format!("nobody{n}@d{}.test", n % 1000)
        };
        let t = Instant::now();
        std::hint::black_box(list.check(&address));
        samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99), at(0.999))
}

fn bench_list(c: &mut Criterion, list: &Suppressions, what: &str) {
    let mut n = 0usize;
    c.bench_function(
        &format!("suppression check, {ENTRIES} entries{what}"),
        |b| {
            b.iter(|| {
                n += 1;
                let address = if n.is_multiple_of(2) {
                    format!("user{}@d{}.test", n % ENTRIES, (n % ENTRIES) % 1000)
                } else {
                    format!("nobody{n}@d{}.test", n % 1000)
                };
                std::hint::black_box(list.check(&address))
            })
        },
    );
    let (p50, p99, p999) = percentiles(list);
    println!("suppression check{what}: p50 {p50:.2} us, p99 {p99:.2} us, p999 {p999:.2} us");
}

fn suppression(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = tern_queue::Spool::open(dir.path()).unwrap();
    let alone = Suppressions::new(
        spool,
        SuppressionConfig::default(),
        Arc::new(Metrics::new()),
    );
    rt.block_on(fill(&alone));
    bench_list(c, &alone, "");
    drop(alone);

    let Some(redis) = RedisChild::start() else {
        eprintln!("redis-server is not on PATH: the fleet bench is skipped");
        return;
    };
    let config = ClusterConfig {
        url: format!("redis://127.0.0.1:{}", redis.port),
        redis_cluster: false,
        password_file: None,
        ca_file: None,
        node: "bench".into(),
        prefix: "bench".into(),
        timeout: std::time::Duration::from_millis(250),
        retry: std::time::Duration::from_millis(100),
    };
    let dir = tempfile::tempdir().unwrap();
    let spool = tern_queue::Spool::open(dir.path()).unwrap();
    let pushed = Arc::new(tokio::sync::Notify::new());
    let metrics = Arc::new(Metrics::new());
    let list = Suppressions::replicated(
        spool,
        SuppressionConfig::default(),
        metrics.clone(),
        pushed.clone(),
    );
    let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
    let store = Arc::new(tern::cluster::Store::new(&config, metrics).unwrap());
    let _guard = rt.enter();
    tern::cluster::suppression::start(store, list.clone(), pushed, &tasks, stop.clone());
    rt.block_on(fill(&list));
    // Another node's writes keep arriving (1,000 a second) while the checks run.
    let other = {
        let stop = stop.clone();
        let url = config.url.clone();
        rt.spawn(async move {
            let mut conn = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let mut i = 0u64;
            while !stop.is_cancelled() {
                let e = entry(ENTRIES + i as usize);
                let op = serde_json::json!({ "put": e }).to_string();
                let _: Result<(), _> = redis::pipe()
                    .cmd("HSET")
                    .arg("{bench}:sup")
                    .arg(&e.address)
                    .arg(serde_json::to_string(&e).unwrap())
                    .ignore()
                    .cmd("XADD")
                    .arg("{bench}:sup:log")
                    .arg("*")
                    .arg("op")
                    .arg(op)
                    .ignore()
                    .query_async(&mut conn)
                    .await;
                i += 1;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
    };
    bench_list(c, &list, " (fleet node, following 1,000 changes/s)");
    stop.cancel();
    rt.block_on(other).unwrap();
    tasks.close();
    rt.block_on(tasks.wait());
}

struct RedisChild {
    port: u16,
    child: std::process::Child,
}

impl RedisChild {
    fn start() -> Option<RedisChild> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(RedisChild { port, child });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    }
}

impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = suppression
}
criterion_main!(benches);
