//! `meta/v1 Status` objects: every error the stand-in answers is one of these, with the reason,
//! code and message wording the API server uses so that clients branch the same way.

use serde_json::{json, Map, Value};

/// One `details.causes[]` entry of an `Invalid` status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub reason: &'static str,
    pub message: String,
    pub field: String,
}

impl Cause {
    pub fn required(field: &str, detail: &str) -> Self {
        Self::new("FieldValueRequired", field, format!("Required value{}", suffix(detail)))
    }
    pub fn invalid(field: &str, value: &Value, detail: &str) -> Self {
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        Self::new("FieldValueInvalid", field, format!("Invalid value: {shown}{}", suffix(detail)))
    }
    pub fn forbidden(field: &str, detail: &str) -> Self {
        Self::new("FieldValueForbidden", field, format!("Forbidden{}", suffix(detail)))
    }
    pub fn not_supported(field: &str, value: &str, allowed: &[&str]) -> Self {
        let list: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        Self::new(
            "FieldValueNotSupported",
            field,
            format!("Unsupported value: {value:?}: supported values: {}", list.join(", ")),
        )
    }
    pub fn too_many(field: &str, actual: usize, max: usize) -> Self {
        Self::new("FieldValueTooMany", field, format!("Too many: {actual}: must have at most {max} items"))
    }
    pub fn too_long(field: &str, max: usize) -> Self {
        Self::new("FieldValueTooLong", field, format!("Too long: may not be more than {max} bytes"))
    }
    fn new(reason: &'static str, field: &str, message: String) -> Self {
        Self { reason, message, field: field.to_string() }
    }
    /// `field: message`, as in the joined `Invalid` message.
    pub fn line(&self) -> String {
        format!("{}: {}", self.field, self.message)
    }
}

fn suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// An API error, rendered as a `Status` with its HTTP code.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Box<Map<String, Value>>>,
    /// Extra `metadata` of the Status (the new continue token of an expired continue).
    pub metadata: Box<Map<String, Value>>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn details(group: &str, kind: &str, name: &str) -> Map<String, Value> {
    let mut d = Map::new();
    if !name.is_empty() {
        d.insert("name".into(), name.into());
    }
    if !group.is_empty() {
        d.insert("group".into(), group.into());
    }
    if !kind.is_empty() {
        d.insert("kind".into(), kind.into());
    }
    d
}

