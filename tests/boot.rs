//! The deployment files booted for real: Debian 12 machines (`systemd-nspawn --boot`, systemd as
//! PID 1) inside network namespaces this test makes, each seeded through cloud-init's NoCloud
//! datasource (`/var/lib/cloud/seed/nocloud/`) with the repository's own `cloud-init/*.yaml`
//! and the cpha just built. systemd, the unit's sandbox, cloud-init's module order, HAProxy with
//! the drop-in, nftables and cpha are the real ones; kubeadm and the apiservers are test doubles
//! (`tests/boot/doubles/`: kubeadm cannot be installed here), and the cluster's store is one
//! kube-standin outside the machines, in the role of etcd.
//!
//! ```text
//!   hub namespace: bridge 192.0.2.1/24, the store (kube-standin) on 192.0.2.1:2379;
//!                  the endpoint 192.0.2.10 is the virtual IP one machine's keepalived holds
//!     ├── veth ── cp1 192.0.2.11  (cloud-init/init.yaml)
//!     ├── veth ── cp2 192.0.2.12  (cloud-init/join.yaml)
//!     └── veth ── cp3 192.0.2.13  (cloud-init/join.yaml)
//! ```
//!
//! The addresses are the ones the cloud-init files ship with (the documentation range), so the
//! seeds are the files as they are, with only the secrets filled in. The root filesystem is
//! built once by `tests/boot/rootfs` and cached outside the clone; every machine boots an
//! overlay of it, so nothing a machine writes reaches the cache.
//!
//! The scenarios, one test each: the host shape forms the endpoint (1), one of its machines is
//! rebooted (2), the external LB shape (3; its apiservers are three stand-ins in the hub on
//! 192.0.2.11..13 and two LB machines share 192.0.2.10), the removal of `docs/deployment.md` (4),
//! a template with a regex under the unit's sandbox (5), and `cpha run`'s VIP actuator under the
//! unit's sandbox with keepalived.service and its drop-in (6).
//!
//! NOTE: `--network-namespace-path` alone leaves the machine without CAP_NET_ADMIN and with a
//! read-only /proc/sys/net (systemd 252); with `--private-network` as well it keeps both, as a
//! host has them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cpha_lab::netns::{self, Child, Netns};

const ENDPOINT: &str = "192.0.2.10:8443";
const STORE: &str = "192.0.2.1:2379";
/// kubeadm's token and certificate-key formats; the doubles check only that they are given.
const TOKEN: &str = "abcdef.0123456789abcdef";
const CERTIFICATE_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
/// What an image may already have in the kubelet's environment file: kept by cpha-bootstrap.
const IMAGE_KUBELET_ARGS: &str = "--image-gc-high-threshold=90";

