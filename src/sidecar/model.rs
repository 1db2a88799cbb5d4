//! The content model: an OpenAI-compatible chat-completions client that fills named slots.
//!
//! One request per call: the model is asked for a JSON object with one string per slot. The
//! transport is hyper-util's pooled keep-alive client over rustls (`https://`, HTTP/2 when
//! the server offers it by ALPN, else HTTP/1.1) or plain `http://`, optionally through an
//! HTTP CONNECT proxy (`proxy`). Around each call sit a concurrency limit
//! (`max_concurrency`), a request-rate limit (`rate_per_second`, GCRA), a circuit breaker
//! (`breaker_failures` consecutive failures refuse calls for `breaker_cooldown`, then one call
//! is let through) and a cache keyed by the SHA-256 of every input (model, temperature,
//! max_tokens, prompts, fields). Connection failures, 429 and 5xx are retried (`retries`)
//! only while the next attempt can still start before the caller's deadline.
//! Invariants: only the fields handed in are sent (the caller whitelists them); every failure
//! is a [`Failure`] with a stable reason code, never a panic or a hang past the deadline;
//! every HTTP attempt is counted in `tern_sidecar_model_requests_total` with its latency, and
//! the answer's `usage` in `tern_sidecar_model_tokens_total`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock as _, DefaultClock};
use governor::{Quota, RateLimiter};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant as Deadline;

use crate::config::ModelConfig;
use crate::telemetry::Metrics;

/// Generated slot texts, by slot name (unchecked: the guardrails run after).
pub type Slots = BTreeMap<String, String>;

/// Why no generated text was used; the reason code in logs, metrics and the API answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No `[sidecar.model]`.
    Disabled,
    /// The breaker is open.
    BreakerOpen,
    /// The deadline passed (waiting for a permit, a rate token or the answer).
    Timeout,
    /// Could not connect or the connection failed.
    Connect,
    /// A status other than 200.
    Status,
    /// The answer was not the JSON object of strings asked for.
    Malformed,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Disabled => "disabled",
            Failure::BreakerOpen => "breaker_open",
            Failure::Timeout => "timeout",
            Failure::Connect => "connect",
            Failure::Status => "status",
            Failure::Malformed => "malformed",
        }
    }
}

/// One slot the model is asked to fill.
#[derive(Debug, Clone)]
pub struct SlotRequest<'a> {
    pub name: &'a str,
    pub prompt: &'a str,
    pub max_chars: usize,
}

type Gcra = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    governor::middleware::NoOpMiddleware<<DefaultClock as governor::clock::Clock>::Instant>,
>;

type HttpClient = Client<HttpsConnector<Dial>, Full<Bytes>>;

