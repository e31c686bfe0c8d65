//! Bearer-token authentication and RBAC-like authorization: each token names a user and a list
//! of rules (verbs × resources × namespaces × optional resourceNames, `*` wildcards). Rules
//! granted by Role and RoleBinding objects are added to these (`crate::rbac`), and service
//! account tokens are `crate::tokens`.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One authorization rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub verbs: Vec<String>,
    /// `configmaps`, `endpointslices.discovery.k8s.io` (a bare name matches any group) or `*`.
    pub resources: Vec<String>,
    /// Namespaces, or `*` for every namespace and the cluster scope.
    #[serde(default = "star")]
    pub namespaces: Vec<String>,
    /// When not empty, only requests naming one of these objects match.
    #[serde(default)]
    pub resource_names: Vec<String>,
}

fn star() -> Vec<String> {
    vec!["*".into()]
}

fn list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::to_string).collect()
}

impl FromStr for Rule {
    type Err = String;
    /// `VERBS/RESOURCES[/NAMESPACES[/NAMES]]`, each a comma list.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() < 2 || parts.len() > 4 {
            return Err(format!("rule {s:?}: expected VERBS/RESOURCES[/NAMESPACES[/NAMES]]"));
        }
        let rule = Rule {
            verbs: list(parts[0]),
            resources: list(parts[1]),
            namespaces: parts.get(2).map_or_else(star, |p| list(p)),
            resource_names: parts.get(3).map_or_else(Vec::new, |p| list(p)),
        };
        if rule.verbs.is_empty() || rule.resources.is_empty() || rule.namespaces.is_empty() {
            return Err(format!("rule {s:?}: verbs, resources and namespaces may not be empty"));
        }
        Ok(rule)
    }
}

/// A token with its user and rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSpec {
    pub user: String,
    /// Empty: a random token is generated at start.
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl FromStr for TokenSpec {
    type Err = String;
    /// `USER:TOKEN[:RULE[;RULE...]]`; an empty TOKEN is generated.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut it = s.splitn(3, ':');
        let user = it.next().unwrap_or_default().to_string();
        let token = it.next().ok_or_else(|| format!("token {s:?}: expected USER:TOKEN[:RULES]"))?.to_string();
        if user.is_empty() {
            return Err(format!("token {s:?}: empty user"));
        }
        if token.contains(char::is_whitespace) {
            return Err(format!("token for {user:?} contains whitespace"));
        }
        let rules = match it.next() {
            None | Some("") => Vec::new(),
            Some(r) => r.split(';').filter(|x| !x.trim().is_empty()).map(str::parse).collect::<Result<_, _>>()?,
        };
        Ok(TokenSpec { user, token, rules })
    }
}

/// Reads a tokens file: a JSON list of `{"user", "token", "rules": [{"verbs", "resources",
/// "namespaces", "resourceNames"}]}`.
pub fn load_tokens_file(path: &Path) -> anyhow::Result<Vec<TokenSpec>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// What is being asked (the subset of the API server's authorizer attributes used here).
#[derive(Debug, Clone, Default)]
pub struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    /// `token` for `serviceaccounts/token`; empty for the resource itself.
    pub subresource: &'a str,
    /// Empty for a cluster-scope request.
    pub namespace: &'a str,
    /// Empty when the request names no object.
    pub name: &'a str,
}

fn any_or(list: &[String], want: &str) -> bool {
    list.iter().any(|x| x == "*" || x == want)
}

impl Rule {
    pub fn allows(&self, a: &Attributes<'_>) -> bool {
        let resource_ok = self.resources.iter().any(|r| {
            if r == "*" {
                return true;
            }
            // A flag rule cannot spell `resource/subresource` (`/` separates its parts), so only
            // `*` covers a subresource, as in RBAC a resource does not cover its subresources.
            if !a.subresource.is_empty() {
                return false;
            }
            match r.split_once('.') {
                Some((res, group)) => res == a.resource && group == a.group,
                None => r == a.resource,
            }
        });
        let namespace_ok = self.namespaces.iter().any(|n| n == "*")
            || (!a.namespace.is_empty() && self.namespaces.iter().any(|n| n == a.namespace));
        let name_ok =
            self.resource_names.is_empty() || (!a.name.is_empty() && self.resource_names.iter().any(|n| n == a.name));
        any_or(&self.verbs, a.verb) && resource_ok && namespace_ok && name_ok
    }
}

/// An authenticated user.
#[derive(Debug)]
pub struct User {
    pub name: String,
    pub token: String,
    pub rules: Vec<Rule>,
    /// `system:authenticated`, and for a service account its groups.
    pub groups: Vec<String>,
}

