//! `runner serve` (the mail injector) and `runner nudge` (SPEC §10).
//!
//! Serve runs a turn for every agent with due mail and a free lease, at most
//! N at once and one per agent, in-process; sweeps every `--sweep-every`;
//! backs off agents whose turns are `refused`/`spawn_failed` (5 s doubling
//! to 10 min); on SIGINT/SIGTERM stops scheduling and interrupts in-flight
//! turns (their mail goes back to pending with no retry count), exiting
//! within grace + 1 s; a second signal kills them at once. On PostgreSQL a
//! listener ([`crate::store::pg::listen`]) wakes the loop as soon as mail
//! is committed anywhere in the fleet; `--poll` remains the fallback.
//! Scheduling only decides; the turn and the lease guarantee one turn per
//! agent even against a manual `runner turn`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::clock;
use crate::ctx::Ctx;
use crate::error::{Result, usage};
use crate::lease;
use crate::root::check_name;
use crate::state::State;
use crate::store::Backend;
use crate::store::mail::{self as mailstore, NewMessage};
use crate::store::pg::listen::{Listener, Wake};
use crate::store::sessions;
use crate::turn::{self, AbortRequest, TurnRequest, TurnSummary};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub poll: Duration,
    pub sweep_every: Duration,
    pub max_concurrent: usize,
    pub grace: Duration,
    pub stall: Option<Duration>,
    /// Serve-side counters for `/metrics` (counted whether or not HTTP is on).
    pub counters: crate::web::metrics::ServeCounters,
}

#[derive(Debug, Default, Serialize)]
pub struct ServeReport {
    pub turns: u64,
    pub by_outcome: HashMap<String, u64>,
    pub sweeps: u64,
    pub interrupted: u64,
}

/// Per-agent backoff after configuration failures.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    next: Duration,
}

const BACKOFF_START: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(600);

/// Waits for SIGINT/SIGTERM; returns a receiver counting signals.
pub fn signal_counter() -> watch::Receiver<u32> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = watch::channel(0u32);
    // Registered here, before returning, not inside the task: a signal that
    // arrives before the task first runs (a `stop` right after the lease is
    // taken) must be counted, not kill the process by its default action.
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return rx;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    rx
}

pub async fn serve(
    ctx: Arc<Ctx>,
    opts: ServeOptions,
    mut signals: watch::Receiver<u32>,
) -> Result<ServeReport> {
    let mut rep = ServeReport::default();
    let mut running: HashMap<String, watch::Sender<AbortRequest>> = HashMap::new();
    let mut backoff: HashMap<String, Backoff> = HashMap::new();
    let mut set: JoinSet<(String, Result<TurnSummary>, Duration, usize)> = JoinSet::new();
    let mut next_sweep = Instant::now();
    let mut shutting_down = false;
    // Dropped (and so stopped) when serve returns.
    let mut listener = mail_listener(&ctx);
    loop {
        let now = Instant::now();
        if !shutting_down {
            if now >= next_sweep {
                let c = ctx.clone();
                match tokio::task::spawn_blocking(move || crate::sweep::sweep(&c, false)).await {
                    Ok(Ok(r)) => {
                        rep.sweeps += 1;
                        opts.counters.sweep(&r);
                        if r.errors > 0 {
                            tracing::warn!(
                                "sweep: {} error(s): {}",
                                r.errors,
                                r.error_messages.join("; ")
                            );
                        }
                    }
                    Ok(Err(e)) => tracing::warn!("sweep failed: {e}"),
                    Err(e) => tracing::warn!("sweep panicked: {e}"),
                }
                next_sweep = Instant::now() + opts.sweep_every;
            }
            if let Err(e) = schedule(&ctx, &opts, &mut running, &backoff, &mut set) {
                tracing::warn!("scheduling: {e}");
            }
        }
        if shutting_down && set.is_empty() {
            break;
        }
        tokio::select! {
            Some(done) = set.join_next(), if !set.is_empty() => {
                if let Ok((agent, res, took, mail)) = done {
                    running.remove(&agent);
                    rep.turns += 1;
                    match res {
                        Ok(s) => {
                            let o = s.outcome.unwrap_or("nothing");
                            *rep.by_outcome.entry(o.to_string()).or_default() += 1;
                            if o == "interrupted" { rep.interrupted += 1; }
                            tracing::info!("turn {agent}: {o} in {} with {mail} mail{}", clock::human_duration(took),
                                s.turn.as_ref().and_then(|t| t.reason.clone()).map(|r| format!(" ({r})")).unwrap_or_default());
                            eprintln!("{} {agent} {o} {} mail={mail}", clock::now(), clock::human_duration(took));
                            if matches!(o, "refused" | "spawn_failed") {
                                let b = backoff.get(&agent).map(|b| (b.next * 2).min(BACKOFF_MAX)).unwrap_or(BACKOFF_START);
                                backoff.insert(agent.clone(), Backoff { until: Instant::now() + b, next: b });
                                opts.counters.backoffs.inc();
                            } else if s.turn.is_some() {
                                backoff.remove(&agent);
                            }
                        }
                        Err(e) => {
                            if turn::is_busy(&e) {
                                opts.counters.lease_waits.inc();
                            } else {
                                tracing::warn!("turn {agent}: {e}");
                                eprintln!("{} {agent} error: {e}", clock::now());
                            }
                        }
                    }
                }
            }
            r = signals.changed() => {
                if r.is_err() { continue; }
                let n = *signals.borrow_and_update();
                let req = if n >= 2 { AbortRequest::Kill } else { AbortRequest::Graceful };
                if !shutting_down {
                    eprintln!("{} serve: shutting down; interrupting {} turn(s)", clock::now(), running.len());
                }
                shutting_down = true;
                for tx in running.values() {
                    let _ = tx.send(req);
                }
            }
            _ = tokio::time::sleep(opts.poll), if !shutting_down => {}
            w = mail_woken(&mut listener), if !shutting_down => {
                tracing::debug!("woken by mail: {w:?}");
            }
        }
    }
    Ok(rep)
}

