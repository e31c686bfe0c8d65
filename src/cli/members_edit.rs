//! `cpha members add NAME=ADDRESS[:PORT]` and `cpha members remove NAME`: one member added to
//! or removed from the member ConfigMap (`members.configMap`), through the agent's own
//! configuration and credential logic (kubeconfig candidates in order, talking to the known
//! members directly when the endpoint is down). The entry is parsed before any request; the
//! update itself is `crate::members::edit`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::members::{resolve, KubeFlags, MembersFlags};
use crate::exit::{self, Coded};
use crate::kube::{self, CredentialSource};
use crate::members::edit::{self, Applied, ApplyError, Edit, EditError, Target};
use crate::members::source::{state, SourceSettings};
use crate::members::MemberSet;

#[derive(Debug, clap::Subcommand)]
pub enum EditCommand {
    /// Add a member to the member ConfigMap (created when absent), replacing the entry with its name
    /// and the entry with its address; a listed member is a no-op.
    #[command(after_help = "The entry is NAME=ADDRESS[:PORT] (the port defaults to members.defaultPort) and is \
checked with the agent's member grammar before any request. An entry with the same name at another address (a \
host rebuilt under its old name) and an entry with the same address under another name (a new host given a \
released address) are replaced by the new one, and each is reported on a line of its own (\"replaced ...\"); \
the same NAME=ADDRESS:PORT again changes nothing. The ConfigMap is updated with its resourceVersion as a \
precondition and read again after a 409 Conflict, so hosts adding themselves at once all end up listed. Exit \
codes: 0 added, replaced or already listed, 64 invalid entry, 65 refused (the current list is invalid, too many \
members), 69 no credentials or API in time, 1 other API failure. Needs credentials that may get, create and \
update the ConfigMap (kubeadm's admin.conf), not the agent's own.")]
    Add {
        /// NAME=ADDRESS[:PORT], e.g. cp2=192.0.2.12:6443.
        #[arg(value_name = "NAME=ADDRESS[:PORT]")]
        entry: String,
        #[command(flatten)]
        common: EditArgs,
    },
    /// Remove a member from the member ConfigMap by name; an absent one is a no-op.
    #[command(after_help = "Removing the last member is refused (exit 65): HAProxy would be left with no \
apiserver. Exit codes as for `cpha members add`.")]
    Remove {
        /// The server name, as written before `=` in the list (cp2).
        #[arg(value_name = "NAME")]
        name: String,
        #[command(flatten)]
        common: EditArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct EditArgs {
    /// The agent's configuration file (YAML); its members: and kubernetes: sections are read.
    #[arg(long, env = "CPHA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// How long to wait for credentials and the API.
    #[arg(long, value_parser = crate::units::parse_duration, default_value = "60s")]
    pub timeout: Duration,

    #[command(flatten)]
    pub members: MembersFlags,

    #[command(flatten)]
    pub kube: KubeFlags,
}

pub fn run(command: EditCommand) -> anyhow::Result<()> {
    let (edit, common) = match command {
        EditCommand::Add { entry, common } => {
            // The default port is the configured one, so the file is read first; nothing else is.
            let (members, _) = resolve(common.config.as_deref(), &common.members, &common.kube)?;
            (Edit::add(&entry, members.parse.default_port).map_err(usage)?, common)
        }
        EditCommand::Remove { name, common } => (Edit::remove(&name).map_err(usage)?, common),
    };
    let (members, kube) = resolve(common.config.as_deref(), &common.members, &common.kube)?;
    let SourceSettings::ConfigMap { namespace, name, key } = &members.source else {
        return Err(Coded::config(format!(
            "members add/remove edit the member ConfigMap, but members.source is {}: set members.source: configMap \
             (or --source configmap)",
            members.source_name()
        ))
        .into());
    };
    let target = Target { namespace: namespace.clone(), name: name.clone(), key: key.clone() };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let applied = runtime.block_on(async {
        // The members known without the API: the saved last-good set, else the seed. The client
        // tries them before the configured server, as the agent's does.
        let saved = match &members.state_file {
            Some(path) => state::load(path, &members.parse).await.unwrap_or_else(|e| {
                tracing::debug!("state file not used: {e:#}");
                None
            }),
            None => None,
        };
        let known = saved.or_else(|| members.seed.clone()).unwrap_or_default();
        match tokio::time::timeout(common.timeout, edit_with_credentials(&kube, known, &target, &edit, &members.parse))
            .await
        {
            Ok(result) => result,
            Err(_) => Err(Coded {
                code: exit::UNAVAILABLE,
                message: format!(
                    "no answer from the API within {} (--timeout)",
                    humantime::format_duration(common.timeout)
                ),
            }
            .into()),
        }
    })?;
    let object = format!("ConfigMap {}/{}", target.namespace, target.name);
    match applied {
        Applied::Unchanged { why, members } => println!("{edit}: {why}; {object} unchanged: {}", show(&members)),
        Applied::Created { members } => println!("{edit}: created {object}: {}", show(&members)),
        Applied::Updated { members, replaced, attempts } => {
            // One line per replaced entry, before the result, so a script or a reader of the boot
            // log sees what this host's registration took the place of.
            for r in &replaced {
                println!("{edit}: replaced {r}");
            }
            let retried = if attempts > 1 { format!(" (after {} conflicts)", attempts - 1) } else { String::new() };
            println!("{edit}: updated {object}{retried}: {}", show(&members))
        }
    }
    Ok(())
}

fn show(set: &MemberSet) -> String {
    if set.is_empty() {
        "(no member)".into()
    } else {
        set.to_string()
    }
}

fn usage(e: EditError) -> anyhow::Error {
    Coded::usage(e.to_string()).into()
}

/// Loads credentials (waiting for them if configured to), edits, and moves on to the next
/// kubeconfig of the list when the API refuses one (401/403), as the agent does.
async fn edit_with_credentials(
    kube: &crate::kube::KubeSettings,
    known: MemberSet,
    target: &Target,
    edit: &Edit,
    opts: &crate::members::ParseOptions,
) -> anyhow::Result<Applied> {
    let (_keep, known) = watch::channel(known);
    let mut source = CredentialSource::new(kube);
    let candidates = match &kube.credentials {
        crate::kube::Credentials::Kubeconfig(files) => files.len().max(1),
        _ => 1,
    };
    let shutdown = CancellationToken::new();
    let mut last = None;
    for _ in 0..candidates {
        let Some(connected) = kube::connect(&mut source, &known, &shutdown, |_| {}).await? else {
            anyhow::bail!("stopped while waiting for credentials");
        };
        match edit::apply(connected.client, target, edit, opts).await {
            Ok(applied) => return Ok(applied),
            Err(ApplyError::Api { source: ::kube::Error::Api(status), what })
                if matches!(status.code, 401 | 403) && source.has_alternatives() =>
            {
                tracing::info!(
                    "{what}: {} refused ({}); trying the next credentials",
                    connected.credentials,
                    status.message
                );
                source.refused();
                last = Some(anyhow::anyhow!("{what}: {}: {} {}", connected.credentials, status.code, status.message));
            }
            Err(e @ ApplyError::Refused(_)) => return Err(Coded { code: exit::DATAERR, message: e.to_string() }.into()),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("with {}", connected.credentials))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no credentials were accepted")))
}
