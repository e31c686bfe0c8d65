//! The kernel forward changed by someone else under `cpha run`, with real nftables, iptables
//! and HAProxy in network namespaces (tests/support/cluster.rs, one member), and a client on
//! another host opening 50 new TLS connections a second through the endpoint: each kind of
//! drift is read back from the kernel as cpha installed it within 1 s, and new connections
//! succeed again. Each prints a line with the time to repair and the failed connections
//! (docs/benchmarks.md, "Repairing the kernel forward"). Needs root.

#[path = "support/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cluster::{load_report, Cluster};
use cpha_lab::netns;

const LONG: Duration = Duration::from_secs(60);
/// What a repair may take, from the change to the forward read back as installed.
const BOUND: Duration = Duration::from_secs(1);
const RATE: u32 = 50;

/// One member, the agent in `mode` and, with `haproxy`, balanced through HAProxy (the retarget
/// topology: the forward points at HAProxy's private address on this host).
fn cluster(mode: &str, haproxy: bool) -> Result<Cluster> {
    let mut c = Cluster::new(1)?;
    c.set_members(&c.member_list(&[1]))?;
    let config = c.write_config("retarget", mode, &c.members[0].addr.clone())?;
    c.start_agent(&config)?;
    if haproxy {
        c.start_haproxy()?;
        c.wait_phase(&["balanced"], LONG)?;
    }
    // The endpoint answers through the forward as installed before anything is changed.
    let report = load_report(c.https_loop(&c.client, "1s")?, LONG)?;
    ensure!(report.ok > 0 && report.failed == 0, "before any change: {report:?}");
    Ok(c)
}

/// A table as nft lists it, the counters' values left out.
fn nft_table(c: &Cluster, name: &str) -> Result<Vec<String>> {
    let table = c.cp.run("nft", &["list", "table", "inet", name])?;
    Ok(table
        .lines()
        .map(|l| {
            let words: Vec<&str> = l.split(' ').collect();
            let mut kept = Vec::new();
            let mut i = 0;
            while i < words.len() {
                if words[i] == "packets" || words[i] == "bytes" {
                    i += 2;
                    continue;
                }
                kept.push(words[i]);
                i += 1;
            }
            kept.join(" ")
        })
        .collect())
}

/// cpha's forward as nft lists it.
fn nft_forward(c: &Cluster) -> Result<Vec<String>> {
    nft_table(c, "cpha")
}

/// cpha's chains and jumps in the nat table, counters left out.
fn iptables_forward(c: &Cluster) -> Result<Vec<String>> {
    let save = c.cp.run("iptables-save", &["-t", "nat"])?;
    Ok(save.lines().filter(|l| l.contains("CPHA")).map(|l| l.split(" [").next().unwrap_or(l).to_string()).collect())
}

fn ip_forward(c: &Cluster) -> Result<Vec<String>> {
    Ok(vec![c.cp.sysctl_get("net.ipv4.ip_forward")?])
}

/// Changes the forward with `change` (commands run in the cp namespace) under load and
/// returns the time until `read` shows it as it was, and the load's report line.
fn repaired(
    c: &Cluster,
    kind: &str,
    change: &[&[&str]],
    read: fn(&Cluster) -> Result<Vec<String>>,
) -> Result<Duration> {
    let installed = read(c)?;
    let repairs_before = repairs(c)?;
    let load = c.https_load(&c.client, "/readyz", RATE, 10, 4)?;
    std::thread::sleep(Duration::from_secs(1));
    for cmd in change {
        c.cp.run(cmd[0], &cmd[1..])?;
    }
    // NOTE: the first read may already show the repair; that the change was seen at all is
    // proven by the repair counted below.
    let t0 = Instant::now();
    let took = netns::wait_for(&format!("{kind}: the forward put back"), Duration::from_secs(5), || {
        Ok((read(c).ok().as_ref() == Some(&installed)).then(|| t0.elapsed()))
    })
    .with_context(|| c.agent_log())?;
    let report = load_report(load, LONG)?;
    eprintln!(
        "REPAIR {kind}: put back in {} ms; {} of {} connections failed (errors {:?}, between {:?} and {:?} s), slowest {:.0} ms",
        took.as_millis(),
        report.failed,
        report.ok + report.failed,
        report.error_kinds,
        report.first_failure_s,
        report.last_failure_s,
        report.max_ms
    );
    ensure!(took <= BOUND, "{kind}: put back after {took:?}");
    // New connections succeed again, and the repair was counted and shown once.
    let after = load_report(c.https_loop(&c.client, "1s")?, LONG)?;
    ensure!(after.ok > 0 && after.failed == 0, "{kind}: after the repair: {after:?}");
    netns::wait_for(&format!("{kind}: the repair counted"), Duration::from_secs(5), || {
        Ok((repairs(c)? == repairs_before + 1).then_some(()))
    })?;
    let status = c.status()?;
    let last = &status["agent"]["last_repair"];
    ensure!(last["object"] == "forward" && last["why"].as_str().is_some_and(|w| !w.is_empty()), "{status}");
    Ok(took)
}

