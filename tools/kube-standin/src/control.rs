//! The fault-injection control endpoint, `/_standin/faults`: GET shows the faults and the
//! history window, POST applies a `FaultRequest` (JSON), DELETE clears every fault. Served on
//! the API port to tokens allowed `*` on resource `faults` of group `standin.cpha.io` (an admin
//! token with `*/*` is), and without authentication on the optional loopback `--control-listen`
//! port.

use hyper::Response;
use serde_json::json;

use crate::app::App;
use crate::faults::FaultRequest;
use crate::http::body::{self, Body};
use crate::status::ApiError;

pub const PREFIX: &str = "/_standin/";
pub const GROUP: &str = "standin.cpha.io";
pub const RESOURCE: &str = "faults";

/// The RBAC verb a control request needs.
pub fn verb(method: &str) -> &'static str {
    match method {
        "GET" | "HEAD" => "get",
        "DELETE" => "delete",
        _ => "update",
    }
}

fn state(app: &App) -> serde_json::Value {
    let window: Vec<_> = app
        .store
        .window()
        .into_iter()
        .map(|(k, oldest, events)| {
            json!({"resource": k.plural(), "oldestResourceVersion": oldest.to_string(), "events": events})
        })
        .collect();
    json!({
        "faults": app.faults.current(),
        "resourceVersion": app.store.current_rv().to_string(),
        "window": window,
    })
}

pub fn handle(app: &App, method: &str, path: &str, body_bytes: &[u8]) -> Response<Body> {
    if path.trim_end_matches('/') != "/_standin/faults" {
        return body::error(&ApiError::path_not_found());
    }
    match method {
        "GET" => body::json(200, &state(app)),
        "DELETE" => {
            app.faults.apply(&FaultRequest { clear: true, ..Default::default() });
            tracing::info!("faults cleared");
            body::json(200, &state(app))
        }
        "POST" | "PUT" | "PATCH" => {
            let req: FaultRequest = match serde_json::from_slice(body_bytes) {
                Ok(r) => r,
                Err(e) => return body::error(&ApiError::bad_request(format!("invalid fault request: {e}"))),
            };
            let set = app.faults.apply(&req);
            let mut out = state(app);
            if let Some(mode) = req.drop_watches {
                let n = app.faults.drop_watches(mode);
                tracing::info!(?mode, watches = n, "dropping open watches");
                out["droppedWatches"] = n.into();
            }
            if req.expire_now {
                let rv = app.store.compact_now();
                tracing::info!(rv, "history compacted: older resourceVersions are expired");
                out["expiredBefore"] = rv.to_string().into();
            }
            tracing::info!(faults = ?set, "faults set");
            body::json(200, &out)
        }
        _ => body::error(&ApiError::new(405, "MethodNotAllowed", format!("{method} is not supported on {path}"))),
    }
}
