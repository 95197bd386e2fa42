//! Issue 4: watchdogs, escalation, stop, interrupts, and killing every
//! process of a turn (grandchildren in the same group and in new sessions).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use runner::store::db::params;

use crate::{TestRoot, signal, wait_child, wait_for};

const FAST: [&str; 4] = ["--stall", "300ms", "--grace", "200ms"];

fn turn_args<'a>(agent: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["turn", "--agent", agent, "--message", "go"];
    v.extend(FAST);
    v.extend(extra);
    v
}

#[test]
fn a_silent_agent_stalls_zombie_and_one_worker_died() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &[]);
    t.agent("b1", "builder", Some("lead"), &["--stall"]);
    let id = t.mail("lead", "b1", "x");
    t.run(turn_args("b1", &[])).status(124);
    let row = t.last_turn("b1");
    assert_eq!(row["outcome"], "stalled");
    assert_eq!(t.state("b1"), "zombie");
    assert_eq!(t.worker_died("lead"), 1);
    // claimed mail released: pending, try count unchanged
    let (read, tries, claimed) = t.mail_state(&id);
    assert_eq!((read, tries, claimed), (0, 0, None));
    t.assert_clean("b1");
    // a silent agent that never wrote a line is caught too
    t.agent(
        "b2",
        "builder",
        None,
        &["--no-init", "--lines", "0", "--stall"],
    );
    t.run(turn_args("b2", &[])).status(124);
    t.assert_clean("b2");
}

#[test]
fn an_agent_ignoring_sigterm_is_killed_after_the_grace() {
    let t = TestRoot::new();
    t.agent("b1", "builder", None, &["--ignore-term", "--stall"]);
    let t0 = Instant::now();
    t.run(turn_args("b1", &[])).status(124);
    let took = t0.elapsed();
    // stall 300 ms + grace 200 ms, plus process start-up; never the 5 s default grace
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let row = t.last_turn("b1");
    assert_eq!(row["signal"], 9, "killed by SIGKILL: {row}");
    let log = std::fs::read_to_string(
        t.turn_dir("b1", row["turn_id"].as_str().unwrap())
            .join("runner.log"),
    )
    .unwrap();
    assert!(log.contains("SIGTERM") && log.contains("SIGKILL"), "{log}");
    t.assert_clean("b1");
}

fn grandchild_case(mode: &str, stalled: bool) {
    let t = TestRoot::new();
    let mut fake = vec!["--grandchild", mode];
    if stalled {
        fake.push("--stall");
    }
    t.agent("b1", "builder", None, &fake);
    let t0 = Instant::now();
    let stall = if stalled { "300ms" } else { "20s" };
    let r = t.run([
        "turn",
        "--agent",
        "b1",
        "--message",
        "go",
        "--stall",
        stall,
        "--grace",
        "200ms",
    ]);
    r.status(if stalled { 124 } else { 0 });
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the turn ended: {:?}",
        t0.elapsed()
    );
    let row = t.last_turn("b1");
    assert_eq!(row["leaked"], true, "{mode} stalled={stalled}: {row}");
    t.assert_clean("b1");
}

#[test]
fn grandchild_in_the_same_group_clean_exit() {
    grandchild_case("group", false);
}

#[test]
fn grandchild_in_a_new_session_clean_exit() {
    grandchild_case("session", false);
}

#[test]
fn grandchild_in_the_same_group_stalled() {
    grandchild_case("group", true);
}

#[test]
fn grandchild_in_a_new_session_stalled() {
    grandchild_case("session", true);
}

#[test]
fn a_declared_bash_timeout_keeps_a_busy_tool_alive_past_the_stall_limit() {
    let t = TestRoot::new();
    t.agent(
        "b1",
        "builder",
        None,
        &[
            "--tool-timeout-ms",
            "5000",
            "--tool-silence-ms",
            "1200",
            "--mail",
            "worker_done",
        ],
    );
    t.run(turn_args("b1", &[])).status(0);
    assert_eq!(t.last_turn("b1")["outcome"], "done");
    // without the declaration the same silence stalls
    t.agent(
        "b2",
        "builder",
        None,
        &["--silent-ms", "1200", "--mail", "worker_done"],
    );
    t.run(turn_args("b2", &[])).status(124);
}

