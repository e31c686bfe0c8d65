//! Member sources that read the Kubernetes API (ConfigMap, EndpointSlice), driven through the
//! real `cpha members` binary against the real API stand-in (`kube-standin`) on loopback:
//! updates, rejections, watch faults, credentials that appear late, RBAC limited to one
//! object, the state file and talking to the members directly.
//!
//! Build the stand-in first: `cargo build -p kube-standin`.

#[path = "support/freeze.rs"]
mod freeze;
#[path = "support/standin.rs"]
mod standin;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;

use standin::{state_members, Scratch, Standin, Watch, CPHA_TOKEN, OTHER_TOKEN};

const T: Duration = Duration::from_secs(30);

/// Writes cpha's configuration with `source`, the state file in `dir`, at most 4 members,
/// `cpha.conf` as kubeconfig and a 2 s watch timeout; `members_extra` and `kube_extra` are
/// appended to their sections (`kube_extra` may set `kubeconfig` or `inCluster`, and
/// `directToMembers`, off by default).
fn config(dir: &Scratch, source: &str, members_extra: &str, kube_extra: &str) -> Result<String> {
    let path = dir.join("cpha.yaml");
    let mut kube = String::from(kube_extra);
    if !kube_extra.contains("kubeconfig:") && !kube_extra.contains("inCluster:") {
        kube.push_str(&format!("  kubeconfig: [{}]\n", dir.join("cpha.conf").display()));
    }
    if !kube_extra.contains("directToMembers:") {
        kube.push_str("  directToMembers: false\n");
    }
    let text = format!(
        "# Other sections belong to other commands and are skipped.\nhaproxy:\n  anything: [1, 2]\n\
         members:\n  source: {source}\n  stateFile: {state}\n  maxMembers: 4\n{members_extra}\
         kubernetes:\n  watchTimeout: 2s\n  pollInterval: 200ms\n{kube}",
        state = dir.join("state.json").display(),
    );
    std::fs::write(&path, text)?;
    Ok(path.display().to_string())
}

/// [`config`] with a 30 s watch timeout: an update that arrives within [`BY_WATCH`] came
/// through the open watch, not through the relist at the watch's end (30 s after it started).
fn config_long_watch(dir: &Scratch, source: &str) -> Result<String> {
    let path = config(dir, source, "", "")?;
    let text = std::fs::read_to_string(&path)?;
    ensure!(text.contains("  watchTimeout: 2s\n"), "config() no longer sets watchTimeout: {text}");
    std::fs::write(&path, text.replace("  watchTimeout: 2s\n", "  watchTimeout: 30s\n"))?;
    Ok(path)
}

/// How soon an update through an open watch must arrive: a sixth of the 30 s relist of
/// [`config_long_watch`], so a loaded machine does not fail the test and a source that only
/// relists still does.
const BY_WATCH: Duration = Duration::from_secs(5);

fn state(dir: &Scratch) -> Result<Vec<String>> {
    state_members(&dir.join("state.json"))
}

#[test]
fn configmap_initial_list_updates_and_rejections() -> Result<()> {
    let dir = Scratch::new("list");
    let api = Standin::start(dir.path(), &[])?;
    api.set_members("# control plane\n127.0.0.11\n127.0.0.12:7443\n")?;
    api.kubeconfig(&dir.join("cpha.conf"), CPHA_TOKEN, None)?;
    let mut w = Watch::start(&["--config", &config_long_watch(&dir, "configMap")?])?;
    w.accepted("configmap", &["127.0.0.11:6443", "127.0.0.12:7443"], T)?;

    // An update arrives through the watch, long before the watch would end and relist.
    let start = Instant::now();
    api.set_members("- 127.0.0.11\n- 127.0.0.13\n")?;
    w.accepted("configmap", &["127.0.0.11:6443", "127.0.0.13:6443"], 2 * BY_WATCH)?;
    let took = start.elapsed();
    ensure!(took < BY_WATCH, "the update took {took:?}");
    standin::state_becomes(&dir.join("state.json"), &["127.0.0.11:6443", "127.0.0.13:6443"])?;

    // Malformed, over the cap, empty: each rejected with its reason, the last good set kept.
    let bad = [
        ("127.0.0.11, 127.0.0.14:99999", "entry 2"),
        ("127.0.0.1, 127.0.0.2, 127.0.0.3, 127.0.0.4, 127.0.0.5", "more than 4"),
        ("# nothing\n", "is empty"),
        // A HAProxy line or section pasted in: one entry per line, so each line is one invalid
        // entry (named in the reason), never a set of words that each pass as a member.
        (
            "127.0.0.11\nserver evil 10.201.66.6:6443 check",
            "entry 2 of the member list, \"server evil 10.201.66.6:6443 check\", is invalid",
        ),
        ("127.0.0.11\nbackend evil\n  mode http", "entry 2 of the member list, \"backend evil\", is invalid"),
        // Last: the value the next step keeps while it changes another key.
        ("127.0.0.11\n127.0.0.15 #injected", "entry 2"),
    ];
    for (text, reason) in bad {
        api.set_members(text)?;
        let (v, _) = w.until("the next event", Duration::from_secs(5), |_| true)?;
        assert_eq!(v["event"], "rejected", "{text:?} gave {v}");
        assert_eq!(v["source"], "configmap");
        let got = v["reason"].as_str().unwrap();
        assert!(got.contains(reason), "{text:?}: {got}");
        assert_eq!(state(&dir)?, ["127.0.0.11:6443", "127.0.0.13:6443"], "the state file keeps the good set");
    }
    // A change of another key is no update.
    api.put_configmap(standin::NAME, &[("members", "127.0.0.11\n127.0.0.15 #injected"), ("note", "hi")])?;
    w.quiet_for(Duration::from_millis(1500))?;

    api.set_members("127.0.0.16")?;
    w.accepted("configmap", &["127.0.0.16:6443"], Duration::from_secs(5))?;
    w.stop()?;
    assert_eq!(state(&dir)?, ["127.0.0.16:6443"]);
    Ok(())
}

