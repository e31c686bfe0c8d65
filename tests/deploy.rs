//! The deployment files checked by the programs that consume them: `systemd-analyze verify` and
//! `security` for the units, HAProxy itself for the drop-in's master socket, `cloud-init schema`
//! for the user-data (and the Cluster API template's embedded cloud-config), the
//! kubernetes-validate schemas for the manifests, `vagrant validate` for the test environment,
//! shellcheck and real runs for the provisioning script, and `cpha check-config` for every
//! configuration. Each validator is also shown a deliberately broken copy once, so a check that
//! stopped checking fails here instead of passing silently.
//!
//! The validators come from Debian packages and one PyPI package that `hack/test` installs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize as _;
use serde_yaml::Value;

#[path = "support/program.rs"]
mod program;
use program::{read, root, run, tool, Ran};

/// `systemd-analyze security` exposure of cpha.service, in tenths (1.8 "OK"): what the unit
/// achieves. Loosening the sandbox fails this test; tightening it should lower the number.
const MAX_EXPOSURE_TENTHS: u32 = 18;

/// kubernetes-validate as `hack/test` installs it, unless `CPHA_KUBERNETES_VALIDATE` names one.
const KUBERNETES_VALIDATE: &str = "/opt/cpha-test-tools/kubernetes-validate-1.37.0/bin/kubernetes-validate";

/// The oldest Kubernetes the manifests promise to work with (super-admin.conf appeared in 1.29)
/// and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

// ---------------------------------------------------------------------------------------------
// Plumbing

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cpha-deploy-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.0.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kubernetes_validate() -> PathBuf {
    let path =
        std::env::var_os("CPHA_KUBERNETES_VALIDATE").map(PathBuf::from).unwrap_or_else(|| KUBERNETES_VALIDATE.into());
    assert!(
        path.is_file(),
        "{} is missing: run hack/test, which installs kubernetes-validate (tests/deploy/requirements.txt)",
        path.display()
    );
    path
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("invalid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn doc(text: &str) -> Value {
    let mut all = docs(text);
    assert_eq!(all.len(), 1, "expected one YAML document");
    all.remove(0)
}

/// `a.b.0.c` inside a YAML value; panics naming the path when something is missing.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for part in path.split('.') {
        cur = match part.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(part),
        }
        .unwrap_or_else(|| panic!("no {path} (stopped at {part}) in {v:?}"));
    }
    cur
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path).as_str().unwrap_or_else(|| panic!("{path} is not a string"))
}

fn strings(v: &Value, path: &str) -> Vec<String> {
    at(v, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{path} is not a list"))
        .iter()
        .map(|x| x.as_str().unwrap_or_else(|| panic!("{path} has a non-string")).to_string())
        .collect()
}

fn kind<'a>(all: &'a [Value], kind: &str) -> Vec<&'a Value> {
    all.iter().filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind)).collect()
}

fn one<'a>(all: &'a [Value], k: &str) -> &'a Value {
    let found = kind(all, k);
    assert_eq!(found.len(), 1, "expected one {k}");
    found[0]
}

fn position(list: &[String], needle: &str) -> usize {
    list.iter().position(|c| c.trim() == needle).unwrap_or_else(|| panic!("no command {needle:?} in {list:#?}"))
}

/// The embedded copies each deployment file must carry: installed path -> repository file.
fn embedded(file: &str) -> BTreeMap<&'static str, &'static str> {
    let mut m = BTreeMap::from([
        ("/etc/systemd/system/cpha.service", "systemd/cpha.service"),
        ("/etc/systemd/system/haproxy.service.d/cpha.conf", "systemd/haproxy.service.d/cpha.conf"),
        ("/etc/systemd/system/keepalived.service.d/cpha.conf", "systemd/keepalived.service.d/cpha.conf"),
        ("/usr/local/sbin/cpha-bootstrap", "cloud-init/cpha-bootstrap"),
    ]);
    match file {
        "cloud-init/init.yaml" => {
            m.insert("/etc/cpha/config.yaml", "examples/config-host.yaml");
        }
        "cloud-init/join.yaml" => {
            m.insert("/etc/cpha/config.yaml", "examples/config-host.yaml");
        }
        "cloud-init/lb.yaml" => {
            m.insert("/etc/cpha/config.yaml", "examples/config-external-lb.yaml");
        }
        _ => {}
    }
    m
}

/// The text a `write_files`/`files` item installs, decoded.
fn file_content(item: &Value) -> String {
    let content = s(item, "content");
    match item.get("encoding").and_then(Value::as_str) {
        None | Some("text/plain") => content.to_string(),
        Some("base64") | Some("b64") => {
            let clean: String = content.split_whitespace().collect();
            String::from_utf8(base64_decode(&clean)).expect("base64 content is UTF-8")
        }
        Some(other) => panic!("unexpected encoding {other}"),
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {:?}", c as char),
        }
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// The file items of a cloud-config or KubeadmConfigSpec, by installed path.
fn files_by_path(list: &Value) -> BTreeMap<String, &Value> {
    list.as_sequence().expect("a list of files").iter().map(|item| (s(item, "path").to_string(), item)).collect()
}

fn check_embedded_copies(file: &str, files: &BTreeMap<String, &Value>) {
    for (path, source) in embedded(file) {
        let item = files.get(path).unwrap_or_else(|| panic!("{file}: no file {path}"));
        assert!(
            file_content(item) == read(source),
            "{file}: the copy of {source} at {path} differs from the repository's file: run tests/deploy/sync-embedded"
        );
    }
    let bootstrap = files.get("/usr/local/sbin/cpha-bootstrap").unwrap();
    assert_eq!(s(bootstrap, "permissions"), "0755", "{file}: cpha-bootstrap must be executable");
}

/// `KEY=value` lines of an environment file.
fn env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The boot tests' Debian 12 root filesystem (tests/boot/rootfs builds it once and caches it).
fn boot_rootfs() -> PathBuf {
    static ROOTFS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let ran = run(&mut Command::new(root().join("tests/boot/rootfs")));
            assert!(ran.ok(), "tests/boot/rootfs:\n{}", ran.both());
            PathBuf::from(ran.stdout.lines().last().unwrap_or_default().trim())
        })
        .clone()
}

/// cloud-init's schema validator, run inside the boot image (chroot into a read-only bind mount
/// of it, the file's directory bind-mounted at /mnt, in a private mount namespace: the cached
/// image stays untouched, as the boot tests' overlays need). cloud-init is never installed on
/// the machine the tests run on: there it would configure that machine at its next boot.
fn cloud_init_schema(file: &Path) -> Ran {
    let script = r#"mount --bind "$2" "$2" && mount -o remount,bind,ro "$2" && mount --bind "$1" "$2/mnt" && exec chroot "$2" cloud-init schema --config-file "/mnt/$3""#;
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"])
        .arg(file.parent().unwrap())
        .arg(boot_rootfs())
        .arg(file.file_name().unwrap()))
}

fn assert_cloud_config_valid(file: &Path) {
    let ran = cloud_init_schema(file);
    assert!(
        ran.ok() && ran.stdout.contains("Valid cloud-config"),
        "cloud-init schema {}:\n{}",
        file.display(),
        ran.both()
    );
}

/// `cpha check-config` as on a host of the configuration's shape. With a `vip:` section it
/// places the virtual IP among the host's addresses (and keepalived checks the interface), so
/// it runs in a network namespace of the test where the host has its address on the VIP's
/// /24 (the files' subnets), never on this machine's own interfaces: `host`, or else the first
/// seed member's address (a control-plane host of that cluster).
fn check_config(file: &Path) -> Ran {
    check_config_on(file, None)
}

fn check_config_on(file: &Path, host: Option<&str>) -> Ran {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let config: Value = serde_yaml::from_str(&text).unwrap_or(Value::Null);
    let host = config.get("vip").filter(|v| !v.is_null()).map(|_| {
        host.map(str::to_string).unwrap_or_else(|| {
            let seed = s(&config, "members.static.0");
            let addr = seed.rsplit_once('=').map_or(seed, |(_, a)| a);
            addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string()
        })
    });
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cpha"));
    let Some(host) = host else {
        return run(cmd.arg("check-config").arg("--config").arg(file));
    };
    cpha_lab::require_root!();
    let ns = cpha_lab::netns::Netns::new("cphadeploy-host").unwrap();
    let segment = cpha_lab::netns::Netns::new("cphadeploy-seg").unwrap();
    cpha_lab::netns::veth_pair(&ns, &[&format!("{host}/24")], &segment, &[]).unwrap();
    cmd = ns.command(env!("CARGO_BIN_EXE_cpha"));
    run(cmd.arg("check-config").arg("--config").arg(file))
}

fn assert_config_valid(file: &Path) {
    assert_config_valid_on(file, None)
}

fn assert_config_valid_on(file: &Path, host: Option<&str>) {
    let ran = check_config_on(file, host);
    assert!(
        !(ran.code == 64 || ran.code == 2) || !ran.stderr.contains("check-config"),
        "`cpha check-config` is missing from the cpha binary: it validates every example configuration here\n{}",
        ran.both()
    );
    assert!(ran.ok(), "cpha check-config --config {}:\n{}", file.display(), ran.both());
    let has_vip = std::fs::read_to_string(file).unwrap().lines().any(|l| l == "vip:" || l.trim_start() == "vip:");
    assert!(
        !has_vip || ran.stdout.contains("keepalived --config-test accepts the rendered file"),
        "cpha check-config --config {} did not check the virtual IP:\n{}",
        file.display(),
        ran.both()
    );
}

/// A copy of a unit whose ExecStart runs the binary under test, so `verify` can check it.
fn unit_copy(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    dir.write(name, &text.replace("/usr/local/bin/cpha ", &format!("{} ", env!("CARGO_BIN_EXE_cpha"))))
}

/// Problems `systemd-analyze verify` reports about our files. It exits 0 on unknown keys and
/// unparsable values (it only warns), so any line about our files is a failure.
/// A check that must fail, and for the reason given (`reason` in its message).
fn refused<T: std::fmt::Debug>(result: Result<T, String>, reason: &str, what: &str) {
    match result {
        Ok(ok) => panic!("{what}: {ok:?}"),
        Err(err) => assert!(err.contains(reason), "{what}: the check failed, but not with {reason:?}:\n{err}"),
    }
}

fn verify(unit: &Path, ours: &[&str]) -> Result<(), String> {
    let ran = run(Command::new(tool("systemd-analyze")).arg("verify").arg(unit));
    let ours: Vec<&str> =
        ran.stderr.lines().chain(ran.stdout.lines()).filter(|l| ours.iter().any(|o| l.contains(o))).collect();
    if ran.ok() && ours.is_empty() {
        Ok(())
    } else {
        Err(ran.both())
    }
}

fn exposure(unit: &Path) -> (f64, Ran) {
    let ran = run(Command::new(tool("systemd-analyze"))
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--threshold={MAX_EXPOSURE_TENTHS}"))
        .arg(unit));
    let line = ran
        .stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{}", ran.both()));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure level from {line:?}"));
    (score, ran)
}

// ---------------------------------------------------------------------------------------------
// systemd

