//! The `codex` runtime: `codex exec --json` (SPEC §8, `../shared/agent-clis.md`
//! §2).
//!
//! One turn per process: the first turn is `codex exec --json
//! --skip-git-repo-check [...] -`, a later one adds `resume <thread id>` before
//! the `-`; the plain text goes to stdin, which is closed at once (codex reads
//! it to EOF before it starts). The thread id comes from `thread.started`.
//! `turn.completed` is a clean end, `turn.failed` an unclean one. `error` lines
//! starting `Reconnecting` only report API retries and do not reset the stall
//! timer. Usage is reported as running totals over the whole thread, and is
//! kept here as reported: the turn code stores the per-turn difference.
//! Graceful stop is SIGINT.

use serde_json::{Map, Value};

use super::{
    Graceful, Line, LineFacts, Parser, ResultInfo, Runtime, SpawnSpec, StdinPolicy, ToolCalls,
    TurnInput, cut, row, str_of, tool_end_row, tool_start_row,
};
use crate::os::Sig;
use crate::store::events::{EventRow, ToolStartRef};

pub struct Codex;

/// Longest `tool_args` and `result_text` kept.
const MAX_TEXT: usize = 4096;

impl Runtime for Codex {
    fn cumulative_usage(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "codex"
    }

    fn spawn_spec(&self, input: &TurnInput<'_>) -> Result<SpawnSpec, String> {
        let rc = &input.config.codex;
        let mut args: Vec<String> = ["exec", "--json", "--skip-git-repo-check"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(m) = &input.session.model {
            args.push("-m".into());
            args.push(m.clone());
        }
        if rc.unattended {
            args.push("--dangerously-bypass-approvals-and-sandbox".into());
        }
        args.extend(rc.args.iter().cloned());
        if let Some(id) = input.resume_id {
            args.push("resume".into());
            args.push(id.to_string());
        }
        args.push("-".into());
        Ok(SpawnSpec {
            program: rc.bin.clone(),
            args,
            env: rc.env.clone().into_iter().collect(),
        })
    }

    fn stdin_bytes(&self, input: &TurnInput<'_>) -> Vec<u8> {
        super::with_instructions(input).into_bytes()
    }

    fn stdin_policy(&self) -> StdinPolicy {
        StdinPolicy::CloseAfterWrite
    }

    fn parser(&self) -> Box<dyn Parser> {
        Box::new(CodexParser::default())
    }

    fn graceful_stop(&self) -> Graceful {
        Graceful::Signal(Sig::SIGINT)
    }

    fn unknown_resume(
        &self,
        stderr_tail: &str,
        _exit: Option<i32>,
        _result_text: Option<&str>,
    ) -> Option<String> {
        stderr_tail
            .lines()
            .find(|l| l.contains("no rollout found"))
            .map(|l| l.trim().to_string())
    }
}

/// Codex JSONL → events.
#[derive(Default)]
pub struct CodexParser {
    /// Tool items in flight, by item id.
    tools: ToolCalls,
    /// The text of the last `agent_message` (cut).
    last_message: Option<String>,
    result: ResultInfo,
}

/// A tool-like item: its name and arguments, or `None` for other items.
fn tool_of(item: &Map<String, Value>) -> Option<(String, String)> {
    let kind = str_of(item, "type")?;
    let json = |k: &str| item.get(k).map(Value::to_string).unwrap_or_default();
    let (name, args) = match kind {
        "command_execution" => (
            kind.to_string(),
            str_of(item, "command").unwrap_or("").to_string(),
        ),
        "file_change" => (kind.to_string(), json("changes")),
        "mcp_tool_call" => {
            let name = match (str_of(item, "server"), str_of(item, "tool")) {
                (Some(s), Some(t)) => format!("{s}.{t}"),
                (None, Some(t)) => t.to_string(),
                _ => kind.to_string(),
            };
            (name, json("arguments"))
        }
        "web_search" => (
            kind.to_string(),
            str_of(item, "query").unwrap_or("").to_string(),
        ),
        _ => return None,
    };
    Some((name, cut(&args, MAX_TEXT)))
}

/// A finished tool item that did not succeed.
fn tool_failed(item: &Map<String, Value>) -> bool {
    matches!(str_of(item, "status"), Some("failed") | Some("declined"))
        || item.get("error").is_some_and(|e| !e.is_null())
}

impl CodexParser {
    fn item(
        &mut self,
        kind: &str,
        item: &Map<String, Value>,
        line_no: i64,
        rows: &mut Vec<EventRow>,
    ) {
        let id = str_of(item, "id").unwrap_or("");
        let item_type = str_of(item, "type").unwrap_or("");
        if let Some((name, args)) = tool_of(item) {
            match kind {
                "item.started" => {
                    self.tools
                        .start(id, &name, None, ToolStartRef { line_no, nth: 0 });
                    rows.push(tool_start_row(name, args));
                }
                "item.completed" => {
                    let level = if tool_failed(item) { "warn" } else { "info" };
                    let call = self.tools.finish(id);
                    let seen = call.is_some();
                    let mut r = tool_end_row(level, call);
                    if !seen {
                        // No item.started seen: the end row says what the call was.
                        r.tool_name = Some(name);
                        r.tool_args = Some(args);
                    }
                    rows.push(r);
                }
                _ => rows.push(row("custom", "info")),
            }
            return;
        }
        match (kind, item_type) {
            ("item.completed", "agent_message") => {
                self.last_message = str_of(item, "text").map(|t| cut(t, MAX_TEXT));
                rows.push(row("progress", "info"));
            }
            (_, "reasoning") => rows.push(row("custom", "debug")),
            (_, "error") => rows.push(row("custom", "warn")),
            _ => rows.push(row("custom", "info")),
        }
    }
}

impl Parser for CodexParser {
    fn line(&mut self, line: &Line<'_>, rows: &mut Vec<EventRow>) -> LineFacts {
        let (kind, obj) = (line.kind, line.obj);
        let mut facts = LineFacts::with_session(obj, "thread_id");
        match kind {
            "thread.started" => rows.push(row("session_start", "info")),
            "item.started" | "item.updated" | "item.completed" => {
                match obj.get("item").and_then(Value::as_object) {
                    Some(item) => self.item(kind, item, line.line_no, rows),
                    None => rows.push(row("custom", "info")),
                }
            }
            "error" => {
                if str_of(obj, "message").is_some_and(|m| m.starts_with("Reconnecting")) {
                    facts.retry_only = true;
                    rows.push(row("custom", "warn"));
                } else {
                    rows.push(row("error", "error"));
                }
            }
            "turn.completed" => {
                rows.push(row("result", "info"));
                let usage = obj.get("usage");
                let tok = |k: &str| usage.and_then(|u| u.get(k)).and_then(Value::as_i64);
                self.result = ResultInfo {
                    input_tokens: tok("input_tokens"),
                    output_tokens: tok("output_tokens"),
                    result_text: self.last_message.clone(),
                    ..Default::default()
                };
                self.tools.clear();
                facts.end_of_turn = Some(true);
            }
            "turn.failed" => {
                rows.push(row("result", "error"));
                let message = obj
                    .get("error")
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str)
                    .map(|m| cut(m, MAX_TEXT));
                self.result = ResultInfo {
                    result_text: message.or_else(|| self.last_message.clone()),
                    ..Default::default()
                };
                self.tools.clear();
                facts.end_of_turn = Some(false);
            }
            _ => rows.push(row("custom", "info")),
        }
        facts
    }

