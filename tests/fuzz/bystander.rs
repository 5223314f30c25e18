//! A valid client beside the hostile ones: pipelined bursts of logs,
//! batches, pings and queries, every answer checked to be exactly right.
//! `Unavailable` (and `RateLimited`) are the daemon saying it is overloaded:
//! counted, and the request is sent again later with the same id.

use super::gen::{self, Rng};
use super::Shared;
use crate::common::Client;
use codi_monitor::proto::{
    encode_message, AckStatus, ErrorCode, LogFields, LogFilter, LogLevel, Message, Payload,
    StoredLog,
};
use codi_monitor::store::batch_entry_id;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Where a bystander connects.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The Unix socket.
    Unix(PathBuf),
    /// TCP, authenticating with the token.
    Tcp(SocketAddr, String),
}

/// A log as the bystander sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    /// Level name.
    pub level: LogLevel,
    /// Component.
    pub component: String,
    /// Text.
    pub message: String,
    /// Timestamp, micros.
    pub timestamp: i64,
    /// Metadata sent (for the row comparison: absent or not).
    pub has_metadata: bool,
    /// The session it must be stored with: the one its connection started.
    pub session_id: Option<String>,
}

/// What one bystander did.
#[derive(Debug, Default)]
pub struct Record {
    /// Every row uuid it sent, acknowledged or not.
    pub sent: HashMap<Uuid, Sent>,
    /// Row uuids acknowledged `Accepted`.
    pub acked: Vec<Uuid>,
    /// Requests it made (each retry counts).
    pub requests: u64,
    /// Answers that were `Unavailable` or `RateLimited`.
    pub overloaded: u64,
    /// Connections it had to open again.
    pub reconnects: u64,
    /// The longest a burst waited for all its answers.
    pub slowest: Duration,
    /// The longest wait for the answer to the first request of a burst,
    /// by request variant.
    pub slowest_by_kind: HashMap<&'static str, Duration>,
}

/// A request in flight and what its answer must be.
#[derive(Debug, Clone)]
enum Pending {
    /// A log or batch; these row uuids are stored once it is accepted.
    Logs(Message, Vec<Uuid>),
    /// A ping.
    Ping(Message),
    /// A query for this bystander's own component, sent when `acked` of
    /// its logs were already acknowledged and `sent` had been sent.
    Query {
        msg: Message,
        limit: u64,
        acked: usize,
        sent: usize,
    },
}

impl Pending {
    fn message(&self) -> &Message {
        match self {
            Pending::Logs(m, _) | Pending::Ping(m) | Pending::Query { msg: m, .. } => m,
        }
    }
}

/// Metadata a valid client sends: small, shallow, JSON-friendly.
fn metadata(rng: &mut Rng, i: u64) -> Option<rmpv::Value> {
    rng.one_in(2).then(|| {
        rmpv::Value::Map(vec![
            ("n".into(), rmpv::Value::from(i)),
            ("ok".into(), rmpv::Value::from(rng.one_in(2))),
            (
                "tags".into(),
                rmpv::Value::Array(vec!["a".into(), "日本".into()]),
            ),
        ])
    })
}

/// How long a bystander keeps trying to connect before it gives up.
const CONNECT_PATIENCE: Duration = Duration::from_secs(20);

/// Sends `request` on `c` and hands `c` back if it was `Accepted`.
fn expect_accepted(mut c: Client, request: &Message) -> std::io::Result<Client> {
    c.send(request)?;
    match c.try_recv()? {
        Some(Message {
            payload:
                Payload::Acknowledgment {
                    request_id,
                    status: AckStatus::Accepted,
                },
            ..
        }) if request_id == request.id => Ok(c),
        other => Err(std::io::Error::other(format!(
            "{} answered {other:?}",
            request.payload.name()
        ))),
    }
}

