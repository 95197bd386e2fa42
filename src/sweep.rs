//! The sweep (SPEC §7): repair what crashed turns leave behind, with the
//! same lease and claim primitives the turn uses.
//!
//! [`decide`] is the pure decision for one agent; [`reclaim`] and
//! [`sweep`] are the effectful shell. The lease makes the classic sweeper
//! bugs impossible by construction (LESSONS 21–27): claims are touched only
//! while holding the agent's lease, which proves no turn is running; the
//! retry bump and the claim release are one transaction; a live turn is
//! judged only by what its runner refreshes, never in its first 60 s; an
//! error on one agent is counted and the pass goes on. `completed` is never
//! revised. A second pass over unchanged state changes nothing.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::capability::{self, Capability};
use crate::claim::{self, Fate};
use crate::clock;
use crate::ctx::Ctx;
use crate::error::Result;
use crate::lease::{self, Lease, LeaseInfo};
use crate::mail::{Died, worker_died};
use crate::os::{self, Sig, TurnProcs};
use crate::runtime;
use crate::spawn;
use crate::state::State;
use crate::store::Store;
use crate::store::events::{self, Batch, TurnTag};
use crate::store::mail::{self as mailstore, Scope};
use crate::store::sessions::{self, Session};
use crate::store::turns::{self, TurnRow};
use crate::stream::{Frame, Framer, process_line};

/// A turn younger than this is never judged by the sweep (LESSONS 23).
pub const MIN_AGE: Duration = Duration::from_secs(60);

/// What the sweep knows about one agent.
#[derive(Debug, Clone)]
pub struct AgentFacts {
    pub state: Option<State>,
    pub lease_held: bool,
    pub lease: Option<LeaseInfo>,
    pub pid_file: bool,
    pub unfinished_turns: usize,
    pub claims: usize,
    /// Seconds since `last_activity`.
    pub idle: Option<Duration>,
    /// Seconds since the running turn started.
    pub turn_age: Option<Duration>,
    pub past_deadline: bool,
    pub ceiling: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Lease free: finish dead turns, release orphan claims, fix `in_turn`.
    Repair,
    /// Lease held: stop the turn (`stalled` or `deadline`).
    StopTurn { deadline: bool },
    /// Nothing to do.
    Nothing,
}

