//! `events.db`: the event writer and event queries.
//!
//! The writer is one thread owning one connection. It receives batches of
//! rows over a bounded channel and commits once 512 rows are waiting or the
//! oldest has waited 50 ms, so a row is committed within 100 ms of arrival
//! and a flood is written in transactions of about 512 rows. A full channel
//! slows the sender; nothing is dropped. Each stdout line's rows arrive in
//! one batch, so a line is either wholly in `events` or not at all — the
//! sweep relies on `line_no` to replay exactly the missing lines.

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::db::{Db, ToValue, params};
use super::{Backend, Ctx, Result, StoreError, immediate, open_conn, schema};

/// One row for `events`, without the columns common to a turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventRow {
    pub event_type: &'static str,
    pub level: &'static str,
    pub tool_name: Option<String>,
    pub tool_args: Option<String>,
    pub tool_duration_ms: Option<i64>,
    pub data: String,
    pub line_no: Option<i64>,
}

/// What every row of one turn shares.
#[derive(Debug, Clone)]
pub struct TurnTag {
    pub run_id: Option<String>,
    pub agent_name: String,
    pub turn_id: String,
}

/// A batch: rows with their timestamp and the session id known then.
#[derive(Debug)]
pub struct Batch {
    pub created_at: String,
    pub session_id: Option<String>,
    pub rows: Vec<EventRow>,
}

pub fn open(root: &Path) -> Result<Db> {
    open_backend(root, &Backend::Sqlite)
}

/// `events.db` under `root`, or the PostgreSQL schema `backend` names.
pub fn open_backend(root: &Path, backend: &Backend) -> Result<Db> {
    if let Some(db) = backend.connect_pg()? {
        return Ok(db);
    }
    let path = root.join("events.db");
    let mut conn = open_conn(&path)?;
    schema::migrate_events(&mut conn, &path)?;
    Ok(Db::Sqlite(conn))
}

/// Writes rows directly (small writes: turn_start, turn_end, replays).
pub fn insert_rows(conn: &mut Db, tag: &TurnTag, batch: &Batch) -> Result<usize> {
    immediate(conn, "writing events", |tx| write_batch(tx, tag, batch))
}

/// Rows per multi-row INSERT: one statement execution (and one
/// AUTOINCREMENT bookkeeping step) per chunk instead of per row.
const CHUNK: usize = 64;
/// Values bound per row.
const PER_ROW: usize = 9;
static FULL_CHUNK_SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `INSERT … VALUES (…), (…)` for `n` rows. ?1–?3 are shared (run_id,
/// agent_name, turn_id); each row has nine of its own.
fn insert_sql(n: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO events (run_id, agent_name, turn_id, session_id, created_at, event_type, tool_name, \
         tool_args, tool_duration_ms, level, data, line_no) VALUES ",
    );
    for r in 0..n {
        let b = 4 + r * PER_ROW;
        if r > 0 {
            sql.push(',');
        }
        sql.push_str("(?1,?2,?3");
        for k in 0..PER_ROW {
            sql.push_str(&format!(",?{}", b + k));
        }
        sql.push(')');
    }
    sql
}

fn write_batch(conn: &Db, tag: &TurnTag, b: &Batch) -> Result<usize> {
    write_batches(conn, tag, std::slice::from_ref(b))
}

/// Writes every row of `batches`, in order, 64 rows per statement.
fn write_batches(db: &Db, tag: &TurnTag, batches: &[Batch]) -> Result<usize> {
    let Some(conn) = db.sqlite() else {
        return write_batches_pg(db, tag, batches);
    };
    let all = rows_of(batches);
    for chunk in all.chunks(CHUNK) {
        let sql = chunk_sql(chunk.len());
        let mut st = conn.prepare_cached(&sql).ctx("writing events")?;
        let bind = |st: &mut rusqlite::CachedStatement<'_>| -> rusqlite::Result<()> {
            st.raw_bind_parameter(1, &tag.run_id)?;
            st.raw_bind_parameter(2, &tag.agent_name)?;
            st.raw_bind_parameter(3, &tag.turn_id)?;
            for (k, (b, r)) in chunk.iter().enumerate() {
                let at = 4 + k * PER_ROW;
                st.raw_bind_parameter(at, &b.session_id)?;
                st.raw_bind_parameter(at + 1, &b.created_at)?;
                st.raw_bind_parameter(at + 2, r.event_type)?;
                st.raw_bind_parameter(at + 3, &r.tool_name)?;
                st.raw_bind_parameter(at + 4, &r.tool_args)?;
                st.raw_bind_parameter(at + 5, r.tool_duration_ms)?;
                st.raw_bind_parameter(at + 6, r.level)?;
                st.raw_bind_parameter(at + 7, &r.data)?;
                st.raw_bind_parameter(at + 8, r.line_no)?;
            }
            st.raw_execute().map(|_| ())
        };
        bind(&mut st).ctx("writing events")?;
    }
    Ok(all.len())
}

