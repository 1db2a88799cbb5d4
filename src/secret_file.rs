//! Secret files (keys and tokens tern signs or checks with): read one, or create it at the
//! first start with 32 random bytes written as hex, mode 0600, synced before use.
//!
//! Floor 0: imports nothing of the crate. Errors name the config key and the path.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use rand::RngCore as _;

/// The secret in `path` (surrounding whitespace removed), created when the file does not
/// exist; `key` is the config key that names the file (for errors). A secret shorter than
/// `min_len` bytes is refused.
pub fn read_or_create(path: &Path, key: &str, min_len: usize) -> Result<String, String> {
    let what = |e: std::io::Error| format!("{key}: {}: {e}", path.display());
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
    use std::os::unix::fs::PermissionsExt as _;

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
}
