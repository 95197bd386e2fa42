//! The `gemini` runtime: Gemini CLI's `--output-format stream-json` mode (SPEC
//! §8, `../shared/agent-clis.md` §3).
//!
//! One turn per process, run with `GEMINI_CLI_NO_RELAUNCH=true` so there is a
//! single process to signal. The first turn pre-assigns `--session-id <uuid>`,
//! a later one passes `--resume <id>`; the plain text goes to stdin, which is
//! closed at once (gemini waits only 500 ms for it). The answer has no field
//! of its own: it is the assistant `message` deltas joined. `result` ends the
//! turn, clean iff `status` is `success`. There is no graceful stop, and an
//! unknown resume shows only as exit code 42 with a line on stderr.

use serde_json::Value;

use super::{
    Graceful, Line, LineFacts, Parser, ResultInfo, Runtime, SpawnSpec, StdinPolicy, ToolCalls,
    TurnInput, cut, row, str_of, tool_end_row, tool_start_row,
};
use crate::store::events::{EventRow, ToolStartRef};

pub struct Gemini;

/// Longest `tool_args` and `result_text` kept.
const MAX_TEXT: usize = 4096;
/// Gemini's exit code for an input error, which is what an unknown resume gives.
const EXIT_INPUT_ERROR: i32 = 42;

impl Runtime for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn spawn_spec(&self, input: &TurnInput<'_>) -> Result<SpawnSpec, String> {
        let rc = &input.config.gemini;
        let mut args: Vec<String> = ["--output-format", "stream-json", "--skip-trust"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(m) = &input.session.model {
            args.push("-m".into());
            args.push(m.clone());
        }
        if rc.unattended {
            args.push("--yolo".into());
        }
        args.extend(rc.args.iter().cloned());
        match input.resume_id {
            Some(id) => args.extend(["--resume".into(), id.to_string()]),
            None => args.extend(["--session-id".into(), input.new_session_id.to_string()]),
        }
        let mut env = std::collections::BTreeMap::new();
        env.insert("GEMINI_CLI_NO_RELAUNCH".to_string(), "true".to_string());
        env.extend(rc.env.clone());
        Ok(SpawnSpec {
            program: rc.bin.clone(),
            args,
            env,
        })
    }

    fn stdin_bytes(&self, input: &TurnInput<'_>) -> Vec<u8> {
        super::with_instructions(input).into_bytes()
    }

    fn stdin_policy(&self) -> StdinPolicy {
        StdinPolicy::CloseAfterWrite
    }

    fn parser(&self) -> Box<dyn Parser> {
        Box::new(GeminiParser::default())
    }

    fn graceful_stop(&self) -> Graceful {
        Graceful::None
    }

    fn unknown_resume(
        &self,
        stderr_tail: &str,
        exit_code: Option<i32>,
        _result_text: Option<&str>,
    ) -> Option<String> {
        let lines = || stderr_tail.lines().map(str::trim).filter(|l| !l.is_empty());
        if let Some(l) = lines().find(|l| l.contains("Error resuming session")) {
            return Some(l.to_string());
        }
        if exit_code != Some(EXIT_INPUT_ERROR) {
            return None;
        }
        let line = lines()
            .find(|l| l.starts_with("Error"))
            .or_else(|| lines().next())
            .map(|l| cut(l, MAX_TEXT))
            .unwrap_or_else(|| format!("gemini exited {EXIT_INPUT_ERROR} on --resume"));
        Some(line)
    }
}

/// Gemini stream-json → events.
#[derive(Default)]
pub struct GeminiParser {
    /// Tool calls in flight, by tool_id.
    tools: ToolCalls,
    /// The assistant deltas so far, joined (cut).
    text: String,
    result: ResultInfo,
}

impl GeminiParser {
    fn push_text(&mut self, delta: &str) {
        let room = MAX_TEXT.saturating_sub(self.text.len());
        if room > 0 {
            self.text.push_str(&cut(delta, room));
        }
    }
}

