//! Where a message goes (floor 3): the DNS boundary and the routing decision, with no
//! connection of its own. Delivery, shaping and the scheduler key on its [`route::RoutePlan`].
//!
//! - [`dns`]: the [`dns::Resolver`] boundary (MX and address lookups) and its hickory
//!   implementation.
//! - [`route`]: static routes and MX resolution -> an ordered list of next hops per domain.
//! - [`guard`]: the addresses mail is never sent to when the recipient's domain chose the
//!   host (loopback, link-local, ..., tern's own listeners).

pub mod dane;
pub mod dns;
pub mod guard;
pub mod route;
pub mod sts;
