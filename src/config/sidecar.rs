//! `[sidecar]`: the pre-enqueue stage's model client, tracking, bandit and campaigns.
//!
//! Templates are compiled here (minijinja syntax errors are config errors with their key
//! path), so a message never meets a template that cannot render for syntax reasons.
//! Every key has a default except a campaign's `name` and `text`; with no `[sidecar]` section
//! the stage still strips `X-Tern-*` control headers but knows no campaign.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use toml::{Table, Value};

use super::path;
use super::reader::{count, duration, nonzero, string, TableReader};

/// A duration as the config reads it back ("90s", "250ms").
fn duration_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    if d.subsec_millis() == 0 {
        s.serialize_str(&format!("{}s", d.as_secs()))
    } else {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

/// One campaign from a JSON document (`/api/v1/campaigns`), through exactly the checks of a
/// `[[sidecar.campaigns]]` table: the same compile function, every error with its path
/// relative to the campaign (`variants[1].subject: ...`), unknown keys refused. `tracking`:
/// whether `[sidecar.tracking]` is configured (a campaign with `tracking = true` needs it).
pub fn compile_campaign_json(
    document: &serde_json::Value,
    tracking: bool,
) -> Result<CampaignConfig, Vec<String>> {
    let mut errors = Vec::new();
    let table = match json_to_toml(document, "", &mut errors) {
        Some(Value::Table(table)) => table,
        Some(_) => return Err(vec!["the campaign must be a JSON object".to_owned()]),
        None => Table::new(),
    };
    let wants_tracking = document.get("tracking") == Some(&serde_json::Value::Bool(true));
    let compiled = super::reader::compile(table, |r| {
        if wants_tracking && !tracking {
            r.error(
                "tracking",
                "true needs [sidecar.tracking] (base_url, secret_file) in the config",
            );
        }
        compile_campaign(r)
    });
    match compiled {
        Ok(Some(c)) if errors.is_empty() => Ok(c),
        Ok(_) => Err(errors),
        Err(mut more) => {
            errors.append(&mut more);
            Err(errors)
        }
    }
}

/// JSON as the TOML value the reader walks; a null (TOML has none) or a number TOML cannot
/// hold is an error at its path, and the key reads as absent.
fn json_to_toml(v: &serde_json::Value, path: &str, errors: &mut Vec<String>) -> Option<Value> {
    use serde_json::Value as J;
    let at = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    Some(match v {
        J::Null => {
            errors.push(format!(
                "{}: null is not a value (leave the key out for its default)",
                if path.is_empty() { "campaign" } else { path }
            ));
            return None;
        }
        J::Bool(b) => Value::Boolean(*b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::Integer(i),
            (None, Some(f)) if n.as_u64().is_none() => Value::Float(f),
            _ => {
                errors.push(format!("{path}: number too large"));
                return None;
            }
        },
        J::String(s) => Value::String(s.clone()),
        J::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| json_to_toml(item, &format!("{path}[{i}]"), errors))
                .collect(),
        ),
        J::Object(map) => Value::Table(
            map.iter()
                .filter_map(|(k, item)| Some((k.clone(), json_to_toml(item, &at(k), errors)?)))
                .collect(),
        ),
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct SidecarConfig {
    /// `None`: no `[sidecar.model]`, slots always take their defaults.
    pub model: Option<ModelConfig>,
    /// `None`: no `[sidecar.tracking]`; a campaign with `tracking = true` is a config error.
    pub tracking: Option<TrackingConfig>,
    pub bandit: BanditConfig,
    /// Names unique.
    pub campaigns: Vec<CampaignConfig>,
    /// The right-most field of every campaign message's `Feedback-ID` (Gmail's SenderId: 5 to
    /// 15 characters, the same across the mail stream). Default [`DEFAULT_FEEDBACK_SENDER_ID`].
    pub feedback_sender_id: String,
}

/// `sidecar.feedback_sender_id` when unset.
pub const DEFAULT_FEEDBACK_SENDER_ID: &str = "tern-mta";

impl Default for SidecarConfig {
    fn default() -> Self {
        SidecarConfig {
            model: None,
            tracking: None,
            bandit: BanditConfig::default(),
            campaigns: Vec::new(),
            feedback_sender_id: DEFAULT_FEEDBACK_SENDER_ID.to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// OpenAI-compatible API root, e.g. `https://api.example.com/v1` or
    /// `http://127.0.0.1:8080/v1`; `/chat/completions` is appended.
    pub base_url: String,
    /// `http://host:port` of an HTTP CONNECT proxy every model connection goes through.
    pub proxy: Option<String>,
    /// Extra CA certificates (PEM) trusted for an `https://` base_url, beside the public roots.
    pub ca_file: Option<PathBuf>,
    /// Requests started per second at most (GCRA; bursts up to one second's worth). Default
    /// none (only `max_concurrency` limits).
    pub rate_per_second: Option<f64>,
    /// Further attempts after a connection failure, a 429 or a 5xx, each only if it can start
    /// before the call's deadline. Default 2.
    pub retries: u32,
    /// How long a shared (per campaign, variant, segment) generation may take, retries
    /// included; messages wait only their own `deadline` for it. Default 30s.
    pub generate_timeout: Duration,
    pub model: String,
    /// Name of the environment variable holding the API key (sent as a bearer token).
    pub api_key_env: Option<String>,
    /// Default 1s.
    pub connect_timeout: Duration,
    /// The longest a message waits for generated text before its defaults render. Default 3s.
    pub deadline: Duration,
    /// Requests in flight at once. Default 8.
    pub max_concurrency: usize,
    /// Consecutive failures that open the circuit breaker. Default 5.
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before one is tried again. Default 30s.
    pub breaker_cooldown: Duration,
    /// Cached answers kept (keyed by the hash of every input). Default 10000; 0 = no cache.
    pub cache_entries: usize,
    /// Default 0.7.
    pub temperature: f64,
    /// Default 300.
    pub max_tokens: u32,
}

impl ModelConfig {
    /// A configuration with every optional key at its default (tests, examples).
    pub fn new(base_url: &str, model: &str) -> ModelConfig {
        ModelConfig {
            base_url: base_url.trim_end_matches('/').to_owned(),
            model: model.to_owned(),
            proxy: None,
            ca_file: None,
            rate_per_second: None,
            retries: 2,
            generate_timeout: Duration::from_secs(30),
            api_key_env: None,
            connect_timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(3),
            max_concurrency: 8,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            cache_entries: 10_000,
            temperature: 0.7,
            max_tokens: 300,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingConfig {
    /// Public base URL of the admin listener's `/t/` routes, e.g. `https://t.example.com`.
    pub base_url: String,
    /// File holding the token-signing key; created (random, mode 0600) at first start.
    pub secret_file: PathBuf,
    /// How long after it was issued (the message rendered) a token is honoured; an older one
    /// is a 404 that records nothing. Default 90 days.
    pub max_age: Duration,
    /// Opens and clicks remembered so a replayed token counts once; when full, those of the
    /// oldest issue hour are forgotten first (counted). Default 1,000,000 (about 32 MB at
    /// most).
    pub replay_entries: usize,
}

impl TrackingConfig {
    pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(90 * 86_400);
    pub const DEFAULT_REPLAY_ENTRIES: usize = 1_000_000;
}

#[derive(Debug, Clone, PartialEq)]
pub struct BanditConfig {
    /// Share of sends given a uniformly random variant. Default 0.1.
    pub exploration: f64,
    /// Share of sends that get the campaign's own content (variant `holdout`). Default 0.05.
    pub holdout: f64,
    /// How often engagement is folded into the posteriors. Default 1h.
    pub batch_interval: Duration,
}

impl Default for BanditConfig {
    fn default() -> Self {
        BanditConfig {
            exploration: 0.1,
            holdout: 0.05,
            batch_interval: Duration::from_secs(3600),
        }
    }
}

/// Serialises to the same keys the config file and `/api/v1/campaigns` take, so what
/// `GET /api/v1/campaigns/{name}` shows can be sent back (PUT) as it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CampaignConfig {
    pub name: String,
    /// minijinja template of the Subject. Default `"{{ slots.subject }}"`.
    pub subject: String,
    /// minijinja template of the text/plain part.
    pub text: String,
    /// minijinja template of the text/html part (auto-escaped). Optional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    pub slots: Vec<SlotConfig>,
    pub variants: Vec<VariantConfig>,
    /// Recipient data fields the model may see. Default none. Non-empty asks for
    /// per-recipient generation (within `recipient_calls_per_hour`); empty: the slots are
    /// generated once per (variant, segment) and shared.
    pub model_fields: Vec<String>,
    /// The recipient data field whose value is the coarse generation key (the segment).
    /// Default none: one generation per variant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment_field: Option<String>,
    /// Segment values generated at start, before any message needs them. Default none.
    pub segments: Vec<String>,
    /// Distinct segment values generated at most; recipients of further values get the
    /// defaults. Default 64.
    pub max_segments: usize,
    /// Per-recipient model calls per hour at most (with `model_fields`); beyond it the coarse
    /// text is used. Default 10000.
    pub recipient_calls_per_hour: u32,
    /// Rewrite links and add an open pixel. Default false.
    pub tracking: bool,
    /// One-click unsubscribe headers on every message (list: the campaign's name unless the
    /// message names one). Default false.
    pub unsubscribe: bool,
    /// Window for `X-Tern-Send-Time: optimize`. Default 24h.
    #[serde(serialize_with = "duration_text")]
    pub send_window: Duration,
    /// Local hours no send should land in, `[start, end)`, e.g. `[22, 7]`. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<(u8, u8)>,
    /// This campaign is the win-back campaign of a sender identity: the From address
    /// (`news@example.com`, every From of that mailbox) or a From domain (`example.com`),
    /// lowercased. Mail from that identity to a dormant recipient is rendered with this
    /// campaign instead (see `crate::sendtime::lifecycle`). Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub winback_for: Option<String>,
    /// How this campaign picks variants (`[sidecar.campaigns.bandit]`, `bandit` over the API);
    /// what it leaves unset comes from `[sidecar.bandit]`. Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandit: Option<CampaignBandit>,
}

/// How variants are picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Bernoulli Thompson sampling (with the exploration share).
    #[default]
    Thompson,
    /// An even split over the variants, never exploiting (a classic A/B test).
    Fixed,
}

/// A campaign's own bandit settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CampaignBandit {
    /// Default `thompson`.
    pub strategy: Strategy,
    /// Share of sends given a uniformly random variant. Default `[sidecar.bandit] exploration`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exploration: Option<f64>,
    /// Share of sends that get the campaign's own content (variant `holdout`). Default
    /// `[sidecar.bandit] holdout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holdout: Option<f64>,
    /// Applied sends every variant has before Thompson sampling exploits; until then the
    /// split is even. Default 0, at most [`MAX_MIN_SENDS`].
    pub min_sends: u64,
}

/// The largest `min_sends`.
pub const MAX_MIN_SENDS: u64 = 10_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotConfig {
    pub name: String,
    /// What the model is asked to write; no prompt = the slot is never generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Rendered whenever the model is off, fails or is late.
    pub default: String,
    /// Characters kept of generated text. Default 120.
    pub max_chars: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VariantConfig {
    pub id: String,
    /// Replaces the campaign's `subject` template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Replaces the campaign's `text` template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

pub(super) fn compile_sidecar(r: &mut TableReader<'_>) -> SidecarConfig {
    let model = r.optional_section("model", compile_model).flatten();
    let tracking = r.optional_section("tracking", compile_tracking).flatten();
    let bandit = r.section("bandit", compile_bandit);
    let feedback_sender_id = r
        .get("feedback_sender_id", |v| match string(v)? {
            s if crate::feedback_id::is_sender_id(s) => Ok(s.to_owned()),
            s => Err(format!(
                "{s:?}: 5 to 15 letters, digits, '-', '_' or '.' (Gmail's Feedback-ID SenderId)"
            )),
        })
        .unwrap_or_else(|| DEFAULT_FEEDBACK_SENDER_ID.to_owned());
    let campaigns: Vec<CampaignConfig> = r
        .tables("campaigns", compile_campaign)
        .into_iter()
        .flatten()
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut identities = std::collections::HashMap::new();
    for c in &campaigns {
        if let Some(identity) = &c.winback_for {
            if let Some(other) = identities.insert(identity.as_str(), c.name.as_str()) {
                r.error(
                    "campaigns",
                    format!(
                        "campaigns {other:?} and {:?} are both the win-back campaign of {identity:?}",
                        c.name
                    ),
                );
            }
        }
        if !seen.insert(c.name.as_str()) {
            r.error(
                "campaigns",
                format!("campaign name {:?} used twice", c.name),
            );
        }
        if c.tracking && tracking.is_none() {
            r.error(
                "tracking",
                format!(
                    "campaign {:?} has tracking = true: [sidecar.tracking] (base_url, secret_file) is required",
                    c.name
                ),
            );
        }
    }
    SidecarConfig {
        model,
        tracking,
        bandit,
        campaigns,
        feedback_sender_id,
    }
}

fn compile_model(r: &mut TableReader<'_>) -> Option<ModelConfig> {
    let base_url = r.require("base_url", |v| {
        let u = string(v)?;
        http_url(u, &["http", "https"])?;
        Ok(u.trim_end_matches('/').to_owned())
    });
    let proxy = r.get("proxy", |v| {
        let u = string(v)?;
        http_url(u, &["http"])?;
        Ok(u.trim_end_matches('/').to_owned())
    });
    let ca_file = r.get("ca_file", path);
    if ca_file.is_some() && base_url.as_ref().is_some_and(|u| u.starts_with("http://")) {
        r.error("ca_file", "only for an https:// base_url");
    }
    let rate_per_second = r.get("rate_per_second", |v| {
        match v.as_float().or(v.as_integer().map(|i| i as f64)) {
            Some(x) if x > 0.0 && x <= 1_000_000.0 => Ok(x),
            _ => Err("must be a number above 0 (at most 1000000)".to_owned()),
        }
    });
    let retries = r
        .get("retries", |v| {
            count(v).and_then(|n| {
                if n <= 10 {
                    Ok(n as u32)
                } else {
                    Err("at most 10".to_owned())
                }
            })
        })
        .unwrap_or(2);
    let generate_timeout = r
        .get("generate_timeout", |v| duration(v).and_then(nonzero))
        .unwrap_or(Duration::from_secs(30));
    let model = r.require("model", |v| non_empty(v).map(str::to_owned));
    let api_key_env = r.get("api_key_env", |v| non_empty(v).map(str::to_owned));
    let connect_timeout = r
        .get("connect_timeout", |v| duration(v).and_then(nonzero))
        .unwrap_or(Duration::from_secs(1));
    let deadline = r
        .get("deadline", |v| duration(v).and_then(nonzero))
        .unwrap_or(Duration::from_secs(3));
    let max_concurrency = r
        .get("max_concurrency", |v| count(v).and_then(nonzero))
        .unwrap_or(8);
    let breaker_failures = r
        .get("breaker_failures", |v| {
            count(v)
                .and_then(nonzero)
                .map(|n| n.min(u32::MAX as usize) as u32)
        })
        .unwrap_or(5);
    let breaker_cooldown = r
        .get("breaker_cooldown", duration)
        .unwrap_or(Duration::from_secs(30));
    let cache_entries = r.get("cache_entries", count).unwrap_or(10_000);
    let temperature = r
        .get("temperature", |v| {
            match v.as_float().or(v.as_integer().map(|i| i as f64)) {
                Some(t) if (0.0..=2.0).contains(&t) => Ok(t),
                _ => Err("must be a number from 0 to 2".to_owned()),
            }
        })
        .unwrap_or(0.7);
    let max_tokens = r
        .get("max_tokens", |v| {
            count(v).and_then(nonzero).map(|n| n.min(100_000) as u32)
        })
        .unwrap_or(300);
    Some(ModelConfig {
        base_url: base_url?,
        model: model?,
        proxy,
        ca_file,
        rate_per_second,
        retries,
        generate_timeout,
        api_key_env,
        connect_timeout,
        deadline,
        max_concurrency,
        breaker_failures,
        breaker_cooldown,
        cache_entries,
        temperature,
        max_tokens,
    })
}

fn compile_tracking(r: &mut TableReader<'_>) -> Option<TrackingConfig> {
    let base_url = r.require("base_url", |v| match string(v)? {
        u if u.starts_with("http://") || u.starts_with("https://") => {
            Ok(u.trim_end_matches('/').to_owned())
        }
        u => Err(format!("{u:?}: expected an http:// or https:// URL")),
    });
    let secret_file = r.require("secret_file", path);
    let max_age = r
        .get("max_age", |v| duration(v).and_then(nonzero))
        .unwrap_or(TrackingConfig::DEFAULT_MAX_AGE);
    let replay_entries = r
        .get("replay_entries", |v| count(v).and_then(nonzero))
        .unwrap_or(TrackingConfig::DEFAULT_REPLAY_ENTRIES);
    Some(TrackingConfig {
        base_url: base_url?,
        secret_file: secret_file?,
        max_age,
        replay_entries,
    })
}

fn compile_bandit(r: &mut TableReader<'_>) -> BanditConfig {
    let d = BanditConfig::default();
    BanditConfig {
        exploration: r.get("exploration", share).unwrap_or(d.exploration),
        holdout: r.get("holdout", share).unwrap_or(d.holdout),
        batch_interval: r
            .get("batch_interval", |v| duration(v).and_then(nonzero))
            .unwrap_or(d.batch_interval),
    }
}

fn compile_campaign_bandit(r: &mut TableReader<'_>) -> CampaignBandit {
    CampaignBandit {
        strategy: r
            .get("strategy", |v| match string(v)? {
                "thompson" => Ok(Strategy::Thompson),
                "fixed" => Ok(Strategy::Fixed),
                other => Err(format!("{other:?}: expected \"thompson\" or \"fixed\"")),
            })
            .unwrap_or_default(),
        exploration: r.get("exploration", share),
        holdout: r.get("holdout", share),
        min_sends: r
            .get("min_sends", |v| match count(v)? as u64 {
                n if n <= MAX_MIN_SENDS => Ok(n),
                _ => Err(format!("at most {MAX_MIN_SENDS}")),
            })
            .unwrap_or(0),
    }
}

fn compile_campaign(r: &mut TableReader<'_>) -> Option<CampaignConfig> {
    let name = r.require("name", |v| match string(v)? {
        // The same rule a returned Feedback-ID's campaign field is read back with.
        n if crate::feedback_id::is_campaign_name(n) => Ok(n.to_owned()),
        n => Err(format!(
            "{n:?}: 1 to {} letters, digits, '-', '_' or '.'",
            crate::feedback_id::CAMPAIGN_MAX
        )),
    });
    let subject = r
        .get("subject", template)
        .unwrap_or_else(|| "{{ slots.subject }}".to_owned());
    let text = r.require("text", template);
    let html = r.get("html", template);
    let slots: Vec<SlotConfig> = r
        .tables("slots", compile_slot)
        .into_iter()
        .flatten()
        .collect();
    let variants: Vec<VariantConfig> = r
        .tables("variants", compile_variant)
        .into_iter()
        .flatten()
        .collect();
    let model_fields = r
        .list("model_fields", |v| non_empty(v).map(str::to_owned))
        .unwrap_or_default();
    let segment_field = r.get("segment_field", |v| non_empty(v).map(str::to_owned));
    let segments = r
        .list("segments", |v| string(v).map(str::to_owned))
        .unwrap_or_default();
    let max_segments = r
        .get("max_segments", |v| count(v).and_then(nonzero))
        .unwrap_or(64);
    if !segments.is_empty() && segment_field.is_none() {
        r.error(
            "segments",
            "needs segment_field (the data field they are values of)",
        );
    }
    if segments.len() > max_segments {
        r.error(
            "segments",
            format!(
                "{} values, more than max_segments ({max_segments})",
                segments.len()
            ),
        );
    }
    let recipient_calls_per_hour = r
        .get("recipient_calls_per_hour", |v| {
            count(v).map(|n| n.min(u32::MAX as usize) as u32)
        })
        .unwrap_or(10_000);
    let tracking = r.get("tracking", boolean).unwrap_or(false);
    let unsubscribe = r.get("unsubscribe", boolean).unwrap_or(false);
    let send_window = r
        .get("send_window", |v| duration(v).and_then(nonzero))
        .unwrap_or(Duration::from_secs(86_400));
    let quiet_hours = r.get("quiet_hours", |v| {
        let hours = v.as_array().filter(|a| a.len() == 2).and_then(|a| {
            let h = |x: &Value| x.as_integer().filter(|h| (0..24).contains(h));
            Some((h(&a[0])? as u8, h(&a[1])? as u8))
        });
        hours.ok_or_else(|| "expected [start, end], hours 0 to 23".to_owned())
    });
    let mut slot_names = std::collections::HashSet::new();
    for s in &slots {
        if !slot_names.insert(s.name.as_str()) {
            r.error("slots", format!("slot name {:?} used twice", s.name));
        }
    }
    let mut variant_ids = std::collections::HashSet::new();
    for v in &variants {
        if !variant_ids.insert(v.id.as_str()) || v.id == "holdout" {
            r.error(
                "variants",
                format!("variant id {:?} used twice (\"holdout\" is reserved)", v.id),
            );
        }
    }
    let winback_for = r.get("winback_for", sender_identity);
    let bandit = r.optional_section("bandit", compile_campaign_bandit);
    Some(CampaignConfig {
        winback_for,
        bandit,
        name: name?,
        subject,
        text: text?,
        html,
        slots,
        variants,
        model_fields,
        segment_field,
        segments,
        max_segments,
        recipient_calls_per_hour,
        tracking,
        unsubscribe,
        send_window,
        quiet_hours,
    })
}

/// A sender identity: a mailbox `local@domain` or a domain, lowercased.
fn sender_identity(v: &Value) -> Result<String, String> {
    let s = string(v)?.trim().to_ascii_lowercase();
    let domain = s.rsplit_once('@').map_or(
        s.as_str(),
        |(local, d)| {
            if local.is_empty() {
                ""
            } else {
                d
            }
        },
    );
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if domain.contains('.') && domain.split('.').all(label_ok) && !s.contains(char::is_whitespace) {
        Ok(s)
    } else {
        Err(format!(
            "{s:?}: expected a From address (news@example.com) or a From domain (example.com)"
        ))
    }
}

fn compile_slot(r: &mut TableReader<'_>) -> Option<SlotConfig> {
    let name = r.require("name", identifier);
    let prompt = r.get("prompt", |v| non_empty(v).map(str::to_owned));
    let default = r.require("default", |v| string(v).map(str::to_owned));
    let max_chars = r
        .get("max_chars", |v| count(v).and_then(nonzero))
        .unwrap_or(120);
    Some(SlotConfig {
        name: name?,
        prompt,
        default: default?,
        max_chars,
    })
}

fn compile_variant(r: &mut TableReader<'_>) -> Option<VariantConfig> {
    let id = r.require("id", identifier);
    let subject = r.get("subject", template);
    let text = r.get("text", template);
    Some(VariantConfig {
        id: id?,
        subject,
        text,
    })
}

/// `u` is an absolute URL with one of `schemes` and a host.
fn http_url(u: &str, schemes: &[&str]) -> Result<(), String> {
    let uri: hyper::Uri = u.parse().map_err(|e| format!("{u:?}: not a URL ({e})"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some(s), Some(h)) if schemes.contains(&s) && !h.is_empty() => Ok(()),
        _ => Err(format!(
            "{u:?}: expected a {} URL with a host",
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(" or ")
        )),
    }
}

fn non_empty(v: &Value) -> Result<&str, String> {
    match string(v)? {
        "" => Err("must not be empty".to_owned()),
        s => Ok(s),
    }
}

fn identifier(v: &Value) -> Result<String, String> {
    match string(v)? {
        n if !n.is_empty()
            && n.len() <= 32
            && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            Ok(n.to_owned())
        }
        n => Err(format!("{n:?}: 1 to 32 letters, digits or '_'")),
    }
}

fn boolean(v: &Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| "expected true or false".to_owned())
}

fn share(v: &Value) -> Result<f64, String> {
    match v.as_float() {
        Some(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err("expected a number from 0.0 to 1.0".to_owned()),
    }
}

/// A minijinja template, checked for syntax here.
fn template(v: &Value) -> Result<String, String> {
    let source = string(v)?;
    let env = minijinja::Environment::new();
    env.template_from_str(source)
        .map_err(|e| format!("template error: {e}"))?;
    Ok(source.to_owned())
}
