//! The daemon's own process figures for `/metrics`, read at scrape time:
//! CPU time (`getrusage`), memory and threads (`/proc/self/status`), open
//! descriptors (`/proc/self/fd`) and their limit.

use std::fs;
use std::time::Duration;

/// This process at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessSample {
    /// User plus system CPU time.
    pub cpu: Duration,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: u64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open descriptors (`None`: unlimited).
    pub max_fds: Option<u64>,
}

/// The value of a `/proc/self/status` line such as `VmRSS:  1234 kB`
/// (the number only).
fn status_value(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Samples this process; a figure that cannot be read is 0.
pub fn sample() -> ProcessSample {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv =
        |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let open_fds = fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    ProcessSample {
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        rss_bytes: status_value(&status, "VmRSS:").unwrap_or(0) * 1024,
        virtual_bytes: status_value(&status, "VmSize:").unwrap_or(0) * 1024,
        threads: status_value(&status, "Threads:").unwrap_or(0),
        // The directory's own descriptor is counted too.
        open_fds: open_fds.saturating_sub(1),
        max_fds: rustix::process::getrlimit(rustix::process::Resource::Nofile).current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_threads_and_descriptors() {
        let s = sample();
        assert!(s.rss_bytes > 0 && s.virtual_bytes >= s.rss_bytes, "{s:?}");
        assert!(s.threads >= 1 && s.open_fds >= 3, "{s:?}");
        let before = s.cpu;
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        assert!(sample().cpu > before);
    }

    #[test]
    fn status_lines_are_read_by_key() {
        let status = "Name:\tx\nVmRSS:\t  1234 kB\nThreads:\t7\n";
        assert_eq!(status_value(status, "VmRSS:"), Some(1234));
        assert_eq!(status_value(status, "Threads:"), Some(7));
        assert_eq!(status_value(status, "VmSize:"), None);
    }
}
