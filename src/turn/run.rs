//! Steps 5–8 of a turn (SPEC §6.1): spawn the agent CLI, stream its stdout
//! into events, watch it (stall, deadline, exit after the result, stdout at
//! EOF, stop and interrupt), escalate, and once it exits end whatever is
//! left of the turn and drain its pipes.
//!
//! Invariants: the stall watchdog is armed before the first line; one
//! escalation at a time (graceful stop → SIGTERM+SIGCONT → SIGKILL); when
//! this returns no process of the turn is alive (and if this code unwinds,
//! [`KillOnDrop`] kills them). Non-goal: deciding the outcome — the
//! [`Execution`] only records what happened.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::Instant;

mod pipes;

use super::io::{KillOnDrop, StdinCmd, join_opt, sleep_until_opt};
use super::outcome::{Abort, RunnerEnded};
use super::prepare::Turn;
use super::reason::{exit_words, lost_race};
use super::{ACTIVITY_EVERY, AbortRequest, TurnRequest};
use crate::clock;
use crate::ctx::Ctx;
use crate::error::Result;
use crate::os::{self, Sig, TurnProcs};
use crate::progress::{Progress, ProgressFn};
use crate::runtime::{Graceful, SpawnSpec, StdinPolicy, TurnInput};
use crate::spawn;
use crate::state::State;
use crate::store::sessions;
use crate::stream::{Live, Notice, StreamReport};
use crate::watchdog::{self, Fired};
use pipes::Io;

/// What executing the agent produced.
#[derive(Debug, Default)]
pub struct Execution {
    pub spawn_error: Option<String>,
    pub agent_pid: Option<i32>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub abort: Option<Abort>,
    pub stream: StreamReport,
    pub rows_written: u64,
    pub stderr_tail: String,
    pub stderr_dropped: u64,
    /// The runner ended the CLI itself (after its result, or after stdout closed).
    pub ended: Option<RunnerEnded>,
    pub leaked: bool,
    pub stdin_error: Option<String>,
    pub internal_error: Option<String>,
    /// The events writer stopped or stdout.ndjson failed: the turn was killed at once.
    pub output_lost: bool,
    /// ... because the disk under the root is full (exit 74, the sweep finishes the row).
    pub disk_full: bool,
    /// Fleet mode: the lease was lost; the turn's processes were ended and
    /// nothing more may be written (exit 75, SPEC §12.3).
    pub lease_lost: bool,
}

/// Steps 5–8: spawn, stream, watch, escalate, reap.
pub async fn run(
    ctx: &Ctx,
    req: &TurnRequest,
    turn: &mut Turn,
    abort: watch::Receiver<AbortRequest>,
) -> Execution {
    let mut r = Running {
        ctx,
        deadline_at: turn.started + turn.limits.deadline,
        progress: req.progress.clone(),
        turn,
    };
    let mut ex = Execution::default();
    // 5. Spawn in its own process group.
    let Some((mut child, procs, stdin_payload)) = r.spawn(&mut ex) else {
        return ex;
    };
    // If this code unwinds (a bug), the turn's processes die with it.
    let guard = KillOnDrop::new(procs.clone());
    // 6. Stdout → events + stdout.ndjson; stderr → stderr.log.
    let mut io = r.start_io(&mut child, stdin_payload, &mut ex);
    // While the agent runs, metrics.db is opened for the settle: after the
    // exit only its write is left (the runner mostly waits meanwhile).
    let root = ctx.root.dir.clone();
    r.turn.metrics = Some(tokio::task::spawn_blocking(move || {
        crate::store::metrics::open_existing(&root).ok().flatten()
    }));
    // ... and sessions.db and mail.db have their WALs trimmed, so that the
    // next turn's runner (the first to open them, which rebuilds each WAL's
    // index) reads few frames.
    crate::store::trim_wals_early(&r.turn.store.conn);
    // 7. Watch until the agent exits.
    let status = r.watch(&mut child, &procs, &mut io, &mut ex, abort).await;
    // 8. The agent exited: leftovers, leak timeout, kill, drain.
    r.wind_down(status, &procs, io, &mut ex).await;
    guard.disarm();
    spawn::reap_orphans();
    ex
}

struct Running<'a> {
    ctx: &'a Ctx,
    turn: &'a mut Turn,
    progress: Option<ProgressFn>,
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

