//! Output: the human and `--json` forms of every command's result, and the
//! live progress of a turn. One place for formats; commands return data.
//! Results go to stdout; diagnostics and progress to stderr.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::clock;
use crate::ops::AgentView;
use crate::serve::{NudgeReport, ServeReport};
use crate::stop::StopReport;
use crate::store::events::StoredEvent;
use crate::store::mail::Message;
use crate::store::sessions::Session;
use crate::store::turns::TurnRow;
use crate::sweep;
use crate::turn::{Progress, ProgressFn, TurnSummary};

/// A command's result. It knows both of its renderings — the `--json`
/// document (its `Serialize` form) and the human one — and the exit code it
/// means, so that dispatch is one [`emit`] per command.
pub trait Render: Serialize {
    /// The human form, on stdout (diagnostics go to stderr).
    fn human(&self);
    fn exit_code(&self) -> i32 {
        0
    }
}

/// Prints `r` in the form asked for; returns the exit code it means.
pub fn emit<R: Render>(r: &R, as_json: bool) -> i32 {
    if as_json {
        json(r)
    } else {
        r.human()
    }
    r.exit_code()
}

/// `runner init`.
#[derive(Debug, Serialize)]
pub struct Initialized {
    pub root: std::path::PathBuf,
    /// `sqlite`, or the PostgreSQL URL (password redacted) and schema.
    pub store: String,
    /// Whether `[store] url` was written to config.toml (`--save`).
    pub saved: bool,
}

/// `runner mail send`.
#[derive(Debug, Serialize)]
pub struct Sent {
    pub id: String,
}

/// `runner status`.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct StatusTable(pub Vec<AgentView>);

/// `runner turns`; the flag: show the host column (fleet mode).
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct TurnList(pub Vec<TurnRow>, #[serde(skip)] pub bool);

/// `runner events` (without `--follow`).
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct EventList(pub Vec<StoredEvent>);

/// `runner mail list`.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct MailList(pub Vec<MailRow>);

/// A message of `mail list`, with its recipient's host in fleet mode.
#[derive(Debug, Serialize)]
pub struct MailRow {
    #[serde(flatten)]
    pub message: Message,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// `runner mail check`: the messages in full.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct MailBodies(pub Vec<Message>);

impl Render for Initialized {
    fn human(&self) {
        println!(
            "initialized {} (store: {})",
            self.root.display(),
            self.store
        );
        if self.saved {
            println!(
                "saved [store] url in {}",
                self.root.join("config.toml").display()
            );
        }
    }
}

impl Render for Sent {
    fn human(&self) {
        println!("{}", self.id);
    }
}

impl Render for Session {
    fn human(&self) {
        println!(
            "agent {} added ({}, runtime {}, state {})",
            self.agent_name, self.capability, self.runtime, self.state
        );
    }
}

impl Render for AgentView {
    fn human(&self) {
        agent(self)
    }
}

impl Render for StatusTable {
    fn human(&self) {
        status(&self.0)
    }
}

impl Render for TurnList {
    fn human(&self) {
        turns(&self.0, self.1)
    }
}

impl Render for crate::hosts::HostList {
    fn human(&self) {
        hosts(&self.0)
    }
}

impl Render for EventList {
    fn human(&self) {
        events(&self.0)
    }
}

impl Render for MailList {
    fn human(&self) {
        mail_rows(&self.0)
    }
}

impl Render for MailBodies {
    fn human(&self) {
        mail_bodies(&self.0)
    }
}

impl Render for TurnSummary {
    fn human(&self) {
        turn_summary(self)
    }
    fn exit_code(&self) -> i32 {
        self.exit_code
    }
}

impl Render for NudgeReport {
    fn human(&self) {
        println!("{}", self.message);
    }
    /// The turn's when it ran one; 0 when queued or debounced.
    fn exit_code(&self) -> i32 {
        self.turn.as_ref().map(|t| t.exit_code).unwrap_or(0)
    }
}

impl Render for StopReport {
    fn human(&self) {
        println!("{}", self.message);
    }
}

impl Render for ServeReport {
    fn human(&self) {
        println!(
            "serve: {} turn(s), {} sweep(s), {} interrupted",
            self.turns, self.sweeps, self.interrupted
        );
    }
}

impl Render for crate::store::pg::copy::CopyReport {
    fn human(&self) {
        println!(
            "copied into schema {} at {}: {} sessions, {} runs, {} turns, {} messages, {} events",
            self.schema, self.to, self.sessions, self.runs, self.turns, self.messages, self.events
        );
    }
}

impl Render for crate::doctor::Report {
    fn human(&self) {
        for c in &self.checks {
            println!("{}", c.line());
        }
    }
    /// 0 when nothing fails, 1 otherwise.
    fn exit_code(&self) -> i32 {
        crate::doctor::Report::exit_code(self)
    }
}

impl Render for sweep::Report {
    fn human(&self) {
        let r = self;
        println!(
            "sweep{}: scanned {}, orphan turns {}, groups killed {}, claims retried {}, released {}, dead {}, states fixed {}, turns stopped {}, due agents {}, errors {}",
            if r.dry_run { " (dry run)" } else { "" },
            r.scanned,
            r.orphan_turns,
            r.groups_killed,
            r.claims_retried,
            r.claims_released,
            r.claims_dead,
            r.states_fixed,
            r.turns_stopped,
            r.due_agents,
            r.errors
        );
        for e in &r.error_messages {
            error(e);
        }
    }
}

/// Prints `v` as one JSON document.
pub fn json<T: Serialize + ?Sized>(v: &T) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, v);
    let _ = writeln!(out);
}

