//! Opt-in end-to-end tests: the real `runner` binary driving the real agent
//! CLIs (Claude Code, Codex, Gemini CLI) against the loopback mock model API
//! (`../shared/tools/mock-model-api.py`). No credentials, no network.
//!
//! # Running
//!
//! ```text
//! # once: install the CLIs somewhere (the tests never install anything)
//! mkdir -p /tmp/clis && cd /tmp/clis && npm install @anthropic-ai/claude-code @openai/codex @google/gemini-cli
//! # then, from the project
//! cargo build
//! RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored --nocapture
//! ```
//!
//! A plain `cargo test` lists every test here as ignored (not run); with
//! `-- --ignored` they run, and a CLI or mock that cannot be found fails its
//! tests, naming what is missing. CLIs are
//! looked up under `$RUNNER_E2E_NPM_PREFIX` (`node_modules/.bin/`, `bin/`, or
//! the prefix itself), then on `PATH`. For codex the native binary next to the
//! npm wrapper is preferred (agent-clis.md §2.1); `RUNNER_E2E_CODEX_BIN`
//! overrides it. `RUNNER_E2E_MOCK` overrides the path of the mock script;
//! `python3` must be on `PATH`.
//!
//! # What runs
//!
//! For each CLI, five independent tests (`<cli>_<n>_<case>`), each with its
//! own temporary root, `HOME`, worktree and mock server on a free loopback
//! port; agents are `lead`s (they wait for mail, so a second turn is allowed):
//!
//! 1. `text`: a plain turn → exit 0, outcome `waiting`, a `result` and a
//!    `turn_end` event, the mock's text as `result_text`.
//! 2. `tool`: the mock makes the model call the shell (`RUN: …`) → the command
//!    really ran in the worktree, `tool_start`/`tool_end` events.
//! 3. `resume`: two turns; the second resumes the first one's session
//!    (`resume_requested` = first `session_id`, no `resume_mismatch`) and the
//!    model received the earlier history.
//! 4. `stop`: the model runs `sleep 300`; once the agent is `in_turn` and the
//!    sleep exists, `runner stop` → the turn exits 130, outcome `stopped`, and
//!    no process of the turn (the sleep included) is alive.
//! 5. `refused`: a CLI that refuses to start (claude as root in
//!    bypassPermissions without `IS_SANDBOX=1` — or an unknown flag when not
//!    root; codex with an unknown flag; gemini without auth config) → exit 5,
//!    outcome `refused`, and the CLI's own stderr line in `runner turn`'s
//!    output, the turn row (`reason`, `stderr_tail`) and `runner status`.
//!
//! Every wait is a poll with a deadline; processes a failed test leaves
//! behind are found by the test's unique temp path in their environment and
//! killed by pid.

use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_runner");

/// Longest a single `runner` command (a whole turn included) may take.
const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for the long tool call to be under way.
const START_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cli {
    Claude,
    Codex,
    Gemini,
}

impl Cli {
    fn name(self) -> &'static str {
        match self {
            Cli::Claude => "claude",
            Cli::Codex => "codex",
            Cli::Gemini => "gemini",
        }
    }

    /// The `tool_name` the runner records for a shell tool call.
    fn shell_tool(self) -> &'static str {
        match self {
            Cli::Claude => "Bash",
            Cli::Codex => "command_execution",
            Cli::Gemini => "run_shell_command",
        }
    }
}

/// Working setup or a broken one (case 5).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Working,
    Refusing,
}

