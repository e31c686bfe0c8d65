//! The command line: one file per subcommand, each with its own `Args` and `run`.
//! Every flag a systemd drop-in or a DaemonSet may set also reads an environment variable.

pub mod check_config;
pub mod cleanup;
pub mod forward;
pub mod identity;
pub mod members;
pub mod members_edit;
pub mod render;
pub mod run;
pub mod status;

use clap::{Parser, Subcommand};

pub use crate::build_info::{COMMIT, VERSION};
pub use crate::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "cpha",
    version = VERSION,
    about = "A highly available Kubernetes control-plane endpoint with HAProxy, from the first boot",
    long_about = "cpha makes the control-plane endpoint (LB address:port) answer before any apiserver or \
load balancer exists, by forwarding it to an apiserver (nftables, iptables or a userspace proxy), \
so `kubeadm init --control-plane-endpoint` and `kubeadm join` can use it at once."
)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or EnvFilter directives).
    #[arg(long, global = true, env = "CPHA_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log line format: text (for the journal and terminals) or json (one object per line, for
    /// log pipelines).
    #[arg(long, global = true, env = "CPHA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Forward the control-plane endpoint to apiservers (installs kernel rules and exits, or runs a userspace proxy).
    Forward(forward::Args),
    /// Remove every forward cpha installed in the kernel, letting open connections finish.
    Cleanup(cleanup::Args),
    /// Show the forward installed in the kernel, read back from nftables/iptables.
    Status(status::Args),
    /// Print the control-plane member set resolved from the configured source (--watch: every update);
    /// `members add|remove` edit the member ConfigMap.
    Members(Box<members::Args>),
    /// Create the least-privilege identity of the agent (ServiceAccount, Roles) and write a token for it.
    Identity(Box<identity::Args>),
    /// Run the agent: forward, keep HAProxy in step with the members, hand over (see `cpha run --help`).
    Run(run::Args),
    /// Print the haproxy.cfg cpha would write for a member set.
    Render(render::Args),
    /// Validate a configuration and the haproxy.cfg it renders (haproxy -c), touching nothing.
    CheckConfig(check_config::Args),
}

/// The agent's configuration file and the flags (each with an environment variable) that
/// override it: the same for `run`, `render` and `check-config`, so all three see one set of
/// settings (`crate::config::load`).
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// The agent's configuration file (YAML).
    #[arg(long = "config", env = "CPHA_CONFIG", default_value = "/etc/cpha/config.yaml", value_name = "FILE")]
    pub path: std::path::PathBuf,

    /// Overrides endpoint.listen.
    #[arg(long, env = "CPHA_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<crate::forward::Endpoint>,

    /// Overrides endpoint.topology.
    #[arg(long, env = "CPHA_TOPOLOGY", value_enum)]
    pub topology: Option<TopologyArg>,

    /// Overrides endpoint.haproxyBind.
    #[arg(long, env = "CPHA_HAPROXY_BIND", value_name = "ADDR:PORT")]
    pub haproxy_bind: Option<crate::forward::Endpoint>,

    /// Overrides forward.mode.
    #[arg(long, env = "CPHA_FORWARD_MODE", value_parser = mode_parser())]
    pub forward_mode: Option<crate::forward::Mode>,

    /// Overrides agent.statusListen (metrics, health and status port).
    #[arg(long, env = "CPHA_STATUS_LISTEN", value_name = "ADDR:PORT")]
    pub status_listen: Option<std::net::SocketAddr>,

    /// Refuse a configuration that names a program, template or kubeconfig cpha would run or
    /// load as root (haproxy.binary, haproxy.template, haproxy.reload, kubernetes.kubeconfig,
    /// vip.keepalived.binary/template/reloadCommand): for a file that more people may edit than
    /// may run code as root here, such as the DaemonSet's ConfigMap.
    #[arg(long, env = "CPHA_LOCK_PROGRAMS")]
    pub lock_programs: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopologyArg {
    Retarget,
    Release,
}

/// `--mode`/`--forward-mode`: the names `forward::Mode` reads, listed in `--help`.
pub fn mode_parser() -> impl clap::builder::TypedValueParser<Value = crate::forward::Mode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(crate::forward::Mode::ALL.map(crate::forward::Mode::as_str))
        .map(|s| s.parse().expect("a listed mode"))
}

/// `--source`: the names `members.source` takes.
pub fn source_parser() -> impl clap::builder::TypedValueParser<Value = crate::members::source::SourceKind> {
    use crate::members::source::SourceKind;
    use clap::builder::TypedValueParser;
    let names: Vec<clap::builder::PossibleValue> = SourceKind::ALL
        .iter()
        .map(|k| {
            let lower = match k {
                SourceKind::ConfigMap => "configmap",
                SourceKind::EndpointSlice => "endpointslice",
                SourceKind::File => "file",
                SourceKind::Static => "static",
            };
            clap::builder::PossibleValue::new(k.as_str()).alias(lower)
        })
        .collect();
    clap::builder::PossibleValuesParser::new(names).map(|s| s.parse().expect("a listed source"))
}

