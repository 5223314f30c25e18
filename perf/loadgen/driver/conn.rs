//! One connection's state, and connecting: a thread's whole share of
//! connections is opened and registered before the common start.

use super::event_loop::READ_CHUNK;
use super::results::{new_hist, Counts, ThreadResult};
use super::{Driver, Plan, Setup, Shared};
use crate::args::Endpoint;
use crate::fifo::Pending;
use crate::payload::{client_session, query_template};
use crate::schedule::Schedule;
use codi_monitor::io::listener::Stream;
use codi_monitor::proto::{decode_message, encode_message, frame_body_len, Message, Payload};
use mio::{Interest, Poll, Token};
use slab::Slab;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Answers a ping connection may have outstanding.
const PING_WINDOW: usize = 1024;
/// How long connecting keeps retrying a refused or busy socket.
const CONNECT_PATIENCE: Duration = Duration::from_secs(5);

/// What a connection is for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Role {
    /// Sends logs on a schedule (`Some`) or as fast as its window allows.
    Load(Option<Schedule>),
    /// Sends pings on a schedule.
    Ping(Schedule),
    /// Sends queries on a schedule, one at a time.
    Query(Schedule),
    /// Connects and waits.
    Idle,
}

/// Whether a connection is still in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Connected and in use.
    Open,
    /// Lost or given up on; never used again.
    Closed,
}

/// One connection of a driver thread and what it has in flight.
pub(super) struct Conn {
    /// The socket.
    pub(super) stream: Stream,
    /// What the connection is for.
    pub(super) role: Role,
    /// The session of a load connection's logs (empty for other roles).
    pub(super) session: String,
    /// Open or closed.
    pub(super) state: ConnState,
    /// Bytes read and not yet handled, from `rstart`.
    pub(super) rbuf: Vec<u8>,
    /// Start of the unhandled bytes in `rbuf`.
    pub(super) rstart: usize,
    /// Encoded frames not yet written, from `wpos`.
    pub(super) wbuf: Vec<u8>,
    /// Start of the unwritten bytes in `wbuf`.
    pub(super) wpos: usize,
    /// Requests sent and not yet answered, oldest first.
    pub(super) fifo: VecDeque<Pending>,
    /// Index of the next scheduled frame.
    pub(super) next: u64,
    /// A due frame waits for window room.
    pub(super) blocked: bool,
}

impl Conn {
    /// Answers this connection may have outstanding.
    pub(super) fn window(&self, load_window: usize) -> usize {
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
}