/// Fleet mode (SPEC §12.4): a listener on `runner_mail`, whose
/// notifications wake the loop at once; `--poll` remains the fallback.
/// SQLite: none.
fn mail_listener(ctx: &Ctx) -> Option<Listener> {
    match &ctx.config.store {
        Backend::Postgres { url, schema } => Some(Listener::start(url, schema)),
        Backend::Sqlite => None,
    }
}

/// The next wakes of the listener; never, without one.
async fn mail_woken(listener: &mut Option<Listener>) -> Vec<Wake> {
    match listener {
        Some(l) => l.woken().await,
        None => std::future::pending().await,
    }
}

fn schedule(
    ctx: &Arc<Ctx>,
    opts: &ServeOptions,
    running: &mut HashMap<String, watch::Sender<AbortRequest>>,
    backoff: &HashMap<String, Backoff>,
    set: &mut JoinSet<(String, Result<TurnSummary>, Duration, usize)>,
) -> Result<()> {
    if running.len() >= opts.max_concurrent {
        return Ok(());
    }
    let store = ctx.store()?;
    let now = Instant::now();
    let mut due = mailstore::agents_with_due(&store.conn, &clock::now())?;
    // Fleet mode: agents whose lease another host holds are not tried, and
    // hosts start from different places among the oldest due agents, so
    // that they do not all race for the same ones.
    let leased: std::collections::HashSet<String> = if store.conn.is_pg() {
        let k = due.len().min(64);
        if k > 1 {
            let r = crate::os::random_alnum(2)
                .bytes()
                .fold(0usize, |a, b| a * 256 + b as usize);
            due[..k].rotate_left(r % k);
        }
        crate::store::leases::list(&store.conn)?
            .into_iter()
            .filter(|l| !l.expired)
            .map(|l| l.agent_name)
            .collect()
    } else {
        Default::default()
    };
    for agent in due {
        if running.len() >= opts.max_concurrent {
            break;
        }
        if running.contains_key(&agent)
            || backoff.get(&agent).is_some_and(|b| now < b.until)
            || leased.contains(&agent)
        {
            continue;
        }
        let Some(s) = sessions::get(&store.conn, &agent)? else {
            continue;
        };
        if s.state().is_some_and(State::is_finished) {
            continue;
        }
        // Fleet mode: only this host's own and floating agents (SPEC §12.2).
        if !crate::hosts::runs_here(ctx, &store.conn, &agent)? {
            continue;
        }
        if lease::is_held(&ctx.root.lock_path(&agent)) {
            opts.counters.lease_waits.inc();
            continue;
        }
        let (tx, rx) = watch::channel(AbortRequest::None);
        running.insert(agent.clone(), tx);
        let c = ctx.clone();
        let req = TurnRequest {
            agent: agent.clone(),
            wait: Duration::ZERO,
            // Another host may have finished the agent since we looked.
            finished_is_nothing: true,
            stall: opts.stall,
            grace: Some(opts.grace),
            ..Default::default()
        };
        set.spawn(async move {
            let t0 = Instant::now();
            let r = turn::run(&c, req, rx).await;
            let mail = r
                .as_ref()
                .ok()
                .and_then(|s| s.turn.as_ref())
                .map(|t| t.mail_ids.len())
                .unwrap_or(0);
            (agent, r, t0.elapsed(), mail)
        });
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct NudgeReport {
    pub agent: String,
    pub stored: Option<String>,
    pub debounced: bool,
    pub queued: bool,
    pub turn: Option<TurnSummary>,
    pub message: String,
}

pub const DEFAULT_NUDGE: &str = "Check your mail inbox for new messages.";
pub const DEBOUNCE: Duration = Duration::from_millis(500);

pub async fn nudge(
    ctx: &Ctx,
    agent: &str,
    text: Option<String>,
    from: Option<String>,
    force: bool,
) -> Result<NudgeReport> {
    check_name(agent)?;
    let from = from.unwrap_or_else(|| "orchestrator".into());
    check_name(&from)?;
    let store = ctx.store()?;
    let s = sessions::get(&store.conn, agent)?
        .ok_or_else(|| usage(format!("unknown agent '{agent}'; register it first: runner agent add {agent} --capability builder")))?;
    if s.state().is_some_and(State::is_finished) {
        return Err(usage(format!(
            "agent {agent} is {}; nudges are not delivered to it (use --recover)",
            s.state
        )));
    }
    let mut rep = NudgeReport {
        agent: agent.into(),
        stored: None,
        debounced: false,
        queued: false,
        turn: None,
        message: String::new(),
    };
    if !force
        && let Some(last) =
            mailstore::last_nudge_at(&store.conn, agent)?.and_then(|t| clock::parse_ts(&t))
        && std::time::SystemTime::now()
            .duration_since(last)
            .is_ok_and(|d| d < DEBOUNCE)
    {
        rep.debounced = true;
        rep.message = format!(
            "nudge to {agent} debounced: the last one is under 500 ms old (--force to send anyway)"
        );
        return Ok(rep);
    }
    let m = NewMessage {
        from_agent: from,
        to_agent: agent.into(),
        subject: "nudge".into(),
        body: text.unwrap_or_else(|| DEFAULT_NUDGE.into()),
        kind: "status".into(),
        priority: "normal".into(),
        thread_id: None,
        payload: Some(r#"{"kind":"nudge"}"#.into()),
        turn_id: std::env::var("RUNNER_TURN_ID")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    rep.stored = Some(mailstore::insert(&store.conn, &m, &clock::now())?);
    drop(store);
    if lease::is_held(&ctx.root.lock_path(agent)) {
        rep.queued = true;
        rep.message =
            format!("a turn of {agent} is in flight; the nudge is queued for its next turn");
        return Ok(rep);
    }
    let (_tx, rx) = watch::channel(AbortRequest::None);
    let req = TurnRequest {
        agent: agent.into(),
        wait: Duration::ZERO,
        ..Default::default()
    };
    match turn::run(ctx, req, rx).await {
        Ok(t) => {
            rep.message = t.message.clone();
            rep.turn = Some(t);
        }
        Err(e) if turn::is_busy(&e) => {
            rep.queued = true;
            rep.message =
                format!("a turn of {agent} is in flight; the nudge is queued for its next turn");
        }
        Err(e) => return Err(e),
    }
    Ok(rep)
}
