//! Property tests: whatever the input, an accepted member renders to the strict canonical grammar,
//! reads back to itself, and carries a valid HAProxy server name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;
use crate::yaml;

fn opts() -> ParseOptions {
    ParseOptions { allow_empty: true, max_members: 64, ..ParseOptions::default() }
}

/// `[A-Za-z0-9][A-Za-z0-9_.-]{0,62}`, written out independently of the parser.
fn is_server_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

fn is_canonical_port(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && !s.starts_with('0')
        && s.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p))
}

fn is_canonical_dns(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    s.len() <= 253
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && labels.last().is_some_and(|l| l.bytes().any(|b| b.is_ascii_lowercase()))
}

/// The canonical grammar: `[name=](ipv4|dns|'[' ipv6 ']') ':' port`, each part in its one
/// spelling (Rust's and RFC 5952's compressed lowercase IPv6, dotted-decimal IPv4 without leading
/// zeros, lowercase DNS), and only characters that mean nothing to haproxy.cfg or the Runtime API.
fn is_canonical(text: &str) -> bool {
    if !text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:[]=-".contains(&b)) {
        return false;
    }
    let address = match text.split_once('=') {
        Some((name, address)) => {
            if !is_server_name(name) {
                return false;
            }
            address
        }
        None => text,
    };
    if let Some(rest) = address.strip_prefix('[') {
        let Some((ip, port)) = rest.split_once("]:") else {
            return false;
        };
        return ip.parse::<Ipv6Addr>().is_ok_and(|v6| v6.to_string() == ip) && is_canonical_port(port);
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.parse::<Ipv4Addr>() {
        Ok(v4) => v4.to_string() == host,
        Err(_) => is_canonical_dns(host),
    };
    host_ok && is_canonical_port(port)
}

/// Checks every member of an accepted set, and the set's own round trips.
fn check_accepted(set: &MemberSet) -> Result<(), TestCaseError> {
    for member in set {
        let text = member.to_string();
        prop_assert!(is_canonical(&text), "not canonical: {text:?}");
        prop_assert!(is_server_name(member.name().as_str()), "bad server name: {:?}", member.name());
        let reread = text.parse::<Member>();
        prop_assert_eq!(reread.as_ref(), Ok(member), "{:?} does not read back", text);
        // The default port must not matter once the port is written.
        let reread = Member::parse(&text, 1);
        prop_assert_eq!(reread.as_ref(), Ok(member));
    }
    let rendered = set.to_string();
    prop_assert_eq!(&parse(&rendered, &opts()).unwrap(), set);
    let state = yaml::to_string(set).unwrap();
    prop_assert_eq!(&yaml::from_str::<MemberSet>(&state).unwrap(), set);
    let names: std::collections::BTreeSet<_> = set.iter().map(|m| m.name()).collect();
    prop_assert_eq!(names.len(), set.len(), "server names are not unique");
    Ok(())
}

/// A host as generated, with the text used to write it and what it must parse to.
#[derive(Debug, Clone)]
struct GenHost {
    text: String,
    expected: Host,
    is_v6: bool,
}

fn ipv6_strategy() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        // Runs of zero groups, so that `::` appears.
        prop::array::uniform8(prop_oneof![3 => Just(0u16), 2 => any::<u16>()]).prop_map(Ipv6Addr::from),
        any::<u128>().prop_map(Ipv6Addr::from),
        any::<[u8; 4]>().prop_map(|o| Ipv4Addr::from(o).to_ipv6_mapped()),
    ]
}

fn host_strategy() -> impl Strategy<Value = GenHost> {
    let v4 = any::<[u8; 4]>().prop_map(|o| {
        let ip = Ipv4Addr::from(o);
        GenHost { text: ip.to_string(), expected: Host::Ip(IpAddr::V4(ip)), is_v6: false }
    });
    let v6 = (ipv6_strategy(), 0..3u8).prop_map(|(ip, spelling)| {
        let full = || ip.segments().iter().map(|s| format!("{s:x}")).collect::<Vec<_>>().join(":");
        let text = match spelling {
            0 => ip.to_string(),
            1 => full(),
            _ => full().to_ascii_uppercase(),
        };
        GenHost { text, expected: Host::Ip(IpAddr::V6(ip)), is_v6: true }
    });
    let dns = (
        prop::collection::vec("[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", 0..4),
        "[a-zA-Z]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?",
    )
        .prop_map(|(mut labels, last)| {
            labels.push(last);
            let text = labels.join(".");
            GenHost { expected: Host::Dns(text.to_ascii_lowercase().parse().unwrap()), text, is_v6: false }
        });
    prop_oneof![v4, v6, dns]
}

