//! The driver: the only loop of `cpha run`. It turns what happens (signals, member updates,
//! actuator results, the clock) into controller inputs, and the controller's effects into
//! actuator calls. It decides nothing itself.
//!
//! Endpoint effects run inline (bounded by [`ENDPOINT_BOUND`]) and report back at once; HAProxy
//! applies and reads go to the HAProxy worker task; probes run as tasks. So an apply that waits
//! never delays a fallback, and nothing the loop awaits is unbounded.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::actuator::{EndpointActuator, FileKeeper, HaproxyActuator, Probes, Reporter, VipActuator};
use super::controller::{Controller, Effect, Input, Settings};
use crate::haproxy::{HaproxySettings, Server};

/// The longest one endpoint action (an nft transaction, a proxy start) may take.
pub const ENDPOINT_BOUND: Duration = Duration::from_secs(30);

pub use crate::signals::Signal;

/// A configuration re-read on SIGHUP, validated as a whole before any part of it is used.
pub struct Reloaded {
    pub controller: Settings,
    pub haproxy: HaproxySettings,
    pub bind: SocketAddr,
}

/// Commands to the HAProxy worker.
pub enum HaproxyCommand {
    Apply(Vec<Server>),
    Settings(Box<HaproxySettings>, SocketAddr),
}

/// The HAProxy side of the driver: applies in order, health reads coalesced.
#[derive(Clone)]
pub struct HaproxyHandle {
    commands: mpsc::Sender<HaproxyCommand>,
    read: Arc<Notify>,
}

impl HaproxyHandle {
    /// Starts the worker task for `actuator`; its results arrive on `inputs`.
    pub fn spawn<H: HaproxyActuator>(
        actuator: H,
        inputs: mpsc::Sender<Input>,
    ) -> (HaproxyHandle, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let (commands, rx) = mpsc::channel(8);
        let read = Arc::new(Notify::new());
        let task = tokio::spawn(worker(actuator, rx, read.clone(), inputs));
        (HaproxyHandle { commands, read }, task)
    }

    async fn send(&self, command: HaproxyCommand) -> anyhow::Result<()> {
        self.commands.send(command).await.map_err(|_| anyhow::anyhow!("the HAProxy worker stopped"))
    }
}

async fn worker<H: HaproxyActuator>(
    mut actuator: H,
    mut commands: mpsc::Receiver<HaproxyCommand>,
    read: Arc<Notify>,
    inputs: mpsc::Sender<Input>,
) -> anyhow::Result<()> {
    loop {
        let input = tokio::select! {
            biased;
            command = commands.recv() => match command {
                None => return Ok(()),
                Some(HaproxyCommand::Apply(servers)) => {
                    let applied = Input::Applied(actuator.apply(servers).await);
                    // NOTE: a reload cpha made may bind new sockets; the apply read what runs
                    // anyway, so what is there now is the process cpha is in step with.
                    let _ = actuator.restarted();
                    applied
                }
                Some(HaproxyCommand::Settings(settings, bind)) => {
                    if let Err(err) = actuator.set_settings(*settings, bind) {
                        tracing::error!("new HAProxy settings not taken: {err}");
                    }
                    continue;
                }
            },
            () = read.notified() => {
                let health = Input::Haproxy(actuator.health().await);
                if let Some(why) = actuator.restarted() {
                    tracing::warn!("HAProxy was restarted by someone else ({why}): applying the desired servers at once");
                    if inputs.send(Input::HaproxyRestarted(why)).await.is_err() {
                        return Ok(());
                    }
                }
                health
            }
        };
        if inputs.send(input).await.is_err() {
            return Ok(());
        }
    }
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// A stop signal: shut down as configured.
    Stopped,
    /// A second stop signal during the drain.
    Aborted,
}

pub struct Driver<E, P, R, V, F> {
    pub controller: Controller,
    pub endpoint: E,
    pub haproxy: HaproxyHandle,
    pub probes: P,
    pub reporter: R,
    pub vip: V,
    /// The files cpha owns (haproxy.cfg, keepalived.conf, the health file).
    pub files: F,
    pub inputs_tx: mpsc::Sender<Input>,
    pub inputs: mpsc::Receiver<Input>,
    pub signals: mpsc::Receiver<Signal>,
    /// Loads and validates the configuration again (SIGHUP).
    pub reload: Box<dyn FnMut() -> Result<Reloaded, String>>,
}

