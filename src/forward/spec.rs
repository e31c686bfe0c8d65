//! What a forward is: one listen address and the targets it sends new connections to, parsed
//! and validated without touching the host.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Most targets a forward accepts: a control plane has a handful of members.
pub const MAX_TARGETS: usize = 16;

/// A TCP endpoint given on the command line or in the configuration: an IP address and a port,
/// IPv6 in brackets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint(pub SocketAddr);

impl TryFrom<String> for Endpoint {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.0.to_string()
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(format!("{s:?}: port 0 is not a usable port"));
            }
            if let SocketAddr::V6(v6) = addr {
                if v6.scope_id() != 0 || v6.flowinfo() != 0 {
                    return Err(format!("{s:?}: IPv6 zone ids are not supported"));
                }
            }
            return Ok(Endpoint(addr));
        }
        if s.parse::<IpAddr>().is_ok() {
            return Err(if s.contains(':') {
                format!("{s:?} has no port: write IPv6 as [ADDR]:PORT, e.g. [{s}]:6443")
            } else {
                format!("{s:?} has no port: write ADDR:PORT, e.g. {s}:6443")
            });
        }
        Err(format!(
            "{s:?} is not ADDR:PORT with an IP address (e.g. 10.0.0.10:6443 or [fd00::10]:6443); host names are not accepted here"
        ))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A validated forward: `listen` is a specific address or a wildcard (0.0.0.0 / [::], meaning
/// every local address of the host); `targets` are distinct and never equal to `listen`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ForwardSpec {
    pub listen: SocketAddr,
    pub targets: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("at least one --to target is required")]
    NoTargets,
    #[error("{count} targets given; at most {MAX_TARGETS} are supported")]
    TooManyTargets { count: usize },
    #[error("target {0} is given twice")]
    DuplicateTarget(SocketAddr),
    #[error("target {0} is the listen address itself: the forward would loop")]
    TargetIsListen(SocketAddr),
    #[error("target {0} is not a unicast address")]
    BadTarget(SocketAddr),
    #[error("listen address {0} is not a unicast or wildcard address")]
    BadListen(SocketAddr),
    #[error("the kernel cannot translate between IPv4 and IPv6: listen {listen} and target {target} differ in family (use --mode userspace, or targets of the listen address's family)")]
    FamilyMismatch { listen: SocketAddr, target: SocketAddr },
    #[error("target {target} is a loopback address and {listen} is not: reaching it from other hosts needs route_localnet, which cpha never enables (CVE-2020-8558); target the host's own address instead (e.g. its node IP), or use --mode userspace")]
    LoopbackTarget { listen: SocketAddr, target: SocketAddr },
    #[error("listen address {listen} is a loopback address and target {target} is not: the kernel cannot send loopback-sourced packets to another host; listen on a host address, or use --mode userspace")]
    LoopbackListen { listen: SocketAddr, target: SocketAddr },
    #[error("the kernel backends need a fixed listen port, not port 0")]
    ListenPortZero,
}

impl ForwardSpec {
    /// Checks what every backend needs.
    pub fn new(listen: SocketAddr, targets: Vec<SocketAddr>) -> Result<Self, SpecError> {
        if targets.is_empty() {
            return Err(SpecError::NoTargets);
        }
        if targets.len() > MAX_TARGETS {
            return Err(SpecError::TooManyTargets { count: targets.len() });
        }
        let ip = listen.ip();
        if ip.is_multicast() || is_broadcast(ip) {
            return Err(SpecError::BadListen(listen));
        }
        for (i, t) in targets.iter().enumerate() {
            if targets[..i].contains(t) {
                return Err(SpecError::DuplicateTarget(*t));
            }
            if *t == listen {
                return Err(SpecError::TargetIsListen(*t));
            }
            if t.ip().is_unspecified() || t.ip().is_multicast() || is_broadcast(t.ip()) || t.port() == 0 {
                return Err(SpecError::BadTarget(*t));
            }
        }
        Ok(Self { listen, targets })
    }

    /// Checks what the kernel backends need on top of [`ForwardSpec::new`]: one address family,
    /// no loopback crossing (that would need `route_localnet`), a fixed port.
    pub fn check_kernel(&self) -> Result<(), SpecError> {
        if self.listen.port() == 0 {
            return Err(SpecError::ListenPortZero);
        }
        for t in &self.targets {
            if t.is_ipv4() != self.listen.is_ipv4() {
                return Err(SpecError::FamilyMismatch { listen: self.listen, target: *t });
            }
            let listen_loop = self.listen.ip().is_loopback();
            if t.ip().is_loopback() && !listen_loop {
                return Err(SpecError::LoopbackTarget { listen: self.listen, target: *t });
            }
            if listen_loop && !t.ip().is_loopback() {
                return Err(SpecError::LoopbackListen { listen: self.listen, target: *t });
            }
        }
        Ok(())
    }

