//! The store seam: [`Db`], one connection to either backend — a SQLite file
//! (the default, SPEC §1) or a PostgreSQL schema (fleet mode, SPEC §12).
//!
//! Every statement of the project is written once, in the SQL both
//! backends accept, with SQLite's `?N` placeholders; on PostgreSQL they are
//! rewritten to `$N` (outside string literals) and prepared statements are
//! cached per connection. Values cross the seam as [`Value`] (bound) and
//! [`Cell`] (read): integers, reals, text and NULL, converted to whatever
//! column type PostgreSQL inferred (an `i64` binds to an `INTEGER` column as
//! `int4`). The few places where the dialects really differ ask
//! [`Db::is_pg`] (e.g. `FOR UPDATE SKIP LOCKED` on claims).
//!
//! Why one type and not a trait per concern with two implementations: the
//! rules (which rows a CAS may change, which mail a claim takes, what the
//! sweep releases) live in the SQL, and writing them twice would let the
//! backends drift. Invariants: transactions are `BEGIN IMMEDIATE` on SQLite
//! and `BEGIN` (read committed) on PostgreSQL, committed only when the
//! closure succeeds and rolled back otherwise; the synchronous PostgreSQL
//! client is only ever driven outside the async runtime's context
//! ([`off_runtime`]), as it runs a runtime of its own. Non-goal: an ORM.
//!
//! Fencing (SPEC §12.3): a PostgreSQL connection may carry a [`Fence`] — the
//! agent and the lease token its turn holds. Then every transaction first
//! checks, under `FOR KEY SHARE` on the lease row, that the token is still
//! current and unexpired by the database's clock, and every `execute`
//! outside a transaction runs in one that checks; a superseded token is
//! [`DbError::Fenced`], nothing is written, and the fence's `lost` signal
//! fires. `FOR KEY SHARE` lets renewals through but holds off the fleet
//! sweep's `FOR UPDATE` until the write commits, so a write is either
//! before the fence moved or refused.

use std::cell::RefCell;
use std::collections::HashMap;

use postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use rusqlite::types::{ToSqlOutput, ValueRef};

/// A value bound to a placeholder.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
}

/// Anything that binds to a placeholder.
pub trait ToValue {
    fn to_value(&self) -> Value<'_>;
}

impl ToValue for str {
    fn to_value(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value<'_> {
        Value::Text(self)
    }
}
impl ToValue for i64 {
    fn to_value(&self) -> Value<'_> {
        Value::Int(*self)
    }
}
impl ToValue for f64 {
    fn to_value(&self) -> Value<'_> {
        Value::Real(*self)
    }
}
impl ToValue for bool {
    fn to_value(&self) -> Value<'_> {
        Value::Int(*self as i64)
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value<'_> {
        (**self).to_value()
    }
}
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value<'_> {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null,
        }
    }
}

/// `params![a, b]`: the placeholders' values, in order.
#[macro_export]
macro_rules! db_params {
    ($($v:expr),* $(,)?) => {
        &[$(&$v as &dyn $crate::store::db::ToValue),*] as &[&dyn $crate::store::db::ToValue]
    };
}
pub use db_params as params;

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(i),
            Value::Real(f) => ValueRef::Real(f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
        }))
    }
}

type BoxError = Box<dyn std::error::Error + Sync + Send>;

