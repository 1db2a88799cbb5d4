//! The sidecar: stages that run on a message before it is enqueued (issue 7).
//!
//! - [`sendtime`]: engagement events, per-recipient send-time prediction (`not_before`),
//!   the engagement score, and the offline simulator that evaluates the model.
//!
//! Content, campaigns, control headers and variant bandits are a separate part of the
//! sidecar and live beside this module.

pub mod sendtime;
