//! The stall and deadline watchdogs of a turn (SPEC §6.5), as pure timer
//! arithmetic plus one async wait.
//!
//! Invariants: the stall timer is armed before the first line (a silent
//! agent is caught) and reset by every received line except model-API retry
//! notices (the stream decides which lines count and records the time in
//! [`Live`]); while a tool with a declared timeout is in flight the limit is
//! `max(stall, declared + 30 s)`, looked at again every second so that a
//! withdrawn allowance is noticed at once. One watchdog decides per turn (LESSONS 13):
//! the sweep's ceiling only acts on turns whose runner stopped judging.
//! Non-goal: killing — escalation is the turn's.

use std::time::Duration;

use tokio::time::Instant;

use crate::stream::Live;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    Stall,
    Deadline,
}

/// The stall limit given the allowance of a declared tool timeout in flight.
pub fn stall_limit(stall: Duration, tool_allowance: Option<Duration>) -> Duration {
    tool_allowance.map_or(stall, |a| a.max(stall))
}

/// While a tool allowance widens the limit, look again at least this often:
/// the allowance can be withdrawn at any line (its `tool_result`, or a line
/// that does not restate it), and the plain limit must then apply at once.
pub const RECHECK_WIDENED: Duration = Duration::from_secs(1);

/// Either the instant to look again, or what fired.
pub fn check(
    now: Instant,
    last_line_at: Instant,
    stall: Duration,
    tool_allowance: Option<Duration>,
    deadline_at: Instant,
) -> Result<Instant, Fired> {
    if now >= deadline_at {
        return Err(Fired::Deadline);
    }
    let limit = stall_limit(stall, tool_allowance);
    let stall_at = last_line_at + limit;
    if now >= stall_at {
        return Err(Fired::Stall);
    }
    let next = stall_at.min(deadline_at);
    if limit > stall {
        return Ok(next.min(now + RECHECK_WIDENED));
    }
    Ok(next)
}

/// Waits until the stall or the deadline watchdog fires.
pub async fn watch(live: &Live, stall: Duration, deadline_at: Instant) -> Fired {
    loop {
        match check(
            Instant::now(),
            live.last_line_at(),
            stall,
            live.tool_allowance(),
            deadline_at,
        ) {
            Ok(at) => tokio::time::sleep_until(at).await,
            Err(f) => return f,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn limit_widens_only_for_longer_tools() {
        assert_eq!(stall_limit(MS(300), None), MS(300));
        assert_eq!(stall_limit(MS(300), Some(MS(100))), MS(300));
        assert_eq!(stall_limit(MS(300), Some(MS(5000))), MS(5000));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_agent_stalls_after_the_limit() {
        let t0 = Instant::now();
        let live = Live::new(t0);
        let f = watch(&live, MS(300), t0 + Duration::from_secs(10)).await;
        assert_eq!(f, Fired::Stall);
        assert_eq!(Instant::now() - t0, MS(300));
    }

    #[tokio::test(start_paused = true)]
    async fn every_line_re_arms_the_timer() {
        let t0 = Instant::now();
        let live = Live::new(t0);
        let feeder = {
            let live = live.clone();
            async move {
                for _ in 0..10 {
                    tokio::time::sleep(MS(200)).await;
                    live.touch(Instant::now());
                }
            }
        };
        let (f, ()) = tokio::join!(watch(&live, MS(300), t0 + Duration::from_secs(10)), feeder);
        assert_eq!(f, Fired::Stall);
        // last line at 2000 ms, stall 300 ms later
        assert_eq!(Instant::now() - t0, MS(2300));
    }

    #[tokio::test(start_paused = true)]
    async fn declared_tool_timeout_keeps_a_busy_tool_alive() {
        let t0 = Instant::now();
        let live = Live::new(t0);
        live.set_tool_allowance(5_000);
        let f = watch(&live, MS(300), t0 + Duration::from_secs(60)).await;
        assert_eq!(f, Fired::Stall);
        assert_eq!(Instant::now() - t0, MS(5000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_withdrawn_allowance_is_noticed_within_a_recheck() {
        let t0 = Instant::now();
        let live = Live::new(t0);
        live.set_tool_allowance(60_000);
        let withdraw = {
            let live = live.clone();
            async move {
                tokio::time::sleep(MS(2_500)).await;
                live.set_tool_allowance(0);
            }
        };
        let (f, ()) = tokio::join!(
            watch(&live, MS(300), t0 + Duration::from_secs(600)),
            withdraw
        );
        assert_eq!(f, Fired::Stall);
        // withdrawn at 2.5 s (last line at 0): noticed at the next look, 3 s
        assert_eq!(Instant::now() - t0, MS(3_000));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_fires_even_while_lines_flow() {
        let t0 = Instant::now();
        let live = Live::new(t0);
        let feeder = {
            let live = live.clone();
            async move {
                loop {
                    tokio::time::sleep(MS(100)).await;
                    live.touch(Instant::now());
                }
            }
        };
        let f = tokio::select! { f = watch(&live, MS(300), t0 + MS(1000)) => f, _ = feeder => unreachable!() };
        assert_eq!(f, Fired::Deadline);
        assert_eq!(Instant::now() - t0, MS(1000));
    }
}
