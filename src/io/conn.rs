//! One client connection: its stream, buffers, protocol state, the answers
//! it is owed, and why (if at all) reading from it is paused.

use super::answers::{AnswerQueue, AnswerRooms};
use super::buffer::ReadBuffer;
use super::listener::Stream;
use crate::access::PeerCred;
use crate::metrics::Metrics;
use crate::proto::{encode_message, ErrorCode, Message, Payload};
use crate::reply::Answer;
use std::io::{self, Write};
use std::time::Instant;

/// Unanswered output above which the connection stops reading requests.
pub const WRITE_HIGH_WATER: usize = 1024 * 1024;
/// Queries one connection may have running at once.
pub const MAX_QUERIES_IN_FLIGHT: usize = 4;
/// Capacity an emptied output buffer keeps: one that held a 1 MiB answer
/// would otherwise keep it (outside the answer pool) while idle.
pub const OUTPUT_KEPT: usize = 64 * 1024;

/// Where a connection is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// TCP with a token configured: only `Authenticate` is allowed.
    AwaitingAuth,
    /// Requests are served.
    Open,
    /// No more requests are read; owed answers are still sent, then the
    /// connection closes (bad frame, failed auth, shutdown, peer EOF).
    Closing,
    /// Every answer is sent and our side is shut down for writing; further
    /// input is read and discarded until the client closes or the instant
    /// passes. Closing a TCP socket with unread input would send a reset,
    /// which can make the client drop answers it has not read yet.
    Lingering(Instant),
}

/// Why reading is paused right now, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Not paused.
    None,
    /// This connection's own answers or output backed up.
    Backlog,
    /// The writer's queue or the global in-flight budget is full.
    Global,
    /// The rate limit's bucket is empty until the given instant.
    RateLimit(Instant),
}

/// A token bucket counting log entries per second.
#[derive(Debug)]
pub struct RateLimiter {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(burst: u32) -> Self {
        RateLimiter {
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Refills the bucket at `rate`/s up to `burst`; when it is empty,
    /// returns the instant the next request may go. Rate 0 is unlimited.
    pub fn ready(&mut self, rate: u32, burst: u32, now: Instant) -> Result<(), Instant> {
        if rate == 0 {
            return Ok(());
        }
        let rate = f64::from(rate);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst.max(1)));
        self.last = now;
        if self.tokens > 0.0 {
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / rate;
            Err(now + std::time::Duration::from_secs_f64(wait))
        }
    }

    /// Charges `cost` tokens for a request that went through. A big batch may
    /// drive the bucket negative (it is never split or refused), which delays
    /// the following requests accordingly.
    pub fn charge(&mut self, cost: u32, rate: u32) {
        if rate != 0 {
            self.tokens -= f64::from(cost);
        }
    }
}

/// A connection owned by one event loop.
#[derive(Debug)]
pub struct Connection {
    /// Unique per loop over its lifetime; guards against token reuse.
    pub serial: u64,
    /// The socket.
    pub stream: Stream,
    /// Protocol state.
    pub state: ConnState,
    /// Undecoded input.
    pub input: ReadBuffer,
    /// Encoded answers not yet written, from `output_pos` on.
    output: Vec<u8>,
    output_pos: usize,
    /// Answers owed, in request order.
    pub answers: AnswerQueue,
    /// Answer-pool room held by this connection's query answers.
    pub rooms: AnswerRooms,
    /// The session started on this connection, the default for its logs.
    pub session: Option<String>,
    /// Rate limiting state.
    pub rate: RateLimiter,
    /// Why reading is paused.
    pub pause: Pause,
    /// The socket may have more bytes to read (edge-triggered readiness).
    pub readable: bool,
    /// An event reported the peer's side closed (or an error): read until
    /// the end of the stream, never stopping at a short read.
    pub read_closed: bool,
    /// The peer closed its side (or the socket failed).
    pub peer_closed: bool,
    /// The peer closed both directions or the socket failed: nothing sent
    /// will reach it any more.
    pub gone: bool,
    /// Queries running for this connection.
    pub queries_in_flight: usize,
    /// The connection is on its loop's run list.
    pub scheduled: bool,
    /// The credentials of the process at the other end of a Unix socket
    /// (`SO_PEERCRED`); `None` over TCP.
    pub peer: Option<PeerCred>,
    /// It sent `Authenticate` with the token while one was required.
    pub holds_token: bool,
    /// The address of a TCP peer.
    pub peer_ip: Option<std::net::IpAddr>,
    /// When the connection was accepted (the `Authenticate` deadline
    /// counts from here).
    pub accepted_at: Instant,
    /// When the last complete frame arrived (or the connection opened);
    /// the idle timeout counts from here.
    pub last_frame_at: Instant,
    /// Bytes of the read buffer charged to the global receive pool.
    pub receive_charged: usize,
    /// Since when output has been waiting for a socket that takes no more
    /// (reset whenever everything owed is written); the write timeout
    /// counts from here.
    pub output_waiting_since: Option<Instant>,
    /// Close right after the last answer is written, without lingering: for
    /// connections turned away before they authenticated, whose slot must
    /// come free at once.
    pub skip_linger: bool,
}

