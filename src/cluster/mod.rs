//! The fleet's store (`[cluster]`): one Redis server or Redis Cluster that every node of a
//! fleet shares, so the fleet behaves as one sender. This module owns the connection
//! ([`Store`]: client, TLS, password from a file, timeouts, health) and the key names; the
//! replication of each piece of shared state lives beside it:
//! - [`suppression`]: the suppression list (an outbox of local changes pushed in order, a
//!   stream every node follows into its spool copy, paged resyncs).
//!
//! Invariants:
//! - No Redis call waits longer than `cluster.timeout` (a blocking stream read: its block time
//!   plus that). Redis unreachable never stops mail: every hot-path read is local, every write
//!   waits in a durable outbox.
//! - Every key is `{<prefix>}:<name>`: the prefix is a hash tag, so on Redis Cluster all of a
//!   fleet's keys live in one slot and the multi-key scripts are allowed there.
//!
//! Floor 3, beside `suppression` (which it imports, never the other way round).

pub mod suppression;

use crate::config::ClusterConfig;
use crate::telemetry::{ClusterError, Metrics};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tracing::{info, warn};

/// How the store is reached: one server, or a Redis Cluster found from one of its nodes.
// One per node, made once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// An open connection of either kind (both multiplex, so clones share one socket).
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// One node's handle on the fleet's store, and its health.
pub struct Store {
    client: Client,
    /// The shared connection while the store is up.
    conn: RwLock<Option<Conn>>,
    up: AtomicBool,
    config: ClusterConfig,
    /// `tern_cluster_*`, registered when the store is made.
    metrics: Arc<Metrics>,
}

