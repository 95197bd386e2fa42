//! Rows of `turns`: one per turn, inserted when it starts and finished once
//! when it ends (by the runner, by `stop`, or by the sweep for a runner that
//! died). Only the holder of the agent's lease finishes a turn row.

use super::db::{Db, DbResult, Row, params};
use serde::Serialize;

use super::{Ctx, Result};

#[derive(Debug, Clone, Default, Serialize)]
pub struct TurnRow {
    pub turn_id: String,
    pub agent_name: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub runner_pid: Option<i64>,
    pub agent_pid: Option<i64>,
    pub initial_state: Option<String>,
    pub final_state: Option<String>,
    pub outcome: Option<String>,
    pub reason: Option<String>,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub clean_result: bool,
    pub terminal_mail_observed: bool,
    pub session_id: Option<String>,
    pub resume_requested: Option<String>,
    pub resume_mismatch: bool,
    pub events: i64,
    pub lines: i64,
    pub malformed_lines: i64,
    pub bytes: i64,
    pub mail_ids: Vec<String>,
    pub cost_usd: Option<f64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub num_turns: Option<i64>,
    pub result_text: Option<String>,
    pub stderr_tail: Option<String>,
    pub leaked: bool,
    /// Bytes of stderr dropped between the head and the tail of `stderr.log`.
    pub stderr_dropped_bytes: Option<i64>,
    /// The host that ran the turn (PostgreSQL only; absent on SQLite).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

const COLS: &str = "turn_id, agent_name, started_at, ended_at, runner_pid, agent_pid, initial_state, \
    final_state, outcome, reason, exit_code, signal, clean_result, terminal_mail_observed, session_id, \
    resume_requested, resume_mismatch, events, lines, malformed_lines, bytes, mail_ids, cost_usd, \
    input_tokens, output_tokens, num_turns, result_text, stderr_tail, leaked, stderr_dropped_bytes";

fn from_row(r: &Row<'_>) -> DbResult<TurnRow> {
    let ids: String = r.get::<Option<String>>(21)?.unwrap_or_else(|| "[]".into());
    Ok(TurnRow {
        turn_id: r.get(0)?,
        agent_name: r.get(1)?,
        started_at: r.get(2)?,
        ended_at: r.get(3)?,
        runner_pid: r.get(4)?,
        agent_pid: r.get(5)?,
        initial_state: r.get(6)?,
        final_state: r.get(7)?,
        outcome: r.get(8)?,
        reason: r.get(9)?,
        exit_code: r.get(10)?,
        signal: r.get(11)?,
        clean_result: r.get::<i64>(12)? != 0,
        terminal_mail_observed: r.get::<i64>(13)? != 0,
        session_id: r.get(14)?,
        resume_requested: r.get(15)?,
        resume_mismatch: r.get::<i64>(16)? != 0,
        events: r.get(17)?,
        lines: r.get(18)?,
        malformed_lines: r.get(19)?,
        bytes: r.get(20)?,
        mail_ids: serde_json::from_str(&ids).unwrap_or_default(),
        cost_usd: r.get(22)?,
        input_tokens: r.get(23)?,
        output_tokens: r.get(24)?,
        num_turns: r.get(25)?,
        result_text: r.get(26)?,
        stderr_tail: r.get(27)?,
        leaked: r.get::<i64>(28)? != 0,
        stderr_dropped_bytes: r.get(29)?,
        host: if r.len() > 30 { r.get(30)? } else { None },
    })
}

/// The columns read: [`COLS`], and `host` on PostgreSQL (SQLite has none).
fn cols(conn: &Db) -> String {
    if conn.is_pg() {
        format!("{COLS}, host")
    } else {
        COLS.to_string()
    }
}

/// Records a turn's start. On PostgreSQL the row also names its host:
/// `t.host`, else this process's host (`hosts::process_host`).
pub fn insert_start(conn: &Db, t: &TurnRow) -> Result<()> {
    let host = t.host.clone().or_else(super::hosts::process_host);
    let sql = if conn.is_pg() {
        "INSERT INTO turns (turn_id, agent_name, started_at, runner_pid, initial_state, resume_requested, mail_ids, host) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    } else {
        "INSERT INTO turns (turn_id, agent_name, started_at, runner_pid, initial_state, resume_requested, mail_ids) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    };
    let json_ids = serde_json::to_string(&t.mail_ids).unwrap_or_else(|_| "[]".into());
    let all = params![
        t.turn_id,
        t.agent_name,
        t.started_at,
        t.runner_pid,
        t.initial_state,
        t.resume_requested,
        json_ids,
        host
    ];
    let n = if conn.is_pg() { 8 } else { 7 };
    conn.execute(sql, &all[..n])
        .ctx("recording the turn start")?;
    Ok(())
}

pub fn set_agent_pid(conn: &Db, turn_id: &str, pid: i64) -> Result<()> {
    conn.execute(
        "UPDATE turns SET agent_pid=?2 WHERE turn_id=?1",
        params![turn_id, pid],
    )
    .ctx("recording the agent pid")?;
    Ok(())
}

/// Finishes a turn row; a row that is already finished is left alone
/// (returns false).
pub fn finish(conn: &Db, t: &TurnRow) -> Result<bool> {
    let n = conn
        .execute(
            "UPDATE turns SET ended_at=?2, agent_pid=COALESCE(?3, agent_pid), final_state=?4, outcome=?5, \
             reason=?6, exit_code=?7, signal=?8, clean_result=?9, terminal_mail_observed=?10, session_id=?11, \
             resume_mismatch=?12, events=?13, lines=?14, malformed_lines=?15, bytes=?16, cost_usd=?17, \
             input_tokens=?18, output_tokens=?19, num_turns=?20, result_text=?21, stderr_tail=?22, leaked=?23, \
             stderr_dropped_bytes=?24 \
             WHERE turn_id=?1 AND ended_at IS NULL",
            params![
                t.turn_id,
                t.ended_at,
                t.agent_pid,
                t.final_state,
                t.outcome,
                t.reason,
                t.exit_code,
                t.signal,
                t.clean_result as i64,
                t.terminal_mail_observed as i64,
                t.session_id,
                t.resume_mismatch as i64,
                t.events,
                t.lines,
                t.malformed_lines,
                t.bytes,
                t.cost_usd,
                t.input_tokens,
                t.output_tokens,
                t.num_turns,
                t.result_text,
                t.stderr_tail,
                t.leaked as i64,
                t.stderr_dropped_bytes
            ],
        )
        .ctx("finishing the turn row")?;
    Ok(n == 1)
}

pub fn get(conn: &Db, turn_id: &str) -> Result<Option<TurnRow>> {
    conn.query_opt(
        &format!("SELECT {} FROM turns WHERE turn_id=?1", cols(conn)),
        params![turn_id],
        from_row,
    )
    .ctx("reading a turn")
}

/// Unfinished turns of an agent, oldest first.
///
/// On SQLite a one-column look comes first: there almost never is one (a
/// runner died), and a short-lived process prepares each statement once —
/// reading all thirty columns costs several times more to prepare.
pub fn unfinished(conn: &Db, agent: &str) -> Result<Vec<TurnRow>> {
    if !conn.is_pg()
        && conn
            .query_opt(
                "SELECT 1 FROM turns WHERE agent_name=?1 AND ended_at IS NULL LIMIT 1",
                params![agent],
                |_| Ok(()),
            )
            .ctx("reading unfinished turns")?
            .is_none()
    {
        return Ok(Vec::new());
    }
    conn.query_map(
        &format!(
            "SELECT {} FROM turns WHERE agent_name=?1 AND ended_at IS NULL ORDER BY turn_id",
            cols(conn)
        ),
        params![agent],
        from_row,
    )
    .ctx("reading unfinished turns")
}

/// Turn history, newest first.
pub fn list(conn: &Db, agent: Option<&str>, limit: i64) -> Result<Vec<TurnRow>> {
    conn.query_map(
        &format!(
            "SELECT {} FROM turns WHERE (CAST(?1 AS TEXT) IS NULL OR agent_name=?1) ORDER BY turn_id DESC LIMIT ?2",
            cols(conn)
        ),
        params![agent, limit],
        from_row,
    )
    .ctx("listing turns")
}

/// The last finished turn of an agent.
pub fn last_finished(conn: &Db, agent: &str) -> Result<Option<TurnRow>> {
    conn.query_opt(
        &format!(
            "SELECT {} FROM turns WHERE agent_name=?1 AND ended_at IS NOT NULL ORDER BY turn_id DESC LIMIT 1",
            cols(conn)
        ),
        params![agent],
        from_row,
    )
    .ctx("reading the last turn")
}

/// Total cost of an agent's turns.
pub fn total_cost(conn: &Db, agent: &str) -> Result<f64> {
    conn.query_row(
        "SELECT COALESCE(SUM(cost_usd), 0) FROM turns WHERE agent_name=?1",
        params![agent],
        |r| r.get(0),
    )
    .ctx("summing cost")
}

/// Tokens already stored for earlier turns of a conversation (for CLIs that
/// report running totals).
pub fn tokens_before(
    conn: &Db,
    agent: &str,
    session_id: &str,
    turn_id: &str,
) -> Result<(i64, i64)> {
    conn.query_row(
        "SELECT CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT), CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) FROM turns \
         WHERE agent_name=?1 AND session_id=?2 AND turn_id<>?3",
        params![agent, session_id, turn_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .ctx("summing earlier tokens")
}
