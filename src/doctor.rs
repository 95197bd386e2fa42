//! `runner doctor`: checks a root and the machine around it, one line per
//! check (`ok`, `warn` or `fail`, with the fix in one sentence).
//!
//! Owns the checks and their verdicts: the root (exists, writable, private
//! modes, free space), each store (opens, ours, schema version, SQLite's
//! quick_check), `config.toml` (parses, no unknown key), capability files,
//! the CLI of every runtime in use (found, `--version` within a timeout),
//! what a sweep would repair (the sweep's own fact gathering and pure
//! decision, never a second copy of its rules) and agent states runner did
//! not write. Invariants: doctor never writes to the root (stores open
//! read-only until each is known current; the one write is a probe file it
//! removes at once) and never makes a model call. Non-goal: repairing —
//! every fix is a command the user runs. Fleet mode (PostgreSQL) has no
//! checks: there is no PostgreSQL store yet, and the report says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::capability;
use crate::config::{self, Config};
use crate::ctx::Ctx;
use crate::root::Root;
use crate::state::State;
use crate::store::db::off_runtime;
use crate::store::health::{self, Health};
use crate::store::mail::{self as mailstore, ListFilter};
use crate::store::pg;
use crate::store::schema::SCHEMA_VERSION;
use crate::store::sessions::{self, Session};
use crate::store::turns;
use crate::store::{Backend, Store, StoreError};
use crate::sweep::{self, Action};

/// How long a CLI's `--version` may take.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Below this much free space (or 5 % of the filesystem) the root is nearly full.
pub const LOW_SPACE_BYTES: u64 = 64 << 20;
/// Files and directories looked at for their modes, at most.
const MODE_WALK_LIMIT: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub level: Level,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    /// The one line `runner doctor` prints.
    pub fn line(&self) -> String {
        let mut l = format!(
            "{:<4}  {}: {}",
            self.level.as_str(),
            self.check,
            self.detail
        );
        if let Some(f) = &self.fix {
            l.push_str(&format!(" — fix: {f}"));
        }
        l
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub root: String,
    pub checks: Vec<Check>,
    /// No check failed.
    pub ok: bool,
}

impl Report {
    /// 0 when nothing failed, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.ok { 0 } else { 1 }
    }
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, check: impl Into<String>, level: Level, detail: String, fix: Option<String>) {
        self.0.push(Check {
            check: check.into(),
            level,
            detail,
            fix,
        });
    }
    fn ok(&mut self, check: impl Into<String>, detail: String) {
        self.add(check, Level::Ok, detail, None);
    }
    fn warn(&mut self, check: impl Into<String>, detail: String, fix: String) {
        self.add(check, Level::Warn, detail, Some(fix));
    }
    fn fail(&mut self, check: impl Into<String>, detail: String, fix: String) {
        self.add(check, Level::Fail, detail, Some(fix));
    }
}

/// Runs every check against `root` (absolute).
pub async fn run(root: &Path) -> Report {
    let mut c = Checks::default();
    let shown = root.display().to_string();
    if check_root(&mut c, root) {
        check_modes(&mut c, root);
        check_space(&mut c, root);
        let config = check_config(&mut c, root);
        let stores_ok = match &config.store {
            Backend::Sqlite => check_stores(&mut c, root),
            Backend::Postgres { url, schema } => {
                check_pg_store(&mut c, url, schema, config.fleet.grace)
            }
        };
        check_capabilities(&mut c, root);
        let config_is_sqlite = config.store == Backend::Sqlite;
        if stores_ok {
            check_agents(&mut c, root, config).await;
        } else {
            c.warn(
                "agents",
                "not checked: a store above is missing or not usable".into(),
                "fix the stores first, then run runner doctor again".into(),
            );
        }
        if config_is_sqlite {
            c.ok(
                "fleet",
                "single-host root (SQLite): the fleet checks (clock, schema) apply to a PostgreSQL store"
                    .into(),
            );
        }
    }
    let ok = c.0.iter().all(|k| k.level != Level::Fail);
    Report {
        root: shown,
        checks: c.0,
        ok,
    }
}

