//! The agent's decisions, pure: no I/O, no tokio, no clock of its own. Inputs go in (a member
//! update, a health observation of HAProxy, a probe result, a tick, a configuration reload, a
//! signal, an actuator's result), each with the time it happened; effects come out (apply this
//! desired HAProxy state, point the forward at these targets, hand the endpoint to HAProxy,
//! probe, post an Event, tell systemd). The driver (`agent::driver`) carries the effects out
//! with actuators and feeds their results back as inputs.
//!
//! ```text
//!            bootstrap forward installed          rise healthy checks        handover done
//! Starting ───────────────────────────► Forwarding ──────────────────► HandingOver ──────────► Balanced
//!    │  adopted: forward at HAProxy          ▲  ▲                          │  ▲                   │
//!    └────────────────────────────────────── │ ─│──────────────────────────│──│──────► Balanced   │ fall unhealthy checks,
//!                                            │  └──── handover failed ─────┘  │                   │ or HAProxy gone (at once)
//!                                            │                    rise healthy│                   ▼
//!                                            │                                └──────────────  Fallback
//! ```
//! The phase carries its data (the forward's targets, where a handover came from) and exists
//! only here; status, metrics and sd-notify are derived from it.
//!
//! Health has two speeds. "HAProxy answers but has no UP server" goes through hysteresis
//! (`rise` to hand over, `fall` to fall back), because checks flap. "HAProxy is gone" (neither
//! its master nor its admin socket accepts a connection, twice in a row) falls back at once:
//! nothing listens, every connection to it fails, and waiting only adds failures.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::haproxy::resolve::{Resolved, Unresolved};
use crate::haproxy::{Health, Server};
use crate::members::{MemberSet, ServerName};
use crate::vip::{Advertised, Vrrp, VrrpObserved};

/// The controller's settings: what a configuration reload may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Consecutive healthy observations of HAProxy before handing over.
    pub rise: u32,
    /// Consecutive unhealthy observations before falling back.
    pub fall: u32,
    pub fallback: bool,
    /// How often HAProxy's backend is read (and the endpoint checked).
    pub interval: Duration,
    /// How often the members' `/readyz` is probed while nothing changes.
    pub probe_interval: Duration,
    /// How often HAProxy's sockets are checked for the fast "gone" path.
    pub liveness_interval: Duration,
    /// Applies to HAProxy are at least this far apart (leading edge, then coalesced).
    pub min_apply_interval: Duration,
    /// `forward.targets`: where the bootstrap forward points before any member is known.
    pub bootstrap_targets: Vec<SocketAddr>,
    /// How long the member list and the apiservers' own registrations may disagree before it
    /// is reported (`members.drift.after`); `None`: not compared.
    pub drift_after: Option<Duration>,
    /// The virtual IP's health policy, when this host runs one.
    pub vip: Option<VipPolicy>,
}

/// How the endpoint's checks become the health advertised to keepalived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPolicy {
    /// Consecutive good checks before a host that was not healthy is healthy again.
    pub rise: u32,
    /// Consecutive failed checks (of one kind) before a host advertises worse health.
    pub fall: u32,
    /// After advertising worse health, no better health for this long.
    pub hold_down: Duration,
    /// How often the endpoint is checked.
    pub check_interval: Duration,
}

/// A request through the endpoint itself, as a client makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointCheck {
    /// A member's `/readyz` answered 200 through it.
    Ready,
    /// An apiserver answered through it, but not ready.
    NotReady(String),
    /// Nothing answered through it (refused, timed out, TLS failed).
    Unreachable(String),
}

impl EndpointCheck {
    fn as_result(&self) -> Result<(), String> {
        match self {
            EndpointCheck::Ready => Ok(()),
            EndpointCheck::NotReady(why) | EndpointCheck::Unreachable(why) => Err(why.clone()),
        }
    }

    /// The health this result argues for; `was_healthy`: whether this run was ever healthy
    /// (before that, nothing answering is the first boot, not a failure); `members_answer`:
    /// whether this host's own probes found a ready member since the endpoint stopped
    /// answering.
    ///
    /// NOTE: nothing answering through the endpoint withdraws (FAULT: the address moves at
    /// once) only when some apiserver is known to answer: then the endpoint is broken here and
    /// another host's may work. When no member answers this host's probes either, it is an
    /// outage of the apiservers (or this host is cut off from them all): every host sees the
    /// same, so each degrades and the holder keeps the address, and the first request after
    /// the first apiserver is ready again goes through without waiting for VRRP. Once an
    /// outage was seen, members that answer again do not make the still-failing endpoint a
    /// reason to withdraw: HAProxy's checks need their rise before it serves them.
    fn argues(&self, was_healthy: bool, members_answer: bool) -> Advertised {
        match self {
            EndpointCheck::Ready => Advertised::Healthy,
            EndpointCheck::NotReady(_) => Advertised::Degraded,
            EndpointCheck::Unreachable(_) if was_healthy && members_answer => Advertised::Withdrawn,
            EndpointCheck::Unreachable(_) => Advertised::Degraded,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            EndpointCheck::Ready => 0,
            EndpointCheck::NotReady(_) => 1,
            EndpointCheck::Unreachable(_) => 2,
        }
    }
}

fn rank(level: Advertised) -> u8 {
    match level {
        Advertised::Withdrawn => 0,
        Advertised::Degraded => 1,
        Advertised::Healthy => 2,
    }
}

/// What an earlier run left in the kernel, read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adopted {
    /// No forward: install one.
    Nothing,
    /// A forward to these members carries the endpoint.
    Forward(Vec<SocketAddr>),
    /// HAProxy carries the endpoint (a forward retargeted at it, or a release that is draining).
    Haproxy,
}

/// The phase of the endpoint, with what each phase needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Nothing carries the endpoint yet: waiting for a target to forward to.
    Starting,
    /// The bootstrap forward carries the endpoint to these targets.
    Forwarding { targets: Vec<SocketAddr> },
    /// Moving new connections to HAProxy; until that is done the forward still carries them.
    HandingOver { from: Box<Phase> },
    /// HAProxy carries the endpoint.
    Balanced,
    /// HAProxy failed: the forward carries the endpoint again, to these (ready) members.
    Fallback { targets: Vec<SocketAddr> },
}

/// Every transition the controller makes, for metrics that exist from the start.
pub const TRANSITIONS: [(&str, &str); 7] = [
    ("starting", "forwarding"),
    ("starting", "balanced"),
    ("forwarding", "handing-over"),
    ("fallback", "handing-over"),
    ("handing-over", "balanced"),
    ("handing-over", "forwarding"),
    ("balanced", "fallback"),
];

impl Phase {
    pub const NAMES: [&'static str; 5] = ["starting", "forwarding", "handing-over", "balanced", "fallback"];

    pub fn name(&self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Forwarding { .. } => "forwarding",
            Phase::HandingOver { .. } => "handing-over",
            Phase::Balanced => "balanced",
            Phase::Fallback { .. } => "fallback",
        }
    }

