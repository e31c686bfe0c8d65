//! keepalived.conf from a tera template: the built-in one (`keepalived.conf.tera`) or the
//! operator's. The context holds only parsed values: addresses, numbers, an interface name and
//! paths checked by [`VipSettings::check`]. Unknown variables are errors.

use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;
use tera::Tera;

use super::place::Placement;
use super::settings::VipSettings;
use crate::template::chain;

pub const DEFAULT_TEMPLATE: &str = include_str!("keepalived.conf.tera");

const HEADER: &str = "# Rendered by cpha from its vip settings. Do not edit: cpha rewrites this file.\n";
const NAME: &str = "keepalived.conf";

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read the keepalived.conf template {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the keepalived.conf template {origin} does not parse: {message}")]
    Parse { origin: String, message: String },
    #[error("rendering the keepalived.conf template {origin} failed: {message}")]
    Render { origin: String, message: String },
}

/// A compiled template and where it came from.
#[derive(Debug)]
pub struct Template {
    tera: Tera,
    origin: String,
}

#[derive(Serialize)]
struct Context<'a> {
    vip: VipContext<'a>,
    keepalived: KeepalivedContext<'a>,
}

#[derive(Serialize)]
struct VipContext<'a> {
    address: IpAddr,
    host_prefix: u8,
    subnet_prefix: u8,
    interface: &'a str,
    source: IpAddr,
    peers: &'a [IpAddr],
    virtual_router_id: u32,
    priority: u32,
    advert_interval: String,
    preempt: bool,
    preempt_delay: String,
    degraded_penalty: u32,
    multicast: bool,
}

#[derive(Serialize)]
struct KeepalivedContext<'a> {
    track_file: &'a str,
    notify_fifo: &'a str,
}

impl Template {
    pub fn builtin() -> Template {
        Template::compile(DEFAULT_TEMPLATE, "(built-in)".into()).expect("the built-in template parses")
    }

    pub fn load(path: &Path) -> Result<Template, RenderError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| RenderError::Read { path: path.display().to_string(), source })?;
        Template::compile(&text, path.display().to_string())
    }

    /// The template the settings name, or the built-in one.
    pub fn from_settings(settings: &VipSettings) -> Result<Template, RenderError> {
        match &settings.keepalived.template {
            Some(path) => Template::load(path),
            None => Ok(Template::builtin()),
        }
    }

    pub fn compile(text: &str, origin: String) -> Result<Template, RenderError> {
        let mut tera = Tera::default();
        tera.autoescape_on(vec![]);
        tera.add_raw_template(NAME, text)
            .map_err(|e| RenderError::Parse { origin: origin.clone(), message: chain(&e) })?;
        Ok(Template { tera, origin })
    }

    /// The file for these settings on this host, with these unicast peers.
    pub fn render(&self, s: &VipSettings, place: &Placement, peers: &[IpAddr]) -> Result<String, RenderError> {
        let context = Context {
            vip: VipContext {
                address: s.address,
                host_prefix: if s.address.is_ipv4() { 32 } else { 128 },
                subnet_prefix: place.prefix_len,
                interface: &place.interface,
                source: place.source,
                peers,
                virtual_router_id: s.virtual_router_id,
                priority: s.priority,
                advert_interval: s.advert_seconds(),
                preempt: s.preempt,
                preempt_delay: s.preempt_delay_seconds(),
                degraded_penalty: s.degraded_penalty,
                multicast: s.multicast,
            },
            keepalived: KeepalivedContext {
                // Checked UTF-8 absolute paths with no quote or space (VipSettings::check).
                track_file: s.keepalived.track_file.to_str().unwrap_or_default(),
                notify_fifo: s.keepalived.notify_fifo.to_str().unwrap_or_default(),
            },
        };
        let context = tera::Context::from_serialize(&context)
            .map_err(|e| RenderError::Render { origin: self.origin.clone(), message: chain(&e) })?;
        let body = self
            .tera
            .render(NAME, &context)
            .map_err(|e| RenderError::Render { origin: self.origin.clone(), message: chain(&e) })?;
        let mut text = String::with_capacity(body.len() + HEADER.len() + 1);
        text.push_str(HEADER);
        text.push_str(body.trim_start_matches('\n'));
        if !text.ends_with('\n') {
            text.push('\n');
        }
        Ok(text)
    }
}

