//! Answers in request order: each request takes a slot when it is read; the
//! slot is filled when its answer arrives (at once, or later from the writer
//! or a reader), and only the filled prefix is ever written out.
//!
//! Query answers are also bounded across the daemon: each `QueryLogs`
//! takes [`QUERY_ANSWER_ROOM`] from the answer pool (a budget the size of
//! `storage.inflight_bytes`) before it goes to the readers, is shrunk to
//! its answer's size once built, and gives it back once the answer has
//! been written to the socket or the connection is gone ([`AnswerRooms`]).
//! A query that finds the pool full is answered `Unavailable` at once; a
//! connection whose unwritten query answers hold
//! [`MAX_CONNECTION_ANSWER_BYTES`] is not read further until it reads
//! them. So clients that never read their answers hold at most the pool,
//! and need pool / [`MAX_CONNECTION_ANSWER_BYTES`] connections to fill it.

use crate::budget::{Holder, Reservation};
use crate::proto::{Message, HEADER_LEN, MAX_FRAME_LEN};
use crate::reply::Answer;
use std::collections::VecDeque;
use std::time::Instant;

/// What one `QueryLogs` takes from the answer pool until its answer is
/// built: one whole frame.
pub const QUERY_ANSWER_ROOM: usize = HEADER_LEN + MAX_FRAME_LEN;

/// Answer-pool bytes one connection may hold in query answers not yet
/// written out (running, waiting for their turn, or in its output buffer)
/// before it is no longer read: two whole frames.
pub const MAX_CONNECTION_ANSWER_BYTES: usize = 2 * QUERY_ANSWER_ROOM;

/// The answer pool always holds at least this many whole answers, however
/// small `storage.inflight_bytes` is, so that queries are not served one
/// at a time daemon-wide.
pub const MIN_POOL_ANSWERS: usize = 8;

/// The answer pool's size for `storage.inflight_bytes`: that many bytes,
/// but room for at least [`MIN_POOL_ANSWERS`] whole answers.
pub fn answer_pool_bytes(inflight_bytes: usize) -> usize {
    inflight_bytes.max(MIN_POOL_ANSWERS * QUERY_ANSWER_ROOM)
}

/// The answers a connection still owes, oldest first, each with the time
/// its request arrived (for the request-to-answer histogram).
#[derive(Debug, Default)]
pub struct AnswerQueue {
    /// Sequence number of the front slot.
    base: u64,
    slots: VecDeque<(Option<Answer>, Option<Instant>)>,
    /// When the request being handled arrived; `None` between requests,
    /// so that answers nobody asked for (a timeout's `Error`) go untimed.
    arrived: Option<Instant>,
}

impl AnswerQueue {
    /// The request whose answers are reserved or pushed next arrived at
    /// `at` (`None`: what follows answers no request).
    pub fn arriving(&mut self, at: Option<Instant>) {
        self.arrived = at;
    }

    /// Reserves the next slot and returns its sequence number.
    pub fn reserve(&mut self) -> u64 {
        self.slots.push_back((None, self.arrived));
        self.base + self.slots.len() as u64 - 1
    }

    /// The sequence number the next reserved slot will get.
    pub fn next_seq(&self) -> u64 {
        self.base + self.slots.len() as u64
    }

    /// Reserves a slot that is answered at once.
    pub fn push_ready(&mut self, answer: Message) {
        self.slots.push_back((Some(answer.into()), self.arrived));
    }

    /// Fills slot `seq`; false when no such slot is open (a stale answer,
    /// dropped with whatever room it holds).
    pub fn fill(&mut self, seq: u64, answer: impl Into<Answer>) -> bool {
        let answer = answer.into();
        let Some(index) = seq.checked_sub(self.base) else {
            return false;
        };
        match self.slots.get_mut(index as usize) {
            Some((slot @ None, _)) => {
                *slot = Some(answer);
                true
            }
            _ => false,
        }
    }

    /// Takes the next answer if it is ready, keeping request order, with
    /// the time its request arrived (if it answers one).
    pub fn pop_ready(&mut self) -> Option<(Answer, Option<Instant>)> {
        match self.slots.front() {
            Some((Some(_), _)) => {
                self.base += 1;
                let (answer, arrived) = self.slots.pop_front()?;
                Some((answer?, arrived))
            }
            _ => None,
        }
    }

    /// True when the oldest owed answer is ready to go.
    pub fn front_ready(&self) -> bool {
        matches!(self.slots.front(), Some((Some(_), _)))
    }

    /// Answers still owed (ready or not).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when nothing is owed.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// The answer-pool room one connection holds (see the module docs): its
/// total across running queries and waiting answers, and the rooms of
/// answers already in its output buffer, each released once the buffer has
/// been written past the answer's end.
#[derive(Debug, Default)]
pub struct AnswerRooms {
    holder: Holder,
    /// (end of the answer in the output buffer, its room), oldest first.
    unsent: VecDeque<(usize, Reservation)>,
}

impl AnswerRooms {
    /// The connection's running total, to charge new reservations to.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// True when one more query's room would take the connection past
    /// [`MAX_CONNECTION_ANSWER_BYTES`]: it must not be read until it has
    /// read some of its answers.
    pub fn full(&self) -> bool {
        self.holder.held() + QUERY_ANSWER_ROOM > MAX_CONNECTION_ANSWER_BYTES
    }

