//! `cpha run`: the agent. It owns the endpoint (the bootstrap forward, then the handover to
//! HAProxy), keeps HAProxy's apiserver backend equal to the member set, and reports.
//!
//! ```text
//!  member source ─Update─► bridge (resolve once) ─┐        ┌─► EndpointActuator (forward ⇄ HAProxy)
//!  HAProxy worker ─Health, Applied──────────────┤        ├─► HAProxy worker (apply, read)
//!  probes ─Liveness, Probed, EndpointChecked────┼► driver ┼─► Probes (readyz, endpoint, sockets)
//!  signals ─Reload, Resync, Stop────────────────┤   │    └─► Reporter (sd-notify, metrics, /status, Events)
//!  forward watcher ─ForwardDrift, Outranked─────┤   │
//!  clock ─Tick──────────────────────────────────┘   ▼
//!                                           controller (pure: inputs → effects)
//! ```
//! - [`controller`]: every decision, pure, with its state machine.
//! - [`driver`]: the loop that feeds the controller and carries out its effects.
//! - [`actuator`]: the traits the driver uses, with the real HAProxy and probe actuators.
//! - [`endpoint`]: the forward and the handover in both topologies (the endpoint actuator),
//!   and the repair of a kernel forward someone else changed (its watcher: `forward::watch`).
//! - [`probe`], [`server`], [`status`], [`events`]: `/readyz` probes, the status port, the
//!   `/status` snapshot, Kubernetes Events.
//! - this file: wiring (tasks, supervision, SIGHUP's reload, the real reporter).

pub mod actuator;
pub mod controller;
pub mod driver;
pub mod endpoint;
pub mod events;
#[cfg(test)]
mod fake;
pub mod probe;
pub mod server;
pub mod status;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, OnShutdown, Overrides, Topology};
use crate::haproxy::{resolve, Haproxy, Template};
use crate::kube::KubeSettings;
use crate::members::source::{self as members_source, MembersSettings, Update};
use crate::members::{MemberSet, ServerName};
use crate::metrics::{Metrics, StateLabel, TransitionLabels};
use crate::notify;
use actuator::{HaproxyBackend, NetProbes, Reporter};
use controller::{Carrier, Controller, Desired, Drift, Input, Note, View};
use driver::{Driver, Ended, HaproxyHandle, Reloaded};
use endpoint::{Endpoint, EndpointConfig};
use server::Shared;
use status::AgentStatus;

/// How `cpha run` was started: the configuration file and the overrides from flags/env.
pub struct Options {
    pub config: PathBuf,
    pub overrides: Overrides,
}

impl Options {
    pub fn load(&self) -> anyhow::Result<Config> {
        config::load(&self.config, &self.overrides)
    }
}

/// The controller's settings from a configuration.
pub fn controller_settings(config: &Config) -> controller::Settings {
    let h = &config.handover;
    controller::Settings {
        rise: h.rise,
        fall: h.fall,
        fallback: h.fallback,
        interval: h.interval,
        probe_interval: h.interval * 5,
        liveness_interval: h.liveness_interval,
        min_apply_interval: config.haproxy.min_apply_interval,
        bootstrap_targets: config.forward.targets.iter().map(|e| e.0).collect(),
        drift_after: config.members.drift.as_ref().map(|d| d.after),
        vip: config.vip.as_ref().map(|v| controller::VipPolicy {
            rise: v.rise,
            fall: v.fall,
            hold_down: v.hold_down,
            check_interval: v.check_interval,
        }),
    }
}

