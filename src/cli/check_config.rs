//! `cpha check-config`: validate a configuration and the haproxy.cfg it would render
//! (`haproxy -c` on a temporary copy), touching nothing else.
//!
//! NOTE: `haproxy -c` is not a passive parser (HAProxy 2.6 runs `lua-load` code while it
//! checks) and runs as root here: the copies it checks live in a new private directory
//! ([`PrivateDir`]: mode 0700, a random name, files created `O_EXCL|O_NOFOLLOW` 0600), so no
//! other user can read them (the stats password) or swap them before the check (design note
//! 29, docs/design-notes.md#haproxy-check-runs-lua).

use crate::exit::Coded;
use crate::fsutil::PrivateDir;

/// The same flags as `cpha render`.
pub type Args = super::render::Args;

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let members = match super::render::members_for(&config, args.members.as_deref()) {
        Ok(set) => set,
        Err(_) if args.members.is_none() => {
            crate::members::parse("192.0.2.11, 192.0.2.12, 192.0.2.13", &config.members.parse)
                .expect("the sample member set parses")
        }
        Err(err) => return Err(err),
    };
    let text = super::render::render(&config, &members)?;
    let dir = PrivateDir::new("cpha-check-")?;
    let path = dir.write("haproxy.cfg", text.as_bytes())?;
    crate::haproxy::check::check(&config.haproxy, &path)
        .map_err(|e| Coded::config(format!("rendered haproxy.cfg: {e}")))?;
    let vip = match &config.vip {
        Some(vip) => Some(check_keepalived(&config, vip, &members, args.host_address, &dir)?),
        None => None,
    };
    drop(dir);
    println!(
        "{}: valid ({} members source, {} topology, endpoint {}, HAProxy frontend {}; haproxy -c accepts the rendered file)",
        args.config.path.display(),
        config.members.source_name(),
        config.endpoint.topology.as_str(),
        config.endpoint.listen,
        config.haproxy_bind()
    );
    if let Some(line) = vip {
        println!("{line}");
    }
    Ok(())
}

/// Places the VIP on this host and runs `keepalived --config-test` on the keepalived.conf it
/// would write (a temporary copy; nothing of keepalived's is touched).
fn check_keepalived(
    config: &crate::config::Config,
    vip: &crate::vip::VipSettings,
    members: &crate::members::MemberSet,
    host: Option<super::render::HostAddress>,
    dir: &PrivateDir,
) -> anyhow::Result<String> {
    let (place, text) = super::render::render_keepalived(config, members, host)?;
    let path = dir.write("keepalived.conf", text.as_bytes())?;
    crate::vip::keepalived::config_test(&vip.keepalived.binary, &path)
        .map_err(|e| Coded::config(format!("rendered keepalived.conf: {e}")))?;
    Ok(format!(
        "vip {} on {} (this host's address {}/{}): keepalived --config-test accepts the rendered file",
        vip.address, place.interface, place.source, place.prefix_len
    ))
}
