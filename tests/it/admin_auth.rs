//! The admin API's bearer token over real HTTP: the right token gets through, a wrong or
//! missing one gets 401 with a JSON error, and `/metrics` needs no token.

use crate::harness::*;

#[tokio::test]
async fn api_requires_the_configured_bearer_token() {
    let server = TestServer::start(Options::default()).await;
    let token = server.admin_token();
    assert_eq!(token.len(), 64, "a 256-bit hex token was generated");

    let (status, body) = server.api("GET", "/api/v1/status", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["spool"]["messages"], 0);
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));

    for bad in [None, Some("wrong-token"), Some(&token[..63])] {
        let (status, text) = http(server.admin(), "GET", "/api/v1/status", bad, None).await;
        assert_eq!(status, 401, "token {bad:?}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).expect("JSON error body");
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{json}"
        );
    }

    let (status, text) = http(server.admin(), "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    assert!(text.contains("tern_"), "{text}");
}
