//! Shared test machinery: an in-process daemon on 127.0.0.1:0 with a spool in a temp dir,
//! a generated TLS certificate, a raw SMTP client, and helpers to run the real `tern` binary.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tempfile::TempDir;
use tern::config::{Config, ConfigErrors};
use tern::daemon::Daemon;
use tern::reload::ReloadReport;
use tern_queue::{Envelope, MessageId, Spool};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The server's name in every test config.
pub const HOST: &str = "tern.test";
/// The one AUTH user of configs with `auth: true`.
pub const USER: &str = "app";
pub const PASSWORD: &str = "secret";
/// Longest wait for any single reply; a hang fails the test instead of blocking it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Certificates and password hashes

/// A throwaway CA and a leaf certificate for "localhost" (and the MTA-STS test domains'
/// hosts: `*.sts.test`, `*.mismatch.test`, `*.testing.test`, `*.reuse.test`) signed by it.
pub struct TestCert {
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
    pub leaf_pem: String,
    pub key_pem: String,
}

pub fn test_cert() -> &'static TestCert {
    static CERT: OnceLock<TestCert> = OnceLock::new();
    CERT.get_or_init(|| {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tern test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");

        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let mut leaf_params = rcgen::CertificateParams::new(
            [
                "localhost",
                "*.sts.test",
                "*.mismatch.test",
                "*.testing.test",
                "*.reuse.test",
            ]
            .map(str::to_string)
            .to_vec(),
        )
        .expect("leaf params");
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf cert");
        TestCert {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            leaf_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
        }
    })
}

/// Writes cert.pem, key.pem and ca.pem into `dir`; returns (cert, key, ca) paths.
pub fn write_cert_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let cert = test_cert();
    let (c, k, a) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&c, &cert.leaf_pem).unwrap();
    write_secret(&k, &cert.key_pem);
    std::fs::write(&a, &cert.ca_pem).unwrap();
    (c, k, a)
}

/// Writes a secret file (a key, token or password) readable by its owner only, mode 0600, as
/// tern requires of every secret file it is given (it refuses group- or world-readable ones);
/// an existing file is replaced.
pub fn write_secret(path: &Path, contents: impl AsRef<[u8]>) {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // `mode` applies only to a file it creates.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap();
    file.write_all(contents.as_ref()).unwrap();
}

/// An argon2id PHC hash of [`PASSWORD`] with the smallest parameters argon2 allows, so that
/// every AUTH in the tests costs microseconds instead of the production parameters' cost
/// (which is large in an unoptimised test build). Verification reads the parameters from
/// the PHC string, so this exercises exactly the production verify path.
pub fn cheap_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::encode_b64(b"tern-test-salt!!").unwrap();
        argon
            .hash_password(PASSWORD.as_bytes(), &salt)
            .unwrap()
            .to_string()
    })
}

pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// Where `sink.test` is routed unless a test routes it (or anything) itself.
const DEFAULT_SINK_ROUTE: &str = "127.0.0.1:2526";

#[derive(Clone, Debug)]
pub struct Options {
    /// A `[tls]` section (STARTTLS offered on smtp listeners).
    pub tls: bool,
    /// An extra `smtps` (implicit TLS) listener; implies `tls`.
    pub smtps: bool,
    /// One AUTH user, [`USER`] / [`PASSWORD`].
    pub auth: bool,
    pub relay: Vec<String>,
    /// `[limits]` entries as `key = <TOML literal>`.
    pub limits: Vec<(String, String)>,
    pub shutdown_grace: String,
    pub log_level: String,
    /// `[delivery]` keys as TOML literals; delivery starts suspended unless a test turns it on.
    pub delivery: Vec<(String, String)>,
    /// `[[routes]]`: (domain, host:port).
    pub routes: Vec<(String, String)>,
    /// Extra keys of `[[routes]]` entries: (domain, `key = <TOML literal>`).
    pub route_options: Vec<(String, String)>,
    /// `[[dkim]]` entries as raw TOML bodies.
    pub dkim: Vec<String>,
    /// `[spool]` keys other than `path`, as TOML literals.
    pub spool: Vec<(String, String)>,
    /// Raw TOML appended at the end (whole sections: `[shaping]`, `[[pools]]`, `[bounce]`,
    /// `[suppression]`, ...).
    pub extra: Vec<String>,
    /// `[sendtime]` keys as TOML literals.
    pub sendtime: Vec<(String, String)>,
    /// `[admin]` keys other than `address` and `token_file`, as TOML literals.
    pub admin: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tls: false,
            smtps: false,
            auth: false,
            relay: vec!["127.0.0.0/8".to_string()],
            limits: Vec::new(),
            shutdown_grace: "3s".to_string(),
            log_level: "info".to_string(),
            // No DNS beyond loopback: the DKIM record check would ask the system resolver.
            delivery: vec![
                ("suspended".to_string(), "true".to_string()),
                ("check_dkim_records".to_string(), "false".to_string()),
                ("mta_sts".to_string(), "false".to_string()),
            ],
            routes: vec![("sink.test".to_string(), DEFAULT_SINK_ROUTE.to_string())],
            route_options: Vec::new(),
            dkim: Vec::new(),
            spool: Vec::new(),
            extra: Vec::new(),
            sendtime: Vec::new(),
            admin: Vec::new(),
        }
    }
}

