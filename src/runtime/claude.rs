//! The `claude` runtime: Claude Code's `-p` stream-json mode (SPEC §8,
//! `../shared/agent-clis.md` §1).
//!
//! First turn `--session-id=<uuid>`, later turns `--resume=<id>` (equals
//! form, so an id can never read as a flag); one JSON envelope on stdin, kept
//! open until `result` so the interrupt `control_request` can be sent;
//! `is_error` (never the subtype) is the verdict. The stream mapping here is
//! also the `command` runtime's.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{Map, Value, json};

use super::{
    Graceful, LineFacts, Parser, ResultInfo, Runtime, SpawnSpec, StdinPolicy, TurnInput, cut, row,
    str_of,
};
use crate::store::events::EventRow;

pub struct Claude;

/// Extra time a declared tool timeout gets before the stall watchdog fires.
pub const TOOL_SLACK_MS: u64 = 30_000;

/// `{"type":"user","message":{"role":"user","content":[{"type":"text","text":…}]}}` + `\n`.
pub fn envelope(text: &str) -> Vec<u8> {
    let mut v = serde_json::to_vec(&json!({
        "type": "user",
        "message": {"role": "user", "content": [{"type": "text", "text": text}]}
    }))
    .unwrap_or_default();
    v.push(b'\n');
    v
}

pub fn interrupt_line() -> Vec<u8> {
    let id = format!("runner-interrupt-{}", crate::os::random_alnum(8));
    let mut v = serde_json::to_vec(&json!({
        "type": "control_request", "request_id": id, "request": {"subtype": "interrupt"}
    }))
    .unwrap_or_default();
    v.push(b'\n');
    v
}

impl Runtime for Claude {
    fn name(&self) -> &'static str {
        "claude"
    }

    fn spawn_spec(&self, input: &TurnInput<'_>) -> Result<SpawnSpec, String> {
        let rc = &input.config.claude;
        let mut args: Vec<String> = [
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match input.resume_id {
            Some(id) => args.push(format!("--resume={id}")),
            None => args.push(format!("--session-id={}", input.new_session_id)),
        }
        if let Some(m) = &input.session.model {
            args.push("--model".into());
            args.push(m.clone());
        }
        if rc.unattended {
            let mode = rc
                .permission_mode_env
                .clone()
                .or_else(|| input.capability.permission_mode.clone())
                .or_else(|| rc.permission_mode_file.clone())
                .unwrap_or_else(|| "bypassPermissions".into());
            args.push("--permission-mode".into());
            args.push(mode);
        }
        if !input.capability.instructions.is_empty() {
            args.push("--append-system-prompt".into());
            args.push(input.capability.instructions.clone());
        }
        args.extend(rc.args.iter().cloned());
        Ok(SpawnSpec {
            program: rc.bin.clone(),
            args,
            env: rc.env.clone().into_iter().collect(),
        })
    }

    fn stdin_bytes(&self, input: &TurnInput<'_>) -> Vec<u8> {
        envelope(input.text)
    }

    fn stdin_policy(&self) -> StdinPolicy {
        StdinPolicy::KeepUntilEndOfTurn
    }

    fn parser(&self) -> Box<dyn Parser> {
        Box::new(ClaudeParser::default())
    }

    fn graceful_stop(&self) -> Graceful {
        Graceful::StdinLine(interrupt_line())
    }

    fn unknown_resume(
        &self,
        stderr_tail: &str,
        _exit: Option<i32>,
        result_text: Option<&str>,
    ) -> Option<String> {
        let hay = [stderr_tail, result_text.unwrap_or("")];
        hay.iter()
            .flat_map(|h| h.lines())
            .find(|l| l.contains("No conversation found"))
            .map(|l| l.trim().to_string())
    }
}

/// Claude stream-json → events (the table of SPEC §8).
#[derive(Default)]
pub struct ClaudeParser {
    /// tool_use id → (name, started, declared timeout ms)
    tools: HashMap<String, (String, Instant, Option<u64>)>,
    result: ResultInfo,
}

