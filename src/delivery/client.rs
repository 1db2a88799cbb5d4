//! One outbound SMTP connection: connect, greeting, EHLO (HELO fallback), STARTTLS by
//! policy, AUTH, and transactions with per-recipient results.
//!
//! The wire work is mail-send's per-command API (`SmtpClient::{read, cmd, cmds, ehlo,
//! into_tls, authenticate, write_message}`); this module owns the SMTP client logic around
//! it: which extensions and parameters to use, how replies map to recipients, timeouts per
//! phase (RFC 5321 4.5.3.2, from [`SmtpTimeouts`]), the opportunistic-TLS fallback
//! (RFC 7435), and when a connection may be reused.
//!
//! Invariants:
//! - Every reply the server owes is read before the next command. mail-send reads each reply
//!   with a fresh buffer, so bytes of a later reply in the same read would be lost: several
//!   replies are only ever read together with `cmds()` (one pipelined group, RFC 2920).
//! - A connection is reusable only after a clean end of a transaction (or a successful RSET).
//!   A timeout, an I/O error, an unexpected reply state or a `send` future dropped halfway
//!   makes it unusable for good.
//! - Credentials are sent only over TLS whose certificate verified for the host name: under
//!   `Required` the handshake verifies it; under `Opportunistic` (any certificate, so a
//!   man in the middle can present its own) the certificate is checked against the same roots
//!   after the handshake, and AUTH is refused locally when it does not verify.
//! - Rejections by the server are [`RemoteReply`] values per recipient; [`AttemptError`] is
//!   for failures of the connection as a whole.
//! - A connection's [`Lease`] (a place under a connection cap, given by the caller) lives
//!   exactly as long as the connection, idle in the pool included, unless it is taken over by
//!   a replacement connection ([`Connection::take_lease`]).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use mail_send::{Credentials, SmtpClient};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore};
use smtp_proto::{EhloResponse, Response};
use tern_queue::{BodyType, Recipient, Ret};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{SmtpTimeouts, TlsPolicy};
use crate::telemetry::{Metrics, StateMap};
use crate::tls::TlsInfo;

/// QUIT is a courtesy: never wait long for it.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The body must flow at least this fast: writing it may take one `data_block` timeout per
/// started MiB (RFC 5321's per-block timeout, with mail-send writing the body in one call).
const BODY_BYTES_PER_BLOCK: usize = 1 << 20;

/// What every outbound connection shares: our EHLO name, the timeouts and the TLS client
/// configurations (built once, so TLS sessions can be resumed across connections).
#[derive(Clone)]
pub struct ClientSettings {
    pub ehlo_name: String,
    pub timeouts: SmtpTimeouts,
    /// Opportunistic: any certificate is accepted (RFC 7435), signatures are still checked.
    opportunistic: TlsConnector,
    /// Required: the certificate must chain to `roots` and be valid for the host name.
    verified: TlsConnector,
    /// The same check, run after an opportunistic handshake before credentials are sent;
    /// `None` without roots (nothing verifies then).
    verifier: Option<Arc<WebPkiServerVerifier>>,
    /// AUTH over TLS whose certificate does not verify is allowed to a loopback peer (an
    /// operator's explicit choice: `tern queue drain --loopback-unverified`); never set by
    /// delivery.
    unverified_auth_to_loopback: bool,
}

impl ClientSettings {
    pub fn new(ehlo_name: String, timeouts: SmtpTimeouts, roots: RootCertStore) -> ClientSettings {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let roots = Arc::new(roots);
        // Fails only without any root: then no certificate verifies.
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .ok();
        // The aws-lc-rs provider supports both TLS 1.2 and 1.3, so these cannot fail.
        let verified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let opportunistic = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        ClientSettings {
            ehlo_name,
            timeouts,
            opportunistic: TlsConnector::from(Arc::new(opportunistic)),
            verified: TlsConnector::from(Arc::new(verified)),
            verifier,
            unverified_auth_to_loopback: false,
        }
    }

    /// Allows AUTH over TLS with a certificate that does not verify, to a loopback peer only.
    pub fn with_unverified_auth_to_loopback(mut self) -> ClientSettings {
        self.unverified_auth_to_loopback = true;
        self
    }