impl Options {
    /// Sets a `[limits]` key; `value` is a TOML literal (`10000`, `"2s"`).
    pub fn limit(mut self, key: &str, value: impl ToString) -> Self {
        self.limits.push((key.to_string(), value.to_string()));
        self
    }

    pub fn relay(mut self, networks: &[&str]) -> Self {
        self.relay = networks.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    pub fn auth(mut self) -> Self {
        self.auth = true;
        self
    }

    /// Turns delivery on (it starts suspended in tests that only look at the spool).
    pub fn deliver(mut self) -> Self {
        self.delivery.retain(|(k, _)| k != "suspended");
        self
    }

    /// Sets a `[delivery]` key; `value` is a TOML literal.
    pub fn delivery(mut self, key: &str, value: impl ToString) -> Self {
        self.delivery.retain(|(k, _)| k != key);
        self.delivery.push((key.to_string(), value.to_string()));
        self
    }

    /// Routes `domain` to `host_port` (replacing the default sink.test route on first use);
    /// an empty `host_port` makes it a route without hosts (MX routing, its `tls` level).
    pub fn route(mut self, domain: &str, host_port: impl ToString) -> Self {
        let default = ("sink.test".to_string(), DEFAULT_SINK_ROUTE.to_string());
        self.routes.retain(|r| r.0 != domain && *r != default);
        self.routes
            .push((domain.to_string(), host_port.to_string()));
        self
    }

    /// Sets another key of the route for `domain` (e.g. `tls`, `"\"required\""`); `value` is
    /// a TOML literal.
    pub fn route_option(mut self, domain: &str, key: &str, value: impl ToString) -> Self {
        self.route_options
            .push((domain.to_string(), format!("{key} = {}", value.to_string())));
        self
    }

    /// Sets a `[sendtime]` key; `value` is a TOML literal.
    pub fn sendtime(mut self, key: &str, value: impl ToString) -> Self {
        self.sendtime.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets an `[admin]` key (`header_timeout`, ...); `value` is a TOML literal.
    pub fn admin(mut self, key: &str, value: impl ToString) -> Self {
        self.admin.retain(|(k, _)| k != key);
        self.admin.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets a `[spool]` key (`max_age`, `path`, ...); `value` is a TOML literal.
    pub fn spool(mut self, key: &str, value: impl ToString) -> Self {
        self.spool.retain(|(k, _)| k != key);
        self.spool.push((key.to_string(), value.to_string()));
        self
    }

    /// Adds a `[[dkim]]` entry (the TOML lines of its body).
    pub fn dkim(mut self, body: impl ToString) -> Self {
        self.dkim.push(body.to_string());
        self
    }

    /// Appends raw TOML (whole sections) to the config.
    pub fn extra(mut self, toml: impl ToString) -> Self {
        self.extra.push(toml.to_string());
        self
    }

    pub fn smtps(mut self) -> Self {
        self.tls = true;
        self.smtps = true;
        self
    }

    /// The TOML text for a server whose files live in `dir`, with one smtp listener on
    /// `smtp_addr` (and one smtps listener on `smtps_addr` if enabled).
    pub fn config_text(&self, dir: &Path, smtp_addr: &str, smtps_addr: &str) -> String {
        let mut t = String::new();
        writeln!(
            t,
            "[server]\nhostname = \"{HOST}\"\nshutdown_grace = \"{}\"\n",
            self.shutdown_grace
        )
        .unwrap();
        writeln!(
            t,
            "[[listeners]]\naddress = \"{smtp_addr}\"\nmode = \"smtp\"\n"
        )
        .unwrap();
        if self.smtps {
            writeln!(
                t,
                "[[listeners]]\naddress = \"{smtps_addr}\"\nmode = \"smtps\"\n"
            )
            .unwrap();
        }
        if self.tls || self.smtps {
            let (cert, key, _) = write_cert_files(dir);
            writeln!(
                t,
                "[tls]\ncert = {:?}\nkey = {:?}\n",
                cert.display().to_string(),
                key.display().to_string()
            )
            .unwrap();
        }
        let nets: Vec<String> = self.relay.iter().map(|n| format!("{n:?}")).collect();
        writeln!(t, "[relay]\nnetworks = [{}]\n", nets.join(", ")).unwrap();
        if self.auth {
            writeln!(
                t,
                "[[auth.users]]\nname = \"{USER}\"\npassword_hash = \"{}\"\n",
                cheap_hash()
            )
            .unwrap();
        }
        writeln!(t, "[limits]").unwrap();
        for (k, v) in &self.limits {
            writeln!(t, "{k} = {v}").unwrap();
        }
        writeln!(t, "\n[spool]").unwrap();
        // A test may put the spool elsewhere (a small file system of its own).
        if !self.spool.iter().any(|(k, _)| k == "path") {
            let spool = dir.join("spool");
            writeln!(t, "path = {:?}", spool.display().to_string()).unwrap();
        }
        for (k, v) in &self.spool {
            writeln!(t, "{k} = {v}").unwrap();
        }
        writeln!(t).unwrap();
        // Port 0: never collides with another test (nothing binds it today anyway).
        let token = dir.join("admin.token");
        writeln!(
            t,
            "[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = {:?}",
            token.display().to_string()
        )
        .unwrap();
        for (k, v) in &self.admin {
            writeln!(t, "{k} = {v}").unwrap();
        }
        writeln!(t).unwrap();
        for (domain, host) in &self.routes {
            writeln!(t, "[[routes]]\ndomain = {domain:?}").unwrap();
            // An empty host: a policy route (no hosts, MX routing).
            if !host.is_empty() {
                writeln!(t, "hosts = [{host:?}]").unwrap();
            }
            for (_, line) in self.route_options.iter().filter(|(d, _)| d == domain) {
                writeln!(t, "{line}").unwrap();
            }
            writeln!(t).unwrap();
        }
        writeln!(t, "[delivery]").unwrap();
        let log = dir.join("delivery.log");
        writeln!(t, "log_path = {:?}", log.display().to_string()).unwrap();
        for (k, v) in &self.delivery {
            writeln!(t, "{k} = {v}").unwrap();
        }
        for body in &self.dkim {
            writeln!(t, "\n[[dkim]]\n{body}").unwrap();
        }
        if !self.sendtime.is_empty() {
            writeln!(t, "\n[sendtime]").unwrap();
            for (k, v) in &self.sendtime {
                writeln!(t, "{k} = {v}").unwrap();
            }
        }
        writeln!(t).unwrap();
        writeln!(
            t,
            "[log]\nformat = \"text\"\nlevel = \"{}\"",
            self.log_level
        )
        .unwrap();
        for extra in &self.extra {
            writeln!(t, "\n{extra}").unwrap();
        }
        t
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// One HTTP/1.1 request over a fresh connection (`Connection: close`); returns the status code
/// and the body. A JSON body is sent with its content type; a missing token sends no
/// Authorization header.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: tern\r\nConnection: close\r\n");
    if let Some(token) = token {
        write!(request, "Authorization: Bearer {token}\r\n").unwrap();
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method != "GET" {
        write!(
            request,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
        .unwrap();
    }
    request.push_str("\r\n");
    request.push_str(body);
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("admin server listening");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut response))
        .await
        .expect("HTTP answered in time")
        .unwrap();
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP head and body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

// ---------------------------------------------------------------------------------------------
// In-process server

pub struct TestServer {
    daemon: Option<Daemon>,
    pub smtp: SocketAddr,
    pub smtps: Option<SocketAddr>,
    /// The config the daemon runs with (restarts use it again).
    /// Kept last so the spool directory outlives the daemon.
    pub dir: TempDir,
}

impl TestServer {
    pub async fn start(opts: Options) -> TestServer {
        TestServer::start_in(opts, tempfile::tempdir().unwrap()).await
    }

    /// Shuts the daemon down and starts a new one with `opts` on the same directory (spool,
    /// admin token, delivery log), as a restart of the service would.
    pub async fn restart(mut self, opts: Options) -> TestServer {
        if let Some(d) = self.daemon.take() {
            tokio::time::timeout(Duration::from_secs(20), d.shutdown())
                .await
                .expect("shutdown within 20 s")
                .expect("clean shutdown");
        }
        TestServer::start_in(opts, self.dir).await
    }

    async fn start_in(opts: Options, dir: TempDir) -> TestServer {
        let text = opts.config_text(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
        let config = Config::parse(&text)
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"));
        let daemon = Daemon::start(config).await.expect("daemon starts");
        let addrs = daemon.smtp_addresses().to_vec();
        assert_eq!(addrs.len(), if opts.smtps { 2 } else { 1 }, "{addrs:?}");
        assert!(
            addrs.iter().all(|a| a.port() != 0),
            "port 0 must be resolved: {addrs:?}"
        );
        TestServer {
            daemon: Some(daemon),
            smtp: addrs[0],
            smtps: addrs.get(1).copied(),
            dir,
        }
    }

    pub fn spool(&self) -> &Spool {
        self.daemon().spool()
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("running")
    }

    /// Reloads the running daemon with the config `opts` describes (files in the same
    /// directory, listeners and admin still on port 0, so unchanged).
    pub fn reload(&self, opts: &Options) -> Result<ReloadReport, ConfigErrors> {
        let text = opts.config_text(self.dir.path(), "127.0.0.1:0", "127.0.0.1:0");
        let config = Config::parse(&text)
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"));
        self.daemon().reload(config)
    }

    /// The admin HTTP server's address (`GET /metrics`).
    pub fn admin(&self) -> SocketAddr {
        self.daemon.as_ref().expect("running").admin_address()
    }

    /// Waits until the delivery-log lines recorded so far are in the file.
    pub async fn flush_delivery_log(&self) {
        self.daemon
            .as_ref()
            .expect("running")
            .flush_delivery_log()
            .await;
    }

    /// The admin API's bearer token (the daemon created the file at start).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.token"))
            .expect("admin token file")
            .trim()
            .to_string()
    }

    /// One admin API call with the right token: (status, body parsed as JSON).
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let body = body.map(|b| b.to_string());
        let (status, text) = http(
            self.admin(),
            method,
            path,
            Some(&self.admin_token()),
            body.as_deref(),
        )
        .await;
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {text}"));
        (status, json)
    }

    /// A plain connection, greeting checked.
    pub async fn connect(&self) -> Client {
        let mut c = Client::connect(self.smtp).await;
        c.expect_greeting().await;
        c
    }

    /// A connection to the implicit-TLS listener, handshake done and greeting checked.
    pub async fn connect_smtps(&self) -> Client {
        let addr = self.smtps.expect("smtps listener configured");
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tls_connect(Box::new(tcp))
            .await
            .expect("implicit TLS handshake");
        let mut c = Client::new(Box::new(tls));
        c.expect_greeting().await;
        c
    }

    /// All envelopes, in id order.
    pub fn envelopes(&self) -> Vec<Envelope> {
        sorted(self.spool().list().expect("spool list"))
    }

    pub fn body(&self, id: MessageId) -> Vec<u8> {
        self.spool()
            .body(id)
            .expect("spool body")
            .unwrap_or_else(|| panic!("no body for {id}"))
            .to_vec()
    }

    pub fn envelope(&self, id: MessageId) -> Envelope {
        self.spool()
            .envelope(id)
            .expect("spool envelope")
            .unwrap_or_else(|| panic!("no envelope {id}"))
    }

    pub fn message_count(&self) -> u64 {
        self.spool().stats().messages
    }

    /// Asserts the spool holds nothing at all.
    pub fn assert_spool_empty(&self) {
        assert_eq!(self.message_count(), 0, "spool stats must show no message");
        assert!(self.envelopes().is_empty(), "spool must list no envelope");
    }

    /// Takes the daemon out, e.g. to shut it down while clients are connected.
    pub fn take_daemon(&mut self) -> Daemon {
        self.daemon.take().expect("running")
    }

    pub async fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            tokio::time::timeout(Duration::from_secs(20), d.shutdown())
                .await
                .expect("shutdown within 20 s")
                .expect("clean shutdown");
        }
    }
}

pub fn sorted(mut envs: Vec<Envelope>) -> Vec<Envelope> {
    envs.sort_by_key(|e| e.id);
    envs
}

// ---------------------------------------------------------------------------------------------
// Raw SMTP client

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One complete SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Every line as received, without CRLF, code included (`250-PIPELINING`).
    pub lines: Vec<String>,
}

impl Reply {
    /// The text after the code (and separator) of each line.
    pub fn texts(&self) -> Vec<&str> {
        self.lines.iter().map(|l| &l[4..]).collect()
    }

    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The enhanced status code of a single-line reply, if the text starts with one.
    pub fn status(&self) -> Option<&str> {
        let t = self.texts()[0];
        let s = t.split(' ').next()?;
        let parts: Vec<&str> = s.split('.').collect();
        (parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
        .then_some(s)
    }

    /// Whether an EHLO reply lists `keyword` (compared on the first word, case-insensitive).
    pub fn has_keyword(&self, keyword: &str) -> bool {
        self.texts()[1..].iter().any(|t| {
            t.split(' ')
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }

    pub fn keyword_line(&self, keyword: &str) -> Option<&str> {
        self.texts()[1..].iter().copied().find(|t| {
            t.split(' ')
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        })
    }

    #[track_caller]
    pub fn assert(&self, code: u16, status: &str) -> &Self {
        assert_eq!(self.code, code, "unexpected reply {:?}", self.lines);
        if !status.is_empty() {
            assert_eq!(
                self.status(),
                Some(status),
                "unexpected status in {:?}",
                self.lines
            );
        }
        self
    }

    /// The id of `250 2.0.0 Ok: queued as <ID>`.
    #[track_caller]
    pub fn queued_id(&self) -> MessageId {
        self.assert(250, "2.0.0");
        let text = &self.lines[0];
        let id = text
            .strip_prefix("250 2.0.0 Ok: queued as ")
            .unwrap_or_else(|| panic!("not a queued reply: {text:?}"));
        assert_eq!(id.len(), 16, "id must be 16 hex digits: {text:?}");
        id.parse()
            .unwrap_or_else(|e| panic!("bad id in {text:?}: {e}"))
    }
}

/// Parses one complete reply from the front of `buf`; `Ok(None)` if more bytes are needed.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let mut pos = 0;
    let mut lines = Vec::new();
    let mut code = None;
    loop {
        let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let raw = &buf[pos..pos + nl + 1];
        pos += nl + 1;
        let line = raw.strip_suffix(b"\r\n").ok_or_else(|| {
            format!(
                "reply line without CRLF: {:?}",
                String::from_utf8_lossy(raw)
            )
        })?;
        let line = String::from_utf8(line.to_vec())
            .map_err(|_| format!("non-UTF-8 reply line {line:?}"))?;
        let b = line.as_bytes();
        let well_formed = b.len() >= 4
            && (b'2'..=b'5').contains(&b[0])
            && b[1].is_ascii_digit()
            && b[2].is_ascii_digit()
            && (b[3] == b' ' || b[3] == b'-');
        if !well_formed {
            return Err(format!("malformed reply line {line:?}"));
        }
        let this: u16 = line[..3].parse().unwrap();
        if *code.get_or_insert(this) != this {
            return Err(format!(
                "code changed inside a multi-line reply: {lines:?} then {line:?}"
            ));
        }
        let last = b[3] == b' ';
        lines.push(line);
        if last {
            return Ok(Some((Reply { code: this, lines }, pos)));
        }
    }
}

pub struct Client {
    io: Box<dyn Io>,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(io: Box<dyn Io>) -> Client {
        Client {
            io,
            buf: Vec::new(),
        }
    }

    pub async fn connect(addr: SocketAddr) -> Client {
        let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        tcp.set_nodelay(true).unwrap();
        Client::new(Box::new(tcp))
    }

    /// The underlying stream (bytes already buffered are dropped).
    pub fn into_io(self) -> Box<dyn Io> {
        self.io
    }

    /// Bytes received but not yet parsed as a reply.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    pub async fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Sends raw bytes in one write.
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        let bytes = bytes.as_ref();
        tokio::time::timeout(IO_TIMEOUT, self.try_send(bytes))
            .await
            .expect("write timed out")
            .unwrap_or_else(|e| panic!("write failed: {e}"));
    }

    /// The next reply, `Ok(None)` on a clean EOF between replies.
    pub async fn try_reply(&mut self) -> io::Result<Option<Reply>> {
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(Some(reply));
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            let mut chunk = [0u8; 8192];
            let n = self.io.read(&mut chunk).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "EOF inside a reply: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next reply; panics on EOF, timeout or a malformed reply.
    pub async fn reply(&mut self) -> Reply {
        match tokio::time::timeout(IO_TIMEOUT, self.try_reply()).await {
            Err(_) => panic!(
                "no reply within {IO_TIMEOUT:?} (buffered: {:?})",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(Err(e)) => panic!("reading reply: {e}"),
            Ok(Ok(None)) => panic!("connection closed while waiting for a reply"),
            Ok(Ok(Some(r))) => r,
        }
    }

    /// Sends `line` + CRLF and reads one reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n")).await;
        self.reply().await
    }

    /// Sends `line` and asserts the reply's code (and status, unless empty).
    #[track_caller]
    pub fn expect<'a>(
        &'a mut self,
        line: &'a str,
        code: u16,
        status: &'a str,
    ) -> impl std::future::Future<Output = Reply> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let r = self.cmd(line).await;
            assert!(
                r.code == code && (status.is_empty() || r.status() == Some(status)),
                "{line:?}: expected {code} {status}, got {:?} (at {caller})",
                r.lines
            );
            r
        }
    }