/// A well-formed entry and the member it must parse to, or `None` when the parser must refuse it
/// (port 0, or an address that cannot be a server).
#[derive(Debug, Clone)]
struct GenEntry {
    text: String,
    host: Host,
    port: u16,
    name: Option<String>,
    must_refuse: bool,
}

fn entry_strategy() -> impl Strategy<Value = GenEntry> {
    (
        host_strategy(),
        prop::option::of(any::<u16>()),
        prop::option::of("[A-Za-z0-9][A-Za-z0-9_.-]{0,20}"),
        any::<bool>(),
    )
        .prop_map(|(host, port, name, brackets)| {
            let address = match (host.is_v6, port) {
                (true, Some(p)) => format!("[{}]:{p}", host.text),
                (true, None) if brackets => format!("[{}]", host.text),
                (_, Some(p)) => format!("{}:{p}", host.text),
                (_, None) => host.text.clone(),
            };
            let text = match &name {
                Some(n) => format!("{n}={address}"),
                None => address,
            };
            let unusable = match &host.expected {
                Host::Ip(ip) => {
                    ip.is_unspecified()
                        || ip.is_multicast()
                        || *ip == IpAddr::V4(Ipv4Addr::BROADCAST)
                        || matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
                }
                Host::Dns(_) => false,
            };
            GenEntry {
                text,
                host: host.expected,
                port: port.unwrap_or(DEFAULT_PORT),
                name,
                must_refuse: unusable || port == Some(0),
            }
        })
}

/// Entries that look right at a glance: octets past 255, leading zeros, stray brackets and
/// hyphens, ports past 65535, names starting with '_' or '.', uppercase hex and names.
const NEAR_VALID_TOKEN: &str = "([A-Za-z0-9_.-]{1,5}=)?(([0-9]{1,3}\\.){3}[0-9]{1,3}|\\[?[0-9a-fA-F:]{2,14}\\]?|[a-zA-Z0-9-]{1,6}(\\.[a-zA-Z0-9-]{1,6}){0,2})(:[0-9]{1,6})?";

const NASTY: &[char] = &[
    ' ', '\n', '\r', '\t', ';', '#', '\0', '%', '"', '\'', ',', ':', '[', ']', '=', '.', '-', '_', '/', '\\', 'x', '0',
    '9', '\u{430}', '\u{202e}', '\u{2028}', '\u{ff1a}', '\u{a0}', '\u{7f}',
];

