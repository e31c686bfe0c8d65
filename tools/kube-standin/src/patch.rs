//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge patch
//! with the directives kubectl sends (`$patch`, `$retainKeys`, `$setElementOrder/…`,
//! `$deleteFromPrimitiveList/…`) and the list strategies of the served kinds.

use serde_json::{Map, Value};

use crate::status::ApiError;

pub const MERGE: &str = "application/merge-patch+json";
pub const STRATEGIC: &str = "application/strategic-merge-patch+json";
pub const JSON: &str = "application/json-patch+json";
pub const APPLY: &str = "application/apply-patch+yaml";
/// What the server lists when it refuses a patch type.
pub const ACCEPTED: [&str; 3] = [JSON, MERGE, STRATEGIC];

/// How a list field merges under a strategic merge patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListStrategy {
    /// Replaced whole (`atomic`, no patchStrategy).
    Replace,
    /// `patchStrategy:"merge"` on a list of scalars: union.
    MergeScalars,
    /// `patchStrategy:"merge" patchMergeKey:"<key>"`.
    MergeByKey(&'static str),
}

/// The list strategies shared by every object: only `metadata` has merge lists in the served kinds.
fn strategy(path: &[&str]) -> ListStrategy {
    match path {
        ["metadata", "finalizers"] => ListStrategy::MergeScalars,
        ["metadata", "ownerReferences"] => ListStrategy::MergeByKey("uid"),
        _ => ListStrategy::Replace,
    }
}

/// Applies `patch` of media type `content_type` to `original`.
pub fn apply(content_type: &str, original: &Value, body: &[u8]) -> Result<Value, ApiError> {
    match content_type {
        MERGE => {
            let p: Value = parse(body)?;
            if !p.is_object() {
                return Err(ApiError::bad_request(
                    "json: cannot unmarshal array into Go value of type map[string]interface {}",
                ));
            }
            let mut doc = original.clone();
            json_patch::merge(&mut doc, &p);
            Ok(doc)
        }
        JSON => {
            let p: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("the server rejected our request due to an error in our request: {e}"))
            })?;
            let mut doc = original.clone();
            json_patch::patch(&mut doc, &p).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?;
            Ok(doc)
        }
        STRATEGIC => {
            let p: Value = parse(body)?;
            let Value::Object(p) = p else {
                return Err(ApiError::bad_request("invalid JSON document"));
            };
            let Value::Object(o) = original else {
                return Err(ApiError::bad_request("invalid JSON document"));
            };
            let mut path = Vec::new();
            match merge_map(o, &p, &mut path).map_err(ApiError::bad_request)? {
                Some(m) => Ok(Value::Object(m)),
                None => Ok(Value::Object(Map::new())),
            }
        }
        other => Err(ApiError::unsupported_media_type(other, &ACCEPTED)),
    }
}

