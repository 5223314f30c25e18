//! Matching answers to requests on one connection.
//!
//! The protocol answers every request exactly once, in request order, so a
//! FIFO of what was sent is all the bookkeeping needed: each answer belongs
//! to the oldest unanswered request. An `Acknowledgment` also names its
//! request, which is checked; a mismatch is a protocol error.

use codi_monitor::proto::{AckStatus, Message, Payload};
use std::collections::VecDeque;
use std::time::Instant;
use uuid::Uuid;

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `LogEntry` (one entry) or `LogBatch`.
    Logs,
    /// `Ping`.
    Ping,
    /// `QueryLogs`.
    Query,
}

/// A request sent and not yet answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The request's message id.
    pub id: Uuid,
    /// When it was due by the schedule (latency is measured from here).
    pub scheduled: Instant,
    /// When it actually left (service time is measured from here).
    pub sent: Instant,
    /// Log entries it carries (0 for pings and queries).
    pub entries: u32,
    /// What it was.
    pub kind: Kind,
}

/// What one answer meant.
#[derive(Debug, Clone, PartialEq)]
pub enum Matched {
    /// Logs committed (`Accepted`).
    Accepted(Pending),
    /// `Queued`: taken but not durable (never expected from protocol v1).
    Queued(Pending),
    /// Logs refused; none stored.
    Rejected(Pending, String),
    /// An `Error` answer to this request.
    Error(Pending, String),
    /// A ping's `Accepted` or a query's `LogResults`.
    Answered(Pending),
    /// An answer that does not fit its request (wrong `request_id`, wrong
    /// variant); the request is consumed all the same.
    Protocol(Pending, String),
    /// An answer with no request outstanding.
    Unsolicited(String),
}

/// Pops the request `answer` belongs to and says what became of it.
pub fn match_answer(fifo: &mut VecDeque<Pending>, answer: &Message) -> Matched {
    let Some(p) = fifo.pop_front() else {
        return Matched::Unsolicited(describe(&answer.payload));
    };
    match (&answer.payload, p.kind) {
        (Payload::Acknowledgment { request_id, .. }, _) if *request_id != p.id => {
            Matched::Protocol(
                p,
                format!("acknowledgment names {request_id}, expected {}", p.id),
            )
        }
        (Payload::Acknowledgment { status, .. }, Kind::Logs) => match status {
            AckStatus::Accepted => Matched::Accepted(p),
            AckStatus::Queued => Matched::Queued(p),
            AckStatus::Rejected(reason) => Matched::Rejected(p, reason.clone()),
        },
        (
            Payload::Acknowledgment {
                status: AckStatus::Accepted,
                ..
            },
            Kind::Ping,
        )
        | (Payload::LogResults { .. }, Kind::Query) => Matched::Answered(p),
        (Payload::Error { code, message, .. }, _) => {
            Matched::Error(p, format!("{code}: {message}"))
        }
        (other, kind) => Matched::Protocol(
            p,
            format!(
                "unexpected {} answering a {kind:?} request",
                describe(other)
            ),
        ),
    }
}

fn describe(payload: &Payload) -> String {
    match payload {
        Payload::Error { code, message, .. } => format!("Error {code}: {message}"),
        Payload::Acknowledgment { status, .. } => format!("Acknowledgment {status:?}"),
        other => other.name().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codi_monitor::proto::ErrorCode;

    fn pending(kind: Kind, entries: u32) -> Pending {
        let now = Instant::now();
        Pending {
            id: Uuid::now_v7(),
            scheduled: now,
            sent: now,
            entries,
            kind,
        }
    }

    #[test]
    fn answers_match_in_order() {
        let a = pending(Kind::Logs, 1);
        let b = pending(Kind::Logs, 100);
        let mut fifo = VecDeque::from([a, b]);
        let ack = |p: &Pending, status| Message::ack(p.id, status);
        assert_eq!(
            match_answer(&mut fifo, &ack(&a, AckStatus::Accepted)),
            Matched::Accepted(a)
        );
        assert_eq!(
            match_answer(&mut fifo, &ack(&b, AckStatus::Rejected("full".into()))),
            Matched::Rejected(b, "full".into())
        );
        assert!(fifo.is_empty());
        assert!(matches!(
            match_answer(&mut fifo, &ack(&b, AckStatus::Accepted)),
            Matched::Unsolicited(_)
        ));
    }

    #[test]
    fn a_wrong_request_id_is_a_protocol_error_and_consumes_the_slot() {
        let a = pending(Kind::Logs, 1);
        let b = pending(Kind::Logs, 1);
        let mut fifo = VecDeque::from([a, b]);
        // The daemon answered b first: out of order.
        let m = match_answer(&mut fifo, &Message::ack(b.id, AckStatus::Accepted));
        assert!(matches!(m, Matched::Protocol(p, _) if p == a), "{m:?}");
        assert_eq!(fifo.len(), 1);
    }

    #[test]
    fn pings_queries_and_errors() {
        let ping = pending(Kind::Ping, 0);
        let query = pending(Kind::Query, 0);
        let log = pending(Kind::Logs, 1);
        let mut fifo = VecDeque::from([ping, query, log]);
        assert_eq!(
            match_answer(&mut fifo, &Message::ack(ping.id, AckStatus::Accepted)),
            Matched::Answered(ping)
        );
        let results = Message::answer(Payload::LogResults {
            entries: Vec::new(),
            total_count: 0,
        });
        assert_eq!(match_answer(&mut fifo, &results), Matched::Answered(query));
        let err = Message::error(ErrorCode::RateLimited, "slow down");
        assert!(matches!(
            match_answer(&mut fifo, &err),
            Matched::Error(p, msg) if p == log && msg.contains("slow down")
        ));
        // A LogResults answering a log is a protocol error.
        let mut fifo = VecDeque::from([log]);
        assert!(matches!(
            match_answer(&mut fifo, &results),
            Matched::Protocol(..)
        ));
    }
}
