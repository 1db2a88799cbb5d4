//! A controllable SMTP sink: the far end of every outbound test (client, pool, delivery).
//!
//! [`Sink::start`] binds 127.0.0.1:0 ([`Sink::start_on`] another loopback address such as
//! 127.0.0.2) and speaks ESMTP to any number of concurrent sessions until the `Sink` is
//! dropped. What it offers and how it answers is a [`SinkBehaviour`], built from
//! `SinkBehaviour::default()` with the chainable setters:
//!
//! - EHLO extensions: PIPELINING, 8BITMIME, SIZE and ENHANCEDSTATUSCODES by default;
//!   `.smtputf8()`, `.dsn()`, `.no_pipelining()`, `.size(..)`; STARTTLS with `.starttls(cert)`
//!   (a certificate for "localhost" signed by the harness CA, or a self-signed one); AUTH
//!   PLAIN with `.auth(user, password)`; `.refuse_ehlo(reply)` makes clients fall back to HELO.
//! - Replies: `.greeting(reply)`, `.mail_reply(f)`, `.rcpt_reply(f)` (per address) and
//!   `.data_reply(f)` (per received message); a closure returns `None` for the default
//!   positive reply. Replies are written without the final CRLF ("550 5.1.1 No such user";
//!   a multi-line reply has "\r\n" between its lines).
//! - Faults: `.fault(phase, Fault::Drop | Fault::Stall)` closes the connection, or stops
//!   answering (while still reading), when the command of `phase` arrives (`Greeting`: instead
//!   of the greeting; `DataEnd`: at the final dot); `.fault_first(n, ..)` only in the first
//!   `n` sessions. `.broken_tls()` answers 220 to STARTTLS and then closes instead of a
//!   handshake. `.data_delay(d)` waits `d` before answering the final dot.
//! - [`Sink::start_at`] binds an exact address, e.g. 127.0.5.1:25 for MX delivery.
//!
//! It records every transaction that reached the end of data as a [`ReceivedMessage`]
//! (sender and parameters, accepted recipients and parameters, the content unstuffed, TLS,
//! client IP, HELO name, AUTH user, the reply given), and per session a [`SessionLog`]:
//! every command line with the number of the socket read that completed it (equal numbers
//! mean the client pipelined those commands), TLS, AUTH user, QUIT seen, closed. It counts
//! sessions and the most sessions open at once. Replies to all commands that arrived in one
//! read are written together, as a pipelining server does.
//!
//! Waiting: [`Sink::wait_for_messages`] and [`Sink::wait_until`] poll the records and panic
//! on timeout with what was recorded so far.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::harness::{test_cert, Io};

/// The host name in the sink's greeting and EHLO reply.
pub const SINK_HOST: &str = "sink.test";

/// Where a fault strikes: when the command of that phase arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkPhase {
    /// Before the greeting is sent.
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    /// At the final dot, before the reply to the content.
    DataEnd,
    Rset,
    Quit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection without answering.
    Drop,
    /// Never answer again; keep reading until the client closes.
    Stall,
}

/// The certificate presented after STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkCert {
    /// "localhost", signed by the harness CA (`harness::test_cert().ca_der`).
    TestCa,
    /// "localhost", self-signed: no root store trusts it.
    SelfSigned,
    /// A chain (PEM, end entity first) and its key (PEM), made by the test.
    Pem(&'static str, &'static str),
}

type AddrReply = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;
type DataReply = Arc<dyn Fn(&ReceivedMessage) -> Option<String> + Send + Sync>;

