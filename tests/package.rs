//! What an operator installs, checked where it would run: the Debian package installed with apt
//! into a clean Debian 12 root filesystem (inside a network namespace of its own, so the kernel
//! rules it installs and removes never touch this host), the static musl binary in a root that
//! holds nothing else (no glibc), and the container image's Dockerfile linted with hadolint
//! (no container engine runs here: the image is linted and checked, not built).
//!
//! `hack/test` installs what these need: debootstrap and musl-tools (Debian), hadolint (PyPI,
//! `CPHA_HADOLINT`), and builds the musl binary (`CPHA_MUSL_BIN`, refused when older than the sources). The Debian root filesystem is
//! built once by `tests/package/debian-root` into /var/cache/cpha-test and extracted afresh for
//! every run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::CommandFactory as _;

#[path = "support/program.rs"]
mod program;
use program::{read, root, run, run_ok, tool, Ran};

fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique(&format!("cpha-package-{tag}")));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // NOTE: nothing is ever mounted below these directories from outside (the chroot's /proc
        // is mounted inside `ip netns exec`'s private mount namespace and goes with it), so
        // removing them can never reach into the host's files.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A network namespace of this test's own (named `pkgtest-PID-N`, which no other test's
/// cleanup matches), deleted even when the test fails.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = unique("pkgtest");
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns(name);
        run_ok(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]));
        ns
    }

    /// Gives the namespace a host's address on the shipped configurations' segment (a veth
    /// whose other end stays in the namespace too: still no network), where `cpha
    /// check-config` places their virtual IP 192.0.2.10.
    fn with_host_address(self, cidr: &str) -> Netns {
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(["-n", &self.0]).args(args));
        ip(&["link", "add", "cpha0", "type", "veth", "peer", "name", "cpha1"]);
        ip(&["address", "add", cidr, "dev", "cpha0"]);
        ip(&["link", "set", "cpha0", "up"]);
        ip(&["link", "set", "cpha1", "up"]);
        self
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The cpha-docgen binary the workspace build put next to cpha.
fn docgen() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_cpha")).with_file_name("cpha-docgen");
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace --bins` (hack/test does)", path.display());
    path
}

/// Every subcommand `cpha --help` lists.
fn subcommands() -> Vec<String> {
    cpha::cli::Cli::command().get_subcommands().filter(|c| !c.is_hide_set()).map(|c| c.get_name().to_string()).collect()
}

/// The unit as the package installs it: the repository's, run from the package's binary
/// (`/usr/bin/cpha`) instead of the copy provisioning installs (`/usr/local/bin/cpha`).
fn packaged_unit() -> String {
    let unit = read("systemd/cpha.service");
    assert!(unit.contains("\nExecStart=/usr/local/bin/cpha "), "systemd/cpha.service runs /usr/local/bin/cpha");
    unit.replace("\nExecStart=/usr/local/bin/cpha ", "\nExecStart=/usr/bin/cpha ")
}

/// `tools/build-deb` on the test binary.
fn build_deb(out: &Path) -> PathBuf {
    build_deb_of(Path::new(env!("CARGO_BIN_EXE_cpha")), out)
}

/// `tools/build-deb` on `binary`; uncompressed, which keeps a debug binary quick to pack.
fn build_deb_of(binary: &Path, out: &Path) -> PathBuf {
    let ran = run_ok(
        Command::new(root().join("tools/build-deb"))
            .arg(binary)
            .arg(docgen())
            .arg(out)
            .env("CPHA_DEB_COMPRESSION", "none"),
    );
    PathBuf::from(ran.stdout.trim())
}

// ---------------------------------------------------------------------------------------------
// The Debian package

/// A fresh copy of the cached clean Debian 12 root, and commands run in it, inside `ns`.
struct Debian<'a> {
    dir: TempDir,
    ns: &'a Netns,
}

impl<'a> Debian<'a> {
    fn new(ns: &'a Netns) -> Debian<'a> {
        let tar = run_ok(&mut Command::new(root().join("tests/package/debian-root")));
        let tar = tar.stdout.trim().to_string();
        let dir = TempDir::new("debian12");
        run_ok(Command::new("tar").arg("-C").arg(dir.path()).args(["--numeric-owner", "-xf", &tar]));
        Debian { dir, ns }
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.dir.path().join(inside.trim_start_matches('/'))
    }

    /// `sh -c script` in the root, in the namespace (no network but loopback), with /proc.
    fn sh(&self, script: &str) -> Ran {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns.0, "chroot"])
            .arg(self.dir.path())
            .args(["/bin/sh", "-c", &format!("mount -t proc proc /proc && {script}")])
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C"))
    }

    fn sh_ok(&self, script: &str) -> Ran {
        let ran = self.sh(script);
        assert!(ran.ok(), "in the Debian 12 root: {script}\n{}", ran.both());
        ran
    }

    /// Every rule the namespace holds, from both tools.
    fn rules(&self) -> (String, String) {
        let nft = self.sh_ok("nft list ruleset").stdout;
        let ipt = self.sh_ok("iptables-save && ip6tables-save").stdout;
        (nft, ipt)
    }
}

/// `apt install ./cpha_*.deb` on a clean Debian 12 gives a working `cpha check-config` and
/// units `systemd-analyze verify` accepts; the files land where the repository says; `apt
/// remove` leaves no kernel rule behind (and no unit), `apt purge` no configuration.
#[test]
fn deb_installs_on_clean_debian_12_and_removes_its_rules() {
    // cp1 of the shipped configuration (examples/config-host.yaml).
    let ns = Netns::new().with_host_address("192.0.2.11/24");
    let debian = Debian::new(&ns);
    let out = TempDir::new("deb");
    let deb = build_deb(out.path());
    let name = deb.file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with(&format!("cpha_{}_", env!("CARGO_PKG_VERSION"))), "{name}");
    std::fs::copy(&deb, debian.path("/root").join(&name)).unwrap();

    // No network in the namespace: everything the package needs is in the root already, or
    // apt would fail to fetch it here.
    let ran = debian.sh_ok("cd /root && apt-get install -y ./cpha_*.deb");
    assert!(ran.stdout.contains("Setting up cpha"), "{}", ran.both());
    let status = debian.sh_ok("dpkg-query -W -f '${Status} ${Conffiles}' cpha").stdout;
    assert!(status.starts_with("install ok installed"), "{status}");
    assert!(status.contains("/etc/cpha/config.yaml"), "the configuration is a conffile: {status}");

    // The binary where Debian policy puts a package's (and the unit runs it), and the commit it
    // was built from.
    let version = debian.sh_ok("/usr/bin/cpha --version").stdout;
    assert_eq!(version.trim(), format!("cpha {}", cpha::cli::VERSION));
    let check = debian.sh_ok("cpha check-config --config /etc/cpha/config.yaml");
    assert!(check.stdout.contains("haproxy -c accepts the rendered file"), "{}", check.both());
    assert!(check.stdout.contains("keepalived --config-test accepts the rendered file"), "{}", check.both());
    assert_eq!(
        std::fs::read_to_string(debian.path("/etc/cpha/config.yaml")).unwrap(),
        read("examples/config-host.yaml")
    );
    // The unit and drop-ins in the package's directory, none in the administrator's.
    for (inside, text) in [
        ("/lib/systemd/system/cpha.service", packaged_unit()),
        ("/lib/systemd/system/haproxy.service.d/cpha.conf", read("systemd/haproxy.service.d/cpha.conf")),
        ("/lib/systemd/system/keepalived.service.d/cpha.conf", read("systemd/keepalived.service.d/cpha.conf")),
    ] {
        assert_eq!(std::fs::read_to_string(debian.path(inside)).unwrap(), text, "{inside}");
    }
    let listed = debian.sh_ok("dpkg -L cpha").stdout;
    assert!(!listed.lines().any(|l| l.starts_with("/usr/local") || l.starts_with("/etc/systemd")), "{listed}");

    // The units, as the root's own systemd reads them (drop-ins included for haproxy.service
    // and keepalived.service).
    // --man=no: a minimal system has no man program to look Documentation= pages up with.
    for unit in ["cpha.service", "haproxy.service", "keepalived.service"] {
        let ran = debian.sh(&format!("systemd-analyze verify --man=no {unit}"));
        let ours: Vec<&str> =
            ran.stderr.lines().chain(ran.stdout.lines()).filter(|l| l.contains("cpha") || l.contains(unit)).collect();
        assert!(ran.ok() && ours.is_empty(), "systemd-analyze verify {unit}:\n{}", ran.both());
    }
    // (/lib is /usr/lib on a merged-/usr system: systemd may name either.)
    let dropins = debian.sh_ok("systemd-delta --no-pager --type=extended").stdout;
    for unit in ["haproxy", "keepalived"] {
        let extended = format!("{unit}.service -> ");
        let dropin = format!("lib/systemd/system/{unit}.service.d/cpha.conf");
        assert!(dropins.lines().any(|l| l.contains(&extended) && l.contains(&dropin)), "{dropins}");
    }

    // A man page for every subcommand, and completions every shell can load.
    for sub in subcommands() {
        let page = debian.path(&format!("/usr/share/man/man1/cpha-{sub}.1.gz"));
        assert!(page.is_file(), "no man page for `cpha {sub}`: {}", page.display());
    }
    assert!(debian.path("/usr/share/man/man1/cpha.1.gz").is_file());
    let complete = debian.sh_ok("bash -c '. /usr/share/bash-completion/completions/cpha && complete -p cpha'").stdout;
    assert!(complete.contains("cpha"), "{complete}");
    for path in ["/usr/share/zsh/vendor-completions/_cpha", "/usr/share/fish/vendor_completions.d/cpha.fish"] {
        let text = std::fs::read_to_string(debian.path(path)).unwrap();
        assert!(subcommands().iter().all(|s| text.contains(s.as_str())), "{path} misses a subcommand");
    }

    // Enabled (as provisioning does), then a kernel forward in the namespace, as a stopped
    // agent leaves it (forward.onShutdown: keep).
    debian.sh_ok("systemctl enable cpha.service");
    assert!(debian.path("/etc/systemd/system/multi-user.target.wants/cpha.service").is_symlink());
    debian.sh_ok("cpha forward --listen 127.0.0.1:7445 --to 127.0.0.1:6443 --mode nftables");
    let (nft, _) = debian.rules();
    assert!(nft.contains("table inet cpha"), "the forward is installed: {nft}");

    let ran = debian.sh_ok("apt-get remove -y cpha");
    assert!(ran.stdout.contains("Removing cpha"), "{}", ran.both());
    let (nft, ipt) = debian.rules();
    assert_eq!(nft.trim(), "", "apt remove left nftables rules behind");
    assert!(!ipt.to_lowercase().contains("cpha"), "apt remove left iptables rules behind: {ipt}");
    for gone in [
        "/usr/bin/cpha",
        "/lib/systemd/system/cpha.service",
        "/lib/systemd/system/haproxy.service.d/cpha.conf",
        "/lib/systemd/system/keepalived.service.d/cpha.conf",
        "/usr/share/man/man1/cpha.1.gz",
    ] {
        assert!(!debian.path(gone).exists(), "{gone} left after apt remove");
    }
    assert!(!debian.path("/etc/systemd/system/multi-user.target.wants/cpha.service").is_symlink());
    assert!(debian.path("/etc/cpha/config.yaml").is_file(), "remove keeps the configuration");

    debian.sh_ok("apt-get purge -y cpha");
    assert!(!debian.path("/etc/cpha").exists(), "purge removes the configuration");
    assert!(!debian.sh("dpkg-query -W -f '${Status}' cpha").stdout.contains("installed"));
}

