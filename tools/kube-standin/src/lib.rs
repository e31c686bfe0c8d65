//! kube-standin: a protocol-faithful stand-in for the subset of the Kubernetes API that cpha
//! uses (core/v1 ConfigMaps, discovery.k8s.io/v1 EndpointSlices, events.k8s.io/v1 Events), for
//! tests on machines where no kube-apiserver can run. See README.md for the flags, token rules and fault endpoint.

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod control;
pub mod faults;
pub mod http;
pub mod ids;
pub mod namespaces;
pub mod nonresource;
pub mod openapi;
pub mod openapi_v2;
pub mod patch;
pub mod rbac;
pub mod request_info;
pub mod resources;
pub mod seed;
pub mod selectors;
pub mod status;
pub mod store;
pub mod timefmt;
pub mod tls;
pub mod tokens;

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{App, ServeConfig};
use crate::auth::Authenticator;
use crate::cli::Cli;
use crate::faults::{DelayFault, ErrorFault, FaultRequest, FaultSet, Faults};
use crate::store::{persist, Store};

/// Why `run` stopped, mapped to an exit code by `main`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration (sysexits EX_CONFIG, 78): restarting will not help.
    #[error("configuration: {0:#}")]
    Config(anyhow::Error),
    /// A failure while serving.
    #[error("{0:#}")]
    Runtime(anyhow::Error),
    /// A second signal arrived during the drain.
    #[error("aborted by a second signal")]
    Aborted,
}

fn config<T>(r: anyhow::Result<T>) -> Result<T, RunError> {
    r.map_err(RunError::Config)
}

/// The faults requested by flags.
fn initial_faults(cli: &Cli) -> anyhow::Result<FaultSet> {
    let mut set = FaultSet {
        readyz_fail: cli.fail_readyz,
        livez_fail: cli.fail_livez,
        hang_watches: cli.hang_watches,
        watch_expired_as_http: cli.watch_expired_as_http,
        ..Default::default()
    };
    if let Some(status) = cli.error_status {
        set.errors.push(ErrorFault { status, path_prefix: cli.error_path_prefix.clone(), count: cli.error_count });
    }
    if let Some(d) = cli.delay {
        set.delay = Some(DelayFault { ms: d.0.as_millis() as u64, path_prefix: cli.delay_path_prefix.clone() });
    }
    if let Some(json) = &cli.faults {
        let req: FaultRequest = serde_json::from_str(json).context("--faults")?;
        if req.drop_watches.is_some() || req.expire_now {
            anyhow::bail!("--faults: dropWatches and expireNow act on a running server only");
        }
        let f = Faults::new(set);
        set = f.apply(&req);
    }
    Ok(set)
}

