//! One member: the grammar of a single entry, its canonical text and its HAProxy server name.

use std::cmp::Ordering;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// kube-apiserver's port, used when an entry names none.
pub const DEFAULT_PORT: u16 = 6443;

/// Longest entry accepted, in bytes: a 63-character name, `=`, a 253-character DNS name, `:` and
/// a 5-digit port make 323.
pub const MAX_ENTRY_LEN: usize = 323;

/// Longest HAProxy server name produced or accepted.
pub const MAX_SERVER_NAME_LEN: usize = 63;

const MAX_DNS_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// Why one entry is not a member.
///
/// Text from the entry is quoted with [`quoted`], so the message is printable ASCII whatever the
/// input was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberParseError {
    #[error("the entry is empty")]
    Empty,
    #[error("the entry is {len} bytes long, more than {max}")]
    TooLong { len: usize, max: usize },
    #[error(
        "character '{}' (U+{:04X}) at byte {offset} is not allowed{}",
        ch.escape_default(), u32::from(*ch), forbidden_hint(*ch)
    )]
    ForbiddenChar { ch: char, offset: usize },
    #[error("invalid server name {}: {reason}", quoted(name))]
    InvalidName { name: String, reason: &'static str },
    #[error("no address after '='")]
    MissingAddress,
    #[error("invalid host {}: {reason}", quoted(host))]
    InvalidHost { host: String, reason: &'static str },
    #[error("invalid port {}: {reason}", quoted(port))]
    InvalidPort { port: String, reason: &'static str },
    #[error("'[' without a matching ']'")]
    UnclosedBracket,
    #[error("unexpected {} after ']': expected ':' and a port, or nothing", quoted(rest))]
    AfterBracket { rest: String },
    #[error("{ip} is not usable as a server address: {reason}")]
    UnusableAddress { ip: IpAddr, reason: &'static str },
}

/// `text` in double quotes, with quotes, backslashes and everything outside printable ASCII
/// escaped: an error message that quotes operator input stays one plain log line, and lookalike
/// or bidirectional characters show up as `\u{..}`.
pub(super) fn quoted(text: &str) -> String {
    format!("\"{}\"", text.escape_default())
}

fn forbidden_hint(ch: char) -> &'static str {
    match ch {
        '#' => " (a comment must be on a line of its own)",
        '%' => " (IPv6 zone ids are not supported)",
        '/' => " (write an address, not a URL or a prefix)",
        c if c.is_whitespace() => " (one entry cannot contain white space: separate entries with ',' or a line end)",
        _ => "",
    }
}

/// The characters any entry may contain; everything else is refused before any other parsing,
/// which keeps haproxy.cfg and Runtime API separators (`\n`, `;`, `#`, space, quotes) out.
fn is_entry_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']' | '=')
}

/// An HAProxy server name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`.
///
/// Either written by the operator (`cp1=10.0.0.11`) or derived from the address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerName(String);

impl ServerName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name a member gets when the operator gives none: `m-<host>-<port>` with `:` of an
    /// IPv6 address written as `_`, for example `m-10.0.0.11-6443` and `m-fd00__11-6443`.
    ///
    /// Distinct addresses get distinct names: DNS names contain no `_`, IPv6 addresses always
    /// do once rewritten, and IPv4 addresses are the only all-numeric dotted form. A DNS name too
    /// long to fit is cut and followed by `_h` and a 64-bit FNV-1a hash of the whole name (no
    /// other form contains `_h`), so the name stays the same across runs and releases.
    pub fn derived(host: &Host, port: u16) -> ServerName {
        let host_part = match host {
            Host::Ip(IpAddr::V4(ip)) => ip.to_string(),
            Host::Ip(IpAddr::V6(ip)) => ip.to_string().replace(':', "_"),
            Host::Dns(name) => name.as_str().to_owned(),
        };
        let plain = format!("m-{host_part}-{port}");
        if plain.len() <= MAX_SERVER_NAME_LEN {
            return ServerName(plain);
        }
        let suffix = format!("_h{:016x}-{port}", fnv1a64(host_part.as_bytes()));
        let keep = MAX_SERVER_NAME_LEN - "m-".len() - suffix.len();
        // host_part is ASCII, so any byte index is a character boundary.
        ServerName(format!("m-{}{suffix}", &host_part[..keep]))
    }
}

