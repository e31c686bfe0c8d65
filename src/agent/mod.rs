//! `cpha run`: the agent. It owns the endpoint (the bootstrap forward, then the handover to
//! HAProxy), keeps HAProxy's apiserver backend equal to the member set, and reports.
//!
//! Data flow:
//! ```text
//! member source ──Update──► agent loop ──desired members──► haproxy::Haproxy (Runtime API / file / reload)
//!                              │  ▲
//!          health every tick   │  └── haproxy.health(): answers + UP servers
//!                              ▼
//!                     state::Machine ──Action──► endpoint::Endpoint (forward ⇄ HAProxy)
//! ```
//! The loop is the only writer of agent state; everything it learns goes to `/status`,
//! metrics and sd-notify STATUS=.

pub mod endpoint;
pub mod events;
pub mod probe;
pub mod server;
pub mod state;
pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OnShutdown};
use crate::haproxy::{Haproxy, RenderInput};
use crate::members::source::{self as members_source, Update};
use crate::members::MemberSet;
use crate::metrics::{Metrics, StateLabel, TransitionLabels};
use crate::notify;
use endpoint::{Carrier, Endpoint, EndpointConfig};
use server::Shared;
use state::{Action, Machine, Phase, Thresholds};
use status::AgentStatus;

/// How `cpha run` was started: the configuration file and the overrides from flags/env.
pub struct Options {
    pub config: PathBuf,
    pub overrides: Box<dyn Fn(&mut Config) + Send + Sync>,
}

impl Options {
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(&self.config)?;
        (self.overrides)(&mut config);
        config.validate()?;
        Ok(config)
    }
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let config = options.load()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(Agent::start(options, config)?.run())
}

struct Agent {
    options: Options,
    config: Config,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    endpoint: Endpoint,
    haproxy: Haproxy,
    machine: Machine,
    members: MemberSet,
    members_origin: String,
    dirty: bool,
    last_apply: Option<Instant>,
    status: AgentStatus,
    root: CancellationToken,
    source: Option<(CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>)>,
    updates_tx: mpsc::Sender<Update>,
    updates: mpsc::Receiver<Update>,
    known_tx: tokio::sync::watch::Sender<MemberSet>,
    phase_since: SystemTime,
    ticks: u64,
    events: events::Events,
}

impl Agent {
    fn start(options: Options, config: Config) -> anyhow::Result<Agent> {
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared {
            registry: metrics.register(),
            status: RwLock::new(AgentStatus::default()),
            heartbeat: RwLock::new(Instant::now()),
            stale_after: config.handover.interval * 10 + Duration::from_secs(5),
        });
        let seed: Vec<SocketAddr> = config.forward.targets.iter().map(|e| e.0).collect();
        let endpoint = Endpoint::new(&endpoint_config(&config), &seed)?;
        let haproxy = Haproxy::new(config.haproxy.clone(), metrics.clone())
            .map_err(|e| crate::exit::Coded::config(format!("haproxy: {e}")))?;
        let machine = Machine::new(Phase::Forwarding, thresholds(&config));
        let (updates_tx, updates) = mpsc::channel(32);
        let (known_tx, _) = tokio::sync::watch::channel(MemberSet::new());
        let status = AgentStatus {
            endpoint: config.endpoint.listen.to_string(),
            topology: format!("{:?}", config.endpoint.topology).to_lowercase(),
            forward_backend: endpoint.backend_name().to_string(),
            ..AgentStatus::default()
        };
        Ok(Agent {
            options,
            config,
            metrics,
            shared,
            endpoint,
            haproxy,
            machine,
            members: MemberSet::new(),
            members_origin: "none yet".into(),
            dirty: false,
            last_apply: None,
            status,
            root: CancellationToken::new(),
            source: None,
            updates_tx,
            updates,
            known_tx,
            phase_since: SystemTime::now(),
            ticks: 0,
            events: events::Events::disabled(),
        })
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let listener = server::bind(self.config.agent.status_listen).await?;
        tokio::spawn(server::serve(listener, self.shared.clone(), self.root.child_token()));
        self.start_source();
        self.start_events();

        let Signals { mut term, mut int, mut hup, mut usr1 } = Signals::new()?;

        // The endpoint first: READY=1 means kubeadm can use it.
        match self.endpoint.adopt().await? {
            Some(Carrier::Haproxy) => self.set_phase(Phase::Balanced),
            _ => {
                if !self.bootstrap_forward(&mut term, &mut int).await? {
                    self.shutdown().await;
                    return Ok(());
                }
            }
        }
        self.publish();
        notify::ready(&self.sentence());
        tracing::info!("{}", self.sentence());

