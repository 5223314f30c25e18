//! `codi2 logs --hub`: the filters of a local `codi2 logs`, run against the
//! ClickHouse hub's `logs` table across every host (docs/HUB.md,
//! "Fleet-wide queries").
//!
//! ClickHouse 18.16 has no query parameters, so every value reaches the SQL
//! text as a literal: text only through [`quote`], numbers only formatted
//! from integers, names only after [`identifier`] checked them. The query
//! goes as an HTTP GET, which ClickHouse runs read-only whatever the user
//! may do, with the hub's own limits on time and rows set per query.
//!
//! The hub is not trusted to answer sensibly: the answer is read as a
//! stream with at most [`MAX_ANSWER_BYTES`] taken from it and at most the
//! rows asked for kept, within [`QUERY_TIMEOUT`]; a line that is not the
//! row asked for is an error naming what came, never a panic.
//!
//! The HTTP transport is here, apart from the daemon's (`hub::sync`), so
//! that it can move to a shared one (TLS) without touching the SQL.

use crate::proto::{LogLevel, StoredLog, Timestamp};
use crate::store::query::{MAX_QUERY_LIMIT, TRUNCATED_MESSAGE_BYTES};
use crate::store::{metadata, MAX_NAME_LEN, MAX_ROW_BYTES};
use crate::text::escape_controls;
use serde::{Deserialize, Deserializer};
use std::fmt::{self, Write as _};
use std::io::{BufRead, BufReader, Read};
use std::time::Duration;
use thiserror::Error;
use uuid::Uuid;

/// The hub's URL for `codi2 logs --hub` when `--hub-url` is not given
/// (before `server_hub.url`).
pub const ENV_HUB_URL: &str = "CODI_HUB_URL";
/// The hub user when `--hub-user` is not given (before `server_hub.user`).
pub const ENV_HUB_USER: &str = "CODI_HUB_USER";
/// The hub password's file when `--hub-password-file` is not given (before
/// `server_hub.password_file`).
pub const ENV_HUB_PASSWORD_FILE: &str = "CODI_HUB_PASSWORD_FILE";

/// Most bytes of one answer read: the newest rows that fit are shown, as
/// a local answer shows those that fit in one frame.
pub const MAX_ANSWER_BYTES: u64 = 16 << 20;

/// Longest a whole query may take, answer included.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// The hub's own time limit per query (`max_execution_time`), a little
/// under [`QUERY_TIMEOUT`] so that the hub says why it stopped.
const HUB_TIME_LIMIT_SECS: u64 = 55;

/// Longest URL of a query, the query in it (ClickHouse 18.16 answers a
/// longer request line with an empty HTTP 400).
pub const MAX_URL_BYTES: usize = 16_000;

/// Most characters of a hub's error text shown.
const MAX_ERROR_CHARS: usize = 300;

/// Most bytes of an error answer read.
const MAX_ERROR_BYTES: u64 = 64 * 1024;

/// Why a hub query failed.
#[derive(Debug, Error)]
pub enum HubQueryError {
    /// The hub's address or a table name is unusable.
    #[error("{0}")]
    Config(String),
    /// No answer: connection refused, timeout, DNS, a broken transfer.
    #[error("cannot reach the hub at {url}: {why}")]
    Unreachable {
        /// The hub's base URL.
        url: String,
        /// What went wrong.
        why: String,
    },
    /// The hub answered with an error status (a bad password, a missing
    /// table, a limit hit).
    #[error("the hub answered HTTP {code}: {text}")]
    Refused {
        /// The HTTP status.
        code: u16,
        /// The start of its error text, controls escaped.
        text: String,
    },
    /// The hub answered 2xx with something that is not the rows asked for.
    #[error("the hub's answer is not what was asked for: {0}")]
    BadAnswer(String),
}

