//! The attacks of docs/security.md, each run as the unprivileged user `nobody` against a root
//! cpha: files planted or swapped around `cpha check-config` and the agent's atomic writer, and
//! a flood of idle, slow and oversized connections on the status port while the agent applies
//! a member change. Needs root, haproxy, python3 and setpriv.

#[path = "support/cluster.rs"]
mod cluster;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use cluster::Cluster;
use cpha_lab::netns::wait_for;

const NOBODY: u32 = 65534;

/// A directory of the test's own (root, 0755), removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("cpha-security-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A subdirectory owned by `nobody` with `mode`.
    fn dir_for_nobody(&self, name: &str, mode: u32) -> PathBuf {
        let d = self.join(name);
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(NOBODY), Some(NOBODY)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
        d
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A root-only file (0600) an attacker would like to overwrite.
fn victim(dir: &Scratch) -> PathBuf {
    let v = dir.join("victim");
    std::fs::write(&v, "root only\n").unwrap();
    std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o600)).unwrap();
    v
}

fn assert_untouched(victim: &Path) {
    assert_eq!(std::fs::read_to_string(victim).unwrap(), "root only\n", "the victim was overwritten");
    let meta = std::fs::metadata(victim).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "the victim's mode changed");
    assert_eq!(meta.uid(), 0);
}

/// `python3 -c SCRIPT ARGS` as nobody, optionally in a network namespace.
fn as_nobody(netns: Option<&str>, script: &str, args: &[&str]) -> Command {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "setpriv"]);
            c
        }
        None => Command::new("setpriv"),
    };
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--", "/usr/bin/python3", "-c", script])
        .args(args);
    cmd
}

fn run_as_nobody(script: &str, args: &[&str]) -> String {
    let out = as_nobody(None, script, args).output().expect("setpriv python3");
    assert!(out.status.success(), "attacker script failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cpha(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cpha"));
    cmd.args(args).env_remove("CPHA_HAPROXY_BIND").env_remove("CPHA_LISTEN").env_remove("CPHA_TOPOLOGY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running cpha")
}

/// A configuration `check-config` accepts on any host (no vip:, loopback endpoint).
fn check_config_file(dir: &Scratch) -> String {
    let cfg = dir.join("cpha.yaml");
    std::fs::write(
        &cfg,
        "endpoint:\n  listen: 127.0.0.1:18443\nmembers:\n  source: static\n  static: [127.0.0.11:6443]\n\
         haproxy:\n  stats:\n    listen: null\n",
    )
    .unwrap();
    cfg.display().to_string()
}

/// Plants, for every pid in a range around the next ones, the directory and symlink the old
/// `check-config` would have used (`$TMPDIR/cpha-check-PID/haproxy.cfg`).
const PLANT_CHECK_DIRS: &str = r#"
import os, sys
tmp, victim, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for pid in range(first, first + count):
    d = os.path.join(tmp, "cpha-check-%d" % pid)
    os.mkdir(d, 0o777)
    os.chmod(d, 0o777)
    os.symlink(victim, os.path.join(d, "haproxy.cfg"))
    os.symlink(victim, os.path.join(d, "keepalived.conf"))
print(count)
"#;

fn next_pid() -> u32 {
    std::fs::read_to_string("/proc/loadavg").unwrap().split_whitespace().nth(4).unwrap().parse().unwrap()
}