impl Parser for GeminiParser {
    fn line(&mut self, line: &Line<'_>, rows: &mut Vec<EventRow>) -> LineFacts {
        let obj = line.obj;
        let mut facts = LineFacts::with_session(obj, "session_id");
        match line.kind {
            "init" => rows.push(row("session_start", "info")),
            "message" => match str_of(obj, "role") {
                Some("assistant") => {
                    if let Some(t) = str_of(obj, "content") {
                        self.push_text(t);
                    }
                    rows.push(row("progress", "info"));
                }
                Some("user") => rows.push(row("custom", "debug")),
                _ => rows.push(row("custom", "info")),
            },
            "tool_use" => {
                let name = str_of(obj, "tool_name").unwrap_or("").to_string();
                if let Some(id) = str_of(obj, "tool_id") {
                    let at = ToolStartRef {
                        line_no: line.line_no,
                        nth: 0,
                    };
                    self.tools.start(id, &name, None, at);
                }
                let params = obj.get("parameters").cloned().unwrap_or(Value::Null);
                rows.push(tool_start_row(name, cut(&params.to_string(), MAX_TEXT)));
            }
            "tool_result" => {
                let failed = str_of(obj, "status") != Some("success");
                let call = str_of(obj, "tool_id").and_then(|id| self.tools.finish(id));
                rows.push(tool_end_row(if failed { "warn" } else { "info" }, call));
            }
            "error" => match str_of(obj, "severity") {
                Some("warning") => rows.push(row("custom", "warn")),
                _ => rows.push(row("error", "error")),
            },
            "result" => {
                let clean = str_of(obj, "status") == Some("success");
                rows.push(row("result", if clean { "info" } else { "error" }));
                let stats = obj.get("stats");
                let tok = |k: &str| stats.and_then(|s| s.get(k)).and_then(Value::as_i64);
                let error = obj
                    .get("error")
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str);
                let text = match (self.text.is_empty(), clean, error) {
                    (false, _, _) => Some(self.text.clone()),
                    (true, false, Some(e)) => Some(cut(e, MAX_TEXT)),
                    _ => None,
                };
                self.result = ResultInfo {
                    input_tokens: tok("input_tokens"),
                    output_tokens: tok("output_tokens"),
                    result_text: text,
                    ..Default::default()
                };
                self.tools.clear();
                facts.end_of_turn = Some(clean);
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

    fn replay(stdout: &str) -> (GeminiParser, Vec<(Vec<EventRow>, LineFacts)>) {
        crate::runtime::testkit::replay(stdout)
    }

    fn session(model: Option<&str>) -> crate::store::sessions::Session {
        crate::runtime::testkit::session("gemini", model)
    }

    use crate::config::Config;
    use crate::runtime::testkit::capability;

    /// One mapping per line type.
    #[test]
    fn mapping_table() {
        let mut p = GeminiParser::default();
        let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
            (
                r#"{"type":"init","session_id":"g1","model":"auto"}"#,
                vec![("session_start", "info")],
            ),
            (
                r#"{"type":"message","role":"user","content":"hello"}"#,
                vec![("custom", "debug")],
            ),
            (
                r#"{"type":"message","role":"assistant","content":"Hi","delta":true}"#,
                vec![("progress", "info")],
            ),
            (
                r#"{"type":"message","role":"system","content":"?"}"#,
                vec![("custom", "info")],
            ),
            (
                r#"{"type":"tool_use","tool_name":"run_shell_command","tool_id":"t1","parameters":{"command":"ls"}}"#,
                vec![("tool_start", "info")],
            ),
            (
                r#"{"type":"tool_result","tool_id":"t1","status":"error","error":{"type":"x","message":"y"}}"#,
                vec![("tool_end", "warn")],
            ),
            (
                r#"{"type":"tool_result","tool_id":"unknown","status":"success"}"#,
                vec![("tool_end", "info")],
            ),
            (
                r#"{"type":"error","severity":"warning","message":"loop"}"#,
                vec![("custom", "warn")],
            ),
            (
                r#"{"type":"error","severity":"error","message":"bad"}"#,
                vec![("error", "error")],
            ),
            (
                r#"{"type":"result","status":"success","stats":{}}"#,
                vec![("result", "info")],
            ),
            (
                r#"{"type":"result","status":"error"}"#,
                vec![("result", "error")],
            ),
            (r#"{"type":"result"}"#, vec![("result", "error")]),
            (r#"{"type":"brand_new_thing"}"#, vec![("custom", "info")]),
        ];
        for (line, want) in cases {
            let (rows, _) = parse(&mut p, line);
            assert_eq!(kinds(&rows), want, "{line}");
        }
    }

    #[test]
    fn tool_end_gets_name_and_duration_from_tool_use() {
        let mut p = GeminiParser::default();
        let long = "x".repeat(10_000);
        let line = format!(
            r#"{{"type":"tool_use","tool_name":"run_shell_command","tool_id":"t1","parameters":{{"command":"{long}"}}}}"#
        );
        let (rows, _) = parse(&mut p, &line);
        assert_eq!(rows[0].tool_name.as_deref(), Some("run_shell_command"));
        assert_eq!(rows[0].tool_args.as_ref().unwrap().len(), 4096);
        let (rows, _) = parse(
            &mut p,
            r#"{"type":"tool_result","tool_id":"t1","status":"success"}"#,
        );
        assert_eq!(rows[0].tool_name.as_deref(), Some("run_shell_command"));
        assert!(rows[0].tool_duration_ms.is_some());
        assert!(p.tools.is_empty());
    }

    #[test]
    fn result_text_is_bounded() {
        let mut p = GeminiParser::default();
        let chunk = format!(
            r#"{{"type":"message","role":"assistant","content":"{}","delta":true}}"#,
            "é".repeat(1000)
        );
        for _ in 0..10 {
            parse(&mut p, &chunk);
        }
        assert!(p.text.len() <= MAX_TEXT && p.text.len() >= MAX_TEXT - 1);
        for i in 0..crate::runtime::MAX_IN_FLIGHT + 10 {
            let line = format!(r#"{{"type":"tool_use","tool_name":"n","tool_id":"t{i}"}}"#);
            parse(&mut p, &line);
        }
        assert_eq!(p.tools.len(), crate::runtime::MAX_IN_FLIGHT);
        let (_, f) = parse(&mut p, r#"{"type":"result","status":"success"}"#);
        assert_eq!(f.end_of_turn, Some(true));
        assert!(p.tools.is_empty());
        assert_eq!(p.result().result_text.map(|t| t.len()), Some(p.text.len()));
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
            tool: Option<&'static str>,
        }
        let start = [("session_start", "info"), ("custom", "debug")];
        let text3 = [("progress", "info"); 3];
        let tool = |end: &'static str| {
            start
                .into_iter()
                .chain([
                    ("tool_start", "info"),
                    ("tool_end", end),
                    ("progress", "info"),
                    ("result", "info"),
                ])
                .collect::<Vec<_>>()
        };
        let cases = vec![
            Case {
                name: "gemini-mock-text",
                stdout: include_str!("../../fixtures/captures/gemini-mock-text.stdout"),
                kinds: start
                    .into_iter()
                    .chain(text3)
                    .chain([("result", "info")])
                    .collect(),
                verdict: Some(true),
                session: "e7dbf9a7-bf55-4268-b598-388902889129",
                result_text: Some("Hello from mock"),
                tokens: (Some(22), Some(14)),
                tool: None,
            },
            Case {
                name: "gemini-mock-resume-uuid",
                stdout: include_str!("../../fixtures/captures/gemini-mock-resume-uuid.stdout"),
                kinds: start
                    .into_iter()
                    .chain(text3)
                    .chain([("result", "info")])
                    .collect(),
                verdict: Some(true),
                session: "e7dbf9a7-bf55-4268-b598-388902889129",
                result_text: Some("Hello from mock"),
                tokens: (Some(11), Some(7)),
                tool: None,
            },
            Case {
                name: "gemini-mock-tool-yolo",
                stdout: include_str!("../../fixtures/captures/gemini-mock-tool-yolo.stdout"),
                kinds: tool("info"),
                verdict: Some(true),
                session: "eff64be2-dfa6-42aa-9feb-c0aa0abc62f1",
                result_text: Some("MOCK_DONE"),
                tokens: (Some(33), Some(21)),
                tool: Some("run_shell_command"),
            },
            Case {
                name: "gemini-mock-tool-default",
                stdout: include_str!("../../fixtures/captures/gemini-mock-tool-default.stdout"),
                kinds: tool("warn"),
                verdict: Some(true),
                session: "3195e027-49e9-4d3e-888f-71c5c1796193",
                result_text: Some("MOCK_DONE"),
                tokens: (Some(33), Some(21)),
                tool: Some("run_shell_command"),
            },
            Case {
                name: "gemini-gateway-unreachable",
                stdout: include_str!("../../fixtures/captures/gemini-gateway-unreachable.stdout"),
                kinds: start.into_iter().chain([("result", "error")]).collect(),
                verdict: Some(false),
                session: "1b5b0016-eba1-428c-9a66-ebc905fc683e",
                result_text: Some("[API Error: exception TypeError: fetch failed sending request]"),
                tokens: (Some(0), Some(0)),
                tool: None,
            },
            Case {
                name: "gemini-norelaunch-sigterm-during-tool",
                stdout: include_str!(
                    "../../fixtures/captures/gemini-norelaunch-sigterm-during-tool.stdout"
                ),
                kinds: start.into_iter().chain([("tool_start", "info")]).collect(),
                verdict: None,
                session: "06401602-a565-4d10-87f4-74e2d6da6a5f",
                result_text: None,
                tokens: (None, None),
                tool: Some("run_shell_command"),
            },
        ];
        for c in cases {
            let (p, out) = replay(c.stdout);
            let got: Vec<_> = out.iter().flat_map(|(r, _)| kinds(r)).collect();
            assert_eq!(got, c.kinds, "{}", c.name);
            let verdict = out.iter().find_map(|(_, f)| f.end_of_turn);
            assert_eq!(verdict, c.verdict, "{}", c.name);
            let session = out.iter().find_map(|(_, f)| f.session_id.as_deref());
            assert_eq!(session, Some(c.session), "{}", c.name);
            assert!(out.iter().all(|(_, f)| !f.retry_only), "{}", c.name);
            let r = p.result();
            assert_eq!(r.result_text.as_deref(), c.result_text, "{}", c.name);
            assert_eq!((r.input_tokens, r.output_tokens), c.tokens, "{}", c.name);
            let tool_start = out
                .iter()
                .flat_map(|(r, _)| r)
                .find(|r| r.event_type == "tool_start");
            assert_eq!(
                tool_start.and_then(|r| r.tool_name.as_deref()),
                c.tool,
                "{}",
                c.name
            );
            if c.tool.is_some() {
                assert!(
                    tool_start
                        .and_then(|r| r.tool_args.as_deref())
                        .is_some_and(|a| a.contains("\"command\"")),
                    "{}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn unknown_resume_from_exit_42_and_stderr() {
        let bad = include_str!("../../fixtures/captures/gemini-resume-bad.stderr");
        let other_cwd = include_str!("../../fixtures/captures/gemini-mock-resume-other-cwd.stderr");
        let msg = "Error resuming session: No previous sessions found for this project.";
        let cases: Vec<(&str, Option<i32>, Option<&str>)> = vec![
            (bad, Some(42), Some(msg)),
            (other_cwd, Some(42), Some(msg)),
            (
                "\n  Something else went wrong\n",
                Some(42),
                Some("Something else went wrong"),
            ),
            (
                "noise\nError: bad input\n",
                Some(42),
                Some("Error: bad input"),
            ),
            ("", Some(42), Some("gemini exited 42 on --resume")),
            ("Attempt 1 failed. Retrying", Some(1), None),
            ("", Some(0), None),
            ("", None, None),
        ];
        for (stderr, exit, want) in cases {
            assert_eq!(
                Gemini.unknown_resume(stderr, exit, None).as_deref(),
                want,
                "{stderr:?} {exit:?}"
            );
        }
    }

    #[test]
    fn argv_first_and_later_turns() {
        let base = "--output-format stream-json --skip-trust";
        // (model, unattended, extra args, resume id, expected args after `gemini`)
        type Case<'a> = (Option<&'a str>, bool, Vec<&'a str>, Option<&'a str>, String);
        let cases: Vec<Case> = vec![
            (
                None,
                true,
                vec![],
                None,
                format!("{base} --yolo --session-id new-1"),
            ),
            (
                None,
                false,
                vec![],
                None,
                format!("{base} --session-id new-1"),
            ),
            (
                Some("gemini-2.5-flash"),
                true,
                vec!["--debug"],
                None,
                format!("{base} -m gemini-2.5-flash --yolo --debug --session-id new-1"),
            ),
            (
                None,
                true,
                vec![],
                Some("g-1"),
                format!("{base} --yolo --resume g-1"),
            ),
            (
                Some("m"),
                false,
                vec!["--debug"],
                Some("g-1"),
                format!("{base} -m m --debug --resume g-1"),
            ),
        ];
        for (model, unattended, extra, resume, want) in cases {
            let mut config = Config::default();
            config.gemini.unattended = unattended;
            config.gemini.args = extra.iter().map(|s| s.to_string()).collect();
            config.gemini.env.insert("HOME".into(), "/h".into());
            let s = session(model);
            let cap = capability("");
            let input = TurnInput {
                session: &s,
                capability: &cap,
                config: &config,
                text: "hi",
                resume_id: resume,
                new_session_id: "new-1",
            };
            let spec = Gemini.spawn_spec(&input).unwrap();
            assert_eq!(spec.program, "gemini");
            assert_eq!(spec.args.join(" "), want);
            let env: Vec<_> = spec
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                env,
                vec![("GEMINI_CLI_NO_RELAUNCH", "true"), ("HOME", "/h")]
            );
        }
    }

    #[test]
    fn stdin_is_plain_text_with_instructions_on_the_first_turn() {
        let config = Config::default();
        let s = session(None);
        let cap = capability("Be brief.");
        let cases = [(None, "Be brief.\n\n---\n\nhello"), (Some("g-1"), "hello")];
        for (resume_id, want) in cases {
            let input = TurnInput {
                session: &s,
                capability: &cap,
                config: &config,
                text: "hello",
                resume_id,
                new_session_id: "new-1",
            };
            assert_eq!(Gemini.stdin_bytes(&input), want.as_bytes());
        }
        assert_eq!(Gemini.stdin_policy(), StdinPolicy::CloseAfterWrite);
        assert_eq!(Gemini.graceful_stop(), Graceful::None);
    }
}
