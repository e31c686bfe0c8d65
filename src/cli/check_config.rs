//! `cpha check-config`: validate a configuration and the haproxy.cfg it would render
//! (`haproxy -c` on a temporary copy), touching nothing else.

use anyhow::Context;

use crate::exit::Coded;

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
    let dir = std::env::temp_dir().join(format!("cpha-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("haproxy.cfg");
    let result = std::fs::write(&path, &text).context("writing the candidate haproxy.cfg").and_then(|()| {
        crate::haproxy::check::check(&config.haproxy, &path)
            .map_err(|e| Coded::config(format!("rendered haproxy.cfg: {e}")).into())
    });
    let vip = match (&result, &config.vip) {
        (Ok(()), Some(vip)) => Some(check_keepalived(&config, vip, &members, args.host_address, &dir)),
        _ => None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let vip = vip.transpose()?;
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
    dir: &std::path::Path,
) -> anyhow::Result<String> {
    let (place, text) = super::render::render_keepalived(config, members, host)?;
    let path = dir.join("keepalived.conf");
    std::fs::write(&path, &text).context("writing the candidate keepalived.conf")?;
    crate::vip::keepalived::config_test(&vip.keepalived.binary, &path)
        .map_err(|e| Coded::config(format!("rendered keepalived.conf: {e}")))?;
    Ok(format!(
        "vip {} on {} (this host's address {}/{}): keepalived --config-test accepts the rendered file",
        vip.address, place.interface, place.source, place.prefix_len
    ))
}
