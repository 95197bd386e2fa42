//! One turn of one agent, end to end (SPEC §6.1). [`run`] reads like the
//! spec's steps, one module each:
//!
//! 1–4. [`prepare`]: check, work out the input, take the lease and reclaim,
//!      claim the mail and record the start;
//! 5–8. [`run`](run::run): spawn, stream, watch, escalate, reap;
//! 9–10. [`settle`]: decide ([`outcome`], pure) and write in one
//!      transaction, then release.
//!
//! Invariants: every path — spawn failure, database error, signal, panic in
//! a task — ends with no live process of the turn, no `turn.pid`, the lease
//! released, and the turn row finished (or left unfinished only for the
//! sweep to finish when the runner itself dies). Decisions are made by
//! `outcome::decide`; these modules gather facts and execute.

mod io;
pub mod outcome;
mod prepare;
mod reason;
mod run;
mod settle;
pub mod stderr;

use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::capability::{self, Capability};
use crate::clock;
use crate::ctx::Ctx;
use crate::error::{Error, Result, usage};
use crate::os;
use crate::root::check_name;
use crate::state::State;
use crate::store::sessions::{self, Session};
use crate::store::turns::TurnRow;
use prepare::Prepared;

pub use crate::progress::{Progress, ProgressFn};
pub use reason::stderr_headline;

/// At most this many messages are delivered by one turn.
pub const MAX_MAIL_PER_TURN: i64 = 50;
/// How often `last_activity` is refreshed while lines arrive.
pub const ACTIVITY_EVERY: Duration = Duration::from_secs(2);

/// What the operator (or serve) asks of a running turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortRequest {
    None,
    /// Abort with the grace periods (first SIGINT/SIGTERM, serve shutdown, stop).
    Graceful,
    /// Kill at once (a second signal).
    Kill,
}

#[derive(Clone, Default)]
pub struct TurnRequest {
    pub agent: String,
    pub message: Option<String>,
    pub no_mail: bool,
    pub wait: Duration,
    pub stall: Option<Duration>,
    pub grace: Option<Duration>,
    pub deadline: Option<Duration>,
    pub progress: Option<ProgressFn>,
    /// An agent found `completed` or `zombie` is "nothing to deliver", not
    /// an error (`serve`: another host may have finished it since it looked).
    pub finished_is_nothing: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TurnSummary {
    pub agent: String,
    pub turn_id: Option<String>,
    pub outcome: Option<&'static str>,
    pub exit_code: i32,
    pub nothing_to_deliver: bool,
    pub message: String,
    pub turn: Option<TurnRow>,
}

impl TurnSummary {
    fn interrupted_waiting(agent: &str) -> TurnSummary {
        TurnSummary {
            agent: agent.to_string(),
            turn_id: None,
            outcome: None,
            exit_code: 130,
            nothing_to_deliver: false,
            message: format!(
                "interrupted while waiting for the lease of {agent}; no turn was started"
            ),
            turn: None,
        }
    }

    fn nothing(agent: &str) -> TurnSummary {
        TurnSummary {
            agent: agent.to_string(),
            turn_id: None,
            outcome: None,
            exit_code: 0,
            nothing_to_deliver: true,
            message: format!("nothing to deliver to {agent}: no message and no due mail"),
            turn: None,
        }
    }
}

/// Reads the agent and refuses what cannot run (SPEC §6.1 step 1).
pub fn load_runnable(
    ctx: &Ctx,
    store: &crate::store::Store,
    agent: &str,
) -> Result<(Session, Capability)> {
    check_name(agent)?;
    let s = sessions::get(&store.conn, agent)?.ok_or_else(|| {
        usage(format!(
            "unknown agent '{agent}'; register it first: runner agent add {agent} --capability builder"
        ))
    })?;
    crate::hosts::check_pinned(ctx, store, agent)?; // SPEC §12.2: before the state
    refuse_finished(&s)?;
    let cap = capability::load(&ctx.root.dir, &s.capability)?;
    Ok((s, cap))
}

fn refuse_finished(s: &Session) -> Result<()> {
    if s.state().is_some_and(State::is_finished) {
        return Err(usage(format!(
            "agent {} is {}; to run it again: runner agent add {} --capability {} --recover",
            s.agent_name, s.state, s.agent_name, s.capability
        )));
    }
    Ok(())
}

/// A turn id: sorts by start time.
pub fn new_turn_id() -> String {
    let ts = clock::now().replace(['-', ':', '.'], "");
    format!("{ts}-{}", os::random_alnum(6))
}

/// Runs one turn (SPEC §6.1). `abort` carries stop/interrupt requests.
pub async fn run(
    ctx: &Ctx,
    req: TurnRequest,
    mut abort: watch::Receiver<AbortRequest>,
) -> Result<TurnSummary> {
    let mut turn = match prepare::prepare(ctx, &req, &mut abort).await? {
        Prepared::Turn(t) => t,
        Prepared::Early(summary) => return Ok(*summary),
    };
    let ex = run::run(ctx, &req, &mut turn, abort).await;
    // Fleet mode: a lost lease ends the turn here — another host repairs
    // (or has repaired) its row and claims; this runner writes nothing more.
    if ex.lease_lost || turn.fleet.as_ref().is_some_and(|f| f.is_lost()) {
        turn.log
            .line("lease lost: the turn's processes are dead; exiting 75 without writing its end");
        let e = Error::LeaseLost {
            agent: turn.agent().to_string(),
            turn_id: turn.turn_id().to_string(),
            detail: "not renewed before it expired, or taken over".into(),
        };
        settle::release(ctx, *turn);
        return Err(e);
    }
    // 9. Decide and write — unless the disk is full: then nothing more can be
    // written, the turn's processes are already dead, and its row stays open
    // for `runner sweep` to finish and replay.
    let summary = if ex.disk_full {
        turn.log
            .line("disk full: the turn's processes were killed; free space, then run runner sweep");
        Err(Error::DiskFull {
            root: ctx.root.dir.display().to_string(),
        })
    } else {
        let metrics = match turn.metrics.take() {
            Some(h) => h.await.ok().flatten(),
            None => None,
        };
        settle::settle(ctx, &mut turn, ex, metrics)
    };
    settle::release(ctx, *turn);
    summary
}

/// Makes sure an error from a turn carries the right exit code.
pub fn is_busy(e: &Error) -> bool {
    crate::error::exit_code(e) == 4
}
