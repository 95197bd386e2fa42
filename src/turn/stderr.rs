//! The agent's stderr (SPEC §6.4): `stderr.log` keeps the first 1 MiB and a
//! rolling last 1 MiB, with a marker between them naming how many bytes were
//! dropped; the turn row keeps the count and the last few KiB.
//!
//! Invariants: the file never holds more than head + marker + 2 × tail
//! (while the turn runs) and head + marker + tail once it is finished;
//! memory is bounded by twice the tail. The file always ends with the most
//! recent stderr, so a runner killed mid-turn leaves it useful. Non-goal:
//! line boundaries — the cut between head and tail falls where it falls.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

/// Bytes kept from the start of stderr.
pub const HEAD: usize = 1 << 20;
/// Bytes kept from the end of stderr.
pub const TAIL: usize = 1 << 20;
/// Bytes of stderr kept for the turn row.
pub const ROW_TAIL: usize = 2048;

/// What the turn row learns of stderr.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// The last [`ROW_TAIL`] bytes.
    pub tail: Vec<u8>,
    /// Bytes dropped between the head and the tail of `stderr.log`.
    pub dropped: u64,
}

/// `stderr.log` as it is written: head, then a rolling tail.
pub struct BoundedLog {
    file: Option<File>,
    head: usize,
    /// Bytes written after the head (and after the marker, once there is one).
    recent: Vec<u8>,
    dropped: u64,
}

impl BoundedLog {
    pub fn new(file: Option<File>) -> BoundedLog {
        BoundedLog {
            file,
            head: 0,
            recent: Vec::new(),
            dropped: 0,
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn write(&mut self, mut bytes: &[u8]) {
        if self.head < HEAD {
            let n = bytes.len().min(HEAD - self.head);
            self.append(&bytes[..n]);
            self.head += n;
            bytes = &bytes[n..];
        }
        if bytes.is_empty() {
            return;
        }
        self.recent.extend_from_slice(bytes);
        if self.recent.len() > 2 * TAIL {
            self.roll();
        } else {
            self.append(bytes);
        }
    }

    /// Trims to the final shape: head, marker, last [`TAIL`] bytes.
    pub fn finish(&mut self) {
        if self.recent.len() > TAIL {
            self.roll();
        }
        if let Some(f) = self.file.as_mut() {
            let _ = f.flush();
        }
    }

    /// Drops all but the last [`TAIL`] recent bytes and rewrites the file
    /// after the head.
    fn roll(&mut self) {
        let cut = self.recent.len() - TAIL;
        self.recent.drain(..cut);
        self.dropped += cut as u64;
        let Some(f) = self.file.as_mut() else { return };
        let marker = format!(
            "\n[runner: {} bytes of stderr dropped here]\n",
            self.dropped
        );
        let ok = f.set_len(self.head as u64).is_ok()
            && f.write_all(marker.as_bytes()).is_ok()
            && f.write_all(&self.recent).is_ok();
        if !ok {
            self.file = None; // best effort, like stdout.ndjson
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        if let Some(f) = self.file.as_mut()
            && f.write_all(bytes).is_err()
        {
            self.file = None;
        }
    }
}

/// Copies the agent's stderr into `stderr.log` (bounded) until EOF or `stop`,
/// keeping what the turn row needs in `seen`. `file` must be opened for
/// appending.
pub async fn drain(
    mut err: tokio::process::ChildStderr,
    file: Option<File>,
    seen: Arc<Mutex<Seen>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut log = BoundedLog::new(file);
    // Read into spare capacity: most agents write no stderr at all, and
    // zeroing 16 KiB up front is most of what an empty drain costs.
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        buf.clear();
        let n = tokio::select! {
            r = err.read_buf(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = stop.changed() => break,
        };
        log.write(&buf[..n]);
        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
        s.tail.extend_from_slice(&buf[..n]);
        if s.tail.len() > ROW_TAIL {
            let cut = s.tail.len() - ROW_TAIL;
            s.tail.drain(..cut);
        }
        s.dropped = log.dropped();
    }
    log.finish();
    seen.lock().unwrap_or_else(|e| e.into_inner()).dropped = log.dropped();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appending(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn small_stderr_is_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stderr.log");
        let mut log = BoundedLog::new(Some(appending(&p)));
        log.write(b"one\n");
        log.write(b"two\n");
        log.finish();
        assert_eq!(std::fs::read(&p).unwrap(), b"one\ntwo\n");
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn big_stderr_keeps_head_marker_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stderr.log");
        let mut log = BoundedLog::new(Some(appending(&p)));
        let total = 7 * TAIL + 123;
        let mut written = 0usize;
        let mut i = 0usize;
        while written < total {
            let n = (total - written).min(10_000);
            log.write(&vec![b'a' + (i % 26) as u8; n]);
            written += n;
            i += 1;
            let size = std::fs::metadata(&p).unwrap().len() as usize;
            assert!(size <= HEAD + 100 + 2 * TAIL, "{size}");
        }
        log.finish();
        let data = std::fs::read(&p).unwrap();
        let dropped = (total - HEAD - TAIL) as u64;
        assert_eq!(log.dropped(), dropped);
        let marker = format!("\n[runner: {dropped} bytes of stderr dropped here]\n");
        assert_eq!(data.len(), HEAD + marker.len() + TAIL);
        assert_eq!(&data[HEAD..HEAD + marker.len()], marker.as_bytes());
        assert_eq!(data[0], b'a');
        assert_eq!(*data.last().unwrap(), b'a' + ((i - 1) % 26) as u8);
    }
}
