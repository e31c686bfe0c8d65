//! Command-line interface (every flag a deployment would set also reads an environment
//! variable) and its composite value types.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

use crate::auth::TokenSpec;

/// A duration: `500ms`, `2s`, `5m`, `1h`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("duration {s:?}: expected a number with ms, s, m or h"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(format!("duration {s:?}: unknown unit {unit:?}")),
        };
        Ok(Dur(d))
    }
}

/// `PATH:USER`: write a kubeconfig for USER's token to PATH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeconfigTarget {
    pub path: PathBuf,
    pub user: String,
}

impl FromStr for KubeconfigTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (p, u) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected PATH:USER"))?;
        if p.is_empty() || u.is_empty() {
            return Err(format!("{s:?}: expected PATH:USER"));
        }
        Ok(Self { path: p.into(), user: u.into() })
    }
}

/// A protocol-faithful Kubernetes API stand-in for cpha's tests: core/v1 ConfigMaps and
/// discovery.k8s.io/v1 EndpointSlices over HTTPS with bearer tokens, watches, and faults.
#[derive(Debug, Parser)]
#[command(name = "kube-standin", version)]
pub struct Cli {
    /// Address to serve the API on (HTTPS); port 0 picks one. The bound address is printed
    /// on stdout as `listening <addr>`.
    #[arg(long, env = "KUBE_STANDIN_LISTEN", default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,

    /// Directory holding the CA (`ca.crt`, `ca.key`; created when missing, shared by every
    /// instance using the same directory).
    #[arg(long, env = "KUBE_STANDIN_CERT_DIR")]
    pub cert_dir: PathBuf,

    /// Extra subject alternative names of the serving certificate (IPs or DNS names).
    /// 127.0.0.1, ::1 and localhost are always included.
    #[arg(long = "san", env = "KUBE_STANDIN_SANS", value_delimiter = ',')]
    pub sans: Vec<String>,

    /// A token: `USER:TOKEN[:RULE[;RULE...]]` with RULE `VERBS/RESOURCES[/NAMESPACES[/NAMES]]`
    /// (comma lists, `*` wildcards). An empty TOKEN is generated. Repeatable.
    #[arg(long = "token")]
    pub tokens: Vec<TokenSpec>,

    /// A JSON file of tokens: `[{"user", "token", "rules": [{"verbs", "resources",
    /// "namespaces", "resourceNames"}]}]`.
    #[arg(long, env = "KUBE_STANDIN_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// Write a kubeconfig for a user's token: `PATH:USER`. Repeatable.
    #[arg(long = "write-kubeconfig")]
    pub write_kubeconfig: Vec<KubeconfigTarget>,

    /// Server URL written into kubeconfigs (default: https://<bound address>).
    #[arg(long, env = "KUBE_STANDIN_KUBECONFIG_SERVER")]
    pub kubeconfig_server: Option<String>,

    /// Addresses of the `default/kubernetes` EndpointSlice, set at start (comma list).
    /// Without it the slice is created with the listen address if it does not exist.
    #[arg(long, env = "KUBE_STANDIN_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<IpAddr>,

    /// Port of the `default/kubernetes` EndpointSlice.
    #[arg(long, env = "KUBE_STANDIN_ENDPOINTS_PORT", default_value_t = 6443)]
    pub endpoints_port: u16,

    /// Namespaces that exist besides default, kube-system, kube-public and kube-node-lease
    /// (objects can only be created in an existing namespace).
    #[arg(long = "namespace", env = "KUBE_STANDIN_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Persist objects and the resourceVersion counter to this file (atomically, after
    /// every change) and continue from it at start.
    #[arg(long, env = "KUBE_STANDIN_STATE")]
    pub state: Option<PathBuf>,

    /// Events kept per resource for watches, continue tokens and exact lists; an older
    /// resourceVersion gets 410.
    #[arg(long, env = "KUBE_STANDIN_HISTORY_SIZE", default_value_t = 100)]
    pub history_size: usize,

    /// Interval of BOOKMARK events on watches that allow them.
    #[arg(long, env = "KUBE_STANDIN_BOOKMARK_INTERVAL", default_value = "60s")]
    pub bookmark_interval: Dur,

    /// Watches without timeoutSeconds end after a random time between this and twice this.
    #[arg(long, env = "KUBE_STANDIN_MIN_REQUEST_TIMEOUT", default_value = "1800s")]
    pub min_request_timeout: Dur,