/// The sweep decision for one agent (pure).
pub fn decide(f: &AgentFacts) -> Action {
    if f.lease_held {
        let young = f.turn_age.is_none_or(|a| a < MIN_AGE);
        if young || f.state == Some(State::Completed) {
            return Action::Nothing;
        }
        if f.past_deadline {
            return Action::StopTurn { deadline: true };
        }
        if f.idle.is_some_and(|i| i > f.ceiling) {
            return Action::StopTurn { deadline: false };
        }
        return Action::Nothing;
    }
    let leftovers = f.pid_file || f.unfinished_turns > 0 || f.claims > 0;
    if leftovers || f.state == Some(State::InTurn) {
        Action::Repair
    } else {
        Action::Nothing
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub scanned: u64,
    pub orphan_turns: u64,
    pub groups_killed: u64,
    pub claims_retried: u64,
    pub claims_released: u64,
    pub claims_dead: u64,
    pub states_fixed: u64,
    pub turns_stopped: u64,
    pub due_agents: u64,
    /// Fleet mode: expired leases of any host repaired (SPEC §12.5).
    pub leases_expired: u64,
    /// Fleet mode: hosts this pass marked `offline`.
    pub hosts_offline: u64,
    pub errors: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_messages: Vec<String>,
    pub dry_run: bool,
}

/// Under the agent's lease: finish turns whose runner died, release orphan
/// claims by the retry rule, fix a stale `in_turn`. Runs at the start of
/// every turn and in every sweep pass.
pub fn reclaim(ctx: &Ctx, store: &mut Store, agent: &str, cap: &Capability) -> Result<Report> {
    let mut rep = Report::default();
    let pid_path = ctx.root.pid_path(agent);
    let pid_file: Option<i32> = std::fs::read_to_string(&pid_path)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let lease_info = lease::read_info(&ctx.root.lock_path(agent));
    let mut open = turns::unfinished(&store.conn, agent)?;
    if open.is_empty() && pid_file.is_some() {
        // A turn.pid without a row: kill what it names, if it is still that process.
        let info = lease_info.clone().unwrap_or_default();
        let procs = TurnProcs::new(&info.turn_id, pid_file, info.agent_start_time);
        if spawn::terminate_blocking(&procs, ctx.config.grace) {
            rep.groups_killed += 1;
        }
        // A turn the fleet finished while this host was silent (SPEC §12.5):
        // its row stays as repaired; the lines it received are facts.
        if !info.turn_id.is_empty() && turns::get(&store.conn, &info.turn_id)?.is_some() {
            replay_turn(ctx, store, agent, &info.turn_id)?;
        }
    }
    for t in open.drain(..) {
        rep.orphan_turns += 1;
        let start = lease_info
            .as_ref()
            .filter(|i| i.turn_id == t.turn_id)
            .and_then(|i| i.agent_start_time);
        let pid = t.agent_pid.map(|p| p as i32).or(pid_file);
        let procs = TurnProcs::new(&t.turn_id, pid, start);
        if spawn::terminate_blocking(&procs, ctx.config.grace) {
            rep.groups_killed += 1;
        }
        finish_dead_turn(ctx, store, agent, &t, "runner died")?;
    }
    let _ = std::fs::remove_file(&pid_path);

    let now_t = SystemTime::now();
    let completed = sessions::get(&store.conn, agent)?
        .as_ref()
        .and_then(Session::state)
        == Some(State::Completed);
    let fate = if completed {
        Fate::Release
    } else {
        Fate::Retry
    };
    let (settled, fixed) = store.tx("releasing orphan claims", |tx| {
        settle_orphans(
            tx,
            ctx,
            agent,
            Scope::Agent(agent),
            fate,
            now_t,
            "runner died",
        )
    })?;
    let _ = cap;
    rep.claims_retried += settled.retried as u64;
    rep.claims_dead += settled.dead as u64;
    rep.claims_released += settled.released as u64;
    rep.states_fixed += fixed;
    Ok(rep)
}

/// Settles the claims of `scope` left by a dead turn (by `fate`, with the
/// retry rule's error `why`) and applies the state rules of §7 in the
/// caller's transaction: retries exhausted → `zombie` and one `worker_died`
/// to the parent; a stale `in_turn` → `between_turns`. Returns the claims
/// settled and the states fixed. Shared by the local reclaim and the
/// fleet's repair of expired leases.
pub fn settle_orphans(
    tx: &crate::store::Db,
    ctx: &Ctx,
    agent: &str,
    scope: Scope<'_>,
    fate: Fate,
    now_t: SystemTime,
    why: &str,
) -> crate::store::Result<(claim::Settled, u64)> {
    let cfg = &ctx.config;
    let now = clock::format_ts(now_t);
    let settled = claim::settle(tx, scope, fate, now_t, cfg.max_tries, cfg.backoff_base, why)?;
    let mut fixed = 0;
    if settled.dead > 0
        && let Some(s) = sessions::get(tx, agent)?
        && sessions::cas(tx, agent, State::Zombie, &now)?.applied()
    {
        fixed += 1;
        if let Some(parent) = s.parent_agent.as_deref().filter(|p| !p.is_empty()) {
            let m = worker_died(&Died {
                agent,
                capability: &s.capability,
                task_id: &s.task_id,
                parent,
                reason: "retries exhausted",
                last_activity: &s.last_activity,
                turn_id: None,
            });
            mailstore::insert(tx, &m, &now)?;
        }
    }
    if sessions::current(tx, agent)?.as_deref() == Some("in_turn")
        && sessions::cas(tx, agent, State::BetweenTurns, &now)?.applied()
    {
        fixed += 1;
    }
    Ok((settled, fixed))
}

/// Finishes the row of a turn whose runner is gone: replays the lines of its
/// `stdout.ndjson` not yet in `events`, then writes outcome `failed`.
pub fn finish_dead_turn(
    ctx: &Ctx,
    store: &mut Store,
    agent: &str,
    t: &TurnRow,
    reason: &str,
) -> Result<()> {
    finish_turn_as(ctx, store, agent, t, "failed", reason)
}

/// Finishes an abandoned turn row with `outcome` (`failed` for the sweep,
/// `stopped` for `runner stop`).
pub fn finish_turn_as(
    ctx: &Ctx,
    store: &mut Store,
    agent: &str,
    t: &TurnRow,
    outcome: &str,
    reason: &str,
) -> Result<()> {
    let mut ev = ctx.events()?;
    let session = sessions::get(&store.conn, agent)?;
    let tag = TurnTag {
        run_id: session.as_ref().and_then(|s| s.run_id.clone()),
        agent_name: agent.to_string(),
        turn_id: t.turn_id.clone(),
    };
    let replay = replay_lines(ctx, &mut ev, &tag, session.as_ref())?;
    let events_n = events::count_for_turn(&ev, &t.turn_id)?;
    let now = clock::now();
    let state = sessions::current(&store.conn, agent)?;
    let row = TurnRow {
        ended_at: Some(now.clone()),
        final_state: state,
        outcome: Some(outcome.into()),
        reason: Some(reason.into()),
        events: events_n,
        lines: replay.lines as i64,
        malformed_lines: replay.malformed as i64,
        bytes: replay.bytes as i64,
        session_id: replay.session_id.clone(),
        ..t.clone()
    };
    store.tx("finishing a dead turn", |tx| {
        turns::finish(tx, &row).map(|_| ())
    })?;
    Ok(())
}

/// Replays a finished turn's `stdout.ndjson` lines missing from `events`.
fn replay_turn(ctx: &Ctx, store: &Store, agent: &str, turn_id: &str) -> Result<()> {
    let mut ev = ctx.events()?;
    let session = sessions::get(&store.conn, agent)?;
    let tag = TurnTag {
        run_id: session.as_ref().and_then(|s| s.run_id.clone()),
        agent_name: agent.to_string(),
        turn_id: turn_id.to_string(),
    };
    replay_lines(ctx, &mut ev, &tag, session.as_ref())?;
    Ok(())
}

#[derive(Debug, Default)]
struct Replay {
    lines: u64,
    malformed: u64,
    bytes: u64,
    session_id: Option<String>,
}

/// Replays `stdout.ndjson` lines numbered above the highest `line_no` already
/// in `events`: each line the runner received ends up there exactly once.
fn replay_lines(
    ctx: &Ctx,
    ev: &mut crate::store::Db,
    tag: &TurnTag,
    session: Option<&Session>,
) -> Result<Replay> {
    let path = ctx
        .root
        .turn_log_dir(&tag.agent_name, &tag.turn_id)
        .join("stdout.ndjson");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(Replay::default());
    };
    let done = events::max_line_no(ev, &tag.turn_id)?;
    let mut parser = session
        .and_then(|s| runtime::for_session(s).ok())
        .map(|r| r.parser())
        .unwrap_or_else(|| Box::new(runtime::claude::ClaudeParser::default()));
    let mut framer = Framer::new(ctx.config.max_line);
    let mut rows = Vec::new();
    let mut rep = Replay {
        bytes: bytes.len() as u64,
        ..Default::default()
    };
    let mut line_no = 0i64;
    framer.feed(&bytes, |f: Frame<'_>| {
        line_no += 1;
        let before = rows.len();
        let facts = process_line(f, line_no, parser.as_mut(), &mut rows);
        if line_no <= done {
            rows.truncate(before);
        }
        if let Some(facts) = facts {
            rep.lines += 1;
            rep.malformed += facts.malformed as u64;
            if rep.session_id.is_none() {
                rep.session_id = facts.session_id.filter(|s| !s.is_empty());
            }
        }
    });
    // A trailing partial line was never received as a line: not replayed.
    if !rows.is_empty() {
        for chunk in rows.chunks(events::MAX_ROWS_PER_COMMIT) {
            events::insert_rows(
                ev,
                tag,
                &Batch {
                    created_at: clock::now(),
                    session_id: rep.session_id.clone(),
                    rows: chunk.to_vec(),
                },
            )?;
        }
    }
    Ok(rep)
}

