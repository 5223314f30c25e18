//! Thread priorities. The event loops are latency-critical and brief; the
//! writer and the checkpointer are throughput-bound and can use a whole
//! core. On a small machine they share cores, so the bulk threads run at a
//! lower priority (a higher nice value; Linux keeps it per thread) and a
//! loop that wakes with an answer to send preempts them at once.

/// Nice value of the writer thread.
pub const WRITER_NICE: i32 = 5;
/// Nice value of the checkpointer thread.
pub const CHECKPOINTER_NICE: i32 = 10;

/// Lowers the calling thread's priority to `nice`; a failure is only logged
/// (the thread then just keeps its priority).
pub fn lower_current_thread_priority(nice: i32) {
    // SAFETY: setpriority with PRIO_PROCESS and who = 0 changes only the
    // calling thread's nice value on Linux.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        log::debug!(
            "cannot lower thread priority to nice {nice}: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_only_the_calling_thread() {
        let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let inside = std::thread::spawn(move || {
            lower_current_thread_priority(before + 3);
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        })
        .join()
        .unwrap();
        assert_eq!(inside, before + 3);
        assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, before);
    }
}
