//! Every fault, set through the API port's control endpoint, the loopback control port or
//! start-up flags, and cleared again.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

const CM: &str = "/api/v1/namespaces/kube-system/configmaps";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_errors_by_prefix_and_count() {
    let dir = Scratch::new("f-errors");
    let s = Standin::start(dir.path(), &[]);
    s.faults(json!({"errors": [{"status": 503, "pathPrefix": "/api/", "count": 2}]})).await;
    for _ in 0..2 {
        let r = s.get(CM, ADMIN).await;
        r.assert_status(503, "ServiceUnavailable");
        assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    }
    assert_eq!(s.get(CM, ADMIN).await.status, 200, "the count ran out");
    s.faults(json!({"errors": [{"status": 500}]})).await;
    s.get("/apis", ADMIN).await.assert_status(500, "InternalError");
    let r = s.call(Req::new("GET", "/readyz")).await;
    assert_eq!(r.status, 500, "a prefix of / covers health checks too");
    // The control endpoint itself is never faulted; DELETE clears everything.
    let r = s.call(Req::new("DELETE", "/_standin/faults").token(ADMIN)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["faults"]["errors"], json!([]));
    assert_eq!(s.get("/apis", ADMIN).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_and_delay_faults_from_flags() {
    let dir = Scratch::new("f-flags");
    let s = Standin::start(
        dir.path(),
        &[
            "--error-status",
            "502",
            "--error-path-prefix",
            "/apis/",
            "--error-count",
            "1",
            "--delay",
            "2s",
            "--delay-path-prefix",
            "/version",
        ],
    );
    s.get("/apis/discovery.k8s.io/v1", ADMIN).await.assert_status(502, "InternalError");
    assert_eq!(s.get("/apis/discovery.k8s.io/v1", ADMIN).await.status, 200);
    // The delays are long (2 s, 3 s) next to a request on loopback (milliseconds), so "not
    // delayed" is told apart from "delayed" on a loaded machine too: each check compares with
    // the delay itself, not with a guess at how fast the stand-in answers.
    let delay = Duration::from_secs(2);
    let t = Instant::now();
    assert_eq!(s.get("/version", ADMIN).await.status, 200);
    assert!(t.elapsed() >= delay, "{:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(s.get("/api", ADMIN).await.status, 200);
    assert!(t.elapsed() < delay, "the delay is limited to its prefix: {:?}", t.elapsed());
    let delay = Duration::from_secs(3);
    s.faults(json!({"delay": {"ms": delay.as_millis() as u64}})).await;
    let t = Instant::now();
    s.get("/api", ADMIN).await;
    assert!(t.elapsed() >= delay, "{:?}", t.elapsed());
    s.faults(json!({"delay": null})).await;
    let t = Instant::now();
    s.get("/api", ADMIN).await;
    assert!(t.elapsed() < delay, "the delay was cleared: {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_livez_fail_separately() {
    let dir = Scratch::new("f-health");
    let s = Standin::start(dir.path(), &["--fail-readyz"]);
    let r = s.call(Req::new("GET", "/readyz")).await;
    assert_eq!(r.status, 500);
    assert!(r.text.contains("[-]shutdown failed: reason withheld\n"), "{}", r.text);
    assert!(r.text.ends_with("readyz check failed\n"));
    assert_eq!(s.call(Req::new("GET", "/livez")).await.status, 200);
    assert_eq!(s.call(Req::new("GET", "/readyz?exclude=shutdown")).await.status, 200);
    assert_eq!(s.call(Req::new("GET", "/readyz/etcd")).await.text, "ok");
    s.faults(json!({"readyzFail": false, "livezFail": true})).await;
    assert_eq!(s.call(Req::new("GET", "/readyz")).await.status, 200);
    let r = s.call(Req::new("GET", "/livez")).await;
    assert_eq!(r.status, 500);
    assert!(r.text.contains("[-]etcd failed"));
    assert_eq!(s.call(Req::new("GET", "/healthz")).await.status, 500);
    assert_eq!(s.call(Req::new("GET", "/livez/etcd")).await.status, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_watches_send_nothing_until_released() {
    let dir = Scratch::new("f-hang");
    let s = Standin::start(dir.path(), &["--bookmark-interval", "100ms"]);
    let rv = s.get(CM, ADMIN).await.rv();
    let base = format!("{CM}?watch=1&resourceVersion={rv}&allowWatchBookmarks=true");
    let mut events = s.watch(&base, ADMIN).await;
    let mut timed = s.watch(&format!("{base}&timeoutSeconds=1"), ADMIN).await;
    assert_eq!(events.expect(3 * SEC).await["type"], "BOOKMARK");
    s.faults(json!({"hangWatches": true})).await;
    // Frames already handed to the connection may still arrive; then nothing at all: no
    // events, no bookmarks, and no end even past timeoutSeconds.
    for w in [&mut events, &mut timed] {
        let mut drained = 0;
        while let Next::Event(_) = w.next(Duration::from_millis(300)).await {
            drained += 1;
            assert!(drained < 70, "a hung watch keeps sending");
        }
    }
    s.create_cm("kube-system", "while-hung", json!({})).await;
    for w in [&mut events, &mut timed] {
        match w.next(Duration::from_millis(1500)).await {
            Next::Quiet => {}
            other => panic!("a hung watch sent {other:?}"),
        }
    }
    // A new watch gets no response headers while hung.
    let pending = tokio::time::timeout(Duration::from_millis(500), s.send(Req::new("GET", &base).token(ADMIN))).await;
    assert!(pending.is_err(), "a new watch was answered while hung");
    s.faults(json!({"hangWatches": false})).await;
    let ev = events.expect_change(3 * SEC).await;
    assert_eq!(ev["object"]["metadata"]["name"], "while-hung");
    // The timed-out watch may deliver what it held, then ends.
    let deadline = Instant::now() + 3 * SEC;
    loop {
        match timed.next(deadline.saturating_duration_since(Instant::now())).await {
            Next::Event(_) => continue,
            Next::End => break,
            other => panic!("expected the timed watch to end after release, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_watches_close_reset_and_gone() {
    let dir = Scratch::new("f-drop");
    let s = Standin::start(dir.path(), &[]);
    let rv = s.get(CM, ADMIN).await.rv();
    let path = format!("{CM}?watch=1&resourceVersion={rv}");
    let mut a = s.watch(&path, ADMIN).await;
    let mut b = s.watch(&path, ADMIN).await;
    let r = s.faults(json!({"dropWatches": "close"})).await;
    assert_eq!(r.json["droppedWatches"], 2);
    assert!(matches!(a.next(5 * SEC).await, Next::End));
    assert!(matches!(b.next(5 * SEC).await, Next::End));

    let mut c = s.watch(&path, ADMIN).await;
    s.faults(json!({"dropWatches": "reset"})).await;
    match c.next(5 * SEC).await {
        Next::Broken(why) => assert!(!why.is_empty()),
        other => panic!("expected a broken stream, got {other:?}"),
    }

    let mut d = s.watch(&path, ADMIN).await;
    s.faults(json!({"dropWatches": "gone"})).await;
    let ev = d.expect(5 * SEC).await;
    assert_eq!(
        (ev["type"].as_str(), ev["object"]["code"].as_u64(), ev["object"]["reason"].as_str()),
        (Some("ERROR"), Some(410), Some("Expired"))
    );
    assert!(matches!(d.next(5 * SEC).await, Next::End));
    // New watches are unaffected.
    let mut e = s.watch(&path, ADMIN).await;
    s.create_cm("kube-system", "after", json!({})).await;
    assert_eq!(e.expect(5 * SEC).await["type"], "ADDED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_now_compacts_every_older_revision() {
    let dir = Scratch::new("f-expire");
    let s = Standin::start(dir.path(), &[]);
    let a = s.create_cm("kube-system", "a", json!({})).await;
    s.create_cm("kube-system", "b", json!({})).await;
    let old = rv_of(&a);
    let mut ok = s.watch(&format!("{CM}?watch=1&resourceVersion={old}"), ADMIN).await;
    assert_eq!(ok.expect(5 * SEC).await["object"]["metadata"]["name"], "b");
    let r = s.faults(json!({"expireNow": true})).await;
    let current: u64 = r.json["expiredBefore"].as_str().unwrap().parse().unwrap();
    let mut w = s.watch(&format!("{CM}?watch=1&resourceVersion={old}"), ADMIN).await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!((ev["type"].as_str(), ev["object"]["code"].as_u64()), (Some("ERROR"), Some(410)));
    s.get(&format!("{CM}?resourceVersion={old}&resourceVersionMatch=Exact"), ADMIN).await.assert_status(410, "Expired");
    let mut fine = s.watch(&format!("{CM}?watch=1&resourceVersion={current}"), ADMIN).await;
    s.create_cm("kube-system", "c", json!({})).await;
    assert_eq!(fine.expect(5 * SEC).await["object"]["metadata"]["name"], "c");
    // Open watches keep going: compaction only affects where new ones may start.
    assert_eq!(ok.expect(5 * SEC).await["object"]["metadata"]["name"], "c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_control_port_without_authentication() {
    let dir = Scratch::new("f-control");
    let s = Standin::start(dir.path(), &["--control-listen", "127.0.0.1:0"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        if let Some(a) =
            s.stderr().lines().find_map(|l| l.split("control listening ").nth(1).map(|a| a.trim().to_string()))
        {
            break a;
        }
        assert!(Instant::now() < deadline, "no control address in the log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reply = |req: &str| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    let body = r#"{"readyzFail":true}"#;
    let out = reply(&format!(
        "POST /_standin/faults HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"readyzFail\":true"));
    assert_eq!(s.call(Req::new("GET", "/readyz")).await.status, 500);
    let out = reply("GET /api/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 404"), "only the control endpoint is served there: {out}");
    let out =
        reply("POST /_standin/faults HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{\"bad\":1}");
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}
