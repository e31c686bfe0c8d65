//! HAProxy's state as read back: `show servers state` and `show stat` (the backend's servers),
//! `show proc` (the master's processes) and `show info` (the running configuration's digest).
//! Pure parsers, tested on answers captured from HAProxy 2.6.12.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// A server's state as the agent sees it: its operational state with the administrative one
/// on top (`MAINT` and `DRAIN` win over `UP`/`DOWN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ServerStatus {
    /// Up (including warming up): receives new connections.
    Up,
    /// Its checks fail.
    Down,
    /// Up but answering that it is stopping (`NOLB`); receives no new connections.
    NoLb,
    /// In maintenance: no traffic, no checks.
    Maint,
    /// Drained: keeps its connections, receives no new ones, still checked.
    Drain,
}

impl fmt::Display for ServerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerStatus::Up => "UP",
            ServerStatus::Down => "DOWN",
            ServerStatus::NoLb => "NOLB",
            ServerStatus::Maint => "MAINT",
            ServerStatus::Drain => "DRAIN",
        })
    }
}

/// `srv_admin_state` bits (management.txt, `show servers state`).
pub mod admin {
    pub const FMAINT: u32 = 0x01;
    pub const IMAINT: u32 = 0x02;
    pub const CMAINT: u32 = 0x04;
    pub const FDRAIN: u32 = 0x08;
    pub const IDRAIN: u32 = 0x10;
    pub const RMAINT: u32 = 0x20;
    pub const HMAINT: u32 = 0x40;
    pub const MAINT: u32 = FMAINT | IMAINT | CMAINT | RMAINT | HMAINT;
    pub const DRAIN: u32 = FDRAIN | IDRAIN;
}

/// `srv_check_state` bits.
pub mod check {
    pub const CONFIGURED: u32 = 0x02;
    pub const ENABLED: u32 = 0x04;
}

/// One server of the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerSnapshot {
    pub name: String,
    /// `None` when HAProxy holds no address (an unresolved FQDN).
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub status: ServerStatus,
    /// `srv_admin_state` as a bit mask, see [`admin`].
    pub admin_state: u32,
    /// `srv_check_state` as a bit mask, see [`check`].
    pub check_state: u32,
    /// Current sessions (`scur` of `show stat`).
    pub sessions: u64,
    /// `show stat`'s status text, such as `UP`, `UP 1/2`, `DRAIN`, `MAINT`, `no check`.
    pub stat_status: String,
    /// Seconds since the operational state last changed.
    pub since_change: u64,
    /// The last health check's result (`check_status` of `show stat`, without the `* ` of a
    /// check in progress): `L7OK`, `L7STS`, `L4CON`, ...; empty without checks.
    pub check_status: String,
}

impl ServerSnapshot {
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.addr.map(|ip| SocketAddr::new(ip, self.port))
    }

    /// Whether health checks are configured and enabled.
    pub fn checks_enabled(&self) -> bool {
        self.check_state & (check::CONFIGURED | check::ENABLED) == check::CONFIGURED | check::ENABLED
    }

    pub fn checks_configured(&self) -> bool {
        self.check_state & check::CONFIGURED != 0
    }
}

/// The servers of one backend as HAProxy reported them, in HAProxy's order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct BackendSnapshot {
    pub backend: String,
    pub servers: Vec<ServerSnapshot>,
}

impl BackendSnapshot {
    pub fn get(&self, name: &str) -> Option<&ServerSnapshot> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// Servers that receive new connections.
    pub fn up(&self) -> usize {
        self.servers.iter().filter(|s| s.status == ServerStatus::Up).count()
    }
}

impl fmt::Display for BackendSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} UP", self.up(), self.servers.len())?;
        for (i, s) in self.servers.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { ", " })?;
            match s.socket_addr() {
                Some(a) => write!(f, "{} {a} {}", s.name, s.status)?,
                None => write!(f, "{} - {}", s.name, s.status)?,
            }
        }
        Ok(())
    }
}

/// The fields of `show servers state` this module reads (format version 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRow {
    pub backend: String,
    pub name: String,
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub op_state: u32,
    pub admin_state: u32,
    pub check_state: u32,
    pub since_change: u64,
}

