//! Read-only views of the store for the dashboard and `/metrics`: every
//! query the HTTP layer runs, behind the [`FleetViews`] trait, implemented
//! once ([`StoreViews`]) over the store seam for SQLite and PostgreSQL.
//!
//! Invariants: on PostgreSQL the kept connection runs with
//! `default_transaction_read_only`, so the server itself refuses writes.
//! On SQLite it opens `sessions.db` read-only with
//! `PRAGMA query_only=1` and attaches `mail.db` and `events.db` read-only
//! (`mode=ro`), so it can never take a write lock, create a database or run
//! a migration; its one kept connection runs autocommit reads only, so no
//! read transaction outlives a call to pin the WAL. Counters are derived from the
//! rows (turn outcomes, line and event counts, cost, tokens, mail tries), so
//! `runner web` on a host without `serve` shows the same numbers. Non-goal:
//! deciding what to show (that is `web`).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::Backend;
use super::db::{Db, DbResult, Row, params};

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use super::events::{EventFilter, StoredEvent};
use super::turns::TurnRow;
use super::{BUSY_TIMEOUT, Ctx, Result, StoreError, classify};

/// Upper bounds (seconds) of the turn-duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];

/// A classic histogram: per-bucket counts (not cumulative) for
/// [`DURATION_BUCKETS`], the sum and the count of observations.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// Mail by claim state (SPEC §2.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MailCounts {
    /// Pending, not claimed, `process_after` passed.
    pub due: u64,
    /// Claimed by a turn and not yet delivered.
    pub claimed: u64,
    /// Pending again after at least one failed try.
    pub retrying: u64,
    pub dead: u64,
}

/// Totals for `/metrics`. Every count only grows while rows are not deleted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Finished turns by outcome.
    pub turns_by_outcome: Vec<(String, u64)>,
    pub turns_in_flight: u64,
    pub duration: Histogram,
    pub lines: u64,
    pub events: u64,
    pub malformed_lines: u64,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub agents_by_state: Vec<(String, u64)>,
    /// Fleet mode: hosts by state (empty on SQLite).
    pub hosts_by_state: Vec<(String, u64)>,
    pub mail: MailCounts,
    /// Failed tries of mail (sum of `messages.tries`).
    pub mail_retries: u64,
}

/// One agent on the dashboard.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AgentView {
    pub name: String,
    pub capability: String,
    pub state: String,
    /// `(turn_id, started_at)` of the unfinished turn, if any.
    pub current_turn: Option<(String, String)>,
    /// The newest event of the current turn: type, tool and data.
    pub last_event: Option<LastEvent>,
    pub last_outcome: Option<String>,
    pub last_reason: Option<String>,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LastEvent {
    pub event_type: String,
    pub tool_name: Option<String>,
    pub tool_args: Option<String>,
    pub data: Option<String>,
}

/// A finished turn's end time and cost, for the chart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TurnPoint {
    pub ended_at: String,
    pub cost_usd: f64,
}

/// The read-only views the HTTP layer needs. Implemented for SQLite by
/// [`SqliteViews`]; a PostgreSQL store implements the same trait.
pub trait FleetViews: Send + Sync + 'static {
    /// Ok when the store answers a trivial query on each database.
    fn health(&self) -> Result<()>;
    fn totals(&self, now: &str) -> Result<Totals>;
    /// At most `limit` agents, those in a turn first, then the most
    /// recently active; and how many agents there are in all.
    fn agents(&self, limit: i64) -> Result<(Vec<AgentView>, u64)>;
    fn mail(&self, now: &str) -> Result<MailCounts>;
    /// Turns newest first (unfinished ones included).
    fn recent_turns(&self, limit: i64) -> Result<Vec<TurnRow>>;
    fn turn(&self, turn_id: &str) -> Result<Option<TurnRow>>;
    /// The last `limit` events of a turn, oldest first.
    fn turn_events(&self, turn_id: &str, limit: i64) -> Result<Vec<StoredEvent>>;
    /// The last `limit` finished turns, oldest first.
    fn turn_points(&self, limit: i64) -> Result<Vec<TurnPoint>>;
}

