//! The small effectful pieces a turn is built from: its own log
//! (`runner.log`), private files, feeding the agent's stdin, the guard that
//! kills the turn's processes if the runner unwinds, and the waits the turn
//! loop selects on.
//!
//! Invariants: files of a turn are created `0600`; a write error on stdin is
//! returned as a fact, never raised; the guard kills unless disarmed.
//! Non-goal: deciding anything.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::AbortRequest;
use crate::clock;
use crate::os::TurnProcs;
use crate::runtime::StdinPolicy;
use crate::spawn;
use crate::stream::StreamReport;

/// A file only its owner may read, opened for appending.
pub fn private_file(path: &Path) -> Option<File> {
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
pub struct TurnLog(Arc<Mutex<Option<File>>>);

impl TurnLog {
    pub fn open(path: &Path) -> TurnLog {
        TurnLog(Arc::new(Mutex::new(private_file(path))))
    }

    pub fn line(&self, msg: impl AsRef<str>) {
        tracing::debug!("{}", msg.as_ref());
        if let Some(f) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            // One write(2) a line (`writeln!` on a File issues four).
            let line = format!("{} {}\n", clock::now(), msg.as_ref());
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// Kills every process of a turn when dropped, unless disarmed: the turn's
/// processes never outlive a runner that unwinds.
pub struct KillOnDrop(Option<TurnProcs>);

impl KillOnDrop {
    pub fn new(procs: TurnProcs) -> KillOnDrop {
        KillOnDrop(Some(procs))
    }

    pub fn disarm(mut self) {
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

/// What the turn asks of the stdin writer after the user turn.
#[derive(Debug)]
pub enum StdinCmd {
    Write(Vec<u8>),
    Close,
}

/// Writes the user turn, then follows the policy. Returns a broken-pipe (or
/// other) error as a fact.
pub async fn feed_stdin(
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

/// Resolves once an abort has been requested.
pub async fn aborted(rx: &mut watch::Receiver<AbortRequest>) {
    loop {
        if *rx.borrow_and_update() != AbortRequest::None {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Sleeps until `at`; never resolves without one.
pub async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Resolves with the ingest's report when it ends (stdout at EOF); never
/// when there is no ingest.
pub async fn join_opt(task: &mut Option<JoinHandle<StreamReport>>) -> StreamReport {
    match task {
        Some(t) => t.await.unwrap_or_default(),
        None => std::future::pending().await,
    }
}
