//! Steps 1–4 of a turn (SPEC §6.1): check the agent, work out the input,
//! take the lease and reclaim what a dead earlier turn left, claim the mail
//! and record the start.
//!
//! Invariants: claims never exist without their turn row (one
//! transaction); nothing is claimed or spawned without the lease; an agent
//! that became `completed` or `zombie` while we waited is refused. Non-goal:
//! running anything — [`Turn`] is handed to `run`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use super::io::{TurnLog, aborted};
use super::{
    AbortRequest, MAX_MAIL_PER_TURN, TurnRequest, TurnSummary, load_runnable, new_turn_id,
    refuse_finished,
};
use crate::capability::Capability;
use crate::clock;
use crate::ctx::Ctx;
use crate::error::{Result, usage};
use crate::lease::{Lease, LeaseInfo};
use crate::mail::render_turn;
use crate::os;
use crate::runtime::{self, Runtime};
use crate::store::Store;
use crate::store::events::{self, Batch, EventRow, TurnTag};
use crate::store::mail::{self as mailstore, Message};
use crate::store::sessions::{self, Session};
use crate::store::turns::{self, TurnRow};

/// The limits one turn runs under (flag > environment > capability > file > default).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub stall: Duration,
    pub grace: Duration,
    pub deadline: Duration,
}

impl Limits {
    fn of(ctx: &Ctx, req: &TurnRequest, cap: &Capability) -> Limits {
        Limits {
            stall: ctx.config.stall_for(req.stall, cap.stall_timeout),
            grace: req.grace.unwrap_or(ctx.config.grace),
            deadline: req.deadline.unwrap_or(ctx.config.deadline),
        }
    }
}

/// A started turn: everything the later steps need.
pub struct Turn {
    /// The turn's own `sessions.db` connection.
    pub store: Store,
    /// Its `events.db` connection (lent to the writer thread while running).
    pub events: Option<crate::store::Db>,
    /// `metrics.db`, being opened on a blocking thread while the agent runs
    /// (see [`crate::store::metrics::open_existing`]).
    pub metrics: Option<tokio::task::JoinHandle<Option<rusqlite::Connection>>>,
    pub session: Session,
    pub cap: Capability,
    pub runtime: Box<dyn Runtime>,
    pub lease: Lease,
    /// Fleet mode: the database half of the lease (SPEC §12.3).
    pub fleet: Option<crate::fleet::FleetLease>,
    /// What the lease file says; rewritten as the turn learns more.
    pub info: LeaseInfo,
    /// The row as inserted at the start.
    pub row: TurnRow,
    pub mail_count: usize,
    /// Terminal mail must be above this rowid (SPEC §6.2).
    pub baseline: i64,
    /// The user turn.
    pub text: String,
    pub tag: TurnTag,
    pub resume_id: Option<String>,
    pub limits: Limits,
    pub started: Instant,
    pub log_dir: PathBuf,
    pub log: TurnLog,
}

impl Turn {
    pub fn agent(&self) -> &str {
        &self.row.agent_name
    }

    pub fn turn_id(&self) -> &str {
        &self.row.turn_id
    }
}

/// A turn to run, or the summary of why there is none.
pub enum Prepared {
    Turn(Box<Turn>),
    Early(Box<TurnSummary>),
}

