//! Reading an agent's stdout (SPEC §6.4): bounded line framing, and the
//! ingest task that turns lines into event rows.
//!
//! Invariants: memory is bounded by the line limit plus one read buffer and
//! the writer's bounded queue, whatever the agent writes; a line over the
//! limit is skipped to its newline and recorded as `oversize_line`; a line
//! that is not UTF-8, not JSON, or not an object with a string `type` is
//! recorded as `malformed_line`; nothing an agent writes can panic the
//! runner. Every stdout byte is teed to `stdout.ndjson` before its rows are
//! queued, one `write(2)` per read, so a runner killed mid-stream leaves
//! every line it received on disk for the sweep to replay. Non-goal: what a
//! line means — that is the runtime's parser.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::progress::Progress;
use crate::runtime::{Line, LineFacts, Parser, ResultInfo};
use crate::store::events::{Batch, EventRow};

/// Longest `data` value stored in `events` (SPEC §2.2).
pub const MAX_DATA: usize = 64 * 1024;

/// One framed piece of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A line without its newline (may be empty).
    Line(&'a [u8]),
    /// A line longer than the limit, skipped: its length in bytes.
    Oversize(u64),
}

/// Splits a byte stream into lines of at most `max` bytes.
pub struct Framer {
    max: usize,
    partial: Vec<u8>,
    /// Bytes of an oversize line skipped so far.
    skipping: Option<u64>,
}

impl Framer {
    pub fn new(max: usize) -> Framer {
        Framer {
            max: max.max(1),
            partial: Vec::new(),
            skipping: None,
        }
    }

