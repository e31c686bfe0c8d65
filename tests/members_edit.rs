//! `cpha members add` and `remove` against the real API stand-in (`kube-standin`) on loopback:
//! racing writers all land (optimistic concurrency on the resourceVersion, retried on 409),
//! a registration replaces the entry with its name and the entry with its address, the last
//! member cannot be removed, an invalid entry is refused before any request, both are
//! idempotent, the ConfigMap is created when absent, and the members are asked directly when
//! the configured server is down.
//!
//! Build the stand-in first: `cargo build -p kube-standin`.

#[path = "support/standin.rs"]
mod standin;

use std::io::ErrorKind;
use std::process::Output;
use std::time::Instant;

use anyhow::{ensure, Context as _, Result};
use serde_json::json;

use standin::{cpha_command, Scratch, Standin, ADMIN_TOKEN, CPHA_TOKEN};

/// The agent's configuration for the ConfigMap source, with `admin.kube` (ADMIN_TOKEN, or the
/// given kubeconfig) as credentials; `extra` goes into the members section.
fn config(dir: &Scratch, kubeconfig: &str, extra: &str, kube_extra: &str) -> Result<String> {
    let path = dir.join("cpha.yaml");
    std::fs::write(
        &path,
        format!(
            "members:\n  source: configMap\n  stateFile: ''\n{extra}kubernetes:\n  kubeconfig: [{kubeconfig}]\n\
             {kube}  pollInterval: 200ms\n",
            kube = if kube_extra.contains("directToMembers") {
                kube_extra.to_owned()
            } else {
                format!("{kube_extra}  directToMembers: false\n")
            },
        ),
    )?;
    Ok(path.display().to_string())
}

fn cpha(args: &[&str]) -> Result<Output> {
    let out = cpha_command(args, &[]).output().context("running cpha")?;
    Ok(out)
}

fn text(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `members` key of `kube-system/cpha-members` and its resourceVersion, read with the
/// admin's client.
fn read_members(dir: &Scratch) -> Result<Option<(String, String)>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(dir.join("admin.kube"))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let client = kube::Client::try_from(config)?;
        let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(client, standin::NS);
        Ok(cms.get_opt(standin::NAME).await?.map(|cm| {
            (
                cm.data.unwrap_or_default().get("members").cloned().unwrap_or_default(),
                cm.metadata.resource_version.unwrap_or_default(),
            )
        }))
    })
}

fn setup(tag: &str) -> Result<(Scratch, Standin, String)> {
    let dir = Scratch::new(tag);
    let api = Standin::start(dir.path(), &[])?;
    api.kubeconfig(&dir.join("admin.kube"), ADMIN_TOKEN, None)?;
    let cfg = config(&dir, &dir.join("admin.kube").display().to_string(), "", "")?;
    Ok((dir, api, cfg))
}

#[test]
fn members_add_creates_the_configmap_and_is_idempotent() -> Result<()> {
    let (dir, _api, cfg) = setup("edit-create")?;
    ensure!(read_members(&dir)?.is_none());
    let out = cpha(&["members", "add", "--config", &cfg, "cp1=127.0.0.11"])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("created ConfigMap kube-system/cpha-members"),
        "{}",
        text(&out)
    );
    let (members, rv) = read_members(&dir)?.context("created")?;
    assert_eq!(members, "cp1=127.0.0.11:6443\n");

    // Listed already: exit 0 and no write (the resourceVersion stays).
    let out = cpha(&["members", "add", "--config", &cfg, "cp1=127.0.0.11:6443"])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(String::from_utf8_lossy(&out.stdout).contains("already listed"), "{}", text(&out));
    assert_eq!(read_members(&dir)?.context("still there")?.1, rv, "a no-op writes nothing");

    let out = cpha(&["members", "add", "--config", &cfg, "cp2=127.0.0.12:7443"])?;
    ensure!(out.status.success(), "{}", text(&out));
    assert_eq!(read_members(&dir)?.unwrap().0, "cp1=127.0.0.11:6443\ncp2=127.0.0.12:7443\n");

    let (_, rv) = read_members(&dir)?.unwrap();
    // Removing an absent member: exit 0, nothing written.
    let out = cpha(&["members", "remove", "--config", &cfg, "cp9"])?;
    ensure!(out.status.success(), "{}", text(&out));
    ensure!(String::from_utf8_lossy(&out.stdout).contains("not listed"), "{}", text(&out));
    assert_eq!(read_members(&dir)?.unwrap().1, rv);
    Ok(())
}

