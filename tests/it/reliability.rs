//! Issue 9: the crash matrix, races, and databases under faults. CI runs a
//! few repetitions; `RUNNER_HEAVY=1` runs the full counts.

use std::time::Duration;

use crate::{TestRoot, wait_child};

fn heavy(ci: usize, full: usize) -> usize {
    if std::env::var("RUNNER_HEAVY").as_deref() == Ok("1") {
        full
    } else {
        ci
    }
}

/// SIGKILL the runner at five points; one sweep leaves everything repaired.
#[test]
fn crash_matrix() {
    let points = [
        "before_spawn",
        "after_spawn",
        "mid_stream",
        "after_exit",
        "during_final_write",
    ];
    let reps = heavy(2, 20);
    for point in points {
        for rep in 0..reps {
            let t = TestRoot::new();
            t.agent("b1", "lead", None, &["--lines", "400", "--rate", "4000"]);
            let id = t.mail("orchestrator", "b1", "work");
            let r = t.run_env(
                &[("RUNNER_FAULT", point)],
                ["turn", "--agent", "b1", "--stall", "30s"],
            );
            assert_eq!(
                r.out.status.code(),
                None,
                "{point}: the runner died by a signal: {}",
                r.stderr()
            );
            let s = t.run(["sweep", "--json"]);
            s.status(0);
            let ctx = format!("{point} #{rep}: {}", s.stdout());
            // no process of any turn alive, no turn.pid, lease free
            t.assert_clean("b1");
            assert_ne!(t.state("b1"), "in_turn", "{ctx}");
            // the claim: delivered, or pending with exactly one more try
            let (read, tries, claimed) = t.mail_state(&id);
            assert!(
                read == 1 || (tries == 1 && claimed.is_none()),
                "{ctx}: read {read} tries {tries} claimed {claimed:?}"
            );
            // every turn row finished
            assert_eq!(
                t.i64(
                    "sessions.db",
                    "SELECT COUNT(*) FROM turns WHERE ended_at IS NULL"
                ),
                0,
                "{ctx}"
            );
            // every stdout line in events exactly once
            let row = t.last_turn("b1");
            let turn = row["turn_id"].as_str().unwrap();
            let nd =
                std::fs::read(t.turn_dir("b1", turn).join("stdout.ndjson")).unwrap_or_default();
            let lines = nd.iter().filter(|&&b| b == b'\n').count() as i64;
            let q = |sql: &str| t.i64("events.db", &sql.replace("TURN", turn));
            assert_eq!(
                q("SELECT COUNT(*) FROM events WHERE turn_id='TURN' AND line_no IS NOT NULL"),
                lines,
                "{ctx}"
            );
            assert_eq!(
                q("SELECT COUNT(DISTINCT line_no) FROM events WHERE turn_id='TURN'"),
                lines,
                "{ctx}"
            );
            // a second sweep changes nothing
            let again = t.run(["sweep", "--json"]).json();
            assert_eq!(again["orphan_turns"], 0, "{ctx}");
            assert_eq!(again["claims_retried"], 0, "{ctx}");
        }
    }
}

/// Many concurrent `runner turn` on one agent never overlap.
#[test]
fn concurrent_turns_on_one_agent_never_overlap() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &["--lines", "3"]);
    let n = heavy(200, 1000);
    // Every turn waits for all the others: allow a second per turn (the
    // turns themselves take a few tens of ms each, serialised by the lease).
    let wait = format!("{}s", n.max(120));
    let children: Vec<_> = (0..n)
        .map(|i| {
            t.spawn([
                "turn",
                "--agent",
                "lead",
                "--message",
                &format!("m{i}"),
                "--wait",
                &wait,
            ])
        })
        .collect();
    for c in children {
        let out = wait_child(c, Duration::from_secs(n.max(120) as u64 + 60));
        assert_eq!(out.status.code(), Some(0));
    }
    let turns = t.assert_turns_never_overlap();
    assert_eq!(turns, n);
    t.assert_clean("lead");
}

