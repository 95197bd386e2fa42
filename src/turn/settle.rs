//! Steps 9–10 of a turn (SPEC §6.1): check terminal mail, decide the outcome
//! and write everything it implies in one transaction — the final state by
//! CAS, the claims, `worker_died`, `last_activity`, the turn row — then the
//! `turn_end` event, and release.
//!
//! Invariants: decisions come from `outcome::decide` (pure); every fact the
//! decision rests on is read inside the transaction that writes it; at most
//! one `worker_died` per turn. Non-goal: anything about processes — they are
//! all gone by now.

use std::path::Path;
use std::time::SystemTime;

use crate::store::Db;

use super::TurnSummary;
use super::io::TurnLog;
use super::outcome::{self, Decision, Facts, Outcome, StopReason, decide};
use super::prepare::Turn;
use super::reason::{lost_race, reason_for};
use super::run::Execution;
use crate::capability::Capability;
use crate::claim;
use crate::clock;
use crate::ctx::Ctx;
use crate::error::Result;
use crate::mail::{Died, worker_died};
use crate::runtime::Runtime;
use crate::state::State;
use crate::store::Result as StoreResult;
use crate::store::events::{self, Batch, EventRow};
use crate::store::mail::{self as mailstore, Scope};
use crate::store::sessions::{self, Session};
use crate::store::turns::{self, TurnRow};

/// What the final transaction reads of the turn.
struct Ending<'a> {
    ctx: &'a Ctx,
    session: &'a Session,
    cap: &'a Capability,
    runtime: &'a dyn Runtime,
    start_row: &'a TurnRow,
    baseline: i64,
    log: &'a TurnLog,
    ex: &'a Execution,
    stop_reason: Option<StopReason>,
    /// The CLI's message when it did not know the session to resume.
    unknown_resume: Option<String>,
    now_t: SystemTime,
    now: String,
}

/// Step 9: decide and write, in one transaction; then the `turn_end` event.
/// `metrics`: `metrics.db` if it was opened while the agent ran.
pub fn settle(
    ctx: &Ctx,
    turn: &mut Turn,
    ex: Execution,
    metrics: Option<rusqlite::Connection>,
) -> Result<TurnSummary> {
    let now_t = SystemTime::now();
    let ending = Ending {
        ctx,
        session: &turn.session,
        cap: &turn.cap,
        runtime: turn.runtime.as_ref(),
        start_row: &turn.row,
        baseline: turn.baseline,
        log: &turn.log,
        ex: &ex,
        stop_reason: read_stop_reason(&ctx.root.stop_reason_path(&turn.row.agent_name)),
        unknown_resume: unknown_resume(turn.runtime.as_ref(), &turn.row, &ex),
        now_t,
        now: clock::format_ts(now_t),
    };
    let (decision, final_state, written) = turn
        .store
        .tx("finishing the turn", |tx| write_outcome(tx, &ending))?;
    turn.log.line(format!(
        "outcome {} → state {}",
        decision.outcome.as_str(),
        final_state.as_deref().unwrap_or("unknown")
    ));
    record_turn_end(ctx, turn, &ex, &decision)?;
    if let Some(e) = &ex.internal_error {
        tracing::warn!("turn {}: {e}", turn.turn_id());
    }
    let summary = summary(turn, &decision, written)?;
    if let Some(row) = &summary.turn
        && let Err(e) =
            crate::store::metrics::record_turn_on(metrics, &ctx.root.dir, &turn.session, row)
    {
        // overstory's cost view only: never worth failing a finished turn.
        turn.log.line(format!("metrics.db not updated: {e}"));
    }
    Ok(summary)
}

/// Step 10: remove `turn.pid` and the sweep's note, release the lease (in
/// fleet mode the row first, then the flock). A turn whose lease was lost
/// keeps `turn.pid`: this host's next sweep replays its `stdout.ndjson`
/// into events (SPEC §12.5).
pub fn release(ctx: &Ctx, mut turn: Turn) {
    let lost = turn.fleet.as_ref().is_some_and(|f| f.is_lost());
    if !lost {
        let _ = std::fs::remove_file(ctx.root.pid_path(turn.agent()));
    }
    let _ = std::fs::remove_file(ctx.root.stop_reason_path(turn.agent()));
    if let Some(f) = turn.fleet.take() {
        if let Some(ev) = &turn.events {
            ev.set_fence(None);
        }
        f.release(&turn.store.conn);
    }
    let Turn { store, events, .. } = turn;
    crate::store::close_or_leave(store.conn);
    if let Some(ev) = events {
        crate::store::close_or_leave(ev);
    }
}

