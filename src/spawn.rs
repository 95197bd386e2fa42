//! Starting an agent process and ending every process of a turn (SPEC §6.5,
//! §6.7): the one place that supervises processes.
//!
//! The agent starts in its own process group with piped stdio and the turn's
//! environment. Ending a turn means: signal the agent, its group, every
//! descendant wherever it moved (the CLIs put tools in new sessions), and
//! every process carrying this turn's `RUNNER_TURN_ID`; by pid *and* by
//! group; SIGCONT after SIGTERM so stopped processes can act on it; SIGKILL
//! until nothing is left, whatever was found before (LESSONS 3). Orphans
//! re-parented to us (we are a child subreaper) are reaped here, never the
//! children tokio waits for. A process that leaves the session *and* scrubs
//! its environment is still found: it re-parents to the turn's runner (the
//! subreaper) and every such orphan born during the turn is the turn's.
//! Limit: under `serve`, an orphan of that kind born while several turns
//! run dies with the first of them to end.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::os::{self, Sig, TurnProcs};

/// Pids of agent processes that tokio waits for: the orphan reaper must
/// never take their exit status.
static OWNED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Variables removed from the agent's environment (SPEC §8).
const SCRUBBED: [&str; 4] = [
    "CLAUDECODE",
    "CLAUDE_CODE_ENTRYPOINT",
    "CLAUDE_CODE_SSE_PORT",
    "RUNNER_RESUME_SESSION_ID",
];

/// Starts `program args` in `cwd` in a new process group, stdio piped.
pub fn spawn_agent(
    program: &str,
    args: &[String],
    cwd: &Path,
    env: &BTreeMap<String, String>,
) -> std::io::Result<Child> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    for k in SCRUBBED {
        cmd.env_remove(k);
    }
    cmd.envs(env);
    let mut owned = OWNED.lock().unwrap_or_else(|e| e.into_inner());
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        owned.get_or_insert_with(HashSet::new).insert(pid as i32);
    }
    Ok(child)
}

/// The agent was reaped by tokio: its pid is free for the orphan reaper.
pub fn disown(pid: i32) {
    if let Some(set) = OWNED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        set.remove(&pid);
    }
}

/// The live processes of the turn (SPEC §6.7), never an agent of another
/// turn of this runner.
pub fn live(procs: &TurnProcs) -> Vec<i32> {
    let owned = OWNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default();
    procs.live_except(&owned)
}

/// Reaps zombie orphans re-parented to us.
pub fn reap_orphans() {
    let owned = OWNED.lock().unwrap_or_else(|e| e.into_inner());
    let empty = HashSet::new();
    os::reap_orphans(owned.as_ref().unwrap_or(&empty));
}

/// Sends `sig` to every live process of the turn, by pid and by group.
/// Returns how many processes were signalled.
pub fn signal_turn(procs: &TurnProcs, sig: Sig) -> usize {
    let live = live(procs);
    let mut groups: HashSet<i32> = HashSet::new();
    if let Some(a) = procs.agent_pid {
        groups.insert(a);
    }
    for &pid in &live {
        os::signal_pid(pid, sig);
        if sig == Sig::SIGTERM {
            os::signal_pid(pid, Sig::SIGCONT);
        }
        if let Some(s) = os::proc_stat(pid) {
            groups.insert(s.pgrp);
        }
    }
    let me = nix::unistd::getpgrp().as_raw();
    for g in groups {
        if g != me {
            os::signal_group(g, sig);
            if sig == Sig::SIGTERM {
                os::signal_group(g, Sig::SIGCONT);
            }
        }
    }
    live.len()
}

/// SIGKILL every process of the turn until none is left (or `limit` passes),
/// reaping our orphans. Returns whether anything had to be killed.
pub async fn kill_all(procs: &TurnProcs, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    let mut killed_any = false;
    loop {
        let n = signal_turn(procs, Sig::SIGKILL);
        reap_orphans();
        if n == 0 {
            return killed_any;
        }
        killed_any = true;
        if Instant::now() >= until {
            tracing::warn!(
                "{n} process(es) of the turn survived SIGKILL for {}",
                crate::clock::human_duration(limit)
            );
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Blocking variant for code without a runtime at hand (the sweep's shell).
pub fn kill_all_blocking(procs: &TurnProcs, limit: Duration) -> bool {
    let until = std::time::Instant::now() + limit;
    let mut killed_any = false;
    loop {
        let n = signal_turn(procs, Sig::SIGKILL);
        reap_orphans();
        if n == 0 {
            return killed_any;
        }
        killed_any = true;
        if std::time::Instant::now() >= until {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Ends what is left of a turn whose runner is gone: SIGTERM (+SIGCONT),
/// up to `grace` for it to go, then SIGKILL until nothing is left. Returns
/// whether anything was alive. Used by the sweep and by `runner stop`.
pub fn terminate_blocking(procs: &TurnProcs, grace: Duration) -> bool {
    if live(procs).is_empty() {
        return false;
    }
    signal_turn(procs, Sig::SIGTERM);
    let until = std::time::Instant::now() + grace;
    while std::time::Instant::now() < until && !live(procs).is_empty() {
        reap_orphans();
        std::thread::sleep(Duration::from_millis(10));
    }
    kill_all_blocking(procs, Duration::from_secs(2));
    true
}
