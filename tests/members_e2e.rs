//! A member list that keeps itself, end to end in network namespaces: the agent runs with its
//! own least-privilege identity (`cpha identity`, a ServiceAccount token), hosts are added and
//! removed with `cpha members add/remove` (admin credentials) and reach HAProxy's runtime state
//! without a reload, a rebuilt host and a reused address replace their entries there too, and
//! the drift report appears when the `default/kubernetes` EndpointSlice
//! lists an apiserver the ConfigMap lacks, without changing HAProxy, and the agent renews its
//! own short-lived token again and again with no gap in its watch. Needs root.

#[path = "support/cluster.rs"]
mod cluster;

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use cluster::Cluster;
use cpha_lab::netns::wait_for;

const LONG: Duration = Duration::from_secs(60);

/// The agent's configuration with the agent's own token as its credentials (`extra_members`
/// goes into the members: section).
fn config(c: &Cluster, extra_members: &str) -> Result<std::path::PathBuf> {
    let path = c.write_config("retarget", "nftables", &c.members[0].addr.clone())?;
    let d = c.dir.display();
    let text = std::fs::read_to_string(&path)?.replace(
        &format!("kubernetes:\n  kubeconfig: [{d}/cpha.kubeconfig]\n"),
        &format!(
            "kubernetes:\n  server: https://{}\n  caFile: {d}/pki/ca.crt\n  tokenFile: {d}/agent.token\n",
            c.members[0].addr
        ),
    );
    ensure!(text.contains("tokenFile"), "the kubernetes: section was not replaced:\n{text}");
    let text = text.replace("  stateFile:", &format!("{extra_members}  stateFile:"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `cpha ARGS --config CONFIG --kubeconfig admin.kubeconfig` in the cp namespace.
fn admin_cpha(c: &Cluster, config: &Path, args: &[&str]) -> Result<String> {
    let out =
        c.cp.command(env!("CARGO_BIN_EXE_cpha"))
            .args(args)
            .arg("--config")
            .arg(config)
            .arg("--kubeconfig")
            .arg(c.dir.join("admin.kubeconfig"))
            .output()?;
    ensure!(out.status.success(), "cpha {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The agent's identity, its first member registered, the agent and HAProxy started.
fn started(extra_members: &str) -> Result<(Cluster, std::path::PathBuf)> {
    started_with(Cluster::new(3)?, extra_members, "1h")
}

fn started_with(mut c: Cluster, extra_members: &str, lifetime: &str) -> Result<(Cluster, std::path::PathBuf)> {
    let cfg = config(&c, extra_members)?;
    admin_cpha(&c, &cfg, &["identity", "--duration", lifetime])?;
    // Registered exactly as the cloud-init files do it: the ConfigMap is created by the first.
    admin_cpha(&c, &cfg, &["members", "add", "m1=10.21.0.2:6443"])?;
    admin_cpha(&c, &cfg, &["members", "add", "m2=10.22.0.2:6443"])?;
    c.start_agent(&cfg)?;
    c.start_haproxy()?;
    c.wait_phase(&["balanced"], LONG)?;
    wait_for("two servers UP", Duration::from_secs(20), || {
        Ok((c.servers()?.iter().filter(|(_, _, state)| *state == 2).count() == 2).then_some(()))
    })
    .with_context(|| c.agent_log())?;
    Ok((c, cfg))
}

#[test]
fn a_host_added_with_members_add_appears_in_haproxy_with_no_reload() -> Result<()> {
    let (c, cfg) = started("")?;
    let status = c.status()?;
    ensure!(status["agent"]["members_origin"] == "configmap", "{status}");
    // The agent's watch is made as its ServiceAccount, not as the admin.
    let api_log = std::fs::read_to_string(c.dir.join("standin-10.21.0.2.log"))?;
    ensure!(
        api_log.lines().any(|l| l.contains("watch=true") && l.contains("system:serviceaccount:kube-system:cpha")),
        "no watch by the agent's ServiceAccount in the API's log:\n{}",
        api_log.lines().filter(|l| l.contains("configmaps")).take(5).collect::<Vec<_>>().join("\n")
    );
    let workers = c.workers()?;
    let said = admin_cpha(&c, &cfg, &["members", "add", "m3=10.23.0.2:6443"])?;
    ensure!(said.contains("updated ConfigMap kube-system/cpha-members"), "{said}");
    wait_for("m3 in HAProxy's runtime state and UP", Duration::from_secs(15), || {
        Ok(c.servers()?
            .iter()
            .any(|(name, addr, state)| name == "m3" && addr == "10.23.0.2" && *state == 2)
            .then_some(()))
    })
    .with_context(|| c.agent_log())?;
    assert_eq!(c.workers()?, workers, "adding a member reloaded HAProxy");
    // Adding it again changes nothing; removing it takes it out, still without a reload.
    ensure!(admin_cpha(&c, &cfg, &["members", "add", "m3=10.23.0.2:6443"])?.contains("already listed"));
    admin_cpha(&c, &cfg, &["members", "remove", "m3"])?;
    wait_for("m3 gone from HAProxy", Duration::from_secs(20), || {
        Ok(c.servers()?.iter().all(|(name, _, _)| name != "m3").then_some(()))
    })
    .with_context(|| c.agent_log())?;
    assert_eq!(c.workers()?, workers, "removing a member reloaded HAProxy");
    Ok(())
}

#[test]
fn a_rebuilt_host_and_a_reused_address_replace_their_entries_in_haproxy() -> Result<()> {
    let (c, cfg) = started("")?;
    let workers = c.workers()?;
    let servers = |c: &Cluster| -> Result<Vec<(String, String)>> {
        let mut v: Vec<(String, String)> = c.servers()?.into_iter().map(|(n, a, _)| (n, a)).collect();
        v.sort();
        Ok(v)
    };
    let up = |c: &Cluster, name: &str, addr: &str| -> Result<bool> {
        Ok(c.servers()?.iter().any(|(n, a, state)| n == name && a == addr && *state == 2))
    };

    // m2 rebuilt under its old name at another address: its entry is replaced, and HAProxy's
    // server m2 moves there.
    let said = admin_cpha(&c, &cfg, &["members", "add", "m2=10.23.0.2:6443"])?;
    ensure!(said.contains("replaced m2=10.22.0.2:6443 (the same name)"), "{said}");
    wait_for("m2 at 10.23.0.2 and UP, nothing at 10.22.0.2", Duration::from_secs(20), || {
        let s = servers(&c)?;
        Ok((up(&c, "m2", "10.23.0.2")? && !s.iter().any(|(_, a)| a == "10.22.0.2")).then_some(()))
    })
    .with_context(|| c.agent_log())?;

    // A new host, m4, given the address m2 has now: m2 makes way for it.
    let said = admin_cpha(&c, &cfg, &["members", "add", "m4=10.23.0.2:6443"])?;
    ensure!(said.contains("replaced m2=10.23.0.2:6443 (the same address)"), "{said}");
    wait_for("m4 UP at 10.23.0.2, m2 gone", Duration::from_secs(20), || {
        let s = servers(&c)?;
        Ok((up(&c, "m4", "10.23.0.2")? && s == [("m1".into(), "10.21.0.2".into()), ("m4".into(), "10.23.0.2".into())])
            .then_some(()))
    })
    .with_context(|| c.agent_log())?;
    // The same registration again after a reboot: nothing written, nothing moves.
    ensure!(admin_cpha(&c, &cfg, &["members", "add", "m4=10.23.0.2:6443"])?.contains("already listed"));
    assert_eq!(c.workers()?, workers, "a replacement reloaded HAProxy");
    Ok(())
}

#[test]
fn the_agent_renews_its_own_token_and_its_watch_goes_on() -> Result<()> {
    // Tokens of 10 s (the stand-in allows it; kube-apiserver's minimum is 10 minutes): the
    // agent renews each one when 70-80 % of it has passed.
    const LIFE: Duration = Duration::from_secs(10);
    let c = Cluster::with_standin_args(3, vec!["--min-token-duration".into(), "5s".into()])?;
    let issued = std::time::Instant::now();
    let (mut c, cfg) = started_with(c, "", "10s")?;
    let token_path = c.dir.join("agent.token");
    let first = std::fs::read_to_string(&token_path)?;
    let agent_pid = c.agent.as_ref().context("the agent")?.pid();

    // Three lifetimes and a half: every token seen is replaced before it expires.
    let mut tokens = vec![first.clone()];
    let mut changed_at = issued;
    while issued.elapsed() < LIFE * 7 / 2 {
        std::thread::sleep(Duration::from_millis(200));
        let now = std::fs::read_to_string(&token_path)?;
        if tokens.last() != Some(&now) {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&token_path)?.permissions().mode() & 0o777;
            ensure!(mode == 0o600, "the renewed token file has mode {mode:o}");
            tokens.push(now);
            changed_at = std::time::Instant::now();
        }
        ensure!(changed_at.elapsed() < LIFE, "the token was not renewed within its lifetime:\n{}", c.agent_log());
    }
    let renewals = tokens.len() - 1;
    eprintln!("{renewals} renewals in {:?} with tokens of {LIFE:?}", issued.elapsed());
    ensure!(renewals >= 3, "{renewals} renewals:\n{}", c.agent_log());
    let log = c.agent_log();
    ensure!(
        log.matches("renewed the token of ServiceAccount kube-system/cpha").count() == renewals,
        "one log line per renewal:\n{log}"
    );
    ensure!(!log.contains("Unauthorized") && !log.contains("Forbidden"), "a request was refused:\n{log}");

    // The first token expired long ago; an edit of the list still reaches the agent's watch.
    admin_cpha(&c, &cfg, &["members", "add", "m3=10.23.0.2:6443"])?;
    wait_for("m3 in HAProxy's runtime state and UP", Duration::from_secs(15), || {
        Ok(c.servers()?.iter().any(|(name, _, state)| name == "m3" && *state == 2).then_some(()))
    })
    .with_context(|| c.agent_log())?;
    // The same process all along, and the metric says when the current token ends.
    ensure!(c.agent.as_mut().context("the agent")?.try_wait()?.is_none(), "the agent exited");
    ensure!(c.agent.as_ref().context("the agent")?.pid() == agent_pid);
    let expiry: i64 = grep(&c.metrics()?, "cpha_token_expiry_seconds ")
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .parse()
        .context("cpha_token_expiry_seconds")?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    ensure!(expiry > now && expiry <= now + 11, "cpha_token_expiry_seconds {expiry}, now {now}");
    Ok(())
}

fn set_registrations(c: &Cluster, ips: &[&str]) -> Result<()> {
    let endpoints: Vec<serde_json::Value> =
        ips.iter().map(|ip| serde_json::json!({"addresses": [ip], "conditions": {"ready": true}})).collect();
    let slice = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "https", "protocol": "TCP", "port": 6443}],
    });
    c.kubectl(&["apply", "-f", "-"], Some(&slice.to_string()))?;
    Ok(())
}