/// Exists, is a directory, and a file can be created in it. False when
/// nothing else can be checked.
fn check_root(c: &mut Checks, root: &Path) -> bool {
    let shown = root.display();
    match std::fs::metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            c.fail(
                "root",
                format!("{shown} does not exist"),
                format!("run `runner init --root {shown}` (or point --root at the right place)"),
            );
            return false;
        }
        Err(e) => {
            c.fail(
                "root",
                format!("cannot read {shown}: {e}"),
                "check the path and the permissions of its parents".into(),
            );
            return false;
        }
        Ok(m) if !m.is_dir() => {
            c.fail(
                "root",
                format!("{shown} is not a directory"),
                "point --root at a directory".into(),
            );
            return false;
        }
        Ok(_) => {}
    }
    let probe = root.join(format!(".doctor-probe-{}", std::process::id()));
    let written = {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
            .and_then(|mut f| f.write_all(b"x"))
    };
    let _ = std::fs::remove_file(&probe);
    match written {
        Ok(()) => c.ok("root", format!("{shown} exists and is writable")),
        Err(e) => c.fail(
            "root",
            format!("{shown} is not writable: {e}"),
            "make it writable by this user (and check the filesystem is not read-only or full)"
                .into(),
        ),
    }
    true
}

/// Directories 0700 and files 0600 (SPEC §1): nothing open to group or others.
fn check_modes(c: &mut Checks, root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut seen = 0usize;
    let mut open: Vec<(PathBuf, u32)> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        seen += 1;
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 && !m.file_type().is_symlink() {
            open.push((p.clone(), mode));
        }
        if m.is_dir()
            && seen < MODE_WALK_LIMIT
            && let Ok(rd) = std::fs::read_dir(&p)
        {
            stack.extend(rd.flatten().map(|e| e.path()));
        }
    }
    if open.is_empty() {
        c.ok(
            "modes",
            format!("directories 0700, files 0600 ({seen} checked)"),
        );
        return;
    }
    open.sort();
    let (first, mode) = &open[0];
    c.warn(
        "modes",
        format!(
            "{} path(s) open to group or others, e.g. {} is {mode:04o}",
            open.len(),
            first.display()
        ),
        format!("run `chmod -R go-rwx {}`", root.display()),
    );
}

/// The root's filesystem is not nearly full (a full disk ends turns with 74).
fn check_space(c: &mut Checks, root: &Path) {
    let Some((avail, total)) = crate::os::disk_space(root) else {
        c.warn(
            "disk space",
            "cannot read the free space of the root's filesystem".into(),
            format!("check the filesystem of {} with `df`", root.display()),
        );
        return;
    };
    let mib = |b: u64| b >> 20;
    let detail = format!(
        "{} MiB free of {} MiB under {}",
        mib(avail),
        mib(total),
        root.display()
    );
    if avail < LOW_SPACE_BYTES || avail < total / 20 {
        c.warn(
            "disk space",
            format!("nearly full: {detail}"),
            "free space on that filesystem: a turn that fills it ends with exit 74".into(),
        );
    } else {
        c.ok("disk space", detail);
    }
}

/// The three stores, opened read-only. True when every one is current and
/// sound (the agent checks then open them the usual way, which writes nothing).
fn check_stores(c: &mut Checks, root: &Path) -> bool {
    let mut all_ok = true;
    for (file, table, column) in [
        ("sessions.db", "sessions", "agent_name"),
        ("mail.db", "messages", "to_agent"),
        ("events.db", "events", "event_type"),
    ] {
        let path = root.join(file);
        let name = format!("store {file}");
        if !path.exists() {
            all_ok = false;
            c.warn(
                name,
                format!("{} does not exist yet", path.display()),
                format!("run `runner init --root {}`", root.display()),
            );
            continue;
        }
        let verdict = store_verdict(&path, health::inspect(&path, table, column), root);
        all_ok &= verdict.0 == Level::Ok;
        c.add(name, verdict.0, verdict.1, verdict.2);
    }
    all_ok
}

/// A PostgreSQL store (SPEC §12): the server answers, the schema is
/// runner's and current, and this host's clock agrees with the database's
/// (expiries are judged by the database's clock; warn past 2 s). Reads only.
/// The fleet as the database sees it: hosts offline, leases expired past
/// `grace` (the sweep's to repair).
struct FleetFacts {
    hosts: i64,
    offline: i64,
    overdue: i64,
}

