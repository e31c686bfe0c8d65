//! The agent's Prometheus metrics, all in one registry. Modules receive `&Metrics` and update
//! the families they own; `server` (in the agent) renders the registry in the text format.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub from: String,
    pub to: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ApplyMethod {
    /// HAProxy Runtime API commands, no reload.
    Runtime,
    /// A reload through the master socket, systemd or a command.
    Reload,
    /// Only haproxy.cfg was rewritten (HAProxy not running).
    File,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error,
}

impl ApplyMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyMethod::Runtime => "runtime",
            ApplyMethod::Reload => "reload",
            ApplyMethod::File => "file",
        }
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
        }
    }
}

impl EncodeLabelValue for ApplyMethod {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApplyLabels {
    pub method: ApplyMethod,
    pub result: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub commit: String,
}

/// `cpha_build_info{version,commit} 1`: the running build, for joins in queries and for
/// spotting hosts left on an old one.
#[derive(Debug)]
pub struct BuildInfo(pub Family<BuildLabels, Gauge>);

impl Default for BuildInfo {
    fn default() -> Self {
        let family: Family<BuildLabels, Gauge> = Family::default();
        let labels =
            BuildLabels { version: env!("CARGO_PKG_VERSION").into(), commit: crate::build_info::COMMIT.into() };
        family.get_or_create(&labels).set(1);
        BuildInfo(family)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateLabels {
    pub source: String,
    /// `accepted` or `rejected`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabel {
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CarrierLabel {
    /// `forward` or `haproxy`.
    pub carrier: String,
}

/// Seconds an apply took, from 5 ms to about 20 s.
#[derive(Debug, Clone)]
pub struct ApplyDuration(pub Histogram);

impl Default for ApplyDuration {
    fn default() -> Self {
        ApplyDuration(Histogram::new(exponential_buckets(0.005, 2.0, 13)))
    }
}

/// Every metric the agent exports. Every series an alert may look for exists from the start
/// (see [`Metrics::zero`]), so "absent" never stands for "zero".
#[derive(Debug, Default)]
pub struct Metrics {
    /// Always 1, labelled with the version and the commit of this binary.
    pub build_info: BuildInfo,
    /// 1 for the current handover state, 0 for the others.
    pub state: Family<StateLabel, Gauge>,
    pub transitions: Family<TransitionLabels, Counter>,
    /// Members in the last accepted set.
    pub members: Gauge,
    pub member_updates_accepted: Family<SourceLabel, Counter>,
    pub member_updates_rejected: Family<SourceLabel, Counter>,
    pub applies: Family<ApplyLabels, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    /// Servers UP in HAProxy's apiserver backend, as last read back.
    pub backend_servers_up: Gauge,
    pub backend_servers_maint: Gauge,
    /// 1 while a bootstrap forward carries new connections.
    pub forward_installed: Gauge,
    /// 1 for the carrier while a request through the endpoint itself reaches a ready
    /// apiserver; 0 for both when it does not.
    pub endpoint_carried: Family<CarrierLabel, Gauge>,
    /// Member updates by source and result (`accepted`, `rejected`).
    pub member_updates: Family<UpdateLabels, Counter>,
    /// 1 for each server of the backend HAProxy reports UP, 0 for the others.
    pub backend_server_up: Family<ServerLabel, Gauge>,
    pub apply_duration: ApplyDuration,
    /// Unix time of the last successful apply and of the last accepted member update.
    pub last_apply_success: Gauge<f64, AtomicU64>,
    pub last_member_update: Gauge<f64, AtomicU64>,
    /// 1 while the member list and the apiservers' own registrations have disagreed for
    /// longer than `members.drift.after`.
    pub member_drift: Gauge,
    /// Unix time at which the agent's token (`kubernetes.tokenFile`, renewed by the agent)
    /// expires; 0 while there is none the agent renews.
    pub token_expiry: Gauge,
    /// 1 while this host holds the virtual IP.
    pub vip_held: Gauge,
    /// This host taking (`taken`) and losing (`lost`) the virtual IP.
    pub vip_changes: Family<ChangeLabel, Counter>,
    /// 1 for keepalived's VRRP state as it last told it (`gone` when it does not run).
    pub vrrp_state: Family<StateLabel, Gauge>,
    /// 1 for the health advertised to keepalived.
    pub vip_advertised: Family<HealthLabel, Gauge>,
    /// Repairs of what cpha owns after someone else changed it, by object (`forward`).
    pub repairs: Family<ObjectLabel, Counter>,
    /// Servers `backend_server_up` has a series for.
    servers_seen: Mutex<BTreeSet<String>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabel {
    /// `taken` or `lost`.
    pub change: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabel {
    /// What cpha owns: `forward` (the kernel forward).
    pub object: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabel {
    /// `healthy`, `degraded` or `withdrawn`.
    pub health: String,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

impl Metrics {
    /// Creates every labelled series whose labels are known at start, at 0: the member
    /// source's, and the agent's states and transitions.
    pub fn zero(&self, source: &str, states: &[&str], transitions: &[(&str, &str)]) {
        for state in states {
            self.state.get_or_create(&StateLabel { state: (*state).into() }).set(0);
        }
        for (from, to) in transitions {
            self.transitions.get_or_create(&TransitionLabels { from: (*from).into(), to: (*to).into() }).inc_by(0);
        }
        for method in [ApplyMethod::Runtime, ApplyMethod::Reload, ApplyMethod::File] {
            for result in [Outcome::Ok, Outcome::Error] {
                self.applies.get_or_create(&ApplyLabels { method, result }).inc_by(0);
            }
        }
        for result in [Outcome::Ok, Outcome::Error] {
            self.reloads.get_or_create(&ResultLabel { result }).inc_by(0);
        }
        let label = SourceLabel { source: source.into() };
        self.member_updates_accepted.get_or_create(&label).inc_by(0);
        self.member_updates_rejected.get_or_create(&label).inc_by(0);
        for result in ["accepted", "rejected"] {
            self.member_updates.get_or_create(&UpdateLabels { source: source.into(), result: result.into() }).inc_by(0);
        }
        for carrier in ["forward", "haproxy"] {
            self.endpoint_carried.get_or_create(&CarrierLabel { carrier: carrier.into() }).set(0);
        }
        for object in ["forward", "haproxy.cfg", "haproxy"] {
            self.repairs.get_or_create(&ObjectLabel { object: object.into() }).inc_by(0);
        }
    }

    /// `object` was put back after someone else changed it.
    pub fn repaired(&self, object: &str) {
        self.repairs.get_or_create(&ObjectLabel { object: object.into() }).inc();
    }

    /// The virtual IP's series, at 0, on a host that runs one.
    pub fn zero_vip(&self) {
        for object in ["keepalived.conf", "vip-health"] {
            self.repairs.get_or_create(&ObjectLabel { object: object.into() }).inc_by(0);
        }
        for change in ["taken", "lost"] {
            self.vip_changes.get_or_create(&ChangeLabel { change: change.into() }).inc_by(0);
        }
        self.vip(false, None, None);
    }

    /// The virtual IP as this host sees it.
    pub fn vip(&self, held: bool, vrrp: Option<crate::model::Vrrp>, advertised: Option<crate::model::Advertised>) {
        self.vip_held.set(i64::from(held));
        for state in crate::model::Vrrp::NAMES {
            let on = vrrp.is_some_and(|v| v.name() == state);
            self.vrrp_state.get_or_create(&StateLabel { state: state.into() }).set(i64::from(on));
        }
        for health in crate::model::Advertised::NAMES {
            let on = advertised.is_some_and(|a| a.name() == health);
            self.vip_advertised.get_or_create(&HealthLabel { health: health.into() }).set(i64::from(on));
        }
    }

    /// This host took or lost the virtual IP.
    pub fn vip_change(&self, held: bool) {
        let change = if held { "taken" } else { "lost" };
        self.vip_changes.get_or_create(&ChangeLabel { change: change.into() }).inc();
    }

    /// A member update from `source`, accepted or refused.
    pub fn member_update(&self, source: &str, accepted: bool) {
        let label = SourceLabel { source: source.into() };
        let result = if accepted { "accepted" } else { "rejected" };
        self.member_updates.get_or_create(&UpdateLabels { source: source.into(), result: result.into() }).inc();
        if accepted {
            self.member_updates_accepted.get_or_create(&label).inc();
            self.last_member_update.set(unix_now());
        } else {
            self.member_updates_rejected.get_or_create(&label).inc();
        }
    }

    /// An apply that changed something or failed, and how long it took.
    pub fn apply(&self, method: ApplyMethod, result: Outcome, took: Duration) {
        self.applies.get_or_create(&ApplyLabels { method, result }).inc();
        self.apply_duration.0.observe(took.as_secs_f64());
        if result == Outcome::Ok {
            self.last_apply_success.set(unix_now());
        }
    }

    /// The backend's servers as HAProxy reports them: `(name, up)`.
    pub fn servers(&self, servers: &[(String, bool)]) {
        let mut seen = self.servers_seen.lock().expect("metrics lock");
        let now: BTreeSet<String> = servers.iter().map(|(n, _)| n.clone()).collect();
        for gone in seen.difference(&now) {
            self.backend_server_up.remove(&ServerLabel { server: gone.clone() });
        }
        for (name, up) in servers {
            self.backend_server_up.get_or_create(&ServerLabel { server: name.clone() }).set(i64::from(*up));
        }
        self.backend_servers_up.set(servers.iter().filter(|(_, up)| *up).count() as i64);
        *seen = now;
    }

    /// The endpoint's true state: `Some(carrier)` when a request through it reached a member.
    pub fn carried(&self, carrier: Option<&str>) {
        for c in ["forward", "haproxy"] {
            self.endpoint_carried.get_or_create(&CarrierLabel { carrier: c.into() }).set(i64::from(carrier == Some(c)));
        }
    }
}

impl Metrics {
    /// A registry holding these metrics under the `cpha_` prefix.
    pub fn register(&self) -> Registry {
        let mut r = Registry::with_prefix("cpha");
        r.register("build_info", "The running cpha build (always 1)", self.build_info.0.clone());
        r.register("state", "Current handover state (1 for the current one)", self.state.clone());
        r.register("transitions", "Handover state transitions", self.transitions.clone());
        r.register("members", "Control-plane members in the last accepted set", self.members.clone());
        r.register("member_updates_accepted", "Member set updates accepted", self.member_updates_accepted.clone());
        r.register(
            "member_updates_rejected",
            "Member set updates rejected as invalid",
            self.member_updates_rejected.clone(),
        );
        r.register("applies", "Changes applied to HAProxy, by method and result", self.applies.clone());
        r.register("reloads", "HAProxy reloads, by result", self.reloads.clone());
        r.register(
            "member_drift",
            "1 while the member list and the apiservers' registrations (EndpointSlice) have disagreed longer than members.drift.after",
            self.member_drift.clone(),
        );
        r.register(
            "token_expiry_seconds",
            "Unix time at which the agent's own token expires (0: no token the agent renews)",
            self.token_expiry.clone(),
        );
        r.register("backend_servers_up", "Servers UP in HAProxy's apiserver backend", self.backend_servers_up.clone());
        r.register(
            "backend_servers_maint",
            "Desired servers an operator put in maintenance through HAProxy's socket (cpha leaves them so)",
            self.backend_servers_maint.clone(),
        );
        r.register(
            "forward_installed",
            "Whether the bootstrap forward carries new connections",
            self.forward_installed.clone(),
        );
        r.register(
            "endpoint_carried",
            "1 for the carrier (forward or haproxy) while a request through the endpoint itself reaches a ready apiserver",
            self.endpoint_carried.clone(),
        );
        r.register(
            "member_updates",
            "Member set updates by source and result (accepted, rejected)",
            self.member_updates.clone(),
        );
        r.register(
            "backend_server_up",
            "1 for each server of HAProxy's apiserver backend that is UP, 0 for the others",
            self.backend_server_up.clone(),
        );
        r.register("vip_held", "1 while this host holds the virtual IP", self.vip_held.clone());
        r.register("vip_changes", "This host taking and losing the virtual IP", self.vip_changes.clone());
        r.register(
            "vrrp_state",
            "keepalived's VRRP state on this host (1 for the current one; gone: not running)",
            self.vrrp_state.clone(),
        );
        r.register(
            "vip_advertised",
            "Health advertised to keepalived (1 for the current one)",
            self.vip_advertised.clone(),
        );
        r.register(
            "repairs",
            "Repairs of what cpha owns (object: forward) after someone else changed it",
            self.repairs.clone(),
        );
        r.register(
            "apply_duration_seconds",
            "Time an apply to HAProxy took (changes and failures)",
            self.apply_duration.0.clone(),
        );
        r.register(
            "last_apply_success_timestamp_seconds",
            "Unix time of the last successful apply to HAProxy",
            self.last_apply_success.clone(),
        );
        r.register(
            "last_member_update_timestamp_seconds",
            "Unix time of the last accepted member update",
            self.last_member_update.clone(),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_from_the_start_and_servers_come_and_go() {
        let m = Metrics::default();
        m.zero("configmap", &["balanced"], &[("forwarding", "handing-over")]);
        let text = |m: &Metrics| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &m.register()).unwrap();
            out
        };
        let out = text(&m);
        for line in [
            "cpha_applies_total{method=\"reload\",result=\"error\"} 0",
            "cpha_reloads_total{result=\"ok\"} 0",
            "cpha_member_updates_total{source=\"configmap\",result=\"rejected\"} 0",
            "cpha_member_updates_rejected_total{source=\"configmap\"} 0",
            "cpha_endpoint_carried{carrier=\"haproxy\"} 0",
            "cpha_apply_duration_seconds_count 0",
            "cpha_state{state=\"balanced\"} 0",
            "cpha_transitions_total{from=\"forwarding\",to=\"handing-over\"} 0",
            "cpha_repairs_total{object=\"forward\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        }
        m.servers(&[("a".into(), true), ("b".into(), false)]);
        m.member_update("configmap", true);
        m.apply(ApplyMethod::Runtime, Outcome::Ok, Duration::from_millis(12));
        m.carried(Some("forward"));
        let out = text(&m);
        for line in [
            "cpha_backend_server_up{server=\"a\"} 1",
            "cpha_backend_server_up{server=\"b\"} 0",
            "cpha_backend_servers_up 1",
            "cpha_member_updates_total{source=\"configmap\",result=\"accepted\"} 1",
            "cpha_member_updates_accepted_total{source=\"configmap\"} 1",
            "cpha_apply_duration_seconds_count 1",
            "cpha_endpoint_carried{carrier=\"forward\"} 1",
            "cpha_endpoint_carried{carrier=\"haproxy\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
        }
        assert!(!out.contains("cpha_last_apply_success_timestamp_seconds 0.0"), "{out}");
        m.servers(&[("a".into(), true)]);
        assert!(!text(&m).contains("server=\"b\""), "a removed server's series goes away");
    }

    #[test]
    fn renders_in_text_format() {
        let m = Metrics::default();
        m.members.set(3);
        m.member_updates_rejected.get_or_create(&SourceLabel { source: "configmap".into() }).inc();
        m.applies.get_or_create(&ApplyLabels { method: ApplyMethod::Runtime, result: Outcome::Ok }).inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.register()).unwrap();
        assert!(out.contains("cpha_members 3"), "{out}");
        assert!(out.contains("cpha_member_updates_rejected_total{source=\"configmap\"} 1"), "{out}");
        assert!(out.contains("cpha_applies_total{method=\"runtime\",result=\"ok\"} 1"), "{out}");
    }

    #[test]
    fn build_info_names_version_and_commit() {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &Metrics::default().register()).unwrap();
        let line = format!(
            "cpha_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION"),
            crate::build_info::COMMIT
        );
        assert!(out.contains(&line), "{line} not in {out}");
        assert!(out.contains("# TYPE cpha_build_info gauge"), "{out}");
    }
}
