//! The outcome of a turn (SPEC §6.3) as a pure function of what happened.
//!
//! [`decide`] walks the outcome table in its order and applies "terminal
//! mail wins". The turn, `stop` and the sweep gather [`Facts`] and execute
//! the [`Decision`]; none of them decides on its own.

use crate::capability::OnIdle;
use crate::claim::Fate;
use crate::state::State;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stopped,
    Interrupted,
    Stalled,
    Deadline,
    Done,
    Exited,
    Waiting,
    Refused,
    SpawnFailed,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Stopped => "stopped",
            Outcome::Interrupted => "interrupted",
            Outcome::Stalled => "stalled",
            Outcome::Deadline => "deadline",
            Outcome::Done => "done",
            Outcome::Exited => "exited",
            Outcome::Waiting => "waiting",
            Outcome::Refused => "refused",
            Outcome::SpawnFailed => "spawn_failed",
            Outcome::Failed => "failed",
        }
    }

    /// SPEC §10.3.
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Done | Outcome::Exited | Outcome::Waiting => 0,
            Outcome::Failed => 1,
            Outcome::Refused | Outcome::SpawnFailed => 5,
            Outcome::Stalled | Outcome::Deadline => 124,
            Outcome::Stopped | Outcome::Interrupted => 130,
        }
    }
}

/// Why the runner aborted the agent, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// Our stall watchdog fired.
    Stall,
    /// Our deadline passed.
    Deadline,
    /// SIGINT/SIGTERM reached the runner (a stop, the sweep, serve, a user).
    Signal,
}

/// Why the runner ended a CLI that had stopped producing (SPEC §6.5) —
/// not an abort: the outcome still comes from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerEnded {
    /// It did not exit within `result_exit_timeout` of its end-of-turn line.
    AfterResult(std::time::Duration),
    /// Its stdout closed without an end-of-turn line and it did not exit
    /// within `leak_timeout`: no result can come any more.
    AfterEof(std::time::Duration),
}

/// What the sweep wrote into `stop-reason` when it stopped a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Stalled,
    Deadline,
}

#[derive(Debug, Clone)]
pub struct Facts {
    pub abort: Option<Abort>,
    /// The session state now, at the end of the turn.
    pub state_now: Option<State>,
    pub stop_reason: Option<StopReason>,
    pub spawn_failed: bool,
    /// At least one valid event line arrived.
    pub any_event: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// `Some(clean)` when an end-of-turn line arrived.
    pub verdict: Option<bool>,
    pub terminal_mail: bool,
    pub on_idle: OnIdle,
    /// The CLI did not know the session it was asked to resume.
    pub unknown_resume: bool,
    pub runner_ended: Option<RunnerEnded>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The state to CAS to; `None` leaves it unchanged.
    pub final_state: Option<State>,
    pub claims: Fate,
    /// Send `worker_died` (when the agent has a parent), with this reason.
    pub worker_died: Option<&'static str>,
    pub exit_code: i32,
}

/// The outcome table of SPEC §6.3, in order, then "terminal mail wins".
pub fn decide(f: &Facts) -> Decision {
    use Outcome::*;
    let clean = f.verdict == Some(true);
    let outcome = match f.abort {
        Some(Abort::Signal) if f.state_now == Some(State::Completed) => Stopped,
        Some(Abort::Signal) if f.state_now == Some(State::Zombie) => match f.stop_reason {
            Some(StopReason::Deadline) => Deadline,
            _ => Stalled,
        },
        Some(Abort::Signal) => Interrupted,
        Some(Abort::Stall) => Stalled,
        Some(Abort::Deadline) => Deadline,
        None if f.spawn_failed => SpawnFailed,
        None if clean && f.terminal_mail => Done,
        None if clean && f.on_idle == OnIdle::Exit => Exited,
        None if clean => Waiting,
        // Ended by us with stdout closed and no result: retryable, whatever
        // its exit code says.
        None if matches!(f.runner_ended, Some(RunnerEnded::AfterEof(_))) => Failed,
        None if !f.any_event && !f.unknown_resume && f.exit_code.is_some_and(|c| c != 0) => Refused,
        None => Failed,
    };
    let (final_state, claims, worker_died) = match outcome {
        Stopped => (
            Some(State::Completed),
            Fate::Release,
            Some("stopped by operator"),
        ),
        Interrupted => (Some(State::BetweenTurns), Fate::Release, None),
        Stalled => (Some(State::Zombie), Fate::Release, Some("stalled")),
        Deadline => (Some(State::Zombie), Fate::Release, Some("deadline")),
        Done => (Some(State::Completed), Fate::Deliver, None),
        Exited => (
            Some(State::Completed),
            Fate::Deliver,
            Some("clean exit without terminal mail"),
        ),
        Waiting => (Some(State::BetweenTurns), Fate::Deliver, None),
        Refused | SpawnFailed => (None, Fate::Release, None),
        Failed => (Some(State::BetweenTurns), Fate::Retry, None),
    };
    let mut d = Decision {
        outcome,
        final_state,
        claims,
        worker_died,
        exit_code: outcome.exit_code(),
    };
    if f.terminal_mail {
        d.final_state = Some(State::Completed);
        d.claims = Fate::Deliver;
        d.worker_died = None;
    }
    d
}

