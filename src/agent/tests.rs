//! The sequences an operator meets, through the pure controller (no root, no netns, no I/O),
//! and through the driver with in-memory actuators.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::controller::{
    Adopted, Controller, Drift, Effect, EndpointCheck, ForwardDrift, Input, Phase, Repair, Settings, VipPolicy,
};
use crate::haproxy::resolve::{Resolved, Unresolved};
use crate::haproxy::{Health, Server};
use crate::members::{parse, MemberSet, ParseOptions};
use crate::vip::{Advertised, Vrrp, VrrpObserved};

fn settings() -> Settings {
    Settings {
        rise: 2,
        fall: 3,
        fallback: true,
        interval: Duration::from_secs(1),
        probe_interval: Duration::from_secs(5),
        liveness_interval: Duration::from_millis(200),
        min_apply_interval: Duration::from_secs(2),
        bootstrap_targets: vec![],
        drift_after: None,
        vip: None,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn set(text: &str) -> MemberSet {
    parse(text, &ParseOptions::default()).unwrap()
}

/// IP members as the resolver gives them.
fn accepted(text: &str) -> Input {
    let set = set(text);
    let servers = set.iter().map(|m| Server { name: m.name().clone(), addr: m.socket_addr().unwrap() }).collect();
    Input::MembersAccepted { set, origin: "configmap".into(), resolved: Resolved { servers, unresolved: vec![] } }
}

const HEALTHY: Health = Health { answers: true, up: 3, total: 3, draining: 0, stale: false, maint: 0 };
const NO_UP: Health = Health { answers: true, up: 0, total: 3, draining: 0, stale: false, maint: 0 };

/// A controller and a clock that only moves when told to.
struct Run {
    c: Controller,
    t0: Instant,
    now: Instant,
}

impl Run {
    fn new(settings: Settings) -> Run {
        let t0 = Instant::now();
        Run { c: Controller::new(settings, t0), t0, now: t0 }
    }

    fn at(&mut self, ms: u64) -> &mut Self {
        self.now = self.t0 + Duration::from_millis(ms);
        self
    }

    fn input(&mut self, input: Input) -> Vec<Effect> {
        self.c.handle(self.now, input)
    }

    /// The effects that change something (the periodic reads and probes left out).
    fn acts(&mut self, input: Input) -> Vec<Effect> {
        self.input(input)
            .into_iter()
            .filter(|e| {
                !matches!(
                    e,
                    Effect::ReadHaproxy
                        | Effect::CheckLiveness
                        | Effect::CheckEndpoint
                        | Effect::Probe(_)
                        | Effect::Status(_)
                        | Effect::Known(_)
                )
            })
            .collect()
    }

    /// Runs an endpoint effect's result back in.
    fn done(&mut self) -> Vec<Effect> {
        self.acts(Input::EndpointDone(Ok(())))
    }

    fn phase(&self) -> &'static str {
        self.c.phase().name()
    }
}

fn transitions(effects: &[Effect]) -> Vec<(&'static str, &'static str)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Transition { from, to } => Some((*from, *to)),
            _ => None,
        })
        .collect()
}

fn has_apply(effects: &[Effect]) -> bool {
    effects.iter().any(|e| matches!(e, Effect::Apply(_)))
}

fn ready(effects: &[Effect]) -> bool {
    effects.iter().any(|e| matches!(e, Effect::Ready(_)))
}

/// Three members, forwarded to and applied once, HAProxy not healthy yet.
fn forwarding() -> Run {
    let mut r = Run::new(settings());
    assert!(r.acts(Input::Started { adopted: Adopted::Nothing }).is_empty(), "nothing to forward to yet");
    let e = r.acts(accepted("10.0.0.1, 10.0.0.2, 10.0.0.3"));
    assert!(e.contains(&Effect::Forward(vec![addr("10.0.0.1:6443"), addr("10.0.0.2:6443"), addr("10.0.0.3:6443")])));
    assert!(has_apply(&e), "{e:?}");
    let e = r.done();
    assert_eq!(transitions(&e), [("starting", "forwarding")]);
    assert!(!ready(&e), "READY waits for the first apply");
    let e = r.acts(Input::Applied(Ok("file written".into())));
    assert!(ready(&e), "{e:?}");
    r
}

fn balanced() -> Run {
    let mut r = forwarding();
    r.at(1000).acts(Input::Haproxy(HEALTHY));
    let e = r.at(2000).acts(Input::Haproxy(HEALTHY));
    assert_eq!(e[..2], [Effect::Transition { from: "forwarding", to: "handing-over" }, Effect::HandToHaproxy]);
    // HAProxy answering for the first time is reconciled, once the interval allows.
    assert!(matches!(&e[2..], [Effect::Apply(s)] if s.len() == 3), "{e:?}");
    let e = r.done();
    assert_eq!(transitions(&e), [("handing-over", "balanced")]);
    assert!(e.iter().any(|e| matches!(e, Effect::Event(n) if n.reason == "HandedOver")), "{e:?}");
    assert_eq!(r.phase(), "balanced");
    assert!(r.acts(Input::Applied(Ok("runtime".into()))).is_empty());
    r
}

#[test]
fn bootstrap_to_the_configured_targets_is_ready_at_once() {
    let mut r = Run::new(Settings { bootstrap_targets: vec![addr("10.0.0.9:6443")], ..settings() });
    let e = r.acts(Input::Started { adopted: Adopted::Nothing });
    assert_eq!(e, [Effect::Forward(vec![addr("10.0.0.9:6443")])]);
    assert_eq!(r.phase(), "starting", "until the forward is in place");
    let e = r.done();
    assert_eq!(transitions(&e), [("starting", "forwarding")]);
    assert!(ready(&e), "no member set known: READY needs only the forward");
    assert!(!r.c.view().endpoint_carried, "not verified through the endpoint yet");
}

#[test]
fn bootstrap_waits_for_members_and_ready_waits_for_the_first_apply() {
    let r = forwarding();
    assert!(r.c.view().ready_sent);
}

#[test]
fn a_failed_bootstrap_forward_stops_the_agent() {
    let mut r = Run::new(Settings { bootstrap_targets: vec![addr("10.0.0.9:6443")], ..settings() });
    r.acts(Input::Started { adopted: Adopted::Nothing });
    let e = r.acts(Input::EndpointDone(Err("nft: permission denied".into())));
    assert!(matches!(&e[..], [Effect::Fail(m)] if m.contains("permission denied")), "{e:?}");
}

#[test]
fn handover_records_each_transition_once_with_its_true_origin() {
    balanced();
}

#[test]
fn a_failed_handover_goes_back_and_counts_anew() {
    let mut r = forwarding();
    r.at(1000).acts(Input::Haproxy(HEALTHY));
    r.at(2000).acts(Input::Haproxy(HEALTHY));
    r.acts(Input::Applied(Ok("runtime".into())));
    let e = r.acts(Input::EndpointDone(Err("nft: busy".into())));
    assert_eq!(transitions(&e), [("handing-over", "forwarding")]);
    assert_eq!(r.phase(), "forwarding");
    assert!(r.c.view().last_error.unwrap().contains("nft: busy"));
    assert!(r.at(3000).acts(Input::Haproxy(HEALTHY)).is_empty(), "counting starts anew");
    assert_eq!(r.at(4000).acts(Input::Haproxy(HEALTHY))[1], Effect::HandToHaproxy);
}

#[test]
fn falls_back_after_fall_unhealthy_checks_to_ready_members_and_returns() {
    let mut r = balanced();
    r.acts(Input::Probed {
        probed: vec![addr("10.0.0.1:6443"), addr("10.0.0.2:6443"), addr("10.0.0.3:6443")],
        ready: vec![addr("10.0.0.2:6443")],
    });
    assert!(r.at(3000).acts(Input::Haproxy(NO_UP)).is_empty());
    assert!(r.at(4000).acts(Input::Haproxy(NO_UP)).is_empty());
    let e = r.at(5000).acts(Input::Haproxy(NO_UP));
    assert_eq!(e, [Effect::Forward(vec![addr("10.0.0.2:6443")])]);
    let e = r.done();
    assert_eq!(transitions(&e), [("balanced", "fallback")]);
    assert!(e.iter().any(|e| matches!(e, Effect::Event(n) if n.reason == "FellBack" && n.warning)));
    r.at(6000).acts(Input::Haproxy(HEALTHY));
    let e = r.at(7000).acts(Input::Haproxy(HEALTHY));
    assert_eq!(transitions(&e), [("fallback", "handing-over")]);
    let e = r.done();
    assert_eq!(transitions(&e), [("handing-over", "balanced")]);
}

