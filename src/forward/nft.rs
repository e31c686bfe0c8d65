//! The nftables backend: one table, `inet cpha`, with NAT base chains for prerouting (traffic
//! from other hosts), output (traffic from this host: kubeadm, kubelet) and postrouting
//! (masquerade for forwarded flows that leave for another host).
//!
//! Every change is one `nft -f` transaction. The table and its base chains are never deleted
//! while forwarding or retargeting: only the rules in them are flushed and re-added, so the
//! netns keeps its NAT hooks and established connections keep their mapping (design note 12,
//! docs/design-notes.md#conntrack-and-nat-hooks). The prerouting chain carries an "anchor" rule
//! whose comment records the listen address, so a draining table can still be matched to its
//! conntrack flows.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use serde_json::Value;

use super::kernel::{Change, Installed, InstalledState, KernelBackend, Snapshot};
use super::spec::ForwardSpec;
use crate::exec::{self, ExecError};

pub const TABLE: &str = "cpha";
/// netlink's family number of `inet` tables.
const NFPROTO_INET: u8 = 1;
const ANCHOR: &str = "cpha-anchor listen=";
const CHAINS: &str = "\tchain prerouting {\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t}\n\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\t}\n\tchain postrouting {\n\t\ttype nat hook postrouting priority 100; policy accept;\n\t}\n";

/// The transaction that installs `spec` or replaces whatever the table held.
pub fn render_install(spec: &ForwardSpec) -> String {
    let mut s = render_skeleton();
    let _ = writeln!(s, "add rule inet {TABLE} prerouting {}", anchor_rule(spec.listen));
    let forward = format!("{} counter {} comment \"cpha-forward\"", listen_match(spec), dnat(spec));
    if spec.takes_remote_traffic() {
        let _ = writeln!(s, "add rule inet {TABLE} prerouting {forward}");
    }
    let _ = writeln!(s, "add rule inet {TABLE} output {forward}");
    if spec.takes_remote_traffic() {
        let _ = writeln!(s, "add rule inet {TABLE} postrouting {}", masquerade(spec));
    }
    s
}

/// The transaction that removes the forwarding rules but keeps chains and anchor.
pub fn render_withdraw(listen: SocketAddr) -> String {
    let mut s = render_skeleton();
    let _ = writeln!(s, "add rule inet {TABLE} prerouting {}", anchor_rule(listen));
    s
}

fn render_skeleton() -> String {
    format!(
        "table inet {TABLE} {{\n\tcomment \"cpha bootstrap forward; remove with: cpha cleanup\"\n{CHAINS}}}\nflush chain inet {TABLE} prerouting\nflush chain inet {TABLE} output\nflush chain inet {TABLE} postrouting\n"
    )
}

fn anchor_rule(listen: SocketAddr) -> String {
    // NOTE: a conntrack expression keeps conntrack registered in the netns while flows drain.
    format!("ct state established,related counter comment \"{ANCHOR}{listen}\"")
}

fn family(ip: IpAddr) -> (&'static str, &'static str) {
    match ip {
        IpAddr::V4(_) => ("ip", "ipv4"),
        IpAddr::V6(_) => ("ip6", "ipv6"),
    }
}

fn listen_match(spec: &ForwardSpec) -> String {
    let (proto, nfproto) = family(spec.listen.ip());
    if spec.is_wildcard() {
        format!("meta nfproto {nfproto} fib daddr type local tcp dport {}", spec.listen.port())
    } else {
        format!("{proto} daddr {} tcp dport {}", spec.listen.ip(), spec.listen.port())
    }
}

fn dnat(spec: &ForwardSpec) -> String {
    let (proto, _) = family(spec.listen.ip());
    if let [only] = spec.targets.as_slice() {
        return format!("dnat {proto} to {only}");
    }
    let elements: Vec<String> =
        spec.targets.iter().enumerate().map(|(i, t)| format!("{i} : {} . {}", t.ip(), t.port())).collect();
    format!("dnat {proto} to numgen inc mod {} map {{ {} }}", spec.targets.len(), elements.join(", "))
}

