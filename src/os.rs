//! Every operating-system call that is not plain file I/O.
//!
//! Owns `/proc` reading (process state, parent, group, start time,
//! environment), signals by pid and by group, reaping, the child-subreaper
//! bit, sessions for the fake agent's grandchildren, and randomness. This is
//! the only module with `unsafe`. Invariants: a zombie (`Z`) or a pid whose
//! start time changed counts as dead (LESSONS 6); signalling a process that is
//! already gone is not an error. Non-goal: portability beyond Linux.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use nix::sys::signal::{self, Signal};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

pub use nix::sys::signal::Signal as Sig;

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// Start time in clock ticks since boot (field 22).
    pub start_time: u64,
}

impl ProcStat {
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Reads `/proc/<pid>/stat`; `None` when the process does not exist.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    // A turn's end scans every process of the host: no allocation per pid.
    let mut path = [0u8; 32];
    let mut w = &mut path[..];
    std::io::Write::write_fmt(&mut w, format_args!("/proc/{pid}/stat")).ok()?;
    let len = 32 - w.len();
    let path = std::str::from_utf8(&path[..len]).ok()?;
    let mut buf = [0u8; 1024];
    let mut f = std::fs::File::open(path).ok()?;
    let n = f.read(&mut buf).ok()?;
    parse_stat(pid, &buf[..n])
}

fn parse_stat(pid: i32, raw: &[u8]) -> Option<ProcStat> {
    // The command name is in parentheses and may itself hold spaces or ')'.
    let close = raw.iter().rposition(|&b| b == b')')?;
    let rest = raw.get(close + 2..)?;
    // rest starts at field 3 (state): index 0 = field 3. Only fields 3-6 and
    // 22 are read, so the walk stops at 22 (no Vec of the 50 fields). The
    // kernel writes ASCII here: bytes past field 22 are not checked for UTF-8.
    let mut f = rest
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty());
    let state = std::str::from_utf8(f.next()?).ok()?.chars().next()?;
    let ppid = num(f.next()?)?;
    let pgrp = num(f.next()?)?;
    let session = num(f.next()?)?;
    let start_time = num(f.nth(15)?)?;
    Some(ProcStat {
        pid,
        state,
        ppid,
        pgrp,
        session,
        start_time,
    })
}

/// A decimal field of `/proc/<pid>/stat` (`str::parse` on its bytes).
fn num<T: std::str::FromStr>(w: &[u8]) -> Option<T> {
    std::str::from_utf8(w).ok()?.parse().ok()
}

/// The start time of a live process, `None` when it is gone or a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    proc_stat(pid)
        .filter(|s| !s.is_zombie())
        .map(|s| s.start_time)
}

/// Alive means: exists, is not a zombie, and (when given) has the recorded
/// start time, so a reused pid is not mistaken for the old process.
pub fn is_alive(pid: i32, expected_start: Option<u64>) -> bool {
    match proc_stat(pid) {
        Some(s) if !s.is_zombie() => expected_start.is_none_or(|t| t == s.start_time),
        _ => false,
    }
}

/// Every pid in `/proc`. Read with `readdir(3)` and no allocation per
/// entry: `std::fs::read_dir` allocates (and frees) twice per entry, most of
/// what a turn's end-of-turn scan of a few hundred processes cost.
pub fn all_pids() -> Vec<i32> {
    use nix::libc;
    // SAFETY: a NUL-terminated path; the result is checked for NULL.
    let dir = unsafe { libc::opendir(c"/proc".as_ptr()) };
    if dir.is_null() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(512);
    loop {
        // SAFETY: `dir` is an open directory stream, read by this thread only.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            break;
        }
        // SAFETY: `d_name` of the entry just returned is NUL-terminated and
        // valid until the next readdir on `dir`; it is copied out before.
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        if let Some(pid) = std::str::from_utf8(name.to_bytes())
            .ok()
            .and_then(|n| n.parse::<i32>().ok())
        {
            out.push(pid);
        }
    }
    // SAFETY: `dir` came from opendir and is closed once.
    unsafe { libc::closedir(dir) };
    out
}

/// True when `/proc/<pid>/environ` holds exactly `needle` (`KEY=value`).
pub fn environ_contains(pid: i32, needle: &[u8]) -> bool {
    let Some(env) = read_proc(format!("/proc/{pid}/environ"), 8 * 1024) else {
        return false;
    };
    holds_entry(&env, needle)
}

