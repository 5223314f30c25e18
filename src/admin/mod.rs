//! The admin endpoint (`codi-admin` thread): `GET /metrics` and
//! `GET /health` over HTTP on its own small mio loop, apart from the event
//! loops that serve clients, so a hostile or slow scraper cannot touch
//! ingestion. Everything it does is bounded: at most
//! [`MAX_CONNECTIONS`] connections (more are closed at once), request heads
//! of at most [`http::MAX_HEAD`] bytes, one request per connection, and a
//! deadline for reading the request and another for writing the answer.
//! It runs at a low priority (nice [`ADMIN_NICE`]), so a client asking in
//! a tight loop gets only the CPU that ingestion leaves over.

pub mod exposition;
pub mod http;
pub mod procfs;

use crate::health::report::{self, Sources};
use crate::metrics::Metrics;
use http::{Parsed, Request, Response};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use prometheus_client::registry::Registry;
use slab::Slab;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Connections served at once; more are accepted and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection must send its whole request head within this long.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// ... and take its whole answer within this long after that.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// After the answer is sent, what the client still sends is read and
/// dropped for at most this long before the connection closes (closing
/// with unread input would reset it, and the client could lose the answer).
pub const LINGER: Duration = Duration::from_secs(2);
/// Nice value of the admin thread (below the writer's).
pub const ADMIN_NICE: i32 = 15;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKE: Token = Token(usize::MAX - 2);

/// Binds the admin listener (before the daemon says READY, so a scraper
/// may connect as soon as it does).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// The running admin endpoint.
pub struct AdminHandle {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl AdminHandle {
    /// Stops the endpoint and waits for its thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if self.thread.join().is_err() {
            log::error!("the admin endpoint panicked");
        }
    }
}

/// Starts serving on `listener`.
pub fn spawn(listener: TcpListener, sources: Arc<Sources>) -> io::Result<AdminHandle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
    let stop = Arc::new(AtomicBool::new(false));
    let mut server = Server {
        poll,
        listener,
        conns: Slab::with_capacity(MAX_CONNECTIONS),
        registry: exposition::registry(Arc::clone(&sources)),
        sources,
    };
    server
        .poll
        .registry()
        .register(&mut server.listener, LISTENER, Interest::READABLE)?;
    let thread = {
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("codi-admin".into())
            .spawn(move || {
                crate::sched::lower_current_thread_priority(ADMIN_NICE);
                server.run(&stop);
            })?
    };
    Ok(AdminHandle {
        waker,
        stop,
        thread,
    })
}

/// Where one connection is.
enum Phase {
    /// Receiving the request head.
    Reading(Vec<u8>),
    /// Sending the answer (bytes, how many are sent).
    Writing(Vec<u8>, usize),
    /// Answer sent and our side shut down: dropping what still comes.
    Draining,
}

struct Conn {
    stream: TcpStream,
    phase: Phase,
    deadline: Instant,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    registry: Registry,
    sources: Arc<Sources>,
}

/// What servicing a connection left to do.
enum Next {
    /// Wait for the next readiness event.
    Wait,
    /// Close it.
    Close,
}

