//! The daemon's health, evaluated in one place for all three ways of
//! asking: the protocol's `GetStatus` (and so `codi2 status`) and the admin
//! endpoint's `GET /health`. [`evaluate`] reads the health table and the
//! counters; [`Report`] is the answer, as a `Status` payload or as the
//! `/health` JSON, and is rebuilt from a `Status` payload on the client
//! side, so every consumer derives the overall state the same way.

use super::watchdog::StorageSample;
use super::{Severity, Trouble};
use crate::budget::InflightBudget;
use crate::metrics::Metrics;
use crate::proto::{ComponentStatus, Payload, Timestamp};
use crate::store::watermarks::Watermarks;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The daemon's version, as `/health` and `Status` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A writer whose every write transaction failed for
/// [`HealthSettings::failing_for`] is failed (not only degraded) once it
/// has failed at least this many times.
pub const FAILURES_BEFORE_FAILED: u64 = 3;

/// Thresholds of the health evaluation (`[health]` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// The database's filesystem is nearly full below this many free bytes.
    pub disk_min_free_bytes: u64,
    /// ... or below this percentage of its size.
    pub disk_min_free_percent: u32,
    /// Every write transaction failing for this long makes the writer
    /// failed, and the daemon unhealthy.
    pub failing_for: Duration,
    /// The writer's job queue capacity (for the backlog check).
    pub queue_capacity: usize,
    /// Connections the daemon accepts at once (as fitted at start).
    pub max_connections: usize,
}

/// Everything the evaluation reads, shared by the event loops, the admin
/// endpoint and the watchdog.
#[derive(Debug)]
pub struct Sources {
    /// Counters and the health table.
    pub metrics: Arc<Metrics>,
    /// Bytes of requests accepted and not yet answered.
    pub budget: Arc<InflightBudget>,
    /// Bytes of query answers not yet written out.
    pub answer_pool: Arc<InflightBudget>,
    /// When the daemon started.
    pub started: Instant,
    /// Thresholds.
    pub settings: HealthSettings,
    /// The database file (its directory's filesystem is watched).
    pub db: PathBuf,
    /// The watchdog's latest look at the database's files and filesystem.
    pub storage: Mutex<Option<StorageSample>>,
    /// What the admin endpoint does (where it listens, or that it is off).
    pub admin: Mutex<String>,
    /// Where hub sync ships to, or that it is off.
    pub hub: Mutex<String>,
    /// Where log ids stand in storage.
    pub watermarks: Arc<Watermarks>,
}

/// The health answer: the daemon's version and uptime and each component.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The daemon's version (unknown for a daemon too old to say).
    pub version: Option<String>,
    /// Time since the daemon started.
    pub uptime: Duration,
    /// Each component, in a fixed order.
    pub components: Vec<ComponentStatus>,
}

/// `healthy`, `degraded` or `failed`, as components say it.
fn level_name(level: Option<Severity>) -> &'static str {
    match level {
        None => "healthy",
        Some(Severity::Degraded) => "degraded",
        Some(Severity::Failed) => "failed",
    }
}

