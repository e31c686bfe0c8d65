//! The endpoint's address: a virtual IP that keepalived (VRRP) holds on a host whose endpoint
//! works. cpha does not speak VRRP; it drives keepalived:
//!
//! - [`settings`]: the `vip:` section, checked with no I/O.
//! - [`place`]: where the address goes on this host (interface, subnet, own source address).
//! - [`render`] and `keepalived.conf.tera`: keepalived.conf from parsed values only.
//! - [`keepalived`]: the actuator: the health file keepalived tracks, the validated config swap
//!   and rate-limited reload, the notify FIFO (VRRP state, and keepalived's exit), and the
//!   removal of an address a killed keepalived left behind.
//!
//! The decisions (what health to advertise, with hysteresis; when to remove a stale address)
//! are the agent's controller's.

pub mod keepalived;
pub mod place;
pub mod render;
pub mod settings;

pub use settings::{KeepalivedSettings, VipSettings};

use std::net::IpAddr;

/// keepalived.conf for these members on this host, as the agent would write it, with where it
/// places the address (for `cpha render` and `check-config`).
pub fn render_for(settings: &VipSettings, members: &[IpAddr]) -> Result<(place::Placement, String), String> {
    render_placed(settings, members, place::locate(settings).map_err(|e| e.to_string())?)
}

/// keepalived.conf for these members with the address at `placement` (found on this host by
/// [`render_for`], or given: `cpha render --host-address`).
pub fn render_placed(
    settings: &VipSettings,
    members: &[IpAddr],
    placement: place::Placement,
) -> Result<(place::Placement, String), String> {
    let template = render::Template::from_settings(settings).map_err(|e| e.to_string())?;
    let peers = render::peers(settings, members, &placement);
    let text = template.render(settings, &placement, &peers).map_err(|e| e.to_string())?;
    Ok((placement, text))
}

pub use crate::model::{Advertised, Vrrp};

/// What the VIP observer saw: keepalived's state and whether this host holds the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VrrpObserved {
    pub vrrp: Vrrp,
    pub holds: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_lines_give_the_state() {
        assert_eq!(Vrrp::from_fifo_line("INSTANCE \"cpha\" MASTER 100"), Some(Vrrp::Master));
        assert_eq!(Vrrp::from_fifo_line("INSTANCE \"cpha\" BACKUP 50\n"), Some(Vrrp::Backup));
        assert_eq!(Vrrp::from_fifo_line("INSTANCE \"cpha\" FAULT 0"), Some(Vrrp::Fault));
        assert_eq!(Vrrp::from_fifo_line("INSTANCE \"cpha\" MASTER_PRIORITY 100"), None);
        assert_eq!(Vrrp::from_fifo_line("GROUP \"g\" MASTER"), None);
        assert_eq!(Vrrp::from_fifo_line(""), None);
    }

    #[test]
    fn withdrawn_is_below_keepalived_fault_threshold() {
        assert!(Advertised::Withdrawn.track_value(50) < -253);
        assert_eq!(Advertised::Degraded.track_value(50), -50);
        assert_eq!(Advertised::Healthy.track_value(50), 0);
    }
}
