//! Per-message cost of traffic shaping with 10,000 configured destinations: classifying a
//! plan into its lane (what routing does per message) and admit + observe (what a worker
//! does per message), rates set high enough never to make anyone wait.

use criterion::{criterion_group, criterion_main, Criterion};
use std::fmt::Write;
use std::sync::Arc;
use tern::admin::metrics::Metrics;
use tern::config::{Config, TlsPolicy};
use tern::delivery::route::{Hop, RoutePlan};
use tern::delivery::worker::{Attempt, RcptOutcome, Verdict};
use tern::shaping::limiter::Backend;
use tern::shaping::Shaper;

const DESTINATIONS: usize = 10_000;

fn plan(i: usize) -> RoutePlan {
    RoutePlan {
        key: format!("mx:mx.d{i}.test"),
        hops: vec![Hop {
            name: format!("mx.d{i}.test"),
            port: 25,
        }],
        tls: TlsPolicy::Opportunistic,
        auth: None,
    }
}

fn shaping(c: &mut Criterion) {
    let mut text = String::from("[[listeners]]\naddress = \"127.0.0.1:2525\"\n");
    for i in 0..DESTINATIONS {
        write!(
            text,
            "\n[[shaping.domains]]\ndomain = \"d{i}.test\"\nrate = \"1000000/s\"\nmax_connections = 100\n"
        )
        .unwrap();
    }
    let config = Config::parse(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = tern_queue::Spool::open(dir.path()).unwrap();
    let shaper = Shaper::new(&config, spool, Backend::Local, Arc::new(Metrics::new()));
    let pool = shaper.pools().resolve(None, "d0.test");
    let plans: Vec<RoutePlan> = (0..DESTINATIONS).map(plan).collect();
    let lanes: Vec<_> = (0..DESTINATIONS)
        .map(|i| shaper.lane(&pool, &format!("d{i}.test"), &plans[i]))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();

    let mut i = 0;
    c.bench_function("shaping lane lookup, 10k destinations", |b| {
        b.iter(|| {
            i = (i + 7919) % DESTINATIONS;
            shaper.lane(&pool, "d1.test", &plans[i])
        })
    });
    let mut i = 0;
    c.bench_function("shaping admit + observe, 10k destinations", |b| {
        b.to_async(&rt).iter(|| {
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
                    }],
                    ..Attempt::default()
                };
                shaper.observe(&pair, &mut attempt);
                admitted
            }
        })
    });
}

criterion_group!(benches, shaping);
criterion_main!(benches);
