//! Per-message cost of traffic shaping with 10,000 configured destinations: classifying a
//! plan into its lane (what routing does per message) and admit + observe (what a worker
//! does per message), rates set high enough never to make anyone wait. Then the same with the
//! cluster store (`shaping.shared`) on a `redis-server` this bench starts on loopback
//! (skipped, saying so, when there is none), and the store's single round trips.

use criterion::{criterion_group, criterion_main, Criterion};
use std::fmt::Write;
use std::sync::Arc;
use tern::config::SharedConfig;
use tern::config::{Config, TlsPolicy};
use tern::delivery::worker::{Attempt, RcptOutcome, Verdict};
use tern::routing::route::{Hop, RoutePlan};
use tern::shaping::limiter::Backend;
use tern::shaping::shared::SharedStore;
use tern::shaping::Shaper;
use tern::taxonomy::Category;
use tern::telemetry::Metrics;

const DESTINATIONS: usize = 10_000;

fn plan(i: usize) -> RoutePlan {
    RoutePlan {
        key: format!("mx:mx.d{i}.test"),
        hops: vec![Hop {
            name: format!("mx.d{i}.test"),
            port: 25,
            static_route: false,
        }],
        tls: TlsPolicy::Opportunistic,
        auth: None,
        tls_label: "opportunistic",
        dane: None,
    }
}

fn config() -> Config {
    let mut text = String::from("[[listeners]]\naddress = \"127.0.0.1:2525\"\n");
    for i in 0..DESTINATIONS {
        write!(
            text,
            "\n[[shaping.domains]]\ndomain = \"d{i}.test\"\nrate = \"1000000/s\"\nmax_connections = 100\n"
        )
        .unwrap();
    }
    Config::parse(&text).unwrap()
}

fn shaping(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    admit_and_observe(c, &rt, Backend::Local, "");
    let Some(redis) = RedisChild::start() else {
        eprintln!("redis-server is not on PATH: the shared-store benches are skipped");
        return;
    };
    let shared = SharedConfig {
        url: format!("redis://127.0.0.1:{}", redis.port),
        password_file: None,
        ca_file: None,
        node_count: 2,
        prefix: "bench".into(),
        timeout: std::time::Duration::from_millis(250),
        retry: std::time::Duration::from_secs(5),
    };
    let store = rt.block_on(SharedStore::connect(
        &shared,
        Arc::new(Metrics::new()),
        tokio_util::task::TaskTracker::new(),
        tokio_util::sync::CancellationToken::new(),
    ));
    assert!(store.is_up(), "the bench's redis-server answers");
    let backend = Backend::Shared(store);
    admit_and_observe(c, &rt, backend.clone(), ", shared store");
    let pair = backend.pair("bench|one");
    c.bench_function("shared store: one GCRA round trip", |b| {
        b.to_async(&rt)
            .iter(|| async { pair.take_connection(u32::MAX).await })
    });
    c.bench_function("shared store: connection lease + release", |b| {
        b.to_async(&rt).iter(|| async {
            assert!(pair.try_open(Some(1_000_000)).await);
            pair.close();
        })
    });
}

/// A `redis-server` on a free loopback port, killed on drop.
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

/// Lane lookup (local only: it never touches the store) and admit + observe per message.
fn admit_and_observe(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    backend: Backend,
    what: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let spool = tern_queue::Spool::open(dir.path()).unwrap();
    let local = matches!(backend, Backend::Local);
    let shaper = Shaper::new(&config(), spool, backend, Arc::new(Metrics::new()));
    let pool = shaper.pools().resolve(None, "d0.test");
    let plans: Vec<RoutePlan> = (0..DESTINATIONS).map(plan).collect();
    let lanes: Vec<_> = (0..DESTINATIONS)
        .map(|i| shaper.lane(&pool, &format!("d{i}.test"), &plans[i]))
        .collect();
    if local {
        let mut i = 0;
        c.bench_function("shaping lane lookup, 10k destinations", |b| {
            b.iter(|| {
                i = (i + 7919) % DESTINATIONS;
                shaper.lane(&pool, "d1.test", &plans[i])
            })
        });
    }
    let mut i = 0;
    c.bench_function(
        &format!("shaping admit + observe, 10k destinations{what}"),
        |b| {
            b.to_async(rt).iter(|| {
                i = (i + 7919) % DESTINATIONS;
                let lane = lanes[i].clone();
                let shaper = shaper.clone();
                async move {
                    let pair = lane.choose();
                    let admitted = shaper.admit(&lane, &pair).await;
                    let mut attempt = Attempt {
                        outcomes: vec![RcptOutcome {
                            index: 0,
                            verdict: Verdict::Delivered,
                            status: "2.0.0".into(),
                            reply: "250 2.0.0 Ok".into(),
                            category: Category::Delivered,
                        }],
                        ..Attempt::default()
                    };
                    shaper.observe(&pair, &mut attempt);
                    admitted
                }
            })
        },
    );
}

criterion_group!(benches, shaping);
criterion_main!(benches);
