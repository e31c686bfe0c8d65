//! OpenAPI v2 (`/openapi/v2`), which kubectl up to 1.28 reads (as protobuf) to decide whether
//! the server validates fields itself and, failing that, to validate and to compute strategic
//! merge patches. Built as swagger JSON, served as JSON or encoded into the gnostic
//! `openapi.v2.Document` protobuf message that client-go asks for.

use serde_json::{json, Map, Value};

use crate::openapi::{schema_name, to_openapi, Version, META_REF};
use crate::resources::schema::OBJECT_META;
use crate::resources::Kind;

/// What a client asks for; the answer's Content-Type is the parseable form without the `@`.
pub const PROTOBUF_ACCEPT: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
pub const PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

fn query(name: &str, ty: &str) -> Value {
    json!({"uniqueItems": true, "type": ty, "name": name, "in": "query"})
}

fn path_param(name: &str) -> Value {
    json!({"uniqueItems": true, "type": "string", "name": name, "in": "path", "required": true})
}

fn operation(kind: Kind, action: &str, id: &str, mut params: Vec<Value>, body: bool) -> Value {
    let r = json!({"$ref": format!("#/definitions/{}", schema_name(kind))});
    if body {
        params.insert(0, json!({"name": "body", "in": "body", "required": true, "schema": r}));
    }
    let consumes = if action == "patch" {
        json!([crate::patch::JSON, crate::patch::MERGE, crate::patch::STRATEGIC])
    } else {
        json!(["*/*"])
    };
    json!({
        "consumes": consumes,
        "produces": ["application/json"],
        "schemes": ["https"],
        "operationId": id,
        "parameters": params,
        "responses": {"200": {"description": "OK", "schema": r}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": kind.group(), "kind": kind.name(), "version": kind.version()},
    })
}

/// The swagger document.
pub fn document() -> Value {
    let mut paths = Map::new();
    let mut defs = Map::new();
    defs.insert(META_REF.into(), to_openapi(&OBJECT_META, "metadata", Version::V2));
    for k in Kind::ALL {
        let base = if k.group().is_empty() { "/api/v1".to_string() } else { format!("/apis/{}", k.api_version()) };
        let n = k.name();
        let writes =
            || vec![query("dryRun", "string"), query("fieldManager", "string"), query("fieldValidation", "string")];
        let coll = format!("{base}/namespaces/{{namespace}}/{}", k.plural());
        paths.insert(
            format!("{coll}/{{name}}"),
            json!({
                "get": operation(k, "get", &format!("readNamespaced{n}"), vec![], false),
                "put": operation(k, "put", &format!("replaceNamespaced{n}"), writes(), true),
                "patch": operation(k, "patch", &format!("patchNamespaced{n}"), writes(), true),
                "delete": operation(k, "delete", &format!("deleteNamespaced{n}"), vec![query("dryRun", "string")], false),
                "parameters": [path_param("name"), path_param("namespace")],
            }),
        );
        paths.insert(
            coll,
            json!({
                "get": operation(k, "list", &format!("listNamespaced{n}"), vec![query("labelSelector", "string"), query("fieldSelector", "string"), query("watch", "boolean")], false),
                "post": operation(k, "post", &format!("createNamespaced{n}"), writes(), true),
                "parameters": [path_param("namespace")],
            }),
        );
        let mut d = to_openapi(k.schema(), "", Version::V2);
        d["x-kubernetes-group-version-kind"] = json!([{"group": k.group(), "kind": n, "version": k.version()}]);
        defs.insert(schema_name(k).into(), d);
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.31.4"},
        "paths": paths,
        "definitions": defs,
    })
}

/// Minimal protobuf writer.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.varint(u64::from(field) << 3 | 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn string(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(field, s.as_bytes());
        }
    }
    fn msg(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }
    fn boolean(&mut self, field: u32, b: bool) {
        if b {
            self.varint(u64::from(field) << 3);
            self.varint(1);
        }
    }
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

/// `x-…` keys as `NamedAny` messages whose value is YAML (JSON is YAML).
fn extensions(pb: &mut Pb, field: u32, v: &Value) {
    if let Some(o) = v.as_object() {
        for (k, val) in o.iter().filter(|(k, _)| k.starts_with("x-")) {
            let mut any = Pb::default();
            any.string(2, &format!("{val}\n"));
            let mut named = Pb::default();
            named.string(1, k);
            named.msg(2, any);
            pb.msg(field, named);
        }
    }
}

fn pb_schema(v: &Value) -> Pb {
    let mut p = Pb::default();
    p.string(1, &s(v, "$ref"));
    p.string(2, &s(v, "format"));
    p.string(4, &s(v, "description"));
    if let Some(ap) = v.get("additionalProperties") {
        let mut item = Pb::default();
        item.msg(1, pb_schema(ap));
        p.msg(21, item);
    }
    if let Some(t) = v["type"].as_str() {
        let mut ty = Pb::default();
        ty.string(1, t);
        p.msg(22, ty);
    }
    if let Some(items) = v.get("items") {
        let mut it = Pb::default();
        it.msg(1, pb_schema(items));
        p.msg(23, it);
    }
    if let Some(props) = v["properties"].as_object() {
        let mut pr = Pb::default();
        for (k, sv) in props {
            let mut named = Pb::default();
            named.string(1, k);
            named.msg(2, pb_schema(sv));
            pr.msg(1, named);
        }
        p.msg(25, pr);
    }
    extensions(&mut p, 31, v);
    p
}

