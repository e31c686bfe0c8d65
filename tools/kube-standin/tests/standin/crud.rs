//! Create, read, update, patch and delete with the API server's metadata handling, optimistic
//! concurrency, validation, lists, pagination and the seeded `default/kubernetes` slice.

use serde_json::{json, Value};

use crate::support::*;

const CM: &str = "/api/v1/namespaces/kube-system/configmaps";
const ES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_update_conflict_delete() {
    let dir = Scratch::new("crud");
    let s = Standin::start(dir.path(), &[]);
    let created = s.create_cm("kube-system", "cpha-members", json!({"members": "a"})).await;
    assert_eq!(created["kind"], "ConfigMap");
    assert_eq!(created["apiVersion"], "v1");
    assert_eq!(created["metadata"]["namespace"], "kube-system");
    let uid = created["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(uid.len(), 36);
    assert!(created["metadata"]["creationTimestamp"].as_str().unwrap().ends_with('Z'));
    let rv1 = rv_of(&created);

    let again = s.post(CM, ADMIN, &json!({"metadata": {"name": "cpha-members"}})).await;
    again.assert_status(409, "AlreadyExists");
    assert_eq!(again.json["message"], "configmaps \"cpha-members\" already exists");

    let got = s.get(&format!("{CM}/cpha-members"), ADMIN).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json, created);

    // PUT with the current resourceVersion succeeds and bumps it; the stale one conflicts.
    let mut next = created.clone();
    next["data"]["members"] = "b".into();
    let r = s.put(&format!("{CM}/cpha-members"), ADMIN, &next).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rv2 = r.rv();
    assert!(rv2 > rv1);
    assert_eq!(r.json["metadata"]["uid"], uid.as_str());
    assert_eq!(r.json["metadata"]["creationTimestamp"], created["metadata"]["creationTimestamp"]);
    next["data"]["members"] = "c".into();
    let r = s.put(&format!("{CM}/cpha-members"), ADMIN, &next).await;
    r.assert_status(409, "Conflict");
    assert_eq!(
        r.json["message"],
        "Operation cannot be fulfilled on configmaps \"cpha-members\": the object has been modified; please apply your changes to the latest version and try again"
    );
    // Without a resourceVersion the update is unconditional; an identical one changes nothing.
    next["metadata"].as_object_mut().unwrap().remove("resourceVersion");
    let r = s.put(&format!("{CM}/cpha-members"), ADMIN, &next).await;
    assert_eq!((r.status, r.json["data"]["members"].as_str()), (200, Some("c")));
    let rv3 = r.rv();
    let r = s.put(&format!("{CM}/cpha-members"), ADMIN, &next).await;
    assert_eq!(r.rv(), rv3, "a no-op update keeps the resourceVersion");
    // Name mismatch and a missing object.
    s.put(&format!("{CM}/other"), ADMIN, &next).await.assert_status(400, "BadRequest");
    let mut ghost = next.clone();
    ghost["metadata"]["name"] = "ghost".into();
    s.put(&format!("{CM}/ghost"), ADMIN, &ghost).await.assert_status(404, "NotFound");

    // DELETE with preconditions.
    let stale =
        json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": rv1.to_string()}});
    let r = s.delete(&format!("{CM}/cpha-members"), ADMIN, Some(&stale)).await;
    r.assert_status(409, "Conflict");
    assert!(r.json["message"].as_str().unwrap().contains(&format!(
        "Precondition failed: ResourceVersion in precondition: {rv1}, ResourceVersion in object meta: {rv3}"
    )));
    let good = json!({"preconditions": {"resourceVersion": rv3.to_string(), "uid": uid}});
    let r = s.delete(&format!("{CM}/cpha-members"), ADMIN, Some(&good)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["kind"], "Status");
    assert_eq!(r.json["status"], "Success");
    assert_eq!(r.json["details"], json!({"name": "cpha-members", "kind": "configmaps", "uid": uid}));
    let r = s.get(&format!("{CM}/cpha-members"), ADMIN).await;
    r.assert_status(404, "NotFound");
    assert_eq!(r.json["message"], "configmaps \"cpha-members\" not found");
    s.delete(&format!("{CM}/cpha-members"), ADMIN, None).await.assert_status(404, "NotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_of_every_supported_type() {
    let dir = Scratch::new("patch");
    let s = Standin::start(dir.path(), &[]);
    s.create_cm("kube-system", "p", json!({"a": "1", "b": "2"})).await;
    let path = format!("{CM}/p");
    let r = s.patch(&path, ADMIN, "application/merge-patch+json", r#"{"data":{"a":null,"c":"3"}}"#).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["data"], json!({"b": "2", "c": "3"}));
    let r = s
        .patch(
            &path,
            ADMIN,
            "application/strategic-merge-patch+json",
            r#"{"data":{"b":null,"d":"4"},"metadata":{"labels":{"x":"y"}}}"#,
        )
        .await;
    assert_eq!(r.json["data"], json!({"c": "3", "d": "4"}));
    assert_eq!(r.json["metadata"]["labels"], json!({"x": "y"}));
    let r = s
        .patch(&path, ADMIN, "application/strategic-merge-patch+json", r#"{"data":{"$patch":"replace","only":"1"}}"#)
        .await;
    assert_eq!(r.json["data"], json!({"only": "1"}));
    let r = s
        .patch(
            &path,
            ADMIN,
            "application/json-patch+json",
            r#"[{"op":"test","path":"/data/only","value":"1"},{"op":"add","path":"/data/j","value":"x"}]"#,
        )
        .await;
    assert_eq!(r.json["data"], json!({"j": "x", "only": "1"}));
    let r = s
        .patch(&path, ADMIN, "application/json-patch+json", r#"[{"op":"test","path":"/data/only","value":"2"}]"#)
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    let r = s.patch(&path, ADMIN, "application/apply-patch+yaml", "data: {}").await;
    r.assert_status(415, "UnsupportedMediaType");
    // A patch carrying a stale resourceVersion conflicts.
    let r = s
        .patch(&path, ADMIN, "application/merge-patch+json", r#"{"metadata":{"resourceVersion":"1"},"data":{"z":"1"}}"#)
        .await;
    r.assert_status(409, "Conflict");
    let r = s.patch(&format!("{CM}/nope"), ADMIN, "application/merge-patch+json", "{}").await;
    r.assert_status(404, "NotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_and_field_validation() {
    let dir = Scratch::new("valid");
    let s = Standin::start(dir.path(), &[]);
    let r = s.post(CM, ADMIN, &json!({"metadata": {"name": "Bad_Name"}})).await;
    r.assert_status(422, "Invalid");
    assert!(r.json["message"]
        .as_str()
        .unwrap()
        .starts_with("ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value"));
    assert_eq!(r.json["details"]["causes"][0]["field"], "metadata.name");
    let r = s.post(CM, ADMIN, &json!({"metadata": {}})).await;
    r.assert_status(422, "Invalid");
    let r = s.post(CM, ADMIN, &json!({"metadata": {"name": "t"}, "data": {"k": 1}})).await;
    r.assert_status(400, "BadRequest");
    assert!(r.json["message"].as_str().unwrap().contains("cannot unmarshal number"));
    let r = s.post(CM, ADMIN, &json!({"metadata": {"name": "t", "namespace": "default"}})).await;
    r.assert_status(400, "BadRequest");
    // Unknown fields: dropped with a warning by default, refused under Strict.
    let body = json!({"metadata": {"name": "u"}, "spec": {"x": 1}});
    let r = s.post(&format!("{CM}?fieldValidation=Strict"), ADMIN, &body).await;
    r.assert_status(400, "BadRequest");
    assert_eq!(r.json["message"], "strict decoding error: unknown field \"spec\"");
    let r = s.post(CM, ADMIN, &body).await;
    assert_eq!(r.status, 201);
    assert!(r.json.get("spec").is_none());
    assert_eq!(r.headers.get("warning").unwrap().to_str().unwrap(), "299 - \"unknown field \\\"spec\\\"\"");
    // generateName, dry runs, unknown namespaces.
    let r = s.post(CM, ADMIN, &json!({"metadata": {"generateName": "gen-"}})).await;
    assert_eq!(r.status, 201);
    let name = r.json["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    let r = s.post(&format!("{CM}?dryRun=All"), ADMIN, &json!({"metadata": {"name": "dry"}})).await;
    assert_eq!(r.status, 201);
    s.get(&format!("{CM}/dry"), ADMIN).await.assert_status(404, "NotFound");
    let r = s.post("/api/v1/namespaces/nowhere/configmaps", ADMIN, &json!({"metadata": {"name": "x"}})).await;
    r.assert_status(404, "NotFound");
    assert_eq!(r.json["message"], "namespaces \"nowhere\" not found");
    // Immutable ConfigMaps.
    s.post(CM, ADMIN, &json!({"metadata": {"name": "frozen"}, "immutable": true, "data": {"a": "1"}})).await;
    let r = s.patch(&format!("{CM}/frozen"), ADMIN, "application/merge-patch+json", r#"{"data":{"a":"2"}}"#).await;
    r.assert_status(422, "Invalid");
    // Not served at all.
    let r = s.get("/api/v1/namespaces/default/pods", ADMIN).await;
    r.assert_status(404, "NotFound");
    let r = s.call(Req::new("GET", CM).token(ADMIN).accept("application/vnd.kubernetes.protobuf")).await;
    r.assert_status(406, "NotAcceptable");
}

fn names(list: &Value) -> Vec<String> {
    list["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_selectors_and_pagination() {
    let dir = Scratch::new("list");
    let s = Standin::start(dir.path(), &["--history-size", "5"]);
    for (i, n) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        let r = s
            .post(
                CM,
                ADMIN,
                &json!({"metadata": {"name": n, "labels": {"tier": if i % 2 == 0 { "even" } else { "odd" }}}}),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    s.create_cm("default", "elsewhere", json!({})).await;
    let r = s.get(CM, ADMIN).await;
    assert_eq!(r.json["kind"], "ConfigMapList");
    assert_eq!(r.json["apiVersion"], "v1");
    assert_eq!(names(&r.json), ["a", "b", "c", "d", "e"]);
    assert!(r.json["items"][0].get("kind").is_none(), "list items carry no kind");
    let list_rv = r.rv();
    assert_eq!(list_rv, rv_of(r.json["items"].as_array().unwrap().iter().max_by_key(|i| rv_of(i)).unwrap()) + 1);

    let r = s.get(&format!("{CM}?labelSelector=tier%3Deven"), ADMIN).await;
    assert_eq!(names(&r.json), ["a", "c", "e"]);
    let r = s.get(&format!("{CM}?labelSelector=tier%20in%20(odd)"), ADMIN).await;
    assert_eq!(names(&r.json), ["b", "d"]);
    let r = s.get(&format!("{CM}?fieldSelector=metadata.name!%3Da"), ADMIN).await;
    assert_eq!(names(&r.json).len(), 4);
    let r = s.get("/api/v1/configmaps?fieldSelector=metadata.namespace%3Ddefault", ADMIN).await;
    assert_eq!(names(&r.json), ["elsewhere"]);
    let r = s.get("/api/v1/configmaps", ADMIN).await;
    assert_eq!(names(&r.json).len(), 6);
    s.get(&format!("{CM}?fieldSelector=spec.x%3D1"), ADMIN).await.assert_status(400, "BadRequest");

    // Pages of two, consistent with the first page's snapshot even after a change.
    let p1 = s.get(&format!("{CM}?limit=2"), ADMIN).await;
    assert_eq!(names(&p1.json), ["a", "b"]);
    assert_eq!(p1.json["metadata"]["remainingItemCount"], 3);
    let cont = p1.json["metadata"]["continue"].as_str().unwrap().to_string();
    s.delete(&format!("{CM}/c"), ADMIN, None).await;
    let p2 = s.get(&format!("{CM}?limit=2&continue={cont}"), ADMIN).await;
    assert_eq!(names(&p2.json), ["c", "d"], "the snapshot still has c");
    assert_eq!(p2.rv(), p1.rv());
    let cont2 = p2.json["metadata"]["continue"].as_str().unwrap().to_string();
    let p3 = s.get(&format!("{CM}?limit=2&continue={cont2}"), ADMIN).await;
    assert_eq!(names(&p3.json), ["e"]);
    assert!(p3.json["metadata"].get("continue").is_none());
    // An exact list at an older revision, then the window moves past it.
    let exact = s.get(&format!("{CM}?resourceVersion={list_rv}&resourceVersionMatch=Exact"), ADMIN).await;
    assert_eq!(names(&exact.json), ["a", "b", "c", "d", "e"]);
    for i in 0..6 {
        s.create_cm("kube-system", &format!("z{i}"), json!({})).await;
    }
    let r = s.get(&format!("{CM}?limit=2&continue={cont}"), ADMIN).await;
    r.assert_status(410, "Expired");
    assert!(r.json["message"].as_str().unwrap().starts_with("The provided continue parameter is too old"));
    assert!(r.json["metadata"]["continue"].is_string());
    let r = s.get(&format!("{CM}?resourceVersion={list_rv}&resourceVersionMatch=Exact"), ADMIN).await;
    r.assert_status(410, "Expired");
    assert_eq!(r.json["message"], "The resourceVersion for the provided list is too old.");
    // Option validation.
    let r = s.get(&format!("{CM}?resourceVersionMatch=Exact"), ADMIN).await;
    r.assert_status(422, "Invalid");
    assert!(r.json["message"].as_str().unwrap().starts_with("ListOptions.meta.k8s.io \"\" is invalid"));
    let r = s.get(&format!("{CM}?resourceVersion=999999"), ADMIN).await;
    r.assert_status(504, "Timeout");
    assert!(r.json["message"].as_str().unwrap().starts_with("Too large resource version"));
    // DELETE of a collection by label.
    let r = s.delete(&format!("{CM}?labelSelector=tier%3Dodd"), ADMIN, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(names(&r.json), ["b", "d"]);
    let r = s.get(&format!("{CM}?labelSelector=tier"), ADMIN).await;
    assert_eq!(names(&r.json), ["a", "e"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_endpoint_slice_is_seeded_and_writable() {
    let dir = Scratch::new("eps");
    let s = Standin::start(dir.path(), &["--endpoints", "10.0.0.11,10.0.0.12"]);
    let r = s.get(&format!("{ES}/kubernetes"), ADMIN).await;
    assert_eq!(r.status, 200);
    let o = &r.json;
    assert_eq!(o["kind"], "EndpointSlice");
    assert_eq!(o["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(o["addressType"], "IPv4");
    assert_eq!(o["metadata"]["labels"]["kubernetes.io/service-name"], "kubernetes");
    assert_eq!(o["metadata"]["generation"], 1);
    assert_eq!(
        o["endpoints"],
        json!([{"addresses": ["10.0.0.11"], "conditions": {"ready": true}}, {"addresses": ["10.0.0.12"], "conditions": {"ready": true}}])
    );
    assert_eq!(o["ports"], json!([{"name": "https", "protocol": "TCP", "port": 6443}]));
    let r = s
        .patch(
            &format!("{ES}/kubernetes"),
            ADMIN,
            "application/merge-patch+json",
            r#"{"endpoints":[{"addresses":["10.0.0.13"],"conditions":{"ready":true}}]}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["metadata"]["generation"], 2);
    let r = s
        .get("/apis/discovery.k8s.io/v1/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes", ADMIN)
        .await;
    assert_eq!(r.json["kind"], "EndpointSliceList");
    assert_eq!(r.json["items"][0]["endpoints"][0]["addresses"][0], "10.0.0.13");
    let r =
        s.patch(&format!("{ES}/kubernetes"), ADMIN, "application/merge-patch+json", r#"{"addressType":"IPv6"}"#).await;
    r.assert_status(422, "Invalid");
    let r = s
        .post(
            ES,
            ADMIN,
            &json!({"metadata": {"name": "x"}, "addressType": "IPv4", "endpoints": [{"addresses": ["nope"]}]}),
        )
        .await;
    r.assert_status(422, "Invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizers_hold_deletion() {
    let dir = Scratch::new("fin");
    let s = Standin::start(dir.path(), &[]);
    let r = s.post(CM, ADMIN, &json!({"metadata": {"name": "held", "finalizers": ["example.com/hold"]}})).await;
    assert_eq!(r.status, 201);
    let r = s.delete(&format!("{CM}/held"), ADMIN, None).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert!(r.json["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(s.get(&format!("{CM}/held"), ADMIN).await.status, 200);
    let r = s
        .patch(&format!("{CM}/held"), ADMIN, "application/merge-patch+json", r#"{"metadata":{"finalizers":null}}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.get(&format!("{CM}/held"), ADMIN).await.assert_status(404, "NotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_documents() {
    let dir = Scratch::new("disc");
    let s = Standin::start(dir.path(), &[]);
    let r = s.get("/api", ADMIN).await;
    assert_eq!(r.json["kind"], "APIVersions");
    assert_eq!(r.json["versions"], json!(["v1"]));
    let r = s.get("/api/v1", ADMIN).await;
    assert_eq!(r.json["kind"], "APIResourceList");
    let cm = r.json["resources"].as_array().unwrap().iter().find(|x| x["name"] == "configmaps").unwrap().clone();
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["shortNames"], json!(["cm"]));
    assert!(cm["verbs"].as_array().unwrap().contains(&json!("watch")));
    let r = s.get("/apis", ADMIN).await;
    assert_eq!(r.json["groups"][0]["name"], "discovery.k8s.io");
    assert_eq!(r.json["groups"][0]["preferredVersion"]["groupVersion"], "discovery.k8s.io/v1");
    let r = s.get("/apis/discovery.k8s.io", ADMIN).await;
    assert_eq!(r.json["kind"], "APIGroup");
    let r = s.get("/apis/discovery.k8s.io/v1", ADMIN).await;
    assert_eq!(r.json["resources"][0]["name"], "endpointslices");
    assert_eq!(r.json["resources"][0]["namespaced"], true);
    let r = s.get("/apis/apps/v1", ADMIN).await;
    assert_eq!((r.status, r.text.as_str()), (404, "404 page not found\n"));
    let r = s.get("/openapi/v3", ADMIN).await;
    let url = r.json["paths"]["api/v1"]["serverRelativeURL"].as_str().unwrap().to_string();
    let r = s.get(&url, ADMIN).await;
    assert_eq!(r.json["openapi"], "3.0.0");
    assert_eq!(r.headers.get("cache-control").unwrap(), "public, immutable");
    let r = s.get("/readyz?verbose", ADMIN).await;
    assert!(r.text.contains("[+]etcd ok") && r.text.ends_with("readyz check passed\n"), "{}", r.text);
    let r = s.get("/api/v1/namespaces/kube-system", ADMIN).await;
    assert_eq!((r.json["kind"].as_str(), r.json["status"]["phase"].as_str()), (Some("Namespace"), Some("Active")));
    s.get("/api/v1/namespaces/nowhere", ADMIN).await.assert_status(404, "NotFound");
}
