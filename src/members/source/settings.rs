//! The `members:` section of the agent's configuration: where the member list comes from and
//! how it is checked, read from YAML, overridden by flags or environment variables, and
//! validated once into [`MembersSettings`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::parse_entries;
use crate::members::{MemberSet, MembersError, ParseOptions, DEFAULT_PORT};

/// Where the state file lives unless configured.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/cpha/members.json";

/// The kind of source, as written in `members.source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SourceKind {
    ConfigMap,
    /// The `default/kubernetes` EndpointSlice: the addresses the apiservers publish themselves.
    #[default]
    EndpointSlice,
    File,
    Static,
}

impl SourceKind {
    pub const ALL: [SourceKind; 4] =
        [SourceKind::ConfigMap, SourceKind::EndpointSlice, SourceKind::File, SourceKind::Static];

    /// As written in `members.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::ConfigMap => "configMap",
            SourceKind::EndpointSlice => "endpointSlice",
            SourceKind::File => "file",
            SourceKind::Static => "static",
        }
    }
}

impl std::str::FromStr for SourceKind {
    type Err = String;

    /// The configuration's spelling, or all lower case.
    fn from_str(s: &str) -> Result<SourceKind, String> {
        SourceKind::ALL.into_iter().find(|k| k.as_str() == s || k.as_str().to_lowercase() == s).ok_or_else(|| {
            format!("{s:?} is not a member source: {}", SourceKind::ALL.map(SourceKind::as_str).join(", "))
        })
    }
}

/// The `members:` section as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MembersConfig {
    pub source: Option<SourceKind>,
    pub config_map: ConfigMapConfig,
    pub endpoint_slice: EndpointSliceConfig,
    pub file: FileConfig,
    /// The members themselves for `source: static`; with another source, the seed used at start
    /// when the state file holds no set.
    #[serde(rename = "static")]
    pub static_members: Option<Vec<String>>,
    pub default_port: Option<u16>,
    pub max_members: Option<usize>,
    pub allow_empty: Option<bool>,
    /// Empty to keep no state file.
    pub state_file: Option<PathBuf>,
    /// The drift report (with `source: configMap`).
    pub drift: DriftConfig,
}

/// `members.drift`: the member ConfigMap compared with the EndpointSlice the apiservers
/// register themselves in.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DriftConfig {
    /// How long they may disagree before it is reported (default 5m; `0s`: not compared).
    #[serde(deserialize_with = "crate::units::optional_duration")]
    pub after: Option<Duration>,
    /// Default `default/kubernetes`, port `https`.
    pub endpoint_slice: EndpointSliceConfig,
}

/// The drift report's settings, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftSettings {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub after: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ConfigMapConfig {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EndpointSliceConfig {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub port_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FileConfig {
    pub path: Option<PathBuf>,
    #[serde(deserialize_with = "crate::units::optional_duration")]
    pub poll_interval: Option<Duration>,
    #[serde(deserialize_with = "crate::units::optional_duration")]
    pub settle: Option<Duration>,
}

/// Validated `members:` settings. Deserializing one reads a [`MembersConfig`] and resolves it,
/// so an agent configuration may hold this type directly when it needs no flag overrides.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "MembersConfig")]
pub struct MembersSettings {
    pub source: SourceSettings,
    /// Used at start when the state file holds no set (never with [`SourceSettings::Static`]).
    pub seed: Option<MemberSet>,
    pub parse: ParseOptions,
    pub state_file: Option<PathBuf>,
    /// Compare the member ConfigMap with the apiservers' EndpointSlice (`source: configMap`).
    pub drift: Option<DriftSettings>,
}

impl Default for MembersSettings {
    /// The `default/kubernetes` EndpointSlice, as an empty `members:` section gives.
    fn default() -> Self {
        MembersConfig::default().resolve().expect("the defaults are valid")
    }
}

impl TryFrom<MembersConfig> for MembersSettings {
    type Error = MembersConfigError;

    fn try_from(config: MembersConfig) -> Result<Self, Self::Error> {
        config.resolve()
    }
}

impl MembersSettings {
    /// The metrics label and log name of the source.
    pub fn source_name(&self) -> &'static str {
        self.source.name()
    }
}

/// The source with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSettings {
    ConfigMap { namespace: String, name: String, key: String },
    EndpointSlice { namespace: String, name: String, port_name: String },
    File { path: PathBuf, poll_interval: Duration, settle: Duration },
    Static(MemberSet),
}

