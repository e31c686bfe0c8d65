//! The shared state every request handler sees.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::auth::{Attributes, Authenticator, BadToken, User};
use crate::faults::Faults;
use crate::store::Store;

/// Serving behaviour fixed at start.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub bookmark_interval: Duration,
    /// Watches without `timeoutSeconds` end after a random time in [this, 2 × this).
    pub min_request_timeout: Duration,
    /// Whether `sendInitialEvents` watches are served (the WatchList feature gate).
    pub watch_list: bool,
    /// The shortest TokenRequest lifetime, in seconds (600, as kube-apiserver's, unless set).
    pub min_token_seconds: i64,
    /// `v1.31.4` and the like.
    pub git_version: String,
    /// What `/api` reports in `serverAddressByClientCIDRs`.
    pub advertise: String,
    /// Namespaces that exist besides the built-in ones and those holding objects.
    pub namespaces: Vec<String>,
    /// Start time (Unix seconds): the creation time of the namespaces.
    pub started: i64,
}

impl ServeConfig {
    pub fn random_request_timeout(&self) -> Duration {
        let base = self.min_request_timeout.as_secs().max(1);
        Duration::from_secs(base + crate::ids::below(base))
    }
}

pub struct App {
    pub store: Store,
    pub auth: Authenticator,
    pub faults: Faults,
    pub cfg: ServeConfig,
    pub shutdown: CancellationToken,
    /// Set at SIGTERM: `/readyz` fails while requests are still served for the shutdown
    /// delay, as kube-apiserver does with `--shutdown-delay-duration`.
    pub draining: std::sync::atomic::AtomicBool,
    /// Signs and checks service account tokens (`crate::tokens`).
    pub sa_key: ring::hmac::Key,
}

impl App {
    /// A `--token` token, else a service account token; `Err` for a credential nobody has.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Option<Arc<User>>, BadToken> {
        match self.auth.authenticate(header) {
            Err(BadToken) => {
                let token = header.and_then(Authenticator::bearer).ok_or(BadToken)?;
                crate::tokens::authenticate(self, token).map(|u| Some(Arc::new(u))).ok_or(BadToken)
            }
            found => found,
        }
    }

    /// The token's own rules, then what RoleBindings grant.
    pub fn authorize(&self, user: &User, a: &Attributes<'_>) -> bool {
        user.can(a) || crate::rbac::allows(&self.store, user, a)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }
}
