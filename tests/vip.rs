//! The virtual IP for real: three control-plane hosts and a worker on one L2 segment (a bridge
//! in its own namespace), each host with its apiserver (the API stand-in), `cpha run` and
//! keepalived 2.2; HAProxy where a test says so. The worker dials only the VIP.
//!
//! Timing bounds here are generous on purpose (a loaded 2-CPU machine); the benchmark
//! (`tools/bench --failover`) reports the figures.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cpha_lab::netns::{self, wait_for, Netns};
use cpha_lab::report::LoadReport;
use cpha_lab::vrrp::{self, LabOpts, Programs, VipLab, ENDPOINT, VIP};

/// VRRP's advertisement interval at cpha's defaults.
const ADVERT: Duration = Duration::from_millis(400);

fn programs() -> Programs {
    Programs {
        cpha: env!("CARGO_BIN_EXE_cpha").into(),
        standin: netns::require_bin("kube-standin").unwrap_or_else(|e| panic!("{e:#}")),
        lab: netns::require_bin("cpha-lab").unwrap_or_else(|e| panic!("{e:#}")),
    }
}

/// Three hosts with cpha and keepalived running, one of them holding the VIP.
fn lab_up(haproxy: bool) -> Result<(VipLab, usize)> {
    cpha_lab::require_root!();
    let mut lab = VipLab::new(programs(), LabOpts::default())?;
    lab.start_all(haproxy)?;
    if haproxy {
        for i in 0..3 {
            wait_for(&format!("h{} balanced", i + 1), Duration::from_secs(30), || {
                Ok(lab.status(i).ok().filter(|s| s["agent"]["phase"] == "balanced").map(|_| ()))
            })
            .with_context(|| lab.logs())?;
        }
    }
    let holder = lab.wait_holder(Duration::from_secs(20), None)?;
    Ok((lab, holder))
}

fn vip_status(lab: &VipLab, i: usize) -> serde_json::Value {
    lab.status(i).unwrap()["agent"]["vip"].clone()
}

#[test]
fn the_worker_reaches_the_endpoint_through_the_vip_from_the_first_boot() {
    let (lab, holder) = lab_up(false).unwrap();
    // No HAProxy anywhere: the holder's bootstrap forward carries the endpoint.
    assert!(
        lab.worker_request(Duration::from_secs(3)),
        "GET https://{ENDPOINT}/readyz from the worker\n{}",
        lab.logs()
    );
    let status = lab.status(holder).unwrap();
    assert_eq!(status["agent"]["phase"], "forwarding", "{status}");
    let vip = &status["agent"]["vip"];
    assert_eq!(vip["held"], true, "{vip}");
    assert_eq!(vip["address"], VIP);
    assert_eq!(vip["interface"], "eth0");
    wait_for("the holder's VRRP state", Duration::from_secs(5), || {
        Ok((vip_status(&lab, holder)["vrrp_state"] == "master").then_some(()))
    })
    .unwrap();
    for i in (0..3).filter(|i| *i != holder) {
        let v = vip_status(&lab, i);
        assert_eq!(v["held"], false, "h{}: {v}", i + 1);
        assert_eq!(v["vrrp_state"], "backup", "h{}: {v}", i + 1);
    }
    // Every host's health reached keepalived as healthy once its forward reached an apiserver.
    wait_for("all hosts advertise healthy", Duration::from_secs(10), || {
        Ok((0..3).all(|i| vip_status(&lab, i)["advertised"] == "healthy").then_some(()))
    })
    .unwrap();
    let metrics = lab.metrics(holder).unwrap();
    assert!(metrics.contains("cpha_vip_held 1"), "{metrics}");
    assert!(metrics.contains("cpha_vip_changes_total{change=\"taken\"} 1"), "{metrics}");
    assert!(metrics.contains("cpha_vrrp_state{state=\"master\"} 1"), "{metrics}");
    assert!(metrics.contains("cpha_vip_advertised{health=\"healthy\"} 1"), "{metrics}");
    // The series deploy/monitoring's alerts use exist on a backup too, from the start.
    let backup = lab.metrics((holder + 1) % 3).unwrap();
    for line in
        ["cpha_vip_held 0", "cpha_vip_advertised{health=\"withdrawn\"} 0", "cpha_vip_changes_total{change=\"taken\"} 0"]
    {
        assert!(backup.lines().any(|l| l == line), "{line} missing:\n{backup}");
    }
    assert_eq!(lab.holders().unwrap(), vec![holder]);
}

