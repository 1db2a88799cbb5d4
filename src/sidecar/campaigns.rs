//! The campaign table: campaigns from the config file and from `/api/v1/campaigns`, their
//! state (active, paused, archived) and version, kept in the spool and swapped while the
//! daemon runs.
//!
//! A campaign from the API is validated by the config's own compile function
//! ([`crate::config::compile_campaign_json`]), so every key the file takes (and every check
//! on it) applies to the API too, and stored under the spool meta name
//! `sidecar/campaign/<name>` as its normalised JSON with its version and state; at start it
//! is compiled again. A config campaign keeps its definition in the file; only a state the
//! API set (paused) is stored for it. Names are one namespace: creating a name the config
//! or the API already has is a conflict.
//!
//! Invariants: changes are serialised (one at a time) and durable before the table is
//! swapped, so what the API answered is what a restart loads; the stage reads one snapshot
//! of the table per submission ([`crate::live::Live`]); every update of a campaign raises its
//! version, which is part of every generated-text key ([`super::generate`]), so an updated
//! prompt or variant never renders text generated for the old one; a config campaign
//! cannot be updated or archived through the API (the file would bring it back), only
//! paused and resumed.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tern_queue::Spool;
use tracing::{info, warn};

use crate::config::CampaignConfig;

/// Spool meta names of stored campaigns.
pub const CAMPAIGN_META: &str = "sidecar/campaign/";

/// Work a template render may do (minijinja fuel): far above any sane template, far below
/// a runaway loop.
const TEMPLATE_FUEL: u64 = 200_000;

/// Campaigns the API may create at most (the config's are not counted): each holds compiled
/// templates, a bandit and generated text in memory.
pub const MAX_API_CAMPAIGNS: usize = 1_000;

/// Where a campaign is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Config,
    Api,
}

/// What happens to mail for a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Rendered and sent.
    Active,
    /// Accepted, rendered and spooled held (not attempted) until the campaign is resumed.
    Paused,
    /// Over: new mail naming it is refused by the API and sent as a plain message over
    /// SMTP (as an unknown campaign); its definition and results are kept.
    Archived,
}

/// A campaign with its templates compiled.
pub(super) struct Campaign {
    pub(super) config: Arc<CampaignConfig>,
    pub(super) env: minijinja::Environment<'static>,
    pub(super) variants: Vec<String>,
    pub(super) version: u64,
    pub(super) origin: Origin,
    pub(super) state: State,
    pub(super) updated_ms: u64,
}

/// The table the stage reads.
pub(super) type Table = HashMap<String, Arc<Campaign>>;

/// What the spool keeps per campaign (meta `sidecar/campaign/<name>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    origin: Origin,
    /// The normalised definition (API campaigns only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config: Option<Value>,
    version: u64,
    state: State,
    updated_ms: u64,
}

/// A campaign as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignInfo {
    pub name: String,
    pub origin: Origin,
    pub state: State,
    pub version: u64,
    pub updated_ms: u64,
    /// The definition, in the keys the config file and the API take.
    pub config: Value,
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CampaignError {
    /// Every validation error, each with its path (`variants[1].subject: ...`).
    Invalid(Vec<String>),
    NotFound(String),
    Conflict(String),
    /// The spool could not store the change (nothing changed).
    Spool(String),
}

impl std::fmt::Display for CampaignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CampaignError::Invalid(errors) => write!(f, "{}", errors.join("; ")),
            CampaignError::NotFound(m) | CampaignError::Conflict(m) | CampaignError::Spool(m) => {
                f.write_str(m)
            }
        }
    }
}

/// A change the API asks for.
#[derive(Debug, Clone)]
pub enum Change {
    /// A new campaign (the document names it).
    Create(Value),
    /// The whole definition replaced (`PUT`): the document's `name`, if any, must be the
    /// campaign's.
    Replace(Value),
    /// A JSON merge patch (RFC 7396) over the current definition (`PATCH`).
    Patch(Value),
    Pause,
    Resume,
    Archive,
}