#[derive(Clone)]
pub struct SinkBehaviour {
    /// Full greeting reply; `None`: "220 sink.test ESMTP".
    pub greeting: Option<String>,
    /// Reply to EHLO instead of the extension list (HELO still works).
    pub ehlo_refused: Option<String>,
    pub pipelining: bool,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    /// SIZE and its value (0: no fixed limit); `None`: not offered.
    pub size: Option<usize>,
    pub starttls: Option<SinkCert>,
    pub broken_tls: bool,
    /// AUTH PLAIN is offered; these credentials are accepted.
    pub auth: Option<(String, String)>,
    /// Reply to MAIL per sender; `None` from the closure: "250 2.1.0 Ok".
    pub mail: AddrReply,
    /// Reply to RCPT per address; `None`: "250 2.1.5 Ok".
    pub rcpt: AddrReply,
    /// Reply after the data; `None`: "250 2.0.0 Ok: queued".
    pub data: DataReply,
    pub fault: Option<(SinkPhase, Fault)>,
    /// The fault applies to sessions with an index below this (all by default).
    pub fault_sessions: usize,
    /// How long to wait before the reply after the final dot (the message is recorded when
    /// the dot arrives, before the wait).
    pub data_delay: Option<Duration>,
}

impl Default for SinkBehaviour {
    fn default() -> Self {
        SinkBehaviour {
            greeting: None,
            ehlo_refused: None,
            pipelining: true,
            eightbitmime: true,
            smtputf8: false,
            dsn: false,
            size: Some(10 << 20),
            starttls: None,
            broken_tls: false,
            auth: None,
            mail: Arc::new(|_| None),
            rcpt: Arc::new(|_| None),
            data: Arc::new(|_| None),
            fault: None,
            fault_sessions: usize::MAX,
            data_delay: None,
        }
    }
}

impl SinkBehaviour {
    pub fn greeting(mut self, reply: &str) -> Self {
        self.greeting = Some(reply.to_string());
        self
    }

    pub fn refuse_ehlo(mut self, reply: &str) -> Self {
        self.ehlo_refused = Some(reply.to_string());
        self
    }

    pub fn no_pipelining(mut self) -> Self {
        self.pipelining = false;
        self
    }

    pub fn smtputf8(mut self) -> Self {
        self.smtputf8 = true;
        self
    }

    pub fn dsn(mut self) -> Self {
        self.dsn = true;
        self
    }

    pub fn size(mut self, size: Option<usize>) -> Self {
        self.size = size;
        self
    }

    pub fn starttls(mut self, cert: SinkCert) -> Self {
        self.starttls = Some(cert);
        self
    }

    /// STARTTLS offered (self-signed) and answered 220, then the connection is closed.
    pub fn broken_tls(mut self) -> Self {
        self.starttls.get_or_insert(SinkCert::SelfSigned);
        self.broken_tls = true;
        self
    }

    pub fn auth(mut self, user: &str, password: &str) -> Self {
        self.auth = Some((user.to_string(), password.to_string()));
        self
    }

    pub fn mail_reply(
        mut self,
        f: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.mail = Arc::new(f);
        self
    }

    pub fn rcpt_reply(
        mut self,
        f: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.rcpt = Arc::new(f);
        self
    }

    pub fn data_reply(
        mut self,
        f: impl Fn(&ReceivedMessage) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.data = Arc::new(f);
        self
    }

    pub fn fault(mut self, phase: SinkPhase, fault: Fault) -> Self {
        self.fault = Some((phase, fault));
        self
    }

    pub fn fault_first(mut self, sessions: usize, phase: SinkPhase, fault: Fault) -> Self {
        self.fault = Some((phase, fault));
        self.fault_sessions = sessions;
        self
    }

