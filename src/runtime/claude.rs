//! The `claude` runtime: Claude Code's `-p` stream-json mode (SPEC §8,
//! `../shared/agent-clis.md` §1).
//!
//! First turn `--session-id=<uuid>`, later turns `--resume=<id>` (equals
//! form, so an id can never read as a flag); one JSON envelope on stdin, kept
//! open until `result` so the interrupt `control_request` can be sent;
//! `is_error` (never the subtype) is the verdict. The stream mapping here is
//! also the `command` runtime's.

use std::borrow::Cow;

use serde_json::{Map, Value, json};

use super::json::{self, Lite, Scanner};
use super::{
    FastLine, Graceful, Line, LineFacts, Parser, ResultInfo, Runtime, SpawnSpec, StdinPolicy,
    ToolCalls, TurnInput, cut, row, str_of, tool_end_row, tool_start_row,
};
use crate::store::events::{EventRow, ToolStartRef};

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
    tools: ToolCalls,
    result: ResultInfo,
}

/// One block of `message.content`, as the mapping reads it.
#[derive(Debug, PartialEq)]
enum Block<'a> {
    /// A text block; true when its `text` is a string.
    Text(bool),
    Thinking,
    ToolUse {
        id: Option<Cow<'a, str>>,
        name: Cow<'a, str>,
        input: Value,
    },
    ToolResult {
        tool_use_id: Option<Cow<'a, str>>,
        is_error: bool,
    },
    Other,
}

impl<'a> Block<'a> {
    /// The full path: a block of a `Value` line.
    fn of_value(b: &'a Value) -> Block<'a> {
        let s = |k: &str| b.get(k).and_then(Value::as_str).map(Cow::Borrowed);
        match b.get("type").and_then(Value::as_str) {
            Some("text") => Block::Text(b.get("text").is_some_and(Value::is_string)),
            Some("thinking") | Some("redacted_thinking") => Block::Thinking,
            Some("tool_use") => Block::ToolUse {
                id: s("id"),
                name: s("name").unwrap_or_default(),
                input: b.get("input").cloned().unwrap_or(Value::Null),
            },
            Some("tool_result") => Block::ToolResult {
                tool_use_id: s("tool_use_id"),
                is_error: b.get("is_error").and_then(Value::as_bool).unwrap_or(false),
            },
            _ => Block::Other,
        }
    }
}

fn content_blocks(obj: &Map<String, Value>) -> impl Iterator<Item = Block<'_>> {
    obj.get("message")
        .and_then(|m| m.get("content"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(Block::of_value)
}

impl ClaudeParser {
    fn allowance(&self) -> u64 {
        self.tools.allowance(TOOL_SLACK_MS)
    }

    /// `assistant`: progress for text, custom/debug for thinking, one
    /// tool_start per tool_use; custom when none of these.
    fn assistant<'b>(
        &mut self,
        blocks: impl Iterator<Item = Block<'b>>,
        line_no: i64,
        rows: &mut Vec<EventRow>,
        facts: &mut LineFacts,
    ) {
        let mut text = false;
        let mut thinking = false;
        let mut tool_rows = Vec::new();
        for b in blocks {
            match b {
                Block::Text(is_text) => text |= is_text,
                Block::Thinking => thinking = true,
                Block::ToolUse { id, name, input } => {
                    let declared = if name == "Bash" {
                        input.get("timeout").and_then(Value::as_u64)
                    } else {
                        None
                    };
                    if let Some(id) = id {
                        let at = ToolStartRef {
                            line_no,
                            nth: tool_rows.len() as u32,
                        };
                        self.tools.start(&id, &name, declared, at);
                    }
                    tool_rows.push(tool_start_row(
                        name.into_owned(),
                        cut(&input.to_string(), 4096),
                    ));
                }
                Block::ToolResult { .. } | Block::Other => {}
            }
        }
        if text {
            rows.push(row("progress", "info"));
        }
        if thinking {
            rows.push(row("custom", "debug"));
        }
        let had_tools = !tool_rows.is_empty();
        rows.extend(tool_rows);
        if !text && !thinking && !had_tools {
            rows.push(row("custom", "info"));
        }
        if had_tools {
            facts.tool_allowance_ms = Some(self.allowance());
        }
    }

    /// `user`: one tool_end per tool_result; custom when there is none.
    fn user<'b>(
        &mut self,
        blocks: impl Iterator<Item = Block<'b>>,
        rows: &mut Vec<EventRow>,
        facts: &mut LineFacts,
    ) {
        let mut any = false;
        for b in blocks {
            let Block::ToolResult {
                tool_use_id,
                is_error,
            } = b
            else {
                continue;
            };
            any = true;
            let call = tool_use_id.and_then(|id| self.tools.finish(&id));
            rows.push(tool_end_row(if is_error { "warn" } else { "info" }, call));
        }
        if any {
            facts.tool_allowance_ms = Some(self.allowance());
        } else {
            rows.push(row("custom", "info"));
        }
    }
}

