//! The network side: listeners, the per-core event loops, connections and
//! their buffers, and what each request does.

pub mod answers;
pub mod buffer;
pub mod conn;
pub mod event_loop;
pub mod listener;
pub mod request;
