//! Integration tests: the real `runner` binary against temporary roots,
//! with the built-in fake agent as the agent CLI. Assertions are on exit
//! codes, database rows, files and live processes.

mod ending;
mod fleet;
mod fleet_hosts;
mod fleet_mail;
mod foundation;
mod http;
mod mail_serve;
mod ops;
mod overstory;
mod pg;
mod props;
mod reliability;
mod sweep;
mod turn;
mod wild;

use std::path::{Path, PathBuf};

use runner::store::Db;
use runner::store::db::params;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_runner");

/// A temporary root and a builder of `runner` invocations against it.
///
/// With `RUNNER_TEST_STORE=postgres` each root's tables live in a fresh
/// PostgreSQL schema of their own (given to every invocation through
/// `RUNNER_STORE_URL`/`RUNNER_STORE_SCHEMA`, dropped with the root), so the
/// whole suite runs on that backend; [`TestRoot::db`] reads whichever holds
/// the tables.
pub struct TestRoot {
    dir: tempfile::TempDir,
    pg: Option<pg::PgSchema>,
    /// Variables every invocation gets (a fleet host's id and store).
    env: Vec<(String, String)>,
}

/// The store this run of the suite tests: `RUNNER_TEST_STORE=postgres`, or
/// SQLite (the default).
pub fn testing_postgres() -> bool {
    std::env::var("RUNNER_TEST_STORE").as_deref() == Ok("postgres")
}

/// The result of one `runner` invocation.
pub struct Run {
    pub out: Output,
    pub args: Vec<String>,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }

    /// Asserts the exit code.
    #[track_caller]
    pub fn status(&self, code: i32) -> &Run {
        assert_eq!(
            self.code(),
            code,
            "runner {:?}\nstdout: {}\nstderr: {}",
            self.args,
            self.stdout(),
            self.stderr()
        );
        self
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout()))
    }

    /// Asserts stderr is one clear line containing `needle`, without a panic.
    #[track_caller]
    pub fn one_line_error(&self, needle: &str) -> &Run {
        let e = self.stderr();
        assert!(e.contains(needle), "stderr should mention {needle:?}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "one line expected: {e}");
        assert!(!e.contains("panicked"), "{e}");
        self
    }
}

impl Default for TestRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl TestRoot {
    /// A root on the store under test.
    pub fn new() -> TestRoot {
        let mut t = TestRoot::sqlite();
        if testing_postgres() {
            t.pg = Some(pg::pg_required());
        }
        t
    }

    /// A root on SQLite whatever the store under test: for what is about
    /// the files themselves (foreign files, overstory's databases, migrate).
    pub fn sqlite() -> TestRoot {
        TestRoot {
            dir: tempfile::Builder::new()
                .prefix("runner-it-")
                .tempdir()
                .unwrap(),
            pg: None,
            env: Vec::new(),
        }
    }

    /// Another host of this root's fleet (SPEC §12): a root directory of
    /// its own on the same PostgreSQL schema, as host `host_id`.
    pub fn fleet_host(&self, host_id: &str) -> TestRoot {
        let pg = self.pg.as_ref().expect("a fleet needs a PostgreSQL root");
        let mut h = TestRoot::sqlite();
        h.env = self.env.clone();
        h.env.retain(|(k, _)| k != "RUNNER_HOST_ID");
        h.env.extend([
            ("RUNNER_STORE_URL".into(), pg.url.clone()),
            ("RUNNER_STORE_SCHEMA".into(), pg.schema.clone()),
            ("RUNNER_HOST_ID".into(), host_id.into()),
        ]);
        h
    }

    /// Sets a variable for every later invocation.
    pub fn set_env(&mut self, key: &str, value: &str) -> &mut TestRoot {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    /// A root on PostgreSQL whatever the store under test (fleet-only
    /// behaviour), or `None` with a notice when no server answers (a
    /// failure under `RUNNER_TEST_PG=require` or `RUNNER_TEST_STORE=postgres`).
    pub fn postgres() -> Option<TestRoot> {
        let pg = if testing_postgres() {
            pg::pg_required()
        } else {
            pg::pg()?
        };
        let mut t = TestRoot::sqlite();
        t.pg = Some(pg);
        Some(t)
    }

    /// The PostgreSQL schema holding this root's tables, if any.
    pub fn pg(&self) -> Option<&pg::PgSchema> {
        self.pg.as_ref()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut c = Command::new(BIN);
        c.arg("--root").arg(self.root());
        for a in args {
            c.arg(a.as_ref());
        }
        for (k, _) in std::env::vars() {
            if k.starts_with("RUNNER_") || k.starts_with("OVERSTORY_") {
                c.env_remove(k);
            }
        }
        c.env_remove("RUST_BACKTRACE");
        if let Some(pg) = &self.pg {
            c.env("RUNNER_STORE_URL", &pg.url);
            c.env("RUNNER_STORE_SCHEMA", &pg.schema);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c.current_dir(self.path());
        c.stdin(Stdio::null());
        c
    }

    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_string()).collect();
        let out = self.cmd(&args).output().unwrap();
        Run { out, args }
    }

