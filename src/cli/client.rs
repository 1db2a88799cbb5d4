//! The blocking HTTP/1.1 client of the admin API, for the `tern` commands that talk to a
//! running daemon (and for load tools and tests).
//!
//! - [`ApiClient`]: the transport. Plain std sockets: one keep-alive connection, JSON request
//!   bodies, the bearer token from `TERN_TOKEN` or `admin.token_file`.
//! - [`AdminClient`]: one call per CLI command over a fresh [`ApiClient`], its failures sorted
//!   into [`CallError`].
//! - [`query_value`]: percent-encoding for the query strings the commands build.
//!
//! Invariants: every response is read exactly to its end (Content-Length or chunked), so the
//! same connection can carry the next request. A failed request drops the connection and is
//! never retried: an injection may have been spooled even if its answer was lost. A daemon
//! that cannot be reached is [`CallError::Unreachable`], distinct from an error the API
//! answered, so the CLI can fall back to reading a stopped daemon's spool; the API's own error
//! message is what the operator sees for the latter.

use crate::config::{AdminConfig, Config};
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use super::{EX_DATAERR, EX_NOPERM, EX_TEMPFAIL, EX_UNAVAILABLE};

/// Longest wait for connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for each read or write, unless [`ApiClient::with_timeout`] says otherwise.
const TIMEOUT: Duration = Duration::from_secs(60);
/// [`AdminClient`]'s wait for each read or write: bouncing or deleting many messages takes a
/// while, one fsync round per message.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

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
    /// means loopback) and the token in `TERN_TOKEN` when set (a scoped `[[admin.tokens]]`
    /// secret), else the one in its token file. Errors name the config key.
    pub fn from_config(admin: &AdminConfig) -> Result<ApiClient, String> {
        if let Some(token) = std::env::var("TERN_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
        {
            return Ok(ApiClient::new(address_of(admin), token.trim()));
        }
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

/// Why an [`AdminClient`] call failed.
#[derive(Debug)]
pub enum CallError {
    /// Nothing listens on `admin.address`: the daemon is not running (or elsewhere).
    Unreachable(String),
    /// The API answered with an error status and message.
    Api { status: u16, message: String },
    /// Anything else: no token file, a broken answer.
    Other(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(m) | CallError::Other(m) => f.write_str(m),
            CallError::Api { status, message } => write!(f, "{message} (HTTP {status})"),
        }
    }
}

/// Prints a command's answer and returns its exit code; an error goes to stderr with the
/// sysexits code that says what went wrong (daemon down, permission, bad request, other).
pub fn print_answer(result: Result<String, CallError>) -> ExitCode {
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(err @ CallError::Unreachable(_)) => {
            eprintln!("tern: {err}");
            ExitCode::from(EX_TEMPFAIL)
        }
        Err(err @ CallError::Api { status, .. }) if status == 401 || status == 403 => {
            eprintln!("tern: {err}");
            ExitCode::from(EX_NOPERM)
        }
        Err(err @ CallError::Api { status, .. }) if (400..500).contains(&status) => {
            eprintln!("tern: {err}");
            ExitCode::from(EX_DATAERR)
        }
        Err(err) => {
            eprintln!("tern: {err}");
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// The CLI's client: one blocking call per command, the token read afresh each time.
pub struct AdminClient {
    admin: AdminConfig,
}

impl AdminClient {
    pub fn new(config: &Config) -> AdminClient {
        AdminClient {
            admin: config.admin.clone(),
        }
    }

    /// One request to `/api/v1{path}` with a raw body (CSV import); returns the raw answer
    /// (CSV export), or the API's error.
    pub fn call_raw(&self, method: &str, path: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        let address = address_of(&self.admin);
        let mut client = ApiClient::from_config(&self.admin)
            .map_err(CallError::Other)?
            .with_timeout(ANSWER_TIMEOUT);
        client.connect().map_err(|e| {
            CallError::Unreachable(format!(
                "cannot reach the daemon's admin API at {address} (admin.address): {e}"
            ))
        })?;
        let (status, answer) = client
            .call_raw(method, &format!("/api/v1{path}"), body)
            .map_err(|e| CallError::Other(format!("admin API: {e}")))?;
        if (200..300).contains(&status) {
            Ok(answer)
        } else {
            let message = serde_json::from_slice::<Value>(&answer)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
            Err(CallError::Api { status, message })
        }
    }

    /// One request to `/api/v1{path}`; `body` is sent as JSON. Returns the answer's JSON.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
        let address = address_of(&self.admin);
        let unreachable = |e: std::io::Error| {
            CallError::Unreachable(format!(
                "cannot reach the daemon's admin API at {address} (admin.address): {e}"
            ))
        };
        let mut client = match ApiClient::from_config(&self.admin) {
            Ok(client) => client.with_timeout(ANSWER_TIMEOUT),
            // Without a token no call can succeed; but a daemon that is not running is still
            // worth telling apart, for the commands that can read its spool instead.
            Err(why) => {
                return Err(
                    match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
                        Ok(_) => CallError::Other(why),
                        Err(e) => unreachable(e),
                    },
                )
            }
        };
        client.connect().map_err(unreachable)?;
        let answer = client
            .call(method, &format!("/api/v1{path}"), body)
            .map_err(|e| CallError::Other(format!("admin API: {e}")))?;
        if (200..300).contains(&answer.status) {
            Ok(answer.body)
        } else {
            Err(CallError::Api {
                status: answer.status,
                message: answer.error(),
            })
        }
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
pub fn query_value(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(query_value("a+b@x.test"), "a%2Bb%40x.test");
        assert_eq!(query_value(""), "");
    }
}
