//! Hosts and agents in fleet mode (SPEC §12.2): registering this host,
//! refusing agents pinned to another host, the heartbeat `serve` runs, and
//! what `runner hosts` shows.
//!
//! A host is `ctx.config.host_id`. On PostgreSQL every command that runs
//! turns or sweeps registers it (upserts its `hosts` row), `serve` also
//! beats every `[fleet] heartbeat` from a thread with its own connection
//! (nothing on the async runtime can delay a beat) and marks it `stopped`
//! on a clean exit. An agent's `sessions.host` pins it: `*` or NULL is
//! floating (any host may run it); another host's id makes `turn`, `nudge`
//! and `stop` here refuse with exit 2 naming that host, and `serve` skip it.
//!
//! The SQLite store is one host: nothing is registered, nothing is pinned
//! (`agent add --host` is refused), and `runner hosts` shows this host
//! alone with state `local`. SQL lives in `store::hosts`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::clock;
use crate::ctx::Ctx;
use crate::error::{Result, usage};
use crate::store::hosts::{self as hoststore, HostRow};
use crate::store::{Backend, Db, Store};

/// This runner's version, recorded on its host row.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The floating host: any host may run the agent.
pub const ANY: &str = "*";

/// Is the store PostgreSQL (fleet mode)?
pub fn fleet(ctx: &Ctx) -> bool {
    matches!(ctx.config.store, Backend::Postgres { .. })
}

/// Upserts this host's row (PostgreSQL; a no-op on SQLite).
pub fn register(ctx: &Ctx, store: &Store) -> Result<()> {
    if !store.conn.is_pg() {
        return Ok(());
    }
    hoststore::set_process_host(&ctx.config.host_id);
    hoststore::upsert(
        &store.conn,
        &ctx.config.host_id,
        std::process::id() as i64,
        VERSION,
    )?;
    Ok(())
}

/// The entry of a command on PostgreSQL: registers this host when the
/// command runs turns or sweeps (`register`), and refuses an agent pinned to
/// another host (`agent`). Nothing on SQLite.
pub fn enter(ctx: &Ctx, agent: Option<&str>, register_host: bool) -> Result<()> {
    if !fleet(ctx) {
        return Ok(());
    }
    let store = ctx.store()?;
    if register_host {
        register(ctx, &store)?;
    }
    if let Some(a) = agent {
        check_pinned(ctx, &store, a)?;
    }
    Ok(())
}

/// Does `host` (an agent's `sessions.host`) let this host run the agent?
pub fn allows(host: Option<&str>, this: &str) -> bool {
    match host {
        None => true,
        Some(h) => h == ANY || h == this,
    }
}

/// On PostgreSQL, refuses (exit 2) an agent pinned to another host.
pub fn check_pinned(ctx: &Ctx, store: &Store, agent: &str) -> Result<()> {
    if !store.conn.is_pg() {
        return Ok(());
    }
    let this = &ctx.config.host_id;
    match hoststore::agent_host(&store.conn, agent)? {
        Some(h) if !allows(Some(&h), this) => Err(usage(format!(
            "agent {agent} is pinned to host {h}; run this on {h} (this host is {this})"
        ))),
        _ => Ok(()),
    }
}

/// May this host run `agent`'s turns? (`serve`'s filter; always on SQLite.)
pub fn runs_here(ctx: &Ctx, conn: &Db, agent: &str) -> Result<bool> {
    if !conn.is_pg() {
        return Ok(true);
    }
    let h = hoststore::agent_host(conn, agent)?;
    Ok(allows(h.as_deref(), &ctx.config.host_id))
}

/// Checks `agent add --host H`: refused on SQLite (one host, nothing to
/// pin), else a name of the §1 pattern or `*`.
pub fn check_host_flag(ctx: &Ctx, host: &str) -> Result<()> {
    if !fleet(ctx) {
        return Err(usage(
            "--host needs the PostgreSQL store (fleet mode): the SQLite store is one host, where every agent runs",
        ));
    }
    if host != ANY && !crate::root::valid_name(host) {
        return Err(usage(format!(
            "invalid host '{}': use '*' or 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
            host.escape_debug()
        )));
    }
    Ok(())
}

/// A host's heartbeat: a thread with its own PostgreSQL connection that
/// sets `last_seen_at` every `every`, reconnecting after an error, until
/// stopped (or dropped).
pub struct Heartbeat {
    stop_tx: Option<mpsc::Sender<()>>,
    done_rx: mpsc::Receiver<()>,
    handle: Option<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    beats: Arc<AtomicU64>,
}

/// How long [`Heartbeat::stop`] waits for a beat in flight.
const STOP_WAIT: Duration = Duration::from_secs(5);

