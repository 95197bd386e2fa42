//! `events.db`: the event writer and event queries.
//!
//! The writer is one thread owning one connection. It receives batches of
//! rows over a bounded channel and commits once 512 rows are waiting or the
//! oldest has waited 50 ms, so a row is committed within 100 ms of arrival
//! and a flood is written in transactions of about 512 rows. A full channel
//! slows the sender; nothing is dropped. Each stdout line's rows arrive in
//! one batch, so a line is either wholly in `events` or not at all — the
//! sweep relies on `line_no` to replay exactly the missing lines. A
//! `tool_end` row's duration is also written onto its call's `tool_start`
//! row: as that row is inserted when both are in one commit, else by the
//! id noted at its insert (or looked up by `line_no`). SQLite rows go in
//! 64-row INSERTs on cached statements, PostgreSQL rows in one binary COPY
//! per commit. On PostgreSQL the loop is `pg::writer`'s (same batching;
//! it pipelines the encoding and folds round trips).

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use serde::Serialize;

mod checkpoint;

use super::db::{Db, DbResult, Row, params};
use super::{Backend, Ctx, Result, StoreError, immediate, open_conn, schema};
use checkpoint::Checkpointer;

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
    /// On a `tool_end` row: its call's `tool_start` row, which gets the same
    /// `tool_duration_ms` (overstory's views read it there).
    pub tool_start: Option<ToolStartRef>,
}

/// Where a `tool_start` row is: its stdout line, and its place among that
/// line's `tool_start` rows (a line can start several calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ToolStartRef {
    pub line_no: i64,
    pub nth: u32,
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
    create_events_db(&path)?;
    let mut conn = open_conn(&path)?;
    schema::migrate_events(&mut conn, &path)?;
    // overstory's `CHECK(level IN (...))` is compiled into a temporary
    // B-tree that SQLite rebuilds for every inserted row: four B-tree
    // inserts and a clear per event, a quarter of the writer's work
    // (BENCHMARKS.md). This connection only writes rows whose level
    // `write_batches` has checked against the same list, so SQLite need not.
    conn.pragma_update(None, "ignore_check_constraints", true)
        .ctx("configuring events.db")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(Db::Sqlite(conn))
}

/// Page size of a new `events.db`. Its rows are stdout lines (~600 bytes
/// in a busy turn): with SQLite's default 4 KiB pages a 144k-line turn
/// wrote its WAL in ~70k `pwrite`s and its checkpoints read it back in
/// ~20k `pread`s; with 16 KiB pages a quarter of the calls, and fewer
/// B-tree splits (−570 instructions a row, callgrind). 32 KiB saved no more
/// instructions, 64 KiB cost more. Peak RSS is the same as with 4 KiB pages
/// (the page cache is bounded in bytes, not pages; BENCHMARKS.md).
pub const EVENTS_PAGE_SIZE: u32 = 16 * 1024;

/// Creates `events.db` with [`EVENTS_PAGE_SIZE`] pages when the file is new
/// (the page size is fixed once the header is written, which switching to
/// WAL does). An existing file keeps its pages; a concurrent creator that
/// wrote the header first wins, and this one's `page_size` is a no-op.
fn create_events_db(path: &Path) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    super::create_private_file(path)?;
    let conn = rusqlite::Connection::open(path).ctx("creating events.db")?;
    conn.busy_timeout(super::BUSY_TIMEOUT)
        .ctx("creating events.db")?;
    conn.pragma_update(None, "page_size", EVENTS_PAGE_SIZE)
        .ctx("creating events.db")?;
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .ctx("creating events.db")?;
    Ok(())
}

/// The levels `events.level` allows (overstory's CHECK).
pub const LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];

/// Writes rows directly (small writes: turn_start, turn_end, replays).
pub fn insert_rows(conn: &mut Db, tag: &TurnTag, batch: &Batch) -> Result<usize> {
    immediate(conn, "writing events", |tx| {
        write_batches(
            tx,
            tag,
            std::slice::from_ref(batch),
            &mut StartIds::default(),
        )
    })
}

/// Rows per multi-row INSERT: one statement execution (and one
/// AUTOINCREMENT bookkeeping step) per chunk instead of per row.
const CHUNK: usize = 64;
/// Values shared by every row of a chunk: the turn's (run_id, agent_name,
/// turn_id) and the batch's (session_id, created_at).
const SHARED: usize = 5;
/// Values bound per row.
const PER_ROW: usize = 7;

