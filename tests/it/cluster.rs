//! A fleet (`[cluster]`): two in-process tern nodes and a real `redis-server` the test starts
//! on a free loopback port. A hard bounce on one node is refused by the other within a
//! second; with Redis killed both nodes keep accepting and delivering on their own copies,
//! and every suppression made meanwhile reaches Redis once it is back (counted: nothing
//! lost, nothing applied twice), whether Redis kept its data (AOF) or lost it; a node that
//! would generate its own keys refuses to start.

use crate::harness::{write_secret, Options, TestServer};
use crate::redis_server::RedisServer;
use crate::sink::{Sink, SinkBehaviour};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// The fleet's shared keys, written once into `keys` (every node reads the same files).
fn fleet_keys(keys: &Path) -> String {
    let origin = keys.join("origin.key");
    let unsubscribe = keys.join("unsubscribe.key");
    if !origin.exists() {
        write_secret(&origin, "fleet-origin-key-0123456789abcdef\n");
        write_secret(&unsubscribe, "fleet-unsubscribe-key-0123456789\n");
    }
    format!(
        "[bounce]\norigin_key_file = {:?}\n\n[unsubscribe]\nkey_file = {:?}\n",
        origin.display().to_string(),
        unsubscribe.display().to_string()
    )
}

fn node_options(redis: &RedisServer, sink: &Sink, keys: &Path, name: &str, mode: &str) -> Options {
    node_options_with(redis, sink, keys, name, mode, "")
}

/// [`node_options`] with more `[cluster]` keys.
fn node_options_with(
    redis: &RedisServer,
    sink: &Sink,
    keys: &Path,
    name: &str,
    mode: &str,
    cluster: &str,
) -> Options {
    fleet_options(&redis.url(), sink, keys, name, mode, cluster)
}

/// A fleet node's options with the store at `url` and more `[cluster]` keys.
fn fleet_options(
    url: &str,
    sink: &Sink,
    keys: &Path,
    name: &str,
    mode: &str,
    cluster: &str,
) -> Options {
    Options::default()
        .deliver()
        .delivery("idle_timeout", "\"1s\"")
        .route("a.test", sink.addr)
        .extra(format!(
            "{}\n[suppression]\nmode = \"{mode}\"\n\n[cluster]\nurl = \"{}\"\nnode = \"{name}\"\n\
             prefix = \"fleet\"\ntimeout = \"200ms\"\nretry = \"100ms\"\n{cluster}\n",
            fleet_keys(keys),
            url
        ))
}

/// A sink that answers 550 5.1.1 for every `gone*@` recipient and takes the rest.
async fn sink() -> Sink {
    Sink::start(SinkBehaviour::default().rcpt_reply(|a| {
        a.starts_with("gone")
            .then(|| "550 5.1.1 <gone@a.test>: User unknown".to_owned())
    }))
    .await
}

/// The reply code to RCPT TO `rcpt` on `server` (a fresh session each time).
async fn rcpt_code(server: &TestServer, rcpt: &str) -> u16 {
    let mut c = server.connect().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<app@a.test>").await.assert(250, "2.1.0");
    let code = c.cmd(&format!("RCPT TO:<{rcpt}>")).await.code;
    c.cmd("QUIT").await;
    code
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The keys of the fleet's list in Redis.
async fn redis_list(redis: &RedisServer) -> BTreeSet<String> {
    let mut conn = redis_conn(redis).await;
    redis::cmd("HKEYS")
        .arg("{fleet}:sup")
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// How often each key was written (put) to the fleet's change stream.
async fn stream_puts(redis: &RedisServer) -> HashMap<String, usize> {
    let mut conn = redis_conn(redis).await;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("{fleet}:sup:log")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut puts = HashMap::new();
    for id in reply.ids {
        let op: Value = serde_json::from_slice(&id.get::<Vec<u8>>("op").unwrap()).unwrap();
        if let Some(address) = op["put"]["address"].as_str() {
            *puts.entry(address.to_owned()).or_default() += 1;
        }
    }
    puts
}

/// Every address on `server`'s list (its local copy), through the API's pages.
async fn node_list(server: &TestServer) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/suppressions?limit=7&after={a}"),
            None => "/api/v1/suppressions?limit=7".to_owned(),
        };
        let (status, body) = server.api("GET", &path, None).await;
        assert_eq!(status, 200, "{body}");
        for e in body["entries"].as_array().unwrap() {
            assert!(
                out.insert(e["address"].as_str().unwrap().to_owned()),
                "listed twice: {e}"
            );
        }
        match body["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return out,
        }
    }
}

