//! What the two kernel backends (nftables, iptables) share: the installed forward as read
//! back from the kernel, a [`Snapshot`] of everything cpha owns there (compared to notice
//! drift), the result of an install, and the drain-then-remove sequence.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::conntrack;
use super::spec::ForwardSpec;

/// A kernel backend: owns one table (nftables) or one set of chains (iptables).
pub trait KernelBackend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether the backend can be used on this host (tools present, kernel answers).
    fn probe(&self) -> anyhow::Result<()>;
    /// What this backend has installed, read back from the kernel.
    fn read(&self) -> anyhow::Result<Option<Installed>>;
    /// Installs or retargets the forward in one transaction.
    fn install(&self, spec: &ForwardSpec) -> anyhow::Result<Change>;
    /// Installs `spec` again with the install's transaction, whatever is there now (a table
    /// flushed or deleted, a chain emptied, a jump removed); `installed` is what the install
    /// left, for what it recorded about the host before it.
    fn repair(&self, spec: &ForwardSpec, installed: &Snapshot) -> anyhow::Result<()>;
    /// Everything this backend owns for a forward on `listen`'s family, as it is now.
    fn snapshot(&self, listen: SocketAddr) -> anyhow::Result<Snapshot>;
    /// The nf_tables table this backend's objects live in, `(family, name)` as netlink names
    /// them (`NFPROTO_*`), so a change notification can be matched to it.
    fn nf_table(&self, listen: SocketAddr) -> (u8, &'static str);
    /// Removes the forwarding rules in one transaction, keeping what established flows need.
    fn withdraw(&self) -> anyhow::Result<()>;
    /// Removes everything this backend installed.
    fn remove(&self) -> anyhow::Result<()>;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstalledState {
    /// New connections to `listen` are forwarded to `targets`.
    Forwarding,
    /// Forwarding rules are gone; the table stays while forwarded connections close.
    Draining,
}

/// A forward as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Installed {
    pub backend: &'static str,
    pub state: InstalledState,
    pub listen: SocketAddr,
    pub targets: Vec<SocketAddr>,
}

impl Installed {
    pub fn matches(&self, spec: &ForwardSpec) -> bool {
        self.state == InstalledState::Forwarding && self.listen == spec.listen && self.targets == spec.targets
    }
}

/// cpha's part of the kernel as read back, with what changes by itself (counters, handles)
/// left out. What cpha installed is compared with what is there now, part by part; nothing is
/// interpreted, so any change to a rule, a chain or a jump shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Each object (a chain with its rules, a jump) by name: its definition, then its rules.
    pub parts: BTreeMap<String, Vec<String>>,
}

impl Snapshot {
    /// What changed from `self` (what cpha installed) to `now`, in words; `None` when equal.
    /// `whole` names everything together ("table inet cpha"), for when all of it is gone.
    pub fn drift(&self, now: &Snapshot, whole: &str) -> Option<String> {
        if self == now {
            return None;
        }
        if now.parts.is_empty() {
            return Some(format!("{whole} deleted"));
        }
        let mut said = Vec::new();
        for (name, lines) in &self.parts {
            match now.parts.get(name) {
                None => said.push(format!("{name} deleted")),
                Some(l) if l.len() == 1 && lines.len() > 1 => said.push(format!("{name} flushed")),
                Some(l) if l != lines => said.push(format!("{name} changed")),
                Some(_) => {}
            }
        }
        for name in now.parts.keys().filter(|n| !self.parts.contains_key(*n)) {
            said.push(format!("{name} added"));
        }
        Some(said.join("; "))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Unchanged,
    Installed,
    Retargeted,
}

/// How to end a kernel forward.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// Longest wait for forwarded connections to close before the table goes anyway.
    pub timeout: Duration,
    pub poll: Duration,
}

/// Withdraws the forward, waits until conntrack shows none of its connections left (or the
/// timeout passes), then removes the backend's state. Returns how many flows were still open
/// when it was removed.
pub fn withdraw_and_remove(backend: &dyn KernelBackend, drain: Drain) -> anyhow::Result<usize> {
    let Some(installed) = backend.read()? else { return Ok(0) };
    if installed.state == InstalledState::Forwarding {
        backend.withdraw()?;
        tracing::info!(backend = backend.name(), listen = %installed.listen, "forwarding rules removed: new connections are no longer forwarded");
    }
    let left = wait_for_flows(installed.listen, drain);
    backend.remove()?;
    Ok(left)
}

fn wait_for_flows(listen: SocketAddr, drain: Drain) -> usize {
    let deadline = Instant::now() + drain.timeout;
    let mut announced = false;
    loop {
        let count = conntrack::count_forwarded(listen);
        match count {
            Some(0) => return 0,
            Some(n) if Instant::now() >= deadline => {
                tracing::warn!(flows = n, "drain timeout reached; removing the forward with connections still open (they survive only while another NAT user keeps the netns NAT hooks)");
                return n;
            }
            None if Instant::now() >= deadline => return 0,
            Some(n) if !announced => {
                tracing::info!(flows = n, timeout = ?drain.timeout, "waiting for forwarded connections to close before removing the table");
                announced = true;
            }
            None if !announced => {
                tracing::warn!(timeout = ?drain.timeout, "conntrack table unreadable; keeping the table for the whole drain timeout");
                announced = true;
            }
            _ => {}
        }
        std::thread::sleep(drain.poll);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(parts: &[(&str, &[&str])]) -> Snapshot {
        Snapshot {
            parts: parts.iter().map(|(n, l)| (n.to_string(), l.iter().map(ToString::to_string).collect())).collect(),
        }
    }

    #[test]
    fn drift_names_what_changed() {
        let installed =
            snap(&[("chain output", &["nat", "dnat a"]), ("chain prerouting", &["nat", "anchor", "dnat a"])]);
        assert_eq!(installed.drift(&installed.clone(), "table inet cpha"), None);
        assert_eq!(installed.drift(&Snapshot::default(), "table inet cpha").unwrap(), "table inet cpha deleted");
        let flushed = snap(&[("chain output", &["nat"]), ("chain prerouting", &["nat", "anchor", "dnat a"])]);
        assert_eq!(installed.drift(&flushed, "t").unwrap(), "chain output flushed");
        let changed = snap(&[("chain output", &["nat", "dnat b"]), ("chain other", &["filter"])]);
        assert_eq!(
            installed.drift(&changed, "t").unwrap(),
            "chain output changed; chain prerouting deleted; chain other added"
        );
    }
}
