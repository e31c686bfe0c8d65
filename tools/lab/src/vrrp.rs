//! Control-plane hosts on one L2 segment with a virtual IP, for the VIP tests and the failover
//! benchmark: real keepalived, real `cpha run` (and HAProxy when asked), the Kubernetes API
//! stand-in as each host's apiserver.
//!
//! ```text
//!            bridge br0 (its own namespace)
//!    ┌──────────┬──────────┬──────────┬──────────┐
//!   h1 .11     h2 .12     h3 .13    api .5     worker .100        10.80.0.0/24
//!   apiserver :6443, cpha (endpoint VIP:8443), keepalived, HAProxy :9445 on each host
//! ```
//! The VIP is 10.80.0.10; the worker dials only `10.80.0.10:8443`. The `api` namespace holds the
//! `kube-system/cpha-members` ConfigMap the agents watch (one API for all, so that breaking a
//! host's apiserver does not also take the member list away from the others).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::netns::{veth_pair, wait_for, Child, Netns};

pub const VIP: &str = "10.80.0.10";
pub const ENDPOINT: &str = "10.80.0.10:8443";
pub const WORKER: &str = "10.80.0.100";
const API: &str = "10.80.0.5";
const PREFIX: &str = "24";

/// The programs the lab runs.
#[derive(Clone, Debug)]
pub struct Programs {
    pub cpha: PathBuf,
    pub standin: PathBuf,
    pub lab: PathBuf,
}

/// Settings of one lab.
#[derive(Clone, Debug)]
pub struct LabOpts {
    pub hosts: usize,
    /// Extra lines under `vip:` in every agent's configuration (two-space indented keys).
    pub vip_extra: String,
}

impl Default for LabOpts {
    fn default() -> Self {
        Self { hosts: 3, vip_extra: String::new() }
    }
}

pub struct Host {
    pub n: usize,
    pub ns: Netns,
    pub ip: String,
    pub dir: PathBuf,
    /// The bridge-side end of this host's link (in the bridge namespace).
    pub port: String,
    pub standin: Option<Child>,
    pub agent: Option<Child>,
    pub keepalived: Option<Child>,
    pub haproxy: Option<Child>,
}

/// An address change seen on one host: when, and whether the host holds the VIP after it.
#[derive(Clone, Copy, Debug)]
pub struct Change {
    pub at: Instant,
    pub host: usize,
    pub holds: bool,
}

pub struct VipLab {
    pub programs: Programs,
    pub opts: LabOpts,
    pub bridge: Netns,
    pub api: Netns,
    pub worker: Netns,
    pub hosts: Vec<Host>,
    pub dir: PathBuf,
    api_standin: Option<Child>,
    /// Every change of who holds the VIP, from `ip monitor` in each host.
    pub changes: Arc<Mutex<Vec<Change>>>,
    monitors: Vec<Child>,
    /// Environment of every `cpha run` started from now on.
    pub agent_env: Vec<(String, String)>,
}

impl VipLab {
    /// The segment, the API, and for each host its apiserver (nothing of cpha yet).
    pub fn new(programs: Programs, opts: LabOpts) -> Result<VipLab> {
        let bridge = Netns::new("cpha-vbr")?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        let dir = std::env::temp_dir().join(format!("cpha-vip-{}-{}", std::process::id(), bridge.name()));
        std::fs::create_dir_all(dir.join("pki"))?;
        let api = Netns::new("cpha-vapi")?;
        attach(&bridge, &api, &format!("{API}/{PREFIX}"))?;
        let worker = Netns::new("cpha-vwk")?;
        attach(&bridge, &worker, &format!("{WORKER}/{PREFIX}"))?;
        let mut lab = VipLab {
            programs,
            opts,
            bridge,
            api,
            worker,
            hosts: Vec::new(),
            dir,
            api_standin: None,
            changes: Arc::new(Mutex::new(Vec::new())),
            monitors: Vec::new(),
            agent_env: Vec::new(),
        };
        lab.api_standin = Some(lab.standin(&lab.api, API, true)?);
        for n in 1..=lab.opts.hosts {
            let ns = Netns::new(&format!("cpha-vh{n}"))?;
            let ip = format!("10.80.0.{}", 10 + n);
            let port = attach(&lab.bridge, &ns, &format!("{ip}/{PREFIX}"))?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            let dir = lab.dir.join(format!("h{n}"));
            std::fs::create_dir_all(&dir)?;
            let standin = lab.standin(&ns, &ip, false)?;
            lab.hosts.push(Host {
                n,
                ns,
                ip,
                dir,
                port,
                standin: Some(standin),
                agent: None,
                keepalived: None,
                haproxy: None,
            });
        }
        for i in 0..lab.hosts.len() {
            lab.monitor(i)?;
        }
        Ok(lab)
    }