/// Every row of `batches` with its batch, in order.
fn rows_of(batches: &[Batch]) -> Vec<(&Batch, &EventRow)> {
    batches
        .iter()
        .flat_map(|b| b.rows.iter().map(move |r| (b, r)))
        .collect()
}

/// The INSERT for a chunk of `n` rows (the full chunk's is built once).
fn chunk_sql(n: usize) -> std::borrow::Cow<'static, str> {
    if n == CHUNK {
        std::borrow::Cow::Borrowed(FULL_CHUNK_SQL.get_or_init(|| insert_sql(CHUNK)).as_str())
    } else {
        std::borrow::Cow::Owned(insert_sql(n))
    }
}

/// PostgreSQL: the same multi-row INSERT, through the store seam.
fn write_batches_pg(db: &Db, tag: &TurnTag, batches: &[Batch]) -> Result<usize> {
    let all = rows_of(batches);
    for chunk in all.chunks(CHUNK) {
        let sql = chunk_sql(chunk.len());
        let mut values: Vec<&dyn ToValue> = vec![&tag.run_id, &tag.agent_name, &tag.turn_id];
        for (b, r) in chunk {
            values.extend_from_slice(params![
                b.session_id,
                b.created_at,
                r.event_type,
                r.tool_name,
                r.tool_args,
                r.tool_duration_ms,
                r.level,
                r.data,
                r.line_no
            ]);
        }
        db.execute(&sql, &values).ctx("writing events")?;
    }
    Ok(all.len())
}

/// Handle to the writer thread.
pub struct Writer {
    tx: Option<SyncSender<Batch>>,
    handle: Option<std::thread::JoinHandle<(Result<u64>, Db)>>,
}

/// Rows committed in one transaction at most (SPEC §6.1: every 512 events).
pub const MAX_ROWS_PER_COMMIT: usize = 512;
/// Rows are committed at most this long after they arrive (SPEC §6.1: 100 ms).
pub const COMMIT_EVERY: Duration = Duration::from_millis(50);