impl Campaign {
    /// Compiles the templates of `config` (their syntax was checked by the config reader).
    pub(super) fn compile(
        config: CampaignConfig,
        version: u64,
        origin: Origin,
        state: State,
        updated_ms: u64,
    ) -> Result<Campaign, String> {
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html") {
                minijinja::AutoEscape::Html
            } else {
                minijinja::AutoEscape::None
            }
        });
        let mut add = |name: String, source: &str| {
            env.add_template_owned(name, source.to_owned())
                .map_err(|e| format!("sidecar.campaigns ({}): {e}", config.name))
        };
        add("subject".into(), &config.subject)?;
        add("text".into(), &config.text)?;
        if let Some(html) = &config.html {
            add("body.html".into(), html)?;
        }
        for v in &config.variants {
            if let Some(s) = &v.subject {
                add(format!("{}/subject", v.id), s)?;
            }
            if let Some(t) = &v.text {
                add(format!("{}/text", v.id), t)?;
            }
        }
        let variants = config.variants.iter().map(|v| v.id.clone()).collect();
        Ok(Campaign {
            config: Arc::new(config),
            env,
            variants,
            version,
            origin,
            state,
            updated_ms,
        })
    }

    pub(super) fn info(&self) -> CampaignInfo {
        CampaignInfo {
            name: self.config.name.clone(),
            origin: self.origin,
            state: self.state,
            version: self.version,
            updated_ms: self.updated_ms,
            config: serde_json::to_value(&*self.config).expect("a campaign serialises"),
        }
    }

    fn stored(&self) -> Stored {
        Stored {
            origin: self.origin,
            config: (self.origin == Origin::Api).then(|| self.info().config),
            version: self.version,
            state: self.state,
            updated_ms: self.updated_ms,
        }
    }
}

/// The table at start: the config's campaigns, then what the spool keeps (API campaigns,
/// states set for config campaigns). A stored campaign that no longer compiles, or whose
/// name the config now uses, is logged and left out (its record stays, untouched).
pub(super) fn load(
    configured: &[CampaignConfig],
    spool: &Spool,
    tracking: bool,
) -> Result<Table, String> {
    let mut table = Table::new();
    for c in configured {
        let campaign = Campaign::compile(c.clone(), 0, Origin::Config, State::Active, 0)?;
        table.insert(c.name.clone(), Arc::new(campaign));
    }
    let stored = spool
        .scan_meta(CAMPAIGN_META)
        .map_err(|e| format!("spool.path: cannot read the stored campaigns: {e}"))?;
    for (key, bytes) in stored {
        let name = key[CAMPAIGN_META.len()..].to_owned();
        let stored: Stored = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                warn!(campaign = %name, error = %e, "stored campaign unreadable: left out");
                continue;
            }
        };
        match (stored.origin, table.get(&name)) {
            (Origin::Config, Some(c)) => {
                let c = Campaign::compile(
                    (*c.config).clone(),
                    c.version,
                    Origin::Config,
                    stored.state,
                    stored.updated_ms,
                )?;
                table.insert(name, Arc::new(c));
            }
            // The campaign left the config file: its stored state has nothing to apply to.
            (Origin::Config, None) => {}
            (Origin::Api, Some(_)) => warn!(
                campaign = %name,
                "an API campaign has the name of a config campaign: the config's is used"
            ),
            (Origin::Api, None) => {
                let compiled = stored
                    .config
                    .as_ref()
                    .ok_or_else(|| vec!["no definition stored".to_owned()])
                    .and_then(|doc| crate::config::compile_campaign_json(doc, tracking))
                    .map_err(|e| e.join("; "))
                    .and_then(|config| {
                        Campaign::compile(
                            config,
                            stored.version,
                            Origin::Api,
                            stored.state,
                            stored.updated_ms,
                        )
                    });
                match compiled {
                    Ok(c) => {
                        table.insert(name, Arc::new(c));
                    }
                    Err(e) => {
                        warn!(campaign = %name, error = %e, "stored campaign no longer valid: left out")
                    }
                }
            }
        }
    }
    Ok(table)
}

