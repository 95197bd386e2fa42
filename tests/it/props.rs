//! Issue 9: property tests — the line framing and every runtime's parser
//! never panic and keep their invariants; the state machine and the claim
//! rules hold under any sequence of operations. `PROPTEST_CASES` scales the
//! run (CI uses the default; the long fuzz run is recorded in BENCHMARKS.md).

use proptest::prelude::*;

use runner::runtime::{self, Parser};
use runner::state::{Cas, State, can_transition};
use runner::store::events::EventRow;
use runner::stream::{Frame, Framer, process_line, process_line_full};

/// A reference split: what the framer must produce for the whole input.
fn reference(input: &[u8], max: usize) -> Vec<Result<Vec<u8>, u64>> {
    let mut out = Vec::new();
    let mut parts: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    let last = parts.pop().unwrap_or(&[]);
    for p in parts {
        out.push(if p.len() > max {
            Err(p.len() as u64)
        } else {
            Ok(p.to_vec())
        });
    }
    if !last.is_empty() {
        out.push(if last.len() > max {
            Err(last.len() as u64)
        } else {
            Ok(last.to_vec())
        });
    }
    out
}

fn parsers() -> Vec<Box<dyn Parser>> {
    vec![
        Box::new(runtime::claude::ClaudeParser::default()),
        runtime::Runtime::parser(&runtime::codex::Codex),
        runtime::Runtime::parser(&runtime::gemini::Gemini),
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "[a-z_ ]{0,12}".prop_map(serde_json::Value::from),
        prop_oneof![
            Just("text"),
            Just("tool_use"),
            Just("tool_result"),
            Just("Bash"),
            Just("x1")
        ]
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("subtype".to_string()),
                    Just("message".to_string()),
                    Just("content".to_string()),
                    Just("id".to_string()),
                    Just("tool_use_id".to_string()),
                    Just("item".to_string()),
                    Just("usage".to_string()),
                    Just("is_error".to_string()),
                    Just("status".to_string()),
                    Just("session_id".to_string()),
                    Just("input".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

const TYPES: [&str; 22] = [
    "system",
    "assistant",
    "user",
    "result",
    "stream_event",
    "control_response",
    "thread.started",
    "turn.started",
    "item.started",
    "item.updated",
    "item.completed",
    "turn.completed",
    "turn.failed",
    "error",
    "init",
    "message",
    "tool_use",
    "tool_result",
    "x",
    "",
    "session_id",
    "item",
];

proptest! {
    #[test]
    fn framing_matches_the_reference_for_any_chunking(
        input in prop::collection::vec(prop_oneof![Just(b'\n'), any::<u8>(), Just(b'a')], 0..400),
        cuts in prop::collection::vec(0usize..400, 0..8),
        max in 1usize..40,
    ) {
        let mut f = Framer::new(max);
        let mut got: Vec<Result<Vec<u8>, u64>> = Vec::new();
        let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= input.len()).collect();
        cuts.sort();
        let mut prev = 0;
        for c in cuts.into_iter().chain([input.len()]) {
            f.feed(&input[prev..c], |fr| got.push(match fr { Frame::Line(l) => Ok(l.to_vec()), Frame::Oversize(n) => Err(n) }));
            prev = c;
        }
        f.finish(|fr| got.push(match fr { Frame::Line(l) => Ok(l.to_vec()), Frame::Oversize(n) => Err(n) }));
        prop_assert_eq!(got, reference(&input, max));
    }

    #[test]
    fn any_bytes_are_a_line_or_a_recorded_error_never_a_panic(line in prop::collection::vec(any::<u8>(), 0..300)) {
        for mut p in parsers() {
            let mut rows: Vec<EventRow> = Vec::new();
            let facts = process_line(Frame::Line(&line), 1, p.as_mut(), &mut rows);
            if let Some(f) = facts {
                prop_assert!(f.valid || (f.malformed && rows.len() == 1 && rows[0].event_type == "error"));
                prop_assert!(rows.iter().all(|r| r.line_no == Some(1) && r.data.len() <= runner::stream::MAX_DATA));
            } else {
                prop_assert!(rows.is_empty());
            }
        }
    }

    #[test]
    fn parsers_never_panic_on_any_object(kind in prop::sample::select(TYPES.to_vec()), body in json_value(), n in 1usize..4) {
        let mut obj = match body { serde_json::Value::Object(m) => m, other => { let mut m = serde_json::Map::new(); m.insert("v".into(), other); m } };
        obj.insert("type".into(), serde_json::Value::from(kind));
        let line = serde_json::Value::Object(obj).to_string();
        for mut p in parsers() {
            for i in 0..n {
                let mut rows = Vec::new();
                let f = process_line(Frame::Line(line.as_bytes()), i as i64 + 1, p.as_mut(), &mut rows);
                prop_assert!(f.is_some_and(|f| f.valid));
                prop_assert!(rows.iter().all(|r| ["debug", "info", "warn", "error"].contains(&r.level)));
                prop_assert!(rows.iter().all(|r| r.tool_args.as_ref().is_none_or(|a| a.len() <= 4096)));
            }
            let _ = p.result();
        }
    }
}

/// JSON text with what `serde_json::Value` cannot hold: duplicate keys,
/// escaped keys, lone surrogates, out-of-range numbers.
#[derive(Debug, Clone)]
enum Node {
    Raw(&'static str),
    /// `n` nested arrays around a number.
    Deep(usize),
    Str(String),
    Arr(Vec<Node>),
    Obj(Vec<(String, Node)>),
}

impl Node {
    fn render(&self, out: &mut String) {
        match self {
            Node::Raw(r) => out.push_str(r),
            Node::Deep(n) => {
                out.push_str(&"[".repeat(*n));
                out.push('1');
                out.push_str(&"]".repeat(*n));
            }
            Node::Str(s) => {
                out.push('"');
                out.push_str(s);
                out.push('"');
            }
            Node::Arr(items) => {
                out.push('[');
                for (i, n) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    n.render(out);
                }
                out.push(']');
            }
            Node::Obj(fields) => {
                out.push('{');
                for (i, (k, n)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push('"');
                    out.push_str(k);
                    out.push_str("\":");
                    n.render(out);
                }
                out.push('}');
            }
        }
    }
}

/// String contents as they appear between the quotes (already escaped).
fn raw_string() -> impl Strategy<Value = String> {
    let plain = prop_oneof![
        Just("text".to_string()),
        Just("tool_use".to_string()),
        Just("tool_result".to_string()),
        Just("thinking".to_string()),
        Just("redacted_thinking".to_string()),
        Just("Bash".to_string()),
        Just("t1".to_string()),
        Just("t2".to_string()),
        Just("a\\nb \\\"q\\\" \\u00e9".to_string()),
        Just("\\ud83d\\ude00".to_string()),
        Just("lone \\ud99c".to_string()),
        Just("t\\u0031".to_string()),
        "[a-z ]{0,8}",
    ];
    // every escape, and broken ones
    let escapes = prop_oneof![
        Just("\\b\\f\\/\\\\\\r\\t\\u0000\\u001F\\uFFFF".to_string()),
        Just("\\uD83D\\uDE00 \\udbff\\udfff".to_string()),
        Just("\\ud800\\u0041".to_string()),
        Just("\\ud800x".to_string()),
        Just("\\ude00".to_string()),
        Just("\\u12".to_string()),
        Just("\\u12g4".to_string()),
        Just("\\x".to_string()),
        Just("t\\u0031\\u0032".to_string()),
        Just("tool_\\u0075se".to_string()),
        Just("assist\\u0061nt".to_string()),
    ];
    // raw bytes serde_json refuses inside a string, and ones it takes
    let raw = prop_oneof![
        Just("tab\there".to_string()),
        Just("nul\u{0}".to_string()),
        Just("x\u{1f}".to_string()),
        Just("é😀\u{7f}\u{80}".to_string()),
    ];
    // long bodies, plain or with escapes (the scanner's fast skip)
    let long = "([a-z é]|\\\\n|\\\\\"){0,120}";
    prop_oneof![8 => plain, 3 => escapes, 1 => raw, 3 => long]
}

fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        Just(Node::Raw("null")),
        Just(Node::Raw("true")),
        Just(Node::Raw("false")),
        Just(Node::Raw("0")),
        Just(Node::Raw("60000")),
        Just(Node::Raw("-7")),
        Just(Node::Raw("2.5")),
        Just(Node::Raw("1e400")),
        Just(Node::Raw("18446744073709551616")),
        prop::sample::select(vec![
            "-0",
            "0.0",
            "-0.0",
            "1E5",
            "1e+5",
            "1e-5",
            "1e-400",
            "-1e400",
            "1e99",
            "1e100",
            "2.5e-3",
            "123456789012345678",
            "-123456789012345678",
            "1234567890123456789",
            "-9223372036854775808",
            "01",
            "1.",
            "-",
            ".5",
            "1e",
            "tru",
            "nul",
            "3.14159265358979323846264338327950288",
        ])
        .prop_map(Node::Raw),
        // nesting around the scanner's limit (64) and serde_json's (128)
        prop_oneof![55usize..70, 120usize..132].prop_map(Node::Deep),
        raw_string().prop_map(Node::Str),
    ];
    let key = prop_oneof![
        Just("type".to_string()),
        Just("typ\\u0065".to_string()),
        Just("text".to_string()),
        Just("id".to_string()),
        Just("name".to_string()),
        Just("input".to_string()),
        Just("timeout".to_string()),
        Just("tool_use_id".to_string()),
        Just("is_error".to_string()),
        Just("content".to_string()),
        Just("message".to_string()),
        Just("session_id".to_string()),
        Just("inp\\u0075t".to_string()),
        Just("cont\\u0065nt".to_string()),
        Just("messag\\u0065".to_string()),
        Just("session\\u005fid".to_string()),
        "[a-z]{1,4}",
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Node::Arr),
            prop::collection::vec((key.clone(), inner), 0..6).prop_map(Node::Obj),
        ]
    })
}

