//! The agent's own least-privilege identity: a ServiceAccount whose Role may only read the one
//! member ConfigMap (by `resourceNames`, which the watch's `metadata.name` field selector
//! satisfies), read the `default/kubernetes` EndpointSlice the same way (the drift report's
//! comparison, or the member list itself with the `endpointSlice` source),
//! record Events, and request tokens for itself only (`serviceaccounts/token` by the name
//! `cpha`, which `crate::kube::renew` uses to renew its token); and a token for it from the
//! TokenRequest API, written to a file the agent reads again whenever it changes.
//!
//! NOTE: a ServiceAccount token rather than a client certificate for a `system:cpha` user,
//! because it is the sounder one to rotate: issuing one is an audited API call with admin
//! credentials, not a signature with the cluster CA's private key (which mints any identity);
//! it expires by itself (`expirationSeconds`); deleting the ServiceAccount revokes every token
//! of it at once, while Kubernetes cannot revoke a client certificate before it expires; and a
//! new token reaches the running agent by replacing one file (`TokenFile`), with no restart.
//!
//! [`desired`] builds the objects (pure); [`ensure`] creates or updates them and [`issue`]
//! requests a token. Both need credentials that may manage RBAC (kubeadm's admin.conf): they are
//! one-time steps of provisioning, never of the running agent, which renews its token with the
//! token itself.

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::Client;

/// Name of the ServiceAccount, the Roles and the RoleBindings.
pub const NAME: &str = "cpha";

/// What the identity may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// Where the ServiceAccount lives; its rule to request its own tokens is there too.
    pub namespace: String,
    /// The member ConfigMap, in `namespace` (the `configMap` source): get, list, watch by name.
    pub config_map: Option<String>,
    /// The EndpointSlice the apiservers register in (namespace, name): the member list of the
    /// `endpointSlice` source, or what the drift report compares the ConfigMap with.
    pub endpoint_slice: Option<(String, String)>,
    /// The namespace in which to create and patch events.k8s.io Events (`agent.events`): the
    /// member source object's.
    pub events: Option<String>,
}

/// The objects of the identity: the ServiceAccount, and per namespace a Role and its binding.
#[derive(Debug, Clone, PartialEq)]
pub struct Objects {
    pub service_account: ServiceAccount,
    pub roles: Vec<(Role, RoleBinding)>,
}

fn meta(namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(NAME.into()),
        namespace: Some(namespace.into()),
        labels: Some([("app.kubernetes.io/name".to_string(), "cpha".to_string())].into()),
        ..ObjectMeta::default()
    }
}

fn read_by_name(group: &str, resource: &str, name: &str) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(vec![resource.into()]),
        resource_names: Some(vec![name.into()]),
        verbs: vec!["get".into(), "list".into(), "watch".into()],
        ..PolicyRule::default()
    }
}

/// The objects for `grants` (pure).
pub fn desired(grants: &Grants) -> Objects {
    let sa_ns = &grants.namespace;
    let subject =
        Subject { kind: "ServiceAccount".into(), name: NAME.into(), namespace: Some(sa_ns.clone()), api_group: None };
    let binding = |namespace: &str| RoleBinding {
        metadata: meta(namespace),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: NAME.into(),
        },
        subjects: Some(vec![subject.clone()]),
    };
    let mut rules: Vec<(String, Vec<PolicyRule>)> = vec![(sa_ns.clone(), Vec::new())];
    let mut add = |namespace: &str, rule: PolicyRule| match rules.iter_mut().find(|(ns, _)| ns == namespace) {
        Some((_, r)) => r.push(rule),
        None => rules.push((namespace.to_string(), vec![rule])),
    };
    if let Some(cm_name) = &grants.config_map {
        add(sa_ns, read_by_name("", "configmaps", cm_name));
    }
    // NOTE: `create` on its own `serviceaccounts/token` lets a token outlive any one lifetime,
    // but only as this ServiceAccount with these rules; deleting the ServiceAccount or the
    // RoleBinding still ends it, and it cannot mint a token for any other account.
    add(
        sa_ns,
        PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["serviceaccounts/token".into()]),
            resource_names: Some(vec![NAME.into()]),
            verbs: vec!["create".into()],
            ..PolicyRule::default()
        },
    );
    if let Some((es_ns, es_name)) = &grants.endpoint_slice {
        add(es_ns, read_by_name("discovery.k8s.io", "endpointslices", es_name));
    }
    if let Some(events_ns) = &grants.events {
        add(
            events_ns,
            PolicyRule {
                api_groups: Some(vec!["events.k8s.io".into()]),
                resources: Some(vec!["events".into()]),
                verbs: vec!["create".into(), "patch".into()],
                ..PolicyRule::default()
            },
        );
    }
    Objects {
        service_account: ServiceAccount { metadata: meta(sa_ns), ..ServiceAccount::default() },
        roles: rules
            .into_iter()
            .map(|(ns, rules)| (Role { metadata: meta(&ns), rules: Some(rules) }, binding(&ns)))
            .collect(),
    }
}

fn api_err(what: String) -> impl FnOnce(kube::Error) -> anyhow::Error {
    move |e| anyhow::Error::new(e).context(what)
}

