//! The `kubernetes:` section of the agent's configuration: which credentials reach the API and
//! how, read from YAML, overridden by flags or environment variables, and validated once into
//! [`KubeSettings`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Kubeconfig files tried when none is configured: kubeadm's `admin.conf`, then
/// `super-admin.conf`, which on Kubernetes 1.29+ has rights before `admin.conf`'s
/// `kubeadm:cluster-admins` binding exists.
pub const DEFAULT_KUBECONFIGS: [&str; 2] = ["/etc/kubernetes/admin.conf", "/etc/kubernetes/super-admin.conf"];

/// The service account files of a pod (the DaemonSet shape).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The `kubernetes:` section as written. Every key is optional.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Kubeconfig files tried in order (default: [`DEFAULT_KUBECONFIGS`]).
    pub kubeconfig: Option<Vec<PathBuf>>,
    /// Use the pod's service account (default false).
    pub in_cluster: Option<bool>,
    /// Where the service account's `token`, `ca.crt` and `namespace` are mounted (with
    /// `inCluster`; default [`SERVICE_ACCOUNT_DIR`]), for a token projected elsewhere.
    pub service_account_dir: Option<PathBuf>,
    /// API server URL: with `tokenFile` and `caFile` the whole credential; otherwise it replaces
    /// the kubeconfig's or the in-cluster server.
    pub server: Option<String>,
    /// CA bundle that signs the API server's certificate (with `tokenFile`).
    pub ca_file: Option<PathBuf>,
    /// Bearer token file, read again whenever it changes.
    pub token_file: Option<PathBuf>,
    /// Wait for missing credentials instead of failing (default true).
    pub wait_for_credentials: Option<bool>,
    /// How often missing credentials are looked for (default 2s).
    #[serde(deserialize_with = "crate::units::optional_duration")]
    pub poll_interval: Option<Duration>,
    /// Talk to the known members directly before the configured server (default true).
    pub direct_to_members: Option<bool>,
    /// Server-side timeout of each watch request; a silent connection is given up five seconds
    /// after it (default 30s).
    #[serde(deserialize_with = "crate::units::optional_duration")]
    pub watch_timeout: Option<Duration>,
    /// TCP and TLS connect timeout per API server (default 5s).
    #[serde(deserialize_with = "crate::units::optional_duration")]
    pub connect_timeout: Option<Duration>,
}

/// Where the credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// The first of these kubeconfig files that exists and loads; the next one after the API
    /// refuses the credentials (401 or 403).
    Kubeconfig(Vec<PathBuf>),
    /// The pod's service account: `token`, `ca.crt` and `namespace` in `dir`, the server from
    /// `KUBERNETES_SERVICE_HOST`/`_PORT`.
    InCluster { dir: PathBuf },
    /// A server URL (from `server`), a CA bundle and a bearer token file.
    TokenFile { ca_file: PathBuf, token_file: PathBuf },
}

/// Validated `kubernetes:` settings. Deserializing one reads a [`KubernetesConfig`] and
/// resolves it, so an agent configuration may hold this type directly.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "KubernetesConfig")]
pub struct KubeSettings {
    pub credentials: Credentials,
    /// Replaces the server of the credentials (always set for [`Credentials::TokenFile`]).
    pub server: Option<http::Uri>,
    pub wait_for_credentials: bool,
    pub poll_interval: Duration,
    pub direct_to_members: bool,
    pub watch_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubernetesConfig::default().resolve().expect("the defaults are valid")
    }
}

impl TryFrom<KubernetesConfig> for KubeSettings {
    type Error = KubeConfigError;

    fn try_from(config: KubernetesConfig) -> Result<Self, Self::Error> {
        config.resolve()
    }
}

/// A `kubernetes:` setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kubernetes.{key}: {message}")]
pub struct KubeConfigError {
    pub key: &'static str,
    pub message: String,
}

fn invalid(key: &'static str, message: impl Into<String>) -> KubeConfigError {
    KubeConfigError { key, message: message.into() }
}

