//! Issue 3: `runner turn` end to end with the fake agent — every outcome row
//! that needs no timing, the event mapping, bad lines, resume, big turns,
//! and the lease.

use std::time::{Duration, Instant};

use runner::store::db::params;

use crate::{TestRoot, wait_child, wait_for};

fn fixture(p: &str) -> String {
    format!("{}/fixtures/{p}", env!("CARGO_MANIFEST_DIR"))
}

fn mail_row(t: &TestRoot, id: &str) -> (i64, i64, Option<String>, Option<String>, Option<String>) {
    t.db("mail.db")
        .query_row(
            "SELECT read, tries, claimed_by, process_after, dead_at FROM messages WHERE id=?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap()
}

#[test]
fn done_terminal_mail_completes_delivers_and_tells_nobody() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &[]);
    t.agent(
        "b1",
        "builder",
        Some("lead"),
        &["--lines", "3", "--mail", "worker_done", "--mail-to", "lead"],
    );
    let id = t.mail("lead", "b1", "build it");
    let r = t.run(["turn", "--agent", "b1"]);
    r.status(0);
    assert!(r.stdout().contains("done"), "{}", r.stdout());
    assert_eq!(t.state("b1"), "completed");
    let (read, tries, claimed_by, _, _) = mail_row(&t, &id);
    assert_eq!((read, tries), (1, 0));
    let row = t.last_turn("b1");
    assert_eq!(row["outcome"], "done");
    assert_eq!(row["terminal_mail_observed"], true);
    assert_eq!(row["clean_result"], true);
    assert_eq!(row["exit_code"], 0);
    assert_eq!(row["mail_ids"][0], id.as_str());
    assert_eq!(claimed_by.as_deref(), row["turn_id"].as_str());
    assert_eq!(row["lines"], 5); // init, 3 text, result
    assert!(row["reason"].is_null());
    assert!(row["ended_at"].is_string());
    assert_eq!(t.worker_died("lead"), 0);
    // the worker_done was stamped with the turn id
    assert_eq!(
        t.str(
            "mail.db",
            "SELECT turn_id FROM messages WHERE type='worker_done'"
        )
        .as_deref(),
        row["turn_id"].as_str()
    );
    t.assert_clean("b1");
}

#[test]
fn exited_without_terminal_mail_tells_the_parent_once() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &[]);
    t.agent("b1", "builder", Some("lead"), &[]);
    t.agent("b2", "builder", None, &[]);
    let id = t.mail("lead", "b1", "x");
    t.run(["turn", "--agent", "b1"]).status(0);
    assert_eq!(t.last_turn("b1")["outcome"], "exited");
    assert_eq!(t.state("b1"), "completed");
    assert_eq!(mail_row(&t, &id).0, 1);
    assert_eq!(t.worker_died("lead"), 1);
    let (subject, prio, payload): (String, String, String) = t
        .db("mail.db")
        .query_row(
            "SELECT subject, priority, payload FROM messages WHERE type='worker_died'",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(subject, "[RUNNER] worker_died: b1");
    assert_eq!(prio, "high");
    let p: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(p["reason"], "clean exit without terminal mail");
    assert_eq!(p["terminatedBy"], "runner");
    // no parent: nobody to tell
    t.run(["turn", "--agent", "b2", "--message", "x"]).status(0);
    assert_eq!(
        t.i64(
            "mail.db",
            "SELECT COUNT(*) FROM messages WHERE type='worker_died'"
        ),
        1
    );
    t.assert_clean("b1");
}

#[test]
fn waiting_lead_goes_between_turns() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &[]);
    let id = t.mail("orchestrator", "lead", "plan");
    t.run(["turn", "--agent", "lead"]).status(0);
    assert_eq!(t.last_turn("lead")["outcome"], "waiting");
    assert_eq!(t.state("lead"), "between_turns");
    assert_eq!(mail_row(&t, &id).0, 1);
    assert_eq!(
        t.i64(
            "mail.db",
            "SELECT COUNT(*) FROM messages WHERE type='worker_died'"
        ),
        0
    );
}

