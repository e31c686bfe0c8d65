//! `--state`: a restarted stand-in keeps its objects and revision counter, a client resuming
//! from a pre-restart resourceVersion gets 410 and relists, and SIGTERM exits cleanly.

use serde_json::json;

use crate::support::*;

const CM: &str = "/api/v1/namespaces/kube-system/configmaps";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_and_old_revisions_expire() {
    let dir = Scratch::new("state");
    let state = dir.path().join("state.json");
    let args = ["--state", state.to_str().unwrap(), "--endpoints", "10.0.0.11"];
    let mut s = Standin::start(dir.path(), &args);
    let a = s.create_cm("kube-system", "cpha-members", json!({"members": "10.0.0.11:6443"})).await;
    let b = s.create_cm("kube-system", "b", json!({})).await;
    let old_rv = rv_of(&a);
    let list = s.get(CM, ADMIN).await;
    let ca_before = std::fs::read(dir.path().join("certs/ca.crt")).unwrap();
    // SIGKILL: what was answered must already be on disk.
    s.kill();
    assert!(!dir.path().join(".state.json.tmp").exists());

    let s = Standin::start(dir.path(), &args);
    assert_eq!(std::fs::read(dir.path().join("certs/ca.crt")).unwrap(), ca_before, "the CA is reused");
    let again = s.get(CM, ADMIN).await;
    assert_eq!(again.json["items"], list.json["items"], "same objects, same resourceVersions and uids");
    assert_eq!(again.rv(), list.rv());
    // Resuming from before the restart: 410 in the stream, then a relist works.
    let mut w = s.watch(&format!("{CM}?watch=1&resourceVersion={old_rv}"), ADMIN).await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!((ev["type"].as_str(), ev["object"]["code"].as_u64()), (Some("ERROR"), Some(410)));
    // From the current revision the watch works and new writes continue the counter.
    let mut w = s.watch(&format!("{CM}?watch=1&resourceVersion={}", again.rv()), ADMIN).await;
    let c = s.create_cm("kube-system", "c", json!({})).await;
    assert!(rv_of(&c) > rv_of(&b));
    let ev = w.expect(5 * SEC).await;
    assert_eq!(ev["object"]["metadata"]["name"], "c");
    // The seeded slice kept its identity (same addresses: no new write).
    let es = s.get("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes", ADMIN).await;
    assert_eq!(es.json["metadata"]["generation"], 1);
    assert!(rv_of(&es.json) < old_rv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_watches_and_exits_zero() {
    let dir = Scratch::new("sigterm");
    let mut s = Standin::start(dir.path(), &[]);
    let mut w = s.watch(&format!("{CM}?watch=1&resourceVersion=1"), ADMIN).await;
    assert_eq!(s.terminate(), Some(0));
    assert!(matches!(w.next(5 * SEC).await, Next::End | Next::Broken(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_78_and_bad_usage_64() {
    let dir = Scratch::new("exitcodes");
    let bin = env!("CARGO_BIN_EXE_kube-standin");
    let cert_dir = dir.path().join("certs");
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().expect("run kube-standin");
    let out =
        run(&["--cert-dir", cert_dir.to_str().unwrap(), "--listen", "127.0.0.1:0", "--control-listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["--cert-dir", cert_dir.to_str().unwrap(), "--write-kubeconfig", "/tmp/x:nobody"]);
    assert_eq!(out.status.code(), Some(78));
    let out = run(&["--cert-dir", cert_dir.to_str().unwrap(), "--token", "no-colon"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(out.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delay_fails_readyz_while_still_serving() {
    let dir = Scratch::new("drain");
    let mut s = Standin::start(dir.path(), &["--shutdown-delay", "2s"]);
    assert_eq!(s.call(Req::new("GET", "/readyz")).await.status, 200);
    let pid = s.child.as_ref().unwrap().id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut saw_failing = false;
    for _ in 0..20 {
        let r = s.call(Req::new("GET", "/readyz")).await;
        if r.status == 500 {
            assert!(r.text.contains("[-]shutdown failed"), "{}", r.text);
            saw_failing = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(saw_failing, "/readyz never failed during the shutdown delay");
    assert_eq!(s.call(Req::new("GET", "/livez")).await.status, 200);
    assert_eq!(s.get(CM, ADMIN).await.status, 200, "requests are still served while draining");
    let child = s.child.as_mut().unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(15), "no exit after the delay");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    s.child = None;
}
