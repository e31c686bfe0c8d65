//! The resource API: GET, LIST, WATCH, POST, PUT, PATCH, DELETE and DELETE-collection of the
//! served kinds, with the API server's option validation, metadata handling and errors.

pub mod read;
pub mod watch;
pub mod write;

use std::collections::HashMap;

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::Response;
use serde_json::{Map, Value};

use crate::app::App;
use crate::http::body::{self, Body};
use crate::http::negotiate::{self, Form};
use crate::request_info::{parse_bool, RequestInfo};
use crate::resources::Kind;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::{ApiError, Cause};

/// A resource request after routing and authorization.
pub struct Req<'a> {
    pub app: &'a App,
    pub kind: Kind,
    pub info: &'a RequestInfo,
    pub query: &'a HashMap<String, String>,
    pub headers: &'a HeaderMap,
    pub body: Bytes,
}

impl Req<'_> {
    pub fn q(&self, k: &str) -> Option<&str> {
        self.query.get(k).map(String::as_str)
    }

    pub fn form(&self) -> Result<Form, ApiError> {
        negotiate::choose(
            self.headers.get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok()),
            self.q("includeObject"),
        )
    }

    pub fn content_type(&self) -> String {
        self.headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    }

    pub fn dry_run(&self) -> Result<bool, ApiError> {
        match self.q("dryRun") {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => {
                Err(ApiError::bad_request(format!("dryRun: Unsupported value: {other:?}: supported values: \"All\"")))
            }
        }
    }

    /// The label and field selectors; a field the kind cannot be selected by is a 400, as the
    /// API server's field label conversion answers.
    pub fn selectors(&self) -> Result<(LabelSelector, FieldSelector), ApiError> {
        let ls = LabelSelector::parse(self.q("labelSelector").unwrap_or_default()).map_err(ApiError::bad_request)?;
        let fs = FieldSelector::parse(self.q("fieldSelector").unwrap_or_default(), self.kind.field_labels())
            .map_err(ApiError::bad_request)?;
        Ok((ls, fs))
    }

    pub fn bool_param(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.q(k) {
            None | Some("") => Ok(None),
            Some(v) => parse_bool(v).map(Some).ok_or_else(|| {
                ApiError::bad_request(format!("strconv.ParseBool: parsing {v:?}: invalid syntax for {k}"))
            }),
        }
    }

    pub fn u64_param(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.q(k) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("strconv.ParseInt: parsing {v:?}: invalid syntax for {k}"))),
        }
    }
}

/// `ListOptions.meta.k8s.io "" is invalid: ...`
pub fn invalid_list_options(causes: Vec<Cause>) -> ApiError {
    ApiError::invalid("meta.k8s.io", "ListOptions", "", causes)
}

/// A resourceVersion parameter that must be a number.
pub fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}")))
}

/// How unknown fields in a body are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

pub fn field_validation(req: &Req<'_>) -> Result<FieldValidation, ApiError> {
    match req.q("fieldValidation") {
        None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
        Some("Ignore") => Ok(FieldValidation::Ignore),
        Some("Strict") => Ok(FieldValidation::Strict),
        Some(other) => Err(ApiError::bad_request(format!(
            "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
        ))),
    }
}

/// Decodes an object against its kind's schema: type errors are 400s; unknown fields become
/// warnings or (Strict) a 400.
pub fn decode_object(kind: Kind, raw: &Value, fv: FieldValidation) -> Result<(Value, Vec<String>), ApiError> {
    if !raw.is_object() {
        return Err(ApiError::bad_request(format!(
            "{k} in version \"v1\" cannot be handled as a {k}: json: cannot unmarshal {t} into Go value of type {k}",
            k = kind.name(),
            t = if raw.is_array() { "array" } else { "value" }
        )));
    }
    for (field, want) in [("apiVersion", kind.api_version()), ("kind", kind.name())] {
        if let Some(v) = raw.get(field).and_then(Value::as_str) {
            if !v.is_empty() && v != want {
                return Err(ApiError::bad_request(format!(
                    "the {} of the provided object ({v}) does not match the expected {} ({want})",
                    if field == "kind" { "kind" } else { "API version" },
                    if field == "kind" { "kind" } else { "API version" },
                )));
            }
        }
    }
    let d = crate::resources::schema::decode(raw, kind.schema()).map_err(|e| {
        let why = e.detail.unwrap_or_else(|| {
            format!(
                "json: cannot unmarshal {jt} into Go struct field {k}.{p} of type {gt}",
                k = kind.name(),
                jt = e.json_type,
                p = e.path,
                gt = e.go_type
            )
        });
        ApiError::bad_request(format!(
            "{k} in version \"{v}\" cannot be handled as a {k}: {why}",
            k = kind.name(),
            v = kind.version(),
        ))
    })?;
    let unknown: Vec<String> = d.unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
    match fv {
        FieldValidation::Strict if !unknown.is_empty() => {
            Err(ApiError::bad_request(format!("strict decoding error: {}", unknown.join(", "))))
        }
        FieldValidation::Warn => Ok((d.value, unknown)),
        _ => Ok((d.value, Vec::new())),
    }
}

/// Parses a JSON request body.
pub fn parse_body(req: &Req<'_>) -> Result<Value, ApiError> {
    let ct = req.content_type();
    if !(ct.is_empty() || ct == "application/json" || ct == "*/*") {
        return Err(ApiError::unsupported_media_type(
            &ct,
            &["application/json", "application/yaml", "application/vnd.kubernetes.protobuf"],
        ));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}")))
}

pub fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = Value::Object(Map::new());
    }
    obj["metadata"].as_object_mut().expect("metadata was just made an object")
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or_default()
}

/// Answers an object in the requested form with `Warning` headers.
pub fn respond(req: &Req<'_>, code: u16, obj: &Value, warnings: &[String]) -> Result<Response<Body>, ApiError> {
    let form = req.form()?;
    let mut r = body::json(code, &negotiate::render_one(req.kind, form, obj));
    add_warnings(r.headers_mut(), warnings);
    Ok(r)
}

pub fn add_warnings(h: &mut HeaderMap, warnings: &[String]) {
    for w in warnings {
        let v = format!("299 - {}", serde_json::to_string(w).unwrap_or_default());
        if let Ok(hv) = HeaderValue::from_str(&v) {
            h.append("Warning", hv);
        }
    }
}
