//! Routing answers from the writer and reader threads back to the event loop
//! that owns the connection, through a channel and that loop's mio `Waker`.

use crate::budget::Reservation;
use crate::proto::{decode_message, DecodeError, Message, HEADER_LEN};
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;

/// An answer on its way to its connection.
#[derive(Debug)]
pub enum Answer {
    /// A message the loop encodes when its turn comes.
    Message(Message),
    /// One whole frame, header included, already encoded (a reader's
    /// `LogResults`), with the share of the answer pool it holds until it
    /// has been written out.
    Frame {
        /// The frame.
        bytes: Vec<u8>,
        /// Its room in the answer pool, if it has one.
        room: Option<Reservation>,
    },
}

impl From<Message> for Answer {
    fn from(message: Message) -> Self {
        Answer::Message(message)
    }
}

impl Answer {
    /// The message, if this answer is one (not an encoded frame).
    pub fn as_message(&self) -> Option<&Message> {
        match self {
            Answer::Message(m) => Some(m),
            Answer::Frame { .. } => None,
        }
    }

    /// The message: this one, or the frame decoded (tests and tools).
    pub fn into_message(self) -> Result<Message, DecodeError> {
        match self {
            Answer::Message(m) => Ok(m),
            Answer::Frame { bytes, .. } => decode_message(&bytes[HEADER_LEN.min(bytes.len())..]),
        }
    }
}

/// Where one request's answer must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// Index of the owning event loop.
    pub worker: usize,
    /// The connection's slab token inside that loop.
    pub token: usize,
    /// The connection's serial number, so that an answer for a closed
    /// connection is never delivered to a newer one reusing the token.
    pub serial: u64,
    /// The request's position on its connection (answers go out in order).
    pub seq: u64,
    /// A query: its answer frees one of the connection's query slots.
    pub query: bool,
}

/// A finished request on its way back to its loop.
#[derive(Debug)]
pub struct Completion {
    /// Whose answer it is.
    pub to: ReplyTo,
    /// The answer.
    pub answer: Answer,
}

/// The sending side for one event loop.
#[derive(Clone)]
pub struct ReplySink {
    tx: Sender<Completion>,
    waker: Arc<mio::Waker>,
}

impl ReplySink {
    /// Queues a completion without waking the loop; call [`ReplySink::wake`]
    /// once after a group of sends.
    pub fn push(&self, completion: Completion) {
        // The loop only drops its receiver when it exits; then nobody waits.
        let _ = self.tx.send(completion);
    }

    /// Wakes the loop so it drains its completions.
    pub fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake event loop: {e}");
        }
    }
}

/// One [`ReplySink`] per event loop, indexed by [`ReplyTo::worker`].
#[derive(Clone)]
pub struct Replies {
    sinks: Arc<Vec<ReplySink>>,
}

impl Replies {
    /// Builds the routing table from each loop's channel and waker.
    pub fn new(sinks: Vec<ReplySink>) -> Self {
        Replies {
            sinks: Arc::new(sinks),
        }
    }

    /// Sends one answer and wakes its loop.
    pub fn send(&self, to: ReplyTo, answer: impl Into<Answer>) {
        let sink = &self.sinks[to.worker];
        sink.push(Completion {
            to,
            answer: answer.into(),
        });
        sink.wake();
    }

    /// Sends many answers, waking each loop involved exactly once.
    pub fn send_all(&self, completions: impl IntoIterator<Item = Completion>) {
        let mut touched = vec![false; self.sinks.len()];
        for c in completions {
            touched[c.to.worker] = true;
            self.sinks[c.to.worker].push(c);
        }
        for (sink, hit) in self.sinks.iter().zip(touched) {
            if hit {
                sink.wake();
            }
        }
    }
}

/// Creates the channel for one loop: the sink for producers and the
/// receiver the loop drains when its waker fires.
pub fn channel(waker: Arc<mio::Waker>) -> (ReplySink, Receiver<Completion>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (ReplySink { tx, waker }, rx)
}
