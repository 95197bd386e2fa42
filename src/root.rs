//! The layout under `--root` (SPEC §1): where every file of an agent lives,
//! agent-name validation, and private directory creation.
//!
//! Invariants: a name is checked before any path is built from it (no path
//! traversal); directories are created 0700. Non-goal: opening databases
//! (that is `store`).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error(
        "invalid agent name '{0}': use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
    )]
    BadName(String),
    #[error("cannot use root {path}: {source}")]
    Unusable {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Checks `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

pub fn check_name(name: &str) -> Result<(), RootError> {
    if valid_name(name) {
        Ok(())
    } else {
        // Escaped, so a name with a newline still makes one error line.
        Err(RootError::BadName(name.escape_debug().to_string()))
    }
}

/// Creates `dir` and its missing parents with mode 0700.
pub fn private_dir(dir: &Path) -> Result<(), RootError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| RootError::Unusable {
            path: dir.display().to_string(),
            source: e,
        })
}

#[derive(Debug, Clone)]
pub struct Root {
    pub dir: PathBuf,
}

impl Root {
    /// Creates the root if needed and checks that it is a usable directory.
    pub fn prepare(dir: &Path) -> Result<Root, RootError> {
        private_dir(dir)?;
        let probe = std::fs::read_dir(dir).map_err(|e| RootError::Unusable {
            path: dir.display().to_string(),
            source: e,
        })?;
        drop(probe);
        Ok(Root {
            dir: dir.to_path_buf(),
        })
    }

    pub fn agent_dir(&self, agent: &str) -> PathBuf {
        self.dir.join("agents").join(agent)
    }

    pub fn lock_path(&self, agent: &str) -> PathBuf {
        self.agent_dir(agent).join("turn.lock")
    }

    pub fn pid_path(&self, agent: &str) -> PathBuf {
        self.agent_dir(agent).join("turn.pid")
    }

    pub fn stop_reason_path(&self, agent: &str) -> PathBuf {
        self.agent_dir(agent).join("stop-reason")
    }

    pub fn turn_log_dir(&self, agent: &str, turn_id: &str) -> PathBuf {
        self.dir.join("logs").join(agent).join(turn_id)
    }

    pub fn capabilities_dir(&self) -> PathBuf {
        self.dir.join("capabilities")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["builder-1", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../x",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            &"x".repeat(65),
            "é",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
