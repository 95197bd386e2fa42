//! PostgreSQL, for fleet mode (SPEC §12): connecting (libpq URL or
//! key=value syntax, passwords never printed), the versioned schema and its
//! migrations, and `runner store migrate --to URL`, which copies a SQLite
//! root's tables into an empty schema.
//!
//! Invariants: every message that names a URL names it through [`redact`];
//! migrations run in one transaction under an advisory lock, so hosts that
//! open at once migrate once; a schema that holds tables but no
//! `runner_meta` is not ours and is never written; a schema from a newer
//! runner is refused; a server out of connection slots is retried briefly,
//! then reported as busy. Queries go through the store seam
//! ([`super::db::Db`]); this module only connects, migrates, copies, and
//! listens for mail notifications ([`listen`], SPEC §12.4).

pub mod copy;
pub mod listen;
pub mod schema;

use std::str::FromStr;
use std::time::Duration;

use postgres::config::SslMode;
use postgres::error::SqlState;
use postgres::{Client, Config, NoTls};

/// Errors of the PostgreSQL layer. Exit codes: see `error::exit_code`.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid store URL {url}: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("cannot reach PostgreSQL at {url}: {detail} (is the server running? try again later)")]
    Unreachable { url: String, detail: String },
    #[error("PostgreSQL at {url} refused the connection: {detail}")]
    Refused { url: String, detail: String },
    #[error(
        "schema {schema} at {url} is not a runner store ({detail}); pick another with --schema"
    )]
    NotOurs {
        url: String,
        schema: String,
        detail: String,
    },
    #[error(
        "schema {schema} at {url} is at version {found}, newer than this runner's {ours}: upgrade runner"
    )]
    Newer {
        url: String,
        schema: String,
        found: i64,
        ours: i64,
    },
    #[error("schema {schema} at {url} already holds data ({detail}); migrate into an empty schema")]
    NotEmpty {
        url: String,
        schema: String,
        detail: String,
    },
    #[error("PostgreSQL error while {context}: {detail}")]
    Query { context: String, detail: String },
}

pub type Result<T> = std::result::Result<T, PgError>;

