//! Content negotiation: which form of an object the client asked for in `Accept` (the object
//! itself, a server-side printed `Table` as kubectl asks for, or `PartialObjectMetadata` as
//! metadata-only clients do), and conversion of objects and lists into that form.

use serde_json::{json, Map, Value};

use crate::resources::Kind;
use crate::status::ApiError;
use crate::timefmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Object,
    /// `meta.k8s.io/<version>` Table.
    Table(&'static str, IncludeObject),
    /// `meta.k8s.io/<version>` PartialObjectMetadata(List).
    Partial(&'static str),
}

const OFFERED: [&str; 3] = ["application/json", "application/yaml", "application/vnd.kubernetes.protobuf"];

/// Picks the first acceptable entry of `Accept`.
pub fn choose(accept: Option<&str>, include: Option<&str>) -> Result<Form, ApiError> {
    let include = match include {
        None | Some("") | Some("Metadata") => IncludeObject::Metadata,
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "includeObject: Unsupported value: {other:?}: supported values: \"Metadata\", \"None\", \"Object\""
            )))
        }
    };
    let accept = match accept {
        None => return Ok(Form::Object),
        Some(a) if a.trim().is_empty() => return Ok(Form::Object),
        Some(a) => a,
    };
    for entry in accept.split(',') {
        let mut parts = entry.split(';').map(str::trim);
        let mime = parts.next().unwrap_or_default().to_ascii_lowercase();
        let mut as_ = "";
        let mut g = "";
        let mut v = "";
        for p in parts {
            if let Some((k, val)) = p.split_once('=') {
                match k.trim() {
                    "as" => as_ = val.trim(),
                    "g" => g = val.trim(),
                    "v" => v = val.trim(),
                    _ => {}
                }
            }
        }
        if !matches!(mime.as_str(), "application/json" | "*/*" | "application/*") {
            continue;
        }
        let version = match v {
            "v1" => "meta.k8s.io/v1",
            "v1beta1" => "meta.k8s.io/v1beta1",
            _ => "",
        };
        match as_ {
            "" => return Ok(Form::Object),
            "Table" if g == "meta.k8s.io" && !version.is_empty() => return Ok(Form::Table(version, include)),
            "PartialObjectMetadata" | "PartialObjectMetadataList" if g == "meta.k8s.io" && !version.is_empty() => {
                return Ok(Form::Partial(version))
            }
            _ => continue,
        }
    }
    Err(ApiError::not_acceptable(&OFFERED))
}

pub fn partial(version: &str, obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": version, "metadata": obj["metadata"]})
}

fn row(kind: Kind, version: &str, include: IncludeObject, obj: &Value, now: i64) -> Value {
    let mut r = Map::new();
    r.insert("cells".into(), Value::Array(kind.table_cells(obj, now)));
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => {
            r.insert("object".into(), partial(version, obj));
        }
        IncludeObject::Object => {
            r.insert("object".into(), with_type(kind, obj));
        }
    }
    Value::Object(r)
}

/// The object with `kind` and `apiVersion` first (list items are stored without them).
pub fn with_type(kind: Kind, obj: &Value) -> Value {
    let mut m = Map::new();
    m.insert("kind".into(), kind.name().into());
    m.insert("apiVersion".into(), kind.api_version().into());
    if let Some(o) = obj.as_object() {
        for (k, v) in o {
            if k != "kind" && k != "apiVersion" {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(m)
}

/// The object without `kind` and `apiVersion` (how typed list items are encoded).
pub fn without_type(obj: &Value) -> Value {
    let mut o = obj.as_object().cloned().unwrap_or_default();
    o.shift_remove("kind");
    o.shift_remove("apiVersion");
    Value::Object(o)
}

/// A single object in the chosen form.
pub fn render_one(kind: Kind, form: Form, obj: &Value) -> Value {
    match form {
        Form::Object => with_type(kind, obj),
        Form::Partial(v) => partial(v, obj),
        Form::Table(v, inc) => {
            let rv = obj["metadata"]["resourceVersion"].clone();
            json!({
                "kind": "Table",
                "apiVersion": v,
                "metadata": {"resourceVersion": rv},
                "columnDefinitions": kind.table_columns(),
                "rows": [row(kind, v, inc, obj, timefmt::now_unix())],
            })
        }
    }
}

/// A list in the chosen form; `meta` is the list's metadata (resourceVersion, continue, ...).
pub fn render_list(kind: Kind, form: Form, meta: Map<String, Value>, items: &[&Value]) -> Value {
    match form {
        Form::Object => json!({
            "kind": kind.list_kind(),
            "apiVersion": kind.api_version(),
            "metadata": meta,
            "items": items.iter().map(|o| without_type(o)).collect::<Vec<_>>(),
        }),
        Form::Partial(v) => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": v,
            "metadata": meta,
            "items": items.iter().map(|o| json!({"metadata": o["metadata"]})).collect::<Vec<_>>(),
        }),
        Form::Table(v, inc) => {
            let now = timefmt::now_unix();
            json!({
                "kind": "Table",
                "apiVersion": v,
                "metadata": meta,
                "columnDefinitions": kind.table_columns(),
                "rows": items.iter().map(|o| row(kind, v, inc, o, now)).collect::<Vec<_>>(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_forms_like_the_api_server() {
        assert_eq!(choose(None, None).unwrap(), Form::Object);
        assert_eq!(choose(Some("application/json"), None).unwrap(), Form::Object);
        assert_eq!(choose(Some("*/*"), None).unwrap(), Form::Object);
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(choose(Some(kubectl), None).unwrap(), Form::Table("meta.k8s.io/v1", IncludeObject::Metadata));
        assert_eq!(
            choose(Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"), None).unwrap(),
            Form::Partial("meta.k8s.io/v1")
        );
        assert_eq!(choose(Some("application/json;as=Bogus;v=v1;g=x, application/json"), None).unwrap(), Form::Object);
        assert_eq!(choose(Some("application/vnd.kubernetes.protobuf"), None).unwrap_err().code, 406);
        assert_eq!(choose(None, Some("Everything")).unwrap_err().code, 400);
    }

    #[test]
    fn lists_drop_item_types() {
        let o = json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "a", "resourceVersion": "3"}});
        let mut meta = Map::new();
        meta.insert("resourceVersion".into(), "7".into());
        let l = render_list(Kind::ConfigMap, Form::Object, meta, &[&o]);
        assert_eq!(l["kind"], "ConfigMapList");
        assert_eq!(l["items"][0], json!({"metadata": {"name": "a", "resourceVersion": "3"}}));
        let t = render_one(Kind::ConfigMap, Form::Table("meta.k8s.io/v1", IncludeObject::Metadata), &o);
        assert_eq!(t["rows"][0]["cells"][1], 0);
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