/// [`FleetViews`] over a root's store: the SQLite files under it, or its
/// PostgreSQL schema. The queries are written once, in SQL both accept
/// (aggregates with `FILTER`, `CAST`), through the store seam; only a
/// turn's duration differs (`julianday` against `timestamptz`).
pub struct StoreViews {
    root: PathBuf,
    backend: Backend,
    /// One read-only connection, kept: opening one costs a WAL-index
    /// recovery (reading every WAL) when no other connection is open, which
    /// at one poll a second would cost more than the queries — and on
    /// PostgreSQL a connection. It holds no lock between statements. Calls
    /// take turns on it.
    conn: Mutex<Option<Db>>,
}

/// The former name, from when only SQLite had views.
pub type SqliteViews = StoreViews;

/// The kept connection, for one call.
pub struct Conn<'a>(MutexGuard<'a, Option<Db>>);

impl std::ops::Deref for Conn<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.0.as_ref().expect("opened before use")
    }
}

impl std::fmt::Debug for StoreViews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreViews")
            .field("root", &self.root)
            .field("backend", &self.backend.describe())
            .finish()
    }
}

impl StoreViews {
    /// Views of the SQLite files under `root`.
    pub fn new(root: &Path) -> StoreViews {
        StoreViews::of(root, &Backend::Sqlite)
    }

    /// Views of `backend` (the store of the root at `root`).
    pub fn of(root: &Path, backend: &Backend) -> StoreViews {
        StoreViews {
            root: root.to_path_buf(),
            backend: backend.clone(),
            conn: Mutex::new(None),
        }
    }

    /// The kept connection, opened on first use (and again after a failed
    /// open or a failed query, e.g. before `runner init` or after the
    /// server restarted).
    fn open(&self) -> Result<Conn<'_>> {
        let mut g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(match &self.backend {
                Backend::Sqlite => Db::Sqlite(self.connect()?),
                Backend::Postgres { url, schema } => {
                    let db =
                        super::db::off_runtime(|| super::pg::connect(url, schema)).map(Db::pg)?;
                    // Read-only by the server's rules, not only by ours.
                    db.execute_batch("SET default_transaction_read_only = on")
                        .ctx("making the views read-only")?;
                    db
                }
            });
        }
        Ok(Conn(g))
    }

    /// Runs `f` on the kept connection; drops the connection when it fails,
    /// so that the next call opens a fresh one.
    fn with<T>(&self, f: impl FnOnce(&Db) -> Result<T>) -> Result<T> {
        let mut conn = self.open()?;
        let r = f(&conn);
        if r.is_err() && conn.is_pg() {
            conn.0.take();
        }
        r
    }

    /// `sessions.db` read-only, with `mail.db` as `mail` and `events.db` as
    /// `ev`, all read-only and `query_only`.
    fn connect(&self) -> Result<Connection> {
        let main = self.root.join("sessions.db");
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(ro_uri(&main), flags)
            .map_err(|e| classify("opening sessions.db read-only", Some(&main), e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .ctx("setting busy_timeout")?;
        conn.execute_batch("PRAGMA query_only=1")
            .ctx("setting query_only")?;
        for (file, alias) in [("mail.db", "mail"), ("events.db", "ev")] {
            let path = self.root.join(file);
            if !path.exists() {
                return Err(StoreError::Io {
                    path: path.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no such database (run `runner init`)",
                    ),
                });
            }
            conn.execute(
                "ATTACH DATABASE ?1 AS ?2",
                rusqlite::params![ro_uri(&path), alias],
            )
            .map_err(|e| classify("attaching read-only", Some(&path), e))?;
        }
        Ok(conn)
    }
}

/// A `file:` URI opening `path` read-only; `%`, `?` and `#` are escaped so
/// that any path stays a path.
fn ro_uri(path: &Path) -> String {
    let mut s = String::from("file:");
    for c in path.display().to_string().chars() {
        match c {
            '%' => s.push_str("%25"),
            '?' => s.push_str("%3f"),
            '#' => s.push_str("%23"),
            c => s.push(c),
        }
    }
    s.push_str("?mode=ro");
    s
}

fn count(r: &Row<'_>, i: usize) -> DbResult<u64> {
    Ok(r.get::<Option<i64>>(i)?.unwrap_or(0).max(0) as u64)
}

