//! One mio event loop per core. Loop 0 also accepts and deals connections
//! out round-robin; every loop reads, decodes and dispatches its own
//! connections' frames and writes their answers back in request order.
//!
//! Readiness is edge-triggered: a connection is read until `WouldBlock`, or
//! until its per-turn budget is spent, in which case it stays on the run list
//! and the next `poll` does not sleep. Paused connections (backlog, global
//! pressure, rate limit) are resumed from here, never by growing a buffer.

use super::buffer::INITIAL_CAPACITY;
use super::conn::{ConnState, Connection, Pause};
use super::listener::{Stream, Transport, UnixEndpoint};
use super::request::{Handled, Origin, Services};
use crate::budget::InflightBudget;
use crate::heartbeat::Pulse;
use crate::metrics::Metrics;
use crate::proto::{
    decode_message, encode_message, frame_body_len, ErrorCode, FrameError, Message, HEADER_LEN,
};
use crate::reply::Completion;
use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The token of each loop's waker.
pub const WAKER: Token = Token(usize::MAX);
const UNIX_LISTENER: Token = Token(usize::MAX - 1);
const TCP_LISTENER: Token = Token(usize::MAX - 2);

/// Bytes read from one connection per turn before others get theirs.
const READ_BUDGET: usize = 256 * 1024;
/// How much free space to offer a read when no frame size is known yet.
const READ_CHUNK: usize = 16 * 1024;
/// How often paused-on-global-pressure connections retry.
const GLOBAL_RETRY: Duration = Duration::from_millis(1);
/// How long a closing connection keeps discarding the client's input after
/// its last answer (see `ConnState::Lingering`).
const LINGER: Duration = Duration::from_secs(1);
/// After shutdown begins, connections get this long to be answered.
pub const DRAIN_DEADLINE: Duration = Duration::from_millis(3500);
/// Largest frame body accepted before a TCP connection has authenticated:
/// `Authenticate` is tiny, so nobody unauthenticated makes the daemon
/// buffer a megabyte.
pub const MAX_UNAUTHENTICATED_FRAME_LEN: usize = 16 * 1024;
/// Read-buffer bytes per connection that are not charged to the global
/// receive pool: the initial buffer plus one read's worth.
pub const FREE_RECEIVE_BYTES: usize = INITIAL_CAPACITY + READ_CHUNK;
/// How often a loop looks for connections past their deadlines.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long accepting pauses after an error other than running out of
/// descriptors (which is answered at once with the spare descriptor).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Limits that apply to every connection of a loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopLimits {
    /// Answers one connection may owe before it stops being read.
    pub max_pending_per_connection: usize,
    /// Connections the whole daemon holds at once.
    pub max_connections: usize,
    /// Connections TCP may hold (the rest are kept for the Unix socket).
    pub max_tcp_connections: usize,
    /// TCP connections this loop lets wait for `Authenticate` at once; a
    /// newcomer beyond it evicts the oldest.
    pub unauthenticated_per_loop: usize,
    /// How long a TCP connection has to authenticate.
    pub auth_timeout: Duration,
    /// How long a connection that owes nothing may go without a request.
    pub idle_timeout: Duration,
    /// How long a connection's answers may wait unread before it is closed.
    pub write_timeout: Duration,
}

/// Where loop 0 sends a connection it accepted for another loop.
pub struct Peer {
    /// The other loop's queue of new connections.
    pub tx: Sender<Stream>,
    /// The other loop's waker.
    pub waker: Arc<Waker>,
}

/// The listeners and the round-robin table; owned by loop 0.
pub struct Acceptor {
    /// The Unix socket, removed from disk when dropped.
    pub unix: Option<UnixEndpoint>,
    /// The TCP listener.
    pub tcp: Option<TcpListener>,
    /// Every loop (index = worker id); loop 0's own entry is not used.
    pub peers: Vec<Peer>,
    next: usize,
    /// A descriptor kept open to be closed when `accept` runs out of
    /// them, so the waiting client can be told why instead of hanging.
    spare_fd: Option<File>,
}

