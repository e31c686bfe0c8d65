//! The bootstrap forward: from the load-balancer address:port to one or more apiservers, so
//! `kubeadm init --control-plane-endpoint` can use the endpoint before any load balancer runs.
//!
//! - [`spec`]: what a forward is, validated without I/O.
//! - [`nft`] and [`iptables`]: the kernel backends (DNAT in prerouting and output, masquerade in
//!   postrouting), each owning one table or chain set; [`kernel`] holds what they share.
//! - [`userspace`]: a splice(2) TCP proxy, for hosts without usable netfilter tools and for
//!   forwards the kernel cannot do (IPv4 to IPv6, loopback to another host).
//! - [`conntrack`]: counting the connections a kernel forward still carries, for draining.
//! - [`watch`]: noticing when what a kernel forward owns is changed by someone else.

pub mod conntrack;
pub mod iptables;
pub mod kernel;
pub mod nft;
pub mod spec;
pub mod userspace;
pub mod watch;

use anyhow::Context;

use crate::exit::Coded;
use crate::sysinfo;
pub use kernel::{Change, Drain, Installed, InstalledState, KernelBackend};
pub use spec::{Endpoint, ForwardSpec};

/// How the forward is made, as chosen on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// nftables when usable, else iptables, else userspace.
    Auto,
    Nftables,
    Iptables,
    Userspace,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Auto, Mode::Nftables, Mode::Iptables, Mode::Userspace];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
            Mode::Userspace => "userspace",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a forward mode: {}", Mode::ALL.map(Mode::as_str).join(", ")))
    }
}

/// The backend a forward ends up using.
pub enum Chosen {
    Kernel(&'static dyn KernelBackend),
    Userspace,
}

static NFTABLES: nft::Nftables = nft::Nftables;
static IPTABLES: iptables::Iptables = iptables::Iptables;

/// Both kernel backends, nftables first.
pub fn kernel_backends() -> [&'static dyn KernelBackend; 2] {
    [&NFTABLES, &IPTABLES]
}

/// Picks the backend for `spec`. An explicit kernel mode that cannot work is an error that
/// says why; `auto` explains each step down in the log.
pub fn choose(mode: Mode, spec: &ForwardSpec) -> anyhow::Result<Chosen> {
    let explicit = match mode {
        Mode::Userspace => return Ok(Chosen::Userspace),
        Mode::Nftables => Some(&NFTABLES as &'static dyn KernelBackend),
        Mode::Iptables => Some(&IPTABLES as &'static dyn KernelBackend),
        Mode::Auto => None,
    };
    if let Some(backend) = explicit {
        spec.check_kernel().map_err(|e| Coded::usage(e.to_string()))?;
        require_net_admin()?;
        backend.probe()?;
        return Ok(Chosen::Kernel(backend));
    }
    if let Err(why) = spec.check_kernel() {
        tracing::info!("auto mode: using the userspace proxy because {why}");
        return Ok(Chosen::Userspace);
    }
    if let Err(why) = require_net_admin() {
        tracing::info!("auto mode: using the userspace proxy because {why}");
        return Ok(Chosen::Userspace);
    }
    for backend in kernel_backends() {
        match backend.probe() {
            Ok(()) => {
                tracing::info!("auto mode: using {}", backend.name());
                return Ok(Chosen::Kernel(backend));
            }
            Err(why) => tracing::info!("auto mode: {} not usable: {why:#}", backend.name()),
        }
    }
    tracing::info!("auto mode: using the userspace proxy: no kernel backend is usable");
    Ok(Chosen::Userspace)
}

fn require_net_admin() -> anyhow::Result<()> {
    if sysinfo::has_net_admin() {
        Ok(())
    } else {
        Err(Coded::noperm(
            "kernel forwards need CAP_NET_ADMIN: run cpha as root (or with AmbientCapabilities=CAP_NET_ADMIN), or use --mode userspace",
        )
        .into())
    }
}

/// Checks that need the host: a wildcard listen that would capture a local target's own port
/// is a loop; remote targets reached from other hosts need IP forwarding.
pub fn check_host(spec: &ForwardSpec) -> anyhow::Result<()> {
    let local = sysinfo::local_addresses().context("listing local addresses")?;
    for t in &spec.targets {
        let is_local = local.contains(&t.ip());
        if spec.is_wildcard() && is_local && t.port() == spec.listen.port() {
            return Err(Coded::usage(format!(
                "listen {} would capture the local target {t} itself (same port on a local address): pick a different load-balancer port, e.g. 8443 (see kubeadm#2472)",
                spec.listen
            ))
            .into());
        }
        if spec.takes_remote_traffic() && !is_local && !t.ip().is_loopback() {
            let key = if t.is_ipv4() { "net.ipv4.ip_forward" } else { "net.ipv6.conf.all.forwarding" };
            if sysinfo::sysctl(key).as_deref() == Some("0") {
                tracing::warn!("{key}=0: this host's own clients reach {t}, but connections from other hosts are not forwarded to it until {key}=1 (kubeadm requires it too)");
            }
        }
    }
    if !spec.is_wildcard() && !local.contains(&spec.listen.ip()) {
        tracing::info!(listen = %spec.listen, "the listen address is not on this host (yet): connections routed to it are forwarded all the same");
    }
    Ok(())
}

/// The IP forwarding sysctls `spec` needs (remote traffic to a target on another host) that
/// are on now: a forward relies on them from its install on. One that is off at install is
/// the operator's choice, warned about by [`check_host`] and left alone.
pub fn relied_on_sysctls(spec: &ForwardSpec) -> Vec<&'static str> {
    if !spec.takes_remote_traffic() {
        return Vec::new();
    }
    let local = sysinfo::local_addresses().unwrap_or_default();
    let mut keys = Vec::new();
    for t in spec.targets.iter().filter(|t| !local.contains(&t.ip()) && !t.ip().is_loopback()) {
        let key = if t.is_ipv4() { "net.ipv4.ip_forward" } else { "net.ipv6.conf.all.forwarding" };
        if !keys.contains(&key) && sysinfo::sysctl(key).as_deref() == Some("1") {
            keys.push(key);
        }
    }
    keys
}

/// Installs `spec` with `backend` and removes whatever forward the other kernel backend holds.
pub fn install_kernel(backend: &dyn KernelBackend, spec: &ForwardSpec) -> anyhow::Result<Change> {
    check_host(spec)?;
    let change = backend.install(spec)?;
    // NOTE: the new forward's NAT chains keep the netns NAT hooks registered, so flows the
    // other backend carried keep their mapping when its rules go at once.
    for other in kernel_backends().into_iter().filter(|b| b.name() != backend.name()) {
        if other.read()?.is_some() {
            tracing::info!("removing the {} forward replaced by {}", other.name(), backend.name());
            other.remove()?;
        }
    }
    Ok(change)
}

/// Every forward cpha holds in the kernel, read back.
pub fn read_installed() -> anyhow::Result<Vec<Installed>> {
    let mut all = Vec::new();
    for backend in kernel_backends() {
        match backend.read() {
            Ok(Some(installed)) => all.push(installed),
            Ok(None) => {}
            Err(err) if is_missing_tool(&err) => tracing::debug!("{} not checked: {err:#}", backend.name()),
            Err(err) => return Err(err),
        }
    }
    Ok(all)
}

/// Whether an error only says that a backend's tool is not installed.
pub fn is_missing_tool(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|c| matches!(c.downcast_ref::<crate::exec::ExecError>(), Some(crate::exec::ExecError::NotFound { .. })))
}
