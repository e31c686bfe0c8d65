//! What turns the backend HAProxy runs (read back) into the desired servers through the
//! Runtime API. Pure: the actuator in `mod.rs` sends the commands.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

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
    /// Desired servers in forced maintenance (`set server ... state maint`): an operator's
    /// explicit action, left as it is (the actuator readies those it put there itself).
    pub held: Vec<ServerName>,
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
            if r.admin_state & admin::FMAINT != 0 && r.admin_state & !READY_CLEARS == 0 {
                // NOTE: `state maint` clears the drain flag, so cpha's own maintenance (a
                // removed server before `del server`) looks the same here; only the actuator
                // knows which servers it drains.
                p.held.push(s.name.clone());
            } else if r.admin_state & !READY_CLEARS == 0 {
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

/// Why the open sessions of a DOWN server are shut down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutReason {
    /// The last check did not reach an apiserver that answers: connection refused or timed
    /// out, TLS failing, `/livez` failing. What was in flight there is lost already; shutting
    /// the sessions down makes clients of a host that vanished silently reconnect now instead
    /// of at their TCP timeout.
    Gone { check_status: String },
    /// The server answers but is not ready (`/readyz` fails: `L7STS`) and has been DOWN for at
    /// least the grace: its remaining connections (watches) move to a ready server.
    GraceOver { down_for: Duration },
}

impl fmt::Display for CutReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CutReason::Gone { check_status } => write!(f, "gone (last check {check_status})"),
            CutReason::GraceOver { down_for } => write!(f, "not ready for {}s", down_for.as_secs()),
        }
    }
}

/// The check status of an apiserver that answered `/livez` but failed `/readyz`: an HTTP
/// status other than 200 on the second request of the check (see haproxy.cfg.tera).
pub const NOT_READY: &str = "L7STS";

/// The desired servers marked DOWN by their checks that still hold sessions and should lose
/// them now: at once when the server is gone, after `grace` (measured from HAProxy's last
/// change of state, in whole seconds, never short) when it is only not ready and another
/// server is UP.
///
/// NOTE: not ready is not gone (design note 19, docs/design-notes.md#not-ready-is-not-gone). A
/// kube-apiserver that got SIGTERM fails `/readyz` and keeps serving for
/// `--shutdown-delay-duration`, then finishes what is in flight: cutting its sessions at
/// mark-down fails requests it would have completed.
pub fn cuts(desired: &BTreeSet<String>, running: &BackendSnapshot, grace: Duration) -> Vec<(ServerName, CutReason)> {
    // NOTE: the grace ends only when another server is UP. With every member unready (etcd
    // lost, say) the clients cut would reconnect to no server at all; the one still serving
    // watches is the better place for them.
    let elsewhere = running.servers.iter().any(|r| r.status == ServerStatus::Up);
    running
        .servers
        .iter()
        .filter(|r| desired.contains(&r.name))
        .filter_map(|r| {
            let name = r.name.parse::<ServerName>().ok()?;
            if r.status != ServerStatus::Down || r.sessions == 0 || !r.checks_enabled() {
                return None;
            }
            // NOTE: HAProxy keeps the time of the last change in whole seconds, so the count
            // it reports can be up to a second more than the real time: a second less is the
            // time the server has surely been DOWN.
            let down_for = Duration::from_secs(r.since_change.saturating_sub(1));
            let reason = if r.check_status != NOT_READY {
                CutReason::Gone { check_status: r.check_status.clone() }
            } else if down_for >= grace && elsewhere {
                CutReason::GraceOver { down_for }
            } else {
                return None;
            };
            Some((name, reason))
        })
        .collect()
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
            check_status: "L7OK".into(),
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
    fn a_drain_taken_back_is_made_ready_again_and_forced_maintenance_is_held() {
        let desired = [server("e", "10.0.0.5:6443"), server("f", "10.0.0.6:6443")];
        let mut f = running("f", "10.0.0.6:6443", ServerStatus::Maint, admin::FMAINT, 0);
        f.check_state = check::CONFIGURED;
        let snap = BackendSnapshot {
            backend: "b".into(),
            servers: vec![running("e", "10.0.0.5:6443", ServerStatus::Drain, admin::FDRAIN, 2), f],
        };
        let p = plan(&desired, &snap);
        // A drain is cpha's removal taken back; forced maintenance may be an operator's, and
        // only the actuator knows whether it set it itself.
        assert_eq!(names(&p.ready), ["e"]);
        assert_eq!(names(&p.held), ["f"]);
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

    #[test]
    fn sessions_of_the_gone_are_cut_at_once_of_the_unready_after_the_grace() {
        let desired: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let down = |name: &str, addr: &str, check: &str, since: u64, sessions: u64| ServerSnapshot {
            check_status: check.into(),
            since_change: since,
            ..running(name, addr, ServerStatus::Down, 0, sessions)
        };
        let snap = |servers: Vec<ServerSnapshot>| BackendSnapshot { backend: "b".into(), servers };
        let grace = Duration::from_secs(30);
        // Not ready for less than the grace: kept. Gone: cut. UP: untouched.
        let s = snap(vec![
            down("a", "10.0.0.1:6443", "L7STS", 30, 4),
            down("b", "10.0.0.2:6443", "L4CON", 0, 2),
            running("c", "10.0.0.3:6443", ServerStatus::Up, 0, 9),
        ]);
        assert_eq!(
            cuts(&desired, &s, grace),
            vec![("b".parse().unwrap(), CutReason::Gone { check_status: "L4CON".into() })]
        );
        // The grace passed; a gone server with no session left needs nothing; /livez failing
        // (L7RSP) and timeouts are gone too.
        let s = snap(vec![
            down("a", "10.0.0.1:6443", "L7STS", 31, 4),
            down("b", "10.0.0.2:6443", "L4CON", 5, 0),
            down("c", "10.0.0.3:6443", "L7RSP", 0, 1),
            running("d", "10.0.0.4:6443", ServerStatus::Up, 0, 0),
        ]);
        let got = cuts(&desired, &s, grace);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].1, CutReason::GraceOver { down_for: Duration::from_secs(30) });
        assert_eq!(got[0].1.to_string(), "not ready for 30s");
        assert_eq!(got[1].1.to_string(), "gone (last check L7RSP)");
        assert!(cuts(&desired, &snap(vec![down("a", "10.0.0.1:6443", "L6TOUT", 0, 1)]), grace).len() == 1);
        // A zero grace cuts the unready as soon as they are DOWN.
        assert_eq!(cuts(&desired, &s, Duration::ZERO).len(), 2);
        // With no server UP, the unready keeps its sessions whatever the grace: there is
        // nowhere to move them. The gone one still loses them.
        let mut s = s;
        s.servers.pop();
        assert_eq!(cuts(&desired, &s, Duration::ZERO), vec![got[1].clone()]);
        // Removed servers (not desired) are the drains' business.
        assert!(cuts(&BTreeSet::new(), &s, Duration::ZERO).is_empty());
    }
}
