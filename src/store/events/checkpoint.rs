//! Background WAL checkpoints for a flooding `events.db` writer.
//!
//! SQLite's auto-checkpoint runs inside the commit that crosses 1000 WAL
//! pages, on the committing thread: during a flood the events writer spent
//! about a third of its time copying WAL pages back into the database and
//! waiting for their fsyncs, while the other core sat idle. Once a turn's
//! writer has written a flood's worth of rows it turns its auto-checkpoint
//! off and hands checkpoints to a [`Checkpointer`]: a thread with its own
//! connection that runs a PASSIVE checkpoint whenever the writer has
//! committed another 4 MiB (a PASSIVE checkpoint never takes the write lock,
//! so the writer keeps appending while pages are copied; each one syncs two
//! files, hence not one per commit).
//!
//! Invariants: the WAL stays bounded. A WAL restarts (is written again from
//! its start) only when a write transaction begins with every frame already
//! copied back, which a writer that commits back to back rarely sees; so
//! when the WAL has grown past [`WAL_CAP_BYTES`] the writer waits, between
//! two commits, for one checkpoint that covers all it wrote. Durability is
//! SQLite's: the checkpointer's connection has `synchronous=NORMAL`, as the
//! writer's, so the WAL is synced before pages are copied and the database
//! after. If the checkpointer cannot be started, the writer keeps its
//! auto-checkpoint.
//!
//! Non-goals: PostgreSQL (no WAL of ours), the small WALs of ordinary turns
//! (they never start a checkpointer; `trim_wals` handles them at the end).

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;

use crate::store::{Result, StoreError, open_conn};

/// Bytes of rows after which the writer waits for the checkpointer to
/// catch up: the WAL stays within about this (plus a page per row at worst).
pub const WAL_CAP_BYTES: u64 = 16 << 20;

/// Bytes of rows between two checkpoints (each syncs two files).
const CHECKPOINT_BYTES: u64 = 4 << 20;

/// SQLite's default `wal_autocheckpoint`, restored when the flood is over.
const AUTO_CHECKPOINT: i64 = 1000;

#[derive(Default)]
struct State {
    /// Commits the writer has told of.
    asked: u64,
    /// The last commit covered by a finished checkpoint.
    done: u64,
    /// Set when the writer is done: the thread ends.
    stop: bool,
    /// The last checkpoint's (WAL pages, pages copied back), when it ran.
    last: Option<(i64, i64)>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The checkpoint thread of one writer connection.
pub struct Checkpointer {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
    /// The WAL length at which the writer next waits (doubled when a
    /// reader holds the WAL back, so a pinned WAL cannot serialise writes).
    cap: u64,
    base_cap: u64,
    /// Bytes committed since the WAL last started over (as far as known).
    written: u64,
    /// Bytes committed since the thread was last asked for a checkpoint.
    unasked: u64,
}

impl Checkpointer {
    /// Opens a second connection to the database `writer` is on, starts the
    /// thread and turns `writer`'s auto-checkpoint off.
    pub fn start(writer: &Connection) -> Result<Checkpointer> {
        Checkpointer::start_with_cap(writer, WAL_CAP_BYTES)
    }

    fn start_with_cap(writer: &Connection, cap: u64) -> Result<Checkpointer> {
        let path = writer
            .path()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| StoreError::Io {
                path: "events.db".into(),
                source: std::io::Error::other("an in-memory database has no WAL to checkpoint"),
            })?;
        let conn = open_conn(Path::new(path))?;
        let shared = Arc::new(Shared::default());
        let theirs = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("events-checkpoint".into())
            .spawn(move || run(&conn, &theirs))
            .map_err(|e| StoreError::Io {
                path: "events checkpoint thread".into(),
                source: e,
            })?;
        set_auto_checkpoint(writer, 0);
        Ok(Checkpointer {
            shared,
            handle: Some(handle),
            cap,
            base_cap: cap,
            written: 0,
            unasked: 0,
        })
    }

