//! The inbound SMTP server (floor 6). The wire format it speaks is [`crate::rfc5321`].
//!
//! - [`session`]: one state machine per connection, generic over the byte stream, one method
//!   per verb.
//! - [`server`]: listeners, connection limits at the door, TLS acceptors, graceful shutdown.
//! - [`anvil`]: per-client accounting (connections, connection rate, bounce-mail rate, AUTH
//!   failures), IPv6 grouped by prefix.
//! - [`budget`]: the global budget of bytes sessions buffer for messages in progress.
//! - [`deadline`]: which deadline bounds a session's next read (pure).

pub mod anvil;
pub mod budget;
pub mod deadline;
pub mod server;
pub mod session;