    /// Whether the certificate `tls` got from the server chains to our roots and is valid
    /// for `host`; `Err` says why not. The handshake already proved the server holds the
    /// certificate's key.
    fn verify_peer(&self, tls: &rustls::ClientConnection, host: &str) -> Result<(), String> {
        let verifier = self.verifier.as_ref().ok_or("no trusted roots")?;
        let (end_entity, intermediates) = tls
            .peer_certificates()
            .and_then(|chain| chain.split_first())
            .ok_or("no certificate")?;
        let name = ServerName::try_from(host).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// RFC 7435 opportunistic TLS: encryption against passive eavesdroppers without
/// authentication, so any certificate is taken; the handshake signatures are still checked,
/// so the peer must hold the key of the certificate it presents.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Hosts whose TLS handshake failed recently: opportunistic TLS then goes plain text to them
/// until the entry expires, instead of failing the handshake on every attempt.
///
/// Bounded: anyone can publish MX hosts whose TLS breaks, so at most [`MAX_BROKEN_TLS_HOSTS`]
/// are remembered; past that, expired entries go, then the ones expiring soonest (counted in
/// `tern_state_evictions_total{map="broken_tls_hosts"}`). A host forgotten early only costs a
/// handshake attempt again.
pub struct BrokenTls {
    /// How long a host stays marked; a config reload may change it (for later marks).
    retry_after: Mutex<Duration>,
    /// Lowercase host name -> when TLS may be tried again.
    until: Mutex<HashMap<String, Instant>>,
    metrics: Arc<Metrics>,
}

/// Hosts [`BrokenTls`] remembers at most.
pub const MAX_BROKEN_TLS_HOSTS: usize = 10_000;

impl BrokenTls {
    /// `retry_after`: how long a host stays marked (`broken_tls_retry` in the config).
    pub fn new(retry_after: Duration, metrics: Arc<Metrics>) -> BrokenTls {
        BrokenTls {
            retry_after: Mutex::new(retry_after),
            until: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Hosts remembered now (expired ones included until room is needed).
    pub fn len(&self) -> usize {
        self.until.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_broken(&self, host: &str) -> bool {
        let until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        until
            .get(&host.to_ascii_lowercase())
            .is_some_and(|&t| Instant::now() < t)
    }

    /// Applies a reloaded `broken_tls_retry`; hosts already marked keep their expiry.
    pub fn set_retry_after(&self, retry_after: Duration) {
        *self.retry_after.lock().unwrap_or_else(|e| e.into_inner()) = retry_after;
    }

    pub fn mark(&self, host: &str) {
        let now = Instant::now();
        let retry_after = *self.retry_after.lock().unwrap_or_else(|e| e.into_inner());
        let host = host.to_ascii_lowercase();
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if until.len() >= MAX_BROKEN_TLS_HOSTS && !until.contains_key(&host) {
            // Only when full: marking stays O(1) otherwise.
            until.retain(|_, t| *t > now);
            if until.len() >= MAX_BROKEN_TLS_HOSTS {
                let soonest = until
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(h, _)| h.clone());
                if let Some(soonest) = soonest {
                    until.remove(&soonest);
                    self.metrics.state_evicted(StateMap::BrokenTlsHosts, 1);
                }
            }
        }
        until.insert(host, now + retry_after);
    }
}

/// What a connection's TLS must satisfy beyond its [`Target::tls`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsChecks<'a> {
    /// DANE (`Target::tls` is `Dane`/`DaneOnly`): the certificate must match these records;
    /// with none usable, any certificate will do, but TLS is still mandatory.
    pub tlsa: Option<&'a Arc<crate::routing::dane::TlsaSet>>,
    /// Check the certificate against the roots after the handshake without enforcing it
    /// (MTA-STS `testing`): the result is [`Connection::peer_check`].
    pub report_peer: bool,
}

/// Where and how to connect.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Host name, for SNI and certificate verification (and the broken-TLS memory).
    pub host: &'a str,
    pub addr: SocketAddr,
    /// Local address to bind, if any.
    pub source: Option<IpAddr>,
    pub tls: TlsPolicy,
    /// Username and password for AUTH (smarthost routes).
    pub auth: Option<(&'a str, &'a str)>,
}

/// The extensions of the last EHLO reply that the client uses. All false after HELO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// `SIZE` was offered; `Some(0)` means without a fixed limit.
    pub size: Option<usize>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub starttls: bool,
    /// AUTH with a mechanism we can use (PLAIN or LOGIN).
    pub auth: bool,
}

/// The mechanisms mail-send can do with the features tern builds it with. Others must not
/// be offered to `authenticate`: it would start them and leave the exchange half done.
const AUTH_MECHANISMS: u64 = smtp_proto::AUTH_PLAIN | smtp_proto::AUTH_LOGIN;

impl Capabilities {
    fn from_ehlo(ehlo: &EhloResponse<String>) -> Capabilities {
        let has = |ext| ehlo.has_capability(ext);
        Capabilities {
            pipelining: has(smtp_proto::EXT_PIPELINING),
            size: has(smtp_proto::EXT_SIZE).then_some(ehlo.size),
            eightbitmime: has(smtp_proto::EXT_8BIT_MIME),
            smtputf8: has(smtp_proto::EXT_SMTP_UTF8),
            dsn: has(smtp_proto::EXT_DSN),
            starttls: has(smtp_proto::EXT_START_TLS),
            auth: has(smtp_proto::EXT_AUTH) && ehlo.auth_mechanisms & AUTH_MECHANISMS != 0,
        }
    }
}

/// A reply from the server (or, for checks made before asking it, one composed locally in
/// the same form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteReply {
    pub code: u16,
    /// RFC 3463 enhanced status code, e.g. "5.1.1", if the reply carried one.
    pub status: Option<String>,
    /// The text after code and status; lines of a multi-line reply joined by '\n'.
    pub text: String,
}

impl RemoteReply {
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    fn local(code: u16, status: &str, text: String) -> RemoteReply {
        RemoteReply {
            code,
            status: Some(status.to_owned()),
            text,
        }
    }
}

impl From<Response<String>> for RemoteReply {
    fn from(r: Response<String>) -> RemoteReply {
        RemoteReply {
            code: r.code,
            // smtp-proto leaves the status zeroed when the reply had none.
            status: (r.esc[0] != 0).then(|| format!("{}.{}.{}", r.esc[0], r.esc[1], r.esc[2])),
            text: r.message,
        }
    }
}

impl fmt::Display for RemoteReply {
    /// One line, "550 5.1.1 text", as logs and DSN Diagnostic-Code fields need it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(status) = &self.status {
            write!(f, " {status}")?;
        }
        if !self.text.is_empty() {
            write!(f, " ")?;
            for (i, line) in self.text.split(['\r', '\n']).enumerate() {
                if i > 0 {
                    write!(f, " ")?;
                }
                f.write_str(line)?;
            }
        }
        Ok(())
    }
}

/// The outcome for one recipient of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptResult {
    pub address: String,
    /// The RCPT reply if it refused the recipient, else the reply after the data (or to
    /// MAIL or DATA if those refused the transaction).
    pub reply: RemoteReply,
}

