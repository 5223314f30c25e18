//! How `codi2` shows what the daemon answered: a table for people, one JSON
//! object per line for programs.
//!
//! Everything here shows text that other clients wrote (messages, component
//! and session names, watched paths) or that the daemon sent, so every such
//! field goes through [`escape_controls`]: a newline in a message must not
//! forge a row, and an escape sequence must not reach the terminal. JSON
//! lines keep the exact values; only the characters JSON allows raw but a
//! terminal acts on (DEL, C1 controls, bidirectional overrides) are written
//! as `\uXXXX` escapes, which decode to the same string.

use crate::health::report::Report;
use crate::proto::{LogLevel, MonitoredPath, StoredLog, Timestamp};
use crate::store::metadata;
use crate::text::{escape_controls, json_escape_unsafe};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// Width of the component column (longer names push the row right).
const COMPONENT_WIDTH: usize = 12;
/// Width of the session column.
const SESSION_WIDTH: usize = 12;
/// Width of the user column.
const USER_WIDTH: usize = 8;

/// Width of the host column of a hub query (a longer host id, such as a
/// 32-digit machine id, pushes the row right).
const HOST_WIDTH: usize = 12;

/// The header of the table, aligned with [`table_row`].
pub fn table_header() -> String {
    header(false)
}

/// The header of a hub query's table (`codi2 logs --hub`), aligned with
/// [`hub_table_row`]: [`table_header`] with a `HOST` column after `TIME`.
pub fn hub_table_header() -> String {
    header(true)
}

fn header(with_host: bool) -> String {
    let host = if with_host {
        format!("{:<HOST_WIDTH$}  ", "HOST")
    } else {
        String::new()
    };
    format!(
        "{:<24}  {host}{:<5}  {:<USER_WIDTH$}  {:<COMPONENT_WIDTH$}  {:<SESSION_WIDTH$}  MESSAGE",
        "TIME", "LEVEL", "USER", "COMPONENT", "SESSION"
    )
}

/// How the user column shows `uid`: the name `name_of` finds, else the
/// number; `-` for a log written over TCP (no uid).
pub fn user_cell(uid: Option<u32>, name_of: impl FnOnce(u32) -> Option<String>) -> String {
    match uid {
        None => "-".into(),
        Some(uid) => name_of(uid).unwrap_or_else(|| uid.to_string()),
    }
}

/// A timestamp as `2026-11-26T22:34:56.123Z` (UTC, milliseconds).
pub fn short_time(t: Timestamp) -> String {
    DateTime::<Utc>::from_timestamp_micros(t.as_micros())
        .map(|d| d.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| t.as_micros().to_string())
}

fn colour(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Trace => "\x1b[2m",
        LogLevel::Debug => "\x1b[34m",
        LogLevel::Info => "\x1b[32m",
        LogLevel::Warn => "\x1b[33m",
        LogLevel::Error => "\x1b[1;31m",
    }
}

/// Metadata as compact JSON in the mapping the database stores
/// (`store::metadata`: binary as `{"$bin": "<base64>"}`, ...), safe to
/// show: no raw control characters.
pub fn metadata_json(value: &rmpv::Value) -> String {
    match metadata::to_json(value) {
        Ok(json) => json_escape_unsafe(&json).into_owned(),
        Err(_) => escape_controls(&value.to_string()).into_owned(),
    }
}

/// One row: time, level, component, session, message and metadata, each
/// on this one line whatever it contains (controls are shown escaped, see
/// [`escape_controls`]); the level is coloured with ANSI escapes when
/// `colour_on`; `user` is the writer as [`user_cell`] shows it.
pub fn table_row(log: &StoredLog, user: &str, colour_on: bool) -> String {
    row(log, None, user, colour_on)
}

/// One row of a hub query's table: [`table_row`] with the log's host (its
/// `server_hub.host_id`, controls escaped) after the time.
pub fn hub_table_row(log: &StoredLog, host: &str, user: &str, colour_on: bool) -> String {
    row(log, Some(host), user, colour_on)
}