impl Parser for ClaudeParser {
    fn line(&mut self, line: &Line<'_>, rows: &mut Vec<EventRow>) -> LineFacts {
        let obj = line.obj;
        let mut facts = LineFacts::with_session(obj, "session_id");
        match line.kind {
            "system" => match str_of(obj, "subtype") {
                Some("init") => rows.push(row("session_start", "info")),
                Some("api_retry") => {
                    facts.retry_only = true;
                    rows.push(row("custom", "warn"));
                }
                _ => rows.push(row("custom", "info")),
            },
            "assistant" => self.assistant(content_blocks(obj), line.line_no, rows, &mut facts),
            "user" => self.user(content_blocks(obj), rows, &mut facts),
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

    /// The hot lines — `assistant` and `user` — read without a `Value`
    /// tree: only `type`, `session_id` and `message.content` blocks. Any
    /// line the scanner declines (or that is not hot) is left to the full
    /// path before anything is touched.
    fn fast_line(
        &mut self,
        text: &str,
        line_no: i64,
        rows: &mut Vec<EventRow>,
    ) -> Option<FastLine> {
        let mut hot = Hot::read(text)?;
        let kind = hot.kind?;
        // The last step that may decline, before the parser is touched.
        for b in hot.blocks.iter_mut().flatten() {
            b.read_input()?;
        }
        let blocks = hot.blocks.into_iter().map(BlockFields::into_block);
        let mut facts = LineFacts::session(hot.session_id.as_ref().and_then(Lite::as_str));
        if kind == "assistant" {
            self.assistant(blocks, line_no, rows, &mut facts);
        } else {
            self.user(blocks, rows, &mut facts);
        }
        Some(FastLine { facts, kind })
    }

    fn result(&self) -> ResultInfo {
        self.result.clone()
    }
}

/// The fast reader's view of a line: its hot `type`, its `session_id`, and
/// the blocks of `message.content` when that is an array inside an object
/// (else none, like [`content_blocks`]). Each field is the last of its
/// duplicates, as in `Value`.
struct Hot<'a> {
    kind: Option<&'static str>,
    session_id: Option<Lite<'a>>,
    blocks: Vec<Option<BlockFields<'a>>>,
}

impl<'a> Hot<'a> {
    /// `None`: declined — not valid, not vouched for, or a `type` that is
    /// not a hot one (a later duplicate could make it hot: declining is
    /// always allowed).
    fn read(text: &'a str) -> Option<Hot<'a>> {
        let mut hot = Hot {
            kind: None,
            session_id: None,
            blocks: Vec::new(),
        };
        json::read_object(text, |sc, key| {
            match &*key {
                "type" => {
                    hot.kind = match sc.lite()?.as_str()? {
                        "assistant" => Some("assistant"),
                        "user" => Some("user"),
                        _ => return None,
                    }
                }
                "session_id" => hot.session_id = Some(sc.lite()?),
                "message" => hot.blocks = message_blocks(sc)?,
                _ => return Some(false),
            }
            Some(true)
        })?;
        Some(hot)
    }
}

/// `message`: the blocks of its `content` (none when either is not the
/// expected object / array).
fn message_blocks<'a>(sc: &mut Scanner<'a>) -> Option<Vec<Option<BlockFields<'a>>>> {
    let mut blocks = Vec::new();
    if sc.peek()? != b'{' {
        sc.skip()?;
        return Some(blocks);
    }
    sc.object(|sc, key| {
        if key != "content" {
            return Some(false);
        }
        blocks.clear();
        if sc.peek()? == b'[' {
            sc.array(|sc| {
                blocks.push(BlockFields::read(sc)?);
                Some(())
            })?;
        } else {
            sc.skip()?;
        }
        Some(true)
    })?;
    Some(blocks)
}

/// The fields of one content block the mapping reads (the last of a
/// duplicated key wins, as in `Value`).
#[derive(Default)]
struct BlockFields<'a> {
    kind: Option<Lite<'a>>,
    text_is_str: bool,
    id: Option<Lite<'a>>,
    name: Option<Lite<'a>>,
    /// The text of `input`, read as a `Value` ([`BlockFields::read_input`])
    /// only for a `tool_use` block.
    input: Option<&'a str>,
    input_value: Option<Value>,
    tool_use_id: Option<Lite<'a>>,
    is_error: Option<Lite<'a>>,
}