/// Everything SIGHUP re-reads, validated as a whole: nothing is used unless all of it is good.
fn reload(options: &Options) -> Result<(Config, Reloaded), String> {
    let config = options.load().map_err(|e| format!("{e:#}"))?;
    config.haproxy.check().map_err(|e| format!("haproxy: {e}"))?;
    Template::from_settings(&config.haproxy).map_err(|e| format!("haproxy: {e}"))?;
    if let Some(vip) = &config.vip {
        crate::vip::render::Template::from_settings(vip).map_err(|e| format!("vip: {e}"))?;
    }
    let reloaded = Reloaded {
        controller: controller_settings(&config),
        haproxy: config.haproxy.clone(),
        bind: config.haproxy_bind(),
    };
    Ok((config, reloaded))
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let config = options.load()?;
    // NOTE: restart-only, like the other paths: which directories are shared on purpose.
    crate::fsutil::trust_shared_dirs(&config.agent.trust_shared_directories);
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(agent(options, config))
}

async fn agent(options: Options, config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(Shared {
        registry: metrics.register(),
        status: RwLock::new(AgentStatus::default()),
        heartbeat: RwLock::new(Instant::now()),
        stale_after: config.handover.interval * 10 + Duration::from_secs(5),
    });
    let root = CancellationToken::new();
    let (ended_tx, mut ended) = mpsc::channel::<(String, anyhow::Result<()>)>(8);
    let listener = server::bind(config.agent.status_listen).await?;
    let status_server = tokio::spawn(server::serve(listener, shared.clone(), root.child_token()));
    supervise("the status server", status_server, root.clone(), ended_tx.clone());

    let endpoint = Endpoint::new(&endpoint_config(&config), &bootstrap_targets(&config))?;
    let haproxy = Haproxy::new(config.haproxy.clone(), metrics.clone())
        .map_err(|e| crate::exit::Coded::config(format!("haproxy: {e}")))?;
    let (inputs_tx, inputs) = mpsc::channel(64);
    if let Some((watcher, drifts)) = endpoint.watch(config.handover.liveness_interval, root.child_token()) {
        supervise("the forward watcher", watcher, root.clone(), ended_tx.clone());
        tokio::spawn(drift_bridge(drifts, inputs_tx.clone()));
    }
    // The files cpha owns are watched from their first write (keepalived.conf is written in
    // `Keepalived::start`, haproxy.cfg by the first apply).
    crate::fsutil::owned::own(&config.haproxy.config_path, "haproxy.cfg");
    if let Some(v) = &config.vip {
        crate::fsutil::owned::own(&v.keepalived.config_file, "keepalived.conf");
        crate::fsutil::owned::own(&v.keepalived.track_file, "vip-health");
    }
    let (files_tx, files_rx) = mpsc::channel(16);
    crate::fsutil::owned::watch(files_tx, root.child_token()).context("watching the files cpha owns")?;
    tokio::spawn(files_bridge(files_rx, inputs_tx.clone()));
    let (haproxy_handle, worker) =
        HaproxyHandle::spawn(HaproxyBackend { haproxy, bind: config.haproxy_bind(), sockets: None }, inputs_tx.clone());
    supervise("the HAProxy worker", worker, root.clone(), ended_tx.clone());

    let vip = match &config.vip {
        Some(settings) => {
            let (tx, rx) = mpsc::channel(16);
            let saved = match &config.members.state_file {
                Some(path) => match crate::members::source::state::load(path, &config.members.parse).await {
                    Ok(set) => set,
                    Err(err) => {
                        tracing::warn!("{err:#}; keepalived.conf is first written for the configured members");
                        None
                    }
                },
                None => None,
            };
            let keepalived = crate::vip::keepalived::Keepalived::start(
                settings.clone(),
                initial_vip_members(&config, saved.as_ref()),
                config.handover.liveness_interval,
                tx,
                root.child_token(),
            )?;
            tokio::spawn(vip_bridge(rx, inputs_tx.clone()));
            metrics.zero_vip();
            Some(keepalived)
        }
        None => None,
    };
    let vip_base = vip.as_ref().map(|k| {
        (config.vip.as_ref().map(|v| v.address.to_string()).unwrap_or_default(), k.placement().interface.clone())
    });

    let (known_tx, known_rx) = watch::channel(MemberSet::new());
    let (sticky_tx, sticky_rx) = watch::channel(BTreeMap::new());
    let mut sources = Sources {
        root: root.clone(),
        stop: None,
        current: None,
        metrics: metrics.clone(),
        inputs: inputs_tx.clone(),
        known: known_rx.clone(),
        sticky: sticky_rx,
        ended: ended_tx.clone(),
        resolve_timeout: config.haproxy.runtime_timeout,
    };
    sources.start(&config.members, &config.kubernetes);
    if crate::kube::renew::applies(&config.kubernetes).is_some() {
        // NOTE: restart-only, like the credentials themselves.
        let renewal = crate::kube::renew::run(
            config.kubernetes.clone(),
            Box::new(known_rx.clone()),
            metrics.token_expiry.clone(),
            root.child_token(),
        );
        supervise("the token renewal", tokio::spawn(renewal), root.clone(), ended_tx.clone());
    }
    let events = match (config.agent.events, events::regarding(&config.members.source)) {
        (true, Some(reference)) => events::spawn(config.kubernetes.clone(), reference, known_rx, root.child_token()),
        _ => events::Events::disabled(),
    };
    let reporter = AgentReporter {
        metrics: metrics.clone(),
        shared: shared.clone(),
        events,
        known: known_tx,
        sticky: sticky_tx,
        base: AgentStatus {
            endpoint: config.endpoint.listen.to_string(),
            topology: config.endpoint.topology.as_str().to_string(),
            forward_backend: endpoint.backend_name().to_string(),
            ..AgentStatus::default()
        },
        wall: (SystemTime::now(), Instant::now()),
        vip: vip_base,
    };
    metrics.zero(config.members.source_name(), &controller::Phase::NAMES, &controller::TRANSITIONS);

    let on_shutdown = Arc::new(RwLock::new(config.forward.on_shutdown));
    let running_endpoint = config.endpoint.clone();
    let running_vip = config.vip.clone();
    let keep = on_shutdown.clone();
    let probes = NetProbes {
        endpoint: dial_address(&config),
        timeout: config.handover.probe_timeout,
        admin_socket: config.haproxy.admin_socket.clone(),
        master_socket: config.haproxy.master_socket.clone(),
    };
    let mut driver = Driver {
        controller: Controller::new(controller_settings(&config), tokio::time::Instant::now().into_std()),
        endpoint,
        haproxy: haproxy_handle,
        probes,
        reporter,
        vip,
        files: actuator::OwnedFiles,
        inputs_tx,
        inputs,
        signals: crate::signals::listen()?,
        reload: Box::new(move || {
            let (config, reloaded) = reload(&options)?;
            if config.endpoint != running_endpoint {
                tracing::warn!("endpoint.listen and endpoint.topology changes take effect at the next restart");
            }
            let vip_place = |v: &Option<crate::vip::VipSettings>| {
                v.as_ref().map(|v| crate::vip::VipSettings {
                    rise: 0,
                    fall: 0,
                    hold_down: Duration::ZERO,
                    check_interval: Duration::ZERO,
                    ..v.clone()
                })
            };
            if vip_place(&config.vip) != vip_place(&running_vip) {
                tracing::warn!(
                    "vip: changes other than rise, fall, holdDown and checkInterval take effect at the next restart"
                );
            }
            sources.start(&config.members, &config.kubernetes);
            *on_shutdown.write().expect("lock") = config.forward.on_shutdown;
            Ok(reloaded)
        }),
    };
    let result = tokio::select! {
        result = driver.run() => result,
        Some((task, result)) = ended.recv() => Err(match result {
            Ok(()) => anyhow::anyhow!("{task} stopped"),
            Err(err) => err.context(format!("{task} failed")),
        }),
    };
    let keep = *keep.read().expect("lock") == OnShutdown::Keep;
    let ended = match &result {
        Ok(Ended::Aborted) => Ended::Aborted,
        _ => driver.shutdown(keep).await,
    };
    root.cancel();
    if ended == Ended::Aborted {
        tracing::warn!("stopped without waiting for the forward's connections to drain");
    }
    result.map(|_| ())
}

