//! The `configmap` source: one key of one ConfigMap, watched by name.

use k8s_openapi::api::core::v1::ConfigMap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::object::{self, Extracted, Target};
use super::SourceEvent;
use crate::kube::KubeSettings;
use crate::members::{parse, MemberSet, ParseOptions};

#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    namespace: &str,
    name: &str,
    key: &str,
    opts: &ParseOptions,
    kube: &KubeSettings,
    known: watch::Receiver<MemberSet>,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let target = Target { kind: "ConfigMap", namespace, name };
    object::watch_named(target, kube, known, events, shutdown, |cm: &ConfigMap| extract(cm, namespace, name, key, opts))
        .await
}

fn extract(cm: &ConfigMap, namespace: &str, name: &str, key: &str, opts: &ParseOptions) -> Extracted {
    match cm.data.as_ref().and_then(|data| data.get(key)) {
        Some(text) => Extracted::List { input: text.clone(), parsed: parse(text, opts) },
        None => Extracted::Missing(format!("ConfigMap {namespace}/{name} has no key {key:?}")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn cm(data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn reads_the_key_with_the_list_rules() {
        let opts = ParseOptions::default();
        let Extracted::List { input, parsed } =
            extract(&cm(&[("members", "- 10.0.0.1\n- 10.0.0.2\n")]), "ns", "cm", "members", &opts)
        else {
            panic!("no list")
        };
        assert_eq!(input, "- 10.0.0.1\n- 10.0.0.2\n");
        assert_eq!(parsed.unwrap().len(), 2);
        let Extracted::List { parsed, .. } = extract(&cm(&[("members", "")]), "ns", "cm", "members", &opts) else {
            panic!("no list")
        };
        let e = parsed.unwrap_err();
        assert!(e.to_string().contains("empty"), "empty is refused unless allowed: {e}");
        let Extracted::Missing(message) = extract(&cm(&[("other", "10.0.0.1")]), "ns", "cm", "members", &opts) else {
            panic!("not missing")
        };
        assert_eq!(message, "ConfigMap ns/cm has no key \"members\"");
        assert!(matches!(extract(&ConfigMap::default(), "ns", "cm", "members", &opts), Extracted::Missing(_)));
    }
}
