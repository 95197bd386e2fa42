//! The error of a command, and the one function that maps errors to exit
//! codes (SPEC §10.3). Each layer has its own `thiserror` enum; this wraps
//! them. A lost CAS race is never an error (see `state::Cas`), and a turn's
//! outcome is a value with its own exit code, not an error.
//!
//! A full or failing disk is not a bug: whichever layer meets it (SQLITE_FULL,
//! SQLITE_IOERR, ENOSPC, EDQUOT, EIO, EROFS), it ends as exit 74 with the path
//! and what to do ([`Error::under_root`] names the root once it is known).

use crate::capability::CapabilityError;
use crate::config::ConfigError;
use crate::lease::LeaseError;
use crate::root::RootError;
use crate::store::StoreError;
use crate::store::pg::PgError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: arguments, names, values, states. Exit 2.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Root(#[from] RootError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The disk under the root is full (or over quota). Exit 74.
    #[error("disk full under {root}: free space, then run runner sweep")]
    DiskFull { root: String },
    /// The disk under the root failed a read or write. Exit 74.
    #[error("I/O error under {path}: {detail}; check the disk, then run runner sweep")]
    DiskFault { path: String, detail: String },
    /// Fleet mode: this runner lost its agent's lease to the fleet; the
    /// turn's processes are dead and nothing more was written. Exit 75.
    #[error(
        "lease lost: agent {agent}'s turn {turn_id} was fenced by the fleet ({detail}); its processes were ended and nothing more was written"
    )]
    LeaseLost {
        agent: String,
        turn_id: String,
        detail: String,
    },
    /// A bug. Exit 70.
    #[error("internal error: {0} (this is a bug in runner: please report it)")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// What an I/O error says about the disk, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskTrouble {
    /// ENOSPC, EDQUOT.
    Full,
    /// EIO, EROFS, EFBIG.
    Failing,
}

/// Classifies an I/O error: a full or failing disk, or something else.
pub fn disk_trouble(e: &std::io::Error) -> Option<DiskTrouble> {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::StorageFull | K::QuotaExceeded => Some(DiskTrouble::Full),
        K::ReadOnlyFilesystem | K::FileTooLarge => Some(DiskTrouble::Failing),
        _ if e.raw_os_error() == Some(nix::errno::Errno::EIO as i32) => Some(DiskTrouble::Failing),
        _ => None,
    }
}

impl Error {
    /// The I/O error underneath, for the layers that wrap one.
    fn io_source(&self) -> Option<(&str, &std::io::Error)> {
        match self {
            Error::Store(StoreError::Io { path, source })
            | Error::Root(RootError::Unusable { path, source })
            | Error::Lease(LeaseError::Io { path, source }) => Some((path, source)),
            _ => None,
        }
    }

    /// The disk trouble this error reports, if any.
    pub fn disk_trouble(&self) -> Option<DiskTrouble> {
        match self {
            Error::DiskFull { .. } | Error::Store(StoreError::DiskFull { .. }) => {
                Some(DiskTrouble::Full)
            }
            Error::DiskFault { .. } | Error::Store(StoreError::DiskFault { .. }) => {
                Some(DiskTrouble::Failing)
            }
            other => other.io_source().and_then(|(_, e)| disk_trouble(e)),
        }
    }

    /// Restates a full or failing disk as what the user should do, naming
    /// the root (or the failing file); other errors pass unchanged.
    pub fn under_root(self, root: &std::path::Path) -> Error {
        if matches!(self, Error::DiskFull { .. } | Error::DiskFault { .. }) {
            return self;
        }
        match self.disk_trouble() {
            Some(DiskTrouble::Full) => Error::DiskFull {
                root: root.display().to_string(),
            },
            Some(DiskTrouble::Failing) => {
                let path = self
                    .io_source()
                    .map(|(p, _)| p.to_string())
                    .unwrap_or_else(|| root.display().to_string());
                Error::DiskFault {
                    path,
                    detail: self.to_string(),
                }
            }
            None => self,
        }
    }
}

