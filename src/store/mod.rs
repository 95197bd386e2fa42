//! The stores: by default three SQLite files — `sessions.db` (sessions,
//! turns), `mail.db` (messages and their claims) and `events.db` (events) —
//! or, in fleet mode, one PostgreSQL schema holding the same tables
//! ([`Backend`]; every statement goes through the seam [`db::Db`]).
//!
//! Owns schemas, idempotent migrations (`PRAGMA user_version`), connection
//! settings (WAL, `synchronous=NORMAL`, 5 s busy timeout) and every SQL
//! statement of the project. Invariants: table and column names stay
//! overstory's, we only add; an existing overstory database is upgraded in
//! place; a file that is not one of ours is reported, never overwritten;
//! multi-statement writes run in `BEGIN IMMEDIATE` transactions; a process
//! that exits right after its work (`runner turn`) may leave its idle SQLite
//! connections to the exit ([`close_or_leave`]). Non-goal: deciding
//! anything — callers pass in what to write.

pub mod db;
pub mod events;
pub mod follow;
pub mod health;
pub mod hosts;
pub mod leases;
pub mod mail;
pub mod metrics;
pub mod pg;
pub mod schema;
pub mod sessions;
pub mod turns;
pub mod views;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

pub use db::Db;

pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "database is locked: {context} waited more than 5 s for another writer (try again, or look for a stuck runner)"
    )]
    Locked { context: String },
    #[error("{path} is not a runner database ({detail}); move it away or point --root elsewhere")]
    NotOurs { path: String, detail: String },
    #[error("cannot use {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// SQLITE_FULL: the disk (or quota) under the database is full.
    #[error("disk full while {context}")]
    DiskFull { context: String },
    /// SQLITE_IOERR: the disk under the database failed a read or write.
    #[error("I/O error while {context}: {source}")]
    DiskFault {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database error while {context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    /// Fleet mode: the turn's lease token was superseded or expired, so
    /// nothing was written (SPEC §12.3). Exit 75.
    #[error(
        "lease lost: the fleet took over agent {agent}'s lease (token {token}) before {context}"
    )]
    LeaseLost {
        agent: String,
        token: i64,
        context: String,
    },
    /// PostgreSQL (fleet mode): unreachable, refused, not ours, or a query error.
    #[error(transparent)]
    Pg(#[from] pg::PgError),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Classifies a SQLite error: busy/locked, "not a database", a full disk
/// and a failing disk are the user-facing ones; the rest is a bug.
pub fn classify(context: &str, path: Option<&Path>, e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, ref msg) = e {
        match f.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                return StoreError::Locked {
                    context: context.into(),
                };
            }
            ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt => {
                return StoreError::NotOurs {
                    path: path
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "a database".into()),
                    detail: msg
                        .clone()
                        .unwrap_or_else(|| "file is not a database".into()),
                };
            }
            ErrorCode::DiskFull => {
                return StoreError::DiskFull {
                    context: context.into(),
                };
            }
            ErrorCode::SystemIoFailure => {
                return StoreError::DiskFault {
                    context: context.into(),
                    source: e,
                };
            }
            _ => {}
        }
    }
    StoreError::Sqlite {
        context: context.into(),
        source: e,
    }
}

/// Gives a backend error its context: SQLite's through [`classify`];
/// PostgreSQL's lost connection is "unreachable" (exit 4), a lock or
/// serialization conflict is "locked" (exit 4), anything else a query error.
pub fn classify_db(context: &str, e: db::DbError) -> StoreError {
    match e {
        db::DbError::Sqlite(e) => classify(context, None, e),
        db::DbError::Pg(e) => {
            use postgres::error::SqlState;
            match e.code() {
                None if e.is_closed() || e.as_db_error().is_none() => {
                    StoreError::Pg(pg::PgError::Unreachable {
                        url: "the store".into(),
                        detail: format!("{} while {context}", pg::error_detail(&e)),
                    })
                }
                Some(c)
                    if *c == SqlState::T_R_SERIALIZATION_FAILURE
                        || *c == SqlState::T_R_DEADLOCK_DETECTED
                        || *c == SqlState::LOCK_NOT_AVAILABLE =>
                {
                    StoreError::Locked {
                        context: context.into(),
                    }
                }
                _ => StoreError::Pg(pg::query_error(context, &e)),
            }
        }
        db::DbError::Column(i, detail) => StoreError::Pg(pg::PgError::Query {
            context: context.into(),
            detail: format!("column {i}: {detail}"),
        }),
        db::DbError::NoRow => classify(context, None, rusqlite::Error::QueryReturnedNoRows),
        db::DbError::Fenced { agent, token } => StoreError::LeaseLost {
            agent,
            token,
            context: context.into(),
        },
    }
}

