//! Schemas and migrations of the three databases.
//!
//! Each migration is idempotent: it looks at what is there (`user_version`,
//! `PRAGMA table_info`, the stored `CREATE TABLE` text) and adds only what is
//! missing, in one `BEGIN IMMEDIATE` transaction. Overstory databases are
//! upgraded in place: `bead_id` becomes `task_id`, missing columns are added,
//! the old five-state `CHECK` on `sessions.state` is dropped (as overstory
//! 0.11 does) and the mail type `CHECK` is widened to SPEC §2.3's list.
//! Every process opens the files afresh, so the look that decides whether a
//! file is ours and up to date (done on every open) prepares no statement
//! beyond `PRAGMA user_version`: tables and columns are looked up in the
//! schema SQLite has already loaded.

use std::path::Path;

use rusqlite::Connection;

use super::{Ctx, Result, StoreError, immediate_sqlite};

/// Schema version of each of our databases.
pub const SCHEMA_VERSION: i64 = 1;

pub const MAIL_TYPES: [&str; 14] = [
    "status",
    "question",
    "result",
    "error",
    "worker_done",
    "worker_died",
    "merge_ready",
    "merged",
    "merge_failed",
    "escalation",
    "health_check",
    "dispatch",
    "assign",
    "decision_gate",
];

pub const PRIORITIES: [&str; 4] = ["low", "normal", "high", "urgent"];

const SESSIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS sessions (
  id TEXT PRIMARY KEY,
  agent_name TEXT NOT NULL UNIQUE,
  capability TEXT NOT NULL,
  worktree_path TEXT NOT NULL,
  branch_name TEXT NOT NULL,
  task_id TEXT NOT NULL,
  tmux_session TEXT NOT NULL,
  state TEXT NOT NULL DEFAULT 'booting',
  pid INTEGER,
  parent_agent TEXT,
  depth INTEGER NOT NULL DEFAULT 0,
  run_id TEXT,
  started_at TEXT NOT NULL,
  last_activity TEXT NOT NULL,
  escalation_level INTEGER NOT NULL DEFAULT 0,
  stalled_since TEXT,
  transcript_path TEXT,
  prompt_version TEXT,
  claude_session_id TEXT
)";

const RUNS_TABLE: &str = "CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY,
  started_at TEXT NOT NULL,
  completed_at TEXT,
  agent_count INTEGER NOT NULL DEFAULT 0,
  coordinator_session_id TEXT,
  coordinator_name TEXT,
  status TEXT NOT NULL DEFAULT 'active' CHECK(status IN ('active','completed','failed'))
)";

const TURNS_TABLE: &str = "CREATE TABLE IF NOT EXISTS turns (
  turn_id TEXT PRIMARY KEY,
  agent_name TEXT NOT NULL,
  started_at TEXT NOT NULL,
  ended_at TEXT,
  runner_pid INTEGER,
  agent_pid INTEGER,
  initial_state TEXT,
  final_state TEXT,
  outcome TEXT,
  reason TEXT,
  exit_code INTEGER,
  signal INTEGER,
  clean_result INTEGER NOT NULL DEFAULT 0,
  terminal_mail_observed INTEGER NOT NULL DEFAULT 0,
  session_id TEXT,
  resume_requested TEXT,
  resume_mismatch INTEGER NOT NULL DEFAULT 0,
  events INTEGER NOT NULL DEFAULT 0,
  lines INTEGER NOT NULL DEFAULT 0,
  malformed_lines INTEGER NOT NULL DEFAULT 0,
  bytes INTEGER NOT NULL DEFAULT 0,
  mail_ids TEXT NOT NULL DEFAULT '[]',
  cost_usd REAL,
  input_tokens INTEGER,
  output_tokens INTEGER,
  num_turns INTEGER,
  result_text TEXT,
  stderr_tail TEXT,
  leaked INTEGER NOT NULL DEFAULT 0,
  stderr_dropped_bytes INTEGER
)";

const EVENTS_TABLE: &str = "CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  run_id TEXT,
  agent_name TEXT NOT NULL,
  session_id TEXT,
  event_type TEXT NOT NULL,
  tool_name TEXT,
  tool_args TEXT,
  tool_duration_ms INTEGER,
  level TEXT NOT NULL DEFAULT 'info' CHECK(level IN ('debug','info','warn','error')),
  data TEXT,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
)";

