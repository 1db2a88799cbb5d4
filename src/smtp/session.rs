//! One inbound SMTP session: a state machine generic over the byte stream.
//!
//! The session reads into one buffer, answers every complete command in it (PIPELINING),
//! and flushes its replies only when it would otherwise block on reading. DATA and BDAT
//! content goes through [`DataDecoder`] / [`ContentCheck`], and a message is handed to
//! [`Intake`] only when complete, clean and within limits.
//!
//! Every read waits for a deadline ([`super::deadline`]): the command or data timeout, the
//! session's own deadline (`limits.session_timeout`), the minimum data rate while content
//! arrives, and for an open BDAT transaction `data_timeout` since its last chunk. Every write
//! waits at most `limits.command_timeout`: a client that does not read its replies is
//! dropped like one that does not send. Message buffers grow only within a reservation of the
//! global [`Budget`]; when it is spent, DATA/BDAT gets `452 4.3.1`.
//!
//! Invariants:
//! - `250 ... queued as` is written only after [`Intake::accept`] returned, i.e. after the
//!   spool's fsync.
//! - A message whose client was dropped (timeout, too slow, session deadline) or that did not
//!   fit the budget is never handed to [`Intake`].
//! - Bytes pipelined after STARTTLS are discarded, never carried into the TLS session
//!   (CVE-2011-0411 class command injection).
//! - AUTH is refused on a connection without TLS; passwords never cross in clear.
//! - Every reply but the greeting and EHLO carries an enhanced status code.

use super::anvil::{self, Anvil};
use super::budget::{self, Budget, Reservation};
use super::deadline::{self, DataRate, Expiry};
use crate::auth::{Credentials, Verifier};
use crate::config::Limits;
use crate::feedback::Feedback;
use crate::intake::Intake;
use crate::message::{same_address, OneClick, Submission};
use crate::policy::{self, Policy};
use crate::rfc5321::proto::{self, ContentCheck, ContentFlags, DataDecoder, Line};
use crate::rfc5321::reply::Reply;
use crate::sidecar::control;
use crate::telemetry::{Disconnect, Metrics, Protocol, Rejection};
use crate::tls::TlsInfo;
use base64::Engine;
use smtp_proto::{Error as ParseError, Request};
use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tern_queue::{BodyType, Notify, Recipient, Ret, Source, SpoolError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What every session of a server shares.
pub struct SessionConfig {
    pub hostname: String,
    pub limits: Limits,
    pub policy: Policy,
    pub credentials: Option<Arc<Credentials>>,
    /// Whether STARTTLS can be offered (a TLS acceptor exists).
    pub starttls: bool,
    /// Where finished transactions go.
    pub intake: Intake,
    /// Bounce domains (RCPT from anyone) and the suppression list.
    pub feedback: Feedback,
    pub metrics: Arc<Metrics>,
    /// State every session shares and a reload keeps.
    pub shared: Shared,
}

/// What the sessions of a daemon share beyond their config, kept across reloads (the
/// limits they apply are each session's config snapshot).
#[derive(Clone)]
pub struct Shared {
    /// Per-client accounting: connection caps and rate, bounce-mail rate, AUTH failures.
    pub anvil: Arc<Anvil>,
    /// Bytes buffered for messages in progress, all sessions together.
    pub inflight: Arc<Budget>,
    /// Password checks, a capped number at a time.
    pub verifier: Arc<Verifier>,
}

impl Shared {
    /// `verifications`: how many argon2 checks may run at once.
    pub fn new(metrics: Arc<Metrics>, verifications: usize) -> Shared {
        Shared {
            anvil: Anvil::new(metrics.clone()),
            inflight: Budget::new(metrics),
            verifier: Arc::new(Verifier::new(verifications)),
        }
    }
}

/// Why [`Session::run`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client quit, disconnected, or was disconnected.
    Closed,
    /// STARTTLS was accepted: the caller performs the handshake and resumes the session on
    /// the TLS stream with [`Session::resume`].
    StartTls,
}

/// State that survives a STARTTLS upgrade (everything else is reset by it).
pub struct SessionState {
    peer: SocketAddr,
    tls: Option<TlsInfo>,
    helo: Option<String>,
    esmtp: bool,
    auth_user: Option<String>,
    tx: Option<Transaction>,
    errors: usize,
    /// When the session ends whatever it is doing (`limits.session_timeout` after accept).
    deadline: Instant,
}

impl SessionState {
    /// Records the TLS parameters once the handshake after STARTTLS succeeded.
    pub fn set_tls(&mut self, tls: TlsInfo) {
        self.tls = Some(tls);
    }
}

/// One mail transaction, from MAIL to the end of DATA or BDAT LAST.
struct Transaction {
    sender: String,
    body_type: BodyType,
    smtputf8: bool,
    env_id: Option<String>,
    ret: Option<Ret>,
    recipients: Vec<Recipient>,
    /// Content collected by BDAT chunks so far.
    bdat: Option<Chunks>,
    /// Whether this transaction was counted against `limits.max_bounce_rate_per_ip`.
    bounce_counted: bool,
}

struct Chunks {
    content: Vec<u8>,
    size: usize,
    check: ContentCheck,
    /// What `content` may take of the inflight budget.
    held: Reservation,
    /// The data rate since the first chunk, command waits between chunks included.
    rate: DataRate,
    /// When the last chunk was complete.
    last: Instant,
}

/// What to do after one command.
enum Next {
    Continue,
    Close,
    StartTls,
}

const READ_CHUNK: usize = 16 * 1024;