impl<T> Ctx<T> for std::result::Result<T, db::DbError> {
    fn ctx(self, context: &str) -> Result<T> {
        self.map_err(|e| classify_db(context, e))
    }
}

/// `.ctx("doing x")?` on rusqlite results.
pub trait Ctx<T> {
    fn ctx(self, context: &str) -> Result<T>;
}

impl<T> Ctx<T> for std::result::Result<T, rusqlite::Error> {
    fn ctx(self, context: &str) -> Result<T> {
        self.map_err(|e| classify(context, None, e))
    }
}

/// Creates `path` with mode 0600 if it does not exist, so that SQLite (and
/// its -wal/-shm files, which copy the mode) never widen it.
pub(crate) fn create_private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Io {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

/// Opens one database file with the project's connection settings.
pub(crate) fn open_conn(path: &Path) -> Result<Connection> {
    create_private_file(path)?;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| classify("opening", Some(path), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| classify("setting busy_timeout", Some(path), e))?;
    // Short-lived processes open and close these files on every command:
    // without this, each last close checkpoints, fsyncs and deletes the WAL.
    // Checkpoints still happen as writes grow the WAL (wal_autocheckpoint).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )
    .map_err(|e| classify("configuring", Some(path), e))?;
    set_pragmas(&conn, "main", path)?;
    Ok(conn)
}

fn set_pragmas(conn: &Connection, schema: &str, path: &Path) -> Result<()> {
    let mode: String = conn
        .query_row(&format!("PRAGMA {schema}.journal_mode=WAL"), [], |r| {
            r.get(0)
        })
        .map_err(|e| classify("opening", Some(path), e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NotOurs {
            path: path.display().to_string(),
            detail: format!("journal mode stays '{mode}'"),
        });
    }
    conn.execute_batch(&format!("PRAGMA {schema}.synchronous=NORMAL;"))
        .map_err(|e| classify("opening", Some(path), e))?;
    Ok(())
}

fn not_ours(e: StoreError, path: &Path) -> StoreError {
    match e {
        StoreError::NotOurs { detail, .. } => StoreError::NotOurs {
            path: path.display().to_string(),
            detail,
        },
        other => other,
    }
}

/// Whether this process exits right after its one piece of work (set by
/// `runner turn`; never by `serve`, which runs turn after turn).
static EXITS_AFTER_WORK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says that this process exits right after its one piece of work: SQLite
/// connections handed to [`close_or_leave`] are then left for the exit.
pub fn exits_after_work() {
    EXITS_AFTER_WORK.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Closes a connection that is done with — or, in a process that exits right
/// after its work ([`exits_after_work`]), leaves a SQLite one to the exit:
/// closing finalizes every cached statement and frees the parsed schema
/// (~100K instructions a file), for a process about to end anyway. Callers
/// hand over only idle connections (no transaction open); with no
/// checkpoint on close (`open_conn`), a closed connection and one ended by
/// the exit leave the same files and locks behind. PostgreSQL connections
/// are always dropped (kept for reuse, or said goodbye to).
pub fn close_or_leave(conn: Db) {
    if let Some(c) = conn.sqlite() {
        trim_wals(c);
    }
    if conn.sqlite().is_some() && EXITS_AFTER_WORK.load(std::sync::atomic::Ordering::Relaxed) {
        std::mem::forget(conn);
    } else {
        drop(conn);
    }
}

/// A WAL longer than this is checkpointed and truncated when its
/// connection is let go after a turn ([`close_or_leave`]).
pub const WAL_TRIM_BYTES: u64 = 1 << 20;

/// A WAL longer than this is checkpointed and truncated while a turn's
/// agent runs ([`trim_wals_early`]), where the runner mostly waits: the
/// next process to open the file then rebuilds the index of at most ~64
/// frames instead of up to 256 (the 1 MiB of [`WAL_TRIM_BYTES`], which
/// stays the limit where a trim would delay the end of a turn).
pub const WAL_TRIM_EARLY_BYTES: u64 = 256 << 10;

/// [`trim_wals`] with the lower limit of [`WAL_TRIM_EARLY_BYTES`], for a
/// connection whose turn has its agent running (SQLite only).
pub fn trim_wals_early(db: &Db) {
    if let Some(c) = db.sqlite() {
        trim_wals_over(c, WAL_TRIM_EARLY_BYTES);
    }
}

/// Checkpoints and truncates the WALs of `c` (its main database and, for
/// `sessions.db`, the attached `mail.db`) that grew past [`WAL_TRIM_BYTES`].
/// Why: every runner process is usually the first to open a file, and
/// SQLite then rebuilds the WAL's index by reading the whole WAL — a cost
/// that grew with every turn until the 1000-page auto-checkpoint (at the
/// 61st `--lines 0` turn of an agent: 13.6M instructions instead of 5.6M,
/// with 12 MB of WAL read). A checkpoint alone would not help: its frames
/// stay valid and are read again; TRUNCATE empties the file. It never waits:
/// with a reader in the WAL it does what it can and the file stays (the
/// next turn tries again).
fn trim_wals(c: &Connection) {
    trim_wals_over(c, WAL_TRIM_BYTES);
}

/// [`trim_wals`] for WALs longer than `limit` bytes.
pub(crate) fn trim_wals_over(c: &Connection, limit: u64) {
    let Some(main) = c.path().filter(|p| !p.is_empty()).map(Path::new) else {
        return;
    };
    let mut dbs = vec![("main", main.to_path_buf())];
    if main.file_name().is_some_and(|n| n == "sessions.db")
        && let Some(dir) = main.parent()
    {
        dbs.push(("mail", dir.join("mail.db")));
    }
    let long = |p: &Path| {
        let mut wal = p.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::metadata(wal).is_ok_and(|m| m.len() > limit)
    };
    let todo: Vec<&str> = dbs
        .iter()
        .filter(|(_, p)| long(p))
        .map(|(s, _)| *s)
        .collect();
    if todo.is_empty() || c.busy_timeout(Duration::ZERO).is_err() {
        return;
    }
    for schema in todo {
        let _ = c.query_row(
            &format!("PRAGMA {schema}.wal_checkpoint(TRUNCATE)"),
            [],
            |_| Ok(()),
        );
    }
    let _ = c.busy_timeout(BUSY_TIMEOUT);
}

/// Runs `f` in a transaction (`BEGIN IMMEDIATE` on SQLite).
pub fn immediate<T>(db: &mut Db, context: &str, f: impl FnOnce(&Db) -> Result<T>) -> Result<T> {
    db.transaction(|tx| f(tx).map_err(Wrapped::Store))
        .map_err(|e| match e {
            Wrapped::Store(e) => e,
            Wrapped::Db(e) => classify_db(context, e),
        })
}

/// A `BEGIN IMMEDIATE` transaction on a bare SQLite connection (schema
/// migrations, overstory's `metrics.db`: SQLite only).
pub(crate) fn immediate_sqlite<T>(
    conn: &mut Connection,
    context: &str,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>,
) -> Result<T> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .ctx(context)?;
    let out = f(&tx)?;
    tx.commit().ctx(context)?;
    Ok(out)
}

/// A transaction's error: the closure's, or beginning/committing's.
enum Wrapped {
    Store(StoreError),
    Db(db::DbError),
}

impl From<db::DbError> for Wrapped {
    fn from(e: db::DbError) -> Self {
        Wrapped::Db(e)
    }
}

/// Where the tables live (SPEC §12.1): the SQLite files under the root, or
/// one schema of a PostgreSQL database.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Backend {
    #[default]
    Sqlite,
    Postgres {
        url: String,
        schema: String,
    },
}

