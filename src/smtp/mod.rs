//! The inbound SMTP server (floor 6). The wire format it speaks is [`crate::rfc5321`].
//!
//! - [`session`]: one state machine per connection, generic over the byte stream, one method
//!   per verb.
//! - [`server`]: listeners, connection limits, TLS acceptors, graceful shutdown.

pub mod server;
pub mod session;