impl KubernetesConfig {
    /// Values set in `over` replace those in `self` (flags and environment over the file).
    pub fn merge(mut self, over: KubernetesConfig) -> KubernetesConfig {
        // NOTE: an override that names a credential (kubeconfig, tokenFile, inCluster) replaces
        // the file's credential whole: `cpha members add --kubeconfig admin.conf` on a host whose
        // file holds the agent's own token must use the admin's kubeconfig, not refuse the mix.
        if over.kubeconfig.is_some() || over.token_file.is_some() || over.in_cluster == Some(true) {
            self.kubeconfig = None;
            self.in_cluster = None;
            self.service_account_dir = None;
            self.server = None;
            self.ca_file = None;
            self.token_file = None;
        }
        if over.kubeconfig.is_some() {
            self.kubeconfig = over.kubeconfig;
        }
        self.in_cluster = over.in_cluster.or(self.in_cluster);
        if over.service_account_dir.is_some() {
            self.service_account_dir = over.service_account_dir;
        }
        if over.server.is_some() {
            self.server = over.server;
        }
        if over.ca_file.is_some() {
            self.ca_file = over.ca_file;
        }
        if over.token_file.is_some() {
            self.token_file = over.token_file;
        }
        self.wait_for_credentials = over.wait_for_credentials.or(self.wait_for_credentials);
        self.poll_interval = over.poll_interval.or(self.poll_interval);
        self.direct_to_members = over.direct_to_members.or(self.direct_to_members);
        self.watch_timeout = over.watch_timeout.or(self.watch_timeout);
        self.connect_timeout = over.connect_timeout.or(self.connect_timeout);
        self
    }

    /// Checks the combination and fills in the defaults.
    pub fn resolve(self) -> Result<KubeSettings, KubeConfigError> {
        let server = match &self.server {
            Some(url) => Some(parse_server(url)?),
            None => None,
        };
        let credentials = match (self.in_cluster.unwrap_or(false), &self.token_file) {
            (true, Some(_)) => return Err(invalid("tokenFile", "is not used with inCluster: choose one")),
            (true, None) if self.kubeconfig.is_some() => {
                return Err(invalid("kubeconfig", "is not used with inCluster: choose one"))
            }
            (true, None) if self.ca_file.is_some() => {
                return Err(invalid("caFile", "is only used with tokenFile (inCluster uses the pod's CA)"))
            }
            (true, None) => {
                let dir = self.service_account_dir.clone().unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR));
                check_path("serviceAccountDir", &dir)?;
                Credentials::InCluster { dir }
            }
            (false, _) if self.service_account_dir.is_some() => {
                return Err(invalid("serviceAccountDir", "is only used with inCluster"))
            }
            (false, Some(token_file)) => {
                if self.kubeconfig.is_some() {
                    return Err(invalid("kubeconfig", "is not used with tokenFile: choose one"));
                }
                let ca_file = self.ca_file.clone().ok_or_else(|| invalid("caFile", "is required with tokenFile"))?;
                if server.is_none() {
                    return Err(invalid("server", "is required with tokenFile"));
                }
                check_path("tokenFile", token_file)?;
                check_path("caFile", &ca_file)?;
                Credentials::TokenFile { ca_file, token_file: token_file.clone() }
            }
            (false, None) => {
                if self.ca_file.is_some() {
                    return Err(invalid("caFile", "is only used with tokenFile (a kubeconfig names its CA)"));
                }
                let files =
                    self.kubeconfig.clone().unwrap_or_else(|| DEFAULT_KUBECONFIGS.iter().map(PathBuf::from).collect());
                if files.is_empty() {
                    return Err(invalid("kubeconfig", "lists no file"));
                }
                for f in &files {
                    check_path("kubeconfig", f)?;
                }
                Credentials::Kubeconfig(files)
            }
        };
        let poll_interval = self.poll_interval.unwrap_or(Duration::from_secs(2));
        if poll_interval < Duration::from_millis(50) || poll_interval > Duration::from_secs(300) {
            return Err(invalid("pollInterval", "must be between 50ms and 5m"));
        }
        let watch_timeout = self.watch_timeout.unwrap_or(Duration::from_secs(30));
        if watch_timeout.subsec_nanos() != 0 || watch_timeout < Duration::from_secs(1) {
            return Err(invalid("watchTimeout", "must be a whole number of seconds, at least 1s"));
        }
        if watch_timeout > Duration::from_secs(3600) {
            return Err(invalid("watchTimeout", "must be at most 1h (the API server ends watches sooner anyway)"));
        }
        let connect_timeout = self.connect_timeout.unwrap_or(Duration::from_secs(5));
        if connect_timeout < Duration::from_millis(100) || connect_timeout > Duration::from_secs(300) {
            return Err(invalid("connectTimeout", "must be between 100ms and 5m"));
        }
        Ok(KubeSettings {
            credentials,
            server,
            wait_for_credentials: self.wait_for_credentials.unwrap_or(true),
            poll_interval,
            direct_to_members: self.direct_to_members.unwrap_or(true),
            watch_timeout,
            connect_timeout,
        })
    }
}