/// 64-bit FNV-1a. Written out here because the derived names must never change, which a
/// standard-library hasher does not promise.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl FromStr for ServerName {
    type Err = MemberParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| MemberParseError::InvalidName { name: s.to_owned(), reason };
        let Some(first) = s.chars().next() else {
            return Err(invalid("empty"));
        };
        if s.len() > MAX_SERVER_NAME_LEN {
            return Err(invalid("longer than 63 characters"));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(invalid("must start with a letter or digit"));
        }
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
            return Err(invalid("only letters, digits, '_', '.' and '-' are allowed"));
        }
        Ok(ServerName(s.to_owned()))
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A host name as RFC 1123 allows it, stored in lowercase.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsName(String);

impl DnsName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DnsName {
    type Err = MemberParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| MemberParseError::InvalidHost { host: s.to_owned(), reason };
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        if s.len() > MAX_DNS_NAME_LEN {
            return Err(invalid("a host name has at most 253 characters"));
        }
        let lower = s.to_ascii_lowercase();
        let mut last = "";
        for label in lower.split('.') {
            if label.is_empty() {
                return Err(invalid("empty label (leading, trailing or doubled '.')"));
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(invalid("a label has at most 63 characters"));
            }
            if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                return Err(invalid(
                    "a host name has only letters, digits, '-' and '.' (or it is not a valid IP address)",
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(invalid("a label cannot start or end with '-'"));
            }
            last = label;
        }
        if !last.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(invalid("not a valid IPv4 address, and not a host name (its last label has no letter)"));
        }
        Ok(DnsName(lower))
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a member listens: an IP address or a DNS name. IP addresses sort before names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    Ip(IpAddr),
    Dns(DnsName),
}

/// Bare text: no brackets around IPv6, no port.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => ip.fmt(f),
            Host::Dns(name) => name.fmt(f),
        }
    }
}

/// A bare host: IPv4, IPv6 without brackets, or a DNS name.
impl FromStr for Host {
    type Err = MemberParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        s.parse().map(Host::Dns)
    }
}

/// One kube-apiserver the HAProxy backend sends to.
///
/// `Display` gives the canonical entry, which [`Member::from_str`] reads back to the same value:
/// `name=` only when the name is not the derived one, lowercase DNS names, compressed IPv6 in
/// brackets, and always a port (`10.0.0.11:6443`, `[fd00::11]:6443`, `cp1=cp-1.example:6443`).
/// Members sort by host, then port, then name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    name: ServerName,
    host: Host,
    port: u16,
    // Whether `name` differs from `ServerName::derived(host, port)`, so the canonical text must
    // carry it.
    named: bool,
}

impl Member {
    /// Checks the port and that an IP address can be a server, and names the member (the derived
    /// name when `name` is `None`).
    pub fn new(host: Host, port: u16, name: Option<ServerName>) -> Result<Self, MemberParseError> {
        if port == 0 {
            return Err(MemberParseError::InvalidPort { port: "0".into(), reason: "port 0 is not allowed" });
        }
        if let Host::Ip(ip) = host {
            check_usable(ip)?;
        }
        let derived = ServerName::derived(&host, port);
        let (name, named) = match name {
            Some(name) if name != derived => (name, true),
            _ => (derived, false),
        };
        Ok(Member { name, host, port, named })
    }

