//! Slot generation that scales: the model is asked once per (campaign, variant, segment) and
//! every recipient of that key renders from the shared answer.
//!
//! A key's generation starts the first time a message needs it (for every variant of the
//! campaign at once, so the bandit's later picks find theirs ready) or at start for a
//! campaign's configured `segments`. It runs as its own task under `generate_timeout`, so a
//! message that gives up at its `deadline` does not cancel it: the next messages use it.
//! Campaigns with `model_fields` ask for per-recipient text instead, within
//! `recipient_calls_per_hour`; over the budget they get the coarse text.
//!
//! Invariants: single flight — at most one model call per key is in flight, everybody else
//! waits on it (up to their own deadline, then the slots' defaults render); a failed key is
//! tried again only [`RETRY_FAILED`] after it started; a campaign generates for at most
//! `max_segments` distinct segment values, so recipient data cannot multiply model calls; the
//! model sees the campaign, the variant and the segment value only (per-recipient: the
//! whitelisted `model_fields` too).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{Quota, RateLimiter};
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio::time::Instant as Deadline;

use super::guard;
use super::model::{Failure, Model, SlotRequest, Source};
use crate::config::{CampaignConfig, SlotConfig};
use crate::telemetry::Metrics;

/// How long after a failed generation started the same key may be tried again.
pub const RETRY_FAILED: Duration = Duration::from_secs(30);

/// Segment values longer than this are not keys (they would be recipient data, not segments).
const MAX_SEGMENT_LEN: usize = 128;

/// Slot texts for one message: cleaned generated text or the defaults, where they came from
/// (`model`, `cache`, `shared` or `default`) and why defaults were used.
#[derive(Debug, Clone)]
pub struct Generated {
    pub slots: BTreeMap<String, String>,
    pub content: &'static str,
    pub reason: Option<&'static str>,
}

/// What one recipient needs: a shared (coarse) key, or its own generation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Want {
    Coarse {
        variant: Option<String>,
        segment: String,
    },
    Recipient {
        variant: Option<String>,
        segment: String,
        fields: BTreeMap<String, String>,
    },
}

/// (campaign, its version, variant, segment): an updated campaign (`/api/v1/campaigns`) is a
/// new version, so its prompts never reuse text generated for the old one.
type Key = (String, u64, Option<String>, String);
type Gcra = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::DefaultClock,
    governor::middleware::NoOpMiddleware<
        <governor::clock::DefaultClock as governor::clock::Clock>::Instant,
    >,
>;

struct Entry {
    started: Instant,
    rx: watch::Receiver<Option<Arc<Generated>>>,
}

pub struct Generator {
    model: Option<Arc<Model>>,
    metrics: Arc<Metrics>,
    entries: Mutex<HashMap<Key, Entry>>,
    /// Segment values admitted per campaign (at most its `max_segments`).
    segments: Mutex<HashMap<String, HashSet<String>>>,
    /// Per-recipient call budgets per campaign.
    budgets: Mutex<HashMap<String, Arc<Gcra>>>,
}

impl Generator {
    pub fn new(model: Option<Arc<Model>>, metrics: Arc<Metrics>) -> Generator {
        Generator {
            model,
            metrics,
            entries: Mutex::new(HashMap::new()),
            segments: Mutex::new(HashMap::new()),
            budgets: Mutex::new(HashMap::new()),
        }
    }

