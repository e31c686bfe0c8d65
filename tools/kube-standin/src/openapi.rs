//! OpenAPI v3 discovery (`/openapi/v3` and one document per group-version), the part of it
//! kubectl reads: which operations a kind has, that PATCH and POST take `fieldValidation`
//! (so `kubectl apply/edit/create` validate on the server) and which patch types PATCH accepts,
//! and the kinds' schemas with the list and patch extensions a strategic merge patch is
//! computed from. Generated from the same schema the server decodes with. OpenAPI v2 (what
//! kubectl up to 1.28 reads) is in `openapi_v2`.

use std::collections::HashMap;

use hyper::Response;
use serde_json::{json, Map, Value};

use crate::http::body::{self, Body};
use crate::patch;
use crate::resources::schema::{Schema, OBJECT_META};
use crate::resources::Kind;

/// Definition name of ObjectMeta, in both OpenAPI versions.
pub(crate) const META_REF: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// Definition name of a kind's schema, in both OpenAPI versions.
pub(crate) fn schema_name(kind: Kind) -> &'static str {
    match kind {
        Kind::ConfigMap => "io.k8s.api.core.v1.ConfigMap",
        Kind::EndpointSlice => "io.k8s.api.discovery.v1.EndpointSlice",
        Kind::Event => "io.k8s.api.events.v1.Event",
        Kind::ServiceAccount => "io.k8s.api.core.v1.ServiceAccount",
        Kind::Role => "io.k8s.api.rbac.v1.Role",
        Kind::RoleBinding => "io.k8s.api.rbac.v1.RoleBinding",
    }
}

/// Which OpenAPI document a schema goes into.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// Swagger 2.0 (`/openapi/v2`): references under `#/definitions`, no defaults, no list-map
    /// keys.
    V2,
    /// OpenAPI 3.0 (`/openapi/v3/...`): references under `#/components/schemas`.
    V3,
}

fn gvk(kind: Kind) -> Value {
    json!([{"group": kind.group(), "version": kind.version(), "kind": kind.name()}])
}

/// The OpenAPI schema of a field; `path` decides the list/patch extensions.
pub(crate) fn to_openapi(s: &Schema, path: &str, version: Version) -> Value {
    let v3 = version == Version::V3;
    match s {
        Schema::Str if v3 => json!({"type": "string", "default": ""}),
        Schema::Str => json!({"type": "string"}),
        Schema::Bool => json!({"type": "boolean"}),
        Schema::Int => json!({"type": "integer", "format": "int64"}),
        Schema::Bytes => json!({"type": "string", "format": "byte"}),
        Schema::Any => json!({"type": "object"}),
        Schema::Time | Schema::MicroTime => json!({"type": "string", "format": "date-time"}),
        Schema::Always(inner) => to_openapi(inner, path, version),
        Schema::Map(inner) => json!({
            "type": "object",
            "additionalProperties": to_openapi(inner, path, version),
        }),
        Schema::List(inner) => {
            let mut l = json!({"type": "array", "items": to_openapi(inner, path, version)});
            match path {
                "metadata.finalizers" => {
                    l["x-kubernetes-list-type"] = "set".into();
                    l["x-kubernetes-patch-strategy"] = "merge".into();
                }
                "metadata.ownerReferences" => {
                    if v3 {
                        l["x-kubernetes-list-type"] = "map".into();
                        l["x-kubernetes-list-map-keys"] = json!(["uid"]);
                    }
                    l["x-kubernetes-patch-merge-key"] = "uid".into();
                    l["x-kubernetes-patch-strategy"] = "merge".into();
                }
                _ => l["x-kubernetes-list-type"] = "atomic".into(),
            }
            l
        }
        Schema::Object(fields) => {
            let mut props = Map::new();
            for (name, fs) in fields.iter() {
                let p = if path.is_empty() { (*name).to_string() } else { format!("{path}.{name}") };
                let v = match (p.as_str(), version) {
                    ("metadata", Version::V3) => {
                        json!({"allOf": [{"$ref": format!("#/components/schemas/{META_REF}")}], "default": {}})
                    }
                    ("metadata", Version::V2) => json!({"$ref": format!("#/definitions/{META_REF}")}),
                    _ => to_openapi(fs, &p, version),
                };
                props.insert((*name).to_string(), v);
            }
            json!({"type": "object", "properties": props})
        }
    }
}

