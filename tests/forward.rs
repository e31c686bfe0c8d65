//! `cpha forward`, `cpha status` and `cpha cleanup` with real traffic between network
//! namespaces, for each backend and address family. Needs root (CI runs as root).

mod support;

use std::time::Duration;

use anyhow::{ensure, Result};
use cpha_lab::netns;
use support::{finish_stream, Lab};

fn only_ids(report: &cpha_lab::report::ProbeReport, id: &str, count: u64) -> Result<()> {
    ensure!(report.failed == 0 && report.ok == count, "probe failed: {report:?}");
    ensure!(report.ids.get(id) == Some(&count), "expected every connection at {id:?}: {report:?}");
    Ok(())
}

/// A client on the host and a client on another host reach the server through the forward.
fn reach(mode: &str, v6: bool) -> Result<()> {
    let lab = Lab::new(v6)?;
    lab.enable_forwarding()?;
    let listen = lab.listen_addr(8443);
    lab.cpha_ok(&["forward", "--listen", &listen, "--to", &lab.server_addr(6443), "--mode", mode])?;
    only_ids(&lab.probe(&lab.host, &listen, 5)?, "a", 5)?;
    only_ids(&lab.probe(&lab.client, &listen, 5)?, "a", 5)?;
    let status = lab.cpha_ok(&["status", "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&status)?;
    ensure!(v["forwards"][0]["backend"] == mode, "{status}");
    ensure!(v["forwards"][0]["state"] == "forwarding", "{status}");
    ensure!(v["forwards"][0]["listen"] == listen.as_str(), "{status}");
    ensure!(v["forwards"][0]["targets"][0] == lab.server_addr(6443).as_str(), "{status}");
    lab.cpha_ok(&["cleanup"])?;
    Ok(())
}

/// Retargeting moves new connections and keeps established ones; a repeat changes nothing.
fn retarget(mode: &str, v6: bool) -> Result<()> {
    let lab = Lab::new(v6)?;
    lab.enable_forwarding()?;
    let listen = lab.listen_addr(8443);
    lab.cpha_ok(&["forward", "--listen", &listen, "--to", &lab.server_addr(6443), "--mode", mode])?;
    let remote = lab.stream(&lab.client, &listen)?;
    let local = lab.stream(&lab.host, &listen)?;
    lab.cpha_ok(&["forward", "--listen", &listen, "--to", &lab.server_addr(6444), "--mode", mode])?;
    only_ids(&lab.probe(&lab.client, &listen, 5)?, "b", 5)?;
    only_ids(&lab.probe(&lab.host, &listen, 5)?, "b", 5)?;

    // The same arguments again: nothing in the kernel changes (rule handles included).
    let handles = |lab: &Lab| lab.host.run("nft", &["-a", "list", "ruleset"]).map(|s| strip_counters(&s));
    let before = (handles(&lab)?, lab.ruleset()?);
    let (_, _, stderr) = lab.cpha(&["forward", "--listen", &listen, "--to", &lab.server_addr(6444), "--mode", mode])?;
    ensure!(stderr.contains("nothing changed"), "{stderr}");
    ensure!(before == (handles(&lab)?, lab.ruleset()?), "a repeated forward changed the ruleset");

    std::thread::sleep(Duration::from_millis(300));
    for (name, stream) in [("remote", remote), ("local", local)] {
        let report = finish_stream(stream)?;
        ensure!(report.ok && report.id.as_deref() == Some("a"), "{name} stream across the retarget: {report:?}");
        ensure!(report.roundtrips > 5, "{name} stream made too few round trips: {report:?}");
    }
    lab.cpha_ok(&["cleanup"])?;
    Ok(())
}

/// Cleanup stops new connections at once, lets the established one drain, and leaves the
/// ruleset exactly as it found it.
fn cleanup_drains(mode: &str, v6: bool) -> Result<()> {
    let lab = Lab::new(v6)?;
    lab.enable_forwarding()?;
    let before = lab.ruleset()?;
    let listen = lab.listen_addr(8443);
    lab.cpha_ok(&["forward", "--listen", &listen, "--to", &lab.server_addr(6443), "--mode", mode])?;
    let stream = lab.stream(&lab.client, &listen)?;
    let mut cleanup = lab.host.spawn(support::cpha(), &["cleanup", "--drain-timeout", "60s"])?;
    netns::wait_for("new connections to stop being forwarded", Duration::from_secs(10), || {
        let r = lab.probe(&lab.client, &listen, 1)?;
        Ok((r.ok == 0).then_some(()))
    })?;
    let status = lab.cpha_ok(&["status", "--json"])?;
    ensure!(status.contains("\"draining\""), "status while draining: {status}");
    std::thread::sleep(Duration::from_millis(500));
    ensure!(cleanup.try_wait()?.is_none(), "cleanup returned while a forwarded connection was open");
    let report = finish_stream(stream)?;
    ensure!(report.ok, "the forwarded stream broke during cleanup: {report:?}");
    let (status, _) = cleanup.finish(Duration::from_secs(15))?;
    ensure!(status.success(), "cleanup failed: {status}");
    ensure!(
        lab.ruleset()? == before,
        "cleanup left the ruleset changed:\n{}\n---- before ----\n{before}",
        lab.ruleset()?
    );
    // Idempotent: nothing left to remove is success.
    lab.cpha_ok(&["cleanup"])?;
    Ok(())
}

fn strip_counters(s: &str) -> String {
    s.lines().map(|l| l.split(" counter packets").next().unwrap_or(l)).collect::<Vec<_>>().join("\n")
}

macro_rules! kernel_tests {
    ($($name:ident: $f:ident($mode:expr, $v6:expr);)*) => {$(
        #[test]
        fn $name() {
            $f($mode, $v6).unwrap();
        }
    )*};
}

kernel_tests! {
    nftables_v4_reach: reach("nftables", false);
    nftables_v6_reach: reach("nftables", true);
    iptables_v4_reach: reach("iptables", false);
    iptables_v6_reach: reach("iptables", true);
    nftables_v4_retarget: retarget("nftables", false);
    nftables_v6_retarget: retarget("nftables", true);
    iptables_v4_retarget: retarget("iptables", false);
    iptables_v6_retarget: retarget("iptables", true);
    nftables_v4_cleanup_drains: cleanup_drains("nftables", false);
    nftables_v6_cleanup_drains: cleanup_drains("nftables", true);
    iptables_v4_cleanup_drains: cleanup_drains("iptables", false);
    iptables_v6_cleanup_drains: cleanup_drains("iptables", true);
}

/// The host's own apiserver as the target, reached from the host and from another host.
#[test]
fn kernel_local_target() {
    for mode in ["nftables", "iptables"] {
        let mut lab = Lab::new(false).unwrap();
        let local = lab.host_inner_addr(7443);
        lab.serve_on_host(&local, "local").unwrap();
        let listen = lab.listen_addr(8443);
        lab.cpha_ok(&["forward", "--listen", &listen, "--to", &local, "--mode", mode]).unwrap();
        only_ids(&lab.probe(&lab.host, &listen, 3).unwrap(), "local", 3).unwrap();
        only_ids(&lab.probe(&lab.client, &listen, 3).unwrap(), "local", 3).unwrap();
        lab.cpha_ok(&["cleanup", "--now"]).unwrap();
    }
}

/// A wildcard listen address forwards connections to any local address of the host.
#[test]
fn kernel_wildcard_listen() {
    for (mode, v6) in [("nftables", false), ("nftables", true), ("iptables", false)] {
        let lab = Lab::new(v6).unwrap();
        lab.enable_forwarding().unwrap();
        lab.cpha_ok(&["forward", "--listen", &lab.wildcard(8443), "--to", &lab.server_addr(6443), "--mode", mode])
            .unwrap();
        only_ids(&lab.probe(&lab.client, &lab.listen_addr(8443), 3).unwrap(), "a", 3).unwrap();
        only_ids(&lab.probe(&lab.host, &lab.host_inner_addr(8443), 3).unwrap(), "a", 3).unwrap();
        lab.cpha_ok(&["cleanup", "--now"]).unwrap();
    }
}

/// Several targets share new connections round-robin in the kernel.
#[test]
fn kernel_round_robin() {
    for mode in ["nftables", "iptables"] {
        let lab = Lab::new(false).unwrap();
        let listen = lab.listen_addr(8443);
        let (a, b) = (lab.server_addr(6443), lab.server_addr(6444));
        lab.cpha_ok(&["forward", "--listen", &listen, "--to", &a, "--to", &b, "--mode", mode]).unwrap();
        let r = lab.probe(&lab.host, &listen, 10).unwrap();
        assert_eq!((r.ids.get("a"), r.ids.get("b")), (Some(&5), Some(&5)), "{mode}: {r:?}");
        lab.cpha_ok(&["cleanup", "--now"]).unwrap();
    }
}

/// Switching backend replaces the other backend's forward instead of stacking a second one.
#[test]
fn switching_backend_replaces_the_forward() {
    let lab = Lab::new(false).unwrap();
    let listen = lab.listen_addr(8443);
    lab.cpha_ok(&["forward", "--listen", &listen, "--to", &lab.server_addr(6443), "--mode", "iptables"]).unwrap();
    lab.cpha_ok(&["forward", "--listen", &listen, "--to", &lab.server_addr(6444), "--mode", "nftables"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&lab.cpha_ok(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(v["forwards"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["forwards"][0]["backend"], "nftables");
    only_ids(&lab.probe(&lab.host, &listen, 3).unwrap(), "b", 3).unwrap();
    lab.cpha_ok(&["cleanup", "--now"]).unwrap();
}
