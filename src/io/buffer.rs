//! A connection's read buffer: explicit positions, compaction instead of
//! reallocation, growth only with the bytes that actually arrived (a header
//! announcing 1 MiB buys no memory by itself), and a hard cap of one
//! maximum frame.

use crate::proto::{HEADER_LEN, MAX_FRAME_LEN};

/// Capacity a fresh connection starts with.
pub const INITIAL_CAPACITY: usize = 4 * 1024;
/// Capacity kept after a burst; larger buffers shrink back when empty.
const RETAINED_CAPACITY: usize = 64 * 1024;
/// Room offered beyond what is buffered when growing.
pub const GROWTH_CHUNK: usize = 16 * 1024;
/// The most a read buffer ever holds: one whole maximum frame.
pub const MAX_CAPACITY: usize = HEADER_LEN + MAX_FRAME_LEN;

/// Bytes received but not yet decoded, `buf[start..end]`.
#[derive(Debug)]
pub struct ReadBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer {
            buf: vec![0; INITIAL_CAPACITY],
            start: 0,
            end: 0,
        }
    }
}

impl ReadBuffer {
    /// The undecoded bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Number of undecoded bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks `n` bytes at the front as decoded.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Makes room so that `total` undecoded bytes fit (`total` is at most
    /// [`MAX_CAPACITY`]), then returns the free tail to read into.
    pub fn spare_for(&mut self, total: usize) -> &mut [u8] {
        let total = total.clamp(1, MAX_CAPACITY);
        if self.buf.len() - self.start < total {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < total {
            self.buf.resize(total, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into the slice from
    /// [`ReadBuffer::spare_for`].
    pub fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// The capacity to hold `wanted` undecoded bytes of a frame of which
    /// `len()` have arrived: at most twice what arrived (plus one chunk),
    /// never more than `wanted` or [`MAX_CAPACITY`], never less than now.
    pub fn capacity_for(&self, wanted: usize) -> usize {
        let by_arrival = self.len().saturating_mul(2).max(self.len() + GROWTH_CHUNK);
        wanted
            .min(by_arrival)
            .clamp(1, MAX_CAPACITY)
            .max(self.buf.len())
    }

    /// Current allocation in bytes.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Gives memory back after a large frame once the buffer is empty;
    /// true if it shrank.
    pub fn shrink_if_idle(&mut self) -> bool {
        if self.is_empty() && self.buf.len() > RETAINED_CAPACITY {
            self.buf.truncate(INITIAL_CAPACITY);
            self.buf.shrink_to_fit();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_consumes_and_compacts() {
        let mut b = ReadBuffer::default();
        let spare = b.spare_for(10);
        spare[..10].copy_from_slice(b"0123456789");
        b.filled(10);
        b.consume(4);
        assert_eq!(b.data(), b"456789");
        // Asking for the whole capacity forces compaction to the front.
        let cap = b.capacity();
        let spare = b.spare_for(cap);
        assert_eq!(spare.len(), cap - 6);
        assert_eq!(b.data(), b"456789");
        b.consume(6);
        assert!(b.is_empty());
    }

    #[test]
    fn growth_follows_the_bytes_that_arrived() {
        let mut b = ReadBuffer::default();
        // A header announcing a maximum frame buys one chunk, not a MiB.
        assert_eq!(
            b.capacity_for(MAX_CAPACITY),
            INITIAL_CAPACITY.max(GROWTH_CHUNK)
        );
        let cap = b.capacity_for(MAX_CAPACITY);
        b.spare_for(cap);
        b.filled(cap);
        assert_eq!(b.capacity_for(MAX_CAPACITY), 2 * cap);
        // Never past what the frame needs.
        assert_eq!(b.capacity_for(cap + 10), cap + 10);
    }

    #[test]
    fn grows_to_a_whole_frame_and_no_further_then_shrinks() {
        let mut b = ReadBuffer::default();
        assert_eq!(b.spare_for(usize::MAX).len(), MAX_CAPACITY);
        b.filled(MAX_CAPACITY);
        assert_eq!(b.capacity(), MAX_CAPACITY);
        b.shrink_if_idle();
        assert_eq!(b.capacity(), MAX_CAPACITY, "never shrinks with data");
        b.consume(MAX_CAPACITY);
        b.shrink_if_idle();
        assert_eq!(b.capacity(), INITIAL_CAPACITY);
    }
}
