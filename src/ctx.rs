//! What every command shares: the root, its configuration, and output flags.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::Result;
use crate::root::Root;
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct Ctx {
    pub root: Root,
    pub config: Config,
    pub json: bool,
}

impl Ctx {
    /// Prepares the root (absolute, created 0700) and loads the configuration.
    pub fn new(root: &Path, json: bool) -> Result<Ctx> {
        let root = Root::prepare(&absolute_root(root)?)?;
        let config = Config::load(&root.dir)?;
        crate::store::pg::set_idle_in_transaction_timeout(config.fleet.grace);
        Ok(Ctx { root, config, json })
    }

    pub fn store(&self) -> Result<Store> {
        Ok(Store::open_backend(&self.root.dir, &self.config.store)?)
    }

    pub fn events(&self) -> Result<crate::store::Db> {
        Ok(crate::store::events::open_backend(
            &self.root.dir,
            &self.config.store,
        )?)
    }
}

/// The root as an absolute path (relative to the current directory).
pub fn absolute_root(root: &Path) -> Result<PathBuf> {
    if root.is_absolute() {
        return Ok(root.to_path_buf());
    }
    Ok(std::env::current_dir()
        .map_err(|e| crate::error::usage(format!("cannot read the current directory: {e}")))?
        .join(root))
}
