//! `runner fake-agent` (SPEC §11): a test double that speaks Claude's
//! stream-json protocol, built into the binary so the demo and the tests
//! need nothing installed.
//!
//! It reads the user turn from stdin to EOF (unless told to write first),
//! then plays a scenario: steps from a TOML file under `fixtures/`, or built
//! from flags. It can misbehave in every way the runner must survive:
//! silence, ignoring SIGTERM, grandchildren holding stdout (same group or a
//! new session), oversize, invalid and garbage lines, crashes and signals.
//! Non-goal: realism beyond the line shapes the runner reads.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use serde_json::json;

use crate::os;

#[derive(Debug, Args, Clone, Default)]
pub struct FakeArgs {
    /// A TOML scenario file (`[[step]]` tables); flags add steps around it.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// The built-in demo scenario.
    #[arg(long)]
    pub demo: bool,
    /// Assistant text lines to write.
    #[arg(long, default_value_t = 1)]
    pub lines: u64,
    /// Approximate bytes per text line.
    #[arg(long, default_value_t = 200)]
    pub line_bytes: usize,
    /// Lines per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// A tool_use/tool_result pair after every N text lines (0 = none).
    #[arg(long, default_value_t = 0)]
    pub tool_every: u64,
    /// Write this NDJSON file verbatim.
    #[arg(long)]
    pub emit: Option<PathBuf>,
    /// Send mail of this type (e.g. worker_done) with `runner mail send`.
    #[arg(long)]
    pub mail: Option<String>,
    #[arg(long, default_value = "orchestrator")]
    pub mail_to: String,
    /// ok, error or none (no end-of-turn line).
    #[arg(long, default_value = "ok")]
    pub result: String,
    /// Go silent forever before the result.
    #[arg(long)]
    pub stall: bool,
    /// Be silent this long before the result.
    #[arg(long, default_value_t = 0)]
    pub silent_ms: u64,
    #[arg(long)]
    pub ignore_term: bool,
    /// Leave a grandchild holding stdout: group or session.
    #[arg(long)]
    pub grandchild: Option<String>,
    #[arg(long, default_value_t = 300)]
    pub grandchild_secs: u64,
    /// Write one line of this many bytes.
    #[arg(long)]
    pub oversize: Option<usize>,
    #[arg(long)]
    pub invalid_utf8: bool,
    #[arg(long)]
    pub garbage: bool,
    /// A Bash tool_use declaring this timeout (ms), then silence.
    #[arg(long)]
    pub tool_timeout_ms: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub tool_silence_ms: u64,
    #[arg(long, default_value_t = 0)]
    pub exit: i32,
    /// Die by this signal at the end.
    #[arg(long)]
    pub signal: Option<String>,
    /// Report this session id instead of the resumed/new one.
    #[arg(long)]
    pub session_id: Option<String>,
    /// Write this many bytes of output before reading stdin.
    #[arg(long, default_value_t = 0)]
    pub write_before_read: usize,
    /// Append what was received (stdin, args, RUNNER_* env) as one JSON line.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Print this on stderr first.
    #[arg(long)]
    pub stderr: Option<String>,
    /// Write no `system/init` line.
    #[arg(long)]
    pub no_init: bool,
    /// Fail (error result, exit 1) on the first N runs, counted in --counter.
    #[arg(long, default_value_t = 0)]
    pub fail_times: u64,
    #[arg(long)]
    pub counter: Option<PathBuf>,
    /// Ignore RUNNER_RESUME_SESSION_ID: report a new session id every turn.
    #[arg(long)]
    pub fresh_session: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    Init,
    Text {
        text: String,
    },
    Lines {
        n: u64,
        bytes: usize,
        rate: f64,
        tool_every: u64,
    },
    Tool {
        name: String,
        command: String,
        output: String,
        timeout_ms: Option<u64>,
        silence_ms: Option<u64>,
    },
    Emit {
        file: PathBuf,
    },
    Mail {
        kind: String,
        to: String,
        subject: Option<String>,
        body: Option<String>,
    },
    Sleep {
        ms: u64,
    },
    Stall,
    IgnoreTerm,
    Grandchild {
        mode: String,
        secs: u64,
    },
    Oversize {
        bytes: usize,
    },
    InvalidUtf8,
    Garbage {
        text: String,
    },
    Stderr {
        text: String,
    },
    Result {
        ok: bool,
        text: Option<String>,
    },
    Exit {
        code: i32,
    },
    Signal {
        name: String,
    },
}

#[derive(Debug, Deserialize)]
struct ScenarioFile {
    step: Vec<Step>,
}

pub const DEMO_SCENARIO: &str = include_str!("../fixtures/scenarios/demo.toml");

struct Out {
    session: String,
    n: u64,
}

