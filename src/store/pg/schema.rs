//! The PostgreSQL schema (SPEC §12.1): every table of §2.1–2.3 with the same
//! table and column names, plus `hosts`, `leases` and the fencing-token
//! sequence of §12.2–12.3, and `runner_meta` holding the schema version.
//!
//! Types: the timestamps of the overstory tables stay `TEXT` in the one
//! fixed-width RFC 3339 format runner writes everywhere (SPEC §1), so every
//! comparison and every printed value is the same on both stores; the
//! fleet's own expiry columns (`leases`, `hosts`) are `timestamptz`, judged
//! by the database's clock (`now()`). Flags stay `INTEGER` 0/1 as in SQLite.
//! `messages.rowid` is a `bigserial`: the arrival order and the
//! terminal-mail baseline of §2.3 read the same column on both stores.

use postgres::Client;

use super::{PgError, Result, query_error};

/// Each migration moves the schema from its index to index + 1.
const MIGRATIONS: &[&str] = &[V1, V2];

/// The schema version this runner writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const V1: &str = "
CREATE TABLE sessions (
  id TEXT PRIMARY KEY,
  agent_name TEXT NOT NULL UNIQUE,
  capability TEXT NOT NULL,
  worktree_path TEXT NOT NULL,
  branch_name TEXT NOT NULL,
  task_id TEXT NOT NULL,
  tmux_session TEXT NOT NULL,
  state TEXT NOT NULL DEFAULT 'booting',
  pid BIGINT,
  parent_agent TEXT,
  depth BIGINT NOT NULL DEFAULT 0,
  run_id TEXT,
  started_at TEXT NOT NULL,
  last_activity TEXT NOT NULL,
  escalation_level BIGINT NOT NULL DEFAULT 0,
  stalled_since TEXT,
  transcript_path TEXT,
  prompt_version TEXT,
  claude_session_id TEXT,
  runtime TEXT NOT NULL DEFAULT 'claude',
  runtime_command TEXT,
  model TEXT,
  host TEXT
);
CREATE TABLE runs (
  id TEXT PRIMARY KEY,
  started_at TEXT NOT NULL,
  completed_at TEXT,
  agent_count BIGINT NOT NULL DEFAULT 0,
  coordinator_session_id TEXT,
  coordinator_name TEXT,
  status TEXT NOT NULL DEFAULT 'active' CHECK(status IN ('active','completed','failed'))
);
CREATE TABLE turns (
  turn_id TEXT PRIMARY KEY,
  agent_name TEXT NOT NULL,
  started_at TEXT NOT NULL,
  ended_at TEXT,
  runner_pid BIGINT,
  agent_pid BIGINT,
  initial_state TEXT,
  final_state TEXT,
  outcome TEXT,
  reason TEXT,
  exit_code BIGINT,
  signal BIGINT,
  clean_result INTEGER NOT NULL DEFAULT 0,
  terminal_mail_observed INTEGER NOT NULL DEFAULT 0,
  session_id TEXT,
  resume_requested TEXT,
  resume_mismatch INTEGER NOT NULL DEFAULT 0,
  events BIGINT NOT NULL DEFAULT 0,
  lines BIGINT NOT NULL DEFAULT 0,
  malformed_lines BIGINT NOT NULL DEFAULT 0,
  bytes BIGINT NOT NULL DEFAULT 0,
  mail_ids TEXT NOT NULL DEFAULT '[]',
  cost_usd DOUBLE PRECISION,
  input_tokens BIGINT,
  output_tokens BIGINT,
  num_turns BIGINT,
  result_text TEXT,
  stderr_tail TEXT,
  leaked INTEGER NOT NULL DEFAULT 0,
  stderr_dropped_bytes BIGINT,
  host TEXT
);
CREATE INDEX idx_turns_agent ON turns(agent_name, started_at);
CREATE TABLE messages (
  rowid BIGSERIAL UNIQUE,
  id TEXT PRIMARY KEY,
  from_agent TEXT NOT NULL,
  to_agent TEXT NOT NULL,
  subject TEXT NOT NULL,
  body TEXT NOT NULL,
  type TEXT NOT NULL DEFAULT 'status' CHECK(type IN ('status','question','result','error',
    'worker_done','worker_died','merge_ready','merged','merge_failed','escalation',
    'health_check','dispatch','assign','decision_gate')),
  priority TEXT NOT NULL DEFAULT 'normal' CHECK(priority IN ('low','normal','high','urgent')),
  thread_id TEXT,
  payload TEXT,
  read INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  claimed_by TEXT,
  claimed_at TEXT,
  tries BIGINT NOT NULL DEFAULT 0,
  process_after TEXT,
  delivered_at TEXT,
  dead_at TEXT,
  last_error TEXT,
  turn_id TEXT
);
CREATE INDEX idx_messages_to_pending ON messages(to_agent, rowid) WHERE read = 0 AND dead_at IS NULL;
CREATE INDEX idx_messages_claimed ON messages(claimed_by) WHERE claimed_by IS NOT NULL;
CREATE TABLE events (
  id BIGSERIAL PRIMARY KEY,
  run_id TEXT,
  agent_name TEXT NOT NULL,
  session_id TEXT,
  event_type TEXT NOT NULL,
  tool_name TEXT,
  tool_args TEXT,
  tool_duration_ms BIGINT,
  level TEXT NOT NULL DEFAULT 'info' CHECK(level IN ('debug','info','warn','error')),
  data TEXT,
  created_at TEXT NOT NULL,
  turn_id TEXT,
  line_no BIGINT
);
CREATE INDEX idx_events_agent_time ON events(agent_name, created_at);
CREATE INDEX idx_events_level_error ON events(level) WHERE level = 'error';
CREATE INDEX idx_events_turn ON events(turn_id, line_no);
CREATE TABLE hosts (
  id TEXT PRIMARY KEY,
  started_at timestamptz NOT NULL DEFAULT now(),
  last_seen_at timestamptz NOT NULL DEFAULT now(),
  pid BIGINT,
  version TEXT,
  state TEXT NOT NULL DEFAULT 'online' CHECK(state IN ('online','offline','stopped'))
);
CREATE SEQUENCE lease_token;
CREATE TABLE leases (
  agent_name TEXT PRIMARY KEY,
  host TEXT NOT NULL,
  runner_pid BIGINT NOT NULL,
  turn_id TEXT,
  token BIGINT NOT NULL,
  acquired_at timestamptz NOT NULL DEFAULT now(),
  renewed_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL
);
CREATE INDEX idx_leases_expiry ON leases(expires_at);
";

