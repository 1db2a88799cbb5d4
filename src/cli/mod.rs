//! The `tern` command line below its argument parsing (`src/main.rs`).
//!
//! - [`client`]: the blocking HTTP client of the admin API.
//! - [`queue`]: `tern queue ...`.
//! - [`suppression`]: `tern suppression ...`.

pub mod client;
pub mod queue;
pub mod suppression;
