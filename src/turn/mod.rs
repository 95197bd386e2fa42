//! One turn of one agent, end to end (SPEC §6.1). The code reads like the
//! spec's steps: check, work out the input, take the lease and reclaim,
//! claim, spawn, stream, watch, reap, decide, write, release.
//!
//! Invariants: every path — spawn failure, database error, signal, panic in
//! a task — ends with no live process of the turn, no `turn.pid`, the lease
//! released, and the turn row finished (or left unfinished only for the
//! sweep to finish when the runner itself dies). Decisions are made by
//! `outcome::decide`; this module gathers facts and executes.

pub mod outcome;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::capability::{self, Capability};
use crate::claim;
use crate::clock;
use crate::ctx::Ctx;
use crate::error::{Error, Result, usage};
use crate::lease::{Lease, LeaseInfo};
use crate::mail::{Died, render_turn, worker_died};
use crate::os::{self, Sig, TurnProcs};
use crate::root::check_name;
use crate::runtime::{self, Graceful, Runtime, StdinPolicy, TurnInput};
use crate::spawn;
use crate::state::State;
use crate::store::events::{self, Batch, EventRow, TurnTag};
use crate::store::mail::{self as mailstore, Scope};
use crate::store::sessions::{self, Session};
use crate::store::turns::{self, TurnRow};
use crate::stream::{self, Ingest, Live, Notice, StreamReport};
use crate::watchdog::{self, Fired};
use outcome::{Abort, Decision, Facts, Outcome, StopReason, decide};

/// At most this many messages are delivered by one turn.
pub const MAX_MAIL_PER_TURN: i64 = 50;
/// How often `last_activity` is refreshed while lines arrive.
pub const ACTIVITY_EVERY: Duration = Duration::from_secs(2);
/// Bytes of stderr kept for the turn row.
pub const STDERR_TAIL: usize = 2048;

/// What the operator (or serve) asks of a running turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortRequest {
    None,
    /// Abort with the grace periods (first SIGINT/SIGTERM, serve shutdown, stop).
    Graceful,
    /// Kill at once (a second signal).
    Kill,
}

/// One line of live progress.
#[derive(Debug, Clone)]
pub enum Progress {
    Started {
        turn_id: String,
        pid: Option<u32>,
        mail: usize,
    },
    Text(String),
    Tool(String),
    ToolDone {
        name: String,
        ms: Option<i64>,
        error: bool,
    },
    Result {
        clean: bool,
        text: Option<String>,
    },
    Escalating(String),
}

pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

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

fn private_file(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .ok()
}

/// The runner's own diagnostics for one turn (`runner.log`).
#[derive(Clone)]
struct TurnLog(Arc<Mutex<Option<File>>>);

impl TurnLog {
    fn line(&self, msg: impl AsRef<str>) {
        tracing::debug!("{}", msg.as_ref());
        if let Some(f) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = writeln!(f, "{} {}", clock::now(), msg.as_ref());
        }
    }
}

