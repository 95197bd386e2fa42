//! What mail looks like to an agent and to a parent: rendering a user turn
//! from `--message` text and claimed mail (SPEC §8), and the `worker_died`
//! message (SPEC §6.3). Pure functions; storing is `store::mail`.

use serde_json::json;

use crate::store::mail::{Message, NewMessage};

/// Separator between the message text and each piece of mail.
pub const SEPARATOR: &str = "\n\n---\n\n";

/// Escapes a header value: `\` → `\\`, `|` → `\|`, CR → `\r`, LF → `\n`.
pub fn escape_header(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One message as the agent reads it.
pub fn render_message(m: &Message) -> String {
    if m.is_nudge() {
        return format!("[NUDGE from {}] {}", escape_header(&m.from_agent), m.body);
    }
    format!(
        "[MAIL] From: {} | Subject: {} | Priority: {}\n\n{}",
        escape_header(&m.from_agent),
        escape_header(&m.subject),
        escape_header(&m.priority),
        m.body
    )
}

/// The user turn: `--message` text first, then each message, joined by
/// [`SEPARATOR`].
pub fn render_turn(message: Option<&str>, mail: &[Message]) -> String {
    let mut parts: Vec<String> = Vec::with_capacity(mail.len() + 1);
    if let Some(t) = message {
        parts.push(t.to_string());
    }
    parts.extend(mail.iter().map(render_message));
    parts.join(SEPARATOR)
}

/// Facts for a `worker_died` message.
pub struct Died<'a> {
    pub agent: &'a str,
    pub capability: &'a str,
    pub task_id: &'a str,
    pub parent: &'a str,
    pub reason: &'a str,
    pub last_activity: &'a str,
    pub turn_id: Option<&'a str>,
}

pub fn worker_died(d: &Died<'_>) -> NewMessage {
    NewMessage {
        from_agent: d.agent.to_string(),
        to_agent: d.parent.to_string(),
        subject: format!("[RUNNER] worker_died: {}", d.agent),
        body: format!(
            "Agent {} (capability {}, task {}) died: {}. Last activity: {}.",
            d.agent,
            d.capability,
            if d.task_id.is_empty() { "-" } else { d.task_id },
            d.reason,
            d.last_activity
        ),
        kind: "worker_died".into(),
        priority: "high".into(),
        thread_id: None,
        payload: Some(
            json!({
                "agentName": d.agent,
                "capability": d.capability,
                "taskId": d.task_id,
                "reason": d.reason,
                "lastActivity": d.last_activity,
                "terminatedBy": "runner",
            })
            .to_string(),
        ),
        turn_id: d.turn_id.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(from: &str, subject: &str, body: &str, payload: Option<&str>) -> Message {
        Message {
            rowid: 1,
            id: "msg-1".into(),
            from_agent: from.into(),
            to_agent: "b".into(),
            subject: subject.into(),
            body: body.into(),
            kind: "status".into(),
            priority: "normal".into(),
            thread_id: None,
            payload: payload.map(str::to_string),
            read: false,
            created_at: String::new(),
            claimed_by: None,
            claimed_at: None,
            tries: 0,
            process_after: None,
            delivered_at: None,
            dead_at: None,
            last_error: None,
            turn_id: None,
        }
    }

    #[test]
    fn renders_and_escapes_headers() {
        let m = msg("lead|x", "a\nb\\c\rd", "body\nstays", None);
        assert_eq!(
            render_message(&m),
            "[MAIL] From: lead\\|x | Subject: a\\nb\\\\c\\rd | Priority: normal\n\nbody\nstays"
        );
    }

    #[test]
    fn message_first_then_mail_then_nudge() {
        let a = msg("lead", "s", "one", None);
        let n = msg(
            "orchestrator",
            "nudge",
            "Check your mail",
            Some(r#"{"kind":"nudge"}"#),
        );
        let t = render_turn(Some("hello"), &[a, n]);
        assert_eq!(
            t,
            "hello\n\n---\n\n[MAIL] From: lead | Subject: s | Priority: normal\n\none\n\n---\n\n[NUDGE from orchestrator] Check your mail"
        );
        assert_eq!(render_turn(Some("only"), &[]), "only");
    }

    #[test]
    fn worker_died_shape() {
        let m = worker_died(&Died {
            agent: "b1",
            capability: "builder",
            task_id: "T-1",
            parent: "lead",
            reason: "stalled",
            last_activity: "2026-11-22T00:00:00.000Z",
            turn_id: None,
        });
        assert_eq!(m.kind, "worker_died");
        assert_eq!(m.priority, "high");
        assert_eq!(m.subject, "[RUNNER] worker_died: b1");
        let p: serde_json::Value = serde_json::from_str(m.payload.as_deref().unwrap()).unwrap();
        assert_eq!(p["terminatedBy"], "runner");
        assert_eq!(p["agentName"], "b1");
    }
}
