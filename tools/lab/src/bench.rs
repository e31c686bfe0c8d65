//! The benchmark behind `tools/bench`: single-stream throughput and new connections per second
//! through each way of forwarding LB_ADDR:PORT (cpha's three modes, socat, HAProxy), against a
//! direct path, in network namespaces; written up as a Markdown table.
//!
//! Every path gets its own namespaces, so no conntrack entry or TIME_WAIT socket of one path
//! affects another:
//!
//! ```text
//! client 198.18.1.2 --veth-- 198.18.1.1 host 198.18.2.1 --veth-- 198.18.2.2 server
//! ```
//!
//! The forwarder runs in the host namespace and listens on 198.18.1.1; `cpha-lab sink` and
//! `cpha-lab serve` run in the server namespace. "Direct" is the client connecting to the
//! server's own address, routed by the host namespace, so every row crosses the same two links.
//! 198.18.0.0/15 is the range set aside for benchmarks (RFC 2544) and exists only inside these
//! namespaces.
//!
//! The same paths are measured a second time with everything in one namespace ([`Layout::SameHost`]):
//! 198.18.1.1 and 198.18.2.2 are both local addresses there, so traffic crosses loopback. That is
//! the bootstrap forward's everyday case: kubeadm and the kubelet on a control-plane host reaching
//! the endpoint, forwarded to the apiserver on the same host.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;

use crate::netns::{route, veth, wait_for, Child, Netns};
use crate::report::{median, LoadReport, ProbeReport, ThroughputReport};
use crate::stop;

/// Prefix of the namespaces the benchmark creates; `tools/bench` removes leftovers by it.
pub const NETNS_PREFIX: &str = "cphabench";

const CLIENT: &str = "198.18.1.2";
const HOST_FRONT: &str = "198.18.1.1";
const HOST_BACK: &str = "198.18.2.1";
const SERVER: &str = "198.18.2.2";
const SINK_PORT: u16 = 5001;
const SERVE_PORT: u16 = 5002;
const FRONT_THROUGHPUT_PORT: u16 = 7001;
const FRONT_CONNRATE_PORT: u16 = 7002;

/// Options of [`run`].
#[derive(Clone, Debug)]
pub struct BenchOpts {
    /// The cpha binary; `None` leaves its rows out, with `cpha_missing` as the reason.
    pub cpha: Option<PathBuf>,
    pub cpha_missing: Option<String>,
    /// The cpha-lab binary that runs the servers and clients.
    pub lab: PathBuf,
    pub runs: usize,
    pub duration: Duration,
    pub concurrency: usize,
    /// Keys of the paths to measure (all when empty).
    pub only: Vec<String>,
    /// Where client, forwarder and server run; each layout gets its own table.
    pub layouts: Vec<Layout>,
    /// Where the Markdown write-up goes.
    pub out: Option<PathBuf>,
    /// TCP congestion control set in every namespace the benchmark makes; `None` keeps what a
    /// new namespace inherits (the host's `net.ipv4.tcp_congestion_control`).
    pub congestion_control: Option<String>,
}

/// Where the client, the forwarder and the server run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Three namespaces linked by veth: the client and the server are other hosts.
    Routed,
    /// One namespace: client, forwarder and server on the same host, over loopback.
    SameHost,
}

/// Every layout, in write-up order.
pub const LAYOUTS: [Layout; 2] = [Layout::Routed, Layout::SameHost];

impl Layout {
    pub fn key(self) -> &'static str {
        match self {
            Layout::Routed => "routed",
            Layout::SameHost => "same-host",
        }
    }

    pub fn parse(key: &str) -> Result<Layout> {
        LAYOUTS
            .into_iter()
            .find(|l| l.key() == key)
            .ok_or_else(|| anyhow!("unknown layout {key:?}; known: {}", LAYOUTS.map(Layout::key).join(", ")))
    }

    fn title(self) -> &'static str {
        match self {
            Layout::Routed => "Client and server on other hosts (routed through the forwarder's host)",
            Layout::SameHost => "Client, forwarder and server on one host (loopback)",
        }
    }
}

/// One way from the client to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Direct,
    Cpha(&'static str),
    /// The userspace mode with fixed 1 MiB socket buffers instead of autotuning, for comparison.
    CphaFixedBuffers,
    Socat,
    Haproxy {
        splice: bool,
    },
}

/// Every path, in table order.
pub const PATHS: [Via; 8] = [
    Via::Direct,
    Via::Cpha("nftables"),
    Via::Cpha("iptables"),
    Via::Cpha("userspace"),
    Via::CphaFixedBuffers,
    Via::Socat,
    Via::Haproxy { splice: false },
    Via::Haproxy { splice: true },
];

impl Via {
    pub fn key(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Cpha(mode) => mode,
            Via::CphaFixedBuffers => "userspace-1m",
            Via::Socat => "socat",
            Via::Haproxy { splice: false } => "haproxy",
            Via::Haproxy { splice: true } => "haproxy-splice",
        }
    }

    pub fn label(self, layout: Layout) -> String {
        match self {
            Via::Direct if layout == Layout::SameHost => "direct (loopback, no forwarder)".into(),
            Via::Direct => "direct (routed, no forwarder)".into(),
            Via::Cpha(mode) => format!("cpha forward --mode {mode}"),
            Via::CphaFixedBuffers => "cpha forward --mode userspace --socket-buffer 1M".into(),
            Via::Socat => "socat TCP-LISTEN,fork".into(),
            Via::Haproxy { splice: false } => "HAProxy, mode tcp".into(),
            Via::Haproxy { splice: true } => "HAProxy, mode tcp, option splice-auto".into(),
        }
    }
}

