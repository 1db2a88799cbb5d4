//! Which addresses mail may go to when the recipient's domain chose them: [`AddressGuard`].
//!
//! Whoever controls a recipient domain controls its MX, A and AAAA records (and can write an
//! address literal such as `u@[127.0.0.1]`). Without a check, one signup with such an address
//! makes tern connect to itself (a mail loop), to a service on the loopback interface, or to
//! a link-local metadata endpoint. A static route is the operator's own choice and is never
//! checked.
//!
//! Invariants:
//! - Refused, unless `delivery.allow_local_mx` is set: loopback, unspecified ("this
//!   network", 0.0.0.0/8 and `::`), link-local, multicast and the IPv4 broadcast address, in
//!   any spelling (IPv4-mapped IPv6, the NAT64 well-known prefix).
//! - Always refused, even with `allow_local_mx`: tern's own listener addresses (the exact
//!   address, or any address of this host on the port of a listener bound to the unspecified
//!   address), since connecting there can only loop.
//! - The check is pure ([`refusal`]); the host's interface addresses are read once per guard
//!   (at start and at each reload), not per connection.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Loopback,
    Unspecified,
    LinkLocal,
    Multicast,
    Broadcast,
    /// One of tern's own listeners.
    OwnListener,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Loopback => "a loopback address",
            Refusal::Unspecified => "an unspecified address",
            Refusal::LinkLocal => "a link-local address",
            Refusal::Multicast => "a multicast address",
            Refusal::Broadcast => "the broadcast address",
            Refusal::OwnListener => "one of tern's own listeners",
        })
    }
}

/// The addresses mail whose hosts came from the recipient's domain is never sent to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressGuard {
    /// `delivery.allow_local_mx`: loopback and the other local classes are allowed (tests,
    /// labs); own listeners stay refused.
    allow_local: bool,
    /// Listener addresses bound to a specific IP.
    own: HashSet<SocketAddr>,
    /// Ports of listeners bound to the unspecified address, and this host's addresses then.
    own_ports: HashSet<u16>,
    local_ips: HashSet<IpAddr>,
}

impl AddressGuard {
    /// `listeners`: tern's SMTP listener addresses as bound (port 0 resolved). The host's
    /// interface addresses are read here when a listener is bound to the unspecified
    /// address.
    pub fn new(allow_local: bool, listeners: &[SocketAddr]) -> AddressGuard {
        let wildcard = listeners.iter().any(|l| l.ip().is_unspecified());
        let local_ips = if wildcard {
            interface_addresses()
        } else {
            HashSet::new()
        };
        AddressGuard::with_interfaces(allow_local, listeners, local_ips)
    }

    /// As [`AddressGuard::new`], with the host's interface addresses given.
    pub fn with_interfaces(
        allow_local: bool,
        listeners: &[SocketAddr],
        local_ips: HashSet<IpAddr>,
    ) -> AddressGuard {
        let mut own = HashSet::new();
        let mut own_ports = HashSet::new();
        for listener in listeners {
            if listener.ip().is_unspecified() {
                own_ports.insert(listener.port());
            } else {
                own.insert(SocketAddr::new(canonical(listener.ip()), listener.port()));
            }
        }
        AddressGuard {
            allow_local,
            own,
            own_ports,
            local_ips: local_ips.into_iter().map(canonical).collect(),
        }
    }

    /// Why mail must not be sent to `addr`, if it must not.
    pub fn check(&self, addr: SocketAddr) -> Option<Refusal> {
        let ip = canonical(addr.ip());
        let own = self.own.contains(&SocketAddr::new(ip, addr.port()))
            || (self.own_ports.contains(&addr.port())
                && (self.local_ips.contains(&ip) || ip.is_loopback() || ip.is_unspecified()));
        if own {
            return Some(Refusal::OwnListener);
        }
        refusal(ip).filter(|_| !self.allow_local)
    }
}

/// The class of `ip` that mail found through a recipient's domain is never sent to.
pub fn refusal(ip: IpAddr) -> Option<Refusal> {
    match canonical(ip) {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some(Refusal::Loopback)
            } else if v6.is_unspecified() {
                Some(Refusal::Unspecified)
            } else if v6.is_unicast_link_local() {
                Some(Refusal::LinkLocal)
            } else if v6.is_multicast() {
                Some(Refusal::Multicast)
            } else {
                None
            }
        }
    }
}

