//! In-memory actuators for the agent's unit tests: they record what they were asked to do and
//! answer as the test sets them to.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::actuator::{EndpointActuator, FileKeeper, HaproxyActuator, Probes, Reporter, VipActuator};
use super::controller::{Adopted, Desired, EndpointCheck, Note, View};
use crate::haproxy::{HaproxySettings, Health, Server};
use crate::vip::Advertised;

/// Everything the fakes were asked to do, in order.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn push(&self, line: impl Into<String>) {
        self.0.lock().unwrap().push(line.into());
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.lines().iter().filter(|l| l.starts_with(prefix)).count()
    }
}

pub struct FakeEndpoint {
    pub log: Log,
    pub adopted: Adopted,
    /// Forward and handover actions (and repairs) fail while set.
    pub fail: Arc<AtomicBool>,
    /// What a repair finds changed in the kernel (taken by the repair); `None`: nothing.
    pub drifted: Arc<Mutex<Option<String>>>,
}

impl EndpointActuator for FakeEndpoint {
    fn backend_name(&self) -> &'static str {
        "fake"
    }

    async fn adopt(&mut self) -> anyhow::Result<Adopted> {
        Ok(self.adopted.clone())
    }

    async fn forward_to(&mut self, targets: Vec<SocketAddr>) -> anyhow::Result<()> {
        self.log.push(format!("forward {targets:?}"));
        anyhow::ensure!(!self.fail.load(Ordering::SeqCst), "nft: injected failure");
        Ok(())
    }

    async fn hand_to_haproxy(&mut self) -> anyhow::Result<()> {
        self.log.push("handover");
        anyhow::ensure!(!self.fail.load(Ordering::SeqCst), "nft: injected failure");
        Ok(())
    }

    async fn reassert(&mut self) -> anyhow::Result<()> {
        self.log.push("reassert");
        Ok(())
    }

    async fn repair(&mut self) -> anyhow::Result<Option<String>> {
        self.log.push("repair");
        anyhow::ensure!(!self.fail.load(Ordering::SeqCst), "nft: injected failure");
        Ok(self.drifted.lock().unwrap().take())
    }

    async fn housekeeping(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self, keep: bool) -> anyhow::Result<()> {
        self.log.push(format!("shutdown keep={keep}"));
        Ok(())
    }
}

#[derive(Clone)]
pub struct FakeHaproxy {
    pub log: Log,
    pub health: Arc<Mutex<Health>>,
    /// Applies fail while set.
    pub fail: Arc<AtomicBool>,
    /// What the next `restarted()` reports (taken).
    pub restart: Arc<Mutex<Option<String>>>,
}

impl HaproxyActuator for FakeHaproxy {
    async fn apply(&mut self, servers: Vec<Server>) -> Result<String, String> {
        let names: Vec<String> = servers.iter().map(|s| s.name.to_string()).collect();
        self.log.push(format!("apply {}", names.join(",")));
        if self.fail.load(Ordering::SeqCst) {
            return Err("haproxy -c: injected failure".into());
        }
        Ok(format!("runtime; {} servers", servers.len()))
    }

    async fn health(&mut self) -> Health {
        *self.health.lock().unwrap()
    }

    fn set_settings(&mut self, _settings: HaproxySettings, bind: SocketAddr) -> Result<(), String> {
        self.log.push(format!("settings bind={bind}"));
        Ok(())
    }

    fn restarted(&mut self) -> Option<String> {
        self.restart.lock().unwrap().take()
    }
}

#[derive(Clone)]
pub struct FakeProbes {
    pub alive: Arc<AtomicBool>,
    pub ready: Arc<Mutex<Vec<SocketAddr>>>,
    pub endpoint_ok: Arc<AtomicBool>,
}

impl Probes for FakeProbes {
    async fn ready_members(&self, candidates: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let ready = self.ready.lock().unwrap().clone();
        candidates.into_iter().filter(|c| ready.contains(c)).collect()
    }

    async fn endpoint(&self) -> EndpointCheck {
        if self.endpoint_ok.load(Ordering::SeqCst) {
            EndpointCheck::Ready
        } else {
            EndpointCheck::Unreachable("connection refused".into())
        }
    }

    async fn haproxy_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Default)]
pub struct FakeReporter {
    pub log: Log,
    pub view: Arc<Mutex<Option<View>>>,
}

impl Reporter for FakeReporter {
    fn ready(&mut self, sentence: &str) {
        self.log.push(format!("READY {sentence}"));
    }

    fn status(&mut self, _sentence: &str) {}

    fn event(&mut self, note: Note) {
        self.log.push(format!("event {}", note.reason));
    }

    fn transition(&mut self, from: &'static str, to: &'static str) {
        self.log.push(format!("transition {from}->{to}"));
    }

    fn rejected(&mut self, source: &str) {
        self.log.push(format!("rejected {source}"));
    }

    fn drift(&mut self, drift: Option<&super::controller::Drift>) {
        self.log.push(match drift {
            Some(d) => format!("drift {d}"),
            None => "drift resolved".into(),
        });
    }

    fn known(&mut self, _desired: &Desired) {}

    fn publish(&mut self, view: &View) {
        *self.view.lock().unwrap() = Some(view.clone());
    }

    fn heartbeat(&mut self) {}

    fn stopping(&mut self, sentence: &str) {
        self.log.push(format!("stopping {sentence}"));
    }

    fn vip_changed(&mut self, held: bool) {
        self.log.push(format!("vip held={held}"));
    }

    fn repaired(&mut self, repair: &super::controller::Repair) {
        self.log.push(format!("repaired {}: {}", repair.object, repair.why));
    }
}

/// The VIP actuator: records what it is told; `release` fails while `fail` is set.
#[derive(Clone, Default)]
pub struct FakeVip {
    pub log: Log,
    pub fail: Arc<AtomicBool>,
}

impl VipActuator for FakeVip {
    fn advertise(&mut self, level: Advertised) -> Result<(), String> {
        self.log.push(format!("advertise {}", level.name()));
        Ok(())
    }

    fn members(&mut self, members: Vec<IpAddr>) {
        self.log.push(format!("members {members:?}"));
    }

    fn holds(&mut self) -> bool {
        false
    }

    fn takeover(&self) -> Duration {
        Duration::ZERO
    }

    fn release(&mut self) -> Result<String, String> {
        self.log.push("release");
        if self.fail.load(Ordering::SeqCst) {
            Err("ip: injected failure".into())
        } else {
            Ok("removed".into())
        }
    }
}

/// The owned files: a repair finds what the test put in `drifted` for that object.
#[derive(Clone, Default)]
pub struct FakeFiles {
    pub log: Log,
    pub drifted: Arc<Mutex<std::collections::BTreeMap<&'static str, String>>>,
    /// Repairs fail while set.
    pub fail: Arc<AtomicBool>,
}

impl FileKeeper for FakeFiles {
    fn repair(&mut self, object: &'static str) -> Result<Option<String>, String> {
        self.log.push(format!("repair {object}"));
        if self.fail.load(Ordering::SeqCst) {
            return Err("read-only file system".into());
        }
        Ok(self.drifted.lock().unwrap().remove(object))
    }
}
