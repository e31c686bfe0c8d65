//! Finding credentials: the first usable kubeconfig of a list, the pod's service account, or a
//! server URL with a CA bundle and a token file. cpha starts before the cluster exists, so a
//! missing file is a reason to wait ([`Missing`]), not an error.

use std::fmt;
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::Config;

use super::settings::{Credentials, KubeSettings};

/// Largest token file read; service account tokens are about 1 KiB.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// Credentials loaded from disk, ready to build clients from.
#[derive(Debug)]
pub struct Loaded {
    /// Server, CA, client certificate and timeouts; no bearer token when [`Loaded::token`] is set.
    pub config: Config,
    /// A token file read again whenever it changes (kube-rs itself would only re-read it once a
    /// minute, so a rotated token would be refused for up to a minute).
    pub token: Option<TokenFile>,
    /// What was loaded, for log lines: a kubeconfig path, `in-cluster service account`, ...
    pub description: String,
}

/// Why no credentials could be loaded yet: one line per place looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub looked_at: Vec<String>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.looked_at.join("; "))
    }
}

impl std::error::Error for Missing {}

/// Which kubeconfig of the list comes first next time: the API refusing the credentials moves
/// on to the next one (kubeadm's `admin.conf` has no rights before its binding exists).
#[derive(Debug)]
pub struct CredentialSource {
    settings: KubeSettings,
    next: usize,
}

impl CredentialSource {
    pub fn new(settings: &KubeSettings) -> Self {
        CredentialSource { settings: settings.clone(), next: 0 }
    }

    pub fn settings(&self) -> &KubeSettings {
        &self.settings
    }

    /// Loads the credentials, or says what is missing. The candidate that loaded is remembered
    /// for [`CredentialSource::refused`].
    pub async fn load(&mut self) -> Result<Loaded, Missing> {
        let mut loaded = match &self.settings.credentials {
            Credentials::Kubeconfig(files) => {
                let files = files.clone();
                self.load_kubeconfig(&files).await?
            }
            Credentials::InCluster { dir } => {
                let dir = dir.clone();
                load_in_cluster(&dir).await?
            }
            Credentials::TokenFile { ca_file, token_file } => {
                let server = self.settings.server.clone().expect("resolve() requires server with tokenFile");
                load_token_file(server, ca_file, token_file).await?
            }
        };
        if let Some(server) = &self.settings.server {
            loaded.config.cluster_url = server.clone();
        }
        loaded.config.connect_timeout = Some(self.settings.connect_timeout);
        // NOTE: without a read timeout a list, or a watch whose response headers never come,
        // would hang for good on a dead connection. A quiet watch body is already given up by
        // the watcher 5 s after the watch timeout, and the server ends each watch at the watch
        // timeout, so a healthy connection never idles longer than this.
        loaded.config.read_timeout = Some(self.settings.watch_timeout + std::time::Duration::from_secs(5));
        Ok(loaded)
    }

    /// The API refused the credentials last loaded (401 or 403): the next load starts with the
    /// next kubeconfig of the list. Token files are read again on every change anyway.
    pub fn refused(&mut self) {
        if let Credentials::Kubeconfig(files) = &self.settings.credentials {
            if files.len() > 1 {
                self.next = (self.next + 1) % files.len();
            }
        }
    }

    /// Whether [`CredentialSource::refused`] would switch to other credentials.
    pub fn has_alternatives(&self) -> bool {
        matches!(&self.settings.credentials, Credentials::Kubeconfig(files) if files.len() > 1)
    }

    async fn load_kubeconfig(&mut self, files: &[PathBuf]) -> Result<Loaded, Missing> {
        let mut looked_at = Vec::new();
        for i in 0..files.len() {
            let index = (self.next + i) % files.len();
            let path = &files[index];
            match load_kubeconfig_file(path).await {
                Ok(config) => {
                    self.next = index;
                    return Ok(Loaded { config, token: None, description: path.display().to_string() });
                }
                Err(why) => looked_at.push(format!("{}: {why}", path.display())),
            }
        }
        Err(Missing { looked_at })
    }
}

async fn load_kubeconfig_file(path: &Path) -> Result<Config, String> {
    match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("does not exist yet".into()),
        Err(e) => return Err(format!("cannot be read: {e}")),
        Ok(_) => {}
    }
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| format!("is not a usable kubeconfig: {e}"))?;
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("is not a usable kubeconfig: {e}"))
}