    /// Parses one entry (`[name=]host[:port]`), using `default_port` when it names none.
    ///
    /// Accepted: `10.0.0.11`, `10.0.0.11:6443`, `[fd00::11]:6443`, `[fd00::11]`, `fd00::11`,
    /// `cp-1.example.internal:6443`, `cp1=10.0.0.11:6443`, `cp3=[fd00::13]:6443`. An IPv6
    /// address without brackets never has a port: `fd00::11:6443` is the address
    /// `fd00::11:6443`.
    pub fn parse(entry: &str, default_port: u16) -> Result<Self, MemberParseError> {
        if entry.is_empty() {
            return Err(MemberParseError::Empty);
        }
        if entry.len() > MAX_ENTRY_LEN {
            return Err(MemberParseError::TooLong { len: entry.len(), max: MAX_ENTRY_LEN });
        }
        if let Some((offset, ch)) = entry.char_indices().find(|&(_, c)| !is_entry_char(c)) {
            return Err(MemberParseError::ForbiddenChar { ch, offset });
        }
        let (name, address) = match entry.split_once('=') {
            Some((name, address)) => (Some(name.parse::<ServerName>()?), address),
            None => (None, entry),
        };
        if address.is_empty() {
            return Err(MemberParseError::MissingAddress);
        }
        let (host, port) = split_host_port(address, default_port)?;
        Member::new(host, port, name)
    }

    pub fn name(&self) -> &ServerName {
        &self.name
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the operator chose the name (as opposed to it being derived from the address).
    pub fn has_explicit_name(&self) -> bool {
        self.named
    }

    /// Whether both members point at the same host and port, whatever their names.
    pub fn same_address(&self, other: &Member) -> bool {
        self.host == other.host && self.port == other.port
    }

    /// `host:port` with IPv6 in brackets, without the name.
    pub fn address(&self) -> Address<'_> {
        Address(self)
    }

    /// The socket address, when the host is an IP address.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Dns(_) => None,
        }
    }
}

/// Displays a member's `host:port` (see [`Member::address`]).
#[derive(Debug, Clone, Copy)]
pub struct Address<'a>(&'a Member);

impl fmt::Display for Address<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Member { host, port, .. } = self.0;
        match host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{port}"),
            _ => write!(f, "{host}:{port}"),
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.named {
            write!(f, "{}=", self.name)?;
        }
        self.address().fmt(f)
    }
}

/// Parses one entry with [`DEFAULT_PORT`]; see [`Member::parse`].
impl FromStr for Member {
    type Err = MemberParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Member::parse(s, DEFAULT_PORT)
    }
}

impl Ord for Member {
    fn cmp(&self, other: &Self) -> Ordering {
        (&self.host, self.port, &self.name).cmp(&(&other.host, other.port, &other.name))
    }
}

