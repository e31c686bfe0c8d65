//! The `default/kubernetes` EndpointSlice, kept like the API server's endpoint reconciler
//! keeps it: one ready endpoint per control-plane address, port `https`.

use std::net::IpAddr;

use serde_json::{json, Value};

use crate::resources::Kind;
use crate::store::{Mutation, ObjKey, Store};
use crate::timefmt;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn slice(ips: &[IpAddr], port: u16, meta_from: Option<&Value>) -> anyhow::Result<Value> {
    let v6 = ips.iter().filter(|i| i.is_ipv6()).count();
    if v6 != 0 && v6 != ips.len() {
        anyhow::bail!("--endpoints mixes IPv4 and IPv6 addresses; one slice holds one family");
    }
    let address_type = if v6 > 0 { "IPv6" } else { "IPv4" };
    let endpoints: Vec<Value> =
        ips.iter().map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})).collect();
    let (uid, created, generation) = match meta_from {
        Some(o) => (
            o["metadata"]["uid"].clone(),
            o["metadata"]["creationTimestamp"].clone(),
            o["metadata"]["generation"].as_i64().unwrap_or(1),
        ),
        None => (Value::String(crate::ids::uid()), Value::String(timefmt::rfc3339(timefmt::now_unix())), 0),
    };
    let mut obj = json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "uid": uid,
            "generation": generation,
            "creationTimestamp": created,
            "labels": {SERVICE_NAME_LABEL: "kubernetes"},
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": [{"name": "https", "protocol": "TCP", "port": port}],
    });
    let changed = meta_from.is_none_or_spec_differs(&obj);
    if changed {
        obj["metadata"]["generation"] = (generation + 1).into();
    }
    if let Ok(d) = crate::resources::schema::decode(&obj, Kind::EndpointSlice.schema()) {
        obj = d.value;
    }
    Ok(obj)
}

trait SpecDiff {
    fn is_none_or_spec_differs(&self, new: &Value) -> bool;
}

impl SpecDiff for Option<&Value> {
    fn is_none_or_spec_differs(&self, new: &Value) -> bool {
        match self {
            None => true,
            Some(old) => Kind::EndpointSlice.spec_of(old) != Kind::EndpointSlice.spec_of(new),
        }
    }
}

/// Sets the slice to `ips` (when given) or creates it with `fallback` when it does not exist.
pub async fn kubernetes_endpoints(
    store: &Store,
    ips: Option<Vec<IpAddr>>,
    fallback: IpAddr,
    port: u16,
) -> anyhow::Result<()> {
    let key = ObjKey::new(Kind::EndpointSlice, "default", "kubernetes");
    let existing = store.get(&key);
    let ips = match (ips, &existing) {
        (Some(ips), _) => ips,
        (None, Some(_)) => return Ok(()),
        (None, None) => vec![fallback],
    };
    let obj = slice(&ips, port, existing.as_deref())?;
    store
        .mutate(&key, false, |_| Ok(Mutation::Put(obj)))
        .await
        .map_err(|e| anyhow::anyhow!("seeding default/kubernetes: {e}"))?;
    Ok(())
}
