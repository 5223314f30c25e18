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

use crate::args::{Endpoint, DRAIN_WAIT};
use crate::fifo::{match_answer, Kind, Matched, Pending};
use crate::payload::{client_session, query_template, restamp, set_session};
use crate::schedule::Schedule;
use codi_monitor::io::listener::Stream;
use codi_monitor::proto::{decode_message, encode_message, frame_body_len, Message, Payload};
use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};
use parking_lot::Mutex;
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Highest latency a histogram holds: one hour, in microseconds.
pub const HIST_MAX_US: u64 = 3_600_000_000;
/// Answers a ping connection may have outstanding.
const PING_WINDOW: usize = 1024;
/// How often a thread publishes its latencies for the progress line.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Accepted ids kept for the stored-rows check (per thread).
pub const ACCEPTED_ID_CAP: usize = 1_000_000;
/// Error messages kept per thread for the report.
const KEPT_ERRORS: usize = 5;
/// How long connecting keeps retrying a refused or busy socket.
const CONNECT_PATIENCE: Duration = Duration::from_secs(5);

/// A fresh latency histogram in microseconds (1 µs to 1 h, 3 digits).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// Counters every thread updates for the live progress line.
#[derive(Debug, Default)]
pub struct Progress {
    /// Log entries sent.
    pub entries_sent: AtomicU64,
    /// Log entries acknowledged `Accepted`.
    pub entries_acked: AtomicU64,
    /// Frames sent (logs, pings, queries).
    pub frames_sent: AtomicU64,
    /// Frames answered or given up on.
    pub frames_done: AtomicU64,
    /// Answers that were not `Accepted` or expected results.
    pub failures: AtomicU64,
}

/// What the threads share with the main thread.
pub struct Shared {
    /// Live counters.
    pub progress: Progress,
    /// Acknowledgment latency from the scheduled time, all threads merged.
    pub ack: Mutex<Histogram<u64>>,
}

impl Shared {
    /// Empty counters and histogram.
    pub fn new() -> Self {
        Shared {
            progress: Progress::default(),
            ack: Mutex::new(new_hist()),
        }
    }
}

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

/// Counts of one thread (and, summed, of the run).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Load frames sent.
    pub frames_sent: u64,
    /// Log entries sent.
    pub entries_sent: u64,
    /// Load frames acknowledged `Accepted`.
    pub frames_accepted: u64,
    /// Log entries acknowledged `Accepted`.
    pub entries_accepted: u64,
    /// Log entries acknowledged `Queued` (not durable).
    pub entries_queued: u64,
    /// Load frames `Rejected`.
    pub frames_rejected: u64,
    /// Log entries `Rejected`.
    pub entries_rejected: u64,
    /// `Error` answers (any request).
    pub errors: u64,
    /// Log entries answered with `Error`.
    pub entries_errored: u64,
    /// Answers that did not fit their request.
    pub protocol_errors: u64,
    /// Answers with no request outstanding.
    pub unsolicited: u64,
    /// Frames sent after their due time because the window was full.
    pub late_sends: u64,
    /// Load frames due during the run that were never sent (window full at the end).
    pub frames_unsent: u64,
    /// Requests never answered (connection lost or drain deadline).
    pub frames_unanswered: u64,
    /// Log entries in those.
    pub entries_unanswered: u64,
    /// Connections the daemon closed or that failed.
    pub connections_lost: u64,
    /// Pings sent.
    pub pings_sent: u64,
    /// Pings answered.
    pub pings_answered: u64,
    /// Queries sent.
    pub queries_sent: u64,
    /// Queries answered with `LogResults`.
    pub queries_answered: u64,
}

