//! The blocking client used by `codi2`: finds the daemon, pipelines
//! requests, survives a dropped connection, and falls back to writing the
//! database directly when no daemon runs.
//!
//! Delivery: every request keeps its id until answered. When the connection
//! fails mid-request the client waits (exponential backoff), reconnects and
//! resends every unanswered request with the *same* id; the daemon stores
//! each id once, so nothing is lost or doubled. If no daemon accepts a
//! connection at all (socket missing, connection refused) the client goes
//! standalone at once, with the same ids.
//!
//! Trust: an endpoint whose owner is not this user, root or the configured
//! service user (see [`conn::Connection::connect`]) is skipped with one
//! notice, exactly as if nothing listened there; nothing is sent to it.

pub mod conn;
pub mod discover;
pub mod follow;
pub mod hub_query;
pub mod input;
pub mod output;
pub mod peer;
pub mod standalone;
pub mod stream;

use crate::fsperm::TrustedUsers;
use crate::proto::{AckStatus, Message, Payload};
use crate::store::StoreError;
use conn::{ConnError, Connection, Endpoint};
use standalone::{Access, Standalone};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};
use thiserror::Error;

/// First wait before reconnecting; doubled on each further try.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Reconnect attempts before giving up.
pub const MAX_TRIES: u32 = 3;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first wait.
    pub base: Duration,
    /// Attempts before giving up.
    pub tries: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: BACKOFF_BASE,
            tries: MAX_TRIES,
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt` (1-based): base, 2 base, 4 base ...
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(16);
        self.base.saturating_mul(1 << doublings)
    }
}

/// Why the client could not do what was asked.
#[derive(Debug, Error)]
pub enum ClientError {
    /// No daemon and no standalone fallback allowed.
    #[error("daemon not reachable ({tried})")]
    Unreachable {
        /// What was tried and why each failed.
        tried: String,
    },
    /// No daemon, and the database could not be used either.
    #[error("daemon not reachable ({tried}) and {db}: {source}", db = db.display())]
    Standalone {
        /// What was tried.
        tried: String,
        /// The database.
        db: PathBuf,
        /// Why it failed.
        source: Box<StoreError>,
    },
    /// Retries used up.
    #[error("gave up after {tries} reconnects: {last}")]
    GaveUp {
        /// Attempts made.
        tries: u32,
        /// The last failure.
        last: String,
    },
    /// The database failed in standalone mode.
    #[error("database error: {0}")]
    Store(Box<StoreError>),
    /// The daemon refused the token.
    #[error("authentication refused by {endpoint}: {reason}")]
    AuthRefused {
        /// The endpoint.
        endpoint: Endpoint,
        /// The daemon's reason.
        reason: String,
    },
    /// The request itself cannot be sent (larger than a frame).
    #[error("cannot send request: {0}")]
    Unsendable(String),
    /// The daemon said something that makes no sense here.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether a daemon held the database, so that nothing was written to
    /// it directly ([`StoreError::HeldByDaemon`]).
    pub fn is_held_by_daemon(&self) -> bool {
        match self {
            ClientError::Standalone { source, .. } | ClientError::Store(source) => {
                matches!(**source, StoreError::HeldByDaemon { .. })
            }
            _ => false,
        }
    }
}

impl From<StoreError> for ClientError {
    fn from(e: StoreError) -> Self {
        ClientError::Store(Box::new(e))
    }
}

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Where to look for the daemon, in order.
    pub endpoints: Vec<Endpoint>,
    /// Sent as `Authenticate` first on TCP connections, if set.
    pub token: Option<String>,
    /// Whose sockets to talk to: this user, root and the service user.
    pub trusted: TrustedUsers,
    /// Connect, read and write timeout.
    pub timeout: Duration,
    /// Reconnect policy.
    pub retry: RetryPolicy,
    /// Database for standalone mode; `None` forbids standalone mode.
    pub standalone_db: Option<PathBuf>,
    /// Called with a sentence when standalone mode is first used, and once
    /// for each endpoint skipped as untrusted.
    pub notice: fn(&str),
}

/// A request together with its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    /// What was sent.
    pub request: Message,
    /// What came back.
    pub answer: Message,
}

#[derive(Debug)]
enum Backend {
    Daemon(Connection),
    Standalone(Box<Standalone>),
}

/// A connection to the daemon, or to the database when there is none.
#[derive(Debug)]
pub struct Client {
    opts: ClientOptions,
    backend: Backend,
    /// Sent to the daemon, not yet answered, oldest first.
    outstanding: VecDeque<Message>,
    /// Answered locally (standalone), not yet collected.
    ready: VecDeque<Answered>,
    /// Reconnects since the last answer.
    failures: u32,
    noticed: bool,
    /// Endpoints already reported as untrusted.
    distrusted: Vec<Endpoint>,
}

/// Result of trying every endpoint once.
enum Attempt {
    Connected(Connection),
    /// Every endpoint is down (missing or refused).
    AllDown(String),
    /// Some endpoint failed otherwise (timeout, permission, ...).
    Failed(String),
}

impl Client {
    /// Connects to the first endpoint that accepts, retrying transient
    /// failures; goes standalone at once when every endpoint is down.
    pub fn connect(opts: ClientOptions) -> Result<Client, ClientError> {
        let mut attempt = 0;
        let mut distrusted = Vec::new();
        let tried = loop {
            match try_endpoints(&opts, &mut distrusted)? {
                Attempt::Connected(conn) => {
                    return Ok(Client::with(opts, Backend::Daemon(conn), distrusted))
                }
                Attempt::AllDown(tried) => break tried,
                Attempt::Failed(tried) => {
                    attempt += 1;
                    if attempt > opts.retry.tries {
                        if opts.standalone_db.is_some() {
                            break tried;
                        }
                        return Err(ClientError::GaveUp {
                            tries: opts.retry.tries,
                            last: tried,
                        });
                    }
                    thread::sleep(opts.retry.delay(attempt));
                }
            }
        };
        let backend = fall_back(&opts, &mut distrusted, tried)?;
        Ok(Client::with(opts, backend, distrusted))
    }

    fn with(opts: ClientOptions, backend: Backend, distrusted: Vec<Endpoint>) -> Client {
        Client {
            opts,
            backend,
            outstanding: VecDeque::new(),
            ready: VecDeque::new(),
            failures: 0,
            noticed: false,
            distrusted,
        }
    }

    /// The daemon endpoint in use, or `None` in standalone mode.
    pub fn endpoint(&self) -> Option<&Endpoint> {
        match &self.backend {
            Backend::Daemon(c) => Some(c.endpoint()),
            Backend::Standalone(_) => None,
        }
    }

    /// The database in use, in standalone mode.
    pub fn standalone_db(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Daemon(_) => None,
            Backend::Standalone(s) => Some(s.db()),
        }
    }

    /// Requests sent and not yet collected with [`Client::recv`].
    pub fn pending(&self) -> usize {
        self.outstanding.len() + self.ready.len()
    }

    /// Sends `msg` without waiting for its answer (pipelining).
    pub fn send(&mut self, msg: Message) -> Result<(), ClientError> {
        if let Backend::Standalone(_) = self.backend {
            return self.answer_or_hand_over(msg);
        }
        self.outstanding.push_back(msg);
        let Backend::Daemon(conn) = &mut self.backend else {
            unreachable!("checked above")
        };
        let msg = self.outstanding.back().expect("just pushed");
        match conn.send(msg) {
            Ok(()) => Ok(()),
            Err(e) if e.is_transient() => self.reconnect(e.to_string()),
            Err(e) => {
                self.outstanding.pop_back();
                Err(match e {
                    ConnError::Encode(e) => ClientError::Unsendable(e.to_string()),
                    e => ClientError::Protocol(e.to_string()),
                })
            }
        }
    }

    /// The answer to the oldest uncollected request, or `None` if nothing
    /// is pending.
    pub fn recv(&mut self) -> Result<Option<Answered>, ClientError> {
        loop {
            if let Some(done) = self.ready.pop_front() {
                return Ok(Some(done));
            }
            let Some(front) = self.outstanding.front() else {
                return Ok(None);
            };
            if let Backend::Standalone(_) = self.backend {
                // Standalone answers are ready at once, but a handoff to a
                // daemon that failed leaves its request here: answered now
                // if the database is free again, else handed over again.
                let request = self.outstanding.pop_front().expect("front exists");
                self.answer_or_hand_over(request)?;
                continue;
            }
            let Backend::Daemon(conn) = &mut self.backend else {
                unreachable!("checked above")
            };
            match conn.recv() {
                Ok(answer) => {
                    if let Payload::Acknowledgment { request_id, .. } = &answer.payload {
                        if *request_id != front.id {
                            return Err(ClientError::Protocol(format!(
                                "answer for request {request_id} while waiting for {}",
                                front.id
                            )));
                        }
                    }
                    self.failures = 0;
                    let request = self.outstanding.pop_front().expect("front exists");
                    return Ok(Some(Answered { request, answer }));
                }
                Err(e) if e.is_transient() => self.reconnect(e.to_string())?,
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        }
    }

    /// Sends `msg` and waits for its answer (nothing else may be pending).
    pub fn request(&mut self, msg: Message) -> Result<Message, ClientError> {
        self.send(msg)?;
        match self.recv()? {
            Some(done) => Ok(done.answer),
            None => Err(ClientError::Protocol("request vanished".into())),
        }
    }

    /// After a transient failure (`last`): back off, reconnect (or go
    /// standalone if the daemon is gone) and resend every unanswered
    /// request.
    fn reconnect(&mut self, mut last: String) -> Result<(), ClientError> {
        loop {
            if let Backend::Daemon(conn) = &self.backend {
                conn.hang_up();
            }
            self.failures += 1;
            if self.failures > self.opts.retry.tries {
                return Err(ClientError::GaveUp {
                    tries: self.opts.retry.tries,
                    last,
                });
            }
            thread::sleep(self.opts.retry.delay(self.failures));
            let backend = match try_endpoints(&self.opts, &mut self.distrusted)? {
                Attempt::Connected(conn) => Backend::Daemon(conn),
                Attempt::AllDown(tried) if self.opts.standalone_db.is_some() => {
                    match fall_back(&self.opts, &mut self.distrusted, tried) {
                        Ok(backend) => backend,
                        Err(e) if e.is_held_by_daemon() => {
                            last = e.to_string();
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Attempt::AllDown(tried) | Attempt::Failed(tried) => {
                    last = tried;
                    continue;
                }
            };
            match self.resume(backend) {
                Ok(()) => return Ok(()),
                Err(Resumed::Again(why)) => last = why,
                Err(Resumed::Failed(e)) => return Err(e),
            }
        }
    }

    /// Carries on with `backend`: resends every unanswered request to the
    /// daemon, or answers each one locally.
    fn resume(&mut self, backend: Backend) -> Result<(), Resumed> {
        self.backend = backend;
        match &mut self.backend {
            Backend::Daemon(conn) => match self.outstanding.iter().try_for_each(|m| conn.send(m)) {
                Ok(()) => Ok(()),
                Err(e) if e.is_transient() => Err(Resumed::Again(e.to_string())),
                Err(e) => Err(Resumed::Failed(ClientError::Protocol(e.to_string()))),
            },
            Backend::Standalone(_) => {
                while let Some(msg) = self.outstanding.pop_front() {
                    match self.answer_locally(msg) {
                        Ok(()) => {}
                        // A daemon started meanwhile: the rest go to it.
                        Err(e) if e.is_held_by_daemon() => {
                            return Err(Resumed::Again(e.to_string()))
                        }
                        Err(e) => return Err(Resumed::Failed(e)),
                    }
                }
                Ok(())
            }
        }
    }

    /// Answers `request` from the database, or, if a daemon holds it now,
    /// hands every unanswered request to that daemon.
    fn answer_or_hand_over(&mut self, request: Message) -> Result<(), ClientError> {
        match self.answer_locally(request) {
            Err(e) if e.is_held_by_daemon() => self.reconnect(e.to_string()),
            done => done,
        }
    }

    fn answer_locally(&mut self, request: Message) -> Result<(), ClientError> {
        let Backend::Standalone(store) = &mut self.backend else {
            unreachable!("only called in standalone mode")
        };
        let (answer, access) = match store.answer(&request) {
            Ok(answered) => answered,
            Err(e) => {
                let e = ClientError::from(e);
                if e.is_held_by_daemon() {
                    // Unanswered: it goes to the daemon that holds the database.
                    self.outstanding.push_front(request);
                }
                return Err(e);
            }
        };
        if !self.noticed && access != Access::None {
            self.noticed = true;
            let db = store.db().display();
            let sentence = match access {
                Access::Write => format!("daemon not reachable; wrote directly to {db}"),
                _ => format!("daemon not reachable; read directly from {db}"),
            };
            (self.opts.notice)(&sentence);
        }
        // An answer, as from a daemon: the next failure starts a fresh
        // round of retries.
        self.failures = 0;
        self.ready.push_back(Answered { request, answer });
        Ok(())
    }
}

/// Why [`Client::resume`] did not carry on.
enum Resumed {
    /// A transient failure: reconnect again.
    Again(String),
    /// A failure that ends the request.
    Failed(ClientError),
}

/// How often a client whose database a daemon holds looks again for the
/// daemon's endpoints and the database's lock.
const HELD_POLL: Duration = Duration::from_millis(50);

/// After every endpoint failed (`tried`): the database directly, unless a
/// daemon holds it (one starting or stopping, or one that does not
/// answer); then, for up to the client's timeout, whichever comes first of
/// an endpoint that answers and the database let go of.
fn fall_back(
    opts: &ClientOptions,
    distrusted: &mut Vec<Endpoint>,
    mut tried: String,
) -> Result<Backend, ClientError> {
    let until = Instant::now() + opts.timeout;
    loop {
        match open_standalone(opts, tried) {
            Ok(store) => return Ok(Backend::Standalone(Box::new(store))),
            Err(e) if !e.is_held_by_daemon() || Instant::now() >= until => return Err(e),
            Err(_) => thread::sleep(HELD_POLL),
        }
        match try_endpoints(opts, distrusted)? {
            Attempt::Connected(conn) => return Ok(Backend::Daemon(conn)),
            Attempt::AllDown(again) | Attempt::Failed(again) => tried = again,
        }
    }
}

fn open_standalone(opts: &ClientOptions, tried: String) -> Result<Standalone, ClientError> {
    let Some(db) = &opts.standalone_db else {
        return Err(ClientError::Unreachable { tried });
    };
    Standalone::open(db).map_err(|source| ClientError::Standalone {
        tried,
        db: db.clone(),
        source: Box::new(source),
    })
}

/// Tries each endpoint once, in order; authenticates on TCP. An untrusted
/// endpoint counts as down and is reported through `opts.notice` unless it
/// is in `distrusted` already (then it is added).
fn try_endpoints(
    opts: &ClientOptions,
    distrusted: &mut Vec<Endpoint>,
) -> Result<Attempt, ClientError> {
    let mut tried = Vec::new();
    let mut down = true;
    for endpoint in &opts.endpoints {
        match Connection::connect(endpoint, opts.timeout, &opts.trusted) {
            Ok(mut conn) => match authenticate(&mut conn, opts) {
                Ok(()) => return Ok(Attempt::Connected(conn)),
                Err(AuthError::Refused(reason)) => {
                    return Err(ClientError::AuthRefused {
                        endpoint: endpoint.clone(),
                        reason,
                    })
                }
                Err(AuthError::Conn(e)) => {
                    tried.push(e.to_string());
                    down = false;
                }
            },
            Err(e) => {
                if matches!(e, ConnError::Untrusted { .. }) && !distrusted.contains(endpoint) {
                    distrusted.push(endpoint.clone());
                    (opts.notice)(&e.to_string());
                }
                tried.push(e.to_string());
                down &= e.is_daemon_down();
            }
        }
    }
    if opts.endpoints.is_empty() {
        tried.push("no endpoint to try".to_owned());
    }
    let tried = tried.join("; ");
    Ok(if down {
        Attempt::AllDown(tried)
    } else {
        Attempt::Failed(tried)
    })
}

enum AuthError {
    Refused(String),
    Conn(ConnError),
}

/// Sends `Authenticate` first on a TCP connection when a token is known.
fn authenticate(conn: &mut Connection, opts: &ClientOptions) -> Result<(), AuthError> {
    let (Endpoint::Tcp(_), Some(token)) = (conn.endpoint(), &opts.token) else {
        return Ok(());
    };
    let msg = Message::new(Payload::Authenticate {
        token: token.clone(),
    });
    let answer = conn.request(&msg).map_err(AuthError::Conn)?;
    match answer.payload {
        Payload::Acknowledgment {
            request_id,
            status: AckStatus::Accepted,
        } if request_id == msg.id => Ok(()),
        Payload::Acknowledgment {
            status: AckStatus::Rejected(why),
            ..
        } => Err(AuthError::Refused(why)),
        Payload::Error { code, message, .. } => {
            Err(AuthError::Refused(format!("{code}: {message}")))
        }
        other => Err(AuthError::Refused(format!(
            "unexpected {} answer to Authenticate",
            other.name()
        ))),
    }
}

#[cfg(test)]
mod tests;
