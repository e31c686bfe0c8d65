//! The `endpointslice` source: the `default/kubernetes` EndpointSlice (discovery.k8s.io/v1),
//! where the apiservers publish their own addresses, with the port named `https`.
//!
//! Endpoints whose `ready` condition is false (terminating apiservers) are left out; an unset
//! condition counts as ready, as the API defines it.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::object::{self, Extracted, Target};
use super::{parse_entries, SourceEvent};
use crate::kube::KubeSettings;
use crate::members::{MemberSet, ParseOptions};

#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    namespace: &str,
    name: &str,
    port_name: &str,
    opts: &ParseOptions,
    kube: &KubeSettings,
    known: watch::Receiver<MemberSet>,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let target = Target { kind: "EndpointSlice", namespace, name };
    object::watch_named(target, kube, known, events, shutdown, |slice: &EndpointSlice| {
        extract(slice, namespace, name, port_name, opts)
    })
    .await
}

fn extract(slice: &EndpointSlice, namespace: &str, name: &str, port_name: &str, opts: &ParseOptions) -> Extracted {
    let port = slice.ports.iter().flatten().find(|p| p.name.as_deref() == Some(port_name)).and_then(|p| p.port);
    let Some(port) = port else {
        return Extracted::Missing(format!("EndpointSlice {namespace}/{name} has no port named {port_name:?}"));
    };
    let entries: Vec<String> = slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter())
        .map(|address| entry(address, port))
        .collect();
    let input = format!("{} {}", slice.address_type, entries.join(","));
    // A port outside 1-65535 makes every entry invalid, and the grammar says so.
    let parsed = parse_entries(entries.iter().map(String::as_str), opts);
    Extracted::List { input, parsed }
}

/// `address:port`, with IPv6 addresses in brackets; anything else (an FQDN slice) as written,
/// for the member grammar to accept or refuse.
fn entry(address: &str, port: i32) -> String {
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{address}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    use super::*;

    fn slice(addresses: &[(&str, Option<bool>)], ports: &[(&str, i32)]) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: Some(
                addresses
                    .iter()
                    .map(|(a, ready)| Endpoint {
                        addresses: vec![a.to_string()],
                        conditions: Some(EndpointConditions { ready: *ready, ..Default::default() }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort { name: Some(n.to_string()), port: Some(*p), ..Default::default() })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn parsed(e: Extracted) -> Result<String, String> {
        match e {
            Extracted::List { parsed, .. } => parsed.map(|s| s.to_string()).map_err(|e| e.to_string()),
            Extracted::Missing(m) => Err(format!("missing: {m}")),
        }
    }

    #[test]
    fn ready_addresses_with_the_https_port() {
        let opts = ParseOptions::default();
        let s =
            slice(&[("10.0.0.12", Some(true)), ("10.0.0.11", None), ("10.0.0.13", Some(false))], &[("https", 6443)]);
        assert_eq!(
            parsed(extract(&s, "default", "kubernetes", "https", &opts)).unwrap(),
            "10.0.0.11:6443, 10.0.0.12:6443"
        );
        let s = slice(&[("fd00::11", Some(true))], &[("metrics", 9000), ("https", 7443)]);
        assert_eq!(parsed(extract(&s, "default", "kubernetes", "https", &opts)).unwrap(), "[fd00::11]:7443");
    }

    #[test]
    fn refusals() {
        let opts = ParseOptions::default();
        let s = slice(&[("10.0.0.11", Some(true))], &[("http", 80)]);
        assert_eq!(
            parsed(extract(&s, "default", "kubernetes", "https", &opts)).unwrap_err(),
            "missing: EndpointSlice default/kubernetes has no port named \"https\""
        );
        let s = slice(&[("10.0.0.13", Some(false))], &[("https", 6443)]);
        assert!(parsed(extract(&s, "default", "kubernetes", "https", &opts)).unwrap_err().contains("empty"));
        let s = slice(&[("10.0.0.11", None), ("not an address", None)], &[("https", 6443)]);
        assert!(parsed(extract(&s, "default", "kubernetes", "https", &opts)).unwrap_err().contains("entry 2"));
        let s = slice(&[("10.0.0.11", None)], &[("https", 0)]);
        let e = parsed(extract(&s, "default", "kubernetes", "https", &opts)).unwrap_err();
        assert!(e.contains("port"), "{e}");
    }
}