/// Prints `v` as one JSON line (for `--follow`).
pub fn json_line<T: Serialize + ?Sized>(v: &T) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = writeln!(out);
    let _ = out.flush();
}

pub fn error(msg: &str) {
    eprintln!("runner: {msg}");
}

fn age(ts: &str) -> String {
    clock::parse_ts(ts)
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .map(clock::human_duration)
        .unwrap_or_else(|| "-".into())
}

pub fn status(rows: &[AgentView]) {
    let mut out = std::io::stdout().lock();
    // Fleet mode: the agent's host, last (SQLite output is unchanged).
    let fleet = rows.iter().any(|v| v.host.is_some());
    let host_col = |h: Option<&str>| match (fleet, h) {
        (true, h) => format!(" {}", h.unwrap_or("*")),
        (false, _) => String::new(),
    };
    let _ = writeln!(
        out,
        "{:<16} {:<10} {:<13} {:<12} {:<28} {:>4} {:<14} {:>8}{}",
        "AGENT",
        "CAPABILITY",
        "STATE",
        "PARENT",
        "RUNNING TURN",
        "DUE",
        "LAST OUTCOME",
        "COST",
        host_col(Some("HOST"))
    );
    for v in rows {
        let s = &v.session;
        let running = match &v.running {
            Some(i) => format!(
                "pid {} {} (line {})",
                i.agent_pid.unwrap_or(i.runner_pid),
                age(&i.acquired_at),
                age(&s.last_activity)
            ),
            None => "-".into(),
        };
        let last = v
            .last_turn
            .as_ref()
            .and_then(|t| t.outcome.clone())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:<13} {:<12} {:<28} {:>4} {:<14} {:>8}{}",
            s.agent_name,
            s.capability,
            s.state,
            s.parent_agent.as_deref().unwrap_or("-"),
            running,
            v.due_mail,
            last,
            format!("${:.4}", v.cost_usd),
            host_col(v.host.as_deref())
        );
        if let Some(t) = &v.last_turn
            && matches!(
                t.outcome.as_deref(),
                Some("refused" | "spawn_failed" | "failed")
            )
            && let Some(r) = &t.reason
        {
            let _ = writeln!(out, "  └ {}", r);
        }
    }
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "(no agents; add one with: runner agent add NAME --capability builder)"
        );
    }
}

