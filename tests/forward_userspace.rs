//! `cpha forward --mode userspace` between network namespaces: the proxy runs in the foreground,
//! reports `listening ADDR`, forwards local and remote clients, skips refusing targets, and
//! drains on SIGTERM.

mod support;

use std::time::Duration;

use anyhow::{ensure, Result};
use cpha_lab::netns::Child;
use support::{finish_stream, Lab};

fn start(lab: &Lab, args: &[&str]) -> Result<Child> {
    let mut full = vec!["forward", "--mode", "userspace"];
    full.extend_from_slice(args);
    let mut child = lab.host.spawn(support::cpha(), &full)?;
    child.listening_addr(Duration::from_secs(10))?;
    Ok(child)
}

fn only(report: &cpha_lab::report::ProbeReport, id: &str, count: u64) -> Result<()> {
    ensure!(report.failed == 0 && report.ids.get(id) == Some(&count), "expected {count} at {id:?}: {report:?}");
    Ok(())
}

fn reach(v6: bool) -> Result<()> {
    let lab = Lab::new(v6)?;
    let listen = lab.listen_addr(8443);
    let mut proxy = start(&lab, &["--listen", &listen, "--to", &lab.server_addr(6443)])?;
    only(&lab.probe(&lab.host, &listen, 5)?, "a", 5)?;
    only(&lab.probe(&lab.client, &listen, 5)?, "a", 5)?;
    ensure!(proxy.stop(Duration::from_secs(10))?.success(), "the proxy did not exit cleanly on SIGTERM");
    Ok(())
}

#[test]
fn userspace_v4_reach() {
    reach(false).unwrap();
}

#[test]
fn userspace_v6_reach() {
    reach(true).unwrap();
}

/// The kernel cannot translate IPv4 to IPv6; the userspace proxy can.
#[test]
fn userspace_crosses_address_families() {
    let mut lab = Lab::new(false).unwrap();
    lab.serve_in_server("[fd02::2]:6445", "v6").unwrap();
    let listen = lab.listen_addr(8443);
    let _proxy = start(&lab, &["--listen", &listen, "--to", "[fd02::2]:6445"]).unwrap();
    only(&lab.probe(&lab.client, &listen, 3).unwrap(), "v6", 3).unwrap();
}

/// A target that refuses is skipped for the next one: no client sees the failure.
#[test]
fn userspace_skips_refusing_target() {
    let lab = Lab::new(false).unwrap();
    let listen = lab.listen_addr(8443);
    let _proxy =
        start(&lab, &["--listen", &listen, "--to", &lab.server_addr(6555), "--to", &lab.server_addr(6443)]).unwrap();
    only(&lab.probe(&lab.client, &listen, 6).unwrap(), "a", 6).unwrap();
}

/// A port another program owns is a one-line error with exit code 71.
#[test]
fn userspace_port_in_use() {
    let mut lab = Lab::new(false).unwrap();
    let listen = lab.listen_addr(8443);
    lab.serve_on_host(&listen, "squatter").unwrap();
    let (ok, _, stderr) =
        lab.cpha(&["forward", "--mode", "userspace", "--listen", &listen, "--to", &lab.server_addr(6443)]).unwrap();
    assert!(!ok);
    assert!(stderr.contains("already in use"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let out = lab
        .host
        .command(support::cpha())
        .args(["forward", "--mode", "userspace", "--listen", &listen, "--to", &lab.server_addr(6443)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(71));
}

/// Retargeting a userspace forward: a second proxy shares the port (SO_REUSEPORT), the first
/// stops accepting on SIGTERM and drains its open stream; new connections reach the new target.
#[test]
fn userspace_retarget_by_successor_drains_open_stream() {
    let lab = Lab::new(false).unwrap();
    lab.host.sysctl("net.ipv4.tcp_migrate_req", "1").unwrap();
    let listen = lab.listen_addr(8443);
    let mut old =
        start(&lab, &["--reuse-port", "--drain-timeout", "60s", "--listen", &listen, "--to", &lab.server_addr(6443)])
            .unwrap();
    let stream = lab.stream(&lab.client, &listen).unwrap();
    let _new = start(&lab, &["--reuse-port", "--listen", &listen, "--to", &lab.server_addr(6444)]).unwrap();
    old.signal(15).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    only(&lab.probe(&lab.client, &listen, 6).unwrap(), "b", 6).unwrap();
    assert!(old.try_wait().unwrap().is_none(), "the old proxy exited while its stream was open");
    let report = finish_stream(stream).unwrap();
    assert!(report.ok && report.id.as_deref() == Some("a"), "{report:?}");
    let status = old.wait_timeout(Duration::from_secs(10)).unwrap().expect("old proxy exits once drained");
    assert!(status.success(), "{status}");
}

/// The `skmem` receive and send buffer sizes (`rb`, `tb`) of every established TCP socket in the
/// host namespace, from `ss -tmn`.
fn host_socket_buffers(lab: &Lab) -> Result<Vec<(u64, u64)>> {
    let ss = lab.host.run("ss", &["-tmnH", "state", "established"])?;
    let field = |skmem: &str, key: &str| -> Option<u64> {
        skmem.split([',', '(', ')']).find_map(|f| f.strip_prefix(key)).and_then(|v| v.parse().ok())
    };
    let sizes: Vec<(u64, u64)> = ss
        .lines()
        .filter_map(|l| l.trim().strip_prefix("skmem:"))
        .map(|m| field(m, "rb").zip(field(m, "tb")).ok_or_else(|| anyhow::anyhow!("no rb/tb in {m:?}")))
        .collect::<Result<_>>()?;
    ensure!(sizes.len() == 2, "expected the proxy's two sockets in `ss -tmn`, got:\n{ss}");
    Ok(sizes)
}

/// `--socket-buffer` fixes the buffers of both of a connection's sockets (the kernel reports
/// twice the asked size); without it they are left to autotuning.
#[test]
fn userspace_socket_buffer_flag_sizes_both_sockets() {
    const FIXED: u64 = 2 * (3 << 20);
    let lab = Lab::new(false).unwrap();
    let listen = lab.listen_addr(8443);
    let mut proxy =
        start(&lab, &["--socket-buffer", "3M", "--listen", &listen, "--to", &lab.server_addr(6443)]).unwrap();
    let stream = lab.stream(&lab.client, &listen).unwrap();
    let fixed = host_socket_buffers(&lab).unwrap();
    assert!(fixed.iter().all(|&b| b == (FIXED, FIXED)), "{fixed:?}");
    assert!(finish_stream(stream).unwrap().ok);
    assert!(proxy.stop(Duration::from_secs(10)).unwrap().success());

    let _proxy = start(&lab, &["--listen", &listen, "--to", &lab.server_addr(6443)]).unwrap();
    let stream = lab.stream(&lab.client, &listen).unwrap();
    let autotuned = host_socket_buffers(&lab).unwrap();
    assert!(autotuned.iter().all(|&(rb, tb)| rb != FIXED && tb != FIXED), "{autotuned:?}");
    assert!(finish_stream(stream).unwrap().ok);
}