/// Provisioning (cloud-init, metal3) writes /etc/cpha/config.yaml and the unit before it installs
/// the package: with --force-confold, as the install snippet passes, apt keeps that
/// configuration (the conffile is then the operator's) and installs its own unit, which
/// `cpha-bootstrap install` then puts in use by removing provisioning's copies.
#[test]
fn deb_keeps_a_configuration_written_before_it() {
    // lb1 of the external LB configuration (192.0.2.21: its vip.unicastPeers names lb2).
    let ns = Netns::new().with_host_address("192.0.2.21/24");
    let debian = Debian::new(&ns);
    let out = TempDir::new("deb");
    let deb = build_deb(out.path());
    std::fs::copy(&deb, debian.path("/root/cpha.deb")).unwrap();
    let mine = read("examples/config-external-lb.yaml");
    std::fs::create_dir_all(debian.path("/etc/cpha")).unwrap();
    std::fs::write(debian.path("/etc/cpha/config.yaml"), &mine).unwrap();
    // cloud-init writes its copies of the unit and drop-ins too (running /usr/local/bin/cpha).
    let copies = [
        ("/etc/systemd/system/cpha.service", "systemd/cpha.service"),
        ("/etc/systemd/system/haproxy.service.d/cpha.conf", "systemd/haproxy.service.d/cpha.conf"),
        ("/etc/systemd/system/keepalived.service.d/cpha.conf", "systemd/keepalived.service.d/cpha.conf"),
    ];
    for (inside, repo) in copies {
        std::fs::create_dir_all(debian.path(inside).parent().unwrap()).unwrap();
        std::fs::write(debian.path(inside), read(repo)).unwrap();
    }
    debian.sh_ok(
        "apt-get install -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold /root/cpha.deb",
    );
    assert_eq!(std::fs::read_to_string(debian.path("/etc/cpha/config.yaml")).unwrap(), mine);
    assert_eq!(std::fs::read_to_string(debian.path("/lib/systemd/system/cpha.service")).unwrap(), packaged_unit());
    // The package leaves the administrator's directory alone; the copies there would shadow its
    // unit (and run a /usr/local/bin/cpha that is not there) until `cpha-bootstrap install`, as
    // the user-data runs it with the package installed and no URL, removes them.
    assert!(copies.iter().all(|(inside, _)| debian.path(inside).is_file()));
    std::fs::copy(root().join("cloud-init/cpha-bootstrap"), debian.path("/usr/local/sbin/cpha-bootstrap")).unwrap();
    std::fs::write(debian.path("/etc/cpha/install.env"), "CPHA_URL=\nCPHA_SHA256=\n").unwrap();
    let ran = debian.sh_ok("bash /usr/local/sbin/cpha-bootstrap install");
    assert!(ran.stdout.contains("using the pre-installed package's /usr/bin/cpha"), "{}", ran.both());
    for (inside, _) in copies {
        assert!(!debian.path(inside).exists(), "{inside} still shadows the package's");
    }
    let verify = debian.sh("systemd-analyze verify --man=no cpha.service");
    assert!(verify.ok() && !verify.both().contains("cpha"), "{}", verify.both());
    let check = debian.sh_ok("cpha check-config --config /etc/cpha/config.yaml");
    assert!(check.stdout.contains("retarget topology"), "{}", check.both());
    assert!(check.stdout.contains("vip 192.0.2.10 on cpha0"), "{}", check.both());
}

