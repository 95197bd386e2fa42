//! Rows of `messages`: sending, listing, and the claim lifecycle of SPEC
//! §2.3 (claim → deliver | release | retry → dead) as SQL. The rules that
//! decide (backoff, when a message is dead) are in `claim`; this file only
//! writes what they decide. Every claim change is keyed by a scope (one
//! turn's claims, or all claims of one agent for the sweep) and must run in
//! the caller's transaction while the caller holds that agent's lease.
//! On PostgreSQL every insert also issues `NOTIFY runner_mail` with the
//! recipient, delivered when the insert commits (SPEC §12.4).

use super::db::{Db, DbResult, Row, ToValue, params};
use serde::Serialize;

use super::{Ctx, Result};

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    #[serde(skip)]
    pub rowid: i64,
    pub id: String,
    pub from_agent: String,
    pub to_agent: String,
    pub subject: String,
    pub body: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub priority: String,
    pub thread_id: Option<String>,
    pub payload: Option<String>,
    pub read: bool,
    pub created_at: String,
    pub claimed_by: Option<String>,
    pub claimed_at: Option<String>,
    pub tries: i64,
    pub process_after: Option<String>,
    pub delivered_at: Option<String>,
    pub dead_at: Option<String>,
    pub last_error: Option<String>,
    pub turn_id: Option<String>,
}

impl Message {
    pub fn status(&self) -> &'static str {
        if self.dead_at.is_some() {
            "dead"
        } else if self.read {
            "delivered"
        } else if self.claimed_by.is_some() {
            "claimed"
        } else {
            "pending"
        }
    }

    /// A nudge: stored by `runner nudge`, rendered as `[NUDGE from …]`.
    pub fn is_nudge(&self) -> bool {
        self.payload
            .as_deref()
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(|k| k == "nudge"))
            .unwrap_or(false)
    }
}

const COLS: &str = "rowid, id, from_agent, to_agent, subject, body, type, priority, thread_id, \
    payload, read, created_at, claimed_by, claimed_at, tries, process_after, delivered_at, dead_at, \
    last_error, turn_id";

fn from_row(r: &Row<'_>) -> DbResult<Message> {
    Ok(Message {
        rowid: r.get(0)?,
        id: r.get(1)?,
        from_agent: r.get(2)?,
        to_agent: r.get(3)?,
        subject: r.get(4)?,
        body: r.get(5)?,
        kind: r.get(6)?,
        priority: r.get(7)?,
        thread_id: r.get(8)?,
        payload: r.get(9)?,
        read: r.get::<Option<i64>>(10)?.unwrap_or(0) != 0,
        created_at: r.get::<Option<String>>(11)?.unwrap_or_default(),
        claimed_by: r.get(12)?,
        claimed_at: r.get(13)?,
        tries: r.get::<Option<i64>>(14)?.unwrap_or(0),
        process_after: r.get(15)?,
        delivered_at: r.get(16)?,
        dead_at: r.get(17)?,
        last_error: r.get(18)?,
        turn_id: r.get(19)?,
    })
}

fn collect(conn: &Db, sql: &str, p: &[&dyn ToValue], what: &str) -> Result<Vec<Message>> {
    conn.query_map(sql, p, from_row).ctx(what)
}

#[derive(Debug, Clone)]
pub struct NewMessage {
    pub from_agent: String,
    pub to_agent: String,
    pub subject: String,
    pub body: String,
    pub kind: String,
    pub priority: String,
    pub thread_id: Option<String>,
    pub payload: Option<String>,
    pub turn_id: Option<String>,
}

/// Inserts a message and returns its id (`msg-` + 12 `[a-z0-9]`).
pub fn insert(conn: &Db, m: &NewMessage, now: &str) -> Result<String> {
    loop {
        let id = format!("msg-{}", crate::os::random_alnum(12));
        let inserted = conn.insert_unless_duplicate(
            "INSERT INTO messages (id, from_agent, to_agent, subject, body, type, priority, \
             thread_id, payload, read, created_at, tries, turn_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, ?10, 0, ?11)",
            params![
                id,
                m.from_agent,
                m.to_agent,
                m.subject,
                m.body,
                m.kind,
                m.priority,
                m.thread_id,
                m.payload,
                now,
                m.turn_id
            ],
        );
        if inserted.ctx("storing mail")? {
            notify(conn, &m.to_agent)?;
            return Ok(id);
        } // else an id collision: draw again
    }
}

/// The channel every mail insert notifies on PostgreSQL (SPEC §12.4).
pub const MAIL_CHANNEL: &str = "runner_mail";

/// On PostgreSQL, `NOTIFY runner_mail` with the recipient: sent when the
/// caller's transaction commits (at once outside one), never for a rolled
/// back insert. Serves `LISTEN` ([`super::pg::listen`]) and start the
/// recipient's turn without waiting for their next poll. SQLite: nothing.
fn notify(conn: &Db, recipient: &str) -> Result<()> {
    if conn.is_pg() {
        conn.execute("SELECT pg_notify(?1, ?2)", params![MAIL_CHANNEL, recipient])
            .ctx("notifying new mail")?;
    }
    Ok(())
}

