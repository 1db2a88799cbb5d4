//! One sender per `[[webhooks]]` entry: takes up to `batch_size` events from its outbox,
//! POSTs them as one JSON array with `X-Tern-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>">`, and removes them once the endpoint answered 2xx; anything else (refused
//! connection, timeout, non-2xx) is retried with exponential backoff (1 s doubling to 5 min)
//! with the same events.
//!
//! The sender is the only task that removes events from its outbox: the posted ones, and the
//! oldest ones once the outbox holds more than `max_backlog` (checked before each batch and,
//! while it backs off, whenever events are queued), so its count stays exact.
//!
//! `https://` URLs: TLS with the certificate verified for the URL's host against the public
//! (webpki) roots plus the webhook's `ca_file`, if any (a private CA); a certificate that does
//! not verify fails the post like a refused connection (retried, logged).
//!
//! The HTTP client is minimal on purpose: one request per connection (`Connection: close`),
//! only the status line of the answer is read.

use super::Events;
use crate::config::WebhookConfig;
use crate::telemetry::{StateMap, WebhookResult};
use aws_lc_rs::hmac;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Events dropped from an outbox over its bound per spool write.
const TRIM_CHUNK: usize = 10_000;

/// The signature header value for `body` at unix time `t`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// Runs the sender of webhook `index` until `shutdown`.
/// The TLS client of an `https://` webhook (`None` for `http://`): public roots plus the
/// certificates of `ca_file`. The error names the file.
pub fn connector(config: &WebhookConfig) -> Result<Option<TlsConnector>, String> {
    if !config.url.tls {
        return Ok(None);
    }
    let mut roots = RootCertStore::empty();
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        // A root webpki cannot use is skipped; the others still count.
        let _ = roots.add(cert.clone());
    }
    if let Some(path) = &config.ca_file {
        let private = crate::tls::load_roots(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        roots.extend(private.roots);
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(TlsConnector::from(Arc::new(tls))))
}

