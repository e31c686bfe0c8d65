//! Reaching the Kubernetes API: credentials, client construction and talking to the members
//! directly.
//!
//! - `settings`: the `kubernetes:` configuration section ([`KubernetesConfig`] as written,
//!   [`KubeSettings`] once validated).
//! - `credentials`: a list of kubeconfig files tried in order, the pod's service account, or a
//!   server URL with a CA file and a token file that is read again whenever it changes.
//! - `client`: a kube-rs [`Client`](::kube::Client) whose requests go to the known members
//!   (`https://<member>`) before the configured server, moving on when one fails, so cpha
//!   never needs the load balancer it manages to reach the API.
//! - `identity`: the agent's least-privilege ServiceAccount, its Roles and a token for it
//!   (`cpha identity`).
//! - `renew`: the running agent renewing that token itself before it expires.
//!
//! cpha starts before the cluster exists: [`connect`] waits for the credentials to appear
//! (polling, with a log line that names what it waits for) instead of failing.

pub mod client;
pub mod credentials;
pub mod identity;
pub mod renew;
pub mod settings;

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use self::client::KnownServers;
pub use self::credentials::{CredentialSource, Loaded, Missing, TokenFile};
pub use self::settings::{Credentials, KubeConfigError, KubeSettings, KubernetesConfig};
use crate::exit::{self, Coded};

/// How often a wait that goes on is logged again.
const WAIT_REMINDER: Duration = Duration::from_secs(60);

/// A client and the credentials it uses.
pub struct Connected {
    pub client: ::kube::Client,
    /// Which credentials: a kubeconfig path, a token file, the in-cluster service account.
    pub credentials: String,
}

/// Loads credentials, waiting for them when `waitForCredentials` is on, and builds a client.
///
/// `on_wait` is called when the wait starts and whenever what is missing changes. `Ok(None)`
/// when `shutdown` fired first. Without waiting, missing credentials are an error that exits
/// with EX_UNAVAILABLE.
pub async fn connect(
    source: &mut CredentialSource,
    known: &dyn KnownServers,
    shutdown: &CancellationToken,
    mut on_wait: impl FnMut(&Missing),
) -> anyhow::Result<Option<Connected>> {
    let mut last: Option<(Missing, Instant)> = None;
    loop {
        let settings = source.settings().clone();
        match source.load().await {
            Ok(loaded) => {
                if last.is_some() {
                    tracing::info!(credentials = %loaded.description, "credentials found");
                }
                tracing::debug!(
                    credentials = %loaded.description,
                    server = %loaded.config.cluster_url,
                    direct_to_members = settings.direct_to_members,
                    "connecting to the API"
                );
                let credentials = loaded.description.clone();
                let client = client::build(loaded, settings.direct_to_members, known.boxed());
                return Ok(Some(Connected { client, credentials }));
            }
            Err(missing) => {
                if !settings.wait_for_credentials {
                    return Err(Coded {
                        code: exit::UNAVAILABLE,
                        message: format!("no Kubernetes credentials: {missing}"),
                    }
                    .into());
                }
                match &last {
                    Some((previous, since)) if *previous == missing => {
                        if since.elapsed() >= WAIT_REMINDER {
                            tracing::info!("still waiting for Kubernetes credentials: {missing}");
                            last = Some((missing, Instant::now()));
                        }
                    }
                    _ => {
                        tracing::info!(
                            "waiting for Kubernetes credentials (checking every {}): {missing}",
                            humantime::format_duration(settings.poll_interval)
                        );
                        on_wait(&missing);
                        last = Some((missing, Instant::now()));
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(None),
                    () = tokio::time::sleep(settings.poll_interval) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_credentials_without_waiting_exit_unavailable() {
        let dir = std::env::temp_dir().join(format!("cpha-connect-{}", std::process::id()));
        let settings = KubeSettings {
            credentials: Credentials::Kubeconfig(vec![dir.join("admin.conf")]),
            wait_for_credentials: false,
            ..KubeSettings::default()
        };
        let (_tx, known) = tokio::sync::watch::channel(Vec::<String>::new());
        let mut waits = 0;
        let result =
            connect(&mut CredentialSource::new(&settings), &known, &CancellationToken::new(), |_| waits += 1).await;
        let err = result.err().expect("no credentials");
        assert_eq!(exit::code_for(&err), exit::UNAVAILABLE);
        assert!(err.to_string().contains("admin.conf: does not exist yet"), "{err}");
        assert_eq!(waits, 0);
    }

    #[tokio::test]
    async fn waiting_reports_once_and_stops_at_shutdown() {
        let dir = std::env::temp_dir().join(format!("cpha-connect-wait-{}", std::process::id()));
        let settings = KubeSettings {
            credentials: Credentials::Kubeconfig(vec![dir.join("admin.conf")]),
            poll_interval: Duration::from_millis(50),
            ..KubeSettings::default()
        };
        let (_tx, known) = tokio::sync::watch::channel(Vec::<String>::new());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.cancel();
        });
        let mut waits = Vec::new();
        let result =
            connect(&mut CredentialSource::new(&settings), &known, &shutdown, |m| waits.push(m.to_string())).await;
        assert!(matches!(result, Ok(None)), "shutdown ends the wait");
        assert_eq!(waits.len(), 1, "the same missing file is reported once: {waits:?}");
    }
}
