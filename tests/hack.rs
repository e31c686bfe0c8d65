//! The project's own commands (`hack/test`, `hack/demo`) as a newcomer and a shared machine meet
//! them: they say what is missing before anything else, they leave the machine's cloud-init
//! alone, and the test run removes only the network namespaces it created.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Deletes a namespace this test made by hand, also when an assertion failed.
struct Foreign(String);

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn netns_guard_removes_what_the_run_recorded_and_nothing_else() {
    cpha_lab::require_root!();
    let record = std::env::temp_dir().join(format!("cpha-netns-record-{}", std::process::id()));
    let _ = std::fs::remove_file(&record);
    // Another engineer's (or another run's) namespace, with the same prefix as ours.
    let foreign = Foreign(format!("cpha-foreign-{}", std::process::id()));
    assert!(Command::new("ip").args(["netns", "add", &foreign.0]).status().unwrap().success());
    // Ours, recorded by tools/lab as hack/test asks, and left behind as by a killed test.
    std::env::set_var("CPHA_NETNS_RECORD", &record);
    let ours = cpha_lab::netns::Netns::new("cpha-guardtest").unwrap();
    std::env::remove_var("CPHA_NETNS_RECORD");
    let name = ours.name().to_string();
    std::mem::forget(ours);
    assert!(netns_exists(&name));
    let recorded = std::fs::read_to_string(&record).unwrap();
    assert_eq!(recorded.lines().collect::<Vec<_>>(), [name.as_str()]);

    // A boot test's machine root left mounted in that namespace's directory, and another run's.
    let machine = PathBuf::from(format!("/var/tmp/{name}-0"));
    let other_machine = PathBuf::from(format!("/var/tmp/{}-0", foreign.0));
    for dir in [&machine, &other_machine] {
        std::fs::create_dir_all(dir.join("root")).unwrap();
    }
    assert!(Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(machine.join("root")).status().unwrap().success());

    let out = Command::new(root().join("hack/netns-guard")).arg(&record).stdin(Stdio::null()).output().unwrap();
    let other_left = other_machine.exists();
    let _ = std::fs::remove_dir_all(&other_machine);
    let _ = std::fs::remove_file(&record);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!netns_exists(&name), "the run's own namespace {name} was left");
    assert!(netns_exists(&foreign.0), "the guard removed {}, which this run did not create", foreign.0);
    assert!(!machine.exists(), "the run's machine {} was left", machine.display());
    assert!(other_left, "the guard removed {}, which this run did not create", other_machine.display());

    // hack/test uses this guard, and no longer deletes by prefix.
    let hack_test = std::fs::read_to_string(root().join("hack/test")).unwrap();
    assert!(hack_test.contains("hack/netns-guard \"$CPHA_NETNS_RECORD\""), "hack/test does not run the guard");
    assert!(!hack_test.contains("ip netns del"), "hack/test deletes namespaces itself");
}

#[test]
fn commands_refuse_a_user_who_is_not_root_with_a_failure_not_a_skip() {
    cpha_lab::require_root!();
    for command in ["hack/test", "hack/demo"] {
        // As `nobody`: 77 would be read as SKIP by automake-style harnesses, so the run
        // would look green on a machine where it never ran.
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(root().join(command))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert!(stderr.contains("needs root") && stderr.contains("sudo"), "{command}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command}: a one-line hint, got: {stderr}");
    }
}

#[test]
fn commands_say_what_a_newcomer_needs_when_rust_is_missing() {
    cpha_lab::require_root!();
    let hint = format!("install Rust {} or newer", env!("CARGO_PKG_RUST_VERSION"));
    for command in ["hack/test", "hack/demo"] {
        // A PATH with the system's programs and no cargo (and no sudo user whose rustup the
        // commands would look for).
        let out = Command::new(root().join(command))
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env_remove("SUDO_USER")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{command}: {stderr}");
        assert!(!stderr.contains("command not found"), "{command}: {stderr}");
        assert!(stderr.contains(&hint), "{command}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command}: a one-line hint, got: {stderr}");
    }
}

#[test]
fn commands_say_when_rust_is_older_than_cargo_toml_needs() {
    cpha_lab::require_root!();
    // A cargo older than Cargo.toml's rust-version (Debian 12's own is 1.65).
    let bin = std::env::temp_dir().join(format!("cpha-old-cargo-{}", std::process::id()));
    std::fs::create_dir_all(&bin).unwrap();
    let cargo = bin.join("cargo");
    std::fs::write(&cargo, "#!/bin/sh\necho 'cargo 1.65.0'\n").unwrap();
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hint = format!("Rust 1.65.0 is older than the {} this needs", env!("CARGO_PKG_RUST_VERSION"));
    for command in ["hack/test", "hack/demo"] {
        let out = Command::new(root().join(command))
            .env("PATH", format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display()))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{command}: {stderr}");
        assert!(stderr.contains(&hint) && stderr.contains("rustup update"), "{command}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command}: a one-line hint, got: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&bin);
}

#[test]
fn test_command_never_installs_or_disables_cloud_init_here() {
    let hack_test = std::fs::read_to_string(root().join("hack/test")).unwrap();
    let code: String = hack_test.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    assert!(!code.contains("/etc/cloud"), "hack/test writes to /etc/cloud");
    assert!(!code.contains("cloud-init:cloud-init"), "hack/test installs cloud-init on this machine");
    // apt-get waits for a held dpkg lock instead of failing at once.
    let prereq = std::fs::read_to_string(root().join("hack/prereq")).unwrap();
    let runs_apt =
        |l: &&str| l.trim_start().starts_with("apt-get ") || l.contains("; apt-get ") || l.contains("{ apt-get ");
    let apt: Vec<&str> = prereq.lines().filter(runs_apt).collect();
    assert!(!apt.is_empty() && apt.iter().all(|l| l.contains("DPkg::Lock::Timeout=")), "{apt:?}");
    for command in ["hack/test", "hack/demo"] {
        let text = std::fs::read_to_string(root().join(command)).unwrap();
        let own: Vec<&str> = text.lines().filter(runs_apt).collect();
        assert!(own.is_empty(), "{command} runs apt-get itself, without the lock wait: {own:?}");
    }
}

#[test]
fn commands_say_when_the_crates_cannot_be_fetched() {
    cpha_lab::require_root!();
    // An empty cargo home, offline: nothing can be fetched, as without a reachable registry.
    let home = std::env::temp_dir().join(format!("cpha-empty-cargo-home-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    for command in ["hack/test", "hack/demo"] {
        let out = Command::new(root().join(command))
            .env("CARGO_HOME", &home)
            .env("CARGO_NET_OFFLINE", "true")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{command}: {stderr}");
        assert!(stderr.lines().last().unwrap_or_default().contains("crates.io"), "{command}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&home);
}
