//! Fleet mode, hosts and agents (SPEC §12.2, §12.6): two host ids
//! (`RUNNER_HOST_ID`) sharing one PostgreSQL schema; pinned and floating
//! agents; `serve` registering, beating and stopping; `runner hosts`; the
//! offline CAS; and the SQLite store, which is one host.
//!
//! The PostgreSQL tests need a server (see `pg.rs`): without one they print
//! a notice and return, unless the suite runs on PostgreSQL
//! (`RUNNER_TEST_STORE=postgres`) or `RUNNER_TEST_PG=require`.

use std::time::Duration;

use nix::sys::signal::Signal;
use runner::store::db::params;

use crate::{BIN, TestRoot, signal, wait_child, wait_for};

/// A root whose tables live in a fresh PostgreSQL schema, whatever the
/// store under test; `None` (after a notice) when no server answers.
fn pg_root() -> Option<TestRoot> {
    TestRoot::postgres()
}

/// `agent add NAME` on host `host`, its CLI the fake agent.
fn add(t: &TestRoot, host: &str, name: &str, extra: &[&str]) -> crate::Run {
    let worktree = t.path().display().to_string();
    let mut args = vec!["agent", "add", name, "--capability", "lead"];
    args.extend(extra);
    args.extend(["--worktree", &worktree, "--command", BIN, "fake-agent"]);
    t.run_env(&[("RUNNER_HOST_ID", host)], args)
}

fn on(t: &TestRoot, host: &str, args: &[&str]) -> crate::Run {
    t.run_env(&[("RUNNER_HOST_ID", host)], args)
}

fn agent_host(t: &TestRoot, agent: &str) -> Option<String> {
    t.str(
        "sessions.db",
        &format!("SELECT host FROM sessions WHERE agent_name='{agent}'"),
    )
}

fn turn_hosts(t: &TestRoot, agent: &str) -> Vec<Option<String>> {
    t.db("sessions.db")
        .query_map(
            "SELECT host FROM turns WHERE agent_name=?1 ORDER BY turn_id",
            params![agent],
            |r| r.get(0),
        )
        .unwrap()
}

/// `runner hosts --json`, as (id → host object).
fn hosts(t: &TestRoot) -> Vec<serde_json::Value> {
    let r = t.run(["hosts", "--json"]);
    r.status(0);
    r.json().as_array().unwrap().clone()
}

fn host<'a>(list: &'a [serde_json::Value], id: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|h| h["id"] == id)
}

#[test]
fn an_agent_pinned_to_another_host_is_refused_there_by_turn_nudge_and_stop() {
    let Some(t) = pg_root() else { return };
    add(&t, "host-a", "w1", &[]).status(0);
    assert_eq!(
        agent_host(&t, "w1").as_deref(),
        Some("host-a"),
        "default: this host"
    );
    for args in [
        &["turn", "--agent", "w1", "--message", "hi"][..],
        &["turn", "--agent", "w1", "--from", "lead", "--message", "hi"][..],
        &["nudge", "--agent", "w1"][..],
        &["stop", "--agent", "w1"][..],
    ] {
        on(&t, "host-b", args)
            .status(2)
            .one_line_error("agent w1 is pinned to host host-a")
            .one_line_error("this host is host-b");
    }
    // Refused before anything was written: no mail stored, no turn, state kept.
    assert_eq!(t.i64("mail.db", "SELECT COUNT(*) FROM messages"), 0);
    assert_eq!(t.i64("sessions.db", "SELECT COUNT(*) FROM turns"), 0);
    assert_eq!(t.state("w1"), "booting");
    // Refused before the state is read: a completed agent still names its host.
    on(&t, "host-a", &["stop", "--agent", "w1"]).status(0);
    on(&t, "host-b", &["turn", "--agent", "w1", "--message", "hi"])
        .status(2)
        .one_line_error("pinned to host host-a");
    on(&t, "host-a", &["turn", "--agent", "w1", "--message", "hi"])
        .status(2)
        .one_line_error("completed");
    // Its own host runs it, and the turn row names the host.
    add(&t, "host-a", "w2", &[]).status(0);
    on(&t, "host-a", &["turn", "--agent", "w2", "--message", "hi"]).status(0);
    assert_eq!(turn_hosts(&t, "w2"), vec![Some("host-a".to_string())]);
}

