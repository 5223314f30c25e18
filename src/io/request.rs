//! What each request does: answered at once (ping, status, errors), or turned
//! into a job for the writer thread or the reader pool. No I/O and no
//! blocking here: a full queue or budget reports `Blocked` and the loop
//! pauses the connection without consuming the frame.

use super::answers::QUERY_ANSWER_ROOM;
use super::conn::{ConnState, Connection};
use crate::access::{Access, Scope};
use crate::budget::InflightBudget;
use crate::export::{ControlJob, ControlOp, ControlSender};
use crate::health;
use crate::io::listener::Stream;
use crate::metrics::Metrics;
use crate::proto::{
    AckStatus, ErrorCode, LogFields, Message, Payload, Timestamp, MAX_FUTURE_SKEW_MICROS,
};
use crate::reply::ReplyTo;
use crate::store::query::Writers;
use crate::store::{batch_entry_id, LogRow, QueryJob, WriteJob, WriteOp, MAX_NAME_LEN};
use crossbeam_channel::{Sender, TrySendError};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;
use uuid::Uuid;

/// Settings a SIGHUP may change while connections are open.
#[derive(Debug, Default)]
pub struct LiveSettings {
    /// The TCP token, if one is required.
    pub token: RwLock<Option<String>>,
    /// Log entries per second per connection; 0 = unlimited.
    pub rate_limit: AtomicU32,
    /// Bucket size of the rate limit.
    pub rate_burst: AtomicU32,
    /// Who may see whose logs.
    pub access: RwLock<Access>,
}

impl LiveSettings {
    /// Current rate limit and burst.
    pub fn rate(&self) -> (u32, u32) {
        (
            self.rate_limit.load(Ordering::Relaxed),
            self.rate_burst.load(Ordering::Relaxed),
        )
    }

    /// True when TCP clients must authenticate.
    pub fn token_required(&self) -> bool {
        self.token.read().is_some()
    }

