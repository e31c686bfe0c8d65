//! Helpers for the member-source tests: the Kubernetes API stand-in (`kube-standin`, driven
//! through its API with an admin kubeconfig), `cpha members --watch --output json` read line by
//! line, and scratch directories. Everything runs on loopback.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use cpha_lab::netns::{self, Child};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{json, Value};

pub const ADMIN_TOKEN: &str = "admin-token";
/// A token that may only get, list and watch `kube-system/cpha-members`.
pub const CPHA_TOKEN: &str = "cpha-token";
/// A token that may only read a ConfigMap of another name.
pub const OTHER_TOKEN: &str = "other-token";

pub const NS: &str = "kube-system";
pub const NAME: &str = "cpha-members";

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "cpha-members-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a scratch directory");
        Scratch(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running stand-in with an admin client; stopped on drop.
pub struct Standin {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: PathBuf,
    extra: Vec<String>,
    rt: tokio::runtime::Runtime,
    admin: Option<kube::Client>,
}

impl Standin {
    /// Starts the stand-in on 127.0.0.1 (port 0) with its CA, state and kubeconfigs in `dir`:
    /// `admin.conf` (everything), `cpha.conf` (CPHA_TOKEN), `other.conf` (OTHER_TOKEN).
    pub fn start(dir: &Path, extra: &[&str]) -> Result<Standin> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let mut s = Standin {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            rt,
            admin: None,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = netns::require_bin("kube-standin")?;
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", &self.addr.to_string()])
            .arg("--cert-dir")
            .arg(self.dir.join("pki"))
            .arg("--state")
            .arg(self.dir.join("standin-state.json"))
            .args(["--token", &format!("admin:{ADMIN_TOKEN}:*/*")])
            .args(["--token", &format!("cpha:{CPHA_TOKEN}:get,list,watch/configmaps/{NS}/{NAME}")])
            .args(["--token", &format!("other:{OTHER_TOKEN}:get,list,watch/configmaps/{NS}/someone-else")])
            .arg("--write-kubeconfig")
            .arg(format!("{}:admin", self.dir.join("admin.conf").display()))
            .args(&self.extra)
            .env("KUBE_STANDIN_LOG", "warn");
        let mut child = Child::spawn(cmd, "kube-standin")?;
        self.addr = child.listening_addr(Duration::from_secs(20))?;
        self.child = Some(child);
        let admin = self.rt.block_on(client(&self.dir.join("admin.conf")))?;
        self.admin = Some(admin);
        Ok(())
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("pki").join("ca.crt")
    }

    /// Writes a kubeconfig for `token` to `path`, pointing at `server` (default: this stand-in).
    pub fn kubeconfig(&self, path: &Path, token: &str, server: Option<&str>) -> Result<()> {
        let text = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": server.map_or_else(|| self.url(), str::to_owned),
                "certificate-authority": self.ca()}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        });
        // Written through a rename, as kubeadm writes its files.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text.to_string())?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Stops the stand-in (SIGTERM); its objects stay in its state file.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.stop(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Starts it again on the same address, with the same CA and objects.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                // The port may linger for a moment; anything else is a real failure.
                Err(e) if Instant::now() < deadline && format!("{e:#}").contains("closed its stdout") => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn admin(&self) -> kube::Client {
        self.admin.clone().expect("the stand-in runs")
    }

    /// Creates or replaces `NS/name` with `data` (keys and values).
    pub fn put_configmap(&self, name: &str, data: &[(&str, &str)]) -> Result<()> {
        let api: Api<ConfigMap> = Api::namespaced(self.admin(), NS);
        let data: BTreeMap<String, String> = data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.rt.block_on(async {
            let mut cm = match api.get_opt(name).await? {
                Some(cm) => cm,
                None => {
                    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}}))?;
                    api.create(&PostParams::default(), &cm).await?
                }
            };
            cm.data = Some(data);
            api.replace(name, &PostParams::default(), &cm).await?;
            anyhow::Ok(())
        })
    }

    /// Sets the member list in `NS/NAME`'s `members` key.
    pub fn set_members(&self, text: &str) -> Result<()> {
        self.put_configmap(NAME, &[("members", text)])
    }

    pub fn delete_configmap(&self, name: &str) -> Result<()> {
        let api: Api<ConfigMap> = Api::namespaced(self.admin(), NS);
        self.rt.block_on(api.delete(name, &DeleteParams::default()))?;
        Ok(())
    }

    /// Sets the addresses and `https` port of `default/kubernetes`.
    pub fn set_endpoints(&self, addresses: &[&str], port: u16) -> Result<()> {
        let api: Api<EndpointSlice> = Api::namespaced(self.admin(), "default");
        self.rt.block_on(async {
            let mut slice = api.get("kubernetes").await?;
            let endpoints: Vec<Value> =
                addresses.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect();
            slice.endpoints = serde_json::from_value(Value::Array(endpoints))?;
            slice.ports = serde_json::from_value(json!([{"name": "https", "protocol": "TCP", "port": port}]))?;
            api.replace("kubernetes", &PostParams::default(), &slice).await?;
            anyhow::Ok(())
        })
    }

    /// Posts to the fault endpoint (`dropWatches`, `hangWatches`, `expireNow`, ...).
    pub fn faults(&self, request: Value) -> Result<Value> {
        let req = http::Request::post("/_standin/faults")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&request)?)?;
        let answer: Value = self.rt.block_on(self.admin().request(req))?;
        Ok(answer)
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping the stand-in: {e:#}");
        }
    }
}

