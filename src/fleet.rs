//! The lease across hosts (SPEC §12.3) and the fleet's repair of expired
//! leases (§12.5). On a PostgreSQL store "the lease" is a pair: the `flock`
//! of [`crate::lease`], taken first, and a `leases` row with a fencing token;
//! whoever runs or repairs an agent holds both. On SQLite everything here is
//! a no-op: the flock alone is the lease.
//!
//! Who may take the row (in one transaction, the row locked): nobody holds
//! it; it expired (by the database's clock); or it names this host, whose
//! flock we now hold, so its runner is dead. Taking over another host's
//! expired row repairs what that holder left, exactly as the fleet sweep
//! would ([`repair_in`]). The holder renews on a thread of its own with its
//! own connection ([`Renewer`]: nothing the turn does can delay it), and
//! every write the turn makes is fenced by the token at the store seam
//! (`store::db::Fence`). A renewal that fails past the lease's expiry, or a
//! write that finds the token superseded, fires `lost`: the turn ends its
//! processes and exits 75.
//!
//! Non-goals: hosts' own heartbeats (`hosts`), process signalling (`spawn`).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::claim::{Fate, Settled};
use crate::clock;
use crate::ctx::Ctx;
use crate::error::Result;
use crate::lease::{LeaseError, LeaseInfo};
use crate::store::db::Fence;
use crate::store::leases::{self, LeaseRow};
use crate::store::mail::Scope;
use crate::store::turns;
use crate::store::{Backend, Db, Store};

/// The database half of a held lease.
pub struct FleetLease {
    pub agent: String,
    pub token: i64,
    pub fence: Fence,
    lost: watch::Receiver<bool>,
    renewer: Option<Renewer>,
}

impl FleetLease {
    /// Fires (`true`) when the lease is lost.
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Stops renewing and deletes the row if it still carries our token.
    /// Writes nothing else: a lost lease deletes nothing of the new holder's.
    pub fn release(mut self, db: &Db) {
        if let Some(r) = self.renewer.take() {
            r.stop(false);
        }
        db.set_fence(None);
        let _ = leases::release(db, &self.agent, self.token);
    }
}

impl Drop for FleetLease {
    /// A lease dropped without [`FleetLease::release`] (an early return, an
    /// error) is released by the renewing thread on its own connection, so
    /// no row outlives its holder until it expires.
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.stop(true);
        }
    }
}

/// What taking the row found.
pub enum Take {
    Taken { token: i64, repaired: Repaired },
    Busy(LeaseRow),
}

/// What repairing an expired lease changed (counted in the sweep's report).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repaired {
    pub leases_expired: u64,
    pub orphan_turns: u64,
    pub claims_retried: u64,
    pub claims_dead: u64,
    pub states_fixed: u64,
}

impl Repaired {
    fn add(&mut self, o: Repaired) {
        self.leases_expired += o.leases_expired;
        self.orphan_turns += o.orphan_turns;
        self.claims_retried += o.claims_retried;
        self.claims_dead += o.claims_dead;
        self.states_fixed += o.states_fixed;
    }
}

/// Tries once to take the agent's row (the flock is already held).
pub fn try_take(ctx: &Ctx, store: &mut Store, agent: &str, turn_id: Option<&str>) -> Result<Take> {
    let me = ctx.config.host_id.as_str();
    let pid = std::process::id() as i64;
    let ttl = ctx.config.fleet.lease_ttl;
    Ok(store.tx("taking the agent's lease", |tx| {
        match leases::lock(tx, agent)? {
            None => match leases::insert(tx, agent, me, pid, turn_id, ttl)? {
                Some(token) => Ok(Take::Taken {
                    token,
                    repaired: Repaired::default(),
                }),
                // Another host inserted it since we looked.
                None => Ok(match leases::get(tx, agent)? {
                    Some(row) => Take::Busy(row),
                    None => Take::Busy(LeaseRow {
                        agent_name: agent.into(),
                        host: "another host".into(),
                        runner_pid: 0,
                        turn_id: None,
                        token: 0,
                        renewed_at: String::new(),
                        acquired_at: String::new(),
                        expired: false,
                    }),
                }),
            },
            Some(row) if row.expired || row.host == me => {
                // Another host's leftovers are repaired here; this host's
                // (its runner died: we hold the flock) by the local reclaim,
                // which can signal its processes and read its logs.
                let repaired = if row.host != me {
                    repair_in(tx, ctx, &row, SystemTime::now())?
                } else {
                    Repaired::default()
                };
                let token = leases::take_over(tx, agent, me, pid, turn_id, ttl)?;
                Ok(Take::Taken { token, repaired })
            }
            Some(row) => Ok(Take::Busy(row)),
        }
    })?)
}

