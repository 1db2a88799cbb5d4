//! [`ApiClient`]: the blocking HTTP/1.1 client of the admin API, for the `tern` CLI commands
//! that talk to a running daemon (and for load tools). Plain std sockets: one keep-alive
//! connection, JSON request bodies, the bearer token from `admin.token_file`.
//!
//! Invariant: every response is read exactly to its end (Content-Length or chunked), so the
//! same connection can carry the next request. A failed request drops the connection and is
//! never retried: an injection may have been spooled even if its answer was lost.

use crate::config::AdminConfig;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Longest wait for connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for each read or write, unless [`ApiClient::with_timeout`] says otherwise.
const TIMEOUT: Duration = Duration::from_secs(60);

pub struct ApiClient {
    addr: SocketAddr,
    token: String,
    timeout: Duration,
    conn: Option<BufReader<TcpStream>>,
}

/// An answer: the status code and the body, parsed as JSON (`Null` when empty).
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub body: serde_json::Value,
}

impl ApiResponse {
    /// The `error` text of a 4xx/5xx answer (or the whole body if it has none).
    pub fn error(&self) -> String {
        match self.body["error"].as_str() {
            Some(error) => error.to_string(),
            None => self.body.to_string(),
        }
    }
}

impl ApiClient {
    pub fn new(addr: SocketAddr, token: impl Into<String>) -> ApiClient {
        ApiClient {
            addr,
            token: token.into(),
            timeout: TIMEOUT,
            conn: None,
        }
    }

    /// Waits up to `timeout` for each read or write (bulk queue actions take a while).
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    /// A client for the daemon configured by `admin`: its address (an unspecified address
    /// means loopback) and the token in its token file. Errors name the config key.
    pub fn from_config(admin: &AdminConfig) -> Result<ApiClient, String> {
        let path = admin
            .token_file
            .as_deref()
            .ok_or("admin.token_file is not set: the admin API is disabled")?;
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("admin.token_file: cannot read {}: {e}", path.display()))?;
        Ok(ApiClient::new(address_of(admin), token.trim()))
    }

    /// Connects now instead of at the first call, so "nothing listens" (the daemon is not
    /// running) can be told apart from a call that failed.
    pub fn connect(&mut self) -> io::Result<()> {
        if self.conn.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(self.timeout))?;
            stream.set_write_timeout(Some(self.timeout))?;
            self.conn = Some(BufReader::new(stream));
        }
        Ok(())
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// One call; `body` is sent as JSON. An `Err` is a transport failure (no answer).
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> io::Result<ApiResponse> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, bytes) = self.call_raw(method, path, body.as_bytes())?;
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("HTTP {status} with a body that is not JSON: {e}"),
                )
            })?
        };
        Ok(ApiResponse { status, body })
    }

    /// One call with a prepared JSON body; returns the status and the raw response body.
    pub fn call_raw(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> io::Result<(u16, Vec<u8>)> {
        let result = self.exchange(method, path, body);
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    fn exchange(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        self.connect()?;
        let Some(conn) = &mut self.conn else {
            unreachable!("connect() leaves a connection or fails");
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            self.token,
            body.len()
        );
        let stream = conn.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        stream.flush()?;
        let (status, response) = read_response(conn)?;
        Ok((status, response))
    }
}

/// Where the daemon configured by `admin` answers: its admin address, with an unspecified
/// address (0.0.0.0, ::) meaning loopback.
pub fn address_of(admin: &AdminConfig) -> SocketAddr {
    let mut addr = admin.address;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    addr
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads one response: status line, headers, and the body by Content-Length or chunks.
fn read_response(conn: &mut BufReader<TcpStream>) -> io::Result<(u16, Vec<u8>)> {
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before an answer",
        ));
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad HTTP status line {line:?}")))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        conn.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| invalid(format!("bad Content-Length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line)?;
            let size = line.trim_end().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
            let start = body.len();
            body.resize(start + size, 0);
            conn.read_exact(&mut body[start..])?;
            line.clear();
            conn.read_line(&mut line)?; // the CRLF after the chunk (or the final one)
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        conn.read_exact(&mut body)?;
    } else {
        conn.read_to_end(&mut body)?;
    }
    Ok((status, body))
}
