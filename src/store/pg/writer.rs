//! The events writer on PostgreSQL (SPEC §6.1, §12.3): the batching of
//! SQLite's loop — a commit once 512 rows wait or the oldest has waited
//! 50 ms, a stdout line's rows in one commit, ids in line order; here a
//! commit also never holds more than 512 rows (a batch that would take it
//! past them waits for the next one) — with the server kept busy, because a flood of lines is limited by the server's
//! time per row (BENCHMARKS.md) and every round trip leaves it idle:
//!
//! - an encoder thread groups and encodes the next commit (COPY's binary
//!   format) while the server inserts this one's rows;
//! - a commit is three round trips, not six: `Bind`/`Execute` of a `COPY`
//!   prepared once per writer; the rows; and one simple query that copies
//!   the durations of calls whose `tool_start` an earlier commit wrote,
//!   `COMMIT`s and — when the next commit is already encoded — `BEGIN`s
//!   the next transaction with its fence check.
//!
//! Invariants: every transaction that writes is fenced exactly as
//! [`Db::transaction`] fences (SPEC §12.3): right after `BEGIN` comes the
//! lease check under `FOR KEY SHARE`, and a superseded token rolls it
//! back, fires the fence's `lost` and ends the writer with
//! [`DbError::Fenced`]. One commit is in flight at a time: a failed commit
//! ends the writer before any later row is sent, so `events` never holds
//! a line after a missing one (the sweep replays above the last stored
//! `line_no`). A transaction is begun ahead only when its rows are encoded,
//! so none waits open for lines. Memory: at most three commits' rows
//! encoded (being sent, queued, being encoded). Non-goal: more than one
//! commit in flight (a failure could then leave a gap).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};

use crate::store::db::{Db, DbError, Fence, PgConn};
use crate::store::events::{
    Batch, COPY_EVENTS, Pending, StartIds, ToolStartRef, TurnTag, check_levels, copy_data, ends_of,
};
use crate::store::{Ctx, Result, StoreError};

const CONTEXT: &str = "writing events";

/// Writes the batches `rx` brings until it closes; returns the rows written.
pub fn run(conn: &mut Db, tag: &TurnTag, rx: Receiver<Batch>) -> Result<u64> {
    let fence = conn.fence();
    let Db::Pg(pg) = conn else {
        unreachable!("the PostgreSQL writer runs on a PostgreSQL connection")
    };
    // One commit encoded ahead: the runner encodes the next commit's rows
    // while the server inserts this one's.
    let (tx, commits) = sync_channel::<Commit>(1);
    std::thread::scope(|s| {
        let encoder = std::thread::Builder::new()
            .name(format!("events-enc-{}", tag.agent_name))
            .spawn_scoped(s, move || encode(tag, rx, tx))
            .map_err(|e| StoreError::Io {
                path: "events encoder thread".into(),
                source: e,
            })?;
        let mut pg = pg.borrow_mut();
        let mut w = Sender {
            begin: begin_sql(fence.as_ref()),
            fence,
            copy: None,
            open: false,
        };
        let sent = w.run(&mut pg, commits);
        if w.open {
            // An error left a transaction open: nothing of it is kept.
            let _ = pg.client().batch_execute("ROLLBACK");
        }
        // The encoder ends once `commits` is dropped (on an error) or `rx`
        // closes.
        let encoded = encoder.join().unwrap_or_else(|_| {
            Err(StoreError::Io {
                path: "events encoder".into(),
                source: std::io::Error::other("the events encoder thread panicked"),
            })
        });
        let total = sent?;
        encoded.map(|()| total)
    })
}

/// `BEGIN`, the writer's settings and the fence check: one statement list.
/// The writer's commits need not wait for their own WAL flush: the turn's
/// end (a synchronous commit, later in the same WAL) flushes them too, and
/// a server crash before that loses only lines `stdout.ndjson` still holds,
/// which the sweep replays (line_no above the last stored). And a COPY is
/// never "idle in transaction": should this host freeze mid-COPY, the
/// statement timeout frees the lease row's lock the fleet sweep waits for.
fn begin_sql(fence: Option<&Fence>) -> String {
    let mut sql = format!(
        "BEGIN; SET LOCAL synchronous_commit = off; SET LOCAL statement_timeout = {}",
        super::writer_statement_timeout_ms()
    );
    if let Some(f) = fence {
        sql.push_str("; ");
        sql.push_str(&f.check_sql());
    }
    sql
}

/// One commit's rows, encoded: the COPY data, and the statement (or
/// nothing) that copies the durations of calls whose `tool_start` an
/// earlier commit wrote (the others got theirs as their start row was
/// encoded).
struct Commit {
    data: Vec<u8>,
    durations: String,
    rows: usize,
}

