//! DKIM signing (RFC 6376, RFC 8463): the configured keys, the signatures added to outgoing
//! mail, and the key generation and DNS record behind `tern dkim keygen`.
//!
//! What this module owns:
//! - [`DkimSigners`]: every `[[dkim]]` key, loaded and checked once at start and grouped by
//!   domain. A message is signed with every key of the domain of its first `From:` address
//!   that is within its rotation window (`active_from` .. `retire_after`; so RSA and Ed25519
//!   keys of one domain give two signatures), and by nothing else.
//! - [`check_published`]: whether each key's public half is what DNS publishes at
//!   `selector._domainkey.domain` (`tern dkim check`, and the daemon at start and daily).
//! - [`generate_key`], [`txt_value`], [`zone_record`]: new keys as PKCS#8 PEM, and the
//!   `v=DKIM1` record that publishes the public half of any loadable key.
//!
//! Invariants:
//! - A `DkimSigners` only holds keys that sign: RSA of 2048 to 8192 bits (rsa-sha256) or
//!   Ed25519 (ed25519-sha256). Anything else is refused at load with the config key path.
//! - Signatures use relaxed/relaxed canonicalization and carry `t=` but no `x=`: a message may
//!   wait in the spool for days and be verified again after forwarding, so an expiry would
//!   only make good mail fail.
//! - `h=` lists each configured header as often as the message has it; a name in `oversign`
//!   is listed once more (so also when absent), which makes any added instance break the
//!   signature (RFC 6376 8.15). A configured header that is absent and not over-signed is not
//!   listed, so a relay may still add it.
//!
//! The cryptography and the signature syntax are mail-auth's; this module chooses the keys,
//! the header list and the policy above.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use mail_auth::common::crypto::{Algorithm, DkimKey, Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use mail_parser::parsers::MessageStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

use crate::config::{ConfigErrors, DkimConfig};
use crate::telemetry::Metrics;

/// Smallest RSA key accepted: RFC 8301 3.2 forbids signing with less.
const RSA_MIN_BITS: usize = 2048;
/// Largest RSA key the crypto library signs with.
const RSA_MAX_BITS: usize = 8192;

/// All configured signing keys, grouped by (lowercase) domain.
pub struct DkimSigners {
    by_domain: HashMap<String, Vec<Key>>,
    /// Counts signatures made and failed (`tern_dkim_*`).
    metrics: Arc<Metrics>,
}

/// One loaded key and what it signs.
struct Key {
    selector: String,
    key: DkimKey,
    /// Unix seconds `[active_from, retire_after)` in which it signs (rotation).
    active_from: Option<u64>,
    retire_after: Option<u64>,
    /// Header names to sign, lowercase, each once, with whether it is over-signed.
    headers: Vec<(String, bool)>,
}

/// Hand-written so that key material never reaches a log line.
impl fmt::Debug for DkimSigners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<String> = self
            .by_domain
            .iter()
            .flat_map(|(domain, keys)| {
                keys.iter()
                    .map(move |k| format!("{}._domainkey.{domain}", k.selector))
            })
            .collect();
        keys.sort();
        f.debug_struct("DkimSigners").field("keys", &keys).finish()
    }
}