impl SourceSettings {
    pub fn name(&self) -> &'static str {
        match self {
            SourceSettings::ConfigMap { .. } => "configmap",
            SourceSettings::EndpointSlice { .. } => "endpointslice",
            SourceSettings::File { .. } => "file",
            SourceSettings::Static(_) => "static",
        }
    }

    /// Whether the source reads the Kubernetes API.
    pub fn uses_api(&self) -> bool {
        matches!(self, SourceSettings::ConfigMap { .. } | SourceSettings::EndpointSlice { .. })
    }
}

/// A `members:` setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("members.{key}: {message}")]
pub struct MembersConfigError {
    pub key: &'static str,
    pub message: String,
}

fn invalid(key: &'static str, message: impl Into<String>) -> MembersConfigError {
    MembersConfigError { key, message: message.into() }
}

impl MembersConfig {
    /// Values set in `over` replace those in `self` (flags and environment over the file).
    pub fn merge(mut self, over: MembersConfig) -> MembersConfig {
        fn pick<T>(a: &mut Option<T>, b: Option<T>) {
            if b.is_some() {
                *a = b;
            }
        }
        pick(&mut self.source, over.source);
        pick(&mut self.config_map.namespace, over.config_map.namespace);
        pick(&mut self.config_map.name, over.config_map.name);
        pick(&mut self.config_map.key, over.config_map.key);
        pick(&mut self.endpoint_slice.namespace, over.endpoint_slice.namespace);
        pick(&mut self.endpoint_slice.name, over.endpoint_slice.name);
        pick(&mut self.endpoint_slice.port_name, over.endpoint_slice.port_name);
        pick(&mut self.file.path, over.file.path);
        pick(&mut self.file.poll_interval, over.file.poll_interval);
        pick(&mut self.file.settle, over.file.settle);
        pick(&mut self.static_members, over.static_members);
        pick(&mut self.default_port, over.default_port);
        pick(&mut self.max_members, over.max_members);
        pick(&mut self.allow_empty, over.allow_empty);
        pick(&mut self.state_file, over.state_file);
        pick(&mut self.drift.after, over.drift.after);
        pick(&mut self.drift.endpoint_slice.namespace, over.drift.endpoint_slice.namespace);
        pick(&mut self.drift.endpoint_slice.name, over.drift.endpoint_slice.name);
        pick(&mut self.drift.endpoint_slice.port_name, over.drift.endpoint_slice.port_name);
        self
    }