/// Repeated measurements of one quantity.
#[derive(Clone, Debug, Default)]
pub struct Series(pub Vec<f64>);

impl Series {
    pub fn median(&self) -> Option<f64> {
        median(&self.0)
    }

    fn range(&self) -> Option<(f64, f64)> {
        let min = self.0.iter().copied().reduce(f64::min)?;
        let max = self.0.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }
}

/// The results for one path; each half fails on its own.
#[derive(Debug)]
pub struct Row {
    pub layout: Layout,
    pub path: Via,
    pub gbit: Result<Series, String>,
    /// CPU-seconds the whole machine spent per GB moved in each throughput run.
    pub cpu: Series,
    pub conns: Result<RateSeries, String>,
}

#[derive(Clone, Debug, Default)]
pub struct RateSeries {
    pub per_sec: Series,
    pub p99_ms: Series,
    pub failed: u64,
    /// Failures by kind, over all runs.
    pub error_kinds: BTreeMap<String, u64>,
}

/// Runs the whole benchmark and returns the Markdown write-up (also written to `opts.out`).
///
/// NOTE: the measurements are interleaved (round 1 of every path, then round 2, ...) so that
/// other work starting or stopping on the machine during the run spreads over all rows instead
/// of skewing the ratios of a few.
pub fn run(opts: &BenchOpts) -> Result<String> {
    if opts.runs == 0 || opts.runs > 20 {
        bail!("--runs must be between 1 and 20");
    }
    if opts.duration < Duration::from_millis(500) || opts.duration > Duration::from_secs(60) {
        bail!("--duration must be between 500ms and 60s");
    }
    for key in &opts.only {
        if !PATHS.iter().any(|p| p.key() == key) {
            bail!("unknown path {key:?}; known: {}", keys().join(", "));
        }
    }
    if opts.layouts.is_empty() {
        bail!("no layout to measure");
    }
    if let Some(cc) = &opts.congestion_control {
        check_congestion_control(cc)?;
    }
    let started = Instant::now();
    let load = load_average();
    let mut rows = Vec::new();
    let mut labs = Vec::new();
    for layout in LAYOUTS.into_iter().filter(|l| opts.layouts.contains(l)) {
        for path in PATHS {
            if !opts.only.is_empty() && !opts.only.iter().any(|k| k == path.key()) {
                continue;
            }
            let lab = if let (Via::Cpha(_) | Via::CphaFixedBuffers, None) = (path, &opts.cpha) {
                Err(opts.cpha_missing.clone().unwrap_or_else(|| "no cpha binary given (--cpha)".into()))
            } else {
                PathLab::new(opts, layout).map_err(|e| format!("setting up: {e:#}"))
            };
            let (gbit, conns) = match &lab {
                Ok(_) => (Ok(Series::default()), Ok(RateSeries::default())),
                Err(why) => (Err(why.clone()), Err(why.clone())),
            };
            rows.push(Row { layout, path, gbit, cpu: Series::default(), conns });
            labs.push(lab);
        }
    }
    for round in 1..=opts.runs {
        for (row, lab) in rows.iter_mut().zip(&labs) {
            let Ok(lab) = lab else { continue };
            if stop::requested() {
                bail!("interrupted");
            }
            let label = format!("{}: {}", row.layout.key(), row.path.label(row.layout));
            if let Ok(series) = &mut row.gbit {
                match lab.throughput(opts, row.path) {
                    Ok(run) => {
                        eprintln!(
                            "bench: round {round}/{}: {label}: {:.2} Gbit/s, {:.2} CPU s/GB",
                            opts.runs, run.gbit, run.cpu_s_per_gb
                        );
                        series.0.push(run.gbit);
                        row.cpu.0.push(run.cpu_s_per_gb);
                    }
                    Err(err) => {
                        eprintln!("bench: {label}: throughput: {err:#}");
                        row.gbit = Err(format!("{err:#}"));
                    }
                }
            }
            if let Ok(series) = &mut row.conns {
                match lab.connrate(opts, row.path) {
                    Ok(report) => {
                        eprintln!(
                            "bench: round {round}/{}: {label}: {:.0} conn/s, p99 {:.2} ms, {} failed {:?}",
                            opts.runs, report.conns_per_sec, report.p99_ms, report.failed, report.error_kinds
                        );
                        series.add(report);
                    }
                    Err(err) => {
                        eprintln!("bench: {label}: connection rate: {err:#}");
                        row.conns = Err(format!("{err:#}"));
                    }
                }
            }
        }
    }
    // What the namespaces really used, read back from one of them.
    let congestion_control =
        labs.iter().find_map(|l| l.as_ref().ok()).map_or_else(|| "unknown".into(), |l| l.congestion_control.clone());
    drop(labs);
    let doc = render(opts, &rows, &environment(opts, load, congestion_control), started.elapsed());
    if let Some(out) = &opts.out {
        // The failover, rolling-restart and apply-latency sections (tools/bench --failover,
        // --rolling-restart, --apply-latency) are other runs': kept as they are.
        let old = std::fs::read_to_string(out).unwrap_or_default();
        let mut doc = match crate::failover::section_of(&old) {
            Some(section) => crate::failover::replace_section(&doc, section),
            None => doc.clone(),
        };
        for (begin, end) in [(ROLLING_BEGIN, ROLLING_END), (APPLY_BEGIN, APPLY_END)] {
            if let Some(section) = section_between(&old, begin, end) {
                doc = replace_between(&doc, begin, end, section);
            }
        }
        write_atomically(out, &doc)?;
        eprintln!("bench: wrote {}", out.display());
    }
    Ok(doc)
}