/// A content block shaped like claude's (sometimes not).
fn block() -> impl Strategy<Value = Node> {
    let kind = prop_oneof![
        Just("text"),
        Just("tool_use"),
        Just("tool_result"),
        Just("thinking"),
        Just("redacted_thinking"),
        Just("image"),
    ];
    let id = prop_oneof![Just("t1"), Just("t2"), Just("t3")];
    (
        kind,
        id,
        node(),
        node(),
        any::<bool>(),
        any::<bool>(),
        0u8..4,
    )
        .prop_map(|(kind, id, a, b, is_error, dup, shape)| {
            let mut f = vec![("type".to_string(), Node::Str(kind.into()))];
            match kind {
                "text" => f.push((
                    "text".into(),
                    if shape == 0 {
                        a
                    } else {
                        Node::Str("hi".into())
                    },
                )),
                "tool_use" => {
                    f.push(("id".into(), Node::Str(id.into())));
                    f.push((
                        "name".into(),
                        Node::Str(if shape < 2 {
                            "Bash".into()
                        } else {
                            "Read".into()
                        }),
                    ));
                    let timeout = Node::Obj(vec![
                        ("command".into(), Node::Str("ls".into())),
                        ("timeout".into(), Node::Raw("60000")),
                    ]);
                    f.push(("input".into(), if shape == 3 { a } else { timeout }));
                }
                "tool_result" => {
                    f.push(("tool_use_id".into(), Node::Str(id.into())));
                    f.push((
                        "is_error".into(),
                        Node::Raw(if is_error { "true" } else { "false" }),
                    ));
                    f.push(("content".into(), a));
                }
                _ => f.push(("x".into(), a)),
            }
            if dup {
                // a later duplicate of some key wins, as in Value
                let k = f[(shape as usize) % f.len()].0.clone();
                f.push((k, b));
            }
            if shape == 1 {
                f.reverse();
            }
            Node::Obj(f)
        })
}

