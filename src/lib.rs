//! codi-monitor: collects structured logs and agent sessions from many
//! short-lived `codi2` clients into one SQLite database on the host.
#![deny(missing_docs)]

pub mod budget;
pub mod client;
pub mod config;
pub mod metrics;
pub mod proto;
pub mod reply;
pub mod store;