/// Parses `show servers state <backend>`.
pub fn parse_servers_state(text: &str) -> Result<Vec<StateRow>, String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    match lines.next() {
        Some("1") => {}
        Some(v) => return Err(format!("unsupported format version {:?} (expected 1)", v)),
        None => return Err("empty answer".into()),
    }
    let header: Vec<&str> = match lines.next().and_then(|l| l.strip_prefix('#')) {
        Some(h) => h.split_whitespace().collect(),
        None => return Err("no column header".into()),
    };
    let col = |name: &str| header.iter().position(|h| *h == name).ok_or_else(|| format!("no column {name}"));
    let (be, name, addr, op, adm, chk, since, port) = (
        col("be_name")?,
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_op_state")?,
        col("srv_admin_state")?,
        col("srv_check_state")?,
        col("srv_time_since_last_change")?,
        col("srv_port")?,
    );
    let mut rows = Vec::new();
    for line in lines {
        if line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != header.len() {
            return Err(format!("a row has {} fields, the header {}: {line:?}", f.len(), header.len()));
        }
        let num = |i: usize| f[i].parse::<u64>().map_err(|_| format!("{} is not a number in {line:?}", header[i]));
        let addr = match f[addr] {
            "-" => None,
            a => Some(a.parse::<IpAddr>().map_err(|_| format!("srv_addr {a:?} is not an IP address"))?),
        };
        rows.push(StateRow {
            backend: f[be].to_string(),
            name: f[name].to_string(),
            addr,
            port: u16::try_from(num(port)?).map_err(|_| format!("srv_port out of range in {line:?}"))?,
            op_state: num(op)? as u32,
            admin_state: num(adm)? as u32,
            check_state: num(chk)? as u32,
            since_change: num(since)?,
        });
    }
    Ok(rows)
}

/// The fields of `show stat` this module reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatRow {
    pub proxy: String,
    pub name: String,
    pub sessions: u64,
    pub status: String,
    pub check_status: String,
}

/// Parses `show stat` CSV (any rows; callers filter).
pub fn parse_stat(text: &str) -> Result<Vec<StatRow>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header =
        lines.next().and_then(|l| l.strip_prefix("# ")).ok_or_else(|| "no `# pxname,...` header".to_string())?;
    let header = split_csv(header);
    let col = |name: &str| header.iter().position(|h| h == name).ok_or_else(|| format!("no column {name}"));
    let (px, sv, scur, status) = (col("pxname")?, col("svname")?, col("scur")?, col("status")?);
    let check_status = col("check_status")?;
    let mut rows = Vec::new();
    for line in lines {
        let f = split_csv(line);
        let get = |i: usize| f.get(i).map(String::as_str).ok_or_else(|| format!("short row {line:?}"));
        let sessions = match get(scur)? {
            "" => 0,
            n => n.parse().map_err(|_| format!("scur {n:?} is not a number"))?,
        };
        let check = get(check_status)?;
        rows.push(StatRow {
            proxy: get(px)?.into(),
            name: get(sv)?.into(),
            sessions,
            status: get(status)?.into(),
            check_status: check.strip_prefix("* ").unwrap_or(check).into(),
        });
    }
    Ok(rows)
}

/// Splits one CSV line; HAProxy quotes fields holding commas or quotes.
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    out.push(field);
    out
}

/// Joins the two answers into one snapshot of `backend`.
pub fn snapshot(backend: &str, state: &[StateRow], stat: &[StatRow]) -> BackendSnapshot {
    let stat: BTreeMap<&str, &StatRow> =
        stat.iter().filter(|r| r.proxy == backend).map(|r| (r.name.as_str(), r)).collect();
    let servers = state
        .iter()
        .filter(|r| r.backend == backend)
        .map(|r| {
            let s = stat.get(r.name.as_str());
            ServerSnapshot {
                name: r.name.clone(),
                addr: r.addr,
                port: r.port,
                status: status_of(r.op_state, r.admin_state),
                admin_state: r.admin_state,
                check_state: r.check_state,
                sessions: s.map_or(0, |s| s.sessions),
                stat_status: s.map_or_else(String::new, |s| s.status.clone()),
                since_change: r.since_change,
                check_status: s.map_or_else(String::new, |s| s.check_status.clone()),
            }
        })
        .collect();
    BackendSnapshot { backend: backend.to_string(), servers }
}

fn status_of(op_state: u32, admin_state: u32) -> ServerStatus {
    if admin_state & admin::MAINT != 0 {
        ServerStatus::Maint
    } else if admin_state & admin::DRAIN != 0 {
        ServerStatus::Drain
    } else {
        match op_state {
            0 => ServerStatus::Down,
            3 => ServerStatus::NoLb,
            _ => ServerStatus::Up,
        }
    }
}