impl User {
    pub fn can(&self, a: &Attributes<'_>) -> bool {
        self.rules.iter().any(|r| r.allows(a))
    }
}

/// A bearer token (or another credential) that authenticates nobody: 401, never anonymous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadToken;

/// The token table.
#[derive(Debug, Default)]
pub struct Authenticator {
    by_token: HashMap<String, Arc<User>>,
    by_name: HashMap<String, Arc<User>>,
}

impl Authenticator {
    /// Builds the table, generating tokens that were left empty.
    pub fn new(specs: Vec<TokenSpec>) -> anyhow::Result<Self> {
        let mut a = Authenticator::default();
        for s in specs {
            let token = if s.token.is_empty() { crate::ids::token() } else { s.token };
            let user = Arc::new(User {
                name: s.user.clone(),
                token: token.clone(),
                rules: s.rules,
                groups: vec!["system:authenticated".into()],
            });
            if a.by_token.insert(token, user.clone()).is_some() {
                anyhow::bail!("token of user {:?} is given twice", s.user);
            }
            a.by_name.insert(s.user, user);
        }
        Ok(a)
    }

    /// The bearer token of an `Authorization` header, if it is one.
    pub fn bearer(header: &str) -> Option<&str> {
        let mut parts = header.trim().splitn(2, ' ');
        let scheme = parts.next().unwrap_or_default();
        let token = parts.next().unwrap_or_default().trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    }

    /// `Authorization: Bearer <token>` → user; `Err` for a token that is not known.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Option<Arc<User>>, BadToken> {
        let Some(h) = header else { return Ok(None) };
        let mut parts = h.trim().splitn(2, ' ');
        let scheme = parts.next().unwrap_or_default();
        let token = parts.next().unwrap_or_default().trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(BadToken);
        }
        self.by_token.get(token).cloned().map(Some).ok_or(BadToken)
    }

    pub fn user(&self, name: &str) -> Option<Arc<User>> {
        self.by_name.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_flags() {
        let t: TokenSpec = "cpha:abc:get,list,watch/configmaps/kube-system/cpha-members".parse().unwrap();
        assert_eq!(t.user, "cpha");
        assert_eq!(t.rules[0].resource_names, vec!["cpha-members"]);
        let t: TokenSpec = "admin:xyz:*/*".parse().unwrap();
        assert_eq!(t.rules[0].namespaces, vec!["*"]);
        let t: TokenSpec = "nobody:".parse().unwrap();
        assert!(t.rules.is_empty() && t.token.is_empty());
        let err = "x".parse::<TokenSpec>().unwrap_err();
        assert!(err.contains("expected USER:TOKEN[:RULES]"), "{err}");
        let err = "u:t:get".parse::<TokenSpec>().unwrap_err();
        assert!(err.contains("expected VERBS/RESOURCES"), "{err}");
    }

    #[test]
    fn rules_match_like_rbac() {
        let r: Rule = "get,list,watch/configmaps/kube-system/cpha-members".parse().unwrap();
        let a = |verb, ns, name| Attributes {
            verb,
            group: "",
            resource: "configmaps",
            subresource: "",
            namespace: ns,
            name,
        };
        assert!(r.allows(&a("get", "kube-system", "cpha-members")));
        assert!(r.allows(&a("watch", "kube-system", "cpha-members")));
        assert!(!r.allows(&a("list", "kube-system", "")), "a list without a name is refused");
        assert!(!r.allows(&a("get", "kube-system", "other")));
        assert!(!r.allows(&a("get", "default", "cpha-members")));
        assert!(!r.allows(&a("update", "kube-system", "cpha-members")));
        let es: Rule = "list/endpointslices.discovery.k8s.io/default".parse().unwrap();
        let mut x = a("list", "default", "");
        x.resource = "endpointslices";
        assert!(!es.allows(&x));
        x.group = "discovery.k8s.io";
        assert!(es.allows(&x));
        x.namespace = "";
        assert!(!es.allows(&x), "a namespaced rule does not cover the cluster scope");
        let admin: Rule = "*/*".parse().unwrap();
        assert!(admin.allows(&x));
    }

    #[test]
    fn authenticates_bearer_tokens() {
        let a = Authenticator::new(vec!["u:tok:*/*".parse().unwrap(), "g::get/configmaps".parse().unwrap()]).unwrap();
        assert_eq!(a.authenticate(Some("Bearer tok")).unwrap().unwrap().name, "u");
        assert_eq!(a.authenticate(Some("Bearer nope")).err(), Some(BadToken));
        assert_eq!(a.authenticate(Some("Basic dTp0")).err(), Some(BadToken));
        assert!(a.authenticate(None).unwrap().is_none());
        let g = a.user("g").unwrap();
        assert_eq!(g.token.len(), 48);
    }
}
