//! Telling systemd how the daemon is doing (`Type=notify`), through the
//! `sd-notify` crate: `READY=1` once every listener is bound and the
//! database is open and migrated, `RELOADING=1` and `READY=1` around a
//! SIGHUP reload, `STOPPING=1` when the drain begins, `STATUS=` lines
//! (what it listens on, then a short health summary), and `WATCHDOG=1`
//! pings.
//!
//! The pings come from a supervisor thread, and only while every event loop
//! and the writer make progress (see [`crate::heartbeat`]): when one is
//! stuck (the writer blocked in SQLite on another connection's lock while
//! logs wait, a loop that no longer comes round), the supervisor logs which
//! one, marks the `watchdog` component degraded for `Status`, and withholds
//! the pings, so systemd kills and restarts the daemon after `WatchdogSec`.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd, or not `Type=notify`)
//! none of this happens: no thread, no message, no bounded poll timeouts.

use crate::heartbeat::{Heartbeats, Stuck};
use crate::metrics::Metrics;
use crate::text::escape_controls;
use crossbeam_channel::{RecvTimeoutError, Sender};
use sd_notify::NotifyState;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Name of the supervisor thread.
pub const SUPERVISOR_THREAD: &str = "codi-notify";
/// How often the `STATUS=` summary is refreshed.
pub const STATUS_EVERY: Duration = Duration::from_secs(10);
/// How often a component that stays stuck is logged again.
const REPEAT_STUCK_LOG: Duration = Duration::from_secs(30);

/// The service manager's notification socket, if the daemon has one; every
/// method does nothing when it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and, through the crate, `$WATCHDOG_USEC`
    /// (which counts only if `$WATCHDOG_PID` is unset or names this
    /// process). Without `$NOTIFY_SOCKET` there is no watchdog either: it
    /// could not be pinged.
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        Notifier {
            enabled,
            watchdog: sd_notify::watchdog_enabled()
                .filter(|w| enabled && !w.is_zero())
                .map(|w| w.max(Duration::from_millis(2))),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            watchdog: None,
        }
    }

    /// Whether there is a service manager to tell.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// systemd's watchdog interval (`WatchdogSec`), if it wants pings.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// How long a component may go without progress before the pings
    /// stop: half the watchdog interval, the same as the pings' period, so
    /// systemd kills a stuck daemon between one and two intervals after it
    /// got stuck.
    pub fn progress_limit(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Holds the components registered in `heartbeats` to
    /// [`progress_limit`](Self::progress_limit), if there is a watchdog.
    /// Call before the components start.
    pub fn arm(&self, heartbeats: &Heartbeats) {
        if let Some(limit) = self.progress_limit() {
            heartbeats.watch(limit);
        }
    }

    /// `READY=1` with `status`.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
    }

    /// `RELOADING=1`, with the `MONOTONIC_USEC=` that systemd 253 and later
    /// require beside it; follow with [`ready`](Self::ready).
    pub fn reloading(&self) {
        if !self.enabled {
            return;
        }
        let mut states = vec![
            NotifyState::Reloading,
            NotifyState::Status("reloading the configuration"),
        ];
        match NotifyState::monotonic_usec_now() {
            Ok(now) => states.push(now),
            Err(e) => log::warn!("cannot read the monotonic clock for systemd: {e}"),
        }
        self.send(&states);
    }

    /// `STOPPING=1`: the drain has begun.
    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: draining connections"),
        ]);
    }

    /// `STATUS=` with `status`.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(&one_line(status))]);
    }

    fn ping(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            log::warn!("cannot notify systemd: {e}");
        }
    }

    /// Starts the supervisor thread, if there is a service manager: it
    /// refreshes the status summary and, with a watchdog, pings it while
    /// every component makes progress, until [`Supervisor::stop`] or until
    /// `shutdown` is set.
    pub fn supervise(
        &self,
        metrics: Arc<Metrics>,
        shutdown: Arc<AtomicBool>,
    ) -> io::Result<Option<Supervisor>> {
        if !self.enabled {
            return Ok(None);
        }
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let mut watch = Watch::new(*self, metrics);
        let handle = thread::Builder::new()
            .name(SUPERVISOR_THREAD.into())
            .spawn(move || {
                let period = watch.period();
                loop {
                    if shutdown.load(Ordering::Acquire) {
                        break;
                    }
                    watch.check(Instant::now());
                    match stopped.recv_timeout(period) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            })?;
        Ok(Some(Supervisor { stop, handle }))
    }
}

/// The running supervisor thread.
#[derive(Debug)]
pub struct Supervisor {
    stop: Sender<()>,
    handle: JoinHandle<()>,
}

impl Supervisor {
    /// Stops the thread and waits for it.
    pub fn stop(self) {
        drop(self.stop);
        if self.handle.join().is_err() {
            log::error!("the systemd notification thread panicked");
        }
    }
}

/// The supervisor's state between two checks.
struct Watch {
    notifier: Notifier,
    metrics: Arc<Metrics>,
    /// The components found stuck at the last check, and when they were
    /// last logged.
    alarm: Option<(Vec<String>, Instant)>,
    last_summary: Option<Instant>,
}

impl Watch {
    fn new(notifier: Notifier, metrics: Arc<Metrics>) -> Self {
        Watch {
            notifier,
            metrics,
            alarm: None,
            last_summary: None,
        }
    }

    /// Time between two checks: the pings' period (half the watchdog
    /// interval), or the summary's.
    fn period(&self) -> Duration {
        self.notifier
            .progress_limit()
            .map_or(STATUS_EVERY, |p| p.min(STATUS_EVERY))
    }