/// Whether the environment of `pid` has an entry starting with `prefix`
/// (`NAME=`: the variable is set, to any value).
pub fn environ_has(pid: i32, prefix: &[u8]) -> bool {
    let Some(env) = read_proc(format!("/proc/{pid}/environ"), 8 * 1024) else {
        return false;
    };
    holds_prefix(&env, prefix)
}

/// Whether the NUL-separated `env` has an entry starting with `prefix`.
fn holds_prefix(env: &[u8], prefix: &[u8]) -> bool {
    !prefix.contains(&0)
        && memchr::memmem::find_iter(env, prefix).any(|i| i == 0 || env[i - 1] == 0)
}

/// Whether the NUL-separated `env` has an entry equal to `needle`: an
/// occurrence bounded by NULs (or the ends). memmem, not a byte-by-byte
/// split: a turn's end reads the environment of every process born since
/// its agent.
fn holds_entry(env: &[u8], needle: &[u8]) -> bool {
    // No entry holds a NUL.
    !needle.contains(&0)
        && memchr::memmem::find_iter(env, needle).any(|i| {
            let end = i + needle.len();
            (i == 0 || env[i - 1] == 0) && (end == env.len() || env[end] == 0)
        })
}

/// How to recognise the processes of one turn.
#[derive(Debug, Clone)]
pub struct TurnProcs {
    /// The agent process (the leader of its own process group).
    pub agent_pid: Option<i32>,
    /// Its start time, to defeat pid reuse.
    pub agent_start: Option<u64>,
    /// `RUNNER_TURN_ID=<id>` as it appears in the environment.
    pub env_tag: Vec<u8>,
    /// Also claim every orphan re-parented to the caller (a child subreaper)
    /// since the agent started: set only by the runner of the turn itself.
    pub adopt_orphans: bool,
    /// The host's fork counter read just before the agent was spawned: lets
    /// a scan skip the processes born before the agent (see [`TurnProcs::live`]).
    pub forks_before_spawn: Option<u64>,
}

impl TurnProcs {
    pub fn new(turn_id: &str, agent_pid: Option<i32>, agent_start: Option<u64>) -> Self {
        TurnProcs {
            agent_pid,
            agent_start,
            env_tag: format!("RUNNER_TURN_ID={turn_id}").into_bytes(),
            adopt_orphans: false,
            forks_before_spawn: None,
        }
    }

    /// The same turn, with the fork counter read before its agent was
    /// spawned ([`fork_count`]): scans read only the processes born since.
    pub fn born_after_forks(mut self, forks: Option<u64>) -> Self {
        self.forks_before_spawn = forks;
        self
    }

    /// The same turn, seen by its own runner: orphans re-parented to it
    /// belong to the turn (SPEC §6.7).
    pub fn adopting_orphans(mut self) -> Self {
        self.adopt_orphans = true;
        self
    }

    /// Whether `s` is an orphan of this turn re-parented to us: a child of
    /// ours that we did not spawn (`owned`), born since the agent started,
    /// and not marked as another turn's.
    fn is_adopted(&self, s: &ProcStat, me: i32, owned: &HashSet<i32>) -> bool {
        self.adopt_orphans
            && s.ppid == me
            && !owned.contains(&s.pid)
            && self.agent_start.is_none_or(|t| s.start_time >= t)
            && (!environ_has(s.pid, b"RUNNER_TURN_ID=") || environ_contains(s.pid, &self.env_tag))
    }

    /// The live (non-zombie) processes of the turn: the agent, its process
    /// group, every descendant wherever it moved, and every process whose
    /// environment carries the turn id. Never includes the caller itself.
    ///
    /// Every one of them was born no earlier than the agent (a descendant,
    /// a member of the group the agent leads, an environment the turn gave,
    /// an orphan born since): with [`TurnProcs::forks_before_spawn`] the scan
    /// reads only the pids handed out since the agent's, which the kernel
    /// allocates in a cycle — from the agent's pid up to `ns_last_pid`,
    /// wrapping at `pid_max` — instead of every process on the host. It falls
    /// back to the whole of `/proc` when that cycle could have come round
    /// again: when the pids handed out since (at most the forks since) plus
    /// the tasks alive now (the in-use pids a cursor skips) reach a quarter of
    /// `pid_max`, or when any of the three counters cannot be read. The one
    /// difference from the whole scan: a process born before the agent in
    /// the same clock tick (start times count ticks) is not taken for one
    /// born since; none of those can belong to the turn.
    pub fn live(&self) -> Vec<i32> {
        self.live_except(&HashSet::new())
    }