/// `INSERT … VALUES (…), (…)` for `n` rows of one batch: ?1–?5 shared,
/// seven of each row's own after them. Binding the shared ones once per
/// chunk instead of per row saves two text copies per row. `verb` is
/// `INSERT` or (SQLite) `INSERT OR FAIL`.
fn insert_sql(verb: &str, n: usize) -> String {
    let mut sql = format!(
        "{verb} INTO events (run_id, agent_name, turn_id, session_id, created_at, event_type, tool_name, \
         tool_args, tool_duration_ms, level, data, line_no) VALUES "
    );
    for r in 0..n {
        let b = SHARED + 1 + r * PER_ROW;
        if r > 0 {
            sql.push(',');
        }
        sql.push_str("(?1,?2,?3,?4,?5");
        for k in 0..PER_ROW {
            sql.push_str(&format!(",?{}", b + k));
        }
        sql.push(')');
    }
    sql
}

/// SQLite's statement for `n` rows: `INSERT OR FAIL`. A multi-row `INSERT`
/// (ABORT) must be able to undo its own earlier rows, so SQLite keeps a
/// statement journal of every page it touches; FAIL keeps them instead.
/// The same in effect here: no row of `events` can conflict (the id is
/// SQLite's, no index is UNIQUE, the CHECK is off and every NOT NULL
/// column is bound a value), and a failed statement fails the writer's
/// transaction, which rolls back every row of it anyway.
fn chunk_sql_sqlite(n: usize) -> &'static str {
    static SQL: [std::sync::OnceLock<String>; CHUNK + 1] =
        [const { std::sync::OnceLock::new() }; CHUNK + 1];
    SQL[n].get_or_init(|| insert_sql("INSERT OR FAIL", n))
}

/// Statements kept prepared on an events connection: the 64 chunk sizes
/// and a few more, so a tail chunk is never prepared twice in a turn.
pub const STATEMENT_CACHE: usize = CHUNK + 16;

/// The ids of a turn's `tool_start` rows not yet matched by their
/// `tool_end`, so the duration goes to the start row by id. Bounded: past
/// [`MAX_START_IDS`] it starts over, and a miss is looked up in `events`.
#[derive(Default)]
pub(crate) struct StartIds {
    ids: std::collections::HashMap<ToolStartRef, i64>,
    /// The last `tool_start` noted (a line's rows may straddle two chunks).
    prev: Option<ToolStartRef>,
}

const MAX_START_IDS: usize = 4096;

impl StartIds {
    /// The reference of `r` if it is a `tool_start` row: its line and its
    /// rank among that line's starts (rows arrive in order, a line's rows
    /// possibly across batches and commits).
    pub(crate) fn next_ref(&mut self, r: &EventRow) -> Option<ToolStartRef> {
        if r.event_type != "tool_start" {
            return None;
        }
        let line_no = r.line_no?;
        let nth = match self.prev {
            Some(p) if p.line_no == line_no => p.nth + 1,
            _ => 0,
        };
        let at = ToolStartRef { line_no, nth };
        self.prev = Some(at);
        Some(at)
    }

    /// Notes where a `tool_start` row went, for its `tool_end` in a later commit.
    fn remember(&mut self, at: ToolStartRef, id: i64) {
        if self.ids.len() >= MAX_START_IDS {
            self.ids.clear();
        }
        self.ids.insert(at, id);
    }
}

/// The calls that end within `batches`: their start and duration. Each is
/// written onto its `tool_start` row as that row is inserted (when it is in
/// the same commit) instead of by an UPDATE after.
pub(crate) fn ends_of(batches: &[Batch]) -> std::collections::HashMap<ToolStartRef, i64> {
    batches
        .iter()
        .flat_map(|b| b.rows.iter())
        .filter_map(|r| Some((r.tool_start?, r.tool_duration_ms?)))
        .collect()
}

/// Writes every row of `batches`, in order, 64 rows per statement; then
/// copies each finished call's duration onto its `tool_start` row.
fn write_batches(
    db: &Db,
    tag: &TurnTag,
    batches: &[Batch],
    starts: &mut StartIds,
) -> Result<usize> {
    let all = || batches.iter().flat_map(|b| b.rows.iter());
    check_levels(batches)?;
    let mut ended = ends_of(batches);
    let Some(conn) = db.sqlite() else {
        insert_pg(db, tag, batches, starts, &mut ended)?;
        return durations_pg(db, tag, &ended).map(|()| all().count());
    };
    insert_sqlite(conn, tag, batches, starts, &mut ended)?;
    // The calls whose start an earlier commit wrote.
    for (at, ms) in ended {
        let id = match starts.ids.remove(&at) {
            Some(id) => Some(id),
            None => start_id(db, tag, at)?,
        };
        if let Some(id) = id {
            db.execute(
                "UPDATE events SET tool_duration_ms=?1 WHERE id=?2",
                params![ms, id],
            )
            .ctx("writing a tool duration")?;
        }
    }
    Ok(all().count())
}

