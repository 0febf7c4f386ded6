//! Which of a node's addresses other peers can use.
//!
//! A node listening on the wildcard address (`0.0.0.0`, the default) hears on
//! every interface, loopback included. Another host cannot reach
//! `127.0.0.1`: dialling it reaches the dialler's own machine, so loopback
//! addresses are only handed out when a node has nothing else (a swarm on one
//! machine), and a loopback address learnt from a peer is only used when that
//! peer was itself reached over loopback.

use std::net::IpAddr;

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

/// How far an address reaches, most useful to others first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// A global address (or a DNS name).
    Public,
    /// A private, link-local or shared (carrier-grade NAT) range: reachable on
    /// the same network only.
    Private,
    /// Through a circuit relay.
    Relayed,
    /// This machine only.
    Loopback,
    /// The wildcard: not an address anyone can dial.
    Unspecified,
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// The reach of `addr`. A circuit address counts as relayed, unless its
/// relay is on loopback.
pub fn scope(addr: &Multiaddr) -> Scope {
    let circuit = addr.iter().any(|p| matches!(p, Protocol::P2pCircuit));
    match ip_of(addr) {
        Some(ip) if ip.is_unspecified() => Scope::Unspecified,
        Some(ip) if ip.is_loopback() => Scope::Loopback,
        _ if circuit => Scope::Relayed,
        None => Scope::Public,
        Some(IpAddr::V4(v4)) => {
            let shared = v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64;
            if v4.is_private() || v4.is_link_local() || shared {
                Scope::Private
            } else {
                Scope::Public
            }
        }
        Some(IpAddr::V6(v6)) => {
            let seg = v6.segments()[0];
            // Unique local (fc00::/7) and link-local (fe80::/10).
            if (seg & 0xfe00) == 0xfc00 || (seg & 0xffc0) == 0xfe80 {
                Scope::Private
            } else {
                Scope::Public
            }
        }
    }
}

/// Whether `addr` names this machine only.
pub fn is_loopback(addr: &Multiaddr) -> bool {
    scope(addr) == Scope::Loopback
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

/// The addresses of `addrs` to hand to other peers, most useful first
/// (public, private, relayed; QUIC before TCP): loopback only when there is
/// nothing else, never the wildcard, no duplicates.
pub fn shareable(addrs: impl IntoIterator<Item = Multiaddr>) -> Vec<Multiaddr> {
    let mut all: Vec<Multiaddr> = Vec::new();
    for a in addrs {
        if scope(&a) != Scope::Unspecified && !all.contains(&a) {
            all.push(a);
        }
    }
    if all.iter().any(|a| !is_loopback(a)) {
        all.retain(|a| !is_loopback(a));
    }
    all.sort_by_key(|a| (scope(a), !is_quic(a)));
    all
}

/// Whether an address `addr` that a peer gave us is worth dialling, when
/// that peer is (or was last) connected over `via`: loopback addresses only
/// when the peer is on this machine too.
pub fn usable_from(addr: &Multiaddr, via: Option<&Multiaddr>) -> bool {
    match scope(addr) {
        Scope::Unspecified => false,
        Scope::Loopback => via.is_none_or(is_loopback),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn scopes() {
        assert_eq!(scope(&m("/ip4/8.8.8.8/udp/1/quic-v1")), Scope::Public);
        assert_eq!(scope(&m("/ip4/10.1.2.3/tcp/1")), Scope::Private);
        assert_eq!(scope(&m("/ip4/192.168.1.1/tcp/1")), Scope::Private);
        assert_eq!(scope(&m("/ip4/100.64.0.1/tcp/1")), Scope::Private);
        assert_eq!(scope(&m("/ip4/100.128.0.1/tcp/1")), Scope::Public);
        assert_eq!(scope(&m("/ip4/127.0.0.1/tcp/1")), Scope::Loopback);
        assert_eq!(scope(&m("/ip6/::1/tcp/1")), Scope::Loopback);
        assert_eq!(scope(&m("/ip6/fd00::1/tcp/1")), Scope::Private);
        assert_eq!(scope(&m("/ip6/2001:db8::1/tcp/1")), Scope::Public);
        assert_eq!(scope(&m("/ip4/0.0.0.0/tcp/1")), Scope::Unspecified);
        assert_eq!(scope(&m("/dns4/example.org/tcp/1")), Scope::Public);
        let relay = "/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA/p2p-circuit";
        let circuit = format!("/ip4/10.0.0.1/udp/1/quic-v1{relay}");
        assert_eq!(scope(&m(&circuit)), Scope::Relayed);
        let local = format!("/ip4/127.0.0.1/udp/1/quic-v1{relay}");
        assert_eq!(scope(&m(&local)), Scope::Loopback);
    }

    #[test]
    fn loopback_is_shared_only_alone() {
        let lo = m("/ip4/127.0.0.1/udp/5/quic-v1");
        let lan = m("/ip4/10.0.0.2/udp/5/quic-v1");
        let lan_tcp = m("/ip4/10.0.0.2/tcp/5");
        let public = m("/ip4/1.2.3.4/tcp/5");
        let any = m("/ip4/0.0.0.0/tcp/5");
        assert_eq!(shareable([lo.clone(), any.clone()]), vec![lo.clone()]);
        assert_eq!(
            shareable([
                lo.clone(),
                lan_tcp.clone(),
                lan.clone(),
                public.clone(),
                any,
                lan.clone()
            ]),
            vec![public, lan, lan_tcp]
        );
        assert!(shareable([]).is_empty());
    }

    #[test]
    fn loopback_from_a_remote_peer_is_not_dialled() {
        let lo = m("/ip4/127.0.0.1/udp/5/quic-v1");
        let lan = m("/ip4/10.0.0.2/udp/5/quic-v1");
        assert!(usable_from(&lo, None));
        assert!(usable_from(&lo, Some(&lo)));
        assert!(!usable_from(&lo, Some(&lan)));
        assert!(usable_from(&lan, Some(&lan)));
        assert!(!usable_from(&m("/ip4/0.0.0.0/tcp/1"), None));
    }
}