/// The encoder thread: groups whole batches into commits of at most 512
/// rows (a batch holds at most 512), each once 512 rows wait or 50 ms
/// after the oldest arrived, and encodes them.
/// Ends when `rx` closes, or when the sender is gone (it failed).
fn encode(tag: &TurnTag, rx: Receiver<Batch>, tx: SyncSender<Commit>) -> Result<()> {
    let mut starts = StartIds::default();
    let mut pending = Pending::default();
    // A batch that would take the waiting rows past 512: the next commit's.
    let mut held: Option<Batch> = None;
    let mut closed = false;
    loop {
        if held.is_none() && !pending.ready(closed) && !closed {
            // Rows wait in memory, not in an open transaction.
            match pending.recv(&rx) {
                Ok(b) if !pending.fits(&b) => held = Some(b),
                Ok(b) => pending.push(b),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
        }
        if held.is_some() || pending.ready(closed) {
            let p = std::mem::take(&mut pending);
            if let Some(b) = held.take() {
                pending.push(b);
            }
            check_levels(&p.batches)?;
            let mut ended = ends_of(&p.batches);
            let commit = Commit {
                data: copy_data(tag, &p.batches, &mut starts, &mut ended),
                durations: durations_sql(tag, &ended),
                rows: p.rows,
            };
            if tx.send(commit).is_err() {
                return Ok(());
            }
        }
        if closed && pending.batches.is_empty() {
            return Ok(());
        }
    }
}

/// The sending side, on the writer's connection.
struct Sender {
    begin: String,
    fence: Option<Fence>,
    /// The prepared `COPY`, once the first commit has prepared it.
    copy: Option<postgres::Statement>,
    /// A transaction is (or may be) open: begun, and maybe written to.
    open: bool,
}

impl Sender {
    fn run(&mut self, pg: &mut PgConn, commits: Receiver<Commit>) -> Result<u64> {
        let mut total = 0u64;
        let Ok(mut next) = commits.recv() else {
            return Ok(0);
        };
        loop {
            self.copy(pg, &next.data)?;
            total += next.rows as u64;
            let durations = std::mem::take(&mut next.durations);
            // If the next commit is already encoded, its BEGIN rides with
            // this COMMIT; else this one commits alone, at once.
            match commits.try_recv() {
                Ok(c) => {
                    self.commit(pg, &durations, true)?;
                    next = c;
                }
                Err(TryRecvError::Empty) => {
                    self.commit(pg, &durations, false)?;
                    match commits.recv() {
                        Ok(c) => next = c,
                        Err(_) => return Ok(total),
                    }
                }
                Err(TryRecvError::Disconnected) => {
                    self.commit(pg, &durations, false)?;
                    return Ok(total);
                }
            }
        }
    }

    /// Begins (unless a transaction is open) and copies `data`.
    fn copy(&mut self, pg: &mut PgConn, data: &[u8]) -> Result<()> {
        if !self.open {
            self.begin(pg, "")?;
        }
        let client = pg.client();
        let copy = match &self.copy {
            Some(s) => s.clone(),
            None => {
                let s = client
                    .prepare(COPY_EVENTS)
                    .map_err(DbError::Pg)
                    .ctx(CONTEXT)?;
                self.copy = Some(s.clone());
                s
            }
        };
        let mut w = client.copy_in(&copy).map_err(DbError::Pg).ctx(CONTEXT)?;
        std::io::Write::write_all(&mut w, data)
            .map_err(|e| DbError::Column(0, format!("COPY: {e}")))
            .ctx(CONTEXT)?;
        w.finish().map_err(DbError::Pg).ctx(CONTEXT)?;
        Ok(())
    }

    /// Runs `durations`, commits, and begins the next transaction in the
    /// same round trip when `next` says its rows are here.
    fn commit(&mut self, pg: &mut PgConn, durations: &str, next: bool) -> Result<()> {
        let sql = format!("{durations}COMMIT");
        if next {
            self.begin(pg, &sql)
        } else {
            let r = pg.client().batch_execute(&sql);
            self.open = false;
            r.map_err(DbError::Pg).ctx(CONTEXT)
        }
    }

    /// Runs `before` (statements ending the previous transaction, or
    /// nothing), then `BEGIN` and the fence check: one round trip. Fenced:
    /// [`DbError::Fenced`] (the caller rolls back) and the fence's `lost`
    /// fires.
    fn begin(&mut self, pg: &mut PgConn, before: &str) -> Result<()> {
        let sql = if before.is_empty() {
            self.begin.clone()
        } else {
            format!("{before}; {}", self.begin)
        };
        // Should the list fail midway, a transaction may be open.
        self.open = true;
        let msgs = pg
            .client()
            .simple_query(&sql)
            .map_err(DbError::Pg)
            .ctx(CONTEXT)?;
        match &self.fence {
            Some(f) => f.verdict(&msgs).ctx(CONTEXT),
            None => Ok(()),
        }
    }
}

/// The statement (with its `;`, or nothing) that copies each duration in
/// `ended` onto its `tool_start` row, found by line and rank on
/// `idx_events_turn`: one statement for every call however many. Literals,
/// to share the commit's round trip: numbers, and the turn id quoted.
fn durations_sql(tag: &TurnTag, ended: &HashMap<ToolStartRef, i64>) -> String {
    if ended.is_empty() {
        return String::new();
    }
    let (mut lines, mut nths, mut ms) = (String::new(), String::new(), String::new());
    for (i, (at, d)) in ended.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(lines, "{sep}{}", at.line_no);
        let _ = write!(nths, "{sep}{}", at.nth);
        let _ = write!(ms, "{sep}{d}");
    }
    format!(
        "UPDATE events e SET tool_duration_ms = v.ms \
         FROM unnest('{{{lines}}}'::bigint[], '{{{nths}}}'::bigint[], '{{{ms}}}'::bigint[]) AS v(line_no, nth, ms) \
         WHERE e.id = (SELECT s.id FROM events s WHERE s.turn_id = '{}' AND s.line_no = v.line_no \
                       AND s.event_type = 'tool_start' ORDER BY s.id OFFSET v.nth LIMIT 1); ",
        tag.turn_id.replace('\'', "''")
    )
}
