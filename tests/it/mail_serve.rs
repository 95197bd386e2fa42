//! Issue 5: claims, retries, `runner serve` and `runner nudge`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use runner::store::db::params;

use crate::{TestRoot, signal, wait_child, wait_for};

#[test]
fn nudge_while_a_turn_runs_is_queued_then_delivered_and_debounced() {
    let t = TestRoot::new();
    let rec = t.path().join("rec.jsonl");
    t.agent(
        "lead",
        "lead",
        None,
        &["--silent-ms", "800", "--record", &rec.display().to_string()],
    );
    let first = t.spawn(["turn", "--agent", "lead", "--message", "one"]);
    wait_for(Duration::from_secs(20), "the turn", || {
        t.root().join("agents/lead/turn.pid").exists()
    });
    let t0 = Instant::now();
    let n = t.run(["nudge", "--agent", "lead", "--json"]);
    n.status(0);
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(n.json()["queued"], true);
    let d = t.run(["nudge", "--agent", "lead", "--json"]);
    d.status(0);
    assert_eq!(d.json()["debounced"], true);
    assert_eq!(
        t.i64(
            "mail.db",
            "SELECT COUNT(*) FROM messages WHERE subject='nudge'"
        ),
        1
    );
    assert_eq!(
        wait_child(first, Duration::from_secs(20)).status.code(),
        Some(0)
    );
    // the next turn delivers it
    t.run(["turn", "--agent", "lead"]).status(0);
    let last = std::fs::read_to_string(&rec).unwrap();
    assert!(
        last.lines()
            .last()
            .unwrap()
            .contains("[NUDGE from orchestrator] Check your mail inbox for new messages.")
    );
    assert_eq!(
        t.i64("mail.db", "SELECT read FROM messages WHERE subject='nudge'"),
        1
    );
    // --force skips the debounce; an idle agent's nudge runs the turn at once
    t.run(["nudge", "--agent", "lead", "--force", "hello"])
        .status(0);
    assert_eq!(
        t.i64(
            "mail.db",
            "SELECT COUNT(*) FROM messages WHERE subject='nudge' AND read=1"
        ),
        2
    );
}

#[test]
fn retries_run_out_dead_mail_zombie_and_worker_died() {
    let t = TestRoot::new();
    let env = [
        ("RUNNER_RETRY_MAX_TRIES", "2"),
        ("RUNNER_RETRY_BACKOFF_BASE", "50ms"),
    ];
    t.agent("lead", "lead", None, &[]);
    t.agent(
        "b1",
        "builder",
        Some("lead"),
        &["--result", "error", "--exit", "1"],
    );
    let id = t.mail("lead", "b1", "x");
    t.run_env(&env, ["turn", "--agent", "b1"]).status(1);
    assert_eq!(
        t.i64(
            "mail.db",
            &format!("SELECT tries FROM messages WHERE id='{id}'")
        ),
        1
    );
    wait_for(Duration::from_secs(5), "the retry to be due", || {
        t.run_env(&env, ["agent", "show", "b1", "--json"]).json()["due_mail"] == 1
    });
    t.run_env(&env, ["turn", "--agent", "b1"]).status(1);
    let dead = t.str(
        "mail.db",
        &format!("SELECT dead_at FROM messages WHERE id='{id}'"),
    );
    assert!(dead.is_some());
    assert_eq!(
        t.i64(
            "mail.db",
            &format!("SELECT tries FROM messages WHERE id='{id}'")
        ),
        2
    );
    assert_eq!(t.state("b1"), "zombie");
    assert_eq!(t.worker_died("lead"), 1);
    assert!(
        t.str(
            "mail.db",
            "SELECT payload FROM messages WHERE type='worker_died'"
        )
        .unwrap()
        .contains("retries exhausted")
    );
    let l = t.run(["mail", "list", "--dead", "--json"]);
    assert_eq!(l.json().as_array().unwrap().len(), 1);
}