pub struct Session<S> {
    stream: S,
    config: Arc<SessionConfig>,
    shutdown: CancellationToken,
    state: SessionState,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// A new session; `tls` is set for implicit-TLS listeners.
    pub fn new(
        stream: S,
        config: Arc<SessionConfig>,
        shutdown: CancellationToken,
        peer: SocketAddr,
        tls: Option<TlsInfo>,
    ) -> Session<S> {
        let state = SessionState {
            peer,
            tls,
            helo: None,
            esmtp: false,
            auth_user: None,
            tx: None,
            errors: 0,
            deadline: Instant::now() + config.limits.session_timeout,
        };
        Session::resume(stream, config, shutdown, state)
    }

    /// Continues a session on a new stream (after STARTTLS) with `state`.
    pub fn resume(
        stream: S,
        config: Arc<SessionConfig>,
        shutdown: CancellationToken,
        state: SessionState,
    ) -> Session<S> {
        Session {
            stream,
            config,
            shutdown,
            state,
            rbuf: Vec::with_capacity(READ_CHUNK),
            rpos: 0,
            wbuf: Vec::with_capacity(512),
        }
    }

    /// Takes the session apart for a STARTTLS upgrade: the stream to wrap and the state
    /// to resume with, reset as RFC 3207 4.2 requires (the client must EHLO again).
    pub fn into_upgrade(self) -> (S, SessionState) {
        let mut state = self.state;
        state.helo = None;
        state.esmtp = false;
        state.auth_user = None;
        state.tx = None;
        (self.stream, state)
    }

    /// Writes the 220 greeting; call once per connection, before [`Session::run`].
    pub async fn greet(&mut self) -> io::Result<()> {
        let text = format!("{} ESMTP tern", self.config.hostname);
        self.reply_plain(220, text);
        self.flush().await
    }

    /// Serves commands until the session ends.
    pub async fn run(&mut self) -> io::Result<SessionEnd> {
        let result = self.command_loop().await;
        // Replies already queued (e.g. 221 or 421) go out even when the loop ended.
        let flushed = self.flush().await;
        let end = result?;
        flushed?;
        if end == SessionEnd::Closed {
            // For TLS this sends close_notify (RFC 8446 6.1); for TCP it is the FIN. A client
            // that reads nothing must not hold the session here either.
            let timeout = self.config.limits.command_timeout;
            let _ = tokio::time::timeout(timeout, self.stream.shutdown()).await;
        }
        Ok(end)
    }

    async fn command_loop(&mut self) -> io::Result<SessionEnd> {
        loop {
            match proto::find_line(&self.rbuf[self.rpos..]) {
                Line::Complete(len) => {
                    let line = self.rbuf[self.rpos..self.rpos + len].to_vec();
                    self.rpos += len;
                    match self.command(&line).await? {
                        Next::Continue => {}
                        Next::Close => return Ok(SessionEnd::Closed),
                        Next::StartTls => return Ok(SessionEnd::StartTls),
                    }
                    if self.state.errors >= self.config.limits.max_errors {
                        self.reply(421, "4.7.0", "Too many errors, closing connection");
                        return Ok(SessionEnd::Closed);
                    }
                }
                Line::TooLong => {
                    self.error(500, "5.5.6", "Line too long");
                    if !self.discard_line().await? {
                        return Ok(SessionEnd::Closed);
                    }
                }
                Line::Incomplete => {
                    if self.state.tx.is_none() && self.shutdown.is_cancelled() {
                        self.reply(421, "4.3.2", "Service shutting down, closing connection");
                        return Ok(SessionEnd::Closed);
                    }
                    if !self.wait_for_command_input().await? {
                        return Ok(SessionEnd::Closed);
                    }
                }
            }
        }
    }

    async fn command(&mut self, line: &[u8]) -> io::Result<Next> {
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request.into_owned(),
            Err(err) => {
                self.parse_error(err);
                return Ok(Next::Continue);
            }
        };
        match request {
            Request::Ehlo { host } => self.ehlo(host, true),
            Request::Helo { host } => self.ehlo(host, false),
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => self.rcpt(to),
            Request::Data => return self.data().await,
            Request::Bdat {
                chunk_size,
                is_last,
            } => return self.bdat(chunk_size, is_last).await,
            Request::Rset => {
                self.state.tx = None;
                self.reply(250, "2.0.0", "Ok");
            }
            Request::Noop { .. } => self.reply(250, "2.0.0", "Ok"),
            Request::Quit => {
                self.reply(221, "2.0.0", "Bye");
                return Ok(Next::Close);
            }
            Request::Vrfy { .. } => self.reply(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Request::Help { .. } => self.reply(
                214,
                "2.0.0",
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
            ),
            Request::StartTls => return Ok(self.starttls()),
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth(mechanism, initial_response).await,
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Lhlo { .. } => self.error(502, "5.5.1", "Command not implemented"),
        }
        Ok(Next::Continue)
    }

    fn parse_error(&mut self, err: ParseError) {
        self.config.metrics.message_rejected(Rejection::Syntax);
        match err {
            ParseError::UnknownCommand => {
                self.error(500, "5.5.2", "Syntax error, command unrecognized")
            }
            ParseError::InvalidSenderAddress => {
                self.error(501, "5.1.7", "Bad sender address syntax")
            }
            ParseError::InvalidRecipientAddress => {
                self.error(501, "5.1.3", "Bad recipient address syntax")
            }
            ParseError::SyntaxError { syntax } => {
                self.error(501, "5.5.4", format!("Syntax: {syntax}"))
            }
            ParseError::InvalidParameter { param } => {
                self.error(501, "5.5.4", format!("Invalid parameter {param}"))
            }
            ParseError::UnsupportedParameter { param } => {
                self.error(555, "5.5.4", format!("Unsupported parameter {param}"))
            }
            ParseError::NeedsMoreData { .. }
            | ParseError::ResponseTooLong
            | ParseError::InvalidResponse { .. } => self.error(500, "5.5.2", "Syntax error"),
        }
    }

