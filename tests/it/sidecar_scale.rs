//! Generation that scales, against a fake OpenAI-compatible model over real HTTPS on
//! loopback (rustls, a test CA from rcgen, ALPN h2 and http/1.1): a campaign burst is
//! generated once per (variant, segment) with single flight, not per recipient; the pooled
//! client keeps its connections; the CONNECT proxy; the per-recipient budget; the segment cap.
//!
//! The burst goes through the sidecar stage API ([`Sidecar::apply`]) directly: 100,000
//! recipients in 1,000 submissions from 32 concurrent clients take about 10 s in a debug
//! build (SMTP or HTTP for each would measure the ingest path, not generation; the ingest
//! comparison is `examples/inject_load.rs` against a daemon, see docs/OPERATIONS.md).

use crate::harness::test_cert;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern::message::{CampaignRequest, Submission};
use tern::sidecar::{RecentEngagement, Sidecar};
use tern::telemetry::Metrics;
use tern_queue::{BodyType, Recipient, Source, Spool};

/// What the fake model saw.
#[derive(Default)]
pub struct FakeModel {
    /// Completed chat-completion requests (a 429 included).
    pub calls: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Refused with 429 for being over the concurrency it allows.
    pub refused: AtomicUsize,
    pub connections: AtomicUsize,
    pub http2_requests: AtomicUsize,
    /// Requests whose model input carried anything but campaign, variant and segment.
    pub leaked_fields: AtomicUsize,
    /// The next this many calls are answered 503.
    pub fail_next: AtomicUsize,
}

/// Starts the fake model on 127.0.0.1: answers each call after `delay`, allows `allowed`
/// calls at once (more get a 429), offers `alpn`. Its content echoes the segment and the
/// variant it was asked about, so a test can check each recipient got its own key's text.
pub async fn fake_model(
    delay: Duration,
    allowed: usize,
    alpn: &[&[u8]],
) -> (Arc<FakeModel>, SocketAddr) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert = test_cert();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.leaf_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(FakeModel::default());
    let shared = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, state) = (acceptor.clone(), shared.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                state.connections.fetch_add(1, Ordering::SeqCst);
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, hyper::Error>(answer(state, req, delay, allowed).await) }
                });
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(1000)
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    });
    (state, addr)
}

async fn answer(
    state: Arc<FakeModel>,
    req: Request<Incoming>,
    delay: Duration,
    allowed: usize,
) -> Response<Full<Bytes>> {
    if req.version() == hyper::Version::HTTP_2 {
        state.http2_requests.fetch_add(1, Ordering::SeqCst);
    }
    let ok_path = req.uri().path() == "/v1/chat/completions";
    let body = req.into_body().collect().await.unwrap().to_bytes();
    state.calls.fetch_add(1, Ordering::SeqCst);
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let fail = state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let response = if fail {
        Response::builder()
            .status(503)
            .body(Full::new(Bytes::new()))
            .unwrap()
    } else if !ok_path {
        Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap()
    } else if now > allowed {
        state.refused.fetch_add(1, Ordering::SeqCst);
        Response::builder()
            .status(429)
            .body(Full::new(Bytes::new()))
            .unwrap()
    } else {
        tokio::time::sleep(delay).await;
        let request: Value = serde_json::from_slice(&body).unwrap();
        let user: Value =
            serde_json::from_str(request["messages"][1]["content"].as_str().unwrap()).unwrap();
        let fields = user["recipient"].as_object().unwrap();
        if fields
            .keys()
            .any(|k| !["campaign", "variant", "segment"].contains(&k.as_str()))
        {
            state.leaked_fields.fetch_add(1, Ordering::SeqCst);
        }
        let segment = fields.get("segment").and_then(Value::as_str).unwrap_or("-");
        let variant = fields.get("variant").and_then(Value::as_str).unwrap_or("-");
        let content = json!({
            "subject": format!("Offer {segment} {variant}"),
            "opening": format!("Written for {segment}."),
        });
        let answer = json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content.to_string()}}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52},
        });
        Response::new(Full::new(Bytes::from(answer.to_string())))
    };
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

