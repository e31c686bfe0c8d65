//! Members to servers: IP members as they are, DNS members resolved with the system resolver.
//!
//! NOTE: HAProxy 2.6 creates servers added at run time with `init-addr none` and never resolves
//! them, and `set server ... addr` takes an IP address, so cpha resolves DNS names itself at
//! each apply (getaddrinfo: /etc/hosts, then DNS) and gives HAProxy the address. A name keeps
//! its current address while that address is still among the answers, so a round-robin DNS
//! answer does not move a server at every apply; a name that does not resolve keeps its last
//! address, or is left out (and reported) when it never had one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::render::Server;
use crate::members::{Host, MemberSet, ServerName};

/// A DNS member that could not be resolved this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// The member's canonical entry.
    pub member: String,
    pub reason: String,
    /// The address it keeps from an earlier apply, if any.
    pub kept: Option<SocketAddr>,
}

impl fmt::Display for Unresolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} does not resolve ({})", self.member, self.reason)?;
        match self.kept {
            Some(a) => write!(f, ", keeping {a}"),
            None => f.write_str(", left out"),
        }
    }
}

/// The servers for a member set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// In the member set's order.
    pub servers: Vec<Server>,
    pub unresolved: Vec<Unresolved>,
}

/// Resolves `members`; `previous` holds the addresses servers had at the last apply.
pub async fn resolve(members: &MemberSet, previous: &BTreeMap<ServerName, SocketAddr>, timeout: Duration) -> Resolved {
    let mut out = Resolved::default();
    for m in members {
        let name = m.name().clone();
        let dns = match m.host() {
            Host::Ip(ip) => {
                out.servers.push(Server { name, addr: SocketAddr::new(*ip, m.port()) });
                continue;
            }
            Host::Dns(dns) => dns,
        };
        let kept = previous.get(&name).copied().filter(|a| a.port() == m.port());
        let answer = tokio::time::timeout(timeout, tokio::net::lookup_host((dns.as_str(), m.port()))).await;
        let result = match answer {
            Ok(Ok(addrs)) => {
                let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).filter(|ip| usable(*ip)).collect();
                pick(&ips, kept.map(|a| a.ip())).ok_or_else(|| "no usable address in the answer".to_string())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        match result {
            Ok(ip) => out.servers.push(Server { name, addr: SocketAddr::new(ip, m.port()) }),
            Err(reason) => {
                if let Some(addr) = kept {
                    out.servers.push(Server { name, addr });
                }
                out.unresolved.push(Unresolved { member: m.to_string(), reason, kept });
            }
        }
    }
    out
}

/// The address to use among `candidates`: the current one while it is still there, else the
/// resolver's first choice.
pub fn pick(candidates: &[IpAddr], current: Option<IpAddr>) -> Option<IpAddr> {
    match current {
        Some(c) if candidates.contains(&c) => Some(c),
        _ => candidates.first().copied(),
    }
}

/// Addresses a server line can hold (the same rule as members written as IP addresses).
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast() || v6.segments()[0] & 0xffc0 == 0xfe80),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::{parse, ParseOptions};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pick_keeps_the_current_address_while_it_resolves() {
        let answer = [ip("10.0.0.2"), ip("10.0.0.1")];
        assert_eq!(pick(&answer, None), Some(ip("10.0.0.2")));
        assert_eq!(pick(&answer, Some(ip("10.0.0.1"))), Some(ip("10.0.0.1")));
        assert_eq!(pick(&answer, Some(ip("10.0.0.9"))), Some(ip("10.0.0.2")));
        assert_eq!(pick(&[], Some(ip("10.0.0.9"))), None);
    }

    #[test]
    fn unusable_answers_are_dropped() {
        assert!(!usable(ip("0.0.0.0")));
        assert!(!usable(ip("224.0.0.1")));
        assert!(!usable(ip("fe80::1")));
        assert!(usable(ip("127.0.0.1")));
        assert!(usable(ip("fd00::1")));
    }

    #[tokio::test]
    async fn resolves_ip_members_as_they_are_and_names_with_the_system_resolver() {
        let set = parse("10.0.0.11, cp2=[fd00::12]:7443, local=localhost:6443", &ParseOptions::default()).unwrap();
        let r = resolve(&set, &BTreeMap::new(), Duration::from_secs(5)).await;
        assert!(r.unresolved.is_empty(), "{:?}", r.unresolved);
        let got: Vec<(String, SocketAddr)> = r.servers.iter().map(|s| (s.name.to_string(), s.addr)).collect();
        assert_eq!(got[0], ("m-10.0.0.11-6443".into(), "10.0.0.11:6443".parse().unwrap()));
        assert_eq!(got[1], ("cp2".into(), "[fd00::12]:7443".parse().unwrap()));
        assert_eq!(got[2].0, "local");
        assert!(got[2].1.ip().is_loopback() && got[2].1.port() == 6443, "{got:?}");
    }

    #[tokio::test]
    async fn an_unresolvable_name_keeps_its_last_address_or_is_left_out() {
        // `.invalid` never resolves (RFC 6761).
        let set = parse("gone=cp.invalid:6443, new=cp2.invalid", &ParseOptions::default()).unwrap();
        let previous = BTreeMap::from([("gone".parse().unwrap(), "10.0.0.5:6443".parse().unwrap())]);
        let r = resolve(&set, &previous, Duration::from_secs(5)).await;
        assert_eq!(r.servers, [Server { name: "gone".parse().unwrap(), addr: "10.0.0.5:6443".parse().unwrap() }]);
        assert_eq!(r.unresolved.len(), 2);
        assert_eq!(r.unresolved[0].kept, Some("10.0.0.5:6443".parse().unwrap()));
        assert!(
            r.unresolved[0].to_string().starts_with("gone=cp.invalid:6443 does not resolve"),
            "{}",
            r.unresolved[0]
        );
        assert!(r.unresolved[1].to_string().ends_with("left out"), "{}", r.unresolved[1]);
    }
}
