//! Apiservers restarting, failing, dying and leaving behind `cpha run` and real HAProxy, under a
//! client making steady new TLS connections whose requests take 200 ms (`GET /version` on the
//! stand-in, slowed down). Three members in network namespaces, the shipped defaults for the
//! health checks (see tests/support/cluster.rs). Needs root.

#[path = "support/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cluster::{load_report, slow_members, stream_report, Cluster};
use cpha_lab::netns::{self, Child};
use cpha_lab::report::LoadReport;

const LONG: Duration = Duration::from_secs(60);
/// 50 new connections a second, each a 200 ms request: about 10 in flight at any time.
const RATE: u32 = 50;
const CONCURRENCY: u32 = 20;
const UP: u32 = 2;
const DOWN: u32 = 0;

/// Balanced through HAProxy with the shipped defaults, members slowed down and shutting down
/// gracefully in `shutdown_delay`; `extra` is appended to the `haproxy:` section.
fn balanced(shutdown_delay: &str, extra: &str) -> Result<Cluster> {
    let mut c = Cluster::with_standin_args(3, slow_members(shutdown_delay))?;
    c.set_members(&c.member_list(&[1, 2, 3]))?;
    let config = c.write_default_config("retarget", "nftables", &c.members[0].addr.clone())?;
    let mut text = std::fs::read_to_string(&config)?;
    ensure!(
        text.trim_end().lines().last().is_some_and(|l| l.starts_with("  masterSocket:")),
        "the haproxy section no longer ends the configuration:\n{text}"
    );
    text.push_str(extra);
    std::fs::write(&config, text)?;
    c.start_agent(&config)?;
    c.start_haproxy()?;
    c.wait_phase(&["balanced"], LONG)?;
    for n in 1..=3 {
        c.wait_member_state(n, UP, LONG)?;
    }
    Ok(c)
}

fn stop_load(load: Child) -> Result<LoadReport> {
    load.signal(15)?;
    load_report(load, LONG)
}

fn summary(r: &LoadReport) -> String {
    format!(
        "{} failed of {}, longest {:.0} ms, p99 {:.0} ms, errors {:?}, failures between {:?} and {:?} s",
        r.failed,
        r.ok + r.failed,
        r.max_ms,
        r.p99_ms,
        r.error_kinds,
        r.first_failure_s,
        r.last_failure_s
    )
}

#[test]
fn rolling_restart_with_readyz_failing_first_fails_no_request() {
    let mut c = balanced("4s", "").unwrap();
    let load = c.https_load(&c.client, "/version", RATE, CONCURRENCY, 120).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    for n in 1..=3 {
        let before = c.member_stat(n, "stot").unwrap();
        // SIGTERM: /readyz fails at once, requests are served for 4 s more, then the ones in
        // flight finish and the process exits.
        c.restart_member(n, 15).unwrap();
        c.wait_member_state(n, UP, LONG).unwrap();
        let served = c.member_stat(n, "stot").unwrap();
        ensure_served(&c, n, served).unwrap();
        assert!(served > before, "m{n} took no connection before its restart");
    }
    let report = stop_load(load).unwrap();
    eprintln!("rolling restart: {}", summary(&report));
    assert!(report.ok > 500, "{report:?}");
    assert_eq!(report.failed, 0, "{}", summary(&report));
}

/// Member `n` takes new connections again: its total goes past `from` within a few seconds.
fn ensure_served(c: &Cluster, n: usize, from: u64) -> Result<()> {
    netns::wait_for(&format!("m{n} serving again"), Duration::from_secs(20), || {
        Ok((c.member_stat(n, "stot")? > from).then_some(()))
    })
}