fn pb_parameter(v: &Value) -> Pb {
    let mut param = Pb::default();
    if v["in"] == "body" {
        let mut b = Pb::default();
        b.string(2, &s(v, "name"));
        b.string(3, "body");
        b.boolean(4, v["required"].as_bool().unwrap_or(false));
        b.msg(5, pb_schema(&v["schema"]));
        param.msg(1, b);
    } else {
        let mut sub = Pb::default();
        sub.boolean(1, v["required"].as_bool().unwrap_or(false));
        sub.string(2, &s(v, "in"));
        sub.string(4, &s(v, "name"));
        let mut non_body = Pb::default();
        if v["in"] == "path" {
            sub.string(5, &s(v, "type"));
            sub.boolean(19, true);
            non_body.msg(4, sub);
        } else {
            sub.string(6, &s(v, "type"));
            sub.boolean(20, true);
            non_body.msg(3, sub);
        }
        param.msg(2, non_body);
    }
    let mut item = Pb::default();
    item.msg(1, param);
    item
}

fn pb_operation(v: &Value) -> Pb {
    let mut p = Pb::default();
    p.string(5, &s(v, "operationId"));
    for x in v["produces"].as_array().into_iter().flatten() {
        p.string(6, x.as_str().unwrap_or_default());
    }
    for x in v["consumes"].as_array().into_iter().flatten() {
        p.string(7, x.as_str().unwrap_or_default());
    }
    for x in v["parameters"].as_array().into_iter().flatten() {
        p.msg(8, pb_parameter(x));
    }
    let mut responses = Pb::default();
    for (code, r) in v["responses"].as_object().into_iter().flatten() {
        let mut resp = Pb::default();
        resp.string(1, &s(r, "description"));
        let mut item = Pb::default();
        item.msg(1, pb_schema(&r["schema"]));
        resp.msg(2, item);
        let mut value = Pb::default();
        value.msg(1, resp);
        let mut named = Pb::default();
        named.string(1, code);
        named.msg(2, value);
        responses.msg(1, named);
    }
    p.msg(9, responses);
    for x in v["schemes"].as_array().into_iter().flatten() {
        p.string(10, x.as_str().unwrap_or_default());
    }
    extensions(&mut p, 13, v);
    p
}

/// The document as a gnostic `openapi.v2.Document`.
pub fn protobuf(doc: &Value) -> Vec<u8> {
    let mut d = Pb::default();
    d.string(1, &s(doc, "swagger"));
    let mut info = Pb::default();
    info.string(1, &s(&doc["info"], "title"));
    info.string(2, &s(&doc["info"], "version"));
    d.msg(2, info);
    let mut paths = Pb::default();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        let mut pi = Pb::default();
        for (field, verb) in [(2, "get"), (3, "put"), (4, "post"), (5, "delete"), (8, "patch")] {
            if let Some(op) = item.get(verb) {
                pi.msg(field, pb_operation(op));
            }
        }
        for x in item["parameters"].as_array().into_iter().flatten() {
            pi.msg(9, pb_parameter(x));
        }
        let mut named = Pb::default();
        named.string(1, path);
        named.msg(2, pi);
        paths.msg(2, named);
    }
    d.msg(8, paths);
    let mut defs = Pb::default();
    for (name, sv) in doc["definitions"].as_object().into_iter().flatten() {
        let mut named = Pb::default();
        named.string(1, name);
        named.msg(2, pb_schema(sv));
        defs.msg(1, named);
    }
    d.msg(9, defs);
    d.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields() {
        let mut p = Pb::default();
        p.varint(300);
        assert_eq!(p.0, [0xac, 0x02]);
        let mut p = Pb::default();
        p.string(1, "2.0");
        assert_eq!(p.0, [0x0a, 3, b'2', b'.', b'0']);
        let mut p = Pb::default();
        p.boolean(4, true);
        p.boolean(5, false);
        assert_eq!(p.0, [0x20, 1]);
    }

    #[test]
    fn document_declares_field_validation_and_kinds() {
        let d = document();
        let patch = &d["paths"]["/api/v1/namespaces/{namespace}/configmaps/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "ConfigMap");
        assert!(patch["parameters"].as_array().unwrap().iter().any(|p| p["name"] == "fieldValidation"));
        let pb = protobuf(&d);
        assert_eq!(&pb[..5], [0x0a, 3, b'2', b'.', b'0']);
        let needle = b"x-kubernetes-group-version-kind";
        assert!(pb.windows(needle.len()).any(|w| w == needle));
    }
}