    /// [`TurnProcs::live`], plus (when adopting) the orphans re-parented to
    /// us, except the pids in `owned` (agents we spawned and wait for).
    pub fn live_except(&self, owned: &HashSet<i32>) -> Vec<i32> {
        let me = std::process::id() as i32;
        let pids = self.born_since_agent().unwrap_or_else(all_pids);
        let stats: Vec<ProcStat> = pids.into_iter().filter_map(proc_stat).collect();
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for s in &stats {
            children.entry(s.ppid).or_default().push(s.pid);
        }
        let agent = self.agent_pid.filter(|&p| {
            stats
                .iter()
                .any(|s| s.pid == p && self.agent_start.is_none_or(|t| t == s.start_time))
        });
        let mut found: HashSet<i32> = HashSet::new();
        let mut stack: Vec<i32> = Vec::new();
        for s in &stats {
            if s.pid == me || s.pid <= 2 || s.ppid == 2 {
                continue; // ourselves, init, kernel threads
            }
            let in_group = agent.is_some_and(|a| s.pgrp == a);
            // A process started before the agent cannot carry this turn's
            // environment: skip reading its environ (the costly part of a scan).
            let may_carry_tag = self.agent_start.is_none_or(|t| s.start_time >= t);
            if Some(s.pid) == agent
                || in_group
                || (may_carry_tag && environ_contains(s.pid, &self.env_tag))
                || self.is_adopted(s, me, owned)
            {
                stack.push(s.pid);
            }
        }
        while let Some(p) = stack.pop() {
            if p == me || !found.insert(p) {
                continue;
            }
            if let Some(kids) = children.get(&p) {
                stack.extend(kids.iter().copied());
            }
        }
        stats
            .iter()
            .filter(|s| found.contains(&s.pid) && !s.is_zombie())
            .map(|s| s.pid)
            .collect()
    }
}

impl TurnProcs {
    /// The pids in `/proc` handed out since the agent's (the agent's
    /// included), or `None` when that cannot be told (see [`TurnProcs::live`]).
    fn born_since_agent(&self) -> Option<Vec<i32>> {
        let agent = self.agent_pid?;
        let before = self.forks_before_spawn?;
        let window = pid_window(agent, before)?;
        Some(
            all_pids()
                .into_iter()
                .filter(|&p| window.holds(p))
                .collect(),
        )
    }
}

/// The pids allocated since a process: `[first, last]`, cyclic in `1..max`.
#[derive(Debug, Clone, Copy)]
struct PidWindow {
    first: i32,
    last: i32,
    max: i32,
}

impl PidWindow {
    fn holds(&self, pid: i32) -> bool {
        let dist = |p: i32| (p - self.first).rem_euclid(self.max);
        pid > 0 && pid < self.max && dist(pid) <= dist(self.last)
    }
}

/// The window of pids allocated since `first` was, if the allocation cursor
/// cannot have gone round the whole cycle since (the forks counter was
/// `forks_before` just before `first` was allocated).
fn pid_window(first: i32, forks_before: u64) -> Option<PidWindow> {
    let max: i64 = read_small("/proc/sys/kernel/pid_max")?
        .trim()
        .parse()
        .ok()?;
    let last: i64 = read_small("/proc/sys/kernel/ns_last_pid")?
        .trim()
        .parse()
        .ok()?;
    // /proc/loadavg's fourth field: runnable/total tasks (each holds a pid).
    let loadavg = read_small("/proc/loadavg")?;
    let tasks: i64 = loadavg
        .split_ascii_whitespace()
        .nth(3)?
        .split('/')
        .nth(1)?
        .parse()
        .ok()?;
    let forks = fork_count()?;
    let since = i64::try_from(forks.checked_sub(forks_before)?).ok()?;
    if first <= 0 || i64::from(first) >= max || last <= 0 || last >= max {
        return None;
    }
    if since.checked_add(tasks)?.checked_mul(4)? >= max {
        return None;
    }
    Some(PidWindow {
        first,
        last: last as i32,
        max: max as i32,
    })
}

