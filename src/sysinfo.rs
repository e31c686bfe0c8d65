//! Facts about the host read from the kernel: capabilities, local addresses, sysctls.

use std::collections::BTreeSet;
use std::net::IpAddr;

const CAP_NET_ADMIN: u32 = 12;

/// Whether this process holds CAP_NET_ADMIN in its effective set.
pub fn has_net_admin() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .map(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
        .unwrap_or(false)
}

/// Every address configured on an interface of this network namespace.
pub fn local_addresses() -> std::io::Result<BTreeSet<IpAddr>> {
    let mut set = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            set.insert(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            set.insert(IpAddr::V6(v6.ip()));
        }
    }
    Ok(set)
}

/// Reads a sysctl under /proc/sys (`net.ipv4.ip_forward` style key); None if it does not exist.
pub fn sysctl(key: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Writes a sysctl under /proc/sys (`net.ipv4.ip_forward` style key).
pub fn set_sysctl(key: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(format!("/proc/sys/{}", key.replace('.', "/")), value)
}

/// IPv4 169.254.0.0/16 or IPv6 fe80::/10.
pub fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}
