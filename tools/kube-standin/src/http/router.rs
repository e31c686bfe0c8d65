//! Request dispatch in the API server's filter order: fault injection, authentication,
//! non-resource endpoints, authorization, then the resource handlers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};

use crate::api::{self, Req};
use crate::app::App;
use crate::auth::Attributes;
use crate::control;
use crate::http::body::{self, Body};
use crate::http::negotiate;
use crate::namespaces;
use crate::nonresource;
use crate::request_info::{parse_query, RequestInfo};
use crate::resources::Kind;
use crate::status::ApiError;

/// The API server's request body limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

async fn read_body(b: Incoming) -> Result<bytes::Bytes, ApiError> {
    match Limited::new(b, MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::new(413, "RequestEntityTooLarge", format!("Request entity too large: limit is {MAX_BODY}")))
        }
        Err(e) => Err(ApiError::bad_request(format!("reading the request body: {e}"))),
    }
}

/// The API listener's service.
pub async fn serve_api(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let (resp, user) = route(&app, req).await;
    let path = uri.path();
    let status = resp.status().as_u16();
    let ms = started.elapsed().as_millis() as u64;
    if nonresource::is_health_path(path) {
        tracing::debug!(%method, %uri, status, user, ms, "request");
    } else {
        tracing::info!(%method, %uri, status, user, ms, "request");
    }
    Ok(resp)
}

/// The plain-HTTP loopback control listener's service: `/_standin/` only, no authentication.
pub async fn serve_control(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    if !path.starts_with(control::PREFIX) {
        return Ok(body::text(404, "404 page not found\n"));
    }
    let resp = match read_body(req.into_body()).await {
        Ok(b) => control::handle(&app, &method, &path, &b),
        Err(e) => body::error(&e),
    };
    tracing::info!(%method, %path, status = resp.status().as_u16(), "control request");
    Ok(resp)
}

async fn route(app: &Arc<App>, req: Request<Incoming>) -> (Response<Body>, String) {
    let (parts, incoming) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parse_query(parts.uri.query());
    let method = parts.method.as_str().to_string();
    let authz = parts.headers.get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let user = match app.authenticate(authz) {
        Ok(u) => u,
        Err(crate::auth::BadToken) => return (body::error(&ApiError::unauthorized()), String::new()),
    };
    let user_name = user.as_ref().map_or("system:anonymous", |u| u.name.as_str()).to_string();

    // The control endpoint is never subject to the faults it controls.
    if path.starts_with(control::PREFIX) {
        let Some(u) = &user else {
            return (body::error(&ApiError::unauthorized()), user_name);
        };
        let verb = control::verb(&method);
        let attrs = Attributes {
            verb,
            group: control::GROUP,
            resource: control::RESOURCE,
            subresource: "",
            namespace: "",
            name: "",
        };
        if !app.authorize(u, &attrs) {
            let e = ApiError::forbidden_resource(&u.name, verb, control::GROUP, control::RESOURCE, "", "", "");
            return (body::error(&e), user_name);
        }
        let resp = match read_body(incoming).await {
            Ok(b) => control::handle(app, &method, &path, &b),
            Err(e) => body::error(&e),
        };
        return (resp, user_name);
    }

    if let Some(d) = app.faults.delay_for(&path) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = app.shutdown.cancelled() => {}
        }
    }
    if let Some(code) = app.faults.take_error(&path) {
        let e = ApiError::server_error(code, "injected by kube-standin fault");
        return (body::error(&e), user_name);
    }

    let is_get = parts.method == Method::GET || parts.method == Method::HEAD;
    if nonresource::is_public(&path) && is_get {
        let resp = if nonresource::is_health_path(&path) {
            nonresource::health(app, &path, &query)
        } else {
            body::json(200, &nonresource::version(app))
        };
        return (resp, user_name);
    }
    // Anonymous requests are accepted only for the public endpoints above.
    let Some(user) = user else {
        return (body::error(&ApiError::unauthorized()), user_name);
    };

    let info = RequestInfo::parse(&method, &path, &query);
    if !info.is_resource {
        if !is_get {
            let e = ApiError::forbidden_path(&user.name, &method.to_lowercase(), &path);
            return (body::error(&e), user_name);
        }
        let resp = match nonresource::discovery(app, &path) {
            Some(doc) => body::json(200, &doc),
            None => match crate::openapi::serve(
                &path,
                &query,
                parts.headers.get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok()),
            ) {
                Some(r) => r,
                None => body::text(404, "404 page not found\n"),
            },
        };
        return (resp, user_name);
    }

    let attrs = Attributes {
        verb: &info.verb,
        group: &info.group,
        resource: &info.resource,
        subresource: &info.subresource,
        namespace: &info.namespace,
        name: &info.name,
    };
    if !app.authorize(&user, &attrs) {
        let e = ApiError::forbidden_resource(
            &user.name,
            &info.verb,
            &info.group,
            &info.resource,
            &info.subresource,
            &info.name,
            &info.namespace,
        );
        return (body::error(&e), user_name);
    }
    if info.group.is_empty() && info.version == "v1" && info.resource == "namespaces" {
        let form = negotiate::choose(
            parts.headers.get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok()),
            query.get("includeObject").map(String::as_str),
        );
        let result = form.and_then(|form| match info.verb.as_str() {
            "get" => namespaces::get(app, &info.name, form).map(|v| body::json(200, &v)),
            "list" => Ok(body::json(200, &namespaces::list(app, form))),
            other => Err(ApiError::method_not_supported("", "namespaces", other)),
        });
        return (result.unwrap_or_else(|e| body::error(&e)), user_name);
    }
    let Some(kind) = Kind::from_path(&info.group, &info.version, &info.resource) else {
        return (body::error(&ApiError::path_not_found()), user_name);
    };
    if kind == Kind::ServiceAccount && info.subresource == "token" && !info.namespace.is_empty() {
        if info.verb != "create" {
            return (body::error(&ApiError::method_not_supported("", "serviceaccounts/token", &info.verb)), user_name);
        }
        let resp = match read_body(incoming).await {
            Ok(b) => crate::tokens::request(app, &info.namespace, &info.name, &b).map(|v| body::json(201, &v)),
            Err(e) => Err(e),
        };
        return (resp.unwrap_or_else(|e| body::error(&e)), user_name);
    }
    if !info.subresource.is_empty() {
        return (body::error(&ApiError::path_not_found()), user_name);
    }
    let body_bytes = match read_body(incoming).await {
        Ok(b) => b,
        Err(e) => return (body::error(&e), user_name),
    };
    let req = Req { app, kind, info: &info, query: &query, headers: &parts.headers, body: body_bytes };
    let namespaced_only = info.namespace.is_empty();
    let result = match info.verb.as_str() {
        "get" | "update" | "patch" | "delete" | "create" | "deletecollection" if namespaced_only => {
            Err(ApiError::path_not_found())
        }
        "get" => api::read::get(&req).await,
        "list" => api::read::list(&req).await,
        "watch" => api::watch::watch(&req, app.clone()).await,
        "create" if info.name.is_empty() => api::write::create(&req).await,
        "update" if !info.name.is_empty() => api::write::update(&req).await,
        "patch" if !info.name.is_empty() => api::write::patch(&req).await,
        "delete" => api::write::delete(&req).await,
        "deletecollection" => api::write::delete_collection(&req).await,
        other => Err(ApiError::method_not_supported(kind.group(), kind.plural(), other)),
    };
    let resp = result.unwrap_or_else(|e| body::error(&e));
    (resp, user_name)
}
