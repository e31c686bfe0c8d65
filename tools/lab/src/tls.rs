//! TLS for the HTTPS clients: rustls with the ring provider, blocking I/O.
//!
//! With a CA file the server certificate is verified against it (and the server name); without
//! one any certificate is accepted, since the Kubernetes API stand-in makes a new CA per test run,
//! but the handshake signatures are still verified, so the server must hold the key of the
//! certificate it presents. Every connection makes a full handshake: session resumption is off,
//! so a stream of new connections measures what a client without a session cache costs.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How the server certificate is checked.
#[derive(Clone, Debug)]
pub enum Verify<'a> {
    /// Against the CA certificates of this PEM file, for the server name.
    Ca(&'a Path),
    /// Any certificate; handshake signatures are still verified.
    AnyCertificate,
}

/// A client configuration offering HTTP/1.1 by ALPN, without session resumption.
pub fn client_config(verify: Verify<'_>) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let mut config = match verify {
        Verify::Ca(path) => builder.with_root_certificates(roots(path)?).with_no_client_auth(),
        Verify::AnyCertificate => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The CA certificates of a PEM file (at least one).
fn roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).with_context(|| format!("reading {}", path.display()))?;
    for cert in certs {
        let cert = cert.with_context(|| format!("parsing {}", path.display()))?;
        roots.add(cert).with_context(|| format!("a CA certificate of {}", path.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(roots)
}

/// The name to verify and send as SNI: `name` when given (a DNS name or an IP), otherwise the
/// IP address connected to.
pub fn server_name(name: Option<&str>, to: IpAddr) -> Result<ServerName<'static>> {
    match name {
        Some(name) => ServerName::try_from(name.to_string()).with_context(|| format!("server name {name:?}")),
        None => Ok(ServerName::from(to)),
    }
}

/// The `Host` header for a request to `to` verified as `name`.
pub fn host_header(name: Option<&str>, to: SocketAddr) -> String {
    match name {
        Some(name) => name.to_string(),
        None => to.to_string(),
    }
}

/// Accepts any server certificate, but checks the handshake signatures with it.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A short name for a TLS failure carried by an I/O error (rustls reports its errors as
/// `InvalidData` wrapping a [`rustls::Error`]), to count failures by kind; `None` for other
/// errors.
pub fn error_kind(err: &io::Error) -> Option<&'static str> {
    let tls = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => "certificate",
        rustls::Error::AlertReceived(_) => "alert",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        _ => "protocol",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_default_to_the_address() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(server_name(None, ip).unwrap(), ServerName::from(ip));
        assert_eq!(server_name(Some("kubernetes"), ip).unwrap().to_str(), "kubernetes");
        assert_eq!(server_name(Some("::1"), ip).unwrap(), ServerName::from("::1".parse::<IpAddr>().unwrap()));
        let err = server_name(Some("not a name"), ip).unwrap_err().to_string();
        assert!(err.contains("server name \"not a name\""), "{err}");
        let to: SocketAddr = "[::1]:6443".parse().unwrap();
        assert_eq!(host_header(None, to), "[::1]:6443");
        assert_eq!(host_header(Some("kubernetes"), to), "kubernetes");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let path = std::env::temp_dir().join(format!("cpha-lab-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = client_config(Verify::Ca(&path)).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(format!("{err:#}").contains("holds no PEM certificate"), "{err:#}");
        let err = client_config(Verify::Ca(Path::new("/nonexistent/ca.crt"))).unwrap_err();
        assert!(format!("{err:#}").contains("reading /nonexistent/ca.crt"), "{err:#}");
        assert!(client_config(Verify::AnyCertificate).is_ok());
    }

    #[test]
    fn tls_errors_are_named() {
        let err = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(error_kind(&err), Some("protocol"));
        let err = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(error_kind(&err), Some("certificate"));
        assert_eq!(error_kind(&io::Error::from(io::ErrorKind::TimedOut)), None);
    }
}