// ---------------------------------------------------------------- discovery

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_cli(name: &str) -> Option<PathBuf> {
    if let Some(prefix) = std::env::var_os("RUNNER_E2E_NPM_PREFIX") {
        let prefix = PathBuf::from(prefix);
        for c in [
            prefix.join("node_modules/.bin").join(name),
            prefix.join("bin").join(name),
            prefix.join(name),
        ] {
            if is_executable(&c) {
                return Some(c);
            }
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|c| is_executable(c))
}

/// `dir/<entries starting with prefix>/rest`, existing and executable.
fn glob_one(dir: &Path, prefix: &str, rest: &[&str]) -> Option<PathBuf> {
    let mut found = Vec::new();
    for e in fs::read_dir(dir).ok()?.flatten() {
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let mut paths = vec![e.path()];
        for part in rest {
            paths = paths
                .into_iter()
                .flat_map(|p| {
                    if *part == "*" {
                        fs::read_dir(&p)
                            .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
                            .unwrap_or_default()
                    } else {
                        vec![p.join(part)]
                    }
                })
                .collect();
        }
        found.extend(paths.into_iter().filter(|p| is_executable(p)));
    }
    found.sort();
    found.into_iter().next()
}

/// The native codex binary behind the npm wrapper, if there is one.
fn codex_native(found: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("RUNNER_E2E_CODEX_BIN") {
        return PathBuf::from(p);
    }
    let real = fs::canonicalize(found).unwrap_or_else(|_| found.to_path_buf());
    let mut head = [0u8; 2];
    let is_script = fs::File::open(&real)
        .and_then(|mut f| f.read_exact(&mut head))
        .map(|_| &head == b"#!")
        .unwrap_or(false);
    if !is_script {
        return real;
    }
    // …/@openai/codex/bin/codex.js → the package dir …/@openai/codex
    if let Some(pkg) = real.parent().and_then(Path::parent) {
        let rest = ["vendor", "*", "bin", "codex"];
        let candidates = [
            pkg.parent()
                .and_then(|scope| glob_one(scope, "codex-linux-", &rest)),
            glob_one(&pkg.join("node_modules/@openai"), "codex-linux-", &rest),
            glob_one(&pkg.join("vendor"), "", &["codex", "codex"]),
        ];
        if let Some(p) = candidates.into_iter().flatten().next() {
            return p;
        }
    }
    eprintln!("note: no native codex binary found next to {real:?}; using the Node wrapper");
    found.to_path_buf()
}

fn mock_script() -> PathBuf {
    std::env::var_os("RUNNER_E2E_MOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/mock-model-api.py")
        })
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

// ---------------------------------------------------------------- polling

/// Polls `f` until it gives `Some`, or panics naming `what` after `timeout`.
fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------- processes

/// A live (non-zombie) process.
#[derive(Debug)]
struct Proc {
    pid: i32,
    cmdline: String,
}

/// Live processes with an environment entry for which `pred` holds.
fn procs_with_env(pred: impl Fn(&str) -> bool) -> Vec<Proc> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = e.path();
        let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .unwrap_or("");
        if state == "Z" || state == "X" {
            continue;
        }
        let Ok(env) = fs::read(dir.join("environ")) else {
            continue;
        };
        if env
            .split(|b| *b == 0)
            .any(|kv| pred(&String::from_utf8_lossy(kv)))
        {
            let cmdline = fs::read(dir.join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            out.push(Proc { pid, cmdline });
        }
    }
    out
}