    fn ehlo(&mut self, host: String, esmtp: bool) {
        if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
            self.config.metrics.message_rejected(Rejection::Syntax);
            self.error(501, "5.5.4", "Syntax: EHLO hostname");
            return;
        }
        self.state.tx = None;
        self.state.esmtp = esmtp;
        self.state.helo = Some(host);
        let name = self.config.hostname.clone();
        if !esmtp {
            self.reply_plain(250, name);
            return;
        }
        let mut lines: Vec<Cow<'static, str>> = vec![
            name.into(),
            "PIPELINING".into(),
            format!("SIZE {}", self.config.limits.max_message_size).into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "DSN".into(),
            "CHUNKING".into(),
        ];
        if self.config.starttls && self.state.tls.is_none() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        Reply::plain(250, lines).write_to(&mut self.wbuf);
    }

    fn auth_offered(&self) -> bool {
        self.state.tls.is_some()
            && self.state.auth_user.is_none()
            && self.config.credentials.is_some()
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        if self.state.helo.is_none() {
            return self.error(503, "5.5.1", "Error: send HELO/EHLO first");
        }
        if self.state.tx.is_some() {
            return self.error(503, "5.5.1", "Error: nested MAIL command");
        }
        if self.shutdown.is_cancelled() {
            return self.reply(421, "4.3.2", "Service shutting down");
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return self.error(555, "5.5.4", "BODY=BINARYMIME is not supported");
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        if !self.state.esmtp && from.flags != 0 {
            return self.error(555, "5.5.4", "MAIL parameters require EHLO");
        }
        if !smtputf8 && !from.address.is_ascii() {
            return self.error(553, "5.6.7", "Non-ASCII sender requires SMTPUTF8");
        }
        if let Err(reply) = self.config.policy.declared_size(from.size as u64) {
            self.config.metrics.message_rejected(Rejection::Size);
            return self.error_reply(reply);
        }
        // RFC 5321 4.5.3.1.10: say so before the client sends the content.
        if let Err(SpoolError::Full(why)) = self.config.intake.room_for(from.size as u64) {
            debug!(peer = %self.state.peer, %why, "spool full at MAIL FROM");
            self.config.metrics.message_rejected(Rejection::SpoolFull);
            return self.reply(452, "4.3.1", "Insufficient system storage, try again later");
        }
        // smtp-proto has already decoded the xtext; what it yields ends up in DSN headers,
        // so anything that could break a header line is refused.
        if from.env_id.as_deref().is_some_and(|id| !is_printable(id)) {
            return self.error(501, "5.5.4", "ENVID must be printable ASCII");
        }
        let env_id = from.env_id;
        let ret = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
            Some(Ret::Full)
        } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
            Some(Ret::Headers)
        } else {
            None
        };
        let body_type = if from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0 {
            BodyType::EightBitMime
        } else {
            BodyType::SevenBit
        };
        self.state.tx = Some(Transaction {
            sender: from.address,
            body_type,
            smtputf8,
            env_id,
            ret,
            recipients: Vec::new(),
            bdat: None,
            bounce_counted: false,
        });
        self.reply(250, "2.1.0", "Ok");
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<String>) {
        let authenticated = self.state.auth_user.is_some();
        let peer = self.state.peer.ip();
        let Some(tx) = self.state.tx.as_mut() else {
            return self.error(503, "5.5.1", "Error: need MAIL command");
        };
        if tx.bdat.is_some() {
            return self.error(503, "5.5.1", "Error: RCPT after BDAT");
        }
        let Some((local, domain)) = to.address.rsplit_once('@') else {
            self.config.metrics.message_rejected(Rejection::Syntax);
            return self.error(501, "5.1.3", "Recipient address must have a domain");
        };
        if local.is_empty() || domain.is_empty() {
            self.config.metrics.message_rejected(Rejection::Syntax);
            return self.error(501, "5.1.3", "Bad recipient address syntax");
        }
        if !tx.smtputf8 && !to.address.is_ascii() {
            return self.error(553, "5.6.7", "Non-ASCII recipient requires SMTPUTF8");
        }
        // smtp-proto accepts only the rfc822 address type and strips it; it is kept in the
        // stored form "rfc822;addr" that a DSN's Original-Recipient field needs.
        if to.orcpt.as_deref().is_some_and(|o| !is_printable(o)) {
            return self.error(501, "5.5.4", "ORCPT must be printable ASCII");
        }
        let orcpt = to.orcpt.map(|addr| format!("rfc822;{addr}"));
        let notify = if to.flags & smtp_proto::RCPT_NOTIFY_NEVER != 0 {
            if to.flags
                & (smtp_proto::RCPT_NOTIFY_SUCCESS
                    | smtp_proto::RCPT_NOTIFY_FAILURE
                    | smtp_proto::RCPT_NOTIFY_DELAY)
                != 0
            {
                return self.error(
                    501,
                    "5.5.4",
                    "NOTIFY=NEVER cannot be combined with other values",
                );
            }
            Notify {
                success: false,
                failure: false,
                delay: false,
                never: true,
            }
        } else if to.flags
            & (smtp_proto::RCPT_NOTIFY_SUCCESS
                | smtp_proto::RCPT_NOTIFY_FAILURE
                | smtp_proto::RCPT_NOTIFY_DELAY)
            != 0
        {
            Notify {
                success: to.flags & smtp_proto::RCPT_NOTIFY_SUCCESS != 0,
                failure: to.flags & smtp_proto::RCPT_NOTIFY_FAILURE != 0,
                delay: to.flags & smtp_proto::RCPT_NOTIFY_DELAY != 0,
                never: false,
            }
        } else {
            Notify::default_rfc3461()
        };
        // Duplicates are acknowledged but kept once, so the recipient gets one copy.
        let duplicate = tx
            .recipients
            .iter()
            .any(|r| same_address(&r.address, &to.address));
        if !duplicate {
            // Bounce domains take mail from anyone: that is where bounces come back.
            let feedback = &self.config.feedback;
            let bounce = feedback.is_bounce_address(&to.address);
            let relay_ok = authenticated || bounce;
            let rules = &self.config.policy;
            if let Err(reply) = rules.recipient(peer, relay_ok, tx.recipients.len()) {
                // The policy refuses with 452 for the recipient limit, else for relaying.
                self.config.metrics.message_rejected(if reply.code == 452 {
                    Rejection::Recipients
                } else {
                    Rejection::RelayDenied
                });
                return self.error_reply(reply);
            }
            // ... but not as fast as they like: once per transaction, clients tern does
            // not serve are held to a rate (mail from the relay networks is tern's own).
            if bounce && !tx.bounce_counted && !authenticated && !rules.in_relay_network(peer) {
                let (anvil, limits) = (&self.config.shared.anvil, &self.config.limits);
                if !anvil.bounce_mail(peer, limits, Instant::now()) {
                    self.config.metrics.message_rejected(Rejection::BounceRate);
                    return self.error_reply(policy::bounce_rate_exceeded());
                }
                tx.bounce_counted = true;
            }
            if let Some(reply) = crate::policy::suppressed(feedback, &to.address, "smtp") {
                self.config.metrics.message_rejected(Rejection::Suppressed);
                return self.error_reply(reply);
            }
            let mut rcpt = Recipient::new(to.address);
            rcpt.orcpt = orcpt;
            rcpt.notify = notify;
            tx.recipients.push(rcpt);
        }
        self.reply(250, "2.1.5", "Ok");
    }

    async fn data(&mut self) -> io::Result<Next> {
        match &self.state.tx {
            None => {
                self.error(503, "5.5.1", "Error: need MAIL command");
                return Ok(Next::Continue);
            }
            Some(tx) if tx.bdat.is_some() => {
                self.error(503, "5.5.1", "Error: DATA after BDAT");
                return Ok(Next::Continue);
            }
            Some(tx) if tx.recipients.is_empty() => {
                self.error(554, "5.5.1", "Error: no valid recipients");
                return Ok(Next::Continue);
            }
            Some(_) => {}
        }
        let limits = self.config.limits;
        let max = limits.max_message_size as usize;
        let initial = READ_CHUNK.min(max);
        // Refused before the 354, so the transaction stays and DATA may be tried again.
        let Some(held) = self
            .config
            .shared
            .inflight
            .reserve(initial, limits.max_inflight_bytes)
        else {
            self.config.metrics.message_rejected(Rejection::Inflight);
            self.error_reply(policy::too_much_in_flight());
            return Ok(Next::Continue);
        };
        self.reply(354, "2.0.0", "End data with <CR><LF>.<CR><LF>");
        self.flush().await?;

        let mut decoder = DataDecoder::new(max);
        let mut content = Vec::with_capacity(initial);
        // `None` once the budget could not spare more: the rest is read and discarded.
        let mut held = Some(held);
        let mut discarded = Vec::new();
        let mut rate = DataRate::new(Instant::now(), &limits);
        let end = loop {
            let input = &self.rbuf[self.rpos..];
            if let Some(reservation) = held.as_mut() {
                let budget_max = limits.max_inflight_bytes;
                if !budget::make_room(&mut content, reservation, input.len(), max, budget_max) {
                    // Memory first, then the reservation that counted it.
                    content = Vec::new();
                    held = None;
                }
            }
            let out = if held.is_some() {
                &mut content
            } else {
                discarded.clear();
                &mut discarded
            };
            let (used, end) = decoder.feed(input, out);
            self.rpos += used;
            if let Some(end) = end {
                break end;
            }
            if !self.read_data_input(&mut rate).await? {
                return Ok(Next::Close);
            }
        };
        let tx = self.state.tx.take().expect("checked above");
        let Some(held) = held else {
            // Too large is final; out of budget is for now.
            let reply = if end.size > max {
                self.config.metrics.message_rejected(Rejection::Size);
                policy::size_exceeded()
            } else {
                warn!(peer = %self.state.peer, "refused a message: inflight budget spent");
                self.config.metrics.message_rejected(Rejection::Inflight);
                policy::too_much_in_flight()
            };
            self.error_reply(reply);
            return Ok(Next::Continue);
        };
        self.finish_message(tx, content, end.size, end.flags, held)
            .await;
        Ok(Next::Continue)
    }

    async fn bdat(&mut self, chunk_size: usize, is_last: bool) -> io::Result<Next> {
        let limits = self.config.limits;
        let max = limits.max_message_size as usize;
        let now = Instant::now();
        // RFC 3030: the chunk is read whatever the verdict, or the session loses sync.
        let mut refusal = match &self.state.tx {
            None => Some(Reply::new(503, "5.5.1", "Error: need MAIL command")),
            Some(tx) if tx.recipients.is_empty() => {
                Some(Reply::new(554, "5.5.1", "Error: no valid recipients"))
            }
            Some(_) => None,
        };
        // `None` while refused: the chunk is read and discarded.
        let mut chunks = match self.state.tx.as_mut().and_then(|tx| tx.bdat.take()) {
            Some(chunks) => Some(chunks),
            None if refusal.is_none() => {
                let initial = READ_CHUNK.min(max).min(chunk_size.max(1));
                match self
                    .config
                    .shared
                    .inflight
                    .reserve(initial, limits.max_inflight_bytes)
                {
                    Some(held) => Some(Chunks {
                        content: Vec::with_capacity(initial),
                        size: 0,
                        check: ContentCheck::default(),
                        held,
                        rate: DataRate::new(now, &limits),
                        last: now,
                    }),
                    None => {
                        refusal = Some(policy::too_much_in_flight());
                        None
                    }
                }
            }
            None => None,
        };
        let mut rate = match &chunks {
            Some(chunks) => chunks.rate.clone(),
            None => DataRate::new(now, &limits),
        };
        let mut left = chunk_size;
        while left > 0 {
            if self.rpos == self.rbuf.len() && !self.read_data_input(&mut rate).await? {
                return Ok(Next::Close);
            }
            let take = left.min(self.rbuf.len() - self.rpos);
            let bytes = &self.rbuf[self.rpos..self.rpos + take];
            let mut spent = false;
            if let Some(c) = chunks.as_mut() {
                let store = take.min(max.saturating_sub(c.content.len()));
                let budget_max = limits.max_inflight_bytes;
                if budget::make_room(&mut c.content, &mut c.held, store, max, budget_max) {
                    c.check.scan(bytes);
                    c.content.extend_from_slice(&bytes[..store]);
                    c.size += take;
                } else {
                    spent = true;
                }
            }
            if spent {
                // The transaction is lost: its buffer goes back now, not after the chunk.
                chunks = None;
                refusal = Some(policy::too_much_in_flight());
            }
            self.rpos += take;
            left -= take;
        }
        if let Some(reply) = refusal {
            if reply.code == 452 {
                warn!(peer = %self.state.peer, "refused a BDAT chunk: inflight budget spent");
                self.config.metrics.message_rejected(Rejection::Inflight);
                self.state.tx = None;
            }
            self.error_reply(reply);
            return Ok(Next::Continue);
        }
        let mut chunks = chunks.expect("a chunk that is not refused has a buffer");
        chunks.rate = rate;
        chunks.last = Instant::now();
        if !is_last {
            if chunks.size > max {
                // Fail early: the transaction is lost anyway, and the client can stop.
                self.state.tx = None;
                self.config.metrics.message_rejected(Rejection::Size);
                self.error_reply(policy::size_exceeded());
                return Ok(Next::Continue);
            }
            self.reply(250, "2.0.0", format!("{chunk_size} octets received"));
            if let Some(tx) = self.state.tx.as_mut() {
                tx.bdat = Some(chunks);
            }
            return Ok(Next::Continue);
        }
        let tx = self.state.tx.take().expect("checked above");
        let flags = chunks.check.finish();
        self.finish_message(tx, chunks.content, chunks.size, flags, chunks.held)
            .await;
        Ok(Next::Continue)
    }

    /// A message that asks for one-click unsubscribe (`X-Tern-Unsubscribe`) belongs to a
    /// list; in reject mode, when every recipient unsubscribed from it (or is suppressed for
    /// all mail), the refusal for the whole message. When only some did, the unsubscribe
    /// stage drops those (after DATA, SMTP cannot refuse single recipients).
    fn unsubscribed_from_list(&self, tx: &Transaction, content: &[u8]) -> Option<Reply> {
        let trusted = self.state.auth_user.is_some()
            || self.config.policy.in_relay_network(self.state.peer.ip());
        if !trusted || tx.recipients.is_empty() || !control::has_control_headers(content) {
            return None;
        }
        let control = control::read(content);
        let one_click = OneClick::parse(control.unsubscribe.as_deref()?).ok()?;
        let list = crate::unsubscribe::list_name(
            one_click.list.as_deref(),
            control.campaign.as_deref(),
            &tx.sender,
        );
        let feedback = &self.config.feedback;
        let all = tx.recipients.iter().all(|r| {
            feedback
                .suppressions
                .check_scoped(&r.address, &list)
                .is_some()
        });
        if !all {
            return None;
        }
        // Each refused recipient gets its event, as at RCPT.
        let mut reply = None;
        for r in &tx.recipients {
            reply = policy::suppressed_for_list(feedback, &r.address, &list, "smtp");
        }
        reply
    }

    /// Decides on a complete message and, if it is acceptable, makes it durable. `_held` is
    /// the budget `content` takes, given back once the spool has it or it is refused.
    async fn finish_message(
        &mut self,
        tx: Transaction,
        content: Vec<u8>,
        size: usize,
        flags: ContentFlags,
        _held: Reservation,
    ) {
        if size > self.config.limits.max_message_size as usize {
            self.config.metrics.message_rejected(Rejection::Size);
            return self.error_reply(policy::size_exceeded());
        }
        let headers = crate::message::header_stats(&content);
        if headers.len as u64 > self.config.limits.max_header_size {
            self.config.metrics.message_rejected(Rejection::HeaderSize);
            return self.error_reply(policy::header_size_exceeded());
        }
        // With the Received header tern adds, the copy it sends on would exceed the limit.
        if headers.received >= self.config.limits.max_hops {
            warn!(peer = %self.state.peer, hops = headers.received, "refused a looping message");
            self.config.metrics.message_rejected(Rejection::Loop);
            return self.error_reply(policy::too_many_hops());
        }
        if !flags.is_clean() {
            let what = match (flags.bare_cr, flags.bare_lf, flags.nul) {
                (_, true, _) => "bare LF",
                (true, _, _) => "bare CR",
                _ => "NUL",
            };
            warn!(peer = %self.state.peer, what, "refused message with improper line ends");
            self.config.metrics.message_rejected(Rejection::Smuggling);
            return self.error_reply(Reply::new(
                550,
                "5.6.0",
                format!("Message refused: {what} in message data; lines must end with CRLF (RFC 5321 2.3.8)"),
            ));
        }
        if let Some(reply) = self.unsubscribed_from_list(&tx, &content) {
            self.config.metrics.message_rejected(Rejection::Suppressed);
            return self.error_reply(reply);
        }
        let protocol = match (
            self.state.esmtp,
            self.state.tls.is_some(),
            self.state.auth_user.is_some(),
        ) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let rcpt_count = tx.recipients.len();
        let submission = Submission {
            sender: tx.sender,
            recipients: tx.recipients,
            env_id: tx.env_id,
            ret: tx.ret,
            body_type: tx.body_type,
            smtputf8: tx.smtputf8,
            source: Source {
                client_ip: self.state.peer.ip().to_string(),
                helo: self.state.helo.clone().unwrap_or_default(),
                auth_user: self.state.auth_user.clone(),
                protocol: protocol.to_string(),
            },
            tls: self.state.tls.clone(),
            content,
            sidecar: None,
            pool: None,
            unsubscribe: None,
            // Anyone may mail the bounce domains; only clients tern serves get the stages.
            trusted: self.state.auth_user.is_some()
                || self.config.policy.in_relay_network(self.state.peer.ip()),
        };
        match self.config.intake.accept(submission).await {
            Ok(id) => {
                info!(%id, peer = %self.state.peer, size, rcpts = rcpt_count, "queued");
                self.config.metrics.message_received(Protocol::Smtp);
                self.reply(250, "2.0.0", format!("Ok: queued as {id}"));
            }
            Err(SpoolError::Full(why)) => {
                warn!(peer = %self.state.peer, %why, "spool full: message refused");
                self.config.metrics.message_rejected(Rejection::SpoolFull);
                self.reply(452, "4.3.1", "Insufficient system storage, try again later");
            }
            Err(err) => {
                warn!(peer = %self.state.peer, error = %err, "spool write failed");
                self.config.metrics.message_rejected(Rejection::SpoolError);
                self.reply(
                    451,
                    "4.3.0",
                    "Temporary failure: could not queue message, try again later",
                );
            }
        }
    }

    fn starttls(&mut self) -> Next {
        if !self.config.starttls {
            self.error(502, "5.5.1", "STARTTLS not available");
            return Next::Continue;
        }
        if self.state.tls.is_some() {
            self.error(503, "5.5.1", "Error: TLS already active");
            return Next::Continue;
        }
        if self.state.tx.is_some() {
            self.error(503, "5.5.1", "Error: STARTTLS in a mail transaction");
            return Next::Continue;
        }
        self.reply(220, "2.0.0", "Ready to start TLS");
        if self.rpos < self.rbuf.len() {
            debug!(peer = %self.state.peer, "discarding bytes pipelined after STARTTLS");
        }
        self.rbuf.clear();
        self.rpos = 0;
        Next::StartTls
    }

    async fn auth(&mut self, mechanism: u64, initial: String) -> io::Result<Next> {
        let Some(credentials) = self.config.credentials.clone() else {
            self.error(502, "5.5.1", "Authentication not available");
            return Ok(Next::Continue);
        };
        if self.state.tls.is_none() {
            self.error(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            );
            return Ok(Next::Continue);
        }
        if self.state.auth_user.is_some() {
            self.error(503, "5.5.1", "Error: already authenticated");
            return Ok(Next::Continue);
        }
        if self.state.tx.is_some() {
            self.error(503, "5.5.1", "Error: AUTH in a mail transaction");
            return Ok(Next::Continue);
        }
        let limits = self.config.limits;
        let client = self.state.peer.ip();
        let anvil = self.config.shared.anvil.clone();
        // A locked client is refused before it sends a password.
        if anvil.auth_locked(client, &limits, Instant::now()) {
            return Ok(self.auth_throttled(None));
        }
        let pair = if mechanism == smtp_proto::AUTH_PLAIN {
            let response = if initial.is_empty() {
                match self.challenge("").await? {
                    Challenge::Response(r) => r,
                    Challenge::Failed => return Ok(Next::Continue),
                    Challenge::Close => return Ok(Next::Close),
                }
            } else {
                initial
            };
            decode_plain(&response)
        } else if mechanism == smtp_proto::AUTH_LOGIN {
            let user = if initial.is_empty() {
                match self.challenge("VXNlcm5hbWU6").await? {
                    Challenge::Response(r) => r,
                    Challenge::Failed => return Ok(Next::Continue),
                    Challenge::Close => return Ok(Next::Close),
                }
            } else {
                initial
            };
            let password = match self.challenge("UGFzc3dvcmQ6").await? {
                Challenge::Response(r) => r,
                Challenge::Failed => return Ok(Next::Continue),
                Challenge::Close => return Ok(Next::Close),
            };
            match (decode_b64(&user), decode_b64(&password)) {
                (Some(u), Some(p)) => Some((u, p)),
                _ => None,
            }
        } else {
            self.error(504, "5.5.4", "Unrecognized authentication type");
            return Ok(Next::Continue);
        };
        let Some((user, password)) = pair else {
            self.error(501, "5.5.2", "Malformed authentication response");
            return Ok(Next::Continue);
        };
        // Counted as a failure before the (queued, slow) check, so parallel attempts cannot
        // run past the limit.
        let Some(failures) = anvil.auth_attempt(client, &user, &limits, Instant::now()) else {
            return Ok(self.auth_throttled(Some(&user)));
        };
        let verifier = self.config.shared.verifier.clone();
        if verifier.verify(credentials, user.clone(), password).await {
            anvil.auth_succeeded(client, &user, &limits);
            info!(peer = %self.state.peer, user, "authenticated");
            self.state.auth_user = Some(user);
            self.reply(235, "2.7.0", "Authentication successful");
        } else {
            warn!(peer = %self.state.peer, user, failures, "authentication failed");
            self.config.metrics.message_rejected(Rejection::AuthFailed);
            // Each failure of this client or user makes the next answer slower.
            let delay = anvil::failure_delay(failures, &limits);
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.shutdown.cancelled() => {}
                }
            }
            self.error(535, "5.7.8", "Authentication credentials invalid");
        }
        Ok(Next::Continue)
    }

    /// The answer to AUTH from a client, or for a user, with too many recent failures.
    fn auth_throttled(&mut self, user: Option<&str>) -> Next {
        warn!(peer = %self.state.peer, user, "authentication refused: too many failures");
        self.config
            .metrics
            .message_rejected(Rejection::AuthThrottled);
        self.reply(
            454,
            "4.7.0",
            "Too many authentication failures, try again later",
        );
        Next::Continue
    }

    /// Sends a `334` challenge and reads one response line.
    async fn challenge(&mut self, prompt: &'static str) -> io::Result<Challenge> {
        Reply::plain(334, vec![prompt.into()]).write_to(&mut self.wbuf);
        loop {
            match proto::find_line(&self.rbuf[self.rpos..]) {
                Line::Complete(len) => {
                    let line =
                        proto::trim_line_end(&self.rbuf[self.rpos..self.rpos + len]).to_vec();
                    self.rpos += len;
                    if line == b"*" {
                        self.error(501, "5.0.0", "Authentication cancelled");
                        return Ok(Challenge::Failed);
                    }
                    return Ok(Challenge::Response(
                        String::from_utf8_lossy(&line).into_owned(),
                    ));
                }
                Line::TooLong => {
                    self.error(500, "5.5.6", "Authentication response too long");
                    return Ok(if self.discard_line().await? {
                        Challenge::Failed
                    } else {
                        Challenge::Close
                    });
                }
                Line::Incomplete => {
                    if !self.wait_for_command_input().await? {
                        return Ok(Challenge::Close);
                    }
                }
            }
        }
    }

    /// Discards input up to and including the next LF, reading as needed (an overlong
    /// line is skipped whole, never reinterpreted from its middle). False when the
    /// session must end.
    async fn discard_line(&mut self) -> io::Result<bool> {
        loop {
            if let Some(pos) = memchr::memchr(b'\n', &self.rbuf[self.rpos..]) {
                self.rpos += pos + 1;
                return Ok(true);
            }
            self.rbuf.clear();
            self.rpos = 0;
            if !self.wait_for_command_input().await? {
                return Ok(false);
            }
        }
    }

    /// Flushes pending replies and waits for more command input. False when the session
    /// must end: EOF, or a deadline or shutdown (a 421 has then been queued).
    async fn wait_for_command_input(&mut self) -> io::Result<bool> {
        self.flush().await?;
        match self.read_command_input().await? {
            ReadOutcome::Data => Ok(true),
            ReadOutcome::Eof => Ok(false),
            ReadOutcome::Expired(why) => {
                self.drop_client(why);
                Ok(false)
            }
            ReadOutcome::Shutdown => {
                self.reply(421, "4.3.2", "Service shutting down, closing connection");
                Ok(false)
            }
        }
    }

    fn reply(&mut self, code: u16, status: &'static str, text: impl Into<Cow<'static, str>>) {
        Reply::new(code, status, text).write_to(&mut self.wbuf);
    }

    fn reply_plain(&mut self, code: u16, text: String) {
        Reply::plain(code, vec![text.into()]).write_to(&mut self.wbuf);
    }

    /// A reply that counts towards the session's error limit.
    fn error(&mut self, code: u16, status: &'static str, text: impl Into<Cow<'static, str>>) {
        self.error_reply(Reply::new(code, status, text));
    }

    /// Only permanent (5xx) replies count: a 452 for recipients beyond the limit is the
    /// normal way to tell a client to send the rest in another transaction.
    fn error_reply(&mut self, reply: Reply) {
        if reply.code >= 500 {
            self.state.errors += 1;
        }
        reply.write_to(&mut self.wbuf);
    }

    /// Queues the 421 that ends the session for `why`, and counts it.
    fn drop_client(&mut self, why: Disconnect) {
        let text = match why {
            Disconnect::SessionTimeout => "Session time limit exceeded, closing connection",
            Disconnect::TooSlow => "Data rate too low, closing connection",
            _ => "Timeout exceeded, closing connection",
        };
        debug!(peer = %self.state.peer, reason = why.as_str(), "dropping the client");
        self.config.metrics.smtp_disconnect(why);
        self.reply(421, "4.4.2", text);
    }

    /// Writes the queued replies, within `limits.command_timeout`: a client that does not
    /// read them is dropped (the error ends the session). The queue is emptied either way,
    /// so nothing waits on that client twice.
    async fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let (stream, wbuf) = (&mut self.stream, &self.wbuf);
        let write = async move {
            stream.write_all(wbuf).await?;
            stream.flush().await
        };
        let written = tokio::time::timeout(self.config.limits.command_timeout, write).await;
        self.wbuf.clear();
        match written {
            Ok(result) => result,
            Err(_) => {
                debug!(peer = %self.state.peer, "the client took no reply within the command timeout");
                self.config
                    .metrics
                    .smtp_disconnect(Disconnect::WriteTimeout);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no reply within the command timeout",
                ))
            }
        }
    }

    /// Makes room and reads more bytes; 0 means EOF.
    async fn read_some(&mut self) -> io::Result<usize> {
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        } else if self.rpos > self.rbuf.len() / 2 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        self.rbuf.reserve(READ_CHUNK);
        self.stream.read_buf(&mut self.rbuf).await
    }

    /// Reads while waiting for a command, until the deadline [`deadline::for_command`]
    /// gives; interrupted by shutdown unless a transaction is in progress.
    async fn read_command_input(&mut self) -> io::Result<ReadOutcome> {
        let limits = self.config.limits;
        loop {
            let now = Instant::now();
            let bdat = self.state.tx.as_ref().and_then(|tx| tx.bdat.as_ref());
            let bdat = bdat.map(|chunks| (chunks.last, &chunks.rate));
            let (deadline, expiry) = deadline::for_command(now, &limits, self.state.deadline, bdat);
            let in_tx = self.state.tx.is_some();
            let shutdown = self.shutdown.clone();
            // A deadline already passed fires without reading: a busy client meets it too.
            if deadline > now {
                tokio::select! {
                    read = tokio::time::timeout_at(deadline, self.read_some()) => match read {
                        Ok(Ok(0)) => return Ok(ReadOutcome::Eof),
                        Ok(Ok(_)) => return Ok(ReadOutcome::Data),
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {}
                    },
                    _ = shutdown.cancelled(), if !in_tx => return Ok(ReadOutcome::Shutdown),
                }
            }
            let why = match expiry {
                Expiry::Command => Disconnect::CommandTimeout,
                Expiry::Data | Expiry::BdatIdle => Disconnect::DataTimeout,
                Expiry::Session => Disconnect::SessionTimeout,
                Expiry::RateWindow => {
                    // Only returned while BDAT chunks are held, and nothing took them since.
                    let chunks = self.state.tx.as_mut().and_then(|tx| tx.bdat.as_mut());
                    let slow = chunks.is_some_and(|c| !c.rate.record(Instant::now(), 0));
                    if !slow {
                        continue;
                    }
                    Disconnect::TooSlow
                }
            };
            return Ok(ReadOutcome::Expired(why));
        }
    }

    /// Reads message content, counting it in `rate`, until the deadline
    /// [`deadline::for_data`] gives. False (after queueing a 421 if the server ends it) when
    /// the session must end.
    async fn read_data_input(&mut self, rate: &mut DataRate) -> io::Result<bool> {
        let limits = self.config.limits;
        loop {
            let now = Instant::now();
            let (deadline, expiry) = deadline::for_data(now, &limits, self.state.deadline, rate);
            if deadline > now {
                match tokio::time::timeout_at(deadline, self.read_some()).await {
                    Ok(Ok(0)) => return Ok(false),
                    Ok(Ok(n)) => {
                        if rate.record(Instant::now(), n) {
                            return Ok(true);
                        }
                        self.drop_client(Disconnect::TooSlow);
                        return Ok(false);
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {}
                }
            }
            let why = match expiry {
                Expiry::Session => Disconnect::SessionTimeout,
                Expiry::RateWindow if rate.record(Instant::now(), 0) => continue,
                Expiry::RateWindow => Disconnect::TooSlow,
                Expiry::Command | Expiry::Data | Expiry::BdatIdle => Disconnect::DataTimeout,
            };
            self.drop_client(why);
            return Ok(false);
        }
    }
}