/// The campaign `change` makes of `current` (pure: validation and the transition, nothing
/// stored). `now_ms` stamps it.
pub(super) fn plan(
    table: &Table,
    name: Option<&str>,
    change: Change,
    tracking: bool,
    now_ms: u64,
) -> Result<Campaign, CampaignError> {
    let current = match name {
        None => None,
        Some(n) => Some(
            table
                .get(n)
                .ok_or_else(|| CampaignError::NotFound(format!("no campaign {n:?}")))?,
        ),
    };
    let compile = |doc: &Value| {
        crate::config::compile_campaign_json(doc, tracking).map_err(CampaignError::Invalid)
    };
    let built = |config, version, origin, state| {
        Campaign::compile(config, version, origin, state, now_ms)
            .map_err(|e| CampaignError::Invalid(vec![e]))
    };
    let editable = |c: &Campaign, what: &str| {
        match (c.origin, c.state) {
        (Origin::Config, _) => Err(CampaignError::Conflict(format!(
            "campaign {:?} is defined in the config file: {what} it there (the API can pause and resume it)",
            c.config.name
        ))),
        (_, State::Archived) => Err(CampaignError::Conflict(format!(
            "campaign {:?} is archived",
            c.config.name
        ))),
        _ => Ok(()),
    }
    };
    match (change, current) {
        (Change::Create(doc), _) => {
            let config = compile(&doc)?;
            if let Some(c) = table.get(&config.name) {
                return Err(CampaignError::Conflict(format!(
                    "campaign {:?} exists already ({})",
                    config.name,
                    match c.origin {
                        Origin::Config => "in the config file",
                        Origin::Api => "created through the API",
                    }
                )));
            }
            let api = table.values().filter(|c| c.origin == Origin::Api).count();
            if api >= MAX_API_CAMPAIGNS {
                return Err(CampaignError::Conflict(format!(
                    "{api} campaigns exist, the most the API keeps ({MAX_API_CAMPAIGNS}): archive is not enough, remove them from the spool"
                )));
            }
            built(config, 1, Origin::Api, State::Active)
        }
        (Change::Replace(mut doc), Some(c)) => {
            editable(c, "change")?;
            let Some(object) = doc.as_object_mut() else {
                return Err(not_an_object());
            };
            match object.get("name") {
                None => {
                    object.insert("name".into(), c.config.name.clone().into());
                }
                Some(Value::String(n)) if *n == c.config.name => {}
                Some(_) => {
                    return Err(CampaignError::Invalid(vec![format!(
                        "name: a campaign cannot be renamed (this is {:?})",
                        c.config.name
                    )]))
                }
            }
            let config = compile(&doc)?;
            built(config, c.version + 1, c.origin, c.state)
        }
        (Change::Patch(patch), Some(c)) => {
            editable(c, "change")?;
            if !patch.is_object() {
                return Err(not_an_object());
            }
            if patch
                .get("name")
                .is_some_and(|n| *n != c.config.name.as_str())
            {
                return Err(CampaignError::Invalid(vec![format!(
                    "name: a campaign cannot be renamed (this is {:?})",
                    c.config.name
                )]));
            }
            let mut doc = c.info().config;
            merge_patch(&mut doc, &patch);
            let config = compile(&doc)?;
            built(config, c.version + 1, c.origin, c.state)
        }
        (change @ (Change::Pause | Change::Resume), Some(c)) => {
            if c.state == State::Archived {
                return Err(CampaignError::Conflict(format!(
                    "campaign {:?} is archived",
                    c.config.name
                )));
            }
            let state = if matches!(change, Change::Pause) {
                State::Paused
            } else {
                State::Active
            };
            built((*c.config).clone(), c.version, c.origin, state)
        }
        (Change::Archive, Some(c)) => {
            editable(c, "remove")?;
            built((*c.config).clone(), c.version, c.origin, State::Archived)
        }
        (_, None) => Err(CampaignError::NotFound("no campaign named".to_owned())),
    }
}

fn not_an_object() -> CampaignError {
    CampaignError::Invalid(vec!["the campaign must be a JSON object".to_owned()])
}

/// Stores `campaign` durably (before the table shows it).
pub(super) async fn store(spool: &Spool, campaign: &Campaign) -> Result<(), CampaignError> {
    let bytes = serde_json::to_vec(&campaign.stored()).expect("a campaign serialises");
    spool
        .put_meta(&format!("{CAMPAIGN_META}{}", campaign.config.name), bytes)
        .await
        .map_err(|e| CampaignError::Spool(format!("the campaign could not be stored: {e}")))?;
    info!(
        campaign = %campaign.config.name,
        version = campaign.version,
        state = ?campaign.state,
        "campaign stored"
    );
    Ok(())
}

