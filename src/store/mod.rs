//! The three SQLite stores: `sessions.db` (sessions, turns), `mail.db`
//! (messages and their claims) and `events.db` (events).
//!
//! Owns schemas, idempotent migrations (`PRAGMA user_version`), connection
//! settings (WAL, `synchronous=NORMAL`, 5 s busy timeout) and every SQL
//! statement of the project. Invariants: table and column names stay
//! overstory's, we only add; an existing overstory database is upgraded in
//! place; a file that is not one of ours is reported, never overwritten;
//! multi-statement writes run in `BEGIN IMMEDIATE` transactions. Non-goal:
//! deciding anything — callers pass in what to write.

pub mod events;
pub mod health;
pub mod mail;
pub mod metrics;
pub mod pg;
pub mod schema;
pub mod sessions;
pub mod turns;
pub mod views;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

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

/// Runs `f` in a `BEGIN IMMEDIATE` transaction.
pub fn immediate<T>(
    conn: &mut Connection,
    context: &str,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>,
) -> Result<T> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .ctx(context)?;
    let out = f(&tx)?;
    tx.commit().ctx(context)?;
    Ok(out)
}

/// The main store: `sessions.db` with `mail.db` attached as `mail`, so that
/// the end of a turn (state, claims, `worker_died`, turn row) is one
/// transaction.
pub struct Store {
    pub conn: Connection,
    pub root: PathBuf,
}

impl Store {
    /// Opens (creating and migrating as needed) `sessions.db` and `mail.db`
    /// under `root`, which must exist.
    pub fn open(root: &Path) -> Result<Store> {
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
            conn,
            root: root.to_path_buf(),
        })
    }

    pub fn tx<T>(
        &mut self,
        context: &str,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        immediate(&mut self.conn, context, f)
    }
}
