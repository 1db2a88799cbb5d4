//! A real `redis-server` for the tests that need one (shaping.shared, [cluster]): a child
//! process on a free 127.0.0.1 port, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `redis-server` child process on 127.0.0.1 (no persistence unless [`RedisServer::persistent`]).
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// With a directory: AOF persistence there (appendfsync everysec), kept across restarts.
    dir: Option<PathBuf>,
    /// The password clients must give (AUTH), if any.
    password: Option<String>,
    /// TLS only (certificate, key, CA files), if set.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let mut server = RedisServer::not_started();
        server.restart().await;
        server
    }

    /// A free port where a server can be started later.
    pub fn not_started() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RedisServer {
            port,
            child: None,
            dir: None,
            password: None,
            tls: None,
        }
    }

    /// From now on (re)started with its data in an append-only file in `dir`.
    pub fn persistent(&mut self, dir: &Path) {
        self.dir = Some(dir.to_path_buf());
    }

    /// From now on (re)started on TLS only (the harness's "localhost" certificate, files in
    /// `dir`): its URL is `rediss://localhost:PORT`.
    pub fn tls(&mut self, dir: &Path) {
        self.tls = Some(crate::harness::write_cert_files(dir));
    }

    /// From now on (re)started asking clients for `password`.
    pub fn require_password(&mut self, password: &str) {
        self.password = Some(password.to_owned());
    }

    /// From now on (re)started without persistence: a restart begins empty.
    pub fn volatile(&mut self) {
        self.dir = None;
    }

    /// SIGSTOP / SIGCONT: a server that accepts connections but never answers.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://localhost:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// (Re)starts the server on its port and waits until it answers PING.
    pub async fn restart(&mut self) {
        let port = self.port.to_string();
        let ports: Vec<String> = match &self.tls {
            Some((cert, key, ca)) => [
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                &cert.display().to_string(),
                "--tls-key-file",
                &key.display().to_string(),
                "--tls-ca-cert-file",
                &ca.display().to_string(),
                "--tls-auth-clients",
                "no",
            ]
            .map(str::to_owned)
            .to_vec(),
            None => vec!["--port".to_owned(), port.clone()],
        };
        let child = Command::new("redis-server")
            .args(&ports)
            .args(["--save", "", "--bind", "127.0.0.1"])
            .args(match &self.dir {
                Some(dir) => vec![
                    "--appendonly".to_owned(),
                    "yes".to_owned(),
                    "--appendfsync".to_owned(),
                    "everysec".to_owned(),
                    "--dir".to_owned(),
                    dir.display().to_string(),
                ],
                None => vec!["--appendonly".to_owned(), "no".to_owned()],
            })
            .args(match &self.password {
                Some(p) => vec!["--requirepass".to_owned(), p.clone()],
                None => Vec::new(),
            })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): these tests need it on PATH \
                     (apt-get install -y redis-server; .ci/run installs it)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                if self.tls.is_some() {
                    return; // listening; the nodes' TLS handshakes are the test
                }
                // With a password, PING before AUTH answers -NOAUTH: up all the same.
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && s.read_exact(&mut buf).await.is_ok()
                    && (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real Redis Cluster of three masters (no replicas) on 127.0.0.1: three `redis-server
/// --cluster-enabled yes` children, joined by `redis-cli --cluster create`, killed when
/// dropped. Ready once every node reports `cluster_state:ok`.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

/// A free port whose cluster bus port (+10000) is free too.
fn cluster_port(taken: &[u16]) -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < 55_000
            && !taken.contains(&port)
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::new();
        for _ in 0..3 {
            ports.push(cluster_port(&ports));
        }
        let mut children = Vec::new();
        for port in &ports {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                .args(["--cluster-config-file", "nodes.conf", "--save", ""])
                .args([
                    "--appendonly",
                    "no",
                    "--dir",
                    &node_dir.display().to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH");
            children.push(child);
        }
        let cluster = RedisCluster {
            ports,
            children,
            _dir: dir,
        };
        for port in &cluster.ports {
            cluster.wait(*port, "PING", "PONG").await;
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for port in &cluster.ports {
            cluster
                .wait(*port, "CLUSTER INFO", "cluster_state:ok")
                .await;
        }
        cluster
    }

    /// Waits until `command` on the node at `port` answers something containing `want`.
    async fn wait(&self, port: u16, command: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(command.split(' '))
                .output()
                .expect("redis-cli on PATH");
            if String::from_utf8_lossy(&out.stdout).contains(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{command} on 127.0.0.1:{port}: no {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One node's URL (the client finds the others from it).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }

    /// A cluster connection for the test's own looks.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(vec![self.url()])
            .unwrap()
            .get_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
