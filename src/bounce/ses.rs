//! Amazon SES notifications: the JSON SES publishes for bounces, complaints and deliveries
//! (`notificationType`, or `eventType` for event publishing), bare or inside an Amazon SNS
//! envelope (`{"Type": "Notification", "Message": "<the JSON as a string>"}`), posted to an
//! endpoint or sent as the body of an "AWS Notification Message" mail.
//!
//! Mapping: `Bounce` -> kind `dsn`, one recipient per `bouncedRecipients[]` entry
//! (`emailAddress`, `status`, `action`, `diagnosticCode`; without a status, `Permanent` is
//! `5.0.0` failed and `Transient` is `4.0.0` delayed); `Complaint` -> kind `arf`, one per
//! `complainedRecipients[]`, the diagnostic `complaintFeedbackType` (else `abuse`);
//! `Delivery` -> kind `dsn`, action `delivered`, one per `delivery.recipients[]`.
//!
//! Bounded: serde_json reads the first JSON value of the text in one linear pass; at most
//! [`super::MAX_RECIPIENTS`] recipients.

use serde_json::Value;

use super::classify::{self, Classifier};
use super::reason::{self, Reason};
use super::{clean_diagnostic, BounceRecipient, Kind, Report, ReportedAction, MAX_RECIPIENTS};
use crate::taxonomy::Category;

/// The report of the SES notification that `text` starts with (after white space), if it
/// is one.
pub fn parse(text: &str, classifier: &Classifier) -> Option<Report> {
    let text = text.trim_start();
    if !text.starts_with('{') {
        return None;
    }
    let first = |text: &str| {
        serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .next()?
            .ok()
    };
    // A mail body may wrap the one-line JSON at any point (inside strings too): then the
    // paragraph is read with its line breaks removed.
    let value: Value = first(text).or_else(|| {
        let paragraph = text.split("\n\n").next().unwrap_or(text);
        first(&paragraph.replace('\n', ""))
    })?;
    // An SNS envelope carries the notification as a string.
    let value = match value.get("Message").and_then(Value::as_str) {
        Some(inner) => serde_json::from_str(inner).ok()?,
        None => value,
    };
    let kind = value
        .get("notificationType")
        .or_else(|| value.get("eventType"))
        .and_then(Value::as_str)?;
    let list = |outer: &str, inner: &str| -> Vec<Value> {
        value
            .get(outer)
            .and_then(|o| o.get(inner))
            .and_then(Value::as_array)
            .map(|a| a.iter().take(MAX_RECIPIENTS).cloned().collect())
            .unwrap_or_default()
    };
    let address = |v: &Value| -> Option<String> {
        let a = v.as_str().or_else(|| v.get("emailAddress")?.as_str())?;
        let a = super::clean_address(a);
        super::text::is_address(&a).then_some(a)
    };
    match kind {
        "Bounce" => {
            let transient = value
                .get("bounce")
                .and_then(|b| b.get("bounceType"))
                .and_then(Value::as_str)
                == Some("Transient");
            let recipients = list("bounce", "bouncedRecipients")
                .iter()
                .filter_map(|r| {
                    let address = address(r)?;
                    let diagnostic = r
                        .get("diagnosticCode")
                        .and_then(Value::as_str)
                        .and_then(clean_diagnostic);
                    let action = r
                        .get("action")
                        .and_then(Value::as_str)
                        .and_then(ReportedAction::parse)
                        .unwrap_or(if transient {
                            ReportedAction::Delayed
                        } else {
                            ReportedAction::Failed
                        });
                    let status = r.get("status").and_then(Value::as_str);
                    let text = diagnostic.as_deref().unwrap_or("");
                    let c = classifier.classify_notice(status, text, Some(action.default_status()));
                    Some(BounceRecipient {
                        reason: reason::reason_in(
                            c.category,
                            c.status.as_deref(),
                            text,
                            reason::Context {
                                failed: action == ReportedAction::Failed,
                                phase: None,
                                explicit_status: status.is_some_and(classify::is_enhanced)
                                    || classify::status_in(text).is_some(),
                                local_program: false,
                                provider: None,
                            },
                        ),
                        address,
                        original_recipient: None,
                        status: c.status,
                        action,
                        diagnostic,
                        category: c.category,
                        hard: c.hard,
                    })
                })
                .collect();
            Some(Report {
                kind: Kind::Dsn,
                recipients,
            })
        }
        "Complaint" => {
            let feedback = value
                .get("complaint")
                .and_then(|c| c.get("complaintFeedbackType"))
                .and_then(Value::as_str)
                .unwrap_or("abuse")
                .to_ascii_lowercase();
            let addresses = list("complaint", "complainedRecipients")
                .iter()
                .filter_map(address)
                .collect();
            Some(super::complaint(addresses, Some(feedback)))
        }
        "Delivery" => {
            let recipients = list("delivery", "recipients")
                .iter()
                .filter_map(address)
                .map(|address| BounceRecipient {
                    address,
                    original_recipient: None,
                    status: Some("2.0.0".to_owned()),
                    action: ReportedAction::Delivered,
                    diagnostic: value
                        .get("delivery")
                        .and_then(|d| d.get("smtpResponse"))
                        .and_then(Value::as_str)
                        .and_then(clean_diagnostic),
                    category: Category::Delivered,
                    reason: Reason::Delivered,
                    hard: false,
                })
                .collect();
            Some(Report {
                kind: Kind::Dsn,
                recipients,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sns_envelope_wrapped_mail_json_and_other_text() {
        let classifier = Classifier::defaults();
        let inner = r#"{"notificationType":"Bounce","bounce":{"bounceType":"Transient","bouncedRecipients":[{"emailAddress":"a@b.example"}]}}"#;
        let envelope = serde_json::json!({"Type": "Notification", "Message": inner}).to_string();
        let report = parse(&envelope, &classifier).unwrap();
        assert_eq!(report.kind, Kind::Dsn);
        assert_eq!(report.recipients[0].address, "a@b.example");
        assert_eq!(report.recipients[0].action, ReportedAction::Delayed);
        assert_eq!(report.recipients[0].status.as_deref(), Some("4.0.0"));
        // A mail body that wrapped the JSON inside a string.
        let wrapped = "{\"notificationType\":\"Complaint\",\"complaint\":{\"complainedRecip\nients\":[{\"emailAddress\":\"c@d.example\"}]}}\n\n--\nfooter";
        let report = parse(wrapped, &classifier).unwrap();
        assert_eq!(report.kind, Kind::Arf);
        assert_eq!(report.recipients[0].address, "c@d.example");
        assert!(parse("not json", &classifier).is_none());
        assert!(parse(r#"{"Type":"SubscriptionConfirmation"}"#, &classifier).is_none());
    }
}
