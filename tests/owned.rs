//! The other objects cpha owns, changed by someone else under `cpha run` with real HAProxy in
//! network namespaces (tests/support/cluster.rs): haproxy.cfg rewritten, HAProxy restarted
//! the way systemd restarts it, a server put in maintenance through the admin socket. Each
//! prints the time from the change to the repair (docs/benchmarks.md). Needs root.

#[path = "support/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cluster::Cluster;
use cpha_lab::netns;

const LONG: Duration = Duration::from_secs(60);
/// What a repair may take, from the change to the object read back as cpha had it.
const BOUND: Duration = Duration::from_secs(1);

fn balanced(members: usize) -> Result<Cluster> {
    let mut c = Cluster::new(members)?;
    let all: Vec<usize> = (1..=members).collect();
    c.set_members(&c.member_list(&all))?;
    let config = c.write_config("retarget", "nftables", &c.members[0].addr.clone())?;
    c.start_agent(&config)?;
    c.start_haproxy()?;
    c.wait_phase(&["balanced"], LONG)?;
    Ok(c)
}

fn repairs(c: &Cluster, object: &str) -> Result<u64> {
    let metrics = c.metrics()?;
    let key = format!("cpha_repairs_total{{object=\"{object}\"}}");
    let line = metrics.lines().find(|l| l.starts_with(&key)).with_context(|| format!("no {key} in\n{metrics}"))?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

fn gauge(c: &Cluster, name: &str) -> Result<i64> {
    let metrics = c.metrics()?;
    let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).with_context(|| format!("no {name}"))?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

#[test]
fn a_rewritten_or_removed_haproxy_cfg_is_put_back_without_a_reload() {
    let c = balanced(1).unwrap();
    let path = c.dir.join("haproxy.cfg");
    let cpha = std::fs::read_to_string(&path).unwrap();
    let workers = c.workers().unwrap();
    for (n, change) in ["rewritten", "removed"].into_iter().enumerate() {
        let t0 = Instant::now();
        match change {
            "rewritten" => std::fs::write(&path, "# managed by someone else\n").unwrap(),
            _ => std::fs::remove_file(&path).unwrap(),
        }
        let took = netns::wait_for(&format!("haproxy.cfg {change}: put back"), Duration::from_secs(5), || {
            Ok((std::fs::read_to_string(&path).ok().as_deref() == Some(cpha.as_str())).then(|| t0.elapsed()))
        })
        .with_context(|| c.agent_log())
        .unwrap();
        eprintln!("REPAIR haproxy.cfg {change}: put back in {} ms", took.as_millis());
        assert!(took <= BOUND, "{change}: {took:?}");
        netns::wait_for("the repair counted", Duration::from_secs(5), || {
            Ok((repairs(&c, "haproxy.cfg")? == n as u64 + 1).then_some(()))
        })
        .unwrap();
    }
    let status = c.status().unwrap();
    assert_eq!(status["agent"]["last_repair"]["object"], "haproxy.cfg", "{status}");
    // The running worker had loaded cpha's content all along: no reload.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.workers().unwrap(), workers, "{}", c.agent_log());
}

#[test]
fn a_haproxy_restarted_by_someone_else_serves_exactly_the_desired_servers_with_cphas_file() {
    let mut c = balanced(2).unwrap();
    // A member added through the Runtime API only (no reload), then removed likewise: its
    // drain is runtime-only state.
    let (workers, _) = c.workers().unwrap();
    c.set_members(&c.member_list(&[1])).unwrap();
    c.serving_after(LONG, 1).unwrap();
    c.set_members(&c.member_list(&[1, 2])).unwrap();
    let desired = c.serving_after(LONG, 2).unwrap();
    assert_eq!(c.workers().unwrap().0, workers, "changes through the Runtime API, not a reload");
    // The runtime first, the file right after it.
    let cfg = netns::wait_for("the file written after the runtime change", Duration::from_secs(5), || {
        let text = std::fs::read_to_string(c.dir.join("haproxy.cfg"))?;
        Ok(desired.iter().all(|d| text.contains(&format!("server {d} "))).then_some(text))
    })
    .unwrap();
    let before = repairs(&c, "haproxy").unwrap();
    // As `systemctl restart haproxy` does it: stop, start again on the file.
    c.kill_haproxy().unwrap();
    let t0 = Instant::now();
    c.start_haproxy().unwrap();
    let took = netns::wait_for("the desired servers served", Duration::from_secs(10), || {
        Ok((c.serving().ok().as_ref() == Some(&desired)).then(|| t0.elapsed()))
    })
    .with_context(|| c.agent_log())
    .unwrap();
    eprintln!("REPAIR haproxy restarted: the desired servers served {} ms after the start", took.as_millis());
    assert!(took <= BOUND * 5, "{took:?}");
    c.wait_phase(&["balanced"], LONG).unwrap();
    assert_eq!(std::fs::read_to_string(c.dir.join("haproxy.cfg")).unwrap(), cfg, "cpha's file");
    let names: Vec<String> = c.servers().unwrap().into_iter().map(|(n, _, _)| n).collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, desired, "exactly the desired servers");
    netns::wait_for("the restart reported", Duration::from_secs(10), || {
        Ok((repairs(&c, "haproxy")? > before).then_some(()))
    })
    .with_context(|| c.agent_log())
    .unwrap();
}

#[test]
fn a_server_an_operator_put_in_maintenance_is_reported_and_not_reverted() {
    let c = balanced(2).unwrap();
    let serving = c.serving_after(LONG, 2).unwrap();
    let name = &serving[1];
    c.admin(&format!("set server kube-apiservers/{name} state maint")).unwrap();
    // SIGUSR1 applies at once: the apply must leave the operator's maintenance alone.
    c.signal_agent(10).unwrap();
    netns::wait_for("maint reported", Duration::from_secs(10), || {
        Ok((gauge(&c, "cpha_backend_servers_maint")? == 1).then_some(()))
    })
    .with_context(|| c.agent_log())
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.serving().unwrap(), vec![serving[0].clone()], "still in maintenance: {}", c.agent_log());
    let status = c.status().unwrap();
    assert_eq!(status["agent"]["haproxy_servers_maint"], 1, "{status}");
    ensure_no_apply_error(&status).unwrap();
    // The operator takes it back: counted no more.
    c.admin(&format!("set server kube-apiservers/{name} state ready")).unwrap();
    netns::wait_for("maint over", Duration::from_secs(10), || {
        Ok((gauge(&c, "cpha_backend_servers_maint")? == 0).then_some(()))
    })
    .unwrap();
}

fn ensure_no_apply_error(status: &serde_json::Value) -> Result<()> {
    let err = status["agent"]["last_error"].as_str().unwrap_or("");
    ensure!(!err.contains("apply"), "an apply failed: {err}");
    Ok(())
}