fn check_path(key: &'static str, path: &Path) -> Result<(), KubeConfigError> {
    if path.as_os_str().is_empty() {
        return Err(invalid(key, "is an empty path"));
    }
    Ok(())
}

/// An `https://host[:port]` URL with no path, query or credentials.
pub fn parse_server(url: &str) -> Result<http::Uri, KubeConfigError> {
    let uri: http::Uri = url.parse().map_err(|e| invalid("server", format!("{url:?} is not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(invalid("server", format!("{url:?} must start with https://")));
    }
    let Some(authority) = uri.authority() else {
        return Err(invalid("server", format!("{url:?} has no host")));
    };
    if authority.as_str().contains('@') {
        return Err(invalid("server", format!("{url:?} must not carry credentials")));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid("server", format!("{url:?} must not have a path or query")));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::yaml;

    fn resolve(text: &str) -> Result<KubeSettings, String> {
        let cfg: KubernetesConfig = yaml::from_str(text).map_err(|e| e.to_string())?;
        cfg.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_try_kubeadm_files_directly_to_members() {
        let s = resolve("{}").unwrap();
        assert_eq!(
            s.credentials,
            Credentials::Kubeconfig(vec![
                PathBuf::from("/etc/kubernetes/admin.conf"),
                PathBuf::from("/etc/kubernetes/super-admin.conf")
            ])
        );
        assert_eq!(s.server, None);
        assert!(s.wait_for_credentials);
        assert!(s.direct_to_members);
        assert_eq!(s.poll_interval, Duration::from_secs(2));
        assert_eq!(s.watch_timeout, Duration::from_secs(30));
        assert_eq!(s.connect_timeout, Duration::from_secs(5));
        assert_eq!(KubeSettings::default(), s);
        assert_eq!(yaml::from_str::<KubeSettings>("{}").unwrap(), s);
        let err = yaml::from_str::<KubeSettings>("tokenFile: /t\n").unwrap_err().to_string();
        assert!(err.contains("kubernetes.caFile: is required with tokenFile"), "{err}");
    }

    #[test]
    fn token_file_shape() {
        let s = resolve(
            "server: https://10.0.0.10:6443\ncaFile: /etc/cpha/ca.crt\ntokenFile: /etc/cpha/token\n\
             directToMembers: false\nwatchTimeout: 10s\npollInterval: 500ms\n",
        )
        .unwrap();
        assert_eq!(
            s.credentials,
            Credentials::TokenFile { ca_file: "/etc/cpha/ca.crt".into(), token_file: "/etc/cpha/token".into() }
        );
        assert_eq!(s.server.unwrap().to_string(), "https://10.0.0.10:6443/");
        assert!(!s.direct_to_members);
        assert_eq!(s.watch_timeout, Duration::from_secs(10));
        assert_eq!(s.poll_interval, Duration::from_millis(500));
    }

    #[test]
    fn kubeconfig_list_and_server_override() {
        let s = resolve("kubeconfig: [/a.conf, /b.conf]\nserver: https://[fd00::10]:6443\n").unwrap();
        assert_eq!(s.credentials, Credentials::Kubeconfig(vec!["/a.conf".into(), "/b.conf".into()]));
        assert_eq!(s.server.unwrap().host(), Some("[fd00::10]"));
        let s = resolve("inCluster: true\n").unwrap();
        assert_eq!(s.credentials, Credentials::InCluster { dir: SERVICE_ACCOUNT_DIR.into() });
        let s = resolve("inCluster: true\nserviceAccountDir: /var/run/cpha-token\n").unwrap();
        assert_eq!(s.credentials, Credentials::InCluster { dir: "/var/run/cpha-token".into() });
    }

    #[test]
    fn refuses_what_cannot_work() {
        let cases = [
            ("tokenFile: /t\ncaFile: /c\n", "kubernetes.server: is required with tokenFile"),
            ("tokenFile: /t\nserver: https://a:6443\n", "kubernetes.caFile: is required with tokenFile"),
            ("caFile: /c\n", "kubernetes.caFile: is only used with tokenFile"),
            ("inCluster: true\ntokenFile: /t\n", "kubernetes.tokenFile: is not used with inCluster"),
            ("inCluster: true\nkubeconfig: [/a]\n", "kubernetes.kubeconfig: is not used with inCluster"),
            ("kubeconfig: []\n", "kubernetes.kubeconfig: lists no file"),
            ("serviceAccountDir: /x\n", "kubernetes.serviceAccountDir: is only used with inCluster"),
            ("server: http://a:6443\n", "must start with https://"),
            ("server: https://a:6443/api\n", "must not have a path"),
            ("server: https://u:p@a:6443\n", "must not carry credentials"),
            ("watchTimeout: 1500ms\n", "kubernetes.watchTimeout: must be a whole number"),
            ("pollInterval: 1ms\n", "kubernetes.pollInterval"),
            ("pollInterval: soon\n", "not a duration"),
            ("kubeconfg: [/a]\n", "unknown field `kubeconfg`"),
        ];
        for (text, want) in cases {
            let err = resolve(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn merge_prefers_the_override() {
        let file: KubernetesConfig =
            yaml::from_str("kubeconfig: [/a]\ndirectToMembers: false\nwatchTimeout: 10s\n").unwrap();
        let over = KubernetesConfig {
            kubeconfig: Some(vec!["/b".into()]),
            direct_to_members: Some(true),
            ..Default::default()
        };
        let s = file.merge(over).resolve().unwrap();
        assert_eq!(s.credentials, Credentials::Kubeconfig(vec!["/b".into()]));
        assert!(s.direct_to_members);
        assert_eq!(s.watch_timeout, Duration::from_secs(10));
    }

    #[test]
    fn a_credential_given_as_override_replaces_the_files() {
        let file: KubernetesConfig = yaml::from_str(
            "server: https://192.0.2.10:8443
caFile: /etc/kubernetes/pki/ca.crt
tokenFile: /etc/cpha/token
watchTimeout: 10s
",
        )
        .unwrap();
        let over =
            KubernetesConfig { kubeconfig: Some(vec!["/etc/kubernetes/admin.conf".into()]), ..Default::default() };
        let s = file.clone().merge(over).resolve().unwrap();
        assert_eq!(s.credentials, Credentials::Kubeconfig(vec!["/etc/kubernetes/admin.conf".into()]));
        assert_eq!(s.server, None, "the token's server went with it");
        assert_eq!(s.watch_timeout, Duration::from_secs(10), "the rest of the section stays");
        let s = file.merge(KubernetesConfig::default()).resolve().unwrap();
        assert!(matches!(s.credentials, Credentials::TokenFile { .. }));
    }
}