impl Acceptor {
    /// An acceptor over the given listeners, dealing to `peers`.
    pub fn new(unix: Option<UnixEndpoint>, tcp: Option<TcpListener>, peers: Vec<Peer>) -> Self {
        Acceptor {
            unix,
            tcp,
            peers,
            next: 0,
            spare_fd: File::open("/dev/null").ok(),
        }
    }
}

/// One event loop and everything it owns.
pub struct EventLoop {
    id: usize,
    poll: Poll,
    conns: Slab<Connection>,
    next_serial: u64,
    completions: Receiver<Completion>,
    incoming: Receiver<Stream>,
    acceptor: Option<Acceptor>,
    services: Arc<Services>,
    limits: LoopLimits,
    shutdown: Arc<AtomicBool>,
    run_list: Vec<usize>,
    paused_global: Vec<usize>,
    timers: Vec<(Instant, usize)>,
    draining_since: Option<Instant>,
    accept_retry_at: Option<Instant>,
    /// TCP connections waiting to authenticate, oldest first (serial,
    /// key); entries that authenticated or closed are pruned lazily.
    awaiting_auth: VecDeque<(u64, usize)>,
    next_sweep: Instant,
    /// Beats each time the loop comes round (for the systemd watchdog).
    pulse: Pulse,
    /// The longest a poll may sleep while the watchdog watches.
    tick: Option<Duration>,
}

