//! `cpha members`: the member set resolved from the configured source, once or as a stream.
//!
//! The configuration file is the agent's own: its `members:` and `kubernetes:` sections are the
//! ones `cpha run` uses, and the other sections are left to the commands that own them. Flags
//! and environment variables override the file. [`MembersFlags`] and [`KubeFlags`] are meant to
//! be flattened into `cpha run` as well, so a drop-in sets the same variables for both.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::exit::{self, Coded};
use crate::kube::{KubeSettings, KubernetesConfig};
use crate::members::source::settings::{ConfigMapConfig, EndpointSliceConfig, FileConfig};
use crate::members::source::{self, MembersConfig, MembersSettings, Origin, SourceKind, Update};
use crate::members::MemberSet;
use crate::metrics::Metrics;

#[derive(Debug, clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Without --watch, waits for the configured source (up to --timeout), prints its members one \
per line and exits: 0 with a set, 1 when the source refused the list or has none, 69 when it could not be read \
in time. With --watch, prints one line per event until SIGINT or SIGTERM: `accepted ORIGIN MEMBERS` (ORIGIN is \
cache, seed or the source), `rejected SOURCE: REASON`, `problem SOURCE KIND: MESSAGE`. The state file is read \
and written as `cpha run` does."
)]
pub struct Args {
    /// Change the member ConfigMap instead of reading the source.
    #[command(subcommand)]
    pub edit: Option<super::members_edit::EditCommand>,

    /// The agent's configuration file (YAML); its members: and kubernetes: sections are read.
    #[arg(long, env = "CPHA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print every accepted set, rejected update and problem as it arrives, until interrupted.
    #[arg(long)]
    pub watch: bool,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,

    /// Without --watch: how long to wait for the source.
    #[arg(long, value_parser = crate::units::parse_duration, default_value = "30s")]
    pub timeout: Duration,

    #[command(flatten)]
    pub members: MembersFlags,

    #[command(flatten)]
    pub kube: KubeFlags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    /// One JSON object per line.
    Json,
}

/// Overrides of the `members:` section.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MembersFlags {
    /// Where the member list comes from [default: endpointSlice].
    #[arg(long = "source", env = "CPHA_MEMBERS_SOURCE", value_parser = super::source_parser())]
    pub source: Option<SourceKind>,

    /// ConfigMap holding the list, as NAMESPACE/NAME [default: kube-system/cpha-members].
    #[arg(long = "configmap", env = "CPHA_MEMBERS_CONFIGMAP", value_name = "NAMESPACE/NAME")]
    pub configmap: Option<ObjectRef>,

    /// Key of the ConfigMap holding the list [default: members].
    #[arg(long = "configmap-key", env = "CPHA_MEMBERS_CONFIGMAP_KEY", value_name = "KEY")]
    pub configmap_key: Option<String>,

    /// EndpointSlice whose addresses are the members, as NAMESPACE/NAME [default: default/kubernetes].
    #[arg(long = "endpointslice", env = "CPHA_MEMBERS_ENDPOINTSLICE", value_name = "NAMESPACE/NAME")]
    pub endpointslice: Option<ObjectRef>,

    /// File holding the list (source file).
    #[arg(long = "members-file", env = "CPHA_MEMBERS_FILE", value_name = "PATH")]
    pub file: Option<PathBuf>,

    /// Members (source static), or the seed used at start when the state file holds no set;
    /// repeat or separate with commas.
    #[arg(long = "static", env = "CPHA_MEMBERS_STATIC", value_name = "MEMBER", value_delimiter = ',')]
    pub static_members: Vec<String>,

    /// Port of members written without one [default: 6443].
    #[arg(long = "default-port", env = "CPHA_MEMBERS_DEFAULT_PORT", value_name = "PORT")]
    pub default_port: Option<u16>,

    /// Most members a list may hold [default: 32].
    #[arg(long = "max-members", env = "CPHA_MEMBERS_MAX", value_name = "N")]
    pub max_members: Option<usize>,

    /// Accept an empty list [default: false].
    #[arg(long = "allow-empty", env = "CPHA_MEMBERS_ALLOW_EMPTY", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_empty: Option<bool>,

    /// Where the last good set is kept; empty for none [default: /var/lib/cpha/members.json].
    #[arg(long = "state-file", env = "CPHA_MEMBERS_STATE_FILE", value_name = "PATH", value_parser = path_or_empty)]
    pub state_file: Option<PathBuf>,
}