async fn client(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// `cpha members --watch --output json` with the given arguments, its events read line by line.
pub struct Watch {
    child: Child,
    /// Every event read so far, in order.
    pub seen: Vec<Value>,
}

/// A `cpha` command with no CPHA_* variable inherited from the environment.
pub fn cpha_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cpha"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CPHA_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args).env("CPHA_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl Watch {
    pub fn start(args: &[&str]) -> Result<Watch> {
        Watch::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Watch> {
        let mut all = vec!["members", "--watch", "--output", "json"];
        all.extend_from_slice(args);
        let child = Child::spawn(cpha_command(&all, env), "cpha members --watch")?;
        Ok(Watch { child, seen: Vec::new() })
    }

    /// The next event, waiting up to `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Result<Value> {
        let line = self.child.stdout_line(timeout)?;
        let v: Value = serde_json::from_str(&line).with_context(|| format!("cpha printed {line:?}"))?;
        self.seen.push(v.clone());
        Ok(v)
    }

    /// Reads events until one satisfies `f`, within `timeout`; returns it and the time taken.
    pub fn until(&mut self, what: &str, timeout: Duration, f: impl Fn(&Value) -> bool) -> Result<(Value, Duration)> {
        let start = Instant::now();
        loop {
            let left = timeout.checked_sub(start.elapsed()).unwrap_or_default();
            let v = self.next(left).with_context(|| format!("waiting for {what}; events so far: {:#?}", self.seen))?;
            if f(&v) {
                return Ok((v, start.elapsed()));
            }
        }
    }

    /// Waits for the set `members` (canonical entries) accepted from `origin`.
    pub fn accepted(&mut self, origin: &str, members: &[&str], timeout: Duration) -> Result<Duration> {
        let what = format!("accepted {origin} {members:?}");
        self.until(&what, timeout, |v| is_accepted(v, origin, members)).map(|(_, d)| d)
    }

    /// Waits for a problem whose message contains `text`.
    pub fn problem(&mut self, text: &str, timeout: Duration) -> Result<Value> {
        self.until(&format!("a problem with {text:?}"), timeout, |v| {
            v["event"] == "problem" && v["message"].as_str().is_some_and(|m| m.contains(text))
        })
        .map(|(v, _)| v)
    }

    /// Asserts that nothing is printed for `d`.
    pub fn quiet_for(&mut self, d: Duration) -> Result<()> {
        match self.child.stdout_line(d) {
            Ok(line) => bail!("expected no event for {d:?}, got {line}; before: {:#?}", self.seen),
            Err(_) => Ok(()),
        }
    }

    /// Stops cpha with SIGTERM and checks that it exits 0.
    pub fn stop(mut self) -> Result<()> {
        self.child.signal(15)?;
        let status = self.child.wait_timeout(Duration::from_secs(10))?.ok_or_else(|| anyhow!("cpha did not stop"))?;
        if !status.success() {
            bail!("cpha exited with {status}");
        }
        Ok(())
    }

    /// The accepted sets seen so far, as (origin, members).
    pub fn accepted_sets(&self) -> Vec<(String, Vec<String>)> {
        self.seen
            .iter()
            .filter(|v| v["event"] == "accepted")
            .map(|v| {
                let members = v["members"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_owned()).collect();
                (v["origin"].as_str().unwrap().to_owned(), members)
            })
            .collect()
    }
}

pub fn is_accepted(v: &Value, origin: &str, members: &[&str]) -> bool {
    v["event"] == "accepted" && v["origin"] == origin && v["members"] == json!(members)
}

/// Reads the member state file's members.
pub fn state_members(path: &Path) -> Result<Vec<String>> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    v["members"]
        .as_array()
        .ok_or_else(|| anyhow!("no members in {v}"))?
        .iter()
        .map(|m| m.as_str().map(str::to_owned).ok_or_else(|| anyhow!("{m} is not a string")))
        .collect()
}

/// Waits (up to 2 s) for the state file to hold `want`: it is written just after the update
/// is sent (a cache, saved off the apply path).
pub fn state_becomes(path: &Path, want: &[&str]) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let got = state_members(path).unwrap_or_default();
        if got == want {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(anyhow!("state file {} holds {got:?}, not {want:?}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