fn check_pg_store(c: &mut Checks, url: &str, schema: &str, grace: Duration) -> bool {
    let shown = pg::redact(url);
    let name = format!("store {shown} schema {schema}");
    let looked = off_runtime(
        || -> Result<(Option<i64>, f64, Option<FleetFacts>), String> {
            let mut client = pg::connect(url, schema).map_err(|e| e.to_string())?;
            let ours: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM information_schema.tables
                                WHERE table_schema = $1 AND table_name = 'runner_meta')",
                    &[&schema],
                )
                .map_err(|e| pg::error_detail(&e))?
                .get(0);
            let version = if ours {
                client
                    .query_opt(
                        "SELECT value FROM runner_meta WHERE key = 'schema_version'",
                        &[],
                    )
                    .map_err(|e| pg::error_detail(&e))?
                    .and_then(|r| r.get::<_, String>(0).parse().ok())
            } else {
                None
            };
            let db_now: f64 = client
                .query_one("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8", &[])
                .map_err(|e| pg::error_detail(&e))?
                .get(0);
            let here = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            let fleet = if version == Some(pg::schema::SCHEMA_VERSION) {
                let r = client
                .query_one(
                    "SELECT (SELECT COUNT(*) FROM hosts),                             (SELECT COUNT(*) FROM hosts WHERE state = 'offline'),                             (SELECT COUNT(*) FROM leases WHERE expires_at < now() - $1::bigint * interval '1 millisecond')",
                    &[&(grace.as_millis() as i64)],
                )
                .map_err(|e| pg::error_detail(&e))?;
                Some(FleetFacts {
                    hosts: r.get(0),
                    offline: r.get(1),
                    overdue: r.get(2),
                })
            } else {
                None
            };
            Ok((version, here - db_now, fleet))
        },
    );
    let (version, skew, fleet) = match looked {
        Ok(x) => x,
        Err(e) => {
            c.fail(
                name,
                e,
                "check [store] url (or RUNNER_STORE_URL) and that the server is running".into(),
            );
            return false;
        }
    };
    let ok = match version {
        Some(v) if v == pg::schema::SCHEMA_VERSION => {
            c.ok(name, format!("answers; schema version {v}"));
            true
        }
        Some(v) if v > pg::schema::SCHEMA_VERSION => {
            c.fail(
                name,
                format!(
                    "schema version {v} is newer than this runner's {}",
                    pg::schema::SCHEMA_VERSION
                ),
                "upgrade runner on this host".into(),
            );
            false
        }
        Some(v) => {
            c.warn(
                name,
                format!(
                    "schema version {v} is older than this runner's {}",
                    pg::schema::SCHEMA_VERSION
                ),
                "the next runner command migrates it".into(),
            );
            false
        }
        None => {
            c.warn(
                name,
                "the schema holds no runner store yet".into(),
                format!("run `runner init --store {shown}`"),
            );
            false
        }
    };
    if let Some(f) = fleet {
        if f.overdue > 0 {
            c.warn(
                "fleet",
                format!(
                    "{} lease(s) expired past grace, {} of {} host(s) offline",
                    f.overdue, f.offline, f.hosts
                ),
                "run `runner sweep` on any host (serve sweeps on its own)".into(),
            );
        } else {
            c.ok(
                "fleet",
                format!(
                    "{} host(s), {} offline; no lease waits for repair",
                    f.hosts, f.offline
                ),
            );
        }
    }
    if skew.abs() > 2.0 {
        c.warn(
            "clock",
            format!("this host's clock is {skew:+.1} s off the database's"),
            "synchronise this host's clock (NTP)".into(),
        );
    } else {
        c.ok(
            "clock",
            format!("within {:.0} ms of the database's", skew.abs() * 1000.0),
        );
    }
    ok
}