fn serve(t: &TestRoot, env: &[(&str, &str)], extra: &[&str]) -> std::process::Child {
    let mut args = vec![
        "serve",
        "--poll",
        "50ms",
        "--sweep-every",
        "1h",
        "--grace",
        "300ms",
    ];
    args.extend(extra);
    let mut c = t.cmd(&args);
    c.envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c.spawn().unwrap()
}

/// 50 agents × 20 messages; agents that succeed, fail, and fail then succeed: after serve drains them
/// every message is delivered exactly once or dead after 5 tries, and no two
/// turns of one agent overlap.
#[test]
fn serve_drains_a_mixed_fleet_exactly_once() {
    let t = TestRoot::new();
    let env = [("RUNNER_RETRY_BACKOFF_BASE", "20ms")];
    let mut kinds = HashMap::new();
    for i in 0..50 {
        let name = format!("a{i}");
        let counter = t.path().join(format!("{name}.count")).display().to_string();
        let fake: Vec<&str> = match i % 3 {
            0 => vec!["--mail", "worker_done"],
            1 => vec!["--result", "error", "--exit", "1"],
            _ => vec!["--fail-times", "2", "--counter", &counter],
        };
        t.agent(&name, "lead", None, &fake);
        kinds.insert(name.clone(), i % 3);
        for m in 0..20 {
            t.mail("orchestrator", &name, &format!("m{m}"));
        }
    }
    let child = serve(&t, &env, &["--max-concurrent", "8"]);
    wait_for(Duration::from_secs(120), "serve to drain the mail", || {
        t.i64(
            "mail.db",
            "SELECT COUNT(*) FROM messages WHERE to_agent LIKE 'a%' AND read=0 AND dead_at IS NULL",
        ) == 0
    });
    signal(child.id(), Signal::SIGINT);
    assert_eq!(
        wait_child(child, Duration::from_secs(20)).status.code(),
        Some(0)
    );
    let c = t.db("mail.db");
    let rows: Vec<(String, i64, i64, bool, Option<String>)> = c
        .query_map(
            "SELECT to_agent, read, tries, dead_at IS NOT NULL, claimed_by FROM messages WHERE to_agent LIKE 'a%'",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!(rows.len(), 1000);
    for (agent, read, tries, dead, claimed_by) in rows {
        match kinds[&agent] {
            1 => assert!(
                dead && tries == 5 && read == 0,
                "{agent}: always failing → dead after 5 tries"
            ),
            _ => {
                assert!(read == 1 && !dead, "{agent}: delivered");
                // delivered by exactly one turn, and that turn was clean
                let turn = claimed_by.unwrap();
                let outcome = t.str(
                    "sessions.db",
                    &format!("SELECT outcome FROM turns WHERE turn_id='{turn}'"),
                );
                assert!(
                    matches!(outcome.as_deref(), Some("done" | "waiting")),
                    "{agent}: {outcome:?}"
                );
            }
        }
    }
    let s = t.db("sessions.db");
    let spans: Vec<(String, String, String)> = s
        .query_map(
            "SELECT agent_name, started_at, ended_at FROM turns ORDER BY agent_name, started_at",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    for w in spans.windows(2) {
        if w[0].0 == w[1].0 {
            assert!(w[0].2 <= w[1].1, "overlapping turns of {}: {:?}", w[0].0, w);
        }
    }
    // retry times follow the backoff: process_after = end of the failed turn + 20ms·2^(tries-1)
    for (agent, k) in &kinds {
        if *k != 1 {
            continue;
        }
        let times: Vec<(String, String)> = s
            .query_map(
                "SELECT started_at, ended_at FROM turns WHERE agent_name=?1 ORDER BY started_at",
                params![agent],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(times.len(), 5, "{agent}: one turn per try");
        for (k, w) in times.windows(2).enumerate() {
            let ended = runner::clock::parse_ts(&w[0].1).unwrap();
            let next = runner::clock::parse_ts(&w[1].0).unwrap();
            let gap = next.duration_since(ended).unwrap_or_default();
            let backoff = Duration::from_millis(20 << k);
            assert!(
                gap >= backoff,
                "{agent}: retry {} came {gap:?} after the failure, backoff {backoff:?}",
                k + 1
            );
        }
    }
}

#[test]
fn a_failing_agent_is_retried_with_backoff_not_every_poll() {
    let t = TestRoot::new();
    let env = [("RUNNER_RETRY_BACKOFF_BASE", "1s")];
    t.agent("f1", "lead", None, &["--result", "error", "--exit", "1"]);
    t.mail("orchestrator", "f1", "x");
    let child = serve(&t, &env, &[]);
    wait_for(Duration::from_secs(20), "the first failed turn", || {
        t.i64(
            "sessions.db",
            "SELECT COUNT(*) FROM turns WHERE outcome='failed'",
        ) >= 1
    });
    let t0 = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "the retry after the 1 s backoff",
        || {
            t.i64(
                "sessions.db",
                "SELECT COUNT(*) FROM turns WHERE outcome='failed'",
            ) >= 2
        },
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "retried after {:?}, poll is 50 ms",
        t0.elapsed()
    );
    signal(child.id(), Signal::SIGTERM);
    assert_eq!(
        wait_child(child, Duration::from_secs(20)).status.code(),
        Some(0)
    );
    // tries 2: next backoff 2 s; in the 1-2 s since, no third turn
    assert_eq!(t.i64("sessions.db", "SELECT COUNT(*) FROM turns"), 2);
}

#[test]
fn serve_shut_down_mid_turn_interrupts_and_keeps_the_mail() {
    let t = TestRoot::new();
    for a in ["s1", "s2"] {
        t.agent(a, "builder", None, &["--stall"]);
        t.mail("orchestrator", a, "x");
    }
    let child = serve(&t, &[], &["--stall", "60s"]);
    wait_for(Duration::from_secs(20), "both turns in flight", || {
        t.i64(
            "sessions.db",
            "SELECT COUNT(*) FROM sessions WHERE state='in_turn'",
        ) == 2
    });
    let t0 = Instant::now();
    signal(child.id(), Signal::SIGTERM);
    let out = wait_child(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_millis(1300 + 500),
        "within grace + 1 s: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        t.i64(
            "sessions.db",
            "SELECT COUNT(*) FROM turns WHERE outcome='interrupted'"
        ),
        2
    );
    assert_eq!(
        t.i64(
            "mail.db",
            "SELECT COUNT(*) FROM messages WHERE read=0 AND tries=0 AND claimed_by IS NULL"
        ),
        2
    );
    t.assert_clean("s1");
    t.assert_clean("s2");
}

#[test]
fn serve_backs_off_an_agent_that_refuses() {
    let t = TestRoot::new();
    t.agent(
        "r1",
        "lead",
        None,
        &[
            "--no-init",
            "--lines",
            "0",
            "--result",
            "none",
            "--exit",
            "1",
            "--stderr",
            "fake: bad flag",
        ],
    );
    t.mail("orchestrator", "r1", "x");
    let child = serve(&t, &[], &[]);
    wait_for(Duration::from_secs(20), "the refused turn", || {
        t.i64("sessions.db", "SELECT COUNT(*) FROM turns") >= 1
    });
    // poll is 50 ms; the backoff is 5 s
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(800) {
        assert_eq!(t.i64("sessions.db", "SELECT COUNT(*) FROM turns"), 1);
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(child.id(), Signal::SIGINT);
    assert_eq!(
        wait_child(child, Duration::from_secs(20)).status.code(),
        Some(0)
    );
    assert_eq!(t.i64("mail.db", "SELECT tries FROM messages"), 0);
}