    pub async fn expect_greeting(&mut self) -> Reply {
        let g = self.reply().await;
        assert_eq!(g.code, 220, "greeting: {:?}", g.lines);
        assert!(
            g.lines[0].starts_with(&format!("220 {HOST} ")),
            "greeting names the host: {:?}",
            g.lines
        );
        g
    }

    pub async fn ehlo(&mut self) -> Reply {
        let r = self.cmd("EHLO client.test").await;
        assert_eq!(r.code, 250, "EHLO: {:?}", r.lines);
        r
    }

    /// Reads replies until the server closes the connection.
    pub async fn replies_until_close(&mut self) -> Vec<Reply> {
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(IO_TIMEOUT, self.try_reply()).await {
                Err(_) => panic!("server did not close the connection; replies so far: {out:?}"),
                Ok(Ok(None)) => return out,
                Ok(Ok(Some(r))) => out.push(r),
                // A reset after the last reply counts as closed, and so does a TLS stream
                // ending without close_notify (tested on its own in tls_auth).
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                    ) && self.buf.is_empty() =>
                {
                    return out
                }
                Ok(Err(e)) => panic!("reading replies: {e} (so far {out:?})"),
            }
        }
    }

    /// MAIL, RCPT for each recipient, DATA, content (dot-stuffed here) and the end; returns
    /// the queue id. `content` must use CRLF line ends.
    pub async fn submit(&mut self, from: &str, rcpts: &[&str], content: &[u8]) -> MessageId {
        self.expect(&format!("MAIL FROM:<{from}>"), 250, "2.1.0")
            .await;
        for r in rcpts {
            self.expect(&format!("RCPT TO:<{r}>"), 250, "2.1.5").await;
        }
        self.expect("DATA", 354, "").await;
        self.send(dot_stuff(content)).await;
        self.reply().await.queued_id()
    }

    /// STARTTLS and the handshake; asserts that nothing but the 220 arrived before it.
    pub async fn starttls(mut self) -> Client {
        self.expect("STARTTLS", 220, "2.0.0").await;
        assert!(
            self.buf.is_empty(),
            "bytes after the 220 to STARTTLS: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let tls = tls_connect(self.io)
            .await
            .expect("TLS handshake after STARTTLS");
        Client::new(Box::new(tls))
    }

    /// AUTH PLAIN with an initial response.
    pub async fn auth_plain(&mut self, user: &str, password: &str) -> Reply {
        self.cmd(&format!(
            "AUTH PLAIN {}",
            b64(format!("\0{user}\0{password}"))
        ))
        .await
    }
}