fn count_pairs(db: &Db, sql: &str, what: &str) -> Result<Vec<(String, u64)>> {
    db.query_map(sql, params![], |r| {
        Ok((
            r.get::<Option<String>>(0)?
                .unwrap_or_else(|| "unknown".into()),
            count(r, 1)?,
        ))
    })
    .ctx(what)
}

/// Seconds a finished turn took, as SQL over `turns` (never negative).
fn duration_sql(db: &Db) -> &'static str {
    if db.is_pg() {
        "GREATEST(0.0, CAST(EXTRACT(EPOCH FROM (CAST(ended_at AS timestamptz) - CAST(started_at AS timestamptz))) AS DOUBLE PRECISION))"
    } else {
        "MAX(0.0, (julianday(ended_at) - julianday(started_at)) * 86400.0)"
    }
}

fn duration_histogram(db: &Db) -> Result<Histogram> {
    // One pass: a cumulative count per bound, then the sum and the count.
    let mut cols: Vec<String> = DURATION_BUCKETS
        .iter()
        .map(|b| format!("COUNT(*) FILTER (WHERE d <= {b:?})"))
        .collect();
    cols.push("CAST(COALESCE(SUM(d), 0.0) AS DOUBLE PRECISION)".into());
    cols.push("COUNT(*)".into());
    let sql = format!(
        "SELECT {} FROM (SELECT {} AS d FROM turns WHERE ended_at IS NOT NULL) AS durations",
        cols.join(", "),
        duration_sql(db)
    );
    let n = DURATION_BUCKETS.len();
    db.query_row(&sql, params![], |r| {
        let mut buckets = Vec::with_capacity(n);
        let mut below = 0u64;
        for (i, b) in DURATION_BUCKETS.iter().enumerate() {
            let cumulative = count(r, i)?;
            buckets.push((*b, cumulative.saturating_sub(below)));
            below = cumulative;
        }
        let total = count(r, n + 1)?;
        buckets.push((f64::INFINITY, total.saturating_sub(below)));
        Ok(Histogram {
            buckets,
            sum: r.get(n)?,
            count: total,
        })
    })
    .ctx("summing turn durations")
}

const MAIL_COUNTS_SQL: &str = "SELECT \
    COUNT(*) FILTER (WHERE read=0 AND claimed_by IS NULL AND dead_at IS NULL AND (process_after IS NULL OR process_after <= ?1)), \
    COUNT(*) FILTER (WHERE read=0 AND claimed_by IS NOT NULL AND dead_at IS NULL), \
    COUNT(*) FILTER (WHERE read=0 AND claimed_by IS NULL AND dead_at IS NULL AND tries > 0), \
    COUNT(*) FILTER (WHERE dead_at IS NOT NULL), \
    CAST(COALESCE(SUM(tries), 0) AS BIGINT) \
    FROM messages";

fn mail_counts(db: &Db, now: &str) -> Result<(MailCounts, u64)> {
    db.query_row(MAIL_COUNTS_SQL, params![now], |r| {
        Ok((
            MailCounts {
                due: count(r, 0)?,
                claimed: count(r, 1)?,
                retrying: count(r, 2)?,
                dead: count(r, 3)?,
            },
            count(r, 4)?,
        ))
    })
    .ctx("counting mail")
}

impl FleetViews for StoreViews {
    fn health(&self) -> Result<()> {
        self.with(|db| {
            let sql = if db.is_pg() {
                "SELECT (SELECT COUNT(*) FROM sessions) + (SELECT COUNT(*) FROM messages WHERE false) \
                 + (SELECT COUNT(*) FROM events WHERE false)"
            } else {
                "SELECT (SELECT COUNT(*) FROM main.sqlite_master) + (SELECT COUNT(*) FROM mail.sqlite_master) \
                 + (SELECT COUNT(*) FROM ev.sqlite_master)"
            };
            db.query_row(sql, params![], |r| r.get::<i64>(0))
                .ctx("reading the schema")?;
            Ok(())
        })
    }