fn parse(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

const SET_ORDER: &str = "$setElementOrder/";
const DELETE_FROM: &str = "$deleteFromPrimitiveList/";

/// Merges a patch map into an original map; `None` means "delete this map".
fn merge_map(
    original: &Map<String, Value>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<Option<Map<String, Value>>, String> {
    let mut patch = patch.clone();
    match patch.shift_remove("$patch") {
        None => {}
        Some(Value::String(d)) if d == "replace" => {
            strip_directives(&mut patch);
            return Ok(Some(patch));
        }
        Some(Value::String(d)) if d == "delete" => return Ok(None),
        Some(Value::String(d)) if d == "merge" => {}
        Some(other) => return Err(format!("Unknown patch type: {other}")),
    }
    let retain = match patch.shift_remove("$retainKeys") {
        None => None,
        Some(Value::Array(keys)) => Some(
            keys.iter()
                .map(|k| {
                    k.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| "invalid patch: $retainKeys must be a list of strings".to_string())
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err("invalid patch: $retainKeys must be a list of strings".into()),
    };
    let mut out = original.clone();
    if let Some(keep) = &retain {
        out.retain(|k, _| keep.contains(k));
    }
    let keys: Vec<String> = patch.keys().cloned().collect();
    for key in keys {
        let pv = &patch[&key];
        if key.starts_with(SET_ORDER) {
            continue;
        }
        if let Some(field) = key.strip_prefix(DELETE_FROM) {
            let Value::Array(gone) = pv else {
                return Err(format!("invalid patch: {key} must be a list"));
            };
            if let Some(Value::Array(list)) = out.get_mut(field) {
                list.retain(|x| !gone.contains(x));
            }
            continue;
        }
        if pv.is_null() {
            out.shift_remove(&key);
            continue;
        }
        path.push(key.clone());
        let merged = match (out.get(&key), pv) {
            (Some(Value::Object(o)), Value::Object(p)) => merge_map(o, p, path)?.map(Value::Object),
            (None, Value::Object(p)) => merge_map(&Map::new(), p, path)?.map(Value::Object),
            (orig, Value::Array(p)) => {
                let refs: Vec<&str> = path.iter().map(String::as_str).collect();
                let empty = Vec::new();
                let o = match orig {
                    Some(Value::Array(a)) => a,
                    _ => &empty,
                };
                Some(Value::Array(merge_list(o, p, strategy(&refs), path)?))
            }
            (_, scalar) => Some(scalar.clone()),
        };
        path.pop();
        match merged {
            Some(v) => {
                out.insert(key, v);
            }
            None => {
                out.shift_remove(&key);
            }
        }
    }
    Ok(Some(out))
}

fn strip_directives(m: &mut Map<String, Value>) {
    m.retain(|k, _| !k.starts_with('$'));
    for v in m.values_mut() {
        if let Value::Object(inner) = v {
            strip_directives(inner);
        }
    }
}

fn merge_list(
    original: &[Value],
    patch: &[Value],
    strat: ListStrategy,
    path: &mut Vec<String>,
) -> Result<Vec<Value>, String> {
    let replace_directive = |v: &Value| v.get("$patch").and_then(Value::as_str) == Some("replace");
    match strat {
        ListStrategy::Replace => Ok(patch.to_vec()),
        ListStrategy::MergeScalars => {
            if patch.iter().any(replace_directive) {
                return Ok(patch.iter().filter(|v| !replace_directive(v)).cloned().collect());
            }
            let mut out = original.to_vec();
            for v in patch {
                if v.is_object() || v.is_array() {
                    return Err("invalid patch: merging a list of scalars with a non-scalar".into());
                }
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(out)
        }
        ListStrategy::MergeByKey(key) => {
            if patch.iter().any(replace_directive) {
                return Ok(patch.iter().filter(|v| !replace_directive(v)).cloned().collect());
            }
            let mut out = original.to_vec();
            for item in patch {
                let Value::Object(pm) = item else {
                    return Err(format!("invalid patch: list item without merge key {key}"));
                };
                let k = pm.get(key).ok_or_else(|| format!("map: {pm:?} does not contain declared merge key: {key}"))?;
                let pos = out.iter().position(|o| o.get(key) == Some(k));
                let delete = pm.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        out.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => {
                        let orig = out[i].as_object().cloned().unwrap_or_default();
                        match merge_map(&orig, pm, path)? {
                            Some(m) => out[i] = Value::Object(m),
                            None => {
                                out.remove(i);
                            }
                        }
                    }
                    (None, false) => {
                        let mut m = pm.clone();
                        strip_directives(&mut m);
                        out.push(Value::Object(m));
                    }
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(o: Value, p: Value) -> Value {
        apply(STRATEGIC, &o, p.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn strategic_merges_maps_and_deletes_keys() {
        let o = json!({"metadata": {"name": "x", "labels": {"a": "1", "b": "2"}}, "data": {"k": "v", "old": "x"}});
        let r = smp(o, json!({"metadata": {"labels": {"b": null, "c": "3"}}, "data": {"old": null, "new": "y"}}));
        assert_eq!(r["metadata"]["labels"], json!({"a": "1", "c": "3"}));
        assert_eq!(r["data"], json!({"k": "v", "new": "y"}));
    }

    #[test]
    fn strategic_directives() {
        let o = json!({"data": {"a": "1", "b": "2"}, "metadata": {"finalizers": ["x"], "ownerReferences": [{"uid": "1", "name": "a"}, {"uid": "2", "name": "b"}]}});
        let r = smp(o.clone(), json!({"data": {"$patch": "replace", "c": "3"}}));
        assert_eq!(r["data"], json!({"c": "3"}));
        let r = smp(o.clone(), json!({"data": {"$patch": "delete"}}));
        assert!(r.get("data").is_none());
        let r = smp(
            o.clone(),
            json!({"$retainKeys": ["metadata"], "metadata": {"$setElementOrder/finalizers": ["x", "y"], "finalizers": ["y"]}}),
        );
        assert!(r.get("data").is_none());
        assert_eq!(r["metadata"]["finalizers"], json!(["x", "y"]));
        let r = smp(o.clone(), json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}));
        assert_eq!(r["metadata"]["finalizers"], json!([]));
        let r = smp(
            o.clone(),
            json!({"metadata": {"ownerReferences": [{"uid": "1", "$patch": "delete"}, {"uid": "2", "name": "c"}, {"uid": "3", "name": "d"}]}}),
        );
        assert_eq!(r["metadata"]["ownerReferences"], json!([{"uid": "2", "name": "c"}, {"uid": "3", "name": "d"}]));
        let err = apply(STRATEGIC, &o, br#"{"data":{"$patch":"bogus"}}"#).unwrap_err();
        assert!(format!("{err:?}").contains("Unknown patch type"), "{err:?}");
    }

    #[test]
    fn strategic_replaces_atomic_lists() {
        let o = json!({"endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]});
        let r = smp(o, json!({"endpoints": [{"addresses": ["10.0.0.3"]}]}));
        assert_eq!(r["endpoints"], json!([{"addresses": ["10.0.0.3"]}]));
    }

    #[test]
    fn merge_and_json_patch() {
        let o = json!({"data": {"a": "1"}});
        let r = apply(MERGE, &o, br#"{"data":{"a":null,"b":"2"}}"#).unwrap();
        assert_eq!(r["data"], json!({"b": "2"}));
        let r = apply(
            JSON,
            &o,
            br#"[{"op":"test","path":"/data/a","value":"1"},{"op":"replace","path":"/data/a","value":"9"}]"#,
        )
        .unwrap();
        assert_eq!(r["data"]["a"], "9");
        let e = apply(JSON, &o, br#"[{"op":"test","path":"/data/a","value":"2"}]"#).unwrap_err();
        assert_eq!(e.code, 422);
        assert_eq!(apply(APPLY, &o, b"{}").unwrap_err().code, 415);
    }
}