/// Reports a task's end on `ended`, unless `token` was cancelled (shutdown, or a restart).
/// Raises the soft limit of open files to the hard one (systemd's default soft limit is 1024;
/// the unit sets `LimitNOFILE`): the status port's connection cap is the real bound, and an
/// apply must never fail for want of a descriptor.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

fn supervise<T: Into<TaskResult> + Send + 'static>(
    name: &'static str,
    task: tokio::task::JoinHandle<T>,
    token: CancellationToken,
    ended: mpsc::Sender<(String, anyhow::Result<()>)>,
) {
    tokio::spawn(async move {
        let result = match task.await {
            Ok(r) => r.into().0,
            Err(err) => Err(anyhow::anyhow!("panicked: {err}")),
        };
        if !token.is_cancelled() {
            let _ = ended.send((name.to_string(), result)).await;
        }
    });
}

/// What a supervised task returns.
struct TaskResult(anyhow::Result<()>);

impl From<()> for TaskResult {
    fn from((): ()) -> Self {
        TaskResult(Ok(()))
    }
}

impl From<anyhow::Result<()>> for TaskResult {
    fn from(r: anyhow::Result<()>) -> Self {
        TaskResult(r)
    }
}

/// The member source and its bridge, restarted when SIGHUP changes their settings.
struct Sources {
    root: CancellationToken,
    stop: Option<CancellationToken>,
    current: Option<(MembersSettings, KubeSettings)>,
    metrics: Arc<Metrics>,
    inputs: mpsc::Sender<Input>,
    known: watch::Receiver<MemberSet>,
    sticky: watch::Receiver<BTreeMap<ServerName, SocketAddr>>,
    ended: mpsc::Sender<(String, anyhow::Result<()>)>,
    resolve_timeout: Duration,
}

