//! Parsers and range checks of single values, shared by every section:
//! each error names the key.

use super::error::invalid;
use super::ConfigError;
use log::LevelFilter;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub(super) fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Parses a humantime duration of `key` (or takes `default`), refusing
/// zero and values outside `range`.
pub(super) fn duration(
    key: &str,
    value: Option<&String>,
    default: Duration,
    range: std::ops::RangeInclusive<Duration>,
) -> Result<Duration, ConfigError> {
    let Some(text) = value else {
        return Ok(default);
    };
    let d = match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => return invalid(format!("{key} must be longer than zero")),
        Ok(d) => d,
        Err(e) => {
            return invalid(format!(
                "{key} `{text}` is not a duration like \"30s\" or \"24h\": {e}"
            ))
        }
    };
    if !range.contains(&d) {
        return invalid(format!(
            "{key} is {text} but must be between {} and {}",
            format_duration(*range.start()),
            format_duration(*range.end())
        ));
    }
    Ok(d)
}

/// `value` or `default`, refusing values outside `range`.
pub(super) fn in_range<T: PartialOrd + Copy + fmt::Display>(
    key: &str,
    value: Option<T>,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    let v = value.unwrap_or(default);
    if v < *range.start() {
        return invalid(format!(
            "{key} is {v} but must be at least {}",
            range.start()
        ));
    }
    if v > *range.end() {
        return invalid(format!("{key} is {v} but must be at most {}", range.end()));
    }
    Ok(v)
}

pub(super) const SECOND: Duration = Duration::from_secs(1);
pub(super) const MINUTE: Duration = Duration::from_secs(60);
pub(super) const DAY: Duration = Duration::from_secs(24 * 3600);

pub(super) fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// A list of user or group names: none empty, at most 1,000.
pub(super) fn names(key: &str, list: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let list = list.unwrap_or_default();
    if list.iter().any(String::is_empty) {
        return invalid(format!("{key} contains an empty name"));
    }
    if list.len() > 1000 {
        return invalid(format!("{key} lists {} names, at most 1000", list.len()));
    }
    Ok(list)
}

pub(super) fn parse_level(key: &str, text: &str) -> Result<LevelFilter, ConfigError> {
    LevelFilter::from_str(text).or_else(|_| {
        invalid(format!(
            "{key} `{text}` is not one of off, error, warn, info, debug, trace"
        ))
    })
}
