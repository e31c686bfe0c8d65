//! Accept loops: the TLS API listener and the plain-HTTP loopback control listener. Each
//! connection is served by hyper's HTTP/1.1 server with keep-alive; on shutdown the listeners
//! stop and open connections get a bounded time to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::http::body::Body;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

async fn serve_conn<S, F, IO>(io: IO, svc: S, shutdown: CancellationToken)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Fn(Request<Incoming>) -> F + Send + Sync + 'static + Clone,
    F: Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service_fn(svc));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            // Watches end on the same signal; anything else gets a moment to finish.
            if tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await.is_err() {
                tracing::debug!("connection did not finish in time after shutdown");
            }
        }
    }
}

/// Serves the API over TLS until `shutdown`.
pub async fn run_api(listener: TcpListener, acceptor: TlsAcceptor, app: Arc<App>, tracker: TaskTracker) {
    let shutdown = app.shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let svc = move |req| crate::http::router::serve_api(app.clone(), req);
            serve_conn(tls, svc, shutdown).await;
        });
    }
}

/// Serves the control endpoint over plain HTTP until `shutdown`.
pub async fn run_control(listener: TcpListener, app: Arc<App>, tracker: TaskTracker) {
    let shutdown = app.shutdown.clone();
    loop {
        let (tcp, _peer): (_, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let svc = move |req| crate::http::router::serve_control(app.clone(), req);
            serve_conn(tcp, svc, shutdown).await;
        });
    }
}