/// The password in `path`: the first line, without its line end.
pub fn read_password(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|p| p.lines().next().unwrap_or("").to_owned())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The TLS roots of a `rediss://` store: the PEM bundle in `ca_file`, else the system's.
fn certificates(
    ca_file: Option<&std::path::Path>,
) -> Result<Option<redis::TlsCertificates>, String> {
    let Some(path) = ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// A client for `url` with the password from `password_file` and, for `rediss://`, the CAs
/// in `ca_file` (errors name `key`).
pub fn single_client(
    url: &str,
    password_file: Option<&std::path::Path>,
    ca_file: Option<&std::path::Path>,
    key: &str,
) -> Result<redis::Client, String> {
    let mut info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| format!("{key}: invalid Redis URL: {e}"))?;
    if let Some(path) = password_file {
        let password = read_password(path).map_err(|e| format!("{key}: {e}"))?;
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    match certificates(ca_file).map_err(|e| format!("{key}: {e}"))? {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    }
    .map_err(|e| format!("{key}: {e}"))
}

impl Store {
    /// The store `config` names, reported to `metrics`; nothing is connected yet. Errors (an
    /// unreadable password file) name the config key.
    pub fn new(config: &ClusterConfig, metrics: Arc<Metrics>) -> Result<Store, String> {
        let client = if config.redis_cluster {
            let mut builder = redis::cluster::ClusterClient::builder(vec![config.url.as_str()])
                .connection_timeout(config.timeout)
                // The follower's blocking stream reads wait BLOCK on purpose; every call is
                // bounded by `cluster.timeout` (+ its block) in `Store::run` anyway.
                .response_timeout(config.timeout + suppression::BLOCK);
            if let Some(path) = &config.password_file {
                let password =
                    read_password(path).map_err(|e| format!("cluster.password_file: {e}"))?;
                builder = builder.password(password);
            }
            if let Some(certs) = certificates(config.ca_file.as_deref())
                .map_err(|e| format!("cluster.ca_file: {e}"))?
            {
                builder = builder.certs(certs);
            }
            Client::Cluster(builder.build().map_err(|e| format!("cluster.url: {e}"))?)
        } else {
            // Read here first so an unreadable file is reported under its own key.
            if let Some(path) = &config.password_file {
                read_password(path).map_err(|e| format!("cluster.password_file: {e}"))?;
            }
            certificates(config.ca_file.as_deref()).map_err(|e| format!("cluster.ca_file: {e}"))?;
            Client::Single(single_client(
                &config.url,
                config.password_file.as_deref(),
                config.ca_file.as_deref(),
                "cluster.url",
            )?)
        };
        metrics.cluster().up.set(0);
        Ok(Store {
            client,
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            config: config.clone(),
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// This node's name in the fleet.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// The full name of the fleet's key `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{{{}}}:{name}", self.config.prefix)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// A new connection of its own (for a blocking read that must not hold up others),
    /// checked with PING, within `cluster.timeout`.
    pub async fn connect(&self) -> Result<Conn, String> {
        let attempt = async {
            let mut conn = match &self.client {
                Client::Single(c) => Conn::Single(c.get_multiplexed_async_connection().await?),
                Client::Cluster(c) => Conn::Cluster(c.get_async_connection().await?),
            };
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let result = match tokio::time::timeout(self.config.timeout, attempt).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.config.timeout)),
        };
        if result.is_err() {
            self.metrics.cluster().error(ClusterError::Connect);
        }
        result
    }

    /// The shared connection, opened when there is none.
    async fn shared(&self) -> Result<Conn, String> {
        if let Some(conn) = self
            .conn
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Ok(conn);
        }
        let conn = self.connect().await?;
        *self.conn.write().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `cmd` on the shared connection within `cluster.timeout` (`extra` more for a
    /// command that blocks on purpose). A failure drops the connection (the next call opens
    /// a new one) and marks the store down.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, String> {
        let mut conn = match self.shared().await {
            Ok(conn) => conn,
            Err(e) => {
                self.down(&e);
                return Err(e);
            }
        };
        self.run(&mut conn, cmd, Duration::ZERO).await
    }

    /// Like [`Store::query`], for a command without a key that must run where the fleet's
    /// keys are (SCAN): on Redis Cluster it goes to the master of the `{prefix}` slot (a
    /// cluster client would send it to any node, which holds none of them).
    pub async fn query_in_slot<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, String> {
        let mut conn = match self.shared().await {
            Ok(conn) => conn,
            Err(e) => {
                self.down(&e);
                return Err(e);
            }
        };
        let Conn::Cluster(cluster) = &mut conn else {
            return self.run(&mut conn, cmd, Duration::ZERO).await;
        };
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
            self.key(""),
            SlotAddr::Master,
        )));
        let answer = cluster.route_command(cmd.clone(), route);
        let value = self.settle(
            tokio::time::timeout(self.config.timeout, answer).await,
            Duration::ZERO,
        )?;
        redis::from_redis_value(value).map_err(|e| e.to_string())
    }

    /// Runs `cmd` on `conn` (one from [`Store::connect`]) within `cluster.timeout` + `extra`.
    pub async fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut Conn,
        cmd: &Cmd,
        extra: Duration,
    ) -> Result<T, String> {
        let answer =
            tokio::time::timeout(self.config.timeout + extra, cmd.query_async::<T>(conn)).await;
        self.settle(answer, extra)
    }

    /// The health bookkeeping of one answer (or its absence after `cluster.timeout` +
    /// `extra`): up on an answer, down on a failed connection or no answer.
    fn settle<T>(
        &self,
        answer: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        extra: Duration,
    ) -> Result<T, String> {
        match answer {
            Ok(Ok(v)) => {
                self.mark_up();
                Ok(v)
            }
            Ok(Err(e)) => {
                // A script error is the script's, not the connection's.
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) {
                    self.metrics.cluster().error(ClusterError::Reply);
                } else if e.is_timeout() {
                    // The client's own response timeout (the cluster client has one): no
                    // answer in time, like ours below, not a failed connection.
                    self.metrics.cluster().error(ClusterError::Timeout);
                    self.down(&e.to_string());
                } else {
                    self.metrics.cluster().error(ClusterError::Command);
                    self.down(&e.to_string());
                }
                Err(e.to_string())
            }
            Err(_) => {
                let e = format!("no answer within {:?}", self.config.timeout + extra);
                self.metrics.cluster().error(ClusterError::Timeout);
                self.down(&e);
                Err(e)
            }
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            self.metrics.cluster().up.set(1);
            info!(node = %self.config.node, "fleet store (cluster.url) reachable");
        }
    }

    fn down(&self, error: &str) {
        *self.conn.write().unwrap_or_else(PoisonError::into_inner) = None;
        if self.up.swap(false, Ordering::AcqRel) {
            self.metrics.cluster().up.set(0);
            warn!(node = %self.config.node, error,
                "fleet store (cluster.url) unreachable: checks use this node's copy, changes wait in its outbox");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_files_are_reported_under_their_own_keys() {
        let config = |password: Option<&str>, ca: Option<&str>| ClusterConfig {
            url: "rediss://127.0.0.1:1".into(),
            redis_cluster: false,
            password_file: password.map(Into::into),
            ca_file: ca.map(Into::into),
            node: "n".into(),
            prefix: "p".into(),
            timeout: Duration::from_millis(10),
            retry: Duration::from_millis(10),
        };
        let metrics = Arc::new(Metrics::new());
        let err = |c: ClusterConfig| Store::new(&c, metrics.clone()).err().expect("refused");
        assert!(err(config(Some("/nonexistent/pass"), None)).starts_with("cluster.password_file: "));
        assert!(err(config(None, Some("/nonexistent/ca.pem"))).starts_with("cluster.ca_file: "));
        let store = Store::new(&config(None, None), metrics.clone()).unwrap();
        assert_eq!(store.key("sup"), "{p}:sup");
        assert!(!store.is_up());
        assert_eq!(
            store.metrics().cluster().up.get(),
            0,
            "down until it answers"
        );
    }
}