/// The rolling-restart section of docs/benchmarks.md (tests/restarts.rs,
/// `rolling_restart_benchmark`, writes it).
pub const ROLLING_BEGIN: &str = "<!-- rolling-restart: begin (tools/bench --rolling-restart writes this section) -->";
pub const ROLLING_END: &str = "<!-- rolling-restart: end -->";

/// The ConfigMap-edit-to-HAProxy section of docs/benchmarks.md (tests/run_e2e.rs,
/// `apply_latency_benchmark`, writes it).
pub const APPLY_BEGIN: &str = "<!-- apply-latency: begin (tools/bench --apply-latency writes this section) -->";
pub const APPLY_END: &str = "<!-- apply-latency: end -->";

/// The section of `text` from `begin` to `end` (both included), if it has one.
pub fn section_between<'a>(text: &'a str, begin: &str, end: &str) -> Option<&'a str> {
    let b = text.find(begin)?;
    let e = text[b..].find(end)? + b;
    Some(&text[b..e + end.len()])
}

/// `text` with its section from `begin` to `end` replaced by `section` (appended when it has
/// none).
pub fn replace_between(text: &str, begin: &str, end: &str, section: &str) -> String {
    match section_between(text, begin, end) {
        Some(old) => text.replacen(old, section, 1),
        None => format!("{}\n\n{}\n", text.trim_end(), section.trim_end()),
    }
}

fn keys() -> Vec<&'static str> {
    PATHS.iter().map(|p| p.key()).collect()
}

impl RateSeries {
    fn add(&mut self, report: LoadReport) {
        self.per_sec.0.push(report.conns_per_sec);
        self.p99_ms.0.push(report.p99_ms);
        self.failed += report.failed;
        for (kind, n) in report.error_kinds {
            *self.error_kinds.entry(kind).or_default() += n;
        }
    }
}

/// Client, host and server namespaces, linked and routed; or one namespace playing all three.
struct Topology {
    layout: Layout,
    client: Rc<Netns>,
    host: Rc<Netns>,
    server: Rc<Netns>,
}

impl Topology {
    fn new(layout: Layout, congestion_control: Option<&str>) -> Result<Topology> {
        let topo = match layout {
            Layout::Routed => Topology::routed()?,
            Layout::SameHost => Topology::same_host()?,
        };
        if let Some(cc) = congestion_control {
            // The same-host layout's three roles are one namespace: set it once.
            let mut done: Vec<&Rc<Netns>> = Vec::new();
            for ns in [&topo.client, &topo.host, &topo.server] {
                if !done.iter().any(|d| Rc::ptr_eq(d, ns)) {
                    ns.sysctl("net.ipv4.tcp_congestion_control", cc)?;
                    done.push(ns);
                }
            }
        }
        Ok(topo)
    }

    fn same_host() -> Result<Topology> {
        let ns = Rc::new(Netns::new(NETNS_PREFIX)?);
        // Plain host addresses on `lo` (not 127/8: no route_localnet involved); packets between
        // local addresses go through loopback whatever device holds them.
        ns.ip(&["addr", "add", &format!("{HOST_FRONT}/32"), "dev", "lo"])?;
        ns.ip(&["addr", "add", &format!("{SERVER}/32"), "dev", "lo"])?;
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.sysctl("net.ipv4.ip_local_port_range", "10000 65000")?;
        Ok(Topology { layout: Layout::SameHost, client: ns.clone(), host: ns.clone(), server: ns })
    }

    fn routed() -> Result<Topology> {
        let topo = Topology {
            layout: Layout::Routed,
            client: Rc::new(Netns::new(NETNS_PREFIX)?),
            host: Rc::new(Netns::new(NETNS_PREFIX)?),
            server: Rc::new(Netns::new(NETNS_PREFIX)?),
        };
        veth(&topo.client, &[&format!("{CLIENT}/24")], &topo.host, &[&format!("{HOST_FRONT}/24")])?;
        veth(&topo.host, &[&format!("{HOST_BACK}/24")], &topo.server, &[&format!("{SERVER}/24")])?;
        route(&topo.client, &["default", "via", HOST_FRONT])?;
        route(&topo.server, &["default", "via", HOST_BACK])?;
        topo.host.sysctl("net.ipv4.ip_forward", "1")?;
        // NOTE: tens of thousands of connections per second from one address to one port run out
        // of ephemeral ports within seconds unless TIME_WAIT ports are reused; the host namespace
        // needs it too, for the proxies' connections to the server.
        for ns in [&*topo.client, &*topo.host] {
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            ns.sysctl("net.ipv4.ip_local_port_range", "10000 65000")?;
        }
        Ok(topo)
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("a literal address"), port)
}

/// Refuses an algorithm the kernel does not offer, before any namespace is made.
fn check_congestion_control(cc: &str) -> Result<()> {
    let path = "/proc/sys/net/ipv4/tcp_available_congestion_control";
    let available = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    if !available.split_whitespace().any(|a| a == cc) {
        bail!(
            "--congestion-control {cc:?} is not available; available: {} (load another with modprobe tcp_NAME)",
            available.trim()
        );
    }
    Ok(())
}

/// Seconds of CPU time the whole machine has spent busy (user, system, interrupts, steal) since
/// boot. The namespaces share the machine's CPUs, so the difference over a run counts the
/// client, the forwarder, the server and the kernel work done for each of them.
fn busy_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_sec <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(busy_ticks(&stat)? as f64 / ticks_per_sec as f64)
}