/// Runs one turn (SPEC §6.1). `abort` carries stop/interrupt requests.
pub async fn run(
    ctx: &Ctx,
    req: TurnRequest,
    abort: watch::Receiver<AbortRequest>,
) -> Result<TurnSummary> {
    // 1. Check the name, open the stores, read the session.
    let mut store = ctx.store()?;
    let (session, cap) = load_runnable(ctx, &store, &req.agent)?;
    let agent = req.agent.as_str();

    // 2. Work out the input (a cheap early exit; step 4 decides for real).
    if req.message.is_none()
        && (req.no_mail || mailstore::due_count(&store.conn, agent, &clock::now())? == 0)
    {
        return Ok(TurnSummary::nothing(agent));
    }

    // 3. Take the lease; reclaim what a dead earlier turn left; re-read.
    let mut abort = abort;
    let lock_path = ctx.root.lock_path(agent);
    let mut lease = tokio::select! {
        l = Lease::acquire(&lock_path, agent, req.wait) => l?,
        _ = aborted(&mut abort) => return Ok(TurnSummary::interrupted_waiting(agent)),
    };
    crate::sweep::reclaim(ctx, &mut store, agent, &cap)?;
    let (session, cap) = match sessions::get(&store.conn, agent)? {
        Some(s) => {
            refuse_finished(&s)?;
            (s, cap)
        }
        None => (session, cap),
    };

    // 4. Claim, build the user turn, record the start — one transaction, so
    // claims never exist without their turn row.
    let runtime = runtime::for_session(&session).map_err(usage)?;
    let turn_id = new_turn_id();
    let now = clock::now();
    let resume_id = session.claude_session_id.clone().filter(|s| !s.is_empty());
    let mut row = TurnRow {
        turn_id: turn_id.clone(),
        agent_name: agent.to_string(),
        started_at: now.clone(),
        runner_pid: Some(std::process::id() as i64),
        initial_state: Some(session.state.clone()),
        resume_requested: resume_id.clone(),
        ..Default::default()
    };
    let started = store.tx("claiming mail and starting the turn", |tx| {
        let claimed = if req.no_mail {
            Vec::new()
        } else {
            mailstore::claim_due(tx, agent, &turn_id, &now, MAX_MAIL_PER_TURN)?
        };
        if claimed.is_empty() && req.message.is_none() {
            return Ok(None);
        }
        row.mail_ids = claimed.iter().map(|m| m.id.clone()).collect();
        turns::insert_start(tx, &row)?;
        Ok(Some((claimed, mailstore::max_rowid(tx)?)))
    })?;
    let Some((claimed, baseline)) = started else {
        return Ok(TurnSummary::nothing(agent));
    };
    let text = render_turn(req.message.as_deref(), &claimed);
    let tag = TurnTag {
        run_id: session.run_id.clone(),
        agent_name: agent.to_string(),
        turn_id: turn_id.clone(),
    };
    let mut events_conn = ctx.events()?;
    events::insert_rows(
        &mut events_conn,
        &tag,
        &Batch {
            created_at: now.clone(),
            session_id: resume_id.clone(),
            rows: vec![EventRow {
                event_type: "turn_start",
                level: "info",
                data: serde_json::json!({"turn_id": turn_id, "mail_ids": row.mail_ids, "runtime": runtime.name()})
                    .to_string(),
                ..Default::default()
            }],
        },
    )?;

    let stall = ctx.config.stall_for(req.stall, cap.stall_timeout);
    let grace = req.grace.unwrap_or(ctx.config.grace);
    let deadline = req.deadline.unwrap_or(ctx.config.deadline);
    let started = Instant::now();
    let mut info = LeaseInfo {
        turn_id: turn_id.clone(),
        runner_pid: std::process::id() as i32,
        runner_start_time: os::start_time(std::process::id() as i32),
        agent_pid: None,
        agent_start_time: None,
        host: os::hostname(),
        acquired_at: now.clone(),
        deadline_at: Some(clock::format_ts(SystemTime::now() + deadline)),
        stall_timeout_ms: Some(stall.as_millis() as u64),
    };
    let _ = lease.write_info(&info);

    let log_dir = ctx.root.turn_log_dir(agent, &turn_id);
    crate::root::private_dir(&log_dir)?;
    let log = TurnLog(Arc::new(Mutex::new(private_file(
        &log_dir.join("runner.log"),
    ))));
    log.line(format!(
        "turn {turn_id} of {agent}: runtime {}, {} mail, stall {stall:?}, grace {grace:?}, deadline {deadline:?}",
        runtime.name(),
        claimed.len()
    ));

    let new_session_id = os::uuid_v4();
    let input = TurnInput {
        session: &session,
        capability: &cap,
        config: &ctx.config,
        text: &text,
        resume_id: resume_id.as_deref(),
        new_session_id: &new_session_id,
    };
    let mut run = Running {
        ctx,
        store,
        events: Some(events_conn),
        agent,
        turn_id: &turn_id,
        runtime: runtime.as_ref(),
        log: log.clone(),
        progress: req.progress.clone(),
        stall,
        grace,
        started,
        deadline_at: started + deadline,
    };
    let exec = run
        .execute(
            &input,
            &session,
            &log_dir,
            &tag,
            resume_id.clone(),
            &mut lease,
            &mut info,
            abort,
            claimed.len(),
        )
        .await;
    let mut store = run.store;

    // 9. Decide and write, in one transaction — unless the disk is full: then
    // nothing more can be written, the turn's processes are already dead, and
    // its row stays open for `runner sweep` to finish and replay.
    let summary = if exec.disk_full {
        log.line("disk full: the turn's processes were killed; free space, then run runner sweep");
        Err(Error::DiskFull {
            root: ctx.root.dir.display().to_string(),
        })
    } else {
        let mut events_conn = match run.events {
            Some(c) => c,
            None => ctx.events()?,
        };
        let stop_reason = read_stop_reason(&ctx.root.stop_reason_path(agent));
        finish(
            ctx,
            &mut store,
            &mut events_conn,
            &tag,
            &session,
            &cap,
            runtime.as_ref(),
            &row,
            baseline,
            exec,
            stop_reason,
            &log,
        )
    };

    // 10. Remove turn.pid, release the lease.
    let _ = std::fs::remove_file(ctx.root.pid_path(agent));
    let _ = std::fs::remove_file(ctx.root.stop_reason_path(agent));
    drop(lease);
    summary
}