/// Is this store URL a PostgreSQL one?
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` with any password replaced by `***`: the URL's userinfo password,
/// a `password=` query parameter, or a `password=` key of the key=value form.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map(|i| rest_start + i)
            .unwrap_or(out.len());
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let start = rest_start + colon + 1;
                out.replace_range(start..rest_start + at, "***");
            }
        }
    }
    // `password=…` as a query parameter or a key=value pair.
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("password=") {
        let boundary_ok = i == 0 || matches!(rest.as_bytes()[i - 1], b'?' | b'&' | b' ');
        result.push_str(&rest[..i + "password=".len()]);
        rest = &rest[i + "password=".len()..];
        if boundary_ok {
            let end = rest.find(['&', ' ']).unwrap_or(rest.len());
            result.push_str("***");
            rest = &rest[end..];
        }
    }
    result.push_str(rest);
    result
}

/// Checks a schema name: letters, digits and `_`, starting with a letter,
/// at most 63 bytes (PostgreSQL's identifier limit).
pub fn check_schema_name(schema: &str) -> std::result::Result<(), String> {
    let b = schema.as_bytes();
    if !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
    {
        Ok(())
    } else {
        Err(format!(
            "invalid schema name '{}': use letters, digits and _, starting with a letter",
            schema.escape_debug()
        ))
    }
}

/// Connects to `url` (connect timeout 5 s unless the URL sets one; TCP
/// keepalives on) and sets the session's `search_path` to `schema`.
pub fn connect(url: &str, schema: &str) -> Result<Client> {
    let shown = redact(url);
    let bad = |detail: String| PgError::BadUrl {
        url: shown.clone(),
        detail,
    };
    check_schema_name(schema).map_err(bad)?;
    if !is_postgres(url) {
        return Err(bad("use postgres://USER@HOST[:PORT]/DATABASE".into()));
    }
    let mut config = Config::from_str(url).map_err(|e| bad(e.to_string()))?;
    if config.get_ssl_mode() == SslMode::Require {
        return Err(bad(
            "sslmode=require needs TLS, which this build of runner does not include; use sslmode=disable or prefer on a trusted network"
                .into(),
        ));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    let mut client = connect_retrying(&config).map_err(|e| match e.as_db_error() {
        // Out of connection slots: busy, like a server that does not answer.
        Some(db) if *db.code() == SqlState::TOO_MANY_CONNECTIONS => PgError::Unreachable {
            url: shown.clone(),
            detail: db.message().to_string(),
        },
        // The server answered: bad credentials, an unknown database…
        Some(db) => PgError::Refused {
            url: shown.clone(),
            detail: db.message().to_string(),
        },
        None => PgError::Unreachable {
            url: shown.clone(),
            detail: error_detail(&e),
        },
    })?;
    // A frozen host must not hold row locks the fleet sweep's SKIP LOCKED
    // would skip forever (SPEC §12.3): idle transactions end below `grace`.
    client
        .batch_execute(&format!(
            "SET search_path TO \"{schema}\"; SET idle_in_transaction_session_timeout = {}",
            IDLE_TX_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed)
        ))
        .map_err(|e| query_error("setting the search path", &e))?;
    Ok(client)
}

/// `idle_in_transaction_session_timeout` of every connection, in ms.
static IDLE_TX_TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(10_000);

/// Sets the idle-in-transaction timeout of later connections: half the
/// fleet's `grace`, between 200 ms and 30 s.
pub fn set_idle_in_transaction_timeout(grace: Duration) {
    let ms = (grace.as_millis() as u64 / 2).clamp(200, 30_000);
    IDLE_TX_TIMEOUT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// How long a connection is retried while the server is out of connection
/// slots (a burst of short-lived commands) before giving up as busy.
const SLOTS_WAIT: Duration = Duration::from_secs(20);

/// Connects, retrying with backoff while the server has no free slot.
fn connect_retrying(config: &Config) -> std::result::Result<Client, postgres::Error> {
    let until = std::time::Instant::now() + SLOTS_WAIT;
    let mut pause = Duration::from_millis(20);
    loop {
        match config.connect(NoTls) {
            Err(e)
                if e.code() == Some(&SqlState::TOO_MANY_CONNECTIONS)
                    && std::time::Instant::now() + pause < until =>
            {
                // Jitter, so a burst of waiting commands does not retry in step.
                let jitter = u64::from(crate::os::random_alnum(1).as_bytes()[0] % 16);
                std::thread::sleep(
                    pause + Duration::from_millis(jitter * pause.as_millis() as u64 / 16),
                );
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// The most specific message of a `postgres::Error` (its source chain).
pub fn error_detail(e: &postgres::Error) -> String {
    use std::error::Error as _;
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    match e.source() {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

pub fn query_error(context: &str, e: &postgres::Error) -> PgError {
    PgError::Query {
        context: context.into(),
        detail: error_detail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        for (url, want) in [
            ("postgres://u:secret@h/db", "postgres://u:***@h/db"),
            (
                "postgresql://u:s%40c@h:5432/db?x=1",
                "postgresql://u:***@h:5432/db?x=1",
            ),
            (
                "postgres://u@h/db?password=secret&sslmode=disable",
                "postgres://u@h/db?password=***&sslmode=disable",
            ),
            (
                "host=h user=u password=secret dbname=d",
                "host=h user=u password=*** dbname=d",
            ),
            ("postgres://h/db", "postgres://h/db"),
            (
                "postgres://u:p@h/db?password=q",
                "postgres://u:***@h/db?password=***",
            ),
        ] {
            assert_eq!(redact(url), want, "{url}");
            assert!(!redact(url).contains("secret"));
        }
    }

    #[test]
    fn schema_names_are_identifiers() {
        assert!(check_schema_name("runner").is_ok());
        assert!(check_schema_name("t_123").is_ok());
        for bad in ["", "1x", "a-b", "a\"b", "a b", &"x".repeat(64)] {
            assert!(check_schema_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_url_is_an_input_error_naming_it_without_the_password() {
        let e = connect("mysql://u:pw@h/db", "runner").err().unwrap();
        assert!(matches!(e, PgError::BadUrl { .. }));
        assert!(!e.to_string().contains("pw@"), "{e}");
        let e = connect("postgres://u:pw@h/db?sslmode=require", "runner")
            .err()
            .unwrap();
        assert!(e.to_string().contains("sslmode=require"), "{e}");
    }
}
