//! The driver threads: a few mio loops, each owning a share of the
//! connections (never a thread per client).
//!
//! Each thread keeps a min-heap of the next due time of each of its
//! scheduled connections and sleeps in `poll` until the earliest one. A frame
//! due at `T` leaves at `T` if its client's window has room; otherwise the
//! client is marked blocked and the frame leaves as soon as an answer frees
//! a slot, counted as a late send, with its latency still measured from `T`.
//! `poll` sleeps in whole milliseconds, so a frame may leave up to about a
//! millisecond after `T`; that lag is part of the measured latency (the
//! service-time histogram, from the real send, shows it apart).
//!
//! The thread's pieces live in submodules: [`conn`] (connections and
//! connecting), [`pacing`] (what is sent when), [`event_loop`] (the mio loop
//! and socket I/O) and [`results`] (counts, histograms and accounting for
//! answers).

mod conn;
mod event_loop;
mod pacing;
mod results;

pub use results::{new_hist, Counts, Shared, ThreadResult};

use crate::args::Endpoint;
use crate::schedule::Schedule;
use codi_monitor::proto::Message;
use conn::Conn;
use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use mio::Poll;
use slab::Slab;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one thread drives.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Thread index.
    pub thread: usize,
    /// Load clients: (global index, its schedule; `None` = closed loop).
    pub clients: Vec<(usize, Option<Schedule>)>,
    /// Idle connections.
    pub idle: usize,
    /// The ping connection's schedule.
    pub ping: Option<Schedule>,
    /// The query connection's schedule.
    pub query: Option<Schedule>,
}

/// What every thread needs besides its plan.
#[derive(Clone)]
pub struct Setup {
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Answers outstanding per load client.
    pub window: usize,
    /// Length of the load phase.
    pub duration: Duration,
    /// The message each load frame is stamped from.
    pub template: Message,
    /// The run's session tag; client `i` logs in session `<tag>-c<i>`.
    pub session_tag: String,
    /// Log entries per load frame.
    pub batch: u32,
    /// Token every TCP connection authenticates with first
    /// (`$CODI_MONITOR_TOKEN`).
    pub token: Option<String>,
}

/// One driver thread's state.
pub struct Driver {
    poll: Poll,
    conns: Slab<Conn>,
    due: BinaryHeap<Reverse<(Instant, usize)>>,
    setup: Setup,
    template: Message,
    ping: Message,
    query: Message,
    start: Instant,
    end: Instant,
    stopped: bool,
    shared: Arc<Shared>,
    ack_interval: Histogram<u64>,
    result: ThreadResult,
    scratch: Box<[u8]>,
}

/// Spawns one named driver thread: it connects its share, reports on
/// `ready`, waits for the common start instant on `go` (`None` aborts), runs,
/// and returns its result.
pub fn spawn(
    plan: Plan,
    setup: Setup,
    shared: Arc<Shared>,
    ready: Sender<Result<(), String>>,
    go: Receiver<Option<Instant>>,
) -> io::Result<std::thread::JoinHandle<Option<ThreadResult>>> {
    std::thread::Builder::new()
        .name(format!("loadgen-{}", plan.thread))
        .spawn(move || {
            let driver = match Driver::connect(&plan, setup, shared) {
                Ok(d) => {
                    let _ = ready.send(Ok(()));
                    d
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return None;
                }
            };
            let start = go.recv().ok().flatten()?;
            Some(driver.run(start))
        })
}