/// Busy ticks from the aggregate `cpu` line of /proc/stat: everything but idle and iowait.
/// Guest time is left out because `user` already contains it.
fn busy_ticks(stat: &str) -> Result<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu ")).ok_or_else(|| anyhow!("/proc/stat has no cpu line"))?;
    let fields = line
        .split_whitespace()
        .skip(1)
        .map(str::parse::<u64>)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing /proc/stat line {line:?}"))?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal, ..] = fields[..] else {
        bail!("/proc/stat line {line:?} has fewer than 8 fields");
    };
    Ok(user + nice + system + irq + softirq + steal)
}

/// One path's own namespaces with a sink and an echo server, kept for the whole run.
struct PathLab {
    // Declared first, dropped first: the servers stop before their namespaces go.
    _servers: [Child; 2],
    topo: Topology,
    /// `net.ipv4.tcp_congestion_control` as the client namespace has it.
    congestion_control: String,
}

/// One throughput run.
struct ThroughputRun {
    gbit: f64,
    /// CPU-seconds the whole machine was busy per GB (10^9 bytes) moved.
    cpu_s_per_gb: f64,
}

impl PathLab {
    fn new(opts: &BenchOpts, layout: Layout) -> Result<PathLab> {
        let topo = Topology::new(layout, opts.congestion_control.as_deref())?;
        let congestion_control = topo.client.sysctl_get("net.ipv4.tcp_congestion_control")?;
        let max = "--max-duration=30m";
        let mut sink =
            topo.server.spawn(&opts.lab, &["sink", "--listen", &addr(SERVER, SINK_PORT).to_string(), max])?;
        sink.listening_addr(Duration::from_secs(5))?;
        let mut serve = topo
            .server
            .spawn(&opts.lab, &["serve", "--listen", &addr(SERVER, SERVE_PORT).to_string(), "--id", "server", max])?;
        serve.listening_addr(Duration::from_secs(5))?;
        Ok(PathLab { _servers: [sink, serve], topo, congestion_control })
    }

    /// One throughput run through a forwarder started for it.
    fn throughput(&self, opts: &BenchOpts, path: Via) -> Result<ThroughputRun> {
        let target = addr(SERVER, SINK_PORT);
        let mut fwd = Forwarder::start(opts, &self.topo, path, addr(HOST_FRONT, FRONT_THROUGHPUT_PORT), target)?;
        fwd.wait_ready(opts, true)?;
        let busy_before = busy_cpu_seconds()?;
        let (report, ok): (ThroughputReport, _) = run_json(
            &self.topo.client,
            &opts.lab,
            &[
                "throughput",
                "--to",
                &fwd.entry.to_string(),
                "--duration",
                &format!("{}ms", opts.duration.as_millis()),
                "--mode",
                "write",
            ],
        )?;
        let busy = busy_cpu_seconds()? - busy_before;
        if !ok {
            bail!("throughput run failed: {report:?}");
        }
        if report.bytes == 0 {
            bail!("throughput run moved no bytes: {report:?}");
        }
        fwd.stop()?;
        Ok(ThroughputRun { gbit: report.gbit_per_sec, cpu_s_per_gb: busy / (report.bytes as f64 / 1e9) })
    }

    /// One connection-rate run through a forwarder started for it.
    fn connrate(&self, opts: &BenchOpts, path: Via) -> Result<LoadReport> {
        let target = addr(SERVER, SERVE_PORT);
        let mut fwd = Forwarder::start(opts, &self.topo, path, addr(HOST_FRONT, FRONT_CONNRATE_PORT), target)?;
        fwd.wait_ready(opts, false)?;
        let (report, _): (LoadReport, _) = run_json(
            &self.topo.client,
            &opts.lab,
            &[
                "connrate",
                "--to",
                &fwd.entry.to_string(),
                "--concurrency",
                &opts.concurrency.to_string(),
                "--duration",
                &format!("{}ms", opts.duration.as_millis()),
            ],
        )?;
        if report.ok == 0 {
            bail!("no connection succeeded: {:?}", report.errors);
        }
        fwd.stop()?;
        Ok(report)
    }
}

/// Runs a cpha-lab client in `ns` and parses the JSON line it prints; the bool is its success.
fn run_json<T: DeserializeOwned>(ns: &Netns, lab: &Path, args: &[&str]) -> Result<(T, bool)> {
    let out = ns
        .command(lab)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running cpha-lab {}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let report = serde_json::from_str(line).with_context(|| {
        format!(
            "cpha-lab {} ({}) printed {line:?}; stderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        )
    })?;
    Ok((report, out.status.success()))
}

/// A running forwarder in the host namespace (nothing for the direct path).
struct Forwarder<'a> {
    topo: &'a Topology,
    path: Via,
    /// Where the client connects.
    entry: SocketAddr,
    child: Option<Child>,
    /// cpha modes that install kernel rules: `cpha cleanup --now` removes them.
    cpha_cleanup: Option<PathBuf>,
    tmp: Option<PathBuf>,
}

