//! Non-resource endpoints: health checks (`/healthz`, `/livez`, `/readyz`, verbose and per
//! check), `/version`, and legacy discovery (`/api`, `/api/v1`, `/apis`, `/apis/<group>`,
//! `/apis/<group>/<version>`).

use std::collections::HashMap;

use hyper::Response;
use serde_json::{json, Value};

use crate::app::App;
use crate::http::body::{self, Body};
use crate::resources::Kind;

const LIVEZ_CHECKS: [&str; 8] = [
    "ping",
    "log",
    "etcd",
    "poststarthook/start-apiserver-admission-initializer",
    "poststarthook/generic-apiserver-start-informers",
    "poststarthook/start-system-namespaces-controller",
    "poststarthook/bootstrap-controller",
    "poststarthook/rbac/bootstrap-roles",
];
const READYZ_EXTRA: [&str; 3] = ["etcd-readiness", "informer-sync", "shutdown"];

pub fn is_health_path(path: &str) -> bool {
    ["/healthz", "/livez", "/readyz"].iter().any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

/// Anonymous users may read these (system:public-info-viewer).
pub fn is_public(path: &str) -> bool {
    is_health_path(path) || path == "/version" || path == "/version/"
}

pub fn health(app: &App, path: &str, query: &HashMap<String, String>) -> Response<Body> {
    let (endpoint, check) = match path.trim_start_matches('/').split_once('/') {
        Some((e, c)) => (e, c.trim_end_matches('/')),
        None => (path.trim_start_matches('/'), ""),
    };
    let mut checks: Vec<&str> = LIVEZ_CHECKS.to_vec();
    if endpoint == "readyz" {
        checks.extend(READYZ_EXTRA);
    }
    let failing = |c: &str| match endpoint {
        "readyz" => c == "shutdown" && (app.faults.readyz_fail() || app.draining()),
        _ => c == "etcd" && app.faults.livez_fail(),
    };
    if !check.is_empty() {
        if !checks.contains(&check) {
            return body::text(404, "404 page not found\n");
        }
        return if failing(check) {
            body::text(500, "internal server error: reason withheld\n")
        } else {
            body::text(200, "ok")
        };
    }
    let excluded: Vec<&str> = query.get("exclude").map(|e| e.split(',').collect()).unwrap_or_default();
    let mut out = String::new();
    let mut failed = false;
    for c in &checks {
        if excluded.contains(c) {
            out.push_str(&format!("[+]{c} excluded: ok\n"));
        } else if failing(c) {
            failed = true;
            out.push_str(&format!("[-]{c} failed: reason withheld\n"));
        } else {
            out.push_str(&format!("[+]{c} ok\n"));
        }
    }
    if failed {
        out.push_str(&format!("{endpoint} check failed\n"));
        return body::text(500, out);
    }
    if query.contains_key("verbose") {
        out.push_str(&format!("{endpoint} check passed\n"));
        body::text(200, out)
    } else {
        body::text(200, "ok")
    }
}

pub fn version(app: &App) -> Value {
    let v = app.cfg.git_version.trim_start_matches('v');
    let mut parts = v.split(['.', '-', '+']);
    let major = parts.next().unwrap_or("1");
    let minor = parts.next().unwrap_or("0");
    json!({
        "major": major,
        "minor": minor,
        "gitVersion": app.cfg.git_version,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-12-10T00:00:00Z",
        "goVersion": "go1.22.9",
        "compiler": "gc",
        "platform": format!("{}/{}", std::env::consts::OS, go_arch()),
    })
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn group_version(kind: Kind) -> Value {
    json!({"groupVersion": kind.api_version(), "version": kind.version()})
}

/// The legacy discovery document at `path`, if it is one.
pub fn discovery(app: &App, path: &str) -> Option<Value> {
    let path = path.trim_end_matches('/');
    let groups: Vec<Kind> = Kind::ALL.into_iter().filter(|k| !k.group().is_empty()).collect();
    // One entry per group in the group list, though a group serves several kinds.
    let mut first_of_group: Vec<Kind> = Vec::new();
    for k in &groups {
        if !first_of_group.iter().any(|f| f.group() == k.group()) {
            first_of_group.push(*k);
        }
    }
    let group_doc = |k: Kind| {
        json!({
            "name": k.group(),
            "versions": [group_version(k)],
            "preferredVersion": group_version(k),
        })
    };
    match path {
        "/api" => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": app.cfg.advertise}],
        })),
        "/api/v1" => Some(json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": Kind::ALL
                .into_iter()
                .filter(|k| k.group().is_empty())
                .map(Kind::api_resource)
                .chain([crate::namespaces::api_resource(), crate::tokens::api_resource()])
                .collect::<Vec<_>>(),
        })),
        "/apis" => Some(json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": first_of_group.iter().map(|k| group_doc(*k)).collect::<Vec<_>>(),
        })),
        _ => {
            let rest = path.strip_prefix("/apis/")?;
            let (group, version) = match rest.split_once('/') {
                Some((g, v)) => (g, Some(v)),
                None => (rest, None),
            };
            let kinds: Vec<Kind> = groups.iter().copied().filter(|k| k.group() == group).collect();
            let first = *kinds.first()?;
            match version {
                None => {
                    let mut doc = group_doc(first);
                    let m = doc.as_object_mut()?;
                    let mut out = serde_json::Map::new();
                    out.insert("kind".into(), "APIGroup".into());
                    out.insert("apiVersion".into(), "v1".into());
                    out.extend(std::mem::take(m));
                    Some(Value::Object(out))
                }
                Some(v) if v == first.version() => Some(json!({
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": first.api_version(),
                    "resources": kinds.iter().map(|k| k.api_resource()).collect::<Vec<_>>(),
                })),
                Some(_) => None,
            }
        }
    }
}