    /// Checks the settings and fills in the defaults.
    pub fn resolve(self) -> Result<MembersSettings, MembersConfigError> {
        let default_port = self.default_port.unwrap_or(DEFAULT_PORT);
        if default_port == 0 {
            return Err(invalid("defaultPort", "must be between 1 and 65535"));
        }
        let max_members = self.max_members.unwrap_or(ParseOptions::default().max_members);
        if !(1..=1024).contains(&max_members) {
            return Err(invalid("maxMembers", "must be between 1 and 1024"));
        }
        let parse = ParseOptions { default_port, max_members, allow_empty: self.allow_empty.unwrap_or(false) };
        let kind = self.source.unwrap_or_default();
        let static_set = match &self.static_members {
            Some(entries) => Some(
                parse_entries(entries.iter().map(String::as_str), &parse)
                    .map_err(|e: MembersError| invalid("static", e.to_string()))?,
            ),
            None => None,
        };
        let drift_config = self.drift;
        let source = match kind {
            SourceKind::ConfigMap => {
                let c = self.config_map;
                let namespace = c.namespace.unwrap_or_else(|| "kube-system".into());
                let name = c.name.unwrap_or_else(|| "cpha-members".into());
                let key = c.key.unwrap_or_else(|| "members".into());
                check_dns_label("configMap.namespace", &namespace)?;
                check_dns_subdomain("configMap.name", &name)?;
                check_configmap_key(&key)?;
                SourceSettings::ConfigMap { namespace, name, key }
            }
            SourceKind::EndpointSlice => {
                let e = self.endpoint_slice;
                let namespace = e.namespace.unwrap_or_else(|| "default".into());
                let name = e.name.unwrap_or_else(|| "kubernetes".into());
                let port_name = e.port_name.unwrap_or_else(|| "https".into());
                check_dns_label("endpointSlice.namespace", &namespace)?;
                check_dns_subdomain("endpointSlice.name", &name)?;
                if port_name.is_empty() || port_name.len() > 63 {
                    return Err(invalid("endpointSlice.portName", "must be 1 to 63 characters"));
                }
                SourceSettings::EndpointSlice { namespace, name, port_name }
            }
            SourceKind::File => {
                let f = self.file;
                let path = f
                    .path
                    .filter(|p| !p.as_os_str().is_empty())
                    .ok_or_else(|| invalid("file.path", "is required with source: file"))?;
                let poll_interval = f.poll_interval.unwrap_or(Duration::from_millis(100));
                if poll_interval < Duration::from_millis(10) || poll_interval > Duration::from_secs(60) {
                    return Err(invalid("file.pollInterval", "must be between 10ms and 1m"));
                }
                let settle = f.settle.unwrap_or(Duration::from_millis(500));
                if settle > Duration::from_secs(60) {
                    return Err(invalid("file.settle", "must be at most 1m"));
                }
                SourceSettings::File { path, poll_interval, settle }
            }
            SourceKind::Static => {
                let set =
                    static_set.clone().ok_or_else(|| invalid("static", "lists the members with source: static"))?;
                SourceSettings::Static(set)
            }
        };
        let seed = match &source {
            SourceSettings::Static(_) => None,
            _ => static_set.filter(|s| !s.is_empty()),
        };
        let state_file = match self.state_file {
            None => Some(PathBuf::from(DEFAULT_STATE_FILE)),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p),
        };
        let after = drift_config.after.unwrap_or(Duration::from_secs(300));
        if after > Duration::from_secs(24 * 3600) {
            return Err(invalid("drift.after", "must be at most 24h (0s turns the report off)"));
        }
        let drift = match &source {
            SourceSettings::ConfigMap { .. } if !after.is_zero() => {
                let e = drift_config.endpoint_slice;
                let namespace = e.namespace.unwrap_or_else(|| "default".into());
                let name = e.name.unwrap_or_else(|| "kubernetes".into());
                let port_name = e.port_name.unwrap_or_else(|| "https".into());
                check_dns_label("drift.endpointSlice.namespace", &namespace)?;
                check_dns_subdomain("drift.endpointSlice.name", &name)?;
                if port_name.is_empty() || port_name.len() > 63 {
                    return Err(invalid("drift.endpointSlice.portName", "must be 1 to 63 characters"));
                }
                Some(DriftSettings { namespace, name, port_name, after })
            }
            _ => None,
        };
        Ok(MembersSettings { source, seed, parse, state_file, drift })
    }
}

fn check_dns_label(key: &'static str, value: &str) -> Result<(), MembersConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(key, format!("{value:?} is not a namespace name (lowercase letters, digits and '-')")))
    }
}

fn check_dns_subdomain(key: &'static str, value: &str) -> Result<(), MembersConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(key, format!("{value:?} is not an object name (lowercase letters, digits, '-' and '.')")))
    }
}