/// One process in `show proc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Proc {
    pub pid: u32,
    /// Reloads this process went through (for the master: reloads since it started).
    pub reloads: u32,
}

/// The master CLI's `show proc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcList {
    pub master: Proc,
    /// Failed reloads since the last successful one (`[failed: N]`).
    pub failed_reloads: u32,
    /// Workers of the current configuration.
    pub workers: Vec<Proc>,
    /// Workers of earlier configurations still finishing their connections.
    pub old_workers: Vec<Proc>,
}

impl ProcList {
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().map(|p| p.pid).collect()
    }
}

/// Parses `show proc`.
pub fn parse_proc(text: &str) -> Result<ProcList, String> {
    #[derive(PartialEq)]
    enum Section {
        Top,
        Workers,
        OldWorkers,
        Programs,
    }
    let mut section = Section::Top;
    let mut master = None;
    let mut workers = Vec::new();
    let mut old_workers = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line {
            "# workers" => section = Section::Workers,
            "# old workers" => section = Section::OldWorkers,
            "# programs" => section = Section::Programs,
            l if l.starts_with('#') => {}
            l => {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 3 {
                    return Err(format!("unexpected line {l:?}"));
                }
                let num = |s: &str| s.parse::<u32>().map_err(|_| format!("{s:?} is not a number in {l:?}"));
                let proc = Proc { pid: num(f[0])?, reloads: num(f[2])? };
                match (&section, f[1]) {
                    (Section::Top, "master") => {
                        let failed = match (f.get(3), f.get(4)) {
                            (Some(&"[failed:"), Some(n)) => num(n.trim_end_matches(']'))?,
                            _ => 0,
                        };
                        master = Some((proc, failed));
                    }
                    (Section::Workers, "worker") => workers.push(proc),
                    (Section::OldWorkers, "worker") => old_workers.push(proc),
                    (Section::Programs, _) => {}
                    _ => return Err(format!("unexpected line {l:?}")),
                }
            }
        }
    }
    let (master, failed_reloads) = master.ok_or_else(|| "no master line".to_string())?;
    Ok(ProcList { master, failed_reloads, workers, old_workers })
}

/// The global `description` from `show info`, if any.
pub fn parse_info_description(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("description:")).map(str::trim)
}

#[cfg(test)]
mod tests {
    use pretty_assertions::assert_eq;

    use super::*;

    const SERVERS_STATE: &str = include_str!("../../tests/golden/haproxy-show-servers-state.txt");
    const STAT: &str = include_str!("../../tests/golden/haproxy-show-stat.txt");
    const PROC: &str = include_str!("../../tests/golden/haproxy-show-proc.txt");
    const PROC_OLD: &str = include_str!("../../tests/golden/haproxy-show-proc-old-workers.txt");
    const PROC_FAILED: &str = include_str!("../../tests/golden/haproxy-show-proc-failed.txt");