#[test]
fn the_deadline_ends_a_chatty_turn() {
    let t = TestRoot::new();
    t.agent(
        "b1",
        "builder",
        None,
        &["--lines", "100000", "--rate", "50"],
    );
    t.run(turn_args("b1", &["--deadline", "700ms"])).status(124);
    assert_eq!(t.last_turn("b1")["outcome"], "deadline");
    assert_eq!(t.state("b1"), "zombie");
    t.assert_clean("b1");
}

#[test]
fn stop_during_a_turn() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &[]);
    t.agent("b1", "builder", Some("lead"), &["--stall"]);
    let id = t.mail("lead", "b1", "x");
    let child = t.spawn([
        "turn", "--agent", "b1", "--stall", "60s", "--grace", "200ms",
    ]);
    wait_for(Duration::from_secs(20), "the turn to start", || {
        t.root().join("agents/b1/turn.pid").exists() && t.state("b1") == "in_turn"
    });
    let s = t.run(["stop", "--agent", "b1", "--json"]);
    s.status(0);
    assert!(s.json()["signalled_runner"].is_number());
    let out = wait_child(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(130));
    let row = t.last_turn("b1");
    assert_eq!(row["outcome"], "stopped");
    assert_eq!(t.state("b1"), "completed");
    assert_eq!(t.worker_died("lead"), 1);
    let (read, tries, claimed) = t.mail_state(&id);
    assert_eq!((read, tries, claimed), (0, 0, None));
    t.assert_clean("b1");
    // stopping a completed agent succeeds and changes nothing
    let again = t.run(["stop", "--agent", "b1"]);
    again.status(0);
    assert!(again.stdout().contains("already completed"));
    assert_eq!(t.worker_died("lead"), 1);
}

#[test]
fn stop_with_no_turn_writes_the_state_and_one_worker_died() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &[]);
    t.agent("b1", "builder", Some("lead"), &[]);
    t.run(["stop", "--agent", "b1"]).status(0);
    assert_eq!(t.state("b1"), "completed");
    assert_eq!(t.worker_died("lead"), 1);
    t.run(["stop", "--agent", "b1"]).status(0);
    assert_eq!(t.worker_died("lead"), 1);
    t.run(["stop", "--agent", "ghost"]).status(2);
}

#[test]
fn sigint_interrupts_the_turn_and_releases_the_mail() {
    let t = TestRoot::new();
    t.agent("b1", "builder", None, &["--stall"]);
    let id = t.mail("lead", "b1", "x");
    let child = t.spawn([
        "turn", "--agent", "b1", "--stall", "60s", "--grace", "200ms",
    ]);
    wait_for(Duration::from_secs(20), "the turn to start", || {
        t.state("b1") == "in_turn"
    });
    signal(child.id(), Signal::SIGINT);
    let out = wait_child(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(130));
    assert_eq!(t.last_turn("b1")["outcome"], "interrupted");
    assert_eq!(t.state("b1"), "between_turns");
    let (read, tries): (i64, i64) = t
        .db("mail.db")
        .query_row(
            "SELECT read, tries FROM messages WHERE id=?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((read, tries), (0, 0));
    t.assert_clean("b1");
}

#[test]
fn a_second_signal_kills_at_once() {
    let t = TestRoot::new();
    t.agent("b1", "builder", None, &["--ignore-term", "--stall"]);
    let child = t.spawn([
        "turn",
        "--agent",
        "b1",
        "--message",
        "x",
        "--stall",
        "60s",
        "--grace",
        "30s",
    ]);
    wait_for(Duration::from_secs(20), "the turn to start", || {
        t.state("b1") == "in_turn"
    });
    signal(child.id(), Signal::SIGTERM);
    wait_for(Duration::from_secs(10), "the SIGTERM escalation", || {
        let dir = std::fs::read_dir(t.root().join("logs/b1"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::read_to_string(dir.join("runner.log"))
            .unwrap_or_default()
            .contains("SIGTERM")
    });
    let t0 = Instant::now();
    signal(child.id(), Signal::SIGTERM);
    let out = wait_child(child, Duration::from_secs(10));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "not the 30 s grace: {:?}",
        t0.elapsed()
    );
    assert_eq!(out.status.code(), Some(130));
    t.assert_clean("b1");
}

#[test]
fn sigint_while_waiting_for_the_lease_exits_130_without_a_turn() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &["--silent-ms", "3000"]);
    let first = t.spawn(["turn", "--agent", "lead", "--message", "a"]);
    wait_for(Duration::from_secs(20), "the first turn", || {
        t.root().join("agents/lead/turn.pid").exists()
    });
    let waiting = t.spawn(["turn", "--agent", "lead", "--message", "b", "--wait", "60s"]);
    // Its SIGINT handler is installed (SigCgt bit 2) before it waits for the lease.
    wait_for(
        Duration::from_secs(20),
        "the second runner to catch SIGINT",
        || {
            std::fs::read_to_string(format!("/proc/{}/status", waiting.id()))
                .ok()
                .and_then(|st| {
                    st.lines()
                        .find(|l| l.starts_with("SigCgt:"))
                        .map(|l| l[7..].trim().to_string())
                })
                .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
                .is_some_and(|mask| mask & 0x2 != 0)
        },
    );
    let t0 = Instant::now();
    signal(waiting.id(), Signal::SIGINT);
    let out = wait_child(waiting, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(130));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        wait_child(first, Duration::from_secs(20)).status.code(),
        Some(0)
    );
    assert_eq!(t.i64("sessions.db", "SELECT COUNT(*) FROM turns"), 1);
    t.assert_clean("lead");
}