#[test]
fn configmap_watch_survives_faults_without_losing_updates() -> Result<()> {
    let dir = Scratch::new("faults");
    let mut api = Standin::start(dir.path(), &[])?;
    api.set_members("127.0.0.11")?;
    api.kubeconfig(&dir.join("cpha.conf"), CPHA_TOKEN, None)?;
    let mut w = Watch::start(&["--config", &config(&dir, "configMap", "", "")?])?;
    w.accepted("configmap", &["127.0.0.11:6443"], T)?;

    // A connection reset in the middle of the watch.
    api.faults(json!({"dropWatches": "reset"}))?;
    api.set_members("127.0.0.12")?;
    w.accepted("configmap", &["127.0.0.12:6443"], T)?;

    // A hung watch: updates made while it hangs arrive once it answers again.
    api.faults(json!({"hangWatches": true}))?;
    api.set_members("127.0.0.13")?;
    api.set_members("127.0.0.13, 127.0.0.14")?;
    std::thread::sleep(Duration::from_secs(3));
    api.faults(json!({"hangWatches": false}))?;
    w.accepted("configmap", &["127.0.0.13:6443", "127.0.0.14:6443"], T)?;

    // 410 Gone inside the stream: the watcher lists again and sees the change made meanwhile.
    api.faults(json!({"expireNow": true, "dropWatches": "gone"}))?;
    api.set_members("127.0.0.15")?;
    w.accepted("configmap", &["127.0.0.15:6443"], T)?;

    // 410 Gone answered to the watch request itself (HTTP 410, no stream): another object's
    // change moves the resourceVersion past cpha's, the history is compacted, and the watch is
    // closed. kube-rs alone would retry the expired resourceVersion forever.
    api.set_members("127.0.0.16")?;
    w.accepted("configmap", &["127.0.0.16:6443"], T)?;
    api.faults(json!({"watchExpiredAsHttp": true}))?;
    api.put_configmap("unrelated", &[("x", "1")])?;
    api.faults(json!({"expireNow": true, "dropWatches": "close"}))?;
    api.set_members("127.0.0.17")?;
    w.accepted("configmap", &["127.0.0.17:6443"], T)?;
    api.faults(json!({"watchExpiredAsHttp": false}))?;

    // A restart of the API: the change made right after it comes back, while cpha is still
    // backing off, is not lost.
    api.stop()?;
    w.problem("cannot read ConfigMap kube-system/cpha-members", T)?;
    api.restart()?;
    api.set_members("127.0.0.18")?;
    w.accepted("configmap", &["127.0.0.18:6443"], Duration::from_secs(60))?;
    api.set_members("127.0.0.19")?;
    w.accepted("configmap", &["127.0.0.19:6443"], Duration::from_secs(5))?;

    // No set was skipped, none appeared twice in a row, none came from elsewhere.
    let sets: Vec<String> = w.accepted_sets().into_iter().map(|(o, m)| format!("{o} {}", m.join(","))).collect();
    assert_eq!(
        sets,
        [
            "configmap 127.0.0.11:6443",
            "configmap 127.0.0.12:6443",
            "configmap 127.0.0.13:6443",
            "configmap 127.0.0.13:6443,127.0.0.14:6443",
            "configmap 127.0.0.15:6443",
            "configmap 127.0.0.16:6443",
            "configmap 127.0.0.17:6443",
            "configmap 127.0.0.18:6443",
            "configmap 127.0.0.19:6443",
        ]
    );
    w.stop()
}

