//! Shared helpers for the runtimes' parser and argv tests.

use serde_json::Value;

use super::{Line, LineFacts, Parser};
use crate::capability::{Capability, OnIdle};
use crate::store::events::EventRow;
use crate::store::sessions::Session;

/// One line through a parser.
pub fn parse(p: &mut dyn Parser, line: &str) -> (Vec<EventRow>, LineFacts) {
    let v: Value = serde_json::from_str(line).unwrap();
    let obj = v.as_object().unwrap();
    let mut rows = Vec::new();
    let line = Line {
        kind: obj["type"].as_str().unwrap(),
        obj,
        line_no: 1,
    };
    let f = p.line(&line, &mut rows);
    (rows, f)
}

/// (event_type, level) of each row.
pub fn kinds(rows: &[EventRow]) -> Vec<(&str, &str)> {
    rows.iter().map(|r| (r.event_type, r.level)).collect()
}

/// Every non-empty line of a capture through a fresh parser.
pub fn replay<P: Parser + Default>(stdout: &str) -> (P, Vec<(Vec<EventRow>, LineFacts)>) {
    let mut p = P::default();
    let out = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse(&mut p, l))
        .collect();
    (p, out)
}

/// A session of `runtime` for argv tests.
pub fn session(runtime: &str, model: Option<&str>) -> Session {
    Session {
        id: "s".into(),
        agent_name: "a".into(),
        capability: "builder".into(),
        worktree_path: "/w".into(),
        branch_name: "b".into(),
        task_id: "t".into(),
        state: "between_turns".into(),
        parent_agent: None,
        depth: 0,
        run_id: None,
        started_at: String::new(),
        last_activity: String::new(),
        claude_session_id: None,
        runtime: runtime.into(),
        runtime_command: None,
        model: model.map(str::to_string),
    }
}

/// A builder capability with these instructions.
pub fn capability(instructions: &str) -> Capability {
    Capability {
        name: "builder".into(),
        terminal_mail: Vec::new(),
        on_idle: OnIdle::Exit,
        stall_timeout: None,
        permission_mode: None,
        instructions: instructions.into(),
    }
}
