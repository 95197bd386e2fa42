//! Runtimes (SPEC §8): how one agent CLI is spawned, fed, read and stopped.
//!
//! Each runtime is one module behind [`Runtime`]: argv for first and later
//! turns, what goes to stdin and when it closes, a [`Parser`] mapping its
//! NDJSON lines onto overstory's event types, the end-of-turn verdict, the
//! graceful stop, and how it says "unknown resume". Nothing runtime-specific
//! lives outside these modules. Invariant: parsers never panic on any JSON
//! object and keep bounded state.

pub mod claude;
pub mod codex;
pub mod command;
pub mod gemini;
pub mod json;
#[cfg(test)]
pub(crate) mod testkit;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::capability::Capability;
use crate::config::Config;
use crate::os::Sig;
use crate::store::events::{EventRow, ToolStartRef};
use crate::store::sessions::Session;

/// What one line told us, beyond its rows.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LineFacts {
    /// A JSON object with a string `type` (set by the stream, not the parser).
    pub valid: bool,
    pub malformed: bool,
    /// The line only reports the CLI retrying its model API: it does not reset the stall timer.
    pub retry_only: bool,
    pub session_id: Option<String>,
    /// `Some(clean)` on an end-of-turn line.
    pub end_of_turn: Option<bool>,
    /// New stall allowance (ms) after this line: the longest declared tool
    /// timeout still in flight, 0 when none is.
    pub tool_allowance_ms: Option<u64>,
}

/// Usage and result of a turn, from its end-of-turn line.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ResultInfo {
    pub cost_usd: Option<f64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub num_turns: Option<i64>,
    pub result_text: Option<String>,
}

impl LineFacts {
    /// Facts with the session id from `obj[key]` (`session_id`; codex `thread_id`).
    pub fn with_session(obj: &Map<String, Value>, key: &str) -> LineFacts {
        LineFacts::session(str_of(obj, key))
    }

    /// Facts with this session id (a line's, when it has a string one).
    pub fn session(id: Option<&str>) -> LineFacts {
        LineFacts {
            session_id: id.map(str::to_string),
            ..Default::default()
        }
    }
}

/// One line that parsed as a JSON object with a string `type`.
pub struct Line<'a> {
    pub kind: &'a str,
    pub obj: &'a Map<String, Value>,
    /// Its stdout line number (what `events.line_no` gets).
    pub line_no: i64,
}

/// What the fast path made of a line.
pub struct FastLine {
    pub facts: LineFacts,
    /// The line's `type` (one of the runtime's hot types).
    pub kind: &'static str,
}

/// Maps lines of one turn to event rows. Rows with an empty `data` get the
/// line itself (bounded) as data.
///
/// Two ways in, one mapping: [`Parser::line`] is the full path (any line,
/// read as a `serde_json::Value`); [`Parser::fast_line`] reads the hot line
/// types straight from the text ([`json`]) and must give exactly the rows,
/// facts and state changes `line` gives (proven on every capture and by
/// property tests, `tests/it/props.rs`).
pub trait Parser: Send {
    fn line(&mut self, line: &Line<'_>, rows: &mut Vec<EventRow>) -> LineFacts;
    /// `None`: not a hot line, or not one the fast reader can vouch for; the
    /// parser and `rows` are then untouched and the caller takes the full path.
    fn fast_line(
        &mut self,
        _text: &str,
        _line_no: i64,
        _rows: &mut Vec<EventRow>,
    ) -> Option<FastLine> {
        None
    }
    /// The result of the turn so far (called after an end-of-turn line).
    fn result(&self) -> ResultInfo;
}

/// Most tool calls remembered as in flight (bounded state).
pub const MAX_IN_FLIGHT: usize = 1024;

/// The tool calls of a turn still in flight, by the CLI's call id: what a
/// `tool_end` row takes from its `tool_start` (name, duration, where the
/// start row is), and the stall allowance of declared timeouts.
#[derive(Default)]
pub struct ToolCalls {
    calls: HashMap<String, Call>,
}

struct Call {
    name: String,
    started: Instant,
    declared_ms: Option<u64>,
    start: ToolStartRef,
}

/// A call that just finished.
pub struct Finished {
    pub name: String,
    pub duration_ms: i64,
    pub start: ToolStartRef,
}

impl ToolCalls {
    /// Remembers a call (ignored once [`MAX_IN_FLIGHT`] are in flight).
    pub fn start(&mut self, id: &str, name: &str, declared_ms: Option<u64>, start: ToolStartRef) {
        if self.calls.len() < MAX_IN_FLIGHT {
            self.calls.insert(
                id.to_string(),
                Call {
                    name: name.to_string(),
                    started: Instant::now(),
                    declared_ms,
                    start,
                },
            );
        }
    }