fn param(name: &str, ty: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": ty, "uniqueItems": true}})
}

fn op(kind: Kind, action: &str, id: &str, params: Vec<Value>, body_types: &[&str]) -> Value {
    let schema_ref = json!({"$ref": format!("#/components/schemas/{}", schema_name(kind))});
    let mut o = json!({
        "tags": [format!("{}_{}", kind.group().split('.').next().filter(|g| !g.is_empty()).unwrap_or("core"), kind.version())],
        "operationId": id,
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": schema_ref}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(kind)[0],
    });
    if !body_types.is_empty() {
        let content: Map<String, Value> = body_types
            .iter()
            .map(|t| {
                let s = if *t == "application/json" { schema_ref.clone() } else { json!({"type": "object"}) };
                ((*t).to_string(), json!({"schema": s}))
            })
            .collect();
        o["requestBody"] = json!({"content": content, "required": true});
    }
    o
}

fn write_params() -> Vec<Value> {
    vec![param("dryRun", "string"), param("fieldManager", "string"), param("fieldValidation", "string")]
}

fn list_params() -> Vec<Value> {
    [
        ("allowWatchBookmarks", "boolean"),
        ("continue", "string"),
        ("fieldSelector", "string"),
        ("labelSelector", "string"),
        ("limit", "integer"),
        ("resourceVersion", "string"),
        ("resourceVersionMatch", "string"),
        ("sendInitialEvents", "boolean"),
        ("timeoutSeconds", "integer"),
        ("watch", "boolean"),
    ]
    .iter()
    .map(|(n, t)| param(n, t))
    .collect()
}

/// The document of one group-version (`api/v1` or `apis/<group>/<version>`).
fn gv_doc(kinds: &[Kind]) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    schemas.insert(META_REF.into(), to_openapi(&OBJECT_META, "metadata", Version::V3));
    for &k in kinds {
        let base = if k.group().is_empty() { "/api/v1".to_string() } else { format!("/apis/{}", k.api_version()) };
        let n = k.name();
        let coll = format!("{base}/namespaces/{{namespace}}/{}", k.plural());
        let item = format!("{coll}/{{name}}");
        let path_params = |named: bool| {
            let mut v = vec![
                json!({"name": "namespace", "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}}),
            ];
            if named {
                v.push(json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}}));
            }
            v
        };
        let mut patch_params = write_params();
        patch_params.push(param("force", "boolean"));
        paths.insert(
            coll,
            json!({
                "get": op(k, "list", &format!("listNamespaced{n}"), list_params(), &[]),
                "post": op(k, "post", &format!("createNamespaced{n}"), write_params(), &["application/json"]),
                "delete": op(k, "deletecollection", &format!("deleteCollectionNamespaced{n}"), list_params(), &[]),
                "parameters": path_params(false),
            }),
        );
        paths.insert(item, json!({
            "get": op(k, "get", &format!("readNamespaced{n}"), vec![], &[]),
            "put": op(k, "put", &format!("replaceNamespaced{n}"), write_params(), &["application/json"]),
            "patch": op(k, "patch", &format!("patchNamespaced{n}"), patch_params, &[patch::JSON, patch::MERGE, patch::STRATEGIC]),
            "delete": op(k, "delete", &format!("deleteNamespaced{n}"), vec![param("dryRun", "string")], &[]),
            "parameters": path_params(true),
        }));
        paths.insert(
            format!("{base}/{}", k.plural()),
            json!({"get": op(k, "list", &format!("list{n}ForAllNamespaces"), list_params(), &[])}),
        );
        let mut s = to_openapi(k.schema(), "", Version::V3);
        s["x-kubernetes-group-version-kind"] = gvk(k);
        schemas.insert(schema_name(k).into(), s);
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.31.4"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