    /// What a recipient with `data` needs for `variant` of `campaign`.
    pub fn want(
        campaign: &CampaignConfig,
        variant: Option<&str>,
        data: &Map<String, Value>,
    ) -> Want {
        let segment = campaign
            .segment_field
            .as_ref()
            .and_then(|f| data.get(f))
            .map(|v| match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            })
            .unwrap_or_default();
        let variant = variant.map(str::to_owned);
        if campaign.model_fields.is_empty() || campaign.recipient_calls_per_hour == 0 {
            return Want::Coarse { variant, segment };
        }
        let fields = campaign
            .model_fields
            .iter()
            .filter_map(|f| {
                let v = data.get(f)?;
                Some((
                    f.clone(),
                    match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    },
                ))
            })
            .collect();
        Want::Recipient {
            variant,
            segment,
            fields,
        }
    }

    /// Starts the generations of `segment` for every variant of `campaign` (and the
    /// holdout, which renders the campaign's own templates with generated slots too) that
    /// are not running or done. Needs a tokio runtime.
    pub fn prefetch(
        &self,
        campaign: &Arc<CampaignConfig>,
        version: u64,
        holdout: bool,
        segment: &str,
    ) {
        if self.model.is_none() || !has_prompts(&campaign.slots) || !self.admit(campaign, segment) {
            return;
        }
        let mut variants: Vec<Option<String>> = campaign
            .variants
            .iter()
            .map(|v| Some(v.id.clone()))
            .collect();
        if variants.is_empty() {
            variants.push(None);
        } else if holdout {
            variants.push(Some(super::bandit::HOLDOUT.to_owned()));
        }
        for v in variants {
            drop(self.entry(campaign, version, v, segment));
        }
    }

    /// The slots for one [`Want`], waiting for them at most until `deadline`.
    pub async fn resolve(
        &self,
        campaign: &Arc<CampaignConfig>,
        version: u64,
        want: &Want,
        deadline: Deadline,
    ) -> Generated {
        let slots = &campaign.slots;
        if !has_prompts(slots) {
            return defaults(slots, "default", None);
        }
        if self.model.is_none() {
            return defaults(slots, "default", Some(Failure::Disabled.as_str()));
        }
        match want {
            Want::Coarse { variant, segment } => {
                self.coarse(campaign, version, variant.as_deref(), segment, deadline)
                    .await
            }
            Want::Recipient {
                variant,
                segment,
                fields,
            } => {
                if !self.budget(campaign) {
                    self.metrics.sidecar_generation("recipient", "over_budget");
                    return self
                        .coarse(campaign, version, variant.as_deref(), segment, deadline)
                        .await;
                }
                let model = self.model.as_ref().expect("checked above");
                let mut fields: BTreeMap<String, Value> = fields
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                fields.insert("campaign".into(), campaign.name.clone().into());
                if let Some(v) = variant {
                    fields.insert("variant".into(), v.clone().into());
                }
                let requests = requests(slots);
                let answer =
                    tokio::time::timeout_at(deadline, model.generate(&requests, &fields, deadline))
                        .await
                        .unwrap_or(Err(Failure::Timeout));
                let generated = fill(slots, answer, false);
                self.metrics.sidecar_generation(
                    "recipient",
                    if generated.content == "default" {
                        "failed"
                    } else {
                        "model"
                    },
                );
                generated
            }
        }
    }

    async fn coarse(
        &self,
        campaign: &Arc<CampaignConfig>,
        version: u64,
        variant: Option<&str>,
        segment: &str,
        deadline: Deadline,
    ) -> Generated {
        if !self.admit(campaign, segment) {
            return defaults(&campaign.slots, "default", Some("segment_limit"));
        }
        let Some(mut rx) = self.entry(campaign, version, variant.map(str::to_owned), segment)
        else {
            return defaults(&campaign.slots, "default", Some(Failure::Disabled.as_str()));
        };
        let done = match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(done)) => done.clone(),
            // Err(_) inside: the generating task ended without an answer (runtime shutdown).
            Ok(Err(_)) | Err(_) => None,
        };
        match done {
            Some(generated) => (*generated).clone(),
            None => defaults(&campaign.slots, "default", Some(Failure::Timeout.as_str())),
        }
    }

    /// Whether `segment` may be a key of `campaign` (admitted now if there is room).
    fn admit(&self, campaign: &CampaignConfig, segment: &str) -> bool {
        if segment.len() > MAX_SEGMENT_LEN {
            return false;
        }
        let mut segments = self.segments.lock().expect("segments lock");
        let seen = segments.entry(campaign.name.clone()).or_default();
        if seen.contains(segment) {
            return true;
        }
        if seen.len() >= campaign.max_segments {
            return false;
        }
        seen.insert(segment.to_owned());
        true
    }

    /// Forgets the generations of every version of campaign `name` but `keep` (after an
    /// update), and its admitted segments and budget when it is gone (`keep` = `None`).
    pub fn forget(&self, name: &str, keep: Option<u64>) {
        self.entries
            .lock()
            .expect("entries lock")
            .retain(|(c, v, _, _), _| c != name || Some(*v) == keep);
        if keep.is_none() {
            self.segments.lock().expect("segments lock").remove(name);
            self.budgets.lock().expect("budgets lock").remove(name);
        }
    }

    /// Takes one per-recipient call from the campaign's hourly budget.
    fn budget(&self, campaign: &CampaignConfig) -> bool {
        let Some(per_hour) = NonZeroU32::new(campaign.recipient_calls_per_hour) else {
            return false;
        };
        let gcra = self
            .budgets
            .lock()
            .expect("budgets lock")
            .entry(campaign.name.clone())
            .or_insert_with(|| Arc::new(RateLimiter::direct(Quota::per_hour(per_hour))))
            .clone();
        gcra.check().is_ok()
    }

    /// The key's entry, its generation started if none is running or done (or the last one
    /// failed [`RETRY_FAILED`] ago). `None` without a model.
    fn entry(
        &self,
        campaign: &Arc<CampaignConfig>,
        version: u64,
        variant: Option<String>,
        segment: &str,
    ) -> Option<watch::Receiver<Option<Arc<Generated>>>> {
        let model = self.model.clone()?;
        let key: Key = (campaign.name.clone(), version, variant, segment.to_owned());
        let mut entries = self.entries.lock().expect("entries lock");
        if let Some(e) = entries.get(&key) {
            let failed =
                e.rx.borrow()
                    .as_ref()
                    .is_some_and(|g| g.content == "default");
            if !(failed && e.started.elapsed() >= RETRY_FAILED) {
                return Some(e.rx.clone());
            }
        }
        let (tx, rx) = watch::channel(None);
        entries.insert(
            key.clone(),
            Entry {
                started: Instant::now(),
                rx: rx.clone(),
            },
        );
        drop(entries);
        let campaign = campaign.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let (_, _, variant, segment) = key;
            let mut fields: BTreeMap<String, Value> = BTreeMap::new();
            fields.insert("campaign".into(), campaign.name.clone().into());
            if let Some(v) = &variant {
                fields.insert("variant".into(), v.clone().into());
            }
            if let (Some(f), false) = (&campaign.segment_field, segment.is_empty()) {
                fields.insert(f.clone(), segment.clone().into());
            }
            let requests = requests(&campaign.slots);
            let deadline = Deadline::now() + model.config().generate_timeout;
            let answer =
                tokio::time::timeout_at(deadline, model.generate(&requests, &fields, deadline))
                    .await
                    .unwrap_or(Err(Failure::Timeout));
            let generated = fill(&campaign.slots, answer, true);
            metrics.sidecar_generation(
                "coarse",
                if generated.content == "default" {
                    "failed"
                } else {
                    "model"
                },
            );
            // Nobody waiting is fine: the entry keeps the answer for later messages.
            let _ = tx.send(Some(Arc::new(generated)));
        });
        Some(rx)
    }
}

