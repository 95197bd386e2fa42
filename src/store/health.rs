//! Read-only looks at a database file for `runner doctor`: does it open,
//! is it ours, at which schema version, and does SQLite's quick integrity
//! check pass. Invariant: nothing here writes or migrates (the file is
//! opened read-only); a missing file is reported, never created.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{Ctx, Result, classify};

/// What one database file looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `PRAGMA user_version`.
    pub version: i64,
    /// The table that marks the file as ours exists with its marker column.
    pub ours: bool,
    /// The table exists but lacks the marker column (someone else's file).
    pub foreign: bool,
    /// `PRAGMA quick_check` problems (empty when it says `ok`).
    pub problems: Vec<String>,
}

/// Opens `path` read-only and inspects it; `table.column` marks it as ours.
pub fn inspect(path: &Path, table: &str, column: &str) -> Result<Health> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| classify("opening", Some(path), e))?;
    conn.busy_timeout(super::BUSY_TIMEOUT)
        .map_err(|e| classify("opening", Some(path), e))?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| classify("reading the schema version", Some(path), e))?;
    let has_table: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?1",
            [table],
            |r| r.get(0),
        )
        .optional()
        .ctx("reading the schema")?;
    let has_column: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM pragma_table_info(?1) WHERE name=?2",
            [table, column],
            |r| r.get(0),
        )
        .optional()
        .ctx("reading the schema")?;
    let mut st = conn
        .prepare("PRAGMA quick_check")
        .map_err(|e| classify("checking integrity", Some(path), e))?;
    // A damaged page can stop the check itself (SQLITE_CORRUPT) instead of
    // being listed: the file is still ours, and still fails the check.
    let problems: Vec<String> = match st
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
    {
        Ok(rows) => rows,
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseCorrupt) => {
            vec![e.to_string()]
        }
        Err(e) => return Err(classify("checking integrity", Some(path), e)),
    };
    // One row may hold many lines, under "*** in database main ***" headers.
    let problems = problems
        .iter()
        .flat_map(|p| p.lines())
        .filter(|l| *l != "ok" && !l.starts_with("*** in database"))
        .map(str::to_string)
        .collect();
    Ok(Health {
        version,
        ours: has_table.is_some() && has_column.is_some(),
        foreign: has_table.is_some() && has_column.is_none(),
        problems,
    })
}