    pub fn is_wildcard(&self) -> bool {
        self.listen.ip().is_unspecified()
    }

    /// Whether connections from other hosts can reach the listen address at all (a loopback
    /// listen address only ever sees this host's own traffic).
    pub fn takes_remote_traffic(&self) -> bool {
        !self.listen.ip().is_loopback()
    }

    pub fn is_ipv4(&self) -> bool {
        self.listen.is_ipv4()
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> ", self.listen)?;
        for (i, t) in self.targets.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Result<SocketAddr, String> {
        s.parse::<Endpoint>().map(|e| e.0)
    }

    #[test]
    fn endpoints_parse_with_clear_errors() {
        assert_eq!(ep("10.0.0.10:6443").unwrap(), "10.0.0.10:6443".parse().unwrap());
        assert_eq!(ep("[fd00::10]:6443").unwrap(), "[fd00::10]:6443".parse().unwrap());
        assert!(ep("10.0.0.10").unwrap_err().contains("has no port"));
        assert!(ep("fd00::10").unwrap_err().contains("[fd00::10]:6443"));
        assert!(ep("fd00::10:6443").unwrap_err().contains("[fd00::10:6443]:6443"));
        assert!(ep("cp-1:6443").unwrap_err().contains("host names are not accepted"));
        assert!(ep("10.0.0.10:0").unwrap_err().contains("port 0"));
        assert!(ep("10.0.0.10:70000").is_err());
        assert!(ep("[fe80::1%2]:6443").is_err());
        assert!(ep("10.0.0.10:6443\nprogram x").is_err());
    }

    fn spec(listen: &str, targets: &[&str]) -> Result<ForwardSpec, SpecError> {
        ForwardSpec::new(listen.parse().unwrap(), targets.iter().map(|t| t.parse().unwrap()).collect())
    }

    #[test]
    fn spec_rejects_loops_duplicates_and_empty() {
        assert_eq!(spec("10.0.0.10:6443", &[]), Err(SpecError::NoTargets));
        assert!(matches!(spec("10.0.0.10:6443", &["10.0.0.10:6443"]), Err(SpecError::TargetIsListen(_))));
        assert!(matches!(
            spec("10.0.0.10:6443", &["10.0.0.11:6443", "10.0.0.11:6443"]),
            Err(SpecError::DuplicateTarget(_))
        ));
        assert!(matches!(spec("10.0.0.10:6443", &["0.0.0.0:6443"]), Err(SpecError::BadTarget(_))));
        assert!(matches!(spec("224.0.0.1:6443", &["10.0.0.1:6443"]), Err(SpecError::BadListen(_))));
        let many: Vec<String> = (1..=17).map(|i| format!("10.0.1.{i}:6443")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(spec("10.0.0.10:6443", &many), Err(SpecError::TooManyTargets { count: 17 })));
    }

    #[test]
    fn kernel_check_refuses_what_needs_route_localnet_or_nat46() {
        let s = spec("10.0.0.10:6443", &["[fd00::11]:6443"]).unwrap();
        assert!(matches!(s.check_kernel(), Err(SpecError::FamilyMismatch { .. })));
        let s = spec("10.0.0.10:6443", &["127.0.0.1:6443"]).unwrap();
        assert!(matches!(s.check_kernel(), Err(SpecError::LoopbackTarget { .. })));
        let s = spec("0.0.0.0:6443", &["127.0.0.1:6444"]).unwrap();
        assert!(matches!(s.check_kernel(), Err(SpecError::LoopbackTarget { .. })));
        let s = spec("127.0.0.1:7445", &["10.0.0.11:6443"]).unwrap();
        assert!(matches!(s.check_kernel(), Err(SpecError::LoopbackListen { .. })));
        spec("127.0.0.1:7445", &["127.0.0.1:6443"]).unwrap().check_kernel().unwrap();
        spec("[::]:6443", &["[fd00::11]:6443", "[fd00::12]:6443"]).unwrap().check_kernel().unwrap();
        assert_eq!(spec("10.0.0.10:0", &["10.0.0.11:6443"]).unwrap().check_kernel(), Err(SpecError::ListenPortZero));
        // Userspace mode may mix families.
        spec("10.0.0.10:6443", &["[fd00::11]:6443"]).unwrap();
    }
}