/// A sidecar with one campaign, the model at `base_url` trusting the test CA.
pub fn sidecar(
    dir: &std::path::Path,
    base_url: &str,
    extra_model: &str,
    extra_campaign: &str,
) -> (Arc<Sidecar>, Arc<Metrics>) {
    let ca = dir.join("model-ca.pem");
    std::fs::write(&ca, &test_cert().ca_pem).unwrap();
    let text = format!(
        r#"
[[listeners]]
address = "127.0.0.1:0"

[sidecar.model]
base_url = "{base_url}"
model = "fake"
ca_file = "{ca}"
max_concurrency = 16
{deadline}
{extra_model}

[[sidecar.campaigns]]
name = "spring"
subject = "{{{{ slots.subject }}}}"
text = "Hi {{{{ recipient.first_name }}}},\n{{{{ slots.opening }}}}\n"
segment_field = "segment"
{extra_campaign}
[[sidecar.campaigns.slots]]
name = "subject"
prompt = "A subject line for this segment"
default = "Spring news"
[[sidecar.campaigns.slots]]
name = "opening"
prompt = "One opening sentence"
default = "Here is what is new."
[[sidecar.campaigns.variants]]
id = "a"
[[sidecar.campaigns.variants]]
id = "b"
[[sidecar.campaigns.variants]]
id = "c"
"#,
        ca = ca.display(),
        deadline = if extra_model.contains("deadline") {
            ""
        } else {
            "deadline = \"3s\""
        },
    );
    let config = tern::config::Config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let spool = Spool::open(&dir.join("spool")).unwrap();
    let metrics = Arc::new(Metrics::new());
    let events = tern::events::Events::new(
        spool.clone(),
        0,
        tern::maillog::DeliveryLog::disabled(),
        metrics.clone(),
        tokio_util::task::TaskTracker::new(),
    );
    let sidecar = Sidecar::new(
        &config.sidecar,
        "tern.test",
        spool,
        metrics.clone(),
        Arc::new(RecentEngagement::default()),
        events,
        None,
    )
    .unwrap();
    (Arc::new(sidecar), metrics)
}

/// One campaign submission of `count` recipients from `first`, segment `s<i % 4>`.
pub fn submission(
    first: usize,
    count: usize,
    extra: impl Fn(usize) -> Map<String, Value>,
) -> Submission {
    let mut recipients = HashMap::new();
    let mut rcpts = Vec::with_capacity(count);
    for i in first..first + count {
        let address = format!("r{i}@sink.test");
        let mut data = Map::new();
        data.insert("segment".into(), format!("s{}", i % 4).into());
        data.insert("first_name".into(), format!("N{i}").into());
        data.extend(extra(i));
        recipients.insert(address.clone(), data);
        rcpts.push(Recipient::new(address));
    }
    Submission {
        sender: "news@shop.test".into(),
        recipients: rcpts,
        env_id: None,
        ret: None,
        body_type: BodyType::SevenBit,
        smtputf8: false,
        source: Source {
            client_ip: "127.0.0.1".into(),
            helo: "app".into(),
            auth_user: None,
            protocol: "http".into(),
        },
        tls: None,
        content: b"From: news@shop.test\r\nTo: list@shop.test\r\nSubject: x\r\n\r\nbody\r\n"
            .to_vec(),
        sidecar: Some(CampaignRequest {
            campaign: Some("spring".into()),
            send_time: None,
            data: Map::new(),
            recipients,
        }),
        pool: None,
        trusted: true,
        unsubscribe: None,
    }
}

fn subject(message: &[u8]) -> String {
    let text = String::from_utf8_lossy(message);
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or_default()
        .to_owned()
}

/// Per recipient of the burst: (generated text?, the subject matched its segment and variant).
pub struct BurstResult {
    pub recipients: usize,
    pub generated: usize,
    pub mismatched: usize,
    pub took: Duration,
}

