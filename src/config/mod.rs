//! Configuration: `tern.toml` text -> validated [`Config`].
//!
//! The file is parsed into a plain `toml::Table` and then compiled section by section
//! (`compile_<section>`) by a [`TableReader`] that takes keys one at a time, so that *every*
//! error is reported at once with its key path (`listeners[1].address: …`), keys left over are
//! reported as unknown, and missing optional keys take the defaults documented on each field
//! (and in `config/tern.toml`).
//!
//! Invariant: a `Config` value only exists if the whole file compiled without a single error, so
//! the rest of the program never re-validates it. Files named by the config (TLS certificate and
//! key, the modes of every secret file) are checked separately by [`Config::check_files`],
//! because a config can be valid on a machine other than the one it will run on.
//!
//! Relative paths (given or defaulted) are resolved against the config file's directory by
//! [`Config::load`] ([`paths`], which also finds the file: `--config`, `TERN_CONFIG`,
//! `/etc/tern/tern.toml`, `./config/tern.toml`); [`Config::parse`] leaves them as written.
//!
//! To add a section: a struct, a `compile_<section>(r: &mut TableReader) -> Section` function,
//! and one line in [`compile_config`].

mod bounce;
mod cluster;
mod delivery;
mod events;
pub mod paths;
mod reader;
mod secrets;
mod sendtime;
mod shaping;
mod sidecar;

/// Parses a duration written as in the config file ("30s", "5m", "2h", "1d"); the admin API
/// takes the same syntax.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    reader::duration(&toml::Value::String(s.to_string()))
}
mod tls;

pub use self::bounce::{compile_bounce_rules, BounceConfig};
pub use self::cluster::ClusterConfig;
pub use self::delivery::{
    DeliveryConfig, DkimConfig, RouteAuth, SmtpTimeouts, TlsPolicy, DEFAULT_DKIM_HEADERS,
    DEFAULT_DKIM_OVERSIGN,
};
pub use self::events::{
    SuppressionConfig, SuppressionMode, UnsubscribeConfig, UnsubscribeScope, WebhookConfig,
    WebhookUrl,
};
pub use self::sendtime::SendTimeConfig;
pub use self::shaping::{
    AdaptiveConfig, DomainLimits, LimitsConfig, PoolAddress, PoolConfig, ProviderConfig, Rate,
    ShapingConfig, SharedConfig, WarmupConfig, WhenCapped,
};
pub use self::sidecar::{
    compile_campaign_json, BanditConfig, CampaignBandit, CampaignConfig, ModelConfig,
    SidecarConfig, SlotConfig, Strategy, TrackingConfig, VariantConfig, MAX_MIN_SENDS,
};

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use toml::Value;

use self::reader::{count, duration, nonzero, size, string, TableReader};

/// The compiled configuration; see `config/tern.toml` for every key and its default.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    /// At least one.
    pub listeners: Vec<ListenerConfig>,
    /// `None` if there is no `[tls]` section: no STARTTLS, and no `smtps` listeners.
    pub tls: Option<TlsConfig>,
    pub relay: RelayConfig,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub spool: SpoolConfig,
    pub admin: AdminConfig,
    /// Static routes, domains unique.
    pub routes: Vec<RouteConfig>,
    pub delivery: DeliveryConfig,
    /// DKIM signing keys, `[[dkim]]`; several per domain allowed.
    pub dkim: Vec<DkimConfig>,
    pub bounce: BounceConfig,
    pub suppression: SuppressionConfig,
    /// `[unsubscribe]`: one-click unsubscribe links.
    pub unsubscribe: UnsubscribeConfig,
    /// Event webhooks, `[[webhooks]]`.
    pub webhooks: Vec<WebhookConfig>,
    /// `[sendtime]`: send-time optimisation for mail that asks for it.
    pub sendtime: SendTimeConfig,
    /// `[sidecar]`: campaigns, the content model, tracking, the variant bandit.
    pub sidecar: SidecarConfig,
    pub log: LogConfig,
    /// Traffic shaping: limits per destination and provider, adaptive backoff, warm-up.
    pub shaping: ShapingConfig,
    /// Source-IP pools, `[[pools]]`; names and addresses unique. Empty: connections are not
    /// bound and use `server.hostname` in EHLO.
    pub pools: Vec<PoolConfig>,
    /// `[cluster]`: the Redis a fleet of nodes shares (suppressions, engagement, bandit
    /// counts, operator actions). `None`: this node is alone.
    pub cluster: Option<ClusterConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Our name in the greeting, EHLO and Received headers; a valid DNS name.
    /// Default: the system hostname.
    pub hostname: String,
    /// How long shutdown waits for sessions and deliveries in flight. Default 30s; 0 is allowed.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Unique among listeners (except port 0, which binds an ephemeral port each time).
    pub address: SocketAddr,
    pub mode: ListenerMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    /// `"smtp"`: plain SMTP; STARTTLS is offered when `[tls]` is configured.
    Smtp,
    /// `"smtps"`: TLS from the first byte (RFC 8314); only allowed when `[tls]` is configured.
    ImplicitTls,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Key `cert`: PEM certificate chain, end-entity certificate first.
    pub cert_path: PathBuf,
    /// Key `key`: PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayConfig {
    /// Clients in these networks may relay without AUTH. Default: none.
    pub networks: Vec<IpNet>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// Names unique; hashes already validated as argon2 PHC strings. Default: none (no AUTH).
    pub users: Vec<AuthUser>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct AuthUser {
    pub name: String,
    /// Argon2 PHC string, e.g. `$argon2id$v=19$m=19456,t=2,p=1$…`.
    pub password_hash: String,
}

/// Hand-written so hashes never end up in logs: they are enough for an offline guessing attack.
impl fmt::Debug for AuthUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthUser")
            .field("name", &self.name)
            .field("password_hash", &"<redacted>")
            .finish()
    }
}

/// Per-session and server-wide limits; every value is greater than zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes; advertised in EHLO SIZE. Default 50 MiB.
    pub max_message_size: u64,
    /// RCPT commands accepted per transaction. Default 1000.
    pub max_recipients: usize,
    /// Concurrent inbound connections, all listeners together. Default 1000.
    pub max_connections: usize,
    /// Concurrent inbound connections from one IP address. Default 100.
    pub max_connections_per_ip: usize,
    /// Idle time allowed while waiting for a command. Default 5m (RFC 5321 4.5.3.2.7).
    pub command_timeout: Duration,
    /// Maximum wait between two reads of DATA/BDAT content. Default 10m (RFC 5321 4.5.3.2.6).
    pub data_timeout: Duration,
    /// Protocol errors in one session before `421 4.7.0` and disconnect. Default 20.
    pub max_errors: usize,
    /// Bytes of a message's header section (up to the empty line); a larger one is refused
    /// with `552 5.3.4` (SMTP) or 413 (HTTP) and nothing is spooled. Default 1 MiB (Postfix's
    /// header_size_limit is 100 KB).
    pub max_header_size: u64,
    /// `Received` headers a message may carry on leaving tern (its own included); a message
    /// that would exceed it is a mail loop, refused at the end of DATA with `554 5.4.6`.
    /// Default 50 (Postfix's hopcount_limit).
    pub max_hops: usize,
    /// The longest a session may last, whatever it does; then `421 4.4.2` and close (a
    /// message in progress is not spooled). Default 30m.
    pub session_timeout: Duration,
    /// Bytes per second a client must average during DATA and a BDAT transaction, measured
    /// over each `min_data_rate_window`; a slower one gets `421 4.4.2` and is dropped.
    /// Default 1024.
    pub min_data_rate: u64,
    /// The window `min_data_rate` is averaged over. Default 1m.
    pub min_data_rate_window: Duration,
    /// IPv6 clients are counted per network of this prefix length (one subscriber usually
    /// holds a whole /64), for the per-IP connection cap and every per-client rate; IPv4
    /// clients per address. 1 to 128, default 64.
    pub ipv6_prefix: u8,
    /// New connections per client outside the relay networks (Postfix's anvil
    /// `smtpd_client_connection_rate_limit`); over it, `421 4.7.0` at the door.
    /// Default 100 per 10 s.
    pub max_connection_rate_per_ip: WindowRate,
    /// Failed AUTH attempts per client, and per user name, before further attempts get
    /// `454 4.7.0` until `auth_lockout` has passed since the last failure. Default 5.
    pub max_auth_failures: usize,
    /// The wait before answering a failed AUTH; it doubles with each failure of the client
    /// or the user (at most `command_timeout`). Default 1s.
    pub auth_failure_delay: Duration,
    /// How long failures are remembered, and so how long a client or user stays refused.
    /// Default 15m.
    pub auth_lockout: Duration,
    /// Bytes all sessions together may buffer for messages in progress; when spent, a new
    /// DATA/BDAT gets `452 4.3.1` and a message that would grow past it is refused with it.
    /// At least `max_message_size`. Default 256 MiB.
    pub max_inflight_bytes: u64,
    /// Messages to the bounce domains per client outside the relay networks (and not
    /// authenticated); over it, `450 4.7.1` at RCPT. Default 60 per minute.
    pub max_bounce_rate_per_ip: WindowRate,
}

/// A number of events per window, written `"100/10s"`: a burst of `count` at once, and then
/// `count` per `window`, spread evenly (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRate {
    /// At least 1.
    pub count: u32,
    /// Greater than zero.
    pub window: Duration,
}