    fn standin(&self, ns: &Netns, ip: &str, api: bool) -> Result<Child> {
        let pki = self.dir.join("pki").display().to_string();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "0.0.0.0:6443".into(),
            "--cert-dir".into(),
            pki,
            "--san".into(),
            ip.into(),
            "--control-listen".into(),
            "127.0.0.1:7000".into(),
            "--token".into(),
            "admin:admin-secret:*/*".into(),
        ];
        if api {
            args.extend([
                "--token".into(),
                "cpha:cpha-secret:get,list,watch/configmaps/kube-system/cpha-members;create,patch/events.events.k8s.io/kube-system".into(),
                "--kubeconfig-server".into(),
                format!("https://{ip}:6443"),
                "--write-kubeconfig".into(),
                format!("{}:admin", self.dir.join("admin.kubeconfig").display()),
                "--write-kubeconfig".into(),
                format!("{}:cpha", self.dir.join("cpha.kubeconfig").display()),
            ]);
        }
        let mut cmd = ns.command(&self.programs.standin);
        cmd.args(&args).stderr(log(&self.dir, &format!("standin-{ip}.log"))?);
        let mut child = Child::spawn(cmd, format!("kube-standin {ip}"))?;
        child.stdout_line(Duration::from_secs(20)).context("the stand-in did not start")?;
        Ok(child)
    }

    /// Stops host `i`'s apiserver (its stand-in) with `signal` and waits for it to exit.
    pub fn stop_apiserver(&mut self, i: usize, signal: i32) -> Result<()> {
        if let Some(mut child) = self.hosts[i].standin.take() {
            child.signal(signal)?;
            child.wait_timeout(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Starts host `i`'s apiserver again; returns once it listens.
    pub fn start_apiserver(&mut self, i: usize) -> Result<()> {
        let ip = self.hosts[i].ip.clone();
        let child = self.standin(&self.hosts[i].ns, &ip, false)?;
        self.hosts[i].standin = Some(child);
        Ok(())
    }

    /// Watches host `i`'s addresses; every change of whether it holds the VIP is recorded.
    fn monitor(&mut self, i: usize) -> Result<()> {
        let host = &self.hosts[i];
        let mut cmd = Command::new("ip");
        cmd.args(["-n", host.ns.name(), "-o", "monitor", "address"]).stdout(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().context("starting ip monitor")?;
        let stdout = child.stdout.take().context("stdout")?;
        let changes = self.changes.clone();
        let needle = format!(" {VIP}/");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(&needle) {
                    let holds = !line.starts_with("Deleted");
                    changes.lock().expect("lock").push(Change { at: Instant::now(), host: i, holds });
                }
            }
        });
        // NOTE: wrapped so that it is killed with the lab (it runs in the root namespace).
        self.monitors.push(Child::from_std(child, format!("ip monitor h{}", i + 1)));
        Ok(())
    }

    /// The agent's configuration for host `i`.
    pub fn config(&self, i: usize, members: &str) -> String {
        let h = &self.hosts[i];
        let d = h.dir.display();
        let top = self.dir.display();
        format!(
            "endpoint:
  listen: {ENDPOINT}
  topology: retarget
  haproxyBind: {ip}:9445
forward:
  mode: nftables
  onShutdown: remove
  drainTimeout: 5s
agent:
  statusListen: 127.0.0.1:9966
  events: false
members:
  source: configMap
  static: [{members}]
  stateFile: {d}/members.json
  # No drift report: the lab's API holds no default/kubernetes EndpointSlice.
  drift: {{after: 0s}}
kubernetes:
  kubeconfig: [{top}/cpha.kubeconfig]
  # The member list lives on the lab's one API, not on the members' stand-ins.
  directToMembers: false
  pollInterval: 500ms
haproxy:
  configPath: {d}/haproxy.cfg
  adminSocket: {d}/admin.sock
  masterSocket: {d}/master.sock
vip:
  address: {VIP}
  keepalived:
    configFile: {d}/keepalived.conf
    trackFile: {d}/vip-health
    notifyFifo: {d}/keepalived.fifo
    pidFile: {d}/keepalived.pid
{extra}",
            ip = h.ip,
            extra = self.opts.vip_extra,
        )
    }

    /// The member list of hosts `which` (1-based), as the ConfigMap holds it.
    pub fn members(&self, which: &[usize]) -> String {
        which.iter().map(|n| format!("cp{n}={}:6443", self.hosts[n - 1].ip)).collect::<Vec<_>>().join(",")
    }

    /// Every host as a member in the ConfigMap, then cpha and keepalived on each (and HAProxy,
    /// when asked) in the order their units start.
    pub fn start_all(&mut self, haproxy: bool) -> Result<()> {
        let members = self.members(&(1..=self.hosts.len()).collect::<Vec<_>>());
        self.set_members(&members)?;
        for i in 0..self.hosts.len() {
            self.start_agent(i, &members)?;
        }
        for i in 0..self.hosts.len() {
            self.start_keepalived(i)?;
        }
        if haproxy {
            for i in 0..self.hosts.len() {
                self.start_haproxy(i)?;
            }
        }
        Ok(())
    }

    /// Starts `cpha run` on host `i` and waits until it carries the endpoint.
    pub fn start_agent(&mut self, i: usize, members: &str) -> Result<()> {
        let path = self.hosts[i].dir.join("cpha.yaml");
        std::fs::write(&path, self.config(i, members))?;
        let h = &mut self.hosts[i];
        let mut cmd = h.ns.command(&self.programs.cpha);
        cmd.args(["run", "--config"]).arg(&path).stderr(log(&h.dir, "cpha.log")?);
        cmd.envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        h.agent = Some(Child::spawn(cmd, format!("cpha run h{}", h.n))?);
        wait_for(&format!("cpha on h{} to carry the endpoint", i + 1), Duration::from_secs(30), || {
            Ok(self
                .status(i)
                .ok()
                .filter(|s| s["agent"]["phase"] != "starting" && s["agent"]["phase"].is_string())
                .map(|_| ()))
        })
        .with_context(|| self.log(i, "cpha.log"))?;
        wait_for("keepalived.conf written by cpha", Duration::from_secs(10), || {
            Ok(self.hosts[i].dir.join("keepalived.conf").exists().then_some(()))
        })
        .with_context(|| self.log(i, "cpha.log"))?;
        Ok(())
    }

    /// Starts keepalived on host `i`, on the file cpha wrote, as its systemd unit would.
    pub fn start_keepalived(&mut self, i: usize) -> Result<()> {
        let h = &mut self.hosts[i];
        let d = &h.dir;
        let mut cmd = h.ns.command("keepalived");
        cmd.args(["--dont-fork", "--log-console", "--log-detail", "--vrrp", "--use-file"])
            .arg(d.join("keepalived.conf"))
            .arg("--pid")
            .arg(d.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(d.join("keepalived_vrrp.pid"))
            .stderr(log(d, "keepalived.log")?);
        h.keepalived = Some(Child::spawn(cmd, format!("keepalived h{}", h.n))?);
        Ok(())
    }

    /// SIGKILL to every keepalived process of host `i` (parent and VRRP child): no clean-up.
    pub fn kill_keepalived(&mut self, i: usize) -> Result<()> {
        self.kill_named(i, "keepalived")?;
        if let Some(mut k) = self.hosts[i].keepalived.take() {
            k.wait_timeout(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// SIGKILLs every process named `comm` in host `i`'s namespace as one event: all are
    /// stopped first, so none sees another die (keepalived's VRRP child gets a signal when its
    /// parent dies, and would remove the address itself) before it is killed too.
    fn kill_named(&self, i: usize, comm: &str) -> Result<()> {
        let pids: Vec<u32> = self.hosts[i]
            .ns
            .pids()?
            .into_iter()
            .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim() == comm)
            .collect();
        for signal in [libc::SIGSTOP, libc::SIGKILL] {
            for pid in &pids {
                // SAFETY: kill(2) with a pid read just now; a reused pid in this namespace
                // would be another test process of this lab.
                unsafe { libc::kill(*pid as libc::pid_t, signal) };
            }
        }
        Ok(())
    }

    /// Starts HAProxy on host `i` on the file its agent wrote.
    pub fn start_haproxy(&mut self, i: usize) -> Result<()> {
        let h = &mut self.hosts[i];
        let cfg = h.dir.join("haproxy.cfg");
        wait_for("haproxy.cfg written by the agent", Duration::from_secs(20), || Ok(cfg.exists().then_some(())))?;
        let master = format!("{},level,admin", h.dir.join("master.sock").display());
        let mut cmd = h.ns.command("haproxy");
        cmd.args(["-W", "-S", &master, "-f"]).arg(&cfg).stderr(log(&h.dir, "haproxy.log")?);
        h.haproxy = Some(Child::spawn(cmd, format!("haproxy h{}", h.n))?);
        Ok(())
    }

    pub fn kill_haproxy(&mut self, i: usize) -> Result<()> {
        self.kill_named(i, "haproxy")?;
        if let Some(mut h) = self.hosts[i].haproxy.take() {
            h.wait_timeout(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Host `i`'s link to the segment (its bridge port) down or up.
    pub fn link(&self, i: usize, up: bool) -> Result<()> {
        self.bridge.ip(&["link", "set", &self.hosts[i].port, if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// Makes host `i`'s endpoint stop working with VRRP untouched: HAProxy killed, and every
    /// connection the forward translates to an apiserver port refused (the host's own through
    /// the endpoint and the forwarded ones), while the host still reaches the members directly:
    /// the endpoint is broken here and the apiservers are up, the case cpha withdraws for.
    pub fn break_endpoint(&mut self, i: usize) -> Result<()> {
        let rules = "table inet cphatest {
\tchain output { type filter hook output priority 0; policy accept; ct status dnat tcp dport 6443 ip daddr 10.80.0.0/24 reject with tcp reset; }
\tchain forward { type filter hook forward priority 0; policy accept; ct status dnat tcp dport 6443 ip daddr 10.80.0.0/24 reject with tcp reset; }
}
";
        run_stdin(self.hosts[i].ns.command("nft").args(["-f", "-"]), rules)?;
        self.kill_haproxy(i)?;
        Ok(())
    }

    /// Refuses every connection from host `i` to the apiserver port of `addresses` (its own
    /// connections and the ones it forwards), as a path broken to those members only would.
    /// [`VipLab::repair_endpoint`] undoes it.
    pub fn cut_from(&self, i: usize, addresses: &[&str]) -> Result<()> {
        let set = addresses.join(", ");
        let rules = format!(
            "table inet cphatest {{
\tchain output {{ type filter hook output priority 0; policy accept; tcp dport 6443 ip daddr {{ {set} }} reject with tcp reset; }}
\tchain forward {{ type filter hook forward priority 0; policy accept; tcp dport 6443 ip daddr {{ {set} }} reject with tcp reset; }}
}}
"
        );
        run_stdin(self.hosts[i].ns.command("nft").args(["-f", "-"]), &rules)?;
        Ok(())
    }

    /// A fault on host `i`'s apiserver (JSON as the stand-in's `/_standin/faults` takes it,
    /// e.g. `{"readyzFail": true}`).
    pub fn fault(&self, i: usize, json: &str) -> Result<()> {
        let out = self.hosts[i]
            .ns
            .command(&self.programs.lab)
            .args(["http", "--method", "POST", "--url", "http://127.0.0.1:7000/_standin/faults", "--data", json])
            .output()?;
        ensure!(out.status.success(), "fault {json} on h{}: {}", i + 1, String::from_utf8_lossy(&out.stdout));
        Ok(())
    }

    /// Whether host `i`'s kernel forward still translates new connections (its nftables table
    /// has a DNAT rule: a withdrawn forward keeps only the rule that lets flows drain).
    pub fn forwarding(&self, i: usize) -> bool {
        self.hosts[i].ns.run("nft", &["list", "table", "inet", "cpha"]).is_ok_and(|t| t.contains("dnat"))
    }

    /// Undoes [`VipLab::break_endpoint`]'s rules (HAProxy is not restarted).
    pub fn repair_endpoint(&self, i: usize) -> Result<()> {
        self.hosts[i].ns.run("nft", &["delete", "table", "inet", "cphatest"])?;
        Ok(())
    }

    /// The hosts (0-based) that hold the VIP now, from the kernel's address lists.
    pub fn holders(&self) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for (i, h) in self.hosts.iter().enumerate() {
            let text = h.ns.ip(&["-o", "address", "show"])?;
            if text.contains(&format!(" {VIP}/")) {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// Waits until exactly one host holds the VIP (other than `not`) and returns it.
    pub fn wait_holder(&self, timeout: Duration, not: Option<usize>) -> Result<usize> {
        wait_for("one host to hold the VIP", timeout, || {
            let h = self.holders()?;
            Ok(match h.as_slice() {
                [one] if Some(*one) != not => Some(*one),
                _ => None,
            })
        })
        .with_context(|| self.logs())
    }

    /// `cpha status --json` on host `i`.
    pub fn status(&self, i: usize) -> Result<serde_json::Value> {
        let out = self.hosts[i].ns.command(&self.programs.cpha).args(["status", "--json"]).output()?;
        ensure!(out.status.success(), "cpha status on h{}: {}", i + 1, String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The agent's Prometheus text on host `i`.
    pub fn metrics(&self, i: usize) -> Result<String> {
        let out = self.hosts[i]
            .ns
            .command(&self.programs.lab)
            .args(["http", "--url", "http://127.0.0.1:9966/metrics"])
            .output()?;
        ensure!(out.status.success(), "GET /metrics on h{}", i + 1);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["body"].as_str().unwrap_or_default().to_string())
    }

    /// Writes the ConfigMap's `members` key (kubectl with admin credentials, from the API host).
    pub fn set_members(&self, value: &str) -> Result<()> {
        let manifest = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cpha-members", "namespace": "kube-system"},
            "data": {"members": value},
        });
        let mut cmd = self.api.command("kubectl");
        cmd.arg("--kubeconfig").arg(self.dir.join("admin.kubeconfig")).args(["apply", "-f", "-"]);
        run_stdin(&mut cmd, &manifest.to_string())?;
        Ok(())
    }

    /// New TLS connections from the worker to the VIP, `rate` a second, each bounded by
    /// `timeout`, for `duration`, every connection in the report's timeline.
    pub fn worker_load(&self, duration: Duration, rate: u32, timeout: Duration) -> Result<Child> {
        let d = format!("{}ms", duration.as_millis());
        let t = format!("{}ms", timeout.as_millis());
        let r = rate.to_string();
        self.worker.spawn(
            &self.programs.lab,
            &[
                "https-loop",
                "--to",
                ENDPOINT,
                "--path",
                "/readyz",
                "--concurrency",
                "8",
                "--rate",
                &r,
                "--duration",
                &d,
                "--timeout",
                &t,
                "--timeline",
            ],
        )
    }

    /// One request from the worker to the VIP: whether `/readyz` answered 200 within `timeout`.
    pub fn worker_request(&self, timeout: Duration) -> bool {
        let t = format!("{}ms", timeout.as_millis());
        self.worker
            .command(&self.programs.lab)
            .args(["https-loop", "--to", ENDPOINT, "--path", "/readyz", "--concurrency", "1", "--duration", "10s"])
            .args(["--max-conns", "1", "--timeout", &t])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The longest time, within `[from, to]`, that two or more hosts held the VIP at once.
    pub fn longest_overlap(&self, from: Instant, to: Instant) -> Duration {
        let changes = self.changes.lock().expect("lock").clone();
        overlap(&changes, self.hosts.len(), from, to)
    }

    pub fn log(&self, i: usize, name: &str) -> String {
        std::fs::read_to_string(self.hosts[i].dir.join(name)).unwrap_or_default()
    }

    /// Every host's agent and keepalived log, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for i in 0..self.hosts.len() {
            for name in ["cpha.log", "keepalived.log"] {
                let text = self.log(i, name);
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                s.push_str(&format!("---- h{} {name} (last lines) ----\n", i + 1));
                for line in tail.into_iter().rev() {
                    s.push_str(line);
                    s.push('\n');
                }
            }
        }
        s
    }
}

impl Drop for VipLab {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for m in &mut self.monitors {
            let _ = m.signal(libc::SIGKILL);
        }
        // Processes die with their namespaces (Netns's drop).
        if std::env::var_os("CPHA_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Connects `ns` to the bridge with address `addr` on its end (renamed eth0); returns the
/// bridge-side port's name.
fn attach(bridge: &Netns, ns: &Netns, addr: &str) -> Result<String> {
    let (port, end) = veth_pair(bridge, &[], ns, &[addr])?;
    bridge.ip(&["link", "set", &port, "master", "br0"])?;
    ns.ip(&["link", "set", &end, "down"])?;
    ns.ip(&["link", "set", &end, "name", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    wait_for("eth0 up", Duration::from_secs(5), || {
        Ok(ns.ip(&["-o", "link", "show", "dev", "eth0"])?.contains(" state UP ").then_some(()))
    })?;
    Ok(port)
}

fn log(dir: &Path, name: &str) -> Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name)).context("opening a log file")
}

fn run_stdin(cmd: &mut Command, input: &str) -> Result<String> {
    use std::io::Write;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The longest stretch within `[from, to]` during which two or more of `hosts` held the VIP,
/// from the recorded changes (state before the first change: not held).
pub fn overlap(changes: &[Change], hosts: usize, from: Instant, to: Instant) -> Duration {
    let mut held = vec![false; hosts];
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    let mut sorted = changes.to_vec();
    sorted.sort_by_key(|c| c.at);
    for c in sorted.iter().filter(|c| c.at <= to) {
        held[c.host] = c.holds;
        let many = held.iter().filter(|h| **h).count() >= 2;
        match (many, since) {
            (true, None) => since = Some(c.at.max(from)),
            (false, Some(s)) => {
                if c.at >= from {
                    longest = longest.max(c.at.saturating_duration_since(s));
                }
                since = None;
            }
            _ => {}
        }
    }
    if let Some(s) = since {
        longest = longest.max(to.saturating_duration_since(s));
    }
    longest
}

/// From a load run's timeline and the fault's time (seconds since the run started): the time
/// from the fault until the endpoint answered again, and the connections that failed after the
/// fault. "Answered again" is the end of the first successful connection started after the
/// last failed one started (after the fault itself when none failed): a fault can take effect
/// a moment after it happens (a killed keepalived's address is removed by cpha first).
pub fn recovery(timeline: &[crate::report::ConnRecord], fault_s: f64) -> Option<(Duration, u64)> {
    let failures: Vec<_> = timeline.iter().filter(|c| !c.ok && c.end_s >= fault_s).collect();
    let from = failures.iter().map(|c| c.start_s).fold(fault_s, f64::max);
    let back = timeline.iter().filter(|c| c.ok && c.start_s >= from).map(|c| c.end_s).reduce(f64::min)?;
    Some((Duration::from_secs_f64((back - fault_s).max(0.0)), failures.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::ConnRecord;

    #[test]
    fn overlap_is_the_longest_double_holding() {
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let changes = [
            Change { at: at(0), host: 0, holds: true },
            Change { at: at(100), host: 1, holds: true },
            Change { at: at(130), host: 0, holds: false },
            Change { at: at(500), host: 2, holds: true },
            Change { at: at(900), host: 1, holds: false },
        ];
        assert_eq!(overlap(&changes, 3, at(0), at(1000)), Duration::from_millis(400));
        assert_eq!(overlap(&changes, 3, at(0), at(300)), Duration::from_millis(30));
        assert_eq!(overlap(&changes, 3, at(0), at(700)), Duration::from_millis(200));
    }

    #[test]
    fn recovery_is_measured_to_the_first_success_started_after_the_fault() {
        let c = |start_s, end_s, ok| ConnRecord { start_s, end_s, ok };
        let timeline = [
            c(0.9, 0.95, true),
            c(1.0, 2.0, false),
            c(1.12, 1.13, true),
            c(1.2, 1.5, false),
            c(2.1, 2.2, true),
            c(2.3, 2.4, true),
        ];
        // The success at 1.12 s came before the fault took effect; the endpoint was back at 2.2 s.
        let (d, failed) = recovery(&timeline, 1.1).unwrap();
        assert!((d.as_secs_f64() - 1.1).abs() < 1e-9, "{d:?}");
        assert_eq!(failed, 2);
        let (d, failed) = recovery(&timeline, 2.25).unwrap();
        assert!((d.as_secs_f64() - 0.15).abs() < 1e-9, "no failure: the next success, {d:?}");
        assert_eq!(failed, 0);
        assert!(recovery(&timeline, 3.0).is_none());
    }
}
