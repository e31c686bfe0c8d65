//! POST, PUT, PATCH, DELETE and DELETE-collection: server-set metadata (uid, creationTimestamp,
//! generation, resourceVersion), optimistic concurrency (409 on a stale resourceVersion or a
//! failed precondition), validation, dry runs and finalizer-delayed deletion.

use hyper::Response;
use serde_json::{Map, Value};

use super::read::matches;
use super::{decode_object, field_validation, meta_mut, meta_str, parse_body, respond, Req};
use crate::http::body::{self, Body};
use crate::http::negotiate;
use crate::patch;
use crate::resources::Kind;
use crate::status::{self, ApiError};
use crate::store::{object_rv, Mutation, ObjKey};
use crate::timefmt;

fn invalid(kind: Kind, obj: &Value, causes: Vec<status::Cause>) -> ApiError {
    ApiError::invalid(kind.group(), kind.name(), meta_str(obj, "name"), causes)
}

/// Checks that the object's namespace agrees with the URL and fills it in.
fn settle_namespace(obj: &mut Value, ns: &str) -> Result<(), ApiError> {
    let m = meta_mut(obj);
    match m.get("namespace").and_then(Value::as_str) {
        Some(x) if !x.is_empty() && x != ns => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            m.insert("namespace".into(), ns.into());
            Ok(())
        }
    }
}

/// Fields only the server sets, dropped from what a client sent.
fn strip_server_fields(obj: &mut Value) {
    let m = meta_mut(obj);
    for f in [
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
    ] {
        m.shift_remove(f);
    }
}

/// Rebuilds `metadata` in struct order after fields were added.
fn reorder_meta(kind: Kind, obj: &mut Value) {
    if let Ok(d) = crate::resources::schema::decode(obj, kind.schema()) {
        *obj = d.value;
    }
}

pub async fn create(req: &Req<'_>) -> Result<Response<Body>, ApiError> {
    let kind = req.kind;
    let dry_run = req.dry_run()?;
    let raw = parse_body(req)?;
    let (mut obj, warnings) = decode_object(kind, &raw, field_validation(req)?)?;
    settle_namespace(&mut obj, &req.info.namespace)?;
    {
        let m = meta_mut(&mut obj);
        let name = m.get("name").and_then(Value::as_str).unwrap_or_default();
        let gen = m.get("generateName").and_then(Value::as_str).unwrap_or_default();
        if name.is_empty() && !gen.is_empty() {
            let n = format!("{gen}{}", crate::ids::name_suffix());
            m.insert("name".into(), n.into());
        }
    }
    strip_server_fields(&mut obj);
    obj["kind"] = kind.name().into();
    obj["apiVersion"] = kind.api_version().into();
    {
        let m = meta_mut(&mut obj);
        m.insert("uid".into(), crate::ids::uid().into());
        if kind.has_generation() {
            m.insert("generation".into(), 1.into());
        }
        m.insert("creationTimestamp".into(), timefmt::rfc3339(timefmt::now_unix()).into());
    }
    kind.apply_defaults(&mut obj);
    reorder_meta(kind, &mut obj);
    let causes = kind.validate(&obj, None);
    if !causes.is_empty() {
        return Err(invalid(kind, &obj, causes));
    }
    if !crate::namespaces::exists(req.app, &req.info.namespace) {
        return Err(crate::namespaces::not_found(&req.info.namespace));
    }
    let name = meta_str(&obj, "name").to_string();
    let key = ObjKey::new(kind, &req.info.namespace, &name);
    let out = req
        .app
        .store
        .mutate(&key, dry_run, |cur| {
            if cur.is_some() {
                return Err(ApiError::already_exists(kind.group(), kind.plural(), &name));
            }
            Ok(Mutation::Put(obj))
        })
        .await?;
    respond(req, 201, &out.object, &warnings)
}