/// A claude-like line: mostly hot `assistant`/`user` lines, some odd ones.
fn claude_line() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        4 => Just("assistant"),
        4 => Just("user"),
        1 => Just("result"),
        1 => Just("system"),
        1 => Just("stream_event"),
    ];
    (
        kind,
        prop::collection::vec(block(), 0..4),
        node(),
        0u8..13,
        any::<bool>(),
    )
        .prop_map(|(kind, blocks, odd, shape, session_first)| {
            let content = match shape {
                0 => odd.clone(),
                _ => Node::Arr(blocks),
            };
            let message = match shape {
                1 => odd,
                _ => Node::Obj(vec![
                    ("role".into(), Node::Str("x".into())),
                    ("content".into(), content),
                ]),
            };
            let mut f = vec![
                ("type".to_string(), Node::Str(kind.into())),
                ("message".into(), message),
                ("session_id".into(), Node::Str("s1".into())),
            ];
            if session_first {
                f.rotate_left(1);
            }
            match shape {
                2 => f.push(("type".into(), Node::Raw("5"))),
                3 => f.push(("typ\\u0065".into(), Node::Str("user".into()))),
                4 => f.push(("message".into(), Node::Raw("null"))),
                _ => {}
            }
            let mut out = String::new();
            Node::Obj(f).render(&mut out);
            match shape {
                5 => out.push_str(" x"), // trailing garbage
                8 => out = format!(" \t\r{out} \r\t"),
                9 => out.push('\u{c}'), // not JSON whitespace
                10 => out = format!("[{out}]"),
                11 => out = format!("{},}}", &out[..out.len() - 1]), // trailing comma
                12 => out = out.replacen(':', " :\t", 2).replacen(',', "\n,", 2),
                _ => {}
            }
            out
        })
}