    /// Where new connections to the endpoint go in this phase.
    pub fn carrier(&self) -> Option<Carrier> {
        match self {
            Phase::Starting => None,
            Phase::Forwarding { targets } | Phase::Fallback { targets } => Some(Carrier::Forward(targets.clone())),
            Phase::HandingOver { from } => from.carrier(),
            Phase::Balanced => Some(Carrier::Haproxy),
        }
    }
}

/// Where new connections to the endpoint go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carrier {
    Forward(Vec<SocketAddr>),
    Haproxy,
}

/// The desired state, computed once from an accepted member set: both the forward and HAProxy
/// are driven from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub members: MemberSet,
    pub servers: Vec<Server>,
    pub unresolved: Vec<Unresolved>,
}

impl Desired {
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for s in &self.servers {
            if !out.contains(&s.addr) {
                out.push(s.addr);
            }
        }
        out.truncate(crate::forward::spec::MAX_TARGETS);
        out
    }

    /// The address each server has, so a later resolution keeps DNS members where they are.
    pub fn sticky(&self) -> BTreeMap<ServerName, SocketAddr> {
        self.servers.iter().map(|s| (s.name.clone(), s.addr)).collect()
    }
}

/// Something that happened, as the driver observed it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The agent started and read what the kernel holds.
    Started { adopted: Adopted },
    /// A member source gave a valid set, resolved to addresses (one policy, in the driver).
    MembersAccepted { set: MemberSet, origin: String, resolved: Resolved },
    /// A member source refused an update (it was invalid).
    MembersRejected { source: String, reason: String },
    /// A member source cannot be read right now.
    SourceProblem { source: String, message: String },
    /// HAProxy's backend as read through its admin socket.
    Haproxy(Health),
    /// Whether HAProxy's process answers on its sockets at all.
    Liveness { alive: bool },
    /// The members among `probed` that answered `/readyz`.
    Probed { probed: Vec<SocketAddr>, ready: Vec<SocketAddr> },
    /// A request through the endpoint itself, as a client makes it.
    EndpointChecked(EndpointCheck),
    /// keepalived's VRRP state and whether this host holds the virtual IP.
    Vrrp(VrrpObserved),
    /// The VIP actuator rendered (or refused to render) keepalived.conf.
    VipConfigured(Result<String, String>),
    /// The last `Effect::ReleaseVip` finished.
    VipReleased(Result<String, String>),
    /// The last `Effect::Apply` finished.
    Applied(Result<String, String>),
    /// The last endpoint effect (forward, handover, reassert) finished.
    EndpointDone(Result<(), String>),
    /// Time passed (the driver wakes at [`Controller::next_wake`]).
    Tick,
    /// A new, valid configuration (SIGHUP).
    Reconfigure(Settings),
    /// SIGHUP with a configuration that was refused: nothing changes.
    ReconfigureRefused(String),
    /// SIGUSR1: re-apply HAProxy and put the forward back as it should be.
    Resync,
    /// The addresses the apiservers registered themselves under (the `default/kubernetes`
    /// EndpointSlice), compared with the member list for the drift report only.
    Registered(Vec<SocketAddr>),
    /// The endpoint actuator's watcher saw the kernel forward differ from what cpha installed.
    ForwardDrift(ForwardDrift),
    /// The last `Effect::RepairForward` finished: what it found and put back (`None`: the
    /// forward was in place by then).
    ForwardRepaired(Result<Option<String>, String>),
    /// Another table translates the endpoint before the forward can (`Some`, in words), or no
    /// longer does. cpha cannot out-rank it, and does not fight it: it reports it.
    ForwardOutranked(Option<String>),
    /// The files watcher (`owned::watch`) saw a file cpha owns differ from what it last wrote.
    FileDrift(crate::fsutil::owned::FileDrift),
    /// The last `Effect::RepairFile` finished: what it found and put back (`None`: in step).
    FileRepaired { object: &'static str, result: Result<Option<String>, String> },
    /// HAProxy's process is not the one cpha last talked to (its sockets were created anew:
    /// `systemctl restart`, a package upgrade), in words. Runtime-only state is gone.
    HaproxyRestarted(String),
}

/// The kernel forward differs from what cpha last installed: its table or chains deleted,
/// flushed or changed, its jumps removed, or a sysctl it needs turned off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardDrift {
    pub why: String,
}

/// A repair of something cpha owns that someone else changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// What was repaired (`forward`, `haproxy.cfg`, `keepalived.conf`, `vip-health`,
    /// `haproxy` for a restarted HAProxy brought back in step), the `object` label of `cpha_repairs_total`.
    pub object: &'static str,
    /// What had changed.
    pub why: String,
    /// When it was put back.
    pub at: Instant,
    /// From the drift first seen to the repair done.
    pub took: Duration,
}

/// A drift being repaired: since when, and whether a failed repair was reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Repairing {
    why: String,
    seen: Instant,
    failure_reported: bool,
}

impl Repairing {
    /// An episode first known from a failed repair (no drift report came before it).
    fn unknown(now: Instant) -> Self {
        Repairing { why: "unknown".into(), seen: now, failure_reported: false }
    }

    /// Whether this failure is the episode's first, to be reported (once per episode).
    fn first_failure(&mut self) -> bool {
        !std::mem::replace(&mut self.failure_reported, true)
    }
}

/// Something to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Install or retarget the forward to these targets (also bringing it back in a fallback).
    Forward(Vec<SocketAddr>),
    /// Move new connections to HAProxy.
    HandToHaproxy,
    /// Put back what the carrier needs in the kernel, if something removed it.
    Reassert,
    /// Compare the kernel forward with what was installed and put back what differs, with the
    /// install's own transaction.
    RepairForward,
    /// Something cpha owns was put back, for `cpha_repairs_total`.
    Repaired(Repair),
    /// Put the owned file `object` (haproxy.cfg, keepalived.conf, vip-health) back as cpha
    /// last wrote it, if it still differs.
    RepairFile(&'static str),
    /// Bring HAProxy (file and runtime) to these servers.
    Apply(Vec<Server>),
    /// Read HAProxy's backend.
    ReadHaproxy,
    /// Check HAProxy's sockets.
    CheckLiveness,
    /// Probe these members' `/readyz`.
    Probe(Vec<SocketAddr>),
    /// Make a request through the endpoint itself.
    CheckEndpoint,
    /// Tell keepalived this health (the tracked file), and why.
    Advertise {
        health: Advertised,
        why: String,
    },
    /// The members' addresses, for keepalived's unicast peers.
    VipMembers(Vec<IpAddr>),
    /// Remove the virtual IP from this host: keepalived is gone and left it.
    ReleaseVip,
    /// This host took (true) or lost the virtual IP, for the changes counter.
    VipChanged {
        held: bool,
    },
    /// The desired state changed: the member source talks to these members directly, and the
    /// next resolution keeps DNS members where they are.
    Known(Desired),
    /// A phase change, for `cpha_transitions_total`.
    Transition {
        from: &'static str,
        to: &'static str,
    },
    /// A member update refused (also after resolution), for the rejected counter.
    Rejected {
        source: String,
    },
    Event(Note),
    /// The member list and the apiservers' registrations have disagreed for longer than
    /// `drift_after` (`Some`), or agree again (`None`). A report only: HAProxy is not changed.
    Drift(Option<Drift>),
    /// READY=1 with this sentence: the endpoint is carried and the first apply is known.
    Ready(String),
    /// STATUS= this sentence.
    Status(String),
    /// The agent cannot go on (the bootstrap forward could not be installed).
    Fail(String),
}