impl Sources {
    fn start(&mut self, members: &MembersSettings, kube: &KubeSettings) {
        let wanted = (members.clone(), kube.clone());
        if self.current.as_ref() == Some(&wanted) {
            return;
        }
        if let Some(stop) = self.stop.take() {
            tracing::info!("member source settings changed: restarting the source");
            stop.cancel();
        }
        let stop = self.root.child_token();
        let (tx, rx) = mpsc::channel(32);
        let task = tokio::spawn(members_source::run(
            members.clone(),
            kube.clone(),
            self.metrics.clone(),
            tx,
            self.known.clone(),
            stop.clone(),
        ));
        supervise("the member source", task, stop.clone(), self.ended.clone());
        let bridge = tokio::spawn(bridge(rx, self.inputs.clone(), self.sticky.clone(), self.resolve_timeout));
        supervise("the member bridge", bridge, stop.clone(), self.ended.clone());
        if let Some(drift) = &members.drift {
            // The apiservers' own registrations, for the drift report only: no state file, no
            // seed, and metrics of its own so the member gauges stay the member list's.
            let registrations = MembersSettings {
                source: members_source::SourceSettings::EndpointSlice {
                    namespace: drift.namespace.clone(),
                    name: drift.name.clone(),
                    port_name: drift.port_name.clone(),
                },
                seed: None,
                parse: crate::members::ParseOptions { allow_empty: true, ..members.parse.clone() },
                state_file: None,
                drift: None,
            };
            let (tx, rx) = mpsc::channel(8);
            let task = tokio::spawn(members_source::run(
                registrations,
                kube.clone(),
                Arc::new(Metrics::default()),
                tx,
                self.known.clone(),
                stop.clone(),
            ));
            supervise("the registrations watch", task, stop.clone(), self.ended.clone());
            let bridge = tokio::spawn(registered(rx, self.inputs.clone()));
            supervise("the registrations bridge", bridge, stop.clone(), self.ended.clone());
        }
        self.stop = Some(stop);
        self.current = Some(wanted);
    }
}