/// A small `/proc` file as text.
fn read_small(path: &str) -> Option<String> {
    String::from_utf8(read_proc(path, 64)?).ok()
}

/// Reads a `/proc` file whole in as few `read(2)`s as it allows: `/proc`
/// files report a size of 0, so `std::fs::read` stats the file and then
/// grows its buffer from a 32-byte probe (eight reads for `/proc/stat`).
/// `cap` is the expected size; a larger file still reads whole.
fn read_proc(path: impl AsRef<std::path::Path>, cap: usize) -> Option<Vec<u8>> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = Vec::with_capacity(cap);
    f.read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// The host's count of forks since boot (`processes` in `/proc/stat`;
/// threads included). Read before spawning an agent, it bounds how many
/// pids were handed out since (see [`TurnProcs::live`]).
pub fn fork_count() -> Option<u64> {
    let stat = read_proc("/proc/stat", 16 * 1024)?;
    let at = stat.windows(11).position(|w| w == b"\nprocesses ")? + 11;
    let rest = &stat[at..];
    let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.trim().parse().ok()
}

/// Sends `sig` to one pid; a process that is already gone is not an error.
pub fn signal_pid(pid: i32, sig: Signal) -> bool {
    pid > 0 && signal::kill(Pid::from_raw(pid), sig).is_ok()
}

/// Sends `sig` to a process group; a group that is already gone is not an error.
pub fn signal_group(pgid: i32, sig: Signal) -> bool {
    pgid > 1 && signal::killpg(Pid::from_raw(pgid), sig).is_ok()
}

/// Reaps `pid` if it is a zombie child of ours; never blocks.
pub fn reap(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// Reaps zombie children of this process that nobody else waits for
/// (descendants re-parented to us as subreaper). `owned` are the pids that
/// tokio waits for: never stolen from it.
pub fn reap_orphans(owned: &HashSet<i32>) {
    let me = std::process::id() as i32;
    for pid in children_of_self() {
        if owned.contains(&pid) {
            continue;
        }
        if let Some(s) = proc_stat(pid)
            && s.ppid == me
            && s.is_zombie()
        {
            reap(pid);
        }
    }
}

/// Our children, from `/proc/self/task/*/children` (no full `/proc` scan).
pub fn children_of_self() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        match read_proc(t.path().join("children"), 256).and_then(|b| String::from_utf8(b).ok()) {
            Some(list) => out.extend(
                list.split_ascii_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            ),
            // A kernel without CONFIG_PROC_CHILDREN: every pid is a candidate.
            None => return all_pids(),
        }
    }
    out
}

/// Caps glibc's malloc at two arenas for this process (`M_ARENA_MAX`),
/// before any thread starts. Why: glibc gives each thread that meets a busy
/// arena one of its own, and memory freed there stays there; a flooding
/// turn's reader, events writer and checkpoint thread each kept megabytes
/// (live 240k-line turn on a loaded machine: 24–29 MB peak RSS, with two
/// arenas 22–24 MB). One arena cost 10–15 % of ingest speed (the reader and
/// the writer then take turns at one lock); two cost nothing measurable.
pub fn cap_malloc_arenas() {
    // SAFETY: mallopt only sets a malloc parameter; called from main before
    // any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
}

/// Makes this process a child subreaper, so orphaned descendants of its
/// agents re-parent to it instead of init (SPEC §6.7).
pub fn become_subreaper() -> bool {
    nix::sys::prctl::set_child_subreaper(true).is_ok()
}

/// Runs `cmd` in a new session (`setsid`), as the agent CLIs do with their
/// tool commands. Used by the fake agent.
pub fn spawn_in_new_session(
    cmd: &mut std::process::Command,
) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn()
}

/// Ignores SIGTERM in this process (fake agent scenario).
pub fn ignore_sigterm() {
    // SAFETY: installing SIG_IGN has no handler code to be unsafe about.
    unsafe {
        let _ = signal::signal(Signal::SIGTERM, signal::SigHandler::SigIgn);
    }
}

/// Kills this process with `sig` (fake agent scenario: "exit by a signal").
pub fn raise(sig: Signal) {
    let _ = signal::kill(Pid::this(), sig);
}