/// Resolves once an abort has been requested.
async fn aborted(rx: &mut watch::Receiver<AbortRequest>) {
    loop {
        if *rx.borrow_and_update() != AbortRequest::None {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn read_stop_reason(path: &Path) -> Option<StopReason> {
    match std::fs::read_to_string(path).ok()?.trim() {
        "stalled" => Some(StopReason::Stalled),
        "deadline" => Some(StopReason::Deadline),
        _ => None,
    }
}

/// What executing the agent produced.
#[derive(Debug, Default)]
struct Execution {
    spawn_error: Option<String>,
    agent_pid: Option<i32>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    abort: Option<Abort>,
    stream: StreamReport,
    rows_written: u64,
    stderr_tail: String,
    leaked: bool,
    stdin_error: Option<String>,
    internal_error: Option<String>,
    /// The events writer stopped or stdout.ndjson failed: the turn was killed at once.
    output_lost: bool,
    /// ... because the disk under the root is full (exit 74, the sweep finishes the row).
    disk_full: bool,
}

struct Running<'a> {
    ctx: &'a Ctx,
    /// The turn's own connection (moved in for the run, taken back to finish).
    store: crate::store::Store,
    /// The turn's `events.db` connection: lent to the writer thread, then back.
    events: Option<rusqlite::Connection>,
    agent: &'a str,
    turn_id: &'a str,
    runtime: &'a dyn Runtime,
    log: TurnLog,
    progress: Option<ProgressFn>,
    stall: Duration,
    grace: Duration,
    started: Instant,
    deadline_at: Instant,
}

/// Escalation (SPEC §6.5): graceful stop → SIGTERM+SIGCONT → SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Idle,
    Graceful,
    Term,
    Kill,
}

impl Running<'_> {
    fn say(&self, p: Progress) {
        if let Some(f) = &self.progress {
            f(&p);
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &mut self,
        input: &TurnInput<'_>,
        session: &Session,
        log_dir: &Path,
        tag: &TurnTag,
        resume_id: Option<String>,
        lease: &mut Lease,
        info: &mut LeaseInfo,
        mut abort_rx: watch::Receiver<AbortRequest>,
        mail_count: usize,
    ) -> Execution {
        let mut ex = Execution::default();
        // 5. Spawn in its own process group.
        let spec = match self.runtime.spawn_spec(input) {
            Ok(s) => s,
            Err(e) => {
                ex.spawn_error = Some(e);
                return ex;
            }
        };
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        let root = self.ctx.root.dir.display().to_string();
        env.insert("RUNNER_ROOT".into(), root);
        env.insert("RUNNER_AGENT_NAME".into(), self.agent.into());
        env.insert("RUNNER_TURN_ID".into(), self.turn_id.into());
        env.insert("RUNNER_TASK_ID".into(), session.task_id.clone());
        env.insert("OVERSTORY_AGENT_NAME".into(), self.agent.into());
        env.insert("OVERSTORY_TASK_ID".into(), session.task_id.clone());
        env.insert(
            "OVERSTORY_WORKTREE_PATH".into(),
            session.worktree_path.clone(),
        );
        env.extend(spec.env.clone());
        let cwd = Path::new(&session.worktree_path);
        if !cwd.is_dir() {
            ex.spawn_error = Some(format!(
                "the agent's worktree {} is not a directory",
                session.worktree_path
            ));
            return ex;
        }
        crate::fault::hit("before_spawn");
        let mut child = match spawn::spawn_agent(&spec.program, &spec.args, cwd, &env) {
            Ok(c) => c,
            Err(e) => {
                ex.spawn_error = Some(format!("cannot start '{}': {e}", spec.program));
                return ex;
            }
        };
        let pid = child.id().map(|p| p as i32);
        ex.agent_pid = pid;
        let procs = TurnProcs::new(self.turn_id, pid, pid.and_then(os::start_time));
        // If this code unwinds (a bug), the turn's processes die with it.
        let guard = KillOnDrop(Some(procs.clone()));
        if let Some(p) = pid {
            let _ = std::fs::write(self.ctx.root.pid_path(self.agent), format!("{p}\n"));
            info.agent_pid = Some(p);
            info.agent_start_time = procs.agent_start;
            let _ = lease.write_info(info);
        }
        self.log.line(format!(
            "spawned {} (pid {pid:?}) args {:?}",
            spec.program, spec.args
        ));
        crate::fault::hit("after_spawn");
        self.say(Progress::Started {
            turn_id: self.turn_id.to_string(),
            pid: pid.map(|p| p as u32),
            mail: mail_count,
        });

        // Stdin: written concurrently with reading stdout (LESSONS 5).
        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<StdinCmd>();
        let stdin_task = child.stdin.take().map(|s| {
            tokio::spawn(feed_stdin(
                s,
                self.runtime.stdin_bytes(input),
                self.runtime.stdin_policy(),
                stdin_rx,
            ))
        });

        // 6. Stdout → events + stdout.ndjson; stderr → stderr.log.
        let (stop_tx, stop_rx) = watch::channel(false);
        let conn = match self.events.take() {
            Some(c) => Ok(c),
            None => crate::store::events::open(&self.ctx.root.dir),
        };
        let writer = match conn.and_then(|c| events::Writer::start(c, tag.clone())) {
            Ok(w) => Some(w),
            Err(e) => {
                ex.internal_error = Some(format!("events writer: {e}"));
                None
            }
        };
        let live = Live::new(self.started);
        let (notice_tx, mut notices) = mpsc::unbounded_channel::<Notice>();
        let ingest_task = match (
            child.stdout.take(),
            writer.as_ref().and_then(|w| w.sender()),
        ) {
            (Some(out), Some(sender)) => Some(tokio::spawn(stream::ingest(
                out,
                Ingest {
                    max_line: self.ctx.config.max_line,
                    parser: self.runtime.parser(),
                    writer: sender,
                    ndjson: private_file(&log_dir.join("stdout.ndjson")),
                    live: live.clone(),
                    notices: notice_tx,
                    resume_requested: resume_id,
                    stop: stop_rx.clone(),
                    first_line_no: 0,
                    progress: self.progress.is_some(),
                    progress_window: None,
                },
            ))),
            _ => None,
        };
        let tail = Arc::new(Mutex::new(Vec::<u8>::new()));
        let stderr_task = child.stderr.take().map(|e| {
            tokio::spawn(drain_stderr(
                e,
                private_file(&log_dir.join("stderr.log")),
                tail.clone(),
                stop_rx.clone(),
            ))
        });

        // 7. Watch until the agent exits.
        let watch = watchdog::watch(&live, self.stall, self.deadline_at);
        tokio::pin!(watch);
        let mut step = Step::Idle;
        let mut next_step_at: Option<Instant> = None;
        let mut abort_open = true;
        let mut touch = tokio::time::interval_at(self.started + ACTIVITY_EVERY, ACTIVITY_EVERY);
        let mut touched_lines = 0u64;
        let mut first_event_done = false;
        let status = loop {
            tokio::select! {
                st = child.wait() => break st,
                Some(n) = notices.recv() => match n {
                    Notice::FirstEvent if !first_event_done => {
                        first_event_done = true;
                        if let Err(e) = self.cas(State::InTurn) {
                            self.log.line(format!("could not mark in_turn: {e}"));
                        }
                    }
                    Notice::EndOfTurn if self.runtime.stdin_policy() == StdinPolicy::KeepUntilEndOfTurn => {
                        let _ = stdin_tx.send(StdinCmd::Close);
                    }
                    Notice::Progress(p) => self.say(p),
                    Notice::OutputLost { disk_full } => {
                        ex.disk_full |= disk_full;
                        if !ex.output_lost {
                            // An agent whose output cannot be kept must not go on working.
                            ex.output_lost = true;
                            ex.leaked |= others_alive(&procs);
                            self.log.line("output can no longer be kept: SIGKILL now");
                            (step, next_step_at) = self.escalate(Step::Term, &procs, &stdin_tx);
                        }
                    }
                    _ => {}
                },
                fired = &mut watch, if ex.abort.is_none() => {
                    let (a, why) = match fired {
                        Fired::Stall => (Abort::Stall, format!("no output for {}", clock::human_duration(self.stall))),
                        Fired::Deadline => (Abort::Deadline, "turn deadline passed".to_string()),
                    };
                    ex.abort = Some(a);
                    ex.leaked |= others_alive(&procs);
                    self.log.line(format!("watchdog: {why}; escalating"));
                    self.say(Progress::Escalating(why));
                    (step, next_step_at) = self.escalate(Step::Idle, &procs, &stdin_tx);
                },
                r = abort_rx.changed(), if abort_open => {
                    if r.is_err() { abort_open = false; continue; }
                    let req = *abort_rx.borrow_and_update();
                    match req {
                        AbortRequest::None => {}
                        AbortRequest::Graceful if ex.abort.is_none() => {
                            ex.abort = Some(Abort::Signal);
                            ex.leaked |= others_alive(&procs);
                            self.log.line("signal: aborting the turn");
                            self.say(Progress::Escalating("a signal reached the runner (stop or interrupt)".into()));
                            (step, next_step_at) = self.escalate(Step::Idle, &procs, &stdin_tx);
                        }
                        _ => {
                            ex.abort.get_or_insert(Abort::Signal);
                            ex.leaked |= others_alive(&procs);
                            self.log.line("second signal: SIGKILL now");
                            (step, next_step_at) = self.escalate(Step::Term, &procs, &stdin_tx);
                        }
                    }
                },
                _ = sleep_until_opt(next_step_at), if next_step_at.is_some() => {
                    (step, next_step_at) = self.escalate(step, &procs, &stdin_tx);
                },
                _ = touch.tick() => {
                    let n = live.lines();
                    if n != touched_lines {
                        touched_lines = n;
                        let _ = sessions::touch(&self.store.conn, self.agent, &clock::now());
                    }
                }
            }
        };
        // 8. The agent exited: leftovers, leak timeout, kill, drain.
        crate::fault::hit("after_exit");
        match status {
            Ok(st) => {
                ex.exit_code = st.code();
                ex.signal = st.signal();
            }
            Err(e) => ex.internal_error = Some(format!("waiting for the agent: {e}")),
        }
        if let Some(p) = pid {
            spawn::disown(p);
        }
        let left = procs.live();
        ex.leaked |= !left.is_empty();
        self.log.line(format!(
            "agent exited: code {:?} signal {:?}; {} other process(es) of the turn alive",
            ex.exit_code,
            ex.signal,
            left.len()
        ));
        let mut ingest_task = ingest_task;
        let mut stream_rep: Option<StreamReport> = None;
        if let Some(t) = ingest_task.as_mut()
            && let Ok(r) = tokio::time::timeout(self.ctx.config.leak_timeout, &mut *t).await
        {
            stream_rep = r.ok();
            ingest_task = None;
        }
        // Nothing of the turn was alive at reap and nothing is left to start
        // one: the kill pass (another full /proc scan) has nothing to do.
        if (!left.is_empty() || ex.abort.is_some() || ex.output_lost)
            && spawn::kill_all(&procs, Duration::from_secs(2)).await
        {
            self.log.line("killed the turn's leftover processes");
        }
        // Nothing of the turn is alive: stdout closes now unless a process
        // escaped (left the session and scrubbed its environment).
        let drain = Duration::from_millis(500);
        if let Some(mut t) = ingest_task {
            match tokio::time::timeout(drain, &mut t).await {
                Ok(r) => stream_rep = r.ok(),
                Err(_) => {
                    self.log
                        .line("stdout still open after every process was killed; stopped reading");
                    let _ = stop_tx.send(true);
                    stream_rep = t.await.ok();
                }
            }
        }
        ex.stream = stream_rep.unwrap_or_default();
        if let Some(t) = stderr_task {
            let _ = tokio::time::timeout(drain, t).await;
        }
        let _ = stop_tx.send(true);
        drop(stdin_tx);
        if let Some(t) = stdin_task
            && let Ok(Some(e)) = t.await
        {
            self.log.line(format!("stdin: {e}"));
            ex.stdin_error = Some(e);
        }
        if let Some(w) = writer {
            match tokio::task::spawn_blocking(move || w.finish()).await {
                Ok((r, conn)) => {
                    self.events = conn;
                    match r {
                        Ok(n) => ex.rows_written = n,
                        Err(e) => {
                            ex.disk_full |= matches!(e, crate::store::StoreError::DiskFull { .. });
                            ex.internal_error = Some(format!("events writer: {e}"));
                        }
                    }
                }
                Err(e) => ex.internal_error = Some(format!("events writer: {e}")),
            }
        }
        guard.disarm();
        let t = tail.lock().unwrap_or_else(|e| e.into_inner()).clone();
        ex.stderr_tail = String::from_utf8_lossy(&t).into_owned();
        spawn::reap_orphans();
        ex
    }

    fn cas(&self, to: State) -> Result<()> {
        let r = sessions::cas(&self.store.conn, self.agent, to, &clock::now())?;
        if !r.applied() {
            self.log
                .line(format!("state change to {to} lost the race: {r:?}"));
        }
        Ok(())
    }

    /// Performs the step after `from` and says when the next one is due.
    fn escalate(
        &self,
        from: Step,
        procs: &TurnProcs,
        stdin: &mpsc::UnboundedSender<StdinCmd>,
    ) -> (Step, Option<Instant>) {
        let now = Instant::now();
        let next = match from {
            Step::Idle => match self.runtime.graceful_stop() {
                Graceful::StdinLine(line) => {
                    let _ = stdin.send(StdinCmd::Write(line));
                    self.log.line("graceful stop: interrupt written to stdin");
                    Step::Graceful
                }
                Graceful::Signal(sig) => {
                    if let Some(p) = procs.agent_pid {
                        os::signal_pid(p, sig);
                    }
                    self.log.line(format!("graceful stop: {sig} to the agent"));
                    Step::Graceful
                }
                Graceful::None => Step::Term,
            },
            Step::Graceful => Step::Term,
            Step::Term | Step::Kill => Step::Kill,
        };
        match next {
            Step::Term => {
                let n = spawn::signal_turn(procs, Sig::SIGTERM);
                self.log.line(format!("SIGTERM+SIGCONT to {n} process(es)"));
            }
            Step::Kill => {
                let n = spawn::signal_turn(procs, Sig::SIGKILL);
                self.log.line(format!("SIGKILL to {n} process(es)"));
            }
            _ => {}
        }
        let again = match next {
            Step::Kill => Duration::from_millis(100),
            _ => self.grace,
        };
        (next, Some(now + again))
    }
}

/// Kills every process of a turn when dropped, unless disarmed: the turn's
/// processes never outlive a runner that unwinds.
struct KillOnDrop(Option<TurnProcs>);

impl KillOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            spawn::kill_all_blocking(&p, Duration::from_secs(2));
        }
    }
}