/// Steps 1–4.
pub async fn prepare(
    ctx: &Ctx,
    req: &TurnRequest,
    abort: &mut watch::Receiver<AbortRequest>,
) -> Result<Prepared> {
    let agent = req.agent.as_str();
    let wait_until = Instant::now() + req.wait;
    // 1. Check the name, open the stores, read the session.
    let store = ctx.store()?;
    let (session, cap) = match load_runnable(ctx, &store, agent) {
        Err(e) if req.finished_is_nothing && finished(&store, agent)? => {
            let _ = e;
            return Ok(Prepared::Early(Box::new(TurnSummary::nothing(agent))));
        }
        r => r?,
    };
    // 2. Work out the input (a cheap early exit; step 4 decides for real).
    if nothing_to_deliver(&store, req)? {
        return Ok(Prepared::Early(Box::new(TurnSummary::nothing(agent))));
    }
    // events.db is opened on a blocking thread while this one takes the
    // lease, reclaims and claims: on two cores its open (WAL index rebuild,
    // schema parse) is then off the path to the spawn.
    let events_ahead = open_events_ahead(ctx);
    // 3. Take the lease; reclaim what a dead earlier turn left; re-read.
    let lock_path = ctx.root.lock_path(agent);
    // A turn waiting for the lease holds no PostgreSQL connection: a queue
    // of waiting turns must not use up the server's connections.
    let (lease, mut store) = match Lease::try_acquire(&lock_path)? {
        Some(l) => (l, store),
        None => {
            let kept = if store.conn.is_pg() {
                store.conn.close();
                None
            } else {
                Some(store)
            };
            let lease = tokio::select! {
                l = Lease::acquire(&lock_path, agent, req.wait) => l?,
                _ = aborted(abort) => return Ok(Prepared::Early(Box::new(
                    TurnSummary::interrupted_waiting(agent)
                ))),
            };
            let store = match kept {
                Some(s) => s,
                None => ctx.store()?,
            };
            (lease, store)
        }
    };
    // Fleet mode: the database half of the lease, with its fencing token;
    // every later write of the turn is conditional on it.
    let turn_id = new_turn_id();
    let wait_left = wait_until.saturating_duration_since(Instant::now());
    let fleet = tokio::select! {
        f = crate::fleet::acquire(ctx, &mut store, agent, Some(&turn_id), wait_left) => f?,
        _ = aborted(abort) => return Ok(Prepared::Early(Box::new(TurnSummary::interrupted_waiting(
            agent
        )))),
    };
    crate::sweep::reclaim(ctx, &mut store, agent, &cap)?;
    let session = match sessions::get(&store.conn, agent)? {
        Some(s) => {
            if req.finished_is_nothing && refuse_finished(&s).is_err() {
                return Ok(Prepared::Early(Box::new(TurnSummary::nothing(agent))));
            }
            refuse_finished(&s)?;
            s
        }
        None => session,
    };
    // 4. Claim, build the user turn, record the start.
    let runtime = runtime::for_session(&session).map_err(usage)?;
    let row = start_row(
        &session,
        turn_id,
        store.conn.is_pg().then(|| ctx.config.host_id.clone()),
    );
    let Some((claimed, baseline)) = claim_and_insert(&mut store, req, &row)? else {
        return Ok(Prepared::Early(Box::new(TurnSummary::nothing(agent))));
    };
    let row = TurnRow {
        mail_ids: claimed.iter().map(|m| m.id.clone()).collect(),
        ..row
    };
    let tag = TurnTag {
        run_id: session.run_id.clone(),
        agent_name: agent.to_string(),
        turn_id: row.turn_id.clone(),
    };
    let mut events_conn = match events_ahead {
        Some(h) => match h.await {
            Ok(r) => r?,
            // The opening task panicked (a bug): open it here instead.
            Err(_) => ctx.events()?,
        },
        None => ctx.events()?,
    };
    if let Some(f) = &fleet {
        events_conn.set_fence(Some(f.fence.clone()));
    }
    record_turn_start(&mut events_conn, &tag, &row, runtime.name())?;
    let limits = Limits::of(ctx, req, &cap);
    let mut lease = lease;
    let info = lease_info(ctx, &row, limits);
    let _ = lease.write_info(&info);
    let (log_dir, log) = open_log(ctx, &row, runtime.name(), claimed.len(), limits)?;
    Ok(Prepared::Turn(Box::new(Turn {
        store,
        events: Some(events_conn),
        metrics: None,
        text: render_turn(req.message.as_deref(), &claimed),
        resume_id: row.resume_requested.clone(),
        session,
        cap,
        runtime,
        lease,
        fleet,
        info,
        mail_count: claimed.len(),
        baseline,
        tag,
        limits,
        started: Instant::now(),
        log_dir,
        log,
        row,
    })))
}

/// Starts opening `events.db` on a blocking thread: SQLite only (a fleet
/// turn holds no PostgreSQL connection while it waits for the lease), and
/// only a file that exists (a missing one is created where it always was,
/// after the claim). `None`: the caller opens it itself.
fn open_events_ahead(
    ctx: &Ctx,
) -> Option<tokio::task::JoinHandle<crate::store::Result<crate::store::Db>>> {
    if ctx.config.store != crate::store::Backend::Sqlite {
        return None;
    }
    let root = ctx.root.dir.clone();
    if !root.join("events.db").exists() {
        return None;
    }
    Some(tokio::task::spawn_blocking(move || events::open(&root)))
}