/// Where the hub is and who asks. The password is held only inside the
/// ready `Authorization` value, which `Debug` never shows.
#[derive(Clone)]
pub struct HubTarget {
    /// The base URL, without a trailing `/`.
    url: String,
    /// `database.table`, both checked by [`identifier`].
    table: String,
    /// `Basic ...`, when a user or a password is given.
    auth: Option<String>,
}

impl fmt::Debug for HubTarget {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("HubTarget")
            .field("url", &self.url)
            .field("table", &self.table)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HubTarget {
    /// The hub at `url` (checked as [`crate::config::check_hub_url`]
    /// checks `server_hub.url`), its logs in `database.table`, asked as
    /// `user` (ClickHouse's `default` when only a password is given) with
    /// `password`.
    pub fn new(
        url: &str,
        database: &str,
        table: &str,
        user: Option<&str>,
        password: Option<&str>,
    ) -> Result<HubTarget, HubQueryError> {
        crate::config::check_hub_url("the hub URL", url)
            .map_err(|e| HubQueryError::Config(e.to_string()))?;
        let table = format!("{}.{}", identifier(database)?, identifier(table)?);
        let auth = match (user, password) {
            (None, None) => None,
            (user, password) => {
                use base64::Engine as _;
                let pair = format!("{}:{}", user.unwrap_or("default"), password.unwrap_or(""));
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
            }
        };
        Ok(HubTarget {
            url: url.trim_end_matches('/').to_owned(),
            table,
            auth,
        })
    }

    /// The base URL queries go to.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// `name` if it may stand in SQL as a database or table name: ASCII
/// letters, digits and `_`, not starting with a digit, at most 64 (the
/// rule `server_hub.database` and `logs_table` follow).
pub fn identifier(name: &str) -> Result<&str, HubQueryError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(name)
    } else {
        Err(HubQueryError::Config(format!(
            "hub table name `{}` must be letters, digits and _ (not first), at most 64",
            escape_controls(name)
        )))
    }
}

/// `text` as a ClickHouse string literal, quotes included: `\` and `'`
/// escaped with a backslash, every control character (NUL included) and
/// DEL as `\xHH`; anything else, all of Unicode, as it is. The one way a
/// user's text enters a hub query.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// What to show of the fleet's logs: [`crate::proto::LogFilter`]'s
/// conditions, plus the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HubFilter {
    /// Only logs at this level or more severe.
    pub min_level: Option<LogLevel>,
    /// Only this component.
    pub component: Option<String>,
    /// Only this session.
    pub session_id: Option<String>,
    /// Only logs stamped at or after this time.
    pub since: Option<Timestamp>,
    /// Only logs stamped before this time.
    pub until: Option<Timestamp>,
    /// Only messages containing this text (bytes, case-sensitive).
    pub contains: Option<String>,
    /// Only logs of this host (its `server_hub.host_id`).
    pub host: Option<String>,
}

/// The `WHERE` text (with a leading space), or empty: the local query's
/// conditions (`store::query`) in ClickHouse's words.
pub fn where_clause(f: &HubFilter) -> String {
    let mut conditions = Vec::new();
    if let Some(host) = &f.host {
        conditions.push(format!("host_id = {}", quote(host)));
    }
    if let Some(min) = f.min_level {
        let levels: Vec<String> = LogLevel::ALL
            .into_iter()
            .filter(|l| *l >= min)
            .map(|l| quote(l.as_str()))
            .collect();
        conditions.push(format!("level IN ({})", levels.join(", ")));
    }
    if let Some(c) = &f.component {
        conditions.push(format!("component = {}", quote(c)));
    }
    if let Some(s) = &f.session_id {
        conditions.push(format!("session_id = {}", quote(s)));
    }
    if let Some(t) = f.since {
        conditions.push(format!("timestamp >= {}", t.as_micros()));
    }
    if let Some(t) = f.until {
        conditions.push(format!("timestamp < {}", t.as_micros()));
    }
    if let Some(text) = &f.contains {
        conditions.push(format!("position(message, {}) > 0", quote(text)));
    }
    if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    }
}

