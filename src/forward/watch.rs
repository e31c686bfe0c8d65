//! Watching what a kernel forward owns, so drift is noticed within a fraction of a second:
//! its nf_tables objects (nftables' `inet cpha`, or with iptables-nft the nat table its chains
//! and jumps live in) and the sysctls it relies on.
//!
//! Nothing is polled for the rules: the kernel sends a message on the `NFNLGRP_NFTABLES`
//! netlink group for every change of the ruleset (a table, chain, rule or set added or
//! deleted, `flush ruleset` included), and only a message that names cpha's table makes the
//! watcher read the forward back (`nft -j` or `iptables-save`, one process) and compare it
//! with what cpha installed ([`Expected`]). The sysctls have no notification: they are read
//! (one small file each) every `poll`. Every [`RESYNC`] the whole forward is read back anyway,
//! for what sends no message (iptables-legacy, a message lost to a full socket buffer).
//!
//! It also looks, after another table changed (at most every `CONTEST_EVERY`), for a rule that
//! takes the endpoint before cpha's chains can ([`outranking`]): that is reported, not fought.
//!
//! The watcher only reports ([`Report`]); deciding to repair and repairing belong to the
//! agent (`agent::controller`, `agent::endpoint`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::kernel::{KernelBackend, Snapshot};
use super::spec::ForwardSpec;
use crate::sysinfo;

/// How often the whole forward is read back even without a notification.
pub const RESYNC: Duration = Duration::from_secs(30);

/// How long after a notification the watcher waits for the rest of a transaction's messages
/// before it reads the forward back once.
const SETTLE: Duration = Duration::from_millis(20);

/// netlink's multicast group of nf_tables ruleset changes (`NFNLGRP_NFTABLES`).
const NFNLGRP_NFTABLES: u32 = 7;
/// `NFNL_SUBSYS_NFTABLES`: the high byte of an nf_tables message's type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// What cpha last installed, to compare the kernel with.
pub struct Expected {
    pub backend: &'static dyn KernelBackend,
    pub spec: ForwardSpec,
    /// The forward's objects read back right after cpha's transaction.
    pub rules: Snapshot,
    /// Sysctls the forward needs and that were on (`1`) when it was installed.
    pub sysctls: Vec<&'static str>,
}

impl Expected {
    /// Reads back what the forward needs now (after cpha's own transaction).
    pub fn read(backend: &'static dyn KernelBackend, spec: ForwardSpec) -> anyhow::Result<Expected> {
        let rules = backend.snapshot(spec.listen)?;
        let sysctls = super::relied_on_sysctls(&spec);
        Ok(Expected { backend, spec, rules, sysctls })
    }

    /// Everything this forward owns, named together.
    pub fn whole(&self) -> &'static str {
        match self.backend.name() {
            "nftables" => "table inet cpha",
            _ => "cpha's nat chains and jumps",
        }
    }

    /// The sysctls that are not on any more.
    pub fn sysctls_off(&self) -> Vec<(&'static str, String)> {
        self.sysctls
            .iter()
            .filter_map(|key| {
                let value = sysinfo::sysctl(key).unwrap_or_else(|| "missing".into());
                (value != "1").then_some((*key, value))
            })
            .collect()
    }

    /// How the kernel differs from what was installed, in words; `None` when it does not.
    /// Returns the rules as read, for a repair to tell whether they need the transaction.
    pub fn compare(&self) -> anyhow::Result<(Option<String>, Option<String>)> {
        let now = self.backend.snapshot(self.spec.listen)?;
        let rules = self.rules.drift(&now, self.whole());
        let sysctls: Vec<String> = self.sysctls_off().iter().map(|(k, v)| format!("{k} is {v}")).collect();
        let sysctls = (!sysctls.is_empty()).then(|| sysctls.join(", "));
        Ok((rules, sysctls))
    }
}

impl Expected {
    /// Another table's rule that translates the endpoint before cpha's forward, in words.
    pub fn outranked(&self) -> anyhow::Result<Option<String>> {
        let json = crate::exec::run("nft", &["-j", "list", "ruleset"], None).context("listing the ruleset")?;
        outranking(&json, self.spec.listen, self.backend.nf_table(self.spec.listen))
    }
}

