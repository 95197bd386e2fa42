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
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
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
        let q = |sql: &str| {
            t.db("events.db")
                .query_row(sql, [&turn_id], |r| r.get::<_, i64>(0))
                .unwrap()
        };
        assert_eq!(
            q(
                "SELECT COUNT(DISTINCT line_no) FROM events WHERE turn_id=?1 AND line_no IS NOT NULL"
            ),
            complete_lines,
            "every line of stdout.ndjson is in events once"
        );
        assert_eq!(
            q("SELECT MAX(line_no) FROM events WHERE turn_id=?1"),
            complete_lines
        );
        let (read, _tries, claimed) = t.mail_state(&id);
        assert_eq!(
            (read, claimed),
            (0, None),
            "the mail is released for a retry"
        );
        t.assert_clean("filler");
    });
}