#[test]
fn drift_is_reported_when_an_apiserver_registers_that_the_list_lacks() -> Result<()> {
    let (c, cfg) = started("  drift:\n    after: 2s\n")?;
    set_registrations(&c, &["10.21.0.2", "10.22.0.2"])?;
    std::thread::sleep(Duration::from_secs(3));
    let metrics = c.metrics()?;
    ensure!(metrics.lines().any(|l| l == "cpha_member_drift 0"), "in sync: {}", grep(&metrics, "drift"));
    ensure!(c.status()?["agent"]["drift"].is_null(), "in sync, yet: {}", c.status()?);

    // m3 registers itself as an apiserver; nobody listed it.
    let registered = std::time::Instant::now();
    set_registrations(&c, &["10.21.0.2", "10.22.0.2", "10.23.0.2"])?;
    let status = wait_for("the drift in cpha status", Duration::from_secs(20), || {
        let s = c.status()?;
        Ok(s["agent"]["drift"].is_string().then_some(s))
    })
    .with_context(|| c.agent_log())?;
    let took = registered.elapsed();
    eprintln!("drift reported {took:?} after the EndpointSlice changed (members.drift.after 2s)");
    ensure!(took >= Duration::from_secs(2), "reported before drift.after: {took:?}");
    let drift = status["agent"]["drift"].as_str().unwrap_or_default();
    ensure!(drift.contains("registered but not listed: 10.23.0.2:6443"), "{drift}");
    let out = c.cp.command(env!("CARGO_BIN_EXE_cpha")).arg("status").output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("drift       the member list"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(grep(&c.metrics()?, "cpha_member_drift ") == "cpha_member_drift 1");
    ensure!(c.agent_log().contains("registered but not listed: 10.23.0.2:6443"), "no log line");
    wait_for("the MembersDrift Event", Duration::from_secs(15), || {
        let out = c.kubectl(&["get", "events.events.k8s.io", "-n", "kube-system", "-o", "json"], None)?;
        Ok(out.contains("MembersDrift").then_some(()))
    })?;
    // A report only: HAProxy still has the two listed members.
    let names: Vec<String> = c.servers()?.into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(names, ["m1", "m2"], "the drift changed HAProxy");

    // Listing it ends the drift.
    admin_cpha(&c, &cfg, &["members", "add", "m3=10.23.0.2:6443"])?;
    wait_for("the drift to clear", Duration::from_secs(20), || {
        Ok((grep(&c.metrics()?, "cpha_member_drift ") == "cpha_member_drift 0").then_some(()))
    })
    .with_context(|| c.agent_log())?;
    ensure!(c.status()?["agent"]["drift"].is_null());
    Ok(())
}

fn grep(text: &str, what: &str) -> String {
    text.lines().filter(|l| l.contains(what) && !l.starts_with('#')).collect::<Vec<_>>().join("\n")
}