#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub to: Option<String>,
    pub from: Option<String>,
    pub unread: bool,
    pub dead: bool,
    pub limit: i64,
}

/// Newest first.
pub fn list(conn: &Db, f: &ListFilter) -> Result<Vec<Message>> {
    collect(
        conn,
        &format!(
            "SELECT {COLS} FROM messages WHERE (CAST(?1 AS TEXT) IS NULL OR to_agent=?1) AND (CAST(?2 AS TEXT) IS NULL OR from_agent=?2) \
             AND (?3 = 0 OR read = 0) AND (?4 = 0 OR dead_at IS NOT NULL) ORDER BY rowid DESC LIMIT ?5"
        ),
        params![f.to, f.from, f.unread as i64, f.dead as i64, f.limit],
        "listing mail",
    )
}

/// `mail check`: pending mail of `agent`, marked read in the same statement.
/// Claimed mail belongs to the turn delivering it and is left alone.
pub fn check(conn: &Db, agent: &str, now: &str) -> Result<Vec<Message>> {
    let mut out = collect(
        conn,
        &format!(
            "UPDATE messages SET read=1, delivered_at=?2 WHERE to_agent=?1 AND read=0 \
             AND claimed_by IS NULL AND dead_at IS NULL RETURNING {COLS}"
        ),
        params![agent, now],
        "checking mail",
    )?;
    out.sort_by_key(|m| m.rowid);
    Ok(out)
}

/// Number of due messages for `agent` (pending and `process_after` passed).
pub fn due_count(conn: &Db, agent: &str, now: &str) -> Result<i64> {
    conn.query_row(
        "SELECT COUNT(*) FROM messages WHERE to_agent=?1 AND read=0 AND claimed_by IS NULL \
         AND dead_at IS NULL AND (process_after IS NULL OR process_after <= ?2)",
        params![agent, now],
        |r| r.get(0),
    )
    .ctx("counting due mail")
}

/// Number of undelivered, live messages for `agent` (claimed or not).
pub fn pending_count(conn: &Db, agent: &str) -> Result<i64> {
    conn.query_row(
        "SELECT COUNT(*) FROM messages WHERE to_agent=?1 AND read=0 AND dead_at IS NULL",
        params![agent],
        |r| r.get(0),
    )
    .ctx("counting mail")
}

/// Agents with due mail, oldest mail first.
pub fn agents_with_due(conn: &Db, now: &str) -> Result<Vec<String>> {
    conn.query_map(
        "SELECT to_agent FROM messages WHERE read=0 AND claimed_by IS NULL AND dead_at IS NULL \
         AND (process_after IS NULL OR process_after <= ?1) GROUP BY to_agent ORDER BY MIN(rowid)",
        params![now],
        |r| r.get(0),
    )
    .ctx("finding due mail")
}

/// Claims up to `limit` due messages of `agent` for `turn_id`, arrival order.
///
/// `limit` is written into the statement, not bound: SQLite re-prepares a
/// statement whose `LIMIT` is a bound parameter on its first step (it may
/// plan differently for another value), which doubled the cost of the
/// turn's most expensive statement to prepare. On SQLite (each statement
/// prepared once per process, and most turns claim nothing) the due rowids
/// are looked up first; only when there are some, an `UPDATE` without
/// `RETURNING` (twenty returned columns are costly to prepare) claims them
/// and the claimed rows are read by the turn id — all in the caller's
/// `BEGIN IMMEDIATE` transaction, so they are exactly the rows just claimed.
pub fn claim_due(
    conn: &Db,
    agent: &str,
    turn_id: &str,
    now: &str,
    limit: i64,
) -> Result<Vec<Message>> {
    let due = format!(
        "SELECT rowid FROM messages WHERE to_agent=?1 AND read=0 AND claimed_by IS NULL \
         AND dead_at IS NULL AND (process_after IS NULL OR process_after <= ?3) \
         ORDER BY rowid LIMIT {limit}"
    );
    if !conn.is_pg() {
        // Most turns find nothing due: the bare query first (a third of the
        // UPDATE's cost to prepare); the UPDATE only when it finds mail.
        let none = conn
            .query_opt(&due, params![agent, turn_id, now], |_| Ok(()))
            .ctx("claiming mail")?
            .is_none();
        if none {
            return Ok(Vec::new());
        }
        let n = conn
            .execute(
                &format!("UPDATE messages SET claimed_by=?2, claimed_at=?3 WHERE rowid IN ({due})"),
                params![agent, turn_id, now],
            )
            .ctx("claiming mail")?;
        if n == 0 {
            return Ok(Vec::new());
        }
        return claimed(conn, Scope::Turn(turn_id));
    }
    // On PostgreSQL a concurrent claimer's rows are skipped, not re-read
    // after it commits (read committed would not re-run the subquery).
    let mut out = collect(
        conn,
        &format!(
            "UPDATE messages SET claimed_by=?2, claimed_at=?3 WHERE rowid IN (\
               {due} FOR UPDATE SKIP LOCKED) RETURNING {COLS}"
        ),
        params![agent, turn_id, now],
        "claiming mail",
    )?;
    out.sort_by_key(|m| m.rowid);
    Ok(out)
}

