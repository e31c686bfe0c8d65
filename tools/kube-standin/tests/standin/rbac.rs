//! RBAC from objects: a ServiceAccount, a Role with resourceNames and a RoleBinding created
//! through the API, a token issued by the TokenRequest subresource, and that token allowed
//! exactly what the Role grants (403 Status bodies for everything else, as kube-apiserver's
//! authorizer words them); the token stops working when its ServiceAccount is deleted.

use serde_json::json;

use crate::support::*;

const NS: &str = "/api/v1/namespaces/kube-system";
const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/kube-system";

fn token_of(r: &Resp) -> String {
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["kind"], "TokenRequest");
    r.json["status"]["token"].as_str().expect("a token").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_bindings_grant_a_service_account_token_exactly_their_rules() {
    let dir = Scratch::new("rbac");
    let s = Standin::start(dir.path(), &[]);
    s.create_cm("kube-system", "cpha-members", json!({"members": "10.0.0.11:6443"})).await;
    s.create_cm("kube-system", "other", json!({})).await;

    // No account yet: 404 for its token.
    let r = s.post(&format!("{NS}/serviceaccounts/cpha/token"), ADMIN, &json!({})).await;
    r.assert_status(404, "NotFound");
    assert_eq!(r.json["message"], "serviceaccounts \"cpha\" not found");

    let r = s
        .post(
            &format!("{NS}/serviceaccounts"),
            ADMIN,
            &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "cpha"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    // Invalid Roles and RoleBindings are refused with the API server's causes.
    let r = s
        .post(
            &format!("{RBAC}/roles"),
            ADMIN,
            &json!({"metadata": {"name": "bad"}, "rules": [{"verbs": [], "resources": ["configmaps"]}]}),
        )
        .await;
    r.assert_status(422, "Invalid");
    let fields: Vec<&str> =
        r.json["details"]["causes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["rules[0].verbs", "rules[0].apiGroups"], "{}", r.text);
    let r = s
        .post(
            &format!("{RBAC}/rolebindings"),
            ADMIN,
            &json!({"metadata": {"name": "bad"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Secret", "name": "x"}}),
        )
        .await;
    r.assert_status(422, "Invalid");

    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "cpha-agent"},
    "rules": [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cpha-members"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]});
    assert_eq!(s.post(&format!("{RBAC}/roles"), ADMIN, &role).await.status, 201);
    let token = token_of(
        &s.post(&format!("{NS}/serviceaccounts/cpha/token"), ADMIN, &json!({"spec": {"expirationSeconds": 3600}}))
            .await,
    );
    assert_eq!(token.split('.').count(), 3, "a JWT");

    // Before the binding the token authenticates but is allowed nothing.
    let r = s.get(&format!("{NS}/configmaps/cpha-members"), &token).await;
    r.assert_status(403, "Forbidden");
    assert_eq!(
        r.json["message"],
        "configmaps \"cpha-members\" is forbidden: User \"system:serviceaccount:kube-system:cpha\" cannot get resource \"configmaps\" in API group \"\" in the namespace \"kube-system\""
    );

    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "cpha-agent"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cpha-agent"},
        "subjects": [{"kind": "ServiceAccount", "name": "cpha", "namespace": "kube-system"}]});
    let r = s.post(&format!("{RBAC}/rolebindings"), ADMIN, &binding).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // roleRef cannot change.
    let mut changed = r.json.clone();
    changed["roleRef"]["name"] = json!("other");
    s.put(&format!("{RBAC}/rolebindings/cpha-agent"), ADMIN, &changed).await.assert_status(422, "Invalid");

    // Granted: its ConfigMap by name, a list/watch selecting it, Events.
    let r = s.get(&format!("{NS}/configmaps/cpha-members"), &token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s.get(&format!("{NS}/configmaps?fieldSelector=metadata.name%3Dcpha-members"), &token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut w = s.watch(&format!("{NS}/configmaps?watch=1&fieldSelector=metadata.name%3Dcpha-members"), &token).await;
    let ev = w.expect(5 * SEC).await;
    assert_eq!(ev["object"]["metadata"]["name"], "cpha-members");

    // Refused: everything else.
    let refused = [
        ("GET", format!("{NS}/configmaps"), "configmaps is forbidden: User \"system:serviceaccount:kube-system:cpha\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"kube-system\""),
        ("GET", "/api/v1/configmaps".to_string(), "configmaps is forbidden: User \"system:serviceaccount:kube-system:cpha\" cannot list resource \"configmaps\" in API group \"\" at the cluster scope"),
        ("GET", format!("{NS}/configmaps/other"), "configmaps \"other\" is forbidden: User \"system:serviceaccount:kube-system:cpha\" cannot get resource \"configmaps\" in API group \"\" in the namespace \"kube-system\""),
        ("GET", format!("{NS}/secrets/cpha-token"), "secrets \"cpha-token\" is forbidden: User \"system:serviceaccount:kube-system:cpha\" cannot get resource \"secrets\" in API group \"\" in the namespace \"kube-system\""),
        ("PUT", format!("{NS}/configmaps/cpha-members"), "configmaps \"cpha-members\" is forbidden: User \"system:serviceaccount:kube-system:cpha\" cannot update resource \"configmaps\" in API group \"\" in the namespace \"kube-system\""),
        ("POST", format!("{NS}/serviceaccounts/cpha/token"), "serviceaccounts \"cpha\" is forbidden: User \"system:serviceaccount:kube-system:cpha\" cannot create resource \"serviceaccounts/token\" in API group \"\" in the namespace \"kube-system\""),
        ("GET", format!("{RBAC}/roles"), "roles.rbac.authorization.k8s.io is forbidden: User \"system:serviceaccount:kube-system:cpha\" cannot list resource \"roles\" in API group \"rbac.authorization.k8s.io\" in the namespace \"kube-system\""),
    ];
    for (method, path, message) in refused {
        let body = json!({"metadata": {"name": "cpha-members"}});
        let r = match method {
            "GET" => s.get(&path, &token).await,
            "PUT" => s.put(&path, &token, &body).await,
            _ => s.post(&path, &token, &json!({})).await,
        };
        r.assert_status(403, "Forbidden");
        assert_eq!(r.json["message"], message, "{method} {path}");
    }

    // Deleting the account revokes its tokens (401), as for a bound token; a new account of
    // the same name does not bring them back.
    assert_eq!(s.delete(&format!("{NS}/serviceaccounts/cpha"), ADMIN, None).await.status, 200);
    s.get(&format!("{NS}/configmaps/cpha-members"), &token).await.assert_status(401, "Unauthorized");
    let r = s.post(&format!("{NS}/serviceaccounts"), ADMIN, &json!({"metadata": {"name": "cpha"}})).await;
    assert_eq!(r.status, 201);
    s.get(&format!("{NS}/configmaps/cpha-members"), &token).await.assert_status(401, "Unauthorized");
    let fresh = token_of(&s.post(&format!("{NS}/serviceaccounts/cpha/token"), ADMIN, &json!({})).await);
    assert_eq!(s.get(&format!("{NS}/configmaps/cpha-members"), &fresh).await.status, 200);

    // A forged token (another signature) authenticates nobody.
    let mut parts: Vec<&str> = fresh.split('.').collect();
    parts[2] = "AAAA";
    s.get(&format!("{NS}/configmaps/cpha-members"), &parts.join(".")).await.assert_status(401, "Unauthorized");
    // Lifetimes outside 10 minutes .. 2^32 s are invalid.
    let r =
        s.post(&format!("{NS}/serviceaccounts/cpha/token"), ADMIN, &json!({"spec": {"expirationSeconds": 60}})).await;
    r.assert_status(422, "Invalid");
    assert!(
        r.json["message"].as_str().unwrap().contains("may not specify a duration less than 10 minutes"),
        "{}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_token_lifetime_is_allowed_by_flag_and_enforced() {
    let dir = Scratch::new("short-tokens");
    let s = Standin::start(dir.path(), &["--min-token-duration", "2s"]);
    s.create_cm("kube-system", "cpha-members", json!({"members": "10.0.0.11:6443"})).await;
    assert_eq!(
        s.post(&format!("{NS}/serviceaccounts"), ADMIN, &json!({"metadata": {"name": "cpha"}})).await.status,
        201
    );
    let r =
        s.post(&format!("{NS}/serviceaccounts/cpha/token"), ADMIN, &json!({"spec": {"expirationSeconds": 1}})).await;
    r.assert_status(422, "Invalid");
    assert!(r.json["message"].as_str().unwrap().contains("less than 2 seconds"), "{}", r.text);
    let r =
        s.post(&format!("{NS}/serviceaccounts/cpha/token"), ADMIN, &json!({"spec": {"expirationSeconds": 2}})).await;
    assert_eq!(r.json["spec"]["expirationSeconds"], 2);
    let token = token_of(&r);
    // Authenticated (403: no binding) until it expires, then Unauthorized.
    s.get(&format!("{NS}/configmaps/cpha-members"), &token).await.assert_status(403, "Forbidden");
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    s.get(&format!("{NS}/configmaps/cpha-members"), &token).await.assert_status(401, "Unauthorized");
}
