//! Throw-away network namespaces for tests and benchmarks: creation, veth links, routes, sysctls,
//! processes inside, and teardown that runs even when a test fails.
//!
//! Everything goes through `ip` (iproute2), without a shell, so a failure names the command and
//! carries its output.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Counter behind namespace and interface names, unique within this process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Prefixes whose namespaces left behind by dead processes were already removed.
static SWEPT: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// How long a process gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(2);

/// A network namespace that is deleted, with every process still inside, when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace named `<prefix>-<pid>-<counter>` and brings `lo` up.
    ///
    /// The first call for a prefix also removes namespaces of that prefix whose creating process
    /// is gone (left behind by a killed test run).
    pub fn new(prefix: &str) -> Result<Netns> {
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            bail!("netns prefix {prefix:?}: use letters, digits, '_' or '-'");
        }
        sweep_once(prefix);
        // A namespace left by a dead process that had our pid is skipped, not reused.
        let name = (0..1000)
            .map(|_| format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)))
            .find(|name| !exists(name))
            .ok_or_else(|| anyhow!("no free namespace name for prefix {prefix}"))?;
        ip(&["netns", "add", &name])?;
        record(&name);
        // From here on Drop deletes the namespace, also when bringing lo up fails.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(&self.name).arg(program);
        cmd
    }

    /// Runs `program args` inside the namespace to completion and returns its stdout; a non-zero
    /// exit is an error that carries stdout and stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.command(program);
        cmd.args(args);
        output_of(cmd, &format!("{program} {} (in netns {})", args.join(" "), self.name))
    }

    /// Runs `ip -n NAME args`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Starts a long-running `program args` inside the namespace with stdout piped (see
    /// [`Child::stdout_line`]) and stderr inherited.
    pub fn spawn(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Result<Child> {
        let program = program.as_ref();
        let mut cmd = self.command(program);
        cmd.args(args);
        let label = format!("{} {} (in netns {})", program.to_string_lossy(), args.join(" "), self.name);
        Child::spawn(cmd, label)
    }

    /// Sets a sysctl of this namespace, e.g. `sysctl("net.ipv4.ip_forward", "1")`. A key that
    /// contains '/' is taken as a path under /proc/sys (for interface names with dots).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        if key.is_empty() || key.contains("..") || key.starts_with('/') {
            bail!("sysctl key {key:?} is not a sysctl name");
        }
        let path =
            if key.contains('/') { format!("/proc/sys/{key}") } else { format!("/proc/sys/{}", key.replace('.', "/")) };
        // /proc/sys/net shows the namespace of the process that opens it, so the write happens in
        // a process inside the namespace; the values travel as arguments, never as shell text.
        self.run("sh", &["-c", "printf '%s\\n' \"$1\" > \"$2\"", "sh", value, &path])
            .with_context(|| format!("setting {key}={value} in netns {}", self.name))?;
        Ok(())
    }

    /// Reads a sysctl of this namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        Ok(self.run("cat", &[&path])?.trim().to_string())
    }

    /// Pids of the processes inside the namespace.
    pub fn pids(&self) -> Result<Vec<u32>> {
        pids_of(&self.name)
    }

    fn teardown(&self) -> Result<()> {
        kill_all(&self.name)?;
        ip(&["netns", "del", &self.name])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = self.teardown() {
            eprintln!("cpha-lab: removing netns {}: {err:#}", self.name);
        }
    }
}

/// Appends a new namespace's name to the file `$CPHA_NETNS_RECORD` names, when set: `hack/test`
/// removes the recorded namespaces a killed test left behind (`hack/netns-guard`), and only those.
fn record(name: &str) {
    let Some(path) = std::env::var_os("CPHA_NETNS_RECORD").filter(|p| !p.is_empty()) else { return };
    let written = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{name}\n").as_bytes()));
    if let Err(err) = written {
        eprintln!("cpha-lab: recording netns {name} in {}: {err}", Path::new(&path).display());
    }
}

/// Whether a namespace of this name exists (`/run/netns/NAME`).
pub fn exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn pids_of(name: &str) -> Result<Vec<u32>> {
    let out = ip(&["netns", "pids", name])?;
    out.split_whitespace().map(|p| p.parse().with_context(|| format!("ip netns pids printed {p:?}"))).collect()
}