/// Takes the agent's row, waiting up to `wait` (polling: the holder may be
/// on another host). `None` on SQLite. Busy past the wait: exit 4 naming
/// the holder's host, pid and turn.
pub async fn acquire(
    ctx: &Ctx,
    store: &mut Store,
    agent: &str,
    turn_id: Option<&str>,
    wait: Duration,
) -> Result<Option<FleetLease>> {
    if !store.conn.is_pg() {
        return Ok(None);
    }
    let until = Instant::now() + wait;
    let mut pause = Duration::from_millis(20);
    loop {
        match try_take(ctx, store, agent, turn_id)? {
            Take::Taken { token, .. } => return Ok(Some(held(ctx, store, agent, token))),
            Take::Busy(row) => {
                let now = Instant::now();
                if now >= until {
                    return Err(busy(agent, &row).into());
                }
                tokio::time::sleep(pause.min(until - now)).await;
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        }
    }
}

/// Takes the row only if it is free right now (the sweep's repairs). Another
/// host's expired row is left to the fleet repair, which waits `grace`.
pub fn try_acquire_for_repair(
    ctx: &Ctx,
    store: &mut Store,
    agent: &str,
) -> Result<Option<FleetLease>> {
    if !store.conn.is_pg() {
        return Ok(None);
    }
    if let Some(row) = leases::get(&store.conn, agent)?
        && row.host != ctx.config.host_id
    {
        return Err(busy(agent, &row).into());
    }
    match try_take(ctx, store, agent, None)? {
        Take::Taken { token, .. } => Ok(Some(held(ctx, store, agent, token))),
        Take::Busy(row) => Err(busy(agent, &row).into()),
    }
}

fn busy(agent: &str, row: &LeaseRow) -> LeaseError {
    LeaseError::Busy {
        agent: agent.into(),
        holder: Some(Box::new(LeaseInfo {
            turn_id: row.turn_id.clone().unwrap_or_else(|| "(a repair)".into()),
            runner_pid: row.runner_pid as i32,
            host: row.host.clone(),
            acquired_at: row.acquired_at.clone(),
            ..Default::default()
        })),
    }
}

/// The lease just taken: renewed from now on, and every later write on
/// `store`'s connection fenced by it ([`FleetLease::release`] lifts it).
fn held(ctx: &Ctx, store: &Store, agent: &str, token: i64) -> FleetLease {
    let (tx, rx) = watch::channel(false);
    let fence = Fence {
        agent: agent.into(),
        token,
        lost: Arc::new(tx),
    };
    store.conn.set_fence(Some(fence.clone()));
    let renewer = Renewer::start(ctx, fence.clone());
    FleetLease {
        agent: agent.into(),
        token,
        fence,
        lost: rx,
        renewer,
    }
}

/// How often the holder renews: `[fleet] heartbeat`, but at least three
/// times per `lease_ttl`, so one slow renewal never loses the lease.
pub fn renew_every(ctx: &Ctx) -> Duration {
    ctx.config
        .fleet
        .heartbeat
        .min(ctx.config.fleet.lease_ttl / 3)
        .max(Duration::from_millis(10))
}

/// The renewing thread: its own connection (opened at the first renewal,
/// so short turns never pay for it), reconnecting after errors; fires the
/// fence's `lost` when a renewal is refused or none succeeded before the
/// lease's expiry.
struct Renewer {
    /// `true`: delete the row before stopping.
    stop: Sender<bool>,
    handle: std::thread::JoinHandle<()>,
}

impl Renewer {
    fn start(ctx: &Ctx, fence: Fence) -> Option<Renewer> {
        let Backend::Postgres { url, schema } = ctx.config.store.clone() else {
            return None;
        };
        let every = renew_every(ctx);
        let ttl = ctx.config.fleet.lease_ttl;
        let (stop, stopped) = channel();
        let handle = std::thread::Builder::new()
            .name(format!("lease-{}", fence.agent))
            .spawn(move || renew_loop(&url, &schema, &fence, every, ttl, &stopped))
            .ok()?;
        Some(Renewer { stop, handle })
    }

    fn stop(self, release: bool) {
        let _ = self.stop.send(release);
        let _ = crate::store::db::off_runtime(|| self.handle.join());
    }
}

fn renew_loop(
    url: &str,
    schema: &str,
    fence: &Fence,
    every: Duration,
    ttl: Duration,
    stopped: &Receiver<bool>,
) {
    // The lease was taken (or last renewed) no earlier than this.
    let mut valid_until = std::time::Instant::now() + ttl;
    let mut db: Option<Db> = None;
    loop {
        match stopped.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(true) => {
                let conn = db.or_else(|| crate::store::pg::connect(url, schema).ok().map(Db::pg));
                if let Some(conn) = conn {
                    let _ = leases::release(&conn, &fence.agent, fence.token);
                }
                return;
            }
            _ => return,
        }
        let attempt = std::time::Instant::now();
        if db.is_none() {
            db = crate::store::pg::connect(url, schema).ok().map(Db::pg);
        }
        let renewed = db
            .as_ref()
            .and_then(|c| leases::renew(c, &fence.agent, fence.token, ttl).ok());
        match renewed {
            Some(true) => valid_until = attempt + ttl,
            Some(false) => {
                fence.lost.send_replace(true);
                return;
            }
            None => {
                db = None;
                if std::time::Instant::now() >= valid_until {
                    fence.lost.send_replace(true);
                    return;
                }
            }
        }
    }
}