impl ConfigArgs {
    pub fn overrides(&self) -> crate::config::Overrides {
        crate::config::Overrides {
            listen: self.listen,
            topology: self.topology.map(|t| match t {
                TopologyArg::Retarget => crate::config::Topology::Retarget,
                TopologyArg::Release => crate::config::Topology::Release,
            }),
            haproxy_bind: self.haproxy_bind,
            forward_mode: self.forward_mode,
            status_listen: self.status_listen,
            lock_programs: self.lock_programs,
        }
    }

    /// The file, the overrides, validated.
    pub fn load(&self) -> anyhow::Result<crate::config::Config> {
        crate::config::load(&self.path, &self.overrides())
    }
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Forward(args) => forward::run(args),
            Command::Cleanup(args) => cleanup::run(args),
            Command::Status(args) => status::run(args),
            Command::Members(args) => members::run(*args),
            Command::Identity(args) => identity::run(*args),
            Command::Run(args) => run::run(args),
            Command::Render(args) => render::run(args),
            Command::CheckConfig(args) => check_config::run(args),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cpha").chain(args.iter().copied()))
    }

    #[test]
    fn forward_arguments() {
        let cli = parse(&[
            "forward",
            "--listen",
            "10.0.0.10:6443",
            "--to",
            "10.0.0.11:6443",
            "--to",
            "[fd00::12]:6443",
            "--mode",
            "userspace",
        ])
        .unwrap();
        let Command::Forward(args) = cli.command else { panic!("not forward") };
        assert_eq!(args.listen.0, "10.0.0.10:6443".parse().unwrap());
        assert_eq!(args.to.len(), 2);
        assert_eq!(args.mode, crate::forward::Mode::Userspace);
        assert_eq!(args.drain_timeout, std::time::Duration::from_secs(30));
        assert_eq!(args.socket_buffer, 0, "autotuning by default");

        let cli = parse(&["forward", "--listen", "0.0.0.0:8443", "--to", "10.0.0.11:6443,10.0.0.12:6443"]).unwrap();
        let Command::Forward(args) = cli.command else { panic!("not forward") };
        assert_eq!(args.to.len(), 2, "comma-separated targets, as CPHA_TO sets them");
        assert_eq!(args.mode, crate::forward::Mode::Auto);
    }

    #[test]
    fn bad_arguments_say_what_is_wrong() {
        let err = parse(&["forward", "--listen", "10.0.0.10", "--to", "10.0.0.11:6443"]).unwrap_err().to_string();
        assert!(err.contains("has no port"), "{err}");
        let err = parse(&["forward", "--listen", "10.0.0.10:6443"]).unwrap_err().to_string();
        assert!(err.contains("--to"), "{err}");
        let err = parse(&["forward", "--listen", "10.0.0.10:6443", "--to", "10.0.0.11:6443", "--mode", "ebpf"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nftables"), "{err}");
        let err = parse(&["cleanup", "--drain-timeout", "soon"]).unwrap_err().to_string();
        assert!(err.contains("not a duration"), "{err}");
        let err = parse(&["forward", "--listen", "10.0.0.10:6443", "--to", "10.0.0.11:6443", "--socket-buffer", "1G"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a size"), "{err}");
    }

    #[test]
    fn log_format_is_global_and_text_by_default() {
        assert_eq!(parse(&["status"]).unwrap().log_format, LogFormat::Text);
        assert_eq!(parse(&["status", "--log-format", "json"]).unwrap().log_format, LogFormat::Json);
        assert_eq!(parse(&["--log-format", "json", "status"]).unwrap().log_format, LogFormat::Json);
        let err = parse(&["status", "--log-format", "yaml"]).unwrap_err().to_string();
        assert!(err.contains("text") && err.contains("json"), "{err}");
    }

    #[test]
    fn version_names_the_release_and_the_commit() {
        assert!(VERSION.starts_with(concat!(env!("CARGO_PKG_VERSION"), " (commit ")), "{VERSION}");
        assert!(!COMMIT.is_empty() && VERSION.ends_with(&format!("{COMMIT})")), "{VERSION}");
    }

    #[test]
    fn cleanup_and_status_arguments() {
        let cli = parse(&["cleanup", "--now"]).unwrap();
        let Command::Cleanup(args) = cli.command else { panic!("not cleanup") };
        assert!(args.now);
        let cli = parse(&["status", "--json"]).unwrap();
        let Command::Status(args) = cli.command else { panic!("not status") };
        assert!(args.json);
    }
}
