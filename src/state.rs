//! The agent state machine of SPEC §3 as a pure table.
//!
//! Owns the state vocabulary and which transitions are allowed. The one CAS
//! that applies a transition lives in `store::sessions`; this module has no
//! I/O. Invariants: `completed` is sticky; `zombie` leaves only to
//! `completed`; nothing but `agent add` (or `--recover`) sets `booting`.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Booting,
    InTurn,
    BetweenTurns,
    Working,
    Stalled,
    Completed,
    Zombie,
}

use State::*;

impl State {
    pub const ALL: [State; 7] = [
        Booting,
        InTurn,
        BetweenTurns,
        Working,
        Stalled,
        Completed,
        Zombie,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Booting => "booting",
            InTurn => "in_turn",
            BetweenTurns => "between_turns",
            Working => "working",
            Stalled => "stalled",
            Completed => "completed",
            Zombie => "zombie",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// `completed` and `zombie` end an agent until `--recover`.
    pub fn is_finished(self) -> bool {
        matches!(self, Completed | Zombie)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The states a transition to `to` may start from (SPEC §3).
pub fn allowed_from(to: State) -> &'static [State] {
    match to {
        InTurn => &[Booting, InTurn, BetweenTurns, Stalled],
        BetweenTurns => &[InTurn, BetweenTurns, Stalled, Booting],
        Working => &[Booting, Working, Stalled],
        Stalled => &[Booting, Working, InTurn, BetweenTurns, Stalled],
        Completed => &State::ALL,
        Zombie => &[Booting, InTurn, BetweenTurns, Working, Stalled, Zombie],
        Booting => &[],
    }
}

/// Whether `from → to` is allowed.
pub fn can_transition(from: State, to: State) -> bool {
    allowed_from(to).contains(&from)
}

/// The result of a compare-and-swap on an agent's state. A lost race is a
/// normal value, never an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cas {
    /// The state was written (it was one of the allowed ones).
    Applied,
    /// The row's state is not one the transition may start from.
    Lost { current: String },
    /// No such agent.
    Missing,
}

impl Cas {
    pub fn applied(&self) -> bool {
        matches!(self, Cas::Applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (from, to) pair, as SPEC §3 writes it: `x` = allowed.
    #[test]
    fn transition_table_matches_spec() {
        // columns: to = booting in_turn between_turns working stalled completed zombie
        let table: [(State, &str); 7] = [
            (Booting, ".xxxxxx"),
            (InTurn, ".xx.xxx"),
            (BetweenTurns, ".xx.xxx"),
            (Working, "...xxxx"),
            (Stalled, ".xxxxxx"),
            (Completed, ".....x."),
            (Zombie, ".....xx"),
        ];
        for (from, row) in table {
            for (to, mark) in State::ALL.into_iter().zip(row.chars()) {
                assert_eq!(
                    can_transition(from, to),
                    mark == 'x',
                    "{from} -> {to} should be {}",
                    if mark == 'x' { "allowed" } else { "refused" }
                );
            }
        }
    }

    #[test]
    fn completed_is_sticky_and_zombie_only_completes() {
        for to in State::ALL {
            assert_eq!(can_transition(Completed, to), to == Completed);
            assert_eq!(can_transition(Zombie, to), matches!(to, Completed | Zombie));
            assert!(!can_transition(to, Booting));
        }
    }

    #[test]
    fn names_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("nope"), None);
    }
}
