//! Turns a request line into what the API server's `RequestInfoFactory` derives from it: resource
//! or non-resource request, verb, group/version/resource, namespace and name (for a list or
//! watch, the name comes from a `metadata.name=` field selector, which is what lets RBAC
//! `resourceNames` rules cover them).

use std::collections::HashMap;

use crate::selectors::FieldSelector;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub is_resource: bool,
    pub verb: String,
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The request came in through the legacy `/watch/` path prefix.
    pub legacy_watch: bool,
}

/// Percent-decoding of a query component (`+` is a space).
pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters (the last value wins, as Go's `url.Values.Get` takes the first; the
/// clients here never repeat one).
pub fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        m.entry(url_decode(k)).or_insert_with(|| url_decode(v));
    }
    m
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

impl RequestInfo {
    pub fn parse(method: &str, path: &str, query: &HashMap<String, String>) -> RequestInfo {
        let non_resource =
            |verb: &str| RequestInfo { is_resource: false, verb: verb.to_string(), ..Default::default() };
        let method_verb = match method {
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            "HEAD" | "GET" => "get",
            _ => "",
        };
        let segs: Vec<String> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).map(url_decode).collect();
        let mut rest: &[String] = &segs;
        let mut info = RequestInfo::default();
        match rest.first().map(String::as_str) {
            Some("api") => {
                if rest.len() < 3 {
                    return non_resource(&method.to_lowercase());
                }
                info.version = rest[1].clone();
                rest = &rest[2..];
            }
            Some("apis") => {
                if rest.len() < 4 {
                    return non_resource(&method.to_lowercase());
                }
                info.group = rest[1].clone();
                info.version = rest[2].clone();
                rest = &rest[3..];
            }
            _ => return non_resource(&method.to_lowercase()),
        }
        info.is_resource = true;
        info.verb = method_verb.to_string();
        if rest.first().map(String::as_str) == Some("watch") {
            info.legacy_watch = true;
            info.verb = "watch".into();
            rest = &rest[1..];
        }
        if rest.first().map(String::as_str) == Some("namespaces") {
            if rest.len() > 1 {
                info.namespace = rest[1].clone();
                if rest.len() > 2 {
                    rest = &rest[2..];
                } else {
                    // `/api/v1/namespaces/NAME`: the namespace object itself, whose
                    // request namespace is its own name (RBAC sees it that way).
                    info.resource = "namespaces".into();
                    info.name = rest[1].clone();
                    rest = &[];
                }
            } else {
                info.resource = "namespaces".into();
                rest = &[];
            }
        }
        if let Some(r) = rest.first() {
            info.resource = r.clone();
        }
        if let Some(n) = rest.get(1) {
            info.name = n.clone();
        }
        if let Some(s) = rest.get(2) {
            info.subresource = s.clone();
        }
        if info.name.is_empty() && info.verb == "get" {
            let watch = query.get("watch").and_then(|w| parse_bool(w)).unwrap_or(false);
            info.verb = if watch { "watch" } else { "list" }.into();
        }
        if info.name.is_empty() && info.verb == "delete" {
            info.verb = "deletecollection".into();
        }
        if info.name.is_empty() && matches!(info.verb.as_str(), "list" | "watch" | "deletecollection") {
            if let Some(fs) = query.get("fieldSelector") {
                if let Ok(sel) = FieldSelector::parse_any(fs) {
                    if let Some(n) = sel.exact("metadata.name") {
                        if !n.is_empty() && !n.contains('/') && n != "." && n != ".." {
                            info.name = n.to_string();
                        }
                    }
                }
            }
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ri(method: &str, path_q: &str) -> RequestInfo {
        let (p, q) = path_q.split_once('?').unwrap_or((path_q, ""));
        RequestInfo::parse(method, p, &parse_query(Some(q)))
    }

    #[test]
    fn resource_requests() {
        let r = ri("GET", "/api/v1/namespaces/kube-system/configmaps/cpha-members");
        assert_eq!(
            (r.verb.as_str(), r.group.as_str(), r.resource.as_str(), r.namespace.as_str(), r.name.as_str()),
            ("get", "", "configmaps", "kube-system", "cpha-members")
        );
        let r =
            ri("GET", "/api/v1/namespaces/kube-system/configmaps?watch=1&fieldSelector=metadata.name%3Dcpha-members");
        assert_eq!((r.verb.as_str(), r.name.as_str()), ("watch", "cpha-members"));
        let r = ri("GET", "/apis/discovery.k8s.io/v1/endpointslices?watch=false");
        assert_eq!((r.verb.as_str(), r.group.as_str(), r.namespace.as_str()), ("list", "discovery.k8s.io", ""));
        let r = ri("DELETE", "/api/v1/namespaces/ns/configmaps?labelSelector=a%3Db");
        assert_eq!(r.verb, "deletecollection");
        let r = ri("GET", "/api/v1/watch/namespaces/ns/configmaps/x");
        assert_eq!((r.verb.as_str(), r.name.as_str(), r.legacy_watch), ("watch", "x", true));
        let r = ri("GET", "/api/v1/namespaces/ns");
        assert_eq!((r.resource.as_str(), r.name.as_str(), r.namespace.as_str()), ("namespaces", "ns", "ns"));
    }

    #[test]
    fn non_resource_requests() {
        for p in ["/api", "/apis", "/apis/discovery.k8s.io", "/version", "/readyz", "/api/v1"] {
            let r = ri("GET", p);
            if p == "/api/v1" {
                assert!(!r.is_resource, "{p}");
            } else {
                assert!(!r.is_resource && r.verb == "get", "{p}");
            }
        }
        assert_eq!(url_decode("a%3Db+c%zz"), "a=b c%zz");
        assert_eq!(parse_bool("1"), Some(true));
    }
}