#[test]
fn a_floating_agent_runs_on_either_host_and_host_pins_explicitly() {
    let Some(t) = pg_root() else { return };
    add(&t, "host-a", "fl", &["--host", "*"]).status(0);
    assert_eq!(agent_host(&t, "fl").as_deref(), Some("*"));
    on(&t, "host-b", &["turn", "--agent", "fl", "--message", "1"]).status(0);
    on(&t, "host-a", &["turn", "--agent", "fl", "--message", "2"]).status(0);
    assert_eq!(
        turn_hosts(&t, "fl"),
        vec![Some("host-b".to_string()), Some("host-a".to_string())]
    );
    // A NULL host (e.g. a store migrated from SQLite) is floating too.
    add(&t, "host-a", "legacy", &[]).status(0);
    t.db("sessions.db")
        .execute(
            "UPDATE sessions SET host=NULL WHERE agent_name='legacy'",
            params![],
        )
        .unwrap();
    on(
        &t,
        "host-b",
        &["turn", "--agent", "legacy", "--message", "x"],
    )
    .status(0);
    // --host names another host: pinned there, not here.
    add(&t, "host-a", "far", &["--host", "host-c"]).status(0);
    assert_eq!(agent_host(&t, "far").as_deref(), Some("host-c"));
    on(&t, "host-a", &["turn", "--agent", "far", "--message", "x"])
        .status(2)
        .one_line_error("pinned to host host-c");
    // --recover keeps the host unless --host is given.
    on(&t, "host-c", &["stop", "--agent", "far"]).status(0);
    add(&t, "host-a", "far", &["--recover"]).status(0);
    assert_eq!(agent_host(&t, "far").as_deref(), Some("host-c"));
    on(&t, "host-c", &["stop", "--agent", "far"]).status(0);
    add(&t, "host-a", "far", &["--recover", "--host", "*"]).status(0);
    assert_eq!(agent_host(&t, "far").as_deref(), Some("*"));
    // A bad host is one line, exit 2, nothing added.
    add(&t, "host-a", "bad", &["--host", "no spaces"])
        .status(2)
        .one_line_error("invalid host");
    assert_eq!(agent_host_count(&t, "bad"), 0);
}

fn agent_host_count(t: &TestRoot, agent: &str) -> i64 {
    t.i64(
        "sessions.db",
        &format!("SELECT COUNT(*) FROM sessions WHERE agent_name='{agent}'"),
    )
}

