//! Outbound delivery: where a message goes and how it gets there.
//!
//! - [`dns`]: the [`dns::Resolver`] boundary (MX and address lookups) and its hickory
//!   implementation.
//! - [`route`]: static routes and MX resolution -> an ordered list of next hops per domain.
//! - [`client`]: one outbound SMTP connection: greeting, EHLO, STARTTLS, AUTH, pipelined
//!   transactions with per-recipient results, per-phase timeouts.
//! - [`pool`]: idle connections kept for reuse, per (source address, remote address).
//! - [`dkim`]: DKIM signing keys and signing (once per message, at acceptance).
//! - [`log`]: the delivery log, one JSON line per attempt.
//! - [`worker`]: one attempt of one envelope over a kept, pooled or new connection.

pub mod client;
pub mod dkim;
pub mod dns;
pub mod log;
pub mod pool;
pub mod route;
pub mod worker;
