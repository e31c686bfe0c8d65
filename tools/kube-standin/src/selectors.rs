//! Label selectors (equality and set-based) and field selectors (`metadata.name`,
//! `metadata.namespace` and the fields a kind adds), parsed and matched like
//! `k8s.io/apimachinery/pkg/labels` and `fields`.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<(String, LabelOp)>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top(s)? {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            reqs.push(parse_requirement(part)?);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|(k, op)| match op {
            LabelOp::Eq(v) => get(k) == Some(v.as_str()),
            LabelOp::NotEq(v) => get(k) != Some(v.as_str()),
            LabelOp::In(vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelOp::NotIn(vs) => get(k).map_or(true, |x| !vs.iter().any(|v| v == x)),
            LabelOp::Exists => get(k).is_some(),
            LabelOp::NotExists => get(k).is_none(),
            LabelOp::Gt(n) => get(k).and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x > *n),
            LabelOp::Lt(n) => get(k).and_then(|x| x.parse::<i64>().ok()).is_some_and(|x| x < *n),
        })
    }
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unable to parse requirement: unexpected ')' in {s:?}"));
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unable to parse requirement: unclosed '(' in {s:?}"));
    }
    out.push(&s[start..]);
    Ok(out)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

fn parse_set(rest: &str, whole: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: found '{rest}', expected: '(' in {whole:?}"))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

fn parse_requirement(part: &str) -> Result<(String, LabelOp), String> {
    let bad = || format!("unable to parse requirement: invalid label selector {part:?}");
    if let Some(k) = part.strip_prefix('!') {
        let k = k.trim();
        return if valid_key(k) { Ok((k.to_string(), LabelOp::NotExists)) } else { Err(bad()) };
    }
    for (tok, is_in) in [(" notin ", false), (" in ", true)] {
        if let Some(idx) = part.find(tok) {
            let k = part[..idx].trim();
            if !valid_key(k) {
                return Err(bad());
            }
            let set = parse_set(&part[idx + tok.len()..], part)?;
            return Ok((k.to_string(), if is_in { LabelOp::In(set) } else { LabelOp::NotIn(set) }));
        }
    }
    for (tok, kind) in [("!=", 0), ("==", 1), ("=", 1), (">", 2), ("<", 3)] {
        if let Some(idx) = part.find(tok) {
            let k = part[..idx].trim();
            let v = part[idx + tok.len()..].trim();
            if !valid_key(k) || v.contains(['=', '!', '(', ')']) {
                return Err(bad());
            }
            let op = match kind {
                0 => LabelOp::NotEq(v.to_string()),
                1 => LabelOp::Eq(v.to_string()),
                2 => LabelOp::Gt(v.parse().map_err(|_| bad())?),
                _ => LabelOp::Lt(v.parse().map_err(|_| bad())?),
            };
            return Ok((k.to_string(), op));
        }
    }
    if valid_key(part) {
        Ok((part.to_string(), LabelOp::Exists))
    } else {
        Err(bad())
    }
}

/// A field selector: `field=value`, `field==value` and `field!=value` terms on the fields a kind
/// can be selected by, each a dotted path into the object (`metadata.name`, `regarding.kind`);
/// an absent field reads as the empty string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses the syntax only (what the API server's request-info does to find a
    /// `metadata.name` term before any kind is known).
    pub fn parse_any(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: '{s}'; can't understand '{part}'"));
            };
            terms.push((field.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(Self(terms))
    }

    /// Parses a selector on a kind that can be selected by `supported`.
    pub fn parse(s: &str, supported: &[&str]) -> Result<Self, String> {
        let sel = Self::parse_any(s)?;
        if let Some((field, _, _)) = sel.0.iter().find(|(f, _, _)| !supported.contains(&f.as_str())) {
            return Err(format!("field label not supported: {field}"));
        }
        Ok(sel)
    }

    /// The value of an `=`/`==` term on `field` (what RBAC uses as the request's name).
    pub fn exact(&self, field: &str) -> Option<&str> {
        self.0.iter().find(|(f, eq, _)| f == field && *eq).map(|(_, _, v)| v.as_str())
    }

    /// Adds a `metadata.name=<name>` term.
    pub fn and_name(mut self, name: &str) -> Self {
        self.0.push(("metadata.name".into(), true, name.into()));
        self
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(f, eq, v)| {
            let actual = f.split('.').try_fold(obj, |o, seg| o.get(seg)).and_then(Value::as_str).unwrap_or_default();
            (actual == v) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn label_selectors() {
        let l = labels(json!({"app": "cpha", "tier": "cp", "n": "5"}));
        let yes = [
            "",
            "app=cpha",
            "app==cpha",
            "app!=x",
            "app in (cpha, other)",
            "tier notin (x)",
            "app,tier",
            "!missing",
            "n>4,n<6",
            "app=cpha,tier in (cp)",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(Some(&l)), "{s}");
        }
        let no = ["app=x", "missing", "!app", "app notin (cpha)", "n>5", "missing=1"];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(Some(&l)), "{s}");
        }
        let err = LabelSelector::parse("app in (x").unwrap_err();
        assert!(err.contains("unclosed '('"), "{err}");
        let err = LabelSelector::parse("a b=c").unwrap_err();
        assert!(err.contains("unable to parse requirement"), "{err}");
    }

    #[test]
    fn field_selectors() {
        const META: [&str; 2] = ["metadata.name", "metadata.namespace"];
        let o = json!({"metadata": {"name": "cpha-members", "namespace": "kube-system"}, "regarding": {"kind": "ConfigMap"}});
        let f = FieldSelector::parse("metadata.name=cpha-members", &META).unwrap();
        assert!(f.matches(&o));
        assert_eq!(f.exact("metadata.name"), Some("cpha-members"));
        let f = FieldSelector::parse("metadata.namespace!=kube-system", &META).unwrap();
        assert!(!f.matches(&o));
        assert_eq!(f.exact("metadata.namespace"), None);
        assert_eq!(FieldSelector::parse("spec.x=1", &META).unwrap_err(), "field label not supported: spec.x");
        let f = FieldSelector::parse_any("regarding.kind=ConfigMap,reason=").unwrap();
        assert!(f.matches(&o), "an absent field reads as empty");
        assert!(!FieldSelector::parse_any("regarding.kind=Pod").unwrap().matches(&o));
        let err = FieldSelector::parse_any("nonsense").unwrap_err();
        assert!(err.contains("can't understand 'nonsense'"), "{err}");
    }
}