    /// An answer now ends at offset `end` of the output buffer and holds
    /// `room` until that much has been written.
    pub fn queued(&mut self, end: usize, room: Reservation) {
        self.unsent.push_back((end, room));
    }

    /// The output buffer has been written up to offset `pos`.
    pub fn written(&mut self, pos: usize) {
        while self.unsent.front().is_some_and(|(end, _)| *end <= pos) {
            self.unsent.pop_front();
        }
    }

    /// The whole output buffer has been written (and is emptied).
    pub fn all_written(&mut self) {
        self.unsent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::InflightBudget;
    use crate::proto::Payload;
    use std::sync::Arc;

    #[test]
    fn the_pool_holds_a_few_answers_however_small_the_inflight_budget() {
        assert_eq!(answer_pool_bytes(1 << 20), 8 * QUERY_ANSWER_ROOM);
        assert_eq!(answer_pool_bytes(64 << 20), 64 << 20);
    }

    fn msg() -> Message {
        Message::new(Payload::Ping)
    }

    #[test]
    fn answers_leave_in_request_order() {
        let mut q = AnswerQueue::default();
        let a = q.reserve();
        let b = q.reserve();
        q.push_ready(msg());
        assert!(q.pop_ready().is_none(), "a is not answered yet");
        assert!(q.fill(b, msg()));
        assert!(q.pop_ready().is_none(), "b must wait for a");
        assert!(q.fill(a, msg()));
        assert_eq!(q.len(), 3);
        assert!(q.pop_ready().is_some());
        assert!(q.pop_ready().is_some());
        assert!(q.pop_ready().is_some());
        assert!(q.is_empty());
    }

    #[test]
    fn answers_carry_their_request_s_arrival() {
        let mut q = AnswerQueue::default();
        let t = Instant::now();
        q.arriving(Some(t));
        let a = q.reserve();
        q.push_ready(msg());
        q.arriving(None);
        q.push_ready(msg());
        assert!(q.fill(a, msg()));
        assert_eq!(q.pop_ready().unwrap().1, Some(t));
        assert_eq!(q.pop_ready().unwrap().1, Some(t));
        assert_eq!(q.pop_ready().unwrap().1, None, "answers no request");
    }

    #[test]
    fn stale_and_double_fills_are_refused() {
        let mut q = AnswerQueue::default();
        let a = q.reserve();
        assert!(q.fill(a, msg()));
        assert!(!q.fill(a, msg()), "already filled");
        assert!(q.pop_ready().is_some());
        assert!(!q.fill(a, msg()), "already sent");
        assert!(!q.fill(a + 5, msg()), "never reserved");
    }

    #[test]
    fn rooms_are_released_as_the_output_is_written() {
        let pool = Arc::new(InflightBudget::new(64 * QUERY_ANSWER_ROOM));
        let mut rooms = AnswerRooms::default();
        assert!(!rooms.full());
        let a = pool.try_reserve(QUERY_ANSWER_ROOM, rooms.holder()).unwrap();
        assert!(!rooms.full(), "a second query still fits");
        let mut b = pool.try_reserve(QUERY_ANSWER_ROOM, rooms.holder()).unwrap();
        assert!(rooms.full());
        b.shrink_to(100);
        assert!(
            rooms.full(),
            "one frame and a bit held: no room for another frame"
        );
        rooms.queued(1000, a);
        rooms.queued(1100, b);
        rooms.written(999);
        assert_eq!(pool.used(), QUERY_ANSWER_ROOM + 100);
        rooms.written(1000);
        assert_eq!(pool.used(), 100);
        assert!(!rooms.full());
        rooms.all_written();
        assert_eq!((pool.used(), rooms.holder().held()), (0, 0));
    }

    #[test]
    fn a_stale_answer_gives_its_room_back() {
        let pool = Arc::new(InflightBudget::new(4 * QUERY_ANSWER_ROOM));
        let holder = Holder::default();
        let mut q = AnswerQueue::default();
        let frame = |room| Answer::Frame {
            bytes: vec![1, 0, 0, 0, 0xc0],
            room: Some(room),
        };
        let room = pool.try_reserve(10, &holder).unwrap();
        assert!(!q.fill(3, frame(room)), "never reserved");
        assert_eq!(pool.used(), 0);
        let seq = q.reserve();
        assert!(q.fill(seq, frame(pool.try_reserve(10, &holder).unwrap())));
        assert_eq!(pool.used(), 10);
        drop(q);
        assert_eq!(
            (pool.used(), holder.held()),
            (0, 0),
            "dropped with the queue"
        );
    }
}