/// The client's answer to an AUTH challenge.
enum Challenge {
    Response(String),
    /// Cancelled or malformed: a reply has been queued, the session goes on.
    Failed,
    /// The session must end (a 421 may have been queued).
    Close,
}

enum ReadOutcome {
    Data,
    Eof,
    /// A deadline passed: the session ends for this reason.
    Expired(Disconnect),
    Shutdown,
}

/// Printable US-ASCII (RFC 3461 xtext decodes to this), so no CR, LF or other control.
fn is_printable(text: &str) -> bool {
    text.bytes().all(|b| (b' '..=b'~').contains(&b))
}

fn decode_b64(text: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`. An authzid other than the authcid is
/// refused: acting for another user is not supported.
fn decode_plain(response: &str) -> Option<(String, String)> {
    let decoded = decode_b64(response)?;
    let mut parts = decoded.split('\0');
    let (authzid, authcid, password) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || authcid.is_empty() || !(authzid.is_empty() || authzid == authcid) {
        return None;
    }
    Some((authcid.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_decoding() {
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            decode_plain(&b64(b"\0app\0secret")),
            Some(("app".into(), "secret".into()))
        );
        assert_eq!(
            decode_plain(&b64(b"app\0app\0secret")),
            Some(("app".into(), "secret".into()))
        );
        assert_eq!(decode_plain(&b64(b"other\0app\0secret")), None);
        assert_eq!(decode_plain(&b64(b"appsecret")), None);
        assert_eq!(decode_plain("!!!"), None);
    }
}