fn store_verdict(
    path: &Path,
    h: Result<Health, StoreError>,
    root: &Path,
) -> (Level, String, Option<String>) {
    let shown = path.display();
    let move_away = "move it away (or point --root elsewhere)".to_string();
    let h = match h {
        Ok(h) => h,
        Err(StoreError::NotOurs { detail, .. }) => {
            return (
                Level::Fail,
                format!("{shown} is not a runner database ({detail})"),
                Some(move_away),
            );
        }
        Err(e) => {
            return (
                Level::Fail,
                format!("{shown} does not open: {e}"),
                Some("check the file and the disk under it".into()),
            );
        }
    };
    if h.foreign {
        return (
            Level::Fail,
            format!("{shown} is not a runner database (its tables are someone else's)"),
            Some(move_away),
        );
    }
    if let Some(first) = h.problems.first() {
        return (
            Level::Fail,
            format!(
                "{shown} fails SQLite's quick_check: {first}{}",
                match h.problems.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                }
            ),
            Some("restore it from a backup, or move it away and run `runner init` (its rows are lost)".into()),
        );
    }
    if h.version > SCHEMA_VERSION {
        return (
            Level::Fail,
            format!(
                "{shown} is at schema version {}, newer than this runner's {SCHEMA_VERSION}",
                h.version
            ),
            Some("install the newer runner that wrote it".into()),
        );
    }
    if h.version < SCHEMA_VERSION || !h.ours {
        return (
            Level::Warn,
            format!(
                "{shown} is at schema version {}, this runner's is {SCHEMA_VERSION}",
                h.version
            ),
            Some(format!(
                "run `runner init --root {}` to migrate it",
                root.display()
            )),
        );
    }
    (
        Level::Ok,
        format!("opens, is ours, schema version {SCHEMA_VERSION}, quick_check ok"),
        None,
    )
}

/// config.toml parses, names only known keys, and its values (and the
/// `RUNNER_*` environment) load. Returns the configuration to use next.
fn check_config(c: &mut Checks, root: &Path) -> Config {
    let path = root.join("config.toml");
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            c.fail(
                "config",
                format!("cannot read {shown}: {e}"),
                "make it readable by this user".into(),
            );
            return Config::default();
        }
        Ok(t) => Some(t),
    };
    if let Some(text) = &text {
        let table: toml::Table = match toml::from_str(text) {
            Ok(t) => t,
            Err(e) => {
                c.fail(
                    "config",
                    format!("{shown} does not parse: {}", e.message()),
                    "correct the TOML syntax".into(),
                );
                return Config::default();
            }
        };
        let unknown = config::unknown_keys(&table);
        if !unknown.is_empty() {
            let named: Vec<String> = unknown
                .iter()
                .map(|u| match &u.closest {
                    Some(k) => format!("{} (did you mean {k}?)", u.key),
                    None => u.key.clone(),
                })
                .collect();
            // runner refuses a config.toml with an unknown key (every
            // command exits 2), so this is a failure, not a warning.
            c.fail(
                "config",
                format!("{shown} names unknown key(s): {}", named.join(", ")),
                "rename or remove them: runner refuses config.toml until then".into(),
            );
            return Config::default();
        }
    }
    match Config::load(root) {
        Ok(cfg) => {
            c.ok(
                "config",
                match text {
                    Some(_) => format!("{shown} and the RUNNER_* environment load"),
                    None => {
                        "no config.toml (built-in defaults); the RUNNER_* environment loads".into()
                    }
                },
            );
            cfg
        }
        Err(e) => {
            c.fail(
                "config",
                e.to_string(),
                "correct that value (see README, Configuration)".into(),
            );
            Config::default()
        }
    }
}

/// Every `<root>/capabilities/*.md` parses.
fn check_capabilities(c: &mut Checks, root: &Path) {
    let dir = root.join("capabilities");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "md"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut bad = 0;
    for f in &files {
        let name = f
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let shown = f.display().to_string();
        let parsed = std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read {shown}: {e}"))
            .and_then(|t| capability::parse(&name, &shown, &t).map_err(|e| e.to_string()));
        if let Err(e) = parsed {
            bad += 1;
            c.fail(
                format!("capability {name}"),
                e,
                format!("correct {shown} (see the built-in ones in agents/)"),
            );
        }
    }
    if bad == 0 {
        c.ok(
            "capabilities",
            match files.len() {
                0 => "built-in only".into(),
                n => format!("{n} file(s) under {} parse", dir.display()),
            },
        );
    }
}

