//! A small control plane in network namespaces for `cpha run` end-to-end tests.
//!
//! ```text
//!  client 10.10.0.2 ── veth ── cp 10.10.0.1   (endpoint 10.10.0.1:6443; HAProxy private :9445)
//!                              cp 10.2N.0.1 ── veth ── mN 10.2N.0.2:6443  (kube-standin, N = 1..3)
//! ```
//! Each member runs the Kubernetes API stand-in as its apiserver (TLS, anonymous /readyz). m1
//! also holds the `kube-system/cpha-members` ConfigMap the agent watches. HAProxy runs in the
//! cp namespace in master-worker mode, started and killed by the test as systemd would.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use cpha_lab::netns::{self, Child, Netns};
use cpha_lab::report::{LoadReport, StreamReport};

pub const ENDPOINT: &str = "10.10.0.1:6443";
pub const HAPROXY_PRIVATE: &str = "10.10.0.1:9445";
pub const BACKEND: &str = "kube-apiservers";

pub struct Member {
    pub ns: Netns,
    pub addr: String,
    pub standin: Child,
}

pub struct Cluster {
    pub cp: Netns,
    pub client: Netns,
    pub members: Vec<Member>,
    pub dir: PathBuf,
    pub haproxy: Option<Child>,
    pub agent: Option<Child>,
    /// Extra flags of every member's stand-in (kept for restarts).
    standin_args: Vec<String>,
}

/// Member behaviour for the restart tests: `/version` takes 200 ms (a request long enough to
/// be in flight when something happens) and SIGTERM fails `/readyz` while still serving for
/// `shutdown_delay`, like kube-apiserver's `--shutdown-delay-duration`.
pub fn slow_members(shutdown_delay: &str) -> Vec<String> {
    ["--delay", "200ms", "--delay-path-prefix", "/version", "--shutdown-delay", shutdown_delay]
        .map(String::from)
        .to_vec()
}

pub fn bin(name: &str) -> String {
    netns::require_bin(name).unwrap_or_else(|e| panic!("{e:#}")).display().to_string()
}

impl Cluster {
    pub fn new(members: usize) -> Result<Cluster> {
        Cluster::with_standin_args(members, Vec::new())
    }

    /// Members whose stand-ins get `args` too; m1 keeps its objects in a state file, so the
    /// ConfigMap survives a restart of m1.
    pub fn with_standin_args(members: usize, standin_args: Vec<String>) -> Result<Cluster> {
        cpha_lab::require_root!();
        let cp = Netns::new("cpha-cp")?;
        let client = Netns::new("cpha-cl")?;
        netns::veth(&cp, &["10.10.0.1/24"], &client, &["10.10.0.2/24"])?;
        netns::route(&client, &["default", "via", "10.10.0.1"])?;
        cp.sysctl("net.ipv4.ip_forward", "1")?;
        let dir = std::env::temp_dir().join(format!("cpha-e2e-{}-{}", std::process::id(), cp.name()));
        std::fs::create_dir_all(dir.join("pki"))?;
        let mut cluster = Cluster { cp, client, members: Vec::new(), dir, haproxy: None, agent: None, standin_args };
        for n in 1..=members {
            let ns = Netns::new(&format!("cpha-m{n}"))?;
            netns::veth(&cluster.cp, &[&format!("10.2{n}.0.1/24")], &ns, &[&format!("10.2{n}.0.2/24")])?;
            netns::route(&ns, &["default", "via", &format!("10.2{n}.0.1")])?;
            let ip = format!("10.2{n}.0.2");
            let standin = cluster.start_standin(&ns, &ip, n == 1)?;
            cluster.members.push(Member { ns, addr: format!("{ip}:6443"), standin });
        }
        Ok(cluster)
    }

    fn start_standin(&self, ns: &Netns, ip: &str, api: bool) -> Result<Child> {
        let pki = self.dir.join("pki").display().to_string();
        let mut args = vec![
            "--listen".to_string(),
            "0.0.0.0:6443".into(),
            "--cert-dir".into(),
            pki,
            "--san".into(),
            ip.into(),
            "--control-listen".into(),
            "127.0.0.1:7000".into(),
            "--token".into(),
            "admin:admin-secret:*/*".into(),
            "--bookmark-interval".into(),
            "2s".into(),
        ];
        args.extend(self.standin_args.iter().cloned());
        if api && !self.standin_args.is_empty() {
            args.extend(["--state".into(), self.dir.join("standin-state.json").display().to_string()]);
        }
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
        let mut cmd = ns.command(bin("kube-standin"));
        cmd.args(&args).stderr(log_file(&self.dir, &format!("standin-{ip}.log"))?);
        let mut child = Child::spawn(cmd, format!("kube-standin {ip}"))?;
        child.stdout_line(Duration::from_secs(20)).context("the stand-in did not start")?;
        Ok(child)
    }