/// Runs `cpha members add ENTRY` and returns its exit code and stdout.
fn add(cfg: &str, entry: &str) -> Result<(Option<i32>, String, Output)> {
    let out = cpha(&["members", "add", "--config", cfg, entry])?;
    Ok((out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), out))
}

#[test]
fn members_add_replaces_a_rebuilt_host_and_a_reused_address() -> Result<()> {
    let (dir, api, cfg) = setup("edit-replace")?;
    api.set_members("cp1=127.0.0.11:6443\ncp2=127.0.0.12:6443\ncp3=127.0.0.13:6443\n")?;

    // cp1 rebuilt under its old name at a new address.
    let (code, stdout, out) = add(&cfg, "cp1=127.0.0.21")?;
    assert_eq!(code, Some(0), "{}", text(&out));
    ensure!(
        stdout.contains("add cp1=127.0.0.21:6443: replaced cp1=127.0.0.11:6443 (the same name)\n"),
        "{}",
        text(&out)
    );
    assert_eq!(read_members(&dir)?.unwrap().0, "cp2=127.0.0.12:6443\ncp3=127.0.0.13:6443\ncp1=127.0.0.21:6443\n");

    // A new host, cp4, given the address cp2 had.
    let (code, stdout, out) = add(&cfg, "cp4=127.0.0.12:6443")?;
    assert_eq!(code, Some(0), "{}", text(&out));
    ensure!(stdout.contains("replaced cp2=127.0.0.12:6443 (the same address)\n"), "{}", text(&out));
    assert_eq!(read_members(&dir)?.unwrap().0, "cp4=127.0.0.12:6443\ncp3=127.0.0.13:6443\ncp1=127.0.0.21:6443\n");

    // cp3 rebuilt at the address cp1 has now: two entries replaced by one, each reported.
    let (code, stdout, out) = add(&cfg, "cp3=127.0.0.21")?;
    assert_eq!(code, Some(0), "{}", text(&out));
    let replaced: Vec<&str> = stdout.lines().filter(|l| l.contains(": replaced ")).collect();
    assert_eq!(
        replaced,
        [
            "add cp3=127.0.0.21:6443: replaced cp3=127.0.0.13:6443 (the same name)",
            "add cp3=127.0.0.21:6443: replaced cp1=127.0.0.21:6443 (the same address)",
        ],
        "{}",
        text(&out)
    );
    let (members, rv) = read_members(&dir)?.unwrap();
    assert_eq!(members, "cp4=127.0.0.12:6443\ncp3=127.0.0.21:6443\n");

    // The same registration again (a reboot): exit 0, says so, writes nothing.
    let (code, stdout, out) = add(&cfg, "cp3=127.0.0.21:6443")?;
    assert_eq!(code, Some(0), "{}", text(&out));
    ensure!(stdout.contains("already listed") && !stdout.contains("replaced"), "{}", text(&out));
    assert_eq!(read_members(&dir)?.unwrap(), (members.clone(), rv.clone()), "a no-op writes nothing");

    // Still refused: an invalid entry (64) and removing the last member (65).
    let (code, _, out) = add(&cfg, "cp5=127.0.0.15 check")?;
    assert_eq!(code, Some(64), "{}", text(&out));
    assert_eq!(read_members(&dir)?.unwrap(), (members, rv), "nothing was written");
    let out = cpha(&["members", "remove", "--config", &cfg, "cp4"])?;
    ensure!(out.status.success(), "{}", text(&out));
    let out = cpha(&["members", "remove", "--config", &cfg, "cp3"])?;
    assert_eq!(out.status.code(), Some(65), "{}", text(&out));
    assert_eq!(read_members(&dir)?.unwrap().0, "cp3=127.0.0.21:6443\n");
    Ok(())
}

#[test]
fn members_remove_of_the_last_member_is_refused() -> Result<()> {
    let (dir, api, cfg) = setup("edit-last")?;
    api.set_members("cp1=127.0.0.11:6443\ncp2=127.0.0.12:6443\n")?;
    let out = cpha(&["members", "remove", "--config", &cfg, "cp1"])?;
    ensure!(out.status.success(), "{}", text(&out));
    let (members, rv) = read_members(&dir)?.unwrap();
    assert_eq!(members, "cp2=127.0.0.12:6443\n");

    let out = cpha(&["members", "remove", "--config", &cfg, "cp2"])?;
    assert_eq!(out.status.code(), Some(65), "{}", text(&out));
    ensure!(String::from_utf8_lossy(&out.stderr).contains("cp2 is the last member"), "{}", text(&out));
    assert_eq!(read_members(&dir)?.unwrap(), (members, rv), "nothing was written");
    Ok(())
}