#[test]
fn failed_turns_retry_the_mail_with_backoff() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &[]);
    t.agent(
        "b1",
        "builder",
        Some("lead"),
        &["--result", "error", "--exit", "1"],
    );
    let id = t.mail("lead", "b1", "x");
    let r = t.run(["turn", "--agent", "b1"]);
    r.status(1);
    let row = t.last_turn("b1");
    assert_eq!(row["outcome"], "failed");
    assert!(
        row["reason"].as_str().unwrap().contains("error result"),
        "{row}"
    );
    assert_eq!(row["clean_result"], false);
    assert_eq!(t.state("b1"), "between_turns");
    let (read, tries, claimed_by, after, dead) = mail_row(&t, &id);
    assert_eq!((read, tries), (0, 1));
    assert!(claimed_by.is_none() && dead.is_none());
    assert!(
        after.as_deref().unwrap() > row["ended_at"].as_str().unwrap(),
        "process_after in the future"
    );
    assert_eq!(t.worker_died("lead"), 0);
    // not due yet: nothing to deliver, nothing spawned
    let r = t.run(["turn", "--agent", "b1"]);
    r.status(0);
    assert!(r.stdout().contains("nothing to deliver"));
    assert_eq!(t.i64("sessions.db", "SELECT COUNT(*) FROM turns"), 1);
}

#[test]
fn an_exit_without_the_end_of_turn_line_is_failed_even_with_code_0() {
    let t = TestRoot::new();
    t.agent("b1", "builder", None, &["--result", "none"]);
    t.run(["turn", "--agent", "b1", "--message", "x"]).status(1);
    let row = t.last_turn("b1");
    assert_eq!(row["outcome"], "failed");
    assert!(
        row["reason"]
            .as_str()
            .unwrap()
            .contains("without an end-of-turn line")
    );
    t.agent(
        "b2",
        "builder",
        None,
        &["--result", "none", "--signal", "KILL"],
    );
    t.run(["turn", "--agent", "b2", "--message", "x"]).status(1);
    assert_eq!(t.last_turn("b2")["signal"], 9);
}

#[test]
fn refused_shows_the_clis_stderr_and_keeps_the_try_count() {
    let t = TestRoot::new();
    t.agent(
        "b1",
        "builder",
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
            "Error: not logged in (fake auth failure)",
        ],
    );
    let id = t.mail("lead", "b1", "x");
    let r = t.run(["turn", "--agent", "b1"]);
    r.status(5);
    assert!(r.stdout().contains("not logged in"), "{}", r.stdout());
    let row = t.last_turn("b1");
    assert_eq!(row["outcome"], "refused");
    assert!(row["reason"].as_str().unwrap().contains("not logged in"));
    assert!(
        row["stderr_tail"]
            .as_str()
            .unwrap()
            .contains("not logged in")
    );
    assert_eq!(t.state("b1"), "booting");
    let (read, tries, claimed, _, _) = mail_row(&t, &id);
    assert_eq!((read, tries), (0, 0));
    assert!(claimed.is_none());
    let st = t.run(["status"]);
    assert!(
        st.stdout().contains("not logged in"),
        "status shows it: {}",
        st.stdout()
    );
    t.assert_clean("b1");
}