impl PartialOrd for Member {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// As its canonical string.
impl Serialize for Member {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// From one entry string, with [`DEFAULT_PORT`] when it names no port.
impl<'de> Deserialize<'de> for Member {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn check_usable(ip: IpAddr) -> Result<(), MemberParseError> {
    let reason = match ip {
        _ if ip.is_unspecified() => Some("it is the unspecified address"),
        _ if ip.is_multicast() => Some("it is a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("it is the broadcast address"),
        // NOTE: fe80::/10 is reachable only with a zone id, and zone ids are refused because `%`
        // has meaning in HAProxy's configuration.
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => {
            Some("a link-local IPv6 address needs a zone id, which is not supported")
        }
        _ => None,
    };
    match reason {
        Some(reason) => Err(MemberParseError::UnusableAddress { ip, reason }),
        None => Ok(()),
    }
}

fn split_host_port(address: &str, default_port: u16) -> Result<(Host, u16), MemberParseError> {
    if let Some(rest) = address.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(MemberParseError::UnclosedBracket)?;
        let ip: Ipv6Addr = inside.parse().map_err(|_| MemberParseError::InvalidHost {
            host: inside.to_owned(),
            reason: "not an IPv6 address (brackets are only for IPv6 addresses)",
        })?;
        let port = if after.is_empty() {
            default_port
        } else if let Some(port) = after.strip_prefix(':') {
            parse_port(port)?
        } else {
            return Err(MemberParseError::AfterBracket { rest: after.to_owned() });
        };
        return Ok((Host::Ip(IpAddr::V6(ip)), port));
    }
    if address.contains(['[', ']']) {
        return Err(MemberParseError::InvalidHost {
            host: address.to_owned(),
            reason: "brackets go around a whole IPv6 address, as in [fd00::11]:6443",
        });
    }
    match address.split(':').count() {
        1 => Ok((ipv4_or_dns(address)?, default_port)),
        2 => {
            let (host, port) = address.split_once(':').expect("one ':'");
            let port = parse_port(port)?;
            Ok((ipv4_or_dns(host)?, port))
        }
        _ => {
            let ip: Ipv6Addr = address.parse().map_err(|_| MemberParseError::InvalidHost {
                host: address.to_owned(),
                reason: "not an IPv6 address (write an IPv6 address with a port as [address]:port)",
            })?;
            Ok((Host::Ip(IpAddr::V6(ip)), default_port))
        }
    }
}

fn ipv4_or_dns(host: &str) -> Result<Host, MemberParseError> {
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    host.parse().map(Host::Dns)
}

fn parse_port(port: &str) -> Result<u16, MemberParseError> {
    let invalid = |reason| MemberParseError::InvalidPort { port: port.to_owned(), reason };
    if port.is_empty() {
        return Err(invalid("empty"));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("a port is a decimal number"));
    }
    if port == "0" {
        return Err(invalid("port 0 is not allowed"));
    }
    if port.starts_with('0') {
        return Err(invalid("a port has no leading zeros"));
    }
    match port.parse::<u16>() {
        Ok(n) => Ok(n),
        Err(_) => Err(invalid("a port is at most 65535")),
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    fn member(s: &str) -> Member {
        s.parse().unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn err(s: &str) -> MemberParseError {
        match s.parse::<Member>() {
            Ok(m) => panic!("{s:?} should be refused, got {m:?}"),
            Err(e) => e,
        }
    }

    fn ip(s: &str) -> Host {
        Host::Ip(s.parse().unwrap())
    }

    #[test]
    fn accepted_forms_and_their_parts() {
        let cases: &[(&str, Host, u16, &str, &str)] = &[
            ("10.0.0.11", ip("10.0.0.11"), 6443, "m-10.0.0.11-6443", "10.0.0.11:6443"),
            ("10.0.0.11:6443", ip("10.0.0.11"), 6443, "m-10.0.0.11-6443", "10.0.0.11:6443"),
            ("10.0.0.11:443", ip("10.0.0.11"), 443, "m-10.0.0.11-443", "10.0.0.11:443"),
            ("[fd00::11]:6443", ip("fd00::11"), 6443, "m-fd00__11-6443", "[fd00::11]:6443"),
            ("[fd00::11]", ip("fd00::11"), 6443, "m-fd00__11-6443", "[fd00::11]:6443"),
            ("fd00::11", ip("fd00::11"), 6443, "m-fd00__11-6443", "[fd00::11]:6443"),
            (
                "cp-1.example.internal:6443",
                Host::Dns("cp-1.example.internal".parse().unwrap()),
                6443,
                "m-cp-1.example.internal-6443",
                "cp-1.example.internal:6443",
            ),
            ("cp1=10.0.0.11:6443", ip("10.0.0.11"), 6443, "cp1", "cp1=10.0.0.11:6443"),
            ("cp3=[fd00::13]:6443", ip("fd00::13"), 6443, "cp3", "cp3=[fd00::13]:6443"),
            ("cp3=fd00::13", ip("fd00::13"), 6443, "cp3", "cp3=[fd00::13]:6443"),
            (
                "Cp_3.a-b=localhost",
                Host::Dns("localhost".parse().unwrap()),
                6443,
                "Cp_3.a-b",
                "Cp_3.a-b=localhost:6443",
            ),
            ("127.0.0.1:65535", ip("127.0.0.1"), 65535, "m-127.0.0.1-65535", "127.0.0.1:65535"),
            ("[::1]:1", ip("::1"), 1, "m-__1-1", "[::1]:1"),
            ("::ffff:10.0.0.1", ip("::ffff:10.0.0.1"), 6443, "m-__ffff_10.0.0.1-6443", "[::ffff:10.0.0.1]:6443"),
        ];
        for (input, host, port, name, canonical) in cases {
            let m = member(input);
            assert_eq!(m.host(), host, "{input}");
            assert_eq!(m.port(), *port, "{input}");
            assert_eq!(m.name().as_str(), *name, "{input}");
            assert_eq!(m.to_string(), *canonical, "{input}");
            assert_eq!(member(canonical), m, "{input}");
        }
    }

    #[test]
    fn canonical_form_normalises_case_and_ipv6_spelling() {
        assert_eq!(member("CP-1.Example.INTERNAL").to_string(), "cp-1.example.internal:6443");
        assert_eq!(member("[FD00:0:0:0:0:0:0:11]:6443").to_string(), "[fd00::11]:6443");
        assert_eq!(member("FD00:0000::0011").to_string(), "[fd00::11]:6443");
        assert_eq!(member("cp1=[FD00::0:13]").to_string(), "cp1=[fd00::13]:6443");
        // Server names keep their case: HAProxy compares them exactly.
        assert_eq!(member("CP1=10.0.0.1").name().as_str(), "CP1");
    }

    #[test]
    fn explicit_name_equal_to_the_derived_one_is_not_written() {
        let m = member("m-10.0.0.11-6443=10.0.0.11:6443");
        assert!(!m.has_explicit_name());
        assert_eq!(m, member("10.0.0.11"));
        assert_eq!(m.to_string(), "10.0.0.11:6443");
        assert!(member("cp1=10.0.0.11").has_explicit_name());
    }

    #[test]
    fn default_port_comes_from_the_caller() {
        let m = Member::parse("10.0.0.11", 8443).unwrap();
        assert_eq!(m.port(), 8443);
        assert_eq!(m.to_string(), "10.0.0.11:8443");
        assert_eq!(Member::parse("[fd00::1]", 7443).unwrap().port(), 7443);
        assert_eq!(Member::parse("fd00::1", 7443).unwrap().port(), 7443);
        assert_eq!(Member::parse("a:9", 7443).unwrap().port(), 9);
    }

    #[test]
    fn bare_ipv6_with_what_looks_like_a_port_is_an_address() {
        let m = member("fd00::11:6443");
        assert_eq!(m.host(), &ip("fd00::11:6443"));
        assert_eq!(m.port(), 6443);
        assert_eq!(m.to_string(), "[fd00::11:6443]:6443");
    }

    #[test]
    fn address_and_socket_addr() {
        let m = member("cp3=[fd00::13]:7443");
        assert_eq!(m.address().to_string(), "[fd00::13]:7443");
        assert_eq!(m.socket_addr(), Some("[fd00::13]:7443".parse().unwrap()));
        assert_eq!(member("k8s.example:1").socket_addr(), None);
        assert_eq!(member("k8s.example:1").address().to_string(), "k8s.example:1");
        assert!(member("a=10.0.0.1").same_address(&member("10.0.0.1:6443")));
        assert!(!member("10.0.0.1:6444").same_address(&member("10.0.0.1:6443")));
    }

    #[test]
    fn refused_forms() {
        use MemberParseError as E;
        type Check = fn(&MemberParseError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, E::Empty)),
            ("10.0.0.11:0", |e| matches!(e, E::InvalidPort { .. })),
            ("10.0.0.11:65536", |e| matches!(e, E::InvalidPort { .. })),
            ("10.0.0.11:06443", |e| matches!(e, E::InvalidPort { .. })),
            ("10.0.0.11:", |e| matches!(e, E::InvalidPort { .. })),
            ("10.0.0.11:6443a", |e| matches!(e, E::InvalidPort { .. })),
            ("10.0.0.11:-1", |e| matches!(e, E::InvalidPort { .. })),
            ("10.0.0.11:99999999999999999999", |e| matches!(e, E::InvalidPort { .. })),
            ("[fd00::11]:0", |e| matches!(e, E::InvalidPort { .. })),
            ("1.2.3.999", |e| matches!(e, E::InvalidHost { .. })),
            ("1.2.3", |e| matches!(e, E::InvalidHost { .. })),
            ("010.0.0.1", |e| matches!(e, E::InvalidHost { .. })),
            ("1.2.3.4.5", |e| matches!(e, E::InvalidHost { .. })),
            ("host.123", |e| matches!(e, E::InvalidHost { .. })),
            ("-cp.example", |e| matches!(e, E::InvalidHost { .. })),
            ("cp-.example", |e| matches!(e, E::InvalidHost { .. })),
            ("cp..example", |e| matches!(e, E::InvalidHost { .. })),
            (".example", |e| matches!(e, E::InvalidHost { .. })),
            ("cp.example.", |e| matches!(e, E::InvalidHost { .. })),
            ("cp_1.example", |e| matches!(e, E::InvalidHost { .. })),
            (":6443", |e| matches!(e, E::InvalidHost { .. })),
            ("[10.0.0.1]:6443", |e| matches!(e, E::InvalidHost { .. })),
            ("[cp.example]:6443", |e| matches!(e, E::InvalidHost { .. })),
            ("[fd00::11", |e| matches!(e, E::UnclosedBracket)),
            ("[fd00::11]6443", |e| matches!(e, E::AfterBracket { .. })),
            ("[fd00::11]:6443]", |e| matches!(e, E::InvalidPort { .. })),
            ("fd00::11]", |e| matches!(e, E::InvalidHost { .. })),
            ("10.0.0.1[", |e| matches!(e, E::InvalidHost { .. })),
            ("fd00:::11", |e| matches!(e, E::InvalidHost { .. })),
            ("gggg::1", |e| matches!(e, E::InvalidHost { .. })),
            ("=10.0.0.1", |e| matches!(e, E::InvalidName { .. })),
            ("-cp=10.0.0.1", |e| matches!(e, E::InvalidName { .. })),
            ("_cp=10.0.0.1", |e| matches!(e, E::InvalidName { .. })),
            ("cp:1=10.0.0.1", |e| matches!(e, E::InvalidName { .. })),
            ("cp1=", |e| matches!(e, E::MissingAddress)),
            ("cp1=cp2=10.0.0.1", |e| matches!(e, E::InvalidHost { .. })),
            ("0.0.0.0", |e| matches!(e, E::UnusableAddress { .. })),
            ("[::]:6443", |e| matches!(e, E::UnusableAddress { .. })),
            ("224.0.0.1", |e| matches!(e, E::UnusableAddress { .. })),
            ("255.255.255.255", |e| matches!(e, E::UnusableAddress { .. })),
            ("ff02::1", |e| matches!(e, E::UnusableAddress { .. })),
            ("fe80::1", |e| matches!(e, E::UnusableAddress { .. })),
            ("fe80::1%eth0", |e| matches!(e, E::ForbiddenChar { ch: '%', offset: 7 })),
            ("https://10.0.0.1:6443", |e| matches!(e, E::ForbiddenChar { ch: '/', .. })),
            ("10.0.0.1/24", |e| matches!(e, E::ForbiddenChar { ch: '/', .. })),
        ];
        for (input, expected) in cases {
            let e = err(input);
            assert!(expected(&e), "{input:?} gave {e:?}");
        }
    }