/// Whose claims an operation touches.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// The claims of one turn.
    Turn(&'a str),
    /// Every open claim on mail to this agent (the sweep, under the lease).
    Agent(&'a str),
}

impl Scope<'_> {
    fn clause(&self) -> (&'static str, &str) {
        match self {
            Scope::Turn(t) => ("claimed_by = ?1", t),
            Scope::Agent(a) => ("to_agent = ?1 AND claimed_by IS NOT NULL", a),
        }
    }
}

/// The open claims of a scope.
pub fn claimed(conn: &Db, scope: Scope<'_>) -> Result<Vec<Message>> {
    let (w, key) = scope.clause();
    collect(
        conn,
        &format!(
            "SELECT {COLS} FROM messages WHERE {w} AND read=0 AND dead_at IS NULL ORDER BY rowid"
        ),
        params![key],
        "reading claims",
    )
}

/// The id and try count of each open claim of a scope, arrival order: all
/// a retry needs (a two-column statement is cheaper to prepare than
/// [`claimed`]'s twenty).
pub fn claimed_tries(conn: &Db, scope: Scope<'_>) -> Result<Vec<(String, i64)>> {
    let (w, key) = scope.clause();
    conn.query_map(
        &format!(
            "SELECT id, tries FROM messages WHERE {w} AND read=0 AND dead_at IS NULL ORDER BY rowid"
        ),
        params![key],
        |r| Ok((r.get(0)?, r.get::<Option<i64>>(1)?.unwrap_or(0))),
    )
    .ctx("reading claims")
}

/// Claimed → delivered.
pub fn deliver(conn: &Db, scope: Scope<'_>, now: &str) -> Result<usize> {
    let (w, key) = scope.clause();
    conn.execute(
        &format!(
            "UPDATE messages SET read=1, delivered_at=?2 WHERE {w} AND read=0 AND dead_at IS NULL"
        ),
        params![key, now],
    )
    .ctx("delivering mail")
}

/// Claimed → pending, try count unchanged.
pub fn release(conn: &Db, scope: Scope<'_>) -> Result<usize> {
    let (w, key) = scope.clause();
    conn.execute(
        &format!("UPDATE messages SET claimed_by=NULL, claimed_at=NULL WHERE {w} AND read=0 AND dead_at IS NULL"),
        params![key],
    )
    .ctx("releasing claims")
}

/// Claimed → pending with a new try count and `process_after`, or dead.
pub fn set_retry(conn: &Db, id: &str, tries: i64, process_after: &str, error: &str) -> Result<()> {
    conn.execute(
        "UPDATE messages SET claimed_by=NULL, claimed_at=NULL, tries=?2, process_after=?3, last_error=?4 \
         WHERE id=?1",
        params![id, tries, process_after, error],
    )
    .ctx("scheduling a retry")?;
    Ok(())
}

pub fn set_dead(conn: &Db, id: &str, tries: i64, now: &str, error: &str) -> Result<()> {
    conn.execute(
        "UPDATE messages SET claimed_by=NULL, claimed_at=NULL, tries=?2, dead_at=?3, last_error=?4 WHERE id=?1",
        params![id, tries, now, error],
    )
    .ctx("marking mail dead")?;
    Ok(())
}

/// The rowid baseline for terminal-mail detection (SPEC §6.2).
pub fn max_rowid(conn: &Db) -> Result<i64> {
    conn.query_row(
        "SELECT COALESCE(MAX(rowid), 0) FROM messages",
        params![],
        |r| r.get(0),
    )
    .ctx("reading the mail baseline")
}

/// Terminal mail from `agent` above the baseline.
pub fn terminal_since(conn: &Db, agent: &str, baseline: i64, types: &[String]) -> Result<bool> {
    if types.is_empty() {
        return Ok(false);
    }
    let list: Vec<String> = types
        .iter()
        .map(|t| format!("'{}'", t.replace('\'', "''")))
        .collect();
    let n: i64 = conn
        .query_row(
            &format!(
                "SELECT COUNT(*) FROM messages WHERE rowid > ?1 AND from_agent = ?2 AND type IN ({})",
                list.join(",")
            ),
            params![baseline, agent],
            |r| r.get(0),
        )
        .ctx("checking terminal mail")?;
    Ok(n > 0)
}

/// Has `agent` ever sent terminal mail?
pub fn ever_sent_terminal(conn: &Db, agent: &str, types: &[String]) -> Result<bool> {
    terminal_since(conn, agent, 0, types)
}

/// The newest nudge to `agent` (for the debounce).
pub fn last_nudge_at(conn: &Db, agent: &str) -> Result<Option<String>> {
    conn.query_opt(
        "SELECT created_at FROM messages WHERE to_agent=?1 AND subject='nudge' \
         AND payload LIKE '%\"nudge\"%' ORDER BY rowid DESC LIMIT 1",
        params![agent],
        |r| r.get(0),
    )
    .ctx("reading the last nudge")
}