impl<'a> Forwarder<'a> {
    fn start(
        opts: &BenchOpts,
        topo: &'a Topology,
        path: Via,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> Result<Forwarder<'a>> {
        let mut fwd = Forwarder { topo, path, entry: listen, child: None, cpha_cleanup: None, tmp: None };
        match path {
            Via::Direct => fwd.entry = target,
            Via::Cpha(_) | Via::CphaFixedBuffers => {
                let cpha = opts.cpha.as_ref().ok_or_else(|| anyhow!("no cpha binary"))?;
                fwd.cpha_cleanup = Some(cpha.clone());
                // nftables and iptables exit 0 once their rules are in; userspace stays in the
                // foreground. wait_ready copes with both.
                let mut args = vec![
                    "forward".to_string(),
                    "--listen".into(),
                    listen.to_string(),
                    "--to".into(),
                    target.to_string(),
                    "--mode".into(),
                ];
                match path {
                    Via::Cpha(mode) => args.push(mode.into()),
                    _ => args.extend(["userspace".into(), "--socket-buffer".into(), "1M".into()]),
                }
                let mut cmd = topo.host.command(cpha);
                // Its info lines would drown the benchmark's progress; warnings still show.
                cmd.args(&args).env("CPHA_LOG", "warn");
                fwd.child = Some(Child::spawn(cmd, format!("cpha {}", args.join(" ")))?);
            }
            Via::Socat => {
                fwd.child = Some(topo.host.spawn(
                    "socat",
                    &[
                        &format!("TCP-LISTEN:{},bind={},fork,reuseaddr", listen.port(), listen.ip()),
                        &format!("TCP:{target}"),
                    ],
                )?);
            }
            Via::Haproxy { splice } => {
                let dir = std::env::temp_dir().join(format!("cpha-bench-{}-{}", std::process::id(), listen.port()));
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                fwd.tmp = Some(dir.clone());
                let cfg = dir.join("haproxy.cfg");
                std::fs::write(&cfg, haproxy_cfg(listen, target, splice))
                    .with_context(|| format!("writing {}", cfg.display()))?;
                let cfg = cfg.to_string_lossy().into_owned();
                topo.host.run("haproxy", &["-c", "-q", "-f", &cfg])?;
                fwd.child = Some(topo.host.spawn("haproxy", &["-db", "-f", &cfg])?);
            }
        }
        Ok(fwd)
    }

    /// Waits until a connection through the forwarder works: a plain connect against the sink,
    /// a greeting against `serve`.
    fn wait_ready(&mut self, opts: &BenchOpts, connect_only: bool) -> Result<()> {
        let entry = self.entry.to_string();
        let mut args = vec!["probe", "--to", &entry, "--count", "1", "--timeout", "1s"];
        if connect_only {
            args.push("--connect-only");
        }
        let label = self.path.label(self.topo.layout);
        let child = &mut self.child;
        let topo = self.topo;
        // A forwarder that exited with an error will not come back: that ends the wait at once
        // (the inner Err), while a probe that fails only means "not yet" (the outer Err).
        wait_for(&format!("{label} to forward {entry}"), Duration::from_secs(15), || {
            if stop::requested() {
                return Ok(Some(Err(anyhow!("interrupted"))));
            }
            if let Some(c) = child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    if !status.success() {
                        return Ok(Some(Err(anyhow!("{} exited with {status}", c.name()))));
                    }
                    // Rules installed, the process is done.
                    *child = None;
                }
            }
            let (report, _): (ProbeReport, _) = run_json(&topo.client, &opts.lab, &args)?;
            if report.ok == 1 {
                Ok(Some(Ok(())))
            } else {
                Err(anyhow!("probe: {:?}", report.errors))
            }
        })?
    }

    fn stop(&mut self) -> Result<()> {
        let mut result = Ok(());
        if let Some(mut child) = self.child.take() {
            if let Err(err) = child.stop(Duration::from_secs(3)) {
                result = Err(err);
            }
        }
        if let Some(cpha) = self.cpha_cleanup.take() {
            if let Err(err) = self.topo.host.run(&cpha.to_string_lossy(), &["cleanup", "--now"]) {
                result = result.and(Err(err.context("cpha cleanup --now")));
            }
        }
        if let Some(dir) = self.tmp.take() {
            if let Err(err) = std::fs::remove_dir_all(&dir) {
                eprintln!("bench: removing {}: {err}", dir.display());
            }
        }
        result
    }
}

impl Drop for Forwarder<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("bench: stopping {}: {err:#}", self.path.label(self.topo.layout));
        }
    }
}

/// A minimal HAProxy configuration for one TCP frontend and one server.
pub fn haproxy_cfg(listen: SocketAddr, target: SocketAddr, splice: bool) -> String {
    let splice = if splice { "    option splice-auto\n" } else { "" };
    format!(
        "global\n    maxconn 4096\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n{splice}\n\
         frontend bench\n    bind {listen}\n    default_backend bench\n\n\
         backend bench\n    server s1 {target}\n"
    )
}

/// What the write-up says about the machine and the tools.
#[derive(Debug, Default)]
pub struct Environment {
    pub date: String,
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub haproxy: String,
    pub socat: String,
    pub cpha: String,
    /// /proc/loadavg when the run started: other work on the machine skews every row.
    pub load: String,
    /// The TCP congestion control the namespaces used.
    pub congestion_control: String,
}

fn first_line_of(program: &str, args: &[&str], containing: &str) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains(containing))
            .unwrap_or("")
            .trim()
            .to_string(),
        Err(err) => format!("({program}: {err})"),
    }
}

fn environment(opts: &BenchOpts, load: String, congestion_control: String) -> Environment {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Environment {
        date: first_line_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"], ""),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into()),
        haproxy: first_line_of("haproxy", &["-v"], "version"),
        socat: first_line_of("socat", &["-V"], "socat version"),
        cpha: opts
            .cpha
            .as_ref()
            .map(|c| first_line_of(&c.to_string_lossy(), &["--version"], ""))
            .unwrap_or_else(|| "not built".into()),
        load,
        congestion_control: if opts.congestion_control.is_some() {
            format!("{congestion_control} (set by --congestion-control)")
        } else {
            format!("{congestion_control} (inherited from the host)")
        },
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt_ratio(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "–".into(),
    }
}

fn fmt_series(s: &Series, decimals: usize) -> String {
    match (s.median(), s.range()) {
        (Some(m), Some((lo, hi))) => {
            format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})")
        }
        _ => "–".into(),
    }
}