/// The wire form of DATA content: dot-stuffed, terminated by `.CRLF` (content must end in
/// CRLF or be empty).
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 8);
    let mut line_start = true;
    for &b in content {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    assert!(
        content.is_empty() || content.ends_with(b"\r\n"),
        "content must end with CRLF"
    );
    out.extend_from_slice(b".\r\n");
    out
}

pub fn tls_client_config() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(test_cert().ca_der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A verified TLS client handshake for "localhost" over `io`.
pub async fn tls_connect(
    io: Box<dyn Io>,
) -> io::Result<tokio_rustls::client::TlsStream<Box<dyn Io>>> {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config());
    let name = ServerName::try_from("localhost").unwrap().to_owned();
    tokio::time::timeout(IO_TIMEOUT, connector.connect(name, io))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

// ---------------------------------------------------------------------------------------------
// Stored messages

/// Splits a stored body into the block tern prepended and the rest, asserting that the rest
/// is byte-identical to `sent` and that the block is a Received header plus (only when
/// `added_ok`) Date / Message-ID lines. Returns the prepended block as text.
#[track_caller]
/// `data` without the `X-Tern-Id` line tern puts first on every message it sends (added on
/// the wire, never stored); `data` unchanged when it has none (a stored body).
pub fn without_origin(data: &[u8]) -> &[u8] {
    const NAME: &[u8] = b"X-Tern-Id: ";
    if !data.starts_with(NAME) {
        return data;
    }
    let end = data
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("X-Tern-Id line ends with CRLF");
    let value = &data[NAME.len()..end];
    assert!(
        !value.is_empty()
            && value
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "X-Tern-Id is lowercase base32: {:?}",
        String::from_utf8_lossy(value)
    );
    &data[end + 2..]
}

pub fn prepended<'a>(body: &'a [u8], sent: &[u8], added_ok: bool) -> &'a str {
    let body = without_origin(body);
    assert!(
        body.len() >= sent.len() && body.ends_with(sent),
        "stored body must end with the message exactly as sent\n--- stored:\n{}\n--- sent:\n{}",
        String::from_utf8_lossy(body),
        String::from_utf8_lossy(sent)
    );
    let head =
        std::str::from_utf8(&body[..body.len() - sent.len()]).expect("prepended block is UTF-8");
    assert!(
        head.starts_with("Received: from "),
        "must start with Received: {head:?}"
    );
    assert!(
        head.ends_with("\r\n"),
        "prepended block must end with CRLF: {head:?}"
    );
    let mut in_received = true;
    for line in head[..head.len() - 2].split("\r\n").skip(1) {
        assert!(
            !line.contains('\n') && !line.contains('\r'),
            "bare line end in {head:?}"
        );
        if in_received && (line.starts_with('\t') || line.starts_with(' ')) {
            continue;
        }
        in_received = false;
        let allowed = added_ok && (line.starts_with("Date: ") || line.starts_with("Message-ID: "));
        assert!(allowed, "unexpected prepended line {line:?} in {head:?}");
    }
    head
}