/// Injects `total` recipients in submissions of `per` through the stage, from `clients`
/// concurrent clients each submitting again as soon as its last one is through (as HTTP
/// clients inject at full speed).
pub async fn burst(
    sidecar: &Arc<Sidecar>,
    total: usize,
    per: usize,
    clients: usize,
) -> BurstResult {
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(clients));
    let mut tasks = Vec::with_capacity(total / per);
    for k in 0..total / per {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let sidecar = sidecar.clone();
        tasks.push(tokio::spawn(async move {
            let out = sidecar
                .apply(submission(k * per, per, |_| Map::new()))
                .await;
            drop(permit);
            out
        }));
    }
    let mut out = BurstResult {
        recipients: 0,
        generated: 0,
        mismatched: 0,
        took: Duration::ZERO,
    };
    for t in tasks {
        for prepared in t.await.unwrap() {
            let subject = subject(&prepared.submission.content);
            for (report, rcpt) in prepared.reports.iter().zip(&prepared.submission.recipients) {
                out.recipients += 1;
                if report.content == "shared" {
                    out.generated += 1;
                    let i: usize = rcpt.address[1..rcpt.address.find('@').unwrap()]
                        .parse()
                        .unwrap();
                    let want = format!(
                        "Offer s{} {}",
                        i % 4,
                        report.variant.as_deref().unwrap_or("-")
                    );
                    if subject != want {
                        out.mismatched += 1;
                    }
                }
            }
        }
    }
    out.took = started.elapsed();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_burst_is_generated_per_variant_and_segment_not_per_recipient() {
    let (model, addr) = fake_model(Duration::from_secs(1), 16, &[b"h2", b"http/1.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, metrics) = sidecar(
        dir.path(),
        &format!("https://localhost:{}/v1", addr.port()),
        "",
        "",
    );
    let n = 100_000;
    let result = burst(&sidecar, n, 100, 32).await;
    let calls = model.calls.load(Ordering::SeqCst);
    eprintln!(
        "burst: {} recipients in {:?}, {} generated, {calls} model calls, {} connections, max {} in flight",
        result.recipients,
        result.took,
        result.generated,
        model.connections.load(Ordering::SeqCst),
        model.max_in_flight.load(Ordering::SeqCst)
    );
    assert_eq!(result.recipients, n);
    assert!(
        result.generated * 100 >= n * 99,
        "{} of {n} got generated text",
        result.generated
    );
    assert_eq!(
        result.mismatched, 0,
        "every recipient renders its own key's text"
    );
    // 4 segments x (3 variants + holdout) = 16 keys, one call each.
    assert!(calls <= 50, "{calls} model calls");
    assert!(calls >= 16, "{calls} model calls: every key is generated");
    assert_eq!(
        model.refused.load(Ordering::SeqCst),
        0,
        "never over 16 at once"
    );
    assert_eq!(model.leaked_fields.load(Ordering::SeqCst), 0);
    assert!(
        model.http2_requests.load(Ordering::SeqCst) > 0,
        "ALPN chose h2"
    );
    assert!(model.connections.load(Ordering::SeqCst) <= 16);
    let text = metrics.render(&Spool::open(&dir.path().join("spool2")).unwrap(), &[]);
    let tokens = text
        .lines()
        .find(|l| l.starts_with("tern_sidecar_model_tokens_total{kind=\"completion\"}"))
        .expect("token metric");
    assert!(tokens.ends_with(&format!(" {}", 12 * calls)), "{tokens}");
    assert!(text.contains("tern_sidecar_model_request_seconds_count"));
    assert!(text.contains("tern_sidecar_generations_total{result=\"model\",scope=\"coarse\"}"));

    // A second wave finds every key generated: no new call, no waiting.
    let again = burst(&sidecar, 2_000, 100, 32).await;
    assert_eq!(model.calls.load(Ordering::SeqCst), calls);
    assert_eq!(again.generated, again.recipients);
}

/// A loopback HTTP CONNECT proxy; counts the tunnels it opened.
async fn connect_proxy() -> (Arc<AtomicUsize>, SocketAddr) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tunnels = Arc::new(AtomicUsize::new(0));
    let counted = tunnels.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let target = head
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or_default()
                    .replace("localhost", "127.0.0.1");
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (tunnels, addr)
}

fn reports(prepared: &[tern::message::Prepared]) -> Vec<(String, Option<String>)> {
    prepared
        .iter()
        .flat_map(|p| &p.reports)
        .map(|r| (r.content.to_owned(), r.reason.map(str::to_owned)))
        .collect()
}

