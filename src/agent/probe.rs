//! Readiness of an apiserver: `GET /readyz` over TLS, as kube-apiserver answers it anonymously.
//! `/readyz` turns false at the start of an apiserver's shutdown, so a fallback picks members
//! that will keep answering (docs/design-notes.md#probe-readyz, design note 6).
//!
//! NOTE: the certificate is not verified here. The probe only chooses where the forward sends
//! TCP connections; every client still verifies the apiserver end to end, and the probe must
//! work before cpha has the cluster CA (the first boot).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Whether `addr` answers `GET /readyz` with 200 within `timeout`.
pub async fn readyz(addr: SocketAddr, timeout: Duration) -> bool {
    match readyz_status(addr, timeout).await {
        Ok(()) => true,
        Err(err) => {
            tracing::debug!(%addr, "readyz probe: {err}");
            false
        }
    }
}

/// `GET /readyz` on `addr`: `Ok` for 200, else what went wrong, in words.
pub async fn readyz_status(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, get_status(addr)).await {
        Ok(Ok(200)) => Ok(()),
        Ok(Ok(status)) => Err(format!("{addr} answered /readyz with HTTP {status}")),
        Ok(Err(err)) => Err(format!("{addr}: {err}")),
        Err(_) => Err(format!("{addr}: no answer within {timeout:?}")),
    }
}

/// `GET /readyz` on `addr`, told apart: ready, an apiserver that answered not ready, or
/// nothing that answered at all.
pub async fn check(addr: SocketAddr, timeout: Duration) -> super::controller::EndpointCheck {
    use super::controller::EndpointCheck;
    match tokio::time::timeout(timeout, get_status(addr)).await {
        Ok(Ok(200)) => EndpointCheck::Ready,
        Ok(Ok(status)) => EndpointCheck::NotReady(format!("{addr} answered /readyz with HTTP {status}")),
        Ok(Err(err)) => EndpointCheck::Unreachable(format!("{addr}: {err}")),
        Err(_) => EndpointCheck::Unreachable(format!("{addr}: no answer within {timeout:?}")),
    }
}

/// The members among `candidates` that are ready, probed concurrently, in the given order.
pub async fn ready_members(candidates: &[SocketAddr], timeout: Duration) -> Vec<SocketAddr> {
    let mut set = tokio::task::JoinSet::new();
    for (i, addr) in candidates.iter().copied().enumerate() {
        set.spawn(async move { (i, readyz(addr, timeout).await) });
    }
    let mut ready = vec![false; candidates.len()];
    while let Some(joined) = set.join_next().await {
        if let Ok((i, ok)) = joined {
            ready[i] = ok;
        }
    }
    candidates.iter().zip(ready).filter(|(_, ok)| *ok).map(|(a, _)| *a).collect()
}

async fn get_status(addr: SocketAddr) -> std::io::Result<u16> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = TlsConnector::from(client_config()).connect(name, tcp).await?;
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cpha\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status(&head).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP status line"))
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Accepts any certificate but still checks the handshake signatures, so the probe talks TLS
/// properly to a real apiserver.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.1 500 Internal Server Error\r\n"), Some(500));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[tokio::test]
    async fn refused_and_silent_addresses_are_not_ready() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent = listener.local_addr().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(!readyz(closed, Duration::from_secs(1)).await);
        assert!(!readyz(silent, Duration::from_millis(300)).await);
        assert!(ready_members(&[closed, silent], Duration::from_millis(300)).await.is_empty());
    }
}
