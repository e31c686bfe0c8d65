//! The stand-in's PKI: a CA kept in `--cert-dir` (generated on first use, shared by every
//! instance pointed at the same directory so one `ca.crt` verifies them all) and a serving
//! certificate made at each start for the requested SANs. Also writes kubeconfigs.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

const CA_CN: &str = "kube-standin-ca";

/// Serving material and the CA certificate clients need.
pub struct Pki {
    pub ca_pem: String,
    pub ca_path: PathBuf,
    pub server_config: Arc<rustls::ServerConfig>,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

/// Loads the CA key from `dir`, or creates the CA there. Concurrent first starts agree on one
/// CA: files are published with `link`, which fails if another instance got there first.
fn ca(dir: &Path) -> anyhow::Result<(KeyPair, rcgen::Certificate, String)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join("ca.key");
    let crt_path = dir.join("ca.crt");
    if !key_path.exists() {
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = ca_params().self_signed(&key).context("self-signing the CA")?;
        let pid = std::process::id();
        let tmp_key = dir.join(format!(".ca.key.{pid}"));
        let tmp_crt = dir.join(format!(".ca.crt.{pid}"));
        write_private(&tmp_key, key.serialize_pem().as_bytes())?;
        std::fs::write(&tmp_crt, cert.pem()).with_context(|| format!("writing {}", tmp_crt.display()))?;
        let won = std::fs::hard_link(&tmp_key, &key_path).is_ok();
        if won {
            std::fs::rename(&tmp_crt, &crt_path).with_context(|| format!("publishing {}", crt_path.display()))?;
        }
        // NOTE: best-effort cleanup of this instance's temporary files; a leftover is harmless.
        for p in [&tmp_key, &tmp_crt] {
            if p.exists() {
                if let Err(e) = std::fs::remove_file(p) {
                    tracing::debug!(path = %p.display(), error = %e, "removing a temporary file");
                }
            }
        }
    }
    let key_pem = std::fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem).with_context(|| format!("parsing {}", key_path.display()))?;
    // Another instance may have published the key an instant before the certificate.
    let mut ca_pem = String::new();
    for _ in 0..50 {
        match std::fs::read_to_string(&crt_path) {
            Ok(s) if !s.is_empty() => {
                ca_pem = s;
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    if ca_pem.is_empty() {
        bail!("{} exists but {} does not", key_path.display(), crt_path.display());
    }
    // The issuer used for signing: same name and key as the published CA certificate, which
    // is all a signature and the authority key identifier depend on.
    let issuer = ca_params().self_signed(&key).context("rebuilding the CA issuer")?;
    Ok((key, issuer, ca_pem))
}

fn write_private(path: &Path, body: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(body).with_context(|| format!("writing {}", path.display()))
}

/// Builds the PKI for the given extra SANs (IP addresses or DNS names).
pub fn setup(dir: &Path, sans: &[String]) -> anyhow::Result<Pki> {
    let (ca_key, ca_cert, ca_pem) = ca(dir)?;
    let mut names: Vec<String> = vec![
        "127.0.0.1".into(),
        "::1".into(),
        "localhost".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ];
    for s in sans {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-apiserver");
    p.distinguished_name = dn;
    p.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) if is_dns_name(n) => {
                n.as_str().try_into().map(SanType::DnsName).with_context(|| format!("SAN {n:?}"))
            }
            Err(_) => bail!("SAN {n:?} is neither an IP address nor a DNS name"),
        })
        .collect::<anyhow::Result<_>>()?;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().context("generating the serving key")?;
    let cert = p.signed_by(&key, &ca_cert, &ca_key).context("signing the serving certificate")?;

    let chain = vec![cert.der().clone(), CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("parsing ca.crt")?];
    let pkey = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).context("encoding the serving key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, pkey)
        .context("TLS serving certificate")?;
    // HTTP/1.1 only: clients that offer h2 fall back to it, as with any HTTP/1.1 server.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Pki { ca_pem, ca_path: dir.join("ca.crt"), server_config: Arc::new(cfg) })
}

/// A DNS name for a certificate (`*.` allowed as the first label).
fn is_dns_name(n: &str) -> bool {
    let n = n.strip_prefix("*.").unwrap_or(n);
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn yaml_quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// A kubeconfig for `user` with a bearer `token`, trusting `ca_pem`.
pub fn kubeconfig(server: &str, ca_pem: &str, user: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let ctx = format!("{user}@kube-standin");
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-standin\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\ncontexts:\n- name: {ctx}\n  context:\n    cluster: kube-standin\n    user: {user}\n    namespace: default\ncurrent-context: {ctx}\nusers:\n- name: {user}\n  user:\n    token: {token}\npreferences: {{}}\n",
        server = yaml_quote(server),
        ctx = yaml_quote(&ctx),
        user = yaml_quote(user),
        token = yaml_quote(token),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removes the directory even when an assertion fails.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn one_ca_for_a_directory() {
        let dir = TempDir(std::env::temp_dir().join(format!("kube-standin-tls-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        let a = setup(&dir.0, &["10.0.0.11".into(), "cp1.example".into()]).unwrap();
        let b = setup(&dir.0, &[]).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem, "a second start reuses the CA");
        assert!(a.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let err = setup(&dir.0, &["not a name".into()]).err().expect("refused");
        assert!(err.to_string().contains("neither an IP address nor a DNS name"), "{err:#}");
    }

    #[test]
    fn kubeconfig_embeds_ca_and_token() {
        let k = kubeconfig("https://127.0.0.1:6443", "PEM", "cpha", "tok");
        assert!(k.contains("server: \"https://127.0.0.1:6443\""));
        assert!(k.contains("certificate-authority-data: UEVN"));
        assert!(k.contains("token: \"tok\""));
    }
}
