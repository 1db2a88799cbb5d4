//! Campaigns over the API (`/api/v1/campaigns`): created, used, paused (mail held),
//! updated (the next mail carries the new text) and resumed (held mail released) without a
//! restart; validation as strict as the config file, every error with its path; config
//! campaigns beside them; a restart keeps what the API did.

use crate::harness::{Options, TestServer};
use serde_json::{json, Value};
use std::time::Duration;

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

/// The path of a tracking link of `kind` (`o` open, `c` click) in a delivered message.
fn tracking_path(data: &[u8], kind: &str) -> String {
    let message = mail_parser::MessageParser::default().parse(data).unwrap();
    let html = message.body_html(0).unwrap().into_owned();
    let marker = format!("http://t.example.com/t/{kind}/");
    let token = html
        .split(&marker)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no {kind} link in {html}"));
    format!("/t/{kind}/{token}")
}

/// The `/u/TOKEN` path of a delivered message's List-Unsubscribe.
fn unsubscribe_path(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next().unwrap().replace("\r\n ", " ");
    let value = head
        .lines()
        .find_map(|l| l.strip_prefix("List-Unsubscribe: "))
        .unwrap_or_else(|| panic!("no List-Unsubscribe in {head}"));
    value
        .split(',')
        .map(|u| u.trim().trim_start_matches('<').trim_end_matches('>'))
        .find_map(|u| u.strip_prefix("http://t.example.com"))
        .expect("an http unsubscribe URI")
        .to_owned()
}

async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    ua: &str,
    body: &str,
) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: t.example.com\r\nUser-Agent: {ua}\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer)[9..12].parse().unwrap()
}

