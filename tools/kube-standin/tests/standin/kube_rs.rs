//! The kube-rs client and watcher the agent is built on, pointed at the stand-in with the
//! narrow cpha token: a field-selected watch under a resourceNames rule, relisting after an
//! in-stream 410, and the streaming-list start.

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Config};
use serde_json::json;

use crate::support::*;

const CM: &str = "/api/v1/namespaces/kube-system/configmaps";

async fn cpha_client(s: &Standin, kubeconfig: &std::path::Path) -> Api<ConfigMap> {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig written by the stand-in");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("client config");
    assert_eq!(config.cluster_url.port_u16(), Some(s.addr.port()));
    Api::namespaced(Client::try_from(config).expect("client"), "kube-system")
}

/// The next watcher item, which must come within 10 s.
async fn next<S>(stream: &mut S) -> Result<Event<ConfigMap>, watcher::Error>
where
    S: Stream<Item = Result<Event<ConfigMap>, watcher::Error>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watcher item within 10 s")
        .expect("the watcher stream does not end")
}

fn members(cm: &ConfigMap) -> String {
    cm.data.as_ref().and_then(|d| d.get("members")).cloned().unwrap_or_default()
}

#[track_caller]
fn expect_init(items: [Result<Event<ConfigMap>, watcher::Error>; 3], want: &str) {
    match items {
        [Ok(Event::Init), Ok(Event::InitApply(cm)), Ok(Event::InitDone)] => assert_eq!(members(&cm), want),
        other => panic!("expected Init, InitApply, InitDone; got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_watcher_relists_after_an_expired_resource_version() {
    let dir = Scratch::new("kube-rs");
    let kc = dir.path().join("cpha.kubeconfig");
    let s = Standin::start(dir.path(), &["--write-kubeconfig", &format!("{}:cpha", kc.display())]);
    s.create_cm("kube-system", "cpha-members", json!({"members": "10.0.0.11:6443"})).await;
    let api = cpha_client(&s, &kc).await;

    assert_eq!(members(&api.get("cpha-members").await.expect("get is allowed")), "10.0.0.11:6443");
    match api.list(&ListParams::default()).await {
        Err(kube::Error::Api(st)) => assert_eq!((st.code, st.reason.as_str()), (403, "Forbidden")),
        other => panic!("an unfiltered list must be forbidden, got {other:?}"),
    }

    let cfg = watcher::Config::default().fields("metadata.name=cpha-members").timeout(30);
    let mut w = watcher::watcher(api.clone(), cfg).boxed();
    expect_init([next(&mut w).await, next(&mut w).await, next(&mut w).await], "10.0.0.11:6443");

    let patch = |m: &str| format!(r#"{{"data":{{"members":"{m}"}}}}"#);
    s.patch(&format!("{CM}/cpha-members"), ADMIN, "application/merge-patch+json", &patch("10.0.0.12:6443")).await;
    match next(&mut w).await {
        Ok(Event::Apply(cm)) => assert_eq!(members(&cm), "10.0.0.12:6443"),
        other => panic!("expected Apply, got {other:?}"),
    }

    // Move the window past the watcher's resourceVersion and drop its stream: it resumes from
    // that resourceVersion, gets 410 in the stream, reports it, and relists.
    s.create_cm("kube-system", "unrelated", json!({})).await;
    s.faults(json!({"expireNow": true, "dropWatches": "close"})).await;
    match next(&mut w).await {
        Err(watcher::Error::WatchError(st)) => assert_eq!((st.code, st.reason.as_str()), (410, "Expired")),
        other => panic!("expected the 410 to surface, got {other:?}"),
    }
    s.patch(&format!("{CM}/cpha-members"), ADMIN, "application/merge-patch+json", &patch("10.0.0.13:6443")).await;
    expect_init([next(&mut w).await, next(&mut w).await, next(&mut w).await], "10.0.0.13:6443");
    s.patch(&format!("{CM}/cpha-members"), ADMIN, "application/merge-patch+json", &patch("10.0.0.14:6443")).await;
    match next(&mut w).await {
        Ok(Event::Apply(cm)) => assert_eq!(members(&cm), "10.0.0.14:6443"),
        other => panic!("expected Apply after the relist, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_streaming_list_start() {
    let dir = Scratch::new("kube-rs-stream");
    let kc = dir.path().join("cpha.kubeconfig");
    let s = Standin::start(dir.path(), &["--write-kubeconfig", &format!("{}:cpha", kc.display())]);
    s.create_cm("kube-system", "cpha-members", json!({"members": "10.0.0.21:6443"})).await;
    let api = cpha_client(&s, &kc).await;
    let cfg = watcher::Config::default().fields("metadata.name=cpha-members").streaming_lists();
    let mut w = watcher::watcher(api, cfg).boxed();
    // A streaming list has no Init: objects, then InitDone on the initial-events-end bookmark.
    match [next(&mut w).await, next(&mut w).await] {
        [Ok(Event::InitApply(cm)), Ok(Event::InitDone)] => assert_eq!(members(&cm), "10.0.0.21:6443"),
        other => panic!("expected InitApply, InitDone; got {other:?}"),
    }
    s.delete(&format!("{CM}/cpha-members"), ADMIN, None).await;
    match next(&mut w).await {
        Ok(Event::Delete(cm)) => assert_eq!(members(&cm), "10.0.0.21:6443"),
        other => panic!("expected Delete, got {other:?}"),
    }
}