fn agent(v: &AgentView) {
    let s = &v.session;
    let mut out = std::io::stdout().lock();
    let kv = |out: &mut std::io::StdoutLock<'_>, k: &str, val: &str| {
        let _ = writeln!(out, "{k:<18} {val}");
    };
    kv(&mut out, "agent", &s.agent_name);
    kv(&mut out, "capability", &s.capability);
    kv(&mut out, "state", &s.state);
    kv(&mut out, "parent", s.parent_agent.as_deref().unwrap_or("-"));
    kv(
        &mut out,
        "task",
        if s.task_id.is_empty() {
            "-"
        } else {
            &s.task_id
        },
    );
    kv(&mut out, "runtime", &s.runtime);
    if let Some(c) = &s.runtime_command {
        kv(&mut out, "command", &c.join(" "));
    }
    kv(&mut out, "model", s.model.as_deref().unwrap_or("-"));
    kv(&mut out, "worktree", &s.worktree_path);
    if let Some(h) = &v.host {
        kv(&mut out, "host", h);
    }
    kv(
        &mut out,
        "session id",
        s.claude_session_id.as_deref().unwrap_or("-"),
    );
    kv(&mut out, "started", &s.started_at);
    kv(&mut out, "last activity", &s.last_activity);
    kv(&mut out, "due mail", &v.due_mail.to_string());
    kv(&mut out, "pending mail", &v.pending_mail.to_string());
    kv(&mut out, "cost", &format!("${:.4}", v.cost_usd));
    match &v.running {
        Some(i) => kv(
            &mut out,
            "running",
            &format!(
                "turn {} runner pid {} since {}",
                i.turn_id, i.runner_pid, i.acquired_at
            ),
        ),
        None => kv(&mut out, "running", "-"),
    }
    if let Some(t) = &v.last_turn {
        kv(
            &mut out,
            "last turn",
            &format!(
                "{} {} {}",
                t.turn_id,
                t.outcome.as_deref().unwrap_or("-"),
                t.reason.as_deref().unwrap_or("")
            ),
        );
    }
}

/// `with_host`: fleet mode's host column after the agent.
fn turns(rows: &[TurnRow], with_host: bool) {
    let mut out = std::io::stdout().lock();
    let host_col = |h: Option<&str>| {
        if with_host {
            format!(" {:<16}", h.unwrap_or("-"))
        } else {
            String::new()
        }
    };
    let _ = writeln!(
        out,
        "{:<30} {:<14}{} {:<13} {:>5} {:>7} {:>6} {:>5}  REASON",
        "TURN",
        "AGENT",
        host_col(Some("HOST")),
        "OUTCOME",
        "EXIT",
        "LINES",
        "EVENTS",
        "MAIL"
    );
    for t in rows {
        let _ = writeln!(
            out,
            "{:<30} {:<14}{} {:<13} {:>5} {:>7} {:>6} {:>5}  {}",
            t.turn_id,
            t.agent_name,
            host_col(t.host.as_deref()),
            t.outcome.as_deref().unwrap_or("(running)"),
            t.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            t.lines,
            t.events,
            t.mail_ids.len(),
            t.reason.as_deref().unwrap_or("")
        );
    }
}

pub fn event_line(e: &StoredEvent) -> String {
    let detail = match e.event_type.as_str() {
        "tool_start" => format!(
            "{} {}",
            e.tool_name.as_deref().unwrap_or(""),
            crate::runtime::cut(e.tool_args.as_deref().unwrap_or(""), 100)
        ),
        "tool_end" => format!(
            "{} {}ms",
            e.tool_name.as_deref().unwrap_or(""),
            e.tool_duration_ms.unwrap_or(0)
        ),
        _ => crate::runtime::cut(e.data.as_deref().unwrap_or(""), 140),
    };
    format!(
        "{} {:<12} {:<13} {:<5} {}",
        e.created_at, e.agent_name, e.event_type, e.level, detail
    )
}

fn events(rows: &[StoredEvent]) {
    let mut out = std::io::stdout().lock();
    for e in rows {
        let _ = writeln!(out, "{}", event_line(e));
    }
}

pub fn mail(rows: &[Message]) {
    let mut out = std::io::stdout().lock();
    for m in rows {
        let _ = writeln!(out, "{}", mail_line(m, None));
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no mail)");
    }
}