/// Where in the dialogue a connection-level failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Greeting,
    /// EHLO, or HELO after EHLO was refused.
    Ehlo,
    StartTls,
    Auth,
    /// MAIL, the RCPTs and DATA sent as one pipelined group.
    Envelope,
    Mail,
    Rcpt,
    Data,
    /// Writing the message content.
    Body,
    /// Waiting for the reply after the final dot.
    DataEnd,
    Rset,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Greeting => "greeting",
            Phase::Ehlo => "EHLO",
            Phase::StartTls => "STARTTLS",
            Phase::Auth => "AUTH",
            Phase::Envelope => "MAIL/RCPT/DATA",
            Phase::Mail => "MAIL FROM",
            Phase::Rcpt => "RCPT TO",
            Phase::Data => "DATA",
            Phase::Body => "message transfer",
            Phase::DataEnd => "end of data",
            Phase::Rset => "RSET",
        })
    }
}

/// A failure of the connection as a whole; no recipient got a reply of its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    #[error("timed out in {phase}")]
    Timeout { phase: Phase },
    #[error("connection lost in {phase}: {detail}")]
    Lost { phase: Phase, detail: String },
    /// The greeting was not 220, EHLO and HELO were refused, STARTTLS was refused under
    /// `Required`, AUTH failed, or RSET was refused.
    #[error("{phase} refused: {reply}")]
    Refused { phase: Phase, reply: RemoteReply },
    #[error("TLS handshake failed: {detail}")]
    Tls { detail: String },
    #[error("TLS is required but the server does not offer STARTTLS")]
    NoStartTls,
    #[error("AUTH is configured but the server offers no usable AUTH mechanism")]
    NoAuth,
    #[error("refusing to send credentials without TLS")]
    AuthWithoutTls,
    /// Opportunistic TLS whose certificate did not verify: anyone in the path could have
    /// presented it, so the credentials stay here.
    #[error("refusing to send credentials: the certificate of {host} did not verify ({detail})")]
    AuthUnverifiedTls { host: String, detail: String },
    #[error("protocol error in {phase}: {detail}")]
    Protocol { phase: Phase, detail: String },
}

impl AttemptError {
    /// Whether the failure is final for the message: a 5xx greeting, or EHLO and HELO
    /// refused with 5xx. Everything else may work later. A refused AUTH is not permanent
    /// although it is a 5xx: the credentials are ours to fix, the mail waits meanwhile.
    pub fn is_permanent(&self) -> bool {
        matches!(self, AttemptError::Refused { phase, reply }
            if reply.is_permanent() && *phase != Phase::Auth)
    }

    /// Whether the next MX host should be tried now. Not once the server has the whole
    /// message (timeout or lost connection waiting for the final reply): it may have taken
    /// it, and delivering to another host at once would likely duplicate it.
    pub fn try_next_host(&self) -> bool {
        !matches!(
            self,
            AttemptError::Timeout {
                phase: Phase::DataEnd
            } | AttemptError::Lost {
                phase: Phase::DataEnd,
                ..
            }
        )
    }

    /// One line for the delivery log and a DSN's Diagnostic-Code: the server's reply if
    /// there was one, else what went wrong.
    pub fn reply_text(&self) -> String {
        match self {
            AttemptError::Refused { reply, .. } => reply.to_string(),
            other => other.to_string(),
        }
    }

    /// RFC 3463 enhanced status code for a DSN.
    pub fn status(&self) -> &str {
        match self {
            AttemptError::Refused { reply, .. } => match reply.status.as_deref() {
                Some(status) => status,
                None if reply.is_permanent() => "5.0.0",
                None => "4.0.0",
            },
            // X.4.1: no answer from host.
            AttemptError::Connect { .. }
            | AttemptError::Timeout {
                phase: Phase::Connect,
            } => "4.4.1",
            // X.4.2: bad connection.
            AttemptError::Timeout { .. } | AttemptError::Lost { .. } => "4.4.2",
            // X.7.5: cryptographic failure.
            AttemptError::Tls { .. } => "4.7.5",
            // X.7.4: security features not supported.
            AttemptError::NoStartTls => "4.7.4",
            AttemptError::NoAuth => "4.7.0",
            // X.7.10: encryption needed (RFC 5248 registry, from RFC 4954).
            AttemptError::AuthWithoutTls | AttemptError::AuthUnverifiedTls { .. } => "4.7.10",
            // X.5.0: other protocol status.
            AttemptError::Protocol { .. } => "4.5.0",
        }
    }
}

/// Maps a mail-send error in `phase`.
fn wire_error(phase: Phase, e: mail_send::Error) -> AttemptError {
    use mail_send::Error as E;
    match e {
        E::Timeout => AttemptError::Timeout { phase },
        E::Io(e) => AttemptError::Lost {
            phase,
            detail: e.to_string(),
        },
        // mail-send reports the end of the stream as an unparseable reply; a closed
        // connection is by far the likelier cause.
        E::UnparseableReply => AttemptError::Lost {
            phase,
            detail: "connection closed or unreadable reply".to_owned(),
        },
        E::UnexpectedReply(reply) | E::AuthenticationFailed(reply) => AttemptError::Refused {
            phase,
            reply: reply.into(),
        },
        E::Tls(e) => AttemptError::Tls {
            detail: e.to_string(),
        },
        E::UnsupportedAuthMechanism => AttemptError::NoAuth,
        other => AttemptError::Protocol {
            phase,
            detail: other.to_string(),
        },
    }
}

