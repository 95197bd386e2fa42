//! `runner events --follow` (SPEC §12.6): new rows by id (`id > last`),
//! never the whole table.
//!
//! A [`Follow`] remembers `last`, the id up to which it has read, and moves
//! it to the table's highest id (one index lookup) after every poll that was
//! not cut short by the page size, so a filter that matches nothing still
//! moves on instead of scanning what it already passed.
//!
//! On PostgreSQL an id is drawn at insert but the row is seen at commit: the
//! event writers of two turns committing out of order would show a row of
//! id 11 before one of id 10, and a follow that passed 11 would never show
//! 10. So on PostgreSQL a poll reads only up to the highest id that was
//! visible [`PG_LAG`] earlier — by then every transaction that drew an id
//! below it has committed (the writer commits within about 100 ms) — at the
//! price of that much delay. SQLite has one writer at a time: no lag.
//! Invariants: no row is returned twice, rows come in id order, and a row
//! committed within the lag of its id being drawn is returned. Non-goal:
//! rows that were in flight when the follow started.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::db::{Db, params};
use super::events::{COLS, EventFilter, StoredEvent, from_row};
use super::{Ctx, Result};

/// How far behind the newest id a follow on PostgreSQL reads.
pub const PG_LAG: Duration = Duration::from_secs(1);

/// Rows read per query.
pub const PAGE: i64 = 1000;

/// A follow's position in `events`.
pub struct Follow {
    filter: EventFilter,
    lag: Duration,
    last: i64,
    /// `(when, the highest id then)`, oldest first, spanning at least the lag.
    marks: VecDeque<(Instant, i64)>,
}

impl Follow {
    /// A follow starting at the table's current end (read before the caller
    /// prints what is already there; see [`Follow::shown`]).
    pub fn start(conn: &Db, filter: EventFilter) -> Result<Follow> {
        let lag = if conn.is_pg() { PG_LAG } else { Duration::ZERO };
        Follow::with_lag(conn, filter, lag)
    }

    pub fn with_lag(conn: &Db, filter: EventFilter, lag: Duration) -> Result<Follow> {
        Ok(Follow {
            filter,
            lag,
            last: max_id(conn)?,
            marks: VecDeque::new(),
        })
    }

    /// Rows up to `id` were shown already.
    pub fn shown(&mut self, id: i64) {
        self.last = self.last.max(id);
    }

    /// The new rows, in id order, and whether more are waiting (poll again
    /// at once).
    pub fn poll(&mut self, conn: &Db, now: Instant) -> Result<(Vec<StoredEvent>, bool)> {
        self.marks.push_back((now, max_id(conn)?));
        // The newest mark at least `lag` old is the horizon; older ones go.
        while self
            .marks
            .get(1)
            .is_some_and(|&(t, _)| now.duration_since(t) >= self.lag)
        {
            self.marks.pop_front();
        }
        let horizon = match self.marks.front() {
            Some(&(t, id)) if now.duration_since(t) >= self.lag => id,
            _ => return Ok((Vec::new(), false)),
        };
        if horizon <= self.last {
            return Ok((Vec::new(), false));
        }
        let rows = conn
            .query_map(
                &format!(
                    "SELECT {COLS} FROM events WHERE (CAST(?1 AS TEXT) IS NULL OR agent_name=?1) \
                     AND (CAST(?2 AS TEXT) IS NULL OR turn_id=?2) \
                     AND (CAST(?3 AS TEXT) IS NULL OR event_type=?3) \
                     AND id > ?4 AND id <= ?5 ORDER BY id LIMIT ?6"
                ),
                params![
                    self.filter.agent,
                    self.filter.turn,
                    self.filter.event_type,
                    self.last,
                    horizon,
                    PAGE
                ],
                from_row,
            )
            .ctx("following events")?;
        let more = rows.len() as i64 == PAGE;
        self.last = match rows.last() {
            Some(r) if more => r.id,
            _ => horizon,
        };
        Ok((rows, more))
    }
}

/// The highest id in `events` (0 when empty).
fn max_id(conn: &Db) -> Result<i64> {
    conn.query_row("SELECT COALESCE(MAX(id), 0) FROM events", params![], |r| {
        r.get(0)
    })
    .ctx("reading the newest event id")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Db) {
        let d = tempfile::tempdir().unwrap();
        let db = super::super::events::open(d.path()).unwrap();
        (d, db)
    }

    fn insert(db: &Db, id: i64, agent: &str) {
        db.execute(
            "INSERT INTO events (id, agent_name, event_type, level, created_at) \
             VALUES (?1, ?2, 'custom', 'info', 'now')",
            params![id, agent],
        )
        .unwrap();
    }

    fn ids(rows: &[StoredEvent]) -> Vec<i64> {
        rows.iter().map(|r| r.id).collect()
    }

    #[test]
    fn a_follow_starts_at_the_end_and_returns_each_new_row_once() {
        let (_d, db) = db();
        insert(&db, 1, "a");
        let mut f = Follow::start(&db, EventFilter::default()).unwrap();
        let t0 = Instant::now();
        assert!(f.poll(&db, t0).unwrap().0.is_empty());
        insert(&db, 2, "a");
        insert(&db, 3, "a");
        assert_eq!(ids(&f.poll(&db, t0).unwrap().0), vec![2, 3]);
        assert!(f.poll(&db, t0).unwrap().0.is_empty());
    }

    #[test]
    fn a_filter_that_matches_nothing_still_moves_past_what_it_read() {
        let (_d, db) = db();
        let only_b = EventFilter {
            agent: Some("b".into()),
            ..EventFilter::default()
        };
        let mut f = Follow::start(&db, only_b).unwrap();
        for id in 1..=5 {
            insert(&db, id, "a");
        }
        let t0 = Instant::now();
        assert!(f.poll(&db, t0).unwrap().0.is_empty());
        assert_eq!(f.last, 5, "past the rows of a");
        insert(&db, 6, "b");
        assert_eq!(ids(&f.poll(&db, t0).unwrap().0), vec![6]);
    }

    #[test]
    fn with_a_lag_a_row_committed_late_below_a_newer_one_is_not_skipped() {
        let (_d, db) = db();
        let lag = Duration::from_secs(1);
        let mut f = Follow::with_lag(&db, EventFilter::default(), lag).unwrap();
        let t0 = Instant::now();
        // Id 1 is drawn by a writer that has not committed; 2 commits first.
        insert(&db, 2, "a");
        assert!(f.poll(&db, t0).unwrap().0.is_empty(), "not lag old yet");
        insert(&db, 1, "a");
        let (rows, _) = f.poll(&db, t0 + lag).unwrap();
        assert_eq!(ids(&rows), vec![1, 2]);
        insert(&db, 3, "a");
        assert!(f.poll(&db, t0 + lag * 2).unwrap().0.is_empty());
        assert_eq!(ids(&f.poll(&db, t0 + lag * 3).unwrap().0), vec![3]);
    }

    #[test]
    fn a_backlog_is_read_in_pages() {
        let (_d, db) = db();
        let mut f = Follow::start(&db, EventFilter::default()).unwrap();
        for id in 1..=(PAGE + 5) {
            insert(&db, id, "a");
        }
        let t0 = Instant::now();
        let (rows, more) = f.poll(&db, t0).unwrap();
        assert_eq!((rows.len() as i64, more), (PAGE, true));
        let (rows, more) = f.poll(&db, t0).unwrap();
        assert_eq!((ids(&rows), more), ((PAGE + 1..=PAGE + 5).collect(), false));
    }
}