/// Timers and flags of the watch loop.
struct Watch {
    step: Step,
    next_step_at: Option<Instant>,
    /// Exit after the result: set by the first end-of-turn line, never reset.
    result_exit_at: Option<Instant>,
    /// stdout at EOF without a result while the agent lives on.
    eof_exit_at: Option<Instant>,
    touched_lines: u64,
    first_event_done: bool,
    abort_open: bool,
}

impl Running<'_> {
    fn say(&self, p: Progress) {
        if let Some(f) = &self.progress {
            f(&p);
        }
    }

    fn log(&self, msg: impl AsRef<str>) {
        self.turn.log.line(msg);
    }

    /// Step 5: starts the agent CLI; records its pid. Returns the child, the
    /// processes of the turn and the user turn for its stdin.
    fn spawn(&mut self, ex: &mut Execution) -> Option<(Child, TurnProcs, Vec<u8>)> {
        let t = &*self.turn;
        let new_session_id = os::uuid_v4();
        let input = TurnInput {
            session: &t.session,
            capability: &t.cap,
            config: &self.ctx.config,
            text: &t.text,
            resume_id: t.resume_id.as_deref(),
            new_session_id: &new_session_id,
        };
        let spec = match t.runtime.spawn_spec(&input) {
            Ok(s) => s,
            Err(e) => {
                ex.spawn_error = Some(e);
                return None;
            }
        };
        let stdin_payload = t.runtime.stdin_bytes(&input);
        let cwd = Path::new(&t.session.worktree_path);
        if !cwd.is_dir() {
            ex.spawn_error = Some(format!(
                "the agent's worktree {} is not a directory",
                t.session.worktree_path
            ));
            return None;
        }
        crate::fault::hit("before_spawn");
        // Before the fork: every pid handed out from here on is counted.
        let forks_before = os::fork_count();
        let child = match spawn::spawn_agent(&spec.program, &spec.args, cwd, &self.agent_env(&spec))
        {
            Ok(c) => c,
            Err(e) => {
                ex.spawn_error = Some(format!("cannot start '{}': {e}", spec.program));
                return None;
            }
        };
        let pid = child.id().map(|p| p as i32);
        ex.agent_pid = pid;
        let procs = TurnProcs::new(t.turn_id(), pid, pid.and_then(os::start_time))
            .adopting_orphans()
            .born_after_forks(forks_before);
        self.record_pid(&procs);
        self.log(format!(
            "spawned {} (pid {}) args {}",
            spec.program,
            pid.map_or_else(|| "unknown".into(), |p| p.to_string()),
            serde_json::to_string(&spec.args).unwrap_or_default()
        ));
        crate::fault::hit("after_spawn");
        self.say(Progress::Started {
            turn_id: self.turn.turn_id().to_string(),
            pid: pid.map(|p| p as u32),
            mail: self.turn.mail_count,
        });
        Some((child, procs, stdin_payload))
    }

    /// The agent's environment (SPEC §8): the turn's ids, then the runtime's.
    fn agent_env(&self, spec: &SpawnSpec) -> BTreeMap<String, String> {
        let t = &*self.turn;
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert(
            "RUNNER_ROOT".into(),
            self.ctx.root.dir.display().to_string(),
        );
        env.insert("RUNNER_AGENT_NAME".into(), t.agent().into());
        env.insert("RUNNER_TURN_ID".into(), t.turn_id().into());
        env.insert("RUNNER_TASK_ID".into(), t.session.task_id.clone());
        env.insert("OVERSTORY_AGENT_NAME".into(), t.agent().into());
        env.insert("OVERSTORY_TASK_ID".into(), t.session.task_id.clone());
        env.insert(
            "OVERSTORY_WORKTREE_PATH".into(),
            t.session.worktree_path.clone(),
        );
        env.extend(spec.env.clone());
        env
    }

    /// `turn.pid` and the lease file name the agent.
    fn record_pid(&mut self, procs: &TurnProcs) {
        let Some(p) = procs.agent_pid else { return };
        let _ = std::fs::write(self.ctx.root.pid_path(self.turn.agent()), format!("{p}\n"));
        let t = &mut *self.turn;
        t.info.agent_pid = Some(p);
        t.info.agent_start_time = procs.agent_start;
        let _ = t.lease.write_info(&t.info);
    }

    /// Step 7: watchdogs (SPEC §6.5), stop and interruption (§6.6), until
    /// the agent process exits.
    async fn watch(
        &mut self,
        child: &mut Child,
        procs: &TurnProcs,
        io: &mut Io,
        ex: &mut Execution,
        mut abort_rx: watch::Receiver<AbortRequest>,
    ) -> std::io::Result<ExitStatus> {
        let live = io.live.clone();
        let mut lost = self.turn.fleet.as_ref().map(|f| f.lost());
        let watchdog = watchdog::watch(&live, self.turn.limits.stall, self.deadline_at);
        tokio::pin!(watchdog);
        let started = self.turn.started;
        let mut touch = tokio::time::interval_at(started + ACTIVITY_EVERY, ACTIVITY_EVERY);
        let mut w = Watch {
            step: Step::Idle,
            next_step_at: None,
            result_exit_at: None,
            eof_exit_at: None,
            touched_lines: 0,
            first_event_done: false,
            abort_open: true,
        };
        let (result_exit, leak) = (
            self.ctx.config.result_exit_timeout,
            self.ctx.config.leak_timeout,
        );
        loop {
            let judging = ex.abort.is_none() && ex.ended.is_none();
            tokio::select! {
                st = child.wait() => return st,
                Some(n) = io.notices.recv() => self.on_notice(n, &mut w, ex, procs, io),
                rep = join_opt(&mut io.ingest_task) => {
                    io.ingest_task = None;
                    self.on_stdout_closed(&rep, judging, &mut w);
                    io.stream_rep = Some(rep);
                },
                _ = sleep_until_opt(w.result_exit_at), if judging && w.result_exit_at.is_some() => {
                    self.end_the_cli(RunnerEnded::AfterResult(result_exit), &mut w, ex, procs, io);
                },
                _ = sleep_until_opt(w.eof_exit_at), if judging && w.eof_exit_at.is_some() => {
                    self.end_the_cli(RunnerEnded::AfterEof(leak), &mut w, ex, procs, io);
                },
                fired = &mut watchdog, if judging && w.result_exit_at.is_none() => {
                    self.on_watchdog(fired, &mut w, ex, procs, io);
                },
                r = abort_rx.changed(), if w.abort_open => {
                    if r.is_err() {
                        w.abort_open = false;
                        continue;
                    }
                    let req = *abort_rx.borrow_and_update();
                    self.on_abort(req, &mut w, ex, procs, io);
                },
                _ = sleep_until_opt(w.next_step_at), if w.next_step_at.is_some() => {
                    (w.step, w.next_step_at) = self.escalate(w.step, procs, io);
                },
                _ = lease_lost(&mut lost), if lost.is_some() && !ex.lease_lost => {
                    self.on_lease_lost(&mut w, ex, procs, io);
                },
                _ = touch.tick() => self.on_tick(&live, &mut w),
            }
        }
    }

    fn on_notice(&self, n: Notice, w: &mut Watch, ex: &mut Execution, procs: &TurnProcs, io: &Io) {
        match n {
            Notice::OutputLost { disk_full } => self.on_output_lost(disk_full, w, ex, procs, io),
            Notice::FirstEvent if !w.first_event_done => {
                w.first_event_done = true;
                if let Err(e) = self.cas(State::InTurn) {
                    self.log(format!("could not mark in_turn: {e}"));
                }
            }
            Notice::EndOfTurn => {
                if self.turn.runtime.stdin_policy() == StdinPolicy::KeepUntilEndOfTurn {
                    let _ = io.stdin_tx.send(StdinCmd::Close);
                }
                if w.result_exit_at.is_none() {
                    let t = self.ctx.config.result_exit_timeout;
                    w.result_exit_at = Some(Instant::now() + t);
                    self.log(format!(
                        "end-of-turn line: the agent has {} to exit",
                        clock::human_duration(t)
                    ));
                }
            }
            Notice::Progress(p) => self.say(p),
            _ => {}
        }
    }

    /// The turn's output can no longer be kept (a full disk, a dead events
    /// writer): an agent whose work would be lost must not go on working.
    fn on_output_lost(
        &self,
        disk_full: bool,
        w: &mut Watch,
        ex: &mut Execution,
        procs: &TurnProcs,
        io: &Io,
    ) {
        ex.disk_full |= disk_full;
        if !ex.output_lost {
            ex.output_lost = true;
            ex.leaked |= others_alive(procs);
            self.log("output can no longer be kept: SIGKILL now");
            (w.step, w.next_step_at) = self.escalate(Step::Term, procs, io);
        }
    }

    /// Fleet mode: the lease is gone (fenced, or not renewed before it
    /// expired). Another host may be repairing the turn already: end every
    /// process now and write nothing more (SPEC §12.3).
    fn on_lease_lost(&self, w: &mut Watch, ex: &mut Execution, procs: &TurnProcs, io: &Io) {
        ex.lease_lost = true;
        ex.leaked |= others_alive(procs);
        self.log("lease lost to the fleet: ending the turn's processes, writing nothing more");
        self.say(Progress::Escalating("lease lost".into()));
        (w.step, w.next_step_at) = self.escalate(Step::Graceful, procs, io);
    }

    /// stdout reached EOF: with a result, the exit-after-result timer runs;
    /// without one, none can come — the agent has the leak timeout to exit.
    fn on_stdout_closed(&self, rep: &StreamReport, judging: bool, w: &mut Watch) {
        let now = Instant::now();
        if rep.verdict.is_some() {
            w.result_exit_at
                .get_or_insert(now + self.ctx.config.result_exit_timeout);
        } else if judging {
            let leak = self.ctx.config.leak_timeout;
            w.eof_exit_at = Some(now + leak);
            self.log(format!(
                "stdout closed without an end-of-turn line: the agent has {} to exit",
                clock::human_duration(leak)
            ));
        }
    }

    /// The CLI is done producing but did not exit: end every process of the
    /// turn (SIGTERM, grace, SIGKILL; no graceful stop — the turn is over).
    fn end_the_cli(
        &self,
        why_ended: RunnerEnded,
        w: &mut Watch,
        ex: &mut Execution,
        procs: &TurnProcs,
        io: &Io,
    ) {
        ex.ended = Some(why_ended);
        ex.leaked |= others_alive(procs);
        let why = match why_ended {
            RunnerEnded::AfterResult(t) => format!(
                "the agent did not exit within {} of its result",
                clock::human_duration(t)
            ),
            RunnerEnded::AfterEof(t) => format!(
                "stdout closed without an end-of-turn line and the agent did not exit within {}",
                clock::human_duration(t)
            ),
        };
        self.log(format!("{why}; ending it"));
        self.say(Progress::Escalating(why));
        (w.step, w.next_step_at) = self.escalate(Step::Graceful, procs, io);
    }

    fn on_watchdog(
        &self,
        fired: Fired,
        w: &mut Watch,
        ex: &mut Execution,
        procs: &TurnProcs,
        io: &Io,
    ) {
        let (a, why) = match fired {
            Fired::Stall => (
                Abort::Stall,
                format!(
                    "no output for {}",
                    clock::human_duration(self.turn.limits.stall)
                ),
            ),
            Fired::Deadline => (Abort::Deadline, "turn deadline passed".to_string()),
        };
        ex.abort = Some(a);
        ex.leaked |= others_alive(procs);
        self.log(format!("watchdog: {why}; escalating"));
        self.say(Progress::Escalating(why));
        (w.step, w.next_step_at) = self.escalate(Step::Idle, procs, io);
    }

    fn on_abort(
        &self,
        req: AbortRequest,
        w: &mut Watch,
        ex: &mut Execution,
        procs: &TurnProcs,
        io: &Io,
    ) {
        match req {
            AbortRequest::None => {}
            AbortRequest::Graceful if ex.abort.is_none() => {
                ex.abort = Some(Abort::Signal);
                ex.leaked |= others_alive(procs);
                self.log("signal: aborting the turn");
                self.say(Progress::Escalating(
                    "a signal reached the runner (stop or interrupt)".into(),
                ));
                (w.step, w.next_step_at) = self.escalate(Step::Idle, procs, io);
            }
            _ => {
                ex.abort.get_or_insert(Abort::Signal);
                ex.leaked |= others_alive(procs);
                self.log("second signal: SIGKILL now");
                (w.step, w.next_step_at) = self.escalate(Step::Term, procs, io);
            }
        }
    }

    /// Every 2 s: refresh `last_activity` if lines arrived, and publish the
    /// current stall limit in the lease file when it changed (the sweep
    /// never judges below it).
    fn on_tick(&mut self, live: &Live, w: &mut Watch) {
        let n = live.lines();
        if n != w.touched_lines {
            w.touched_lines = n;
            let _ = sessions::touch(&self.turn.store.conn, self.turn.agent(), &clock::now());
        }
        let limit = watchdog::stall_limit(self.turn.limits.stall, live.tool_allowance());
        let limit_ms = Some(limit.as_millis() as u64);
        let t = &mut *self.turn;
        if t.info.stall_limit_ms != limit_ms {
            t.info.stall_limit_ms = limit_ms;
            let _ = t.lease.write_info(&t.info);
        }
    }

    fn cas(&self, to: State) -> Result<()> {
        let t = &*self.turn;
        let r = sessions::cas(&t.store.conn, t.agent(), to, &clock::now())?;
        if !r.applied() {
            self.log(format!(
                "state change to {to} lost the race: {}",
                lost_race(&r)
            ));
        }
        Ok(())
    }

    /// Performs the step after `from` and says when the next one is due.
    fn escalate(&self, from: Step, procs: &TurnProcs, io: &Io) -> (Step, Option<Instant>) {
        let now = Instant::now();
        let next = match from {
            Step::Idle => match self.turn.runtime.graceful_stop() {
                Graceful::StdinLine(line) => {
                    let _ = io.stdin_tx.send(StdinCmd::Write(line));
                    self.log("graceful stop: interrupt written to stdin");
                    Step::Graceful
                }
                Graceful::Signal(sig) => {
                    if let Some(p) = procs.agent_pid {
                        os::signal_pid(p, sig);
                    }
                    self.log(format!("graceful stop: {sig} to the agent"));
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
                self.log(format!("SIGTERM+SIGCONT to {n} process(es)"));
            }
            Step::Kill => {
                let n = spawn::signal_turn(procs, Sig::SIGKILL);
                self.log(format!("SIGKILL to {n} process(es)"));
            }
            _ => {}
        }
        let again = match next {
            Step::Kill => Duration::from_millis(100),
            _ => self.turn.limits.grace,
        };
        (next, Some(now + again))
    }

    /// Step 8: the agent exited. Wait up to the leak timeout for stdout to
    /// close, kill every process of the turn that is left, drain the pipes,
    /// and take the events connection back from the writer.
    async fn wind_down(
        &mut self,
        status: std::io::Result<ExitStatus>,
        procs: &TurnProcs,
        mut io: Io,
        ex: &mut Execution,
    ) {
        crate::fault::hit("after_exit");
        match status {
            Ok(st) => {
                ex.exit_code = st.code();
                ex.signal = st.signal();
            }
            Err(e) => ex.internal_error = Some(format!("waiting for the agent: {e}")),
        }
        if let Some(p) = procs.agent_pid {
            spawn::disown(p);
        }
        let left = spawn::live(procs);
        ex.leaked |= !left.is_empty();
        self.log(format!(
            "agent {}; {} other process(es) of the turn alive",
            exit_words(ex.exit_code, ex.signal),
            left.len()
        ));
        if let Some(t) = io.ingest_task.as_mut()
            && let Ok(r) = tokio::time::timeout(self.ctx.config.leak_timeout, &mut *t).await
        {
            io.stream_rep = r.ok();
            io.ingest_task = None;
        }
        // Nothing of the turn was alive at reap and nothing is left to start
        // one: the kill pass (another full /proc scan) has nothing to do.
        if (!left.is_empty()
            || ex.abort.is_some()
            || ex.ended.is_some()
            || ex.output_lost
            || ex.lease_lost)
            && spawn::kill_all(procs, Duration::from_secs(2)).await
        {
            self.log("killed the turn's leftover processes");
        }
        self.drain(io, ex).await;
    }
}

/// Resolves once the lease's `lost` flag is (or becomes) true; pending
/// forever once its sender is gone.
async fn lease_lost(rx: &mut Option<watch::Receiver<bool>>) {
    let Some(rx) = rx.as_mut() else {
        return std::future::pending().await;
    };
    if rx.wait_for(|lost| *lost).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Whether a process of the turn other than the agent itself is alive. An
/// abort kills those too, so `leaked` also counts what was alive when the
/// runner began ending the turn, not only what outlived the agent.
fn others_alive(procs: &TurnProcs) -> bool {
    spawn::live(procs)
        .iter()
        .any(|&p| Some(p) != procs.agent_pid)
}