#[test]
fn spawn_failed_keeps_the_try_count() {
    let t = TestRoot::new();
    t.run([
        "agent",
        "add",
        "b1",
        "--capability",
        "builder",
        "--command",
        "/nonexistent/agent-cli",
        "--flag",
    ])
    .status(0);
    let id = t.mail("lead", "b1", "x");
    let r = t.run(["turn", "--agent", "b1"]);
    r.status(5);
    let row = t.last_turn("b1");
    assert_eq!(row["outcome"], "spawn_failed");
    assert!(
        row["reason"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/agent-cli")
    );
    assert_eq!(mail_row(&t, &id).1, 0);
    assert_eq!(t.state("b1"), "booting");
    t.assert_clean("b1");
}

#[test]
fn event_mapping_table_and_tool_durations() {
    let t = TestRoot::new();
    t.agent(
        "b1",
        "builder",
        None,
        &[
            "--no-init",
            "--lines",
            "0",
            "--result",
            "none",
            "--emit",
            &fixture("streams/all-types.ndjson"),
        ],
    );
    t.run(["turn", "--agent", "b1", "--message", "x"]).status(0);
    let c = t.db("events.db");
    let rows: Vec<(String, String, Option<String>, Option<i64>)> = c
        .query_map(
            "SELECT event_type, level, tool_name, tool_duration_ms FROM events WHERE line_no IS NOT NULL ORDER BY id",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    let kinds: Vec<(&str, &str)> = rows
        .iter()
        .map(|(a, b, _, _)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("session_start", "info"),
            ("custom", "warn"),
            ("custom", "info"),
            ("progress", "info"),
            ("custom", "debug"),
            ("tool_start", "info"),
            ("tool_end", "info"),
            ("tool_start", "info"),
            ("tool_end", "warn"),
            ("custom", "info"),
            ("custom", "info"),
            ("result", "info"),
        ]
    );
    assert_eq!(rows[6].2.as_deref(), Some("Bash"));
    assert!(rows[6].3.is_some());
    assert_eq!(rows[8].2.as_deref(), Some("Read"));
    let row = t.last_turn("b1");
    assert_eq!(row["lines"], 13);
    assert_eq!(row["events"], 14); // 12 + turn_start + turn_end
    assert_eq!(row["session_id"], "sess-all");
    assert_eq!(row["cost_usd"], 0.25);
    assert_eq!(row["input_tokens"], 7);
    assert_eq!(row["num_turns"], 3);
    assert_eq!(row["result_text"], "all done");
    assert_eq!(
        t.i64(
            "events.db",
            "SELECT COUNT(*) FROM events WHERE event_type IN ('turn_start','turn_end')"
        ),
        2
    );
    // a real capture maps too
    let t2 = TestRoot::new();
    t2.agent(
        "b1",
        "builder",
        None,
        &[
            "--no-init",
            "--lines",
            "0",
            "--result",
            "none",
            "--emit",
            &fixture("streams/claude-mock-tool-bypass.ndjson"),
        ],
    );
    t2.run(["turn", "--agent", "b1", "--message", "x"])
        .status(0);
    assert_eq!(
        t2.last_turn("b1")["session_id"],
        "1860a74d-c430-4b69-941a-b983daf8d68b"
    );
    assert_eq!(
        t2.i64(
            "events.db",
            "SELECT COUNT(*) FROM events WHERE event_type='tool_end' AND tool_name='Bash'"
        ),
        1
    );
}

#[test]
fn malformed_invalid_utf8_and_20mib_lines_are_recorded_and_the_turn_still_ends_done() {
    let t = TestRoot::new();
    t.agent(
        "b1",
        "builder",
        None,
        &[
            "--garbage",
            "--invalid-utf8",
            "--oversize",
            "20971520",
            "--mail",
            "worker_done",
            "--emit",
            &fixture("streams/weird.ndjson"),
        ],
    );
    t.run(["turn", "--agent", "b1", "--message", "x"]).status(0);
    let row = t.last_turn("b1");
    assert_eq!(row["outcome"], "done");
    // garbage, invalid utf-8, oversize, and the five weird lines
    assert_eq!(row["malformed_lines"], 8, "{row}");
    assert!(row["bytes"].as_i64().unwrap() > 20 << 20);
    assert_eq!(
        t.i64(
            "events.db",
            "SELECT COUNT(*) FROM events WHERE data LIKE '%oversize_line%'"
        ),
        1
    );
    assert_eq!(
        t.i64(
            "events.db",
            "SELECT COUNT(*) FROM events WHERE data LIKE '%malformed_line%'"
        ),
        7
    );
    assert_eq!(
        t.i64(
            "events.db",
            "SELECT COUNT(*) FROM events WHERE event_type='custom' AND data LIKE '%unknown_kind%'"
        ),
        1
    );
    // the full lines stay in stdout.ndjson
    let dir = t.turn_dir("b1", row["turn_id"].as_str().unwrap());
    assert!(std::fs::metadata(dir.join("stdout.ndjson")).unwrap().len() > 20 << 20);
    t.assert_clean("b1");
}

#[test]
fn resume_passes_the_reported_session_id_and_records_a_mismatch() {
    let t = TestRoot::new();
    let rec = t.path().join("rec.jsonl");
    let rec_s = rec.display().to_string();
    t.agent("lead", "lead", None, &["--record", &rec_s]);
    t.run(["turn", "--agent", "lead", "--message", "one"])
        .status(0);
    let first = t.last_turn("lead");
    let sid = first["session_id"].as_str().unwrap().to_string();
    assert!(first["resume_requested"].is_null());
    t.run(["turn", "--agent", "lead", "--message", "two"])
        .status(0);
    let second = t.last_turn("lead");
    assert_eq!(second["resume_requested"], sid.as_str());
    assert_eq!(second["resume_mismatch"], false);
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(&rec)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(recs[0]["env"].get("RUNNER_RESUME_SESSION_ID").is_none());
    assert_eq!(recs[1]["env"]["RUNNER_RESUME_SESSION_ID"], sid.as_str());
    assert!(recs[1]["stdin"].as_str().unwrap().contains("two"));
    // instructions only before the first turn's text (command runtime)
    assert!(
        recs[0]["stdin"]
            .as_str()
            .unwrap()
            .contains("You are a lead")
    );
    assert!(
        !recs[1]["stdin"]
            .as_str()
            .unwrap()
            .contains("You are a lead")
    );
    // an agent that answers with another id
    let t2 = TestRoot::new();
    t2.agent("lead", "lead", None, &["--fresh-session"]);
    t2.run(["turn", "--agent", "lead", "--message", "one"])
        .status(0);
    t2.run(["turn", "--agent", "lead", "--message", "two"])
        .status(0);
    let row = t2.last_turn("lead");
    assert_eq!(row["resume_mismatch"], true);
    assert_eq!(
        t2.i64(
            "events.db",
            "SELECT COUNT(*) FROM events WHERE level='warn' AND data LIKE '%resume_mismatch%'"
        ),
        1
    );
}

#[test]
fn user_turn_rendering_message_first_then_mail() {
    let t = TestRoot::new();
    let rec = t.path().join("rec.jsonl");
    t.agent(
        "lead",
        "lead",
        None,
        &["--record", &rec.display().to_string()],
    );
    t.run([
        "mail",
        "send",
        "--from",
        "a|b",
        "--to",
        "lead",
        "--subject",
        "line1\nline2",
        "--body",
        "B1",
    ])
    .status(2);
    t.run([
        "mail",
        "send",
        "--from",
        "alice",
        "--to",
        "lead",
        "--subject",
        "s|1\\x",
        "--body",
        "B1",
        "--priority",
        "high",
    ])
    .status(0);
    t.run(["nudge", "--agent", "lead", "--from", "bob", "wake up"])
        .status(0);
    let recs = std::fs::read_to_string(&rec).unwrap();
    let v: serde_json::Value = serde_json::from_str(recs.lines().next().unwrap()).unwrap();
    let stdin: serde_json::Value =
        serde_json::from_str(v["stdin"].as_str().unwrap().trim()).unwrap();
    let text = stdin["message"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.ends_with("[MAIL] From: alice | Subject: s\\|1\\\\x | Priority: high\n\nB1\n\n---\n\n[NUDGE from bob] wake up"),
        "{text}"
    );
    // --message comes first, --no-mail delivers only it
    t.mail("alice", "lead", "later");
    t.run(["turn", "--agent", "lead", "--message", "FIRST", "--no-mail"])
        .status(0);
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&rec)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(
        last["stdin"].as_str().unwrap().contains("FIRST")
            && !last["stdin"].as_str().unwrap().contains("later")
    );
    t.run(["turn", "--agent", "lead", "--message", "FIRST"])
        .status(0);
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&rec)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let s = last["stdin"].as_str().unwrap();
    assert!(s.contains("FIRST\\n\\n---\\n\\n[MAIL] From: alice"), "{s}");
    // --from stores the message as mail instead
    t.run([
        "turn",
        "--agent",
        "lead",
        "--message",
        "via mail",
        "--from",
        "carol",
    ])
    .status(0);
    assert_eq!(
        t.i64(
            "mail.db",
            "SELECT read FROM messages WHERE from_agent='carol'"
        ),
        1
    );
}