fn row(log: &StoredLog, host: Option<&str>, user: &str, colour_on: bool) -> String {
    let level = format!("{:<5}", log.level.as_str().to_ascii_uppercase());
    let level = if colour_on {
        format!("{}{level}\x1b[0m", colour(log.level))
    } else {
        level
    };
    let host = match host {
        Some(h) => format!("{:<HOST_WIDTH$}  ", escape_controls(h)),
        None => String::new(),
    };
    let mut row = format!(
        "{:<24}  {host}{level}  {:<USER_WIDTH$}  {:<COMPONENT_WIDTH$}  {:<SESSION_WIDTH$}  {}",
        short_time(log.timestamp),
        escape_controls(user),
        escape_controls(&log.component),
        escape_controls(log.session_id.as_deref().unwrap_or("-")),
        escape_controls(&log.message),
    );
    if let Some(meta) = log.metadata.as_ref().filter(|m| !m.is_nil()) {
        row.push_str("  ");
        row.push_str(&metadata_json(meta));
    }
    row
}

/// One log as a single-line JSON object with the exact stored values.
pub fn json_row(log: &StoredLog) -> String {
    json_object(log, None)
}

/// One log of a hub query as [`json_row`] shows it, plus `"host"` (its
/// `server_hub.host_id`).
pub fn hub_json_row(log: &StoredLog, host: &str) -> String {
    json_object(log, Some(host))
}

fn json_object(log: &StoredLog, host: Option<&str>) -> String {
    let meta = match &log.metadata {
        Some(m) => serde_json::from_str(&metadata_json(m)).unwrap_or(serde_json::Value::Null),
        None => serde_json::Value::Null,
    };
    let mut row = serde_json::Map::new();
    if let Some(host) = host {
        row.insert("host".into(), host.into());
    }
    let fields = serde_json::json!({
        "id": log.id,
        "uuid": log.uuid.to_string(),
        "timestamp": log.timestamp.to_rfc3339(),
        "level": log.level.as_str(),
        "component": log.component,
        "session_id": log.session_id,
        "message": log.message,
        "metadata": meta,
        "uid": log.uid,
    });
    if let serde_json::Value::Object(fields) = fields {
        row.extend(fields);
    }
    let row = serde_json::Value::Object(row).to_string();
    json_escape_unsafe(&row).into_owned()
}