impl ToSql for Value<'_> {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, BoxError> {
        match *self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT2 => i16::try_from(i)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(i)?.to_sql(ty, out),
                Type::INT8 => i.to_sql(ty, out),
                Type::FLOAT4 | Type::FLOAT8 => (i as f64).to_sql(&Type::FLOAT8, out),
                Type::BOOL => (i != 0).to_sql(ty, out),
                _ => i.to_string().as_str().to_sql(ty, out),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT4 => (f as f32).to_sql(ty, out),
                Type::FLOAT8 => f.to_sql(ty, out),
                _ => f.to_string().as_str().to_sql(ty, out),
            },
            Value::Text(s) => s.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A value read from a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl<'a> FromSql<'a> for Cell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(match *ty {
            Type::INT2 => Cell::Int(i16::from_sql(ty, raw)? as i64),
            Type::INT4 => Cell::Int(i32::from_sql(ty, raw)? as i64),
            Type::INT8 => Cell::Int(i64::from_sql(ty, raw)?),
            Type::FLOAT4 => Cell::Real(f32::from_sql(ty, raw)? as f64),
            Type::FLOAT8 => Cell::Real(f64::from_sql(ty, raw)?),
            Type::BOOL => Cell::Int(bool::from_sql(ty, raw)? as i64),
            _ => Cell::Text(String::from_sql(ty, raw)?),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Cell::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

impl From<ValueRef<'_>> for Cell {
    fn from(v: ValueRef<'_>) -> Cell {
        match v {
            ValueRef::Null => Cell::Null,
            ValueRef::Integer(i) => Cell::Int(i),
            ValueRef::Real(f) => Cell::Real(f),
            ValueRef::Text(t) | ValueRef::Blob(t) => {
                Cell::Text(String::from_utf8_lossy(t).into_owned())
            }
        }
    }
}

/// A Rust type read from a [`Cell`].
pub trait FromCell: Sized {
    fn from_cell(c: Cell) -> Result<Self, String>;
}

impl FromCell for i64 {
    fn from_cell(c: Cell) -> Result<Self, String> {
        match c {
            Cell::Int(i) => Ok(i),
            Cell::Real(f) if f.fract() == 0.0 => Ok(f as i64),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}
impl FromCell for f64 {
    fn from_cell(c: Cell) -> Result<Self, String> {
        match c {
            Cell::Int(i) => Ok(i as f64),
            Cell::Real(f) => Ok(f),
            other => Err(format!("expected a number, found {other:?}")),
        }
    }
}
impl FromCell for String {
    fn from_cell(c: Cell) -> Result<Self, String> {
        match c {
            Cell::Text(s) => Ok(s),
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}
impl FromCell for bool {
    fn from_cell(c: Cell) -> Result<Self, String> {
        i64::from_cell(c).map(|i| i != 0)
    }
}
impl FromCell for Cell {
    fn from_cell(c: Cell) -> Result<Self, String> {
        Ok(c)
    }
}
impl<T: FromCell> FromCell for Option<T> {
    fn from_cell(c: Cell) -> Result<Self, String> {
        match c {
            Cell::Null => Ok(None),
            c => T::from_cell(c).map(Some),
        }
    }
}

/// An error of either backend, before it is given its context.
#[derive(Debug)]
pub enum DbError {
    Sqlite(rusqlite::Error),
    Pg(postgres::Error),
    /// A column that did not hold what the code reads.
    Column(usize, String),
    /// `query_row` found no row.
    NoRow,
    /// The connection's lease token was superseded or expired (SPEC §12.3):
    /// nothing was written.
    Fenced {
        agent: String,
        token: i64,
    },
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::Sqlite(e)
    }
}
impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> Self {
        DbError::Pg(e)
    }
}

pub type DbResult<T> = std::result::Result<T, DbError>;

/// One row of a result.
pub enum Row<'a> {
    Sqlite(&'a rusqlite::Row<'a>),
    Pg(&'a postgres::Row),
}

impl Row<'_> {
    /// Columns in the row.
    pub fn len(&self) -> usize {
        match self {
            Row::Sqlite(r) => r.as_ref().column_count(),
            Row::Pg(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get<T: FromCell>(&self, i: usize) -> DbResult<T> {
        let cell = match self {
            Row::Sqlite(r) => Cell::from(r.get_ref(i)?),
            Row::Pg(r) => r.try_get::<_, Cell>(i)?,
        };
        T::from_cell(cell).map_err(|e| DbError::Column(i, e))
    }
}

/// Runs `f`, which drives the synchronous PostgreSQL client, outside the
/// async runtime's context: that client blocks on a runtime of its own,
/// which tokio forbids inside another one.
pub fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The lease a turn's writes are conditional on (SPEC §12.3).
#[derive(Debug, Clone)]
pub struct Fence {
    pub agent: String,
    pub token: i64,
    /// Set to `true` when a write finds the token superseded.
    pub lost: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Fence {
    /// The check that begins every fenced transaction: one row while the
    /// token is current and unexpired, none once fenced. `FOR KEY SHARE`
    /// holds off the sweep's `FOR UPDATE` until the transaction ends.
    /// Literals, not parameters, so it can share a round trip with other
    /// statements: the agent name is of the §1 pattern (a quote is doubled
    /// anyway), the token a number.
    pub fn check_sql(&self) -> String {
        format!(
            "SELECT 1 FROM leases WHERE agent_name = '{}' AND token = {} AND expires_at > now() FOR KEY SHARE",
            self.agent.replace('\'', "''"),
            self.token
        )
    }

    /// Reads the answer to a statement list that ended with
    /// [`Fence::check_sql`]: no row means fenced — `lost` fires and the
    /// caller must roll back.
    pub fn verdict(&self, msgs: &[postgres::SimpleQueryMessage]) -> DbResult<()> {
        let rows = msgs
            .iter()
            .filter(|m| matches!(m, postgres::SimpleQueryMessage::Row(_)))
            .count();
        if rows == 0 {
            self.lost.send_replace(true);
            return Err(DbError::Fenced {
                agent: self.agent.clone(),
                token: self.token,
            });
        }
        Ok(())
    }
}

/// A PostgreSQL connection with its statement cache.
pub struct PgConn {
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
    fence: Option<Fence>,
    in_tx: bool,
    /// The store it belongs to (URL and schema), when it may be kept for
    /// reuse by this process once dropped ([`take_spare`]).
    spare_key: Option<String>,
}

/// Store connections this process dropped, kept for its next open of the
/// same store: a command opens the store more than once (the host check,
/// the turn, after waiting for the lease) and `serve` opens it for every
/// turn, each a connection (and authentication) otherwise. Only idle ones
/// are kept, fence lifted, statement cache and all.
static SPARE: std::sync::Mutex<Vec<PgConn>> = std::sync::Mutex::new(Vec::new());

/// How many dropped connections are kept at most.
const SPARE_MAX: usize = 4;

/// A kept connection to the store `key`, if one is idle and open.
pub fn take_spare(key: &str) -> Option<Db> {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    while let Some(i) = spare
        .iter()
        .position(|c| c.spare_key.as_deref() == Some(key))
    {
        let c = spare.swap_remove(i);
        if c.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Some(Db::Pg(Box::new(RefCell::new(c))));
        }
    }
    None
}

impl PgConn {
    pub fn new(client: postgres::Client) -> PgConn {
        PgConn {
            client: Some(client),
            statements: HashMap::new(),
            fence: None,
            in_tx: false,
            spare_key: None,
        }
    }

    /// `BEGIN` and, when fenced, the
    /// fence check — one round trip. Fenced: [`DbError::Fenced`] (the
    /// caller rolls back) and the fence's `lost` fires.
    fn begin(&mut self) -> DbResult<()> {
        let mut sql = String::from("BEGIN");
        self.in_tx = true;
        let Some(f) = self.fence.clone() else {
            return Ok(off_runtime(|| self.client().batch_execute(&sql))?);
        };
        sql.push_str("; ");
        sql.push_str(&f.check_sql());
        let msgs = off_runtime(|| self.client().simple_query(&sql))?;
        f.verdict(&msgs)
    }

    pub fn client(&mut self) -> &mut postgres::Client {
        self.client.as_mut().expect("client present until drop")
    }

    fn statement(&mut self, sql: &str) -> DbResult<postgres::Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let translated = dollar_placeholders(sql);
        let st = off_runtime(|| self.client().prepare(&translated))?;
        self.statements.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    fn query(&mut self, sql: &str, params: &[&dyn ToValue]) -> DbResult<Vec<postgres::Row>> {
        let st = self.statement(sql)?;
        let values: Vec<Value<'_>> = params.iter().map(|p| p.to_value()).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        Ok(off_runtime(|| self.client().query(&st, &refs))?)
    }

    fn execute(&mut self, sql: &str, params: &[&dyn ToValue]) -> DbResult<usize> {
        if self.fence.is_some() && !self.in_tx {
            // A fenced write outside a transaction: make it one that checks.
            let r = self
                .begin()
                .and_then(|()| self.execute(sql, params))
                .and_then(|n| {
                    off_runtime(|| self.client().batch_execute("COMMIT"))?;
                    Ok(n)
                });
            self.in_tx = false;
            if r.is_err() {
                let _ = off_runtime(|| self.client().batch_execute("ROLLBACK"));
            }
            return r;
        }
        let st = self.statement(sql)?;
        let values: Vec<Value<'_>> = params.iter().map(|p| p.to_value()).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        Ok(off_runtime(|| self.client().execute(&st, &refs))? as usize)
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        let client = self.client.take();
        let client = match (self.spare_key.take(), client) {
            (Some(key), Some(c)) if !self.in_tx && !c.is_closed() => {
                let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
                if spare.len() < SPARE_MAX {
                    spare.push(PgConn {
                        client: Some(c),
                        statements: std::mem::take(&mut self.statements),
                        fence: None,
                        in_tx: false,
                        spare_key: Some(key),
                    });
                    None
                } else {
                    Some(c)
                }
            }
            (_, c) => c,
        };
        // The client owns a runtime, which may not be dropped inside another.
        off_runtime(move || drop(client));
    }
}

/// `?N` → `$N`, leaving string literals and quoted identifiers alone.
pub fn dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '?' && chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                out.push('$');
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    out
}

/// Runs a statement without parameters through the connection's statement
/// cache (`BEGIN IMMEDIATE`, `COMMIT`: prepared once per connection, not
/// once per transaction).
fn sqlite_cached(c: &rusqlite::Connection, sql: &str) -> DbResult<()> {
    c.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// One connection to the store, SQLite or PostgreSQL.
pub enum Db {
    Sqlite(rusqlite::Connection),
    Pg(Box<RefCell<PgConn>>),
}

impl Db {
    pub fn pg(client: postgres::Client) -> Db {
        Db::Pg(Box::new(RefCell::new(PgConn::new(client))))
    }

    /// A connection to the store `key` that, once dropped idle, is kept
    /// for this process's next open of that store ([`take_spare`]).
    pub fn pg_reusable(client: postgres::Client, key: String) -> Db {
        let mut c = PgConn::new(client);
        c.spare_key = Some(key);
        Db::Pg(Box::new(RefCell::new(c)))
    }

    pub fn is_pg(&self) -> bool {
        matches!(self, Db::Pg(_))
    }

    /// Closes the connection for good: not kept for reuse (a process about
    /// to wait long must not hold a connection of the server's).
    pub fn close(self) {
        if let Db::Pg(p) = &self {
            p.borrow_mut().spare_key = None;
        }
    }

    /// Makes every later write on this PostgreSQL connection conditional on
    /// `fence` (SPEC §12.3); `None` lifts it. No-op on SQLite.
    pub fn set_fence(&self, fence: Option<Fence>) {
        if let Db::Pg(p) = self {
            p.borrow_mut().fence = fence;
        }
    }

    /// The fence of this PostgreSQL connection, if any.
    pub fn fence(&self) -> Option<Fence> {
        match self {
            Db::Pg(p) => p.borrow().fence.clone(),
            Db::Sqlite(_) => None,
        }
    }

    /// The SQLite connection (events' fast path, schema work).
    pub fn sqlite(&self) -> Option<&rusqlite::Connection> {
        match self {
            Db::Sqlite(c) => Some(c),
            Db::Pg(_) => None,
        }
    }

    pub fn execute(&self, sql: &str, params: &[&dyn ToValue]) -> DbResult<usize> {
        match self {
            Db::Sqlite(c) => {
                let values: Vec<Value<'_>> = params.iter().map(|p| p.to_value()).collect();
                Ok(c.prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(values.iter()))?)
            }
            Db::Pg(p) => p.borrow_mut().execute(sql, params),
        }
    }

    /// Every row, each mapped by `f`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        mut f: impl FnMut(&Row<'_>) -> DbResult<T>,
    ) -> DbResult<Vec<T>> {
        match self {
            Db::Sqlite(c) => {
                let values: Vec<Value<'_>> = params.iter().map(|p| p.to_value()).collect();
                let mut st = c.prepare_cached(sql)?;
                let mut rows = st.query(rusqlite::params_from_iter(values.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Sqlite(r))?);
                }
                Ok(out)
            }
            Db::Pg(p) => {
                let rows = p.borrow_mut().query(sql, params)?;
                rows.iter().map(|r| f(&Row::Pg(r))).collect()
            }
        }
    }

    /// The first row, if any.
    pub fn query_opt<T>(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        f: impl FnMut(&Row<'_>) -> DbResult<T>,
    ) -> DbResult<Option<T>> {
        Ok(self.query_map(sql, params, f)?.into_iter().next())
    }

    /// The first row; [`DbError::NoRow`] if there is none.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        f: impl FnMut(&Row<'_>) -> DbResult<T>,
    ) -> DbResult<T> {
        self.query_opt(sql, params, f)?.ok_or(DbError::NoRow)
    }

    /// PostgreSQL's `COPY … FROM STDIN` with `data` in COPY's text format;
    /// returns the rows copied. On SQLite, a column error (not supported).
    pub fn copy_in(&self, sql: &str, data: &[u8]) -> DbResult<u64> {
        use std::io::Write;
        match self {
            Db::Sqlite(_) => Err(DbError::Column(0, "COPY is PostgreSQL's".into())),
            Db::Pg(p) => {
                let mut p = p.borrow_mut();
                off_runtime(|| {
                    let mut w = p.client().copy_in(sql)?;
                    if let Err(e) = w.write_all(data) {
                        return Err(DbError::Column(0, format!("COPY: {e}")));
                    }
                    Ok(w.finish()?)
                })
            }
        }
    }

    /// Statements without parameters, separated by `;`.
    pub fn execute_batch(&self, sql: &str) -> DbResult<()> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Db::Pg(p) => {
                let mut p = p.borrow_mut();
                Ok(off_runtime(|| p.client().batch_execute(sql))?)
            }
        }
    }

    /// Runs `f` in a transaction: `BEGIN IMMEDIATE` on SQLite (the write
    /// lock up front), `BEGIN` on PostgreSQL.
    pub fn transaction<T, E: From<DbError>>(
        &mut self,
        f: impl FnOnce(&Db) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let fenced = match self {
            Db::Pg(p) => p.borrow_mut().begin(),
            Db::Sqlite(c) => sqlite_cached(c, "BEGIN IMMEDIATE"),
        };
        let r = match fenced {
            Ok(()) => f(self),
            Err(e) => Err(e.into()),
        };
        let r = match r {
            Ok(v) => match match self {
                Db::Sqlite(c) => sqlite_cached(c, "COMMIT"),
                Db::Pg(_) => self.execute_batch("COMMIT"),
            } {
                Ok(()) => Ok(v),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e),
        };
        if let Db::Pg(p) = self {
            p.borrow_mut().in_tx = false;
        }
        if r.is_err() {
            let _ = self.execute_batch("ROLLBACK");
        }
        r
    }

    /// Inserts a row; `false` when it collides with an existing key
    /// (nothing written), so the caller can draw a new id.
    pub fn insert_unless_duplicate(&self, sql: &str, params: &[&dyn ToValue]) -> DbResult<bool> {
        match self.execute(sql, params) {
            Ok(_) => Ok(true),
            Err(DbError::Sqlite(rusqlite::Error::SqliteFailure(f, _)))
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                Ok(false)
            }
            Err(DbError::Pg(e))
                if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_literals() {
        assert_eq!(
            dollar_placeholders("SELECT ?1, '?2', \"a?3\" WHERE x=?12 AND y LIKE '%?%'"),
            "SELECT $1, '?2', \"a?3\" WHERE x=$12 AND y LIKE '%?%'"
        );
    }

    #[test]
    fn a_sqlite_db_reads_and_writes_through_the_seam() {
        let mut db = Db::Sqlite(rusqlite::Connection::open_in_memory().unwrap());
        db.execute_batch("CREATE TABLE t (a INTEGER, b TEXT, c REAL)")
            .unwrap();
        let none: Option<String> = None;
        db.transaction(|db| {
            db.execute(
                "INSERT INTO t VALUES (?1, ?2, ?3)",
                params![7i64, "x", 1.5f64],
            )?;
            db.execute("INSERT INTO t VALUES (?1, ?2, NULL)", params![8i64, none])?;
            Ok::<_, DbError>(())
        })
        .unwrap();
        let rows: Vec<(i64, Option<String>)> = db
            .query_map("SELECT a, b FROM t ORDER BY a", params![], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(rows, vec![(7, Some("x".into())), (8, None)]);
        let failed: std::result::Result<(), DbError> = db.transaction(|db| {
            db.execute("INSERT INTO t VALUES (9, 'y', NULL)", params![])?;
            Err(DbError::NoRow)
        });
        assert!(failed.is_err());
        let n: i64 = db
            .query_row("SELECT COUNT(*) FROM t", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2, "a failed transaction is rolled back");
    }
}
