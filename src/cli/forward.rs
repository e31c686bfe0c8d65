//! `cpha forward`: install the bootstrap forward.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::exit::Coded;
use crate::forward::{self, userspace, Change, Chosen, Endpoint, ForwardSpec, Mode};
use crate::notify;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Kernel modes (nftables, iptables) install the forward and exit 0; the rules stay until `cpha cleanup`. \
Running the same command again changes nothing; another --to retargets new connections in one transaction while established ones keep flowing. \
With several --to, kernel modes spread new connections round-robin without health checks; the userspace proxy skips a target that refuses. \
The userspace mode runs in the foreground until SIGTERM/SIGINT and tells systemd READY=1 once listening."
)]
pub struct Args {
    /// Load-balancer address:port to forward, e.g. 10.0.0.10:6443 or [fd00::10]:6443; 0.0.0.0:PORT or [::]:PORT means any local address.
    #[arg(long, env = "CPHA_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Endpoint,

    /// Apiserver address:port to send connections to; repeat or separate with commas for several.
    #[arg(long, env = "CPHA_TO", value_name = "ADDR:PORT", value_delimiter = ',', required = true)]
    pub to: Vec<Endpoint>,

    /// How to forward.
    #[arg(long, env = "CPHA_FORWARD_MODE", value_parser = super::mode_parser(), default_value = "auto")]
    pub mode: Mode,

    /// Userspace: share the port with another SO_REUSEPORT listener (HAProxy during a handover).
    #[arg(long, env = "CPHA_REUSE_PORT")]
    pub reuse_port: bool,

    /// Userspace: longest wait for open connections after SIGTERM before they are closed.
    #[arg(long, env = "CPHA_DRAIN_TIMEOUT", value_parser = crate::units::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,

    /// Userspace: how long to try a target before moving to the next one.
    #[arg(long, env = "CPHA_CONNECT_TIMEOUT", value_parser = crate::units::parse_duration, default_value = "3s")]
    pub connect_timeout: Duration,

    /// Userspace: a fixed send and receive buffer for each socket, in bytes (suffix K or M for KiB or MiB); 0, the default, leaves them to the kernel's autotuning.
    #[arg(long, env = "CPHA_SOCKET_BUFFER", value_name = "BYTES", value_parser = crate::units::parse_size, default_value = "0")]
    pub socket_buffer: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let spec = ForwardSpec::new(args.listen.0, args.to.iter().map(|e| e.0).collect())
        .map_err(|e| Coded::usage(e.to_string()))?;
    match forward::choose(args.mode, &spec)? {
        Chosen::Kernel(backend) => {
            let change = forward::install_kernel(backend, &spec)?;
            let what = match change {
                Change::Unchanged => "already installed, nothing changed",
                Change::Installed => "installed",
                Change::Retargeted => "retargeted",
            };
            tracing::info!(backend = backend.name(), "forward {spec}: {what}");
            Ok(())
        }
        Chosen::Userspace => run_userspace(&args, spec),
    }
}

fn run_userspace(args: &Args, spec: ForwardSpec) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        let config = userspace::Config {
            listen: spec.listen,
            targets: spec.targets.clone(),
            reuse_port: args.reuse_port,
            connect_timeout: args.connect_timeout,
            drain_timeout: args.drain_timeout,
            socket_buffer: (args.socket_buffer > 0).then_some(args.socket_buffer),
        };
        let proxy = userspace::Proxy::bind(config).map_err(|e| match e {
            userspace::UserspaceError::AddrInUse { .. } => anyhow::Error::new(Coded::oserr(e.to_string())),
            other => anyhow::Error::new(other),
        })?;
        let listening = proxy.local_addr();
        // A userspace forward replaces kernel forwards: their DNAT would take the traffic first.
        remove_kernel_forwards();
        let shutdown = CancellationToken::new();
        let aborted = CancellationToken::new();
        match crate::signals::listen() {
            Ok(signals) => {
                tokio::spawn(crate::signals::stop_then_abort(signals, shutdown.clone(), aborted.clone()));
            }
            Err(err) => tracing::error!("cannot install signal handlers ({err}); stop the proxy with SIGKILL"),
        }
        let status = format!("forwarding {listening} to {} (userspace)", join(&spec.targets));
        tracing::info!("{status}");
        // The line tests and scripts wait for before connecting.
        println!("listening {listening}");
        notify::ready(&status);
        let summary = tokio::select! {
            summary = proxy.run(shutdown) => summary?,
            () = aborted.cancelled() => {
                // Dropping the proxy closes the connections it still held.
                anyhow::bail!("stopped by a second signal before open connections finished");
            }
        };
        // The proxy logged its summary; systemd learns that the drain is over.
        notify::stopping(&format!("stopped: {} connections drained, {} aborted", summary.drained, summary.aborted));
        Ok(())
    })
}

fn remove_kernel_forwards() {
    if !crate::sysinfo::has_net_admin() {
        return;
    }
    for backend in forward::kernel_backends() {
        match backend.read() {
            Ok(Some(installed)) => {
                tracing::info!(
                    "removing the {} forward {} replaced by the userspace proxy",
                    backend.name(),
                    installed.listen
                );
                if let Err(err) = backend.remove() {
                    tracing::warn!("could not remove the {} forward: {err:#}", backend.name());
                }
            }
            Ok(None) => {}
            Err(err) => tracing::debug!("{} not checked: {err:#}", backend.name()),
        }
    }
}

pub fn join(targets: &[std::net::SocketAddr]) -> String {
    targets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