fn repairs(c: &Cluster) -> Result<u64> {
    let metrics = c.metrics()?;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("cpha_repairs_total{object=\"forward\"}"))
        .with_context(|| format!("no cpha_repairs_total in\n{metrics}"))?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

fn other_table(c: &Cluster) -> Result<Vec<String>> {
    nft_table(c, "other")
}

#[test]
fn nftables_forward_flushed_deleted_or_emptied_is_put_back_and_other_tables_are_left_alone() {
    let c = cluster("nftables", true).unwrap();
    repaired(&c, "nftables: nft flush ruleset", &[&["nft", "flush", "ruleset"]], nft_forward).unwrap();

    // Another program's table, with a chain on a hook and a rule of its own.
    c.cp.run("nft", &["add", "table", "inet", "other"]).unwrap();
    c.cp.run(
        "nft",
        &["add", "chain", "inet", "other", "input", "{ type filter hook input priority 0; policy accept; }"],
    )
    .unwrap();
    c.cp.run("nft", &["add", "rule", "inet", "other", "input", "tcp", "dport", "9999", "counter", "accept"]).unwrap();
    let other = other_table(&c).unwrap();

    repaired(&c, "nftables: nft delete table inet cpha", &[&["nft", "delete", "table", "inet", "cpha"]], nft_forward)
        .unwrap();
    repaired(
        &c,
        "nftables: nft flush chain inet cpha prerouting",
        &[&["nft", "flush", "chain", "inet", "cpha", "prerouting"]],
        nft_forward,
    )
    .unwrap();
    // A change to the other table is no drift of cpha's: nothing is repaired.
    let before = repairs(&c).unwrap();
    c.cp.run("nft", &["add", "rule", "inet", "other", "input", "tcp", "dport", "9998", "accept"]).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(repairs(&c).unwrap(), before);
    let mut want = other.clone();
    want.insert(want.len() - 2, "\t\ttcp dport 9998 accept".into());
    assert!(other.iter().any(|l| l == "\t\ttcp dport 9999 counter accept"), "{other:?}");
    assert_eq!(other_table(&c).unwrap(), want, "the other table was touched");

    // One line per repair in the log, and an Event each.
    let log = c.agent_log();
    assert_eq!(log.matches("ForwardRepaired").count(), 3, "{log}");
    let events = c.kubectl(&["get", "events.events.k8s.io", "-n", "kube-system", "-o", "json"], None).unwrap();
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let repaired_events = events["items"].as_array().into_iter().flatten().filter(|e| e["reason"] == "ForwardRepaired");
    assert!(repaired_events.count() >= 1, "no ForwardRepaired event: {events}");
}