/// Checks that need the agents: runtimes in use, sweep leftovers, states
/// runner did not write.
async fn check_agents(c: &mut Checks, root: &Path, config: Config) {
    let ctx = Ctx {
        root: Root {
            dir: root.to_path_buf(),
        },
        config,
        json: false,
    };
    let listed = Store::open_backend(root, &ctx.config.store).and_then(|store| {
        let all = sessions::list(&store.conn)?;
        Ok((store, all))
    });
    let (store, agents) = match listed {
        Ok(x) => x,
        Err(e) => {
            c.fail(
                "agents",
                format!("cannot read the agents: {e}"),
                "check the stores (see above)".into(),
            );
            return;
        }
    };
    check_runtimes(c, &ctx, &agents).await;
    check_leftovers(c, &ctx, &store, &agents);
    check_foreign_states(c, &ctx, &store, &agents);
}

/// For each runtime a registered agent uses: its CLI is found, and its
/// version (`--version`, no model call). A `command` agent's program is
/// only looked up: it is not asked for a version.
async fn check_runtimes(c: &mut Checks, ctx: &Ctx, agents: &[Session]) {
    let mut by_bin: BTreeMap<(String, String), Vec<&Session>> = BTreeMap::new();
    for s in agents {
        let key = match s.runtime.as_str() {
            "claude" => ("claude".into(), ctx.config.claude.bin.clone()),
            "codex" => ("codex".into(), ctx.config.codex.bin.clone()),
            "gemini" => ("gemini".into(), ctx.config.gemini.bin.clone()),
            "command" => (
                "command".into(),
                s.runtime_command
                    .as_ref()
                    .and_then(|a| a.first())
                    .cloned()
                    .unwrap_or_default(),
            ),
            other => {
                c.fail(
                    format!("runtime {other}"),
                    format!("agent {} has unknown runtime '{other}'", s.agent_name),
                    "re-register it with a known --runtime (claude, codex, gemini, command)".into(),
                );
                continue;
            }
        };
        by_bin.entry(key).or_default().push(s);
    }
    for ((runtime, bin), users) in by_bin {
        let names: Vec<&str> = users.iter().map(|s| s.agent_name.as_str()).collect();
        let check = format!("runtime {runtime}");
        let set_bin = format!(
            "install it, or set [runtime.{runtime}] bin in config.toml (env RUNNER_RUNTIME_{}_BIN)",
            runtime.to_uppercase()
        );
        if runtime == "command" {
            let cwd = Path::new(&users[0].worktree_path);
            match find_program(&bin, cwd) {
                Some(p) => c.ok(
                    check,
                    format!(
                        "{} found for {} (a command agent is not asked for a version)",
                        p.display(),
                        names.join(", ")
                    ),
                ),
                None => c.fail(
                    check,
                    format!(
                        "'{bin}' (the command of {}) is not found or not executable",
                        names.join(", ")
                    ),
                    "install it or put it on PATH".into(),
                ),
            }
            continue;
        }
        let Some(path) = find_program(&bin, Path::new(".")) else {
            c.fail(
                check,
                format!("'{bin}' (used by {}) is not found", names.join(", ")),
                set_bin,
            );
            continue;
        };
        match version_of(&path).await {
            Ok(v) => c.ok(check, format!("{}: {v}", path.display())),
            Err(e) => c.warn(
                check,
                format!("{} is found but `--version` {e}", path.display()),
                format!("run `{} --version` by hand to see why", path.display()),
            ),
        }
    }
}

/// Resolves a program the way spawning it would: a name with a slash
/// relative to `cwd`, otherwise on `PATH`; it must be an executable file.
fn find_program(bin: &str, cwd: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if bin.is_empty() {
        return None;
    }
    if bin.contains('/') {
        let p = cwd.join(bin);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| executable(p))
}

/// The first line `<bin> --version` prints, within [`VERSION_TIMEOUT`].
async fn version_of(bin: &Path) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(VERSION_TIMEOUT, cmd.output()).await {
        Err(_) => return Err(format!("did not answer within {VERSION_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("cannot run: {e}")),
        Ok(Ok(o)) => o,
    };
    let first = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    };
    match (out.status.success(), first(&out.stdout)) {
        (true, Some(v)) => Ok(v),
        (true, None) => Err("printed nothing".into()),
        (false, _) => Err(format!(
            "failed ({}): {}",
            out.status,
            first(&out.stderr).unwrap_or_default()
        )),
    }
}