/// One sweep pass over every agent that is not `completed`, and completed
/// ones with leftovers; at most 1000, oldest activity first.
pub fn sweep(ctx: &Ctx, dry_run: bool) -> Result<Report> {
    let mut store = ctx.store()?;
    let mut rep = Report {
        dry_run,
        ..Default::default()
    };
    if !dry_run && store.conn.is_pg() {
        // Fleet mode (SPEC §12.5): any host repairs expired leases and marks
        // silent hosts offline, by the database's clock.
        rep.hosts_offline +=
            crate::store::hosts::mark_offline_stale(&store.conn, ctx.config.fleet.host_stale)?;
        let r = crate::fleet::repair_expired(ctx, &mut store)?;
        rep.leases_expired += r.leases_expired;
        rep.orphan_turns += r.orphan_turns;
        rep.claims_retried += r.claims_retried;
        rep.claims_dead += r.claims_dead;
        rep.states_fixed += r.states_fixed;
    }
    let now_t = SystemTime::now();
    let mut all = sessions::list(&store.conn)?;
    if store.conn.is_pg() {
        // Each host sweeps its own and floating agents: only it can signal
        // their processes and read their logs.
        let pins: std::collections::HashMap<String, Option<String>> =
            crate::store::hosts::agent_hosts(&store.conn)?
                .into_iter()
                .collect();
        all.retain(|s| {
            crate::hosts::allows(
                pins.get(&s.agent_name).cloned().flatten().as_deref(),
                &ctx.config.host_id,
            )
        });
    }
    let mut candidates: Vec<Session> = all
        .into_iter()
        .filter(|s| {
            s.state().is_none_or(|st| st != State::Completed)
                || has_leftovers(ctx, &store, &s.agent_name)
        })
        .collect();
    candidates.sort_by(|a, b| a.last_activity.cmp(&b.last_activity));
    candidates.truncate(1000);
    for s in candidates {
        rep.scanned += 1;
        if let Err(e) = sweep_one(ctx, &mut store, &s, now_t, dry_run, &mut rep) {
            rep.errors += 1;
            rep.error_messages.push(format!("{}: {e}", s.agent_name));
        }
    }
    let now = clock::format_ts(now_t);
    for a in mailstore::agents_with_due(&store.conn, &now)? {
        if sessions::get(&store.conn, &a)?
            .is_some_and(|s| !s.state().is_some_and(State::is_finished))
            && !lease::is_held(&ctx.root.lock_path(&a))
        {
            rep.due_agents += 1;
        }
    }
    Ok(rep)
}