    /// Waits `delay` before answering the final dot (a slow queue at the far end).
    pub fn data_delay(mut self, delay: Duration) -> Self {
        self.data_delay = Some(delay);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRcpt {
    pub address: String,
    /// Parameters as sent, e.g. "NOTIFY=FAILURE".
    pub params: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// Index of the session (0-based, in accept order).
    pub session: usize,
    pub mail_from: String,
    /// Parameters as sent, e.g. "SIZE=123", "BODY=8BITMIME".
    pub mail_params: Vec<String>,
    /// Accepted recipients only.
    pub rcpts: Vec<ReceivedRcpt>,
    /// The content as the client meant it: dot-unstuffed, without the final ".CRLF".
    pub data: Vec<u8>,
    pub tls: bool,
    pub client_ip: IpAddr,
    pub helo: String,
    pub auth_user: Option<String>,
    /// The reply the sink gave after the data.
    pub reply: String,
    /// When the data was complete (for rate measurements).
    pub received_at: Instant,
}

impl ReceivedMessage {
    pub fn rcpt_addresses(&self) -> Vec<&str> {
        self.rcpts.iter().map(|r| r.address.as_str()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedCommand {
    pub line: String,
    /// Number of the socket read that completed this line (counted per session).
    pub batch: usize,
}

#[derive(Debug, Clone)]
pub struct SessionLog {
    pub client_ip: IpAddr,
    pub commands: Vec<ReceivedCommand>,
    pub tls: bool,
    pub auth_user: Option<String>,
    pub quit: bool,
    pub closed: bool,
}

impl SessionLog {
    /// The command verbs, uppercase, in order ("EHLO", "MAIL", ...).
    pub fn verbs(&self) -> Vec<String> {
        self.commands
            .iter()
            .map(|c| {
                c.line
                    .split(' ')
                    .next()
                    .unwrap_or_default()
                    .to_ascii_uppercase()
            })
            .collect()
    }

    pub fn has_verb(&self, verb: &str) -> bool {
        self.verbs().iter().any(|v| v == verb)
    }
}

#[derive(Default)]
struct Records {
    messages: Vec<ReceivedMessage>,
    sessions: Vec<SessionLog>,
    active: usize,
    max_concurrent: usize,
}

type Shared = Arc<Mutex<Records>>;

pub struct Sink {
    pub addr: SocketAddr,
    records: Shared,
    stop: CancellationToken,
}

impl Sink {
    pub async fn start(behaviour: SinkBehaviour) -> Sink {
        Sink::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), behaviour).await
    }

    /// Binds `ip`:0; `ip` must be a loopback address (tests talk to loopback only).
    pub async fn start_on(ip: IpAddr, behaviour: SinkBehaviour) -> Sink {
        Sink::start_at(SocketAddr::new(ip, 0), behaviour).await
    }

    /// Binds exactly `addr` (e.g. 127.0.5.1:25 for MX delivery); loopback only.
    pub async fn start_at(addr: SocketAddr, behaviour: SinkBehaviour) -> Sink {
        let ip = addr.ip();
        assert!(ip.is_loopback(), "the sink binds loopback addresses only");
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("sink bind {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let records = Shared::default();
        let stop = CancellationToken::new();
        let behaviour = Arc::new(behaviour);
        tokio::spawn(accept_loop(
            listener,
            behaviour,
            records.clone(),
            stop.clone(),
        ));
        Sink {
            addr,
            records,
            stop,
        }
    }

    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.records().messages.clone()
    }

    /// Sessions accepted so far.
    pub fn sessions(&self) -> usize {
        self.records().sessions.len()
    }

    pub fn session_logs(&self) -> Vec<SessionLog> {
        self.records().sessions.clone()
    }

    pub fn session_log(&self, index: usize) -> SessionLog {
        self.records()
            .sessions
            .get(index)
            .cloned()
            .unwrap_or_else(|| panic!("no session {index}"))
    }

    /// Sessions open right now.
    pub fn active(&self) -> usize {
        self.records().active
    }

    pub fn max_concurrent(&self) -> usize {
        self.records().max_concurrent
    }

    /// Waits until at least `n` messages were received; returns all of them.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        self.wait_until(&format!("{n} messages"), timeout, |s| {
            s.messages().len() >= n
        })
        .await;
        self.messages()
    }

    /// Polls `done` until it holds; panics after `timeout`, naming `what` and the records.
    pub async fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&Sink) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() >= deadline {
                panic!(
                    "sink: no {what} within {timeout:?}; sessions: {:#?}; messages: {}",
                    self.session_logs(),
                    self.messages().len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    behaviour: Arc<SinkBehaviour>,
    records: Shared,
    stop: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let index = {
            let mut r = records.lock().unwrap();
            r.sessions.push(SessionLog {
                client_ip: peer.ip(),
                commands: Vec::new(),
                tls: false,
                auth_user: None,
                quit: false,
                closed: false,
            });
            r.active += 1;
            r.max_concurrent = r.max_concurrent.max(r.active);
            r.sessions.len() - 1
        };
        let session = Session::new(tcp, peer.ip(), index, behaviour.clone(), records.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let records = session.records.clone();
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = session.run() => {}
            }
            let mut r = records.lock().unwrap();
            r.active -= 1;
            r.sessions[index].closed = true;
        });
    }
}