impl<E: EndpointActuator, P: Probes, R: Reporter, V: VipActuator, F: FileKeeper> Driver<E, P, R, V, F> {
    /// Adopts what the kernel holds and runs until a stop signal or a fatal error.
    pub async fn run(&mut self) -> anyhow::Result<Ended> {
        let adopted = self.endpoint.adopt().await?;
        if adopted != super::controller::Adopted::Nothing {
            tracing::info!(?adopted, backend = self.endpoint.backend_name(), "adopted what an earlier run installed");
        }
        self.input(Input::Started { adopted }).await?;
        loop {
            let wake = Instant::from_std(self.controller.next_wake());
            let input = tokio::select! {
                signal = self.signals.recv() => match signal {
                    Some(Signal::Stop) | None => return Ok(Ended::Stopped),
                    Some(Signal::Resync) => {
                        tracing::info!("SIGUSR1: resync of HAProxy and the forward");
                        Input::Resync
                    }
                    Some(Signal::Reload) => match (self.reload)() {
                        Ok(reloaded) => {
                            tracing::info!("SIGHUP: configuration re-read");
                            self.haproxy.send(HaproxyCommand::Settings(Box::new(reloaded.haproxy), reloaded.bind)).await?;
                            Input::Reconfigure(reloaded.controller)
                        }
                        Err(reason) => {
                            tracing::error!("SIGHUP: the new configuration is refused, the running one kept: {reason}");
                            Input::ReconfigureRefused(reason)
                        }
                    },
                },
                Some(input) = self.inputs.recv() => input,
                () = tokio::time::sleep_until(wake) => Input::Tick,
            };
            self.input(input).await?;
        }
    }

    /// Waits for a second stop signal while `shutdown` runs; true when it came (abort).
    pub async fn shutdown(&mut self, keep: bool) -> Ended {
        let sentence = if keep { "stopping; the forward stays in place" } else { "stopping; removing the forward" };
        self.reporter.stopping(sentence);
        tracing::info!(keep_forward = keep, "shutting down");
        // The endpoint goes away here: the virtual IP goes first, to a host that keeps one.
        // (Whether this host holds it is read first: keepalived may give it up at once.)
        let mut hand_over = false;
        if !keep {
            let held = self.vip.holds();
            match self.vip.advertise(crate::vip::Advertised::Withdrawn) {
                Ok(()) => hand_over = held,
                Err(err) => tracing::error!("withdrawing the virtual IP: {err}"),
            }
        }
        let signals = &mut self.signals;
        let endpoint = &mut self.endpoint;
        let vip = &mut self.vip;
        let release = async move {
            if hand_over {
                hand_over_vip(vip).await;
            }
            endpoint.shutdown(keep).await
        };
        tokio::select! {
            result = release => {
                if let Err(err) = result {
                    tracing::error!("while releasing the endpoint: {err:#}");
                }
                Ended::Stopped
            }
            Some(Signal::Stop) = signals.recv() => {
                tracing::warn!("second stop signal: not waiting for the drain");
                Ended::Aborted
            }
        }
    }

    async fn input(&mut self, input: Input) -> anyhow::Result<()> {
        let now = Instant::now().into_std();
        let effects = self.controller.handle(now, input);
        self.execute(effects).await?;
        self.reporter.publish(&self.controller.view());
        Ok(())
    }

