//! The cursor of `codi2 logs --follow`: it polls for rows stored after the
//! largest row id it has been through (`after_id`).
//!
//! A follower must never stop at a row it cannot show. This daemon always
//! answers at least one entry when rows wait after the cursor (a row too
//! large for a frame comes back cut, see `store::query`); a daemon built
//! before that answered none for such a row, forever. So when rows wait
//! (`total_count > 0`) but the answer holds none, the cursor steps one id
//! further, and the next poll goes at once.

use crate::proto::StoredLog;

/// What an answer did to the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It moved past the answer's entries.
    Moved,
    /// Rows wait but none came back: it stepped past the next id.
    Skipped,
    /// Nothing new.
    Idle,
}

/// The largest row id a follower has been through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    /// Poll with `after_id` set to this.
    pub after_id: i64,
}

impl Cursor {
    /// A cursor after the entries of the first (normal) query.
    pub fn after(entries: &[StoredLog]) -> Self {
        let mut cursor = Cursor::default();
        cursor.advance(entries, 0);
        cursor
    }

    /// Moves past an answer to `after_id = self.after_id`: its `entries`
    /// and `total_count` (the matches after the cursor).
    pub fn advance(&mut self, entries: &[StoredLog], total_count: u64) -> Step {
        match entries.iter().map(|e| e.id).max() {
            Some(max) => {
                self.after_id = self.after_id.max(max);
                Step::Moved
            }
            None if total_count > 0 => {
                self.after_id = self.after_id.saturating_add(1);
                Step::Skipped
            }
            None => Step::Idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{LogLevel, Timestamp};
    use uuid::Uuid;

    fn entry(id: i64) -> StoredLog {
        StoredLog {
            id,
            uuid: Uuid::from_u128(id as u128),
            timestamp: Timestamp::from_micros(id),
            level: LogLevel::Info,
            component: "c".into(),
            session_id: None,
            message: "m".into(),
            metadata: None,
            uid: None,
        }
    }

    #[test]
    fn the_cursor_moves_past_entries_and_steps_past_rows_it_cannot_get() {
        let mut c = Cursor::after(&[entry(3), entry(5)]);
        assert_eq!(c.after_id, 5);
        assert_eq!(c.advance(&[], 0), Step::Idle);
        assert_eq!(c.after_id, 5);
        assert_eq!(c.advance(&[entry(6), entry(9)], 7), Step::Moved);
        assert_eq!(c.after_id, 9);
        // Row 10 could not be sent: step over it, then carry on.
        assert_eq!(c.advance(&[], 2), Step::Skipped);
        assert_eq!(c.after_id, 10);
        assert_eq!(c.advance(&[entry(11)], 1), Step::Moved);
        assert_eq!(c.after_id, 11);
        assert_eq!(Cursor::after(&[]).after_id, 0);
    }
}