/// Whether a process of the turn other than the agent itself is alive. An
/// abort kills those too, so `leaked` also counts what was alive when the
/// runner began ending the turn, not only what outlived the agent.
fn others_alive(procs: &TurnProcs) -> bool {
    procs.live().iter().any(|&p| Some(p) != procs.agent_pid)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug)]
enum StdinCmd {
    Write(Vec<u8>),
    Close,
}

/// Writes the user turn, then follows the policy. Returns a broken-pipe (or
/// other) error as a fact.
async fn feed_stdin(
    mut stdin: tokio::process::ChildStdin,
    payload: Vec<u8>,
    policy: StdinPolicy,
    mut ctl: mpsc::UnboundedReceiver<StdinCmd>,
) -> Option<String> {
    if let Err(e) = stdin.write_all(&payload).await {
        return Some(format!("writing the user turn: {e}"));
    }
    let _ = stdin.flush().await;
    if policy == StdinPolicy::CloseAfterWrite {
        return None;
    }
    while let Some(cmd) = ctl.recv().await {
        match cmd {
            StdinCmd::Write(b) => {
                if let Err(e) = stdin.write_all(&b).await {
                    return Some(format!("writing to stdin: {e}"));
                }
                let _ = stdin.flush().await;
            }
            StdinCmd::Close => break,
        }
    }
    None
}

