//! The wire contract (`protocol-v1.md`): message types and the pure frame codec.
//!
//! Shared by the daemon, `codi2` and the load generator so that every party
//! speaks exactly the same bytes.

pub mod frame;
pub mod message;
mod wire;

#[cfg(test)]
mod examples;

pub use frame::{
    decode_message, encode_log_results, encode_message, frame_body_len, DecodeError, EncodeError,
    FrameError, HEADER_LEN, MAX_FRAME_LEN,
};
pub use message::{
    AckStatus, ComponentStatus, ErrorCode, LogFields, LogFilter, LogLevel, Message, MonitoredPath,
    Payload, StoredLog, Timestamp, MAX_FUTURE_SKEW_MICROS, MAX_TIMESTAMP_MICROS,
    MIN_TIMESTAMP_MICROS,
};