/// Appends one formatted line to the write-up `md`.
macro_rules! md_line {
    ($md:expr, $($arg:tt)*) => {{
        $md.push_str(&format!($($arg)*));
        $md.push('\n');
    }};
}

/// The Markdown write-up: the table, the ratios and how the figures were made.
pub fn render(opts: &BenchOpts, rows: &[Row], env: &Environment, took: Duration) -> String {
    let mut notes = Vec::new();
    let secs = opts.duration.as_secs_f64();
    let mut md = String::new();
    md_line!(md, "# Benchmarks\n");
    md_line!(
        md,
        "Single-stream throughput and new connections per second through each way of forwarding \
         the control-plane endpoint to an apiserver: cpha's three bootstrap-forward modes, socat \
         and HAProxy, against a direct path. Made by `tools/bench`, the benchmark command (not \
         part of the tests); run it again to refresh this file.\n"
    );
    md_line!(md, "- Date: {}", env.date);
    md_line!(md, "- Kernel: {}", env.kernel);
    md_line!(md, "- CPUs: {} ({})", env.cpus, env.cpu_model);
    md_line!(md, "- HAProxy: {}", env.haproxy);
    md_line!(md, "- socat: {}", env.socat);
    md_line!(md, "- cpha: {}", env.cpha);
    md_line!(md, "- TCP congestion control in the namespaces: {}", env.congestion_control);
    md_line!(md, "- Load average at the start: {}", env.load);
    md_line!(md, "- Whole run: {:.0} s\n", took.as_secs_f64());
    for layout in LAYOUTS {
        let rows: Vec<&Row> = rows.iter().filter(|r| r.layout == layout).collect();
        if !rows.is_empty() {
            render_table(&mut md, opts, layout, &rows, &mut notes);
        }
    }
    md_line!(
        md,
        "Each figure is the median of {} runs of {secs:.0} s, with the lowest and highest run in \
         brackets; p99 is the median of the runs' 99th percentiles.\n",
        opts.runs
    );
    md_line!(md, "## Method\n");
    md_line!(
        md,
        "- Three network namespaces: client (198.18.1.2) —veth— host (198.18.1.1, 198.18.2.1) \
         —veth— server (198.18.2.2), MTU 1500. Every path has its own set, so no conntrack entry \
         or TIME_WAIT socket of one path affects another. 198.18.0.0/15 is the range set aside \
         for benchmarks and exists only inside these namespaces.\n\
         - The forwarder runs in the host namespace and listens on 198.18.1.1; its target is the \
         server namespace, where `cpha-lab sink` and `cpha-lab serve` run.\n\
         - **direct** means the client connects to the server's own address and the host \
         namespace only routes the packets (`ip_forward=1`, no NAT rule, no proxy, no conntrack). \
         Every row crosses the same two veth links, so the ratios show what the forwarder costs.\n\
         - **Same host**: one namespace holds the client, the forwarder and the servers; \
         198.18.1.1 and 198.18.2.2 are both local addresses there (on `lo`), so every \
         packet crosses loopback. It models kubeadm and the kubelet on a control-plane host \
         reaching the endpoint, forwarded to the apiserver on the same host; **direct** is the \
         client connecting to 198.18.2.2 itself. Its own namespace for every path, as above.\n\
         - Each measurement starts its forwarder and stops it afterwards. cpha's nftables and \
         iptables modes install DNAT rules in the host namespace and exit; `cpha cleanup --now` \
         removes them. The userspace mode runs in \
         the foreground until SIGTERM.\n\
         - cpha's userspace mode leaves socket buffers to the kernel's autotuning, its default; \
         the row with `--socket-buffer 1M` fixes them, for comparison. A proxy terminates TCP \
         twice, and the kernel does the second connection's sending and receiving on the \
         proxy's behalf: that, not copying, is its CPU per GB over direct, and on CPUs shared by \
         client, proxy and server it bounds the throughput ratio (docs/architecture.md, \
         Userspace proxy).\n\
         - socat: `socat TCP-LISTEN:PORT,bind=ADDR,fork,reuseaddr TCP:SERVER:PORT`. HAProxy: \
         `haproxy -db` with one `mode tcp` frontend and one server, default threads, with and \
         without `option splice-auto`.\n\
         - Throughput: `cpha-lab throughput --mode write`, one TCP stream from client to sink \
         with 256 KiB writes; the clock stops when the sink has read everything.\n\
         - CPU s per GB: the CPU time the whole machine spent busy during a throughput run \
         (/proc/stat: user, system, interrupts, steal), divided by the gigabytes (10^9 bytes) \
         moved. It counts the client, the forwarder, the sink and the kernel's work for all of \
         them, so a row's excess over direct is what forwarding costs per byte; it does not \
         depend on how many CPUs there are. 0.40 s per GB is 0.5 core at 10 Gbit/s.\n\
         - TCP congestion control: what the namespaces had (see above). With BBR every TCP \
         sender paces with a timer, even over loopback and veth, which costs CPU per byte; a \
         proxy has two senders in series where the direct path has one. \
         `tools/bench --congestion-control NAME` sets it in the benchmark's namespaces only. In \
         this repository docs/benchmarks.md is made with the host's default and \
         docs/benchmarks-cubic.md with `--congestion-control cubic`.\n\
         - Connection rate: `cpha-lab connrate --concurrency {}`: each connection connects, reads \
         the server's greeting line, sends 5 bytes, reads their echo and closes; p99 is the \
         latency of that whole exchange. A step that takes longer than 2 s fails the connection; \
         failed connections are counted, not hidden. socat listens with its default backlog of 5.\n\
         - `net.ipv4.tcp_tw_reuse=1` and ports 10000–65000 in the client and host namespaces, so \
         tens of thousands of connections per second do not run out of ephemeral ports.\n\
         - The runs are interleaved (round 1 of every path, then round 2, ...), so other work on \
         the machine during the run spreads over all rows instead of skewing a few.\n\
         - The client, the forwarder and the servers share the machine's {} CPUs, as they do on \
         a control-plane node; figures from another machine or run differ, the ratios less so.",
        opts.concurrency,
        env.cpus
    );
    if !notes.is_empty() {
        md_line!(md, "\n## Not measured\n");
        for note in notes {
            md_line!(md, "- {}", note.replace('\n', " "));
        }
    }
    md
}

