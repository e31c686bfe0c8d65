//! Read-only core/v1 Namespaces: `default`, `kube-system`, `kube-public`, `kube-node-lease`,
//! those given with `--namespace`, and any namespace holding an object. Objects may only be
//! created in one of them, as the API server's NamespaceLifecycle admission requires.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::app::App;
use crate::http::negotiate::Form;
use crate::resources::Kind;
use crate::status::ApiError;
use crate::timefmt;

pub const BUILT_IN: [&str; 4] = ["default", "kube-node-lease", "kube-public", "kube-system"];

pub fn api_resource() -> Value {
    json!({
        "name": "namespaces",
        "singularName": "namespace",
        "namespaced": false,
        "kind": "Namespace",
        "verbs": ["get", "list"],
        "shortNames": ["ns"],
        "storageVersionHash": "Q3oi5N2YM8M=",
    })
}

pub fn names(app: &App) -> BTreeSet<String> {
    let mut s: BTreeSet<String> = BUILT_IN.iter().map(|n| n.to_string()).collect();
    s.extend(app.cfg.namespaces.iter().cloned());
    for k in Kind::ALL {
        let (_, items) = app.store.list(k, None);
        for o in items {
            if let Some(ns) = o["metadata"]["namespace"].as_str() {
                s.insert(ns.to_string());
            }
        }
    }
    s
}

pub fn exists(app: &App, ns: &str) -> bool {
    BUILT_IN.contains(&ns) || app.cfg.namespaces.iter().any(|n| n == ns) || names(app).contains(ns)
}

pub fn not_found(ns: &str) -> ApiError {
    ApiError::not_found("", "namespaces", ns)
}

/// A stable uid per name, so repeated reads agree.
fn uid(name: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let h: String = d.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-4{}-8{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

fn object(app: &App, name: &str) -> Value {
    json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": uid(name),
            "resourceVersion": "1",
            "creationTimestamp": timefmt::rfc3339(app.cfg.started),
            "labels": {"kubernetes.io/metadata.name": name},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

fn columns() -> Value {
    json!([
        {"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0},
        {"name": "Status", "type": "string", "format": "", "description": "The status of the namespace", "priority": 0},
        {"name": "Age", "type": "string", "format": "", "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0},
    ])
}

fn row(app: &App, o: &Value, form: Form) -> Value {
    let age = timefmt::human_duration(timefmt::now_unix() - app.cfg.started);
    let mut r = json!({"cells": [o["metadata"]["name"], "Active", age]});
    if let Form::Table(v, inc) = form {
        match inc {
            crate::http::negotiate::IncludeObject::None => {}
            crate::http::negotiate::IncludeObject::Metadata => {
                r["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": v, "metadata": o["metadata"]});
            }
            crate::http::negotiate::IncludeObject::Object => r["object"] = o.clone(),
        }
    }
    r
}

pub fn get(app: &App, name: &str, form: Form) -> Result<Value, ApiError> {
    if !exists(app, name) {
        return Err(not_found(name));
    }
    let o = object(app, name);
    Ok(match form {
        Form::Object => o,
        Form::Partial(v) => json!({"kind": "PartialObjectMetadata", "apiVersion": v, "metadata": o["metadata"]}),
        Form::Table(v, _) => json!({
            "kind": "Table", "apiVersion": v, "metadata": {"resourceVersion": "1"},
            "columnDefinitions": columns(), "rows": [row(app, &o, form)],
        }),
    })
}

pub fn list(app: &App, form: Form) -> Value {
    let objs: Vec<Value> = names(app).iter().map(|n| object(app, n)).collect();
    let rv = app.store.current_rv().to_string();
    match form {
        Form::Object => {
            let items: Vec<Value> = objs
                .iter()
                .map(|o| {
                    let mut m: Map<String, Value> = o.as_object().cloned().unwrap_or_default();
                    m.shift_remove("kind");
                    m.shift_remove("apiVersion");
                    Value::Object(m)
                })
                .collect();
            json!({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items})
        }
        Form::Partial(v) => json!({
            "kind": "PartialObjectMetadataList", "apiVersion": v, "metadata": {"resourceVersion": rv},
            "items": objs.iter().map(|o| json!({"metadata": o["metadata"]})).collect::<Vec<_>>(),
        }),
        Form::Table(v, _) => json!({
            "kind": "Table", "apiVersion": v, "metadata": {"resourceVersion": rv},
            "columnDefinitions": columns(),
            "rows": objs.iter().map(|o| row(app, o, form)).collect::<Vec<_>>(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uids_are_stable_uuids() {
        let a = super::uid("kube-system");
        assert_eq!(a, super::uid("kube-system"));
        assert_ne!(a, super::uid("default"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
