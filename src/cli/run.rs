//! `cpha run`: the agent (see `crate::agent`).

use super::ConfigArgs;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Signals: SIGHUP re-reads the configuration (an invalid one is refused and the running one kept, \
unchanged), SIGUSR1 forces a resync of HAProxy and the forward, SIGTERM/SIGINT stop the agent (forward.onShutdown says \
whether the forward stays; a second signal stops without waiting for the drain). Under systemd (Type=notify) READY=1 \
is sent once the forward (or HAProxy) carries the endpoint and the first HAProxy apply is known."
)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::agent::run(crate::agent::Options { config: args.config.path.clone(), overrides: args.config.overrides() })
}
