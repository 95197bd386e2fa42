//! The per-agent lease (SPEC §5): an exclusive `flock` on
//! `agents/<agent>/turn.lock`, held for a whole turn (or a repair).
//!
//! The kernel frees the lock when its holder dies, so a lease is never stale
//! and "is a turn running?" is answered by trying it. The JSON written into
//! the file is advisory: it names the holder for humans, `stop` and the
//! sweep; a free lease holding garbage is simply taken and rewritten.
//! Invariant: the lock's descriptor is close-on-exec, so agents never
//! inherit (and never keep) the lease. Non-goal: fairness between waiters.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::root::private_dir;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("{}", busy_message(.agent, .holder))]
    Busy {
        agent: String,
        holder: Option<Box<LeaseInfo>>,
    },
    #[error("lease file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn busy_message(agent: &str, holder: &Option<Box<LeaseInfo>>) -> String {
    match holder {
        Some(h) if h.host.is_empty() => format!(
            "agent {agent} is busy: turn {} (runner pid {}) since {}",
            h.turn_id, h.runner_pid, h.acquired_at
        ),
        Some(h) => format!(
            "agent {agent} is busy: turn {} (runner pid {} on host {}) since {}",
            h.turn_id, h.runner_pid, h.host, h.acquired_at
        ),
        None => format!("agent {agent} is busy: its lease is held by another process"),
    }
}

/// What the holder writes into the lease file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LeaseInfo {
    pub turn_id: String,
    pub runner_pid: i32,
    pub runner_start_time: Option<u64>,
    pub agent_pid: Option<i32>,
    pub agent_start_time: Option<u64>,
    pub host: String,
    pub acquired_at: String,
    pub deadline_at: Option<String>,
    pub stall_timeout_ms: Option<u64>,
    /// The runner's stall limit right now: `stall_timeout_ms` widened by a
    /// declared tool timeout in flight (SPEC §6.5). Rewritten when it changes;
    /// the sweep never judges below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_limit_ms: Option<u64>,
}

/// A held lease; dropping it releases the lock.
#[derive(Debug)]
pub struct Lease {
    file: File,
    path: PathBuf,
}

fn open_lock(path: &Path) -> Result<File, LeaseError> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        private_dir(dir).map_err(|e| LeaseError::Io {
            path: dir.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| LeaseError::Io {
            path: path.display().to_string(),
            source: e,
        })
}

impl Lease {
    /// Takes the lease if it is free right now.
    pub fn try_acquire(path: &Path) -> Result<Option<Lease>, LeaseError> {
        let file = open_lock(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lease {
                file,
                path: path.to_path_buf(),
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(LeaseError::Io {
                path: path.display().to_string(),
                source: e,
            }),
        }
    }

    /// Takes the lease, waiting up to `wait`. The wait is a blocking `flock`
    /// on a thread of its own, so the kernel queues waiters (a thousand
    /// polling waiters would burn the machine). On timeout: `Busy` naming the
    /// holder; the abandoned waiter drops the lock the moment it gets it,
    /// because nobody is left to receive it.
    pub async fn acquire(path: &Path, agent: &str, wait: Duration) -> Result<Lease, LeaseError> {
        if let Some(l) = Lease::try_acquire(path)? {
            return Ok(l);
        }
        let busy = || LeaseError::Busy {
            agent: agent.to_string(),
            holder: read_info(path).map(Box::new),
        };
        if wait.is_zero() {
            return Err(busy());
        }
        let file = open_lock(path)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<std::io::Result<File>>();
        std::thread::Builder::new()
            .name("lease-wait".into())
            .spawn(move || {
                let r = file.lock().map(|()| file);
                // A send to a receiver that timed out fails: the File (and the
                // lock with it) is dropped right here.
                let _ = tx.send(r);
            })
            .map_err(|e| LeaseError::Io {
                path: path.display().to_string(),
                source: e,
            })?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(Ok(file))) => Ok(Lease {
                file,
                path: path.to_path_buf(),
            }),
            Ok(Ok(Err(e))) => Err(LeaseError::Io {
                path: path.display().to_string(),
                source: e,
            }),
            Ok(Err(_)) | Err(_) => Err(busy()),
        }
    }

    /// Replaces the advisory content.
    pub fn write_info(&mut self, info: &LeaseInfo) -> Result<(), LeaseError> {
        let io = |e| LeaseError::Io {
            path: self.path.display().to_string(),
            source: e,
        };
        let text = serde_json::to_vec(info).unwrap_or_default();
        self.file.set_len(0).map_err(io)?;
        self.file.seek(SeekFrom::Start(0)).map_err(io)?;
        self.file.write_all(&text).map_err(io)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads the advisory content; `None` when absent or garbage.
pub fn read_info(path: &Path) -> Option<LeaseInfo> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    serde_json::from_str(&s).ok()
}

/// Whether someone holds the lease now (a probe: takes and drops it).
pub fn is_held(path: &Path) -> bool {
    if !path.exists() {
        return false;
    }
    matches!(Lease::try_acquire(path), Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/turn.lock");
        let mut l = Lease::try_acquire(&p).unwrap().unwrap();
        assert!(Lease::try_acquire(&p).unwrap().is_none());
        assert!(is_held(&p));
        l.write_info(&LeaseInfo {
            turn_id: "t1".into(),
            runner_pid: 7,
            ..Default::default()
        })
        .unwrap();
        let e = Lease::acquire(&p, "a", Duration::from_millis(30))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("turn t1 (runner pid 7)"), "{e}");
        drop(l);
        // The waiter abandoned above may take the lock for an instant after
        // the drop (its blocking flock was already queued) and then releases
        // it at once: the lease must be free within a deadline, not forever held.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while is_held(&p) {
            assert!(
                std::time::Instant::now() < until,
                "lease still held after drop"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::fs::write(&p, "garbage").unwrap();
        assert!(read_info(&p).is_none());
        // the waiter abandoned above may hold the lock for an instant: wait for it
        assert!(
            Lease::acquire(&p, "a", Duration::from_secs(5))
                .await
                .is_ok()
        );
    }
}