fn read_stop_reason(path: &Path) -> Option<StopReason> {
    match std::fs::read_to_string(path).ok()?.trim() {
        "stalled" => Some(StopReason::Stalled),
        "deadline" => Some(StopReason::Deadline),
        _ => None,
    }
}

/// Whether the CLI refused the session it was asked to resume (its message).
fn unknown_resume(runtime: &dyn Runtime, row: &TurnRow, ex: &Execution) -> Option<String> {
    row.resume_requested.as_ref()?;
    runtime.unknown_resume(
        &ex.stderr_tail,
        ex.exit_code,
        ex.stream.result.result_text.as_deref(),
    )
}

/// The one transaction of step 9. Returns the decision, the state now and,
/// when this transaction finished the turn row, the row as written.
fn write_outcome(
    tx: &Db,
    e: &Ending<'_>,
) -> StoreResult<(Decision, Option<String>, Option<TurnRow>)> {
    let agent = e.session.agent_name.as_str();
    let facts = gather_facts(tx, e)?;
    let d = decide(&facts);
    let reason = reason_for(&d, e.ex, e.unknown_resume.as_deref());
    let cfg = &e.ctx.config;
    let settled = claim::settle(
        tx,
        Scope::Turn(&e.start_row.turn_id),
        d.claims,
        e.now_t,
        cfg.max_tries,
        cfg.backoff_base,
        reason.as_deref().unwrap_or(d.outcome.as_str()),
    )?;
    let d = outcome::after_retries(&d, settled.dead > 0);
    if let Some(to) = d.final_state {
        let r = sessions::cas(tx, agent, to, &e.now)?;
        if !r.applied() {
            e.log
                .line(format!("final state {to} lost the race: {}", lost_race(&r)));
        }
    }
    // The conversation to resume: forgotten, the stream's, or unchanged.
    let session_id = if e.unknown_resume.is_some() {
        Some(None)
    } else {
        e.ex.stream.session_id.as_deref().map(Some)
    };
    match session_id {
        Some(id) => sessions::touch_with_session_id(tx, agent, id, &e.now)?,
        None => sessions::touch(tx, agent, &e.now)?,
    }
    let reason = reason_for(&d, e.ex, e.unknown_resume.as_deref());
    tell_the_parent(tx, e, &d, reason.as_deref())?;
    let final_state = sessions::current(tx, agent)?;
    let row = finished_row(tx, e, &d, &facts, reason, final_state.clone())?;
    let written = turns::finish(tx, &row)?.then_some(row);
    crate::fault::hit("during_final_write");
    Ok((d, final_state, written))
}

/// What the outcome table needs, read inside the final transaction.
fn gather_facts(tx: &Db, e: &Ending<'_>) -> StoreResult<Facts> {
    let agent = e.session.agent_name.as_str();
    let ex = e.ex;
    let state_now = sessions::current(tx, agent)?.and_then(|s| State::parse(&s));
    let terminal = mailstore::terminal_since(tx, agent, e.baseline, &e.cap.terminal_mail)?;
    Ok(Facts {
        abort: ex.abort,
        state_now,
        stop_reason: e.stop_reason,
        spawn_failed: ex.spawn_error.is_some(),
        any_event: ex.stream.valid_events > 0,
        exit_code: ex.exit_code,
        signal: ex.signal,
        verdict: ex.stream.verdict,
        terminal_mail: terminal,
        on_idle: e.cap.on_idle,
        unknown_resume: e.unknown_resume.is_some(),
        runner_ended: ex.ended,
    })
}

/// `worker_died` to the parent, when the decision says so and there is one.
fn tell_the_parent(tx: &Db, e: &Ending<'_>, d: &Decision, reason: Option<&str>) -> StoreResult<()> {
    let (Some(why), Some(parent)) = (d.worker_died, e.session.parent_agent.as_deref()) else {
        return Ok(());
    };
    if parent.is_empty() {
        return Ok(());
    }
    let plain =
        matches!(d.outcome, Outcome::Exited | Outcome::Stopped) || why == "retries exhausted";
    let why = match reason {
        Some(r) if !plain => r,
        _ => why,
    };
    let m = worker_died(&Died {
        agent: &e.session.agent_name,
        capability: &e.session.capability,
        task_id: &e.session.task_id,
        parent,
        reason: why,
        last_activity: &e.now,
        turn_id: Some(&e.start_row.turn_id),
    });
    mailstore::insert(tx, &m, &e.now)?;
    Ok(())
}