fn messages_table(name: &str) -> String {
    let types: Vec<String> = MAIL_TYPES.iter().map(|t| format!("'{t}'")).collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (
  id TEXT PRIMARY KEY,
  from_agent TEXT NOT NULL,
  to_agent TEXT NOT NULL,
  subject TEXT NOT NULL,
  body TEXT NOT NULL,
  type TEXT NOT NULL DEFAULT 'status' {},
  priority TEXT NOT NULL DEFAULT 'normal' CHECK(priority IN ('low','normal','high','urgent')),
  thread_id TEXT,
  payload TEXT,
  read INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
)",
        type_check(&types.join(","))
    )
}

fn type_check(list: &str) -> String {
    format!("CHECK(type IN ({list}))")
}

fn user_version(conn: &Connection) -> Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .ctx("reading the schema version")
}

fn table_sql(conn: &Connection, table: &str) -> Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        "SELECT sql FROM sqlite_master WHERE type='table' AND name=?1",
        [table],
        |r| r.get(0),
    )
    .optional()
    .ctx("reading the schema")
}

fn columns(conn: &Connection, table: &str) -> Result<Vec<String>> {
    let mut st = conn
        .prepare(&format!("PRAGMA table_info({table})"))
        .ctx("reading the schema")?;
    let cols = st
        .query_map([], |r| r.get::<_, String>(1))
        .ctx("reading the schema")?
        .collect::<std::result::Result<Vec<_>, _>>()
        .ctx("reading the schema")?;
    Ok(cols)
}

fn add_missing(conn: &Connection, table: &str, wanted: &[(&str, &str)]) -> Result<()> {
    let have = columns(conn, table)?;
    for (name, decl) in wanted {
        if !have.iter().any(|c| c == name) {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {decl}"))
                .ctx("adding a column")?;
        }
    }
    Ok(())
}

/// Finds `CHECK(... <needle> ...)` in a `CREATE TABLE` text and returns the
/// text with that clause replaced by `with` (or removed).
pub fn replace_check(sql: &str, needle: &str, with: &str) -> Option<String> {
    let upper = sql.to_ascii_uppercase();
    let mut from = 0;
    while let Some(rel) = upper[from..].find("CHECK") {
        let start = from + rel;
        let open = start + upper[start..].find('(')?;
        let mut depth = 0usize;
        let mut end = None;
        for (i, ch) in sql[open..].char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(open + i + 1);
                        break;
                    }
                }
                _ => {}
            }
        }
        let end = end?;
        let inner: String = sql[open..end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if inner.to_ascii_lowercase().contains(needle) {
            return Some(format!("{}{}{}", &sql[..start], with, &sql[end..]));
        }
        from = end;
    }
    None
}

/// Rebuilds `table` from `new_sql` (a `CREATE TABLE <table>__new ...` text),
/// copying every column. Runs inside the caller's transaction.
fn rebuild(conn: &Connection, table: &str, new_sql: &str) -> Result<()> {
    let cols = columns(conn, table)?.join(", ");
    conn.execute_batch(&format!(
        "{new_sql};
         INSERT INTO {table}__new ({cols}) SELECT {cols} FROM {table};
         DROP TABLE {table};
         ALTER TABLE {table}__new RENAME TO {table};"
    ))
    .ctx("rebuilding a table")
}

fn renamed(sql: &str, table: &str) -> String {
    // "CREATE TABLE sessions (" / "CREATE TABLE IF NOT EXISTS sessions(" / quoted names
    let lower = sql.to_ascii_lowercase();
    let pos = lower.find(table).unwrap_or(0);
    format!("{}{}__new{}", &sql[..pos], table, &sql[pos + table.len()..])
}

/// Whether `table` of the main database exists and, with `column`, has that
/// column. Looked up in the schema SQLite has already loaded: no statement
/// to prepare (every process opens these files afresh, so each statement
/// is prepared once per process).
fn has(conn: &Connection, table: &str, column: Option<&str>) -> Result<bool> {
    match column {
        None => conn.table_exists(Some("main"), table),
        Some(c) => conn.column_exists(Some("main"), table, c),
    }
    .ctx("reading the schema")
}

fn check_ours(conn: &Connection, path: &Path, table: &str, must_have: &str) -> Result<()> {
    let v = user_version(conn).map_err(|e| not_ours_if_notadb(e, path))?;
    if v > SCHEMA_VERSION {
        return Err(StoreError::NotOurs {
            path: path.display().to_string(),
            detail: format!("schema version {v} is newer than this runner's {SCHEMA_VERSION}"),
        });
    }
    if has(conn, table, None)? && !has(conn, table, Some(must_have))? {
        return Err(StoreError::NotOurs {
            path: path.display().to_string(),
            detail: format!("its '{table}' table has no '{must_have}' column"),
        });
    }
    Ok(())
}

