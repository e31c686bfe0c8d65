//! `cpha status`: the forward installed in the kernel, read back from nftables/iptables.

use serde::Serialize;

use crate::forward::{self, conntrack, Installed, InstalledState};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON for machines instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Status {
    forwards: Vec<ForwardStatus>,
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
    let status = Status { forwards };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_text(&status));
    }
    Ok(())
}

fn render_text(status: &Status) -> String {
    if status.forwards.is_empty() {
        return "no forward installed (nftables and iptables checked)\n".to_string();
    }
    let mut out = String::new();
    for f in &status.forwards {
        let i = &f.installed;
        let state = match i.state {
            InstalledState::Forwarding => "forwarding",
            InstalledState::Draining => "draining (forwarding rules removed; table kept while connections close)",
        };
        out.push_str(&format!("backend  {}\nstate    {state}\nlisten   {}\n", i.backend, i.listen));
        if !i.targets.is_empty() {
            out.push_str(&format!("targets  {}\n", super::forward::join(&i.targets)));
        }
        if let Some(n) = f.open_connections {
            out.push_str(&format!("open     {n} forwarded connection(s)\n"));
        }
    }
    out
}
