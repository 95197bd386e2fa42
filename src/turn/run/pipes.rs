//! The agent's pipes during a turn (SPEC §6.1 steps 5–6, 8): stdin fed
//! concurrently with reading stdout (LESSONS 5), stdout ingested into
//! events and `stdout.ndjson`, stderr into a bounded `stderr.log`; and, once
//! every process of the turn is gone, draining them all and taking the
//! events connection back from the writer.
//!
//! Invariant: reading never waits on a pipe a live process may hold open
//! forever — a stdout still open after every process was killed is given up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::super::io::{StdinCmd, feed_stdin, private_file};
use super::super::stderr;
use super::{Execution, Running};
use crate::store::events;
use crate::stream::{self, Ingest, Live, Notice, StreamReport};

/// The agent's pipes and the tasks serving them.
pub(super) struct Io {
    pub(super) stdin_tx: mpsc::UnboundedSender<StdinCmd>,
    pub(super) stdin_task: Option<JoinHandle<Option<String>>>,
    /// Tells the ingest and stderr tasks to stop reading.
    pub(super) stop_tx: watch::Sender<bool>,
    pub(super) writer: Option<events::Writer>,
    pub(super) ingest_task: Option<JoinHandle<StreamReport>>,
    /// The ingest's report, once it ended.
    pub(super) stream_rep: Option<StreamReport>,
    pub(super) notices: mpsc::UnboundedReceiver<Notice>,
    pub(super) stderr_task: Option<JoinHandle<()>>,
    pub(super) stderr_seen: Arc<Mutex<stderr::Seen>>,
    pub(super) live: Arc<Live>,
}

impl Running<'_> {
    /// Step 6: stdin written concurrently with reading stdout (LESSONS 5);
    /// stdout into events and `stdout.ndjson`; stderr into `stderr.log`.
    pub(super) fn start_io(
        &mut self,
        child: &mut Child,
        stdin_payload: Vec<u8>,
        ex: &mut Execution,
    ) -> Io {
        let runtime = &self.turn.runtime;
        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<StdinCmd>();
        let stdin_task = child.stdin.take().map(|s| {
            tokio::spawn(feed_stdin(
                s,
                stdin_payload,
                runtime.stdin_policy(),
                stdin_rx,
            ))
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let writer = self.start_writer(ex);
        let live = Live::new(self.turn.started);
        let (notice_tx, notices) = mpsc::unbounded_channel::<Notice>();
        let log_dir = &self.turn.log_dir;
        let ingest_task = match (
            child.stdout.take(),
            writer.as_ref().and_then(|w| w.sender()),
        ) {
            (Some(out), Some(sender)) => Some(tokio::spawn(stream::ingest(
                out,
                Ingest {
                    max_line: self.ctx.config.max_line,
                    parser: self.turn.runtime.parser(),
                    writer: sender,
                    ndjson: private_file(&log_dir.join("stdout.ndjson")),
                    live: live.clone(),
                    notices: notice_tx,
                    resume_requested: self.turn.resume_id.clone(),
                    stop: stop_rx.clone(),
                    first_line_no: 0,
                    progress: self.progress.is_some(),
                    progress_window: None,
                },
            ))),
            _ => None,
        };
        let stderr_seen = Arc::new(Mutex::new(stderr::Seen::default()));
        let stderr_task = child.stderr.take().map(|e| {
            tokio::spawn(stderr::drain(
                e,
                private_file(&log_dir.join("stderr.log")),
                stderr_seen.clone(),
                stop_rx.clone(),
            ))
        });
        Io {
            stdin_tx,
            stdin_task,
            stop_tx,
            writer,
            ingest_task,
            stream_rep: None,
            notices,
            stderr_task,
            stderr_seen,
            live,
        }
    }

    /// The events writer thread, on the turn's `events.db` connection.
    fn start_writer(&mut self, ex: &mut Execution) -> Option<events::Writer> {
        let conn = match self.turn.events.take() {
            Some(c) => Ok(c),
            None => events::open_backend(&self.ctx.root.dir, &self.ctx.config.store),
        };
        match conn.and_then(|c| events::Writer::start(c, self.turn.tag.clone())) {
            Ok(w) => Some(w),
            Err(e) => {
                ex.internal_error = Some(format!("events writer: {e}"));
                None
            }
        }
    }

    /// Nothing of the turn is alive: stdout closes now unless a process
    /// escaped; read what is left, then collect stderr, stdin and the writer.
    pub(super) async fn drain(&mut self, mut io: Io, ex: &mut Execution) {
        let drain = Duration::from_millis(500);
        if let Some(mut t) = io.ingest_task.take() {
            match tokio::time::timeout(drain, &mut t).await {
                Ok(r) => io.stream_rep = r.ok(),
                Err(_) => {
                    self.log("stdout still open after every process was killed; stopped reading");
                    let _ = io.stop_tx.send(true);
                    io.stream_rep = t.await.ok();
                }
            }
        }
        ex.stream = io.stream_rep.take().unwrap_or_default();
        if let Some(t) = io.stderr_task.take() {
            let _ = tokio::time::timeout(drain, t).await;
        }
        let _ = io.stop_tx.send(true);
        drop(io.stdin_tx);
        if let Some(t) = io.stdin_task.take()
            && let Ok(Some(e)) = t.await
        {
            self.log(format!("stdin: {e}"));
            ex.stdin_error = Some(e);
        }
        if let Some(w) = io.writer.take() {
            match tokio::task::spawn_blocking(move || w.finish()).await {
                Ok((r, conn)) => {
                    self.turn.events = conn;
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
        let seen = io
            .stderr_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        ex.stderr_tail = String::from_utf8_lossy(&seen.tail).into_owned();
        ex.stderr_dropped = seen.dropped;
    }
}
