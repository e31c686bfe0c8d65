//! The `haproxy:` section of the agent's configuration, and its validation into values that are
//! safe to write into haproxy.cfg and Runtime API commands.
//!
//! NOTE: settings come from the operator's file, but they still reach a file the HAProxy master
//! parses as root. Every string that is rendered (names, paths, user and group) is checked against
//! a small character set here, so a newline or a `#` in a setting cannot add a section either
//! (docs/design-notes.md#config-injection, design note 16).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The `haproxy:` section. Every field has a default; see `docs/configuration.md`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HaproxySettings {
    /// The haproxy program, for `haproxy -c`.
    pub binary: PathBuf,
    /// The live configuration file HAProxy loads.
    pub config_path: PathBuf,
    /// A tera template replacing the built-in one.
    pub template: Option<PathBuf>,
    /// The worker's admin stats socket (Runtime API).
    pub admin_socket: PathBuf,
    /// The master CLI socket (`haproxy -W -S <path>,level,admin`).
    pub master_socket: PathBuf,
    pub frontend_name: String,
    pub backend_name: String,
    /// Bind the frontend with `transparent`, so it can listen on an address not (yet) on this
    /// host, such as a virtual IP held by another node.
    pub transparent: bool,
    pub balance: Balance,
    pub reload: ReloadMethod,
    /// Shortest time between two reloads.
    #[serde(deserialize_with = "crate::units::duration")]
    pub min_reload_interval: Duration,
    /// Shortest time between two applies; the agent coalesces updates that arrive meanwhile.
    #[serde(deserialize_with = "crate::units::duration")]
    pub min_apply_interval: Duration,
    /// Longest time a removed server keeps its open connections before they are shut down.
    #[serde(deserialize_with = "crate::units::duration")]
    pub drain_timeout: Duration,
    /// Longest wait for a reload to be confirmed by the master CLI.
    #[serde(deserialize_with = "crate::units::duration")]
    pub reload_timeout: Duration,
    /// Longest wait for one Runtime API or master CLI command.
    #[serde(deserialize_with = "crate::units::duration")]
    pub runtime_timeout: Duration,
    pub health_check: HealthCheckSettings,
    pub timeouts: TimeoutSettings,
    /// Bound on how long old workers may keep connections after a reload.
    #[serde(deserialize_with = "crate::units::duration")]
    pub hard_stop_after: Duration,
    /// Connections HAProxy accepts at once; `null` (the default) lets HAProxy derive it from
    /// its file-descriptor limit, so it starts whatever `LimitNOFILE` the host gives it.
    pub maxconn: Option<u32>,
    /// The user HAProxy's workers run as; `null` keeps the user that started HAProxy.
    pub user: Option<String>,
    pub group: Option<String>,
    /// HAProxy's own metrics and stats page.
    pub stats: StatsSettings,
}

/// `haproxy.stats`: HAProxy's Prometheus exporter (`/metrics`) and stats page (`/stats`) on
/// one HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StatsSettings {
    /// Where it listens; `null` turns it off. Loopback by default: what it shows (backend
    /// addresses, traffic) is for the host's scraper, not the network.
    pub listen: Option<SocketAddr>,
    /// A file holding one line `USER:PASSWORD`: both pages then ask for basic auth. Read when
    /// the configuration is rendered; cpha refuses a file it cannot read or parse.
    pub credentials_file: Option<PathBuf>,
}

impl Default for StatsSettings {
    fn default() -> Self {
        StatsSettings { listen: Some(SocketAddr::from(([127, 0, 0, 1], 8404))), credentials_file: None }
    }
}

/// Basic-auth credentials for the stats listener, checked so they render as one token each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsAuth {
    pub user: String,
    pub password: crate::secret::Secret,
}

impl StatsAuth {
    /// `USER:PASSWORD` (a trailing newline allowed): user `[A-Za-z0-9._-]{1,64}`, password 8 to
    /// 128 printable ASCII characters, none of them a space, `#`, a quote or a backslash.
    pub fn parse(text: &str) -> Result<StatsAuth, String> {
        let line = text.strip_suffix('\n').unwrap_or(text);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let (user, password) = line.split_once(':').ok_or("not of the form USER:PASSWORD")?;
        if user.is_empty()
            || user.len() > 64
            || !user.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err("the user must be 1 to 64 letters, digits, '.', '_' or '-'".into());
        }
        if !(8..=128).contains(&password.len()) {
            return Err("the password must be 8 to 128 characters long".into());
        }
        if let Some(c) = password.chars().find(|c| !c.is_ascii_graphic() || matches!(c, '#' | '"' | '\'' | '\\')) {
            return Err(format!(
                "the password contains {}: use printable ASCII without spaces, '#', quotes or backslashes",
                if c.is_ascii_graphic() { format!("'{c}'") } else { "a character outside printable ASCII".into() }
            ));
        }
        Ok(StatsAuth { user: user.into(), password: crate::secret::Secret::new(password) })
    }
}

