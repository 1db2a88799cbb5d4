//! Console sessions: a login with a token creates one; the browser holds only its random id
//! (cookie `tern_console`, HttpOnly, SameSite=Strict, Secure behind TLS), never the token.
//!
//! Invariants: a session is kept in memory only (a restart ends them all) and names the token
//! it was opened with by its name and the SHA-256 of its secret, never the secret; it is
//! honoured only while that token still exists with that secret ([`Sessions::get`] is handed
//! the current fingerprint, so removing or rotating the token in a reload ends its sessions),
//! and until it expires ([`SESSION_TTL`]) or logs out. At most [`MAX_SESSIONS`] are kept (the
//! one expiring first is dropped for a new one). Each session has its own CSRF token, which
//! every form that changes something carries.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// How long a session lasts from login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once.
pub const MAX_SESSIONS: usize = 1024;
/// The session cookie's name.
pub const COOKIE: &str = "tern_console";

/// One open session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The token's name (`token_file` or the `[[admin.tokens]]` entry's).
    pub token: String,
    /// SHA-256 of the token's secret at login.
    pub fingerprint: [u8; 32],
    pub expires_ms: u64,
    /// The forms' CSRF token (random, per session).
    pub csrf: String,
}

#[derive(Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens a session for token `name` (whose secret hashes to `fingerprint`) at `now_ms`;
    /// returns its id (the cookie's value).
    pub fn open(&self, name: &str, fingerprint: [u8; 32], now_ms: u64) -> String {
        let id = crate::admin::auth::random_token();
        let session = Session {
            token: name.to_owned(),
            fingerprint,
            expires_ms: now_ms.saturating_add(SESSION_TTL.as_millis() as u64),
            csrf: crate::admin::auth::random_token(),
        };
        let mut open = self.lock();
        open.retain(|_, s| s.expires_ms > now_ms);
        if open.len() >= MAX_SESSIONS {
            let first = open
                .iter()
                .min_by_key(|(_, s)| s.expires_ms)
                .map(|(id, _)| id.clone());
            if let Some(first) = first {
                open.remove(&first);
            }
        }
        open.insert(id.clone(), session);
        id
    }

    /// The session `id` at `now_ms`, if it exists, has not expired and its token still has the
    /// secret it logged in with (`current` maps a token name to its fingerprint now, `None`
    /// when no such token exists any more). A session that fails is forgotten.
    pub fn get(
        &self,
        id: &str,
        now_ms: u64,
        current: impl FnOnce(&str) -> Option<[u8; 32]>,
    ) -> Option<Session> {
        let mut open = self.lock();
        let session = open.get(id)?.clone();
        let valid = session.expires_ms > now_ms
            && current(&session.token).is_some_and(|f| {
                aws_lc_rs::constant_time::verify_slices_are_equal(&f, &session.fingerprint).is_ok()
            });
        if !valid {
            open.remove(id);
            return None;
        }
        Some(session)
    }

    /// Logs out: the session ends now.
    pub fn close(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `presented` is `expected` (constant time).
pub fn csrf_matches(expected: &str, presented: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_bytes(), presented.as_bytes())
        .is_ok()
}

/// The session id in a `Cookie` header's value, if any.
pub fn cookie_value(header: &str) -> Option<&str> {
    header.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE && !value.is_empty()).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: [u8; 32] = [7; 32];

    #[test]
    fn a_session_lasts_until_expiry_logout_or_a_changed_token() {
        let s = Sessions::default();
        let id = s.open("ops", F, 1000);
        assert_eq!(id.len(), 64);
        let got = s.get(&id, 2000, |n| (n == "ops").then_some(F)).unwrap();
        assert_eq!(got.token, "ops");
        assert_eq!(got.csrf.len(), 64);
        // Rotated secret (a reload with a new secret_sha256): the session ends for good.
        assert!(s.get(&id, 2000, |_| Some([8; 32])).is_none());
        assert!(s.get(&id, 2000, |_| Some(F)).is_none(), "forgotten");
        // Removed token.
        let id = s.open("ops", F, 1000);
        assert!(s.get(&id, 2000, |_| None).is_none());
        // Expiry.
        let id = s.open("ops", F, 1000);
        let end = 1000 + SESSION_TTL.as_millis() as u64;
        assert!(s.get(&id, end - 1, |_| Some(F)).is_some());
        assert!(s.get(&id, end, |_| Some(F)).is_none());
        // Logout.
        let id = s.open("ops", F, 1000);
        s.close(&id);
        assert!(s.get(&id, 1001, |_| Some(F)).is_none());
        assert!(s.get("made-up", 1001, |_| Some(F)).is_none());
    }

    #[test]
    fn the_store_is_bounded_and_drops_the_first_to_expire() {
        let s = Sessions::default();
        let first = s.open("a", F, 0);
        for i in 1..MAX_SESSIONS as u64 + 5 {
            s.open("a", F, i);
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.get(&first, 10, |_| Some(F)).is_none());
    }

    #[test]
    fn cookies_and_csrf() {
        assert_eq!(cookie_value("a=1; tern_console=abc; b=2"), Some("abc"));
        assert_eq!(cookie_value("tern_console="), None);
        assert_eq!(cookie_value("xtern_console=abc"), None);
        assert!(csrf_matches("abc", "abc"));
        assert!(!csrf_matches("abc", "abd"));
        assert!(!csrf_matches("abc", ""));
    }
}