/// A dead watch is given up in seconds (a few watch timeouts and read timeouts), not after
/// kube-rs's default 295 s: the update behind it arrives within 45 s.
#[test]
fn a_dead_watch_connection_is_given_up_long_before_kube_rs_default_timeout() -> Result<()> {
    let dir = Scratch::new("dead");
    let api = Standin::start(dir.path(), &[])?;
    api.set_members("127.0.0.11")?;
    let proxy = freeze::FreezeProxy::start(api.addr)?;
    let via_proxy = format!("https://{}", proxy.addr);
    api.kubeconfig(&dir.join("cpha.conf"), CPHA_TOKEN, Some(&via_proxy))?;
    let mut w = Watch::start(&["--config", &config(&dir, "configMap", "", "")?])?;
    w.accepted("configmap", &["127.0.0.11:6443"], T)?;

    // Every open connection goes silent without a reset; new ones work. With a 2 s watch
    // timeout the dead watch is given up after about 7 s (a pooled connection that is dead too
    // costs one read timeout, 7 s more); kube-rs's defaults would wait about 295 s.
    ensure!(proxy.freeze() > 0, "cpha has no connection open through the proxy");
    let start = Instant::now();
    api.set_members("127.0.0.12")?;
    w.accepted("configmap", &["127.0.0.12:6443"], Duration::from_secs(45))?;
    eprintln!("the update arrived {:?} after the freeze", start.elapsed());
    w.stop()
}

#[test]
fn configmap_deleted_or_key_missing_keeps_the_last_good_set() -> Result<()> {
    let dir = Scratch::new("deleted");
    let api = Standin::start(dir.path(), &[])?;
    api.kubeconfig(&dir.join("cpha.conf"), CPHA_TOKEN, None)?;
    // The ConfigMap does not exist yet.
    let mut w = Watch::start(&["--config", &config(&dir, "configMap", "", "")?])?;
    w.problem("ConfigMap kube-system/cpha-members does not exist", T)?;
    api.set_members("127.0.0.11, 127.0.0.12")?;
    w.accepted("configmap", &["127.0.0.11:6443", "127.0.0.12:6443"], T)?;

    api.delete_configmap(standin::NAME)?;
    let v = w.problem("ConfigMap kube-system/cpha-members was deleted", Duration::from_secs(5))?;
    assert_eq!(v["kind"], "missing");
    assert_eq!(state(&dir)?, ["127.0.0.11:6443", "127.0.0.12:6443"]);

    // Back with the same list: it is news again, the source is back.
    api.set_members("127.0.0.11, 127.0.0.12")?;
    w.accepted("configmap", &["127.0.0.11:6443", "127.0.0.12:6443"], Duration::from_secs(5))?;

    api.put_configmap(standin::NAME, &[("other", "127.0.0.99")])?;
    let v = w.problem("has no key \"members\"", Duration::from_secs(5))?;
    assert_eq!(v["kind"], "missing");
    w.quiet_for(Duration::from_millis(1000))?;
    assert_eq!(state(&dir)?, ["127.0.0.11:6443", "127.0.0.12:6443"]);

    api.set_members("127.0.0.13")?;
    w.accepted("configmap", &["127.0.0.13:6443"], Duration::from_secs(5))?;
    let sets = w.accepted_sets();
    assert_eq!(sets.len(), 3, "only whole lists were accepted: {sets:?}");
    w.stop()
}

#[test]
fn rbac_limited_to_the_one_configmap() -> Result<()> {
    let dir = Scratch::new("rbac");
    let api = Standin::start(dir.path(), &[])?;
    api.set_members("127.0.0.11")?;
    // CPHA_TOKEN may get, list and watch kube-system/cpha-members only: it works because the
    // watch names the object with a field selector.
    api.kubeconfig(&dir.join("cpha.conf"), CPHA_TOKEN, None)?;
    let mut w = Watch::start(&["--config", &config(&dir, "configMap", "", "")?])?;
    w.accepted("configmap", &["127.0.0.11:6443"], T)?;
    w.stop()?;

    // A token for another name is refused, and says so.
    api.kubeconfig(&dir.join("cpha.conf"), OTHER_TOKEN, None)?;
    let mut w = Watch::start(&["--config", &config(&dir, "configMap", "", "")?, "--state-file", ""])?;
    let v = w.problem("refused", T)?;
    assert!(v["message"].as_str().unwrap().contains("403 Forbidden"), "{v}");
    assert!(w.accepted_sets().is_empty());
    w.stop()
}

