//! The dashboard's HTML, its live snapshot and its chart, as pure functions
//! of what the store returned.
//!
//! One model serves both renderers: a table is rows of [`Cell`]s, written
//! here as escaped HTML for the first paint and sent as JSON to the page's
//! script, which fills the same tables with `textContent` only. Invariant:
//! everything an agent wrote (event data, tool arguments, reasons, stderr)
//! reaches the page through [`esc`] or `textContent`, never as markup; the
//! only links are to `/turn/<id>` of ids that passed [`safe_id`]. Non-goal:
//! reading the store (that is `store::views`).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::clock;
use crate::store::events::StoredEvent;
use crate::store::turns::TurnRow;
use crate::store::views::{AgentView, LastEvent, MailCounts, TurnPoint};

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A turn id safe to put in a URL path: what `runner` generates.
pub fn safe_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// At most `max` characters of `s`, with an ellipsis when cut.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// One table cell: text, an optional link to a turn page, a CSS class.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cell {
    pub t: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub c: Option<&'static str>,
}

fn text(t: impl Into<String>) -> Cell {
    Cell {
        t: t.into(),
        ..Cell::default()
    }
}

fn turn_link(id: &str) -> Cell {
    Cell {
        t: id.to_string(),
        h: safe_id(id).then(|| format!("/turn/{id}")),
        c: None,
    }
}

fn outcome_cell(o: Option<&str>) -> Cell {
    let o = o.unwrap_or("");
    Cell {
        t: o.to_string(),
        h: None,
        c: Some(match o {
            "done" | "exited" | "waiting" => "ok",
            "" | "running" | "interrupted" | "stopped" => "muted",
            _ => "bad",
        }),
    }
}

fn money(v: f64) -> String {
    format!("${v:.4}")
}

fn elapsed(from: &str, now: SystemTime) -> String {
    clock::parse_ts(from)
        .and_then(|t| now.duration_since(t).ok())
        .map(|d| clock::human_duration(Duration::from_secs(d.as_secs())))
        .unwrap_or_default()
}

fn took(t: &TurnRow) -> String {
    match (
        clock::parse_ts(&t.started_at),
        t.ended_at.as_deref().and_then(clock::parse_ts),
    ) {
        (Some(a), Some(b)) => b
            .duration_since(a)
            .map(|d| clock::human_duration(Duration::from_millis(d.as_millis() as u64)))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// The readable part of an event's `data`: the `text` strings of an
/// assistant message when there are any, else the data as stored.
pub fn readable(data: &str) -> String {
    fn texts<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("text", serde_json::Value::String(s)) => out.push(s),
                        _ => texts(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| texts(x, out)),
            _ => {}
        }
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
        return data.to_string();
    };
    let mut out = Vec::new();
    texts(&v, &mut out);
    if out.is_empty() {
        data.to_string()
    } else {
        out.join(" ")
    }
}

/// A tool call's arguments as `key: value` lines, strings unquoted (so a
/// command reads as typed); anything else as stored.
pub fn readable_args(args: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(args) {
        Ok(serde_json::Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}: {s}"),
                other => format!("{k}: {other}"),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => args.to_string(),
    }
}

/// What an event says, in a line: type, tool, and the tool's arguments or
/// else the readable part of the data.
pub fn event_summary(e: &LastEvent) -> String {
    let mut s = e.event_type.clone();
    if let Some(t) = &e.tool_name {
        let _ = write!(s, " {t}");
    }
    let what = match (&e.tool_args, &e.data) {
        (Some(a), _) if !a.is_empty() => readable_args(a),
        (_, Some(d)) => readable(d),
        _ => String::new(),
    };
    if !what.is_empty() {
        let _ = write!(s, ": {}", clip(&what, 120));
    }
    s
}

/// The live tables of the dashboard (what the page's script receives).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub agents: Vec<Vec<Cell>>,
    /// Says how many agents are not shown, if any.
    pub agents_note: String,
    pub mail: Vec<Vec<Cell>>,
    pub turns: Vec<Vec<Cell>>,
    /// Changes whenever a turn ends: the page reloads the chart image then.
    pub chart: String,
    pub at: String,
}

pub const AGENT_HEADERS: [&str; 7] = [
    "agent",
    "state",
    "current turn",
    "elapsed",
    "last event",
    "last outcome",
    "cost",
];
pub const MAIL_HEADERS: [&str; 4] = ["due", "claimed", "retrying", "dead"];
pub const TURN_HEADERS: [&str; 7] = [
    "turn", "agent", "started", "took", "outcome", "reason", "cost",
];

