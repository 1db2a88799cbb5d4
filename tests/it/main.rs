//! Integration tests of tern: real sockets on 127.0.0.1, a real spool in a temp dir, real
//! TLS, the in-process daemon and the real binary. One test binary (`cargo test --test it`).

mod dns_server;
mod dsn;
mod edge;
mod harness;
mod sink;

mod admin_api;
mod admin_auth;
mod admin_scopes;
mod bdat;
mod bounce;
mod cli;
mod client;
mod config_lookup;
mod console;
mod crash;
mod delivery;
mod delivery_crash;
mod delivery_mx;
mod delivery_tls;
mod dialogue;
mod dkim;
mod durability;
mod fuzz;
mod health;
mod inject;
mod limits;
mod logs;
mod metrics;
mod mta_sts;
mod python_client;
mod reload;
mod routing;
mod sendtime;
mod shaping;
mod shaping_shared;
mod shutdown;
mod sidecar;
mod sidecar_scale;
mod smuggling;
mod suppression;
mod systemd;
mod tls_auth;
mod unsubscribe;