fn masquerade(spec: &ForwardSpec) -> String {
    let (proto, nfproto) = family(spec.listen.ip());
    let orig = if spec.is_wildcard() {
        format!("meta nfproto {nfproto}")
    } else {
        format!("ct original {proto} daddr {}", spec.listen.ip())
    };
    let targets: Vec<String> = spec.targets.iter().map(|t| format!("{} . {}", t.ip(), t.port())).collect();
    format!(
        "meta l4proto tcp ct status dnat {orig} ct original proto-dst {} {proto} daddr . tcp dport {{ {} }} oifname != \"lo\" counter masquerade comment \"cpha-masquerade\"",
        spec.listen.port(),
        targets.join(", ")
    )
}

/// Reads the forward back from `nft -j list table inet cpha` output.
pub fn parse_installed(json: &str) -> anyhow::Result<Option<Installed>> {
    let doc: Value = serde_json::from_str(json).context("nft printed JSON cpha cannot read")?;
    let items = doc["nftables"].as_array().context("nft JSON has no \"nftables\" array")?;
    let mut anchor = None;
    let mut forward: Option<(SocketAddr, Vec<SocketAddr>)> = None;
    for item in items {
        let Some(rule) = item.get("rule") else { continue };
        if rule["chain"] != "prerouting" && rule["chain"] != "output" {
            continue;
        }
        if let Some(listen) = rule["comment"].as_str().and_then(|c| c.strip_prefix(ANCHOR)) {
            anchor = Some(listen.parse::<SocketAddr>().context("unreadable listen address in cpha's anchor rule")?);
            continue;
        }
        let exprs = rule["expr"].as_array().context("nft rule without expressions")?;
        if let Some(found) = parse_forward_rule(exprs)? {
            forward.get_or_insert(found);
        }
    }
    Ok(match (forward, anchor) {
        (Some((listen, targets)), _) => {
            Some(Installed { backend: "nftables", state: InstalledState::Forwarding, listen, targets })
        }
        (None, Some(listen)) => {
            Some(Installed { backend: "nftables", state: InstalledState::Draining, listen, targets: vec![] })
        }
        (None, None) => None,
    })
}

fn parse_forward_rule(exprs: &[Value]) -> anyhow::Result<Option<(SocketAddr, Vec<SocketAddr>)>> {
    let mut daddr: Option<IpAddr> = None;
    let mut wildcard: Option<IpAddr> = None;
    let mut dport: Option<u16> = None;
    let mut targets = Vec::new();
    for e in exprs {
        if let Some(m) = e.get("match") {
            let left = &m["left"];
            if left["payload"]["field"] == "daddr" {
                daddr = m["right"].as_str().and_then(|s| s.parse().ok());
            } else if left["payload"]["field"] == "dport" {
                dport = m["right"].as_u64().and_then(|p| u16::try_from(p).ok());
            } else if left["meta"]["key"] == "nfproto" {
                wildcard = match m["right"].as_str() {
                    Some("ipv4") => Some(IpAddr::from([0u8; 4])),
                    Some("ipv6") => Some(IpAddr::from([0u16; 8])),
                    _ => None,
                };
            }
        } else if let Some(d) = e.get("dnat") {
            let addr = &d["addr"];
            if let Some(ip) = addr.as_str() {
                let port = d["port"].as_u64().context("dnat without port")?;
                targets.push(SocketAddr::new(ip.parse()?, u16::try_from(port)?));
            } else if let Some(set) = addr["map"]["data"]["set"].as_array() {
                for pair in set {
                    let concat = pair[1]["concat"].as_array().context("dnat map element is not addr . port")?;
                    let ip: IpAddr = concat[0].as_str().context("dnat map address")?.parse()?;
                    let port = u16::try_from(concat[1].as_u64().context("dnat map port")?)?;
                    targets.push(SocketAddr::new(ip, port));
                }
            }
        }
    }
    if targets.is_empty() {
        return Ok(None);
    }
    let ip = daddr.or(wildcard).context("cpha's dnat rule has no destination match")?;
    let port = dport.context("cpha's dnat rule has no port match")?;
    Ok(Some((SocketAddr::new(ip, port), targets)))
}