impl DkimSigners {
    /// Loads and checks every key; all failures are reported at once, each naming its config
    /// key and file, e.g. `dkim[1].key: /etc/tern/a.pem: RSA key of 1024 bits, at least 2048
    /// required`. Every signature made and every failure is counted in `metrics`.
    pub fn load(
        configs: &[DkimConfig],
        metrics: Arc<Metrics>,
    ) -> Result<DkimSigners, ConfigErrors> {
        let mut by_domain: HashMap<String, Vec<Key>> = HashMap::new();
        let mut errors = Vec::new();
        for (i, config) in configs.iter().enumerate() {
            let path = &config.key_path;
            match read_signing_key(path) {
                Ok(key) => by_domain
                    .entry(config.domain.to_ascii_lowercase())
                    .or_default()
                    .push(Key {
                        selector: config.selector.clone(),
                        key,
                        active_from: config.active_from,
                        retire_after: config.retire_after,
                        headers: header_plan(&config.headers, &config.oversign),
                    }),
                Err(e) => errors.push(format!("dkim[{i}].key: {}: {e}", path.display())),
            }
        }
        if errors.is_empty() {
            Ok(DkimSigners { by_domain, metrics })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// No keys: nothing is signed.
    pub fn none(metrics: Arc<Metrics>) -> DkimSigners {
        DkimSigners {
            by_domain: HashMap::new(),
            metrics,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// True when every key is Ed25519: signing then costs tens of microseconds, less than
    /// handing the work to another thread, so callers may sign inline.
    pub fn is_cheap(&self) -> bool {
        self.by_domain
            .values()
            .flatten()
            .all(|k| k.key.algorithm() == Algorithm::Ed25519Sha256)
    }

    /// The DKIM-Signature header fields for `message` (headers and body, CRLF line ends), one
    /// per key of the domain of the first `From:` address, each folded and ending in CRLF, in
    /// configuration order; to be prepended to the message. `None` if the message has no
    /// parsable `From:` address or no key for its domain.
    ///
    /// CPU-bound (an RSA signature takes about a millisecond): run it in `spawn_blocking`.
    /// A key that fails to sign is logged and skipped rather than holding the message.
    pub fn sign(&self, message: &[u8]) -> Option<String> {
        let mut names = Vec::new();
        let mut from = None;
        for (name, value) in header_fields(message) {
            if from.is_none() && name.eq_ignore_ascii_case(b"from") {
                from = Some(value);
            }
            names.push(name);
        }
        let domain = address_domain(from?)?;
        let keys = self.by_domain.get(&domain)?;
        let now = crate::clock::now_ms() / 1000;
        let mut out = String::new();
        // Rotation: only keys within their window sign (the next one from its active_from,
        // the old one until its retire_after).
        let active = keys.iter().filter(|k| {
            k.active_from.is_none_or(|t| t <= now) && k.retire_after.is_none_or(|t| now < t)
        });
        for key in active {
            let signer = DkimSigner::from_key(Borrowed(&key.key))
                .domain(domain.as_str())
                .selector(key.selector.as_str())
                .headers(h_template(&key.headers, &names))
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed);
            let algorithm = algorithm_name(key.key.algorithm());
            match signer.sign(message) {
                Ok(signature) => {
                    out.push_str(&signature.to_header());
                    self.metrics.dkim_signed(&domain, algorithm);
                }
                Err(e) => {
                    tracing::warn!(
                        domain = %domain,
                        selector = %key.selector,
                        "DKIM signing failed: {e}"
                    );
                    self.metrics.dkim_failed(&domain, algorithm);
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

/// What DNS publishes for one key, compared with the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// A `v=DKIM1` record whose `p=` is this key's public key.
    Matches,
    /// A record is there, with another key (or none).
    Differs,
    /// No TXT record at the name.
    Missing,
    /// The lookup failed, or the key file could not be read: unknown.
    Unknown(String),
}

/// Where a key is in its rotation at the time of the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// Before `active_from`: publish it now, it signs from then on.
    Pending,
    Active,
    /// After `retire_after`: keep it published for a while (mail signed with it is still
    /// in transit and in mailboxes that verify again), then remove it.
    Retired,
}

/// The check of one `[[dkim]]` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCheck {
    pub domain: String,
    pub selector: String,
    pub rotation: Rotation,
    pub published: Published,
}

impl KeyCheck {
    /// A pending or active key must be published with its own public key; a retired one
    /// may be gone, but a different key under its selector is a mistake.
    pub fn ok(&self) -> bool {
        matches!(
            (&self.published, self.rotation),
            (Published::Matches, _) | (Published::Missing, Rotation::Retired)
        )
    }
}

/// Checks every key of `configs` against DNS at `selector._domainkey.domain`, through
/// `lookup` (the TXT records of a name, `Ok(None)` when there are none). `now` in unix
/// seconds places each key in its rotation.
pub async fn check_published<F, Fut>(configs: &[DkimConfig], now: u64, lookup: F) -> Vec<KeyCheck>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Vec<String>>, String>>,
{
    let mut out = Vec::with_capacity(configs.len());
    for config in configs {
        let rotation = if config.active_from.is_some_and(|t| now < t) {
            Rotation::Pending
        } else if config.retire_after.is_some_and(|t| now >= t) {
            Rotation::Retired
        } else {
            Rotation::Active
        };
        let expected = std::fs::read(&config.key_path)
            .map_err(|e| format!("{}: {e}", config.key_path.display()))
            .and_then(|pem| txt_value(&pem).map_err(|e| e.to_string()))
            .map(|txt| dkim_tag(&txt, "p").unwrap_or_default());
        let published = match expected {
            Err(why) => Published::Unknown(why),
            Ok(expected) => {
                let name = format!("{}._domainkey.{}", config.selector, config.domain);
                match lookup(name).await {
                    Err(why) => Published::Unknown(why),
                    Ok(None) => Published::Missing,
                    Ok(Some(records)) => {
                        let keys: Vec<String> = records
                            .iter()
                            .filter(|r| r.contains("p="))
                            .filter_map(|r| dkim_tag(r, "p"))
                            .collect();
                        if keys.is_empty() {
                            Published::Missing
                        } else if keys.contains(&expected) {
                            Published::Matches
                        } else {
                            Published::Differs
                        }
                    }
                }
            }
        };
        out.push(KeyCheck {
            domain: config.domain.clone(),
            selector: config.selector.clone(),
            rotation,
            published,
        });
    }
    out
}

/// The value of tag `name` of a DKIM key record (`v=DKIM1; k=rsa; p=...`), whitespace
/// removed (a record split into strings may carry some).
fn dkim_tag(record: &str, name: &str) -> Option<String> {
    record.split(';').find_map(|tag| {
        let (k, v) = tag.split_once('=')?;
        (k.trim() == name).then(|| v.chars().filter(|c| !c.is_whitespace()).collect())
    })
}

/// The `a=` algorithm name, as a metric label.
fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Ed25519Sha256 => "ed25519-sha256",
        Algorithm::RsaSha256 => "rsa-sha256",
        Algorithm::RsaSha1 => "rsa-sha1",
    }
}

/// The configured names, deduplicated, in order: `headers` first, then over-signed names
/// that `headers` does not list (over-signing a name implies signing it).
fn header_plan(headers: &[String], oversign: &[String]) -> Vec<(String, bool)> {
    let mut plan: Vec<(String, bool)> = Vec::new();
    for name in headers.iter().chain(oversign) {
        let name = name.to_ascii_lowercase();
        if !plan.iter().any(|(n, _)| *n == name) {
            let over = oversign.iter().any(|o| o.eq_ignore_ascii_case(&name));
            plan.push((name, over));
        }
    }
    plan
}

/// The header list handed to mail-auth for one message. mail-auth signs every instance of a
/// listed name, then appends each list entry that matched nothing to `h=` as it is: so a name
/// present n times and listed twice ends up n+1 times in `h=` (over-signed), a name listed once
/// appears exactly as often as the message has it, and an absent name is listed only if it is
/// over-signed.
fn h_template<'a>(plan: &'a [(String, bool)], present: &[&[u8]]) -> Vec<&'a str> {
    let mut h = Vec::with_capacity(plan.len() * 2);
    for (name, over) in plan {
        let occurs = present
            .iter()
            .any(|p| p.eq_ignore_ascii_case(name.as_bytes()));
        if occurs || *over {
            h.push(name.as_str());
        }
        if occurs && *over {
            h.push(name.as_str());
        }
    }
    h
}

/// The header fields of a CRLF message as (name, value), the value with its folding and final
/// CRLF, up to the empty line that ends the header section. A line without a colon is not a
/// field and is skipped; mail-auth does not sign it either.
fn header_fields(message: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
    let mut rest = message;
    std::iter::from_fn(move || loop {
        if rest.is_empty() || rest.starts_with(b"\r\n") {
            return None;
        }
        // A field ends at the first CRLF not followed by a space or tab (RFC 5322 2.2.3).
        let mut end = rest.len();
        let mut line_end = 0;
        while let Some(i) = memchr::memmem::find(&rest[line_end..], b"\r\n") {
            line_end += i + 2;
            if !matches!(rest.get(line_end), Some(b' ' | b'\t')) {
                end = line_end;
                break;
            }
        }
        let (field, tail) = rest.split_at(end);
        rest = tail;
        let first_line = memchr::memmem::find(field, b"\r\n").unwrap_or(field.len());
        if let Some(colon) = memchr::memchr(b':', &field[..first_line]) {
            return Some((&field[..colon], &field[colon + 1..]));
        }
    })
}

/// The lowercase domain of the first address in a `From:` field value.
fn address_domain(value: &[u8]) -> Option<String> {
    let parsed = MessageStream::new(value).parse_address();
    let address = parsed.as_address()?.first()?.address()?;
    let (_, domain) = address.rsplit_once('@')?;
    let domain = domain.trim_end_matches('.');
    (!domain.is_empty()).then(|| domain.to_ascii_lowercase())
}

/// Lends a shared key to one mail-auth signer: the signer takes its key by value, while the
/// keys are loaded once and used by every delivery at the same time.
struct Borrowed<'a>(&'a DkimKey);

