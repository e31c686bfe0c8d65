//! `cpha run`: the agent (see `crate::agent`).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::agent::endpoint::Topology;
use crate::forward::{Endpoint, Mode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopologyArg {
    Retarget,
    Release,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Signals: SIGHUP re-reads the configuration (an invalid one is refused and the running one kept), \
SIGUSR1 forces a resync of HAProxy and the forward, SIGTERM/SIGINT stop the agent (forward.onShutdown says whether the \
forward stays). Under systemd (Type=notify) READY=1 is sent once the endpoint answers through the forward."
)]
pub struct Args {
    /// The agent's configuration file (YAML).
    #[arg(long, env = "CPHA_CONFIG", default_value = "/etc/cpha/config.yaml")]
    pub config: PathBuf,

    /// Overrides endpoint.listen.
    #[arg(long, env = "CPHA_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<Endpoint>,

    /// Overrides endpoint.topology.
    #[arg(long, env = "CPHA_TOPOLOGY", value_enum)]
    pub topology: Option<TopologyArg>,

    /// Overrides endpoint.haproxyBind.
    #[arg(long, env = "CPHA_HAPROXY_BIND", value_name = "ADDR:PORT")]
    pub haproxy_bind: Option<Endpoint>,

    /// Overrides forward.mode.
    #[arg(long, env = "CPHA_FORWARD_MODE", value_enum)]
    pub forward_mode: Option<Mode>,

    /// Overrides agent.statusListen (metrics, health and status port).
    #[arg(long, env = "CPHA_STATUS_LISTEN", value_name = "ADDR:PORT")]
    pub status_listen: Option<SocketAddr>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::agent::run(options(args))
}

pub fn options(args: Args) -> crate::agent::Options {
    let Args { config, listen, topology, haproxy_bind, forward_mode, status_listen } = args;
    crate::agent::Options {
        config,
        overrides: Box::new(move |c| {
            if let Some(l) = listen {
                c.endpoint.listen = l;
            }
            if let Some(t) = topology {
                c.endpoint.topology = match t {
                    TopologyArg::Retarget => Topology::Retarget,
                    TopologyArg::Release => Topology::Release,
                };
            }
            if let Some(h) = haproxy_bind {
                c.endpoint.haproxy_bind = Some(h);
            }
            if let Some(m) = forward_mode {
                c.forward.mode = m;
            }
            if let Some(s) = status_listen {
                c.agent.status_listen = s;
            }
        }),
    }
}
