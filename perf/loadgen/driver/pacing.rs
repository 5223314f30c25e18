//! Pacing: which frames a connection sends and when. Scheduled connections
//! send each frame at its due time when the window has room (late otherwise);
//! closed-loop ones keep their window full until the load phase ends.

use super::conn::{Conn, ConnState, Role};
use super::results::count_sent;
use super::Driver;
use crate::fifo::{Kind, Pending};
use crate::payload::{restamp, set_session};
use codi_monitor::proto::{encode_message, Message};
use std::cmp::Reverse;
use std::time::Instant;

impl Driver {
    /// The load phase is over: nothing more is sent. Frames that were due
    /// but still waiting for window room are counted as unsent.
    pub(super) fn stop_sending(&mut self) {
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
    pub(super) fn send_due(&mut self, key: usize, now: Instant, late: bool) {
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
    pub(super) fn fill(&mut self, key: usize, now: Instant) {
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