fn not_ours_if_notadb(e: StoreError, path: &Path) -> StoreError {
    match e {
        StoreError::NotOurs { detail, .. } => StoreError::NotOurs {
            path: path.display().to_string(),
            detail,
        },
        other => other,
    }
}

fn up_to_date(conn: &Connection, marker_table: &str) -> Result<bool> {
    Ok(user_version(conn)? == SCHEMA_VERSION && has(conn, marker_table, None)?)
}

pub fn migrate_sessions(conn: &mut Connection, path: &Path) -> Result<()> {
    check_ours(conn, path, "sessions", "agent_name")?;
    // The newest column of `turns` marks a migrated file: the same two
    // cheap looks as `up_to_date`.
    if user_version(conn)? == SCHEMA_VERSION && has(conn, "turns", Some("stderr_dropped_bytes"))? {
        return Ok(());
    }
    immediate_sqlite(conn, "migrating sessions.db", |tx| {
        tx.execute_batch(SESSIONS_TABLE).ctx("creating sessions")?;
        let cols = columns(tx, "sessions")?;
        if cols.iter().any(|c| c == "bead_id") && !cols.iter().any(|c| c == "task_id") {
            tx.execute_batch("ALTER TABLE sessions RENAME COLUMN bead_id TO task_id")
                .ctx("renaming bead_id")?;
        }
        add_missing(
            tx,
            "sessions",
            &[
                ("transcript_path", "TEXT"),
                ("prompt_version", "TEXT"),
                ("claude_session_id", "TEXT"),
                ("runtime", "TEXT NOT NULL DEFAULT 'claude'"),
                ("runtime_command", "TEXT"),
                ("model", "TEXT"),
            ],
        )?;
        if let Some(sql) = table_sql(tx, "sessions")?
            && let Some(relaxed) = replace_check(&sql, "state in", "")
        {
            rebuild(tx, "sessions", &renamed(&relaxed, "sessions"))?;
        }
        tx.execute_batch(RUNS_TABLE).ctx("creating runs")?;
        add_missing(tx, "runs", &[("coordinator_name", "TEXT")])?;
        tx.execute_batch(TURNS_TABLE).ctx("creating turns")?;
        add_missing(tx, "turns", &[("stderr_dropped_bytes", "INTEGER")])?;
        tx.execute_batch(
            "CREATE INDEX IF NOT EXISTS idx_sessions_state ON sessions(state);
             CREATE INDEX IF NOT EXISTS idx_sessions_run ON sessions(run_id);
             CREATE INDEX IF NOT EXISTS idx_runs_status ON runs(status);
             CREATE INDEX IF NOT EXISTS idx_turns_agent ON turns(agent_name, turn_id);
             CREATE INDEX IF NOT EXISTS idx_turns_open ON turns(agent_name) WHERE ended_at IS NULL;",
        )
        .ctx("creating indexes")?;
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
            .ctx("setting the schema version")?;
        Ok(())
    })
}

/// Whether the attached `mail` database needs no migration (one cheap look).
pub fn mail_up_to_date(conn: &Connection) -> Result<bool> {
    let v: i64 = conn
        .query_row("PRAGMA mail.user_version", [], |r| r.get(0))
        .ctx("reading mail.db's schema version")?;
    let has = conn
        .table_exists(Some("mail"), "messages")
        .ctx("reading mail.db's schema")?;
    Ok(v == SCHEMA_VERSION && has)
}

pub fn migrate_mail(conn: &mut Connection, path: &Path) -> Result<()> {
    check_ours(conn, path, "messages", "to_agent")?;
    if up_to_date(conn, "messages")? {
        return Ok(());
    }
    immediate_sqlite(conn, "migrating mail.db", |tx| {
        tx.execute_batch(&messages_table("messages"))
            .ctx("creating messages")?;
        add_missing(tx, "messages", &[("payload", "TEXT")])?;
        if let Some(sql) = table_sql(tx, "messages")? {
            let missing_type = MAIL_TYPES.iter().any(|t| !sql.contains(&format!("'{t}'")));
            if missing_type {
                let types: Vec<String> = MAIL_TYPES.iter().map(|t| format!("'{t}'")).collect();
                let with = type_check(&types.join(","));
                let new_sql = match replace_check(&sql, "type in", &with) {
                    Some(s) => s,
                    None => sql.clone(), // no CHECK at all: leave the table as it is
                };
                if new_sql != sql {
                    rebuild(tx, "messages", &renamed(&new_sql, "messages"))?;
                }
            }
        }
        add_missing(
            tx,
            "messages",
            &[
                ("claimed_by", "TEXT"),
                ("claimed_at", "TEXT"),
                ("tries", "INTEGER NOT NULL DEFAULT 0"),
                ("process_after", "TEXT"),
                ("delivered_at", "TEXT"),
                ("dead_at", "TEXT"),
                ("last_error", "TEXT"),
                ("turn_id", "TEXT"),
            ],
        )?;
        tx.execute_batch(
            "CREATE INDEX IF NOT EXISTS idx_inbox ON messages(to_agent, read);
             CREATE INDEX IF NOT EXISTS idx_thread ON messages(thread_id);
             CREATE INDEX IF NOT EXISTS idx_claims ON messages(claimed_by) WHERE claimed_by IS NOT NULL;
             CREATE INDEX IF NOT EXISTS idx_from_type ON messages(from_agent, type);",
        )
        .ctx("creating indexes")?;
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
            .ctx("setting the schema version")?;
        Ok(())
    })
}