/// Lines like the benchmark's (BENCHMARKS.md), escapes included: the fast
/// path takes them (a scanner that always declined would pass the
/// equivalence tests) and agrees with the full path.
#[test]
fn fast_path_accepts_benchmark_like_lines() {
    let text = format!(
        "{}\\n\\\"quoted\\\" \\t\\u00e9 \\ud83d\\ude00 {}",
        "lorem ipsum dolor sit amet ".repeat(10),
        "é😀 x".repeat(20)
    );
    let lines = [
        format!(
            r#"{{"message":{{"content":[{{"text":"{text}","type":"text"}}],"id":"msg_1","model":"m","role":"assistant","stop_reason":null,"type":"message","usage":{{"input_tokens":10,"output_tokens":20}}}},"parent_tool_use_id":null,"session_id":"bench-session","type":"assistant"}}"#
        ),
        r#"{"message":{"content":[{"id":"toolu_1","input":{"command":"echo \"hi\"\nls","timeout":60000,"f":1.5},"name":"Bash","type":"tool_use"}],"id":"msg_2","role":"assistant","type":"message","usage":{"input_tokens":10,"output_tokens":20}},"session_id":"bench-session","type":"assistant"}"#.to_string(),
        r#"{"message":{"content":[{"content":"out \"x\"\n","is_error":false,"tool_use_id":"toolu_1","type":"tool_result"}],"role":"user"},"session_id":"bench-session","type":"user"}"#.to_string(),
        " {\"type\" : \"assistant\",\t\"message\":{\"content\":[{\"type\":\"thinking\",\"thinking\":\"hm\\n\"},{\"type\":\"text\",\"text\":\"a\"}]},\"session_id\":\"s\\u0031\"}\r".to_string(),
    ];
    let mut probe = runtime::claude::ClaudeParser::default();
    for l in &lines {
        assert!(
            probe.fast_line(l, 1, &mut Vec::new()).is_some(),
            "declined {l}"
        );
    }
    let bytes: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
    assert_paths_agree("claude", &bytes).unwrap();
}

/// Not vacuous: many generated claude-like lines do take the fast path
/// (the rest are declined or invalid and take the full path).
#[test]
fn claude_like_lines_often_take_the_fast_path() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let lines = claude_line();
    let n = 500;
    let mut fast = 0;
    for _ in 0..n {
        let line = lines.new_tree(&mut runner).unwrap().current();
        let mut p = runtime::claude::ClaudeParser::default();
        if p.fast_line(&line, 1, &mut Vec::new()).is_some() {
            fast += 1;
        }
    }
    eprintln!("{fast} of {n} claude-like lines took the fast path");
    assert!(fast * 8 >= n, "only {fast} of {n} took the fast path");
}

