//! Where the virtual IP lives on this host: the interface whose subnet holds it, the prefix of
//! that subnet, and this host's own address there (keepalived's unicast source). Read from the
//! kernel's address list of the current network namespace; the choice itself is pure.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::settings::VipSettings;

/// One address of an interface, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub interface: String,
    pub address: IpAddr,
    pub prefix_len: u8,
}

/// Where the VIP goes on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub interface: String,
    /// The subnet's prefix length (the VIP itself is held as a host address, /32 or /128).
    pub prefix_len: u8,
    /// This host's address on that subnet: VRRP adverts come from it.
    pub source: IpAddr,
    /// Every address of this host, to leave out of the unicast peers.
    pub local: BTreeSet<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("vip.interface {0}: no such interface on this host")]
    NoInterface(String),
    #[error("vip.address {address} is outside every subnet of interface {interface} ({have}): a host holds a virtual IP on the segment whose subnet contains it")]
    OutsideInterface { address: IpAddr, interface: String, have: String },
    #[error("vip.address {address} is outside every interface's subnet on this host ({have}): set it to an address of a subnet this host is on")]
    Outside { address: IpAddr, have: String },
    #[error("reading this host's addresses: {0}")]
    Read(String),
}

/// Finds the VIP's place among this host's addresses.
pub fn locate(settings: &VipSettings) -> Result<Placement, PlaceError> {
    locate_in(settings, &addresses().map_err(|e| PlaceError::Read(e.to_string()))?)
}

/// The pure half of [`locate`].
pub fn locate_in(settings: &VipSettings, addrs: &[IfAddr]) -> Result<Placement, PlaceError> {
    let vip = settings.address;
    if let Some(name) = &settings.interface {
        if !addrs.iter().any(|a| &a.interface == name) {
            return Err(PlaceError::NoInterface(name.clone()));
        }
    }
    let candidates = addrs.iter().filter(|a| settings.interface.as_ref().is_none_or(|n| &a.interface == n));
    let found = candidates
        .filter(|a| a.address != vip && a.address.is_ipv4() == vip.is_ipv4())
        .filter(|a| !a.address.is_loopback() && !crate::sysinfo::is_link_local(&a.address))
        .find(|a| contains(a.address, a.prefix_len, vip));
    let Some(found) = found else {
        let listed = |only: Option<&String>| {
            let have: Vec<String> = addrs
                .iter()
                .filter(|a| only.is_none_or(|n| &a.interface == n))
                .filter(|a| !a.address.is_loopback() && !crate::sysinfo::is_link_local(&a.address))
                .map(|a| format!("{} {}/{}", a.interface, a.address, a.prefix_len))
                .collect();
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        };
        return Err(match &settings.interface {
            Some(name) => {
                PlaceError::OutsideInterface { address: vip, interface: name.clone(), have: listed(Some(name)) }
            }
            None => PlaceError::Outside { address: vip, have: listed(None) },
        });
    };
    Ok(Placement {
        interface: found.interface.clone(),
        prefix_len: found.prefix_len,
        source: found.address,
        local: addrs.iter().map(|a| a.address).collect(),
    })
}

/// Whether `ip` is in `net/prefix`.
pub fn contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// The name of an interface of this network namespace that keepalived could run VRRP on (not
/// loopback; one that is up first), for placing an address given by hand where its interface
/// must exist (`cpha check-config --host-address`).
pub fn an_interface() -> Option<String> {
    use nix::net::if_::InterfaceFlags;
    let all: Vec<_> =
        nix::ifaddrs::getifaddrs().ok()?.filter(|i| !i.flags.contains(InterfaceFlags::IFF_LOOPBACK)).collect();
    let up = all.iter().find(|i| i.flags.contains(InterfaceFlags::IFF_UP));
    up.or(all.first()).map(|i| i.interface_name.clone())
}