#[test]
fn cpha_unit_passes_systemd_verify() {
    let unit = read("systemd/cpha.service");
    // What the other pieces rely on.
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/cpha run --config /etc/cpha/config.yaml",
        "Before=kubelet.service",
        "After=network-online.target",
        "Restart=always",
        "RestartPreventExitStatus=64 78",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "ProtectSystem=strict",
        "StateDirectory=cpha",
    ] {
        assert!(unit.lines().any(|l| l == line), "systemd/cpha.service has no line {line:?}");
    }
    assert!(unit.lines().any(|l| l.starts_with("WatchdogSec=")), "WatchdogSec= is set");
    let rw = unit.lines().find(|l| l.starts_with("ReadWritePaths=")).expect("ReadWritePaths=");
    assert!(rw.contains("/etc/haproxy") && rw.contains("/run/haproxy"), "{rw}");
    // The VIP actuator: keepalived.conf in /etc/keepalived, the health file and the FIFO in
    // /run/cpha (the defaults of vip.keepalived), kept while cpha restarts (keepalived reads them).
    assert!(rw.split_whitespace().any(|p| p.trim_start_matches('-') == "/etc/keepalived"), "{rw}");
    for line in ["RuntimeDirectory=cpha", "RuntimeDirectoryPreserve=yes"] {
        assert!(unit.lines().any(|l| l == line), "systemd/cpha.service has no line {line:?}");
    }

    let dir = TempDir::new("verify");
    let copy = unit_copy(&dir, "cpha.service", &unit);
    verify(&copy, &["cpha.service"]).unwrap_or_else(|e| panic!("systemd-analyze verify cpha.service:\n{e}"));

    // The check itself must be able to fail: a misspelt directive (only a warning for systemd),
    // and an ExecStart that does not exist (an error).
    let broken = dir
        .write("broken/cpha.service", &std::fs::read_to_string(&copy).unwrap().replace("PrivateTmp=", "PrivateTemp="));
    refused(verify(&broken, &["cpha.service"]), "PrivateTemp", "a misspelt directive went unnoticed");
    let missing = dir.write("missing/cpha.service", &unit.replace("/usr/local/bin/cpha ", "/nonexistent/cpha "));
    refused(verify(&missing, &["cpha.service"]), "/nonexistent/cpha", "a missing ExecStart binary went unnoticed");
}

#[test]
fn cpha_unit_exposure_stays_low() {
    let dir = TempDir::new("security");
    let copy = unit_copy(&dir, "cpha.service", &read("systemd/cpha.service"));
    let (score, ran) = exposure(&copy);
    println!("systemd-analyze security: cpha.service exposure {score}");
    assert!(
        ran.ok() && score <= f64::from(MAX_EXPOSURE_TENTHS) / 10.0,
        "cpha.service exposure {score} is above {}:\n{}",
        f64::from(MAX_EXPOSURE_TENTHS) / 10.0,
        ran.both()
    );

    // Without its sandbox the same unit must fail the threshold.
    let loose: String = std::fs::read_to_string(&copy)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("Protect") && !l.starts_with("SystemCall") && !l.starts_with("Private"))
        .map(|l| format!("{l}\n"))
        .collect();
    let loose = dir.write("loose/cpha.service", &loose);
    let (loose_score, ran) = exposure(&loose);
    assert!(!ran.ok() && loose_score > score, "an unsandboxed unit passed the threshold ({loose_score})");
}

/// Debian's haproxy.service with our drop-in beside it, as systemd-analyze loads drop-ins from
/// the unit's directory.
fn haproxy_unit_with_dropin(dir: &TempDir, dropin: &str) -> PathBuf {
    let packaged = ["/lib/systemd/system/haproxy.service", "/usr/lib/systemd/system/haproxy.service"]
        .iter()
        .find(|p| Path::new(p).exists())
        .expect("Debian's haproxy.service: run hack/test, which installs haproxy");
    let unit = dir.write("haproxy.service", &std::fs::read_to_string(packaged).unwrap());
    dir.write("haproxy.service.d/cpha.conf", dropin);
    unit
}

#[test]
fn haproxy_dropin_passes_systemd_verify() {
    let dropin = read("systemd/haproxy.service.d/cpha.conf");
    let dir = TempDir::new("dropin");
    let unit = haproxy_unit_with_dropin(&dir, &dropin);
    verify(&unit, &["haproxy.service", "cpha.conf"])
        .unwrap_or_else(|e| panic!("systemd-analyze verify haproxy.service + cpha.conf:\n{e}"));
    for line in ["After=cpha.service", "Restart=always"] {
        assert!(dropin.lines().any(|l| l == line), "the drop-in has no line {line:?}");
    }

    // A second ExecStart without the reset line is an error systemd reports.
    let broken = TempDir::new("dropin-broken");
    let unit = haproxy_unit_with_dropin(&broken, &dropin.replace("ExecStart=\n", ""));
    refused(
        verify(&unit, &["haproxy.service", "cpha.conf"]),
        "more than one ExecStart",
        "two ExecStart lines went unnoticed",
    );
}

/// Debian's keepalived.service with our drop-in beside it.
fn keepalived_unit_with_dropin(dir: &TempDir, dropin: &str) -> PathBuf {
    let packaged = ["/lib/systemd/system/keepalived.service", "/usr/lib/systemd/system/keepalived.service"]
        .iter()
        .find(|p| Path::new(p).exists())
        .expect("Debian's keepalived.service: run hack/test, which installs keepalived");
    let unit = dir.write("keepalived.service", &std::fs::read_to_string(packaged).unwrap());
    dir.write("keepalived.service.d/cpha.conf", dropin);
    unit
}

/// What the drop-in asks of systemd, read back: `systemd-analyze verify` accepts it and it asks
/// for a restart on failure, soon. That systemd does restart a SIGKILLed keepalived is shown in
/// a booted machine (tests/boot.rs, scenario 6).
#[test]
fn keepalived_dropin_passes_systemd_verify_and_asks_for_a_killed_keepalived_to_be_restarted() {
    let dropin = read("systemd/keepalived.service.d/cpha.conf");
    let dir = TempDir::new("keepalived-dropin");
    let unit = keepalived_unit_with_dropin(&dir, &dropin);
    verify(&unit, &["keepalived.service", "cpha.conf"])
        .unwrap_or_else(|e| panic!("systemd-analyze verify keepalived.service + cpha.conf:\n{e}"));
    // Started after cpha (which writes keepalived.conf, the health file and the FIFO before
    // READY), and back soon after a SIGKILL: on-failure covers death by signal.
    for line in ["After=cpha.service", "Restart=on-failure", "StartLimitIntervalSec=0"] {
        assert!(dropin.lines().any(|l| l == line), "the keepalived drop-in has no line {line:?}");
    }
    let restart_sec = dropin.lines().find_map(|l| l.strip_prefix("RestartSec=")).expect("RestartSec=");
    assert!(systemd_span(restart_sec) <= Duration::from_secs(2), "RestartSec={restart_sec} is not short");
    // Not Wants=: the package starts keepalived when cloud-init installs it, after write_files
    // and before provisioning has installed and configured cpha; a Wants= would start cpha then.
    assert!(!dropin.lines().any(|l| l.starts_with("Wants=") || l.starts_with("Requires=")), "{dropin}");
    // The package's unit still refuses to start without a configuration (cpha writes it).
    let packaged = std::fs::read_to_string(&unit).unwrap();
    assert!(packaged.contains("ConditionFileNotEmpty=/etc/keepalived/keepalived.conf"), "{packaged}");
    // keepalived's default pid file is where cpha's default vip.keepalived.pidFile points.
    assert!(
        !packaged.contains("--pid") && !packaged.contains("PIDFile="),
        "the package moved the pid file: {packaged}"
    );

    // The check can fail: a misspelt directive in the drop-in.
    let broken = TempDir::new("keepalived-dropin-broken");
    let unit = keepalived_unit_with_dropin(&broken, &dropin.replace("RestartSec=", "RestartSecs="));
    refused(verify(&unit, &["keepalived.service", "cpha.conf"]), "RestartSecs", "a misspelt directive went unnoticed");
}

/// The drop-in's ExecStart, run for real (master-worker with the master socket) in a temp dir:
/// the master socket is where cpha's configuration looks, is private, and answers `show proc`.
#[test]
fn haproxy_dropin_serves_the_master_socket_cpha_uses() {
    let dropin = read("systemd/haproxy.service.d/cpha.conf");
    let exec = dropin
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .find(|l| !l.is_empty())
        .expect("an ExecStart= with a command");
    let socket = "/run/haproxy/master.sock";
    for config in ["examples/config-host.yaml", "examples/config-external-lb.yaml"] {
        assert_eq!(s(&doc(&read(config)), "haproxy.masterSocket"), socket, "{config} and the drop-in disagree");
    }

    let dir = TempDir::new("master");
    let d = dir.path().display();
    let cfg = dir.write(
        "haproxy.cfg",
        &format!(
            "global\n    stats socket {d}/admin.sock mode 600 level admin\ndefaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n    timeout server 1s\nfrontend fe\n    bind unix@{d}/fe.sock\n"
        ),
    );
    let command = exec
        .replace("$CONFIG", &cfg.display().to_string())
        .replace("$PIDFILE", &format!("{d}/haproxy.pid"))
        .replace("$EXTRAOPTS", "")
        .replace(socket, &format!("{d}/master.sock"));
    let mut words = command.split_whitespace();
    let program = words.next().unwrap();
    assert!(Path::new(program).exists(), "the drop-in runs {program}, which does not exist");
    // SIGTERM to the master stops its workers too; SIGKILL only if it does not exit.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut haproxy = Stop(
        Command::new(program)
            .args(words)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let master = dir.path().join("master.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !master.exists() {
        if let Ok(Some(status)) = haproxy.0.try_wait() {
            let mut err = String::new();
            haproxy.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("haproxy exited ({status}) before creating its master socket:\n{err}");
        }
        assert!(Instant::now() < deadline, "no master socket after 10s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = std::fs::metadata(&master).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the master socket must be private to root");
    // The socket file appears when HAProxy binds it, a moment before it listens.
    let show_proc = || -> std::io::Result<String> {
        let mut conn = std::os::unix::net::UnixStream::connect(&master)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"show proc\n")?;
        // The master CLI answers and closes once the command stream ends.
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        Ok(answer)
    };
    let answer = loop {
        match show_proc() {
            Ok(answer) if answer.contains("worker") => break answer,
            Ok(_) | Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("the master socket did not answer show proc: {other:?}"),
        }
    };
    assert!(answer.contains("master") && answer.contains("worker"), "show proc answered:\n{answer}");
}

// ---------------------------------------------------------------------------------------------
// cloud-init