fn groups() -> Vec<(String, Vec<Kind>)> {
    let mut out: Vec<(String, Vec<Kind>)> = Vec::new();
    for k in Kind::ALL {
        let key = if k.group().is_empty() { "api/v1".to_string() } else { format!("apis/{}", k.api_version()) };
        match out.iter_mut().find(|(p, _)| *p == key) {
            Some((_, ks)) => ks.push(k),
            None => out.push((key, vec![k])),
        }
    }
    out
}

fn hash(v: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA512, v);
    d.as_ref().iter().map(|b| format!("{b:02X}")).collect()
}

pub fn serve(path: &str, query: &HashMap<String, String>, accept: Option<&str>) -> Option<Response<Body>> {
    let path = path.trim_end_matches('/');
    if path == "/openapi/v2" {
        let doc = crate::openapi_v2::document();
        let wants_pb = accept.is_some_and(|a| a.contains("protobuf"));
        return Some(if wants_pb {
            hyper::Response::builder()
                .status(200)
                .header(hyper::header::CONTENT_TYPE, crate::openapi_v2::PROTOBUF)
                .body(body::full(crate::openapi_v2::protobuf(&doc)))
                .expect("static response parts are valid")
        } else {
            body::json(200, &doc)
        });
    }
    if path == "/openapi/v3" {
        let mut paths = Map::new();
        for (p, kinds) in groups() {
            let doc = serde_json::to_vec(&gv_doc(&kinds)).unwrap_or_default();
            paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", hash(&doc))}));
        }
        return Some(body::json(200, &json!({ "paths": paths })));
    }
    let rest = path.strip_prefix("/openapi/v3/")?;
    let (_, kinds) = groups().into_iter().find(|(p, _)| p == rest)?;
    let doc = gv_doc(&kinds);
    let mut r = body::json(200, &doc);
    let bytes = serde_json::to_vec(&doc).unwrap_or_default();
    if query.get("hash").is_some_and(|h| *h == hash(&bytes)) {
        r.headers_mut()
            .insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("public, immutable"));
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_points_at_group_version_documents() {
        let r = serve("/openapi/v3", &HashMap::new(), None).unwrap();
        assert_eq!(r.status(), 200);
        let g = groups();
        assert_eq!(g[0].0, "api/v1");
        assert_eq!(g[1].0, "apis/discovery.k8s.io/v1");
        assert_eq!(g[2].0, "apis/events.k8s.io/v1");
        let ev = gv_doc(&g[2].1);
        let create = &ev["paths"]["/apis/events.k8s.io/v1/namespaces/{namespace}/events"]["post"];
        assert_eq!(create["x-kubernetes-group-version-kind"]["group"], "events.k8s.io");
        assert_eq!(create["tags"][0], "events_v1");
        let props = &ev["components"]["schemas"]["io.k8s.api.events.v1.Event"]["properties"];
        assert_eq!(props["eventTime"]["format"], "date-time");
        assert_eq!(props["regarding"]["properties"]["fieldPath"]["type"], "string");
        let doc = gv_doc(&g[0].1);
        let patch = &doc["paths"]["/api/v1/namespaces/{namespace}/configmaps/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "ConfigMap");
        assert!(patch["parameters"].as_array().unwrap().iter().any(|p| p["name"] == "fieldValidation"));
        assert!(patch["requestBody"]["content"].get(patch::STRATEGIC).is_some());
        let meta = &doc["components"]["schemas"][META_REF]["properties"];
        assert_eq!(meta["ownerReferences"]["x-kubernetes-patch-merge-key"], "uid");
        let v2 = serve("/openapi/v2", &HashMap::new(), Some(crate::openapi_v2::PROTOBUF_ACCEPT)).unwrap();
        assert_eq!(v2.headers()["content-type"], crate::openapi_v2::PROTOBUF);
        assert!(serve("/openapi/v3/apis/nope/v1", &HashMap::new(), None).is_none());
    }
}