    pub fn finish(&mut self, id: &str) -> Option<Finished> {
        self.calls.remove(id).map(|c| Finished {
            name: c.name,
            duration_ms: c.started.elapsed().as_millis() as i64,
            start: c.start,
        })
    }

    pub fn clear(&mut self) {
        self.calls.clear();
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The longest declared timeout in flight plus `slack`, 0 when none.
    pub fn allowance(&self, slack: u64) -> u64 {
        self.calls
            .values()
            .filter_map(|c| c.declared_ms)
            .max()
            .map(|t| t + slack)
            .unwrap_or(0)
    }
}

/// A `tool_start` row.
pub fn tool_start_row(name: String, args: String) -> EventRow {
    EventRow {
        tool_name: Some(name),
        tool_args: Some(args),
        ..row("tool_start", "info")
    }
}

/// A `tool_end` row; with its call's name and duration when the start was
/// seen, and where that start row is, so the writer sets the duration there
/// too (SPEC §8).
pub fn tool_end_row(level: &'static str, call: Option<Finished>) -> EventRow {
    let mut r = row("tool_end", level);
    if let Some(c) = call {
        r.tool_name = Some(c.name);
        r.tool_duration_ms = Some(c.duration_ms);
        r.tool_start = Some(c.start);
    }
    r
}

/// How stdin is handled after the user turn is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdinPolicy {
    /// Closed right after the user turn.
    CloseAfterWrite,
    /// Kept open (for an interrupt) until the end-of-turn line.
    KeepUntilEndOfTurn,
}

/// The first escalation step before signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Graceful {
    None,
    /// Write this line to stdin (claude's interrupt `control_request`).
    StdinLine(Vec<u8>),
    /// Send this signal to the agent process (codex: SIGINT).
    Signal(Sig),
}

/// What a turn needs to build its command.
pub struct TurnInput<'a> {
    pub session: &'a Session,
    pub capability: &'a Capability,
    pub config: &'a Config,
    /// The user turn.
    pub text: &'a str,
    /// The id to resume (an id the CLI itself reported earlier), if any.
    pub resume_id: Option<&'a str>,
    /// A fresh id the runner pre-assigns on a first turn (claude, gemini).
    pub new_session_id: &'a str,
}

/// The program to start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpawnSpec {
    pub program: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

pub trait Runtime: Send + Sync {
    fn name(&self) -> &'static str;
    fn spawn_spec(&self, input: &TurnInput<'_>) -> Result<SpawnSpec, String>;
    fn stdin_bytes(&self, input: &TurnInput<'_>) -> Vec<u8>;
    fn stdin_policy(&self) -> StdinPolicy;
    fn parser(&self) -> Box<dyn Parser>;
    fn graceful_stop(&self) -> Graceful;
    /// True when the CLI reports token usage as running totals over the
    /// whole conversation (codex): the turn stores the difference.
    fn cumulative_usage(&self) -> bool {
        false
    }
    /// When the CLI did not know the session it was asked to resume: its message.
    fn unknown_resume(
        &self,
        stderr_tail: &str,
        exit_code: Option<i32>,
        result_text: Option<&str>,
    ) -> Option<String>;
}

/// The runtime of a session.
pub fn for_session(s: &Session) -> Result<Box<dyn Runtime>, String> {
    match s.runtime.as_str() {
        "claude" => Ok(Box::new(claude::Claude)),
        "codex" => Ok(Box::new(codex::Codex)),
        "gemini" => Ok(Box::new(gemini::Gemini)),
        "command" => Ok(Box::new(command::Command)),
        other => Err(format!(
            "unknown runtime '{other}' (claude, codex, gemini, command)"
        )),
    }
}

pub const RUNTIMES: [&str; 4] = ["claude", "codex", "gemini", "command"];

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// `obj[key]` as a string.
pub fn str_of<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

/// The instructions go before the user text on a session's first turn, for
/// runtimes without a system-prompt flag.
pub fn with_instructions(input: &TurnInput<'_>) -> String {
    if input.resume_id.is_none() && !input.capability.instructions.is_empty() {
        format!("{}\n\n---\n\n{}", input.capability.instructions, input.text)
    } else {
        input.text.to_string()
    }
}

/// A row with the defaults every runtime uses.
pub fn row(event_type: &'static str, level: &'static str) -> EventRow {
    EventRow {
        event_type,
        level,
        ..Default::default()
    }
}