/// The query for the newest `limit` (at most [`MAX_QUERY_LIMIT`]) matches
/// in `table`, newest first. `FINAL` merges re-sent copies of a row
/// (`(host_id, id)`) into one; a copy is byte-identical, so filtering
/// before or after that merge keeps the same rows. A row whose stored text
/// exceeds [`MAX_ROW_BYTES`] comes cut, as a local answer cuts it: the
/// names to [`MAX_NAME_LEN`] characters, the message to
/// [`TRUNCATED_MESSAGE_BYTES`], no metadata.
pub fn logs_sql(table: &str, f: &HubFilter, limit: u64) -> String {
    let limit = limit.min(MAX_QUERY_LIMIT);
    let over = format!("stored_bytes > {MAX_ROW_BYTES}");
    format!(
        "SELECT host_id, id, toString(uuid) AS uuid_text, timestamp, level, uid, \
         length(component) + ifNull(length(session_id), 0) + length(message) \
         + ifNull(length(metadata), 0) AS stored_bytes, \
         if({over}, substringUTF8(component, 1, {MAX_NAME_LEN}), component) AS component_shown, \
         if({over}, substringUTF8(session_id, 1, {MAX_NAME_LEN}), session_id) AS session_shown, \
         if({over}, substringUTF8(message, 1, {TRUNCATED_MESSAGE_BYTES}), message) AS message_shown, \
         if({over}, NULL, metadata) AS metadata_shown \
         FROM {table} FINAL{} \
         ORDER BY timestamp DESC, host_id DESC, id DESC LIMIT {limit} FORMAT JSONEachRow",
        where_clause(f)
    )
}

/// The query counting every match in `table`.
pub fn count_sql(table: &str, f: &HubFilter) -> String {
    format!(
        "SELECT count() AS matches FROM {table} FINAL{} FORMAT JSONEachRow",
        where_clause(f)
    )
}

/// One log from the hub and the host it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct HubLog {
    /// The host's `server_hub.host_id`.
    pub host: String,
    /// The log, as a local query would give it (cut alike).
    pub log: StoredLog,
}

/// What a hub query found.
#[derive(Debug, Default)]
pub struct HubAnswer {
    /// The newest matches, oldest first.
    pub logs: Vec<HubLog>,
    /// How many logs match in all.
    pub total: u64,
    /// The answer reached [`MAX_ANSWER_BYTES`]: older matches were left out.
    pub cut_short: bool,
}

/// A connection to the hub for queries.
pub struct HubClient {
    agent: ureq::Agent,
    target: HubTarget,
}