/// Everything in `table inet cpha` from `nft -j list table inet cpha` output: the table, and
/// each chain's definition followed by its rules, handles and counter values left out.
pub fn parse_snapshot(json: &str) -> anyhow::Result<Snapshot> {
    let doc: Value = serde_json::from_str(json).context("nft printed JSON cpha cannot read")?;
    let items = doc["nftables"].as_array().context("nft JSON has no \"nftables\" array")?;
    let mut snapshot = Snapshot::default();
    for item in items {
        if let Some(table) = item.get("table") {
            let mut table = table.clone();
            strip(&mut table);
            snapshot.parts.insert(format!("table inet {TABLE}"), vec![table.to_string()]);
        } else if let Some(chain) = item.get("chain") {
            let name = chain["name"].as_str().unwrap_or_default();
            let mut chain = chain.clone();
            strip(&mut chain);
            snapshot.parts.entry(format!("chain {name}")).or_default().insert(0, chain.to_string());
        } else if let Some(rule) = item.get("rule") {
            let name = rule["chain"].as_str().unwrap_or_default();
            let mut rule = rule.clone();
            strip(&mut rule);
            snapshot.parts.entry(format!("chain {name}")).or_default().push(rule.to_string());
        }
    }
    Ok(snapshot)
}

/// Leaves out what the kernel changes by itself: handles and counter values.
fn strip(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("handle");
            if let Some(counter) = map.get_mut("counter") {
                *counter = Value::Null;
            }
            map.values_mut().for_each(strip);
        }
        Value::Array(items) => items.iter_mut().for_each(strip),
        _ => {}
    }
}

/// The nftables backend, driving the `nft` binary.
pub struct Nftables;

impl Nftables {
    fn apply(script: &str) -> anyhow::Result<()> {
        exec::run("nft", &["-f", "-"], Some(script.as_bytes())).context("nftables transaction failed")?;
        Ok(())
    }
}

