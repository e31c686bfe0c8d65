//! GET and LIST: resourceVersion semantics (unset, "0", NotOlderThan, Exact), selectors, and
//! pagination with continue tokens that serve a consistent snapshot until it leaves the window.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hyper::Response;
use serde_json::{json, Map, Value};

use super::{invalid_list_options, parse_rv, respond, Req};
use crate::http::body::{self, Body};
use crate::http::negotiate;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::{ApiError, Cause};
use crate::store::{ObjKey, SnapshotError, Store};

const LIST_TOO_OLD: &str = "The resourceVersion for the provided list is too old.";
const CONTINUE_TOO_OLD: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

/// How long a read waits for a resourceVersion newer than the current one, as the watch
/// cache does before answering "Too large resource version".
const WAIT_FOR_RV: Duration = Duration::from_secs(3);

pub async fn wait_for_rv(store: &Store, want: u64) -> Result<(), ApiError> {
    let mut rx = store.subscribe_rv();
    let reached = async { rx.wait_for(|v| *v >= want).await.is_ok() };
    if tokio::time::timeout(WAIT_FOR_RV, reached).await.unwrap_or(false) {
        Ok(())
    } else {
        Err(ApiError::too_large_rv(want, store.current_rv()))
    }
}

pub async fn get(req: &Req<'_>) -> Result<Response<Body>, ApiError> {
    // Refuse an unacceptable Accept before doing any work, as the API server does.
    req.form()?;
    if let Some(rv) = req.q("resourceVersion").filter(|s| !s.is_empty() && *s != "0") {
        wait_for_rv(&req.app.store, parse_rv(rv)?).await?;
    }
    let key = ObjKey::new(req.kind, &req.info.namespace, &req.info.name);
    let obj = req
        .app
        .store
        .get(&key)
        .ok_or_else(|| ApiError::not_found(req.kind.group(), req.kind.plural(), &req.info.name))?;
    respond(req, 200, &obj, &[])
}

/// A continue token: the snapshot revision and the key the next page starts after.
#[derive(Debug, PartialEq, Eq)]
struct ContinueToken {
    /// `None`: continue on the current state (the token handed out with an expired one).
    rv: Option<u64>,
    after: (String, String),
}

fn encode_continue(rv: Option<u64>, ns: &str, name: &str) -> String {
    let rv = rv.map_or(-1, |r| r as i64);
    let raw = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{ns}/{name}\u{0}")});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.to_string())
}

fn decode_continue(s: &str) -> Result<ContinueToken, ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| bad("illegal base64 data"))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad("not a JSON object"))?;
    if v["v"] != "meta.k8s.io/v1" {
        return Err(bad("server does not recognize this encoded key"));
    }
    let start = v["start"].as_str().ok_or_else(|| bad("no start key"))?;
    let start = start.strip_suffix('\u{0}').unwrap_or(start);
    let (ns, name) = start.split_once('/').ok_or_else(|| bad("malformed start key"))?;
    let rv = match v["rv"].as_i64() {
        Some(-1) => None,
        Some(n) if n > 0 => Some(n as u64),
        _ => return Err(bad("incorrect encoded start resourceVersion (version meta.k8s.io/v1)")),
    };
    Ok(ContinueToken { rv, after: (ns.to_string(), name.to_string()) })
}