impl Out {
    fn write(&mut self, line: &[u8]) {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&buf);
        let _ = out.flush();
    }

    fn json(&mut self, v: serde_json::Value) {
        self.n += 1;
        self.write(v.to_string().as_bytes());
    }

    fn text(&mut self, text: &str) {
        let id = format!("msg_fake_{}", self.n);
        let s = self.session.clone();
        self.json(json!({"type":"assistant","message":{"id":id,"type":"message","role":"assistant","model":"fake","content":[{"type":"text","text":text}],"stop_reason":null,"usage":{"input_tokens":10,"output_tokens":20}},"parent_tool_use_id":null,"session_id":s}));
    }

    fn tool(&mut self, name: &str, command: &str, timeout_ms: Option<u64>) -> String {
        let id = format!("toolu_fake_{}", self.n);
        let mut input = json!({"command": command, "description": "fake tool"});
        if let Some(t) = timeout_ms {
            input["timeout"] = json!(t);
        }
        let s = self.session.clone();
        self.json(json!({"type":"assistant","message":{"id":format!("msg_fake_{}", self.n),"type":"message","role":"assistant","model":"fake","content":[{"type":"tool_use","id":id,"name":name,"input":input}],"stop_reason":null},"parent_tool_use_id":null,"session_id":s}));
        id
    }

    fn tool_result(&mut self, id: &str, output: &str) {
        let s = self.session.clone();
        self.json(json!({"type":"user","message":{"role":"user","content":[{"tool_use_id":id,"type":"tool_result","content":output,"is_error":false}]},"parent_tool_use_id":null,"session_id":s}));
    }
}

fn steps_from_flags(a: &FakeArgs) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    if a.ignore_term {
        steps.push(Step::IgnoreTerm);
    }
    if let Some(m) = &a.grandchild {
        steps.push(Step::Grandchild {
            mode: m.clone(),
            secs: a.grandchild_secs,
        });
    }
    if let Some(t) = &a.stderr {
        steps.push(Step::Stderr { text: t.clone() });
    }
    if a.demo || a.scenario.is_some() {
        let text = match &a.scenario {
            Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
            None => DEMO_SCENARIO.to_string(),
        };
        let f: ScenarioFile =
            toml::from_str(&text).map_err(|e| format!("scenario: {}", e.message()))?;
        steps.extend(f.step);
        return Ok(steps);
    }
    if !a.no_init {
        steps.push(Step::Init);
    }
    if a.lines > 0 {
        steps.push(Step::Lines {
            n: a.lines,
            bytes: a.line_bytes,
            rate: a.rate,
            tool_every: a.tool_every,
        });
    }
    if let Some(f) = &a.emit {
        steps.push(Step::Emit { file: f.clone() });
    }
    if a.garbage {
        steps.push(Step::Garbage {
            text: "this is not json".into(),
        });
    }
    if a.invalid_utf8 {
        steps.push(Step::InvalidUtf8);
    }
    if let Some(n) = a.oversize {
        steps.push(Step::Oversize { bytes: n });
    }
    if let Some(t) = a.tool_timeout_ms {
        steps.push(Step::Tool {
            name: "Bash".into(),
            command: "sleep 1000".into(),
            output: "done".into(),
            timeout_ms: Some(t),
            silence_ms: Some(a.tool_silence_ms),
        });
    }
    if let Some(k) = &a.mail {
        steps.push(Step::Mail {
            kind: k.clone(),
            to: a.mail_to.clone(),
            subject: None,
            body: None,
        });
    }
    if a.silent_ms > 0 {
        steps.push(Step::Sleep { ms: a.silent_ms });
    }
    if a.stall {
        steps.push(Step::Stall);
    }
    let mut result = a.result.as_str();
    let mut exit = a.exit;
    if a.fail_times > 0
        && let Some(c) = &a.counter
    {
        let n: u64 = std::fs::read_to_string(c)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
            + 1;
        let _ = std::fs::write(c, n.to_string());
        if n <= a.fail_times {
            result = "error";
            exit = 1;
        }
    }
    match result {
        "ok" => steps.push(Step::Result {
            ok: true,
            text: Some("fake turn done".into()),
        }),
        "error" => steps.push(Step::Result {
            ok: false,
            text: Some("fake error".into()),
        }),
        "none" => {}
        other => return Err(format!("--result {other}: expected ok, error or none")),
    }
    if let Some(s) = &a.signal {
        steps.push(Step::Signal { name: s.clone() });
    }
    steps.push(Step::Exit { code: exit });
    Ok(steps)
}

/// Runs the fake agent; returns its exit code.
pub fn run(a: FakeArgs) -> i32 {
    let steps = match steps_from_flags(&a) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-agent: {e}");
            return 2;
        }
    };
    let session = a
        .session_id
        .clone()
        .or_else(|| {
            std::env::var("RUNNER_RESUME_SESSION_ID")
                .ok()
                .filter(|_| !a.fresh_session)
        })
        .unwrap_or_else(os::uuid_v4);
    let mut out = Out { session, n: 0 };
    if a.write_before_read > 0 {
        let mut left = a.write_before_read;
        while left > 0 {
            let n = left.min(1000);
            out.text(&"w".repeat(n.saturating_sub(200).max(1)));
            left = left.saturating_sub(n);
        }
    }
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    if let Some(p) = &a.record {
        let env: serde_json::Map<String, serde_json::Value> = std::env::vars()
            .filter(|(k, _)| k.starts_with("RUNNER_") || k.starts_with("OVERSTORY_"))
            .map(|(k, v)| (k, json!(v)))
            .collect();
        let rec = json!({"stdin": String::from_utf8_lossy(&stdin), "args": std::env::args().collect::<Vec<_>>(), "env": env, "cwd": std::env::current_dir().ok()});
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            let _ = writeln!(f, "{rec}");
        }
    }
    for step in steps {
        if let Some(code) = play(&mut out, step) {
            return code;
        }
    }
    0
}