#[test]
fn a_big_turn_against_an_agent_that_writes_first_does_not_deadlock() {
    let t = TestRoot::new();
    t.agent(
        "b1",
        "builder",
        None,
        &["--write-before-read", "1048576", "--mail", "worker_done"],
    );
    let big = t.path().join("big.txt");
    std::fs::write(&big, "y".repeat(1 << 20)).unwrap();
    let child = t.spawn([
        "turn",
        "--agent",
        "b1",
        "--message-file",
        big.to_str().unwrap(),
        "--stall",
        "20s",
    ]);
    let out = wait_child(child, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = t.last_turn("b1");
    assert_eq!(row["outcome"], "done");
    assert!(row["bytes"].as_i64().unwrap() > 1 << 20);
    t.assert_clean("b1");
}

#[test]
fn two_turns_of_one_agent_never_overlap() {
    let t = TestRoot::new();
    t.agent("lead", "lead", None, &["--silent-ms", "600"]);
    let a = t.spawn(["turn", "--agent", "lead", "--message", "a"]);
    let pid = t.root().join("agents/lead/turn.pid");
    wait_for(Duration::from_secs(20), "the first turn to spawn", || {
        pid.exists()
    });
    let busy = t.run(["turn", "--agent", "lead", "--message", "b", "--no-wait"]);
    busy.status(4).one_line_error("agent lead is busy: turn ");
    assert!(busy.stderr().contains("runner pid"), "{}", busy.stderr());
    let b = t.spawn(["turn", "--agent", "lead", "--message", "c", "--wait", "30s"]);
    let t0 = Instant::now();
    assert_eq!(
        wait_child(a, Duration::from_secs(30)).status.code(),
        Some(0)
    );
    assert_eq!(
        wait_child(b, Duration::from_secs(30)).status.code(),
        Some(0)
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
    let turns = t.assert_turns_never_overlap();
    assert_eq!(turns, 2);
    t.assert_clean("lead");
}

#[test]
fn turns_and_events_commands() {
    let t = TestRoot::new();
    t.agent("b1", "builder", None, &["--lines", "2"]);
    t.run(["turn", "--agent", "b1", "--message", "x"]).status(0);
    let turns = t.run(["turns"]);
    turns.status(0);
    assert!(turns.stdout().contains("exited"));
    let ev = t.run(["events", "--agent", "b1", "--json"]);
    ev.status(0);
    let types: Vec<String> = ev
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types.first().map(String::as_str), Some("turn_start"));
    assert_eq!(types.last().map(String::as_str), Some("turn_end"));
    let only = t.run(["events", "--type", "progress", "--json"]);
    assert_eq!(only.json().as_array().unwrap().len(), 2);
    let human = t.run(["events", "--limit", "3"]);
    human.status(0);
    assert_eq!(human.stdout().lines().count(), 3);
    // --follow prints new events as they come and stops on SIGINT
    let mut f = t.spawn(["events", "--follow", "--json", "--type", "turn_end"]);
    let rx = crate::stdout_lines(&mut f);
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the existing turn_end");
    assert!(first.contains("turn_end"));
    t.run([
        "agent",
        "add",
        "b2",
        "--capability",
        "builder",
        "--command",
        crate::BIN,
        "fake-agent",
    ])
    .status(0);
    t.run(["turn", "--agent", "b2", "--message", "y"]).status(0);
    let second = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the new turn_end");
    assert!(second.contains("\"b2\""), "{second}");
    crate::signal(f.id(), nix::sys::signal::Signal::SIGINT);
    assert_eq!(
        wait_child(f, Duration::from_secs(10)).status.code(),
        Some(0)
    );
}

#[test]
fn stderr_log_keeps_its_head_and_tail_and_the_row_counts_what_was_dropped() {
    let t = TestRoot::new();
    // 12 MiB of stderr in numbered lines, then a clean result.
    crate::ending::script_agent(
        &t,
        "b1",
        r#"echo '{"type":"system","subtype":"init","session_id":"s-1"}'
i=0; while [ $i -lt 20 ]; do i=$((i+1)); echo "first lines $i" >&2; done
yes 'a line of stderr the CLI writes in a loop, over and over again.' | head -c 12582912 >&2
echo 'the very last line' >&2
echo '{"type":"result","subtype":"success","is_error":false,"result":"ok"}'"#,
    );
    t.run(["turn", "--agent", "b1", "--message", "go"])
        .status(0);
    let row = t.last_turn("b1");
    let log = std::fs::read(
        t.turn_dir("b1", row["turn_id"].as_str().unwrap())
            .join("stderr.log"),
    )
    .unwrap();
    assert!(
        log.len() <= (2 << 20) + 200,
        "stderr.log is {} bytes",
        log.len()
    );
    assert!(log.starts_with(b"first lines 1\n"));
    assert!(log.ends_with(b"the very last line\n"));
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("bytes of stderr dropped"),
        "a marker between head and tail"
    );
    let dropped = row["stderr_dropped_bytes"].as_i64().unwrap_or(0);
    assert!(dropped >= (10 << 20) - 4096, "{row}");
    assert_eq!(row["outcome"], "exited");
}