/// After a `failed` turn's retry: when a message ran out of tries the agent
/// goes `zombie` and the parent hears `retries exhausted`.
pub fn after_retries(d: &Decision, exhausted: bool) -> Decision {
    let mut d = d.clone();
    if exhausted && d.outcome == Outcome::Failed && d.final_state != Some(State::Completed) {
        d.final_state = Some(State::Zombie);
        d.worker_died = Some("retries exhausted");
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Facts {
        Facts {
            abort: None,
            state_now: Some(State::InTurn),
            stop_reason: None,
            spawn_failed: false,
            any_event: true,
            exit_code: Some(0),
            signal: None,
            verdict: Some(true),
            terminal_mail: false,
            on_idle: OnIdle::Exit,
            unknown_resume: false,
            runner_ended: None,
        }
    }

    /// SPEC §6.3 row by row: (facts, outcome, final state, claims, worker_died, exit).
    #[test]
    fn outcome_table() {
        use Outcome::*;
        use State as S;
        let rows: Vec<(Facts, Outcome, Option<State>, Fate, bool, i32)> = vec![
            (
                Facts {
                    abort: Some(Abort::Signal),
                    state_now: Some(S::Completed),
                    ..base()
                },
                Stopped,
                Some(S::Completed),
                Fate::Release,
                true,
                130,
            ),
            (
                Facts {
                    abort: Some(Abort::Signal),
                    ..base()
                },
                Interrupted,
                Some(S::BetweenTurns),
                Fate::Release,
                false,
                130,
            ),
            (
                Facts {
                    abort: Some(Abort::Stall),
                    verdict: None,
                    ..base()
                },
                Stalled,
                Some(S::Zombie),
                Fate::Release,
                true,
                124,
            ),
            (
                Facts {
                    abort: Some(Abort::Signal),
                    state_now: Some(S::Zombie),
                    stop_reason: Some(StopReason::Stalled),
                    ..base()
                },
                Stalled,
                Some(S::Zombie),
                Fate::Release,
                true,
                124,
            ),
            (
                Facts {
                    abort: Some(Abort::Deadline),
                    ..base()
                },
                Deadline,
                Some(S::Zombie),
                Fate::Release,
                true,
                124,
            ),
            (
                Facts {
                    abort: Some(Abort::Signal),
                    state_now: Some(S::Zombie),
                    stop_reason: Some(StopReason::Deadline),
                    ..base()
                },
                Deadline,
                Some(S::Zombie),
                Fate::Release,
                true,
                124,
            ),
            (
                Facts {
                    terminal_mail: true,
                    ..base()
                },
                Done,
                Some(S::Completed),
                Fate::Deliver,
                false,
                0,
            ),
            (base(), Exited, Some(S::Completed), Fate::Deliver, true, 0),
            (
                Facts {
                    on_idle: OnIdle::Wait,
                    ..base()
                },
                Waiting,
                Some(S::BetweenTurns),
                Fate::Deliver,
                false,
                0,
            ),
            (
                Facts {
                    any_event: false,
                    verdict: None,
                    exit_code: Some(1),
                    ..base()
                },
                Refused,
                None,
                Fate::Release,
                false,
                5,
            ),
            (
                Facts {
                    spawn_failed: true,
                    any_event: false,
                    verdict: None,
                    exit_code: None,
                    ..base()
                },
                SpawnFailed,
                None,
                Fate::Release,
                false,
                5,
            ),
            (
                Facts {
                    verdict: Some(false),
                    exit_code: Some(1),
                    ..base()
                },
                Failed,
                Some(S::BetweenTurns),
                Fate::Retry,
                false,
                1,
            ),
            (
                Facts {
                    verdict: None,
                    exit_code: Some(0),
                    ..base()
                },
                Failed,
                Some(S::BetweenTurns),
                Fate::Retry,
                false,
                1,
            ),
            (
                Facts {
                    verdict: None,
                    exit_code: None,
                    signal: Some(9),
                    ..base()
                },
                Failed,
                Some(S::BetweenTurns),
                Fate::Retry,
                false,
                1,
            ),
            (
                Facts {
                    any_event: false,
                    verdict: None,
                    exit_code: Some(1),
                    unknown_resume: true,
                    ..base()
                },
                Failed,
                Some(S::BetweenTurns),
                Fate::Retry,
                false,
                1,
            ),
            // no events and exit 0: not refused (refused needs a non-zero exit)
            (
                Facts {
                    any_event: false,
                    verdict: None,
                    exit_code: Some(0),
                    ..base()
                },
                Failed,
                Some(S::BetweenTurns),
                Fate::Retry,
                false,
                1,
            ),
        ];
        for (i, (f, outcome, state, claims, died, exit)) in rows.into_iter().enumerate() {
            let d = decide(&f);
            assert_eq!(d.outcome, outcome, "row {i}");
            assert_eq!(d.final_state, state, "row {i}");
            assert_eq!(d.claims, claims, "row {i}");
            assert_eq!(d.worker_died.is_some(), died, "row {i}");
            assert_eq!(d.exit_code, exit, "row {i}");
        }
    }

    #[test]
    fn terminal_mail_wins_whatever_ended_the_process() {
        for abort in [
            None,
            Some(Abort::Stall),
            Some(Abort::Deadline),
            Some(Abort::Signal),
        ] {
            let f = Facts {
                abort,
                terminal_mail: true,
                verdict: None,
                exit_code: Some(1),
                ..base()
            };
            let d = decide(&f);
            assert_eq!(d.final_state, Some(State::Completed));
            assert_eq!(d.claims, Fate::Deliver);
            assert_eq!(d.worker_died, None);
            assert_eq!(d.exit_code, d.outcome.exit_code());
        }
    }

    #[test]
    fn exhausted_retries_make_a_zombie() {
        let d = decide(&Facts {
            verdict: Some(false),
            exit_code: Some(1),
            ..base()
        });
        let e = after_retries(&d, true);
        assert_eq!(e.final_state, Some(State::Zombie));
        assert_eq!(e.worker_died, Some("retries exhausted"));
        assert_eq!(after_retries(&d, false), d);
    }
}