/// Repairs what the holder of an expired row left, in the caller's
/// transaction (which holds the row `FOR UPDATE`): finishes its turn
/// (`failed`, `host <h> silent since <renewed_at>`), releases that turn's
/// claims by the failed-retry rule, and applies the state rules of §7. The
/// caller deletes or takes over the row in the same transaction, so this
/// happens once across the fleet.
pub fn repair_in(
    tx: &Db,
    ctx: &Ctx,
    row: &LeaseRow,
    now_t: SystemTime,
) -> crate::store::Result<Repaired> {
    let mut rep = Repaired {
        leases_expired: 1,
        ..Default::default()
    };
    let Some(turn_id) = row.turn_id.as_deref() else {
        return Ok(rep);
    };
    let reason = format!("host {} silent since {}", row.host, row.renewed_at);
    let now = clock::format_ts(now_t);
    if let Some(t) = turns::get(tx, turn_id)?
        && t.ended_at.is_none()
    {
        let finished = turns::TurnRow {
            ended_at: Some(now.clone()),
            final_state: crate::store::sessions::current(tx, &row.agent_name)?,
            outcome: Some("failed".into()),
            reason: Some(reason.clone()),
            ..t
        };
        if turns::finish(tx, &finished)? {
            rep.orphan_turns += 1;
        }
    }
    let (settled, fixed): (Settled, u64) = crate::sweep::settle_orphans(
        tx,
        ctx,
        &row.agent_name,
        Scope::Turn(turn_id),
        Fate::Retry,
        now_t,
        &reason,
    )?;
    rep.claims_retried += settled.retried as u64;
    rep.claims_dead += settled.dead as u64;
    rep.states_fixed += fixed;
    Ok(rep)
}

/// At most this many expired leases are repaired per sweep pass.
pub const REPAIR_BATCH: i64 = 100;

/// The fleet sweep's repair of expired leases (SPEC §12.5): rows expired
/// for longer than `[fleet] grace`, whatever their host, each repaired and
/// deleted in one transaction that re-reads it under `FOR UPDATE SKIP
/// LOCKED` — two sweeps racing over one row repair it once.
pub fn repair_expired(ctx: &Ctx, store: &mut Store) -> Result<Repaired> {
    let mut total = Repaired::default();
    if !store.conn.is_pg() {
        return Ok(total);
    }
    for _ in 0..REPAIR_BATCH {
        let one = store.tx("repairing an expired lease", |tx| {
            let Some(row) = leases::lock_expired(tx, ctx.config.fleet.grace, 1)?
                .into_iter()
                .next()
            else {
                return Ok(None);
            };
            let rep = repair_in(tx, ctx, &row, SystemTime::now())?;
            leases::release(tx, &row.agent_name, row.token)?;
            Ok(Some(rep))
        })?;
        match one {
            Some(r) => total.add(r),
            None => break,
        }
    }
    Ok(total)
}
