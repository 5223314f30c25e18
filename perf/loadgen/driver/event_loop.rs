//! The mio loop of one driver thread: it sends what is due, reads and writes
//! the sockets as they become ready, and at the end gives up on whatever is
//! still unanswered.

use super::conn::{ConnState, Role};
use super::results::ThreadResult;
use super::Driver;
use crate::args::DRAIN_WAIT;
use crate::fifo::match_answer;
use codi_monitor::proto::{decode_message, frame_body_len};
use mio::Events;
use std::cmp::Reverse;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// How often a thread publishes its latencies for the progress line.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// Bytes read per `read` call.
pub(super) const READ_CHUNK: usize = 64 * 1024;

impl Driver {
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

    /// Writes what `key` has buffered until the socket would block.
    pub(super) fn write_out(&mut self, key: usize) {
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
}