pub async fn run(
    events: Events,
    index: usize,
    config: WebhookConfig,
    tls: Option<TlsConnector>,
    secret: Vec<u8>,
    shutdown: CancellationToken,
) {
    let stream = super::stream_name(index);
    let queued = events.queued();
    let mut backoff = FIRST_BACKOFF;
    loop {
        trim(&events, index, &stream, &config).await;
        let batch = match events.spool.events(&stream, config.batch_size) {
            Ok(batch) => batch,
            Err(err) => {
                warn!(error = %err, webhook = %config.url.redacted(), "cannot read the event outbox");
                Vec::new()
            }
        };
        if !batch.is_empty() {
            let mut body =
                Vec::with_capacity(batch.iter().map(|(_, e)| e.len() + 1).sum::<usize>() + 2);
            body.push(b'[');
            for (i, (_, e)) in batch.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(e);
            }
            body.push(b']');
            let t = crate::clock::now_ms() / 1000;
            let sig = signature(&secret, t, &body);
            let posted = tokio::select! {
                posted = tokio::time::timeout(REQUEST_TIMEOUT, post(&config, tls.as_ref(), &sig, &body)) => posted,
                _ = shutdown.cancelled() => return,
            };
            match posted {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    events.metrics().webhook_post(index, WebhookResult::Ok);
                    let seqs: Vec<u64> = batch.iter().map(|(s, _)| *s).collect();
                    match events.spool.remove_events(&stream, &seqs).await {
                        Ok(()) => events
                            .backlog_moved(index, -i64::try_from(seqs.len()).unwrap_or(i64::MAX)),
                        Err(err) => warn!(error = %err, "cannot remove posted events"),
                    }
                    debug!(webhook = %config.url.redacted(), events = seqs.len(), "events posted");
                    backoff = FIRST_BACKOFF;
                    // A full batch: more may be waiting.
                    if seqs.len() == config.batch_size {
                        continue;
                    }
                }
                outcome => {
                    let (result, why) = match outcome {
                        Ok(Ok(status)) => (WebhookResult::Status, format!("status {status}")),
                        Ok(Err(e)) => (WebhookResult::Error, e.to_string()),
                        Err(_) => (WebhookResult::Timeout, "timed out".to_owned()),
                    };
                    events.metrics().webhook_post(index, result);
                    warn!(webhook = %config.url.redacted(), error = %why, retry_in = ?backoff, "webhook post failed");
                    let until = tokio::time::Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // Events keep coming while the endpoint is away: keep the outbox bounded.
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => break,
                            _ = queued.notified() => trim(&events, index, &stream, &config).await,
                            _ = shutdown.cancelled() => return,
                        }
                    }
                    continue;
                }
            }
        }
        // Events queued while the batch was read are found on the next pass at the latest.
        tokio::select! {
            _ = queued.notified() => {
                // Gather what arrives within the interval into one batch.
                tokio::select! {
                    _ = tokio::time::sleep(config.interval) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            _ = tokio::time::sleep(config.interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Drops the oldest events of the outbox while it holds more than `max_backlog`.
async fn trim(events: &Events, index: usize, stream: &str, config: &WebhookConfig) {
    let max = i64::try_from(config.max_backlog).unwrap_or(i64::MAX);
    loop {
        let over = events.backlog(index) - max;
        if over <= 0 {
            return;
        }
        let oldest = match events.spool.events(stream, (over as usize).min(TRIM_CHUNK)) {
            Ok(oldest) if !oldest.is_empty() => oldest,
            Ok(_) => return,
            Err(err) => {
                warn!(error = %err, webhook = %config.url.redacted(), "cannot read the event outbox");
                return;
            }
        };
        let seqs: Vec<u64> = oldest.iter().map(|(s, _)| *s).collect();
        if let Err(err) = events.spool.remove_events(stream, &seqs).await {
            warn!(error = %err, webhook = %config.url.redacted(), "cannot drop events over max_backlog");
            return;
        }
        let dropped = seqs.len() as u64;
        events.backlog_moved(index, -(dropped as i64));
        events
            .metrics()
            .state_evicted(StateMap::WebhookEvents, dropped);
        warn!(webhook = %config.url.redacted(), dropped, max_backlog = config.max_backlog,
            "webhook outbox over max_backlog: oldest events dropped");
    }
}

async fn post(
    config: &WebhookConfig,
    tls: Option<&TlsConnector>,
    sig: &str,
    body: &[u8],
) -> std::io::Result<u16> {
    let url = &config.url;
    let tcp = TcpStream::connect((url.host.as_str(), url.port)).await?;
    match tls {
        None => exchange(tcp, config, sig, body).await,
        Some(tls) => {
            let name = ServerName::try_from(url.host.clone())
                .map_err(|e| std::io::Error::other(format!("{}: {e}", url.host)))?;
            exchange(tls.connect(name, tcp).await?, config, sig, body).await
        }
    }
}

/// One request and the status of its answer, over a plain or TLS connection.
async fn exchange(
    mut conn: impl AsyncRead + AsyncWrite + Unpin,
    config: &WebhookConfig,
    sig: &str,
    body: &[u8],
) -> std::io::Result<u16> {
    let url = &config.url;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nUser-Agent: tern\r\nX-Tern-Signature: {sig}\r\nConnection: close\r\n\r\n",
        url.path,
        url.authority,
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body).await?;
    conn.flush().await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    line.split_whitespace()
        .nth(1)
        .filter(|_| line.starts_with("HTTP/1."))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line in the answer"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hmac_sha256_of_t_dot_body() {
        // Checked against: printf '1700000000.[]' | openssl dgst -sha256 -hmac secret
        let sig = super::signature(b"secret", 1_700_000_000, b"[]");
        assert_eq!(
            sig,
            "t=1700000000,v1=74f76d8933679a54d6be8c7560a5233b124658241ca5a3b0f09af80d3ea60d78"
        );
    }
}