/// Refuses a row whose level is not one of [`LEVELS`] (the CHECK, which
/// SQLite's writer does not run).
pub(crate) fn check_levels(batches: &[Batch]) -> Result<()> {
    let all = batches.iter().flat_map(|b| b.rows.iter());
    if let Some(bad) = all.clone().find(|r| !LEVELS.contains(&r.level)) {
        let why = format!("event level {:?} is not one of {LEVELS:?}", bad.level);
        return Err(StoreError::Sqlite {
            context: "writing events".into(),
            source: rusqlite::Error::ToSqlConversionFailure(why.into()),
        });
    }
    Ok(())
}

/// SQLite: raw binds on cached statements. A `tool_start` row whose call
/// ended in these batches takes its duration from `ended` (and leaves it);
/// the others' ids are noted for their `tool_end` in a later commit.
fn insert_sqlite(
    conn: &rusqlite::Connection,
    tag: &TurnTag,
    batches: &[Batch],
    starts: &mut StartIds,
    ended: &mut std::collections::HashMap<ToolStartRef, i64>,
) -> Result<()> {
    // Per row of a chunk: its start reference, and the duration when known.
    let mut refs: Vec<(Option<ToolStartRef>, Option<i64>)> = Vec::with_capacity(CHUNK);
    for b in batches {
        for chunk in b.rows.chunks(CHUNK) {
            refs.clear();
            refs.extend(chunk.iter().map(|r| {
                let at = starts.next_ref(r);
                (at, at.and_then(|at| ended.remove(&at)))
            }));
            let mut st = conn
                .prepare_cached(chunk_sql_sqlite(chunk.len()))
                .ctx("writing events")?;
            let bind = |st: &mut rusqlite::CachedStatement<'_>| -> rusqlite::Result<()> {
                st.raw_bind_parameter(1, &tag.run_id)?;
                st.raw_bind_parameter(2, &tag.agent_name)?;
                st.raw_bind_parameter(3, &tag.turn_id)?;
                st.raw_bind_parameter(4, &b.session_id)?;
                st.raw_bind_parameter(5, &b.created_at)?;
                for (k, (r, (_, known))) in chunk.iter().zip(&refs).enumerate() {
                    let at = SHARED + 1 + k * PER_ROW;
                    st.raw_bind_parameter(at, r.event_type)?;
                    st.raw_bind_parameter(at + 1, &r.tool_name)?;
                    st.raw_bind_parameter(at + 2, &r.tool_args)?;
                    st.raw_bind_parameter(at + 3, r.tool_duration_ms.or(*known))?;
                    st.raw_bind_parameter(at + 4, r.level)?;
                    st.raw_bind_parameter(at + 5, &r.data)?;
                    st.raw_bind_parameter(at + 6, r.line_no)?;
                }
                st.raw_execute().map(|_| ())
            };
            bind(&mut st).ctx("writing events")?;
            // A multi-row INSERT numbers its rows consecutively (one writer,
            // in a transaction): the chunk's ids end at the last insert rowid.
            let first_id = conn.last_insert_rowid() - chunk.len() as i64 + 1;
            for (k, (at, known)) in refs.iter().enumerate() {
                if let (Some(at), None) = (at, known) {
                    starts.remember(*at, first_id + k as i64);
                }
            }
        }
    }
    Ok(())
}

/// PostgreSQL: one COPY per commit, sent whole (the transaction stays
/// short), in COPY's binary format: the server parses no statement, binds
/// no parameter, and neither splits lines nor undoes escapes per row (the
/// text format scans every byte of `data` twice more on the server). A
/// call that starts and ends within these batches gets its duration on its
/// `tool_start` row as it is copied (and leaves `ended`), instead of by an
/// UPDATE after.
fn insert_pg(
    db: &Db,
    tag: &TurnTag,
    batches: &[Batch],
    starts: &mut StartIds,
    ended: &mut std::collections::HashMap<ToolStartRef, i64>,
) -> Result<()> {
    db.copy_in(COPY_EVENTS, &copy_data(tag, batches, starts, ended))
        .ctx("writing events")?;
    Ok(())
}

