//! codi-monitor: collects structured logs and agent sessions from many
//! short-lived `codi2` clients into one SQLite database on the host.
//!
//! The daemon is async-free by design: one mio event loop per core decodes
//! frames and hands them over crossbeam queues to a single batched SQLite
//! writer thread, whose acknowledgments come back through each loop's mio
//! `Waker`. Queries run on a separate pool of read-only connections.
#![deny(missing_docs)]

pub mod access;
pub mod admin;
pub mod budget;
pub mod client;
pub mod config;
pub mod daemon;
pub mod export;
pub mod fault;
pub mod fsperm;
pub mod health;
pub mod heartbeat;
pub mod hub;
pub mod io;
pub mod logger;
pub mod metrics;
pub mod notify;
pub mod proto;
pub mod reply;
pub mod sched;
pub mod store;
pub mod text;

#[cfg(test)]
mod testing;
