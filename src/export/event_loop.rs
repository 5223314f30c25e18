//! The watcher thread's loop: one mio `Poll` over the inotify descriptor
//! and the control waker, whose timeout drives settle re-checks and the
//! periodic scan; reading inotify's events into the queue of closed files,
//! and archiving that queue a bounded batch at a time.

use super::{ControlJob, Watcher, CLOSED_PER_TURN, EVENT_BUFFER, MAX_CLOSED_QUEUE};
use crate::metrics::Metrics;
use crossbeam_channel::Receiver;
use inotify::EventMask;
use mio::Events;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

impl Watcher {
    pub(super) fn run(mut self, control: &Receiver<ControlJob>, stop: &AtomicBool) {
        let mut events = Events::with_capacity(8);
        let mut buffer = vec![0u8; EVENT_BUFFER];
        // Catch up on what appeared while the daemon was down.
        self.full_scan();
        loop {
            self.archive_closed(&mut buffer);
            self.flush();
            let timeout = if self.closed.is_empty() {
                self.next_deadline()
                    .saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    log::error!("export watcher poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
            while let Ok(job) = control.try_recv() {
                self.control(job);
            }
            self.read_events(&mut buffer);
            self.recheck_settled();
            if Instant::now() >= self.next_scan {
                self.full_scan();
            }
            self.publish_state();
        }
        self.flush();
    }

    fn next_deadline(&self) -> Instant {
        let settle = self.settling.values().min().copied();
        match settle {
            Some(t) if t < self.next_scan => t,
            _ => self.next_scan,
        }
    }

    /// Publishes the watch gauges, and whether watching falls short: the
    /// inotify watch limit reached since the last full scan, or watched
    /// directories missing.
    fn publish_state(&self) {
        let m = &*self.metrics;
        let missing = self.roots.iter().filter(|r| !r.active).count();
        Metrics::set(&m.watched_roots, self.roots.len() as u64);
        Metrics::set(&m.watched_roots_missing, missing as u64);
        Metrics::set(&m.inotify_watches, self.watched.len() as u64);
        let condition = if self.limit_warned {
            Some(format!(
                "the inotify watch limit was reached (fs.inotify.max_user_watches): some \
                 directories are covered only by the scan every {}",
                humantime::format_duration(self.settings.scan_interval)
            ))
        } else if missing > 0 {
            Some(format!(
                "{missing} of {} watched directories are missing (deleted or moved away)",
                self.roots.len()
            ))
        } else {
            None
        };
        m.health.set(
            "exports/watches",
            condition.map(|reason| (crate::health::Severity::Degraded, reason)),
        );
    }

    pub(super) fn read_events(&mut self, buffer: &mut [u8]) {
        loop {
            let events = match self.inotify.read_events(buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("reading inotify events failed: {e}");
                    return;
                }
            };
            let mut found: Vec<PathBuf> = Vec::new();
            let mut new_dirs = Vec::new();
            let mut gone = Vec::new();
            let mut overflow = false;
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    overflow = true;
                    continue;
                }
                let Some(dir) = self.dirs.get(&event.wd).map(|w| w.path.clone()) else {
                    continue;
                };
                if event.mask.contains(EventMask::IGNORED) {
                    gone.push((event.wd.clone(), dir, true));
                    continue;
                }
                if event
                    .mask
                    .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                {
                    gone.push((event.wd.clone(), dir, false));
                    continue;
                }
                let Some(name) = event.name else { continue };
                let path = dir.join(name);
                if event.mask.contains(EventMask::ISDIR) {
                    if event
                        .mask
                        .intersects(EventMask::CREATE | EventMask::MOVED_TO)
                    {
                        new_dirs.push(path);
                    }
                } else if event
                    .mask
                    .intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO)
                {
                    found.push(path);
                }
            }
            for (wd, dir, ignored_only) in gone {
                self.forget(wd, &dir, ignored_only);
            }
            if overflow {
                Metrics::add(&self.metrics.inotify_overflows, 1);
                log::warn!("inotify event queue overflowed; rescanning every watched directory");
                self.full_scan();
            }
            for dir in new_dirs {
                if self.roots.iter().any(|r| r.covers_dir(&dir)) {
                    self.scan_dir(&dir);
                }
            }
            for path in found {
                if self.closed.len() >= MAX_CLOSED_QUEUE {
                    self.closed_overflowed = true;
                } else if self.roots.iter().any(|r| r.matches(&path))
                    && self.closed_set.insert(path.clone())
                {
                    self.closed.push_back(path);
                }
            }
        }
    }

    /// Archives the files whose close events were read, a batch at a time,
    /// reading the kernel's queue again between batches: the kernel holds
    /// only `max_queued_events` (16,384 by default), so events wait here
    /// instead, and a burst longer than the kernel's queue does not cost a
    /// full rescan. Beyond [`MAX_CLOSED_QUEUE`] files the queue is dropped
    /// and one full scan finds them instead.
    pub(super) fn archive_closed(&mut self, buffer: &mut [u8]) {
        let mut done = 0;
        while let Some(path) = self.closed.pop_front() {
            self.closed_set.remove(&path);
            if self.roots.iter().any(|r| r.matches(&path)) {
                self.consider_path(&path, false);
            }
            done += 1;
            if done % self.settings.batch_size.max(1) == 0 {
                self.read_events(buffer);
            }
            if done >= CLOSED_PER_TURN {
                // Let control requests and deadlines in.
                break;
            }
        }
        if self.closed_overflowed {
            self.closed_overflowed = false;
            self.closed.clear();
            self.closed_set.clear();
            Metrics::add(&self.metrics.inotify_overflows, 1);
            log::warn!(
                "more than {MAX_CLOSED_QUEUE} exports waiting; rescanning every watched directory"
            );
            self.full_scan();
        }
    }
}