/// Rows as the two paths must agree on them (a duration is a clock reading:
/// only its presence is compared).
fn comparable(rows: &[EventRow]) -> Vec<EventRow> {
    rows.iter()
        .map(|r| EventRow {
            tool_duration_ms: r.tool_duration_ms.map(|_| 0),
            ..r.clone()
        })
        .collect()
}

/// Runs `lines` through the fast and the full path, each with its own
/// parser of `runtime`, and asserts the same rows, facts and result.
fn assert_paths_agree(runtime: &str, lines: &[&[u8]]) -> Result<(), TestCaseError> {
    let fresh = || -> Box<dyn Parser> {
        match runtime {
            "claude" => Box::new(runtime::claude::ClaudeParser::default()),
            "codex" => runtime::Runtime::parser(&runtime::codex::Codex),
            _ => runtime::Runtime::parser(&runtime::gemini::Gemini),
        }
    };
    let (mut fast, mut full) = (fresh(), fresh());
    for (i, line) in lines.iter().enumerate() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let fa = process_line(Frame::Line(line), i as i64 + 1, fast.as_mut(), &mut a);
        let fb = process_line_full(Frame::Line(line), i as i64 + 1, full.as_mut(), &mut b);
        let shown = String::from_utf8_lossy(line);
        prop_assert_eq!(fa, fb, "facts of {}", shown);
        prop_assert_eq!(comparable(&a), comparable(&b), "rows of {}", shown);
    }
    prop_assert_eq!(fast.result(), full.result());
    Ok(())
}

/// Every capture and stream fixture, through every parser: the fast path
/// gives what the full path gives.
#[test]
fn fast_path_equals_full_path_on_every_fixture() {
    let mut files = Vec::new();
    for dir in ["fixtures/captures", "fixtures/streams"] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("stdout" | "ndjson")
            ) {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 20, "{files:?}");
    let mut fast_lines = 0;
    for p in files {
        let text = std::fs::read(&p).unwrap();
        let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
        // Not vacuous: claude's hot lines do take the fast path.
        let mut probe = runtime::claude::ClaudeParser::default();
        for l in &lines {
            let text = std::str::from_utf8(l).unwrap_or("");
            if probe.fast_line(text, 1, &mut Vec::new()).is_some() {
                fast_lines += 1;
            }
        }
        for rt in ["claude", "codex", "gemini"] {
            assert_paths_agree(rt, &lines).unwrap_or_else(|e| panic!("{}: {rt}: {e}", p.display()));
        }
    }
    assert!(
        fast_lines >= 5,
        "only {fast_lines} fixture lines took the fast path"
    );
}

proptest! {
    /// Claude-like lines (hot shapes, duplicate and escaped keys, lone
    /// surrogates, out-of-range numbers, odd nesting): same rows, facts,
    /// tool bookkeeping and result on both paths, line after line.
    #[test]
    fn fast_path_equals_full_path_on_claude_like_lines(lines in prop::collection::vec(claude_line(), 1..8)) {
        let bytes: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        for rt in ["claude", "codex", "gemini"] {
            assert_paths_agree(rt, &bytes)?;
        }
    }

    /// Arbitrary objects of every known type and arbitrary bytes agree too.
    #[test]
    fn fast_path_equals_full_path_on_any_line(kind in prop::sample::select(TYPES.to_vec()), body in json_value(), junk in prop::collection::vec(any::<u8>(), 0..40)) {
        let mut obj = match body { serde_json::Value::Object(m) => m, other => { let mut m = serde_json::Map::new(); m.insert("v".into(), other); m } };
        obj.insert("type".into(), serde_json::Value::from(kind));
        let line = serde_json::Value::Object(obj).to_string();
        let mut cut = line.as_bytes().to_vec();
        cut.truncate(junk.len() % (line.len() + 1) + line.len() / 2);
        for rt in ["claude", "codex", "gemini"] {
            assert_paths_agree(rt, &[line.as_bytes(), &junk, &cut])?;
        }
    }
}

