//! The failover benchmark behind `tools/bench --failover`: in the VIP lab ([`crate::vrrp`]),
//! under steady new-connection load from the worker, each kind of failure of the VIP's holder
//! again and again; the time from the fault until the worker's connections succeed again, and
//! the connections that failed meanwhile. Then an idle run under CPU load, counting VIP moves
//! nobody caused. Written up as a Markdown section of docs/benchmarks.md.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::write_atomically;
use crate::netns::{wait_for, Child};
use crate::report::{median, LoadReport};
use crate::stop;
use crate::vrrp::{recovery, LabOpts, Programs, VipLab};

pub const BEGIN: &str = "<!-- failover: begin (tools/bench --failover writes this section) -->";
pub const END: &str = "<!-- failover: end -->";

#[derive(Clone, Debug)]
pub struct FailoverOpts {
    pub programs: Programs,
    pub runs: usize,
    /// How long the idle stability run lasts (0: skipped).
    pub idle: Duration,
    /// New connections per second from the worker.
    pub rate: u32,
    pub out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Link,
    Keepalived,
    Endpoint,
}

const KINDS: [Kind; 3] = [Kind::Link, Kind::Keepalived, Kind::Endpoint];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Link => "holder's link down",
            Kind::Keepalived => "holder's keepalived SIGKILLed",
            Kind::Endpoint => "holder's HAProxy killed and its forward's path refused",
        }
    }
}

struct Sample {
    /// From the fault until the address was on the new holder.
    moved: Option<Duration>,
    recovery: Duration,
    failed: u64,
    attempts: u64,
}

pub fn run(opts: &FailoverOpts) -> Result<String> {
    if opts.runs == 0 || opts.runs > 50 {
        bail!("--runs must be between 1 and 50");
    }
    let started = Instant::now();
    let load_before = loadavg();
    let mut lab = VipLab::new(opts.programs.clone(), LabOpts::default())?;
    lab.start_all(true)?;
    wait_all_healthy(&lab)?;
    let mut samples: Vec<(Kind, Vec<Sample>)> = KINDS.iter().map(|k| (*k, Vec::new())).collect();
    for round in 0..opts.runs {
        for (kind, list) in &mut samples {
            if stop::requested() {
                bail!("stopped");
            }
            let holder = lab.wait_holder(Duration::from_secs(20), None)?;
            let sample = one(&mut lab, holder, *kind, opts.rate)
                .with_context(|| format!("{} (round {})", kind.label(), round + 1))?;
            eprintln!(
                "failover: {} round {}: {:.0} ms, {} failed",
                kind.label(),
                round + 1,
                sample.recovery.as_secs_f64() * 1000.0,
                sample.failed
            );
            list.push(sample);
            restore(&mut lab, holder, *kind)?;
        }
    }
    let idle = if opts.idle.is_zero() { None } else { Some(idle_run(&lab, opts.idle)?) };
    let overlap = lab.longest_overlap(started, Instant::now());
    drop(lab);
    let load = format!("{} at the start, {} at the end", load_before, loadavg());
    let section = render(opts, &samples, idle.as_ref(), overlap, started.elapsed(), &load);
    if let Some(out) = &opts.out {
        let old = std::fs::read_to_string(out).unwrap_or_default();
        write_atomically(out, &replace_section(&old, &section))?;
        eprintln!("bench: wrote the failover section of {}", out.display());
    }
    Ok(section)
}

/// One fault under load; the new holder must be another host.
fn one(lab: &mut VipLab, holder: usize, kind: Kind, rate: u32) -> Result<Sample> {
    let spawned = Instant::now();
    let load = lab.worker_load(Duration::from_secs(8), rate, Duration::from_secs(1))?;
    std::thread::sleep(Duration::from_millis(2000));
    let fault = Instant::now();
    match kind {
        Kind::Link => lab.link(holder, false)?,
        Kind::Keepalived => lab.kill_keepalived(holder)?,
        Kind::Endpoint => lab.break_endpoint(holder)?,
    }
    let new = lab.wait_holder(Duration::from_secs(15), Some(holder))?;
    let report = finish(load)?;
    let moved = lab
        .changes
        .lock()
        .expect("lock")
        .iter()
        .find(|c| c.at >= fault && c.host == new && c.holds)
        .map(|c| c.at - fault);
    let fault_s = fault.duration_since(spawned).as_secs_f64();
    let (recovery, failed) = recovery(&report.timeline, fault_s).context("no successful connection after the fault")?;
    Ok(Sample { moved, recovery, failed, attempts: report.ok + report.failed })
}