/// The rows of `batches` in COPY's binary format. A `tool_start` row whose
/// call ended in these batches takes its duration from `ended` (and leaves it).
pub(crate) fn copy_data(
    tag: &TurnTag,
    batches: &[Batch],
    starts: &mut StartIds,
    ended: &mut std::collections::HashMap<ToolStartRef, i64>,
) -> Vec<u8> {
    let bytes: usize = batches
        .iter()
        .flat_map(|b| b.rows.iter())
        .map(|r| r.data.len() + 256)
        .sum();
    let mut out = CopyBinary::with_capacity(bytes);
    for b in batches {
        for r in &b.rows {
            let known = starts.next_ref(r).and_then(|at| ended.remove(&at));
            out.row(tag, b, r, known);
        }
    }
    out.finish()
}

pub(crate) const COPY_EVENTS: &str = "COPY events (run_id, agent_name, turn_id, session_id, created_at, \
    event_type, tool_name, tool_args, tool_duration_ms, level, data, line_no) FROM STDIN (FORMAT binary)";

/// Rows of `events` in COPY's binary format (PostgreSQL's `COPY` docs:
/// a signature and two 32-bit words, then per row a 16-bit field count and
/// per field a 32-bit length, -1 for NULL, and the value as its type's
/// binary form: `text` its UTF-8 bytes, `bigint` 8 bytes big-endian; a
/// 16-bit -1 ends the data).
struct CopyBinary {
    buf: Vec<u8>,
}

/// Columns of [`COPY_EVENTS`].
const COPY_FIELDS: i16 = 12;

impl CopyBinary {
    fn with_capacity(n: usize) -> CopyBinary {
        let mut buf = Vec::with_capacity(n + 32);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        CopyBinary { buf }
    }

