//! The wire shape of the served kinds, enough to decode a request body the way the API server's
//! typed decoder does: unknown fields dropped (and reported, for `fieldValidation`), nulls read
//! as absent, wrong JSON types refused, times parsed with Go's layouts and written back in UTC,
//! fields written back in the Go struct order with map keys sorted, and fields without
//! `omitempty` written even when empty (`{}`, `0`, or `null` for a time), as Go's encoder does.

use serde_json::{Map, Value};

/// A field's type.
#[derive(Debug)]
pub enum Schema {
    Str,
    Bool,
    Int,
    /// A string holding base64 (`[]byte` in Go).
    Bytes,
    /// `map[string]T`.
    Map(&'static Schema),
    /// `[]T`.
    List(&'static Schema),
    /// A struct, fields in declaration order.
    Object(&'static [(&'static str, &'static Schema)]),
    /// Anything, kept verbatim (`managedFields`).
    Any,
    /// `metav1.Time`: RFC 3339, written back in UTC with whole seconds.
    Time,
    /// `metav1.MicroTime`: RFC 3339 with exactly six fractional digits, written back in UTC.
    MicroTime,
    /// A field without `omitempty` (a struct, a number or a time): written even when absent, as
    /// its zero value (`{}`, `0`, `null` for a time).
    Always(&'static Schema),
}

pub static STR: Schema = Schema::Str;
pub static BOOL: Schema = Schema::Bool;
pub static INT: Schema = Schema::Int;
pub static BYTES: Schema = Schema::Bytes;
pub static ANY: Schema = Schema::Any;
pub static STR_MAP: Schema = Schema::Map(&STR);
pub static STR_LIST: Schema = Schema::List(&STR);
pub static TIME: Schema = Schema::Time;
pub static MICRO_TIME: Schema = Schema::MicroTime;

static OWNER_REF: Schema = Schema::Object(&[
    ("apiVersion", &STR),
    ("kind", &STR),
    ("name", &STR),
    ("uid", &STR),
    ("controller", &BOOL),
    ("blockOwnerDeletion", &BOOL),
]);
static OWNER_REFS: Schema = Schema::List(&OWNER_REF);
static MANAGED_FIELDS: Schema = Schema::List(&ANY);

/// ObjectMeta's fields in declaration order.
pub const META_ORDER: [&str; 15] = [
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

pub static OBJECT_META: Schema = Schema::Object(&[
    ("name", &STR),
    ("generateName", &STR),
    ("namespace", &STR),
    ("selfLink", &STR),
    ("uid", &STR),
    ("resourceVersion", &STR),
    ("generation", &INT),
    ("creationTimestamp", &STR),
    ("deletionTimestamp", &STR),
    ("deletionGracePeriodSeconds", &INT),
    ("labels", &STR_MAP),
    ("annotations", &STR_MAP),
    ("ownerReferences", &OWNER_REFS),
    ("finalizers", &STR_LIST),
    ("managedFields", &MANAGED_FIELDS),
]);

pub static CONFIG_MAP: Schema = Schema::Object(&[
    ("kind", &STR),
    ("apiVersion", &STR),
    ("metadata", &OBJECT_META),
    ("immutable", &BOOL),
    ("data", &STR_MAP),
    ("binaryData", &BYTES_MAP),
]);
static BYTES_MAP: Schema = Schema::Map(&BYTES);

static CONDITIONS: Schema = Schema::Object(&[("ready", &BOOL), ("serving", &BOOL), ("terminating", &BOOL)]);
static OBJECT_REF: Schema = Schema::Object(&[
    ("kind", &STR),
    ("namespace", &STR),
    ("name", &STR),
    ("uid", &STR),
    ("apiVersion", &STR),
    ("resourceVersion", &STR),
    ("fieldPath", &STR),
]);
static FOR_NAME: Schema = Schema::Object(&[("name", &STR)]);
static FOR_NAMES: Schema = Schema::List(&FOR_NAME);
static HINTS: Schema = Schema::Object(&[("forZones", &FOR_NAMES), ("forNodes", &FOR_NAMES)]);
static ENDPOINT: Schema = Schema::Object(&[
    ("addresses", &STR_LIST),
    ("conditions", &CONDITIONS),
    ("hostname", &STR),
    ("targetRef", &OBJECT_REF),
    ("deprecatedTopology", &STR_MAP),
    ("nodeName", &STR),
    ("zone", &STR),
    ("hints", &HINTS),
]);
static ENDPOINTS: Schema = Schema::List(&ENDPOINT);
static ENDPOINT_PORT: Schema =
    Schema::Object(&[("name", &STR), ("protocol", &STR), ("port", &INT), ("appProtocol", &STR)]);
static ENDPOINT_PORTS: Schema = Schema::List(&ENDPOINT_PORT);

pub static ENDPOINT_SLICE: Schema = Schema::Object(&[
    ("kind", &STR),
    ("apiVersion", &STR),
    ("metadata", &OBJECT_META),
    ("addressType", &STR),
    ("endpoints", &ENDPOINTS),
    ("ports", &ENDPOINT_PORTS),
]);

static EVENT_SERIES: Schema =
    Schema::Object(&[("count", &Schema::Always(&INT)), ("lastObservedTime", &Schema::Always(&MICRO_TIME))]);
static EVENT_SOURCE: Schema = Schema::Object(&[("component", &STR), ("host", &STR)]);

/// events.k8s.io/v1 Event.
pub static EVENT: Schema = Schema::Object(&[
    ("kind", &STR),
    ("apiVersion", &STR),
    ("metadata", &OBJECT_META),
    ("eventTime", &Schema::Always(&MICRO_TIME)),
    ("series", &EVENT_SERIES),
    ("reportingController", &STR),
    ("reportingInstance", &STR),
    ("action", &STR),
    ("reason", &STR),
    ("regarding", &Schema::Always(&OBJECT_REF)),
    ("related", &OBJECT_REF),
    ("note", &STR),
    ("type", &STR),
    ("deprecatedSource", &Schema::Always(&EVENT_SOURCE)),
    ("deprecatedFirstTimestamp", &Schema::Always(&TIME)),
    ("deprecatedLastTimestamp", &Schema::Always(&TIME)),
    ("deprecatedCount", &INT),
]);

/// What decoding found besides the value.
#[derive(Debug, Default)]
pub struct Decoded {
    pub value: Value,
    /// Dotted paths of fields the schema does not know (`spec`, `metadata.foo`).
    pub unknown: Vec<String>,
}

/// A JSON value of the wrong type, worded like Go's `encoding/json`.
#[derive(Debug)]
pub struct TypeError {
    pub json_type: &'static str,
    pub path: String,
    pub go_type: &'static str,
    /// The error of a type with its own decoder (a time), reported as it words it.
    pub detail: Option<String>,
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn go_type(s: &Schema) -> &'static str {
    match s {
        Schema::Str => "string",
        Schema::Bool => "bool",
        Schema::Int => "int64",
        Schema::Bytes => "[]uint8",
        Schema::Map(_) => "map[string]string",
        Schema::List(_) => "slice",
        Schema::Object(_) => "struct",
        Schema::Any => "interface",
        Schema::Time | Schema::MicroTime => "string",
        Schema::Always(inner) => go_type(inner),
    }
}

fn zero(s: &Schema) -> Value {
    match s {
        Schema::Str | Schema::Bytes => Value::String(String::new()),
        Schema::Bool => Value::Bool(false),
        Schema::Int => Value::from(0),
        Schema::Map(_) | Schema::Object(_) => Value::Object(Map::new()),
        Schema::List(_) => Value::Array(Vec::new()),
        Schema::Any | Schema::Time | Schema::MicroTime => Value::Null,
        Schema::Always(inner) => zero(inner),
    }
}

/// Decodes `v` against `schema`.
pub fn decode(v: &Value, schema: &Schema) -> Result<Decoded, TypeError> {
    let mut unknown = Vec::new();
    let value = walk(v, schema, "", &mut unknown)?.unwrap_or_else(|| zero(schema));
    Ok(Decoded { value, unknown })
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// `Ok(None)` for a null (absent) value.
fn walk(v: &Value, schema: &Schema, path: &str, unknown: &mut Vec<String>) -> Result<Option<Value>, TypeError> {
    if v.is_null() {
        return Ok(None);
    }
    let mismatch =
        || TypeError { json_type: json_type(v), path: path.to_string(), go_type: go_type(schema), detail: None };
    let out = match schema {
        Schema::Any => v.clone(),
        Schema::Always(inner) => return walk(v, inner, path, unknown),
        Schema::Time | Schema::MicroTime => {
            let micro = matches!(schema, Schema::MicroTime);
            // The time types decode a JSON string themselves: other JSON types fail there.
            let s = v.as_str().ok_or_else(|| TypeError {
                detail: Some(format!("json: cannot unmarshal {} into Go value of type string", json_type(v))),
                ..mismatch()
            })?;
            let (secs, nanos) = crate::timefmt::parse_go(s, micro).map_err(|e| TypeError {
                json_type: "string",
                detail: Some(e),
                ..mismatch()
            })?;
            Value::String(if micro {
                crate::timefmt::rfc3339_micro(secs, nanos / 1000)
            } else {
                crate::timefmt::rfc3339(secs)
            })
        }
        Schema::Str => Value::String(v.as_str().ok_or_else(mismatch)?.to_string()),
        Schema::Bytes => {
            let s = v.as_str().ok_or_else(mismatch)?;
            use base64::Engine as _;
            if base64::engine::general_purpose::STANDARD.decode(s).is_err() {
                return Err(TypeError {
                    json_type: "string",
                    path: path.to_string(),
                    go_type: "[]uint8 (illegal base64 data)",
                    detail: None,
                });
            }
            Value::String(s.to_string())
        }
        Schema::Bool => Value::Bool(v.as_bool().ok_or_else(mismatch)?),
        Schema::Int => {
            if let Some(i) = v.as_i64() {
                Value::from(i)
            } else if let Some(f) = v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                Value::from(f as i64)
            } else {
                return Err(mismatch());
            }
        }
        Schema::Map(inner) => {
            let m = v.as_object().ok_or_else(mismatch)?;
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                let item = walk(&m[k], inner, path, unknown)?.unwrap_or_else(|| zero(inner));
                out.insert(k.clone(), item);
            }
            Value::Object(out)
        }
        Schema::List(inner) => {
            let a = v.as_array().ok_or_else(mismatch)?;
            let mut out = Vec::with_capacity(a.len());
            for item in a {
                out.push(walk(item, inner, path, unknown)?.unwrap_or_else(|| zero(inner)));
            }
            Value::Array(out)
        }
        Schema::Object(fields) => {
            let m = v.as_object().ok_or_else(mismatch)?;
            let mut out = Map::new();
            for (name, fs) in fields.iter() {
                let got = match m.get(*name) {
                    Some(fv) => walk(fv, fs, &join(path, name), unknown)?,
                    None => None,
                };
                match (got, fs) {
                    (Some(x), _) => {
                        out.insert((*name).to_string(), x);
                    }
                    (None, Schema::Always(inner)) => {
                        out.insert((*name).to_string(), zero(inner));
                    }
                    (None, _) => {}
                }
            }
            for k in m.keys() {
                if !fields.iter().any(|(n, _)| n == k) {
                    unknown.push(join(path, k));
                }
            }
            Value::Object(out)
        }
    };
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prunes_unknown_orders_fields_and_sorts_maps() {
        let d = decode(
            &json!({"data": {"b": "2", "a": "1"}, "spec": 1, "metadata": {"labels": null, "name": "x", "bogus": true}, "apiVersion": "v1", "kind": "ConfigMap"}),
            &CONFIG_MAP,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&d.value).unwrap(),
            r#"{"kind":"ConfigMap","apiVersion":"v1","metadata":{"name":"x"},"data":{"a":"1","b":"2"}}"#
        );
        assert_eq!(d.unknown, vec!["metadata.bogus", "spec"]);
    }

    #[test]
    fn refuses_wrong_types() {
        let e = decode(&json!({"data": {"a": 1}}), &CONFIG_MAP).unwrap_err();
        assert_eq!((e.json_type, e.path.as_str(), e.go_type), ("number", "data", "string"));
        let e = decode(&json!({"binaryData": {"a": "!!"}}), &CONFIG_MAP).unwrap_err();
        assert_eq!(e.path, "binaryData");
        let e = decode(&json!({"ports": [{"port": 1.5}]}), &ENDPOINT_SLICE).unwrap_err();
        assert_eq!(e.path, "ports.port");
        let e = decode(&json!({"eventTime": "2024-05-01T12:34:56Z"}), &EVENT).unwrap_err();
        assert_eq!(e.path, "eventTime");
        assert!(e.detail.unwrap().ends_with(r#"cannot parse "Z" as ".000000""#));
        let e = decode(&json!({"eventTime": 5}), &EVENT).unwrap_err();
        assert_eq!(e.detail.unwrap(), "json: cannot unmarshal number into Go value of type string");
    }

    #[test]
    fn writes_fields_without_omitempty_and_normalizes_times() {
        let d = decode(
            &json!({"metadata": {"name": "e"}, "eventTime": "2024-05-01T14:34:56.123456+02:00", "series": {"count": 2}, "type": "Normal"}),
            &EVENT,
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&d.value).unwrap(),
            r#"{"metadata":{"name":"e"},"eventTime":"2024-05-01T12:34:56.123456Z","series":{"count":2,"lastObservedTime":null},"regarding":{},"type":"Normal","deprecatedSource":{},"deprecatedFirstTimestamp":null,"deprecatedLastTimestamp":null}"#
        );
        let d = decode(&json!({"deprecatedFirstTimestamp": "2024-05-01T14:34:56.9+02:00"}), &EVENT).unwrap();
        assert_eq!(d.value["deprecatedFirstTimestamp"], "2024-05-01T12:34:56Z");
    }
}