#[test]
fn cloud_init_user_data_passes_the_schema_and_orders_cpha_before_kubeadm() {
    for (file, kubeadm) in [
        ("cloud-init/init.yaml", Some("cpha-bootstrap kubeadm-init")),
        ("cloud-init/join.yaml", Some("cpha-bootstrap kubeadm-join")),
        ("cloud-init/lb.yaml", None),
    ] {
        let text = read(file);
        assert!(text.starts_with("#cloud-config\n"), "{file} must start with #cloud-config");
        assert_cloud_config_valid(&root().join(file));

        let data = doc(&text);
        let packages = strings(&data, "packages");
        for p in ["haproxy", "nftables", "keepalived"] {
            assert!(packages.iter().any(|x| x == p), "{file} does not install {p}");
        }
        let files = files_by_path(at(&data, "write_files"));
        check_embedded_copies(file, &files);
        let install = env_file(&file_content(files["/etc/cpha/install.env"]));
        assert!(install.contains_key("CPHA_URL") && install.contains_key("CPHA_SHA256"), "{file}: install.env");

        let runcmd = strings(&data, "runcmd");
        assert_eq!(runcmd[0], "set -e", "{file}: runcmd must stop at the first failure");
        let start = position(&runcmd, "systemctl enable --now cpha");
        assert!(position(&runcmd, "cpha-bootstrap install") < start, "{file}: cpha is installed before it starts");
        assert!(start < position(&runcmd, "systemctl restart haproxy"), "{file}: HAProxy restarts after cpha");
        let config = doc(&file_content(files["/etc/cpha/config.yaml"]));
        // The virtual IP: keepalived starts after cpha is READY (cpha wrote its configuration
        // by then), and the VIP is the endpoint's address.
        let keepalived = position(&runcmd, "systemctl restart keepalived");
        assert!(start < keepalived, "{file}: keepalived starts after cpha");
        assert!(
            position(&runcmd, "systemctl enable keepalived") < keepalived,
            "{file}: keepalived enabled for reboots"
        );
        let listen = s(&config, "endpoint.listen");
        assert_eq!(
            listen.rsplit_once(':').map(|(host, _)| host),
            Some(s(&config, "vip.address")),
            "{file}: vip.address is not endpoint.listen's address"
        );
        match kubeadm {
            Some("cpha-bootstrap kubeadm-init") => {
                let wait = position(&runcmd, "cpha-bootstrap wait-vip");
                assert!(
                    keepalived < wait && wait < position(&runcmd, "cpha-bootstrap kubeadm-init"),
                    "{file}: wait-vip"
                );
            }
            Some(kubeadm) => {
                assert!(keepalived < position(&runcmd, kubeadm), "{file}: keepalived before {kubeadm}");
                assert!(!runcmd.iter().any(|c| c.contains("wait-vip")), "{file}: a joining host is a backup");
            }
            None => {
                // Two LB hosts: the peers are explicit (the members are not the LB hosts).
                let peers = strings(&config, "vip.unicastPeers");
                assert!(
                    !peers.is_empty() && !peers.iter().any(|p| p == s(&config, "vip.address")),
                    "{file}: {peers:?}"
                );
                let seeds: Vec<String> = strings(&config, "members.static")
                    .iter()
                    .map(|m| m.rsplit_once('=').map_or(m.as_str(), |x| x.1).to_string())
                    .collect();
                assert!(
                    !peers.iter().any(|p| seeds.iter().any(|m| m.starts_with(&format!("{p}:")))),
                    "{file}: a peer is a member"
                );
                assert!(position(&runcmd, "cpha-bootstrap node-env") < start, "{file}: node-env before cpha starts");
            }
        }
        if let Some(kubeadm) = kubeadm {
            assert!(position(&runcmd, "cpha-bootstrap node-env") < start, "{file}: node-env before cpha starts");
            assert!(start < position(&runcmd, kubeadm), "{file}: cpha must be READY before {kubeadm}");
            let site = env_file(&file_content(files["/etc/cpha/site.env"]));
            assert_eq!(
                site["CONTROL_PLANE_ENDPOINT"],
                s(&config, "endpoint.listen"),
                "{file}: kubeadm's endpoint and cpha's endpoint.listen differ"
            );
            for key in ["KUBEADM_TOKEN", "KUBEADM_CERTIFICATE_KEY"] {
                assert_eq!(
                    site.get(key).map(String::as_str),
                    Some(""),
                    "{file}: {key} is the operator's (no made-up value)"
                );
            }
        }
        // The host shape registers itself once kubeadm has run: the agent's own token first,
        // then this host into the member ConfigMap (no host listed by hand).
        if file == "cloud-init/init.yaml" || file == "cloud-init/join.yaml" {
            let kubeadm = if file == "cloud-init/init.yaml" { "kubeadm-init" } else { "kubeadm-join" };
            assert!(
                position(&runcmd, &format!("cpha-bootstrap {kubeadm}")) < position(&runcmd, "cpha-bootstrap identity")
            );
            assert!(position(&runcmd, "cpha-bootstrap identity") < position(&runcmd, "cpha-bootstrap register"));
        }
    }

    // The schema check itself fails on a broken copy.
    let dir = TempDir::new("cloud-init");
    let broken =
        dir.write("broken.yaml", &read("cloud-init/init.yaml").replace("runcmd:\n", "runcmd: 5\nnot_runcmd:\n"));
    let ran = cloud_init_schema(&broken);
    assert!(!ran.ok(), "cloud-init schema accepted `runcmd: 5`:\n{}", ran.both());
}

#[test]
fn embedded_copies_match_the_sync_tool() {
    let ran = run(Command::new(tool("python3")).arg(root().join("tests/deploy/sync-embedded")).arg("--check"));
    assert!(ran.ok(), "tests/deploy/sync-embedded --check:\n{}", ran.both());
}

// ---------------------------------------------------------------------------------------------
// The provisioning script

