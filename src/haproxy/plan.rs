//! What turns the backend HAProxy runs (read back) into the desired servers through the
//! Runtime API. Pure: the actuator in `mod.rs` sends the commands.

use std::net::SocketAddr;

use super::render::Server;
use super::state::{admin, BackendSnapshot, ServerStatus};
use crate::members::ServerName;

/// The Runtime API changes for one apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Servers to create (`add server`, `enable health`, `set server ... state ready`).
    pub add: Vec<Server>,
    /// Servers that stay under their name but move (`set server ... addr`), with the old address.
    pub readdress: Vec<(Server, Option<SocketAddr>)>,
    /// Desired servers left in maintenance or drain (an earlier removal taken back).
    pub ready: Vec<ServerName>,
    /// Desired servers whose configured checks are disabled.
    pub enable_health: Vec<ServerName>,
    /// Servers no longer desired that still take new connections: drain them.
    pub drain: Vec<ServerName>,
    /// Servers no longer desired that are already draining (or in maintenance with sessions).
    pub draining: Vec<ServerName>,
    /// Servers no longer desired, in maintenance with no session: delete now.
    pub delete: Vec<ServerName>,
    /// What the Runtime API cannot fix; a reload of the rendered file does.
    pub reload_reasons: Vec<String>,
}

impl Plan {
    /// Whether the running backend already equals the desired one (drains aside).
    pub fn is_empty(&self) -> bool {
        self.add.is_empty()
            && self.readdress.is_empty()
            && self.ready.is_empty()
            && self.enable_health.is_empty()
            && self.drain.is_empty()
            && self.delete.is_empty()
            && self.reload_reasons.is_empty()
    }
}

/// Admin flags `set server ... state ready` clears.
const READY_CLEARS: u32 = admin::FMAINT | admin::FDRAIN | admin::CMAINT | admin::HMAINT;