impl Report {
    /// The overall state: `unhealthy` if any component failed, `degraded`
    /// if any is not healthy (a status this version does not know counts
    /// as degraded), else `healthy`.
    pub fn status(&self) -> &'static str {
        if self.components.iter().any(|c| c.status == "failed") {
            "unhealthy"
        } else if self.components.iter().any(|c| c.status != "healthy") {
            "degraded"
        } else {
            "healthy"
        }
    }

    /// True when the admin endpoint answers `/health` with 503.
    pub fn unhealthy(&self) -> bool {
        self.status() == "unhealthy"
    }

    /// The `/health` JSON (and `codi2 status --json`): `status`, `version`,
    /// `uptime_seconds` and `components`, a map of name to `status`,
    /// `reason`, `since` and `message`.
    pub fn to_json(&self) -> Value {
        let components: Map<String, Value> = self
            .components
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    json!({
                        "status": c.status,
                        "reason": c.reason,
                        "since": c.since.map(Timestamp::to_rfc3339),
                        "message": c.message,
                    }),
                )
            })
            .collect();
        json!({
            "status": self.status(),
            "version": self.version,
            "uptime_seconds": self.uptime.as_secs(),
            "components": components,
        })
    }

    /// [`Report::to_json`] as one line of text, with the characters a
    /// terminal could act on (DEL, C1 controls, bidirectional overrides)
    /// written as `\uXXXX` escapes: what `/health` answers and
    /// `codi2 status --json` prints.
    pub fn to_json_line(&self) -> String {
        let text = self.to_json().to_string();
        crate::text::json_escape_unsafe(&text).into_owned()
    }

    /// The `Status` answer.
    pub fn into_payload(self) -> Payload {
        Payload::Status {
            components: self.components,
            uptime: self.uptime,
            version: self.version,
        }
    }

    /// The report a `Status` answer carries; `None` for another payload.
    pub fn from_payload(payload: Payload) -> Option<Report> {
        match payload {
            Payload::Status {
                components,
                uptime,
                version,
            } => Some(Report {
                version,
                uptime,
                components,
            }),
            _ => None,
        }
    }
}