    #[test]
    fn name_limits() {
        let name63 = format!("a{}", "b".repeat(62));
        let m = member(&format!("{name63}=10.0.0.1"));
        assert_eq!(m.name().as_str(), name63);
        let e = err(&format!("{name63}c=10.0.0.1"));
        assert!(matches!(e, MemberParseError::InvalidName { .. }), "{e:?}");
        assert!("9.a".parse::<ServerName>().is_ok());
        for bad in ["", ".a"] {
            let e = bad.parse::<ServerName>().unwrap_err();
            assert!(matches!(e, MemberParseError::InvalidName { .. }), "{bad:?}: {e:?}");
        }
    }

    #[test]
    fn dns_limits() {
        let label63 = "a".repeat(63);
        assert!(member(&format!("{label63}.example")).host() != &ip("10.0.0.1"));
        assert!(matches!(err(&format!("a{label63}.example")), MemberParseError::InvalidHost { .. }));
        // 4 labels of 63 plus 3 dots: 255 characters.
        let long = [label63.as_str(); 4].join(".");
        assert!(matches!(err(&long), MemberParseError::InvalidHost { .. }));
        // 253 characters exactly.
        let max = format!("{}.{}.{}.{}", label63, label63, label63, "a".repeat(61));
        assert_eq!(max.len(), 253);
        assert_eq!(member(&max).host().to_string(), max);
        assert!(matches!(err(&format!("{max}a")), MemberParseError::InvalidHost { .. }));
        // Single labels are host names too, digits allowed before the last label.
        assert!(member("localhost").socket_addr().is_none());
        assert!(member("10.0.0.cp1").socket_addr().is_none());
        assert!(member("1a").socket_addr().is_none());
    }