/// Creates the objects, or brings existing ones to what they should be. Idempotent.
#[tracing::instrument(skip_all, err)]
pub async fn ensure(client: &Client, objects: &Objects) -> anyhow::Result<()> {
    let sa_ns = objects.service_account.metadata.namespace.clone().unwrap_or_default();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &sa_ns);
    if sas.get_opt(NAME).await.map_err(api_err(format!("reading ServiceAccount {sa_ns}/{NAME}")))?.is_none() {
        sas.create(&PostParams::default(), &objects.service_account)
            .await
            .map_err(api_err(format!("creating ServiceAccount {sa_ns}/{NAME}")))?;
        tracing::info!("created ServiceAccount {sa_ns}/{NAME}");
    }
    for (role, binding) in &objects.roles {
        let ns = role.metadata.namespace.clone().unwrap_or_default();
        let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
        match roles.get_opt(NAME).await.map_err(api_err(format!("reading Role {ns}/{NAME}")))? {
            None => {
                roles
                    .create(&PostParams::default(), role)
                    .await
                    .map_err(api_err(format!("creating Role {ns}/{NAME}")))?;
                tracing::info!("created Role {ns}/{NAME}");
            }
            Some(mut current) if current.rules != role.rules => {
                current.rules = role.rules.clone();
                roles
                    .replace(NAME, &PostParams::default(), &current)
                    .await
                    .map_err(api_err(format!("updating Role {ns}/{NAME}")))?;
                tracing::info!("updated Role {ns}/{NAME}");
            }
            Some(_) => {}
        }
        let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &ns);
        match bindings.get_opt(NAME).await.map_err(api_err(format!("reading RoleBinding {ns}/{NAME}")))? {
            Some(current) if current.role_ref == binding.role_ref && current.subjects == binding.subjects => {}
            Some(_) => {
                // roleRef cannot change: a binding that differs is replaced whole.
                bindings
                    .delete(NAME, &DeleteParams::default())
                    .await
                    .map_err(api_err(format!("deleting RoleBinding {ns}/{NAME}")))?;
                bindings
                    .create(&PostParams::default(), binding)
                    .await
                    .map_err(api_err(format!("creating RoleBinding {ns}/{NAME}")))?;
                tracing::info!("replaced RoleBinding {ns}/{NAME}");
            }
            None => {
                bindings
                    .create(&PostParams::default(), binding)
                    .await
                    .map_err(api_err(format!("creating RoleBinding {ns}/{NAME}")))?;
                tracing::info!("created RoleBinding {ns}/{NAME}");
            }
        }
    }
    Ok(())
}

/// A token for the ServiceAccount in `namespace`, valid for `seconds`, and when it expires.
#[tracing::instrument(skip(client), err)]
pub async fn issue(client: &Client, namespace: &str, seconds: i64) -> anyhow::Result<(String, Option<String>)> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(seconds), ..TokenRequestSpec::default() }),
        ..TokenRequest::default()
    };
    let answer = sas
        .create_token_request(NAME, &PostParams::default(), &request)
        .await
        .map_err(api_err(format!("requesting a token for ServiceAccount {namespace}/{NAME}")))?;
    let status = answer.status.ok_or_else(|| anyhow::anyhow!("the TokenRequest answer has no status"))?;
    let token = status
        .token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow::anyhow!("the TokenRequest answer holds no token"))?;
    Ok((token, status.expiration_timestamp.map(|t| t.0.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_reads_one_configmap_and_one_endpointslice_by_name() {
        let grants = Grants {
            namespace: "kube-system".into(),
            config_map: Some("cpha-members".into()),
            endpoint_slice: Some(("default".into(), "kubernetes".into())),
            events: Some("kube-system".into()),
        };
        let objects = desired(&grants);
        assert_eq!(objects.service_account.metadata.namespace.as_deref(), Some("kube-system"));
        let json = serde_json::to_value(objects.roles.iter().map(|(r, _)| r).collect::<Vec<_>>()).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                 "metadata": {"name": "cpha", "namespace": "kube-system", "labels": {"app.kubernetes.io/name": "cpha"}},
                 "rules": [
                    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cpha-members"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["cpha"], "verbs": ["create"]},
                    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}]},
                {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                 "metadata": {"name": "cpha", "namespace": "default", "labels": {"app.kubernetes.io/name": "cpha"}},
                 "rules": [
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "resourceNames": ["kubernetes"], "verbs": ["get", "list", "watch"]}]},
            ])
        );
        let (_, binding) = &objects.roles[1];
        let subject = &binding.subjects.as_ref().unwrap()[0];
        assert_eq!((subject.name.as_str(), subject.namespace.as_deref()), ("cpha", Some("kube-system")));
        // Without events and in one namespace: one Role with three rules.
        let one = desired(&Grants {
            namespace: "team".into(),
            config_map: Some("m".into()),
            endpoint_slice: Some(("team".into(), "apis".into())),
            events: None,
        });
        assert_eq!(one.roles.len(), 1);
        assert_eq!(one.roles[0].0.rules.as_ref().unwrap().len(), 3);
    }

    #[test]
    fn the_endpointslice_source_reads_the_slice_and_records_events_beside_it() {
        let objects = desired(&Grants {
            namespace: "kube-system".into(),
            config_map: None,
            endpoint_slice: Some(("default".into(), "kubernetes".into())),
            events: Some("default".into()),
        });
        let rules: Vec<(String, serde_json::Value)> = objects
            .roles
            .iter()
            .map(|(r, _)| (r.metadata.namespace.clone().unwrap(), serde_json::to_value(&r.rules).unwrap()))
            .collect();
        assert_eq!(
            rules,
            [
                (
                    "kube-system".to_string(),
                    serde_json::json!([
                    {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["cpha"], "verbs": ["create"]}])
                ),
                (
                    "default".to_string(),
                    serde_json::json!([
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "resourceNames": ["kubernetes"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}])
                ),
            ]
        );
    }
}