fn check_configmap_key(key: &str) -> Result<(), MembersConfigError> {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid("configMap.key", format!("{key:?} is not a ConfigMap key (letters, digits, '-', '_' and '.')")))
    }
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::yaml;

    fn resolve(text: &str) -> Result<MembersSettings, String> {
        let cfg: MembersConfig = yaml::from_str(text).map_err(|e| e.to_string())?;
        cfg.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_read_the_kubernetes_endpointslice() {
        let s = resolve("{}").unwrap();
        assert_eq!(
            s.source,
            SourceSettings::EndpointSlice {
                namespace: "default".into(),
                name: "kubernetes".into(),
                port_name: "https".into()
            }
        );
        assert_eq!(s.parse, ParseOptions::default());
        assert_eq!(s.state_file, Some(PathBuf::from("/var/lib/cpha/members.json")));
        assert_eq!(s.seed, None);
        assert_eq!(MembersSettings::default(), s);
    }

    #[test]
    fn settings_deserialize_through_the_config() {
        let s: MembersSettings = yaml::from_str("source: static\nstatic: [10.0.0.1]\n").unwrap();
        assert_eq!(s.source, SourceSettings::Static("10.0.0.1".parse().unwrap()));
        let e = yaml::from_str::<MembersSettings>("source: file\n").unwrap_err();
        assert!(e.to_string().contains("members.file.path: is required"), "{e}");
    }

    #[test]
    fn configmap_with_a_static_seed() {
        let s = resolve(
            "source: configMap\nconfigMap: {namespace: kube-system, name: cp-members, key: list.txt}\n\
             static: [10.0.0.11, '10.0.0.12:7443']\ndefaultPort: 8443\nmaxMembers: 5\nallowEmpty: true\nstateFile: ''\n",
        )
        .unwrap();
        assert_eq!(
            s.source,
            SourceSettings::ConfigMap {
                namespace: "kube-system".into(),
                name: "cp-members".into(),
                key: "list.txt".into()
            }
        );
        assert_eq!(s.seed.unwrap().to_string(), "10.0.0.11:8443, 10.0.0.12:7443");
        assert_eq!(s.parse, ParseOptions { default_port: 8443, max_members: 5, allow_empty: true });
        assert_eq!(s.state_file, None);
    }

    #[test]
    fn static_and_file_sources() {
        let s = resolve("source: static\nstatic: [10.0.0.11, cp2=10.0.0.12]\n").unwrap();
        assert_eq!(s.source, SourceSettings::Static("10.0.0.11, cp2=10.0.0.12".parse().unwrap()));
        assert_eq!(s.seed, None, "the static list is the source, not a seed");
        let s = resolve("source: file\nfile: {path: /etc/cpha/members, pollInterval: 50ms}\n").unwrap();
        assert_eq!(
            s.source,
            SourceSettings::File {
                path: "/etc/cpha/members".into(),
                poll_interval: Duration::from_millis(50),
                settle: Duration::from_millis(500)
            }
        );
    }

    #[test]
    fn refuses_what_cannot_work() {
        let cases = [
            ("source: file\n", "members.file.path: is required"),
            ("source: static\n", "members.static: lists the members"),
            ("source: static\nstatic: []\n", "members.static: the member list is empty"),
            ("static: ['10.0.0.1', 'x y']\n", "members.static: entry 2"),
            ("source: configMap\nconfigMap: {name: Bad_Name}\n", "members.configMap.name"),
            ("source: configMap\nconfigMap: {namespace: 'a,b'}\n", "members.configMap.namespace"),
            ("source: configMap\nconfigMap: {key: 'a/b'}\n", "members.configMap.key"),
            ("source: configmap\n", "unknown variant `configmap`"),
            ("maxMembers: 0\n", "members.maxMembers"),
            ("defaultPort: 0\n", "members.defaultPort"),
            ("sorce: file\n", "unknown field `sorce`"),
            ("file: {path: /x, settle: forever}\n", "not a duration"),
        ];
        for (text, want) in cases {
            let err = resolve(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn merge_prefers_the_override() {
        let file: MembersConfig = yaml::from_str("source: file\nfile: {path: /a}\nmaxMembers: 3\n").unwrap();
        let over = MembersConfig {
            file: FileConfig { path: Some("/b".into()), ..Default::default() },
            state_file: Some("/tmp/s.json".into()),
            ..Default::default()
        };
        let s = file.merge(over).resolve().unwrap();
        assert!(matches!(&s.source, SourceSettings::File { path, .. } if path == &PathBuf::from("/b")));
        assert_eq!(s.parse.max_members, 3);
        assert_eq!(s.state_file, Some(PathBuf::from("/tmp/s.json")));
    }

    #[test]
    fn drift_is_compared_for_the_configmap_source_only() {
        let cfg = |text: &str| -> Result<MembersSettings, MembersConfigError> {
            crate::yaml::from_str::<MembersConfig>(text).unwrap().resolve()
        };
        let d = cfg("source: configMap\n").unwrap().drift.expect("on by default");
        assert_eq!(
            d,
            DriftSettings {
                namespace: "default".into(),
                name: "kubernetes".into(),
                port_name: "https".into(),
                after: Duration::from_secs(300)
            }
        );
        let d = cfg("source: configMap\ndrift: {after: 30s, endpointSlice: {namespace: team, name: apis}}\n").unwrap();
        assert_eq!(
            d.drift.map(|d| (d.namespace, d.name, d.after)),
            Some(("team".into(), "apis".into(), Duration::from_secs(30)))
        );
        assert_eq!(cfg("source: configMap\ndrift: {after: 0s}\n").unwrap().drift, None, "0s turns it off");
        assert_eq!(cfg("source: endpointSlice\n").unwrap().drift, None, "the slice is the source itself");
        let e = cfg("source: configMap\ndrift: {after: 25h}\n").unwrap_err();
        assert_eq!(e.key, "drift.after");
        let e = cfg("source: configMap\ndrift: {endpointSlice: {name: Bad_Name}}\n").unwrap_err();
        assert_eq!(e.key, "drift.endpointSlice.name");
        let e = crate::yaml::from_str::<MembersConfig>("drift: {aftr: 1m}\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `aftr`"), "unknown keys are refused: {e}");
    }
}
