//! The words of a turn's outcome: the reason stored in the turn row and
//! shown by `runner turn` and `status`, and the stderr line that explains a
//! refusal. Pure functions of what happened; values are printed as values
//! (`exited with code 3`), never in Rust's debug notation.

use super::outcome::{Decision, Outcome, RunnerEnded};
use super::run::Execution;
use crate::clock;
use crate::runtime;

/// Human-readable why; `done` has none unless the runner ended the CLI.
pub fn reason_for(d: &Decision, ex: &Execution, unknown_resume: Option<&str>) -> Option<String> {
    let why = outcome_reason(d, ex, unknown_resume);
    match ex.ended {
        Some(RunnerEnded::AfterResult(t)) if ex.abort.is_none() => {
            let note = format!(
                "the runner ended the CLI after its result: it had not exited within {}",
                clock::human_duration(t)
            );
            Some(why.map_or(note.clone(), |w| format!("{w}; {note}")))
        }
        _ => why,
    }
}

fn outcome_reason(d: &Decision, ex: &Execution, unknown_resume: Option<&str>) -> Option<String> {
    let s = &ex.stream;
    Some(match d.outcome {
        Outcome::Done => return None,
        Outcome::Stopped => "stopped by operator".into(),
        Outcome::Interrupted => "interrupted by a signal to the runner".into(),
        Outcome::Stalled => "stalled: no output within the stall timeout".into(),
        Outcome::Deadline => "the turn deadline passed".into(),
        Outcome::Exited => "clean exit without terminal mail".into(),
        Outcome::Waiting => "clean turn without terminal mail: waiting for mail".into(),
        Outcome::SpawnFailed => ex
            .spawn_error
            .clone()
            .unwrap_or_else(|| "could not start the agent".into()),
        Outcome::Refused => stderr_headline(&ex.stderr_tail).unwrap_or_else(|| {
            format!(
                "the agent {} and wrote nothing",
                exit_words(ex.exit_code, ex.signal)
            )
        }),
        Outcome::Failed => {
            if let Some(m) = unknown_resume {
                format!("unknown resume: {m}")
            } else if d.worker_died == Some("retries exhausted") {
                "retries exhausted".into()
            } else if s.verdict == Some(false) {
                format!(
                    "error result: {}",
                    s.result.result_text.clone().unwrap_or_default()
                )
            } else if let Some(RunnerEnded::AfterEof(t)) = ex.ended {
                format!(
                    "stdout closed without an end-of-turn line and the agent lived on: the runner ended it after {}",
                    clock::human_duration(t)
                )
            } else {
                format!(
                    "the agent {} without an end-of-turn line",
                    exit_words(ex.exit_code, ex.signal)
                )
            }
        }
    })
}

/// How the agent process ended, in words.
pub fn exit_words(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        (None, None) => "ended without an exit status".into(),
    }
}

/// Why a state change did not apply, in words.
pub fn lost_race(r: &crate::state::Cas) -> String {
    match r {
        crate::state::Cas::Applied => "it applied".into(),
        crate::state::Cas::Lost { current } => format!("the state is {current}"),
        crate::state::Cas::Missing => "the agent is gone".into(),
    }
}

/// The line of the agent's stderr that explains a refusal: the first one
/// that reads like an error, else the last meaningful one. Banners the CLIs
/// print on every run (codex's PATH-alias warning, gemini's YOLO and colour
/// notices) are never it.
pub fn stderr_headline(tail: &str) -> Option<String> {
    const NOISE: [&str; 4] = [
        "WARNING: proceeding",
        "YOLO mode is enabled",
        "Warning: 256-color",
        "Loaded cached credentials",
    ];
    const ERRORISH: [&str; 12] = [
        "error", "invalid", "denied", "cannot", "can't", "refus", "unknown", "fail", "not ",
        "requires", "must", "no such",
    ];
    let lines: Vec<&str> = tail
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !NOISE.iter().any(|n| l.starts_with(n)))
        .collect();
    let errorish = |l: &&&str| {
        let low = l.to_ascii_lowercase();
        ERRORISH.iter().any(|e| low.contains(e))
    };
    lines
        .iter()
        .find(errorish)
        .or(lines.last())
        .map(|l| runtime::cut(l, 500))
}

#[cfg(test)]
mod tests {
    use super::stderr_headline;

    #[test]
    fn the_headline_is_the_error_not_the_banner() {
        let gemini = "YOLO mode is enabled. All tool calls will be automatically approved.\nInvalid auth method selected.\n";
        assert_eq!(
            stderr_headline(gemini).as_deref(),
            Some("Invalid auth method selected.")
        );
        let claude = "--dangerously-skip-permissions cannot be used with root/sudo privileges for security reasons\n";
        assert!(
            stderr_headline(claude)
                .unwrap()
                .starts_with("--dangerously-skip-permissions cannot")
        );
        let codex = "WARNING: proceeding, even though we could not create PATH aliases\nerror: unexpected argument '--bogus' found\n";
        assert_eq!(
            stderr_headline(codex).as_deref(),
            Some("error: unexpected argument '--bogus' found")
        );
        assert_eq!(
            stderr_headline("just talking\n").as_deref(),
            Some("just talking")
        );
        assert_eq!(stderr_headline("\n  \n"), None);
    }
}