#[tokio::test]
async fn http1_connections_are_kept_alive_through_a_connect_proxy_and_failures_retried_in_time() {
    let (model, addr) = fake_model(Duration::from_millis(10), 16, &[b"http/1.1"]).await;
    let (tunnels, proxy) = connect_proxy().await;
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, metrics) = sidecar(
        dir.path(),
        &format!("https://localhost:{}/v1", addr.port()),
        &format!("proxy = \"http://{proxy}\"\nretries = 2"),
        "model_fields = [\"first_name\"]\n",
    );
    // One recipient per message, one after the other: each its own call on one connection.
    for i in 0..5 {
        let out = sidecar.apply(submission(i, 1, |_| Map::new())).await;
        assert_eq!(reports(&out), [("model".to_owned(), None)]);
    }
    assert_eq!(model.calls.load(Ordering::SeqCst), 5);
    assert_eq!(
        model.http2_requests.load(Ordering::SeqCst),
        0,
        "http/1.1 only"
    );
    assert_eq!(model.connections.load(Ordering::SeqCst), 1, "kept alive");
    assert_eq!(tunnels.load(Ordering::SeqCst), 1, "through the proxy");
    assert_eq!(
        model.leaked_fields.load(Ordering::SeqCst),
        5,
        "first_name is sent"
    );

    // Two 503s, then an answer: retried within the 3 s deadline.
    model.fail_next.store(2, Ordering::SeqCst);
    let out = sidecar.apply(submission(10, 1, |_| Map::new())).await;
    assert_eq!(reports(&out), [("model".to_owned(), None)]);
    assert_eq!(model.calls.load(Ordering::SeqCst), 8);
    // Three 503s are more than retries = 2: the defaults, with the reason.
    model.fail_next.store(3, Ordering::SeqCst);
    let out = sidecar.apply(submission(11, 1, |_| Map::new())).await;
    assert_eq!(
        reports(&out),
        [("default".to_owned(), Some("status".to_owned()))]
    );
    assert_eq!(model.calls.load(Ordering::SeqCst), 11);
    let text = metrics.render(&Spool::open(&dir.path().join("spool2")).unwrap(), &[]);
    assert!(
        text.contains("tern_sidecar_model_requests_total{outcome=\"status\"} 5"),
        "{text}"
    );
    assert!(text.contains("tern_sidecar_model_requests_total{outcome=\"ok\"} 6"));
}

#[tokio::test]
async fn retries_never_outlast_the_deadline() {
    // Every answer is an immediate 503: attempts at 0, 100, 300 and 700 ms; the next would
    // start at 1,500 ms, past the 1 s deadline, so there is none, whatever `retries` says.
    let (model, addr) = fake_model(Duration::from_millis(600), 16, &[b"h2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, _) = sidecar(
        dir.path(),
        &format!("https://localhost:{}/v1", addr.port()),
        "retries = 10\ndeadline = \"1s\"",
        "model_fields = [\"first_name\"]\n",
    );
    model.fail_next.store(100, Ordering::SeqCst);
    let started = Instant::now();
    let out = sidecar.apply(submission(0, 1, |_| Map::new())).await;
    let took = started.elapsed();
    assert_eq!(reports(&out)[0].0, "default");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let calls = model.calls.load(Ordering::SeqCst);
    assert!((3..=4).contains(&calls), "{calls} calls");
}

#[tokio::test]
async fn per_recipient_generation_stays_within_its_budget_then_uses_the_shared_text() {
    let (model, addr) = fake_model(Duration::from_millis(10), 16, &[b"h2", b"http/1.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, _) = sidecar(
        dir.path(),
        &format!("https://localhost:{}/v1", addr.port()),
        "",
        "model_fields = [\"first_name\"]\nrecipient_calls_per_hour = 3\n",
    );
    let out = sidecar.apply(submission(0, 12, |_| Map::new())).await;
    let contents: Vec<String> = reports(&out).into_iter().map(|r| r.0).collect();
    let own = contents.iter().filter(|c| *c == "model").count();
    let shared = contents.iter().filter(|c| *c == "shared").count();
    assert_eq!((own, shared), (3, 9), "{contents:?}");
    // The model saw first_name in the 3 own calls only; the shared ones are per key.
    assert_eq!(model.leaked_fields.load(Ordering::SeqCst), 3);
    assert!(model.calls.load(Ordering::SeqCst) <= 3 + 16);
}

#[tokio::test]
async fn recipient_data_cannot_multiply_model_calls_past_max_segments() {
    let (model, addr) = fake_model(Duration::from_millis(10), 16, &[b"h2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (sidecar, _) = sidecar(
        dir.path(),
        &format!("https://localhost:{}/v1", addr.port()),
        "",
        "max_segments = 2\n",
    );
    // 1,000 recipients, each its own segment value (and one of 10 kB).
    let out = sidecar
        .apply(submission(0, 1000, |i| {
            let mut m = Map::new();
            let value = if i == 999 {
                "x".repeat(10_000)
            } else {
                format!("u{i}")
            };
            m.insert("segment".into(), value.into());
            m
        }))
        .await;
    let all = reports(&out);
    let limited = all
        .iter()
        .filter(|r| r.1.as_deref() == Some("segment_limit"))
        .count();
    let generated = all.iter().filter(|r| r.0 == "shared").count();
    assert_eq!(all.len(), 1000);
    assert_eq!(limited + generated, 1000, "{all:?}");
    assert_eq!(generated, 2, "the two segments admitted first");
    // Two segments, three variants and the holdout at most.
    assert!(model.calls.load(Ordering::SeqCst) <= 8);
}