async fn drain_stderr(
    mut err: tokio::process::ChildStderr,
    mut log: Option<File>,
    tail: Arc<Mutex<Vec<u8>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = err.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = stop.changed() => break,
        };
        if let Some(f) = log.as_mut() {
            let _ = f.write_all(&buf[..n]);
        }
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        t.extend_from_slice(&buf[..n]);
        if t.len() > STDERR_TAIL {
            let cut = t.len() - STDERR_TAIL;
            t.drain(..cut);
        }
    }
}

/// The line of the agent's stderr that explains a refusal: the first one
/// that reads like an error, else the last meaningful one. Banners the CLIs
/// print on every run (codex's PATH-alias warning, gemini's YOLO and colour
/// notices) are never it.
pub fn stderr_headline(tail: &str) -> Option<String> {
    const NOISE: [&str; 4] = [
        "WARNING: proceeding",
        "YOLO mode is enabled",
        "Warning: 256-color",
        "Loaded cached credentials",
    ];
    const ERRORISH: [&str; 12] = [
        "error", "invalid", "denied", "cannot", "can't", "refus", "unknown", "fail", "not ",
        "requires", "must", "no such",
    ];
    let lines: Vec<&str> = tail
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !NOISE.iter().any(|n| l.starts_with(n)))
        .collect();
    let errorish = |l: &&&str| {
        let low = l.to_ascii_lowercase();
        ERRORISH.iter().any(|e| low.contains(e))
    };
    lines
        .iter()
        .find(errorish)
        .or(lines.last())
        .map(|l| runtime::cut(l, 500))
}