impl<'a> BlockFields<'a> {
    /// One item of `content`: `Some(None)` when it is not an object.
    fn read(sc: &mut Scanner<'a>) -> Option<Option<BlockFields<'a>>> {
        if sc.peek()? != b'{' {
            sc.skip()?;
            return Some(None);
        }
        let mut b = BlockFields::default();
        sc.object(|sc, key| {
            let slot = match &*key {
                "text" => {
                    b.text_is_str = sc.is_string()?;
                    return Some(true);
                }
                "input" => {
                    b.input = Some(sc.raw()?);
                    return Some(true);
                }
                "type" => &mut b.kind,
                "id" => &mut b.id,
                "name" => &mut b.name,
                "tool_use_id" => &mut b.tool_use_id,
                "is_error" => &mut b.is_error,
                _ => return Some(false),
            };
            *slot = Some(sc.lite()?);
            Some(true)
        })?;
        Some(Some(b))
    }

    /// A `tool_use` block's `input` as a `Value` (`Null` when absent);
    /// `None` only when it does not read (cannot happen for scanned text).
    fn read_input(&mut self) -> Option<()> {
        if self.kind.as_ref().and_then(Lite::as_str) == Some("tool_use") {
            self.input_value = Some(match self.input {
                Some(raw) => serde_json::from_str(raw).ok()?,
                None => Value::Null,
            });
        }
        Some(())
    }

    /// The same decision as [`Block::of_value`] (after [`BlockFields::read_input`]).
    fn into_block(b: Option<BlockFields<'a>>) -> Block<'a> {
        let Some(b) = b else {
            return Block::Other;
        };
        let s = |l: Option<Lite<'a>>| l.and_then(Lite::into_str);
        match b.kind.as_ref().and_then(Lite::as_str) {
            Some("text") => Block::Text(b.text_is_str),
            Some("thinking") | Some("redacted_thinking") => Block::Thinking,
            Some("tool_use") => Block::ToolUse {
                input: b.input_value.unwrap_or(Value::Null),
                id: s(b.id),
                name: s(b.name).unwrap_or_default(),
            },
            Some("tool_result") => Block::ToolResult {
                tool_use_id: s(b.tool_use_id),
                is_error: b.is_error.and_then(|e| e.as_bool()).unwrap_or(false),
            },
            _ => Block::Other,
        }
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

    /// The fast path takes these lines and gives what the full path gives
    /// (several blocks, items that are not objects, duplicated keys, escaped
    /// keys and values); the odd ones at the end it declines.
    #[test]
    fn fast_path_takes_hot_lines_and_agrees() {
        use crate::stream::{Frame, process_line, process_line_full};
        let taken = [
            r#"{"type":"assistant","session_id":"s1","message":{"content":[{"type":"text","text":"a\nb"},1,null,{"type":"thinking"},{"type":"tool_use","id":"t\u0031","name":"Bash","input":{"command":"ls","timeout":60000}},{"type":"tool_use","id":"t2","name":"Read"}]}}"#,
            r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","is_error":true},"x",{"type":"tool_result","tool_use_id":"t2","is_error":1}]},"session_id":5}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":1}],"content":[{"type":"text","text":"b","text":2}]}}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"a"}]},"message":{"content":"no"}}"#,
            r#"{"type":"user","typ\u0065":"assistant","message":[],"session_id":"a","session_id":"b\"c"}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","type":"text","text":"x"}]}}"#,
        ];
        let declined = [
            r#"{"type":"result","is_error":false}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"\ud800"}]}}"#,
            r#"{"type":"assistant","n":1e400}"#,
            r#"{"type":"assistant"} x"#,
            r#"{"message":{}}"#,
        ];
        let (mut fast, mut full) = (ClaudeParser::default(), ClaudeParser::default());
        for (i, line) in taken.iter().chain(&declined).enumerate() {
            let probe = ClaudeParser::default().fast_line(line, 1, &mut Vec::new());
            assert_eq!(probe.is_some(), i < taken.len(), "{line}");
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let fa = process_line(Frame::Line(line.as_bytes()), 1, &mut fast, &mut a);
            let fb = process_line_full(Frame::Line(line.as_bytes()), 1, &mut full, &mut b);
            assert_eq!(fa, fb, "{line}");
            let strip = |rows: &[EventRow]| -> Vec<EventRow> {
                rows.iter()
                    .map(|r| EventRow {
                        tool_duration_ms: r.tool_duration_ms.map(|_| 0),
                        ..r.clone()
                    })
                    .collect()
            };
            assert_eq!(strip(&a), strip(&b), "{line}");
        }
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
