//! Passwords for SMTP AUTH: argon2id hashing, verification, and the table of configured users.
//!
//! Only PHC hash strings are ever stored; the config refuses plaintext passwords. Verification
//! deliberately costs tens of milliseconds of CPU (more in debug builds), so async callers must
//! run [`verify_password`] and [`Credentials::verify`] inside `tokio::task::spawn_blocking`,
//! never directly on a runtime worker thread.

use std::collections::HashMap;
use std::fmt;

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