#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &Ctx,
    store: &mut crate::store::Store,
    events_conn: &mut rusqlite::Connection,
    tag: &TurnTag,
    session: &Session,
    cap: &Capability,
    runtime: &dyn Runtime,
    start_row: &TurnRow,
    baseline: i64,
    ex: Execution,
    stop_reason: Option<StopReason>,
    log: &TurnLog,
) -> Result<TurnSummary> {
    let agent = session.agent_name.as_str();
    let turn_id = start_row.turn_id.as_str();
    let s = &ex.stream;
    let unknown_resume = if start_row.resume_requested.is_some() {
        runtime.unknown_resume(
            &ex.stderr_tail,
            ex.exit_code,
            s.result.result_text.as_deref(),
        )
    } else {
        None
    };
    let now_t = SystemTime::now();
    let now = clock::format_ts(now_t);
    let cfg = &ctx.config;
    let (decision, final_state) = store.tx("finishing the turn", |tx| {
        let state_now = sessions::current(tx, agent)?.and_then(|s| State::parse(&s));
        let terminal = mailstore::terminal_since(tx, agent, baseline, &cap.terminal_mail)?;
        let facts = Facts {
            abort: ex.abort,
            state_now,
            stop_reason,
            spawn_failed: ex.spawn_error.is_some(),
            any_event: s.valid_events > 0,
            exit_code: ex.exit_code,
            signal: ex.signal,
            verdict: s.verdict,
            terminal_mail: terminal,
            on_idle: cap.on_idle,
            unknown_resume: unknown_resume.is_some(),
        };
        let d = decide(&facts);
        let reason = reason_for(&d, &ex, unknown_resume.as_deref());
        let settled = claim::settle(
            tx,
            Scope::Turn(turn_id),
            d.claims,
            now_t,
            cfg.max_tries,
            cfg.backoff_base,
            reason.as_deref().unwrap_or(d.outcome.as_str()),
        )?;
        let d = outcome::after_retries(&d, settled.dead > 0);
        if let Some(to) = d.final_state {
            let r = sessions::cas(tx, agent, to, &now)?;
            if !r.applied() {
                log.line(format!("final state {to} lost the race: {r:?}"));
            }
        }
        if unknown_resume.is_some() {
            sessions::set_session_id(tx, agent, None)?;
        } else if let Some(id) = &s.session_id {
            sessions::set_session_id(tx, agent, Some(id))?;
        }
        sessions::touch(tx, agent, &now)?;
        let reason = reason_for(&d, &ex, unknown_resume.as_deref());
        if let (Some(why), Some(parent)) = (d.worker_died, session.parent_agent.as_deref())
            && !parent.is_empty()
        {
            let why = if d.outcome == Outcome::Exited
                || d.outcome == Outcome::Stopped
                || why == "retries exhausted"
            {
                why.to_string()
            } else {
                reason.clone().unwrap_or_else(|| why.to_string())
            };
            let m = worker_died(&Died {
                agent,
                capability: &session.capability,
                task_id: &session.task_id,
                parent,
                reason: &why,
                last_activity: &now,
                turn_id: Some(turn_id),
            });
            mailstore::insert(tx, &m, &now)?;
        }
        let final_state = sessions::current(tx, agent)?;
        let (mut input_tokens, mut output_tokens) = (s.result.input_tokens, s.result.output_tokens);
        if runtime.cumulative_usage()
            && let Some(sid) = &s.session_id
        {
            let (i, o) = turns::tokens_before(tx, agent, sid, turn_id)?;
            input_tokens = input_tokens.map(|t| (t - i).max(0));
            output_tokens = output_tokens.map(|t| (t - o).max(0));
        }
        let clean = matches!(
            d.outcome,
            Outcome::Done | Outcome::Exited | Outcome::Waiting
        );
        let show_stderr = s.valid_events == 0 || !clean;
        let row = TurnRow {
            ended_at: Some(now.clone()),
            agent_pid: ex.agent_pid.map(i64::from),
            final_state: final_state.clone(),
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
            stderr_tail: if show_stderr && !ex.stderr_tail.is_empty() {
                Some(ex.stderr_tail.clone())
            } else {
                None
            },
            leaked: ex.leaked,
            ..start_row.clone()
        };
        turns::finish(tx, &row)?;
        crate::fault::hit("during_final_write");
        Ok((d, final_state))
    })?;
    log.line(format!(
        "outcome {} → state {:?}",
        decision.outcome.as_str(),
        final_state
    ));
    let _ = events::insert_rows(
        events_conn,
        tag,
        &Batch {
            created_at: clock::now(),
            session_id: s.session_id.clone(),
            rows: vec![EventRow {
                event_type: "turn_end",
                level: if decision.exit_code == 0 { "info" } else { "warn" },
                data: serde_json::json!({"turn_id": turn_id, "outcome": decision.outcome.as_str(), "exit_code": decision.exit_code})
                    .to_string(),
                ..Default::default()
            }],
        },
    );
    if let Some(e) = &ex.internal_error {
        tracing::warn!("turn {turn_id}: {e}");
    }
    let row = turns::get(&store.conn, turn_id)?;
    let message = match (
        &decision.outcome,
        row.as_ref().and_then(|r| r.reason.clone()),
    ) {
        (o, Some(r)) => format!("{agent}: {} ({r})", o.as_str()),
        (o, None) => format!("{agent}: {}", o.as_str()),
    };
    Ok(TurnSummary {
        agent: agent.to_string(),
        turn_id: Some(turn_id.to_string()),
        outcome: Some(decision.outcome.as_str()),
        exit_code: decision.exit_code,
        nothing_to_deliver: false,
        message,
        turn: row,
    })
}

