//! Issue 2: stores, states, capabilities, config, and the agent, mail and status commands.

use std::os::unix::fs::PermissionsExt;

use runner::store::db::params;

use crate::TestRoot;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_private_root_and_databases() {
    let t = TestRoot::sqlite();
    t.run(["init"]).status(0);
    let r = t.root();
    assert_eq!(mode(&r), 0o700);
    for db in ["sessions.db", "events.db", "mail.db"] {
        assert_eq!(mode(&r.join(db)), 0o600, "{db}");
    }
    // events.db holds stdout lines: it is made with 16 KiB pages (fewer
    // WAL writes and B-tree splits per line); the others keep SQLite's 4 KiB.
    let page_size = |db: &str| -> i64 {
        t.sqlite_file(db)
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(page_size("events.db"), 16384);
    assert_eq!(page_size("sessions.db"), 4096);
    t.run(["init"]).status(0); // idempotent
    t.agent("b1", "builder", None, &[]);
    t.run(["turn", "--agent", "b1", "--message", "hi"])
        .status(0);
    assert_eq!(mode(&r.join("agents")), 0o700);
    assert_eq!(mode(&r.join("agents/b1")), 0o700);
    let logs = r.join("logs").join("b1");
    assert_eq!(mode(&logs), 0o700);
    let turn = std::fs::read_dir(&logs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(mode(&turn), 0o700);
    for f in ["stdout.ndjson", "stderr.log", "runner.log"] {
        assert_eq!(mode(&turn.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&r.join("agents/b1/turn.lock")), 0o600);
}

#[test]
fn agent_add_show_status_and_recover() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &[]);
    t.agent("b1", "builder", Some("lead"), &["--lines", "2"]);
    let show = t.run(["agent", "show", "b1", "--json"]);
    show.status(0);
    let v = show.json();
    assert_eq!(v["state"], "booting");
    assert_eq!(v["parent_agent"], "lead");
    assert_eq!(v["runtime"], "command");
    assert_eq!(v["depth"], 1);
    t.run(["agent", "show", "b1"]).status(0);
    let st = t.run(["status", "--json"]);
    st.status(0);
    assert_eq!(st.json().as_array().unwrap().len(), 2);
    let human = t.run(["status"]);
    human.status(0);
    assert!(human.stdout().contains("b1") && human.stdout().contains("booting"));
    // duplicates and recover
    t.run(["agent", "add", "b1", "--capability", "builder"])
        .status(2)
        .one_line_error("already exists");
    t.run(["agent", "add", "b1", "--capability", "builder", "--recover"])
        .status(2)
        .one_line_error("only a completed or zombie");
    t.run(["stop", "--agent", "b1"]).status(0);
    assert_eq!(t.state("b1"), "completed");
    t.run([
        "agent",
        "add",
        "b1",
        "--capability",
        "builder",
        "--recover",
        "--worktree",
        t.path().to_str().unwrap(),
    ])
    .status(0);
    assert_eq!(t.state("b1"), "booting");
    assert_eq!(
        t.str(
            "sessions.db",
            "SELECT parent_agent FROM sessions WHERE agent_name='b1'"
        )
        .as_deref(),
        Some("lead")
    );
}

#[test]
fn bad_input_is_one_line_exit_2_and_writes_nothing() {
    let t = TestRoot::new();
    t.run(["init"]).status(0);
    let long = "x".repeat(65);
    for name in ["../x", long.as_str(), ".hidden", "a/b", "a b"] {
        t.run(["agent", "add", name, "--capability", "builder"])
            .status(2)
            .one_line_error("invalid agent name");
    }
    assert!(
        !t.root().join("agents").exists(),
        "nothing written for bad names"
    );
    assert!(!t.root().join("x").exists());
    let r = t.run(["agent", "add", "b1", "--capability", "wizard"]);
    r.status(2).one_line_error("unknown capability 'wizard'");
    assert!(
        r.stderr().contains("builder") && r.stderr().contains("lead"),
        "lists known: {}",
        r.stderr()
    );
    assert_eq!(t.i64("sessions.db", "SELECT COUNT(*) FROM sessions"), 0);
    t.run([
        "agent",
        "add",
        "b1",
        "--capability",
        "builder",
        "--worktree",
        "/nonexistent/dir",
    ])
    .status(2)
    .one_line_error("not a directory");
    t.agent("b1", "builder", None, &[]);
    t.run([
        "mail",
        "send",
        "--from",
        "a",
        "--to",
        "b1",
        "--payload",
        "{",
    ])
    .status(2)
    .one_line_error("--payload is not valid JSON");
    t.run([
        "mail", "send", "--from", "a", "--to", "b1", "--type", "gossip",
    ])
    .status(2)
    .one_line_error("unknown mail type");
    assert_eq!(t.i64("mail.db", "SELECT COUNT(*) FROM messages"), 0);
    t.run(["turn", "--agent", "b1", "--stall", "10parsecs"])
        .status(2);
    t.run(["turn", "--agent", "ghost", "--message", "x"])
        .status(2)
        .one_line_error("runner agent add");
    t.run(["turn", "--agent", "../etc", "--message", "x"])
        .status(2)
        .one_line_error("invalid agent name");
    assert_eq!(t.i64("sessions.db", "SELECT COUNT(*) FROM turns"), 0);
}

#[test]
fn a_file_that_is_not_a_database_is_reported_not_overwritten() {
    let t = TestRoot::sqlite();
    std::fs::create_dir_all(t.root()).unwrap();
    let p = t.root().join("sessions.db");
    std::fs::write(&p, "just some text\n".repeat(100)).unwrap();
    let before = std::fs::read(&p).unwrap();
    t.run(["status"])
        .status(2)
        .one_line_error("not a runner database");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    let t2 = TestRoot::sqlite();
    std::fs::create_dir_all(t2.root()).unwrap();
    std::fs::write(t2.root().join("mail.db"), "nope").unwrap();
    t2.run(["mail", "list"]).status(2).one_line_error("mail.db");
}

#[test]
fn mail_send_list_check_and_completed_recipients() {
    let t = TestRoot::new();
    t.agent("b1", "builder", None, &[]);
    let id = t.mail("lead", "b1", "hello");
    assert!(id.starts_with("msg-") && id.len() == 16, "{id}");
    assert!(
        id[4..]
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    );
    let l = t.run(["mail", "list", "--to", "b1", "--json"]);
    l.status(0);
    assert_eq!(l.json()[0]["id"], id.as_str());
    assert_eq!(l.json()[0]["read"], false);
    let c = t.run(["mail", "check", "--agent", "b1"]);
    c.status(0);
    assert!(
        c.stdout()
            .contains("[MAIL] From: lead | Subject: task | Priority: normal"),
        "{}",
        c.stdout()
    );
    assert_eq!(t.i64("mail.db", "SELECT read FROM messages"), 1);
    // a completed recipient is refused unless --force
    t.run(["stop", "--agent", "b1"]).status(0);
    t.run([
        "mail", "send", "--from", "lead", "--to", "b1", "--body", "x",
    ])
    .status(2)
    .one_line_error("--force");
    t.run([
        "mail", "send", "--from", "lead", "--to", "b1", "--body", "x", "--force",
    ])
    .status(0);
    // unregistered names are fine (a coordinator may not be an agent)
    t.run([
        "mail",
        "send",
        "--from",
        "coordinator",
        "--to",
        "nobody",
        "--body",
        "x",
    ])
    .status(0);
    assert_eq!(
        t.run(["mail", "list", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn config_and_capability_files_errors_name_the_field() {
    let t = TestRoot::new();
    std::fs::create_dir_all(t.root().join("capabilities")).unwrap();
    std::fs::write(
        t.root().join("config.toml"),
        "[turn]\ngrace = \"soonish\"\n",
    )
    .unwrap();
    t.run(["status"]).status(2).one_line_error("turn.grace");
    std::fs::write(t.root().join("config.toml"), "[turn]\ngrace = \"1s\"\n").unwrap();
    std::fs::write(
        t.root().join("capabilities/poet.md"),
        "+++\nterminal_mail = [\"result\"]\non_idle = \"dream\"\n+++\nWrite.\n",
    )
    .unwrap();
    t.run(["agent", "add", "p1", "--capability", "poet"])
        .status(2)
        .one_line_error("on_idle");
    std::fs::write(
        t.root().join("capabilities/poet.md"),
        "+++\nterminal_mail = [\"result\"]\non_idle = \"wait\"\n+++\nWrite.\n",
    )
    .unwrap();
    t.agent("p1", "poet", None, &[]);
    // the root's capability: a clean turn without terminal mail waits
    t.run(["turn", "--agent", "p1", "--message", "go"])
        .status(0);
    assert_eq!(t.state("p1"), "between_turns");
    t.run_env(&[("RUNNER_TURN_GRACE", "forever")], ["status"])
        .status(2)
        .one_line_error("RUNNER_TURN_GRACE");
}

/// An overstory-shaped root (old columns, old CHECKs, a few rows) is upgraded
/// in place, read by `status` and `mail list`, and gains the new columns.
#[test]
fn migrates_an_overstory_root_in_place() {
    let t = TestRoot::sqlite();
    std::fs::create_dir_all(t.root()).unwrap();
    let s = rusqlite::Connection::open(t.root().join("sessions.db")).unwrap();
    s.execute_batch(
        "CREATE TABLE sessions (
          id TEXT PRIMARY KEY, agent_name TEXT NOT NULL UNIQUE, capability TEXT NOT NULL,
          worktree_path TEXT NOT NULL, branch_name TEXT NOT NULL, bead_id TEXT NOT NULL,
          tmux_session TEXT NOT NULL,
          state TEXT NOT NULL DEFAULT 'booting' CHECK(state IN ('booting','working','completed','stalled','zombie')),
          pid INTEGER, parent_agent TEXT, depth INTEGER NOT NULL DEFAULT 0, run_id TEXT,
          started_at TEXT NOT NULL, last_activity TEXT NOT NULL,
          escalation_level INTEGER NOT NULL DEFAULT 0, stalled_since TEXT);
         INSERT INTO sessions VALUES ('s1','old-builder','builder','/tmp','b','bead-1','tmux-1','working',NULL,'lead',1,'run-1',
           '2026-01-01T00:00:00.000Z','2026-01-01T00:00:00.000Z',0,NULL);
         INSERT INTO sessions VALUES ('s2','old-lead','lead','/tmp','b','bead-2','tmux-2','completed',NULL,NULL,0,'run-1',
           '2026-01-01T00:00:00.000Z','2026-01-01T00:00:00.000Z',0,NULL);",
    )
    .unwrap();
    drop(s);
    let m = rusqlite::Connection::open(t.root().join("mail.db")).unwrap();
    m.execute_batch(
        "CREATE TABLE messages (
          id TEXT PRIMARY KEY, from_agent TEXT NOT NULL, to_agent TEXT NOT NULL, subject TEXT NOT NULL,
          body TEXT NOT NULL, type TEXT NOT NULL DEFAULT 'status' CHECK(type IN ('status','question','result','error')),
          priority TEXT NOT NULL DEFAULT 'normal' CHECK(priority IN ('low','normal','high','urgent')),
          thread_id TEXT, read INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL DEFAULT (datetime('now')));
         INSERT INTO messages VALUES ('msg-aaaaaaaaaaaa','old-lead','old-builder','hi','body','status','normal',NULL,0,'2026-01-01 00:00:00');",
    )
    .unwrap();
    drop(m);
    let st = t.run(["status", "--json"]);
    st.status(0);
    let names: Vec<String> = st
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["agent_name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["old-builder", "old-lead"]);
    let ml = t.run(["mail", "list", "--json"]);
    ml.status(0);
    assert_eq!(ml.json()[0]["id"], "msg-aaaaaaaaaaaa");
    let cols: Vec<String> = {
        let c = t.sqlite_file("sessions.db");
        let mut st = c.prepare("PRAGMA table_info(sessions)").unwrap();
        st.query_map([], |r| r.get::<_, String>(1))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    for c in [
        "task_id",
        "claude_session_id",
        "runtime",
        "runtime_command",
        "model",
    ] {
        assert!(cols.iter().any(|x| x == c), "missing {c}: {cols:?}");
    }
    assert_eq!(
        t.str("sessions.db", "SELECT task_id FROM sessions WHERE id='s1'")
            .as_deref(),
        Some("bead-1")
    );
    // the relaxed state CHECK accepts the new states, the widened type CHECK the new types
    t.db("sessions.db")
        .execute(
            "UPDATE sessions SET state='between_turns' WHERE id='s1'",
            params![],
        )
        .unwrap();
    t.run([
        "mail",
        "send",
        "--from",
        "old-builder",
        "--to",
        "old-lead",
        "--type",
        "worker_done",
        "--force",
    ])
    .status(0);
    assert_eq!(
        t.i64("mail.db", "SELECT COUNT(*) FROM messages WHERE tries = 0"),
        2
    );
    // idempotent: a second open changes nothing
    t.run(["status"]).status(0);
    assert_eq!(t.i64("sessions.db", "PRAGMA user_version"), 1);
}

#[test]
fn a_bad_name_touches_no_file_not_even_the_root() {
    let long = "x".repeat(65);
    let bad = [
        "../x",
        "a b",
        ".hidden",
        "_x",
        "é",
        long.as_str(),
        "a\nb",
        "a/b",
        "../../etc",
    ];
    for name in bad {
        let t = TestRoot::new();
        let commands: Vec<Vec<&str>> = vec![
            vec!["agent", "add", name, "--capability", "builder"],
            vec![
                "agent",
                "add",
                "ok",
                "--capability",
                "builder",
                "--parent",
                name,
            ],
            vec!["agent", "show", name],
            vec!["turn", "--agent", name, "--message", "x"],
            vec!["turn", "--agent", "ok", "--from", name, "--message", "x"],
            vec!["nudge", "--agent", name],
            vec!["stop", "--agent", name],
            vec!["status", "--agent", name],
            vec!["turns", "--agent", name],
            vec!["events", "--agent", name],
            vec!["mail", "send", "--from", name, "--to", "ok"],
            vec!["mail", "send", "--from", "ok", "--to", name],
            vec!["mail", "list", "--to", name],
            vec!["mail", "check", "--agent", name],
        ];
        for args in commands {
            t.run(&args).status(2).one_line_error("invalid agent name");
            let left: Vec<_> = std::fs::read_dir(t.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(left.is_empty(), "{args:?} left {left:?} behind");
        }
    }
}

#[test]
fn recover_keeps_what_it_is_not_told_to_change() {
    let t = TestRoot::new();
    let wt = t.path().join("wt");
    std::fs::create_dir(&wt).unwrap();
    let wt = wt.display().to_string();
    t.run([
        "agent",
        "add",
        "lead",
        "--capability",
        "lead",
        "--task",
        "T1",
        "--worktree",
        &wt,
        "--command",
        "true",
        "x",
    ])
    .status(0);
    t.run(["agent", "add", "lead", "--recover"])
        .status(2)
        .one_line_error("only a completed or zombie agent");
    // What `ov status` does to an idle headless agent.
    t.db("sessions.db")
        .execute("UPDATE sessions SET state='zombie'", params![])
        .unwrap();
    t.run(["turn", "--agent", "lead", "--message", "x"])
        .status(2)
        .one_line_error("--recover");
    t.run(["agent", "add", "lead", "--recover"]).status(0);
    let a = t.run(["agent", "show", "lead", "--json"]).json();
    assert_eq!(a["state"], "booting");
    assert_eq!(a["capability"], "lead");
    assert_eq!(a["runtime"], "command");
    assert_eq!(a["runtime_command"], serde_json::json!(["true", "x"]));
    assert_eq!(a["worktree_path"], wt.as_str());
    assert_eq!(a["task_id"], "T1");
    t.run(["agent", "add", "ghost", "--recover"])
        .status(2)
        .one_line_error("does not exist");
}

/// A turn leaves no long WAL behind: the next process to open a file would
/// read all of it to rebuild its index. One that grew past 1 MiB is
/// checkpointed and emptied when the turn lets its connection go.
#[test]
fn a_turn_leaves_no_long_wal_behind() {
    let t = TestRoot::sqlite();
    t.agent(
        "b1",
        "builder",
        None,
        &["--lines", "4000", "--line-bytes", "600"],
    );
    t.mail("lead", "b1", "go");
    t.run(["turn", "--agent", "b1"]).status(0);
    let wal = std::fs::metadata(t.root().join("events.db-wal")).map_or(0, |m| m.len());
    assert!(wal <= 1 << 20, "events.db-wal is {wal} bytes");
    // Every row is still there, in the database file itself.
    assert_eq!(
        t.i64(
            "events.db",
            "SELECT COUNT(*) FROM events WHERE event_type='progress'"
        ),
        4000
    );
}

/// While its agent runs, a turn trims the WALs of `sessions.db` and
/// `mail.db` that grew past 256 KiB (the limit after the turn stays 1 MiB):
/// the next runner to open them reads a short WAL. Here another writer left
/// ~400 KiB in `sessions.db-wal`; after the turn only its own frames remain.
#[test]
fn a_turn_trims_a_quarter_mib_sessions_wal_while_its_agent_runs() {
    let t = TestRoot::sqlite();
    t.agent("b1", "builder", None, &[]);
    {
        let c = rusqlite::Connection::open(t.root().join("sessions.db")).unwrap();
        // Left as a runner leaves it: no checkpoint when this closes.
        c.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
        c.execute_batch("PRAGMA wal_autocheckpoint=0").unwrap();
        for i in 0..100 {
            c.execute(
                "UPDATE sessions SET last_activity=?1 WHERE agent_name='b1'",
                [format!("2026-01-01T00:00:{:02}.000Z", i % 60)],
            )
            .unwrap();
        }
    }
    let wal = |f: &str| std::fs::metadata(t.root().join(f)).map_or(0, |m| m.len());
    assert!(
        wal("sessions.db-wal") > 256 << 10,
        "the setup grew sessions.db-wal to only {} bytes",
        wal("sessions.db-wal")
    );
    t.mail("lead", "b1", "go");
    t.run(["turn", "--agent", "b1"]).status(0);
    let after = wal("sessions.db-wal");
    assert!(after < 256 << 10, "sessions.db-wal is {after} bytes");
    assert_eq!(t.state("b1"), "completed", "the turn's own writes are kept");
}
