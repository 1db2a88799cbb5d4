//! Integration tests of tern: real sockets on 127.0.0.1, a real spool in a temp dir, real
//! TLS, the in-process daemon and the real binary. One test binary (`cargo test --test it`).

mod dns_server;
mod dsn;
mod harness;
mod sink;

mod admin_auth;
mod bdat;
mod cli;
mod client;
mod crash;
mod delivery;
mod delivery_crash;
mod delivery_mx;
mod delivery_tls;
mod dialogue;
mod dkim;
mod durability;
mod fuzz;
mod limits;
mod metrics;
mod python_client;
mod routing;
mod shaping;
mod shutdown;
mod smuggling;
mod tls_auth;