/// Every address of every interface in this network namespace.
pub fn addresses() -> std::io::Result<Vec<IfAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else { continue };
        let (address, prefix_len) = if let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            (IpAddr::V4(a.ip()), u32::from(m.ip()).count_ones() as u8)
        } else if let (Some(a), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            (IpAddr::V6(a.ip()), u128::from(m.ip()).count_ones() as u8)
        } else {
            continue;
        };
        out.push(IfAddr { interface: ifa.interface_name, address, prefix_len });
    }
    Ok(out)
}

/// Whether this host holds `vip` on an interface (and which, with the prefix it has there).
pub fn held(vip: IpAddr) -> std::io::Result<Option<IfAddr>> {
    Ok(addresses()?.into_iter().find(|a| a.address == vip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(interface: &str, address: &str, prefix_len: u8) -> IfAddr {
        IfAddr { interface: interface.into(), address: address.parse().unwrap(), prefix_len }
    }

    fn host() -> Vec<IfAddr> {
        vec![
            a("lo", "127.0.0.1", 8),
            a("eth0", "192.0.2.11", 24),
            a("eth1", "198.51.100.5", 24),
            a("eth0", "fe80::1", 64),
        ]
    }

    fn settings(address: &str, interface: Option<&str>) -> VipSettings {
        VipSettings {
            address: address.parse().unwrap(),
            interface: interface.map(String::from),
            ..VipSettings::default()
        }
    }

    #[test]
    fn the_interface_is_found_from_the_subnet() {
        let p = locate_in(&settings("192.0.2.10", None), &host()).unwrap();
        assert_eq!((p.interface.as_str(), p.prefix_len), ("eth0", 24));
        assert_eq!(p.source, "192.0.2.11".parse::<IpAddr>().unwrap());
        let p = locate_in(&settings("198.51.100.200", None), &host()).unwrap();
        assert_eq!(p.interface, "eth1");
    }

    #[test]
    fn an_ipv6_vip_is_placed_by_its_subnet_never_on_a_link_local_address() {
        let mut addrs = host();
        addrs.push(a("eth1", "2001:db8::5", 64));
        let p = locate_in(&settings("2001:db8::10", None), &addrs).unwrap();
        assert_eq!((p.interface.as_str(), p.prefix_len), ("eth1", 64));
        assert_eq!(p.source, "2001:db8::5".parse::<IpAddr>().unwrap());
        let refused = locate_in(&settings("fe80::10", None), &addrs);
        assert!(
            matches!(refused, Err(PlaceError::Outside { .. })),
            "link-local is never a subnet for a VIP: {refused:?}"
        );
    }

    #[test]
    fn a_held_vip_is_not_its_own_source() {
        let mut addrs = host();
        addrs.insert(1, a("eth0", "192.0.2.10", 32));
        let p = locate_in(&settings("192.0.2.10", None), &addrs).unwrap();
        assert_eq!(p.source, "192.0.2.11".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn an_address_outside_every_subnet_is_refused_with_what_the_host_has() {
        let err = locate_in(&settings("203.0.113.7", None), &host()).unwrap_err().to_string();
        assert!(err.contains("outside every interface's subnet"), "{err}");
        assert!(err.contains("eth0 192.0.2.11/24, eth1 198.51.100.5/24"), "{err}");
        let err = locate_in(&settings("198.51.100.200", Some("eth0")), &host()).unwrap_err().to_string();
        assert!(err.contains("outside every subnet of interface eth0 (eth0 192.0.2.11/24)"), "{err}");
        let err = locate_in(&settings("192.0.2.10", Some("eth9")), &host()).unwrap_err().to_string();
        assert!(err.contains("eth9: no such interface"), "{err}");
    }

    #[test]
    fn subnets_contain_what_their_prefix_says() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(contains(ip("10.0.0.1"), 8, ip("10.255.0.1")));
        assert!(!contains(ip("10.0.0.1"), 24, ip("10.0.1.1")));
        assert!(contains(ip("2001:db8::1"), 64, ip("2001:db8::ff")));
        assert!(!contains(ip("2001:db8::1"), 64, ip("10.0.0.1")));
        assert!(contains(ip("10.0.0.1"), 0, ip("192.0.2.1")));
    }
}
