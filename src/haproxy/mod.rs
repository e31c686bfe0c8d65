//! HAProxy: haproxy.cfg rendered from the member set, validated, applied without a reload when
//! only servers change, and read back.
//!
//! - [`settings`]: the `haproxy:` section of the agent's configuration, checked into values that
//!   are safe to render.
//! - [`mod@render`]: haproxy.cfg from a tera template (the built-in `haproxy.cfg.tera`, or the
//!   operator's), with a digest of everything outside the server list.
//! - [`check`]: `haproxy -c` on a candidate file before it replaces the live one.
//! - [`cluster_ca`]: the cluster CA file the checks verify against once it is usable.
//! - [`resolve`]: members to servers (DNS names resolved to IP addresses). The agent resolves
//!   once per member update and drives both the forward and HAProxy from the result.
//! - [`runtime`]: the Runtime API and master CLI client; commands built from parsed values.
//! - [`state`]: parsers for `show servers state`, `show stat`, `show proc`, `show info`.
//! - [`plan`]: the Runtime API changes that turn the running backend into the desired one (pure).
//! - [`reload`]: reloads (master socket, systemd or a command), confirmed from `show proc`.
//!
//! # Interface for the agent
//!
//! ```text
//! let mut haproxy = Haproxy::new(settings, metrics)?;       // settings checked, template compiled
//! haproxy.apply(&RenderInput { servers: &desired, bind }).await // -> ApplyReport | ApplyError
//! haproxy.health().await                                    // -> Health { answers, up, total, draining, stale, maint }
//! haproxy.snapshot().await                                  // -> BackendSnapshot (servers, states, sessions)
//! haproxy.set_settings(new_settings)?;                      // SIGHUP; the next apply reloads if needed
//! ```
//!
//! [`Haproxy::apply`] is also the reconcile at start: it reads what HAProxy runs, whatever
//! started it, and brings it to the desired state:
//! - HAProxy not running (neither socket answers): the file is written (if it differs) and
//!   HAProxy picks it up when it starts; the report says so (`method = file`).
//! - the running worker's configuration digest (global `description`, read with `show info`)
//!   differs from the rendered one, or the Runtime API cannot express a difference (a server
//!   without checks, for instance): the candidate is validated, committed, and HAProxy reloaded
//!   once; the new worker and its digest are read back (`method = reload`). Reloads are at least
//!   `minReloadInterval` apart (apply waits). If HAProxy does not confirm the reload, the
//!   previous file is put back, so the file on disk keeps describing what runs.
//! - otherwise only servers differ: `add server` + `enable health` + `set server state ready` +
//!   `set server health down`, `set server addr ... port ...`, and `set server state drain` for
//!   removed servers; servers that stay are not touched and keep their health state and
//!   connections (`method = runtime`). Then the candidate file is validated and committed, so
//!   a later restart yields the same backend (runtime first: the change reaches traffic without
//!   waiting for `haproxy -c`; a restart in between is reconciled when HAProxy answers again). The backend is read back and
//!   compared. Added servers start DOWN and take traffic once `rise` checks passed; removals of
//!   the last UP servers wait (bounded) for an added one to come UP first.
//!
//! An invalid template, setting or candidate file fails before anything changes: the live file
//! and the running HAProxy stay as they were.
//!
//! Removed servers are drained: no new connections, open ones continue. A drained server is
//! deleted (`set server state maint`, then `del server`, which 2.6 refuses while sessions remain)
//! once its sessions reach 0, or after `drainTimeout` with `shutdown sessions server` first.
//! [`Haproxy::health`] completes drains that are due each time it reads the backend, so the
//! agent's tick drives them; [`Haproxy::finish_drains`] does the same on demand.
//!
//! Servers marked DOWN by their checks get no new connections; [`Haproxy::health`] also shuts
//! down the sessions of those that are gone (a check status other than `L7STS`: no connection,
//! no TLS, `/livez` failing) at once, and of those only not ready (`L7STS`: `/livez` passed,
//! `/readyz` failed) after `healthCheck.unreadyGrace` ([`plan::cuts`] decides).
//!
//! Coalescing is the caller's: call `apply` with the latest member set, at most once per
//! `minApplyInterval` (a field of [`HaproxySettings`]); updates that arrive in between are
//! folded into the next call. `apply` is idempotent and reads HAProxy back each time, so a
//! failed or cancelled apply is repaired by the next one.
//!
//! Metrics: `cpha_applies_total{method,result}` for every apply that changed something or
//! failed (failures to render, validate or write the file count as `method="file"`),
//! `cpha_reloads_total{result}` for every reload attempted, `cpha_backend_servers_up` at every
//! read-back.
//!
//! Decisions, with their reasons where they are made: DNS members are resolved by cpha
//! ([`resolve`]); checks verify the apiserver certificates against `healthCheck.caFile`, or
//! against the cluster CA once it exists and is valid, and not at all before
//! ([`settings::Checked::with_cluster_ca`], [`cluster_ca`], docs/haproxy.md); a reload is
//! needed exactly when the digest of the rendering without servers changes ([`mod@render`]).
//!
//! NOTE: which keywords the checks get from the cluster CA is decided here, in the actuator,
//! not in the agent's controller: it is a fact about a file, read when the file is rendered,
//! like a DNS name resolved at each apply, and the controller never sees server keywords. What
//! the controller does decide is when to apply: [`Health::stale`] tells it that the file would
//! now render differently (the CA appeared, or stopped being usable), and it schedules one
//! apply, which reloads once because the digest changed.

