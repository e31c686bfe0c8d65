//! The actuators the driver carries the controller's effects out with, behind small traits so
//! the whole agent can run against in-memory fakes (`agent::fake`) in unit tests:
//!
//! - [`EndpointActuator`]: the forward and the handover (real: `agent::endpoint::Endpoint`).
//! - [`HaproxyActuator`]: haproxy.cfg and the Runtime API (real: [`HaproxyBackend`]).
//! - [`Probes`]: members' `/readyz`, a request through the endpoint, HAProxy's sockets (real:
//!   [`NetProbes`]).
//! - [`VipActuator`]: the virtual IP through keepalived (real: `vip::keepalived::Keepalived`).
//! - [`Reporter`]: what the agent tells the world (sd-notify, metrics, `/status`, Events).
//!
//! The clock is tokio's: the controller is given the time with every input, and tests pause
//! tokio's clock to drive it.

// NOTE: these traits are used through generics only (never `dyn`), inside this crate; the
// futures of the ones the driver spawns are declared `Send`.
#![allow(async_fn_in_trait)]

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::controller::{Adopted, Desired, Drift, EndpointCheck, Note, Repair, View};
use crate::haproxy::{Haproxy, HaproxySettings, Health, RenderInput, Server};
use crate::vip::Advertised;

pub trait EndpointActuator {
    /// nftables, iptables or userspace.
    fn backend_name(&self) -> &'static str;
    /// Reads what an earlier run left in the kernel.
    async fn adopt(&mut self) -> anyhow::Result<Adopted>;
    /// Installs or retargets the forward.
    async fn forward_to(&mut self, targets: Vec<SocketAddr>) -> anyhow::Result<()>;
    /// Moves new connections to HAProxy.
    async fn hand_to_haproxy(&mut self) -> anyhow::Result<()>;
    /// Puts back what the current carrier needs, if it was removed by hand.
    async fn reassert(&mut self) -> anyhow::Result<()>;
    /// Compares the kernel forward with what was installed and puts back what differs, with
    /// the install's own transaction; what differed (`None`: nothing did).
    async fn repair(&mut self) -> anyhow::Result<Option<String>>;
    /// Periodic housekeeping (drained rules removed, stopped proxies reaped).
    async fn housekeeping(&mut self) -> anyhow::Result<()>;
    /// Ends the hold on the endpoint; `keep` leaves a kernel forward in place.
    async fn shutdown(&mut self, keep: bool) -> anyhow::Result<()>;
}

/// Runs in its own task, so an apply that waits (make-before-break, a rate-limited reload)
/// never holds up the fast paths.
pub trait HaproxyActuator: Send + 'static {
    /// Brings haproxy.cfg and the running HAProxy to `servers`; a one-line report.
    fn apply(&mut self, servers: Vec<Server>) -> impl Future<Output = Result<String, String>> + Send;
    /// Reads the backend (and completes drains that are due).
    fn health(&mut self) -> impl Future<Output = Health> + Send;
    /// New settings (already validated by the configuration loader).
    fn set_settings(&mut self, settings: HaproxySettings, bind: SocketAddr) -> Result<(), String>;
    /// Whether HAProxy's process changed since the last call (in words): the first call, and
    /// one with HAProxy not running, only take note.
    fn restarted(&mut self) -> Option<String> {
        None
    }
}

/// The files cpha owns (real: [`OwnedFiles`], `crate::fsutil::owned`).
pub trait FileKeeper {
    /// Puts `object` back as cpha last wrote it if it still differs; what differed.
    fn repair(&mut self, object: &'static str) -> Result<Option<String>, String>;
}

/// The real file keeper.
pub struct OwnedFiles;

impl FileKeeper for OwnedFiles {
    fn repair(&mut self, object: &'static str) -> Result<Option<String>, String> {
        crate::fsutil::owned::repair(object)
    }
}

pub trait Probes: Clone + Send + Sync + 'static {
    /// The members among `candidates` that answer `/readyz`, in the given order.
    fn ready_members(&self, candidates: Vec<SocketAddr>) -> impl Future<Output = Vec<SocketAddr>> + Send;
    /// A TLS request to the endpoint itself, as a client makes it, to a member's `/readyz`.
    fn endpoint(&self) -> impl Future<Output = EndpointCheck> + Send;
    /// Whether HAProxy's process accepts connections on its master or admin socket. Only a
    /// refused connection (or a missing socket) counts as gone; a slow answer is alive.
    fn haproxy_alive(&self) -> impl Future<Output = bool> + Send;
}

/// The virtual IP (real: [`crate::vip::keepalived::Keepalived`]; `None` on a host without one).
pub trait VipActuator {
    /// Writes the health keepalived tracks.
    fn advertise(&mut self, level: Advertised) -> Result<(), String>;
    /// The members' addresses changed (keepalived's unicast peers follow).
    fn members(&mut self, members: Vec<IpAddr>);
    /// Removes the address from this host; a one-line report.
    fn release(&mut self) -> Result<String, String>;
    /// Whether this host holds the address now.
    fn holds(&mut self) -> bool;
    /// How long a backup may take to hold the address after this host gave it up (VRRP's
    /// master-down interval); zero without a virtual IP.
    fn takeover(&self) -> Duration;
}

impl<T: VipActuator> VipActuator for Option<T> {
    fn advertise(&mut self, level: Advertised) -> Result<(), String> {
        self.as_mut().map_or(Ok(()), |v| v.advertise(level))
    }

    fn members(&mut self, members: Vec<IpAddr>) {
        if let Some(v) = self {
            v.members(members);
        }
    }