impl KernelBackend for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn probe(&self) -> anyhow::Result<()> {
        // Listing needs the nf_tables netlink interface: it fails without kernel support or privilege.
        exec::run("nft", &["list", "tables"], None).context("nftables is not usable here")?;
        Ok(())
    }

    fn read(&self) -> anyhow::Result<Option<Installed>> {
        match exec::run("nft", &["-j", "list", "table", "inet", TABLE], None) {
            Ok(json) => parse_installed(&json),
            Err(ExecError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => Ok(None),
            Err(err) => Err(err).context("reading cpha's nftables table"),
        }
    }

    fn install(&self, spec: &ForwardSpec) -> anyhow::Result<Change> {
        let before = self.read()?;
        if before.as_ref().is_some_and(|i| i.matches(spec)) {
            return Ok(Change::Unchanged);
        }
        Self::apply(&render_install(spec))?;
        Ok(if before.is_some() { Change::Retargeted } else { Change::Installed })
    }

    fn repair(&self, spec: &ForwardSpec, _installed: &Snapshot) -> anyhow::Result<()> {
        // The install's transaction creates what is missing and replaces the rules.
        Self::apply(&render_install(spec))
    }

    fn snapshot(&self, _listen: SocketAddr) -> anyhow::Result<Snapshot> {
        match exec::run("nft", &["-j", "list", "table", "inet", TABLE], None) {
            Ok(json) => parse_snapshot(&json),
            Err(ExecError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => {
                Ok(Snapshot::default())
            }
            Err(err) => Err(err).context("reading cpha's nftables table"),
        }
    }

    fn nf_table(&self, _listen: SocketAddr) -> (u8, &'static str) {
        (NFPROTO_INET, TABLE)
    }

    fn withdraw(&self) -> anyhow::Result<()> {
        if let Some(installed) = self.read()? {
            Self::apply(&render_withdraw(installed.listen))?;
        }
        Ok(())
    }

    fn remove(&self) -> anyhow::Result<()> {
        if self.read()?.is_some() {
            Self::apply(&format!("delete table inet {TABLE}\n"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::golden;

    fn spec(listen: &str, targets: &[&str]) -> ForwardSpec {
        ForwardSpec::new(listen.parse().unwrap(), targets.iter().map(|t| t.parse().unwrap()).collect()).unwrap()
    }

    #[test]
    fn golden_rulesets() {
        golden("nft-v4-one-target.nft", &render_install(&spec("10.0.0.10:6443", &["10.0.0.11:6443"])));
        golden(
            "nft-v4-wildcard-three-targets.nft",
            &render_install(&spec("0.0.0.0:8443", &["10.0.0.11:6443", "10.0.0.12:6443", "10.0.0.13:6443"])),
        );
        golden(
            "nft-v6-two-targets.nft",
            &render_install(&spec("[fd00::10]:6443", &["[fd00::11]:6443", "[fd00::12]:6443"])),
        );
        golden("nft-loopback.nft", &render_install(&spec("127.0.0.1:7445", &["127.0.0.1:6443"])));
        golden("nft-withdraw.nft", &render_withdraw("10.0.0.10:6443".parse().unwrap()));
    }

    #[test]
    fn reads_back_what_nft_prints() {
        let json = include_str!("../../tests/golden/nft-list-two-targets.json");
        let installed = parse_installed(json).unwrap().unwrap();
        assert_eq!(installed.state, InstalledState::Forwarding);
        assert_eq!(installed.listen, "10.0.0.10:6443".parse().unwrap());
        assert_eq!(installed.targets, vec!["10.0.0.11:6443".parse().unwrap(), "10.0.0.12:6443".parse().unwrap()]);
        let json = include_str!("../../tests/golden/nft-list-draining.json");
        let installed = parse_installed(json).unwrap().unwrap();
        assert_eq!(installed.state, InstalledState::Draining);
        assert_eq!(installed.listen, "[fd00::10]:6443".parse().unwrap());
        let json = include_str!("../../tests/golden/nft-list-wildcard.json");
        let installed = parse_installed(json).unwrap().unwrap();
        let snapshot = parse_snapshot(json).unwrap();
        assert_eq!(
            snapshot.parts.keys().collect::<Vec<_>>(),
            ["chain output", "chain postrouting", "chain prerouting", "table inet cpha"]
        );
        assert_eq!(installed.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(installed.targets, vec!["10.0.0.11:6443".parse().unwrap()]);
    }

    #[test]
    fn a_snapshot_ignores_counters_and_handles_and_sees_every_rule() {
        let json = include_str!("../../tests/golden/nft-list-two-targets.json");
        let installed = parse_snapshot(json).unwrap();
        let busy = json.replace("\"packets\": 0", "\"packets\": 42").replace("\"handle\": 4", "\"handle\": 40");
        assert_ne!(busy, json);
        assert_eq!(installed.drift(&parse_snapshot(&busy).unwrap(), "table inet cpha"), None);
        // Without the output chain's rule (a `flush chain`): the chain stays, its rule is gone.
        let doc: Value = serde_json::from_str(json).unwrap();
        let kept: Vec<Value> =
            doc["nftables"].as_array().unwrap().iter().filter(|i| i["rule"]["chain"] != "output").cloned().collect();
        let flushed = serde_json::json!({ "nftables": kept }).to_string();
        assert_eq!(
            installed.drift(&parse_snapshot(&flushed).unwrap(), "table inet cpha").unwrap(),
            "chain output flushed"
        );
        let retargeted = json.replace("10.0.0.12", "10.0.0.13");
        let drift = installed.drift(&parse_snapshot(&retargeted).unwrap(), "table inet cpha").unwrap();
        assert!(drift.contains("chain prerouting changed"), "{drift}");
    }
}