impl Default for HaproxySettings {
    fn default() -> Self {
        HaproxySettings {
            binary: PathBuf::from("haproxy"),
            config_path: PathBuf::from("/etc/haproxy/haproxy.cfg"),
            template: None,
            admin_socket: PathBuf::from("/run/haproxy/admin.sock"),
            // NOTE: where systemd/haproxy.service.d/cpha.conf and deploy/daemonset.yaml put it
            // (Debian's own unit uses /run/haproxy-master.sock).
            master_socket: PathBuf::from("/run/haproxy/master.sock"),
            frontend_name: "kube-apiserver".into(),
            backend_name: "kube-apiservers".into(),
            transparent: false,
            balance: Balance::Leastconn,
            reload: ReloadMethod::MasterSocket,
            min_reload_interval: Duration::from_secs(10),
            min_apply_interval: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(30),
            reload_timeout: Duration::from_secs(15),
            runtime_timeout: Duration::from_secs(3),
            health_check: HealthCheckSettings::default(),
            timeouts: TimeoutSettings::default(),
            hard_stop_after: Duration::from_secs(300),
            maxconn: None,
            user: Some("haproxy".into()),
            group: Some("haproxy".into()),
            stats: StatsSettings::default(),
        }
    }
}

/// The load-balancing algorithm. Both are dynamic, which `add server` requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// The server with the fewest connections: apiserver connections are long-lived watches and
    /// HTTP/2 sessions, so counting them spreads load better than taking turns.
    Leastconn,
    Roundrobin,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Leastconn => "leastconn",
            Balance::Roundrobin => "roundrobin",
        }
    }
}

/// How a reload is triggered. Its success is always read back from the master CLI's `show proc`.
///
/// In YAML: `reload: masterSocket`, `reload: systemd` (unit `haproxy.service`), or a map:
/// `{method: masterSocket}`, `{method: systemd, unit: haproxy.service}`,
/// `{method: command, argv: [/usr/local/bin/reload-haproxy]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadMethod {
    /// `reload` on the master socket.
    MasterSocket,
    /// `systemctl reload <unit>`.
    Systemd { unit: String },
    /// A program and its arguments, run without a shell.
    Command { argv: Vec<String> },
}

/// The map form of [`ReloadMethod`].
#[derive(Deserialize)]
#[serde(tag = "method", rename_all = "camelCase", deny_unknown_fields)]
enum TaggedReload {
    MasterSocket,
    Systemd {
        #[serde(default = "default_unit")]
        unit: String,
    },
    Command {
        argv: Vec<String>,
    },
}

fn default_unit() -> String {
    "haproxy.service".into()
}