    #[test]
    fn injection_attempts_are_refused_by_the_character_check() {
        let cases = [
            ("10.0.0.1\nprogram x", '\n'),
            ("10.0.0.1\r\n", '\r'),
            ("10.0.0.1;shutdown sessions server be/s", ';'),
            ("10.0.0.1:6443;", ';'),
            ("10.0.0.1#", '#'),
            ("10.0.0.1\0", '\0'),
            ("10.0.0.1 check", ' '),
            ("10.0.0.1\tcheck", '\t'),
            ("'10.0.0.1'", '\''),
            ("\"10.0.0.1\"", '"'),
            ("cp1=10.0.0.1\u{b}", '\u{b}'),
            ("10.0.0.1\u{a0}", '\u{a0}'),
            // Cyrillic 'а' in place of a Latin 'a'.
            ("cp-1.ex\u{430}mple", '\u{430}'),
            ("cp-1.example\u{202e}", '\u{202e}'),
            ("１0.0.0.1", '１'),
            ("10.0.0.1$(reboot)", '$'),
            ("10.0.0.1`id`", '`'),
            ("cp1=10.0.0.1\\n", '\\'),
            ("10.0.0.1,10.0.0.2", ','),
            ("${IP}", '$'),
        ];
        for (input, ch) in cases {
            match err(input) {
                MemberParseError::ForbiddenChar { ch: got, offset } => {
                    assert_eq!(got, ch, "{input:?}");
                    assert_eq!(input[offset..].chars().next(), Some(ch), "{input:?}");
                }
                other => panic!("{input:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn error_messages_escape_what_they_quote() {
        let msg = err("10.0.0.1\nlevel=error forged").to_string();
        assert!(!msg.contains('\n'), "{msg:?}");
        assert!(msg.contains("'\\n'"), "{msg:?}");
        let msg = err("cp-1.example\u{202e}").to_string();
        assert!(!msg.contains('\u{202e}'), "{msg:?}");
        assert!(msg.contains("'\\u{202e}' (U+202E)"), "{msg:?}");
        // Lookalikes are shown escaped, not as the letter they imitate.
        let msg = err("cp-1.ex\u{430}mple").to_string();
        assert!(msg.contains("'\\u{430}'"), "{msg:?}");
        // Text quoted by the public parsers of the parts is escaped as well.
        let msg = "a\nb".parse::<ServerName>().unwrap_err().to_string();
        assert_eq!(msg, "invalid server name \"a\\nb\": only letters, digits, '_', '.' and '-' are allowed");
        let msg = "\"x\u{430}".parse::<DnsName>().unwrap_err().to_string();
        assert!(msg.starts_with("invalid host \"\\\"x\\u{430}\""), "{msg}");
        let msg = err("10.0.0.1#x").to_string();
        assert!(msg.contains("comment"), "{msg:?}");
    }

    #[test]
    fn very_long_entry_is_refused_on_length() {
        let e = err(&"a".repeat(100_000));
        assert_eq!(e, MemberParseError::TooLong { len: 100_000, max: MAX_ENTRY_LEN });
        let label63 = "a".repeat(63);
        let dns253 = format!("{label63}.{label63}.{label63}.{}", "b".repeat(61));
        let longest = format!("{}={dns253}:65535", "n".repeat(63));
        assert_eq!(longest.len(), MAX_ENTRY_LEN);
        assert_eq!(member(&longest).to_string(), longest);
    }

    #[test]
    fn derived_names_are_distinct_and_valid() {
        let inputs = [
            "10.0.0.1",
            "10.0.0.1:6444",
            "10.0.0.10",
            "fd00::1",
            "fd00::1:0",
            "::ffff:10.0.0.1",
            "a-b.c",
            "a.b-c",
            "a-b-c",
        ];
        let names: std::collections::BTreeSet<_> = inputs.iter().map(|s| member(s).name().clone()).collect();
        assert_eq!(names.len(), inputs.len(), "{names:?}");
        for name in &names {
            assert_eq!(name.as_str().parse::<ServerName>().as_ref(), Ok(name));
        }
    }

    #[test]
    fn long_dns_names_get_a_hashed_derived_name() {
        let a = format!("{}.example", "a".repeat(60));
        let b = format!("{}.examplf", "a".repeat(60));
        let (ma, mb) = (member(&a), member(&b));
        for m in [&ma, &mb] {
            let name = m.name().as_str();
            assert_eq!(name.len(), MAX_SERVER_NAME_LEN, "{name}");
            assert!(name.starts_with("m-aaaa"), "{name}");
            assert!(name.ends_with("-6443"), "{name}");
            assert!(name.contains("_h"), "{name}");
            assert_eq!(name.parse::<ServerName>().as_ref(), Ok(m.name()));
        }
        assert_ne!(ma.name(), mb.name());
        // Stable across runs and releases: pinned.
        assert_eq!(ma.name().as_str(), "m-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa_hf5dc9f3f0babbea9-6443");
        assert_eq!(format!("{:016x}", fnv1a64(a.as_bytes())), "f5dc9f3f0babbea9");
        let short_port = member(&format!("{a}:1"));
        assert_eq!(short_port.name().as_str().len(), MAX_SERVER_NAME_LEN);
        assert!(short_port.name().as_str().ends_with("-1"));
        // The longest name that fits is kept whole.
        let fits = format!("{}.ab", "a".repeat(53));
        assert_eq!(member(&fits).name().as_str(), format!("m-{fits}-6443"));
        assert_eq!(member(&fits).name().as_str().len(), 63);
    }

    #[test]
    fn fnv1a64_known_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn members_sort_by_host_then_port_then_name() {
        let mut v = [
            member("b.example"),
            member("fd00::1"),
            member("10.0.0.2"),
            member("10.0.0.10:1"),
            member("10.0.0.10"),
            member("a.example"),
        ];
        v.sort();
        let text: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            ["10.0.0.2:6443", "10.0.0.10:1", "10.0.0.10:6443", "[fd00::1]:6443", "a.example:6443", "b.example:6443"]
        );
    }

    #[test]
    fn new_checks_port_and_address() {
        let e = Member::new(ip("10.0.0.1"), 0, None).unwrap_err();
        assert!(matches!(e, MemberParseError::InvalidPort { .. }), "{e:?}");
        let e = Member::new(ip("0.0.0.0"), 1, None).unwrap_err();
        assert!(e.to_string().contains("0.0.0.0"), "the unusable address is named: {e}");
        let m = Member::new(ip("10.0.0.1"), 1, Some("x".parse().unwrap())).unwrap();
        assert_eq!(m.to_string(), "x=10.0.0.1:1");
    }

    #[test]
    fn host_from_str() {
        assert_eq!("fd00::1".parse::<Host>(), Ok(ip("fd00::1")));
        assert_eq!("10.1.2.3".parse::<Host>(), Ok(ip("10.1.2.3")));
        assert_eq!("A.b".parse::<Host>().unwrap().to_string(), "a.b");
        let e = "[fd00::1]".parse::<Host>().unwrap_err();
        assert!(format!("{e:?}").contains("fd00::1"), "{e:?}");
    }

    #[test]
    fn serde_as_canonical_string() {
        let m = member("CP1=[FD00::13]");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#""CP1=[fd00::13]:6443""#);
        assert_eq!(serde_json::from_str::<Member>(&json).unwrap(), m);
        let e = serde_json::from_str::<Member>(r#""10.0.0.1;x""#).unwrap_err();
        assert!(e.to_string().contains("';'"), "{e}");
    }
}