/// Runs the stand-in until SIGTERM or SIGINT.
pub async fn run(cli: Cli) -> Result<(), RunError> {
    if let Some(c) = cli.control_listen {
        if !c.ip().is_loopback() {
            return Err(RunError::Config(anyhow::anyhow!(
                "--control-listen {c}: the unauthenticated control port must be on a loopback address"
            )));
        }
    }
    let mut specs = cli.tokens.clone();
    if let Some(f) = &cli.tokens_file {
        specs.extend(config(auth::load_tokens_file(f))?);
    }
    let auth = config(Authenticator::new(specs))?;
    for k in &cli.write_kubeconfig {
        if auth.user(&k.user).is_none() {
            return Err(RunError::Config(anyhow::anyhow!(
                "--write-kubeconfig {}: no token for user {:?}",
                k.path.display(),
                k.user
            )));
        }
    }
    let faults = Faults::new(config(initial_faults(&cli))?);
    let pki = config(tls::setup(&cli.cert_dir, &cli.sans))?;
    let sa_key = config(tokens::signing_key(&cli.cert_dir))?;

    let (rv, objects, persister) = match &cli.state {
        Some(path) => {
            let loaded = config(persist::load(path))?;
            let (rv, objects) = loaded.map_or((1, Vec::new()), |s| (s.resource_version, s.objects));
            (rv, objects, Some(persist::Persister::new(path.clone())))
        }
        None => (1, Vec::new(), None),
    };
    let store = config(Store::new(rv.max(1), objects, cli.history_size, persister))?;

    let listener = TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))
        .map_err(RunError::Config)?;
    let addr = listener.local_addr().map_err(|e| RunError::Runtime(e.into()))?;

    let shutdown = CancellationToken::new();
    let app = Arc::new(App {
        store,
        auth,
        faults,
        cfg: ServeConfig {
            bookmark_interval: cli.bookmark_interval.0.max(Duration::from_millis(50)),
            min_request_timeout: cli.min_request_timeout.0,
            watch_list: !cli.disable_watch_list,
            min_token_seconds: i64::try_from(cli.min_token_duration.0.as_secs()).unwrap_or(i64::MAX).max(1),
            git_version: cli.server_version.clone(),
            advertise: addr.to_string(),
            namespaces: cli.namespaces.clone(),
            started: timefmt::now_unix(),
        },
        shutdown: shutdown.clone(),
        draining: std::sync::atomic::AtomicBool::new(false),
        sa_key,
    });

    let seed_ips = if cli.endpoints.is_empty() { None } else { Some(cli.endpoints.clone()) };
    let fallback_ip = if addr.ip().is_unspecified() { std::net::IpAddr::from([127, 0, 0, 1]) } else { addr.ip() };
    config(seed::kubernetes_endpoints(&app.store, seed_ips, fallback_ip, cli.endpoints_port).await)?;

    let server_url = cli.kubeconfig_server.clone().unwrap_or_else(|| {
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            match addr.ip() {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            }
        };
        format!("https://{host}:{}", addr.port())
    });
    for k in &cli.write_kubeconfig {
        let user = app.auth.user(&k.user).expect("checked above");
        let body = tls::kubeconfig(&server_url, &pki.ca_pem, &user.name, &user.token);
        config(
            persist::write_atomic(&k.path, body.as_bytes())
                .with_context(|| format!("writing kubeconfig {}", k.path.display())),
        )?;
    }

    let tracker = TaskTracker::new();
    let control = match cli.control_listen {
        Some(c) => {
            let l =
                TcpListener::bind(c).await.with_context(|| format!("binding control {c}")).map_err(RunError::Config)?;
            let caddr = l.local_addr().map_err(|e| RunError::Runtime(e.into()))?;
            tracing::info!("control listening {caddr}");
            Some(tokio::spawn(http::server::run_control(l, app.clone(), tracker.clone())))
        }
        None => None,
    };
    let acceptor = TlsAcceptor::from(pki.server_config.clone());
    let api = tokio::spawn(http::server::run_api(listener, acceptor, app.clone(), tracker.clone()));
    tracing::info!(
        %addr,
        ca = %pki.ca_path.display(),
        rv = app.store.current_rv(),
        "serving the Kubernetes API stand-in"
    );
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {addr}").and_then(|()| out.flush()).map_err(|e| RunError::Runtime(e.into()))?;
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| RunError::Runtime(e.into()))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        r = tokio::signal::ctrl_c() => {
            r.map_err(|e| RunError::Runtime(e.into()))?;
            tracing::info!("SIGINT: shutting down");
        }
    }
    if !cli.shutdown_delay.0.is_zero() {
        app.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(delay = ?cli.shutdown_delay.0, "/readyz fails; still serving for the shutdown delay");
        tokio::select! {
            _ = tokio::time::sleep(cli.shutdown_delay.0) => {}
            _ = term.recv() => return Err(RunError::Aborted),
            _ = tokio::signal::ctrl_c() => return Err(RunError::Aborted),
        }
    }
    shutdown.cancel();
    tracker.close();
    let drain = async {
        if let Err(e) = api.await {
            tracing::warn!(error = %e, "API listener task failed");
        }
        if let Some(c) = control {
            if let Err(e) = c.await {
                tracing::warn!(error = %e, "control listener task failed");
            }
        }
        tracker.wait().await;
    };
    tokio::select! {
        _ = drain => Ok(()),
        _ = term.recv() => Err(RunError::Aborted),
        _ = tokio::signal::ctrl_c() => Err(RunError::Aborted),
        _ = tokio::time::sleep(Duration::from_secs(8)) => {
            tracing::warn!("connections still open after the drain deadline; exiting");
            Ok(())
        }
    }
}
