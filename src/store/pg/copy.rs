//! `runner store migrate --to URL` (SPEC §12.1): copies a SQLite root's
//! sessions, runs, turns, mail and events into an empty PostgreSQL schema,
//! one transaction per table group, and reports the row counts.
//!
//! Invariants: the source is opened read-only and never changed; a target
//! schema holding any row is refused before anything is written; a group
//! either lands whole or not at all; row ids (`messages.rowid`,
//! `events.id`) are kept, so arrival order and terminal-mail baselines mean
//! the same afterwards, and the sequences continue after them. Columns the
//! source lacks (an older overstory root) take the target's defaults;
//! columns only the source has are not copied.

use std::io::Write;
use std::path::Path;

use postgres::Client;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use super::{PgError, Result, query_error, redact};

/// What was copied.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CopyReport {
    pub to: String,
    pub schema: String,
    pub sessions: u64,
    pub runs: u64,
    pub turns: u64,
    pub messages: u64,
    pub events: u64,
}

/// The tables of each group, by source file; each group is one transaction.
const GROUPS: &[(&str, &[&str])] = &[
    ("sessions.db", &["sessions", "runs", "turns"]),
    ("mail.db", &["messages"]),
    ("events.db", &["events"]),
];

/// Tables that must be empty in the target (the fleet's own included).
const TARGET_TABLES: &[&str] = &[
    "sessions", "runs", "turns", "messages", "events", "hosts", "leases",
];

/// Copies the SQLite stores under `root` into `schema` at `url`.
pub fn copy_root(root: &Path, url: &str, schema: &str) -> Result<CopyReport> {
    let shown = redact(url);
    let mut client = super::connect(url, schema)?;
    super::schema::migrate(&mut client, url, schema)?;
    refuse_non_empty(&mut client, &shown, schema)?;
    let mut report = CopyReport {
        to: shown.clone(),
        schema: schema.to_string(),
        ..CopyReport::default()
    };
    for (file, tables) in GROUPS {
        let path = root.join(file);
        if !path.exists() {
            continue;
        }
        let src = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| source_error(&path, &e))?;
        src.busy_timeout(crate::store::BUSY_TIMEOUT)
            .map_err(|e| source_error(&path, &e))?;
        let mut tx = client
            .transaction()
            .map_err(|e| query_error("starting a copy", &e))?;
        for table in *tables {
            let n = copy_table(&src, &path, &mut tx, table)?;
            match *table {
                "sessions" => report.sessions = n,
                "runs" => report.runs = n,
                "turns" => report.turns = n,
                "messages" => report.messages = n,
                "events" => report.events = n,
                _ => {}
            }
        }
        tx.commit()
            .map_err(|e| query_error(&format!("committing the copy of {file}"), &e))?;
    }
    Ok(report)
}

fn refuse_non_empty(client: &mut Client, shown: &str, schema: &str) -> Result<()> {
    let mut held = Vec::new();
    for t in TARGET_TABLES {
        let has: bool = client
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {t})"), &[])
            .map_err(|e| query_error("checking the target is empty", &e))?
            .get(0);
        if has {
            held.push(*t);
        }
    }
    if held.is_empty() {
        Ok(())
    } else {
        Err(PgError::NotEmpty {
            url: shown.to_string(),
            schema: schema.to_string(),
            detail: format!("rows in {}", held.join(", ")),
        })
    }
}

fn source_error(path: &Path, e: &rusqlite::Error) -> PgError {
    PgError::Query {
        context: format!("reading {}", path.display()),
        detail: e.to_string(),
    }
}

/// The columns both sides have, in the target's order; `rowid` of
/// `messages` is SQLite's implicit one.
fn shared_columns(
    src: &Connection,
    path: &Path,
    tx: &mut postgres::Transaction<'_>,
    table: &str,
) -> Result<Vec<String>> {
    let mut st = src
        .prepare(&format!("PRAGMA table_info({table})"))
        .map_err(|e| source_error(path, &e))?;
    let mut have: Vec<String> = st
        .query_map([], |r| r.get::<_, String>(1))
        .map_err(|e| source_error(path, &e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| source_error(path, &e))?;
    if have.is_empty() {
        return Ok(Vec::new());
    }
    if table == "messages" {
        have.push("rowid".into());
    }
    let target: Vec<String> = tx
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1
             ORDER BY ordinal_position",
            &[&table],
        )
        .map_err(|e| query_error("reading the target's columns", &e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(target.into_iter().filter(|c| have.contains(c)).collect())
}

/// Streams one table with `COPY … FROM STDIN` (text format); returns rows.
fn copy_table(
    src: &Connection,
    path: &Path,
    tx: &mut postgres::Transaction<'_>,
    table: &str,
) -> Result<u64> {
    let cols = shared_columns(src, path, tx, table)?;
    if cols.is_empty() {
        return Ok(0);
    }
    let list = cols.join(", ");
    let order = match table {
        "messages" => "rowid",
        "events" => "id",
        _ => "rowid",
    };
    let mut st = src
        .prepare(&format!("SELECT {list} FROM {table} ORDER BY {order}"))
        .map_err(|e| source_error(path, &e))?;
    let mut rows = st.query([]).map_err(|e| source_error(path, &e))?;
    let copying = format!("copying {table}");
    let mut w = tx
        .copy_in(&format!("COPY {table} ({list}) FROM STDIN"))
        .map_err(|e| query_error(&copying, &e))?;
    let mut line = String::new();
    let mut n = 0u64;
    while let Some(r) = rows.next().map_err(|e| source_error(path, &e))? {
        line.clear();
        for i in 0..cols.len() {
            if i > 0 {
                line.push('\t');
            }
            let v = r.get_ref(i).map_err(|e| source_error(path, &e))?;
            push_copy_value(&mut line, v);
        }
        line.push('\n');
        w.write_all(line.as_bytes()).map_err(|e| PgError::Query {
            context: copying.clone(),
            detail: e.to_string(),
        })?;
        n += 1;
    }
    w.finish().map_err(|e| query_error(&copying, &e))?;
    if let Some(id) = match table {
        "messages" => Some("rowid"),
        "events" => Some("id"),
        _ => None,
    } {
        tx.execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', '{id}'),
                               COALESCE((SELECT MAX({id}) FROM {table}), 0) + 1, false)"
            ),
            &[],
        )
        .map_err(|e| query_error(&format!("continuing {table}'s ids"), &e))?;
    }
    Ok(n)
}

/// One value in COPY's text format: `\N` for NULL; backslash, tab, newline
/// and CR escaped. PostgreSQL text cannot hold NUL, which becomes U+FFFD.
fn push_copy_value(out: &mut String, v: ValueRef<'_>) {
    match v {
        ValueRef::Null => out.push_str("\\N"),
        ValueRef::Integer(i) => out.push_str(&i.to_string()),
        ValueRef::Real(f) => out.push_str(&f.to_string()),
        ValueRef::Text(t) => escape_into(out, &String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => escape_into(out, &String::from_utf8_lossy(b)),
    }
}

/// `s` in COPY's text format (see [`push_copy_value`]).
fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_reads_specially() {
        let mut s = String::new();
        push_copy_value(&mut s, ValueRef::Text(b"a\tb\\c\nd\re\0"));
        assert_eq!(s, "a\\tb\\\\c\\nd\\re\u{FFFD}");
        s.clear();
        push_copy_value(&mut s, ValueRef::Null);
        push_copy_value(&mut s, ValueRef::Integer(-3));
        push_copy_value(&mut s, ValueRef::Real(0.0012));
        assert_eq!(s, "\\N-30.0012");
    }
}
