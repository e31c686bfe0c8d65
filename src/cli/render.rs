//! `cpha render`: print the haproxy.cfg cpha would write, for a given member set.

use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use crate::exit::Coded;
use crate::haproxy::{resolve, Haproxy, RenderInput};
use crate::members::source::SourceSettings;
use crate::members::{self, MemberSet};
use crate::metrics::Metrics;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: super::ConfigArgs,

    /// Members to render, written as in the ConfigMap (`10.0.0.11:6443, cp2=10.0.0.12`). Default: the
    /// configuration's static members, else the last good set in the state file (check-config
    /// then falls back to a sample set of three).
    #[arg(long, value_name = "LIST")]
    pub members: Option<String>,

    /// Print keepalived.conf (the `vip:` section, placed on this host) instead of haproxy.cfg.
    #[arg(long)]
    pub keepalived: bool,

    /// Place the virtual IP as if this host had ADDRESS/PREFIX instead of on one of its own
    /// addresses: renders or checks a host's configuration on another machine
    /// (`--host-address 192.0.2.11/24` for the shipped examples). The interface is vip.interface,
    /// else one of this machine's, which `keepalived --config-test` needs to exist.
    #[arg(long, value_name = "ADDRESS/PREFIX")]
    pub host_address: Option<HostAddress>,
}

/// `--host-address`: an address of the host a configuration is for, with its subnet's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAddress {
    pub address: std::net::IpAddr,
    pub prefix_len: u8,
}

impl std::str::FromStr for HostAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = s.split_once('/').ok_or("write it as ADDRESS/PREFIX, e.g. 192.0.2.11/24")?;
        let address: std::net::IpAddr = address.parse().map_err(|e| format!("{address}: {e}"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        match prefix.parse::<u8>() {
            Ok(prefix_len) if prefix_len <= max => Ok(HostAddress { address, prefix_len }),
            _ => Err(format!("prefix {prefix}: a number from 0 to {max}")),
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let members = members_for(&config, args.members.as_deref())?;
    if args.keepalived {
        print!("{}", render_keepalived(&config, &members, args.host_address)?.1);
    } else {
        print!("{}", render(&config, &members)?);
    }
    Ok(())
}

/// keepalived.conf for `members` on this host (or on the host with `host`'s address): the VIP
/// placed, the members (as IP addresses) made unicast peers.
pub fn render_keepalived(
    config: &Config,
    members: &MemberSet,
    host: Option<HostAddress>,
) -> anyhow::Result<(crate::vip::place::Placement, String)> {
    let Some(vip) = &config.vip else {
        return Err(Coded::usage("the configuration has no vip: section").into());
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    let resolved = runtime.block_on(resolve::resolve(members, &Default::default(), config.haproxy.runtime_timeout));
    let ips: Vec<_> = resolved.servers.iter().map(|s| s.addr.ip()).collect();
    let Some(host) = host else {
        return crate::vip::render_for(vip, &ips).map_err(|e| Coded::config(e).into());
    };
    let given = crate::vip::place::IfAddr {
        interface: vip.interface.clone().or_else(crate::vip::place::an_interface).unwrap_or_else(|| "eth0".to_string()),
        address: host.address,
        prefix_len: host.prefix_len,
    };
    let placement = crate::vip::place::locate_in(vip, &[given])
        .map_err(|e| Coded::usage(format!("--host-address {}/{}: {e}", host.address, host.prefix_len)))?;
    crate::vip::render_placed(vip, &ips, placement).map_err(|e| Coded::config(e).into())
}

/// The member set to render: given on the command line, or known from the configuration.
pub fn members_for(config: &Config, given: Option<&str>) -> anyhow::Result<MemberSet> {
    if let Some(text) = given {
        return members::parse(text, &config.members.parse).map_err(|e| Coded::usage(format!("--members: {e}")).into());
    }
    if let SourceSettings::Static(set) = &config.members.source {
        return Ok(set.clone());
    }
    if let Some(seed) = &config.members.seed {
        return Ok(seed.clone());
    }
    if let Some(path) = &config.members.state_file {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
        if let Ok(Some(set)) = runtime.block_on(crate::members::source::state::load(path, &config.members.parse)) {
            return Ok(set);
        }
    }
    Err(Coded::usage("no members to render: give --members, or members.static in the configuration").into())
}

/// Renders haproxy.cfg for `members` with the configuration's HAProxy settings, the members
/// resolved as the agent resolves them.
pub fn render(config: &Config, members: &MemberSet) -> anyhow::Result<String> {
    let haproxy = Haproxy::new(config.haproxy.clone(), Arc::new(Metrics::default()))
        .map_err(|e| Coded::config(format!("haproxy: {e}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    let resolved = runtime.block_on(resolve::resolve(members, &Default::default(), config.haproxy.runtime_timeout));
    for u in &resolved.unresolved {
        tracing::warn!("{u}");
    }
    let input = RenderInput { servers: &resolved.servers, bind: config.haproxy_bind() };
    let rendered = haproxy.render(&input).map_err(|e| Coded::config(format!("haproxy.cfg: {e}")))?;
    Ok(rendered.text)
}