impl SigningKey for Borrowed<'_> {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

/// Why a key cannot be used or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM private key")]
    NotPem,
    #[error("unsupported key type ({0}); DKIM keys are RSA or Ed25519")]
    Unsupported(&'static str),
    #[error("RSA key of {0} bits, at least 2048 required")]
    RsaTooSmall(usize),
    #[error("RSA key of {0} bits, at most 8192 supported")]
    RsaTooLarge(usize),
    #[error("RSA key size {0} not supported; use 2048, 3072, 4096 or 8192")]
    RsaKeySize(usize),
    #[error("invalid {0} key: {1}")]
    Invalid(&'static str, String),
}

/// A private key whose type and size have been checked.
enum PrivateKey {
    Rsa(PrivateKeyDer<'static>),
    /// PKCS#8, v1 (as OpenSSL writes it) or v2.
    Ed25519(Vec<u8>),
}

const RSA_ENCRYPTION_OID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const ED25519_OID: &[u8] = &[0x2b, 0x65, 0x70];

impl PrivateKey {
    /// Parses the first private key in a PEM text: PKCS#1 (`RSA PRIVATE KEY`) or PKCS#8
    /// (`PRIVATE KEY`, RSA or Ed25519).
    fn from_pem(pem: &[u8]) -> Result<PrivateKey, KeyError> {
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| KeyError::NotPem)?;
        let (key, pkcs1) = match &der {
            PrivateKeyDer::Pkcs1(k) => (PrivateKey::Rsa(der.clone_key()), k.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(k) => {
                let (oid, inner) = pkcs8_parts(k.secret_pkcs8_der())
                    .ok_or_else(|| KeyError::Invalid("PKCS#8", "malformed DER".into()))?;
                match oid {
                    RSA_ENCRYPTION_OID => (PrivateKey::Rsa(der.clone_key()), inner),
                    ED25519_OID => {
                        return Ok(PrivateKey::Ed25519(k.secret_pkcs8_der().to_vec()));
                    }
                    _ => return Err(KeyError::Unsupported("PKCS#8 key of another algorithm")),
                }
            }
            PrivateKeyDer::Sec1(_) => return Err(KeyError::Unsupported("EC")),
            _ => return Err(KeyError::Unsupported("unknown")),
        };
        // Measured here rather than left to the library, whose refusal does not say the size.
        let bits = rsa_modulus_bits(pkcs1)
            .ok_or_else(|| KeyError::Invalid("RSA", "malformed DER".into()))?;
        if bits < RSA_MIN_BITS {
            return Err(KeyError::RsaTooSmall(bits));
        }
        if bits > RSA_MAX_BITS {
            return Err(KeyError::RsaTooLarge(bits));
        }
        Ok(key)
    }

    fn signing_key(&self) -> Result<DkimKey, KeyError> {
        match self {
            PrivateKey::Rsa(der) => RsaKey::<Sha256>::from_key_der(der.clone_key())
                .map(DkimKey::Rsa)
                .map_err(|e| KeyError::Invalid("RSA", e.to_string())),
            PrivateKey::Ed25519(pkcs8) => Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8)
                .map(DkimKey::Ed25519)
                .map_err(|e| KeyError::Invalid("Ed25519", e.to_string())),
        }
    }

    /// The DNS TXT record value: `k=rsa` with the SubjectPublicKeyInfo DER (RFC 6376 3.6.1,
    /// what OpenSSL prints), or `k=ed25519` with the raw 32-byte key (RFC 8463 4).
    fn txt_value(&self) -> Result<String, KeyError> {
        let invalid = |e: &dyn fmt::Display| KeyError::Invalid("RSA", e.to_string());
        let (k, public) = match self {
            PrivateKey::Rsa(der) => {
                let pair = match der {
                    PrivateKeyDer::Pkcs1(k) => {
                        aws_lc_rs::rsa::KeyPair::from_der(k.secret_pkcs1_der())
                    }
                    _ => aws_lc_rs::rsa::KeyPair::from_pkcs8(der.secret_der()),
                }
                .map_err(|e| invalid(&e))?;
                let spki = pair.public_key().as_der().map_err(|e| invalid(&e))?;
                ("rsa", spki.as_ref().to_vec())
            }
            PrivateKey::Ed25519(pkcs8) => {
                let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8)
                    .map_err(|e| KeyError::Invalid("Ed25519", e.to_string()))?;
                ("ed25519", key.public_key())
            }
        };
        Ok(format!("v=DKIM1; k={k}; p={}", BASE64.encode(public)))
    }
}

