//! PostgreSQL (SPEC §12): the schema, its migrations and `runner store
//! migrate`, against the server on this machine. Each test works in a fresh
//! schema of its own and drops it afterwards.
//!
//! Without a reachable server these tests print that the PostgreSQL half
//! was not run and return; with `RUNNER_TEST_PG=require` (as `.ci/run`
//! sets) a missing server fails them. The server is
//! `RUNNER_TEST_PG_URL`, default `postgres://postgres@127.0.0.1:5432/test`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::{TestRoot, signal, wait_child, wait_for};

/// A fresh schema on the test server, dropped when this is dropped.
pub struct PgSchema {
    pub url: String,
    pub schema: String,
}

impl PgSchema {
    pub fn client(&self) -> postgres::Client {
        let mut c = connect(&self.url).unwrap();
        c.batch_execute(&format!("SET search_path TO \"{}\"", self.schema))
            .unwrap();
        c
    }

    pub fn i64(&self, sql: &str) -> i64 {
        self.client().query_one(sql, &[]).unwrap().get(0)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Ok(mut c) = connect(&self.url) {
            // A session left holding a lock (a test that failed with a
            // frozen runner) must not hang the suite: give up after 10 s.
            let _ = c.batch_execute(&format!(
                "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.schema
            ));
        }
    }
}