/// Member updates to controller inputs: accepted sets resolved once, with the one policy
/// (`haproxy::resolve`: bounded, usable addresses only, a name keeps its address while it
/// still resolves to it), so the forward and HAProxy never disagree on where a member is.
async fn bridge(
    mut updates: mpsc::Receiver<Update>,
    inputs: mpsc::Sender<Input>,
    sticky: watch::Receiver<BTreeMap<ServerName, SocketAddr>>,
    timeout: Duration,
) {
    while let Some(update) = updates.recv().await {
        let input = match update {
            Update::Accepted { set, origin } => {
                tracing::info!(members = %set, origin = %origin, "member set accepted");
                let previous = sticky.borrow().clone();
                let resolved = resolve::resolve(&set, &previous, timeout).await;
                for u in &resolved.unresolved {
                    tracing::warn!("{u}");
                }
                Input::MembersAccepted { set, origin: origin.to_string(), resolved }
            }
            Update::Rejected { source, reason } => {
                tracing::warn!(source, "member update rejected, keeping the last good set: {reason}");
                Input::MembersRejected { source: source.to_string(), reason }
            }
            Update::Problem { source, message, .. } => {
                tracing::warn!(source, "{message}; keeping the last good set");
                Input::SourceProblem { source: source.to_string(), message }
            }
        };
        if inputs.send(input).await.is_err() {
            return;
        }
    }
}

/// The registrations watch's sets to controller inputs. A set that cannot be read leaves the
/// last one in place: the drift report compares what is known.
async fn registered(mut updates: mpsc::Receiver<Update>, inputs: mpsc::Sender<Input>) {
    while let Some(update) = updates.recv().await {
        let Update::Accepted { set, origin } = update else { continue };
        if !origin.is_live() {
            continue;
        }
        let mut addresses: Vec<SocketAddr> = set.iter().filter_map(|m| m.socket_addr()).collect();
        addresses.sort();
        if inputs.send(Input::Registered(addresses)).await.is_err() {
            return;
        }
    }
}

/// The forward watcher's reports to controller inputs.
async fn drift_bridge(mut reports: mpsc::Receiver<crate::forward::watch::Report>, inputs: mpsc::Sender<Input>) {
    use crate::forward::watch::Report;
    while let Some(report) = reports.recv().await {
        let input = match report {
            Report::Drift(why) => Input::ForwardDrift(controller::ForwardDrift { why }),
            Report::Outranked(by) => Input::ForwardOutranked(by),
        };
        if inputs.send(input).await.is_err() {
            return;
        }
    }
}

/// The files watcher's reports to controller inputs.
async fn files_bridge(mut reports: mpsc::Receiver<crate::fsutil::owned::FileDrift>, inputs: mpsc::Sender<Input>) {
    while let Some(drift) = reports.recv().await {
        if inputs.send(Input::FileDrift(drift)).await.is_err() {
            return;
        }
    }
}

/// The VIP actuator's reports to controller inputs.
async fn vip_bridge(mut events: mpsc::Receiver<crate::vip::keepalived::VipEvent>, inputs: mpsc::Sender<Input>) {
    use crate::vip::keepalived::VipEvent;
    while let Some(event) = events.recv().await {
        let input = match event {
            VipEvent::Observed(observed) => {
                tracing::debug!(vrrp = observed.vrrp.name(), holds = observed.holds, "virtual IP observed");
                Input::Vrrp(observed)
            }
            VipEvent::Configured(result) => Input::VipConfigured(result),
        };
        if inputs.send(input).await.is_err() {
            return;
        }
    }
}