/// One message; in fleet mode the recipient is followed by `@host`.
fn mail_line(m: &Message, host: Option<&str>) -> String {
    let to = match host {
        Some(h) => format!("{}@{h}", m.to_agent),
        None => m.to_agent.clone(),
    };
    format!(
        "{} {:<9} {:<12} → {:<12} {:<13} {:<6} tries {} {}",
        m.id,
        m.status(),
        m.from_agent,
        to,
        m.kind,
        m.priority,
        m.tries,
        m.subject
    )
}

fn mail_rows(rows: &[MailRow]) {
    let mut out = std::io::stdout().lock();
    for r in rows {
        let _ = writeln!(out, "{}", mail_line(&r.message, r.host.as_deref()));
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no mail)");
    }
}

/// `runner hosts`: last seen by the database's clock.
fn hosts(rows: &[crate::store::hosts::HostRow]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<24} {:<8} {:<38} {:>7}  VERSION",
        "HOST", "STATE", "LAST SEEN", "RUNNING"
    );
    for h in rows {
        let seen = format!(
            "{} ({} ago)",
            h.last_seen_at,
            clock::human_duration(std::time::Duration::from_millis(
                h.last_seen_ms_ago.max(0) as u64
            ))
        );
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:<38} {:>7}  {}",
            h.id,
            h.state,
            seen,
            h.running_turns,
            h.version.as_deref().unwrap_or("-")
        );
    }
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "(no hosts yet: a host registers when it runs serve, turn, nudge or sweep)"
        );
    }
}

fn mail_bodies(rows: &[Message]) {
    let mut out = std::io::stdout().lock();
    for m in rows {
        let _ = writeln!(out, "{}", crate::mail::render_message(m));
        let _ = writeln!(out, "---");
    }
    if rows.is_empty() {
        let _ = writeln!(out, "(no new mail)");
    }
}

pub fn turn_summary(s: &TurnSummary) {
    let mut out = std::io::stdout().lock();
    if s.nothing_to_deliver {
        let _ = writeln!(out, "{}", s.message);
        return;
    }
    let _ = writeln!(out, "{} → exit {}", s.message, s.exit_code);
    if let Some(t) = &s.turn {
        let _ = writeln!(
            out,
            "turn {}: {} lines, {} events, {} malformed, {} bytes, {} mail delivered{}{}",
            t.turn_id,
            t.lines,
            t.events,
            t.malformed_lines,
            t.bytes,
            t.mail_ids.len(),
            t.cost_usd.map(|c| format!(", ${c:.4}")).unwrap_or_default(),
            if t.leaked {
                ", leftover processes killed"
            } else {
                ""
            }
        );
        if let Some(tail) = &t.stderr_tail
            && matches!(
                t.outcome.as_deref(),
                Some("refused" | "spawn_failed" | "failed")
            )
        {
            let _ = writeln!(out, "agent stderr:");
            for l in tail
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                let _ = writeln!(out, "  {l}");
            }
        }
    }
}

/// Live progress of a turn on stderr: colored and in place on a terminal,
/// plain lines otherwise.
pub fn progress_printer(agent: &str) -> ProgressFn {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let agent = agent.to_string();
    Arc::new(move |p: &Progress| {
        let t = clock::human_duration(start.elapsed());
        let line = match p {
            Progress::Started { turn_id, pid, mail } => {
                format!(
                    "{agent}: turn {turn_id} started (pid {}), {mail} mail delivered",
                    pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
                )
            }
            Progress::Text(s) => format!("{agent}: {}", crate::runtime::cut(s, 160)),
            Progress::Tool(s) => format!("{agent}: ▶ {s}"),
            Progress::ToolDone { name, ms, error } => {
                format!(
                    "{agent}: {} {name}{}",
                    if *error { "✗" } else { "✓" },
                    ms.map(|m| format!(" ({m} ms)")).unwrap_or_default()
                )
            }
            Progress::Result { clean, text } => {
                format!(
                    "{agent}: result {}{}",
                    if *clean { "ok" } else { "error" },
                    text.as_ref().map(|t| format!(": {t}")).unwrap_or_default()
                )
            }
            Progress::Escalating(why) => format!("{agent}: ending the turn: {why}"),
        };
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = writeln!(err, "\x1b[2m[{t:>6}]\x1b[0m {line}");
        } else {
            let _ = writeln!(err, "[{t:>6}] {line}");
        }
    })
}