/// The service account as kube-rs's `Config::incluster` reads it, from `dir` instead of the
/// fixed path, and with the token read on every change like any token file.
async fn load_in_cluster(dir: &Path) -> Result<Loaded, Missing> {
    let mut looked_at = Vec::new();
    let mut env = Vec::new();
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        match std::env::var(var) {
            Ok(value) if !value.is_empty() => env.push(value),
            _ => looked_at.push(format!("environment variable {var} is not set")),
        }
    }
    if !looked_at.is_empty() {
        return Err(Missing { looked_at });
    }
    let host = match env[0].parse::<std::net::Ipv6Addr>() {
        Ok(v6) => format!("[{v6}]"),
        Err(_) => env[0].clone(),
    };
    let url = format!("https://{host}:{}", env[1]);
    let server: http::Uri = super::settings::parse_server(&url)
        .map_err(|e| Missing { looked_at: vec![format!("KUBERNETES_SERVICE_HOST/_PORT: {e}")] })?;
    let mut loaded = load_token_file(server, &dir.join("ca.crt"), &dir.join("token")).await?;
    if let Ok(namespace) = fs::read_to_string(dir.join("namespace")) {
        loaded.config.default_namespace = namespace.trim().to_owned();
    }
    loaded.description = format!("the service account in {}", dir.display());
    Ok(loaded)
}

async fn load_token_file(server: http::Uri, ca_file: &Path, token_path: &Path) -> Result<Loaded, Missing> {
    let mut looked_at = Vec::new();
    for file in [ca_file, token_path] {
        if !file.exists() {
            looked_at.push(format!("{}: does not exist yet", file.display()));
        }
    }
    if !looked_at.is_empty() {
        return Err(Missing { looked_at });
    }
    let token = TokenFile::open(token_path).map_err(|e| Missing { looked_at: vec![e] })?;
    // A kubeconfig built in memory lets kube-rs read and check the CA bundle as it reads any
    // kubeconfig's.
    let text = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cpha", "cluster": {"server": server.to_string(), "certificate-authority": ca_file}}],
        "users": [{"name": "cpha", "user": {}}],
        "contexts": [{"name": "cpha", "context": {"cluster": "cpha", "user": "cpha"}}],
        "current-context": "cpha",
    })
    .to_string();
    let kubeconfig =
        Kubeconfig::from_yaml(&text).map_err(|e| Missing { looked_at: vec![format!("{}: {e}", ca_file.display())] })?;
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Missing { looked_at: vec![format!("{}: {e}", ca_file.display())] })?;
    // NOTE: kube-rs re-reads a CA file named here about once a minute, so a rotated cluster CA is
    // picked up without a restart.
    config.root_cert_file = Some(ca_file.to_path_buf());
    Ok(Loaded { config, token: Some(token), description: format!("token file {}", token_path.display()) })
}

/// A bearer token file, read again when its inode, size or modification time changes (a
/// kubelet-projected token is replaced through a symlink swap, which changes the inode).
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<TokenState>,
}

