//! A kube-rs [`Client`] that does not depend on the load balancer cpha manages: it sends each
//! request to one API server of a list (the known members, `https://<member>`, then the
//! configured server), stays with it while it answers, and moves on to the next after a
//! connection failure or a 5xx answer. TLS is verified against the cluster CA for the address
//! actually dialled (kubeadm puts each node's IP in its apiserver certificate).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use ::kube::client::Body;
use ::kube::{Client, Config};
use http::{HeaderValue, Request, Response};
use tokio::sync::watch;

use super::credentials::{Loaded, TokenFile};

/// The apiservers the agent knows (its member list), for talking to them directly, read again
/// whenever they change. The client needs only their `host:port`; the member list implements
/// this (`members`), so this room does not depend on the member types.
pub trait KnownServers: Send + Sync {
    /// Whether the list changed since [`KnownServers::addresses`] last read it.
    fn changed(&self) -> bool;
    /// Each server as `host:port`; marks the list as read.
    fn addresses(&mut self) -> Vec<String>;
    fn boxed(&self) -> Box<dyn KnownServers>;
}

/// A plain list, for callers that know addresses rather than members.
impl KnownServers for watch::Receiver<Vec<String>> {
    fn changed(&self) -> bool {
        self.has_changed().unwrap_or(false)
    }

    fn addresses(&mut self) -> Vec<String> {
        self.borrow_and_update().clone()
    }

    fn boxed(&self) -> Box<dyn KnownServers> {
        Box::new(self.clone())
    }
}

/// Builds a client from loaded credentials. With `direct_to_members`, the servers in `known`
/// (read again whenever it changes) are tried before the configured server.
pub fn build(loaded: Loaded, direct_to_members: bool, known: Box<dyn KnownServers>) -> Client {
    let default_namespace = loaded.config.default_namespace.clone();
    let service = Endpoints {
        shared: Arc::new(Shared {
            configured: loaded.config.cluster_url.clone(),
            base: loaded.config,
            token: loaded.token,
            direct_to_members,
            state: Mutex::new(State { known, targets: Vec::new(), current: 0, initialised: false }),
        }),
    };
    Client::new(service, default_namespace)
}

/// The tower service behind the client: picks the API server for each request.
#[derive(Clone)]
struct Endpoints {
    shared: Arc<Shared>,
}

struct Shared {
    base: Config,
    configured: http::Uri,
    token: Option<TokenFile>,
    direct_to_members: bool,
    state: Mutex<State>,
}

struct State {
    known: Box<dyn KnownServers>,
    targets: Vec<Target>,
    current: usize,
    initialised: bool,
}

struct Target {
    url: http::Uri,
    /// Built on first use: a client per server, each with the base config's CA and identity.
    client: Option<Client>,
}

impl Shared {
    /// The target for the next request: its index, URL and client, and how many targets
    /// there are.
    fn pick(&self) -> Result<(usize, http::Uri, Client, usize), ::kube::Error> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let changed = state.known.changed();
        if changed || !state.initialised {
            let members = state.known.addresses();
            let urls = target_urls(&members, &self.configured, self.direct_to_members);
            let current_url = state.targets.get(state.current).map(|t| t.url.clone());
            let mut old: Vec<Target> = std::mem::take(&mut state.targets);
            state.targets = urls
                .into_iter()
                .map(|url| {
                    let client = old.iter_mut().find(|t| t.url == url).and_then(|t| t.client.take());
                    Target { url, client }
                })
                .collect();
            // Stay with a server that still is in the list.
            state.current = current_url.and_then(|u| state.targets.iter().position(|t| t.url == u)).unwrap_or(0);
            state.initialised = true;
        }
        let index = state.current;
        let target = &mut state.targets[index];
        if target.client.is_none() {
            let mut config = self.base.clone();
            config.cluster_url = target.url.clone();
            target.client = Some(Client::try_from(config)?);
        }
        let client = target.client.clone().expect("built above");
        Ok((index, target.url.clone(), client, state.targets.len()))
    }

    /// The server at `index` failed: the next request goes to the next one.
    fn failed(&self, index: usize, url: &http::Uri, why: &dyn std::fmt::Display) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.current != index || state.targets.get(index).map(|t| &t.url) != Some(url) {
            return; // Another request already moved on.
        }
        let len = state.targets.len();
        state.current = (index + 1) % len;
        if len > 1 {
            let next = &state.targets[state.current].url;
            tracing::warn!(server = %url, next = %next, "API server failed ({why}); trying the next one");
        } else {
            tracing::debug!(server = %url, "API server failed ({why})");
        }
    }
}