pub fn migrate_events(conn: &mut Connection, path: &Path) -> Result<()> {
    check_ours(conn, path, "events", "event_type")?;
    if up_to_date(conn, "events")? && columns(conn, "events")?.iter().any(|c| c == "line_no") {
        return Ok(());
    }
    immediate_sqlite(conn, "migrating events.db", |tx| {
        tx.execute_batch(EVENTS_TABLE).ctx("creating events")?;
        add_missing(tx, "events", &[("turn_id", "TEXT"), ("line_no", "INTEGER")])?;
        tx.execute_batch(
            // Only the indexes runner's own queries use: each index adds
            // to the cost of every insert on the ingest path (BENCHMARKS.md).
            // `(agent_name, created_at)` is not one of them (`events --agent`
            // reads newest first by id, so it walks the primary key), and it
            // was 2.1k of the writer's 12k instructions a row. An upgraded
            // overstory database keeps the ones it already has, and `ov`
            // creates its own when it opens the file.
            "CREATE INDEX IF NOT EXISTS idx_events_level_error ON events(level) WHERE level = 'error';
             CREATE INDEX IF NOT EXISTS idx_events_turn ON events(turn_id, line_no);",
        )
        .ctx("creating indexes")?;
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
            .ctx("setting the schema version")?;
        Ok(())
    })
}

/// overstory's `metrics.db` (`../shared/overstory-views.md`), written so
/// that `ov costs` can read what runner's turns cost.
const METRICS_TABLES: &str = "CREATE TABLE IF NOT EXISTS sessions (
  agent_name TEXT NOT NULL,
  task_id TEXT NOT NULL,
  capability TEXT NOT NULL,
  started_at TEXT NOT NULL,
  completed_at TEXT,
  duration_ms INTEGER NOT NULL DEFAULT 0,
  exit_code INTEGER,
  merge_result TEXT,
  parent_agent TEXT,
  input_tokens INTEGER NOT NULL DEFAULT 0,
  output_tokens INTEGER NOT NULL DEFAULT 0,
  cache_read_tokens INTEGER NOT NULL DEFAULT 0,
  cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
  estimated_cost_usd REAL,
  model_used TEXT,
  run_id TEXT,
  PRIMARY KEY (agent_name, task_id)
);
CREATE TABLE IF NOT EXISTS token_snapshots (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  agent_name TEXT NOT NULL,
  input_tokens INTEGER NOT NULL DEFAULT 0,
  output_tokens INTEGER NOT NULL DEFAULT 0,
  cache_read_tokens INTEGER NOT NULL DEFAULT 0,
  cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
  estimated_cost_usd REAL,
  model_used TEXT,
  run_id TEXT,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f','now'))
);
CREATE INDEX IF NOT EXISTS idx_snapshots_agent_time ON token_snapshots(agent_name, created_at);";

pub fn migrate_metrics(conn: &mut Connection, path: &Path) -> Result<()> {
    check_ours(conn, path, "sessions", "estimated_cost_usd")?;
    if up_to_date(conn, "token_snapshots")? {
        return Ok(());
    }
    immediate_sqlite(conn, "migrating metrics.db", |tx| {
        tx.execute_batch(METRICS_TABLES)
            .ctx("creating the metrics tables")?;
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
            .ctx("setting the schema version")?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_named_check() {
        let sql = "CREATE TABLE sessions (a TEXT, state TEXT NOT NULL DEFAULT 'booting'\n    CHECK(state IN ('booting','working')), b INTEGER CHECK (b > 0))";
        let out = replace_check(sql, "state in", "").unwrap();
        assert!(!out.contains("'working'"));
        assert!(out.contains("CHECK (b > 0)"));
        assert_eq!(replace_check(sql, "nothing", ""), None);
        assert!(renamed(&out, "sessions").starts_with("CREATE TABLE sessions__new ("));
    }
}