/// The maintainer scripts and the package builder pass shellcheck (POSIX sh for the scripts
/// dpkg runs: Debian's /bin/sh is dash).
#[test]
fn packaging_scripts_are_clean() {
    for script in ["packaging/deb/postinst", "packaging/deb/prerm", "packaging/deb/postrm"] {
        assert!(read(script).starts_with("#!/bin/sh\n"), "{script} must be a POSIX sh script");
        let ran =
            run(Command::new(tool("shellcheck")).args(["--shell=sh", "--severity=style"]).arg(root().join(script)));
        assert!(ran.ok(), "shellcheck {script}:\n{}", ran.both());
    }
    for script in ["tools/build-deb", "tests/package/debian-root"] {
        let ran = run(Command::new(tool("shellcheck")).arg("--severity=style").arg(root().join(script)));
        assert!(ran.ok(), "shellcheck {script}:\n{}", ran.both());
    }
    // The prerm withdraws the forward with the binary the package installs.
    let prerm = read("packaging/deb/prerm");
    assert!(prerm.contains("@CPHA@ cleanup"), "{prerm}");
}

// ---------------------------------------------------------------------------------------------
// The static binary

/// Where `hack/test` builds it (a debug build: the release build takes many minutes here).
const MUSL_BIN: &str = "/var/cache/cpha-test/target-musl/x86_64-unknown-linux-musl/debug/cpha";