/// RFC 7396: objects merge key by key, `null` removes a key, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let object = target.as_object_mut().expect("made an object");
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table_with(doc: Value) -> Table {
        let c = plan(&Table::new(), None, Change::Create(doc), false, 1).unwrap();
        Table::from([(c.config.name.clone(), Arc::new(c))])
    }

    #[test]
    fn merge_patch_follows_rfc7396() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "x": [1]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "x": [2, 3]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "x": [2, 3]}));
    }

    #[test]
    fn every_error_has_its_path() {
        let err = plan(
            &Table::new(),
            None,
            Change::Create(json!({
                "name": "bad name!",
                "text": "{{ oops",
                "send_window": 5,
                "colour": "red",
                "variants": [{"id": "a"}, {"id": "b", "subject": "{% if %}"}],
                "slots": [{"name": "s", "default": null}],
            })),
            false,
            1,
        )
        .err()
        .unwrap();
        let CampaignError::Invalid(errors) = err else {
            panic!("{err:?}")
        };
        for want in [
            "name: ",
            "text: template error",
            "send_window: ",
            "colour: unknown key",
            "variants[1].subject: template error",
            "slots[0].default: null",
            "slots[0].default: missing required key",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "{want} not in {errors:#?}"
            );
        }
    }

    #[test]
    fn updates_raise_the_version_and_keep_the_name() {
        let table = table_with(json!({"name": "c", "text": "one", "variants": [{"id": "a"}]}));
        let c = plan(
            &table,
            Some("c"),
            Change::Patch(json!({"variants": [{"id": "a", "text": "two"}]})),
            false,
            2,
        )
        .unwrap();
        assert_eq!(c.version, 2);
        assert_eq!(c.config.variants[0].text.as_deref(), Some("two"));
        assert_eq!(c.config.text, "one");
        let renamed = plan(
            &table,
            Some("c"),
            Change::Replace(json!({"name": "d", "text": "x"})),
            false,
            2,
        );
        assert!(matches!(renamed, Err(CampaignError::Invalid(_))));
        let again = plan(
            &table,
            None,
            Change::Create(json!({"name": "c", "text": "x"})),
            false,
            2,
        );
        assert!(matches!(again, Err(CampaignError::Conflict(_))));
    }

    #[test]
    fn config_campaigns_pause_but_do_not_change_and_archived_ones_stay_archived() {
        let config =
            crate::config::compile_campaign_json(&json!({"name": "f", "text": "t"}), false)
                .unwrap();
        let mut table = Table::new();
        table.insert(
            "f".into(),
            Arc::new(Campaign::compile(config, 0, Origin::Config, State::Active, 0).unwrap()),
        );
        let patch = plan(
            &table,
            Some("f"),
            Change::Patch(json!({"text": "u"})),
            false,
            1,
        );
        assert!(matches!(patch, Err(CampaignError::Conflict(_))));
        let archive = plan(&table, Some("f"), Change::Archive, false, 1);
        assert!(matches!(archive, Err(CampaignError::Conflict(_))));
        let paused = plan(&table, Some("f"), Change::Pause, false, 1).unwrap();
        assert_eq!(paused.state, State::Paused);

        let api = table_with(json!({"name": "a", "text": "t"}));
        let archived = plan(&api, Some("a"), Change::Archive, false, 1).unwrap();
        let api = Table::from([("a".to_owned(), Arc::new(archived))]);
        for change in [Change::Resume, Change::Patch(json!({"text": "x"}))] {
            assert!(matches!(
                plan(&api, Some("a"), change, false, 2),
                Err(CampaignError::Conflict(_))
            ));
        }
    }

    #[test]
    fn tracking_needs_the_tracking_section() {
        let doc = json!({"name": "t", "text": "x", "tracking": true});
        let err = plan(&Table::new(), None, Change::Create(doc.clone()), false, 1)
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("tracking: "), "{err}");
        assert!(plan(&Table::new(), None, Change::Create(doc), true, 1).is_ok());
    }
}