fn refusal_v4(ip: Ipv4Addr) -> Option<Refusal> {
    if ip.is_loopback() {
        Some(Refusal::Loopback)
    } else if ip.octets()[0] == 0 {
        // 0.0.0.0/8, "this network": Linux connects 0.0.0.0 to the local host.
        Some(Refusal::Unspecified)
    } else if ip.is_link_local() {
        Some(Refusal::LinkLocal)
    } else if ip.is_multicast() {
        Some(Refusal::Multicast)
    } else if ip.is_broadcast() {
        Some(Refusal::Broadcast)
    } else {
        None
    }
}

/// `ip` with IPv4 addresses embedded in IPv6 unwrapped: IPv4-mapped (`::ffff:127.0.0.1`)
/// and the NAT64 well-known prefix (`64:ff9b::/96`, RFC 6052), through which a translator
/// would reach the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// The addresses of this host's interfaces (getifaddrs); empty if they cannot be read, in
/// which case only the loopback and unspecified spellings of a wildcard listener are known
/// as ours.
fn interface_addresses() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that we only read and then free
    // with freeifaddrs; every pointer is checked for null before use, and sockaddr_in /
    // sockaddr_in6 are read only when sa_family says that is what the pointer holds.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot list the host's addresses; own-listener checks use loopback only"
            );
            return out;
        }
        let mut entry = list;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.insert(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.insert(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn local_classes_are_refused_in_every_spelling() {
        let cases = [
            ("127.0.0.1", Some(Refusal::Loopback)),
            ("127.255.3.4", Some(Refusal::Loopback)),
            ("::1", Some(Refusal::Loopback)),
            ("::ffff:127.0.0.1", Some(Refusal::Loopback)),
            ("64:ff9b::7f00:1", Some(Refusal::Loopback)),
            ("0.0.0.0", Some(Refusal::Unspecified)),
            ("0.1.2.3", Some(Refusal::Unspecified)),
            ("::", Some(Refusal::Unspecified)),
            ("169.254.169.254", Some(Refusal::LinkLocal)),
            ("fe80::1", Some(Refusal::LinkLocal)),
            ("224.0.0.1", Some(Refusal::Multicast)),
            ("ff02::1", Some(Refusal::Multicast)),
            ("255.255.255.255", Some(Refusal::Broadcast)),
            ("192.0.2.1", None),
            ("10.1.2.3", None),
            ("2001:db8::1", None),
            ("::ffff:192.0.2.1", None),
        ];
        for (addr, want) in cases {
            assert_eq!(refusal(ip(addr)), want, "{addr}");
        }
    }

    #[test]
    fn allow_local_lets_loopback_through_but_never_our_own_listener() {
        let listeners = [sa("127.0.31.9:25"), sa("[::]:2525")];
        let interfaces = HashSet::from([ip("192.0.2.7"), ip("2001:db8::7")]);
        let strict = AddressGuard::with_interfaces(false, &listeners, interfaces.clone());
        let lab = AddressGuard::with_interfaces(true, &listeners, interfaces);

        assert_eq!(strict.check(sa("127.0.0.1:25")), Some(Refusal::Loopback));
        assert_eq!(lab.check(sa("127.0.0.1:25")), None);
        assert_eq!(strict.check(sa("192.0.2.1:25")), None);

        for guard in [&strict, &lab] {
            // The exact listener address, also IPv4-mapped.
            assert_eq!(guard.check(sa("127.0.31.9:25")), Some(Refusal::OwnListener));
            assert_eq!(
                guard.check(sa("[::ffff:127.0.31.9]:25")),
                Some(Refusal::OwnListener)
            );
            // A wildcard listener: any of the host's addresses on its port.
            assert_eq!(
                guard.check(sa("192.0.2.7:2525")),
                Some(Refusal::OwnListener)
            );
            assert_eq!(
                guard.check(sa("[2001:db8::7]:2525")),
                Some(Refusal::OwnListener)
            );
            // The same host on another port is another service.
            assert_eq!(guard.check(sa("192.0.2.7:25")), None);
        }
        assert_eq!(lab.check(sa("127.0.31.9:26")), None);
        assert_eq!(lab.check(sa("127.0.0.1:2525")), Some(Refusal::OwnListener));
    }

    #[test]
    fn this_hosts_interfaces_include_loopback() {
        // The guard of a wildcard listener relies on reading them.
        assert!(interface_addresses().contains(&ip("127.0.0.1")));
    }
}