impl Connection {
    /// Wraps a freshly accepted stream.
    pub fn new(serial: u64, stream: Stream, needs_auth: bool, burst: u32) -> Self {
        Connection {
            serial,
            stream,
            state: if needs_auth {
                ConnState::AwaitingAuth
            } else {
                ConnState::Open
            },
            input: ReadBuffer::default(),
            output: Vec::new(),
            output_pos: 0,
            answers: AnswerQueue::default(),
            rooms: AnswerRooms::default(),
            session: None,
            rate: RateLimiter::new(burst),
            pause: Pause::None,
            readable: true,
            read_closed: false,
            peer_closed: false,
            gone: false,
            queries_in_flight: 0,
            scheduled: false,
            peer: None,
            holds_token: false,
            peer_ip: None,
            accepted_at: Instant::now(),
            last_frame_at: Instant::now(),
            receive_charged: 0,
            output_waiting_since: None,
            skip_linger: false,
        }
    }

    /// Who is at the other end, for the daemon's log: `uid 1000, pid 42`
    /// over Unix, the address over TCP.
    pub fn describe_peer(&self) -> String {
        match (self.peer, self.peer_ip) {
            (Some(p), _) => format!("uid {}, pid {}", p.uid, p.pid),
            (None, Some(ip)) => format!("TCP {ip}"),
            (None, None) => "unknown peer".into(),
        }
    }

    /// The Unix peer's uid (`None` over TCP).
    pub fn peer_uid(&self) -> Option<u32> {
        self.peer.map(|p| p.uid)
    }

    /// True when the connection owes nothing: no answer pending, nothing
    /// unsent, no query running.
    pub fn owes_nothing(&self) -> bool {
        self.answers.is_empty() && self.pending_output() == 0 && self.queries_in_flight == 0
    }

    /// Bytes of encoded output still to send.
    pub fn pending_output(&self) -> usize {
        self.output.len() - self.output_pos
    }

    /// Moves ready answers (in order) into the output buffer, up to the
    /// high-water mark, recording into `metrics` (shard `loop_id`) how long
    /// each request waited for its answer and which errors were sent.
    pub fn encode_ready_answers(&mut self, metrics: &Metrics, loop_id: usize) {
        // One clock read for every answer encoded in this call.
        let mut now = None;
        while self.pending_output() < WRITE_HIGH_WATER {
            let Some((answer, arrived)) = self.answers.pop_ready() else {
                break;
            };
            if let Some(at) = arrived {
                let now = *now.get_or_insert_with(Instant::now);
                metrics
                    .ipc_duration
                    .record_duration(loop_id, now.saturating_duration_since(at));
            }
            let answer = match answer {
                Answer::Message(answer) => answer,
                Answer::Frame { bytes, room } => {
                    // Already encoded (a reader's answer): its room is
                    // released once the socket has taken it.
                    if self.output.is_empty() {
                        self.output = bytes;
                    } else {
                        self.output.extend_from_slice(&bytes);
                    }
                    if let Some(room) = room {
                        self.rooms.queued(self.output.len(), room);
                    }
                    continue;
                }
            };
            if let Payload::Error { code, .. } = &answer.payload {
                metrics.error_sent(code);
            }
            if let Err(e) = encode_message(&answer, &mut self.output) {
                log::error!("cannot encode a {} answer: {e}", answer.payload.name());
                let fallback = Message::error(ErrorCode::Internal, "answer could not be encoded");
                metrics.error_sent(&ErrorCode::Internal);
                // A short error always encodes.
                let _ = encode_message(&fallback, &mut self.output);
            }
        }
    }

    /// Writes as much output as the socket takes. `Err` means the
    /// connection is broken.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.output_pos < self.output.len() {
            match self.stream.write(&self.output[self.output_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.output_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.rooms.written(self.output_pos);
                    self.output_waiting_since.get_or_insert_with(Instant::now);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.output_pos = 0;
        self.output_waiting_since = None;
        self.rooms.all_written();
        if self.output.capacity() > OUTPUT_KEPT {
            self.output.shrink_to(OUTPUT_KEPT);
        }
        Ok(())
    }

    /// Encodes and writes ready answers until the socket is full or no
    /// answer at the front is ready. `Err` means the connection is broken.
    /// `metrics` and `loop_id` as for [`Connection::encode_ready_answers`].
    pub fn pump_output(&mut self, metrics: &Metrics, loop_id: usize) -> io::Result<()> {
        loop {
            self.encode_ready_answers(metrics, loop_id);
            self.flush()?;
            if self.pending_output() > 0 || !self.answers.front_ready() {
                return Ok(());
            }
        }
    }

    /// True when everything owed has been answered and written.
    pub fn is_drained(&self) -> bool {
        self.answers.is_empty() && self.pending_output() == 0
    }

    /// True when this connection's own backlog forbids reading more.
    pub fn backlogged(&self, max_pending: usize) -> bool {
        self.answers.len() >= max_pending
            || self.pending_output() >= WRITE_HIGH_WATER
            || self.queries_in_flight >= MAX_QUERIES_IN_FLIGHT
            || self.rooms.full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limiter_allows_burst_then_delays() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10);
        for _ in 0..10 {
            assert!(r.ready(100, 10, t0).is_ok());
            r.charge(1, 100);
        }
        let until = r.ready(100, 10, t0).unwrap_err();
        assert_eq!(until - t0, Duration::from_millis(10));
        assert!(r.ready(100, 10, until).is_ok());
        assert!(r.ready(0, 10, t0).is_ok(), "rate 0 is unlimited");
    }

    #[test]
    fn big_batch_goes_through_then_pays_back() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10);
        assert!(r.ready(100, 10, t0).is_ok());
        r.charge(1000, 100);
        let until = r.ready(100, 10, t0).unwrap_err();
        assert!(until - t0 >= Duration::from_secs(9));
    }
}