/// SIGKILLs every process inside the namespace and waits (bounded) until none is left.
fn kill_all(name: &str) -> Result<()> {
    let deadline = Instant::now() + GRACE;
    loop {
        let pids = pids_of(name)?;
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("processes {pids:?} still in netns {name} after SIGKILL");
        }
        for pid in pids {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: plain kill(2); a process that is already gone just returns ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Removes namespaces `<prefix>-<pid>-<n>` whose creating process no longer exists.
pub fn sweep_stale(prefix: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let list = match std::fs::read_dir("/run/netns") {
        Ok(list) => list,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(err) => return Err(err).context("listing /run/netns"),
    };
    for entry in list {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let Some((pid, counter)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), counter.parse::<u32>()) else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        kill_all(&name)?;
        ip(&["netns", "del", &name])?;
        removed.push(name);
    }
    Ok(removed)
}

fn sweep_once(prefix: &str) {
    let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
    if !swept.get_or_insert_with(HashSet::new).insert(prefix.to_string()) {
        return;
    }
    match sweep_stale(prefix) {
        Ok(removed) if !removed.is_empty() => {
            eprintln!("cpha-lab: removed stale network namespaces {removed:?}");
        }
        Ok(_) => {}
        Err(err) => eprintln!("cpha-lab: removing stale {prefix}-* namespaces: {err:#}"),
    }
}

/// A process started by [`Netns::spawn`] or [`Child::spawn`]; SIGTERM, then SIGKILL after 2 s,
/// and reaped when dropped.
#[derive(Debug)]
pub struct Child {
    child: std::process::Child,
    name: String,
    lines: mpsc::Receiver<String>,
    status: Option<ExitStatus>,
}

impl Child {
    /// Spawns `cmd` with stdout piped and read line by line in the background.
    pub fn spawn(mut cmd: Command, name: impl Into<String>) -> Result<Child> {
        let name = name.into();
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        thread::Builder::new()
            .name("child-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .context("starting the stdout reader thread")?;
        Ok(Child { child, name, lines, status: None })
    }

    /// Wraps a process started elsewhere (its stdout already taken), so it is stopped on drop.
    pub fn from_std(child: std::process::Child, name: impl Into<String>) -> Child {
        let (_tx, lines) = mpsc::channel();
        Child { child, name: name.into(), lines, status: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`); an error once the process was reaped.
    pub fn signal(&self, sig: i32) -> Result<()> {
        if let Some(status) = self.status {
            bail!("{} already exited ({status})", self.name);
        }
        let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
        // SAFETY: kill(2) on our own unreaped child: the pid cannot have been reused.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sending signal {sig} to {}", self.name));
        }
        Ok(())
    }

    /// Waits up to `d` for the process to exit; `None` if it still runs.
    pub fn wait_timeout(&mut self, d: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Reads the next line of the process's stdout, waiting up to `timeout`.
    pub fn stdout_line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("{} printed no line within {timeout:?}", self.name)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.wait_timeout(Duration::from_millis(500))?;
                bail!(
                    "{} closed its stdout without another line (exit: {})",
                    self.name,
                    status.map_or_else(|| "still running".to_string(), |s| s.to_string())
                )
            }
        }
    }

    /// Reads the `listening ADDR` line a cpha-lab server prints once bound.
    pub fn listening_addr(&mut self, timeout: Duration) -> Result<SocketAddr> {
        let line = self.stdout_line(timeout)?;
        let addr = line
            .strip_prefix("listening ")
            .ok_or_else(|| anyhow!("{} printed {line:?}, not \"listening ADDR\"", self.name))?;
        addr.parse().with_context(|| format!("{} printed {line:?}", self.name))
    }

    /// Waits up to `timeout` for the process to exit by itself, then returns its status and the
    /// stdout lines not read yet. The process is left running (and killed on drop) on timeout.
    pub fn finish(&mut self, timeout: Duration) -> Result<(ExitStatus, Vec<String>)> {
        let status =
            self.wait_timeout(timeout)?.ok_or_else(|| anyhow!("{} still running after {timeout:?}", self.name))?;
        let mut lines = Vec::new();
        // The reader thread sees EOF right after the exit, unless a grandchild kept the pipe.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            lines.push(line);
        }
        Ok((status, lines))
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.signal(libc::SIGKILL)?;
        self.wait_timeout(GRACE)?.ok_or_else(|| anyhow!("{} survived SIGKILL", self.name))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Err(err) = self.stop(GRACE) {
            eprintln!("cpha-lab: stopping {}: {err:#}", self.name);
        }
    }
}

/// Connects two namespaces with a veth pair, assigns the addresses (IPv6 ones with `nodad`, so
/// they are usable at once) and brings both ends up.
pub fn veth(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) -> Result<()> {
    veth_pair(a, a_addrs, b, b_addrs).map(|_| ())
}

/// [`veth`], returning the interface names in `a` and in `b`.
pub fn veth_pair(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) -> Result<(String, String)> {
    // Both ends are created directly inside their namespaces, so the names only need to be
    // unique there; pid and counter keep them unique anyway, within the 15-character limit.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let base = format!("v{:x}-{:x}", std::process::id(), n);
    let (ia, ib) = (format!("{base}a"), format!("{base}b"));
    if ia.len() > 15 {
        bail!("interface name {ia} is longer than 15 characters");
    }
    ip(&["link", "add", &ia, "netns", a.name(), "type", "veth", "peer", "name", &ib, "netns", b.name()])?;
    let mut ends = Vec::new();
    for (ns, dev, addrs) in [(a, &ia, a_addrs), (b, &ib, b_addrs)] {
        let mut v6 = false;
        for addr in addrs {
            let ip_part = addr.split('/').next().unwrap_or_default();
            let parsed: IpAddr =
                ip_part.parse().with_context(|| format!("{addr:?} is not an address with a prefix length"))?;
            let mut args = vec!["addr", "add", addr, "dev", dev];
            if parsed.is_ipv6() {
                args.push("nodad");
                v6 = true;
            }
            ns.ip(&args)?;
        }
        ns.ip(&["link", "set", dev, "up"])?;
        ends.push((ns, dev, v6));
    }
    // NOTE: in fresh namespaces both ends often get the same ifindex, which makes the kernel
    // treat their carrier change as non-urgent and apply it up to a second later. Until then
    // the link drops packets and, for IPv6, the receiving end has no ff00::/8 route yet, so the
    // first neighbour solicitation is lost and the first connection stalls for a second.
    // "Usable at once" means waiting here until the kernel has applied it.
    wait_for(&format!("veth {ia}/{ib} to come up"), Duration::from_secs(5), || {
        for (ns, dev, v6) in &ends {
            let link = ns.ip(&["-o", "link", "show", "dev", dev])?;
            if !link.contains(" state UP ") {
                return Ok(None);
            }
            if *v6 {
                let routes = ns.ip(&["-6", "route", "show", "table", "local", "dev", dev])?;
                if !routes.contains("ff00::/8") {
                    return Ok(None);
                }
            }
        }
        Ok(Some(()))
    })?;
    Ok((ia, ib))
}

/// `ip route add ARGS` in `ns`, e.g. `route(&ns, &["default", "via", "10.0.0.1"])`; IPv6 when
/// any argument is an IPv6 address or prefix.
pub fn route(ns: &Netns, args: &[&str]) -> Result<()> {
    let v6 = args.iter().any(|a| a.split('/').next().is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()));
    let mut all = vec![if v6 { "-6" } else { "-4" }, "route", "add"];
    all.extend_from_slice(args);
    ns.ip(&all)?;
    Ok(())
}

/// Path of a binary built into the same target directory as the running executable
/// (`target/<profile>/NAME`), or into `$CPHA_LAB_BIN_DIR` when that is set.
///
/// Tests of another package must have it built first (`cargo build -p cpha-lab`): a
/// dev-dependency brings the library, not the binary.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("CPHA_LAB_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if matches!(dir.file_name().and_then(OsStr::to_str), Some("deps" | "examples")) {
        dir.pop();
    }
    dir.join(name)
}

/// [`bin_path`], with an error that says how to build the binary when it is missing.
pub fn require_bin(name: &str) -> Result<PathBuf> {
    let path = bin_path(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build it first (cargo build -p {name}) or point CPHA_LAB_BIN_DIR \
             at the directory that holds it",
            path.display()
        );
    }
    Ok(path)
}

/// Calls `f` every 20 ms until it returns `Ok(Some(v))`; after `timeout` the last error (or
/// the last `None`) becomes an error naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => None,
            Err(err) => Some(err),
        };
        if Instant::now() >= deadline {
            let msg = format!("timed out after {timeout:?} waiting for {what}");
            return Err(match last {
                Some(err) => err.context(msg),
                None => anyhow!(msg),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// True when running as root with `ip netns` usable (checked once, by creating a namespace).
pub fn netns_usable() -> bool {
    netns_check().is_ok()
}

fn netns_check() -> &'static std::result::Result<(), String> {
    static CHECK: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    CHECK.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        Netns::new("cphalab-check").map(drop).map_err(|err| format!("{err:#}"))
    })
}

/// Panics with a clear message unless [`netns_usable`]; see [`require_root!`](crate::require_root).
pub fn require_root() {
    if let Err(why) = netns_check() {
        panic!(
            "this test needs root and working `ip netns` ({why}); run the tests as root, \
             e.g. `sudo -E cargo test`. It does not skip itself, on purpose."
        );
    }
}

/// Runs `ip ARGS` without a shell; returns stdout or an error naming the command.
fn ip(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    output_of(cmd, &format!("ip {}", args.join(" ")))
}

fn output_of(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what}: {}\nstdout: {}\nstderr: {}",
            out.status,
            stdout.trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_returns_the_first_value() {
        let mut calls = 0;
        let v = wait_for("three calls", Duration::from_secs(5), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn wait_for_names_what_timed_out_and_keeps_the_cause() {
        let err = wait_for::<()>("the moon", Duration::from_millis(60), || Err(anyhow!("not yet"))).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("the moon"), "{msg}");
        assert!(msg.contains("not yet"), "{msg}");
        let err = wait_for::<()>("nothing", Duration::from_millis(30), || Ok(None)).unwrap_err();
        assert!(format!("{err}").contains("nothing"));
    }

    #[test]
    fn bin_path_honours_the_override() {
        // The only test in this binary that touches the variable.
        std::env::set_var("CPHA_LAB_BIN_DIR", "/opt/lab-bins");
        let p = bin_path("cpha-lab");
        std::env::remove_var("CPHA_LAB_BIN_DIR");
        assert_eq!(p, PathBuf::from("/opt/lab-bins/cpha-lab"));
        // Unit tests run from target/<profile>/deps: the binary sits one level up.
        let p = bin_path("cpha-lab");
        let exe_dir = std::env::current_exe().unwrap();
        assert_eq!(p.parent(), exe_dir.parent().unwrap().parent());
    }

    #[test]
    fn rejects_bad_prefixes_before_touching_the_system() {
        for bad in ["", "a/b", "a b", "../x"] {
            let err = Netns::new(bad).unwrap_err().to_string();
            assert!(err.contains("use letters, digits"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn child_reports_lines_and_exit() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo listening 127.0.0.1:4242; echo second; exit 3"]);
        let mut child = Child::spawn(cmd, "sh").unwrap();
        assert_eq!(child.listening_addr(Duration::from_secs(5)).unwrap(), "127.0.0.1:4242".parse().unwrap());
        let (status, rest) = child.finish(Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(rest, vec!["second".to_string()]);
        let err = child.signal(libc::SIGTERM).unwrap_err().to_string();
        assert!(err.contains("already exited"), "signal after reaping: {err}");
    }

    #[test]
    fn child_drop_stops_the_process() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let child = Child::spawn(cmd, "sleep").unwrap();
        let pid = child.pid();
        let started = Instant::now();
        drop(child);
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn child_stop_escalates_to_sigkill() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; echo ready; exec sleep 30"]);
        let mut child = Child::spawn(cmd, "stubborn").unwrap();
        child.stdout_line(Duration::from_secs(5)).unwrap();
        let status = child.stop(Duration::from_millis(200)).unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