#[test]
fn haproxy_gone_falls_back_at_once_but_not_on_one_refused_connect() {
    let mut r = balanced();
    assert!(r.at(2200).acts(Input::Liveness { alive: false }).is_empty(), "one refused connect is not gone");
    assert!(r.at(2400).acts(Input::Liveness { alive: true }).is_empty());
    assert!(r.at(2600).acts(Input::Liveness { alive: false }).is_empty());
    let e = r.at(2800).acts(Input::Liveness { alive: false });
    assert_eq!(e, [Effect::Forward(vec![addr("10.0.0.1:6443"), addr("10.0.0.2:6443"), addr("10.0.0.3:6443")])]);
    r.done();
    assert_eq!(r.phase(), "fallback");
    // HAProxy back: a (re)start to reconcile, then the handover.
    r.at(3000).acts(Input::Haproxy(HEALTHY));
    let e = r.at(4000).acts(Input::Haproxy(HEALTHY));
    assert!(e.contains(&Effect::HandToHaproxy), "{e:?}");
    assert!(has_apply(&e), "HAProxy answering again is reconciled: {e:?}");
}

#[test]
fn no_fallback_when_disabled() {
    let mut r = Run::new(Settings { fallback: false, bootstrap_targets: vec![addr("10.0.0.9:6443")], ..settings() });
    r.acts(Input::Started { adopted: Adopted::Haproxy });
    for i in 0..10 {
        assert!(r.at(i * 1000).acts(Input::Haproxy(NO_UP)).is_empty());
        assert!(r.acts(Input::Liveness { alive: false }).is_empty());
    }
    assert_eq!(r.phase(), "balanced");
}

#[test]
fn restart_adopted_at_haproxy_falls_back_when_haproxy_is_unhealthy() {
    let mut r = Run::new(settings());
    let e = r.acts(Input::Started { adopted: Adopted::Haproxy });
    assert_eq!(r.phase(), "balanced");
    assert_eq!(transitions(&e), [("starting", "balanced")]);
    assert!(ready(&e), "{e:?}");
    r.acts(accepted("10.0.0.1, 10.0.0.2"));
    for (i, t) in [1000, 2000].into_iter().enumerate() {
        assert!(
            !r.at(t).acts(Input::Haproxy(Health::default())).iter().any(|e| matches!(e, Effect::Forward(_))),
            "{i}"
        );
    }
    let e = r.at(3000).acts(Input::Haproxy(Health::default()));
    assert!(e.contains(&Effect::Forward(vec![addr("10.0.0.1:6443"), addr("10.0.0.2:6443")])), "{e:?}");
}

#[test]
fn restart_adopted_at_haproxy_while_healthy_hands_over_no_second_time() {
    let mut r = Run::new(settings());
    r.acts(Input::Started { adopted: Adopted::Haproxy });
    r.acts(accepted("10.0.0.1, 10.0.0.2"));
    for t in 1..20 {
        let e = r.at(t * 1000).acts(Input::Haproxy(HEALTHY));
        assert!(transitions(&e).is_empty() && !e.contains(&Effect::HandToHaproxy), "{e:?}");
    }
}

#[test]
fn restart_adopted_forward_hands_over_when_haproxy_is_healthy() {
    let mut r = Run::new(settings());
    let e = r.acts(Input::Started { adopted: Adopted::Forward(vec![addr("10.0.0.1:6443")]) });
    assert_eq!(transitions(&e), [("starting", "forwarding")]);
    assert!(!e.iter().any(|e| matches!(e, Effect::Forward(_))), "an adopted forward is not installed again");
    r.at(1000).acts(Input::Haproxy(HEALTHY));
    assert_eq!(r.at(2000).acts(Input::Haproxy(HEALTHY)).last(), Some(&Effect::HandToHaproxy));
}

#[test]
fn an_unresolvable_member_list_keeps_the_last_good_state() {
    let mut r = balanced();
    let before = r.c.desired().cloned();
    r.at(10_000);
    let set = set("cp1=cp1.invalid, cp2=cp2.invalid");
    let unresolved =
        set.iter().map(|m| Unresolved { member: m.to_string(), reason: "no such host".into(), kept: None }).collect();
    let e = r.acts(Input::MembersAccepted {
        set,
        origin: "configmap".into(),
        resolved: Resolved { servers: vec![], unresolved },
    });
    assert!(!has_apply(&e), "nothing drained: {e:?}");
    assert!(e.contains(&Effect::Rejected { source: "configmap".into() }), "counted: {e:?}");
    assert!(e.iter().any(|e| matches!(e, Effect::Event(n) if n.reason == "MembersRejected")));
    assert_eq!(r.c.desired().cloned(), before);
    assert!(r.c.view().last_rejected_update.unwrap().contains("no member resolves"));
}

#[test]
fn an_explicitly_empty_set_is_applied() {
    let mut r = balanced();
    let e = r.at(10_000).acts(Input::MembersAccepted {
        set: MemberSet::new(),
        origin: "configmap".into(),
        resolved: Resolved::default(),
    });
    assert_eq!(e, [Effect::Apply(vec![])], "allowEmpty lets an empty set through the source");
}

#[test]
fn applies_at_once_then_exactly_when_the_interval_allows_coalesced() {
    let mut r = balanced();
    // The last apply started at 2 s; an edit at 3.5 s waits until 4 s, not for a tick.
    assert!(!has_apply(&r.at(3500).acts(accepted("10.0.0.1, 10.0.0.2"))));
    assert!(r.c.next_wake() <= r.t0 + Duration::from_millis(4000));
    assert!(!has_apply(&r.at(3900).acts(Input::Tick)));
    assert!(!has_apply(&r.at(3950).acts(accepted("10.0.0.1, 10.0.0.4"))), "coalesced");
    let e = r.at(4000).acts(Input::Tick);
    assert_eq!(
        e,
        [Effect::Apply(vec![
            Server { name: "m-10.0.0.1-6443".parse().unwrap(), addr: addr("10.0.0.1:6443") },
            Server { name: "m-10.0.0.4-6443".parse().unwrap(), addr: addr("10.0.0.4:6443") },
        ])]
    );
    // One apply at a time: an edit while it runs is applied after it, once allowed.
    assert!(!has_apply(&r.at(4100).acts(accepted("10.0.0.5"))));
    assert!(!has_apply(&r.at(6500).acts(Input::Tick)), "still running");
    let e = r.at(6600).acts(Input::Applied(Ok("runtime".into())));
    assert!(has_apply(&e), "interval passed while it ran: at once: {e:?}");
    r.acts(Input::Applied(Ok("runtime".into())));
    // Quiet for longer than the interval: the next edit is applied the moment it arrives.
    assert!(has_apply(&r.at(12_000).acts(accepted("10.0.0.6"))));
}

#[test]
fn a_failed_apply_is_retried_once_the_interval_allows() {
    let mut r = balanced();
    r.at(5000).acts(accepted("10.0.0.1"));
    let e = r.at(5100).acts(Input::Applied(Err("haproxy -c: bad".into())));
    assert!(!has_apply(&e));
    assert!(r.c.view().last_error.unwrap().contains("haproxy -c: bad"));
    assert!(has_apply(&r.at(7000).acts(Input::Tick)));
}

#[test]
fn sighup_refused_changes_nothing_and_accepted_changes_thresholds() {
    let mut r = forwarding();
    r.at(1000).acts(Input::Haproxy(HEALTHY));
    let e = r.acts(Input::ReconfigureRefused("haproxy.balance: unknown".into()));
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(r.c.settings(), &settings());
    assert!(r.at(2000).acts(Input::Haproxy(HEALTHY)).contains(&Effect::HandToHaproxy), "the run was kept");
    r.done();
    r.acts(Input::Applied(Ok("runtime".into())));
    let e = r.at(5000).acts(Input::Reconfigure(Settings { fall: 1, ..settings() }));
    assert!(has_apply(&e), "new settings may render differently: {e:?}");
    r.acts(Input::Applied(Ok("runtime".into())));
    let e = r.at(6000).acts(Input::Haproxy(NO_UP));
    assert!(matches!(&e[..], [Effect::Forward(_)]), "fall is 1 now: {e:?}");
}