/// How the member list and the apiservers' own registrations differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// Registered in the EndpointSlice, not in the member list: an apiserver HAProxy never
    /// sends to.
    pub unlisted: Vec<SocketAddr>,
    /// In the member list, not registered: a member that is gone or not an apiserver (yet).
    pub unregistered: Vec<SocketAddr>,
}

impl Drift {
    fn between(listed: &[SocketAddr], registered: &[SocketAddr]) -> Option<Drift> {
        let mut unlisted: Vec<SocketAddr> = registered.iter().filter(|a| !listed.contains(a)).copied().collect();
        let mut unregistered: Vec<SocketAddr> = listed.iter().filter(|a| !registered.contains(a)).copied().collect();
        unlisted.sort();
        unlisted.dedup();
        unregistered.sort();
        unregistered.dedup();
        (!unlisted.is_empty() || !unregistered.is_empty()).then_some(Drift { unlisted, unregistered })
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[SocketAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        f.write_str("the member list and the apiservers' registrations disagree")?;
        if !self.unlisted.is_empty() {
            write!(f, "; registered but not listed: {}", list(&self.unlisted))?;
        }
        if !self.unregistered.is_empty() {
            write!(f, "; listed but not registered: {}", list(&self.unregistered))?;
        }
        Ok(())
    }
}

/// A disagreement being watched: since when, and whether it was reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Drifting {
    drift: Drift,
    since: Instant,
    reported: bool,
}

/// A Kubernetes Event worth posting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
}

/// What an endpoint effect in flight will mean once it is done.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Bootstrap(Vec<SocketAddr>),
    HandOver,
    FallBack(Vec<SocketAddr>),
    Retarget(Vec<SocketAddr>),
    Reassert,
    Repair,
}

/// The controller's view, for `/status`, metrics and `cpha status`.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub phase: &'static str,
    pub phase_since: Instant,
    pub carrier: Option<Carrier>,
    /// A carrier is installed and a request through the endpoint reached a ready member.
    pub endpoint_carried: bool,
    pub endpoint_check: Option<Result<(), String>>,
    pub members: Vec<String>,
    pub members_origin: String,
    pub unresolved: Vec<String>,
    pub ready_members: Vec<SocketAddr>,
    pub last_rejected_update: Option<String>,
    pub source_problem: Option<String>,
    pub haproxy: Health,
    pub haproxy_alive: bool,
    pub last_apply: Option<String>,
    pub last_error: Option<String>,
    pub ready_sent: bool,
    /// The reported drift between the member list and the registrations, and since when the
    /// two disagree.
    pub drift: Option<(String, Instant)>,
    pub vip: Option<VipView>,
    /// The last repair of something cpha owns.
    pub last_repair: Option<Repair>,
    /// Another table's rule that translates the endpoint before the forward.
    pub outranked: Option<String>,
}

/// The virtual IP as this host sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct VipView {
    pub advertised: Option<Advertised>,
    pub vrrp: Option<Vrrp>,
    pub holds: bool,
    pub since: Instant,
    pub last_config: Option<String>,
}

/// The controller's part of the virtual IP: the advertised health with its hysteresis, and
/// what keepalived last said.
#[derive(Debug, Clone)]
struct VipState {
    policy: VipPolicy,
    advertised: Option<Advertised>,
    /// The last check's kind ([`EndpointCheck::kind`]) and how many checks in a row had it.
    run: Option<(u8, u32)>,
    /// Since when the endpoint has answered nothing, in the current run of such checks.
    unreachable_since: Option<Instant>,
    /// A probe round in that run found no member ready: an outage of the apiservers, and while
    /// the run lasts the endpoint is not blamed (after the outage the members answer this
    /// host's probes before HAProxy's checks have them UP again).
    outage_seen: bool,
    was_healthy: bool,
    /// When worse health was last advertised.
    lowered_at: Option<Instant>,
    observed: Option<VrrpObserved>,
    holds_since: Instant,
    releasing: bool,
    /// A removal failed: when to try it again, while keepalived is still gone and the address
    /// still here (nothing else would remove it, and no new observation may come).
    release_retry_at: Option<Instant>,
    members: Option<Vec<IpAddr>>,
    last_config: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Apply {
    /// Nothing to do.
    Idle,
    /// The desired state differs from what was last applied: apply when allowed.
    Due,
    /// An apply runs; `again` when a newer desired state arrived meanwhile.
    Running { again: bool },
}

/// See the module documentation.
#[derive(Debug)]
pub struct Controller {
    settings: Settings,
    /// When the controller was made: earlier than every input.
    created: Instant,
    phase: Phase,
    phase_since: Instant,
    pending: Option<Pending>,
    desired: Option<Desired>,
    origin: String,
    apply: Apply,
    last_apply_started: Option<Instant>,
    /// The first apply (or its failure) is known, or nothing was known to apply.
    first_apply_known: bool,
    ready_sent: bool,
    healthy_run: u32,
    unhealthy_run: u32,
    haproxy: Health,
    gone_run: u32,
    alive: bool,
    /// Reads in a row in which HAProxy's sockets accepted connections but its admin socket
    /// did not answer, and whether that episode was already reconciled.
    mute_run: u32,
    mute_reconciled: bool,
    ready_members: Option<Vec<SocketAddr>>,
    /// When the last probe round that found a ready member began.
    ready_at: Option<Instant>,
    probe_started: Instant,
    endpoint_check: Option<EndpointCheck>,
    next_read: Instant,
    next_liveness: Instant,
    next_probe: Instant,
    probing: bool,
    last_rejected: Option<String>,
    source_problem: Option<String>,
    last_apply: Option<String>,
    last_error: Option<String>,
    registered: Option<Vec<SocketAddr>>,
    drifting: Option<Drifting>,
    vip: Option<VipState>,
    next_check: Instant,
    repairing: Option<Repairing>,
    last_repair: Option<Repair>,
    outranked: Option<String>,
    /// Owned files being repaired, by object.
    files_repairing: BTreeMap<&'static str, Repairing>,
    /// A restart of HAProxy by someone else, until the apply after it is done.
    restarted: Option<Repairing>,
}

impl VipState {
    fn new(policy: VipPolicy, now: Instant) -> Self {
        Self {
            policy,
            advertised: None,
            run: None,
            unreachable_since: None,
            outage_seen: false,
            was_healthy: false,
            lowered_at: None,
            observed: None,
            holds_since: now,
            releasing: false,
            release_retry_at: None,
            members: None,
            last_config: None,
        }
    }

