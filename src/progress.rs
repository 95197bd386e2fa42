//! Live progress of a turn, as a human watching it sees it: what the stream
//! reports (text, tools, the result) and what the turn does (start,
//! escalation). A leaf module, so the stream and the turn both depend on it
//! and neither on the other. Non-goal: rendering — that is `report`'s.

use std::sync::Arc;

/// One line of live progress.
#[derive(Debug, Clone)]
pub enum Progress {
    Started {
        turn_id: String,
        pid: Option<u32>,
        mail: usize,
    },
    Text(String),
    Tool(String),
    ToolDone {
        name: String,
        ms: Option<i64>,
        error: bool,
    },
    Result {
        clean: bool,
        text: Option<String>,
    },
    Escalating(String),
}

/// Where a turn sends its progress.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;
