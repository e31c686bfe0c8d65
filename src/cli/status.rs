//! `cpha status`: the forward installed in the kernel, read back from nftables/iptables, and
//! the running agent's state from its local status port.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use crate::agent::status::{self as agent_status, AgentStatus};

use crate::forward::{self, conntrack, Installed, InstalledState};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON for machines instead of text.
    #[arg(long)]
    pub json: bool,

    /// The running agent's status port [default: agent.statusListen of --config, else 127.0.0.1:9966].
    #[arg(long, env = "CPHA_STATUS_LISTEN", value_name = "ADDR:PORT")]
    pub agent: Option<SocketAddr>,

    /// The agent's configuration file, read (with the same overrides as `cpha run`) to find its
    /// status port.
    #[arg(long, env = "CPHA_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

/// Where `cpha run` reads its configuration unless told otherwise.
const DEFAULT_CONFIG: &str = "/etc/cpha/config.yaml";

impl Args {
    /// Where the agent's status port is: the flag, else the configuration's, else the default.
    fn agent_addr(&self) -> anyhow::Result<SocketAddr> {
        if let Some(a) = self.agent {
            return Ok(a);
        }
        let default = crate::config::AgentSection::default().status_listen;
        match &self.config {
            Some(path) => Ok(crate::config::load(path, &crate::config::Overrides::default())?.agent.status_listen),
            // The host shape's file, when there is one: `cpha status` finds the agent it runs.
            None => {
                let path = std::path::Path::new(DEFAULT_CONFIG);
                if !path.exists() {
                    return Ok(default);
                }
                match crate::config::load(path, &crate::config::Overrides::default()) {
                    Ok(config) => Ok(config.agent.status_listen),
                    Err(err) => {
                        tracing::warn!("{}: {err:#}; asking {default}", path.display());
                        Ok(default)
                    }
                }
            }
        }
    }
}

#[derive(Debug, Serialize)]
struct Status {
    forwards: Vec<ForwardStatus>,
    /// The running agent's state; null when no agent answers.
    agent: Option<AgentStatus>,
    #[serde(skip)]
    agent_error: Option<String>,
}

#[derive(Debug, Serialize)]
struct ForwardStatus {
    #[serde(flatten)]
    installed: Installed,
    /// Forwarded connections still open, from conntrack (null when it cannot be read).
    open_connections: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let forwards: Vec<ForwardStatus> = forward::read_installed()?
        .into_iter()
        .map(|installed| {
            let open_connections = conntrack::count_forwarded(installed.listen);
            ForwardStatus { installed, open_connections }
        })
        .collect();
    let (agent, agent_error) = match agent_status::fetch(args.agent_addr()?, Duration::from_secs(2)) {
        Ok(a) => (Some(a), None),
        Err(err) => (None, Some(format!("{err:#}"))),
    };
    let status = Status { forwards, agent, agent_error };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_text(&status));
    }
    Ok(())
}

fn render_text(status: &Status) -> String {
    let mut out = String::new();
    match (&status.agent, &status.agent_error) {
        (Some(agent), _) => {
            out.push_str("agent:\n");
            // The agent's strings (errors, names) came from outside: escape what a terminal
            // would act on.
            for line in agent.render_text().lines() {
                out.push_str(&format!("  {}\n", crate::logging::printable(line)));
            }
        }
        (None, Some(err)) => out.push_str(&format!("agent: not running ({})\n", crate::logging::printable(err))),
        (None, None) => {}
    }
    if status.forwards.is_empty() {
        out.push_str("kernel: no forward installed (nftables and iptables checked)\n");
        return out;
    }
    out.push_str("kernel:\n");
    for f in &status.forwards {
        let i = &f.installed;
        let state = match i.state {
            InstalledState::Forwarding => "forwarding",
            InstalledState::Draining => "draining (forwarding rules removed; table kept while connections close)",
        };
        out.push_str(&format!("  backend  {}\n  state    {state}\n  listen   {}\n", i.backend, i.listen));
        if !i.targets.is_empty() {
            out.push_str(&format!("  targets  {}\n", super::forward::join(&i.targets)));
        }
        if let Some(n) = f.open_connections {
            out.push_str(&format!("  open     {n} forwarded connection(s)\n"));
        }
    }
    out
}