#[test]
fn members_add_refuses_an_invalid_entry_before_any_request() -> Result<()> {
    let dir = Scratch::new("edit-invalid");
    // The "API server" is a listener that counts connections: there must be none.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let kubeconfig = dir.join("admin.kube");
    std::fs::write(
        &kubeconfig,
        json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": format!("https://{addr}"), "insecure-skip-tls-verify": true}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        })
        .to_string(),
    )?;
    let cfg = config(&dir, &kubeconfig.display().to_string(), "", "")?;
    for (args, why) in [
        (vec!["add", "cp2=127.0.0.12:6443\nprogram evil"], "is not a member"),
        (vec!["add", "cp2=127.0.0.12:99999"], "is not a member"),
        (vec!["add", "127.0.0.12:6443"], "names no server"),
        (vec!["add", "cp2=127.0.0.12;del server x"], "is not a member"),
        (vec!["remove", "cp 2"], "is not a server name"),
    ] {
        let mut all = vec!["members"];
        all.extend(args.iter().copied());
        all.extend(["--config", &cfg, "--timeout", "5s"]);
        let out = cpha(&all)?;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(stderr.contains(why), "{args:?}: {}", text(&out));
        ensure!(!stderr.contains("program evil\n"), "the newline is quoted, not printed: {stderr}");
        match listener.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok((_, peer)) => anyhow::bail!("{args:?}: a connection reached the API from {peer}"),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[test]
fn members_add_racing_for_the_same_configmap_all_land() -> Result<()> {
    let (dir, api, cfg) = setup("edit-race")?;
    api.set_members("cp1=127.0.0.11:6443\n")?;
    // Every response is held back 300 ms, so all writers read the same version before any of
    // them writes: all but one must meet a 409 Conflict and retry on top of the winner's list.
    api.faults(json!({"delay": {"ms": 300, "pathPrefix": "/api/v1/namespaces/kube-system/configmaps"}}))?;
    let hosts = ["cp2", "cp3", "cp4", "cp5"];
    let started = Instant::now();
    let children: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let entry = format!("{name}=127.0.0.{}:6443", 12 + i);
            cpha_command(&["members", "add", "--config", &cfg, &entry, "--timeout", "60s"], &[])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output()).collect::<Result<_, _>>()?;
    eprintln!("{} racing adds took {:?}", hosts.len(), started.elapsed());
    for out in &outputs {
        ensure!(out.status.success(), "{}", text(out));
    }
    api.faults(json!({"clear": true}))?;
    let (members, _) = read_members(&dir)?.unwrap();
    assert_eq!(
        members,
        "cp1=127.0.0.11:6443\ncp2=127.0.0.12:6443\ncp3=127.0.0.13:6443\ncp4=127.0.0.14:6443\ncp5=127.0.0.15:6443\n",
        "every racing add landed"
    );
    let retried = outputs.iter().filter(|o| String::from_utf8_lossy(&o.stdout).contains("conflicts)")).count();
    ensure!(
        retried >= 1,
        "no writer met a conflict, so the race was not run:\n{}",
        outputs.iter().map(text).collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

#[test]
fn members_add_talks_to_the_members_when_the_endpoint_is_down() -> Result<()> {
    let (dir, api, _) = setup("edit-direct")?;
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let nowhere = format!("https://{}", l.local_addr()?);
    drop(l);
    api.kubeconfig(&dir.join("lb.kube"), ADMIN_TOKEN, Some(&nowhere))?;
    let seed = format!("  static: ['{}']\n", api.addr);
    let cfg = config(&dir, &dir.join("lb.kube").display().to_string(), &seed, "  directToMembers: true\n")?;
    let out = cpha(&["members", "add", "--config", &cfg, "cp1=127.0.0.11"])?;
    ensure!(out.status.success(), "{}", text(&out));
    assert_eq!(read_members(&dir)?.unwrap().0, "cp1=127.0.0.11:6443\n");

    // The agent's read-only identity cannot edit: the API's 403 is reported, nothing written.
    api.kubeconfig(&dir.join("cpha.kube"), CPHA_TOKEN, None)?;
    let cfg = config(&dir, &dir.join("cpha.kube").display().to_string(), "", "")?;
    let out = cpha(&["members", "add", "--config", &cfg, "cp2=127.0.0.12"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    ensure!(String::from_utf8_lossy(&out.stderr).contains("cannot update resource \"configmaps\""), "{}", text(&out));
    Ok(())
}