    /// Feeds a chunk; calls `f` for every complete frame in it.
    pub fn feed(&mut self, mut chunk: &[u8], mut f: impl FnMut(Frame<'_>)) {
        while !chunk.is_empty() {
            let nl = memchr(b'\n', chunk);
            let (piece, rest, complete) = match nl {
                Some(i) => (&chunk[..i], &chunk[i + 1..], true),
                None => (chunk, &[][..], false),
            };
            chunk = rest;
            if let Some(skipped) = self.skipping.as_mut() {
                *skipped += piece.len() as u64;
                if complete {
                    let n = *skipped;
                    self.skipping = None;
                    f(Frame::Oversize(n));
                }
                continue;
            }
            if self.partial.len() + piece.len() > self.max {
                self.skipping = Some((self.partial.len() + piece.len()) as u64);
                self.partial = Vec::new(); // give the memory back
                if complete {
                    let n = self.skipping.take().unwrap_or(0);
                    f(Frame::Oversize(n));
                }
                continue;
            }
            if complete {
                if self.partial.is_empty() {
                    f(Frame::Line(piece));
                } else {
                    self.partial.extend_from_slice(piece);
                    f(Frame::Line(&self.partial));
                    self.partial.clear();
                }
            } else {
                self.partial.extend_from_slice(piece);
            }
        }
    }

    /// End of stream: a final line without a newline still counts.
    pub fn finish(&mut self, mut f: impl FnMut(Frame<'_>)) {
        if let Some(n) = self.skipping.take() {
            f(Frame::Oversize(n));
        } else if !self.partial.is_empty() {
            let p = std::mem::take(&mut self.partial);
            f(Frame::Line(&p));
        }
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    memchr::memchr(needle, hay)
}

/// Counters and facts of a stream, as the ingest leaves them.
#[derive(Debug, Default, Clone)]
pub struct StreamReport {
    pub lines: u64,
    pub malformed: u64,
    pub bytes: u64,
    pub rows: u64,
    /// Frames seen, empty lines included (the numbering `line_no` uses).
    pub frames: u64,
    pub valid_events: u64,
    pub session_id: Option<String>,
    pub resume_mismatch: bool,
    /// `Some(clean)` once an end-of-turn line arrived (the last one wins).
    pub verdict: Option<bool>,
    pub result: ResultInfo,
    pub eof: bool,
}

/// What the ingest tells the turn loop as it happens.
#[derive(Debug, Clone)]
pub enum Notice {
    /// The first valid event line.
    FirstEvent,
    /// An end-of-turn line (`result`, `turn.completed`, …).
    EndOfTurn,
    /// Something to show a human watching the turn.
    Progress(Progress),
    /// Output can no longer be kept: the events writer stopped, or
    /// `stdout.ndjson` could not be written (`disk_full`: for lack of space).
    OutputLost { disk_full: bool },
}

/// State shared with the watchdog: updated once per read, read when a timer fires.
///
/// The tool allowance holds only while the parser keeps restating it: a line
/// that does not (a skipped oversize or malformed line — maybe the very
/// `tool_result` that ended the tool —, or any line the parser has no tool
/// news for) disarms it, and the plain stall limit applies again. Losing an
/// allowance can at worst stall a turn early; keeping a stale one would let a
/// hung CLI outlive its stall limit by up to the declared timeout (LESSONS 38).
#[derive(Debug)]
pub struct Live {
    origin: Instant,
    last_line_ms: AtomicU64,
    lines: AtomicU64,
    /// Extra stall allowance of the longest declared tool timeout in flight (ms, 0 = none).
    tool_allowance_ms: AtomicU64,
    /// The value of `lines` when the allowance was last set.
    allowance_line: AtomicU64,
}

impl Live {
    pub fn new(origin: Instant) -> Arc<Live> {
        Arc::new(Live {
            origin,
            last_line_ms: AtomicU64::new(0),
            lines: AtomicU64::new(0),
            tool_allowance_ms: AtomicU64::new(0),
            allowance_line: AtomicU64::new(0),
        })
    }

    pub fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        self.last_line_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn last_line_at(&self) -> Instant {
        self.origin + std::time::Duration::from_millis(self.last_line_ms.load(Ordering::Relaxed))
    }

    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// The allowance, if the latest line set (or restated) it.
    pub fn tool_allowance(&self) -> Option<std::time::Duration> {
        let ms = self.tool_allowance_ms.load(Ordering::Acquire);
        if ms == 0 || self.allowance_line.load(Ordering::Acquire) != self.lines() {
            return None;
        }
        Some(std::time::Duration::from_millis(ms))
    }

    pub fn set_tool_allowance(&self, ms: u64) {
        self.allowance_line.store(self.lines(), Ordering::Release);
        self.tool_allowance_ms.store(ms, Ordering::Release);
    }
}

/// Turns one framed line into rows and facts. Pure apart from the parser's
/// state. The parser's fast path reads the hot lines; any other line, and
/// any line the fast path declines, takes the full path (a `Value`).
pub fn process_line(
    frame: Frame<'_>,
    line_no: i64,
    parser: &mut dyn Parser,
    rows: &mut Vec<EventRow>,
) -> Option<LineFacts> {
    read_line(frame, line_no, parser, rows, true)
}

/// [`process_line`] without the fast path: the reference the fast path is
/// proven against (tests/it/props.rs).
pub fn process_line_full(
    frame: Frame<'_>,
    line_no: i64,
    parser: &mut dyn Parser,
    rows: &mut Vec<EventRow>,
) -> Option<LineFacts> {
    read_line(frame, line_no, parser, rows, false)
}

fn read_line(
    frame: Frame<'_>,
    line_no: i64,
    parser: &mut dyn Parser,
    rows: &mut Vec<EventRow>,
    fast: bool,
) -> Option<LineFacts> {
    let raw = match frame {
        Frame::Oversize(bytes) => {
            rows.push(EventRow {
                event_type: "error",
                level: "error",
                data: json!({"type": "oversize_line", "bytes": bytes}).to_string(),
                line_no: Some(line_no),
                ..Default::default()
            });
            return Some(LineFacts {
                malformed: true,
                ..Default::default()
            });
        }
        Frame::Line(raw) => raw,
    };
    if raw.iter().all(|b| b.is_ascii_whitespace()) {
        return None;
    }
    let malformed = |rows: &mut Vec<EventRow>| {
        let prefix = String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned();
        rows.push(EventRow {
            event_type: "error",
            level: "error",
            data: json!({"type": "malformed_line", "prefix": prefix}).to_string(),
            line_no: Some(line_no),
            ..Default::default()
        });
        Some(LineFacts {
            malformed: true,
            ..Default::default()
        })
    };
    let Ok(text) = std::str::from_utf8(raw) else {
        return malformed(rows);
    };
    let start = rows.len();
    if fast && let Some(hot) = parser.fast_line(text, line_no, rows) {
        return Some(finish_rows(
            hot.facts,
            text,
            hot.kind,
            line_no,
            &mut rows[start..],
        ));
    }
    // A lone surrogate escape fails serde_json but not JSON.parse (SPEC
    // §6.4): only then, read the line again with those escapes as U+FFFD.
    let repaired;
    let (text, obj) = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => (text, obj),
        Ok(_) => return malformed(rows),
        Err(_) => match crate::runtime::json::repair_lone_surrogates(text) {
            Some(fixed) => match serde_json::from_str::<Value>(&fixed) {
                Ok(Value::Object(obj)) => {
                    repaired = fixed;
                    (repaired.as_str(), obj)
                }
                _ => return malformed(rows),
            },
            None => return malformed(rows),
        },
    };
    let Some(kind) = obj.get("type").and_then(Value::as_str) else {
        return malformed(rows);
    };
    let line = Line {
        kind,
        obj: &obj,
        line_no,
    };
    let facts = parser.line(&line, rows);
    Some(finish_rows(facts, text, kind, line_no, &mut rows[start..]))
}

/// Gives a valid line's rows their line number and the line as `data`.
fn finish_rows(
    mut facts: LineFacts,
    text: &str,
    kind: &str,
    line_no: i64,
    rows: &mut [EventRow],
) -> LineFacts {
    facts.valid = true;
    let mut wanting = rows.iter().filter(|r| r.data.is_empty()).count();
    let mut data = (wanting > 0).then(|| bounded_data(text, kind));
    for r in rows {
        r.line_no = Some(line_no);
        if r.data.is_empty() {
            wanting -= 1;
            // The last row takes the line itself; earlier ones a copy.
            r.data = if wanting == 0 {
                data.take().unwrap_or_default()
            } else {
                data.clone().unwrap_or_default()
            };
        }
    }
    facts
}

/// The line as `data`, or a marked cut when it is over [`MAX_DATA`].
pub fn bounded_data(text: &str, kind: &str) -> String {
    if text.len() <= MAX_DATA {
        return text.to_string();
    }
    let mut cut = MAX_DATA - 512;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    json!({"type": kind, "truncated": true, "bytes": text.len(), "head": &text[..cut]}).to_string()
}

/// Everything the ingest task needs.
pub struct Ingest {
    pub max_line: usize,
    pub parser: Box<dyn Parser>,
    pub writer: SyncSender<Batch>,
    pub ndjson: Option<File>,
    pub live: Arc<Live>,
    pub notices: mpsc::UnboundedSender<Notice>,
    pub resume_requested: Option<String>,
    pub stop: watch::Receiver<bool>,
    /// First line number (lines before it were already ingested: sweep replay).
    pub first_line_no: i64,
    /// Send [`Notice::Progress`] for text, tools and results.
    pub progress: bool,
    /// The current one-second window of progress lines and how many were shown.
    pub progress_window: Option<(Instant, u32)>,
}

/// Progress lines shown per second at most (the end-of-turn result always shows).
pub const PROGRESS_PER_SECOND: u32 = 20;

/// Reads `stdout` to EOF (or until told to stop) and returns the report.
pub async fn ingest<R: AsyncRead + Unpin>(mut stdout: R, mut ing: Ingest) -> StreamReport {
    let mut rep = StreamReport::default();
    let mut framer = Framer::new(ing.max_line);
    let mut buf = vec![0u8; 64 * 1024];
    let mut line_no = ing.first_line_no;
    // Rows gather across reads and go to the writer when the batch is big or
    // its first row has waited HOLD: an agent that writes line by line
    // (every real CLI, and the fake agent) costs one queue hand-off and one
    // writer wake-up per HOLD, not per line. Every byte is teed on its read
    // all the same, so a runner killed while rows wait loses none of them.
    let mut rows: Vec<EventRow> = Vec::new();
    let mut rows_bytes = 0usize;
    let hold = tokio::time::sleep(HOLD);
    tokio::pin!(hold);
    let mut holding = false;
    loop {
        let n = tokio::select! {
            biased;
            r = stdout.read(&mut buf) => r.unwrap_or(0),
            _ = &mut hold, if holding => {
                flush(&mut ing, &mut rows, &rep);
                rows_bytes = 0;
                holding = false;
                continue;
            }
            _ = ing.stop.changed() => break,
        };
        if n == 0 {
            rep.eof = true;
            framer.finish(|f| {
                line_no += 1;
                handle(f, line_no, &mut ing, &mut rows, &mut rep);
            });
            break;
        }
        let chunk = &buf[..n];
        if let Some(f) = ing.ndjson.as_mut()
            && let Err(e) = f.write_all(chunk)
        {
            ing.ndjson = None; // the log is best effort; events still flow
            if crate::error::disk_trouble(&e) == Some(crate::error::DiskTrouble::Full) {
                let _ = ing.notices.send(Notice::OutputLost { disk_full: true });
            }
        }
        rep.bytes += n as u64;
        framer.feed(chunk, |f| {
            line_no += 1;
            handle(f, line_no, &mut ing, &mut rows, &mut rep);
        });
        rows_bytes += n;
        if rows.len() >= crate::store::events::MAX_ROWS_PER_COMMIT || rows_bytes >= MAX_BATCH_BYTES
        {
            flush(&mut ing, &mut rows, &rep);
            rows_bytes = 0;
            holding = false;
        } else if !holding && !rows.is_empty() {
            hold.as_mut().reset(Instant::now() + HOLD);
            holding = true;
        }
    }
    flush(&mut ing, &mut rows, &rep);
    rep.frames = (line_no - ing.first_line_no) as u64;
    rep
}

/// How long rows may wait in the reader for more to join their batch. With
/// the writer's own 50 ms (`COMMIT_EVERY`), a row is committed well within
/// the 100 ms of SPEC §6 step 6.
pub const HOLD: std::time::Duration = std::time::Duration::from_millis(10);

/// Stdout bytes behind one batch at most (with the writer's queue of 16
/// batches, this bounds the backlog of a fast agent).
const MAX_BATCH_BYTES: usize = 64 * 1024;

fn flush(ing: &mut Ingest, rows: &mut Vec<EventRow>, rep: &StreamReport) {
    if rows.is_empty() {
        return;
    }
    if crate::fault::armed() && rep.lines >= 50 {
        crate::fault::hit("mid_stream");
    }
    let batch = Batch {
        created_at: crate::clock::now(),
        session_id: rep.session_id.clone(),
        // The next batch starts with room for as many rows as this one:
        // no doubling reallocations (each a copy of every row) per batch.
        rows: std::mem::replace(rows, Vec::with_capacity(rows.len())),
    };
    // A full queue blocks this task (backpressure), never drops.
    let sent = match ing.writer.try_send(batch) {
        Ok(()) => true,
        Err(std::sync::mpsc::TrySendError::Full(b)) => {
            tokio::task::block_in_place(|| ing.writer.send(b)).is_ok()
        }
        Err(std::sync::mpsc::TrySendError::Disconnected(_)) => false,
    };
    if !sent {
        // The writer stopped on an error (its own result says which).
        let _ = ing.notices.send(Notice::OutputLost { disk_full: false });
    }
}

fn handle(
    f: Frame<'_>,
    line_no: i64,
    ing: &mut Ingest,
    rows: &mut Vec<EventRow>,
    rep: &mut StreamReport,
) {
    let before = rows.len();
    let Some(facts) = process_line(f, line_no, ing.parser.as_mut(), rows) else {
        return;
    };
    rep.lines += 1;
    ing.live.lines.fetch_add(1, Ordering::Relaxed);
    if !facts.retry_only {
        ing.live.touch(Instant::now());
    }
    if facts.malformed {
        rep.malformed += 1;
    }
    if facts.valid {
        rep.valid_events += 1;
        if rep.valid_events == 1 {
            let _ = ing.notices.send(Notice::FirstEvent);
        }
    }
    if rep.session_id.is_none()
        && let Some(id) = facts.session_id.filter(|s| !s.is_empty())
    {
        if let Some(req) = &ing.resume_requested
            && *req != id
        {
            rep.resume_mismatch = true;
            rows.push(EventRow {
                event_type: "custom",
                level: "warn",
                data: json!({"type": "resume_mismatch", "requested": req, "reported": id})
                    .to_string(),
                line_no: Some(line_no),
                ..Default::default()
            });
        }
        rep.session_id = Some(id);
    }
    if let Some(ms) = facts.tool_allowance_ms {
        ing.live.set_tool_allowance(ms);
    }
    if let Some(clean) = facts.end_of_turn {
        rep.verdict = Some(clean);
        rep.result = ing.parser.result();
        let _ = ing.notices.send(Notice::EndOfTurn);
        if ing.progress {
            let text = rep
                .result
                .result_text
                .as_deref()
                .map(|t| crate::runtime::cut(t, 200));
            let _ = ing
                .notices
                .send(Notice::Progress(Progress::Result { clean, text }));
        }
    }
    if ing.progress && rows.len() > before {
        // A human reads a few lines a second: under a flood, show at most
        // PROGRESS_PER_SECOND lines a second and skip the rest (they are all
        // in `events`); an ordinary turn shows every line.
        let now = Instant::now();
        let (start, shown) = ing.progress_window.get_or_insert((now, 0));
        if now.saturating_duration_since(*start) >= std::time::Duration::from_secs(1) {
            *start = now;
            *shown = 0;
        }
        for r in &rows[before..] {
            if *shown < PROGRESS_PER_SECOND
                && let Some(p) = progress_of(r)
            {
                *shown += 1;
                let _ = ing.notices.send(Notice::Progress(p));
            }
        }
    }
    rep.rows += (rows.len() - before) as u64;
}

/// What a human sees of a row (only computed when someone watches).
fn progress_of(r: &EventRow) -> Option<Progress> {
    let v: Value = serde_json::from_str(&r.data).ok()?;
    match r.event_type {
        "progress" => {
            let texts: Vec<String> = ["message", "content"]
                .iter()
                .try_fold(&v, |v, k| v.get(k))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|b| b.get("text").and_then(Value::as_str).map(str::to_string))
                        .collect()
                })
                .or_else(|| {
                    v.get("text")
                        .and_then(Value::as_str)
                        .map(|t| vec![t.to_string()])
                })
                .or_else(|| {
                    v.get("content")
                        .and_then(Value::as_str)
                        .map(|t| vec![t.to_string()])
                })
                .unwrap_or_default();
            Some(Progress::Text(texts.join(" ")))
        }
        "tool_start" => Some(Progress::Tool(format!(
            "{} {}",
            r.tool_name.as_deref().unwrap_or("tool"),
            crate::runtime::cut(r.tool_args.as_deref().unwrap_or(""), 120)
        ))),
        "tool_end" => Some(Progress::ToolDone {
            name: r.tool_name.clone().unwrap_or_else(|| "tool".into()),
            ms: r.tool_duration_ms,
            error: r.level == "warn",
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut f = Framer::new(max);
        let mut out = Vec::new();
        let mut push = |fr: Frame<'_>| {
            out.push(match fr {
                Frame::Line(l) => format!("L:{}", String::from_utf8_lossy(l)),
                Frame::Oversize(n) => format!("O:{n}"),
            })
        };
        for c in chunks {
            f.feed(c, &mut push);
        }
        f.finish(&mut push);
        out
    }

    #[test]
    fn frames_lines_across_chunks() {
        assert_eq!(
            frames(100, &[b"ab", b"c\nde\n", b"\nf"]),
            ["L:abc", "L:de", "L:", "L:f"]
        );
    }

    #[test]
    fn skips_oversize_lines_to_the_newline() {
        assert_eq!(frames(4, &[b"12345678", b"9\nok\n"]), ["O:9", "L:ok"]);
        assert_eq!(frames(4, &[b"123", b"45\nok"]), ["O:5", "L:ok"]);
        assert_eq!(frames(4, &[b"1234\n"]), ["L:1234"]);
        assert_eq!(frames(4, &[b"123456"]), ["O:6"]);
    }

    #[test]
    fn bounded_data_cuts_and_marks() {
        let long = format!("{{\"type\":\"x\",\"t\":\"{}\"}}", "é".repeat(MAX_DATA));
        let d = bounded_data(&long, "x");
        assert!(d.len() <= MAX_DATA);
        let v: Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["truncated"], true);
    }
}