/// SPEC §10.3: 2 usage/input, 4 busy, 70 internal, 74 a full or failing
/// disk; §12.7: 75 lease lost.
pub fn exit_code(e: &Error) -> i32 {
    if e.disk_trouble().is_some() {
        return 74;
    }
    match e {
        Error::DiskFull { .. } | Error::DiskFault { .. } => 74,
        Error::LeaseLost { .. } | Error::Store(StoreError::LeaseLost { .. }) => 75,
        Error::Usage(_) | Error::Root(_) | Error::Config(_) | Error::Capability(_) => 2,
        Error::Store(StoreError::Locked { .. }) => 4,
        Error::Store(StoreError::NotOurs { .. }) | Error::Store(StoreError::Io { .. }) => 2,
        Error::Store(StoreError::Sqlite { .. }) => 70,
        Error::Store(StoreError::DiskFull { .. } | StoreError::DiskFault { .. }) => 74,
        Error::Lease(LeaseError::Busy { .. }) => 4,
        Error::Lease(LeaseError::Io { .. }) => 2,
        Error::Internal(_) => 70,
        Error::Pg(p) | Error::Store(StoreError::Pg(p)) => pg_exit_code(p),
    }
}

/// A PostgreSQL server that does not answer is "busy": try again later. One
/// that answers no, a bad URL, or a schema that is not ours is bad input.
fn pg_exit_code(e: &PgError) -> i32 {
    match e {
        PgError::Unreachable { .. } => 4,
        PgError::BadUrl { .. }
        | PgError::Refused { .. }
        | PgError::NotOurs { .. }
        | PgError::Newer { .. }
        | PgError::NotEmpty { .. } => 2,
        PgError::Query { .. } => 70,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(exit_code(&usage("x")), 2);
        assert_eq!(
            exit_code(&Error::Store(StoreError::Locked {
                context: "x".into()
            })),
            4
        );
        assert_eq!(
            exit_code(&Error::Lease(LeaseError::Busy {
                agent: "a".into(),
                holder: None
            })),
            4
        );
        assert_eq!(exit_code(&Error::Internal("x".into())), 70);
        assert_eq!(
            exit_code(&Error::Root(RootError::BadName("../x".into()))),
            2
        );
    }

    #[test]
    fn a_full_or_failing_disk_is_74_and_says_what_to_do() {
        let root = std::path::Path::new("/srv/runner");
        let full = Error::Store(StoreError::DiskFull {
            context: "writing events".into(),
        });
        assert_eq!(exit_code(&full), 74);
        let e = full.under_root(root);
        assert_eq!(
            e.to_string(),
            "disk full under /srv/runner: free space, then run runner sweep"
        );
        assert_eq!(exit_code(&e), 74);
        let enospc = Error::Store(StoreError::Io {
            path: "/srv/runner/mail.db".into(),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32),
        });
        assert_eq!(exit_code(&enospc), 74);
        assert!(matches!(enospc.under_root(root), Error::DiskFull { .. }));
        let edquot = Error::Lease(LeaseError::Io {
            path: "/srv/runner/agents/a/turn.lock".into(),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::EDQUOT as i32),
        });
        assert_eq!(exit_code(&edquot), 74);
        let eio = Error::Root(RootError::Unusable {
            path: "/srv/runner/logs".into(),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32),
        });
        assert_eq!(exit_code(&eio), 74);
        let e = eio.under_root(root);
        assert!(
            e.to_string()
                .starts_with("I/O error under /srv/runner/logs:"),
            "{e}"
        );
        assert_eq!(exit_code(&e), 74);
        // Permission denied stays a usage error naming the path.
        let denied = Error::Store(StoreError::Io {
            path: "/srv/runner/mail.db".into(),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::EACCES as i32),
        });
        assert_eq!(exit_code(&denied), 2);
        assert!(matches!(denied.under_root(root), Error::Store(_)));
    }
}