fn key_of(o: &Value) -> (String, String) {
    (
        o["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
        o["metadata"]["name"].as_str().unwrap_or_default().to_string(),
    )
}

pub fn matches(o: &Value, ls: &LabelSelector, fs: &FieldSelector) -> bool {
    fs.matches(o) && ls.matches(o["metadata"]["labels"].as_object())
}

pub async fn list(req: &Req<'_>) -> Result<Response<Body>, ApiError> {
    let form = req.form()?;
    let (ls, fs) = req.selectors()?;
    let rv = req.q("resourceVersion").unwrap_or_default();
    let rv_match = req.q("resourceVersionMatch").unwrap_or_default();
    let cont = req.q("continue").unwrap_or_default();
    let limit = req.u64_param("limit")?.unwrap_or(0);

    let mut causes = Vec::new();
    if !rv_match.is_empty() {
        if rv.is_empty() {
            causes.push(Cause::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if !cont.is_empty() {
            causes.push(Cause::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        if rv_match != "Exact" && rv_match != "NotOlderThan" {
            causes.push(Cause::not_supported("resourceVersionMatch", rv_match, &["Exact", "NotOlderThan", ""]));
        }
        if rv_match == "Exact" && rv == "0" {
            causes.push(Cause::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
    }
    if req.q("sendInitialEvents").is_some() {
        causes.push(Cause::forbidden("sendInitialEvents", "sendInitialEvents is forbidden for list"));
    }
    if !causes.is_empty() {
        return Err(invalid_list_options(causes));
    }
    if !cont.is_empty() && !rv.is_empty() && rv != "0" {
        return Err(ApiError::bad_request("specifying resource version is not allowed when using continue"));
    }

    let store = &req.app.store;
    let ns = (!req.info.namespace.is_empty()).then_some(req.info.namespace.as_str());
    let snapshot = |at: u64, too_old: &str| -> Result<Vec<Arc<Value>>, ApiError> {
        store.list_at(req.kind, ns, at).map_err(|e| match e {
            SnapshotError::Compacted => ApiError::expired(too_old),
            SnapshotError::TooLarge { current } => ApiError::too_large_rv(at, current),
        })
    };
    let mut after = None;
    let (list_rv, items) = if !cont.is_empty() {
        let tok = decode_continue(cont)?;
        after = Some(tok.after.clone());
        match tok.rv {
            Some(at) => match snapshot(at, CONTINUE_TOO_OLD) {
                Ok(items) => (at, items),
                Err(mut e) if e.code == 410 => {
                    e.metadata.insert("continue".into(), encode_continue(None, &tok.after.0, &tok.after.1).into());
                    return Err(e);
                }
                Err(e) => return Err(e),
            },
            None => store.list(req.kind, ns),
        }
    } else if rv_match == "Exact" {
        let at = parse_rv(rv)?;
        (at, snapshot(at, LIST_TOO_OLD)?)
    } else {
        if !rv.is_empty() && rv != "0" {
            wait_for_rv(store, parse_rv(rv)?).await?;
        }
        store.list(req.kind, ns)
    };

    let selected: Vec<&Value> = items
        .iter()
        .map(AsRef::as_ref)
        .filter(|o| matches(o, &ls, &fs))
        .filter(|o| after.as_ref().map_or(true, |a| &key_of(o) > a))
        .collect();
    let paged = limit > 0 && rv != "0" && (selected.len() as u64) > limit;
    let page: &[&Value] = if paged { &selected[..limit as usize] } else { &selected };
    let mut meta = Map::new();
    meta.insert("resourceVersion".into(), list_rv.to_string().into());
    if paged {
        let (lns, lname) = key_of(page[page.len() - 1]);
        let snapshot_rv = if cont.is_empty() { Some(list_rv) } else { decode_continue(cont)?.rv };
        meta.insert("continue".into(), encode_continue(snapshot_rv, &lns, &lname).into());
        if req.q("labelSelector").unwrap_or_default().is_empty()
            && req.q("fieldSelector").unwrap_or_default().is_empty()
        {
            meta.insert("remainingItemCount".into(), (selected.len() - page.len()).into());
        }
    }
    Ok(body::json(200, &negotiate::render_list(req.kind, form, meta, page)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue(Some(42), "kube-system", "cpha-members");
        assert_eq!(
            decode_continue(&t).unwrap(),
            ContinueToken { rv: Some(42), after: ("kube-system".into(), "cpha-members".into()) }
        );
        let t = encode_continue(None, "a", "b");
        assert_eq!(decode_continue(&t).unwrap().rv, None);
        assert_eq!(decode_continue("!!").unwrap_err().code, 400);
        let other = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"v":"x"}"#);
        assert_eq!(decode_continue(&other).unwrap_err().code, 400);
    }
}