async fn suppress(server: &TestServer, address: &str) {
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/suppressions",
            Some(&json!({"address": address})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// The value of series `series` (name and labels as exported) on `server`'s /metrics.
async fn metric(server: &TestServer, series: &str) -> Option<f64> {
    let (status, text) = crate::harness::http(server.admin(), "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

const OUTBOX: &str = "tern_cluster_outbox_depth{state=\"suppressions\"}";
const LAG: &str = "tern_cluster_follower_lag_seconds";

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + T;
    while !f().await {
        assert!(Instant::now() < deadline, "{what} within {T:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits one message to `rcpt` over SMTP; accepted (250).
async fn submit(server: &TestServer, rcpt: &str) {
    let mut c = server.connect().await;
    c.ehlo().await;
    c.submit("app@a.test", &[rcpt], b"Subject: fleet\r\n\r\nhello\r\n")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_bounce_on_one_node_is_refused_by_the_other_within_a_second() {
    let redis = RedisServer::start().await;
    let sink = sink().await;
    let keys = tempfile::tempdir().unwrap();
    let a = TestServer::start(node_options(&redis, &sink, keys.path(), "a", "reject")).await;
    let b = TestServer::start(node_options(&redis, &sink, keys.path(), "b", "reject")).await;
    assert_eq!(
        rcpt_code(&b, "gone@a.test").await,
        250,
        "not suppressed yet"
    );

    // Node A delivers, the sink answers 550 5.1.1: a hard bounce, suppressed on A.
    submit(&a, "gone@a.test").await;
    wait_until("the bounce suppressed on A", || async {
        a.api("GET", "/api/v1/suppressions/gone@a.test", None)
            .await
            .0
            == 200
    })
    .await;
    let seen_on_a = Instant::now();
    wait_until("B refuses the address", || async {
        rcpt_code(&b, "gone@a.test").await == 550
    })
    .await;
    let lag = seen_on_a.elapsed();
    eprintln!("suppression on A refused by B after {lag:?}");
    assert!(lag < Duration::from_secs(1), "B refused only after {lag:?}");
    let (_, entry) = b.api("GET", "/api/v1/suppressions/gone@a.test", None).await;
    assert_eq!(entry["reason"], "invalid_recipient");
    assert_eq!(
        redis_list(&redis).await,
        BTreeSet::from(["gone@a.test".into()])
    );

    // A removal on B is a removal on A.
    let (status, _) = b
        .api("DELETE", "/api/v1/suppressions/gone@a.test", None)
        .await;
    assert_eq!(status, 200);
    wait_until("A accepts the address again", || async {
        rcpt_code(&a, "gone@a.test").await == 250
    })
    .await;
    assert!(redis_list(&redis).await.is_empty());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_mode_drops_what_another_node_suppressed() {
    let redis = RedisServer::start().await;
    let sink = sink().await;
    let keys = tempfile::tempdir().unwrap();
    let a = TestServer::start(node_options(&redis, &sink, keys.path(), "a", "drop")).await;
    let b = TestServer::start(node_options(&redis, &sink, keys.path(), "b", "drop")).await;
    suppress(&a, "Dropped@A.test").await;
    wait_until("B has the entry", || async {
        b.api("GET", "/api/v1/suppressions/dropped@a.test", None)
            .await
            .0
            == 200
    })
    .await;
    submit(&b, "dropped@a.test").await;
    submit(&b, "kept@a.test").await;
    sink.wait_for_messages(1, T).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: Vec<String> = sink
        .messages()
        .iter()
        .flat_map(|m| m.rcpt_addresses().into_iter().map(str::to_owned))
        .filter(|r| r != "app@a.test")
        .collect();
    assert_eq!(got, ["kept@a.test"], "the suppressed recipient was dropped");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_nodes_keep_working_and_every_change_replays_once() {
    let aof = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::not_started();
    redis.persistent(aof.path());
    redis.restart().await;
    let sink = sink().await;
    let keys = tempfile::tempdir().unwrap();
    let a = TestServer::start(node_options(&redis, &sink, keys.path(), "a", "reject")).await;
    let b = TestServer::start(node_options(&redis, &sink, keys.path(), "b", "reject")).await;
    let mut expected = BTreeSet::new();
    for i in 0..5 {
        let address = format!("before{i}@a.test");
        suppress(if i % 2 == 0 { &a } else { &b }, &address).await;
        expected.insert(address);
    }
    wait_until("both copies have the first entries", || async {
        node_list(&a).await == expected && node_list(&b).await == expected
    })
    .await;
    for node in [&a, &b] {
        assert_eq!(metric(node, "tern_cluster_up").await, Some(1.0));
        // The pusher's next look at its outbox makes the gauge exact (within cluster.retry).
        wait_until("nothing waits in the outbox", || async {
            metric(node, OUTBOX).await == Some(0.0)
        })
        .await;
        assert!(metric(node, LAG).await.unwrap() < 1.0, "a current copy");
        assert!(
            metric(
                node,
                "tern_cluster_suppression_changes_total{direction=\"applied\"}"
            )
            .await
            .unwrap()
                >= 5.0,
            "the fleet's changes applied"
        );
    }
    assert!(
        metric(
            &a,
            "tern_cluster_suppression_changes_total{direction=\"pushed\"}"
        )
        .await
        .unwrap()
            >= 3.0,
        "A's changes pushed"
    );

    redis.kill();
    // Both nodes keep taking and delivering mail; checks use their own copies.
    for (n, node) in [&a, &b].into_iter().enumerate() {
        assert_eq!(rcpt_code(node, "before1@a.test").await, 550);
        for i in 0..3 {
            submit(node, &format!("ok{n}-{i}@a.test")).await;
        }
    }
    sink.wait_for_messages(6, T).await;
    let delivered = |n: usize, i: usize| {
        let rcpt = format!("ok{n}-{i}@a.test");
        sink.messages()
            .iter()
            .any(|m| m.rcpt_addresses().contains(&rcpt.as_str()))
    };
    assert!(
        (0..2).all(|n| (0..3).all(|i| delivered(n, i))),
        "both nodes delivered"
    );
    // Changes while Redis is down: API entries on both nodes, and a bounce on A.
    for i in 0..20 {
        for (name, node) in [("a", &a), ("b", &b)] {
            let address = format!("down-{name}{i}@a.test");
            suppress(node, &address).await;
            expected.insert(address);
        }
    }
    submit(&a, "gone-down@a.test").await;
    expected.insert("gone-down@a.test".into());
    wait_until("the bounce suppressed on A while Redis is down", || async {
        a.api("GET", "/api/v1/suppressions/gone-down@a.test", None)
            .await
            .0
            == 200
    })
    .await;
    assert_eq!(rcpt_code(&a, "down-a0@a.test").await, 550, "A's own copy");
    assert!(
        a.spool().events("cluster/suppressions", 100).unwrap().len() >= 20,
        "A's changes wait in its outbox"
    );
    // The metrics show it: the store down, each outbox holding exactly its node's changes,
    // the copies' lag growing.
    for (node, waiting) in [(&a, 21.0), (&b, 20.0)] {
        assert_eq!(metric(node, "tern_cluster_up").await, Some(0.0));
        wait_until("the outbox gauge counts every waiting change", || async {
            metric(node, OUTBOX).await == Some(waiting)
        })
        .await;
    }
    wait_until("the followers' lag grows", || async {
        metric(&a, LAG).await.unwrap() > 1.0 && metric(&b, LAG).await.unwrap() > 1.0
    })
    .await;
    let errors = |text: String| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("tern_cluster_errors_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (_, text) = crate::harness::http(a.admin(), "GET", "/metrics", None, None).await;
    assert!(errors(text) > 0.0, "failed calls counted");

    // Redis comes back with its data (AOF): each waiting change is applied exactly once.
    redis.restart().await;
    wait_until("Redis has every entry", || async {
        redis_list(&redis).await == expected
    })
    .await;
    wait_until("both copies have every entry", || async {
        node_list(&a).await == expected && node_list(&b).await == expected
    })
    .await;
    let puts = stream_puts(&redis).await;
    for address in &expected {
        assert_eq!(puts.get(address), Some(&1), "{address} written once");
    }
    for node in [&a, &b] {
        assert!(node
            .spool()
            .events("cluster/suppressions", 1)
            .unwrap()
            .is_empty());
        assert_eq!(rcpt_code(node, "down-b19@a.test").await, 550);
        // Back: up, the outbox drained, the copy current again.
        wait_until("the metrics show the store back", || async {
            metric(node, "tern_cluster_up").await == Some(1.0)
                && metric(node, OUTBOX).await == Some(0.0)
                && metric(node, LAG).await.unwrap() < 1.0
        })
        .await;
    }
    // Redis kept its data: nobody needed a resync.
    assert_eq!(
        metric(&a, "tern_cluster_resyncs_total{mode=\"merge\"}").await,
        Some(1.0),
        "only the first connection merged"
    );

    // Redis dies again and comes back empty (no persistence): the nodes' copies refill it.
    redis.kill();
    suppress(&b, "late@a.test").await;
    expected.insert("late@a.test".into());
    redis.volatile();
    redis.restart().await;
    wait_until("an emptied Redis is refilled from the copies", || async {
        redis_list(&redis).await == expected
    })
    .await;
    wait_until("both copies agree", || async {
        node_list(&a).await == expected && node_list(&b).await == expected
    })
    .await;
    for node in [&a, &b] {
        assert_eq!(
            metric(node, "tern_cluster_resyncs_total{mode=\"merge\"}").await,
            Some(2.0),
            "an emptied store is merged into"
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_a_fleet_merges_its_list_and_gets_the_fleets() {
    let redis = RedisServer::start().await;
    let sink = sink().await;
    let keys = tempfile::tempdir().unwrap();
    let a = TestServer::start(node_options(&redis, &sink, keys.path(), "a", "reject")).await;
    suppress(&a, "fleet@a.test").await;
    // B ran alone before, with a list of its own.
    let alone = Options::default().route("a.test", sink.addr);
    let b = TestServer::start(alone.clone()).await;
    suppress(&b, "alone@a.test").await;
    let b = b
        .restart(node_options(&redis, &sink, keys.path(), "b", "reject"))
        .await;
    let both = BTreeSet::from(["alone@a.test".to_owned(), "fleet@a.test".to_owned()]);
    wait_until("the lists merged", || async {
        node_list(&a).await == both && node_list(&b).await == both
    })
    .await;
    assert_eq!(redis_list(&redis).await, both);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_fleet_node_never_generates_its_own_keys() {
    let redis = RedisServer::not_started();
    let dir = tempfile::tempdir().unwrap();
    let text = Options::default()
        .extra(format!("[cluster]\nurl = \"{}\"\n", redis.url()))
        .config_text(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let config = tern::config::Config::parse(&text).unwrap();
    let err = match tern::daemon::Daemon::start(config).await {
        Ok(_) => panic!("a fleet node started with keys of its own"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("bounce.origin_key_file"), "{err}");
    assert!(err.contains("unsubscribe.key_file"), "{err}");
    assert!(err.contains("[cluster]"), "{err}");
    assert!(
        !dir.path().join("origin.key").exists(),
        "no key was created"
    );
}

/// A fleet node with tracking and the `promo` campaign (variants a and b).
fn campaign_node(redis: &RedisServer, sink: &Sink, keys: &Path, name: &str) -> Options {
    campaign_options(node_options(redis, sink, keys, name, "reject"), keys)
}

/// `options` with tracking and the `promo` campaign, the tracking key from `keys`.
fn campaign_options(mut options: Options, keys: &Path) -> Options {
    let tracking = keys.join("tracking.key");
    if !tracking.exists() {
        write_secret(&tracking, "fleet-tracking-key-0123456789abcdef\n");
    }
    options.extra.push(crate::sidecar::tracking_config(keys));
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engagement_and_bandit_counts_are_the_fleets() {
    let redis = RedisServer::start().await;
    let sink = sink().await;
    let keys = tempfile::tempdir().unwrap();
    let a = TestServer::start(campaign_node(&redis, &sink, keys.path(), "a")).await;
    let b = TestServer::start(campaign_node(&redis, &sink, keys.path(), "b")).await;
    let (status, answer) = a
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "news@a.test",
                "to": ["ann@a.test"],
                "raw": "From: news@a.test\nSubject: x\n\nx\n",
                "sidecar": {"campaign": "promo"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let variant = answer["sidecar"][0]["variant"].as_str().unwrap().to_owned();
    let message = sink.wait_for_messages(1, T).await.remove(0);
    let parsed = mail_parser::MessageParser::default()
        .parse(&message.data)
        .unwrap();
    let html = parsed.body_html(0).unwrap().into_owned();
    let click = html
        .split("http://t.example.com/t/c/")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no click link in {html}"))
        .to_owned();

    // Minted on A, clicked through B: B knows the key and counts it.
    let iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15";
    let (status, text) = crate::sidecar::get(b.admin(), &format!("/t/c/{click}"), iphone).await;
    assert_eq!(status, 302, "{text}");
    // The one profile: A, which never saw the click, reads it.
    wait_until("A sees the engagement B recorded", || async {
        let (status, p) = a.api("GET", "/api/v1/recipients/ann@a.test", None).await;
        status == 200 && p["engagements"].as_f64() >= Some(1.0)
    })
    .await;
    let mut conn = redis_conn(&redis).await;
    let bytes: i64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg("{fleet}:prof:ann@a.test")
        .query_async(&mut conn)
        .await
        .unwrap();
    eprintln!("one recipient's engagement profile in Redis: {bytes} bytes (MEMORY USAGE)");
    assert!((100..8192).contains(&bytes), "{bytes} bytes");

    // The send was counted on A, the reward on B; after each node's batch both hold the sum.
    for _ in 0..2 {
        a.daemon().sidecar().apply_bandit_batch().await;
        b.daemon().sidecar().apply_bandit_batch().await;
    }
    let (on_a, on_b) = (
        a.daemon().sidecar().bandit_arms("promo"),
        b.daemon().sidecar().bandit_arms("promo"),
    );
    assert_eq!(on_a, on_b, "both nodes hold the fleet's counts");
    assert_eq!(
        (on_a[&variant].sends, on_a[&variant].rewards),
        (1.0, 1.0),
        "{on_a:?}"
    );

    // One refit at a time: while another holds the lease, A's refit waits for it.
    let _: () = redis::cmd("SET")
        .arg("{fleet}:lease:refit")
        .arg("someone-else")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let admin = a.admin();
    let token = a.admin_token();
    let refit = tokio::spawn(async move {
        crate::harness::http(admin, "POST", "/api/v1/sendtime/refit", Some(&token), None).await
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !refit.is_finished(),
        "refit ran while another node held the lease"
    );
    let _: () = redis::cmd("DEL")
        .arg("{fleet}:lease:refit")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, text) = tokio::time::timeout(T, refit).await.unwrap().unwrap();
    assert_eq!(status, 200, "{text}");
    let held: Option<String> = redis::cmd("GET")
        .arg("{fleet}:lease:refit")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(held, None, "the lease is given back");

    // The privacy erasure on B removes the fleet's one profile: A no longer finds it.
    let (status, body) = b.api("DELETE", "/api/v1/recipients/ann@a.test", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["profile_erased"], true, "{body}");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("{fleet}:prof:ann@a.test")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    let (status, body) = a.api("GET", "/api/v1/recipients/ann@a.test", None).await;
    assert_eq!(status, 404, "{body}");
    a.stop().await;
    b.stop().await;
}

/// The destinations `server` has suspended now (`*` for all delivery).
async fn suspended(server: &TestServer) -> Vec<String> {
    let (status, body) = server.api("GET", "/api/v1/queue/suspensions", None).await;
    assert_eq!(status, 200, "{body}");
    body["suspensions"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|s| s["destination"].as_str().unwrap_or("*").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_is_the_fleets() {
    let redis = RedisServer::start().await;
    let sink = sink().await;
    let keys = tempfile::tempdir().unwrap();
    let a = TestServer::start(node_options(&redis, &sink, keys.path(), "a", "reject")).await;
    let b = TestServer::start(node_options(&redis, &sink, keys.path(), "b", "reject")).await;
    let (status, body) = a
        .api(
            "POST",
            "/api/v1/queue/suspend",
            Some(&json!({"destination": "a.test", "reason": "provider asked"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_until("B suspends a.test too", || async {
        suspended(&b).await == ["a.test"]
    })
    .await;
    // B holds its mail for a.test back ...
    submit(&b, "held@a.test").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        sink.messages().is_empty(),
        "B delivered to a suspended domain"
    );
    // ... until an operator resumes on B, which resumes on A too.
    let (status, body) = b
        .api(
            "POST",
            "/api/v1/queue/resume",
            Some(&json!({"destination": "a.test"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["resumed"], true);
    sink.wait_for_messages(1, T).await;
    wait_until("A resumes a.test", || async {
        suspended(&a).await.is_empty()
    })
    .await;
    // And gone on B, where it was resumed.
    assert!(suspended(&b).await.is_empty());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_comes_from_its_file_and_a_wrong_one_costs_no_mail() {
    let mut redis = RedisServer::not_started();
    redis.require_password("fleet-redis-password");
    redis.restart().await;
    let sink = sink().await;
    let keys = tempfile::tempdir().unwrap();
    let good = keys.path().join("redis.pass");
    let bad = keys.path().join("wrong.pass");
    write_secret(&good, "fleet-redis-password\n");
    write_secret(&bad, "not-the-password\n");
    let with = |file: &Path| format!("password_file = {:?}", file.display().to_string());
    let a = TestServer::start(node_options_with(
        &redis,
        &sink,
        keys.path(),
        "a",
        "reject",
        &with(&good),
    ))
    .await;
    let b = TestServer::start(node_options_with(
        &redis,
        &sink,
        keys.path(),
        "b",
        "reject",
        &with(&bad),
    ))
    .await;
    suppress(&a, "pw@a.test").await;
    suppress(&b, "stuck@a.test").await;
    let conn = redis::Client::open(format!(
        "redis://:fleet-redis-password@127.0.0.1:{}",
        redis.port
    ))
    .unwrap()
    .get_multiplexed_async_connection()
    .await
    .unwrap();
    let keys_in = |conn: &redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("HKEYS")
                .arg("{fleet}:sup")
                .query_async::<BTreeSet<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    wait_until("A's entry reaches Redis with the password", || async {
        keys_in(&conn).await.contains("pw@a.test")
    })
    .await;
    // B, refused by Redis, still takes and delivers mail on its own copy; its change waits.
    assert_eq!(rcpt_code(&b, "stuck@a.test").await, 550);
    submit(&b, "fine@a.test").await;
    sink.wait_for_messages(1, T).await;
    assert!(!keys_in(&conn).await.contains("stuck@a.test"));
    assert_eq!(
        b.spool().events("cluster/suppressions", 10).unwrap().len(),
        1,
        "B's change waits in its outbox"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_over_rediss_with_its_own_ca() {
    let certs = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::not_started();
    redis.tls(certs.path());
    redis.restart().await;
    let sink = sink().await;
    let keys = tempfile::tempdir().unwrap();
    let ca = format!(
        "ca_file = {:?}",
        certs.path().join("ca.pem").display().to_string()
    );
    let a = TestServer::start(node_options_with(
        &redis,
        &sink,
        keys.path(),
        "a",
        "reject",
        &ca,
    ))
    .await;
    let b = TestServer::start(node_options_with(
        &redis,
        &sink,
        keys.path(),
        "b",
        "reject",
        &ca,
    ))
    .await;
    suppress(&a, "tls@a.test").await;
    wait_until("B refuses what A suppressed, over TLS", || async {
        rcpt_code(&b, "tls@a.test").await == 550
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// The fleet on a real Redis Cluster (three masters on loopback, joined by `redis-cli
/// --cluster create`): every fleet key carries the hash tag `{fleet}`, so the scripts, the
/// multi-key reads and the scans that the fleet runs all stay in one slot (no CROSSSLOT).
/// A bounce on A is refused by B within a second, a link minted on A and clicked through B
/// updates the one profile, the bandit counts agree and a refit reads the shared profiles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_a_redis_cluster_shares_suppressions_engagement_and_bandits() {
    let cluster = crate::redis_server::RedisCluster::start().await;
    let sink = sink().await;
    let keys = tempfile::tempdir().unwrap();
    let node = |name: &str| {
        let options = fleet_options(
            &cluster.url(),
            &sink,
            keys.path(),
            name,
            "reject",
            "redis_cluster = true\n",
        );
        campaign_options(options, keys.path())
    };
    let a = TestServer::start(node("a")).await;
    let b = TestServer::start(node("b")).await;
    for n in [&a, &b] {
        wait_until("the node reaches the cluster", || async {
            metric(n, "tern_cluster_up").await == Some(1.0)
        })
        .await;
    }
    assert_eq!(
        rcpt_code(&b, "gone@a.test").await,
        250,
        "not suppressed yet"
    );

    // A bounce on A, refused by B within a second.
    submit(&a, "gone@a.test").await;
    wait_until("the bounce suppressed on A", || async {
        a.api("GET", "/api/v1/suppressions/gone@a.test", None)
            .await
            .0
            == 200
    })
    .await;
    let seen_on_a = Instant::now();
    wait_until("B refuses the address", || async {
        rcpt_code(&b, "gone@a.test").await == 550
    })
    .await;
    let lag = seen_on_a.elapsed();
    eprintln!("Redis Cluster: suppression on A refused by B after {lag:?}");
    assert!(lag < Duration::from_secs(1), "B refused only after {lag:?}");
    let mut conn = cluster.connection().await;
    let list: BTreeSet<String> = redis::cmd("HKEYS")
        .arg("{fleet}:sup")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(list, BTreeSet::from(["gone@a.test".into()]));

    // A link minted on A, clicked through B: the one profile, read on A.
    let (status, answer) = a
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "news@a.test",
                "to": ["ann@a.test"],
                "raw": "From: news@a.test\nSubject: x\n\nx\n",
                "sidecar": {"campaign": "promo"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let variant = answer["sidecar"][0]["variant"].as_str().unwrap().to_owned();
    // (The sink also gets the bounce's DSN to app@a.test.)
    let to_ann = || {
        sink.messages()
            .into_iter()
            .find(|m| m.rcpt_addresses().contains(&"ann@a.test"))
    };
    wait_until("the campaign message delivered", || async {
        to_ann().is_some()
    })
    .await;
    let message = to_ann().unwrap();
    let parsed = mail_parser::MessageParser::default()
        .parse(&message.data)
        .unwrap();
    let html = parsed.body_html(0).unwrap().into_owned();
    let click = html
        .split("http://t.example.com/t/c/")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no click link in {html}"))
        .to_owned();
    let iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15";
    let (status, text) = crate::sidecar::get(b.admin(), &format!("/t/c/{click}"), iphone).await;
    assert_eq!(status, 302, "{text}");
    wait_until("A sees the engagement B recorded", || async {
        let (status, p) = a.api("GET", "/api/v1/recipients/ann@a.test", None).await;
        status == 200 && p["engagements"].as_f64() >= Some(1.0)
    })
    .await;

    // Bandit counts: the send on A, the reward on B; both hold the sum.
    for _ in 0..2 {
        a.daemon().sidecar().apply_bandit_batch().await;
        b.daemon().sidecar().apply_bandit_batch().await;
    }
    let (on_a, on_b) = (
        a.daemon().sidecar().bandit_arms("promo"),
        b.daemon().sidecar().bandit_arms("promo"),
    );
    assert_eq!(on_a, on_b, "both nodes hold the fleet's counts");
    assert_eq!(
        (on_a[&variant].sends, on_a[&variant].rewards),
        (1.0, 1.0),
        "{on_a:?}"
    );

    // A refit under the lease reads every shared profile (the scan runs on the slot's node).
    // A scan (the refit's SCAN + MGET of every profile) goes to the slot's master, where
    // the fleet's keys are: through a store of its own, it finds the profile.
    let store = tern::cluster::Store::new(
        &tern::config::ClusterConfig {
            url: cluster.url(),
            redis_cluster: true,
            password_file: None,
            ca_file: None,
            node: "probe".into(),
            prefix: "fleet".into(),
            timeout: Duration::from_secs(2),
            retry: Duration::from_millis(100),
        },
        std::sync::Arc::new(tern::telemetry::Metrics::new()),
    )
    .unwrap();
    let mut found = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) = store
            .query_in_slot(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("{fleet}:prof:*")
                    .arg("COUNT")
                    .arg(100),
            )
            .await
            .unwrap();
        found.extend(page);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    assert_eq!(found, ["{fleet}:prof:ann@a.test"]);
    let (status, body) = a.api("POST", "/api/v1/sendtime/refit", None).await;
    assert_eq!(status, 200, "{body}");

    // No call was refused by the cluster (CROSSSLOT, MOVED left unfollowed, ...), and the
    // follower's blocking reads outlast the cluster client's own response timeout. A
    // follower whose BLOCK outlived the client's timeout would time out on every read,
    // twice a second for the whole test (dozens); a loaded machine can push a few single
    // calls past the test's 200 ms timeout, so a handful is allowed, never more.
    for n in [&a, &b] {
        for kind in ["reply", "command"] {
            assert_eq!(
                metric(n, &format!("tern_cluster_errors_total{{kind=\"{kind}\"}}")).await,
                Some(0.0),
                "{kind} errors"
            );
        }
        let timeouts = metric(n, "tern_cluster_errors_total{kind=\"timeout\"}")
            .await
            .unwrap_or(0.0);
        assert!(
            timeouts <= 3.0,
            "{timeouts} timeouts: blocking reads outlast the client's timeout?"
        );
    }
    a.stop().await;
    b.stop().await;
}

/// A send time planned on one node and moved to another (`POST /api/v1/queue/drain`) is
/// recorded as a send in the fleet's one profile when the other node delivers it: the relay
/// trace carries `send_time_planned` (before, the receiving node's delivery was not taken for
/// a planned send, and the awaited send was never recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_send_moved_to_another_node_is_recorded_when_delivered() {
    let redis = RedisServer::start().await;
    let sink = sink().await;
    let keys = tempfile::tempdir().unwrap();
    let planned = |o: Options| {
        o.sendtime("control_share", "0.0")
            .sendtime("quiet_hours", "\"none\"")
    };
    // A plans and keeps the mail (delivery suspended); B delivers.
    let a = TestServer::start(planned(
        node_options(&redis, &sink, keys.path(), "a", "reject").delivery("suspended", "true"),
    ))
    .await;
    let b = TestServer::start(planned(node_options(
        &redis,
        &sink,
        keys.path(),
        "b",
        "reject",
    )))
    .await;
    let mut client = a.connect().await;
    client.ehlo().await;
    client
        .submit(
            "app@sender.test",
            &["fay@a.test"],
            b"X-Tern-Send-Time: optimize\r\nSubject: planned\r\n\r\nb\r\n",
        )
        .await;
    let queued = a.envelopes();
    assert_eq!(queued.len(), 1);
    assert!(queued[0].send_time_planned, "{:?}", queued[0]);
    // Planned, not sent: the fleet's profile awaits the delivery.
    let (status, p) = b.api("GET", "/api/v1/recipients/fay@a.test", None).await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["history"]["sends"], 0, "{p}");
    let (status, body) = a
        .api(
            "POST",
            "/api/v1/queue/drain",
            Some(&json!({"to": b.smtp.to_string()})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(a.envelopes().is_empty(), "moved to B");
    // B delivers it at once: the message A claimed (held) for the drain is due at once on B,
    // not at its expiry (days away; the wait is 20 s). B may be done before B's spool could
    // be read here, so what B did is read from the sink and the profile.
    sink.wait_for_messages(1, T).await;
    // B took it for a planned send (the trace's `planned=1`), delivered it and recorded the
    // send, which A reads from the same profile; without the flag it stays awaited (0 sends).
    wait_until("the moved planned send is recorded", || async {
        let (status, p) = a.api("GET", "/api/v1/recipients/fay@a.test", None).await;
        status == 200 && p["history"]["sends"] == 1
    })
    .await;
    a.stop().await;
    b.stop().await;
}