impl Backend {
    /// Reads a store URL: `sqlite` or a `postgres://` URL; anything else is
    /// refused (the message names the URL with its password redacted).
    pub fn parse(url: &str, schema: &str) -> std::result::Result<Backend, String> {
        if url == "sqlite" {
            return Ok(Backend::Sqlite);
        }
        if !pg::is_postgres(url) {
            return Err(format!(
                "invalid store URL {}: use sqlite or postgres://USER@HOST[:PORT]/DATABASE",
                pg::redact(url)
            ));
        }
        pg::check_schema_name(schema)?;
        Ok(Backend::Postgres {
            url: url.into(),
            schema: schema.into(),
        })
    }

    /// `sqlite`, or the URL (password redacted) and schema.
    pub fn describe(&self) -> String {
        match self {
            Backend::Sqlite => "sqlite".into(),
            Backend::Postgres { url, schema } => {
                format!("{} schema {schema}", pg::redact(url))
            }
        }
    }

    /// Connects to PostgreSQL and migrates the schema (SQLite: `None`).
    fn connect_pg(&self) -> Result<Option<Db>> {
        let Backend::Postgres { url, schema } = self else {
            return Ok(None);
        };
        // A process migrates a schema once; later opens (serve's polls, a
        // follow) only connect.
        static MIGRATED: std::sync::Mutex<Vec<(String, String)>> =
            std::sync::Mutex::new(Vec::new());
        let key = (url.clone(), schema.clone());
        let spare_key = format!("{schema}\n{url}");
        if let Some(db) = db::take_spare(&spare_key) {
            return Ok(Some(db));
        }
        let client = db::off_runtime(|| -> std::result::Result<_, pg::PgError> {
            let mut client = pg::connect(url, schema)?;
            let mut migrated = MIGRATED.lock().unwrap_or_else(|e| e.into_inner());
            if !migrated.contains(&key) {
                pg::schema::migrate(&mut client, url, schema)?;
                migrated.push(key);
            }
            Ok(client)
        })?;
        Ok(Some(Db::pg_reusable(client, spare_key)))
    }
}

