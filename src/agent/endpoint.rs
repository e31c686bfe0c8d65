//! Who carries the control-plane endpoint: the forward (to members) or HAProxy. This module
//! performs the moves the state machine asks for, in one of two topologies:
//!
//! - **retarget**: HAProxy listens on a private address; the forward stays and is retargeted
//!   between members and HAProxy in one step (one nftables/iptables transaction, or a live
//!   target change in the userspace proxy). Established connections keep their path.
//! - **release**: HAProxy binds the endpoint itself. A kernel forward's DNAT rules take the
//!   traffic before HAProxy's socket sees it; handing over withdraws them and keeps the
//!   rule-less table until forwarded flows drain (or the drain bound passes). A userspace
//!   forward shares the port with HAProxy through SO_REUSEPORT; handing over closes its listener
//!   (with `net.ipv4.tcp_migrate_req=1` so queued connections move to HAProxy's socket) and its
//!   open connections drain within the bound.
//!
//! A kernel forward is watched while it carries anything (`forward::watch`): after each of its
//! own transactions the actuator reads the forward back as what is expected, its watcher task
//! reports every difference, and [`Endpoint::repair`] puts it back with the install's
//! transaction when the controller says so.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::actuator::EndpointActuator;
use super::controller::{Adopted, Carrier};
pub use crate::config::Topology;
use crate::forward::watch::Expected;
use crate::forward::{self, conntrack, userspace, ForwardSpec, InstalledState, KernelBackend};

pub struct Endpoint {
    listen: SocketAddr,
    topology: Topology,
    /// Retarget: HAProxy's private frontend address, the forward's target after a handover.
    haproxy: SocketAddr,
    kind: Kind,
    drain_bound: Duration,
    carrier: Option<Carrier>,
    /// Release topology, kernel forward: when the forwarding rules were withdrawn.
    draining_since: Option<Instant>,
    /// What the kernel forward should be now, as read back after cpha's last transaction
    /// (`None`: nothing to watch); the watcher compares the kernel with it.
    expected: watch::Sender<Option<Arc<Expected>>>,
}

enum Kind {
    Kernel(&'static dyn KernelBackend),
    Userspace { proxy: Option<Running>, old: Vec<Running>, connect_timeout: Duration },
}

struct Running {
    targets: userspace::Targets,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<userspace::Summary>>,
}

pub struct EndpointConfig {
    pub listen: SocketAddr,
    pub topology: Topology,
    pub haproxy: SocketAddr,
    pub mode: forward::Mode,
    pub drain_bound: Duration,
    pub connect_timeout: Duration,
}

impl Endpoint {
    /// Chooses the forward's backend for this host (logged) without installing anything.
    pub fn new(cfg: &EndpointConfig, seed: &[SocketAddr]) -> anyhow::Result<Self> {
        // The backend is chosen for the endpoint's family and kind of address; when no target
        // is known yet, a stand-in target of that family (never installed) lets `choose` check it.
        let probe_targets = match (seed.is_empty(), cfg.topology) {
            (false, _) => seed.to_vec(),
            (true, Topology::Retarget) => vec![cfg.haproxy],
            (true, Topology::Release) => vec![placeholder_target(cfg.listen)],
        };
        let spec =
            ForwardSpec::new(cfg.listen, probe_targets).map_err(|e| crate::exit::Coded::config(e.to_string()))?;
        let kind = match forward::choose(cfg.mode, &spec)? {
            forward::Chosen::Kernel(backend) => Kind::Kernel(backend),
            forward::Chosen::Userspace => {
                if cfg.topology == Topology::Release {
                    enable_migrate_req();
                }
                Kind::Userspace { proxy: None, old: Vec::new(), connect_timeout: cfg.connect_timeout }
            }
        };
        Ok(Self {
            listen: cfg.listen,
            topology: cfg.topology,
            haproxy: cfg.haproxy,
            kind,
            drain_bound: cfg.drain_bound,
            carrier: None,
            draining_since: None,
            expected: watch::Sender::new(None),
        })
    }