    fn release(&mut self) -> Result<String, String> {
        self.as_mut().map_or(Ok(String::new()), VipActuator::release)
    }

    fn holds(&mut self) -> bool {
        self.as_mut().is_some_and(VipActuator::holds)
    }

    fn takeover(&self) -> Duration {
        self.as_ref().map_or(Duration::ZERO, VipActuator::takeover)
    }
}

impl VipActuator for crate::vip::keepalived::Keepalived {
    fn advertise(&mut self, level: Advertised) -> Result<(), String> {
        crate::vip::keepalived::Keepalived::advertise(self, level).map_err(|e| format!("{e:#}"))
    }

    fn members(&mut self, members: Vec<IpAddr>) {
        crate::vip::keepalived::Keepalived::members(self, members);
    }

    fn release(&mut self) -> Result<String, String> {
        crate::vip::keepalived::Keepalived::release(self).map_err(|e| format!("{e:#}"))
    }

    fn holds(&mut self) -> bool {
        crate::vip::keepalived::Keepalived::holds(self)
    }

    fn takeover(&self) -> Duration {
        crate::vip::keepalived::Keepalived::takeover(self)
    }
}

pub trait Reporter {
    fn ready(&mut self, sentence: &str);
    fn status(&mut self, sentence: &str);
    fn event(&mut self, note: Note);
    fn transition(&mut self, from: &'static str, to: &'static str);
    fn rejected(&mut self, source: &str);
    /// The drift between the member list and the registrations was found (`Some`) or ended.
    fn drift(&mut self, drift: Option<&Drift>);
    /// The desired state the agent now drives to (the source talks to its members directly).
    fn known(&mut self, desired: &Desired);
    /// The controller's view, after every input.
    fn publish(&mut self, view: &View);
    /// The loop is alive (systemd watchdog, `/healthz`).
    fn heartbeat(&mut self);
    fn stopping(&mut self, sentence: &str);
    /// This host took (true) or lost the virtual IP.
    fn vip_changed(&mut self, held: bool);
    /// Something cpha owns was put back after someone else changed it.
    fn repaired(&mut self, repair: &Repair);
}

/// The real HAProxy actuator: [`Haproxy`] and the frontend address it binds.
pub struct HaproxyBackend {
    pub haproxy: Haproxy,
    pub bind: SocketAddr,
    /// The identity of HAProxy's sockets when last seen (see [`sockets`]).
    pub sockets: Option<Sockets>,
}

/// Which inodes HAProxy's admin and master sockets are. A HAProxy started anew (by systemd, a
/// package upgrade) binds new socket files; the same process keeps its own. Reading it is two
/// `stat` calls, no connection.
pub type Sockets = [(u64, u64); 2];

/// The identity of both sockets, `None` when either is missing (HAProxy not running).
pub fn sockets(settings: &HaproxySettings) -> Option<Sockets> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    Some([id(&settings.admin_socket)?, id(&settings.master_socket)?])
}

impl HaproxyActuator for HaproxyBackend {
    async fn apply(&mut self, servers: Vec<Server>) -> Result<String, String> {
        let input = RenderInput { servers: &servers, bind: self.bind };
        match self.haproxy.apply(&input).await {
            Ok(report) => {
                tracing::info!(%report, "HAProxy in step with the members");
                Ok(report.to_string())
            }
            Err(err) => {
                tracing::error!("applying members to HAProxy failed: {err}");
                Err(err.to_string())
            }
        }
    }

    async fn health(&mut self) -> Health {
        self.haproxy.health().await
    }

    fn set_settings(&mut self, settings: HaproxySettings, bind: SocketAddr) -> Result<(), String> {
        self.haproxy.set_settings(settings).map_err(|e| e.to_string())?;
        self.bind = bind;
        self.sockets = None;
        Ok(())
    }

    fn restarted(&mut self) -> Option<String> {
        let now = sockets(self.haproxy.settings())?;
        let before = self.sockets.replace(now)?;
        (before != now).then(|| {
            let s = self.haproxy.settings();
            let which: Vec<String> = [&s.admin_socket, &s.master_socket]
                .iter()
                .zip(before.iter().zip(now.iter()))
                .filter(|(_, (b, n))| b != n)
                .map(|(p, _)| p.display().to_string())
                .collect();
            format!("new sockets {}: a new HAProxy process", which.join(" and "))
        })
    }
}

/// The real probes.
#[derive(Clone)]
pub struct NetProbes {
    /// Where a client dials the endpoint from this host.
    pub endpoint: SocketAddr,
    pub timeout: Duration,
    pub admin_socket: PathBuf,
    pub master_socket: PathBuf,
}

impl Probes for NetProbes {
    async fn ready_members(&self, candidates: Vec<SocketAddr>) -> Vec<SocketAddr> {
        super::probe::ready_members(&candidates, self.timeout).await
    }

    async fn endpoint(&self) -> EndpointCheck {
        super::probe::check(self.endpoint, self.timeout).await
    }

    async fn haproxy_alive(&self) -> bool {
        let admin = unix_alive(&self.admin_socket);
        let master = unix_alive(&self.master_socket);
        let (admin, master) = tokio::join!(admin, master);
        admin || master
    }
}

async fn unix_alive(path: &std::path::Path) -> bool {
    match tokio::time::timeout(Duration::from_millis(250), tokio::net::UnixStream::connect(path)).await {
        // A socket someone else serves is not HAProxy's (see runtime::trusted_peer).
        Ok(Ok(s)) => crate::haproxy::runtime::trusted_peer(&s).is_ok(),
        Ok(Err(e)) => !matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound),
        // Accepting slowly is still alive: that is the slow path's business.
        Err(_) => true,
    }
}
