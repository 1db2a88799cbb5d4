//! Where a message goes (floor 3): the DNS boundary and the routing decision, with no
//! connection of its own. Delivery, shaping and the scheduler key on its [`route::RoutePlan`].
//!
//! - [`dns`]: the [`dns::Resolver`] boundary (MX and address lookups) and its hickory
//!   implementation.
//! - [`route`]: static routes and MX resolution -> an ordered list of next hops per domain.

pub mod dns;
pub mod route;
