//! The inbound SMTP server.
//!
//! - [`reply`]: SMTP replies as values (code, enhanced status, text) and their wire format.
//! - [`proto`]: sans-IO framing: command lines, DATA dot-unstuffing and end detection, the
//!   content check that refuses bare CR, bare LF and NUL (SMTP smuggling), xtext decoding.
//! - [`session`]: one state machine per connection, generic over the byte stream, one method
//!   per verb.
//! - [`server`]: listeners, connection limits, TLS acceptors, graceful shutdown.

pub mod proto;
pub mod reply;
pub mod server;
pub mod session;
