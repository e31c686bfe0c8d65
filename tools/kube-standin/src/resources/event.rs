//! events.k8s.io/v1 Event: the API server's validation (`pkg/apis/core/validation/events.go`,
//! which checks the internal core Event, hence its field paths: `involvedObject` for
//! `regarding`, `message` for `note`, `source`, `firstTimestamp`, `lastTimestamp` and `count`
//! for the deprecated fields) and the columns `kubectl get events` prints.

use serde_json::{json, Value};

use super::validate;
use crate::status::Cause;
use crate::timefmt;

const REPORTING_INSTANCE_LIMIT: usize = 128;
const ACTION_LIMIT: usize = 128;
const REASON_LIMIT: usize = 128;
const NOTE_LIMIT: usize = 1024;

/// The fields a field selector may name (the events.k8s.io/v1 field label conversion).
pub const FIELD_LABELS: [&str; 12] = [
    "metadata.name",
    "metadata.namespace",
    "reason",
    "reportingController",
    "type",
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "regarding.apiVersion",
    "regarding.resourceVersion",
    "regarding.fieldPath",
];

fn s<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj[field].as_str().unwrap_or_default()
}

fn time_set(v: &Value) -> bool {
    v.as_str().is_some_and(|t| !t.is_empty())
}

fn empty() -> Value {
    Value::String(String::new())
}

/// `legacyValidateEvent`: what every write of an Event must pass, run before the metadata checks.
pub fn legacy_causes(obj: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    let involved_ns = obj["regarding"]["namespace"].as_str().unwrap_or_default();
    let mismatch =
        || Cause::invalid("involvedObject.namespace", &Value::from(involved_ns), "does not match event.namespace");
    if !time_set(&obj["eventTime"]) {
        // An old-style event: its namespace must agree with the object's.
        let agrees = if involved_ns.is_empty() { ns.is_empty() || ns == "default" } else { ns == involved_ns };
        if !agrees {
            out.push(mismatch());
        }
        return out;
    }
    if involved_ns.is_empty() && ns != "default" && ns != "kube-system" {
        out.push(mismatch());
    }
    let controller = s(obj, "reportingController");
    if controller.is_empty() {
        out.push(Cause::required("reportingController", ""));
    }
    for msg in validate::qualified_name_msgs(controller) {
        out.push(Cause::invalid("reportingController", &Value::from(controller), &msg));
    }
    let limited = [
        ("reportingInstance", "reportingInstance", REPORTING_INSTANCE_LIMIT),
        ("action", "action", ACTION_LIMIT),
        ("reason", "reason", REASON_LIMIT),
    ];
    for (json_field, path, limit) in limited {
        let v = s(obj, json_field);
        if v.is_empty() {
            out.push(Cause::required(path, ""));
        }
        if v.len() > limit {
            out.push(Cause::invalid(path, &empty(), &format!("can have at most {limit} characters")));
        }
    }
    if s(obj, "note").len() > NOTE_LIMIT {
        out.push(Cause::invalid("message", &empty(), &format!("can have at most {NOTE_LIMIT} characters")));
    }
    out
}

/// `validateV1EventSeries`.
fn series_causes(obj: &Value, out: &mut Vec<Cause>) {
    let series = &obj["series"];
    if !series.is_object() {
        return;
    }
    if series["count"].as_i64().unwrap_or(0) < 2 {
        out.push(Cause::invalid("series.count", &empty(), "should be at least 2"));
    }
    if !time_set(&series["lastObservedTime"]) {
        out.push(Cause::required("series.lastObservedTime", ""));
    }
}