#[test]
fn a_member_that_stays_unready_gets_nothing_new_and_keeps_its_streams_for_the_grace() {
    let grace = Duration::from_secs(6);
    let c = balanced("0s", "  healthCheck:\n    unreadyGrace: 6s\n").unwrap();
    // Three watch-like streams: leastconn gives each member one.
    let mut streams: Vec<Option<Child>> =
        (0..3).map(|i| Some(c.https_stream_path(&c.client, &format!("s{i}"), "/version").unwrap())).collect();
    netns::wait_for("a stream on m2", Duration::from_secs(10), || Ok((c.member_stat(2, "scur")? >= 1).then_some(())))
        .unwrap();
    let load = c.https_load(&c.client, "/version", RATE, CONCURRENCY, 60).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let t0 = Instant::now();
    c.fault(2, r#"{"readyzFail":true}"#).unwrap();
    c.wait_member_state(2, DOWN, Duration::from_secs(10)).unwrap();
    let detected = t0.elapsed();
    // Nothing new reaches it once it is DOWN (a connection accepted just before may still be
    // counted by the first read).
    std::thread::sleep(Duration::from_millis(500));
    let total = c.member_stat(2, "stot").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.member_stat(2, "stot").unwrap(), total, "m2 took new connections while DOWN");

    // Its stream is cut once the grace has passed, not before; the others keep flowing.
    let (cut_at, cut) = netns::wait_for("m2's stream cut", Duration::from_secs(30), || {
        for s in streams.iter_mut() {
            if let Some(child) = s {
                if child.try_wait()?.is_some() {
                    let report = stream_report(s.take().context("taken")?)?;
                    return Ok(Some((t0.elapsed(), report)));
                }
            }
        }
        Ok(None)
    })
    .unwrap();
    eprintln!("DOWN after {detected:?}; stream cut after {cut_at:?}: {cut:?}");
    assert!(!cut.ok, "{cut:?}");
    assert!(cut_at >= detected + grace - Duration::from_millis(500), "cut after {cut_at:?}, DOWN after {detected:?}");
    assert!(cut_at <= detected + grace + Duration::from_secs(5), "cut after {cut_at:?}, DOWN after {detected:?}");
    assert_eq!(c.member_stat(2, "scur").unwrap(), 0);

    let report = stop_load(load).unwrap();
    assert_eq!(report.failed, 0, "{}", summary(&report));
    for s in streams.into_iter().flatten() {
        let r = stream_report(s).unwrap();
        assert!(r.ok, "a stream on a ready member broke: {r:?}");
    }
    // Ready again: it takes connections again.
    c.fault(2, r#"{"readyzFail":false}"#).unwrap();
    c.wait_member_state(2, UP, Duration::from_secs(10)).unwrap();
}

#[test]
fn a_member_failing_livez_is_gone_and_loses_its_streams_at_once() {
    let c = balanced("0s", "").unwrap();
    let mut streams: Vec<Option<Child>> =
        (0..3).map(|i| Some(c.https_stream_path(&c.client, &format!("s{i}"), "/version").unwrap())).collect();
    netns::wait_for("a stream on m2", Duration::from_secs(10), || Ok((c.member_stat(2, "scur")? >= 1).then_some(())))
        .unwrap();
    let t0 = Instant::now();
    c.fault(2, r#"{"livezFail":true,"readyzFail":true}"#).unwrap();
    c.wait_member_state(2, DOWN, Duration::from_secs(10)).unwrap();
    let detected = t0.elapsed();
    let (cut_at, cut) = netns::wait_for("m2's stream cut", Duration::from_secs(20), || {
        for s in streams.iter_mut() {
            if s.as_mut().map(|c| c.try_wait()).transpose()?.flatten().is_some() {
                return Ok(Some((t0.elapsed(), stream_report(s.take().context("taken")?)?)));
            }
        }
        Ok(None)
    })
    .unwrap();
    eprintln!("DOWN after {detected:?}; stream cut after {cut_at:?}: {cut:?}");
    assert!(!cut.ok, "{cut:?}");
    // The default grace is 30 s: a cut within a few seconds of the mark-down is the "gone" path.
    assert!(cut_at <= detected + Duration::from_secs(5), "cut after {cut_at:?}, DOWN after {detected:?}");
    for s in streams.into_iter().flatten() {
        let r = stream_report(s).unwrap();
        assert!(r.ok, "a stream on a live member broke: {r:?}");
    }
}

#[test]
fn a_hard_kill_fails_only_what_was_in_flight_on_the_member() {
    let mut c = balanced("0s", "").unwrap();
    let start = Instant::now();
    let load = c.https_load(&c.client, "/version", RATE, CONCURRENCY, 60).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let in_flight = c.member_stat(2, "scur").unwrap();
    let killed_at = start.elapsed().as_secs_f64();
    c.stop_member(2, 9).unwrap();
    c.wait_member_state(2, DOWN, Duration::from_secs(10)).unwrap();
    let down_at = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    let report = stop_load(load).unwrap();
    eprintln!(
        "hard kill at {killed_at:.2} s ({in_flight} sessions on m2 just before), DOWN at {down_at:.2} s: {}",
        summary(&report)
    );
    // What can fail is what was in flight on m2: at most the client's concurrency, about a
    // third of the ~10 requests in flight. Nothing fails after the kill's own instant: new
    // connections refused by the dead member are redispatched.
    assert!(report.failed <= u64::from(CONCURRENCY), "{}", summary(&report));
    if let (Some(first), Some(last)) = (report.first_failure_s, report.last_failure_s) {
        assert!(first >= killed_at - 0.5, "{}", summary(&report));
        assert!(last <= killed_at + 1.0, "{}", summary(&report));
    }
    c.start_member(2).unwrap();
    c.wait_member_state(2, UP, LONG).unwrap();
}

#[test]
fn a_member_removed_with_requests_in_flight_fails_none() {
    let c = balanced("0s", "").unwrap();
    let load = c.https_load(&c.client, "/version", RATE, CONCURRENCY, 60).unwrap();
    netns::wait_for("requests in flight on m2", Duration::from_secs(10), || {
        Ok((c.member_stat(2, "scur")? >= 1).then_some(()))
    })
    .unwrap();
    c.set_members(&c.member_list(&[1, 3])).unwrap();
    netns::wait_for("m2 drained and deleted", Duration::from_secs(30), || {
        Ok(c.member_state(2)?.is_none().then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let report = stop_load(load).unwrap();
    assert!(report.ok > 50, "{report:?}");
    assert_eq!(report.failed, 0, "{}", summary(&report));
}

/// A load balancer in front of the members for the benchmark.
#[derive(Clone, Copy, PartialEq)]
enum Front {
    /// `cpha run` with the shipped defaults, `extra` appended to its `haproxy:` section.
    Cpha { extra: &'static str },
    /// HAProxy alone with the kubeadm guide's configuration (docs/benchmarks.md shows it).
    Kubeadm,
}

#[derive(Clone, Copy, PartialEq)]
enum Restart {
    /// SIGTERM: `/readyz` fails at once, requests are served 5 s more, in-flight ones finish.
    Graceful,
    /// SIGKILL, started again 5 s later.
    HardKill,
    /// The host drops every packet for 5 s (power or network lost), then answers again.
    Silent,
}

struct Variant {
    front: Front,
    front_label: &'static str,
    restart: Restart,
    /// `/version` takes 200 ms; `/livez` answers at once.
    path: &'static str,
}

/// The kubeadm guide's HAProxy (docs/setup/production-environment/tools/kubeadm/
/// ha-considerations.md, its `option httpchk GET /healthz` form), with an admin socket added so
/// the benchmark can see when a member is UP again; the backend is named like cpha's for that.
fn kubeadm_cfg(c: &Cluster) -> String {
    let servers: String = (1..=3)
        .map(|n| format!("    server m{n} 10.2{n}.0.2:6443 check check-ssl verify none fall 3 rise 2\n"))
        .collect();
    format!(
        "global
    stats socket {admin} mode 600 level admin
    log stdout format raw local0

defaults
    mode http
    log global
    option httplog
    option dontlognull
    option http-server-close
    option redispatch
    retries 1
    timeout http-request 10s
    timeout queue 20s
    timeout connect 5s
    timeout client 20s
    timeout server 20s
    timeout http-keep-alive 10s
    timeout check 10s

frontend apiserver
    bind {endpoint}
    mode tcp
    option tcplog
    default_backend kube-apiservers

backend kube-apiservers
    option httpchk GET /healthz
    http-check expect status 200
    mode tcp
    balance roundrobin
{servers}",
        admin = c.dir.join("admin.sock").display(),
        endpoint = cluster::ENDPOINT,
    )
}

fn bench_cluster(front: Front) -> Result<Cluster> {
    match front {
        Front::Cpha { extra } => balanced("5s", extra),
        Front::Kubeadm => {
            let mut c = Cluster::with_standin_args(3, slow_members("5s"))?;
            std::fs::write(c.dir.join("haproxy.cfg"), kubeadm_cfg(&c))?;
            c.start_haproxy()?;
            for n in 1..=3 {
                c.wait_member_state(n, UP, LONG)?;
            }
            Ok(c)
        }
    }
}

/// Restarts (or silences) the three members in turn under 100 new connections a second.
fn bench_run(v: &Variant) -> Result<LoadReport> {
    let mut c = bench_cluster(v.front)?;
    let load = c.https_load(&c.client, v.path, 100, 40, 300)?;
    std::thread::sleep(Duration::from_secs(3));
    for n in 1..=3 {
        match v.restart {
            Restart::Graceful => c.restart_member(n, 15)?,
            Restart::HardKill => {
                c.stop_member(n, 9)?;
                std::thread::sleep(Duration::from_secs(5));
                c.start_member(n)?;
            }
            Restart::Silent => {
                c.member_unreachable(n, true)?;
                std::thread::sleep(Duration::from_secs(5));
                c.member_unreachable(n, false)?;
            }
        }
        c.wait_member_state(n, UP, LONG)?;
        std::thread::sleep(Duration::from_secs(3));
    }
    stop_load(load)
}

/// The benchmark behind `tools/bench --rolling-restart` (not a test: it measures). Writes the
/// table into the file `CPHA_ROLLING_OUT` names (docs/benchmarks.md), from its marker on.
#[test]
#[ignore = "benchmark: tools/bench --rolling-restart"]
fn rolling_restart_benchmark() {
    use cpha_lab::bench::{replace_between, ROLLING_BEGIN, ROLLING_END};
    let cpha = Front::Cpha { extra: "" };
    let cut_at_down = Front::Cpha { extra: "  healthCheck:\n    shutdownSessionsOnDown: true\n" };
    let variants = [
        (cpha, "cpha (defaults)", Restart::Graceful, "/livez"),
        (cpha, "cpha (defaults)", Restart::Graceful, "/version"),
        (cut_at_down, "cpha, `shutdownSessionsOnDown: true` (the former default)", Restart::Graceful, "/version"),
        (cpha, "cpha (defaults)", Restart::HardKill, "/version"),
        (cpha, "cpha (defaults)", Restart::Silent, "/version"),
        (Front::Kubeadm, "HAProxy, kubeadm guide", Restart::Graceful, "/livez"),
        (Front::Kubeadm, "HAProxy, kubeadm guide", Restart::Graceful, "/version"),
        (Front::Kubeadm, "HAProxy, kubeadm guide", Restart::HardKill, "/version"),
        (Front::Kubeadm, "HAProxy, kubeadm guide", Restart::Silent, "/version"),
    ]
    .map(|(front, front_label, restart, path)| Variant { front, front_label, restart, path });
    let mut rows = String::new();
    for v in &variants {
        let r = bench_run(v).unwrap();
        eprintln!("{} {:?}: {}", v.front_label, v.path, summary(&r));
        let window = match (r.first_failure_s, r.last_failure_s) {
            (Some(a), Some(b)) => format!("{a:.1}–{b:.1} s"),
            _ => "–".into(),
        };
        rows.push_str(&format!(
            "| {} | {} | {} | {} of {} | {:.0} | {:.0} | {} |\n",
            v.front_label,
            match v.restart {
                Restart::Graceful => "`/readyz` fails 5 s before each stop",
                Restart::HardKill => "hard kill (SIGKILL), back 5 s later",
                Restart::Silent => "host silent (every packet dropped) for 5 s",
            },
            if v.path == "/livez" { "2–3 ms" } else { "200 ms" },
            r.failed,
            r.ok + r.failed,
            r.max_ms,
            r.p99_ms,
            window
        ));
    }
    let section = format!(
        "{ROLLING_BEGIN}

## Rolling restarts of the apiservers

Three members (the Kubernetes API stand-in as apiserver, each in its own network namespace)
are restarted one after the other while a client on another host makes 100 new TLS connections
a second through the endpoint (at most 40 at once), each one `GET` with `Connection: close`.
A request fails when it gets no complete answer with status 200 within 5 s; the longest
request and the p99 are over the requests that succeeded.

| load balancer | restart of each member | request takes | failed requests | longest request (ms) | p99 (ms) | failures, s into the run |
|---|---|---|---|---|---|---|
{rows}
- **Graceful**: SIGTERM to the member, which fails `/readyz` at once, keeps serving for 5 s
  (kube-apiserver's `--shutdown-delay-duration`), then stops listening, finishes the requests
  in flight and exits; it is started again at once. **Hard kill**: SIGKILL, started again 5 s
  later. **Host silent**: the member's network namespace drops every packet in and out for
  5 s (nftables), as when a host loses power or its link, then lets them through again; the
  process keeps running. The next member follows 3 s after the last one is UP again in
  HAProxy.
- **cpha**: `cpha run` in the retarget topology with the shipped health-check defaults
  (docs/haproxy.md). **kubeadm guide**: HAProxy alone with the configuration of kubeadm's
  high-availability guide (`option httpchk GET /healthz`, `http-check expect status 200`,
  `server ... check check-ssl verify none fall 3 rise 2`, `balance roundrobin`,
  `option redispatch`, `retries 1`; `kubeadm_cfg` in tests/restarts.rs has the whole file).
- Requests of 200 ms are `GET /version`, slowed down by the stand-in; those of 2–3 ms are
  `GET /livez`, which stays 200 while a member shuts down, as kube-apiserver's does.
- Made by `tools/bench --rolling-restart` (`cargo test --release --test restarts --
  --ignored rolling_restart_benchmark`), on the same shared 2-CPU machine as the tables above.

{ROLLING_END}
"
    );
    println!("{section}");
    if let Ok(out) = std::env::var("CPHA_ROLLING_OUT") {
        let old = std::fs::read_to_string(&out).unwrap_or_default();
        std::fs::write(&out, replace_between(&old, ROLLING_BEGIN, ROLLING_END, &section)).unwrap();
    }
}
