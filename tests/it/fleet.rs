//! Fleet mode (SPEC §12.3, §12.5): several host ids on this machine, each a
//! root directory of its own, sharing one PostgreSQL schema. Hosts are
//! frozen (SIGSTOP) and killed for real; the fleet repairs them by the
//! database's clock, with short `lease_ttl` and `grace`.
//!
//! PostgreSQL-only: without a server these print that they were not run
//! (and fail under `RUNNER_TEST_PG=require`, as in CI).

use std::time::Duration;

use nix::sys::signal::Signal;
use runner::store::db::params;

use crate::{TestRoot, signal, wait_child, wait_for};

/// Short fleet timings for every host of a test.
const FLEET_ENV: [(&str, &str); 4] = [
    ("RUNNER_FLEET_LEASE_TTL", "1s"),
    ("RUNNER_FLEET_GRACE", "1s"),
    ("RUNNER_FLEET_HEARTBEAT", "200ms"),
    ("RUNNER_FLEET_HOST_STALE", "2s"),
];

/// Host `a` (the returned root, which owns the schema) and its fleet
/// settings; `None` when no server answers.
fn fleet() -> Option<TestRoot> {
    let mut a = TestRoot::postgres()?;
    for (k, v) in FLEET_ENV {
        a.set_env(k, v);
    }
    a.set_env("RUNNER_HOST_ID", "host-a");
    Some(a)
}

/// Registers `name` on host `h` (pinned to `h`, or floating with
/// `host = "*"`), its CLI the fake agent with `fake` options.
fn add_agent(h: &TestRoot, name: &str, host: Option<&str>, fake: &[&str]) {
    let worktree = h.path().display().to_string();
    let mut args = vec!["agent", "add", name, "--capability", "builder"];
    if let Some(host) = host {
        args.extend(["--host", host]);
    }
    args.extend([
        "--worktree",
        &worktree,
        "--command",
        crate::BIN,
        "fake-agent",
    ]);
    args.extend(fake);
    h.run(args).status(0);
}

/// Kills a frozen process when dropped (a failed test must not leave it
/// stopped, holding its database sessions).
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        signal(self.0, Signal::SIGCONT);
        signal(self.0, Signal::SIGKILL);
    }
}

fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        })
        .unwrap_or(false)
}

