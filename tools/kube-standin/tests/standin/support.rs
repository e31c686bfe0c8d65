//! Test support: starts the real `kube-standin` binary on 127.0.0.1:0 in a scratch directory
//! and talks to it over TLS with the CA it wrote, through hyper's client.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub const ADMIN: &str = "admin-token";
pub const CPHA: &str = "cpha-token";

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "kube-standin-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running stand-in; killed on drop.
pub struct Standin {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub stderr_path: PathBuf,
    tls: TlsConnector,
    extra_stdout: Arc<std::sync::Mutex<Vec<String>>>,
}

/// The flags every test server gets: an admin token and cpha's narrow token.
pub fn base_args(dir: &Path) -> Vec<String> {
    vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--cert-dir".into(),
        dir.join("certs").display().to_string(),
        "--token".into(),
        format!("admin:{ADMIN}:*/*"),
        "--token".into(),
        format!("cpha:{CPHA}:get,list,watch/configmaps/kube-system/cpha-members"),
        "--log".into(),
        "debug".into(),
    ]
}

impl Standin {
    /// Starts the binary with `base_args` plus `extra`.
    pub fn start(dir: &Path, extra: &[&str]) -> Standin {
        let mut args = base_args(dir);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with(dir, &args)
    }

    pub fn start_with(dir: &Path, args: &[String]) -> Standin {
        static N: AtomicU32 = AtomicU32::new(0);
        let stderr_path = dir.join(format!("stderr-{}.log", N.fetch_add(1, Ordering::SeqCst)));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_kube-standin"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn kube-standin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let extra_stdout = Arc::new(std::sync::Mutex::new(Vec::new()));
        let extra = extra_stdout.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Anything more on stdout breaks the one-line contract: collected, checked on drop.
            for l in lines.map_while(Result::ok) {
                extra.lock().unwrap().push(l);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(Ok(l))) => l,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "kube-standin did not print its address ({other:?}); stderr:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
        };
        let addr: SocketAddr = line
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        let ca = std::fs::read(dir.join("certs/ca.crt")).expect("ca.crt written");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(&ca).expect("ca pem")).expect("add CA");
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Standin { child: Some(child), addr, stderr_path, tls: TlsConnector::from(Arc::new(cfg)), extra_stdout }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let st = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().expect("run kill");
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(s) = c.try_wait().expect("try_wait") {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        panic!("kube-standin did not exit within 15 s of SIGTERM");
    }

    async fn connect(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        let tls = self.tls.connect(ServerName::try_from("localhost").unwrap(), tcp).await.expect("TLS handshake");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("HTTP handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
    }

    /// Sends one request on a fresh connection and returns the response head and body stream.
    pub async fn send(&self, r: Req<'_>) -> Response<Incoming> {
        let mut sender = self.connect().await;
        let mut b = Request::builder().method(r.method).uri(r.path).header("Host", "localhost");
        if let Some(t) = r.token {
            b = b.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(ct) = r.content_type {
            b = b.header("Content-Type", ct);
        }
        if let Some(a) = r.accept {
            b = b.header("Accept", a);
        }
        let req = b.body(Full::new(Bytes::from(r.body.unwrap_or_default()))).expect("request");
        tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
            .await
            .expect("response within 20 s")
            .expect("response")
    }

    /// A whole request/response exchange.
    pub async fn call(&self, r: Req<'_>) -> Resp {
        let resp = self.send(r).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
            .await
            .expect("body within 20 s")
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp { status, headers, text, json }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.call(Req::new("GET", path).token(token)).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.call(Req::new("POST", path).token(token).json(body)).await
    }

    pub async fn put(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.call(Req::new("PUT", path).token(token).json(body)).await
    }

    pub async fn patch(&self, path: &str, token: &str, ct: &str, body: &str) -> Resp {
        self.call(Req::new("PATCH", path).token(token).content_type(ct).body(body.as_bytes().to_vec())).await
    }

    pub async fn delete(&self, path: &str, token: &str, body: Option<&Value>) -> Resp {
        let mut r = Req::new("DELETE", path).token(token);
        if let Some(b) = body {
            r = r.json(b);
        }
        self.call(r).await
    }

    /// POSTs a fault request with the admin token.
    pub async fn faults(&self, body: Value) -> Resp {
        let r = self.post("/_standin/faults", ADMIN, &body).await;
        assert_eq!(r.status, 200, "fault request: {}", r.text);
        r
    }

    /// Opens a watch.
    pub async fn watch(&self, path: &str, token: &str) -> Watch {
        self.watch_req(Req::new("GET", path).token(token)).await
    }

    pub async fn watch_req(&self, r: Req<'_>) -> Watch {
        let path = r.path.to_string();
        let resp = self.send(r).await;
        assert_eq!(resp.status(), 200, "watch {path} not accepted");
        Watch { body: resp.into_body(), buf: Vec::new() }
    }

    /// Creates a ConfigMap with the admin token and returns it.
    pub async fn create_cm(&self, ns: &str, name: &str, data: Value) -> Value {
        let r = self
            .post(
                &format!("/api/v1/namespaces/{ns}/configmaps"),
                ADMIN,
                &serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}),
            )
            .await;
        assert_eq!(r.status, 201, "create {ns}/{name}: {}", r.text);
        r.json
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- kube-standin stderr ---\n{}", self.stderr());
        } else {
            let extra = self.extra_stdout.lock().unwrap();
            assert!(extra.is_empty(), "kube-standin printed more than one stdout line: {extra:?}");
        }
    }
}

