//! Rows of `sessions`: registering agents, reading them, and the one
//! compare-and-swap every state change goes through (SPEC §3).

use super::db::{Db, DbResult, Row, params};
use serde::Serialize;

use super::{Ctx, Result};
use crate::state::{Cas, State, allowed_from};

#[derive(Debug, Clone, Serialize)]
pub struct Session {
    pub id: String,
    pub agent_name: String,
    pub capability: String,
    pub worktree_path: String,
    pub branch_name: String,
    pub task_id: String,
    pub state: String,
    pub parent_agent: Option<String>,
    pub depth: i64,
    pub run_id: Option<String>,
    pub started_at: String,
    pub last_activity: String,
    pub claude_session_id: Option<String>,
    pub runtime: String,
    pub runtime_command: Option<Vec<String>>,
    pub model: Option<String>,
}

impl Session {
    pub fn state(&self) -> Option<State> {
        State::parse(&self.state)
    }
}

const COLS: &str = "id, agent_name, capability, worktree_path, branch_name, task_id, state, \
    parent_agent, depth, run_id, started_at, last_activity, claude_session_id, runtime, \
    runtime_command, model";

fn from_row(r: &Row<'_>) -> DbResult<Session> {
    let cmd: Option<String> = r.get(14)?;
    Ok(Session {
        id: r.get(0)?,
        agent_name: r.get(1)?,
        capability: r.get(2)?,
        worktree_path: r.get(3)?,
        branch_name: r.get(4)?,
        task_id: r.get(5)?,
        state: r.get(6)?,
        parent_agent: r.get(7)?,
        depth: r.get::<Option<i64>>(8)?.unwrap_or(0),
        run_id: r.get(9)?,
        started_at: r.get(10)?,
        last_activity: r.get(11)?,
        claude_session_id: r.get(12)?,
        runtime: r
            .get::<Option<String>>(13)?
            .unwrap_or_else(|| "claude".into()),
        runtime_command: cmd.and_then(|c| serde_json::from_str(&c).ok()),
        model: r.get(15)?,
    })
}

pub fn get(conn: &Db, agent: &str) -> Result<Option<Session>> {
    conn.query_opt(
        &format!("SELECT {COLS} FROM sessions WHERE agent_name = ?1"),
        params![agent],
        from_row,
    )
    .ctx("reading an agent")
}

pub fn list(conn: &Db) -> Result<Vec<Session>> {
    conn.query_map(
        &format!("SELECT {COLS} FROM sessions ORDER BY agent_name"),
        params![],
        from_row,
    )
    .ctx("listing agents")
}

/// What `agent add` writes.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub agent_name: String,
    pub capability: String,
    pub worktree_path: String,
    pub task_id: String,
    pub parent_agent: Option<String>,
    pub depth: i64,
    pub runtime: String,
    pub runtime_command: Option<Vec<String>>,
    pub model: Option<String>,
    pub now: String,
}

pub fn insert(conn: &Db, s: &NewSession) -> Result<()> {
    let id = format!("session-{}", crate::os::random_alnum(12));
    let cmd = s
        .runtime_command
        .as_ref()
        .map(|c| serde_json::to_string(c).unwrap_or_default());
    conn.execute(
        "INSERT INTO sessions (id, agent_name, capability, worktree_path, branch_name, task_id, \
         tmux_session, state, pid, parent_agent, depth, run_id, started_at, last_activity, \
         escalation_level, runtime, runtime_command, model) \
         VALUES (?1, ?2, ?3, ?4, '', ?5, '', 'booting', NULL, ?6, ?7, NULL, ?8, ?8, 0, ?9, ?10, ?11)",
        params![
            id,
            s.agent_name,
            s.capability,
            s.worktree_path,
            s.task_id,
            s.parent_agent,
            s.depth,
            s.now,
            s.runtime,
            cmd,
            s.model
        ],
    )
    .ctx("registering the agent")?;
    Ok(())
}

/// `--recover`: back to `booting` from `completed` or `zombie` only, keeping
/// parent and session id; returns false when the state was another one.
pub fn recover(conn: &Db, s: &NewSession) -> Result<bool> {
    let cmd = s
        .runtime_command
        .as_ref()
        .map(|c| serde_json::to_string(c).unwrap_or_default());
    let n = conn
        .execute(
            "UPDATE sessions SET state='booting', capability=?2, worktree_path=?3, task_id=?4, \
             parent_agent=COALESCE(?5, parent_agent), runtime=?6, runtime_command=?7, \
             model=COALESCE(?8, model), last_activity=?9, stalled_since=NULL, escalation_level=0 \
             WHERE agent_name=?1 AND state IN ('completed','zombie')",
            params![
                s.agent_name,
                s.capability,
                s.worktree_path,
                s.task_id,
                s.parent_agent,
                s.runtime,
                cmd,
                s.model,
                s.now
            ],
        )
        .ctx("recovering the agent")?;
    Ok(n == 1)
}

/// The compare-and-swap of SPEC §3: `UPDATE … WHERE state IN (allowed)`.
pub fn cas(conn: &Db, agent: &str, to: State, now: &str) -> Result<Cas> {
    // Listed in one fixed order, so that transitions allowed from the same
    // states share one statement (a turn's `in_turn` and its end's
    // `between_turns`: prepared once, not twice).
    let from = allowed_from(to);
    let allowed: Vec<String> = State::ALL
        .iter()
        .filter(|s| from.contains(s))
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    if allowed.is_empty() {
        return Ok(Cas::Lost {
            current: current(conn, agent)?.unwrap_or_default(),
        });
    }
    let stalled_since = if to == State::Stalled {
        Some(now)
    } else {
        None
    };
    let n = conn
        .execute(
            &format!(
                "UPDATE sessions SET state=?2, stalled_since=COALESCE(?3, stalled_since) \
                 WHERE agent_name=?1 AND state IN ({})",
                allowed.join(",")
            ),
            params![agent, to.as_str(), stalled_since],
        )
        .ctx("changing an agent's state")?;
    if n == 1 {
        return Ok(Cas::Applied);
    }
    Ok(match current(conn, agent)? {
        Some(current) => Cas::Lost { current },
        None => Cas::Missing,
    })
}

pub fn current(conn: &Db, agent: &str) -> Result<Option<String>> {
    conn.query_opt(
        "SELECT state FROM sessions WHERE agent_name=?1",
        params![agent],
        |r| r.get(0),
    )
    .ctx("reading an agent's state")
}

pub fn touch(conn: &Db, agent: &str, now: &str) -> Result<()> {
    conn.execute(
        "UPDATE sessions SET last_activity=?2 WHERE agent_name=?1",
        params![agent, now],
    )
    .ctx("refreshing last_activity")?;
    Ok(())
}

/// [`touch`], and stores (or, with `None`, forgets) the conversation id to
/// resume, in one statement (the end of a turn).
pub fn touch_with_session_id(conn: &Db, agent: &str, id: Option<&str>, now: &str) -> Result<()> {
    conn.execute(
        "UPDATE sessions SET claude_session_id=?2, last_activity=?3 WHERE agent_name=?1",
        params![agent, id, now],
    )
    .ctx("storing the session id")?;
    Ok(())
}