/// The members keepalived.conf is first written for, before any member set is accepted: the
/// last good set of the state file, which is what the previous run's file was written for (so
/// a restart of cpha renders the same file and keepalived is not reloaded: a reload with other
/// peers can make it give the address up); without one, the configured members and the
/// forward's targets that are addresses.
fn initial_vip_members(config: &Config, saved: Option<&crate::members::MemberSet>) -> Vec<IpAddr> {
    use crate::members::source::SourceSettings;
    if let Some(set) = saved {
        let mut out: Vec<IpAddr> = set.iter().filter_map(|m| m.socket_addr()).map(|a| a.ip()).collect();
        if !out.is_empty() {
            out.sort();
            out.dedup();
            return out;
        }
    }
    let mut out: Vec<IpAddr> = config.forward.targets.iter().map(|e| e.0.ip()).collect();
    let sets = [
        match &config.members.source {
            SourceSettings::Static(set) => Some(set),
            _ => None,
        },
        config.members.seed.as_ref(),
    ];
    for set in sets.into_iter().flatten() {
        out.extend(set.iter().filter_map(|m| m.socket_addr()).map(|a| a.ip()));
    }
    out.sort();
    out.dedup();
    out
}

/// What the agent tells the world: sd-notify, metrics, `/status`, Events.
struct AgentReporter {
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    events: events::Events,
    known: watch::Sender<MemberSet>,
    sticky: watch::Sender<BTreeMap<ServerName, SocketAddr>>,
    /// The parts of `/status` that never change.
    base: AgentStatus,
    /// A wall-clock reading and the monotonic one taken with it, to date phase changes.
    wall: (SystemTime, Instant),
    /// The virtual IP's address and interface, on a host that runs one.
    vip: Option<(String, String)>,
}

impl AgentReporter {
    fn unix(&self, at: Instant) -> u64 {
        let t = self.wall.0 + at.saturating_duration_since(self.wall.1);
        t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
    }
}

impl Reporter for AgentReporter {
    fn ready(&mut self, sentence: &str) {
        notify::ready(sentence);
    }

    fn status(&mut self, sentence: &str) {
        notify::status(sentence);
    }

    fn event(&mut self, note: Note) {
        self.events.note(note);
    }

    fn transition(&mut self, from: &'static str, to: &'static str) {
        self.metrics.transitions.get_or_create(&TransitionLabels { from: from.into(), to: to.into() }).inc();
    }

    fn rejected(&mut self, source: &str) {
        self.metrics.member_update(source, false);
    }

    fn drift(&mut self, drift: Option<&Drift>) {
        match drift {
            Some(d) => tracing::warn!(
                "{d}; HAProxy is left as the member list says (edit the list, or `cpha members add/remove`)"
            ),
            None => tracing::info!("the member list matches the apiservers' registrations again"),
        }
        self.metrics.member_drift.set(i64::from(drift.is_some()));
    }

    fn known(&mut self, desired: &Desired) {
        self.sticky.send_replace(desired.sticky());
        self.known.send_replace(desired.members.clone());
    }