/// The priority of cpha's own NAT chains in prerouting and output (nftables' `dstnat`, which is
/// also where iptables-nft's nat chains are).
const OWN_PRIORITY: i64 = -100;

/// Rules of other tables, in `nft -j list ruleset` output, that translate new connections to
/// `listen` before cpha's chains can (a `dnat` or `redirect` in a table with a NAT chain hooked
/// to prerouting or output at cpha's priority or before): the first connection's translation
/// is the only one, so cpha cannot out-rank them. `own` is cpha's table, left out.
pub fn outranking(json: &str, listen: std::net::SocketAddr, own: (u8, &str)) -> anyhow::Result<Option<String>> {
    use serde_json::Value;
    let doc: Value = serde_json::from_str(json).context("nft printed JSON cpha cannot read")?;
    let items = doc["nftables"].as_array().context("nft JSON has no \"nftables\" array")?;
    let family_number = |f: &str| match f {
        "inet" => 1,
        "ip" => 2,
        "ip6" => 10,
        _ => 255,
    };
    let reaches = |f: &str| f == "inet" || ((f == "ip") == listen.is_ipv4() && (f == "ip" || f == "ip6"));
    // Tables with a NAT base chain that runs no later than cpha's, with that chain's hook and
    // priority.
    let mut early: Vec<(String, String, String, i64)> = Vec::new();
    for chain in items.iter().filter_map(|i| i.get("chain")) {
        let (Some(family), Some(table)) = (chain["family"].as_str(), chain["table"].as_str()) else { continue };
        if (family_number(family), table) == own || !reaches(family) || chain["type"] != "nat" {
            continue;
        }
        let hook = chain["hook"].as_str().unwrap_or_default();
        let prio = chain["prio"].as_i64().unwrap_or(i64::MAX);
        if (hook == "prerouting" || hook == "output") && prio <= OWN_PRIORITY {
            early.push((family.into(), table.into(), hook.into(), prio));
        }
    }
    let mut found = Vec::new();
    for rule in items.iter().filter_map(|i| i.get("rule")) {
        let (Some(family), Some(table)) = (rule["family"].as_str(), rule["table"].as_str()) else { continue };
        let Some((_, _, hook, prio)) = early.iter().find(|(f, t, _, _)| f == family && t == table) else { continue };
        let exprs = rule["expr"].as_array().map(Vec::as_slice).unwrap_or_default();
        if !exprs.iter().any(|e| e.get("dnat").is_some() || e.get("redirect").is_some()) {
            continue;
        }
        let mut daddr_ok = true;
        let mut dport_ok = true;
        for m in exprs.iter().filter_map(|e| e.get("match")) {
            match m["left"]["payload"]["field"].as_str() {
                Some("daddr") => daddr_ok &= m["right"].as_str().and_then(|a| a.parse().ok()) == Some(listen.ip()),
                Some("dport") => dport_ok &= m["right"].as_u64() == Some(u64::from(listen.port())),
                _ => {}
            }
        }
        if daddr_ok && dport_ok {
            let chain = rule["chain"].as_str().unwrap_or_default();
            found.push(format!(
                "table {family} {table} (chain {chain}; its {hook} hook at priority {prio}, cpha's at {OWN_PRIORITY}) translates {listen} first"
            ));
        }
    }
    found.dedup();
    Ok((!found.is_empty()).then(|| found.join("; ")))
}

/// The sentence for a drift of rules and sysctls, if any.
pub fn describe(rules: Option<String>, sysctls: Option<String>) -> Option<String> {
    match (rules, sysctls) {
        (None, None) => None,
        (Some(r), None) => Some(r),
        (None, Some(s)) => Some(s),
        (Some(r), Some(s)) => Some(format!("{r}; {s}")),
    }
}