fn kill_pid(pid: i32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------- mock server

struct Mock {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Mock {
    fn start(dir: &Path) -> Result<Mock, String> {
        let script = mock_script();
        if !script.is_file() {
            return Err(format!(
                "mock model API not found at {script:?} (set RUNNER_E2E_MOCK)"
            ));
        }
        if find_cli("python3").is_none() {
            return Err("python3 not on PATH (needed for the mock model API)".into());
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free loopback port: {e}"))?
            .port();
        let log = dir.join("mock-log");
        fs::create_dir_all(&log).map_err(|e| e.to_string())?;
        let out = fs::File::create(dir.join("mock.stderr")).map_err(|e| e.to_string())?;
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .env("MOCK_LOG", &log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot start the mock: {e}"))?;
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Mock { child, port, log });
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("the mock exited at start: {st}"));
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the mock did not listen within 15 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every request body the mock logged, as text.
    fn requests(&self) -> Vec<String> {
        let mut files: Vec<_> = fs::read_dir(&self.log)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .filter_map(|p| fs::read_to_string(p).ok())
            .collect()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- one test's world

/// The outcome of one `runner` command.
struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    args: Vec<String>,
}

impl Out {
    fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    fn both(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    #[track_caller]
    fn expect(&self, code: i32) -> &Out {
        assert_eq!(
            self.code(),
            code,
            "runner {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("runner {:?}: not JSON ({e}): {}", self.args, self.stdout))
    }
}

struct World {
    cli: Cli,
    dir: tempfile::TempDir,
    /// The canonical temp path: unique to this test, found in the environment
    /// of every process it starts (HOME, RUNNER_ROOT).
    tag: String,
    mock: Mock,
    /// Environment given to every `runner` command.
    env: Vec<(String, String)>,
    bg: Vec<Child>,
}

impl World {
    /// Sets up a world for `cli`. These tests run only when asked for
    /// (`--ignored`): a missing prerequisite then fails the test, saying
    /// which, rather than passing without having run.
    fn new(cli: Cli, setup: Setup) -> World {
        let fail = |why: String| -> ! { panic!("e2e {} cannot run: {why}", cli.name()) };
        let Some(found) = find_cli(cli.name()) else {
            fail(format!(
                "`{}` is not installed (not on PATH nor under $RUNNER_E2E_NPM_PREFIX)",
                cli.name()
            ));
        };
        let bin = if cli == Cli::Codex {
            codex_native(&found)
        } else {
            found
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("runner-e2e-{}-", cli.name()))
            .tempdir()
            .expect("temp dir");
        let tag = fs::canonicalize(dir.path())
            .unwrap_or_else(|_| dir.path().to_path_buf())
            .to_string_lossy()
            .into_owned();
        let mock = match Mock::start(dir.path()) {
            Ok(m) => m,
            Err(why) => fail(why),
        };
        let home = dir.path().join("home");
        fs::create_dir_all(home.join(".gemini")).unwrap();
        fs::create_dir_all(dir.path().join("wt")).unwrap();
        let port = mock.port;
        let mut env: Vec<(String, String)> = vec![("HOME".into(), path_str(&home))];
        let s = |v: &[&str]| serde_json::to_string(v).unwrap();
        match cli {
            Cli::Claude => {
                let mut e = serde_json::json!({
                    "CLAUDE_CODE_USE_VERTEX": "1",
                    "CLAUDE_CODE_SKIP_VERTEX_AUTH": "1",
                    "ANTHROPIC_VERTEX_BASE_URL": format!("http://127.0.0.1:{port}/v1"),
                    "ANTHROPIC_VERTEX_PROJECT_ID": "mock",
                    "CLOUD_ML_REGION": "us-east5",
                    "CLAUDE_CODE_MAX_RETRIES": "1",
                });
                match setup {
                    // As root, claude refuses bypassPermissions (the runner's
                    // default) unless IS_SANDBOX=1 is in its environment.
                    Setup::Working => {
                        e["IS_SANDBOX"] = "1".into();
                    }
                    Setup::Refusing if !running_as_root() => {
                        env.push((
                            "RUNNER_RUNTIME_CLAUDE_ARGS".into(),
                            s(&["--no-such-flag-e2e"]),
                        ));
                    }
                    Setup::Refusing => {}
                }
                env.push(("RUNNER_RUNTIME_CLAUDE_BIN".into(), path_str(&bin)));
                env.push(("RUNNER_RUNTIME_CLAUDE_ENV".into(), e.to_string()));
            }
            Cli::Codex => {
                let base = format!("model_providers.mock.base_url=http://127.0.0.1:{port}/v1");
                let mut args = vec![
                    "-c",
                    "model_provider=mock",
                    "-c",
                    "model_providers.mock.name=mock",
                    "-c",
                    &base,
                    "-c",
                    "model_providers.mock.wire_api=responses",
                    "-c",
                    "model_providers.mock.request_max_retries=0",
                    "-c",
                    "model_providers.mock.stream_max_retries=0",
                    "-m",
                    "gpt-5.5",
                ];
                if setup == Setup::Refusing {
                    args.push("--no-such-flag-e2e");
                }
                env.push(("RUNNER_RUNTIME_CODEX_BIN".into(), path_str(&bin)));
                env.push(("RUNNER_RUNTIME_CODEX_ARGS".into(), s(&args)));
            }
            Cli::Gemini => {
                // Without `useExternal` (or any other auth config) gemini
                // refuses to start headless.
                if setup == Setup::Working {
                    fs::write(
                        home.join(".gemini/settings.json"),
                        r#"{"security":{"auth":{"useExternal":true}}}"#,
                    )
                    .unwrap();
                }
                let e = serde_json::json!({"GOOGLE_GEMINI_BASE_URL": format!("http://127.0.0.1:{port}")});
                env.push(("RUNNER_RUNTIME_GEMINI_BIN".into(), path_str(&bin)));
                env.push(("RUNNER_RUNTIME_GEMINI_ENV".into(), e.to_string()));
            }
        }
        eprintln!(
            "e2e {}: {} (mock on port {port}, dir {tag})",
            cli.name(),
            bin.display()
        );
        World {
            cli,
            dir,
            tag,
            mock,
            env,
            bg: Vec::new(),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn worktree(&self) -> PathBuf {
        self.dir.path().join("wt")
    }

    fn command(&self, args: &[&str], n: &str) -> (Command, PathBuf, PathBuf) {
        let mut c = Command::new(BIN);
        c.arg("--root").arg(self.root()).args(args);
        // A clean environment as far as the runner and the CLIs are concerned.
        for (k, _) in std::env::vars() {
            let drop = k.starts_with("RUNNER_")
                || k.starts_with("OVERSTORY_")
                || k.starts_with("ANTHROPIC_")
                || k.starts_with("CLAUDE_")
                || k.starts_with("OPENAI_")
                || k.starts_with("CODEX_")
                || k.starts_with("GEMINI_")
                || k.starts_with("GOOGLE_")
                || k.starts_with("XDG_")
                || [
                    "CLAUDECODE",
                    "IS_SANDBOX",
                    "CLOUD_ML_REGION",
                    "RUST_LOG",
                    "RUST_BACKTRACE",
                ]
                .contains(&k.as_str());
            if drop {
                c.env_remove(&k);
            }
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.current_dir(self.dir.path()).stdin(Stdio::null());
        let out = self.dir.path().join(format!("cmd-{n}.stdout"));
        let err = self.dir.path().join(format!("cmd-{n}.stderr"));
        c.stdout(fs::File::create(&out).unwrap());
        c.stderr(fs::File::create(&err).unwrap());
        (c, out, err)
    }

    /// Runs `runner ARGS` to completion (bounded by [`CMD_TIMEOUT`]).
    fn run(&self, args: &[&str]) -> Out {
        let n = unique();
        let (mut c, out, err) = self.command(args, &n);
        let mut child = c.spawn().expect("spawn runner");
        let status = wait_child(&mut child, CMD_TIMEOUT)
            .unwrap_or_else(|| {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "runner {args:?} did not finish within {CMD_TIMEOUT:?}\n--- stdout\n{}\n--- stderr\n{}",
                    read(&out),
                    read(&err)
                )
            });
        Out {
            status,
            stdout: read(&out),
            stderr: read(&err),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Starts `runner ARGS` in the background; returns its index and output files.
    fn spawn(&mut self, args: &[&str]) -> (usize, PathBuf, PathBuf) {
        let n = unique();
        let (mut c, out, err) = self.command(args, &n);
        let child = c.spawn().expect("spawn runner");
        self.bg.push(child);
        (self.bg.len() - 1, out, err)
    }

    fn add_agent(&self, name: &str) {
        let wt = path_str(&self.worktree());
        self.run(&[
            "agent",
            "add",
            name,
            "--capability",
            "lead",
            "--runtime",
            self.cli.name(),
            "--worktree",
            &wt,
        ])
        .expect(0);
    }

    fn turn(&self, agent: &str, message: &str) -> Out {
        self.run(&[
            "turn",
            "--agent",
            agent,
            "--message",
            message,
            "--stall",
            "60s",
            "--grace",
            "2s",
        ])
    }

    /// The newest turn row of `agent`.
    fn last_turn(&self, agent: &str) -> Value {
        let v = self
            .run(&["turns", "--agent", agent, "--limit", "1", "--json"])
            .expect(0)
            .json();
        v.as_array()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_else(|| panic!("no turn row for {agent}: {v}"))
    }

    fn events(&self, turn_id: &str) -> Vec<Value> {
        let v = self
            .run(&["events", "--turn", turn_id, "--json"])
            .expect(0)
            .json();
        v.as_array().cloned().unwrap_or_default()
    }

    fn agent(&self, agent: &str) -> Value {
        self.run(&["agent", "show", agent, "--json"])
            .expect(0)
            .json()
    }

    /// A readable dump for failure messages.
    fn context(&self, row: &Value) -> String {
        let turn_dir = |f: &str| {
            let id = row["turn_id"].as_str().unwrap_or("");
            let agent = row["agent_name"].as_str().unwrap_or("");
            read(&self.root().join("logs").join(agent).join(id).join(f))
        };
        format!(
            "turn row: {row:#}\n--- stderr.log\n{}\n--- runner.log\n{}",
            turn_dir("stderr.log"),
            turn_dir("runner.log")
        )
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &mut self.bg {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever a failed test left behind: processes whose environment
        // names this test's unique temp dir (HOME, RUNNER_ROOT, …).
        let tag = self.tag.clone();
        let mock = self.mock.child.id() as i32;
        for p in procs_with_env(|kv| kv.contains(&tag)) {
            if p.pid != mock {
                eprintln!("cleanup: killing leftover pid {} ({})", p.pid, p.cmdline);
                kill_pid(p.pid);
            }
        }
        if std::thread::panicking() {
            // Keep the root, logs and mock requests of a failed test.
            self.dir.disable_cleanup(true);
            eprintln!("e2e {}: kept {} for inspection", self.cli.name(), self.tag);
        }
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A short string unique within this test binary run.
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

// ---------------------------------------------------------------- the cases

/// (1) A plain text turn.
fn case_text(cli: Cli) {
    let w = World::new(cli, Setup::Working);
    w.add_agent("e2e-text");
    let out = w.turn("e2e-text", "hello");
    let row = w.last_turn("e2e-text");
    assert_eq!(
        out.code(),
        0,
        "runner turn: {}\n{}",
        out.both(),
        w.context(&row)
    );
    assert_eq!(s(&row, "outcome"), "waiting", "{}", w.context(&row));
    assert_eq!(row["clean_result"], true, "{}", w.context(&row));
    assert_eq!(s(&row, "final_state"), "between_turns");
    assert!(
        !s(&row, "session_id").is_empty(),
        "no session id: {}",
        w.context(&row)
    );
    assert!(
        s(&row, "result_text").contains("Hello from mock"),
        "result_text: {}",
        w.context(&row)
    );
    let events = w.events(s(&row, "turn_id"));
    let types: Vec<&str> = events.iter().map(|e| s(e, "event_type")).collect();
    assert!(types.contains(&"result"), "no result event: {types:?}");
    assert_eq!(types.first(), Some(&"turn_start"), "{types:?}");
    assert_eq!(types.last(), Some(&"turn_end"), "{types:?}");
    assert!(types.contains(&"session_start"), "{types:?}");
    eprintln!("e2e {} text: ok ({types:?})", cli.name());
}

/// (2) A turn whose tool call runs a shell command.
fn case_tool(cli: Cli) {
    let w = World::new(cli, Setup::Working);
    w.add_agent("e2e-tool");
    let marker = format!("e2e-tool-ran-{}", unique());
    let out = w.turn("e2e-tool", &format!("RUN: echo {marker} > e2e-tool.txt"));
    let row = w.last_turn("e2e-tool");
    assert_eq!(
        out.code(),
        0,
        "runner turn: {}\n{}",
        out.both(),
        w.context(&row)
    );
    assert_eq!(s(&row, "outcome"), "waiting", "{}", w.context(&row));
    let written = read(&w.worktree().join("e2e-tool.txt"));
    assert_eq!(
        written.trim(),
        marker,
        "the shell command did not run in the worktree"
    );
    assert!(
        s(&row, "result_text").contains("MOCK_DONE"),
        "{}",
        w.context(&row)
    );
    let events = w.events(s(&row, "turn_id"));
    let tool = |t: &str| {
        events
            .iter()
            .find(|e| s(e, "event_type") == t)
            .unwrap_or_else(|| panic!("no {t} event in {events:#?}"))
            .clone()
    };
    let start = tool("tool_start");
    assert_eq!(s(&start, "tool_name"), cli.shell_tool(), "{start:#}");
    assert!(s(&start, "tool_args").contains(&marker), "{start:#}");
    let end = tool("tool_end");
    assert_eq!(s(&end, "tool_name"), cli.shell_tool(), "{end:#}");
    assert_ne!(s(&end, "level"), "warn", "the tool call failed: {end:#}");
    assert!(events.iter().any(|e| s(e, "event_type") == "result"));
    eprintln!("e2e {} tool: ok", cli.name());
}

/// (3) A resumed second turn in the same worktree.
fn case_resume(cli: Cli) {
    let w = World::new(cli, Setup::Working);
    w.add_agent("e2e-resume");
    let first = w.turn("e2e-resume", "hello");
    let row1 = w.last_turn("e2e-resume");
    assert_eq!(
        first.code(),
        0,
        "turn 1: {}\n{}",
        first.both(),
        w.context(&row1)
    );
    let sid = s(&row1, "session_id").to_string();
    assert!(
        !sid.is_empty(),
        "turn 1 reported no session: {}",
        w.context(&row1)
    );
    assert!(row1["resume_requested"].is_null(), "{}", w.context(&row1));
    assert_eq!(s(&w.agent("e2e-resume"), "claude_session_id"), sid);

    let second_text = format!("second turn after resume {}", unique());
    let second = w.turn("e2e-resume", &second_text);
    let row2 = w.last_turn("e2e-resume");
    assert_ne!(row2["turn_id"], row1["turn_id"]);
    assert_eq!(
        second.code(),
        0,
        "turn 2: {}\n{}",
        second.both(),
        w.context(&row2)
    );
    assert_eq!(s(&row2, "outcome"), "waiting", "{}", w.context(&row2));
    assert_eq!(s(&row2, "resume_requested"), sid, "{}", w.context(&row2));
    assert_eq!(row2["resume_mismatch"], false, "{}", w.context(&row2));
    assert_eq!(s(&row2, "session_id"), sid, "{}", w.context(&row2));
    let types: Vec<String> = w
        .events(s(&row2, "turn_id"))
        .iter()
        .map(|e| s(e, "event_type").to_string())
        .collect();
    assert!(types.iter().any(|t| t == "result"), "{types:?}");
    // The CLI really resumed: the model got the first turn's answer as history.
    let reqs = w.mock.requests();
    assert!(
        reqs.iter()
            .any(|r| r.contains(&second_text) && r.contains("Hello from mock")),
        "no model request carried the first turn's history with the second message ({} requests)",
        reqs.len()
    );
    eprintln!("e2e {} resume: ok (session {sid})", cli.name());
}

/// (4) `runner stop` during a long tool call.
fn case_stop(cli: Cli) {
    let mut w = World::new(cli, Setup::Working);
    let agent = "e2e-stop";
    w.add_agent(agent);
    let mark = format!("E2E_MARK={}-{}", cli.name(), unique());
    let msg = format!("RUN: {mark} sleep 300");
    let (idx, out_f, err_f) = w.spawn(&[
        "turn",
        "--agent",
        agent,
        "--message",
        &msg,
        "--stall",
        "60s",
        "--grace",
        "2s",
    ]);

    // Wait until the agent is in_turn and the sleep of this turn exists.
    let turn_id = wait_until(
        "the agent to be in_turn with the sleep running",
        START_TIMEOUT,
        || {
            if let Ok(Some(st)) = w.bg[idx].try_wait() {
                panic!(
                    "runner turn exited early ({st})\n--- stdout\n{}\n--- stderr\n{}",
                    read(&out_f),
                    read(&err_f)
                );
            }
            let a = w.agent(agent);
            if s(&a, "state") != "in_turn" {
                return None;
            }
            let id = a["running"]["turn_id"].as_str()?.to_string();
            let sleeps = procs_with_env(|kv| kv == mark);
            (!sleeps.is_empty()).then_some(id)
        },
    );
    let sleeps = procs_with_env(|kv| kv == mark);
    eprintln!(
        "e2e {} stop: turn {turn_id}, sleep {:?}",
        cli.name(),
        sleeps
    );

    let t0 = Instant::now();
    let stop = w.run(&["stop", "--agent", agent, "--grace", "2s", "--wait", "60s"]);
    assert_eq!(stop.code(), 0, "runner stop: {}", stop.both());
    let status = wait_child(&mut w.bg[idx], Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "runner turn still running 60 s after runner stop\n{}",
            read(&err_f)
        )
    });
    let took = t0.elapsed();
    let turn_out = format!("{}\n{}", read(&out_f), read(&err_f));

    // Nothing of the turn may be alive now: not the sleep, not the CLI.
    let left_sleep = procs_with_env(|kv| kv == mark);
    let turn_env = format!("RUNNER_TURN_ID={turn_id}");
    let left_turn = procs_with_env(|kv| kv == turn_env);

    let row = w.last_turn(agent);
    assert_eq!(s(&row, "turn_id"), turn_id);
    assert_eq!(
        status.code(),
        Some(130),
        "runner turn: {turn_out}\n{}",
        w.context(&row)
    );
    assert_eq!(s(&row, "outcome"), "stopped", "{}", w.context(&row));
    assert_eq!(s(&row, "final_state"), "completed", "{}", w.context(&row));
    assert_eq!(s(&w.agent(agent), "state"), "completed");
    assert!(
        left_sleep.is_empty(),
        "the sleep of the turn survived: {left_sleep:?}"
    );
    assert!(
        left_turn.is_empty(),
        "processes of the turn survived: {left_turn:?}"
    );
    // Stopping must not wait for the 300 s sleep (grace 2 s, twice, plus slack).
    assert!(took < Duration::from_secs(30), "stop took {took:?}");
    eprintln!(
        "e2e {} stop: ok in {took:?} (leaked={})",
        cli.name(),
        row["leaked"]
    );
}

/// (5) A CLI that refuses to run: its own stderr line must be shown.
fn case_refused(cli: Cli) {
    let w = World::new(cli, Setup::Refusing);
    let agent = "e2e-refused";
    w.add_agent(agent);
    // The line each CLI prints on stderr (matched case-insensitively).
    let needle = match cli {
        Cli::Claude if running_as_root() => "cannot be used with root/sudo privileges",
        Cli::Claude => "no-such-flag-e2e",
        Cli::Codex => "unexpected argument '--no-such-flag-e2e'",
        Cli::Gemini => "auth method",
    };
    let has = |hay: &str| hay.to_lowercase().contains(&needle.to_lowercase());
    let out = w.turn(agent, "hello");
    let row = w.last_turn(agent);
    assert_eq!(
        out.code(),
        5,
        "runner turn: {}\n{}",
        out.both(),
        w.context(&row)
    );
    assert_eq!(s(&row, "outcome"), "refused", "{}", w.context(&row));
    assert!(
        has(&out.both()),
        "runner turn's output lacks {needle:?}:\n{}",
        out.both()
    );
    assert!(
        has(s(&row, "stderr_tail")),
        "stderr_tail lacks {needle:?}: {}",
        w.context(&row)
    );
    assert!(
        has(s(&row, "reason")),
        "the turn row's reason is not the CLI's error line {needle:?}: reason = {:?}\n{}",
        s(&row, "reason"),
        w.context(&row)
    );
    let status = w.run(&["status"]).expect(0).both();
    assert!(has(&status), "runner status lacks {needle:?}:\n{status}");
    // Refused leaves the state alone.
    assert_eq!(s(&w.agent(agent), "state"), "booting");
    eprintln!(
        "e2e {} refused: ok (reason {:?})",
        cli.name(),
        s(&row, "reason")
    );
}

#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn claude_1_text() {
    case_text(Cli::Claude)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn claude_2_tool() {
    case_tool(Cli::Claude)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn claude_3_resume() {
    case_resume(Cli::Claude)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn claude_4_stop() {
    case_stop(Cli::Claude)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn claude_5_refused() {
    case_refused(Cli::Claude)
}

#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn codex_1_text() {
    case_text(Cli::Codex)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn codex_2_tool() {
    case_tool(Cli::Codex)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn codex_3_resume() {
    case_resume(Cli::Codex)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn codex_4_stop() {
    case_stop(Cli::Codex)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn codex_5_refused() {
    case_refused(Cli::Codex)
}

#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn gemini_1_text() {
    case_text(Cli::Gemini)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn gemini_2_tool() {
    case_tool(Cli::Gemini)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn gemini_3_resume() {
    case_resume(Cli::Gemini)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn gemini_4_stop() {
    case_stop(Cli::Gemini)
}
#[test]
#[ignore = "end-to-end against the real CLIs; run: RUNNER_E2E_NPM_PREFIX=/tmp/clis cargo test --test e2e -- --ignored"]
fn gemini_5_refused() {
    case_refused(Cli::Gemini)
}