    fn totals(&self, now: &str) -> Result<Totals> {
        self.with(|db| {
            let turns_by_outcome = count_pairs(
                db,
                "SELECT outcome, COUNT(*) FROM turns WHERE ended_at IS NOT NULL GROUP BY outcome ORDER BY outcome",
                "counting turns",
            )?;
            let agents_by_state = count_pairs(
                db,
                "SELECT state, COUNT(*) FROM sessions GROUP BY state ORDER BY state",
                "counting agents",
            )?;
            let hosts_by_state = if db.is_pg() {
                count_pairs(
                    db,
                    "SELECT state, COUNT(*) FROM hosts GROUP BY state ORDER BY state",
                    "counting hosts",
                )?
            } else {
                Vec::new()
            };
            let (in_flight, lines, events, malformed, cost, input, output) = db
                .query_row(
                    "SELECT COUNT(*) FILTER (WHERE ended_at IS NULL), CAST(COALESCE(SUM(lines), 0) AS BIGINT), \
                     CAST(COALESCE(SUM(events), 0) AS BIGINT), CAST(COALESCE(SUM(malformed_lines), 0) AS BIGINT), \
                     CAST(COALESCE(SUM(cost_usd), 0.0) AS DOUBLE PRECISION), \
                     CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT), CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) \
                     FROM turns",
                    params![],
                    |r| {
                        Ok((
                            count(r, 0)?,
                            count(r, 1)?,
                            count(r, 2)?,
                            count(r, 3)?,
                            r.get::<f64>(4)?,
                            count(r, 5)?,
                            count(r, 6)?,
                        ))
                    },
                )
                .ctx("summing turns")?;
            let (mail, mail_retries) = mail_counts(db, now)?;
            Ok(Totals {
                turns_by_outcome,
                turns_in_flight: in_flight,
                duration: duration_histogram(db)?,
                lines,
                events,
                malformed_lines: malformed,
                cost_usd: cost,
                input_tokens: input,
                output_tokens: output,
                agents_by_state,
                hosts_by_state,
                mail,
                mail_retries,
            })
        })
    }

    fn agents(&self, limit: i64) -> Result<(Vec<AgentView>, u64)> {
        self.with(|db| {
            let total: i64 = db
                .query_row("SELECT COUNT(*) FROM sessions", params![], |r| r.get(0))
                .ctx("counting agents")?;
            // The open turn, the last finished one and the cost, per shown agent
            // (the inner LIMIT keeps the per-agent look-ups to the shown rows).
            let sql = "SELECT s.agent_name, s.capability, s.state, \
                (SELECT turn_id FROM turns t WHERE t.agent_name=s.agent_name AND t.ended_at IS NULL ORDER BY turn_id DESC LIMIT 1), \
                (SELECT started_at FROM turns t WHERE t.agent_name=s.agent_name AND t.ended_at IS NULL ORDER BY turn_id DESC LIMIT 1), \
                (SELECT outcome FROM turns t WHERE t.agent_name=s.agent_name AND t.ended_at IS NOT NULL ORDER BY turn_id DESC LIMIT 1), \
                (SELECT reason FROM turns t WHERE t.agent_name=s.agent_name AND t.ended_at IS NOT NULL ORDER BY turn_id DESC LIMIT 1), \
                (SELECT CAST(COALESCE(SUM(cost_usd), 0.0) AS DOUBLE PRECISION) FROM turns t WHERE t.agent_name=s.agent_name) \
                FROM (SELECT * FROM sessions ORDER BY state = 'in_turn' DESC, last_activity DESC, agent_name LIMIT ?1) s \
                ORDER BY s.state = 'in_turn' DESC, s.last_activity DESC, s.agent_name";
            let mut rows = db
                .query_map(sql, params![limit], |r| {
                    let turn: Option<String> = r.get(3)?;
                    let started: Option<String> = r.get(4)?;
                    Ok(AgentView {
                        name: r.get(0)?,
                        capability: r.get(1)?,
                        state: r.get(2)?,
                        current_turn: turn.zip(started),
                        last_event: None,
                        last_outcome: r.get(5)?,
                        last_reason: r.get(6)?,
                        cost_usd: r.get(7)?,
                    })
                })
                .ctx("listing agents")?;
            for a in &mut rows {
                if let Some((turn, _)) = &a.current_turn {
                    a.last_event = db
                        .query_opt(
                            "SELECT event_type, tool_name, tool_args, data FROM events WHERE turn_id=?1 \
                             ORDER BY line_no DESC, id DESC LIMIT 1",
                            params![turn],
                            |r| {
                                Ok(LastEvent {
                                    event_type: r.get(0)?,
                                    tool_name: r.get(1)?,
                                    tool_args: r.get(2)?,
                                    data: r.get(3)?,
                                })
                            },
                        )
                        .ctx("reading the last event")?;
                }
            }
            Ok((rows, total.max(0) as u64))
        })
    }