#[test]
fn sigusr1_reasserts_the_forward_and_applies_now() {
    let mut r = balanced();
    let e = r.at(500).acts(Input::Resync);
    assert_eq!(e[0], Effect::Reassert);
    assert!(has_apply(&e), "even within minApplyInterval: {e:?}");
    r.done();
    assert_eq!(r.phase(), "balanced");
}

#[test]
fn a_member_update_during_a_handover_is_applied_and_waits_for_the_move() {
    let mut r = forwarding();
    r.at(3000).acts(Input::Haproxy(HEALTHY));
    r.at(4000).acts(Input::Haproxy(HEALTHY));
    // HAProxy's first answer at 3 s started a reconcile; the edit waits for it.
    let e = r.at(4100).acts(accepted("10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4"));
    assert!(e.is_empty(), "no retarget while the handover is in flight, no second apply: {e:?}");
    r.done();
    assert_eq!(r.phase(), "balanced");
    let e = r.at(5000).acts(Input::Applied(Ok("runtime".into())));
    assert!(matches!(&e[..], [Effect::Apply(s)] if s.len() == 4), "{e:?}");
}

#[test]
fn forwarding_follows_the_members_that_answer_readyz() {
    let mut r = forwarding();
    let all = vec![addr("10.0.0.1:6443"), addr("10.0.0.2:6443"), addr("10.0.0.3:6443")];
    assert!(r.acts(Input::Probed { probed: vec![addr("10.0.0.1:6443")], ready: vec![] }).is_empty(), "stale answer");
    let e = r.acts(Input::Probed { probed: all.clone(), ready: vec![addr("10.0.0.3:6443")] });
    assert_eq!(e, [Effect::Forward(vec![addr("10.0.0.3:6443")])]);
    r.done();
    assert_eq!(r.c.phase(), &Phase::Forwarding { targets: vec![addr("10.0.0.3:6443")] });
    assert!(r.acts(Input::Probed { probed: all.clone(), ready: vec![] }).is_empty(), "none ready: keep the last");
    // A failed retarget keeps the phase's targets.
    r.acts(Input::Probed { probed: all.clone(), ready: vec![addr("10.0.0.1:6443")] });
    r.acts(Input::EndpointDone(Err("nft: busy".into())));
    assert_eq!(r.c.phase(), &Phase::Forwarding { targets: vec![addr("10.0.0.3:6443")] });
}

#[test]
fn flapping_around_the_thresholds_moves_nothing() {
    let mut r = forwarding();
    let moves = |e: Vec<Effect>| e.into_iter().filter(|e| !matches!(e, Effect::Apply(_))).collect::<Vec<_>>();
    for i in 0..20 {
        let health = if i % 2 == 0 { HEALTHY } else { NO_UP };
        assert!(moves(r.at(1000 * i).acts(Input::Haproxy(health))).is_empty(), "{i}");
    }
    let mut r = balanced();
    for i in 0..20 {
        let health = if i % 3 == 2 { HEALTHY } else { NO_UP };
        assert!(r.at(3000 + 1000 * i).acts(Input::Haproxy(health)).is_empty(), "{i}");
    }
    assert_eq!(r.phase(), "balanced");
}

#[test]
fn readiness_is_what_a_request_through_the_endpoint_sees() {
    let mut r = balanced();
    assert!(!r.c.view().endpoint_carried);
    let e = r.input(Input::EndpointChecked(EndpointCheck::Ready));
    assert!(r.c.view().endpoint_carried);
    assert!(e.iter().any(|e| matches!(e, Effect::Status(_))), "a change of truth is announced");
    r.input(Input::EndpointChecked(EndpointCheck::Unreachable("10.0.0.10:6443: connection refused".into())));
    let v = r.c.view();
    assert!(!v.endpoint_carried);
    assert!(r.c.sentence().contains("no ready apiserver"), "{}", r.c.sentence());
}

#[test]
fn periodic_work_is_scheduled_by_time() {
    let mut r = forwarding();
    let e = r.at(200).input(Input::Tick);
    assert!(e.contains(&Effect::CheckLiveness), "{e:?}");
    assert!(!e.contains(&Effect::ReadHaproxy));
    let e = r.at(1000).input(Input::Tick);
    assert!(e.contains(&Effect::ReadHaproxy) && e.contains(&Effect::CheckEndpoint), "{e:?}");
}

#[test]
fn a_haproxy_that_runs_on_another_file_is_reconciled_once() {
    // HAProxy restarted on the package's sample configuration: its master socket accepts, the
    // admin socket cpha's file names does not answer. One apply brings it onto cpha's file.
    let mut r = forwarding();
    let mute = Health { answers: false, up: 0, total: 0, draining: 0, stale: false, maint: 0 };
    assert!(!has_apply(&r.at(1000).acts(Input::Liveness { alive: true })));
    assert!(!has_apply(&r.at(1000).acts(Input::Haproxy(mute))));
    assert!(!has_apply(&r.at(2000).acts(Input::Haproxy(mute))));
    let e = r.at(3000).acts(Input::Haproxy(mute));
    assert!(has_apply(&e), "{e:?}");
    r.acts(Input::Applied(Ok("reloaded".into())));
    for t in 4..20 {
        assert!(!has_apply(&r.at(1000 * t).acts(Input::Haproxy(mute))), "{t}: once per episode");
    }
    // Answering resets the episode (and is reconciled as a start, as before).
    assert!(has_apply(&r.at(21_000).acts(Input::Haproxy(HEALTHY))));
    r.acts(Input::Applied(Ok("runtime".into())));
    for t in 22..24 {
        assert!(!has_apply(&r.at(1000 * t).acts(Input::Haproxy(mute))), "{t}");
    }
    assert!(has_apply(&r.at(24_000).acts(Input::Haproxy(mute))), "a new episode is reconciled again");
}

#[test]
fn a_file_that_would_render_differently_is_applied_once() {
    // The cluster CA appeared: the HAProxy actuator reads that the file would now render with
    // verified checks. One apply (which reloads), not one per read.
    let mut r = balanced();
    let stale = Health { stale: true, ..HEALTHY };
    let e = r.at(10_000).acts(Input::Haproxy(stale));
    assert!(matches!(&e[..], [Effect::Apply(s)] if s.len() == 3), "{e:?}");
    assert!(!has_apply(&r.at(11_000).acts(Input::Haproxy(stale))), "one apply at a time");
    assert!(r.acts(Input::Applied(Ok("reload".into()))).is_empty(), "nothing queued behind it");
    assert!(!has_apply(&r.at(12_000).acts(Input::Haproxy(HEALTHY))));
    assert!(!has_apply(&r.at(20_000).acts(Input::Tick)));
    assert_eq!(r.phase(), "balanced");
}

// ----------------------------------------------------------------------------------------------
// The virtual IP: the health advertised to keepalived, and what keepalived says.

fn vip_settings() -> Settings {
    Settings {
        vip: Some(VipPolicy {
            rise: 3,
            fall: 2,
            hold_down: Duration::from_secs(10),
            check_interval: Duration::from_millis(500),
        }),
        ..settings()
    }
}

fn advertised(effects: &[Effect]) -> Vec<Advertised> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Advertise { health, .. } => Some(*health),
            _ => None,
        })
        .collect()
}

fn unreachable() -> Input {
    Input::EndpointChecked(EndpointCheck::Unreachable("10.0.0.10:6443: connection refused".into()))
}

fn check_ready() -> Input {
    Input::EndpointChecked(EndpointCheck::Ready)
}

/// The answer to the probe round in flight: `ready` of vip_healthy's three members.
fn probed(ready: &[&str]) -> Input {
    let all = ["10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"].map(addr).to_vec();
    Input::Probed { probed: all, ready: ready.iter().map(|a| addr(a)).collect() }
}