impl HubClient {
    /// A client for `target` that gives up connecting after `connect` and
    /// on a whole query, answer included, after `total` (codi2:
    /// [`QUERY_TIMEOUT`]); it follows no redirect. Over https it trusts
    /// `tls` (from `server_hub.ca_file`, as the daemon does) or, without
    /// it, the built-in web roots.
    pub fn new(
        target: HubTarget,
        connect: Duration,
        total: Duration,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> HubClient {
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(connect)
            .timeout(total)
            .redirects(0);
        if let Some(tls) = tls {
            builder = builder.tls_config(tls);
        }
        HubClient {
            agent: builder.build(),
            target,
        }
    }

    /// The newest `limit` logs matching `f` across the fleet, and how many
    /// match in all (two queries, so the count may include a row that
    /// arrived in between). `limit` 0 only counts.
    pub fn query_logs(&self, f: &HubFilter, limit: u64) -> Result<HubAnswer, HubQueryError> {
        let limit = limit.min(MAX_QUERY_LIMIT);
        let mut answer = HubAnswer::default();
        if limit > 0 {
            let body = self.get(&logs_sql(&self.target.table, f, limit), limit)?;
            let (logs, cut_short) = read_logs(body, limit as usize, MAX_ANSWER_BYTES)?;
            answer.logs = logs;
            answer.cut_short = cut_short;
        }
        let body = self.get(&count_sql(&self.target.table, f), 1)?;
        answer.total = read_count(body)?;
        Ok(answer)
    }

    /// Runs `sql` (a read-only `SELECT`) with at most `rows` rows in its
    /// answer; the answer's body.
    fn get(&self, sql: &str, rows: u64) -> Result<impl Read, HubQueryError> {
        let mut request = self
            .agent
            .get(&format!("{}/", self.target.url))
            .query("query", sql)
            .query("max_execution_time", &HUB_TIME_LIMIT_SECS.to_string())
            .query("max_result_rows", &rows.max(1).to_string())
            .query("result_overflow_mode", "throw")
            .query("output_format_json_quote_64bit_integers", "0");
        // `query` leaves a URL it cannot parse as it was, without the query.
        if let Err(e) = request.request_url() {
            return Err(HubQueryError::Config(format!(
                "the hub URL `{}` is not usable: {}",
                escape_controls(&self.target.url),
                shorten(&e.to_string())
            )));
        }
        if request.url().len() > MAX_URL_BYTES {
            return Err(HubQueryError::Config(format!(
                "the filters make a hub query of {} bytes; the hub takes at most \
                 {MAX_URL_BYTES} (shorten --contains)",
                request.url().len()
            )));
        }
        if let Some(auth) = &self.target.auth {
            request = request.set("Authorization", auth);
        }
        match request.call() {
            Ok(response) => Ok(response.into_reader()),
            Err(ureq::Error::Status(code, response)) => {
                let mut text = String::new();
                let _ = response
                    .into_reader()
                    .take(MAX_ERROR_BYTES)
                    .read_to_string(&mut text);
                Err(HubQueryError::Refused {
                    code,
                    text: shorten(text.trim()),
                })
            }
            Err(ureq::Error::Transport(t)) => Err(HubQueryError::Unreachable {
                url: self.target.url.clone(),
                why: transport_error(&t),
            }),
        }
    }
}

/// A transport error in words, without the URL (it holds the whole query).
fn transport_error(t: &ureq::Transport) -> String {
    let mut why = t.kind().to_string();
    if let Some(m) = t.message() {
        let _ = write!(why, ": {m}");
    }
    if let Some(source) = std::error::Error::source(t) {
        let _ = write!(why, ": {source}");
    }
    shorten(&why)
}

/// `text` with controls escaped, at most [`MAX_ERROR_CHARS`] characters.
fn shorten(text: &str) -> String {
    let escaped = escape_controls(text);
    let mut out: String = escaped.chars().take(MAX_ERROR_CHARS).collect();
    if escaped.chars().nth(MAX_ERROR_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

/// An integer ClickHouse may send as a number or, quoted, as a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Int {
    Number(i64),
    Text(String),
}

impl Int {
    fn value<E: serde::de::Error>(self) -> Result<i64, E> {
        match self {
            Int::Number(n) => Ok(n),
            Int::Text(t) => t
                .parse()
                .map_err(|_| E::custom(format!("`{}` is not an integer", shorten(&t)))),
        }
    }
}

fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    Int::deserialize(d)?.value()
}

fn opt_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<Int>::deserialize(d)?.map(Int::value).transpose()
}

/// One row of [`logs_sql`]'s answer.
#[derive(Deserialize)]
struct Line {
    host_id: String,
    #[serde(deserialize_with = "int")]
    id: i64,
    uuid_text: String,
    #[serde(deserialize_with = "int")]
    timestamp: i64,
    level: String,
    #[serde(default, deserialize_with = "opt_int")]
    uid: Option<i64>,
    #[serde(deserialize_with = "int")]
    stored_bytes: i64,
    component_shown: String,
    session_shown: Option<String>,
    message_shown: String,
    metadata_shown: Option<String>,
}

