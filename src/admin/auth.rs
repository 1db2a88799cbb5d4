//! The admin API's bearer token: loaded from `admin.token_file` at start (created with a
//! random token, mode 0600, when the file does not exist) and checked on every `/api/v1` call.
//!
//! Invariant: a request reaches an API handler only if its `Authorization: Bearer` token
//! equals the configured one (compared in constant time); otherwise it gets 401.

use super::error::ApiError;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::Arc;

/// The configured token, shared by the middleware.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    /// Reads the token from `path`, or creates the file with a fresh random token.
    /// Errors name the config key, for the operator.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Token> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let token = text.trim();
                anyhow::ensure!(
                    token.len() >= 16,
                    "admin.token_file: {} holds a token shorter than 16 characters",
                    path.display()
                );
                Ok(Token(token.into()))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let token = random_token();
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        anyhow::anyhow!("admin.token_file: cannot create {}: {e}", dir.display())
                    })?;
                }
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| {
                        anyhow::anyhow!("admin.token_file: cannot create {}: {e}", path.display())
                    })?;
                writeln!(file, "{token}").map_err(|e| {
                    anyhow::anyhow!("admin.token_file: cannot write {}: {e}", path.display())
                })?;
                tracing::info!(path = %path.display(), "admin API token created");
                Ok(Token(token.into()))
            }
            Err(err) => Err(anyhow::anyhow!(
                "admin.token_file: cannot read {}: {err}",
                path.display()
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn matches(&self, presented: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(self.0.as_bytes(), presented.as_bytes())
            .is_ok()
    }
}

/// 32 random bytes, hex: 256 bits, safe in a header and a shell.
fn random_token() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Middleware: 401 unless the request carries the configured bearer token; 503 when the API
/// is disabled (no `admin.token_file`).
pub async fn require_token(
    State(token): State<Option<Token>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(token) = token else {
        return Err(ApiError::unavailable(
            "the admin API is disabled: set admin.token_file",
        ));
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(presented) if token.matches(presented) => Ok(next.run(request).await),
        Some(_) => Err(ApiError::unauthorized("invalid bearer token")),
        None => Err(ApiError::unauthorized(
            "missing \"Authorization: Bearer <token>\" header",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reads_the_same_token_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin.token");
        let created = Token::load_or_create(&path).unwrap();
        assert_eq!(created.as_str().len(), 64);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let read = Token::load_or_create(&path).unwrap();
        assert_eq!(read.as_str(), created.as_str());
        assert!(read.matches(created.as_str()));
        assert!(!read.matches("wrong"));
    }

    #[test]
    fn short_token_is_refused_with_the_key_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "short\n").unwrap();
        let err = Token::load_or_create(&path).err().unwrap().to_string();
        assert!(err.starts_with("admin.token_file:"), "{err}");
    }
}