/// A file `hack/test` provides, named by `var` or at its default place.
fn from_env_or(var: &str, default: &str, what: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| default.into());
    assert!(path.is_file(), "{} ({what}) is missing: run hack/test, which provides it", path.display());
    path
}

/// The program headers of an ELF64 file: (type) of each.
fn elf_segment_types(bytes: &[u8]) -> Vec<u32> {
    assert!(bytes.len() > 64 && &bytes[..4] == b"\x7fELF" && bytes[4] == 2, "not an ELF64 file");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count)
        .map(|i| {
            let o = phoff + i * size;
            u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap())
        })
        .collect()
}

const PT_INTERP: u32 = 3;

/// The static build, refused when it is older than the sources it is built from: a plain
/// `cargo test` (or another checkout's `hack/test`) would otherwise test whatever musl binary an
/// earlier build left in the cache, not this code.
fn musl_bin() -> PathBuf {
    let musl = from_env_or("CPHA_MUSL_BIN", MUSL_BIN, "the static x86_64 musl build");
    let built = std::fs::metadata(&musl).and_then(|m| m.modified()).unwrap();
    if let Some((newer, at)) = newest_source().filter(|(_, at)| *at > built) {
        let age = at.duration_since(built).unwrap_or_default().as_secs();
        panic!(
            "{} is older than {} (by {age} s): it was not built from these sources. Run hack/test, or the build it \
             runs: CARGO_TARGET_DIR=/var/cache/cpha-test/target-musl cargo build --locked --target \
             x86_64-unknown-linux-musl --bin cpha",
            musl.display(),
            newer.display()
        );
    }
    musl
}