#[test]
fn check_config_ignores_directories_planted_for_it() -> Result<()> {
    cpha_lab::require_root!();
    let dir = Scratch::new("plant");
    let victim = victim(&dir);
    // A /tmp of the test's own: root-owned, world-writable, sticky.
    let tmp = dir.join("tmp");
    std::fs::create_dir(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    let planted = run_as_nobody(
        PLANT_CHECK_DIRS,
        &[tmp.to_str().unwrap(), victim.to_str().unwrap(), &next_pid().to_string(), "400"],
    );
    assert_eq!(planted.trim(), "400");
    let cfg = check_config_file(&dir);
    for _ in 0..3 {
        let out = cpha(&["check-config", "--config", &cfg], &[("TMPDIR", tmp.to_str().unwrap())]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_untouched(&victim);
    // Nothing of check-config's is left, and nobody's directories are as they were.
    let left: Vec<String> =
        std::fs::read_dir(&tmp)?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left.len(), 400, "check-config left something behind: {left:?}");
    Ok(())
}

#[test]
fn check_config_refuses_a_temporary_directory_another_user_owns() -> Result<()> {
    cpha_lab::require_root!();
    let dir = Scratch::new("owned");
    let victim = victim(&dir);
    let tmp = dir.dir_for_nobody("tmp", 0o755);
    run_as_nobody(PLANT_CHECK_DIRS, &[tmp.to_str().unwrap(), victim.to_str().unwrap(), &next_pid().to_string(), "200"]);
    let cfg = check_config_file(&dir);
    let out = cpha(&["check-config", "--config", &cfg], &[("TMPDIR", tmp.to_str().unwrap())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted a temporary directory nobody owns");
    assert!(
        err.contains(&format!("{} is owned by another user (owner uid 65534", tmp.display())),
        "the error names the directory and its owner: {err}"
    );
    assert_untouched(&victim);
    Ok(())
}

/// Watches `$TMPDIR` for check-config's directories and tries to put a `lua-load` file into
/// each (the candidate swap that ran Lua as root); prints what it saw and what it managed.
const SWAP_CANDIDATES: &str = r#"
import os, sys, time, json
tmp, evil, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
seen, entered, written = set(), 0, 0
end = time.time() + seconds
while time.time() < end:
    for name in os.listdir(tmp):
        if not name.startswith("cpha-check-"):
            continue
        d = os.path.join(tmp, name)
        seen.add(name)
        try:
            os.listdir(d)
            entered += 1
        except OSError:
            pass
        for f in ("haproxy.cfg", "keepalived.conf"):
            p = os.path.join(d, f)
            try:
                tmpname = p + ".swap"
                with open(tmpname, "w") as out:
                    out.write(evil)
                os.rename(tmpname, p)
                written += 1
            except OSError:
                pass
print(json.dumps({"seen": len(seen), "entered": entered, "written": written}))
"#;

#[test]
fn check_config_checks_a_file_no_one_else_can_swap_or_read() -> Result<()> {
    cpha_lab::require_root!();
    let dir = Scratch::new("swap");
    let tmp = dir.join("tmp");
    std::fs::create_dir(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    let marker = dir.join("lua-ran-as-root");
    let lua = dir.join("evil.lua");
    std::fs::write(
        &lua,
        format!("local f = io.open(\"{}\", \"w\")\nf:write(\"pwned\")\nf:close()\n", marker.display()),
    )?;
    std::fs::set_permissions(&lua, std::fs::Permissions::from_mode(0o644))?;
    let evil = format!("global\n    lua-load {}\ndefaults\n    mode tcp\n    timeout connect 1s\n", lua.display());
    // The payload works: `haproxy -c` of it as root runs the Lua (so the check below can fail).
    let control = dir.join("control.cfg");
    std::fs::write(&control, &evil)?;
    let out = Command::new("haproxy").args(["-c", "-f"]).arg(&control).output()?;
    ensure!(marker.exists(), "haproxy -c did not run lua-load: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&marker)?;

    let cfg = check_config_file(&dir);
    let attacker = as_nobody(None, SWAP_CANDIDATES, &[tmp.to_str().unwrap(), &evil, "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    let mut runs = 0;
    while start.elapsed() < Duration::from_secs(15) && runs < 40 {
        let out = cpha(&["check-config", "--config", &cfg], &[("TMPDIR", tmp.to_str().unwrap())]);
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        ensure!(String::from_utf8_lossy(&out.stdout).contains("valid"));
        runs += 1;
    }
    let out = attacker.wait_with_output()?;
    ensure!(out.status.success(), "attacker: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    eprintln!("{runs} check-config runs; attacker: {report}");
    ensure!(report["seen"].as_u64() > Some(0), "the attacker never saw a check directory: {report}");
    ensure!(report["entered"] == 0 && report["written"] == 0, "the attacker reached a candidate: {report}");
    ensure!(!marker.exists(), "the attacker's Lua ran as root");
    Ok(())
}

/// The agent with haproxy.cfg in `config_dir` (one member; HAProxy not started).
fn agent_writing_into(c: &mut Cluster, config_dir: &Path, extra: &str) -> Result<PathBuf> {
    let cfg = c.write_config("retarget", "nftables", &c.members[0].addr.clone())?;
    let d = c.dir.display().to_string();
    let text = std::fs::read_to_string(&cfg)?
        .replace(&format!("configPath: {d}/haproxy.cfg"), &format!("configPath: {}/haproxy.cfg", config_dir.display()))
        .replace("agent:\n", &format!("agent:\n{extra}"));
    std::fs::write(&cfg, text)?;
    Ok(cfg)
}

/// Plants `NAME -> victim` and the old writer's temporary names for a range of pids.
const PLANT_WRITER: &str = r#"
import os, sys
d, victim, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.symlink(victim, os.path.join(d, "haproxy.cfg"))
for pid in range(first, first + count):
    os.symlink(victim, os.path.join(d, ".haproxy.cfg.cpha-%d.tmp" % pid))
print("ok")
"#;

#[test]
fn the_agent_refuses_to_write_where_another_user_can() -> Result<()> {
    let mut c = Cluster::new(1)?;
    let dir = Scratch::new("writer-owned");
    let victim = victim(&dir);
    let shared = dir.dir_for_nobody("haproxy", 0o755);
    run_as_nobody(PLANT_WRITER, &[shared.to_str().unwrap(), victim.to_str().unwrap(), &next_pid().to_string(), "300"]);
    let cfg = agent_writing_into(&mut c, &shared, "")?;
    c.start_agent(&cfg)?;
    wait_for("the refusal in the agent's log", Duration::from_secs(20), || {
        Ok(c.agent_log().contains(&format!("{} is owned by another user", shared.display())).then_some(()))
    })
    .with_context(|| c.agent_log())?;
    assert_untouched(&victim);
    ensure!(
        std::fs::symlink_metadata(shared.join("haproxy.cfg"))?.file_type().is_symlink(),
        "the planted file was replaced"
    );
    // The endpoint is still carried, by the forward.
    ensure!(c.phase()? == "forwarding", "{}", c.phase()?);
    Ok(())
}

#[test]
fn in_a_directory_shared_on_purpose_planted_links_are_replaced_not_followed() -> Result<()> {
    let mut c = Cluster::new(1)?;
    let dir = Scratch::new("writer-shared");
    let victim = victim(&dir);
    // As the kubelet makes an emptyDir: root-owned, 0777.
    let shared = dir.join("emptydir");
    std::fs::create_dir(&shared)?;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777))?;
    run_as_nobody(PLANT_WRITER, &[shared.to_str().unwrap(), victim.to_str().unwrap(), &next_pid().to_string(), "300"]);
    let cfg = agent_writing_into(&mut c, &shared, &format!("  trustSharedDirectories: [{}]\n", shared.display()))?;
    c.start_agent(&cfg)?;
    let live = shared.join("haproxy.cfg");
    wait_for("haproxy.cfg written", Duration::from_secs(20), || {
        Ok(std::fs::symlink_metadata(&live).ok().filter(|m| m.file_type().is_file()).map(|_| ()))
    })
    .with_context(|| c.agent_log())?;
    assert_untouched(&victim);
    let meta = std::fs::metadata(&live)?;
    ensure!(meta.permissions().mode() & 0o777 == 0o600, "haproxy.cfg is {:o}", meta.permissions().mode());
    ensure!(std::fs::read_to_string(&live)?.contains("backend kube-apiservers"));
    Ok(())
}

/// Holds 300 idle connections, 20 with half-sent headers and 100 sending 400 KB of headers to
/// the status port; prints "ready" when all are open, then, when stdin closes, how many of the
/// slow ones the server has closed.
const FLOOD: &str = r#"
import json, socket, sys, time
port = int(sys.argv[1])
def connect():
    s = socket.socket()
    s.settimeout(2)
    s.connect(("127.0.0.1", port))
    return s
conns, slow, failed = [], [], 0
for i in range(300):
    try:
        conns.append(connect())
    except OSError:
        failed += 1
for i in range(20):
    try:
        s = connect()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(s)
    except OSError:
        failed += 1
big_refused = 0
filler = b"X-Fill: " + b"a" * 1000 + b"\r\n"
for i in range(100):
    try:
        s = connect()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for j in range(400):
            s.sendall(filler)
        conns.append(s)
    except OSError:
        big_refused += 1
print("ready", flush=True)
sys.stdin.read()
closed = 0
for s in slow:
    s.settimeout(0.05)
    try:
        if s.recv(1) == b"":
            closed += 1
    except socket.timeout:
        pass
    except OSError:
        closed += 1
print(json.dumps({"failed": failed, "big_refused": big_refused, "slow_closed": closed}), flush=True)
"#;

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    line.split_whitespace().nth(1).context("VmRSS value")?.parse().context("VmRSS is a number")
}

fn healthz(c: &Cluster) -> Result<String> {
    let out = c.cp.command("curl").args(["-sS", "--max-time", "3", "http://127.0.0.1:9966/healthz"]).output()?;
    ensure!(out.status.success(), "/healthz: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_flooded_status_port_starves_neither_healthz_nor_the_apply() -> Result<()> {
    let mut c = Cluster::new(2)?;
    let cfg = c.write_config("retarget", "nftables", &c.members[0].addr.clone())?;
    c.set_members(&c.member_list(&[1]))?;
    // The agent's descriptors as in the reproduction (soft and hard 256: it cannot raise them).
    c.start_agent_wrapped(&cfg, &[], &["prlimit", "--nofile=256:256", "--"])?;
    c.start_haproxy()?;
    c.wait_phase(&["balanced"], Duration::from_secs(60))?;
    let pid = c.agent.as_ref().context("agent")?.pid();
    let before = rss_kib(pid)?;
    let workers = c.workers()?;

    let mut flood = as_nobody(Some(c.cp.name()), FLOOD, &["9966"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(flood.stdout.take().context("stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    ensure!(line.trim() == "ready", "flood: {line}");

    // While the port is flooded: /healthz answers, and a member change is applied.
    ensure!(healthz(&c)?.starts_with("ok"), "/healthz");
    c.set_members(&c.member_list(&[1, 2]))?;
    wait_for("both members serving", Duration::from_secs(20), || {
        Ok((c.serving().unwrap_or_default().len() == 2).then_some(()))
    })
    .with_context(|| c.agent_log())?;
    ensure!(c.workers()? == workers, "the member change reloaded HAProxy");
    for _ in 0..5 {
        ensure!(healthz(&c)?.starts_with("ok"), "/healthz");
    }
    let log = c.agent_log();
    ensure!(!log.contains("Too many open files"), "{log}");
    let after = rss_kib(pid)?;
    eprintln!("agent RSS {before} KiB before the flood, {after} KiB during it");
    ensure!(after < before + 20 * 1024, "RSS grew from {before} to {after} KiB");

    // The half-sent headers were cut at the header timeout (5 s), not held.
    std::thread::sleep(Duration::from_secs(6));
    drop(flood.stdin.take());
    let mut report = String::new();
    std::io::Read::read_to_string(&mut out, &mut report)?;
    flood.wait()?;
    let report: serde_json::Value = serde_json::from_str(report.trim()).with_context(|| report.clone())?;
    eprintln!("flood: {report}");
    ensure!(report["slow_closed"] == 20, "slow connections still held: {report}");
    Ok(())
}
