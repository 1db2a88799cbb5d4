//! Secret files (keys, tokens and passwords tern signs, checks or logs in with): read one, or
//! create it at the first start with 32 random bytes written as hex, mode 0600, synced before
//! use; and [`check_private`], the mode check every secret file named by the config passes
//! at start, at `tern check-config` and at a reload.
//!
//! Invariant: tern never uses a secret that other users of the machine can read (or change):
//! a file with any group or other permission bit is refused, as ssh refuses a private key.
//!
//! Floor 0: imports nothing of the crate. Errors name the config key and the path.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use rand::RngCore as _;

/// Refuses a secret file whose mode gives the group or others any access (`key` is the
/// config key that names it, for the error, which says how to fix it). A file that does not
/// exist passes: tern creates its own secrets with mode 0600, and whoever reads a file that
/// must exist reports it missing.
pub fn check_private(path: &Path, key: &str) -> Result<(), String> {
    let mode = match std::fs::metadata(path) {
        Ok(meta) => meta.permissions().mode() & 0o777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{key}: {}: {e}", path.display())),
    };
    if mode & 0o077 == 0 {
        return Ok(());
    }
    Err(format!(
        "{key}: {path}: mode {mode:04o} lets other users {what} it; a secret must be readable \
         by tern's user only: run `chmod 600 {path}`",
        path = path.display(),
        what = if mode & 0o044 != 0 { "read" } else { "change" },
    ))
}

/// The secret in `path` (surrounding whitespace removed), created when the file does not
/// exist; `key` is the config key that names the file (for errors). A secret shorter than
/// `min_len` bytes, or in a file other users can read ([`check_private`]), is refused.
pub fn read_or_create(path: &Path, key: &str, min_len: usize) -> Result<String, String> {
    let what = |e: std::io::Error| format!("{key}: {}: {e}", path.display());
    check_private(path, key)?;
    let secret = match std::fs::read_to_string(path) {
        Ok(s) => s.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(what)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(what)?;
            f.write_all(hex.as_bytes()).map_err(what)?;
            f.write_all(b"\n").map_err(what)?;
            f.sync_all().map_err(what)?;
            tracing::info!(path = %path.display(), key, "secret created");
            hex
        }
        Err(e) => return Err(what(e)),
    };
    if secret.len() < min_len {
        return Err(format!(
            "{key}: {}: the secret must be at least {min_len} characters",
            path.display()
        ));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_then_reads_the_same_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/a.key");
        let first = read_or_create(&path, "x.key_file", 32).unwrap();
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_or_create(&path, "x.key_file", 32).unwrap(), first);
        std::fs::write(&path, "short\n").unwrap();
        let err = read_or_create(&path, "x.key_file", 32).unwrap_err();
        assert!(err.starts_with("x.key_file: "), "{err}");
    }

    #[test]
    fn only_owner_only_modes_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        assert_eq!(check_private(&path, "k"), Ok(()), "a missing file passes");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o620, false),
            (0o644, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let result = check_private(&path, "bounce.verp_key_file");
            assert_eq!(result.is_ok(), ok, "{mode:o}: {result:?}");
            if let Err(e) = result {
                let shown = path.display().to_string();
                assert!(
                    e.starts_with(&format!("bounce.verp_key_file: {shown}: mode 0")),
                    "{e}"
                );
                assert!(e.contains(&format!("chmod 600 {shown}")), "{e}");
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            read_or_create(&path, "k", 32).is_err(),
            "read_or_create checks too"
        );
    }
}