/// The most recently modified file the cpha binary is built from (src/, the manifest, the lock
/// file, build.rs), and when.
fn newest_source() -> Option<(PathBuf, std::time::SystemTime)> {
    type Newest = Option<(PathBuf, std::time::SystemTime)>;
    fn consider(path: PathBuf, at: std::time::SystemTime, newest: &mut Newest) {
        if newest.as_ref().is_none_or(|(_, t)| at > *t) {
            *newest = Some((path, at));
        }
    }
    fn walk(dir: &Path, newest: &mut Newest) {
        for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                walk(&entry.path(), newest);
            } else {
                consider(entry.path(), meta.modified().unwrap(), newest);
            }
        }
    }
    let mut newest = None;
    walk(&root().join("src"), &mut newest);
    for file in ["Cargo.toml", "Cargo.lock", "build.rs"] {
        let path = root().join(file);
        if let Ok(at) = std::fs::metadata(&path).and_then(|m| m.modified()) {
            consider(path, at, &mut newest);
        }
    }
    newest
}

/// The musl build runs in a root that holds nothing but itself and a configuration: no glibc,
/// no loader, no haproxy. The glibc build, as a control, cannot even start there.
#[test]
fn static_binary_runs_where_glibc_is_absent() {
    let musl = musl_bin();
    let bytes = std::fs::read(&musl).unwrap();
    assert!(!elf_segment_types(&bytes).contains(&PT_INTERP), "{} asks for a program interpreter", musl.display());
    println!("static musl build (debug profile): {} bytes", bytes.len());
    let glibc = std::fs::read(env!("CARGO_BIN_EXE_cpha")).unwrap();
    assert!(elf_segment_types(&glibc).contains(&PT_INTERP), "the control must be a dynamic binary");

    let empty = TempDir::new("empty-root");
    let dir = empty.path();
    std::fs::create_dir(dir.join("tmp")).unwrap();
    std::fs::write(dir.join("cpha"), &bytes).unwrap();
    std::fs::write(dir.join("cpha-glibc"), &glibc).unwrap();
    for f in ["cpha", "cpha-glibc"] {
        std::fs::set_permissions(dir.join(f), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    std::fs::write(dir.join("config.yaml"), read("examples/config-host.yaml")).unwrap();
    std::fs::write(dir.join("broken.yaml"), "endpoint:\n  listen: 192.0.2.10\n").unwrap();
    let chroot = tool("chroot");
    let in_root = |args: &[&str]| run(Command::new(&chroot).arg(dir).args(args).env_clear());
    let found: Vec<String> = walk(dir);
    assert_eq!(found, ["broken.yaml", "config.yaml", "cpha", "cpha-glibc", "tmp"], "the root holds only these");

    let ran = in_root(&["/cpha-glibc", "--version"]);
    assert_eq!(ran.code, 127, "the glibc build must not start without glibc:\n{}", ran.both());

    let ran = in_root(&["/cpha", "--version"]);
    assert!(
        ran.ok() && ran.stdout.starts_with(&format!("cpha {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{}",
        ran.both()
    );
    // The configuration is parsed, validated and rendered...
    let ran = in_root(&["/cpha", "render", "--config", "/config.yaml", "--members", "cp1=192.0.2.11:6443"]);
    assert!(ran.ok() && ran.stdout.contains("192.0.2.11:6443"), "{}", ran.both());
    // ...check-config validates it and renders it, and gets as far as `haproxy -c`, which this
    // root lacks (the package and the image bring HAProxy): it says exactly that.
    let ran = in_root(&["/cpha", "check-config", "--config", "/config.yaml"]);
    assert_eq!(ran.code, 78, "{}", ran.both());
    assert!(
        ran.stderr.contains("rendered haproxy.cfg: cannot run haproxy -c: `haproxy` was not found"),
        "{}",
        ran.both()
    );
    // A broken configuration is refused before that, there as anywhere.
    let ran = in_root(&["/cpha", "check-config", "--config", "/broken.yaml"]);
    assert_eq!(ran.code, 78, "{}", ran.both());
    assert!(ran.stderr.contains("has no port") && !ran.stderr.contains("haproxy -c"), "{}", ran.both());
}

/// The package of the static build declares no libc; the glibc build's declares the glibc its
/// newest versioned symbol needs.
#[test]
fn deb_of_the_static_binary_depends_on_no_libc() {
    let musl = musl_bin();
    let depends = |binary: &Path| {
        let out = TempDir::new("deb-depends");
        let deb = build_deb_of(binary, out.path());
        run_ok(Command::new("dpkg-deb").arg("--field").arg(&deb).arg("Depends")).stdout.trim().to_string()
    };
    assert_eq!(depends(&musl), "nftables | iptables, procps");
    let glibc = depends(Path::new(env!("CARGO_BIN_EXE_cpha")));
    assert!(glibc.starts_with("libc6 (>= 2.") && glibc.ends_with(", nftables | iptables, procps"), "{glibc}");
}

fn walk(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------------------------
// The container image

const HADOLINT: &str = "/opt/cpha-test-tools/hadolint-2.15.1/bin/hadolint";

/// The `FROM` lines of a Dockerfile: (image, stage name).
fn stages(dockerfile: &str) -> Vec<(String, Option<String>)> {
    dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|rest| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let name = (words.len() == 3 && words[1].eq_ignore_ascii_case("as")).then(|| words[2].to_string());
            (words[0].to_string(), name)
        })
        .collect()
}

fn hadolint(dockerfile: &Path) -> Ran {
    let hadolint = from_env_or("CPHA_HADOLINT", HADOLINT, "hadolint, tests/package/requirements.txt");
    // Every finding fails, down to style; each exception is an inline `# hadolint ignore=` with
    // its reason beside it.
    run(Command::new(hadolint).args(["--no-color", "--failure-threshold", "style"]).arg(dockerfile))
}

#[test]
fn dockerfile_passes_hadolint() {
    let ran = hadolint(&root().join("deploy/Dockerfile"));
    assert!(ran.ok(), "hadolint deploy/Dockerfile:\n{}", ran.both());
    // The linter still lints: an unpinned base, an unpinned install that keeps its lists.
    let broken = TempDir::new("dockerfile");
    let path = broken.path().join("Dockerfile");
    std::fs::write(&path, "FROM debian\nRUN apt-get update && apt-get install -y haproxy\n").unwrap();
    let ran = hadolint(&path);
    assert!(!ran.ok() && ran.stdout.contains("DL3006"), "hadolint passed a broken Dockerfile:\n{}", ran.both());
}

/// deploy/Dockerfile, read (no image is built here): cpha is built in the image, on pinned bases,
/// on the HAProxy the pod runs, and runs unprivileged unless the DaemonSet says otherwise.
#[test]
fn dockerfile_says_to_build_cpha_from_source_on_the_pods_haproxy() {
    let dockerfile = read("deploy/Dockerfile");
    let stages = stages(&dockerfile);
    assert_eq!(stages.len(), 2, "a builder and the image: {stages:?}");
    let (builder, runtime) = (&stages[0], &stages[1]);
    assert_eq!(builder.1.as_deref(), Some("build"));
    assert!(dockerfile.contains("cargo build --release --locked --bin cpha"));
    assert!(dockerfile.contains("COPY --from=build /out/cpha /usr/local/bin/cpha"));
    assert!(!dockerfile.contains("COPY target/"), "no binary from the host");
    // Pinned: an exact release in every tag (x.y.z), never a moving one.
    for (image, _) in &stages {
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_else(|| panic!("{image} has no tag"));
        let release = tag.split('-').next().unwrap();
        assert_eq!(release.split('.').filter(|p| p.parse::<u32>().is_ok()).count(), 3, "{image} is not pinned");
    }
    // The Rust release the crate declares.
    let rust_version = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \"").map(|v| v.trim_end_matches('"').to_string()))
        .unwrap();
    assert!(builder.0.starts_with(&format!("rust:{rust_version}.0-")), "{} for rust-version {rust_version}", builder.0);

    // The pod's haproxy container runs the image cpha's is built on.
    let daemonset = read("deploy/daemonset.yaml");
    let haproxy_image = daemonset
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("image: "))
        .find(|i| i.starts_with("haproxy:"))
        .expect("the DaemonSet's haproxy image");
    assert_eq!(runtime.0, haproxy_image, "deploy/Dockerfile and deploy/daemonset.yaml run different HAProxy releases");

    // Unprivileged by default; the base's SIGUSR1 (HAProxy's soft stop) is cpha's resync.
    let last_user = dockerfile.lines().rfind(|l| l.starts_with("USER ")).unwrap();
    assert!(!matches!(last_user, "USER 0" | "USER root") && !last_user.starts_with("USER 0:"), "{last_user}");
    assert!(dockerfile.lines().any(|l| l == "STOPSIGNAL SIGTERM"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/cpha\"]"));

    // The context: what the build reads, not target/ or .git.
    let ignore = read(".dockerignore");
    let rules: Vec<&str> = ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert_eq!(rules.first(), Some(&"*"), "everything is left out unless named");
    for needed in ["!Cargo.toml", "!Cargo.lock", "!build.rs", "!src/", "!tools/"] {
        assert!(rules.contains(&needed), "{needed} missing from .dockerignore");
    }
    assert_eq!(rules.last(), Some(&"**/target/"), "no target directory, at any depth, even under tools/");
    assert!(!rules.iter().any(|r| r.starts_with("!.git") || r.starts_with("!target")), "{rules:?}");
}

