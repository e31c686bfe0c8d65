//! The `vip:` section: the virtual IP, its VRRP parameters, how cpha judges the endpoint for it,
//! and where keepalived's files are. Parsed and checked with no I/O; where the address sits on
//! this host is `vip::place`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// keepalived's VRRPv3 advertisement interval is counted in centiseconds in 12 bits.
const MAX_ADVERT: Duration = Duration::from_millis(40_950);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct VipSettings {
    /// The virtual IP: the control-plane endpoint's address.
    pub address: IpAddr,
    /// The interface keepalived holds the address on; default: the one whose subnet has it.
    pub interface: Option<String>,
    /// VRRP's virtual router id, 1-255: the same on every host of this VIP, different from
    /// every other VRRP router on the segment.
    pub virtual_router_id: u32,
    /// VRRPv3 advertisement interval (10ms steps). A backup takes over after about 3.5 of them.
    #[serde(deserialize_with = "crate::units::duration")]
    pub advert_interval: Duration,
    /// This host's base priority, 1-254. Equal priorities on every host mean the address moves
    /// only when its holder stops being healthy.
    pub priority: u32,
    /// A healthy host takes the address from a holder whose endpoint is worse (degraded).
    pub preempt: bool,
    /// Delay before such a preemption.
    #[serde(deserialize_with = "crate::units::duration")]
    pub preempt_delay: Duration,
    /// The other VRRP hosts. Absent: the members' addresses (the host shape, where every member
    /// is a control-plane host running keepalived), kept in step with the member set.
    pub unicast_peers: Option<Vec<IpAddr>>,
    /// Multicast adverts instead of unicast ones (networks that carry VRRP multicast).
    pub multicast: bool,
    /// How often the endpoint is checked for the VIP (a TLS request to `/readyz` through it).
    #[serde(deserialize_with = "crate::units::duration")]
    pub check_interval: Duration,
    /// Consecutive good checks before a host that was not healthy is healthy again.
    pub rise: u32,
    /// Consecutive failed checks before a healthy host gives up the address.
    pub fall: u32,
    /// A host that gave up the address is not healthy again for at least this long, so a
    /// flapping host cannot bounce the address.
    #[serde(deserialize_with = "crate::units::duration")]
    pub hold_down: Duration,
    /// How much lower a degraded host's priority is (its endpoint answers, but no ready apiserver
    /// behind it).
    pub degraded_penalty: u32,
    pub keepalived: KeepalivedSettings,
}

