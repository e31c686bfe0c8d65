//! The handover state machine, pure: observations of HAProxy's health go in, the action to take
//! comes out. The agent performs the action and reports back whether it worked.
//!
//! ```text
//!             rise healthy checks                 action done
//! Forwarding ───────────────────────► HandingOver ───────────► Balanced
//!     ▲                                  │   ▲                    │
//!     └──────── action failed ───────────┘   │ rise healthy       │ fall unhealthy checks
//!                                            │ checks             ▼ (fallback enabled)
//!                                         Fallback ◄──────────────┘
//! ```
//! Asymmetric by default: `rise` is small (hand over quickly once HAProxy has an UP server),
//! `fall` is larger (fall back only when HAProxy stays unhealthy), so a blip does not flap.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The bootstrap forward carries the endpoint.
    Forwarding,
    /// Moving the endpoint from the forward to HAProxy.
    HandingOver,
    /// HAProxy carries the endpoint.
    Balanced,
    /// HAProxy failed: the forward carries the endpoint again, to a ready member.
    Fallback,
}

impl Phase {
    pub const ALL: [Phase; 4] = [Phase::Forwarding, Phase::HandingOver, Phase::Balanced, Phase::Fallback];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Forwarding => "forwarding",
            Phase::HandingOver => "handing-over",
            Phase::Balanced => "balanced",
            Phase::Fallback => "fallback",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive healthy checks before handing over.
    pub rise: u32,
    /// Consecutive unhealthy checks before falling back.
    pub fall: u32,
    /// Whether to fall back at all.
    pub fallback: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do.
    Stay,
    /// Move the endpoint to HAProxy, then call [`Machine::handover_done`].
    HandOver,
    /// Move the endpoint back to the forward, then call [`Machine::fallback_done`].
    FallBack,
}

#[derive(Debug, Clone)]
pub struct Machine {
    phase: Phase,
    healthy_run: u32,
    unhealthy_run: u32,
    thresholds: Thresholds,
}

impl Machine {
    pub fn new(phase: Phase, thresholds: Thresholds) -> Self {
        Self { phase, healthy_run: 0, unhealthy_run: 0, thresholds }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn set_thresholds(&mut self, thresholds: Thresholds) {
        self.thresholds = thresholds;
    }

    /// One health observation of HAProxy: answers and has at least one UP server.
    pub fn observe(&mut self, healthy: bool) -> Action {
        if healthy {
            self.healthy_run = self.healthy_run.saturating_add(1);
            self.unhealthy_run = 0;
        } else {
            self.unhealthy_run = self.unhealthy_run.saturating_add(1);
            self.healthy_run = 0;
        }
        match self.phase {
            Phase::Forwarding | Phase::Fallback if self.healthy_run >= self.thresholds.rise => {
                self.phase = Phase::HandingOver;
                Action::HandOver
            }
            Phase::Balanced if self.thresholds.fallback && self.unhealthy_run >= self.thresholds.fall => {
                Action::FallBack
            }
            _ => Action::Stay,
        }
    }

    /// The handover action finished (`ok`) or failed (back to where it came from, counting anew).
    pub fn handover_done(&mut self, ok: bool, from: Phase) {
        self.healthy_run = 0;
        self.phase = if ok { Phase::Balanced } else { from };
    }

    /// The fallback action finished; on failure the machine stays balanced and tries again
    /// after the next `fall` unhealthy checks.
    pub fn fallback_done(&mut self, ok: bool) {
        self.unhealthy_run = 0;
        if ok {
            self.phase = Phase::Fallback;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { rise: 2, fall: 3, fallback: true };

    #[test]
    fn hands_over_after_rise_healthy_checks_in_a_row() {
        let mut m = Machine::new(Phase::Forwarding, T);
        assert_eq!(m.observe(true), Action::Stay);
        assert_eq!(m.observe(false), Action::Stay, "a bad check resets the run");
        assert_eq!(m.observe(true), Action::Stay);
        assert_eq!(m.observe(true), Action::HandOver);
        assert_eq!(m.phase(), Phase::HandingOver);
        m.handover_done(true, Phase::Forwarding);
        assert_eq!(m.phase(), Phase::Balanced);
    }

    #[test]
    fn falls_back_after_fall_unhealthy_checks_and_hands_over_again() {
        let mut m = Machine::new(Phase::Balanced, T);
        assert_eq!(m.observe(false), Action::Stay);
        assert_eq!(m.observe(false), Action::Stay);
        assert_eq!(m.observe(true), Action::Stay, "a good check resets the run");
        assert_eq!(m.observe(false), Action::Stay);
        assert_eq!(m.observe(false), Action::Stay);
        assert_eq!(m.observe(false), Action::FallBack);
        m.fallback_done(true);
        assert_eq!(m.phase(), Phase::Fallback);
        assert_eq!(m.observe(true), Action::Stay);
        assert_eq!(m.observe(true), Action::HandOver);
    }

    #[test]
    fn no_fallback_when_disabled_and_failed_actions_retry() {
        let mut m = Machine::new(Phase::Balanced, Thresholds { fallback: false, ..T });
        for _ in 0..10 {
            assert_eq!(m.observe(false), Action::Stay);
        }
        let mut m = Machine::new(Phase::Forwarding, T);
        m.observe(true);
        assert_eq!(m.observe(true), Action::HandOver);
        m.handover_done(false, Phase::Forwarding);
        assert_eq!(m.phase(), Phase::Forwarding);
        assert_eq!(m.observe(true), Action::Stay, "counting starts anew after a failed handover");
        assert_eq!(m.observe(true), Action::HandOver);

        let mut m = Machine::new(Phase::Balanced, T);
        for _ in 0..2 {
            m.observe(false);
        }
        assert_eq!(m.observe(false), Action::FallBack);
        m.fallback_done(false);
        assert_eq!(m.phase(), Phase::Balanced);
        assert_eq!(m.observe(false), Action::Stay);
        assert_eq!(m.observe(false), Action::Stay);
        assert_eq!(m.observe(false), Action::FallBack);
    }
}
