//! A config file read, checked and typed: its entities (`config`) and its plugins' typed
//! configs (`plugins`), with every problem of both located in one list. What `bazaar gateway
//! check` runs and what the gateway serves from; reading sits below the plugins, and this
//! step above both.

use std::path::Path;

use crate::{
    config::{Config, ConfigProblems},
    plugins::PluginSet,
};

/// A config that passed every check, its plugins typed.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The entities.
    pub config: Config,
    /// The plugins, typed and resolved per route.
    pub plugins: PluginSet,
}

/// Reads, checks and types YAML or JSON config text.
pub(crate) fn parse(text: &str) -> Result<Loaded, ConfigProblems> {
    let (config, mut problems) = Config::read(text);
    // Plugin problems are listed with the rest, even when other entries are wrong too.
    let plugins = PluginSet::build(&config).map_err(|found| problems.extend(found));
    match plugins {
        Ok(plugins) if problems.is_empty() => Ok(Loaded { config, plugins }),
        _ => Err(ConfigProblems::new(problems)),
    }
}

/// Reads, checks and types a config file.
pub(crate) fn load_file(path: &Path) -> Result<Loaded, ConfigProblems> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigProblems::new(vec![format!("{}: {e}", path.display())]))?;
    parse(&text)
}
