//! core/v1 ServiceAccount and rbac.authorization.k8s.io/v1 Role and RoleBinding: their wire
//! schema, validation with the API server's wording, and `Table` columns. How they authorize
//! requests is `crate::rbac`.

use serde_json::{json, Value};

use super::schema::{Schema, BOOL, OBJECT_META, STR, STR_LIST};
use crate::status::Cause;

static OBJECT_REF: Schema = Schema::Object(&[
    ("kind", &STR),
    ("namespace", &STR),
    ("name", &STR),
    ("uid", &STR),
    ("apiVersion", &STR),
    ("resourceVersion", &STR),
    ("fieldPath", &STR),
]);
static OBJECT_REFS: Schema = Schema::List(&OBJECT_REF);
static LOCAL_REF: Schema = Schema::Object(&[("name", &STR)]);
static LOCAL_REFS: Schema = Schema::List(&LOCAL_REF);

pub static SERVICE_ACCOUNT: Schema = Schema::Object(&[
    ("kind", &STR),
    ("apiVersion", &STR),
    ("metadata", &OBJECT_META),
    ("secrets", &OBJECT_REFS),
    ("imagePullSecrets", &LOCAL_REFS),
    ("automountServiceAccountToken", &BOOL),
]);

static POLICY_RULE: Schema = Schema::Object(&[
    ("verbs", &STR_LIST),
    ("apiGroups", &STR_LIST),
    ("resources", &STR_LIST),
    ("resourceNames", &STR_LIST),
    ("nonResourceURLs", &STR_LIST),
]);
static POLICY_RULES: Schema = Schema::List(&POLICY_RULE);

pub static ROLE: Schema =
    Schema::Object(&[("kind", &STR), ("apiVersion", &STR), ("metadata", &OBJECT_META), ("rules", &POLICY_RULES)]);

static SUBJECT: Schema = Schema::Object(&[("kind", &STR), ("apiGroup", &STR), ("name", &STR), ("namespace", &STR)]);
static SUBJECTS: Schema = Schema::List(&SUBJECT);
static ROLE_REF: Schema = Schema::Object(&[("apiGroup", &STR), ("kind", &STR), ("name", &STR)]);

pub static ROLE_BINDING: Schema = Schema::Object(&[
    ("kind", &STR),
    ("apiVersion", &STR),
    ("metadata", &OBJECT_META),
    ("subjects", &SUBJECTS),
    ("roleRef", &Schema::Always(&ROLE_REF)),
]);

pub const GROUP: &str = "rbac.authorization.k8s.io";

fn strs(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// The API server's `ValidatePolicyRule` for a namespaced Role.
pub fn validate_role(obj: &Value, out: &mut Vec<Cause>) {
    for (i, rule) in obj["rules"].as_array().map_or(&[][..], Vec::as_slice).iter().enumerate() {
        let field = |f: &str| format!("rules[{i}].{f}");
        if strs(&rule["verbs"]).is_empty() {
            out.push(Cause::required(&field("verbs"), "verbs must contain at least one value"));
        }
        if !strs(&rule["nonResourceURLs"]).is_empty() {
            out.push(Cause::invalid(
                &field("nonResourceURLs"),
                &rule["nonResourceURLs"],
                "namespaced rules cannot apply to non-resource URLs",
            ));
            continue;
        }
        if strs(&rule["apiGroups"]).is_empty() {
            out.push(Cause::required(&field("apiGroups"), "resource rules must supply at least one api group"));
        }
        if strs(&rule["resources"]).is_empty() {
            out.push(Cause::required(&field("resources"), "resource rules must supply at least one resource"));
        }
    }
}

/// The API server's RoleBinding validation: the role reference (immutable) and the subjects.
pub fn validate_role_binding(obj: &Value, old: Option<&Value>, out: &mut Vec<Cause>) {
    let role_ref = &obj["roleRef"];
    let ref_group = role_ref["apiGroup"].as_str().unwrap_or_default();
    if ref_group != GROUP {
        out.push(Cause::not_supported("roleRef.apiGroup", ref_group, &[GROUP]));
    }
    let ref_kind = role_ref["kind"].as_str().unwrap_or_default();
    if !["Role", "ClusterRole"].contains(&ref_kind) {
        out.push(Cause::not_supported("roleRef.kind", ref_kind, &["ClusterRole", "Role"]));
    }
    if role_ref["name"].as_str().unwrap_or_default().is_empty() {
        out.push(Cause::required("roleRef.name", ""));
    }
    if let Some(old) = old {
        if old["roleRef"] != obj["roleRef"] {
            out.push(Cause::invalid("roleRef", &obj["roleRef"], "cannot change roleRef"));
        }
    }
    for (i, s) in obj["subjects"].as_array().map_or(&[][..], Vec::as_slice).iter().enumerate() {
        let field = |f: &str| format!("subjects[{i}].{f}");
        let name = s["name"].as_str().unwrap_or_default();
        if name.is_empty() {
            out.push(Cause::required(&field("name"), ""));
        }
        let group = s["apiGroup"].as_str().unwrap_or_default();
        match s["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => {
                if !group.is_empty() {
                    out.push(Cause::not_supported(&field("apiGroup"), group, &[""]));
                }
                if !name.is_empty() {
                    out.extend(super::validate::name_causes(&field("name"), name, false));
                }
            }
            "User" | "Group" => {
                if group != GROUP {
                    out.push(Cause::not_supported(&field("apiGroup"), group, &[GROUP]));
                }
            }
            other => out.push(Cause::not_supported(&field("kind"), other, &["ServiceAccount", "User", "Group"])),
        }
    }
}

pub fn columns(kind: super::Kind, name: Value, age: Value) -> Value {
    let col = |n: &str, d: &str| json!({"name": n, "type": "string", "format": "", "description": d, "priority": 0});
    match kind {
        super::Kind::ServiceAccount => json!([
            name,
            col("Secrets", "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use."),
            age
        ]),
        super::Kind::Role => json!([name, col("Created At", "CreationTimestamp of the Role")]),
        _ => json!([
            name,
            col("Role", "RoleRef of the RoleBinding"),
            age
        ]),
    }
}

pub fn cells(kind: super::Kind, obj: &Value, name: &str, age: String) -> Vec<Value> {
    match kind {
        super::Kind::ServiceAccount => {
            vec![name.into(), obj["secrets"].as_array().map_or(0, Vec::len).into(), age.into()]
        }
        super::Kind::Role => vec![name.into(), obj["metadata"]["creationTimestamp"].clone()],
        _ => {
            let r = &obj["roleRef"];
            let role = format!("{}/{}", r["kind"].as_str().unwrap_or_default(), r["name"].as_str().unwrap_or_default());
            vec![name.into(), role.into(), age.into()]
        }
    }
}
