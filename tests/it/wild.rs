//! Lines from the wild, read end to end by the real binary with small
//! shell-script agents: a lone UTF-16 surrogate escape (SPEC §6.4), tool
//! durations on both rows of a call (SPEC §8), and the fast path agreeing
//! with the full path on a whole turn.

use crate::TestRoot;

/// Registers `name` as a `command` agent: a shell script that reads its
/// stdin (claude's envelope) to EOF, then prints each of `lines` (a line
/// starting `sleep ` is run instead).
fn script_agent(t: &TestRoot, name: &str, lines: &[&str]) {
    let mut script = String::from("cat > /dev/null\n");
    for l in lines {
        if l.starts_with("sleep ") {
            script.push_str(l);
        } else {
            assert!(!l.contains('\''), "{l}");
            script.push_str(&format!("printf '%s\\n' '{l}'"));
        }
        script.push('\n');
    }
    crate::ending::script_agent(t, name, &script);
}

#[test]
fn a_lone_surrogate_in_the_result_line_is_read_as_u_fffd() {
    let t = TestRoot::new();
    script_agent(
        &t,
        "b1",
        &[
            r#"{"type":"system","subtype":"init","session_id":"s-sur"}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"half \udc00 a pair"}]},"session_id":"s-sur"}"#,
            r#"{"type":"result","subtype":"success","is_error":false,"result":"done \ud99c here","session_id":"s-sur"}"#,
        ],
    );
    let r = t.run(["turn", "--agent", "b1", "--message", "go", "--json"]);
    r.status(0);
    let row = t.last_turn("b1");
    assert_eq!(row["outcome"], "exited", "{row}");
    assert_eq!(row["result_text"], "done \u{fffd} here");
    assert_eq!(row["lines"], 3);
    assert_eq!(
        t.i64(
            "events.db",
            "SELECT COUNT(*) FROM events WHERE event_type='error'"
        ),
        0,
        "no line is malformed"
    );
    // `data` is the line with the lone escapes as U+FFFD: valid JSON for any reader.
    let data = t
        .str(
            "events.db",
            "SELECT data FROM events WHERE event_type='progress'",
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(v["message"]["content"][0]["text"], "half \u{fffd} a pair");
    // stdout.ndjson keeps what the agent wrote, byte for byte.
    let turn_id = row["turn_id"].as_str().unwrap();
    let tee = std::fs::read_to_string(t.turn_dir("b1", turn_id).join("stdout.ndjson")).unwrap();
    assert!(tee.contains(r"done \ud99c here"), "{tee}");
}

#[test]
fn a_tool_duration_is_on_both_the_start_and_the_end_row() {
    tool_durations_on_start_rows(true);
}

/// The same two calls, ended within the writer's first commit: the
/// durations go onto the `tool_start` rows as they are written.
#[test]
fn a_tool_duration_is_on_its_start_row_when_both_are_in_one_commit() {
    tool_durations_on_start_rows(false);
}

fn tool_durations_on_start_rows(pause: bool) {
    let t = TestRoot::new();
    // The pause lets the writer commit the tool_start row before the result
    // arrives (COMMIT_EVERY is 50 ms): the duration is then an UPDATE.
    script_agent(
        &t,
        "b1",
        &[
            r#"{"type":"system","subtype":"init","session_id":"s-tool"}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"two calls"},{"type":"tool_use","id":"t1","name":"Bash","input":{"command":"ls"}},{"type":"tool_use","id":"t2","name":"Read","input":{"path":"/x"}}]},"session_id":"s-tool"}"#,
            if pause { "sleep 0.3" } else { "sleep 0" },
            r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t2","content":"x"}]},"session_id":"s-tool"}"#,
            r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","content":"ok","is_error":true}]},"session_id":"s-tool"}"#,
            r#"{"type":"result","subtype":"success","is_error":false,"result":"ok","session_id":"s-tool"}"#,
        ],
    );
    t.run(["turn", "--agent", "b1", "--message", "go", "--json"])
        .status(0);
    let rows: Vec<(String, String, Option<i64>)> = t
        .db("events.db")
        .query_map(
            "SELECT event_type, tool_name, tool_duration_ms FROM events \
             WHERE event_type IN ('tool_start','tool_end') ORDER BY id",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let shape: Vec<(&str, &str)> = rows
        .iter()
        .map(|(e, n, _)| (e.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        shape,
        [
            ("tool_start", "Bash"),
            ("tool_start", "Read"),
            ("tool_end", "Read"),
            ("tool_end", "Bash"),
        ]
    );
    for (start, end) in [(0, 3), (1, 2)] {
        let ms = rows[end].2;
        assert!(ms.is_some(), "{rows:?}");
        assert_eq!(
            rows[start].2, ms,
            "start row carries its call's duration: {rows:?}"
        );
    }
    if pause {
        assert!(
            rows[3].2.unwrap() >= 200,
            "the pause is in the duration: {rows:?}"
        );
    }
}

/// Whatever bytes a line holds reach `events` as they were: tabs,
/// backslashes, escapes, non-ASCII and a NUL in an extracted value (on
/// PostgreSQL, whose `text` cannot hold NUL, it becomes U+FFFD, as in
/// `store migrate`). On PostgreSQL these rows travel in COPY's binary format.
#[test]
fn every_kind_of_character_reaches_events_unchanged() {
    let t = TestRoot::new();
    let text_line = "{\"type\":\"assistant\",\"message\":{\"content\":[{\"type\":\"text\",\"text\":\"tab\\there \\\\ back \\\"q\\\" é ✓ 𝄞 \\n\\u0041\"}]},\"session_id\":\"s-chars\"}";
    let tool_line = r#"{"type":"assistant","message":{"content":[{"type":"tool_use","id":"t1","name":"Na\u0000me\té","input":{"command":"a\tb"}}]},"session_id":"s-chars"}"#;
    script_agent(
        &t,
        "b1",
        &[
            r#"{"type":"system","subtype":"init","session_id":"s-chars"}"#,
            text_line,
            tool_line,
            r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]},"session_id":"s-chars"}"#,
            r#"{"type":"result","subtype":"success","is_error":false,"result":"ok","session_id":"s-chars"}"#,
        ],
    );
    t.run(["turn", "--agent", "b1", "--message", "go", "--json"])
        .status(0);
    assert_eq!(
        t.str(
            "events.db",
            "SELECT data FROM events WHERE event_type='progress'"
        )
        .as_deref(),
        Some(text_line)
    );
    let (name, args, data, line_no): (String, String, String, i64) = t
        .db("events.db")
        .query_map(
            "SELECT tool_name, tool_args, data, line_no FROM events WHERE event_type='tool_start'",
            &[],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
        .remove(0);
    let nul = if crate::testing_postgres() {
        "\u{fffd}"
    } else {
        "\0"
    };
    assert_eq!(name, format!("Na{nul}me\té"));
    assert!(args.contains("a\\tb"), "{args}");
    assert_eq!(data, tool_line);
    assert_eq!(line_no, 3);
    assert_eq!(
        t.i64(
            "events.db",
            "SELECT COUNT(*) FROM events WHERE tool_duration_ms IS NOT NULL AND event_type='tool_start'"
        ),
        1
    );
}