    pub fn run_env<I, S>(&self, env: &[(&str, &str)], args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_string()).collect();
        let mut c = self.cmd(&args);
        c.envs(env.iter().copied());
        Run {
            out: c.output().unwrap(),
            args,
        }
    }

    pub fn spawn<I, S>(&self, args: I) -> Child
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        // stderr to a file: an undrained pipe would block the runner's progress output.
        let n = std::sync::atomic::AtomicUsize::new(0)
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::fs::File::create(
            self.path()
                .join(format!("spawn-{}-{n}.stderr", std::process::id())),
        )
        .unwrap();
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Registers an agent whose CLI is `runner fake-agent <fake...>`.
    pub fn agent(
        &self,
        name: &str,
        capability: &str,
        parent: Option<&str>,
        fake: &[&str],
    ) -> &TestRoot {
        let mut args: Vec<String> = vec![
            "agent".into(),
            "add".into(),
            name.into(),
            "--capability".into(),
            capability.into(),
        ];
        if let Some(p) = parent {
            args.extend(["--parent".into(), p.into()]);
        }
        args.extend(["--worktree".into(), self.path().display().to_string()]);
        args.extend(["--command".into(), BIN.into(), "fake-agent".into()]);
        args.extend(fake.iter().map(|s| s.to_string()));
        self.run(&args).status(0);
        self.run(["init"]).status(0);
        self
    }

    pub fn mail(&self, from: &str, to: &str, body: &str) -> String {
        let r = self.run([
            "mail",
            "send",
            "--from",
            from,
            "--to",
            to,
            "--subject",
            "task",
            "--body",
            body,
        ]);
        r.status(0);
        r.stdout().trim().to_string()
    }

    /// The tables of `name` (`sessions.db`, `mail.db`, `events.db`): that
    /// file, or this root's PostgreSQL schema. `metrics.db` is always the file.
    pub fn db(&self, name: &str) -> Db {
        match &self.pg {
            Some(pg) if name != "metrics.db" => Db::pg(pg.client()),
            _ => {
                let c = rusqlite::Connection::open(self.root().join(name)).unwrap();
                c.busy_timeout(Duration::from_secs(5)).unwrap();
                Db::Sqlite(c)
            }
        }
    }

    /// The SQLite file `name` itself (tests about the files: a root made
    /// with [`TestRoot::sqlite`]).
    pub fn sqlite_file(&self, name: &str) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.root().join(name)).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    pub fn i64(&self, db: &str, sql: &str) -> i64 {
        self.db(db)
            .query_row(sql, params![], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    }

    pub fn str(&self, db: &str, sql: &str) -> Option<String> {
        self.db(db)
            .query_row(sql, params![], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    }

    pub fn state(&self, agent: &str) -> String {
        self.str(
            "sessions.db",
            &format!("SELECT state FROM sessions WHERE agent_name='{agent}'"),
        )
        .unwrap()
    }

    /// The last turn row of an agent, as JSON (`runner turns --json`).
    pub fn last_turn(&self, agent: &str) -> serde_json::Value {
        let r = self.run(["turns", "--agent", agent, "--limit", "1", "--json"]);
        r.status(0);
        r.json()[0].clone()
    }

    /// `(read, tries, claimed_by)` of one message.
    pub fn mail_state(&self, id: &str) -> (i64, i64, Option<String>) {
        self.db("mail.db")
            .query_row(
                "SELECT read, tries, claimed_by FROM messages WHERE id=?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    }

    /// Asserts that no two turn rows overlap in time; returns how many there are.
    #[track_caller]
    pub fn assert_turns_never_overlap(&self) -> usize {
        let spans: Vec<(String, String)> = self
            .db("sessions.db")
            .query_map(
                "SELECT started_at, ended_at FROM turns ORDER BY started_at, ended_at",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "overlapping turns: {w:?}");
        }
        spans.len()
    }

    pub fn worker_died(&self, parent: &str) -> i64 {
        self.i64(
            "mail.db",
            &format!(
                "SELECT COUNT(*) FROM messages WHERE to_agent='{parent}' AND type='worker_died'"
            ),
        )
    }

    /// Live (non-zombie) processes carrying this root in their environment.
    pub fn live_processes(&self) -> Vec<i32> {
        let tag = format!("RUNNER_ROOT={}", self.root().display());
        runner::os::all_pids()
            .into_iter()
            .filter(|&p| p != std::process::id() as i32)
            .filter(|&p| {
                runner::os::is_alive(p, None) && runner::os::environ_contains(p, tag.as_bytes())
            })
            .collect()
    }

    /// After a turn: no `turn.pid`, the lease free, no process of the turn alive.
    #[track_caller]
    pub fn assert_clean(&self, agent: &str) {
        let dir = self.root().join("agents").join(agent);
        assert!(!dir.join("turn.pid").exists(), "turn.pid left behind");
        assert!(
            !runner::lease::is_held(&dir.join("turn.lock")),
            "lease still held"
        );
        let live = self.live_processes();
        assert!(
            live.is_empty(),
            "processes of the turn still alive: {live:?}"
        );
    }

    pub fn turn_dir(&self, agent: &str, turn_id: &str) -> PathBuf {
        self.root().join("logs").join(agent).join(turn_id)
    }
}

/// Waits until `cond` holds, failing the test after `limit`.
#[track_caller]
/// The lines `child` prints on stdout, as they come, on a channel (read by
/// a thread, so a test waits on them with `recv_timeout`).
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    rx
}

pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for a child with a deadline; kills it and fails on timeout.
#[track_caller]
pub fn wait_child(mut c: Child, limit: Duration) -> Output {
    let until = Instant::now() + limit;
    loop {
        if c.try_wait().unwrap().is_some() {
            return c.wait_with_output().unwrap();
        }
        if Instant::now() >= until {
            let _ = c.kill();
            panic!("child did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}