/// Entries joined in one of the accepted shapes.
fn render_list(entries: &[String], shape: u8) -> String {
    match shape {
        0 => entries.join(", "),
        1 => entries.join("\n"),
        // Spaces and tabs around entries, blank lines, a comment line.
        2 => format!("# members\n \t{}\t\n", entries.join(" ,\t\n\n  ")),
        3 => entries.iter().map(|e| format!("- \"{e}\"\n")).collect(),
        _ => format!("[{}]", entries.iter().map(|e| format!("'{e}'")).collect::<Vec<_>>().join(", ")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_strings_never_yield_a_non_canonical_member(input in any::<String>()) {
        if let Ok(set) = parse(&input, &opts()) {
            check_accepted(&set)?;
        }
    }

    #[test]
    fn near_valid_strings_never_yield_a_non_canonical_member(
        input in "[-a-fA-F0-9xyz.:\\[\\]=_, \n#%;'\"]{0,48}"
    ) {
        if let Ok(set) = parse(&input, &opts()) {
            check_accepted(&set)?;
        }
    }

    #[test]
    fn near_valid_tokens_never_yield_a_non_canonical_member(
        tokens in prop::collection::vec(NEAR_VALID_TOKEN, 1..4),
        separator in prop::sample::select(&[", ", "\n", " ", ","][..]),
    ) {
        if let Ok(set) = parse(&tokens.join(separator), &opts()) {
            check_accepted(&set)?;
        }
    }

    #[test]
    fn well_formed_entries_parse_to_what_was_written(entry in entry_strategy()) {
        match entry.text.parse::<Member>() {
            Ok(member) => {
                prop_assert!(!entry.must_refuse, "{:?} should be refused", entry.text);
                prop_assert_eq!(member.host(), &entry.host);
                prop_assert_eq!(member.port(), entry.port);
                match &entry.name {
                    Some(name) => prop_assert_eq!(member.name().as_str(), name.as_str()),
                    None => {
                        prop_assert!(!member.has_explicit_name());
                        prop_assert_eq!(member.name(), &ServerName::derived(&entry.host, entry.port));
                    }
                }
                let set = MemberSet::from_members([member]).unwrap();
                check_accepted(&set)?;
            }
            Err(e) => prop_assert!(entry.must_refuse, "{:?} refused: {}", entry.text, e),
        }
    }

    #[test]
    fn well_formed_lists_parse_in_every_shape(
        entries in prop::collection::vec(entry_strategy(), 1..8),
        shape in 0..5u8,
    ) {
        let texts: Vec<String> = entries.iter().map(|e| e.text.clone()).collect();
        let input = render_list(&texts, shape);
        let result = parse(&input, &opts());
        if entries.iter().any(|e| e.must_refuse) {
            prop_assert!(result.is_err(), "{:?} should be refused", input);
        } else if let Ok(set) = result {
            // Names or addresses may repeat by chance; then a refusal is right, checked below.
            check_accepted(&set)?;
            for entry in &entries {
                prop_assert!(
                    set.iter().any(|m| m.host() == &entry.host && m.port() == entry.port),
                    "{:?} missing from {}", entry.text, set
                );
            }
        } else {
            let e = result.unwrap_err();
            prop_assert!(
                matches!(e, MembersError::DuplicateName { .. } | MembersError::DuplicateAddress { .. }),
                "{:?} refused: {}", input, e
            );
        }
    }

    #[test]
    fn words_on_one_line_are_one_entry_and_refused(
        entries in prop::collection::vec(entry_strategy(), 2..4),
        gap in prop::sample::select(&[" ", "\t", "  ", " \t "][..]),
    ) {
        // Well-formed entries, several on the second line: that line is one entry, refused for
        // its white space (the grammar checks characters first), whatever its words are.
        let words: Vec<String> = entries.iter().map(|e| e.text.clone()).collect();
        let input = format!("cp0=192.0.2.1\n{}\n", words.join(gap));
        let e = parse(&input, &opts()).unwrap_err();
        prop_assert!(
            matches!(
                &e,
                MembersError::InvalidEntry { position: 2, reason: MemberParseError::ForbiddenChar { ch, .. }, .. }
                    if ch.is_whitespace()
            ) || matches!(&e, MembersError::InvalidEntry { position: 2, reason: MemberParseError::TooLong { .. }, .. }),
            "{:?} gave {:?}", input, e
        );
    }

    #[test]
    fn mutated_lists_never_yield_a_non_canonical_member(
        entries in prop::collection::vec(entry_strategy(), 1..5),
        shape in 0..5u8,
        mutations in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(NASTY)), 1..4),
    ) {
        let texts: Vec<String> = entries.iter().map(|e| e.text.clone()).collect();
        let mut input = render_list(&texts, shape);
        for (at, ch) in mutations {
            let boundaries: Vec<usize> =
                input.char_indices().map(|(i, _)| i).chain([input.len()]).collect();
            input.insert(*at.get(&boundaries), ch);
        }
        match parse(&input, &opts()) {
            Ok(set) => check_accepted(&set)?,
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(
                    msg.chars().all(|c| c == ' ' || c.is_ascii_graphic()),
                    "error message is not plain ASCII: {:?}", msg
                );
            }
        }
    }
}

#[test]
fn the_oracle_itself_rejects_what_it_must() {
    for bad in [
        "10.0.0.1",
        "10.0.0.1:06443",
        "010.0.0.1:1",
        "[FD00::1]:1",
        "[fd00:0::1]:1",
        "fd00::1:1",
        "Cp.example:1",
        "cp.example.:1",
        "-a.example:1",
        "a.1:1",
        "_x=10.0.0.1:1",
        "x=10.0.0.1:1;",
        "x=10.0.0.1:1\n",
        "10.0.0.1:0",
        "10.0.0.1:65536",
    ] {
        assert!(!is_canonical(bad), "{bad:?}");
    }
    for good in ["10.0.0.1:1", "[fd00::1]:65535", "cp-1.example:6443", "A_b.c-9=[::ffff:1.2.3.4]:6443"] {
        assert!(is_canonical(good), "{good:?}");
    }
}