fn read_signing_key(path: &Path) -> Result<DkimKey, String> {
    let pem = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        _ => e.to_string(),
    })?;
    let key = PrivateKey::from_pem(&pem).map_err(|e| e.to_string())?;
    key.signing_key().map_err(|e| e.to_string())
}

/// The TXT record value (`v=DKIM1; k=…; p=…`) publishing the public half of a PEM private
/// key that [`DkimSigners::load`] accepts.
pub fn txt_value(pem: &[u8]) -> Result<String, KeyError> {
    PrivateKey::from_pem(pem)?.txt_value()
}

/// The algorithm of a key to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Ed25519,
    /// 2048, 3072, 4096 or 8192 bits.
    Rsa {
        bits: usize,
    },
}

/// A new key: the private key to store and the record to publish.
pub struct GeneratedKey {
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub private_key_pem: String,
    /// As [`txt_value`] computes it from `private_key_pem`.
    pub txt_value: String,
}

/// Generates a key with the system's random source.
pub fn generate_key(algorithm: KeyAlgorithm) -> Result<GeneratedKey, KeyError> {
    let failed = |what: &'static str| {
        move |e: aws_lc_rs::error::Unspecified| {
            KeyError::Invalid(what, format!("generation failed: {e}"))
        }
    };
    let pkcs8 = match algorithm {
        KeyAlgorithm::Ed25519 => aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .map_err(failed("Ed25519"))?
        .as_ref()
        .to_vec(),
        KeyAlgorithm::Rsa { bits } => {
            use aws_lc_rs::rsa::KeySize;
            let size = match bits {
                2048 => KeySize::Rsa2048,
                3072 => KeySize::Rsa3072,
                4096 => KeySize::Rsa4096,
                8192 => KeySize::Rsa8192,
                _ => return Err(KeyError::RsaKeySize(bits)),
            };
            let pair = aws_lc_rs::rsa::KeyPair::generate(size).map_err(failed("RSA"))?;
            let der: aws_lc_rs::encoding::Pkcs8V1Der<'_> = pair.as_der().map_err(failed("RSA"))?;
            der.as_ref().to_vec()
        }
    };
    // The record is computed from the PEM text, as for a key loaded from a file, so what is
    // printed is what a loadable key publishes.
    let private_key_pem = pkcs8.chunks(48).fold(
        String::from("-----BEGIN PRIVATE KEY-----\n"),
        |mut pem, chunk| {
            pem.push_str(&BASE64.encode(chunk));
            pem.push('\n');
            pem
        },
    ) + "-----END PRIVATE KEY-----\n";
    let txt_value = txt_value(private_key_pem.as_bytes())?;
    Ok(GeneratedKey {
        private_key_pem,
        txt_value,
    })
}