    async fn execute(&mut self, effects: Vec<Effect>) -> anyhow::Result<()> {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            let done = match effect {
                Effect::Forward(targets) => {
                    tracing::info!(?targets, "forwarding the endpoint");
                    Some(bounded(self.endpoint.forward_to(targets)).await)
                }
                Effect::HandToHaproxy => Some(bounded(self.endpoint.hand_to_haproxy()).await),
                Effect::Reassert => Some(bounded(self.endpoint.reassert()).await),
                Effect::RepairForward => {
                    let result = match tokio::time::timeout(ENDPOINT_BOUND, self.endpoint.repair()).await {
                        Ok(Ok(found)) => Ok(found),
                        Ok(Err(err)) => Err(format!("{err:#}")),
                        Err(_) => Err(format!("no result within {ENDPOINT_BOUND:?}")),
                    };
                    if let Err(err) = &result {
                        tracing::debug!("repairing the forward: {err}");
                    }
                    let now = Instant::now().into_std();
                    queue.extend(self.controller.handle(now, Input::ForwardRepaired(result)));
                    None
                }
                Effect::RepairFile(object) => {
                    let result = self.files.repair(object);
                    if let Err(err) = &result {
                        tracing::debug!("repairing {object}: {err}");
                    }
                    let now = Instant::now().into_std();
                    queue.extend(self.controller.handle(now, Input::FileRepaired { object, result }));
                    None
                }
                Effect::Repaired(repair) => {
                    self.reporter.repaired(&repair);
                    None
                }
                Effect::Apply(servers) => {
                    self.haproxy.send(HaproxyCommand::Apply(servers)).await?;
                    None
                }
                Effect::ReadHaproxy => {
                    self.reporter.heartbeat();
                    self.haproxy.read.notify_one();
                    if let Err(err) = bounded(self.endpoint.housekeeping()).await {
                        tracing::warn!("endpoint housekeeping: {err}");
                    }
                    None
                }
                Effect::CheckLiveness => {
                    let (probes, tx) = (self.probes.clone(), self.inputs_tx.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(Input::Liveness { alive: probes.haproxy_alive().await }).await;
                    });
                    None
                }
                Effect::Probe(probed) => {
                    let (probes, tx) = (self.probes.clone(), self.inputs_tx.clone());
                    tokio::spawn(async move {
                        let ready = probes.ready_members(probed.clone()).await;
                        let _ = tx.send(Input::Probed { probed, ready }).await;
                    });
                    None
                }
                Effect::CheckEndpoint => {
                    let (probes, tx) = (self.probes.clone(), self.inputs_tx.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(Input::EndpointChecked(probes.endpoint().await)).await;
                    });
                    None
                }
                Effect::Advertise { health, why } => {
                    tracing::info!(health = health.name(), "advertising to keepalived: {why}");
                    if let Err(err) = self.vip.advertise(health) {
                        tracing::error!("advertising {} to keepalived: {err}", health.name());
                    }
                    None
                }
                Effect::VipMembers(members) => {
                    self.vip.members(members);
                    None
                }
                Effect::ReleaseVip => {
                    let result = self.vip.release();
                    match &result {
                        Ok(report) => tracing::warn!("{report}"),
                        Err(err) => tracing::error!("removing the virtual IP: {err}"),
                    }
                    let now = Instant::now().into_std();
                    queue.extend(self.controller.handle(now, Input::VipReleased(result)));
                    None
                }
                Effect::VipChanged { held } => {
                    if held {
                        tracing::info!("this host holds the virtual IP now");
                    } else {
                        tracing::info!("this host no longer holds the virtual IP");
                    }
                    self.reporter.vip_changed(held);
                    None
                }
                Effect::Known(desired) => {
                    self.reporter.known(&desired);
                    None
                }
                Effect::Transition { from, to } => {
                    self.reporter.transition(from, to);
                    None
                }
                Effect::Rejected { source } => {
                    self.reporter.rejected(&source);
                    None
                }
                Effect::Event(note) => {
                    if note.warning {
                        tracing::warn!(reason = note.reason, "{}", note.message);
                    }
                    self.reporter.event(note);
                    None
                }
                Effect::Drift(drift) => {
                    self.reporter.drift(drift.as_ref());
                    None
                }
                Effect::Ready(sentence) => {
                    tracing::info!("ready: {sentence}");
                    self.reporter.ready(&sentence);
                    None
                }
                Effect::Status(sentence) => {
                    tracing::info!("{sentence}");
                    self.reporter.status(&sentence);
                    None
                }
                Effect::Fail(message) => anyhow::bail!(message),
            };
            if let Some(result) = done {
                if let Err(err) = &result {
                    tracing::error!("{err}");
                }
                let now = Instant::now().into_std();
                queue.extend(self.controller.handle(now, Input::EndpointDone(result)));
            }
        }
        Ok(())
    }
}

/// This host held the address when it was withdrawn: waits until keepalived has given it up
/// (it enters FAULT when it reads the withdrawn health and removes the address), so that no
/// client's connection reaches the address here with nothing translating it any more.
///
/// NOTE: not until a backup holds it. Until the new holder's gratuitous ARP the clients still
/// send here; without the address this host routes those packets to the new holder (control
/// planes forward IPv4: kubeadm requires it), which keeps a connection working when the clients'
/// ARP entry changes under it. A forward still translating here would own those connections
/// and lose them at that change (waiting for the backup failed 1-3 of 800 connections in each of
/// 3 lab runs; not waiting, none in 9 of 13). Bounded by the master-down interval.
async fn hand_over_vip<V: VipActuator>(vip: &mut V) {
    let bound = vip.takeover();
    let started = Instant::now();
    while vip.holds() {
        if started.elapsed() >= bound {
            tracing::warn!(
                "keepalived still holds the virtual IP {bound:?} after it was withdrawn; removing the endpoint anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!("the virtual IP left this host {:?} after it was withdrawn", started.elapsed());
}

async fn bounded(action: impl std::future::Future<Output = anyhow::Result<()>>) -> Result<(), String> {
    match tokio::time::timeout(ENDPOINT_BOUND, action).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("{err:#}")),
        Err(_) => Err(format!("no result within {ENDPOINT_BOUND:?}")),
    }
}
