//! Where tern finds its config file, and where the paths inside it point.
//!
//! Lookup ([`locate`]): `--config`, else `TERN_CONFIG`, else `/etc/tern/tern.toml`, else
//! `./config/tern.toml` (a checkout of the repository). The first place that is *named*
//! (`--config`, `TERN_CONFIG`) wins even when the file is missing, so a typo is reported
//! instead of silently falling back to another file; of the two conventional places, the
//! first that exists wins. When none does, the error lists every place tried.
//!
//! Relative paths inside a config file (and the relative defaults, `./data/spool`, ...) are
//! resolved against the directory of that file ([`Config::rebase`]), so a command behaves
//! the same from any working directory: `tern queue summary` run from `/root` reads the same
//! spool and token as the service does.

use super::Config;
use std::path::{Path, PathBuf};

/// The environment variable naming the config file when `--config` is not given.
pub const ENV: &str = "TERN_CONFIG";
/// The conventional places, in order, tried when neither `--config` nor `TERN_CONFIG` is set.
pub const DEFAULT_PLACES: [&str; 2] = ["/etc/tern/tern.toml", "./config/tern.toml"];

/// The config file to read: `explicit` (`--config`), else `env` (`TERN_CONFIG`, empty counts
/// as unset), else the first of `places` that exists. `Err` names every place tried.
pub fn locate(
    explicit: Option<&Path>,
    env: Option<&str>,
    places: &[&str],
) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = env.filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    if let Some(found) = places.iter().map(Path::new).find(|p| p.is_file()) {
        return Ok(found.to_path_buf());
    }
    let mut tried = vec![
        "--config (not given)".to_owned(),
        format!("{ENV} (not set)"),
    ];
    tried.extend(places.iter().map(|p| format!("{p} (no such file)")));
    Err(format!(
        "no configuration file found; tried: {}",
        tried.join(", ")
    ))
}

/// [`locate`] with this process's `TERN_CONFIG` and the conventional places.
pub fn locate_from_env(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let env = std::env::var(ENV).ok();
    locate(explicit, env.as_deref(), &DEFAULT_PLACES)
}

impl Config {
    /// Makes every relative path of the config (given or defaulted) relative to `dir`, the
    /// config file's directory. Absolute paths are left alone.
    pub fn rebase(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        let fix_opt = |p: &mut Option<PathBuf>| {
            if let Some(p) = p {
                fix(p);
            }
        };
        if let Some(tls) = &mut self.tls {
            fix(&mut tls.cert_path);
            fix(&mut tls.key_path);
        }
        fix(&mut self.spool.path);
        fix_opt(&mut self.admin.token_file);
        fix_opt(&mut self.delivery.log_path);
        fix_opt(&mut self.delivery.dnssec_trust_anchor);
        for route in &mut self.routes {
            if let Some(auth) = &mut route.auth {
                fix(&mut auth.password_file);
            }
        }
        for dkim in &mut self.dkim {
            fix(&mut dkim.key_path);
        }
        fix_opt(&mut self.bounce.rules);
        fix_opt(&mut self.bounce.verp_key_file);
        fix_opt(&mut self.bounce.origin_key_file);
        for hook in &mut self.webhooks {
            fix(&mut hook.secret_file);
            fix_opt(&mut hook.ca_file);
        }
        if let Some(tracking) = &mut self.sidecar.tracking {
            fix(&mut tracking.secret_file);
        }
        fix_opt(&mut self.unsubscribe.key_file);
        if let Some(cluster) = &mut self.cluster {
            fix_opt(&mut cluster.password_file);
            fix_opt(&mut cluster.ca_file);
        }
        if let Some(shared) = &mut self.shaping.shared {
            fix_opt(&mut shared.password_file);
            fix_opt(&mut shared.ca_file);
        }
        if let Some(model) = &mut self.sidecar.model {
            fix_opt(&mut model.ca_file);
        }
    }
}

/// The directory relative paths of the config at `path` resolve against: its parent, made
/// absolute (without resolving symlinks) so the paths stay right if the process changes
/// directory.
pub(super) fn base_dir(path: &Path) -> PathBuf {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_places_win_even_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc.toml");
        std::fs::write(&etc, "").unwrap();
        let places = [etc.to_str().unwrap()];
        assert_eq!(
            locate(Some(Path::new("/x/a.toml")), Some("/y/b.toml"), &places).unwrap(),
            Path::new("/x/a.toml")
        );
        assert_eq!(
            locate(None, Some("/y/b.toml"), &places).unwrap(),
            Path::new("/y/b.toml")
        );
        assert_eq!(locate(None, Some(""), &places).unwrap(), etc);
        assert_eq!(locate(None, None, &places).unwrap(), etc);
    }

    #[test]
    fn the_first_existing_place_wins_and_the_error_names_every_place() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
        std::fs::write(&second, "").unwrap();
        let places = [first.to_str().unwrap(), second.to_str().unwrap()];
        assert_eq!(locate(None, None, &places).unwrap(), second);
        std::fs::remove_file(&second).unwrap();
        let err = locate(None, None, &places).unwrap_err();
        for place in ["--config", "TERN_CONFIG", places[0], places[1]] {
            assert!(err.contains(place), "{place} not in: {err}");
        }
    }

    #[test]
    fn every_path_key_resolves_against_the_config_directory() {
        let dir = tempfile::tempdir().unwrap();
        // Every key holding a path, relative; the two written `off` or absent get defaults.
        let text = r#"
            [[listeners]]
            address = "127.0.0.1:2525"
            [tls]
            cert = "rel/cert.pem"
            key = "rel/key.pem"
            [spool]
            path = "rel/spool"
            [admin]
            token_file = "rel/admin.token"
            [delivery]
            log_path = "rel/delivery.log"
            [bounce]
            domains = ["bounce.example.com"]
            rules = "rel/rules.toml"
            verp_key_file = "rel/verp.key"
            origin_key_file = "rel/origin.key"
            [sidecar.tracking]
            base_url = "https://t.example.com"
            secret_file = "rel/tracking.key"
            [[webhooks]]
            url = "https://hooks.example.com/tern"
            secret_file = "rel/webhook.key"
            ca_file = "rel/ca.pem"
            [[routes]]
            domain = "*"
            hosts = ["relay.example.com:587"]
            [routes.auth]
            username = "tern"
            password_file = "rel/relay.pass"
            [[dkim]]
            domain = "example.com"
            selector = "s1"
            key = "rel/dkim.pem"
        "#;
        let path = dir.path().join("tern.toml");
        std::fs::write(&path, text).unwrap();
        let config = Config::load(&path).unwrap();
        // Every PathBuf in the config shows in its Debug text; none may stay relative.
        let debug = format!("{config:?}");
        let base = dir.path().display().to_string();
        let count = debug.matches("rel/").count();
        assert_eq!(count, text.matches("rel/").count(), "{debug}");
        assert_eq!(
            debug.matches(&format!("{base}/rel/")).count(),
            count,
            "a path stayed relative: {debug}"
        );

        // Defaults are relative too (./data/spool) and resolve the same way.
        std::fs::write(&path, "[[listeners]]\naddress = \"127.0.0.1:2525\"\n").unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.spool.path, dir.path().join("./data/spool"));
        assert_eq!(
            config.origin_key_path(),
            dir.path().join("./data/origin.key")
        );
        // Absolute paths stay as written.
        std::fs::write(
            &path,
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n[spool]\npath = \"/var/lib/tern/spool\"\n",
        )
        .unwrap();
        assert_eq!(
            Config::load(&path).unwrap().spool.path,
            Path::new("/var/lib/tern/spool")
        );
    }
}
