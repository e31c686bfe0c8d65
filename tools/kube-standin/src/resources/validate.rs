//! Name, label and address checks with the API server's wording.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{Map, Value};

use crate::status::Cause;

const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const CONFIG_KEY_MSG: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";
const QUALIFIED_NAME_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain (what most object names must be).
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

pub fn is_dns_label(s: &str) -> bool {
    is_label(s)
}

/// Problems with an object name (path segment rules first, as the API server does).
pub fn name_causes(field: &str, name: &str, dns_label_only: bool) -> Vec<Cause> {
    let v = Value::String(name.to_string());
    if name == "." || name == ".." {
        return vec![Cause::invalid(field, &v, &format!("may not be '{name}'"))];
    }
    if name.contains('/') || name.contains('%') {
        return vec![Cause::invalid(field, &v, "may not contain '/'")];
    }
    if dns_label_only {
        if !is_dns_label(name) {
            return vec![Cause::invalid(field, &v, DNS1123_LABEL_MSG)];
        }
    } else if !is_dns_subdomain(name) {
        return vec![Cause::invalid(field, &v, DNS1123_SUBDOMAIN_MSG)];
    }
    Vec::new()
}

fn is_qualified_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn qualified_name_causes(field: &str, key: &str) -> Vec<Cause> {
    let v = Value::String(key.to_string());
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let mut out = Vec::new();
    if let Some(p) = prefix {
        if p.is_empty() {
            out.push(Cause::invalid(field, &v, "prefix part must be non-empty"));
        } else if !is_dns_subdomain(p) {
            out.push(Cause::invalid(field, &v, &format!("prefix part {DNS1123_SUBDOMAIN_MSG}")));
        }
    }
    if !is_qualified_part(name) || name.contains('/') {
        out.push(Cause::invalid(field, &v, QUALIFIED_NAME_MSG));
    }
    out
}

/// `IsQualifiedName`'s messages for `value` (a label key, an Event's reportingController).
pub fn qualified_name_msgs(value: &str) -> Vec<String> {
    let parts: Vec<&str> = value.split('/').collect();
    let mut out = Vec::new();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                out.push("prefix part must be non-empty".to_string());
            } else {
                if prefix.len() > 253 {
                    out.push("prefix part must be no more than 253 characters".to_string());
                }
                if !prefix.split('.').all(is_label) {
                    out.push(format!("prefix part {DNS1123_SUBDOMAIN_MSG}"));
                }
            }
            *name
        }
        _ => {
            return vec![format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                QUALIFIED_NAME_MSG.trim_start_matches("name part ")
            )]
        }
    };
    if name.is_empty() {
        out.push("name part must be non-empty".to_string());
    } else if name.len() > 63 {
        out.push("name part must be no more than 63 characters".to_string());
    }
    let b = name.as_bytes();
    let pattern_ok = !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !pattern_ok {
        out.push(QUALIFIED_NAME_MSG.to_string());
    }
    out
}

/// `metadata.labels` keys and values, `metadata.annotations` keys and size.
pub fn meta_causes(meta: &Map<String, Value>) -> Vec<Cause> {
    let mut out = Vec::new();
    if let Some(Value::Object(labels)) = meta.get("labels") {
        for (k, v) in labels {
            out.extend(qualified_name_causes("metadata.labels", k));
            let val = v.as_str().unwrap_or_default();
            let ok = val.is_empty() || is_qualified_part(val);
            if !ok {
                out.push(Cause::invalid("metadata.labels", v, LABEL_VALUE_MSG));
            }
        }
    }
    if let Some(Value::Object(ann)) = meta.get("annotations") {
        let mut total = 0usize;
        for (k, v) in ann {
            out.extend(qualified_name_causes("metadata.annotations", &k.to_lowercase()));
            total += k.len() + v.as_str().map_or(0, str::len);
        }
        if total > 256 * 1024 {
            out.push(Cause::too_long("metadata.annotations", 256 * 1024));
        }
    }
    out
}

/// A ConfigMap or Secret data key.
pub fn config_key_causes(field: &str, key: &str) -> Vec<Cause> {
    let v = Value::String(key.to_string());
    let mut out = Vec::new();
    if key.len() > 253 {
        out.push(Cause::invalid(field, &v, "must be no more than 253 characters"));
    }
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        out.push(Cause::invalid(field, &v, CONFIG_KEY_MSG));
    }
    if key == "." || key == ".." {
        out.push(Cause::invalid(field, &v, &format!("must not be '{key}'")));
    } else if key.starts_with("..") {
        out.push(Cause::invalid(field, &v, "must not start with '..'"));
    }
    out
}

pub fn address_causes(field: &str, address_type: &str, addr: &str) -> Vec<Cause> {
    let v = Value::String(addr.to_string());
    let ok = match address_type {
        "IPv4" => addr.parse::<Ipv4Addr>().is_ok(),
        "IPv6" => addr.parse::<Ipv6Addr>().is_ok(),
        "FQDN" => is_dns_subdomain(addr),
        _ => true,
    };
    if ok {
        Vec::new()
    } else {
        let why = match address_type {
            "IPv4" => "must be a valid IPv4 address",
            "IPv6" => "must be a valid IPv6 address",
            _ => DNS1123_SUBDOMAIN_MSG,
        };
        vec![Cause::invalid(field, &v, why)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_dns_subdomain("cpha-members"));
        assert!(is_dns_subdomain("a.b-c.d"));
        assert!(!is_dns_subdomain("Upper"));
        assert!(!is_dns_subdomain("-x"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(name_causes("metadata.name", "a/b", false).len() == 1);
        assert!(name_causes("metadata.name", "ok", false).is_empty());
    }

    #[test]
    fn keys_and_labels() {
        assert!(config_key_causes("data[k]", "members.json").is_empty());
        assert!(!config_key_causes("data[k]", "a b").is_empty());
        assert!(!config_key_causes("data[k]", "..x").is_empty());
        let m: Map<String, Value> =
            serde_json::from_str(r#"{"labels":{"kubernetes.io/service-name":"kubernetes","bad key":"x","k":"-v"}}"#)
                .unwrap();
        assert_eq!(meta_causes(&m).len(), 2);
        assert!(qualified_name_msgs("cpha").is_empty());
        assert!(qualified_name_msgs("cpha.io/agent").is_empty());
        assert_eq!(qualified_name_msgs("").len(), 2);
        assert_eq!(qualified_name_msgs("a b"), vec![QUALIFIED_NAME_MSG.to_string()]);
        assert!(qualified_name_msgs("a/b/c")[0].starts_with("a qualified name must consist of"));
        assert!(address_causes("a", "IPv4", "10.0.0.1").is_empty());
        assert!(!address_causes("a", "IPv4", "::1").is_empty());
    }
}
