//! Campaigns over the API (`/api/v1/campaigns`): created, used, paused (mail held),
//! updated (the next mail carries the new text) and resumed (held mail released) without a
//! restart; validation as strict as the config file, every error with its path; config
//! campaigns beside them; a restart keeps what the API did.

use crate::harness::{Options, TestServer};
use serde_json::{json, Value};

/// A campaign in the config file beside the API's; no holdout share (every message renders
/// its variant, so the text it carries is known).
const FILE_CAMPAIGN: &str = r#"[sidecar.bandit]
holdout = 0.0

[[sidecar.campaigns]]
name = "fromfile"
text = "from the file\n"
[[sidecar.campaigns.slots]]
name = "subject"
default = "File subject"
"#;

fn options() -> Options {
    Options::default().extra(FILE_CAMPAIGN)
}

fn spring() -> Value {
    json!({
        "name": "spring",
        "subject": "{{ slots.subject }} for {{ recipient.first_name }}",
        "text": "campaign text\n",
        "slots": [{"name": "subject", "default": "Spring sale"}],
        "variants": [{"id": "a", "text": "Variant A says hi to {{ recipient.first_name }}\n"}],
        "send_window": "12h",
    })
}

async fn inject(server: &TestServer, campaign: &str, to: &str) -> (u16, Value) {
    server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "news@example.com",
                "to": [to],
                "raw": "From: news@example.com\nTo: x@sink.test\nSubject: placeholder\n\nplaceholder\n",
                "sidecar": {"campaign": campaign, "recipients": {to: {"first_name": "Ann"}}},
            })),
        )
        .await
}

/// The text of the one envelope addressed to `to`, with the envelope.
fn mail_to(server: &TestServer, to: &str) -> (tern_queue::Envelope, String) {
    let env = server
        .envelopes()
        .into_iter()
        .find(|e| e.recipients.iter().any(|r| r.address == to))
        .unwrap_or_else(|| panic!("no envelope for {to}"));
    let body = String::from_utf8(server.body(env.id)).unwrap();
    (env, body)
}

#[tokio::test]
async fn campaigns_are_created_paused_updated_and_resumed_without_a_restart() {
    let server = TestServer::start(options()).await;

    let (status, created) = server
        .api("POST", "/api/v1/campaigns", Some(&spring()))
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["version"], 1);
    assert_eq!(created["state"], "active");
    assert_eq!(created["origin"], "api");
    // Defaults are filled in, as the config file's would be.
    assert_eq!(created["config"]["max_segments"], 64);
    assert_eq!(created["config"]["send_window"], "43200s");

    let (status, list) = server.api("GET", "/api/v1/campaigns", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fromfile", "spring"], "{list}");
    assert_eq!(list["campaigns"][0]["origin"], "config");

    // Used at once.
    let (status, answer) = inject(&server, "spring", "one@sink.test").await;
    assert_eq!(status, 200, "{answer}");
    let (env, body) = mail_to(&server, "one@sink.test");
    assert!(body.contains("Variant A says hi to Ann"), "{body}");
    assert!(body.contains("Subject: Spring sale for Ann"), "{body}");
    let tag = env.campaign.expect("the campaign travels with the message");
    assert_eq!(tag.campaign, "spring");
    assert!(!env.held);

    // Paused: accepted, rendered, held.
    let (status, paused) = server
        .api("POST", "/api/v1/campaigns/spring/pause", None)
        .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["state"], "paused");
    let (status, answer) = inject(&server, "spring", "two@sink.test").await;
    assert_eq!(status, 200, "{answer}");
    let (held, _) = mail_to(&server, "two@sink.test");
    assert!(held.held, "mail of a paused campaign is held");
    assert_eq!(held.next_due_ms, u64::MAX);
    // Over SMTP too.
    let mut c = server.connect().await;
    c.ehlo().await;
    let smtp_id = c
        .submit(
            "news@example.com",
            &["three@sink.test"],
            b"From: news@example.com\r\nSubject: s\r\nX-Tern-Campaign: spring\r\n\r\nbody\r\n",
        )
        .await;
    assert!(server.envelope(smtp_id).held);

    // Updated while paused: the state stays, the version moves, the text is new.
    let (status, patched) = server
        .api(
            "PATCH",
            "/api/v1/campaigns/spring",
            Some(&json!({"variants": [{"id": "a", "text": "Version two for {{ recipient.first_name }}\n"}]})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["version"], 2);
    assert_eq!(patched["state"], "paused");
    assert_eq!(patched["config"]["subject"], spring()["subject"]);

    // Resumed: the held mail is released and due now.
    let (status, resumed) = server
        .api("POST", "/api/v1/campaigns/spring/resume", None)
        .await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["state"], "active");
    assert_eq!(resumed["released"], 2, "{resumed}");
    let (released, _) = mail_to(&server, "two@sink.test");
    assert!(!released.held);
    assert!(released.next_due_ms <= tern::clock::now_ms());
    assert!(!server.envelope(smtp_id).held);

    // The next mail carries the new text.
    inject(&server, "spring", "four@sink.test").await;
    let (_, body) = mail_to(&server, "four@sink.test");
    assert!(body.contains("Version two for Ann"), "{body}");
    assert!(!body.contains("Variant A says"), "{body}");

    // A name is taken once, config or API.
    for name in ["spring", "fromfile"] {
        let mut doc = spring();
        doc["name"] = json!(name);
        let (status, answer) = server.api("POST", "/api/v1/campaigns", Some(&doc)).await;
        assert_eq!(status, 409, "{name}: {answer}");
    }
    // A config campaign pauses through the API, but is changed only in its file.
    let (status, answer) = server
        .api(
            "PATCH",
            "/api/v1/campaigns/fromfile",
            Some(&json!({"text": "x"})),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("config file"),
        "{answer}"
    );
    let (status, _) = server
        .api("POST", "/api/v1/campaigns/fromfile/pause", None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = server.api("GET", "/api/v1/campaigns/nope", None).await;
    assert_eq!(status, 404);

    // A restart keeps the API campaign (version, text) and the config campaign's pause.
    let server = server.restart(options()).await;
    let (status, shown) = server.api("GET", "/api/v1/campaigns/spring", None).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["version"], 2);
    assert_eq!(shown["state"], "active");
    let (_, file) = server.api("GET", "/api/v1/campaigns/fromfile", None).await;
    assert_eq!(file["state"], "paused", "{file}");
    inject(&server, "spring", "five@sink.test").await;
    let (env, body) = mail_to(&server, "five@sink.test");
    assert!(body.contains("Version two for Ann"), "{body}");
    assert!(!env.held);

    // Archived: kept and shown, but mail may not name it any more.
    let (status, archived) = server
        .api("POST", "/api/v1/campaigns/spring/archive", None)
        .await;
    assert_eq!(status, 200, "{archived}");
    assert_eq!(archived["state"], "archived");
    let (status, answer) = inject(&server, "spring", "six@sink.test").await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = server
        .api("POST", "/api/v1/campaigns/spring/resume", None)
        .await;
    assert_eq!(status, 409);
    server.stop().await;
}