struct Transaction {
    from: String,
    params: Vec<String>,
    rcpts: Vec<ReceivedRcpt>,
}

enum Mode {
    Command,
    Data(Vec<u8>),
    /// AUTH PLAIN without an initial response: the next line is the response.
    AuthResponse,
}

/// What to do after a command.
enum Flow {
    Continue,
    Close,
    Stall,
    StartTls,
}

struct Session {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    out: Vec<u8>,
    batch: usize,
    mode: Mode,
    client_ip: IpAddr,
    index: usize,
    b: Arc<SinkBehaviour>,
    records: Shared,
    helo: Option<String>,
    tls: bool,
    auth_user: Option<String>,
    tx: Option<Transaction>,
    /// Set at the final dot when `data_delay` is configured; slept before the next flush.
    delay: Option<Duration>,
}

impl Session {
    fn new(
        tcp: TcpStream,
        client_ip: IpAddr,
        index: usize,
        b: Arc<SinkBehaviour>,
        records: Shared,
    ) -> Session {
        Session {
            io: Box::new(tcp),
            buf: Vec::new(),
            out: Vec::new(),
            batch: 0,
            mode: Mode::Command,
            client_ip,
            index,
            b,
            records,
            helo: None,
            tls: false,
            auth_user: None,
            tx: None,
            delay: None,
        }
    }

    fn fault(&self, phase: SinkPhase) -> Option<Fault> {
        match self.b.fault {
            Some((p, f)) if p == phase && self.index < self.b.fault_sessions => Some(f),
            _ => None,
        }
    }

    async fn run(mut self) {
        let flow = match self.fault(SinkPhase::Greeting) {
            Some(Fault::Drop) => Flow::Close,
            Some(Fault::Stall) => Flow::Stall,
            None => {
                let greeting = self
                    .b
                    .greeting
                    .clone()
                    .unwrap_or_else(|| format!("220 {SINK_HOST} ESMTP sink"));
                self.reply(&greeting);
                Flow::Continue
            }
        };
        match flow {
            Flow::Continue => self.dialogue().await,
            Flow::Stall => self.stall().await,
            _ => {}
        }
    }

    async fn dialogue(&mut self) {
        loop {
            let mut flow = Flow::Continue;
            while let Some(line) = self.next_line() {
                flow = self.line(line);
                if !matches!(flow, Flow::Continue) {
                    break;
                }
            }
            if let Some(delay) = self.delay.take() {
                tokio::time::sleep(delay).await;
            }
            if self.flush().await.is_err() {
                return;
            }
            match flow {
                Flow::Continue => {}
                Flow::Close => return,
                Flow::Stall => return self.stall().await,
                Flow::StartTls => {
                    if !self.start_tls().await {
                        return;
                    }
                    continue;
                }
            }
            let mut chunk = [0u8; 8192];
            match self.io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    self.batch += 1;
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// Reads and discards until the client gives up.
    async fn stall(&mut self) {
        let _ = self.flush().await;
        let mut chunk = [0u8; 8192];
        while let Ok(n) = self.io.read(&mut chunk).await {
            if n == 0 {
                return;
            }
        }
    }

    async fn start_tls(&mut self) -> bool {
        // RFC 3207: anything the client pipelined after STARTTLS is discarded.
        self.buf.clear();
        if self.b.broken_tls {
            return false;
        }
        let cert = self.b.starttls.expect("STARTTLS only when configured");
        let io = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(cert));
        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(io)).await {
            Ok(Ok(tls)) => {
                self.io = Box::new(tls);
                self.tls = true;
                self.helo = None;
                self.tx = None;
                self.log(|l| l.tls = true);
                true
            }
            _ => false,
        }
    }

    fn next_line(&mut self) -> Option<Vec<u8>> {
        let end = self.buf.iter().position(|&b| b == b'\n')? + 1;
        Some(self.buf.drain(..end).collect())
    }