    /// One endpoint check: the health to advertise now, if it changes.
    ///
    /// The first check sets it at once (a restarted agent must not first advertise something
    /// it does not know). After that, worse health needs `fall` checks in a row that argue for
    /// it; better health needs `rise` in a row, and healthy needs `holdDown` since health was
    /// last lowered, so a flapping host gives the address away once and does not take it back
    /// at each flap. Withdrawn may step up to degraded within the hold-down: a degraded host
    /// holds the address only where no host is healthy (all apiservers back after an outage).
    fn check(&mut self, now: Instant, check: &EndpointCheck, ready_at: Option<Instant>) -> Option<Advertised> {
        if matches!(check, EndpointCheck::Unreachable(_)) {
            self.unreachable_since.get_or_insert(now);
        } else {
            self.unreachable_since = None;
            self.outage_seen = false;
        }
        let members_answer =
            !self.outage_seen && matches!((ready_at, self.unreachable_since), (Some(r), Some(u)) if r >= u);
        let argued = check.argues(self.was_healthy, members_answer);
        let count = match self.run {
            Some((last, n)) if last == check.kind() => n.saturating_add(1),
            _ => 1,
        };
        self.run = Some((check.kind(), count));
        let next = match self.advertised {
            None => argued,
            Some(current) if current == argued => return None,
            Some(current) if rank(argued) < rank(current) => {
                if count < self.policy.fall {
                    return None;
                }
                self.lowered_at = Some(now);
                argued
            }
            Some(current) => {
                if count < self.policy.rise {
                    return None;
                }
                let held_down =
                    self.lowered_at.is_some_and(|at| now.saturating_duration_since(at) < self.policy.hold_down);
                // Within the hold-down a withdrawn host may come back as degraded (it takes
                // the address only where no host is healthy) but not as healthy.
                let next = if held_down { Advertised::Degraded } else { argued };
                if rank(next) <= rank(current) {
                    return None;
                }
                next
            }
        };
        if next == Advertised::Healthy {
            self.was_healthy = true;
        }
        self.advertised = Some(next);
        Some(next)
    }
}

/// After a failed removal of the address a killed keepalived left, the next attempt.
const RELEASE_RETRY: Duration = Duration::from_secs(1);

/// Consecutive "gone" liveness checks before the fast fallback: one refused connect may be a
/// socket being replaced.
const GONE_AFTER: u32 = 2;

/// Reads of a HAProxy that runs but does not answer on cpha's admin socket before an apply
/// reconciles it.
const MUTE_AFTER: u32 = 3;

impl Controller {
    pub fn new(settings: Settings, now: Instant) -> Self {
        let vip = settings.vip.clone().map(|policy| VipState::new(policy, now));
        Self {
            settings,
            created: now,
            phase: Phase::Starting,
            phase_since: now,
            pending: None,
            desired: None,
            origin: "none yet".into(),
            apply: Apply::Idle,
            last_apply_started: None,
            first_apply_known: false,
            ready_sent: false,
            healthy_run: 0,
            unhealthy_run: 0,
            haproxy: Health::default(),
            gone_run: 0,
            alive: false,
            mute_run: 0,
            mute_reconciled: false,
            ready_members: None,
            ready_at: None,
            probe_started: now,
            endpoint_check: None,
            next_read: now,
            next_liveness: now,
            next_probe: now,
            probing: false,
            last_rejected: None,
            source_problem: None,
            last_apply: None,
            last_error: None,
            registered: None,
            drifting: None,
            vip,
            next_check: now,
            repairing: None,
            last_repair: None,
            outranked: None,
            files_repairing: BTreeMap::new(),
            restarted: None,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn desired(&self) -> Option<&Desired> {
        self.desired.as_ref()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// When the driver should next send [`Input::Tick`].
    pub fn next_wake(&self) -> Instant {
        let mut wake = self.next_liveness.min(self.next_read).min(self.next_check);
        if let Some(at) = self.vip.as_ref().and_then(|v| v.release_retry_at) {
            wake = wake.min(at);
        }
        if !self.probing && self.desired.is_some() {
            wake = wake.min(self.next_probe);
        }
        if let (Apply::Due, Some(at)) = (self.apply, self.apply_allowed_at()) {
            wake = wake.min(at);
        }
        if let (Some(d), Some(after)) = (&self.drifting, self.settings.drift_after) {
            if !d.reported {
                wake = wake.min(d.since + after);
            }
        }
        wake
    }

    /// A carrier is installed and a request through the endpoint reached a ready member.
    fn carried(&self) -> bool {
        self.phase.carrier().is_some() && self.endpoint_check == Some(EndpointCheck::Ready)
    }

    pub fn view(&self) -> View {
        let carrier = self.phase.carrier();
        View {
            phase: self.phase.name(),
            phase_since: self.phase_since,
            endpoint_carried: self.carried(),
            carrier,
            endpoint_check: self.endpoint_check.as_ref().map(EndpointCheck::as_result),
            members: self.desired.iter().flat_map(|d| d.members.iter().map(ToString::to_string)).collect(),
            members_origin: self.origin.clone(),
            unresolved: self.desired.iter().flat_map(|d| d.unresolved.iter().map(ToString::to_string)).collect(),
            ready_members: self.ready_members.clone().unwrap_or_default(),
            last_rejected_update: self.last_rejected.clone(),
            source_problem: self.source_problem.clone(),
            haproxy: self.haproxy,
            haproxy_alive: self.alive,
            last_apply: self.last_apply.clone(),
            last_error: self.last_error.clone(),
            ready_sent: self.ready_sent,
            drift: self.drifting.as_ref().filter(|d| d.reported).map(|d| (d.drift.to_string(), d.since)),
            vip: self.vip.as_ref().map(|v| VipView {
                advertised: v.advertised,
                vrrp: v.observed.map(|o| o.vrrp),
                holds: v.observed.is_some_and(|o| o.holds),
                since: v.holds_since,
                last_config: v.last_config.clone(),
            }),
            last_repair: self.last_repair.clone(),
            outranked: self.outranked.clone(),
        }
    }

    /// One input at `now`; returns what to do, in order.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        let mut out = Vec::new();
        let carried_before = self.carried();
        match input {
            Input::Started { adopted } => self.started(now, adopted, &mut out),
            Input::MembersAccepted { set, origin, resolved } => self.accepted(set, origin, resolved, &mut out),
            // The source counted this rejection itself.
            Input::MembersRejected { source, reason } => self.reject(source, reason, &mut out),
            Input::SourceProblem { source, message } => {
                self.source_problem = Some(format!("{source}: {message}"));
            }
            Input::Haproxy(health) => self.observe(now, health, &mut out),
            Input::Liveness { alive } => self.liveness(alive, &mut out),
            Input::Probed { probed, ready } => self.probed(now, probed, ready, &mut out),
            Input::EndpointChecked(check) => self.endpoint_checked(now, check, &mut out),
            Input::Vrrp(observed) => self.vrrp(now, observed, &mut out),
            Input::VipConfigured(result) => self.vip_configured(result, &mut out),
            Input::VipReleased(result) => {
                let failed = result.is_err();
                if let Some(vip) = &mut self.vip {
                    vip.releasing = false;
                    vip.release_retry_at = failed.then(|| now + RELEASE_RETRY);
                }
                match result {
                    Ok(report) => out.push(Effect::Event(Note {
                        warning: true,
                        reason: "VipReleased",
                        action: "ReleaseVip",
                        message: report,
                    })),
                    Err(err) => {
                        self.last_error =
                            Some(format!("removing the virtual IP keepalived left (again in {RELEASE_RETRY:?}): {err}"))
                    }
                }
            }
            Input::Applied(result) => self.applied(now, result, &mut out),
            Input::EndpointDone(result) => self.endpoint_done(now, result, &mut out),
            Input::Tick => {}
            Input::Reconfigure(settings) => {
                // The HAProxy settings may have changed what is rendered: apply again.
                if let (Some(vip), Some(policy)) = (&mut self.vip, &settings.vip) {
                    vip.policy = policy.clone();
                }
                self.settings = settings;
                self.healthy_run = 0;
                self.unhealthy_run = 0;
                self.mark_due();
            }
            Input::ReconfigureRefused(reason) => {
                self.last_error = Some(format!("configuration reload refused: {reason}"))
            }
            Input::Resync => {
                if self.pending.is_none() && self.phase.carrier().is_some() {
                    self.pending = Some(Pending::Reassert);
                    out.push(Effect::Reassert);
                }
                self.mark_due();
                self.last_apply_started = None;
            }
            Input::Registered(addresses) => self.registered = Some(addresses),
            Input::ForwardDrift(drift) => self.forward_drift(now, drift, &mut out),
            Input::ForwardRepaired(result) => self.forward_repaired(now, result, &mut out),
            Input::ForwardOutranked(by) if by != self.outranked => {
                out.push(Effect::Event(match &by {
                    Some(by) => Note {
                        warning: true,
                        reason: "ForwardOutranked",
                        action: "Compare",
                        message: format!("{by}: new connections to the endpoint go where that rule sends them, not where cpha does; cpha leaves it alone"),
                    },
                    None => Note {
                        warning: false,
                        reason: "ForwardNotOutranked",
                        action: "Compare",
                        message: "no other table translates the endpoint before cpha's forward any more".into(),
                    },
                }));
                self.outranked = by;
            }
            Input::ForwardOutranked(_) => {}
            Input::FileDrift(drift) => self.file_drift(now, drift, &mut out),
            Input::FileRepaired { object, result } => self.file_repaired(now, object, result, &mut out),
            Input::HaproxyRestarted(why) => {
                // Its runtime state is new: apply at once, whatever the interval (the apply
                // reads what runs and changes only what differs).
                self.restarted.get_or_insert(Repairing { why, seen: now, failure_reported: false });
                self.mark_due();
                self.last_apply_started = None;
            }
        }
        self.compare(now, &mut out);
        self.schedule(now, &mut out);
        self.maybe_ready(&mut out);
        if self.ready_sent && carried_before != self.carried() {
            out.push(Effect::Status(self.sentence()));
        }
        out
    }

    /// The drift report: the member list against the apiservers' registrations, reported once
    /// they have disagreed for `drift_after`, and again when the difference changes or ends.
    /// It never changes what HAProxy or the forward do.
    fn compare(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let Some(after) = self.settings.drift_after else { return };
        let drift = match (&self.desired, &self.registered) {
            (Some(desired), Some(registered)) => {
                let listed: Vec<SocketAddr> = desired.servers.iter().map(|s| s.addr).collect();
                Drift::between(&listed, registered)
            }
            // Until both are known there is nothing to compare.
            _ => return,
        };
        match (drift, self.drifting.take()) {
            (None, Some(was)) if was.reported => {
                out.push(Effect::Drift(None));
                out.push(Effect::Event(Note {
                    warning: false,
                    reason: "MembersInSync",
                    action: "Compare",
                    message: "the member list matches the apiservers' registrations again".into(),
                }));
            }
            (None, _) => {}
            (Some(drift), was) => {
                let mut d = match was {
                    Some(was) if was.drift == drift => was,
                    // A different difference while reported is reported at once; before, it
                    // keeps the time the disagreement began.
                    Some(was) => Drifting { drift, since: was.since, reported: false },
                    None => Drifting { drift, since: now, reported: false },
                };
                if !d.reported && now >= d.since + after {
                    d.reported = true;
                    out.push(Effect::Drift(Some(d.drift.clone())));
                    out.push(Effect::Event(Note {
                        warning: true,
                        reason: "MembersDrift",
                        action: "Compare",
                        message: format!(
                            "{} (for {}; HAProxy is left as the member list says)",
                            d.drift,
                            humantime::format_duration(Duration::from_secs((now - d.since).as_secs()))
                        ),
                    }));
                }
                self.drifting = Some(d);
            }
        }
    }

    fn started(&mut self, now: Instant, adopted: Adopted, out: &mut Vec<Effect>) {
        match adopted {
            Adopted::Haproxy => self.enter(now, Phase::Balanced, None, out),
            Adopted::Forward(targets) => self.enter(now, Phase::Forwarding { targets }, None, out),
            Adopted::Nothing => {
                let targets = self.settings.bootstrap_targets.clone();
                self.bootstrap(targets, out);
            }
        }
    }

    /// Installs the bootstrap forward once there is somewhere to send it.
    fn bootstrap(&mut self, targets: Vec<SocketAddr>, out: &mut Vec<Effect>) {
        if self.phase != Phase::Starting || self.pending.is_some() {
            return;
        }
        if targets.is_empty() {
            out.push(Effect::Status("waiting for a member list to forward the endpoint to".into()));
            return;
        }
        self.pending = Some(Pending::Bootstrap(targets.clone()));
        out.push(Effect::Forward(targets));
    }

    fn accepted(&mut self, set: MemberSet, origin: String, resolved: Resolved, out: &mut Vec<Effect>) {
        if resolved.servers.is_empty() && !set.is_empty() {
            // A set that resolves to nothing would empty the backend: refuse it like an
            // invalid one (docs/design-notes.md#unresolvable-members, design note 22).
            let why = resolved.unresolved.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            out.push(Effect::Rejected { source: origin.clone() });
            self.reject(origin, format!("no member resolves to a usable address ({why})"), out);
            return;
        }
        self.source_problem = None;
        let desired = Desired { members: set.clone(), servers: resolved.servers, unresolved: resolved.unresolved };
        let changed =
            self.desired.as_ref().map(|d| (&d.members, &d.servers)) != Some((&desired.members, &desired.servers));
        self.origin = origin;
        self.desired = Some(desired.clone());
        if !changed {
            return;
        }
        out.push(Effect::Known(desired));
        if let Some(vip) = &mut self.vip {
            let mut hosts: Vec<IpAddr> =
                self.desired.iter().flat_map(|d| d.servers.iter().map(|s| s.addr.ip())).collect();
            hosts.sort();
            hosts.dedup();
            if vip.members.as_ref() != Some(&hosts) {
                vip.members = Some(hosts.clone());
                out.push(Effect::VipMembers(hosts));
            }
        }
        self.mark_due();
        // New members: probe them now rather than at the next round; until then the members
        // known to be ready stay the forward's choice.
        let addresses = self.desired_addresses();
        if let Some(ready) = &mut self.ready_members {
            ready.retain(|a| addresses.contains(a));
        }
        self.next_probe = self.created;
        match self.phase.clone() {
            Phase::Starting => {
                let targets = self.desired_addresses();
                self.bootstrap(targets, out);
            }
            Phase::Forwarding { targets } | Phase::Fallback { targets } => {
                let want = self.forward_targets();
                if !want.is_empty() && want != targets && self.pending.is_none() {
                    self.pending = Some(Pending::Retarget(want.clone()));
                    out.push(Effect::Forward(want));
                }
            }
            Phase::HandingOver { .. } | Phase::Balanced => {}
        }
    }

    fn reject(&mut self, source: String, reason: String, out: &mut Vec<Effect>) {
        let keeping = match &self.desired {
            Some(d) => d.members.to_string(),
            None => "no set yet".into(),
        };
        out.push(Effect::Event(Note {
            warning: true,
            reason: "MembersRejected",
            action: "ValidateMembers",
            message: format!("{source}: {reason}; keeping {keeping}"),
        }));
        self.last_rejected = Some(format!("{source}: {reason}"));
    }

    fn observe(&mut self, now: Instant, health: Health, out: &mut Vec<Effect>) {
        if health.answers && !self.haproxy.answers {
            // HAProxy (re)started: whatever it runs is brought to the desired state.
            self.mark_due();
        }
        if health.stale && !matches!(self.apply, Apply::Running { .. }) {
            // The file would render differently (the cluster CA appeared): one apply, which
            // reloads because the digest changed. A running apply may have rendered before the
            // change; the next read says so again once it is done.
            self.mark_due();
        }
        self.haproxy = health;
        if health.answers {
            self.alive = true;
            self.gone_run = 0;
            self.mute_run = 0;
            self.mute_reconciled = false;
        } else if self.alive {
            // It runs (a socket accepts) but cpha's admin socket does not answer: HAProxy was
            // started on another file (a package's sample configuration before cpha's was
            // written) or lost the race with a restart. An apply reads what runs through the
            // master CLI and reloads it onto cpha's file; once per episode, so a socket cpha
            // cannot use is not reloaded again and again.
            self.mute_run = self.mute_run.saturating_add(1);
            if self.mute_run >= MUTE_AFTER && !self.mute_reconciled {
                self.mute_reconciled = true;
                self.mark_due();
            }
        }
        if health.answers && health.up > 0 {
            self.healthy_run = self.healthy_run.saturating_add(1);
            self.unhealthy_run = 0;
        } else {
            self.unhealthy_run = self.unhealthy_run.saturating_add(1);
            self.healthy_run = 0;
        }
        if self.pending.is_some() {
            return;
        }
        match self.phase.clone() {
            Phase::Forwarding { .. } | Phase::Fallback { .. } if self.healthy_run >= self.settings.rise => {
                let from = self.phase.clone();
                self.enter(now, Phase::HandingOver { from: Box::new(from) }, None, out);
                self.pending = Some(Pending::HandOver);
                out.push(Effect::HandToHaproxy);
            }
            Phase::Balanced if self.settings.fallback && self.unhealthy_run >= self.settings.fall => {
                self.fall_back(out);
            }
            _ => {}
        }
    }

    fn liveness(&mut self, alive: bool, out: &mut Vec<Effect>) {
        if alive {
            self.gone_run = 0;
            self.alive = true;
            return;
        }
        self.gone_run = self.gone_run.saturating_add(1);
        if self.gone_run < GONE_AFTER {
            return;
        }
        if self.alive || self.haproxy.answers {
            // Seen gone: the next time it answers is a (re)start to reconcile.
            self.haproxy = Health::default();
        }
        self.alive = false;
        self.healthy_run = 0;
        if self.phase == Phase::Balanced && self.settings.fallback && self.pending.is_none() {
            self.fall_back(out);
        }
    }

    fn fall_back(&mut self, out: &mut Vec<Effect>) {
        let targets = self.forward_targets();
        if targets.is_empty() {
            self.last_error = Some("HAProxy is unhealthy and no member address is known to fall back to".into());
            self.unhealthy_run = 0;
            return;
        }
        self.pending = Some(Pending::FallBack(targets.clone()));
        out.push(Effect::Forward(targets));
    }

    fn probed(&mut self, now: Instant, probed: Vec<SocketAddr>, ready: Vec<SocketAddr>, out: &mut Vec<Effect>) {
        self.probing = false;
        if probed != self.desired_addresses() {
            return; // an answer about an older member set
        }
        let none_ready = ready.is_empty();
        if !none_ready {
            // When the round began: an answer it got may predate a failure seen meanwhile.
            self.ready_at = Some(self.probe_started.min(now));
        } else if let Some(vip) = self.vip.as_mut().filter(|v| v.unreachable_since.is_some()) {
            vip.outage_seen = true;
        }
        if self.vip.as_ref().and_then(|v| v.unreachable_since).is_some_and(|u| self.probe_started < u) {
            // The endpoint failed while this round ran: ask again, after the failure.
            self.next_probe = now;
        }
        self.ready_members = Some(ready);
        // While the forward carries the endpoint, keep it on members that are ready; when none
        // is (all restarting at once), the targets it has are as good as any.
        if self.pending.is_some() || none_ready {
            return;
        }
        if let Phase::Forwarding { targets } | Phase::Fallback { targets } = &self.phase {
            let want = self.forward_targets();
            if !want.is_empty() && &want != targets {
                self.pending = Some(Pending::Retarget(want.clone()));
                out.push(Effect::Forward(want));
            }
        }
    }

    fn applied(&mut self, now: Instant, result: Result<String, String>, out: &mut Vec<Effect>) {
        self.first_apply_known = true;
        let again = matches!(self.apply, Apply::Running { again: true });
        match result {
            Ok(report) => {
                // Only an apply that began after the restart was seen read the new process.
                let after_restart = self
                    .restarted
                    .as_ref()
                    .is_some_and(|r| self.last_apply_started.is_some_and(|started| started >= r.seen));
                if let Some(r) = self.restarted.take_if(|_| after_restart) {
                    let repair =
                        Repair { object: "haproxy", why: r.why, at: now, took: now.saturating_duration_since(r.seen) };
                    out.push(Effect::Event(Note {
                        warning: true,
                        reason: "HaproxyResynced",
                        action: "Repair",
                        message: format!(
                            "HAProxy was restarted by someone else ({}): brought back to the desired servers {} ms after it was seen ({report})",
                            repair.why,
                            repair.took.as_millis()
                        ),
                    }));
                    out.push(Effect::Repaired(repair.clone()));
                    self.last_repair = Some(repair);
                }
                self.last_apply = Some(report);
                self.apply = if again { Apply::Due } else { Apply::Idle };
            }
            Err(err) => {
                // Nothing changed on a failed apply: try again once the interval allows.
                self.last_error = Some(format!("apply: {err}"));
                self.apply = Apply::Due;
            }
        }
    }

    fn endpoint_done(&mut self, now: Instant, result: Result<(), String>, out: &mut Vec<Effect>) {
        let Some(pending) = self.pending.take() else { return };
        match (pending, result) {
            (Pending::Bootstrap(targets), Ok(())) => self.enter(now, Phase::Forwarding { targets }, None, out),
            (Pending::Bootstrap(_), Err(err)) => {
                out.push(Effect::Fail(format!("installing the bootstrap forward: {err}")))
            }
            (Pending::HandOver, Ok(())) => {
                self.healthy_run = 0;
                let note = Note { warning: false, reason: "HandedOver", action: "HandOver", message: String::new() };
                self.enter(now, Phase::Balanced, Some(note), out);
            }
            (Pending::HandOver, Err(err)) => {
                self.healthy_run = 0;
                self.last_error = Some(format!("handover to HAProxy failed; the forward keeps the endpoint: {err}"));
                let Phase::HandingOver { from } = self.phase.clone() else { return };
                self.enter(now, *from, None, out);
            }
            (Pending::FallBack(targets), Ok(())) => {
                self.unhealthy_run = 0;
                let note = Note { warning: true, reason: "FellBack", action: "FallBack", message: String::new() };
                self.enter(now, Phase::Fallback { targets }, Some(note), out);
            }
            (Pending::FallBack(_), Err(err)) => {
                // Stay balanced; the next `fall` unhealthy checks (or "gone") try again.
                self.unhealthy_run = 0;
                self.gone_run = 0;
                self.last_error = Some(format!("fallback to the forward failed: {err}"));
            }
            (Pending::Retarget(targets), Ok(())) => {
                if let Phase::Forwarding { targets: t } | Phase::Fallback { targets: t } = &mut self.phase {
                    *t = targets;
                    out.push(Effect::Status(self.sentence()));
                }
            }
            (Pending::Retarget(_), Err(err)) => self.last_error = Some(format!("retargeting the forward: {err}")),
            // The repair's result comes as `ForwardRepaired`.
            (Pending::Repair, _) => {}
            (Pending::Reassert, Ok(())) => {}
            (Pending::Reassert, Err(err)) => self.last_error = Some(format!("resync of the forward: {err}")),
        }
    }

    /// The forward is not as installed: put it back, unless nothing is meant to be installed
    /// yet or an endpoint effect is in flight (it installs the forward's whole state itself;
    /// the watcher compares again after it).
    fn forward_drift(&mut self, now: Instant, drift: ForwardDrift, out: &mut Vec<Effect>) {
        if self.phase.carrier().is_none() || self.pending.is_some() {
            return;
        }
        self.repairing.get_or_insert(Repairing { why: drift.why, seen: now, failure_reported: false });
        self.pending = Some(Pending::Repair);
        out.push(Effect::RepairForward);
    }

    fn forward_repaired(&mut self, now: Instant, result: Result<Option<String>, String>, out: &mut Vec<Effect>) {
        if self.pending == Some(Pending::Repair) {
            self.pending = None;
        }
        match result {
            Ok(Some(why)) => {
                let seen = self.repairing.take().map_or(now, |r| r.seen);
                let repair = Repair { object: "forward", why, at: now, took: now.saturating_duration_since(seen) };
                out.push(Effect::Event(Note {
                    warning: true,
                    reason: "ForwardRepaired",
                    action: "Repair",
                    message: format!(
                        "the kernel forward was changed by someone else ({}): put back as cpha installed it, {} ms after the change was seen",
                        repair.why,
                        repair.took.as_millis()
                    ),
                }));
                out.push(Effect::Repaired(repair.clone()));
                self.last_repair = Some(repair);
            }
            // Seen before cpha's own change was read back: nothing to put back.
            Ok(None) => self.repairing = None,
            Err(err) => {
                self.last_error = Some(format!("repairing the forward: {err}"));
                let episode = self.repairing.get_or_insert_with(|| Repairing::unknown(now));
                // Once per episode: the watcher reports the drift again at its next look, and
                // each report is another attempt.
                if episode.first_failure() {
                    out.push(Effect::Event(Note {
                        warning: true,
                        reason: "ForwardRepairFailed",
                        action: "Repair",
                        message: format!(
                            "the kernel forward was changed by someone else ({}) and cannot be put back: {err}",
                            episode.why
                        ),
                    }));
                }
            }
        }
    }

    /// An owned file differs from what cpha last wrote: put it back (the actuator compares again).
    fn file_drift(&mut self, now: Instant, drift: crate::fsutil::owned::FileDrift, out: &mut Vec<Effect>) {
        self.files_repairing.entry(drift.object).or_insert(Repairing {
            why: drift.why,
            seen: now,
            failure_reported: false,
        });
        out.push(Effect::RepairFile(drift.object));
    }

    fn file_repaired(
        &mut self,
        now: Instant,
        object: &'static str,
        result: Result<Option<String>, String>,
        out: &mut Vec<Effect>,
    ) {
        match result {
            Ok(Some(why)) => {
                let seen = self.files_repairing.remove(object).map_or(now, |r| r.seen);
                let repair = Repair { object, why, at: now, took: now.saturating_duration_since(seen) };
                let follow = if object == "haproxy.cfg" && self.desired.is_some() {
                    // NOTE: HAProxy reads the file only when it (re)starts or reloads: the
                    // apply that follows compares the digest the running worker loaded with
                    // cpha's and reloads only when someone loaded other content meanwhile.
                    self.mark_due();
                    self.last_apply_started = None;
                    "; HAProxy checked against it"
                } else {
                    ""
                };
                out.push(Effect::Event(Note {
                    warning: true,
                    reason: "FileRepaired",
                    action: "Repair",
                    message: format!(
                        "{}: put back as cpha wrote it, {} ms after the change was seen{follow}",
                        repair.why,
                        repair.took.as_millis()
                    ),
                }));
                out.push(Effect::Repaired(repair.clone()));
                self.last_repair = Some(repair);
            }
            // Back in step by the time the actuator looked (cpha's own write, or undone).
            Ok(None) => {
                self.files_repairing.remove(object);
            }
            Err(err) => {
                self.last_error = Some(format!("repairing {object}: {err}"));
                let episode = self.files_repairing.entry(object).or_insert_with(|| Repairing::unknown(now));
                if episode.first_failure() {
                    out.push(Effect::Event(Note {
                        warning: true,
                        reason: "FileRepairFailed",
                        action: "Repair",
                        message: format!("{} and cannot be put back: {err}", episode.why),
                    }));
                }
            }
        }
    }

    /// Moves to `phase`, recording the transition with its true origin.
    fn enter(&mut self, now: Instant, phase: Phase, note: Option<Note>, out: &mut Vec<Effect>) {
        let from = self.phase.name();
        self.phase = phase;
        self.phase_since = now;
        let to = self.phase.name();
        if from != to {
            out.push(Effect::Transition { from, to });
        }
        let sentence = self.sentence();
        if let Some(mut note) = note {
            note.message = sentence.clone();
            out.push(Effect::Event(note));
        }
        out.push(Effect::Status(sentence));
    }

    fn schedule(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if now >= self.next_liveness {
            self.next_liveness = now + self.settings.liveness_interval;
            out.push(Effect::CheckLiveness);
        }
        if now >= self.next_read {
            self.next_read = now + self.settings.interval;
            out.push(Effect::ReadHaproxy);
        }
        if now >= self.next_check {
            self.next_check = now + self.check_interval();
            if self.phase.carrier().is_some() {
                out.push(Effect::CheckEndpoint);
            }
        }
        if let Some(vip) = &mut self.vip {
            if vip.release_retry_at.is_some_and(|at| now >= at) {
                vip.release_retry_at = None;
                if !vip.releasing && vip.observed.is_some_and(|o| o.vrrp == Vrrp::Gone && o.holds) {
                    vip.releasing = true;
                    out.push(Effect::ReleaseVip);
                }
            }
        }
        if !self.probing && now >= self.next_probe {
            let addresses = self.desired_addresses();
            if !addresses.is_empty() {
                self.probing = true;
                self.probe_started = now;
                self.next_probe = now + self.settings.probe_interval;
                out.push(Effect::Probe(addresses));
            }
        }
        if self.apply == Apply::Due {
            if let (Some(desired), Some(at)) = (&self.desired, self.apply_allowed_at()) {
                if now >= at {
                    self.apply = Apply::Running { again: false };
                    self.last_apply_started = Some(now);
                    out.push(Effect::Apply(desired.servers.clone()));
                }
            }
        }
    }

    /// The endpoint is checked every `handover.interval`, or more often for a virtual IP.
    fn check_interval(&self) -> Duration {
        match &self.vip {
            Some(vip) => vip.policy.check_interval.min(self.settings.interval),
            None => self.settings.interval,
        }
    }

    fn endpoint_checked(&mut self, now: Instant, check: EndpointCheck, out: &mut Vec<Effect>) {
        let ready_at = self.ready_at;
        let fresh_failure = matches!(check, EndpointCheck::Unreachable(_))
            && !matches!(self.endpoint_check, Some(EndpointCheck::Unreachable(_)));
        if fresh_failure && self.vip.is_some() {
            // Whether to withdraw depends on whether any apiserver still answers this host:
            // ask now rather than at the next round.
            self.next_probe = now;
        }
        if let Some(level) = self.vip.as_mut().and_then(|vip| vip.check(now, &check, ready_at)) {
            let why = match &check {
                EndpointCheck::Ready => "a ready apiserver answers through the endpoint".to_string(),
                EndpointCheck::NotReady(why) | EndpointCheck::Unreachable(why) => why.clone(),
            };
            if level == Advertised::Withdrawn {
                out.push(Effect::Event(Note {
                    warning: true,
                    reason: "VipWithdrawn",
                    action: "Advertise",
                    message: format!("the endpoint stopped working on this host ({why}): giving up the virtual IP"),
                }));
            }
            out.push(Effect::Advertise { health: level, why });
        }
        self.endpoint_check = Some(check);
    }

    fn vrrp(&mut self, now: Instant, observed: VrrpObserved, out: &mut Vec<Effect>) {
        let Some(vip) = &mut self.vip else { return };
        let held_before = vip.observed.is_some_and(|o| o.holds);
        let gone_before = vip.observed.is_some_and(|o| o.vrrp == Vrrp::Gone);
        vip.observed = Some(observed);
        if observed.vrrp == Vrrp::Gone && !gone_before {
            out.push(Effect::Event(Note {
                warning: true,
                reason: "KeepalivedGone",
                action: "ObserveVrrp",
                message: "keepalived is not running: this host cannot hold the virtual IP".into(),
            }));
        }
        if observed.holds != held_before {
            vip.holds_since = now;
            out.push(Effect::VipChanged { held: observed.holds });
            if observed.holds {
                out.push(Effect::Event(Note {
                    warning: false,
                    reason: "VipTaken",
                    action: "HoldVip",
                    message: format!("this host holds the virtual IP now (VRRP {})", observed.vrrp.name()),
                }));
            }
        }
        // A killed keepalived leaves the address on the interface, and a backup takes it over:
        // two hosts would answer for it. Nobody else removes it until keepalived restarts.
        if observed.vrrp == Vrrp::Gone && observed.holds && !vip.releasing {
            vip.releasing = true;
            out.push(Effect::ReleaseVip);
        }
    }

    fn vip_configured(&mut self, result: Result<String, String>, out: &mut Vec<Effect>) {
        let Some(vip) = &mut self.vip else { return };
        match result {
            Ok(report) => vip.last_config = Some(report),
            Err(err) => {
                out.push(Effect::Event(Note {
                    warning: true,
                    reason: "VipConfigRefused",
                    action: "RenderKeepalived",
                    message: err.clone(),
                }));
                self.last_error = Some(format!("keepalived: {err}"));
            }
        }
    }

    fn maybe_ready(&mut self, out: &mut Vec<Effect>) {
        if self.ready_sent || self.phase.carrier().is_none() {
            return;
        }
        if self.desired.is_some() && !self.first_apply_known {
            return;
        }
        self.ready_sent = true;
        out.push(Effect::Ready(self.sentence()));
    }

    fn mark_due(&mut self) {
        if self.desired.is_none() {
            return;
        }
        self.apply = match self.apply {
            Apply::Running { .. } => Apply::Running { again: true },
            _ => Apply::Due,
        };
    }

    /// When an apply may start: at once after `minApplyInterval` has passed since the last one.
    fn apply_allowed_at(&self) -> Option<Instant> {
        match self.apply {
            Apply::Running { .. } => None,
            _ => Some(match self.last_apply_started {
                Some(last) => last + self.settings.min_apply_interval,
                None => self.created,
            }),
        }
    }

    fn desired_addresses(&self) -> Vec<SocketAddr> {
        self.desired.as_ref().map(Desired::addresses).unwrap_or_default()
    }

    /// Where a forward should point: the desired members that answered `/readyz`; before any
    /// probe answered (or when none is ready), every desired member; before any member is
    /// known, the bootstrap targets.
    fn forward_targets(&self) -> Vec<SocketAddr> {
        let all = self.desired_addresses();
        if all.is_empty() {
            return self.settings.bootstrap_targets.clone();
        }
        match &self.ready_members {
            Some(ready) if !ready.is_empty() => ready.clone(),
            _ => all,
        }
    }

    /// A human sentence for STATUS= and the log.
    pub fn sentence(&self) -> String {
        let phase = self.phase.name();
        let verified = match &self.endpoint_check {
            Some(EndpointCheck::Ready) => "",
            Some(_) => " (no ready apiserver answers through it yet)",
            None => " (not checked yet)",
        };
        match self.phase.carrier() {
            Some(Carrier::Haproxy) => format!("{phase}: HAProxy carries the endpoint{verified}"),
            Some(Carrier::Forward(t)) => format!(
                "{phase}: the forward sends the endpoint to {}{verified}",
                t.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
            None => format!("{phase}: the endpoint is not carried yet"),
        }
    }
}