fn play(out: &mut Out, step: Step) -> Option<i32> {
    match step {
        Step::Init => {
            let s = out.session.clone();
            let cwd = std::env::current_dir()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            out.json(json!({"type":"system","subtype":"init","cwd":cwd,"session_id":s,"tools":["Bash"],"model":"fake","permissionMode":"bypassPermissions","claude_code_version":"fake"}));
        }
        Step::Text { text } => out.text(&text),
        Step::Lines {
            n,
            bytes,
            rate,
            tool_every,
        } => {
            let filler = "lorem ipsum dolor sit amet ".repeat(bytes / 27 + 1);
            let text = &filler[..bytes.saturating_sub(330).max(8).min(filler.len())];
            let gap = if rate > 0.0 {
                Some(Duration::from_secs_f64(1.0 / rate))
            } else {
                None
            };
            for i in 1..=n {
                out.text(text);
                if tool_every > 0 && i % tool_every == 0 {
                    let id = out.tool("Bash", "echo fake", None);
                    out.tool_result(&id, "fake");
                }
                if let Some(g) = gap {
                    std::thread::sleep(g);
                }
            }
        }
        Step::Tool {
            name,
            command,
            output,
            timeout_ms,
            silence_ms,
        } => {
            let id = out.tool(&name, &command, timeout_ms);
            if let Some(ms) = silence_ms {
                std::thread::sleep(Duration::from_millis(ms));
            }
            out.tool_result(&id, &output);
        }
        Step::Emit { file } => match std::fs::read(&file) {
            Ok(bytes) => {
                for line in bytes.split_inclusive(|&b| b == b'\n') {
                    let line = line.strip_suffix(b"\n").unwrap_or(line);
                    out.write(line);
                }
            }
            Err(e) => eprintln!("fake-agent: {}: {e}", file.display()),
        },
        Step::Mail {
            kind,
            to,
            subject,
            body,
        } => {
            let from = std::env::var("RUNNER_AGENT_NAME").unwrap_or_else(|_| "fake".into());
            let exe = std::env::current_exe().unwrap_or_else(|_| "runner".into());
            let st = std::process::Command::new(exe)
                .args([
                    "mail", "send", "--from", &from, "--to", &to, "--type", &kind,
                ])
                .args(["--subject", subject.as_deref().unwrap_or("done")])
                .args([
                    "--body",
                    body.as_deref().unwrap_or("fake agent finished its work"),
                    "--force",
                ])
                .stdout(std::process::Stdio::null())
                .status();
            match st {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!("fake-agent: runner mail send failed: {s}"),
                Err(e) => eprintln!("fake-agent: runner mail send failed: {e}"),
            }
        }
        Step::Sleep { ms } => std::thread::sleep(Duration::from_millis(ms)),
        Step::Stall => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Step::IgnoreTerm => os::ignore_sigterm(),
        Step::Grandchild { mode, secs } => {
            let mut cmd = std::process::Command::new("sleep");
            cmd.arg(secs.to_string()).stdin(std::process::Stdio::null());
            let r = match mode.as_str() {
                "session" => os::spawn_in_new_session(&mut cmd),
                _ => cmd.spawn(),
            };
            if let Err(e) = r {
                eprintln!("fake-agent: grandchild: {e}");
            }
        }
        Step::Oversize { bytes } => {
            let mut line = b"{\"type\":\"assistant\",\"pad\":\"".to_vec();
            line.resize(bytes.saturating_sub(2).max(line.len()), b'x');
            line.extend_from_slice(b"\"}");
            out.write(&line);
        }
        Step::InvalidUtf8 => out.write(b"{\"type\":\"assistant\",\"bad\":\"\xff\xfe\xfd\"}"),
        Step::Garbage { text } => out.write(text.as_bytes()),
        Step::Stderr { text } => {
            eprintln!("{text}");
        }
        Step::Result { ok, text } => {
            let s = out.session.clone();
            let mut v = json!({"type":"result","subtype": if ok {"success"} else {"error_during_execution"},"is_error":!ok,"duration_ms":1,"num_turns":1,"session_id":s,"total_cost_usd":0.0012,"usage":{"input_tokens":100,"output_tokens":50}});
            if let Some(t) = text {
                v["result"] = json!(t);
            }
            out.json(v);
        }
        Step::Exit { code } => return Some(code),
        Step::Signal { name } => {
            if let Some(sig) = os::parse_signal(&name) {
                os::raise(sig);
                std::thread::sleep(Duration::from_secs(1));
            }
            return Some(128);
        }
    }
    None
}