/// What `runner sweep` would repair, counted with the sweep's own facts
/// and decision.
fn check_leftovers(c: &mut Checks, ctx: &Ctx, store: &Store, agents: &[Session]) {
    let now = SystemTime::now();
    let (mut pid_files, mut claims, mut in_turn, mut dead_turns, mut stuck) = (0, 0, 0, 0, 0);
    for s in agents {
        let f = match sweep::gather(ctx, store, s, now) {
            Ok(f) => f,
            Err(e) => {
                c.fail(
                    "leftovers",
                    format!("{}: {e}", s.agent_name),
                    "check the stores (see above)".into(),
                );
                return;
            }
        };
        match sweep::decide(&f) {
            Action::Repair => {
                pid_files += usize::from(f.pid_file);
                claims += f.claims;
                dead_turns += f.unfinished_turns;
                in_turn += usize::from(f.state == Some(State::InTurn) && f.unfinished_turns == 0);
            }
            Action::StopTurn { .. } => stuck += 1,
            Action::Nothing => {}
        }
    }
    let parts: Vec<String> = [
        (pid_files, "turn.pid without a live lease"),
        (dead_turns, "unfinished turn row(s) of dead runners"),
        (claims, "claimed message(s) of dead turns"),
        (in_turn, "agent(s) in_turn with no turn"),
        (
            stuck,
            "live turn(s) past the sweep's ceiling or their deadline",
        ),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    if parts.is_empty() {
        c.ok(
            "leftovers",
            format!(
                "nothing for the sweep to repair ({} agent(s))",
                agents.len()
            ),
        );
    } else {
        c.warn(
            "leftovers",
            parts.join(", "),
            format!("run `runner sweep --root {}`", ctx.root.dir.display()),
        );
    }
}

/// `stalled` or `zombie` agents whose state runner did not write (e.g.
/// overstory's `ov status` writes states directly): no running turn, and
/// neither the last turn's final state nor dead mail explains it.
fn check_foreign_states(c: &mut Checks, ctx: &Ctx, store: &Store, agents: &[Session]) {
    let mut found = 0;
    for s in agents {
        let Some(state @ (State::Stalled | State::Zombie)) = s.state() else {
            continue;
        };
        let agent = s.agent_name.as_str();
        if crate::lease::is_held(&ctx.root.lock_path(agent))
            || turns::unfinished(&store.conn, agent).is_ok_and(|t| !t.is_empty())
        {
            continue; // a live turn, or leftovers the sweep will settle
        }
        let last = turns::last_finished(&store.conn, agent).ok().flatten();
        let by_last_turn = last
            .as_ref()
            .is_some_and(|t| t.final_state.as_deref() == Some(state.as_str()));
        let by_dead_mail = state == State::Zombie
            && mailstore::list(
                &store.conn,
                &ListFilter {
                    to: Some(agent.to_string()),
                    from: None,
                    unread: false,
                    dead: true,
                    limit: 1,
                },
            )
            .is_ok_and(|m| !m.is_empty());
        if by_last_turn || by_dead_mail {
            continue;
        }
        found += 1;
        let since = match &last {
            Some(t) => format!(
                "its last turn ended {} leaving it {}",
                t.outcome.as_deref().unwrap_or("?"),
                t.final_state.as_deref().unwrap_or("?")
            ),
            None => "it has had no turn".into(),
        };
        let root = ctx.root.dir.display();
        let fix = match state {
            State::Zombie => format!(
                "run `runner agent add {agent} --capability {} --recover --root {root}`",
                s.capability
            ),
            // `--recover` takes only completed or zombie agents (SPEC §10.1);
            // a turn moves a stalled agent back to in_turn.
            _ => format!("run a turn: `runner nudge --agent {agent} --root {root}`"),
        };
        c.warn(
            format!("state {agent}"),
            format!("{agent} is {state} but runner did not set it ({since})"),
            fix,
        );
    }
    if found == 0 {
        c.ok(
            "states",
            "every stalled or zombie agent was set so by runner".into(),
        );
    }
}