    /// The shortest `spec.expirationSeconds` a TokenRequest may ask for. kube-apiserver's is
    /// fixed at 10 minutes; tests of token renewal set seconds.
    #[arg(long, env = "KUBE_STANDIN_MIN_TOKEN_DURATION", default_value = "600s")]
    pub min_token_duration: Dur,

    /// gitVersion reported by /version.
    #[arg(long, env = "KUBE_STANDIN_SERVER_VERSION", default_value = "v1.31.4")]
    pub server_version: String,

    /// Refuse `sendInitialEvents` watches, as a server without the WatchList feature does.
    #[arg(long, env = "KUBE_STANDIN_DISABLE_WATCH_LIST")]
    pub disable_watch_list: bool,

    /// On SIGTERM, fail /readyz but keep serving for this long before stopping, like
    /// kube-apiserver's --shutdown-delay-duration.
    #[arg(long, env = "KUBE_STANDIN_SHUTDOWN_DELAY", default_value = "0s")]
    pub shutdown_delay: Dur,

    /// Serve the control endpoint over plain HTTP on this loopback address too (no
    /// authentication). Its bound address is logged as `control listening <addr>`.
    #[arg(long, env = "KUBE_STANDIN_CONTROL_LISTEN")]
    pub control_listen: Option<SocketAddr>,

    /// Fault: /readyz fails (its `shutdown` check), as during an API server's shutdown.
    #[arg(long)]
    pub fail_readyz: bool,

    /// Fault: /livez and /healthz fail (their `etcd` check).
    #[arg(long)]
    pub fail_livez: bool,

    /// Fault: watches send nothing (no events, bookmarks or end) but stay open.
    #[arg(long)]
    pub hang_watches: bool,

    /// Fault: answer this HTTP status (a Status object) instead of serving requests.
    #[arg(long, value_parser = clap::value_parser!(u16).range(400..600))]
    pub error_status: Option<u16>,

    /// Path prefix the error fault applies to.
    #[arg(long, default_value = "/", requires = "error_status")]
    pub error_path_prefix: String,

    /// The error fault applies to this many requests, then stops.
    #[arg(long, requires = "error_status")]
    pub error_count: Option<u64>,

    /// Fault: delay responses by this long.
    #[arg(long)]
    pub delay: Option<Dur>,

    /// Path prefix the delay applies to.
    #[arg(long, default_value = "/", requires = "delay")]
    pub delay_path_prefix: String,

    /// Fault: answer a watch from a too-old resourceVersion with an HTTP 410 instead of a
    /// 200 response carrying an ERROR event (what the API server does).
    #[arg(long, env = "KUBE_STANDIN_WATCH_EXPIRED_AS_HTTP")]
    pub watch_expired_as_http: bool,

    /// Faults as JSON, in the control endpoint's format (applied after the fault flags).
    #[arg(long)]
    pub faults: Option<String>,

    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, env = "KUBE_STANDIN_LOG", default_value = "info")]
    pub log: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("500ms".parse::<Dur>().unwrap().0, Duration::from_millis(500));
        assert_eq!("2".parse::<Dur>().unwrap().0, Duration::from_secs(2));
        assert_eq!("5m".parse::<Dur>().unwrap().0, Duration::from_secs(300));
        assert!("5d".parse::<Dur>().unwrap_err().contains("unknown unit \"d\""));
        assert!("ms".parse::<Dur>().unwrap_err().contains("expected a number"));
    }

    #[test]
    fn kubeconfig_targets_and_flags() {
        let t: KubeconfigTarget = "/tmp/a:b/kc:admin".parse().unwrap();
        assert_eq!(t.path, PathBuf::from("/tmp/a:b/kc"));
        assert_eq!(t.user, "admin");
        assert!("nouser".parse::<KubeconfigTarget>().unwrap_err().contains("expected PATH:USER"));
        let cli = Cli::try_parse_from([
            "kube-standin",
            "--cert-dir",
            "/tmp/x",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "admin:t:*/*",
            "--endpoints",
            "10.0.0.11,10.0.0.12",
            "--error-status",
            "503",
        ])
        .unwrap();
        assert_eq!(cli.endpoints.len(), 2);
        assert_eq!(cli.tokens[0].user, "admin");
        let err = Cli::try_parse_from(["kube-standin", "--cert-dir", "x", "--error-status", "200"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{err}");
        assert!(err.to_string().contains("--error-status"), "{err}");
    }
}
