//! The content model: an OpenAI-compatible chat-completions client that fills named slots.
//!
//! One request per (campaign, variant, whitelisted recipient fields): the model is asked for
//! a JSON object with one string per slot. Around the HTTP call sit a concurrency limit
//! (`max_concurrency`), a circuit breaker (`breaker_failures` consecutive failures refuse
//! calls for `breaker_cooldown`, then one call is let through) and a cache keyed by the
//! SHA-256 of every input (model, temperature, max_tokens, prompts, fields). The caller holds
//! the deadline; this module never retries.
//! Invariants: only the fields handed in are sent (the caller whitelists them); every failure
//! is a [`Failure`] with a stable reason code, never a panic or a hang past the caller's
//! deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::config::ModelConfig;

/// Generated slot texts, by slot name (unchecked: the guardrails run after).
pub type Slots = BTreeMap<String, String>;

/// Why no generated text was used; the reason code in logs, metrics and the API answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No `[sidecar.model]`.
    Disabled,
    /// The breaker is open.
    BreakerOpen,
    /// The deadline passed (waiting for a permit or for the answer).
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

pub struct Model {
    config: ModelConfig,
    api_key: Option<String>,
    permits: Semaphore,
    breaker: Mutex<Breaker>,
    cache: Mutex<HashMap<[u8; 32], Arc<Slots>>>,
    /// `Host` header and socket address of `base_url`, and the request path.
    host: String,
    path: String,
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

impl Model {
    /// The API key is read from `api_key_env` now (a missing variable is an error naming it).
    pub fn new(config: ModelConfig) -> Result<Model, String> {
        let api_key = match &config.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                format!("sidecar.model.api_key_env: environment variable {var} is not set")
            })?),
            None => None,
        };
        let rest = config
            .base_url
            .strip_prefix("http://")
            .ok_or("sidecar.model.base_url: only http:// is supported")?;
        let (host, base_path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err("sidecar.model.base_url: no host".to_owned());
        }
        Ok(Model {
            api_key,
            permits: Semaphore::new(config.max_concurrency),
            breaker: Mutex::new(Breaker::default()),
            cache: Mutex::new(HashMap::new()),
            host: host.to_owned(),
            path: format!("{base_path}/chat/completions"),
            config,
        })
    }

    /// Fills `slots` for `fields`; the caller bounds the wait with its deadline (a dropped
    /// future releases its permit and counts as nothing).
    pub async fn generate(
        &self,
        slots: &[SlotRequest<'_>],
        fields: &BTreeMap<String, Value>,
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
        let _permit = self.permits.acquire().await.map_err(|_| Failure::Timeout)?;
        let result = self.call(&user, slots).await;
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

    async fn call(&self, user: &str, slots: &[SlotRequest<'_>]) -> Result<Slots, Failure> {
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
        let stream = tokio::time::timeout(
            self.config.connect_timeout,
            TcpStream::connect(self.host.as_str()),
        )
        .await
        .map_err(|_| Failure::Timeout)?
        .map_err(|_| Failure::Connect)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|_| Failure::Connect)?;
        // The connection task ends with the request (Connection: close) or when dropped.
        let conn = tokio::spawn(conn);
        let mut request = hyper::Request::post(self.path.as_str())
            .header("host", self.host.as_str())
            .header("content-type", "application/json")
            .header("connection", "close");
        if let Some(key) = &self.api_key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| Failure::Connect)?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|_| Failure::Connect)?;
            if response.status() != hyper::StatusCode::OK {
                return Err(Failure::Status);
            }
            // Answers beyond 1 MiB are not chat completions of a few slots.
            let body = http_body_util::Limited::new(response.into_body(), 1 << 20)
                .collect()
                .await
                .map_err(|_| Failure::Malformed)?
                .to_bytes();
            parse_answer(&body, slots)
        }
        .await;
        conn.abort();
        result
    }
}

/// `choices[0].message.content`, itself a JSON object with a string per slot (missing slots
/// are left out: they render their defaults).
fn parse_answer(body: &[u8], slots: &[SlotRequest<'_>]) -> Result<Slots, Failure> {
    let answer: Value = serde_json::from_slice(body).map_err(|_| Failure::Malformed)?;
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
    Ok(filled)
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
        let ok = br#"{"choices":[{"message":{"content":"```json\n{\"subject\":\"Hi\",\"x\":\"y\"}\n```"}}]}"#;
        assert_eq!(parse_answer(ok, &slots).unwrap()["subject"], "Hi");
        assert_eq!(parse_answer(b"{", &slots), Err(Failure::Malformed));
        let empty = br#"{"choices":[{"message":{"content":"{}"}}]}"#;
        assert_eq!(parse_answer(empty, &slots), Err(Failure::Malformed));
    }
}