    fn text(&mut self, v: Option<&str>) {
        let Some(v) = v else {
            self.buf.extend_from_slice(&(-1i32).to_be_bytes());
            return;
        };
        // `text` cannot hold NUL: as in the text format (and `store
        // migrate`), it becomes U+FFFD.
        if memchr::memchr(0, v.as_bytes()).is_some() {
            let v = v.replace('\0', "\u{FFFD}");
            return self.text(Some(&v));
        }
        self.buf.extend_from_slice(&(v.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(v.as_bytes());
    }

    fn int(&mut self, v: Option<i64>) {
        match v {
            Some(n) => {
                self.buf.extend_from_slice(&8i32.to_be_bytes());
                self.buf.extend_from_slice(&n.to_be_bytes());
            }
            None => self.buf.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }

    /// One row; `known_ms`: the duration of a call that ended in the same COPY.
    fn row(&mut self, tag: &TurnTag, b: &Batch, r: &EventRow, known_ms: Option<i64>) {
        self.buf.extend_from_slice(&COPY_FIELDS.to_be_bytes());
        self.text(tag.run_id.as_deref());
        self.text(Some(&tag.agent_name));
        self.text(Some(&tag.turn_id));
        self.text(b.session_id.as_deref());
        self.text(Some(&b.created_at));
        self.text(Some(r.event_type));
        self.text(r.tool_name.as_deref());
        self.text(r.tool_args.as_deref());
        self.int(r.tool_duration_ms.or(known_ms));
        self.text(Some(r.level));
        self.text(Some(&r.data));
        self.int(r.line_no);
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// PostgreSQL: copies the durations of the calls that ended in `batches`
/// onto their `tool_start` rows in one statement (a line's first call; a
/// second call of the same line, rare, one statement each) — not two round
/// trips per call.
fn durations_pg(
    db: &Db,
    tag: &TurnTag,
    ended: &std::collections::HashMap<ToolStartRef, i64>,
) -> Result<()> {
    let (mut lines, mut durations) = (String::new(), String::new());
    for (&at, &ms) in ended {
        if at.nth > 0 {
            if let Some(id) = start_id(db, tag, at)? {
                db.execute(
                    "UPDATE events SET tool_duration_ms=?1 WHERE id=?2",
                    params![ms, id],
                )
                .ctx("writing a tool duration")?;
            }
            continue;
        }
        if !lines.is_empty() {
            lines.push(',');
            durations.push(',');
        }
        lines.push_str(&at.line_no.to_string());
        durations.push_str(&ms.to_string());
    }
    if lines.is_empty() {
        return Ok(());
    }
    db.execute(
        "UPDATE events e SET tool_duration_ms = v.ms \
         FROM (SELECT unnest(string_to_array(?2, ','))::bigint AS line_no, \
                      unnest(string_to_array(?3, ','))::bigint AS ms) AS v \
         WHERE e.id = (SELECT MIN(s.id) FROM events s WHERE s.turn_id = ?1 \
                       AND s.line_no = v.line_no AND s.event_type = 'tool_start')",
        params![tag.turn_id, lines, durations],
    )
    .ctx("writing tool durations")?;
    Ok(())
}

/// The id of a `tool_start` row, looked up (one seek on `idx_events_turn`).
fn start_id(db: &Db, tag: &TurnTag, at: ToolStartRef) -> Result<Option<i64>> {
    let ids = db
        .query_map(
            "SELECT id FROM events WHERE turn_id=?1 AND line_no=?2 AND event_type='tool_start' ORDER BY id",
            params![tag.turn_id, at.line_no],
            |r| r.get::<i64>(0),
        )
        .ctx("reading events")?;
    Ok(ids.get(at.nth as usize).copied())
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
                // (PostgreSQL: its loop sets the writer's own transaction
                // settings, `pg::writer::begin_sql`.)
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

/// Rows a SQLite writer commits before it hands checkpoints to a
/// [`Checkpointer`] thread: a flood, not an ordinary turn.
const FLOOD_ROWS: u64 = 4 * MAX_ROWS_PER_COMMIT as u64;
/// A row's bytes in `events.db` besides its `data`: the turn's ids, the
/// time, the type, the index entry (an estimate, for [`Checkpointer`]).
const ROW_BYTES: u64 = 160;

fn run_writer(conn: &mut Db, tag: TurnTag, rx: Receiver<Batch>) -> Result<u64> {
    if conn.is_pg() {
        return super::pg::writer::run(conn, &tag, rx);
    }
    let mut checkpointer: Option<Checkpointer> = None;
    let r = write_all(conn, tag, rx, &mut checkpointer);
    if let (Some(c), Some(sqlite)) = (checkpointer, conn.sqlite()) {
        c.finish(sqlite);
    }
    r
}

/// The SQLite writer's loop: rows wait in memory, not in an open
/// transaction; the write lock is held only while a commit of at most
/// [`MAX_ROWS_PER_COMMIT`] rows, or of rows older than [`COMMIT_EVERY`], is
/// written. A batch that would take a commit past 512 rows waits for the
/// next one (a batch is one line's rows or more, never split).
fn write_all(
    conn: &mut Db,
    tag: TurnTag,
    rx: Receiver<Batch>,
    checkpointer: &mut Option<Checkpointer>,
) -> Result<u64> {
    let mut total = 0u64;
    let mut starts = StartIds::default();
    let mut pending = Pending::default();
    let mut commit = |pending: &mut Pending| -> Result<()> {
        let p = std::mem::take(pending);
        immediate(conn, "writing events", |tx| {
            write_batches(tx, &tag, &p.batches, &mut starts)
        })?;
        let bytes = p
            .batches
            .iter()
            .flat_map(|b| b.rows.iter())
            .map(|r| r.data.len() as u64 + ROW_BYTES)
            .sum();
        total += p.rows as u64;
        match checkpointer {
            Some(c) => c.committed(bytes),
            None if total >= FLOOD_ROWS => {
                // Without a checkpointer SQLite's auto-checkpoint stays on.
                *checkpointer = conn.sqlite().and_then(|c| Checkpointer::start(c).ok());
            }
            None => {}
        }
        Ok(())
    };
    loop {
        let closed = match pending.recv(&rx) {
            Ok(b) => {
                if !pending.fits(&b) {
                    commit(&mut pending)?;
                }
                pending.push(b);
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if pending.ready(closed) {
            commit(&mut pending)?;
        }
        if closed {
            return Ok(total);
        }
    }
}

/// Rows waiting for their commit, and when the oldest must be committed:
/// the batching rule both writers keep (SQLite's [`write_all`], PostgreSQL's
/// `pg::writer`). Rows wait in memory, not in an open transaction.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) batches: Vec<Batch>,
    pub(crate) rows: usize,
    pub(crate) due: Option<Instant>,
}

impl Pending {
    /// The next batch: waits for ever while nothing is pending, else until
    /// the pending rows are due.
    pub(crate) fn recv(
        &self,
        rx: &Receiver<Batch>,
    ) -> std::result::Result<Batch, RecvTimeoutError> {
        match self.due {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        }
    }

    /// Whether `b` may join these rows' commit: one commit holds at most
    /// [`MAX_ROWS_PER_COMMIT`] rows, and a batch (one line's rows or more)
    /// is never split, so one that would go past waits for the next commit.
    pub(crate) fn fits(&self, b: &Batch) -> bool {
        self.batches.is_empty() || self.rows + b.rows.len() <= MAX_ROWS_PER_COMMIT
    }

    pub(crate) fn push(&mut self, b: Batch) {
        if self.batches.is_empty() {
            self.due = Some(Instant::now() + COMMIT_EVERY);
        }
        self.rows += b.rows.len();
        self.batches.push(b);
    }

    /// Commit now: 512 rows wait, the oldest is due, or the queue closed.
    pub(crate) fn ready(&self, closed: bool) -> bool {
        !self.batches.is_empty()
            && (closed
                || self.rows >= MAX_ROWS_PER_COMMIT
                || self.due.is_some_and(|d| Instant::now() >= d))
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
        from_row,
    )
    .ctx("reading events")
}

/// The columns [`from_row`] reads, in its order.
pub(super) const COLS: &str = "id, run_id, agent_name, session_id, event_type, tool_name, \
    tool_args, tool_duration_ms, level, data, created_at, turn_id, line_no";

pub(super) fn from_row(r: &Row<'_>) -> DbResult<StoredEvent> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tag() -> TurnTag {
        TurnTag {
            run_id: None,
            agent_name: "a".into(),
            turn_id: "t".into(),
        }
    }

    fn row(event_type: &'static str, line_no: i64) -> EventRow {
        EventRow {
            event_type,
            level: "info",
            data: "{}".into(),
            line_no: Some(line_no),
            ..Default::default()
        }
    }

    fn end(line_no: i64, start: ToolStartRef, ms: i64) -> EventRow {
        EventRow {
            tool_duration_ms: Some(ms),
            tool_start: Some(start),
            ..row("tool_end", line_no)
        }
    }

    fn batch(rows: Vec<EventRow>) -> Batch {
        Batch {
            created_at: "2026-01-01T00:00:00.000Z".into(),
            session_id: None,
            rows,
        }
    }

    /// Line 64 starts two calls whose rows straddle the 64-row chunk
    /// boundary; their ends arrive in reverse order.
    fn starts_and_ends() -> (Batch, Batch) {
        let mut first: Vec<EventRow> = (1..=63).map(|l| row("progress", l)).collect();
        first.push(row("tool_start", 64));
        first.push(row("tool_start", 64));
        let at = |nth| ToolStartRef { line_no: 64, nth };
        let second = vec![end(65, at(1), 5), end(66, at(0), 7)];
        (batch(first), batch(second))
    }

    fn durations(db: &Db) -> Vec<(String, Option<i64>)> {
        let conn = db.sqlite().unwrap();
        let mut st = conn
            .prepare("SELECT event_type, tool_duration_ms FROM events WHERE event_type LIKE 'tool_%' ORDER BY id")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    #[test]
    fn durations_reach_their_start_rows_by_id_and_by_lookup() {
        let want = vec![
            ("tool_start".to_string(), Some(7)),
            ("tool_start".to_string(), Some(5)),
            ("tool_end".to_string(), Some(5)),
            ("tool_end".to_string(), Some(7)),
        ];
        // The writer's path: ids noted as the rows go in.
        let d = tempfile::tempdir().unwrap();
        let mut conn = open(d.path()).unwrap();
        let (a, b) = starts_and_ends();
        immediate(&mut conn, "writing events", |tx| {
            write_batches(tx, &tag(), &[a, b], &mut StartIds::default())
        })
        .unwrap();
        assert_eq!(durations(&conn), want);
        // Separate transactions without the noted ids (sweep replays): looked up.
        let d = tempfile::tempdir().unwrap();
        let mut conn = open(d.path()).unwrap();
        let (a, b) = starts_and_ends();
        insert_rows(&mut conn, &tag(), &a).unwrap();
        insert_rows(&mut conn, &tag(), &b).unwrap();
        assert_eq!(durations(&conn), want);
    }

    #[test]
    fn a_level_outside_the_check_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut conn = open(d.path()).unwrap();
        let mut bad = row("custom", 1);
        bad.level = "loud";
        let e = insert_rows(&mut conn, &tag(), &batch(vec![bad])).unwrap_err();
        assert!(e.to_string().contains("loud"), "{e}");
        assert_eq!(count_for_turn(&conn, "t").unwrap(), 0);
    }
}
