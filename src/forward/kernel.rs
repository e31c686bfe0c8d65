//! What the two kernel backends (nftables, iptables) share: the installed forward as read
//! back from the kernel, the result of an install, and the drain-then-remove sequence.

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