pub mod check;
pub mod cluster_ca;
pub mod plan;
pub mod reload;
pub mod render;
pub mod resolve;
pub mod runtime;
pub mod settings;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use check::CheckError;
pub use reload::{ReloadError, ReloadReport};
pub use render::{render, RenderError, Rendered, Server, Template};
pub use resolve::Unresolved;
pub use runtime::RuntimeError;
pub use settings::{Balance, HaproxySettings, ReloadMethod, SettingsError};
pub use state::{BackendSnapshot, ServerSnapshot, ServerStatus};

use crate::members::ServerName;
use crate::metrics::{ApplyMethod, Metrics, Outcome, ResultLabel};
use runtime::{AdminState, Cli, Command};
use settings::Checked;

/// What the backend should hold: the servers (members already resolved to addresses, see
/// [`resolve`]) and the frontend's bind address (the load-balancer address itself in the
/// release topology, a private one in the retarget one).
#[derive(Debug, Clone, Copy)]
pub struct RenderInput<'a> {
    pub servers: &'a [Server],
    pub bind: SocketAddr,
}

/// HAProxy as the handover sees it: healthy means `answers && up >= 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Health {
    /// The admin socket answered with the apiserver backend's servers.
    pub answers: bool,
    /// Servers taking new connections (UP).
    pub up: usize,
    /// Servers of the backend, draining ones and those in maintenance excepted.
    pub total: usize,
    /// Removed servers still finishing their connections.
    pub draining: usize,
    /// The file would render differently now than at the last apply, for a reason outside the
    /// member set (the cluster CA appeared, or is no longer usable): an apply is due.
    pub stale: bool,
    /// Desired servers an operator put in maintenance (cpha leaves them so).
    pub maint: usize,
}

