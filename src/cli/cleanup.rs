//! `cpha cleanup`: remove every forward cpha installed in the kernel.

use std::time::Duration;

use crate::forward::{self, Drain};

#[derive(Debug, clap::Args)]
#[command(after_help = "New connections stop being forwarded at once. Connections the forward carries keep flowing: \
cpha keeps its (rule-less) table, with the NAT chains and a conntrack anchor, until conntrack shows them closed or \
--drain-timeout passes, then removes it. --now removes everything at once; open forwarded connections then survive \
only if another NAT user (kube-proxy, for example) keeps the netns NAT hooks registered. A userspace forward is a \
process: stop it with SIGTERM. Exits 0 when there is nothing to remove.")]
pub struct Args {
    /// Longest wait for forwarded connections to close before the table is removed anyway.
    #[arg(long, env = "CPHA_CLEANUP_DRAIN_TIMEOUT", value_parser = crate::units::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,

    /// Remove everything at once, without waiting for forwarded connections.
    #[arg(long)]
    pub now: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let drain =
        Drain { timeout: if args.now { Duration::ZERO } else { args.drain_timeout }, poll: Duration::from_millis(200) };
    let mut removed = 0;
    for backend in forward::kernel_backends() {
        let installed = match backend.read() {
            Ok(installed) => installed,
            Err(err) if forward::is_missing_tool(&err) => {
                tracing::debug!("{} not checked: {err:#}", backend.name());
                continue;
            }
            Err(err) => return Err(err),
        };
        let Some(installed) = installed else { continue };
        let left = forward::kernel::withdraw_and_remove(backend, drain)?;
        removed += 1;
        tracing::info!(backend = backend.name(), listen = %installed.listen, open_at_removal = left, "forward removed");
    }
    if removed == 0 {
        tracing::info!("no forward installed: nothing to remove");
    }
    Ok(())
}