    /// Starts watching a kernel forward for changes made by others (none for the userspace
    /// proxy); each drift seen, and each change of a rule that outranks the forward, comes out
    /// of the returned channel.
    pub fn watch(
        &self,
        poll: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<(JoinHandle<()>, mpsc::Receiver<forward::watch::Report>)> {
        let Kind::Kernel(_) = self.kind else { return None };
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(forward::watch::run(self.expected.subscribe(), tx, poll, stop));
        Some((task, rx))
    }

    /// The targets the kernel forward has for the current carrier, if it needs rules at all
    /// (the release topology's handed-over state needs none).
    fn rules_for_carrier(&self) -> Option<Vec<SocketAddr>> {
        match (&self.carrier, self.topology) {
            (Some(Carrier::Forward(t)), _) => Some(t.clone()),
            (Some(Carrier::Haproxy), Topology::Retarget) => Some(vec![self.haproxy]),
            _ => None,
        }
    }

    /// Reads the forward just installed back, as what the watcher compares the kernel with.
    async fn expect(&self, backend: &'static dyn KernelBackend, spec: ForwardSpec) -> anyhow::Result<()> {
        let expected = blocking(move || Expected::read(backend, spec)).await?;
        self.expected.send_replace(Some(Arc::new(expected)));
        Ok(())
    }

    /// Compares the kernel forward with what cpha installed and, when it differs, puts it back
    /// with the install's transaction (and turns the sysctls it relies on back on). Returns
    /// what differed; `None` when nothing did.
    pub async fn repair(&mut self) -> anyhow::Result<Option<String>> {
        let Kind::Kernel(backend) = self.kind else { return Ok(None) };
        let Some(expected) = self.expected.borrow().clone() else { return Ok(None) };
        let repaired = blocking(move || {
            let (rules, sysctls) = expected.compare()?;
            let Some(why) = forward::watch::describe(rules.clone(), sysctls) else { return Ok(None) };
            for (key, _) in expected.sysctls_off() {
                crate::sysinfo::set_sysctl(key, "1").with_context(|| format!("setting {key}=1"))?;
            }
            if rules.is_some() {
                backend.repair(&expected.spec, &expected.rules)?;
            }
            Ok(Some((why, Expected::read(backend, expected.spec.clone())?)))
        })
        .await?;
        let Some((why, fresh)) = repaired else { return Ok(None) };
        self.expected.send_replace(Some(Arc::new(fresh)));
        Ok(Some(why))
    }

    pub fn backend_name(&self) -> &'static str {
        match &self.kind {
            Kind::Kernel(b) => b.name(),
            Kind::Userspace { .. } => "userspace",
        }
    }

    pub fn carrier(&self) -> Option<&Carrier> {
        self.carrier.as_ref()
    }

    /// Whether the forward carries new connections now.
    pub fn forwarding(&self) -> bool {
        matches!(self.carrier, Some(Carrier::Forward(_)))
    }

    /// Reads what an earlier run left in the kernel, so a restarted agent continues instead of
    /// stacking a second forward. Returns the carrier found, if any.
    pub async fn adopt(&mut self) -> anyhow::Result<Option<Carrier>> {
        let Kind::Kernel(backend) = self.kind else { return Ok(None) };
        let installed = blocking(move || backend.read()).await?;
        let found = match installed {
            Some(i) if i.listen != self.listen => {
                tracing::warn!(found = %i.listen, configured = %self.listen, "a forward for another listen address is installed; it will be replaced");
                None
            }
            Some(i) if i.state == InstalledState::Draining => {
                self.draining_since = Some(Instant::now());
                (self.topology == Topology::Release).then_some(Carrier::Haproxy)
            }
            Some(i) if self.topology == Topology::Retarget && i.targets == [self.haproxy] => Some(Carrier::Haproxy),
            Some(i) => Some(Carrier::Forward(i.targets)),
            None => None,
        };
        if let Some(c) = &found {
            tracing::info!(carrier = ?c, backend = backend.name(), "adopted the forward an earlier run installed");
        }
        self.carrier = found.clone();
        if let Some(targets) = self.rules_for_carrier() {
            // NOTE: installed once more with the install's transaction (rules replaced, chains
            // kept: flows keep their mapping), so what is watched from now on is cpha's whole
            // forward and not whatever part of it survived until this start.
            let spec = ForwardSpec::new(self.listen, targets)?;
            let again = spec.clone();
            blocking(move || backend.repair(&again, &backend.snapshot(again.listen)?)).await?;
            self.expect(backend, spec).await?;
        }
        Ok(found)
    }