    fn mail(&self, now: &str) -> Result<MailCounts> {
        self.with(|db| Ok(mail_counts(db, now)?.0))
    }

    fn recent_turns(&self, limit: i64) -> Result<Vec<TurnRow>> {
        self.with(|db| super::turns::list(db, None, limit))
    }

    fn turn(&self, turn_id: &str) -> Result<Option<TurnRow>> {
        self.with(|db| super::turns::get(db, turn_id))
    }

    fn turn_events(&self, turn_id: &str, limit: i64) -> Result<Vec<StoredEvent>> {
        // On SQLite `events` resolves to the attached `ev.events`.
        let f = EventFilter {
            turn: Some(turn_id.to_string()),
            limit,
            ..EventFilter::default()
        };
        self.with(|db| super::events::list(db, &f))
    }

    fn turn_points(&self, limit: i64) -> Result<Vec<TurnPoint>> {
        self.with(|db| {
            db.query_map(
                "SELECT ended_at, CAST(COALESCE(cost_usd, 0.0) AS DOUBLE PRECISION) FROM (SELECT ended_at, cost_usd FROM turns \
                 WHERE ended_at IS NOT NULL ORDER BY ended_at DESC LIMIT ?1) AS newest ORDER BY ended_at",
                params![limit],
                |r| {
                    Ok(TurnPoint {
                        ended_at: r.get(0)?,
                        cost_usd: r.get(1)?,
                    })
                },
            )
            .ctx("reading turn times")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_escapes_path_characters() {
        assert_eq!(
            ro_uri(Path::new("/tmp/a?b#c%d/sessions.db")),
            "file:/tmp/a%3fb%23c%25d/sessions.db?mode=ro"
        );
    }

    #[test]
    fn read_only_views_never_write() {
        let dir = tempfile::tempdir().unwrap();
        let v = SqliteViews::new(dir.path());
        assert!(v.health().is_err(), "no databases yet");
        assert!(!dir.path().join("sessions.db").exists(), "must not create");
        let store = super::super::Store::open(dir.path()).unwrap();
        super::super::events::open(dir.path()).unwrap();
        store
            .conn
            .execute_batch(
                "INSERT INTO sessions (id, agent_name, capability, worktree_path, branch_name, task_id, tmux_session, state, started_at, last_activity) \
                 VALUES ('s1','a','builder','/w','b','t','', 'working', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z');
                 INSERT INTO turns (turn_id, agent_name, started_at, ended_at, outcome, lines, events, cost_usd) \
                 VALUES ('t1','a','2026-01-01T00:00:00.000Z','2026-01-01T00:00:02.000Z','done', 3, 5, 0.5), \
                        ('t2','a','2026-01-01T00:01:00.000Z', NULL, NULL, 0, 0, NULL);",
            )
            .unwrap();
        v.health().unwrap();
        let t = v.totals("2026-01-01T00:02:00.000Z").unwrap();
        assert_eq!(t.turns_by_outcome, vec![("done".to_string(), 1)]);
        assert_eq!(t.turns_in_flight, 1);
        assert_eq!((t.lines, t.events), (3, 5));
        assert_eq!(t.duration.count, 1);
        assert!((t.duration.sum - 2.0).abs() < 0.01, "{:?}", t.duration);
        // 2 s falls in the 5 s bucket.
        assert_eq!(t.duration.buckets[1], (5.0, 1));
        assert_eq!(t.duration.buckets.iter().map(|b| b.1).sum::<u64>(), 1);
        let (a, total) = v.agents(10).unwrap();
        assert_eq!(total, 1);
        assert_eq!(a[0].current_turn.as_ref().unwrap().0, "t2");
        assert_eq!(a[0].last_outcome.as_deref(), Some("done"));
        let conn = v.open().unwrap();
        let e = conn
            .sqlite()
            .unwrap()
            .execute("DELETE FROM turns", [])
            .expect_err("a read-only view cannot write");
        assert!(
            e.to_string().contains("readonly") || e.to_string().contains("read-only"),
            "{e}"
        );
    }
}