/// The transport under the SMTP client, before and after STARTTLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// mail-send writes each command, and each piece of a dot-stuffed body, with its own
/// `write_all` and flushes at the end of a command group: the buffer turns a pipelined group
/// or a body into few segments (and TLS records) instead of one per piece.
type Wire = BufWriter<Stream>;

/// What a connection holds for as long as it lives, idle in the pool included, and drops
/// with it: a place under a connection cap (shaping's connection slot). Delivery only
/// carries it; what it counts against is its giver's business.
pub trait Lease: Send + Sync {
    /// The group of connections the lease counts against (shaping: its pair,
    /// `source|bucket`): idle connections whose leases name a group that needs its places
    /// back can be evicted.
    fn group(&self) -> &str;
}

/// One open SMTP connection, after greeting, EHLO, STARTTLS and AUTH.
pub struct Connection {
    client: SmtpClient<Wire>,
    timeouts: SmtpTimeouts,
    host: String,
    addr: SocketAddr,
    source: Option<IpAddr>,
    /// The policy and AUTH user it was opened with: the pool hands it only to a target
    /// asking for the same.
    policy: TlsPolicy,
    /// The DANE records its certificate was checked against (`None`: no DANE check): a
    /// connection is reused only under the same records.
    tlsa: Option<Arc<crate::routing::dane::TlsaSet>>,
    auth_user: Option<String>,
    tls: Option<TlsInfo>,
    capabilities: Capabilities,
    messages_sent: usize,
    reusable: bool,
    /// Held for as long as the connection lives (a shaping connection slot), idle in the pool
    /// included.
    lease: Option<Box<dyn Lease>>,
    /// The certificate check asked for by [`TlsChecks::report_peer`]: `Ok`, or why it
    /// failed; `None` when not asked or not over TLS.
    peer_check: Option<Result<(), String>>,
}

/// Opens a connection to `target`. Under `TlsPolicy::Opportunistic`, a failed TLS handshake
/// marks the host in `broken` and the connection is opened once more without STARTTLS.
pub async fn connect(
    target: &Target<'_>,
    settings: &ClientSettings,
    broken: &BrokenTls,
) -> Result<Connection, AttemptError> {
    connect_as(target, settings, broken, &settings.ehlo_name).await
}

/// [`connect_checked`] without extra checks.
pub async fn connect_as(
    target: &Target<'_>,
    settings: &ClientSettings,
    broken: &BrokenTls,
    ehlo_name: &str,
) -> Result<Connection, AttemptError> {
    connect_checked(target, settings, broken, ehlo_name, TlsChecks::default()).await
}

/// [`connect`] with another EHLO name (the one of a pool's source address) and the TLS
/// checks of the target's policy (DANE records, a reported certificate check).
pub async fn connect_checked(
    target: &Target<'_>,
    settings: &ClientSettings,
    broken: &BrokenTls,
    ehlo_name: &str,
    checks: TlsChecks<'_>,
) -> Result<Connection, AttemptError> {
    if target.auth.is_some() && target.tls == TlsPolicy::Disabled {
        return Err(AttemptError::AuthWithoutTls);
    }
    // Only `may` (and `mta-sts` without an enforced policy, which is `may`) falls back to
    // plain text; every other level with TLS makes it mandatory.
    let fallback = matches!(target.tls, TlsPolicy::Opportunistic | TlsPolicy::MtaSts);
    let try_tls = match target.tls {
        TlsPolicy::Disabled => false,
        _ if fallback => !broken.is_broken(target.host),
        _ => true,
    };
    match open(target, settings, try_tls, ehlo_name, checks).await {
        Err(AttemptError::Tls { .. }) if fallback => {
            broken.mark(target.host);
            open(target, settings, false, ehlo_name, checks).await
        }
        result => result,
    }
}