    fn reply(&mut self, reply: &str) {
        self.out.extend_from_slice(reply.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        self.io.write_all(&out).await?;
        self.io.flush().await
    }

    fn log(&self, f: impl FnOnce(&mut SessionLog)) {
        f(&mut self.records.lock().unwrap().sessions[self.index]);
    }

    fn line(&mut self, raw: Vec<u8>) -> Flow {
        match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::Data(mut data) => {
                if raw == b".\r\n" {
                    return self.data_end(data);
                }
                let unstuffed = raw.strip_prefix(b".").unwrap_or(&raw);
                data.extend_from_slice(unstuffed);
                self.mode = Mode::Data(data);
                Flow::Continue
            }
            Mode::AuthResponse => {
                let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                self.check_plain(&line);
                Flow::Continue
            }
            Mode::Command => {
                let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                let batch = self.batch;
                self.log(|l| {
                    l.commands.push(ReceivedCommand {
                        line: line.clone(),
                        batch,
                    })
                });
                self.command(&line)
            }
        }
    }

    fn command(&mut self, line: &str) -> Flow {
        let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
        let verb = verb.to_ascii_uppercase();
        let phase = match verb.as_str() {
            "EHLO" | "HELO" => Some(SinkPhase::Ehlo),
            "STARTTLS" => Some(SinkPhase::StartTls),
            "AUTH" => Some(SinkPhase::Auth),
            "MAIL" => Some(SinkPhase::Mail),
            "RCPT" => Some(SinkPhase::Rcpt),
            "DATA" => Some(SinkPhase::Data),
            "RSET" => Some(SinkPhase::Rset),
            "QUIT" => Some(SinkPhase::Quit),
            _ => None,
        };
        match phase.and_then(|p| self.fault(p)) {
            Some(Fault::Drop) => return Flow::Close,
            Some(Fault::Stall) => return Flow::Stall,
            None => {}
        }
        match verb.as_str() {
            "EHLO" => {
                if let Some(refusal) = self.b.ehlo_refused.clone() {
                    self.reply(&refusal);
                } else {
                    self.helo = Some(arg.to_string());
                    self.tx = None;
                    let lines = self.ehlo_lines();
                    let last = lines.len() - 1;
                    for (i, l) in lines.iter().enumerate() {
                        let sep = if i == last { ' ' } else { '-' };
                        self.reply(&format!("250{sep}{l}"));
                    }
                }
            }
            "HELO" => {
                self.helo = Some(arg.to_string());
                self.tx = None;
                self.reply(&format!("250 {SINK_HOST}"));
            }
            "STARTTLS" if self.b.starttls.is_some() && !self.tls => {
                self.reply("220 2.0.0 Ready to start TLS");
                return Flow::StartTls;
            }
            "AUTH" if self.b.auth.is_some() && self.auth_user.is_none() => {
                let (mech, initial) = arg.split_once(' ').unwrap_or((arg, ""));
                if !mech.eq_ignore_ascii_case("PLAIN") {
                    self.reply("504 5.5.4 Unrecognized authentication type");
                } else if initial.is_empty() {
                    self.reply("334 ");
                    self.mode = Mode::AuthResponse;
                } else {
                    self.check_plain(initial);
                }
            }
            "MAIL" if self.helo.is_some() => {
                let Some((from, params)) = path_and_params(arg, "FROM:") else {
                    self.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
                    return Flow::Continue;
                };
                let reply = (self.b.mail)(&from).unwrap_or_else(|| "250 2.1.0 Ok".into());
                if reply.starts_with('2') {
                    self.tx = Some(Transaction {
                        from,
                        params,
                        rcpts: Vec::new(),
                    });
                }
                self.reply(&reply);
            }
            "RCPT" if self.tx.is_some() => {
                let Some((address, params)) = path_and_params(arg, "TO:") else {
                    self.reply("501 5.5.4 Syntax: RCPT TO:<address>");
                    return Flow::Continue;
                };
                let reply = (self.b.rcpt)(&address).unwrap_or_else(|| "250 2.1.5 Ok".into());
                if reply.starts_with('2') {
                    let tx = self.tx.as_mut().unwrap();
                    tx.rcpts.push(ReceivedRcpt { address, params });
                }
                self.reply(&reply);
            }
            "DATA" => match &self.tx {
                None => self.reply("503 5.5.1 Error: need MAIL command"),
                Some(tx) if tx.rcpts.is_empty() => {
                    self.reply("554 5.5.1 Error: no valid recipients")
                }
                Some(_) => {
                    self.reply("354 End data with <CR><LF>.<CR><LF>");
                    self.mode = Mode::Data(Vec::new());
                }
            },
            "RSET" => {
                self.tx = None;
                self.reply("250 2.0.0 Ok");
            }
            "NOOP" => self.reply("250 2.0.0 Ok"),
            "QUIT" => {
                self.log(|l| l.quit = true);
                self.reply("221 2.0.0 Bye");
                return Flow::Close;
            }
            "MAIL" | "RCPT" => self.reply("503 5.5.1 Error: bad sequence of commands"),
            _ => self.reply("502 5.5.2 Error: command not recognized"),
        }
        Flow::Continue
    }