impl fmt::Display for WindowRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:?}", self.count, self.window)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 50 << 20,
            max_recipients: 1000,
            max_connections: 1000,
            max_connections_per_ip: 100,
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
            max_errors: 20,
            max_header_size: 1 << 20,
            max_hops: 50,
            session_timeout: Duration::from_secs(30 * 60),
            min_data_rate: 1024,
            min_data_rate_window: Duration::from_secs(60),
            ipv6_prefix: 64,
            max_connection_rate_per_ip: WindowRate {
                count: 100,
                window: Duration::from_secs(10),
            },
            max_auth_failures: 5,
            auth_failure_delay: Duration::from_secs(1),
            auth_lockout: Duration::from_secs(15 * 60),
            max_inflight_bytes: 256 << 20,
            max_bounce_rate_per_ip: WindowRate {
                count: 60,
                window: Duration::from_secs(60),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Directory of the durable spool. Default `./data/spool`.
    pub path: PathBuf,
    /// How long a message may stay undelivered before it expires (with a DSN). Default 5d.
    pub max_age: Duration,
    /// Bytes of spool pages (sled's page cache) kept in memory. Default 128 MiB.
    pub cache_size: u64,
    /// Free bytes the spool's file system keeps: new mail that would leave less is refused
    /// (SMTP `452 4.3.1`, HTTP 507); delivery outcomes may use half of it. Default 256 MiB.
    pub min_free_space: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: PathBuf::from("./data/spool"),
            max_age: Duration::from_secs(5 * 86_400),
            cache_size: tern_queue::SpoolOptions::default().cache_size,
            min_free_space: tern_queue::SpoolOptions::default().min_free_space,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// HTTP admin API and /metrics. Default 127.0.0.1:8025; never equal to a listener address.
    pub address: SocketAddr,
    /// File holding the bearer token of the admin API (`/api/v1/...`); the daemon creates it
    /// with a random token (mode 0600) when it does not exist. Unset: the API is disabled and
    /// only `/metrics` is served. Default unset.
    pub token_file: Option<PathBuf>,
    /// How long a client has to send a whole request head, and how long a kept-alive
    /// connection may wait idle for its next one, before it is closed. Default 10s.
    pub header_timeout: Duration,
    /// How long a write of an answer may make no progress (a client that does not read
    /// what it asked for) before the connection is closed. Default 30s.
    pub write_timeout: Duration,
    /// Connections open at once; one more is answered 503 and closed. Default 1024.
    pub max_connections: usize,
    /// Bytes of a request body, for every route but `POST /api/v1/inject` (whose limit
    /// follows `limits.max_message_size`); a larger one is refused with 413, before it is
    /// read when its Content-Length says so. Default 2 MiB.
    pub max_body_size: u64,
    /// Peers whose `X-Forwarded-For` is believed (reverse proxies in front of the tracking
    /// endpoints). Default none: the peer address is the client.
    pub trusted_proxies: Vec<IpNet>,
    /// `[[admin.tokens]]`: named API tokens with scopes, beside the full-rights token of
    /// `token_file`. Reloaded live. Default none.
    pub tokens: Vec<AdminToken>,
}

/// One `[[admin.tokens]]` entry: who (`name`, written to the audit log), how it is recognised
/// (the SHA-256 of the secret; the secret itself is never stored) and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub name: String,
    /// SHA-256 of the bearer secret (`secret_sha256 = "<64 hex>"`, as `tern token new` prints).
    pub secret_sha256: [u8; 32],
    pub scopes: Vec<Scope>,
}