/// Longest wait for one machine's cloud-init to finish (kubeadm's doubles wait up to 4 min).
const CLOUD_INIT_TIMEOUT: Duration = Duration::from_secs(360);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Runs a host program to completion; a non-zero exit is an error carrying its output.
fn run(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what}: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cached root filesystem (built by `tests/boot/rootfs` on first use).
fn rootfs() -> Result<PathBuf> {
    let out = run(&mut Command::new(root().join("tests/boot/rootfs")))?;
    let path = PathBuf::from(out.lines().last().unwrap_or_default().trim());
    ensure!(path.join(".complete").exists(), "tests/boot/rootfs printed {path:?}, which is not a built root");
    Ok(path)
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Replaces the one line `from` of a cloud-init file with `to`: the file must have it exactly
/// once, so a seed never silently keeps a value the test meant to set.
fn set_line(text: &str, from: &str, to: &str) -> String {
    let n = text.lines().filter(|l| l.trim() == from).count();
    assert_eq!(n, 1, "expected one line {from:?}, found {n}");
    text.lines()
        .map(|l| if l.trim() == from { l.replace(from, to) } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

// ---------------------------------------------------------------------------------------------
// The network and the store

/// The hub namespace with its bridge, and the cluster's store (kube-standin).
struct Net {
    hub: Netns,
    dir: PathBuf,
    store: Option<Child>,
}

impl Net {
    fn new() -> Result<Net> {
        cpha_lab::require_root!();
        let hub = Netns::new("cphaboot-hub")?;
        hub.ip(&["link", "add", "br0", "type", "bridge"])?;
        hub.ip(&["addr", "add", "192.0.2.1/24", "dev", "br0"])?;
        hub.ip(&["link", "set", "br0", "up"])?;
        let dir = std::env::temp_dir().join(format!("cpha-boot-{}", hub.name()));
        std::fs::create_dir_all(&dir)?;
        Ok(Net { hub, dir, store: None })
    }

    /// Starts the store on 192.0.2.1:2379: one CA, an admin token, a kubeconfig whose server is
    /// the endpoint (what kubeadm writes into admin.conf).
    fn start_store(&mut self) -> Result<()> {
        let standin = netns::require_bin("kube-standin")?;
        let certs = self.dir.join("store");
        let kubeconfig = format!("{}:admin", self.dir.join("admin.conf").display());
        let mut child = self.hub.spawn(
            &standin,
            &[
                "--listen",
                STORE,
                "--cert-dir",
                certs.to_str().unwrap(),
                "--san",
                "192.0.2.1,192.0.2.10,192.0.2.11,192.0.2.12,192.0.2.13",
                "--token",
                "admin:boot-test-admin:*/*",
                "--write-kubeconfig",
                &kubeconfig,
                "--kubeconfig-server",
                &format!("https://{ENDPOINT}"),
                "--endpoints",
                "192.0.2.11,192.0.2.12,192.0.2.13",
                "--log",
                "warn",
            ],
        )?;
        child.stdout_line(Duration::from_secs(30)).context("the store (kube-standin) did not start")?;
        self.store = Some(child);
        Ok(())
    }

    /// Three apiservers outside the cluster's hosts, on 192.0.2.11..13:6443 of the hub (for the
    /// external LB shape): stand-ins sharing one CA, each publishing the three in
    /// `default/kubernetes`, with the token of the LB's account (deploy/external-lb-rbac.yaml's
    /// rules: read that EndpointSlice, record Events).
    fn start_apiservers(&mut self) -> Result<Vec<Child>> {
        let standin = netns::require_bin("kube-standin")?;
        let certs = self.dir.join("store");
        let mut all = Vec::new();
        for ip in ["192.0.2.11", "192.0.2.12", "192.0.2.13"] {
            self.hub.ip(&["addr", "add", &format!("{ip}/24"), "dev", "br0"])?;
            let mut child = self.hub.spawn(
                &standin,
                &[
                    "--listen",
                    &format!("{ip}:6443"),
                    "--cert-dir",
                    certs.to_str().unwrap(),
                    "--san",
                    "192.0.2.10,192.0.2.11,192.0.2.12,192.0.2.13",
                    "--token",
                    "cpha-external-lb:boot-test-lb:get,list,watch/endpointslices.discovery.k8s.io/default/kubernetes;create,patch/events.events.k8s.io",
                    "--endpoints",
                    "192.0.2.11,192.0.2.12,192.0.2.13",
                    "--log",
                    "warn",
                ],
            )?;
            child
                .stdout_line(Duration::from_secs(30))
                .with_context(|| format!("the apiserver on {ip} did not start"))?;
            all.push(child);
        }
        Ok(all)
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("store/ca.crt")
    }

    /// `sha256:<hex>` of the CA's public key, as `kubeadm join --discovery-token-ca-cert-hash`.
    fn ca_hash(&self) -> Result<String> {
        let script = "openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform der | sha256sum";
        let out = run(Command::new("sh").args(["-c", script, "sh"]).arg(self.ca()))?;
        Ok(format!("sha256:{}", out.split_whitespace().next().unwrap_or_default()))
    }

    /// kubectl from the hub against the store directly (not through the endpoint).
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let kubeconfig = self.dir.join("admin.conf");
        let mut all = vec!["--kubeconfig", kubeconfig.to_str().unwrap(), "--server", "https://192.0.2.1:2379"];
        all.extend_from_slice(args);
        self.hub.run("kubectl", &all)
    }

    /// `GET https://ENDPOINT/readyz` from the hub, verified with the cluster CA.
    fn endpoint_readyz(&self) -> Result<String> {
        self.readyz(ENDPOINT)
    }

    /// `GET https://ADDR/readyz` from the hub, verified with the cluster CA.
    fn readyz(&self, addr: &str) -> Result<String> {
        let ca = self.ca();
        self.hub.run(
            "curl",
            &[
                "--silent",
                "--show-error",
                "--fail",
                "--max-time",
                "3",
                "--cacert",
                ca.to_str().unwrap(),
                &format!("https://{addr}/readyz"),
            ],
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut store) = self.store.take() {
            let _ = store.stop(Duration::from_secs(2));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Machines

static MACHINES: AtomicU32 = AtomicU32::new(0);

/// One booted machine: its own network namespace (a veth to the hub's bridge), an overlay of the
/// cached root filesystem, and the `systemd-nspawn --boot` process. Dropping it powers the
/// machine off (SIGKILL after 60 s), unmounts the overlay and deletes the namespace.
struct Machine {
    name: String,
    ns: Netns,
    dir: PathBuf,
    nspawn: Option<std::process::Child>,
    mounted: bool,
}

impl Machine {
    /// A machine named `name` with `ip`/24 on the hub's bridge (when `net` is given), its root
    /// prepared but not booted.
    fn new(net: Option<&Net>, name: &str, ip: &str) -> Result<Machine> {
        cpha_lab::require_root!();
        let lower = rootfs()?;
        let ns = Netns::new(&format!("cphaboot-{name}"))?;
        let dir = PathBuf::from("/var/tmp").join(format!("{}-{}", ns.name(), MACHINES.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["upper", "work", "root"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mut m = Machine { name: name.to_string(), ns, dir, nspawn: None, mounted: false };
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            m.dir.join("upper").display(),
            m.dir.join("work").display()
        );
        run(Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(m.root()))?;
        m.mounted = true;
        if let Some(net) = net {
            let (_, hub_end) = netns::veth_pair(&m.ns, &[&format!("{ip}/24")], &net.hub, &[])?;
            net.hub.ip(&["link", "set", &hub_end, "master", "br0"])?;
        }
        // What the test installs into the image: the cpha just built (cloud-init's `cpha-bootstrap
        // install` finds it pre-installed, CPHA_URL being empty), and the kubeadm doubles.
        let root = m.root();
        std::fs::copy(env!("CARGO_BIN_EXE_cpha"), root.join("usr/local/bin/cpha"))?;
        std::fs::copy(root_file("tests/boot/doubles/kubeadm"), root.join("usr/local/bin/kubeadm"))?;
        std::fs::copy(
            root_file("tests/boot/doubles/kube-apiserver-double.service"),
            root.join("etc/systemd/system/kube-apiserver-double.service"),
        )?;
        write(&root.join("etc/default/kubelet"), &format!("KUBELET_EXTRA_ARGS={IMAGE_KUBELET_ARGS}\n"), 0o644)?;
        // The cluster's store, for the kubeadm double, where this test runs one.
        if let Some(net) = net.filter(|n| n.store.is_some()) {
            let d = root.join("etc/kubeadm-double");
            write(&d.join("store"), &format!("{STORE}\n"), 0o644)?;
            std::fs::copy(net.ca(), d.join("ca.crt"))?;
            std::fs::copy(net.dir.join("admin.conf"), d.join("admin.conf"))?;
        }
        write(&root.join("etc/hostname"), &format!("{name}\n"), 0o644)?;
        Ok(m)
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The NoCloud seed cloud-init reads at the first boot.
    fn seed(&self, user_data: &str) -> Result<()> {
        let seed = self.root().join("var/lib/cloud/seed/nocloud");
        write(
            &seed.join("meta-data"),
            &format!("instance-id: {}\nlocal-hostname: {}\n", self.ns.name(), self.name),
            0o600,
        )?;
        write(&seed.join("user-data"), user_data, 0o600)
    }

    fn boot(&mut self) -> Result<()> {
        ensure!(self.nspawn.is_none(), "{} is running", self.name);
        let console = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("console.log"))?;
        let child = Command::new("systemd-nspawn")
            .args(["--quiet", "--boot", "--register=no", "--keep-unit"])
            .arg(format!("--machine={}", self.ns.name()))
            .arg(format!("--directory={}", self.root().display()))
            .arg(format!("--network-namespace-path=/run/netns/{}", self.ns.name()))
            // With a network of its own (the namespace above) the machine keeps CAP_NET_ADMIN and
            // a writable /proc/sys/net, as a real host: nftables rules, net.ipv4.ip_forward.
            .arg("--private-network")
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()
            .context("starting systemd-nspawn (apt-get install systemd-container)")?;
        self.nspawn = Some(child);
        // systemd up to the point where its manager answers.
        netns::wait_for(&format!("{} to boot", self.name), Duration::from_secs(90), || {
            if let Some(status) = self.nspawn.as_mut().unwrap().try_wait()? {
                bail!("systemd-nspawn of {} exited: {status}\n{}", self.name, self.console_tail());
            }
            Ok(match self.sh("systemctl is-system-running") {
                Ok((_, out)) if ["running", "degraded"].contains(&out.trim()) => Some(()),
                _ => None,
            })
        })
    }

    /// Powers the machine off (systemd-nspawn turns SIGTERM into the container's poweroff).
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.nspawn.take() else { return Ok(()) };
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("{} did not power off within 60 s: killed", self.name)
    }

    /// The machine's PID 1 (seen from the host): the nspawn child whose pid namespace calls it 1.
    fn leader(&self) -> Result<u32> {
        let nspawn = self.nspawn.as_ref().ok_or_else(|| anyhow!("{} is not running", self.name))?.id();
        for entry in std::fs::read_dir("/proc")? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Ok(pid) = name.parse::<u32>() else { continue };
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
            let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
            let ns_pids: Vec<String> =
                field("NSpid:").unwrap_or_default().split_whitespace().map(String::from).collect();
            if field("PPid:").as_deref() == Some(&nspawn.to_string())
                && ns_pids.len() >= 2
                && ns_pids.last().unwrap() == "1"
            {
                return Ok(pid);
            }
        }
        bail!("{}: no container init under systemd-nspawn {nspawn}", self.name)
    }

    /// Runs a shell command inside the machine (all its namespaces, its root); returns the exit
    /// code and stdout (stderr is appended to stdout, for error messages).
    fn sh(&self, script: &str) -> Result<(i32, String)> {
        let leader = self.leader()?.to_string();
        let out = Command::new("nsenter")
            .args(["-t", &leader, "-m", "-u", "-i", "-n", "-p", "-r", "-w", "--", "/usr/bin/env", "-i"])
            .args(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"])
            .args(["/bin/sh", "-c", script])
            .stdin(Stdio::null())
            .output()?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.code().unwrap_or(-1), text))
    }

    /// [`Machine::sh`] that must succeed.
    fn ok(&self, script: &str) -> Result<String> {
        let (code, out) = self.sh(script)?;
        ensure!(code == 0, "{}: `{script}` exited {code}:\n{out}", self.name);
        Ok(out)
    }

    /// Waits for cloud-init to finish; its status must be `done`.
    fn wait_cloud_init(&self, timeout: Duration) -> Result<()> {
        let status = netns::wait_for(&format!("cloud-init on {}", self.name), timeout, || {
            let (_, out) = self.sh("cloud-init status")?;
            Ok(["status: done", "status: error"].iter().find(|s| out.contains(**s)).map(|s| s.to_string()))
        })
        .with_context(|| self.diagnostics())?;
        ensure!(status == "status: done", "cloud-init on {} ended with {status}\n{}", self.name, self.diagnostics());
        // cloud-init only warns about a configuration its schema refuses, and goes on.
        let (_, log) =
            self.sh("grep -h 'Invalid cloud-config' /var/log/cloud-init.log /var/log/cloud-init-output.log")?;
        ensure!(log.trim().is_empty(), "cloud-init on {} found its configuration invalid:\n{log}", self.name);
        Ok(())
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// What a failing assertion shows about this machine.
    fn diagnostics(&self) -> String {
        let script = "tail -n 40 /var/log/cloud-init-output.log; cloud-init schema --system 2>&1 | tail -n 5; \
                      systemctl --failed --no-legend; cpha status 2>&1 | head -n 20; \
                      journalctl -b --no-pager -n 60 -u cpha -u haproxy -u keepalived -u kube-apiserver-double; \
                      journalctl -b --no-pager -n 20 -t kubeadm-double";
        match self.sh(script) {
            Ok((_, out)) => format!("--- {}:\n{out}", self.name),
            Err(err) => format!("--- {}: {err:#}\n{}", self.name, self.console_tail()),
        }
    }

    /// The boot's journal as JSON entries, in order.
    fn journal(&self) -> Result<Vec<serde_json::Value>> {
        let out = self.ok("journalctl -b -o json --no-pager")?;
        Ok(out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }

    /// The agent's state from `cpha status --json` inside the machine.
    fn agent(&self) -> Result<serde_json::Value> {
        let out = self.ok("cpha status --json")?;
        let v: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("cpha status --json: {out}"))?;
        Ok(v["agent"].clone())
    }

    /// Until the members come from the live source (not the seed or the cache).
    fn wait_live_members(&self, timeout: Duration) -> Result<serde_json::Value> {
        netns::wait_for(&format!("cpha on {} to follow its member source", self.name), timeout, || {
            let agent = self.agent()?;
            let origin = agent["members_origin"].as_str().unwrap_or_default();
            Ok((!["seed", "cache", "none yet", ""].contains(&origin)).then_some(agent))
        })
        .with_context(|| self.diagnostics())
    }

    fn wait_phase(&self, phase: &str, timeout: Duration) -> Result<serde_json::Value> {
        netns::wait_for(&format!("cpha on {} to be {phase}", self.name), timeout, || {
            let agent = self.agent()?;
            Ok((agent["phase"] == phase).then_some(agent))
        })
        .with_context(|| self.diagnostics())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("boot: {err:#}");
        }
        if self.mounted {
            if let Err(err) = run(Command::new("umount").arg(self.root())) {
                eprintln!("boot: {err:#}");
                let _ = run(Command::new("umount").arg("-l").arg(self.root()));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn root_file(rel: &str) -> PathBuf {
    root().join(rel)
}

fn message(e: &serde_json::Value) -> &str {
    e["MESSAGE"].as_str().unwrap_or_default()
}

/// Index of the first journal entry matching `f`, or an error naming `what`.
fn first(journal: &[serde_json::Value], what: &str, f: impl Fn(&serde_json::Value) -> bool) -> Result<usize> {
    journal.iter().position(f).ok_or_else(|| anyhow!("no journal entry for {what}"))
}

/// The seeds of the host shape: the repository's files with the secrets filled in.
fn host_shape_seeds(net: &Net) -> Result<(String, String)> {
    let mut init = read("cloud-init/init.yaml");
    let mut join = read("cloud-init/join.yaml");
    for text in [&mut init, &mut join] {
        *text = set_line(text, "KUBEADM_TOKEN=", &format!("KUBEADM_TOKEN={TOKEN}"));
        *text = set_line(text, "KUBEADM_CERTIFICATE_KEY=", &format!("KUBEADM_CERTIFICATE_KEY={CERTIFICATE_KEY}"));
    }
    join = set_line(&join, "KUBEADM_CA_CERT_HASH=", &format!("KUBEADM_CA_CERT_HASH={}", net.ca_hash()?));
    Ok((init, join))
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Scenario 1: three control-plane hosts boot from `init.yaml` and `join.yaml` and form the
/// endpoint: cpha is READY before kubeadm starts on each, HAProxy takes the endpoint, the member
/// ConfigMap is applied and followed, and the `systemd` reload method reloads HAProxy.
#[test]
fn booted_host_shape_three_machines_form_the_endpoint() -> Result<()> {
    let (net, machines) = host_shape_cluster()?;
    for m in &machines {
        // The order, from the journal: systemd reports cpha.service started (Type=notify: only
        // after READY=1) before the kubeadm double logs its start.
        let journal = m.journal()?;
        let ready = first(&journal, "cpha.service started", |e| {
            e["UNIT"] == "cpha.service" && e["MESSAGE_ID"] == "39f53479d3a045ac8e11786248231fbf"
        })?;
        let kubeadm = first(&journal, "kubeadm starting", |e| {
            e["SYSLOG_IDENTIFIER"] == "kubeadm-double" && message(e).contains(": starting")
        })?;
        ensure!(ready < kubeadm, "{}: kubeadm started (entry {kubeadm}) before cpha was READY (entry {ready})", m.name);
        // The image's own kubelet arguments survive, in one line with --node-ip.
        let kubelet = m.ok("grep '^KUBELET_EXTRA_ARGS=' /etc/default/kubelet")?;
        ensure!(kubelet.lines().count() == 1, "{}: /etc/default/kubelet:\n{kubelet}", m.name);
        ensure!(
            kubelet.contains(IMAGE_KUBELET_ARGS) && kubelet.contains("--node-ip=192.0.2.1"),
            "{}: /etc/default/kubelet lost an argument:\n{kubelet}",
            m.name
        );
    }
    // HAProxy took the endpoint on every host (host_shape_cluster waited for it), with the three
    // members of the ConfigMap: created by cp1's registration, the others added by theirs, none
    // written by hand.
    let cm =
        net.kubectl(&["-n", "kube-system", "get", "configmap", "cpha-members", "-o", "jsonpath={.data.members}"])?;
    ensure!(
        cm == "cp1=192.0.2.11:6443\ncp2=192.0.2.12:6443\ncp3=192.0.2.13:6443\n",
        "the hosts did not register themselves: {cm:?}"
    );
    let (code, _) = machines[0].sh("test -e /etc/cpha/members-configmap.yaml")?;
    ensure!(code != 0, "cp1 carries a member list written by hand");
    // Each agent runs on its own ServiceAccount token, not on kubeadm's admin credentials.
    net.kubectl(&["-n", "kube-system", "get", "serviceaccount", "cpha"])?;
    for m in &machines {
        let mode = m.ok("stat -c %a /var/lib/cpha/token")?;
        ensure!(mode.trim() == "600", "{}: /var/lib/cpha/token has mode {mode}", m.name);
        let (_, log) = m.sh("journalctl -b -u cpha.service --no-pager -o cat")?;
        ensure!(
            log.lines().any(|l| l.contains("credentials found") && l.contains("token file /var/lib/cpha/token")),
            "{}: the agent did not use its own token:\n{}",
            m.name,
            log.lines().filter(|l| l.contains("credential")).collect::<Vec<_>>().join("\n")
        );
        // The renewal task runs under the unit's sandbox and read the token's expiry (it looks
        // for the file every kubernetes.pollInterval, 2 s).
        let planned = "token for ServiceAccount kube-system/cpha expires at";
        let mut log = log;
        for _ in 0..10 {
            if log.contains(planned) {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            log = m.sh("journalctl -b -u cpha.service --no-pager -o cat")?.1;
        }
        ensure!(
            log.contains(planned),
            "{}: the agent does not plan the renewal of its token:\n{}",
            m.name,
            log.lines().filter(|l| l.contains("token")).collect::<Vec<_>>().join("\n")
        );
    }
    // From a client outside the control plane, through the virtual IP: exactly one machine
    // holds it, and the hub's connection went to that machine (its MAC answered for the VIP).
    let holder = vip_holder(&machines)?;
    ensure!(net.endpoint_readyz()?.trim() == "ok");
    ensure_hub_reaches(&net, &machines[holder])?;
    // cpha's own account agrees with the kernel: the holder says so and is VRRP master, the
    // others are backups.
    for (i, m) in machines.iter().enumerate() {
        netns::wait_for(
            &format!("{}'s /status to show the VIP as the kernel has it", m.name),
            Duration::from_secs(20),
            || {
                let vip = m.agent()?["vip"].clone();
                let want = if i == holder { (true, "master") } else { (false, "backup") };
                Ok((vip["held"].as_bool() == Some(want.0) && vip["vrrp_state"] == want.1).then_some(()))
            },
        )
        .with_context(|| m.diagnostics())?;
    }
    // HAProxy logs its connections into the journal (the built-in haproxy.cfg has `log`).
    let cp1 = &machines[0];
    netns::wait_for("an HAProxy connection log line on cp1", Duration::from_secs(20), || {
        let (_, out) = cp1.sh("journalctl -b -u haproxy --no-pager -o cat")?;
        Ok(out.lines().any(|l| l.contains("kube-apiserver kube-apiservers/cp")).then_some(()))
    })
    .with_context(|| cp1.diagnostics())?;
    // The ConfigMap is followed: without cp3, every HAProxy serves two members.
    net.kubectl(&[
        "-n",
        "kube-system",
        "patch",
        "configmap",
        "cpha-members",
        "--type=merge",
        "-p",
        r#"{"data":{"members":"cp1=192.0.2.11:6443\ncp2=192.0.2.12:6443\n"}}"#,
    ])?;
    for m in &machines {
        netns::wait_for(&format!("{} to drop cp3", m.name), Duration::from_secs(30), || {
            let agent = m.agent()?;
            Ok((agent["members"].as_array().map(Vec::len) == Some(2)).then_some(()))
        })
        .with_context(|| m.diagnostics())?;
        // HAProxy follows: cp3 drained (no new connections) or already deleted.
        netns::wait_for(&format!("{}'s HAProxy to withdraw cp3", m.name), Duration::from_secs(30), || {
            Ok(match server(m, "cp3")? {
                None => Some(()),
                Some((_, admin)) => (admin != 0).then_some(()),
            })
        })
        .with_context(|| m.diagnostics())?;
    }

    // The systemd reload method, for real: a change outside the server list reloads HAProxy
    // through `systemctl reload haproxy.service`, from inside cpha's sandbox.
    let cp2 = &machines[1];
    let reloaded = |m: &Machine| -> Result<usize> {
        let (_, out) = m.sh("journalctl -b -u haproxy.service --no-pager -o cat")?;
        Ok(out.lines().filter(|l| l.starts_with("Reloaded")).count())
    };
    let before = reloaded(cp2)?;
    cp2.ok(
        "sed -i 's|^haproxy:$|haproxy:\\n  reload: systemd\\n  hardStopAfter: 7m|' /etc/cpha/config.yaml && systemctl reload cpha.service",
    )?;
    netns::wait_for("cpha on cp2 to reload HAProxy through systemd", Duration::from_secs(60), || {
        let (_, cfg) = cp2.sh("grep -c 'hard-stop-after 7m' /etc/haproxy/haproxy.cfg")?;
        Ok((reloaded(cp2)? > before && cfg.trim() == "1").then_some(()))
    })
    .with_context(|| cp2.diagnostics())?;
    let metrics = cp2.ok("curl -s http://127.0.0.1:9966/metrics")?;
    ensure!(
        metrics.lines().any(|l| l.starts_with("cpha_reloads_total{result=\"ok\"}") && !l.ends_with(" 0")),
        "cp2: no successful reload counted:\n{}",
        metrics.lines().filter(|l| l.contains("reload")).collect::<Vec<_>>().join("\n")
    );
    cp2.wait_phase("balanced", Duration::from_secs(30))?;
    ensure!(net.endpoint_readyz()?.trim() == "ok");
    Ok(())
}

/// The one machine that holds the virtual IP 192.0.2.10, waited for; two holding it is an error.
fn vip_holder(machines: &[Machine]) -> Result<usize> {
    netns::wait_for("exactly one machine to hold the virtual IP 192.0.2.10", Duration::from_secs(30), || {
        let mut holders = Vec::new();
        for (i, m) in machines.iter().enumerate() {
            if !m.ok("ip -o address show to 192.0.2.10")?.trim().is_empty() {
                holders.push(i);
            }
        }
        Ok((holders.len() == 1).then(|| holders[0]))
    })
    .with_context(|| machines.iter().map(Machine::diagnostics).collect::<Vec<_>>().join("\n"))
}

/// The hub's last connection to the virtual IP went to `holder`: the hub's neighbour entry for
/// 192.0.2.10 is the MAC address of the holder's interface.
fn ensure_hub_reaches(net: &Net, holder: &Machine) -> Result<()> {
    let mac = holder.ok("cat /sys/class/net/$(ip -o address show to 192.0.2.10 | awk '{ print $2; exit }')/address")?;
    let neigh = net.hub.ip(&["neigh", "show", "192.0.2.10"])?;
    ensure!(
        neigh.contains(mac.trim()),
        "the hub reached 192.0.2.10 at {neigh:?}, not at {} ({})",
        holder.name,
        mac.trim()
    );
    Ok(())
}

/// Three control-plane hosts booted from `init.yaml` (cp1) and `join.yaml` (cp2, cp3), each
/// waited for until cloud-init is done and cpha has handed the endpoint to HAProxy with the
/// members from the ConfigMap. The hub routes the endpoint to cp1.
fn host_shape_cluster() -> Result<(Net, Vec<Machine>)> {
    let mut net = Net::new()?;
    net.start_store()?;
    let (init, join) = host_shape_seeds(&net)?;
    let mut machines = Vec::new();
    for (name, ip, seed) in [("cp1", "192.0.2.11", &init), ("cp2", "192.0.2.12", &join), ("cp3", "192.0.2.13", &join)] {
        let m = Machine::new(Some(&net), name, ip)?;
        m.seed(seed)?;
        machines.push(m);
    }
    // Clients that are not control-plane hosts reach the endpoint through the virtual IP
    // (vip: in the shipped configuration): no route of the test's points at a machine.
    let started = Instant::now();
    for m in &mut machines {
        m.boot()?;
    }
    for m in &machines {
        m.wait_cloud_init(CLOUD_INIT_TIMEOUT)?;
    }
    eprintln!("boot: three machines booted and ran cloud-init in {:?}", started.elapsed());
    for m in &machines {
        m.wait_phase("balanced", Duration::from_secs(90))?;
        let agent = m.wait_live_members(Duration::from_secs(60))?;
        ensure!(agent["members"].as_array().map(Vec::len) == Some(3), "{}: members {}", m.name, agent["members"]);
    }
    Ok((net, machines))
}

/// Scenario 2: one machine (cp3) powered off and booted again. The endpoint keeps answering from
/// the others; cp3 comes back by itself (cpha, HAProxy and its apiserver are enabled units;
/// cloud-init does not run again) and rejoins: every HAProxy has it UP again.
#[test]
fn booted_host_shape_a_rebooted_machine_rejoins() -> Result<()> {
    let (net, mut machines) = host_shape_cluster()?;
    let cp1 = &machines[0];
    netns::wait_for("cp1's HAProxy to have cp3 UP", Duration::from_secs(30), || {
        Ok((server_state(cp1, "cp3")? == Some(2)).then_some(()))
    })
    .with_context(|| cp1.diagnostics())?;
    let mut failures = Vec::new();
    let probe = |failures: &mut Vec<String>| {
        if let Err(err) = net.endpoint_readyz() {
            failures.push(format!("{err:#}"));
        }
    };
    machines[2].stop()?;
    let down = Instant::now();
    while server_state(&machines[0], "cp3")? == Some(2) {
        ensure!(down.elapsed() < Duration::from_secs(20), "cp1's HAProxy still has cp3 UP 20 s after it powered off");
        probe(&mut failures);
        std::thread::sleep(Duration::from_millis(250));
    }
    for _ in 0..20 {
        probe(&mut failures);
        std::thread::sleep(Duration::from_millis(100));
    }
    let restarted = Instant::now();
    machines[2].boot()?;
    let cp3 = &machines[2];
    cp3.wait_phase("balanced", Duration::from_secs(90))?;
    let agent = cp3.wait_live_members(Duration::from_secs(60))?;
    ensure!(agent["members"].as_array().map(Vec::len) == Some(3), "cp3 after reboot: members {}", agent["members"]);
    let cp1 = &machines[0];
    netns::wait_for("cp1's HAProxy to have the rebooted cp3 UP", Duration::from_secs(30), || {
        probe(&mut failures);
        Ok((server_state(cp1, "cp3")? == Some(2)).then_some(()))
    })
    .with_context(|| cp1.diagnostics())?;
    eprintln!("boot: cp3 rebooted and rejoined in {:?}", restarted.elapsed());
    ensure!(failures.is_empty(), "the endpoint failed while cp3 rebooted:\n{}", failures.join("\n"));

    Ok(())
}

/// Scenario 4: cp2 removed exactly as docs/deployment.md says: no rule and no file of cpha's is
/// left, HAProxy runs on without the drop-in, and the endpoint still answers from cp1.
#[test]
fn booted_host_shape_removal_leaves_no_rule_and_no_file() -> Result<()> {
    let (net, machines) = host_shape_cluster()?;
    let cp2 = &machines[1];
    // Decommissioned first, as docs/deployment.md says: out of the member list, and out of every
    // other HAProxy.
    cp2.ok(&decommission_command())?;
    let cm =
        net.kubectl(&["-n", "kube-system", "get", "configmap", "cpha-members", "-o", "jsonpath={.data.members}"])?;
    ensure!(cm == "cp1=192.0.2.11:6443\ncp3=192.0.2.13:6443\n", "cp2 is still listed: {cm:?}");
    let cp1 = &machines[0];
    netns::wait_for("cp1's HAProxy to withdraw cp2", Duration::from_secs(30), || {
        Ok(match server(cp1, "cp2")? {
            None => Some(()),
            Some((_, admin)) => (admin != 0).then_some(()),
        })
    })
    .with_context(|| cp1.diagnostics())?;
    let removal = removal_commands();
    for command in &removal {
        cp2.ok(command)?;
    }
    let (_, tables) = cp2.sh("nft list tables")?;
    ensure!(!tables.contains("cpha"), "cp2: a cpha table is left:\n{tables}");
    let (_, saved) = cp2.sh("iptables-save; ip6tables-save")?;
    ensure!(!saved.to_lowercase().contains("cpha"), "cp2: an iptables rule of cpha's is left:\n{saved}");
    let paths: Vec<&str> = removal
        .iter()
        .filter(|c| c.starts_with("rm "))
        .flat_map(|c| c.split_whitespace().skip(1))
        .filter(|w| w.starts_with('/'))
        .collect();
    ensure!(paths.len() >= 6, "the removal in docs/deployment.md names {paths:?}");
    for path in &paths {
        let (code, _) = cp2.sh(&format!("test -e {path}"))?;
        ensure!(code != 0, "cp2: {path} is left after the removal");
    }
    let (code, out) = cp2.sh("systemctl cat cpha.service")?;
    ensure!(code != 0, "cp2: systemd still knows cpha.service:\n{out}");
    cp2.ok("systemctl is-active haproxy.service")?;
    let (_, drop_in) = cp2.sh("systemctl show -p DropInPaths --value haproxy.service")?;
    ensure!(!drop_in.contains("cpha"), "cp2: HAProxy still runs with cpha's drop-in: {drop_in}");
    ensure!(net.endpoint_readyz()?.trim() == "ok");
    Ok(())
}

/// The command of docs/deployment.md's "Decommissioning a control-plane host" that takes the
/// host out of the member list (the one line starting with `cpha-bootstrap deregister`).
fn decommission_command() -> String {
    let doc = read("docs/deployment.md");
    let section =
        &doc[doc.find("**Decommissioning a control-plane host.**").expect("docs/deployment.md: decommissioning")..];
    let lines: Vec<&str> =
        section.lines().map(str::trim).filter(|l| l.starts_with("cpha-bootstrap deregister")).collect();
    assert!(!lines.is_empty(), "docs/deployment.md's decommissioning names no `cpha-bootstrap deregister`");
    lines[0].split(" #").next().unwrap_or_default().trim().to_string()
}

/// The shell commands of the `sh` blocks in docs/deployment.md's "Removing cpha" section, one
/// per line, comments dropped, up to the section's prose about the DaemonSet.
fn removal_commands() -> Vec<String> {
    let doc = read("docs/deployment.md");
    let section = &doc[doc.find("## Removing cpha").expect("docs/deployment.md: ## Removing cpha")..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut out = Vec::new();
    let mut inside = false;
    for line in section.lines() {
        if line.starts_with("```") {
            inside = !inside;
            continue;
        }
        if inside {
            let command = line.split(" #").next().unwrap_or_default().trim();
            if !command.is_empty() {
                out.push(command.to_string());
            }
        }
    }
    assert!(out.len() >= 3, "docs/deployment.md's removal has {out:?}");
    out
}

/// The operational state HAProxy's Runtime API reports for a server of the apiserver backend
/// on machine `m` (`show servers state`: 0 stopped, 2 running), or None when it has none.
fn server_state(m: &Machine, name: &str) -> Result<Option<u32>> {
    Ok(server(m, name)?.map(|(op, _)| op))
}

/// `(srv_op_state, srv_admin_state)` of a server of the apiserver backend on `m`, from
/// `show servers state`; admin flags: 0x01.. maintenance, 0x08/0x10 drain.
fn server(m: &Machine, name: &str) -> Result<Option<(u32, u32)>> {
    let out = m.ok("echo 'show servers state kube-apiservers' | socat - UNIX-CONNECT:/run/haproxy/admin.sock")?;
    let Some(f) = out.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|f| f.len() > 6 && f[3] == name)
    else {
        return Ok(None);
    };
    // A state that does not parse is an error, not "no such server" (which ends some waits).
    let state = |i: usize| f[i].parse::<u32>().with_context(|| format!("column {i} of {name}'s row: {f:?}"));
    Ok(Some((state(5)?, state(6)?)))
}

/// Scenario 3: the external LB shape, two hosts. lb1 (192.0.2.21) and lb2 (192.0.2.22) boot from
/// `lb.yaml` (lb2's copy naming lb1 as its VRRP peer), seed from the static list, follow
/// `default/kubernetes` once their credentials work and hand the endpoint to HAProxy (retarget:
/// the forward points at HAProxy on the host's own address). One holds the virtual IP
/// 192.0.2.10; powered off, the other takes it and the endpoint answers from there.
#[test]
fn booted_external_lb_shape_serves_the_endpoint_with_haproxy() -> Result<()> {
    let mut net = Net::new()?;
    let _apiservers = net.start_apiservers()?;
    let lb1_seed = read("cloud-init/lb.yaml");
    // The one line lb2's user-data differs in: its peer is lb1.
    let lb2_seed = set_line(&lb1_seed, "- 192.0.2.22", "- 192.0.2.21");
    let mut machines = Vec::new();
    for (name, ip, seed) in [("lb1", "192.0.2.21", &lb1_seed), ("lb2", "192.0.2.22", &lb2_seed)] {
        let m = Machine::new(Some(&net), name, ip)?;
        // What lb.yaml leaves to the operator ("copy in later"): the account's token and the CA.
        // (A static token of the stand-in, not a JWT: the agent leaves it alone, renews nothing.)
        write(&m.root().join("var/lib/cpha/kubernetes-token"), "boot-test-lb\n", 0o600)?;
        std::fs::create_dir_all(m.root().join("etc/cpha"))?;
        std::fs::copy(net.ca(), m.root().join("etc/cpha/kubernetes-ca.crt"))?;
        m.seed(seed)?;
        machines.push(m);
    }
    for m in &mut machines {
        m.boot()?;
    }
    for (m, ip) in machines.iter().zip(["192.0.2.21", "192.0.2.22"]) {
        m.wait_cloud_init(CLOUD_INIT_TIMEOUT)?;
        m.wait_phase("balanced", Duration::from_secs(90))?;
        let agent = m.wait_live_members(Duration::from_secs(60))?;
        ensure!(agent["members"].as_array().map(Vec::len) == Some(3), "{}: members {}", m.name, agent["members"]);
        // Retarget: HAProxy on the host's own address, the forward in front pointing at it.
        let listening = m.ok("ss -Hltnp 'sport = :9445'")?;
        ensure!(
            listening.contains("haproxy") && listening.contains(ip),
            "{}: HAProxy is not on {ip}:9445:\n{listening}",
            m.name
        );
        let rules = m.ok("nft list ruleset")?;
        ensure!(
            rules.contains(&format!("dnat ip to {ip}:9445")),
            "{}: the forward does not point at HAProxy:\n{rules}",
            m.name
        );
    }
    // From a client: through the virtual IP, held by exactly one of the two.
    let holder = vip_holder(&machines)?;
    let out = net.readyz("192.0.2.10:6443")?;
    ensure!(out.trim() == "ok", "{out}");
    ensure_hub_reaches(&net, &machines[holder])?;
    // The active LB host goes away: the backup takes the address and serves the endpoint.
    machines[holder].stop()?;
    let other = 1 - holder;
    netns::wait_for(&format!("{} to take the virtual IP", machines[other].name), Duration::from_secs(20), || {
        Ok((!machines[other].ok("ip -o address show to 192.0.2.10")?.trim().is_empty()).then_some(()))
    })
    .with_context(|| machines[other].diagnostics())?;
    netns::wait_for("the endpoint to answer through the backup", Duration::from_secs(20), || {
        Ok(net.readyz("192.0.2.10:6443").ok().filter(|o| o.trim() == "ok").map(|_| ()))
    })
    .with_context(|| machines[other].diagnostics())?;
    ensure_hub_reaches(&net, &machines[other])?;
    Ok(())
}

/// The repository's unit with its ExecStart replaced by `cpha check-config --config FILE`: the
/// same sandbox, as a oneshot service.
fn check_config_unit(config: &str) -> String {
    let unit = read("systemd/cpha.service");
    let mut out = String::new();
    for line in unit.lines() {
        let line = match line {
            l if l.starts_with("Type=") => "Type=oneshot".to_string(),
            l if l.starts_with("ExecStart=") => format!("ExecStart=/usr/local/bin/cpha check-config --config {config}"),
            l if l.starts_with("ExecReload=") || l.starts_with("WatchdogSec=") => continue,
            l if l.starts_with("Restart=") => "Restart=no".to_string(),
            l => l.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Scenario 5: a user template with a regex passes `cpha check-config` under the unit's sandbox
/// (HAProxy's PCRE2 JIT needs writable+executable memory: MemoryDenyWriteExecute= refused it).
#[test]
fn booted_template_with_a_regex_passes_check_config_under_the_units_sandbox() -> Result<()> {
    // On cp1's address: the configuration's vip: section is checked too (keepalived
    // --config-test under the same sandbox), and it needs the VIP's subnet on an interface.
    let net = Net::new()?;
    let mut m = Machine::new(Some(&net), "sandbox", "192.0.2.11")?;
    let root = m.root();
    let builtin = read("src/haproxy/haproxy.cfg.tera");
    let marker = "    default_backend {{ backend.name }}\n";
    assert!(builtin.contains(marker), "the built-in template changed: update this test");
    let template = builtin.replace(
        marker,
        &format!("    tcp-request inspect-delay 5s\n    tcp-request content reject if {{ req.ssl_sni -m reg ^blocked\\..* }}\n{marker}"),
    );
    write(&root.join("etc/cpha/haproxy.cfg.tera"), &template, 0o644)?;
    let config = read("examples/config-host.yaml").replace(
        "  masterSocket: /run/haproxy/master.sock\n",
        "  masterSocket: /run/haproxy/master.sock\n  template: /etc/cpha/haproxy.cfg.tera\n",
    );
    ensure!(config.contains("template: /etc/cpha"), "examples/config-host.yaml changed: update this test");
    write(&root.join("etc/cpha/regex.yaml"), &config, 0o644)?;
    write(&root.join("etc/cpha/cpha.env"), "CPHA_HAPROXY_BIND=127.0.0.1:9445\n", 0o644)?;
    write(&root.join("etc/systemd/system/cpha-check.service"), &check_config_unit("/etc/cpha/regex.yaml"), 0o644)?;
    m.boot()?;
    let (code, out) = m.sh("systemctl start cpha-check.service; journalctl -b -u cpha-check --no-pager -o cat")?;
    let result = m.ok("systemctl show -p Result --value cpha-check.service")?;
    ensure!(
        code == 0 && result.trim() == "success",
        "check-config under the unit's sandbox failed (exit {code}):\n{out}"
    );
    ensure!(!out.contains("jit compilation failed"), "{out}");
    // keepalived --config-test ran under the same sandbox, on the machine's interface.
    ensure!(out.contains("keepalived --config-test accepts the rendered file"), "{out}");
    // The sandbox is the unit's: the check ran with its capability set, not as full root.
    let caps = m.ok("systemctl show -p CapabilityBoundingSet --value cpha-check.service")?;
    ensure!(caps.trim() == "cap_net_admin", "cpha-check.service: CapabilityBoundingSet={caps}");
    Ok(())
}

/// cpha's configuration for scenario 6: the host shape's endpoint and VIP on cp1's address,
/// static members (no API: nothing here needs one), the given members.
fn vip_box_config(members: &[&str]) -> String {
    let members: String = members.iter().map(|m| format!("    - {m}\n")).collect();
    format!(
        "endpoint:\n  listen: {ENDPOINT}\n  topology: retarget\n\
         members:\n  source: static\n  static:\n{members}\
         haproxy:\n  masterSocket: /run/haproxy/master.sock\n\
         vip:\n  address: 192.0.2.10\n  virtualRouterId: 51\n  priority: 100\n"
    )
}

/// Scenario 6: cpha's own VIP actuator, `cpha run` under the repository's cpha.service and its
/// sandbox, with keepalived.service and its drop-in: cpha writes /run/cpha (the tracked health
/// file, the FIFO) and /etc/keepalived/keepalived.conf (what `cpha render --keepalived` prints,
/// checked with `keepalived --config-test`), keepalived starts from those files and takes the
/// address; a member change reloads keepalived (SIGHUP by pid file, from the sandbox); a
/// SIGKILLed keepalived that is not restarted leaves the address, and cpha removes it (`ip
/// address del` with the unit's one capability); with the drop-in's `Restart=`, systemd
/// restarts a SIGKILLed keepalived and it takes the address again; /run/cpha outlives a stop
/// of cpha.
#[test]
fn booted_cpha_drives_keepalived_under_the_units_sandbox_and_removes_what_a_killed_one_left() -> Result<()> {
    let net = Net::new()?;
    let mut m = Machine::new(Some(&net), "vipbox", "192.0.2.11")?;
    let root = m.root();
    let three = ["cp1=192.0.2.11:6443", "cp2=192.0.2.12:6443", "cp3=192.0.2.13:6443"];
    write(&root.join("etc/cpha/config.yaml"), &vip_box_config(&three), 0o644)?;
    write(&root.join("etc/cpha/cpha.env"), "CPHA_HAPROXY_BIND=192.0.2.11:9445\n", 0o644)?;
    write(&root.join("etc/systemd/system/cpha.service"), &read("systemd/cpha.service"), 0o644)?;
    write(
        &root.join("etc/systemd/system/keepalived.service.d/cpha.conf"),
        &read("systemd/keepalived.service.d/cpha.conf"),
        0o644,
    )?;
    m.boot()?;
    // The sandbox is the unit's.
    let caps = m.ok("systemctl show -p CapabilityBoundingSet --value cpha.service")?;
    ensure!(caps.trim() == "cap_net_admin", "cpha.service: CapabilityBoundingSet={caps}");
    // READY=1 comes after cpha wrote what keepalived reads.
    m.ok("timeout 120 systemctl start cpha.service").with_context(|| m.diagnostics())?;
    m.ok(
        "test -p /run/cpha/keepalived.fifo && test -s /run/cpha/vip-health && test -s /etc/keepalived/keepalived.conf",
    )
    .with_context(|| m.diagnostics())?;
    // The live file is cpha's rendering of this configuration (the template, the placement on
    // this machine's interface, the other members as unicast peers), and it was checked.
    let rendered = |m: &Machine| m.ok("cpha render --keepalived --config /etc/cpha/config.yaml 2>/dev/null");
    let live = |m: &Machine| m.ok("cat /etc/keepalived/keepalived.conf");
    let first = rendered(&m)?;
    ensure!(live(&m)? == first, "keepalived.conf is not what cpha renders:\n{}\n---\n{first}", live(&m)?);
    ensure!(first.contains("192.0.2.12") && first.contains("192.0.2.13"), "no unicast peers:\n{first}");
    let (_, journal) = m.sh("journalctl -b -u cpha.service --no-pager -o cat")?;
    // Written only after `keepalived --config-test` accepted the candidate.
    let written = "/etc/keepalived/keepalived.conf written (peers: 192.0.2.12, 192.0.2.13)";
    ensure!(journal.contains(written), "cpha did not report the checked file:\n{journal}");

    m.ok("systemctl start keepalived.service")?;
    let holds = |m: &Machine| -> Result<bool> { Ok(!m.ok("ip -o address show to 192.0.2.10")?.trim().is_empty()) };
    let wait_holds = |m: &Machine, what: &str| {
        netns::wait_for(what, Duration::from_secs(20), || Ok(holds(m)?.then_some(()))).with_context(|| m.diagnostics())
    };
    wait_holds(&m, "keepalived on vipbox to take 192.0.2.10")?;

    // A member change: cpha renders new peers, checks and swaps the file, and SIGHUPs keepalived
    // through its pid file, from the sandbox.
    let reloads = |m: &Machine| -> Result<usize> {
        let (_, out) = m.sh("journalctl -b -u keepalived.service --no-pager -o cat")?;
        Ok(out.lines().filter(|l| l.contains("Reloading")).count())
    };
    let before = reloads(&m)?;
    write(&root.join("etc/cpha/config.yaml"), &vip_box_config(&three[..2]), 0o644)?;
    m.ok("systemctl reload cpha.service")?;
    netns::wait_for("keepalived to reload after cpha's SIGHUP", Duration::from_secs(20), || {
        Ok((reloads(&m)? > before).then_some(()))
    })
    .with_context(|| m.diagnostics())?;
    let second = rendered(&m)?;
    ensure!(!second.contains("192.0.2.13"), "cp3 is still a peer in cpha's rendering:\n{second}");
    ensure!(live(&m)? == second, "keepalived.conf is not cpha's new rendering:\n{}", live(&m)?);

    // A SIGKILLed keepalived that nobody restarts leaves the address on the interface; cpha
    // notices it is gone and removes the address itself.
    let norestart = "/run/systemd/system/keepalived.service.d/norestart.conf";
    m.ok(&format!(
        "mkdir -p {dir} && printf '[Service]\\nRestart=no\\n' >{norestart} && systemctl daemon-reload",
        dir = Path::new(norestart).parent().unwrap().display()
    ))?;
    // Every keepalived process at once, by pid (`systemctl kill` races the VRRP child's own exit).
    m.ok("kill -KILL $(pidof keepalived)")?;
    netns::wait_for("cpha to remove the address the killed keepalived left", Duration::from_secs(20), || {
        let dead = m.sh("pidof keepalived")?.0 != 0;
        Ok((dead && !holds(&m)?).then_some(()))
    })
    .with_context(|| m.diagnostics())?;
    ensure!(m.sh("systemctl is-active cpha.service")?.1.trim() == "active", "{}", m.diagnostics());
    m.ok(&format!("rm {norestart} && systemctl daemon-reload && systemctl reset-failed keepalived.service"))?;
    m.ok("systemctl start keepalived.service")?;
    wait_holds(&m, "keepalived, started again, to take 192.0.2.10")?;

    // With the drop-in's Restart=, systemd restarts a SIGKILLed keepalived, which takes the
    // address again.
    let pid = m.ok("systemctl show -p MainPID --value keepalived.service")?.trim().to_string();
    m.ok("kill -KILL $(pidof keepalived)")?;
    netns::wait_for("systemd to restart the killed keepalived", Duration::from_secs(20), || {
        let now = m.ok("systemctl show -p MainPID --value keepalived.service")?.trim().to_string();
        let active = m.sh("systemctl is-active keepalived.service")?.1.trim() == "active";
        Ok((active && now != pid && now != "0").then_some(()))
    })
    .with_context(|| m.diagnostics())?;
    wait_holds(&m, "the restarted keepalived to hold 192.0.2.10")?;

    // The files stay when cpha stops (RuntimeDirectoryPreserve=yes): keepalived goes on reading them.
    m.ok("systemctl stop cpha.service")?;
    m.ok("test -p /run/cpha/keepalived.fifo && test -s /run/cpha/vip-health")?;
    let _ = &mut m;
    Ok(())
}
