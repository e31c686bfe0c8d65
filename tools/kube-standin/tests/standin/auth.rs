//! 401 and 403 as kube-apiserver answers them, including RBAC resourceNames rules that cover a
//! LIST or WATCH only through a `metadata.name` field selector.

use serde_json::json;

use crate::support::*;

const CM: &str = "/api/v1/namespaces/kube-system/configmaps";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_get_401_except_public_endpoints() {
    let dir = Scratch::new("auth401");
    let s = Standin::start(dir.path(), &[]);
    let r = s.call(Req::new("GET", CM)).await;
    r.assert_status(401, "Unauthorized");
    assert_eq!(r.json["message"], "Unauthorized");
    let r = s.get(CM, "not-a-token").await;
    r.assert_status(401, "Unauthorized");
    // A bad token is refused even where anonymous access is allowed.
    s.get("/readyz", "not-a-token").await.assert_status(401, "Unauthorized");
    for p in ["/api", "/apis", "/api/v1", "/openapi/v3"] {
        s.call(Req::new("GET", p)).await.assert_status(401, "Unauthorized");
    }
    for p in ["/readyz", "/livez", "/healthz"] {
        let r = s.call(Req::new("GET", p)).await;
        assert_eq!((r.status, r.text.as_str()), (200, "ok"), "{p}");
    }
    let r = s.call(Req::new("GET", "/version")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["major"], "1");
    assert!(r.json["gitVersion"].as_str().unwrap().starts_with("v1.3"));
    let r = s.call(Req::new("GET", "/_standin/faults")).await;
    r.assert_status(401, "Unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_names_rules_need_a_name_like_rbac() {
    let dir = Scratch::new("auth403");
    let s = Standin::start(dir.path(), &[]);
    s.create_cm("kube-system", "cpha-members", json!({"members": "10.0.0.11:6443"})).await;
    s.create_cm("kube-system", "other", json!({})).await;

    let r = s.get(&format!("{CM}/cpha-members"), CPHA).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["data"]["members"], "10.0.0.11:6443");

    let r = s.get(&format!("{CM}/other"), CPHA).await;
    r.assert_status(403, "Forbidden");
    assert_eq!(
        r.json["message"],
        "configmaps \"other\" is forbidden: User \"cpha\" cannot get resource \"configmaps\" in API group \"\" in the namespace \"kube-system\""
    );
    assert_eq!(r.json["details"], json!({"name": "other", "kind": "configmaps"}));

    // A list without the field selector is refused; with it, allowed and filtered.
    let r = s.get(CM, CPHA).await;
    r.assert_status(403, "Forbidden");
    assert_eq!(
        r.json["message"],
        "configmaps is forbidden: User \"cpha\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"kube-system\""
    );
    let r = s.get(&format!("{CM}?fieldSelector=metadata.name%3Dcpha-members"), CPHA).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["items"].as_array().unwrap().len(), 1);
    let r = s.get(&format!("{CM}?fieldSelector=metadata.name%3Dother"), CPHA).await;
    r.assert_status(403, "Forbidden");

    let r = s.get(&format!("{CM}?watch=1"), CPHA).await;
    r.assert_status(403, "Forbidden");
    assert!(r.json["message"].as_str().unwrap().contains("cannot watch resource"));
    let mut w = s.watch(&format!("{CM}?watch=1&fieldSelector=metadata.name%3Dcpha-members"), CPHA).await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!((ev["type"].as_str(), ev["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("cpha-members")));

    // Other namespaces, other verbs, the cluster scope and other resources stay closed.
    s.get("/api/v1/namespaces/default/configmaps/cpha-members", CPHA).await.assert_status(403, "Forbidden");
    let r = s.get("/api/v1/configmaps?fieldSelector=metadata.name%3Dcpha-members", CPHA).await;
    r.assert_status(403, "Forbidden");
    assert!(r.json["message"].as_str().unwrap().ends_with("at the cluster scope"));
    s.put(&format!("{CM}/cpha-members"), CPHA, &json!({"metadata": {"name": "cpha-members"}}))
        .await
        .assert_status(403, "Forbidden");
    let r = s.get("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes", CPHA).await;
    r.assert_status(403, "Forbidden");
    assert!(r.json["message"]
        .as_str()
        .unwrap()
        .starts_with("endpointslices.discovery.k8s.io \"kubernetes\" is forbidden"));
    // Discovery is open to every authenticated user; the fault endpoint is not.
    assert_eq!(s.get("/api/v1", CPHA).await.status, 200);
    s.get("/_standin/faults", CPHA).await.assert_status(403, "Forbidden");
    // The admin token may do everything.
    assert_eq!(s.get(CM, ADMIN).await.status, 200);
    assert_eq!(s.get("/_standin/faults", ADMIN).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_file_and_generated_kubeconfig() {
    let dir = Scratch::new("tokfile");
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"[{"user": "reader", "token": "reader-token", "rules": [{"verbs": ["get", "list"], "resources": ["endpointslices.discovery.k8s.io"], "namespaces": ["default"]}]},
            {"user": "gen", "rules": []}]"#,
    )
    .unwrap();
    let kc = dir.path().join("gen.kubeconfig");
    let s = Standin::start(
        dir.path(),
        &["--tokens-file", tokens.to_str().unwrap(), "--write-kubeconfig", &format!("{}:gen", kc.display())],
    );
    let r = s.get("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", "reader-token").await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.get("/api/v1/namespaces/default/configmaps", "reader-token").await.assert_status(403, "Forbidden");
    let text = std::fs::read_to_string(&kc).unwrap();
    assert!(text.contains(&format!("server: \"https://{}\"", s.addr)), "{text}");
    let token = text.lines().find_map(|l| l.trim().strip_prefix("token: ")).unwrap().trim_matches('"').to_string();
    assert_eq!(token.len(), 48);
    // The generated token authenticates (and its user has no rules).
    let r = s.get("/api/v1/namespaces/default/configmaps", &token).await;
    r.assert_status(403, "Forbidden");
    assert!(r.json["message"].as_str().unwrap().contains("User \"gen\""));
}
