//! SMTP as bytes and values, with no I/O and nothing else of the crate (floor 0): the inbound
//! session, HTTP injection and policy all speak through it.
//!
//! - [`address`]: mailbox syntax (RFC 5321 4.1.2, RFC 6531 UTF-8, the length limits).
//! - [`reply`]: SMTP replies as values (code, enhanced status, text) and their wire format.
//! - [`proto`]: sans-IO framing: command lines, DATA dot-unstuffing and end detection, the
//!   content check that refuses bare CR, bare LF and NUL (SMTP smuggling), xtext decoding.

pub mod address;
pub mod proto;
pub mod reply;