impl Server {
    fn metrics(&self) -> &Metrics {
        &self.sources.metrics
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut events = Events::with_capacity(64);
        while !stop.load(Ordering::Acquire) {
            let timeout = self
                .conns
                .iter()
                .map(|(_, c)| c.deadline)
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("admin endpoint: poll failed: {e}");
                    thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    WAKE => {}
                    LISTENER => self.accept(),
                    Token(key) => self.service(key),
                }
            }
            self.expire(Instant::now());
        }
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, most likely: the connection stays
                    // in the backlog until one is free.
                    log::warn!("admin endpoint: accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                Metrics::add(&self.metrics().admin_dropped, 1);
                continue;
            }
            let key = self.conns.vacant_key();
            if self
                .poll
                .registry()
                .register(
                    &mut stream,
                    Token(key),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                continue;
            }
            self.conns.insert(Conn {
                stream,
                phase: Phase::Reading(Vec::with_capacity(1024)),
                deadline: Instant::now() + READ_DEADLINE,
            });
            // Edge-triggered: bytes may already be waiting.
            self.service(key);
        }
    }

    fn service(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let next = match &mut conn.phase {
            Phase::Reading(buf) => match read_head(&mut conn.stream, buf) {
                Ok(Some(parsed)) => {
                    let answer = self.answer(parsed);
                    let conn = &mut self.conns[key];
                    conn.phase = Phase::Writing(answer, 0);
                    conn.deadline = Instant::now() + WRITE_DEADLINE;
                    write_out(conn)
                }
                Ok(None) => Next::Wait,
                Err(_) => Next::Close,
            },
            Phase::Writing(..) => write_out(conn),
            Phase::Draining => drain(&mut conn.stream),
        };
        if let Next::Close = next {
            self.close(key);
        }
    }

    /// The bytes answering what the client sent.
    fn answer(&self, parsed: Parsed) -> Vec<u8> {
        let m = self.metrics();
        match parsed {
            Parsed::Request(req) => match self.route(&req) {
                Some(response) => {
                    Metrics::add(&m.admin_requests, 1);
                    response.to_bytes(req.head_only)
                }
                None => {
                    Metrics::add(&m.admin_bad_requests, 1);
                    Response::error(404, "not found: the endpoint serves /metrics and /health")
                        .to_bytes(req.head_only)
                }
            },
            Parsed::Refuse(response) => {
                Metrics::add(&m.admin_bad_requests, 1);
                response.to_bytes(false)
            }
            Parsed::Partial => Response::error(400, "incomplete request").to_bytes(false),
        }
    }

    fn route(&self, req: &Request) -> Option<Response> {
        match req.path.as_str() {
            "/metrics" => Some(Response::new(
                200,
                exposition::CONTENT_TYPE,
                exposition::render(&self.registry).into_bytes(),
            )),
            "/health" => {
                let health = report::evaluate(&self.sources);
                let status = if health.unhealthy() { 503 } else { 200 };
                let mut body = health.to_json_line().into_bytes();
                body.push(b'\n');
                Some(Response::new(status, "application/json", body))
            }
            _ => None,
        }
    }

    /// Closes every connection past its deadline.
    fn expire(&mut self, now: Instant) {
        let late: Vec<(usize, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(k, c)| (k, !matches!(c.phase, Phase::Draining)))
            .collect();
        for (key, unanswered) in late {
            if unanswered {
                Metrics::add(&self.metrics().admin_dropped, 1);
            }
            self.close(key);
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
        }
    }
}

/// Reads what the socket has into `buf` (never past [`http::MAX_HEAD`])
/// and parses it: `Some` once there is something to answer, `None` to
/// wait for more, `Err` when the client is gone.
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Parsed>> {
    let mut chunk = [0u8; 2048];
    loop {
        let room = http::MAX_HEAD - buf.len();
        if room == 0 {
            return Ok(Some(http::parse(buf)));
        }
        let want = room.min(chunk.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) => {
                return match http::parse(buf) {
                    Parsed::Partial => Err(io::ErrorKind::UnexpectedEof.into()),
                    parsed => Ok(Some(parsed)),
                }
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                match http::parse(buf) {
                    Parsed::Partial => {}
                    parsed => return Ok(Some(parsed)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes as much of the answer as the socket takes; closes once all of it
/// is sent.
fn write_out(conn: &mut Conn) -> Next {
    let Phase::Writing(bytes, sent) = &mut conn.phase else {
        return Next::Wait;
    };
    while *sent < bytes.len() {
        match conn.stream.write(&bytes[*sent..]) {
            Ok(0) => return Next::Close,
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
    // The client may still be sending (a body never read): a plain close
    // could reset the connection before it reads the answer, so only our
    // side is shut down, and the rest is read and dropped until the client
    // closes or the linger time is up.
    if conn.stream.shutdown(std::net::Shutdown::Write).is_err() {
        return Next::Close;
    }
    conn.phase = Phase::Draining;
    conn.deadline = Instant::now() + LINGER;
    drain(&mut conn.stream)
}

/// Reads and drops input; closes at its end.
fn drain(stream: &mut TcpStream) -> Next {
    let mut scratch = [0u8; 4096];
    // Bounded per turn, like everything here.
    for _ in 0..16 {
        match stream.read(&mut scratch) {
            Ok(0) => return Next::Close,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
    Next::Wait
}
