//! `GET /metrics`: every figure in the Prometheus text format (0.0.4),
//! encoded by the `prometheus-client` crate. Nothing is counted twice: one
//! collector reads the daemon's own atomics, histograms and health at
//! scrape time, and stats the database files, the filesystem and the
//! process then. The hub figures (`codi_sync_*`) stay 0 without a hub.

use super::procfs;
use crate::health::report::{self, Sources};
use crate::health::watchdog;
use crate::metrics::histogram::Snapshot;
use crate::metrics::Metrics;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A registry holding the daemon's one collector.
pub fn registry(sources: Arc<Sources>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector { sources }));
    registry
}

/// The exposition text now.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail; a collector error would be a bug.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        log::error!("cannot encode the metrics: {e}");
    }
    out
}

#[derive(Debug)]
struct DaemonCollector {
    sources: Arc<Sources>,
}

/// A histogram snapshot in a unit scaled to the base unit (nanoseconds
/// to seconds, or rows as they are).
struct HistogramValue {
    snapshot: Snapshot,
    scale: f64,
}

impl EncodeMetric for HistogramValue {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let s = &self.snapshot;
        let buckets: Vec<(f64, u64)> = s
            .bounds
            .iter()
            .map(|&b| b as f64 * self.scale)
            .chain(std::iter::once(f64::INFINITY))
            .zip(s.counts.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(s.sum as f64 * self.scale, s.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Encodes one metric without labels.
fn one(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    one(enc, name, help, &ConstCounter::new(value))
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    one(enc, name, help, &ConstGauge::new(value))
}

/// One metric family with a label `key` taking each value in `series`.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    key: &str,
    series: impl IntoIterator<Item = (&'static str, M)>,
    metric_type: MetricType,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, metric_type)?;
    for (value, metric) in series {
        let labels = [(key, value)];
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    key: &str,
    series: impl IntoIterator<Item = (&'static str, u64)>,
) -> fmt::Result {
    let series = series.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(enc, name, help, key, series, MetricType::Counter)
}

fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    key: &str,
    series: impl IntoIterator<Item = (&'static str, i64)>,
) -> fmt::Result {
    let series = series.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(enc, name, help, key, series, MetricType::Gauge)
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let src = &*self.sources;
        let m = &*src.metrics;
        let get = Metrics::get;
        let e = &mut enc;

        // Logs.
        counter(
            e,
            "codi_logs",
            "Log rows stored (new rows committed; duplicates not counted).",
            get(&m.logs_stored),
        )?;
        counter(
            e,
            "codi_logs_received",
            "Log entries handed to the writer.",
            get(&m.logs_received),
        )?;
        counter(
            e,
            "codi_logs_duplicate",
            "Log entries skipped because their id was already stored.",
            get(&m.logs_duplicate),
        )?;
        counters(
            e,
            "codi_logs_rejected",
            "Log entries rejected, nothing stored: invalid (refused on arrival) or storage (refused by the writer).",
            "reason",
            [
                ("invalid", get(&m.logs_rejected_invalid)),
                ("storage", get(&m.logs_rejected_storage)),
            ],
        )?;
        counters(
            e,
            "codi_errors",
            "Error answers sent to clients, by code.",
            "code",
            m.errors_by_code(),
        )?;
        one(
            e,
            "codi_ipc_duration_seconds",
            "From a request's frame decoded to its answer handed to the socket.",
            &HistogramValue {
                snapshot: m.ipc_duration.snapshot(),
                scale: 1e-9,
            },
        )?;

        // Connections and frames.
        gauge(
            e,
            "codi_connections_open",
            "Client connections open now.",
            int(get(&m.connections_open)),
        )?;
        counter(
            e,
            "codi_connections_accepted",
            "Client connections accepted.",
            get(&m.connections_accepted),
        )?;
        counter(
            e,
            "codi_connections_refused",
            "Client connections refused at the connection or descriptor limit.",
            get(&m.connections_refused),
        )?;
        counters(
            e,
            "codi_connections_closed",
            "Client connections closed by the daemon: idle too long, or answers left unread past the write timeout.",
            "reason",
            [("idle", get(&m.idle_closed)), ("write_timeout", get(&m.write_timeouts))],
        )?;
        counter(
            e,
            "codi_frames",
            "Frames decoded into messages.",
            get(&m.frames_received),
        )?;
        counter(
            e,
            "codi_frames_invalid",
            "Frames rejected as oversized, empty or undecodable.",
            get(&m.frames_invalid),
        )?;
        counters(
            e,
            "codi_pauses",
            "Times a connection stopped being read: backpressure, its rate limit, or a full receive pool.",
            "reason",
            [
                ("backpressure", get(&m.backpressure_pauses)),
                ("rate_limit", get(&m.rate_limit_pauses)),
                ("receive_pool", get(&m.receive_pauses)),
            ],
        )?;
        counters(
            e,
            "codi_auth",
            "TCP authentication events: failed tokens, attempts refused unchecked, timeouts, evictions.",
            "event",
            [
                ("failure", get(&m.auth_failures)),
                ("throttled", get(&m.auth_throttled)),
                ("timeout", get(&m.auth_timeouts)),
                ("evicted", get(&m.unauthenticated_evicted)),
            ],
        )?;

        // Writer.
        gauge(
            e,
            "codi_writer_queue_depth",
            "Write jobs still queued when the writer last took a batch.",
            int(get(&m.writer_queue_depth)),
        )?;
        gauge(
            e,
            "codi_inflight_bytes",
            "Bytes of requests accepted and not yet answered.",
            src.budget.used() as i64,
        )?;
        gauge(
            e,
            "codi_inflight_limit_bytes",
            "The in-flight budget (storage.inflight_bytes).",
            src.budget.limit() as i64,
        )?;
        let marks = src.watermarks.marks();
        gauges(
            e,
            "codi_log_id",
            "Where log ids stand in storage: every log up to this id is committed, in the \
             indexed table, there on disk, gone from the ingest file, or at the hub.",
            "mark",
            [
                ("committed", marks.committed),
                ("merged", marks.merged),
                ("durable", marks.durable),
                ("ingest_deleted", marks.ingest_deleted),
                ("shipped", marks.shipped),
            ],
        )?;
        one(
            e,
            "codi_commit_duration_seconds",
            "One log batch committed and acknowledged.",
            &HistogramValue {
                snapshot: m.commit_duration.snapshot(),
                scale: 1e-9,
            },
        )?;
        one(
            e,
            "codi_sync_latency_seconds",
            "From a log's commit to the hub's acknowledgment of the batch that held it.",
            &HistogramValue {
                snapshot: m.sync_latency.snapshot(),
                scale: 1e-9,
            },
        )?;
        one(
            e,
            "codi_batch_rows",
            "Log rows per committed batch (group commit).",
            &HistogramValue {
                snapshot: m.batch_rows.snapshot(),
                scale: 1.0,
            },
        )?;
        counter(
            e,
            "codi_commits",
            "Write transactions committed.",
            get(&m.commits),
        )?;
        counter(
            e,
            "codi_commit_errors",
            "Write transactions that failed.",
            get(&m.commit_errors),
        )?;
        counter(
            e,
            "codi_indexed_commits",
            "Log batches committed straight into the indexed table.",
            get(&m.indexed_commits),
        )?;
        counter(
            e,
            "codi_merges",
            "Merge transactions into the indexed table.",
            get(&m.merges),
        )?;
        counter(
            e,
            "codi_logs_merged",
            "Log rows moved into the indexed table.",
            get(&m.logs_merged),
        )?;
        counter(
            e,
            "codi_logs_expired",
            "Log rows deleted by retention (storage.retention_days).",
            get(&m.logs_expired),
        )?;
        counter(
            e,
            "codi_sessions_expired",
            "Ended sessions deleted by retention (storage.retention_days).",
            get(&m.sessions_expired),
        )?;
        counter(
            e,
            "codi_exports_expired",
            "Export archive rows deleted by retention (storage.retention_days).",
            get(&m.exports_expired),
        )?;
        counter(
            e,
            "codi_sessions_timed_out",
            "Open sessions ended after general.session_timeout without activity.",
            get(&m.sessions_timed_out),
        )?;
        counters(
            e,
            "codi_logs_rotated",
            "Log rows deleted whatever their age to make room: cap (the database above storage.max_db_size_mb) or disk (its filesystem nearly full, with a cap set).",
            "reason",
            [
                ("cap", get(&m.logs_rotated_cap)),
                ("disk", get(&m.logs_rotated_disk)),
            ],
        )?;
        counter(
            e,
            "codi_logs_rotated_unshipped",
            "Of the rotated log rows, those the hub did not have yet: they never reach it.",
            get(&m.logs_rotated_unshipped),
        )?;
        counter(
            e,
            "codi_checkpoints",
            "WAL checkpoints run.",
            get(&m.checkpoints),
        )?;
        counter(
            e,
            "codi_recoveries",
            "Salvages of a damaged database file finished since start.",
            get(&m.recoveries),
        )?;
        counter(
            e,
            "codi_logs_salvaged",
            "Logs salvaged from damaged database files into new ones.",
            get(&m.logs_salvaged),
        )?;
        counter(
            e,
            "codi_rows_unreadable",
            "Rows of damaged database files the salvage could not read (an upper bound).",
            get(&m.rows_unreadable),
        )?;
        counter(
            e,
            "codi_sync_batches",
            "Batches of logs the hub acknowledged.",
            get(&m.sync_batches),
        )?;
        counter(
            e,
            "codi_sync_rows",
            "Logs in batches the hub acknowledged.",
            get(&m.sync_rows),
        )?;
        counter(
            e,
            "codi_sync_failures",
            "Batches the hub did not take (each retry counts).",
            get(&m.sync_failures),
        )?;
        gauge(
            e,
            "codi_sync_lag_seconds",
            "Age of the oldest log the hub does not have yet; 0 when it has all (grows while the hub is away).",
            int(get(&m.sync_lag_seconds)),
        )?;
        gauge(
            e,
            "codi_recoveries_unacknowledged",
            "Recoveries from damaged files that no operator has acknowledged yet.",
            int(get(&m.recoveries_unacknowledged)),
        )?;

        // Queries.
        counter(e, "codi_queries", "Queries answered.", get(&m.queries))?;
        counter(
            e,
            "codi_queries_refused",
            "Queries refused for a full answer pool.",
            get(&m.queries_refused),
        )?;
        counter(
            e,
            "codi_rows_cut",
            "Answer rows cut because they were too large to answer whole.",
            get(&m.rows_cut),
        )?;
        gauge(
            e,
            "codi_answer_pool_bytes",
            "Bytes of query answers not yet written out.",
            src.answer_pool.used() as i64,
        )?;

        // Exports.
        counter(
            e,
            "codi_exports_processed",
            "Export files processed: archived, or recorded as content already archived.",
            get(&m.exports_archived) + get(&m.exports_deduplicated),
        )?;
        counter(
            e,
            "codi_exports_deduplicated",
            "Export files whose content was already archived.",
            get(&m.exports_deduplicated),
        )?;
        counter(
            e,
            "codi_export_errors",
            "Export files that could not be archived.",
            get(&m.export_errors),
        )?;
        counter(
            e,
            "codi_export_scans",
            "Full scans of the watched directories.",
            get(&m.export_scans),
        )?;
        counter(
            e,
            "codi_inotify_overflows",
            "Times the inotify event queue overflowed (each followed by a scan).",
            get(&m.inotify_overflows),
        )?;
        counter(
            e,
            "codi_watch_limit_errors",
            "Directories that could not be watched for the inotify watch limit.",
            get(&m.watch_limit_errors),
        )?;
        counter(
            e,
            "codi_watched_dirs_lost",
            "Watched directories found deleted or moved away.",
            get(&m.watched_dirs_lost),
        )?;
        gauges(
            e,
            "codi_watched_directories",
            "Watched directory trees: present, or missing (deleted or moved away).",
            "state",
            [
                (
                    "active",
                    int(get(&m.watched_roots).saturating_sub(get(&m.watched_roots_missing))),
                ),
                ("missing", int(get(&m.watched_roots_missing))),
            ],
        )?;
        gauge(
            e,
            "codi_inotify_watches",
            "Inotify watches held.",
            int(get(&m.inotify_watches)),
        )?;

        // Storage, measured now.
        match watchdog::measure(&src.db) {
            Ok(s) => {
                gauges(
                    e,
                    "codi_database_bytes",
                    "Size of the database files: main (indexed logs, sessions, exports) and ingest (logs acknowledged, not yet merged).",
                    "file",
                    [("main", int(s.main)), ("ingest", int(s.ingest))],
                )?;
                gauges(
                    e,
                    "codi_wal_bytes",
                    "Size of each database file's write-ahead log.",
                    "file",
                    [("main", int(s.main_wal)), ("ingest", int(s.ingest_wal))],
                )?;
                gauge(
                    e,
                    "codi_disk_free_bytes",
                    "Bytes free for the daemon on the database's filesystem.",
                    int(s.free),
                )?;
                gauge(
                    e,
                    "codi_disk_size_bytes",
                    "Size of the database's filesystem.",
                    int(s.size),
                )?;
            }
            Err(err) => log::debug!("cannot measure the database for /metrics: {err}"),
        }

        // Health, as /health says it.
        let health = report::evaluate(src);
        let levels: Vec<(&'static str, i64)> = health
            .components
            .iter()
            .map(|c| {
                let level = match c.status.as_str() {
                    "healthy" => 0,
                    "degraded" => 1,
                    _ => 2,
                };
                (component_label(&c.name), level)
            })
            .collect();
        gauges(
            e,
            "codi_health",
            "Each component's health: 0 healthy, 1 degraded, 2 failed.",
            "component",
            levels,
        )?;
        counters(
            e,
            "codi_admin_requests",
            "HTTP requests to this endpoint: answered, refused (malformed, oversized, other method or path), dropped (over the connection cap or too slow).",
            "outcome",
            [
                ("answered", get(&m.admin_requests)),
                ("refused", get(&m.admin_bad_requests)),
                ("dropped", get(&m.admin_dropped)),
            ],
        )?;
        gauges(
            e,
            "codi_build_info",
            "The daemon's version (always 1).",
            "version",
            [(report::VERSION, 1)],
        )?;

        // The process.
        let p = procfs::sample();
        one(
            e,
            "process_cpu_seconds",
            "User and system CPU time of the daemon.",
            &ConstCounter::new(p.cpu.as_secs_f64()),
        )?;
        gauge(
            e,
            "process_resident_memory_bytes",
            "Resident memory size.",
            int(p.rss_bytes),
        )?;
        gauge(
            e,
            "process_virtual_memory_bytes",
            "Virtual memory size.",
            int(p.virtual_bytes),
        )?;
        gauge(
            e,
            "process_threads",
            "Threads of the daemon.",
            int(p.threads),
        )?;
        gauge(
            e,
            "process_open_fds",
            "Open file descriptors.",
            int(p.open_fds),
        )?;
        if let Some(max) = p.max_fds {
            gauge(
                e,
                "process_max_fds",
                "The limit on open file descriptors.",
                int(max),
            )?;
        }
        let start = SystemTime::now()
            .checked_sub(src.started.elapsed())
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        one(
            e,
            "process_start_time_seconds",
            "When the daemon started, in seconds since the Unix epoch.",
            &ConstGauge::new(start),
        )?;
        Ok(())
    }
}

/// The component names as static labels (the evaluation's fixed set).
fn component_label(name: &str) -> &'static str {
    match name {
        "ipc" => "ipc",
        "writer" => "writer",
        "readers" => "readers",
        "merger" => "merger",
        "exports" => "exports",
        "storage" => "storage",
        "admin" => "admin",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::histogram::IPC_BOUNDS;
    use std::time::Duration;

    fn text(sources: Arc<Sources>) -> String {
        render(&registry(sources))
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no `{series}` in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn counters_gauges_and_histograms_come_from_the_daemon_s_figures() {
        let src = Arc::new(crate::health::report::tests::sources());
        let m = &src.metrics;
        Metrics::add(&m.logs_stored, 7);
        Metrics::add(&m.logs_rejected_invalid, 2);
        Metrics::add(&m.logs_rotated_disk, 5);
        m.error_sent(&crate::proto::ErrorCode::InvalidMessage);
        m.ipc_duration.record_duration(0, Duration::from_micros(30));
        m.ipc_duration.record_duration(1, Duration::from_secs(60));
        m.record_commit(Duration::from_millis(3), 120);
        src.watermarks.note_committed(40);
        src.watermarks.note_shipped(12);
        let t = text(Arc::clone(&src));
        assert_eq!(value(&t, "codi_log_id{mark=\"committed\"}"), 40.0);
        assert_eq!(value(&t, "codi_log_id{mark=\"merged\"}"), 0.0);
        assert_eq!(value(&t, "codi_log_id{mark=\"shipped\"}"), 12.0);
        assert!(t.contains("# TYPE codi_logs_total counter\n"), "{t}");
        assert_eq!(value(&t, "codi_logs_total"), 7.0);
        assert_eq!(
            value(&t, "codi_logs_rejected_total{reason=\"invalid\"}"),
            2.0
        );
        assert_eq!(
            value(&t, "codi_logs_rejected_total{reason=\"storage\"}"),
            0.0
        );
        assert_eq!(value(&t, "codi_logs_rotated_total{reason=\"cap\"}"), 0.0);
        assert_eq!(value(&t, "codi_logs_rotated_total{reason=\"disk\"}"), 5.0);
        assert_eq!(value(&t, "codi_errors_total{code=\"InvalidMessage\"}"), 1.0);
        assert_eq!(value(&t, "codi_errors_total{code=\"Internal\"}"), 0.0);
        assert!(t.contains("# TYPE codi_ipc_duration_seconds histogram\n"));
        assert_eq!(
            value(&t, "codi_ipc_duration_seconds_bucket{le=\"2.5e-05\"}"),
            0.0
        );
        assert_eq!(
            value(&t, "codi_ipc_duration_seconds_bucket{le=\"5e-05\"}"),
            1.0
        );
        assert_eq!(
            value(&t, "codi_ipc_duration_seconds_bucket{le=\"10\"}"),
            1.0
        );
        assert_eq!(
            value(&t, "codi_ipc_duration_seconds_bucket{le=\"+Inf\"}"),
            2.0
        );
        assert_eq!(value(&t, "codi_ipc_duration_seconds_count"), 2.0);
        assert!((value(&t, "codi_ipc_duration_seconds_sum") - 60.00003).abs() < 1e-9);
        assert_eq!(
            IPC_BOUNDS.len() + 1,
            t.matches("codi_ipc_duration_seconds_bucket").count()
        );
        assert_eq!(value(&t, "codi_batch_rows_bucket{le=\"200\"}"), 1.0);
        assert_eq!(value(&t, "codi_batch_rows_sum"), 120.0);
        assert_eq!(value(&t, "codi_commit_duration_seconds_count"), 1.0);
        assert_eq!(value(&t, "codi_health{component=\"writer\"}"), 0.0);
        assert!(value(&t, "process_resident_memory_bytes") > 0.0);
        assert!(value(&t, "process_cpu_seconds_total") > 0.0);
        assert_eq!(value(&t, "codi_sync_lag_seconds"), 0.0, "no hub, no lag");
    }

    #[test]
    fn health_levels_follow_the_table() {
        let src = Arc::new(crate::health::report::tests::sources());
        src.metrics.health.fail("merger", "broken");
        src.metrics.health.set(
            "storage/disk",
            Some((crate::health::Severity::Failed, "full".into())),
        );
        let t = text(src);
        assert_eq!(value(&t, "codi_health{component=\"merger\"}"), 1.0);
        assert_eq!(value(&t, "codi_health{component=\"storage\"}"), 2.0);
    }
}