/// `*` within one path segment, `**` across any number of them, as Docker's pattern matcher.
fn glob(pattern: &[&str], path: &[&str]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => glob(&pattern[1..], path) || (!path.is_empty() && glob(pattern, &path[1..])),
        (Some(p), Some(s)) => segment(p.as_bytes(), s.as_bytes()) && glob(&pattern[1..], &path[1..]),
        _ => false,
    }
}

fn segment(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => segment(&p[1..], s) || (!s.is_empty() && segment(p, &s[1..])),
        (Some(a), Some(b)) => a == b && segment(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Whether `.dockerignore` keeps `path` out of the build context: the last rule that matches
/// the path or one of its parent directories decides.
fn ignored(rules: &[&str], path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let mut out = false;
    for rule in rules {
        let (negate, pattern) = rule.strip_prefix('!').map_or((false, *rule), |p| (true, p));
        let pattern: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
        if (1..=parts.len()).any(|n| glob(&pattern, &parts[..n])) {
            out = !negate;
        }
    }
    out
}

/// The build context `.dockerignore` leaves (every tracked file it keeps, and never target/ or
/// .git) is enough for cargo to load the workspace with the locked dependencies, as the
/// builder stage's `cargo build --locked` does.
#[test]
fn image_build_context_holds_what_cargo_needs() {
    let ignore = read(".dockerignore");
    let rules: Vec<&str> = ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    for path in ["target/debug/cpha", "tools/lab/target/x", ".git/HEAD", "docs/deployment.md", "tests/deploy.rs"] {
        assert!(ignored(&rules, path), "{path} would be in the build context");
    }
    let tracked = run_ok(Command::new("git").arg("-C").arg(root()).args(["ls-files", "-z"])).stdout;
    let kept: Vec<&str> = tracked.split('\0').filter(|p| !p.is_empty() && !ignored(&rules, p)).collect();
    for path in ["Cargo.toml", "Cargo.lock", "build.rs", "src/main.rs", "src/haproxy/haproxy.cfg.tera"] {
        assert!(kept.contains(&path), "{path} is left out of the build context");
    }
    let context = TempDir::new("image-context");
    for path in &kept {
        let dest = context.path().join(path);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(root().join(path), &dest).unwrap_or_else(|e| panic!("copying {path}: {e}"));
    }
    run_ok(
        Command::new(env!("CARGO"))
            .args(["metadata", "--locked", "--offline", "--format-version", "1"])
            .current_dir(context.path())
            .stdout(Stdio::null()),
    );
    // Nothing the binary compiles in lives outside the context: the only include_str! paths
    // out of src/ are test fixtures.
    for path in kept.iter().filter(|p| p.starts_with("src/") && p.ends_with(".rs")) {
        let text = read(path);
        for (i, _) in text.match_indices("include_str!(\"../") {
            let before = &text[..i];
            assert!(before.contains("#[cfg(test)]"), "{path} includes a file from outside src/ outside its tests");
        }
    }
}