/// Overrides of the `kubernetes:` section.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KubeFlags {
    /// Kubeconfig files tried in order; repeat or separate with commas
    /// [default: /etc/kubernetes/admin.conf,/etc/kubernetes/super-admin.conf].
    #[arg(long = "kubeconfig", env = "CPHA_KUBECONFIG", value_name = "PATH", value_delimiter = ',')]
    pub kubeconfig: Vec<PathBuf>,

    /// Use the pod's service account [default: false].
    #[arg(long = "in-cluster", env = "CPHA_KUBE_IN_CLUSTER", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub in_cluster: Option<bool>,

    /// Where the service account is mounted, with --in-cluster
    /// [default: /var/run/secrets/kubernetes.io/serviceaccount].
    #[arg(long = "service-account-dir", env = "CPHA_KUBE_SERVICE_ACCOUNT_DIR", value_name = "PATH")]
    pub service_account_dir: Option<PathBuf>,

    /// API server URL: with a token file and a CA file the whole credential, else it replaces the
    /// kubeconfig's server.
    #[arg(long = "kube-server", env = "CPHA_KUBE_SERVER", value_name = "URL")]
    pub server: Option<String>,

    /// CA bundle of the API server (with --kube-token-file).
    #[arg(long = "kube-ca-file", env = "CPHA_KUBE_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// Bearer token file, read again whenever it changes.
    #[arg(long = "kube-token-file", env = "CPHA_KUBE_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Wait for missing credentials instead of failing [default: true].
    #[arg(long = "wait-for-credentials", env = "CPHA_KUBE_WAIT_FOR_CREDENTIALS", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub wait_for_credentials: Option<bool>,

    /// How often missing credentials are looked for [default: 2s].
    #[arg(long = "kube-poll-interval", env = "CPHA_KUBE_POLL_INTERVAL", value_name = "DURATION",
          value_parser = crate::units::parse_duration)]
    pub poll_interval: Option<Duration>,

    /// Talk to the known members directly before the configured server [default: true].
    #[arg(long = "direct-to-members", env = "CPHA_KUBE_DIRECT_TO_MEMBERS", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub direct_to_members: Option<bool>,

    /// Server-side timeout of each watch request [default: 30s].
    #[arg(long = "kube-watch-timeout", env = "CPHA_KUBE_WATCH_TIMEOUT", value_name = "DURATION",
          value_parser = crate::units::parse_duration)]
    pub watch_timeout: Option<Duration>,

    /// Connect timeout per API server [default: 5s].
    #[arg(long = "kube-connect-timeout", env = "CPHA_KUBE_CONNECT_TIMEOUT", value_name = "DURATION",
          value_parser = crate::units::parse_duration)]
    pub connect_timeout: Option<Duration>,
}

/// A path, where an empty one means "none" (clap's path parser refuses empty values).
fn path_or_empty(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// `NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl FromStr for ObjectRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ObjectRef { namespace: ns.to_owned(), name: name.to_owned() })
            }
            _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
        }
    }
}

impl MembersFlags {
    /// The flags as a `members:` section, to merge over the file's.
    pub fn to_config(&self) -> MembersConfig {
        let (cm_ns, cm_name) = split(&self.configmap);
        let (es_ns, es_name) = split(&self.endpointslice);
        MembersConfig {
            source: self.source,
            config_map: ConfigMapConfig { namespace: cm_ns, name: cm_name, key: self.configmap_key.clone() },
            endpoint_slice: EndpointSliceConfig { namespace: es_ns, name: es_name, port_name: None },
            file: FileConfig { path: self.file.clone(), ..FileConfig::default() },
            static_members: (!self.static_members.is_empty()).then(|| self.static_members.clone()),
            default_port: self.default_port,
            max_members: self.max_members,
            allow_empty: self.allow_empty,
            state_file: self.state_file.clone(),
            drift: Default::default(),
        }
    }
}

fn split(r: &Option<ObjectRef>) -> (Option<String>, Option<String>) {
    match r {
        Some(r) => (Some(r.namespace.clone()), Some(r.name.clone())),
        None => (None, None),
    }
}

impl KubeFlags {
    /// The flags as a `kubernetes:` section, to merge over the file's.
    pub fn to_config(&self) -> KubernetesConfig {
        KubernetesConfig {
            kubeconfig: (!self.kubeconfig.is_empty()).then(|| self.kubeconfig.clone()),
            in_cluster: self.in_cluster,
            service_account_dir: self.service_account_dir.clone(),
            server: self.server.clone(),
            ca_file: self.ca_file.clone(),
            token_file: self.token_file.clone(),
            wait_for_credentials: self.wait_for_credentials,
            poll_interval: self.poll_interval,
            direct_to_members: self.direct_to_members,
            watch_timeout: self.watch_timeout,
            connect_timeout: self.connect_timeout,
        }
    }
}