/// One failure under steady load from the worker: the VIP leaves `holder` for a healthy host.
/// Returns (new holder, recovery time, failed connections).
fn failover(lab: &mut VipLab, holder: usize, kind: &str) -> Result<(usize, Duration, u64)> {
    let started = Instant::now();
    let load = lab.worker_load(Duration::from_secs(9), 100, Duration::from_millis(1000))?;
    std::thread::sleep(Duration::from_millis(1500));
    let fault = Instant::now();
    match kind {
        "link" => lab.link(holder, false)?,
        "keepalived" => lab.kill_keepalived(holder)?,
        "endpoint" => lab.break_endpoint(holder)?,
        _ => unreachable!(),
    }
    let new = lab.wait_holder(Duration::from_secs(15), Some(holder))?;
    let report = finish(load)?;
    let fault_s = fault.duration_since(started).as_secs_f64();
    let (took, failed) = vrrp::recovery(&report.timeline, fault_s)
        .with_context(|| format!("no successful connection after the fault ({kind}): {report:?}"))?;
    Ok((new, took, failed))
}

fn finish(mut child: netns::Child) -> Result<LoadReport> {
    let (_, lines) = child.finish(Duration::from_secs(30))?;
    let line = lines.last().context("the load client printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

#[test]
fn the_vip_moves_to_a_healthy_host_when_its_holder_fails() {
    let (mut lab, first) = lab_up(true).unwrap();
    let t0 = Instant::now();
    let mut figures = Vec::new();
    let mut recoveries = Vec::new();

    // 1. The holder's link goes down.
    let (second, took, failed) = failover(&mut lab, first, "link").unwrap();
    figures.push(format!("link down: {took:?}, {failed} failed"));
    recoveries.push(("link", took));
    lab.link(first, true).unwrap();
    // Equal priorities: the host that comes back does not take the address back.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.holders().unwrap(), vec![second], "{}", lab.logs());

    // 2. The holder's keepalived is SIGKILLed: it leaves the address on the interface, and cpha
    // removes it (otherwise two hosts would hold it once a backup takes over).
    let (third, took, failed) = failover(&mut lab, second, "keepalived").unwrap();
    figures.push(format!("keepalived SIGKILL: {took:?}, {failed} failed"));
    recoveries.push(("keepalived", took));
    let log = lab.log(second, "cpha.log");
    assert!(log.contains("keepalived is not running"), "{log}");
    let v = vip_status(&lab, second);
    assert_eq!((v["held"].clone(), v["vrrp_state"].clone()), (false.into(), "gone".into()), "{v}");
    lab.start_keepalived(second).unwrap();
    wait_for("the restarted keepalived seen as backup", Duration::from_secs(10), || {
        Ok((vip_status(&lab, second)["vrrp_state"] == "backup").then_some(()))
    })
    .unwrap();

    // 3. The holder's HAProxy dies and its forward cannot reach any apiserver either: cpha
    // withdraws, keepalived enters FAULT, a healthy host takes over.
    let (fourth, took, failed) = failover(&mut lab, third, "endpoint").unwrap();
    figures.push(format!("HAProxy and forward failed: {took:?}, {failed} failed"));
    recoveries.push(("endpoint", took));
    wait_for("withdrawn advertised", Duration::from_secs(5), || {
        Ok((vip_status(&lab, third)["advertised"] == "withdrawn").then_some(()))
    })
    .unwrap();
    assert_ne!(fourth, third);
    assert!(lab.worker_request(Duration::from_secs(3)), "the endpoint answers through the new holder");

    let overlap = lab.longest_overlap(t0, Instant::now());
    eprintln!("failover from the worker: {}; longest double holding {overlap:?}", figures.join("; "));
    assert!(overlap <= ADVERT, "two hosts held {VIP} for {overlap:?}\n{}", lab.logs());
    for (kind, took) in recoveries {
        // Generous for a loaded machine; the benchmark reports the real figures.
        assert!(took < Duration::from_secs(6), "{kind}: the worker's first success came {took:?} after the fault");
    }
}

#[test]
fn a_member_added_or_removed_updates_the_peers_without_moving_the_vip() {
    let (lab, holder) = lab_up(false).unwrap();
    let t0 = Instant::now();
    let conf = |i: usize| std::fs::read_to_string(lab.hosts[i].dir.join("keepalived.conf")).unwrap();
    assert_eq!(peers(&conf(0)), ["10.80.0.12", "10.80.0.13"], "h1's peers are the other members");
    assert_eq!(peers(&conf(1)), ["10.80.0.11", "10.80.0.13"]);
    let extra = format!("{},cp4=10.80.0.14:6443", lab.members(&[1, 2, 3]));
    lab.set_members(&extra).unwrap();
    wait_for("the new peer in every keepalived.conf", Duration::from_secs(10), || {
        Ok((0..3).all(|i| peers(&conf(i)).contains(&"10.80.0.14".to_string())).then_some(()))
    })
    .with_context(|| lab.logs())
    .unwrap();
    wait_for("keepalived reloaded", Duration::from_secs(10), || {
        Ok((0..3).all(|i| lab.log(i, "keepalived.log").contains("Reload complete")).then_some(()))
    })
    .with_context(|| lab.logs())
    .unwrap();
    lab.set_members(&lab.members(&[1, 2, 3])).unwrap();
    wait_for("the peer removed again", Duration::from_secs(10), || {
        Ok((0..3).all(|i| !conf(i).contains("10.80.0.14")).then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // The address never moved: no change of any host's addresses since the start.
    let moves = lab.changes.lock().unwrap().iter().filter(|c| c.at >= t0).count();
    assert_eq!(moves, 0, "{:?}", lab.changes.lock().unwrap());
    assert_eq!(lab.holders().unwrap(), vec![holder]);
    assert!(lab.worker_request(Duration::from_secs(3)));
}

#[test]
fn a_restart_of_cpha_on_the_holder_neither_reloads_keepalived_nor_moves_the_vip() {
    let (mut lab, holder) = lab_up(false).unwrap();
    let conf = |lab: &VipLab| std::fs::read_to_string(lab.hosts[holder].dir.join("keepalived.conf")).unwrap();
    let reloads = |lab: &VipLab| lab.log(holder, "keepalived.log").matches("Reload").count();
    let before = conf(&lab);
    let reloaded = reloads(&lab);
    let t0 = Instant::now();
    let mut agent = lab.hosts[holder].agent.take().unwrap();
    agent.signal(9).unwrap();
    agent.wait_timeout(Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // Started again with only itself as the seed (as a host's own first-boot file may say):
    // keepalived.conf is written for the last good set of the state file, not for the seed.
    let seed = lab.members(&[holder + 1]);
    lab.start_agent(holder, &seed).unwrap();
    wait_for("the restarted agent to check its endpoint", Duration::from_secs(20), || {
        Ok(vip_status(&lab, holder)["held"].as_bool().filter(|h| *h).map(|_| ()))
    })
    .with_context(|| lab.logs())
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(conf(&lab), before, "keepalived.conf changed across the restart");
    assert_eq!(reloads(&lab), reloaded, "keepalived was reloaded:\n{}", lab.log(holder, "keepalived.log"));
    let moves = lab.changes.lock().unwrap().iter().filter(|c| c.at >= t0).count();
    assert_eq!(moves, 0, "{:?}", lab.changes.lock().unwrap());
    assert_eq!(lab.holders().unwrap(), vec![holder]);
    assert!(lab.worker_request(Duration::from_secs(3)));
}

#[test]
fn every_apiserver_down_leaves_the_address_on_its_holder_and_the_first_one_back_serves() {
    let (mut lab, holder) = lab_up(true).unwrap();
    let t0 = Instant::now();
    let load = lab.worker_load(Duration::from_secs(14), 100, Duration::from_millis(1000)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..3 {
        lab.stop_apiserver(i, 9).unwrap();
    }
    std::thread::sleep(Duration::from_secs(5));
    // The first apiserver back is another host's than the holder's.
    let back = (holder + 1) % 3;
    lab.start_apiserver(back).unwrap();
    let ready_s = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    for i in (0..3).filter(|i| *i != back) {
        lab.start_apiserver(i).unwrap();
    }
    let report = finish(load).unwrap();
    // Every host saw the same outage: none gave the address up, so it never moved.
    let moves: Vec<_> = lab.changes.lock().unwrap().iter().filter(|c| c.at >= t0).copied().collect();
    assert!(moves.is_empty(), "the address moved: {moves:?}\n{}", lab.logs());
    assert_eq!(lab.holders().unwrap(), vec![holder]);
    for i in 0..3 {
        let log = lab.log(i, "cpha.log");
        assert!(!log.contains("giving up the virtual IP"), "h{} withdrew:\n{log}", i + 1);
    }
    // The worker's timeline starts when the load starts, about when t0 was taken.
    let first = report
        .timeline
        .iter()
        .filter(|c| c.ok && c.start_s >= ready_s)
        .map(|c| c.end_s)
        .reduce(f64::min)
        .expect("no success after the first apiserver was back");
    let took = Duration::from_secs_f64((first - ready_s).max(0.0));
    eprintln!("every apiserver down for 5 s: first success {took:?} after the first one was back, no move");
    // Generous for a loaded machine; the benchmark reports the real figure.
    assert!(took < Duration::from_secs(3), "the first success came {took:?} after the first apiserver was back");
}

/// The unicast peers of a rendered keepalived.conf.
fn peers(conf: &str) -> Vec<String> {
    let Some((_, rest)) = conf.split_once("unicast_peer {") else { return vec![] };
    let block = rest.split('}').next().unwrap_or_default();
    block.split_whitespace().map(String::from).collect()
}

#[test]
fn check_config_refuses_vip_settings_that_cannot_work_and_writes_nothing() {
    cpha_lab::require_root!();
    let host = Netns::new("cpha-vcc").unwrap();
    let other = Netns::new("cpha-vcc").unwrap();
    let (ifname, _) = netns::veth_pair(&host, &["10.81.0.11/24"], &other, &["10.81.0.12/24"]).unwrap();
    let dir = std::env::temp_dir().join(format!("cpha-vcc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let check = |vip: &str, extra: &str| {
        let path = dir.join("cpha.yaml");
        let text = format!(
            "endpoint:\n  listen: {vip}:8443\n  haproxyBind: 10.81.0.11:9445\nmembers:\n  source: static\n  static: [10.81.0.11:6443, 10.81.0.12:6443]\nhaproxy:\n  configPath: {d}/haproxy.cfg\nvip:\n  address: {vip}\n  keepalived:\n    configFile: {d}/keepalived.conf\n    trackFile: {d}/vip-health\n    notifyFifo: {d}/keepalived.fifo\n{extra}"
        );
        std::fs::write(&path, text).unwrap();
        let out =
            host.command(env!("CARGO_BIN_EXE_cpha")).args(["check-config", "--config"]).arg(&path).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = check("10.81.0.10", "");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("vip 10.81.0.10 on {ifname} (this host's address 10.81.0.11/24)")), "{out}");
    assert!(out.contains("keepalived --config-test accepts"), "{out}");

    let (code, out) = check("203.0.113.7", "");
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("vip.address 203.0.113.7 is outside every interface's subnet on this host"), "{out}");
    assert!(out.contains("10.81.0.11/24"), "the message lists what the host has: {out}");

    let (code, out) = check("10.81.0.10", "  virtualRouterId: 300\n");
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("vip.virtualRouterId: 300 is out of range: VRRP router ids are 1 to 255"), "{out}");

    let (code, out) = check("10.81.0.10", "  interface: eth7\n");
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("vip.interface eth7: no such interface"), "{out}");

    for name in ["keepalived.conf", "vip-health", "keepalived.fifo", "haproxy.cfg"] {
        assert!(!dir.join(name).exists(), "check-config wrote {name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