/// The Received header alone (unfolded lines joined by spaces).
pub fn received_of(head: &str) -> String {
    let mut out = String::new();
    for (i, line) in head.split("\r\n").enumerate() {
        if i > 0 && !(line.starts_with('\t') || line.starts_with(' ')) {
            break;
        }
        out.push_str(line.trim());
        out.push(' ');
    }
    out
}

/// A small well-formed message with `marker` in the subject and body.
pub fn message(marker: &str) -> Vec<u8> {
    format!(
        "From: <sender@client.test>\r\nTo: <rcpt@sink.test>\r\nSubject: {marker}\r\n\
         Date: Fri, 27 Nov 2026 20:13:09 +0000\r\nMessage-ID: <{marker}@client.test>\r\n\r\n\
         Hello {marker}.\r\n.A line starting with a dot\r\n..two dots\r\n.\r\nlast line\r\n"
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// The real binary

pub fn tern_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Gives the admin listener of a config from [`write_bin_config`] a fixed free port (port 0
/// serves a daemon, but a CLI reading the config needs the real one); returns it.
pub fn pin_admin_port(config: &Path) -> u16 {
    let port = free_port();
    let text = std::fs::read_to_string(config).unwrap();
    let pinned = text.replace(
        "[admin]\naddress = \"127.0.0.1:0\"",
        &format!("[admin]\naddress = \"127.0.0.1:{port}\""),
    );
    assert_ne!(pinned, text, "the config has an [admin] address on port 0");
    std::fs::write(config, pinned).unwrap();
    port
}

/// Writes `tern.toml` for a binary on `127.0.0.1:port` into `dir`.
pub fn write_bin_config(dir: &Path, port: u16, opts: &Options) -> PathBuf {
    let text = opts.config_text(dir, &format!("127.0.0.1:{port}"), "127.0.0.1:0");
    let path = dir.join("tern.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A `tern` process (possibly under a wrapper such as strace).
pub struct TernProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl TernProc {
    /// Runs `tern serve --config CONFIG`, output appended to `log`.
    pub fn spawn(config: &Path, port: u16, log: &Path) -> TernProc {
        let mut cmd = Command::new(tern_bin());
        cmd.args(["serve", "--config"]).arg(config);
        TernProc::spawn_command(cmd, port, log)
    }

    pub fn spawn_command(mut cmd: Command, port: u16, log: &Path) -> TernProc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let err = out.try_clone().unwrap();
        // A test that speaks sd_notify sets NOTIFY_SOCKET itself; no other test inherits one.
        if !cmd.as_std().get_envs().any(|(k, _)| k == "NOTIFY_SOCKET") {
            cmd.env_remove("NOTIFY_SOCKET");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env_remove("RUST_LOG")
            .kill_on_drop(true);
        // The config is named on the command line; a developer's TERN_CONFIG must not leak in.
        if !cmd.as_std().get_envs().any(|(k, _)| k == "TERN_CONFIG") {
            cmd.env_remove("TERN_CONFIG");
        }
        let child = cmd.spawn().expect("spawn tern");
        TernProc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls until the server greets (or `within` passes, or the process dies).
    pub async fn wait_ready(&mut self, within: Duration) -> Client {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "tern exited before serving ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(Ok(tcp)) =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(self.addr)).await
            {
                let mut c = Client::new(Box::new(tcp));
                if let Ok(Ok(Some(r))) = tokio::time::timeout(within, c.try_reply()).await {
                    assert_eq!(r.code, 220, "greeting {:?}", r.lines);
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "tern not ready within {within:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("process still running")
    }

    /// Waits for the process to exit, failing after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "process did not exit within {within:?}; log:\n{}",
                self.log_text()
            ),
        }
    }
}

/// Sends a signal with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Runs `tern ARGS...` to completion (stdin from `input`) in the repository's directory.
pub async fn run_tern(args: &[&str], input: Option<&[u8]>) -> std::process::Output {
    run_tern_in(manifest_dir(), None, args, input).await
}

/// Runs `tern ARGS...` in `cwd`, with `TERN_CONFIG` set to `config` (or unset).
pub async fn run_tern_in(
    cwd: &Path,
    config: Option<&Path>,
    args: &[&str],
    input: Option<&[u8]>,
) -> std::process::Output {
    let mut cmd = Command::new(tern_bin());
    match config {
        Some(path) => cmd.env("TERN_CONFIG", path),
        None => cmd.env_remove("TERN_CONFIG"),
    };
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tern");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).await.unwrap();
        drop(stdin);
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("tern command finished within 60 s")
        .unwrap()
}

pub fn describe(out: &std::process::Output) -> String {
    format!(
        "status {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