// ---- Agent CLIs in the wild (SPEC §6.5, §6.7; LESSONS 37–38) ----

/// Registers `name` as a `command` agent whose CLI is the shell script
/// `body` (written into the temp root). The script speaks Claude's
/// stream-json; stdin is the user turn.
pub(crate) fn script_agent(t: &TestRoot, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = t.path().join(format!("{name}.sh"));
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let worktree = t.path().display().to_string();
    let script = path.display().to_string();
    t.run([
        "agent",
        "add",
        name,
        "--capability",
        "builder",
        "--worktree",
        &worktree,
        "--command",
        &script,
    ])
    .status(0);
}

/// A command line written as one string (no quoting needed in these tests).
pub(crate) fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

const INIT: &str = r#"echo '{"type":"system","subtype":"init","session_id":"s-1"}'"#;
const RESULT_OK: &str =
    r#"echo '{"type":"result","subtype":"success","is_error":false,"result":"all done"}'"#;
const RESULT_ERR: &str = r#"echo '{"type":"result","subtype":"error_during_execution","is_error":true,"result":"oops"}'"#;

/// Live processes whose argv is exactly `sleep <secs>` (a unique marker per test).
fn sleeps(secs: &str) -> Vec<i32> {
    let want = format!("sleep\0{secs}\0");
    runner::os::all_pids()
        .into_iter()
        .filter(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == want.as_bytes())
                && runner::os::is_alive(p, None)
        })
        .collect()
}

/// Asserts no `sleep <secs>` is alive (killing any first, so a failure leaks nothing).
#[track_caller]
fn assert_no_sleep(secs: &str) {
    let left = sleeps(secs);
    for &p in &left {
        signal(p as u32, Signal::SIGKILL);
    }
    assert!(left.is_empty(), "sleep {secs} outlived the turn: {left:?}");
}

/// Runs a turn of `b1` with one setting from the environment; asserts its
/// exit code and that no `sleep <marker>` outlived it; returns its row.
#[track_caller]
fn run_turn(
    t: &TestRoot,
    env: (&str, &str),
    line: &str,
    marker: &str,
    code: i32,
) -> serde_json::Value {
    let r = t.run_env(&[env], words(line));
    let row = t.last_turn("b1");
    assert_no_sleep(marker);
    r.status(code);
    row
}

fn result_exit_case(agent_body: &str, marker: &str) -> serde_json::Value {
    let t = TestRoot::new();
    script_agent(&t, "b1", agent_body);
    let row = run_turn(
        &t,
        ("RUNNER_TURN_RESULT_EXIT_TIMEOUT", "500ms"),
        "turn --agent b1 --message go --stall 30s --grace 200ms --deadline 40s",
        marker,
        0,
    );
    assert_eq!(row["outcome"], "exited", "{row}");
    assert_eq!(row["clean_result"], true, "{row}");
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("after its result"), "{reason}");
    assert_eq!(t.state("b1"), "completed");
    t.assert_clean("b1");
    row
}

#[test]
fn a_cli_hanging_after_its_result_with_stdout_open_is_ended_and_the_turn_is_clean() {
    result_exit_case(&format!("{INIT}\n{RESULT_OK}\nexec sleep 3161"), "3161");
}

#[test]
fn a_cli_that_closes_stdout_after_its_result_and_lingers_is_ended() {
    result_exit_case(
        &format!("{INIT}\n{RESULT_OK}\nexec 1>&-\nexec sleep 3162"),
        "3162",
    );
}