/// One input at `t` whose probe round, if it asks for one, finds every member ready.
fn with_members_up(r: &mut Run, t: u64, input: Input) -> Vec<Advertised> {
    let e = r.at(t).input(input);
    if e.iter().any(|e| matches!(e, Effect::Probe(_))) {
        r.at(t + 10).input(probed(&["10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"]));
    }
    advertised(&e)
}

/// An endpoint check that finds nothing answering, then this host's own probes (the round
/// the failure starts) finding the members ready: the endpoint is broken here.
fn unreachable_here(r: &mut Run, t: u64) -> Vec<Effect> {
    let e = r.at(t).acts(unreachable());
    r.at(t + 10).input(probed(&["10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"]));
    e
}

/// Forwarding with a VIP, the endpoint checked healthy.
fn vip_healthy() -> Run {
    let mut r = Run::new(vip_settings());
    r.acts(Input::Started { adopted: Adopted::Nothing });
    let e = r.acts(accepted("10.0.0.3, 10.0.0.1, 10.0.0.2"));
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert!(e.contains(&Effect::VipMembers(vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")])), "{e:?}");
    r.done();
    r.acts(Input::Applied(Ok("file written".into())));
    assert_eq!(advertised(&r.at(100).acts(check_ready())), [Advertised::Healthy], "the first check decides at once");
    // The probe round in flight finds every member ready.
    r.at(150).input(probed(&["10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"]));
    r
}

#[test]
fn first_boot_holds_the_vip_degraded_until_an_apiserver_answers() {
    let mut r = Run::new(vip_settings());
    r.acts(Input::Started { adopted: Adopted::Nothing });
    r.acts(accepted("10.0.0.1"));
    r.done();
    // Before kubeadm init nothing answers behind the forward: degraded, not withdrawn, so the
    // first host still holds the address kubeadm dials.
    assert_eq!(advertised(&r.at(100).acts(unreachable())), [Advertised::Degraded]);
    for t in [600, 1100, 1600] {
        assert!(advertised(&r.at(t).acts(unreachable())).is_empty(), "{t}");
    }
    assert!(advertised(&r.at(2100).acts(check_ready())).is_empty());
    assert!(advertised(&r.at(2600).acts(check_ready())).is_empty());
    assert_eq!(advertised(&r.at(3100).acts(check_ready())), [Advertised::Healthy], "rise, no hold-down at first");
}

#[test]
fn a_host_whose_endpoint_stops_working_withdraws_after_fall_checks() {
    let mut r = vip_healthy();
    assert!(advertised(&unreachable_here(&mut r, 600)).is_empty(), "one failure is not enough");
    assert!(advertised(&r.at(1100).acts(check_ready())).is_empty());
    assert!(advertised(&unreachable_here(&mut r, 1600)).is_empty());
    let e = r.at(2100).acts(unreachable());
    assert_eq!(advertised(&e), [Advertised::Withdrawn]);
    assert!(e.iter().any(|e| matches!(e, Effect::Event(n) if n.reason == "VipWithdrawn" && n.warning)), "{e:?}");
    // Back within the hold-down: degraded (it holds the address only where none is healthy).
    for t in [2600, 3100] {
        assert!(advertised(&r.at(t).acts(check_ready())).is_empty(), "{t}");
    }
    assert_eq!(advertised(&r.at(3600).acts(check_ready())), [Advertised::Degraded]);
    for t in (4100..12_100).step_by(500) {
        assert!(advertised(&r.at(t).acts(check_ready())).is_empty(), "{t}: held down");
    }
    assert_eq!(advertised(&r.at(12_100).acts(check_ready())), [Advertised::Healthy], "10 s after the fall");
}

#[test]
fn an_apiserver_that_answers_not_ready_degrades_instead_of_withdrawing() {
    let mut r = vip_healthy();
    let not_ready = || Input::EndpointChecked(EndpointCheck::NotReady("answered /readyz with HTTP 500".into()));
    assert!(advertised(&r.at(600).acts(not_ready())).is_empty());
    assert_eq!(advertised(&r.at(1100).acts(not_ready())), [Advertised::Degraded]);
    assert_eq!(advertised(&unreachable_here(&mut r, 1600)), [], "a new kind of failure counts anew");
    assert_eq!(advertised(&r.at(2100).acts(unreachable())), [Advertised::Withdrawn]);
}

#[test]
fn every_apiserver_down_degrades_and_the_holder_keeps_the_address() {
    let mut r = vip_healthy();
    // Nothing answers through the endpoint, and this host's own probes find no member ready
    // either: an outage of the apiservers, which every host sees alike.
    let e = r.at(600).input(unreachable());
    assert!(e.iter().any(|e| matches!(e, Effect::Probe(_))), "the failure asks the members at once: {e:?}");
    r.at(700).input(probed(&[]));
    let mut changes = Vec::new();
    for t in (1100..6100).step_by(500) {
        changes.extend(advertised(&r.at(t).acts(unreachable())));
        if t % 2000 == 100 {
            r.at(t + 10).input(probed(&[]));
        }
    }
    assert_eq!(changes, [Advertised::Degraded], "degraded, never withdrawn: {changes:?}");
    // The first apiserver is back: the holder serves through it; health rises after the hold-down.
    r.at(6210).input(probed(&["10.0.0.2:6443"]));
    for t in (6600..16_600).step_by(500) {
        assert!(!advertised(&r.at(t).acts(check_ready())).contains(&Advertised::Withdrawn), "{t}");
    }
}

#[test]
fn a_probe_answered_before_the_failure_does_not_withdraw() {
    let mut r = vip_healthy();
    // vip_healthy's members answered at 150; nothing answers from 600 on, and the round the
    // failure starts finds no member ready: that older answer does not count.
    r.at(600).input(unreachable());
    r.at(620).input(probed(&[]));
    assert_eq!(advertised(&r.at(1100).acts(unreachable())), [Advertised::Degraded]);
    // The apiservers come back: this host's probes find one ready before HAProxy's checks
    // have it UP, and the endpoint still fails for a while. That is the end of the outage, not
    // a broken endpoint here: no withdrawal.
    let mut t = 1600;
    let mut answered = false;
    while t < 8_000 {
        let e = r.at(t).input(unreachable());
        assert!(!advertised(&e).contains(&Advertised::Withdrawn), "withdrawn after the outage at {t}");
        if e.iter().any(|e| matches!(e, Effect::Probe(_))) {
            r.at(t + 10).input(probed(&["10.0.0.1:6443"]));
            answered = true;
        }
        t += 500;
    }
    assert!(answered, "no probe round after the outage");
    // The endpoint works again; when it fails next while the members answer, it is broken here.
    r.at(t).input(check_ready());
    let e = r.at(t + 500).input(unreachable());
    assert!(e.iter().any(|e| matches!(e, Effect::Probe(_))), "{e:?}");
    r.at(t + 510).input(probed(&["10.0.0.1:6443"]));
    assert_eq!(advertised(&r.at(t + 1000).acts(unreachable())), [Advertised::Withdrawn]);
}

#[test]
fn a_flapping_endpoint_does_not_bounce_the_vip() {
    let mut r = vip_healthy();
    let mut changes = Vec::new();
    // Two failures, one success, for a minute: it gives the address away once and never
    // claims it back while it flaps.
    for i in 0..120u64 {
        let input = if i % 3 == 2 { check_ready() } else { unreachable() };
        changes.extend(with_members_up(&mut r, 600 + 500 * i, input));
    }
    assert_eq!(changes, [Advertised::Withdrawn], "{changes:?}");
    // Alternating success and failure never reaches `fall`: it keeps the address.
    let mut r = vip_healthy();
    for i in 0..120u64 {
        let input = if i % 2 == 0 { unreachable() } else { check_ready() };
        assert!(with_members_up(&mut r, 600 + 500 * i, input).is_empty(), "{i}");
    }
}

#[test]
fn a_killed_keepalived_leaves_the_address_and_it_is_removed_once() {
    let mut r = vip_healthy();
    let observed = |vrrp, holds| Input::Vrrp(VrrpObserved { vrrp, holds });
    let e = r.acts(observed(Vrrp::Master, true));
    assert!(e.contains(&Effect::VipChanged { held: true }), "{e:?}");
    assert!(e.iter().any(|e| matches!(e, Effect::Event(n) if n.reason == "VipTaken")), "{e:?}");
    let v = r.c.view().vip.unwrap();
    assert!(v.holds && v.vrrp == Some(Vrrp::Master));
    let e = r.acts(observed(Vrrp::Gone, true));
    assert!(e.iter().any(|e| matches!(e, Effect::Event(n) if n.reason == "KeepalivedGone" && n.warning)), "{e:?}");
    assert_eq!(e.last(), Some(&Effect::ReleaseVip));
    assert_eq!(e.iter().filter(|e| **e == Effect::ReleaseVip).count(), 1);
    assert!(r.acts(observed(Vrrp::Gone, true)).is_empty(), "one removal at a time");
    let e = r.acts(Input::VipReleased(Ok("removed 10.0.0.10/32 from eth0".into())));
    assert!(e.iter().any(|e| matches!(e, Effect::Event(n) if n.reason == "VipReleased")), "{e:?}");
    assert_eq!(r.acts(observed(Vrrp::Gone, false)), [Effect::VipChanged { held: false }]);
    // A backup that holds the address briefly is keepalived's business, not cpha's.
    let e = r.acts(observed(Vrrp::Backup, true));
    assert!(!e.contains(&Effect::ReleaseVip), "{e:?}");
}

#[test]
fn a_failed_removal_of_the_address_is_retried_until_it_is_gone() {
    let mut r = vip_healthy();
    let observed = |vrrp, holds| Input::Vrrp(VrrpObserved { vrrp, holds });
    r.at(1000).acts(observed(Vrrp::Master, true));
    assert_eq!(r.at(2000).acts(observed(Vrrp::Gone, true)).last(), Some(&Effect::ReleaseVip));
    // `ip address del` failed: nothing new is observed (keepalived is still gone, the address
    // still here), so the controller itself tries again a second later, and reports meanwhile.
    let e = r.at(2010).acts(Input::VipReleased(Err("ip address del: RTNETLINK answers: busy".into())));
    assert!(!e.iter().any(|e| matches!(e, Effect::Event(n) if n.reason == "VipReleased")), "{e:?}");
    let error = r.c.view().last_error.unwrap();
    assert!(error.contains("removing the virtual IP keepalived left") && error.contains("busy"), "{error}");
    assert!(r.c.next_wake() <= r.t0 + Duration::from_millis(3010));
    assert!(!r.at(2500).input(Input::Tick).contains(&Effect::ReleaseVip), "not before the retry is due");
    assert_eq!(r.at(3010).input(Input::Tick).iter().filter(|e| **e == Effect::ReleaseVip).count(), 1);
    assert!(!r.at(3020).input(Input::Tick).contains(&Effect::ReleaseVip), "one removal at a time");
    let e = r.at(3030).acts(Input::VipReleased(Ok("removed 10.0.0.10/32 from eth0".into())));
    assert!(e.iter().any(|e| matches!(e, Effect::Event(n) if n.reason == "VipReleased")), "{e:?}");
    assert!(!r.at(9000).input(Input::Tick).contains(&Effect::ReleaseVip), "no retry after a success");
    // A failure after which keepalived came back (it owns the address again): no retry.
    r.at(10_000).acts(observed(Vrrp::Gone, false));
    r.at(10_100).acts(observed(Vrrp::Gone, true));
    r.at(10_110).acts(Input::VipReleased(Err("failed".into())));
    r.at(10_500).acts(observed(Vrrp::Backup, true));
    assert!(!r.at(11_200).input(Input::Tick).contains(&Effect::ReleaseVip));
}

#[test]
fn the_same_members_do_not_reconfigure_keepalived() {
    let mut r = vip_healthy();
    let e = r.acts(accepted("10.0.0.1, 10.0.0.2, 10.0.0.3"));
    assert!(!e.iter().any(|e| matches!(e, Effect::VipMembers(_))), "{e:?}");
    let e = r.acts(accepted("10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4"));
    assert!(e.iter().any(|e| matches!(e, Effect::VipMembers(m) if m.len() == 4)), "{e:?}");
    let e = r.acts(Input::VipConfigured(Err("keepalived --config-test refused the rendered file".into())));
    assert!(e.iter().any(|e| matches!(e, Effect::Event(n) if n.reason == "VipConfigRefused")), "{e:?}");
    assert!(r.c.view().last_error.unwrap().contains("keepalived"));
}

#[test]
fn with_a_vip_the_endpoint_is_checked_at_its_interval() {
    let mut r = vip_healthy();
    let checks = |e: Vec<Effect>| e.iter().filter(|e| matches!(e, Effect::CheckEndpoint)).count();
    let mut n = 0;
    for t in (200..=3000).step_by(100) {
        n += checks(r.at(t).input(Input::Tick));
    }
    assert_eq!(n, 6, "every 500 ms over 3 s");
}

// ----------------------------------------------------------------------------------------------
// The driver with in-memory actuators.

mod driver {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::sync::mpsc;

    use super::*;
    use crate::agent::driver::{Driver, Ended, HaproxyHandle, Reloaded, Signal};
    use crate::agent::fake::{FakeEndpoint, FakeFiles, FakeHaproxy, FakeProbes, FakeReporter, FakeVip, Log};

    struct Rig {
        endpoint: Log,
        /// What the fake endpoint's next repair finds changed.
        drifted: Arc<Mutex<Option<String>>>,
        /// The fake endpoint's actions (repairs too) fail while set.
        endpoint_fails: Arc<AtomicBool>,
        haproxy: FakeHaproxy,
        probes: FakeProbes,
        reporter: FakeReporter,
        files: FakeFiles,
        inputs: mpsc::Sender<Input>,
        signals: mpsc::Sender<Signal>,
        task: tokio::task::JoinHandle<anyhow::Result<Ended>>,
    }

    fn rig(adopted: Adopted, reload: Result<Settings, String>) -> Rig {
        rig_with(adopted, reload, settings(), true)
    }

    /// `keep`: how the driver shuts down. The VIP fake writes into the endpoint's log, so the
    /// order of the two shows.
    fn rig_with(adopted: Adopted, reload: Result<Settings, String>, start: Settings, keep: bool) -> Rig {
        let endpoint = Log::default();
        let haproxy = FakeHaproxy {
            log: Log::default(),
            health: Arc::new(Mutex::new(Health::default())),
            fail: Arc::new(AtomicBool::new(false)),
            restart: Arc::new(Mutex::new(None)),
        };
        let probes = FakeProbes {
            alive: Arc::new(AtomicBool::new(false)),
            ready: Arc::new(Mutex::new(vec![])),
            endpoint_ok: Arc::new(AtomicBool::new(true)),
        };
        let reporter = FakeReporter::default();
        let files = FakeFiles::default();
        let drifted = Arc::new(Mutex::new(None));
        let endpoint_fails = Arc::new(AtomicBool::new(false));
        let (inputs_tx, inputs) = mpsc::channel(64);
        let (signals_tx, signals) = mpsc::channel(8);
        let (handle, _worker) = HaproxyHandle::spawn(haproxy.clone(), inputs_tx.clone());
        let mut driver = Driver {
            controller: Controller::new(start, tokio::time::Instant::now().into_std()),
            endpoint: FakeEndpoint {
                log: endpoint.clone(),
                adopted,
                fail: endpoint_fails.clone(),
                drifted: drifted.clone(),
            },
            haproxy: handle,
            probes: probes.clone(),
            reporter: reporter.clone(),
            vip: FakeVip { log: endpoint.clone(), fail: Arc::new(AtomicBool::new(false)) },
            files: files.clone(),
            inputs_tx: inputs_tx.clone(),
            inputs,
            signals,
            reload: Box::new(move || {
                reload.clone().map(|controller| Reloaded {
                    controller,
                    haproxy: Default::default(),
                    bind: "192.0.2.10:9445".parse().unwrap(),
                })
            }),
        };
        let task = tokio::task::spawn_local(async move {
            let ended = driver.run().await?;
            driver.shutdown(keep).await;
            Ok(ended)
        });
        Rig {
            endpoint,
            drifted,
            endpoint_fails,
            haproxy,
            probes,
            reporter,
            files,
            inputs: inputs_tx,
            signals: signals_tx,
            task,
        }
    }

    async fn wait(what: &str, f: impl Fn() -> bool) {
        for _ in 0..2000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn local<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    #[test]
    fn restarted_at_a_dead_haproxy_the_endpoint_falls_back_within_the_liveness_checks() {
        local(async {
            let r = rig(Adopted::Haproxy, Err("unused".into()));
            r.inputs.send(accepted("10.0.0.1, 10.0.0.2")).await.unwrap();
            let started = tokio::time::Instant::now();
            wait("the fallback forward", || r.endpoint.count("forward") == 1).await;
            assert!(started.elapsed() <= Duration::from_millis(700), "{:?}", started.elapsed());
            assert!(r.endpoint.lines()[0].contains("10.0.0.1:6443"), "{:?}", r.endpoint.lines());
            wait("fallback phase", || r.reporter.view.lock().unwrap().as_ref().is_some_and(|v| v.phase == "fallback"))
                .await;
            // HAProxy comes back: reconciled, then handed the endpoint again.
            r.probes.alive.store(true, Ordering::SeqCst);
            *r.haproxy.health.lock().unwrap() = HEALTHY;
            wait("the handover", || r.endpoint.count("handover") == 1).await;
            assert!(r.haproxy.log.count("apply") >= 1);
            r.signals.send(Signal::Stop).await.unwrap();
            assert_eq!(r.task.await.unwrap().unwrap(), Ended::Stopped);
            assert_eq!(r.endpoint.lines().last().unwrap(), "shutdown keep=true");
        });
    }

    #[test]
    fn a_drifted_forward_is_repaired_at_once_and_reported_once_per_episode() {
        local(async {
            let r = rig(Adopted::Haproxy, Err("unused".into()));
            r.probes.alive.store(true, Ordering::SeqCst);
            *r.haproxy.health.lock().unwrap() = HEALTHY;
            r.inputs.send(accepted("10.0.0.1, 10.0.0.2")).await.unwrap();
            wait("the first apply", || r.haproxy.log.count("apply") == 1).await;
            // The watcher saw the table deleted: repaired with no wait for any periodic check.
            *r.drifted.lock().unwrap() = Some("table inet cpha deleted".into());
            let seen = tokio::time::Instant::now();
            r.inputs.send(Input::ForwardDrift(ForwardDrift { why: "table inet cpha deleted".into() })).await.unwrap();
            wait("the repair", || r.reporter.log.count("repaired forward: table inet cpha deleted") == 1).await;
            // At the first look of `wait`: no periodic check (`interval` is 1 s) is waited for.
            assert!(seen.elapsed() <= Duration::from_millis(10), "{:?}", seen.elapsed());
            assert_eq!(r.reporter.log.count("event ForwardRepaired"), 1);
            let repair = r.reporter.view.lock().unwrap().as_ref().and_then(|v| v.last_repair.clone()).unwrap();
            assert_eq!((repair.object, repair.why.as_str()), ("forward", "table inet cpha deleted"));
            // A report from before cpha's own transaction was read back: nothing to put back,
            // nothing said.
            r.inputs.send(Input::ForwardDrift(ForwardDrift { why: "chain output changed".into() })).await.unwrap();
            wait("the second look", || r.endpoint.count("repair") == 2).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(r.reporter.log.count("event ForwardRepaired"), 1);
            // A repair that fails is reported once, retried at each report, and the success
            // after it ends the episode.
            r.endpoint_fails.store(true, Ordering::SeqCst);
            *r.drifted.lock().unwrap() = Some("chain prerouting flushed".into());
            for n in 3..=5 {
                r.inputs
                    .send(Input::ForwardDrift(ForwardDrift { why: "chain prerouting flushed".into() }))
                    .await
                    .unwrap();
                wait("an attempt", || r.endpoint.count("repair") == n).await;
            }
            assert_eq!(r.reporter.log.count("event ForwardRepairFailed"), 1, "{:?}", r.reporter.log.lines());
            r.endpoint_fails.store(false, Ordering::SeqCst);
            r.inputs.send(Input::ForwardDrift(ForwardDrift { why: "chain prerouting flushed".into() })).await.unwrap();
            wait("the repair", || r.reporter.log.count("repaired forward: chain prerouting flushed") == 1).await;
            assert_eq!(r.reporter.log.count("event ForwardRepaired"), 2);
            r.signals.send(Signal::Stop).await.unwrap();
            r.task.await.unwrap().unwrap();
        });
    }

    #[test]
    fn a_rewritten_file_and_a_restarted_haproxy_are_put_back_at_once() {
        local(async {
            let r = rig(Adopted::Haproxy, Err("unused".into()));
            r.probes.alive.store(true, Ordering::SeqCst);
            *r.haproxy.health.lock().unwrap() = HEALTHY;
            r.inputs.send(accepted("10.0.0.1, 10.0.0.2")).await.unwrap();
            wait("the first apply", || r.haproxy.log.count("apply") == 1).await;
            // haproxy.cfg rewritten: put back, then HAProxy checked against it with no wait
            // for minApplyInterval.
            r.files.drifted.lock().unwrap().insert("haproxy.cfg", "haproxy.cfg was rewritten".into());
            let seen = tokio::time::Instant::now();
            r.inputs.send(file_drift("haproxy.cfg", "haproxy.cfg was rewritten")).await.unwrap();
            wait("the repair", || r.reporter.log.count("repaired haproxy.cfg: haproxy.cfg was rewritten") == 1).await;
            wait("the apply after it", || r.haproxy.log.count("apply") == 2).await;
            assert!(seen.elapsed() <= Duration::from_millis(20), "{:?}", seen.elapsed());
            assert_eq!(r.files.log.lines(), ["repair haproxy.cfg"]);
            assert_eq!(r.reporter.log.count("event FileRepaired"), 1);
            // HAProxy restarted between two reads: seen at the next read, applied at once.
            *r.haproxy.restart.lock().unwrap() = Some("new sockets".into());
            wait("the apply after the restart", || r.haproxy.log.count("apply") == 3).await;
            wait("the report", || r.reporter.log.count("repaired haproxy: new sockets") == 1).await;
            assert_eq!(r.reporter.log.count("event HaproxyResynced"), 1);
            let repair = r.reporter.view.lock().unwrap().as_ref().and_then(|v| v.last_repair.clone()).unwrap();
            assert_eq!(repair.object, "haproxy");
            r.signals.send(Signal::Stop).await.unwrap();
            r.task.await.unwrap().unwrap();
        });
    }

    #[test]
    fn sighup_refused_leaves_everything_as_it_was() {
        local(async {
            let r = rig(Adopted::Forward(vec![addr("10.0.0.1:6443")]), Err("haproxy.balance: unknown".into()));
            r.inputs.send(accepted("10.0.0.1")).await.unwrap();
            wait("the first apply", || r.haproxy.log.count("apply") == 1).await;
            let before = (r.endpoint.lines(), r.haproxy.log.lines());
            r.signals.send(Signal::Reload).await.unwrap();
            wait("the refusal", || {
                r.reporter
                    .view
                    .lock()
                    .unwrap()
                    .as_ref()
                    .and_then(|v| v.last_error.clone())
                    .is_some_and(|e| e.contains("refused"))
            })
            .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert_eq!((r.endpoint.lines(), r.haproxy.log.lines()), before, "no settings, apply or forward change");
            r.signals.send(Signal::Stop).await.unwrap();
            r.task.await.unwrap().unwrap();
        });
    }

    #[test]
    fn an_apply_that_fails_is_retried_and_sighup_accepted_reaches_haproxy() {
        local(async {
            let r = rig(Adopted::Forward(vec![addr("10.0.0.1:6443")]), Ok(Settings { rise: 5, ..settings() }));
            r.haproxy.fail.store(true, Ordering::SeqCst);
            r.inputs.send(accepted("10.0.0.1")).await.unwrap();
            wait("the first apply", || r.haproxy.log.count("apply") == 1).await;
            r.haproxy.fail.store(false, Ordering::SeqCst);
            let failed = tokio::time::Instant::now();
            wait("the retry", || r.haproxy.log.count("apply") == 2).await;
            let waited = failed.elapsed();
            assert!(waited >= Duration::from_millis(1900) && waited <= Duration::from_millis(2500), "{waited:?}");
            r.signals.send(Signal::Reload).await.unwrap();
            wait("the new settings", || r.haproxy.log.count("settings") == 1).await;
            wait("the apply after them", || r.haproxy.log.count("apply") == 3).await;
            assert!(r.reporter.log.lines().iter().any(|l| l.starts_with("READY")), "{:?}", r.reporter.log.lines());
            r.signals.send(Signal::Stop).await.unwrap();
            r.task.await.unwrap().unwrap();
        });
    }

    #[test]
    fn the_vip_follows_the_checks_and_is_withdrawn_before_the_endpoint_is_released() {
        local(async {
            let r =
                rig_with(Adopted::Forward(vec![addr("10.0.0.1:6443")]), Err("unused".into()), vip_settings(), false);
            r.inputs.send(accepted("10.0.0.1, 10.0.0.2")).await.unwrap();
            wait("healthy advertised", || r.endpoint.count("advertise healthy") == 1).await;
            assert_eq!(r.endpoint.count("members [10.0.0.1, 10.0.0.2]"), 1, "{:?}", r.endpoint.lines());
            // keepalived killed with the address on this host: removed once.
            r.inputs.send(Input::Vrrp(VrrpObserved { vrrp: Vrrp::Gone, holds: true })).await.unwrap();
            wait("the release", || r.endpoint.count("release") == 1).await;
            wait("the event", || r.reporter.log.count("event VipReleased") == 1).await;
            // The endpoint stops working while the members answer this host's probes:
            // withdrawn after two failed checks 500 ms apart.
            *r.probes.ready.lock().unwrap() = vec![addr("10.0.0.1:6443"), addr("10.0.0.2:6443")];
            r.probes.endpoint_ok.store(false, Ordering::SeqCst);
            let broke = tokio::time::Instant::now();
            wait("withdrawn advertised", || r.endpoint.count("advertise withdrawn") == 1).await;
            assert!(broke.elapsed() <= Duration::from_millis(1100), "{:?}", broke.elapsed());
            r.probes.endpoint_ok.store(true, Ordering::SeqCst);
            wait("degraded within the hold-down", || r.endpoint.count("advertise degraded") == 1).await;
            r.signals.send(Signal::Stop).await.unwrap();
            r.task.await.unwrap().unwrap();
            let lines = r.endpoint.lines();
            let tail: Vec<&str> = lines.iter().rev().take(2).rev().map(String::as_str).collect();
            assert_eq!(tail, ["advertise withdrawn", "shutdown keep=false"], "{lines:?}");
        });
    }
}

fn drifts(effects: &[Effect]) -> Vec<Option<Drift>> {
    effects.iter().filter_map(|e| if let Effect::Drift(d) = e { Some(d.clone()) } else { None }).collect()
}

fn events(effects: &[Effect]) -> Vec<&'static str> {
    effects.iter().filter_map(|e| if let Effect::Event(n) = e { Some(n.reason) } else { None }).collect()
}

#[test]
fn drift_is_reported_after_the_configured_time_and_never_changes_haproxy() {
    let mut r = Run::new(Settings { drift_after: Some(Duration::from_secs(60)), ..settings() });
    r.input(Input::Started { adopted: Adopted::Haproxy });
    r.input(accepted("cp1=10.0.0.11:6443, cp2=10.0.0.12:6443"));
    // The same apiservers registered: nothing to say.
    let e = r.at(1_000).input(Input::Registered(vec![addr("10.0.0.11:6443"), addr("10.0.0.12:6443")]));
    assert!(drifts(&e).is_empty());
    // A third apiserver registers itself but is not listed: watched, not reported yet.
    let e = r.at(2_000).input(Input::Registered(vec![
        addr("10.0.0.11:6443"),
        addr("10.0.0.12:6443"),
        addr("10.0.0.13:6443"),
    ]));
    assert!(drifts(&e).is_empty(), "{e:?}");
    assert!(r.c.view().drift.is_none());
    assert!(r.c.next_wake() <= r.t0 + Duration::from_millis(62_000), "the driver wakes when it is due");
    let e = r.at(61_999).input(Input::Tick);
    assert!(drifts(&e).is_empty());
    let e = r.at(62_000).input(Input::Tick);
    let want = Drift { unlisted: vec![addr("10.0.0.13:6443")], unregistered: vec![] };
    assert_eq!(drifts(&e), vec![Some(want.clone())]);
    assert_eq!(events(&e), ["MembersDrift"]);
    assert!(!e.iter().any(|x| matches!(x, Effect::Apply(_) | Effect::Forward(_) | Effect::HandToHaproxy)), "{e:?}");
    let (sentence, since) = r.c.view().drift.expect("in the view");
    assert_eq!(since, r.t0 + Duration::from_secs(2));
    assert_eq!(
        sentence,
        "the member list and the apiservers' registrations disagree; registered but not listed: 10.0.0.13:6443"
    );
    // Reported once.
    assert!(drifts(&r.at(70_000).input(Input::Tick)).is_empty());
    // The operator adds it: in sync again, said once.
    let e = r.at(80_000).input(accepted("cp1=10.0.0.11:6443, cp2=10.0.0.12:6443, cp3=10.0.0.13:6443"));
    assert_eq!(drifts(&e), vec![None]);
    assert_eq!(events(&e), ["MembersInSync"]);
    assert!(r.c.view().drift.is_none());
}

#[test]
fn a_short_disagreement_is_not_reported_and_a_changed_one_is_reported_again() {
    let mut r = Run::new(Settings { drift_after: Some(Duration::from_secs(10)), ..settings() });
    r.input(Input::Started { adopted: Adopted::Haproxy });
    r.input(accepted("cp1=10.0.0.11:6443, cp2=10.0.0.12:6443"));
    // A member restarting drops out of the slice for a few seconds (the apiserver's lease).
    r.at(1_000).input(Input::Registered(vec![addr("10.0.0.11:6443")]));
    let e = r.at(5_000).input(Input::Registered(vec![addr("10.0.0.11:6443"), addr("10.0.0.12:6443")]));
    assert!(drifts(&e).is_empty());
    assert!(drifts(&r.at(20_000).input(Input::Tick)).is_empty(), "the disagreement ended before it was due");
    // Reported, then the difference changes: reported again at once, with the new difference.
    r.at(21_000).input(Input::Registered(vec![addr("10.0.0.11:6443")]));
    let e = r.at(31_000).input(Input::Tick);
    assert_eq!(drifts(&e), vec![Some(Drift { unlisted: vec![], unregistered: vec![addr("10.0.0.12:6443")] })]);
    let e = r.at(32_000).input(Input::Registered(vec![addr("10.0.0.11:6443"), addr("10.0.0.14:6443")]));
    assert_eq!(
        drifts(&e),
        vec![Some(Drift { unlisted: vec![addr("10.0.0.14:6443")], unregistered: vec![addr("10.0.0.12:6443")] })]
    );
    // Without drift_after nothing is compared.
    let mut off = Run::new(settings());
    off.input(Input::Started { adopted: Adopted::Haproxy });
    off.input(accepted("cp1=10.0.0.11:6443"));
    off.at(1_000).input(Input::Registered(vec![addr("10.0.0.19:6443")]));
    assert!(drifts(&off.at(10_000_000).input(Input::Tick)).is_empty());
}

fn drift(why: &str) -> Input {
    Input::ForwardDrift(ForwardDrift { why: why.into() })
}

#[test]
fn a_drifted_forward_is_put_back_and_the_repair_is_recorded_with_its_time() {
    let mut r = balanced();
    let e = r.at(3_000).acts(drift("table inet cpha deleted"));
    assert_eq!(e, [Effect::RepairForward]);
    let e = r.at(3_040).acts(Input::ForwardRepaired(Ok(Some("table inet cpha deleted".into()))));
    assert_eq!(events(&e), ["ForwardRepaired"]);
    let repaired: Vec<_> =
        e.iter().filter_map(|x| if let Effect::Repaired(r) = x { Some(r.clone()) } else { None }).collect();
    assert_eq!(repaired.len(), 1, "{e:?}");
    assert_eq!((repaired[0].object, repaired[0].took), ("forward", Duration::from_millis(40)));
    assert_eq!(r.c.view().last_repair, Some(repaired[0].clone()));
    assert_eq!(r.phase(), "balanced", "a repair is no phase change");
    // The watcher's look from before cpha's own change: nothing found, nothing recorded.
    r.at(4_000).acts(drift("chain output changed"));
    assert!(r.at(4_010).acts(Input::ForwardRepaired(Ok(None))).is_empty());
    assert_eq!(r.c.view().last_repair, Some(repaired[0].clone()));
}

#[test]
fn a_failing_repair_is_said_once_and_retried_at_each_report() {
    let mut r = balanced();
    r.at(3_000).acts(drift("net.ipv4.ip_forward is 0"));
    let e = r.at(3_010).acts(Input::ForwardRepaired(Err("setting net.ipv4.ip_forward=1: read-only".into())));
    assert_eq!(events(&e), ["ForwardRepairFailed"]);
    assert!(r.c.view().last_error.unwrap().contains("read-only"));
    assert_eq!(r.at(3_200).acts(drift("net.ipv4.ip_forward is 0")), [Effect::RepairForward]);
    assert!(events(&r.at(3_210).acts(Input::ForwardRepaired(Err("read-only".into())))).is_empty());
    r.at(3_400).acts(drift("net.ipv4.ip_forward is 0"));
    let e = r.at(3_410).acts(Input::ForwardRepaired(Ok(Some("net.ipv4.ip_forward is 0".into()))));
    assert_eq!(events(&e), ["ForwardRepaired"]);
    assert_eq!(r.c.view().last_repair.unwrap().took, Duration::from_millis(410), "from the first sighting");
}

#[test]
fn nothing_is_repaired_before_a_forward_is_installed_or_while_one_is_being_moved() {
    let mut r = Run::new(settings());
    r.acts(Input::Started { adopted: Adopted::Nothing });
    assert!(r.acts(drift("table inet cpha deleted")).is_empty(), "starting: nothing installed yet");
    r.acts(accepted("10.0.0.1"));
    // The bootstrap forward's install is in flight: it puts the whole forward in place itself.
    assert!(r.acts(drift("table inet cpha deleted")).is_empty());
    r.done();
    assert_eq!(r.acts(drift("table inet cpha deleted")), [Effect::RepairForward]);
}

#[test]
fn a_rule_that_outranks_the_forward_is_reported_once_and_never_fought() {
    let mut r = balanced();
    let by = "table ip other (chain pre; its prerouting hook at priority -150, cpha's at -100) translates 10.0.0.10:6443 first";
    let e = r.at(3_000).acts(Input::ForwardOutranked(Some(by.into())));
    assert_eq!(events(&e), ["ForwardOutranked"], "{e:?}");
    assert!(!e.iter().any(|x| matches!(x, Effect::RepairForward | Effect::Forward(_) | Effect::Reassert)), "{e:?}");
    assert_eq!(r.c.view().outranked.as_deref(), Some(by));
    assert!(r.at(4_000).acts(Input::ForwardOutranked(Some(by.into()))).is_empty(), "said once");
    let e = r.at(5_000).acts(Input::ForwardOutranked(None));
    assert_eq!(events(&e), ["ForwardNotOutranked"]);
    assert_eq!(r.c.view().outranked, None);
}

fn file_drift(object: &'static str, why: &str) -> Input {
    Input::FileDrift(crate::fsutil::owned::FileDrift { object, why: why.into() })
}

fn repaired_of(effects: &[Effect]) -> Vec<Repair> {
    effects.iter().filter_map(|x| if let Effect::Repaired(r) = x { Some(r.clone()) } else { None }).collect()
}

#[test]
fn a_rewritten_haproxy_cfg_is_put_back_and_haproxy_checked_against_it_at_once() {
    let mut r = balanced();
    // An apply at 2 s: the next would wait for the interval; a repaired file does not.
    let e = r.at(2_500).acts(file_drift("haproxy.cfg", "/etc/haproxy/haproxy.cfg was rewritten by someone else"));
    assert_eq!(e, [Effect::RepairFile("haproxy.cfg")]);
    let e = r.at(2_510).acts(Input::FileRepaired {
        object: "haproxy.cfg",
        result: Ok(Some("/etc/haproxy/haproxy.cfg was rewritten by someone else".into())),
    });
    assert_eq!(events(&e), ["FileRepaired"]);
    assert!(has_apply(&e), "the running worker compared with cpha's file: {e:?}");
    let repaired = repaired_of(&e);
    assert_eq!((repaired[0].object, repaired[0].took), ("haproxy.cfg", Duration::from_millis(10)));
    assert_eq!(r.c.view().last_repair, Some(repaired[0].clone()));
    assert_eq!(r.phase(), "balanced");
    // keepalived.conf and the health file: put back, nothing applied to HAProxy.
    r.acts(Input::Applied(Ok("no change".into())));
    assert_eq!(r.at(3_000).acts(file_drift("vip-health", "removed")), [Effect::RepairFile("vip-health")]);
    let e = r.at(3_001).acts(Input::FileRepaired { object: "vip-health", result: Ok(Some("removed".into())) });
    assert_eq!(events(&e), ["FileRepaired"]);
    assert!(!has_apply(&e), "{e:?}");
    // cpha's own write seen late: nothing put back, nothing said.
    r.at(4_000).acts(file_drift("keepalived.conf", "rewritten"));
    assert!(r.at(4_001).acts(Input::FileRepaired { object: "keepalived.conf", result: Ok(None) }).is_empty());
    assert_eq!(r.c.view().last_repair.unwrap().object, "vip-health");
}

#[test]
fn a_file_repair_that_fails_is_said_once_per_episode() {
    let mut r = balanced();
    for at in [3_000, 3_100, 3_200] {
        r.at(at).acts(file_drift("keepalived.conf", "/etc/keepalived/keepalived.conf was removed"));
        let e = r.at(at + 1).acts(Input::FileRepaired { object: "keepalived.conf", result: Err("read-only".into()) });
        assert_eq!(events(&e), if at == 3_000 { vec!["FileRepairFailed"] } else { vec![] }, "{e:?}");
    }
    assert!(r.c.view().last_error.unwrap().contains("keepalived.conf: read-only"));
    r.at(3_300).acts(file_drift("keepalived.conf", "/etc/keepalived/keepalived.conf was removed"));
    let e = r.at(3_301).acts(Input::FileRepaired { object: "keepalived.conf", result: Ok(Some("removed".into())) });
    assert_eq!(repaired_of(&e)[0].took, Duration::from_millis(301), "from the first sighting");
}

#[test]
fn a_haproxy_restarted_by_someone_else_is_applied_at_once_and_reported_after_the_apply() {
    let mut r = balanced();
    // The last apply began at 2 s; the interval would hold the next until 4 s.
    let e = r.at(2_300).acts(Input::HaproxyRestarted("new sockets: a new HAProxy process".into()));
    assert!(has_apply(&e), "at once: {e:?}");
    assert!(repaired_of(&e).is_empty(), "reported once it is in step");
    let e = r.at(2_340).acts(Input::Applied(Ok("runtime; added m-10.0.0.3-6443".into())));
    assert_eq!(events(&e), ["HaproxyResynced"]);
    let repaired = repaired_of(&e);
    assert_eq!((repaired[0].object, repaired[0].took), ("haproxy", Duration::from_millis(40)));
    // An apply that began before the restart was seen does not count as in step with it.
    let mut r = balanced();
    r.at(5_000).acts(accepted("10.0.0.1"));
    r.at(5_010).acts(Input::HaproxyRestarted("new sockets".into()));
    let e = r.at(5_050).acts(Input::Applied(Ok("runtime".into())));
    assert!(events(&e).is_empty(), "{e:?}");
    assert!(has_apply(&e), "again, for the new process: {e:?}");
    let e = r.at(5_090).acts(Input::Applied(Ok("no change".into())));
    assert_eq!(events(&e), ["HaproxyResynced"]);
}