/// Connects to the test server. A server out of connection slots (the
/// reliability tests run hundreds of turns at once, each with its own
/// connection) is waited for, with a deadline; any other error is returned.
fn connect(url: &str) -> Result<postgres::Client, postgres::Error> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match postgres::Client::connect(url, postgres::NoTls) {
            Err(e)
                if e.code() == Some(&postgres::error::SqlState::TOO_MANY_CONNECTIONS)
                    && std::time::Instant::now() < until =>
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// A fresh schema; no server is a failure (the suite runs on PostgreSQL).
pub fn pg_required() -> PgSchema {
    pg_or_notice(true).expect("a server")
}

/// A fresh schema, or `None` (with a notice) when no server answers.
pub fn pg() -> Option<PgSchema> {
    pg_or_notice(std::env::var("RUNNER_TEST_PG").as_deref() == Ok("require"))
}

fn pg_or_notice(required: bool) -> Option<PgSchema> {
    static N: AtomicU32 = AtomicU32::new(0);
    let url = std::env::var("RUNNER_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    match connect(&url) {
        Ok(_) => Some(PgSchema {
            url,
            schema: format!(
                "it_{}_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos()
            ),
        }),
        Err(e) if required => {
            panic!(
                "PostgreSQL is required (RUNNER_TEST_PG=require or RUNNER_TEST_STORE=postgres) but {url} does not answer: {e}"
            )
        }
        Err(e) => {
            eprintln!(
                "NOTE: the PostgreSQL half of this test was NOT run: no server at {url} ({e}); set RUNNER_TEST_PG_URL, or RUNNER_TEST_PG=require to fail instead"
            );
            None
        }
    }
}

/// A root with two agents, a few turns, mail with awkward bodies, events.
fn populated_root() -> TestRoot {
    let t = TestRoot::sqlite();
    t.agent("lead", "lead", None, &[]);
    t.agent("b1", "builder", Some("lead"), &["--lines", "3"]);
    t.mail(
        "lead",
        "b1",
        "tabs\there, a newline\nand a backslash \\ and é",
    );
    t.run(["turn", "--agent", "b1"]).status(0);
    t.mail("b1", "lead", "second");
    t.run(["turn", "--agent", "lead", "--message", "go"])
        .status(0);
    t
}

/// A hash of every store file (with its WAL), to see that nothing wrote.
fn digest(t: &TestRoot) -> Vec<(String, u64)> {
    use std::hash::{Hash, Hasher};
    let mut out = Vec::new();
    for f in ["sessions.db", "mail.db", "events.db"] {
        for suffix in ["", "-wal"] {
            let name = format!("{f}{suffix}");
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(t.root().join(&name)).ok().hash(&mut h);
            out.push((name, h.finish()));
        }
    }
    out
}

#[test]
fn store_migrate_copies_every_row_keeps_order_and_leaves_the_source() {
    let Some(pg) = pg() else { return };
    let t = populated_root();
    let before = digest(&t);
    let url = format!("{}?application_name=runner-it", pg.url);
    let r = t.run([
        "store", "migrate", "--to", &url, "--schema", &pg.schema, "--json",
    ]);
    r.status(0);
    // Before any connection of this test checkpoints a WAL.
    assert_eq!(digest(&t), before, "the source files are untouched");
    let j = r.json();
    for (table, db) in [
        ("sessions", "sessions.db"),
        ("turns", "sessions.db"),
        ("messages", "mail.db"),
        ("events", "events.db"),
    ] {
        let n = t.i64(db, &format!("SELECT COUNT(*) FROM {table}"));
        assert!(n > 0, "{table} is empty in the source");
        assert_eq!(j[table], n, "{table} count printed");
        assert_eq!(
            pg.i64(&format!("SELECT COUNT(*) FROM {table}")),
            n,
            "{table} rows"
        );
    }
    // Arrival order, bodies and ids survive; the sequences continue after them.
    let c = t.sqlite_file("mail.db");
    let src: Vec<(i64, String, String)> = c
        .prepare("SELECT rowid, id, body FROM messages ORDER BY rowid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let dst: Vec<(i64, String, String)> = pg
        .client()
        .query("SELECT rowid, id, body FROM messages ORDER BY rowid", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(src, dst);
    let max_event = t.i64("events.db", "SELECT MAX(id) FROM events");
    let next: i64 = pg
        .client()
        .query_one(
            "INSERT INTO events (agent_name, event_type, created_at) VALUES ('x', 'custom', 'now') RETURNING id",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        next > max_event,
        "events.id continues after {max_event}: {next}"
    );
    let turn_src = t.str(
        "sessions.db",
        "SELECT outcome || '/' || mail_ids FROM turns ORDER BY started_at LIMIT 1",
    );
    let turn_dst: Option<String> = pg
        .client()
        .query_one(
            "SELECT outcome || '/' || mail_ids FROM turns ORDER BY started_at LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(turn_src, turn_dst);
    // Human output names the counts and never the password.
    let t2 = populated_root();
    let pg2 = pg_sibling(&pg);
    let with_pw = pg2
        .url
        .replacen("postgres://postgres@", "postgres://postgres:hunter2@", 1);
    let r = t2.run([
        "store",
        "migrate",
        "--to",
        &with_pw,
        "--schema",
        &pg2.schema,
    ]);
    r.status(0);
    assert!(
        r.stdout().contains("messages") && !r.stdout().contains("hunter2"),
        "{}",
        r.stdout()
    );
}

/// Another fresh schema on the same server.
fn pg_sibling(pg: &PgSchema) -> PgSchema {
    PgSchema {
        url: pg.url.clone(),
        schema: format!("{}_b", pg.schema),
    }
}

#[test]
fn store_migrate_refuses_a_schema_with_data_and_writes_nothing() {
    let Some(pg) = pg() else { return };
    let t = populated_root();
    t.run(["store", "migrate", "--to", &pg.url, "--schema", &pg.schema])
        .status(0);
    let n = pg.i64("SELECT COUNT(*) FROM messages");
    t.mail("b1", "lead", "after the first copy");
    t.run(["store", "migrate", "--to", &pg.url, "--schema", &pg.schema])
        .status(2)
        .one_line_error("already holds data");
    assert_eq!(
        pg.i64("SELECT COUNT(*) FROM messages"),
        n,
        "nothing written"
    );
}

#[test]
fn bad_urls_and_foreign_schemas_are_one_line_with_the_password_hidden() {
    let Some(pg) = pg() else { return };
    let t = populated_root();
    let r = t.run([
        "store",
        "migrate",
        "--to",
        "postgres://u:hunter2@127.0.0.1:1/test",
        "--schema",
        &pg.schema,
    ]);
    r.status(4).one_line_error("cannot reach PostgreSQL");
    assert!(
        !r.stderr().contains("hunter2") && r.stderr().contains("u:***@"),
        "{}",
        r.stderr()
    );
    t.run(["store", "migrate", "--to", "mysql://u@h/db"])
        .status(2)
        .one_line_error("invalid store URL");
    t.run(["store", "migrate", "--to", &pg.url, "--schema", "bad-name"])
        .status(2)
        .one_line_error("invalid schema name");
    let missing_db = pg.url.rsplit_once('/').unwrap().0.to_string() + "/no_such_db_runner";
    t.run([
        "store",
        "migrate",
        "--to",
        &missing_db,
        "--schema",
        &pg.schema,
    ])
    .status(2)
    .one_line_error("refused the connection");
    // A schema that holds someone else's tables is not ours: nothing written.
    let mut c = pg.client();
    c.batch_execute(&format!(
        "CREATE SCHEMA \"{0}\"; CREATE TABLE \"{0}\".orders (id int)",
        pg.schema
    ))
    .unwrap();
    t.run(["store", "migrate", "--to", &pg.url, "--schema", &pg.schema])
        .status(2)
        .one_line_error("is not a runner store");
    let tables = pg.i64(&format!(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '{}'",
        pg.schema
    ));
    assert_eq!(tables, 1, "only the foreign table");
    // A schema from a newer runner is refused.
    let newer = pg_sibling(&pg);
    t.run([
        "store",
        "migrate",
        "--to",
        &newer.url,
        "--schema",
        &newer.schema,
    ])
    .status(0);
    newer
        .client()
        .batch_execute("UPDATE runner_meta SET value = '99' WHERE key = 'schema_version'")
        .unwrap();
    t.run([
        "store",
        "migrate",
        "--to",
        &newer.url,
        "--schema",
        &newer.schema,
    ])
    .status(2)
    .one_line_error("newer than this runner's");
    // No root: nothing to migrate.
    let empty = TestRoot::sqlite();
    empty
        .run(["store", "migrate", "--to", &pg.url])
        .status(2)
        .one_line_error("nothing to migrate");
}

#[test]
fn hosts_opening_at_once_migrate_once() {
    let Some(pg) = pg() else { return };
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (url, schema) = (pg.url.clone(), pg.schema.clone());
            std::thread::spawn(move || {
                let mut c = runner::store::pg::connect(&url, &schema).unwrap();
                runner::store::pg::schema::migrate(&mut c, &url, &schema)
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    assert_eq!(
        pg.i64("SELECT value::bigint FROM runner_meta WHERE key = 'schema_version'"),
        runner::store::pg::schema::SCHEMA_VERSION
    );
    // And again: idempotent.
    let mut c = runner::store::pg::connect(&pg.url, &pg.schema).unwrap();
    runner::store::pg::schema::migrate(&mut c, &pg.url, &pg.schema).unwrap();
}

/// A newcomer's `cargo test` runs the integration suite on SQLite: say so.
#[test]
fn which_store_the_integration_suite_ran_on() {
    if crate::testing_postgres() {
        let t = TestRoot::new();
        t.run(["init"]).status(0);
        assert!(
            !t.root().join("sessions.db").exists(),
            "on PostgreSQL no table lives in the root"
        );
    } else {
        eprintln!(
            "NOTE: the integration suite ran on SQLite only; RUNNER_TEST_STORE=postgres cargo test --test it runs it on PostgreSQL (.ci/run runs both)"
        );
    }
}

/// `--store URL` (and the variable, and config.toml) points every command
/// at PostgreSQL; `init --save` records it, and only then.
#[test]
fn init_with_a_store_url_creates_the_schema_and_save_records_it() {
    let Some(pg) = pg() else { return };
    let t = TestRoot::sqlite();
    let env = [("RUNNER_STORE_SCHEMA", pg.schema.as_str())];
    t.run_env(&env, ["--store", &pg.url, "init"]).status(0);
    assert!(!t.root().join("config.toml").exists(), "no --save, no file");
    assert_eq!(pg.i64("SELECT COUNT(*) FROM sessions"), 0);
    t.run_env(&env, ["--store", &pg.url, "init", "--save"])
        .status(0);
    let cfg = std::fs::read_to_string(t.root().join("config.toml")).unwrap();
    assert!(cfg.contains(&format!("url = \"{}\"", pg.url)), "{cfg}");
    // From now on plain commands (with the schema) use PostgreSQL.
    t.run_env(&env, ["agent", "add", "lead", "--capability", "lead"])
        .status(0);
    assert_eq!(pg.i64("SELECT COUNT(*) FROM sessions"), 1);
    assert!(!t.root().join("sessions.db").exists());
    // A second --save leaves the user's [store] table alone.
    t.run_env(&env, ["--store", &pg.url, "init", "--save"])
        .status(2)
        .one_line_error("already has a [store] table");
}

/// Every command given a bad store: one line, 2 or 4, the password hidden,
/// nothing written.
#[test]
fn every_command_refuses_a_bad_store_with_one_line() {
    let Some(pg) = pg() else { return };
    let t = TestRoot::sqlite();
    pg.client()
        .batch_execute(&format!(
            "CREATE SCHEMA \"{s}\"; CREATE TABLE \"{s}\".theirs (x int)",
            s = pg.schema
        ))
        .unwrap();
    let unreachable = "postgres://u:hunter2@127.0.0.1:1/x";
    let cases: &[(&str, i32, &str)] = &[
        ("mysql://u:hunter2@h/x", 2, "invalid store URL"),
        (unreachable, 4, "cannot reach PostgreSQL"),
        (&pg.url, 2, "not a runner store"),
    ];
    for (url, code, needle) in cases {
        for args in [
            vec!["init"],
            vec!["status"],
            vec!["agent", "add", "b1", "--capability", "builder"],
            vec!["mail", "send", "--from", "a", "--to", "b", "--body", "x"],
            vec!["turn", "--agent", "b1", "--message", "x"],
            vec!["sweep"],
            vec!["turns"],
            vec!["events"],
        ] {
            let mut full = vec!["--store", url];
            full.extend(args);
            let r = t.run_env(&[("RUNNER_STORE_SCHEMA", pg.schema.as_str())], &full);
            r.status(*code).one_line_error(needle);
            assert!(!r.stderr().contains("hunter2"), "{}", r.stderr());
        }
    }
    assert!(!t.root().join("sessions.db").exists(), "nothing written");
    assert_eq!(pg.i64("SELECT COUNT(*) FROM theirs"), 0);
}

/// `runner doctor` on a PostgreSQL root: the store answers and is current,
/// the clock agrees; a schema from a newer runner fails, one not created
/// yet warns; the password is never shown.
#[test]
fn doctor_checks_a_postgresql_store_and_the_clock() {
    let Some(pg) = pg() else { return };
    let t = TestRoot::sqlite();
    let with_pw = pg
        .url
        .replacen("postgres://postgres@", "postgres://postgres:hunter2@", 1);
    let env = [
        ("RUNNER_STORE_URL", with_pw.as_str()),
        ("RUNNER_STORE_SCHEMA", pg.schema.as_str()),
    ];
    let check = |r: &crate::Run, name_part: &str| -> serde_json::Value {
        assert!(!r.stdout().contains("hunter2"), "{}", r.stdout());
        r.json()["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"].as_str().unwrap().contains(name_part))
            .unwrap_or_else(|| panic!("no check {name_part}: {}", r.stdout()))
            .clone()
    };
    // Not created yet: a warning with the command that creates it.
    t.run(["init"]).status(0);
    let r = t.run_env(&env, ["doctor", "--json"]);
    let store = check(&r, "schema");
    assert_eq!(store["level"], "warn", "{store}");
    assert!(store.to_string().contains("runner init --store"), "{store}");
    // Created: ok, and the clock agrees with the database's.
    t.run_env(&env, ["status"]).status(0);
    let r = t.run_env(&env, ["doctor", "--json"]);
    assert_eq!(check(&r, "schema")["level"], "ok", "{}", r.stdout());
    assert_eq!(check(&r, "clock")["level"], "ok", "{}", r.stdout());
    assert!(
        !r.stdout().contains("store sessions.db"),
        "no SQLite store checks on a PostgreSQL root: {}",
        r.stdout()
    );
    // A newer runner's schema fails.
    pg.client()
        .batch_execute("UPDATE runner_meta SET value = '99' WHERE key = 'schema_version'")
        .unwrap();
    let r = t.run_env(&env, ["doctor", "--json"]);
    assert_eq!(r.code(), 1, "{}", r.stdout());
    assert_eq!(check(&r, "schema")["level"], "fail", "{}", r.stdout());
}

/// `url` with `query` added to its query string.
fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

/// Does the test server offer TLS (`ssl = on`)?
fn server_offers_tls(pg: &PgSchema) -> bool {
    let on: String = pg.client().query_one("SHOW ssl", &[]).unwrap().get(0);
    on == "on"
}

/// A CA certificate that signed nothing: a server checked against it fails.
const STRANGER_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBsjCCAVegAwIBAgIUCorrrq2LSb5NvdXPPrYTA4F1B04wCgYIKoZIzj0EAwIw
LTErMCkGA1UEAwwicnVubmVyIHRlc3QgQ0EgdGhhdCBzaWduZWQgbm90aGluZzAg
Fw0yNjExMjkyMDM4MzdaGA8yMTI2MTEwNTIwMzgzN1owLTErMCkGA1UEAwwicnVu
bmVyIHRlc3QgQ0EgdGhhdCBzaWduZWQgbm90aGluZzBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABDq4ToQibciuVH4PJzrViiCl4dbuuMGI/AFOWazLUH7dBgOdJEVY
FHp5+SIHuyCoRhfDMd79R+as3081x/EYlhGjUzBRMB0GA1UdDgQWBBQ/4+8Fb7yW
WixJC5PzxDc1fF9dVDAfBgNVHSMEGDAWgBQ/4+8Fb7yWWixJC5PzxDc1fF9dVDAP
BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCvRma35hQTprM1QW/5
QBLW0l01xqtqjSIpS37LOtvFCAIhAIfTLHkFEwkZ6y+f4wrbnkSFqnqOwJRVzRHD
p30DAFHU
-----END CERTIFICATE-----
";

/// `sslmode` decides TLS, seen from the server (`pg_stat_ssl` of the
/// connection's own backend); connections are named `runner` unless the
/// URL names them.
#[test]
fn sslmode_decides_tls_as_the_server_sees_it() {
    let Some(pg) = pg() else { return };
    let tls = server_offers_tls(&pg);
    let seen = |query: &str| -> (bool, String) {
        let url = with_query(&pg.url, query);
        let mut c = runner::store::pg::connect(&url, &pg.schema).unwrap();
        let r = c
            .query_one(
                "SELECT s.ssl, a.application_name FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.pid = pg_backend_pid()",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(seen("sslmode=disable"), (false, "runner".to_string()));
    assert_eq!(seen("sslmode=prefer").0, tls, "prefer: TLS when offered");
    assert_eq!(seen("connect_timeout=5").0, tls, "prefer is the default");
    assert_eq!(seen("sslmode=disable&application_name=mine").1, "mine");
    if tls {
        assert_eq!(seen("sslmode=require"), (true, "runner".to_string()));
    } else {
        eprintln!("NOTE: the test server has ssl = off: sslmode=require was not tried");
    }
}

/// A command with `sslmode=require` works and every connection it holds is
/// TLS (seen from the server while a turn runs); `disable` works; a bad or
/// unsupported mode, a missing root certificate and a certificate that fails
/// the check are one line, exit 2, the password hidden.
#[test]
fn commands_honour_sslmode_and_refuse_bad_ones_with_one_line() {
    let Some(mut t) = TestRoot::postgres() else {
        return;
    };
    let pg = t.pg.as_ref().unwrap();
    let (url, schema) = (pg.url.clone(), pg.schema.clone());
    if !server_offers_tls(pg) {
        eprintln!("NOTE: the test server has ssl = off: sslmode=require was not tried");
        return;
    }
    // The schema's name tells this test's connections from all others.
    let require = with_query(&url, &format!("sslmode=require&application_name={schema}"));
    t.set_env("RUNNER_STORE_URL", &require);
    t.agent("w", "builder", None, &["--lines", "600", "--rate", "20"]);
    t.run(["status"]).status(0);
    let runner = t.spawn(["turn", "--agent", "w", "--message", "go"]);
    let pid_file = t.root().join("agents/w/turn.pid");
    wait_for(Duration::from_secs(20), "the agent to start", || {
        pid_file.exists()
    });
    let mut c = t.pg.as_ref().unwrap().client();
    let mut counts = (0, 0);
    wait_for(
        Duration::from_secs(20),
        "the turn's connections to show",
        || {
            let r = c
                .query_one(
                    "SELECT COUNT(*), COUNT(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = $1",
                    &[&schema],
                )
                .unwrap();
            counts = (r.get::<_, i64>(0), r.get::<_, i64>(1));
            counts.0 > 0
        },
    );
    assert_eq!(counts.0, counts.1, "every connection is TLS: {counts:?}");
    signal(runner.id(), Signal::SIGTERM);
    wait_child(runner, Duration::from_secs(20));

    t.set_env("RUNNER_STORE_URL", &with_query(&url, "sslmode=disable"));
    t.run(["status"]).status(0);

    let with_pw = url.replacen("postgres://postgres@", "postgres://postgres:hunter2@", 1);
    let stranger = t.path().join("stranger-ca.pem");
    std::fs::write(&stranger, STRANGER_CA).unwrap();
    let stranger = stranger.display().to_string();
    for (query, needle) in [
        ("sslmode=verify", "sslmode=verify is not supported"),
        ("sslmode=allow", "sslmode=allow is not supported"),
        ("sslmode=verify-full", "needs a root certificate"),
        (
            "sslmode=require&sslrootcert=/nonexistent.pem",
            "sslrootcert /nonexistent.pem",
        ),
        (
            &format!("sslmode=verify-ca&sslrootcert={stranger}"),
            "invalid peer certificate",
        ),
        (
            &format!("sslmode=require&sslrootcert={stranger}"),
            "invalid peer certificate",
        ),
    ] {
        let r = t.run(["--store", &with_query(&with_pw, query), "status"]);
        r.status(2).one_line_error(needle);
        assert!(!r.stderr().contains("hunter2"), "{}", r.stderr());
    }
}

/// A schema written by the first version (events with their
/// `(agent_name, created_at)` index) is upgraded in place by the next
/// command: the index goes, the rows stay, the version is the current one.
#[test]
fn a_version_1_schema_is_upgraded_and_keeps_its_rows() {
    let Some(pg) = pg() else { return };
    let mut c = runner::store::pg::connect(&pg.url, &pg.schema).unwrap();
    runner::store::pg::schema::migrate(&mut c, &pg.url, &pg.schema).unwrap();
    c.batch_execute(
        "CREATE INDEX idx_events_agent_time ON events(agent_name, created_at);
         INSERT INTO events (agent_name, event_type, created_at) VALUES ('old', 'custom', '2026-01-01T00:00:00.000Z');
         UPDATE runner_meta SET value = '1' WHERE key = 'schema_version';",
    )
    .unwrap();
    let index = "SELECT COUNT(*) FROM pg_indexes WHERE indexname = 'idx_events_agent_time' \
                 AND schemaname = current_schema()";
    assert_eq!(pg.i64(index), 1);
    runner::store::pg::schema::migrate(&mut c, &pg.url, &pg.schema).unwrap();
    assert_eq!(pg.i64(index), 0, "version 2 drops the index");
    assert_eq!(
        pg.i64("SELECT value::bigint FROM runner_meta WHERE key = 'schema_version'"),
        runner::store::pg::schema::SCHEMA_VERSION
    );
    assert_eq!(
        pg.i64("SELECT COUNT(*) FROM events WHERE agent_name = 'old'"),
        1
    );
}

/// A flood of lines into PostgreSQL (SPEC §6.1, the events writer of
/// `store::pg::writer`): every line in `events` exactly once, ids in line
/// order, no commit over 512 rows (the rows of one transaction share their
/// `xmin`), and every call's duration on its `tool_start` row, also for
/// the calls whose end a later commit wrote.
#[test]
fn a_flood_is_written_in_line_order_in_commits_of_at_most_512_rows() {
    let Some(t) = TestRoot::postgres() else {
        return;
    };
    t.agent(
        "b1",
        "builder",
        None,
        &[
            "--lines",
            "4000",
            "--line-bytes",
            "300",
            "--tool-every",
            "3",
        ],
    );
    t.run(["turn", "--agent", "b1", "--message", "go", "--json"])
        .status(0);
    let lines = t.last_turn("b1")["lines"].as_i64().unwrap();
    assert!(lines > 5000, "{lines}");
    let q = |sql: &str| t.i64("events.db", sql);
    assert_eq!(
        q("SELECT COUNT(*) FROM events WHERE line_no IS NOT NULL"),
        lines
    );
    assert_eq!(q("SELECT COUNT(DISTINCT line_no) FROM events"), lines);
    assert_eq!(q("SELECT MAX(line_no) FROM events"), lines);
    assert_eq!(
        q(
            "SELECT COUNT(*) FROM (SELECT line_no, lag(line_no) OVER (ORDER BY id) AS prev \
           FROM events WHERE line_no IS NOT NULL) x WHERE line_no < prev"
        ),
        0,
        "ids follow the lines"
    );
    let commits = q("SELECT COUNT(DISTINCT xmin::text) FROM events WHERE line_no IS NOT NULL");
    assert!(commits >= 10, "{commits} commits");
    assert!(
        q("SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM events GROUP BY xmin::text) x") <= 512,
        "a commit holds at most 512 rows"
    );
    assert_eq!(
        q("SELECT COUNT(*) FROM events WHERE event_type = 'tool_start'"),
        q("SELECT COUNT(*) FROM events WHERE event_type = 'tool_end'")
    );
    assert_eq!(
        q(
            "SELECT COUNT(*) FROM events s JOIN events e ON e.turn_id = s.turn_id \
           AND e.event_type = 'tool_end' AND e.line_no = s.line_no + 1 \
           WHERE s.event_type = 'tool_start' \
           AND s.tool_duration_ms IS NOT DISTINCT FROM e.tool_duration_ms \
           AND s.tool_duration_ms IS NOT NULL"
        ),
        q("SELECT COUNT(*) FROM events WHERE event_type = 'tool_start'"),
        "every start row carries its call's duration"
    );
}