pub fn snapshot(
    agents: &[AgentView],
    agents_total: u64,
    mail: MailCounts,
    turns: &[TurnRow],
    now: SystemTime,
) -> Snapshot {
    let agents_note = if (agents.len() as u64) < agents_total {
        format!(
            "{} of {agents_total} agents: those in a turn first, then the most recently active",
            agents.len()
        )
    } else {
        String::new()
    };
    let agents = agents
        .iter()
        .map(|a| {
            let (turn, el) = match &a.current_turn {
                Some((id, started)) => (turn_link(id), text(elapsed(started, now))),
                None => (text(""), text("")),
            };
            let last = a.last_event.as_ref().map(event_summary).unwrap_or_default();
            let mut outcome = outcome_cell(a.last_outcome.as_deref());
            if let Some(r) = &a.last_reason {
                outcome.t = format!("{} ({})", outcome.t, clip(r, 60));
            }
            vec![
                text(&a.name),
                Cell {
                    t: a.state.clone(),
                    h: None,
                    c: Some("state"),
                },
                turn,
                el,
                text(last),
                outcome,
                text(money(a.cost_usd)),
            ]
        })
        .collect();
    let mail = vec![
        [mail.due, mail.claimed, mail.retrying, mail.dead]
            .iter()
            .map(|n| text(n.to_string()))
            .collect(),
    ];
    let chart = turns
        .iter()
        .filter(|t| t.ended_at.is_some())
        .map(|t| t.turn_id.as_str())
        .next()
        .unwrap_or("")
        .to_string();
    let turns = turns
        .iter()
        .map(|t| {
            vec![
                turn_link(&t.turn_id),
                text(&t.agent_name),
                text(t.started_at.get(11..19).unwrap_or(&t.started_at)),
                text(took(t)),
                outcome_cell(
                    t.outcome
                        .as_deref()
                        .or(t.ended_at.is_none().then_some("running")),
                ),
                text(clip(t.reason.as_deref().unwrap_or(""), 120)),
                text(t.cost_usd.map(money).unwrap_or_default()),
            ]
        })
        .collect();
    Snapshot {
        agents,
        agents_note,
        mail,
        turns,
        chart,
        at: clock::format_ts(now),
    }
}