    /// Sends new connections to `targets` through the forward (install, retarget, or bring the
    /// forward back after a release).
    pub async fn forward_to(&mut self, targets: Vec<SocketAddr>) -> anyhow::Result<()> {
        let spec = ForwardSpec::new(self.listen, targets.clone())?;
        // Not when the retarget forward is reasserted at HAProxy itself (SIGUSR1).
        let leaving_haproxy = self.carrier == Some(Carrier::Haproxy)
            && !(self.topology == Topology::Retarget && targets == [self.haproxy]);
        match &mut self.kind {
            Kind::Kernel(backend) => {
                let backend = *backend;
                // Not compared while cpha's own transaction runs.
                self.expected.send_replace(None);
                let installed = spec.clone();
                blocking(move || forward::install_kernel(backend, &installed)).await?;
                self.expect(backend, spec).await?;
                self.draining_since = None;
                if leaving_haproxy {
                    // HAProxy is being left (a fallback): its flows' entries would keep
                    // translating reused source ports to it.
                    let (listen, old) = match self.topology {
                        Topology::Retarget => (self.listen, self.haproxy),
                        Topology::Release => (self.listen, self.listen),
                    };
                    match blocking(move || Ok(conntrack::forget(listen, old))).await? {
                        Ok(n) => tracing::info!(flows = n, to = %old, "conntrack entries towards HAProxy removed"),
                        Err(err) => tracing::warn!("could not remove conntrack entries towards HAProxy: {err}"),
                    }
                }
            }
            Kind::Userspace { proxy: Some(p), .. } => p.targets.set(targets.clone()),
            Kind::Userspace { proxy, connect_timeout, .. } => {
                *proxy = Some(start_proxy(
                    self.listen,
                    targets.clone(),
                    self.topology == Topology::Release,
                    *connect_timeout,
                    self.drain_bound,
                )?);
            }
        }
        self.carrier = Some(Carrier::Forward(targets));
        Ok(())
    }

    /// Puts back what the current carrier needs in the kernel (a forward deleted or changed by
    /// hand); a no-op when it is in place. The release topology's handed-over state needs no rule.
    pub async fn reassert(&mut self) -> anyhow::Result<()> {
        let Some(targets) = self.rules_for_carrier() else { return Ok(()) };
        self.forward_to(targets).await
    }

    /// Moves new connections to HAProxy.
    pub async fn hand_to_haproxy(&mut self) -> anyhow::Result<()> {
        match (self.topology, &mut self.kind) {
            (Topology::Retarget, _) => {
                let haproxy = self.haproxy;
                self.forward_to(vec![haproxy]).await?;
            }
            (Topology::Release, Kind::Kernel(backend)) => {
                let backend = *backend;
                // HAProxy's own socket carries the endpoint: the rule-less table left to drain
                // is not watched.
                self.expected.send_replace(None);
                blocking(move || backend.withdraw()).await?;
                self.draining_since = Some(Instant::now());
            }
            (Topology::Release, Kind::Userspace { proxy, old, .. }) => {
                if let Some(p) = proxy.take() {
                    p.stop.cancel();
                    old.push(p);
                }
            }
        }
        self.carrier = Some(Carrier::Haproxy);
        Ok(())
    }

    /// Periodic housekeeping: removes a drained release-topology table, reaps stopped proxies.
    pub async fn tick(&mut self) -> anyhow::Result<()> {
        if let (Some(since), Kind::Kernel(backend)) = (self.draining_since, &self.kind) {
            let backend = *backend;
            let open = conntrack::count_forwarded(self.listen);
            if open == Some(0) || since.elapsed() >= self.drain_bound {
                let installed = blocking(move || backend.read()).await?;
                if installed.is_some_and(|i| i.state == InstalledState::Draining) {
                    blocking(move || backend.remove()).await?;
                    tracing::info!(open_at_removal = open.unwrap_or(0), "drained forward removed");
                }
                self.draining_since = None;
            }
        }
        if let Kind::Userspace { old, .. } = &mut self.kind {
            old.retain(|p| !p.task.is_finished());
        }
        Ok(())
    }