/// Puts the failed host back as an operator (or systemd) would, and waits until every host is
/// healthy again so that the next round starts from the same place.
fn restore(lab: &mut VipLab, host: usize, kind: Kind) -> Result<()> {
    match kind {
        Kind::Link => lab.link(host, true)?,
        Kind::Keepalived => lab.start_keepalived(host)?,
        Kind::Endpoint => {
            lab.repair_endpoint(host)?;
            lab.start_haproxy(host)?;
        }
    }
    wait_all_healthy(lab)
}

fn wait_all_healthy(lab: &VipLab) -> Result<()> {
    wait_for("every host balanced, advertising healthy, keepalived backup or master", Duration::from_secs(60), || {
        for i in 0..lab.hosts.len() {
            let Ok(s) = lab.status(i) else { return Ok(None) };
            let a = &s["agent"];
            let vrrp = a["vip"]["vrrp_state"].as_str().unwrap_or_default();
            if a["phase"] != "balanced" || a["vip"]["advertised"] != "healthy" || !matches!(vrrp, "backup" | "master") {
                return Ok(None);
            }
        }
        Ok(lab.holders()?.len().eq(&1).then_some(()))
    })
    .with_context(|| lab.logs())
}

fn finish(mut child: Child) -> Result<LoadReport> {
    let (_, lines) = child.finish(Duration::from_secs(30))?;
    let line = lines.last().context("the load client printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

struct Idle {
    duration: Duration,
    moves: usize,
    health_changes: usize,
}

/// `duration` with nothing failing and two CPU-bound processes competing for the machine's
/// CPUs: every VIP move or change of advertised health is spurious.
fn idle_run(lab: &VipLab, duration: Duration) -> Result<Idle> {
    let advertised = |lab: &VipLab| -> usize {
        (0..lab.hosts.len()).map(|i| lab.log(i, "cpha.log").matches("advertising to keepalived").count()).sum()
    };
    let before = advertised(lab);
    let from = Instant::now();
    let mut burners: Vec<Child> = Vec::new();
    for _ in 0..2 {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "while :; do :; done"]).stderr(Stdio::null());
        burners.push(Child::spawn(cmd, "cpu burner")?);
    }
    eprintln!("failover: idle run of {duration:?} under CPU load");
    while from.elapsed() < duration && !stop::requested() {
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(burners);
    let to = Instant::now();
    let moves = lab.changes.lock().expect("lock").iter().filter(|c| c.at >= from && c.at <= to).count();
    Ok(Idle { duration: to - from, moves, health_changes: advertised(lab) - before })
}

/// The 1-minute load average: other work on the machine moves these figures.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "unknown".into())
}

