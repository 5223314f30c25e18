//! Answers in request order: each request takes a slot when it is read; the
//! slot is filled when its answer arrives (at once, or later from the writer
//! or a reader), and only the filled prefix is ever written out.

use crate::proto::Message;
use std::collections::VecDeque;

/// The answers a connection still owes, oldest first.
#[derive(Debug, Default)]
pub struct AnswerQueue {
    /// Sequence number of the front slot.
    base: u64,
    slots: VecDeque<Option<Message>>,
}

impl AnswerQueue {
    /// Reserves the next slot and returns its sequence number.
    pub fn reserve(&mut self) -> u64 {
        self.slots.push_back(None);
        self.base + self.slots.len() as u64 - 1
    }

    /// The sequence number the next reserved slot will get.
    pub fn next_seq(&self) -> u64 {
        self.base + self.slots.len() as u64
    }

    /// Reserves a slot that is answered at once.
    pub fn push_ready(&mut self, answer: Message) {
        self.slots.push_back(Some(answer));
    }

    /// Fills slot `seq`; false when no such slot is open (a stale answer).
    pub fn fill(&mut self, seq: u64, answer: Message) -> bool {
        let Some(index) = seq.checked_sub(self.base) else {
            return false;
        };
        match self.slots.get_mut(index as usize) {
            Some(slot @ None) => {
                *slot = Some(answer);
                true
            }
            _ => false,
        }
    }

    /// Takes the next answer if it is ready, keeping request order.
    pub fn pop_ready(&mut self) -> Option<Message> {
        match self.slots.front() {
            Some(Some(_)) => {
                self.base += 1;
                self.slots.pop_front().flatten()
            }
            _ => None,
        }
    }

    /// True when the oldest owed answer is ready to go.
    pub fn front_ready(&self) -> bool {
        matches!(self.slots.front(), Some(Some(_)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Payload;

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
    fn stale_and_double_fills_are_refused() {
        let mut q = AnswerQueue::default();
        let a = q.reserve();
        assert!(q.fill(a, msg()));
        assert!(!q.fill(a, msg()), "already filled");
        assert!(q.pop_ready().is_some());
        assert!(!q.fill(a, msg()), "already sent");
        assert!(!q.fill(a + 5, msg()), "never reserved");
    }
}
