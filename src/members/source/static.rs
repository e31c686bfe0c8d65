//! The `static` source: members given in the configuration or on the command line (the
//! cloud-init seed). The set was checked when the settings were resolved; it is sent once.

use tokio::sync::mpsc;

use super::SourceEvent;
use crate::members::MemberSet;

pub(super) async fn run(set: &MemberSet, events: mpsc::Sender<SourceEvent>) -> anyhow::Result<()> {
    if events.send(SourceEvent::Parsed(Ok(set.clone()))).await.is_err() {
        tracing::debug!("the member pipeline stopped before the static set was sent");
    }
    Ok(())
}