impl Writer {
    /// Starts the writer thread on `conn` (the turn's own connection to
    /// `events.db`, handed back by [`Writer::finish`]).
    pub fn start(conn: Db, tag: TurnTag) -> Result<Writer> {
        // A batch holds at most 512 rows or 64 KiB of lines: 16 of them bound
        // the backlog between a fast agent and the writer to a few MiB.
        let (tx, rx) = sync_channel::<Batch>(16);
        let handle = std::thread::Builder::new()
            .name(format!("events-{}", tag.agent_name))
            .spawn(move || {
                let mut conn = conn;
                let r = run_writer(&mut conn, tag, rx);
                (r, conn)
            })
            .map_err(|e| StoreError::Io {
                path: "events writer thread".into(),
                source: e,
            })?;
        Ok(Writer {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Queues a batch; blocks (the sender, never dropping) when the queue is full.
    pub fn send(&self, batch: Batch) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(batch) {
            Ok(()) => true,
            Err(TrySendError::Full(b)) => tokio::task::block_in_place(|| tx.send(b).is_ok()),
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// A sender usable from another task.
    pub fn sender(&self) -> Option<SyncSender<Batch>> {
        self.tx.clone()
    }

    /// Closes the queue, waits for the last commit; returns the rows written
    /// and the connection (none if the thread panicked).
    pub fn finish(mut self) -> (Result<u64>, Option<Db>) {
        self.tx.take();
        match self.handle.take().map(|h| h.join()) {
            Some(Ok((r, conn))) => (r, Some(conn)),
            Some(Err(_)) => (
                Err(StoreError::Io {
                    path: "events writer".into(),
                    source: std::io::Error::other("the events writer thread panicked"),
                }),
                None,
            ),
            None => (Ok(0), None),
        }
    }
}

fn run_writer(conn: &mut Db, tag: TurnTag, rx: Receiver<Batch>) -> Result<u64> {
    let mut total = 0u64;
    let mut pending: Vec<Batch> = Vec::new();
    let mut rows = 0usize;
    let mut due = Instant::now();
    // Rows wait in memory, not in an open transaction: the write lock is held
    // only while a full batch (512 rows) or an old one (COMMIT_EVERY) is written.
    loop {
        let msg = if pending.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(due.saturating_duration_since(Instant::now()))
        };
        let closed = match msg {
            Ok(b) => {
                if pending.is_empty() {
                    due = Instant::now() + COMMIT_EVERY;
                }
                rows += b.rows.len();
                pending.push(b);
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if !pending.is_empty() && (closed || rows >= MAX_ROWS_PER_COMMIT || Instant::now() >= due) {
            immediate(conn, "writing events", |tx| {
                write_batches(tx, &tag, &pending)
            })?;
            pending.clear();
            total += rows as u64;
            rows = 0;
        }
        if closed {
            return Ok(total);
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StoredEvent {
    pub id: i64,
    pub run_id: Option<String>,
    pub agent_name: String,
    pub session_id: Option<String>,
    pub event_type: String,
    pub tool_name: Option<String>,
    pub tool_args: Option<String>,
    pub tool_duration_ms: Option<i64>,
    pub level: String,
    pub data: Option<String>,
    pub created_at: String,
    pub turn_id: Option<String>,
    pub line_no: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub agent: Option<String>,
    pub turn: Option<String>,
    pub event_type: Option<String>,
    pub after_id: i64,
    pub limit: i64,
}

/// Events oldest first (the newest `limit` when no `after_id` is given).
pub fn list(conn: &Db, f: &EventFilter) -> Result<Vec<StoredEvent>> {
    let sql = "SELECT * FROM (SELECT id, run_id, agent_name, session_id, event_type, tool_name, tool_args, \
        tool_duration_ms, level, data, created_at, turn_id, line_no FROM events \
        WHERE (CAST(?1 AS TEXT) IS NULL OR agent_name=?1) AND (CAST(?2 AS TEXT) IS NULL OR turn_id=?2) AND (CAST(?3 AS TEXT) IS NULL OR event_type=?3) \
        AND id > ?4 ORDER BY id DESC LIMIT ?5) AS newest ORDER BY id";
    let sql_follow = "SELECT id, run_id, agent_name, session_id, event_type, tool_name, tool_args, \
        tool_duration_ms, level, data, created_at, turn_id, line_no FROM events \
        WHERE (CAST(?1 AS TEXT) IS NULL OR agent_name=?1) AND (CAST(?2 AS TEXT) IS NULL OR turn_id=?2) AND (CAST(?3 AS TEXT) IS NULL OR event_type=?3) \
        AND id > ?4 ORDER BY id LIMIT ?5";
    conn.query_map(
        if f.after_id > 0 { sql_follow } else { sql },
        params![f.agent, f.turn, f.event_type, f.after_id, f.limit],
        |r| {
            Ok(StoredEvent {
                id: r.get(0)?,
                run_id: r.get(1)?,
                agent_name: r.get(2)?,
                session_id: r.get(3)?,
                event_type: r.get(4)?,
                tool_name: r.get(5)?,
                tool_args: r.get(6)?,
                tool_duration_ms: r.get(7)?,
                level: r.get(8)?,
                data: r.get(9)?,
                created_at: r.get(10)?,
                turn_id: r.get(11)?,
                line_no: r.get(12)?,
            })
        },
    )
    .ctx("reading events")
}

/// The highest stdout line number of a turn already in `events` (0 if none).
pub fn max_line_no(conn: &Db, turn_id: &str) -> Result<i64> {
    conn.query_row(
        "SELECT COALESCE(MAX(line_no), 0) FROM events WHERE turn_id=?1",
        params![turn_id],
        |r| r.get(0),
    )
    .ctx("reading events")
}

/// Rows of a turn in `events`.
pub fn count_for_turn(conn: &Db, turn_id: &str) -> Result<i64> {
    conn.query_row(
        "SELECT COUNT(*) FROM events WHERE turn_id=?1",
        params![turn_id],
        |r| r.get(0),
    )
    .ctx("counting events")
}
