//! The secret files a config names (keys, tokens, passwords) and the check that no other
//! user of the machine can read them ([`crate::secret_file::check_private`]).
//!
//! Invariant: [`Config::secret_files`] lists every file whose content is a secret, with the
//! key path an operator would look for; a new secret-file key is added here, and so is
//! checked at start, by `tern check-config` and at a reload.

use std::path::{Path, PathBuf};

use super::{Config, ConfigErrors};

impl Config {
    /// Every secret file the config names, with its key path: `tls.key`, `admin.token_file`,
    /// `bounce.verp_key_file`, `bounce.origin_key_file` (or its default), the tracking key,
    /// each webhook's secret, each smarthost password and each DKIM key. (The model's API
    /// key comes from an environment variable, never a file.)
    pub fn secret_files(&self) -> Vec<(String, PathBuf)> {
        let mut files = Vec::new();
        let mut add = |key: String, path: &Path| files.push((key, path.to_path_buf()));
        if let Some(tls) = &self.tls {
            add("tls.key".into(), &tls.key_path);
        }
        if let Some(token) = &self.admin.token_file {
            add("admin.token_file".into(), token);
        }
        if let Some(verp) = &self.bounce.verp_key_file {
            add("bounce.verp_key_file".into(), verp);
        }
        add("bounce.origin_key_file".into(), &self.origin_key_path());
        add("unsubscribe.key_file".into(), &self.unsubscribe_key_path());
        if let Some(tracking) = &self.sidecar.tracking {
            add("sidecar.tracking.secret_file".into(), &tracking.secret_file);
        }
        for (i, hook) in self.webhooks.iter().enumerate() {
            add(format!("webhooks[{i}].secret_file"), &hook.secret_file);
        }
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(auth) = &route.auth {
                add(
                    format!("routes[{i}].auth.password_file"),
                    &auth.password_file,
                );
            }
        }
        for (i, dkim) in self.dkim.iter().enumerate() {
            add(format!("dkim[{i}].key"), &dkim.key_path);
        }
        if let Some(password) = self.cluster.as_ref().and_then(|c| c.password_file.as_ref()) {
            add("cluster.password_file".into(), password);
        }
        files
    }

    /// `unsubscribe.key_file`, or its default: `unsubscribe.key` beside the spool directory.
    pub fn unsubscribe_key_path(&self) -> PathBuf {
        match &self.unsubscribe.key_file {
            Some(path) => path.clone(),
            None => self.beside_spool("unsubscribe.key"),
        }
    }

    /// `name` in the directory that holds the spool directory.
    fn beside_spool(&self, name: &str) -> PathBuf {
        self.spool
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(name)
    }

    /// `bounce.origin_key_file`, or its default: `origin.key` beside the spool directory.
    pub fn origin_key_path(&self) -> PathBuf {
        match &self.bounce.origin_key_file {
            Some(path) => path.clone(),
            None => self.beside_spool("origin.key"),
        }
    }

    /// The keys tern creates at the first start when their file does not exist: the
    /// `X-Tern-Id` key, the unsubscribe key and the tracking key. In a fleet (`[cluster]`)
    /// every node must sign and check with the same ones, so none may be created by a node.
    pub fn generated_keys(&self) -> Vec<(&'static str, PathBuf)> {
        let mut keys = vec![
            ("bounce.origin_key_file", self.origin_key_path()),
            ("unsubscribe.key_file", self.unsubscribe_key_path()),
        ];
        if let Some(tracking) = &self.sidecar.tracking {
            keys.push(("sidecar.tracking.secret_file", tracking.secret_file.clone()));
        }
        keys
    }

    /// Refuses every secret file that other users can read or change, each error naming
    /// its key, its path and the `chmod 600` that fixes it. Files that do not exist pass
    /// (tern creates its own; a missing one that must exist is reported where it is read),
    /// except with `[cluster]`: then a key this node would generate is refused, because a
    /// key of its own would make its links, tokens and ids fail on every other node.
    pub fn check_secret_files(&self) -> Result<(), ConfigErrors> {
        let mut errors: Vec<String> = self
            .secret_files()
            .iter()
            .filter_map(|(key, path)| crate::secret_file::check_private(path, key).err())
            .collect();
        if self.cluster.is_some() {
            for (key, path) in self.generated_keys() {
                if !path.exists() {
                    errors.push(format!(
                        "{key}: {}: no such file; with [cluster] every node must use the same \
                         key, so this node will not generate its own: copy the file from \
                         another node (or create it once and install it on every node)",
                        path.display()
                    ));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn every_secret_key_is_listed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            path.display().to_string()
        };
        let text = format!(
            r#"
            server.hostname = "mx.example.com"
            [[listeners]]
            address = "127.0.0.1:2525"
            [tls]
            cert = "/nonexistent/cert.pem"
            key = {tls:?}
            [spool]
            path = {spool:?}
            [admin]
            token_file = {token:?}
            [bounce]
            domains = ["bounce.example.com"]
            verp_key_file = {verp:?}
            origin_key_file = {origin:?}
            [unsubscribe]
            key_file = {unsubscribe:?}
            [sidecar.tracking]
            base_url = "https://t.example.com"
            secret_file = {tracking:?}
            [[webhooks]]
            url = "https://hooks.example.com/tern"
            secret_file = {webhook:?}
            [[routes]]
            domain = "*"
            hosts = ["relay.example.com:587"]
            [routes.auth]
            username = "tern"
            password_file = {password:?}
            [[dkim]]
            domain = "example.com"
            selector = "s1"
            key = {dkim:?}
            "#,
            tls = file("tls.key"),
            spool = dir.path().join("spool").display().to_string(),
            token = file("admin.token"),
            verp = file("verp.key"),
            origin = file("origin.key"),
            unsubscribe = file("unsubscribe.key"),
            tracking = file("tracking.key"),
            webhook = file("webhook.key"),
            password = file("relay.pass"),
            dkim = file("dkim.pem"),
        );
        let config = Config::parse(&text).unwrap();
        let keys: Vec<String> = config.secret_files().into_iter().map(|(k, _)| k).collect();
        let expected = [
            "tls.key",
            "admin.token_file",
            "bounce.verp_key_file",
            "bounce.origin_key_file",
            "unsubscribe.key_file",
            "sidecar.tracking.secret_file",
            "webhooks[0].secret_file",
            "routes[0].auth.password_file",
            "dkim[0].key",
        ];
        assert_eq!(keys, expected);
        let errors = config.check_secret_files().unwrap_err().0;
        assert_eq!(errors.len(), expected.len(), "{errors:?}");
        for (error, key) in errors.iter().zip(expected) {
            assert!(error.starts_with(&format!("{key}: ")), "{error}");
            assert!(error.contains("chmod 600"), "{error}");
        }
        for (_, path) in config.secret_files() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(config.check_secret_files(), Ok(()));
    }

    #[test]
    fn in_a_cluster_a_node_never_generates_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = |cluster: bool| {
            format!(
                "server.hostname = \"mx.example.com\"\n[[listeners]]\naddress = \"127.0.0.1:2525\"\n\
                 [spool]\npath = {spool:?}\n[sidecar.tracking]\nbase_url = \"https://t.example.com\"\n\
                 secret_file = {tracking:?}\n{cluster}",
                spool = dir.path().join("spool").display().to_string(),
                tracking = dir.path().join("tracking.key").display().to_string(),
                cluster = if cluster {
                    "[cluster]\nurl = \"redis://127.0.0.1:1\"\n"
                } else {
                    ""
                },
            )
        };
        // Alone, a missing key is created at start: nothing to refuse.
        assert_eq!(
            Config::parse(&text(false)).unwrap().check_secret_files(),
            Ok(())
        );
        let fleet = Config::parse(&text(true)).unwrap();
        let errors = fleet.check_secret_files().unwrap_err().0;
        let keys: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "bounce.origin_key_file",
                "unsubscribe.key_file",
                "sidecar.tracking.secret_file"
            ]
        );
        assert!(errors[0].contains("[cluster]"), "{}", errors[0]);
        for (_, path) in fleet.generated_keys() {
            std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(fleet.check_secret_files(), Ok(()));
    }

    #[test]
    fn the_origin_key_defaults_beside_the_spool() {
        let config = Config::parse(
            "server.hostname = \"mx.example.com\"\n[[listeners]]\naddress = \"127.0.0.1:2525\"\n\
             [spool]\npath = \"/var/lib/tern/spool\"\n",
        )
        .unwrap();
        assert_eq!(
            config.origin_key_path(),
            PathBuf::from("/var/lib/tern/origin.key")
        );
    }
}
