//! The mail listener of fleet mode (SPEC §12.4): a thread with a PostgreSQL
//! connection of its own that `LISTEN`s on `runner_mail` (every mail insert
//! notifies it with the recipient, see [`crate::store::mail`]) and forwards
//! each recipient to the async side as a [`Wake`], so `serve` starts a due
//! turn at once instead of at its next poll.
//!
//! Invariants: the connection's `application_name` is `runner-listen
//! SCHEMA` (set after `LISTEN`, so a session under that name is listening);
//! a lost connection is reconnected with backoff (100 ms doubling to 5 s)
//! and re-`LISTEN`ed, and every (re)connection sends [`Wake::All`], since
//! notifications sent meanwhile are lost; the thread ends within a tick
//! (250 ms, or one connect attempt) of its [`Listener`] being dropped.
//! Non-goals: deciding anything (a wake only makes serve look for due mail,
//! so a spurious or foreign-schema wake costs one query), and being the
//! only path — `serve --poll` stays the fallback while the listener is
//! down. SQL and connections only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::store::mail::MAIL_CHANNEL;

/// Why serve should look for due mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// New mail for this agent was committed.
    Mail(String),
    /// The listener (re)connected: notifications may have been missed.
    All,
}

/// How often the thread checks whether it should stop.
const TICK: Duration = Duration::from_millis(250);
/// How long a wake waits for the rest of its burst.
pub const GATHER: Duration = Duration::from_millis(20);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The `application_name` of the listening session for `schema`.
pub fn application_name(schema: &str) -> String {
    format!("runner-listen {schema}")
}

/// A running listener; dropping it stops the thread.
pub struct Listener {
    stop: Arc<AtomicBool>,
    wakes: UnboundedReceiver<Wake>,
}

impl Listener {
    /// Starts listening on the store at `url`/`schema`. Never fails: a
    /// server that does not answer is retried in the background.
    pub fn start(url: &str, schema: &str) -> Listener {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, wakes) = unbounded_channel();
        let (url, schema, flag) = (url.to_string(), schema.to_string(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("runner-listen".into())
            .spawn(move || run(&url, &schema, &tx, &flag));
        if let Err(e) = spawned {
            tracing::warn!("mail listener not started ({e}); serve polls only");
        }
        Listener { stop, wakes }
    }

    /// The next wakes: waits for one, then [`GATHER`] more, and takes every
    /// one queued by then, so a burst of mail wakes serve once (at most 50
    /// scheduling passes a second, however much mail). Never returns if the
    /// thread is gone.
    pub async fn woken(&mut self) -> Vec<Wake> {
        let Some(first) = self.wakes.recv().await else {
            return std::future::pending().await;
        };
        tokio::time::sleep(GATHER).await;
        let mut out = vec![first];
        while let Ok(w) = self.wakes.try_recv() {
            out.push(w);
        }
        out
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How one connection ended.
enum Ended {
    /// Asked to stop, or nobody receives any more.
    Stop,
    Lost(String),
}

fn run(url: &str, schema: &str, tx: &UnboundedSender<Wake>, stop: &AtomicBool) {
    let stopped = || stop.load(Ordering::Relaxed) || tx.is_closed();
    let mut pause = BACKOFF_START;
    let mut failing = false;
    while !stopped() {
        match connect(url, schema) {
            Ok(mut client) => {
                if failing {
                    tracing::info!("mail listener: reconnected");
                }
                pause = BACKOFF_START;
                if tx.send(Wake::All).is_err() {
                    return;
                }
                match listen(&mut client, tx, &stopped) {
                    Ended::Stop => return,
                    Ended::Lost(e) => {
                        tracing::warn!(
                            "mail listener: connection lost ({e}); reconnecting, polling meanwhile"
                        );
                        failing = true;
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("mail listener: {e}; retrying, polling meanwhile");
                }
                failing = true;
            }
        }
        // Back off in ticks, so that a stop is seen.
        let mut left = pause;
        while !left.is_zero() && !stopped() {
            let step = left.min(TICK);
            std::thread::sleep(step);
            left -= step;
        }
        pause = (pause * 2).min(BACKOFF_MAX);
    }
}

/// Connects, `LISTEN`s, then names the session.
fn connect(url: &str, schema: &str) -> Result<postgres::Client, String> {
    let mut client = super::connect(url, schema).map_err(|e| e.to_string())?;
    client
        .batch_execute(&format!(
            "LISTEN {MAIL_CHANNEL}; SET application_name TO '{}'",
            application_name(schema)
        ))
        .map_err(|e| super::error_detail(&e))?;
    Ok(client)
}

/// Forwards notifications until the connection is lost or a stop.
fn listen(
    client: &mut postgres::Client,
    tx: &UnboundedSender<Wake>,
    stopped: &dyn Fn() -> bool,
) -> Ended {
    loop {
        if stopped() {
            return Ended::Stop;
        }
        {
            let mut notifications = client.notifications();
            let mut it = notifications.timeout_iter(TICK);
            loop {
                match it.next() {
                    Ok(Some(n)) if n.channel() == MAIL_CHANNEL => {
                        if tx.send(Wake::Mail(n.payload().to_string())).is_err() {
                            return Ended::Stop;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => return Ended::Lost(super::error_detail(&e)),
                }
            }
        }
        // `None` is a quiet tick or a closed connection.
        if client.is_closed() {
            return Ended::Lost("the server closed the connection".into());
        }
    }
}