#[test]
fn commands_that_run_turns_or_sweeps_register_their_host() {
    let Some(t) = pg_root() else { return };
    add(&t, "host-a", "w", &["--host", "*"]).status(0);
    // agent add and read-only commands register nothing.
    on(&t, "host-a", &["status"]).status(0);
    assert!(hosts(&t).is_empty());
    on(&t, "host-a", &["turn", "--agent", "w", "--message", "x"]).status(0);
    on(&t, "host-b", &["sweep"]).status(0);
    on(&t, "host-c", &["nudge", "--agent", "w"]).status(0);
    let list = hosts(&t);
    let ids: Vec<&str> = list.iter().map(|h| h["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["host-a", "host-b", "host-c"]);
    for h in &list {
        assert_eq!(h["state"], "online");
        assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(h["running_turns"], 0);
    }
    // Running turns: leases of that host holding a turn.
    t.db("sessions.db")
        .execute(
            "INSERT INTO leases (agent_name, host, runner_pid, turn_id, token, expires_at) \
             VALUES ('w', 'host-b', 1, 't1', nextval('lease_token'), now() + interval '1 minute'), \
             ('x', 'host-b', 1, NULL, nextval('lease_token'), now() + interval '1 minute')",
            params![],
        )
        .unwrap();
    let list = hosts(&t);
    assert_eq!(host(&list, "host-b").unwrap()["running_turns"], 1);
    assert_eq!(host(&list, "host-a").unwrap()["running_turns"], 0);
    let human = t.run(["hosts"]);
    human.status(0);
    let line = human
        .stdout()
        .lines()
        .find(|l| l.starts_with("host-b "))
        .unwrap()
        .to_string();
    assert!(line.contains("online") && line.contains(" 1 "), "{line}");
}

#[test]
fn serve_registers_beats_serves_own_and_floating_agents_and_stops() {
    let Some(t) = pg_root() else { return };
    add(&t, "srv", "mine", &[]).status(0);
    add(&t, "other", "theirs", &[]).status(0);
    add(&t, "other", "floater", &["--host", "*"]).status(0);
    for a in ["mine", "theirs", "floater"] {
        t.mail("lead", a, "work");
    }
    let mut c = t.cmd([
        "serve",
        "--poll",
        "50ms",
        "--sweep-every",
        "1h",
        "--grace",
        "300ms",
    ]);
    let log_path = t.path().join("serve.stderr");
    c.envs([
        ("RUNNER_HOST_ID", "srv"),
        ("RUNNER_FLEET_HEARTBEAT", "100ms"),
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::fs::File::create(&log_path).unwrap());
    let child = c.spawn().unwrap();
    let last_seen = || {
        t.str(
            "sessions.db",
            "SELECT CAST(last_seen_at AS TEXT) FROM hosts WHERE id='srv' AND state='online'",
        )
    };
    wait_for(Duration::from_secs(20), "serve registered", || {
        t.i64("sessions.db", "SELECT COUNT(*) FROM hosts WHERE id='srv'") == 1
    });
    let first = last_seen().expect("online while serving");
    wait_for(Duration::from_secs(20), "a heartbeat", || {
        last_seen().is_some_and(|s| s > first)
    });
    let h = hosts(&t);
    let srv = host(&h, "srv").unwrap();
    assert_eq!(srv["state"], "online");
    assert_eq!(srv["pid"], child.id());
    wait_for(Duration::from_secs(30), "own and floating turns", || {
        t.i64(
            "sessions.db",
            "SELECT COUNT(*) FROM turns WHERE ended_at IS NOT NULL AND agent_name IN ('mine','floater')",
        ) == 2
    });
    // Both were due in the same poll as `theirs`: had serve scheduled it,
    // its turn would have been tried (and refused, logged) with them.
    assert_eq!(turn_hosts(&t, "mine"), vec![Some("srv".to_string())]);
    assert_eq!(turn_hosts(&t, "floater"), vec![Some("srv".to_string())]);
    assert!(turn_hosts(&t, "theirs").is_empty());
    assert_eq!(
        t.i64(
            "mail.db",
            "SELECT COUNT(*) FROM messages WHERE to_agent='theirs' AND read=0 AND claimed_by IS NULL"
        ),
        1
    );
    signal(child.id(), Signal::SIGTERM);
    let out = wait_child(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("floater") && !log.contains("theirs"), "{log}");
    let h = hosts(&t);
    assert_eq!(host(&h, "srv").unwrap()["state"], "stopped");
    // The other host's turn of its own agent registers it beside.
    on(&t, "other", &["turn", "--agent", "theirs"]).status(0);
    let h = hosts(&t);
    assert_eq!(host(&h, "other").unwrap()["state"], "online");
    assert_eq!(host(&h, "srv").unwrap()["state"], "stopped");
}

#[test]
fn host_columns_show_on_postgres() {
    let Some(t) = pg_root() else { return };
    add(&t, "host-a", "w", &[]).status(0);
    add(&t, "host-a", "fl", &["--host", "*"]).status(0);
    t.mail("w", "fl", "hello");
    on(
        &t,
        "host-b",
        &["turn", "--agent", "fl", "--no-mail", "--message", "x"],
    )
    .status(0);
    let s = t.run(["status", "--json"]);
    let s = s.json();
    let by = |n: &str| {
        s.as_array()
            .unwrap()
            .iter()
            .find(|a| a["agent_name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by("w")["host"], "host-a");
    assert_eq!(by("fl")["host"], "*");
    let human = t.run(["status"]).stdout();
    assert!(human.lines().next().unwrap().ends_with(" HOST"), "{human}");
    assert_eq!(t.last_turn("fl")["host"], "host-b");
    assert!(t.run(["turns"]).stdout().contains("host-b"));
    let m = t.run(["mail", "list", "--json"]).json();
    assert_eq!(m[0]["host"], "*");
    assert!(t.run(["mail", "list"]).stdout().contains("fl@*"));
    let a = t.run(["agent", "show", "w", "--json"]).json();
    assert_eq!(a["host"], "host-a");
}

#[test]
fn mark_offline_stale_is_a_cas_on_the_database_clock() {
    use runner::store::hosts as h;
    let Some(t) = pg_root() else { return };
    let pg = t.pg.as_ref().unwrap();
    let store = runner::store::Store::open_backend(
        &t.path().join("unused"),
        &runner::store::Backend::Postgres {
            url: pg.url.clone(),
            schema: pg.schema.clone(),
        },
    )
    .unwrap();
    let db = &store.conn;
    h::upsert(db, "fresh", 1, "v").unwrap();
    h::upsert(db, "silent", 2, "v").unwrap();
    h::upsert(db, "gone", 3, "v").unwrap();
    h::mark_stopped(db, "gone").unwrap();
    db.execute(
        "UPDATE hosts SET last_seen_at = now() - interval '2 minutes' WHERE id IN ('silent','gone')",
        params![],
    )
    .unwrap();
    assert_eq!(
        h::mark_offline_stale(db, Duration::from_secs(60)).unwrap(),
        1
    );
    let state = |id: &str| -> String {
        db.query_row("SELECT state FROM hosts WHERE id=?1", params![id], |r| {
            r.get(0)
        })
        .unwrap()
    };
    assert_eq!(state("silent"), "offline");
    assert_eq!(state("fresh"), "online");
    assert_eq!(state("gone"), "stopped", "a stopped host stays stopped");
    // Again: nothing left to change.
    assert_eq!(
        h::mark_offline_stale(db, Duration::from_secs(60)).unwrap(),
        0
    );
    // A beat brings a host back online; a fresh host is not stale at 60 s.
    assert!(h::beat(db, "silent").unwrap());
    assert_eq!(state("silent"), "online");
    assert_eq!(
        h::mark_offline_stale(db, Duration::from_secs(60)).unwrap(),
        0
    );
    assert!(!h::beat(db, "never-registered").unwrap());
    // The re-check is the database's: a stale threshold below the age only.
    db.execute(
        "UPDATE hosts SET last_seen_at = now() - interval '30 seconds' WHERE id='fresh'",
        params![],
    )
    .unwrap();
    assert_eq!(
        h::mark_offline_stale(db, Duration::from_secs(60)).unwrap(),
        0
    );
    assert_eq!(
        h::mark_offline_stale(db, Duration::from_secs(20)).unwrap(),
        1
    );
    assert_eq!(state("fresh"), "offline");
    let list = h::list(db).unwrap();
    let fresh = list.iter().find(|r| r.id == "fresh").unwrap();
    assert!(fresh.last_seen_ms_ago >= 30_000, "{fresh:?}");
}

#[test]
fn sqlite_is_one_host_no_pinning() {
    let t = TestRoot::sqlite();
    let r = add(&t, "host-a", "w", &["--host", "host-b"]);
    r.status(2)
        .one_line_error("--host needs the PostgreSQL store");
    add(&t, "host-a", "w", &["--host", "*"])
        .status(2)
        .one_line_error("--host needs the PostgreSQL store");
    add(&t, "host-a", "w", &[]).status(0);
    // Any host id runs it: there is nothing to pin on SQLite.
    on(&t, "host-b", &["turn", "--agent", "w", "--message", "x"]).status(0);
    let list = on(&t, "host-a", &["hosts", "--json"]);
    let list = list.status(0).json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], "host-a");
    assert_eq!(list[0]["state"], "local");
    // SQLite output is unchanged: no host field or column.
    assert!(t.last_turn("w").get("host").is_none());
    let s = t.run(["status", "--json"]).json();
    assert!(s[0].get("host").is_none());
    assert!(!t.run(["status"]).stdout().contains("HOST"));
    assert!(!t.run(["turns"]).stdout().contains("HOST"));
}

#[test]
fn the_heartbeat_beats_on_its_own_connection_and_reconnects() {
    let Some(t) = pg_root() else { return };
    let pg = t.pg.as_ref().unwrap();
    let id = format!("hb-{}", std::process::id());
    let mut ctx = runner::ctx::Ctx::new(&t.root(), false).unwrap();
    ctx.config.store = runner::store::Backend::Postgres {
        url: pg.url.clone(),
        schema: pg.schema.clone(),
    };
    ctx.config.host_id = id.clone();
    ctx.config.fleet.heartbeat = Duration::from_millis(50);
    let host = runner::hosts::Serving::start(&ctx).unwrap();
    let seen = || -> String {
        t.str(
            "sessions.db",
            &format!("SELECT CAST(last_seen_at AS TEXT) FROM hosts WHERE id='{id}'"),
        )
        .unwrap()
    };
    let first = seen();
    wait_for(Duration::from_secs(20), "a beat", || seen() > first);
    // Kill the heartbeat's connection: it reconnects and beats on.
    let killed = pg.i64(&format!(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = 'runner-heartbeat {id}'"
    ));
    assert_eq!(killed, 1);
    let after_kill = seen();
    wait_for(Duration::from_secs(20), "a beat after reconnecting", || {
        seen() > after_kill
    });
    host.stopped().unwrap();
    assert_eq!(
        t.str(
            "sessions.db",
            &format!("SELECT state FROM hosts WHERE id='{id}'"),
        )
        .as_deref(),
        Some("stopped")
    );
}
