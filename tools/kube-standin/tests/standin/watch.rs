//! LIST + WATCH continuity, bookmarks, timeoutSeconds, 410 for an expired resourceVersion (in
//! the stream, as kube-apiserver does, and as HTTP on request), streaming lists and selector
//! transitions.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

const CM: &str = "/api/v1/namespaces/kube-system/configmaps";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_then_watch_continues_from_the_list_revision() {
    let dir = Scratch::new("listwatch");
    let s = Standin::start(dir.path(), &[]);
    let a = s.create_cm("kube-system", "a", json!({"v": "1"})).await;
    let list = s.get(CM, ADMIN).await;
    let list_rv = list.rv();
    assert_eq!(list_rv, rv_of(&a));
    // Changes made between the LIST and the WATCH are not lost.
    let b = s.create_cm("kube-system", "b", json!({})).await;
    let mut w = s.watch(&format!("{CM}?watch=1&resourceVersion={list_rv}&allowWatchBookmarks=true"), ADMIN).await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!(ev["type"], "ADDED");
    assert_eq!(ev["object"], b, "the event carries the object as stored, kind included");
    let r = s.patch(&format!("{CM}/a"), ADMIN, "application/merge-patch+json", r#"{"data":{"v":"2"}}"#).await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!(ev["type"], "MODIFIED");
    assert_eq!(ev["object"]["data"]["v"], "2");
    assert_eq!(rv_of(&ev["object"]), r.rv());
    s.delete(&format!("{CM}/b"), ADMIN, None).await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!(ev["type"], "DELETED");
    assert_eq!(ev["object"]["metadata"]["name"], "b");
    assert!(rv_of(&ev["object"]) > r.rv());
    // Objects in other namespaces or of other kinds do not show up.
    s.create_cm("default", "elsewhere", json!({})).await;
    assert!(matches!(w.next(Duration::from_millis(500)).await, Next::Quiet));

    // A watch from an older revision replays exactly the later changes, in order.
    let mut replay = s.watch(&format!("{CM}?watch=true&resourceVersion={list_rv}"), ADMIN).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let ev = replay.expect(5 * SEC).await;
        seen.push((
            ev["type"].as_str().unwrap().to_string(),
            ev["object"]["metadata"]["name"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(seen, [("ADDED".into(), "b".into()), ("MODIFIED".into(), "a".into()), ("DELETED".into(), "b".into())]);
    // Without a resourceVersion, the watch starts with the current state as ADDED events.
    let mut fresh = s.watch(&format!("{CM}?watch=1"), ADMIN).await;
    let ev = fresh.expect(5 * SEC).await;
    assert_eq!((ev["type"].as_str(), ev["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("a")));
    assert!(matches!(fresh.next(Duration::from_millis(300)).await, Next::Quiet));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_only_when_allowed() {
    let dir = Scratch::new("bookmark");
    let s = Standin::start(dir.path(), &["--bookmark-interval", "200ms"]);
    let a = s.create_cm("kube-system", "a", json!({})).await;
    let rv = rv_of(&a);
    let mut w = s.watch(&format!("{CM}?watch=1&resourceVersion={rv}&allowWatchBookmarks=true"), ADMIN).await;
    let ev = w.expect(3 * SEC).await;
    assert_eq!(ev["type"], "BOOKMARK");
    assert_eq!(ev["object"]["kind"], "ConfigMap");
    assert_eq!(ev["object"]["apiVersion"], "v1");
    assert!(rv_of(&ev["object"]) >= rv);
    assert!(ev["object"]["metadata"].get("name").is_none());
    // A bookmark never goes back behind a delivered event.
    let b = s.create_cm("kube-system", "b", json!({})).await;
    let ev = w.expect_change(3 * SEC).await;
    assert_eq!(ev["type"], "ADDED");
    let bm = w.expect(3 * SEC).await;
    assert_eq!(bm["type"], "BOOKMARK");
    assert!(rv_of(&bm["object"]) >= rv_of(&b));

    let mut plain = s.watch(&format!("{CM}?watch=1&resourceVersion={rv}"), ADMIN).await;
    match plain.next(Duration::from_millis(800)).await {
        Next::Event(v) => assert_ne!(v["type"], "BOOKMARK", "bookmark sent though not allowed"),
        Next::Quiet => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_seconds_ends_the_stream() {
    let dir = Scratch::new("timeout");
    let s = Standin::start(dir.path(), &[]);
    let started = Instant::now();
    let mut w = s.watch(&format!("{CM}?watch=1&resourceVersion=1&timeoutSeconds=2"), ADMIN).await;
    match w.next(15 * SEC).await {
        Next::End => {}
        other => panic!("expected a clean end, got {other:?}"),
    }
    // Ends at the timeout, not before, and not at some later cut-off (3 times the timeout).
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(6), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_resource_version_gets_410() {
    let dir = Scratch::new("gone");
    let s = Standin::start(dir.path(), &["--history-size", "3"]);
    let first = s.create_cm("kube-system", "a", json!({})).await;
    let old = rv_of(&first);
    for i in 0..4 {
        s.create_cm("kube-system", &format!("n{i}"), json!({})).await;
    }
    // kube-apiserver answers 200 and an ERROR event, then ends the stream.
    let mut w = s.watch(&format!("{CM}?watch=1&resourceVersion={old}"), ADMIN).await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!(ev["type"], "ERROR");
    let st = &ev["object"];
    assert_eq!(
        (st["kind"].as_str(), st["code"].as_u64(), st["reason"].as_str()),
        (Some("Status"), Some(410), Some("Expired"))
    );
    assert!(st["message"].as_str().unwrap().starts_with(&format!("too old resource version: {old} (")), "{st}");
    assert!(matches!(w.next(5 * SEC).await, Next::End));
    // Still inside the window: fine.
    let r = s.get(CM, ADMIN).await;
    let mut ok = s.watch(&format!("{CM}?watch=1&resourceVersion={}", r.rv() - 2), ADMIN).await;
    let ev = ok.expect(5 * SEC).await;
    assert_eq!(ev["type"], "ADDED");
    // As an HTTP 410 when asked to (the form some servers and proxies use).
    s.faults(json!({"watchExpiredAsHttp": true})).await;
    let r = s.get(&format!("{CM}?watch=1&resourceVersion={old}"), ADMIN).await;
    r.assert_status(410, "Expired");
    let r = s.get(&format!("{CM}?resourceVersion={old}&resourceVersionMatch=Exact"), ADMIN).await;
    r.assert_status(410, "Expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_and_its_refusal() {
    let dir = Scratch::new("watchlist");
    let s = Standin::start(dir.path(), &[]);
    s.create_cm("kube-system", "a", json!({})).await;
    let last = s.create_cm("kube-system", "b", json!({})).await;
    let mut w = s
        .watch(
            &format!("{CM}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"),
            ADMIN,
        )
        .await;
    for n in ["a", "b"] {
        let ev = w.expect(5 * SEC).await;
        assert_eq!((ev["type"].as_str(), ev["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some(n)));
    }
    let ev = w.expect(5 * SEC).await;
    assert_eq!(ev["type"], "BOOKMARK");
    assert_eq!(ev["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
    assert!(rv_of(&ev["object"]) >= rv_of(&last));
    let r = s.get(&format!("{CM}?watch=1&sendInitialEvents=true"), ADMIN).await;
    r.assert_status(422, "Invalid");
    drop(s);

    let dir2 = Scratch::new("nowatchlist");
    let s = Standin::start(dir2.path(), &["--disable-watch-list"]);
    let r = s
        .get(
            &format!("{CM}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"),
            ADMIN,
        )
        .await;
    r.assert_status(422, "Invalid");
    assert_eq!(
        r.json["message"],
        "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled"
    );
    assert_eq!(r.json["details"]["causes"][0]["reason"], "FieldValueForbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_turn_transitions_into_added_and_deleted() {
    let dir = Scratch::new("transitions");
    let s = Standin::start(dir.path(), &[]);
    let rv = rv_of(&s.create_cm("kube-system", "x", json!({})).await);
    let mut w = s.watch(&format!("{CM}?watch=1&resourceVersion={rv}&labelSelector=cpha%3Dmember"), ADMIN).await;
    let mut by_name =
        s.watch(&format!("{CM}?watch=1&resourceVersion={rv}&fieldSelector=metadata.name%3Dy"), ADMIN).await;
    s.patch(&format!("{CM}/x"), ADMIN, "application/merge-patch+json", r#"{"metadata":{"labels":{"cpha":"member"}}}"#)
        .await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!(ev["type"], "ADDED");
    let r = s
        .patch(&format!("{CM}/x"), ADMIN, "application/merge-patch+json", r#"{"metadata":{"labels":{"cpha":"gone"}}}"#)
        .await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!(ev["type"], "DELETED");
    assert_eq!(ev["object"]["metadata"]["labels"]["cpha"], "member", "the last state that matched");
    assert_eq!(rv_of(&ev["object"]), r.rv());
    s.create_cm("kube-system", "y", json!({})).await;
    let ev = by_name.expect(5 * SEC).await;
    assert_eq!((ev["type"].as_str(), ev["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("y")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_watch_for_kubectl() {
    let dir = Scratch::new("table");
    let s = Standin::start(dir.path(), &[]);
    s.create_cm("kube-system", "t", json!({"a": "1", "b": "2"})).await;
    let accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
    let r = s.call(Req::new("GET", CM).token(ADMIN).accept(accept)).await;
    assert_eq!(r.json["kind"], "Table");
    assert_eq!(r.json["columnDefinitions"][1]["name"], "Data");
    assert_eq!(r.json["rows"][0]["cells"][0], "t");
    assert_eq!(r.json["rows"][0]["cells"][1], 2);
    assert_eq!(r.json["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    let path = format!("{CM}?watch=1&resourceVersion={}", r.rv());
    let mut w = s.watch_req(Req::new("GET", &path).token(ADMIN).accept(accept)).await;
    s.patch(&format!("{CM}/t"), ADMIN, "application/merge-patch+json", r#"{"data":{"c":"3"}}"#).await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!(ev["type"], "MODIFIED");
    assert_eq!(ev["object"]["kind"], "Table");
    assert_eq!(ev["object"]["rows"][0]["cells"][0], "t");
    assert_eq!(ev["object"]["rows"][0]["cells"][1], 3);
}