/// The one turn of `agent` and its row's (outcome, reason).
fn turn_of(t: &TestRoot, agent: &str) -> (String, Option<String>, Option<String>) {
    t.db("sessions.db")
        .query_row(
            "SELECT turn_id, outcome, reason FROM turns WHERE agent_name=?1 ORDER BY started_at DESC",
            params![agent],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
}

fn events_of(t: &TestRoot, turn_id: &str) -> i64 {
    t.i64(
        "events.db",
        &format!("SELECT COUNT(*) FROM events WHERE turn_id='{turn_id}'"),
    )
}

/// Starts a long turn of `agent` on host `h` and waits until its agent is
/// running and has written a few events. Returns the runner and the turn id.
fn start_long_turn(h: &TestRoot, t: &TestRoot, agent: &str) -> (std::process::Child, String) {
    let runner = h.spawn([
        "turn", "--agent", agent, "--stall", "60s", "--grace", "300ms",
    ]);
    let pid_file = h.root().join("agents").join(agent).join("turn.pid");
    wait_for(Duration::from_secs(20), "the agent to start", || {
        pid_file.exists()
    });
    let turn_id = turn_of(t, agent).0;
    wait_for(Duration::from_secs(20), "events to arrive", || {
        events_of(t, &turn_id) >= 3
    });
    (runner, turn_id)
}

/// What the processes `h.spawn` started wrote on stderr.
fn spawned_stderr(h: &TestRoot) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(h.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("spawn-") && name.ends_with(".stderr") {
            all.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    all
}

/// A sweep of host `h`, as JSON.
fn sweep(h: &TestRoot) -> serde_json::Value {
    let r = h.run(["sweep", "--json"]);
    r.status(0);
    r.json()
}

#[test]
fn a_frozen_host_is_repaired_after_lease_ttl_and_grace_and_exits_75_on_resume() {
    let Some(a) = fleet() else { return };
    let b = a.fleet_host("host-b");
    a.agent("w", "builder", None, &["--lines", "600", "--rate", "20"]);
    let id = a.mail("lead", "w", "work");
    let (runner, turn_id) = start_long_turn(&a, &a, "w");
    let agent_pid: i64 = std::fs::read_to_string(a.root().join("agents/w/turn.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Freeze host a's runner: its renewals stop, its agent goes on.
    signal(runner.id(), Signal::SIGSTOP);
    // Should an assertion fail while it is frozen, it must not stay so.
    let thaw = Thaw(runner.id());
    // Host b repairs it once lease_ttl + grace have passed by the database's
    // clock — not before.
    let first = sweep(&b);
    assert_eq!(first["leases_expired"], 0, "{first}");
    let mut repaired = serde_json::Value::Null;
    wait_for(
        Duration::from_secs(20),
        "host b to repair the lease",
        || {
            repaired = sweep(&b);
            repaired["leases_expired"] == 1
        },
    );
    assert_eq!(repaired["orphan_turns"], 1, "{repaired}");
    assert_eq!(repaired["claims_retried"], 1, "{repaired}");
    let (_, outcome, reason) = turn_of(&a, "w");
    assert_eq!(outcome.as_deref(), Some("failed"));
    let reason = reason.unwrap();
    assert!(reason.starts_with("host host-a silent since "), "{reason}");
    assert_eq!(
        a.mail_state(&id),
        (0, 1, None),
        "released for a retry, once"
    );
    assert_eq!(a.i64("sessions.db", "SELECT COUNT(*) FROM leases"), 0);
    let events_at_repair = events_of(&a, &turn_id);

    // Resumed, host a's runner finds its lease lost: it ends its agent,
    // writes nothing and exits 75.
    signal(runner.id(), Signal::SIGCONT);
    std::mem::forget(thaw);
    let out = wait_child(runner, Duration::from_secs(20));
    let stderr = spawned_stderr(&a);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("lease lost"), "{stderr}");
    wait_for(Duration::from_secs(10), "the fenced agent to die", || {
        !alive(agent_pid)
    });
    assert_eq!(
        events_of(&a, &turn_id),
        events_at_repair,
        "no event after the fence"
    );
    let (_, outcome2, reason2) = turn_of(&a, "w");
    assert_eq!(
        (outcome2.as_deref(), reason2.as_deref()),
        (Some("failed"), Some(reason.as_str()))
    );
    assert_eq!(a.mail_state(&id), (0, 1, None));

    // Host a's own next sweep replays what its agent printed (events are
    // facts) and leaves the row as the fleet repaired it.
    let stdout_lines = std::fs::read_to_string(a.turn_dir("w", &turn_id).join("stdout.ndjson"))
        .unwrap()
        .lines()
        .count() as i64;
    sweep(&a);
    assert!(!a.root().join("agents/w/turn.pid").exists());
    let replayed: i64 = a.i64(
        "events.db",
        &format!("SELECT COALESCE(MAX(line_no), 0) FROM events WHERE turn_id='{turn_id}'"),
    );
    assert_eq!(replayed, stdout_lines, "every received line in events once");
    assert_eq!(
        a.i64(
            "events.db",
            &format!(
                "SELECT COUNT(*) FROM (SELECT line_no FROM events WHERE turn_id='{turn_id}' AND line_no IS NOT NULL \
                 GROUP BY line_no, event_type, id HAVING COUNT(*) > 1) d"
            )
        ),
        0
    );
    assert_eq!(turn_of(&a, "w").2.as_deref(), Some(reason.as_str()));
}

#[test]
fn a_killed_host_is_repaired_and_its_own_sweep_kills_what_it_left() {
    let Some(a) = fleet() else { return };
    let b = a.fleet_host("host-b");
    a.agent("w", "builder", None, &["--lines", "600", "--rate", "20"]);
    let id = a.mail("lead", "w", "work");
    let (mut runner, turn_id) = start_long_turn(&a, &a, "w");
    let agent_pid: i64 = std::fs::read_to_string(a.root().join("agents/w/turn.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    runner.kill().unwrap();
    runner.wait().unwrap();
    assert!(alive(agent_pid), "the agent outlives its killed runner");
    wait_for(
        Duration::from_secs(20),
        "host b to repair the lease",
        || sweep(&b)["leases_expired"] == 1,
    );
    let (_, outcome, reason) = turn_of(&a, "w");
    assert_eq!(outcome.as_deref(), Some("failed"));
    assert!(reason.unwrap().starts_with("host host-a silent since "));
    assert_eq!(a.mail_state(&id), (0, 1, None));
    // Host b cannot signal host a's processes; host a's sweep does.
    assert!(alive(agent_pid));
    let rep = sweep(&a);
    assert_eq!(rep["groups_killed"], 1, "{rep}");
    wait_for(Duration::from_secs(10), "the leftover agent to die", || {
        !alive(agent_pid)
    });
    assert!(events_of(&a, &turn_id) > 3);
    // A second pass changes nothing.
    let again = sweep(&a);
    assert_eq!(again["groups_killed"], 0, "{again}");
    assert_eq!(again["leases_expired"], 0, "{again}");
}

#[test]
fn racing_sweeps_over_one_expired_lease_bump_the_retry_once() {
    let Some(a) = fleet() else { return };
    let hosts: Vec<TestRoot> = (0..4).map(|i| a.fleet_host(&format!("h{i}"))).collect();
    a.agent("w", "builder", None, &["--lines", "600", "--rate", "20"]);
    let id = a.mail("lead", "w", "work");
    let (mut runner, _) = start_long_turn(&a, &a, "w");
    runner.kill().unwrap();
    runner.wait().unwrap();
    wait_for(
        Duration::from_secs(20),
        "the lease to pass expiry + grace",
        || {
            a.i64(
            "sessions.db",
            "SELECT COUNT(*) FROM leases WHERE expires_at < now() - interval '1500 milliseconds'",
        ) == 1
        },
    );
    assert_eq!(
        fleet_check(&a)["level"],
        "warn",
        "doctor sees the overdue lease"
    );
    let sweeps: Vec<_> = hosts.iter().map(|h| h.spawn(["sweep", "--json"])).collect();
    let mut expired = 0;
    for s in sweeps {
        let out = wait_child(s, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(0));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        expired += v["leases_expired"].as_i64().unwrap();
    }
    assert_eq!(expired, 1, "one repair across the fleet");
    assert_eq!(a.mail_state(&id), (0, 1, None), "one retry bump");
    assert_eq!(fleet_check(&a)["level"], "ok");
    // The host's own sweep ends its agent.
    sweep(&a);
}

/// `runner doctor`'s fleet check, as JSON.
fn fleet_check(h: &TestRoot) -> serde_json::Value {
    let r = h.run(["doctor", "--json"]);
    r.json()["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "fleet")
        .unwrap_or_else(|| panic!("no fleet check: {}", r.stdout()))
        .clone()
}

#[test]
fn mail_sent_from_a_fenced_turn_is_refused_with_75() {
    let Some(a) = fleet() else { return };
    a.agent("w", "builder", None, &[]);
    let r = a.run_env(
        &[("RUNNER_TURN_ID", "20261129T000000000Z-gone00")],
        [
            "mail",
            "send",
            "--from",
            "w",
            "--to",
            "lead",
            "--subject",
            "s",
            "--body",
            "b",
        ],
    );
    r.status(75).one_line_error("lease lost");
    assert_eq!(a.i64("mail.db", "SELECT COUNT(*) FROM messages"), 0);
    // Outside a turn, and inside a live one (every turn test), mail goes.
    a.mail("w", "lead", "fine");
}

#[test]
fn a_live_lease_on_another_host_makes_the_agent_busy_naming_that_host() {
    let Some(a) = fleet() else { return };
    let b = a.fleet_host("host-b");
    add_agent(&a, "w", Some("*"), &["--lines", "600", "--rate", "20"]);
    a.mail("lead", "w", "work");
    let (runner, _) = start_long_turn(&a, &a, "w");
    b.run(["turn", "--agent", "w", "--message", "hi", "--wait", "300ms"])
        .status(4)
        .one_line_error("on host host-a");
    signal(runner.id(), Signal::SIGTERM);
    wait_child(runner, Duration::from_secs(20));
    assert_eq!(
        a.i64("sessions.db", "SELECT COUNT(*) FROM leases"),
        0,
        "released at the end"
    );
}

#[test]
fn a_turn_on_another_host_takes_over_an_expired_lease_at_once_and_repairs_it() {
    let Some(a) = fleet() else { return };
    let b = a.fleet_host("host-b");
    add_agent(&a, "w", Some("*"), &["--lines", "600", "--rate", "20"]);
    let id = a.mail("lead", "w", "work");
    let (mut runner, old_turn) = start_long_turn(&a, &a, "w");
    runner.kill().unwrap();
    runner.wait().unwrap();
    // No sweep ran: host b's turn waits for the lease to expire (lease_ttl,
    // not grace), takes it over and repairs what host a left, then runs.
    b.run([
        "turn",
        "--agent",
        "w",
        "--message",
        "go on",
        "--wait",
        "20s",
    ])
    .status(0);
    let (outcome, reason): (Option<String>, Option<String>) = a
        .db("sessions.db")
        .query_row(
            "SELECT outcome, reason FROM turns WHERE turn_id=?1",
            params![old_turn],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(outcome.as_deref(), Some("failed"));
    assert!(reason.unwrap().starts_with("host host-a silent since "));
    assert_eq!(
        a.mail_state(&id),
        (0, 1, None),
        "released with one retry bump"
    );
    assert_eq!(
        a.str(
            "sessions.db",
            "SELECT host FROM turns WHERE ended_at IS NOT NULL ORDER BY started_at DESC LIMIT 1"
        )
        .as_deref(),
        Some("host-b")
    );
    assert_eq!(a.i64("sessions.db", "SELECT COUNT(*) FROM leases"), 0);
    // The fleet sweep finds nothing left to repair.
    assert_eq!(sweep(&b)["leases_expired"], 0);
    sweep(&a);
}

#[test]
fn serve_on_three_hosts_drains_a_mixed_fleet_exactly_once_without_overlap() {
    let Some(a) = fleet() else { return };
    let hosts: Vec<TestRoot> = ["h1", "h2", "h3"].iter().map(|h| a.fleet_host(h)).collect();
    let mut agents: Vec<(String, Option<&str>)> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        for j in 0..2 {
            let name = format!("p{i}{j}");
            add_agent(h, &name, None, &["--lines", "2"]);
            agents.push((name, Some(["h1", "h2", "h3"][i])));
        }
    }
    for j in 0..4 {
        let name = format!("f{j}");
        add_agent(&hosts[j % 3], &name, Some("*"), &["--lines", "2"]);
        agents.push((name, None));
    }
    let mut ids = Vec::new();
    for round in 0..4 {
        for (name, _) in &agents {
            ids.push(a.mail("lead", name, &format!("task {round}")));
        }
    }
    let serves: Vec<_> = hosts
        .iter()
        .map(|h| {
            h.spawn([
                "serve",
                "--poll",
                "100ms",
                "--sweep-every",
                "1h",
                "--grace",
                "300ms",
            ])
        })
        .collect();
    wait_for(Duration::from_secs(120), "every message delivered", || {
        a.i64(
            "mail.db",
            "SELECT COUNT(*) FROM messages WHERE to_agent <> 'lead' AND read = 0",
        ) == 0
    });
    for s in &serves {
        signal(s.id(), Signal::SIGTERM);
    }
    for s in serves {
        assert_eq!(
            wait_child(s, Duration::from_secs(30)).status.code(),
            Some(0)
        );
    }
    // Every message delivered by exactly one turn.
    let turns: Vec<(String, String, String, String, Option<String>)> = a
        .db("sessions.db")
        .query_map(
            "SELECT agent_name, started_at, COALESCE(ended_at, ''), mail_ids, host FROM turns ORDER BY agent_name, started_at",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    let mut delivered: std::collections::HashMap<String, usize> = Default::default();
    for (agent, _, ended, mail_ids, host) in &turns {
        assert!(!ended.is_empty(), "every turn finished: {agent}");
        let list: Vec<String> = serde_json::from_str(mail_ids).unwrap();
        for id in list {
            *delivered.entry(id).or_default() += 1;
        }
        // Pinned agents ran only on their host.
        let pin = agents.iter().find(|(n, _)| n == agent).unwrap().1;
        if let Some(pin) = pin {
            assert_eq!(host.as_deref(), Some(pin), "{agent} ran off its host");
        }
    }
    for id in &ids {
        assert_eq!(delivered.get(id), Some(&1), "message {id} delivered once");
    }
    assert_eq!(
        a.i64(
            "mail.db",
            "SELECT COUNT(*) FROM messages WHERE read = 1 AND to_agent <> 'lead'"
        ),
        ids.len() as i64
    );
    // No two turns of one agent overlap.
    for w in turns.windows(2) {
        if w[0].0 == w[1].0 {
            assert!(w[0].2 <= w[1].1, "overlapping turns of {}: {w:?}", w[0].0);
        }
    }
    // Floating agents ran somewhere, and more than one host did work.
    let busy_hosts: std::collections::HashSet<_> =
        turns.iter().filter_map(|t| t.4.clone()).collect();
    assert!(busy_hosts.len() >= 2, "{busy_hosts:?}");
    assert_eq!(a.i64("sessions.db", "SELECT COUNT(*) FROM leases"), 0);
}

#[test]
fn a_turn_that_fails_after_taking_the_lease_leaves_no_row_behind() {
    let Some(a) = fleet() else { return };
    a.agent("w", "builder", None, &[]);
    // A runtime the runner does not know is only found out once the lease
    // is held (SPEC §6.1 step 4).
    a.db("sessions.db")
        .execute(
            "UPDATE sessions SET runtime = 'bogus' WHERE agent_name = 'w'",
            params![],
        )
        .unwrap();
    let r = a.run(["turn", "--agent", "w", "--message", "hi"]);
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert_eq!(
        a.i64("sessions.db", "SELECT COUNT(*) FROM leases"),
        0,
        "the row is released with the turn, not left to expire"
    );
}
