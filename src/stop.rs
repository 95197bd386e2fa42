//! `runner stop` (SPEC §6.6): mark an agent `completed`, then end its turn.
//!
//! The CAS comes first, so the running turn (or a racing natural end) reads
//! `completed` when it settles and records `stopped`; the signal goes only
//! to a runner whose start time still matches the lease file (LESSONS 7).
//! When the runner is gone but its turn's processes live, `stop` kills them
//! itself and finishes the row as the runner would have. Idempotent.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::capability;
use crate::claim::{self, Fate};
use crate::clock;
use crate::ctx::Ctx;
use crate::error::{Result, usage};
use crate::lease::{self, Lease};
use crate::mail::{Died, worker_died};
use crate::os::{self, Sig, TurnProcs};
use crate::root::check_name;
use crate::spawn;
use crate::state::State;
use crate::store::mail::{self as mailstore, Scope};
use crate::store::sessions;
use crate::store::turns;

#[derive(Debug, Serialize)]
pub struct StopReport {
    pub agent: String,
    pub previous_state: String,
    pub changed: bool,
    pub signalled_runner: Option<i32>,
    pub message: String,
}

pub async fn stop(
    ctx: &Ctx,
    agent: &str,
    grace: Option<Duration>,
    wait: Option<Duration>,
) -> Result<StopReport> {
    check_name(agent)?;
    let mut store = ctx.store()?;
    let s = sessions::get(&store.conn, agent)?
        .ok_or_else(|| usage(format!("unknown agent '{agent}'; see runner status")))?;
    let wait = wait.unwrap_or(Duration::from_secs(60));
    let grace = grace.unwrap_or(ctx.config.grace);
    let mut rep = StopReport {
        agent: agent.into(),
        previous_state: s.state.clone(),
        changed: false,
        signalled_runner: None,
        message: String::new(),
    };
    if s.state() == Some(State::Completed) {
        rep.message = format!("{agent} is already completed; nothing changed");
        return Ok(rep);
    }
    // The mail baseline of the CAS: a turn that was still running then
    // settles as `stopped` and tells the parent itself, even when it has
    // released the lease by the time we look (LESSONS 13: one notifier).
    // `completed → completed` is an allowed CAS: the state is read in the
    // same transaction, so a turn that completed on its own since the read
    // above (and told the parent itself) is not stopped a second time.
    let (was, cas, baseline) = store.tx("stopping the agent", |tx| {
        let was = sessions::current(tx, agent)?;
        if was.as_deref() == Some(State::Completed.as_str()) {
            return Ok((was, None, 0));
        }
        Ok((
            was,
            Some(sessions::cas(tx, agent, State::Completed, &clock::now())?),
            mailstore::max_rowid(tx)?,
        ))
    })?;
    let Some(cas) = cas else {
        rep.previous_state = was.unwrap_or_default();
        rep.message = format!("{agent} is already completed; nothing changed");
        return Ok(rep);
    };
    rep.changed = cas.applied();
    // Fleet mode: a turn running on another host cannot be signalled from
    // here; it reads `completed` when it settles and records `stopped`.
    if store.conn.is_pg()
        && let Some(row) = crate::store::leases::get(&store.conn, agent)?
        && row.host != ctx.config.host_id
        && !row.expired
    {
        rep.message = format!(
            "{agent} marked completed; its turn {} runs on host {}, which records it stopped when it ends (this host cannot signal it)",
            row.turn_id.as_deref().unwrap_or("(a repair)"),
            row.host
        );
        return Ok(rep);
    }
    let lock = ctx.root.lock_path(agent);
    if lease::is_held(&lock) {
        if let Some(info) = lease::read_info(&lock)
            && os::is_alive(info.runner_pid, info.runner_start_time)
            && info.runner_pid != std::process::id() as i32
        {
            os::signal_pid(info.runner_pid, Sig::SIGTERM);
            rep.signalled_runner = Some(info.runner_pid);
        }
        // Returns when the lease is free: the runner has settled the turn.
        let l = Lease::acquire(&lock, agent, wait).await?;
        drop(l);
        rep.message = match rep.signalled_runner {
            Some(p) => format!("{agent} stopped: its turn (runner pid {p}) was ended"),
            None => format!("{agent} stopped"),
        };
        return Ok(rep);
    }
    // No live runner: finish what a dead one left, as it would have —
    // holding the whole lease (in fleet mode the row too).
    let _lease = Lease::acquire(&lock, agent, wait).await?;
    let fleet = crate::fleet::acquire(ctx, &mut store, agent, None, wait).await?;
    let r = stop_dead_turn(ctx, &mut store, agent, &s, grace, baseline, &mut rep).await;
    if let Some(f) = fleet {
        f.release(&store.conn);
    }
    r?;
    Ok(rep)
}

/// Kills what a dead runner's turn left, finishes its row `stopped`,
/// releases the claims and tells the parent (once).
async fn stop_dead_turn(
    ctx: &Ctx,
    store: &mut crate::store::Store,
    agent: &str,
    s: &sessions::Session,
    grace: Duration,
    baseline: i64,
    rep: &mut StopReport,
) -> Result<()> {
    let lock = ctx.root.lock_path(agent);
    let cap = capability::load(&ctx.root.dir, &s.capability).ok();
    let terminal_types = cap
        .as_ref()
        .map(|c| c.terminal_mail.clone())
        .unwrap_or_default();
    let pid_file: Option<i32> = std::fs::read_to_string(ctx.root.pid_path(agent))
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let open = turns::unfinished(&store.conn, agent)?;
    let info = lease::read_info(&lock);
    let mut ended_turn = false;
    for t in &open {
        let start = info
            .as_ref()
            .filter(|i| i.turn_id == t.turn_id)
            .and_then(|i| i.agent_start_time);
        let procs = TurnProcs::new(
            &t.turn_id,
            t.agent_pid.map(|p| p as i32).or(pid_file),
            start,
        );
        tokio::task::spawn_blocking(move || spawn::terminate_blocking(&procs, grace))
            .await
            .map_err(|e| crate::error::Error::Internal(e.to_string()))?;
        crate::sweep::finish_turn_as(ctx, store, agent, t, "stopped", "stopped by operator")?;
        ended_turn = true;
    }
    let _ = std::fs::remove_file(ctx.root.pid_path(agent));
    let now = clock::now();
    store.tx("stopping the agent", |tx| {
        claim::settle(
            tx,
            Scope::Agent(agent),
            Fate::Release,
            SystemTime::now(),
            1,
            Duration::ZERO,
            "stopped",
        )?;
        let terminal = mailstore::ever_sent_terminal(tx, agent, &terminal_types)?;
        let told = mailstore::terminal_since(tx, agent, baseline, &["worker_died".into()])?;
        if rep.changed
            && !terminal
            && !told
            && let Some(parent) = s.parent_agent.as_deref().filter(|p| !p.is_empty())
        {
            let m = worker_died(&Died {
                agent,
                capability: &s.capability,
                task_id: &s.task_id,
                parent,
                reason: "stopped by operator",
                last_activity: &s.last_activity,
                turn_id: None,
            });
            mailstore::insert(tx, &m, &now)?;
        }
        Ok(())
    })?;
    rep.message = if ended_turn {
        format!("{agent} stopped: the processes of its dead runner's turn were ended")
    } else if rep.changed {
        format!("{agent} stopped (no turn was running)")
    } else {
        format!(
            "{agent} is {}; nothing changed",
            sessions::current(&store.conn, agent)?.unwrap_or_default()
        )
    };
    Ok(())
}