impl Default for VipSettings {
    fn default() -> Self {
        Self {
            address: IpAddr::from([0, 0, 0, 0]),
            interface: None,
            virtual_router_id: 51,
            advert_interval: Duration::from_millis(400),
            priority: 100,
            preempt: true,
            preempt_delay: Duration::ZERO,
            unicast_peers: None,
            multicast: false,
            check_interval: Duration::from_millis(500),
            rise: 3,
            fall: 2,
            hold_down: Duration::from_secs(10),
            degraded_penalty: 50,
            keepalived: KeepalivedSettings::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KeepalivedSettings {
    /// The keepalived.conf cpha renders (atomically, validated with `keepalived --config-test`).
    pub config_file: PathBuf,
    /// A tera template replacing the built-in one.
    pub template: Option<PathBuf>,
    /// The file keepalived tracks (`track_file`): cpha writes the endpoint's health into it.
    pub track_file: PathBuf,
    /// The FIFO keepalived writes its VRRP state changes to (`vrrp_notify_fifo`).
    pub notify_fifo: PathBuf,
    /// keepalived's pid file: SIGHUP goes to that process when no reload command is set.
    pub pid_file: PathBuf,
    /// A command that makes keepalived re-read its file (e.g. `[systemctl, reload, keepalived]`).
    pub reload_command: Vec<String>,
    /// Reloads are at least this far apart (changes meanwhile are coalesced).
    #[serde(deserialize_with = "crate::units::duration")]
    pub min_reload_interval: Duration,
    /// The keepalived program, for `--config-test`.
    pub binary: PathBuf,
}

impl Default for KeepalivedSettings {
    fn default() -> Self {
        Self {
            config_file: "/etc/keepalived/keepalived.conf".into(),
            template: None,
            track_file: "/run/cpha/vip-health".into(),
            notify_fifo: "/run/cpha/keepalived.fifo".into(),
            pid_file: "/run/keepalived.pid".into(),
            reload_command: Vec::new(),
            min_reload_interval: Duration::from_secs(1),
            binary: "keepalived".into(),
        }
    }
}

/// A `vip:` setting that cannot work, with the reason in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vip.{field}: {message}")]
pub struct VipSettingsError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> VipSettingsError {
    VipSettingsError { field, message: message.into() }
}

impl VipSettings {
    /// Everything that can be checked without looking at the host. `endpoint` is the
    /// `endpoint.listen` address every client dials.
    pub fn check(&self, endpoint: IpAddr) -> Result<(), VipSettingsError> {
        let a = self.address;
        if a.is_unspecified() {
            return Err(bad("address", "is required: the virtual IP clients dial the endpoint at"));
        }
        if a.is_loopback() || a.is_multicast() || crate::sysinfo::is_link_local(&a) || is_broadcast(&a) {
            return Err(bad(
                "address",
                format!("{a} cannot be a virtual IP (loopback, multicast, link-local or broadcast)"),
            ));
        }
        if !endpoint.is_unspecified() && endpoint != a {
            return Err(bad(
                "address",
                format!("{a} differs from endpoint.listen's address {endpoint}: clients dial the endpoint, so the virtual IP must be its address"),
            ));
        }
        if let Some(name) = &self.interface {
            check_interface_name(name).map_err(|m| bad("interface", m))?;
        }
        if !(1..=255).contains(&self.virtual_router_id) {
            return Err(bad(
                "virtualRouterId",
                format!("{} is out of range: VRRP router ids are 1 to 255", self.virtual_router_id),
            ));
        }
        if !(1..=254).contains(&self.priority) {
            return Err(bad(
                "priority",
                format!(
                    "{} is out of range 1-254 (255 is VRRP's address owner, which cpha's health cannot lower)",
                    self.priority
                ),
            ));
        }
        let advert = self.advert_interval;
        if advert < Duration::from_millis(10) || advert > MAX_ADVERT || !advert.as_millis().is_multiple_of(10) {
            return Err(bad(
                "advertInterval",
                format!("{advert:?}: VRRPv3 intervals are 10ms to 40.95s in steps of 10ms"),
            ));
        }
        if self.preempt_delay > Duration::from_secs(1000) {
            return Err(bad("preemptDelay", format!("{:?} is more than keepalived's 1000s", self.preempt_delay)));
        }
        if let Some(peers) = &self.unicast_peers {
            if self.multicast {
                return Err(bad("unicastPeers", "and vip.multicast exclude each other"));
            }
            for p in peers {
                if p.is_ipv4() != a.is_ipv4() {
                    return Err(bad("unicastPeers", format!("{p} is not of {a}'s address family")));
                }
                if p.is_unspecified() || p.is_loopback() || p.is_multicast() || *p == a {
                    return Err(bad("unicastPeers", format!("{p} cannot be a VRRP peer")));
                }
            }
        }
        if self.check_interval < Duration::from_millis(100) {
            return Err(bad("checkInterval", "must be at least 100ms"));
        }
        if self.rise == 0 || self.fall == 0 {
            return Err(bad("rise", "vip.rise and vip.fall must be at least 1"));
        }
        if self.hold_down > Duration::from_secs(3600) {
            return Err(bad("holdDown", "must be at most 1h"));
        }
        if !(1..=253).contains(&self.degraded_penalty) {
            return Err(bad("degradedPenalty", format!("{} is out of range 1-253", self.degraded_penalty)));
        }
        if self.degraded_penalty >= self.priority {
            return Err(bad(
                "degradedPenalty",
                format!(
                    "{} must be lower than vip.priority {}: a degraded host keeps a priority of at least 1",
                    self.degraded_penalty, self.priority
                ),
            ));
        }
        let k = &self.keepalived;
        for (field, path) in [
            ("keepalived.configFile", &k.config_file),
            ("keepalived.trackFile", &k.track_file),
            ("keepalived.notifyFifo", &k.notify_fifo),
            ("keepalived.pidFile", &k.pid_file),
        ] {
            check_path(path).map_err(|m| bad(field, m))?;
        }
        if let Some(t) = &k.template {
            if t.as_os_str().is_empty() {
                return Err(bad("keepalived.template", "empty path"));
            }
        }
        if k.reload_command.first().is_some_and(|c| c.is_empty()) {
            return Err(bad("keepalived.reloadCommand", "the program is empty"));
        }
        if k.min_reload_interval > Duration::from_secs(60) {
            return Err(bad("keepalived.minReloadInterval", "must be at most 60s"));
        }
        Ok(())
    }

    /// `advert_int` as keepalived reads it: seconds with two decimals.
    pub fn advert_seconds(&self) -> String {
        centiseconds(self.advert_interval)
    }

    pub fn preempt_delay_seconds(&self) -> String {
        centiseconds(self.preempt_delay)
    }
}

fn centiseconds(d: Duration) -> String {
    let cs = d.as_millis() / 10;
    format!("{}.{:02}", cs / 100, cs % 100)
}

/// Interface names as Linux allows them, narrowed to what is safe in keepalived.conf.
fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?}: an interface name has 1 to 15 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@')) {
        return Err(format!("{name:?}: use letters, digits, '.', '-', '_' or '@'"));
    }
    Ok(())
}