#[test]
fn endpointslice_source() -> Result<()> {
    let dir = Scratch::new("slice");
    let api = Standin::start(dir.path(), &["--endpoints", "127.0.0.11,127.0.0.12", "--endpoints-port", "6443"])?;
    api.kubeconfig(&dir.join("cpha.conf"), standin::ADMIN_TOKEN, None)?;
    let mut w = Watch::start(&["--config", &config_long_watch(&dir, "endpointSlice")?])?;
    w.accepted("endpointslice", &["127.0.0.11:6443", "127.0.0.12:6443"], T)?;
    let start = Instant::now();
    api.set_endpoints(&["127.0.0.12", "127.0.0.13"], 7443)?;
    w.accepted("endpointslice", &["127.0.0.12:7443", "127.0.0.13:7443"], 2 * BY_WATCH)?;
    ensure!(start.elapsed() < BY_WATCH, "the update took {:?}", start.elapsed());
    w.stop()?;

    // The one-shot form prints the members and exits 0.
    let out =
        standin::cpha_command(&["members", "--config", &dir.join("cpha.yaml").display().to_string()], &[]).output()?;
    ensure!(out.status.success(), "cpha members failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout)?, "127.0.0.12:7443\n127.0.0.13:7443\n");
    Ok(())
}

#[test]
fn waits_for_credentials_that_appear_later() -> Result<()> {
    let dir = Scratch::new("creds");
    let api_dir = Scratch::new("creds-api");
    // Candidates in order: admin.conf, which will have no rights, then super-admin.conf.
    let (admin, super_admin) = (dir.join("admin.conf"), dir.join("super-admin.conf"));
    let kube = format!("  kubeconfig: [{}, {}]\n", admin.display(), super_admin.display());
    let cfg = config(&dir, "configMap", "", &kube)?;

    let mut w = Watch::start(&["--config", &cfg])?;
    let v = w.problem("waiting for Kubernetes credentials", T)?;
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("admin.conf: does not exist yet"), "{message}");
    assert!(message.contains("super-admin.conf: does not exist yet"), "{message}");

    // The API comes up and the files are written, admin.conf first without rights.
    let api = Standin::start(api_dir.path(), &[])?;
    api.set_members("127.0.0.11")?;
    api.kubeconfig(&admin, OTHER_TOKEN, None)?;
    w.problem("refused", T)?;
    api.kubeconfig(&super_admin, CPHA_TOKEN, None)?;
    w.accepted("configmap", &["127.0.0.11:6443"], T)?;
    w.stop()
}