fn store() -> (tempfile::TempDir, runner::store::Store) {
    let d = tempfile::tempdir().unwrap();
    let s = runner::store::Store::open(d.path()).unwrap();
    (d, s)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The CAS against SQLite follows the pure table for any sequence; nothing
    /// revives `completed`; `zombie` leaves only to `completed`.
    #[test]
    fn state_machine_under_any_sequence(seq in prop::collection::vec(prop::sample::select(State::ALL.to_vec()), 1..40)) {
        let (_d, st) = store();
        runner::store::sessions::insert(&st.conn, &runner::store::sessions::NewSession {
            agent_name: "a".into(), capability: "builder".into(), worktree_path: "/".into(), task_id: String::new(),
            parent_agent: None, depth: 0, runtime: "claude".into(), runtime_command: None, model: None, now: runner::clock::now(),
        }).unwrap();
        let mut model = State::Booting;
        for to in seq {
            let r = runner::store::sessions::cas(&st.conn, "a", to, &runner::clock::now()).unwrap();
            let before = model;
            if can_transition(model, to) {
                prop_assert_eq!(r, Cas::Applied);
                model = to;
            } else {
                let lost = matches!(r, Cas::Lost { .. });
                prop_assert!(lost, "expected a lost race");
            }
            if before == State::Completed { prop_assert_eq!(model, State::Completed); }
            if before == State::Zombie { prop_assert!(matches!(model, State::Zombie | State::Completed)); }
            let now = runner::store::sessions::current(&st.conn, "a").unwrap().unwrap();
            prop_assert_eq!(now, model.as_str());
        }
    }

    /// Claims under any interleaving of claim / deliver / release / retry by
    /// successive turns: a message is delivered at most once, a delivered or
    /// dead message never changes again, and tries never exceed max_tries.
    #[test]
    fn claims_never_deliver_twice(ops in prop::collection::vec(0u8..4, 1..60), n in 1usize..6) {
        use runner::claim::{Fate, settle};
        use runner::store::mail::{self, NewMessage, Scope};
        let (_d, st) = store();
        for i in 0..n {
            mail::insert(&st.conn, &NewMessage {
                from_agent: "x".into(), to_agent: "a".into(), subject: format!("{i}"), body: "b".into(),
                kind: "status".into(), priority: "normal".into(), thread_id: None, payload: None, turn_id: None,
            }, "2026-01-01T00:00:00.000Z").unwrap();
        }
        let far = "2999-01-01T00:00:00.000Z";
        let mut turn = 0;
        let mut delivered_by: std::collections::HashMap<String, String> = Default::default();
        for op in ops {
            turn += 1;
            let tid = format!("t{turn}");
            let claimed = mail::claim_due(&st.conn, "a", &tid, far, 50).unwrap();
            for m in &claimed {
                prop_assert!(!delivered_by.contains_key(&m.id), "delivered mail claimed again");
                prop_assert!(m.dead_at.is_none());
            }
            let fate = match op { 0 => Fate::Deliver, 1 => Fate::Release, _ => Fate::Retry };
            let now = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
            settle(&st.conn, Scope::Turn(&tid), fate, now, 5, std::time::Duration::from_millis(1), "e").unwrap();
            if fate == Fate::Deliver {
                for m in &claimed { delivered_by.insert(m.id.clone(), tid.clone()); }
            }
            for m in mail::list(&st.conn, &mail::ListFilter { limit: 100, ..Default::default() }).unwrap() {
                prop_assert!(m.tries <= 5);
                prop_assert!(m.claimed_by.is_none() || m.read, "no claim survives its turn");
                if let Some(t) = delivered_by.get(&m.id) {
                    prop_assert!(m.read);
                    prop_assert_eq!(m.claimed_by.as_deref(), Some(t.as_str()));
                }
                if m.dead_at.is_some() { prop_assert_eq!(m.tries, 5); prop_assert!(!m.read); }
            }
        }
    }
}
