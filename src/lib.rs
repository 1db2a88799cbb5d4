//! tern: a high-throughput mail transfer and delivery engine.
//!
//! Layout (see docs/ARCHITECTURE.md for the data flow and invariants):
//! - [`config`]: TOML -> compiled [`config::Config`], every error with its key path.
//! - [`auth`]: password hashing and verification for SMTP AUTH users.
//! - [`bounce`]: bounce, complaint and auto-reply parsing and the one bounce taxonomy.
//! - [`smtp`]: the SMTP server: sans-IO protocol pieces, listeners and the session state machine.
//! - [`policy`]: relay access and per-message limits, answered as [`smtp::reply::Reply`] values.
//! - [`ingest`]: the "cleanup" stage: trace headers, split by destination, durable commit.
//! - [`sidecar`]: the pre-enqueue stage ingest runs first: control headers, campaign templates,
//!   generated slots, the variant bandit, tracking links.
//! - [`clock`]: the one clock arrival, due, retry and expiry times are read from.
//! - [`scheduler`]: ready queues per destination, due timers, workers, watchdog.
//! - [`delivery`]: routing (static routes, MX), the outbound SMTP client and pool, DKIM,
//!   one attempt of one envelope, the delivery log.
//! - [`outcome`]: per-recipient results applied to the spool, retries, expiry, DSNs.
//! - [`shaping`]: traffic shaping: per-provider/destination limits, source-IP pools, warm-up,
//!   adaptive backoff.
//! - [`admin`]: the admin HTTP server: `GET /metrics` (every Prometheus metric), the `/api/v1`
//!   API behind a bearer token (queue management, HTTP injection) and its client for the CLI.
//! - [`sidecar`]: pre-enqueue stages; today send-time optimisation (engagement events, the
//!   per-recipient `not_before`, the engagement score, the simulator).
//! - [`cli`]: the renderings behind `tern queue ...`.
//! - [`daemon`]: process lifecycle: open spool, start delivery, bind, sd_notify, signals, drain.
//! - [`notify`]: the systemd notification protocol (READY, RELOADING, STOPPING, WATCHDOG).
//! - [`live`]: [`live::Live`], a value a config reload replaces (snapshot per use).
//! - [`reload`]: what a SIGHUP changes live, what needs a restart, and the report.
//!
//! The durable spool is the separate crate `tern-queue`, the only code that touches sled.

pub mod admin;
pub mod auth;
pub mod bounce;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod events;
pub mod inbound;
pub mod ingest;
pub mod live;
pub mod notify;
pub mod outcome;
pub mod policy;
pub mod reload;
pub mod scheduler;
pub mod shaping;
pub mod sidecar;
pub mod smtp;
pub mod suppression;
pub mod verp;
