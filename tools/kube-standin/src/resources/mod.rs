//! The served kinds (core/v1 ConfigMap and ServiceAccount, discovery.k8s.io/v1 EndpointSlice,
//! events.k8s.io/v1 Event, rbac.authorization.k8s.io/v1 Role and RoleBinding): names, discovery entries, decoding schema, field selectors, defaulting, validation
//! and the columns of their `Table` form.

pub mod event;
pub mod rbac;
pub mod schema;
pub mod validate;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::status::Cause;
use crate::timefmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    ConfigMap,
    EndpointSlice,
    Event,
    ServiceAccount,
    Role,
    RoleBinding,
}

const VERBS: [&str; 8] = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::ConfigMap, Kind::EndpointSlice, Kind::Event, Kind::ServiceAccount, Kind::Role, Kind::RoleBinding];

    pub fn group(self) -> &'static str {
        match self {
            Kind::ConfigMap | Kind::ServiceAccount => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::Event => "events.k8s.io",
            Kind::Role | Kind::RoleBinding => rbac::GROUP,
        }
    }
    pub fn version(self) -> &'static str {
        "v1"
    }
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::ConfigMap | Kind::ServiceAccount => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Event => "events.k8s.io/v1",
            Kind::Role | Kind::RoleBinding => "rbac.authorization.k8s.io/v1",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            Kind::ConfigMap => "configmaps",
            Kind::EndpointSlice => "endpointslices",
            Kind::Event => "events",
            Kind::ServiceAccount => "serviceaccounts",
            Kind::Role => "roles",
            Kind::RoleBinding => "rolebindings",
        }
    }
    pub fn singular(self) -> &'static str {
        match self {
            Kind::ConfigMap => "configmap",
            Kind::EndpointSlice => "endpointslice",
            Kind::Event => "event",
            Kind::ServiceAccount => "serviceaccount",
            Kind::Role => "role",
            Kind::RoleBinding => "rolebinding",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::ConfigMap => "ConfigMap",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Event => "Event",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Role => "Role",
            Kind::RoleBinding => "RoleBinding",
        }
    }
    pub fn list_kind(self) -> String {
        format!("{}List", self.name())
    }
    pub fn schema(self) -> &'static schema::Schema {
        match self {
            Kind::ConfigMap => &schema::CONFIG_MAP,
            Kind::EndpointSlice => &schema::ENDPOINT_SLICE,
            Kind::Event => &schema::EVENT,
            Kind::ServiceAccount => &rbac::SERVICE_ACCOUNT,
            Kind::Role => &rbac::ROLE,
            Kind::RoleBinding => &rbac::ROLE_BINDING,
        }
    }

    /// The fields a field selector may name (others: 400 `field label not supported`).
    pub fn field_labels(self) -> &'static [&'static str] {
        match self {
            Kind::ConfigMap | Kind::EndpointSlice | Kind::ServiceAccount | Kind::Role | Kind::RoleBinding => {
                &["metadata.name", "metadata.namespace"]
            }
            Kind::Event => &event::FIELD_LABELS,
        }
    }
    /// EndpointSlices count spec changes in `metadata.generation`; ConfigMaps have none.
    pub fn has_generation(self) -> bool {
        matches!(self, Kind::EndpointSlice)
    }

    pub fn from_path(group: &str, version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.group() == group && k.version() == version && k.plural() == plural)
    }

    /// The legacy discovery `APIResource` entry.
    pub fn api_resource(self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), self.plural().into());
        m.insert("singularName".into(), self.singular().into());
        m.insert("namespaced".into(), true.into());
        m.insert("kind".into(), self.name().into());
        m.insert("verbs".into(), json!(VERBS));
        match self {
            Kind::ConfigMap => {
                m.insert("shortNames".into(), json!(["cm"]));
            }
            Kind::Event => {
                m.insert("shortNames".into(), json!(["ev"]));
            }
            Kind::ServiceAccount => {
                m.insert("shortNames".into(), json!(["sa"]));
            }
            Kind::EndpointSlice | Kind::Role | Kind::RoleBinding => {}
        }
        m.insert(
            "storageVersionHash".into(),
            match self {
                Kind::ConfigMap => "qFsyl6wFWjQ=",
                Kind::EndpointSlice => "Nx3SIv6I0mE=",
                // Events of both groups share one storage, hence one hash.
                Kind::Event => "r2yiGXH7wu8=",
                Kind::ServiceAccount => "pbx9ZvyFpBE=",
                Kind::Role => "7FuwZcIIItM=",
                Kind::RoleBinding => "eGsCzGH6b1g=",
            }
            .into(),
        );
        Value::Object(m)
    }

    /// Server-side defaults applied on every write.
    pub fn apply_defaults(self, obj: &mut Value) {
        if self != Kind::EndpointSlice {
            return;
        }
        if let Some(Value::Array(ports)) = obj.get_mut("ports") {
            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                // Re-insert in struct order: name, protocol, port, appProtocol.
                let name = p.shift_remove("name").unwrap_or_else(|| "".into());
                let protocol = p.shift_remove("protocol").unwrap_or_else(|| "TCP".into());
                let rest = std::mem::take(p);
                p.insert("name".into(), name);
                p.insert("protocol".into(), protocol);
                p.extend(rest);
            }
        }
    }

    /// Everything but `metadata` (what a generation bump looks at).
    pub fn spec_of(self, obj: &Value) -> Value {
        let mut o = obj.as_object().cloned().unwrap_or_default();
        for k in ["metadata", "kind", "apiVersion"] {
            o.shift_remove(k);
        }
        Value::Object(o)
    }

    /// Validation of a new object (`old` is None) or an update.
    pub fn validate(self, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
        let empty = Map::new();
        let meta = obj.get("metadata").and_then(Value::as_object).unwrap_or(&empty);
        // An Event's legacy checks come first, as in the API server's event validation.
        let mut out = if self == Kind::Event { event::legacy_causes(obj) } else { Vec::new() };
        let name = meta.get("name").and_then(Value::as_str).unwrap_or_default();
        if name.is_empty() {
            out.push(Cause::required("metadata.name", "name or generateName is required"));
        } else {
            out.extend(validate::name_causes("metadata.name", name, false));
        }
        let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or_default();
        if ns.is_empty() {
            out.push(Cause::required("metadata.namespace", ""));
        } else {
            out.extend(validate::name_causes("metadata.namespace", ns, true));
        }
        out.extend(validate::meta_causes(meta));
        match self {
            Kind::ConfigMap => validate_config_map(obj, old, &mut out),
            Kind::EndpointSlice => validate_endpoint_slice(obj, old, &mut out),
            Kind::Event => event::v1_causes(obj, old, &mut out),
            Kind::ServiceAccount => {}
            Kind::Role => rbac::validate_role(obj, &mut out),
            Kind::RoleBinding => rbac::validate_role_binding(obj, old, &mut out),
        }
        out
    }

    /// Column definitions of the `Table` form, as the API server's printers declare them.
    pub fn table_columns(self) -> Value {
        let col = |name: &str, ty: &str, format: &str, desc: &str| json!({"name": name, "type": ty, "format": format, "description": desc, "priority": 0});
        let name = col(
            "Name",
            "string",
            "name",
            "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
        );
        let age = col(
            "Age",
            "string",
            "",
            "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
        );
        match self {
            Kind::ConfigMap => json!([
                name,
                col("Data", "string", "", "Data contains the configuration data. Each key must consist of alphanumeric characters, '-', '_' or '.'. Values with non-UTF-8 byte sequences must use the BinaryData field. The keys stored in Data must not overlap with the keys in the BinaryData field, this is enforced during validation process."),
                age
            ]),
            Kind::EndpointSlice => json!([
                name,
                col("AddressType", "string", "", "addressType specifies the type of address carried by this EndpointSlice. All addresses in this slice must be the same type. This field is immutable after creation. The following address types are currently supported: * IPv4: Represents an IPv4 Address. * IPv6: Represents an IPv6 Address. * FQDN: Represents a Fully Qualified Domain Name."),
                col("Ports", "string", "", "ports specifies the list of network ports exposed by each endpoint in this slice. Each port must have a unique name. When ports is empty, it indicates that there are no defined ports. When a port is defined with a nil port value, it indicates \"all ports\". Each slice may include a maximum of 100 ports."),
                col("Endpoints", "string", "", "endpoints is a list of unique endpoints in this slice. Each slice may include a maximum of 1000 endpoints."),
                age
            ]),
            Kind::Event => event::table_columns(name["description"].as_str().unwrap_or_default()),
            Kind::ServiceAccount | Kind::Role | Kind::RoleBinding => rbac::columns(self, name, age),
        }
    }

    /// One `Table` row's cells for an object.
    pub fn table_cells(self, obj: &Value, now: i64) -> Vec<Value> {
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let age = obj["metadata"]["creationTimestamp"]
            .as_str()
            .and_then(timefmt::parse_rfc3339)
            .map_or_else(|| "<unknown>".to_string(), |t| timefmt::human_duration(now - t));
        match self {
            Kind::ConfigMap => {
                let n = obj["data"].as_object().map_or(0, Map::len) + obj["binaryData"].as_object().map_or(0, Map::len);
                vec![name.into(), n.into(), age.into()]
            }
            Kind::EndpointSlice => {
                let ports: Vec<String> = obj["ports"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .map(|p| p["port"].as_i64().map_or_else(|| "<unset>".to_string(), |n| n.to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let ports = if ports.is_empty() { "<unset>".to_string() } else { ports.join(",") };
                let addrs: Vec<&str> = obj["endpoints"]
                    .as_array()
                    .map(|es| {
                        es.iter()
                            .flat_map(|e| e["addresses"].as_array().into_iter().flatten().filter_map(Value::as_str))
                            .collect()
                    })
                    .unwrap_or_default();
                let endpoints = match addrs.len() {
                    0 => "<unset>".to_string(),
                    1..=3 => addrs.join(","),
                    n => format!("{} + {} more...", addrs[..3].join(","), n - 3),
                };
                vec![name.into(), obj["addressType"].clone(), ports.into(), endpoints.into(), age.into()]
            }
            Kind::Event => event::table_cells(obj, now),
            Kind::ServiceAccount | Kind::Role | Kind::RoleBinding => rbac::cells(self, obj, name, age),
        }
    }
}

fn validate_config_map(obj: &Value, old: Option<&Value>, out: &mut Vec<Cause>) {
    let mut total = 0usize;
    let data = obj["data"].as_object();
    if let Some(data) = data {
        for (k, v) in data {
            out.extend(validate::config_key_causes("data", k));
            total += v.as_str().map_or(0, str::len);
        }
    }
    if let Some(bin) = obj["binaryData"].as_object() {
        for (k, v) in bin {
            out.extend(validate::config_key_causes("binaryData", k));
            if data.is_some_and(|d| d.contains_key(k)) {
                out.push(Cause::invalid("binaryData", &Value::String(k.clone()), "duplicate of key present in data"));
            }
            total += v.as_str().map_or(0, |s| s.len() * 3 / 4);
        }
    }
    if total > 1024 * 1024 {
        out.push(Cause::too_long("", 1024 * 1024));
    }
    if let Some(old) = old {
        if old["immutable"].as_bool() == Some(true) {
            if obj["immutable"].as_bool() != Some(true) {
                out.push(Cause::forbidden("immutable", "field is immutable when `immutable` is set"));
            }
            let norm = |v: &Value| {
                if v.is_null() {
                    Value::Object(Map::new())
                } else {
                    v.clone()
                }
            };
            if norm(&obj["data"]) != norm(&old["data"]) {
                out.push(Cause::forbidden("data", "field is immutable when `immutable` is set"));
            }
            if norm(&obj["binaryData"]) != norm(&old["binaryData"]) {
                out.push(Cause::forbidden("binaryData", "field is immutable when `immutable` is set"));
            }
        }
    }
}

fn validate_endpoint_slice(obj: &Value, old: Option<&Value>, out: &mut Vec<Cause>) {
    const TYPES: [&str; 3] = ["IPv4", "IPv6", "FQDN"];
    let at = obj["addressType"].as_str().unwrap_or_default();
    if at.is_empty() {
        out.push(Cause::required("addressType", ""));
    } else if !TYPES.contains(&at) {
        out.push(Cause::not_supported("addressType", at, &TYPES));
    }
    if let Some(old) = old {
        if old["addressType"] != obj["addressType"] {
            out.push(Cause::invalid("addressType", &obj["addressType"], "field is immutable"));
        }
    }
    let endpoints = obj["endpoints"].as_array().map_or(&[][..], Vec::as_slice);
    if endpoints.len() > 1000 {
        out.push(Cause::too_many("endpoints", endpoints.len(), 1000));
    }
    for (i, ep) in endpoints.iter().enumerate() {
        let addrs = ep["addresses"].as_array().map_or(&[][..], Vec::as_slice);
        let field = format!("endpoints[{i}].addresses");
        if addrs.is_empty() || addrs.len() > 100 {
            out.push(Cause::invalid(
                &field,
                &Value::from(addrs.len()),
                "must contain at least 1 address but no more than 100 addresses",
            ));
        }
        for (j, a) in addrs.iter().enumerate() {
            out.extend(validate::address_causes(&format!("{field}[{j}]"), at, a.as_str().unwrap_or_default()));
        }
        if let Some(h) = ep["hostname"].as_str() {
            out.extend(validate::name_causes(&format!("endpoints[{i}].hostname"), h, true));
        }
    }
    let ports = obj["ports"].as_array().map_or(&[][..], Vec::as_slice);
    if ports.len() > 100 {
        out.push(Cause::too_many("ports", ports.len(), 100));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        let name = p["name"].as_str().unwrap_or_default();
        if !name.is_empty() {
            out.extend(validate::name_causes(&format!("ports[{i}].name"), name, true));
        }
        if !seen.insert(name.to_string()) {
            out.push(Cause::new_duplicate(&format!("ports[{i}].name"), name));
        }
        let proto = p["protocol"].as_str().unwrap_or("TCP");
        if !["TCP", "UDP", "SCTP"].contains(&proto) {
            out.push(Cause::not_supported(&format!("ports[{i}].protocol"), proto, &["SCTP", "TCP", "UDP"]));
        }
        if let Some(n) = p["port"].as_i64() {
            if !(1..=65535).contains(&n) {
                out.push(Cause::invalid(
                    &format!("ports[{i}].port"),
                    &p["port"],
                    "must be between 1 and 65535, inclusive",
                ));
            }
        }
    }
}

impl Cause {
    fn new_duplicate(field: &str, value: &str) -> Cause {
        Cause {
            reason: "FieldValueDuplicate",
            message: format!("Duplicate value: {value:?}"),
            field: field.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(v: Value) -> Value {
        let mut o = json!({"metadata": {"name": "x", "namespace": "ns"}});
        o.as_object_mut().unwrap().extend(v.as_object().unwrap().clone());
        o
    }

    #[test]
    fn config_map_rules() {
        assert!(Kind::ConfigMap.validate(&cm(json!({"data": {"a": "1"}})), None).is_empty());
        let c = Kind::ConfigMap.validate(&cm(json!({"data": {"a b": "1"}})), None);
        assert_eq!(c.len(), 1);
        let c = Kind::ConfigMap.validate(&cm(json!({"data": {"a": "1"}, "binaryData": {"a": "MQ=="}})), None);
        assert_eq!(c[0].message, "Invalid value: \"a\": duplicate of key present in data");
        let old = cm(json!({"immutable": true, "data": {"a": "1"}}));
        let c = Kind::ConfigMap.validate(&cm(json!({"immutable": true, "data": {"a": "2"}})), Some(&old));
        assert_eq!(c[0].field, "data");
        assert!(Kind::ConfigMap
            .validate(&json!({"metadata": {"namespace": "ns"}}), None)
            .iter()
            .any(|c| c.field == "metadata.name"));
    }

    #[test]
    fn endpoint_slice_rules_and_cells() {
        let mut es = json!({"metadata": {"name": "kubernetes", "namespace": "default", "creationTimestamp": "2024-01-01T00:00:00Z"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.11"]}, {"addresses": ["10.0.0.12"]}],
            "ports": [{"port": 6443}]});
        Kind::EndpointSlice.apply_defaults(&mut es);
        assert_eq!(es["ports"][0], json!({"name": "", "protocol": "TCP", "port": 6443}));
        assert!(Kind::EndpointSlice.validate(&es, None).is_empty());
        let cells = Kind::EndpointSlice.table_cells(&es, 1_704_067_200 + 90);
        assert_eq!(
            cells,
            vec![json!("kubernetes"), json!("IPv4"), json!("6443"), json!("10.0.0.11,10.0.0.12"), json!("90s")]
        );
        es["endpoints"][0]["addresses"][0] = json!("fe80::1");
        assert_eq!(Kind::EndpointSlice.validate(&es, None).len(), 1);
        let mut changed = es.clone();
        changed["addressType"] = json!("IPv6");
        assert!(Kind::EndpointSlice.validate(&changed, Some(&es)).iter().any(|c| c.message.contains("immutable")));
    }
}