#[test]
fn token_file_credentials_from_the_environment_follow_rotation() -> Result<()> {
    let dir = Scratch::new("token");
    let api = Standin::start(dir.path(), &[])?;
    api.set_members("127.0.0.11")?;
    let token = dir.join("token");
    std::fs::write(&token, "not-a-valid-token\n")?;
    let cfg = dir.join("cpha.yaml");
    std::fs::write(
        &cfg,
        "members:\n  source: configMap\n  stateFile: ''\nkubernetes:\n  directToMembers: false\n  watchTimeout: 2s\n",
    )?;
    let env = [
        ("CPHA_KUBE_SERVER", api.url()),
        ("CPHA_KUBE_CA_FILE", api.ca().display().to_string()),
        ("CPHA_KUBE_TOKEN_FILE", token.display().to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut w = Watch::start_with_env(&["--config", &cfg.display().to_string()], &env)?;
    let v = w.problem("401 Unauthorized", T)?;
    assert!(v["message"].as_str().unwrap().contains("token file"), "{v}");

    // The token is rotated by a rename, as the kubelet does: the next request uses it (kube-rs
    // alone would keep the old one for up to a minute).
    let start = Instant::now();
    std::fs::write(dir.join("token.new"), CPHA_TOKEN)?;
    std::fs::rename(dir.join("token.new"), &token)?;
    w.accepted("configmap", &["127.0.0.11:6443"], Duration::from_secs(40))?;
    ensure!(start.elapsed() < Duration::from_secs(40), "rotation took {:?}", start.elapsed());
    w.stop()
}

#[test]
fn in_cluster_service_account_waits_for_its_token() -> Result<()> {
    let dir = Scratch::new("incluster");
    let api = Standin::start(dir.path(), &[])?;
    api.set_members("127.0.0.11")?;
    // The DaemonSet shape: the service account's files (here in a directory of our own, as a
    // projected token volume would be) and the service's address from the environment.
    let sa = dir.join("serviceaccount");
    std::fs::create_dir_all(&sa)?;
    std::fs::copy(api.ca(), sa.join("ca.crt"))?;
    std::fs::write(sa.join("namespace"), "kube-system\n")?;
    let kube = format!("  inCluster: true\n  serviceAccountDir: {}\n", sa.display());
    let cfg = config(&dir, "configMap", "", &kube)?;
    let port = api.addr.port().to_string();
    let env = [("KUBERNETES_SERVICE_HOST", "127.0.0.1"), ("KUBERNETES_SERVICE_PORT", port.as_str())];
    let mut w = Watch::start_with_env(&["--config", &cfg], &env)?;
    let v = w.problem("waiting for Kubernetes credentials", T)?;
    assert!(v["message"].as_str().unwrap().contains("token: does not exist yet"), "{v}");
    std::fs::write(sa.join("token"), CPHA_TOKEN)?;
    w.accepted("configmap", &["127.0.0.11:6443"], T)?;
    w.stop()
}

#[test]
fn state_file_starts_when_the_api_is_down_and_the_live_set_replaces_it() -> Result<()> {
    let dir = Scratch::new("state");
    let mut api = Standin::start(dir.path(), &[])?;
    api.set_members("127.0.0.11, 127.0.0.12")?;
    api.kubeconfig(&dir.join("cpha.conf"), CPHA_TOKEN, None)?;
    let cfg = config(&dir, "configMap", "", "")?;
    let mut w = Watch::start(&["--config", &cfg])?;
    w.accepted("configmap", &["127.0.0.11:6443", "127.0.0.12:6443"], T)?;
    w.stop()?;
    assert_eq!(state(&dir)?, ["127.0.0.11:6443", "127.0.0.12:6443"]);

    // The API goes down and its list changes meanwhile (the stand-in keeps its objects).
    api.set_members("127.0.0.13")?;
    api.stop()?;
    let mut w = Watch::start(&["--config", &cfg])?;
    w.accepted("cache", &["127.0.0.11:6443", "127.0.0.12:6443"], T)?;
    w.problem("cannot read ConfigMap", T)?;
    // The one-shot form does not print the cache as if it were the source's answer.
    let out = standin::cpha_command(&["members", "--config", &cfg, "--timeout", "2s"], &[]).output()?;
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());

    // The cache is only a starting point: the live set replaces it, though it is "older".
    api.restart()?;
    w.accepted("configmap", &["127.0.0.13:6443"], Duration::from_secs(60))?;
    w.stop()?;
    assert_eq!(state(&dir)?, ["127.0.0.13:6443"]);
    Ok(())
}

#[test]
fn talks_to_the_members_directly_when_the_kubeconfig_server_is_unreachable() -> Result<()> {
    let dir = Scratch::new("direct");
    let api = Standin::start(dir.path(), &[])?;
    let member = api.addr.to_string();
    api.set_members(&format!("127.0.0.11:6443\n{member}\n"))?;
    // The kubeconfig names a server nobody listens on (the load balancer before it exists).
    let nowhere = unreachable_url()?;
    api.kubeconfig(&dir.join("cpha.conf"), CPHA_TOKEN, Some(&nowhere))?;
    let seed = format!("  static: ['{member}']\n");

    // Without talking to members directly, nothing can be read.
    let cfg = config(&dir, "configMap", &seed, "")?;
    let mut w = Watch::start(&["--config", &cfg, "--state-file", ""])?;
    w.accepted("seed", &[&member], T)?;
    let v = w.problem("cannot read ConfigMap", T)?;
    assert!(v["message"].as_str().unwrap().contains("onnect"), "{v}");
    w.stop()?;

    // With it, the seed's members are asked directly (TLS checked for the IP address), the
    // dead one first (127.0.0.1:1 sorts first) and the live one within the same request.
    let seed = format!("  static: ['127.0.0.1:1', '{member}']\n");
    let cfg = config(&dir, "configMap", &seed, "  directToMembers: true\n")?;
    let mut w = Watch::start(&["--config", &cfg, "--state-file", ""])?;
    w.accepted("seed", &["127.0.0.1:1", &member], T)?;
    w.accepted("configmap", &[&member, "127.0.0.11:6443"], T)?;
    assert!(
        !w.seen.iter().any(|v| v["event"] == "problem"),
        "a dead member is skipped within the same request: {:#?}",
        w.seen
    );
    w.stop()
}

/// An https URL on loopback where nothing listens (a port bound and released).
fn unreachable_url() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    drop(l);
    Ok(format!("https://{addr}"))
}
