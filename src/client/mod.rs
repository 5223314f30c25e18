//! The blocking client used by `codi2`.

pub mod conn;
pub mod discover;