/// The `members:` and `kubernetes:` sections of the agent's configuration; the other
/// sections are skipped.
#[derive(Debug, Default, Deserialize)]
pub struct MemberSections {
    #[serde(default)]
    pub members: MembersConfig,
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    #[serde(flatten)]
    other: BTreeMap<String, serde::de::IgnoredAny>,
}

impl MemberSections {
    /// Reads the sections from the agent's configuration text.
    pub fn parse(text: &str) -> Result<MemberSections, crate::yaml::YamlError> {
        if text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            return Ok(MemberSections::default());
        }
        crate::yaml::from_str(text)
    }

    /// Top-level keys that belong to no known section.
    pub fn unknown_sections(&self) -> Vec<&str> {
        // The agent's own list of sections: a typo of `members:` would otherwise go unseen.
        self.other.keys().map(String::as_str).filter(|k| !crate::config::SECTIONS.contains(k)).collect()
    }
}

/// The validated settings from the file (if any) with the flags over it; errors exit 78.
pub fn resolve(
    config: Option<&Path>,
    members: &MembersFlags,
    kube: &KubeFlags,
) -> anyhow::Result<(MembersSettings, KubeSettings)> {
    let sections = match config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| Coded::config(format!("reading {}: {e}", path.display())))?;
            let sections =
                MemberSections::parse(&text).map_err(|e| Coded::config(format!("{}: {e}", path.display())))?;
            for key in sections.unknown_sections() {
                tracing::warn!("{}: ignoring unknown top-level key {key:?}", path.display());
            }
            sections
        }
        None => MemberSections::default(),
    };
    let members = sections.members.merge(members.to_config()).resolve().map_err(|e| Coded::config(e.to_string()))?;
    let kube = sections.kubernetes.merge(kube.to_config()).resolve().map_err(|e| Coded::config(e.to_string()))?;
    Ok((members, kube))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(edit) = args.edit {
        return super::members_edit::run(edit);
    }
    let (members, kube) = resolve(args.config.as_deref(), &args.members, &args.kube)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(&args, &members, &kube))
}

async fn run_async(args: &Args, members: &MembersSettings, kube: &KubeSettings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    match crate::signals::listen() {
        Ok(signals) => {
            tokio::spawn(crate::signals::stop_then_abort(signals, shutdown.clone(), CancellationToken::new()));
        }
        Err(err) => tracing::error!("cannot handle SIGTERM/SIGINT: {err}"),
    }
    let (tx, mut rx) = mpsc::channel(16);
    let metrics = Arc::new(Metrics::default());
    // Nobody publishes members here besides the pipeline itself.
    let (_, known) = tokio::sync::watch::channel(MemberSet::new());
    let pipeline = source::run(members.clone(), kube.clone(), metrics, tx, known, shutdown.clone());
    tokio::pin!(pipeline);
    let deadline = tokio::time::sleep(args.timeout);
    tokio::pin!(deadline);
    let source_name = members.source_name();
    let mut last_problem: Option<String> = None;
    let mut out = Printer { output: args.output };
    loop {
        tokio::select! {
            result = &mut pipeline => return result,
            update = rx.recv() => {
                let Some(update) = update else { return Ok(()) };
                if args.watch {
                    if out.event(&update).is_err() {
                        shutdown.cancel();
                    }
                    continue;
                }
                match update {
                    Update::Accepted { set, origin } if origin.is_live() => {
                        shutdown.cancel();
                        out.set(&set, origin).context("writing to stdout")?;
                        return Ok(());
                    }
                    Update::Accepted { set, origin } => {
                        tracing::info!("{origin} holds {set}; waiting for {source_name}");
                    }
                    Update::Rejected { source, reason } => {
                        anyhow::bail!("{source} refused the member list: {reason}");
                    }
                    Update::Problem { source, kind: source::ProblemKind::Missing, message } => {
                        anyhow::bail!("{source} holds no member list: {message}");
                    }
                    Update::Problem { message, .. } => last_problem = Some(message),
                }
            }
            () = &mut deadline, if !args.watch => {
                shutdown.cancel();
                let why = last_problem.map(|p| format!(": {p}")).unwrap_or_default();
                return Err(Coded {
                    code: exit::UNAVAILABLE,
                    message: format!("no member set from {source_name} within {}{why}", humantime::format_duration(args.timeout)),
                }
                .into());
            }
        }
    }
}

/// Writes updates to stdout, one line each.
struct Printer {
    output: Output,
}