fn has_leftovers(ctx: &Ctx, store: &Store, agent: &str) -> bool {
    ctx.root.pid_path(agent).exists()
        || turns::unfinished(&store.conn, agent).is_ok_and(|t| !t.is_empty())
        || mailstore::claimed(&store.conn, Scope::Agent(agent)).is_ok_and(|c| !c.is_empty())
}

/// What the sweep knows about one agent now (read-only: `runner doctor`
/// uses it too, with [`decide`], to count what a sweep would repair).
pub fn gather(ctx: &Ctx, store: &Store, s: &Session, now_t: SystemTime) -> Result<AgentFacts> {
    let agent = s.agent_name.as_str();
    let lock = ctx.root.lock_path(agent);
    let flock_held = lease::is_held(&lock);
    let info = if flock_held {
        lease::read_info(&lock)
    } else {
        None
    };
    // Fleet mode: a row of another host (live, or expired and left to the
    // fleet repair after `grace`) holds the agent against this host's sweep.
    let held = flock_held
        || (store.conn.is_pg()
            && crate::store::leases::get(&store.conn, agent)?
                .is_some_and(|r| r.host != ctx.config.host_id));
    let since = |ts: &str| clock::parse_ts(ts).and_then(|t| now_t.duration_since(t).ok());
    Ok(AgentFacts {
        state: s.state(),
        lease_held: held,
        lease: info.clone(),
        pid_file: ctx.root.pid_path(agent).exists(),
        unfinished_turns: turns::unfinished(&store.conn, agent)?.len(),
        claims: mailstore::claimed(&store.conn, Scope::Agent(agent))?.len(),
        idle: since(&s.last_activity),
        turn_age: info.as_ref().and_then(|i| since(&i.acquired_at)),
        past_deadline: info
            .as_ref()
            .and_then(|i| i.deadline_at.as_deref())
            .and_then(clock::parse_ts)
            .is_some_and(|d| now_t > d),
        ceiling: ceiling_for(ctx, info.as_ref()),
    })
}