/// Connects (and authenticates over TCP), then starts `session` if given,
/// so that every log sent on the connection belongs to it. Refusals under
/// load are counted and retried; `None` once [`CONNECT_PATIENCE`] has run
/// out.
fn connect(
    endpoint: &Endpoint,
    session: Option<&str>,
    shared: &Shared,
    who: &str,
) -> Option<Client> {
    let give_up = Instant::now() + CONNECT_PATIENCE;
    loop {
        let attempt = match endpoint {
            Endpoint::Unix(path) => Client::try_unix(path),
            Endpoint::Tcp(addr, token) => Client::try_tcp(*addr).and_then(|c| {
                let auth = Message::new(Payload::Authenticate {
                    token: token.clone(),
                });
                expect_accepted(c, &auth)
            }),
        };
        let attempt = attempt.and_then(|c| {
            let Some(session) = session else {
                return Ok(c);
            };
            let start = Message::new(Payload::SessionStart {
                session_id: session.to_owned(),
                identity: "fuzz-bystander".into(),
                agent_type: None,
                workspace: None,
            });
            expect_accepted(c, &start)
        });
        match attempt {
            Ok(c) => return Some(c),
            Err(e) if Instant::now() >= give_up => {
                shared.fail(format!(
                    "{who}: cannot connect for {CONNECT_PATIENCE:?}: {e}"
                ));
                return None;
            }
            Err(_) => {
                shared
                    .stats
                    .bystander_connect_retries
                    .fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Rounds a bystander may spend after the run resending requests the
/// daemon was too busy for.
const FINAL_ROUNDS: usize = 200;

/// Runs bystander `k` until the run stops; returns what it did. With
/// `pings_only` it sends one ping at a time, so that its slowest answer is
/// the event loops' own latency, not a commit's or a query's.
pub fn run(
    k: usize,
    endpoint: Endpoint,
    pings_only: bool,
    mut rng: Rng,
    shared: Arc<Shared>,
) -> Record {
    let who = format!("bystander {k} ({endpoint:?})");
    let component = format!("bystander-{k}");
    // Bystanders 2 and 3 (one per transport) log inside a session.
    let session = (k == 2 || k == 3).then(|| format!("bystander-session-{k}"));
    let session = session.as_deref();
    let mut rec = Record::default();
    let Some(mut client) = connect(&endpoint, session, &shared, &who) else {
        return rec;
    };
    let mut retry: Vec<Pending> = Vec::new();
    let mut n: u64 = 0;
    let mut final_rounds = 0;
    while !shared.stopping() || !retry.is_empty() {
        if shared.stopping() {
            final_rounds += 1;
            if final_rounds > FINAL_ROUNDS {
                shared.fail(format!(
                    "{who}: {} requests still refused as overloaded after the run",
                    retry.len()
                ));
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Build one pipelined burst: retries first, then new requests.
        let size = if pings_only {
            1
        } else if rng.one_in(8) {
            rng.range(8, 32)
        } else {
            rng.range(1, 6)
        };
        let mut burst: Vec<Pending> = std::mem::take(&mut retry);
        // A query sent again may see every log sent until now.
        for p in &mut burst {
            if let Pending::Query { sent, .. } = p {
                *sent = rec.sent.len();
            }
        }
        while burst.len() < size && !shared.stopping() {
            n += 1;
            let p = match if pings_only { 12 } else { rng.below(20) } {
                0..=7 => {
                    let fields = LogFields {
                        level: *rng.pick(&LogLevel::ALL),
                        component: component.clone(),
                        message: format!("entry {n} {}", gen::text(&mut rng, 30)),
                        metadata: metadata(&mut rng, n),
                        session_id: None,
                    };
                    let msg = Message::new(Payload::LogEntry(fields.clone()));
                    record_sent(&mut rec, msg.id, &fields, &msg, session);
                    Pending::Logs(msg.clone(), vec![msg.id])
                }
                8..=11 => {
                    let entries: Vec<LogFields> = (0..rng.range(1, 20))
                        .map(|j| LogFields {
                            level: *rng.pick(&LogLevel::ALL),
                            component: component.clone(),
                            message: format!("batch {n}.{j}"),
                            metadata: metadata(&mut rng, n),
                            session_id: None,
                        })
                        .collect();
                    let msg = Message::new(Payload::LogBatch {
                        entries: entries.clone(),
                    });
                    let ids: Vec<Uuid> = (0..entries.len())
                        .map(|i| batch_entry_id(msg.id, i))
                        .collect();
                    for (id, f) in ids.iter().zip(&entries) {
                        record_sent(&mut rec, *id, f, &msg, session);
                    }
                    Pending::Logs(msg, ids)
                }
                12..=16 => Pending::Ping(Message::new(Payload::Ping)),
                _ => {
                    let limit = *rng.pick(&[1u64, 5, 50, 500]);
                    Pending::Query {
                        msg: Message::new(Payload::QueryLogs {
                            filter: LogFilter {
                                component: Some(component.clone()),
                                ..LogFilter::default()
                            },
                            limit,
                        }),
                        limit,
                        acked: rec.acked.len(),
                        sent: rec.sent.len(),
                    }
                }
            };
            burst.push(p);
        }
        if burst.is_empty() {
            break;
        }
        let mut bytes = Vec::new();
        for p in &burst {
            encode_message(p.message(), &mut bytes).unwrap();
        }
        rec.requests += burst.len() as u64;
        let sent_at = Instant::now();
        if let Err(e) = client.send_raw(&bytes) {
            shared.fail(format!("{who}: sending a burst failed: {e}"));
            rec.reconnects += 1;
            let Some(c) = connect(&endpoint, session, &shared, &who) else {
                return rec;
            };
            client = c;
            retry = burst;
            continue;
        }
        for (i, p) in burst.iter().enumerate() {
            let answer = match client.try_recv() {
                Ok(Some(a)) => a,
                other => {
                    shared.fail(format!(
                        "{who}: no answer to request {i} of a burst of {} ({:?}): {other:?}",
                        burst.len(),
                        p.message().payload.name()
                    ));
                    rec.reconnects += 1;
                    let Some(c) = connect(&endpoint, session, &shared, &who) else {
                        return rec;
                    };
                    client = c;
                    // Resend whatever was not answered (same ids: stored once).
                    retry.extend(burst[i..].iter().cloned());
                    break;
                }
            };
            if i == 0 {
                // The first of a burst waits for nothing else of its own.
                let slot = rec
                    .slowest_by_kind
                    .entry(p.message().payload.name())
                    .or_default();
                *slot = (*slot).max(sent_at.elapsed());
            }
            if check(&who, p, &answer, &mut rec, &shared) == Verdict::Retry {
                retry.push(p.clone());
            }
        }
        rec.slowest = rec.slowest.max(sent_at.elapsed());
        if rng.one_in(50) {
            thread::sleep(Duration::from_millis(rng.range(1, 20) as u64));
        }
    }
    // The run is over: a last round trip on the same connection.
    let ping = Message::new(Payload::Ping);
    client.send(&ping).unwrap();
    match client.try_recv() {
        Ok(Some(Message {
            payload:
                Payload::Acknowledgment {
                    request_id,
                    status: AckStatus::Accepted,
                },
            ..
        })) if request_id == ping.id => {}
        other => shared.fail(format!("{who}: the final ping got {other:?}")),
    }
    rec
}

fn record_sent(rec: &mut Record, id: Uuid, f: &LogFields, msg: &Message, session: Option<&str>) {
    rec.sent.insert(
        id,
        Sent {
            level: f.level,
            component: f.component.clone(),
            message: f.message.clone(),
            timestamp: msg.timestamp.as_micros(),
            has_metadata: f.metadata.is_some(),
            session_id: session.map(str::to_owned),
        },
    );
}

/// What to do about a request once its answer is checked.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Answered (rightly or not: a wrong answer is recorded as a failure).
    Done,
    /// The daemon was overloaded: send it again, same id.
    Retry,
}

/// Checks one answer.
fn check(who: &str, p: &Pending, answer: &Message, rec: &mut Record, shared: &Shared) -> Verdict {
    if let Payload::Error {
        code: ErrorCode::Unavailable | ErrorCode::RateLimited,
        ..
    } = &answer.payload
    {
        rec.overloaded += 1;
        shared
            .stats
            .bystander_overloaded
            .fetch_add(1, Ordering::Relaxed);
        return Verdict::Retry;
    }
    let wrong = |what: &str| {
        shared.fail(format!(
            "{who}: {} {} got a wrong answer ({what}): {:?}",
            p.message().payload.name(),
            p.message().id,
            answer.payload
        ));
    };
    match p {
        Pending::Logs(msg, ids) => match &answer.payload {
            Payload::Acknowledgment {
                request_id,
                status: AckStatus::Accepted,
            } if *request_id == msg.id => rec.acked.extend(ids.iter().copied()),
            Payload::Acknowledgment { request_id, .. } if *request_id == msg.id => {
                wrong("a valid log must be Accepted")
            }
            _ => wrong("not the Acknowledgment of this request"),
        },
        Pending::Ping(msg) => match &answer.payload {
            Payload::Acknowledgment {
                request_id,
                status: AckStatus::Accepted,
            } if *request_id == msg.id => {}
            _ => wrong("a ping is Accepted"),
        },
        Pending::Query {
            limit, acked, sent, ..
        } => match &answer.payload {
            Payload::LogResults {
                entries,
                total_count,
            } => check_results(entries, *total_count, *limit, *acked, *sent, rec, &wrong),
            _ => wrong("a query is answered by LogResults"),
        },
    }
    Verdict::Done
}

/// A query for the bystander's own component sees every log acknowledged
/// before it was sent, nothing it never sent, each as sent, oldest first.
fn check_results(
    entries: &[StoredLog],
    total: u64,
    limit: u64,
    acked_before: usize,
    sent_before: usize,
    rec: &Record,
    wrong: &dyn Fn(&str),
) {
    if entries.len() as u64 > limit {
        wrong(&format!("{} entries for a limit of {limit}", entries.len()));
    }
    if (total as usize) < acked_before.max(entries.len()) {
        wrong(&format!(
            "total_count {total} but {acked_before} logs were acknowledged before the query"
        ));
    }
    if total as usize > sent_before + 20 * 32 {
        wrong(&format!(
            "total_count {total} but only about {sent_before} logs were sent"
        ));
    }
    for pair in entries.windows(2) {
        if (pair[0].timestamp, pair[0].id) > (pair[1].timestamp, pair[1].id) {
            wrong("entries are not oldest first");
            break;
        }
    }
    for e in entries {
        match rec.sent.get(&e.uuid) {
            None => wrong(&format!("entry {} was never sent by this client", e.uuid)),
            Some(s) => {
                if s.message != e.message
                    || s.level != e.level
                    || s.component != e.component
                    || s.timestamp != e.timestamp.as_micros()
                    || s.has_metadata != e.metadata.is_some()
                    || s.session_id != e.session_id
                {
                    wrong(&format!(
                        "entry {} differs from what was sent: {s:?}",
                        e.uuid
                    ));
                }
            }
        }
    }
}
