//! The agent's local HTTP port: `/metrics` (Prometheus text), `/healthz` (the agent loop is
//! alive), `/readyz` (the endpoint is carried: forward in place or handed over), `/status`
//! (the agent's state as JSON, what `cpha status` shows).
//!
//! The port survives abuse from whoever can reach it (any local user, on loopback): each
//! connection serves one request (no keep-alive), its headers must arrive within
//! [`Limits::header_timeout`] and fit in [`Limits::max_header_bytes`], it lives at most
//! [`Limits::connection_timeout`], and at most [`Limits::max_connections`] are open: a new one
//! beyond the cap closes the oldest, so idle or slow connections cannot starve the kubelet's
//! `/healthz` or the descriptors the agent needs to apply HAProxy's configuration.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
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

/// The status port's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub connection_timeout: Duration,
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // NOTE: a scrape or a probe is one small request; 64 connections of at most 16 KiB of
        // buffer each is under 2 MiB and 64 descriptors, whatever is thrown at the port.
        Limits {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// The open connections, oldest first, each with what closes it.
#[derive(Default)]
struct Open {
    next: u64,
    conns: VecDeque<(u64, CancellationToken)>,
    warned: Option<Instant>,
}

/// Takes a connection's place out of [`Open`] when its task ends, however it ends.
struct Slot {
    open: Arc<Mutex<Open>>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("open connections lock");
        if let Some(i) = open.conns.iter().position(|(id, _)| *id == self.id) {
            open.conns.remove(i);
        }
    }
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    serve_with(listener, shared, shutdown, Limits::default()).await;
}

pub async fn serve_with(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken, limits: Limits) {
    let open = Arc::new(Mutex::new(Open::default()));
    // NOTE: the cap bounds descriptors, not only entries: a connection's permit is released
    // when its task has dropped the socket, and a new one is accepted only with a permit. At
    // the cap the oldest connection is closed first, and its permit awaited.
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                evict_oldest(&open, limits.max_connections);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                }
            }
        };
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
        let token = shutdown.child_token();
        let slot = admit(&open, &token);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&shared, &req)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes)
                .keep_alive(false)
                .serve_connection(io, service);
            tokio::select! {
                result = connection => if let Err(err) = result {
                    tracing::debug!("status connection ended: {err}");
                },
                () = token.cancelled() => tracing::debug!("status connection closed: over the cap, or stopping"),
                () = tokio::time::sleep(limits.connection_timeout) => tracing::debug!("status connection closed: open too long"),
            }
        });
    }
}

/// Closes the oldest open connection, to make room for a new one.
fn evict_oldest(open: &Arc<Mutex<Open>>, max: usize) {
    let mut o = open.lock().expect("open connections lock");
    if let Some((_, oldest)) = o.conns.pop_front() {
        oldest.cancel();
        if o.warned.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
            o.warned = Some(Instant::now());
            tracing::warn!("status port: {max} connections open, closing the oldest for each new one");
        }
    }
}

/// Registers a new connection, newest last.
fn admit(open: &Arc<Mutex<Open>>, token: &CancellationToken) -> Slot {
    let mut o = open.lock().expect("open connections lock");
    let id = o.next;
    o.next += 1;
    o.conns.push_back((id, token.clone()));
    Slot { open: open.clone(), id }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: Limits) -> (SocketAddr, CancellationToken) {
        let shared = Arc::new(Shared {
            registry: Registry::default(),
            status: RwLock::new(AgentStatus::default()),
            heartbeat: RwLock::new(Instant::now()),
            stale_after: Duration::from_secs(3600),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve_with(listener, shared, stop.clone(), limits));
        (addr, stop)
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.expect("answered").unwrap();
        out
    }

    /// Reads until the peer closes; how long that took.
    async fn closed_within(mut s: TcpStream, bound: Duration) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(bound, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("still open after {bound:?}"),
            }
        }
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_cap_do_not_starve_healthz() {
        let limits = Limits { max_connections: 8, ..Limits::default() };
        let (addr, stop) = start(limits).await;
        let mut idle = Vec::new();
        for _ in 0..40 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let answer = get(addr, "/healthz").await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"), "{answer}");
        // The oldest idle connections were closed to make room; the newest still wait.
        let first = idle.remove(0);
        assert!(closed_within(first, Duration::from_secs(2)).await < Duration::from_secs(2));
        stop.cancel();
    }

    #[tokio::test]
    async fn half_sent_headers_are_cut_at_the_header_timeout() {
        let limits = Limits { header_timeout: Duration::from_millis(500), ..Limits::default() };
        let (addr, stop) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        let took = closed_within(s, Duration::from_secs(5)).await;
        assert!(took >= Duration::from_millis(400), "closed before the timeout: {took:?}");
        // A connection that sends nothing at all is cut the same way.
        let silent = TcpStream::connect(addr).await.unwrap();
        closed_within(silent, Duration::from_secs(5)).await;
        stop.cancel();
    }

    #[tokio::test]
    async fn oversized_headers_are_refused_without_buffering_them() {
        let (addr, stop) = start(Limits::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let filler = format!("X-Fill: {}\r\n", "a".repeat(1000));
        let mut refused = false;
        for _ in 0..400 {
            if s.write_all(filler.as_bytes()).await.is_err() {
                refused = true;
                break;
            }
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("closed");
        let out = String::from_utf8_lossy(&out);
        assert!(refused || out.starts_with("HTTP/1.1 431"), "{out}");
        stop.cancel();
    }

    #[tokio::test]
    async fn one_request_per_connection() {
        let (addr, stop) = start(Limits::default()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let took = closed_within(s, Duration::from_secs(5)).await;
        assert!(took < Duration::from_secs(5));
        stop.cancel();
    }
}