/// What an admin API token may do. `Admin` is every right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every `GET`: status, queue, shaping, suppressions, recipients.
    Read,
    /// `POST /api/v1/inject`.
    Inject,
    /// Queue actions: suspend, resume, flush, hold, release, bounce, delete.
    Queue,
    /// Suppression list changes: add, remove, import.
    Suppression,
    /// Campaign and engagement writes: events, send-time refits.
    Campaigns,
    /// Everything, including what no other scope names.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Read,
        Scope::Inject,
        Scope::Queue,
        Scope::Suppression,
        Scope::Campaigns,
        Scope::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Inject => "inject",
            Scope::Queue => "queue",
            Scope::Suppression => "suppression",
            Scope::Campaigns => "campaigns",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: SocketAddr::from(([127, 0, 0, 1], 8025)),
            token_file: None,
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_body_size: 2 << 20,
            trusted_proxies: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Lowercase domain, or `"*"` for every domain without a route of its own.
    pub domain: String,
    /// `host:port` strings (host a DNS name, IPv4 address or `[IPv6]`) in order of
    /// preference. Empty: a policy route, whose mail is MX-routed under its `tls`.
    pub hosts: Vec<String>,
    /// TLS level for this route, replacing what would have been discovered (DANE, MTA-STS)
    /// and `delivery.tls`; `None` means the discovered policy, else `delivery.tls`.
    pub tls: Option<TlsPolicy>,
    /// AUTH credentials for a smarthost (sent only over TLS).
    pub auth: Option<RouteAuth>,
    /// Source-IP pool for mail on this route (unless the message names one); a `[[pools]]`
    /// name.
    pub pool: Option<String>,
    /// VERP for mail on this route; `None` means `bounce.verp`.
    pub verp: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing_subscriber::EnvFilter` directives restricted to `level` and `target=level`,
    /// comma-separated, e.g. `"info"` or `"info,tern::smtp=debug"`. Default `"info"`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (default).
    Text,
    /// One JSON object per line.
    Json,
}

/// Every problem found, one `key.path: message` per entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and compiles a config file, relative paths resolved against its directory. A
    /// read error names the file; compile errors name keys.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: {}", path.display(), describe_io(&e))]))?;
        let mut config = Config::parse(&text)?;
        config.rebase(&paths::base_dir(path));
        Ok(config)
    }

    /// Compiles config text; a TOML syntax error is reported alone, with line and column.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let table: toml::Table = text
            .parse()
            .map_err(|e| ConfigErrors(vec![syntax_error(text, &e)]))?;
        reader::compile(table, compile_config).map_err(ConfigErrors)
    }
}

/// `toml`'s own message spans several lines with a source excerpt; ours is one line.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("TOML syntax error at line {line}, column {column}: {message}")
        }
        None => format!("TOML syntax error: {message}"),
    }
}

/// "no such file" reads better in a config error than "No such file or directory (os error 2)".
fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file".to_owned(),
        _ => e.to_string(),
    }
}

fn compile_config(r: &mut TableReader<'_>) -> Config {
    let server = r.section("server", compile_server);
    // Only presence matters to listeners; errors inside [tls] are reported by compile_tls.
    let tls_present = r.contains("tls");
    let tls = r.optional_section("tls", compile_tls).flatten();

    let mut listener_paths = HashMap::new();
    let listeners = r
        .require_tables("listeners", |r| {
            compile_listener(r, tls_present, &mut listener_paths)
        })
        .into_iter()
        .flatten()
        .collect();

    let relay = r.section("relay", compile_relay);
    let auth = r.section("auth", compile_auth);
    let limits = r.section("limits", compile_limits);
    let spool = r.section("spool", compile_spool);
    let admin = r.section("admin", |r| compile_admin(r, &listener_paths));
    let mut pool_names = HashMap::new();
    let mut pool_addresses = HashMap::new();
    let pools: Vec<PoolConfig> = r
        .tables("pools", |r| {
            shaping::compile_pool(r, &mut pool_names, &mut pool_addresses)
        })
        .into_iter()
        .flatten()
        .collect();
    if pools.iter().filter(|p| p.default).count() > 1 {
        r.error("pools", "at most one pool may have default = true");
    }
    let mut route_paths = HashMap::new();
    let routes: Vec<RouteConfig> = r
        .tables("routes", |r| {
            compile_route(r, &mut route_paths, &pool_names)
        })
        .into_iter()
        .flatten()
        .collect();
    let delivery = r.section("delivery", delivery::compile_delivery);
    let dkim = r
        .tables("dkim", delivery::compile_dkim)
        .into_iter()
        .flatten()
        .collect();
    let any_route_verp = routes.iter().any(|r| r.verp == Some(true));
    let bounce = r.section("bounce", |r| bounce::compile_bounce(r, any_route_verp));
    let suppression = r.section("suppression", events::compile_suppression);
    let unsubscribe = r.section("unsubscribe", events::compile_unsubscribe);
    let webhooks = r
        .tables("webhooks", events::compile_webhook)
        .into_iter()
        .flatten()
        .collect();
    let sendtime = r.section("sendtime", sendtime::compile_sendtime);
    let sidecar = r.section("sidecar", sidecar::compile_sidecar);
    let log = r.section("log", compile_log);
    let cluster = r
        .optional_section("cluster", |r| cluster::compile_cluster(r, &server.hostname))
        .flatten();
    // The fleet's Redis also carries the shaping limits unless shaping names its own.
    let cluster_store =
        cluster
            .as_ref()
            .filter(|c| !c.redis_cluster)
            .map(|c| shaping::ClusterStore {
                url: c.url.clone(),
                password_file: c.password_file.clone(),
                ca_file: c.ca_file.clone(),
                prefix: c.prefix.clone(),
            });
    let shaping = r.section("shaping", |r| shaping::compile_shaping(r, cluster_store));

    Config {
        server,
        listeners,
        tls,
        relay,
        auth,
        limits,
        spool,
        admin,
        routes,
        delivery,
        dkim,
        bounce,
        suppression,
        unsubscribe,
        webhooks,
        sendtime,
        sidecar,
        log,
        shaping,
        pools,
        cluster,
    }
}

fn compile_server(r: &mut TableReader<'_>) -> ServerConfig {
    let hostname = if r.contains("hostname") {
        r.get("hostname", |v| {
            let name = string(v)?;
            check_dns_name(name)?;
            Ok(name.to_owned())
        })
        .unwrap_or_default()
    } else {
        let system = gethostname::gethostname().to_string_lossy().into_owned();
        if let Err(e) = check_dns_name(&system) {
            r.error(
                "hostname",
                format!("not set, and the system hostname is not usable: {e}"),
            );
        }
        system
    };
    let shutdown_grace = r
        .get("shutdown_grace", duration)
        .unwrap_or(Duration::from_secs(30));
    ServerConfig {
        hostname,
        shutdown_grace,
    }
}

fn compile_tls(r: &mut TableReader<'_>) -> Option<TlsConfig> {
    let cert_path = r.require("cert", path);
    let key_path = r.require("key", path);
    Some(TlsConfig {
        cert_path: cert_path?,
        key_path: key_path?,
    })
}

/// `paths` maps each address seen so far to the key path that declared it, to name both ends
/// of a duplicate.
fn compile_listener(
    r: &mut TableReader<'_>,
    tls_present: bool,
    paths: &mut HashMap<SocketAddr, String>,
) -> Option<ListenerConfig> {
    let address = r.require("address", socket_addr);
    let mode = r
        .get("mode", |v| match string(v)? {
            "smtp" => Ok(ListenerMode::Smtp),
            "smtps" => Ok(ListenerMode::ImplicitTls),
            other => Err(format!(
                "unknown mode {other:?} (expected \"smtp\" or \"smtps\")"
            )),
        })
        .unwrap_or(ListenerMode::Smtp);
    if mode == ListenerMode::ImplicitTls && !tls_present {
        r.error(
            "mode",
            "\"smtps\" requires a [tls] section with cert and key",
        );
    }
    let address = address?;
    if address.port() != 0 {
        if let Some(first) = paths.get(&address) {
            let msg = format!("duplicate address {address} (already used by {first})");
            r.error("address", msg);
        } else {
            paths.insert(address, r.path_of("address"));
        }
    }
    Some(ListenerConfig { address, mode })
}

fn compile_relay(r: &mut TableReader<'_>) -> RelayConfig {
    let networks = r.list("networks", network).unwrap_or_default();
    RelayConfig { networks }
}

/// A network in CIDR notation, or a plain address (that one host).
fn network(v: &Value) -> Result<IpNet, String> {
    let s = string(v)?;
    // trunc: "10.1.2.3/8" means the network 10.0.0.0/8; keep it canonical for display.
    s.parse::<IpNet>()
        .map(|net| net.trunc())
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!(
                "invalid CIDR {s:?} (expected e.g. \"10.0.0.0/8\", \"::1/128\" or a plain address)"
            )
        })
}

fn compile_auth(r: &mut TableReader<'_>) -> AuthConfig {
    let mut names = HashMap::new();
    let users = r
        .tables("users", |r| compile_user(r, &mut names))
        .into_iter()
        .flatten()
        .collect();
    AuthConfig { users }
}

/// Validates a configured hash up front, so a typo fails at startup rather than at every login.
pub fn check_password_hash(phc: &str) -> Result<(), String> {
    let hash =
        argon2::PasswordHash::new(phc).map_err(|e| format!("not a PHC hash string ({e})"))?;
    argon2::Algorithm::try_from(hash.algorithm).map_err(|_| {
        format!(
            "algorithm {:?} is not argon2id, argon2i or argon2d",
            hash.algorithm.as_str()
        )
    })?;
    if let Some(version) = hash.version {
        argon2::Version::try_from(version).map_err(|e| format!("invalid argon2 version ({e})"))?;
    }
    argon2::Params::try_from(&hash).map_err(|e| format!("invalid argon2 parameters ({e})"))?;
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err("missing salt or hash output".to_owned());
    }
    Ok(())
}

fn compile_user(r: &mut TableReader<'_>, names: &mut HashMap<String, String>) -> Option<AuthUser> {
    let name = r.require("name", |v| match string(v)? {
        "" => Err("must not be empty".to_owned()),
        name => Ok(name.to_owned()),
    });
    let plaintext = r.reject(
        "password",
        "plaintext passwords are not accepted; put an argon2 hash in password_hash \
         (generate one with `tern hash-password`)",
    );
    // With a plaintext password present, "password_hash missing" would only repeat the point.
    let hash_converter = |v: &Value| {
        let phc = string(v)?;
        check_password_hash(phc)?;
        Ok(phc.to_owned())
    };
    let password_hash = if plaintext {
        r.get("password_hash", hash_converter)
    } else {
        r.require("password_hash", hash_converter)
    };
    let name = name?;
    if let Some(first) = names.get(&name) {
        let msg = format!("duplicate user {name:?} (already defined by {first})");
        r.error("name", msg);
    } else {
        names.insert(name.clone(), r.path_of("name"));
    }
    Some(AuthUser {
        name,
        password_hash: password_hash?,
    })
}

fn compile_limits(r: &mut TableReader<'_>) -> Limits {
    let d = Limits::default();
    let positive_count = |v: &Value| count(v).and_then(nonzero);
    let positive_duration = |v: &Value| duration(v).and_then(nonzero);
    let limits = Limits {
        max_message_size: r
            .get("max_message_size", |v| size(v).and_then(nonzero))
            .unwrap_or(d.max_message_size),
        max_recipients: r
            .get("max_recipients", positive_count)
            .unwrap_or(d.max_recipients),
        max_connections: r
            .get("max_connections", positive_count)
            .unwrap_or(d.max_connections),
        max_connections_per_ip: r
            .get("max_connections_per_ip", positive_count)
            .unwrap_or(d.max_connections_per_ip),
        command_timeout: r
            .get("command_timeout", positive_duration)
            .unwrap_or(d.command_timeout),
        data_timeout: r
            .get("data_timeout", positive_duration)
            .unwrap_or(d.data_timeout),
        max_errors: r.get("max_errors", positive_count).unwrap_or(d.max_errors),
        max_header_size: r
            .get("max_header_size", |v| size(v).and_then(nonzero))
            .unwrap_or(d.max_header_size),
        max_hops: r.get("max_hops", positive_count).unwrap_or(d.max_hops),
        session_timeout: r
            .get("session_timeout", positive_duration)
            .unwrap_or(d.session_timeout),
        min_data_rate: r
            .get("min_data_rate", |v| size(v).and_then(nonzero))
            .unwrap_or(d.min_data_rate),
        min_data_rate_window: r
            .get("min_data_rate_window", positive_duration)
            .unwrap_or(d.min_data_rate_window),
        ipv6_prefix: r
            .get("ipv6_prefix", |v| match count(v)? {
                n @ 1..=128 => Ok(n as u8),
                n => Err(format!("must be between 1 and 128, found {n}")),
            })
            .unwrap_or(d.ipv6_prefix),
        max_connection_rate_per_ip: r
            .get("max_connection_rate_per_ip", window_rate)
            .unwrap_or(d.max_connection_rate_per_ip),
        max_auth_failures: r
            .get("max_auth_failures", positive_count)
            .unwrap_or(d.max_auth_failures),
        auth_failure_delay: r
            .get("auth_failure_delay", duration)
            .unwrap_or(d.auth_failure_delay),
        auth_lockout: r
            .get("auth_lockout", positive_duration)
            .unwrap_or(d.auth_lockout),
        max_inflight_bytes: r
            .get("max_inflight_bytes", |v| size(v).and_then(nonzero))
            .unwrap_or(d.max_inflight_bytes),
        max_bounce_rate_per_ip: r
            .get("max_bounce_rate_per_ip", window_rate)
            .unwrap_or(d.max_bounce_rate_per_ip),
    };
    // A message the budget can never hold would be refused however idle the server is.
    if limits.max_inflight_bytes < limits.max_message_size {
        r.error(
            "max_inflight_bytes",
            format!(
                "must be at least limits.max_message_size ({} bytes), found {} bytes",
                limits.max_message_size, limits.max_inflight_bytes
            ),
        );
    }
    limits
}

/// `"100/10s"`: a count, `/`, and a duration.
fn window_rate(v: &Value) -> Result<WindowRate, String> {
    let s = string(v)?;
    let invalid =
        || format!("invalid rate {s:?} (expected a count, '/', and a duration, e.g. \"100/10s\")");
    let (count, window) = s.split_once('/').ok_or_else(invalid)?;
    let count: u32 = count.trim().parse().map_err(|_| invalid())?;
    let window = duration(&Value::String(window.trim().to_owned())).map_err(|_| invalid())?;
    if count == 0 || window.is_zero() {
        return Err(format!("{s:?}: count and duration must be greater than 0"));
    }
    Ok(WindowRate { count, window })
}

fn compile_spool(r: &mut TableReader<'_>) -> SpoolConfig {
    let d = SpoolConfig::default();
    SpoolConfig {
        path: r.get("path", path).unwrap_or(d.path),
        max_age: r
            .get("max_age", |v| duration(v).and_then(nonzero))
            .unwrap_or(d.max_age),
        cache_size: r
            .get("cache_size", |v| size(v).and_then(nonzero))
            .unwrap_or(d.cache_size),
        min_free_space: r.get("min_free_space", size).unwrap_or(d.min_free_space),
    }
}

/// `listeners` maps listener addresses to their key paths: the admin API cannot share one.
fn compile_admin(r: &mut TableReader<'_>, listeners: &HashMap<SocketAddr, String>) -> AdminConfig {
    let d = AdminConfig::default();
    let address = r.get("address", socket_addr).unwrap_or(d.address);
    if let Some(listener) = listeners.get(&address) {
        let msg = format!("{address} is already used by {listener}");
        r.error("address", msg);
    }
    let token_file = r.get("token_file", path);
    AdminConfig {
        address,
        token_file,
        header_timeout: r
            .get("header_timeout", |v| duration(v).and_then(nonzero))
            .unwrap_or(d.header_timeout),
        write_timeout: r
            .get("write_timeout", |v| duration(v).and_then(nonzero))
            .unwrap_or(d.write_timeout),
        max_connections: r
            .get("max_connections", |v| count(v).and_then(nonzero))
            .unwrap_or(d.max_connections),
        max_body_size: r
            .get("max_body_size", |v| size(v).and_then(nonzero))
            .unwrap_or(d.max_body_size),
        trusted_proxies: r.list("trusted_proxies", network).unwrap_or_default(),
        tokens: compile_admin_tokens(r),
    }
}

/// `[[admin.tokens]]`: names and secrets unique, at least one scope each.
fn compile_admin_tokens(r: &mut TableReader<'_>) -> Vec<AdminToken> {
    let mut names: HashMap<String, String> = HashMap::new();
    let mut secrets: HashMap<[u8; 32], String> = HashMap::new();
    let tokens = r.tables("tokens", |r| {
        let name = r.require("name", |v| {
            let name = string(v)?;
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(format!(
                    "{name:?}: 1 to 64 characters of letters, digits, '-', '_' and '.'"
                ));
            }
            Ok(name.to_owned())
        });
        let secret = r.require("secret_sha256", |v| {
            let hex = string(v)?;
            let bytes = data_encoding::HEXLOWER_PERMISSIVE
                .decode(hex.as_bytes())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok());
            bytes.ok_or_else(|| {
                "expected the SHA-256 of the secret as 64 hex digits (`tern token new` prints it)"
                    .to_owned()
            })
        });
        let scopes = r.require_list("scopes", |v| {
            let name = string(v)?;
            Scope::parse(name).ok_or_else(|| {
                let known: Vec<_> = Scope::ALL.iter().map(|s| s.name()).collect();
                format!("unknown scope {name:?} (one of {})", known.join(", "))
            })
        });
        if let Some(name) = &name {
            if let Some(first) = names.get(name) {
                let msg = format!("duplicate token name {name:?} (already used by {first})");
                r.error("name", msg);
            } else {
                names.insert(name.clone(), r.path_of("name"));
            }
        }
        if let Some(secret) = &secret {
            if let Some(first) = secrets.get(secret) {
                let msg = format!("the same secret as {first}");
                r.error("secret_sha256", msg);
            } else {
                secrets.insert(*secret, r.path_of("secret_sha256"));
            }
        }
        Some(AdminToken {
            name: name?,
            secret_sha256: secret?,
            scopes: scopes?,
        })
    });
    tokens.into_iter().flatten().collect()
}

/// `domains` maps each (lowercased) domain seen so far to the key path that declared it.
/// `pools` holds the `[[pools]]` names a route may refer to.
fn compile_route(
    r: &mut TableReader<'_>,
    domains: &mut HashMap<String, String>,
    pools: &HashMap<String, String>,
) -> Option<RouteConfig> {
    let domain = r.require("domain", |v| match string(v)? {
        "*" => Ok("*".to_owned()),
        domain => check_dns_name(domain).map(|()| domain.to_ascii_lowercase()),
    });
    // Without `hosts` the route is a policy route: MX routing as usual, with its `tls`.
    let hosts = if r.contains("hosts") {
        r.require_list("hosts", host_port)
    } else {
        Some(Vec::new())
    };
    let tls = r.get("tls", delivery::tls_policy);
    let policy_route = hosts.as_ref().is_some_and(|h| h.is_empty());
    if policy_route && tls.is_none() {
        r.error(
            "hosts",
            "missing required key (a route without hosts only sets tls, so it needs tls)",
        );
    }
    if !policy_route && tls == Some(TlsPolicy::MtaSts) {
        r.error(
            "tls",
            "mta-sts applies to MX routing: use it on a route without hosts",
        );
    }
    for key in ["auth", "pool", "verp"] {
        if policy_route && r.contains(key) {
            r.error(key, "only for a route with hosts");
        }
    }
    let auth = r
        .optional_section("auth", delivery::compile_route_auth)
        .flatten();
    let pool = r.get("pool", |v| {
        let name = string(v)?;
        if pools.contains_key(name) {
            Ok(name.to_owned())
        } else {
            Err(format!(
                "unknown pool {name:?} (no [[pools]] entry has that name)"
            ))
        }
    });
    // (Refused above on a policy route, so it asks nothing of the bounce section.)
    let verp = r.get("verp", bounce::boolean).filter(|_| !policy_route);
    let domain = domain?;
    if let Some(first) = domains.get(&domain) {
        let msg = format!("duplicate route for {domain:?} (already defined by {first})");
        r.error("domain", msg);
    } else {
        domains.insert(domain.clone(), r.path_of("domain"));
    }
    Some(RouteConfig {
        domain,
        hosts: hosts?,
        tls,
        auth,
        pool,
        verp,
    })
}

fn compile_log(r: &mut TableReader<'_>) -> LogConfig {
    let d = LogConfig::default();
    LogConfig {
        format: r
            .get("format", |v| match string(v)? {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                other => Err(format!(
                    "unknown log format {other:?} (expected \"text\" or \"json\")"
                )),
            })
            .unwrap_or(d.format),
        level: r
            .get("level", |v| {
                let filter = string(v)?;
                check_log_filter(filter)?;
                Ok(filter.to_owned())
            })
            .unwrap_or(d.level),
    }
}

fn path(v: &Value) -> Result<PathBuf, String> {
    match string(v)? {
        "" => Err("must not be empty".to_owned()),
        p => Ok(PathBuf::from(p)),
    }
}

/// Listen addresses are literal IP:port; resolving names at bind time would make startup depend
/// on DNS.
fn socket_addr(v: &Value) -> Result<SocketAddr, String> {
    let s = string(v)?;
    s.parse()
        .map_err(|_| format!("invalid socket address {s:?} (expected IP:port, e.g. \"127.0.0.1:25\" or \"[::1]:25\")"))
}

/// `host:port` where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
fn host_port(v: &Value) -> Result<String, String> {
    let s = string(v)?;
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(s.to_owned());
    }
    let invalid = |why: String| format!("invalid host:port {s:?}: {why}");
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| invalid("missing :port".to_owned()))?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => return Err(invalid(format!("invalid port {port:?}"))),
    }
    if host.contains(':') {
        return Err(invalid(
            "an IPv6 address must be in brackets, e.g. \"[::1]:25\"".to_owned(),
        ));
    }
    if host.parse::<std::net::Ipv4Addr>().is_err() {
        check_dns_name(host).map_err(invalid)?;
    }
    Ok(s.to_owned())
}

/// A hostname as used in EHLO and routes: letters, digits and hyphens in dot-separated labels
/// (RFC 1123), no trailing dot, not all-numeric at the end (that would be an IP address).
fn check_dns_name(name: &str) -> Result<(), String> {
    let invalid = |why: &str| format!("invalid DNS name {name:?}: {why}");
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > 253 {
        return Err(invalid("longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(invalid("empty label"));
        }
        if label.len() > 63 {
            return Err(invalid("label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(invalid("only letters, digits, '-' and '.' are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("a label cannot start or end with '-'"));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid("looks like an IP address"));
    }
    Ok(())
}

/// The subset of `EnvFilter` syntax we accept: comma-separated `level` or `target=level`.
/// A bare word that is not a level is refused although EnvFilter would read it as a target,
/// because in a config file it is far more likely a misspelled level.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let invalid = |why: String| {
        format!("invalid log filter {filter:?}: {why} (expected e.g. \"info\" or \"info,tern::smtp=debug\")")
    };
    for directive in filter.split(',').map(str::trim) {
        let level = match directive.split_once('=') {
            Some((target, level)) => {
                let valid_target = !target.is_empty()
                    && target
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-'));
                if !valid_target {
                    return Err(invalid(format!("invalid target {target:?}")));
                }
                level
            }
            None => directive,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(invalid(format!(
                "unknown level {level:?}, expected one of trace, debug, info, warn, error, off"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hash of "secret" with tiny argon2 parameters so tests stay fast.
    const HASH: &str = "$argon2id$v=19$m=8,t=1,p=1$xCHz5ClwMkYZdTtMYXCkmg$26FQ/jt5IPxg/cOCj6wu+YIoNIJKk5F5OWOoiGqdgPs";

    const MINIMAL: &str = r#"
        server.hostname = "mx.example.com"
        [[listeners]]
        address = "127.0.0.1:2525"
    "#;

    fn errors(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Ok(config) => panic!("expected errors, got {config:?}"),
            Err(ConfigErrors(errors)) => errors,
        }
    }

    #[test]
    fn example_config_parses() {
        let config = Config::parse(include_str!("../../config/tern.toml")).unwrap();
        assert_eq!(config.server.hostname, "tern.localhost");
        assert_eq!(
            config.listeners,
            [ListenerConfig {
                address: "127.0.0.1:2525".parse().unwrap(),
                mode: ListenerMode::Smtp
            }]
        );
        assert_eq!(config.tls, None);
        assert_eq!(
            config.relay.networks,
            [
                "127.0.0.0/8".parse::<IpNet>().unwrap(),
                "::1/128".parse().unwrap()
            ]
        );
        assert!(config.auth.users.is_empty());
        assert_eq!(config.limits, Limits::default());
        // The example keeps its files in ../data (the repository's data/, since paths resolve
        // against the config's directory); everything else is at its default.
        assert_eq!(
            config.spool,
            SpoolConfig {
                path: "../data/spool".into(),
                ..SpoolConfig::default()
            }
        );
        assert_eq!(
            config.admin,
            AdminConfig {
                token_file: Some("../data/admin.token".into()),
                ..AdminConfig::default()
            }
        );
        assert_eq!(
            config.routes,
            [RouteConfig {
                domain: "sink.test".to_owned(),
                hosts: vec!["127.0.0.1:2526".to_owned()],
                tls: None,
                auth: None,
                pool: None,
                verp: None,
            }]
        );
        assert_eq!(
            config.delivery,
            DeliveryConfig {
                log_path: Some("../data/delivery.log".into()),
                ..DeliveryConfig::default()
            }
        );
        assert!(config.dkim.is_empty());
        assert_eq!(config.bounce, BounceConfig::default());
        assert_eq!(config.suppression, SuppressionConfig::default());
        assert!(config.webhooks.is_empty());
        assert_eq!(
            config.sendtime,
            SendTimeConfig {
                window: Duration::from_secs(86_400),
                quiet_hours: Some((22, 7)),
                control_share: 0.1,
                refit_interval: Duration::from_secs(3600),
                dormant_after: Duration::from_secs(180 * 86_400),
                sunset_after: None,
                at_risk_below: 0.05,
                dormant_below: 0.01,
                dormant_min_sends: 5,
                winback_sends: 3,
                winback_interval: Duration::from_secs(7 * 86_400),
            }
        );
        let sidecar = &config.sidecar;
        let model = sidecar.model.as_ref().unwrap();
        assert_eq!(model.base_url, "http://127.0.0.1:8080/v1");
        assert_eq!(model.model, "local");
        assert_eq!(model.deadline, Duration::from_secs(2));
        assert_eq!(model.api_key_env, None);
        assert_eq!(
            (
                model.max_concurrency,
                model.breaker_failures,
                model.cache_entries
            ),
            (8, 5, 10_000)
        );
        assert_eq!(
            sidecar.tracking,
            Some(TrackingConfig {
                base_url: "http://127.0.0.1:8025".to_owned(),
                secret_file: "../data/tracking.key".into(),
                max_age: TrackingConfig::DEFAULT_MAX_AGE,
                replay_entries: TrackingConfig::DEFAULT_REPLAY_ENTRIES,
            })
        );
        assert_eq!(sidecar.bandit, BanditConfig::default());
        let [winback] = &sidecar.campaigns[..] else {
            panic!("one campaign: {:?}", sidecar.campaigns)
        };
        assert_eq!(winback.name, "winback");
        assert!(winback.tracking);
        assert_eq!(winback.quiet_hours, Some((22, 7)));
        assert!(winback.model_fields.is_empty(), "shared generation");
        assert_eq!(winback.segment_field.as_deref(), Some("segment"));
        assert_eq!(winback.segments, ["new", "lapsed", "vip"]);
        assert_eq!(
            (winback.max_segments, winback.recipient_calls_per_hour),
            (64, 10_000)
        );
        assert_eq!(
            (model.proxy.as_deref(), model.ca_file.as_deref()),
            (None, None)
        );
        assert_eq!(
            (model.rate_per_second, model.retries, model.generate_timeout),
            (None, 2, Duration::from_secs(30))
        );
        let slots: Vec<_> = winback
            .slots
            .iter()
            .map(|s| (s.name.as_str(), s.max_chars))
            .collect();
        assert_eq!(slots, [("subject", 80), ("opening", 240)]);
        let variants: Vec<_> = winback.variants.iter().map(|v| v.id.as_str()).collect();
        assert_eq!(variants, ["plain", "question"]);
        assert_eq!(config.log, LogConfig::default());
        assert_eq!(config.shaping, ShapingConfig::default());
        assert_eq!(config.shaping.providers.len(), 4, "the built-in providers");
        assert_eq!(config.shaping.shared, None, "local limits unless asked");
        assert!(config.pools.is_empty());
    }

    #[test]
    fn example_config_cluster_keys_parse_as_documented() {
        let mut text = include_str!("../../config/tern.toml").to_owned();
        for key in [
            "shared",
            "node_count",
            "shared_prefix",
            "shared_timeout",
            "shared_retry",
        ] {
            let commented = format!("\n# {key} = ");
            assert!(text.contains(&commented), "{key} is documented");
            text = text.replace(&commented, &format!("\n{key} = "));
        }
        let shared = Config::parse(&text).unwrap().shaping.shared.unwrap();
        assert_eq!(
            shared,
            SharedConfig {
                url: "redis://127.0.0.1:6379/0".into(),
                password_file: None,
                ca_file: None,
                node_count: 2,
                prefix: "tern".into(),
                timeout: Duration::from_millis(250),
                retry: Duration::from_secs(5),
            }
        );
    }

    #[test]
    fn example_config_fleet_keys_parse_as_documented() {
        let mut text = include_str!("../../config/tern.toml").to_owned();
        assert!(text.contains("\n# [cluster]\n"), "[cluster] is documented");
        let at = text.find("\n# [cluster]\n").unwrap();
        let mut section = text
            .split_off(at)
            .replacen("\n# [cluster]\n", "\n[cluster]\n", 1);
        for key in [
            "url",
            "redis_cluster",
            "password_file",
            "ca_file",
            "node",
            "prefix",
            "timeout",
            "retry",
        ] {
            let commented = format!("\n# {key} = ");
            assert!(section.contains(&commented), "cluster.{key} is documented");
            section = section.replacen(&commented, &format!("\n{key} = "), 1);
        }
        text.push_str(&section);
        let config = Config::parse(&text).unwrap();
        let cluster = config.cluster.clone().unwrap();
        assert_eq!(
            cluster,
            ClusterConfig {
                url: "rediss://10.0.0.5:6380/0".into(),
                redis_cluster: false,
                password_file: Some(PathBuf::from("/etc/tern/redis.pass")),
                ca_file: Some(PathBuf::from("/etc/tern/redis-ca.pem")),
                node: "mx1".into(),
                prefix: "tern".into(),
                timeout: Duration::from_millis(250),
                retry: Duration::from_secs(1),
            }
        );
        // shaping.shared defaults to the fleet's Redis.
        let shared = config.shaping.shared.unwrap();
        assert_eq!(shared.url, cluster.url);
        assert_eq!(shared.password_file, cluster.password_file);
        assert_eq!(shared.ca_file, cluster.ca_file);
    }

    #[test]
    fn cluster_errors_name_their_keys() {
        let errors = |body: &str| {
            Config::parse(&format!("{MINIMAL}\n[cluster]\n{body}"))
                .unwrap_err()
                .0
        };
        assert_eq!(
            errors("node = \"a\"\n"),
            ["cluster.url: missing required key"]
        );
        let e = errors("url = \"http://x\"\n");
        assert_eq!(e, ["cluster.url: expected a redis:// or rediss:// URL"]);
        let e = errors("url = \"redis://:secret@h\"\n");
        assert!(
            e[0].starts_with("cluster.url: the URL must not carry a password"),
            "{e:?}"
        );
        assert!(
            !e[0].contains("secret"),
            "the password is not echoed: {e:?}"
        );
        let e = errors(
            "url = \"rediss://h:6380\"\nnode = \"a b\"\nprefix = \"{x}\"\ntimeout = \"0s\"\nretry = 3\nredis_cluster = \"yes\"\n",
        );
        let e2 = errors("url = \"redis://h\"\nca_file = \"/ca.pem\"\n");
        assert_eq!(
            e2,
            ["cluster.ca_file: only meaningful with a rediss:// URL"]
        );
        for key in ["node", "prefix", "timeout", "retry", "redis_cluster"] {
            assert!(
                e.iter().any(|e| e.starts_with(&format!("cluster.{key}: "))),
                "{key}: {e:?}"
            );
        }
        // With a Redis Cluster, shaping keeps its own store (or none).
        let c = Config::parse(&format!(
            "{MINIMAL}\n[cluster]\nurl = \"redis://h\"\nredis_cluster = true\n"
        ))
        .unwrap();
        assert_eq!(c.shaping.shared, None);
        assert_eq!(
            c.cluster.unwrap().node,
            c.server.hostname,
            "node defaults to the hostname"
        );
    }

    #[test]
    fn sendtime_errors_name_their_keys() {
        let text = format!(
            "{MINIMAL}\n[sendtime]\nwindow = \"8d\"\nquiet_hours = \"22-25\"\ncontrol_share = 1.5\nrefit_interval = \"0s\"\ndormant_after = 3\nsunset_after = \"0s\"\nat_risk_below = 1.0\ndormant_min_sends = 0\nwinback_sends = 21\nwinback_interval = \"0s\"\n"
        );
        let errors = errors(&text);
        for key in [
            "sendtime.at_risk_below",
            "sendtime.dormant_min_sends",
            "sendtime.winback_sends",
            "sendtime.winback_interval",
            "sendtime.window",
            "sendtime.quiet_hours",
            "sendtime.control_share",
            "sendtime.refit_interval",
            "sendtime.dormant_after",
            "sendtime.sunset_after",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(key)),
                "{key}: {errors:?}"
            );
        }
        let none =
            format!("{MINIMAL}\n[sendtime]\nquiet_hours = \"none\"\nsunset_after = \"none\"\n");
        let parsed = Config::parse(&none).unwrap().sendtime;
        assert_eq!((parsed.quiet_hours, parsed.sunset_after), (None, None));
        let crossed =
            format!("{MINIMAL}\n[sendtime]\nat_risk_below = 0.02\ndormant_below = 0.03\n");
        let crossed = super::tests::errors(&crossed);
        assert!(
            crossed
                .iter()
                .any(|e| e.starts_with("sendtime.dormant_below")),
            "{crossed:?}"
        );
    }

    #[test]
    fn sidecar_errors_name_their_keys() {
        let base = "[[listeners]]\naddress = \"127.0.0.1:2525\"\n";
        let err = Config::parse(&format!(
            "{base}[sidecar.model]\nbase_url = \"ftp://x.test\"\n\
             [[sidecar.campaigns]]\nname = \"a\"\ntext = \"{{{{ x \"\n\
             [[sidecar.campaigns.slots]]\nname = \"s\"\n\
             [[sidecar.campaigns]]\nname = \"b\"\ntext = \"hi\"\ntracking = true\n"
        ))
        .unwrap_err()
        .to_string();
        let tracking = Config::parse(&format!(
            "{base}[sidecar.tracking]\nbase_url = \"https://t.x.test\"\nsecret_file = \"k\"\n\
             max_age = \"0s\"\nreplay_entries = -1\n"
        ))
        .unwrap_err()
        .to_string();
        for key in [
            "sidecar.tracking.max_age: ",
            "sidecar.tracking.replay_entries: ",
        ] {
            assert!(tracking.contains(key), "{key} not in:\n{tracking}");
        }
        for key in [
            "sidecar.model.base_url:",
            "sidecar.model.model: missing",
            "sidecar.campaigns[0].text: template error",
            "sidecar.campaigns[0].slots[0].default: missing",
            "sidecar.tracking: campaign \"b\" has tracking = true",
        ] {
            assert!(err.contains(key), "{key} not in:\n{err}");
        }
    }

    #[test]
    fn a_campaigns_bandit_settings_are_checked_with_their_paths_in_toml_and_json() {
        let base = "[[listeners]]\naddress = \"127.0.0.1:2525\"\n";
        let ok = Config::parse(&format!(
            "{base}[[sidecar.campaigns]]\nname = \"a\"\ntext = \"hi\"\n\
             [sidecar.campaigns.bandit]\nstrategy = \"fixed\"\nholdout = 0.2\nmin_sends = 500\n"
        ))
        .unwrap();
        assert_eq!(
            ok.sidecar.campaigns[0].bandit,
            Some(CampaignBandit {
                strategy: Strategy::Fixed,
                exploration: None,
                holdout: Some(0.2),
                min_sends: 500,
            })
        );
        let err = Config::parse(&format!(
            "{base}[[sidecar.campaigns]]\nname = \"a\"\ntext = \"hi\"\n\
             [sidecar.campaigns.bandit]\nstrategy = \"greedy\"\nholdout = 1.5\n\
             exploration = -0.1\nmin_sends = 99999999999\nbatch = 1\n"
        ))
        .unwrap_err()
        .to_string();
        for key in [
            "sidecar.campaigns[0].bandit.strategy: ",
            "sidecar.campaigns[0].bandit.holdout: ",
            "sidecar.campaigns[0].bandit.exploration: ",
            "sidecar.campaigns[0].bandit.min_sends: ",
            "sidecar.campaigns[0].bandit.batch: ",
        ] {
            assert!(err.contains(key), "{key} not in:\n{err}");
        }
        // The API takes the same keys, with the same checks and paths.
        let errors = compile_campaign_json(
            &serde_json::json!({"name": "a", "text": "hi",
                "bandit": {"strategy": "greedy", "min_sends": -1}}),
            false,
        )
        .unwrap_err();
        let joined = errors.join("\n");
        assert!(joined.contains("bandit.strategy: "), "{joined}");
        assert!(joined.contains("bandit.min_sends: "), "{joined}");
        // What GET shows goes back as a PUT unchanged.
        let doc = serde_json::json!({"name": "a", "text": "hi",
            "bandit": {"strategy": "fixed", "holdout": 0.1, "min_sends": 10}});
        let compiled = compile_campaign_json(&doc, false).unwrap();
        let again = compile_campaign_json(&serde_json::to_value(&compiled).unwrap(), false);
        assert_eq!(again.unwrap(), compiled);
    }

    #[test]
    fn feedback_sender_id_is_what_gmail_takes() {
        let base = "[[listeners]]\naddress = \"127.0.0.1:2525\"\n";
        let default = Config::parse(base).unwrap();
        assert_eq!(default.sidecar.feedback_sender_id, "tern-mta");
        let set = Config::parse(&format!(
            "{base}[sidecar]\nfeedback_sender_id = \"acme-1\"\n"
        ))
        .unwrap();
        assert_eq!(set.sidecar.feedback_sender_id, "acme-1");
        for bad in ["tern", "a-sender-id-too-long", "acme:1", "acme 1"] {
            let err = Config::parse(&format!(
                "{base}[sidecar]\nfeedback_sender_id = \"{bad}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("sidecar.feedback_sender_id: "), "{bad}: {err}");
        }
    }

    #[test]
    fn winback_for_names_a_sender_identity_once() {
        let base = "[[listeners]]\naddress = \"127.0.0.1:2525\"\n";
        let ok = Config::parse(&format!(
            "{base}[[sidecar.campaigns]]\nname = \"a\"\ntext = \"hi\"\nwinback_for = \"News@Example.com\"\n\
             [[sidecar.campaigns]]\nname = \"b\"\ntext = \"hi\"\nwinback_for = \"shop.example.com\"\n"
        ))
        .unwrap();
        let ids: Vec<Option<String>> = ok
            .sidecar
            .campaigns
            .iter()
            .map(|c| c.winback_for.clone())
            .collect();
        assert_eq!(
            ids,
            [
                Some("news@example.com".to_owned()),
                Some("shop.example.com".to_owned())
            ]
        );
        let err = Config::parse(&format!(
            "{base}[[sidecar.campaigns]]\nname = \"a\"\ntext = \"hi\"\nwinback_for = \"not an identity\"\n\
             [[sidecar.campaigns]]\nname = \"b\"\ntext = \"hi\"\nwinback_for = \"x.test\"\n\
             [[sidecar.campaigns]]\nname = \"c\"\ntext = \"hi\"\nwinback_for = \"X.test\"\n"
        ))
        .unwrap_err()
        .to_string();
        for key in [
            "sidecar.campaigns[0].winback_for: ",
            "sidecar.campaigns: campaigns \"b\" and \"c\" are both the win-back campaign",
        ] {
            assert!(err.contains(key), "{key} not in:\n{err}");
        }
    }

    #[test]
    fn sidecar_model_transport_and_generation_keys_are_checked() {
        let base = "[[listeners]]\naddress = \"127.0.0.1:2525\"\n";
        let ok = Config::parse(&format!(
            "{base}[sidecar.model]\nbase_url = \"https://api.x.test/v1/\"\nmodel = \"m\"\n\
             proxy = \"http://127.0.0.1:3128\"\nca_file = \"/etc/ca.pem\"\n\
             rate_per_second = 2.5\nretries = 0\ngenerate_timeout = \"10s\"\n\
             [[sidecar.campaigns]]\nname = \"a\"\ntext = \"hi\"\nsegment_field = \"tier\"\n\
             segments = [\"gold\", \"\"]\nmax_segments = 2\nrecipient_calls_per_hour = 0\n"
        ))
        .unwrap();
        let model = ok.sidecar.model.unwrap();
        assert_eq!(model.base_url, "https://api.x.test/v1");
        assert_eq!(model.proxy.as_deref(), Some("http://127.0.0.1:3128"));
        assert_eq!(model.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(model.rate_per_second, Some(2.5));
        assert_eq!(
            (model.retries, model.generate_timeout),
            (0, Duration::from_secs(10))
        );
        let c = &ok.sidecar.campaigns[0];
        assert_eq!(c.segment_field.as_deref(), Some("tier"));
        assert_eq!(c.segments, ["gold", ""]);
        assert_eq!((c.max_segments, c.recipient_calls_per_hour), (2, 0));

        let err = Config::parse(&format!(
            "{base}[sidecar.model]\nbase_url = \"http://x.test\"\nmodel = \"m\"\n\
             proxy = \"https://p.test:3128\"\nca_file = \"/etc/ca.pem\"\n\
             rate_per_second = 0\nretries = 11\ngenerate_timeout = \"0s\"\n\
             [[sidecar.campaigns]]\nname = \"a\"\ntext = \"hi\"\nsegments = [\"x\"]\n\
             [[sidecar.campaigns]]\nname = \"b\"\ntext = \"hi\"\nsegment_field = \"t\"\n\
             segments = [\"x\", \"y\"]\nmax_segments = 1\n"
        ))
        .unwrap_err()
        .to_string();
        for key in [
            "sidecar.model.proxy: ",
            "sidecar.model.ca_file: only for an https:// base_url",
            "sidecar.model.rate_per_second: ",
            "sidecar.model.retries: at most 10",
            "sidecar.model.generate_timeout: ",
            "sidecar.campaigns[0].segments: needs segment_field",
            "sidecar.campaigns[1].segments: 2 values, more than max_segments (1)",
        ] {
            assert!(err.contains(key), "{key} not in:\n{err}");
        }
        let no_host = Config::parse(&format!(
            "{base}[sidecar.model]\nbase_url = \"https://\"\nmodel = \"m\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(no_host.contains("sidecar.model.base_url: "), "{no_host}");
    }

    #[test]
    fn defaults() {
        let config = Config::parse(MINIMAL).unwrap();
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(config.limits.max_message_size, 50 * 1024 * 1024);
        assert_eq!(config.limits.command_timeout, Duration::from_secs(300));
        assert_eq!(config.limits.data_timeout, Duration::from_secs(600));
        assert_eq!(config.spool.path, Path::new("./data/spool"));
        assert_eq!(config.spool.max_age, Duration::from_secs(5 * 86_400));
        assert_eq!(config.spool.cache_size, 128 << 20);
        assert_eq!(config.admin.address, "127.0.0.1:8025".parse().unwrap());
        assert!(config.relay.networks.is_empty());
        assert!(config.routes.is_empty());
        assert_eq!(
            config.log,
            LogConfig {
                format: LogFormat::Text,
                level: "info".to_owned()
            }
        );
    }

    #[test]
    fn edge_limits_parse_and_refuse_nonsense() {
        let config = Config::parse(&format!(
            "{MINIMAL}\n[limits]\nsession_timeout = \"2m\"\nmin_data_rate = \"2KiB\"\n\
             min_data_rate_window = \"5s\"\nipv6_prefix = 48\n\
             max_connection_rate_per_ip = \"20/1m\"\nmax_auth_failures = 3\n\
             auth_failure_delay = \"0s\"\nauth_lockout = \"1h\"\n\
             max_inflight_bytes = \"64MiB\"\nmax_bounce_rate_per_ip = \"10/1s\"\n"
        ))
        .unwrap();
        let l = config.limits;
        assert_eq!(l.session_timeout, Duration::from_secs(120));
        assert_eq!(
            (l.min_data_rate, l.min_data_rate_window),
            (2048, Duration::from_secs(5))
        );
        assert_eq!(l.ipv6_prefix, 48);
        assert_eq!(
            l.max_connection_rate_per_ip,
            WindowRate {
                count: 20,
                window: Duration::from_secs(60)
            }
        );
        assert_eq!(l.max_auth_failures, 3);
        assert_eq!(l.auth_failure_delay, Duration::ZERO, "no delay is allowed");
        assert_eq!(l.auth_lockout, Duration::from_secs(3600));
        assert_eq!(l.max_inflight_bytes, 64 << 20);
        assert_eq!(
            l.max_bounce_rate_per_ip,
            WindowRate {
                count: 10,
                window: Duration::from_secs(1)
            }
        );
        let d = Limits::default();
        assert_eq!(d.session_timeout, Duration::from_secs(1800));
        assert_eq!(d.max_connection_rate_per_ip.to_string(), "100/10s");
        assert_eq!(d.max_inflight_bytes, 256 << 20);

        let errors = errors(&format!(
            "{MINIMAL}\n[limits]\nipv6_prefix = 0\nmax_connection_rate_per_ip = \"100\"\n\
             max_bounce_rate_per_ip = \"0/1m\"\nsession_timeout = \"0s\"\n\
             max_message_size = \"10MiB\"\nmax_inflight_bytes = \"1MiB\"\nmin_data_rate = 0\n"
        ));
        let expected = [
            "limits.session_timeout: must be greater than 0",
            "limits.min_data_rate: must be greater than 0",
            "limits.ipv6_prefix: must be between 1 and 128, found 0",
            "limits.max_connection_rate_per_ip: invalid rate \"100\" (expected a count, '/', and a duration",
            "limits.max_bounce_rate_per_ip: \"0/1m\": count and duration must be greater than 0",
            "limits.max_inflight_bytes: must be at least limits.max_message_size (10485760 bytes), found 1048576 bytes",
        ];
        for want in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let errors = errors(
            r#"
            [server]
            hostname = "bad_host"
            shutdown_grace = "soon"

            [[listeners]]
            address = "127.0.0.1:25"

            [[listeners]]
            address = "1.2.3.4:99999"

            [[listeners]]
            address = "127.0.0.1:25"
            mode = "lmtp"

            [relay]
            networks = ["10.0.0.0/8", "10.0.0.0/33", 7]

            [limits]
            max_message_size = "lots"
            command_timeout = 300
            max_recipients = 0
            max_connections = -5
            bogus = true

            [log]
            level = "verbose"
            format = "xml"

            [[routes]]
            domain = "sink.test"
            hosts = ["sink:25"]

            [[routes]]
            domain = "SINK.test"
            hosts = ["sink:99999", "::1:25"]

            [[routes]]
            domain = "other.test"
            hosts = []

            [bogus_section]
            "#,
        );
        let expected = [
            "server.hostname: invalid DNS name \"bad_host\"",
            "server.shutdown_grace: invalid duration \"soon\"",
            "listeners[1].address: invalid socket address \"1.2.3.4:99999\"",
            "listeners[2].mode: unknown mode \"lmtp\"",
            "listeners[2].address: duplicate address 127.0.0.1:25 (already used by listeners[0].address)",
            "relay.networks[1]: invalid CIDR \"10.0.0.0/33\"",
            "relay.networks[2]: expected a string, found integer",
            "limits.max_message_size: invalid size \"lots\"",
            "limits.max_recipients: must be greater than 0",
            "limits.max_connections: must not be negative",
            "limits.command_timeout: expected a duration string",
            "limits.bogus: unknown key",
            "routes[1].hosts[0]: invalid host:port \"sink:99999\": invalid port \"99999\"",
            "routes[1].hosts[1]: invalid host:port \"::1:25\": an IPv6 address must be in brackets",
            "routes[1].domain: duplicate route for \"sink.test\" (already defined by routes[0].domain)",
            "routes[2].hosts: must not be empty",
            "log.format: unknown log format \"xml\"",
            "log.level: invalid log filter \"verbose\"",
            "bogus_section: unknown key",
        ];
        for want in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn unknown_nested_keys() {
        let errors = errors(&format!(
            "{MINIMAL}\nmode = \"smtp\"\ncolour = 1\n[[routes]]\ndomain = \"*\"\nhosts = [\"a.test:25\"]\nhost = \"x\"\n[limits]\nmax_eror = 3\n\"odd key\" = 1\n"
        ));
        assert_eq!(
            errors,
            [
                "listeners[0].colour: unknown key",
                "limits.max_eror: unknown key (did you mean `max_errors`?)",
                "limits.\"odd key\": unknown key",
                "routes[0].host: unknown key (did you mean `hosts`?)",
            ]
        );
    }

    #[test]
    fn plaintext_password_is_rejected() {
        let errors = errors(&format!(
            "{MINIMAL}\n[[auth.users]]\nname = \"alice\"\npassword = \"hunter2\"\n"
        ));
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("auth.users[0].password: plaintext passwords are not accepted")
        );
        assert!(errors[0].contains("tern hash-password"));
    }

    #[test]
    fn auth_users() {
        let ok =
            format!("{MINIMAL}\n[[auth.users]]\nname = \"alice\"\npassword_hash = \"{HASH}\"\n");
        let config = Config::parse(&ok).unwrap();
        assert_eq!(
            config.auth.users,
            [AuthUser {
                name: "alice".to_owned(),
                password_hash: HASH.to_owned()
            }]
        );
        assert!(
            !format!("{config:?}").contains(HASH),
            "hashes must not appear in Debug output"
        );

        let errors = errors(&format!(
            "{ok}\n[[auth.users]]\nname = \"alice\"\npassword_hash = \"{HASH}\"\n[[auth.users]]\nname = \"bob\"\npassword_hash = \"$2b$10$notphc\"\n[[auth.users]]\nname = \"carol\"\n"
        ));
        let expected = [
            "auth.users[1].name: duplicate user \"alice\" (already defined by auth.users[0].name)",
            "auth.users[2].password_hash: ",
            "auth.users[3].password_hash: missing required key",
        ];
        for want in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(want)),
                "missing {want:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn smtps_requires_tls() {
        let errors = errors(
            "server.hostname = \"mx.test\"\n[[listeners]]\naddress = \"0.0.0.0:465\"\nmode = \"smtps\"\n",
        );
        assert_eq!(
            errors,
            ["listeners[0].mode: \"smtps\" requires a [tls] section with cert and key"]
        );

        let config = Config::parse(
            "server.hostname = \"mx.test\"\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[[listeners]]\naddress = \"0.0.0.0:465\"\nmode = \"smtps\"\n",
        )
        .unwrap();
        assert_eq!(config.listeners[0].mode, ListenerMode::ImplicitTls);
        assert_eq!(
            config.tls,
            Some(TlsConfig {
                cert_path: PathBuf::from("c.pem"),
                key_path: PathBuf::from("k.pem")
            })
        );
    }

    #[test]
    fn structural_errors() {
        assert_eq!(
            errors("server.hostname = \"mx.test\"\n[tls]\ncert = \"c.pem\"\n"),
            [
                "tls.key: missing required key",
                "listeners: at least one [[listeners]] entry is required"
            ]
        );
        assert_eq!(
            errors("server.hostname = \"mx.test\"\nlisteners = \"127.0.0.1:25\"\nlimits = 5\n"),
            [
                "listeners: expected an array of tables ([[listeners]]), found string",
                "limits: expected a table, found integer",
            ]
        );
        assert_eq!(
            errors(&format!(
                "{MINIMAL}\n[admin]\naddress = \"127.0.0.1:2525\"\n"
            )),
            ["admin.address: 127.0.0.1:2525 is already used by listeners[0].address"]
        );
    }

    #[test]
    fn relay_networks_accept_plain_addresses() {
        let config = Config::parse(&format!(
            "{MINIMAL}\n[relay]\nnetworks = [\"192.0.2.7\", \"2001:db8::1\", \"10.1.2.3/8\"]\n"
        ))
        .unwrap();
        let nets: Vec<String> = config
            .relay
            .networks
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["192.0.2.7/32", "2001:db8::1/128", "10.0.0.0/8"]);
    }

    #[test]
    fn dkim_rotation_times_compile_and_errors_name_them() {
        let key = "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey = \"/k.pem\"\n";
        let config = Config::parse(&format!(
            "{MINIMAL}\n{key}active_from = 2027-01-01T00:00:00Z\nretire_after = \"2027-02-01T00:00:00+01:00\"\n"
        ))
        .unwrap();
        assert_eq!(config.dkim[0].active_from, Some(1_798_761_600));
        assert_eq!(config.dkim[0].retire_after, Some(1_801_436_400));
        assert!(config.dkim[0].active_at(1_798_761_600));
        assert!(!config.dkim[0].active_at(1_801_436_400));
        let errors = errors(&format!(
            "{MINIMAL}\n{key}active_from = \"tomorrow\"\n\n{key}active_from = 2027-02-01T00:00:00Z\nretire_after = 2027-01-01T00:00:00Z\n"
        ));
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(": ").next().unwrap())
            .collect();
        assert_eq!(
            keys,
            ["dkim[0].active_from", "dkim[1].retire_after"],
            "{errors:?}"
        );
    }

    #[test]
    fn feedback_loop_domains_compile_and_errors_name_them() {
        let config = Config::parse(&format!(
            "{MINIMAL}\n[bounce]\nfeedback_loops = [\"FBL.Yahoo.com.\", \"jmrp.example\"]\n"
        ))
        .unwrap();
        assert_eq!(
            config.bounce.feedback_loops,
            ["fbl.yahoo.com", "jmrp.example"]
        );
        let errors = errors(&format!(
            "{MINIMAL}\n[bounce]\nfeedback_loops = [\"ok.example\", \"not a domain\"]\n"
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("bounce.feedback_loops[1]: "),
            "{errors:?}"
        );
    }

    #[test]
    fn admin_edge_keys_compile_and_errors_name_them() {
        let config = Config::parse(&format!(
            "{MINIMAL}\n[admin]\nheader_timeout = \"3s\"\nwrite_timeout = \"7s\"\nmax_connections = 50\n\
             max_body_size = \"64KiB\"\ntrusted_proxies = [\"10.0.0.1\", \"fd00::/8\"]\n"
        ))
        .unwrap();
        assert_eq!(config.admin.header_timeout, Duration::from_secs(3));
        assert_eq!(config.admin.write_timeout, Duration::from_secs(7));
        assert_eq!(config.admin.max_connections, 50);
        assert_eq!(config.admin.max_body_size, 64 << 10);
        let proxies: Vec<String> = config
            .admin
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(proxies, ["10.0.0.1/32", "fd00::/8"]);
        let errors = errors(&format!(
            "{MINIMAL}\n[admin]\nheader_timeout = \"0s\"\nwrite_timeout = \"never\"\nmax_connections = 0\n\
             max_body_size = \"lots\"\ntrusted_proxies = [\"proxy.local\"]\n"
        ));
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(": ").next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "admin.header_timeout",
                "admin.write_timeout",
                "admin.max_connections",
                "admin.max_body_size",
                "admin.trusted_proxies[0]"
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn admin_tokens_compile_and_errors_name_each_entry() {
        let hash = "ab".repeat(32);
        let config = Config::parse(&format!(
            "{MINIMAL}\n[[admin.tokens]]\nname = \"app\"\nsecret_sha256 = \"{hash}\"\n\
             scopes = [\"inject\", \"read\"]\n"
        ))
        .unwrap();
        assert_eq!(
            config.admin.tokens,
            [AdminToken {
                name: "app".into(),
                secret_sha256: [0xab; 32],
                scopes: vec![Scope::Inject, Scope::Read],
            }]
        );
        let errors = errors(&format!(
            "{MINIMAL}\n[[admin.tokens]]\nname = \"app\"\nsecret_sha256 = \"{hash}\"\n\
             scopes = [\"inject\"]\n\
             [[admin.tokens]]\nname = \"app\"\nsecret_sha256 = \"{hash}\"\n\
             scopes = [\"root\"]\n\
             [[admin.tokens]]\nname = \"a b\"\nsecret_sha256 = \"plain-secret\"\nscopes = []\n"
        ));
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(": ").next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "admin.tokens[1].scopes[0]",
                "admin.tokens[1].name",
                "admin.tokens[1].secret_sha256",
                "admin.tokens[2].name",
                "admin.tokens[2].secret_sha256",
                "admin.tokens[2].scopes",
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let errors = errors("[server]\nhostname = \"a\"\nshutdown_grace = = 3\n");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("TOML syntax error at line 3, column 18: "),
            "{errors:?}"
        );
        assert!(!errors[0].contains('\n'));
    }

    #[test]
    fn load_names_the_file() {
        let err = Config::load(Path::new("/nonexistent/tern.toml")).unwrap_err();
        assert_eq!(err.to_string(), "/nonexistent/tern.toml: no such file");
    }

    #[test]
    fn dns_names_and_log_filters() {
        assert!(check_dns_name("mx-1.example.com").is_ok());
        assert!(check_dns_name("localhost").is_ok());
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a.b.",
            "a_b.c",
            "1.2.3.4",
            &"x".repeat(64),
        ] {
            assert!(check_dns_name(bad).is_err(), "{bad:?}");
        }
        for good in ["info", "WARN", "info,tern::smtp=debug", "off"] {
            assert!(check_log_filter(good).is_ok(), "{good:?}");
        }
        for bad in ["", "verbose", "info,", "=debug", "tern=loud"] {
            assert!(check_log_filter(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tls_levels_take_postfix_names_and_policy_routes_need_tls() {
        let text = r#"
            [[listeners]]
            address = "127.0.0.1:2525"
            [server]
            hostname = "mx.test"
            [delivery]
            dane = true
            dnssec_trust_anchor = "/etc/tern/root.key"
            tls = "encrypt"
            [[routes]]
            domain = "a.test"
            tls = "dane-only"
            [[routes]]
            domain = "b.test"
            hosts = ["relay.b.test:25"]
            tls = "verify"
            [[routes]]
            domain = "c.test"
            tls = "none"
        "#;
        let config = Config::parse(text).unwrap();
        assert!(config.delivery.dane);
        assert_eq!(config.delivery.tls, TlsPolicy::Encrypt);
        assert_eq!(
            config.delivery.dnssec_trust_anchor.as_deref(),
            Some(Path::new("/etc/tern/root.key"))
        );
        let levels: Vec<_> = config.routes.iter().map(|r| r.tls).collect();
        assert_eq!(
            levels,
            [
                Some(TlsPolicy::DaneOnly),
                Some(TlsPolicy::Required),
                Some(TlsPolicy::Disabled)
            ]
        );
        assert!(config.routes[0].hosts.is_empty(), "a policy route");

        let bad = r#"
            [[listeners]]
            address = "127.0.0.1:2525"
            [server]
            hostname = "mx.test"
            [delivery]
            tls = "dane"
            dane = "yes"
            [[routes]]
            domain = "a.test"
            [[routes]]
            domain = "b.test"
            hosts = ["relay.b.test:25"]
            tls = "mta-sts"
            [[routes]]
            domain = "c.test"
            tls = "sometimes"
            [[routes]]
            domain = "d.test"
            tls = "may"
            verp = true
        "#;
        let errors = Config::parse(bad).unwrap_err().0;
        let expect = [
            "delivery.tls: DANE and MTA-STS are switched on with delivery.dane",
            "delivery.dane: expected true or false",
            "routes[0].hosts: missing required key (a route without hosts only sets tls",
            "routes[1].tls: mta-sts applies to MX routing",
            "routes[2].tls: unknown TLS policy \"sometimes\"",
            "routes[2].hosts: missing required key",
            "routes[3].verp: only for a route with hosts",
        ];
        for e in expect {
            assert!(
                errors.iter().any(|x| x.starts_with(e)),
                "missing {e:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expect.len(), "{errors:#?}");
    }

    #[test]
    fn delivery_sections_report_every_error_with_its_path() {
        let text = r#"
            [[listeners]]
            address = "127.0.0.1:2525"
            [server]
            hostname = "mx.test"
            [delivery]
            retry_initial = "10m"
            retry_max = "5m"
            retry_factor = 0
            delay_notice_after = "off"
            tls = "sometimes"
            nameservers = ["127.0.0.1:5353", "not-an-ip"]
            log_path = "off"
            [delivery.timeouts]
            data_end = "0s"
            [[routes]]
            domain = "smarthost.test"
            hosts = ["10.0.0.1:587"]
            tls = "required"
            [routes.auth]
            username = "relay"
            password = "secret"
            [[dkim]]
            domain = "example.com"
            key = "/etc/tern/k.pem"
            headers = ["subject"]
            oversign = ["subject", "bad:name"]
        "#;
        let errors = Config::parse(text).unwrap_err().0;
        let expect = [
            "delivery.retry_max: must not be shorter than retry_initial",
            "delivery.retry_factor: must be between 1 and 10",
            "delivery.tls: unknown TLS policy",
            "delivery.nameservers[1]: invalid nameserver",
            "delivery.timeouts.data_end:",
            "routes[0].auth.password:",
            "routes[0].auth.password_file:",
            "dkim[0].selector:",
            "dkim[0].oversign[1]: invalid header name",
        ];
        for e in expect {
            assert!(
                errors.iter().any(|x| x.starts_with(e)),
                "missing {e:?} in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expect.len(), "{errors:#?}");
    }

    #[test]
    fn delivery_sections_compile() {
        let text = r#"
            [[listeners]]
            address = "127.0.0.1:2525"
            [server]
            hostname = "mx.test"
            [delivery]
            delay_notice_after = "off"
            nameservers = ["127.0.0.1"]
            log_path = "off"
            [[routes]]
            domain = "*"
            hosts = ["smarthost.test:587"]
            tls = "required"
            [routes.auth]
            username = "relay"
            password_file = "/etc/tern/relay.pass"
            [[dkim]]
            domain = "Example.COM"
            selector = "20240101"
            key = "/etc/tern/k.pem"
            headers = ["Subject"]
        "#;
        let config = Config::parse(text).unwrap();
        assert_eq!(config.delivery.delay_notice_after, None);
        assert_eq!(config.delivery.log_path, None);
        assert_eq!(
            config.delivery.nameservers,
            ["127.0.0.1:53".parse().unwrap()]
        );
        assert_eq!(config.routes[0].tls, Some(TlsPolicy::Required));
        assert_eq!(config.routes[0].auth.as_ref().unwrap().username, "relay");
        let dkim = &config.dkim[0];
        assert_eq!(dkim.domain, "example.com");
        assert_eq!(dkim.headers, ["from", "subject"]);
        assert_eq!(dkim.oversign.len(), DEFAULT_DKIM_OVERSIGN.len());
    }
}