/// A campaign run end to end: deliveries to a loopback sink (one address refused), a human
/// and a machine open, a click, a one-click unsubscribe and a conversion (events API). The
/// webhook receiver gets each as an event naming campaign and variant, the delivery log
/// names them too, and the results endpoint's numbers per variant are exactly what the
/// events say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_equal_what_the_events_say_and_the_webhook_gets_engagement_events() {
    use crate::sink::{Sink, SinkBehaviour};
    use crate::suppression::{receiver, wait_events, SECRET};
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkBehaviour::default().rcpt_reply(|a| {
        a.starts_with("gone@")
            .then(|| "550 5.1.1 No such user".to_owned())
    }))
    .await;
    let (hook, posts, _hook_task) = receiver("127.0.0.1:0".parse().unwrap()).await;
    let hook_secret = dir.path().join("hook.secret");
    std::fs::write(&hook_secret, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(
        &hook_secret,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let options = Options::default()
        .deliver()
        .route("sink.test", sink.addr)
        .extra(format!(
            "[sidecar.tracking]\nbase_url = \"http://t.example.com\"\nsecret_file = {:?}\n\n\
             [sidecar.bandit]\nholdout = 0.0\n\n\
             [[webhooks]]\nurl = \"http://{hook}/hook\"\nsecret_file = {:?}\ninterval = \"50ms\"\n",
            dir.path().join("tracking.key").display().to_string(),
            hook_secret.display().to_string(),
        ));
    let server = TestServer::start(options).await;
    let (status, created) = server
        .api(
            "POST",
            "/api/v1/campaigns",
            Some(&json!({
                "name": "summer",
                "subject": "Summer",
                "text": "See https://shop.test/summer\n",
                "html": "<html><body><a href=\"https://shop.test/summer\">Sale</a></body></html>",
                "tracking": true,
                "unsubscribe": true,
                "variants": [{"id": "a"}, {"id": "b", "subject": "Summer B"}],
            })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let people = ["p0", "p1", "p2", "p3", "p4", "p5", "gone"];
    let to: Vec<String> = people.iter().map(|p| format!("{p}@sink.test")).collect();
    let (status, answer) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "news@example.com",
                "to": to,
                "raw": "From: news@example.com\nTo: list@example.com\nSubject: x\n\nx\n",
                "sidecar": {"campaign": "summer"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let got = sink.wait_for_messages(6, Duration::from_secs(20)).await;
    let data = |who: &str| {
        got.iter()
            .find(|m| m.rcpts.iter().any(|r| r.address == who))
            .unwrap_or_else(|| panic!("nothing delivered to {who}"))
            .data
            .clone()
    };
    let variant_of = |who: &str| {
        answer["sidecar"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["recipient"] == who)
            .and_then(|r| r["variant"].as_str())
            .unwrap()
            .to_owned()
    };
    let iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15";
    let admin = server.admin();
    assert_eq!(
        request(
            admin,
            "GET",
            &tracking_path(&data("p0@sink.test"), "o"),
            iphone,
            ""
        )
        .await,
        200
    );
    assert_eq!(
        request(
            admin,
            "GET",
            &tracking_path(&data("p0@sink.test"), "c"),
            iphone,
            ""
        )
        .await,
        302
    );
    // A prefetch (no mail client in the agent): a machine open.
    assert_eq!(
        request(
            admin,
            "GET",
            &tracking_path(&data("p1@sink.test"), "o"),
            "Mozilla/5.0",
            ""
        )
        .await,
        200
    );
    assert_eq!(
        request(
            admin,
            "POST",
            &unsubscribe_path(&data("p2@sink.test")),
            iphone,
            "List-Unsubscribe=One-Click"
        )
        .await,
        200
    );
    let (status, recorded) = server
        .api(
            "POST",
            "/api/v1/events",
            Some(&json!({"events": [{
                "type": "conversion",
                "recipient": "p3@sink.test",
                "campaign": "summer",
                "variant": variant_of("p3@sink.test"),
            }]})),
        )
        .await;
    assert_eq!(status, 200, "{recorded}");
    assert_eq!(recorded["conversions"], 1);

    let events = wait_events(&posts, "every campaign event", |events| {
        let n = |kind: &str| {
            events
                .iter()
                .filter(|e| e["event"] == kind && e["campaign"] == "summer")
                .count()
        };
        n("delivered") == 6
            && n("bounced") == 1
            && n("open") == 2
            && n("click") == 1
            && n("unsubscribed") == 1
            && n("conversion") == 1
    })
    .await;
    let mut expected: std::collections::BTreeMap<String, [u64; 8]> = Default::default();
    for e in &events {
        let who = e["recipient"].as_str().unwrap();
        // (The DSN of the refused address goes back to the sender: no campaign mail.)
        if e["event"] == "suppressed" || !who.ends_with("@sink.test") {
            continue;
        }
        assert_eq!(e["campaign"], "summer", "{e}");
        let variant = e["variant"]
            .as_str()
            .unwrap_or_else(|| panic!("no variant: {e}"));
        assert_eq!(variant, variant_of(who), "{e}");
        let row = expected.entry(variant.to_owned()).or_default();
        let machine = e["machine"] == true;
        let i = match e["event"].as_str().unwrap() {
            "delivered" => 0,
            "bounced" => 1,
            "open" if machine => 3,
            "open" => 2,
            "click" => 4,
            "unsubscribed" => 5,
            "complaint" => 6,
            "conversion" => 7,
            other => panic!("unexpected {other}: {e}"),
        };
        row[i] += 1;
    }
    let (status, results) = server
        .api("GET", "/api/v1/campaigns/summer/results", None)
        .await;
    assert_eq!(status, 200, "{results}");
    let fields = [
        "sends",
        "bounces",
        "human_opens",
        "machine_opens",
        "clicks",
        "unsubscribes",
        "complaints",
        "conversions",
    ];
    let rows = results["variants"].as_array().unwrap();
    assert_eq!(rows[0]["variant"], "a");
    assert_eq!(rows[1]["variant"], "b");
    for row in rows {
        let v = row["variant"].as_str().unwrap();
        let want = expected.get(v).copied().unwrap_or_default();
        for (field, want) in fields.iter().zip(want) {
            assert_eq!(row[field], want, "{v}.{field}: {results}");
        }
        let open = &row["rates"]["open"];
        let (k, n) = (want[2] as f64, want[0] as f64);
        assert!(
            (open["mean"].as_f64().unwrap() - (1.0 + k) / (2.0 + n)).abs() < 1e-9,
            "{open}"
        );
        assert!(open["low"].as_f64().unwrap() < open["mean"].as_f64().unwrap());
        assert!(open["high"].as_f64().unwrap() > open["mean"].as_f64().unwrap());
    }
    let best: f64 = rows
        .iter()
        .map(|r| r["rates"]["open"]["best"].as_f64().unwrap())
        .sum();
    assert!((best - 1.0).abs() < 1e-9, "{results}");

    // The same numbers as gauges.
    let (_, metrics) = crate::harness::http(admin, "GET", "/metrics", None, None).await;
    let gauge_sum = |family: &str, labels: &[&str]| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let sent: f64 = gauge_sum(
        "tern_campaign_events",
        &["campaign=\"summer\"", "kind=\"sends\""],
    );
    assert_eq!(sent, 6.0, "{metrics}");
    let best = gauge_sum(
        "tern_campaign_best_probability",
        &["campaign=\"summer\"", "rate=\"open\""],
    );
    assert!((best - 1.0).abs() < 1e-6, "{metrics}");

    // The delivery log names campaign and variant.
    server.flush_delivery_log().await;
    let log = std::fs::read_to_string(server.dir.path().join("delivery.log")).unwrap();
    let line: Value = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["recipient"] == "p4@sink.test")
        .expect("a log line for p4");
    assert_eq!(line["campaign"], "summer", "{line}");
    assert_eq!(
        line["variant"],
        variant_of("p4@sink.test").as_str(),
        "{line}"
    );

    // The bandit learns from delivered sends only: six were delivered, one bounced.
    let sidecar = server.daemon().sidecar().clone();
    sidecar.apply_bandit_batch().await;
    let arms = sidecar.bandit_arms("summer");
    let sends: f64 = arms.values().map(|a| a.sends).sum();
    assert_eq!(sends, 6.0, "{arms:?}");
    drop(sidecar);
    server.stop().await;
}

/// The `Feedback-ID` field of a delivered message's header section (unfolded), all of them.
fn feedback_ids(data: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next().unwrap().replace("\r\n ", " ");
    head.lines()
        .filter_map(|l| l.strip_prefix("Feedback-ID: "))
        .map(str::to_owned)
        .collect()
}

/// Complaints and bounces that come back by mail, long after delivery, count for the
/// campaign and variant of the message they are about: every campaign message carries a
/// DKIM-signed `Feedback-ID` (`campaign:variant:identity:sender_id`), an ARF report returning
/// the message and a DSN returning its headers (both sent over SMTP to the bounce domain) are
/// read back to it, and the webhook events and the results endpoint show them. A report whose
/// Feedback-ID names a campaign that does not exist, or is oversized or in another charset,
/// is still a complaint, but of no campaign, and no gauge gets its label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complaints_and_async_bounces_by_mail_count_for_their_campaign_and_variant() {
    use crate::edge::{arf_about, dsn_returning, outsider};
    use crate::sink::{Sink, SinkBehaviour};
    use crate::suppression::{receiver, wait_events, SECRET};
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkBehaviour::default()).await;
    let (hook, posts, _hook_task) = receiver("127.0.0.1:0".parse().unwrap()).await;
    let hook_secret = dir.path().join("hook.secret");
    std::fs::write(&hook_secret, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(
        &hook_secret,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (key, record) = crate::dkim::keygen(dir.path(), "fb", &["--algorithm", "ed25519"]);
    let bounce_domain = "bounce.example.com";
    let options = Options::default()
        .deliver()
        .relay(&["127.0.0.1/32"])
        .route("sink.test", sink.addr)
        .dkim(format!(
            "domain = \"example.com\"\nselector = \"fb\"\nkey = {:?}",
            key.display().to_string()
        ))
        .extra(format!(
            "[bounce]\ndomains = [\"{bounce_domain}\"]\n\n\
             [sidecar]\nfeedback_sender_id = \"acme-mail\"\n\n\
             [sidecar.bandit]\nholdout = 0.0\n\n\
             [[webhooks]]\nurl = \"http://{hook}/hook\"\nsecret_file = {:?}\ninterval = \"50ms\"\n",
            hook_secret.display().to_string(),
        ));
    let server = TestServer::start(options).await;
    let (status, created) = server
        .api(
            "POST",
            "/api/v1/campaigns",
            Some(&json!({
                "name": "autumn",
                "subject": "Autumn",
                "text": "Leaves\n",
                "variants": [{"id": "a"}, {"id": "b", "subject": "Autumn B"}],
                "bandit": {"strategy": "fixed", "min_sends": 5},
            })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let people = ["c0", "c1", "c2", "c3"];
    let to: Vec<String> = people.iter().map(|p| format!("{p}@sink.test")).collect();
    let (status, answer) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "news@example.com",
                "to": to,
                // A Feedback-ID of the submitter's own is replaced, not kept beside tern's.
                "raw": "From: news@example.com\nTo: list@example.com\nFeedback-ID: x:y:z:forged-id\nSubject: x\n\nx\n",
                "sidecar": {"campaign": "autumn"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let got = sink.wait_for_messages(4, Duration::from_secs(20)).await;
    let data = |who: &str| {
        got.iter()
            .find(|m| m.rcpts.iter().any(|r| r.address == who))
            .unwrap_or_else(|| panic!("nothing delivered to {who}"))
            .data
            .clone()
    };
    let variant_of = |who: &str| {
        answer["sidecar"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["recipient"] == who)
            .and_then(|r| r["variant"].as_str())
            .unwrap()
            .to_owned()
    };
    for who in &to {
        let message = data(who);
        assert_eq!(
            feedback_ids(&message),
            [format!("autumn:{}:example.com:acme-mail", variant_of(who))],
            "{who}"
        );
        // Signed after it was added, and signed (over-signed: none can be added later).
        let text = String::from_utf8_lossy(&message).to_string();
        let signature = text
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .replace("\r\n ", " ")
            .replace("\r\n\t", " ");
        let h = signature
            .lines()
            .find(|l| l.starts_with("DKIM-Signature:"))
            .and_then(|l| l.split("h=").nth(1))
            .map(|h| {
                h.split(';')
                    .next()
                    .unwrap()
                    .replace(' ', "")
                    .to_ascii_lowercase()
            })
            .unwrap_or_else(|| panic!("no DKIM-Signature h= in {text}"));
        assert_eq!(
            h.split(':').filter(|n| *n == "feedback-id").count(),
            2,
            "{h}"
        );
        if crate::dkim::dkimpy_available() {
            let signed_from = text.find("DKIM-Signature:").unwrap();
            let signed = &message[signed_from..];
            assert!(
                crate::dkim::dkimpy_verifies(dir.path(), &record, signed),
                "{who}: {text}"
            );
            let altered = String::from_utf8_lossy(signed)
                .replace(&format!("autumn:{}:", variant_of(who)), "autumn:zz:");
            assert!(
                !crate::dkim::dkimpy_verifies(dir.path(), &record, altered.as_bytes()),
                "{who}: an altered Feedback-ID breaks the signature"
            );
        }
    }

    let bounces = format!("bounces@{bounce_domain}");
    let mut c = outsider(server.smtp).await;
    // A complaint returning c0's message whole, a DSN returning c1's headers.
    c.submit(
        "",
        &[&bounces],
        &arf_about(&data("c0@sink.test"), "c0@sink.test"),
    )
    .await;
    c.submit(
        "",
        &[&bounces],
        &dsn_returning(&bounces, "c1@sink.test", &data("c1@sink.test")),
    )
    .await;
    // c2's genuine copy (its X-Tern-Id ties the recipient) with the Feedback-ID changed to
    // a campaign that does not exist; c3's with an oversized campaign name and with one in
    // another charset.
    let swap = |who: &str, value: &str| {
        String::from_utf8_lossy(&data(who))
            .replace(
                &format!("autumn:{}:example.com:acme-mail", variant_of(who)),
                value,
            )
            .into_bytes()
    };
    c.submit(
        "",
        &[&bounces],
        &arf_about(
            &swap("c2@sink.test", "nosuch:a:example.com:acme-mail"),
            "c2@sink.test",
        ),
    )
    .await;
    for value in [
        format!("{}:a:example.com:acme-mail", "x".repeat(900)),
        format!("{}:a:example.com:acme-mail", "x".repeat(65)),
        "autumn<script>:a:example.com:acme-mail".to_owned(),
    ] {
        c.submit(
            "",
            &[&bounces],
            &arf_about(&swap("c3@sink.test", &value), "c3@sink.test"),
        )
        .await;
    }

    let events = wait_events(&posts, "complaints and the bounce", |events| {
        let n = |kind: &str| events.iter().filter(|e| e["event"] == kind).count();
        n("complaint") == 5 && n("bounced") == 1
    })
    .await;
    let mut expected: std::collections::BTreeMap<String, [u64; 2]> = Default::default();
    for e in events
        .iter()
        .filter(|e| e["event"] == "complaint" || e["event"] == "bounced")
    {
        let who = e["recipient"].as_str().unwrap();
        match who {
            "c0@sink.test" | "c1@sink.test" => {
                assert_eq!(e["campaign"], "autumn", "{e}");
                let variant = e["variant"].as_str().unwrap_or_else(|| panic!("{e}"));
                assert_eq!(variant, variant_of(who), "{e}");
                let row = expected.entry(variant.to_owned()).or_default();
                row[usize::from(e["event"] == "bounced")] += 1;
            }
            _ => {
                assert_eq!(e["event"], "complaint", "{e}");
                assert!(e.get("campaign").is_none(), "not trusted: {e}");
                assert!(e.get("variant").is_none(), "not trusted: {e}");
            }
        }
    }
    assert_eq!(expected.values().map(|r| r[0] + r[1]).sum::<u64>(), 2);
    // The suppression events of the attributed ones name the campaign too.
    assert!(events.iter().any(|e| e["event"] == "suppressed"
        && e["recipient"] == "c0@sink.test"
        && e["campaign"] == "autumn"));

    let (status, results) = server
        .api("GET", "/api/v1/campaigns/autumn/results", None)
        .await;
    assert_eq!(status, 200, "{results}");
    // The campaign's own bandit settings over [sidecar.bandit]'s.
    assert_eq!(
        results["bandit"],
        json!({"strategy": "fixed", "exploration": 0.1, "holdout": 0.0, "min_sends": 5}),
        "{results}"
    );
    for row in results["variants"].as_array().unwrap() {
        let v = row["variant"].as_str().unwrap();
        let want = expected.get(v).copied().unwrap_or_default();
        assert_eq!(row["complaints"], want[0], "{v}: {results}");
        assert_eq!(row["bounces"], want[1], "{v}: {results}");
    }
    let (status, _) = server
        .api("GET", "/api/v1/campaigns/nosuch/results", None)
        .await;
    assert_eq!(status, 404);
    // No gauge carries a label a report made up.
    let (_, metrics) = crate::harness::http(server.admin(), "GET", "/metrics", None, None).await;
    let complaints: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tern_campaign_events{") && l.contains("kind=\"complaints\""))
        .map(|l| {
            assert!(l.contains("campaign=\"autumn\""), "{l}");
            l.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
        })
        .sum();
    assert_eq!(complaints, 1.0, "{metrics}");
    assert!(
        !metrics.contains("nosuch")
            && !metrics.contains("xxxxxxxx")
            && !metrics.contains("<script>")
    );
    server.stop().await;
}
