//! The agent's Prometheus metrics, all in one registry. Modules receive `&Metrics` and update
//! the families they own; `server` (in the agent) renders the registry in the text format.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
        let labels = BuildLabels { version: env!("CARGO_PKG_VERSION").into(), commit: crate::cli::COMMIT.into() };
        family.get_or_create(&labels).set(1);
        BuildInfo(family)
    }
}

/// Every metric the agent exports.
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
    /// 1 while a bootstrap forward carries new connections.
    pub forward_installed: Gauge,
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
        r.register("backend_servers_up", "Servers UP in HAProxy's apiserver backend", self.backend_servers_up.clone());
        r.register(
            "forward_installed",
            "Whether the bootstrap forward carries new connections",
            self.forward_installed.clone(),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            crate::cli::COMMIT
        );
        assert!(out.contains(&line), "{line} not in {out}");
        assert!(out.contains("# TYPE cpha_build_info gauge"), "{out}");
    }
}