    /// Tells the thread of a commit of about `bytes` (rows' sizes); when the
    /// WAL may have grown past the cap since it last started over, waits
    /// until a checkpoint covers this commit, so that the next write
    /// transaction starts the WAL over. (The WAL's own length is not to be
    /// had from SQLite without a hook; a restart the writer did not wait
    /// for only makes the WAL shorter than counted.)
    pub fn committed(&mut self, bytes: u64) {
        self.written += bytes;
        self.unasked += bytes;
        let wait = self.written >= self.cap;
        // Each checkpoint syncs the WAL and the database: one per
        // CHECKPOINT_BYTES, not one per commit.
        if self.unasked < CHECKPOINT_BYTES && !wait {
            return;
        }
        self.unasked = 0;
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.asked += 1;
        let mine = st.asked;
        self.shared.changed.notify_all();
        if !wait {
            return;
        }
        while st.done < mine && !st.stop {
            // A thread that ended (it cannot, short of a panic) must not
            // leave the writer waiting for ever.
            if self.handle.as_ref().is_none_or(|h| h.is_finished()) {
                return;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match st.last {
            // All copied back: the next write transaction starts over.
            Some((log, copied)) if copied >= log => {
                self.written = 0;
                self.cap = self.base_cap;
            }
            // A reader holds an older snapshot: the WAL cannot start over
            // yet; wait again only once it has doubled.
            _ => self.cap = self.cap.saturating_mul(2),
        }
    }

    /// Stops the thread and gives `writer` its auto-checkpoint back.
    pub fn finish(mut self, writer: &Connection) {
        self.stop();
        set_auto_checkpoint(writer, AUTO_CHECKPOINT);
    }

    fn stop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop = true;
        self.shared.changed.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_auto_checkpoint(conn: &Connection, pages: i64) {
    // Best effort: the pragma cannot fail on an open connection, and a
    // failure would only leave SQLite's own checkpoint schedule in place.
    let _ = conn.pragma_update(None, "wal_autocheckpoint", pages);
}

fn run(conn: &Connection, shared: &Shared) {
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        while st.done == st.asked && !st.stop {
            st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.stop {
            return;
        }
        let upto = st.asked;
        drop(st);
        // PASSIVE: copies what no reader still needs, never waits for a
        // lock (SQLITE_BUSY when another checkpoint runs: the next commit
        // asks again).
        let result = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })
            .ok();
        st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.done = upto;
        if result.is_some() {
            st.last = result;
        }
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(dir: &Path) -> Connection {
        let c = open_conn(&dir.join("x.db")).unwrap();
        c.execute_batch("CREATE TABLE t (b BLOB)").unwrap();
        c
    }

    /// Commits of eight ~4 KB rows: nine or so WAL pages each.
    fn commit(w: &Connection) {
        w.execute_batch("BEGIN IMMEDIATE").unwrap();
        for _ in 0..8 {
            w.execute("INSERT INTO t VALUES (zeroblob(4000))", [])
                .unwrap();
        }
        w.execute_batch("COMMIT").unwrap();
    }

    fn wal_pages(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("x.db-wal")).map_or(0, |m| m.len()) / 4120
    }

    fn auto_checkpoint(w: &Connection) -> i64 {
        w.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_flood_keeps_the_wal_bounded_and_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        let mut c = Checkpointer::start_with_cap(&w, 64 * 4096).unwrap();
        assert_eq!(auto_checkpoint(&w), 0);
        // ~1,800 WAL pages written in all: without the waits, the WAL
        // would hold them all (nothing else restarts it).
        for _ in 0..200 {
            commit(&w);
            c.committed(8 * 4000);
        }
        let pages = wal_pages(dir.path());
        assert!(pages < 4 * 64, "the WAL grew to {pages} pages");
        c.finish(&w);
        assert_eq!(auto_checkpoint(&w), AUTO_CHECKPOINT);
        let n: i64 = w
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1600);
    }

    #[test]
    fn a_reader_holding_the_wal_back_does_not_hold_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        commit(&w);
        let reader = open_conn(&dir.path().join("x.db")).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let n: i64 = reader
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 8);
        let mut c = Checkpointer::start_with_cap(&w, 16 * 4096).unwrap();
        for _ in 0..100 {
            commit(&w);
            c.committed(8 * 4000);
        }
        // The WAL could not restart under the reader: the writer went on,
        // waiting only as the WAL doubled, not after every commit.
        assert!(c.cap >= 512 * 4096, "cap stayed at {}", c.cap);
        reader.execute_batch("COMMIT").unwrap();
        c.finish(&w);
    }
}