/// Parses a signal name or number (`TERM`, `SIGKILL`, `9`).
pub fn parse_signal(s: &str) -> Option<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse().ok()
}

/// Space on the filesystem holding `path`: (bytes available to us, total bytes).
pub fn disk_space(path: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let unit = st.fragment_size() as u64;
    Some((
        st.blocks_available() as u64 * unit,
        st.blocks() as u64 * unit,
    ))
}

/// This machine's host name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// `n` random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // getrandom(2): one system call, not open + read + close of /dev/urandom.
    let mut got = 0;
    while got < N {
        // SAFETY: the kernel writes at most `N - got` bytes, into `buf[got..]`.
        let r = unsafe { nix::libc::getrandom(buf[got..].as_mut_ptr().cast(), N - got, 0) };
        if r <= 0 {
            break;
        }
        got += r as usize;
    }
    if got < N
        && let Ok(mut f) = std::fs::File::open("/dev/urandom")
    {
        let _ = f.read_exact(&mut buf);
    }
    buf
}

/// A random version-4 UUID, lower-case, hyphenated.
pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `n` random characters from `[a-z0-9]`.
pub fn random_alnum(n: usize) -> String {
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let bytes: [u8; 32] = random_bytes();
    // 256 % 36 = 4: rejection-free but slightly biased; fine for ids, and the
    // store's primary key catches the (astronomically rare) collision.
    bytes
        .iter()
        .take(n)
        .map(|b| ALPHA[(*b as usize) % 36] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let raw = b"123 (a) b) c) S 1 123 123 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 98765 0 0";
        let s = parse_stat(123, raw).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.pgrp, 123);
        assert_eq!(s.start_time, 98765);
    }

    /// The parser before the allocation-free one, kept as the reference.
    fn parse_stat_reference(pid: i32, raw: &[u8]) -> Option<ProcStat> {
        let close = raw.iter().rposition(|&b| b == b')')?;
        let rest = std::str::from_utf8(raw.get(close + 2..)?).ok()?;
        let f: Vec<&str> = rest.split_ascii_whitespace().collect();
        Some(ProcStat {
            pid,
            state: f.first()?.chars().next()?,
            ppid: f.get(1)?.parse().ok()?,
            pgrp: f.get(2)?.parse().ok()?,
            session: f.get(3)?.parse().ok()?,
            start_time: f.get(19)?.parse().ok()?,
        })
    }

    #[test]
    fn parse_stat_equals_the_reference_on_every_process_and_odd_input() {
        let mut seen = 0;
        for pid in all_pids() {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/stat")) else {
                continue;
            };
            assert_eq!(
                parse_stat(pid, &raw),
                parse_stat_reference(pid, &raw),
                "pid {pid}"
            );
            seen += 1;
        }
        assert!(seen > 0);
        let odd: [&[u8]; 9] = [
            b"",
            b"1 (x)",
            b"1 (x) S",
            b"1 (x) S 1 2 3",
            b"1 (x)  S  1\t2\n3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21",
            b"1 (x) S -1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 -20 21",
            b"1 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19",
            b"1 (x) \xc3\xa9 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
            b"1 (a) b) c) S 1 99999999999 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
        ];
        for raw in odd {
            assert_eq!(parse_stat(1, raw), parse_stat_reference(1, raw), "{raw:?}");
        }
    }

    #[test]
    fn holds_entry_equals_splitting_on_nul() {
        let envs: [&[u8]; 7] = [
            b"",
            b"A=1\0B=2\0",
            b"A=1\0B=2",
            b"XA=1\0A=1X\0",
            b"A=1",
            b"B=2\0\0A=1\0",
            b"=1\0B",
        ];
        for env in envs {
            for needle in [&b"A=1"[..], b"B=2", b"A=", b"=1\0B"] {
                assert_eq!(
                    holds_entry(env, needle),
                    env.split(|&b| b == 0).any(|kv| kv == needle),
                    "{env:?} {needle:?}"
                );
            }
        }
    }

    #[test]
    fn holds_prefix_finds_a_variable_set_to_anything() {
        let envs: [&[u8]; 6] = [
            b"",
            b"RUNNER_TURN_ID=t-1\0B=2\0",
            b"B=2\0RUNNER_TURN_ID=\0",
            b"XRUNNER_TURN_ID=t\0",
            b"B=RUNNER_TURN_ID=t\0",
            b"RUNNER_TURN_ID",
        ];
        for env in envs {
            assert_eq!(
                holds_prefix(env, b"RUNNER_TURN_ID="),
                env.split(|&b| b == 0)
                    .any(|kv| kv.starts_with(b"RUNNER_TURN_ID=")),
                "{env:?}"
            );
        }
        assert!(holds_prefix(b"A=1\0RUNNER_TURN_ID=t-2", b"RUNNER_TURN_ID="));
    }

    #[test]
    fn pid_window_is_cyclic() {
        let w = PidWindow {
            first: 32000,
            last: 500,
            max: 32768,
        };
        for p in [32000, 32001, 32767, 1, 300, 500] {
            assert!(w.holds(p), "{p}");
        }
        for p in [501, 20000, 31999, 32768, 0, -1] {
            assert!(!w.holds(p), "{p}");
        }
        let w = PidWindow {
            first: 100,
            last: 100,
            max: 32768,
        };
        assert!(w.holds(100) && !w.holds(101) && !w.holds(99));
    }

    /// The scan of the pids born since the agent finds what the scan of all
    /// of `/proc` finds: the agent, its group, its descendants that left the
    /// group, a process born since that carries the turn id; not one born
    /// before the agent that carries it too.
    #[test]
    fn scan_since_the_agent_equals_the_full_scan() {
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        let tag = format!("RUNNER_TURN_ID=t-os-{}", std::process::id());
        let (k, v) = tag.split_once('=').unwrap();
        let spawn = |args: &[&str], group: bool| {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]).env(k, v).stdin(Stdio::null());
            if group {
                c.process_group(0);
            }
            c.spawn().unwrap()
        };
        let mut old = spawn(&["sleep", "30"], false);
        // Start times count clock ticks: the full scan cannot tell a process
        // born in the agent's tick before it (the scan since the agent can).
        // Let the tick of `old` pass before the agent starts.
        let old_tick = start_time(old.id() as i32).unwrap();
        let hz = 100.0; // USER_HZ, the unit of /proc's start times
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < until {
            let up: f64 = std::fs::read_to_string("/proc/uptime")
                .unwrap()
                .split_ascii_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            if (up * hz) as u64 > old_tick + 1 {
                break;
            }
            std::thread::yield_now();
        }
        let forks = fork_count();
        assert!(forks.is_some());
        let mut agent = spawn(&["sh", "-c", "sleep 30 & setsid sleep 30 & wait"], true);
        let mut tagged = spawn(&["sleep", "30"], false);
        let apid = agent.id() as i32;
        let full = TurnProcs::new(
            &tag["RUNNER_TURN_ID=".len()..],
            Some(apid),
            start_time(apid),
        );
        let fast = full.clone().born_after_forks(forks);
        assert!(fast.born_since_agent().is_some());
        // The shell's children start when they start: scan until both scans
        // see them all and agree (a process that ends between the two scans
        // is the only allowed difference, so retry then).
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let sorted = |mut v: Vec<i32>| {
            v.sort_unstable();
            v
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        while std::time::Instant::now() < until {
            a = sorted(full.live());
            b = sorted(fast.live());
            let sleeps = a
                .iter()
                .filter(|&&p| {
                    std::fs::read(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| c.starts_with(b"sleep\0"))
                })
                .count();
            if a == b && sleeps == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(a, b);
        assert!(a.contains(&apid) && a.contains(&(tagged.id() as i32)));
        assert!(!a.contains(&(old.id() as i32)));
        for p in a {
            signal_pid(p, Signal::SIGKILL);
        }
        signal_pid(old.id() as i32, Signal::SIGKILL);
        let _ = (old.wait(), agent.wait(), tagged.wait());
    }

    #[test]
    fn self_is_alive_with_its_start_time() {
        let me = std::process::id() as i32;
        let t = start_time(me).unwrap();
        assert!(is_alive(me, Some(t)));
        assert!(!is_alive(me, Some(t + 1)));
    }

    #[test]
    fn ids() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        let a = random_alnum(12);
        assert_eq!(a.len(), 12);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_eq!(parse_signal("TERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
    }
}
