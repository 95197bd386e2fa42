//! Rows of `hosts` (SPEC §12.2), fleet mode only: the SQLite store is one
//! host and has no such table, so every function here is PostgreSQL-only
//! and callers ask [`Db::is_pg`] first ([`crate::hosts`] does).
//!
//! Every time is the DATABASE's clock (`now()`): hosts' clocks may differ,
//! and staleness is judged by the one clock they share. A row's meaning:
//! `started_at` is when the host last came online (inserted, or set back to
//! `online` from `offline`/`stopped`); while it stays online, commands and
//! beats move only `last_seen_at`. `pid` and `version` are those of the
//! last process that registered the host (`serve`, or a `turn`/`sweep`/
//! `nudge` run there).

use std::time::Duration;

use serde::Serialize;

use super::db::{Db, DbResult, Row, params};
use super::{Ctx, Result};

/// One host as `runner hosts` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HostRow {
    pub id: String,
    /// `online`, `offline` or `stopped`.
    pub state: String,
    /// When it last came online (`None` for the SQLite store's `local` row).
    pub started_at: Option<String>,
    pub last_seen_at: String,
    /// Milliseconds since `last_seen_at`, by the database's clock.
    pub last_seen_ms_ago: i64,
    pub pid: Option<i64>,
    pub version: Option<String>,
    /// Turns running there: rows of `leases` of that host with a turn.
    pub running_turns: i64,
}

/// The project's timestamp format (`clock::format_ts`), from a timestamptz.
fn ts(col: &str) -> String {
    format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
}

/// Inserts this host, or marks it seen and `online` with this process's pid
/// and version; `started_at` moves only when it comes back online.
pub fn upsert(db: &Db, id: &str, pid: i64, version: &str) -> Result<()> {
    db.execute(
        "INSERT INTO hosts (id, started_at, last_seen_at, pid, version, state) \
         VALUES (?1, now(), now(), ?2, ?3, 'online') \
         ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), pid = excluded.pid, \
         version = excluded.version, state = 'online', \
         started_at = CASE WHEN hosts.state = 'online' THEN hosts.started_at ELSE now() END",
        params![id, pid, version],
    )
    .ctx("registering this host")?;
    Ok(())
}

/// A heartbeat: `last_seen_at = now()`, and back `online` if another host's
/// sweep had judged it offline. `false` when the row is missing (the caller
/// registers again).
pub fn beat(db: &Db, id: &str) -> Result<bool> {
    let n = db
        .execute(
            "UPDATE hosts SET last_seen_at = now(), state = 'online', \
             started_at = CASE WHEN state = 'online' THEN started_at ELSE now() END \
             WHERE id = ?1",
            params![id],
        )
        .ctx("beating")?;
    Ok(n == 1)
}

/// A clean exit of `serve`.
pub fn mark_stopped(db: &Db, id: &str) -> Result<()> {
    db.execute(
        "UPDATE hosts SET state = 'stopped', last_seen_at = now() WHERE id = ?1",
        params![id],
    )
    .ctx("marking this host stopped")?;
    Ok(())
}

/// Sets `offline` every online host silent for longer than `host_stale`:
/// a compare-and-swap whose WHERE re-checks the staleness against the
/// database's clock, so a host that beat in the meantime is left alone.
/// Returns how many hosts it changed.
pub fn mark_offline_stale(db: &Db, host_stale: Duration) -> Result<u64> {
    let n = db
        .execute(
            "UPDATE hosts SET state = 'offline' WHERE state = 'online' \
             AND last_seen_at < now() - INTERVAL '1 millisecond' * CAST(?1 AS DOUBLE PRECISION)",
            params![host_stale.as_millis() as i64],
        )
        .ctx("marking silent hosts offline")?;
    Ok(n as u64)
}

fn from_row(r: &Row<'_>) -> DbResult<HostRow> {
    Ok(HostRow {
        id: r.get(0)?,
        state: r.get(1)?,
        started_at: r.get(2)?,
        last_seen_at: r.get(3)?,
        last_seen_ms_ago: r.get::<Option<i64>>(4)?.unwrap_or(0).max(0),
        pid: r.get(5)?,
        version: r.get(6)?,
        running_turns: r.get(7)?,
    })
}

/// Every host, by id, with its running turns.
pub fn list(db: &Db) -> Result<Vec<HostRow>> {
    db.query_map(
        &format!(
            "SELECT h.id, h.state, {}, {}, \
             CAST(EXTRACT(EPOCH FROM (now() - h.last_seen_at)) * 1000 AS BIGINT), \
             h.pid, h.version, \
             (SELECT COUNT(*) FROM leases l WHERE l.host = h.id AND l.turn_id IS NOT NULL) \
             FROM hosts h ORDER BY h.id",
            ts("h.started_at"),
            ts("h.last_seen_at")
        ),
        params![],
        from_row,
    )
    .ctx("listing hosts")
}

/// The host an agent is pinned to: `sessions.host` (`None`: unknown agent
/// or a NULL host, which is floating).
pub fn agent_host(db: &Db, agent: &str) -> Result<Option<String>> {
    Ok(db
        .query_opt(
            "SELECT host FROM sessions WHERE agent_name = ?1",
            params![agent],
            |r| r.get::<Option<String>>(0),
        )
        .ctx("reading an agent's host")?
        .flatten())
}

/// Pins an agent to a host (`*`: floating).
pub fn set_agent_host(db: &Db, agent: &str, host: &str) -> Result<()> {
    db.execute(
        "UPDATE sessions SET host = ?2 WHERE agent_name = ?1",
        params![agent, host],
    )
    .ctx("setting the agent's host")?;
    Ok(())
}

/// Every agent's host (`agent_name`, `host`), for the host columns.
pub fn agent_hosts(db: &Db) -> Result<Vec<(String, Option<String>)>> {
    db.query_map("SELECT agent_name, host FROM sessions", params![], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .ctx("reading agents' hosts")
}

/// This process's host id, recorded on the turn rows it inserts on
/// PostgreSQL when the row names none (set by `hosts::register`).
static PROCESS_HOST: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

pub fn set_process_host(id: &str) {
    *PROCESS_HOST.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.to_string());
}

pub fn process_host() -> Option<String> {
    PROCESS_HOST
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}
