//! Operability (issue 17): `runner doctor` against roots broken one way
//! each, completions and the man page, `serve` run exactly as the systemd
//! unit in `contrib/` runs it, and a disk that fills mid-turn.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::{TestRoot, wait_child, wait_for};

// ---------------------------------------------------------------- systemd unit

/// `Key=value` lines of the `[Service]` section of the unit file.
fn unit_service_keys() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/runner-serve.service"),
    )
    .unwrap();
    let mut in_service = false;
    let mut keys = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            keys.push((k.to_string(), v.to_string()));
        }
    }
    keys
}

fn unit_key(keys: &[(String, String)], key: &str) -> String {
    keys.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("the unit has no {key}="))
}

/// Runs `serve` as the unit does (its ExecStart arguments, its environment
/// with `%h` a fresh home), SIGTERMs the main process only (KillMode=mixed)
/// mid-turn, and checks the stop is clean within TimeoutStopSec.
#[test]
fn serve_under_the_systemd_unit_stops_cleanly_on_sigterm() {
    let keys = unit_service_keys();
    assert_eq!(unit_key(&keys, "KillMode"), "mixed");
    assert_eq!(unit_key(&keys, "KillSignal"), "SIGTERM");
    assert_eq!(unit_key(&keys, "Restart"), "on-failure");
    assert_eq!(unit_key(&keys, "StandardError"), "journal");
    let stop_timeout: u64 = unit_key(&keys, "TimeoutStopSec").parse().unwrap();

    let t = TestRoot::new();
    let home = t.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let h = |v: &str| v.replace("%h", &home.display().to_string());
    let env = h(&unit_key(&keys, "Environment"));
    let (env_key, root) = env.split_once('=').unwrap();
    assert_eq!(env_key, "RUNNER_ROOT");
    let exec = h(&unit_key(&keys, "ExecStart"));
    let mut argv = exec.split_whitespace();
    assert!(argv.next().unwrap().ends_with("/runner"));
    let args: Vec<&str> = argv.collect();
    assert_eq!(args[0], "serve");

    // The agent, its mail and the in-flight turn, under the unit's root.
    let runner = |a: &[&str]| {
        let out = Command::new(crate::BIN)
            .args(a)
            .env(env_key, root)
            .current_dir(h(&unit_key(&keys, "WorkingDirectory")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{a:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    runner(&["init"]);
    let wt = t.path().display().to_string();
    runner(&[
        "agent",
        "add",
        "svc",
        "--capability",
        "builder",
        "--worktree",
        &wt,
        "--command",
        crate::BIN,
        "fake-agent",
        "--stall",
    ]);
    let id = runner(&[
        "mail", "send", "--from", "lead", "--to", "svc", "--body", "go",
    ]);

    let serve = Command::new(crate::BIN)
        .args(&args)
        .env(env_key, root)
        .current_dir(h(&unit_key(&keys, "WorkingDirectory")))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let db = |name: &str| {
        let c = rusqlite::Connection::open(Path::new(root).join(name)).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    };
    let q = |name: &str, sql: &str| -> i64 { db(name).query_row(sql, [], |r| r.get(0)).unwrap() };
    wait_for(Duration::from_secs(30), "the turn in flight", || {
        q(
            "sessions.db",
            "SELECT COUNT(*) FROM sessions WHERE state='in_turn'",
        ) == 1
    });
    let t0 = Instant::now();
    crate::signal(serve.id(), Signal::SIGTERM);
    let out = wait_child(serve, Duration::from_secs(stop_timeout));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t0.elapsed() < Duration::from_secs(stop_timeout));
    assert_eq!(
        q(
            "sessions.db",
            "SELECT COUNT(*) FROM turns WHERE outcome='interrupted' AND ended_at IS NOT NULL"
        ),
        1
    );
    assert_eq!(
        q(
            "sessions.db",
            "SELECT COUNT(*) FROM turns WHERE ended_at IS NULL"
        ),
        0
    );
    let (read, tries, claimed): (i64, i64, Option<String>) = db("mail.db")
        .query_row(
            "SELECT read, tries, claimed_by FROM messages WHERE id=?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (read, tries, claimed),
        (0, 0, None),
        "mail pending, tries unchanged"
    );
    let tag = format!("RUNNER_ROOT={root}");
    let live: Vec<i32> = runner::os::all_pids()
        .into_iter()
        .filter(|&p| {
            runner::os::is_alive(p, None) && runner::os::environ_contains(p, tag.as_bytes())
        })
        .collect();
    assert!(
        live.is_empty(),
        "agent processes alive after the stop: {live:?}"
    );
    assert!(!Path::new(root).join("agents/svc/turn.pid").exists());
}

// ---------------------------------------------------------------- a full disk

/// A tmpfs mounted for one test, unmounted when dropped (even on failure).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` on `dir`, or says why it cannot.
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (it needs root or CAP_SYS_ADMIN): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        self.remount(&format!("size={size}"));
    }

    fn remount(&self, opts: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "remount: {out:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `f` on a tmpfs of `size` at the test root, or prints plainly why the
/// test was not run (never a silent pass). `RUNNER_TEST_REQUIRE_MOUNT=1`
/// (CI) turns "cannot mount" into a failure.
fn on_small_disk(t: &TestRoot, size: &str, test: &str, f: impl FnOnce(&Tmpfs)) {
    match Tmpfs::mount(&t.root(), size) {
        Ok(fs) => f(&fs),
        Err(why) => {
            assert!(
                std::env::var("RUNNER_TEST_REQUIRE_MOUNT").is_err(),
                "{test}: {why}"
            );
            eprintln!("ops::{test} was NOT RUN: {why}");
        }
    }
}

/// A turn that fills the disk: exit 74 with what to do, every process of
/// the turn killed at once, nothing hangs; after space is freed the sweep
/// finishes the row and replays every line that reached stdout.ndjson.
#[test]
fn a_disk_that_fills_mid_turn_ends_the_turn_with_74_and_the_sweep_repairs_it() {
    let t = TestRoot::new();
    on_small_disk(&t, "3m", "a_disk_that_fills_mid_turn", |fs| {
        // 200 MB of output then silence: only an abort ends this turn early.
        t.agent(
            "filler",
            "builder",
            None,
            &["--lines", "100000", "--line-bytes", "2000", "--stall"],
        );
        let id = t.mail("lead", "filler", "fill the disk");
        let child = t
            .cmd([
                "turn", "--agent", "filler", "--json", "--stall", "10m", "--grace", "200ms",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_child(child, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(74), "stderr: {stderr}");
        let want = format!(
            "disk full under {}: free space, then run runner sweep",
            t.root().display()
        );
        assert!(stderr.contains(&want), "stderr: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        t.assert_clean("filler");
        let turn_id = t
            .str(
                "sessions.db",
                "SELECT turn_id FROM turns WHERE agent_name='filler'",
            )
            .unwrap();
        assert_eq!(
            t.i64(
                "sessions.db",
                "SELECT COUNT(*) FROM turns WHERE ended_at IS NULL"
            ),
            1,
            "the row is left for the sweep"
        );

        fs.resize("256m");
        let r = t.run(["sweep", "--json"]);
        r.status(0);
        assert_eq!(r.json()["orphan_turns"], 1, "{}", r.stdout());
        let row = t.last_turn("filler");
        assert_eq!(row["outcome"], "failed");
        assert_eq!(row["reason"], "runner died");
        let log = std::fs::read(t.turn_dir("filler", &turn_id).join("stdout.ndjson")).unwrap();
        let complete_lines = log.iter().filter(|&&b| b == b'\n').count() as i64;
        assert!(complete_lines > 0);
        let ev = t.db("events.db");
        let lines_in_events: i64 = ev
            .query_row(
                "SELECT COUNT(DISTINCT line_no) FROM events WHERE turn_id=?1 AND line_no <= ?2",
                runner::store::db::params![turn_id, complete_lines],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            lines_in_events, complete_lines,
            "every line that reached stdout.ndjson is in events"
        );
        let duplicated: i64 = ev
            .query_row(
                "SELECT COUNT(*) FROM (SELECT 1 FROM events WHERE turn_id=?1 AND line_no IS NOT NULL \
                 GROUP BY line_no, event_type, data HAVING COUNT(*) > 1) AS dup",
                runner::store::db::params![turn_id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(duplicated, 0, "no line is in events twice");
        let (read, _tries, claimed) = t.mail_state(&id);
        assert_eq!(
            (read, claimed),
            (0, None),
            "the mail is released for a retry"
        );
        t.assert_clean("filler");
    });
}

// ---------------------------------------------------------------- doctor

/// `runner doctor --json` with `env`: its exit code and checks.
fn doctor(t: &TestRoot, env: &[(&str, &str)]) -> (i32, Vec<serde_json::Value>) {
    let r = t.run_env(env, ["doctor", "--json"]);
    assert!(!r.stderr().contains("panicked"), "{}", r.stderr());
    let v = r.json();
    assert_eq!(v["ok"], r.code() == 0, "{}", r.stdout());
    (r.code(), v["checks"].as_array().unwrap().clone())
}

/// The check named `name`: asserts its level and that its detail (or fix)
/// mentions `needle`; returns it.
#[track_caller]
fn expect(
    checks: &[serde_json::Value],
    name: &str,
    level: &str,
    needle: &str,
) -> serde_json::Value {
    let c = checks
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {checks:#?}"))
        .clone();
    assert_eq!(c["level"], level, "{c:#}");
    let text = format!("{} {}", c["detail"], c["fix"]);
    assert!(
        text.contains(needle),
        "{name} should mention {needle:?}: {c:#}"
    );
    if level != "ok" {
        assert!(
            c["fix"].as_str().is_some_and(|f| !f.is_empty()),
            "a fix: {c:#}"
        );
    }
    c
}

/// A stand-in agent CLI that answers `--version` and records its arguments.
fn fake_cli(t: &TestRoot, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = t.path().join(name);
    std::fs::write(
        &p,
        format!("#!/bin/sh\necho \"$@\" >> {}.args\n{body}\n", p.display()),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}

/// A root with agents of two runtimes, a turn behind it, a config file and
/// a capability file of its own.
fn healthy(t: &TestRoot) -> String {
    t.agent("a", "builder", None, &[]);
    t.mail("lead", "a", "x");
    t.run(["turn", "--agent", "a"]).status(0);
    let wt = t.path().display().to_string();
    t.run([
        "agent",
        "add",
        "c",
        "--capability",
        "scout",
        "--worktree",
        &wt,
        "--runtime",
        "claude",
    ])
    .status(0);
    std::fs::write(
        t.root().join("config.toml"),
        "[turn]\nstall_timeout = \"5m\"\n[runtime.claude]\nargs = [\"--x\"]\n",
    )
    .unwrap();
    std::fs::create_dir_all(t.root().join("capabilities")).unwrap();
    std::fs::write(
        t.root().join("capabilities/tester.md"),
        "+++\nterminal_mail = [\"worker_done\"]\non_idle = \"exit\"\n+++\nTest things.\n",
    )
    .unwrap();
    for p in ["config.toml", "capabilities/tester.md", "capabilities"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = if p == "capabilities" { 0o700 } else { 0o600 };
        std::fs::set_permissions(t.root().join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    fake_cli(t, "claude-cli", "echo '9.9.9 (Fake Code)'")
}

#[test]
fn doctor_on_a_healthy_root_reports_all_ok() {
    let t = TestRoot::sqlite();
    let claude = healthy(&t);
    let (code, checks) = doctor(&t, &[("RUNNER_RUNTIME_CLAUDE_BIN", &claude)]);
    assert_eq!(code, 0, "{checks:#?}");
    for c in &checks {
        assert_eq!(c["level"], "ok", "{c:#}");
    }
    for name in [
        "root",
        "modes",
        "disk space",
        "store sessions.db",
        "store mail.db",
        "store events.db",
        "config",
        "capabilities",
        "runtime claude",
        "runtime command",
        "leftovers",
        "states",
        "fleet",
    ] {
        expect(&checks, name, "ok", "");
    }
    expect(&checks, "runtime claude", "ok", "9.9.9 (Fake Code)");
    expect(&checks, "fleet", "ok", "PostgreSQL");
    // Only `--version`: no model call.
    let args = std::fs::read_to_string(format!("{claude}.args")).unwrap();
    assert_eq!(args, "--version\n");
    // The human form: one line per check.
    let r = t.run_env(&[("RUNNER_RUNTIME_CLAUDE_BIN", &claude)], ["doctor"]);
    r.status(0);
    assert_eq!(r.stdout().lines().count(), checks.len());
    assert!(
        r.stdout().lines().all(|l| l.starts_with("ok ")),
        "{}",
        r.stdout()
    );
}

#[test]
fn doctor_fails_on_a_missing_root_and_creates_nothing() {
    let t = TestRoot::sqlite();
    let (code, checks) = doctor(&t, &[]);
    assert_eq!(code, 1);
    expect(&checks, "root", "fail", "runner init");
    assert_eq!(checks.len(), 1, "nothing else can be checked: {checks:#?}");
    assert!(!t.root().exists(), "doctor must not create the root");
    let r = t.run(["doctor"]);
    r.status(1);
    assert!(r.stdout().starts_with("fail  root: "), "{}", r.stdout());
}

#[test]
fn doctor_fails_on_a_read_only_root() {
    let t = TestRoot::sqlite();
    on_small_disk(&t, "16m", "doctor_fails_on_a_read_only_root", |fs| {
        t.run(["init"]).status(0);
        fs.remount("ro");
        let (code, checks) = doctor(&t, &[]);
        assert_eq!(code, 1);
        expect(&checks, "root", "fail", "not writable");
    });
}

#[test]
fn doctor_warns_on_modes_open_to_others() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestRoot::sqlite();
    t.run(["init"]).status(0);
    std::fs::set_permissions(
        t.root().join("mail.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, checks) = doctor(&t, &[]);
    assert_eq!(code, 0, "a warning is not a failure");
    expect(&checks, "modes", "warn", "mail.db is 0644");
    expect(&checks, "modes", "warn", "chmod -R go-rwx");
}

#[test]
fn doctor_warns_when_the_roots_filesystem_is_nearly_full() {
    let t = TestRoot::sqlite();
    on_small_disk(
        &t,
        "8m",
        "doctor_warns_when_the_roots_filesystem_is_nearly_full",
        |_| {
            t.run(["init"]).status(0);
            let (code, checks) = doctor(&t, &[]);
            assert_eq!(code, 0);
            expect(&checks, "disk space", "warn", "nearly full");
            expect(&checks, "disk space", "warn", "exit 74");
        },
    );
}

#[test]
fn doctor_fails_on_a_store_that_is_not_ours() {
    let t = TestRoot::sqlite();
    t.run(["init"]).status(0);
    std::fs::remove_file(t.root().join("mail.db-wal")).ok();
    std::fs::remove_file(t.root().join("mail.db-shm")).ok();
    std::fs::write(t.root().join("mail.db"), vec![b'x'; 8192]).unwrap();
    // A SQLite file of someone else's with a table of the same name.
    std::fs::remove_file(t.root().join("events.db")).unwrap();
    std::fs::remove_file(t.root().join("events.db-wal")).ok();
    std::fs::remove_file(t.root().join("events.db-shm")).ok();
    rusqlite::Connection::open(t.root().join("events.db"))
        .unwrap()
        .execute_batch("CREATE TABLE events (x INTEGER)")
        .unwrap();
    let (code, checks) = doctor(&t, &[]);
    assert_eq!(code, 1);
    expect(&checks, "store mail.db", "fail", "not a runner database");
    expect(&checks, "store events.db", "fail", "not a runner database");
    expect(&checks, "store sessions.db", "ok", "");
    expect(&checks, "agents", "warn", "not checked");
}

#[test]
fn doctor_reports_schema_versions_older_and_newer() {
    let t = TestRoot::sqlite();
    t.run(["init"]).status(0);
    t.db("sessions.db")
        .execute_batch("PRAGMA user_version = 0")
        .unwrap();
    t.db("events.db")
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    let (code, checks) = doctor(&t, &[]);
    assert_eq!(code, 1);
    expect(&checks, "store sessions.db", "warn", "schema version 0");
    expect(&checks, "store sessions.db", "warn", "runner init");
    expect(&checks, "store events.db", "fail", "newer than this runner");
    // Doctor migrated nothing.
    assert_eq!(t.i64("sessions.db", "PRAGMA user_version"), 0);
}

#[test]
fn doctor_fails_a_store_that_fails_the_integrity_check() {
    let t = TestRoot::sqlite();
    t.agent(
        "a",
        "builder",
        None,
        &["--lines", "3000", "--line-bytes", "300"],
    );
    t.mail("lead", "a", "x");
    t.run(["turn", "--agent", "a"]).status(0);
    let c = t.db("events.db");
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    drop(c);
    // Zero the cells of the second half of the file's pages (the events
    // table's), keeping each page's header: every cell is then out of range.
    let path = t.root().join("events.db");
    let page = t
        .sqlite_file("events.db")
        .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
        .unwrap() as usize;
    let pristine = std::fs::read(&path).unwrap();
    let len = pristine.len();
    assert!(len > 64 * 4096, "events.db is {len} bytes");
    let mut bytes = pristine.clone();
    for start in (len / 2 / page * page..len - page).step_by(page) {
        bytes[start + 12..start + page].fill(0);
    }
    // doctor fails the file's integrity check, naming what it found.
    let fails_quick_check = |bytes: Vec<u8>, found: &str| {
        std::fs::write(&path, bytes).unwrap();
        let (code, checks) = doctor(&t, &[]);
        assert_eq!(code, 1);
        let c = expect(&checks, "store events.db", "fail", "");
        let detail = c["detail"].as_str().unwrap();
        assert!(detail.contains("fails SQLite's quick_check: "), "{c:#}");
        assert!(detail.contains(found), "{c:#}");
    };
    fails_quick_check(bytes, "more)");
    // A page of the table filled with garbage stops the check itself: still
    // ours, still failing the check (not "not a runner database").
    let mut bytes = pristine;
    let mid = len / 2 / page * page;
    bytes[mid..mid + page].fill(0xff);
    fails_quick_check(bytes, "malformed");
}

#[test]
fn doctor_fails_on_config_typos_bad_values_and_bad_syntax() {
    let t = TestRoot::sqlite();
    t.run(["init"]).status(0);
    let config = t.root().join("config.toml");
    std::fs::write(&config, "[turn]\nstall_timout = \"1m\"\n").unwrap();
    let (code, checks) = doctor(&t, &[]);
    assert_eq!(
        code, 1,
        "runner refuses this config.toml, so doctor fails it"
    );
    expect(
        &checks,
        "config",
        "fail",
        "turn.stall_timout (did you mean turn.stall_timeout?)",
    );
    // The rest is still checked.
    expect(&checks, "leftovers", "ok", "");
    std::fs::write(&config, "[turn]\ngrace = \"soon\"\n").unwrap();
    expect(&doctor(&t, &[]).1, "config", "fail", "turn.grace");
    std::fs::write(&config, "[turn\n").unwrap();
    expect(&doctor(&t, &[]).1, "config", "fail", "does not parse");
    std::fs::remove_file(&config).unwrap();
    expect(
        &doctor(&t, &[("RUNNER_SERVE_MAX_CONCURRENT", "many")]).1,
        "config",
        "fail",
        "RUNNER_SERVE_MAX_CONCURRENT",
    );
}

#[test]
fn doctor_fails_on_a_capability_file_that_does_not_parse() {
    let t = TestRoot::sqlite();
    t.run(["init"]).status(0);
    std::fs::create_dir_all(t.root().join("capabilities")).unwrap();
    std::fs::write(t.root().join("capabilities/broken.md"), "no front matter\n").unwrap();
    let (code, checks) = doctor(&t, &[]);
    assert_eq!(code, 1);
    expect(&checks, "capability broken", "fail", "front matter");
    expect(&checks, "capability broken", "fail", "broken.md");
}

#[test]
fn doctor_checks_the_cli_of_every_runtime_in_use() {
    let t = TestRoot::sqlite();
    t.run(["init"]).status(0);
    let wt = t.path().display().to_string();
    for (name, runtime) in [("c", "claude"), ("x", "codex")] {
        t.run([
            "agent",
            "add",
            name,
            "--capability",
            "builder",
            "--worktree",
            &wt,
            "--runtime",
            runtime,
        ])
        .status(0);
    }
    t.run([
        "agent",
        "add",
        "m",
        "--capability",
        "builder",
        "--worktree",
        &wt,
        "--command",
        "./no-such-agent",
    ])
    .status(0);
    let broken = fake_cli(&t, "codex-cli", "echo 'boom' >&2; exit 3");
    let env = [
        ("RUNNER_RUNTIME_CLAUDE_BIN", "/nonexistent/claude"),
        ("RUNNER_RUNTIME_CODEX_BIN", broken.as_str()),
    ];
    let (code, checks) = doctor(&t, &env);
    assert_eq!(code, 1);
    expect(&checks, "runtime claude", "fail", "/nonexistent/claude");
    expect(
        &checks,
        "runtime claude",
        "fail",
        "RUNNER_RUNTIME_CLAUDE_BIN",
    );
    expect(&checks, "runtime codex", "warn", "boom");
    expect(&checks, "runtime command", "fail", "./no-such-agent");
    assert!(
        !checks.iter().any(|c| c["check"] == "runtime gemini"),
        "only runtimes in use"
    );
}

#[test]
fn doctor_counts_what_the_sweep_would_repair_and_the_sweep_clears_it() {
    let t = TestRoot::sqlite();
    t.agent("crashed", "builder", None, &[]);
    t.agent("idle", "builder", None, &[]);
    t.mail("lead", "crashed", "x");
    // The runner dies right after spawning: turn.pid, an open turn row, a claim.
    let r = t.run_env(
        &[("RUNNER_FAULT", "after_spawn")],
        ["turn", "--agent", "crashed"],
    );
    assert_eq!(r.out.status.code(), None, "killed by the fault");
    t.db("sessions.db")
        .execute_batch("UPDATE sessions SET state='in_turn' WHERE agent_name='idle'")
        .unwrap();
    let (code, checks) = doctor(&t, &[]);
    assert_eq!(code, 0, "leftovers are a warning");
    let c = expect(&checks, "leftovers", "warn", "runner sweep");
    let detail = c["detail"].as_str().unwrap();
    for part in [
        "1 turn.pid without a live lease",
        "1 unfinished turn row(s) of dead runners",
        "1 claimed message(s) of dead turns",
        "1 agent(s) in_turn with no turn",
    ] {
        assert!(detail.contains(part), "{part}: {detail}");
    }
    // Doctor changed nothing.
    assert!(t.root().join("agents/crashed/turn.pid").exists());
    assert_eq!(t.state("idle"), "in_turn");
    t.run(["sweep"]).status(0);
    expect(
        &doctor(&t, &[]).1,
        "leftovers",
        "ok",
        "nothing for the sweep",
    );
    t.assert_clean("crashed");
}

#[test]
fn doctor_lists_stalled_or_zombie_agents_that_runner_did_not_mark() {
    let t = TestRoot::sqlite();
    t.agent("ov-zombie", "builder", None, &["--result", "error"]);
    t.agent("ov-stalled", "builder", None, &[]);
    t.agent("own-zombie", "builder", None, &["--stall"]);
    t.mail("lead", "ov-zombie", "x");
    t.run(["turn", "--agent", "ov-zombie"]).status(1);
    t.mail("lead", "own-zombie", "x");
    t.run([
        "turn",
        "--agent",
        "own-zombie",
        "--stall",
        "300ms",
        "--grace",
        "200ms",
    ])
    .status(124);
    assert_eq!(t.state("own-zombie"), "zombie");
    // What overstory's `ov status` does: write the state directly.
    t.db("sessions.db")
        .execute_batch(
            "UPDATE sessions SET state='zombie' WHERE agent_name='ov-zombie';
             UPDATE sessions SET state='stalled' WHERE agent_name='ov-stalled';",
        )
        .unwrap();
    let (code, checks) = doctor(&t, &[]);
    assert_eq!(code, 0);
    expect(
        &checks,
        "state ov-zombie",
        "warn",
        "runner agent add ov-zombie",
    );
    expect(&checks, "state ov-zombie", "warn", "--recover");
    expect(
        &checks,
        "state ov-stalled",
        "warn",
        "runner nudge --agent ov-stalled",
    );
    assert!(
        !checks.iter().any(|c| c["check"] == "state own-zombie"),
        "runner's own zombie is explained by its turn: {checks:#?}"
    );
    // The fix clears it.
    t.run([
        "agent",
        "add",
        "ov-zombie",
        "--capability",
        "builder",
        "--recover",
    ])
    .status(0);
    let checks = doctor(&t, &[]).1;
    assert!(!checks.iter().any(|c| c["check"] == "state ov-zombie"));
}

// ---------------------------------------------------------------- completions, man

#[test]
fn completions_and_the_man_page_cover_every_subcommand() {
    let t = TestRoot::new();
    let paths = runner::manual::subcommand_paths();
    assert!(paths.iter().any(|p| p == &["agent", "add"]));
    assert!(paths.iter().any(|p| p == &["doctor"]));
    assert!(
        !paths.iter().any(|p| p[0] == "fake-agent"),
        "hidden stays hidden"
    );
    for shell in ["bash", "zsh", "fish"] {
        let r = t.run(["completions", shell]);
        r.status(0);
        let script = r.stdout();
        for p in &paths {
            let leaf = p.last().unwrap();
            assert!(script.contains(leaf.as_str()), "{shell}: no {leaf}");
        }
    }
    let r = t.run(["completions", "tcsh"]);
    r.status(2);
    let r = t.run(["man"]);
    r.status(0);
    let page = r.stdout();
    assert!(
        page.starts_with(".ie") || page.contains(".TH runner 1"),
        "{page}"
    );
    for p in &paths {
        let header = format!(".SH \"RUNNER {}\"", p.join(" ").to_uppercase());
        assert!(page.contains(&header), "man page has no {header}");
    }
    assert!(page.contains("\\-\\-recover"), "options are rendered");
    assert!(!t.root().exists(), "generating text touches no root");
}