fn has_prompts(slots: &[SlotConfig]) -> bool {
    slots.iter().any(|s| s.prompt.is_some())
}

fn requests(slots: &[SlotConfig]) -> Vec<SlotRequest<'_>> {
    slots
        .iter()
        .filter_map(|s| {
            Some(SlotRequest {
                name: &s.name,
                prompt: s.prompt.as_deref()?,
                max_chars: s.max_chars,
            })
        })
        .collect()
}

/// Every slot at its default.
pub fn defaults(
    slots: &[SlotConfig],
    content: &'static str,
    reason: Option<&'static str>,
) -> Generated {
    Generated {
        slots: slots
            .iter()
            .map(|s| (s.name.clone(), s.default.clone()))
            .collect(),
        content,
        reason,
    }
}

/// The model's answer cleaned by the guardrails over the defaults; `shared`: the content
/// code is `shared` (one generation for many recipients).
fn fill(
    slots: &[SlotConfig],
    answer: Result<(Arc<super::model::Slots>, Source), Failure>,
    shared: bool,
) -> Generated {
    let (answer, source) = match answer {
        Err(failure) => return defaults(slots, "default", Some(failure.as_str())),
        Ok(ok) => ok,
    };
    let mut out = defaults(slots, "default", None);
    // Whether the guardrails removed anything from (or emptied) a generated slot.
    let mut guarded = false;
    for s in slots.iter().filter(|s| s.prompt.is_some()) {
        let raw = answer.get(&s.name);
        match raw.and_then(|t| guard::clean(t, s.max_chars)) {
            Some(text) => {
                guarded |= raw.is_some_and(|r| r.trim() != text);
                out.slots.insert(s.name.clone(), text);
            }
            None => guarded = true,
        }
    }
    out.content = match (shared, source) {
        (true, _) => "shared",
        (false, Source::Model) => "model",
        (false, Source::Cache) => "cache",
    };
    out.reason = guarded.then_some("guardrail");
    out
}
