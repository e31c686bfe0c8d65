//! The pure core: plain types the controller, the actuators and the metrics share, with no
//! I/O and no dependency on any other room of the crate. The virtual IP's advertised health
//! and keepalived's VRRP state live here so the metrics can label them without depending on
//! the keepalived actuator.

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