/// The main store: `sessions.db` with `mail.db` attached as `mail`, so that
/// the end of a turn (state, claims, `worker_died`, turn row) is one
/// transaction — or, in fleet mode, one PostgreSQL schema holding them all.
pub struct Store {
    pub conn: Db,
    pub root: PathBuf,
}

impl Store {
    /// Opens (creating and migrating as needed) `sessions.db` and `mail.db`
    /// under `root`, which must exist.
    pub fn open(root: &Path) -> Result<Store> {
        Store::open_backend(root, &Backend::Sqlite)
    }

    /// Opens the store `backend` names for `root`.
    pub fn open_backend(root: &Path, backend: &Backend) -> Result<Store> {
        if let Some(conn) = backend.connect_pg()? {
            return Ok(Store {
                conn,
                root: root.to_path_buf(),
            });
        }
        let sessions_path = root.join("sessions.db");
        let mail_path = root.join("mail.db");
        let mut conn = open_conn(&sessions_path)?;
        schema::migrate_sessions(&mut conn, &sessions_path)?;
        create_private_file(&mail_path)?;
        conn.execute("ATTACH DATABASE ?1 AS mail", [mail_path.to_string_lossy()])
            .map_err(|e| classify("attaching mail.db", Some(&mail_path), e))?;
        if !schema::mail_up_to_date(&conn).map_err(|e| not_ours(e, &mail_path))? {
            // Migrate on a connection of its own, where `messages` means mail.db's.
            let mut mail = open_conn(&mail_path)?;
            schema::migrate_mail(&mut mail, &mail_path)?;
        }
        set_pragmas(&conn, "mail", &mail_path)?;
        Ok(Store {
            conn: Db::Sqlite(conn),
            root: root.to_path_buf(),
        })
    }

    pub fn tx<T>(&mut self, context: &str, f: impl FnOnce(&Db) -> Result<T>) -> Result<T> {
        immediate(&mut self.conn, context, f)
    }
}
