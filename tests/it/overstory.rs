//! What overstory's own views read from a root runner wrote
//! (`../shared/overstory-views.md`): `metrics.db` for `ov costs`.

use std::os::unix::fs::PermissionsExt;

use runner::store::db::params;

use crate::TestRoot;

/// A root with `lead` (the fake agent, which reports usage) and `quiet`
/// (`true`: reports nothing).
fn lead_and_quiet() -> TestRoot {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &[]);
    t.run([
        "agent",
        "add",
        "quiet",
        "--capability",
        "lead",
        "--command",
        "true",
    ])
    .status(0);
    t
}

#[test]
fn metrics_db_accumulates_each_turns_cost_for_ov_costs() {
    let t = lead_and_quiet();
    t.run(["turn", "--agent", "lead", "--message", "one"])
        .status(0);
    let m = t.root().join("metrics.db");
    assert_eq!(
        std::fs::metadata(&m).unwrap().permissions().mode() & 0o777,
        0o600,
        "metrics.db is private like the other stores"
    );
    let (turn_in, turn_out, turn_cost): (i64, i64, f64) = t
        .db("sessions.db")
        .query_row(
            "SELECT input_tokens, output_tokens, cost_usd FROM turns",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert!(turn_in > 0 && turn_out > 0 && turn_cost > 0.0);
    t.run(["turn", "--agent", "lead", "--message", "two"])
        .status(0);
    // A turn that reported no usage writes nothing.
    t.run(["turn", "--agent", "quiet", "--message", "x"])
        .status(1);

    let c = t.db("metrics.db");
    let (agent, task, cap, inp, out, cost, completed): (
        String,
        String,
        String,
        i64,
        i64,
        f64,
        Option<String>,
    ) = c
        .query_row(
            "SELECT agent_name, task_id, capability, input_tokens, output_tokens,
                    estimated_cost_usd, completed_at FROM sessions",
            params![],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(
        (agent.as_str(), task.as_str(), cap.as_str()),
        ("lead", "", "lead")
    );
    assert_eq!((inp, out), (2 * turn_in, 2 * turn_out), "two turns summed");
    assert!(
        (cost - 2.0 * turn_cost).abs() < 1e-9,
        "{cost} vs 2×{turn_cost}"
    );
    assert_eq!(completed, None, "a waiting lead has not ended");
    let n: i64 = c
        .query_row("SELECT COUNT(*) FROM sessions", params![], |r| r.get(0))
        .unwrap();
    assert_eq!(
        n, 1,
        "one row per agent and task; the quiet agent reported nothing"
    );
    // The live view takes each agent's latest snapshot: the running total.
    let snaps: Vec<(i64, String)> = c
        .query_map(
            "SELECT input_tokens, created_at FROM token_snapshots WHERE agent_name='lead' ORDER BY id",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(snaps.len(), 2, "one snapshot per turn");
    assert_eq!(snaps[0].0, turn_in);
    assert_eq!(snaps[1].0, 2 * turn_in);
    assert!(snaps[1].1.ends_with('Z') && snaps[0].1 <= snaps[1].1);
}

#[test]
fn metrics_db_marks_the_session_complete_when_the_agent_ends() {
    let t = TestRoot::new();
    t.agent("b1", "builder", None, &[]);
    t.run(["turn", "--agent", "b1", "--message", "go"])
        .status(0);
    assert_eq!(t.state("b1"), "completed");
    let completed = t.str(
        "metrics.db",
        "SELECT completed_at FROM sessions WHERE agent_name='b1'",
    );
    let ended = t.str(
        "sessions.db",
        "SELECT ended_at FROM turns WHERE agent_name='b1'",
    );
    assert!(completed.is_some());
    assert_eq!(completed, ended);
}

/// A turn opens `metrics.db` while its agent runs only if the file is
/// there: a root without one (an older root, or one whose file was moved
/// away) gets it created at the end of the first turn that reported usage,
/// and a turn without usage still creates nothing.
#[test]
fn metrics_db_missing_is_created_only_by_a_turn_with_usage() {
    let t = lead_and_quiet();
    let m = t.root().join("metrics.db");
    // (On PostgreSQL `agent add` creates no metrics.db: nothing to remove.)
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(t.root().join(format!("metrics.db{ext}")));
    }
    t.run(["turn", "--agent", "quiet", "--message", "x"])
        .status(1);
    assert!(!m.exists(), "a turn without usage created metrics.db");
    t.run(["turn", "--agent", "lead", "--message", "one"])
        .status(0);
    let snaps = t.str(
        "metrics.db",
        "SELECT COUNT(*) || '' FROM token_snapshots WHERE agent_name='lead'",
    );
    assert_eq!(snaps.as_deref(), Some("1"));
}
