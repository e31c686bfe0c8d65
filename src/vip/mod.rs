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

/// The health cpha advertises to keepalived through the tracked file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advertised {
    /// The endpoint reaches a ready apiserver: full priority.
    Healthy,
    /// The endpoint is carried but reaches no ready apiserver (or has not yet, at first boot):
    /// lower priority, so a healthy host takes the address, but a host still holds it when
    /// none is healthy (the first host before `kubeadm init`).
    Degraded,
    /// The endpoint stopped working here, or cpha withdrew it: VRRP FAULT, the address moves at
    /// once.
    Withdrawn,
}

impl Advertised {
    pub const NAMES: [&'static str; 3] = ["healthy", "degraded", "withdrawn"];

    pub fn name(self) -> &'static str {
        match self {
            Advertised::Healthy => "healthy",
            Advertised::Degraded => "degraded",
            Advertised::Withdrawn => "withdrawn",
        }
    }

    /// The value written to the tracked file (`weight 1`): added to the priority, and below
    /// -253 keepalived enters FAULT.
    pub fn track_value(self, penalty: u32) -> i64 {
        match self {
            Advertised::Healthy => 0,
            Advertised::Degraded => -i64::from(penalty),
            Advertised::Withdrawn => -254,
        }
    }
}

/// What keepalived says about this host's VRRP instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vrrp {
    /// No keepalived holds the notify FIFO open: it is not running (or was killed).
    Gone,
    /// keepalived runs but has not told its state since cpha started.
    Unknown,
    Backup,
    Master,
    Fault,
    Stop,
}

impl Vrrp {
    pub const NAMES: [&'static str; 6] = ["gone", "unknown", "backup", "master", "fault", "stop"];

    pub fn name(self) -> &'static str {
        match self {
            Vrrp::Gone => "gone",
            Vrrp::Unknown => "unknown",
            Vrrp::Backup => "backup",
            Vrrp::Master => "master",
            Vrrp::Fault => "fault",
            Vrrp::Stop => "stop",
        }
    }

    /// One line of keepalived's VRRP notify FIFO: `INSTANCE "cpha" MASTER 100`. Other lines
    /// (sync groups, priority changes) say nothing about the state.
    pub fn from_fifo_line(line: &str) -> Option<Vrrp> {
        let mut words = line.split_whitespace();
        if words.next()? != "INSTANCE" {
            return None;
        }
        let _name = words.next()?;
        match words.next()? {
            "MASTER" => Some(Vrrp::Master),
            "BACKUP" => Some(Vrrp::Backup),
            "FAULT" => Some(Vrrp::Fault),
            "STOP" | "DELETED" => Some(Vrrp::Stop),
            _ => None,
        }
    }
}

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
