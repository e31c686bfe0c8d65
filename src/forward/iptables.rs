//! The iptables backend, for hosts where nftables cannot be used: three chains of cpha's own
//! in the nat table (`CPHA-PREROUTING`, `CPHA-OUTPUT`, `CPHA-POSTROUTING`), reached by one
//! commented jump from each built-in chain, written with `iptables-restore --noflush` in one
//! transaction (IPv6 forwards use the ip6tables tools).
//!
//! As with nftables, `cleanup` first flushes the forwarding rules, keeps the chains and an
//! anchor rule while forwarded flows drain, then deletes the chains and jumps. When cpha's
//! install created the nat table (iptables-nft on a host without one), the empty table is
//! deleted at the end so the ruleset is left as it was found.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context;

use super::kernel::{Change, Installed, InstalledState, KernelBackend, Snapshot};
use super::spec::ForwardSpec;
use crate::exec;

const JUMP_COMMENT: &str = "cpha bootstrap forward";
const ANCHOR: &str = "cpha-anchor listen=";
const CREATED: &str = " created-table";
const HOOKS: [(&str, &str); 3] =
    [("PREROUTING", "CPHA-PREROUTING"), ("OUTPUT", "CPHA-OUTPUT"), ("POSTROUTING", "CPHA-POSTROUTING")];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
    fn nft_family(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
}

/// The nat table of one family as `iptables-save` prints it.
#[derive(Debug, Default, Clone)]
pub struct NatTable {
    pub exists: bool,
    pub lines: Vec<String>,
}

impl NatTable {
    /// Extracts the `*nat` section of a full `iptables-save` output.
    pub fn from_save(save: &str) -> Self {
        let mut t = NatTable::default();
        let mut inside = false;
        for line in save.lines() {
            if line == "*nat" {
                inside = true;
                t.exists = true;
            } else if inside && line == "COMMIT" {
                inside = false;
            } else if inside {
                t.lines.push(line.to_string());
            }
        }
        t
    }

    fn has_jump(&self, hook: &str, chain: &str) -> bool {
        self.lines.iter().any(|l| l.starts_with(&format!("-A {hook} ")) && l.ends_with(&format!("-j {chain}")))
    }

    fn has_chain(&self, chain: &str) -> bool {
        self.lines.iter().any(|l| l.starts_with(&format!(":{chain} ")))
    }

    /// Nothing but the built-in chains, empty, with ACCEPT policies.
    fn is_pristine(&self) -> bool {
        self.lines.iter().all(|l| {
            [":PREROUTING ACCEPT", ":INPUT ACCEPT", ":OUTPUT ACCEPT", ":POSTROUTING ACCEPT"]
                .iter()
                .any(|p| l.starts_with(p))
        })
    }

    /// cpha's chains (declaration, then rules) and the jumps to them, counters left out.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (hook, chain) in HOOKS {
            if self.has_chain(chain) {
                let mut lines = vec![format!(":{chain} -")];
                let prefix = format!("-A {chain} ");
                lines.extend(self.lines.iter().filter(|l| l.starts_with(&prefix)).cloned());
                snapshot.parts.insert(format!("chain {chain}"), lines);
            }
            let jumps: Vec<String> = self
                .lines
                .iter()
                .filter(|l| l.starts_with(&format!("-A {hook} ")) && l.ends_with(&format!("-j {chain}")))
                .cloned()
                .collect();
            if !jumps.is_empty() {
                snapshot.parts.insert(format!("jump {hook} -> {chain}"), jumps);
            }
        }
        snapshot
    }

    fn anchor(&self) -> Option<(SocketAddr, bool)> {
        self.lines.iter().filter(|l| l.starts_with("-A CPHA-PREROUTING ")).find_map(|l| {
            let rest = comment_of(l)?.strip_prefix(ANCHOR)?;
            let created = rest.ends_with(CREATED);
            let addr = rest.trim_end_matches(CREATED).parse().ok()?;
            Some((addr, created))
        })
    }

    /// The forward as installed in this table, read from the DNAT rules of CPHA-OUTPUT.
    pub fn installed(&self) -> anyhow::Result<Option<Installed>> {
        let mut listen = None;
        let mut targets = Vec::new();
        for l in self.lines.iter().filter(|l| l.starts_with("-A CPHA-OUTPUT ") && l.contains("-j DNAT")) {
            let words: Vec<&str> = l.split_whitespace().collect();
            let arg = |flag: &str| words.iter().position(|w| *w == flag).and_then(|i| words.get(i + 1)).copied();
            let to = arg("--to-destination").context("DNAT rule without --to-destination")?;
            targets.push(parse_to_destination(to)?);
            let port: u16 = arg("--dport").context("cpha's DNAT rule has no --dport")?.parse()?;
            let ip: IpAddr = match arg("-d") {
                Some(cidr) => cidr.split('/').next().unwrap_or(cidr).parse()?,
                None if words.contains(&"LOCAL") => {
                    if to.starts_with('[') {
                        IpAddr::from([0u16; 8])
                    } else {
                        IpAddr::from([0u8; 4])
                    }
                }
                None => anyhow::bail!("cpha's DNAT rule has neither -d nor --dst-type LOCAL: {l}"),
            };
            listen.get_or_insert(SocketAddr::new(ip, port));
        }
        Ok(match (listen, self.anchor()) {
            (Some(listen), _) => {
                Some(Installed { backend: "iptables", state: InstalledState::Forwarding, listen, targets })
            }
            (None, Some((listen, _))) => {
                Some(Installed { backend: "iptables", state: InstalledState::Draining, listen, targets: vec![] })
            }
            (None, None) => None,
        })
    }
}