#[test]
fn a_cli_printing_forever_after_its_result_is_ended_and_the_last_result_decides() {
    // The first end-of-turn line is an error; a later clean one wins. The
    // progress lines after it do not reset the timer.
    let progress = r#"echo '{"type":"assistant","message":{"content":[{"type":"text","text":"still here"}]}}'"#;
    let row = result_exit_case(
        &format!(
            "{INIT}\n{RESULT_ERR}\n{progress}\n{RESULT_OK}\nsleep 3163 &\nwhile :; do {progress}; sleep 0.05; done"
        ),
        "3163",
    );
    assert_eq!(row["result_text"], "all done", "{row}");
}

#[test]
fn stdout_closed_without_a_result_while_the_cli_lives_is_failed_not_stalled() {
    let t = TestRoot::new();
    script_agent(&t, "b1", &format!("{INIT}\nexec 1>&-\nexec sleep 3164"));
    let id = t.mail("lead", "b1", "x");
    let row = run_turn(
        &t,
        ("RUNNER_TURN_LEAK_TIMEOUT", "300ms"),
        "turn --agent b1 --stall 30s --grace 200ms --deadline 40s",
        "3164",
        1,
    );
    assert_eq!(row["outcome"], "failed", "{row}");
    assert_eq!(t.state("b1"), "between_turns");
    let (read, tries, claimed) = t.mail_state(&id);
    assert_eq!((read, tries, claimed), (0, 1, None), "retried once");
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("stdout"), "{reason}");
    t.assert_clean("b1");
}

#[test]
fn an_orphan_that_left_the_session_and_cleared_its_environment_dies_with_the_turn() {
    let t = TestRoot::new();
    // Double fork: the subshell exits at once, so the sleep re-parents to
    // the runner (a child subreaper) with no trace of the turn on it.
    script_agent(
        &t,
        "b1",
        &format!(
            "{INIT}\n(setsid env -i sleep 3165 </dev/null >/dev/null 2>&1 &)\n\
             while [ -z \"$(pgrep -x -f 'sleep 3165')\" ]; do sleep 0.01; done\n{RESULT_OK}"
        ),
    );
    let r = t.run(words("turn --agent b1 --message go --grace 200ms"));
    assert_no_sleep("3165");
    r.status(0);
    assert_eq!(t.last_turn("b1")["leaked"], true);
    t.assert_clean("b1");
}

#[test]
fn a_skipped_tool_result_line_disarms_the_declared_tool_allowance() {
    let t = TestRoot::new();
    // A Bash call declaring 120 s, then its tool_result over the line
    // limit (skipped), then silence: the normal stall limit applies again.
    let tool_use = r#"echo '{"type":"assistant","message":{"content":[{"type":"tool_use","id":"t1","name":"Bash","input":{"command":"make","timeout":120000}}]}}'"#;
    let big_result = r#"printf '{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","content":"'; head -c 300000 /dev/zero | tr '\0' a; printf '"}]}}\n'"#;
    script_agent(
        &t,
        "b1",
        &format!("{INIT}\n{tool_use}\n{big_result}\nexec sleep 3166"),
    );
    let row = run_turn(
        &t,
        ("RUNNER_TURN_MAX_LINE", "64KiB"),
        "turn --agent b1 --message go --stall 500ms --grace 200ms --deadline 40s",
        "3166",
        124,
    );
    assert_eq!(row["outcome"], "stalled", "not the deadline: {row}");
    t.assert_clean("b1");
}

#[test]
fn reasons_and_logs_print_values_not_rust_debug_formatting() {
    let t = TestRoot::new();
    script_agent(&t, "b1", &format!("{INIT}\nexit 3"));
    let r = t.run(["turn", "--agent", "b1", "--message", "go"]);
    r.status(1);
    let row = t.last_turn("b1");
    let reason = row["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("code 3"), "{reason}");
    assert!(
        !reason.contains("Some(") && !reason.contains("None"),
        "{reason}"
    );
    assert!(!r.stdout().contains("Some(") && !r.stderr().contains("Some("));
    let status = t.run(["status", "--agent", "b1"]);
    assert!(!status.stdout().contains("Some("), "{}", status.stdout());
    let log = std::fs::read_to_string(
        t.turn_dir("b1", row["turn_id"].as_str().unwrap())
            .join("runner.log"),
    )
    .unwrap();
    assert!(!log.contains("Some("), "{log}");
    t.assert_clean("b1");
}