impl Printer {
    fn event(&mut self, update: &Update) -> std::io::Result<()> {
        let line = match (self.output, update) {
            (Output::Text, Update::Accepted { set, origin }) => format!("accepted {origin} {}", text_set(set)),
            (Output::Text, Update::Rejected { source, reason }) => format!("rejected {source}: {reason}"),
            (Output::Text, Update::Problem { source, kind, message }) => {
                format!("problem {source} {}: {message}", kind.as_str())
            }
            (Output::Json, Update::Accepted { set, origin }) => accepted_json(set, *origin).to_string(),
            (Output::Json, Update::Rejected { source, reason }) => {
                serde_json::json!({"event": "rejected", "source": source, "reason": reason}).to_string()
            }
            (Output::Json, Update::Problem { source, kind, message }) => serde_json::json!({
                "event": "problem", "source": source, "kind": kind.as_str(), "message": message
            })
            .to_string(),
        };
        writeln!(std::io::stdout().lock(), "{line}")
    }

    fn set(&mut self, set: &MemberSet, origin: Origin) -> std::io::Result<()> {
        let mut stdout = std::io::stdout().lock();
        match self.output {
            Output::Text => set.iter().try_for_each(|m| writeln!(stdout, "{m}")),
            Output::Json => writeln!(stdout, "{}", accepted_json(set, origin)),
        }
    }
}

fn text_set(set: &MemberSet) -> String {
    if set.is_empty() {
        "(none)".into()
    } else {
        set.to_string()
    }
}

fn accepted_json(set: &MemberSet, origin: Origin) -> serde_json::Value {
    serde_json::json!({"event": "accepted", "origin": origin.to_string(), "members": set})
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::cli::{Cli, Command};
    use crate::members::source::SourceSettings;

    fn args(argv: &[&str]) -> Args {
        let cli = Cli::try_parse_from(["cpha", "members"].iter().chain(argv)).unwrap();
        let Command::Members(args) = cli.command else { panic!("not members") };
        *args
    }

    #[test]
    fn sections_skip_the_rest_of_the_agent_config() {
        let text = "endpoint: {address: 10.0.0.10:6443}\nhaproxy:\n  socket: /run/haproxy.sock\nmembr: {}\n\
                    agent: {events: false}\nmembers:\n  source: static\n  static: [10.0.0.11]\nkubernetes:\n  directToMembers: false\n";
        let s = MemberSections::parse(text).unwrap();
        assert_eq!(s.unknown_sections(), ["membr"]);
        assert_eq!(s.members.source, Some(SourceKind::Static));
        assert_eq!(s.kubernetes.direct_to_members, Some(false));
        assert!(MemberSections::parse("# nothing yet\n").unwrap().members.source.is_none());
        let e = MemberSections::parse("members:\n  sorce: file\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `sorce`"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("cpha-cli-members-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cpha.yaml");
        std::fs::write(
            &path,
            "members:\n  source: configMap\n  configMap: {name: from-file}\n  maxMembers: 4\n\
             kubernetes:\n  kubeconfig: [/etc/a.conf]\n",
        )
        .unwrap();
        let a = args(&[
            "--config",
            path.to_str().unwrap(),
            "--configmap",
            "team/from-flag",
            "--kubeconfig",
            "/x.conf,/y.conf",
            "--direct-to-members=false",
            "--state-file",
            "",
        ]);
        let (m, k) = resolve(a.config.as_deref(), &a.members, &a.kube).unwrap();
        assert_eq!(
            m.source,
            SourceSettings::ConfigMap { namespace: "team".into(), name: "from-flag".into(), key: "members".into() }
        );
        assert_eq!(m.parse.max_members, 4);
        assert_eq!(m.state_file, None);
        assert_eq!(k.credentials, crate::kube::Credentials::Kubeconfig(vec!["/x.conf".into(), "/y.conf".into()]));
        assert!(!k.direct_to_members);

        std::fs::write(&path, "members:\n  source: nowhere\n").unwrap();
        let err = resolve(Some(&path), &MembersFlags::default(), &KubeFlags::default()).unwrap_err();
        assert_eq!(exit::code_for(&err), exit::CONFIG, "{err:#}");
        let err =
            resolve(Some(&dir.join("missing.yaml")), &MembersFlags::default(), &KubeFlags::default()).unwrap_err();
        assert_eq!(exit::code_for(&err), exit::CONFIG);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn watch_and_output_flags() {
        let a = args(&["--watch", "--output", "json", "--source", "static", "--static", "10.0.0.1,10.0.0.2"]);
        assert!(a.watch);
        assert_eq!(a.output, Output::Json);
        assert_eq!(a.members.static_members, ["10.0.0.1", "10.0.0.2"]);
        for bad in ["kube-system", "a/b/c"] {
            let err = bad.parse::<ObjectRef>().unwrap_err();
            assert!(err.contains("is not NAMESPACE/NAME"), "{bad:?}: {err}");
        }
    }
}