fn comment_of(line: &str) -> Option<&str> {
    let rest = &line[line.find("--comment ")? + "--comment ".len()..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()
    } else {
        rest.split_whitespace().next()
    }
}

fn parse_to_destination(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse().with_context(|| format!("unreadable DNAT destination {s:?}"))
}

fn chain_declarations(s: &mut String) {
    for (_, chain) in HOOKS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
}

fn jumps(s: &mut String, table: &NatTable) {
    for (hook, chain) in HOOKS {
        if !table.has_jump(hook, chain) {
            let _ = writeln!(s, "-A {hook} -m comment --comment \"{JUMP_COMMENT}\" -j {chain}");
        }
    }
}

fn anchor(listen: SocketAddr, created: bool) -> String {
    format!(
        "-A CPHA-PREROUTING -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"{ANCHOR}{listen}{}\" -j RETURN\n",
        if created { CREATED } else { "" }
    )
}

/// The `iptables-restore --noflush` input that installs `spec`. Declaring cpha's chains
/// flushes them, so the same input also retargets. `table` is the current nat table.
pub fn render_install(spec: &ForwardSpec, table: &NatTable) -> String {
    let created = !table.exists || table.anchor().is_some_and(|(_, c)| c);
    render_install_marked(spec, table, created)
}

/// As [`render_install`], with the anchor recording whether cpha created the nat table.
fn render_install_marked(spec: &ForwardSpec, table: &NatTable, created: bool) -> String {
    let family = Family::of(spec.listen.ip());
    let mut s = String::from("*nat\n");
    chain_declarations(&mut s);
    s.push_str(&anchor(spec.listen, created));
    let matcher = if spec.is_wildcard() {
        format!("-p tcp -m addrtype --dst-type LOCAL -m tcp --dport {}", spec.listen.port())
    } else {
        format!("-d {}/{} -p tcp -m tcp --dport {}", spec.listen.ip(), family.host_prefix(), spec.listen.port())
    };
    let n = spec.targets.len();
    for chain in ["CPHA-PREROUTING", "CPHA-OUTPUT"] {
        if chain == "CPHA-PREROUTING" && !spec.takes_remote_traffic() {
            continue;
        }
        for (i, t) in spec.targets.iter().enumerate() {
            // Round robin: rule i takes every (n-i)th of the connections the rules before it left.
            let nth = if i + 1 < n {
                format!(" -m statistic --mode nth --every {} --packet 0", n - i)
            } else {
                String::new()
            };
            let _ =
                writeln!(s, "-A {chain} {matcher}{nth} -m comment --comment cpha-forward -j DNAT --to-destination {t}");
        }
    }
    if spec.takes_remote_traffic() {
        let orig = if spec.is_wildcard() { String::new() } else { format!(" --ctorigdst {}", spec.listen.ip()) };
        let _ = writeln!(
            s,
            "-A CPHA-POSTROUTING -p tcp -m conntrack --ctstate DNAT{orig} --ctorigdstport {} ! -o lo -m comment --comment cpha-masquerade -j MASQUERADE",
            spec.listen.port()
        );
    }
    jumps(&mut s, table);
    s.push_str("COMMIT\n");
    s
}

