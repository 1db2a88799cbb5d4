//! Outbound delivery (floor 4): how a message gets to the next hop [`crate::routing`] chose.
//!
//! - [`client`]: one outbound SMTP connection: greeting, EHLO, STARTTLS, AUTH, pipelined
//!   transactions with per-recipient results, per-phase timeouts.
//! - [`dane`]: the certificate check of DANE sessions (TLSA records, RFC 7672).
//! - [`pool`]: idle connections kept for reuse, per (source address, remote address).
//! - [`worker`]: one attempt of one envelope over a kept, pooled or new connection.

pub mod client;
pub mod dane;
pub mod pool;
pub mod worker;
