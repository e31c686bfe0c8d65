//! `cpha identity` against the real API stand-in (`kube-standin`, with real RBAC from Role and
//! RoleBinding objects): admin credentials create the agent's ServiceAccount and Roles and
//! write a token for it; with that token the agent reads its member ConfigMap (the same watch
//! `cpha run` makes) and may renew its own token, and is refused everything else: a LIST of all
//! ConfigMaps, a GET of a Secret, a write of its own ConfigMap, a token for another
//! ServiceAccount.
//!
//! Build the stand-in first: `cargo build -p kube-standin`.

#[path = "support/standin.rs"]
mod standin;

use std::os::unix::fs::PermissionsExt as _;

use anyhow::{ensure, Context as _, Result};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

use standin::{cpha_command, Scratch, Standin, ADMIN_TOKEN, NAME, NS};

fn config(dir: &Scratch, api: &Standin) -> Result<String> {
    let path = dir.join("cpha.yaml");
    std::fs::write(
        &path,
        format!(
            "members:\n  source: configMap\n  stateFile: ''\nkubernetes:\n  server: {}\n  caFile: {}\n  tokenFile: {}\n\
             \x20 directToMembers: false\n  pollInterval: 200ms\n",
            api.url(),
            api.ca().display(),
            dir.join("token").display()
        ),
    )?;
    Ok(path.display().to_string())
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[test]
fn the_agents_identity_watches_its_configmap_and_nothing_else() -> Result<()> {
    let dir = Scratch::new("identity");
    let api = Standin::start(dir.path(), &[])?;
    api.kubeconfig(&dir.join("admin.kube"), ADMIN_TOKEN, None)?;
    api.set_members("cp1=127.0.0.11:6443\n")?;
    let cfg = config(&dir, &api)?;
    let admin = dir.join("admin.kube").display().to_string();

    // Without the token file the agent has no credentials yet.
    let out = cpha_command(&["members", "--config", &cfg, "--timeout", "1s"], &[]).output()?;
    ensure!(!out.status.success(), "no token yet, yet: {}", String::from_utf8_lossy(&out.stdout));

    let out =
        cpha_command(&["identity", "--config", &cfg, "--kubeconfig", &admin, "--duration", "1h"], &[]).output()?;
    ensure!(out.status.success(), "cpha identity: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(said.contains("ServiceAccount kube-system/cpha may read ConfigMap kube-system/cpha-members"), "{said}");
    let token_path = dir.join("token");
    let mode = std::fs::metadata(&token_path)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token file is private");
    let token = std::fs::read_to_string(&token_path)?.trim().to_string();

    // The agent's own credentials (server + CA + token file): the member watch works.
    let out = cpha_command(&["members", "--config", &cfg, "--timeout", "20s"], &[]).output()?;
    ensure!(out.status.success(), "cpha members with the agent's token: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cp1=127.0.0.11:6443\n");

    // Everything else is refused: 403 from the API's RBAC.
    api.kubeconfig(&dir.join("agent.kube"), &token, None)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(dir.join("agent.kube"))?;
        let client = kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)?;
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        let own = cms.get(NAME).await.context("GET of its own ConfigMap")?;
        let e = cms.list(&ListParams::default()).await.expect_err("LIST of every ConfigMap in kube-system");
        assert_eq!(status_code(&e), Some(403), "{e}");
        let e =
            Api::<ConfigMap>::all(client.clone()).list(&ListParams::default()).await.expect_err("cluster-wide LIST");
        assert_eq!(status_code(&e), Some(403), "{e}");
        let e = cms.get("kubeadm-config").await.expect_err("GET of another ConfigMap");
        assert_eq!(status_code(&e), Some(403), "{e}");
        let e = Api::<Secret>::namespaced(client.clone(), NS)
            .get("bootstrap-token-abcdef")
            .await
            .expect_err("GET of a Secret");
        assert_eq!(status_code(&e), Some(403), "{e}");
        let e = cms.replace(NAME, &PostParams::default(), &own).await.expect_err("a write of its own ConfigMap");
        assert_eq!(status_code(&e), Some(403), "{e}");
        // The drift report's read: the apiservers' EndpointSlice, by name only.
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        slices.get("kubernetes").await.context("GET of default/kubernetes")?;
        let e = slices.list(&ListParams::default()).await.expect_err("LIST of every EndpointSlice");
        assert_eq!(status_code(&e), Some(403), "{e}");
        // Renewal: a token for its own ServiceAccount, and for no other.
        let admin = {
            let kc = kube::config::Kubeconfig::read_from(dir.join("admin.kube"))?;
            kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)?
        };
        Api::<ServiceAccount>::namespaced(admin, NS)
            .create(
                &PostParams::default(),
                &ServiceAccount {
                    metadata: ObjectMeta { name: Some("other".into()), ..Default::default() },
                    ..Default::default()
                },
            )
            .await
            .context("creating ServiceAccount other")?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() }),
            ..Default::default()
        };
        let own = sas.create_token_request("cpha", &PostParams::default(), &request).await.context("its own token")?;
        ensure!(own.status.and_then(|s| s.token).is_some_and(|t| !t.is_empty()), "no token in the answer");
        let e = sas
            .create_token_request("other", &PostParams::default(), &request)
            .await
            .expect_err("a token for another ServiceAccount");
        assert_eq!(status_code(&e), Some(403), "{e}");
        ensure!(e.to_string().contains("cannot create resource \"serviceaccounts/token\""), "{e}");
        let e = Api::<ServiceAccount>::namespaced(client.clone(), "default")
            .create_token_request("cpha", &PostParams::default(), &request)
            .await
            .expect_err("a token for a cpha ServiceAccount of another namespace");
        assert_eq!(status_code(&e), Some(403), "{e}");
        anyhow::Ok(())
    })?;

    // Issued again (rotation): the objects are left as they are, a new token replaces the file.
    let out =
        cpha_command(&["identity", "--config", &cfg, "--kubeconfig", &admin, "--duration", "2h"], &[]).output()?;
    ensure!(out.status.success(), "cpha identity again: {}", String::from_utf8_lossy(&out.stderr));
    let rotated = std::fs::read_to_string(&token_path)?.trim().to_string();
    ensure!(rotated != token, "a new token was written");
    let out = cpha_command(&["members", "--config", &cfg, "--timeout", "20s"], &[]).output()?;
    ensure!(out.status.success(), "with the rotated token: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The external LB's and the metal3 template's shape: the member list is the apiservers' own
/// EndpointSlice, and the identity may read that and nothing of the member ConfigMap.
#[test]
fn with_the_endpointslice_source_the_identity_reads_the_slice_only() -> Result<()> {
    let dir = Scratch::new("identity-slice");
    let api = Standin::start(dir.path(), &[])?;
    api.kubeconfig(&dir.join("admin.kube"), ADMIN_TOKEN, None)?;
    api.set_members("cp1=127.0.0.11:6443\n")?;
    let cfg = dir.join("cpha.yaml");
    std::fs::write(
        &cfg,
        format!(
            "members:\n  source: endpointSlice\n  endpointSlice:\n    namespace: default\n    name: kubernetes\n\
             \x20 stateFile: ''\nkubernetes:\n  server: {}\n  caFile: {}\n  tokenFile: {}\n\
             \x20 directToMembers: false\n  pollInterval: 200ms\n",
            api.url(),
            api.ca().display(),
            dir.join("token").display()
        ),
    )?;
    let cfg = cfg.display().to_string();
    let admin = dir.join("admin.kube").display().to_string();
    let out =
        cpha_command(&["identity", "--config", &cfg, "--kubeconfig", &admin, "--duration", "1h"], &[]).output()?;
    ensure!(out.status.success(), "cpha identity: {}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(said.contains("ServiceAccount kube-system/cpha may read EndpointSlice default/kubernetes;"), "{said}");
    let out = cpha_command(&["members", "--config", &cfg, "--timeout", "20s"], &[]).output()?;
    ensure!(out.status.success(), "cpha members with the agent's token: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(String::from_utf8_lossy(&out.stdout).contains(":6443"), "{}", String::from_utf8_lossy(&out.stdout));

    let token = std::fs::read_to_string(dir.join("token"))?.trim().to_string();
    api.kubeconfig(&dir.join("agent.kube"), &token, None)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(dir.join("agent.kube"))?;
        let client = kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)?;
        let e = Api::<ConfigMap>::namespaced(client.clone(), NS).get(NAME).await.expect_err("GET of the ConfigMap");
        assert_eq!(status_code(&e), Some(403), "{e}");
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        let e = slices.list(&ListParams::default()).await.expect_err("LIST of every EndpointSlice");
        assert_eq!(status_code(&e), Some(403), "{e}");
        let request = TokenRequest {
            spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() }),
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(client.clone(), NS)
            .create_token_request("cpha", &PostParams::default(), &request)
            .await
            .context("renewing its own token")?;
        anyhow::Ok(())
    })?;
    Ok(())
}