/// Paths end up quoted in keepalived.conf: absolute, and nothing that could end the string or
/// the line.
fn check_path(path: &std::path::Path) -> Result<(), String> {
    let Some(text) = path.to_str() else { return Err(format!("{} is not UTF-8", path.display())) };
    if !path.is_absolute() {
        return Err(format!("{text:?} must be an absolute path"));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '#' | '!' | '\\')) {
        return Err(format!("{text:?}: no spaces, quotes, '#', '!' or backslashes"));
    }
    Ok(())
}

fn is_broadcast(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(yaml: &str) -> Result<VipSettings, String> {
        crate::yaml::from_str::<VipSettings>(yaml).map_err(|e| e.to_string())
    }

    fn endpoint() -> IpAddr {
        "192.0.2.10".parse().unwrap()
    }

    #[test]
    fn defaults_are_valid_once_the_address_is_given() {
        let s = vip("address: 192.0.2.10\n").unwrap();
        s.check(endpoint()).unwrap();
        assert_eq!(s.advert_seconds(), "0.40");
        assert_eq!(s.virtual_router_id, 51);
    }

    #[test]
    fn bad_settings_are_refused_with_the_field_and_the_reason() {
        let cases = [
            ("interface: eth0\n", "vip.address: is required"),
            ("address: 192.0.2.10\nvirtualRouterId: 256\n", "vip.virtualRouterId: 256 is out of range"),
            ("address: 192.0.2.10\nvirtualRouterId: 0\n", "vip.virtualRouterId: 0 is out of range"),
            ("address: 192.0.2.10\npriority: 255\n", "vip.priority: 255 is out of range"),
            ("address: 192.0.2.10\nadvertInterval: 5ms\n", "vip.advertInterval"),
            ("address: 192.0.2.10\nadvertInterval: 1005ms\n", "steps of 10ms"),
            ("address: 192.0.2.10\nadvertInterval: 41s\n", "vip.advertInterval"),
            ("address: 192.0.2.11\n", "differs from endpoint.listen's address 192.0.2.10"),
            ("address: 127.0.0.1\n", "cannot be a virtual IP"),
            ("address: 192.0.2.10\ninterface: \"eth0\\nvirtual_server\"\n", "vip.interface"),
            ("address: 192.0.2.10\nunicastPeers: [2001:db8::1]\n", "not of 192.0.2.10's address family"),
            ("address: 192.0.2.10\nunicastPeers: [192.0.2.10]\n", "cannot be a VRRP peer"),
            ("address: 192.0.2.10\nunicastPeers: [192.0.2.11]\nmulticast: true\n", "exclude each other"),
            ("address: 192.0.2.10\ndegradedPenalty: 100\n", "lower than vip.priority"),
            ("address: 192.0.2.10\nfall: 0\n", "at least 1"),
            ("address: 192.0.2.10\nkeepalived:\n  trackFile: relative/file\n", "absolute path"),
            ("address: 192.0.2.10\nkeepalived:\n  configFile: \"/etc/k.conf\\\"\\n}\"\n", "vip.keepalived.configFile"),
        ];
        for (yaml, want) in cases {
            let err = vip(yaml).unwrap().check(endpoint()).unwrap_err().to_string();
            assert!(err.contains(want), "{yaml:?}: {err}");
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        assert!(vip("address: 192.0.2.10\nrouterId: 5\n").unwrap_err().contains("unknown field"));
        let err = vip("address: 192.0.2.300\n").unwrap_err();
        assert!(err.contains("invalid IP address"), "{err}");
        let err = vip("address: 192.0.2.10\nvirtualRouterId: -1\n").unwrap_err();
        assert!(err.contains("virtualRouterId: invalid type: integer `-1`"), "{err}");
    }

    #[test]
    fn a_wildcard_endpoint_takes_any_virtual_ip() {
        vip("address: 192.0.2.99\n").unwrap().check("0.0.0.0".parse().unwrap()).unwrap();
    }
}