impl Counts {
    /// Adds `other` into `self`.
    pub fn add(&mut self, o: &Counts) {
        self.frames_sent += o.frames_sent;
        self.entries_sent += o.entries_sent;
        self.frames_accepted += o.frames_accepted;
        self.entries_accepted += o.entries_accepted;
        self.entries_queued += o.entries_queued;
        self.frames_rejected += o.frames_rejected;
        self.entries_rejected += o.entries_rejected;
        self.errors += o.errors;
        self.entries_errored += o.entries_errored;
        self.protocol_errors += o.protocol_errors;
        self.unsolicited += o.unsolicited;
        self.late_sends += o.late_sends;
        self.frames_unsent += o.frames_unsent;
        self.frames_unanswered += o.frames_unanswered;
        self.entries_unanswered += o.entries_unanswered;
        self.connections_lost += o.connections_lost;
        self.pings_sent += o.pings_sent;
        self.pings_answered += o.pings_answered;
        self.queries_sent += o.queries_sent;
        self.queries_answered += o.queries_answered;
    }
}

/// What a thread hands back when it is done.
pub struct ThreadResult {
    /// Its counts.
    pub counts: Counts,
    /// Acknowledgment latency from the real send time (service time).
    pub service: Histogram<u64>,
    /// Ping round trips, from the scheduled time.
    pub ping: Histogram<u64>,
    /// Query latency, from the scheduled time.
    pub query: Histogram<u64>,
    /// (id, entries) of every accepted load frame, up to [`ACCEPTED_ID_CAP`].
    pub accepted: Vec<(Uuid, u32)>,
    /// True if `accepted` hit its cap.
    pub accepted_truncated: bool,
    /// The first few failure messages.
    pub errors: Vec<String>,
    /// When the last accepted answer arrived.
    pub last_ack: Option<Instant>,
}

/// What a connection is for.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Sends logs on a schedule (`Some`) or as fast as its window allows.
    Load(Option<Schedule>),
    /// Sends pings on a schedule.
    Ping(Schedule),
    /// Sends queries on a schedule, one at a time.
    Query(Schedule),
    /// Connects and waits.
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Open,
    Closed,
}

struct Conn {
    stream: Stream,
    role: Role,
    /// The session of a load connection's logs (empty for other roles).
    session: String,
    state: ConnState,
    rbuf: Vec<u8>,
    rstart: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    fifo: VecDeque<Pending>,
    /// Index of the next scheduled frame.
    next: u64,
    /// A due frame waits for window room.
    blocked: bool,
}

impl Conn {
    fn window(&self, load_window: usize) -> usize {
        match self.role {
            Role::Load(_) => load_window,
            Role::Ping(_) => PING_WINDOW,
            Role::Query(_) => 1,
            Role::Idle => 0,
        }
    }
}

/// Sends `Authenticate` on a fresh blocking TCP stream and waits for its
/// answer, so the load frames that follow are served.
fn authenticate(stream: &mut std::net::TcpStream, token: &str) -> io::Result<()> {
    let auth = Message::new(Payload::Authenticate {
        token: token.to_owned(),
    });
    let mut frame = Vec::new();
    encode_message(&auth, &mut frame).map_err(io::Error::other)?;
    stream.write_all(&frame)?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header)?;
    let len = frame_body_len(&header)
        .map_err(|e| io::Error::other(format!("bad answer to Authenticate: {e}")))?
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    match decode_message(&body).map(|m| m.payload) {
        Ok(Payload::Acknowledgment { .. }) => Ok(()),
        Ok(other) => Err(io::Error::other(format!(
            "the daemon refused the token: {other:?}"
        ))),
        Err(e) => Err(io::Error::other(format!("undecodable answer: {e}"))),
    }
}