impl<'de> Deserialize<'de> for ReloadMethod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ReloadMethod;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("masterSocket, systemd, or a map with `method: masterSocket | systemd | command`")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ReloadMethod, E> {
                match v {
                    "masterSocket" => Ok(ReloadMethod::MasterSocket),
                    "systemd" => Ok(ReloadMethod::Systemd { unit: default_unit() }),
                    other => Err(E::unknown_variant(other, &["masterSocket", "systemd"])),
                }
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<ReloadMethod, A::Error> {
                Ok(match TaggedReload::deserialize(serde::de::value::MapAccessDeserializer::new(map))? {
                    TaggedReload::MasterSocket => ReloadMethod::MasterSocket,
                    TaggedReload::Systemd { unit } => ReloadMethod::Systemd { unit },
                    TaggedReload::Command { argv } => ReloadMethod::Command { argv },
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Where kubeadm writes the cluster CA (`healthCheck.clusterCaFile`'s default).
pub const DEFAULT_CLUSTER_CA: &str = "/etc/kubernetes/pki/ca.crt";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HealthCheckSettings {
    #[serde(deserialize_with = "crate::units::duration")]
    pub inter: Duration,
    #[serde(deserialize_with = "crate::units::duration")]
    pub fast_inter: Duration,
    #[serde(deserialize_with = "crate::units::duration")]
    pub down_inter: Duration,
    pub fall: u32,
    pub rise: u32,
    /// Read timeout of one check (`timeout check`).
    #[serde(deserialize_with = "crate::units::duration")]
    pub timeout: Duration,
    /// Always verify the apiservers' certificates against this CA: `haproxy -c` refuses the
    /// file while it is missing. Set, it replaces `cluster_ca_file`.
    pub ca_file: Option<PathBuf>,
    /// The cluster CA kubeadm writes at init and join: the checks verify the apiservers'
    /// certificates against it once it exists and holds valid certificates, and do not verify
    /// before (`verify none`). `null` never verifies (unless `ca_file` is set).
    pub cluster_ca_file: Option<PathBuf>,
    /// How long a server that still answers (`/livez` passes) but fails `/readyz` keeps the
    /// sessions it has: it is DOWN for new connections at once, and its open connections
    /// (watches among them) are shut down when this has passed and another server is UP to
    /// take them. A server that is gone
    /// (connection refused or timed out, TLS failing, `/livez` failing) has its sessions shut
    /// down at once. `0s` cuts them as soon as the server is DOWN, whatever the reason.
    #[serde(deserialize_with = "crate::units::duration")]
    pub unready_grace: Duration,
    /// Let HAProxy itself shut every session down the moment a server is marked DOWN
    /// (`on-marked-down shutdown-sessions`), even one that is only not ready and still
    /// serving. Off by default: it fails the requests in flight on an apiserver that is
    /// shutting down gracefully.
    pub shutdown_sessions_on_down: bool,
    /// `slowstart`: a server coming UP gets its share of new connections ramped up over this
    /// time instead of all at once. `0s` turns it off.
    #[serde(deserialize_with = "crate::units::duration")]
    pub slow_start: Duration,
    /// Consecutive failed connections on live traffic that count as one failed check
    /// (`observe layer4 error-limit N on-error fail-check`), so a dead server is found between
    /// two checks; `0` turns the observation off.
    pub error_limit: u32,
}

impl Default for HealthCheckSettings {
    fn default() -> Self {
        HealthCheckSettings {
            inter: Duration::from_secs(1),
            fast_inter: Duration::from_millis(250),
            down_inter: Duration::from_secs(1),
            fall: 2,
            rise: 2,
            timeout: Duration::from_secs(2),
            ca_file: None,
            cluster_ca_file: Some(PathBuf::from(DEFAULT_CLUSTER_CA)),
            unready_grace: Duration::from_secs(30),
            shutdown_sessions_on_down: false,
            slow_start: Duration::ZERO,
            error_limit: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TimeoutSettings {
    #[serde(deserialize_with = "crate::units::duration")]
    pub connect: Duration,
    #[serde(deserialize_with = "crate::units::duration")]
    pub client: Duration,
    #[serde(deserialize_with = "crate::units::duration")]
    pub server: Duration,
    /// Inactivity timeout once a connection is established; watches stay open 30 minutes or more.
    #[serde(deserialize_with = "crate::units::duration")]
    pub tunnel: Duration,
    #[serde(deserialize_with = "crate::units::duration")]
    pub client_fin: Duration,
    #[serde(deserialize_with = "crate::units::duration")]
    pub server_fin: Duration,
}

impl Default for TimeoutSettings {
    fn default() -> Self {
        TimeoutSettings {
            connect: Duration::from_secs(5),
            client: Duration::from_secs(3600),
            server: Duration::from_secs(3600),
            tunnel: Duration::from_secs(3600),
            client_fin: Duration::from_secs(30),
            server_fin: Duration::from_secs(30),
        }
    }
}

/// A setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("haproxy.{field}: {reason}")]
pub struct SettingsError {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError { field, reason: reason.into() }
}

/// An HAProxy proxy name (frontend or backend): `[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyName(String);

impl ProxyName {
    pub fn parse(field: &'static str, s: &str) -> Result<Self, SettingsError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
        if ok {
            Ok(ProxyName(s.to_owned()))
        } else {
            Err(invalid(field, format!("{} is not a proxy name: use 1 to 64 letters, digits, '_', '.', ':' or '-', starting with a letter or digit", quoted(s))))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProxyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An absolute path made of `[A-Za-z0-9/._+@-]` only: nothing HAProxy's parser would split on
/// or treat as a comment, and no `..` component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafePath(String);

impl SafePath {
    pub fn parse(field: &'static str, path: &Path) -> Result<Self, SettingsError> {
        let Some(s) = path.to_str() else {
            return Err(invalid(field, "the path is not valid UTF-8"));
        };
        if !s.starts_with('/') {
            return Err(invalid(field, format!("{} must be an absolute path", quoted(s))));
        }
        if s.len() > 200 {
            return Err(invalid(field, "the path is longer than 200 bytes"));
        }
        if let Some(c) =
            s.chars().find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '+' | '@' | '-')))
        {
            return Err(invalid(
                field,
                format!(
                    "{} contains '{}': only letters, digits and / . _ + @ - are allowed",
                    quoted(s),
                    c.escape_default()
                ),
            ));
        }
        if s.split('/').any(|part| part == "..") {
            return Err(invalid(field, format!("{} must not contain '..'", quoted(s))));
        }
        Ok(SafePath(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SafePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user or group name as useradd accepts it: `[a-z_][a-z0-9_-]{0,31}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemName(String);

impl SystemName {
    pub fn parse(field: &'static str, s: &str) -> Result<Self, SettingsError> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
        if ok {
            Ok(SystemName(s.to_owned()))
        } else {
            Err(invalid(field, format!("{} is not a user or group name", quoted(s))))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A systemd unit name: `[A-Za-z0-9:_.@-]+` with a unit suffix.
fn check_unit(s: &str) -> Result<(), SettingsError> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '@' | '-'))
        && !s.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid("reload.systemd.unit", format!("{} is not a systemd unit name", quoted(s))))
    }
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.escape_default())
}

/// Settings checked once; what the renderer, the Runtime API commands and the actuator use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub frontend: ProxyName,
    pub backend: ProxyName,
    pub admin_socket: SafePath,
    pub master_socket: SafePath,
    pub ca_file: Option<SafePath>,
    /// The cluster CA used once it exists; `None` when `healthCheck.caFile` is set or this is
    /// off.
    pub cluster_ca_file: Option<SafePath>,
    pub user: Option<SystemName>,
    pub group: Option<SystemName>,
    /// The keywords every server line carries, in the file and in `add server` alike: the
    /// ones in use. [`Checked::with_cluster_ca`] makes the variant for a cluster CA's state.
    pub server_params: String,
    /// The cluster CA's content in use, when `server_params` names it: part of the digest, so
    /// a CA whose content changes (a rotation) reloads HAProxy, which reads it only then.
    pub ca_fingerprint: Option<String>,
    /// `server_params` without the cluster CA (`verify none`, or `caFile`'s).
    params_without_ca: String,
    /// `server_params` with the cluster CA (`verify required ca-file ...`).
    params_with_ca: Option<String>,
    pub stats_listen: Option<SocketAddr>,
    pub stats_auth: Option<StatsAuth>,
}

impl Checked {
    /// These settings with the server keywords for the cluster CA's state: `verify required
    /// ca-file <clusterCaFile>` when it is usable, what `caFile` (or `verify none`) says
    /// otherwise. `haproxy -c` refuses a `ca-file` it cannot load, and kubeadm writes the CA
    /// only at init or join (with a plain write, so it can be seen half written): a CA that
    /// is missing or not valid is not named, and the checks work as on the first boot.
    pub fn with_cluster_ca(&self, ca: &CaState) -> Checked {
        let (params, fingerprint) = match (ca, &self.params_with_ca) {
            (CaState::Usable { fingerprint }, Some(with)) => (with, Some(fingerprint.clone())),
            _ => (&self.params_without_ca, None),
        };
        Checked { server_params: params.clone(), ca_fingerprint: fingerprint, ..self.clone() }
    }

    /// Whether the cluster CA's state decides anything.
    pub fn uses_cluster_ca(&self) -> bool {
        self.params_with_ca.is_some()
    }
}

/// The cluster CA file as read (`haproxy::cluster_ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaState {
    /// No such file (the first boot before kubeadm, a DaemonSet pod, an external LB host).
    Absent,
    /// Readable, and every certificate in it parses as a trust anchor; `fingerprint` tells
    /// two contents apart.
    Usable { fingerprint: String },
    /// There but not usable (unreadable, empty, half written, not a certificate): why.
    Invalid(String),
}

/// The longest duration rendered; HAProxy's timers hold about 24 days.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

impl HaproxySettings {
    /// Checks every setting; the returned values are safe to render.
    pub fn check(&self) -> Result<Checked, SettingsError> {
        let frontend = ProxyName::parse("frontendName", &self.frontend_name)?;
        let backend = ProxyName::parse("backendName", &self.backend_name)?;
        if frontend == backend {
            return Err(invalid("backendName", "the frontend and the backend need different names"));
        }
        let admin_socket = SafePath::parse("adminSocket", &self.admin_socket)?;
        let master_socket = SafePath::parse("masterSocket", &self.master_socket)?;
        SafePath::parse("configPath", &self.config_path)?;
        if let Some(t) = &self.template {
            if t.as_os_str().is_empty() {
                return Err(invalid("template", "empty path"));
            }
        }
        let ca_file =
            self.health_check.ca_file.as_deref().map(|p| SafePath::parse("healthCheck.caFile", p)).transpose()?;
        let cluster_ca_file = self
            .health_check
            .cluster_ca_file
            .as_deref()
            .map(|p| SafePath::parse("healthCheck.clusterCaFile", p))
            .transpose()?
            .filter(|_| ca_file.is_none());
        let user = self.user.as_deref().map(|u| SystemName::parse("user", u)).transpose()?;
        let group = self.group.as_deref().map(|g| SystemName::parse("group", g)).transpose()?;
        if self.binary.as_os_str().is_empty() {
            return Err(invalid("binary", "empty path"));
        }
        match &self.reload {
            ReloadMethod::MasterSocket => {}
            ReloadMethod::Systemd { unit } => check_unit(unit)?,
            ReloadMethod::Command { argv } => {
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(invalid("reload.command.argv", "needs at least the program to run"));
                }
            }
        }
        let hc = &self.health_check;
        let positive = [
            ("healthCheck.inter", hc.inter),
            ("healthCheck.fastInter", hc.fast_inter),
            ("healthCheck.downInter", hc.down_inter),
            ("healthCheck.timeout", hc.timeout),
            ("timeouts.connect", self.timeouts.connect),
            ("timeouts.client", self.timeouts.client),
            ("timeouts.server", self.timeouts.server),
            ("timeouts.tunnel", self.timeouts.tunnel),
            ("timeouts.clientFin", self.timeouts.client_fin),
            ("timeouts.serverFin", self.timeouts.server_fin),
            ("hardStopAfter", self.hard_stop_after),
            ("runtimeTimeout", self.runtime_timeout),
            ("reloadTimeout", self.reload_timeout),
        ];
        for (field, d) in positive {
            if d < Duration::from_millis(1) {
                return Err(invalid(field, "must be at least 1ms"));
            }
            if d > MAX_DURATION {
                return Err(invalid(field, "must be at most 7 days"));
            }
            if !d.subsec_nanos().is_multiple_of(1_000_000) {
                return Err(invalid(field, "must be a whole number of milliseconds"));
            }
        }
        for (field, d) in [
            ("minReloadInterval", self.min_reload_interval),
            ("minApplyInterval", self.min_apply_interval),
            ("drainTimeout", self.drain_timeout),
            ("healthCheck.unreadyGrace", hc.unready_grace),
            ("healthCheck.slowStart", hc.slow_start),
        ] {
            if d > MAX_DURATION {
                return Err(invalid(field, "must be at most 7 days"));
            }
        }
        for (field, n) in [("healthCheck.fall", hc.fall), ("healthCheck.rise", hc.rise)] {
            if !(1..=100).contains(&n) {
                return Err(invalid(field, "must be between 1 and 100"));
            }
        }
        if hc.error_limit > 100 {
            return Err(invalid("healthCheck.errorLimit", "must be between 0 (off) and 100"));
        }
        if !hc.slow_start.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(invalid("healthCheck.slowStart", "must be a whole number of milliseconds"));
        }
        if self.maxconn.is_some_and(|m| !(1..=1_000_000).contains(&m)) {
            return Err(invalid("maxconn", "must be between 1 and 1000000"));
        }
        let verify = |ca: Option<&SafePath>| match ca {
            Some(ca) => format!("verify required ca-file {ca}"),
            None => "verify none".to_string(),
        };
        let mut tuning = format!(
            "inter {} fastinter {} downinter {} fall {} rise {}",
            time(hc.inter),
            time(hc.fast_inter),
            time(hc.down_inter),
            hc.fall,
            hc.rise
        );
        if hc.error_limit > 0 {
            tuning.push_str(&format!(" observe layer4 error-limit {} on-error fail-check", hc.error_limit));
        }
        if !hc.slow_start.is_zero() {
            tuning.push_str(&format!(" slowstart {}", time(hc.slow_start)));
        }
        if hc.shutdown_sessions_on_down {
            tuning.push_str(" on-marked-down shutdown-sessions");
        }
        let params = |ca: Option<&SafePath>| format!("check check-ssl {} {tuning}", verify(ca));
        let params_without_ca = params(ca_file.as_ref());
        let params_with_ca = cluster_ca_file.as_ref().map(|ca| params(Some(ca)));
        let stats_auth = match &self.stats.credentials_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| invalid("stats.credentialsFile", format!("cannot read {}: {e}", path.display())))?;
                Some(
                    StatsAuth::parse(&text)
                        .map_err(|e| invalid("stats.credentialsFile", format!("{}: {e}", path.display())))?,
                )
            }
        };
        if stats_auth.is_some() && self.stats.listen.is_none() {
            return Err(invalid("stats.credentialsFile", "set, but stats.listen is null (the listener is off)"));
        }
        if self.stats.listen.is_some_and(|a| a.port() == 0) {
            return Err(invalid("stats.listen", "needs a port"));
        }
        Ok(Checked {
            frontend,
            backend,
            admin_socket,
            master_socket,
            ca_file,
            cluster_ca_file,
            user,
            group,
            server_params: params_without_ca.clone(),
            ca_fingerprint: None,
            params_without_ca,
            params_with_ca,
            stats_listen: self.stats.listen,
            stats_auth,
        })
    }
}

/// A duration in HAProxy's time format, in the largest unit that keeps it exact.
pub fn time(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0ms".into();
    }
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    #[test]
    fn stats_credentials_are_one_token_each() {
        let a = StatsAuth::parse("scraper:s3cret-pass\n").unwrap();
        assert_eq!((a.user.as_str(), a.password.expose()), ("scraper", "s3cret-pass"));
        for (text, why) in [
            ("scraper", "USER:PASSWORD"),
            (":s3cret-pass", "the user"),
            ("scr aper:s3cret-pass", "the user"),
            ("scraper:short", "8 to 128"),
            ("scraper:pass word x", "without spaces"),
            ("scraper:pass#word-x", "'#'"),
            ("scraper:s3cret-pass\nuser x insecure-password y", "outside printable"),
            ("scraper:s3cret\u{e9}pass", "outside printable"),
        ] {
            let err = StatsAuth::parse(text).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        }
        let settings = HaproxySettings {
            stats: StatsSettings { listen: None, credentials_file: Some("/nonexistent/auth".into()) },
            ..HaproxySettings::default()
        };
        assert!(settings.check().unwrap_err().to_string().contains("cannot read"));
    }

    use super::*;
    use crate::yaml;

    #[test]
    fn defaults_are_valid_and_follow_the_field_notes() {
        let s = HaproxySettings::default();
        let c = s.check().unwrap();
        assert_eq!(
            c.server_params,
            "check check-ssl verify none inter 1s fastinter 250ms downinter 1s fall 2 rise 2 observe layer4 error-limit 3 on-error fail-check"
        );
        assert!(s.timeouts.tunnel >= Duration::from_secs(3600));
        assert_eq!(c.backend.as_str(), "kube-apiservers");
    }

    #[test]
    fn checks_verify_against_the_cluster_ca_once_it_is_usable() {
        let c = HaproxySettings::default().check().unwrap();
        assert_eq!(c.cluster_ca_file.as_ref().map(SafePath::as_str), Some(DEFAULT_CLUSTER_CA));
        let none = "check check-ssl verify none inter 1s";
        let required = "check check-ssl verify required ca-file /etc/kubernetes/pki/ca.crt inter 1s";
        assert!(c.server_params.starts_with(none), "before any read: {}", c.server_params);
        assert!(c.with_cluster_ca(&CaState::Absent).server_params.starts_with(none));
        assert!(c.with_cluster_ca(&CaState::Invalid("half written".into())).server_params.starts_with(none));
        let verified = c.with_cluster_ca(&CaState::Usable { fingerprint: "f1".into() });
        assert!(verified.server_params.starts_with(required), "{}", verified.server_params);
        assert_eq!(
            verified.server_params.strip_prefix(required),
            c.server_params.strip_prefix(none),
            "only the verification differs"
        );
        // Idempotent: the variant is made from the settings, not from the params in use.
        assert_eq!(verified.with_cluster_ca(&CaState::Absent).server_params, c.server_params);
        assert_eq!(verified.with_cluster_ca(&CaState::Usable { fingerprint: "f1".into() }), verified);
        assert_eq!(verified.ca_fingerprint.as_deref(), Some("f1"));
        let rotated = c.with_cluster_ca(&CaState::Usable { fingerprint: "f2".into() });
        assert_eq!(rotated.server_params, verified.server_params);
        assert_ne!(rotated, verified, "a new CA content is a different rendering");

        // `null`: never verified.
        let s: HaproxySettings = yaml::from_str("healthCheck:\n  clusterCaFile: null\n").unwrap();
        let c = s.check().unwrap();
        assert!(!c.uses_cluster_ca());
        assert!(c.with_cluster_ca(&CaState::Usable { fingerprint: "f1".into() }).server_params.starts_with(none));

        // Another path.
        let s: HaproxySettings =
            yaml::from_str("healthCheck:\n  clusterCaFile: /etc/cpha/kubernetes-ca.crt\n").unwrap();
        let c = s.check().unwrap().with_cluster_ca(&CaState::Usable { fingerprint: "f1".into() });
        assert!(c.server_params.contains("verify required ca-file /etc/cpha/kubernetes-ca.crt inter"));
        let mut s = HaproxySettings::default();
        s.health_check.cluster_ca_file = Some("/etc/ca.crt\nserver x".into());
        assert_eq!(s.check().unwrap_err().field, "healthCheck.clusterCaFile");

        // An explicit `caFile` is always required, whatever the cluster CA's state.
        let s: HaproxySettings = yaml::from_str("healthCheck:\n  caFile: /etc/ssl/apiserver-ca.pem\n").unwrap();
        let c = s.check().unwrap();
        assert!(!c.uses_cluster_ca(), "caFile replaces clusterCaFile");
        let explicit = "check check-ssl verify required ca-file /etc/ssl/apiserver-ca.pem inter 1s";
        for state in [CaState::Absent, CaState::Usable { fingerprint: "f1".into() }, CaState::Invalid("x".into())] {
            assert!(c.with_cluster_ca(&state).server_params.starts_with(explicit), "{state:?}");
        }
        assert!(c.server_params.starts_with(explicit));
    }

    #[test]
    fn reads_camel_case_yaml_and_refuses_unknown_keys() {
        let s: HaproxySettings = yaml::from_str(
            "configPath: /tmp/x/haproxy.cfg\nreload:\n  method: systemd\n  unit: haproxy.service\nhealthCheck:\n  inter: 2s\n  caFile: /etc/kubernetes/pki/ca.crt\nminApplyInterval: 500ms\nuser: null\n",
        )
        .unwrap();
        assert_eq!(s.config_path, PathBuf::from("/tmp/x/haproxy.cfg"));
        assert_eq!(s.reload, ReloadMethod::Systemd { unit: "haproxy.service".into() });
        assert_eq!(s.health_check.inter, Duration::from_secs(2));
        assert_eq!(s.health_check.fall, 2, "unset nested fields keep their default");
        assert_eq!(s.min_apply_interval, Duration::from_millis(500));
        assert_eq!(s.user, None);
        assert_eq!(s.group.as_deref(), Some("haproxy"));
        let c = s.check().unwrap();
        assert!(
            c.server_params.contains("verify required ca-file /etc/kubernetes/pki/ca.crt inter 2s"),
            "{}",
            c.server_params
        );

        let m: HaproxySettings = yaml::from_str("reload:\n  method: masterSocket\n").unwrap();
        assert_eq!(m.reload, ReloadMethod::MasterSocket);
        let m: HaproxySettings = yaml::from_str("reload: masterSocket\n").unwrap();
        assert_eq!(m.reload, ReloadMethod::MasterSocket);
        let m: HaproxySettings = yaml::from_str("reload: systemd\n").unwrap();
        assert_eq!(m.reload, ReloadMethod::Systemd { unit: "haproxy.service".into() });
        let e = yaml::from_str::<HaproxySettings>("reload: signal\n").unwrap_err();
        assert!(e.to_string().contains("unknown variant `signal`"), "{e}");
        let e = yaml::from_str::<HaproxySettings>("reload:\n  method: signal\n").unwrap_err();
        assert!(e.to_string().contains("unknown variant `signal`"), "{e}");
        let e = yaml::from_str::<HaproxySettings>("reload:\n  method: command\n").unwrap_err();
        assert!(e.to_string().contains("missing field `argv`"), "{e}");
        let c: HaproxySettings =
            yaml::from_str("reload:\n  method: command\n  argv: [/bin/kill, -USR2, '1']\n").unwrap();
        assert_eq!(c.reload, ReloadMethod::Command { argv: vec!["/bin/kill".into(), "-USR2".into(), "1".into()] });

        let e = yaml::from_str::<HaproxySettings>("configFile: /x\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `configFile`"), "{e}");
        let e = yaml::from_str::<HaproxySettings>("healthCheck:\n  interval: 1s\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `interval`"), "{e}");
        let e = yaml::from_str::<HaproxySettings>("drainTimeout: soon\n").unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
        let e = yaml::from_str::<HaproxySettings>("reload:\n  method: systemd\n  unit: x.service\n  extra: 1\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn refuses_values_that_could_inject_configuration() {
        let mut s = HaproxySettings { backend_name: "kube\nprogram x".into(), ..HaproxySettings::default() };
        assert_eq!(s.check().unwrap_err().field, "backendName");
        s = HaproxySettings { admin_socket: "/run/a.sock level admin\nprogram".into(), ..HaproxySettings::default() };
        let e = s.check().unwrap_err();
        assert_eq!(e.field, "adminSocket");
        assert!(e.to_string().contains("' '"), "{e}");
        s = HaproxySettings { admin_socket: "relative.sock".into(), ..HaproxySettings::default() };
        assert!(s.check().unwrap_err().to_string().contains("absolute"));
        s = HaproxySettings { admin_socket: "/run/../etc/x".into(), ..HaproxySettings::default() };
        assert!(s.check().unwrap_err().to_string().contains(".."));
        s = HaproxySettings { user: Some("root # x".into()), ..HaproxySettings::default() };
        assert_eq!(s.check().unwrap_err().field, "user");
        s = HaproxySettings::default();
        s.health_check.ca_file = Some("/etc/ca.crt;x".into());
        assert_eq!(s.check().unwrap_err().field, "healthCheck.caFile");
        s = HaproxySettings { reload: ReloadMethod::Systemd { unit: "a b".into() }, ..HaproxySettings::default() };
        assert_eq!(s.check().unwrap_err().field, "reload.systemd.unit");
        s = HaproxySettings { reload: ReloadMethod::Command { argv: vec![] }, ..HaproxySettings::default() };
        assert_eq!(s.check().unwrap_err().field, "reload.command.argv");
        s = HaproxySettings { frontend_name: "same".into(), backend_name: "same".into(), ..HaproxySettings::default() };
        assert_eq!(s.check().unwrap_err().field, "backendName");
    }

    #[test]
    fn refuses_out_of_range_numbers_and_durations() {
        let mut s = HaproxySettings::default();
        s.health_check.fall = 0;
        assert_eq!(s.check().unwrap_err().field, "healthCheck.fall");
        s = HaproxySettings::default();
        s.timeouts.tunnel = Duration::ZERO;
        assert_eq!(s.check().unwrap_err().field, "timeouts.tunnel");
        s = HaproxySettings::default();
        s.health_check.inter = Duration::from_micros(1500);
        assert!(s.check().unwrap_err().reason.contains("milliseconds"));
        s = HaproxySettings { maxconn: Some(0), ..HaproxySettings::default() };
        assert_eq!(s.check().unwrap_err().field, "maxconn");
    }

    #[test]
    fn server_parameters_follow_the_health_check_settings() {
        let s: HaproxySettings = yaml::from_str(
            "healthCheck:\n  inter: 2s\n  fall: 3\n  slowStart: 10s\n  errorLimit: 0\n  shutdownSessionsOnDown: true\n  unreadyGrace: 1m\n",
        )
        .unwrap();
        assert_eq!(s.health_check.unready_grace, Duration::from_secs(60));
        assert_eq!(
            s.check().unwrap().server_params,
            "check check-ssl verify none inter 2s fastinter 250ms downinter 1s fall 3 rise 2 slowstart 10s on-marked-down shutdown-sessions"
        );
        let mut s = HaproxySettings::default();
        s.health_check.error_limit = 101;
        assert_eq!(s.check().unwrap_err().field, "healthCheck.errorLimit");
        s = HaproxySettings::default();
        s.health_check.slow_start = Duration::from_micros(10_500);
        assert_eq!(s.check().unwrap_err().field, "healthCheck.slowStart");
        s = HaproxySettings::default();
        s.health_check.unready_grace = Duration::from_secs(8 * 24 * 3600);
        assert_eq!(s.check().unwrap_err().field, "healthCheck.unreadyGrace");
        let e = yaml::from_str::<HaproxySettings>("healthCheck:\n  errorLimit: -1\n").unwrap_err();
        assert!(e.to_string().contains("errorLimit"), "{e}");
    }

    #[test]
    fn formats_haproxy_times_exactly() {
        assert_eq!(time(Duration::from_millis(250)), "250ms");
        assert_eq!(time(Duration::from_secs(1)), "1s");
        assert_eq!(time(Duration::from_secs(90)), "90s");
        assert_eq!(time(Duration::from_secs(120)), "2m");
        assert_eq!(time(Duration::from_secs(3600)), "1h");
        assert_eq!(time(Duration::from_millis(1500)), "1500ms");
    }
}