/// A round-trip time: `87 µs`, `1.52 ms`, `2.10 s`.
pub fn round_trip(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 1000 {
        format!("{micros} µs")
    } else if micros < 1_000_000 {
        format!("{:.2} ms", micros as f64 / 1e3)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// The daemon's health as lines: the overall state with the version and
/// uptime, then one line per component.
pub fn status_lines(report: &Report) -> Vec<String> {
    let shown: Vec<_> = report
        .components
        .iter()
        .map(|c| {
            (
                escape_controls(&c.name),
                escape_controls(&c.status),
                escape_controls(&c.message),
            )
        })
        .collect();
    let width = shown
        .iter()
        .map(|(name, ..)| name.chars().count())
        .max()
        .unwrap_or(0);
    let version = match &report.version {
        Some(v) => format!("codi-monitor {}, ", escape_controls(v)),
        None => String::new(),
    };
    let mut lines = vec![format!(
        "status {} ({version}up {})",
        report.status(),
        humantime::format_duration(Duration::from_secs(report.uptime.as_secs()))
    )];
    lines.extend(
        shown
            .iter()
            .map(|(name, status, message)| format!("{name:<width$}  {status:<8}  {message}")),
    );
    lines
}

/// One watched directory as a line of `codi2 watch list`: path, whether
/// subdirectories count, patterns, session, and whether it is missing.
pub fn watch_line(p: &MonitoredPath) -> String {
    let patterns: Vec<_> = p.patterns.iter().map(|g| escape_controls(g)).collect();
    let mut line = format!(
        "{}  {}  {}",
        escape_controls(&p.path),
        if p.recursive {
            "recursive"
        } else {
            "this directory only"
        },
        patterns.join(" ")
    );
    if let Some(s) = &p.session_id {
        line.push_str("  session ");
        line.push_str(&escape_controls(s));
    }
    if !p.active {
        line.push_str("  (missing: watched again when it reappears)");
    }
    if p.watch_cap_reached {
        line.push_str("  (watch cap reached: deeper directories found by the periodic scan)");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ComponentStatus;
    use uuid::Uuid;

    fn stored(metadata: Option<rmpv::Value>) -> StoredLog {
        StoredLog {
            id: 7,
            uuid: Uuid::from_u128(1),
            timestamp: Timestamp::parse_rfc3339("2026-11-26T22:34:56.123456Z").unwrap(),
            level: LogLevel::Warn,
            component: "build".into(),
            session_id: None,
            message: "disk low".into(),
            metadata,
            uid: None,
        }
    }

    #[test]
    fn rows_are_aligned_under_the_header() {
        let meta = rmpv::Value::Map(vec![("free".into(), rmpv::Value::from(3))]);
        let row = table_row(&stored(Some(meta)), "alice", false);
        assert_eq!(
            row,
            "2026-11-26T22:34:56.123Z  WARN   alice     build         -             disk low  {\"free\":3}"
        );
        let header = table_header();
        assert_eq!(header.find("LEVEL"), row.find("WARN"));
        assert_eq!(header.find("USER"), row.find("alice"));
        assert_eq!(header.find("MESSAGE"), row.find("disk low"));
        assert_eq!(
            table_row(&stored(None), "-", false),
            "2026-11-26T22:34:56.123Z  WARN   -         build         -             disk low"
        );
    }

    #[test]
    fn hub_rows_add_the_host_after_the_time_and_in_json() {
        let row = hub_table_row(&stored(None), "web-1\n", "1000", false);
        assert_eq!(
            row,
            "2026-11-26T22:34:56.123Z  web-1\\n       WARN   1000      build         -             disk low"
        );
        let header = hub_table_header();
        assert_eq!(header.find("HOST"), row.find("web-1"));
        assert_eq!(header.find("LEVEL"), row.find("WARN"));
        assert_eq!(header.find("MESSAGE"), row.find("disk low"));
        assert_eq!(
            table_header(),
            header.replacen("HOST          ", "", 1),
            "the same columns as a local table"
        );
        let local: serde_json::Value = serde_json::from_str(&json_row(&stored(None))).unwrap();
        let row = hub_json_row(&stored(None), "web\u{202e}1");
        assert!(!row.chars().any(crate::text::is_unsafe), "{row:?}");
        let mut hub: serde_json::Value = serde_json::from_str(&row).unwrap();
        assert_eq!(hub["host"], "web\u{202e}1");
        hub.as_object_mut().unwrap().remove("host");
        assert_eq!(hub, local, "otherwise the local JSON");
    }

    #[test]
    fn the_user_column_shows_a_name_else_the_uid() {
        assert_eq!(user_cell(None, |_| panic!("no lookup")), "-");
        assert_eq!(user_cell(Some(1000), |_| None), "1000");
        assert_eq!(user_cell(Some(0), |uid| Some(format!("u{uid}"))), "u0");
    }

    #[test]
    fn colour_wraps_only_the_level() {
        let row = table_row(&stored(None), "-", true);
        assert!(row.contains("\x1b[33mWARN \x1b[0m"), "{row:?}");
        assert_eq!(row.matches('\x1b').count(), 2);
    }

    #[test]
    fn json_rows_are_one_object_per_line() {
        let row = json_row(&stored(Some(rmpv::Value::from("m"))));
        assert!(!row.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&row).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["uuid"], "00000000-0000-0000-0000-000000000001");
        assert_eq!(v["timestamp"], "2026-11-26T22:34:56.123456Z");
        assert_eq!(v["level"], "Warn");
        assert_eq!(v["session_id"], serde_json::Value::Null);
        assert_eq!(v["metadata"], "m");
        let row = json_row(&stored(Some(rmpv::Value::Binary(vec![0, 7, 255]))));
        let v: serde_json::Value = serde_json::from_str(&row).unwrap();
        assert_eq!(v["metadata"], serde_json::json!({"$bin": "AAf/"}));
        let row = table_row(&stored(Some(rmpv::Value::Ext(2, vec![1]))), "-", false);
        assert!(row.ends_with(r#"{"$ext":2,"data":"AQ=="}"#), "{row}");
    }

    /// A message that, printed raw, would add a forged row and turn the
    /// rest of the terminal red.
    const FORGED: &str = "\n2026-01-01 FORGED ERROR row\x1b[31m";

    #[test]
    fn controls_in_a_log_stay_on_its_one_row_and_show_as_escapes() {
        let mut log = stored(Some(rmpv::Value::from("meta\u{9b}2J\u{202e}")));
        log.message = format!("ok{FORGED}");
        log.component = "c\rX".into();
        log.session_id = Some("s\x07".into());
        for colour_on in [false, true] {
            let row = table_row(&log, "u\x1b[2J", colour_on);
            assert_eq!(row.lines().count(), 1, "{row:?}");
            assert!(!row.contains('\r'), "{row:?}");
            // Only the level's own colour codes are raw escapes.
            let raw_escapes = if colour_on { 2 } else { 0 };
            assert_eq!(row.matches('\x1b').count(), raw_escapes, "{row:?}");
            assert!(!row
                .chars()
                .any(|c| c != '\x1b' && crate::text::is_unsafe(c)));
            assert!(
                row.contains("ok\\n2026-01-01 FORGED ERROR row\\x1b[31m"),
                "{row}"
            );
            assert!(row.contains("c\\rX"), "{row}");
            assert!(row.contains("s\\x07"), "{row}");
            assert!(row.ends_with("\"meta\\u009b2J\\u202e\""), "{row}");
        }
    }

    #[test]
    fn json_rows_keep_the_exact_text_but_no_raw_controls() {
        let mut log = stored(Some(rmpv::Value::from("\u{9b}m")));
        log.message = format!("{FORGED}\u{7f}\u{85}\u{202e}");
        let row = json_row(&log);
        assert_eq!(row.lines().count(), 1);
        assert!(!row.chars().any(crate::text::is_unsafe), "{row:?}");
        let v: serde_json::Value = serde_json::from_str(&row).unwrap();
        assert_eq!(v["message"], log.message.as_str());
        assert_eq!(v["metadata"], "\u{9b}m");
    }

    #[test]
    fn status_and_watch_lines_escape_what_the_daemon_sent() {
        let report = Report {
            version: Some("9\x1b[2J".into()),
            uptime: Duration::ZERO,
            components: vec![ComponentStatus {
                name: "ipc\n".into(),
                status: "ok\x1b]0;pwned\x07".into(),
                message: "a\nb".into(),
                reason: None,
                since: None,
            }],
        };
        let lines = status_lines(&report);
        assert_eq!(lines[0], "status degraded (codi-monitor 9\\x1b[2J, up 0s)");
        assert_eq!(lines[1], "ipc\\n  ok\\x1b]0;pwned\\x07  a\\nb");
        let w = MonitoredPath {
            path: "/w/\x1b[2J".into(),
            recursive: false,
            patterns: vec!["*.md".into(), "\n*".into()],
            session_id: Some("s\u{202e}".into()),
            active: false,
            watch_cap_reached: false,
        };
        assert_eq!(
            watch_line(&w),
            "/w/\\x1b[2J  this directory only  *.md \\n*  session s\\u{202e}  (missing: watched again when it reappears)"
        );
    }

    #[test]
    fn round_trips_pick_a_readable_unit() {
        assert_eq!(round_trip(Duration::from_micros(87)), "87 µs");
        assert_eq!(round_trip(Duration::from_micros(1520)), "1.52 ms");
        assert_eq!(round_trip(Duration::from_millis(2100)), "2.10 s");
    }

    #[test]
    fn status_lists_the_state_then_components() {
        let components = vec![
            ComponentStatus {
                name: "ipc".into(),
                status: "healthy".into(),
                message: "3 connections".into(),
                reason: None,
                since: None,
            },
            ComponentStatus {
                name: "writer".into(),
                status: "degraded".into(),
                message: "queue full".into(),
                reason: Some("queue full".into()),
                since: None,
            },
        ];
        let report = Report {
            version: None,
            uptime: Duration::from_millis(3_723_500),
            components,
        };
        assert_eq!(
            status_lines(&report),
            [
                "status degraded (up 1h 2m 3s)",
                "ipc     healthy   3 connections",
                "writer  degraded  queue full"
            ]
        );
    }
}
