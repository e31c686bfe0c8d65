//! The command line: one file per subcommand, each with its own `Args` and `run`.
//! Every flag a systemd drop-in or a DaemonSet may set also reads an environment variable.

pub mod check_config;
pub mod cleanup;
pub mod forward;
pub mod members;
pub mod render;
pub mod run;
pub mod status;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// The release and the commit it was built from (build.rs; `unknown` without git).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CPHA_COMMIT"), ")");

/// The commit alone, for `cpha_build_info`.
pub const COMMIT: &str = env!("CPHA_COMMIT");

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Forward the control-plane endpoint to apiservers (installs kernel rules and exits, or runs a userspace proxy).
    Forward(forward::Args),
    /// Remove every forward cpha installed in the kernel, letting open connections finish.
    Cleanup(cleanup::Args),
    /// Show the forward installed in the kernel, read back from nftables/iptables.
    Status(status::Args),
    /// Print the control-plane member set resolved from the configured source (--watch: every update).
    Members(Box<members::Args>),
    /// Run the agent: forward, keep HAProxy in step with the members, hand over (see `cpha run --help`).
    Run(run::Args),
    /// Print the haproxy.cfg cpha would write for a member set.
    Render(render::Args),
    /// Validate a configuration and the haproxy.cfg it renders (haproxy -c), touching nothing.
    CheckConfig(check_config::Args),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Forward(args) => forward::run(args),
            Command::Cleanup(args) => cleanup::run(args),
            Command::Status(args) => status::run(args),
            Command::Members(args) => members::run(*args),
            Command::Run(args) => run::run(args),
            Command::Render(args) => render::run(args),
            Command::CheckConfig(args) => check_config::run(args),
        }
    }
}

/// Parses durations such as `30s`, `500ms`, `2m`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s, 500ms or 2m: {e}"))
}

/// `1048576`, `1024K` or `1M`; at most 64 MiB, which no LAN round trip needs.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1 << 10),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 1 << 20),
            None => (s, 1),
        },
    };
    let n: usize =
        digits.parse().map_err(|_| format!("{s:?} is not a size: use bytes, or a number followed by K or M"))?;
    match n.checked_mul(unit) {
        Some(bytes) if bytes <= 64 << 20 => Ok(bytes),
        _ => Err(format!("{s} is more than 64M")),
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
        assert_eq!(args.drain_timeout, Duration::from_secs(30));
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
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("65M").unwrap_err().contains("more than 64M"));
        assert!(parse_size("-1").unwrap_err().contains("not a size"));
        assert!(parse_size("18446744073709551615K").unwrap_err().contains("more than 64M"));
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