/// `runner stop` racing the natural end of a turn: always completed, at
/// most one worker_died per turn.
#[test]
fn stop_racing_the_natural_end() {
    let reps = heavy(200, 1000);
    for i in 0..reps {
        let t = TestRoot::new();
        t.agent("lead", "lead", None, &[]);
        t.agent(
            "b1",
            "builder",
            Some("lead"),
            &["--lines", "2", "--silent-ms", &((i % 3) * 20).to_string()],
        );
        let turn = t.spawn([
            "turn",
            "--agent",
            "b1",
            "--message",
            "x",
            "--grace",
            "200ms",
        ]);
        let stop = t.spawn(["stop", "--agent", "b1"]);
        let so = wait_child(stop, Duration::from_secs(30));
        assert_eq!(so.status.code(), Some(0));
        let to = wait_child(turn, Duration::from_secs(30));
        assert!(
            matches!(to.status.code(), Some(0 | 2 | 130)),
            "{:?}",
            to.status
        );
        assert_eq!(t.state("b1"), "completed", "rep {i}");
        assert!(
            t.worker_died("lead") <= 1,
            "rep {i}: {}",
            t.worker_died("lead")
        );
        t.assert_clean("b1");
    }
}

/// A database locked past busy_timeout: one clear line, exit 4, nothing lost.
#[test]
fn a_locked_database_is_busy_not_broken() {
    let t = TestRoot::sqlite();
    t.agent("b1", "builder", None, &[]);
    t.mail("lead", "b1", "kept");
    let c = t.db("mail.db");
    c.execute_batch("BEGIN IMMEDIATE; INSERT INTO messages (id, from_agent, to_agent, subject, body, created_at) VALUES ('msg-lockholder01','a','b','s','b','x');").unwrap();
    let r = t.run([
        "mail", "send", "--from", "lead", "--to", "b1", "--body", "blocked",
    ]);
    r.status(4).one_line_error("locked");
    c.execute_batch("ROLLBACK").unwrap();
    assert_eq!(t.i64("mail.db", "SELECT COUNT(*) FROM messages"), 1);
    t.run([
        "mail", "send", "--from", "lead", "--to", "b1", "--body", "now",
    ])
    .status(0);
}

/// A truncated database is reported and left as it is.
#[test]
fn a_truncated_database_is_reported_not_overwritten() {
    let t = TestRoot::sqlite();
    t.agent("b1", "builder", None, &[]);
    for i in 0..200 {
        t.sqlite_file("mail.db")
            .execute(
                "INSERT INTO messages (id, from_agent, to_agent, subject, body, created_at) VALUES (?1,'a','b','s',?2,'x')",
                rusqlite::params![format!("msg-{i:012}"), "x".repeat(500)],
            )
            .unwrap();
    }
    t.sqlite_file("mail.db")
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    let p = t.root().join("mail.db");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let _ = std::fs::remove_file(t.root().join("mail.db-wal"));
    let _ = std::fs::remove_file(t.root().join("mail.db-shm"));
    let before = std::fs::read(&p).unwrap();
    let r = t.run(["mail", "list"]);
    assert!(matches!(r.code(), 2 | 70), "{}", r.stderr());
    assert!(!r.stderr().contains("panicked"));
    assert_eq!(r.stderr().trim_end().lines().count(), 1, "{}", r.stderr());
    assert_eq!(std::fs::read(&p).unwrap(), before, "not overwritten");
}

/// `serve` and manual `runner turn`s on the same agent never overlap.
#[test]
fn serve_and_a_manual_turn_never_overlap() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &["--lines", "2", "--silent-ms", "30"]);
    let mut c = t.cmd(["serve", "--poll", "20ms", "--sweep-every", "1h"]);
    let serve = c
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let n = heavy(6, 100);
    for i in 0..n {
        t.mail("orchestrator", "lead", &format!("m{i}"));
        let r = t.run([
            "turn",
            "--agent",
            "lead",
            "--message",
            "manual",
            "--wait",
            "30s",
        ]);
        assert!(matches!(r.code(), 0), "{}", r.stderr());
    }
    crate::wait_for(Duration::from_secs(30), "serve to deliver the mail", || {
        t.i64("mail.db", "SELECT COUNT(*) FROM messages WHERE read=0") == 0
    });
    crate::signal(serve.id(), nix::sys::signal::Signal::SIGINT);
    assert_eq!(
        wait_child(serve, Duration::from_secs(20)).status.code(),
        Some(0)
    );
    let turns = t.assert_turns_never_overlap();
    assert!(turns >= n);
    t.assert_clean("lead");
}