/// Connects one stream, retrying briefly while the daemon's backlog is full.
fn connect(endpoint: &Endpoint, token: Option<&str>) -> io::Result<Stream> {
    let give_up = Instant::now() + CONNECT_PATIENCE;
    loop {
        let result = match endpoint {
            Endpoint::Unix(path) => std::os::unix::net::UnixStream::connect(path).and_then(|s| {
                s.set_nonblocking(true)?;
                Ok(Stream::Unix(mio::net::UnixStream::from_std(s)))
            }),
            Endpoint::Tcp(addr) => std::net::TcpStream::connect(addr).and_then(|mut s| {
                s.set_nodelay(true)?;
                if let Some(token) = token {
                    s.set_read_timeout(Some(CONNECT_PATIENCE))?;
                    authenticate(&mut s, token)?;
                }
                s.set_nonblocking(true)?;
                Ok(Stream::Tcp(mio::net::TcpStream::from_std(s)))
            }),
        };
        match result {
            Err(e)
                if Instant::now() < give_up
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
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

impl Driver {
    /// Connects every connection of `plan` and registers it; nothing is sent
    /// yet.
    pub fn connect(plan: &Plan, setup: Setup, shared: Arc<Shared>) -> Result<Driver, String> {
        let poll = Poll::new().map_err(|e| format!("cannot create a poll: {e}"))?;
        let mut conns = Slab::with_capacity(plan.clients.len() + plan.idle + 2);
        let roles = plan
            .clients
            .iter()
            .map(|(client, s)| (Role::Load(*s), client_session(&setup.session_tag, *client)))
            .chain(plan.ping.map(|s| (Role::Ping(s), String::new())))
            .chain(plan.query.map(|s| (Role::Query(s), String::new())))
            .chain(std::iter::repeat_with(|| (Role::Idle, String::new())).take(plan.idle));
        for (role, session) in roles {
            let stream = connect(&setup.endpoint, setup.token.as_deref()).map_err(|e| {
                format!(
                    "thread {}: cannot connect to {:?} (connection {}): {e}",
                    plan.thread,
                    setup.endpoint,
                    conns.len() + 1
                )
            })?;
            let key = conns.insert(Conn {
                stream,
                role,
                session,
                state: ConnState::Open,
                rbuf: Vec::new(),
                rstart: 0,
                wbuf: Vec::new(),
                wpos: 0,
                fifo: VecDeque::new(),
                next: 0,
                blocked: false,
            });
            poll.registry()
                .register(
                    conns[key].stream.source(),
                    Token(key),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map_err(|e| format!("cannot register a connection: {e}"))?;
        }
        let now = Instant::now();
        Ok(Driver {
            poll,
            conns,
            due: BinaryHeap::new(),
            template: setup.template.clone(),
            setup,
            ping: Message::new(Payload::Ping),
            query: query_template(),
            start: now,
            end: now,
            stopped: false,
            shared,
            ack_interval: new_hist(),
            result: ThreadResult {
                counts: Counts::default(),
                service: new_hist(),
                ping: new_hist(),
                query: new_hist(),
                accepted: Vec::new(),
                accepted_truncated: false,
                errors: Vec::new(),
                last_ack: None,
            },
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        })
    }

    /// Runs the load phase from `start`, then waits up to [`DRAIN_WAIT`] for
    /// the outstanding answers.
    pub fn run(mut self, start: Instant) -> ThreadResult {
        self.start = start;
        self.end = start + self.setup.duration;
        let drain_deadline = self.end + DRAIN_WAIT;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for &key in &keys {
            match self.conns[key].role {
                Role::Load(None) => self.fill(key, Instant::now()),
                Role::Idle => {}
                _ => self.send_due(key, Instant::now(), false),
            }
        }
        let mut events = Events::with_capacity(1024);
        let mut published = Instant::now();
        loop {
            let now = Instant::now();
            // Every scheduled frame is due before the end, so the frames due
            // by now leave before the load phase is declared over.
            while let Some(&Reverse((due, key))) = self.due.peek() {
                if due > now {
                    break;
                }
                self.due.pop();
                self.send_due(key, now, false);
            }
            if !self.stopped && now >= self.end {
                self.stop_sending();
            }
            if self.stopped && (self.outstanding() == 0 || now >= drain_deadline) {
                break;
            }
            if now.duration_since(published) >= PUBLISH_EVERY {
                self.publish();
                published = now;
            }
            let wake = if self.stopped {
                drain_deadline
            } else {
                self.due
                    .peek()
                    .map_or(self.end, |Reverse((due, _))| (*due).min(self.end))
            };
            let timeout = wake
                .saturating_duration_since(Instant::now())
                .min(PUBLISH_EVERY);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.note_error(format!("poll failed: {e}"));
                break;
            }
            for event in events.iter() {
                let key = event.token().0;
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.read(key);
                }
                if event.is_writable() {
                    self.write_out(key);
                }
            }
        }
        // Whatever is still owed was never answered.
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.give_up(key);
        }
        self.publish();
        self.result
    }

    /// Requests sent and not yet answered on open connections.
    fn outstanding(&self) -> usize {
        self.conns
            .iter()
            .filter(|(_, c)| c.state == ConnState::Open)
            .map(|(_, c)| c.fifo.len())
            .sum()
    }

    /// The load phase is over: nothing more is sent. Frames that were due
    /// but still waiting for window room are counted as unsent.
    fn stop_sending(&mut self) {
        self.stopped = true;
        self.due.clear();
        for (_, conn) in self.conns.iter_mut() {
            if let Role::Load(Some(s)) = conn.role {
                self.result.counts.frames_unsent += s.frames().saturating_sub(conn.next);
                conn.next = s.frames();
            }
        }
    }

    /// Sends every frame of `key` due by `now` that its window allows, then
    /// queues its next due time (or marks it blocked).
    fn send_due(&mut self, key: usize, now: Instant, late: bool) {
        let window = self.setup.window;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.state != ConnState::Open {
            return;
        }
        let (schedule, kind) = match conn.role {
            Role::Load(Some(s)) => (s, Kind::Logs),
            Role::Ping(s) => (s, Kind::Ping),
            Role::Query(s) => (s, Kind::Query),
            Role::Load(None) | Role::Idle => return,
        };
        conn.blocked = false;
        let limit = conn.window(window);
        let mut sent_any = false;
        while conn.next < schedule.frames() {
            let due = self.start + schedule.due(conn.next);
            if due > now {
                self.due.push(Reverse((due, key)));
                break;
            }
            if conn.fifo.len() >= limit {
                conn.blocked = true;
                break;
            }
            let msg = match kind {
                Kind::Logs => &mut self.template,
                Kind::Ping => &mut self.ping,
                Kind::Query => &mut self.query,
            };
            let entries = if kind == Kind::Logs {
                self.setup.batch
            } else {
                0
            };
            stamp_and_queue(conn, msg, kind, entries, due, now);
            self.result.counts.late_sends += u64::from(late);
            count_sent(
                &mut self.result.counts,
                &self.shared.progress,
                kind,
                entries,
            );
            conn.next += 1;
            sent_any = true;
        }
        if sent_any {
            self.write_out(key);
        }
    }

    /// Closed loop: fills the window of `key` with frames due right now.
    fn fill(&mut self, key: usize, now: Instant) {
        if self.stopped || now >= self.end {
            return;
        }
        let window = self.setup.window;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.state != ConnState::Open {
            return;
        }
        let mut sent_any = false;
        while conn.fifo.len() < window {
            let entries = self.setup.batch;
            stamp_and_queue(conn, &mut self.template, Kind::Logs, entries, now, now);
            count_sent(
                &mut self.result.counts,
                &self.shared.progress,
                Kind::Logs,
                entries,
            );
            sent_any = true;
        }
        if sent_any {
            self.write_out(key);
        }
    }

    /// Writes what `key` has buffered until the socket would block.
    fn write_out(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.state != ConnState::Open {
            return;
        }
        let mut failed = None;
        while conn.wpos < conn.wbuf.len() {
            match conn.stream.write(&conn.wbuf[conn.wpos..]) {
                Ok(0) => {
                    failed = Some("the connection accepts no more bytes".to_owned());
                    break;
                }
                Ok(n) => conn.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(format!("write failed: {e}"));
                    break;
                }
            }
        }
        if conn.wpos == conn.wbuf.len() {
            conn.wbuf.clear();
            conn.wpos = 0;
        }
        if let Some(why) = failed {
            self.lose(key, why);
        }
    }

    /// Reads `key` until it would block and handles every whole answer.
    fn read(&mut self, key: usize) {
        let mut closed = None;
        {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if conn.state != ConnState::Open {
                return;
            }
            loop {
                match conn.stream.read(&mut self.scratch) {
                    Ok(0) => {
                        closed = Some("the daemon closed the connection".to_owned());
                        break;
                    }
                    Ok(n) => conn.rbuf.extend_from_slice(&self.scratch[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        closed = Some(format!("read failed: {e}"));
                        break;
                    }
                }
            }
        }
        let now = Instant::now();
        let mut answered = false;
        loop {
            let conn = &mut self.conns[key];
            let avail = &conn.rbuf[conn.rstart..];
            let body_len = match frame_body_len(avail) {
                Ok(Some(n)) if avail.len() >= 4 + n => n,
                Ok(_) => break,
                Err(e) => {
                    self.result.counts.protocol_errors += 1;
                    closed = Some(format!("bad frame from the daemon: {e}"));
                    break;
                }
            };
            let body = &avail[4..4 + body_len];
            let decoded = decode_message(body);
            conn.rstart += 4 + body_len;
            match decoded {
                Ok(msg) => {
                    let matched = match_answer(&mut conn.fifo, &msg);
                    self.record(matched, now);
                    answered = true;
                }
                Err(e) => {
                    // The framing is intact; the request it answered is lost.
                    let lost = conn.fifo.pop_front();
                    self.result.counts.protocol_errors += 1;
                    self.note_error(format!("undecodable answer: {e}"));
                    if let Some(p) = lost {
                        self.finish(p.entries);
                    }
                }
            }
        }
        let conn = &mut self.conns[key];
        if conn.rstart == conn.rbuf.len() {
            conn.rbuf.clear();
            conn.rstart = 0;
        } else if conn.rstart >= READ_CHUNK {
            conn.rbuf.drain(..conn.rstart);
            conn.rstart = 0;
        }
        if let Some(why) = closed {
            self.lose(key, why);
            return;
        }
        if answered {
            match self.conns[key].role {
                Role::Load(None) => self.fill(key, now),
                _ if self.conns[key].blocked => self.send_due(key, now, true),
                _ => {}
            }
        }
    }

    /// Accounts for one matched answer received at `now`.
    fn record(&mut self, matched: Matched, now: Instant) {
        let us = |from: Instant| now.saturating_duration_since(from).as_micros() as u64;
        let r = &mut self.result;
        let c = &mut r.counts;
        let (done, failure) = match matched {
            Matched::Accepted(p) => {
                c.frames_accepted += 1;
                c.entries_accepted += u64::from(p.entries);
                self.shared
                    .progress
                    .entries_acked
                    .fetch_add(u64::from(p.entries), Ordering::Relaxed);
                self.ack_interval.saturating_record(us(p.scheduled));
                r.service.saturating_record(us(p.sent));
                r.last_ack = Some(now);
                if r.accepted.len() < ACCEPTED_ID_CAP {
                    r.accepted.push((p.id, p.entries));
                } else {
                    r.accepted_truncated = true;
                }
                (true, None)
            }
            Matched::Answered(p) => {
                match p.kind {
                    Kind::Ping => {
                        c.pings_answered += 1;
                        r.ping.saturating_record(us(p.scheduled));
                    }
                    Kind::Query => {
                        c.queries_answered += 1;
                        r.query.saturating_record(us(p.scheduled));
                    }
                    Kind::Logs => {}
                }
                (true, None)
            }
            Matched::Queued(p) => {
                c.entries_queued += u64::from(p.entries);
                (
                    true,
                    Some("Queued: acknowledged but not durable".to_owned()),
                )
            }
            Matched::Rejected(p, why) => {
                c.frames_rejected += 1;
                c.entries_rejected += u64::from(p.entries);
                (true, Some(format!("Rejected: {why}")))
            }
            Matched::Error(p, why) => {
                c.errors += 1;
                c.entries_errored += u64::from(p.entries);
                (true, Some(format!("Error {why}")))
            }
            Matched::Protocol(_, why) => {
                c.protocol_errors += 1;
                (true, Some(format!("protocol: {why}")))
            }
            Matched::Unsolicited(what) => {
                c.unsolicited += 1;
                (false, Some(format!("unsolicited answer: {what}")))
            }
        };
        let progress = &self.shared.progress;
        if done {
            progress.frames_done.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(message) = failure {
            progress.failures.fetch_add(1, Ordering::Relaxed);
            self.note_error(message);
        }
    }

    /// A request that will never be answered.
    fn finish(&mut self, entries: u32) {
        self.result.counts.frames_unanswered += 1;
        self.result.counts.entries_unanswered += u64::from(entries);
        self.shared
            .progress
            .frames_done
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The connection broke during the run: count it and its unanswered
    /// requests, and stop using it.
    fn lose(&mut self, key: usize, why: String) {
        if self.conns[key].state == ConnState::Closed {
            return;
        }
        self.result.counts.connections_lost += 1;
        self.note_error(format!("connection lost: {why}"));
        self.give_up(key);
    }

    /// Closes `key`; its outstanding requests count as unanswered.
    fn give_up(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.state == ConnState::Closed {
            return;
        }
        conn.state = ConnState::Closed;
        let _ = self.poll.registry().deregister(conn.stream.source());
        let owed: Vec<u32> = conn.fifo.drain(..).map(|p| p.entries).collect();
        if let Role::Load(Some(s)) = conn.role {
            if !self.stopped {
                self.result.counts.frames_unsent += s.frames().saturating_sub(conn.next);
                conn.next = s.frames();
            }
        }
        for entries in owed {
            self.finish(entries);
        }
    }

    fn note_error(&mut self, message: String) {
        if self.result.errors.len() < KEPT_ERRORS {
            self.result.errors.push(message);
        }
    }

    /// Moves this thread's recent ack latencies into the shared histogram.
    fn publish(&mut self) {
        if self.ack_interval.is_empty() {
            return;
        }
        let mut shared = self.shared.ack.lock();
        // Same bounds on both sides, so adding cannot fail.
        let _ = shared.add(&self.ack_interval);
        drop(shared);
        self.ack_interval.reset();
    }
}

/// Gives `msg` a fresh id, appends it to `conn`'s output and remembers it.
fn stamp_and_queue(
    conn: &mut Conn,
    msg: &mut Message,
    kind: Kind,
    entries: u32,
    scheduled: Instant,
    now: Instant,
) {
    if kind == Kind::Logs {
        set_session(msg, &conn.session);
    }
    let id = restamp(msg);
    // The templates were test-encoded before the run, so this cannot fail.
    encode_message(msg, &mut conn.wbuf).expect("template encodes");
    conn.fifo.push_back(Pending {
        id,
        scheduled,
        sent: now,
        entries,
        kind,
    });
}

fn count_sent(c: &mut Counts, progress: &Progress, kind: Kind, entries: u32) {
    match kind {
        Kind::Logs => {
            c.frames_sent += 1;
            c.entries_sent += u64::from(entries);
            progress
                .entries_sent
                .fetch_add(u64::from(entries), Ordering::Relaxed);
        }
        Kind::Ping => c.pings_sent += 1,
        Kind::Query => c.queries_sent += 1,
    }
    progress.frames_sent.fetch_add(1, Ordering::Relaxed);
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
