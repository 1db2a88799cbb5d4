//! Passwords for SMTP AUTH: argon2id hashing, verification, and the table of configured users.
//!
//! Only PHC hash strings are ever stored; the config refuses plaintext passwords. Verification
//! deliberately costs tens of milliseconds of CPU (more in debug builds) and, with the default
//! parameters, 19 MiB of memory, so async callers go through a [`Verifier`]: it runs checks on
//! blocking threads, never on a runtime worker, and at most its cap at a time, so a flood of
//! AUTH attempts waits for a permit (holding no thread) instead of taking every blocking
//! thread and the memory with them.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tokio::sync::Semaphore;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::rngs::OsRng;

use crate::config::AuthConfig;

/// A hash made with the default parameters, checked against when the user is unknown so that
/// a failed login takes as long whether or not the user exists. Its password is irrelevant.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$u32mMQR6nyVG+nC0zy24Ew$ua9T6X8dt6Cw5HXraJVTWm5YlGWX55XtI/xTd+Ig+Rc";

/// Hashes `password` with argon2id, the crate's default parameters and a random salt, as a PHC
/// string (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters and a generated salt cannot fail")
        .to_string()
}

/// Whether `password` matches the PHC string `phc`; a malformed `phc` never matches.
/// Slow by design: see the module docs.
pub fn verify_password(phc: &str, password: &str) -> bool {
    // Argon2::default() only supplies the algorithm implementation: variant, version and cost
    // are taken from the PHC string itself.
    PasswordHash::new(phc).is_ok_and(|hash| {
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

/// The configured users: name -> PHC hash. Names are case-sensitive, as SASL PLAIN/LOGIN send them.
#[derive(Clone, Default)]
pub struct Credentials {
    users: HashMap<String, String>,
}

impl Credentials {
    pub fn from_config(config: &AuthConfig) -> Self {
        let users = config
            .users
            .iter()
            .map(|u| (u.name.clone(), u.password_hash.clone()))
            .collect();
        Credentials { users }
    }

    /// No users configured: AUTH should not be advertised.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` exists and `password` is theirs. Slow by design: see the module docs.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(phc) => verify_password(phc, password),
            None => {
                // Spend the same time as for a real user, so timing does not reveal who exists.
                verify_password(DUMMY_HASH, password);
                false
            }
        }
    }
}

/// Runs password checks on blocking threads, at most `cap` at a time (see the module docs).
///
/// Invariant: a permit is held by the blocking closure itself, so a check whose caller went
/// away (the client disconnected) still counts until it has finished.
pub struct Verifier {
    permits: Arc<Semaphore>,
}

impl Verifier {
    /// At most `cap` (at least 1) checks at once.
    pub fn new(cap: usize) -> Verifier {
        Verifier {
            permits: Arc::new(Semaphore::new(cap.max(1))),
        }
    }

    /// Whether `user` exists in `credentials` and `password` is theirs.
    pub async fn verify(
        &self,
        credentials: Arc<Credentials>,
        user: String,
        password: String,
    ) -> bool {
        self.run(move || credentials.verify(&user, &password))
            .await
            .unwrap_or(false)
    }

    /// Runs `check` on a blocking thread once a permit is free; `None` if it panicked.
    async fn run<T: Send + 'static>(
        &self,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            check()
        })
        .await
        .ok()
    }
}

/// Hand-written so the hashes stay out of logs.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.users.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Credentials")
            .field("users", &names)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthUser;
    use argon2::{Algorithm, Params, Version};

    /// Cheap parameters (m=8 KiB, t=1), so tests that only need *a* valid hash stay fast.
    fn cheap_hash(password: &str) -> String {
        let params = Params::new(8, 1, 1, None).unwrap();
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn hash_and_verify_round_trip() {
        let phc = hash_password("correct horse");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        crate::config::check_password_hash(&phc).unwrap();
        assert!(verify_password(&phc, "correct horse"));
        assert!(!verify_password(&phc, "correct horse "));
        assert!(!verify_password("not a hash", "correct horse"));
        assert_ne!(phc, hash_password("correct horse"), "salts must differ");
    }

    #[test]
    fn dummy_hash_uses_default_parameters() {
        // If argon2's defaults change, the dummy must follow or unknown users become detectable.
        let hash = PasswordHash::new(DUMMY_HASH).unwrap();
        let (params, default) = (Params::try_from(&hash).unwrap(), Params::default());
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (default.m_cost(), default.t_cost(), default.p_cost())
        );
        assert_eq!(hash.algorithm, Algorithm::default().ident());
    }

    #[test]
    fn check_hash_refuses_non_argon2() {
        assert!(crate::config::check_password_hash("hunter2")
            .unwrap_err()
            .starts_with("not a PHC hash string"));
        let scrypt = "$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E";
        assert!(crate::config::check_password_hash(scrypt)
            .unwrap_err()
            .contains("not argon2id"));
        assert!(crate::config::check_password_hash(&cheap_hash("x")).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifications_run_at_most_cap_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let verifier = Arc::new(Verifier::new(2));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let checks: Vec<_> = (0..8)
            .map(|_| {
                let (verifier, running, most) = (verifier.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    verifier
                        .run(move || {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            running.fetch_sub(1, Ordering::SeqCst);
                        })
                        .await
                })
            })
            .collect();
        for check in checks {
            assert_eq!(check.await.unwrap(), Some(()));
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "{most:?} at once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_verification_keeps_its_permit_until_it_ends() {
        let verifier = Arc::new(Verifier::new(1));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started, is_started) = tokio::sync::oneshot::channel::<()>();
        let caller = tokio::spawn({
            let verifier = verifier.clone();
            async move {
                verifier
                    .run(move || {
                        let _ = started.send(());
                        let _ = wait.recv();
                    })
                    .await
            }
        });
        is_started.await.unwrap();
        // The client went away: its session future is dropped, the check goes on.
        caller.abort();
        let _ = caller.await;
        assert_eq!(verifier.permits.available_permits(), 0);
        release.send(()).unwrap();
        assert_eq!(verifier.run(|| 7).await, Some(7), "the permit came back");
    }

    #[test]
    fn credentials() {
        let config = AuthConfig {
            users: vec![AuthUser {
                name: "alice".to_owned(),
                password_hash: cheap_hash("wonderland"),
            }],
        };
        let credentials = Credentials::from_config(&config);
        assert!(!credentials.is_empty());
        assert!(credentials.verify("alice", "wonderland"));
        assert!(!credentials.verify("alice", "Wonderland"));
        assert!(!credentials.verify("Alice", "wonderland"));
        assert!(!credentials.verify("mallory", "wonderland"));
        assert_eq!(
            format!("{credentials:?}"),
            "Credentials { users: [\"alice\"] }"
        );
        assert!(Credentials::default().is_empty());
    }
}