    #[test]
    fn parses_show_servers_state_from_2_6() {
        let rows = parse_servers_state(SERVERS_STATE).unwrap();
        type Row<'a> = (&'a str, Option<IpAddr>, u16, u32, u32, u32);
        let brief: Vec<Row> =
            rows.iter().map(|r| (r.name.as_str(), r.addr, r.port, r.op_state, r.admin_state, r.check_state)).collect();
        assert_eq!(
            brief,
            [
                ("s1", Some("127.0.0.1".parse().unwrap()), 17501, 2, 0, 6),
                ("s2", Some("::1".parse().unwrap()), 17502, 0, 0, 6),
                ("s3", Some("::1".parse().unwrap()), 17504, 0, 8, 6),
                ("s5", Some("::1".parse().unwrap()), 17505, 0, 1, 2),
                ("s8", None, 6443, 0, 1, 0),
            ]
        );
        assert!(rows.iter().all(|r| r.backend == "kube-apiservers"));
    }

    #[test]
    fn parses_show_stat_from_2_6() {
        let rows = parse_stat(STAT).unwrap();
        let brief: Vec<(&str, &str, u64, &str)> =
            rows.iter().map(|r| (r.proxy.as_str(), r.name.as_str(), r.sessions, r.status.as_str())).collect();
        assert_eq!(
            brief,
            [
                ("kube-apiservers", "s1", 1, "UP"),
                ("kube-apiservers", "s2", 0, "DOWN"),
                ("kube-apiservers", "s3", 0, "DOWN"),
                ("kube-apiservers", "s5", 0, "MAINT"),
                ("kube-apiservers", "s8", 0, "MAINT"),
            ]
        );
    }

    #[test]
    fn joins_both_into_a_snapshot() {
        let s = snapshot("kube-apiservers", &parse_servers_state(SERVERS_STATE).unwrap(), &parse_stat(STAT).unwrap());
        let brief: Vec<(&str, ServerStatus, u64, bool)> =
            s.servers.iter().map(|s| (s.name.as_str(), s.status, s.sessions, s.checks_enabled())).collect();
        assert_eq!(
            brief,
            [
                ("s1", ServerStatus::Up, 1, true),
                ("s2", ServerStatus::Down, 0, true),
                ("s3", ServerStatus::Drain, 0, true),
                ("s5", ServerStatus::Maint, 0, false),
                ("s8", ServerStatus::Maint, 0, false),
            ]
        );
        assert_eq!(s.up(), 1);
        assert_eq!(s.get("s1").unwrap().socket_addr(), Some("127.0.0.1:17501".parse().unwrap()));
        assert_eq!(
            s.to_string(),
            "1/5 UP: s1 127.0.0.1:17501 UP, s2 [::1]:17502 DOWN, s3 [::1]:17504 DRAIN, s5 [::1]:17505 MAINT, s8 - MAINT"
        );
        assert!(snapshot("other", &parse_servers_state(SERVERS_STATE).unwrap(), &[]).servers.is_empty());
    }

    #[test]
    fn status_combines_operational_and_administrative_state() {
        assert_eq!(status_of(2, 0), ServerStatus::Up);
        assert_eq!(status_of(1, 0), ServerStatus::Up);
        assert_eq!(status_of(0, 0), ServerStatus::Down);
        assert_eq!(status_of(3, 0), ServerStatus::NoLb);
        assert_eq!(status_of(2, admin::FDRAIN), ServerStatus::Drain);
        assert_eq!(status_of(2, admin::FMAINT | admin::FDRAIN), ServerStatus::Maint);
        assert_eq!(status_of(0, admin::CMAINT), ServerStatus::Maint);
    }

    #[test]
    fn refuses_answers_that_are_not_tables() {
        assert!(parse_servers_state("Can't find backend.\n").unwrap_err().contains("unsupported format version"));
        assert!(parse_servers_state("2\n# be_id\n").unwrap_err().contains("version"));
        assert!(parse_servers_state("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_time_since_last_change srv_check_state srv_port\n3 b 1 s 10.0.0.1 2 0 1\n")
            .unwrap_err()
            .contains("fields"));
        assert!(parse_stat("No such proxy.\n").unwrap_err().contains("header"));
        assert!(parse_proc("Unknown command.\n").unwrap_err().contains("unexpected line"));
    }

    #[test]
    fn csv_fields_may_be_quoted() {
        assert_eq!(split_csv(r#"a,"b,c",,"d""e""#), ["a", "b,c", "", "d\"e"]);
    }

    #[test]
    fn parses_show_proc_from_2_6() {
        let p = parse_proc(PROC).unwrap();
        assert_eq!(p.master, Proc { pid: 4852, reloads: 0 });
        assert_eq!(p.failed_reloads, 0);
        assert_eq!(p.worker_pids(), [4859]);
        assert!(p.old_workers.is_empty());

        let p = parse_proc(PROC_OLD).unwrap();
        assert_eq!(p.master, Proc { pid: 4852, reloads: 1 });
        assert_eq!(p.workers, [Proc { pid: 5522, reloads: 0 }]);
        assert_eq!(p.old_workers, [Proc { pid: 4859, reloads: 1 }]);

        let p = parse_proc(PROC_FAILED).unwrap();
        assert_eq!(p.master.reloads, 2);
        assert_eq!(p.failed_reloads, 1);
        assert_eq!(p.workers, [Proc { pid: 5522, reloads: 1 }]);
        assert_eq!(p.old_workers, [Proc { pid: 4859, reloads: 2 }]);
    }

    #[test]
    fn reads_the_description_from_show_info() {
        let info = "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nnode: vm\ndescription: cpha-skeleton-0123456789abcdef\nStopping: 0\n";
        assert_eq!(parse_info_description(info), Some("cpha-skeleton-0123456789abcdef"));
        assert_eq!(parse_info_description("Name: HAProxy\nnode: vm\n"), None);
    }
}