/// One component from its troubles and its key figures: the worst
/// severity, every reason, the earliest start.
fn component(name: &str, troubles: &[(&'static str, Trouble)], figures: String) -> ComponentStatus {
    let level = troubles.iter().map(|(_, t)| t.severity).max();
    let reason = (!troubles.is_empty()).then(|| {
        troubles
            .iter()
            .map(|(_, t)| match t.failures {
                0 => t.reason.clone(),
                n => format!("{} ({n} failures)", t.reason),
            })
            .collect::<Vec<_>>()
            .join("; ")
    });
    let since = troubles.iter().map(|(_, t)| t.since).min();
    let message = match (&reason, since) {
        (Some(r), Some(s)) => format!("{r} (since {s}); {figures}"),
        _ => figures,
    };
    ComponentStatus {
        name: name.into(),
        status: level_name(level).into(),
        message,
        reason,
        since,
    }
}

/// A writer failing every transaction for `failing_for` (at least
/// [`FAILURES_BEFORE_FAILED`] times) is failed, not only degraded.
fn escalate_writer(
    troubles: &mut [(&'static str, Trouble)],
    failing_for: Duration,
    now: Timestamp,
) {
    for (name, t) in troubles.iter_mut() {
        let failing = Duration::from_micros(
            u64::try_from(now.as_micros().saturating_sub(t.since.as_micros())).unwrap_or(0),
        );
        if *name == "writer" && t.failures >= FAILURES_BEFORE_FAILED && failing >= failing_for {
            t.severity = Severity::Failed;
            t.reason = format!(
                "{}; no write transaction has succeeded for {}",
                t.reason,
                humantime::format_duration(Duration::from_secs(failing.as_secs()))
            );
        }
    }
}

/// Bytes as a short readable figure.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The daemon's health now, as the operator sees it (`/health`, root's
/// `GetStatus`).
pub fn evaluate(src: &Sources) -> Report {
    evaluate_for(src, true)
}

/// The daemon's health now; without `sees_all` (a client who may see only
/// its own logs), leaving out the count of exports whose content was
/// already archived: a user who exports a guess would learn from it that
/// someone else exported exactly that.
pub fn evaluate_for(src: &Sources, sees_all: bool) -> Report {
    let m = &*src.metrics;
    let get = Metrics::get;
    let h = &m.health;
    let mut writer_troubles = h.of_component("writer");
    escalate_writer(
        &mut writer_troubles,
        src.settings.failing_for,
        Timestamp::now(),
    );
    let storage = src.storage.lock().clone();
    let components = vec![
        component(
            "ipc",
            &h.of_component("ipc"),
            format!(
                "{} connections open, {} accepted, {} refused, {} frames received, {} invalid",
                get(&m.connections_open),
                get(&m.connections_accepted),
                get(&m.connections_refused),
                get(&m.frames_received),
                get(&m.frames_invalid)
            ),
        ),
        component(
            "writer",
            &writer_troubles,
            format!(
                "{} logs stored, {} duplicates, {} rejected, {} commits, {} commit errors, \
                 {} of {} bytes in flight, {} jobs queued",
                get(&m.logs_stored),
                get(&m.logs_duplicate),
                m.logs_rejected(),
                get(&m.commits),
                get(&m.commit_errors),
                src.budget.used(),
                src.budget.limit(),
                get(&m.writer_queue_depth)
            ),
        ),
        component(
            "readers",
            &h.of_component("readers"),
            format!(
                "{} queries answered, {} refused for a full answer pool, \
                 {} of {} answer bytes held, {} rows cut to fit",
                get(&m.queries),
                get(&m.queries_refused),
                src.answer_pool.used(),
                src.answer_pool.limit(),
                get(&m.rows_cut)
            ),
        ),
        component(
            "merger",
            &h.of_component("merger"),
            format!(
                "{} logs moved into the indexed table in {} merges; \
                 {} batches written straight into it; retention deleted {} logs, \
                 {} sessions and {} export rows; {} sessions timed out; {} logs rotated \
                 out for the size cap, {} for a nearly full disk",
                get(&m.logs_merged),
                get(&m.merges),
                get(&m.indexed_commits),
                get(&m.logs_expired),
                get(&m.sessions_expired),
                get(&m.exports_expired),
                get(&m.sessions_timed_out),
                get(&m.logs_rotated_cap),
                get(&m.logs_rotated_disk)
            ),
        ),
        component(
            "exports",
            &h.of_component("exports"),
            format!(
                "{} archived, {}{} errors, {} scans, \
                 {} queue overflows, {} watch-limit errors, {} watch-cap hits, \
                 {} watched directories lost; {} watched trees ({} missing), {} inotify watches",
                get(&m.exports_archived),
                if sees_all {
                    format!(
                        "{} with content already archived, ",
                        get(&m.exports_deduplicated)
                    )
                } else {
                    String::new()
                },
                get(&m.export_errors),
                get(&m.export_scans),
                get(&m.inotify_overflows),
                get(&m.watch_limit_errors),
                get(&m.watch_cap_hits),
                get(&m.watched_dirs_lost),
                get(&m.watched_roots),
                get(&m.watched_roots_missing),
                get(&m.inotify_watches)
            ),
        ),
        component(
            "storage",
            &h.of_component("storage"),
            match storage {
                Some(s) => s.summary(),
                None => "not measured yet".into(),
            },
        ),
        component(
            "watchdog",
            &h.of_component("watchdog"),
            match m.heartbeats.limit() {
                None => "off: systemd asked for no watchdog pings (WatchdogSec)".into(),
                Some(limit) => format!(
                    "{} pings sent to systemd, {} withheld; every event loop and the writer \
                     must show progress within {}",
                    get(&m.watchdog_pings),
                    get(&m.watchdog_withheld),
                    humantime::format_duration(limit)
                ),
            },
        ),
        component(
            "admin",
            &h.of_component("admin"),
            format!(
                "{}; {} requests answered, {} refused, {} dropped",
                src.admin.lock(),
                get(&m.admin_requests),
                get(&m.admin_bad_requests),
                get(&m.admin_dropped)
            ),
        ),
        component(
            "hub",
            &h.of_component("hub"),
            format!(
                "{}; {} batches with {} rows shipped, {} failed sends, oldest log not on the hub \
                 {} s old",
                src.hub.lock(),
                get(&m.sync_batches),
                get(&m.sync_rows),
                get(&m.sync_failures),
                get(&m.sync_lag_seconds)
            ),
        ),
    ];
    Report {
        version: Some(VERSION.into()),
        uptime: src.started.elapsed(),
        components,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sources() -> Sources {
        Sources {
            metrics: Arc::new(Metrics::default()),
            budget: Arc::new(InflightBudget::new(1000)),
            answer_pool: Arc::new(InflightBudget::new(1000)),
            started: Instant::now(),
            settings: HealthSettings {
                disk_min_free_bytes: 256 << 20,
                disk_min_free_percent: 5,
                failing_for: Duration::from_secs(30),
                queue_capacity: 100,
                max_connections: 10,
            },
            db: PathBuf::from("/nonexistent/codi.db"),
            storage: Mutex::new(None),
            admin: Mutex::new("off".into()),
            hub: Mutex::new("off".into()),
            watermarks: Arc::new(Watermarks::default()),
        }
    }

    fn status_of<'a>(r: &'a Report, name: &str) -> &'a ComponentStatus {
        r.components.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn all_healthy_without_troubles() {
        let r = evaluate(&sources());
        assert_eq!(r.status(), "healthy");
        let names: Vec<&str> = r.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ipc", "writer", "readers", "merger", "exports", "storage", "watchdog", "admin",
                "hub"
            ]
        );
        assert!(r
            .components
            .iter()
            .all(|c| c.reason.is_none() && c.since.is_none()));
        let j = r.to_json();
        assert_eq!(j["status"], "healthy");
        assert_eq!(j["version"], VERSION);
        assert_eq!(j["components"]["writer"]["status"], "healthy");
        assert!(j["components"]["writer"]["reason"].is_null());
    }

    #[test]
    fn troubles_degrade_their_component_with_every_reason() {
        let src = sources();
        let h = &src.metrics.health;
        h.fail("writer", "write transactions fail: disk I/O error");
        h.set(
            "writer/backlog",
            Some((Severity::Degraded, "90% of the in-flight budget".into())),
        );
        let r = evaluate(&src);
        assert_eq!(r.status(), "degraded");
        let w = status_of(&r, "writer");
        assert_eq!(w.status, "degraded");
        let reason = w.reason.as_deref().unwrap();
        assert!(reason.contains("disk I/O error (1 failures)"), "{reason}");
        assert!(reason.contains("90% of the in-flight budget"), "{reason}");
        assert!(w.message.starts_with(reason), "{}", w.message);
        assert_eq!(status_of(&r, "readers").status, "healthy");
    }

    #[test]
    fn a_failed_condition_makes_the_daemon_unhealthy() {
        let src = sources();
        src.metrics
            .health
            .set("storage/disk", Some((Severity::Failed, "full".into())));
        let r = evaluate(&src);
        assert_eq!(status_of(&r, "storage").status, "failed");
        assert!(r.unhealthy());
        assert_eq!(r.to_json()["status"], "unhealthy");
    }

    #[test]
    fn a_writer_failing_long_enough_is_failed() {
        let src = sources();
        let h = &src.metrics.health;
        for _ in 0..FAILURES_BEFORE_FAILED {
            h.fail(
                "writer",
                "write transactions fail: database or disk is full",
            );
        }
        let mut troubles = h.of_component("writer");
        let later = Timestamp::from_micros(Timestamp::now().as_micros() + 31_000_000);
        escalate_writer(&mut troubles, Duration::from_secs(30), later);
        assert_eq!(troubles[0].1.severity, Severity::Failed);
        assert!(troubles[0]
            .1
            .reason
            .contains("no write transaction has succeeded for 31s"));
        // Not long enough, or too few failures: still only degraded.
        let mut troubles = h.of_component("writer");
        escalate_writer(&mut troubles, Duration::from_secs(30), Timestamp::now());
        assert_eq!(troubles[0].1.severity, Severity::Degraded);
        h.recover("writer");
        h.fail("writer", "once");
        let mut troubles = h.of_component("writer");
        escalate_writer(&mut troubles, Duration::from_secs(30), later);
        assert_eq!(troubles[0].1.severity, Severity::Degraded);
    }

    #[test]
    fn the_payload_round_trip_keeps_the_report() {
        let src = sources();
        src.metrics.health.fail("merger", "merges fail");
        let r = evaluate(&src);
        let again = Report::from_payload(r.clone().into_payload()).unwrap();
        assert_eq!(again, r);
        assert_eq!(again.to_json_line(), r.to_json_line());
        assert!(!r.to_json_line().contains('\n'));
        assert_eq!(Report::from_payload(Payload::Ping), None);
    }

    #[test]
    fn unknown_component_states_count_as_degraded() {
        let mut r = evaluate(&sources());
        r.components[0].status = "sleepy".into();
        assert_eq!(r.status(), "degraded");
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(256 << 20), "256.0 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
