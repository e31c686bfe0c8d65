//! The alert rules and the dashboard in `deploy/monitoring/`: valid for their tools, and every
//! metric they name exported by a running agent (and by HAProxy's exporter for `haproxy_*`).

#[path = "support/cluster.rs"]
mod cluster;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use cluster::Cluster;

fn file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring").join(name)
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool").args(args).output().expect("promtool (Debian package prometheus) is installed");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let rules = file("cpha-alerts.yaml");
    let text = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(text.contains("SUCCESS: 13 rules found"), "{text}");
    promtool(&["test", "rules", file("cpha-alerts.test.yaml").to_str().unwrap()]);
    // And promtool really checks: a broken expression is refused.
    let dir = std::env::temp_dir().join(format!("cpha-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let broken = dir.join("broken.yaml");
    std::fs::write(&broken, std::fs::read_to_string(&rules).unwrap().replace("== 0\n", "== \n")).unwrap();
    let out = Command::new("promtool").args(["check", "rules", broken.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success(), "a broken rule file passed promtool");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every metric name in the rules' and the dashboard's expressions.
fn names_used() -> BTreeSet<String> {
    let mut exprs: Vec<String> = Vec::new();
    let rules = std::fs::read_to_string(file("cpha-alerts.yaml")).unwrap();
    exprs.push(rules);
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file("cpha-dashboard.json")).unwrap()).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for p in panels {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel without targets: {p}"));
        assert!(!targets.is_empty(), "{p}");
        for t in targets {
            exprs.push(t["expr"].as_str().unwrap_or_else(|| panic!("target without expr: {t}")).to_string());
        }
    }
    let mut names = BTreeSet::new();
    for e in exprs {
        let bytes: Vec<char> = e.chars().collect();
        let mut i = 0;
        while i < bytes.len() {
            let at_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == '_');
            let rest: String = bytes[i..].iter().collect();
            if at_word && (rest.starts_with("cpha_") || rest.starts_with("haproxy_")) {
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                i += name.len();
                names.insert(name);
            } else {
                i += 1;
            }
        }
    }
    names
}

fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let used = names_used();
    assert!(used.len() >= 12, "{used:?}");
    let mut c = Cluster::new(3).unwrap();
    c.set_members(&c.member_list(&[1, 2, 3])).unwrap();
    let config = c.write_config("retarget", "nftables", &c.members[0].addr.clone()).unwrap();
    c.start_agent(&config).unwrap();
    // From the start, before HAProxy runs: absence-based alerts need every series at once.
    let early = exported(&c.metrics().unwrap());
    for name in ["cpha_endpoint_carried", "cpha_member_updates_total", "cpha_applies_total", "cpha_reloads_total"] {
        assert!(early.contains(name), "{name} missing before HAProxy runs: {early:?}");
    }
    c.start_haproxy().unwrap();
    c.wait_phase(&["balanced"], Duration::from_secs(60)).unwrap();
    cpha_lab::netns::wait_for("three servers UP", Duration::from_secs(15), || {
        Ok((c.servers()?.iter().filter(|(_, _, s)| *s == 2).count() == 3).then_some(()))
    })
    .unwrap();
    let text = c.metrics().unwrap();
    let haproxy =
        c.cp.command(cluster::bin("cpha-lab"))
            .args(["http", "--url", "http://127.0.0.1:8404/metrics"])
            .output()
            .unwrap();
    let haproxy: serde_json::Value = serde_json::from_slice(&haproxy.stdout).unwrap();
    let mut all = exported(&text);
    all.extend(exported(haproxy["body"].as_str().unwrap_or_default()));
    // The virtual IP's series exist on hosts with a `vip:` section; tests/vip.rs checks those.
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !n.starts_with("cpha_vip_") && !n.starts_with("cpha_vrrp_"))
        .filter(|n| !all.contains(*n))
        .collect();
    assert!(missing.is_empty(), "named by deploy/monitoring but not exported: {missing:?}\n{text}");
    for line in [
        "cpha_endpoint_carried{carrier=\"haproxy\"} 1",
        "cpha_endpoint_carried{carrier=\"forward\"} 0",
        "cpha_backend_servers_up 3",
    ] {
        cpha_lab::netns::wait_for(line, Duration::from_secs(5), || {
            Ok(c.metrics()?.lines().any(|l| l == line).then_some(()))
        })
        .unwrap();
    }
    assert_eq!(text.matches("cpha_backend_server_up{server=").count(), 3, "{text}");
}