pub struct Req<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub token: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub accept: Option<&'a str>,
    pub body: Option<Vec<u8>>,
}

impl<'a> Req<'a> {
    pub fn new(method: &'a str, path: &'a str) -> Self {
        Req { method, path, token: None, content_type: None, accept: None, body: None }
    }
    pub fn token(mut self, t: &'a str) -> Self {
        self.token = Some(t);
        self
    }
    pub fn content_type(mut self, c: &'a str) -> Self {
        self.content_type = Some(c);
        self
    }
    pub fn accept(mut self, a: &'a str) -> Self {
        self.accept = Some(a);
        self
    }
    pub fn body(mut self, b: Vec<u8>) -> Self {
        self.body = Some(b);
        self
    }
    pub fn json(mut self, v: &Value) -> Self {
        self.content_type = Some("application/json");
        self.body = Some(serde_json::to_vec(v).unwrap());
        self
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Resp {
    pub fn rv(&self) -> u64 {
        rv_of(&self.json)
    }
    /// Asserts a Status object with this code and reason.
    #[track_caller]
    pub fn assert_status(&self, code: u16, reason: &str) {
        assert_eq!(self.status, code, "{}", self.text);
        assert_eq!(self.json["kind"], "Status", "{}", self.text);
        assert_eq!(self.json["apiVersion"], "v1", "{}", self.text);
        assert_eq!(self.json["status"], "Failure", "{}", self.text);
        assert_eq!(self.json["reason"], reason, "{}", self.text);
        assert_eq!(self.json["code"], code, "{}", self.text);
        assert_eq!(self.headers.get("content-type").map(|v| v.to_str().unwrap()), Some("application/json"));
    }
}

pub fn rv_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {v}"))
}

/// What the next read of a watch found.
#[derive(Debug)]
pub enum Next {
    Event(Value),
    /// The response ended cleanly.
    End,
    /// The connection broke mid-response.
    Broken(String),
    /// Nothing within the time given.
    Quiet,
}

pub struct Watch {
    body: Incoming,
    buf: Vec<u8>,
}

impl Watch {
    pub async fn next(&mut self, within: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let v: Value =
                    serde_json::from_slice(&line).unwrap_or_else(|e| panic!("watch line is not JSON ({e}): {line:?}"));
                return Next::Event(v);
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return Next::Quiet,
                Ok(None) => {
                    assert!(self.buf.is_empty(), "partial line at end: {:?}", self.buf);
                    return Next::End;
                }
                Ok(Some(Err(e))) => return Next::Broken(e.to_string()),
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
            }
        }
    }

    /// The next event, which must arrive within `within`.
    #[track_caller]
    pub fn expect(&mut self, within: Duration) -> impl std::future::Future<Output = Value> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            match self.next(within).await {
                Next::Event(v) => v,
                other => panic!("{caller}: expected a watch event, got {other:?}"),
            }
        }
    }

    /// The next non-BOOKMARK event.
    pub async fn expect_change(&mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Next::Event(v) if v["type"] == "BOOKMARK" => continue,
                Next::Event(v) => return v,
                other => panic!("expected a watch event, got {other:?}"),
            }
        }
    }
}

pub const SEC: Duration = Duration::from_secs(1);