/// Version 2: events lose the `(agent_name, created_at)` index. No query of
/// runner's uses it (`events --agent` reads newest first by id, along the
/// primary key), and keeping it up to date was a tenth of the server's work
/// per ingested row (BENCHMARKS.md, issue 14).
const V2: &str = "DROP INDEX IF EXISTS idx_events_agent_time;";

/// Creates or upgrades `schema`, under a transaction-scoped advisory lock so
/// that several hosts opening at once migrate exactly once. Refuses a
/// schema that holds tables but is not ours, and one from a newer runner.
pub fn migrate(client: &mut Client, url: &str, schema: &str) -> Result<()> {
    // The common case, a current schema, costs one read and no lock (the
    // connection's search_path is `schema` alone).
    if let Ok(Some(row)) = client.query_opt(
        "SELECT value FROM runner_meta WHERE key = 'schema_version'",
        &[],
    ) && row.try_get::<_, String>(0).ok().as_deref() == Some(&SCHEMA_VERSION.to_string())
    {
        return Ok(());
    }
    let shown = super::redact(url);
    let mut tx = client
        .transaction()
        .map_err(|e| query_error("starting the migration", &e))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('runner schema migration'), hashtext($1))",
        &[&schema],
    )
    .map_err(|e| query_error("locking the schema for migration", &e))?;
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .map_err(|e| query_error("creating the schema", &e))?;
    let tables: i64 = tx
        .query_one(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = $1",
            &[&schema],
        )
        .map_err(|e| query_error("reading the schema", &e))?
        .get(0);
    let has_meta: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables
                            WHERE table_schema = $1 AND table_name = 'runner_meta')",
            &[&schema],
        )
        .map_err(|e| query_error("reading the schema", &e))?
        .get(0);
    if tables > 0 && !has_meta {
        return Err(PgError::NotOurs {
            url: shown,
            schema: schema.into(),
            detail: format!("{tables} table(s) and no runner_meta"),
        });
    }
    let found: i64 = if has_meta {
        let row = tx
            .query_opt(
                "SELECT value FROM runner_meta WHERE key = 'schema_version'",
                &[],
            )
            .map_err(|e| query_error("reading the schema version", &e))?;
        match row.map(|r| r.get::<_, String>(0)) {
            Some(v) => v.parse().map_err(|_| PgError::NotOurs {
                url: shown.clone(),
                schema: schema.into(),
                detail: format!("schema_version '{v}' is not a number"),
            })?,
            None => 0,
        }
    } else {
        tx.batch_execute("CREATE TABLE runner_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            .map_err(|e| query_error("creating runner_meta", &e))?;
        0
    };
    if found > SCHEMA_VERSION {
        return Err(PgError::Newer {
            url: shown,
            schema: schema.into(),
            found,
            ours: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        // Nothing to do; the transaction only held the lock.
        return tx
            .commit()
            .map_err(|e| query_error("ending the migration", &e));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(sql)
            .map_err(|e| query_error(&format!("migrating to version {}", i + 1), &e))?;
    }
    tx.execute(
        "INSERT INTO runner_meta (key, value) VALUES ('schema_version', $1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[&SCHEMA_VERSION.to_string()],
    )
    .map_err(|e| query_error("setting the schema version", &e))?;
    tx.commit()
        .map_err(|e| query_error("committing the migration", &e))
}
