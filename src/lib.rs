//! tern: a high-throughput mail transfer and delivery engine.
//!
//! The modules form floors; each imports only from floors below it (or beside it, without a
//! cycle). `tests/layers.rs` enforces the floors, and docs/ARCHITECTURE.md draws them with
//! what each module owns and where new code goes.
//!
//! - 0, leaves: [`telemetry`] (every Prometheus metric), [`clock`], [`live`], [`notify`],
//!   [`rfc5321`] (SMTP replies and sans-IO framing), [`secret_file`], [`feedback_id`] (the
//!   campaign mail's `Feedback-ID`); the spool crate
//!   `tern-queue`.
//! - 1, values: [`message`] (Submission, the Stage trait, dates, addresses), [`tls`],
//!   [`taxonomy`] (bounce categories and rules).
//! - 2: [`config`].
//! - 3, domain: [`auth`], [`verp`], [`origin`], [`bounce`], [`dkim`], [`maillog`], [`routing`],
//!   [`suppression`], [`cluster`] (the fleet's Redis), [`events`].
//! - 4, services: [`delivery`], [`shaping`], [`feedback`], [`sidecar`], [`sendtime`],
//!   [`enqueue`], [`outcome`].
//! - 5: [`intake`], [`scheduler`], [`policy`].
//! - 6, edges: [`smtp`], [`admin`].
//! - 7, composition: [`daemon`], [`reload`], [`cli`].

pub mod clock;
pub mod feedback_id;
pub mod live;
pub mod notify;
pub mod rfc5321;
pub mod secret_file;
pub mod telemetry;

pub mod message;
pub mod taxonomy;
pub mod tls;

pub mod config;

pub mod auth;
pub mod bounce;
pub mod cluster;
pub mod dkim;
pub mod events;
pub mod maillog;
pub mod origin;
pub mod routing;
pub mod suppression;
pub mod verp;

pub mod delivery;
pub mod enqueue;
pub mod feedback;
pub mod outcome;
pub mod sendtime;
pub mod shaping;
pub mod sidecar;
pub mod tlsrpt;
pub mod unsubscribe;

pub mod intake;
pub mod policy;
pub mod scheduler;

pub mod admin;
pub mod smtp;

pub mod cli;
pub mod daemon;
pub mod reload;
