//! Issue 4: watchdogs, escalation, stop, interrupts, and killing every
//! process of a turn (grandchildren in the same group and in new sessions).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

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
        .query_row("SELECT read, tries FROM messages WHERE id=?1", [&id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
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