/// What the watcher tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The forward differs from what was installed, in words.
    Drift(String),
    /// Another table translates the endpoint's address and port before cpha's forward sees
    /// the connection (`Some`, in words), or no longer does (`None`). Reported, not fought.
    Outranked(Option<String>),
}

/// How often, at most, the whole ruleset is read to look for a rule that outranks cpha's.
/// NOTE: only after another table changed, and never more often than this: on a host whose
/// kube-proxy rewrites its tables every second a large ruleset is read once per period, not
/// at each of its changes. A report may wait this long; a repair never does.
const CONTEST_EVERY: Duration = Duration::from_secs(15);

/// Watches until `stop`: each drift from `expected` (while it is set) is sent on `reports`,
/// and so is every change of whether another table outranks the forward.
pub async fn run(
    mut expected: watch::Receiver<Option<Arc<Expected>>>,
    reports: mpsc::Sender<Report>,
    poll: Duration,
    stop: CancellationToken,
) {
    let mut events = match Notifications::open() {
        Ok(n) => Some(n),
        Err(err) => {
            tracing::warn!(
                "cannot follow nf_tables changes ({err:#}): the forward is read back every {poll:?} instead"
            );
            None
        }
    };
    let mut resync = if events.is_some() { RESYNC } else { poll };
    let mut next_full = tokio::time::Instant::now() + resync;
    let mut failing = false;
    // Another table's changes: when the ruleset may next be read for a rule that outranks
    // cpha's, whether one is waiting for that, and what was last reported.
    let mut next_contest = tokio::time::Instant::now();
    let mut contest_due = true;
    let mut outranked: Option<String> = None;
    loop {
        let (table, sysctls) = match expected.borrow().as_ref() {
            Some(e) => (Some(e.backend.nf_table(e.spec.listen)), !e.sysctls.is_empty()),
            None => (None, false),
        };
        // NOTE: idle, the watcher wakes only for the sysctls it must read (and the resync):
        // a forward that relies on none costs one wake-up every RESYNC.
        let mut wake = if sysctls { (tokio::time::Instant::now() + poll).min(next_full) } else { next_full };
        if contest_due && table.is_some() {
            wake = wake.min(next_contest);
        }
        let check = tokio::select! {
            () = stop.cancelled() => return,
            changed = async {
                match (&mut events, table) {
                    (Some(n), Some(table)) => n.changed(table).await,
                    _ => std::future::pending().await,
                }
            } => match changed {
                Ok(seen) => {
                    contest_due |= seen.other;
                    seen.own
                }
                Err(err) => {
                    tracing::warn!("nf_tables notifications failed ({err}): the forward is read back every {poll:?} instead");
                    events = None;
                    resync = poll;
                    true
                }
            },
            () = tokio::time::sleep_until(wake) => {
                tokio::time::Instant::now() >= next_full
                    || expected.borrow().as_ref().is_some_and(|e| !e.sysctls_off().is_empty())
            }
            // A new forward was installed and read back: nothing to compare yet.
            Ok(()) = expected.changed() => {
                contest_due = true;
                false
            }
        };
        if check && !compare(&mut events, &expected, &reports, &mut failing, &mut contest_due).await {
            return;
        }
        if check {
            next_full = tokio::time::Instant::now() + resync;
        }
        // After the repair's read-back, never before it: this one may read a large ruleset.
        if contest_due && tokio::time::Instant::now() >= next_contest {
            let want = expected.borrow().clone();
            if let Some(want) = want {
                contest_due = false;
                next_contest = tokio::time::Instant::now() + CONTEST_EVERY;
                match tokio::task::spawn_blocking(move || want.outranked()).await {
                    Ok(Ok(found)) if found != outranked => {
                        outranked = found.clone();
                        if reports.send(Report::Outranked(found)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => tracing::debug!("reading the ruleset for rules that outrank cpha's: {err:#}"),
                    Err(err) => tracing::error!("the ruleset read-back task failed: {err}"),
                }
            }
        }
    }
}

/// Reads the forward back after a change (or a due look) and reports a drift; false when the
/// agent is gone.
async fn compare(
    events: &mut Option<Notifications>,
    expected: &watch::Receiver<Option<Arc<Expected>>>,
    reports: &mpsc::Sender<Report>,
    failing: &mut bool,
    contest_due: &mut bool,
) -> bool {
    if let Some(n) = events {
        // One transaction sends a message per object: read back once, after the last.
        tokio::time::sleep(SETTLE).await;
        *contest_due |= n.drain().other;
    }
    let want = expected.borrow().clone();
    let Some(want) = want else { return true };
    match tokio::task::spawn_blocking(move || want.compare()).await {
        Ok(Ok((rules, sysctls))) => {
            *failing = false;
            if let Some(why) = describe(rules, sysctls) {
                tracing::debug!("forward drift seen: {why}");
                return reports.send(Report::Drift(why)).await.is_ok();
            }
        }
        Ok(Err(err)) if !*failing => {
            *failing = true;
            tracing::warn!("reading the forward back to compare it: {err:#}");
        }
        Ok(Err(_)) => {}
        Err(err) => tracing::error!("the forward's read-back task failed: {err}"),
    }
    true
}

/// A netlink socket subscribed to nf_tables ruleset changes in this network namespace.
struct Notifications {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl Notifications {
    fn open() -> anyhow::Result<Notifications> {
        use nix::sys::socket::{bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType};
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkNetFilter,
        )
        .context("opening a netfilter netlink socket")?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1 << (NFNLGRP_NFTABLES - 1)))
            .context("joining the nf_tables notification group (needs CAP_NET_ADMIN)")?;
        // NOTE: `AsyncFd::new` is deprecated for types whose descriptor may change or close
        // behind it; an `OwnedFd` it owns cannot, and this keeps the crate free of `unsafe`.
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd).context("registering the netlink socket")?;
        Ok(Notifications { fd, buf: vec![0; 65536] })
    }

    /// Waits for the next datagram: whether it changes `table` (`(family, name)`) or another
    /// table; both when messages were lost (the socket's buffer overran).
    async fn changed(&mut self, table: (u8, &str)) -> std::io::Result<Seen> {
        loop {
            let mut guard = self.fd.readable().await?;
            let buf = &mut self.buf;
            match guard.try_io(|fd| {
                nix::sys::socket::recv(fd.get_ref().as_raw_fd(), buf, nix::sys::socket::MsgFlags::empty())
                    .map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => return Ok(seen(&self.buf[..n], table)),
                Ok(Err(err)) if err.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) => {
                    return Ok(Seen { own: true, other: true })
                }
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads what is queued; whether any of it was about another table.
    fn drain(&mut self) -> Seen {
        let fd = self.fd.get_ref().as_raw_fd();
        let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        let mut all = Seen::default();
        while let Ok(n) = nix::sys::socket::recv(fd, &mut self.buf, flags) {
            if n == 0 {
                break;
            }
            // Which table does not matter here: the forward is read back anyway.
            all.other |= seen(&self.buf[..n], (0, "")).other;
        }
        all
    }
}

/// What a datagram of nf_tables messages was about.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The watched table.
    pub own: bool,
    /// Some other table.
    pub other: bool,
}

/// Which tables a datagram of netlink messages is about: every nf_tables message about a
/// table, chain, rule, set or object carries the table's name as attribute 1
/// (`NFTA_TABLE_NAME`, `NFTA_CHAIN_TABLE`, `NFTA_RULE_TABLE`, ...), after the family.
pub fn seen(mut buf: &[u8], (family, table): (u8, &str)) -> Seen {
    const NLMSG_HDR: usize = 16;
    const NFGENMSG: usize = 4;
    let mut out = Seen::default();
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDR || len > buf.len() {
            return out;
        }
        let msg = &buf[..len];
        if kind >> 8 == NFNL_SUBSYS_NFTABLES && msg.len() >= NLMSG_HDR + NFGENMSG {
            let msg_family = msg[NLMSG_HDR];
            let mut attrs = &msg[NLMSG_HDR + NFGENMSG..];
            while attrs.len() >= 4 {
                let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                let atype = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                if atype == 1 {
                    let name = &attrs[4..alen];
                    let name = name.split(|b| *b == 0).next().unwrap_or(name);
                    if msg_family == family && name == table.as_bytes() {
                        out.own = true;
                    } else {
                        out.other = true;
                    }
                    break;
                }
                attrs = &attrs[(alen + 3) & !3..];
            }
        }
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One nf_tables message of `msg` type in `family` whose first attribute is `table`.
    fn message(msg: u8, family: u8, table: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let name_len = table.len() + 1;
        attr.extend(((4 + name_len) as u16).to_ne_bytes());
        attr.extend(1u16.to_ne_bytes());
        attr.extend(table.as_bytes());
        attr.push(0);
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        let len = 16 + 4 + attr.len();
        let mut m = Vec::new();
        m.extend((len as u32).to_ne_bytes());
        m.extend(((NFNL_SUBSYS_NFTABLES << 8) | u16::from(msg)).to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend([family, 0, 0, 0]);
        m.extend(attr);
        m
    }

    #[test]
    fn only_messages_about_the_watched_table_count() {
        // NFT_MSG_DELTABLE (2) for `inet cpha` after one for `inet other`, as `flush ruleset`
        // sends them.
        let touches = |buf: &[u8], table| seen(buf, table).own;
        let mut flush = message(2, 1, "other");
        flush.extend(message(2, 1, "cpha"));
        assert_eq!(seen(&flush, (1, "cpha")), Seen { own: true, other: true });
        assert_eq!(seen(&message(2, 1, "other"), (1, "cpha")), Seen { own: false, other: true });
        // A rule (NFT_MSG_NEWRULE, 6) in `ip nat`: iptables-nft's table, not an inet one.
        assert!(touches(&message(6, 2, "nat"), (2, "nat")));
        assert!(!touches(&message(6, 2, "nat"), (1, "cpha")));
        assert!(!touches(&message(6, 10, "nat"), (2, "nat")));
        assert!(!touches(&message(6, 1, "cphax"), (1, "cpha")));
        assert_eq!(seen(&[0u8; 7], (1, "cpha")), Seen::default(), "a short datagram is ignored");
    }

    #[test]
    fn a_dnat_in_an_earlier_table_outranks_and_one_after_does_not() {
        let ruleset = |prio: i64, port: u16| {
            serde_json::json!({"nftables": [
                {"table": {"family": "ip", "name": "other", "handle": 9}},
                {"chain": {"family": "ip", "table": "other", "name": "pre", "handle": 1, "type": "nat", "hook": "prerouting", "prio": prio, "policy": "accept"}},
                {"rule": {"family": "ip", "table": "other", "chain": "pre", "handle": 2, "expr": [
                    {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.10.0.1"}},
                    {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": port}},
                    {"dnat": {"addr": "10.21.0.2", "port": 6443}}]}},
                {"chain": {"family": "inet", "table": "cpha", "name": "prerouting", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
                {"rule": {"family": "inet", "table": "cpha", "chain": "prerouting", "handle": 3, "expr": [
                    {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 6443}},
                    {"dnat": {"family": "ip", "addr": "10.10.0.1", "port": 9445}}]}}
            ]})
            .to_string()
        };
        let listen = "10.10.0.1:6443".parse().unwrap();
        let found = outranking(&ruleset(-150, 6443), listen, (1, "cpha")).unwrap().unwrap();
        assert_eq!(
            found,
            "table ip other (chain pre; its prerouting hook at priority -150, cpha's at -100) translates 10.10.0.1:6443 first"
        );
        assert_eq!(outranking(&ruleset(0, 6443), listen, (1, "cpha")).unwrap(), None, "after cpha's chains");
        assert_eq!(outranking(&ruleset(-150, 8443), listen, (1, "cpha")).unwrap(), None, "another port");
        let v6: std::net::SocketAddr = "[fd00::1]:6443".parse().unwrap();
        assert_eq!(outranking(&ruleset(-150, 6443), v6, (1, "cpha")).unwrap(), None, "another family");
    }
}