async fn open(
    target: &Target<'_>,
    settings: &ClientSettings,
    try_tls: bool,
    ehlo_name: &str,
    checks: TlsChecks<'_>,
) -> Result<Connection, AttemptError> {
    let t = &settings.timeouts;
    let tcp = tokio::time::timeout(t.connect, tcp_connect(target.addr, target.source))
        .await
        .map_err(|_| AttemptError::Timeout {
            phase: Phase::Connect,
        })?
        .map_err(|e| AttemptError::Connect {
            addr: target.addr,
            detail: e.to_string(),
        })?;
    let mut plain = SmtpClient {
        stream: tcp,
        timeout: t.greeting,
    };
    // `read` has no timeout of its own.
    let greeting = tokio::time::timeout(t.greeting, plain.read())
        .await
        .map_err(|_| AttemptError::Timeout {
            phase: Phase::Greeting,
        })?
        .map_err(|e| wire_error(Phase::Greeting, e))?;
    if greeting.code != 220 {
        return Err(AttemptError::Refused {
            phase: Phase::Greeting,
            reply: greeting.into(),
        });
    }
    let mut ehlo = hello(&mut plain, ehlo_name, t.ehlo).await?;
    let mut capabilities = ehlo
        .as_ref()
        .map(Capabilities::from_ehlo)
        .unwrap_or_default();

    let mut tls = None;
    let mut peer_check = None;
    // Whether the certificate verified for the host name; checked only where it matters.
    let mut verified = Err("no TLS".to_owned());
    // DANE with usable records: the certificate must match one (`delivery::dane`).
    let dane = checks
        .tlsa
        .filter(|set| !set.usable.is_empty())
        .filter(|_| matches!(target.tls, TlsPolicy::Dane | TlsPolicy::DaneOnly));
    let dane_connector = dane.map(|set| super::dane::connector(set.clone()));
    let stream =
        if try_tls && capabilities.starttls {
            plain.timeout = t.ehlo;
            let reply = plain
                .cmd(b"STARTTLS\r\n")
                .await
                .map_err(|e| wire_error(Phase::StartTls, e))?;
            if reply.code == 220 {
                let connector = match (&dane_connector, target.tls) {
                    (Some(dane), _) => dane,
                    (None, TlsPolicy::Required) => &settings.verified,
                    _ => &settings.opportunistic,
                };
                // `into_tls` bounds the handshake with `plain.timeout` (the EHLO timeout).
                let secured = plain.into_tls(connector, target.host).await.map_err(|e| {
                    AttemptError::Tls {
                        detail: match e {
                            mail_send::Error::Timeout => "handshake timed out".to_owned(),
                            e => e.to_string(),
                        },
                    }
                })?;
                let session = secured.stream.get_ref().1;
                tls = Some(TlsInfo::of(session));
                verified = match target.tls {
                    TlsPolicy::Required => Ok(()),
                    _ if dane.is_some() => Ok(()),
                    _ if target.auth.is_some() || checks.report_peer => {
                        settings.verify_peer(session, target.host)
                    }
                    _ => Err("not checked".to_owned()),
                };
                if checks.report_peer {
                    peer_check = Some(verified.clone());
                }
                let mut client = SmtpClient {
                    stream: BufWriter::new(Stream::Tls(Box::new(secured.stream))),
                    timeout: t.ehlo,
                };
                // RFC 3207 4.2: forget what was learnt before TLS and ask again.
                ehlo = hello(&mut client, ehlo_name, t.ehlo).await?;
                capabilities = ehlo
                    .as_ref()
                    .map(Capabilities::from_ehlo)
                    .unwrap_or_default();
                client
            } else if target.tls.mandatory() {
                return Err(AttemptError::Refused {
                    phase: Phase::StartTls,
                    reply: reply.into(),
                });
            } else {
                // Opportunistic: a refused STARTTLS leaves the session as it was, in plain text.
                wrap_plain(plain)
            }
        } else if target.tls.mandatory() {
            return Err(AttemptError::NoStartTls);
        } else {
            wrap_plain(plain)
        };

    let mut conn = Connection {
        client: stream,
        timeouts: *t,
        host: target.host.to_owned(),
        addr: target.addr,
        source: target.source,
        policy: target.tls,
        tlsa: checks.tlsa.cloned(),
        auth_user: None,
        tls,
        capabilities,
        messages_sent: 0,
        reusable: true,
        lease: None,
        peer_check,
    };
    if let Some((user, password)) = target.auth {
        if conn.tls.is_none() {
            return Err(AttemptError::AuthWithoutTls);
        }
        let waived = settings.unverified_auth_to_loopback && target.addr.ip().is_loopback();
        if let Err(detail) = verified.or_else(|e| if waived { Ok(()) } else { Err(e) }) {
            return Err(AttemptError::AuthUnverifiedTls {
                host: target.host.to_owned(),
                detail,
            });
        }
        let Some(mut ehlo) = ehlo.filter(|_| capabilities.auth) else {
            return Err(AttemptError::NoAuth);
        };
        ehlo.auth_mechanisms &= AUTH_MECHANISMS;
        conn.client.timeout = t.ehlo;
        conn.client
            .authenticate(Credentials::new(user, password), &ehlo)
            .await
            .map_err(|e| wire_error(Phase::Auth, e))?;
        conn.auth_user = Some(user.to_owned());
    }
    Ok(conn)
}

async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(addr).await?;
    // Every write is followed by a flush and a wait for the reply; Nagle would only hold
    // back the last segment of a body (the final dot) until the previous one is acked.
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

fn wrap_plain(plain: SmtpClient<TcpStream>) -> SmtpClient<Wire> {
    SmtpClient {
        stream: BufWriter::new(Stream::Plain(plain.stream)),
        timeout: plain.timeout,
    }
}

/// EHLO, or HELO if EHLO is refused with 5xx (RFC 5321 3.2). `None` after HELO: no
/// extensions.
async fn hello<T: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<T>,
    name: &str,
    timeout: Duration,
) -> Result<Option<EhloResponse<String>>, AttemptError> {
    client.timeout = timeout;
    match client.ehlo(name).await {
        Ok(ehlo) => Ok(Some(ehlo)),
        Err(mail_send::Error::UnexpectedReply(reply)) if reply.code >= 500 => {
            let reply = client
                .cmd(format!("HELO {name}\r\n"))
                .await
                .map_err(|e| wire_error(Phase::Ehlo, e))?;
            if reply.code == 250 {
                Ok(None)
            } else {
                Err(AttemptError::Refused {
                    phase: Phase::Ehlo,
                    reply: reply.into(),
                })
            }
        }
        Err(e) => Err(wire_error(Phase::Ehlo, e)),
    }
}

/// One message for one connection: the recipients to attempt now and the content.
#[derive(Debug, Clone, Copy)]
pub struct OutboundMessage<'a> {
    /// Reverse-path; "" is the null sender.
    pub sender: &'a str,
    pub recipients: &'a [Recipient],
    /// DSN ENVID, not xtext-encoded.
    pub env_id: Option<&'a str>,
    pub ret: Option<Ret>,
    pub body_type: BodyType,
    pub smtputf8: bool,
    /// Headers and body with CRLF line ends, not dot-stuffed.
    pub body: &'a [u8],
    /// Header lines added on the wire before `body` (the `X-Tern-Id` of this transaction),
    /// CRLF-terminated, none starting with a dot; not part of the stored message.
    pub prefix: &'a [u8],
}

impl OutboundMessage<'_> {
    /// The size of the content as sent (prefix and body), for SIZE and the data timeout.
    pub fn size(&self) -> usize {
        self.prefix.len() + self.body.len()
    }
}

