//! overstory's `metrics.db` (SPEC §2.4): the cost tables that `ov costs` and
//! `ov costs --live` read. Written at the end of every turn that reported
//! usage; runner's own views read `turns`, never this file.
//!
//! One `sessions` row per agent and task accumulates the tokens, cost and
//! time of that agent's turns on that task (`completed_at` is set once the
//! agent ends: `completed` or `zombie`); one `token_snapshots` row per turn
//! holds the running totals after it, so the live view's "latest snapshot
//! per agent" is the agent's total so far. Non-goal: cache token counts —
//! the turn row does not carry them, so they stay 0.

use std::path::Path;

use rusqlite::{Connection, params};

use super::sessions::Session;
use super::turns::TurnRow;
use super::{Ctx, Result, immediate_sqlite, open_conn, schema};
use crate::clock;

/// Creates (or upgrades) `metrics.db` under `root`: `agent add` does it,
/// so that the agent's first turn does not pay for creating a database.
pub fn create(root: &Path) -> Result<()> {
    open(root).map(drop)
}

/// `metrics.db` under `root`, created or upgraded to runner's schema.
fn open(root: &Path) -> Result<Connection> {
    let path = root.join("metrics.db");
    let mut conn = open_conn(&path)?;
    schema::migrate_metrics(&mut conn, &path)?;
    Ok(conn)
}

/// The two statements of [`record_turn_on`], prepared ahead by [`open_existing`].
const UPSERT_SESSION: &str = "INSERT INTO sessions (agent_name, task_id, capability, started_at, completed_at,
                 duration_ms, exit_code, parent_agent, input_tokens, output_tokens,
                 estimated_cost_usd, model_used, run_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (agent_name, task_id) DO UPDATE SET
                 completed_at = excluded.completed_at,
                 duration_ms = duration_ms + excluded.duration_ms,
                 exit_code = excluded.exit_code,
                 input_tokens = input_tokens + excluded.input_tokens,
                 output_tokens = output_tokens + excluded.output_tokens,
                 estimated_cost_usd = CASE
                     WHEN estimated_cost_usd IS NULL AND excluded.estimated_cost_usd IS NULL THEN NULL
                     ELSE COALESCE(estimated_cost_usd, 0) + COALESCE(excluded.estimated_cost_usd, 0)
                 END,
                 model_used = COALESCE(excluded.model_used, model_used),
                 run_id = COALESCE(excluded.run_id, run_id)";
const INSERT_SNAPSHOT: &str =
    "INSERT INTO token_snapshots (agent_name, input_tokens, output_tokens,
                 estimated_cost_usd, model_used, run_id, created_at)
             SELECT agent_name, input_tokens, output_tokens, estimated_cost_usd, model_used,
                 run_id, ?3
             FROM sessions WHERE agent_name = ?1 AND task_id = ?2";

/// Opens an existing `metrics.db` under `root` (migrated, its statements
/// prepared, its WAL trimmed past [`super::WAL_TRIM_EARLY_BYTES`]) for a
/// later [`record_turn_on`]; `None` when there is none.
/// Why: a turn opens it while its agent runs, so that after the agent
/// exits only the write is left (the open — WAL index rebuild, schema
/// parse — was a tenth of a `--lines 0` turn's work after the exit). A
/// missing file is left to [`record_turn_on`], which creates it only for
/// a turn that reported usage, as before.
pub fn open_existing(root: &Path) -> Result<Option<Connection>> {
    if !root.join("metrics.db").exists() {
        return Ok(None);
    }
    let conn = open(root)?;
    super::trim_wals_over(&conn, super::WAL_TRIM_EARLY_BYTES);
    conn.prepare_cached(UPSERT_SESSION)
        .ctx("preparing the metrics.db writes")?;
    conn.prepare_cached(INSERT_SNAPSHOT)
        .ctx("preparing the metrics.db writes")?;
    Ok(Some(conn))
}

/// Adds one finished turn to `metrics.db` under `root`; a turn without usage
/// (no cost, no tokens) writes nothing and does not open the file.
pub fn record_turn(root: &Path, session: &Session, turn: &TurnRow) -> Result<bool> {
    record_turn_on(None, root, session, turn)
}

/// [`record_turn`] on a connection opened ahead by [`open_existing`]
/// (`None`: opened here). The connection is let go either way.
pub fn record_turn_on(
    opened: Option<Connection>,
    root: &Path,
    session: &Session,
    turn: &TurnRow,
) -> Result<bool> {
    if turn.cost_usd.is_none() && turn.input_tokens.is_none() && turn.output_tokens.is_none() {
        if let Some(c) = opened {
            super::close_or_leave(super::Db::Sqlite(c));
        }
        return Ok(false);
    }
    let mut conn = match opened {
        Some(c) => c,
        None => open(root)?,
    };
    let ended = turn.ended_at.clone().unwrap_or_else(clock::now);
    let duration_ms = match (clock::parse_ts(&turn.started_at), clock::parse_ts(&ended)) {
        (Some(a), Some(b)) => b
            .duration_since(a)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        _ => 0,
    };
    let ended_agent = matches!(turn.final_state.as_deref(), Some("completed" | "zombie"));
    immediate_sqlite(&mut conn, "recording costs in metrics.db", |tx| {
        tx.prepare_cached(UPSERT_SESSION)
            .and_then(|mut st| {
                st.execute(params![
                    session.agent_name,
                    session.task_id,
                    session.capability,
                    turn.started_at,
                    ended_agent.then_some(&ended),
                    duration_ms,
                    turn.exit_code,
                    session.parent_agent,
                    turn.input_tokens.unwrap_or(0),
                    turn.output_tokens.unwrap_or(0),
                    turn.cost_usd,
                    session.model,
                    session.run_id,
                ])
            })
            .ctx("recording costs in metrics.db")?;
        tx.prepare_cached(INSERT_SNAPSHOT)
            .and_then(|mut st| st.execute(params![session.agent_name, session.task_id, ended]))
            .ctx("recording a token snapshot in metrics.db")?;
        Ok(())
    })?;
    super::close_or_leave(super::Db::Sqlite(conn));
    Ok(true)
}
