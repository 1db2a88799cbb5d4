//! One inbound SMTP session: a state machine generic over the byte stream.
//!
//! The session reads into one buffer, answers every complete command in it (PIPELINING),
//! and flushes its replies only when it would otherwise block on reading. DATA and BDAT
//! content goes through [`DataDecoder`] / [`ContentCheck`], and a message is handed to
//! [`Intake`] only when complete, clean and within limits.
//!
//! Invariants:
//! - `250 ... queued as` is written only after [`Intake::accept`] returned, i.e. after the
//!   spool's fsync.
//! - Bytes pipelined after STARTTLS are discarded, never carried into the TLS session
//!   (CVE-2011-0411 class command injection).
//! - AUTH is refused on a connection without TLS; passwords never cross in clear.
//! - Every reply but the greeting and EHLO carries an enhanced status code.

use crate::auth::Credentials;
use crate::config::Limits;
use crate::feedback::Feedback;
use crate::intake::Intake;
use crate::message::{same_address, Submission};
use crate::policy::{self, Policy};
use crate::rfc5321::proto::{self, ContentCheck, ContentFlags, DataDecoder, Line};
use crate::rfc5321::reply::Reply;
use crate::telemetry::{Metrics, Protocol, Rejection};
use crate::tls::TlsInfo;
use base64::Engine;
use smtp_proto::{Error as ParseError, Request};
use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tern_queue::{BodyType, Notify, Recipient, Ret, Source, SpoolError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
}

struct Chunks {
    content: Vec<u8>,
    size: usize,
    check: ContentCheck,
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
            // For TLS this sends close_notify (RFC 8446 6.1); for TCP it is the FIN.
            let _ = self.stream.shutdown().await;
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
            let relay_ok = authenticated || feedback.is_bounce_address(&to.address);
            if let Err(reply) = self
                .config
                .policy
                .recipient(peer, relay_ok, tx.recipients.len())
            {
                // The policy refuses with 452 for the recipient limit, else for relaying.
                self.config.metrics.message_rejected(if reply.code == 452 {
                    Rejection::Recipients
                } else {
                    Rejection::RelayDenied
                });
                return self.error_reply(reply);
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
        self.reply(354, "2.0.0", "End data with <CR><LF>.<CR><LF>");
        self.flush().await?;

        let max = self.config.limits.max_message_size as usize;
        let mut decoder = DataDecoder::new(max);
        let mut content = Vec::with_capacity(READ_CHUNK.min(max));
        let end = loop {
            let (used, end) = decoder.feed(&self.rbuf[self.rpos..], &mut content);
            self.rpos += used;
            if let Some(end) = end {
                break end;
            }
            if !self.read_data_input().await? {
                return Ok(Next::Close);
            }
        };
        let tx = self.state.tx.take().expect("checked above");
        self.finish_message(tx, content, end.size, end.flags).await;
        Ok(Next::Continue)
    }

    async fn bdat(&mut self, chunk_size: usize, is_last: bool) -> io::Result<Next> {
        let max = self.config.limits.max_message_size as usize;
        // RFC 3030: the chunk is read whatever the verdict, or the session loses sync.
        let refusal = match &self.state.tx {
            None => Some(Reply::new(503, "5.5.1", "Error: need MAIL command")),
            Some(tx) if tx.recipients.is_empty() => {
                Some(Reply::new(554, "5.5.1", "Error: no valid recipients"))
            }
            Some(_) => None,
        };
        let mut chunks = match self.state.tx.as_mut().and_then(|tx| tx.bdat.take()) {
            Some(chunks) => chunks,
            None => Chunks {
                content: Vec::new(),
                size: 0,
                check: ContentCheck::default(),
            },
        };
        let mut left = chunk_size;
        while left > 0 {
            if self.rpos == self.rbuf.len() && !self.read_data_input().await? {
                return Ok(Next::Close);
            }
            let take = left.min(self.rbuf.len() - self.rpos);
            let bytes = &self.rbuf[self.rpos..self.rpos + take];
            if refusal.is_none() {
                chunks.check.scan(bytes);
                let room = max.saturating_sub(chunks.content.len());
                chunks.content.extend_from_slice(&bytes[..take.min(room)]);
                chunks.size += take;
            }
            self.rpos += take;
            left -= take;
        }
        if let Some(reply) = refusal {
            self.error_reply(reply);
            return Ok(Next::Continue);
        }
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
        self.finish_message(tx, chunks.content, chunks.size, flags)
            .await;
        Ok(Next::Continue)
    }

    /// Decides on a complete message and, if it is acceptable, makes it durable.
    async fn finish_message(
        &mut self,
        tx: Transaction,
        content: Vec<u8>,
        size: usize,
        flags: ContentFlags,
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
        // Password hashing is deliberately slow: keep it off the async workers.
        let check_user = user.clone();
        let ok = tokio::task::spawn_blocking(move || credentials.verify(&check_user, &password))
            .await
            .unwrap_or(false);
        if ok {
            info!(peer = %self.state.peer, user, "authenticated");
            self.state.auth_user = Some(user);
            self.reply(235, "2.7.0", "Authentication successful");
        } else {
            warn!(peer = %self.state.peer, user, "authentication failed");
            self.config.metrics.message_rejected(Rejection::AuthFailed);
            self.error(535, "5.7.8", "Authentication credentials invalid");
        }
        Ok(Next::Continue)
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
    /// must end: EOF, or a timeout or shutdown (a 421 has then been queued).
    async fn wait_for_command_input(&mut self) -> io::Result<bool> {
        self.flush().await?;
        match self.read_command_input().await? {
            ReadOutcome::Data => Ok(true),
            ReadOutcome::Eof => Ok(false),
            ReadOutcome::Timeout => {
                self.reply(421, "4.4.2", "Timeout exceeded, closing connection");
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

    async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await?;
            self.wbuf.clear();
        }
        Ok(())
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

    /// Reads while waiting for a command: bounded by the command timeout and interrupted
    /// by shutdown unless a transaction is in progress.
    async fn read_command_input(&mut self) -> io::Result<ReadOutcome> {
        let timeout = self.config.limits.command_timeout;
        let in_tx = self.state.tx.is_some();
        let shutdown = self.shutdown.clone();
        tokio::select! {
            read = tokio::time::timeout(timeout, self.read_some()) => match read {
                Ok(Ok(0)) => Ok(ReadOutcome::Eof),
                Ok(Ok(_)) => Ok(ReadOutcome::Data),
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(ReadOutcome::Timeout),
            },
            _ = shutdown.cancelled(), if !in_tx => Ok(ReadOutcome::Shutdown),
        }
    }

    /// Reads message content; false (after queueing a 421 on timeout) when the session
    /// must end.
    async fn read_data_input(&mut self) -> io::Result<bool> {
        let timeout: Duration = self.config.limits.data_timeout;
        match tokio::time::timeout(timeout, self.read_some()).await {
            Ok(Ok(0)) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.reply(421, "4.4.2", "Timeout exceeded, closing connection");
                Ok(false)
            }
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
    Timeout,
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