    /// Whether `offered` is the token; `None` when none is required (any
    /// offer is then accepted, and proves nothing).
    fn token_matches(&self, offered: &str) -> Option<bool> {
        self.token
            .read()
            .as_deref()
            .map(|expected| constant_time_eq(expected.as_bytes(), offered.as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Failed `Authenticate` attempts one address may make at once.
pub const AUTH_FAILURE_BURST: f64 = 10.0;
/// Failed attempts per second an address earns back.
pub const AUTH_FAILURES_PER_SECOND: f64 = 1.0;
/// Addresses remembered; beyond it, those that earned their attempts back
/// are forgotten first (then all, rather than growing).
const AUTH_GUARD_ADDRESSES: usize = 4096;

/// A token bucket of failed `Authenticate` attempts per client address: a
/// guesser gets [`AUTH_FAILURE_BURST`] tries, then one a second, and its
/// further attempts are refused without comparing the token.
#[derive(Debug, Default)]
pub struct AuthGuard {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl AuthGuard {
    fn refill(bucket: &mut (f64, Instant), now: Instant) {
        let earned =
            now.saturating_duration_since(bucket.1).as_secs_f64() * AUTH_FAILURES_PER_SECOND;
        bucket.0 = (bucket.0 + earned).min(AUTH_FAILURE_BURST);
        bucket.1 = now;
    }

    /// True while `ip` may still try a token.
    pub fn may_try(&mut self, ip: IpAddr, now: Instant) -> bool {
        match self.buckets.get_mut(&ip) {
            Some(bucket) => {
                Self::refill(bucket, now);
                bucket.0 >= 1.0
            }
            None => true,
        }
    }

    /// Charges one failed attempt to `ip`.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) {
        if self.buckets.len() >= AUTH_GUARD_ADDRESSES && !self.buckets.contains_key(&ip) {
            self.buckets.retain(|_, b| {
                Self::refill(b, now);
                b.0 < AUTH_FAILURE_BURST
            });
            if self.buckets.len() >= AUTH_GUARD_ADDRESSES {
                self.buckets.clear();
            }
        }
        let bucket = self.buckets.entry(ip).or_insert((AUTH_FAILURE_BURST, now));
        Self::refill(bucket, now);
        bucket.0 -= 1.0;
    }
}

/// Everything the loops share to serve requests.
pub struct Services {
    /// The writer thread's queue.
    pub writer: Sender<WriteJob>,
    /// The reader pool's queue.
    pub readers: Sender<QueryJob>,
    /// The export watcher's control queue; `None` when export detection
    /// could not start (the daemon runs on without it).
    pub exports: Option<ControlSender>,
    /// Bytes of requests in flight.
    pub budget: Arc<InflightBudget>,
    /// Bytes of partly received frames buffered beyond each connection's
    /// free allowance.
    pub receive: Arc<InflightBudget>,
    /// Failed `Authenticate` attempts per client address.
    pub auth_guard: Mutex<AuthGuard>,
    /// Bytes of query answers not yet written out (`io::answers`).
    pub answer_pool: Arc<InflightBudget>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Reloadable settings.
    pub live: Arc<LiveSettings>,
    /// What the health evaluation reads.
    pub health: Arc<health::report::Sources>,
    /// `general.workspace`: the workspace of a session that names none.
    pub default_workspace: Option<String>,
}

/// The result of handling one decoded request.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    /// Taken (answered or queued); charge this many log entries to the
    /// rate limit.
    Done(u32),
    /// Nothing taken: a queue or the budget is full; try again later.
    Blocked,
}

/// The loop and connection a request came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// The loop's index.
    pub worker: usize,
    /// The connection's token.
    pub token: usize,
}

impl Services {
    /// Serves one request from `conn`; `frame_len` is its size on the wire.
    pub fn handle(
        &self,
        conn: &mut Connection,
        origin: Origin,
        msg: Message,
        frame_len: usize,
    ) -> Handled {
        let id = msg.id;
        if conn.state == ConnState::AwaitingAuth {
            return self.authenticate(conn, msg);
        }
        match msg.payload {
            Payload::Ping => self.answer(conn, Message::ack(id, AckStatus::Accepted)),
            Payload::Authenticate { .. } => self.authenticate(conn, msg),
            Payload::GetStatus => {
                let status = self.status(self.scope(conn));
                self.answer(conn, status)
            }
            Payload::LogEntry(fields) => {
                if let Some(reason) = too_far_ahead(msg.timestamp) {
                    return self.reject(conn, id, reason, 1);
                }
                let row = LogRow::from_fields(
                    id,
                    msg.timestamp,
                    fields,
                    conn.session.as_deref(),
                    conn.peer_uid(),
                );
                match row {
                    Ok(row) => self.write(conn, origin, id, WriteOp::Logs(vec![row]), frame_len, 1),
                    Err(reason) => self.reject(conn, id, reason, 1),
                }
            }
            Payload::LogBatch { entries } => {
                let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
                if entries.is_empty() {
                    return self.answer(conn, Message::ack(id, AckStatus::Accepted));
                }
                if let Some(reason) = too_far_ahead(msg.timestamp) {
                    return self.reject(conn, id, reason, count);
                }
                match batch_rows(
                    id,
                    msg.timestamp,
                    entries,
                    conn.session.as_deref(),
                    conn.peer_uid(),
                ) {
                    Ok(rows) => self.write(conn, origin, id, WriteOp::Logs(rows), frame_len, count),
                    Err(reason) => self.reject(conn, id, reason, count),
                }
            }
            Payload::SessionStart {
                session_id,
                identity,
                agent_type,
                workspace,
            } => {
                if let Err(reason) = check_name("session_id", &session_id)
                    .and_then(|()| check_name("identity", &identity))
                {
                    return self.reject(conn, id, reason, 0);
                }
                conn.session = Some(session_id.clone());
                let workspace = workspace
                    .filter(|w| !w.is_empty())
                    .or_else(|| self.default_workspace.clone());
                let op = WriteOp::SessionStart {
                    session_id,
                    identity,
                    agent_type,
                    workspace,
                    started_at_us: msg.timestamp.as_micros(),
                    uid: conn.peer_uid(),
                    restricted_to: self.restricted_to(conn),
                };
                self.write(conn, origin, id, op, frame_len, 1)
            }
            Payload::SessionEnd { session_id } => {
                if let Err(reason) = check_name("session_id", &session_id) {
                    return self.reject(conn, id, reason, 0);
                }
                if conn.session.as_deref() == Some(session_id.as_str()) {
                    conn.session = None;
                }
                let op = WriteOp::SessionEnd {
                    session_id,
                    ended_at_us: msg.timestamp.as_micros(),
                    restricted_to: self.restricted_to(conn),
                };
                self.write(conn, origin, id, op, frame_len, 1)
            }
            Payload::QueryLogs { mut filter, limit } => {
                let mut writers = Writers::Any;
                match (self.scope(conn), filter.uid) {
                    (Scope::All, _) => {}
                    (Scope::Own(uid), Some(asked)) if asked != uid => {
                        return self.answer(
                            conn,
                            Message::error(
                                ErrorCode::Unauthorized,
                                format!(
                                    "uid {uid} may see only its own logs, not uid {asked}'s \
                                     (monitor.query_all_users and query_all_groups grant more)"
                                ),
                            ),
                        );
                    }
                    (Scope::Own(uid), _) => filter.uid = Some(uid),
                    (Scope::Anonymous, Some(asked)) => {
                        return self.answer(
                            conn,
                            Message::error(
                                ErrorCode::Unauthorized,
                                format!(
                                    "a client without a token may see only logs sent without \
                                     a uid, not uid {asked}'s"
                                ),
                            ),
                        );
                    }
                    (Scope::Anonymous, None) => writers = Writers::NoUid,
                }
                // Room for the answer first: answers that clients do not
                // read must not add up without bound (`io::answers`).
                let Some(room) = self
                    .answer_pool
                    .try_reserve(QUERY_ANSWER_ROOM, conn.rooms.holder())
                else {
                    Metrics::add(&self.metrics.queries_refused, 1);
                    return self.answer(
                        conn,
                        Message::error(
                            ErrorCode::Unavailable,
                            "too many query answers waiting to be read by their clients; \
                             retry shortly",
                        ),
                    );
                };
                let reply = self.reply_to(conn, origin, true);
                match self.readers.try_send(QueryJob {
                    reply,
                    filter,
                    writers,
                    limit,
                    room,
                }) {
                    Ok(()) => {
                        conn.answers.reserve();
                        conn.queries_in_flight += 1;
                        Handled::Done(1)
                    }
                    Err(TrySendError::Full(_)) => self.answer(
                        conn,
                        Message::error(
                            ErrorCode::Unavailable,
                            "too many queries in progress; retry shortly",
                        ),
                    ),
                    Err(TrySendError::Disconnected(_)) => self.unavailable(conn),
                }
            }
            Payload::StartMonitoring {
                path,
                recursive,
                patterns,
                session_id,
            } => {
                if let Some(s) = &session_id {
                    if let Err(reason) = check_name("session_id", s) {
                        return self
                            .answer(conn, Message::error(ErrorCode::InvalidRequest, reason));
                    }
                }
                let op = ControlOp::Start {
                    path,
                    recursive,
                    patterns,
                    session_id,
                };
                self.control(conn, origin, id, op)
            }
            Payload::StopMonitoring { path } => {
                // A client without a uid is refused by the watcher.
                let only_owner = self.restricted_to(conn).flatten();
                self.control(conn, origin, id, ControlOp::Stop { path, only_owner })
            }
            Payload::ListMonitoring => match self.restricted_to(conn) {
                // Every watch has a Unix user's uid: none is this client's.
                Some(None) => self.answer(
                    conn,
                    Message::answer(Payload::Monitoring { paths: Vec::new() }),
                ),
                only_owner => {
                    let only_owner = only_owner.flatten();
                    self.control(conn, origin, id, ControlOp::List { only_owner })
                }
            },
            other => {
                let name = other.name();
                self.answer(
                    conn,
                    Message::error(
                        ErrorCode::InvalidMessage,
                        format!("`{name}` is an answer, not a request"),
                    ),
                )
            }
        }
    }

    /// Whose logs and watches `conn` may see.
    fn scope(&self, conn: &Connection) -> Scope {
        self.live.access.read().scope(conn.peer, conn.holds_token)
    }

    /// Set when `conn` may touch only its own sessions and see only its own
    /// watches: its uid, or `None` for a client with no uid.
    fn restricted_to(&self, conn: &Connection) -> Option<Option<u32>> {
        match self.scope(conn) {
            Scope::All => None,
            Scope::Own(uid) => Some(Some(uid)),
            Scope::Anonymous => Some(None),
        }
    }

    /// Hands a monitoring request to the export watcher.
    fn control(
        &self,
        conn: &mut Connection,
        origin: Origin,
        request_id: Uuid,
        op: ControlOp,
    ) -> Handled {
        let Some(exports) = &self.exports else {
            return self.answer(
                conn,
                Message::error(
                    ErrorCode::Unavailable,
                    "export detection is not running on this daemon (see its log)",
                ),
            );
        };
        let changes = matches!(op, ControlOp::Start { .. } | ControlOp::Stop { .. });
        if changes && matches!(conn.stream, Stream::Tcp(_)) {
            // A watch makes the daemon read (and in move mode delete) files
            // with its own rights: only local users of the socket may ask.
            return self.answer(
                conn,
                Message::error(
                    ErrorCode::Unauthorized,
                    "StartMonitoring and StopMonitoring are accepted on the Unix socket only",
                ),
            );
        }
        let job = ControlJob {
            reply: self.reply_to(conn, origin, false),
            request_id,
            op,
            requester_uid: conn.peer_uid(),
        };
        match exports.try_send(job) {
            Ok(()) => {
                conn.answers.reserve();
                Handled::Done(1)
            }
            Err(TrySendError::Full(_)) => self.answer(
                conn,
                Message::error(
                    ErrorCode::Unavailable,
                    "too many monitoring requests in progress; retry shortly",
                ),
            ),
            Err(TrySendError::Disconnected(_)) => self.unavailable(conn),
        }
    }

    fn reply_to(&self, conn: &Connection, origin: Origin, query: bool) -> ReplyTo {
        ReplyTo {
            worker: origin.worker,
            token: origin.token,
            serial: conn.serial,
            seq: conn.answers.next_seq(),
            query,
        }
    }

    fn answer(&self, conn: &mut Connection, answer: Message) -> Handled {
        conn.answers.push_ready(answer);
        Handled::Done(1)
    }

    fn reject(&self, conn: &mut Connection, id: Uuid, reason: String, entries: u32) -> Handled {
        Metrics::add(&self.metrics.logs_rejected_invalid, u64::from(entries));
        conn.answers
            .push_ready(Message::ack(id, AckStatus::Rejected(reason)));
        Handled::Done(entries.max(1))
    }

    fn unavailable(&self, conn: &mut Connection) -> Handled {
        self.answer(
            conn,
            Message::error(ErrorCode::Unavailable, "the daemon is shutting down"),
        )
    }

    fn authenticate(&self, conn: &mut Connection, msg: Message) -> Handled {
        let Payload::Authenticate { token } = &msg.payload else {
            Metrics::add(&self.metrics.auth_failures, 1);
            conn.state = ConnState::Closing;
            return self.answer(
                conn,
                Message::error(
                    ErrorCode::Unauthorized,
                    format!(
                        "authenticate first: this TCP listener requires a token before `{}`",
                        msg.payload.name()
                    ),
                ),
            );
        };
        let now = Instant::now();
        if let Some(ip) = conn.peer_ip {
            if !self.auth_guard.lock().may_try(ip, now) {
                Metrics::add(&self.metrics.auth_throttled, 1);
                log::warn!("refusing Authenticate from {ip} unchecked: too many failed attempts");
                conn.state = ConnState::Closing;
                return self.answer(
                    conn,
                    Message::error(
                        ErrorCode::Unauthorized,
                        format!(
                            "too many failed Authenticate attempts from {ip}; wait a few seconds"
                        ),
                    ),
                );
            }
        }
        let matched = self.live.token_matches(token);
        if matched != Some(false) {
            conn.holds_token |= matched.is_some();
            if conn.state == ConnState::AwaitingAuth {
                conn.state = ConnState::Open;
            }
            self.answer(conn, Message::ack(msg.id, AckStatus::Accepted))
        } else {
            Metrics::add(&self.metrics.auth_failures, 1);
            match conn.peer_ip {
                Some(ip) => {
                    self.auth_guard.lock().failed(ip, now);
                    log::warn!("failed Authenticate from {ip}: wrong token");
                }
                None => log::warn!("failed Authenticate on the Unix socket: wrong token"),
            }
            conn.state = ConnState::Closing;
            self.answer(
                conn,
                Message::error(ErrorCode::Unauthorized, "invalid token"),
            )
        }
    }

    fn write(
        &self,
        conn: &mut Connection,
        origin: Origin,
        request_id: Uuid,
        op: WriteOp,
        frame_len: usize,
        entries: u32,
    ) -> Handled {
        // Decoded rows take roughly twice their wire size in memory, or
        // their stored size if that is more (JSON escapes can grow a text
        // sixfold; each row is bounded by `MAX_ROW_BYTES`).
        let stored: usize = match &op {
            WriteOp::Logs(rows) => rows.iter().map(LogRow::stored_len).sum(),
            WriteOp::SessionStart { .. } | WriteOp::SessionEnd { .. } => 0,
        };
        let cost = (2 * frame_len).max(stored) + 256;
        if !self.budget.try_acquire(cost) {
            return Handled::Blocked;
        }
        let job = WriteJob {
            reply: self.reply_to(conn, origin, false),
            request_id,
            op,
            cost,
        };
        match self.writer.try_send(job) {
            Ok(()) => {
                conn.answers.reserve();
                Metrics::add(&self.metrics.logs_received, u64::from(entries));
                Handled::Done(entries)
            }
            Err(TrySendError::Full(_)) => {
                self.budget.release(cost);
                Handled::Blocked
            }
            Err(TrySendError::Disconnected(_)) => {
                self.budget.release(cost);
                self.unavailable(conn)
            }
        }
    }

    /// The `Status` answer: the daemon's health, evaluated as `/health`
    /// evaluates it, for a client who may see `scope`'s logs.
    pub fn status(&self, scope: Scope) -> Message {
        let report = health::report::evaluate_for(&self.health, scope == Scope::All);
        Message::answer(report.into_payload())
    }
}

fn check_name(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        Err(format!("{what} must not be empty"))
    } else if value.len() > MAX_NAME_LEN {
        Err(format!("{what} is longer than {MAX_NAME_LEN} bytes"))
    } else {
        Ok(())
    }
}

/// Why a log stamped `timestamp` is refused as being from the future, if
/// it is: more than a day ahead of the daemon's clock.
fn too_far_ahead(timestamp: Timestamp) -> Option<String> {
    let limit = Timestamp::now()
        .as_micros()
        .saturating_add(MAX_FUTURE_SKEW_MICROS);
    (timestamp.as_micros() > limit).then(|| {
        format!(
            "timestamp {timestamp} is more than 24 hours ahead of the daemon's clock ({}); fix the sender's clock",
            Timestamp::from_micros(limit - MAX_FUTURE_SKEW_MICROS)
        )
    })
}

fn batch_rows(
    batch_id: Uuid,
    timestamp: Timestamp,
    entries: Vec<LogFields>,
    session: Option<&str>,
    uid: Option<u32>,
) -> Result<Vec<LogRow>, String> {
    entries
        .into_iter()
        .enumerate()
        .map(|(i, fields)| {
            LogRow::from_fields(batch_entry_id(batch_id, i), timestamp, fields, session, uid)
                .map_err(|reason| format!("entry {i}: {reason}; nothing in the batch was stored"))
        })
        .collect()
}
