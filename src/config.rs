//! The agent's configuration: one YAML file (`/etc/cpha/config.yaml`), camelCase keys, unknown
//! keys refused, defaults for everything but the endpoint. Each domain owns its section type
//! (`members`, `kubernetes`, `haproxy`); this module composes them, parses (`parse`, pure),
//! loads (`load`), applies command-line/environment overrides, and validates once.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::exit::Coded;
use crate::forward::{Endpoint, Mode};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub endpoint: EndpointSection,
    #[serde(default)]
    pub forward: ForwardSection,
    #[serde(default)]
    pub handover: HandoverSection,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub members: crate::members::source::MembersSettings,
    #[serde(default)]
    pub kubernetes: crate::kube::KubeSettings,
    #[serde(default)]
    pub haproxy: crate::haproxy::HaproxySettings,
    /// The virtual IP keepalived holds for the endpoint; absent: no VIP.
    #[serde(default)]
    pub vip: Option<crate::vip::VipSettings>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSection {
    /// The control-plane endpoint, `LB_ADDRESS:PORT` as given to `kubeadm --control-plane-endpoint`.
    pub listen: Endpoint,
    #[serde(default)]
    pub topology: Topology,
    /// Retarget topology: HAProxy's private frontend address (a local, non-loopback address for
    /// kernel forwards). Default: the listen address with port 9445.
    #[serde(default)]
    pub haproxy_bind: Option<Endpoint>,
}

/// The top-level sections of the configuration file, as [`Config`] names them (a test keeps
/// the two in step), for commands that read only some of them.
pub const SECTIONS: [&str; 8] = ["endpoint", "forward", "handover", "agent", "members", "kubernetes", "haproxy", "vip"];

/// How HAProxy and the forward share the endpoint (see `agent::endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// HAProxy listens on a private address; the forward is retargeted to it.
    #[default]
    Retarget,
    /// HAProxy binds the endpoint itself; the forward steps aside.
    Release,
}