    fn publish(&mut self, view: &View) {
        for state in controller::Phase::NAMES {
            self.metrics.state.get_or_create(&StateLabel { state: state.into() }).set(i64::from(state == view.phase));
        }
        self.metrics.forward_installed.set(i64::from(matches!(view.carrier, Some(Carrier::Forward(_)))));
        self.metrics.carried(match (&view.carrier, view.endpoint_carried) {
            (Some(Carrier::Haproxy), true) => Some("haproxy"),
            (Some(Carrier::Forward(_)), true) => Some("forward"),
            _ => None,
        });
        let since = self.wall.0 + view.phase_since.saturating_duration_since(self.wall.1);
        let status = AgentStatus {
            phase: view.phase.to_string(),
            phase_since: since.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default(),
            endpoint_carried: view.endpoint_carried,
            endpoint_check: view.endpoint_check.as_ref().map(|r| match r {
                Ok(()) => "ok".to_string(),
                Err(e) => e.clone(),
            }),
            carrier: match &view.carrier {
                Some(Carrier::Haproxy) => "haproxy".into(),
                Some(Carrier::Forward(t)) => t.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                None => "none".into(),
            },
            members: view.members.clone(),
            members_origin: view.members_origin.clone(),
            unresolved: view.unresolved.clone(),
            ready_members: view.ready_members.iter().map(ToString::to_string).collect(),
            last_rejected_update: view.last_rejected_update.clone(),
            source_problem: view.source_problem.clone(),
            haproxy_answers: view.haproxy.answers,
            haproxy_alive: view.haproxy_alive,
            haproxy_servers_up: view.haproxy.up,
            haproxy_servers_total: view.haproxy.total,
            haproxy_servers_maint: view.haproxy.maint,
            last_apply: view.last_apply.clone(),
            last_error: view.last_error.clone(),
            drift: view.drift.as_ref().map(|(d, _)| d.clone()),
            drift_since: view.drift.as_ref().map(|(_, at)| {
                let at = self.wall.0 + at.saturating_duration_since(self.wall.1);
                at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
            }),
            vip: match (&view.vip, &self.vip) {
                (Some(v), Some((address, interface))) => {
                    self.metrics.vip(v.holds, v.vrrp, v.advertised);
                    Some(status::VipStatus {
                        address: address.clone(),
                        interface: interface.clone(),
                        held: v.holds,
                        held_since: self.unix(v.since),
                        vrrp_state: v.vrrp.map_or("unknown", |s| s.name()).to_string(),
                        advertised: v.advertised.map_or("none yet", |a| a.name()).to_string(),
                        last_config: v.last_config.clone(),
                    })
                }
                _ => None,
            },
            outranked_by: view.outranked.clone(),
            last_repair: view.last_repair.as_ref().map(|r| status::RepairStatus {
                object: r.object.to_string(),
                why: r.why.clone(),
                at: self.unix(r.at),
                took_ms: u64::try_from(r.took.as_millis()).unwrap_or(u64::MAX),
            }),
            ..self.base.clone()
        };
        *self.shared.status.write().expect("status lock") = status;
    }

    fn heartbeat(&mut self) {
        self.shared.beat();
        notify::watchdog();
    }

    fn stopping(&mut self, sentence: &str) {
        notify::stopping(sentence);
    }

    fn vip_changed(&mut self, held: bool) {
        self.metrics.vip_change(held);
    }

    fn repaired(&mut self, repair: &controller::Repair) {
        self.metrics.repaired(repair.object);
    }
}

fn endpoint_config(config: &Config) -> EndpointConfig {
    EndpointConfig {
        listen: config.endpoint.listen.0,
        topology: config.endpoint.topology,
        haproxy: config.haproxy_bind(),
        mode: config.forward.mode,
        drain_bound: config.forward.drain_timeout,
        connect_timeout: config.forward.connect_timeout,
    }
}

fn bootstrap_targets(config: &Config) -> Vec<SocketAddr> {
    config.forward.targets.iter().map(|e| e.0).collect()
}

/// Where a client on this host dials the endpoint: the listen address, or for a wildcard one a
/// concrete local address of its family (HAProxy's private address in the retarget topology).
fn dial_address(config: &Config) -> SocketAddr {
    let listen = config.endpoint.listen.0;
    if !listen.ip().is_unspecified() {
        return listen;
    }
    let bind = config.haproxy_bind();
    if config.endpoint.topology == Topology::Retarget && !bind.ip().is_unspecified() {
        return SocketAddr::new(bind.ip(), listen.port());
    }
    let local = crate::sysinfo::local_addresses().unwrap_or_default();
    let ip = local
        .into_iter()
        .find(|ip| !ip.is_loopback() && ip.is_ipv4() == listen.is_ipv4() && !crate::sysinfo::is_link_local(ip))
        .unwrap_or(if listen.is_ipv4() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
        });
    SocketAddr::new(ip, listen.port())
}