fn render(
    opts: &FailoverOpts,
    samples: &[(Kind, Vec<Sample>)],
    idle: Option<&Idle>,
    overlap: Duration,
    took: Duration,
    load: &str,
) -> String {
    let mut s = String::new();
    s.push_str(BEGIN);
    s.push_str("\n\n## Failover of the virtual IP\n\n");
    s.push_str(&format!(
        "Three control-plane hosts and a worker on one bridge, each host with its apiserver (the API stand-in), HAProxy, `cpha run` and keepalived {} at cpha's `vip:` defaults (VRRPv3, `advertInterval` 400ms, equal priorities, `checkInterval` 500ms, `fall` 2). The worker opens {} new TLS connections a second to the VIP (`GET /readyz`, each bounded to 1 s) while the holder fails. **Recovery** is the time from the fault until the worker's connections succeed again (the end of the first successful connection started after the last failed one); **failed** counts the worker's connections that failed after the fault. {} rounds of each kind, interleaved, on the machine's 2 CPUs; {:.0} s in all; 1-minute load average {}.\n\n",
        keepalived_version(),
        opts.rate,
        opts.runs,
        took.as_secs_f64(),
        load
    ));
    s.push_str("| failure of the holder | address on the new holder, median | recovery, median | recovery, worst | failed, median | failed, worst | attempts per round |\n|---|---|---|---|---|---|---|\n");
    for (kind, list) in samples {
        let rec: Vec<f64> = list.iter().map(|x| x.recovery.as_secs_f64() * 1000.0).collect();
        let moved: Vec<f64> = list.iter().filter_map(|x| x.moved).map(|d| d.as_secs_f64() * 1000.0).collect();
        let failed: Vec<f64> = list.iter().map(|x| x.failed as f64).collect();
        let attempts: Vec<f64> = list.iter().map(|x| x.attempts as f64).collect();
        let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        s.push_str(&format!(
            "| {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} | {:.0} | {:.0} |\n",
            kind.label(),
            median(&moved).unwrap_or(f64::NAN),
            median(&rec).unwrap_or(f64::NAN),
            worst(&rec),
            median(&failed).unwrap_or(f64::NAN),
            worst(&failed),
            median(&attempts).unwrap_or(f64::NAN)
        ));
    }
    s.push_str(&format!(
        "\nLongest time two hosts held the VIP at once, over the whole run: {:.1} ms (one advertisement interval is 400 ms).\n",
        overlap.as_secs_f64() * 1000.0
    ));
    if let Some(idle) = idle {
        s.push_str(&format!(
            "\nIdle run: {:.0} s with nothing failing and two CPU-bound processes competing for both CPUs: **{} VIP moves, {} changes of advertised health**.\n",
            idle.duration.as_secs_f64(),
            idle.moves,
            idle.health_changes
        ));
    }
    s.push_str(
        "\nWhy the kinds differ:\n\n\
- **Link down**: the backups hear no advertisement and wait VRRP's master-down interval, 3 × 400 ms plus the skew time (0.24 s at priority 100): about 1.45 s, then a gratuitous ARP moves the worker. The host that lost its link is also a member, and its apiserver went with it: until HAProxy's checks on the new holder mark it DOWN, some of the worker's connections are sent to it and time out, which is the rest of the recovery.\n\
- **keepalived SIGKILLed**: it cannot send its priority-0 advertisement and leaves the address on the interface. cpha sees keepalived's notify FIFO close, waits 300 ms for a reload to reopen it, and removes the address, so two hosts never hold it; the backups take over after the master-down interval, as for a link.\n\
- **HAProxy and the forward failed**: cpha's endpoint check (every 500 ms, through the endpoint itself) fails twice, cpha writes -254 to the tracked file, keepalived enters FAULT and sends a priority-0 advertisement, and a backup takes over after the skew time. The fallback to the forward comes first (HAProxy gone, 400 ms), and its failed checks follow.\n\n",
    );
    s.push_str(END);
    s.push('\n');
    s
}

fn keepalived_version() -> String {
    let out = Command::new("keepalived").arg("--version").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout))
        .unwrap_or_default();
    text.split_whitespace()
        .find(|w| w.starts_with('v'))
        .map(|v| v.trim_start_matches('v').to_string())
        .unwrap_or_else(|| "(version unknown)".into())
}

/// `old` with its failover section replaced by `section` (appended when it has none).
pub fn replace_section(old: &str, section: &str) -> String {
    match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{}{}", &old[..b], section, old[e + END.len()..].trim_start_matches('\n'))
        }
        _ => {
            let mut s = old.trim_end().to_string();
            if !s.is_empty() {
                s.push_str("\n\n");
            }
            s.push_str(section);
            s
        }
    }
}

/// The failover section of `old`, if it has one (the main benchmark keeps it when it rewrites
/// the file).
pub fn section_of(old: &str) -> Option<&str> {
    let b = old.find(BEGIN)?;
    let e = old[b..].find(END)? + b;
    Some(&old[b..e + END.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_or_appended_and_found_again() {
        let section = format!("{BEGIN}\nnew\n{END}\n");
        let appended = replace_section("# Bench\n\ntable\n", &section);
        assert_eq!(appended, format!("# Bench\n\ntable\n\n{section}"));
        let replaced = replace_section(&format!("# Bench\n{BEGIN}\nold\n{END}\n\n## After\n"), &section);
        assert_eq!(replaced, format!("# Bench\n{section}## After\n"));
        assert_eq!(section_of(&replaced), Some(format!("{BEGIN}\nnew\n{END}").as_str()));
        assert_eq!(section_of("nothing"), None);
    }
}
