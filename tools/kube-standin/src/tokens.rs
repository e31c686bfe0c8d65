//! ServiceAccount tokens: the TokenRequest subresource (`POST
//! /api/v1/namespaces/NS/serviceaccounts/NAME/token`, what `kubectl create token` and kube-rs's
//! `Api::create_token_request` call) and their authentication.
//!
//! A token is a JWT with the claims kube-apiserver's bound tokens carry (`sub`
//! `system:serviceaccount:NS:NAME`, `aud`, `exp`, and `kubernetes.io` with the account's uid),
//! signed with HS256 under a key derived from the cluster CA's key in `--cert-dir`, so every
//! instance sharing the directory accepts it, also after a restart (kube-apiserver signs with
//! `sa.key` and RS256; clients never look inside). It is valid while it has not expired and its
//! ServiceAccount exists with the same uid: deleting the account revokes every token of it, as
//! for a real bound token.

use std::path::Path;

use anyhow::Context as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use serde_json::{json, Value};

use crate::app::App;
use crate::auth::User;
use crate::resources::Kind;
use crate::status::{ApiError, Cause};
use crate::store::ObjKey;
use crate::timefmt;

/// The audience kube-apiserver accepts by default (`--api-audiences` = the issuer).
pub const AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
const DEFAULT_SECONDS: i64 = 3600;
const MAX_SECONDS: i64 = 1 << 32;

/// The signing key, derived from the CA key in `cert_dir` (read after the CA exists).
pub fn signing_key(cert_dir: &Path) -> anyhow::Result<hmac::Key> {
    let path = cert_dir.join("ca.key");
    let ca_key = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"kube-standin service account tokens\0");
    ctx.update(&ca_key);
    Ok(hmac::Key::new(hmac::HMAC_SHA256, ctx.finish().as_ref()))
}

/// The discovery entry of the subresource in `/api/v1`.
pub fn api_resource() -> Value {
    json!({
        "name": "serviceaccounts/token",
        "singularName": "",
        "namespaced": true,
        "group": "authentication.k8s.io",
        "version": "v1",
        "kind": "TokenRequest",
        "verbs": ["create"],
    })
}

fn sign(key: &hmac::Key, claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{payload}");
    let tag = hmac::sign(key, signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// `POST .../serviceaccounts/NAME/token`.
pub fn request(app: &App, namespace: &str, name: &str, body: &[u8]) -> Result<Value, ApiError> {
    let group = "authentication.k8s.io";
    let req: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("decoding the TokenRequest: {e}")))?
    };
    if !req.is_object() {
        return Err(ApiError::bad_request("the TokenRequest is not a JSON object"));
    }
    let spec = &req["spec"];
    let seconds = match &spec["expirationSeconds"] {
        Value::Null => DEFAULT_SECONDS,
        v => v.as_i64().ok_or_else(|| ApiError::bad_request("spec.expirationSeconds is not an integer"))?,
    };
    let mut causes = Vec::new();
    let min = app.cfg.min_token_seconds;
    if seconds < min {
        let message = if min == 600 {
            "may not specify a duration less than 10 minutes".to_string()
        } else {
            format!("may not specify a duration less than {min} seconds (--min-token-duration)")
        };
        causes.push(Cause::invalid("spec.expirationSeconds", &spec["expirationSeconds"], &message));
    } else if seconds > MAX_SECONDS {
        causes.push(Cause::invalid(
            "spec.expirationSeconds",
            &spec["expirationSeconds"],
            "may not specify a duration larger than 2^32 seconds",
        ));
    }
    if !spec["boundObjectRef"].is_null() {
        // NOTE: a real server binds the token to a Pod, Secret or Node as well; not served here.
        causes.push(Cause::forbidden("spec.boundObjectRef", "kube-standin does not bind tokens to objects"));
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(group, "TokenRequest", name, causes));
    }
    let sa = app
        .store
        .get(&ObjKey::new(Kind::ServiceAccount, namespace, name))
        .ok_or_else(|| ApiError::not_found("", "serviceaccounts", name))?;
    let uid = sa["metadata"]["uid"].as_str().unwrap_or_default().to_string();
    let audiences: Vec<String> = match spec["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => vec![AUDIENCE.to_string()],
    };
    let now = timefmt::now_unix();
    let exp = now + seconds;
    let claims = json!({
        "aud": audiences,
        "exp": exp,
        "iat": now,
        "nbf": now,
        "iss": AUDIENCE,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
    });
    let token = sign(&app.sa_key, &claims);
    tracing::info!(namespace, name, seconds, "issued a service account token");
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": null},
        "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": null},
        "status": {"token": token, "expirationTimestamp": timefmt::rfc3339(exp)},
    }))
}

/// The user a service account token stands for, or None when the token is not one of ours,
/// has expired, or its account is gone (or was recreated: another uid).
pub fn authenticate(app: &App, token: &str) -> Option<User> {
    let mut parts = token.split('.');
    let (header, payload, tag) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    hmac::verify(&app.sa_key, format!("{header}.{payload}").as_bytes(), &tag).ok()?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    if claims["exp"].as_i64()? <= timefmt::now_unix() {
        return None;
    }
    if !claims["aud"].as_array()?.iter().any(|a| a == AUDIENCE) {
        return None;
    }
    let k = &claims["kubernetes.io"];
    let namespace = k["namespace"].as_str()?;
    let name = k["serviceaccount"]["name"].as_str()?;
    let sa = app.store.get(&ObjKey::new(Kind::ServiceAccount, namespace, name))?;
    if sa["metadata"]["uid"].as_str()? != k["serviceaccount"]["uid"].as_str()? {
        return None;
    }
    Some(User {
        name: format!("system:serviceaccount:{namespace}:{name}"),
        token: token.to_string(),
        rules: Vec::new(),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".into(),
        ],
    })
}