/// The unicast peers: the configured list, or the members' addresses; never this host's own
/// addresses or the VIP, only the VIP's family, sorted, each once. Multicast has none.
pub fn peers(s: &VipSettings, members: &[IpAddr], place: &Placement) -> Vec<IpAddr> {
    if s.multicast {
        return Vec::new();
    }
    let from = s.unicast_peers.as_deref().unwrap_or(members);
    let mut out: Vec<IpAddr> = from
        .iter()
        .copied()
        .filter(|p| p.is_ipv4() == s.address.is_ipv4() && *p != s.address && !place.local.contains(p))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn settings() -> VipSettings {
        VipSettings { address: "192.0.2.10".parse().unwrap(), ..VipSettings::default() }
    }

    fn place() -> Placement {
        Placement {
            interface: "eth0".into(),
            prefix_len: 24,
            source: "192.0.2.11".parse().unwrap(),
            local: BTreeSet::from(["192.0.2.11".parse().unwrap(), "127.0.0.1".parse().unwrap()]),
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn peers_are_the_other_members_of_the_vips_family() {
        let members = ips(&["192.0.2.13", "192.0.2.11", "192.0.2.12", "2001:db8::1", "192.0.2.12"]);
        assert_eq!(peers(&settings(), &members, &place()), ips(&["192.0.2.12", "192.0.2.13"]));
        let fixed = VipSettings { unicast_peers: Some(ips(&["192.0.2.21"])), ..settings() };
        assert_eq!(peers(&fixed, &members, &place()), ips(&["192.0.2.21"]));
        let multicast = VipSettings { multicast: true, ..settings() };
        assert!(peers(&multicast, &members, &place()).is_empty());
    }

    #[test]
    fn the_builtin_template_renders_the_parsed_values() {
        let text = Template::builtin().render(&settings(), &place(), &ips(&["192.0.2.12", "192.0.2.13"])).unwrap();
        assert!(text.starts_with(HEADER), "{text}");
        for want in [
            "vrrp_notify_fifo /run/cpha/keepalived.fifo",
            "file \"/run/cpha/vip-health\"",
            "interface eth0",
            "virtual_router_id 51",
            "advert_int 0.40",
            "unicast_src_ip 192.0.2.11",
            "        192.0.2.12\n        192.0.2.13\n",
            "192.0.2.10/32 dev eth0",
        ] {
            assert!(text.contains(want), "{want:?} missing:\n{text}");
        }
        assert!(!text.contains("nopreempt") && !text.contains("preempt_delay"), "{text}");
        let alone = Template::builtin().render(&settings(), &place(), &[]).unwrap();
        assert!(!alone.contains("unicast_peer"), "{alone}");
        let s = VipSettings { preempt: false, ..settings() };
        assert!(Template::builtin().render(&s, &place(), &[]).unwrap().contains("    nopreempt\n"));
    }

    #[test]
    fn an_ipv6_vip_is_held_as_a_host_address_with_v6_peers() {
        let s = VipSettings { address: "2001:db8::10".parse().unwrap(), ..VipSettings::default() };
        let place = Placement {
            interface: "eth0".into(),
            prefix_len: 64,
            source: "2001:db8::11".parse().unwrap(),
            local: BTreeSet::from(["2001:db8::11".parse().unwrap()]),
        };
        let members = ips(&["2001:db8::11", "2001:db8::12", "192.0.2.12"]);
        let p = peers(&s, &members, &place);
        assert_eq!(p, ips(&["2001:db8::12"]));
        let text = Template::builtin().render(&s, &place, &p).unwrap();
        assert!(text.contains("2001:db8::10/128 dev eth0"), "{text}");
        assert!(text.contains("unicast_src_ip 2001:db8::11"), "{text}");
    }

    #[test]
    fn a_template_with_an_unknown_variable_is_an_error() {
        let t = Template::compile("{{ vip.nothing }}", "test".into()).unwrap();
        let err = t.render(&settings(), &place(), &[]).unwrap_err().to_string();
        assert!(err.contains("rendering the keepalived.conf template test failed"), "{err}");
        let refused = Template::compile("{% if %}", "bad".into()).map(|_| ());
        assert!(matches!(&refused, Err(RenderError::Parse { origin, .. }) if origin == "bad"), "{refused:?}");
    }
}
