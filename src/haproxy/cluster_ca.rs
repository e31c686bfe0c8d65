//! The cluster CA file, as the checks' `ca-file` would use it (`healthCheck.clusterCaFile`):
//! absent, usable, or there but not usable. A fact read at render time, and read again every
//! time the agent reads HAProxy's backend, so a CA that appears (kubeadm init or join, after
//! cpha started) is noticed within one `handover.interval`.
//!
//! Idle, a read costs one `stat`: the file is read and parsed again only when its inode, size
//! or modification time changed. "Usable" is decided here rather than by `haproxy -c` alone:
//! kubeadm writes the file with client-go's `cert.WriteCert`, an `os.WriteFile` in place (truncate,
//! then write), so it can be seen empty or half written, and a candidate naming it would be refused; the checks then keep working
//! without verification instead of every apply failing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::CertificateDer;

pub use super::settings::CaState;

/// The largest CA bundle read; kubeadm's CA is one certificate of about 1 KiB.
const MAX_LEN: u64 = 1 << 20;

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The file's state, re-read only when it changed.
#[derive(Debug)]
pub struct ClusterCa {
    path: PathBuf,
    seen: Option<(Stamp, CaState)>,
}

impl ClusterCa {
    pub fn new(path: impl Into<PathBuf>) -> ClusterCa {
        ClusterCa { path: path.into(), seen: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state now: a `stat`, and a read only if the file changed since the last call.
    pub fn read(&mut self) -> CaState {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.seen = None;
                return CaState::Absent;
            }
            Err(e) => {
                self.seen = None;
                return CaState::Invalid(format!("cannot stat it: {e}"));
            }
        };
        let stamp = Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        };
        if let Some((seen, state)) = &self.seen {
            if *seen == stamp {
                return state.clone();
            }
        }
        let state = state_of(&self.path, &meta);
        self.seen = Some((stamp, state.clone()));
        state
    }
}

/// Reads the file once, without a cache (`cpha render`, `cpha check-config`).
pub fn read_once(path: &Path) -> CaState {
    ClusterCa::new(path).read()
}

fn state_of(path: &Path, meta: &std::fs::Metadata) -> CaState {
    if !meta.is_file() {
        return CaState::Invalid("not a regular file".into());
    }
    if meta.len() > MAX_LEN {
        return CaState::Invalid(format!("larger than {MAX_LEN} bytes"));
    }
    match std::fs::read(path) {
        Ok(bytes) => validate(&bytes),
        Err(e) => CaState::Invalid(format!("cannot read it: {e}")),
    }
}

/// Usable when the text holds at least one certificate and every certificate in it is a valid
/// trust anchor (what OpenSSL needs to load it as a `ca-file`).
pub fn validate(bytes: &[u8]) -> CaState {
    let mut roots = rustls::RootCertStore::empty();
    let mut count = 0usize;
    for (i, item) in <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes).enumerate() {
        match item {
            Ok((SectionKind::Certificate, der)) => {
                count += 1;
                if let Err(e) = roots.add(CertificateDer::from(der)) {
                    return CaState::Invalid(format!("PEM section {} is not a valid certificate: {e}", i + 1));
                }
            }
            Ok(_) => {}
            Err(e) => return CaState::Invalid(format!("not PEM: {e}")),
        }
    }
    if count == 0 {
        return CaState::Invalid("no certificate in it".into());
    }
    CaState::Usable { fingerprint: fingerprint(bytes) }
}

/// 64-bit FNV-1a of the file, as 16 hex digits: it only tells two contents apart (as the
/// rendering's digest does), it proves nothing.
fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated_ca() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "kubernetes");
        params.self_signed(&key).unwrap().pem().into_bytes()
    }

    #[test]
    fn absent_then_appearing_then_broken() {
        let dir = std::env::temp_dir().join(format!("cpha-cluster-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ca.crt");
        let mut ca = ClusterCa::new(&path);
        assert_eq!(ca.read(), CaState::Absent);
        let good = generated_ca();
        std::fs::write(&path, &good).unwrap();
        assert!(matches!(ca.read(), CaState::Usable { .. }));
        let first = ca.read();
        assert_eq!(ca.read(), first, "unchanged: the cached state");
        // Half written, as kubeadm's plain write can be seen.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(matches!(ca.read(), CaState::Invalid(_)));
        std::fs::write(&path, "").unwrap();
        assert!(matches!(ca.read(), CaState::Invalid(why) if why.contains("no certificate")), "{:?}", ca.read());
        std::fs::write(&path, &good).unwrap();
        assert_eq!(ca.read(), first, "the same content again");
        std::fs::write(&path, generated_ca()).unwrap();
        let rotated = ca.read();
        assert!(matches!(rotated, CaState::Usable { .. }) && rotated != first, "{rotated:?}");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(ca.read(), CaState::Absent);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_whole_certificates_are_usable() {
        let good = generated_ca();
        assert!(matches!(validate(&good), CaState::Usable { .. }));
        let two = [good.clone(), generated_ca()].concat();
        assert!(matches!(validate(&two), CaState::Usable { .. }));
        assert!(matches!(validate(b"hello\n"), CaState::Invalid(_)));
        // A certificate section whose content is not a certificate.
        let bogus = b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
        assert!(matches!(validate(bogus), CaState::Invalid(why) if why.contains("not a valid certificate")));
        assert!(matches!(validate(&[good, bogus.to_vec()].concat()), CaState::Invalid(_)));
    }
}