impl Health {
    pub fn of(snapshot: &BackendSnapshot) -> Health {
        let held = |s: &&ServerSnapshot| matches!(s.status, ServerStatus::Drain | ServerStatus::Maint);
        Health {
            answers: true,
            up: snapshot.up(),
            total: snapshot.servers.iter().filter(|s| !held(s)).count(),
            draining: snapshot.servers.iter().filter(held).count(),
            stale: false,
            maint: 0,
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// How the change was made; `None` when HAProxy and the file were already in step.
    pub method: Option<ApplyMethod>,
    /// Whether HAProxy was running.
    pub running: bool,
    pub file_written: bool,
    pub added: Vec<String>,
    pub readdressed: Vec<String>,
    /// Servers taken back from drain or maintenance.
    pub readied: Vec<String>,
    /// Servers put into drain by this apply.
    pub draining: Vec<String>,
    pub deleted: Vec<String>,
    /// Why a reload was needed.
    pub reload_reasons: Vec<String>,
    pub reload: Option<ReloadReport>,
    /// The backend as read back after the change.
    pub snapshot: Option<BackendSnapshot>,
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.running {
            let what = if self.file_written { "file written" } else { "file already up to date" };
            write!(f, "HAProxy not running: {what}")?;
        } else {
            match self.method {
                None => f.write_str("no change")?,
                Some(ApplyMethod::Reload) => {
                    write!(f, "reload ({})", self.reload_reasons.join("; "))?;
                    if let Some(r) = &self.reload {
                        write!(f, ": {r}")?;
                    }
                }
                Some(ApplyMethod::Runtime) => f.write_str("runtime")?,
                Some(ApplyMethod::File) => f.write_str("file rewritten, servers already in step")?,
            }
            for (label, list) in [
                ("added", &self.added),
                ("moved", &self.readdressed),
                ("readied", &self.readied),
                ("draining", &self.draining),
                ("deleted", &self.deleted),
            ] {
                if !list.is_empty() {
                    write!(f, "; {label} {}", list.join(", "))?;
                }
            }
            if let Some(s) = &self.snapshot {
                write!(f, "; {}/{} UP", s.up(), Health::of(s).total)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error("cannot replace {}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Reload(#[from] ReloadError),
    #[error("HAProxy's backend does not match after the change: {}", problems.join("; "))]
    ReadBack { problems: Vec<String> },
}

impl From<SettingsError> for ApplyError {
    fn from(e: SettingsError) -> Self {
        ApplyError::Render(RenderError::Settings(e))
    }
}

enum Probe {
    NotRunning,
    Running { digest: Option<String> },
}

/// The actuator: owns haproxy.cfg and HAProxy's apiserver backend.
pub struct Haproxy {
    settings: HaproxySettings,
    checked: Checked,
    template: Template,
    metrics: Arc<Metrics>,
    admin: Cli,
    master: Cli,
    /// Removed servers being drained, with the time their sessions are shut down.
    drains: BTreeMap<String, Instant>,
    /// Names of the last desired servers.
    desired: BTreeSet<String>,
    last_reload: Option<Instant>,
    /// `healthCheck.clusterCaFile`, when it decides anything, and its last state seen.
    cluster_ca: Option<(cluster_ca::ClusterCa, Option<settings::CaState>)>,
}

impl Haproxy {
    /// Checks the settings and compiles the template; nothing is read from HAProxy yet.
    pub fn new(settings: HaproxySettings, metrics: Arc<Metrics>) -> Result<Haproxy, RenderError> {
        let checked = settings.check()?;
        let template = Template::from_settings(&settings)?;
        let (admin, master) = clis(&settings);
        let cluster_ca = cluster_ca_of(&checked);
        Ok(Haproxy {
            settings,
            checked,
            template,
            metrics,
            admin,
            master,
            drains: BTreeMap::new(),
            desired: BTreeSet::new(),
            last_reload: None,
            cluster_ca,
        })
    }

    /// Replaces the settings (and re-reads the template); the next apply reloads HAProxy if the
    /// rendered file changes outside the server list. On error the previous settings stay.
    pub fn set_settings(&mut self, settings: HaproxySettings) -> Result<(), RenderError> {
        let checked = settings.check()?;
        let template = Template::from_settings(&settings)?;
        (self.admin, self.master) = clis(&settings);
        if self.checked.cluster_ca_file != checked.cluster_ca_file {
            self.cluster_ca = cluster_ca_of(&checked);
        }
        self.settings = settings;
        self.checked = checked;
        self.template = template;
        Ok(())
    }

    pub fn settings(&self) -> &HaproxySettings {
        &self.settings
    }

    /// Renders the file, without touching anything.
    pub fn render(&self, input: &RenderInput<'_>) -> Result<Rendered, RenderError> {
        let checked = match &self.checked.cluster_ca_file {
            Some(path) => self.checked.with_cluster_ca(&cluster_ca::read_once(std::path::Path::new(path.as_str()))),
            None => self.checked.clone(),
        };
        self.template.render(&self.settings, &checked, input.bind, input.servers)
    }

    /// Reads the cluster CA's state (a `stat` when it did not change) and logs a change; the
    /// settings to render with follow from it.
    fn read_cluster_ca(&mut self) -> Checked {
        let Some((ca, last)) = &mut self.cluster_ca else { return self.checked.clone() };
        let now = ca.read();
        if last.as_ref() != Some(&now) {
            let path = ca.path().display();
            let was_usable = matches!(last, Some(settings::CaState::Usable { .. }));
            match (&now, last.is_some()) {
                (settings::CaState::Usable { .. }, _) if was_usable => {
                    tracing::info!(%path, "the cluster CA changed: HAProxy is reloaded to load it")
                }
                (settings::CaState::Usable { .. }, _) => {
                    tracing::info!(%path, "cluster CA found: HAProxy's checks verify the apiservers against it")
                }
                (settings::CaState::Absent, false) => {
                    tracing::info!(%path, "no cluster CA yet: HAProxy's checks do not verify the apiservers until it exists")
                }
                (settings::CaState::Absent, true) => {
                    tracing::warn!(%path, "the cluster CA is gone: HAProxy's checks no longer verify the apiservers")
                }
                (settings::CaState::Invalid(why), _) => tracing::warn!(
                    %path,
                    "the cluster CA is not usable ({why}): HAProxy's checks do not verify the apiservers until it is"
                ),
            }
            *last = Some(now.clone());
        }
        self.checked.with_cluster_ca(&now)
    }

    /// Brings the file and the running HAProxy to `input`; see the module documentation.
    #[tracing::instrument(skip_all, err)]
    pub async fn apply(&mut self, input: &RenderInput<'_>) -> Result<ApplyReport, ApplyError> {
        let mut method = ApplyMethod::File;
        let started = Instant::now();
        let result = self.apply_inner(input, &mut method).await;
        let counted = match &result {
            Ok(report) => report.method.map(|m| (m, Outcome::Ok)),
            // The file could not be made: nothing else was attempted.
            Err(ApplyError::Render(_) | ApplyError::Check(_) | ApplyError::File { .. }) => {
                Some((ApplyMethod::File, Outcome::Error))
            }
            Err(_) => Some((method, Outcome::Error)),
        };
        if let Some((method, result)) = counted {
            self.metrics.apply(method, result, started.elapsed());
        }
        if let Ok(ApplyReport { snapshot: Some(s), .. }) = &result {
            self.metrics.servers(&server_states(s));
        }
        result
    }

    async fn apply_inner(
        &mut self,
        input: &RenderInput<'_>,
        method: &mut ApplyMethod,
    ) -> Result<ApplyReport, ApplyError> {
        // NOTE: the keywords used from here on, in the file and in `add server` alike.
        self.checked = self.read_cluster_ca();
        let rendered = self.template.render(&self.settings, &self.checked, input.bind, input.servers)?;
        let servers = input.servers.to_vec();
        let mut report = ApplyReport::default();
        let live = std::fs::read_to_string(&self.settings.config_path).ok();
        match self.probe().await? {
            Probe::NotRunning => {
                if live.as_deref() != Some(rendered.text.as_str()) {
                    self.candidate(&rendered.text).await?.commit().map_err(|e| self.file_error(e))?;
                    report.file_written = true;
                    report.method = Some(ApplyMethod::File);
                    tracing::info!(path = %self.settings.config_path.display(), "HAProxy is not running: configuration written");
                }
            }
            Probe::Running { digest } => {
                report.running = true;
                if digest.as_deref() == Some(rendered.digest.as_str()) {
                    *method = ApplyMethod::Runtime;
                    self.runtime_path(&rendered, &servers, live, &mut report, method).await?;
                } else {
                    *method = ApplyMethod::Reload;
                    report.reload_reasons.push(match digest {
                        Some(d) => {
                            format!("configuration outside the server list changed ({d} -> {})", rendered.digest)
                        }
                        None => "the running configuration was not rendered by cpha".to_string(),
                    });
                    self.reload_path(&rendered, &servers, live, &mut report).await?;
                }
            }
        }
        self.desired = servers.iter().map(|s| s.name.to_string()).collect();
        // The live file says this now (written, or already in step): what is expected there.
        crate::fsutil::owned::in_step(&self.settings.config_path, rendered.text.as_bytes(), check::CONFIG_MODE);
        Ok(report)
    }

    /// Whether HAProxy runs, and the digest of the configuration its current worker loaded.
    async fn probe(&self) -> Result<Probe, ApplyError> {
        match reload::show_proc(&self.master).await {
            Ok(procs) => {
                let Some(worker) = procs.workers.last() else {
                    return Ok(Probe::Running { digest: None });
                };
                let digest = reload::worker_digest(&self.master, worker.pid).await?;
                return Ok(Probe::Running { digest });
            }
            Err(e) if e.is_unreachable() => {}
            Err(e) => return Err(e.into()),
        }
        // No master CLI: HAProxy may still run (started without -S); reloads will need one.
        match self.admin.run(&Command::ShowInfo).await {
            Ok(info) => Ok(Probe::Running { digest: reload::digest_of_info(&info) }),
            Err(e) if e.is_unreachable() => Ok(Probe::NotRunning),
            Err(e) => Err(e.into()),
        }
    }

    async fn runtime_path(
        &mut self,
        rendered: &Rendered,
        servers: &[Server],
        live: Option<String>,
        report: &mut ApplyReport,
        method: &mut ApplyMethod,
    ) -> Result<(), ApplyError> {
        let before = self.snapshot().await?;
        let mut plan = plan::plan(servers, &before);
        // Maintenance cpha set itself (a removal taken back before `del server`) is readied;
        // an operator's is never reverted.
        let (ours, operators): (Vec<_>, Vec<_>) =
            std::mem::take(&mut plan.held).into_iter().partition(|n| self.drains.contains_key(n.as_str()));
        plan.ready.extend(ours);
        for server in &operators {
            tracing::debug!(server = %server, "in maintenance by an operator: left so");
        }
        if !plan.reload_reasons.is_empty() {
            *method = ApplyMethod::Reload;
            report.reload_reasons = plan.reload_reasons;
            return self.reload_path(rendered, servers, live, report).await;
        }
        let b = &self.checked.backend;
        let params = self.checked.server_params.as_str();
        for s in &plan.add {
            let server = &s.name;
            self.admin.run(&Command::AddServer { backend: b, server, addr: s.addr, params }).await?;
            self.admin.run(&Command::EnableHealth { backend: b, server }).await?;
            self.admin.run(&Command::SetState { backend: b, server, state: AdminState::Ready }).await?;
            // NOTE: leaving maintenance, a server counts as UP until a check fails; forced
            // down, it takes traffic only after `rise` checks of /readyz passed. (HAProxy
            // ignores `health down` given before `state ready`, so a connection arriving in
            // the few microseconds between both may still reach it; `retries` and
            // `option redispatch` send it elsewhere if the server refuses it.)
            self.admin.run(&Command::SetHealthDown { backend: b, server }).await?;
            tracing::info!(server = %server, addr = %s.addr, "server added");
            report.added.push(server.to_string());
            self.drains.remove(server.as_str());
        }
        for (s, from) in &plan.readdress {
            self.admin.run(&Command::SetAddr { backend: b, server: &s.name, addr: s.addr }).await?;
            tracing::info!(server = %s.name, from = ?from, to = %s.addr, "server moved");
            report.readdressed.push(s.name.to_string());
        }
        for server in &plan.ready {
            self.admin.run(&Command::SetState { backend: b, server, state: AdminState::Ready }).await?;
            tracing::info!(server = %server, "server taken back from drain or maintenance");
            report.readied.push(server.to_string());
            self.drains.remove(server.as_str());
        }
        for server in &plan.enable_health {
            self.admin.run(&Command::EnableHealth { backend: b, server }).await?;
        }
        if !plan.drain.is_empty() {
            self.make_before_break(servers, &plan, &before).await;
        }
        let deadline = Instant::now() + self.settings.drain_timeout;
        for server in &plan.drain {
            self.admin.run(&Command::SetState { backend: b, server, state: AdminState::Drain }).await?;
            tracing::info!(server = %server, timeout = ?self.settings.drain_timeout, "server removed: draining");
            report.draining.push(server.to_string());
            self.drains.insert(server.to_string(), deadline);
        }
        for server in &plan.draining {
            self.drains.entry(server.to_string()).or_insert(deadline);
        }
        for server in &plan.delete {
            self.admin.run(&Command::DelServer { backend: b, server }).await?;
            tracing::info!(server = %server, "server deleted");
            report.deleted.push(server.to_string());
        }
        let changed_runtime = !plan.is_empty();
        self.desired = servers.iter().map(|s| s.name.to_string()).collect();
        // NOTE: the runtime first, then the file. `haproxy -c` of the candidate takes tens of
        // milliseconds, and the servers come from parsed values either way; a restart in
        // between is reconciled by the agent when HAProxy answers again.
        if live.as_deref() != Some(rendered.text.as_str()) {
            self.candidate(&rendered.text).await?.commit().map_err(|e| self.file_error(e))?;
            report.file_written = true;
        }
        let mut after = self.snapshot().await?;
        let finished = self.finish_drains_with(&after).await?;
        if !finished.is_empty() {
            report.deleted.extend(finished);
            after = self.snapshot().await?;
        }
        verify(servers, &after, &self.drains)?;
        report.method = if changed_runtime || !report.deleted.is_empty() {
            Some(ApplyMethod::Runtime)
        } else if report.file_written {
            Some(ApplyMethod::File)
        } else {
            None
        };
        report.snapshot = Some(after);
        Ok(())
    }

    /// Before draining the last servers that take connections, gives the new ones a bounded
    /// time to pass their checks, so the backend is never left without an UP server by a swap.
    async fn make_before_break(&self, servers: &[Server], plan: &plan::Plan, before: &BackendSnapshot) {
        let draining_up =
            plan.drain.iter().any(|n| before.get(n.as_str()).is_some_and(|s| s.status == ServerStatus::Up));
        if !draining_up || servers.is_empty() {
            return;
        }
        let hc = &self.settings.health_check;
        let bound = (hc.inter * (hc.rise + 1) + hc.timeout).min(Duration::from_secs(10));
        let deadline = Instant::now() + bound;
        loop {
            match self.snapshot().await {
                Ok(s)
                    if servers.iter().any(|d| s.get(d.name.as_str()).is_some_and(|r| r.status == ServerStatus::Up)) =>
                {
                    return
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("waiting for a new server to come up: {e}"),
            }
            if Instant::now() >= deadline {
                tracing::warn!(?bound, "no desired server came UP before the old ones were drained");
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn reload_path(
        &mut self,
        rendered: &Rendered,
        servers: &[Server],
        live: Option<String>,
        report: &mut ApplyReport,
    ) -> Result<(), ApplyError> {
        let candidate = self.candidate(&rendered.text).await?;
        if let Some(last) = self.last_reload {
            let next = last + self.settings.min_reload_interval;
            let now = Instant::now();
            if next > now {
                tracing::info!(wait = ?(next - now), "waiting for minReloadInterval before reloading");
                tokio::time::sleep(next - now).await;
            }
        }
        candidate.commit().map_err(|e| self.file_error(e))?;
        report.file_written = true;
        tracing::info!(reasons = ?report.reload_reasons, "reloading HAProxy");
        let result = reload::reload(&self.settings, &self.master, &rendered.digest).await;
        self.last_reload = Some(Instant::now());
        let outcome = if result.is_ok() { Outcome::Ok } else { Outcome::Error };
        self.metrics.reloads.get_or_create(&ResultLabel { result: outcome }).inc();
        let confirmed = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(previous) = live {
                    // The file keeps describing what runs; the next apply tries again.
                    if let Err(restore) =
                        crate::fsutil::write_atomic(&self.settings.config_path, previous.as_bytes(), check::CONFIG_MODE)
                    {
                        tracing::error!("could not put the previous configuration back: {restore:#}");
                    }
                }
                return Err(e.into());
            }
        };
        tracing::info!("{confirmed}");
        report.reload = Some(confirmed);
        // Servers that were draining belong to the old workers now.
        self.drains.clear();
        report.method = Some(ApplyMethod::Reload);
        let after = self.snapshot_after_reload().await?;
        verify(servers, &after, &self.drains)?;
        report.snapshot = Some(after);
        Ok(())
    }

    /// The new worker's admin socket may take a moment to answer after the reload is confirmed.
    async fn snapshot_after_reload(&self) -> Result<BackendSnapshot, ApplyError> {
        let deadline = Instant::now() + self.settings.runtime_timeout;
        loop {
            match self.snapshot().await {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() < deadline => tracing::debug!("reading the backend after the reload: {e}"),
                Err(e) => return Err(e.into()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes the candidate and runs `haproxy -c` on it (off the async threads).
    async fn candidate(&self, text: &str) -> Result<crate::fsutil::Candidate, ApplyError> {
        let settings = self.settings.clone();
        let text = text.to_string();
        tokio::task::spawn_blocking(move || check::candidate(&settings, &settings.config_path, &text))
            .await
            .map_err(|e| ApplyError::File { path: self.settings.config_path.clone(), message: e.to_string() })?
            .map_err(ApplyError::Check)
    }

    fn file_error(&self, e: anyhow::Error) -> ApplyError {
        ApplyError::File { path: self.settings.config_path.clone(), message: format!("{e:#}") }
    }

    /// The apiserver backend as HAProxy reports it now (`show servers state` + `show stat`).
    pub async fn snapshot(&self) -> Result<BackendSnapshot, RuntimeError> {
        let backend = &self.checked.backend;
        let cmd = Command::ShowServersState { backend };
        let text = self.admin.run(&cmd).await?;
        let rows = state::parse_servers_state(&text).map_err(|r| RuntimeError::parse(&cmd, r, &text))?;
        let cmd = Command::ShowStat { backend };
        let text = self.admin.run(&cmd).await?;
        let stat = state::parse_stat(&text).map_err(|r| RuntimeError::parse(&cmd, r, &text))?;
        Ok(state::snapshot(backend.as_str(), &rows, &stat))
    }

    /// Reads the backend once: whether HAProxy answers and how many servers are UP. Also
    /// completes the drains that are due (see the module documentation), and updates
    /// `cpha_backend_servers_up`.
    pub async fn health(&mut self) -> Health {
        let stale = self.read_cluster_ca() != self.checked;
        let mut health = match self.snapshot().await {
            Ok(snapshot) => {
                if !self.drains.is_empty() {
                    if let Err(e) = self.finish_drains_with(&snapshot).await {
                        tracing::warn!("completing drains: {e}");
                    }
                }
                self.cut_sessions(&snapshot).await;
                self.metrics.servers(&server_states(&snapshot));
                let mut health = Health::of(&snapshot);
                health.maint = snapshot
                    .servers
                    .iter()
                    .filter(|s| {
                        operator_maint(s) && self.desired.contains(&s.name) && !self.drains.contains_key(&s.name)
                    })
                    .count();
                health.draining -= health.maint;
                self.metrics.backend_servers_maint.set(health.maint as i64);
                health
            }
            Err(e) => {
                tracing::debug!("HAProxy health: {e}");
                // Nothing answers: no server is known to be UP.
                self.metrics.servers(&[]);
                Health::default()
            }
        };
        health.stale = stale;
        health
    }

    /// Shuts down the sessions of DOWN servers that are gone, or not ready for longer than
    /// `healthCheck.unreadyGrace` ([`plan::cuts`] decides which).
    async fn cut_sessions(&self, snapshot: &BackendSnapshot) {
        let backend = &self.checked.backend;
        for (server, reason) in plan::cuts(&self.desired, snapshot, self.settings.health_check.unready_grace) {
            let sessions = snapshot.get(server.as_str()).map_or(0, |s| s.sessions);
            tracing::info!(server = %server, sessions, "server DOWN, {reason}: shutting its sessions down");
            if let Err(e) = self.admin.run(&Command::ShutdownSessions { backend, server: &server }).await {
                tracing::warn!(server = %server, "shutting sessions down: {e}");
            }
        }
    }

    /// Deletes drained servers whose sessions ended or whose drain timeout passed; returns
    /// their names.
    pub async fn finish_drains(&mut self) -> Result<Vec<String>, RuntimeError> {
        if self.drains.is_empty() {
            return Ok(Vec::new());
        }
        let snapshot = self.snapshot().await?;
        self.finish_drains_with(&snapshot).await
    }

    /// When the next drain times out, if any is in progress.
    pub fn next_drain_deadline(&self) -> Option<Instant> {
        self.drains.values().min().copied()
    }

    async fn finish_drains_with(&mut self, snapshot: &BackendSnapshot) -> Result<Vec<String>, RuntimeError> {
        let now = Instant::now();
        let mut deleted = Vec::new();
        for (name, deadline) in self.drains.clone() {
            let server = match (snapshot.get(&name), name.parse::<ServerName>()) {
                (Some(s), Ok(n)) if !self.desired.contains(&name) => (s, n),
                _ => {
                    self.drains.remove(&name);
                    continue;
                }
            };
            let (s, server) = server;
            if s.sessions > 0 && now < deadline {
                continue;
            }
            let backend = &self.checked.backend;
            if s.status != ServerStatus::Maint {
                self.admin.run(&Command::SetState { backend, server: &server, state: AdminState::Maint }).await?;
            }
            if s.sessions > 0 {
                tracing::info!(server = %server, sessions = s.sessions, "drain timeout: shutting down the remaining sessions");
                self.admin.run(&Command::ShutdownSessions { backend, server: &server }).await?;
            }
            // Sessions close asynchronously after a shutdown; `del server` refuses until then.
            let give_up = Instant::now() + Duration::from_secs(2);
            loop {
                match self.admin.run(&Command::DelServer { backend, server: &server }).await {
                    Ok(_) => {
                        tracing::info!(server = %server, "drained server deleted");
                        deleted.push(name.clone());
                        self.drains.remove(&name);
                        break;
                    }
                    Err(RuntimeError::Refused { response, .. }) if Instant::now() < give_up => {
                        tracing::debug!(server = %server, "del server: {response}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => {
                        tracing::warn!(server = %server, "drained server not deleted yet: {e}");
                        break;
                    }
                }
            }
        }
        Ok(deleted)
    }
}

/// A server in forced maintenance (`set server ... state maint`).
fn operator_maint(s: &ServerSnapshot) -> bool {
    s.status == ServerStatus::Maint && s.admin_state & state::admin::FMAINT != 0
}

/// Each server of the backend and whether it is UP (draining and maintenance are not).
fn server_states(snapshot: &BackendSnapshot) -> Vec<(String, bool)> {
    snapshot.servers.iter().map(|s| (s.name.clone(), s.status == ServerStatus::Up)).collect()
}

fn clis(settings: &HaproxySettings) -> (Cli, Cli) {
    (
        Cli::new(runtime::Endpoint::Unix(settings.admin_socket.clone()), settings.runtime_timeout),
        Cli::new(runtime::Endpoint::Unix(settings.master_socket.clone()), settings.runtime_timeout),
    )
}

fn cluster_ca_of(checked: &Checked) -> Option<(cluster_ca::ClusterCa, Option<settings::CaState>)> {
    checked.cluster_ca_file.as_ref().map(|p| (cluster_ca::ClusterCa::new(p.as_str()), None))
}

/// Every desired server is in the backend at its address and not held in drain or maintenance,
/// except in an operator's maintenance (forced, and not a drain of cpha's).
fn verify(desired: &[Server], snapshot: &BackendSnapshot, ours: &BTreeMap<String, Instant>) -> Result<(), ApplyError> {
    let mut problems = Vec::new();
    for s in desired {
        match snapshot.get(s.name.as_str()) {
            None => problems.push(format!("server {} is missing", s.name)),
            Some(r) if r.socket_addr() != Some(s.addr) => {
                problems.push(format!("server {} is at {:?}, not {}", s.name, r.socket_addr(), s.addr))
            }
            Some(r) if operator_maint(r) && !ours.contains_key(r.name.as_str()) => {}
            Some(r) if matches!(r.status, ServerStatus::Maint | ServerStatus::Drain) => {
                problems.push(format!("server {} is held in {}", s.name, r.status))
            }
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApplyError::ReadBack { problems })
    }
}

#[cfg(test)]
mod tests {
    use super::state::{check as chk, ServerSnapshot};
    use super::*;

    fn snap(servers: &[(&str, &str, ServerStatus)]) -> BackendSnapshot {
        BackendSnapshot {
            backend: "b".into(),
            servers: servers
                .iter()
                .map(|(n, a, st)| {
                    let a: SocketAddr = a.parse().unwrap();
                    ServerSnapshot {
                        name: n.to_string(),
                        addr: Some(a.ip()),
                        port: a.port(),
                        status: *st,
                        admin_state: 0,
                        check_state: chk::CONFIGURED | chk::ENABLED,
                        sessions: 0,
                        stat_status: String::new(),
                        since_change: 0,
                        check_status: String::new(),
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn health_counts_up_and_held_servers() {
        let s = snap(&[
            ("a", "10.0.0.1:1", ServerStatus::Up),
            ("b", "10.0.0.2:1", ServerStatus::Down),
            ("c", "10.0.0.3:1", ServerStatus::Drain),
            ("d", "10.0.0.4:1", ServerStatus::Up),
        ]);
        assert_eq!(Health::of(&s), Health { answers: true, up: 2, total: 3, draining: 1, stale: false, maint: 0 });
        assert_eq!(Health::default(), Health { answers: false, up: 0, total: 0, draining: 0, stale: false, maint: 0 });
    }

    #[test]
    fn verify_reports_every_difference() {
        let desired = [
            Server { name: "a".parse().unwrap(), addr: "10.0.0.1:1".parse().unwrap() },
            Server { name: "b".parse().unwrap(), addr: "10.0.0.2:1".parse().unwrap() },
            Server { name: "c".parse().unwrap(), addr: "10.0.0.3:1".parse().unwrap() },
            Server { name: "d".parse().unwrap(), addr: "10.0.0.4:1".parse().unwrap() },
        ];
        let s = snap(&[
            ("a", "10.0.0.1:1", ServerStatus::Down),
            ("b", "10.0.0.9:1", ServerStatus::Up),
            ("c", "10.0.0.3:1", ServerStatus::Maint),
        ]);
        let ApplyError::ReadBack { problems } = verify(&desired, &s, &BTreeMap::new()).unwrap_err() else { panic!() };
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("b is at"));
        assert!(problems[1].contains("c is held in MAINT"));
        assert!(problems[2].contains("d is missing"));
        verify(&desired[..1], &s, &BTreeMap::new()).unwrap();
    }

    #[test]
    fn report_reads_as_one_line() {
        let r = ApplyReport {
            method: Some(ApplyMethod::Runtime),
            running: true,
            added: vec!["cp3".into()],
            draining: vec!["cp1".into()],
            snapshot: Some(snap(&[
                ("cp3", "10.0.0.3:1", ServerStatus::Up),
                ("cp1", "10.0.0.1:1", ServerStatus::Drain),
            ])),
            ..ApplyReport::default()
        };
        assert_eq!(r.to_string(), "runtime; added cp3; draining cp1; 1/1 UP");
        let r = ApplyReport { file_written: true, method: Some(ApplyMethod::File), ..ApplyReport::default() };
        assert_eq!(r.to_string(), "HAProxy not running: file written");
    }
}