impl Heartbeat {
    /// Starts beating for `ctx`'s host (`None` on SQLite). The first beat
    /// comes one period after the start: the caller has just registered.
    pub fn start(ctx: &Ctx) -> Option<Heartbeat> {
        let Backend::Postgres { url, schema } = ctx.config.store.clone() else {
            return None;
        };
        let id = ctx.config.host_id.clone();
        let every = ctx.config.fleet.heartbeat;
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let stopping = Arc::new(AtomicBool::new(false));
        let beats = Arc::new(AtomicU64::new(0));
        let (s, b) = (stopping.clone(), beats.clone());
        let handle = std::thread::Builder::new()
            .name("runner-heartbeat".into())
            .spawn(move || {
                beat_loop(&url, &schema, &id, every, &stop_rx, &s, &b);
                let _ = done_tx.send(());
            })
            .ok()?;
        Some(Heartbeat {
            stop_tx: Some(stop_tx),
            done_rx,
            handle: Some(handle),
            stopping,
            beats,
        })
    }

    /// Successful beats so far.
    pub fn beats(&self) -> u64 {
        self.beats.load(Ordering::Relaxed)
    }

    /// Stops beating; waits (at most a few seconds) for a beat in flight,
    /// so that nothing beats after the caller marks the host stopped.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.stop_tx.take());
        if self.done_rx.recv_timeout(STOP_WAIT).is_ok()
            && let Some(h) = self.handle.take()
        {
            let _ = h.join();
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if self.stop_tx.is_some() {
            self.halt();
        }
    }
}

fn beat_loop(
    url: &str,
    schema: &str,
    id: &str,
    every: Duration,
    stop: &mpsc::Receiver<()>,
    stopping: &AtomicBool,
    beats: &AtomicU64,
) {
    let mut conn: Option<Db> = None;
    loop {
        match stop.recv_timeout(every) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        if conn.is_none() {
            match crate::store::pg::connect(url, schema) {
                Ok(mut c) => {
                    // A beat that hangs must not outlive a few periods; the
                    // name tells `pg_stat_activity` whose heartbeat it is.
                    let _ = c.batch_execute(&format!(
                        "SET statement_timeout = {}; SET application_name = 'runner-heartbeat {id}'",
                        every.as_millis().clamp(1000, 30_000)
                    ));
                    conn = Some(Db::pg(c));
                }
                Err(e) => {
                    tracing::warn!("heartbeat: {e}");
                    continue;
                }
            }
        }
        let Some(db) = &conn else { continue };
        let r = match hoststore::beat(db, id) {
            // The row is gone (deleted by hand): register again.
            Ok(false) => {
                hoststore::upsert(db, id, std::process::id() as i64, VERSION).map(|()| true)
            }
            r => r,
        };
        match r {
            Ok(_) => {
                beats.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("heartbeat: {e}; reconnecting");
                conn = None;
            }
        }
    }
}

/// `serve`'s host: registered at start, beating while it serves, marked
/// `stopped` by [`Serving::stopped`] on a clean exit. Nothing on SQLite.
pub struct Serving {
    ctx: Option<Ctx>,
    heartbeat: Option<Heartbeat>,
}

impl Serving {
    pub fn start(ctx: &Ctx) -> Result<Serving> {
        if !fleet(ctx) {
            return Ok(Serving {
                ctx: None,
                heartbeat: None,
            });
        }
        register(ctx, &ctx.store()?)?;
        Ok(Serving {
            ctx: Some(ctx.clone()),
            heartbeat: Heartbeat::start(ctx),
        })
    }

    /// A clean exit: stop beating, then mark the host `stopped`.
    pub fn stopped(mut self) -> Result<()> {
        if let Some(h) = self.heartbeat.take() {
            h.stop();
        }
        if let Some(ctx) = &self.ctx {
            let store = ctx.store()?;
            hoststore::mark_stopped(&store.conn, &ctx.config.host_id)?;
        }
        Ok(())
    }
}

/// `runner hosts`: one row per host.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct HostList(pub Vec<HostRow>);

/// The hosts of the fleet; on SQLite this host alone, state `local`, with
/// the turns running under this root (held leases).
pub fn list(ctx: &Ctx) -> Result<HostList> {
    let store = ctx.store()?;
    if store.conn.is_pg() {
        return Ok(HostList(hoststore::list(&store.conn)?));
    }
    let running = crate::store::sessions::list(&store.conn)?
        .iter()
        .filter(|s| crate::lease::is_held(&ctx.root.lock_path(&s.agent_name)))
        .count() as i64;
    Ok(HostList(vec![HostRow {
        id: ctx.config.host_id.clone(),
        state: "local".into(),
        started_at: None,
        last_seen_at: clock::now(),
        last_seen_ms_ago: 0,
        pid: Some(std::process::id() as i64),
        version: Some(VERSION.into()),
        running_turns: running,
    }]))
}

/// Every agent's host for the host columns of `status` and `mail list`
/// (`*` for a floating agent, NULL included); `None` on SQLite.
pub fn agent_hosts(ctx: &Ctx) -> Result<Option<std::collections::HashMap<String, String>>> {
    if !fleet(ctx) {
        return Ok(None);
    }
    let store = ctx.store()?;
    Ok(Some(
        hoststore::agent_hosts(&store.conn)?
            .into_iter()
            .map(|(a, h)| (a, h.unwrap_or_else(|| ANY.into())))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floating_and_own_agents_run_here_others_do_not() {
        assert!(allows(None, "a"));
        assert!(allows(Some("*"), "a"));
        assert!(allows(Some("a"), "a"));
        assert!(!allows(Some("b"), "a"));
    }
}