/// The zone-file line publishing `txt_value`:
/// `S._domainkey.D. IN TXT "…"`, split into several quoted strings of at most 255 bytes
/// each (a DNS character-string's limit; verifiers concatenate them).
pub fn zone_record(domain: &str, selector: &str, txt_value: &str) -> String {
    let strings: Vec<String> = txt_value
        .as_bytes()
        .chunks(255)
        .map(|chunk| format!("\"{}\"", String::from_utf8_lossy(chunk)))
        .collect();
    format!(
        "{selector}._domainkey.{}. IN TXT {}",
        domain.trim_end_matches('.'),
        strings.join(" ")
    )
}

const DER_SEQUENCE: u8 = 0x30;
const DER_INTEGER: u8 = 0x02;
const DER_OCTET_STRING: u8 = 0x04;
const DER_OID: u8 = 0x06;

/// Splits the DER element with tag `tag` off the front of `input`: (contents, rest).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if found != tag {
        return None;
    }
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (octets, rest) = rest.split_at(n);
        let len = octets
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, rest)
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The algorithm OID and the inner private key of a PKCS#8 PrivateKeyInfo (RFC 5958 2).
fn pkcs8_parts(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (info, _) = der_element(der, DER_SEQUENCE)?;
    let (_version, rest) = der_element(info, DER_INTEGER)?;
    let (algorithm, rest) = der_element(rest, DER_SEQUENCE)?;
    let (oid, _parameters) = der_element(algorithm, DER_OID)?;
    let (key, _) = der_element(rest, DER_OCTET_STRING)?;
    Some((oid, key))
}

