//! `cpha identity`: the one-time provisioning step that gives the long-running agent its own
//! credentials. With admin credentials (`--kubeconfig /etc/kubernetes/admin.conf`) it creates
//! or updates the ServiceAccount `cpha` and its Roles (read the member source by name: the
//! ConfigMap and the `default/kubernetes` EndpointSlice of the drift report, or that
//! EndpointSlice alone with the `endpointSlice` source; record Events; request its own tokens)
//! in `crate::kube::identity`,
//! requests a token for it and writes it atomically (mode 600) where the agent's
//! `kubernetes.tokenFile` points. The running agent renews that token itself
//! (`crate::kube::renew`); run this again to re-issue one (after it expired, or to revoke
//! and replace): the agent reads the new token without a restart.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::members::{resolve, KubeFlags, MembersFlags};
use crate::exit::{self, Coded};
use crate::kube::identity::{self, Grants};
use crate::kube::{self, CredentialSource};
use crate::members::source::{state, SourceSettings};

#[derive(Debug, clap::Args)]
#[command(after_help = "Needs credentials that may manage ServiceAccounts, Roles and RoleBindings and request \
tokens (kubeadm's admin.conf): pass them with --kubeconfig, which replaces the credentials of the configuration \
file (those are the agent's own). What it may read is the configuration's member source (members.configMap, or \
members.endpointSlice); the token is written \
to --token-file (default: the configuration's kubernetes.tokenFile). Exit codes: 0 done, 69 no credentials or API \
in time, 78 bad configuration, 1 API failure.")]
pub struct Args {
    /// The agent's configuration file (YAML); its members: and kubernetes: sections are read.
    #[arg(long, env = "CPHA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where the token is written [default: kubernetes.tokenFile of the configuration].
    #[arg(long = "token-file", id = "identity_token_file", env = "CPHA_IDENTITY_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// How long the token is valid (the API refuses less than 10m). The running agent renews it
    /// with a token of the same lifetime when about 80 % of it has passed.
    #[arg(long, env = "CPHA_IDENTITY_DURATION", value_parser = crate::units::parse_duration, default_value = "8760h")]
    pub duration: Duration,

    /// Also allow recording Events (agent.events).
    #[arg(long, env = "CPHA_IDENTITY_EVENTS", value_name = "BOOL", num_args = 0..=1, default_value = "true",
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub events: bool,

    /// With the configMap source: the EndpointSlice the apiservers register in, read for the
    /// drift report, as NAMESPACE/NAME; empty for none.
    #[arg(
        long = "drift-endpointslice",
        env = "CPHA_IDENTITY_ENDPOINTSLICE",
        value_name = "NAMESPACE/NAME",
        default_value = "default/kubernetes"
    )]
    pub endpoint_slice: String,

    /// With the endpointSlice source: the namespace of the ServiceAccount (with the configMap
    /// source it is the ConfigMap's).
    #[arg(long, env = "CPHA_IDENTITY_NAMESPACE", value_name = "NAMESPACE", default_value = "kube-system")]
    pub namespace: String,

    /// How long to wait for credentials and the API.
    #[arg(long, value_parser = crate::units::parse_duration, default_value = "60s")]
    pub timeout: Duration,

    #[command(flatten)]
    pub members: MembersFlags,

    #[command(flatten)]
    pub kube: KubeFlags,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // NOTE: the minimum (10 minutes on kube-apiserver) is the API's to enforce, with its own
    // message: the stand-in of the renewal tests accepts seconds.
    if args.duration < Duration::from_secs(1) {
        return Err(Coded::usage("--duration must be at least 1s").into());
    }
    let endpoint_slice = match args.endpoint_slice.as_str() {
        "" => None,
        s => {
            let r: super::members::ObjectRef = s.parse().map_err(Coded::usage)?;
            Some((r.namespace, r.name))
        }
    };
    // The token file comes from the file's own kubernetes: section, read before the flags
    // replace its credentials with the admin's.
    let (_, agent_kube) = resolve(args.config.as_deref(), &args.members, &KubeFlags::default())
        .context("reading the agent's kubernetes: section")?;
    let token_file = match (&args.token_file, &agent_kube.credentials) {
        (Some(p), _) => p.clone(),
        (None, crate::kube::Credentials::TokenFile { token_file, .. }) => token_file.clone(),
        (None, _) => {
            return Err(Coded::config(
                "no --token-file, and the configuration's kubernetes: section names no tokenFile for the agent",
            )
            .into())
        }
    };
    let (members, kube) = resolve(args.config.as_deref(), &args.members, &args.kube)?;
    let (grants, reads) = match &members.source {
        SourceSettings::ConfigMap { namespace, name, .. } => {
            let drift = endpoint_slice.as_ref().map(|(n, s)| format!(" and EndpointSlice {n}/{s}")).unwrap_or_default();
            let grants = Grants {
                namespace: namespace.clone(),
                config_map: Some(name.clone()),
                endpoint_slice,
                events: args.events.then(|| namespace.clone()),
            };
            (grants, format!("ConfigMap {namespace}/{name}{drift}"))
        }
        SourceSettings::EndpointSlice { namespace, name, .. } => {
            let grants = Grants {
                namespace: args.namespace.clone(),
                config_map: None,
                endpoint_slice: Some((namespace.clone(), name.clone())),
                events: args.events.then(|| namespace.clone()),
            };
            (grants, format!("EndpointSlice {namespace}/{name}"))
        }
        _ => {
            return Err(Coded::config(format!(
                "the identity reads the member ConfigMap or EndpointSlice, but members.source is {}",
                members.source_name()
            ))
            .into())
        }
    };
    let namespace = grants.namespace.clone();
    let objects = identity::desired(&grants);
    let seconds = i64::try_from(args.duration.as_secs()).unwrap_or(i64::MAX);
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let expires = runtime.block_on(async {
        let saved = match &members.state_file {
            Some(path) => state::load(path, &members.parse).await.ok().flatten(),
            None => None,
        };
        let (_keep, known) = watch::channel(saved.or_else(|| members.seed.clone()).unwrap_or_default());
        let work = async {
            let mut source = CredentialSource::new(&kube);
            let Some(connected) = kube::connect(&mut source, &known, &CancellationToken::new(), |_| {}).await? else {
                anyhow::bail!("stopped while waiting for credentials");
            };
            identity::ensure(&connected.client, &objects).await?;
            let (token, expires) = identity::issue(&connected.client, &namespace, seconds).await?;
            crate::fsutil::write_atomic(&token_file, format!("{token}\n").as_bytes(), 0o600)
                .with_context(|| format!("writing {}", token_file.display()))?;
            anyhow::Ok(expires)
        };
        match tokio::time::timeout(args.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Coded {
                code: exit::UNAVAILABLE,
                message: format!(
                    "no answer from the API within {} (--timeout)",
                    humantime::format_duration(args.timeout)
                ),
            }
            .into()),
        }
    })?;
    println!(
        "ServiceAccount {namespace}/{} may read {reads}; token written to {} (expires {})",
        identity::NAME,
        token_file.display(),
        expires.unwrap_or_else(|| "unknown".into()),
    );
    Ok(())
}
