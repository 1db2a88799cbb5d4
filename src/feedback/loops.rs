//! Feedback-loop sources: which complaint reports (ARF, RFC 5965) come from a mailbox
//! provider's feedback loop the operator signed up for (`bounce.feedback_loops`).
//!
//! A provider's FBL report may not return our `X-Tern-Id` (some redact the original), so
//! it cannot always be tied to mail tern sent; it is believed instead because of who sent
//! it: a DKIM signature (verified with mail-auth, keys looked up in DNS) whose `d=` is one
//! of the configured domains or below one. Anyone can write `d=yahoo.com`; only Yahoo can
//! make it verify.
//!
//! Invariants: a signature with a body length limit (`l=`) never vouches (content appended
//! after the signed part would be believed); signatures of other domains are not verified
//! at all (an attacker cannot make the processor look up keys of domains it chooses beyond
//! the configured ones); a DNS failure vouches for nothing (the report then counts only if
//! it is tied to sent mail the usual way).

use std::net::SocketAddr;

use mail_auth::hickory_resolver::config::ResolverOpts;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};

/// The configured feedback-loop domains and a resolver to check their signatures.
pub struct FeedbackLoops {
    /// Lowercase, without a trailing dot.
    domains: Vec<String>,
    authenticator: MessageAuthenticator,
}

impl FeedbackLoops {
    /// `None` when no domain is configured. `nameservers` as `delivery.nameservers`: empty
    /// means the system's resolver configuration.
    pub fn new(
        domains: &[String],
        nameservers: &[SocketAddr],
    ) -> Result<Option<FeedbackLoops>, String> {
        if domains.is_empty() {
            return Ok(None);
        }
        let authenticator = if nameservers.is_empty() {
            MessageAuthenticator::new_system_conf()
        } else {
            MessageAuthenticator::new(
                crate::routing::dns::resolver_config(nameservers),
                ResolverOpts::default(),
            )
        }
        .map_err(|e| format!("cannot set up DNS for bounce.feedback_loops: {e}"))?;
        Ok(Some(FeedbackLoops {
            domains: domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
            authenticator,
        }))
    }

    /// The configured domain `d` is under, if any.
    fn configured(&self, d: &str) -> Option<&str> {
        let d = d.trim_end_matches('.').to_ascii_lowercase();
        self.domains
            .iter()
            .find(|c| {
                d == **c
                    || (d.len() > c.len() + 1
                        && d.ends_with(c.as_str())
                        && d.as_bytes()[d.len() - c.len() - 1] == b'.')
            })
            .map(String::as_str)
    }

    /// A cheap look at the header section before the real check: whether it has a
    /// DKIM-Signature field and names a configured domain at all (most bounce mail does not).
    pub fn may_vouch(&self, message: &[u8]) -> bool {
        let end = memchr::memmem::find(message, b"\r\n\r\n")
            .or_else(|| memchr::memmem::find(message, b"\n\n"))
            .unwrap_or(message.len());
        let header = message[..end].to_ascii_lowercase();
        memchr::memmem::find(&header, b"dkim-signature:").is_some()
            && self
                .domains
                .iter()
                .any(|d| memchr::memmem::find(&header, d.as_bytes()).is_some())
    }

    /// The configured feedback-loop domain whose DKIM signature on `message` verifies, if any.
    pub async fn verified_source(&self, message: &[u8]) -> Option<String> {
        let mut parsed = AuthenticatedMessage::parse(message)?;
        // Only signatures that could vouch are checked: of a configured domain, covering
        // the whole body.
        parsed
            .dkim_headers
            .retain(|h| h.header.l == 0 && self.configured(&h.header.d).is_some());
        if parsed.dkim_headers.is_empty() {
            return None;
        }
        let outputs = self.authenticator.verify_dkim(&parsed).await;
        outputs.iter().find_map(|output| {
            let signature = output.signature()?;
            (*output.result() == DkimResult::Pass)
                .then(|| self.configured(&signature.d).map(str::to_owned))
                .flatten()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_vouches_for_itself_and_its_subdomains_only() {
        let loops = FeedbackLoops::new(
            &["fbl.example".to_owned()],
            &["127.0.0.1:53".parse().unwrap()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(loops.configured("fbl.example"), Some("fbl.example"));
        assert_eq!(loops.configured("FBL.Example."), Some("fbl.example"));
        assert_eq!(loops.configured("mail.fbl.example"), Some("fbl.example"));
        assert_eq!(loops.configured("evilfbl.example"), None);
        assert_eq!(loops.configured("fbl.example.evil"), None);
        assert_eq!(loops.configured("example"), None);
    }

    #[test]
    fn no_domains_no_verifier() {
        assert!(FeedbackLoops::new(&[], &[]).unwrap().is_none());
    }
}