fn table(out: &mut String, id: &str, headers: &[&str], rows: &[Vec<Cell>]) {
    let _ = write!(out, "<table id=\"{id}\"><thead><tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            match c.c {
                Some(class) => {
                    let _ = write!(out, "<td class=\"{}\">", esc(class));
                }
                None => out.push_str("<td>"),
            }
            match &c.h {
                Some(h) => {
                    let _ = write!(out, "<a href=\"{}\">{}</a>", esc(h), esc(&c.t));
                }
                None => out.push_str(&esc(&c.t)),
            }
            out.push_str("</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

fn head(out: &mut String, title: &str) {
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/assets/style.css\"></head><body>",
        esc(title)
    );
}

/// The dashboard: first paint of the live tables, the chart, the script.
pub fn dashboard(s: &Snapshot, root: &str) -> String {
    let mut out = String::new();
    head(&mut out, "runner");
    let _ = write!(
        out,
        "<header><h1>runner</h1><span class=\"root\">{}</span>\
         <span id=\"live\" class=\"muted\">static</span></header><main>",
        esc(root)
    );
    out.push_str("<section><h2>Agents</h2>");
    table(&mut out, "agents", &AGENT_HEADERS, &s.agents);
    let _ = write!(
        out,
        "<p id=\"agents-note\" class=\"muted\">{}</p>",
        esc(&s.agents_note)
    );
    out.push_str("</section><section class=\"row\"><div><h2>Mail</h2>");
    table(&mut out, "mail", &MAIL_HEADERS, &s.mail);
    out.push_str(
        "</div><div><h2>Turns and cost over time</h2>\
         <img id=\"chart\" src=\"/chart.svg\" alt=\"turns and cost over time\" width=\"560\" height=\"140\"></div></section>",
    );
    out.push_str("<section><h2>Recent turns</h2>");
    table(&mut out, "turns", &TURN_HEADERS, &s.turns);
    let _ = write!(
        out,
        "</section></main><footer>updated <span id=\"at\">{}</span> · <a href=\"/metrics\">/metrics</a></footer>\
         <script src=\"/assets/app.js\"></script></body></html>",
        esc(&s.at)
    );
    out
}

/// A turn's page: its row, its event timeline and its stderr tail.
pub fn turn_page(t: &TurnRow, events: &[StoredEvent], shown_limit: usize, stderr: &str) -> String {
    let mut out = String::new();
    head(&mut out, &format!("turn {}", t.turn_id));
    let _ = write!(
        out,
        "<header><h1><a href=\"/\">runner</a> / {} / {}</h1></header><main><section><dl class=\"facts\">",
        esc(&t.agent_name),
        esc(&t.turn_id)
    );
    let facts: [(&str, String); 10] = [
        (
            "outcome",
            t.outcome.clone().unwrap_or_else(|| "running".into()),
        ),
        ("reason", t.reason.clone().unwrap_or_default()),
        ("started", t.started_at.clone()),
        ("ended", t.ended_at.clone().unwrap_or_default()),
        ("took", took(t)),
        (
            "exit code",
            t.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        ),
        (
            "lines / events / malformed",
            format!("{} / {} / {}", t.lines, t.events, t.malformed_lines),
        ),
        ("cost", t.cost_usd.map(money).unwrap_or_default()),
        (
            "tokens in / out",
            format!(
                "{} / {}",
                t.input_tokens.unwrap_or(0),
                t.output_tokens.unwrap_or(0)
            ),
        ),
        ("result", clip(t.result_text.as_deref().unwrap_or(""), 400)),
    ];
    for (k, v) in facts {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(&v));
    }
    out.push_str("</dl></section><section><h2>Timeline</h2>");
    let rows: Vec<Vec<Cell>> = events
        .iter()
        .map(|e| {
            let what = match (&e.tool_args, &e.data) {
                (Some(a), _) if !a.is_empty() => clip(&readable_args(a), 400),
                (_, Some(d)) => clip(&readable(d), 400),
                _ => String::new(),
            };
            vec![
                text(e.created_at.get(11..23).unwrap_or(&e.created_at)),
                text(&e.event_type),
                text(e.tool_name.clone().unwrap_or_default()),
                text(
                    e.tool_duration_ms
                        .map(|d| format!("{d} ms"))
                        .unwrap_or_default(),
                ),
                Cell {
                    t: e.level.clone(),
                    h: None,
                    c: Some(if e.level == "error" { "bad" } else { "muted" }),
                },
                Cell {
                    t: what,
                    h: None,
                    c: Some("data"),
                },
            ]
        })
        .collect();
    table(
        &mut out,
        "events",
        &[
            "time",
            "event",
            "tool",
            "duration",
            "level",
            "text / arguments",
        ],
        &rows,
    );
    if events.len() >= shown_limit {
        let _ = write!(
            out,
            "<p class=\"muted\">the last {shown_limit} events are shown (<code>runner events --turn {}</code> lists all)</p>",
            esc(&t.turn_id)
        );
    }
    let _ = write!(
        out,
        "</section><section><h2>stderr (tail)</h2><pre id=\"stderr\">{}</pre></section></main></body></html>",
        esc(stderr)
    );
    out
}