    fn result(&self) -> ResultInfo {
        self.result.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::testkit::{kinds, parse};

    fn replay(stdout: &str) -> (CodexParser, Vec<(Vec<EventRow>, LineFacts)>) {
        crate::runtime::testkit::replay(stdout)
    }

    fn session(model: Option<&str>) -> crate::store::sessions::Session {
        crate::runtime::testkit::session("codex", model)
    }

    use crate::config::Config;
    use crate::runtime::testkit::capability;

    fn all_kinds(out: &[(Vec<EventRow>, LineFacts)]) -> Vec<(&str, &str)> {
        out.iter().flat_map(|(r, _)| kinds(r)).collect()
    }

    fn verdict(out: &[(Vec<EventRow>, LineFacts)]) -> Option<bool> {
        out.iter().find_map(|(_, f)| f.end_of_turn)
    }

    fn first_session(out: &[(Vec<EventRow>, LineFacts)]) -> Option<&str> {
        out.iter().find_map(|(_, f)| f.session_id.as_deref())
    }

    /// One mapping per line type and item type.
    #[test]
    fn mapping_table() {
        let mut p = CodexParser::default();
        let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
            (
                r#"{"type":"thread.started","thread_id":"t1"}"#,
                vec![("session_start", "info")],
            ),
            (r#"{"type":"turn.started"}"#, vec![("custom", "info")]),
            (
                r#"{"type":"item.started","item":{"id":"i0","type":"command_execution","command":"ls","status":"in_progress"}}"#,
                vec![("tool_start", "info")],
            ),
            (
                r#"{"type":"item.updated","item":{"id":"i0","type":"command_execution","command":"ls","status":"in_progress"}}"#,
                vec![("custom", "info")],
            ),
            (
                r#"{"type":"item.completed","item":{"id":"i0","type":"command_execution","command":"ls","exit_code":2,"status":"failed"}}"#,
                vec![("tool_end", "warn")],
            ),
            (
                r#"{"type":"item.started","item":{"id":"i1","type":"file_change","changes":[{"path":"/a","kind":"add"}],"status":"in_progress"}}"#,
                vec![("tool_start", "info")],
            ),
            (
                r#"{"type":"item.completed","item":{"id":"i1","type":"file_change","changes":[{"path":"/a","kind":"add"}],"status":"completed"}}"#,
                vec![("tool_end", "info")],
            ),
            (
                r#"{"type":"item.started","item":{"id":"i2","type":"mcp_tool_call","server":"s","tool":"t","arguments":{},"status":"in_progress"}}"#,
                vec![("tool_start", "info")],
            ),
            (
                r#"{"type":"item.completed","item":{"id":"i2","type":"mcp_tool_call","server":"s","tool":"t","error":{"message":"no"},"status":"failed"}}"#,
                vec![("tool_end", "warn")],
            ),
            (
                r#"{"type":"item.completed","item":{"id":"i3","type":"reasoning","text":"hm"}}"#,
                vec![("custom", "debug")],
            ),
            (
                r#"{"type":"item.completed","item":{"id":"i4","type":"agent_message","text":"hi"}}"#,
                vec![("progress", "info")],
            ),
            (
                r#"{"type":"item.completed","item":{"id":"i5","type":"error","message":"Falling back"}}"#,
                vec![("custom", "warn")],
            ),
            (
                r#"{"type":"item.completed","item":{"id":"i6","type":"todo_list","items":[]}}"#,
                vec![("custom", "info")],
            ),
            (
                r#"{"type":"item.completed","item":"not an object"}"#,
                vec![("custom", "info")],
            ),
            (
                r#"{"type":"error","message":"Reconnecting... 2/5 (x)"}"#,
                vec![("custom", "warn")],
            ),
            (
                r#"{"type":"error","message":"We're busy"}"#,
                vec![("error", "error")],
            ),
            (r#"{"type":"error"}"#, vec![("error", "error")]),
            (
                r#"{"type":"turn.completed","usage":{"input_tokens":1,"output_tokens":2}}"#,
                vec![("result", "info")],
            ),
            (
                r#"{"type":"turn.failed","error":{"message":"boom"}}"#,
                vec![("result", "error")],
            ),
            (r#"{"type":"turn.failed"}"#, vec![("result", "error")]),
            (r#"{"type":"item.plan.delta"}"#, vec![("custom", "info")]),
            (r#"{"type":"brand_new_thing"}"#, vec![("custom", "info")]),
        ];
        for (line, want) in cases {
            let (rows, _) = parse(&mut p, line);
            assert_eq!(kinds(&rows), want, "{line}");
        }
    }

    #[test]
    fn only_reconnecting_errors_are_retry_only() {
        let cases = [
            (
                r#"{"type":"error","message":"Reconnecting... 2/5 (x)"}"#,
                true,
            ),
            (
                r#"{"type":"error","message":"Reconnecting... waiting for network (y)"}"#,
                true,
            ),
            (r#"{"type":"error","message":"Not Reconnecting"}"#, false),
            (
                r#"{"type":"item.completed","item":{"type":"error","message":"Reconnecting"}}"#,
                false,
            ),
            (r#"{"type":"turn.started"}"#, false),
        ];
        for (line, want) in cases {
            let (_, f) = parse(&mut CodexParser::default(), line);
            assert_eq!(f.retry_only, want, "{line}");
        }
    }

    #[test]
    fn tool_end_gets_name_and_duration_from_item_started() {
        let mut p = CodexParser::default();
        let long = "x".repeat(10_000);
        let start = format!(
            r#"{{"type":"item.started","item":{{"id":"item_0","type":"command_execution","command":"{long}","status":"in_progress"}}}}"#
        );
        let (rows, _) = parse(&mut p, &start);
        assert_eq!(rows[0].tool_name.as_deref(), Some("command_execution"));
        assert_eq!(rows[0].tool_args.as_ref().unwrap().len(), 4096);
        let (rows, _) = parse(
            &mut p,
            r#"{"type":"item.completed","item":{"id":"item_0","type":"command_execution","command":"x","status":"completed"}}"#,
        );
        assert_eq!(rows[0].tool_name.as_deref(), Some("command_execution"));
        assert!(rows[0].tool_duration_ms.is_some());
        assert!(p.tools.is_empty());
        // A completion without a start: named, no duration.
        let (rows, _) = parse(
            &mut p,
            r#"{"type":"item.completed","item":{"id":"item_9","type":"mcp_tool_call","server":"s","tool":"t","status":"completed"}}"#,
        );
        assert_eq!(kinds(&rows), vec![("tool_end", "info")]);
        assert_eq!(rows[0].tool_name.as_deref(), Some("s.t"));
        assert_eq!(rows[0].tool_duration_ms, None);
    }

    #[test]
    fn in_flight_tools_are_bounded() {
        let mut p = CodexParser::default();
        for i in 0..crate::runtime::MAX_IN_FLIGHT + 10 {
            let line = format!(
                r#"{{"type":"item.started","item":{{"id":"i{i}","type":"command_execution","command":"c"}}}}"#
            );
            parse(&mut p, &line);
        }
        assert_eq!(p.tools.len(), crate::runtime::MAX_IN_FLIGHT);
        parse(&mut p, r#"{"type":"turn.completed"}"#);
        assert!(p.tools.is_empty());
    }

    #[test]
    fn result_text_is_the_last_agent_message() {
        let mut p = CodexParser::default();
        for line in [
            r#"{"type":"item.completed","item":{"id":"a","type":"agent_message","text":"first"}}"#,
            r#"{"type":"item.completed","item":{"id":"b","type":"agent_message","text":"second"}}"#,
        ] {
            parse(&mut p, line);
        }
        let (_, f) = parse(
            &mut p,
            r#"{"type":"turn.completed","usage":{"input_tokens":44,"cached_input_tokens":12,"output_tokens":28}}"#,
        );
        assert_eq!(f.end_of_turn, Some(true));
        let r = p.result();
        assert_eq!(r.result_text.as_deref(), Some("second"));
        assert_eq!((r.input_tokens, r.output_tokens), (Some(44), Some(28)));
        assert_eq!((r.cost_usd, r.num_turns), (None, None));
    }

    /// Real captures (`fixtures/captures/`), replayed line by line.
    #[test]
    fn captures() {
        struct Case {
            name: &'static str,
            stdout: &'static str,
            kinds: Vec<(&'static str, &'static str)>,
            verdict: Option<bool>,
            session: &'static str,
            result_text: Option<&'static str>,
            tokens: (Option<i64>, Option<i64>),
            retry_lines: usize,
        }
        let ok_tail = [("progress", "info"), ("result", "info")];
        let cases = vec![
            Case {
                name: "codex-mock-tool",
                stdout: include_str!("../../fixtures/captures/codex-mock-tool.stdout"),
                kinds: [
                    ("session_start", "info"),
                    ("custom", "info"),
                    ("tool_start", "info"),
                    ("tool_end", "info"),
                ]
                .into_iter()
                .chain(ok_tail)
                .collect(),
                verdict: Some(true),
                session: "01a200e2-cd50-7412-8ab1-f63c01e1c363",
                result_text: Some("MOCK_DONE"),
                tokens: (Some(22), Some(14)),
                retry_lines: 0,
            },
            Case {
                name: "codex-mock-tool-failing",
                stdout: include_str!("../../fixtures/captures/codex-mock-tool-failing.stdout"),
                kinds: [
                    ("session_start", "info"),
                    ("custom", "info"),
                    ("tool_start", "info"),
                    ("tool_end", "warn"),
                ]
                .into_iter()
                .chain(ok_tail)
                .collect(),
                verdict: Some(true),
                session: "01a200e2-cee7-7cc3-9532-b7bbb1dc77ea",
                result_text: Some("MOCK_DONE"),
                tokens: (Some(22), Some(14)),
                retry_lines: 0,
            },
            Case {
                name: "codex-mock-patch-bypass",
                stdout: include_str!("../../fixtures/captures/codex-mock-patch-bypass.stdout"),
                kinds: [
                    ("session_start", "info"),
                    ("custom", "info"),
                    ("tool_start", "info"),
                    ("tool_end", "info"),
                ]
                .into_iter()
                .chain(ok_tail)
                .collect(),
                verdict: Some(true),
                session: "01a200e2-d1e9-79a0-87b4-dae8287bddf9",
                result_text: Some("MOCK_DONE"),
                tokens: (Some(22), Some(14)),
                retry_lines: 0,
            },
            Case {
                name: "codex-mock-think",
                stdout: include_str!("../../fixtures/captures/codex-mock-think.stdout"),
                kinds: [
                    ("session_start", "info"),
                    ("custom", "info"),
                    ("custom", "debug"),
                ]
                .into_iter()
                .chain(ok_tail)
                .collect(),
                verdict: Some(true),
                session: "01a200e2-d34f-7e60-9fc3-805b5bb53a6a",
                result_text: Some("Hello from mock after thinking"),
                tokens: (Some(11), Some(7)),
                retry_lines: 0,
            },
            Case {
                name: "codex-mock-resume",
                stdout: include_str!("../../fixtures/captures/codex-mock-resume.stdout"),
                kinds: [("session_start", "info"), ("custom", "info")]
                    .into_iter()
                    .chain(ok_tail)
                    .collect(),
                verdict: Some(true),
                session: "01a200e2-cc17-7b43-ab2a-913288949a2b",
                result_text: Some("Hello from mock"),
                // Running totals over the thread, as reported (turn 2 of it).
                tokens: (Some(22), Some(14)),
                retry_lines: 0,
            },
            Case {
                name: "codex-mock-http500",
                stdout: include_str!("../../fixtures/captures/codex-mock-http500.stdout"),
                kinds: vec![
                    ("session_start", "info"),
                    ("custom", "info"),
                    ("error", "error"),
                    ("result", "error"),
                ],
                verdict: Some(false),
                session: "01a200e2-d48f-7452-8599-15ab2a83259f",
                result_text: Some(
                    "We’re currently experiencing high demand, which may cause temporary errors.",
                ),
                tokens: (None, None),
                retry_lines: 0,
            },
            Case {
                name: "codex-exec-json-arg",
                stdout: include_str!("../../fixtures/captures/codex-exec-json-arg.stdout"),
                kinds: [("session_start", "info"), ("custom", "info")]
                    .into_iter()
                    .chain([("custom", "warn"); 10])
                    .collect(),
                verdict: None,
                session: "01a200da-ba56-7630-bfda-a47983be59d8",
                result_text: None,
                tokens: (None, None),
                retry_lines: 9,
            },
            Case {
                name: "codex-sigint-during-tool",
                stdout: include_str!("../../fixtures/captures/codex-sigint-during-tool.stdout"),
                kinds: vec![
                    ("session_start", "info"),
                    ("custom", "info"),
                    ("tool_start", "info"),
                ],
                verdict: None,
                session: "01a200e3-2b32-7401-86f4-07df82ee23c0",
                result_text: None,
                tokens: (None, None),
                retry_lines: 0,
            },
        ];
        for c in cases {
            let (p, out) = replay(c.stdout);
            assert_eq!(all_kinds(&out), c.kinds, "{}", c.name);
            assert_eq!(verdict(&out), c.verdict, "{}", c.name);
            assert_eq!(first_session(&out), Some(c.session), "{}", c.name);
            let r = p.result();
            assert_eq!(r.result_text.as_deref(), c.result_text, "{}", c.name);
            assert_eq!((r.input_tokens, r.output_tokens), c.tokens, "{}", c.name);
            let retries = out.iter().filter(|(_, f)| f.retry_only).count();
            assert_eq!(retries, c.retry_lines, "{}", c.name);
        }
    }

    #[test]
    fn unknown_resume_from_stderr() {
        let bad = include_str!("../../fixtures/captures/codex-mock-resume-bad-id.stderr");
        let other = include_str!("../../fixtures/captures/codex-mock-tool.stderr");
        let cases: [(&str, Option<&str>); 3] = [
            (
                bad,
                Some(
                    "Error: thread/resume: thread/resume failed: no rollout found for thread id \
                     00000000-0000-4000-8000-000000000000 (code -32600)",
                ),
            ),
            (other, None),
            ("", None),
        ];
        for (stderr, want) in cases {
            assert_eq!(Codex.unknown_resume(stderr, Some(1), None).as_deref(), want);
        }
    }

    #[test]
    fn argv_first_and_later_turns() {
        let base = "exec --json --skip-git-repo-check";
        let bypass = "--dangerously-bypass-approvals-and-sandbox";
        // (model, unattended, extra args, resume id, expected args after `codex`)
        type Case<'a> = (Option<&'a str>, bool, Vec<&'a str>, Option<&'a str>, String);
        let cases: Vec<Case> = vec![
            (None, true, vec![], None, format!("{base} {bypass} -")),
            (None, false, vec![], None, format!("{base} -")),
            (
                Some("gpt-5.5"),
                true,
                vec!["-c", "k=v"],
                None,
                format!("{base} -m gpt-5.5 {bypass} -c k=v -"),
            ),
            (
                None,
                true,
                vec![],
                Some("th-1"),
                format!("{base} {bypass} resume th-1 -"),
            ),
            (
                Some("m"),
                false,
                vec!["-c", "k=v"],
                Some("th-1"),
                format!("{base} -m m -c k=v resume th-1 -"),
            ),
        ];
        for (model, unattended, extra, resume, want) in cases {
            let mut config = Config::default();
            config.codex.unattended = unattended;
            config.codex.args = extra.iter().map(|s| s.to_string()).collect();
            config.codex.env.insert("CODEX_HOME".into(), "/h".into());
            let s = session(model);
            let cap = capability("");
            let input = TurnInput {
                session: &s,
                capability: &cap,
                config: &config,
                text: "hi",
                resume_id: resume,
                new_session_id: "unused",
            };
            let spec = Codex.spawn_spec(&input).unwrap();
            assert_eq!(spec.program, "codex");
            assert_eq!(spec.args.join(" "), want);
            assert_eq!(spec.env.get("CODEX_HOME").map(String::as_str), Some("/h"));
        }
    }

    #[test]
    fn stdin_is_plain_text_with_instructions_on_the_first_turn() {
        let config = Config::default();
        let s = session(None);
        let cap = capability("Be brief.");
        let cases = [(None, "Be brief.\n\n---\n\nhello"), (Some("th-1"), "hello")];
        for (resume_id, want) in cases {
            let input = TurnInput {
                session: &s,
                capability: &cap,
                config: &config,
                text: "hello",
                resume_id,
                new_session_id: "unused",
            };
            assert_eq!(Codex.stdin_bytes(&input), want.as_bytes());
        }
        assert_eq!(Codex.stdin_policy(), StdinPolicy::CloseAfterWrite);
        assert_eq!(Codex.graceful_stop(), Graceful::Signal(Sig::SIGINT));
    }
}