/// One layout's table, its failures and its userspace/socat ratios; what was not measured goes
/// to `notes`.
fn render_table(md: &mut String, opts: &BenchOpts, layout: Layout, rows: &[&Row], notes: &mut Vec<String>) {
    let find = |key: &str| rows.iter().find(|r| r.path.key() == key);
    let gbit_of = |key: &str| find(key).and_then(|r| r.gbit.as_ref().ok().and_then(Series::median));
    let conns_of = |key: &str| find(key).and_then(|r| r.conns.as_ref().ok().and_then(|c| c.per_sec.median()));
    md_line!(md, "## {}\n", layout.title());
    md_line!(
        md,
        "| path | Gbit/s, 1 stream | × direct | CPU s per GB | × direct | conn/s, {} concurrent | × direct | p99 ms | failed conns |",
        opts.concurrency
    );
    md_line!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let base_gbit = gbit_of("direct");
    let base_cpu = find("direct").and_then(|r| r.cpu.median());
    let base_conns = conns_of("direct");
    let mut failures = Vec::new();
    for row in rows {
        let label = row.path.label(layout);
        let (gbit, gbit_ratio, cpu, cpu_ratio) = match &row.gbit {
            Ok(s) => (
                fmt_series(s, 1),
                fmt_ratio(s.median(), base_gbit),
                fmt_series(&row.cpu, 2),
                fmt_ratio(row.cpu.median(), base_cpu),
            ),
            Err(e) => {
                notes.push(format!("{}, {label}, throughput: {e}", layout.key()));
                ("not measured".into(), "–".into(), "–".into(), "–".into())
            }
        };
        let (conns, conns_ratio, p99, failed) = match &row.conns {
            Ok(c) => {
                if c.failed > 0 {
                    let kinds: Vec<String> = c.error_kinds.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
                    failures.push(format!("{label}: {}", kinds.join(", ")));
                }
                (
                    fmt_series(&c.per_sec, 0),
                    fmt_ratio(c.per_sec.median(), base_conns),
                    c.p99_ms.median().map_or_else(|| "–".into(), |v| format!("{v:.2}")),
                    c.failed.to_string(),
                )
            }
            Err(e) => {
                notes.push(format!("{}, {label}, connection rate: {e}", layout.key()));
                ("not measured".into(), "–".into(), "–".into(), "–".into())
            }
        };
        md_line!(
            md,
            "| {label} | {gbit} | {gbit_ratio} | {cpu} | {cpu_ratio} | {conns} | {conns_ratio} | {p99} | {failed} |"
        );
    }
    md_line!(md, "");
    if !failures.is_empty() {
        md_line!(md, "Failed connections, by kind: {}.\n", failures.join("; "));
    }
    let (us_gbit, socat_gbit) = (gbit_of("userspace"), gbit_of("socat"));
    let (us_conns, socat_conns) = (conns_of("userspace"), conns_of("socat"));
    md_line!(
        md,
        "cpha userspace / socat: {}× the throughput, {}× the connections per second.\n",
        fmt_ratio(us_gbit, socat_gbit),
        fmt_ratio(us_conns, socat_conns)
    );
}

pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", Path::new(&tmp).display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BenchOpts {
        BenchOpts {
            cpha: None,
            cpha_missing: Some("cpha did not build".into()),
            lab: PathBuf::from("cpha-lab"),
            runs: 3,
            duration: Duration::from_secs(3),
            concurrency: 32,
            only: vec![],
            layouts: LAYOUTS.to_vec(),
            out: None,
            congestion_control: None,
        }
    }

    fn rate(v: &[f64]) -> Result<RateSeries, String> {
        Ok(RateSeries {
            per_sec: Series(v.to_vec()),
            p99_ms: Series(vec![1.0, 2.0, 3.0]),
            failed: 0,
            error_kinds: BTreeMap::new(),
        })
    }

    #[test]
    fn layouts_parse_by_key() {
        assert_eq!(Layout::parse("same-host").expect("known"), Layout::SameHost);
        assert_eq!(Layout::parse("routed").expect("known"), Layout::Routed);
        let err = Layout::parse("cloud").expect_err("unknown").to_string();
        assert!(err.contains("known: routed, same-host"), "{err}");
    }

    #[test]
    fn haproxy_cfg_has_one_frontend_and_server() {
        let cfg = haproxy_cfg(addr(HOST_FRONT, 7001), addr(SERVER, 5001), true);
        assert!(cfg.contains("    bind 198.18.1.1:7001\n"), "{cfg}");
        assert!(cfg.contains("    server s1 198.18.2.2:5001\n"), "{cfg}");
        assert!(cfg.contains("option splice-auto"), "{cfg}");
        assert!(cfg.contains("mode tcp"), "{cfg}");
        let plain = haproxy_cfg(addr(HOST_FRONT, 7001), addr(SERVER, 5001), false);
        assert!(!plain.contains("splice"), "{plain}");
    }

    #[test]
    fn render_computes_ratios_and_names_missing_rows() {
        let rows = vec![
            Row {
                layout: Layout::Routed,
                path: Via::Direct,
                gbit: Ok(Series(vec![20.0, 22.0, 21.0])),
                cpu: Series(vec![0.40, 0.50, 0.45]),
                conns: rate(&[20000.0, 21000.0, 19000.0]),
            },
            Row {
                layout: Layout::Routed,
                path: Via::Cpha("userspace"),
                gbit: Ok(Series(vec![10.5])),
                cpu: Series(vec![0.90]),
                conns: rate(&[10000.0]),
            },
            Row {
                layout: Layout::SameHost,
                path: Via::Direct,
                gbit: Ok(Series(vec![30.0])),
                cpu: Series(vec![0.30]),
                conns: rate(&[25000.0]),
            },
            Row {
                layout: Layout::SameHost,
                path: Via::Cpha("userspace"),
                gbit: Ok(Series(vec![24.0])),
                cpu: Series(vec![0.45]),
                conns: rate(&[12500.0]),
            },
            Row {
                layout: Layout::Routed,
                path: Via::Cpha("nftables"),
                gbit: Err("cpha did not build".into()),
                cpu: Series::default(),
                conns: Err("cpha did not build".into()),
            },
            Row {
                layout: Layout::Routed,
                path: Via::Socat,
                gbit: Ok(Series(vec![7.0])),
                cpu: Series(vec![1.8]),
                conns: rate(&[2500.0]).map(|mut r| {
                    r.failed = 3;
                    r.error_kinds.insert("connect: timeout".into(), 3);
                    r
                }),
            },
        ];
        let env = Environment {
            date: "2025-01-01 00:00 UTC".into(),
            kernel: "6.1.0".into(),
            cpus: 2,
            congestion_control: "cubic (inherited from the host)".into(),
            ..Environment::default()
        };
        let md = render(&opts(), &rows, &env, Duration::from_secs(100));
        assert!(
            md.contains(
                "| direct (routed, no forwarder) | 21.0 (20.0–22.0) | 1.00 | 0.45 (0.40–0.50) | 1.00 | 20000 (19000–21000) | 1.00 | 2.00 | 0 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| cpha forward --mode userspace | 10.5 (10.5–10.5) | 0.50 | 0.90 (0.90–0.90) | 2.00 | 10000 (10000–10000) | 0.50 |"),
            "{md}"
        );
        assert!(md.contains("cpha userspace / socat: 1.50× the throughput, 4.00× the connections per second."), "{md}");
        assert!(md.contains("| cpha forward --mode nftables | not measured | – | – | – |"), "{md}");
        assert!(md.contains("- routed, cpha forward --mode nftables, throughput: cpha did not build"), "{md}");
        // Each layout has its own table, with ratios to its own direct path.
        let same_host = md.split("## Client, forwarder and server on one host").nth(1).expect("same-host table");
        assert!(
            same_host
                .contains("| direct (loopback, no forwarder) | 30.0 (30.0–30.0) | 1.00 | 0.30 (0.30–0.30) | 1.00 |"),
            "{md}"
        );
        assert!(
            same_host
                .contains("| cpha forward --mode userspace | 24.0 (24.0–24.0) | 0.80 | 0.45 (0.45–0.45) | 1.50 | 12500 (12500–12500) | 0.50 |"),
            "{md}"
        );
        assert!(same_host.contains("cpha userspace / socat: –× the throughput"), "{md}");
        let routed = md.split("## Client, forwarder and server on one host").next().expect("routed table");
        assert!(routed.contains("cpha userspace / socat: 1.50× the throughput"), "{md}");
        assert!(md.contains("Kernel: 6.1.0"), "{md}");
        assert!(md.contains("TCP congestion control in the namespaces: cubic (inherited from the host)"), "{md}");
        assert!(md.contains("| 2500 (2500–2500) | 0.12 | 2.00 | 3 |"), "{md}");
        assert!(md.contains("Failed connections, by kind: socat TCP-LISTEN,fork: connect: timeout ×3."), "{md}");
    }

    #[test]
    fn busy_ticks_add_up_everything_but_idle_and_iowait() {
        let stat = "cpu  100 2 30 5000 40 6 7 8 9 10\ncpu0 50 1 15 2500 20 3 3 4 0 0\nintr 1 2\n";
        assert_eq!(busy_ticks(stat).expect("parses"), 100 + 2 + 30 + 6 + 7 + 8);
        let short = busy_ticks("cpu  1 2 3\n").expect_err("too few fields").to_string();
        assert!(short.contains("fewer than 8 fields"), "{short}");
        let err = busy_ticks("cpu0 1 2 3 4 5 6 7 8\n").unwrap_err().to_string();
        assert!(err.contains("no cpu line"), "only the aggregate line counts: {err}");
        let err = busy_ticks("cpu  1 2 x 4 5 6 7 8\n").unwrap_err().to_string();
        assert!(err.contains("parsing /proc/stat line"), "{err}");
    }

    #[test]
    fn unknown_congestion_control_is_refused_with_the_available_ones() {
        let err = check_congestion_control("no-such-cc").expect_err("unknown").to_string();
        // reno is always built in.
        assert!(err.contains("available:") && err.contains("reno"), "{err}");
    }

    #[test]
    fn paths_have_unique_keys() {
        let mut k = keys();
        k.sort_unstable();
        k.dedup();
        assert_eq!(k.len(), PATHS.len());
    }
}