impl Topology {
    pub fn as_str(self) -> &'static str {
        match self {
            Topology::Retarget => "retarget",
            Topology::Release => "release",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnShutdown {
    /// Leave a kernel forward in place: the endpoint keeps answering while cpha restarts.
    #[default]
    Keep,
    /// Withdraw the forward, drain within `forward.drainTimeout`, remove it.
    Remove,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ForwardSection {
    pub mode: Mode,
    /// Bootstrap targets used until a member answers /readyz. Default: the members' addresses.
    pub targets: Vec<Endpoint>,
    /// Longest time connections on the old path (long watches) get after a move.
    #[serde(deserialize_with = "crate::units::duration")]
    pub drain_timeout: Duration,
    #[serde(deserialize_with = "crate::units::duration")]
    pub connect_timeout: Duration,
    pub on_shutdown: OnShutdown,
}

impl Default for ForwardSection {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            targets: Vec::new(),
            drain_timeout: Duration::from_secs(900),
            connect_timeout: Duration::from_secs(3),
            on_shutdown: OnShutdown::Keep,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HandoverSection {
    /// Consecutive healthy checks of HAProxy before handing over.
    pub rise: u32,
    /// Consecutive unhealthy checks before falling back.
    pub fall: u32,
    #[serde(deserialize_with = "crate::units::duration")]
    pub interval: Duration,
    pub fallback: bool,
    /// Timeout of one /readyz probe of a member.
    #[serde(deserialize_with = "crate::units::duration")]
    pub probe_timeout: Duration,
    /// How often HAProxy's master and admin sockets are checked: when neither accepts a
    /// connection (twice in a row) HAProxy is gone and the endpoint falls back at once,
    /// without waiting for `fall` unhealthy checks.
    #[serde(deserialize_with = "crate::units::duration")]
    pub liveness_interval: Duration,
}

impl Default for HandoverSection {
    fn default() -> Self {
        Self {
            rise: 2,
            fall: 10,
            interval: Duration::from_secs(1),
            fallback: true,
            probe_timeout: Duration::from_secs(1),
            liveness_interval: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AgentSection {
    /// Local HTTP port for /metrics, /healthz, /readyz and /status.
    pub status_listen: SocketAddr,
    /// Post Kubernetes Events (events.k8s.io/v1) on handover, fallback and rejected member
    /// lists, attached to the ConfigMap or EndpointSlice the members come from, when the
    /// credentials allow it.
    pub events: bool,
    /// Directories cpha writes in although others may write there too, declared on purpose:
    /// the DaemonSet's emptyDir volumes (mode 0777, shared only by the pod's own containers).
    /// Every other directory cpha writes in must be root-owned and writable by no one else.
    pub trust_shared_directories: Vec<std::path::PathBuf>,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            status_listen: SocketAddr::from(([127, 0, 0, 1], 9966)),
            events: true,
            trust_shared_directories: Vec::new(),
        }
    }
}

/// What flags and environment variables may change over the file. Every subcommand that reads
/// the configuration takes the same overrides, so `check-config` and `render` see exactly the
/// settings `run` uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub listen: Option<Endpoint>,
    pub topology: Option<Topology>,
    pub haproxy_bind: Option<Endpoint>,
    pub forward_mode: Option<Mode>,
    pub status_listen: Option<SocketAddr>,
    /// `--lock-programs`: the file may not name a program, template or kubeconfig that cpha
    /// would run or load as root ([`Config::check_locked`]).
    pub lock_programs: bool,
}

impl Overrides {
    pub fn apply(&self, c: &mut Config) {
        if let Some(l) = self.listen {
            c.endpoint.listen = l;
        }
        if let Some(t) = self.topology {
            c.endpoint.topology = t;
        }
        if let Some(h) = self.haproxy_bind {
            c.endpoint.haproxy_bind = Some(h);
        }
        if let Some(m) = self.forward_mode {
            c.forward.mode = m;
        }
        if let Some(s) = self.status_listen {
            c.agent.status_listen = s;
        }
    }
}

/// The one configuration loader: the file, then the overrides, then validation.
pub fn load(path: &Path, overrides: &Overrides) -> anyhow::Result<Config> {
    let mut config = Config::load(path)?;
    overrides.apply(&mut config);
    config.validate()?;
    if overrides.lock_programs {
        config.check_locked().with_context(|| format!("in {}", path.display()))?;
    }
    Ok(config)
}

impl Config {
    /// Parses YAML text, with no I/O.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        crate::yaml::from_str(text).map_err(|e| Coded::config(format!("invalid configuration: {e}")).into())
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| Coded::config(format!("cannot read the configuration {}", path.display())))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// HAProxy's frontend address: the endpoint itself (release) or a private one (retarget).
    pub fn haproxy_bind(&self) -> SocketAddr {
        match self.endpoint.topology {
            Topology::Release => self.endpoint.listen.0,
            Topology::Retarget => self
                .endpoint
                .haproxy_bind
                .map(|e| e.0)
                .unwrap_or_else(|| SocketAddr::new(self.endpoint.listen.0.ip(), 9445)),
        }
    }

    /// The settings that make cpha run a program or load code as root, each with whether this
    /// configuration changes it from the built-in value. A template can `lua-load` (HAProxy runs
    /// Lua during `haproxy -c`) or add a `program` section; a kubeconfig can name an `exec`
    /// credential plugin.
    pub fn program_settings(&self) -> Vec<(&'static str, bool)> {
        let h = &self.haproxy;
        let hd = crate::haproxy::HaproxySettings::default();
        let mut out = vec![
            ("haproxy.binary", h.binary != hd.binary),
            ("haproxy.template", h.template.is_some()),
            ("haproxy.reload", h.reload != hd.reload),
            ("kubernetes.kubeconfig", matches!(self.kubernetes.credentials, crate::kube::Credentials::Kubeconfig(_))),
        ];
        if let Some(vip) = &self.vip {
            let k = &vip.keepalived;
            let kd = crate::vip::KeepalivedSettings::default();
            out.extend([
                ("vip.keepalived.binary", k.binary != kd.binary),
                ("vip.keepalived.template", k.template.is_some()),
                ("vip.keepalived.reloadCommand", !k.reload_command.is_empty()),
            ]);
        }
        out
    }

    /// `--lock-programs`: refuses a file that changes any of [`Config::program_settings`], for
    /// a configuration that more people may edit than may run code as root on the host (the
    /// DaemonSet's ConfigMap).
    pub fn check_locked(&self) -> anyhow::Result<()> {
        let changed: Vec<&str> = self.program_settings().into_iter().filter(|(_, c)| *c).map(|(n, _)| n).collect();
        if changed.is_empty() {
            return Ok(());
        }
        Err(Coded::config(format!(
            "--lock-programs: this configuration sets {}, which cpha would run or load as root; with --lock-programs \
             (CPHA_LOCK_PROGRAMS) they keep their built-in values (docs/security.md)",
            changed.join(", ")
        ))
        .into())
    }

    /// Checks what no single section can check alone.
    pub fn validate(&self) -> anyhow::Result<()> {
        let bad = |m: String| -> anyhow::Result<()> { Err(Coded::config(m).into()) };
        let listen = self.endpoint.listen.0;
        if self.handover.rise == 0 || self.handover.fall == 0 {
            return bad("handover.rise and handover.fall must be at least 1".into());
        }
        if self.handover.interval < Duration::from_millis(100) {
            return bad("handover.interval must be at least 100ms".into());
        }
        if self.handover.liveness_interval < Duration::from_millis(50) {
            return bad("handover.livenessInterval must be at least 50ms".into());
        }
        if let Some(vip) = &self.vip {
            vip.check(listen.ip()).map_err(|e| Coded::config(e.to_string()))?;
        }
        if self.endpoint.topology == Topology::Retarget {
            if listen.ip().is_unspecified() && self.endpoint.haproxy_bind.is_none() {
                return bad(format!(
                    "endpoint.listen {listen} is a wildcard: set endpoint.haproxyBind to the local address:port HAProxy listens on (retarget topology)"
                ));
            }
            let hb = self.haproxy_bind();
            if hb == listen {
                return bad(format!("endpoint.haproxyBind {hb} equals endpoint.listen: in the retarget topology HAProxy needs its own port (or use topology: release)"));
            }
            if hb.ip().is_unspecified() {
                return bad(format!(
                    "endpoint.haproxyBind {hb} must be a concrete address the forward can send connections to"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "endpoint:\n  listen: 192.0.2.10:6443\n";

    #[test]
    fn sections_name_every_field_of_the_file() {
        for section in SECTIONS {
            let text = format!("{MINIMAL}{section}: {{}}\n");
            let text = if section == "endpoint" { MINIMAL.to_string() } else { text };
            Config::parse(&text).unwrap_or_else(|e| panic!("{section}: {e:#}"));
        }
        let err = Config::parse(&format!("{MINIMAL}metrics: {{}}\n")).unwrap_err().to_string();
        assert!(err.contains("unknown field `metrics`"), "{err}");
        for section in SECTIONS {
            assert!(err.contains(&format!("`{section}`")), "{section} missing from {err}");
        }
    }

    #[test]
    fn locked_programs_refuse_every_setting_that_runs_code() {
        let config = Config::parse(&format!("{MINIMAL}kubernetes:\n  inCluster: true\n")).unwrap();
        config.check_locked().unwrap();
        let vip = "vip:\n  address: 192.0.2.10\n";
        for (line, name) in [
            ("haproxy:\n  binary: /tmp/haproxy\n", "haproxy.binary"),
            ("haproxy:\n  template: /etc/cpha/evil.tera\n", "haproxy.template"),
            ("haproxy:\n  reload:\n    method: command\n    argv: [/bin/sh, -c, id]\n", "haproxy.reload"),
            (&format!("{vip}  keepalived:\n    binary: /tmp/keepalived\n"), "vip.keepalived.binary"),
            (&format!("{vip}  keepalived:\n    template: /tmp/k.tera\n"), "vip.keepalived.template"),
            (&format!("{vip}  keepalived:\n    reloadCommand: [/bin/sh, -c, id]\n"), "vip.keepalived.reloadCommand"),
        ] {
            let text = format!("{MINIMAL}kubernetes:\n  inCluster: true\n{line}");
            let config = Config::parse(&text).unwrap_or_else(|e| panic!("{line}: {e:#}"));
            let err = config.check_locked().unwrap_err();
            assert_eq!(crate::exit::code_for(&err), crate::exit::CONFIG);
            let text = format!("{err:#}");
            assert!(text.contains(&format!("sets {name}, ")), "{line}: {text}");
        }
        // A kubeconfig may name an exec plugin: only the pod's service account is allowed.
        let config = Config::parse(&format!("{MINIMAL}kubernetes:\n  kubeconfig: [/etc/cpha/x.conf]\n")).unwrap();
        assert!(format!("{:#}", config.check_locked().unwrap_err()).contains("kubernetes.kubeconfig"));
    }

    #[test]
    fn overrides_apply_before_validation() {
        let mut config = Config::parse(MINIMAL).unwrap();
        assert_eq!(config.haproxy_bind(), "192.0.2.10:9445".parse().unwrap());
        let o = Overrides { haproxy_bind: Some("192.0.2.11:9445".parse().unwrap()), ..Overrides::default() };
        o.apply(&mut config);
        assert_eq!(config.haproxy_bind(), "192.0.2.11:9445".parse().unwrap());
        let o = Overrides { haproxy_bind: Some("192.0.2.10:6443".parse().unwrap()), ..Overrides::default() };
        o.apply(&mut config);
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("equals endpoint.listen"), "{err}");
    }
}