/// `configmaps` or `endpointslices.discovery.k8s.io`, as the API server names a group/resource.
pub fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None, metadata: Box::default() }
    }

    fn with_details(mut self, d: Map<String, Value>) -> Self {
        self.details = Some(Box::new(d));
        self
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    /// RBAC's denial for a resource request.
    pub fn forbidden_resource(
        user: &str,
        verb: &str,
        group: &str,
        resource: &str,
        subresource: &str,
        name: &str,
        namespace: &str,
    ) -> Self {
        let gr = qualified(group, resource);
        // As responsewriters.forbiddenMessage: the subresource is named with the resource.
        let shown = if subresource.is_empty() { resource.to_string() } else { format!("{resource}/{subresource}") };
        let scope = if namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{namespace}\"")
        };
        let subject =
            if name.is_empty() { format!("{gr} is forbidden") } else { format!("{gr} \"{name}\" is forbidden") };
        Self::new(
            403,
            "Forbidden",
            format!("{subject}: User \"{user}\" cannot {verb} resource \"{shown}\" in API group \"{group}\" {scope}"),
        )
        .with_details(details(group, resource, name))
    }

    /// RBAC's denial for a non-resource URL.
    pub fn forbidden_path(user: &str, verb: &str, path: &str) -> Self {
        Self::new(403, "Forbidden", format!("forbidden: User \"{user}\" cannot {verb} path \"{path}\""))
            .with_details(Map::new())
    }

    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", qualified(group, resource)))
            .with_details(details(group, resource, name))
    }

    /// The plain 404 of a path nothing is served on.
    pub fn path_not_found() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource").with_details(Map::new())
    }

    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", qualified(group, resource)))
            .with_details(details(group, resource, name))
    }

    pub fn conflict(group: &str, resource: &str, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {why}", qualified(group, resource)),
        )
        .with_details(details(group, resource, name))
    }

    pub fn stale(group: &str, resource: &str, name: &str) -> Self {
        Self::conflict(
            group,
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// `Invalid` (422) with causes, for a kind.
    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let gk = qualified(group, kind);
        let lines: Vec<String> = causes.iter().map(Cause::line).collect();
        let joined = if lines.len() == 1 { lines[0].clone() } else { format!("[{}]", lines.join(", ")) };
        let mut d = details(group, kind, name);
        d.insert(
            "causes".into(),
            Value::Array(
                causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect(),
            ),
        );
        let mut e = Self::new(422, "Invalid", format!("{gk} \"{name}\" is invalid: {joined}"));
        e.details = Some(Box::new(d));
        e
    }

    /// 410 `Expired`, as for a compacted resourceVersion or continue token.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 410 `Gone`, what the watch cache sends for a resourceVersion older than its window.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Gone", message)
    }

    pub fn method_not_supported(group: &str, resource: &str, verb: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("{verb} is not supported on resources of kind \"{}\"", qualified(group, resource)),
        )
        .with_details(details(group, resource, ""))
    }

    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
        .with_details(Map::from_iter([(
            "causes".to_string(),
            json!([{"reason": "UnexpectedServerResponse", "message": content_type}]),
        )]))
    }

    pub fn not_acceptable(accepted: &[&str]) -> Self {
        Self::new(406, "NotAcceptable", format!("only the following media types are accepted: {}", accepted.join(", ")))
    }

    pub fn too_large_rv(requested: u64, current: u64) -> Self {
        let mut e = Self::new(504, "Timeout", format!("Too large resource version: {requested}, current: {current}"));
        e.details = Some(Box::new(Map::from_iter([
            (
                "causes".to_string(),
                json!([{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]),
            ),
            ("retryAfterSeconds".to_string(), json!(1)),
        ])));
        e
    }

    /// A server-side failure with the reason the API server uses for that code.
    pub fn server_error(code: u16, message: impl Into<String>) -> Self {
        let reason = match code {
            503 => "ServiceUnavailable",
            504 => "Timeout",
            429 => "TooManyRequests",
            _ => "InternalError",
        };
        let mut e = Self::new(code, reason, message);
        if reason == "InternalError" {
            let msg = e.message.clone();
            e.message = format!("Internal error occurred: {msg}");
            e.details = Some(Box::new(Map::from_iter([("causes".to_string(), json!([{"message": msg}]))])));
        } else if code == 503 || code == 429 {
            e.details = Some(Box::new(Map::from_iter([("retryAfterSeconds".to_string(), json!(1))])));
        }
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::server_error(500, message)
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut s = Map::new();
        s.insert("kind".into(), "Status".into());
        s.insert("apiVersion".into(), "v1".into());
        s.insert("metadata".into(), Value::Object((*self.metadata).clone()));
        s.insert("status".into(), "Failure".into());
        s.insert("message".into(), self.message.clone().into());
        s.insert("reason".into(), self.reason.into());
        if let Some(d) = &self.details {
            s.insert("details".into(), Value::Object((**d).clone()));
        }
        s.insert("code".into(), self.code.into());
        Value::Object(s)
    }
}

/// A successful `Status` (what a DELETE of a ConfigMap answers).
pub fn success(group: &str, resource: &str, name: &str, uid: &str) -> Value {
    let mut d = details(group, resource, name);
    if !uid.is_empty() {
        d.insert("uid".into(), uid.into());
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_reads_like_rbac() {
        let e = ApiError::forbidden_resource("cpha", "list", "", "configmaps", "", "", "kube-system");
        assert_eq!(
            e.message,
            "configmaps is forbidden: User \"cpha\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"kube-system\""
        );
        let e = ApiError::forbidden_resource("x", "get", "discovery.k8s.io", "endpointslices", "", "kubernetes", "");
        assert_eq!(
            e.message,
            "endpointslices.discovery.k8s.io \"kubernetes\" is forbidden: User \"x\" cannot get resource \"endpointslices\" in API group \"discovery.k8s.io\" at the cluster scope"
        );
        let s = e.to_status();
        assert_eq!(s["code"], 403);
        assert_eq!(s["details"]["kind"], "endpointslices");
    }

    #[test]
    fn invalid_joins_causes() {
        let e = ApiError::invalid(
            "",
            "ConfigMap",
            "x",
            vec![Cause::required("metadata.name", ""), Cause::too_long("data", 10)],
        );
        assert_eq!(e.code, 422);
        assert_eq!(
            e.message,
            "ConfigMap \"x\" is invalid: [metadata.name: Required value, data: Too long: may not be more than 10 bytes]"
        );
    }
}