        let mut tick = tokio::time::interval(self.config.handover.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = term.recv() => break Ok(()),
                _ = int.recv() => break Ok(()),
                _ = hup.recv() => self.reload_config(),
                _ = usr1.recv() => {
                    tracing::info!("SIGUSR1: forcing a resync of HAProxy and the forward");
                    self.dirty = true;
                    self.last_apply = None;
                    if let Err(err) = self.endpoint.reassert().await {
                        tracing::error!("SIGUSR1: restoring the forward failed: {err:#}");
                        self.status.last_error = Some(format!("resync: {err:#}"));
                    }
                }
                Some(update) = self.updates.recv() => self.on_update(update),
                _ = tick.tick() => {
                    if let Err(err) = self.on_tick().await {
                        tracing::error!("{err:#}");
                        self.status.last_error = Some(format!("{err:#}"));
                    }
                }
            }
            if let Some((_, task)) = &self.source {
                if task.is_finished() {
                    let (_, task) = self.source.take().expect("checked");
                    match task.await {
                        Ok(Ok(())) => break Err(anyhow::anyhow!("the member source stopped")),
                        Ok(Err(err)) => break Err(err.context("the member source failed")),
                        Err(err) => break Err(anyhow::anyhow!("the member source task failed: {err}")),
                    }
                }
            }
            self.publish();
        };
        self.shutdown().await;
        result
    }

    fn start_source(&mut self) {
        if let Some((stop, _)) = self.source.take() {
            stop.cancel();
        }
        let stop = self.root.child_token();
        let task = tokio::spawn(members_source::run(
            self.config.members.clone(),
            self.config.kubernetes.clone(),
            self.metrics.clone(),
            self.updates_tx.clone(),
            self.known_tx.subscribe(),
            stop.clone(),
        ));
        self.source = Some((stop, task));
    }

    fn start_events(&mut self) {
        self.events = match (self.config.agent.events, events::regarding(&self.config.members.source)) {
            (true, Some(reference)) => events::spawn(
                self.config.kubernetes.clone(),
                reference,
                self.known_tx.subscribe(),
                self.root.child_token(),
            ),
            _ => events::Events::disabled(),
        };
    }

    /// Installs the forward to the bootstrap targets (or the first member set). False when a
    /// signal asked to stop while waiting for members.
    async fn bootstrap_forward(
        &mut self,
        term: &mut tokio::signal::unix::Signal,
        int: &mut tokio::signal::unix::Signal,
    ) -> anyhow::Result<bool> {
        let mut targets: Vec<SocketAddr> = self.config.forward.targets.iter().map(|e| e.0).collect();
        if targets.is_empty() {
            notify::status("waiting for a member list to forward the endpoint to");
            tracing::info!("no forward.targets configured: waiting for the first member list to forward to");
            while targets.is_empty() {
                let update = tokio::select! {
                    u = self.updates.recv() => u.context("the member source ended before giving a member list")?,
                    _ = term.recv() => return Ok(false),
                    _ = int.recv() => return Ok(false),
                };
                self.on_update(update);
                targets = member_addresses(&self.members).await;
            }
        }
        self.endpoint.forward_to(targets).await?;
        self.metrics.forward_installed.set(1);
        self.set_phase(Phase::Forwarding);
        Ok(true)
    }

    fn on_update(&mut self, update: Update) {
        match update {
            Update::Accepted { set, origin } => {
                tracing::info!(members = %set, origin = %origin, "member set accepted");
                self.members = set.clone();
                self.members_origin = origin.to_string();
                self.known_tx.send_replace(set);
                self.status.source_problem = None;
                self.dirty = true;
            }
            Update::Rejected { source, reason } => {
                tracing::warn!(source, "member update rejected, keeping the last good set: {reason}");
                self.events.note(events::Note {
                    warning: true,
                    reason: "MembersRejected",
                    action: "ValidateMembers",
                    message: format!("{source}: {reason}; keeping {}", self.members),
                });
                self.status.last_rejected_update = Some(format!("{source}: {reason}"));
            }
            Update::Problem { source, message, .. } => {
                tracing::warn!(source, "{message}; keeping the last good set");
                self.status.source_problem = Some(format!("{source}: {message}"));
            }
        }
    }

    async fn on_tick(&mut self) -> anyhow::Result<()> {
        self.ticks += 1;
        self.shared.beat();
        notify::watchdog();
        self.apply_if_due().await;

        let health = self.haproxy.health().await;
        if health.answers && !self.status.haproxy_answers {
            // HAProxy (re)started: whatever it runs is brought to the desired state.
            tracing::info!("HAProxy answers: reconciling it with the member set");
            self.dirty = true;
        }
        self.status.haproxy_answers = health.answers;
        self.status.haproxy_servers_up = health.up;
        self.status.haproxy_servers_total = health.total;
        let healthy = health.answers && health.up > 0;
        match self.machine.observe(healthy) {
            Action::Stay => {}
            Action::HandOver => {
                let from =
                    if self.status.phase == Phase::Fallback.as_str() { Phase::Fallback } else { Phase::Forwarding };
                self.record_transition(from, Phase::HandingOver);
                notify::status("handing the endpoint over to HAProxy");
                match self.endpoint.hand_to_haproxy().await {
                    Ok(()) => {
                        self.machine.handover_done(true, from);
                        self.metrics.forward_installed.set(0);
                        self.set_phase(Phase::Balanced);
                    }
                    Err(err) => {
                        self.machine.handover_done(false, from);
                        self.set_phase(from);
                        return Err(err.context("handover to HAProxy failed; the forward keeps the endpoint"));
                    }
                }
            }
            Action::FallBack => {
                let all = member_addresses(&self.members).await;
                let mut ready = probe::ready_members(&all, self.config.handover.probe_timeout).await;
                if ready.is_empty() {
                    tracing::warn!("HAProxy is unhealthy and no member answers /readyz: forwarding to every member");
                    ready = all;
                }
                if ready.is_empty() {
                    self.machine.fallback_done(false);
                    anyhow::bail!("HAProxy is unhealthy and no member address is known to fall back to");
                }
                match self.endpoint.forward_to(ready).await {
                    Ok(()) => {
                        self.machine.fallback_done(true);
                        self.metrics.forward_installed.set(1);
                        self.set_phase(Phase::Fallback);
                    }
                    Err(err) => {
                        self.machine.fallback_done(false);
                        return Err(err.context("fallback to the forward failed"));
                    }
                }
            }
        }
        // While the forward carries the endpoint, keep it pointed at members that are ready.
        if self.endpoint.forwarding() && self.ticks.is_multiple_of(5) {
            self.refresh_forward_targets().await?;
        }
        self.endpoint.tick().await
    }

    async fn refresh_forward_targets(&mut self) -> anyhow::Result<()> {
        let all = member_addresses(&self.members).await;
        if all.is_empty() {
            return Ok(());
        }
        let ready = probe::ready_members(&all, self.config.handover.probe_timeout).await;
        if ready.is_empty() {
            return Ok(());
        }
        if self.endpoint.carrier() != Some(&Carrier::Forward(ready.clone())) {
            tracing::info!(targets = ?ready, "forwarding to the members that answer /readyz");
            self.endpoint.forward_to(ready).await?;
        }
        Ok(())
    }

    async fn apply_if_due(&mut self) {
        if !self.dirty || self.members.is_empty() {
            return;
        }
        if let Some(last) = self.last_apply {
            if last.elapsed() < self.config.haproxy.min_apply_interval {
                return;
            }
        }
        self.last_apply = Some(Instant::now());
        let input = RenderInput { members: &self.members, bind: self.config.haproxy_bind() };
        match self.haproxy.apply(&input).await {
            Ok(report) => {
                tracing::info!(%report, "HAProxy in step with the members");
                self.status.last_apply = Some(report.to_string());
                self.dirty = false;
            }
            Err(err) => {
                // Nothing changed on a failed apply: the next tick after the interval tries again.
                tracing::error!("applying members to HAProxy failed: {err:#}");
                self.status.last_error = Some(format!("apply: {err:#}"));
            }
        }
    }

    fn reload_config(&mut self) {
        match self.options.load() {
            Ok(config) => {
                tracing::info!("SIGHUP: configuration re-read");
                let source_changed = format!("{:?}{:?}", config.members, config.kubernetes)
                    != format!("{:?}{:?}", self.config.members, self.config.kubernetes);
                self.machine.set_thresholds(thresholds(&config));
                if let Err(err) = self.haproxy.set_settings(config.haproxy.clone()) {
                    tracing::error!(
                        "SIGHUP: the new haproxy settings are invalid, keeping the running configuration: {err}"
                    );
                    self.status.last_error = Some(format!("config reload: haproxy: {err}"));
                    return;
                }
                if config.endpoint.listen != self.config.endpoint.listen
                    || config.endpoint.topology != self.config.endpoint.topology
                {
                    tracing::warn!("endpoint.listen and endpoint.topology changes take effect at the next restart");
                }
                self.config = Config { endpoint: self.config.endpoint.clone(), ..config };
                if source_changed {
                    self.start_source();
                }
                self.dirty = true;
            }
            Err(err) => {
                tracing::error!("SIGHUP: the new configuration is invalid, keeping the running one: {err:#}");
                self.status.last_error = Some(format!("config reload: {err:#}"));
            }
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        let old = self.machine.phase();
        if self.status.phase != phase.as_str() {
            if !self.status.phase.is_empty() {
                self.record_transition_str(&self.status.phase.clone(), phase.as_str());
            }
            self.phase_since = SystemTime::now();
            self.status.phase = phase.as_str().to_string();
            for p in Phase::ALL {
                self.metrics.state.get_or_create(&StateLabel { state: p.as_str().into() }).set(i64::from(p == phase));
            }
            let sentence = self.sentence();
            tracing::info!(from = old.as_str(), "{sentence}");
            notify::status(&sentence);
            let (warning, reason, action) = match phase {
                Phase::Balanced => (false, "HandedOver", "HandOver"),
                Phase::Fallback => (true, "FellBack", "FallBack"),
                Phase::Forwarding => (false, "Forwarding", "Forward"),
                Phase::HandingOver => (false, "HandingOver", "HandOver"),
            };
            self.events.note(events::Note { warning, reason, action, message: sentence });
        }
    }

    fn record_transition(&self, from: Phase, to: Phase) {
        self.record_transition_str(from.as_str(), to.as_str());
    }

    fn record_transition_str(&self, from: &str, to: &str) {
        self.metrics.transitions.get_or_create(&TransitionLabels { from: from.into(), to: to.into() }).inc();
    }

    fn sentence(&self) -> String {
        match self.endpoint.carrier() {
            Some(Carrier::Haproxy) => format!("{}: HAProxy carries {}", self.status.phase, self.config.endpoint.listen),
            Some(Carrier::Forward(t)) => format!(
                "{}: {} forwards {} to {}",
                self.status.phase,
                self.endpoint.backend_name(),
                self.config.endpoint.listen,
                t.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
            None => format!("{}: the endpoint is not carried yet", self.status.phase),
        }
    }

    fn publish(&mut self) {
        self.status.endpoint_carried = self.endpoint.carrier().is_some();
        self.status.carrier = match self.endpoint.carrier() {
            Some(Carrier::Haproxy) => "haproxy".into(),
            Some(Carrier::Forward(t)) => t.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            None => "none".into(),
        };
        self.status.members = self.members.iter().map(ToString::to_string).collect();
        self.status.members_origin = self.members_origin.clone();
        self.status.phase_since =
            self.phase_since.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        self.metrics.backend_servers_up.set(self.status.haproxy_servers_up as i64);
        *self.shared.status.write().expect("status lock") = self.status.clone();
    }

    async fn shutdown(&mut self) {
        let keep = self.config.forward.on_shutdown == OnShutdown::Keep;
        notify::stopping(if keep { "stopping; the forward stays in place" } else { "stopping; removing the forward" });
        tracing::info!(keep_forward = keep, "shutting down");
        self.root.cancel();
        if let Err(err) = self.endpoint.shutdown(keep).await {
            tracing::error!("while releasing the endpoint: {err:#}");
        }
        if let Some((_, task)) = self.source.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
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

fn thresholds(config: &Config) -> Thresholds {
    Thresholds { rise: config.handover.rise, fall: config.handover.fall, fallback: config.handover.fallback }
}

/// The members' addresses; DNS names are resolved with the system resolver.
async fn member_addresses(members: &MemberSet) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for m in members.iter() {
        if let Some(addr) = m.socket_addr() {
            out.push(addr);
        } else {
            match tokio::net::lookup_host(m.address().to_string()).await {
                Ok(mut addrs) => out.extend(addrs.next()),
                Err(err) => tracing::warn!(member = %m, "cannot resolve member: {err}"),
            }
        }
    }
    out.truncate(crate::forward::spec::MAX_TARGETS);
    out
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }
}