/// The turn row as it ends.
fn finished_row(
    tx: &Db,
    e: &Ending<'_>,
    d: &Decision,
    facts: &Facts,
    reason: Option<String>,
    final_state: Option<String>,
) -> StoreResult<TurnRow> {
    let (ex, s) = (e.ex, &e.ex.stream);
    let (input_tokens, output_tokens) = turn_tokens(tx, e)?;
    let clean = matches!(
        d.outcome,
        Outcome::Done | Outcome::Exited | Outcome::Waiting
    );
    let show_stderr = s.valid_events == 0 || !clean;
    Ok(TurnRow {
        ended_at: Some(e.now.clone()),
        agent_pid: ex.agent_pid.map(i64::from),
        final_state,
        outcome: Some(d.outcome.as_str().into()),
        reason,
        exit_code: ex.exit_code.map(i64::from),
        signal: ex.signal.map(i64::from),
        clean_result: s.verdict == Some(true),
        terminal_mail_observed: facts.terminal_mail,
        session_id: s.session_id.clone(),
        resume_mismatch: s.resume_mismatch,
        events: (ex.rows_written + 2) as i64,
        lines: s.lines as i64,
        malformed_lines: s.malformed as i64,
        bytes: s.bytes as i64,
        cost_usd: s.result.cost_usd,
        input_tokens,
        output_tokens,
        num_turns: s.result.num_turns,
        result_text: s.result.result_text.clone(),
        stderr_tail: (show_stderr && !ex.stderr_tail.is_empty()).then(|| ex.stderr_tail.clone()),
        leaked: ex.leaked,
        stderr_dropped_bytes: Some(ex.stderr_dropped as i64),
        ..e.start_row.clone()
    })
}

/// This turn's tokens: a runtime reporting session totals has the earlier
/// turns of the session subtracted.
fn turn_tokens(tx: &Db, e: &Ending<'_>) -> StoreResult<(Option<i64>, Option<i64>)> {
    let s = &e.ex.stream;
    let (input, output) = (s.result.input_tokens, s.result.output_tokens);
    match &s.session_id {
        Some(sid) if e.runtime.cumulative_usage() => {
            let (i, o) =
                turns::tokens_before(tx, &e.session.agent_name, sid, &e.start_row.turn_id)?;
            Ok((
                input.map(|t| (t - i).max(0)),
                output.map(|t| (t - o).max(0)),
            ))
        }
        _ => Ok((input, output)),
    }
}

/// The `turn_end` event (best effort, like the runner's own log).
fn record_turn_end(ctx: &Ctx, turn: &mut Turn, ex: &Execution, d: &Decision) -> Result<()> {
    let mut conn = match turn.events.take() {
        Some(c) => c,
        None => ctx.events()?,
    };
    let _ = events::insert_rows(
        &mut conn,
        &turn.tag,
        &Batch {
            created_at: clock::now(),
            session_id: ex.stream.session_id.clone(),
            rows: vec![EventRow {
                event_type: "turn_end",
                level: if d.exit_code == 0 { "info" } else { "warn" },
                data: serde_json::json!({"turn_id": turn.turn_id(), "outcome": d.outcome.as_str(), "exit_code": d.exit_code})
                    .to_string(),
                ..Default::default()
            }],
        },
    );
    turn.events = Some(conn);
    Ok(())
}

/// The turn's summary. Its row is the one this runner wrote when it
/// finished it on SQLite (what a read would return: every column was
/// written from it, and SQLite gives back the same integers, reals and
/// text); on PostgreSQL, or when another process finished it, it is read.
fn summary(turn: &Turn, d: &Decision, written: Option<TurnRow>) -> Result<TurnSummary> {
    let agent = turn.agent();
    let row = match written {
        Some(row) if !turn.store.conn.is_pg() => Some(row),
        _ => turns::get(&turn.store.conn, turn.turn_id())?,
    };
    let message = match row.as_ref().and_then(|r| r.reason.as_deref()) {
        Some(r) => format!("{agent}: {} ({r})", d.outcome.as_str()),
        None => format!("{agent}: {}", d.outcome.as_str()),
    };
    Ok(TurnSummary {
        agent: agent.to_string(),
        turn_id: Some(turn.turn_id().to_string()),
        outcome: Some(d.outcome.as_str()),
        exit_code: d.exit_code,
        nothing_to_deliver: false,
        message,
        turn: row,
    })
}
