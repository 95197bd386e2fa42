//! The claim rules of SPEC §2.3 and §6.3: how a turn's claimed mail ends.
//!
//! Pure rules ([`retry_fate`], [`backoff`]) plus the one transactional
//! operation that applies them ([`settle`]). Invariants: only the holder of
//! the agent's lease calls [`settle`] (the callers guarantee it); a retry
//! bumps the count and releases the claim in the same transaction, so each
//! failed attempt costs exactly one try (LESSONS 22); a count never moves
//! without an attempt. Non-goal: choosing the fate — that is the outcome table.

use std::time::{Duration, SystemTime};

use crate::store::Db;

use crate::clock::format_ts;
use crate::store::Result;
use crate::store::mail::{self, Scope};

/// What happens to a turn's claimed mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Delivered: `read = 1`.
    Deliver,
    /// Back to pending, try count unchanged.
    Release,
    /// Back to pending with `tries + 1` and a backoff, or dead.
    Retry,
}

/// `backoff_base · 2^(tries-1)`, capped at a day.
pub fn backoff(base: Duration, tries: i64) -> Duration {
    let exp = (tries.max(1) - 1).min(20) as u32;
    base.saturating_mul(1u32 << exp)
        .min(Duration::from_secs(86_400))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryFate {
    /// Due again after this delay.
    After(Duration),
    /// Retries exhausted.
    Dead,
}

/// The fate of one failed attempt: the new try count and what follows.
pub fn retry_fate(tries_before: i64, max_tries: u32, base: Duration) -> (i64, RetryFate) {
    let tries = tries_before + 1;
    if tries >= max_tries as i64 {
        (tries, RetryFate::Dead)
    } else {
        (tries, RetryFate::After(backoff(base, tries)))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    pub delivered: usize,
    pub released: usize,
    pub retried: usize,
    pub dead: usize,
}

/// Applies `fate` to the open claims of `scope`, in the caller's transaction.
pub fn settle(
    conn: &Db,
    scope: Scope<'_>,
    fate: Fate,
    now: SystemTime,
    max_tries: u32,
    base: Duration,
    error: &str,
) -> Result<Settled> {
    let now_s = format_ts(now);
    let mut out = Settled::default();
    match fate {
        Fate::Deliver => out.delivered = mail::deliver(conn, scope, &now_s)?,
        Fate::Release => out.released = mail::release(conn, scope)?,
        Fate::Retry => {
            for (id, tries_before) in mail::claimed_tries(conn, scope)? {
                match retry_fate(tries_before, max_tries, base) {
                    (tries, RetryFate::After(d)) => {
                        mail::set_retry(conn, &id, tries, &format_ts(now + d), error)?;
                        out.retried += 1;
                    }
                    (tries, RetryFate::Dead) => {
                        mail::set_dead(conn, &id, tries, &now_s, error)?;
                        out.dead += 1;
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base() {
        let b = Duration::from_secs(5);
        assert_eq!(backoff(b, 1), Duration::from_secs(5));
        assert_eq!(backoff(b, 2), Duration::from_secs(10));
        assert_eq!(backoff(b, 4), Duration::from_secs(40));
        assert_eq!(backoff(b, 99), Duration::from_secs(86_400));
    }

    #[test]
    fn retry_table() {
        let b = Duration::from_secs(5);
        // (tries before, max) -> (tries after, fate)
        let rows = [
            (0, 5, 1, RetryFate::After(Duration::from_secs(5))),
            (1, 5, 2, RetryFate::After(Duration::from_secs(10))),
            (3, 5, 4, RetryFate::After(Duration::from_secs(40))),
            (4, 5, 5, RetryFate::Dead),
            (0, 1, 1, RetryFate::Dead),
        ];
        for (before, max, after, fate) in rows {
            assert_eq!(
                retry_fate(before, max, b),
                (after, fate),
                "tries {before} max {max}"
            );
        }
    }
}