fn bootstrap(dir: &TempDir, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = Command::new(tool("bash"));
    cmd.arg(root().join("cloud-init/cpha-bootstrap"))
        .args(args)
        .env("CPHA_BIN", dir.path().join("bin/cpha"))
        .env("CPHA_PACKAGE_BIN", dir.path().join("package/usr/bin/cpha"))
        .env("SYSTEMD_ETC", dir.path().join("systemd"))
        .env("CPHA_ETC", dir.path().join("etc"))
        .env("KUBERNETES_DIR", dir.path().join("kubernetes"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

#[test]
fn bootstrap_script_is_clean_and_installs_only_a_verified_binary() {
    for script in ["cloud-init/cpha-bootstrap", "vagrant/provision.sh"] {
        let ran = run(Command::new(tool("shellcheck")).arg(root().join(script)));
        assert!(ran.ok(), "shellcheck {script}:\n{}", ran.both());
    }
    // shellcheck must be able to complain.
    let dir = TempDir::new("bootstrap");
    let bad = dir.write("bad.sh", "#!/bin/bash\nrm -rf $1/*\n");
    assert!(!run(Command::new(tool("shellcheck")).arg(&bad)).ok(), "shellcheck accepted an unquoted rm -rf");

    for (endpoint, host) in [
        ("192.0.2.10:8443", "192.0.2.10"),
        ("[fd00::10]:6443", "fd00::10"),
        ("lb.cluster.internal:6443", "lb.cluster.internal"),
    ] {
        let ran = bootstrap(&dir, &["endpoint-host", endpoint], &[]);
        assert_eq!((ran.code, ran.stdout.trim()), (0, host), "{}", ran.both());
    }
    for bad in ["fd00::10:6443", "192.0.2.10"] {
        assert!(!bootstrap(&dir, &["endpoint-host", bad], &[]).ok(), "{bad} was accepted");
    }

    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    let binary = env!("CARGO_BIN_EXE_cpha");
    let url = format!("file://{binary}");
    let sum = run(Command::new(tool("sha256sum")).arg(binary)).stdout.split_whitespace().next().unwrap().to_string();
    let installed = dir.path().join("bin/cpha");

    // No URL and nothing pre-installed: a clear refusal.
    dir.write("etc/install.env", "CPHA_URL=\nCPHA_SHA256=\n");
    let ran = bootstrap(&dir, &["install"], &[]);
    assert!(!ran.ok() && ran.stderr.contains("CPHA_URL"), "{}", ran.both());
    // A URL without a checksum, or with a wrong one, installs nothing.
    dir.write("etc/install.env", &format!("CPHA_URL={url}\nCPHA_SHA256=\n"));
    let ran = bootstrap(&dir, &["install"], &[]);
    assert!(!ran.ok() && ran.stderr.contains("CPHA_SHA256"), "{}", ran.both());
    dir.write("etc/install.env", &format!("CPHA_URL={url}\nCPHA_SHA256={}\n", "0".repeat(64)));
    let ran = bootstrap(&dir, &["install"], &[]);
    assert!(!ran.ok() && !installed.exists(), "a binary with the wrong checksum was installed:\n{}", ran.both());
    assert_eq!(std::fs::read_dir(dir.path().join("bin")).unwrap().count(), 0, "a temporary file was left behind");
    // The right checksum installs an executable copy.
    dir.write("etc/install.env", &format!("CPHA_URL={url}\nCPHA_SHA256={sum}\n"));
    let ran = bootstrap(&dir, &["install"], &[]);
    assert!(ran.ok(), "{}", ran.both());
    assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(binary).unwrap());
    assert_eq!(std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777, 0o755);
    // Pre-installed and no URL: kept as it is.
    dir.write("etc/install.env", "CPHA_URL=\nCPHA_SHA256=\n");
    assert!(bootstrap(&dir, &["install"], &[]).ok());

    // A .deb URL: checked the same way, then handed to apt-get (a recording stand-in here, so
    // this machine installs nothing), keeping the configuration the user-data wrote.
    let deb = dir.write("cpha_0.1.0_amd64.deb", "not really a package\n");
    let deb_sum = run(Command::new(tool("sha256sum")).arg(&deb)).stdout.split_whitespace().next().unwrap().to_string();
    let fake = dir.path().join("fakebin");
    std::fs::create_dir_all(&fake).unwrap();
    let calls = dir.path().join("apt-calls");
    let apt = dir.write("fakebin/apt-get", &format!("#!/bin/sh\necho \"$@\" >> {}\n", calls.display()));
    std::fs::set_permissions(&apt, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap_or_default());
    dir.write("etc/install.env", &format!("CPHA_URL=file://{}\nCPHA_SHA256={}\n", deb.display(), "0".repeat(64)));
    let ran = bootstrap(&dir, &["install"], &[("PATH", &path)]);
    assert!(!ran.ok() && ran.stderr.contains("CPHA_SHA256"), "{}", ran.both());
    assert!(!calls.exists(), "apt-get ran for a package with the wrong checksum");
    // The unit and drop-ins the user-data wrote (running /usr/local/bin/cpha) make way for the
    // package's, in /lib/systemd/system.
    let copies =
        ["systemd/cpha.service", "systemd/haproxy.service.d/cpha.conf", "systemd/keepalived.service.d/cpha.conf"];
    for copy in copies {
        dir.write(copy, &read(copy));
    }
    dir.write("etc/install.env", &format!("CPHA_URL=file://{}\nCPHA_SHA256={deb_sum}\n", deb.display()));
    let ran = bootstrap(&dir, &["install"], &[("PATH", &path)]);
    assert!(ran.ok(), "{}", ran.both());
    let call = std::fs::read_to_string(&calls).unwrap();
    assert!(
        call.starts_with("install -y") && call.contains("--force-confold") && call.trim_end().ends_with(".deb"),
        "{call}"
    );
    for copy in copies {
        assert!(!dir.path().join(copy).exists(), "{copy} would shadow the package's unit:\n{}", ran.both());
    }
    // An image with the package already installed, and no URL: the same.
    for copy in copies {
        dir.write(copy, &read(copy));
    }
    std::fs::remove_file(&installed).unwrap();
    let package_bin = dir.write("package/usr/bin/cpha", "#!/bin/sh\n");
    std::fs::set_permissions(&package_bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.write("etc/install.env", "CPHA_URL=\nCPHA_SHA256=\n");
    let ran = bootstrap(&dir, &["install"], &[]);
    assert!(ran.ok() && ran.stdout.contains("pre-installed package"), "{}", ran.both());
    for copy in copies {
        assert!(!dir.path().join(copy).exists(), "{copy} would shadow the package's unit:\n{}", ran.both());
    }
    std::fs::remove_file(&package_bin).unwrap();

    // node-env: HAProxy's private address is this host's address towards the endpoint.
    dir.write("etc/site.env", "CONTROL_PLANE_ENDPOINT=127.0.0.1:8443\n");
    let ran = bootstrap(&dir, &["node-env"], &[]);
    assert!(ran.ok(), "{}", ran.both());
    let env = env_file(&std::fs::read_to_string(dir.path().join("etc/cpha.env")).unwrap());
    assert_eq!(env["CPHA_HAPROXY_BIND"], "127.0.0.1:9445");

    // kubeadm steps refuse to run without their secrets.
    dir.write("etc/site.env", "CONTROL_PLANE_ENDPOINT=127.0.0.1:8443\nKUBEADM_TOKEN=\n");
    let ran = bootstrap(&dir, &["kubeadm-init"], &[]);
    assert!(!ran.ok() && ran.stderr.contains("KUBEADM_TOKEN is empty"), "{}", ran.both());
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests

fn validate_manifests(files: &[PathBuf]) -> Ran {
    let mut results = Vec::new();
    for version in KUBERNETES_VERSIONS {
        let ran = run(Command::new(kubernetes_validate()).args(["--strict", "-k", version]).args(files));
        if !ran.ok() || ran.stdout.contains("WARN") || ran.stderr.contains("WARN") {
            return ran;
        }
        results.push(ran);
    }
    results.pop().unwrap()
}

#[test]
fn manifests_pass_the_kubernetes_schemas() {
    let files: Vec<PathBuf> =
        ["deploy/daemonset.yaml", "deploy/external-lb-rbac.yaml", "deploy/members-configmap.yaml"]
            .iter()
            .map(|f| root().join(f))
            .collect();
    let ran = validate_manifests(&files);
    assert!(ran.ok(), "kubernetes-validate --strict:\n{}", ran.both());
    let passed = ran.stdout.matches(" passed for resource ").count();
    assert_eq!(passed, 13, "every object is checked against a schema:\n{}", ran.both());

    // A field the DaemonSet schema does not have is refused.
    let dir = TempDir::new("manifests");
    let broken = dir.write(
        "daemonset.yaml",
        &read("deploy/daemonset.yaml")
            .replace("      hostNetwork: true\n", "      hostNetwork: true\n      hostNetwrk: true\n"),
    );
    let ran = validate_manifests(&[broken]);
    assert!(!ran.ok(), "kubernetes-validate accepted an unknown field:\n{}", ran.both());
}

#[test]
fn the_external_lb_identity_is_what_cpha_identity_creates() {
    use cpha::kube::identity::{desired, Grants};
    let wanted = desired(&Grants {
        namespace: "kube-system".into(),
        config_map: None,
        endpoint_slice: Some(("default".into(), "kubernetes".into())),
        events: Some("default".into()),
    });
    let as_json = |v: &Value| serde_json::to_value(v).unwrap();
    let file = docs(&read("deploy/external-lb-rbac.yaml"));
    let of_kind =
        |kind: &str| -> Vec<serde_json::Value> { file.iter().filter(|d| s(d, "kind") == kind).map(as_json).collect() };
    assert!(of_kind("Secret").is_empty(), "no legacy ServiceAccount token Secret");
    let sa = &of_kind("ServiceAccount")[0];
    assert_eq!(sa["metadata"], serde_json::to_value(&wanted.service_account.metadata).unwrap());
    let roles: Vec<serde_json::Value> = wanted.roles.iter().map(|(r, _)| serde_json::to_value(r).unwrap()).collect();
    let bindings: Vec<serde_json::Value> = wanted.roles.iter().map(|(_, b)| serde_json::to_value(b).unwrap()).collect();
    assert_eq!(of_kind("Role"), roles, "deploy/external-lb-rbac.yaml's Roles are not cpha identity's");
    assert_eq!(of_kind("RoleBinding"), bindings, "deploy/external-lb-rbac.yaml's RoleBindings are not cpha identity's");
}

#[test]
fn daemonset_grants_only_what_cpha_needs() {
    let everything = docs(&read("deploy/daemonset.yaml"));
    // The drift report's read-only Role and binding live where the EndpointSlice is; they grant
    // get, list and watch of that one object and nothing else.
    let (registrations, all): (Vec<Value>, Vec<Value>) =
        everything.into_iter().partition(|d| s(d, "metadata.name") == "cpha-registrations");
    assert_eq!(registrations.len(), 2, "the registrations Role and RoleBinding");
    for d in &registrations {
        assert_eq!(s(d, "metadata.namespace"), "default", "{d:?}");
    }
    let reg_role = one(&registrations, "Role");
    let reg_rules = at(reg_role, "rules").as_sequence().unwrap();
    assert_eq!(reg_rules.len(), 1);
    assert_eq!(strings(&reg_rules[0], "resources"), ["endpointslices"]);
    assert_eq!(strings(&reg_rules[0], "resourceNames"), ["kubernetes"]);
    assert_eq!(strings(&reg_rules[0], "verbs"), ["get", "list", "watch"]);
    let reg_binding = one(&registrations, "RoleBinding");
    assert_eq!(s(reg_binding, "roleRef.name"), "cpha-registrations");
    assert_eq!(s(reg_binding, "subjects.0.namespace"), "kube-system");
    for d in &all {
        assert_eq!(s(d, "metadata.namespace"), "kube-system", "{d:?}");
    }
    let role = one(&all, "Role");
    let rules = at(role, "rules").as_sequence().unwrap();
    let configmaps = rules.iter().find(|r| strings(r, "resources") == ["configmaps"]).expect("a configmaps rule");
    assert_eq!(strings(configmaps, "resourceNames"), ["cpha-members"]);
    assert_eq!(strings(configmaps, "verbs"), ["get", "list", "watch"]);
    for rule in rules {
        let all_values: Vec<String> =
            ["apiGroups", "resources", "verbs"].iter().flat_map(|k| strings(rule, k)).collect();
        assert!(!all_values.iter().any(|v| v == "*"), "no wildcard rules: {rule:?}");
        if strings(rule, "resources") == ["events"] {
            assert!(strings(rule, "verbs").iter().all(|v| v == "create" || v == "patch"), "{rule:?}");
        }
    }
    assert_eq!(rules.len(), 2, "configmaps and events only");
    let binding = one(&all, "RoleBinding");
    assert_eq!(s(binding, "roleRef.name"), "cpha");
    assert_eq!(s(binding, "subjects.0.name"), s(one(&all, "ServiceAccount"), "metadata.name"));

    let configmaps = kind(&all, "ConfigMap");
    let config = configmaps.iter().find(|c| s(c, "metadata.name") == "cpha-config").expect("cpha-config");
    assert!(
        at(config, "data").get("config.yaml").and_then(Value::as_str)
            == Some(read("examples/config-daemonset.yaml").as_str()),
        "cpha-config differs from examples/config-daemonset.yaml: run tests/deploy/sync-embedded"
    );
    // The member list is live state, edited when hosts come and go: re-applying this manifest
    // (to bump the image, as docs/deployment.md says) must not reset it, so the manifest does
    // not carry it. It is deploy/members-configmap.yaml, applied once on its own.
    assert!(
        configmaps.iter().all(|c| s(c, "metadata.name") != "cpha-members"),
        "deploy/daemonset.yaml carries the member ConfigMap: re-applying it would reset the live list"
    );
    let members = doc(&read("deploy/members-configmap.yaml"));
    let cpha_config = doc(&read("examples/config-daemonset.yaml"));
    assert_eq!(s(&cpha_config, "members.configMap.name"), s(&members, "metadata.name"));
    assert_eq!(s(&cpha_config, "members.configMap.namespace"), s(&members, "metadata.namespace"));

    let ds = one(&all, "DaemonSet");
    let pod = at(ds, "spec.template.spec");
    assert_eq!(at(pod, "hostNetwork").as_bool(), Some(true));
    assert_eq!(s(pod, "serviceAccountName"), "cpha");
    assert!(at(pod, "nodeSelector").get("node-role.kubernetes.io/control-plane").is_some());
    let tolerations = at(pod, "tolerations").as_sequence().unwrap();
    assert!(tolerations.iter().any(|t| s(t, "key") == "node-role.kubernetes.io/control-plane"));
    let containers = at(pod, "containers").as_sequence().unwrap();
    let by_name = |n: &str| containers.iter().find(|c| s(c, "name") == n).unwrap_or_else(|| panic!("no container {n}"));
    let (haproxy, cpha) = (by_name("haproxy"), by_name("cpha"));
    assert_eq!(strings(haproxy, "securityContext.capabilities.drop"), ["ALL"]);
    assert!(at(haproxy, "securityContext.capabilities").get("add").is_none(), "HAProxy needs no capability");
    assert_eq!(strings(cpha, "securityContext.capabilities.drop"), ["ALL"]);
    assert_eq!(strings(cpha, "securityContext.capabilities.add"), ["NET_ADMIN"]);
    for c in [haproxy, cpha] {
        assert_eq!(at(c, "securityContext.allowPrivilegeEscalation").as_bool(), Some(false));
        assert_eq!(at(c, "securityContext.readOnlyRootFilesystem").as_bool(), Some(true));
        let mounts: BTreeSet<&str> =
            at(c, "volumeMounts").as_sequence().unwrap().iter().map(|m| s(m, "mountPath")).collect();
        assert!(mounts.contains("/etc/haproxy") && mounts.contains("/run/haproxy"), "{mounts:?}");
        assert!(
            at(c, "resources.requests").get("memory").is_some() && at(c, "resources.limits").get("memory").is_some()
        );
    }
    assert_eq!(s(cpha, "livenessProbe.httpGet.path"), "/healthz");
    assert_eq!(s(cpha, "readinessProbe.httpGet.path"), "/readyz");
    assert_eq!(at(cpha, "readinessProbe.httpGet.port").as_u64(), Some(9966));
    // HAProxy's master socket is where cpha's configuration looks for it.
    let command = strings(haproxy, "command").join(" ");
    assert!(command.contains(&format!("-S {},mode,600", s(&cpha_config, "haproxy.masterSocket"))), "{command}");
    assert!(command.contains(&format!("-f {}", s(&cpha_config, "haproxy.configPath"))), "{command}");
    let env: Vec<String> = at(cpha, "env").as_sequence().unwrap().iter().map(|e| s(e, "name").to_string()).collect();
    assert!(env.iter().any(|e| e == "CPHA_HAPROXY_BIND"), "the retarget topology needs the node's address");

    // keepalived: a container of the same pod, on the cpha image (which carries keepalived),
    // with the two capabilities VRRP and the address need, configured by cpha through the
    // shared volumes at the paths cpha's vip: section names, SIGHUPed through one process
    // namespace at the pid file both agree on.
    let keepalived = by_name("keepalived");
    assert_eq!(s(keepalived, "image"), s(cpha, "image"), "keepalived runs from the cpha image");
    assert_eq!(at(pod, "shareProcessNamespace").as_bool(), Some(true), "cpha SIGHUPs keepalived by its pid");
    assert_eq!(strings(keepalived, "securityContext.capabilities.drop"), ["ALL"]);
    assert_eq!(strings(keepalived, "securityContext.capabilities.add"), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(at(keepalived, "securityContext.allowPrivilegeEscalation").as_bool(), Some(false));
    assert_eq!(at(keepalived, "securityContext.readOnlyRootFilesystem").as_bool(), Some(true));
    assert!(at(keepalived, "resources.limits").get("memory").is_some());
    let script = strings(keepalived, "command").join(" ");
    let k = |key: &str| s(&cpha_config, &format!("vip.keepalived.{key}")).to_string();
    for arg in [
        format!("--use-file={}", k("configFile")),
        format!("--pid={}", k("pidFile")),
        "--dont-fork".to_string(),
        "--log-console".to_string(),
    ] {
        assert!(script.contains(&arg), "the keepalived container does not run with {arg}: {script}");
    }
    assert!(
        script.contains(&format!("until [ -s {} ]", k("configFile"))),
        "keepalived waits for cpha's file: {script}"
    );
    let mounts = |c: &Value| -> BTreeMap<String, (String, bool)> {
        at(c, "volumeMounts")
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| {
                let ro = m.get("readOnly").and_then(Value::as_bool).unwrap_or(false);
                (s(m, "mountPath").to_string(), (s(m, "name").to_string(), ro))
            })
            .collect()
    };
    let (cm, km) = (mounts(cpha), mounts(keepalived));
    for key in ["configFile", "trackFile", "notifyFifo", "pidFile"] {
        let dir = Path::new(&k(key)).parent().unwrap().to_str().unwrap().to_string();
        let (ours, theirs) = (cm.get(&dir), km.get(&dir));
        assert!(
            ours.is_some() && ours.map(|o| &o.0) == theirs.map(|t| &t.0),
            "vip.keepalived.{key} ({dir}) is not on a volume both cpha and keepalived mount"
        );
        assert!(!ours.unwrap().1, "cpha writes {dir}: it must not be read-only");
    }
    let volumes = at(pod, "volumes").as_sequence().unwrap();
    for (_, (name, _)) in km.iter() {
        let v = volumes.iter().find(|v| s(v, "name") == name).unwrap();
        assert!(v.get("emptyDir").is_some(), "{name}: keepalived's files live and die with the pod");
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster API + metal3

/// Test values for the template's variables (none of them reaches a real system).
fn metal3_values() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("CLUSTER_NAME", "cpha-test"),
        ("NAMESPACE", "metal3"),
        ("KUBERNETES_VERSION", "v1.30.4"),
        ("CONTROL_PLANE_MACHINE_COUNT", "3"),
        ("CLUSTER_APIENDPOINT_HOST", "192.0.2.10"),
        ("CLUSTER_APIENDPOINT_PORT", "8443"),
        ("CONTROL_PLANE_IP_1", "192.0.2.11"),
        ("CONTROL_PLANE_IP_2", "192.0.2.12"),
        ("CONTROL_PLANE_IP_3", "192.0.2.13"),
        ("CONTROL_PLANE_IP_4", "192.0.2.14"),
        ("CONTROL_PLANE_PREFIX", "24"),
        ("CONTROL_PLANE_GATEWAY", "192.0.2.1"),
        ("CONTROL_PLANE_NIC", "enp1s0"),
        ("IMAGE_URL", "https://images.invalid/node.raw"),
        ("IMAGE_CHECKSUM", "https://images.invalid/node.raw.sha256sum"),
        ("IMAGE_CHECKSUM_TYPE", "sha256"),
        ("IMAGE_FORMAT", "raw"),
    ])
}

/// clusterctl's substitution: `${NAME}`, `${NAME:=default}`, `${NAME:-default}`. Any other
/// dollar sign would be substituted by clusterctl too, so it is an error here.
fn substitute(text: &str, values: &BTreeMap<&str, &str>) -> Result<(String, BTreeSet<String>), String> {
    let mut out = String::new();
    let mut used = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(body) = after.strip_prefix('{').and_then(|b| b.find('}').map(|end| &b[..end])) else {
            let line = text[..text.len() - rest.len() + i].lines().count();
            return Err(format!(
                "line {line}: a dollar sign clusterctl would substitute: {:?}",
                &after[..after.len().min(20)]
            ));
        };
        let (name, default) = match body.find(":=").or_else(|| body.find(":-")) {
            Some(p) => (&body[..p], Some(&body[p + 2..])),
            None => (body, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
            return Err(format!("${{{body}}} is not a clusterctl variable"));
        }
        used.insert(name.to_string());
        match (values.get(name), default) {
            (Some(v), _) => out.push_str(v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("variable {name} has no value and no default")),
        }
        rest = &after[body.len() + 2..];
    }
    out.push_str(rest);
    Ok((out, used))
}

#[test]
fn metal3_template_is_coherent_and_its_cloud_config_is_valid() {
    let template = read("metal3/cluster-template.yaml");
    let (text, used) =
        substitute(&template, &metal3_values()).unwrap_or_else(|e| panic!("metal3/cluster-template.yaml: {e}"));
    let header: String = template.lines().take_while(|l| l.starts_with('#')).collect::<Vec<_>>().join("\n");
    for name in &used {
        assert!(header.contains(name.as_str()), "variable {name} is not documented in the template's header");
    }
    // The substitution check itself fails on a stray dollar sign.
    refused(
        substitute("a: $HOME\n", &metal3_values()),
        "a dollar sign clusterctl would substitute",
        "a stray $ went unnoticed",
    );

    let all = docs(&text);
    let cluster = one(&all, "Cluster");
    let m3c = one(&all, "Metal3Cluster");
    let kcp = one(&all, "KubeadmControlPlane");
    let m3mt = one(&all, "Metal3MachineTemplate");
    let m3dt = one(&all, "Metal3DataTemplate");
    let pool = one(&all, "IPPool");
    let api = |d: &Value| s(d, "apiVersion").to_string();
    assert_eq!(api(cluster), "cluster.x-k8s.io/v1beta1");
    assert_eq!(api(kcp), "controlplane.cluster.x-k8s.io/v1beta1");
    for d in [m3c, m3mt, m3dt] {
        assert_eq!(api(d), "infrastructure.cluster.x-k8s.io/v1beta1");
    }
    assert_eq!(api(pool), "ipam.metal3.io/v1alpha1");
    // References resolve to the objects in the file.
    let refers = |r: &Value, target: &Value| {
        assert_eq!(s(r, "kind"), s(target, "kind"));
        assert_eq!(s(r, "apiVersion"), s(target, "apiVersion"));
        assert_eq!(s(r, "name"), s(target, "metadata.name"));
    };
    refers(at(cluster, "spec.controlPlaneRef"), kcp);
    refers(at(cluster, "spec.infrastructureRef"), m3c);
    refers(at(kcp, "spec.machineTemplate.infrastructureRef"), m3mt);
    assert_eq!(s(m3mt, "spec.template.spec.dataTemplate.name"), s(m3dt, "metadata.name"));
    assert_eq!(s(m3dt, "spec.networkData.networks.ipv4.0.ipAddressFromIPPool"), s(pool, "metadata.name"));

    let spec = at(kcp, "spec.kubeadmConfigSpec");
    let known: BTreeSet<&str> = [
        "clusterConfiguration",
        "initConfiguration",
        "joinConfiguration",
        "files",
        "diskSetup",
        "mounts",
        "preKubeadmCommands",
        "postKubeadmCommands",
        "users",
        "ntp",
        "format",
        "verbosity",
        "useExperimentalRetryJoin",
        "ignition",
    ]
    .into();
    for key in spec.as_mapping().unwrap().keys() {
        assert!(known.contains(key.as_str().unwrap()), "kubeadmConfigSpec has no field {key:?}");
    }
    let file_keys: BTreeSet<&str> =
        ["path", "owner", "permissions", "encoding", "append", "content", "contentFrom"].into();
    for item in at(spec, "files").as_sequence().unwrap() {
        for key in item.as_mapping().unwrap().keys() {
            assert!(file_keys.contains(key.as_str().unwrap()), "a kubeadmConfigSpec file has no field {key:?}");
        }
    }
    let files = files_by_path(at(spec, "files"));
    check_embedded_copies("metal3/cluster-template.yaml", &files);

    // The endpoint: Cluster API's controlPlaneEndpoint, cpha's endpoint.listen and the one
    // cpha-bootstrap node-env reads are the same.
    let endpoint = format!(
        "{}:{}",
        s(m3c, "spec.controlPlaneEndpoint.host"),
        at(m3c, "spec.controlPlaneEndpoint.port").as_u64().unwrap()
    );
    let config_text = file_content(files["/etc/cpha/config.yaml"]);
    let config = doc(&config_text);
    assert_eq!(s(&config, "endpoint.listen"), endpoint);
    assert_eq!(env_file(&file_content(files["/etc/cpha/site.env"]))["CONTROL_PLANE_ENDPOINT"], endpoint);
    // The seed members are the addresses the pool hands out.
    let pool_addresses: Vec<String> =
        at(pool, "spec.pools").as_sequence().unwrap().iter().map(|p| s(p, "start").to_string()).collect();
    let seeds: Vec<String> =
        strings(&config, "members.static").iter().map(|m| m.trim_end_matches(":6443").to_string()).collect();
    assert_eq!(seeds, pool_addresses);
    // The long-running agent holds its own token (cpha identity after kubeadm), never kubeadm's
    // admin credentials.
    assert_eq!(s(&config, "kubernetes.tokenFile"), "/var/lib/cpha/token");
    assert_eq!(s(&config, "kubernetes.caFile"), "/etc/kubernetes/pki/ca.crt");
    assert!(at(&config, "kubernetes").get("kubeconfig").is_none(), "the metal3 agent names admin.conf");
    assert!(!config_text.contains("admin.conf"), "the metal3 agent's configuration names admin.conf");
    let post = strings(spec, "postKubeadmCommands");
    assert!(post.iter().any(|c| c == "cpha-bootstrap identity"), "no cpha-bootstrap identity after kubeadm: {post:?}");
    // A rollout (maxSurge) creates the new machine before deleting an old one: the pool must
    // hold an address for it, or every rollout stalls.
    let replicas: usize = at(kcp, "spec.replicas")
        .as_u64()
        .map(|n| n as usize)
        .unwrap_or_else(|| s(kcp, "spec.replicas").parse().expect("spec.replicas is a number"));
    let surge = at(kcp, "spec.rolloutStrategy.rollingUpdate.maxSurge").as_u64().unwrap() as usize;
    let mut pool_size = 0;
    for p in at(pool, "spec.pools").as_sequence().unwrap() {
        let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
            (s(p, "start").parse().unwrap(), s(p, "end").parse().unwrap());
        pool_size += (u32::from(b) - u32::from(a) + 1) as usize;
    }
    assert!(
        pool_size >= replicas + surge,
        "the IPPool has {pool_size} addresses for {replicas} replicas + maxSurge {surge}"
    );
    // The virtual IP is the endpoint's host, outside the pool (no machine gets it as its own).
    let vip = s(&config, "vip.address");
    assert_eq!(vip, s(m3c, "spec.controlPlaneEndpoint.host"), "vip.address is not controlPlaneEndpoint.host");
    assert!(!pool_addresses.iter().any(|a| a == vip), "the virtual IP {vip} is in the IPPool");

    let pre = strings(spec, "preKubeadmCommands");
    assert_eq!(pre[0], "set -e", "stop at the first failure: kubeadm must never run without the endpoint");
    let start = position(&pre, "systemctl enable --now cpha");
    assert!(position(&pre, "cpha-bootstrap install") < start && position(&pre, "cpha-bootstrap node-env") < start);
    let keepalived = position(&pre, "systemctl restart keepalived");
    assert!(start < position(&pre, "systemctl restart haproxy") && start < keepalived);
    // The first machine (InitConfiguration) waits for the address; a joining one does not.
    let wait = pre.iter().position(|c| c.contains("cpha-bootstrap wait-vip")).expect("wait-vip in preKubeadmCommands");
    assert!(keepalived < wait && wait == pre.len() - 1, "wait-vip is the last step before kubeadm: {pre:#?}");
    for (kubeadm_yaml, waits) in [("kind: InitConfiguration\n", true), ("kind: JoinConfiguration\n", false)] {
        let d = TempDir::new("metal3-wait");
        let file = d.write("kubeadm.yaml", &format!("apiVersion: kubeadm.k8s.io/v1beta3\n{kubeadm_yaml}"));
        let script = pre[wait]
            .replace("/run/kubeadm/kubeadm.yaml", file.to_str().unwrap())
            .replace("cpha-bootstrap wait-vip", "echo WAITS");
        let ran = run(Command::new(tool("bash")).args(["-c", &format!("set -e\n{script}\necho done")]));
        assert!(ran.ok() && ran.stdout.contains("WAITS") == waits, "{kubeadm_yaml}: {}", ran.both());
    }

    // The cloud-config the kubeadm bootstrap provider renders from the spec: files become
    // write_files, the commands runcmd around its kubeadm call.
    let mut write_files: Vec<Value> = at(spec, "files").as_sequence().unwrap().clone();
    write_files.push(serde_yaml::from_str("{path: /run/kubeadm/kubeadm.yaml, owner: 'root:root', permissions: '0640', content: 'kind: InitConfiguration'}").unwrap());
    let mut runcmd: Vec<Value> = pre.iter().map(|c| Value::from(c.as_str())).collect();
    runcmd.push(Value::from("kubeadm init --config /run/kubeadm/kubeadm.yaml"));
    if let Some(post) = spec.get("postKubeadmCommands") {
        runcmd.extend(post.as_sequence().unwrap().iter().cloned());
    }
    let mut cloud = serde_yaml::Mapping::new();
    cloud.insert("write_files".into(), Value::Sequence(write_files));
    cloud.insert("runcmd".into(), Value::Sequence(runcmd));
    let dir = TempDir::new("metal3");
    let user_data = dir.write("user-data.yaml", &format!("#cloud-config\n{}", serde_yaml::to_string(&cloud).unwrap()));
    assert_cloud_config_valid(&user_data);
    let broken = dir.write(
        "broken.yaml",
        &std::fs::read_to_string(&user_data)
            .unwrap()
            .replace("- path: /etc/cpha/install.env", "- pth: /etc/cpha/install.env"),
    );
    assert!(!cloud_init_schema(&broken).ok(), "cloud-init schema accepted a file without a path");

    // And the configuration cpha gets on those machines is one it accepts.
    let config_file = dir.write("config.yaml", &config_text);
    assert_config_valid(&config_file);
}

// ---------------------------------------------------------------------------------------------
// Vagrant

fn vagrant_validate(dotfile: &Path, binary: &str) -> Ran {
    run(Command::new(tool("vagrant"))
        .arg("validate")
        .current_dir(root().join("vagrant"))
        // The libvirt provider (Debian's vagrant-libvirt) checks its own settings too.
        .env("VAGRANT_DEFAULT_PROVIDER", "libvirt")
        .env("VAGRANT_DOTFILE_PATH", dotfile)
        .env("VAGRANT_HOME", dotfile.join("home"))
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .env("VAGRANT_BOX_UPDATE_CHECK_DISABLE", "1")
        .env("CPHA_BINARY", binary))
}

#[test]
fn vagrant_environment_validates() {
    let dir = TempDir::new("vagrant");
    let dot = dir.path().join("dot");
    let ran = vagrant_validate(&dot, env!("CARGO_BIN_EXE_cpha"));
    assert!(ran.ok() && ran.stdout.contains("validated successfully"), "vagrant validate:\n{}", ran.both());

    // The join material the Vagrantfile made: the CA hash the joining VMs pin is the one
    // kubeadm computes (SHA-256 of the CA's SubjectPublicKeyInfo).
    let join = env_file(&std::fs::read_to_string(dot.join("cpha/join.env")).unwrap());
    let token = &join["KUBEADM_TOKEN"];
    let (id, secret) = token.split_once('.').expect("token id.secret");
    assert!(
        id.len() == 6
            && secret.len() == 16
            && token.chars().all(|c| c == '.' || c.is_ascii_lowercase() || c.is_ascii_digit()),
        "{token}"
    );
    assert_eq!(join["KUBEADM_CERTIFICATE_KEY"].len(), 64);
    let der =
        run(Command::new(tool("openssl")).args(["x509", "-noout", "-pubkey", "-in"]).arg(dot.join("cpha/ca.crt")));
    assert!(der.ok(), "{}", der.both());
    let pubkey = dir.write("ca.pub", &der.stdout);
    let spki = run(Command::new(tool("openssl"))
        .args(["pkey", "-pubin", "-outform", "der", "-out"])
        .arg(dir.path().join("ca.der"))
        .arg("-in")
        .arg(&pubkey));
    assert!(spki.ok(), "{}", spki.both());
    let sum = run(Command::new(tool("sha256sum")).arg(dir.path().join("ca.der")));
    assert_eq!(join["KUBEADM_CA_CERT_HASH"], format!("sha256:{}", sum.stdout.split_whitespace().next().unwrap()));

    // The lab's configuration is the host example with the VMs' addresses, and cpha accepts it.
    let vagrantfile = read("vagrant/Vagrantfile");
    let config = doc(&read("vagrant/config.yaml"));
    let endpoint = s(&config, "endpoint.listen");
    assert!(
        vagrantfile.contains(&format!("ENDPOINT = \"{endpoint}\"")),
        "the Vagrantfile's ENDPOINT is not {endpoint}"
    );
    // No member list is written by hand: the VMs register themselves. The seed names the VMs.
    assert!(!root().join("vagrant/members-configmap.yaml").exists());
    assert!(!vagrantfile.contains("members-configmap"), "the Vagrantfile still uploads a member list");
    let listed = strings(&config, "members.static");
    for member in &listed {
        let (name, addr) = member.split_once('=').unwrap();
        let ip = addr.trim_end_matches(":6443");
        assert!(vagrantfile.contains(&format!("\"{name}\" => \"{ip}\"")), "{name} {ip} is not a VM of the Vagrantfile");
    }
    assert_config_valid(&root().join("vagrant/config.yaml"));
    let provision = read("vagrant/provision.sh");
    let line = |needle: &str| {
        provision.lines().position(|l| l.trim() == needle).unwrap_or_else(|| panic!("provision.sh has no {needle:?}"))
    };
    assert!(line("systemctl enable --now cpha") < line("cpha-bootstrap kubeadm-init"));
    assert!(line("systemctl enable --now cpha") < line("cpha-bootstrap kubeadm-join"));
    // The virtual IP: keepalived after cpha, cp1 holding the address before kubeadm init.
    assert!(line("systemctl enable --now cpha") < line("systemctl restart keepalived"));
    assert!(line("systemctl restart keepalived") < line("cpha-bootstrap wait-vip"));
    assert!(line("cpha-bootstrap wait-vip") < line("cpha-bootstrap kubeadm-init"));
    assert!(
        provision.contains("keepalived.service.d/cpha.conf")
            && vagrantfile.contains("systemd/keepalived.service.d/cpha.conf")
    );
    let vip = s(&config, "vip.address");
    assert_eq!(Some(vip), endpoint.rsplit_once(':').map(|(h, _)| h), "vip.address is the endpoint's address");
    assert!(!vagrantfile.contains(&format!("=> \"{vip}\"")), "the virtual IP {vip} is a VM's address");
    assert!(line("cpha-bootstrap kubeadm-join") < line("cpha-bootstrap identity"));
    assert!(line("cpha-bootstrap identity") < line("cpha-bootstrap register"));

    // vagrant validate itself fails when the binary to upload is missing.
    let ran = vagrant_validate(&dir.path().join("dot2"), "/nonexistent/cpha");
    assert!(
        !ran.ok() && ran.both().contains("/nonexistent/cpha"),
        "vagrant validate accepted a missing binary:\n{}",
        ran.both()
    );
}

// ---------------------------------------------------------------------------------------------
// Configurations

#[test]
fn example_configs_pass_check_config() {
    for file in ["examples/config-host.yaml", "examples/config-daemonset.yaml"] {
        assert_config_valid(&root().join(file));
    }
    // As on lb1 (192.0.2.21): its vip.unicastPeers names lb2.
    assert_config_valid_on(&root().join("examples/config-external-lb.yaml"), Some("192.0.2.21"));
    let host = doc(&read("examples/config-host.yaml"));
    assert_eq!(s(&host, "endpoint.topology"), "retarget");
    // The long-running agent holds its own read-only token, never kubeadm's admin credentials.
    assert_eq!(s(&host, "kubernetes.tokenFile"), "/var/lib/cpha/token");
    assert_eq!(s(&host, "kubernetes.caFile"), "/etc/kubernetes/pki/ca.crt");
    assert!(at(&host, "kubernetes").get("kubeconfig").is_none(), "the host shape names admin.conf");
    assert_eq!(s(&host, "members.source"), "configMap");
    let members = doc(&read("deploy/members-configmap.yaml"));
    assert_eq!(s(&members, "metadata.name"), s(&host, "members.configMap.name"));
    assert_eq!(s(&members, "metadata.namespace"), s(&host, "members.configMap.namespace"));
    let listed: Vec<String> = s(&members, "data.members").lines().map(str::to_string).collect();
    assert_eq!(listed, strings(&host, "members.static"), "the ConfigMap and the seed list the same members");
    let daemonset = doc(&read("examples/config-daemonset.yaml"));
    assert_eq!(at(&daemonset, "kubernetes.inCluster").as_bool(), Some(true));
    let lb = doc(&read("examples/config-external-lb.yaml"));
    for key in ["kubernetes.server", "kubernetes.caFile", "kubernetes.tokenFile"] {
        at(&lb, key);
    }

    // check-config refuses a broken configuration (and so is really checking).
    let dir = TempDir::new("config");
    let broken = dir.write(
        "config.yaml",
        &read("examples/config-host.yaml").replace("  topology: retarget", "  topolgy: retarget"),
    );
    let ran = check_config(&broken);
    assert_eq!(ran.code, 78, "cpha check-config must refuse an unknown key with exit 78:\n{}", ran.both());
}

#[test]
fn deployment_doc_names_every_file() {
    let shapes = read("docs/configuration.md");
    let shapes = &shapes[shapes.find("## Shapes").expect("docs/configuration.md has a Shapes section")..];
    for example in ["examples/config-host.yaml", "examples/config-daemonset.yaml", "examples/config-external-lb.yaml"] {
        assert!(shapes.contains(example), "the Shapes section of docs/configuration.md does not name {example}");
    }
    let doc = read("docs/deployment.md");
    for file in [
        "systemd/cpha.service",
        "systemd/haproxy.service.d/cpha.conf",
        "examples/config-host.yaml",
        "examples/config-daemonset.yaml",
        "examples/config-external-lb.yaml",
        "cloud-init/init.yaml",
        "cloud-init/join.yaml",
        "cloud-init/lb.yaml",
        "cloud-init/cpha-bootstrap",
        "deploy/daemonset.yaml",
        "deploy/members-configmap.yaml",
        "deploy/external-lb-rbac.yaml",
        "deploy/Dockerfile",
        "metal3/cluster-template.yaml",
        "vagrant/Vagrantfile",
        "vagrant/provision.sh",
        "systemctl disable --now cpha && cpha cleanup",
    ] {
        assert!(doc.contains(file), "docs/deployment.md does not mention {file}");
        if !file.contains(' ') {
            assert!(root().join(file).exists(), "{file} is named but missing");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Faults an operator's boot found (issue 12); each test fails on the file before its fix.

/// A systemd time span as the unit writes it (`16min`, `90s`, `1h 5min`).
fn systemd_span(text: &str) -> Duration {
    humantime::parse_duration(&text.replace("min", "m")).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

#[test]
fn unit_waits_longer_than_the_default_drain_when_stopping() {
    let unit = read("systemd/cpha.service");
    let stop = unit.lines().find_map(|l| l.strip_prefix("TimeoutStopSec=")).expect("TimeoutStopSec=");
    // The default from the configuration reference (docs/configuration.md, the `forward` table).
    let doc = read("docs/configuration.md");
    let row =
        doc.lines().find(|l| l.starts_with("| `drainTimeout` |")).expect("drainTimeout row in docs/configuration.md");
    let default = row.split('|').nth(2).unwrap().trim().trim_matches('`');
    let (stop, drain) = (systemd_span(stop), systemd_span(default));
    assert!(
        stop > drain,
        "TimeoutStopSec={stop:?} is not longer than forward.drainTimeout's default {drain:?}: systemd's SIGKILL would cut the drain short"
    );
    // HAProxy's regex JIT needs writable+executable memory in `haproxy -c`, which cpha runs.
    assert!(
        !unit.contains("MemoryDenyWriteExecute=yes"),
        "MemoryDenyWriteExecute=yes breaks every regex in haproxy -c"
    );
}

/// The `90-cpha.conf` a cloud-init file writes.
fn sysctl_conf(file: &str) -> String {
    let data = doc(&read(file));
    file_content(files_by_path(at(&data, "write_files"))["/etc/sysctl.d/90-cpha.conf"])
}

#[test]
fn sysctl_step_skips_a_missing_optional_key_and_refuses_a_missing_required_one() {
    cpha_lab::require_root!();
    let dir = TempDir::new("sysctl");
    // lb.yaml's file plus a "-" key no kernel has (as net.ipv4.tcp_migrate_req before Linux 5.14).
    let conf = dir.write("90-cpha.conf", &(sysctl_conf("cloud-init/lb.yaml") + "-net.ipv4.cpha_no_such_key = 1\n"));
    // Why: procps' own reading of the same file exits 1, which `set -e` turns into a failed boot.
    let ran = run(Command::new("unshare").args(["--net", "--", "sysctl", "-p"]).arg(&conf));
    assert!(
        !ran.ok(),
        "sysctl -p now accepts a missing -KEY: the premise of cpha-bootstrap sysctl changed\n{}",
        ran.both()
    );
    // In a fresh network namespace, so net.* keys are set there only.
    let step = |file: &Path| {
        run(Command::new("unshare")
            .args(["--net", "--", "bash", "-c", r#"bash "$1" sysctl && cat /proc/sys/net/ipv4/ip_forward"#, "sh"])
            .arg(root().join("cloud-init/cpha-bootstrap"))
            .env("SYSCTL_FILE", file))
    };
    let ran = step(&conf);
    assert!(ran.ok() && ran.stdout.trim_end().ends_with('1'), "{}", ran.both());
    assert!(ran.stdout.contains("net.ipv4.cpha_no_such_key does not exist on this kernel: skipped"), "{}", ran.both());
    let required = dir.write("required.conf", "net.ipv4.ip_forward = 1\nnet.ipv4.cpha_no_such_key = 1\n");
    let ran = step(&required);
    assert!(!ran.ok() && ran.stderr.contains("cpha_no_such_key does not exist"), "{}", ran.both());

    // Every file runs this step, never `sysctl --system` under `set -e`.
    for file in ["cloud-init/init.yaml", "cloud-init/join.yaml", "cloud-init/lb.yaml"] {
        let runcmd = strings(&doc(&read(file)), "runcmd");
        assert!(!runcmd.iter().any(|c| c.contains("sysctl --system")), "{file}: sysctl --system stops the boot");
        assert!(position(&runcmd, "cpha-bootstrap sysctl") < position(&runcmd, "systemctl enable --now cpha"));
    }
    let metal3 = read("metal3/cluster-template.yaml");
    assert!(!metal3.contains("- sysctl --system"), "metal3: sysctl --system stops the boot");
    assert!(metal3.contains("- cpha-bootstrap sysctl"), "metal3: no cpha-bootstrap sysctl");
}

#[test]
fn metal3_preflight_fails_when_either_program_is_missing() {
    let text = read("metal3/cluster-template.yaml");
    // The preflight commands of preKubeadmCommands, in order, as cloud-init's runcmd runs them.
    let line = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("- ") && l.contains("command -v"))
        .map(|l| l.trim_start_matches("- "))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        line.contains("haproxy") && line.contains("nft") && line.contains("keepalived"),
        "the haproxy/nft/keepalived preflight in preKubeadmCommands: {line:?}"
    );
    let dir = TempDir::new("preflight");
    let with = |programs: &[&str]| {
        let bin = dir.path().join(programs.join("-"));
        std::fs::create_dir_all(&bin).unwrap();
        for p in programs {
            let path = bin.join(p);
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        run(Command::new("/bin/bash").args(["-c", &format!("set -e\n{line}\necho passed")]).env("PATH", &bin))
    };
    for missing_one in [&["haproxy", "nft"][..], &["haproxy", "keepalived"][..], &["nft", "keepalived"][..], &[][..]] {
        let ran = with(missing_one);
        assert!(
            !ran.ok() && !ran.stdout.contains("passed"),
            "preflight passed with only {missing_one:?}:\n{}",
            ran.both()
        );
    }
    let ran = with(&["haproxy", "nft", "keepalived"]);
    assert!(ran.ok() && ran.stdout.contains("passed"), "{}", ran.both());
}

/// A fake program on PATH for the provisioning script: exits 0, records its arguments.
fn fake(bin: &Path, name: &str) {
    let path = bin.join(name);
    std::fs::write(&path, format!("#!/bin/sh\necho \"{name} $*\" >>\"{}/calls\"\n", bin.display())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn kubeadm_steps_keep_the_images_kubelet_args_and_pass_a_kubeadm_config_alone() {
    let dir = TempDir::new("kubeadm-steps");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // systemctl says cpha is active; logger stays quiet; kubeadm is the boot tests' double,
    // which refuses --config mixed with other flags in kubeadm's words, and here stops right
    // after accepting its flags (no cluster store: KUBEADM_DOUBLE_DIR is empty).
    fake(&bin, "systemctl");
    fake(&bin, "logger");
    std::fs::copy(root().join("tests/boot/doubles/kubeadm"), bin.join("kubeadm")).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let double_dir = dir.path().join("double");
    std::fs::create_dir_all(&double_dir).unwrap();
    let kubelet_default = dir.path().join("default/kubelet");
    let kubelet_sysconfig = dir.path().join("sysconfig/kubelet");
    let files = format!("{} {}", kubelet_default.display(), kubelet_sysconfig.display());
    let step = |args: &[&str]| {
        let mut cmd = Command::new(tool("bash"));
        cmd.arg(root().join("cloud-init/cpha-bootstrap"))
            .args(args)
            .env("PATH", &path)
            .env("CPHA_ETC", dir.path().join("etc"))
            .env("KUBERNETES_DIR", dir.path().join("kubernetes"))
            .env("KUBEADM_DOUBLE_DIR", &double_dir)
            .env("KUBELET_ENV_FILES", &files);
        run(&mut cmd)
    };
    let site = "CONTROL_PLANE_ENDPOINT=127.0.0.1:8443\nKUBEADM_TOKEN=abcdef.0123456789abcdef\nKUBEADM_CERTIFICATE_KEY=00ff\nKUBEADM_CA_CERT_HASH=sha256:00\n";
    let accepted = "/double/store is missing";

    // The double can fail: --config with another flag is kubeadm's refusal.
    let config = dir.write(
        "kubeadm.yaml",
        "apiVersion: kubeadm.k8s.io/v1beta3\nkind: InitConfiguration\nlocalAPIEndpoint:\n  advertiseAddress: 127.0.0.1\n---\napiVersion: kubeadm.k8s.io/v1beta3\nkind: ClusterConfiguration\ncontrolPlaneEndpoint: 127.0.0.1:8443\n",
    );
    let ran = run(Command::new(bin.join("kubeadm"))
        .args(["init", "--upload-certs", "--token", "x", "--config"])
        .arg(&config)
        .env("PATH", &path));
    assert!(!ran.ok() && ran.stderr.contains("can not mix '--config' with arguments [token]"), "{}", ran.both());

    // Flags: the image's kubelet arguments are kept, in one line with --node-ip.
    dir.write("etc/site.env", &format!("{site}KUBEADM_EXTRA_ARGS=\n"));
    dir.write("default/kubelet", "# the image's\nKUBELET_EXTRA_ARGS=--image-gc-high-threshold=90\n");
    let ran = step(&["kubeadm-init"]);
    assert!(ran.stderr.contains(accepted), "kubeadm init with flags:\n{}", ran.both());
    let kubelet = std::fs::read_to_string(&kubelet_default).unwrap();
    assert_eq!(kubelet, "# the image's\nKUBELET_EXTRA_ARGS=\"--image-gc-high-threshold=90 --node-ip=127.0.0.1\"\n");
    // Run again: nothing added twice.
    step(&["kubeadm-init"]);
    assert_eq!(std::fs::read_to_string(&kubelet_default).unwrap(), kubelet);

    // The RHEL family's /etc/sysconfig/kubelet, quoted arguments.
    std::fs::remove_file(&kubelet_default).unwrap();
    std::fs::remove_dir(kubelet_default.parent().unwrap()).unwrap();
    dir.write("sysconfig/kubelet", "KUBELET_EXTRA_ARGS=\"--max-pods=50 --v=2\"\n");
    let ran = step(&["kubeadm-join"]);
    assert!(ran.stderr.contains(accepted), "kubeadm join with flags:\n{}", ran.both());
    // The double failed (no cluster store): the step fails too, and says what an expired token
    // or certificate key looks like and what makes a new one.
    assert!(!ran.ok(), "{}", ran.both());
    for hint in [
        "could not find a JWS signature in the cluster-info ConfigMap",
        "kubeadm token create --print-join-command",
        "Secret \"kubeadm-certs\" was not found",
        "kubeadm init phase upload-certs --upload-certs",
        "\"Bootstrap secrets expire\"",
    ] {
        assert!(ran.stderr.contains(hint), "kubeadm-join's hint lacks {hint:?}:\n{}", ran.both());
    }
    assert_eq!(
        std::fs::read_to_string(&kubelet_sysconfig).unwrap(),
        "KUBELET_EXTRA_ARGS=\"--max-pods=50 --v=2 --node-ip=127.0.0.1\"\n"
    );

    // --config through KUBEADM_EXTRA_ARGS: passed alone (with --upload-certs on init).
    dir.write("etc/site.env", &format!("{site}KUBEADM_EXTRA_ARGS=\"--config {}\"\n", config.display()));
    let ran = step(&["kubeadm-init"]);
    assert!(
        !ran.stderr.contains("can not mix") && ran.stderr.contains(accepted),
        "kubeadm init --config:\n{}",
        ran.both()
    );
    let join = dir.write(
        "join.yaml",
        "apiVersion: kubeadm.k8s.io/v1beta3\nkind: JoinConfiguration\ndiscovery:\n  bootstrapToken:\n    apiServerEndpoint: 127.0.0.1:8443\n    token: abcdef.0123456789abcdef\n    caCertHashes:\n    - sha256:0000000000000000000000000000000000000000000000000000000000000000\ncontrolPlane:\n  localAPIEndpoint:\n    advertiseAddress: 127.0.0.1\n",
    );
    dir.write("etc/site.env", &format!("{site}KUBEADM_EXTRA_ARGS=\"--config {}\"\n", join.display()));
    let ran = step(&["kubeadm-join"]);
    assert!(
        !ran.stderr.contains("can not mix") && ran.stderr.contains(accepted),
        "kubeadm join --config:\n{}",
        ran.both()
    );
    // A configuration for another endpoint than the one cpha serves is refused before kubeadm.
    let other = dir.write("other.yaml", "kind: ClusterConfiguration\ncontrolPlaneEndpoint: 192.0.2.99:6443\n");
    dir.write("etc/site.env", &format!("{site}KUBEADM_EXTRA_ARGS=\"--config {}\"\n", other.display()));
    let ran = step(&["kubeadm-init"]);
    assert!(!ran.ok() && ran.stderr.contains("must set controlPlaneEndpoint"), "{}", ran.both());
}

#[test]
fn bootstrap_secret_lifetimes_are_stated_where_the_values_are_set() {
    // A host joining after the token (24 h) or the certificate key (2 h) expired fails in
    // kubeadm join: the user-data that takes the values and the deployment doc say so, with the
    // commands that make new ones and the messages kubeadm prints.
    for file in ["cloud-init/init.yaml", "cloud-init/join.yaml"] {
        let data = doc(&read(file));
        let site = file_content(files_by_path(at(&data, "write_files"))["/etc/cpha/site.env"]);
        for needle in [
            "24 h",
            "2 h",
            "kubeadm token create --print-join-command",
            "kubeadm init phase upload-certs --upload-certs",
        ] {
            assert!(site.contains(needle), "{file}: site.env does not say {needle:?}:\n{site}");
        }
    }
    let doc = read("docs/deployment.md");
    let section =
        doc.split("\n## Bootstrap secrets expire\n").nth(1).expect("the section").split("\n## ").next().unwrap();
    for needle in [
        "24 h",
        "2 h",
        "could not find a JWS signature in the cluster-info ConfigMap",
        "Secret \"kubeadm-certs\" was not found in the \"kube-system\" Namespace",
        "kubeadm token create --print-join-command",
        "kubeadm init phase upload-certs --upload-certs",
        "cpha-bootstrap kubeadm-join && cpha-bootstrap identity && cpha-bootstrap register",
    ] {
        assert!(section.contains(needle), "docs/deployment.md, \"Bootstrap secrets expire\", lacks {needle:?}");
    }
}

#[test]
fn daemonset_docs_say_every_joining_node_needs_a_forward() {
    // kubeadm join goes through the endpoint before the joining node's pod can exist.
    let doc = read("docs/deployment.md");
    let shape = doc
        .split("**DaemonSet shape.**")
        .nth(1)
        .expect("docs/deployment.md: DaemonSet shape")
        .split("\n\n")
        .next()
        .unwrap();
    assert!(
        shape.contains("before `kubeadm join`") && shape.contains("every joining"),
        "docs/deployment.md says only the first node needs a forward:\n{shape}"
    );
    let header: String =
        read("deploy/daemonset.yaml").lines().take_while(|l| l.starts_with('#')).collect::<Vec<_>>().join("\n");
    assert!(
        header.contains("before\n# `kubeadm join`") || header.contains("before `kubeadm join`"),
        "deploy/daemonset.yaml:\n{header}"
    );
}

// ---------------------------------------------------------------------------------------------
// The virtual IP at first boot (issue 10)

/// `cpha-bootstrap wait-vip` and the node address on the holder, in a network namespace of the
/// test with the addresses of the cloud-init files: the host 192.0.2.11/24, the VIP 192.0.2.10
/// added as keepalived adds it (/32).
#[test]
fn wait_vip_waits_for_the_address_with_a_bound_and_node_ip_is_never_the_vip() {
    cpha_lab::require_root!();
    let ns = cpha_lab::netns::Netns::new("cphadeploy-vip").unwrap();
    let peer = cpha_lab::netns::Netns::new("cphadeploy-vippeer").unwrap();
    let (dev, _) = cpha_lab::netns::veth_pair(&ns, &["192.0.2.11/24"], &peer, &["192.0.2.12/24"]).unwrap();
    let dir = TempDir::new("wait-vip");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // systemctl: `is-active UNIT` answers from the file bin/active-UNIT (present: active).
    let systemctl = bin.join("systemctl");
    std::fs::write(
        &systemctl,
        format!(
            "#!/bin/sh\n[ \"$1\" = is-active ] || exit 0\nfor u; do :; done\n[ -e \"{}/active-$u\" ]\n",
            bin.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let active = |unit: &str| std::fs::write(bin.join(format!("active-{unit}")), "").unwrap();
    let site = "CONTROL_PLANE_ENDPOINT=192.0.2.10:8443\nVIP_WAIT_TIMEOUT=2\n";
    dir.write("etc/site.env", site);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let step = |args: &[&str]| {
        let mut cmd = ns.command(tool("bash"));
        cmd.arg(root().join("cloud-init/cpha-bootstrap"))
            .args(args)
            .env("PATH", &path)
            .env("CPHA_ETC", dir.path().join("etc"));
        run(&mut cmd)
    };

    // cpha not active: refused, kubeadm would have no endpoint.
    let ran = step(&["wait-vip"]);
    assert!(!ran.ok() && ran.stderr.contains("cpha.service is not active"), "{}", ran.both());
    // keepalived not running: nothing will ever take the address; said at once.
    active("cpha.service");
    let started = Instant::now();
    let ran = step(&["wait-vip"]);
    assert!(!ran.ok() && ran.stderr.contains("keepalived.service is not active"), "{}", ran.both());
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // keepalived running, the address held elsewhere (or never taken): bounded, with the reason.
    active("keepalived.service");
    let started = Instant::now();
    let ran = step(&["wait-vip"]);
    assert!(!ran.ok() && ran.stderr.contains("does not hold the virtual IP 192.0.2.10 after 2s"), "{}", ran.both());
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    // Before the VIP: node-env's address is the host's own.
    let ran = step(&["node-env"]);
    assert!(ran.ok() && ran.stdout.contains("CPHA_HAPROXY_BIND=192.0.2.11:9445"), "{}", ran.both());
    // The address arrives while waiting: done.
    let vip = std::thread::spawn({
        let name = ns.name().to_string();
        let dev = dev.clone();
        move || {
            std::thread::sleep(Duration::from_millis(1200));
            run(Command::new("ip").args(["-n", &name, "address", "add", "192.0.2.10/32", "dev", &dev]))
        }
    });
    dir.write("etc/site.env", &site.replace("=2\n", "=20\n"));
    let ran = step(&["wait-vip"]);
    assert!(vip.join().unwrap().ok());
    assert!(ran.ok() && ran.stdout.contains("holds the virtual IP 192.0.2.10"), "{}", ran.both());
    // On the holder the kernel's source address towards the endpoint is the VIP itself; the
    // node address (HAProxy's bind, kubeadm's --apiserver-advertise-address) is still the host's.
    let route = ns.ip(&["-o", "route", "get", "192.0.2.10"]).unwrap();
    assert!(route.contains("src 192.0.2.10"), "the premise changed: {route}");
    let ran = step(&["node-env"]);
    assert!(ran.ok() && ran.stdout.contains("CPHA_HAPROXY_BIND=192.0.2.11:9445"), "{}", ran.both());
}

/// The DaemonSet's keepalived container, as the kubelet would run it: its own command from the
/// manifest, with only the capabilities the manifest adds (a bounding set of NET_ADMIN and
/// NET_RAW), a read-only root filesystem and the two emptyDir volumes (bind mounts of the
/// test's directories), on a node of the shape (192.0.2.11/24 in a network namespace). It waits
/// for the keepalived.conf the sidecar writes (`cpha render --keepalived` of
/// examples/config-daemonset.yaml), then takes the virtual IP, and writes its pid where cpha's
/// configuration looks for it.
#[test]
fn daemonset_keepalived_container_takes_the_address_with_its_two_capabilities() {
    cpha_lab::require_root!();
    let all = docs(&read("deploy/daemonset.yaml"));
    let pod = at(one(&all, "DaemonSet"), "spec.template.spec");
    let keepalived = at(pod, "containers")
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| s(c, "name") == "keepalived")
        .expect("a keepalived container");
    let command = strings(keepalived, "command");
    assert_eq!(&command[..2], ["/bin/sh", "-c"], "{command:?}");
    let caps: Vec<String> = strings(keepalived, "securityContext.capabilities.add")
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let config = doc(&read("examples/config-daemonset.yaml"));
    let k = |key: &str| s(&config, &format!("vip.keepalived.{key}")).to_string();

    let node = cpha_lab::netns::Netns::new("cphadeploy-node").unwrap();
    let segment = cpha_lab::netns::Netns::new("cphadeploy-seg").unwrap();
    cpha_lab::netns::veth_pair(&node, &["192.0.2.11/24"], &segment, &["192.0.2.12/24"]).unwrap();
    let dir = TempDir::new("keepalived-container");
    let (etc, run_dir) = (dir.path().join("etc-keepalived"), dir.path().join("run-cpha"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&run_dir).unwrap();
    // What the sidecar prepares at its start: the health file (healthy) and the FIFO, whose
    // reading end the test holds open as cpha does.
    std::fs::write(run_dir.join(Path::new(&k("trackFile")).file_name().unwrap()), "0\n").unwrap();
    let fifo = run_dir.join(Path::new(&k("notifyFifo")).file_name().unwrap());
    assert!(run(Command::new("mkfifo").arg("-m").arg("600").arg(&fifo)).ok());
    let reader =
        std::process::Command::new("sh").args(["-c", "exec cat \"$1\" >\"$1.log\"", "sh"]).arg(&fifo).spawn().unwrap();
    let _reader = cpha_lab::netns::Child::from_std(reader, "fifo reader");

    // The container: its volumes mounted where the manifest mounts them, the root read-only,
    // the capabilities bounded, then its own command.
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /run; mkdir -p {run_mount}; mount --bind {run_dir} {run_mount}; \
         mount --bind {etc} {etc_mount}; mount -o remount,bind,ro /; \
         exec setpriv --bounding-set=-all,{caps} --inh-caps=-all /bin/sh -c \"$1\"",
        run_mount = Path::new(&k("pidFile")).parent().unwrap().display(),
        run_dir = run_dir.display(),
        etc = etc.display(),
        etc_mount = Path::new(&k("configFile")).parent().unwrap().display(),
        caps = caps.join(","),
    );
    let mut cmd = node.command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script, "sh", &command[2]]);
    let mut container = cpha_lab::netns::Child::spawn(cmd, "the keepalived container").unwrap();
    assert_eq!(
        container.stdout_line(Duration::from_secs(10)).unwrap(),
        format!("waiting for cpha to write {}", k("configFile")),
        "the container waits for cpha's file"
    );
    // The sidecar writes keepalived.conf.
    let mut render = node.command(env!("CARGO_BIN_EXE_cpha"));
    render.args(["render", "--keepalived", "--config"]).arg(root().join("examples/config-daemonset.yaml"));
    let rendered = run(&mut render);
    assert!(rendered.ok(), "cpha render --keepalived:\n{}", rendered.both());
    std::fs::write(etc.join(Path::new(&k("configFile")).file_name().unwrap()), &rendered.stdout).unwrap();

    let held =
        cpha_lab::netns::wait_for("the keepalived container to take 192.0.2.10", Duration::from_secs(20), || {
            let out = node.ip(&["-o", "address", "show", "to", "192.0.2.10"])?;
            Ok((!out.trim().is_empty()).then_some(out))
        });
    let pid_file = run_dir.join(Path::new(&k("pidFile")).file_name().unwrap());
    let pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
    let status = container.stop(Duration::from_secs(5));
    assert!(held.is_ok(), "{held:?}");
    assert_eq!(
        pid.trim(),
        container.pid().to_string(),
        "keepalived's pid file ({}) names the container's keepalived",
        k("pidFile")
    );
    assert!(status.is_ok(), "{status:?}");
    // Stopped, it gives the address back.
    assert!(node.ip(&["-o", "address", "show", "to", "192.0.2.10"]).unwrap().trim().is_empty());
    let states = std::fs::read_to_string(fifo.with_extension("fifo.log")).unwrap_or_default();
    assert!(states.contains("INSTANCE \"cpha\" MASTER"), "keepalived reported no MASTER state: {states:?}");
}