/// Turns a client's full object into the next stored version of `cur`.
fn next_version(kind: Kind, mut obj: Value, cur: &Value, name: &str) -> Result<Mutation, ApiError> {
    let sent_rv = meta_str(&obj, "resourceVersion").to_string();
    if !sent_rv.is_empty() && sent_rv != meta_str(cur, "resourceVersion") {
        return Err(ApiError::stale(kind.group(), kind.plural(), name));
    }
    let sent_uid = meta_str(&obj, "uid").to_string();
    if !sent_uid.is_empty() && sent_uid != meta_str(cur, "uid") {
        return Err(ApiError::conflict(
            kind.group(),
            kind.plural(),
            name,
            &format!(
                "Precondition failed: UID in precondition: {sent_uid}, UID in object meta: {}",
                meta_str(cur, "uid")
            ),
        ));
    }
    strip_server_fields(&mut obj);
    obj["kind"] = kind.name().into();
    obj["apiVersion"] = kind.api_version().into();
    kind.apply_defaults(&mut obj);
    let cur_meta = cur["metadata"].as_object().cloned().unwrap_or_default();
    {
        let m = meta_mut(&mut obj);
        for f in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"] {
            if let Some(v) = cur_meta.get(f) {
                m.insert(f.into(), v.clone());
            }
        }
    }
    if kind.has_generation() && kind.spec_of(&obj) != kind.spec_of(cur) {
        let g = cur["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        meta_mut(&mut obj).insert("generation".into(), g.into());
    }
    reorder_meta(kind, &mut obj);
    let causes = kind.validate(&obj, Some(cur));
    if !causes.is_empty() {
        return Err(invalid(kind, &obj, causes));
    }
    let terminating = cur["metadata"].get("deletionTimestamp").is_some();
    let finalizers_left = obj["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
    if terminating && !finalizers_left {
        // The last finalizer is gone: the pending deletion completes now.
        return Ok(Mutation::DeleteWith(obj));
    }
    Ok(Mutation::Put(obj))
}

fn check_names(obj: &Value, name: &str, ns: &str) -> Result<(), ApiError> {
    let n = meta_str(obj, "name");
    if n != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    let o_ns = meta_str(obj, "namespace");
    if !o_ns.is_empty() && o_ns != ns {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    Ok(())
}

pub async fn update(req: &Req<'_>) -> Result<Response<Body>, ApiError> {
    let kind = req.kind;
    let dry_run = req.dry_run()?;
    let raw = parse_body(req)?;
    let (mut obj, warnings) = decode_object(kind, &raw, field_validation(req)?)?;
    let name = req.info.name.clone();
    check_names(&obj, &name, &req.info.namespace)?;
    settle_namespace(&mut obj, &req.info.namespace)?;
    let key = ObjKey::new(kind, &req.info.namespace, &name);
    let out = req
        .app
        .store
        .mutate(&key, dry_run, |cur| {
            let cur = cur.ok_or_else(|| ApiError::not_found(kind.group(), kind.plural(), &name))?;
            next_version(kind, obj, cur, &name)
        })
        .await?;
    respond(req, 200, &out.object, &warnings)
}

pub async fn patch(req: &Req<'_>) -> Result<Response<Body>, ApiError> {
    let kind = req.kind;
    let dry_run = req.dry_run()?;
    let ct = req.content_type();
    if !patch::ACCEPTED.contains(&ct.as_str()) {
        return Err(ApiError::unsupported_media_type(&ct, &patch::ACCEPTED));
    }
    let fv = field_validation(req)?;
    let name = req.info.name.clone();
    let ns = req.info.namespace.clone();
    let key = ObjKey::new(kind, &ns, &name);
    let body = req.body.clone();
    let mut warnings = Vec::new();
    let out = req
        .app
        .store
        .mutate(&key, dry_run, |cur| {
            let cur = cur.ok_or_else(|| ApiError::not_found(kind.group(), kind.plural(), &name))?;
            let patched = patch::apply(&ct, cur, &body)?;
            let (obj, w) = decode_object(kind, &patched, fv)?;
            warnings = w;
            check_names(&obj, &name, &ns)?;
            next_version(kind, obj, cur, &name)
        })
        .await?;
    respond(req, 200, &out.object, &warnings)
}

/// `DeleteOptions` from the body (or nothing).
fn delete_options(req: &Req<'_>) -> Result<Map<String, Value>, ApiError> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let v: Value = serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}")))?;
    match v {
        Value::Object(m) => {
            if let Some(pp) = m.get("propagationPolicy").and_then(Value::as_str) {
                if !["Orphan", "Background", "Foreground"].contains(&pp) {
                    return Err(ApiError::invalid(
                        "meta.k8s.io",
                        "DeleteOptions",
                        "",
                        vec![status::Cause::not_supported(
                            "propagationPolicy",
                            pp,
                            &["Foreground", "Background", "Orphan", "nil"],
                        )],
                    ));
                }
            }
            Ok(m)
        }
        _ => Err(ApiError::bad_request("DeleteOptions must be an object")),
    }
}

/// What a deletion does to `cur`: checks preconditions, then removes it or (finalizers left)
/// marks it terminating.
fn deletion(kind: Kind, cur: &Value, name: &str, opts: &Map<String, Value>) -> Result<Mutation, ApiError> {
    let pre = opts.get("preconditions").cloned().unwrap_or(Value::Null);
    for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
        let (want, have) = (pre[field].as_str(), meta_str(cur, field));
        if let Some(want) = want.filter(|w| *w != have) {
            return Err(ApiError::conflict(
                kind.group(),
                kind.plural(),
                name,
                &format!("Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}"),
            ));
        }
    }
    let has_finalizers = cur["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
    if !has_finalizers {
        return Ok(Mutation::Delete);
    }
    let mut next = cur.clone();
    if next["metadata"].get("deletionTimestamp").is_none() {
        let m = meta_mut(&mut next);
        m.insert("deletionTimestamp".into(), timefmt::rfc3339(timefmt::now_unix()).into());
        m.insert("deletionGracePeriodSeconds".into(), 0.into());
        reorder_meta(kind, &mut next);
    }
    Ok(Mutation::Put(next))
}

pub async fn delete(req: &Req<'_>) -> Result<Response<Body>, ApiError> {
    let kind = req.kind;
    let dry_run = req.dry_run()?;
    let opts = delete_options(req)?;
    let name = req.info.name.clone();
    let key = ObjKey::new(kind, &req.info.namespace, &name);
    let out = req
        .app
        .store
        .mutate(&key, dry_run, |cur| {
            let cur = cur.ok_or_else(|| ApiError::not_found(kind.group(), kind.plural(), &name))?;
            deletion(kind, cur, &name, &opts)
        })
        .await?;
    if out.deleted {
        Ok(body::json(200, &status::success(kind.group(), kind.plural(), &name, meta_str(&out.object, "uid"))))
    } else {
        // Finalizers hold the object: 202 with the terminating object, as the API server does.
        respond(req, 202, &out.object, &[])
    }
}

pub async fn delete_collection(req: &Req<'_>) -> Result<Response<Body>, ApiError> {
    let kind = req.kind;
    let dry_run = req.dry_run()?;
    let opts = delete_options(req)?;
    let (ls, fs) = req.selectors()?;
    let ns = (!req.info.namespace.is_empty()).then_some(req.info.namespace.as_str());
    let (_, items) = req.app.store.list(kind, ns);
    let mut deleted = Vec::new();
    for o in items.iter().filter(|o| matches(o, &ls, &fs)) {
        let name = meta_str(o, "name").to_string();
        let key = ObjKey::new(kind, meta_str(o, "namespace"), &name);
        let res = req
            .app
            .store
            .mutate(&key, dry_run, |cur| match cur {
                Some(cur) => deletion(kind, cur, &name, &opts),
                None => Err(ApiError::not_found(kind.group(), kind.plural(), &name)),
            })
            .await;
        match res {
            Ok(out) => deleted.push(out.object),
            // Deleted concurrently: nothing left to do for this one.
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let mut meta = Map::new();
    let rv = deleted.iter().map(|o| object_rv(o)).max().unwrap_or_else(|| req.app.store.current_rv());
    meta.insert("resourceVersion".into(), rv.to_string().into());
    let refs: Vec<&Value> = deleted.iter().map(AsRef::as_ref).collect();
    Ok(body::json(200, &negotiate::render_list(kind, negotiate::Form::Object, meta, &refs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_uid_preconditions() {
        let cur: Value = serde_json::json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "x", "namespace": "ns", "uid": "u1", "resourceVersion": "5", "creationTimestamp": "2024-01-01T00:00:00Z"}});
        let mut stale = cur.clone();
        stale["metadata"]["resourceVersion"] = "4".into();
        let e = next_version(Kind::ConfigMap, stale, &cur, "x").err().unwrap();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        let mut upd = cur.clone();
        upd["data"] = serde_json::json!({"a": "1"});
        let Mutation::Put(o) = next_version(Kind::ConfigMap, upd, &cur, "x").ok().unwrap() else {
            panic!("an update is a put")
        };
        assert_eq!(o["metadata"]["uid"], "u1");
        let mut opts = Map::new();
        opts.insert("preconditions".into(), serde_json::json!({"resourceVersion": "4"}));
        let e = deletion(Kind::ConfigMap, &cur, "x", &opts).err().unwrap();
        assert!(e.message.contains("ResourceVersion in precondition: 4"));
    }
}