/// The events.k8s.io/v1 checks after the metadata ones: a new Event's required and unset
/// fields, or what an update may not change.
pub fn v1_causes(obj: &Value, old: Option<&Value>, out: &mut Vec<Cause>) {
    let Some(old) = old else {
        series_causes(obj, out);
        if !time_set(&obj["eventTime"]) {
            out.push(Cause::required("eventTime", ""));
        }
        let ty = s(obj, "type");
        if ty != "Normal" && ty != "Warning" {
            out.push(Cause::invalid("type", &empty(), &format!("has invalid value: {ty}")));
        }
        let unset = [("deprecatedFirstTimestamp", "firstTimestamp"), ("deprecatedLastTimestamp", "lastTimestamp")];
        for (json_field, path) in unset {
            if time_set(&obj[json_field]) {
                out.push(Cause::invalid(path, &empty(), "needs to be unset"));
            }
        }
        if obj["deprecatedCount"].as_i64().unwrap_or(0) != 0 {
            out.push(Cause::invalid("count", &empty(), "needs to be unset"));
        }
        if !s(&obj["deprecatedSource"], "component").is_empty() || !s(&obj["deprecatedSource"], "host").is_empty() {
            out.push(Cause::invalid("source", &empty(), "needs to be unset"));
        }
        return;
    };
    if norm(&obj["series"]) != norm(&old["series"]) {
        series_causes(obj, out);
    }
    // ValidateEventUpdate's immutable fields, in its order (reason is checked twice there).
    let immutable = [
        ("regarding", "involvedObject"),
        ("reason", "reason"),
        ("note", "message"),
        ("deprecatedSource", "source"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
        ("reason", "reason"),
        ("type", "type"),
        // Times are stored with microseconds, so equal strings are equal truncated times.
        ("eventTime", "eventTime"),
        ("action", "action"),
        ("related", "related"),
        ("reportingController", "reportingController"),
        ("reportingInstance", "reportingInstance"),
    ];
    for (json_field, path) in immutable {
        if norm(&obj[json_field]) != norm(&old[json_field]) {
            out.push(Cause::invalid(path, &shown(&obj[json_field]), "field is immutable"));
        }
    }
}

/// A field's Go value for comparisons: absent, null, `""`, `0` and `{}` are all the zero value.
fn norm(v: &Value) -> Value {
    match v {
        Value::String(x) if x.is_empty() => Value::Null,
        Value::Number(n) if n.as_i64() == Some(0) => Value::Null,
        Value::Object(m) => {
            let kept: serde_json::Map<String, Value> =
                m.iter().map(|(k, x)| (k.clone(), norm(x))).filter(|(_, x)| !x.is_null()).collect();
            if kept.is_empty() {
                Value::Null
            } else {
                Value::Object(kept)
            }
        }
        other => other.clone(),
    }
}

/// The bad value of an immutable-field cause (strings quoted by `Cause::invalid`).
fn shown(v: &Value) -> Value {
    match v {
        Value::Null => Value::String(String::new()),
        other => other.clone(),
    }
}

/// Column definitions of the Event printer (the same for core/v1 and events.k8s.io/v1: both
/// are printed from the internal core Event). The server prints the wide form; kubectl hides
/// the columns of priority 1 unless `-o wide`.
pub fn table_columns(name_doc: &str) -> Value {
    let col = |name: &str, priority: u8, desc: &str| json!({"name": name, "type": "string", "format": "", "description": desc, "priority": priority});
    json!([
        col("Last Seen", 0, "The time at which the most recent occurrence of this event was recorded."),
        col("Type", 0, "Type of this event (Normal, Warning), new types could be added in the future"),
        col("Reason", 0, "This should be a short, machine understandable string that gives the reason for the transition into the object's current status."),
        col("Object", 0, "The object that this event is about."),
        col("Subobject", 1, "If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2]. For example, if the object reference is to a container within a pod, this would take on a value like: \"spec.containers{name}\" (where \"name\" refers to the name of the container that triggered the event) or if no container name is specified \"spec.containers[2]\" (container with index 2 in this pod). This syntax is chosen only to have some well-defined way of referencing a part of an object."),
        col("Source", 1, "The component reporting this event. Should be a short machine understandable string."),
        col("Message", 0, "A human-readable description of the status of this operation."),
        col("First Seen", 1, "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)"),
        col("Count", 1, "The number of times this event has occurred."),
        json!({"name": "Name", "type": "string", "format": "name", "description": name_doc, "priority": 1}),
    ])
}

/// One row of `printEvent` (wide).
pub fn table_cells(obj: &Value, now: i64) -> Vec<Value> {
    let since = |v: &Value| {
        v.as_str()
            .and_then(timefmt::parse_rfc3339)
            .map_or_else(|| "<unknown>".to_string(), |t| timefmt::human_duration(now - t))
    };
    let first = if time_set(&obj["deprecatedFirstTimestamp"]) {
        since(&obj["deprecatedFirstTimestamp"])
    } else {
        since(&obj["eventTime"])
    };
    let mut last =
        if time_set(&obj["deprecatedLastTimestamp"]) { since(&obj["deprecatedLastTimestamp"]) } else { first.clone() };
    let mut count = obj["deprecatedCount"].as_i64().unwrap_or(0);
    if obj["series"].is_object() {
        last = since(&obj["series"]["lastObservedTime"]);
        count = obj["series"]["count"].as_i64().unwrap_or(0);
    } else if count == 0 {
        // Singleton events have no count in the new API.
        count = 1;
    }
    let regarding = &obj["regarding"];
    let kind = s(regarding, "kind").to_lowercase();
    let target = match s(regarding, "name") {
        "" => kind,
        name => format!("{kind}/{name}"),
    };
    let first_non_empty = |a: &'static str, b: &'static str| {
        let x = s(&obj["deprecatedSource"], a);
        if x.is_empty() {
            s(obj, b)
        } else {
            x
        }
    };
    let component = first_non_empty("component", "reportingController");
    let source = match first_non_empty("host", "reportingInstance") {
        "" => component.to_string(),
        instance => format!("{component}, {instance}"),
    };
    vec![
        last.into(),
        obj["type"].as_str().unwrap_or_default().into(),
        obj["reason"].as_str().unwrap_or_default().into(),
        target.into(),
        s(regarding, "fieldPath").into(),
        source.into(),
        s(obj, "note").trim().into(),
        first.into(),
        count.into(),
        obj["metadata"]["name"].as_str().unwrap_or_default().into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Value {
        json!({"kind": "Event", "apiVersion": "events.k8s.io/v1",
            "metadata": {"name": "cpha-members.17f", "namespace": "kube-system"},
            "eventTime": "2024-05-01T12:34:56.123456Z",
            "reportingController": "cpha", "reportingInstance": "node-1",
            "action": "Handover", "reason": "Promoted",
            "regarding": {"kind": "ConfigMap", "namespace": "kube-system", "name": "cpha-members"},
            "note": "node-1 took over ", "type": "Normal",
            "deprecatedSource": {}, "deprecatedFirstTimestamp": null, "deprecatedLastTimestamp": null})
    }

    fn all(obj: &Value, old: Option<&Value>) -> Vec<String> {
        let mut out = legacy_causes(obj);
        v1_causes(obj, old, &mut out);
        out.iter().map(Cause::line).collect()
    }

    #[test]
    fn create_rules() {
        assert!(all(&event(), None).is_empty());
        let mut e = event();
        e["eventTime"] = Value::Null;
        assert_eq!(all(&e, None), vec!["eventTime: Required value"]);
        let mut e = event();
        e["type"] = "Bogus".into();
        e["reportingController"] = "".into();
        e["regarding"] = json!({});
        e["metadata"]["namespace"] = "other".into();
        e["deprecatedCount"] = 3.into();
        let lines = all(&e, None);
        assert_eq!(lines[0], "involvedObject.namespace: Invalid value: \"\": does not match event.namespace");
        assert_eq!(lines[1], "reportingController: Required value");
        assert!(lines.contains(&"reportingController: Invalid value: \"\": name part must be non-empty".to_string()));
        assert!(lines.contains(&"type: Invalid value: \"\": has invalid value: Bogus".to_string()));
        assert!(lines.contains(&"count: Invalid value: \"\": needs to be unset".to_string()));
        let mut e = event();
        e["series"] = json!({"count": 1, "lastObservedTime": null});
        assert_eq!(
            all(&e, None),
            vec!["series.count: Invalid value: \"\": should be at least 2", "series.lastObservedTime: Required value"]
        );
    }

    #[test]
    fn update_rules() {
        let old = event();
        let mut e = event();
        e["series"] = json!({"count": 2, "lastObservedTime": "2024-05-01T12:35:56.000000Z"});
        assert!(all(&e, Some(&old)).is_empty(), "a new series count is what the Recorder sends");
        e["note"] = "changed".into();
        e["regarding"]["name"] = "other".into();
        let lines = all(&e, Some(&old));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("involvedObject: Invalid value: "), "{lines:?}");
        assert_eq!(lines[1], "message: Invalid value: \"changed\": field is immutable");
        let mut e = old.clone();
        e["deprecatedSource"] = json!({"component": ""});
        assert!(all(&e, Some(&old)).is_empty(), "an empty struct equals an absent one");
    }

    #[test]
    fn rows_read_like_kubectl() {
        let now = timefmt::parse_rfc3339("2024-05-01T12:35:56Z").unwrap();
        // Ages count whole seconds (the fraction of eventTime is not looked at).
        let cells = table_cells(&event(), now);
        assert_eq!(
            cells,
            vec![
                json!("60s"),
                json!("Normal"),
                json!("Promoted"),
                json!("configmap/cpha-members"),
                json!(""),
                json!("cpha, node-1"),
                json!("node-1 took over"),
                json!("60s"),
                json!(1),
                json!("cpha-members.17f")
            ]
        );
        let mut e = event();
        e["series"] = json!({"count": 3, "lastObservedTime": "2024-05-01T12:35:50.000000Z"});
        let cells = table_cells(&e, now);
        assert_eq!((cells[0].clone(), cells[8].clone()), (json!("6s"), json!(3)));
        assert_eq!(table_columns("n").as_array().unwrap().len(), cells.len());
    }
}