pub struct Model {
    config: ModelConfig,
    api_key: Option<String>,
    permits: Semaphore,
    rate: Option<Gcra>,
    breaker: Mutex<Breaker>,
    cache: Mutex<HashMap<[u8; 32], Arc<Slots>>>,
    client: HttpClient,
    /// `base_url` + `/chat/completions`.
    uri: Uri,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Breaker {
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Model,
    Cache,
}

const SYSTEM_PROMPT: &str = "You write short marketing copy for e-mail. Answer with one JSON \
object whose keys are exactly the slot names given and whose values are plain text: no HTML, \
no URLs, no e-mail addresses, no line breaks. Respect each slot's max_chars.";

/// The first wait before a retry (doubled each time).
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// TCP to the model's host, or to the proxy and through it by CONNECT.
#[derive(Clone)]
enum Dial {
    Direct(HttpConnector),
    Proxy(Tunnel<HttpConnector>),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Dial {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        match self {
            Dial::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Dial::Proxy(t) => t.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Dial::Direct(c) => {
                let f = c.call(dst);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Dial::Proxy(t) => {
                let f = t.call(dst);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
        }
    }
}

/// The rustls client configuration: the public web PKI roots plus `ca_file`.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        // A root webpki cannot use is skipped; the others still count.
        let _ = roots.add(cert.clone());
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("sidecar.model.ca_file: cannot read {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("sidecar.model.ca_file: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("sidecar.model.ca_file: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "sidecar.model.ca_file: no PEM certificate in {}",
                path.display()
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("sidecar.model: TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Model {
    /// The API key is read from `api_key_env` now (a missing variable is an error naming it);
    /// `ca_file` is read now. Needs no runtime (connections are made on the first call).
    pub fn new(config: ModelConfig, metrics: Arc<Metrics>) -> Result<Model, String> {
        let api_key = match &config.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                format!("sidecar.model.api_key_env: environment variable {var} is not set")
            })?),
            None => None,
        };
        let uri: Uri = format!("{}/chat/completions", config.base_url)
            .parse()
            .map_err(|e| format!("sidecar.model.base_url: {e}"))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(h)) if !h.is_empty() => {}
            _ => {
                return Err(
                    "sidecar.model.base_url: expected an http:// or https:// URL with a host"
                        .to_owned(),
                )
            }
        }
        let mut http = HttpConnector::new();
        // https:// URIs pass through it to the TLS layer.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let dial = match &config.proxy {
            None => Dial::Direct(http),
            Some(proxy) => {
                let proxy: Uri = proxy
                    .parse()
                    .map_err(|e| format!("sidecar.model.proxy: {e}"))?;
                Dial::Proxy(Tunnel::new(proxy, http))
            }
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(config.ca_file.as_deref())?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(dial);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(config.max_concurrency)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        let rate = config.rate_per_second.map(|per_second| {
            let burst =
                NonZeroU32::new(per_second.ceil().max(1.0) as u32).unwrap_or(NonZeroU32::MIN);
            let quota = Quota::with_period(Duration::from_secs_f64(1.0 / per_second))
                .expect("rate_per_second is positive and bounded")
                .allow_burst(burst);
            RateLimiter::direct(quota)
        });
        Ok(Model {
            api_key,
            permits: Semaphore::new(config.max_concurrency),
            rate,
            breaker: Mutex::new(Breaker::default()),
            cache: Mutex::new(HashMap::new()),
            client,
            uri,
            metrics,
            config,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Fills `slots` for `fields` by `deadline` (a dropped future releases its permit and
    /// counts as nothing).
    pub async fn generate(
        &self,
        slots: &[SlotRequest<'_>],
        fields: &BTreeMap<String, Value>,
        deadline: Deadline,
    ) -> Result<(Arc<Slots>, Source), Failure> {
        let user = json!({
            "slots": slots.iter().map(|s| (s.name.to_owned(), json!({
                "instruction": s.prompt, "max_chars": s.max_chars,
            }))).collect::<serde_json::Map<_, _>>(),
            "recipient": fields,
        })
        .to_string();
        let key = self.cache_key(&user);
        if let Some(hit) = self.cache.lock().expect("cache lock").get(&key) {
            return Ok((hit.clone(), Source::Cache));
        }
        self.breaker_allows()?;
        let _permit = tokio::time::timeout_at(deadline, self.permits.acquire())
            .await
            .map_err(|_| Failure::Timeout)?
            .map_err(|_| Failure::Timeout)?;
        let result = self.call_with_retries(&user, slots, deadline).await;
        self.breaker_record(result.is_ok());
        let slots = Arc::new(result?);
        if self.config.cache_entries > 0 {
            let mut cache = self.cache.lock().expect("cache lock");
            // Simple bound: a full cache starts over (campaign inputs repeat within a send).
            if cache.len() >= self.config.cache_entries {
                cache.clear();
            }
            cache.insert(key, slots.clone());
        }
        Ok((slots, Source::Model))
    }

    /// Waits for a rate token, but never past `deadline`.
    async fn rate_token(&self, deadline: Deadline) -> Result<(), Failure> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        loop {
            let wait = match rate.check() {
                Ok(()) => return Ok(()),
                Err(not_until) => not_until.wait_time_from(DefaultClock::default().now()),
            };
            if Deadline::now() + wait >= deadline {
                return Err(Failure::Timeout);
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Attempts until one succeeds, fails for good, or the next could not start in time.
    async fn call_with_retries(
        &self,
        user: &str,
        slots: &[SlotRequest<'_>],
        deadline: Deadline,
    ) -> Result<Slots, Failure> {
        let mut backoff = RETRY_BACKOFF;
        let mut attempt = 0;
        loop {
            self.rate_token(deadline).await?;
            let started = Instant::now();
            let result = tokio::time::timeout_at(deadline, self.call(user, slots))
                .await
                .unwrap_or(Err(Attempt::Failed(Failure::Timeout)));
            let outcome = match &result {
                Ok(_) => "ok",
                Err(Attempt::Failed(f) | Attempt::Retry(f)) => f.as_str(),
            };
            self.metrics
                .sidecar_model_request(outcome, started.elapsed());
            match result {
                Ok(slots) => return Ok(slots),
                Err(Attempt::Failed(f)) => return Err(f),
                Err(Attempt::Retry(f)) => {
                    attempt += 1;
                    if attempt > self.config.retries || Deadline::now() + backoff >= deadline {
                        return Err(f);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }

    fn cache_key(&self, user: &str) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for part in [
            self.config.model.as_bytes(),
            &self.config.temperature.to_le_bytes(),
            &self.config.max_tokens.to_le_bytes(),
            SYSTEM_PROMPT.as_bytes(),
            user.as_bytes(),
        ] {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }

    fn breaker_allows(&self) -> Result<(), Failure> {
        let breaker = self.breaker.lock().expect("breaker lock");
        match breaker.open_until {
            Some(until) if Instant::now() < until => Err(Failure::BreakerOpen),
            _ => Ok(()),
        }
    }

    /// A success closes the breaker; the `breaker_failures`-th failure in a row (or any
    /// failure of the trial call after a cooldown) opens it.
    fn breaker_record(&self, ok: bool) {
        let mut breaker = self.breaker.lock().expect("breaker lock");
        if ok {
            *breaker = Breaker::default();
            return;
        }
        breaker.consecutive_failures = breaker.consecutive_failures.saturating_add(1);
        if breaker.consecutive_failures >= self.config.breaker_failures {
            breaker.open_until = Some(Instant::now() + self.config.breaker_cooldown);
        }
    }

    /// One HTTP request on a pooled connection.
    async fn call(&self, user: &str, slots: &[SlotRequest<'_>]) -> Result<Slots, Attempt> {
        let body = json!({
            "model": self.config.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user},
            ],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
            "response_format": {"type": "json_object"},
        })
        .to_string();
        let mut request =
            hyper::Request::post(self.uri.clone()).header("content-type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| Attempt::Failed(Failure::Connect))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|_| Attempt::Retry(Failure::Connect))?;
        let status = response.status();
        if status != hyper::StatusCode::OK {
            let retry = status == hyper::StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            return Err(if retry {
                Attempt::Retry(Failure::Status)
            } else {
                Attempt::Failed(Failure::Status)
            });
        }
        // Answers beyond 1 MiB are not chat completions of a few slots.
        let body = http_body_util::Limited::new(response.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|_| Attempt::Failed(Failure::Malformed))?
            .to_bytes();
        let (slots, usage) = parse_answer(&body, slots).map_err(Attempt::Failed)?;
        if let Some((prompt, completion)) = usage {
            self.metrics.sidecar_model_tokens(prompt, completion);
        }
        Ok(slots)
    }
}

/// How one attempt failed: for good, or worth another attempt within the deadline.
enum Attempt {
    Failed(Failure),
    Retry(Failure),
}

/// `choices[0].message.content`, itself a JSON object with a string per slot (missing slots
/// are left out: they render their defaults), and the `usage` token counts (prompt,
/// completion) when the server reports them.
type Usage = Option<(u64, u64)>;

fn parse_answer(body: &[u8], slots: &[SlotRequest<'_>]) -> Result<(Slots, Usage), Failure> {
    let answer: Value = serde_json::from_slice(body).map_err(|_| Failure::Malformed)?;
    let usage = answer.get("usage").map(|u| {
        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        (n("prompt_tokens"), n("completion_tokens"))
    });
    let content = answer
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .ok_or(Failure::Malformed)?;
    // Some servers wrap JSON in a Markdown fence despite response_format.
    let content = content
        .trim()
        .trim_start_matches("```json")
        .trim_start_matches("```")
        .trim_end_matches("```");
    let object: serde_json::Map<String, Value> =
        serde_json::from_str(content).map_err(|_| Failure::Malformed)?;
    let filled: Slots = slots
        .iter()
        .filter_map(|s| {
            let text = object.get(s.name)?.as_str()?;
            Some((s.name.to_owned(), text.to_owned()))
        })
        .collect();
    if filled.is_empty() {
        return Err(Failure::Malformed);
    }
    Ok((filled, usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let slots = [SlotRequest {
            name: "subject",
            prompt: "p",
            max_chars: 10,
        }];
        let ok = br#"{"choices":[{"message":{"content":"```json\n{\"subject\":\"Hi\",\"x\":\"y\"}\n```"}}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
        let (filled, usage) = parse_answer(ok, &slots).unwrap();
        assert_eq!(filled["subject"], "Hi");
        assert_eq!(usage, Some((12, 3)));
        let no_usage = br#"{"choices":[{"message":{"content":"{\"subject\":\"Yo\"}"}}]}"#;
        assert_eq!(parse_answer(no_usage, &slots).unwrap().1, None);
        assert_eq!(parse_answer(b"{", &slots), Err(Failure::Malformed));
        let empty = br#"{"choices":[{"message":{"content":"{}"}}]}"#;
        assert_eq!(parse_answer(empty, &slots), Err(Failure::Malformed));
    }
}
