//! events.k8s.io/v1 Events as the agent posts them: kube-rs's `Recorder` creating an Event and
//! updating its series with a merge patch, under a `create,patch` rule and without one; the
//! API server's validation (422 with causes, 400 for a bad time); selectors, watch, patch,
//! delete and `--state`.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Config};
use serde_json::{json, Value};

use crate::support::*;

pub const EV: &str = "/apis/events.k8s.io/v1/namespaces/kube-system/events";
const RECORDER: &str = "recorder-token";
const CREATE_ONLY: &str = "create-only-token";

fn start(dir: &std::path::Path, extra: &[&str]) -> Standin {
    let mut args = vec![
        "--token".to_string(),
        format!("recorder:{RECORDER}:create,patch/events.events.k8s.io/kube-system"),
        "--token".to_string(),
        format!("creator:{CREATE_ONLY}:create/events.events.k8s.io/kube-system"),
    ];
    for user in ["recorder", "creator", "cpha"] {
        args.push("--write-kubeconfig".into());
        args.push(format!("{}:{user}", dir.join(format!("{user}.kubeconfig")).display()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Standin::start(dir, &refs)
}

pub async fn client(kubeconfig: &std::path::Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig written by the stand-in");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("client config");
    Client::try_from(config).expect("client")
}

/// The reference the agent's events are about: the members ConfigMap.
pub fn members_ref(cm: &Value) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        name: cm["metadata"]["name"].as_str().map(str::to_string),
        namespace: cm["metadata"]["namespace"].as_str().map(str::to_string),
        uid: cm["metadata"]["uid"].as_str().map(str::to_string),
        resource_version: cm["metadata"]["resourceVersion"].as_str().map(str::to_string),
        field_path: None,
    }
}

pub fn recorder(client: Client) -> Recorder {
    Recorder::new(client, Reporter { controller: "cpha".into(), instance: Some("node-1".into()) })
}

pub fn promoted() -> Event {
    Event {
        type_: EventType::Normal,
        reason: "Promoted".into(),
        note: Some("node-1 holds the handover".into()),
        action: "Handover".into(),
        secondary: None,
    }
}

/// Publishes within a bound.
pub async fn publish(r: &Recorder, ev: &Event, reference: &ObjectReference) -> Result<(), kube::Error> {
    tokio::time::timeout(Duration::from_secs(20), r.publish(ev, reference)).await.expect("publish within 20 s")
}

async fn items(s: &Standin, query: &str) -> Vec<Value> {
    let r = s.get(&format!("{EV}{query}"), ADMIN).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!((r.json["kind"].as_str(), r.json["apiVersion"].as_str()), (Some("EventList"), Some("events.k8s.io/v1")));
    r.json["items"].as_array().unwrap().clone()
}

#[track_caller]
fn forbidden(res: Result<(), kube::Error>, want: &str) {
    match res {
        Err(kube::Error::Api(st)) => {
            assert_eq!((st.code, st.reason.as_str()), (403, "Forbidden"));
            assert_eq!(st.message, want);
        }
        other => panic!("expected a 403, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_creates_then_patches_the_series() {
    let dir = Scratch::new("events-recorder");
    let s = start(dir.path(), &[]);
    let cm = s.create_cm("kube-system", "cpha-members", json!({"members": "10.0.0.11:6443"})).await;
    let reference = members_ref(&cm);
    let rec = recorder(client(&dir.path().join("recorder.kubeconfig")).await);

    publish(&rec, &promoted(), &reference).await.expect("first publish: a create");
    let first = items(&s, "").await;
    assert_eq!(first.len(), 1, "{first:?}");
    let ev = &first[0];
    let name = ev["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("cpha-members."), "{name}");
    assert_eq!(ev["regarding"]["uid"], cm["metadata"]["uid"]);
    assert_eq!((ev["reportingController"].as_str(), ev["reportingInstance"].as_str()), (Some("cpha"), Some("node-1")));
    assert_eq!(
        (ev["reason"].as_str(), ev["action"].as_str(), ev["type"].as_str()),
        (Some("Promoted"), Some("Handover"), Some("Normal"))
    );
    assert_eq!(ev["note"], "node-1 holds the handover");
    assert!(ev.get("series").is_none(), "a single occurrence has no series: {ev}");
    // MicroTime as the API server writes it; fields without omitempty are written empty.
    let event_time = ev["eventTime"].as_str().unwrap();
    assert!(event_time.len() == 27 && event_time.ends_with('Z'), "{event_time}");
    assert_eq!(ev["deprecatedSource"], json!({}));
    assert_eq!(ev["deprecatedFirstTimestamp"], Value::Null);
    let rv1 = rv_of(ev);

    // The next publish of the same event is a merge patch of the cached one, with a series.
    let mut w = s.watch(&format!("{EV}?watch=1&resourceVersion={rv1}"), ADMIN).await;
    publish(&rec, &promoted(), &reference).await.expect("second publish: a patch of the series");
    let second = items(&s, "").await;
    assert_eq!(second.len(), 1, "the same event is updated, not a new one: {second:?}");
    let ev2 = &second[0];
    assert_eq!(ev2["metadata"]["name"], name.as_str());
    assert_eq!(ev2["metadata"]["uid"], ev["metadata"]["uid"]);
    assert_eq!(ev2["metadata"]["creationTimestamp"], ev["metadata"]["creationTimestamp"]);
    assert_eq!(ev2["eventTime"], event_time, "eventTime is immutable and unchanged");
    assert_eq!(ev2["series"]["count"], 2);
    let last = ev2["series"]["lastObservedTime"].as_str().unwrap();
    assert!(last.len() == 27 && last >= event_time, "{last} vs {event_time}");
    assert!(rv_of(ev2) > rv1);
    let change = w.expect_change(5 * SEC).await;
    assert_eq!(change["type"], "MODIFIED");
    assert_eq!(change["object"]["series"]["count"], 2);
    assert_eq!(change["object"]["kind"], "Event");

    publish(&rec, &promoted(), &reference).await.expect("third publish");
    let third = items(&s, "").await;
    assert_eq!((third.len(), third[0]["series"]["count"].as_i64()), (1, Some(3)));

    // Another reason is another event.
    let demoted = Event { type_: EventType::Warning, reason: "Demoted".into(), ..promoted() };
    publish(&rec, &demoted, &reference).await.expect("a different event");
    let all = items(&s, "").await;
    assert_eq!(all.len(), 2);

    // Field selectors of events.k8s.io/v1 (LIST and WATCH share them).
    assert_eq!(items(&s, "?fieldSelector=reason%3DPromoted").await.len(), 1);
    assert_eq!(items(&s, "?fieldSelector=type%3DWarning").await[0]["reason"], "Demoted");
    assert_eq!(items(&s, "?fieldSelector=regarding.name%3Dcpha-members,reportingController%3Dcpha").await.len(), 2);
    assert_eq!(items(&s, "?fieldSelector=regarding.kind%21%3DConfigMap").await.len(), 0);
    let r = s.get(&format!("{EV}?fieldSelector=involvedObject.name%3Dcpha-members"), ADMIN).await;
    r.assert_status(400, "BadRequest");
    assert_eq!(r.json["message"], "field label not supported: involvedObject.name");

    // The recorder's rule has no list: the API server's RBAC wording.
    let r = s.get(EV, RECORDER).await;
    r.assert_status(403, "Forbidden");
    assert_eq!(
        r.json["message"],
        "events.events.k8s.io is forbidden: User \"recorder\" cannot list resource \"events\" in API group \"events.k8s.io\" in the namespace \"kube-system\""
    );
    assert_eq!(r.json["details"], json!({"group": "events.k8s.io", "kind": "events"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorder_without_the_rule_gets_403() {
    let dir = Scratch::new("events-403");
    let s = start(dir.path(), &[]);
    let cm = s.create_cm("kube-system", "cpha-members", json!({})).await;
    let reference = members_ref(&cm);

    // cpha's token reads its ConfigMap only.
    let rec = recorder(client(&dir.path().join("cpha.kubeconfig")).await);
    forbidden(
        publish(&rec, &promoted(), &reference).await,
        "events.events.k8s.io is forbidden: User \"cpha\" cannot create resource \"events\" in API group \"events.k8s.io\" in the namespace \"kube-system\"",
    );
    assert!(items(&s, "").await.is_empty());

    // create without patch: the first publish works, the series update is refused by name.
    let rec = recorder(client(&dir.path().join("creator.kubeconfig")).await);
    publish(&rec, &promoted(), &reference).await.expect("create is allowed");
    let name = items(&s, "").await[0]["metadata"]["name"].as_str().unwrap().to_string();
    forbidden(
        publish(&rec, &promoted(), &reference).await,
        &format!("events.events.k8s.io \"{name}\" is forbidden: User \"creator\" cannot patch resource \"events\" in API group \"events.k8s.io\" in the namespace \"kube-system\""),
    );
    let after = items(&s, "").await;
    assert!(after.len() == 1 && after[0].get("series").is_none(), "{after:?}");

    // The rule is for kube-system only.
    let elsewhere = ObjectReference { namespace: Some("default".into()), ..reference };
    let rec = recorder(client(&dir.path().join("recorder.kubeconfig")).await);
    forbidden(
        publish(&rec, &promoted(), &elsewhere).await,
        "events.events.k8s.io is forbidden: User \"recorder\" cannot create resource \"events\" in API group \"events.k8s.io\" in the namespace \"default\"",
    );
}

fn valid(name: &str) -> Value {
    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": name},
        "eventTime": "2024-05-01T12:34:56.123456Z",
        "reportingController": "cpha", "reportingInstance": "node-1",
        "action": "Handover", "reason": "Promoted", "type": "Normal", "note": "n",
        "regarding": {"apiVersion": "v1", "kind": "ConfigMap", "namespace": "kube-system", "name": "cpha-members"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_and_the_other_verbs() {
    let dir = Scratch::new("events-crud");
    let state = dir.path().join("state.json");
    let mut s = start(dir.path(), &["--state", state.to_str().unwrap()]);

    // 422 for a missing eventTime, worded and detailed like the API server.
    let mut e = valid("no-time");
    e.as_object_mut().unwrap().remove("eventTime");
    let r = s.post(EV, ADMIN, &e).await;
    r.assert_status(422, "Invalid");
    assert_eq!(r.json["message"], "Event.events.k8s.io \"no-time\" is invalid: eventTime: Required value");
    assert_eq!(
        r.json["details"],
        json!({"name": "no-time", "group": "events.k8s.io", "kind": "Event",
               "causes": [{"reason": "FieldValueRequired", "message": "Required value", "field": "eventTime"}]})
    );
    // The fields a new events.k8s.io/v1 Event needs, with the internal field paths (no
    // `regarding` is needed in kube-system or default).
    let r = s
        .post(
            EV,
            ADMIN,
            &json!({"metadata": {"name": "bare"}, "eventTime": "2024-05-01T12:34:56.123456Z", "type": "Info"}),
        )
        .await;
    r.assert_status(422, "Invalid");
    let fields: Vec<&str> =
        r.json["details"]["causes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
    assert_eq!(
        fields,
        [
            "reportingController",
            "reportingController",
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
            "type"
        ],
        "{}",
        r.text
    );
    assert!(r.text.contains("type: Invalid value: \\\"\\\": has invalid value: Info"), "{}", r.text);
    // A time without microseconds does not decode as a MicroTime: 400.
    let mut e = valid("short-time");
    e["eventTime"] = "2024-05-01T12:34:56Z".into();
    let r = s.post(EV, ADMIN, &e).await;
    r.assert_status(400, "BadRequest");
    assert_eq!(
        r.json["message"],
        "Event in version \"v1\" cannot be handled as a Event: parsing time \"2024-05-01T12:34:56Z\" as \"2006-01-02T15:04:05.000000Z07:00\": cannot parse \"Z\" as \".000000\""
    );

    // generateName, get, 409 on a second create.
    let mut e = valid("");
    e["metadata"] = json!({"generateName": "cpha-members."});
    let r = s.post(EV, ADMIN, &e).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let name = r.json["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("cpha-members.") && name.len() == "cpha-members.".len() + 5, "{name}");
    let got = s.get(&format!("{EV}/{name}"), ADMIN).await;
    assert_eq!(got.json, r.json);
    let r = s.post(EV, ADMIN, &valid("fixed")).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = s.post(EV, ADMIN, &valid("fixed")).await;
    r.assert_status(409, "AlreadyExists");
    assert_eq!(r.json["message"], "events.events.k8s.io \"fixed\" already exists");

    // Patches: what an update may change, and the immutable fields.
    let path = format!("{EV}/fixed");
    let r = s.patch(&path, ADMIN, "application/strategic-merge-patch+json", r#"{"note":"other"}"#).await;
    r.assert_status(422, "Invalid");
    assert_eq!(
        r.json["message"],
        "Event.events.k8s.io \"fixed\" is invalid: message: Invalid value: \"other\": field is immutable"
    );
    let r = s
        .patch(
            &path,
            ADMIN,
            "application/json-patch+json",
            r#"[{"op":"add","path":"/series","value":{"count":1,"lastObservedTime":"2024-05-01T12:35:56.000000Z"}}]"#,
        )
        .await;
    r.assert_status(422, "Invalid");
    assert!(r.text.contains("series.count: Invalid value: \\\"\\\": should be at least 2"), "{}", r.text);
    let before = s.get(&path, ADMIN).await.rv();
    let r = s
        .patch(
            &path,
            ADMIN,
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"app":"cpha"}},"series":{"count":2,"lastObservedTime":"2024-05-01T14:35:56.500000+02:00"}}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.rv() > before);
    assert_eq!(r.json["series"], json!({"count": 2, "lastObservedTime": "2024-05-01T12:35:56.500000Z"}));
    assert_eq!(items(&s, "?labelSelector=app%3Dcpha").await.len(), 1);
    let r = s.patch(&format!("{EV}/nope"), ADMIN, "application/merge-patch+json", "{}").await;
    r.assert_status(404, "NotFound");
    assert_eq!(r.json["message"], "events.events.k8s.io \"nope\" not found");

    // Kept across a restart with --state.
    let kept = s.get(&path, ADMIN).await.json;
    s.kill();
    let s = start(dir.path(), &["--state", state.to_str().unwrap()]);
    assert_eq!(s.get(&path, ADMIN).await.json, kept);

    let r = s.delete(&path, ADMIN, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!((r.json["status"].as_str(), r.json["details"]["kind"].as_str()), (Some("Success"), Some("events")));
    s.get(&path, ADMIN).await.assert_status(404, "NotFound");
    let r = s.post("/apis/events.k8s.io/v1/namespaces/elsewhere/events", ADMIN, &valid("x")).await;
    r.assert_status(404, "NotFound");
    assert_eq!(r.json["message"], "namespaces \"elsewhere\" not found");

    // Discovery.
    let r = s.get("/apis/events.k8s.io/v1", ADMIN).await;
    assert_eq!(
        r.json["resources"][0],
        json!({"name": "events", "singularName": "event", "namespaced": true, "kind": "Event",
               "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
               "shortNames": ["ev"], "storageVersionHash": "r2yiGXH7wu8="})
    );
    let groups = s.get("/apis", ADMIN).await.json;
    assert!(groups["groups"].as_array().unwrap().iter().any(|g| g["name"] == "events.k8s.io"), "{groups}");
    assert_eq!(s.get("/apis/events.k8s.io", ADMIN).await.json["preferredVersion"]["groupVersion"], "events.k8s.io/v1");
}