/// Is the agent `completed` or `zombie` now?
fn finished(store: &Store, agent: &str) -> Result<bool> {
    Ok(sessions::get(&store.conn, agent)?
        .and_then(|s| s.state())
        .is_some_and(crate::state::State::is_finished))
}

/// No `--message` and no due mail (or `--no-mail`).
fn nothing_to_deliver(store: &Store, req: &TurnRequest) -> Result<bool> {
    Ok(req.message.is_none()
        && (req.no_mail || mailstore::due_count(&store.conn, &req.agent, &clock::now())? == 0))
}

/// The turn row as it starts.
fn start_row(session: &Session, turn_id: String, host: Option<String>) -> TurnRow {
    TurnRow {
        turn_id,
        host,
        agent_name: session.agent_name.clone(),
        started_at: clock::now(),
        runner_pid: Some(std::process::id() as i64),
        initial_state: Some(session.state.clone()),
        resume_requested: session.claude_session_id.clone().filter(|s| !s.is_empty()),
        ..Default::default()
    }
}

/// Claims the due mail and inserts the turn row in one transaction, so
/// claims never exist without their turn row. `None`: nothing to deliver.
fn claim_and_insert(
    store: &mut Store,
    req: &TurnRequest,
    row: &TurnRow,
) -> Result<Option<(Vec<Message>, i64)>> {
    Ok(store.tx("claiming mail and starting the turn", |tx| {
        let claimed = if req.no_mail {
            Vec::new()
        } else {
            mailstore::claim_due(
                tx,
                &row.agent_name,
                &row.turn_id,
                &row.started_at,
                MAX_MAIL_PER_TURN,
            )?
        };
        if claimed.is_empty() && req.message.is_none() {
            return Ok(None);
        }
        let row = TurnRow {
            mail_ids: claimed.iter().map(|m| m.id.clone()).collect(),
            ..row.clone()
        };
        turns::insert_start(tx, &row)?;
        Ok(Some((claimed, mailstore::max_rowid(tx)?)))
    })?)
}

fn record_turn_start(
    conn: &mut crate::store::Db,
    tag: &TurnTag,
    row: &TurnRow,
    runtime: &str,
) -> Result<()> {
    events::insert_rows(
        conn,
        tag,
        &Batch {
            created_at: row.started_at.clone(),
            session_id: row.resume_requested.clone(),
            rows: vec![EventRow {
                event_type: "turn_start",
                level: "info",
                data: serde_json::json!({"turn_id": row.turn_id, "mail_ids": row.mail_ids, "runtime": runtime})
                    .to_string(),
                ..Default::default()
            }],
        },
    )?;
    Ok(())
}

/// The turn's log directory and `runner.log`, opened with its first line.
fn open_log(
    ctx: &Ctx,
    row: &TurnRow,
    runtime: &str,
    mail: usize,
    limits: Limits,
) -> Result<(PathBuf, TurnLog)> {
    let log_dir = ctx.root.turn_log_dir(&row.agent_name, &row.turn_id);
    crate::root::private_dir(&log_dir)?;
    let log = TurnLog::open(&log_dir.join("runner.log"));
    log.line(format!(
        "turn {} of {}: runtime {runtime}, {mail} mail, stall {}, grace {}, deadline {}",
        row.turn_id,
        row.agent_name,
        clock::human_duration(limits.stall),
        clock::human_duration(limits.grace),
        clock::human_duration(limits.deadline),
    ));
    Ok((log_dir, log))
}

/// What the lease file says before the agent is spawned.
fn lease_info(ctx: &Ctx, row: &TurnRow, limits: Limits) -> LeaseInfo {
    let me = std::process::id() as i32;
    let stall_ms = limits.stall.as_millis() as u64;
    LeaseInfo {
        turn_id: row.turn_id.clone(),
        runner_pid: me,
        runner_start_time: os::start_time(me),
        agent_pid: None,
        agent_start_time: None,
        host: ctx.config.host_id.clone(),
        acquired_at: row.started_at.clone(),
        deadline_at: Some(clock::format_ts(SystemTime::now() + limits.deadline)),
        stall_timeout_ms: Some(stall_ms),
        stall_limit_ms: Some(stall_ms),
    }
}