    fn check(&mut self, now: Instant) {
        let Some(limit) = self.notifier.progress_limit() else {
            self.summarize(now);
            return;
        };
        let stuck = self.metrics.heartbeats.stuck(now, limit);
        if stuck.is_empty() {
            self.notifier.ping();
            Metrics::add(&self.metrics.watchdog_pings, 1);
            if self.alarm.take().is_some() {
                self.metrics.health.recover("watchdog");
                log::info!("every component makes progress again; watchdog pings resumed");
                self.last_summary = None;
            }
            self.summarize(now);
        } else {
            Metrics::add(&self.metrics.watchdog_withheld, 1);
            self.alarm(&stuck, now);
        }
    }

    /// Records, logs (when the set changes, and then every
    /// [`REPEAT_STUCK_LOG`]) and reports the stuck components.
    fn alarm(&mut self, stuck: &[Stuck], now: Instant) {
        let what = stuck
            .iter()
            .map(Stuck::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let names: Vec<String> = stuck.iter().map(|s| s.name.clone()).collect();
        let log_now = match &self.alarm {
            Some((before, at)) => {
                *before != names || now.saturating_duration_since(*at) >= REPEAT_STUCK_LOG
            }
            None => true,
        };
        if log_now {
            log::error!(
                "{what}: withholding systemd watchdog pings, so systemd restarts the daemon unless it recovers"
            );
            self.alarm = Some((names, now));
        }
        self.metrics
            .health
            .fail("watchdog", format!("{what}; watchdog pings withheld"));
        self.notifier.status(&format!("stuck: {what}"));
    }

    /// Refreshes the `STATUS=` summary every [`STATUS_EVERY`].
    fn summarize(&mut self, now: Instant) {
        if self
            .last_summary
            .is_some_and(|at| now.saturating_duration_since(at) < STATUS_EVERY)
        {
            return;
        }
        self.last_summary = Some(now);
        self.notifier.status(&summary(&self.metrics));
    }
}

/// A short health summary for `systemctl status`.
pub fn summary(metrics: &Metrics) -> String {
    let get = Metrics::get;
    let mut line = format!(
        "serving: {} connections open, {} logs stored, {} queries answered",
        get(&metrics.connections_open),
        get(&metrics.logs_stored),
        get(&metrics.queries)
    );
    let degraded = metrics.health.degraded();
    if degraded.is_empty() {
        line.push_str("; all components healthy");
    } else {
        line.push_str("; degraded: ");
        let parts: Vec<String> = degraded
            .iter()
            .map(|(name, d)| format!("{name} ({})", d.reason))
            .collect();
        line.push_str(&parts.join(", "));
    }
    line
}

/// `text` made safe for one `STATUS=` assignment: a newline would end it.
fn one_line(text: &str) -> String {
    escape_controls(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn armed(watchdog: Duration) -> Notifier {
        // Enabled would send datagrams; the checks below only look at the
        // state the supervisor keeps.
        Notifier {
            enabled: false,
            watchdog: Some(watchdog),
        }
    }

    #[test]
    fn pings_are_withheld_while_a_component_is_stuck_and_resume_after() {
        let notifier = armed(Duration::from_secs(2));
        let metrics = Arc::new(Metrics::default());
        notifier.arm(&metrics.heartbeats);
        assert_eq!(metrics.heartbeats.limit(), Some(Duration::from_secs(1)));
        let writer = metrics.heartbeats.register("writer", "is stalled");
        let mut watch = Watch::new(notifier, Arc::clone(&metrics));
        let start = Instant::now();
        watch.check(start);
        assert_eq!(Metrics::get(&metrics.watchdog_pings), 1);
        assert!(metrics.health.get("watchdog").is_none());

        // No beat for longer than the limit: no ping, and Status says why.
        watch.check(start + Duration::from_secs(3));
        watch.check(start + Duration::from_secs(4));
        assert_eq!(Metrics::get(&metrics.watchdog_pings), 1);
        assert_eq!(Metrics::get(&metrics.watchdog_withheld), 2);
        let degraded = metrics.health.get("watchdog").expect("degraded");
        assert!(
            degraded.reason.contains("writer is stalled"),
            "{degraded:?}"
        );

        writer.beat();
        watch.check(Instant::now());
        assert_eq!(Metrics::get(&metrics.watchdog_pings), 2);
        assert!(metrics.health.get("watchdog").is_none());
    }

    #[test]
    fn without_a_watchdog_nothing_is_checked_or_counted() {
        let metrics = Arc::new(Metrics::default());
        let notifier = Notifier::disabled();
        notifier.arm(&metrics.heartbeats);
        assert_eq!(metrics.heartbeats.limit(), None);
        let _stuck_forever = metrics.heartbeats.register("writer", "is stalled");
        let mut watch = Watch::new(notifier, Arc::clone(&metrics));
        watch.check(Instant::now() + Duration::from_secs(3600));
        assert_eq!(Metrics::get(&metrics.watchdog_pings), 0);
        assert_eq!(Metrics::get(&metrics.watchdog_withheld), 0);
        assert_eq!(watch.period(), STATUS_EVERY);
    }

    #[test]
    fn the_summary_names_degraded_components_on_one_line() {
        let metrics = Metrics::default();
        assert!(summary(&metrics).ends_with("all components healthy"));
        metrics.health.fail("writer", "disk full");
        let line = summary(&metrics);
        assert!(line.ends_with("degraded: writer (disk full)"), "{line}");
        assert_eq!(one_line("a\nb"), "a\\nb");
    }
}