/// Flushes the forwarding rules, keeping chains, jumps and the anchor.
pub fn render_withdraw(listen: SocketAddr, created: bool, table: &NatTable) -> String {
    let mut s = String::from("*nat\n");
    chain_declarations(&mut s);
    s.push_str(&anchor(listen, created));
    jumps(&mut s, table);
    s.push_str("COMMIT\n");
    s
}

/// Deletes jumps and chains.
pub fn render_remove(table: &NatTable) -> String {
    let mut s = String::from("*nat\n");
    for (_, chain) in HOOKS {
        if table.has_chain(chain) {
            let _ = writeln!(s, ":{chain} - [0:0]");
        }
    }
    for l in &table.lines {
        if let Some(rule) = l.strip_prefix("-A ") {
            if HOOKS
                .iter()
                .any(|(hook, chain)| rule.starts_with(&format!("{hook} ")) && rule.ends_with(&format!("-j {chain}")))
            {
                let _ = writeln!(s, "-D {rule}");
            }
        }
    }
    for (_, chain) in HOOKS {
        if table.has_chain(chain) {
            let _ = writeln!(s, "-X {chain}");
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// The iptables backend, driving `iptables-save` / `iptables-restore` (and the ip6tables ones).
pub struct Iptables;

impl Iptables {
    fn table(family: Family) -> anyhow::Result<NatTable> {
        // NOTE: plain `iptables-save`, not `-t nat`: with iptables-nft, asking for the nat table
        // creates it.
        let save = exec::run(family.save(), &[] as &[&str], None).context("reading the nat table")?;
        Ok(NatTable::from_save(&save))
    }

    fn restore(family: Family, input: &str) -> anyhow::Result<()> {
        exec::run(family.restore(), &["-w", "5", "--noflush"], Some(input.as_bytes()))
            .context("iptables-restore transaction failed")?;
        Ok(())
    }

    fn uses_nf_tables() -> bool {
        exec::run("iptables", &["--version"], None).is_ok_and(|v| v.contains("nf_tables"))
    }

    fn remove_family(family: Family) -> anyhow::Result<()> {
        let table = Self::table(family)?;
        let created = table.anchor().is_some_and(|(_, c)| c);
        if !HOOKS.iter().any(|(_, chain)| table.has_chain(chain)) {
            return Ok(());
        }
        Self::restore(family, &render_remove(&table))?;
        if created && Self::uses_nf_tables() {
            let after = Self::table(family)?;
            if after.exists && after.is_pristine() {
                exec::run("nft", &["delete", "table", family.nft_family(), "nat"], None)
                    .context("deleting the empty nat table cpha created")?;
            }
        }
        Ok(())
    }
}

impl KernelBackend for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn probe(&self) -> anyhow::Result<()> {
        exec::run("iptables-save", &[] as &[&str], None).context("iptables is not usable here")?;
        if !exec::available("iptables-restore") {
            anyhow::bail!("iptables-restore is missing (Debian package: iptables)");
        }
        Ok(())
    }

    fn read(&self) -> anyhow::Result<Option<Installed>> {
        for family in [Family::V4, Family::V6] {
            if let Some(installed) = Self::table(family)?.installed()? {
                return Ok(Some(installed));
            }
        }
        Ok(None)
    }

    fn install(&self, spec: &ForwardSpec) -> anyhow::Result<Change> {
        let family = Family::of(spec.listen.ip());
        let other = if family == Family::V4 { Family::V6 } else { Family::V4 };
        let table = Self::table(family)?;
        let before = table.installed()?;
        if before.as_ref().is_some_and(|i| i.matches(spec)) {
            return Ok(Change::Unchanged);
        }
        Self::restore(family, &render_install(spec, &table))?;
        let other_before = Self::table(other)?.installed()?;
        if other_before.is_some() {
            Self::remove_family(other)?;
        }
        Ok(if before.is_some() || other_before.is_some() { Change::Retargeted } else { Change::Installed })
    }

    fn repair(&self, spec: &ForwardSpec, installed: &Snapshot) -> anyhow::Result<()> {
        // The install's input declares (so flushes) cpha's chains, refills them and adds the
        // jumps that are missing, in one iptables-restore transaction. Whether cpha created the
        // nat table is what the install recorded, not what a table without its anchor says.
        let family = Family::of(spec.listen.ip());
        let table = Self::table(family)?;
        let marker = format!("{ANCHOR}{}{CREATED}", spec.listen);
        let created = !table.exists || installed.parts.values().flatten().any(|l| l.contains(&marker));
        Self::restore(family, &render_install_marked(spec, &table, created))
    }

    fn snapshot(&self, listen: SocketAddr) -> anyhow::Result<Snapshot> {
        Ok(Self::table(Family::of(listen.ip()))?.snapshot())
    }

    fn nf_table(&self, listen: SocketAddr) -> (u8, &'static str) {
        // With iptables-nft the nat table is an nf_tables table of family ip or ip6.
        match Family::of(listen.ip()) {
            Family::V4 => (2, "nat"),
            Family::V6 => (10, "nat"),
        }
    }

    fn withdraw(&self) -> anyhow::Result<()> {
        for family in [Family::V4, Family::V6] {
            let table = Self::table(family)?;
            if let Some((listen, created)) = table.anchor() {
                Self::restore(family, &render_withdraw(listen, created, &table))?;
            }
        }
        Ok(())
    }

    fn remove(&self) -> anyhow::Result<()> {
        Self::remove_family(Family::V4)?;
        Self::remove_family(Family::V6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::golden;

    fn spec(listen: &str, targets: &[&str]) -> ForwardSpec {
        ForwardSpec::new(listen.parse().unwrap(), targets.iter().map(|t| t.parse().unwrap()).collect()).unwrap()
    }

    const EMPTY: &str = "";
    const KUBE: &str = "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n";

    #[test]
    fn golden_restore_inputs() {
        let empty = NatTable::from_save(EMPTY);
        let kube = NatTable::from_save(KUBE);
        assert!(kube.exists && !kube.is_pristine());
        golden("iptables-v4-one-target.rules", &render_install(&spec("10.0.0.10:6443", &["10.0.0.11:6443"]), &empty));
        golden(
            "iptables-v4-wildcard-three-targets.rules",
            &render_install(&spec("0.0.0.0:8443", &["10.0.0.11:6443", "10.0.0.12:6443", "10.0.0.13:6443"]), &kube),
        );
        golden(
            "iptables-v6-two-targets.rules",
            &render_install(&spec("[fd00::10]:6443", &["[fd00::11]:6443", "[fd00::12]:6443"]), &empty),
        );
        golden("iptables-loopback.rules", &render_install(&spec("127.0.0.1:7445", &["127.0.0.1:6443"]), &empty));
    }

    #[test]
    fn reads_back_installed_forward_and_builds_removal() {
        let save = include_str!("../../tests/golden/iptables-save-two-targets.txt");
        let table = NatTable::from_save(save);
        let installed = table.installed().unwrap().unwrap();
        assert_eq!(installed.state, InstalledState::Forwarding);
        assert_eq!(installed.listen, "10.0.0.10:6443".parse().unwrap());
        assert_eq!(installed.targets, vec!["10.0.0.11:6443".parse().unwrap(), "10.0.0.12:6443".parse().unwrap()]);
        assert_eq!(table.anchor(), Some(("10.0.0.10:6443".parse().unwrap(), true)));
        golden("iptables-remove.rules", &render_remove(&table));
        let snapshot = table.snapshot();
        assert_eq!(snapshot.parts.len(), 6, "three chains and three jumps: {snapshot:?}");
        let without_jump = NatTable::from_save(
            &save.replace("-A OUTPUT -m comment --comment \"cpha bootstrap forward\" -j CPHA-OUTPUT\n", ""),
        );
        assert_eq!(snapshot.drift(&without_jump.snapshot(), "x").unwrap(), "jump OUTPUT -> CPHA-OUTPUT deleted");
        let flushed: String =
            save.lines().filter(|l| !l.starts_with("-A CPHA-OUTPUT ")).map(|l| format!("{l}\n")).collect();
        assert_eq!(
            snapshot.drift(&NatTable::from_save(&flushed).snapshot(), "x").unwrap(),
            "chain CPHA-OUTPUT flushed"
        );
        // A second install sees the jumps and does not add them again.
        let again = render_install(&spec("10.0.0.10:6443", &["10.0.0.13:6443"]), &table);
        assert!(!again.contains("-A PREROUTING"), "{again}");
        assert!(again.contains("created-table"), "the table stays marked as created by cpha");
    }
}