impl Connection {
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// The reported certificate check ([`TlsChecks::report_peer`]), if one was made.
    pub fn peer_check(&self) -> Option<&Result<(), String>> {
        self.peer_check.as_ref()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn source(&self) -> Option<IpAddr> {
        self.source
    }

    /// Keeps `lease` until the connection is dropped.
    pub fn set_lease(&mut self, lease: Box<dyn Lease>) {
        self.lease = Some(lease);
    }

    pub fn lease(&self) -> Option<&dyn Lease> {
        self.lease.as_deref()
    }

    /// Takes the lease away (for a connection that replaces this one).
    pub fn take_lease(&mut self) -> Option<Box<dyn Lease>> {
        self.lease.take()
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// Transactions started (MAIL sent) on this connection.
    pub fn messages_sent(&self) -> usize {
        self.messages_sent
    }

    pub fn is_reusable(&self) -> bool {
        self.reusable
    }

    /// Whether this connection was opened the way `target` asks (same host name, TLS policy
    /// and AUTH user), so that a pooled connection never bypasses a route's policy.
    pub(crate) fn suits(&self, target: &Target<'_>) -> bool {
        self.host.eq_ignore_ascii_case(target.host)
            && self.source == target.source
            && self.policy == target.tls
            && self.auth_user.as_deref() == target.auth.map(|(user, _)| user)
    }

    /// [`Connection::suits`], and checked against exactly the DANE records `tlsa` (or, with
    /// `None`, opened without a DANE check): the strict rule for carrying another domain's
    /// mail, whose policy may ask more of the same host than the one it was opened for.
    pub(crate) fn suits_checked(
        &self,
        target: &Target<'_>,
        tlsa: Option<&Arc<crate::routing::dane::TlsaSet>>,
    ) -> bool {
        self.suits(target) && self.checked_against(tlsa)
    }

    /// Whether its certificate was checked against exactly the DANE records `tlsa` (`None`:
    /// opened without a DANE check).
    pub(crate) fn checked_against(
        &self,
        tlsa: Option<&Arc<crate::routing::dane::TlsaSet>>,
    ) -> bool {
        self.tlsa.as_deref() == tlsa.map(|set| &**set)
    }

    /// Whether the server has sent something (a 421 before closing, or the close itself)
    /// while the connection sat idle; such a connection must not be reused. Checked without
    /// waiting and without consuming anything.
    pub(crate) fn peer_spoke(&self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        self.client
            .stream
            .get_ref()
            .tcp()
            .poll_peek(&mut cx, &mut buf)
            .is_ready()
    }

    /// Runs one transaction. Refusals by the server come back as per-recipient results, in
    /// the order of `msg.recipients`; an `Err` means no recipient got an answer of its own
    /// and the connection is unusable.
    pub async fn send(
        &mut self,
        msg: &OutboundMessage<'_>,
    ) -> Result<Vec<RcptResult>, AttemptError> {
        if !self.reusable {
            return Err(AttemptError::Protocol {
                phase: Phase::Mail,
                detail: "connection is no longer usable".to_owned(),
            });
        }
        let caps = self.capabilities;
        if msg.smtputf8 && !caps.smtputf8 {
            // RFC 6531 3.4: no downgrade; the message cannot go to this server.
            let reply = RemoteReply::local(
                550,
                "5.6.7",
                format!("{} does not support SMTPUTF8", self.host),
            );
            return Ok(all(msg, &reply));
        }
        if let Some(max) = caps.size.filter(|&max| max > 0 && msg.size() > max) {
            // RFC 1870: the server announced it would refuse this anyway.
            let reply = RemoteReply::local(
                552,
                "5.3.4",
                format!(
                    "message size exceeds the limit of {} ({max} bytes)",
                    self.host
                ),
            );
            return Ok(all(msg, &reply));
        }
        if msg.recipients.is_empty() {
            return Ok(Vec::new());
        }
        // Poisoned until the transaction ends cleanly: if this future is dropped halfway, the
        // connection's state is unknown.
        self.reusable = false;
        self.messages_sent += 1;
        let results = if caps.pipelining {
            self.send_pipelined(msg).await?
        } else {
            self.send_stepwise(msg).await?
        };
        self.reusable = !results.closed;
        if results.open_transaction && self.reusable {
            // The transaction was refused before any data: RSET so the next one starts
            // clean. If that fails, the results stand and the connection goes.
            let _ = self.reset().await;
        }
        Ok(results.rcpts)
    }

    /// MAIL, all RCPTs and DATA in one round trip (RFC 2920).
    async fn send_pipelined(&mut self, msg: &OutboundMessage<'_>) -> Result<Outcome, AttemptError> {
        let t = self.timeouts;
        let mut commands = Vec::with_capacity(msg.recipients.len() + 2);
        commands.push(self.mail_command(msg));
        commands.extend(msg.recipients.iter().map(|r| self.rcpt_command(r)));
        commands.push("DATA\r\n".to_owned());
        // The replies of a group arrive together, so the group gets each phase's time once.
        self.client.timeout = t.mail + t.rcpt + t.data_init;
        let mut replies = self
            .client
            .cmds(&commands)
            .await
            .map_err(|e| wire_error(Phase::Envelope, e))?
            .into_iter()
            .map(RemoteReply::from);
        let (Some(mail), Some(data)) = (replies.next(), replies.next_back()) else {
            return Err(AttemptError::Protocol {
                phase: Phase::Envelope,
                detail: "missing replies".to_owned(),
            });
        };
        let rcpt_replies: Vec<RemoteReply> = replies.collect();
        if !mail.is_positive() {
            let closed = mail.code == 421 || data.code == 354;
            return Ok(Outcome::refused(all(msg, &mail), false, closed));
        }
        let mut outcome = self.finish(msg, rcpt_replies, data).await?;
        outcome.closed |= mail.code == 421;
        Ok(outcome)
    }

    /// One command, one reply, for servers without PIPELINING.
    async fn send_stepwise(&mut self, msg: &OutboundMessage<'_>) -> Result<Outcome, AttemptError> {
        let t = self.timeouts;
        let mail = self
            .command(self.mail_command(msg), t.mail, Phase::Mail)
            .await?;
        if !mail.is_positive() {
            return Ok(Outcome::refused(all(msg, &mail), false, mail.code == 421));
        }
        let mut rcpt_replies = Vec::with_capacity(msg.recipients.len());
        for rcpt in msg.recipients {
            let reply = self
                .command(self.rcpt_command(rcpt), t.rcpt, Phase::Rcpt)
                .await?;
            let closed = reply.code == 421;
            rcpt_replies.push(reply);
            if closed {
                // The server is going away: the remaining recipients share its last word.
                let last = rcpt_replies[rcpt_replies.len() - 1].clone();
                rcpt_replies.resize(msg.recipients.len(), last);
                return Ok(Outcome::refused(zip(msg, rcpt_replies), false, true));
            }
        }
        if !rcpt_replies.iter().any(RemoteReply::is_positive) {
            return Ok(Outcome::refused(zip(msg, rcpt_replies), true, false));
        }
        let data = self
            .command("DATA\r\n".to_owned(), t.data_init, Phase::Data)
            .await?;
        self.finish(msg, rcpt_replies, data).await
    }

    async fn command(
        &mut self,
        line: String,
        timeout: Duration,
        phase: Phase,
    ) -> Result<RemoteReply, AttemptError> {
        self.client.timeout = timeout;
        self.client
            .cmd(line)
            .await
            .map(RemoteReply::from)
            .map_err(|e| wire_error(phase, e))
    }

    /// After MAIL was accepted and the RCPT and DATA replies are in: send the content if
    /// DATA was accepted and give every accepted recipient the final reply.
    async fn finish(
        &mut self,
        msg: &OutboundMessage<'_>,
        rcpt_replies: Vec<RemoteReply>,
        data: RemoteReply,
    ) -> Result<Outcome, AttemptError> {
        let any_accepted = rcpt_replies.iter().any(RemoteReply::is_positive);
        if data.code != 354 {
            let rcpts = rcpt_replies
                .into_iter()
                .map(|r| if r.is_positive() { data.clone() } else { r })
                .collect();
            return Ok(Outcome::refused(zip(msg, rcpts), true, data.code == 421));
        }
        if !any_accepted {
            // A pipelined DATA accepted without recipients (RFC 2920 says the server must
            // refuse it). Sending an empty message to nobody is not an option: drop the
            // connection instead.
            return Ok(Outcome::refused(zip(msg, rcpt_replies), false, true));
        }
        let t = self.timeouts;
        let blocks = msg.size().div_ceil(BODY_BYTES_PER_BLOCK).max(1) as u32;
        tokio::time::timeout(t.data_block * blocks, self.write_body(msg.prefix, msg.body))
            .await
            .map_err(|_| AttemptError::Timeout { phase: Phase::Body })?
            .map_err(|e| AttemptError::Lost {
                phase: Phase::Body,
                detail: e.to_string(),
            })?;
        let end: RemoteReply = tokio::time::timeout(t.data_end, self.client.read())
            .await
            .map_err(|_| AttemptError::Timeout {
                phase: Phase::DataEnd,
            })?
            .map_err(|e| wire_error(Phase::DataEnd, e))?
            .into();
        let closed = end.code == 421;
        let rcpts = rcpt_replies
            .into_iter()
            .map(|r| if r.is_positive() { end.clone() } else { r })
            .collect();
        // Whatever the final reply, the transaction is over (RFC 5321 4.1.1.4).
        Ok(Outcome {
            rcpts: zip(msg, rcpts),
            open_transaction: false,
            closed,
        })
    }

    /// Writes the content (the prefix's header lines, then the body), dot-stuffed, and the
    /// final dot.
    async fn write_body(&mut self, prefix: &[u8], body: &[u8]) -> io::Result<()> {
        // Header lines of our own, never starting with a dot: nothing to stuff. The body then
        // starts at a line start, as the content would.
        self.client.stream.write_all(prefix).await?;
        // mail-send stuffs a dot only after CR or LF: a dot that starts the content is ours
        // to double.
        if body.first() == Some(&b'.') {
            self.client.stream.write_all(b".").await?;
        }
        // It also appends CRLF before the final dot; the content's own last CRLF is that one
        // (else the recipient would get an extra empty line).
        let body = body.strip_suffix(b"\r\n").unwrap_or(body);
        self.client.write_message(body).await
    }

    fn mail_command(&self, msg: &OutboundMessage<'_>) -> String {
        let caps = &self.capabilities;
        let mut cmd = format!("MAIL FROM:<{}>", msg.sender);
        if caps.size.is_some() {
            cmd.push_str(&format!(" SIZE={}", msg.size()));
        }
        // Without 8BITMIME the content goes as it is (as most MTAs do) rather than being
        // converted or refused.
        if msg.body_type == BodyType::EightBitMime && caps.eightbitmime {
            cmd.push_str(" BODY=8BITMIME");
        }
        if msg.smtputf8 {
            cmd.push_str(" SMTPUTF8");
        }
        if caps.dsn {
            match msg.ret {
                Some(Ret::Full) => cmd.push_str(" RET=FULL"),
                Some(Ret::Headers) => cmd.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(id) = msg.env_id {
                cmd.push_str(" ENVID=");
                xtext(id, &mut cmd);
            }
        }
        cmd.push_str("\r\n");
        cmd
    }

    fn rcpt_command(&self, rcpt: &Recipient) -> String {
        let mut cmd = format!("RCPT TO:<{}>", rcpt.address);
        if self.capabilities.dsn {
            let n = rcpt.notify;
            if n.never {
                cmd.push_str(" NOTIFY=NEVER");
            } else {
                let flags: Vec<&str> = [
                    (n.success, "SUCCESS"),
                    (n.failure, "FAILURE"),
                    (n.delay, "DELAY"),
                ]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
                if !flags.is_empty() {
                    cmd.push_str(" NOTIFY=");
                    cmd.push_str(&flags.join(","));
                }
            }
            // Stored decoded as "type;address"; only the address part is xtext.
            if let Some((kind, addr)) = rcpt.orcpt.as_deref().and_then(|o| o.split_once(';')) {
                cmd.push_str(" ORCPT=");
                cmd.push_str(kind);
                cmd.push(';');
                xtext(addr, &mut cmd);
            }
        }
        cmd.push_str("\r\n");
        cmd
    }

    /// RSET: ends an aborted transaction so the connection can carry the next one.
    pub async fn reset(&mut self) -> Result<(), AttemptError> {
        self.reusable = false;
        let reply = self
            .command("RSET\r\n".to_owned(), self.timeouts.mail, Phase::Rset)
            .await?;
        if reply.code != 250 {
            return Err(AttemptError::Refused {
                phase: Phase::Rset,
                reply,
            });
        }
        self.reusable = true;
        Ok(())
    }

    /// QUIT and close, best effort and briefly; an unusable connection is just dropped.
    pub async fn quit(mut self) {
        if !self.reusable {
            return;
        }
        self.client.timeout = QUIT_TIMEOUT;
        let _ = self.client.cmd(b"QUIT\r\n").await;
        // For TLS, this sends close_notify.
        let _ = tokio::time::timeout(QUIT_TIMEOUT, self.client.stream.shutdown()).await;
    }
}

/// What `send` learnt, before deciding on RSET and reuse.
struct Outcome {
    rcpts: Vec<RcptResult>,
    /// MAIL was accepted and the transaction did not reach the end of data.
    open_transaction: bool,
    /// The server is closing (421) or the dialogue is out of step.
    closed: bool,
}

impl Outcome {
    fn refused(rcpts: Vec<RcptResult>, open_transaction: bool, closed: bool) -> Outcome {
        Outcome {
            rcpts,
            open_transaction,
            closed,
        }
    }
}

/// The same reply for every recipient.
fn all(msg: &OutboundMessage<'_>, reply: &RemoteReply) -> Vec<RcptResult> {
    msg.recipients
        .iter()
        .map(|r| RcptResult {
            address: r.address.clone(),
            reply: reply.clone(),
        })
        .collect()
}

fn zip(msg: &OutboundMessage<'_>, replies: Vec<RemoteReply>) -> Vec<RcptResult> {
    msg.recipients
        .iter()
        .zip(replies)
        .map(|(r, reply)| RcptResult {
            address: r.address.clone(),
            reply,
        })
        .collect()
}

/// RFC 3461 4: xtext. '+', '=' and bytes outside '!'..='~' become "+XX".
fn xtext(value: &str, out: &mut String) {
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_encodes_plus_equals_and_non_printables() {
        let mut out = String::new();
        xtext("a+b=c d\u{e9}", &mut out);
        assert_eq!(out, "a+2Bb+3Dc+20d+C3+A9");
    }

    #[test]
    fn reply_display_is_one_line() {
        let r = RemoteReply {
            code: 550,
            status: Some("5.1.1".into()),
            text: "no such user\nreally".into(),
        };
        assert_eq!(r.to_string(), "550 5.1.1 no such user really");
        let r = RemoteReply {
            code: 421,
            status: None,
            text: String::new(),
        };
        assert_eq!(r.to_string(), "421");
    }

    #[test]
    fn broken_tls_expires() {
        let broken = BrokenTls::new(Duration::from_millis(30), Arc::new(Metrics::new()));
        assert!(!broken.is_broken("mx.example"));
        broken.mark("MX.example");
        assert!(broken.is_broken("mx.EXAMPLE"));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!broken.is_broken("mx.example"));
    }

    /// MX hosts with broken TLS, as many as anyone cares to publish: the memory of them stays
    /// within its bound, the hosts expiring soonest go first, and each is counted.
    #[test]
    fn broken_tls_hosts_past_the_bound_evict_the_soonest_to_expire() {
        let metrics = Arc::new(Metrics::new());
        let broken = BrokenTls::new(Duration::from_secs(3600), metrics.clone());
        broken.mark("first.test");
        broken.set_retry_after(Duration::from_secs(7200));
        for i in 1..MAX_BROKEN_TLS_HOSTS + 50 {
            broken.mark(&format!("mx{i}.test"));
        }
        assert_eq!(broken.len(), MAX_BROKEN_TLS_HOSTS);
        assert_eq!(metrics.state_evictions(StateMap::BrokenTlsHosts), 50);
        assert!(
            !broken.is_broken("first.test"),
            "the one expiring soonest went first"
        );
        let newest = format!("mx{}.test", MAX_BROKEN_TLS_HOSTS + 49);
        assert!(broken.is_broken(&newest));
        // Marking a host already known again evicts nothing.
        broken.mark(&newest);
        assert_eq!(metrics.state_evictions(StateMap::BrokenTlsHosts), 50);
    }
}