    /// Stops member `n`'s apiserver with `signal` (15: the graceful shutdown, 9: a hard kill),
    /// waits for it to exit, and starts it again.
    pub fn restart_member(&mut self, n: usize, signal: i32) -> Result<()> {
        self.stop_member(n, signal)?;
        self.start_member(n)
    }

    pub fn stop_member(&mut self, n: usize, signal: i32) -> Result<()> {
        let m = &mut self.members[n - 1];
        m.standin.signal(signal)?;
        m.standin.wait_timeout(Duration::from_secs(30))?.with_context(|| format!("m{n} did not stop"))?;
        Ok(())
    }

    pub fn start_member(&mut self, n: usize) -> Result<()> {
        let ip = format!("10.2{n}.0.2");
        let standin = self.start_standin(&self.members[n - 1].ns, &ip, n == 1)?;
        self.members[n - 1].standin = standin;
        Ok(())
    }

    /// Makes member `n`'s host silent (`true`: every packet in and out dropped, loopback
    /// aside, as when a host loses power or its network) or reachable again (`false`).
    pub fn member_unreachable(&self, n: usize, unreachable: bool) -> Result<()> {
        let ns = &self.members[n - 1].ns;
        if unreachable {
            ns.run("nft", &["add", "table", "inet", "cpha-silent"])?;
            for (chain, hook, iface) in [("in", "input", "iif"), ("out", "output", "oif")] {
                let spec = format!("{{ type filter hook {hook} priority 0; policy drop; }}");
                ns.run("nft", &["add", "chain", "inet", "cpha-silent", chain, &spec])?;
                ns.run("nft", &["add", "rule", "inet", "cpha-silent", chain, iface, "lo", "accept"])?;
            }
        } else {
            ns.run("nft", &["delete", "table", "inet", "cpha-silent"])?;
        }
        Ok(())
    }

    /// The operational state of member `n`'s server in HAProxy (0 DOWN, 2 UP), if it exists.
    pub fn member_state(&self, n: usize) -> Result<Option<u32>> {
        let ip = format!("10.2{n}.0.2");
        Ok(self.servers()?.into_iter().find(|(_, addr, _)| *addr == ip).map(|(_, _, st)| st))
    }

    pub fn wait_member_state(&self, n: usize, state: u32, timeout: Duration) -> Result<()> {
        netns::wait_for(&format!("m{n} in state {state}"), timeout, || {
            Ok((self.member_state(n).ok().flatten() == Some(state)).then_some(()))
        })
    }

    /// A `show stat` column of member `n`'s server (`scur`, `stot`, ...).
    pub fn member_stat(&self, n: usize, column: &str) -> Result<u64> {
        let name = self
            .servers()?
            .into_iter()
            .find(|(_, addr, _)| *addr == format!("10.2{n}.0.2"))
            .map(|(name, _, _)| name)
            .with_context(|| format!("no server for m{n}"))?;
        let out = self.admin("show stat")?;
        let mut header: Vec<&str> = Vec::new();
        for line in out.lines() {
            if let Some(h) = line.strip_prefix("# ") {
                header = h.split(',').collect();
                continue;
            }
            let f: Vec<&str> = line.split(',').collect();
            if f.first() == Some(&BACKEND) && f.get(1) == Some(&name.as_str()) {
                let i = header.iter().position(|h| *h == column).with_context(|| format!("no {column} column"))?;
                return f[i].parse().with_context(|| format!("{column} of {name} is not a number: {line:?}"));
            }
        }
        bail!("no show stat row for {name}")
    }

    pub fn member_list(&self, which: &[usize]) -> String {
        which.iter().map(|i| self.members[*i - 1].addr.clone()).collect::<Vec<_>>().join(",")
    }