/// A small bar chart of turns (bars) and cost (line) over time, as SVG with
/// no text from agents in it.
pub fn chart_svg(points: &[TurnPoint], now: SystemTime) -> String {
    const W: f64 = 560.0;
    const H: f64 = 140.0;
    const BUCKETS: usize = 40;
    let times: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| {
            clock::parse_ts(&p.ended_at).map(|t| (clock::epoch_ms(t) as f64 / 1000.0, p.cost_usd))
        })
        .collect();
    let end = clock::epoch_ms(now) as f64 / 1000.0;
    let start = times
        .first()
        .map(|t| t.0)
        .unwrap_or(end - 60.0)
        .min(end - 60.0);
    let width = (end - start) / BUCKETS as f64;
    let mut turns = [0u64; BUCKETS];
    let mut cost = [0f64; BUCKETS];
    for (t, c) in &times {
        let i = (((t - start) / width) as usize).min(BUCKETS - 1);
        turns[i] += 1;
        cost[i] += c;
    }
    let max_turns = turns.iter().copied().max().unwrap_or(0).max(1) as f64;
    let max_cost = cost.iter().copied().fold(0.0, f64::max);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">\
         <rect width=\"{W}\" height=\"{H}\" fill=\"#fafafa\" stroke=\"#ddd\"/>"
    );
    let plot_h = H - 30.0;
    let bar_w = W / BUCKETS as f64;
    for (i, n) in turns.iter().enumerate() {
        if *n > 0 {
            let h = plot_h * *n as f64 / max_turns;
            let _ = write!(
                out,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#4a7bd0\"/>",
                i as f64 * bar_w + 1.0,
                10.0 + plot_h - h,
                bar_w - 2.0
            );
        }
    }
    if max_cost > 0.0 {
        let mut acc = 0.0;
        let total: f64 = cost.iter().sum();
        let pts: Vec<String> = cost
            .iter()
            .enumerate()
            .map(|(i, c)| {
                acc += c;
                format!(
                    "{:.1},{:.1}",
                    (i as f64 + 1.0) * bar_w,
                    10.0 + plot_h - plot_h * acc / total
                )
            })
            .collect();
        let _ = write!(
            out,
            "<polyline points=\"0,{:.1} {}\" fill=\"none\" stroke=\"#d0704a\" stroke-width=\"2\"/>",
            10.0 + plot_h,
            pts.join(" ")
        );
    }
    let total_cost: f64 = cost.iter().sum();
    let _ = write!(
        out,
        "<text x=\"6\" y=\"{:.0}\" font-family=\"sans-serif\" font-size=\"11\" fill=\"#555\">\
         {} turns in the last {} (bars, max {} per {}); cost {} (line, cumulative)</text></svg>",
        H - 6.0,
        times.iter().filter(|t| t.0 >= start).count(),
        clock::human_duration(Duration::from_secs((end - start) as u64)),
        max_turns as u64,
        clock::human_duration(Duration::from_secs(width.max(1.0) as u64)),
        money(total_cost),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>";

    #[test]
    fn agent_text_is_escaped_everywhere() {
        let a = AgentView {
            name: "a".into(),
            state: "working".into(),
            current_turn: Some(("t1".into(), clock::now())),
            last_event: Some(LastEvent {
                event_type: "text".into(),
                tool_name: Some(HOSTILE.into()),
                tool_args: Some(HOSTILE.into()),
                data: Some(HOSTILE.into()),
            }),
            last_reason: Some(HOSTILE.into()),
            last_outcome: Some("failed".into()),
            ..AgentView::default()
        };
        let t = TurnRow {
            turn_id: "\"><script>x</script>".into(),
            agent_name: "a".into(),
            started_at: clock::now(),
            reason: Some(HOSTILE.into()),
            ..TurnRow::default()
        };
        let s = snapshot(
            &[a],
            3,
            MailCounts::default(),
            std::slice::from_ref(&t),
            SystemTime::now(),
        );
        let html = dashboard(&s, HOSTILE);
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img"));
        // A turn id that is not safe gets no link.
        assert!(s.turns[0][0].h.is_none());
        assert!(
            s.agents_note.starts_with("1 of 3 agents"),
            "{}",
            s.agents_note
        );
        let e = StoredEvent {
            id: 1,
            run_id: None,
            agent_name: "a".into(),
            session_id: None,
            event_type: "tool_use".into(),
            tool_name: Some(HOSTILE.into()),
            tool_args: Some(HOSTILE.into()),
            tool_duration_ms: Some(5),
            level: "info".into(),
            data: None,
            created_at: clock::now(),
            turn_id: None,
            line_no: None,
        };
        let page = turn_page(&t, &[e], 10, HOSTILE);
        assert!(!page.contains("<script>"), "{page}");
        assert!(!page.contains("<img"), "{page}");
    }

    #[test]
    fn readable_text_of_a_message() {
        let d = r#"{"message":{"content":[{"text":"hello","type":"text"},{"text":"world"}]}}"#;
        assert_eq!(readable(d), "hello world");
        assert_eq!(readable(r#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(readable("not json <b>"), "not json <b>");
        assert_eq!(
            readable_args(r#"{"command":"ls \"x\"","n":1}"#),
            "command: ls \"x\"\nn: 1"
        );
    }

    #[test]
    fn clip_cuts_on_characters() {
        assert_eq!(clip("héllo", 2), "hé…");
        assert_eq!(clip("hi", 2), "hi");
    }

    #[test]
    fn chart_counts_turns() {
        let now = SystemTime::now();
        let p = |s: u64, c: f64| TurnPoint {
            ended_at: clock::format_ts(now - Duration::from_secs(s)),
            cost_usd: c,
        };
        let svg = chart_svg(&[p(30, 0.5), p(20, 0.25), p(1, 0.0)], now);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("3 turns"), "{svg}");
        assert!(svg.contains("$0.7500"), "{svg}");
        assert!(chart_svg(&[], now).contains("0 turns"));
    }
}
