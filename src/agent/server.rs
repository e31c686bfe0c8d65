//! The agent's local HTTP port: `/metrics` (Prometheus text), `/healthz` (the agent loop is
//! alive), `/readyz` (the endpoint is carried: forward in place or handed over), `/status`
//! (the agent's state as JSON, what `cpha status` shows).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::status::AgentStatus;

/// What the HTTP handlers read; the agent loop writes it.
pub struct Shared {
    pub registry: Registry,
    pub status: RwLock<AgentStatus>,
    pub heartbeat: RwLock<Instant>,
    /// The agent loop is considered stuck when it has not beaten for this long.
    pub stale_after: Duration,
}

impl Shared {
    pub fn beat(&self) {
        *self.heartbeat.write().expect("heartbeat lock") = Instant::now();
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics and status: {e}"))
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!("status port accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&shared, &req)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!("status connection ended: {err}");
            }
        });
    }
}

fn handle(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &shared.registry) {
                Ok(()) => Response::builder()
                    .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                    .body(Full::new(Bytes::from(out)))
                    .expect("static response"),
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            }
        }
        "/healthz" | "/livez" => {
            let age = shared.heartbeat.read().expect("heartbeat lock").elapsed();
            if age <= shared.stale_after {
                text(StatusCode::OK, "ok\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, &format!("agent loop silent for {age:?}\n"))
            }
        }
        "/readyz" => {
            let status = shared.status.read().expect("status lock");
            if status.endpoint_carried {
                text(StatusCode::OK, "ok\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "the endpoint is not carried yet\n")
            }
        }
        "/status" => {
            let status = shared.status.read().expect("status lock");
            match serde_json::to_string_pretty(&*status) {
                Ok(json) => Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(json + "\n")))
                    .expect("static response"),
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz, /readyz, /status\n"),
    }
}

fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response")
}
