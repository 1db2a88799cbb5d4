//! The admin API's bearer tokens: the full-rights token of `admin.token_file` (loaded at start,
//! created with a random token, mode 0600, when the file does not exist) and the scoped
//! `[[admin.tokens]]` (name, SHA-256 of the secret, scopes; reloaded live), checked on every
//! `/api/v1` call.
//!
//! Invariants: a request reaches an API handler only if its `Authorization: Bearer` token is
//! one of them (compared in constant time; otherwise 401) and that token has the scope the
//! call needs ([`required_scope`]; otherwise 403). Every call that changes something (any
//! method but GET/HEAD) is logged with the token's name, target `tern::audit`.

use super::error::ApiError;
use super::AdminState;
use crate::config::{AdminToken, Scope};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
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

    /// The SHA-256 of a secret, as `secret_sha256` of `[[admin.tokens]]` holds it (hex).
    pub fn sha256_hex(secret: &str) -> String {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
        data_encoding::HEXLOWER.encode(digest.as_ref())
    }

    fn matches(&self, presented: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(self.0.as_bytes(), presented.as_bytes())
            .is_ok()
    }
}

/// 32 random bytes, hex: 256 bits, safe in a header and a shell.
pub fn random_token() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Who made an API call: the token's name and scopes (in the request's extensions once
/// [`require_token`] let it through).
#[derive(Debug, Clone)]
pub struct Principal {
    /// `token_file` for the full-rights token of `admin.token_file`, else the
    /// `[[admin.tokens]]` entry's name.
    pub name: String,
    pub scopes: Vec<Scope>,
}

/// The name the audit log gives the `admin.token_file` token.
pub const TOKEN_FILE_NAME: &str = "token_file";

impl Principal {
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }
}

/// Which token `presented` is: the token file's (every right) or a `[[admin.tokens]]` entry
/// whose SHA-256 matches (compared in constant time; the secrets are 256-bit random, so one
/// SHA-256 is enough and keeps a call cheap, unlike a password hash).
pub fn identify(
    token_file: Option<&Token>,
    tokens: &[AdminToken],
    presented: &str,
) -> Option<Principal> {
    if token_file.is_some_and(|t| t.matches(presented)) {
        return Some(Principal {
            name: TOKEN_FILE_NAME.to_owned(),
            scopes: vec![Scope::Admin],
        });
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, presented.as_bytes());
    tokens
        .iter()
        .find(|t| {
            aws_lc_rs::constant_time::verify_slices_are_equal(&t.secret_sha256, digest.as_ref())
                .is_ok()
        })
        .map(|t| Principal {
            name: t.name.clone(),
            scopes: t.scopes.clone(),
        })
}

/// The scope a call needs, from its method and its path under `/api/v1`: every `GET` reads;
/// a write needs the scope of its area; a write to an area no scope names needs `admin`.
pub fn required_scope(method: &Method, path: &str) -> Scope {
    if method == Method::GET || method == Method::HEAD {
        return Scope::Read;
    }
    let area = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match area {
        "inject" => Scope::Inject,
        // Reads files on this host (the peer's credentials) and empties the queue.
        "queue" if path == "/queue/drain" => Scope::Admin,
        "queue" => Scope::Queue,
        "suppressions" => Scope::Suppression,
        "events" | "sendtime" | "recipients" | "campaigns" => Scope::Campaigns,
        _ => Scope::Admin,
    }
}

/// Middleware: 401 unless the request carries a known bearer token, 403 unless that token
/// has the call's scope ([`required_scope`]); 503 when the API is disabled (neither
/// `admin.token_file` nor `[[admin.tokens]]`). Every call that is not a `GET` is written to the
/// log (target `tern::audit`) with the token's name, the method, the path and the status,
/// refused ones included.
pub async fn require_token(
    State(state): State<AdminState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let edge = state.edge.get();
    if state.token.is_none() && edge.tokens.is_empty() {
        return Err(ApiError::unavailable(
            "the admin API is disabled: set admin.token_file or [[admin.tokens]]",
        ));
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mutating = method != Method::GET && method != Method::HEAD;
    let principal = match presented {
        Some(presented) => identify(state.token.as_ref(), &edge.tokens, presented),
        None => {
            return Err(ApiError::unauthorized(
                "missing \"Authorization: Bearer <token>\" header",
            ))
        }
    };
    let Some(principal) = principal else {
        if mutating {
            tracing::warn!(target: "tern::audit", token = "-", %method, path = %format!("/api/v1{path}"), status = 401, "admin call refused: unknown token");
        }
        return Err(ApiError::unauthorized("invalid bearer token"));
    };
    let scope = required_scope(&method, &path);
    if !principal.may(scope) {
        if mutating {
            tracing::warn!(target: "tern::audit", token = %principal.name, %method, path = %format!("/api/v1{path}"), status = 403, "admin call refused: scope");
        }
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} lacks the {:?} scope this call needs",
                principal.name,
                scope.name()
            ),
        ));
    }
    let name = principal.name.clone();
    request.extensions_mut().insert(principal);
    let response = next.run(request).await;
    if mutating {
        tracing::info!(target: "tern::audit", token = %name, %method, path = %format!("/api/v1{path}"), status = response.status().as_u16(), "admin call");
    }
    Ok(response)
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
    fn writes_need_the_scope_of_their_area_and_admin_has_every_right() {
        use Scope::*;
        let cases = [
            (Method::GET, "/queue/summary", Read),
            (Method::GET, "/suppressions/export", Read),
            (Method::POST, "/inject", Inject),
            (Method::POST, "/queue/hold", Queue),
            (Method::POST, "/queue/drain", Admin),
            (Method::POST, "/suppressions/import", Suppression),
            (Method::DELETE, "/suppressions/a@b.test", Suppression),
            (Method::POST, "/events", Campaigns),
            (Method::POST, "/sendtime/refit", Campaigns),
            (Method::DELETE, "/recipients/a@b.test", Campaigns),
            (Method::POST, "/campaigns", Campaigns),
            (Method::PATCH, "/campaigns/c/pause", Campaigns),
            (Method::GET, "/campaigns/c/results", Read),
            (Method::POST, "/something-new", Admin),
            (Method::PUT, "/status", Admin),
        ];
        for (method, path, scope) in cases {
            assert_eq!(required_scope(&method, path), scope, "{method} {path}");
        }
        let tokens = [AdminToken {
            name: "app".into(),
            secret_sha256: <[u8; 32]>::try_from(
                data_encoding::HEXLOWER
                    .decode(Token::sha256_hex("s3cret-s3cret-s3cret").as_bytes())
                    .unwrap(),
            )
            .unwrap(),
            scopes: vec![Inject],
        }];
        let file = Token("file-token-0123456789".into());
        let app = identify(Some(&file), &tokens, "s3cret-s3cret-s3cret").unwrap();
        assert_eq!(app.name, "app");
        assert!(app.may(Inject) && !app.may(Read) && !app.may(Queue));
        let root = identify(Some(&file), &tokens, "file-token-0123456789").unwrap();
        assert_eq!(root.name, TOKEN_FILE_NAME);
        assert!(Scope::ALL.iter().all(|&s| root.may(s)));
        assert!(identify(Some(&file), &tokens, "s3cret-s3cret-s3cre").is_none());
        assert!(identify(None, &[], "file-token-0123456789").is_none());
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