    fn ehlo_lines(&self) -> Vec<String> {
        let b = &self.b;
        let mut lines = vec![SINK_HOST.to_string()];
        if b.pipelining {
            lines.push("PIPELINING".into());
        }
        if let Some(size) = b.size {
            lines.push(format!("SIZE {size}"));
        }
        if b.eightbitmime {
            lines.push("8BITMIME".into());
        }
        if b.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        if b.dsn {
            lines.push("DSN".into());
        }
        if b.starttls.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        if b.auth.is_some() {
            lines.push("AUTH PLAIN".into());
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        lines
    }

    fn check_plain(&mut self, response: &str) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(response.trim())
            .unwrap_or_default();
        let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
        let (user, password) = self.b.auth.clone().expect("AUTH only when configured");
        if parts.len() == 3 && parts[1] == user.as_bytes() && parts[2] == password.as_bytes() {
            self.auth_user = Some(user.clone());
            self.log(|l| l.auth_user = Some(user));
            self.reply("235 2.7.0 Authentication successful");
        } else {
            self.reply("535 5.7.8 Authentication credentials invalid");
        }
    }

    fn data_end(&mut self, data: Vec<u8>) -> Flow {
        match self.fault(SinkPhase::DataEnd) {
            Some(Fault::Drop) => return Flow::Close,
            Some(Fault::Stall) => return Flow::Stall,
            None => {}
        }
        let tx = self.tx.take().expect("DATA only within a transaction");
        let mut message = ReceivedMessage {
            session: self.index,
            mail_from: tx.from,
            mail_params: tx.params,
            rcpts: tx.rcpts,
            data,
            tls: self.tls,
            client_ip: self.client_ip,
            helo: self.helo.clone().unwrap_or_default(),
            auth_user: self.auth_user.clone(),
            reply: String::new(),
            received_at: Instant::now(),
        };
        message.reply =
            (self.b.data)(&message).unwrap_or_else(|| "250 2.0.0 Ok: queued".to_string());
        let reply = message.reply.clone();
        self.records.lock().unwrap().messages.push(message);
        self.delay = self.b.data_delay;
        self.reply(&reply);
        Flow::Continue
    }
}

/// "FROM:<a@b> X=1 Y" -> ("a@b", ["X=1", "Y"]).
fn path_and_params(arg: &str, keyword: &str) -> Option<(String, Vec<String>)> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start().strip_prefix('<')?;
    let (path, params) = rest.split_once('>')?;
    Some((
        path.to_string(),
        params.split_whitespace().map(str::to_string).collect(),
    ))
}

pub(crate) fn server_config(cert: SinkCert) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert_pem, key_pem) = match cert {
        SinkCert::TestCa => {
            let c = test_cert();
            (c.leaf_pem.clone(), c.key_pem.clone())
        }
        SinkCert::SelfSigned => {
            let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
                .expect("self-signed cert");
            (c.cert.pem(), c.key_pair.serialize_pem())
        }
        SinkCert::Pem(chain, key) => (chain.to_owned(), key.to_owned()),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    Arc::new(config)
}