/// Compares `desired` with what HAProxy runs.
pub fn plan(desired: &[Server], running: &BackendSnapshot) -> Plan {
    let mut p = Plan::default();
    for s in desired {
        let Some(r) = running.get(s.name.as_str()) else {
            p.add.push(s.clone());
            continue;
        };
        if !r.checks_configured() {
            p.reload_reasons.push(format!("server {} runs without health checks", r.name));
            continue;
        }
        if r.socket_addr() != Some(s.addr) {
            p.readdress.push((s.clone(), r.socket_addr()));
        }
        if matches!(r.status, ServerStatus::Maint | ServerStatus::Drain) {
            if r.admin_state & !READY_CLEARS == 0 {
                p.ready.push(s.name.clone());
            } else {
                p.reload_reasons
                    .push(format!("server {} is held in {} (admin state {:#x})", r.name, r.status, r.admin_state));
            }
        }
        if !r.checks_enabled() {
            p.enable_health.push(s.name.clone());
        }
    }
    for r in &running.servers {
        if desired.iter().any(|s| s.name.as_str() == r.name) {
            continue;
        }
        let Ok(name) = r.name.parse::<ServerName>() else {
            p.reload_reasons.push(format!("server {:?} has a name cpha does not use", r.name));
            continue;
        };
        match r.status {
            ServerStatus::Maint if r.sessions == 0 => p.delete.push(name),
            ServerStatus::Maint | ServerStatus::Drain => p.draining.push(name),
            ServerStatus::Up | ServerStatus::Down | ServerStatus::NoLb => p.drain.push(name),
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;
    use crate::haproxy::state::{check, ServerSnapshot};

    fn server(name: &str, addr: &str) -> Server {
        Server { name: name.parse().unwrap(), addr: addr.parse().unwrap() }
    }

    fn running(name: &str, addr: &str, status: ServerStatus, admin_state: u32, sessions: u64) -> ServerSnapshot {
        let a: SocketAddr = addr.parse().unwrap();
        ServerSnapshot {
            name: name.into(),
            addr: Some(a.ip()),
            port: a.port(),
            status,
            admin_state,
            check_state: check::CONFIGURED | check::ENABLED,
            sessions,
            stat_status: status.to_string(),
            since_change: 10,
        }
    }

    fn names(v: &[ServerName]) -> Vec<&str> {
        v.iter().map(ServerName::as_str).collect()
    }

    #[test]
    fn equal_backends_need_nothing() {
        let desired = [server("a", "10.0.0.1:6443"), server("b", "[fd00::2]:6443")];
        let snap = BackendSnapshot {
            backend: "b".into(),
            servers: vec![
                running("a", "10.0.0.1:6443", ServerStatus::Up, 0, 3),
                running("b", "[fd00::2]:6443", ServerStatus::Down, 0, 0),
            ],
        };
        assert!(plan(&desired, &snap).is_empty(), "{:?}", plan(&desired, &snap));
    }

    #[test]
    fn adds_moves_and_drains() {
        let desired = [server("a", "10.0.0.1:6443"), server("c", "10.0.0.3:6443"), server("d", "10.0.0.9:7443")];
        let snap = BackendSnapshot {
            backend: "b".into(),
            servers: vec![
                running("a", "10.0.0.1:6443", ServerStatus::Up, 0, 1),
                running("b", "10.0.0.2:6443", ServerStatus::Up, 0, 4),
                running("d", "10.0.0.4:6443", ServerStatus::Up, 0, 0),
                running("e", "10.0.0.5:6443", ServerStatus::Drain, admin::FDRAIN, 2),
                running("f", "10.0.0.6:6443", ServerStatus::Maint, admin::FMAINT, 0),
                running("g", "10.0.0.7:6443", ServerStatus::Down, 0, 0),
            ],
        };
        let p = plan(&desired, &snap);
        assert_eq!(p.add, [server("c", "10.0.0.3:6443")]);
        assert_eq!(p.readdress, [(server("d", "10.0.0.9:7443"), Some("10.0.0.4:6443".parse().unwrap()))]);
        assert_eq!(names(&p.drain), ["b", "g"]);
        assert_eq!(names(&p.draining), ["e"]);
        assert_eq!(names(&p.delete), ["f"]);
        assert!(p.ready.is_empty() && p.enable_health.is_empty() && p.reload_reasons.is_empty());
    }

    #[test]
    fn a_removal_taken_back_is_made_ready_again() {
        let desired = [server("e", "10.0.0.5:6443"), server("f", "10.0.0.6:6443")];
        let mut f = running("f", "10.0.0.6:6443", ServerStatus::Maint, admin::FMAINT, 0);
        f.check_state = check::CONFIGURED;
        let snap = BackendSnapshot {
            backend: "b".into(),
            servers: vec![running("e", "10.0.0.5:6443", ServerStatus::Drain, admin::FDRAIN, 2), f],
        };
        let p = plan(&desired, &snap);
        assert_eq!(names(&p.ready), ["e", "f"]);
        assert_eq!(names(&p.enable_health), ["f"]);
        assert!(p.add.is_empty() && p.drain.is_empty() && p.delete.is_empty());
    }

    #[test]
    fn what_the_runtime_api_cannot_fix_asks_for_a_reload() {
        let desired = [server("a", "10.0.0.1:6443"), server("t", "10.0.0.2:6443")];
        let mut a = running("a", "10.0.0.1:6443", ServerStatus::Up, 0, 0);
        a.check_state = 0;
        let t = running("t", "10.0.0.2:6443", ServerStatus::Maint, admin::IMAINT, 0);
        let odd = running("bad:name", "10.0.0.3:6443", ServerStatus::Up, 0, 0);
        let snap = BackendSnapshot { backend: "b".into(), servers: vec![a, t, odd] };
        let p = plan(&desired, &snap);
        assert_eq!(p.reload_reasons.len(), 3, "{:?}", p.reload_reasons);
        assert!(p.reload_reasons[0].contains("without health checks"));
        assert!(p.reload_reasons[1].contains("MAINT"));
        assert!(p.reload_reasons[2].contains("bad:name"));
    }
}