    /// Writes the ConfigMap's `members` key through kubectl (admin credentials, on m1).
    pub fn set_members(&self, value: &str) -> Result<()> {
        let manifest = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cpha-members", "namespace": "kube-system"},
            "data": {"members": value},
        });
        self.kubectl(&["apply", "-f", "-"], Some(&manifest.to_string()))?;
        Ok(())
    }

    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut cmd = self.cp.command("kubectl");
        cmd.arg("--kubeconfig").arg(self.dir.join("admin.kubeconfig")).args(args);
        run_with_stdin(cmd, stdin)
    }

    /// Writes the agent's configuration with the shipped defaults for the handover and the
    /// apply timing (only paths and addresses set), and returns its path.
    pub fn write_default_config(&self, topology: &str, mode: &str, seed: &str) -> Result<PathBuf> {
        let path = self.write_config(topology, mode, seed)?;
        let text = std::fs::read_to_string(&path)?;
        let mut out = String::new();
        let mut skipping = false;
        for line in text.lines() {
            if line == "handover:" {
                skipping = true;
                continue;
            }
            if skipping && line.starts_with("  ") {
                continue;
            }
            skipping = false;
            let timing = ["  minApplyInterval:", "  minReloadInterval:", "  drainTimeout: 10s"];
            if !timing.iter().any(|t| line.starts_with(t)) {
                out.push_str(line);
                out.push('\n');
            }
        }
        std::fs::write(&path, out)?;
        Ok(path)
    }

    /// Writes the agent's configuration and returns its path.
    pub fn write_config(&self, topology: &str, mode: &str, seed: &str) -> Result<PathBuf> {
        let d = self.dir.display();
        let text = format!(
            "endpoint:
  listen: {ENDPOINT}
  topology: {topology}
  haproxyBind: {HAPROXY_PRIVATE}
forward:
  mode: {mode}
  drainTimeout: 30s
handover:
  rise: 2
  fall: 3
  interval: 500ms
  probeTimeout: 500ms
agent:
  statusListen: 127.0.0.1:9966
members:
  source: configMap
  static: [{seed}]
  stateFile: {d}/members.json
kubernetes:
  kubeconfig: [{d}/cpha.kubeconfig]
  pollInterval: 500ms
haproxy:
  configPath: {d}/haproxy.cfg
  adminSocket: {d}/admin.sock
  masterSocket: {d}/master.sock
  minApplyInterval: 200ms
  minReloadInterval: 1s
  drainTimeout: 10s
"
        );
        let path = self.dir.join("cpha.yaml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    pub fn start_agent(&mut self, config: &Path) -> Result<()> {
        self.start_agent_with_env(config, &[])
    }

    pub fn start_agent_with_env(&mut self, config: &Path, env: &[(&str, String)]) -> Result<()> {
        self.start_agent_wrapped(config, env, &[])
    }

    /// The agent started through `wrapper` (a program that execs the rest of its arguments,
    /// such as `prlimit --nofile=256:256`), so its pid is the agent's.
    pub fn start_agent_wrapped(&mut self, config: &Path, env: &[(&str, String)], wrapper: &[&str]) -> Result<()> {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = self.cp.command(program);
                cmd.args(args).arg(support_cpha());
                cmd
            }
            None => self.cp.command(support_cpha()),
        };
        cmd.args(["run", "--config"]).arg(config).stderr(log_file(&self.dir, "cpha.log")?);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.agent = Some(Child::spawn(cmd, "cpha run")?);
        self.wait_phase(&["forwarding", "balanced"], Duration::from_secs(30))?;
        Ok(())
    }

    pub fn signal_agent(&self, sig: i32) -> Result<()> {
        self.agent.as_ref().context("the agent is not running")?.signal(sig)
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut a) = self.agent.take() {
            a.signal(9)?;
            a.wait_timeout(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// The agent's `/status`, through `cpha status --json` in the cp namespace.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = self.cp.command(support_cpha()).args(["status", "--json"]).output()?;
        ensure!(out.status.success(), "cpha status failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn phase(&self) -> Result<String> {
        Ok(self.status()?["agent"]["phase"].as_str().unwrap_or("").to_string())
    }

    pub fn wait_phase(&self, phases: &[&str], timeout: Duration) -> Result<String> {
        netns::wait_for(&format!("agent phase {phases:?}"), timeout, || {
            let p = self.phase().unwrap_or_default();
            Ok(phases.contains(&p.as_str()).then_some(p))
        })
        .with_context(|| format!("agent log:\n{}", self.agent_log()))
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("cpha.log")).unwrap_or_default()
    }

    /// Starts HAProxy on the file the agent wrote, as systemd or the kubelet would.
    pub fn start_haproxy(&mut self) -> Result<()> {
        let cfg = self.dir.join("haproxy.cfg");
        netns::wait_for("haproxy.cfg written by the agent", Duration::from_secs(20), || Ok(cfg.exists().then_some(())))
            .with_context(|| self.agent_log())?;
        let master = format!("{},level,admin", self.dir.join("master.sock").display());
        let mut cmd = self.cp.command("haproxy");
        cmd.args(["-W", "-S", &master, "-f"]).arg(&cfg).stderr(log_file(&self.dir, "haproxy.log")?);
        self.haproxy = Some(Child::spawn(cmd, "haproxy")?);
        netns::wait_for("HAProxy's admin socket", Duration::from_secs(10), || {
            Ok(self.admin("show info").ok().filter(|s| s.contains("Pid:")).map(|_| ()))
        })?;
        Ok(())
    }

    /// SIGKILL to every HAProxy process in the cp namespace (master and workers).
    pub fn kill_haproxy(&mut self) -> Result<()> {
        for pid in self.cp.pids()? {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "haproxy" {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        if let Some(mut h) = self.haproxy.take() {
            h.wait_timeout(Duration::from_secs(5))?;
        }
        netns::wait_for("HAProxy gone", Duration::from_secs(5), || Ok(self.admin("show info").is_err().then_some(())))?;
        Ok(())
    }

    pub fn admin(&self, command: &str) -> Result<String> {
        socket_command(&self.dir.join("admin.sock"), command)
    }

    pub fn master(&self, command: &str) -> Result<String> {
        socket_command(&self.dir.join("master.sock"), command)
    }

    /// The worker PIDs and the master's reload count, from `show proc`.
    pub fn workers(&self) -> Result<(Vec<String>, String)> {
        let out = self.master("show proc")?;
        let mut workers = Vec::new();
        let mut reloads = None;
        for line in out.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(1) == Some(&"master") {
                // A count that does not parse fails here: read as "" it would make every
                // "no reload" comparison pass.
                let count = f.get(2).with_context(|| format!("no reload count in {line:?}"))?;
                count.parse::<u32>().with_context(|| format!("the reload count is not a number in {line:?}"))?;
                reloads = Some(count.to_string());
            } else if f.get(1) == Some(&"worker") {
                workers.push(f[0].to_string());
            }
        }
        let reloads = reloads.with_context(|| format!("no master line in `show proc`:\n{out}"))?;
        ensure!(!workers.is_empty(), "no worker in `show proc`:\n{out}");
        Ok((workers, reloads))
    }

    /// Server name -> (address, operational state) of the apiserver backend, from the Runtime API.
    /// The servers taking new connections (neither draining nor in maintenance), by name.
    pub fn serving(&self) -> Result<Vec<String>> {
        let out = self.admin(&format!("show servers state {BACKEND}"))?;
        let mut names = Vec::new();
        for line in out.lines().skip(1).filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // srv_admin_state: maintenance 0x01|0x02|0x04|0x20|0x40, drain 0x08|0x10. A row
            // whose column does not parse is an error, not a server that is not serving.
            let admin: u32 = f
                .get(6)
                .with_context(|| format!("no srv_admin_state in {line:?}"))?
                .parse()
                .with_context(|| format!("srv_admin_state is not a number in {line:?}"))?;
            if admin == 0 {
                names.push(f[3].to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Waits until `n` servers are serving and returns them.
    pub fn serving_after(&self, timeout: Duration, n: usize) -> Result<Vec<String>> {
        netns::wait_for(&format!("{n} serving servers"), timeout, || Ok(self.serving().ok().filter(|s| s.len() == n)))
    }

    pub fn servers(&self) -> Result<Vec<(String, String, u32)>> {
        let out = self.admin(&format!("show servers state {BACKEND}"))?;
        let mut servers = Vec::new();
        for line in out.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 5 && !line.starts_with('#') {
                let state = f[5].parse().with_context(|| format!("srv_op_state is not a number in {line:?}"))?;
                servers.push((f[3].to_string(), f[4].to_string(), state));
            }
        }
        Ok(servers)
    }

    /// Total sessions each server of the backend has taken (`stot` of `show stat`).
    pub fn server_totals(&self) -> Result<Vec<(String, u64)>> {
        let out = self.admin("show stat")?;
        let mut header: Vec<&str> = Vec::new();
        let mut totals = Vec::new();
        for line in out.lines() {
            if let Some(h) = line.strip_prefix("# ") {
                header = h.split(',').collect();
                continue;
            }
            let f: Vec<&str> = line.split(',').collect();
            if f.first() == Some(&BACKEND) && f.get(1).is_some_and(|s| *s != "BACKEND" && *s != "FRONTEND") {
                let i = header.iter().position(|h| *h == "stot").context("no stot column")?;
                let total = f[i].parse().with_context(|| format!("stot of {} is not a number: {line:?}", f[1]))?;
                totals.push((f[1].to_string(), total));
            }
        }
        Ok(totals)
    }

    /// A steady stream of new TLS connections to the endpoint from `from`, for `duration`.
    pub fn https_loop(&self, from: &Netns, duration: &str) -> Result<Child> {
        from.spawn(
            bin("cpha-lab"),
            &[
                "https-loop",
                "--to",
                ENDPOINT,
                "--path",
                "/readyz",
                "--concurrency",
                "4",
                "--duration",
                duration,
                "--max-conns",
                "200000",
                "--timeout",
                "3s",
            ],
        )
    }

    /// New TLS connections at `rate` a second, each one `GET path` (bounded: `duration`, and at
    /// most `rate × duration` connections); stop it early with SIGTERM, it still reports.
    pub fn https_load(&self, from: &Netns, path: &str, rate: u32, concurrency: u32, duration_s: u32) -> Result<Child> {
        let max = (rate * duration_s).to_string();
        from.spawn(
            bin("cpha-lab"),
            &[
                "https-loop",
                "--to",
                ENDPOINT,
                "--path",
                path,
                "--concurrency",
                &concurrency.to_string(),
                "--rate",
                &rate.to_string(),
                "--duration",
                &format!("{duration_s}s"),
                "--max-conns",
                &max,
                "--timeout",
                "5s",
            ],
        )
    }

    pub fn https_stream(&self, from: &Netns, tag: &str) -> Result<Child> {
        self.https_stream_path(from, tag, "/readyz")
    }

    /// A long-lived keep-alive HTTPS connection (`GET path` every 50 ms), as a watch holds one.
    pub fn https_stream_path(&self, from: &Netns, tag: &str, path: &str) -> Result<Child> {
        let ready = self.dir.join(format!("stream-{tag}.ready"));
        let r = ready.display().to_string();
        let child = from.spawn(
            bin("cpha-lab"),
            &[
                "https-stream",
                "--to",
                ENDPOINT,
                "--path",
                path,
                "--interval",
                "50ms",
                "--max-duration",
                "300s",
                "--ready-file",
                &r,
            ],
        )?;
        netns::wait_for("the long-lived connection's first round trip", Duration::from_secs(10), || {
            Ok(ready.exists().then_some(()))
        })?;
        Ok(child)
    }

    /// The agent's Prometheus metrics, from its status port in the cp namespace.
    pub fn metrics(&self) -> Result<String> {
        let out = self.cp.command(bin("cpha-lab")).args(["http", "--url", "http://127.0.0.1:9966/metrics"]).output()?;
        ensure!(out.status.success(), "GET /metrics: {}", String::from_utf8_lossy(&out.stdout));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["body"].as_str().unwrap_or_default().to_string())
    }

    /// A stand-in fault (JSON as `/_standin/faults` takes it) on member `n`.
    pub fn fault(&self, n: usize, json: &str) -> Result<()> {
        let out = self.members[n - 1]
            .ns
            .command(bin("cpha-lab"))
            .args(["http", "--method", "POST", "--url", "http://127.0.0.1:7000/_standin/faults", "--data", json])
            .output()?;
        ensure!(out.status.success(), "fault {json} on m{n}: {}", String::from_utf8_lossy(&out.stdout));
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes die with their namespaces; the kernel rules in cp go with it too.
        if std::thread::panicking() {
            eprintln!("---- cpha log ----\n{}", self.agent_log());
            eprintln!(
                "---- haproxy log ----\n{}",
                std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn load_report(mut child: Child, timeout: Duration) -> Result<LoadReport> {
    let (_, lines) = child.finish(timeout)?;
    let line = lines.last().context("the load client printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("load client printed {line:?}"))
}

/// Stops the stream client (unless it ended by itself) and returns its report.
pub fn stream_report(mut child: Child) -> Result<StreamReport> {
    if child.try_wait()?.is_none() {
        child.signal(15)?;
    }
    let (_, lines) = child.finish(Duration::from_secs(10))?;
    let line = lines.last().context("the stream client printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("stream client printed {line:?}"))
}

fn support_cpha() -> &'static str {
    env!("CARGO_BIN_EXE_cpha")
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name)).context("opening a log file")
}

fn run_with_stdin(mut cmd: Command, stdin: Option<&str>) -> Result<String> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn socket_command(path: &Path, command: &str) -> Result<String> {
    let mut s = UnixStream::connect(path).with_context(|| format!("connecting to {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    // The master CLI answers and then waits for the client to close its side.
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
