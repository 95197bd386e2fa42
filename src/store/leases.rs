//! The `leases` table of fleet mode (SPEC §12.3): one row per agent whose
//! lease some host holds, with a fencing token drawn from the sequence
//! `lease_token` (never reused, even after rows are deleted) and an expiry
//! judged by the database's clock, never a host's.
//!
//! SQL only, PostgreSQL only: the rules of who may take a row are in
//! `fleet`. Invariants: a token changes hands only inside a transaction that
//! holds the row `FOR UPDATE`; renewal and release name the token, so a
//! superseded holder changes nothing; the sweep reads expired rows with
//! `SKIP LOCKED`, so it never waits behind a live turn's fenced write.

use std::time::Duration;

use super::db::{Db, Row, params};
use super::{Ctx, Result};

/// One lease row as a host sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRow {
    pub agent_name: String,
    pub host: String,
    pub runner_pid: i64,
    pub turn_id: Option<String>,
    pub token: i64,
    /// RFC 3339 UTC, as the rest of the store writes times.
    pub renewed_at: String,
    pub acquired_at: String,
    /// `expires_at` has passed (by the database's clock).
    pub expired: bool,
}

const TS: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";

fn columns() -> String {
    format!(
        "agent_name, host, runner_pid, turn_id, token, \
         to_char(renewed_at AT TIME ZONE 'UTC', {TS}), \
         to_char(acquired_at AT TIME ZONE 'UTC', {TS}), \
         CASE WHEN expires_at <= now() THEN 1 ELSE 0 END"
    )
}

fn read(r: &Row<'_>) -> super::db::DbResult<LeaseRow> {
    Ok(LeaseRow {
        agent_name: r.get(0)?,
        host: r.get(1)?,
        runner_pid: r.get(2)?,
        turn_id: r.get(3)?,
        token: r.get(4)?,
        renewed_at: r.get(5)?,
        acquired_at: r.get(6)?,
        expired: r.get::<i64>(7)? != 0,
    })
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// The agent's row, locked `FOR UPDATE` until the transaction ends.
pub fn lock(tx: &Db, agent: &str) -> Result<Option<LeaseRow>> {
    tx.query_opt(
        &format!(
            "SELECT {} FROM leases WHERE agent_name = ?1 FOR UPDATE",
            columns()
        ),
        params![agent],
        read,
    )
    .ctx("reading the lease")
}

/// The agent's row, without locking it.
pub fn get(db: &Db, agent: &str) -> Result<Option<LeaseRow>> {
    db.query_opt(
        &format!("SELECT {} FROM leases WHERE agent_name = ?1", columns()),
        params![agent],
        read,
    )
    .ctx("reading the lease")
}

/// Every row (for `doctor`, `hosts` and the sweep's view).
pub fn list(db: &Db) -> Result<Vec<LeaseRow>> {
    db.query_map(
        &format!("SELECT {} FROM leases ORDER BY agent_name", columns()),
        params![],
        read,
    )
    .ctx("reading leases")
}

/// Inserts a new row with a fresh token; `None` when a row appeared since
/// the caller looked (another host won the race).
pub fn insert(
    tx: &Db,
    agent: &str,
    host: &str,
    pid: i64,
    turn_id: Option<&str>,
    ttl: Duration,
) -> Result<Option<i64>> {
    tx.query_opt(
        "INSERT INTO leases (agent_name, host, runner_pid, turn_id, token, acquired_at, renewed_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, nextval('lease_token'), now(), now(), now() + ?5::bigint * interval '1 millisecond')
         ON CONFLICT (agent_name) DO NOTHING RETURNING token",
        params![agent, host, pid, turn_id, ms(ttl)],
        |r| r.get::<i64>(0),
    )
    .ctx("taking the lease")
}

/// Takes over the (locked) row with a fresh token, fencing its old holder.
pub fn take_over(
    tx: &Db,
    agent: &str,
    host: &str,
    pid: i64,
    turn_id: Option<&str>,
    ttl: Duration,
) -> Result<i64> {
    tx.query_row(
        "UPDATE leases SET host = ?2, runner_pid = ?3, turn_id = ?4, token = nextval('lease_token'),
                acquired_at = now(), renewed_at = now(), expires_at = now() + ?5::bigint * interval '1 millisecond'
         WHERE agent_name = ?1 RETURNING token",
        params![agent, host, pid, turn_id, ms(ttl)],
        |r| r.get::<i64>(0),
    )
    .ctx("taking over the lease")
}

/// Extends a live lease by `ttl` from now; `false` when the token is no
/// longer current or the lease already expired (it is lost).
pub fn renew(db: &Db, agent: &str, token: i64, ttl: Duration) -> Result<bool> {
    Ok(db
        .execute(
            "UPDATE leases SET renewed_at = now(), expires_at = now() + ?3::bigint * interval '1 millisecond'
             WHERE agent_name = ?1 AND token = ?2 AND expires_at > now()",
            params![agent, token, ms(ttl)],
        )
        .ctx("renewing the lease")?
        == 1)
}

/// Deletes the row if it still carries `token`.
pub fn release(db: &Db, agent: &str, token: i64) -> Result<bool> {
    Ok(db
        .execute(
            "DELETE FROM leases WHERE agent_name = ?1 AND token = ?2",
            params![agent, token],
        )
        .ctx("releasing the lease")?
        == 1)
}

/// Up to `limit` rows expired for longer than `grace`, locked `FOR UPDATE`
/// and skipping rows someone else holds locked (a live write, another
/// sweep).
pub fn lock_expired(tx: &Db, grace: Duration, limit: i64) -> Result<Vec<LeaseRow>> {
    tx.query_map(
        &format!(
            "SELECT {} FROM leases WHERE expires_at < now() - ?1::bigint * interval '1 millisecond'
             ORDER BY expires_at LIMIT ?2 FOR UPDATE SKIP LOCKED",
            columns()
        ),
        params![ms(grace), limit],
        read,
    )
    .ctx("reading expired leases")
}

/// Whether `turn_id` still holds a live lease (`mail send` from inside a
/// turn, SPEC §12.3), locking the row against the sweep for the caller's
/// transaction.
pub fn turn_is_current(tx: &Db, turn_id: &str) -> Result<bool> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM leases WHERE turn_id = ?1 AND expires_at > now() FOR KEY SHARE",
            params![turn_id],
            |r| r.get::<i64>(0),
        )
        .ctx("checking the turn's lease")?
        .is_some())
}