#[tokio::test]
async fn a_bad_campaign_gets_one_400_listing_every_error_with_its_path() {
    let server = TestServer::start(options()).await;
    let bad = json!({
        "name": "no spaces allowed",
        "text": "{{ unclosed",
        "send_window": 3600,
        "quiet_hours": [22, 25],
        "tracking": true,
        "colour": "blue",
        "slots": [{"name": "subject", "default": "x"}, {"name": "subject", "prompt": "", "default": null}],
        "variants": [{"id": "a"}, {"id": "b", "subject": "{% if %}", "txt": "typo"}],
    });
    let (status, answer) = server.api("POST", "/api/v1/campaigns", Some(&bad)).await;
    assert_eq!(status, 400, "{answer}");
    let errors: Vec<&str> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for path in [
        "name: ",
        "text: template error",
        "send_window: expected a duration",
        "quiet_hours: ",
        "tracking: ",
        "colour: unknown key",
        "slots[1].prompt: must not be empty",
        "slots[1].default: null",
        "variants[1].subject: template error",
        "variants[1].txt: unknown key",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(path)),
            "{path:?} missing from {errors:#?}"
        );
    }
    // Not JSON of the right shape at all.
    let (status, answer) = server
        .api("POST", "/api/v1/campaigns", Some(&json!(["a"])))
        .await;
    assert_eq!(status, 400, "{answer}");
    // Nothing was created; a bad update changes nothing either.
    let (status, _) = server
        .api("POST", "/api/v1/campaigns", Some(&spring()))
        .await;
    assert_eq!(status, 201);
    let (status, answer) = server
        .api(
            "PUT",
            "/api/v1/campaigns/spring",
            Some(&json!({"text": "ok", "variants": [{"id": "holdout"}]})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("variants: "),
        "{answer}"
    );
    let (_, shown) = server.api("GET", "/api/v1/campaigns/spring", None).await;
    assert_eq!(shown["version"], 1);
    assert_eq!(shown["config"]["text"], "campaign text\n");
    let (_, list) = server.api("GET", "/api/v1/campaigns", None).await;
    assert_eq!(list["campaigns"].as_array().unwrap().len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_shows_pauses_and_resumes_campaigns() {
    use crate::cli::{cli_config, tern_ok};
    let server = TestServer::start(options()).await;
    let (status, _) = server
        .api("POST", "/api/v1/campaigns", Some(&spring()))
        .await;
    assert_eq!(status, 201);
    let config = cli_config(&server);
    let cfg = config.to_str().unwrap();

    let list = tern_ok(&["campaign", "list", "--config", cfg]).await;
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{list}");
    assert!(
        lines.iter().any(|l| l.starts_with("spring ")
            && l.contains(" api ")
            && l.contains(" active ")
            && l.ends_with(" a")),
        "{list}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("fromfile ") && l.contains(" config ")),
        "{list}"
    );

    let out = tern_ok(&["campaign", "pause", "spring", "--config", cfg]).await;
    assert!(out.starts_with("paused spring"), "{out}");
    let shown: Value =
        serde_json::from_str(&tern_ok(&["campaign", "show", "spring", "--config", cfg]).await)
            .unwrap();
    assert_eq!(shown["state"], "paused", "{shown}");
    assert_eq!(shown["config"]["variants"][0]["id"], "a", "{shown}");
    inject(&server, "spring", "held@sink.test").await;
    assert!(mail_to(&server, "held@sink.test").0.held);

    let out = tern_ok(&["campaign", "resume", "spring", "--config", cfg]).await;
    assert_eq!(out, "resumed spring: 1 held message(s) released\n");
    assert!(!mail_to(&server, "held@sink.test").0.held);

    let out = crate::harness::run_tern(&["campaign", "pause", "nope", "--config", cfg], None).await;
    assert_eq!(
        out.status.code(),
        Some(65),
        "an unknown campaign is the caller's error"
    );
    server.stop().await;
}