impl EventLoop {
    /// Builds loop `id` around its `poll` (whose waker is registered as
    /// [`WAKER`]); pass the acceptor to loop 0 only.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: usize,
        poll: Poll,
        completions: Receiver<Completion>,
        incoming: Receiver<Stream>,
        acceptor: Option<Acceptor>,
        services: Arc<Services>,
        limits: LoopLimits,
        shutdown: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        let mut this = EventLoop {
            id,
            poll,
            conns: Slab::with_capacity(1024),
            next_serial: 0,
            completions,
            incoming,
            acceptor,
            limits,
            shutdown,
            run_list: Vec::new(),
            paused_global: Vec::new(),
            timers: Vec::new(),
            draining_since: None,
            accept_retry_at: None,
            awaiting_auth: VecDeque::new(),
            next_sweep: Instant::now() + SWEEP_INTERVAL,
            pulse: services
                .metrics
                .heartbeats
                .register(format!("event loop {id}"), "has not come round"),
            tick: services.metrics.heartbeats.tick(),
            services,
        };
        if let Some(acc) = this.acceptor.as_mut() {
            let registry = this.poll.registry();
            if let Some(unix) = acc.unix.as_mut() {
                registry.register(&mut unix.listener, UNIX_LISTENER, Interest::READABLE)?;
            }
            if let Some(tcp) = acc.tcp.as_mut() {
                registry.register(tcp, TCP_LISTENER, Interest::READABLE)?;
            }
        }
        Ok(this)
    }

    /// Runs until shutdown has drained every connection (or the drain
    /// deadline passed).
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("loop {}: poll failed: {e}", self.id);
                }
                continue;
            }
            let mut accept_ready = false;
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    UNIX_LISTENER | TCP_LISTENER => accept_ready = true,
                    Token(key) => {
                        if let Some(conn) = self.conns.get_mut(key) {
                            if event.is_readable() || event.is_read_closed() || event.is_error() {
                                conn.readable = true;
                            }
                            if event.is_read_closed() || event.is_error() {
                                conn.read_closed = true;
                            }
                            if event.is_write_closed() || event.is_error() {
                                conn.gone = true;
                            }
                            schedule(&mut self.run_list, conn, key);
                        }
                    }
                }
            }
            self.take_new_connections();
            self.take_completions();
            let now = Instant::now();
            self.pulse.beat_at(now);
            let retry_due = self.accept_retry_at.is_some_and(|at| at <= now);
            if !self.shutdown.load(Ordering::Acquire) && (accept_ready || retry_due) {
                self.accept();
            }
            if now >= self.next_sweep {
                self.sweep(now);
                self.next_sweep = now + SWEEP_INTERVAL;
            }
            if self.shutdown.load(Ordering::Acquire) && self.draining_since.is_none() {
                self.begin_drain();
            }
            self.resume_paused();
            let run = std::mem::take(&mut self.run_list);
            for key in run {
                self.service(key);
            }
            if let Some(since) = self.draining_since {
                if self.conns.is_empty() {
                    break;
                }
                if since.elapsed() >= DRAIN_DEADLINE {
                    log::warn!(
                        "loop {}: closing {} connections still owed answers at the drain deadline",
                        self.id,
                        self.conns.len()
                    );
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        self.close(key);
                    }
                    break;
                }
            }
        }
        log::debug!("loop {} stopped", self.id);
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.run_list.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut timeout: Option<Duration> = None;
        let mut tighten = |d: Duration| timeout = Some(timeout.map_or(d, |t| t.min(d)));
        if let Some(tick) = self.tick {
            tighten(tick);
        }
        if !self.paused_global.is_empty() {
            tighten(GLOBAL_RETRY);
        }
        let now = Instant::now();
        if let Some(at) = self.accept_retry_at {
            tighten(at.saturating_duration_since(now));
        }
        if !self.conns.is_empty() {
            tighten(self.next_sweep.saturating_duration_since(now));
        }
        for (until, _) in &self.timers {
            tighten(until.saturating_duration_since(now));
        }
        if self.draining_since.is_some() {
            tighten(Duration::from_millis(50));
        }
        timeout
    }

    fn take_new_connections(&mut self) {
        while let Ok(stream) = self.incoming.try_recv() {
            self.add_connection(stream);
        }
    }

    fn add_connection(&mut self, mut stream: Stream) {
        if self.draining_since.is_some() {
            self.services
                .metrics
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let needs_auth =
            stream.transport() == Transport::Tcp && self.services.live.token_required();
        let (_, burst) = self.services.live.rate();
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            stream.source(),
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("loop {}: cannot register a connection: {e}", self.id);
            self.services
                .metrics
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.next_serial += 1;
        let serial = self.next_serial;
        let peer = stream.peer_cred();
        let peer_ip = stream.peer_ip();
        let conn = entry.insert(Connection::new(serial, stream, needs_auth, burst));
        conn.peer = peer;
        conn.peer_ip = peer_ip;
        schedule(&mut self.run_list, conn, key);
        if needs_auth {
            self.make_room_to_authenticate();
            self.awaiting_auth.push_back((serial, key));
        }
    }

    /// Keeps at most `unauthenticated_per_loop - 1` connections waiting to
    /// authenticate, so a newcomer fits: the oldest waiting one is told
    /// why and closed. A flood of connections that never authenticate thus
    /// holds a fixed number of slots, whatever its size.
    fn make_room_to_authenticate(&mut self) {
        let conns = &self.conns;
        self.awaiting_auth.retain(|&(serial, key)| {
            conns
                .get(key)
                .is_some_and(|c| c.serial == serial && c.state == ConnState::AwaitingAuth)
        });
        while self.awaiting_auth.len() >= self.limits.unauthenticated_per_loop {
            let Some((_, key)) = self.awaiting_auth.pop_front() else {
                break;
            };
            Metrics::add(&self.services.metrics.unauthenticated_evicted, 1);
            let conn = &mut self.conns[key];
            close_with(
                conn,
                ErrorCode::Unauthorized,
                "too many connections are waiting to authenticate; the oldest is closed".into(),
            );
            conn.skip_linger = true;
            schedule(&mut self.run_list, conn, key);
        }
    }

    /// Closes connections past their deadlines: TCP connections that did
    /// not authenticate in time, connections idle for too long, and
    /// connections whose answers wait unread for too long (at once: nothing
    /// more can be written to them, and their answers hold memory).
    fn sweep(&mut self, now: Instant) {
        let limits = self.limits;
        let metrics = &self.services.metrics;
        let mut stalled = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            if conn
                .output_waiting_since
                .is_some_and(|since| now.saturating_duration_since(since) >= limits.write_timeout)
            {
                stalled.push((key, conn.pending_output(), conn.describe_peer()));
                continue;
            }
            let expired = match conn.state {
                ConnState::AwaitingAuth
                    if now.saturating_duration_since(conn.accepted_at) >= limits.auth_timeout =>
                {
                    Metrics::add(&metrics.auth_timeouts, 1);
                    Some((
                        ErrorCode::Unauthorized,
                        format!(
                            "no Authenticate within {}; closing",
                            humantime::format_duration(limits.auth_timeout)
                        ),
                    ))
                }
                ConnState::Open
                    if conn.pause == Pause::None
                        && conn.owes_nothing()
                        && now.saturating_duration_since(conn.last_frame_at)
                            >= limits.idle_timeout =>
                {
                    Metrics::add(&metrics.idle_closed, 1);
                    Some((
                        ErrorCode::Unavailable,
                        format!(
                            "closing a connection idle for {}",
                            humantime::format_duration(limits.idle_timeout)
                        ),
                    ))
                }
                _ => None,
            };
            if let Some((code, reason)) = expired {
                conn.skip_linger = conn.state == ConnState::AwaitingAuth;
                close_with(conn, code, reason);
                schedule(&mut self.run_list, conn, key);
            }
        }
        for (key, unsent, peer) in stalled {
            Metrics::add(&self.services.metrics.write_timeouts, 1);
            log::warn!(
                "closing a connection ({peer}) that left {unsent} bytes of answers unread for {}",
                humantime::format_duration(limits.write_timeout)
            );
            self.close(key);
        }
    }

    fn take_completions(&mut self) {
        while let Ok(Completion { to, answer }) = self.completions.try_recv() {
            let Some(conn) = self.conns.get_mut(to.token) else {
                continue;
            };
            if conn.serial != to.serial {
                continue;
            }
            if to.query {
                conn.queries_in_flight = conn.queries_in_flight.saturating_sub(1);
            }
            if conn.answers.fill(to.seq, answer) {
                schedule(&mut self.run_list, conn, to.token);
            }
        }
    }

    fn accept(&mut self) {
        let Some(acc) = self.acceptor.as_mut() else {
            return;
        };
        self.accept_retry_at = None;
        let metrics = Arc::clone(&self.services.metrics);
        let mut accepted = Vec::new();
        for transport in [Transport::Unix, Transport::Tcp] {
            loop {
                let result = match transport {
                    Transport::Unix => match acc.unix.as_ref() {
                        Some(u) => u.listener.accept().map(|(s, _)| Stream::Unix(s)),
                        None => break,
                    },
                    Transport::Tcp => match acc.tcp.as_ref() {
                        Some(t) => t.accept().map(|(s, _)| {
                            let _ = s.set_nodelay(true);
                            Stream::Tcp(s)
                        }),
                        None => break,
                    },
                };
                match result {
                    Ok(stream) => accepted.push(stream),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e)
                        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                            && acc.spare_fd.is_some() =>
                    {
                        // Free the spare descriptor, take the waiting
                        // client, tell it why and close it: it neither
                        // hangs in the backlog nor makes us spin here.
                        acc.spare_fd = None;
                        let refused = match transport {
                            Transport::Unix => acc
                                .unix
                                .as_ref()
                                .map(|u| u.listener.accept().map(|(s, _)| Stream::Unix(s))),
                            Transport::Tcp => acc
                                .tcp
                                .as_ref()
                                .map(|t| t.accept().map(|(s, _)| Stream::Tcp(s))),
                        };
                        if let Some(Ok(mut stream)) = refused {
                            Metrics::add(&metrics.connections_refused, 1);
                            refuse(
                                &mut stream,
                                &metrics,
                                "the daemon is out of file descriptors (raise LimitNOFILE or lower max_connections); retry later",
                            );
                        }
                        log::warn!(
                            "accept failed: {e}: refusing new clients until descriptors are free"
                        );
                        acc.spare_fd = File::open("/dev/null").ok();
                    }
                    Err(e) => {
                        // The pending connections stay in the backlog.
                        log::warn!("accept failed: {e}; retrying in {ACCEPT_BACKOFF:?}");
                        self.accept_retry_at = Some(Instant::now() + ACCEPT_BACKOFF);
                        break;
                    }
                }
            }
        }
        for mut stream in accepted {
            let open = metrics.connections_open.fetch_add(1, Ordering::Relaxed);
            let limit = match stream.transport() {
                Transport::Unix => self.limits.max_connections,
                Transport::Tcp => self.limits.max_tcp_connections,
            };
            if open as usize >= limit {
                metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
                Metrics::add(&metrics.connections_refused, 1);
                let reason = if limit < self.limits.max_connections {
                    format!("the {limit} connections TCP may use are taken (the rest are kept for the Unix socket); retry later")
                } else {
                    format!("connection limit of {limit} reached; retry later")
                };
                refuse(&mut stream, &metrics, &reason);
                continue;
            }
            Metrics::add(&metrics.connections_accepted, 1);
            let acc = self.acceptor.as_mut().expect("acceptor present");
            let target = acc.next % acc.peers.len();
            acc.next = acc.next.wrapping_add(1);
            if target == self.id {
                self.add_connection(stream);
            } else {
                let peer = &acc.peers[target];
                if peer.tx.send(stream).is_ok() {
                    let _ = peer.waker.wake();
                } else {
                    metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn begin_drain(&mut self) {
        self.draining_since = Some(Instant::now());
        if let Some(acc) = self.acceptor.take() {
            // Dropping the listeners stops accepting and removes the socket
            // file; the peers' queues are dropped with them.
            drop(acc);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            schedule(&mut self.run_list, conn, key);
        }
    }

    fn resume_paused(&mut self) {
        for key in std::mem::take(&mut self.paused_global) {
            if let Some(conn) = self.conns.get_mut(key) {
                schedule(&mut self.run_list, conn, key);
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < self.timers.len() {
            if self.timers[i].0 <= now {
                let (_, key) = self.timers.swap_remove(i);
                if let Some(conn) = self.conns.get_mut(key) {
                    schedule(&mut self.run_list, conn, key);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Reads, decodes, dispatches and writes for one connection.
    fn service(&mut self, key: usize) {
        let draining = self.draining_since.is_some();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.scheduled = false;
        if let ConnState::Lingering(until) = conn.state {
            match discard_input(conn) {
                Discarded::Closed => self.close(key),
                _ if Instant::now() >= until => self.close(key),
                Discarded::Budget => schedule(&mut self.run_list, conn, key),
                Discarded::Idle => {}
            }
            return;
        }
        if conn.pump_output(&self.services.metrics, self.id).is_err() {
            self.close(key);
            return;
        }

        let origin = Origin {
            worker: self.id,
            token: key,
        };
        // A connection still inside its rate-limit window only gets its
        // output flushed; it is already on the timer list. One whose
        // client has gone entirely is closed now rather than held (with its
        // buffers and a connection slot) until the window ends.
        let still_throttled =
            matches!(conn.pause, Pause::RateLimit(until) if until > Instant::now());
        if still_throttled && conn.gone {
            self.close(key);
            return;
        }
        if !still_throttled
            && read_and_dispatch(&self.services, conn, origin, self.limits, draining)
        {
            schedule(&mut self.run_list, conn, key);
        }

        // With nothing more to come, leftover bytes are a truncated frame.
        if (conn.peer_closed || draining) && conn.pause == Pause::None {
            conn.state = ConnState::Closing;
        }
        if conn.pump_output(&self.services.metrics, self.id).is_err() {
            self.close(key);
            return;
        }
        if conn.state == ConnState::Closing && conn.is_drained() {
            if conn.peer_closed
                || conn.gone
                || conn.skip_linger
                || conn.stream.shutdown_write().is_err()
            {
                self.close(key);
            } else {
                let until = Instant::now() + LINGER;
                conn.state = ConnState::Lingering(until);
                self.timers.push((until, key));
                schedule(&mut self.run_list, conn, key);
            }
            return;
        }
        // Answers owed only to immediate requests (pings, errors) were all
        // written above without the socket ever blocking: no completion and
        // no writable edge will come, so resume reading right here.
        if conn.pause == Pause::Backlog && !conn.backlogged(self.limits.max_pending_per_connection)
        {
            schedule(&mut self.run_list, conn, key);
        }
        if conn.answers.is_empty() && conn.input.shrink_if_idle() {
            self.services.receive.release(conn.receive_charged);
            conn.receive_charged = 0;
        }
        match conn.pause {
            Pause::Global => self.paused_global.push(key),
            Pause::RateLimit(until) if !still_throttled => self.timers.push((until, key)),
            Pause::RateLimit(_) | Pause::Backlog | Pause::None => {}
        }
        // Output the socket did not take goes out on its writable event.
    }

    fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            self.services.receive.release(conn.receive_charged);
            let _ = self.poll.registry().deregister(conn.stream.source());
            self.services
                .metrics
                .connections_open
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn schedule(run_list: &mut Vec<usize>, conn: &mut Connection, key: usize) {
    if !conn.scheduled {
        conn.scheduled = true;
        run_list.push(key);
    }
}

/// Alternates decoding buffered frames and reading the socket until the
/// connection pauses, closes, would block or has used its read budget for
/// this turn. Returns true when it stopped only because of the budget (more
/// may be waiting, so the caller reschedules it).
fn read_and_dispatch(
    services: &Services,
    conn: &mut Connection,
    origin: Origin,
    limits: LoopLimits,
    draining: bool,
) -> bool {
    let mut read_total = 0;
    loop {
        process_frames(services, conn, origin, limits);
        if conn.pause != Pause::None || conn.state == ConnState::Closing {
            return false;
        }
        if draining || conn.peer_closed || !conn.readable {
            return false;
        }
        if read_total >= READ_BUDGET {
            return true;
        }
        match read_once(conn, &services.receive) {
            Ok(None) => {
                // The global receive pool is spent: wait with the others.
                conn.pause = Pause::Global;
                Metrics::add(&services.metrics.receive_pauses, 1);
                return false;
            }
            Ok(Some((0, _))) => {
                conn.peer_closed = true;
                conn.readable = false;
            }
            Ok(Some((n, offered))) => {
                read_total += n;
                // A short read emptied the socket: bytes arriving later
                // raise a new edge, so the read that would only say
                // `WouldBlock` is skipped (one syscall per request at one
                // request in flight). Not once the peer has closed: the
                // end of the stream comes only from a read.
                if n < offered && !conn.read_closed {
                    conn.readable = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                conn.peer_closed = true;
                conn.readable = false;
            }
        }
    }
}

/// What reading a lingering connection found.
enum Discarded {
    /// The client closed (or the socket failed): close it now.
    Closed,
    /// Nothing more to read for now.
    Idle,
    /// This turn's read budget is spent and more may be waiting.
    Budget,
}

/// Reads and throws away what the client still sends to a lingering
/// connection, at most [`READ_BUDGET`] bytes per turn.
fn discard_input(conn: &mut Connection) -> Discarded {
    let mut scratch = [0u8; 16 * 1024];
    let mut total = 0;
    while total < READ_BUDGET {
        match conn.stream.read(&mut scratch) {
            Ok(0) => return Discarded::Closed,
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Discarded::Idle,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Discarded::Closed,
        }
    }
    Discarded::Budget
}

/// Reads once into the connection's buffer. The buffer grows towards the
/// frame being received only as fast as its bytes arrive (at most doubling
/// per read), and growth beyond [`FREE_RECEIVE_BYTES`] is charged to the
/// global receive pool first. Returns the bytes read and the room offered,
/// or `None` when the pool has no room (nothing was read).
fn read_once(
    conn: &mut Connection,
    receive: &InflightBudget,
) -> io::Result<Option<(usize, usize)>> {
    let want = match frame_body_len(conn.input.data()) {
        Ok(Some(body)) => HEADER_LEN + body,
        _ => conn.input.len() + READ_CHUNK,
    };
    let capacity = conn.input.capacity_for(want);
    let charge = capacity.saturating_sub(FREE_RECEIVE_BYTES);
    if charge > conn.receive_charged {
        if !receive.try_acquire(charge - conn.receive_charged) {
            return Ok(None);
        }
        conn.receive_charged = charge;
    }
    let spare = conn.input.spare_for(capacity);
    let offered = spare.len();
    let n = conn.stream.read(spare)?;
    conn.input.filled(n);
    Ok(Some((n, offered)))
}

/// Queues one last `Error` (after every answer owed) and stops reading:
/// the connection closes once it is written.
fn close_with(conn: &mut Connection, code: ErrorCode, reason: String) {
    conn.answers.arriving(None);
    conn.answers.push_ready(Message::error(code, reason));
    conn.state = ConnState::Closing;
    let all = conn.input.len();
    conn.input.consume(all);
}

/// Decodes and dispatches every complete frame in the buffer until the
/// connection must pause or close.
fn process_frames(services: &Services, conn: &mut Connection, origin: Origin, limits: LoopLimits) {
    conn.pause = Pause::None;
    loop {
        if conn.state == ConnState::Closing {
            return;
        }
        if conn.backlogged(limits.max_pending_per_connection) {
            conn.pause = Pause::Backlog;
            Metrics::add(&services.metrics.backpressure_pauses, 1);
            return;
        }
        let body_len = match frame_body_len(conn.input.data()) {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(e) => {
                Metrics::add(&services.metrics.frames_invalid, 1);
                let code = match e {
                    FrameError::Empty => ErrorCode::InvalidFrame,
                    FrameError::TooLarge(_) => ErrorCode::FrameTooLarge,
                };
                conn.answers.arriving(None);
                conn.answers.push_ready(Message::error(code, e.to_string()));
                conn.state = ConnState::Closing;
                let all = conn.input.len();
                conn.input.consume(all);
                return;
            }
        };
        if conn.state == ConnState::AwaitingAuth && body_len > MAX_UNAUTHENTICATED_FRAME_LEN {
            Metrics::add(&services.metrics.frames_invalid, 1);
            close_with(
                conn,
                ErrorCode::FrameTooLarge,
                format!(
                    "a frame of {body_len} bytes before Authenticate: at most {MAX_UNAUTHENTICATED_FRAME_LEN} bytes until the connection has authenticated"
                ),
            );
            return;
        }
        let frame_len = HEADER_LEN + body_len;
        if conn.input.len() < frame_len {
            return;
        }
        let now = Instant::now();
        conn.last_frame_at = now;
        conn.answers.arriving(Some(now));
        let message = decode_message(&conn.input.data()[HEADER_LEN..frame_len]);
        let msg = match message {
            Ok(msg) => msg,
            Err(e) => {
                Metrics::add(&services.metrics.frames_invalid, 1);
                conn.answers
                    .push_ready(Message::error(ErrorCode::InvalidMessage, e.to_string()));
                conn.input.consume(frame_len);
                continue;
            }
        };
        let (rate, burst) = services.live.rate();
        if let Err(until) = conn.rate.ready(rate, burst, now) {
            conn.pause = Pause::RateLimit(until);
            Metrics::add(&services.metrics.rate_limit_pauses, 1);
            return;
        }
        match services.handle(conn, origin, msg, frame_len) {
            Handled::Done(cost) => {
                conn.rate.charge(cost, rate);
                conn.input.consume(frame_len);
                Metrics::add(&services.metrics.frames_received, 1);
            }
            Handled::Blocked => {
                conn.pause = Pause::Global;
                Metrics::add(&services.metrics.backpressure_pauses, 1);
                return;
            }
        }
    }
}

/// Tells a client turned away at accept why.
fn refuse(stream: &mut Stream, metrics: &Metrics, reason: &str) {
    let mut frame = Vec::new();
    let msg = Message::error(ErrorCode::Unavailable, reason);
    metrics.error_sent(&ErrorCode::Unavailable);
    if encode_message(&msg, &mut frame).is_ok() {
        let _ = stream.write(&frame);
    }
}