    /// Ends the agent's hold on the endpoint. `keep` leaves a kernel forward in place (the
    /// endpoint keeps answering while the agent restarts); otherwise it is withdrawn, drained
    /// within the bound, and removed. A userspace proxy drains within the bound either way.
    pub async fn shutdown(&mut self, keep: bool) -> anyhow::Result<()> {
        self.expected.send_replace(None);
        match &mut self.kind {
            Kind::Kernel(backend) if !keep => {
                let backend = *backend;
                let drain = forward::Drain { timeout: self.drain_bound, poll: Duration::from_millis(200) };
                blocking(move || forward::kernel::withdraw_and_remove(backend, drain).map(|_| ())).await?;
            }
            Kind::Kernel(_) => {}
            Kind::Userspace { proxy, old, .. } => {
                old.extend(proxy.take());
                for p in old.iter() {
                    p.stop.cancel();
                }
                for p in old.drain(..) {
                    match p.task.await {
                        Ok(Ok(summary)) => tracing::info!(?summary, "userspace forward stopped"),
                        Ok(Err(err)) => tracing::warn!("userspace forward ended with an error: {err:#}"),
                        Err(err) => tracing::warn!("userspace forward task failed: {err}"),
                    }
                }
            }
        }
        Ok(())
    }
}

fn start_proxy(
    listen: SocketAddr,
    targets: Vec<SocketAddr>,
    reuse_port: bool,
    connect_timeout: Duration,
    drain_timeout: Duration,
) -> anyhow::Result<Running> {
    let proxy = userspace::Proxy::bind(userspace::Config {
        listen,
        targets,
        reuse_port,
        connect_timeout,
        drain_timeout,
        socket_buffer: None,
    })?;
    let targets = proxy.targets();
    let stop = CancellationToken::new();
    let task = tokio::spawn(proxy.run(stop.clone()));
    Ok(Running { targets, stop, task })
}

/// A target of the listen address's kind, only for choosing the backend: a documentation
/// address (RFC 5737 / RFC 3849), or loopback for a loopback endpoint.
fn placeholder_target(listen: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = match (listen.ip().is_loopback(), listen.is_ipv4()) {
        (true, true) => std::net::Ipv4Addr::new(127, 0, 0, 2).into(),
        (true, false) => std::net::Ipv6Addr::LOCALHOST.into(),
        (false, true) => std::net::Ipv4Addr::new(192, 0, 2, 1).into(),
        (false, false) => std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
    };
    SocketAddr::new(ip, if listen.port() == 6443 { 6444 } else { 6443 })
}

/// SO_REUSEPORT handovers lose the connections queued on a closing listener unless the kernel
/// migrates them (design note 11, docs/design-notes.md#reuseport-and-migrate-req). Setting it
/// affects only this network namespace's listeners that close, and only moves connections to a
/// sibling socket.
fn enable_migrate_req() {
    const KEY: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::write(KEY, "1") {
        Ok(()) => tracing::info!("net.ipv4.tcp_migrate_req=1: queued connections move to HAProxy's socket when the forward's listener closes"),
        Err(err) => tracing::warn!("cannot set net.ipv4.tcp_migrate_req=1 ({err}); a release handover may reset connections queued at that instant"),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context("kernel rule task panicked")?
}

impl EndpointActuator for Endpoint {
    fn backend_name(&self) -> &'static str {
        Endpoint::backend_name(self)
    }

    async fn adopt(&mut self) -> anyhow::Result<Adopted> {
        Ok(match Endpoint::adopt(self).await? {
            Some(Carrier::Haproxy) => Adopted::Haproxy,
            Some(Carrier::Forward(targets)) => Adopted::Forward(targets),
            None => Adopted::Nothing,
        })
    }

    async fn forward_to(&mut self, targets: Vec<SocketAddr>) -> anyhow::Result<()> {
        Endpoint::forward_to(self, targets).await
    }

    async fn hand_to_haproxy(&mut self) -> anyhow::Result<()> {
        Endpoint::hand_to_haproxy(self).await
    }

    async fn reassert(&mut self) -> anyhow::Result<()> {
        Endpoint::reassert(self).await
    }

    async fn repair(&mut self) -> anyhow::Result<Option<String>> {
        Endpoint::repair(self).await
    }

    async fn housekeeping(&mut self) -> anyhow::Result<()> {
        self.tick().await
    }

    async fn shutdown(&mut self, keep: bool) -> anyhow::Result<()> {
        Endpoint::shutdown(self, keep).await
    }
}