/// Another table DNATs the endpoint's address and port at an earlier priority than cpha's
/// chains: cpha cannot out-rank it, so it says so (log, Event, `/status`) and changes nothing.
#[test]
fn a_dnat_that_outranks_the_forward_is_reported_and_left_alone() {
    let c = cluster("nftables", true).unwrap();
    let forward = nft_forward(&c).unwrap();
    let repairs_before = repairs(&c).unwrap();
    c.cp.run("nft", &["add", "table", "ip", "other"]).unwrap();
    c.cp.run(
        "nft",
        &["add", "chain", "ip", "other", "pre", "{ type nat hook prerouting priority -150; policy accept; }"],
    )
    .unwrap();
    let member = c.members[0].addr.clone();
    c.cp.run(
        "nft",
        &[
            "add",
            "rule",
            "ip",
            "other",
            "pre",
            "ip",
            "daddr",
            "10.10.0.1",
            "tcp",
            "dport",
            "6443",
            "dnat",
            "to",
            &member,
        ],
    )
    .unwrap();
    let other = c.cp.run("nft", &["list", "table", "ip", "other"]).unwrap();
    // The ruleset is read at most every 15 s after another table changes (one read at start).
    let by = netns::wait_for("the outranking rule reported", Duration::from_secs(20), || {
        Ok(c.status()?["agent"]["outranked_by"].as_str().map(str::to_string))
    })
    .unwrap();
    assert!(by.contains("table ip other") && by.contains("10.10.0.1:6443"), "{by}");
    // Connections go where the other rule says (straight to the member), and nothing of
    // anyone's was changed.
    let report = load_report(c.https_loop(&c.client, "1s").unwrap(), LONG).unwrap();
    assert!(report.ok > 0 && report.failed == 0, "{report:?}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.cp.run("nft", &["list", "table", "ip", "other"]).unwrap(), other);
    assert_eq!(nft_forward(&c).unwrap(), forward);
    assert_eq!(repairs(&c).unwrap(), repairs_before);
    assert_eq!(c.agent_log().matches("ForwardOutranked").count(), 1, "{}", c.agent_log());
    // Gone again: the report ends.
    c.cp.run("nft", &["delete", "table", "ip", "other"]).unwrap();
    netns::wait_for("the report ended", Duration::from_secs(20), || {
        Ok(c.status()?["agent"].get("outranked_by").is_none_or(|v| v.is_null()).then_some(()))
    })
    .unwrap();
}

#[test]
fn iptables_forward_with_a_chain_flushed_or_a_jump_deleted_is_put_back() {
    let c = cluster("iptables", true).unwrap();
    repaired(
        &c,
        "iptables: iptables -t nat -F CPHA-PREROUTING",
        &[&["iptables", "-t", "nat", "-F", "CPHA-PREROUTING"]],
        iptables_forward,
    )
    .unwrap();
    repaired(
        &c,
        "iptables: the PREROUTING jump deleted",
        &[&[
            "iptables",
            "-t",
            "nat",
            "-D",
            "PREROUTING",
            "-m",
            "comment",
            "--comment",
            "cpha bootstrap forward",
            "-j",
            "CPHA-PREROUTING",
        ]],
        iptables_forward,
    )
    .unwrap();
}

#[test]
fn ip_forward_turned_off_under_a_forward_to_another_host_is_turned_on_again() {
    // No HAProxy: the forward sends the endpoint to the member on its own host.
    let c = cluster("nftables", false).unwrap();
    assert_eq!(c.phase().unwrap(), "forwarding");
    repaired(&c, "sysctl net.ipv4.ip_forward=0", &[&["sysctl", "-qw", "net.ipv4.ip_forward=0"]], ip_forward).unwrap();
}

/// The idle cost of a balanced agent (three members, HAProxy healthy, nothing changing): CPU
/// time (utime + stime from /proc/PID/stat) over 60 s, after 10 s to settle. `CPHA_IDLE_BIN`
/// measures another build of cpha the same way (docs/benchmarks.md compares the two).
/// Run: `cargo test --test repair -- --ignored --nocapture idle`.
#[test]
#[ignore = "a 70 s measurement"]
fn idle_cpu_of_a_balanced_agent() {
    let mut c = Cluster::new(3).unwrap();
    c.set_members(&c.member_list(&[1, 2, 3])).unwrap();
    let config = c.write_default_config("retarget", "nftables", &c.members[0].addr.clone()).unwrap();
    let bin = std::env::var("CPHA_IDLE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cpha").to_string());
    let log = std::fs::File::create(c.dir.join("cpha.log")).unwrap();
    let mut cmd = c.cp.command(&bin);
    cmd.args(["run", "--config"]).arg(&config).stderr(log);
    c.agent = Some(netns::Child::spawn(cmd, "cpha run").unwrap());
    c.wait_phase(&["forwarding"], LONG).unwrap();
    c.start_haproxy().unwrap();
    c.wait_phase(&["balanced"], LONG).unwrap();
    let pid = c.agent.as_ref().unwrap().pid();
    std::thread::sleep(Duration::from_secs(10));
    // The agent's own CPU time (utime + stime) and that of the processes it started and
    // waited for (cutime + cstime: nft, iptables-save), in clock ticks.
    let ticks = || -> (u64, u64) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> =
            stat.rsplit_once(") ").unwrap().1.split(' ').skip(11).take(4).map(|v| v.parse().unwrap()).collect();
        (f[0] + f[1], f[2] + f[3])
    };
    let (t0, before) = (Instant::now(), ticks());
    std::thread::sleep(Duration::from_secs(60));
    let (spent, after) = (t0.elapsed(), ticks());
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = rss.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or_default().to_string();
    // Clock ticks are 1/100 s on Linux.
    let percent = |ticks: u64| ticks as f64 / 100.0 / spent.as_secs_f64() * 100.0;
    let (own, children) = (after.0 - before.0, after.1 - before.1);
    eprintln!(
        "IDLE {bin}: {own} ticks in {spent:?}: {:.3} % of one core; children {children} ticks ({:.3} %); {rss}",
        percent(own),
        percent(children)
    );
    assert_eq!(c.phase().unwrap(), "balanced");
}
