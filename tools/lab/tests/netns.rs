//! Network namespaces, veth links and routes, checked with real traffic from the cpha-lab
//! servers and clients. Needs root: these tests fail, not skip, without it.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use cpha_lab::netns::{self, route, veth, veth_pair, wait_for, Child, Netns};
use cpha_lab::report::ProbeReport;
use cpha_lab::require_root;

const LAB: &str = env!("CARGO_BIN_EXE_cpha-lab");
const T: Duration = Duration::from_secs(10);

fn serve(ns: &Netns, listen: &str, id: &str) -> (Child, SocketAddr) {
    let mut child = ns.spawn(LAB, &["serve", "--listen", listen, "--id", id, "--max-duration", "120s"]).unwrap();
    let addr = child.listening_addr(T).unwrap();
    (child, addr)
}

fn probe(ns: &Netns, to: SocketAddr) -> (i32, ProbeReport) {
    let out =
        ns.command(LAB).args(["probe", "--to", &to.to_string(), "--count", "3", "--timeout", "1s"]).output().unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap();
    (out.status.code().unwrap(), report)
}

fn netns_listed(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn namespace_is_gone_after_drop_with_its_processes() {
    require_root!();
    let ns = Netns::new("labtest").unwrap();
    let name = ns.name().to_string();
    assert!(name.starts_with(&format!("labtest-{}-", std::process::id())));
    assert!(netns::exists(&name) && netns_listed(&name));
    // A process that is not under a Child guard: only the namespace's Drop can end it.
    let orphan = ns.command("sleep").arg("60").spawn().unwrap();
    let pid = orphan.id();
    wait_for("sleep inside the namespace", T, || Ok(ns.pids()?.contains(&pid).then_some(()))).unwrap();
    drop(ns);
    assert!(!netns::exists(&name), "{name} still in /run/netns");
    assert!(!netns_listed(&name), "{name} still listed");
    // Killed (a zombie until reaped here), not running any more.
    let mut orphan = orphan;
    let status = orphan.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[test]
fn lo_is_up_and_isolated() {
    require_root!();
    let ns = Netns::new("labtest").unwrap();
    let (_srv, addr) = serve(&ns, "127.0.0.1:0", "inside");
    let (code, r) = probe(&ns, addr);
    assert_eq!((code, r.ok), (0, 3), "{r:?}");
    // The same port on the test's own loopback is another stack: nothing listens there
    // (unless by chance something else does, which would not greet as "inside").
    let out = Command::new(LAB).args(["probe", "--to", &addr.to_string(), "--timeout", "1s"]).output().unwrap();
    let r: ProbeReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r.ids.get("inside"), None, "{r:?}");
}

#[test]
fn veth_carries_ipv4_and_ipv6() {
    require_root!();
    let a = Netns::new("labtest").unwrap();
    let b = Netns::new("labtest").unwrap();
    let (ia, ib) =
        veth_pair(&a, &["198.18.100.1/24", "fd00:cafe::1/64"], &b, &["198.18.100.2/24", "fd00:cafe::2/64"]).unwrap();
    assert!(ia.len() <= 15 && ib.len() <= 15);
    assert!(a.ip(&["addr", "show", "dev", &ia]).unwrap().contains("198.18.100.1/24"));
    let (_v4, v4) = serve(&b, "198.18.100.2:0", "b4");
    let (_v6, v6) = serve(&b, "[fd00:cafe::2]:0", "b6");
    let (code, r) = probe(&a, v4);
    assert_eq!((code, r.ids.get("b4")), (0, Some(&3)), "{r:?}");
    let (code, r) = probe(&a, v6);
    assert_eq!((code, r.ids.get("b6")), (0, Some(&3)), "{r:?}");
}

#[test]
fn routes_and_forwarding_connect_three_namespaces() {
    require_root!();
    let client = Netns::new("labtest").unwrap();
    let router = Netns::new("labtest").unwrap();
    let server = Netns::new("labtest").unwrap();
    veth(&client, &["198.18.101.2/24"], &router, &["198.18.101.1/24"]).unwrap();
    veth(&router, &["198.18.102.1/24"], &server, &["198.18.102.2/24"]).unwrap();
    route(&client, &["default", "via", "198.18.101.1"]).unwrap();
    route(&server, &["198.18.101.0/24", "via", "198.18.102.1"]).unwrap();
    let (_srv, addr) = serve(&server, "198.18.102.2:0", "far");

    router.sysctl("net.ipv4.ip_forward", "0").unwrap();
    assert_eq!(router.sysctl_get("net.ipv4.ip_forward").unwrap(), "0");
    let (code, r) = probe(&client, addr);
    assert_eq!((code, r.ok), (1, 0), "no forwarding, no path: {r:?}");

    router.sysctl("net.ipv4.ip_forward", "1").unwrap();
    assert_eq!(router.sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
    let (code, r) = probe(&client, addr);
    assert_eq!((code, r.ids.get("far")), (0, Some(&3)), "{r:?}");
}

#[test]
fn ipv6_default_route() {
    require_root!();
    let a = Netns::new("labtest").unwrap();
    let b = Netns::new("labtest").unwrap();
    veth(&a, &["fd00:beef::1/64"], &b, &["fd00:beef::2/64"]).unwrap();
    b.ip(&["addr", "add", "fd00:f00d::2/128", "dev", "lo"]).unwrap();
    route(&a, &["default", "via", "fd00:beef::2"]).unwrap();
    let (_srv, addr) = serve(&b, "[fd00:f00d::2]:0", "v6");
    let (code, r) = probe(&a, addr);
    assert_eq!((code, r.ids.get("v6")), (0, Some(&3)), "{r:?}");
}

#[test]
fn run_reports_failures_with_output() {
    require_root!();
    let ns = Netns::new("labtest").unwrap();
    assert_eq!(ns.run("echo", &["hi"]).unwrap(), "hi\n");
    let err = ns.run("sh", &["-c", "echo out; echo err >&2; exit 3"]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("out") && msg.contains("err") && msg.contains('3'), "{msg}");
}

#[test]
fn stale_namespaces_of_dead_processes_are_swept() {
    require_root!();
    // A pid that existed and is gone: a finished child's.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let prefix = format!("labsweep{}", std::process::id());
    let stale = format!("{prefix}-{dead}-0");
    let keep = format!("{prefix}-{}-7", std::process::id());
    for name in [&stale, &keep] {
        assert!(Command::new("ip").args(["netns", "add", name]).status().unwrap().success());
    }
    let removed = netns::sweep_stale(&prefix).unwrap();
    let kept = netns::exists(&keep);
    // Remove ours before asserting, so a failure leaves nothing behind.
    Command::new("ip").args(["netns", "del", &keep]).status().unwrap();
    assert_eq!(removed, vec![stale.clone()]);
    assert!(!netns::exists(&stale));
    assert!(kept, "a namespace of a live process was removed");
}
