//! The real kubectl against the stand-in: get, apply (client-side, three-way strategic merge
//! with the last-applied annotation), edit, patch (strategic, merge, JSON), get -w, RBAC
//! denials, and the events.k8s.io Events kube-rs's Recorder posts. kubectl must be installed: these tests fail, never skip, without it.
//!
//! `KUBECTL` names the binary (default: `kubectl` on PATH). To try another client (an older
//! kubectl, say), run these tests again with `KUBECTL` set to it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

const CM: &str = "/api/v1/namespaces/kube-system/configmaps";

fn kubectl_binary() -> PathBuf {
    if let Some(k) = std::env::var_os("KUBECTL") {
        return PathBuf::from(k);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("kubectl is not installed (not on PATH and KUBECTL is unset): the kubectl tests cannot run and fail instead of skipping")
        })
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    home: PathBuf,
}

impl Kubectl {
    fn new(bin: PathBuf, dir: &Path, user: &str) -> Kubectl {
        let home = dir.join(format!("home-{user}"));
        std::fs::create_dir_all(&home).unwrap();
        Kubectl { bin, kubeconfig: dir.join(format!("{user}.kubeconfig")), home }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.home)
            .env_remove("KUBE_EDITOR")
            .env_remove("EDITOR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs kubectl to completion (killed after 60 s).
    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn kubectl");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                return child.wait_with_output().expect("kubectl output");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("kubectl output");
                panic!("kubectl {args:?} did not finish in 60 s: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    /// Runs kubectl, which must succeed; returns stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn start(dir: &Path) -> Standin {
    Standin::start(
        dir,
        &[
            "--endpoints",
            "10.0.0.11,10.0.0.12",
            "--write-kubeconfig",
            &format!("{}:admin", dir.join("admin.kubeconfig").display()),
            "--write-kubeconfig",
            &format!("{}:cpha", dir.join("cpha.kubeconfig").display()),
        ],
    )
}

async fn data(s: &Standin, name: &str) -> Value {
    let r = s.get(&format!("{CM}/{name}"), ADMIN).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_apply_edit_patch_delete() {
    let dir = Scratch::new("kubectl");
    let s = start(dir.path());
    let k = Kubectl::new(kubectl_binary(), dir.path(), "admin");

    let v: Value = serde_json::from_str(&k.ok(&["version", "-o", "json"])).unwrap();
    assert_eq!(v["serverVersion"]["gitVersion"], "v1.31.4");
    let out = k.run(&["get", "configmaps", "-n", "kube-system"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("No resources found in kube-system namespace."));

    // Client-side apply: create, configure, no-op, and a removed key.
    let manifest = dir.path().join("cm.yaml");
    let write = |members: &str, extra: &str| {
        std::fs::write(
            &manifest,
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cpha-members\n  namespace: kube-system\ndata:\n  members: \"{members}\"\n{extra}"),
        )
        .unwrap();
    };
    let m = manifest.to_str().unwrap();
    write("10.0.0.11:6443", "  extra: \"1\"\n");
    assert_eq!(k.ok(&["apply", "-f", m]).trim(), "configmap/cpha-members created");
    assert_eq!(data(&s, "cpha-members").await, json!({"extra": "1", "members": "10.0.0.11:6443"}));
    write("10.0.0.11:6443,10.0.0.12:6443", "");
    assert_eq!(k.ok(&["apply", "-f", m]).trim(), "configmap/cpha-members configured");
    assert_eq!(
        data(&s, "cpha-members").await,
        json!({"members": "10.0.0.11:6443,10.0.0.12:6443"}),
        "the three-way patch removed the key dropped from the manifest"
    );
    let r = s.get(&format!("{CM}/cpha-members"), ADMIN).await;
    let last = r.json["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
        .as_str()
        .expect("last-applied annotation");
    assert!(last.contains("10.0.0.12:6443"));
    let rv_before = r.rv();
    assert_eq!(k.ok(&["apply", "-f", m]).trim(), "configmap/cpha-members unchanged");
    assert_eq!(s.get(&format!("{CM}/cpha-members"), ADMIN).await.rv(), rv_before);

    // Server-side printing.
    let table = k.ok(&["get", "cm", "-n", "kube-system"]);
    let lines: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines[0], ["NAME", "DATA", "AGE"], "{table}");
    assert_eq!(&lines[1][..2], ["cpha-members", "1"], "{table}");
    let es = k.ok(&["get", "endpointslices", "-n", "default"]);
    assert!(es.contains("kubernetes") && es.contains("10.0.0.11,10.0.0.12") && es.contains("6443"), "{es}");
    let got: Value =
        serde_json::from_str(&k.ok(&["get", "cm", "cpha-members", "-n", "kube-system", "-o", "json"])).unwrap();
    assert_eq!(got["metadata"]["resourceVersion"], rv_before.to_string());

    // kubectl edit with an editor that rewrites the file.
    let editor = dir.path().join("editor.sh");
    std::fs::write(&editor, "#!/bin/sh\nsed -i 's/10.0.0.12:6443/10.0.0.13:6443/' \"$1\"\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&editor, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out =
        k.run_env(&["edit", "cm", "cpha-members", "-n", "kube-system"], &[("KUBE_EDITOR", editor.to_str().unwrap())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "configmap/cpha-members edited");
    assert_eq!(data(&s, "cpha-members").await["members"], "10.0.0.11:6443,10.0.0.13:6443");

    // kubectl patch of each type.
    k.ok(&["patch", "cm", "cpha-members", "-n", "kube-system", "-p", r#"{"data":{"s":"1"}}"#]);
    k.ok(&[
        "patch",
        "cm",
        "cpha-members",
        "-n",
        "kube-system",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"m":"2","s":null}}"#,
    ]);
    k.ok(&[
        "patch",
        "cm",
        "cpha-members",
        "-n",
        "kube-system",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/data/m","value":"3"}]"#,
    ]);
    assert_eq!(data(&s, "cpha-members").await, json!({"m": "3", "members": "10.0.0.11:6443,10.0.0.13:6443"}));

    // Errors read as they do against a real server.
    let out = k.run(&["get", "cm", "nope", "-n", "kube-system"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("configmaps \"nope\" not found"));
    let cpha = Kubectl::new(kubectl_binary(), dir.path(), "cpha");
    let got = cpha.ok(&["get", "cm", "cpha-members", "-n", "kube-system", "-o", "jsonpath={.data.m}"]);
    assert_eq!(got, "3");
    let out = cpha.run(&["get", "cm", "-n", "kube-system"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "Error from server (Forbidden): configmaps is forbidden: User \"cpha\" cannot list resource \"configmaps\""
        ),
        "{err}"
    );

    assert_eq!(
        k.ok(&["delete", "cm", "cpha-members", "-n", "kube-system"]).trim(),
        "configmap \"cpha-members\" deleted"
    );
    s.get(&format!("{CM}/cpha-members"), ADMIN).await.assert_status(404, "NotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_events_shows_the_recorders_event() {
    use crate::events::{client, members_ref, promoted, publish, recorder, EV};
    let dir = Scratch::new("kubectl-events");
    let s = start(dir.path());
    let k = Kubectl::new(kubectl_binary(), dir.path(), "admin");
    let out = k.run(&["get", "events.events.k8s.io", "-n", "kube-system"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No resources found in kube-system namespace."));

    let cm = s.create_cm("kube-system", "cpha-members", json!({})).await;
    let rec = recorder(client(&dir.path().join("admin.kubeconfig")).await);
    publish(&rec, &promoted(), &members_ref(&cm)).await.expect("publish");
    publish(&rec, &promoted(), &members_ref(&cm)).await.expect("publish again");

    let table = k.ok(&["get", "events.events.k8s.io", "-n", "kube-system"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"], "{table}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row[1..],
        ["Normal", "Promoted", "configmap/cpha-members", "node-1", "holds", "the", "handover"],
        "{table}"
    );
    // -o wide: the series count, the reporter and the name.
    let wide = k.ok(&["get", "ev", "-n", "kube-system", "-o", "wide"]);
    let name = s.get(EV, ADMIN).await.json["items"][0]["metadata"]["name"].as_str().unwrap().to_string();
    let row: Vec<&str> = wide.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert!(wide.contains("cpha, node-1"), "{wide}");
    assert_eq!(row[row.len() - 2..], ["2", name.as_str()], "{wide}");
    let got: Value =
        serde_json::from_str(&k.ok(&["get", "events.events.k8s.io", &name, "-n", "kube-system", "-o", "json"]))
            .unwrap();
    assert_eq!((got["apiVersion"].as_str(), got["series"]["count"].as_i64()), (Some("events.k8s.io/v1"), Some(2)));

    let cpha = Kubectl::new(kubectl_binary(), dir.path(), "cpha");
    let out = cpha.run(&["get", "events.events.k8s.io", "-n", "kube-system"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Error from server (Forbidden): events.events.k8s.io is forbidden: User \"cpha\" cannot list resource \"events\" in API group \"events.k8s.io\" in the namespace \"kube-system\""),
        "{err}"
    );
}

/// `kubectl get -w` prints a line per change; returns once `want` lines matched.
async fn watch_scenario(bin: PathBuf) {
    let dir = Scratch::new("kubectl-watch");
    let s = start(dir.path());
    let k = Kubectl::new(bin, dir.path(), "admin");
    s.create_cm("kube-system", "w1", json!({"a": "1"})).await;
    let mut child = k.command(&["get", "cm", "-n", "kube-system", "-w"]).spawn().expect("spawn kubectl get -w");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let next_line = |within: Duration| rx.recv_timeout(within).ok();
    let header = next_line(Duration::from_secs(30));
    let first = next_line(Duration::from_secs(10));
    let cells =
        |l: Option<String>| -> Vec<String> { l.unwrap_or_default().split_whitespace().map(str::to_string).collect() };
    let guard = KillOnDrop(child);
    assert_eq!(cells(header)[..3], ["NAME", "DATA", "AGE"]);
    assert_eq!(cells(first)[..2], ["w1", "1"]);
    s.patch(&format!("{CM}/w1"), ADMIN, "application/merge-patch+json", r#"{"data":{"b":"2"}}"#).await;
    assert_eq!(cells(next_line(Duration::from_secs(10)))[..2], ["w1", "2"]);
    s.create_cm("kube-system", "w2", json!({})).await;
    assert_eq!(cells(next_line(Duration::from_secs(10)))[..2], ["w2", "0"]);
    drop(guard);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch() {
    watch_scenario(kubectl_binary()).await;
}

/// The RBAC objects as an operator handles them with kubectl: `apply` of a ServiceAccount, a
/// Role and a RoleBinding, `get` of each, and `create token`, whose token reads the one
/// ConfigMap the Role names and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_rbac_objects_and_creates_a_token() {
    let dir = Scratch::new("kubectl-rbac");
    let s = start(dir.path());
    s.create_cm("kube-system", "cpha-members", json!({"members": "10.0.0.11:6443"})).await;
    let k = Kubectl::new(kubectl_binary(), dir.path(), "admin");
    let manifest = dir.path().join("rbac.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: cpha, namespace: kube-system}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: cpha-agent, namespace: kube-system}\n\
         rules:\n- apiGroups: ['']\n  resources: [configmaps]\n  resourceNames: [cpha-members]\n  verbs: [get, list, watch]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: cpha-agent, namespace: kube-system}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cpha-agent}\n\
         subjects:\n- {kind: ServiceAccount, name: cpha, namespace: kube-system}\n",
    )
    .unwrap();
    let out = k.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(
        out.contains("serviceaccount/cpha created")
            && out.contains("rolebinding.rbac.authorization.k8s.io/cpha-agent created"),
        "{out}"
    );
    let out = k.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(out.contains("role.rbac.authorization.k8s.io/cpha-agent unchanged"), "{out}");
    let out = k.ok(&["get", "sa,roles,rolebindings", "-n", "kube-system"]);
    assert!(out.contains("serviceaccount/cpha") && out.contains("Role/cpha-agent"), "{out}");
    let token = k.ok(&["create", "token", "cpha", "-n", "kube-system", "--duration", "1h"]);
    let token = token.trim();
    let r = s.get(&format!("{CM}/cpha-members"), token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.get(CM, token).await.assert_status(403, "Forbidden");
}