impl ClaudeParser {
    fn allowance(&self) -> u64 {
        self.tools
            .values()
            .filter_map(|(_, _, t)| *t)
            .max()
            .map(|t| t + TOOL_SLACK_MS)
            .unwrap_or(0)
    }
}

fn content_blocks(obj: &Map<String, Value>) -> &[Value] {
    obj.get("message")
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

impl Parser for ClaudeParser {
    fn line(
        &mut self,
        kind: &str,
        obj: &Map<String, Value>,
        rows: &mut Vec<EventRow>,
    ) -> LineFacts {
        let mut facts = LineFacts {
            session_id: str_of(obj, "session_id").map(str::to_string),
            ..Default::default()
        };
        match kind {
            "system" => match str_of(obj, "subtype") {
                Some("init") => rows.push(row("session_start", "info")),
                Some("api_retry") => {
                    facts.retry_only = true;
                    rows.push(row("custom", "warn"));
                }
                _ => rows.push(row("custom", "info")),
            },
            "assistant" => {
                let mut texts: Vec<&str> = Vec::new();
                let mut thinking = false;
                let mut tool_rows = Vec::new();
                for b in content_blocks(obj) {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => texts.extend(b.get("text").and_then(Value::as_str)),
                        Some("thinking") | Some("redacted_thinking") => thinking = true,
                        Some("tool_use") => {
                            let name = b
                                .get("name")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string();
                            let input = b.get("input").cloned().unwrap_or(Value::Null);
                            let declared = if name == "Bash" {
                                input.get("timeout").and_then(Value::as_u64)
                            } else {
                                None
                            };
                            if let Some(id) = b.get("id").and_then(Value::as_str) {
                                self.tools.insert(
                                    id.to_string(),
                                    (name.clone(), Instant::now(), declared),
                                );
                            }
                            let mut r = row("tool_start", "info");
                            r.tool_name = Some(name);
                            r.tool_args = Some(cut(&input.to_string(), 4096));
                            tool_rows.push(r);
                        }
                        _ => {}
                    }
                }
                if !texts.is_empty() {
                    rows.push(row("progress", "info"));
                }
                if thinking {
                    rows.push(row("custom", "debug"));
                }
                let had_tools = !tool_rows.is_empty();
                rows.extend(tool_rows);
                if texts.is_empty() && !thinking && !had_tools {
                    rows.push(row("custom", "info"));
                }
                if had_tools {
                    facts.tool_allowance_ms = Some(self.allowance());
                }
            }
            "user" => {
                let mut any = false;
                for b in content_blocks(obj) {
                    if b.get("type").and_then(Value::as_str) != Some("tool_result") {
                        continue;
                    }
                    any = true;
                    let is_error = b.get("is_error").and_then(Value::as_bool).unwrap_or(false);
                    let mut r = row("tool_end", if is_error { "warn" } else { "info" });
                    if let Some((name, started, _)) = b
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .and_then(|id| self.tools.remove(id))
                    {
                        r.tool_name = Some(name);
                        r.tool_duration_ms = Some(started.elapsed().as_millis() as i64);
                    }
                    rows.push(r);
                }
                if any {
                    facts.tool_allowance_ms = Some(self.allowance());
                } else {
                    rows.push(row("custom", "info"));
                }
            }
            "result" => {
                let is_error = obj.get("is_error").and_then(Value::as_bool).unwrap_or(true);
                rows.push(row("result", if is_error { "error" } else { "info" }));
                let usage = obj.get("usage");
                let tok = |k: &str| usage.and_then(|u| u.get(k)).and_then(Value::as_i64);
                let text = match str_of(obj, "result") {
                    Some(t) => Some(t.to_string()),
                    None => obj.get("errors").map(|e| match e {
                        Value::Array(a) => a
                            .iter()
                            .map(|x| {
                                x.as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| x.to_string())
                            })
                            .collect::<Vec<_>>()
                            .join("; "),
                        other => other.to_string(),
                    }),
                };
                self.result = ResultInfo {
                    cost_usd: obj.get("total_cost_usd").and_then(Value::as_f64),
                    input_tokens: tok("input_tokens"),
                    output_tokens: tok("output_tokens"),
                    num_turns: obj.get("num_turns").and_then(Value::as_i64),
                    result_text: text.map(|t| cut(&t, 4096)),
                };
                self.tools.clear();
                facts.tool_allowance_ms = Some(0);
                facts.end_of_turn = Some(!is_error);
            }
            "stream_event" => {}
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

    /// SPEC §8's mapping table, row by row.
    #[test]
    fn mapping_table() {
        let mut p = ClaudeParser::default();
        let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
            (
                r#"{"type":"system","subtype":"init","session_id":"s1"}"#,
                vec![("session_start", "info")],
            ),
            (
                r#"{"type":"system","subtype":"api_retry","attempt":1}"#,
                vec![("custom", "warn")],
            ),
            (
                r#"{"type":"system","subtype":"status"}"#,
                vec![("custom", "info")],
            ),
            (
                r#"{"type":"assistant","message":{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}}"#,
                vec![("progress", "info")],
            ),
            (
                r#"{"type":"assistant","message":{"content":[{"type":"tool_use","id":"t1","name":"Bash","input":{"command":"ls"}}]}}"#,
                vec![("tool_start", "info")],
            ),
            (
                r#"{"type":"assistant","message":{"content":[{"type":"thinking","thinking":"hm"}]}}"#,
                vec![("custom", "debug")],
            ),
            (
                r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","is_error":true}]}}"#,
                vec![("tool_end", "warn")],
            ),
            (
                r#"{"type":"result","is_error":false,"result":"ok"}"#,
                vec![("result", "info")],
            ),
            (
                r#"{"type":"result","subtype":"success","is_error":true}"#,
                vec![("result", "error")],
            ),
            (r#"{"type":"stream_event","event":{}}"#, vec![]),
            (
                r#"{"type":"control_response","response":{}}"#,
                vec![("custom", "info")],
            ),
            (r#"{"type":"brand_new_thing"}"#, vec![("custom", "info")]),
        ];
        for (line, want) in cases {
            let (rows, _) = parse(&mut p, line);
            assert_eq!(kinds(&rows), want, "{line}");
        }
    }

    #[test]
    fn tool_end_gets_name_and_duration_from_tool_use() {
        let mut p = ClaudeParser::default();
        let (rows, f) = parse(
            &mut p,
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","id":"x","name":"Bash","input":{"command":"sleep 1","timeout":60000}}]}}"#,
        );
        assert_eq!(rows[0].tool_name.as_deref(), Some("Bash"));
        assert!(rows[0].tool_args.as_deref().unwrap().contains("sleep 1"));
        assert_eq!(f.tool_allowance_ms, Some(90_000));
        let (rows, f) = parse(
            &mut p,
            r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"x"}]}}"#,
        );
        assert_eq!(rows[0].tool_name.as_deref(), Some("Bash"));
        assert!(rows[0].tool_duration_ms.is_some());
        assert_eq!(f.tool_allowance_ms, Some(0));
    }

    #[test]
    fn verdict_is_is_error_not_subtype() {
        let mut p = ClaudeParser::default();
        let (_, f) = parse(
            &mut p,
            r#"{"type":"result","subtype":"success","is_error":true,"session_id":"s","total_cost_usd":0.5,"usage":{"input_tokens":3,"output_tokens":4},"num_turns":2,"result":"Not logged in"}"#,
        );
        assert_eq!(f.end_of_turn, Some(false));
        assert_eq!(f.session_id.as_deref(), Some("s"));
        let r = p.result();
        assert_eq!(r.cost_usd, Some(0.5));
        assert_eq!(r.input_tokens, Some(3));
        assert_eq!(r.num_turns, Some(2));
        assert_eq!(r.result_text.as_deref(), Some("Not logged in"));
        let (_, f) = parse(
            &mut p,
            r#"{"type":"result","subtype":"error_max_turns","is_error":false}"#,
        );
        assert_eq!(f.end_of_turn, Some(true));
    }

    #[test]
    fn envelope_is_one_json_line() {
        let e = envelope("hi \"there\"\nnext");
        assert_eq!(*e.last().unwrap(), b'\n');
        assert_eq!(e.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["message"]["content"][0]["text"], "hi \"there\"\nnext");
    }
}
