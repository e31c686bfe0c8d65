//! RBAC authorization from the Role and RoleBinding objects in the store, as kube-apiserver's
//! RBAC authorizer evaluates them for a namespaced request: every RoleBinding of the request's
//! namespace whose subjects name the user (a User by name, a ServiceAccount by name and
//! namespace, which defaults to the binding's, or one of the user's Groups) grants the rules of
//! the Role it references in that namespace. A rule matches on verbs, apiGroups, resources
//! (`resource/subresource` for a subresource) and, when it lists any, resourceNames. Rules are
//! only ever added (there is no deny). ClusterRoles and ClusterRoleBindings are not served, so a
//! binding to a ClusterRole grants nothing here, and a cluster-scope request (a list across
//! namespaces) is granted only by a token's own `--token` rules.

use serde_json::Value;

use crate::auth::{Attributes, User};
use crate::resources::Kind;
use crate::store::{ObjKey, Store};

fn has(list: &Value, want: &str) -> bool {
    list.as_array().is_some_and(|l| l.iter().any(|x| x == "*" || x == want))
}

fn subject_matches(s: &Value, user: &User, binding_ns: &str) -> bool {
    let name = s["name"].as_str().unwrap_or_default();
    match s["kind"].as_str().unwrap_or_default() {
        "User" => name == user.name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let ns = s["namespace"].as_str().filter(|n| !n.is_empty()).unwrap_or(binding_ns);
            user.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

/// Whether one PolicyRule allows the request.
pub fn rule_allows(rule: &Value, a: &Attributes<'_>) -> bool {
    let resource =
        if a.subresource.is_empty() { a.resource.to_string() } else { format!("{}/{}", a.resource, a.subresource) };
    let names_ok = match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => !a.name.is_empty() && names.iter().any(|n| n == a.name),
        _ => true,
    };
    has(&rule["verbs"], a.verb) && has(&rule["apiGroups"], a.group) && has(&rule["resources"], &resource) && names_ok
}

/// Whether a RoleBinding in the request's namespace grants it.
pub fn allows(store: &Store, user: &User, a: &Attributes<'_>) -> bool {
    if a.namespace.is_empty() {
        return false;
    }
    let (_, bindings) = store.list(Kind::RoleBinding, Some(a.namespace));
    bindings.iter().any(|b| {
        let role_ref = &b["roleRef"];
        if role_ref["kind"] != "Role" {
            return false;
        }
        let subjects = b["subjects"].as_array().map_or(&[][..], Vec::as_slice);
        if !subjects.iter().any(|s| subject_matches(s, user, a.namespace)) {
            return false;
        }
        let Some(role) =
            store.get(&ObjKey::new(Kind::Role, a.namespace, role_ref["name"].as_str().unwrap_or_default()))
        else {
            return false;
        };
        role["rules"].as_array().is_some_and(|rules| rules.iter().any(|r| rule_allows(r, a)))
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn attrs<'a>(verb: &'a str, resource: &'a str, name: &'a str) -> Attributes<'a> {
        Attributes { verb, group: "", resource, subresource: "", namespace: "kube-system", name }
    }

    #[test]
    fn rules_match_verbs_groups_resources_and_names() {
        let rule = json!({"verbs": ["get", "list", "watch"], "apiGroups": [""], "resources": ["configmaps"],
                          "resourceNames": ["cpha-members"]});
        assert!(rule_allows(&rule, &attrs("watch", "configmaps", "cpha-members")));
        assert!(!rule_allows(&rule, &attrs("list", "configmaps", "")), "a list without a name selector");
        assert!(!rule_allows(&rule, &attrs("get", "configmaps", "other")));
        assert!(!rule_allows(&rule, &attrs("update", "configmaps", "cpha-members")));
        assert!(!rule_allows(&rule, &attrs("get", "secrets", "cpha-members")));
        let mut a = attrs("get", "configmaps", "cpha-members");
        a.group = "events.k8s.io";
        assert!(!rule_allows(&rule, &a));
        let token = json!({"verbs": ["create"], "apiGroups": [""], "resources": ["serviceaccounts/token"]});
        let mut a = attrs("create", "serviceaccounts", "cpha");
        assert!(!rule_allows(&token, &a), "the resource does not cover its subresource, nor the reverse");
        a.subresource = "token";
        assert!(rule_allows(&token, &a));
        let any = json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]});
        assert!(rule_allows(&any, &a));
    }

    #[test]
    fn subjects_match_users_accounts_and_groups() {
        let sa = User {
            name: "system:serviceaccount:kube-system:cpha".into(),
            token: String::new(),
            rules: Vec::new(),
            groups: vec!["system:serviceaccounts".into()],
        };
        assert!(subject_matches(&json!({"kind": "ServiceAccount", "name": "cpha"}), &sa, "kube-system"));
        assert!(!subject_matches(&json!({"kind": "ServiceAccount", "name": "cpha"}), &sa, "default"));
        assert!(subject_matches(
            &json!({"kind": "ServiceAccount", "name": "cpha", "namespace": "kube-system"}),
            &sa,
            "default"
        ));
        assert!(subject_matches(&json!({"kind": "Group", "name": "system:serviceaccounts"}), &sa, "x"));
        assert!(!subject_matches(&json!({"kind": "User", "name": "cpha"}), &sa, "kube-system"));
    }
}