/// The size in bits of the modulus of a PKCS#1 RSAPrivateKey (RFC 8017 A.1.2).
fn rsa_modulus_bits(pkcs1: &[u8]) -> Option<usize> {
    let (key, _) = der_element(pkcs1, DER_SEQUENCE)?;
    let (_version, rest) = der_element(key, DER_INTEGER)?;
    let (modulus, _) = der_element(rest, DER_INTEGER)?;
    let start = modulus.iter().position(|&b| b != 0)?;
    Some((modulus.len() - start) * 8 - modulus[start].leading_zeros() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_auth::common::parse::TxtRecordParser;
    use mail_auth::common::verify::DomainKey;
    use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
    use mail_auth::{
        AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt,
    };
    use std::borrow::Borrow;
    use std::hash::Hash;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// A 1024-bit RSA key (PKCS#1), made with `openssl genrsa -traditional 1024`: too weak to
    /// sign with, which is the point.
    const RSA_1024_PKCS1: &str = "-----BEGIN RSA PRIVATE KEY-----
MIICXQIBAAKBgQCd8l4UoXbV2/v7GaVeUIEf6jFaS4wABqQbDbCPwVlXVpH/xoGc
PZGxZnO/Y0ULAEgXIitZonugTbwldNBvcFgOwQOIaln3qY2XVsrtQ7779vLxoQub
spI+Oa8MZ0gVH/ief7lvBeqNex0ZyEPL0wkWf+oUCHRUW4GEU97P3n8z4QIDAQAB
AoGAIAUQeZI6KyTLsp4CXlpnsvahRrLmEONHxYxC7QG/gOs18epmQCxjKtmgQX54
csB93OK6cxNziI35xIYn80+NKi7t02Z++4MGGulG1YTyfXNqtAcLkN1bUsxL8Avi
ap7xoSfdX8DQRiR705iShAsE/bD2pVsPmWtseYEhSLFESIECQQDSYSMQLB9WsO/B
FjrQf4/cKpKpsPOGWP1kfqWhIS8wi5ZP9gAGkwdeLVCT8BEJVX3oMYa4Rff6eTb4
GsXWm/VpAkEAwDKEaB89SjywiYh64mNA+9WtRyIWLXQE1pnLAv4d03GAFZYy4FuX
IbdAPKYcBnREMqvAay1PpGWU96umGCGjuQJBALMTHg6BEDfxqlM4Qd4CBwmIb4jj
55afHymwp/mszodK+iqcIk92TZo7hlA207mXPPItXhhy7m8VSNYNrANOg6kCQQCU
4c0dly10J2UddOK0IezB6DkNRENnvFrPHl1bmRvjoiV1E1+f2nNNQ9X35TkKauA1
XER3AaeTErl9zbKhONXJAkBPGwxNsKShTtYzzonmEiIWYKVKJimpfAtjaWOAan4N
08KjmYjI0EWod0WUTanENhGuya1jse4rVHmDprDmlNO+
-----END RSA PRIVATE KEY-----
";

    const MESSAGE: &str = concat!(
        "From: \"Alice Example\" <alice@Example.COM>\r\n",
        "To: bob@dest.test\r\n",
        "Subject: quarterly report\r\n",
        "Date: Tue, 1 Jul 2025 10:00:00 +0000\r\n",
        "Message-ID: <1@example.com>\r\n",
        "X-Unsigned: yes\r\n",
        "\r\n",
        "Hello Bob,\r\n",
        "\r\n",
        "the numbers  are attached.   \r\n",
        "\r\n",
        "\r\n",
    );

    /// One RSA-2048 key for all tests: generating one takes a noticeable fraction of a second.
    fn rsa_key() -> &'static GeneratedKey {
        static KEY: OnceLock<GeneratedKey> = OnceLock::new();
        KEY.get_or_init(|| generate_key(KeyAlgorithm::Rsa { bits: 2048 }).unwrap())
    }

    fn config(domain: &str, selector: &str, key_path: PathBuf) -> DkimConfig {
        DkimConfig {
            domain: domain.into(),
            selector: selector.into(),
            key_path,
            headers: crate::config::DEFAULT_DKIM_HEADERS
                .iter()
                .map(|h| h.to_string())
                .collect(),
            oversign: crate::config::DEFAULT_DKIM_OVERSIGN
                .iter()
                .map(|h| h.to_string())
                .collect(),
            active_from: None,
            retire_after: None,
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A TXT "cache" answering every DKIM key lookup offline, so mail-auth's own verifier can
    /// check our signatures without DNS.
    struct Records(HashMap<Box<str>, Txt>);

    impl Records {
        fn new(records: &[(&str, &str)]) -> Records {
            Records(
                records
                    .iter()
                    .map(|(name, value)| {
                        let key = DomainKey::parse(value.as_bytes());
                        (Box::from(*name), Txt::from(key))
                    })
                    .collect(),
            )
        }
    }

    impl ResolverCache<Box<str>, Txt> for Records {
        fn get<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.get(name).cloned()
        }

        fn remove<Q>(&self, _: &Q) -> Option<Txt>
        where
            Box<str>: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            None
        }

        fn insert(&self, _: Box<str>, _: Txt, _: std::time::Instant) {}
    }

    /// mail-auth's verdict on each signature of `message`.
    async fn verify(message: &[u8], records: &Records) -> Vec<DkimResult> {
        // Never queried: every lookup is answered by `records`.
        let authenticator = MessageAuthenticator::new(
            ResolverConfig::from_name_servers(vec![]),
            ResolverOpts::default(),
        )
        .unwrap();
        let parsed = AuthenticatedMessage::parse(message).unwrap();
        authenticator
            .verify_dkim(Parameters::new(&parsed).with_txt_cache(records))
            .await
            .iter()
            .map(|output| output.result().clone())
            .collect()
    }

    fn signed(signers: &DkimSigners, message: &str) -> Vec<u8> {
        let headers = signers.sign(message.as_bytes()).expect("signed");
        [headers.as_bytes(), message.as_bytes()].concat()
    }

    /// The `h=` names of each DKIM-Signature field in `headers`.
    fn signed_names(headers: &str) -> Vec<Vec<String>> {
        headers
            .split("DKIM-Signature:")
            .skip(1)
            .map(|field| {
                let unfolded: String = field.split_whitespace().collect();
                let h = unfolded
                    .split(';')
                    .find_map(|tag| tag.strip_prefix("h="))
                    .unwrap();
                h.split(':').map(str::to_ascii_lowercase).collect()
            })
            .collect()
    }

    #[test]
    fn load_reports_every_bad_key_with_its_config_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let garbage = write(dir.path(), "garbage.pem", "not a key\n");
        let weak = write(dir.path(), "weak.pem", RSA_1024_PKCS1);
        let good = write(dir.path(), "good.pem", &rsa_key().private_key_pem);
        let configs = [
            config("example.com", "a", missing.clone()),
            config("example.com", "b", garbage.clone()),
            config("example.com", "c", good),
            config("example.com", "d", weak.clone()),
        ];
        let errors = DkimSigners::load(&configs, Arc::new(Metrics::new()))
            .unwrap_err()
            .0;
        assert_eq!(
            errors,
            [
                format!("dkim[0].key: {}: no such file", missing.display()),
                format!("dkim[1].key: {}: not a PEM private key", garbage.display()),
                format!(
                    "dkim[3].key: {}: RSA key of 1024 bits, at least 2048 required",
                    weak.display()
                ),
            ]
        );
    }

    #[test]
    fn other_key_types_are_refused_by_name() {
        // A P-256 key in SEC1 form, as `openssl ecparam -genkey` writes it.
        let ec = aws_lc_rs::signature::EcdsaKeyPair::generate(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        )
        .unwrap();
        let sec1: aws_lc_rs::encoding::EcPrivateKeyRfc5915Der<'_> =
            ec.private_key().as_der().unwrap();
        let pem = format!(
            "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
            BASE64.encode(sec1.as_ref())
        );
        let err = txt_value(pem.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported key type (EC); DKIM keys are RSA or Ed25519"
        );
        assert!(matches!(
            generate_key(KeyAlgorithm::Rsa { bits: 1024 }),
            Err(KeyError::RsaKeySize(1024))
        ));
    }

    #[test]
    fn generated_keys_publish_the_right_public_key() {
        let ed = generate_key(KeyAlgorithm::Ed25519).unwrap();
        assert!(ed
            .private_key_pem
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let p = ed.txt_value.strip_prefix("v=DKIM1; k=ed25519; p=").unwrap();
        assert_eq!(BASE64.decode(p).unwrap().len(), 32, "raw key, RFC 8463");

        let p = rsa_key()
            .txt_value
            .strip_prefix("v=DKIM1; k=rsa; p=")
            .unwrap();
        let spki = BASE64.decode(p).unwrap();
        // SubjectPublicKeyInfo { AlgorithmIdentifier { rsaEncryption, NULL }, BIT STRING }
        let (info, _) = der_element(&spki, DER_SEQUENCE).unwrap();
        let (algorithm, _) = der_element(info, DER_SEQUENCE).unwrap();
        assert_eq!(
            der_element(algorithm, DER_OID).unwrap().0,
            RSA_ENCRYPTION_OID
        );
    }

    #[test]
    fn zone_record_splits_long_values_into_255_byte_strings() {
        let value = "x".repeat(300);
        let line = zone_record("example.com", "s1", &value);
        assert_eq!(
            line,
            format!(
                "s1._domainkey.example.com. IN TXT \"{}\" \"{}\"",
                "x".repeat(255),
                "x".repeat(45)
            )
        );
        assert_eq!(
            zone_record("example.com", "ed", "v=DKIM1; k=ed25519; p=AAAA"),
            "ed._domainkey.example.com. IN TXT \"v=DKIM1; k=ed25519; p=AAAA\""
        );
    }

    #[tokio::test]
    async fn signs_with_every_key_of_the_from_domain_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ed = generate_key(KeyAlgorithm::Ed25519).unwrap();
        // The same RSA key once more as PKCS#1, the form `openssl genrsa -traditional` writes.
        let pkcs8 = PrivateKeyDer::from_pem_slice(rsa_key().private_key_pem.as_bytes()).unwrap();
        let (_, pkcs1) = pkcs8_parts(pkcs8.secret_der()).unwrap();
        let pkcs1_pem = format!(
            "-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----\n",
            BASE64.encode(pkcs1)
        );
        let signers = DkimSigners::load(
            &[
                config(
                    "example.com",
                    "rsa",
                    write(dir.path(), "rsa.pem", &rsa_key().private_key_pem),
                ),
                config(
                    "example.com",
                    "ed",
                    write(dir.path(), "ed.pem", &ed.private_key_pem),
                ),
                config("other.test", "x", write(dir.path(), "x.pem", &pkcs1_pem)),
            ],
            Arc::new(Metrics::new()),
        )
        .unwrap();
        assert!(!signers.is_empty());
        assert_eq!(
            format!("{signers:?}"),
            "DkimSigners { keys: [\"ed._domainkey.example.com\", \"rsa._domainkey.example.com\", \"x._domainkey.other.test\"] }"
        );
        let records = Records::new(&[
            ("rsa._domainkey.example.com.", &rsa_key().txt_value),
            ("ed._domainkey.example.com.", &ed.txt_value),
            (
                "x._domainkey.other.test.",
                &txt_value(pkcs1_pem.as_bytes()).unwrap(),
            ),
        ]);

        let headers = signers.sign(MESSAGE.as_bytes()).unwrap();
        assert_eq!(headers.matches("DKIM-Signature:").count(), 2, "{headers}");
        assert!(headers.ends_with("\r\n"));
        for line in headers.split("\r\n") {
            assert!(line.len() <= 78, "folded: {line:?}");
        }
        assert!(headers.contains("a=rsa-sha256; s=rsa; d=example.com; c=relaxed/relaxed;"));
        assert!(headers.contains("a=ed25519-sha256; s=ed; d=example.com; c=relaxed/relaxed;"));
        for field in headers.split("DKIM-Signature:").skip(1) {
            let unfolded: String = field.split_whitespace().collect();
            let tags: Vec<&str> = unfolded
                .split(';')
                .filter_map(|tag| tag.split_once('=').map(|(name, _)| name))
                .collect();
            assert_eq!(
                tags,
                ["v", "a", "s", "d", "c", "h", "t", "bh", "b"],
                "a timestamp, no expiry: {field}"
            );
        }
        let message = signed(&signers, MESSAGE);
        assert_eq!(
            verify(&message, &records).await,
            [DkimResult::Pass, DkimResult::Pass]
        );

        let other = MESSAGE.replace("alice@Example.COM", "carol@other.test");
        let message = signed(&signers, &other);
        assert_eq!(verify(&message, &records).await, [DkimResult::Pass]);

        let tampered = String::from_utf8(signed(&signers, MESSAGE))
            .unwrap()
            .replace("numbers", "Numbers");
        let results = verify(tampered.as_bytes(), &records).await;
        assert!(
            results.iter().all(|r| *r != DkimResult::Pass),
            "{results:?}"
        );
    }

    #[test]
    fn only_keys_within_their_rotation_window_sign() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::clock::now_ms() / 1000;
        let key = |selector: &str, from: Option<u64>, until: Option<u64>| {
            let ed = generate_key(KeyAlgorithm::Ed25519).unwrap();
            let path = write(dir.path(), &format!("{selector}.pem"), &ed.private_key_pem);
            DkimConfig {
                active_from: from,
                retire_after: until,
                ..config("example.com", selector, path)
            }
        };
        let signers = DkimSigners::load(
            &[
                key("old", None, Some(now - 60)),
                key("current", Some(now - 3600), Some(now + 3600)),
                key("next", Some(now + 3600), None),
            ],
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let headers = signers.sign(MESSAGE.as_bytes()).unwrap();
        assert_eq!(headers.matches("DKIM-Signature:").count(), 1, "{headers}");
        assert!(headers.contains("s=current;"), "{headers}");
    }

    #[test]
    fn no_signature_without_a_from_address_of_a_configured_domain() {
        let dir = tempfile::tempdir().unwrap();
        let signers = DkimSigners::load(
            &[config(
                "example.com",
                "rsa",
                write(dir.path(), "rsa.pem", &rsa_key().private_key_pem),
            )],
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let elsewhere = MESSAGE.replace("alice@Example.COM", "alice@example.org");
        assert_eq!(signers.sign(elsewhere.as_bytes()), None);
        let subdomain = MESSAGE.replace("alice@Example.COM", "alice@mail.example.com");
        assert_eq!(signers.sign(subdomain.as_bytes()), None);
        let no_from = MESSAGE.replace("From: \"Alice Example\" <alice@Example.COM>\r\n", "");
        assert_eq!(signers.sign(no_from.as_bytes()), None);
        let unparsable = MESSAGE.replace("<alice@Example.COM>", "nobody");
        assert_eq!(signers.sign(unparsable.as_bytes()), None);

        let empty = DkimSigners::load(&[], Arc::new(Metrics::new())).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.sign(MESSAGE.as_bytes()), None);
    }

    #[tokio::test]
    async fn oversigned_headers_cannot_be_added() {
        let dir = tempfile::tempdir().unwrap();
        let ed = generate_key(KeyAlgorithm::Ed25519).unwrap();
        let mut cfg = config(
            "example.com",
            "ed",
            write(dir.path(), "ed.pem", &ed.private_key_pem),
        );
        cfg.headers = ["from", "to", "subject", "date", "reply-to", "references"]
            .map(String::from)
            .to_vec();
        cfg.oversign = ["from", "subject", "to", "list-unsubscribe"]
            .map(String::from)
            .to_vec();
        let signers = DkimSigners::load(&[cfg], Arc::new(Metrics::new())).unwrap();
        let records = Records::new(&[("ed._domainkey.example.com.", &ed.txt_value)]);

        let two_to = MESSAGE.replace(
            "To: bob@dest.test\r\n",
            "To: bob@dest.test\r\nTo: b2@dest.test\r\n",
        );
        let headers = signers.sign(two_to.as_bytes()).unwrap();
        let mut names = signed_names(&headers).remove(0);
        names.sort();
        assert_eq!(
            names,
            [
                "date", // present once, not over-signed
                "from", // present once, over-signed
                "from",
                "list-unsubscribe", // absent, over-signed
                "subject",
                "subject",
                "to", // present twice, over-signed
                "to",
                "to",
            ],
            "absent reply-to/references are not listed: {headers}"
        );

        let message = String::from_utf8(signed(&signers, MESSAGE)).unwrap();
        assert_eq!(
            verify(message.as_bytes(), &records).await,
            [DkimResult::Pass]
        );
        // Allowed in transit: a configured header that is absent and not over-signed
        // (Reply-To), and any header that is not configured.
        let added = message.replace(
            "\r\n\r\nHello",
            "\r\nX-Added: 1\r\nReply-To: x@y.test\r\n\r\nHello",
        );
        assert_eq!(verify(added.as_bytes(), &records).await, [DkimResult::Pass]);
        // Added at the top, where a verifier (taking instances bottom-up) reaches them only
        // through the extra `h=` entries.
        for extra in [
            "Subject: act now",
            "From: mallory@evil.test",
            "List-Unsubscribe: <x>",
        ] {
            let added = format!("{extra}\r\n{message}");
            let results = verify(added.as_bytes(), &records).await;
            assert!(
                matches!(results[..], [DkimResult::Fail(_)]),
                "{extra}: {results:?}"
            );
        }

        // The control: without over-signing, the same addition goes unnoticed.
        let mut cfg = config("example.com", "ed", dir.path().join("ed.pem"));
        cfg.oversign.clear();
        let plain = DkimSigners::load(&[cfg], Arc::new(Metrics::new())).unwrap();
        let message = String::from_utf8(signed(&plain, MESSAGE)).unwrap();
        let added = format!("Subject: act now\r\n{message}");
        assert_eq!(verify(added.as_bytes(), &records).await, [DkimResult::Pass]);
    }

    #[test]
    fn header_fields_follow_folding_and_stop_at_the_body() {
        let message = b"From: a@example.com\r\nSubject: one\r\n\ttwo\r\nnot a field\r\nTo :x\r\n\r\nBody: no\r\n";
        let fields: Vec<(&[u8], &[u8])> = header_fields(message).collect();
        assert_eq!(
            fields,
            [
                (&b"From"[..], &b" a@example.com\r\n"[..]),
                (b"Subject", b" one\r\n\ttwo\r\n"),
                (b"To ", b"x\r\n"),
            ]
        );
        let unterminated: Vec<_> = header_fields(b"Subject: a\r\n b").collect();
        assert_eq!(unterminated, [(&b"Subject"[..], &b" a\r\n b"[..])]);
    }

    #[test]
    fn signers_can_be_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<DkimSigners>();
    }
}