/// The servers to try, in order: each member (`host:port`, when talking to members
/// directly), then the configured server, each once.
pub fn target_urls(members: &[String], configured: &http::Uri, direct_to_members: bool) -> Vec<http::Uri> {
    let mut urls: Vec<http::Uri> = Vec::new();
    if direct_to_members {
        for member in members {
            match format!("https://{member}/").parse::<http::Uri>() {
                Ok(url) if !urls.contains(&url) => urls.push(url),
                Ok(_) => {}
                Err(e) => tracing::debug!(%member, "not a URL: {e}"),
            }
        }
    }
    let configured = normalise(configured);
    if !urls.contains(&configured) {
        urls.push(configured);
    }
    urls
}

/// `https://host:port/` for comparisons (a kubeconfig server may lack the trailing slash).
fn normalise(url: &http::Uri) -> http::Uri {
    let text = format!("{}://{}/", url.scheme_str().unwrap_or("https"), url.authority().map_or("", |a| a.as_str()));
    text.parse().unwrap_or_else(|_| url.clone())
}

impl tower_service::Service<Request<Body>> for Endpoints {
    type Response = Response<Body>;
    type Error = ::kube::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, ::kube::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let mut request = request;
            let mut tried = 0;
            loop {
                let (index, url, client, targets) = shared.pick()?;
                tried += 1;
                // NOTE: a GET that failed before any answer goes to the next server at once, so
                // dead members cost one connect attempt each instead of one watcher backoff
                // step each; every server is tried once per request.
                let retry = if tried < targets { clone_get(&request) } else { None };
                if let Some(token) = &shared.token {
                    // The token file reader only keeps printable ASCII, so this does not fail on
                    // the file's content; `sensitive` keeps the value out of debug output.
                    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.token()))
                        .map_err(|e| ::kube::Error::Service(Box::new(e)))?;
                    value.set_sensitive(true);
                    request.headers_mut().insert(http::header::AUTHORIZATION, value);
                }
                match client.send(request).await {
                    Ok(response) if response.status().is_server_error() => {
                        shared.failed(index, &url, &response.status());
                        return Ok(response);
                    }
                    Ok(response) => return Ok(response),
                    Err(e) => {
                        shared.failed(index, &url, &error_chain(&e));
                        match retry {
                            Some(next) => request = next,
                            None => return Err(e),
                        }
                    }
                }
            }
        })
    }
}

/// A copy of a GET request with a body that can be copied (kube-rs's requests have one).
fn clone_get(request: &Request<Body>) -> Option<Request<Body>> {
    if request.method() != http::Method::GET {
        return None;
    }
    let body = request.body().try_clone()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// An error and its causes on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let s = cause.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_first_then_the_configured_server_once() {
        let members: Vec<String> =
            ["10.0.0.10:6443", "10.0.0.12:6443", "[fd00::11]:7443", "api.example:6443"].map(String::from).to_vec();
        let configured: http::Uri = "https://10.0.0.10:6443".parse().unwrap();
        let urls: Vec<String> = target_urls(&members, &configured, true).iter().map(ToString::to_string).collect();
        assert_eq!(
            urls,
            [
                "https://10.0.0.10:6443/",
                "https://10.0.0.12:6443/",
                "https://[fd00::11]:7443/",
                "https://api.example:6443/",
            ]
        );
        let urls: Vec<String> = target_urls(&members, &configured, false).iter().map(ToString::to_string).collect();
        assert_eq!(urls, ["https://10.0.0.10:6443/"]);
        let urls = target_urls(&[], &"https://lb.example:6443/".parse().unwrap(), true);
        assert_eq!(urls.len(), 1);
    }

    #[test]
    fn error_chain_joins_causes_once() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let outer = ::kube::Error::Service(Box::new(inner));
        assert_eq!(error_chain(&outer), "ServiceError: connection refused");
    }
}