/// Human-readable why, for anything but `done`.
fn reason_for(d: &Decision, ex: &Execution, unknown_resume: Option<&str>) -> Option<String> {
    let s = &ex.stream;
    Some(match d.outcome {
        Outcome::Done => return None,
        Outcome::Stopped => "stopped by operator".into(),
        Outcome::Interrupted => "interrupted by a signal to the runner".into(),
        Outcome::Stalled => "stalled: no output within the stall timeout".into(),
        Outcome::Deadline => "the turn deadline passed".into(),
        Outcome::Exited => "clean exit without terminal mail".into(),
        Outcome::Waiting => "clean turn without terminal mail: waiting for mail".into(),
        Outcome::SpawnFailed => ex
            .spawn_error
            .clone()
            .unwrap_or_else(|| "could not start the agent".into()),
        Outcome::Refused => stderr_headline(&ex.stderr_tail).unwrap_or_else(|| {
            format!(
                "the agent exited with code {:?} and wrote nothing",
                ex.exit_code
            )
        }),
        Outcome::Failed => {
            if let Some(m) = unknown_resume {
                format!("unknown resume: {m}")
            } else if d.worker_died == Some("retries exhausted") {
                "retries exhausted".into()
            } else if s.verdict == Some(false) {
                format!(
                    "error result: {}",
                    s.result.result_text.clone().unwrap_or_default()
                )
            } else if let Some(sig) = ex.signal {
                format!("the agent was killed by signal {sig} without an end-of-turn line")
            } else {
                format!(
                    "the agent exited with code {:?} without an end-of-turn line",
                    ex.exit_code
                )
            }
        }
    })
}

/// Makes sure an error from a turn carries the right exit code.
pub fn is_busy(e: &Error) -> bool {
    crate::error::exit_code(e) == 4
}

#[cfg(test)]
mod tests {
    use super::stderr_headline;

    #[test]
    fn the_headline_is_the_error_not_the_banner() {
        let gemini = "YOLO mode is enabled. All tool calls will be automatically approved.\nInvalid auth method selected.\n";
        assert_eq!(
            stderr_headline(gemini).as_deref(),
            Some("Invalid auth method selected.")
        );
        let claude = "--dangerously-skip-permissions cannot be used with root/sudo privileges for security reasons\n";
        assert!(
            stderr_headline(claude)
                .unwrap()
                .starts_with("--dangerously-skip-permissions cannot")
        );
        let codex = "WARNING: proceeding, even though we could not create PATH aliases\nerror: unexpected argument '--bogus' found\n";
        assert_eq!(
            stderr_headline(codex).as_deref(),
            Some("error: unexpected argument '--bogus' found")
        );
        assert_eq!(
            stderr_headline("just talking\n").as_deref(),
            Some("just talking")
        );
        assert_eq!(stderr_headline("\n  \n"), None);
    }
}
