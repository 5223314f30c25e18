//! Configuration shared by the daemon and `codi2`.
//!
//! Two stages, so that every mistake is caught in one place with a sentence
//! that names the key: [`RawConfig`] is the TOML file exactly as written
//! (every field optional, unknown keys are errors), and [`Config`] is the
//! validated result after defaults, the environment and command-line flags
//! were applied (precedence: defaults < file < environment < flags).
//!
//! The environment is a parameter ([`paths::EnvLookup`]) rather than read
//! directly, so tests never touch the process environment. docs/CONFIG.md
//! describes every key for users.

mod defaults;
mod dump;
mod error;
mod hub;
mod listeners;
mod model;
pub mod paths;
mod raw;
mod resolve;
mod values;

pub use defaults::*;
pub use error::ConfigError;
pub use hub::{
    check_hub_url, read_password_file, HubKind, HubTables, ServerHubConfig, HUB_CONTENT_TYPES,
};
pub use model::{AdminConfig, Config, GeneralConfig, HealthConfig, MonitorConfig, StorageConfig};
pub use raw::{RawAdmin, RawConfig, RawGeneral, RawHealth, RawMonitor, RawServerHub, RawStorage};
pub use resolve::Overrides;

#[cfg(test)]
mod tests;