impl Line {
    fn into_log(self) -> Result<HubLog, String> {
        let uuid = Uuid::parse_str(&self.uuid_text)
            .map_err(|_| format!("uuid `{}`", shorten(&self.uuid_text)))?;
        let level = self.level.parse::<LogLevel>().map_err(|e| shorten(&e))?;
        let uid = self
            .uid
            .map(|u| u32::try_from(u).map_err(|_| format!("uid {u} is out of range")))
            .transpose()?;
        let stored = usize::try_from(self.stored_bytes).unwrap_or(0);
        let mut log = StoredLog {
            id: self.id,
            uuid,
            timestamp: Timestamp::from_micros(self.timestamp),
            level,
            component: self.component_shown,
            session_id: self.session_shown,
            message: self.message_shown,
            metadata: self.metadata_shown.as_deref().map(metadata::from_json),
            uid,
        };
        if stored > MAX_ROW_BYTES {
            cut(&mut log, stored);
        }
        Ok(HubLog {
            host: self.host_id,
            log,
        })
    }
}

/// Gives `log` the cut form of a local answer: names and message within
/// their bounds in bytes, metadata `{"$truncated": stored}`.
fn cut(log: &mut StoredLog, stored: usize) {
    truncate_at_char(&mut log.component, MAX_NAME_LEN);
    if let Some(s) = &mut log.session_id {
        truncate_at_char(s, MAX_NAME_LEN);
    }
    truncate_at_char(&mut log.message, TRUNCATED_MESSAGE_BYTES);
    log.metadata = Some(rmpv::Value::Map(vec![(
        metadata::TRUNCATED_KEY.into(),
        rmpv::Value::from(stored as u64),
    )]));
}

fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// Reads the rows of a [`logs_sql`] answer (newest first) from `body`: at
/// most `max_rows`, within `max_bytes`; returns them oldest first, and
/// whether `max_bytes` stopped the reading (the rows read are then the
/// newest, as asked). Text that is not UTF-8 is shown with U+FFFD.
pub fn read_logs(
    body: impl Read,
    max_rows: usize,
    max_bytes: u64,
) -> Result<(Vec<HubLog>, bool), HubQueryError> {
    let mut reader = BufReader::new(body.take(max_bytes));
    let mut logs = Vec::new();
    let mut line = Vec::new();
    let mut read: u64 = 0;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| HubQueryError::BadAnswer(format!("reading it failed: {e}")))?;
        if n == 0 {
            return Ok(finish(logs, false));
        }
        read += n as u64;
        if line.last() != Some(&b'\n') {
            if read >= max_bytes {
                return Ok(finish(logs, true));
            }
            return Err(HubQueryError::BadAnswer(
                "it ends in the middle of a row".into(),
            ));
        }
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        if logs.len() == max_rows {
            return Err(HubQueryError::BadAnswer(format!(
                "more than the {max_rows} rows asked for"
            )));
        }
        let row = serde_json::from_str::<Line>(&text)
            .map_err(|e| e.to_string())
            .and_then(Line::into_log)
            .map_err(|why| {
                HubQueryError::BadAnswer(format!(
                    "row {}: {why}: {}",
                    logs.len() + 1,
                    shorten(text.trim())
                ))
            })?;
        logs.push(row);
    }
}

fn finish(mut logs: Vec<HubLog>, cut_short: bool) -> (Vec<HubLog>, bool) {
    logs.reverse();
    (logs, cut_short)
}

/// Reads the one row of a [`count_sql`] answer.
pub fn read_count(body: impl Read) -> Result<u64, HubQueryError> {
    let mut text = String::new();
    body.take(4096)
        .read_to_string(&mut text)
        .map_err(|e| HubQueryError::BadAnswer(format!("reading the count failed: {e}")))?;
    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text.trim())
        .ok()
        .and_then(|mut row| row.remove("matches"))
        .and_then(|n| Int::deserialize(n).ok()?.value::<serde_json::Error>().ok())
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| HubQueryError::BadAnswer(format!("the count: {}", shorten(text.trim()))))
}

#[cfg(test)]
mod tests;
