//! `tern suppression ...`: the human rendering of a page of the suppression list.

use serde_json::Value;

/// `tern suppression list`: one line per entry, then the cursor of the next page if any.
pub fn render_suppressions(v: &Value) -> String {
    let mut out = format!(
        "{:<40} {:<18} {:<24} {}\n",
        "ADDRESS", "REASON", "EXPIRES", "SOURCE"
    );
    for e in v["entries"].as_array().into_iter().flatten() {
        let expires = e["expires_ms"]
            .as_u64()
            .map(|t| {
                crate::message::rfc5322_date(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(t),
                )
            })
            .unwrap_or_else(|| "never".into());
        out.push_str(&format!(
            "{:<40} {:<18} {:<24} {}\n",
            e["address"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or(""),
            expires,
            e["source"].as_str().unwrap_or("-"),
        ));
    }
    if let Some(next) = v["next"].as_str() {
        out.push_str(&format!("more: --after {next}\n"));
    }
    out
}