fn sweep_one(
    ctx: &Ctx,
    store: &mut Store,
    s: &Session,
    now_t: SystemTime,
    dry_run: bool,
    rep: &mut Report,
) -> Result<()> {
    let agent = s.agent_name.as_str();
    let lock = ctx.root.lock_path(agent);
    let facts = gather(ctx, store, s, now_t)?;
    let info = facts.lease.clone();
    match decide(&facts) {
        Action::Nothing => Ok(()),
        Action::StopTurn { deadline } => {
            rep.turns_stopped += 1;
            if dry_run {
                return Ok(());
            }
            let Some(info) = info else { return Ok(()) };
            // Re-check inside the transaction that acts: still not completed.
            let cas = store.tx("stopping a stuck turn", |tx| {
                sessions::cas(tx, agent, State::Zombie, &clock::format_ts(now_t))
            })?;
            if !cas.applied() {
                return Ok(());
            }
            let _ = std::fs::write(
                ctx.root.stop_reason_path(agent),
                if deadline { "deadline" } else { "stalled" },
            );
            if os::is_alive(info.runner_pid, info.runner_start_time) {
                os::signal_pid(info.runner_pid, Sig::SIGTERM);
            }
            Ok(())
        }
        Action::Repair => {
            if dry_run {
                rep.orphan_turns += facts.unfinished_turns as u64;
                if s.state() == Some(State::Completed) {
                    rep.claims_released += facts.claims as u64;
                } else {
                    rep.claims_retried += facts.claims as u64;
                }
                rep.states_fixed += (s.state() == Some(State::InTurn)) as u64;
                return Ok(());
            }
            // Take the lease without waiting: a turn that just started wins.
            let Some(_lease) = Lease::try_acquire(&lock)? else {
                return Ok(());
            };
            // Fleet mode: the database half too; held elsewhere → not ours now.
            let fleet = match crate::fleet::try_acquire_for_repair(ctx, store, agent) {
                Ok(f) => f,
                Err(e) if crate::turn::is_busy(&e) => return Ok(()),
                Err(e) => return Err(e),
            };
            let cap =
                capability::load(&ctx.root.dir, &s.capability).unwrap_or_else(|_| Capability {
                    name: s.capability.clone(),
                    terminal_mail: vec![],
                    on_idle: capability::OnIdle::Exit,
                    stall_timeout: None,
                    permission_mode: None,
                    instructions: String::new(),
                });
            let r = reclaim(ctx, store, agent, &cap);
            if let Some(f) = fleet {
                f.release(&store.conn);
            }
            let r = r?;
            rep.orphan_turns += r.orphan_turns;
            rep.groups_killed += r.groups_killed;
            rep.claims_retried += r.claims_retried;
            rep.claims_released += r.claims_released;
            rep.claims_dead += r.claims_dead;
            rep.states_fixed += r.states_fixed;
            Ok(())
        }
    }
}

/// The ceiling, widened like the stall limit: never below the turn's own
/// stall timeout, nor below the limit its runner applies right now (a
/// declared tool timeout in flight included).
fn ceiling_for(ctx: &Ctx, info: Option<&LeaseInfo>) -> Duration {
    let runner_limit = info
        .and_then(|i| i.stall_timeout_ms.max(i.stall_limit_ms))
        .map(Duration::from_millis)
        .unwrap_or_default();
    ctx.config.sweep_ceiling.max(runner_limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AgentFacts {
        AgentFacts {
            state: Some(State::BetweenTurns),
            lease_held: false,
            lease: None,
            pid_file: false,
            unfinished_turns: 0,
            claims: 0,
            idle: Some(Duration::from_secs(5)),
            turn_age: None,
            past_deadline: false,
            ceiling: Duration::from_secs(1800),
        }
    }

    #[test]
    fn decision_table() {
        let h = Duration::from_secs(3600);
        let rows: Vec<(AgentFacts, Action)> = vec![
            (base(), Action::Nothing),
            (
                AgentFacts {
                    pid_file: true,
                    ..base()
                },
                Action::Repair,
            ),
            (
                AgentFacts {
                    unfinished_turns: 1,
                    ..base()
                },
                Action::Repair,
            ),
            (
                AgentFacts {
                    claims: 2,
                    ..base()
                },
                Action::Repair,
            ),
            (
                AgentFacts {
                    state: Some(State::InTurn),
                    ..base()
                },
                Action::Repair,
            ),
            (
                AgentFacts {
                    state: Some(State::Completed),
                    claims: 1,
                    ..base()
                },
                Action::Repair,
            ),
            // lease held: a live turn
            (
                AgentFacts {
                    lease_held: true,
                    claims: 3,
                    turn_age: Some(h),
                    ..base()
                },
                Action::Nothing,
            ),
            (
                AgentFacts {
                    lease_held: true,
                    idle: Some(h),
                    turn_age: Some(h),
                    ..base()
                },
                Action::StopTurn { deadline: false },
            ),
            (
                AgentFacts {
                    lease_held: true,
                    past_deadline: true,
                    turn_age: Some(h),
                    ..base()
                },
                Action::StopTurn { deadline: true },
            ),
            // never judge a turn younger than 60 s, nor a missing age (LESSONS 23, 24)
            (
                AgentFacts {
                    lease_held: true,
                    idle: Some(h),
                    turn_age: Some(Duration::from_secs(59)),
                    ..base()
                },
                Action::Nothing,
            ),
            (
                AgentFacts {
                    lease_held: true,
                    idle: Some(h),
                    turn_age: None,
                    ..base()
                },
                Action::Nothing,
            ),
            // never revise completed
            (
                AgentFacts {
                    lease_held: true,
                    idle: Some(h),
                    turn_age: Some(h),
                    state: Some(State::Completed),
                    ..base()
                },
                Action::Nothing,
            ),
        ];
        for (i, (f, want)) in rows.into_iter().enumerate() {
            assert_eq!(decide(&f), want, "row {i}");
        }
    }
}