#[derive(Debug)]
struct TokenState {
    stamp: Stamp,
    token: crate::secret::Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl TokenFile {
    /// Reads the token now; an error says what is wrong with the file.
    pub fn open(path: &Path) -> Result<TokenFile, String> {
        let (stamp, token) = read_token(path)?;
        let token = crate::secret::Secret::new(token);
        Ok(TokenFile { path: path.to_path_buf(), state: Mutex::new(TokenState { stamp, token }) })
    }

    /// The current token: read again when the file changed; the last good one when the file
    /// cannot be read now (a token file removed after start keeps working, as in client-go).
    pub fn token(&self) -> String {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match stamp(&self.path) {
            Ok(now) if now != state.stamp => match read_token(&self.path) {
                Ok((stamp, token)) => {
                    let token = crate::secret::Secret::new(token);
                    if token != state.token {
                        tracing::info!(path = %self.path.display(), "token file changed; using the new token");
                    }
                    *state = TokenState { stamp, token };
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "token file changed but {e}; keeping the last token")
                }
            },
            Ok(_) => {}
            Err(e) => tracing::debug!(path = %self.path.display(), "token file: {e}; keeping the last token"),
        }
        state.token.expose().to_string()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn stamp(path: &Path) -> Result<Stamp, String> {
    let m = fs::metadata(path).map_err(|e| format!("cannot be read: {e}"))?;
    Ok(Stamp { dev: m.dev(), ino: m.ino(), size: m.size(), mtime: m.mtime(), mtime_nsec: m.mtime_nsec() })
}

fn read_token(path: &Path) -> Result<(Stamp, String), String> {
    let name = path.display();
    let before = stamp(path).map_err(|e| format!("{name}: {e}"))?;
    let mut text = String::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| format!("{name}: cannot be read: {e}"))?;
    if text.len() as u64 > MAX_TOKEN_BYTES {
        return Err(format!("{name}: is larger than {MAX_TOKEN_BYTES} bytes"));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{name}: is empty"));
    }
    // A header value cannot carry control characters; refuse them here with the file's name.
    if token.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(format!("{name}: holds characters a bearer token cannot have"));
    }
    Ok((before, token.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cpha-creds-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn token_file_follows_rotation_and_survives_removal() {
        let dir = tmpdir("token");
        let path = dir.join("token");
        fs::write(&path, "first\n").unwrap();
        let t = TokenFile::open(&path).unwrap();
        assert_eq!(t.token(), "first");
        // Rotation by rename, as a kubelet or a writer using a temporary file does it.
        fs::write(dir.join("new"), "second").unwrap();
        fs::rename(dir.join("new"), &path).unwrap();
        assert_eq!(t.token(), "second");
        fs::remove_file(&path).unwrap();
        assert_eq!(t.token(), "second");
        fs::write(&path, "bad token\n").unwrap();
        assert_eq!(t.token(), "second", "a token with a space is refused");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn token_file_errors_name_the_file() {
        let dir = tmpdir("token-errors");
        let path = dir.join("token");
        let err = TokenFile::open(&path).unwrap_err();
        assert!(err.contains("token: cannot be read"), "{err}");
        fs::write(&path, "  \n").unwrap();
        assert!(TokenFile::open(&path).unwrap_err().contains("is empty"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn kubeconfig_candidates_in_order_and_after_refusal() {
        let dir = tmpdir("kubeconfig");
        let (a, b) = (dir.join("admin.conf"), dir.join("super-admin.conf"));
        let settings = KubeSettings {
            credentials: Credentials::Kubeconfig(vec![a.clone(), b.clone()]),
            ..KubeSettings::default()
        };
        let mut source = CredentialSource::new(&settings);
        let missing = source.load().await.unwrap_err();
        assert_eq!(missing.looked_at.len(), 2);
        assert!(missing.to_string().contains("admin.conf: does not exist yet"), "{missing}");

        let kubeconfig = |server: &str| {
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
                 users:\n- name: u\n  user:\n    token: abc\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
                 current-context: x\n"
            )
        };
        fs::write(&b, kubeconfig("https://127.0.0.2:6443")).unwrap();
        let loaded = source.load().await.unwrap();
        assert_eq!(loaded.description, b.display().to_string());
        assert_eq!(loaded.config.cluster_url.to_string(), "https://127.0.0.2:6443/");

        fs::write(&a, kubeconfig("https://127.0.0.1:6443")).unwrap();
        // The file that worked stays first until the API refuses it.
        assert_eq!(source.load().await.unwrap().description, b.display().to_string());
        source.refused();
        assert_eq!(source.load().await.unwrap().description, a.display().to_string());

        fs::write(&a, "clusters: [").unwrap();
        let loaded = source.load().await.unwrap();
        assert_eq!(loaded.description, b.display().to_string(), "a broken file is skipped");
        assert_eq!(loaded.config.read_timeout, Some(std::time::Duration::from_secs(35)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn token_file_credentials_wait_for_both_files() {
        let dir = tmpdir("explicit");
        let (ca, token) = (dir.join("ca.crt"), dir.join("token"));
        let settings = KubeSettings {
            credentials: Credentials::TokenFile { ca_file: ca.clone(), token_file: token.clone() },
            server: Some("https://127.0.0.1:6443".parse().unwrap()),
            ..KubeSettings::default()
        };
        let mut source = CredentialSource::new(&settings);
        let missing = source.load().await.unwrap_err();
        assert_eq!(missing.looked_at.len(), 2, "{missing}");
        fs::write(&token, "t0ken").unwrap();
        let missing = source.load().await.unwrap_err();
        assert!(missing.to_string().contains("ca.crt: does not exist yet"), "{missing}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
