//! The error of a command, and the one function that maps errors to exit
//! codes (SPEC §10.3). Each layer has its own `thiserror` enum; this wraps
//! them. A lost CAS race is never an error (see `state::Cas`), and a turn's
//! outcome is a value with its own exit code, not an error.

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
    /// A bug. Exit 70.
    #[error("internal error: {0} (this is a bug in runner: please report it)")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn usage(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

/// SPEC §10.3: 2 usage/input, 4 busy, 70 internal.
pub fn exit_code(e: &Error) -> i32 {
    match e {
        Error::Usage(_) | Error::Root(_) | Error::Config(_) | Error::Capability(_) => 2,
        Error::Store(StoreError::Locked { .. }) => 4,
        Error::Store(StoreError::NotOurs { .. }) | Error::Store(StoreError::Io { .. }) => 2,
        Error::Store(StoreError::Sqlite { .. }) => 70,
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
}
